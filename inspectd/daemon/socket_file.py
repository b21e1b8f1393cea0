"""The ipc socket file a bound daemon socket listens on, watched: an operator clearing a "stale" socket or a tmp
cleaner removes it, or another process binds the path (ZeroMQ unlinks the file first), and from then on no new client
can connect while the socket itself goes on without an error and the daemon stays healthy. The publisher and the
control server each look at theirs about once a second and bind the path again on the same socket (check(): a
failure is logged once and tried again).

A zmq camera (inspectd.daemon.ingest.zmq_pull) watches its own with the same look(), but hands its failures to the
camera supervisor, which reopens it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import zmq

from inspectd.daemon.security import open_ipc_to_group, refuse_served_ipc

# Socket files bound again in place before the endpoint is unbound and bound afresh instead: each one leaves a listener
# on the file that was removed, open until the socket unbinds, so that the clients connected through it stay.
MAX_REBINDS = 16
# How often a socket file is looked at (one stat): removed, no new client could connect to a daemon that stayed healthy
# and logged nothing.
SOCKET_FILE_CHECK_S = 1.0


@dataclass(frozen=True)
class Found:
    """What one look at the socket file found, and did. `what` says how the file differs from the one bound;
    `error` is the bind's error (bind_failed) or why the file bound again could not be opened to the group (rebound);
    `gone` the error of the look at the file just bound, where it was gone again at once (rebound)."""

    kind: Literal["unchanged", "rebound", "taken", "bind_failed", "over_limit"]
    what: str = ""
    error: Exception | None = None
    gone: OSError | None = None


UNCHANGED = Found("unchanged")


class SocketFile:
    """The socket file of one bound endpoint. For check() only: `log`, `clients` names who connects (for the log
    lines), `retried` when a failed bind is tried again; a caller acting on look() itself passes none."""

    def __init__(self, log: Any = None, clients: str = "", retried: str = "") -> None:
        self._log = log
        self._clients = clients
        self._retried = retried
        # (path, device, inode) of the file bound, None for an endpoint without one (tcp, inproc, an abstract name).
        self._file: tuple[str, int, int] | None = None
        self.rebinds = 0  # in place, since the endpoint was last bound afresh
        self._trouble: str | None = None  # what was last logged of it, so an outage is logged once

    @property
    def watched(self) -> bool:
        """The endpoint bound has a socket file to look at."""
        return self._file is not None

    def bound(self, endpoint: str) -> OSError | None:
        """Remember the file `endpoint` (the socket's LAST_ENDPOINT) was just bound afresh to: every listener on the
        path closed with the unbind before, those of files bound again in place among them. Returns the error of the
        look at it where it is gone already (the next check binds the path again), else None."""
        self.rebinds = 0
        self._trouble = None
        return self._note(endpoint)

    def unbound(self) -> None:
        """The endpoint was unbound to be bound afresh by the next check: no file is the one bound now. Not bound at
        once: the listener being closed unlinks its path on libzmq's I/O thread, a moment later, and would unlink
        the new file."""
        self.rebinds = 0
        self._trouble = None
        if self._file is not None:
            self._file = (self._file[0], -1, -1)

    def _note(self, endpoint: str) -> OSError | None:
        if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
            self._file = None
            return None
        path = endpoint[len("ipc://") :]
        try:
            st = os.stat(path)
        except OSError as exc:  # removed already: no file is the one bound, so the next check binds the path again
            self._file = (path, -1, -1)
            return exc
        self._file = (path, st.st_dev, st.st_ino)
        return None

    def look(self, sock: zmq.Socket, endpoint: str) -> Found:
        """Bind `endpoint` again on `sock` when the file bound is gone or is another file, and say what was found
        (logging nothing). Bound once more, not unbound: the clients connected through the old file keep their
        connections. Not bound where another live process serves the path now (taken), nor past MAX_REBINDS binds in
        place (over_limit). Call it in the thread that owns `sock`."""
        if self._file is None:
            return UNCHANGED
        path, device, inode = self._file
        try:
            st = os.stat(path)
        except OSError as exc:
            what = f"is gone ({exc.strerror or exc}), expected it there while bound"
        else:
            if (st.st_dev, st.st_ino) == (device, inode):
                return UNCHANGED
            what = "is another one now, expected the one bound"
        try:
            refuse_served_ipc(endpoint)
        except zmq.ZMQError:
            return Found("taken", what)
        if self.rebinds >= MAX_REBINDS:
            return Found("over_limit", what)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            return Found("bind_failed", what, exc)
        self.rebinds += 1
        mode_error: OSError | None = None
        try:
            open_ipc_to_group(sock)
        except OSError as exc:
            mode_error = exc
        return Found("rebound", what, mode_error, self._note(endpoint))

    def check(self, sock: zmq.Socket, endpoint: str) -> str | None:
        """look(), logged: a path another live process serves now is left to it and logged once, and looked at again
        at each check until it is free; a bind that fails is logged once and tried again at each check. Past
        MAX_REBINDS nothing is bound: the reason to bind the endpoint afresh (unbind, closing the old listeners and the
        clients connected through them, then bind) is returned, for the caller, which then calls bound(); else None.
        Call it in the thread that owns `sock`."""
        found = self.look(sock, endpoint)
        if found.kind == "taken":
            self._once(
                "taken",
                "socket_file_taken",
                endpoint=endpoint,
                error=f"{endpoint}: its socket file was bound by another process, which serves it now",
                effect=f"new {self._clients} reach that process, not this daemon; bound again once the path is free",
            )
        elif found.kind == "over_limit":
            self._log.warning(
                "socket_file_rebound",
                endpoint=endpoint,
                error=f"{endpoint}: its socket file {found.what}, bound again {self.rebinds} times: binding it afresh "
                f"(the {self._clients} connected reconnect)",
            )
            return "its socket file was removed too often"
        elif found.kind == "bind_failed":
            self._once(
                f"bind: {found.error}",
                "socket_file_rebind_failed",
                endpoint=endpoint,
                error=f"{endpoint}: its socket file {found.what}; binding it again failed ({found.error})",
                effect=f"new {self._clients} cannot connect; tried again {self._retried}",
            )
        elif found.kind == "rebound":
            self._trouble = None
            if found.error is not None:
                self._log.error(
                    "socket_mode_failed",
                    endpoint=endpoint,
                    error=str(found.error),
                    effect="group members cannot connect",
                )
            self._log.warning(
                "socket_file_rebound",
                endpoint=endpoint,
                error=f"{endpoint}: its socket file {found.what}: new {self._clients} could not connect, bound again",
            )
        return None

    def _once(self, trouble: str, event: str, **fields: str) -> None:
        if self._trouble != trouble:
            self._trouble = trouble
            self._log.error(event, **fields)
