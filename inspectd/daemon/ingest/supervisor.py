"""The ingest thread per camera: reads its source, stamps Frames with seq, queues them, and keeps the camera alive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from engines.data.images import DEFAULT_BIT_DEPTH
from inspectd.daemon import config as cfg
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest import SOURCES
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.source import READ_TIMEOUT_S, Source, SourceEnded, SourceFatal
from inspectd.errors import one_line

log = structlog.get_logger("inspectd.ingest")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
MAX_DOUBLINGS = 32  # of the first backoff: far past any longest backoff, far short of a float's range


class CameraIngest:
    """The thread that keeps one camera's frames flowing into its queue.

    `stats()["state"]`: running | reopening (not open: its first open not yet done, or failed and waiting out the
    backoff) | paused | ended (a finite source is done) | failed (misconfigured beyond retrying) | stopped (after
    stop()). `reopen_count` counts reopen attempts.
    Frames get `seq` from `first_seq` up, with no gaps among the frames queued. `mark_seq(seq)` is told each seq
    before its frame is queued (the daemon records it in the journal, so a crash shows in-flight frames as a gap).
    `bit_depth`: what the source narrows 16-bit frames by (Source).
    """

    def __init__(
        self,
        camera: cfg.CameraConfig,
        queue: FrameQueue,
        first_seq: int = 0,
        clock: Callable[[], float] = time.time,
        backoff_s: tuple[float, float] = (BACKOFF_FIRST_S, BACKOFF_MAX_S),
        mark_seq: Callable[[int], None] | None = None,
        bit_depth: int = DEFAULT_BIT_DEPTH,
        where: str | None = None,
    ) -> None:
        self.camera = camera
        self.mark_seq = mark_seq or (lambda seq: None)
        self.queue = queue
        self.clock = clock
        self.backoff_s = backoff_s
        self.paused = False
        self.first_seq = first_seq  # this run's numbering starts here: a subscriber's first status counts from it
        self.next_seq = first_seq
        self.frames_in = 0
        self.errors = 0
        self.discarded = 0
        self.reopen_count = 0
        # Not running before its first open succeeds: an open may block for its timeout (an RTSP peer that never
        # answers, an absent GigE camera), and meanwhile the camera delivers nothing that a PLC's trigger_ready or
        # inspectd_camera_up may count on. The state name is the one every consumer already knows as "not open".
        self.state = "reopening"
        self._logged_state: str | None = None  # the state last logged: the first open's outcome is logged too
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._source = make_source(camera, clock, bit_depth, where)
        self._source.report_error = self._reported
        self._log = log.bind(camera=camera.id, source=camera.source.kind)
        self._thread = threading.Thread(target=self._run, name=f"ingest-{camera.id}", daemon=True)

    @property
    def narrows_16_bit(self) -> bool:
        return self._source.narrows_16_bit

    def start(self) -> None:
        self._thread.start()

    def stop_receiving(self) -> threading.Event | None:
        """Source.stop_receiving, while the camera runs (None otherwise)."""
        return self._source.stop_receiving() if self.is_alive() else None

    def stop(self) -> None:
        self._stop.set()

    def settle(self, timeout: float) -> bool:
        return self._source.settle(timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def curve(self):
        """The CurveServer guarding this camera's source (a zmq camera with `curve`), else None."""
        return self._source.curve

    def stats(self) -> dict:
        return {
            "frames_in": self.frames_in,
            "dropped": self.queue.dropped,
            "errors": self.errors,
            "discarded": self.discarded,
            "reopen_count": self.reopen_count,
            "state": "paused" if self.paused and self.state == "running" else self.state,
            "last_error": self.last_error,
            "queued": len(self.queue),
            "next_seq": self.next_seq,
            "first_seq": self.first_seq,
            **self._source.stats(),
        }

    def _reported(self, error: str) -> None:
        self.last_error = error  # the source has logged it, and goes on without a reopen

    def _set_state(self, state: str, **fields) -> None:
        self.state = state
        if state != self._logged_state:
            self._logged_state = state
            # A camera that lost its source, or lost it for good, is what `journalctl -p warning` is read for.
            emit = {"reopening": self._log.warning, "failed": self._log.error}.get(state, self._log.info)
            emit("camera_state", state=state, **fields)

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                opened_at = None
                try:
                    self._source.open(self._stop)
                    if self._stop.is_set():
                        break  # an open that gave up waiting when stop() came (a named pipe with no writer yet)
                    opened_at = time.monotonic()
                    self._set_state("running", reopen_count=self.reopen_count)
                    while not self._stop.is_set():
                        if self.paused and not self._source.live:
                            self._stop.wait(READ_TIMEOUT_S)
                            continue
                        frame = self._source.read(self._stop)
                        if frame is None:
                            continue
                        if self.paused and self._source.live:
                            self.discarded += 1
                            continue
                        # A source that is not read while paused keeps the frame a pause caught mid-read: it was
                        # read before the pause was seen, and a folder's file or a video's frame is not read again
                        # this run, so discarded it would never be judged.
                        self._emit(frame)
                except SourceEnded:
                    self._set_state("ended", frames_in=self.frames_in)
                    return
                except SourceFatal as exc:
                    self.last_error = str(exc)
                    self._set_state("failed", error=self.last_error)
                    return
                except Exception as exc:  # any source failure: the camera is reopened, the others never notice
                    if opened_at is not None and time.monotonic() - opened_at >= self.backoff_s[1]:
                        # Up for longer than the longest backoff: a new outage. (A frame alone does not reset the
                        # backoff: a stream that drops after every frame would be reopened ten times a second.)
                        failures = 0
                    self.last_error = one_line(exc)
                    self._set_state("reopening", error=self.last_error)
                    # The exponent stops growing long before a float would overflow: an outage of hours (a
                    # thousand failures) must leave the camera retrying at the longest backoff, not kill its thread.
                    delay = min(self.backoff_s[1], self.backoff_s[0] * 2.0 ** min(failures, MAX_DOUBLINGS))
                    failures += 1
                    self._source.close()
                    if self._stop.wait(delay):
                        break
                    self.reopen_count += 1
        finally:
            reason = "the daemon is stopping" if self._stop.is_set() else f"the camera {self.state}"
            for frame in self._source.unread():
                self._not_accepted(frame, seq=None, reason=reason)
            self._source.close()
            if self.state not in ("ended", "failed"):
                self._set_state("stopped")

    def _emit(self, frame: Frame) -> None:
        if self._stop.is_set():
            # A read that outlasted stop() (a driver call that cannot be interrupted): shutdown no longer waits for
            # this thread and may have drained the queues, so a frame accepted now would never get a result.
            self._not_accepted(frame, seq=None)
            return
        frame.seq = self.next_seq
        frame.t_ingest = time.monotonic()
        if frame.error is not None:
            self.errors += 1
            self.last_error = frame.error
        self.mark_seq(frame.seq)
        if self.queue.put(frame, self._stop):
            self.next_seq += 1
            self.frames_in += 1
        else:
            self.mark_seq(frame.seq - 1)  # stopping: the frame was never queued, its seq is not used
            self._not_accepted(frame, seq=frame.seq)

    def _not_accepted(self, frame: Frame, seq: int | None, reason: str = "the daemon is stopping") -> None:
        lost = not self._source.redelivers  # a camera's frame is gone, which an alarm should see
        (self._log.warning if lost else self._log.info)(
            "frame_not_accepted", frame_id=frame.frame_id, seq=seq, lost=lost, reason=reason
        )


def make_source(
    camera: cfg.CameraConfig,
    clock: Callable[[], float] = time.time,
    bit_depth: int = DEFAULT_BIT_DEPTH,
    where: str | None = None,
) -> Source:
    return SOURCES[camera.source.kind](camera, clock, bit_depth, where)
