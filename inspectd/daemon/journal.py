"""The results journal's writer (the format and the readers are inspectd.protocol.journal).

The publisher appends every encoded result before it is sent; the ingest threads mark each seq as accepted before its
frame is queued. At open, a torn last record is cut off and `resume` puts each camera's numbering after both the last
journalled result and the accepted mark: frames queued or in flight when the process died have a seq but no result,
so those seqs show up as a gap that subscribers and PLC bridges report (the line learns parts went uninspected)
instead of being silently reused. The accepted mark lives in the page cache between fsyncs, which a power cut loses
(not a killed process); so seqs are also reserved RESERVE at a time in a mark fsynced before any seq past it is given
out, and after the machine restarted (the kernel's boot id changed) numbering resumes past that reservation.
A segment is closed at `segment_bytes`; when the whole journal exceeds `max_bytes` the oldest closed segments (any
camera) are deleted, so the journal holds the most recent results within its cap.

fsync policy: every record is written to the OS before the result is sent (survives the process dying at any
point). A syncer thread fsyncs what was written (active segments, the accepted marks, segments closed by rotation,
and the directories in which segments, marks or the journal's own directories were created or deleted) twice per
`fsync_interval_s`, whether or not anything else is appended, so a power cut costs at most that interval (unless an
fsync itself takes longer than half of it), on a quiet line as on a busy one, and the publishing thread never waits
for the disk. An fsync that fails is logged (`journal_fsync_failed`) and counted, never ignored. An open after an
unclean stop first fsyncs what the dead run may have left in the page cache (each camera's marks, newest segment and
folder), so this run's clean mark never covers them; where that fails, or the last fsync at close does, the clean
mark is withheld.

A write that fails (disk full: ENOSPC, quota, file-size limit, I/O error) never stops publishing: the partial
record is cut off at once (or, if even that fails, before the next append to that segment), the journal is marked
`degraded` with the reason (an alarm in status and the log), the record is counted in `lost`, and writing is retried
after `retry_s`. So once space returns every later record is whole and readable. The same holds for the writes
the open makes (the boot mark, and after a reboot each camera's accepted mark raised to its reservation): a full disk
at the first start after a reboot starts degraded, not refused, so the archive can free room; those writes are
retried with the next append, and until they are made the clean mark is withheld, so the next start on this boot
handles the reboot again (numbering resumes past the reservation either way). A segment deleted while open (the
journal's directory removed) is noticed by the syncer (an fstat and a stat of its path per active segment per round,
on an idle line too, none per record) or at rotation: the records written to it since the last check are counted
lost, not written, and the journal re-creates its directories and goes on in a new segment; each camera's marks are
opened again at its next frame. One moved away instead (the directory renamed, or replaced by a copy) loses nothing:
the round that finds it writes each camera's marks and the boot mark into the configured directory at once, and
removes a clean mark the copy brought, so a crash any time after that round numbers on there.

Trimming deletes the oldest closed segments of any camera by their write order: a segment closed is stamped (its
mtime) with a time that never goes back, the later of the clock and just past the newest stamp found, so after the
clock was set back the results written since still rank after every camera's older ones, at this start and the next.

Everything is created group-readable (directories DIR_MODE, files FILE_MODE, as the archive) whatever the umask, as
the unit's UMask=0077 would make it the service user's alone: `inspectd subscribe --journal` runs as a member of group
inspectd. What a journal already holds is given group read at open where it lacks it (one left by an older writer
under that umask), so its operators can read it once the daemon restarted.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from inspectd.durable import FILE_MODE, fsync_dir, make_dirs, replace_file
from inspectd.protocol import journal as journal_format
from inspectd.protocol.journal import (
    ACCEPTED,
    ACCEPTED_MARK,
    BOOT_MARK,
    CLEAN_MARK,
    RESERVED_MARK,
    JournalError,
    OnCorrupt,
    cameras,
    check_camera,
    encode_record,
    mark_damage,
    read_mark,
    read_records,
    read_since,
    segment_files,
)

log = structlog.get_logger("inspectd.journal")

RETRY_S = 5.0
# Seqs given out per fsynced reservation: a power cut skips at most this many unused seqs per camera, and the ingest
# thread fsyncs once per this many frames.
RESERVE = 256
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# A write refused by the disk (full, quota, file-size limit, failing device), not by the configuration: it degrades
# the journal, at open as at run time. Anything else at open (not a directory, permissions, read-only) is refused.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
# How far a segment's stamp goes past the newest one when the clock is behind it (well above mtime's resolution).
STAMP_STEP_S = 0.001
# Rotated segments waiting for the syncer's fsync and close. Past this, rotation fsyncs and closes the oldest itself:
# with segments of about one record (a small max_mb, results with masks) and a slow fsync (SD card, eMMC), rotation
# outruns the syncer and the descriptors would grow to EMFILE, failing the journal and the daemon's sockets with it.
MAX_PENDING_CLOSE = 64


class _Active:
    """A segment open for appending: an unbuffered O_APPEND descriptor and the size of its whole records; the records
    this run appended, how many of them the syncer saw in a file still linked, whether it saw the file gone from its
    path, and whether it was moved (still linked elsewhere: a renamed journal directory) rather than deleted."""

    __slots__ = ("path", "fd", "size", "records", "checked", "unlinked", "moved")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path, self.fd, self.size = path, fd, size
        self.records = self.checked = 0
        self.unlinked = self.moved = False


MOVED_EFFECT = (
    "the journal's segments were moved away (its directory renamed or replaced): what was written stays where it was "
    "moved; writing, marks and numbering go on in the configured directory"
)


def _mark_failed(camera: str, exc: OSError | struct.error, effect: str) -> None:
    error = f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
    log.error("journal_accepted_mark_failed", camera=camera, error=error, effect=effect)


def _dups(fds: list[int]) -> list[int]:
    """A duplicate of each of `fds`, for an fsync outside the lock; none left open where one fails (EMFILE)."""
    made: list[int] = []
    try:
        for fd in fds:
            made.append(os.dup(fd))
    except OSError:
        for fd in made:
            os.close(fd)
        raise
    return made


def _at_path(path: Path, found: os.stat_result) -> bool:
    """Whether `path` still names the file `found` (fstat of a descriptor on it). False where it names another file
    or none: a renamed or replaced journal directory, the file living on elsewhere. True where it cannot be told
    (a folder above it made unreadable): not taken for a move."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return (named.st_dev, named.st_ino) == (found.st_dev, found.st_ino)


