"""The control channel: a ZeroMQ REP socket answering one JSON object per request, and the client for it.

Owns the request grammar (`parse_request`), the server thread that dispatches requests to a handler (the daemon), and
`ControlClient` (used by `inspectd calibrate --apply`, operators' scripts and tests). Requests:

    {"cmd": "status"}  {"cmd": "reload"}  {"cmd": "set_thresholds", "thresholds": {...}}
    {"cmd": "pause", "camera": "cam0"}  {"cmd": "resume", "camera": "cam0"}

Replies are `{"ok": true, ...handler result...}` or `{"ok": false, "error": "one line"}`. A malformed request or a
failing handler gets an ok:false reply and the server keeps answering: REP sockets must reply to every request, and a
control channel that one bad message can wedge would leave the line unsteerable.

The default endpoint is IPC under the state dir (file permissions are the access control) or loopback TCP. CurveZMQ
will plug in through the `curve` hook: a callable that configures the socket before it binds or connects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import structlog
import zmq

from inspectd.errors import InspectdError, MessageError

log = structlog.get_logger("inspectd.control")

MAX_REQUEST_BYTES = 1 << 20  # a thresholds document with history is a few kB; anything near this is not a request
POLL_MS = 100

# cmd -> {field: (type, description)}; every field listed is required, any other is refused.
COMMANDS: dict[str, dict[str, tuple[type, str]]] = {
    "status": {},
    "reload": {},
    "set_thresholds": {"thresholds": (dict, "a thresholds document (JSON object)")},
    "pause": {"camera": (str, "a camera id (string)")},
    "resume": {"camera": (str, "a camera id (string)")},
}


@dataclasses.dataclass(frozen=True)
class Request:
    cmd: str
    camera: str | None = None
    thresholds: dict | None = None


def parse_request(data: bytes) -> Request:
    """One control request; MessageError (one line) for anything that is not exactly a known command."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else \
            "nested too deeply" if isinstance(exc, RecursionError) else "not UTF-8"
        raise MessageError(f"request: not JSON ({reason}), expected an object like {{\"cmd\": \"status\"}}") from None
    if not isinstance(doc, dict):
        raise MessageError(f"request: JSON {type(doc).__name__}, expected an object like {{\"cmd\": \"status\"}}")
    cmd = doc.get("cmd")
    if cmd not in COMMANDS:
        shown = repr(cmd) if cmd is not None else "missing"
        raise MessageError(f"cmd: {shown[:60]}, expected one of {', '.join(COMMANDS)}")
    fields = COMMANDS[cmd]
    for key in doc:
        if key != "cmd" and key not in fields:
            allowed = ", ".join(fields) or "no other field"
            raise MessageError(f"{cmd}.{str(key)[:40]}: unknown field, expected {allowed}")
    for key, (kind, description) in fields.items():
        if key not in doc:
            raise MessageError(f"{cmd}.{key}: missing, expected {description}")
        if not isinstance(doc[key], kind):
            raise MessageError(f"{cmd}.{key}: got {type(doc[key]).__name__}, expected {description}")
    return Request(cmd=cmd, **{key: doc[key] for key in fields})


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    # Errors we raise on purpose already read as a sentence; anything else is a bug worth naming by type.
    return text if isinstance(exc, (InspectdError, ValueError)) else f"{type(exc).__name__}: {text}"


def _prepare_ipc(endpoint: str) -> Path | None:
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class ControlServer:
    """REP socket on its own thread. `handler` has status(), reload(), set_thresholds(doc), pause(camera),
    resume(camera), each returning a dict merged into the ok:true reply."""

    def __init__(self, endpoint: str, handler: Any, curve: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.curve = curve
        self.requests = 0
        self.refused = 0
        self._sock: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        """Bind here, in the caller's thread, so a bad or busy endpoint fails the daemon's start, not a thread."""
        sock = zmq.Context.instance().socket(zmq.REP)
        sock.linger = 0
        sock.maxmsgsize = MAX_REQUEST_BYTES
        if self.curve is not None:
            self.curve(sock)
        ipc_path = _prepare_ipc(self.endpoint)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise OSError(f"control.endpoint {self.endpoint}: cannot bind ({exc})") from None
        if ipc_path is not None:
            # Whoever can connect can reload models and change thresholds: owner and group only.
            os.chmod(ipc_path, 0o660)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._thread.start()  # the socket moves to the server thread; only it touches the socket from now on
        log.info("control_listening", endpoint=self.endpoint)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        sock = self._sock
        try:
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                data = sock.recv()
                reply = self.handle(data)
                sock.send(reply)
        finally:
            sock.close(linger=0)

    def handle(self, data: bytes) -> bytes:
        """One request in, one reply out (bytes); never raises."""
        self.requests += 1
        try:
            request = parse_request(data)
        except MessageError as exc:
            self.refused += 1
            return _dumps({"ok": False, "error": str(exc)})
        try:
            if request.cmd in ("pause", "resume"):
                result = getattr(self.handler, request.cmd)(request.camera)
            elif request.cmd == "set_thresholds":
                result = self.handler.set_thresholds(request.thresholds)
            else:
                result = getattr(self.handler, request.cmd)()
            reply = {"ok": True, **(result or {})}
        except Exception as exc:  # the handler's failure is the client's answer, never the server's end
            self.refused += 1
            error = _one_line(exc)
            log.warning("control_request_failed", cmd=request.cmd, error=error)
            reply = {"ok": False, "error": error}
        return _dumps(reply)


def _dumps(reply: dict) -> bytes:
    # default=str: a handler returning a Path or numpy scalar must still produce a reply, not a dead REP socket.
    return json.dumps(reply, default=str).encode()


class ControlTimeout(InspectdError):
    """The daemon did not answer a control request in time."""


class ControlClient:
    """REQ client. After a timeout the REQ socket is stuck mid-exchange, so it is replaced by a fresh one."""

    def __init__(self, endpoint: str, timeout_s: float = 5.0,
                 curve: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = zmq.Context.instance().socket(zmq.REQ)
            sock.linger = 0
            # With no peer to queue to (e.g. its CURVE handshake was refused) REQ send blocks: bound it too.
            sock.sndtimeo = max(1, int(self.timeout_s * 1000))
            if self.curve is not None:
                self.curve(sock)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def request(self, doc: dict) -> dict:
        sock = self._socket()
        try:
            sock.send(json.dumps(doc).encode())
            answered = sock.poll(int(self.timeout_s * 1000))
        except zmq.Again:
            answered = False
        if not answered:
            self._sock = None
            sock.close(linger=0)
            raise ControlTimeout(f"control {self.endpoint}: no reply within {self.timeout_s:g} s to "
                                 f"{str(doc.get('cmd', '?'))[:40]!r}, expected a running inspectd")
        data = sock.recv()
        try:
            reply = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MessageError(f"control {self.endpoint}: reply is not JSON, expected {{\"ok\": ...}}") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise MessageError(f"control {self.endpoint}: reply {str(reply)[:60]}, expected an object with \"ok\"")
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
