"""The bounded per-camera queue between a camera's ingest thread and the batcher."""

from __future__ import annotations

import threading

from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.source import READ_TIMEOUT_S

# drop_oldest: a live camera's newest frames matter most; block: every frame must be judged (a folder's backlog).
QUEUE_POLICIES = ("drop_oldest", "block")


class FrameQueue:
    """Bounded FIFO of Frames between one camera and the batcher, bounded both in frames and in the bytes of their
    images: a count alone let a camera of large frames hold gigabytes. A frame larger than the byte bound on its own is
    still taken, once it is the only one queued.

    Every put notifies the shared `ready` Condition, the one the batcher waits on for all cameras. The slots are a
    preallocated ring, so steady-state operation allocates nothing.
    """

    def __init__(
        self,
        size: int,
        policy: str = "drop_oldest",
        ready: threading.Condition | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"queue size {size}: expected >= 1")
        if policy not in QUEUE_POLICIES:
            raise ValueError(f"queue policy {policy!r}: expected one of {', '.join(QUEUE_POLICIES)}")
        self.size = size
        self.policy = policy
        self.max_bytes = max_bytes
        self.ready = ready if ready is not None else threading.Condition()
        self.dropped = 0
        self.bytes = 0  # of the images queued
        self._slots: list[Frame | None] = [None] * size
        self._head = 0  # index of the oldest frame
        self._count = 0
        self._closed = False
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        """Queue `frame`. Policy block waits for room; returns False (frame not queued) if `stop` is set meanwhile
        or the queue was closed."""
        nbytes = 0 if frame.image is None else frame.image.nbytes
        with self._lock:
            if self._closed:
                return False
            if self.policy == "drop_oldest":
                while self._full(nbytes):
                    self._take_oldest()
                    self.dropped += 1
            else:
                while self._full(nbytes):
                    if self._closed or (stop is not None and stop.is_set()):
                        return False
                    self._room.wait(READ_TIMEOUT_S)
            self._slots[(self._head + self._count) % self.size] = frame
            self._count += 1
            self.bytes += nbytes
        # Appended before taking `ready`: a batcher that checked lengths under `ready` and found nothing is already
        # waiting by the time this notify can run, so no wake-up is lost.
        with self.ready:
            self.ready.notify_all()
        return True

    def close(self) -> None:
        """Accept no more frames; the ones queued stay to be taken. Shutdown closes the queues before it drains them:
        under the lock, so an ingest thread still between its stop check and its put (a slow journal fsync) cannot
        queue a frame after the drain, where it would never get a result."""
        with self._lock:
            self._closed = True
            self._room.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def _full(self, nbytes: int) -> bool:
        """No room for a frame of `nbytes` image bytes (called under the lock)."""
        if self._count == self.size:
            return True
        return self.max_bytes is not None and self._count > 0 and self.bytes + nbytes > self.max_bytes

    def _take_oldest(self) -> Frame:
        frame = self._slots[self._head]
        assert frame is not None
        self._slots[self._head] = None
        self._head = (self._head + 1) % self.size
        self._count -= 1
        self.bytes -= 0 if frame.image is None else frame.image.nbytes
        return frame

    def get_nowait(self) -> Frame | None:
        with self._lock:
            if self._count == 0:
                return None
            frame = self._take_oldest()
            self._room.notify()
            return frame

    def __len__(self) -> int:
        return self._count
