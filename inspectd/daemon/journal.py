"""The results journal's writer (the format and the readers are inspectd.protocol.journal).

The publisher appends every encoded result before it is sent; the ingest threads mark each seq as accepted before its
frame is queued. At open, a torn last record is cut off and `resume` puts each camera's numbering after both the last
journalled result and the accepted mark: frames queued or in flight when the process died have a seq but no result,
so those seqs show up as a gap that subscribers and PLC bridges report (the line learns parts went uninspected)
instead of being silently reused. A segment is closed at `segment_bytes`; when the whole journal exceeds `max_bytes`
the oldest closed segments (any camera) are deleted, so the journal holds the most recent results within its cap.

fsync policy: every record is written to the OS before the result is sent (survives the process dying at any
point); the active segment is fsynced at most once per `fsync_interval_s`, at rotation and at close, so a power loss
can cost up to that interval of records, never the journal's consistency.

A write that fails (disk full: ENOSPC, quota, file-size limit, I/O error) never stops publishing: the partial
record is cut off, the journal is marked `degraded` with the reason (an alarm in status and the log), the record is
counted in `lost`, and writing is retried after `RETRY_S`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from inspectd.protocol.journal import (
    ACCEPTED,
    ACCEPTED_MARK,
    CLEAN_MARK,
    JournalError,
    cameras,
    check_camera,
    encode_record,
    read_records,
    read_since,
    segment_files,
)

log = structlog.get_logger("inspectd.journal")

RETRY_S = 5.0


class _Active:
    __slots__ = ("path", "file", "size")

    def __init__(self, path: Path, file, size: int) -> None:
        self.path, self.file, self.size = path, file, size


class Journal:
    """The writer. One per daemon; `append` is called from the publisher thread, the rest from any thread."""

    def __init__(
        self, directory: str | Path, max_bytes: int, segment_bytes: int | None = None, fsync_interval_s: float = 1.0
    ) -> None:
        self.directory = Path(directory)
        if max_bytes <= 0:
            raise JournalError(f"publish.journal.max_mb: {max_bytes / 2**20:g}, expected a size > 0")
        self.max_bytes = int(max_bytes)
        # Eight segments under the cap: rotation frees an eighth at a time and the newest results are never trimmed.
        self.segment_bytes = min(
            self.max_bytes, int(segment_bytes or max(64 << 10, min(64 << 20, self.max_bytes // 8)))
        )
        self.fsync_interval_s = fsync_interval_s
        self.degraded: str | None = None  # the alarm: why the last write failed, None while writing works
        self.lost = 0  # results published without being journalled
        self.written = 0
        self.unclean = False  # the previous writer did not close the journal (crash, SIGKILL)
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._last: dict[str, int] = {}
        self._accepted: dict[str, int] = {}  # each camera's accepted mark as found at open
        self._accepted_fd: dict[str, int] = {}
        self._accepted_failed = False
        self._closed: list[tuple[float, Path, int]] = []  # (mtime, path, size) of closed segments
        self._total = 0
        self._last_sync = time.monotonic()
        self._retry_at = 0.0
        self._dirty = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            mark = self.directory / CLEAN_MARK
            self.unclean = not mark.exists() and bool(cameras(self.directory))
            mark.unlink(missing_ok=True)
            for camera in cameras(self.directory):
                self._recover(camera)
        except OSError as exc:
            raise JournalError(
                f"publish.journal.path {self.directory}: cannot use it ({exc.strerror or exc}), "
                f"expected a writable directory"
            ) from None

    def _recover(self, camera: str) -> None:
        """Account for a camera's segments and cut a torn record off its newest one (left by a kill mid-write)."""
        try:
            mark = (self.directory / camera / ACCEPTED_MARK).read_bytes()
            if len(mark) == ACCEPTED.size:
                self._accepted[camera] = ACCEPTED.unpack(mark)[0]
        except FileNotFoundError:
            pass
        segments = segment_files(self.directory / camera)
        for i, (_, path) in enumerate(segments):
            size = path.stat().st_size
            if i < len(segments) - 1:
                self._closed.append((path.stat().st_mtime, path, size))
                self._total += size
                continue
            end = 0
            last = None
            for end, seq, _ in read_records(path):  # noqa: B007 - `end` after the loop: where the last whole record ends
                last = seq
            if end < size:
                with open(path, "r+b") as f:
                    f.truncate(end)
                log.warning("journal_torn_record_cut", camera=camera, segment=path.name, bytes=size - end)
            if last is None and i > 0:
                # An empty newest segment: the last seq is in the one before it.
                for _, seq, _ in read_records(segments[i - 1][1]):
                    last = seq
            if last is not None:
                self._last[camera] = last
            self._closed.append((path.stat().st_mtime, path, end))
            self._total += end
        self._closed.sort()

    # -- reading ---------------------------------------------------------------------------------------------------

    def last_seq(self, camera: str) -> int | None:
        """The seq of the last result journalled for `camera`, None if none ever was."""
        return self._last.get(camera)

    def resume(self, camera: str) -> tuple[int, range]:
        """Where `camera`'s numbering goes on, and the seqs before it that have no journalled result: frames that were
        queued or in flight when the last run died, or results published while the journal could not write."""
        last = self._last.get(camera, -1)
        next_seq = max(last, self._accepted.get(camera, -1)) + 1
        return next_seq, range(last + 1, next_seq)

    def read_since(self, camera: str, seq: int) -> Iterator[tuple[int, list[bytes]]]:
        with self._lock:
            active = self._active.get(camera)
            if active is not None:
                active.file.flush()
        return read_since(self.directory, camera, seq)

    def status(self) -> dict:
        return {
            "path": str(self.directory),
            "bytes": self._total + sum(a.size for a in self._active.values()),
            "written": self.written,
            "lost": self.lost,
            "degraded": self.degraded is not None,
            "error": self.degraded,
        }

    # -- writing ---------------------------------------------------------------------------------------------------

    def mark_accepted(self, camera: str, seq: int) -> None:
        """Record that frames up to `seq` have been given their seq. Called per frame from the camera's ingest
        thread: one 8-byte pwrite into the page cache, which a SIGKILL cannot undo. Never raises: a mark that
        cannot be written only costs the gap report after a crash (logged once)."""
        fd = self._accepted_fd.get(camera)
        try:
            if fd is None:
                check_camera(camera)
                with self._lock:
                    (self.directory / camera).mkdir(exist_ok=True)
                    fd = self._accepted_fd[camera] = os.open(
                        self.directory / camera / ACCEPTED_MARK, os.O_WRONLY | os.O_CREAT, 0o600
                    )
            os.pwrite(fd, ACCEPTED.pack(seq), 0)
        except OSError as exc:
            if not self._accepted_failed:
                self._accepted_failed = True
                log.error(
                    "journal_accepted_mark_failed",
                    camera=camera,
                    error=f"{exc.strerror or exc}",
                    effect="frames in flight at a crash will not show as a seq gap after the restart",
                )

    def append(self, camera: str, seq: int, frames: list) -> None:
        """Journal one published result. Never raises for disk trouble: that degrades the journal instead."""
        record = encode_record(seq, frames)
        with self._lock:
            now = time.monotonic()
            if self.degraded is not None and now < self._retry_at:
                self.lost += 1
                return
            active = None
            try:
                active = self._segment_for(camera, seq, len(record))
                active.file.write(record)
                active.file.flush()  # into the OS now: a SIGKILL right after loses nothing
            except OSError as exc:
                self._failed(camera, active, exc, now)
                return
            active.size += len(record)
            self._last[camera] = seq
            self.written += 1
            self._dirty = True
            if self.degraded is not None:
                log.warning("journal_recovered", lost=self.lost)
                self.degraded = None
            if now - self._last_sync >= self.fsync_interval_s:
                self._sync()

    def _segment_for(self, camera: str, seq: int, size: int) -> _Active:
        active = self._active.get(camera)
        if active is not None and active.size + size <= self.segment_bytes:
            return active
        if active is not None:
            self._close_segment(camera)
        check_camera(camera)
        camera_dir = self.directory / camera
        camera_dir.mkdir(exist_ok=True)
        segments = segment_files(camera_dir)
        if segments and active is None and segments[-1][1].stat().st_size + size <= self.segment_bytes:
            # Carry on in the newest segment left by the previous run.
            path = segments[-1][1]
            kept = [c for c in self._closed if c[1] != path]
            self._total -= sum(c[2] for c in self._closed if c[1] == path)
            self._closed = kept
        else:
            path = camera_dir / f"{seq:012d}.seg"
        self._trim(self.segment_bytes)  # room for this segment to fill up
        file = open(path, "ab")
        active = self._active[camera] = _Active(path, file, file.tell())
        return active

    def _close_segment(self, camera: str) -> None:
        active = self._active.pop(camera)
        active.file.flush()
        os.fsync(active.file.fileno())
        active.file.close()
        self._closed.append((time.time(), active.path, active.size))
        self._total += active.size

    def _trim(self, incoming: int) -> None:
        """Delete the oldest closed segments until the journal plus `incoming` bytes fits its cap."""
        live = sum(a.size for a in self._active.values())
        self._closed.sort()
        while self._closed and self._total + live + incoming > self.max_bytes:
            _, path, size = self._closed.pop(0)
            path.unlink(missing_ok=True)
            self._total -= size

    def _failed(self, camera: str, active: _Active | None, exc: OSError, now: float) -> None:
        self.lost += 1
        self._retry_at = now + RETRY_S
        if active is not None:
            try:
                # Cut the partial record off, so every reader still sees whole records only.
                active.file.flush()
            except OSError:
                pass
            try:
                active.file.truncate(active.size)
                active.file.seek(active.size)
            except OSError:
                # Cannot even restore the file: give it up, the next append starts a fresh segment.
                self._active.pop(camera, None)
                try:
                    active.file.close()
                except OSError:
                    pass
        reason = f"{type(exc).__name__}: {exc.strerror or exc} (errno {exc.errno})"
        if self.degraded is None:
            log.error(
                "journal_degraded",
                camera=camera,
                error=reason,
                effect="results are still published but not journalled until the write succeeds again",
            )
        self.degraded = reason

    def _sync(self) -> None:
        if self._dirty:
            for active in self._active.values():
                try:
                    os.fsync(active.file.fileno())
                except OSError:
                    pass
            self._dirty = False
        self._last_sync = time.monotonic()

    def flush(self) -> None:
        with self._lock:
            for active in self._active.values():
                active.file.flush()
            self._sync()

    def close(self) -> None:
        with self._lock:
            for fd in self._accepted_fd.values():
                os.close(fd)
            self._accepted_fd.clear()
            for camera in list(self._active):
                try:
                    self._close_segment(camera)
                except OSError:
                    pass
            try:
                (self.directory / CLEAN_MARK).touch()
            except OSError:
                pass
