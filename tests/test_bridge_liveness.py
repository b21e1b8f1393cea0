"""How `inspectd bridge modbus` follows the daemon over a long run: a real bridge subprocess between a real ZeroMQ PUB
socket (tests/plc_peers.py) and a real pymodbus TCP server with its acking scan (tests/test_bridge.py's Plc).

trigger_ready follows the daemon's status messages: the cameras it runs (one it leaves out is not run), the
interval it says they come at (its silence counted against three of them), and the connection: down at once when
the daemon closes it, and given up by TCP keepalive when its path died without a FIN or RST, so the bridge
reconnects. Each change of the daemon's silence or health is
one log line, and each camera whose results the bridge refuses is a warning, repeated at most once a minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog.testing

pytest.importorskip("pymodbus", reason="the PLC bridge needs the [plc] extra (pymodbus)")
from inspectd.clients import bridge as bridge_module  # noqa: E402
from inspectd.clients.handshake import Handshake, HandshakeSettings  # noqa: E402
from inspectd.protocol.messages import decode, encode_status  # noqa: E402
from plc_peers import CAMERA, STATION, Daemon, Memory, wait  # noqa: E402
from ports import free_port  # noqa: E402
from test_bridge import BIT, Bridge, Plc, bridge_command  # noqa: E402

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def plc():
    station = Plc()
    yield station
    station.close()


@pytest.fixture
def daemon():
    publisher = Daemon()
    yield publisher
    publisher.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text("ack_timeout_ms: 3000\npoll_ms: 5\nheartbeat_ms: 100\n")
    return path


def status(daemon: Daemon, cameras: dict | None = None, healthy: bool = True, interval_s: float = 1.0) -> None:
    """A status message as the daemon publishes it: with the interval it publishes at (interval_s)."""
    fields = {"t": time.time(), "uptime_s": 1.0, "healthy": healthy, "model_id": "m", "thresholds_version": 1}
    fields |= {"throughput_fps": 10.0, "cameras": cameras or {}, "interval_s": interval_s}
    daemon.pub.send_multipart(encode_status(STATION, fields))


def events(bridge: Bridge, name: str) -> list[dict]:
    lines = [json.loads(line) for line in bridge.output().splitlines() if line.startswith("{")]
    return [event for event in lines if event.get("event") == name]


def ready(plc: Plc) -> bool:
    return bool(plc.field("status") & BIT["trigger_ready"])


def test_a_camera_the_daemon_no_longer_runs_drops_trigger_ready_and_says_so_once(plc, daemon, config):
    """The daemon restarted with cam0 taken out of its config, then with it renamed: its status lists the cameras it
    runs, cam0 not among them. No verdict of cam0 can come, so the PLC must not trigger parts for it."""
    bridge = Bridge(daemon, plc, config)
    try:
        both = {CAMERA: {"state": "running"}, "cam1": {"state": "running"}}
        wait(lambda: status(daemon, both) or ready(plc), 10, "trigger_ready with cam0 running")
        wait(lambda: status(daemon, {"cam1": {"state": "running"}}) or not ready(plc), 10, "cam0 removed: down")
        renamed = {"cam0_new": {"state": "running"}, "cam1": {"state": "running"}}
        for _ in range(10):  # a second of the renamed daemon's status messages, faster than 1 Hz
            status(daemon, renamed)
            time.sleep(0.1)
        assert not ready(plc)
        wait(lambda: status(daemon, both) or ready(plc), 10, "trigger_ready with cam0 running again")
    finally:
        bridge.stop()
    told = [(event["state"], event["level"]) for event in events(bridge, "camera_state")]
    assert told == [("running", "info"), ("absent", "warning"), ("running", "info")], bridge.output()


def test_the_daemons_silence_is_counted_against_the_status_interval_it_says_and_logged_once_each_way(
    plc, daemon, config
):
    """A daemon whose publish.status_interval_s is 1.5 s: a quiet line hears from it only every 1.5 s, and
    trigger_ready must not drop between two of them (3 s did, 3 s out of every 5 at an interval of 5 s). It drops
    after three missed (4.5 s), with one warning, and comes back at the next message, with one line."""
    bridge = Bridge(daemon, plc, config)
    try:
        status(daemon, interval_s=1.5)
        sent = time.monotonic()
        wait(lambda: not ready(plc), 15, "trigger_ready to drop once the daemon is silent")
        dropped = time.monotonic() - sent
        assert 4.4 <= dropped <= 8.0, f"trigger_ready dropped {dropped:.1f} s after the last status"
        time.sleep(0.5)  # five more heartbeats of silence: still one line
        wait(lambda: status(daemon, interval_s=1.5) or ready(plc), 10, "trigger_ready back with the daemon")
        wait(lambda: events(bridge, "daemon_heard"), 5, "daemon_heard")
    finally:
        bridge.stop()
    [silent] = events(bridge, "daemon_silent")
    assert silent["level"] == "warning" and silent["silent_after_s"] == 4.5 and silent["silent_s"] >= 4.5, silent
    assert silent["since"] == "the last message" and silent["endpoint"] == daemon.endpoint
    assert len(events(bridge, "daemon_heard")) == 1, bridge.output()


def test_a_daemon_that_reports_itself_unhealthy_is_logged_once_each_way(plc, daemon, config):
    bridge = Bridge(daemon, plc, config)
    try:
        wait(lambda: status(daemon, healthy=False) or not ready(plc), 10, "trigger_ready down: unhealthy")
        for _ in range(5):  # more unhealthy status messages over half a second: no more lines
            status(daemon, healthy=False)
            time.sleep(0.1)
        wait(lambda: status(daemon) or ready(plc), 10, "trigger_ready back: healthy")
        wait(lambda: events(bridge, "daemon_healthy"), 5, "daemon_healthy")
    finally:
        bridge.stop()
    [unhealthy] = events(bridge, "daemon_unhealthy")
    assert unhealthy["level"] == "warning", unhealthy
    assert len(events(bridge, "daemon_healthy")) == 1 and not events(bridge, "daemon_silent"), bridge.output()


# Run in a network namespace of its own (unshare -rn), where taking its loopback down is a path that dies without a
# FIN or RST reaching either side, as when the daemon's host loses power; the keepalive is shortened to seconds.
SILENT_DEATH = """
import json, subprocess, time, zmq
from inspectd.protocol import keys
keys.KEEPALIVE_IDLE_S, keys.KEEPALIVE_INTVL_S, keys.KEEPALIVE_CNT = 1, 1, 2
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
context = zmq.Context()
pub = context.socket(zmq.PUB)
port = pub.bind_to_random_port("tcp://127.0.0.1")
sub, watch = keys.open_watched_sub(context, f"tcp://127.0.0.1:{port}", None, [b""])
def heard(within):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pub.send(b"result")
        watch.failure()
        if sub.poll(50):
            sub.recv()
            return True
    return False
