"""The daemon's control server: a ZeroMQ REP socket on its own thread, answering one JSON object per request.

The request grammar and the client live in inspectd.protocol.control. A malformed request or a failing handler gets an
ok:false reply and the server keeps answering: REP sockets must reply to every request, and a control channel that one
bad message can wedge would leave the line unsteerable.

The default endpoint is IPC under the state dir (file permissions are the access control) or loopback TCP. CurveZMQ
plugs in through the `curve` hook: a callable that configures the socket before it binds. A hook that also has
`admits(message)` (inspectd.daemon.security.CurveServer) is asked about every request, so a key removed from the
allow-list by a reload is refused on a connection made before it (the handshake alone would let it stay).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

from inspectd.daemon.security import open_ipc_to_group, refuse_served_ipc
from inspectd.daemon.socket_file import SOCKET_FILE_CHECK_S, SocketFile
from inspectd.durable import make_dirs
from inspectd.errors import InspectdError, MessageError
from inspectd.protocol.control import MAX_REQUEST_BYTES, parse_request
from inspectd.protocol.endpoints import take_endpoint
from inspectd.protocol.messages import non_finite

log = structlog.get_logger("inspectd.control")

POLL_MS = 100
# How long a request that writes into the bundle (set_thresholds, rollback) waits for another writer's lock on it
# (build-engine, teach, calibrate) before it is refused, nothing written. This thread answers one request at a time,
# so the wait holds every other client too: it stays below what clients wait for a reply (ctl's --timeout of 10 s,
# teach --apply's status probe of 5 s), where a write that outlasted them would still land after they gave up. Offline
# writers keep engines.bundle.store.LOCK_WAIT_S.
BUNDLE_LOCK_WAIT_S = 2.0
# Requests one connection may have queued unread. libzmq's default of 1000 lets one peer that sends without waiting
# for replies (a DEALER) park 1000 requests of up to 1 MiB (~1 GB) in the daemon while one slow request is handled;
# past this many, libzmq stops reading that connection and the sender blocks. A REQ client has one in flight at a time.
RECEIVE_QUEUE = 16


# The longest error a reply or a log line carries. Refusals repeat what the client sent, and each is meant to shorten
# it; this is the backstop for one that does not: a request of up to 1 MiB must not give a reply, nor a log line,
# of its own size (journald splits lines past its LineMax, 48K by default, and the log is one JSON object per line).
ERROR_CHARS = 1000


def error_line(exc: BaseException) -> str:
    """`exc` as one line for a reply or a log line, at most ERROR_CHARS long; never fails (an exception with no text
    is named by its type)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    # Errors we raise on purpose already read as a sentence; anything else is a bug worth naming by type.
    return _capped(lines[0] if isinstance(exc, (InspectdError, ValueError)) else f"{type(exc).__name__}: {lines[0]}")


def _capped(text: str, most: int = ERROR_CHARS) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


REPLY_FIELDS = "control_reply_fields"  # the attribute mark_refusal sets on a handler's exception


def mark_refusal(exc: BaseException, **fields: Any) -> None:
    """Have the ok:false reply to the request whose handler raised `exc` carry `fields` beside its error (reload's
    BUNDLE_REFUSED), so a client can tell what was refused without parsing the error's words. On the exception itself,
    so the caller re-raises it unchanged: its type and text are what the log and in-process callers see."""
    try:
        setattr(exc, REPLY_FIELDS, {**getattr(exc, REPLY_FIELDS, {}), **fields})
    except AttributeError:  # an exception type without attributes of its own: the reply goes without the fields
        pass


def _prepare_ipc(endpoint: str) -> None:
    # 0750 whatever the umask (the units' is 0077): the socket file is 0660 for the group, which a folder of the
    # service user's alone would shut out all the same. Folders that exist keep their mode.
    if endpoint.startswith("ipc://"):
        folder = Path(endpoint[len("ipc://") :]).parent
        try:
            make_dirs(folder)
        except OSError as exc:
            raise InspectdError(
                f"control.endpoint {endpoint}: cannot create its folder {exc.filename or folder} "
                f"({exc.strerror or exc}), expected a folder the daemon's user may create or one that exists"
            ) from exc


