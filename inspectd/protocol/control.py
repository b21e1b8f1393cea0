"""The control channel's protocol: the request grammar (`parse_request`), `ControlClient`, `client_for` (a client
from a command's --apply/--timeout/--server-key/--client-key, checked before the command's work) and the reading of a
reload reply's allow-lists.

One JSON object each way over a ZeroMQ REQ/REP pair. Requests:

    {"cmd": "status"}  {"cmd": "reload"}  {"cmd": "set_thresholds", "thresholds": {...}, "force": false}
    {"cmd": "pause", "camera": "cam0"}  {"cmd": "resume", "camera": "cam0"}  {"cmd": "rollback", "version": 2}

Replies are `{"ok": true, ...handler result...}` or `{"ok": false, "error": "one line"}`. A refused `reload` whose
bundle itself failed (it did not load, pass the daemon's checks or warm up) also carries `"bundle_refused": true`
(BUNDLE_REFUSED): the daemon's next start would open that bundle and refuse it the same way. Any other refusal (the
daemon stopping, a key no longer allowed, an internal error) leaves it out, as a daemon from before the field did. The
server that answers them
is the daemon's (inspectd.daemon.control); the client is used by `inspectd calibrate --apply`, operators' scripts and
tests, which therefore need nothing of the daemon.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from inspectd.errors import InspectdError, MessageError
from inspectd.protocol import wirejson
from inspectd.protocol.endpoints import take_endpoint
from inspectd.protocol.keys import HandshakeWatch, curve_from_flags

POLL_S = 0.25
# A thresholds document with its history: ~110 kB on 4 cameras, ~320 kB on 16 (drift references only in the newest
# history entries: engines.bundle.thresholds.KEPT_REFERENCES); anything near this is not a request.
MAX_REQUEST_BYTES = 1 << 20
# Commands that write into the bundle: one the daemon took and left unanswered at the timeout may still be applied.
WRITES = ("set_thresholds", "rollback")
BUNDLE_REFUSED = "bundle_refused"  # in a refused reload's reply: the bundle itself failed, not the moment

# cmd -> {field: (type, description)}; every field listed is required, any other is refused.
COMMANDS: dict[str, dict[str, tuple[type, str]]] = {
    "status": {},
    "reload": {},
    "set_thresholds": {"thresholds": (dict, "a thresholds document (JSON object)")},
    "pause": {"camera": (str, "a camera id (string)")},
    "resume": {"camera": (str, "a camera id (string)")},
    "rollback": {"version": (int, "an earlier thresholds version (integer)")},
}
# cmd -> {field: (type, description)}: fields a command may carry; left out, they take the Request's default.
OPTIONAL: dict[str, dict[str, tuple[type, str]]] = {
    "set_thresholds": {
        "force": (
            bool,
            "true or false: accept thresholds outside the calibrated score range, set on another model, or "
            "overriding cameras the daemon does not run",
        )
    },
}


@dataclasses.dataclass(frozen=True)
class Request:
    cmd: str
    camera: str | None = None
    thresholds: dict | None = None
    version: int | None = None
    force: bool = False


def parse_request(data: bytes) -> Request:
    """One control request; MessageError (one line) for anything that is not exactly a known command (a key given
    twice too: JSON keeps the last, so {"cmd": "status", "cmd": "reload"} would run a reload)."""
    doc = wirejson.loads(data, "request", 'an object like {"cmd": "status"}', unique_keys=True)
    if not isinstance(doc, dict):
        raise MessageError(f'request: JSON {type(doc).__name__}, expected an object like {{"cmd": "status"}}')
    cmd = doc.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        # Never repr() a container from outside: a deeply nested one would overflow the stack right here.
        shown = (
            "missing"
            if cmd is None
            else f"a JSON {type(cmd).__name__}"
            if isinstance(cmd, (list, dict))
            else repr(cmd)[:60]
        )
        raise MessageError(f"cmd: {shown}, expected one of {', '.join(COMMANDS)}")
    fields = COMMANDS[cmd]
    optional = OPTIONAL.get(cmd, {})
    for key in doc:
        if key != "cmd" and key not in fields and key not in optional:
            allowed = ", ".join([*fields, *optional]) or "no other field"
            raise MessageError(f"{cmd}.{str(key)[:40]}: unknown field, expected {allowed}")
    for key, (_, description) in fields.items():
        if key not in doc:
            raise MessageError(f"{cmd}.{key}: missing, expected {description}")
    for key, (kind, description) in {**fields, **optional}.items():
        if key in doc and not isinstance(doc[key], kind):
            raise MessageError(f"{cmd}.{key}: got {type(doc[key]).__name__}, expected {description}")
    return Request(cmd=cmd, **{key: doc[key] for key in [*fields, *optional] if key in doc})


def encode_request(doc: dict) -> bytes:
    """`doc` as the bytes of one request; InspectdError (one line) when it is over MAX_REQUEST_BYTES, which the daemon's
    socket drops, connection and all, without a reply: refused here, before anything is sent."""
    cmd = str(doc.get("cmd", "?"))[:40]
    try:
        data = json.dumps(doc).encode()
    except RecursionError:  # a document the parser just took can be a level too deep for the encoder
        raise InspectdError(f"{cmd!r}: request nested too deeply, expected a JSON object a few levels deep") from None
    if len(data) > MAX_REQUEST_BYTES:
        raise InspectdError(
            f"{cmd!r}: request of {len(data)} bytes, expected at most {MAX_REQUEST_BYTES / (1 << 20):g} MiB"
        )
    return data


class ControlTimeout(InspectdError):
    """The daemon did not answer a control request in time. `sent`: the request was handed to a daemon (its handshake
    had completed), which may still act on it, e.g. a reload that ends after the timeout; False: no daemon took it."""

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class HandshakeFailed(InspectdError):
    """The peer at the control endpoint ended the security handshake: the request never reached a daemon."""


def check_timeout(timeout_s: Any, name: str = "timeout") -> None:
    """InspectdError (one line naming `name`) unless `timeout_s` is a finite number of seconds in (0, 1e6)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < 1e6:
        # NaN fails the comparison too; a poll of int(-1000) ms would wait forever.
        raise InspectdError(f"{name} {timeout_s!r}: expected a finite number of seconds above 0 (below 1e6)")


