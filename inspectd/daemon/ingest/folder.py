"""A watched folder as a camera: each new image file once, oldest first."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import math
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast

import structlog
from pydantic import Field, field_validator, model_validator

from engines.data.images import DEFAULT_BIT_DEPTH
from engines.durable import rename_noreplace
from engines.errors import DataError
from engines.schema import Flag, Number, Text, declared, invalid, refuse, show
from inspectd.configfile import ConfigPath
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.headers import HeaderUnwritten, IncompleteImage, check_and_decode, max_frame_bytes
from inspectd.daemon.ingest.source import Source, SourceFatal, frame_id_of
from inspectd.errors import one_line
from inspectd.protocol.messages import printable

if TYPE_CHECKING:
    from inspectd.daemon import config as cfg

# A folder file that looks cut short is taken as still being written (a writer that paused for longer than a poll)
# until this host has seen it left alone this long; only then is it published as a truncated frame.
WRITE_GRACE_S = 2.0
# How long a close waits for the files whose results are out to be deleted or moved (a share that stalls): what is
# left then is named in the log, and inspected again at the next start.
DISPOSE_WAIT_S = 1.0
# Parts lost under one name are logged at the first of a run; a loss after this long without one starts a new run. A
# camera that saves parts too fast loses them for as long as it runs: the status counter says how many, one line when.
REPLACED_LOG_QUIET_S = 60.0
# Never read, whatever `pattern` says: names a writer uploads under before it renames the file into place (FTP, SMB,
# browsers), whose content is not final yet, and files Windows and Office leave in a folder, which are no images.
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload", "~")
TEMP_PREFIXES = (".", "~$")
SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini"})
# What link() says where the filesystem cannot make a hard link (FAT: EPERM, as a link to another owner's file under
# fs.protected_hardlinks is): move_keeping then renames after a look, the one move left there.
NO_HARD_LINK = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK})

log = structlog.get_logger("inspectd.ingest")

# A file as a stat sees it: (size, mtime_ns, st_dev, st_ino, ctime_ns). Size and mtime alone cannot tell parts saved
# under one name apart where times have whole seconds (FAT, ext3, an uploader that sets them so): parts of one
# resolution often have one size. The inode says which file holds the name, and the ctime, which a rename sets, tells a
# new file apart from an earlier one whose freed inode number it was given.
Stamp = tuple[int, int, int, int, int]


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns


# The digest of a file judged by its size alone (too large to read): one of the same inode, size and mtime under a new
# change time is that file (a chmod, a backup's hard link), not a new part.
SIZE_ONLY = -1


def _digest_of(path: Path) -> int:
    """The CRC-32 of the file's content, read a MiB at a time."""
    digest = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest = zlib.crc32(chunk, digest)
    return digest


@declared
class FolderSource:
    """A camera `source` of `kind: folder`."""

    path: ConfigPath
    pattern: Text = "*"
    poll_ms: Annotated[Number, Field(gt=0, le=60_000)] = 100.0
    delete_after: Flag = False  # delete each file once its result is journalled and published
    done_dir: ConfigPath | None = None  # or move it here then
    kind: Literal["folder"] = "folder"

    @field_validator("pattern", mode="after")
    @classmethod
    def _a_name_glob(cls, pattern: str) -> str:
        # Matched by fnmatch against the bare file name: a folder part or a shell's {a,b} never matches one, and a
        # camera whose pattern matches nothing runs healthy and inspects no file.
        if "/" in pattern:
            raise invalid(
                f"expected a glob on the file name, with no / (point path at the folder), got {show(pattern)}"
            )
        if re.search(r"\{[^{}]*,[^{}]*\}", pattern):
            raise invalid(
                f"expected a glob on the file name (*, ?, [...]), got {show(pattern)}: there are no {{a,b}} "
                "alternatives (for .png and .jpg: *.[pj][np]g, or *)"
            )
        sets = _sets(pattern)
        if None in sets:  # a [ no ] closes: fnmatch matches it as a plain [, which no intended name holds
            raise invalid(
                f"expected a glob on the file name whose every [ is closed by a ] (a set such as [pj]; a [ of the "
                f"name itself as [[]), got {show(pattern)}"
            )
        if any(part is not None and fnmatch.translate(part) == _NO_NAME for part in sets):
            raise invalid(
                f"expected a glob on the file name whose every [...] set holds a character, got {show(pattern)}: a "
                "range whose start is after its end, such as [9-0], holds none, so no name matches"
            )
        return pattern

    @model_validator(mode="after")
    def _one_way_out(self) -> FolderSource:
        if self.delete_after and self.done_dir is not None:
            refuse("done_dir", "set together with delete_after: true, expected one or the other", str(self.done_dir))
        # One not there yet may be a share mounted later, and is waited for; a file there never becomes a folder.
        for key, folder in (("path", self.path), ("done_dir", self.done_dir)):
            if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
                refuse(key, f"{folder} is a file, expected a folder", str(folder))
        return self