class ControlServer:
    """REP socket on its own thread. `handler` has status(), reload(), set_thresholds(doc), rollback(version),
    pause(camera), resume(camera), each returning a dict merged into the ok:true reply."""

    def __init__(self, endpoint: str, handler: Any, curve: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.curve = curve
        self.requests = 0
        self.refused = 0
        self._sock: zmq.Socket | None = None
        self._socket_file = SocketFile(log, "control clients (`inspectd ctl`, calibrate --apply)", "every second")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        """Bind here, in the caller's thread, so a bad or busy endpoint fails the daemon's start, not a thread."""
        _prepare_ipc(self.endpoint)
        sock = zmq.Context.instance().socket(zmq.REP)
        sock.linger = 0
        take_endpoint(sock, self.endpoint)
        # Each frame; the headroom is CurveZMQ's framing, so a request the client let through is not dropped here.
        sock.maxmsgsize = MAX_REQUEST_BYTES + 4096
        # Counted in whole messages: a multipart one is one, however many frames it holds (no libzmq option caps it).
        sock.rcvhwm = RECEIVE_QUEUE
        if self.curve is not None:
            self.curve(sock)
        try:
            refuse_served_ipc(self.endpoint)  # another daemon's socket file: refused as a taken port is
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise OSError(f"control.endpoint {self.endpoint}: cannot bind ({exc})") from None
        try:
            # Whoever can connect can reload models and change thresholds: owner and group only.
            open_ipc_to_group(sock)
        except OSError as exc:
            sock.close()
            raise OSError(f"control.endpoint {exc}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket_file.bound(self.endpoint)
        self._sock = sock
        self._thread.start()  # the socket moves to the server thread; only it touches the socket from now on
        log.info("control_listening", endpoint=self.endpoint)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None, "the thread starts only after start() has bound the socket"
        next_check = time.monotonic() + SOCKET_FILE_CHECK_S
        try:
            while not self._stop.is_set():
                # Busy or idle: a client that keeps sending must not keep every new one out.
                if time.monotonic() >= next_check:
                    self._check_socket_file(sock)
                    next_check = time.monotonic() + SOCKET_FILE_CHECK_S
                if not sock.poll(POLL_MS):
                    continue
                # The whole message: a REP socket left mid-message (RCVMORE) cannot send, so reading one frame of a
                # multipart request would make the reply fail and end this thread.
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:  # a frame REP drops (no envelope) made the poll ready: nothing to answer
                    continue
                message = parts[0]
                admits = getattr(self.curve, "admits", None)
                if admits is not None and not admits(message):
                    # A REP socket must answer; the refusal says why, the request goes nowhere (counted by the hook).
                    reply = _dumps({"ok": False, "error": "client key not in the allow-list (removed by a reload)"})
                elif len(parts) != 1:
                    self.requests += 1
                    self.refused += 1
                    error = f"request: {len(parts)} frames, expected one JSON object in one frame"
                    log.warning("control_request_refused", client=client_identity(message), error=error)
                    reply = _dumps({"ok": False, "error": error})
                else:
                    try:
                        reply = self.handle(message.bytes, client_identity(message))
                    except Exception as exc:  # a bug in one request's handling must not end the control channel
                        log.exception("control_request_crashed")
                        reply = _dumps({"ok": False, "error": f"internal error: {error_line(exc)}"})
                try:
                    sock.send(reply)
                except zmq.ZMQError as exc:  # one reply that cannot go must not silence the channel for the rest
                    log.warning("control_reply_failed", client=client_identity(message), error=str(exc))
        except Exception:
            log.exception("control_thread_died")  # the daemon turns unhealthy: see alive()
            raise
        finally:
            sock.close(linger=0)

    def _check_socket_file(self, sock: zmq.Socket) -> None:
        """Bind the ipc socket file again where it was removed or replaced (SocketFile.check), between requests; past
        its limit unbound, which closes every listener on the path and the connections through them (a client
        mid-request times out and may retry), and bound again at the next check."""
        try:
            if self._socket_file.check(sock, self.endpoint) is None:
                return
            try:
                sock.unbind(self.endpoint)
            except zmq.ZMQError as exc:
                log.error("control_unbind_failed", endpoint=self.endpoint, error=str(exc), effect="still bound")
                return
            self._socket_file.unbound()
        except Exception as exc:  # a check that fails must not end the control channel
            log.error("socket_file_check_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])

    def alive(self) -> bool:
        """The server thread is answering (or has not been started yet)."""
        return self._sock is None or self._thread.is_alive() or self._stop.is_set()

    def handle(self, data: bytes, client: str = "in-process") -> bytes:
        """One request in, one reply out (bytes); never raises. Every request is logged with who sent it."""
        self.requests += 1
        try:
            request = parse_request(data)
        except MessageError as exc:
            self.refused += 1
            error = _capped(str(exc))
            log.warning("control_request_refused", client=client, error=error)
            return _dumps({"ok": False, "error": error})
        log.info("control_command", client=client, **_summary(request))
        try:
            if request.cmd in ("pause", "resume"):
                result = getattr(self.handler, request.cmd)(request.camera)
            elif request.cmd == "rollback":
                result = self.handler.rollback(request.version)
            elif request.cmd == "set_thresholds":
                result = self.handler.set_thresholds(request.thresholds, force=request.force)
            else:
                result = getattr(self.handler, request.cmd)()
            reply = {"ok": True, **(result or {})}
        except Exception as exc:  # the handler's failure is the client's answer, never the server's end
            self.refused += 1
            error = error_line(exc)
            fields = getattr(exc, REPLY_FIELDS, {})
            log.warning("control_request_failed", cmd=request.cmd, error=error, **({"reply": fields} if fields else {}))
            reply = {**fields, "ok": False, "error": error}
        return _dumps(reply)


def client_identity(message: zmq.Frame) -> str:
    """Who sent a request: the CURVE public key the ZAP handler let in, else the peer's uid/gid/pid on IPC (the
    kernel's SO_PEERCRED, which libzmq appends to the peer address), else its IP address."""
    try:
        user = message.get("User-Id")
    except zmq.ZMQError:
        user = None
    if user and user != "anonymous":
        return f"curve:{user}"
    try:
        peer = str(message.get("Peer-Address"))
    except zmq.ZMQError:
        return "unknown"
    parts = peer.rsplit(":", 3)
    if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
        return f"uid={parts[1]} gid={parts[2]} pid={parts[3]}"
    return f"address={peer}" if peer else "unknown"


def _summary(request: Any) -> dict:
    """What a command asks for, short enough for one log line."""
    fields: dict[str, Any] = {"cmd": request.cmd}
    if request.camera is not None:
        fields["camera"] = request.camera[:64]
    if request.thresholds is not None:
        doc = request.thresholds
        for key in ("version", "image_threshold", "pixel_threshold"):
            value = doc.get(key)
            if isinstance(value, (int, float, str)):
                # A string, or an integer of thousands of digits, is the client's to size: cut like a camera id.
                fields[key] = value if len(str(value)) <= 64 else _capped(str(value), 64)
        fields["force"] = request.force
    return fields


def _dumps(reply: dict) -> bytes:
    # default=str: a handler returning a Path or numpy scalar must still produce a reply, not a dead REP socket.
    # No NaN or infinity: not JSON, and the clients' parser (wirejson) refuses the whole reply for one; named here.
    try:
        return json.dumps(reply, default=str, allow_nan=False).encode()
    except ValueError:
        where = non_finite(reply) or "?"
        return json.dumps({"ok": False, "error": f"internal error: reply.{where} is not a finite number"}).encode()
