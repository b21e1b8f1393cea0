"""The image archive's writer: keeps every defect frame (as received, plus its overlay) and one good frame in
`good_every` per camera, bounded by size and age, oldest first. The format and its readers are
inspectd.protocol.archive.

The publisher thread calls `offer(judged)` for each result before encoding it: a few comparisons and a non-blocking
put on a bounded queue, returning the id the frame will be archived under (it goes into the result as `archive_id`)
or None. PNG/JPEG encoding, drawing the overlay and every disk write happen on the archive's own thread, so
inference never waits on the disk. When the writer falls behind (queue full) a frame is not archived and its result
says so; when the disk fails (full, I/O error, unwritable) the archive goes `degraded`: one `archive_degraded` log
event, an alarm in status and metrics, frames counted in `lost`, and a retry every RETRY_S until a write succeeds
(`archive_recovered`). Either way publishing goes on.

Retention deletes in the order frames were written (the index's rowid, which SQLite numbers upwards across runs),
never by the wall clock, which a station without a battery clock may have stepped back by NTP: the newest frame,
whose result already names it, must never be the one deleted. The age bound does read the wall clock, held to the
time since writing: while the archive is open a step of the wall clock (seen against the monotonic clock) moves every
recorded write time with it, and a write time in the future at open counts as now.

Everything is created group-readable (directories DIR_MODE, files FILE_MODE) whatever the umask, as the unit's
UMask=0077 would make it the service user's alone: `inspectd web` runs as a member of group inspectd. A closed
index is left in rollback-journal mode, so such a reader needs no -shm file it could not create.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from inspectd.daemon.inference import Judged
from inspectd.protocol import archive as fmt

log = structlog.get_logger("inspectd.daemon.archive")

RETRY_S = 5.0
LIVE_INTERVAL_S = 1.0  # how often a camera's live/<camera>.jpg is replaced
AGE_CHECK_S = 60.0
PRUNE_BATCH = 200
OVERLAY_JPEG_QUALITY = 90
DIR_MODE = 0o750
FILE_MODE = 0o640
# A change of (wall - monotonic) beyond this is a step of the wall clock; NTP's slewing moves it far less between
# two writes.
CLOCK_STEP_S = 2.0
_STOP = object()


class Archive:
    def __init__(
        self, root: str | Path, max_mb: float, max_age_h: float, good_every: int, queue_size: int = 32
    ) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_mb * 2**20)
        self.max_age_s = max_age_h * 3600.0
        self.good_every = good_every
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._good_seen: dict[str, int] = {}
        self._live_due: dict[str, float] = {}
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        self._entries = 0
        self._next_age_check = 0.0
        self._wall_offset: float | None = None  # time.time() - time.monotonic() when last read
        self._retry_at = 0.0
        self.degraded: str | None = None  # the alarm: why the last write failed; None while writing works
        self.written: dict[str, int] = {"ok": 0, "defect": 0}
        self.lost = 0  # chosen for the archive but not written: writer behind, or the disk failing
        self.pruned = 0
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)

    # -- the publisher's side ----------------------------------------------------------------------------------

    def offer(self, judged: Judged) -> str | None:
        """The id `judged`'s frame will be archived under, or None when it is not archived. Never blocks or raises:
        the archive must never cost a result."""
        try:
            return self._offer(judged)
        except Exception as exc:
            self.lost += 1
            log.error("archive_offer_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            return None

    def _offer(self, judged: Judged) -> str | None:
        frame = judged.frame
        if frame.image is None:
            return None
        keep = judged.verdict == "defect"
        if judged.verdict == "ok" and self.good_every:
            seen = self._good_seen.get(frame.camera, 0)
            self._good_seen[frame.camera] = seen + 1
            keep = seen % self.good_every == 0
        now = time.monotonic()
        live = now >= self._live_due.get(frame.camera, 0.0)
        if not keep and not live:
            return None
        entry_id = fmt.archive_id(frame.camera, frame.seq, frame.t_capture) if keep else None
        if entry_id is not None and self.degraded is not None and time.monotonic() < self._retry_at:
            self.lost += 1  # the disk is failing: don't queue work that will fail, until the next retry
            return None
        try:
            self._queue.put_nowait((judged, entry_id, live))
        except queue.Full:
            if entry_id is not None:
                self.lost += 1
            return None
        if live:
            self._live_due[frame.camera] = now + LIVE_INTERVAL_S
        return entry_id

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.root),
            "degraded": self.degraded is not None,
            "error": self.degraded,
            "written": dict(self.written),
            "lost": self.lost,
            "bytes": self._bytes,
            "entries": self._entries,
            "pruned": self.pruned,
        }

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Archive:
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued (within `timeout`), then close the index. False when the writer did not finish."""
        if self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return False
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def alive(self) -> bool:
        """False once the writer thread has ended (on its own, or after close): nothing is archived from then on."""
        return self._thread.is_alive() or self._thread.ident is None

    # -- the writer thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                judged, entry_id, live = item
                if live:
                    self._write_live(judged)
                if entry_id is not None:
                    self._write_entry(judged, entry_id)
        finally:
            if self._db is not None:
                try:
                    # Back to a rollback journal, which a reader without write access can read while no daemon
                    # runs; refused (busy) while a reader has it open, and then that reader keeps the WAL files.
                    self._db.execute("PRAGMA journal_mode=DELETE").fetchall()
                except sqlite3.Error:
                    pass
                self._db.close()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self._mkdirs(self.root)
            index = self.root / fmt.INDEX_NAME
            if not index.exists():
                # SQLite gives the -wal and -shm files the index's mode: create it with the archive's.
                fd = os.open(index, os.O_WRONLY | os.O_CREAT, FILE_MODE)
                try:
                    os.fchmod(fd, FILE_MODE)
                finally:
                    os.close(fd)
            db = fmt.connect(self.root)
            now = time.time()
            with db:  # written "in the future": the clock was set back since; age them from now
                db.execute("UPDATE frames SET t_written = ? WHERE t_written > ?", (now, now))
            self._bytes, self._entries = db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM frames").fetchone()
            self._db = db
        return self._db

    def _mkdirs(self, path: Path) -> None:
        """`path` and its missing parents up to the archive root, each DIR_MODE."""
        if path.is_dir():
            return
        if path != self.root:
            self._mkdirs(path.parent)
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise
            return
        os.chmod(path, DIR_MODE)

    def _wall_clock(self, db: sqlite3.Connection) -> float:
        """time.time(), after moving every recorded write time by the step when the wall clock stepped since the
        last reading: a frame's age stays the time since it was written."""
        now = time.time()
        offset = now - time.monotonic()
        if self._wall_offset is not None and abs(offset - self._wall_offset) > CLOCK_STEP_S:
            step = offset - self._wall_offset
            with db:
                db.execute("UPDATE frames SET t_written = t_written + ?", (step,))
            log.warning("archive_clock_step", step_s=round(step, 3))
        self._wall_offset = offset
        return now

    def _write_entry(self, judged: Judged, entry_id: str) -> None:
        now = time.monotonic()
        if self.degraded is not None and now < self._retry_at:
            self.lost += 1
            return
        frame = judged.frame
        assert frame.image is not None, "offer() takes only frames with an image"
        folder = fmt.day_dir(frame.camera, frame.t_capture)
        frame_file = f"{folder}/{entry_id}.png"
        overlay_file = f"{folder}/{entry_id}.overlay.jpg" if judged.verdict == "defect" else None
        written: list[Path] = []
        try:
            db = self._open()
            self._mkdirs(self.root / folder)
            size = self._write_image(self.root / frame_file, _bgr(frame.image), (), written)
            if overlay_file is not None:
                params = (cv2.IMWRITE_JPEG_QUALITY, OVERLAY_JPEG_QUALITY)
                size += self._write_image(self.root / overlay_file, overlay(judged), params, written)
            with db:
                db.execute(
                    _INSERT,
                    (
                        entry_id,
                        frame.camera,
                        frame.seq,
                        frame.frame_id,
                        frame.t_capture,
                        judged.verdict,
                        judged.score,
                        judged.threshold,
                        judged.model_id,
                        judged.thresholds_version,
                        len(judged.regions),
                        frame_file,
                        overlay_file,
                        size,
                        self._wall_clock(db),
                    ),
                )
        except (OSError, sqlite3.Error) as exc:
            for path in written:  # no image without its index row: retention could never delete it
                _unlink(path)
            self._failed(exc)
            return
        self._bytes += size
        self._entries += 1
        self.written[judged.verdict] = self.written.get(judged.verdict, 0) + 1
        if self.degraded is not None:
            log.warning("archive_recovered", lost=self.lost)
            self.degraded = None
        self._retain(now)

    @staticmethod
    def _write_image(path: Path, image: np.ndarray, params: tuple, written: list[Path]) -> int:
        ok, data = cv2.imencode(path.suffix, image, params)
        if not ok:
            raise OSError(f"cannot encode {path.name}")
        tmp = path.with_name(path.name + ".tmp")
        written.append(tmp)
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data.tobytes())
        os.replace(tmp, path)
        written.append(path)
        return len(data)

    def _write_live(self, judged: Judged) -> None:
        """The camera's latest frame for the web view; best effort, never an alarm of its own."""
        assert judged.frame.image is not None
        live_dir = self.root / fmt.LIVE_DIR
        try:
            self._mkdirs(live_dir)
            self._write_image(
                live_dir / f"{judged.frame.camera}.jpg", _bgr(judged.frame.image), (cv2.IMWRITE_JPEG_QUALITY, 80), []
            )
        except OSError:
            pass

    def _retain(self, now: float) -> None:
        """Delete the oldest entries (in write order) while the archive is over its size, and those past its age."""
        db = self._db
        assert db is not None
        try:
            while self._bytes > self.max_bytes and self._entries > 0:
                self._prune(db.execute(_OLDEST, (PRUNE_BATCH,)).fetchall(), size_bound=True)
            if now >= self._next_age_check:
                self._next_age_check = now + AGE_CHECK_S
                cutoff = self._wall_clock(db) - self.max_age_s
                while rows := db.execute(_OLDER_THAN, (cutoff, PRUNE_BATCH)).fetchall():
                    self._prune(rows)
        except (OSError, sqlite3.Error) as exc:
            self._failed(exc)

    def _prune(self, rows: list, size_bound: bool = False) -> None:
        """Delete these entries (oldest first); with `size_bound`, only as many as bring the archive under its size."""
        assert self._db is not None
        done, freed = [], 0
        for entry_id, frame_file, overlay_file, size in rows:
            if size_bound and self._bytes - freed <= self.max_bytes:
                break
            for name in (frame_file, overlay_file):
                if name:
                    _unlink(self.root / name)
            freed += size
            done.append((entry_id,))
        with self._db:
            self._db.executemany("DELETE FROM frames WHERE id = ?", done)
        self._bytes -= freed
        self._entries -= len(done)
        self.pruned += len(done)

    def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.lost += 1
        self._retry_at = time.monotonic() + RETRY_S
        if isinstance(exc, sqlite3.Error) and self._db is not None:
            self._db.close()  # reopened on the next try: the index may be what failed
            self._db = None
        if self.degraded is None:
            log.error("archive_degraded", path=str(self.root), error=reason, retry_s=RETRY_S)
        self.degraded = reason


