"""A systemd unit's seccomp restrictions applied to this process the way systemd applies them, for tests that run
something as the unit would: RestrictAddressFamilies= (socket(2) fails with EAFNOSUPPORT for every family not
listed; socketpair(2) is left alone, as systemd leaves it), SystemCallFilter= with SystemCallErrorNumber= (a call
outside the allowed groups fails with that errno; the groups as `systemd-analyze syscall-filter` expands them) and
MemoryDenyWriteExecute= (no mapping both writable and executable, none made executable later). Each is its own
filter, as systemd loads them. libseccomp comes with every Debian that has apt (apt depends on it).

    python -m tests.unit_sandbox UNIT COMMAND...    COMMAND in this process (exec), under UNIT's restrictions
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import socket
import subprocess
import sys
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
FAMILY_LIMIT = 64  # above AF_MAX on every Linux so far
SHM_EXEC = 0o100000


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """Every `Key=value` of the unit file, values in the order given (the settings read here are all [Service]'s)."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_families(unit: Path) -> list[str]:
    """The families the unit's RestrictAddressFamilies= allows (an allow list; the last setting wins)."""
    lines = unit_settings(unit).get("RestrictAddressFamilies", [])
    assert lines and lines[-1] and not lines[-1].startswith("~"), f"{unit}: expected an allow list"
    return lines[-1].split()


@functools.cache
def _groups() -> dict[str, list[str]]:
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(names: list[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= _expand(_groups()[name]) if name.startswith("@") else {name}
    return out


def unit_syscalls(unit: Path) -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow: the first allow list, less each `~` list."""
    allowed: set[str] = set()
    for value in unit_settings(unit).get("SystemCallFilter", []):
        if value.startswith("~"):
            allowed -= _expand(value[1:].split())
        else:
            allowed |= _expand(value.split())
    return allowed


class _Seccomp:
    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib = lib

    def load(self, default: int, rules: list[tuple[int, str, list[_ArgCmp]]]) -> None:
        """One filter: `default` for every call, `rules` (action, call, conditions) before it."""
        context = self.lib.seccomp_init(default)
        assert context, "seccomp_init failed"
        try:
            for action, name, conditions in rules:
                call = self.lib.seccomp_syscall_resolve_name(name.encode())
                if call < 0:
                    continue  # not a call of this architecture
                array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
                rc = self.lib.seccomp_rule_add_array(context, action, call, len(conditions), array)
                assert rc == 0, f"seccomp rule for {name}: {rc}"
            assert self.lib.seccomp_load(context) == 0, "seccomp_load failed"
        finally:
            self.lib.seccomp_release(context)


def restrict(families: list[str]) -> None:
    """Only RestrictAddressFamilies=: socket(2) refused for every family not in `families`."""
    allowed = {int(getattr(socket, name)) for name in families}
    refuse = SCMP_ACT_ERRNO | errno.EAFNOSUPPORT
    rules = [(refuse, "socket", [_ArgCmp(0, SCMP_CMP_EQ, f, 0)]) for f in range(FAMILY_LIMIT) if f not in allowed]
    _Seccomp().load(SCMP_ACT_ALLOW, rules)


def restrict_as(unit: Path) -> None:
    """Every seccomp restriction `unit` sets (those above), applied to this process and whatever it execs. The call
    filter goes last: it may refuse seccomp(2) itself."""
    settings = unit_settings(unit)
    seccomp = _Seccomp()
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        refuse = SCMP_ACT_ERRNO | errno.EPERM
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        seccomp.load(
            SCMP_ACT_ALLOW,
            [
                (refuse, "mmap", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
                (refuse, "mprotect", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC)]),
                (refuse, "pkey_mprotect", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC)]),
                (refuse, "shmat", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
            ],
        )
    if "RestrictAddressFamilies" in settings:
        restrict(unit_families(unit))
    if "SystemCallFilter" in settings:
        error = getattr(errno, settings.get("SystemCallErrorNumber", ["EPERM"])[-1])
        allow = [(SCMP_ACT_ALLOW, name, []) for name in sorted(unit_syscalls(unit))]
        seccomp.load(SCMP_ACT_ERRNO | error, allow)


if __name__ == "__main__":
    _groups()  # systemd-analyze runs before the filters, which may refuse what it needs
    restrict_as(Path(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
