"""The control channel over real ZeroMQ REQ/REP sockets (ipc in tmp_path, loopback TCP)."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
import zmq

from inspectd.daemon.control import ControlServer
from inspectd.daemon.security import CurveServer
from inspectd.errors import InspectdError, MessageError
from inspectd.protocol import keys
from inspectd.protocol.control import MAX_REQUEST_BYTES, ControlClient, ControlTimeout, Request, parse_request
from inspectd.protocol.keys import curve_client
from ports import free_port

pytestmark = pytest.mark.timeout(60)


class LineHandler:
    """The handler interface the daemon implements, here over a dict of cameras."""

    def __init__(self) -> None:
        self.paused: dict[str, bool] = {"cam0": False, "cam1": False}
        self.thresholds_version = 1
        self.reloads = 0

    def status(self) -> dict:
        return {
            "cameras": {k: {"paused": v} for k, v in self.paused.items()},
            "thresholds_version": self.thresholds_version,
        }

    def reload(self) -> dict:
        self.reloads += 1
        if self.reloads > 1:
            raise RuntimeError("bundle gone\nsecond line must not leak")
        return {"reloads": self.reloads}

    def set_thresholds(self, doc: dict, force: bool = False) -> dict:
        if doc.get("version", 0) <= self.thresholds_version:
            raise InspectdError(
                f"thresholds.version: {doc.get('version')}, expected more than {self.thresholds_version}"
            )
        self.thresholds_version = doc["version"]
        return {"thresholds_version": self.thresholds_version}

    def pause(self, camera: str) -> dict:
        if camera not in self.paused:
            raise InspectdError(f"camera {camera!r}: unknown")
        self.paused[camera] = True
        return {"camera": camera, "paused": True}

    def resume(self, camera: str) -> dict:
        self.paused[camera] = False
        return {"camera": camera, "paused": False}


@pytest.fixture
def server(tmp_path):
    handler = LineHandler()
    srv = ControlServer(f"ipc://{tmp_path}/run/control.sock", handler)
    srv.start()
    yield srv, handler
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 2


@pytest.fixture
def client(server):
    with ControlClient(server[0].endpoint, timeout_s=3) as c:
        yield c


def test_commands_reach_the_handler(server, client):
    srv, handler = server
    assert client.request({"cmd": "status"}) == {
        "ok": True,
        "thresholds_version": 1,
        "cameras": {"cam0": {"paused": False}, "cam1": {"paused": False}},
    }
    assert client.request({"cmd": "pause", "camera": "cam1"}) == {"ok": True, "camera": "cam1", "paused": True}
    assert handler.paused["cam1"] is True
    assert client.request({"cmd": "resume", "camera": "cam1"})["paused"] is False
    assert client.request({"cmd": "set_thresholds", "thresholds": {"version": 2}}) == {
        "ok": True,
        "thresholds_version": 2,
    }
    assert client.request({"cmd": "reload"}) == {"ok": True, "reloads": 1}
    assert srv.requests == 5 and srv.refused == 0


def test_ipc_socket_is_created_owner_and_group_only(server):
    path = server[0].endpoint[len("ipc://") :]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & 0o007 == 0


BAD_REQUESTS = [
    (b"{not json", "request: not JSON"),
    (b"\xff\xfe", "request: not JSON"),
    (b"[1, 2]", "request: JSON list, expected an object"),
    (b'"status"', "request: JSON str"),
    (b"{}", "cmd: missing, expected one of status, reload"),
    (b'{"cmd": "shutdown"}', "cmd: 'shutdown', expected one of"),
    (b'{"cmd": 5}', "cmd: 5, expected one of"),
    (b'{"cmd": "status", "verbose": true}', "status.verbose: unknown field, expected no other field"),
    (b'{"cmd": "pause"}', "pause.camera: missing, expected a camera id"),
    (b'{"cmd": "pause", "camera": 3}', "pause.camera: got int, expected a camera id"),
    (b'{"cmd": "resume", "camera": "cam0", "all": true}', "resume.all: unknown field, expected camera"),
    (b'{"cmd": "set_thresholds", "thresholds": [0.5]}', "set_thresholds.thresholds: got list, expected a thresholds"),
    (b'{"cmd": "set_thresholds"}', "set_thresholds.thresholds: missing"),
    # json keeps a key's last value: this one would run a reload.
    (b'{"cmd": "status", "cmd": "reload"}', "request: key 'cmd' given twice in one object, expected each key once"),
    (
        b'{"cmd": "set_thresholds", "thresholds": {"version": 2, "image_threshold": 0.5, "version": 3}}',
        "request: key 'version' given twice in one object, expected each key once",
    ),
]


@pytest.mark.parametrize("data,error", BAD_REQUESTS)
def test_parse_request_refuses_with_one_line(data, error):
    with pytest.raises(MessageError) as info:
        parse_request(data)
    assert str(info.value).startswith(error) and "\n" not in str(info.value)


def test_parse_request_accepts_each_command():
    assert parse_request(b'{"cmd": "status"}') == Request("status")
    assert parse_request(b'{"cmd": "pause", "camera": "cam0"}') == Request("pause", camera="cam0")
    assert parse_request(b'{"cmd": "set_thresholds", "thresholds": {"version": 3}}') == Request(
        "set_thresholds", thresholds={"version": 3}
    )


def test_malformed_and_failing_requests_get_ok_false_and_the_server_keeps_answering(server, tmp_path):
    srv, handler = server
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.rcvtimeo = 3000
    req.connect(srv.endpoint)
    try:
        for data, error in BAD_REQUESTS:
            req.send(data)
            reply = json.loads(req.recv())
            assert reply["ok"] is False and reply["error"].startswith(error)
            req.send(b'{"cmd": "status"}')
            assert json.loads(req.recv())["ok"] is True
    finally:
        req.close()
    with ControlClient(srv.endpoint, timeout_s=3) as client:
        # Handler failures: an error we raise on purpose reads as is; a bug is named by type, on one line.
        assert client.request({"cmd": "pause", "camera": "cam7"}) == {"ok": False, "error": "camera 'cam7': unknown"}
        assert client.request({"cmd": "reload"})["ok"] is True
        reply = client.request({"cmd": "reload"})
        assert reply == {"ok": False, "error": "RuntimeError: bundle gone"}
        stale = client.request({"cmd": "set_thresholds", "thresholds": {"version": 1}})
        assert stale["ok"] is False and stale["error"].startswith("thresholds.version: 1")
        assert client.request({"cmd": "status"})["ok"] is True
    assert srv.refused == len(BAD_REQUESTS) + 3


def test_a_refusal_repeating_a_huge_request_stays_a_short_line_in_the_reply_and_the_log(server):
    """A handler's refusal that quotes the client's input whole (a 200 KB camera id) made a reply and a log line of
    the request's size: journald splits a line past 48K into fragments that are no longer JSON. Cut at ERROR_CHARS,
    and a string version in `control_command` like a camera id."""
    import structlog

    from inspectd.daemon.control import ERROR_CHARS

    srv, _ = server
    with structlog.testing.capture_logs() as logs, ControlClient(srv.endpoint, timeout_s=5) as client:
        paused = client.request({"cmd": "pause", "camera": "x" * 200_000})
        versioned = client.request({"cmd": "set_thresholds", "thresholds": {"version": "v" * 100_000}})
        assert client.request({"cmd": "status"})["ok"] is True
    assert paused["ok"] is False and paused["error"].startswith("camera 'xxx")
    assert len(paused["error"]) == ERROR_CHARS and paused["error"].endswith("...")
    assert versioned["ok"] is False and len(versioned["error"]) <= ERROR_CHARS
    failed = [event for event in logs if event["event"] == "control_request_failed"]
    assert [len(event["error"]) for event in failed] == [ERROR_CHARS, len(versioned["error"])]
    commands = [event for event in logs if event["event"] == "control_command"]
    assert len(commands[0]["camera"]) == 64 and len(commands[1]["version"]) == 64
    assert all(len(json.dumps(event, default=str)) < 2 * ERROR_CHARS for event in logs), [
        (event["event"], len(json.dumps(event, default=str))) for event in logs
    ]


def test_a_multipart_request_gets_ok_false_and_the_server_keeps_answering(server):
    """A REP socket that read one frame of a multipart request cannot reply: the whole message is read and refused,
    so one such request from anyone who can connect never ends the control thread."""
    srv, _ = server
    req = zmq.Context.instance().socket(zmq.REQ)
    req.linger = 0
    req.rcvtimeo = 3000
    req.connect(srv.endpoint)
    try:
        for frames in ([b'{"cmd": "status"}', b"x"], [b'{"cmd": "reload"}', b"", b'{"cmd": "status"}']):
            req.send_multipart(frames)
            assert json.loads(req.recv()) == {
                "ok": False,
                "error": f"request: {len(frames)} frames, expected one JSON object in one frame",
            }
            req.send(b'{"cmd": "status"}')
            assert json.loads(req.recv())["ok"] is True
    finally:
        req.close()
    assert srv.alive() and srv.refused == 2
    with ControlClient(srv.endpoint, timeout_s=3) as client:
        assert client.request({"cmd": "status"})["ok"] is True


def test_a_removed_keys_multipart_request_is_refused_and_the_server_keeps_answering(pki, tmp_path):
    """The refusal for a key a reload removed is a reply too: a multipart request there must not end the thread."""
    operator = keys.generate(tmp_path / "keys" / "operator", "operator")
    (pki["allow_dir"] / "operator.key").write_bytes(operator[0].read_bytes())
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    srv = ControlServer(f"tcp://127.0.0.1:{free_port()}", LineHandler(), curve=guard)
    srv.start()
    revoked = zmq.Context.instance().socket(zmq.REQ)
    revoked.linger = 0
    revoked.rcvtimeo = 3000
    curve_client(pki["server"][0], pki["allowed"][1])(revoked)
    revoked.connect(srv.endpoint)
    try:
        with ControlClient(srv.endpoint, 5, curve_client(pki["server"][0], operator[1])) as kept:
            revoked.send(b'{"cmd": "status"}')
            assert json.loads(revoked.recv())["ok"] is True  # its handshake is done before the key goes
            (pki["allow_dir"] / "bridge1.key").unlink()
            assert [r.split()[0] for r in guard.reload()["removed"]] == ["bridge1.key"]
            revoked.send_multipart([b'{"cmd": "status"}', b"x"])
            refusal = json.loads(revoked.recv())
            assert refusal["ok"] is False and "allow-list" in refusal["error"]
            assert kept.request({"cmd": "status"})["ok"] is True
            assert srv.alive()
    finally:
        revoked.close()
        srv.stop()
        guard.stop()


def test_a_frame_without_an_envelope_leaves_the_server_answering_and_stopping_promptly(tmp_path):
    """A DEALER's frame with no empty delimiter made the poll ready, then REP dropped it: the receive that followed
    blocked, deaf to the stop, until the socket was torn down under it."""
    srv = ControlServer(f"ipc://{tmp_path}/control.sock", LineHandler())
    srv.start()
    stopped = False
    try:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(srv.endpoint)
        dealer.send(b'{"cmd": "status"}')  # no b"" envelope before it
        with ControlClient(srv.endpoint, timeout_s=3) as client:
            assert client.request({"cmd": "status"})["ok"] is True
        dealer.send(b'{"cmd": "status"}')
        time.sleep(0.3)  # the server's poll wakes on it; what is measured is the stop after
        t0 = time.monotonic()
        srv.stop()
        stopped = True
        assert time.monotonic() - t0 < 1.0
        dealer.close()
    finally:
        if not stopped:
            srv.stop()


def test_a_request_over_the_servers_limit_is_refused_by_the_client_before_it_is_sent(server):
    """The server's socket drops an oversized message with its connection and answers nothing, so the client would
    only time out and blame a busy daemon: it refuses the request itself, in one line."""
    srv, handler = server
    doc = {"cmd": "set_thresholds", "thresholds": {"version": 2, "pad": "x" * MAX_REQUEST_BYTES}}
    with ControlClient(srv.endpoint, timeout_s=3) as client:
        t0 = time.monotonic()
        with pytest.raises(InspectdError) as info:
            client.request(doc)
        assert time.monotonic() - t0 < 1
        size = len(json.dumps(doc).encode())
        assert str(info.value) == f"'set_thresholds': request of {size} bytes, expected at most 1 MiB"
        assert client.request({"cmd": "status"})["ok"] is True
    assert srv.requests == 1 and handler.thresholds_version == 1


def test_client_times_out_with_one_line_then_recovers(tmp_path):
    endpoint = f"ipc://{tmp_path}/late.sock"
    client = ControlClient(endpoint, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(ControlTimeout) as info:
        client.request({"cmd": "status"})
    assert 0.25 < time.monotonic() - t0 < 2
    assert "no reply within 0.3 s" in str(info.value) and "\n" not in str(info.value)
    # A REQ socket that timed out cannot send again; the client must have replaced it.
    srv = ControlServer(endpoint, LineHandler())
    srv.start()
    try:
        client.timeout_s = 3
        assert client.request({"cmd": "status"})["ok"] is True
        assert client.request({"cmd": "status"})["ok"] is True
    finally:
        client.close()
        srv.stop()


def test_tcp_endpoint_in_use_fails_start_clearly():
    first = ControlServer("tcp://127.0.0.1:*", LineHandler())
    first.start()
    try:
        assert first.endpoint.startswith("tcp://127.0.0.1:") and not first.endpoint.endswith("*")
        second = ControlServer(first.endpoint, LineHandler())
        with pytest.raises(OSError, match=r"^control.endpoint tcp://127.0.0.1:\d+: cannot bind"):
            second.start()
        with ControlClient(first.endpoint, timeout_s=3) as client:
            assert client.request({"cmd": "status"})["ok"] is True
    finally:
        first.stop()


def test_curve_hook_configures_the_socket_before_bind(tmp_path):
    seen = []

    def hook(sock):
        seen.append(sock.type)
        sock.setsockopt(zmq.SNDHWM, 7)

    srv = ControlServer(f"ipc://{tmp_path}/c.sock", LineHandler(), curve=hook)
    srv.start()
    try:
        with ControlClient(srv.endpoint, timeout_s=3, curve=hook) as client:
            assert client.request({"cmd": "status"})["ok"] is True
        assert seen == [zmq.REP, zmq.REQ]
    finally:
        srv.stop()


def test_a_timeout_says_whether_a_daemon_took_the_request(tmp_path):
    """`sent` tells "no daemon" from "a daemon took it and is still at it" (a reload outlasting the timeout, which may
    yet succeed or fail): a client must not act as if nothing happened in the second case."""
    with ControlClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.3) as client:
        with pytest.raises(ControlTimeout) as nobody:
            client.request({"cmd": "reload"})
    assert nobody.value.sent is False and "expected a running inspectd" in str(nobody.value)

    busy = zmq.Context.instance().socket(zmq.REP)  # takes requests, answers none: a daemon busy with a reload
    busy.linger = 0
    busy.bind(f"ipc://{tmp_path}/busy.sock")
    try:
        with ControlClient(f"ipc://{tmp_path}/busy.sock", timeout_s=0.5) as client:
            with pytest.raises(ControlTimeout) as took:
                client.request({"cmd": "reload"})
        assert took.value.sent is True and "which the daemon took" in str(took.value)
        assert busy.poll(3000) and json.loads(busy.recv()) == {"cmd": "reload"}
    finally:
        busy.close()


def test_a_refusal_carries_the_fields_its_handler_marked_beside_its_error(tmp_path):
    """mark_refusal's fields (reload's bundle_refused) reach the ok:false reply; the error reads as it would unmarked
    and the fields cannot turn the refusal into a success."""
    from inspectd.daemon.control import mark_refusal

    class Refusing(LineHandler):
        def reload(self) -> dict:
            exc = InspectdError("reload: bundle b: sha256 mismatch")
            mark_refusal(exc, bundle_refused=True, ok=True, error="hidden")
            raise exc

    srv = ControlServer(f"ipc://{tmp_path}/c.sock", Refusing())
    srv.start()
    try:
        with ControlClient(srv.endpoint, timeout_s=3) as client:
            assert client.request({"cmd": "reload"}) == {
                "ok": False,
                "error": "reload: bundle b: sha256 mismatch",
                "bundle_refused": True,
            }
            unmarked = client.request({"cmd": "pause", "camera": "cam7"})
            assert unmarked == {"ok": False, "error": "camera 'cam7': unknown"}
    finally:
        srv.stop()


def test_a_reply_holding_nan_is_refused_by_name_on_the_daemons_side_and_the_server_answers_on(tmp_path):
    """NaN is not JSON and the clients' parser refuses a whole reply holding one: the daemon names the key instead."""

    class Drifting(LineHandler):
        def status(self) -> dict:
            out = super().status()
            out["cameras"]["cam0"]["drift"] = {"false_reject_estimate": float("nan")}
            return out

    srv = ControlServer(f"ipc://{tmp_path}/c.sock", Drifting())
    srv.start()
    try:
        with ControlClient(srv.endpoint, timeout_s=3) as client:
            reply = client.request({"cmd": "status"})
            assert reply == {
                "ok": False,
                "error": "internal error: reply.cameras.cam0.drift.false_reject_estimate is not a finite number",
            }
            assert client.request({"cmd": "pause", "camera": "cam1"})["ok"] is True
    finally:
        srv.stop()


