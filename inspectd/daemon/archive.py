"""The image archive's writer: keeps every defect frame (as received, plus its overlay) and one good frame in
`good_every` per camera, bounded by size and age, oldest first. The format and its readers are
inspectd.protocol.archive.

The publisher thread calls `offer(judged)` for each result before encoding it: a few comparisons and a non-blocking
put on a bounded queue, returning the id the frame will be archived under (it goes into the result as `archive_id`)
or None. PNG/JPEG encoding, drawing the overlay and every disk write happen on the archive's own thread, so
inference never waits on the disk. When the writer falls behind (queue full) a frame is not archived and its result
says so; when the disk fails (I/O error, unwritable) the archive goes `degraded`: one `archive_degraded` log
event, an alarm in status and metrics, frames counted in `lost`, and a retry every RETRY_S until a write succeeds
(`archive_recovered`). Either way publishing goes on. An offer that fails (a frame it cannot file) raises the same
alarm, logged once (`archive_offer_failed`) until an offer succeeds again (`archive_offer_recovered`).

Room is made before each entry is written, never by deleting it after: the size bound and the file system's free
space (kept above a floor, FREE_FLOOR_FRACTION of it, at most FREE_FLOOR_MAX_BYTES: the journal lives on the same
disk) decide which oldest entries go first. Deleting for the floor is the `degraded` alarm (the disk, not
max_mb, then bounds the archive: something else fills it, or max_mb is more than it holds); when the archive's own
entries could not restore the floor, it deletes nothing for it and skips that write (`lost`), so the space left stays
the journal's. The alarm clears when a write, or the age check, finds the free space above the floor again.
A full disk (ENOSPC, EDQUOT) nonetheless is the archive's to relieve: it deletes its own oldest entries, enough for
the entry, and retries that entry once. A restart on a full disk, where even the index cannot be opened for writing,
first deletes the oldest entries' files (read through a read-only connection), then their rows. The age bound, and
the size bound with it, are checked every AGE_CHECK_S on the writer's own schedule, whatever is written: a max_mb
lowered for a filling disk takes effect within a minute of the restart, not at the next frame kept.

Retention deletes in the order frames were written (the index's rowid, which SQLite numbers upwards across runs),
never by the wall clock, which a station without a battery clock may have stepped back by NTP: the newest frame,
whose result already names it, must never be the one deleted. The age bound does read the wall clock, held to the
time since writing: while the archive is open a step of the wall clock (seen against the monotonic clock) moves every
recorded write time with it, and a write time in the future at open counts as now. A day folder a deletion empties
is removed.

Images are not fsynced (that would halve the writer's rate); a new folder is made durable in its parent, once a
day. So a power cut can leave an index row naming an empty or cut-short file: the readers (export, teach) check a
frame's structure, and skip and name such a file. At open, the writer's `*.tmp` files and empty day folders are
removed, and nothing else: an image whose id the index lacks stays (an index moved aside, restored or new, or rows a
power cut lost, must not cost the defect history); a kill between a rename and its commit leaves at most the queue's
worth of such orphans, which retention never deletes.

An entry that cannot be written for a reason of its own is that entry's failure (`archive_entry_failed`, counted in
`lost`), never the disk's alarm: an image no encoder takes, a frame larger than archive.max_mb alone (storing it would
delete the whole history), an id the index already names (the same camera, capture time and seq again: a recording
replayed with the journal off). The earlier frame keeps that id: a result, an export or a browser's cache may already
hold it, and replacing it would change what they name. An overlay or live frame with a side past what JPEG holds is
shrunk to fit, its aspect kept.

The index open is checked, before each write and age check, to be the file at the index's path still (same device
and inode): an archive cleared, restored or moved under a running daemon is opened anew (and swept as at the first
open), so that no frame is indexed only in a deleted file, where no reader sees it and no retention reaches it.

Everything is created group-readable (directories DIR_MODE, files FILE_MODE) whatever the umask, as the unit's
UMask=0077 would make it the service user's alone: `inspectd web` runs as a member of group inspectd. A closed
index is left in rollback-journal mode, so such a reader needs no -shm file it could not create.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from inspectd.daemon.inference import Judged
from inspectd.durable import FILE_MODE, fsync_dir, make_dirs
from inspectd.errors import one_line
from inspectd.protocol import archive as fmt
from inspectd.protocol.journal import CAMERA_RE
from inspectd.protocol.messages import printable

log = structlog.get_logger("inspectd.daemon.archive")

RETRY_S = 5.0
LIVE_INTERVAL_S = 1.0  # how often a camera's live/<camera>.jpg is replaced
# Entries in a row that fail for reasons of their own before that is the setup's fault, not one frame's (a max_mb
# smaller than one frame, a camera whose every frame no encoder takes): the `degraded` alarm until one is written.
ENTRY_FAILURES_ALARM = 3
ENTRY_FAILED_LOG_S = 60.0  # past the alarm, archive_entry_failed is logged at most this often, with the count
AGE_CHECK_S = 60.0
IDLE_WAKE_MIN_S = 1.0  # the least an idle writer sleeps between age checks, whatever AGE_CHECK_S
PRUNE_BATCH = 200
OVERLAY_JPEG_QUALITY = 90
# JPEG holds no side longer than this; a longer overlay or live frame (a line-scan camera's) is shrunk to it.
JPEG_MAX_SIDE = 65500
# Free space the archive leaves on its file system: a share of it, at most this much.
FREE_FLOOR_FRACTION = 0.01
FREE_FLOOR_MAX_BYTES = 256 * 2**20
# What the queued frames may take to be written at shutdown, past the shutdown deadline: their results already name
# them (as service.PUBLISH_GRACE_S for the results).
CLOSE_GRACE_S = 2.0
# A change of (wall - monotonic) beyond this is a step of the wall clock; NTP's slewing moves it far less between
# two writes.
CLOCK_STEP_S = 2.0
# What opening the index on a full disk frees beyond the entry: its -shm (32 KiB) and the WAL pages of the deletes
# and of the entry's row.
OPEN_ROOM_BYTES = 512 * 2**10
_STOP = object()
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_SQLITE_FULL = 13  # sqlite3.h: "database or disk is full"
# What the writer names, and nothing else, is what the sweep at open may delete.
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FILE_RE = re.compile(rf"(?P<id>{fmt.ID_RE.pattern})(?:\.png|\.overlay\.jpg)(?P<tmp>\.tmp)?")
_LIVE_TMP_RE = re.compile(rf"{CAMERA_RE.pattern}\.jpg\.tmp")


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
        self._db_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the index file self._db has open
        self._swept = False
        self._live_failed: set[str] = set()  # cameras whose live frame failed, logged once until one is written
        self._full_logged = False  # archive_disk_full logged, no write since found room at once
        self._bytes = 0
        self._entries = 0
        self._next_age_check = 0.0
        self._wall_offset: float | None = None  # time.time() - time.monotonic() when last read
        self._retry_at = 0.0
        self._write_error: str | None = None  # why the last write failed; None while writing works
        self._floor_alarm: str | None = None  # the file system's free space is under the floor; None while it is not
        self._offer_error: str | None = None  # why offers fail; None once one succeeds
        self._offer_failures = 0  # in the current run of failed offers
        self._entry_error: str | None = None  # entries keep failing for reasons of their own; None once one is written
        self._entry_failures = 0  # in the current run of entries that failed
        self._entry_logged_at = 0.0  # when archive_entry_failed was last logged within the run
        self.written: dict[str, int] = {"ok": 0, "defect": 0}
        self.lost = 0  # chosen for the archive but not written: writer behind, the disk failing, or the offer failed
        self.pruned = 0
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)

    @property
    def degraded(self) -> str | None:
        """The alarm: why writes (or offers) fail; None while the archive works."""
        return self._write_error or self._floor_alarm or self._offer_error or self._entry_error

    # -- the publisher's side ----------------------------------------------------------------------------------

    def offer(self, judged: Judged) -> str | None:
        """The id `judged`'s frame will be archived under, or None when it is not archived. Never blocks or raises:
        the archive must never cost a result."""
        try:
            return self._offer(judged)
        except Exception as exc:
            self._offer_failed(exc)
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
        entry_id, t_named = None, None
        if keep and self._write_error is not None and now < self._retry_at:
            self.lost += 1  # the disk is failing: don't queue work that will fail, until the next retry
        elif keep:
            try:
                t_named = frame.t_capture if fmt.dated(frame.t_capture) else time.time()
                entry_id = fmt.archive_id(frame.camera, frame.seq, t_named)
            except Exception as exc:  # the live frame below still goes
                self._offer_failed(exc)
            else:
                if self._offer_error is not None:
                    log.warning("archive_offer_recovered", failed=self._offer_failures)
                    self._offer_error, self._offer_failures = None, 0
        if entry_id is None and not live:
            return None
        try:
            self._queue.put_nowait((judged, entry_id, t_named, live))
        except queue.Full:
            if entry_id is not None:
                self.lost += 1
            return None
        if live:
            self._live_due[frame.camera] = now + LIVE_INTERVAL_S
        return entry_id

    def _offer_failed(self, exc: Exception) -> None:
        """One log line per run of failed offers, not one per frame; the run is the `degraded` alarm."""
        self.lost += 1
        self._offer_failures += 1
        if self._offer_error is None:
            self._offer_error = f"offer: {type(exc).__name__}: {exc}".splitlines()[0]
            log.error("archive_offer_failed", error=self._offer_error, effect="not archived until an offer succeeds")

    def _entry_failed(self, judged: Judged, exc: Exception) -> None:
        """One entry not written for a reason of its own. A run of them is the setup's fault: the alarm, and the log
        line at most once a minute past the run's first few."""
        self.lost += 1
        self._entry_failures += 1
        now = time.monotonic()
        if self._entry_failures >= ENTRY_FAILURES_ALARM:
            if self._entry_error is None:
                self._entry_error = f"{self._entry_failures} entries in a row not written, the last: {one_line(exc)}"
            elif now - self._entry_logged_at < ENTRY_FAILED_LOG_S:
                return
        self._entry_logged_at = now
        log.error(
            "archive_entry_failed",
            camera=judged.frame.camera,
            seq=judged.frame.seq,
            frame_id=printable(judged.frame.frame_id[:80]),
            error=one_line(exc),
            failed_in_a_row=self._entry_failures,
            effect="this frame is not archived",
        )

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
        """Write what is queued (within `timeout` in all), then close the index. False when the writer did not
        finish: the frames still queued are not written, though their results name their ids."""
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            else:
                self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error(
                "archive_close_unfinished",
                queued=self._queue.qsize(),
                timeout_s=round(timeout, 3),
                effect="frames still queued are not written; their archive ids name nothing",
            )
            return False
        return True

    def alive(self) -> bool:
        """False once the writer thread has ended (on its own, or after close): nothing is archived from then on."""
        return self._thread.is_alive() or self._thread.ident is None

    # -- the writer thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                wait = max(IDLE_WAKE_MIN_S, self._next_age_check - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                if item is not None:
                    judged, entry_id, t_named, live = item
                    if live:
                        self._write_live(judged)
                    if entry_id is not None:
                        try:
                            self._write_entry(judged, entry_id, t_named)
                        except Exception as exc:  # noqa: BLE001 - one odd entry must not end the writer for all
                            self._entry_failed(judged, exc)
                        else:
                            if self._entry_error is not None:
                                log.warning("archive_entries_recovered", failed=self._entry_failures)
                            self._entry_error, self._entry_failures = None, 0
                self._check_age(time.monotonic())
        finally:
            if self._db is not None:
                try:
                    # Back to a rollback journal, which a reader without write access can read while no daemon
                    # runs; refused (busy) while a reader has it open, and then that reader keeps the WAL files.
                    self._db.execute("PRAGMA journal_mode=DELETE").fetchall()
                except sqlite3.Error:
                    pass
                self._db.close()

    def _open(self, needed: int = 0) -> sqlite3.Connection:
        """The index, open for writing. On a disk too full to open it (SQLite writes its -shm and WAL), the oldest
        entries' files go first, enough for `needed` bytes and OPEN_ROOM_BYTES, then their rows. An index replaced
        or deleted under the open connection is let go of first (see _drop_replaced)."""
        self._drop_replaced()
        if self._db is None:
            self._mkdirs(self.root)
            index = self.root / fmt.INDEX_NAME
            if not index.exists():
                # SQLite gives the -wal and -shm files the index's mode: create it with the archive's.
                fd = os.open(index, os.O_WRONLY | os.O_CREAT, FILE_MODE)
                try:
                    os.fchmod(fd, FILE_MODE)
                finally:
                    os.close(fd)
            # Read before the connect: an index replaced in between is let go of at the next check, not kept.
            db_file = _file_id(index)
            gone: list[tuple] = []
            try:
                db = self._connect()
            except (OSError, sqlite3.Error) as exc:
                if not _disk_full(exc, self.root):
                    raise
                gone = self._unlink_oldest(needed + OPEN_ROOM_BYTES)
                if not gone:
                    raise
                db = self._connect()
            self._db, self._db_file = db, db_file
            if gone:  # their files already deleted: now their rows
                self._prune(gone)
                log.warning("archive_disk_full", pruned=len(gone), freed_for=needed + OPEN_ROOM_BYTES, at="open")
            if not self._swept:
                self._swept = True
                try:
                    self._sweep()
                except OSError as exc:  # leftovers cost space, not frames: the archive works on
                    log.warning("archive_sweep_failed", error=f"{type(exc).__name__}: {exc}")
        return self._db

    def _drop_replaced(self) -> None:
        """Close the index connection when the file at the index's path is no longer the one it has open (the
        archive cleared, restored or moved under the daemon): rows added to a deleted index reach no reader, and
        after a restart their images would be in no index, which no retention rule deletes. The next _open opens
        what is there now (or makes a new one) and sweeps it as at the first open; the totals are read anew."""
        if self._db is None or _file_id(self.root / fmt.INDEX_NAME) == self._db_file:
            return
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._db, self._db_file, self._swept = None, None, False
        log.warning(
            "archive_index_replaced",
            path=str(self.root / fmt.INDEX_NAME),
            effect="the index at the path is opened anew; frames the old one named are no longer counted",
        )

    def _connect(self) -> sqlite3.Connection:
        """A writing connection with the archive's totals read; closed again when any step fails."""
        db = fmt.connect(self.root)
        try:
            now = time.time()
            # Written "in the future": the clock was set back since; age them from now. Looked for first, as an
            # UPDATE writes to the WAL even when it matches nothing, and a full disk refuses that.
            if db.execute("SELECT 1 FROM frames WHERE t_written > ? LIMIT 1", (now,)).fetchone():
                with db:
                    db.execute("UPDATE frames SET t_written = ? WHERE t_written > ?", (now, now))
            self._bytes, self._entries = db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM frames").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _unlink_oldest(self, needed: int) -> list[tuple]:
        """Delete the files of the oldest entries until `needed` bytes are freed, reading the index through a
        read-only connection (one that writes nothing, on a disk that has no room for it); their rows (_OLDEST's),
        which the caller deletes once the index opens. A row whose files are already gone frees nothing but is
        returned all the same."""
        rows: list[tuple] = []
        freed = 0
        try:
            ro = sqlite3.connect(f"{(self.root.resolve() / fmt.INDEX_NAME).as_uri()}?mode=ro", uri=True, timeout=5.0)
            try:
                for row in ro.execute(_OLDEST_ALL):
                    if freed >= needed:
                        break
                    rows.append(row)
                    for name in row[1:3]:
                        if name:
                            freed += _unlink_size(self.root / name)
            finally:
                ro.close()
        except (OSError, sqlite3.Error) as exc:
            if not self._full_logged:  # once per run of writes that find the disk full; the open's error is the alarm
                self._full_logged = True
                log.warning("archive_disk_full", error=f"{type(exc).__name__}: {exc}".splitlines()[0], at="open")
        return rows

    def _sweep(self) -> None:
        """Remove what a kill left: the writer's .tmp files, and day folders left empty. Only names the writer gives,
        in folders it makes; never an image, even one the index does not name."""
        removed = 0
        for camera in _subdirs(self.root, CAMERA_RE):
            if camera.name == fmt.LIVE_DIR:
                for path in _entries(camera):
                    if _LIVE_TMP_RE.fullmatch(path.name):
                        removed += _unlink(path)
                continue
            for day in _subdirs(camera, _DAY_RE):
                for path in _entries(day):
                    match = _FILE_RE.fullmatch(path.name)
                    if match and match["tmp"]:
                        removed += _unlink(path)
                _rmdir(day)
        if removed:
            log.warning("archive_swept", removed=removed, reason="left by a kill: the writer's .tmp files")

    def _mkdirs(self, path: Path) -> None:
        """`path` and its missing parents, each DIR_MODE, each made durable in its parent."""
        for created in make_dirs(path):
            fsync_dir(created.parent)

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

    def _write_entry(self, judged: Judged, entry_id: str, t_named: float) -> None:
        if self._write_error is not None and time.monotonic() < self._retry_at:
            self.lost += 1
            return
        frame = judged.frame
        assert frame.image is not None, "offer() takes only frames with an image"
        folder = fmt.day_dir(frame.camera, t_named)
        frame_file = f"{folder}/{entry_id}.png"
        overlay_file = f"{folder}/{entry_id}.overlay.jpg" if judged.verdict == "defect" else None
        # An image that cannot be encoded is this entry's failure (raised to _run), not the disk's.
        images = [(frame_file, _encode(".png", _bgr(frame.image), ()))]
        if overlay_file is not None:
            params = (cv2.IMWRITE_JPEG_QUALITY, OVERLAY_JPEG_QUALITY)
            images.append((overlay_file, _encode(".jpg", _jpeg_sized(overlay(judged)), params)))
        size = sum(len(data) for _, data in images)
        if size > self.max_bytes:
            # Made room for, it would delete the whole history and then be the next to go.
            raise EntryRefused(
                f"the frame and its overlay take {_mib(size)} MiB, more than archive.max_mb "
                f"({_mib(self.max_bytes)} MiB) holds"
            )
        row = (
            entry_id,
            frame.camera,
            frame.seq,
            frame.frame_id,
            t_named,
            judged.verdict,
            judged.score,
            judged.threshold,
            judged.model_id,
            judged.thresholds_version,
            len(judged.regions),
            frame_file,
            overlay_file,
            size,
        )
        try:
            try:
                _refuse_known(self._open(size), entry_id)  # before room is made for it
                if not self._make_way(size):
                    self.lost += 1
                    return
                self._store(folder, images, row)
                self._full_logged = False
            except (OSError, sqlite3.Error) as exc:
                if not (_disk_full(exc, self.root) and self._make_room(size)):
                    raise
                self._store(folder, images, row)  # once: a disk still full is the alarm
        except (OSError, sqlite3.Error) as exc:
            self._failed(exc)
            return
        self._bytes += size
        self._entries += 1
        self.written[judged.verdict] = self.written.get(judged.verdict, 0) + 1
        if self._write_error is not None:
            log.warning("archive_recovered", lost=self.lost)
            self._write_error = None

    def _store(self, folder: str, images: list[tuple[str, bytes]], row: tuple) -> None:
        """The images, then their index row: no row without its images (but see the module's note on power cuts)."""
        written: list[Path] = []
        try:
            db = self._open()
            _refuse_known(db, row[0])  # nothing written yet: the earlier frame's files stay as they are
            self._mkdirs(self.root / folder)
            for name, data in images:
                self._write_image(self.root / name, data, written)
            with db:
                db.execute(_INSERT, (*row, self._wall_clock(db)))
        except BaseException:
            for path in written:  # no image without its index row: retention could never delete it
                _unlink(path)
            raise

    @staticmethod
    def _write_image(path: Path, data: bytes, written: list[Path]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        written.append(tmp)
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
        os.replace(tmp, path)
        written.append(path)

    def _write_live(self, judged: Judged) -> None:
        """The camera's latest frame for the web view; best effort, never an alarm of its own: the next one replaces
        it within a second."""
        assert judged.frame.image is not None
        camera = judged.frame.camera
        live_dir = self.root / fmt.LIVE_DIR
        try:
            data = _encode(".jpg", _jpeg_sized(_bgr(judged.frame.image)), (cv2.IMWRITE_JPEG_QUALITY, 80))
        except Exception as exc:  # noqa: BLE001 - a frame no encoder takes must not end the writer
            if camera not in self._live_failed:  # else the page's missing live frame has no cause anywhere
                self._live_failed.add(camera)
                log.warning("archive_live_failed", camera=camera, error=one_line(exc), effect="no live frame shown")
            return
        written: list[Path] = []
        try:
            self._mkdirs(live_dir)
            self._write_image(live_dir / f"{camera}.jpg", data, written)
        except OSError:
            with contextlib.suppress(OSError):  # the .tmp, on a full disk; the previous live frame stays
                for path in written[:1]:
                    _unlink(path)
            return
        self._live_failed.discard(camera)

    def _free_floor(self) -> tuple[int, int]:
        """(free bytes on the archive's file system, the floor the archive keeps them above)."""
        st = os.statvfs(self.root)
        floor = min(FREE_FLOOR_MAX_BYTES, int(st.f_blocks * st.f_frsize * FREE_FLOOR_FRACTION))
        return st.f_bavail * st.f_frsize, floor

    def _make_way(self, size: int) -> bool:
        """Before writing an entry of `size` bytes: delete the oldest entries (in write order) that the size bound
        and the free-space floor ask for, so the new entry is never the one deleted. False, with nothing deleted for
        the floor, when the archive's own entries could not restore it (this entry is not written; the room left
        is the journal's). Deleting for the floor at all is an alarm: the disk, not archive.max_mb, bounds the
        archive, because something else fills it or max_mb is more than it holds."""
        self._open(size)
        free, floor = self._free_floor()
        deficit = floor - (free - size)
        if deficit > self._bytes:
            self._floor(
                f"file system free space {_mib(free - size)} MiB with this frame, under the archive's floor "
                f"{_mib(floor)} MiB, and the archive holds only {_mib(self._bytes)} MiB: frames not archived, the room "
                "left is the journal's"
            )
            return False
        if deficit > 0:
            self._floor(
                f"file system free space under the archive's floor {_mib(floor)} MiB: its oldest frames are deleted "
                "to keep it (something else fills the disk, or archive.max_mb is more than it holds)"
            )
        elif self._floor_alarm is not None:
            self._floor(None)
        self._prune_to(min(self.max_bytes - size, self._bytes - max(0, deficit)))
        return True

    def _floor(self, alarm: str | None) -> None:
        """Raise (logged once per run) or clear the free-space floor's alarm."""
        if alarm is not None and self._floor_alarm is None:
            log.error("archive_degraded", path=str(self.root), error=alarm)
        elif alarm is None and self._floor_alarm is not None:
            log.warning("archive_recovered", reason="free space above the floor again", lost=self.lost)
        self._floor_alarm = alarm

    def _make_room(self, needed: int) -> bool:
        """On a full disk: delete the oldest entries until `needed` bytes are freed (the entry not written yet is
        never among them). False when there was nothing to delete."""
        try:
            self._open(needed)
            if self._entries == 0:
                return False
            pruned = self.pruned
            self._prune_to(self._bytes - needed)
        except (OSError, sqlite3.Error):
            return False
        if not self._full_logged:  # once per run of writes that find the disk full
            self._full_logged = True
            log.warning("archive_disk_full", pruned=self.pruned - pruned, freed_for=needed)
        return self.pruned > pruned

    def _prune_to(self, budget: int) -> None:
        db = self._db
        assert db is not None
        while self._bytes > budget and self._entries > 0:
            rows = db.execute(_OLDEST, (PRUNE_BATCH,)).fetchall()
            if not rows:
                break
            self._prune(rows, budget)

    def _check_age(self, now: float) -> None:
        """Every AGE_CHECK_S, delete the entries past the age bound, then the oldest beyond the size bound: on the
        writer's schedule, not only after a write, so a disk that refuses writes still loses its expired frames, and
        an archive.max_mb lowered while the line is idle (or keeps nothing: good_every 0, no defects) is kept to."""
        if now < self._next_age_check:
            return
        self._next_age_check = now + AGE_CHECK_S
        self._drop_replaced()
        if self._db is None and not (self.root / fmt.INDEX_NAME).is_file():
            return  # nothing written yet: no index to make for this
        try:
            if self._floor_alarm is not None:
                free, floor = self._free_floor()
                if free >= floor:
                    self._floor(None)  # room came back while no frame was kept
            db = self._open()
            cutoff = self._wall_clock(db) - self.max_age_s
            while rows := db.execute(_OLDER_THAN, (cutoff, PRUNE_BATCH)).fetchall():
                self._prune(rows)
            self._prune_to(self.max_bytes)
        except (OSError, sqlite3.Error) as exc:
            self._failed(exc, lost=False)

    def _prune(self, rows: list, budget: int | None = None) -> None:
        """Delete these entries (oldest first); with `budget`, only as many as bring the archive down to it. Then the
        day folders this emptied."""
        assert self._db is not None
        done, freed, folders = [], 0, set()
        for entry_id, frame_file, overlay_file, size in rows:
            if budget is not None and self._bytes - freed <= budget:
                break
            for name in (frame_file, overlay_file):
                if name:
                    _unlink(self.root / name)
                    folders.add((self.root / name).parent)
            freed += size
            done.append((entry_id,))
        with self._db:
            self._db.executemany("DELETE FROM frames WHERE id = ?", done)
        self._bytes -= freed
        self._entries -= len(done)
        self.pruned += len(done)
        for folder in folders:
            _rmdir(folder)

    def _failed(self, exc: BaseException, lost: bool = True) -> None:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self._retry_at = time.monotonic() + RETRY_S
        if isinstance(exc, sqlite3.Error) and self._db is not None:
            self._db.close()  # reopened on the next try: the index may be what failed
            self._db = None
        if self._write_error is None:
            log.error("archive_degraded", path=str(self.root), error=reason, retry_s=RETRY_S)
        self._write_error = reason
        if lost:
            self.lost += 1  # last: whoever sees the frame counted sees the archive degraded too


# A plain INSERT: an id already indexed is refused before anything is written (_HAS_ID), never replaced.
_INSERT = f"INSERT INTO frames ({', '.join(fmt.FIELDS)}) VALUES ({', '.join('?' * len(fmt.FIELDS))})"
_HAS_ID = "SELECT 1 FROM frames WHERE id = ?"
_OLDEST_ALL = "SELECT id, frame_file, overlay_file, bytes FROM frames ORDER BY rowid"
_OLDEST = _OLDEST_ALL + " LIMIT ?"
_OLDER_THAN = "SELECT id, frame_file, overlay_file, bytes FROM frames WHERE t_written < ? ORDER BY rowid LIMIT ?"


def _disk_full(exc: BaseException, root: Path) -> bool:
    if isinstance(exc, sqlite3.Error):
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
    elif isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    # SQLite reports some failures of a full disk otherwise (its -shm file: "disk I/O error"): ask the disk.
    try:
        return os.statvfs(root).f_bavail == 0
    except OSError:
        return False


class EntryRefused(ValueError):
    """An entry not archived for a reason of its own: it costs that frame, never the archive's alarm."""


def _encode(suffix: str, image: np.ndarray, params: tuple) -> bytes:
    ok, data = cv2.imencode(suffix, image, params)
    if not ok:
        raise EntryRefused(f"cannot encode a {suffix} image of {image.shape[1]}x{image.shape[0]} px")
    return data.tobytes()


def _refuse_known(db: sqlite3.Connection, entry_id: str) -> None:
    if db.execute(_HAS_ID, (entry_id,)).fetchone():
        raise EntryRefused(f"archive id {entry_id!r} already names an earlier frame, which keeps it")


def _jpeg_sized(image: np.ndarray) -> np.ndarray:
    """`image`, shrunk (its aspect kept) when a side is longer than JPEG holds."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= JPEG_MAX_SIDE:
        return image
    scale = JPEG_MAX_SIDE / longest
    size = (max(1, min(JPEG_MAX_SIDE, round(width * scale))), max(1, min(JPEG_MAX_SIDE, round(height * scale))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _file_id(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`; None when there is none (or it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unlink(path: Path) -> int:
    """1 when `path` was removed, 0 when it was already gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def _unlink_size(path: Path) -> int:
    """The bytes removing `path` freed: 0 when it was already gone."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _rmdir(path: Path) -> None:
    """Remove folder `path` when empty; one still holding files (ENOTEMPTY) or already gone is left as it is."""
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


def _subdirs(path: Path, name: re.Pattern) -> list[Path]:
    return [p for p in _entries(path) if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def _entries(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


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
    # From the short side: taken from the long one, a line-scan strip's boxes (70000 x 64) were 175 px thick and
    # covered the defect they framed.
    thickness = max(1, round(min(canvas.shape[:2]) / 400))
    for region in judged.regions:
        cv2.rectangle(
            canvas, (region.x, region.y), (region.x + region.w - 1, region.y + region.h - 1), BOX_COLOUR, thickness
        )
    if judged.score is not None and judged.threshold is not None and canvas.shape[1] >= 240:  # legible, not covering
        label = f"{judged.score:.4g} >= {judged.threshold:.4g}"
        scale = max(0.4, canvas.shape[1] / 640)
        cv2.putText(canvas, label, (4, int(18 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, BOX_COLOUR, thickness)
    return canvas
