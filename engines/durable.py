"""Files and directories that a kill or a power cut leaves whole: the one implementation of writing a file durably,
replacing one, making a directory's entries durable and swapping two directories in one step.

It sits below every layer (it imports nothing of the project), so the bundle store (engines.bundle), the daemon's
journal and the bridges' state files (through inspectd.durable) share it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path


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


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries `a` and `b` (both must exist) in one step, so a reader of either name finds the
    old entry or the new one, never nothing (Linux renameat2 RENAME_EXCHANGE). False, with nothing changed, where the
    kernel, C library or file system cannot; the caller then falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