def test_a_peer_that_sends_without_reading_replies_is_held_back_not_buffered(tmp_path):
    """A DEALER sends requests without waiting for their replies: while the control thread is busy with one request,
    the daemon keeps at most a small queue of the rest unread (libzmq's default was 1000 requests of up to 1 MiB
    each, from one connection), then stops reading that peer, whose sends block. Every request it queued is
    answered once the thread is free, and a plain client is answered after it."""
    import threading

    release = threading.Event()
    entered = threading.Event()

    class SlowHandler(LineHandler):
        def status(self) -> dict:
            if not entered.is_set():
                entered.set()
                release.wait(30)
            return super().status()

    srv = ControlServer(f"ipc://{tmp_path}/control.sock", SlowHandler())
    srv.start()
    context = zmq.Context.instance()
    slow = ControlClient(srv.endpoint, timeout_s=30)
    flood = context.socket(zmq.DEALER)
    flood.linger = 0
    flood.sndhwm = 1  # this side's own queue: what the daemon does not take stays here, counted below
    flood.connect(srv.endpoint)
    worker = threading.Thread(target=lambda: slow.request({"cmd": "status"}), daemon=True)
    size, most = 64 << 10, 400  # past `most` the old queue (1000) would only be told by a larger run
    sent = 0
    try:
        worker.start()
        assert entered.wait(10), "the first request never reached the handler"
        idle_since = time.monotonic()
        while sent < most and time.monotonic() - idle_since < 1.0:
            try:
                flood.send_multipart([b"", b"x" * size], zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.02)
                continue
            sent += 1
            idle_since = time.monotonic()
        # Taken by the daemon: its queue, whatever the kernel's socket buffers hold, and this side's one.
        assert sent < 64, f"{sent} requests of {size} bytes taken while the control thread was busy"
        release.set()
        worker.join(10)
        flood.rcvtimeo = 10000
        for _ in range(sent):
            empty, reply = flood.recv_multipart()
            assert empty == b"" and json.loads(reply)["ok"] is False
        with ControlClient(srv.endpoint, timeout_s=5) as client:
            assert client.request({"cmd": "status"})["ok"] is True
        assert srv.alive() and srv.requests == sent + 2
    finally:
        release.set()
        flood.close()
        slow.close()
        srv.stop()


