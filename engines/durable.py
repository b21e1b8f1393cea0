"""Files and directories that a kill or a power cut leaves whole: the one implementation of writing a file durably,
replacing one, making a directory's entries durable and swapping two directories in one step (or by two renames,
all or nothing, where one step is not available).

It sits below every layer (it imports nothing of the project), so the bundle store (engines.bundle), the daemon's
journal and the bridges' state files (through inspectd.durable) share it, and the checksum those files are verified
by (sha256_file); and whether a path can be written at all, asked before the work whose result goes there
(unwritable).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def try_lock(fd: int) -> bool | None:
    """Take an exclusive flock on open file or directory `fd` without waiting: True when taken, False when another
    process holds it, None where the file system has no locks (the caller goes on unlocked, as it did before)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def sha256_file(path: Path, sync: bool = False) -> str:
    """The sha256 of a file's bytes, read in chunks; `sync`: fsynced on the way too (a file just written, about to be
    named in a manifest that says it is whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (files created, renamed or deleted in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create (or truncate) `path` with `data` and mode `mode` (set explicitly: the umask does not narrow it), and
    fsync it before returning. Its directory entry is made durable by the caller (fsync_dir), once per directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o600, temporary: Path | None = None) -> None:
    """Replace `path` with `data` so that a kill or a power cut leaves the previous content or the new, never a torn
    or empty file: a temporary file beside it (`temporary`, default <name>.tmp), fsynced, renamed over it, then the
    directory fsynced."""
    temporary = temporary or path.with_name(path.name + ".tmp")
    try:
        write_file(temporary, data, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# renameat2 errors meaning "not here" rather than "not these paths". EPERM is what a seccomp filter answers for a
# system call it does not allow (systemd's SystemCallErrorNumber=EPERM, container profiles); a real permission
# problem makes the two renames fail with the same error, and replace_dir undoes a half-done one. EXDEV is not here:
# the two entries are on different file systems, which the renames cannot cross either, so it is raised with nothing
# moved.
_RENAMEAT2_UNAVAILABLE = frozenset((errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM))


@functools.cache
def _renameat2_function() -> Any:
    """The C library's renameat2, looked up once (a folder camera moves every file through it), or None where the C
    library has none (glibc before 2.28, musl)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """renameat2(a, b, flags): False, with nothing changed, where the kernel, C library, file system or a seccomp
    filter does not allow it; OSError for anything else (EEXIST, EXDEV, ENOENT)."""
    renameat2 = _renameat2_function()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _RENAMEAT2_UNAVAILABLE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries `a` and `b` (both must exist) in one step, so a reader of either name finds the
    old entry or the new one, never nothing (Linux renameat2 RENAME_EXCHANGE). False, with nothing changed, where the
    kernel, C library, file system or a seccomp filter does not allow it; the caller then falls back to replace_dir."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` only if no `dst` exists at that instant (Linux renameat2 RENAME_NOREPLACE):
    FileExistsError when one does, so two writers of one name cannot replace each other's file. False, with nothing
    changed, where it is not allowed here (as exchange)."""
    # Raised as os.rename raises it, so audit hooks see every rename.
    sys.audit("os.rename", src, dst, -1, -1)
    return _renameat2(src, dst, _RENAME_NOREPLACE)


def replace_dir(path: Path, incoming: Path, aside: Path) -> None:
    """Put directory `incoming` at `path` and what was there at `aside` by two renames, where `exchange` cannot: a
    reader of `path` finds nothing for the instant between them. All or nothing: when the second rename fails the
    first is undone, so `path` holds what it held and a caller that then deletes `incoming` deletes only the new
    content. The OSError raised says so in one line naming `path` (and, if even the undo failed, where its content
    is)."""
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise OSError(
            f"{path}: not replaced ({path.name} -> {aside.name}: {exc.strerror or exc}); it holds what it held before"
        ) from exc
    try:
        os.replace(incoming, path)
    except OSError as exc:
        reason = f"{incoming.name} -> {path.name}: {exc.strerror or exc}"
        try:
            os.replace(aside, path)
        except OSError as undo:
            raise OSError(
                f"{path}: not replaced ({reason}) and its content could not be moved back ({undo.strerror or undo}):"
                f" it is at {aside}"
            ) from exc
        try:
            fsync_dir(path.parent)  # else a power cut could still bring back the state with nothing at `path`
        except OSError:
            pass  # secondary to the error reported
        raise OSError(f"{path}: not replaced ({reason}); it holds what it held before") from exc


def unwritable(path: str | Path, directory: bool = False, parents: bool = False) -> str | None:
    """Why `path` (a file, or with `directory` a folder to write files in) cannot be written, or None: asked before
    minutes of work whose result goes there, not after. A file is opened there for appending (access() says yes to
    root) and removed again if this made it; with `parents`, the folders the writer will make are made and removed
    again too, and a file where one must be is said as the cause it is (mkdir said "File exists")."""
    path = Path(path)
    folder = path if directory else path.parent
    made: list[Path] = []
    try:
        for above in reversed([folder, *folder.parents]) if parents else ():
            if above.is_dir():
                continue
            if above.exists():
                return os.strerror(errno.ENOTDIR)
            if above.is_symlink():
                return f"{above} is a link to nothing"
            above.mkdir()
            made.append(above)
        if directory:
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        else:
            # A link's target is what gets written (latest.json -> reports/today.json): probed and removed there,
            # never the link itself in its place.
            path = Path(os.path.realpath(path))
            existed = path.exists()
            with open(path, "a"):
                pass
            if not existed:
                path.unlink(missing_ok=True)
    except OSError as exc:
        return str(exc.strerror or exc)
    finally:
        for above in reversed(made):
            with contextlib.suppress(OSError):
                above.rmdir()
    return None
