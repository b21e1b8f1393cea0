"""The micro-batcher: gathers frames from every camera's queue into batches for the inference stage.

A batch goes when it holds `max_batch` frames or when its oldest frame has waited `max_wait_ms` since ingest
(Frame.t_ingest, time.monotonic()), whichever comes first. Frames are taken round-robin, one per camera per turn and
starting one camera further at each take (a wake-up may take into a batch already begun), so a fast camera cannot
starve a slow one. The batcher sleeps on the
ingest's shared Condition (queues notify it on put) and never polls.

Frames refused at ingest (Frame.error set) travel in the batch like any other; the inference stage publishes them as
verdict "error" without giving them to the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from inspectd.daemon.frames import Frame


class FrameSource(Protocol):
    """What the batcher needs of a camera queue (inspectd.daemon.ingest.queue.FrameQueue)."""

    def __len__(self) -> int: ...

    def get_nowait(self) -> Frame | None: ...


class MicroBatcher:
    def __init__(
        self,
        queues: Sequence[FrameSource],
        ready: threading.Condition,
        max_batch: int,
        max_wait_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"batching.max_batch: expected an integer >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"batching.max_wait_ms: expected a number >= 0, got {max_wait_ms}")
        self._queues = list(queues)
        self._ready = ready
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._clock = clock
        self._start = 0  # camera that gets the first pick of the next batch
        self._stopping = False
        # The batch list is reused: the caller consumes a batch before asking for the next one. Frames gathered by a
        # call whose timeout ran out before they were due stay in it for the next call (_handed False), so a caller's
        # idle tick never cuts a batch short of max_batch or max_wait_ms.
        self._batch: list[Frame] = []
        self._handed = False

    def _take(self) -> None:
        """Move frames from the queues into the batch, round-robin, until it is full or the queues are empty."""
        batch, queues = self._batch, self._queues
        n = len(queues)
        while len(batch) < self.max_batch:
            took = False
            for k in range(n):
                if len(batch) >= self.max_batch:
                    break
                queue = queues[(self._start + k) % n]
                if len(queue):
                    frame = queue.get_nowait()
                    if frame is not None:
                        batch.append(frame)
                        took = True
            if not took:
                break
        if n:
            self._start = (self._start + 1) % n

    def _hand_over(self) -> list[Frame]:
        self._handed = True
        return self._batch

    def next_batch(self, timeout: float | None = None) -> list[Frame]:
        """Block until a batch is due and return it; an empty list when `timeout` runs out first or on stop() with
        nothing gathered. Frames gathered but not yet due when `timeout` runs out are kept for the next call.

        The returned list is owned by the batcher and reused by the next call.
        """
        if self._handed:
            self._batch.clear()
            self._handed = False
        give_up = None if timeout is None else self._clock() + timeout
        with self._ready:
            while True:
                self._take()
                now = self._clock()
                if len(self._batch) >= self.max_batch or self._stopping:
                    return self._hand_over()
                if self._batch:
                    due = min(f.t_ingest for f in self._batch) + self.max_wait_s
                    if now >= due:
                        return self._hand_over()
                    wait = due - now if give_up is None else min(due, give_up) - now
                elif give_up is None:
                    wait = None
                else:
                    wait = give_up - now
                if wait is not None and wait <= 0:
                    return []
                self._ready.wait(wait)

    def drain(self) -> list[Frame]:
        """Whatever is held or queued now, up to max_batch, without waiting: used at shutdown once ingest has
        stopped."""
        if self._handed:
            self._batch.clear()
        with self._ready:
            self._take()
        return self._hand_over()

    def pending(self) -> int:
        """Frames queued or gathered but not yet handed over."""
        held = 0 if self._handed else len(self._batch)
        return held + sum(len(q) for q in self._queues)

    def stop(self) -> None:
        """Make a waiting next_batch() return at once with what it holds; later calls do the same."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
