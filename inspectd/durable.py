"""Files that a kill or a power cut leaves whole, and state files one process owns: the one way the daemon and the
bridges replace a small state file, make a directory's entries durable and keep a second process off their state.
The durable writes are engines.durable's (the bundle store shares them); this is the name the daemon and the clients
import them by."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from engines.durable import fsync_dir, replace_file, sha256_file, try_lock, write_file

__all__ = ["DIR_MODE", "FILE_MODE", "fsync_dir", "hold_lock", "make_dirs", "replace_file", "sha256_file", "write_file"]

# What the daemon's stores (the archive, the journal) are created with, set whatever the umask: the units' UMask=0077
# would leave them the service user's alone, and the operators who read them are members of its group.
DIR_MODE = 0o750
FILE_MODE = 0o640


def make_dirs(path: Path, mode: int = DIR_MODE) -> list[Path]:
    """Directory `path` and each missing one above it, each created with `mode` whatever the umask (a folder above
    a store left 0700 would keep the group out of everything under it); those it created, outermost first, for a
    caller that makes them durable in their parents."""
    if path.is_dir():
        return []
    created = make_dirs(path.parent, mode) if path.parent != path else []
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return created
    # The set-group-ID bit a group-shared parent passed down stays: the folders below it keep taking its group.
    os.chmod(path, mode | (path.stat().st_mode & stat.S_ISGID))
    return [*created, path]


class LockHeld(BlockingIOError):
    """hold_pid_lock's refusal: `holder` is the pid the lock file names, "" where it names none that can be read."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path}: locked by pid {holder or '?'}")
        self.holder = holder


def hold_pid_lock(path: Path) -> int | None:
    """hold_lock on `path`, then this process's pid written into it for the one it refuses next (LockHeld, naming
    the pid; PermissionError and None as hold_lock)."""
    try:
        held = hold_lock(path)
    except BlockingIOError:
        try:
            holder = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            holder = ""
        raise LockHeld(path, holder) from None
    if held is not None:
        try:  # another descriptor: writing or closing it leaves the lock on `held` alone
            path.write_text(f"{os.getpid()}\n", encoding="utf-8")
        except OSError:
            pass  # a lock file of another user's that this one may read but not write: a refusal names no pid
    return held


def hold_lock(path: Path) -> int | None:
    """Lock `path` (created when missing) exclusively for as long as this process runs, and return the descriptor
    that holds it (left open on purpose: an int is never closed by the garbage collector). Two processes writing one
    state file would each rewrite it from their own memory, undoing the other's updates, and could rename each
    other's half-written temporary file into place: BlockingIOError when another process holds the lock,
    PermissionError when this user may not open the lock file (one left by a run as another user). None, unlocked,
    where no lock can be had: a directory this process cannot create a file in (it cannot write its state there
    either) or a file system without locks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        if path.exists():
            raise
        return None
    except OSError:
        return None
    try:
        # Whatever the umask (the units' is 0077): a run as root must leave a lock the service user can open again;
        # flock needs no write access. Only the owner may change it, and another's lock is already open here.
        os.fchmod(fd, 0o644)
    except OSError:
        pass
    locked = try_lock(fd)
    if locked is not True:
        os.close(fd)
        if locked is False:
            raise BlockingIOError(f"{path}: locked by another process")
        return None
    return fd
