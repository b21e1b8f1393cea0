"""How `inspectd bridge modbus` follows the daemon over a long run: a real bridge subprocess between a real ZeroMQ PUB
socket (tests/plc_peers.py) and a real pymodbus TCP server with its acking scan (tests/test_bridge.py's Plc).

trigger_ready follows the daemon's status messages: the cameras it runs (one it leaves out is not run), the
interval it says they come at (its silence counted against three of them), and a connection whose path died without a
FIN or RST (ZMTP heartbeats give it up, so the bridge reconnects). Each change of the daemon's silence or health is
one log line, and each camera whose results the bridge refuses is named once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pymodbus", reason="the PLC bridge needs the [plc] extra (pymodbus)")
from inspectd.protocol.messages import encode_status  # noqa: E402
from plc_peers import CAMERA, STATION, Daemon, wait  # noqa: E402
from test_bridge import BIT, Bridge, Plc  # noqa: E402

pytestmark = pytest.mark.timeout(90)


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


class Relay:
    """A TCP relay standing for the network between a remote bridge and the daemon's host. `cut` is a path that dies
    without a FIN or RST reaching the bridge (the daemon's host losing power, a firewall dropping its state): the
    daemon's side of each connection is closed, the bridge's side left open, and nothing passes either way any more.
    Connections made after it are relayed again (the network and the daemon are back)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = int(upstream.rsplit(":", 1)[1])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self.connections: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                return  # closed at the end of the test
            up.settimeout(None)
            dead = threading.Event()
            self.connections.append((down, up, dead))
            self.accepted += 1
            for source, sink in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(source, sink, dead), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, dead: threading.Event) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                if not dead.is_set():
                    sink.close()
                return
            if dead.is_set():
                continue  # what the bridge sends (its heartbeats) goes nowhere, and nothing comes back
            try:
                sink.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        for _, up, dead in self.connections:
            dead.set()
            up.close()

    def close(self) -> None:
        self.listener.close()
        for down, up, _ in self.connections:
            down.close()
            up.close()


def test_a_remote_bridge_whose_path_to_the_daemon_died_silently_reconnects_once_it_is_back(plc, daemon, config):
    """The daemon's host loses power and comes back: the bridge's connection stays open on its side, and nothing
    comes through it again. Its unanswered heartbeats give it up and the bridge connects anew, so the daemon's status
    raises trigger_ready again and its next result reaches the PLC, without restarting the bridge."""
    relay = Relay(daemon.endpoint)

    class Remote:  # the daemon as the bridge reaches it: through the relay
        endpoint = relay.endpoint
        status = daemon.status

    try:
        bridge = Bridge(Remote, plc, config)  # type: ignore[arg-type]
        try:
            before = relay.accepted
            relay.cut()
            cut = time.monotonic()
            wait(lambda: relay.accepted > before, 15, "the bridge to connect anew", interval=0.1)
            wait(lambda: daemon.status() or ready(plc), 10, "trigger_ready from the daemon, heard again")
            assert time.monotonic() - cut < 15
            daemon.result(1)
            wait(lambda: [r["id"] for r in plc.received] == [1], 10, "result 1 on the PLC")
        finally:
            bridge.stop()
    finally:
        relay.close()


def test_each_camera_whose_results_the_bridge_refuses_is_logged_once(plc, daemon, config):
    """A bridge taking a whole station serves the first camera it hears (its one block); cam1's results are refused,
    and so are those of cam2, which the daemon gained later: each camera is named once, however many results."""
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
    assert [event["camera"] for event in events(bridge, "result_refused")] == ["cam1", "cam2"], bridge.output()
    assert events(bridge, "bridge_stopped")[0]["other_camera"] == 5