def _wait_for(check, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_removed_control_socket_file_is_bound_again_and_a_connected_client_keeps_its_connection(server):
    """An operator clearing a "stale" socket or a tmp cleaner removing the control socket file left `inspectd ctl`
    unable to reach the daemon, which stayed healthy and logged nothing. The path is bound again within about a
    second, on the same socket: a client connected before keeps being answered."""
    import structlog.testing

    srv, _ = server
    path = srv.endpoint[len("ipc://") :]
    with structlog.testing.capture_logs() as logs, ControlClient(srv.endpoint, timeout_s=3) as old:
        assert old.request({"cmd": "status"})["ok"] is True
        for round_ in range(2):  # a second removal is found too
            os.unlink(path)
            _wait_for(lambda: os.path.exists(path), "the socket file bound again")
            _wait_for(
                lambda n=round_ + 1: len([e for e in logs if e["event"] == "socket_file_rebound"]) == n, "its log line"
            )
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # the group's clients may connect
            with ControlClient(srv.endpoint, timeout_s=3) as new:
                assert new.request({"cmd": "status"})["ok"] is True
            assert old.request({"cmd": "status"})["ok"] is True
    event = next(e for e in logs if e["event"] == "socket_file_rebound")
    assert event["log_level"] == "warning" and event["error"] == (
        f"{srv.endpoint}: its socket file is gone (No such file or directory), expected it there while bound: new "
        "control clients (`inspectd ctl`, calibrate --apply) could not connect, bound again"
    ), event


def test_a_control_socket_file_removed_again_and_again_is_bound_afresh(server, monkeypatch):
    """Each bind in place leaves a listener on the removed file: past the limit the endpoint is unbound (closing them
    all) and bound afresh at the next check."""
    import structlog.testing

    from inspectd.daemon import socket_file

    monkeypatch.setattr(socket_file, "MAX_REBINDS", 1)
    srv, _ = server
    path = srv.endpoint[len("ipc://") :]
    with structlog.testing.capture_logs() as logs:

        def rebound() -> int:
            return len([e for e in logs if e["event"] == "socket_file_rebound"])

        os.unlink(path)
        _wait_for(lambda: rebound() == 1 and os.path.exists(path), "the bind in place")
        os.unlink(path)
        _wait_for(lambda: rebound() == 3 and os.path.exists(path), "the endpoint bound afresh")
        with ControlClient(srv.endpoint, timeout_s=3) as client:
            assert client.request({"cmd": "status"})["ok"] is True
    errors = [e["error"] for e in logs if e["event"] == "socket_file_rebound"]
    assert errors[1] == (
        f"{srv.endpoint}: its socket file is gone (No such file or directory), expected it there while bound, bound "
        "again 1 times: binding it afresh (the control clients (`inspectd ctl`, calibrate --apply) connected reconnect)"
    ), errors
    assert not [e for e in logs if e["log_level"] == "error"], logs
