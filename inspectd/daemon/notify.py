"""What the daemon tells the process that supervises it, and how it follows a parent that is not systemd.

systemd's notify protocol (sd_notify), implemented directly on `$NOTIFY_SOCKET`: no libsystemd dependency.
Owns READY=1, STATUS=..., WATCHDOG=1 and STOPPING=1 and reading the watchdog interval. The socket is a unix datagram
socket; a name starting with '@' lives in the abstract namespace. Without $NOTIFY_SOCKET (not run by systemd, or
Type=simple) every call is a no-op, so the daemon calls these unconditionally. A failed send is never raised: losing a
status line must not take an inspection line down (a lost WATCHDOG=1 is systemd's to judge). It is logged when sends
start failing (`notify_failed`, at most once a minute so a flapping socket cannot flood the log) and when they work
again (`notify_recovered`, with how many were lost), so a failure that starts months after a brief one is still seen.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time

import structlog

from inspectd.errors import InspectdError

log = structlog.get_logger("inspectd.daemon.notify")

# Set by a tool that starts a daemon of its own (demo, bench) to its own pid.
PARENT_PID_ENV = "INSPECTD_PARENT_PID"
_PR_SET_PDEATHSIG = 1
# The least time between two notify_failed lines: a socket that fails every other send logs once a minute, not twice
# per watchdog ping.
FAILED_LOG_INTERVAL_S = 60.0


def follow_parent(environ: dict[str, str] | None = None) -> None:
    """Where PARENT_PID_ENV names this process's parent, have the kernel send SIGTERM when that parent dies.

    A tool's own stop (a signal it can catch) stops its daemon itself; this is for the one it cannot catch: a SIGKILLed
    or crashed demo or bench would otherwise leave its daemon streaming on, its endpoints bound under the next run.
    SIGTERM is the daemon's own stop, so it drains as under systemd. A variable naming another process than the
    parent (exported in a shell, an EnvironmentFile) is refused rather than obeyed: it would stop a station's daemon
    for no reason. So is a parent already gone by the time this runs (the tool died during the daemon's start).
    Linux only; elsewhere a no-op."""
    raw = (os.environ if environ is None else environ).get(PARENT_PID_ENV)
    if not raw:
        return
    if not raw.isdigit():
        raise InspectdError(f"{PARENT_PID_ENV} {raw!r}: expected the process id of the tool that started the daemon")
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise InspectdError(f"{PARENT_PID_ENV}: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != int(raw):
        raise InspectdError(
            f"{PARENT_PID_ENV} {raw}: not this process's parent (pid {os.getppid()}), expected it set only by "
            "inspectd demo or bench for the daemon they start: unset it"
        )


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False  # the last send failed
        self._logged_at: float | None = None  # monotonic time of the last notify_failed line
        self._lost_in_episode = 0
        self._episode_logged = False  # the current run of failures got its notify_failed line
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd watches; a child that inherited the variables must not ping for it.
        if raw.isdigit() and int(raw) > 0 and (not pid or (pid.isdigit() and int(pid) == os.getpid())):
            usec = int(raw)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """systemd's WatchdogSec in seconds, or None when the watchdog is off. Ping at least twice per interval."""
        return self._watchdog_usec / 1e6 if self._watchdog_usec else None

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + " ".join(text.split()))  # one line: a newline would start a new assignment

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def notify(self, message: str) -> bool:
        """Send one datagram; True when it was sent, False when disabled or the send failed."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with self._lock:
            try:
                if self._sock is None:
                    # Non-blocking: a notify reader that stops reading must never stall the main loop (the
                    # datagram is dropped and counted as a failed send instead).
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                    )
                self._sock.sendto(message.encode(), target)
            except OSError as exc:
                self.failed += 1
                self._lost_in_episode += 1
                if not self._failing:
                    self._failing, self._episode_logged = True, False
                if not self._episode_logged:
                    # A failure that began within the interval of the last line is said once the interval is over,
                    # if it still lasts: a lasting one right after a brief one is not left unsaid.
                    now = time.monotonic()
                    if self._logged_at is None or now - self._logged_at >= FAILED_LOG_INTERVAL_S:
                        self._logged_at, self._episode_logged = now, True
                        log.warning("notify_failed", socket=self.address, error=str(exc), lost=self._lost_in_episode)
                return False
            if self._failing:
                self._failing = False
                if self._episode_logged:  # a recovery whose failure was not logged would be a line out of nowhere
                    log.info("notify_recovered", socket=self.address, lost=self._lost_in_episode)
                self._lost_in_episode = 0
            self.sent += 1
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