def _sets(pattern: str) -> list[str | None]:
    """Each [...] set of `pattern` as its own text, None for a [ that no ] closes. Walked as fnmatch.translate walks
    it: a ! and a ] straight after the [ belong to the set."""
    found: list[str | None] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                found.append(None)
                break
            found.append(pattern[i : j + 1])
            i = j
        i += 1
    return found


# fnmatch's own translation of a set that holds no character (a reversed range), which matches nothing: a set is
# translated alone and compared with it, so fnmatch's parser decides, and a set holding the text (?!) is no match.
_NO_NAME = fnmatch.translate("[1-0]")


PROBE_BACKLOG = 1024  # pending probes of the folder lock a holder keeps between two scans


class FolderWatcher(Source):
    """New image files in a folder, each once, oldest first (mtime, then name); half-written files are waited for."""

    live = False
    redelivers = True
    Options = FolderSource
    narrows_16_bit = True

    def __init__(
        self,
        camera: cfg.CameraConfig,
        clock: Callable[[], float],
        bit_depth: int = DEFAULT_BIT_DEPTH,
        where: str | None = None,
    ) -> None:
        super().__init__(camera, clock, bit_depth, where)
        self.spec = cast(FolderSource, camera.source)  # the supervisor builds this class for kind folder only
        self.poll_s = self.spec.poll_ms / 1000.0
        # Cameras and Windows tools write .JPG as often as .jpg.
        self._matches = re.compile(fnmatch.translate(self.spec.pattern), re.IGNORECASE).match
        self.max_bytes = max_frame_bytes(camera.max_pixels)
        # name -> (stamp, CRC-32 of the content, None if not read) when inspected (files left in place): another file
        # under the name, or the file rewritten, is new again, also one finished by a writer that keeps the source's
        # times (a copy that preserves them). One of the same size, mtime and content under a new inode is the file
        # read before, renumbered (a share that numbers files itself, anew after a while): read, and not judged again.
        self.done: dict[str, tuple[Stamp, int | None]] = {}
        # name -> (stamp, since): the file as the latest scan saw it, and this host's monotonic time when it was first
        # seen so. Stillness and the cut-short grace are timed by `since`, never by the mtime: a writer's clock may be
        # behind or ahead of this host's.
        self.seen: dict[str, tuple[Stamp, float]] = {}
        self.replaced_unread = 0  # parts another file took the name of before they were read: lost (_replaced)
        self._replaced_at = -math.inf  # monotonic time of the latest one
        # inode -> name of parts another file took the name of, unread: lost unless a listing still finds the inode
        # under another name (a writer that stages each part under one name the pattern matches, then renames it).
        self._replaced_pending: dict[int, str] = {}
        self.pending: list[tuple[int, str]] = []  # ready (mtime_ns, name), oldest last, popped from the end
        self._unstattable: dict[str, str] = {}  # name -> why the latest scan could not stat it
        self._scanned = -math.inf  # monotonic time at the end of the latest scan
        self._warned = False
        # Files whose result is out but which could not be deleted or moved (disposer thread), and why the first
        # of them could not: the camera is reopened on it, once, rather than fail again at every file after it.
        self._undisposed: list[tuple[Path, Stamp, int | None]] = []
        # (name, stamp) of files the disposer deleted or moved, for the ingest thread to forget: a part saved under
        # the name next is new, even with the same size, mtime and content.
        self._disposed: list[tuple[str, Stamp]] = []
        self._disposal_failed: str | None = None
        self._disposal_logged = False  # this outage's warning was logged: once, however many reopens it lasts
        self._disposal_lock = threading.Lock()
        # Files whose result is out, oldest first, deleted or moved by a thread of this camera's own: the publisher,
        # which serves every camera, must never wait on this folder's filesystem (a share that stalls). The file being
        # disposed of stays first until it is done.
        self._to_dispose: deque[tuple[Path, Stamp, int | None]] = deque()
        self._disposals = threading.Condition()
        self._disposer: threading.Thread | None = None
        self._dispose_errors: set[str] = set()  # kinds of unexpected failure already logged
        self._pending_logged = False  # a stop left files undisposed and said so: once until they are done
        self._backlog_logged = False  # the backlog that holds up new files was logged: once until it is gone
        self._folder_lock: socket.socket | None = None  # bound while open, naming the folder's path (_hold_folder)

    def open(self, stop: threading.Event) -> None:
        if not self.spec.path.is_dir():
            raise FileNotFoundError(f"{self.spec.path}: folder not found, expected a directory to watch")
        self._hold_folder()
        if self.spec.delete_after or self.spec.done_dir is not None:
            self._check_disposal()
            self._dispose_again()
        if not (self.spec.delete_after or self.spec.done_dir is not None or self._warned):
            self._warned = True
            log.warning(
                "folder_files_kept",
                camera=self.camera.id,
                folder=str(self.spec.path),
                effect="files stay in the folder: each is inspected once per run, and again after a restart; set "
                "delete_after or done_dir",
            )

    def _hold_folder(self) -> None:
        """Lock the folder's path while this camera watches it: a second daemon on it (a copied config left naming it)
        would take a share of its files, and each part would get a result on two stations, or none where it was deleted
        under the other. The lock is an abstract Unix socket named by this user and the resolved path, not a
        descriptor of the folder: that would keep a share or disk from being unmounted while the daemon runs, and would
        lock the folder that was there at open, not one put at the same path since (a share mounted over it, a rename
        and a new mkdir). It needs no rights on the folder and goes with the process however that ends. An abstract
        name has no permissions, so any local user can bind it first: a taken name refuses the camera only where the
        process listening on it runs as this user (the kernel's SO_PEERCRED); under another user's, or one that does
        not listen (no camera of ours), the folder is watched unlocked, as it is where no such socket can be bound."""
        if self._folder_lock is not None:
            return
        digest = hashlib.sha256(os.fsencode(os.path.realpath(self.spec.path))).hexdigest()
        name = f"\0inspectd-folder-{os.geteuid()}-{digest}".encode()
        try:
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            try:
                lock.bind(name)
                # Probes are drained at each scan: a holder busy with a backlog of files for minutes must not fill
                # the queue, or a refused camera's retries would find no answer and take the folder unlocked.
                lock.listen(PROBE_BACKLOG)
            except OSError:
                lock.close()
                raise
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                log.warning(
                    "folder_lock_unavailable",
                    camera=self.camera.id,
                    folder=str(self.spec.path),
                    error=f"{type(exc).__name__}: {exc}",
                    effect="watched unlocked: a second daemon of this user on the folder is not refused",
                )
                return
            holder = _listener_of(name)
            if holder is not None and holder[1] == os.geteuid():
                raise OSError(
                    f"{self.spec.path}: watched by another process of this user (pid {holder[0]}: another daemon's "
                    "folder camera), expected a folder no other camera watches"
                ) from None
            log.warning(
                "folder_lock_taken",
                camera=self.camera.id,
                folder=str(self.spec.path),
                holder_uid=None if holder is None else holder[1],
                effect="the folder's lock name is held by a process of another user, or one not listening: watched "
                "unlocked, so a second daemon of this user on the folder is not refused",
            )
            return
        self._folder_lock = lock

    def _drop_probes(self) -> None:
        """Close the connections a second camera made to read this lock's owner: left queued, they would fill the
        backlog, and a later probe could no longer tell who holds the name."""
        lock = self._folder_lock
        if lock is None:
            return
        with contextlib.suppress(OSError):  # BlockingIOError once none is left
            while True:
                lock.accept()[0].close()

    def _release_folder(self) -> None:
        lock, self._folder_lock = self._folder_lock, None
        if lock is not None:
            lock.close()  # the name is free again at once: an abstract socket leaves no file behind

    def _check_disposal(self) -> None:
        """Files are deleted, or moved to done_dir by rename (at once and whole): try it now on a hidden file, which
        no scan reads, rather than fail at every file. A rename across filesystems or mount points never works (a
        copy instead would hold up every later file for its whole size), and done_dir as the watched folder itself
        would hand every file back to the scan under a new name: the camera fails. A folder the daemon may not
        write (its mode, an immutable flag, a path the systemd unit leaves read-only) may be put right while it
        runs: the open fails, and is tried again."""
        done_dir = self.spec.done_dir
        # Per camera (two cameras sharing a done_dir open at once), by a hash: an id may be as long as a file name.
        tag = hashlib.sha256(self.camera.id.encode()).hexdigest()[:12]
        probe = self.spec.path / f".inspectd-probe-{os.getpid()}-{tag}"
        moved = probe if done_dir is None else done_dir / probe.name
        try:
            if done_dir is not None:
                done_dir.mkdir(parents=True, exist_ok=True)
                if os.path.samefile(done_dir, self.spec.path):
                    raise SourceFatal(f"done_dir {done_dir}: the watched folder itself, expected another folder")
            probe.touch()
            if done_dir is not None:
                os.replace(probe, moved)
            moved.unlink()
        except OSError as exc:
            for left in {probe, moved}:
                with contextlib.suppress(OSError):
                    left.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # No room for the probe says nothing of deleting, which frees room: the files themselves will tell.
                return
            if done_dir is not None and exc.errno == errno.EXDEV:
                raise SourceFatal(
                    f"done_dir {done_dir}: cannot move files there from {self.spec.path} ({exc.strerror or exc}), "
                    "expected a folder on the same filesystem and mount (files are moved by rename; under systemd, "
                    "one ReadWritePaths= entry that holds both folders, as each entry is a mount of its own)"
                ) from None
            raise OSError(self._cannot_dispose("files", exc)) from None

    def _cannot_dispose(self, what: str, exc: OSError) -> str:
        """Why `what` cannot be deleted or moved, in one line naming the key and the folders."""
        reason = exc.strerror or one_line(exc)
        if self.spec.done_dir is not None:
            return (
                f"done_dir {self.spec.done_dir}: cannot move {what} there from {self.spec.path} ({reason}), expected "
                "both folders writable by the daemon (under systemd: listed in ReadWritePaths=)"
            )
        return (
            f"delete_after {self.spec.path}: cannot delete {what} there ({reason}), expected a folder writable by "
            "the daemon (under systemd: listed in ReadWritePaths=) whose files it may delete (in a sticky folder, "
            "mode 1777, only a file's owner may)"
        )

    def _dispose_again(self) -> None:
        """Files whose result went out while they could not be disposed of: tried again once the folder passed its
        check. One that still fails keeps the camera down, its name in the error, instead of running on and
        leaving every file in the folder to be inspected again after a restart."""
        with self._disposal_lock:
            retry, self._undisposed = self._undisposed, []
            self._disposal_failed = None
        for path, stamp, digest in retry:
            self._dispose(path, stamp, digest)
        with self._disposal_lock:
            if self._disposal_failed is None and not self._undisposed:
                self._disposal_logged = False  # the outage is over: the next one is said again
        self._raise_disposal_failure()

    def _raise_disposal_failure(self) -> None:
        failed = self._disposal_failed
        if failed is not None:
            raise OSError(failed)

    def _scan(self) -> None:
        self._drop_probes()
        start = time.monotonic()
        listed: dict[str, Stamp] = {}
        unstattable: dict[str, str] = {}
        with os.scandir(self.spec.path) as entries:
            for entry in entries:
                name = entry.name
                lower = name.lower()
                if (
                    lower.startswith(TEMP_PREFIXES)
                    or lower.endswith(TEMP_SUFFIXES)
                    or lower in SYSTEM_NAMES
                    or not self._matches(name)
                ):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # taken away between the listing and now
                except OSError as exc:
                    # A symlink loop, a share's stale handle or EIO: raising would reopen the folder and meet it
                    # at every scan, no file inspected. It is listed under a stamp of its own (size -1) with
                    # its link's mtime where there is one: one error result (read), then done until it changes.
                    unstattable[name] = exc.strerror or one_line(exc)
                    listed[name] = (-1, _link_mtime_ns(entry), 0, 0, 0)
                    continue
                listed[name] = _stamp(st)
        self._unstattable = unstattable
        # `since` is taken after every stat of this scan and compared with the start of a later one, so a file is
        # ready only when two stats at least a poll apart saw it the same: the writer is done with it.
        self._scanned = time.monotonic()
        seen: dict[str, tuple[Stamp, float]] = {}
        for name, stamp in listed.items():
            before = self.seen.get(name)
            if before is not None and before[0] == stamp:
                seen[name] = before
                continue
            if before is not None:
                self._replaced(name, before[0], stamp)
            seen[name] = (stamp, self._scanned)
        self.seen = seen
        self._count_replaced({stamp[3] for stamp in listed.values()})
        with self._disposal_lock:
            disposed, self._disposed = self._disposed, []
        for name, stamp in disposed:
            if name in self.done and self.done[name][0] == stamp:
                del self.done[name]
        # Forget files that left the folder, so memory follows the folder's content.
        self.done = {name: read for name, read in self.done.items() if name in seen}
        ready = [
            (stamp[1], name)
            for name, (stamp, since) in seen.items()
            if since + self.poll_s <= start and not self._done_already(name, stamp)
        ]
        ready.sort(reverse=True)
        self.pending = ready

    def read(self, stop: threading.Event) -> Frame | None:
        self._raise_disposal_failure()
        if self._disposal_backlog(stop):
            return None
        if not self.pending:
            # Listed at most once a poll, also while a backlog drains (its files were all ready at one scan, and
            # are read back to back), so a large folder is not listed again after every few files. A file's own
            # stillness is timed by its `since`, whenever the scans run.
            wait = self._scanned + self.poll_s - time.monotonic()
            if wait > 0:
                stop.wait(wait)
                return None
            self._scan()
            if not self.pending:
                return None
        mtime_ns, name = self.pending.pop()
        path = self.spec.path / name
        shown = printable(frame_id_of(name))
        stamp, since = self.seen[name]
        size = stamp[0]
        cannot_stat = self._unstattable.get(name)
        if cannot_stat is not None:  # never inspected: kept, as an unreadable file is
            return self._taken(path, stamp, None, f"{shown}: cannot read ({cannot_stat})", dispose=False)
        if size > self.max_bytes:  # not read at all: a stray video or archive in the inbox would fill the memory
            expected = f"expected at most {self.max_bytes} for max_pixels={self.camera.max_pixels}"
            return self._taken(path, stamp, None, f"{shown}: {size} bytes, {expected}", SIZE_ONLY)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data, holed = None, False
                if _stamp(st) == stamp:
                    holed = _has_hole(f.fileno(), size)
                    if holed and time.monotonic() - since < WRITE_GRACE_S:
                        # A writer that set the file's final size first (an SMB copy, fallocate) and has not filled
                        # it yet: it must hold still for the grace first, and is not read meanwhile.
                        return None
                    # Only what the file holds is read (a read of max_bytes would reserve that much for every file).
                    data = f.read(st.st_size + 1)
        except FileNotFoundError:
            return None  # taken away by someone else between the scan and now
        except OSError as exc:
            # Unreadable (permissions, an I/O error): its result says so, once. Raising would reopen the folder and
            # meet the same file at every scan. Never inspected, it is kept (see _taken).
            return self._taken(path, stamp, None, f"{shown}: cannot read ({exc.strerror or exc})", dispose=False)
        except MemoryError:
            short = f"{shown}: cannot read its {size} bytes (out of memory)"
            return self._taken(path, stamp, None, short, dispose=False)
        except Exception as exc:  # noqa: BLE001 - a reopen would meet the same file at every scan, forever
            return self._taken(path, stamp, None, f"{shown}: cannot read ({one_line(exc)})", dispose=False)
        if data is None or len(data) != size:
            # Written to since the scan found it still (a backlog can take a while to drain): it must hold still
            # over a poll again before it is read. Replaced by another file since, it is lost.
            self._replaced(name, stamp, _stamp(st))
            self.seen.pop(name, None)
            return None
        digest = zlib.crc32(data)
        before = self.done.get(name)
        if before is not None and before[0][:2] == stamp[:2] and before[1] == digest:
            # The file read before under a new number (a share that numbers files itself): not a new part.
            self.done[name] = (stamp, digest)
            return None
        try:
            image, error = check_and_decode(data, shown, self.camera.max_pixels, bit_depth=self.bit_depth), None
        except IncompleteImage as exc:
            if time.monotonic() - since < WRITE_GRACE_S:
                return None  # tried again at the next scans while it holds still, until the grace is over
            if holed or not isinstance(exc, HeaderUnwritten):
                # Its writer may only have paused (a share's hiccup): kept, it is read again once finished.
                return self._taken(path, stamp, None, str(exc), digest, dispose=False)
            # Zeros where a header would be in a file with no hole left, unchanged over the grace: a finished file
            # that is no image (a raw dump, a vendor's sidecar), judged and disposed of as any broken file is.
            image, error = None, str(exc)
        except DataError as exc:
            image, error = None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a reopen would meet the same file at every scan, forever
            image, error = None, f"{shown}: cannot decode ({one_line(exc)})"
        return self._taken(path, stamp, image, error, digest)

    def _done_already(self, name: str, stamp: Stamp) -> bool:
        """Whether the file listed as `stamp` under `name` was judged already: the same file, or one judged by its
        size alone (never read, no digest to compare) with the same inode, size and mtime (its ctime moved by a chmod
        or a backup's hard link)."""
        done = self.done.get(name)
        return done is not None and (done[0] == stamp or (done[1] == SIZE_ONLY and done[0][:4] == stamp[:4]))

    def _replaced(self, name: str, before: Stamp, stamp: Stamp) -> None:
        """Count the part seen as `before` as lost when another file now holds its name (`stamp`) and it was never
        read: a writer that renames each part into place under one name faster than it can hold still over a poll.
        Only a new inode is sure: a file rewritten in place cannot be told from one still being written, so such a
        writer's losses, and a second replacement between two listings, are not counted."""
        if not (stamp[3] and before[3]) or stamp[2:4] == before[2:4]:
            return  # a filesystem with no inode numbers (0), or the same file written to
        # Read: the done file by inode, size and mtime (a chmod or a backup's hard link since changes only its ctime).
        if stamp[:2] == before[:2] or (name in self.done and self.done[name][0][:4] == before[:4]):
            # Read; or of the same size and mtime, which a share that numbers files itself anew after a while gives
            # the same file under a new number: never counted on a guess (the new file is read all the same).
            return
        self._replaced_pending[before[3]] = name

    def _count_replaced(self, listed_inodes: set[int]) -> None:
        """Count the replaced parts (_replaced) whose files this listing does not find under another name: lost."""
        lost = [name for inode, name in self._replaced_pending.items() if inode not in listed_inodes]
        self._replaced_pending.clear()
        if not lost:
            return
        self.replaced_unread += len(lost)
        now, since = time.monotonic(), self._replaced_at
        self._replaced_at = now
        if now - since < REPLACED_LOG_QUIET_S:
            return  # a run of losses is logged once: a camera that saves too fast would log every other part
        log.warning(
            "folder_file_replaced_unread",
            camera=self.camera.id,
            file=printable(frame_id_of(lost[0])),
            replaced_unread=self.replaced_unread,
            effect="the part saved under this name was replaced by the next before it held still over a poll, and "
            "was never inspected; counted in the camera's status as replaced_unread, logged again after "
            f"{REPLACED_LOG_QUIET_S:g} s without one. Save parts under one name at least two polls apart (lower "
            "poll_ms), or each under a name of its own",
        )

    def stats(self) -> dict[str, int]:
        # The backlog's length is read without its lock: a count for the status, as good a moment later.
        return {"replaced_unread": self.replaced_unread, "disposal_backlog": len(self._to_dispose)}

    def _taken(
        self, path: Path, stamp: Stamp, image, error: str | None, digest: int | None = None, dispose: bool = True
    ) -> Frame:
        """The file's frame, the file marked done (and disposed of once its result is out, if so configured).
        `digest`: the CRC-32 of the content judged, None where none was read. `dispose` False: its content was never
        inspected (unreadable, or cut short by a writer that may only have paused), so it stays: a writer that
        finishes it changes its mtime and it is read again, else the next start tries it again."""
        name = path.name
        self.done[name] = (stamp, digest)
        frame = self.frame(frame_id_of(name), stamp[1] / 1e9, image, error)
        if dispose and (self.spec.delete_after or self.spec.done_dir is not None):
            # Only once the result is journalled and published: a crash before that leaves the file in the folder,
            # to be inspected again at the next start, instead of gone without a result.
            frame.on_published = functools.partial(self._queue_disposal, path, stamp, digest)
        return frame

    def _disposal_backlog(self, stop: threading.Event) -> bool:
        """Whether as many files wait to be deleted or moved as the camera's queue holds frames (a share that deletes
        slower than parts come): this camera then takes no new file for up to a poll. Taking more would pile up,
        without end, files whose results are out, each inspected again after a stop; it holds up no other camera."""
        limit = self.camera.queue.size
        with self._disposals:
            if len(self._to_dispose) < limit:
                return False
            if not self._backlog_logged:
                self._backlog_logged = True
                log.warning(
                    "folder_disposal_backlog",
                    camera=self.camera.id,
                    files=len(self._to_dispose),
                    effect="no new file is taken until the folder has deleted or moved some (a share slow to answer)",
                )
            self._disposals.wait_for(lambda: len(self._to_dispose) < limit or stop.is_set(), self.poll_s)
            return len(self._to_dispose) >= limit

    def _queue_disposal(self, path: Path, stamp: Stamp, digest: int | None) -> None:
        """On the publisher thread: hand the file to this camera's disposer, with no filesystem call here."""
        with self._disposals:
            self._to_dispose.append((path, stamp, digest))
            if self._disposer is None:
                # Started once and kept for the daemon's life: results still go out after the camera's close at a
                # stop, and their files are still disposed of.
                self._disposer = threading.Thread(
                    target=self._dispose_queued, name=f"dispose-{self.camera.id}", daemon=True
                )
                self._disposer.start()
            self._disposals.notify_all()

    def _dispose_queued(self) -> None:
        while True:
            with self._disposals:
                self._disposals.wait_for(lambda: bool(self._to_dispose))
                path, stamp, digest = self._to_dispose[0]
            try:
                self._dispose(path, stamp, digest)
            except Exception as exc:  # noqa: BLE001 - one file's failure must not leave every later file in place
                kind = type(exc).__name__
                if kind not in self._dispose_errors:
                    self._dispose_errors.add(kind)
                    log.error(
                        "folder_dispose_failed",
                        camera=self.camera.id,
                        file=printable(frame_id_of(path.name)),
                        error=f"{kind}: {one_line(exc)}",
                    )
            with self._disposals:
                self._to_dispose.popleft()
                if not self._to_dispose:
                    self._pending_logged = self._backlog_logged = False
                self._disposals.notify_all()

    def close(self) -> None:
        # A reopen, or a stop before its last results are out: those are waited for, and named, by settle.
        with self._disposals:
            self._disposals.wait_for(lambda: not self._to_dispose, DISPOSE_WAIT_S)
        self._release_folder()

    def settle(self, timeout: float) -> bool:
        """Wait up to `timeout` for the files whose results are out to be deleted or moved, and name what is not."""
        with self._disposals:
            if self._disposals.wait_for(lambda: not self._to_dispose, timeout):
                return True
            if self._pending_logged:
                return False
            self._pending_logged = True
            left = len(self._to_dispose)
            first = printable(frame_id_of(self._to_dispose[0][0].name))
        log.warning(
            "folder_disposal_pending",
            camera=self.camera.id,
            files=left,
            first=first,
            effect=f"not yet deleted or moved after {timeout:g} s (a folder slow to answer); they still are "
            "while the daemon runs, and a file left when it stops is inspected again at the next start",
        )
        return False

    def _dispose(self, path: Path, stamp: Stamp, digest: int | None) -> None:
        """Delete or move the file (the disposer thread, once its result is out), if it is still the file read. A
        failure is kept for the ingest thread, whose next read raises it: the camera's state and last_error say so,
        once, where a log line per file would say it at every part and no status would."""
        try:
            now = _stamp(os.stat(path))
            # Judged by size alone: the same file only by its inode too (the next part renamed into place in the same
            # second, of the same size, is another).
            same = (digest == SIZE_ONLY and now[2:4] == stamp[2:4]) or (
                digest is not None and digest != SIZE_ONLY and _digest_of(path) == digest
            )
            if now != stamp and not (now[:2] == stamp[:2] and same):
                # Rewritten under the same name since it was read, or another file renamed into place (with
                # whole-second times, of the same size and mtime): the new content was not inspected. It stays, and
                # the next scan sees it as a new file. Only the same size, mtime and content is the file read under
                # a new number (a share that numbers files itself).
                log.warning("folder_file_rewritten", camera=self.camera.id, file=printable(frame_id_of(path.name)))
                return
            if self.spec.delete_after:
                path.unlink()
            elif self.spec.done_dir is not None:
                self.spec.done_dir.mkdir(parents=True, exist_ok=True)
                move_keeping(path, self.spec.done_dir / path.name, stamp[1])
            with self._disposal_lock:
                self._disposed.append((path.name, stamp))
        except FileNotFoundError:
            return  # taken away by someone else
        except OSError as exc:
            with self._disposal_lock:
                self._undisposed.append((path, stamp, digest))
                if self._disposal_failed is None:
                    self._disposal_failed = self._cannot_dispose(printable(frame_id_of(path.name)), exc)
                first, self._disposal_logged = not self._disposal_logged, True
            if first:  # once per outage; at a stop no read is left to raise it, and a restart inspects it again
                log.warning(
                    "folder_file_not_disposed",
                    camera=self.camera.id,
                    file=printable(frame_id_of(path.name)),
                    error=exc.strerror or one_line(exc),
                    effect="the camera reopens until it can delete or move it; if the daemon stops first, the "
                    "next start inspects it again",
                )