out = {"before": heard(10)}
watch.failure()
out["linked"] = watch.linked
subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
cut = time.monotonic()
while watch.linked and time.monotonic() - cut < 20:
    watch.failure()
    time.sleep(0.05)
out["given_up_s"] = None if watch.linked else time.monotonic() - cut
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
out["after"] = heard(15)
print(json.dumps(out))
"""


def test_a_subscription_whose_path_to_the_daemon_died_silently_is_given_up_and_reconnects_once_it_is_back():
    """The daemon's host loses power and comes back: nothing closes the subscriber's connection, which would stay
    open for good, deaf. TCP keepalive gives it up (here after seconds, on a station after about 30 s) and libzmq
    connects anew once the path is back. The bridge, `inspectd subscribe` and the web view open this socket."""
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user and network namespace for this user (unshare -rn)")
    done = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", SILENT_DEATH], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["before"] and out["linked"], out
    assert out["given_up_s"] is not None and out["given_up_s"] < 10, out
    assert out["after"], out


def test_a_daemon_gone_drops_trigger_ready_at_once_whatever_its_status_interval(plc, daemon, config):
    """A daemon killed (or stopped) closes its connections: trigger_ready drops then, not three status intervals
    later (15 s at an interval of 5 s), and the log says the connection closed."""
    bridge = Bridge(daemon, plc, config)
    try:
        wait(lambda: status(daemon, interval_s=5.0) or ready(plc), 10, "trigger_ready")
        status(daemon, interval_s=5.0)
        time.sleep(0.2)
        daemon.pub.close(linger=0)
        gone = time.monotonic()
        wait(lambda: not ready(plc), 10, "trigger_ready to drop with the connection")
        assert time.monotonic() - gone < 3.0
        wait(lambda: events(bridge, "daemon_silent"), 5, "daemon_silent")
    finally:
        bridge.stop()
    [silent] = events(bridge, "daemon_silent")
    assert silent["connection"] == "closed", silent


def test_a_daemon_gone_drops_trigger_ready_at_once_at_a_long_heartbeat_too(plc, daemon, tmp_path):
    """heartbeat_ms set high to cut the PLC's traffic: the heartbeat register keeps its period, but trigger_ready
    still drops when the daemon closes its connection, not at the next heartbeat (up to a minute later)."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 3000\npoll_ms: 5\nheartbeat_ms: 5000\n")
    bridge = Bridge(daemon, plc, config)
    try:
        wait(lambda: status(daemon, interval_s=5.0) or ready(plc), 10, "trigger_ready")
        beat = plc.field("heartbeat")
        # Closed just after a heartbeat: a drop that waits for the next one comes about 5 s later.
        wait(lambda: status(daemon, interval_s=5.0) or plc.field("heartbeat") != beat, 12, "a heartbeat")
        assert ready(plc)
        daemon.pub.close(linger=0)
        gone = time.monotonic()
        wait(lambda: not ready(plc), 15, "trigger_ready to drop with the connection", interval=0.02)
        dropped = time.monotonic() - gone
        assert dropped < 1.5, f"trigger_ready dropped {dropped:.1f} s after the daemon closed its connection"
        beats = {plc.field("heartbeat")}
        for _ in range(20):  # 2 s of a 5 s heartbeat: one beat at most, the closing woke no more of them
            time.sleep(0.1)
            beats.add(plc.field("heartbeat"))
        assert len(beats) <= 2, beats
        wait(lambda: events(bridge, "daemon_silent"), 5, "daemon_silent")
    finally:
        bridge.stop()
    [silent] = events(bridge, "daemon_silent")
    assert silent["connection"] == "closed", silent


