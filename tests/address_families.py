"""A systemd unit's RestrictAddressFamilies= applied to this process, the way systemd applies it: a seccomp filter
that fails socket(2) with EAFNOSUPPORT for every family the unit does not list (socketpair(2) is left alone, as
systemd leaves it). libseccomp comes with every Debian that has apt (apt depends on it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_CMP_EQ = 4
FAMILY_LIMIT = 64  # above AF_MAX on every Linux so far


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def unit_families(unit: Path) -> list[str]:
    """The families a unit file's RestrictAddressFamilies= allows (an allow list; the last setting wins)."""
    lines = [
        line.split("=", 1)[1].split()
        for line in unit.read_text().splitlines()
        if line.startswith("RestrictAddressFamilies=")
    ]
    assert lines and lines[-1] and not lines[-1][0].startswith("~"), f"{unit}: expected an allow list"
    return lines[-1]


def restrict(families: list[str]) -> None:
    allowed = {int(getattr(socket, name)) for name in families}
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
    context = lib.seccomp_init(SCMP_ACT_ALLOW)
    assert context, "seccomp_init failed"
    call = lib.seccomp_syscall_resolve_name(b"socket")
    for family in sorted(set(range(FAMILY_LIMIT)) - allowed):
        refuse = _ArgCmp(0, SCMP_CMP_EQ, family, 0)
        rc = lib.seccomp_rule_add_array(context, SCMP_ACT_ERRNO | errno.EAFNOSUPPORT, call, 1, ctypes.byref(refuse))
        assert rc == 0, f"seccomp_rule_add_array({family}): {rc}"
    assert lib.seccomp_load(context) == 0, "seccomp_load failed"