def _listener_of(name: bytes) -> tuple[int, int] | None:
    """(pid, uid) of the process listening on abstract Unix socket `name`, or None where none answers at once (bound
    but not listening, or its backlog full)."""
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    except OSError:
        return None
    with probe:
        try:
            probe.connect(name)
            pid, uid, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return None
    return pid, uid


def _has_hole(fd: int, size: int) -> bool:
    """Whether the open file has a hole before its end: a file set to its final size (ftruncate, fallocate) whose
    writer has not filled it yet. One call; a filesystem that cannot tell reports none (its end), as does one whose
    call fails. The file's offset is put back to its start."""
    if size <= 0:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError:
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)


def _link_mtime_ns(entry: os.DirEntry[str]) -> int:
    """The entry's own mtime, not its target's (a symlink loop has none), or 0 when that fails too."""
    try:
        return entry.stat(follow_symlinks=False).st_mtime_ns
    except OSError:
        return 0


def move_keeping(path: Path, target: Path, mtime_ns: int) -> None:
    """Move `path` to `target`, or to the next name unused_name gives, never over a file already there: two cameras
    sharing a done_dir move files of one name at once, and a look before a plain rename lets both take the same free
    name, the second replacing the first part's only copy. A name taken since the look fails the move (EEXIST) and
    the next is tried. Across filesystems the move fails with EXDEV, as a rename does."""
    taken: set[Path] = set()
    while True:
        candidate = unused_name(target, mtime_ns, taken)
        try:
            _move_no_replace(path, candidate)
            return
        except FileExistsError:
            taken.add(candidate)  # by another camera's move, or anyone's