def connect_error(name: str, endpoint: str, exc: zmq.ZMQError) -> InspectdError:
    """The one-line error for an endpoint ZeroMQ refused to connect to, for every client socket (REQ, SUB)."""
    return InspectdError(
        f"{name} {endpoint[:200]!r}: cannot connect ({exc.strerror}), expected tcp://HOST:PORT or ipc://PATH"
    )


class ControlClient:
    """REQ client. After a timeout the REQ socket is stuck mid-exchange, so it is replaced by a fresh one.

    A timeout that is not a finite number above 0, or an endpoint ZeroMQ cannot connect to, raises InspectdError
    (one line) before anything is sent."""

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 5.0,
        curve: Callable[[zmq.Socket], None] | None = None,
        name: str = "control endpoint",
    ) -> None:
        check_timeout(timeout_s)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve
        self.name = name  # what a connect error calls the endpoint: the flag it came from, for a command
        self._sock: zmq.Socket | None = None
        self._watch: HandshakeWatch | None = None

    def connect(self) -> ControlClient:
        """Make the socket now (requests do it otherwise), so a bad endpoint shows before the first request."""
        self._socket()
        return self

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = zmq.Context.instance().socket(zmq.REQ)
            sock.linger = 0
            take_endpoint(sock, self.endpoint)
            # Queued only to a peer whose handshake has completed: a request sent has then reached a daemon, and a
            # timeout after it is a busy daemon (it answers one request at a time, a reload's only when that ends),
            # not a missing one.
            sock.immediate = True
            # With no peer to queue to (e.g. its CURVE handshake was refused) REQ send blocks: bound it too.
            sock.sndtimeo = max(1, int(self.timeout_s * 1000))
            self._sock = sock
            try:
                if self.curve is not None:
                    self.curve(sock)
                self._watch = HandshakeWatch(sock, self.curve is not None)  # before connect: the first handshake
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                self.close()
                raise connect_error(self.name, self.endpoint, exc) from None
            except BaseException:
                self.close()
                raise
        return self._sock

    def request(self, doc: dict, timeout_s: float | None = None) -> dict:
        """One request and its reply; `timeout_s` (at most the client's) bounds this one, e.g. a probe."""
        data = encode_request(doc)
        sock = self._socket()
        wait_s = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = time.monotonic() + wait_s
        sent = False
        try:
            # Sent once the socket can take it: a daemon that refused the handshake before this request (the
            # client connects first, then loads a bundle) leaves it nowhere to send, and a blocking send would only
            # tell at the timeout.
            answered = self._ready(sock, zmq.POLLOUT, deadline)
            if answered:
                sock.send(data, zmq.NOBLOCK)
                sent = True
                answered = self._ready(sock, zmq.POLLIN, deadline)
        except zmq.Again:
            answered = False
        if not answered:
            watch = self._watch
            failure = None if watch is None else watch.failure()
            refused = watch is not None and not watch.connected and watch.connects_refused > 0
            self.close()
            if failure is not None:
                raise HandshakeFailed(f"control {self.endpoint}: the daemon {failure}")
            raise ControlTimeout(self._no_reply(str(doc.get("cmd", "?"))[:40], wait_s, sent, refused), sent=sent)
        data = sock.recv()
        if self._watch is not None:
            self._watch.failure()  # read its events as they come: a socket kept open must not let them pile up
        reply = wirejson.loads(data, f"control {self.endpoint}: reply", '{"ok": ...}')
        if not isinstance(reply, dict) or "ok" not in reply:
            raise MessageError(
                f'control {self.endpoint}: reply of JSON {type(reply).__name__}, expected an object with "ok"'
            )
        return reply

    def _no_reply(self, cmd: str, wait_s: float, sent: bool, refused: bool = False) -> str:
        """The one line for a request not answered within `wait_s`: no daemon took it (`sent` false), or one took it
        and is still at it. A reload is answered only once the new model is loaded and warmed up, which can outlast
        the timeout, and until then the daemon answers nothing else."""
        where = f"control {self.endpoint}: no reply within {wait_s:g} s to {cmd!r}"
        if not sent:
            return where + no_daemon_took(self.endpoint, refused)
        if cmd == "reload":
            return (
                f"{where}, which the daemon took: it may still be reloading (it answers nothing else until the "
                "reload ends); `inspectd ctl status` answers once it has, and its log says how it ended (reloaded or "
                "reload_failed: journalctl -u inspectd); another reload now would only run again after this one"
            )
        if cmd in WRITES:
            return (
                f"{where}, which the daemon took and may still apply (it answers one request at a time, one behind a "
                "reload only once that ends): check `inspectd ctl status` (its thresholds version) before sending it "
                "again"
            )
        return (
            f"{where}, which the daemon took: it answers one request at a time, and may be busy with a reload "
            "(reload_started in its log, then reloaded or reload_failed), or is hung"
        )

    def _ready(self, sock: zmq.Socket, event: int, deadline: float) -> bool:
        """Whether `sock` is ready for `event` (zmq.POLLOUT, zmq.POLLIN) before `deadline`. The handshake watch is
        polled beside it: a daemon that refuses the handshake (HandshakeWatch.refused) is told at once."""
        poller = zmq.Poller()
        poller.register(sock, event)
        if self._watch is not None:
            poller.register(self._watch.monitor, zmq.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            # Woken at least every POLL_S: a peer of another socket kind is told by the silence after its close.
            ready = dict(poller.poll(max(1, int(min(left, POLL_S) * 1000))))
            if ready.get(sock, 0) & event:
                return True
            if self._watch is not None and self._watch.refused():
                return False
        return False

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def no_daemon_took(endpoint: str, refused: bool = False) -> str:
    """The end of the line for a request (or a subscriber) no daemon took at `endpoint`: what its ipc:// socket file
    tells, and whether every connection was refused (`refused`: nothing listens there). ZeroMQ retries a connect the
    file's mode refuses without a word, so without this a user outside the daemon's group would be told the daemon is
    not running."""
    running = ", expected a running inspectd"
    path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else ""
    if not path or path.startswith("@"):  # not ipc, or Linux's abstract namespace: no file to look at
        return (": every connection was refused, so nothing listens there" if refused else "") + running
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{running}: no socket file {path}, so no daemon is bound there"
    except OSError as exc:
        return f": this user cannot reach the socket file {path} ({exc.strerror}), expected a member of its group"
    if os.access(path, os.W_OK):
        if refused:  # the file outlived its socket
            return (
                f": the socket file {path} is there but every connection to it was refused: left by a daemon that "
                "stopped without removing it (or one not yet listening), expected a running inspectd"
            )
        return running  # a daemon that does not answer
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return (
        f": the socket file {path} exists but this user may not connect to it (mode {stat.S_IMODE(st.st_mode):04o}, "
        f"group {group}): run as its owner or a member of group {group}"
    )


def client_for(
    endpoint: str,
    timeout_s: float,
    server_key: str | Path | None = None,
    client_key: str | Path | None = None,
    endpoint_flag: str = "--apply",
) -> ControlClient:
    """A connected ControlClient for a command's flags, every input checked and nothing sent yet: InspectdError (one
    line naming the flag) for a timeout ControlClient would refuse, an endpoint the daemon's config would refuse,
    only one of the two CurveZMQ keys, a network endpoint without them, or a key file that is missing, malformed or
    readable by others. Commands call it before their work, so a typo never costs the work or leaves it done and not
    applied."""
    from inspectd.protocol.endpoints import connect_endpoint_problem
    from inspectd.protocol.keys import is_local_endpoint

    # As the daemon's config checks control.endpoint: libzmq cuts a tcp port above 65535 to 16 bits, so the request
    # would wait out the whole timeout on whatever listens there and be told as no daemon answering.
    problem = connect_endpoint_problem(endpoint)
    if problem is not None:
        raise InspectdError(f"{endpoint_flag}: {problem}")
    check_timeout(timeout_s, "--timeout")
    curve = curve_from_flags(server_key, client_key)
    client = ControlClient(endpoint, timeout_s=timeout_s, curve=curve, name=endpoint_flag).connect()
    # After connect, which has refused what is no ZeroMQ endpoint at all.
    if curve is None and not is_local_endpoint(endpoint):
        client.close()
        raise InspectdError(
            f"{endpoint_flag} {endpoint}: a network address, expected --server-key and --client-key "
            "(the daemon accepts only CurveZMQ clients there)"
        )
    return client


def allow_list_errors(reply: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, error) of each allow-list a `reload` reply says failed to reload: the model was reloaded, that list
    was not (the previous one stays in force, so a key meant to be revoked may still get in)."""
    lists = reply.get("allow_lists")
    if not isinstance(lists, dict):
        return []
    return [
        (str(role), str(part["error"])) for role, part in lists.items() if isinstance(part, dict) and "error" in part
    ]