_INSERT = f"INSERT OR REPLACE INTO frames ({', '.join(fmt.FIELDS)}) VALUES ({', '.join('?' * len(fmt.FIELDS))})"
_OLDEST = "SELECT id, frame_file, overlay_file, bytes FROM frames ORDER BY rowid LIMIT ?"
_OLDER_THAN = "SELECT id, frame_file, overlay_file, bytes FROM frames WHERE t_written < ? ORDER BY rowid LIMIT ?"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _bgr(image: np.ndarray) -> np.ndarray:
    """Frames travel as RGB (or gray); OpenCV writes BGR."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and image.shape[2] == 3 else image


OVERLAY_COLOUR = (0, 0, 255)  # BGR red
BOX_COLOUR = (0, 255, 255)  # BGR yellow


def overlay(judged: Judged) -> np.ndarray:
    """The frame (BGR) with the defect mask tinted and outlined and each region boxed, and the score written on it."""
    image = judged.frame.image
    assert image is not None
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else _bgr(image).copy()
    if canvas.ndim == 3 and canvas.shape[2] == 1:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)
    if judged.mask is not None and judged.mask.any():
        mask = judged.mask.view(np.uint8)
        tint = canvas.copy()
        tint[judged.mask] = OVERLAY_COLOUR
        canvas = cv2.addWeighted(tint, 0.4, canvas, 0.6, 0)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, OVERLAY_COLOUR, 1)
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for region in judged.regions:
        cv2.rectangle(
            canvas, (region.x, region.y), (region.x + region.w - 1, region.y + region.h - 1), BOX_COLOUR, thickness
        )
    if judged.score is not None and judged.threshold is not None and canvas.shape[1] >= 240:  # legible, not covering
        label = f"{judged.score:.4g} >= {judged.threshold:.4g}"
        scale = max(0.4, canvas.shape[1] / 640)
        cv2.putText(canvas, label, (4, int(18 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, BOX_COLOUR, thickness)
    return canvas