def test_a_silent_daemon_drops_trigger_ready_when_the_limit_runs_out_at_a_long_heartbeat_too(plc, daemon, tmp_path):
    """A daemon still connected that publishes nothing (hung): trigger_ready drops once three status intervals (3 s
    here) have passed, not at the first heartbeat after them (5 s here, up to a minute)."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 3000\npoll_ms: 5\nheartbeat_ms: 5000\n")
    bridge = Bridge(daemon, plc, config)
    try:
        wait(lambda: status(daemon) or ready(plc), 10, "trigger_ready")
        beat = plc.field("heartbeat")
        wait(lambda: status(daemon) or plc.field("heartbeat") != beat, 12, "a heartbeat")
        status(daemon)  # the last message, just after a heartbeat: the next one is 5 s away
        sent = time.monotonic()
        wait(lambda: not ready(plc), 15, "trigger_ready to drop once the daemon is silent", interval=0.02)
        dropped = time.monotonic() - sent
        assert 2.9 <= dropped <= 4.0, f"trigger_ready dropped {dropped:.1f} s after the last status"
    finally:
        bridge.stop()
    [silent] = events(bridge, "daemon_silent")
    assert silent["connection"] == "up" and silent["silent_after_s"] == 3.0, silent


def test_a_daemon_never_reached_is_logged_as_no_connection_made(plc, config):
    """--endpoint names a port where nothing listens (a typo, or the daemon not started yet): the silence warning
    must not say the connection is up, which would point at the daemon's publishing instead of the endpoint."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        bridge_command(endpoint, plc, config, "--topic", f"inspect.{STATION}.{CAMERA}."),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out = proc.stdout
    assert out is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(out.readline, "")))
    reader.start()

    def silent() -> list[dict]:
        logged = [json.loads(line) for line in list(lines) if line.startswith("{")]
        return [event for event in logged if event.get("event") == "daemon_silent"]

    try:
        wait(lambda: proc.poll() is None and silent(), 20, "daemon_silent")
        assert not ready(plc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        reader.join(10)
    [told] = silent()
    assert told["since"] == "the start" and told["connection"] == "never made", told


def test_each_camera_whose_results_the_bridge_refuses_is_one_warning_within_a_minute(plc, daemon, config):
    """A bridge taking a whole station serves the first camera it hears (its one block); cam1's results are refused,
    and so are those of cam2, which the daemon gained later: each camera is a warning (its verdicts reach no PLC),
    named once however many results come within the minute."""
    bridge = Bridge(daemon, plc, config, topic=f"inspect.{STATION}.")
    try:
        daemon.result(1)
        wait(lambda: len(plc.received) == 1, 10, "cam0's result 1")
        for seq in (1, 2, 3):
            daemon.result(seq, camera="cam1")
        for seq in (1, 2):
            daemon.result(seq, camera="cam2")
        daemon.result(2)
        wait(lambda: len(plc.received) == 2, 10, "cam0's result 2")
    finally:
        bridge.stop()
    refused = events(bridge, "result_refused")
    assert [event["camera"] for event in refused] == ["cam1", "cam2"], bridge.output()
    assert all(event["level"] == "warning" for event in refused), refused
    assert events(bridge, "bridge_stopped")[0]["other_camera"] == 5


def test_a_camera_refused_for_good_is_told_again_with_the_count_once_per_interval(daemon, monkeypatch):
    """Results of a camera no block serves keep coming (one per part): after the first warning they are told again
    once per REFUSED_LOG_S, with how many were refused since, not once per result and not never again."""
    monkeypatch.setattr(bridge_module, "REFUSED_LOG_S", 0.3)
    router = bridge_module.Router([Handshake(Memory(), HandshakeSettings(), CAMERA)])  # type: ignore[arg-type]

    async def parts() -> None:
        for seq in range(1, 13):
            router.route(decode(daemon.encode(seq, camera="cam1")))
            await asyncio.sleep(0.05)

    with structlog.testing.capture_logs() as logged:
        asyncio.run(parts())
    told = [entry for entry in logged if entry["event"] == "result_refused"]
    assert 2 <= len(told) <= 6, told  # 0.6 s of parts: told at the first and after each 0.3 s, not per result
    assert told[0]["log_level"] == "warning" and told[0]["refused"] == 1 and told[0]["seq"] == 1
    assert told[1]["refused"] >= 2 and sum(entry["refused"] for entry in told) <= 12, told
    assert router.other_camera == 12