def _move_no_replace(path: Path, candidate: Path) -> None:
    """Rename without replacing (renameat2 RENAME_NOREPLACE); where the filesystem cannot (some shares), a hard link
    then an unlink of the source, which fails alike on a name that exists; where it has no hard links either (FAT), or
    refuses one to a file of another owner (fs.protected_hardlinks), a plain rename after the look."""
    if rename_noreplace(path, candidate):
        return
    try:
        os.link(path, candidate, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINK:  # EEXIST among them
            raise
        os.rename(path, candidate)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # taken away by someone else meanwhile: its content is in done_dir all the same
    except OSError:
        # Left in the folder it is moved again later: the link would be a second copy then.
        with contextlib.suppress(OSError):
            os.unlink(candidate)
        raise


def unused_name(target: Path, mtime_ns: int, taken: set[Path] | frozenset[Path] = frozenset()) -> Path:
    """`target`, or, when a file of that name is already there (a camera that writes every part as `current.bmp`),
    `stem~MTIME_NS.suffix`: the earlier file is not replaced, and the name costs one look however many came before.
    `taken`: names found in use since they were looked at."""

    def used(path: Path) -> bool:
        return path in taken or path.exists() or path.is_symlink()

    if not used(target):
        return target
    candidate, n = target.with_name(f"{target.stem}~{mtime_ns}{target.suffix}"), 0
    while used(candidate):  # the same name and mtime again (a copy keeping its time)
        n += 1
        candidate = target.with_name(f"{target.stem}~{mtime_ns}~{n}{target.suffix}")
    return candidate