def _read_text(path: Path) -> str | None:
    """The text in `path`, None where there is none, it cannot be read, or it is not UTF-8 (a damaged boot mark is
    an unknown boot: the safe side, a reboot, after an unclean stop)."""
    try:
        return path.read_bytes().decode().strip() or None
    except UnicodeDecodeError:
        log.warning("journal_mark_ignored", mark=str(path), reason="not UTF-8 text", effect="taken as unknown")
        return None
    except OSError:
        return None


def _open(path: Path, flags: int) -> int:
    """A descriptor on file `path`, created where missing with FILE_MODE whatever the umask. One already there keeps
    its mode (made group-readable at open, `_group_readable`)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _group_readable(path: Path, st_mode: int) -> None:
    """Let the group read `path` (found at open, its mode `st_mode`) where it may not: a journal an older writer left
    under UMask=0077. Only widened, never narrowed (a journal made readable to others stays so). Best effort: what
    another user left keeps its mode, and a reader that cannot read it says so."""
    wanted = stat.S_IRGRP | stat.S_IXGRP if stat.S_ISDIR(st_mode) else stat.S_IRGRP
    if st_mode & wanted != wanted:
        try:
            os.chmod(path, stat.S_IMODE(st_mode) | wanted)
        except PermissionError:
            pass


def _reason(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc} (errno {exc.errno})"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _kept_end(path: Path, on_corrupt: OnCorrupt, check_seq: bool = True) -> tuple[int, int | None]:
    """Where a camera's newest segment ends once a torn tail is cut (0 for nothing kept), and its last seq (None for
    none). Corrupt stretches are kept, as readers skip them and report them, at the end as anywhere else: only a
    record cut short is a torn tail, and a damaged record is not the last seq."""
    end = 0
    last = None

    def corrupt(found: Path, offset: int, skipped: int) -> None:
        nonlocal end
        on_corrupt(found, offset, skipped)
        end = max(end, offset + skipped)

    for end, seq, _ in read_records(path, on_corrupt=corrupt, check_seq=check_seq):  # noqa: B007 - `end` is kept
        last = seq
    return end, last


def _whole_records_end(path: Path) -> int:
    """What a torn or half-written tail of the newest segment is cut to before appending (see _kept_end): found
    corruption is counted at open already, and the seqs are not needed here."""
    return _kept_end(path, lambda *_: None, check_seq=False)[0]


class Journal:
    """The writer. One per daemon; `append` is called from the publisher thread, the rest from any thread."""

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        segment_bytes: int | None = None,
        fsync_interval_s: float = 1.0,
        retry_s: float = RETRY_S,
        camera_count: int = 1,
    ) -> None:
        self.directory = Path(directory)
        if max_bytes <= 0:
            raise JournalError(f"publish.journal.max_mb: {max_bytes / 2**20:g}, expected a size > 0")
        self.max_bytes = int(max_bytes)
        # Eight segments under the cap: rotation frees an eighth at a time and the newest results are never trimmed.
        # The cameras share that eighth: each has a segment open, which rotation cannot free, so with one eighth
        # each many cameras would hold several times the cap.
        default = max(64 << 10, min(64 << 20, self.max_bytes // 8)) // max(1, camera_count)
        self.segment_bytes = min(self.max_bytes, int(segment_bytes or default))
        self.fsync_interval_s = fsync_interval_s
        self.retry_s = retry_s
        self.degraded: str | None = None  # the alarm: why the last write failed, None while writing works
        self.lost = 0  # results published without being journalled
        self.written = 0
        self.unsynced = 0  # records written to the OS but not yet fsynced
        self.fsync_failed = 0
        self.corrupt = 0  # corrupt stretches found inside segments at open (reported, the records around kept)
        self.unclean = False  # the previous writer did not close the journal (crash, SIGKILL)
        # ... and the machine restarted since (power cut, kernel crash): the page cache, and with it any accepted
        # mark written after the last fsync, is gone, so numbering resumes after the reservation instead.
        self.rebooted = False
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._last: dict[str, int] = {}
        self._accepted: dict[str, int] = {}  # each camera's accepted mark as found at open
        self._accepted_fd: dict[str, int] = {}
        # Per camera, held around each use of its mark descriptors, so close() never closes one under a pwrite or
        # fsync of an ingest thread that outlived the shutdown (the number could meanwhile name another file).
        self._mark_locks: dict[str, threading.Lock] = {}
        self._accepted_failed = False
        self._reserved: dict[str, int] = {}  # each camera's reservation as found at open
        self._distrusted: set[str] = set()  # cameras whose accepted mark was found damaged at open
        self._reserved_to: dict[str, int] = {}  # the reservation this run has synced
        self._reserved_fd: dict[str, int] = {}
        # (age, path, size) of closed segments, deleted lowest age first. The age is the file's mtime for segments
        # found at open (made to rise with the seqs within each camera), then the stamp each gets when it is closed
        # (`_close_segment`): the wall clock may jump back (a station without a battery clock corrected by NTP), and
        # the newest results, of any camera, must not go first.
        self._closed: list[tuple[float, Path, int]] = []
        self._age = 0.0
        self._total = 0
        # The size of the open segments, kept as they change, so that status() (from the metrics and control threads)
        # neither iterates _active while the publishing thread rotates a segment nor waits on the lock it holds
        # through a write a stalled disk may block.
        self._active_bytes = 0
        self._retry_at = 0.0
        self._undeletable: set[Path] = set()  # closed segments whose delete failed (logged once each)
        self._torn: dict[Path, int] = {}  # segments whose tail could not be cut when a write failed: their good size
        # What the syncer owes the disk: descriptors of segments closed since, directories whose entries changed, and
        # cameras whose accepted mark moved.
        self._to_close: list[int] = []
        self._dirs_dirty: set[Path] = set()
        self._marks_dirty: set[str] = set()
        self._fsync_error: str | None = None
        self._oversize: set[str] = set()  # cameras whose record over MAX_BODY was logged (once each)
        # Each camera's accepted mark as this run last wrote it: written again into the configured directory at
        # close where the journal was moved away since.
        self._given: dict[str, int] = {}
        self._marks_unmoved = False  # a camera's marks could not be written again after a move: no clean mark
        self._replaced = False  # the journal's directory was found replaced: a clean mark in the new one goes
        # Cameras whose mark files may have been deleted with their folder: reopened at the camera's next frame.
        self._marks_stale: set[str] = set()
        # The writes the open owes the disk, made before any later append: each camera's accepted mark raised to its
        # reservation after a reboot, then the boot mark (only once the floors are durable).
        self._floors_owed = False
        self._boot_owed = False
        self._resumed_unsynced = False  # what an unclean stop left could not all be fsynced at open
        self._settle_lock = threading.Lock()
        self._to_follow: set[str] = set()  # cameras whose segment a sync round found moved: marks to write again
        self._boot = _read_text(BOOT_ID)
        self._stop = threading.Event()
        try:
            # A directory created here (the journal's, the state dir's on a first start) is an entry in its parent,
            # which a power cut can lose with everything under it until the parent is fsynced too.
            missing = self.directory
            while not missing.exists() and missing.parent != missing:
                self._dirs_dirty.add(missing.parent)
                missing = missing.parent
            if self.directory.is_dir():
                _group_readable(self.directory, self.directory.stat().st_mode)
            else:
                try:
                    make_dirs(self.directory)
                except OSError as exc:
                    if exc.errno not in DISK_ERRORS:
                        raise
                    # Nothing to recover: the boot mark (and the directory) are written once the disk takes them.
                    self._boot_owed = self._boot is not None
                    self._open_degraded(exc)
            if self.directory.is_dir():
                self._open_existing()
        except (OSError, JournalError) as exc:
            cause = exc.__cause__ if isinstance(exc, JournalError) else exc  # cameras(): the listing that failed
            if not isinstance(cause, OSError):
                raise
            # The file refused, not only the journal: it may hold thousands.
            what = "it"
            if cause.filename is not None and Path(cause.filename) != self.directory:
                what = Path(cause.filename).as_posix()
                if Path(cause.filename).is_relative_to(self.directory):
                    what = Path(cause.filename).relative_to(self.directory).as_posix()
            raise JournalError(
                f"publish.journal.path {self.directory}: cannot use {what} ({cause.strerror or cause}), "
                f"expected a writable directory"
            ) from None
        self._syncer = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._syncer.start()

    def _open_existing(self) -> None:
        mark = self.directory / CLEAN_MARK
        self.unclean = not mark.exists() and bool(cameras(self.directory))
        if mark.exists():
            # Gone for good before anything is appended, or a power cut would leave a run that never closed looking
            # clean at the next start.
            mark.unlink()
            fsync_dir(self.directory)
        boot, previous_boot = self._boot, _read_text(self.directory / BOOT_MARK)
        self.rebooted = self.unclean and (boot is None or previous_boot != boot)
        for camera in cameras(self.directory):
            self._recover(camera)
        if self.unclean:
            self._fsync_found(self.directory)  # the entries of cameras the last run added
        self._floors_owed = self.rebooted
        self._boot_owed = boot is not None and previous_boot != boot
        if previous_boot is not None and not self._boot_owed:
            _group_readable(self.directory / BOOT_MARK, (self.directory / BOOT_MARK).stat().st_mode)
        try:
            self._settle()
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                raise
            self._open_degraded(exc)

    def _open_degraded(self, exc: OSError) -> None:
        """A write at open refused by the disk: start degraded (an alarm, retried with the first append) instead of
        refusing to start, so the rest of the daemon (the archive, which frees room) runs."""
        self.degraded = _reason(exc)
        log.error(
            "journal_degraded",
            error=self.degraded,
            at="open",
            effect="results are still published but not journalled until the write succeeds again"
            + (
                "; until then the reboot's seq floors are not on disk, so the clean mark is withheld and the next"
                " start on this boot resumes past the reservations again (no seq is given out twice)"
                if self._floors_owed
                else ""
            ),
        )

    def _settle(self) -> None:
        """Make the writes the open owes, in order: the floors durable before the boot mark, or a start that ends
        before each camera's next reservation (a failed start, an idle run stopped) would make the next one, on the
        same boot, take the stale marks again. Serialised: the publisher and the syncer (after a move) both call it."""
        with self._settle_lock:
            self._settle_owed()

    def _settle_owed(self) -> None:
        if self._floors_owed:
            self._raise_floors()
            self._floors_owed = False
        if self._boot_owed and self._boot is not None:
            created = make_dirs(self.directory)
            with self._lock:  # the syncer iterates the set it takes
                self._dirs_dirty.update(c.parent for c in created)
            if self._replaced:
                # A directory put in place of the journal while it was open (restored from a copy) may hold a clean
                # mark, which would make a crash of this run look like a clean stop; gone before the boot mark (whose
                # rename fsyncs the directory).
                (self.directory / CLEAN_MARK).unlink(missing_ok=True)
                self._replaced = False
            replace_file(self.directory / BOOT_MARK, self._boot.encode(), FILE_MODE)
        self._boot_owed = False

    def _retry_open(self) -> bool:
        """Retry the writes the open owes (False where they still fail: the caller's record is lost, as records are
        while the journal cannot write)."""
        try:
            self._settle()
            return True
        except OSError as exc:
            with self._lock:
                self._retry_at = time.monotonic() + self.retry_s
                if self.degraded is None:
                    log.error(
                        "journal_degraded",
                        error=_reason(exc),
                        effect="results are still published but not journalled until the write succeeds again",
                    )
                self.degraded = _reason(exc)
            return False

    def _recover(self, camera: str) -> None:
        """Account for a camera's segments and cut a torn record off its newest one (left by a kill mid-write)."""
        _group_readable(self.directory / camera, (self.directory / camera).stat().st_mode)
        for name, marks in ((ACCEPTED_MARK, self._accepted), (RESERVED_MARK, self._reserved)):
            mark = read_mark(self.directory / camera, name)
            if mark is not None:
                marks[camera] = mark
                _group_readable(self.directory / camera / name, (self.directory / camera / name).stat().st_mode)
        segments = segment_files(self.directory / camera)
        age = 0.0
        for i, (_, path) in enumerate(segments):
            found = path.stat()
            _group_readable(path, found.st_mode)
            size = found.st_size
            age = max(age, found.st_mtime)
            self._age = max(self._age, age)
            if i < len(segments) - 1:
                self._closed.append((age, path, size))
                self._total += size
                continue
            end, last = _kept_end(path, self._corrupt_found)
            if end < size:
                with open(path, "r+b") as f:
                    f.truncate(end)
                log.warning("journal_torn_record_cut", camera=camera, segment=path.name, bytes=size - end)
            if last is None and i > 0:
                # An empty newest segment: the last seq is in the one before it.
                for _, seq, _ in read_records(segments[i - 1][1], on_corrupt=self._corrupt_found):
                    last = seq
            if last is not None:
                self._last[camera] = last
            self._closed.append((age, path, end))
            self._total += end
        self._closed.sort()
        for name, marks in ((ACCEPTED_MARK, self._accepted), (RESERVED_MARK, self._reserved)):
            self._check_mark(camera, name, marks)
        if self.unclean:
            self._sync_resumed(camera, segments[-1][1] if segments else None)

    def _check_mark(self, camera: str, name: str, marks: dict[str, int]) -> None:
        """Ignore `camera`'s mark `name` (warned, naming the file) where its value is damage, not seqs given out:
        journal.mark_damage (below -1, past MAX_MARK, far past the last seq journalled). Trusted, it would move the
        numbering to seqs no part had, or to ones whose reservation no longer fits the mark (every frame's mark then
        failing). Numbering resumes after the journal instead, and past the reservation where the accepted mark is
        the damaged one (what was in flight at a kill is then unknown, as after a reboot); this run's first frame
        rewrites the mark."""
        mark = marks.get(camera)
        if mark is None:
            return
        reason = mark_damage(mark, self._last.get(camera))
        if reason is None:
            return
        del marks[camera]
        if name == ACCEPTED_MARK:
            self._distrusted.add(camera)
        log.warning(
            "journal_mark_ignored",
            mark=str(self.directory / camera / name),
            value=mark,
            reason=reason,
            effect="taken for damage: numbering resumes after the journal"
            + (" and the camera's reservation" if name == ACCEPTED_MARK else " and the camera's accepted mark"),
        )

    def _sync_resumed(self, camera: str, newest: Path | None) -> None:
        """After an unclean stop, fsync what the last run left of `camera` in the page cache: its marks, its newest
        segment (after the torn tail's cut) and its folder's entries. That run's syncer may not have got to them;
        this run syncs only what it writes itself, and its clean mark would otherwise cover them, so after a power
        cut the next start would take stale marks for a clean stop's and resume on seqs already published."""
        camera_dir = self.directory / camera
        for path in (camera_dir / ACCEPTED_MARK, camera_dir / RESERVED_MARK, newest, camera_dir):
            if path is not None:
                self._fsync_found(path)

    def _fsync_found(self, path: Path) -> None:
        """fsync `path` (a file or a directory) where it exists. A failed fsync withholds the clean mark at close, so
        the next start handles the unclean stop again."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there must not hang the start
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            self._resumed_unsynced = True
            self.fsync_failed += 1
            log.error(
                "journal_fsync_failed",
                file=str(path),
                error=f"{exc.strerror or exc} (errno {exc.errno})",
                effect="what the last run wrote may not survive a power cut: the clean mark is withheld",
            )
        finally:
            os.close(fd)

    def _raise_floors(self) -> None:
        """After a reboot, make each camera's reservation its accepted mark, fsynced: seqs up to it may have been
        published before the power cut, and every later start must resume past them, not only this one. At open, or
        retried later beside the ingest threads (under each camera's mark lock)."""
        for camera, reserved in self._reserved.items():
            if reserved <= self._accepted.get(camera, -1):
                continue
            with self._mark_lock(camera):
                path = self.directory / camera / ACCEPTED_MARK
                held = self._accepted_fd.get(camera)
                opened = held is None
                created: list[Path] = []
                if held is None:
                    # Its folder too: one removed to free room while the floors were owed would fail every retry.
                    created = make_dirs(path.parent)
                    fd = _open(path, os.O_WRONLY)
                else:
                    fd = held
                try:
                    # What is on disk, not what this run meant to write: a mark this run opened may hold nothing
                    # (its first write refused by the full disk), and syncing that would let the next start on this
                    # boot resume below seqs already published.
                    on_disk = read_mark(path.parent, ACCEPTED_MARK)
                    if on_disk is None or on_disk < reserved or camera in self._distrusted:
                        os.pwrite(fd, ACCEPTED.pack(reserved), 0)
                    os.fsync(fd)
                    if opened:  # the mark's entry, and the folders made for it, durable in their parents
                        for directory in [path.parent, *(c.parent for c in created)]:
                            fsync_dir(directory)
                except BaseException:
                    if opened:
                        os.close(fd)
                    raise
                if opened:
                    with self._lock:
                        self._accepted_fd[camera] = fd
            self._accepted[camera] = reserved

    def _mark_lock(self, camera: str) -> threading.Lock:
        lock = self._mark_locks.get(camera)
        if lock is None:
            with self._lock:
                lock = self._mark_locks.setdefault(camera, threading.Lock())
        return lock

    def _corrupt_found(self, path: Path, offset: int, skipped: int) -> None:
        self.corrupt += 1
        log.error(
            "journal_corrupt_record",
            segment=str(path),
            offset=offset,
            bytes=skipped,
            effect="the results stored there cannot be replayed; the records after them are kept",
        )

    # -- reading ---------------------------------------------------------------------------------------------------

    def last_seq(self, camera: str) -> int | None:
        """The seq of the last result journalled for `camera`, None if none ever was."""
        return self._last.get(camera)

    def resume(self, camera: str) -> tuple[int, range]:
        """Where `camera`'s numbering goes on, and the seqs before it that have no journalled result: frames that were
        queued or in flight when the last run died, or results published while the journal could not write."""
        last = self._last.get(camera, -1)
        next_seq = max(last, self._accepted.get(camera, -1)) + 1
        if self.rebooted or camera in self._distrusted:
            next_seq = max(next_seq, self._reserved.get(camera, -1) + 1)
        return next_seq, range(last + 1, next_seq)

    def read_since(self, camera: str, seq: int) -> Iterator[tuple[int, list[bytes]]]:
        return read_since(self.directory, camera, seq)  # records go to the OS unbuffered: nothing to flush first

    def status(self) -> dict:
        return {
            "path": str(self.directory),
            # Two reads, not one: for the instant of a rotation it may be off by the segment being retired.
            "bytes": self._total + self._active_bytes,
            "written": self.written,
            "lost": self.lost,
            "degraded": self.degraded is not None,
            "error": self.degraded,
            "unsynced": self.unsynced,
            "fsync_failed": self.fsync_failed,
            "corrupt": self.corrupt,
        }

    # -- writing ---------------------------------------------------------------------------------------------------

    def mark_accepted(self, camera: str, seq: int) -> None:
        """Record that frames up to `seq` have been given their seq. Called per frame from the camera's ingest
        thread: one 8-byte pwrite into the page cache, which a SIGKILL cannot undo, and once every RESERVE seqs an
        fsynced reservation, which a power cut cannot. Never raises: a mark that cannot be written only costs the
        gap report after a crash (logged once). Does nothing once the journal is closing: its marks are final."""
        lock = self._mark_locks.get(camera)
        if lock is None:
            with self._lock:
                if self._stop.is_set():
                    return
                lock = self._mark_locks.setdefault(camera, threading.Lock())
        try:
            with lock:
                if self._stop.is_set():
                    return
                self._write_mark(camera, seq)
        except (OSError, struct.error) as exc:  # struct.error: a seq past what the mark holds
            if not self._accepted_failed:
                self._accepted_failed = True
                _mark_failed(camera, exc, "frames in flight at a crash will not show as a seq gap after the restart")

    def _write_mark(self, camera: str, seq: int) -> None:
        """Write `camera`'s accepted mark, and its reservation where `seq` passes it, under its mark lock; marks whose
        files went with their folder are opened again first."""
        if camera in self._marks_stale:
            self._drop_marks(camera)
        fd = self._accepted_fd.get(camera)
        if fd is None:
            check_camera(camera)
            with self._lock:
                self._made(make_dirs(self.directory / camera), camera)
                fd = self._accepted_fd[camera] = _open(self.directory / camera / ACCEPTED_MARK, os.O_WRONLY)
                self._dirs_dirty.update((self.directory, self.directory / camera))
        # First: a reservation that fails (its file cannot be made, its fsync fails) must not also cost the mark that
        # covers a SIGKILL. A power cut that keeps this mark but not the reservation only makes the next start number
        # further on.
        os.pwrite(fd, ACCEPTED.pack(seq), 0)
        self._given[camera] = seq
        self._marks_dirty.add(camera)
        if seq > self._reserved_to.get(camera, -1):
            self._reserve(camera, seq + RESERVE)

    def _drop_marks(self, camera: str) -> None:
        """Close `camera`'s mark descriptors (their files were deleted or moved with its folder), under its mark
        lock: the caller opens them again and writes a new reservation at once, as for a camera's first frame."""
        with self._lock:
            self._marks_stale.discard(camera)
            fds = [self._accepted_fd.pop(camera, None), self._reserved_fd.pop(camera, None)]
            self._reserved_to.pop(camera, None)
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def _reserve(self, camera: str, upto: int) -> None:
        """Sync `upto` as the camera's reservation before any seq past the previous one is given out."""
        fd = self._reserved_fd.get(camera)
        if fd is None:
            path = self.directory / camera / RESERVED_MARK
            new = not path.exists()
            fd = self._reserved_fd[camera] = _open(path, os.O_WRONLY)
            if new:  # its name, and the camera's folder if that is new too, must survive the cut as well
                fsync_dir(path.parent)
                fsync_dir(self.directory)
        os.pwrite(fd, ACCEPTED.pack(upto), 0)
        os.fsync(fd)
        self._reserved_to[camera] = upto

    def append(self, camera: str, seq: int, frames: list) -> None:
        """Journal one published result. Never raises for disk trouble: that degrades the journal instead."""
        record = encode_record(seq, frames)
        if len(record) - journal_format.RECORD.size > journal_format.MAX_BODY:
            self._too_big(camera, seq, len(record) - journal_format.RECORD.size)
            return
        if (self._floors_owed or self._boot_owed) and time.monotonic() >= self._retry_at and not self._retry_open():
            with self._lock:
                self.lost += 1
            return
        with self._lock:
            now = time.monotonic()
            if self.degraded is not None and now < self._retry_at:
                self.lost += 1
                return
            active = None
            try:
                active = self._segment_for(camera, seq, len(record))
                _write_all(active.fd, record)  # into the OS now: a SIGKILL right after loses nothing
            except OSError as exc:
                self._failed(camera, active, exc, now)
                return
            active.size += len(record)
            self._active_bytes += len(record)
            active.records += 1
            self._last[camera] = seq
            self.written += 1
            self.unsynced += 1
            if self.degraded is not None and not (self._floors_owed or self._boot_owed):
                log.warning("journal_recovered", lost=self.lost)
                self.degraded = None

    def _too_big(self, camera: str, seq: int, size: int) -> None:
        """Refuse a record whose body is past the readers' limit: written, no reader would see it or anything after
        it in its segment, and the next start would cut it as a torn tail. Counted lost, as a record the disk
        refused; logged once per camera, as a camera that makes one makes more."""
        with self._lock:
            self.lost += 1
            first = camera not in self._oversize
            self._oversize.add(camera)
        if first:
            log.error(
                "journal_record_too_big",
                camera=camera,
                seq=seq,
                bytes=size,
                limit=journal_format.MAX_BODY,
                effect="published but not journalled (counted lost): no reader takes a record past the limit; "
                "logged once for this camera",
            )

    def _segment_for(self, camera: str, seq: int, size: int) -> _Active:
        active = self._active.get(camera)
        if active is not None and not active.unlinked and active.size + size <= self.segment_bytes:
            return active
        if active is not None:
            # Once per segment, not per record: one still linked was never deleted, so what it holds is written.
            if active.unlinked or os.fstat(active.fd).st_nlink == 0:
                self._removed(camera, active)
            else:
                self._close_segment(camera)
        check_camera(camera)
        camera_dir = self.directory / camera
        self._made(make_dirs(camera_dir), camera)
        segments = segment_files(camera_dir)
        resume = segments[-1][1] if segments and active is None else None
        if resume is not None:
            # Carry on in the newest segment left by the previous run or by a failed write, after cutting off
            # whatever follows its last whole record: appending behind a torn record would make every later record
            # unreadable to anyone who reads the segment in order.
            good = self._torn.pop(resume, None)
            if good is None:
                good = _whole_records_end(resume)
            if resume.stat().st_size != good:
                os.truncate(resume, good)
                log.warning("journal_torn_record_cut", camera=camera, segment=resume.name, bytes_kept=good)
            if good + size > self.segment_bytes:
                resume = None
        path = resume or camera_dir / f"{seq:012d}.seg"
        # Room for this segment to fill up (a resumed one is counted already, at what it holds).
        kept = sum(c[2] for c in self._closed if c[1] == resume) if resume is not None else 0
        self._trim(self.segment_bytes - kept, keep=resume)
        fd = _open(path, os.O_WRONLY | os.O_APPEND)
        if resume is None:
            self._dirs_dirty.add(camera_dir)
        else:  # active from here on: counted as such, no longer as a closed segment (only once it is open)
            self._total -= sum(c[2] for c in self._closed if c[1] == resume)
            self._closed = [c for c in self._closed if c[1] != resume]
        active = self._active[camera] = _Active(path, fd, os.fstat(fd).st_size)
        self._active_bytes += active.size
        return active

    def _made(self, created: list[Path], camera: str) -> None:
        """Directories `created` for `camera` (under the lock): durable in their parents with the next sync. The
        journal's own among them means it was removed while open: its boot mark goes back with the next append."""
        self._dirs_dirty.update(c.parent for c in created)
        if self.directory in created:
            self._boot_owed = self._boot is not None
            log.warning("journal_directory_recreated", path=str(self.directory), camera=camera)

    def _close_segment(self, camera: str) -> None:
        """Retire the active segment; the syncer fsyncs and closes its descriptor, off the publishing thread."""
        active = self._active.pop(camera)
        self._to_close.append(active.fd)
        if len(self._to_close) > MAX_PENDING_CLOSE:
            self._close_oldest()
        # The stamp is its age here and, as its mtime (fsynced with it), at the next open: the clock where it is
        # ahead of every stamp, else just past the newest, so a clock set back never ranks it before older ones.
        self._age = max(time.time(), self._age + STAMP_STEP_S)
        try:
            os.utime(active.fd, ns=(int(self._age * 1e9),) * 2)
        except OSError:
            pass  # ranked by the time of its last write at the next open, as a segment of an older writer
        self._closed.append((self._age, active.path, active.size))
        self._total += active.size
        self._active_bytes -= active.size

    def _close_oldest(self) -> None:
        """fsync and close the oldest rotated segment waiting for the syncer, on the rotating thread (under the
        lock): the backlog stays bounded however slow the disk, at the cost of this append waiting for one fsync."""
        fd = self._to_close.pop(0)
        try:
            os.fsync(fd)
        except OSError as exc:
            self._fsync_failed(exc)
        finally:
            os.close(fd)

    def _fsync_failed(self, exc: OSError) -> None:
        """Count a failed fsync of results written, and log it once per distinct error (not once a second)."""
        self.fsync_failed += 1
        reason = f"{exc.strerror or exc} (errno {exc.errno})"
        if reason != self._fsync_error:
            log.error(
                "journal_fsync_failed",
                error=reason,
                effect="results written since the last good fsync may not survive a power cut",
            )
        self._fsync_error = reason

    def _removed(self, camera: str, active: _Active) -> None:
        """Retire an active segment found deleted or moved: the records written to a deleted one since the syncer
        last saw it linked may have gone to the deleted file, so they count as lost (one moved away keeps them:
        none lost); closed segments gone with it leave the count."""
        self._active.pop(camera)
        self._active_bytes -= active.size
        self._to_close.append(active.fd)
        self._closed = [c for c in self._closed if c[1].exists()]
        self._total = sum(c[2] for c in self._closed)
        if active.moved:
            # Its marks were made stale where the move was found, and may have been written again since.
            return  # told once, for the whole journal, by the syncer round that found it
        self._marks_stale.add(camera)
        gone = active.records - active.checked
        self.written -= gone
        self.lost += gone
        log.error(
            "journal_segment_removed",
            camera=camera,
            segment=str(active.path),
            lost=gone,
            effect="it was deleted while open (the journal's folder removed?): the results written since it was last "
            "seen on disk are counted lost; the journal re-creates its folders and goes on in a new segment",
        )

    def _trim(self, incoming: int, keep: Path | None = None) -> None:
        """Delete the oldest closed segments (but `keep`, about to be written on) until the journal plus `incoming`
        bytes fits its cap."""
        self._closed.sort()
        candidates = [c for c in self._closed if c[1] != keep]
        while candidates and self._total + self._active_bytes + incoming > self.max_bytes:
            entry = candidates.pop(0)
            _, path, size = entry
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                # Kept and still counted, retried at the next trim; the next segment goes instead. Raising would
                # lose the record being written, and every later one while this delete keeps failing.
                if path not in self._undeletable:
                    self._undeletable.add(path)
                    log.error(
                        "journal_segment_not_deleted",
                        segment=str(path),
                        error=f"{exc.strerror or exc} (errno {exc.errno})",
                        effect="it stays on disk and counts against max_bytes; newer segments are trimmed instead",
                    )
                continue
            self._undeletable.discard(path)
            self._closed.remove(entry)
            self._torn.pop(path, None)
            self._dirs_dirty.add(path.parent)
            self._total -= size

    def _failed(self, camera: str, active: _Active | None, exc: OSError, now: float) -> None:
        self.lost += 1
        self._retry_at = now + self.retry_s
        if active is not None:
            try:
                # Cut the partial record off now, so every reader still sees whole records only.
                os.ftruncate(active.fd, active.size)
            except OSError:
                # Cannot even restore the file: retire it (counted at its whole records, trimmed in turn like any
                # closed segment); the next append to this camera cuts it first, or starts a new one.
                self._torn[active.path] = active.size
                self._close_segment(camera)
        reason = _reason(exc)
        if self.degraded is None:
            log.error(
                "journal_degraded",
                camera=camera,
                error=reason,
                effect="results are still published but not journalled until the write succeeds again",
            )
        self.degraded = reason

    # -- durability --------------------------------------------------------------------------------------------

    def _sync_loop(self) -> None:
        # Twice per interval: a record written just after a round started waits for the next one, and that round's
        # own fsyncs take time too, so a round per interval would overrun the bound the interval promises.
        while not self._stop.wait(self.fsync_interval_s / 2):
            try:
                self.sync()
                if self._to_follow:
                    self._follow_move()
            except Exception as exc:  # noqa: BLE001 - one bad round must not end every later fsync
                self.fsync_failed += 1
                log.exception(
                    "journal_sync_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    effect="this round's fsyncs may not have happened; the next round retries",
                )

    def alive(self) -> bool:
        """False once the syncer thread has ended while the journal is open: nothing would reach the disk any more."""
        return self._syncer.is_alive() or self._stop.is_set()

    def sync(self) -> bool:
        """fsync everything written since the last sync; False where an fsync failed. Called by the syncer thread,
        and at close."""
        with self._lock:
            # Duplicates, so a segment rotated or closed meanwhile cannot take the descriptor from under the fsync.
            # Each is also checked for having been deleted or moved: here, twice per interval, rather than per record,
            # and on an idle line too (a dup, an fstat and a stat per camera), where a folder moved or restored from
            # a copy would otherwise go unseen until the next frame and a crash meanwhile reuse seqs.
            actives = [(c, a, a.records) for c, a in self._active.items()]
            if not (actives or self.unsynced or self._to_close or self._dirs_dirty or self._marks_dirty):
                return True
            fds = _dups([a.fd for _, a, _ in actives])
            pending = self.unsynced
            synced = fds if pending else []  # nothing written since: the actives are only checked, not fsynced
            # Ingest threads add to the set without the lock: take a copy and remove what it holds (each one C call
            # under the GIL). Iterating the set itself can meet a camera added meanwhile, and replacing it can lose
            # an add made to the old object; either way a quiet line's last mark would never be fsynced. A camera
            # added again after the copy had its mark written before that, so this round's fsync covers it.
            marks = self._marks_dirty.copy()
            try:
                marked = _dups([self._accepted_fd[c] for c in marks if c in self._accepted_fd])
            except OSError:
                for fd in fds:
                    os.close(fd)
                raise
            self._marks_dirty.difference_update(marks)  # only once their fsync is sure to be tried
            closing, self._to_close = self._to_close, []
            dirs, self._dirs_dirty = self._dirs_dirty, set()
        failed = None
        linked = []
        for (camera, active, count), fd in zip(actives, fds):
            try:
                found = os.fstat(fd)
            except OSError:
                continue
            # Still at its path, or moved with a renamed or replaced journal directory (`mv journal journal.old`):
            # the file lives on elsewhere, and the directory the readers and the next start use gets nothing more.
            at_path = found.st_nlink > 0 and _at_path(active.path, found)
            linked.append((camera, active, count, at_path, found.st_nlink > 0))
        for fd in synced + marked + closing:
            try:
                os.fsync(fd)
            except OSError as exc:
                failed = exc
            finally:
                os.close(fd)
        if not pending:
            for fd in fds:
                os.close(fd)
        for directory in dirs:
            try:
                fsync_dir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed = exc
        moved = []
        with self._lock:
            self.unsynced = max(0, self.unsynced - pending)
            for camera, active, count, at_path, still in linked:
                if at_path:
                    active.checked = max(active.checked, count)
                    continue
                if self._active.get(camera) is not active or active.unlinked:
                    continue  # retired since it was listed (its path trimmed meanwhile), or found before
                active.unlinked = True
                if still:
                    # What was written went to the moved file, intact: nothing lost. The marks and the boot mark
                    # follow into the configured directory at the syncer's next step (`_follow_move`), or at the
                    # camera's next frame, whichever comes first.
                    active.moved = True
                    active.checked = max(active.checked, count)
                    self._marks_stale.add(camera)
                    self._boot_owed = self._boot is not None
                    self._replaced = True
                    self._to_follow.add(camera)
                    moved.append(camera)
        if moved:
            log.warning("journal_directory_replaced", path=str(self.directory), cameras=moved, effect=MOVED_EFFECT)
        if failed is not None:
            self._fsync_failed(failed)
            return False
        self._fsync_error = None
        return True

    def _follow_move(self) -> None:
        """On the syncer, right after a round found the journal's directory moved away: write each moved camera's
        marks, then the boot mark, into the configured directory, and remove a `clean` mark a restored copy brought,
        without waiting for a frame. On an idle line that frame may be hours away, and a crash meanwhile would have
        the next start number from 0 (nothing there) or from a copy's marks taken for a clean stop. What fails here is
        left to the camera's next frame and to close, as before."""
        with self._lock:
            cameras_moved, self._to_follow = self._to_follow, set()
        for camera in sorted(cameras_moved):
            with self._mark_lock(camera):
                if self._stop.is_set() or camera not in self._marks_stale:
                    continue  # closing (close writes them), or a frame since wrote them
                try:
                    self._carry_marks(camera)
                except (OSError, struct.error) as exc:
                    with self._lock:
                        self._marks_stale.add(camera)  # its next frame, or close, tries again
                    _mark_failed(
                        camera,
                        exc,
                        "the journal was moved away: until this camera's next frame or a stop, a crash may number it "
                        "anew",
                    )
        if (self._floors_owed or self._boot_owed) and not self._stop.is_set():
            self._retry_open()

    def _marks_moved(self, camera: str) -> None:
        """At close, under `camera`'s mark lock: its marks were moved away or deleted with the journal and no frame
        since wrote them again; written into the configured directory now, or the next start finds none there and
        numbers the camera from 0 again."""
        try:
            self._carry_marks(camera)
        except (OSError, struct.error) as exc:
            self._marks_unmoved = True
            _mark_failed(camera, exc, "the journal was moved away: the next start may number this camera anew")

    def _carry_marks(self, camera: str) -> None:
        """Under `camera`'s mark lock: its marks, moved or deleted with the journal's folder, written into the
        configured one (the highest seq given out or journalled); none where nothing was given out yet."""
        seq = max(self._given.get(camera, -1), self._last.get(camera, -1))
        if seq >= 0:
            self._write_mark(camera, seq)
        else:
            self._drop_marks(camera)

    def flush(self) -> None:
        self.sync()

    def close(self) -> None:
        self._stop.set()
        if self._syncer.is_alive() and self._syncer is not threading.current_thread():
            self._syncer.join(5.0)
        with self._lock:
            moved = []
            for camera, active in list(self._active.items()):
                try:
                    found = os.fstat(active.fd)
                except OSError:
                    found = None
                unlinked = active.unlinked or (found is not None and found.st_nlink == 0)
                if not unlinked and found is not None and not _at_path(active.path, found):
                    # Moved since the syncer's last round: its marks go to the configured directory below.
                    active.unlinked = active.moved = unlinked = True
                    self._marks_stale.add(camera)
                    moved.append(camera)
                if unlinked:
                    self._removed(camera, active)
                else:
                    self._close_segment(camera)
            locks = list(self._mark_locks.items())  # complete: no lock is made once _stop is set
        # A mark being written finishes first (and is fsynced below with the rest); an ingest thread stuck in the
        # disk keeps its descriptors open (the process is ending) rather than have them closed under it.
        give_up = time.monotonic() + 5.0
        held = [(camera, lock) for camera, lock in locks if lock.acquire(timeout=max(0.0, give_up - time.monotonic()))]
        if moved:
            log.warning("journal_directory_replaced", path=str(self.directory), cameras=moved, effect=MOVED_EFFECT)
        try:
            for camera, _ in held:
                if camera in self._marks_stale:
                    self._marks_moved(camera)
            synced = self.sync()
            with self._lock:
                for camera, _ in held:
                    for fds in (self._accepted_fd, self._reserved_fd):
                        fd = fds.pop(camera, None)
                        if fd is not None:
                            os.close(fd)
        finally:
            for _, lock in held:
                lock.release()
        with self._lock:
            if self._floors_owed:
                # Without the floors on disk, a clean mark would make the next start on this boot resume from the
                # marks the power cut left: it handles the reboot again instead.
                log.warning("journal_clean_mark_withheld", reason="the reboot's seq floors could not be written")
            elif self._resumed_unsynced:
                log.warning(
                    "journal_clean_mark_withheld", reason="what the unclean stop before this run left was not fsynced"
                )
            elif self._marks_unmoved:
                log.warning("journal_clean_mark_withheld", reason="a camera's marks could not be written again")
            elif not synced:
                # The marks may not be on disk: the next start must resume past the reservation, not trust them.
                log.warning("journal_clean_mark_withheld", reason="this run's last fsync failed")
            else:
                try:
                    os.close(_open(self.directory / CLEAN_MARK, os.O_WRONLY))
                    self._dirs_dirty.add(self.directory)
                except OSError:
                    pass
        self.sync()
