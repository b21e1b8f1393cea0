"""`inspectd bridge opcua` as a real subprocess between a real ZeroMQ PUB socket and a real asyncua peer on loopback.

Server mode: the bridge serves the variables and the test's PLC is an asyncua client whose scan loop acknowledges.
Client mode: the test's PLC is an asyncua server declaring the variables with PLC-style types, and its program
(reading its own memory) acknowledges. Both sides are restarted; Basic256Sha256 SignAndEncrypt is tried with
certificates made here.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog.testing

pytest.importorskip("asyncua", reason="the OPC UA bridge needs the [plc] extra (asyncua)")
import asyncua  # noqa: E402
from asyncua import ua  # noqa: E402
from asyncua.sync import Client, Server  # noqa: E402

from inspectd.clients import opcua_cache  # noqa: E402
from inspectd.clients.opcua import NAMES, parse_opcua_config  # noqa: E402
from inspectd.clients.opcua_cache import LOCK, MANIFEST, PREFIX, SHELF, Cache, Unusable, init_server, versions  # noqa: E402
from inspectd.errors import ConfigError  # noqa: E402
from plc_peers import CAMERA, STATION, Daemon, wait  # noqa: E402
from ports import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)
CAMERAS = (CAMERA, "cam1")
VAR = {name: browse for name, (browse, _) in NAMES.items()}


def node_id(index: int, camera: str, name: str) -> str:
    return f"ns={index};s={camera}.{VAR[name]}"


class Bridge:
    def __init__(
        self,
        daemon: Daemon,
        args: list[str],
        ready,
        topic: str = f"inspect.{STATION}.",
        exec_under: tuple[str, ...] = (),
        up_s: float = 30,
    ) -> None:
        self.proc = subprocess.Popen(
            [*exec_under, sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", daemon.endpoint]
            + ["--topic", topic, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

        def up():
            assert self.proc.poll() is None, self.proc.stdout.read()
            daemon.status()
            return ready()

        try:
            wait(up, up_s, "the bridge to come up and see the daemon (TriggerReady)", interval=0.1)
        except BaseException:
            # A bridge left running would keep its cache directory's lock: every later bridge of this worker on the
            # shared cache would build in memory, slower, and miss its own start timeout in turn.
            self.proc.kill()
            self.proc.communicate()
            raise

    def stop(self) -> dict[str, dict]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        self.out = out
        assert self.proc.returncode == 0, out
        events = {}
        for event in self.events():
            events[event["event"]] = event
        assert "bridge_stopped" in events, out
        return events

    def events(self, name: str | None = None) -> list[dict]:
        """The log lines of a stopped bridge, in order; only those of event `name` when given."""
        events = [json.loads(line) for line in self.out.splitlines() if line.startswith("{")]
        return [event for event in events if name is None or event["event"] == name]


class PlcProgram:
    """A PLC scan loop: per camera, on ResultValid with an id not consumed yet, latch the result and write Ack."""

    def __init__(self, read, write, cameras=CAMERAS) -> None:
        self.read, self.write = read, write
        self.cameras = cameras
        self.received: dict[str, list[dict]] = {camera: [] for camera in cameras}
        self.acking = threading.Event()
        self.acking.set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._scan, daemon=True)
        self.thread.start()

    def _scan(self) -> None:
        last: dict[str, int | None] = {camera: None for camera in self.cameras}
        while not self._stop.is_set():
            for camera in self.cameras:
                try:
                    valid = self.read(camera, "result_valid")
                    inspection_id = self.read(camera, "inspection_id")
                    if not valid or inspection_id == last[camera] or not self.acking.is_set():
                        continue
                    record = {
                        name: self.read(camera, name)
                        for name in ("verdict", "result_code", "score", "threshold", "region_count", "model_id")
                    }
                    record.update(id=inspection_id, **{f: self.read(camera, f) for f in ("pass", "fail", "defect")})
                except Exception:  # noqa: BLE001 - the bridge's server restarting under the scan
                    time.sleep(0.05)
                    continue
                self.received[camera].append(record)
                self.write(camera, "ack", inspection_id)
                last[camera] = inspection_id
            time.sleep(0.005)

    def ids(self, camera: str = CAMERA) -> list[int]:
        return [r["id"] for r in self.received[camera]]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


class PlcClient:
    """The PLC or MES side in server mode: an asyncua client on the bridge's server."""

    def __init__(self, url: str, security: str | None = None) -> None:
        self.client = Client(url, timeout=5)
        self.client.application_uri = "urn:test:plc"
        try:
            if security:
                self.client.set_security_string(security)
            self.client.connect()
        except BaseException:
            self.client.tloop.stop()  # the sync client's event-loop thread, which would keep pytest from exiting
            raise
        self.index = self.client.get_namespace_index("urn:inspectd:bridge")
        self.nodes: dict[tuple[str, str], object] = {}
        self.program: PlcProgram | None = None

    def node(self, camera: str, name: str):
        key = (camera, name)
        if key not in self.nodes:
            self.nodes[key] = self.client.get_node(node_id(self.index, camera, name))
        return self.nodes[key]

    def read(self, camera: str, name: str):
        return self.node(camera, name).read_value()

    def write(self, camera: str, name: str, value) -> None:
        kind = ua.VariantType.Boolean if name == "alarm_reset" else ua.VariantType.UInt32
        self.node(camera, name).write_value(ua.DataValue(ua.Variant(value, kind)))

    def run_program(self) -> PlcProgram:
        self.program = PlcProgram(self.read, self.write)
        return self.program

    def close(self) -> None:
        if self.program is not None:
            self.program.stop()
        self.client.disconnect()


@pytest.fixture
def daemon():
    publisher = Daemon()
    yield publisher
    publisher.close()


def write_config(tmp_path: Path, text: str = "", ack_timeout_ms: int = 5000) -> Path:
    path = tmp_path / "opcua.yaml"
    # A generous ack timeout: on a loaded CI machine the PLC loop may take a while to ack, which must not count.
    path.write_text(f"ack_timeout_ms: {ack_timeout_ms}\npoll_ms: 5\nheartbeat_ms: 100\ncameras: [cam0, cam1]\n" + text)
    return path


def server_bridge(
    daemon, tmp_path, port, extra=(), config_text="", exec_under=(), cache: Path | None = None, ack_timeout_ms=5000
):
    """A server-mode bridge, up; its standard address space from `cache` (default: this test process's)."""
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    args = ["--config", str(write_config(tmp_path, config_text, ack_timeout_ms)), "--opcua", url]
    args += ["--state-file", str(tmp_path / "state.json"), "--cache-dir", str(cache or ASPACE_CACHE[0]), *extra]
    probe: list[PlcClient] = []

    def ready():
        try:
            if not probe:
                probe.append(PlcClient(url))
            return probe[0].read(CAMERA, "trigger_ready")
        except Exception:  # noqa: BLE001 - not listening yet
            probe.clear()
            return False

    bridge = Bridge(daemon, args, ready, exec_under=exec_under, up_s=60)  # a start may build the cache
    probe[0].close()
    return bridge, url


def test_server_mode_hands_every_camera_its_results_and_survives_both_restarts(daemon, tmp_path):
    """Results reach the PLC side across a restart of either side. A restarted bridge resumes after the id in its
    state file: the daemon publishes each seq once, so after the restart it sends fresh seqs only (none is skipped
    as stale), and one it published while the bridge was down is counted as the gap it is, not as a new start."""
    port = free_port()
    bridge, url = server_bridge(daemon, tmp_path, port)
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        for seq in range(1, 7):
            verdict = ("ok", "defect", "error")[seq % 3]
            daemon.result(seq, verdict, score=seq / 10, regions=2 if verdict == "defect" else 0)
            daemon.result(100 + seq, camera="cam1", score=0.1)
        wait(lambda: len(program.ids()) == 6 and len(program.ids("cam1")) == 6, 20, "six results per camera")
        assert program.ids() == [1, 2, 3, 4, 5, 6] and program.ids("cam1") == list(range(101, 107))
        first = program.received[CAMERA][0]  # seq 1: defect
        assert first["verdict"] == "defect" and first["result_code"] == 1 and first["region_count"] == 2
        assert first["score"] == pytest.approx(0.1) and first["threshold"] == pytest.approx(0.5)
        assert first["model_id"] == "m" and (first["pass"], first["fail"], first["defect"]) == (False, True, True)
        error = program.received[CAMERA][1]  # seq 2: error, no score
        assert error["verdict"] == "error" and error["result_code"] == 2 and error["score"] == 0.0
        wait(lambda: not plc.read(CAMERA, "result_valid"), 5, "ResultValid to fall after the last ack")
        assert plc.read(CAMERA, "sequence_gaps") == 0 and not plc.read(CAMERA, "alarm")
        beat = plc.read(CAMERA, "heartbeat")
        wait(lambda: plc.read(CAMERA, "heartbeat") > beat, 5, "the heartbeat to move")

        # The PLC side restarts (a new session); the bridge keeps serving and the next result reaches it.
        plc.close()
        plc = PlcClient(url)
        program = plc.run_program()
        daemon.result(7)
        wait(lambda: program.ids() == [7], 10, "result 7 after the PLC reconnected")
    finally:
        plc.close()
        events = bridge.stop()
    assert events["bridge_stopped"]["written"] == 13

    # The bridge restarts: the state file holds the last ids (the PLC sees 7 again, ResultValid down) and the bridge
    # resumes after them. Result 8 is published while it is down (no journal here): the PLC never gets it, so 9 is a
    # gap of exactly one, which a bridge that did not resume after 7 would count otherwise.
    daemon.result(8)
    bridge, url = server_bridge(daemon, tmp_path, port)
    plc = PlcClient(url)
    try:
        assert plc.read(CAMERA, "inspection_id") == 7 and not plc.read(CAMERA, "result_valid")
        program = plc.run_program()
        for seq in (9, 10):
            daemon.result(seq)
        wait(lambda: program.ids() == [9, 10], 10, "the fresh results 9 and 10")
        time.sleep(0.3)
        assert program.ids() == [9, 10] and plc.read(CAMERA, "sequence_gaps") == 1 and plc.read(CAMERA, "alarm")
    finally:
        plc.close()
        events = bridge.stop()
    stopped = events["bridge_stopped"]
    assert stopped["written"] == 2 and stopped["sequence_gaps"] == 1, stopped
    assert "resume_ahead_of_daemon" not in events and "sequence_backwards" not in events, bridge.out


@pytest.mark.parametrize("cache", ["loaded", "built"])
def test_server_mode_serves_the_plc_under_the_bridge_units_seccomp_restrictions(daemon, tmp_path, cache):
    """The bridge unit's call filter, W^X memory and address families, set up as systemd sets them up
    (tests/unit_sandbox.py): ZeroMQ in, an OPC UA server out, a clean stop; with its address space loaded from the
    cache, and built into an empty cache directory (the first start of a unit), which the filter lets it write."""
    sandbox = (sys.executable, "-m", "tests.unit_sandbox", str(REPO / "systemd" / "inspectd-bridge@.service"))
    fresh = tmp_path / "cache" if cache == "built" else None
    bridge, url = server_bridge(daemon, tmp_path, free_port(), exec_under=sandbox, cache=fresh)
    plc = PlcClient(url)
    try:
        with open(f"/proc/{bridge.proc.pid}/status") as status:
            assert "Seccomp:\t2" in status.read()  # the bridge itself runs filtered
        program = plc.run_program()
        for seq in range(1, 5):
            daemon.result(seq, ("ok", "defect")[seq % 2])
        wait(lambda: program.ids() == [1, 2, 3, 4], 20, "four results")
    finally:
        plc.close()
        events = bridge.stop()
    assert events["bridge_stopped"]["written"] == 4
    (loaded,) = bridge.events("address_space_loaded")
    assert loaded["source"] == ("built" if fresh else "cache"), bridge.out
    assert not [e for e in bridge.events() if e["event"].startswith("address_space_cache")], bridge.out
    if fresh:
        assert {MANIFEST, SHELF} <= set(shelf_files(fresh)), bridge.out


def test_server_mode_counts_seq_0_unacked_and_a_result_unacked_at_a_kill_as_a_gap_after_the_restart(daemon, tmp_path):
    """A fresh server's Ack is 0, as is the daemon's first seq: that is no ack. And the variables die with the
    bridge: a result that had no ack yet when the bridge was killed must not be recorded as handed over, or the
    restart resumes after it and the MES never hears of it; the restart shows the id before it and counts it as the
    gap it is (a --journal would replay it)."""
    port = free_port()
    bridge, url = server_bridge(daemon, tmp_path, port, ack_timeout_ms=3000)
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        program.acking.clear()  # the MES reads nothing yet
        daemon.result(0)
        wait(lambda: plc.read(CAMERA, "missed_acks") == 1, 10, "seq 0 to count as a missed ack")
        assert plc.read(CAMERA, "alarm") and not plc.read(CAMERA, "result_valid")
        program.acking.set()
        daemon.result(1)
        wait(lambda: program.ids() == [1], 10, "result 1 consumed")
        wait(lambda: not plc.read(CAMERA, "result_valid"), 10, "the falling edge after the ack of 1")
        program.acking.clear()
        daemon.result(2)
        wait(lambda: plc.read(CAMERA, "inspection_id") == 2 and plc.read(CAMERA, "result_valid"), 10, "2 on display")
    finally:
        bridge.proc.kill()
        bridge.proc.communicate(timeout=10)
        plc.close()
    assert json.loads((tmp_path / "state.json").read_text())[CAMERA]["inspection_id"] == 1

    bridge, url = server_bridge(daemon, tmp_path, port, ack_timeout_ms=3000)
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        assert plc.read(CAMERA, "inspection_id") == 1  # the id resumed after, not the one that was never acked
        daemon.result(3)
        wait(lambda: program.ids() == [3], 10, "result 3 after the restart")
        assert plc.read(CAMERA, "sequence_gaps") == 1 and plc.read(CAMERA, "alarm")
    finally:
        plc.close()
        events = bridge.stop()
    assert events["bridge_stopped"]["sequence_gaps"] == 1, bridge.out


def test_server_mode_catches_up_from_the_journal_after_a_restart(daemon, tmp_path):
    from inspectd.daemon.journal import Journal

    journal_dir = tmp_path / "journal"
    journal = Journal(journal_dir, max_bytes=1 << 20, fsync_interval_s=3600)  # flushed by hand: no syncer spinning
    port = free_port()
    bridge, url = server_bridge(daemon, tmp_path, port, extra=["--journal", str(journal_dir)])
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        for seq in (1, 2):
            journal.append(CAMERA, seq, daemon.encode(seq))
            daemon.result(seq)
        wait(lambda: program.ids() == [1, 2], 10, "results 1 and 2")
    finally:
        plc.close()
        bridge.stop()
    journalled = {seq: daemon.encode(seq, "defect" if seq == 4 else "ok") for seq in (3, 4, 5)}
    for seq, frames in journalled.items():  # published while the bridge was down: only the journal has them
        journal.append(CAMERA, seq, frames)
    journal.flush()
    bridge, url = server_bridge(daemon, tmp_path, port, extra=["--journal", str(journal_dir)])
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        # 4 again, as journalled: a live copy of what was replayed is no news (and no backwards seq)
        daemon.pub.send_multipart(journalled[4])
        daemon.result(6)
        wait(lambda: program.ids() == [3, 4, 5, 6], 15, "3..5 from the journal, then 6 live")
        assert program.received[CAMERA][1]["verdict"] == "defect"
        assert plc.read(CAMERA, "sequence_gaps") == 0 and not plc.read(CAMERA, "alarm")
    finally:
        plc.close()
        events = bridge.stop()
        journal.close()
    assert events["journal_caught_up"]["results"] == 3


def test_alarms_gap_drift_and_an_unhealthy_daemon(daemon, tmp_path):
    port = free_port()
    bridge, url = server_bridge(daemon, tmp_path, port)
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        for seq in (1, 2, 5):
            daemon.result(seq, score=0.1)
        wait(lambda: program.ids() == [1, 2, 5], 10, "results 1, 2, 5")
        wait(lambda: plc.read(CAMERA, "alarm"), 5, "the alarm latched by the gap")
        assert plc.read(CAMERA, "sequence_gaps") == 2 and not plc.read(CAMERA, "drift")
        plc.write(CAMERA, "alarm_reset", True)
        wait(lambda: not plc.read(CAMERA, "alarm"), 5, "the alarm reset")
        for seq in range(6, 10):  # scores close to the threshold are no drift by themselves: the daemon decides
            daemon.result(seq, score=0.45)
        wait(lambda: program.ids()[-1:] == [9], 10, "results 6..9")
        assert not plc.read(CAMERA, "drift")
        daemon.status(cameras={CAMERA: {"drift": {"active": True, "alarm": True}}, "cam1": {"drift": {}}})
        wait(lambda: plc.read(CAMERA, "drift"), 10, "Drift once the daemon's status reports the camera's drift alarm")
        assert not plc.read("cam1", "drift")
        daemon.status(cameras={CAMERA: {"drift": {"active": True, "alarm": False}}})
        wait(lambda: not plc.read(CAMERA, "drift"), 10, "Drift clears with the daemon's alarm")
        assert not plc.read(CAMERA, "false_reject_warning")
        daemon.status(cameras={CAMERA: {"drift": {"active": True, "alarm": False, "false_reject_warning": True}}})
        wait(lambda: plc.read(CAMERA, "false_reject_warning"), 10, "FalseRejectWarning with the daemon's warning")
        assert not plc.read(CAMERA, "drift") and not plc.read("cam1", "false_reject_warning")
        daemon.status(cameras={CAMERA: {"drift": {"active": True, "alarm": False, "false_reject_warning": False}}})
        wait(lambda: not plc.read(CAMERA, "false_reject_warning"), 10, "FalseRejectWarning clears with the warning")
        for _ in range(3):
            daemon.status(healthy=False)
            time.sleep(0.1)
        wait(lambda: plc.read(CAMERA, "daemon_unhealthy"), 5, "DaemonUnhealthy")
        assert not plc.read(CAMERA, "trigger_ready")
        daemon.status(healthy=True)
        wait(lambda: plc.read(CAMERA, "trigger_ready") and not plc.read(CAMERA, "daemon_unhealthy"), 5, "recovery")
    finally:
        plc.close()
        bridge.stop()


def test_server_mode_goes_on_when_the_state_file_cannot_be_written(daemon, tmp_path):
    # A state file that cannot be replaced (here a directory in its place; on a line, a full disk or a read-only
    # remount) must not cost the line its verdicts: the bridge says so once and keeps the state in memory.
    bridge, url = server_bridge(daemon, tmp_path, free_port())
    state = tmp_path / "state.json"
    state.mkdir()  # read at start already; nothing handed over yet, so nothing written
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        for seq in (1, 2, 3):
            daemon.result(seq)
            daemon.result(100 + seq, camera="cam1")
        wait(lambda: program.ids() == [1, 2, 3] and program.ids("cam1") == [101, 102, 103], 20, "every result")
        daemon.result(5)  # a gap: the alarm it latches is state too
        wait(lambda: program.ids()[-1:] == [5] and plc.read(CAMERA, "alarm"), 10, "result 5 and the alarm")
    finally:
        plc.close()
        events = bridge.stop()
    assert events["bridge_stopped"]["written"] == 7
    failed = [json.loads(line) for line in bridge.out.splitlines() if '"state_write_failed"' in line]
    assert len(failed) == 1 and failed[0]["path"] == str(state), bridge.out
    assert "Is a directory" in failed[0]["error"], failed


def test_a_second_server_bridge_on_the_same_state_file_is_refused_in_one_line(daemon, tmp_path):
    # Two bridges rewriting one state file from their own memories would undo each other's inspection ids.
    bridge, url = server_bridge(daemon, tmp_path, free_port())
    try:
        second = subprocess.run(
            [sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", daemon.endpoint, "--camera", CAMERA,
             "--opcua", f"opc.tcp://127.0.0.1:{free_port()}/inspectd/", "--state-file", str(tmp_path / "state.json")],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"state_file {tmp_path / 'state.json'}: another bridge uses it" in lines[0], lines
        plc = PlcClient(url)
        program = plc.run_program()
        try:
            daemon.result(1)
            wait(lambda: program.ids() == [1], 20, "the first bridge still serving")
        finally:
            plc.close()
    finally:
        bridge.stop()


def what_a_client_sees(url: str) -> dict:
    """What a PLC or MES on the bridge's server sees of the standard address space and of the bridge's own nodes
    (their names, types and access; not their values, which the results change), less what changes by the second."""
    plc = PlcClient(url)
    try:
        client = plc.client

        def names(node) -> list[str]:
            return sorted(child.read_browse_name().to_string() for child in node.get_children())

        status = client.get_node(ua.ObjectIds.Server_ServerStatus).read_value()
        build = status.BuildInfo
        seen: dict = {
            "namespaces": client.get_namespace_array(),
            "servers": client.get_node(ua.ObjectIds.Server_ServerArray).read_value(),
            "state": status.State,
            "build": (build.ProductUri, build.ManufacturerName, build.ProductName, build.SoftwareVersion),
            "objects": names(client.nodes.objects),
            "server": names(client.get_node(ua.ObjectIds.Server)),
            "types": names(client.nodes.base_data_type),
            "limits": client.get_node(
                ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead
            ).read_value(),
        }
        for camera in CAMERAS:
            folder = client.nodes.objects.get_child([f"{plc.index}:inspectd", f"{plc.index}:{camera}"])
            seen[camera] = sorted(
                (
                    node.read_browse_name().to_string(),
                    node.read_data_type().to_string(),
                    node.read_attribute(ua.AttributeIds.AccessLevel).Value.Value,
                )
                for node in folder.get_children()
            )
    finally:
        plc.close()
    return seen


def shelf_files(cache: Path) -> dict[str, tuple[int, int]]:
    """Each file of the cached shelf: (inode, mtime in ns), which a start that only reads it leaves as they are."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in cache.glob(f"{PREFIX}*/*")}


def cache_copy(tmp_path: Path) -> Path:
    """A copy of this test process's address-space cache, for a test to damage."""
    cache = tmp_path / "cache"
    shutil.copytree(ASPACE_CACHE[0], cache, ignore=shutil.ignore_patterns(LOCK))
    return cache


def hand_over_one(daemon, url: str, seq: int) -> None:
    plc = PlcClient(url)
    program = plc.run_program()
    try:
        daemon.result(seq)
        wait(lambda: program.ids() == [seq], 20, f"result {seq}")
    finally:
        plc.close()


def served_one(daemon, tmp_path, cache: Path) -> Bridge:
    """A server-mode bridge on `cache` that hands one result over and is stopped: its log, to read what it said."""
    bridge, url = server_bridge(daemon, tmp_path, free_port(), cache=cache)
    try:
        hand_over_one(daemon, url, 1)
    finally:
        bridge.stop()
    return bridge


def test_server_mode_builds_its_address_space_cache_once_and_loads_it_from_the_next_start(daemon, tmp_path):
    """The first start builds the standard address space and writes it into the cache; the next loads it from there
    without rewriting it, and what a client sees of the server is the same either way."""
    cache = tmp_path / "cache"  # not there yet: the bridge makes it
    port = free_port()
    bridge, url = server_bridge(daemon, tmp_path, port, cache=cache)
    try:
        built = what_a_client_sees(url)
        hand_over_one(daemon, url, 1)
    finally:
        bridge.stop()
    (loaded,) = bridge.events("address_space_loaded")
    assert loaded["source"] == "built" and loaded["path"] == str(
        cache / f"{PREFIX}asyncua-{versions()['asyncua']}-py{versions()['python']}"
    )
    files = shelf_files(cache)
    assert {MANIFEST, SHELF} <= set(files), files
    manifest = json.loads((Path(loaded["path"]) / MANIFEST).read_text())
    assert {manifest["asyncua"], manifest["python"]} == set(versions().values()) and set(manifest["files"]) == set(
        files
    ) - {MANIFEST}

    bridge, url = server_bridge(daemon, tmp_path, port, cache=cache)
    try:
        cached = what_a_client_sees(url)
        hand_over_one(daemon, url, 2)
    finally:
        events = bridge.stop()
    (loaded,) = bridge.events("address_space_loaded")
    assert loaded["source"] == "cache", bridge.out
    assert shelf_files(cache) == files  # read, not rewritten
    assert not [e for e in bridge.events() if e["event"].startswith("address_space_cache")], bridge.out
    assert events["bridge_stopped"]["written"] == 1
    assert cached == built
    assert cached["namespaces"][-1] == "urn:inspectd:bridge", cached
    assert cached["namespaces"].index("urn:inspectd:bridge") == 1, cached  # PLC.md: ns=1 with the defaults
    assert {name.split(":")[1] for name, *_ in cached[CAMERA]} == set(VAR.values()), cached


def test_a_damaged_address_space_cache_is_rebuilt_with_one_warning_and_the_bridge_serves(daemon, tmp_path):
    """A shelf cut short (a disk that filled, a copy that stopped) is found at start by its manifest's sha256, never
    later by a client's read. What earlier runs left goes: a build a kill cut short, another asyncua version's shelf
    (which is not loaded: the bridge builds its own)."""
    cache = cache_copy(tmp_path)
    (shelf_dir,) = cache.glob(f"{PREFIX}*")
    older = cache / shelf_dir.name.replace(versions()["asyncua"], "0.9.9")
    shutil.copytree(shelf_dir, older)
    manifest = json.loads((older / MANIFEST).read_text())
    (older / MANIFEST).write_text(json.dumps(manifest | {"asyncua": "0.9.9"}))
    data = max(shelf_dir.iterdir(), key=lambda path: path.stat().st_size)  # the pickled nodes
    size = data.stat().st_size
    os.truncate(data, size // 2)
    leftover = cache / f".{PREFIX}killed.tmp"
    leftover.mkdir()
    (leftover / SHELF).write_bytes(b"half")
    bridge = served_one(daemon, tmp_path, cache)
    (warning,) = bridge.events("address_space_cache_rebuilt")
    assert warning["level"] == "warning" and warning["path"] == str(shelf_dir), warning
    assert f"{data.name}: changed since it was written" in warning["reason"], warning
    (loaded,) = bridge.events("address_space_loaded")
    assert loaded["source"] == "built" and not bridge.events("address_space_cache_unused"), bridge.out
    assert data.stat().st_size == size
    assert sorted(p.name for p in cache.iterdir()) == sorted([LOCK, shelf_dir.name])


def test_an_address_space_cache_of_another_asyncua_version_is_not_loaded(tmp_path):
    """asyncua's pickled nodes are its own classes: a shelf another version wrote is refused (and rebuilt, as the
    damaged one above) even under this version's name, copied or renamed there."""
    cache = cache_copy(tmp_path)
    (shelf_dir,) = cache.glob(f"{PREFIX}*")
    manifest = json.loads((shelf_dir / MANIFEST).read_text())
    (shelf_dir / MANIFEST).write_text(json.dumps(manifest | {"asyncua": "0.9.9"}))
    found = Cache(cache)
    try:
        with structlog.testing.capture_logs() as logs:
            found.take()
            assert found.usable() is None
    finally:
        if found.lock is not None:
            os.close(found.lock)
    (warning,) = logs
    expected = f"written for asyncua 0.9.9, expected {versions()['asyncua']}"
    assert warning["event"] == "address_space_cache_rebuilt" and warning["reason"] == expected, warning
    assert not shelf_dir.exists()


def test_the_address_space_cache_defaults_to_systemds_cache_directory_and_an_empty_option_turns_it_off(
    tmp_path, monkeypatch
):
    import argparse

    from inspectd.clients.opcua import configure

    def cache_dir(option: str | None, state: str) -> str | None:
        options = {"config": None, "mode": None, "opcua": None, "camera": [CAMERA], "topic": f"inspect.{STATION}."}
        options |= {"state_file": str(tmp_path / state), "cache_dir": option}  # a state file each: configure locks it
        return configure(argparse.Namespace(**options)).cache_dir

    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)  # a test run under a unit with CacheDirectory= has it
    assert cache_dir(None, "a.json") == ""  # neither: built in memory, as before there was a cache
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/inspectd-bridge/opcua")
    assert cache_dir(None, "b.json") == "/var/cache/inspectd-bridge/opcua"
    assert cache_dir("/srv/cache", "c.json") == "/srv/cache" and cache_dir("", "d.json") == ""
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/a:/var/cache/b")  # systemd's join of several entries
    assert cache_dir(None, "e.json") == "/var/cache/a"


def test_an_address_space_cache_that_cannot_be_used_is_one_warning_and_the_bridge_serves(daemon, tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    bridge = served_one(daemon, tmp_path, cache)
    (warning,) = bridge.events("address_space_cache_unused")
    assert warning["cache"] == str(cache) and "expected a directory" in warning["error"], warning
    assert not bridge.events("address_space_loaded") and not bridge.events("address_space_cache_rebuilt")


@pytest.fixture
def server_init(monkeypatch):
    """init_server in this process, without its seconds of CPU where a test is about what the cache chooses:
    asyncua's Server.init is recorded (`calls`: each one's shelf_file, None for the address space built in memory),
    a build in memory is skipped (or raises `in_memory`), loading a shelf fails as on one asyncua cannot read, and
    only building a shelf is real. The cache directories' locks, held for the life of a bridge, are let go after."""
    record = SimpleNamespace(calls=[], in_memory=None)
    original = asyncua.Server.init

    async def init(self, shelf_file=None):
        record.calls.append(shelf_file)
        if shelf_file is None:
            if record.in_memory is not None:
                raise record.in_memory
        elif Path(shelf_file).is_file():
            raise RuntimeError("cannot unpickle node i=84")
        else:
            await original(self, shelf_file)

    locks: list[int] = []
    hold_lock = opcua_cache.hold_lock

    def held(path):
        fd = hold_lock(path)
        if fd is not None:
            locks.append(fd)
        return fd

    monkeypatch.setattr(asyncua.Server, "init", init)
    monkeypatch.setattr(opcua_cache, "hold_lock", held)
    yield record
    for fd in locks:
        os.close(fd)


def init_logged(directory: Path):
    """init_server(directory) in this process: the server and what it logged."""
    with structlog.testing.capture_logs() as logs:
        server = asyncio.run(init_server(directory))
    assert isinstance(server, asyncua.Server)
    return server, logs


def test_a_refused_address_space_cache_this_user_cannot_delete_is_renamed_aside_and_replaced(tmp_path, monkeypatch):
    """A shelf a run as root left (its directory 0700 root: the service user can neither read nor delete it) is
    refused, then renamed aside, which needs write access to the cache directory only: its name is free for the
    rebuilt shelf, and a later start sweeps what is left as far as it can."""
    cache = cache_copy(tmp_path)
    (shelf_dir,) = cache.glob(f"{PREFIX}*")
    (shelf_dir / MANIFEST).write_text("{}")
    found = Cache(cache)
    try:
        with monkeypatch.context() as undeletable, structlog.testing.capture_logs() as logs:
            # The tests run as root, which may delete anything: deleting is made to fail as it would for the user.
            undeletable.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
            found.take()
            assert found.usable() is None
            build = found.begin()
            (build / SHELF).write_bytes(b"rebuilt")
            found.commit(build)
    finally:
        if found.lock is not None:
            os.close(found.lock)
    (warning,) = logs
    assert warning["event"] == "address_space_cache_rebuilt" and warning["path"] == str(shelf_dir), warning
    manifest = json.loads((shelf_dir / MANIFEST).read_text())
    assert manifest["files"] == {SHELF: hashlib.sha256(b"rebuilt").hexdigest()}, manifest
    (aside,) = cache.glob(f".{PREFIX}*.tmp")
    assert (aside / SHELF).is_file()  # the refused shelf, whole: it was renamed, not half deleted
    later = Cache(cache)
    try:
        later.take()
    finally:
        if later.lock is not None:
            os.close(later.lock)
    assert sorted(p.name for p in cache.iterdir()) == sorted([LOCK, shelf_dir.name])


def test_a_refused_address_space_cache_that_cannot_be_renamed_aside_is_one_warning_naming_it(
    tmp_path, monkeypatch, server_init
):
    """Then no shelf could be put in its place: none is built, and the one warning says what to remove."""
    cache = cache_copy(tmp_path)
    (shelf_dir,) = cache.glob(f"{PREFIX}*")
    (shelf_dir / MANIFEST).write_text("{}")
    rename = os.rename

    def refused(src, dst):
        if os.fsdecode(src) == str(shelf_dir):  # dbm renames by bytes
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refused)
    _, logs = init_logged(cache)
    (warning,) = logs
    assert warning["event"] == "address_space_cache_unused" and warning["cache"] == str(cache), warning
    assert f"{shelf_dir}: {MANIFEST}: expected an object" in warning["error"], warning
    assert "cannot be renamed aside" in warning["error"] and "remove it" in warning["error"], warning
    assert server_init.calls == [None] and (shelf_dir / SHELF).is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted([LOCK, shelf_dir.name])


def test_an_address_space_cache_another_bridge_holds_is_one_warning_and_left_as_it_is(tmp_path, server_init):
    cache = cache_copy(tmp_path)
    files = shelf_files(cache)
    Cache(cache).take()  # the other bridge (flock is per open file, so one process can be both)
    with pytest.raises(Unusable, match="another bridge uses it"):
        Cache(cache).take()
    _, logs = init_logged(cache)
    (warning,) = logs
    assert warning["event"] == "address_space_cache_unused" and "another bridge uses it" in warning["error"], warning
    assert server_init.calls == [None] and shelf_files(cache) == files


def test_an_address_space_cache_asyncua_cannot_load_is_rebuilt_with_one_warning(tmp_path, server_init):
    """A shelf whose files are the ones written, which asyncua still fails on (a bug, a pickle of a class it no longer
    has): refused and rebuilt at this start, as one that fails the checks."""
    cache = cache_copy(tmp_path)
    (shelf_dir,) = cache.glob(f"{PREFIX}*")
    _, logs = init_logged(cache)
    rebuilt, loaded = logs
    assert rebuilt["event"] == "address_space_cache_rebuilt", logs
    assert rebuilt["reason"] == "asyncua could not load it (RuntimeError: cannot unpickle node i=84)", rebuilt
    assert loaded["event"] == "address_space_loaded" and loaded["source"] == "built", logs
    assert server_init.calls[0] == shelf_dir / SHELF and server_init.calls[1].name == SHELF, server_init.calls
    assert Cache(cache)._verify() is None
    assert sorted(p.name for p in cache.iterdir()) == sorted([LOCK, shelf_dir.name])


@pytest.mark.parametrize("failure", ["no asyncua metadata", "a NUL in the path", "refusing it fails"])
def test_an_address_space_cache_failing_in_any_other_way_is_one_warning_and_built_in_memory(
    tmp_path, monkeypatch, server_init, failure
):
    """Nothing about the cache ends the bridge: it only saves time."""
    cache = cache_copy(tmp_path)
    if failure == "no asyncua metadata":  # an asyncua that imports, vendored or frozen, without its dist-info
        version = opcua_cache.metadata.version

        def unknown(name):
            if name == "asyncua":
                raise opcua_cache.metadata.PackageNotFoundError(name)
            return version(name)

        monkeypatch.setattr(opcua_cache.metadata, "version", unknown)
        expected = "asyncua has no package metadata, expected its version to key the shelf by"
    elif failure == "a NUL in the path":  # cache_dir: "\0" in the YAML
        cache = tmp_path / "ca\0che"
        expected = "ValueError: embedded null byte"
    else:  # asyncua fails on a shelf that verified, and so does taking it out of the way

        def refuse(self, reason):
            raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

        monkeypatch.setattr(Cache, "refuse", refuse)
        expected = "PermissionError: [Errno 13] Permission denied"
    _, logs = init_logged(cache)
    (warning,) = logs
    assert warning["event"] == "address_space_cache_unused" and expected in warning["error"], warning
    assert server_init.calls[-1] is None, server_init.calls


def test_the_address_space_built_in_memory_after_an_unusable_cache_may_fail_the_bridge_as_without_one(
    tmp_path, server_init
):
    """The net around the cache is not around the in-memory build: its failure is the bridge's own start failing."""
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    server_init.in_memory = RuntimeError("the address space does not build")
    with pytest.raises(RuntimeError, match="does not build"):
        asyncio.run(init_server(cache))
    assert server_init.calls == [None]


# A PlcServer's event-loop thread is not a daemon thread: one left running by a failed test keeps pytest from exiting.
LIVE_PLC_SERVERS: list[PlcServer] = []


@pytest.fixture(autouse=True)
def _stop_plc_servers():
    yield
    while LIVE_PLC_SERVERS:
        LIVE_PLC_SERVERS[-1].stop()


# Filling a server's standard address space takes seconds of CPU, each time. One bridge address-space cache
# (inspectd.clients.opcua_cache) is built per test process (each worker of a parallel run builds its own), by the
# bridge's code in a child process so that no lock on it stays held here: the bridges server_bridge starts load it,
# and the PLC servers load its shelf through asyncua directly (it marks the shelf where asyncua looks for it).
ASPACE_CACHE: list[Path] = []
ASPACE_SHELF: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _address_space_shelf(tmp_path_factory):
    cache = tmp_path_factory.mktemp("aspace")
    build = (
        "import asyncio, pathlib, sys\n"
        "from inspectd.clients.opcua_cache import init_server\n"
        "asyncio.run(init_server(pathlib.Path(sys.argv[1])))"
    )
    subprocess.run([sys.executable, "-c", build, str(cache)], cwd=REPO, check=True, timeout=120)
    (shelf,) = cache.glob(f"{PREFIX}*/{SHELF}")
    ASPACE_CACHE.append(cache)
    ASPACE_SHELF.append(shelf)
    yield
    ASPACE_CACHE.clear()
    ASPACE_SHELF.clear()


# PLC-style declarations of the client-mode variables: a Siemens-like PLC has DInt ids and Real scores.
PLC_TYPES = {"inspection_id": "Int32", "ack": "Int32", "score": "Float", "threshold": "Float", "result_code": "Int16"}


class PlcServer:
    """The PLC's own OPC UA server (client mode), its variables in ns=2 as "<camera>.<Name>"."""

    def __init__(
        self,
        port: int,
        values: dict | None = None,
        security: tuple[Path, Path, Path] | None = None,
        lacks: tuple[str, ...] = (),
        types: dict[str, str] = PLC_TYPES,
        holds: dict | None = None,
        read_only: tuple[str, ...] = (),
    ) -> None:
        self.types = types
        self.url = f"opc.tcp://127.0.0.1:{port}/plc/"
        self.server = Server(shelf_file=ASPACE_SHELF[0])
        self.server.set_endpoint(self.url)
        if security is None:
            self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:  # the PLC's certificate and key, and a folder of the clients it trusts
            from asyncua.crypto.truststore import TrustStore
            from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

            certificate, key, trusted = security
            self.server.set_application_uri("urn:test:plcserver")
            self.server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            self.server.load_certificate(str(certificate))
            self.server.load_private_key(str(key))
            store = TrustStore([trusted], [])
            self.server.tloop.post(store.load())
            options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
            self.server.aio_obj.set_certificate_validator(CertificateValidator(options, store))
        index = self.server.register_namespace("urn:test:plc")
        assert index == 2
        self.nodes = {}
        folder = self.server.nodes.objects.add_object(ua.NodeId("Inspect", 2), "2:Inspect")
        for camera in CAMERAS:
            for name, (browse, kind) in NAMES.items():
                if name in lacks:  # a PLC program written before the bridge had this variable
                    continue
                kind = types.get(name, kind)
                start = (values or {}).get((camera, name), "" if kind == "String" else 0)
                variant = ua.Variant(bool(start) if kind == "Boolean" else start, getattr(ua.VariantType, kind))
                held = (holds or {}).get((camera, name))
                node = folder.add_variable(
                    ua.NodeId(f"{camera}.{browse}", 2), f"2:{camera}{browse}", variant if held is None else held
                )
                if held is not None:  # a value of another type than the variable declares (the server lets it be)
                    declared = ua.NodeId(getattr(ua.ObjectIds, kind))
                    node.write_attribute(ua.AttributeIds.DataType, ua.DataValue(ua.Variant(declared)))
                # read_only: the PLC program's own outputs, which a PLC may keep from OPC UA clients' writes
                node.set_writable(name not in read_only)
                self.nodes[(camera, name)] = node
        self.server.start()
        LIVE_PLC_SERVERS.append(self)
        self.program: PlcProgram | None = None

    def read(self, camera: str, name: str):
        return self.nodes[(camera, name)].read_value()

    def write(self, camera: str, name: str, value) -> None:
        kind = self.types.get(name, NAMES[name][1])
        self.nodes[(camera, name)].write_value(ua.Variant(value, getattr(ua.VariantType, kind)))

    def run_program(self) -> PlcProgram:
        self.program = PlcProgram(self.read, self.write)
        return self.program

    def snapshot(self) -> dict:
        return {key: node.read_value() for key, node in self.nodes.items()}

    def stop(self) -> None:
        if self not in LIVE_PLC_SERVERS:
            return
        LIVE_PLC_SERVERS.remove(self)
        if self.program is not None:
            self.program.stop()
        self.server.stop()


def client_bridge(daemon, tmp_path, plc: PlcServer, extra=()):
    args = ["--config", str(write_config(tmp_path, "mode: client\n")), "--opcua", plc.url, *extra]
    return Bridge(daemon, args, lambda: plc.read(CAMERA, "trigger_ready"))


def test_client_mode_writes_into_the_plcs_server_and_survives_both_restarts(daemon, tmp_path):
    """Results reach the PLC's own server across a restart of the bridge and of the PLC's server. A restarted bridge
    resumes after the PLC's InspectionId: the daemon publishes each seq once, so what comes after a restart is fresh
    (none is skipped as stale), and a seq published while the bridge was down is a gap of exactly one, which a bridge
    that did not resume after the PLC's id would count otherwise."""
    port = free_port()
    plc = PlcServer(port)
    program = plc.run_program()
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        daemon.result(1, "defect", score=0.75, regions=3)
        daemon.result(2)
        daemon.result(11, camera="cam1")
        wait(lambda: program.ids() == [1, 2] and program.ids("cam1") == [11], 10, "results in the PLC's variables")
        first = program.received[CAMERA][0]
        assert first["verdict"] == "defect" and first["region_count"] == 3 and first["defect"]
        assert first["score"] == pytest.approx(0.75) and first["result_code"] == 1
    finally:
        events = bridge.stop()
    assert events["bridge_stopped"]["written"] == 3
    assert not plc.read(CAMERA, "result_valid") and not plc.read(CAMERA, "trigger_ready")

    # The bridge restarts: it adopts the PLC's InspectionId 2. Result 3 is published while it is down.
    daemon.result(3)
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        for seq in (4, 5):
            daemon.result(seq)
        wait(lambda: program.ids() == [1, 2, 4, 5], 10, "the fresh results 4 and 5")
        time.sleep(0.3)
        assert program.ids() == [1, 2, 4, 5] and plc.read(CAMERA, "alarm")
    finally:
        events = bridge.stop()
    stopped = events["bridge_stopped"]
    assert stopped["written"] == 2 and stopped["sequence_gaps"] == 1, stopped
    assert "resume_ahead_of_daemon" not in events and "sequence_backwards" not in events, bridge.out

    # The PLC's server restarts under a running bridge: the bridge ends with one line (for the service manager),
    # and once the PLC is back (its memory retained) a restarted bridge carries on from where it was.
    bridge = client_bridge(daemon, tmp_path, plc)
    memory = plc.snapshot()
    plc.stop()
    try:
        bridge.proc.wait(20)
    except subprocess.TimeoutExpired:
        bridge.proc.kill()
        raise AssertionError("the bridge kept running without its PLC") from None
    out = bridge.proc.stdout.read()
    assert bridge.proc.returncode == 1 and out.strip().splitlines()[-1].startswith("inspectd bridge: PLC"), out
    assert memory[(CAMERA, "inspection_id")] == 5
    daemon.result(6)  # while the PLC and the bridge are down: lost
    # TriggerReady was up when the memory was taken: cleared, so the next bridge is seen to raise it itself.
    plc = PlcServer(port, values={**memory, (CAMERA, "trigger_ready"): False})
    program = plc.run_program()
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        daemon.result(7)
        daemon.result(8)
        wait(lambda: program.ids() == [7, 8], 10, "results 7 and 8 after the PLC's restart")
    finally:
        events = bridge.stop()
        plc.stop()
    stopped = events["bridge_stopped"]
    assert stopped["written"] == 2 and stopped["sequence_gaps"] == 1, stopped
    assert "resume_ahead_of_daemon" not in events and "sequence_backwards" not in events, bridge.out


def run_bridge(daemon, args: list[str]) -> subprocess.CompletedProcess:
    """A bridge that is expected to stop by itself (a refusal at start), run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", daemon.endpoint, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_client_mode_refuses_a_variable_whose_data_type_does_not_fit_its_role(daemon, tmp_path):
    config = str(write_config(tmp_path, "mode: client\n"))
    # A REAL id is exact only up to 2**24 seqs, a Boolean one always reads 1; a Float heartbeat stops moving.
    for name, kind, expected in [
        ("inspection_id", "Float", "expected an integer type"),
        ("ack", "Boolean", "expected an integer type"),
        ("heartbeat", "Float", "expected an integer type or Double"),
        ("model_id", "Int32", "expected String"),
        ("alarm_reset", "String", "expected Boolean or an integer type"),
        # No scale, as Modbus has: an integer Score or Threshold would read 0 for every real score.
        ("score", "Int16", "expected Float or Double"),
        ("threshold", "UInt32", "expected Float or Double"),
    ]:
        plc = PlcServer(free_port(), types={**PLC_TYPES, name: kind})
        try:
            proc = run_bridge(daemon, ["--config", config, "--opcua", plc.url])
            # Refused before anything was written: the PLC sees no TriggerReady, no heartbeat.
            untouched = not plc.read(CAMERA, "trigger_ready") and plc.read("cam1", "heartbeat") == 0
        finally:
            plc.stop()
        line = f"data type {kind}, {expected}"
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert node_id(2, CAMERA, name) in proc.stderr and line in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr and untouched, proc.stdout

    from inspectd.clients.opcua import ROLE_KINDS

    assert ROLE_KINDS.keys() == NAMES.keys()  # every variable has its data types


def test_client_mode_refuses_a_variable_its_session_may_not_write_before_writing_anything(daemon, tmp_path):
    """Ack and AlarmReset are the PLC program's outputs, which a PLC may keep read-only to OPC UA clients, but the
    bridge writes them too: Ack to reset one left equal to the next id (seq 0 on a fresh PLC), AlarmReset back to
    false. Found only then, the refusal would end the bridge with that result unwritten and in no count (the PLC's
    InspectionId never held it). It is refused at start, in one line, as a variable of a wrong type is."""
    config = str(write_config(tmp_path, "mode: client\n"))
    for name in ("ack", "alarm_reset", "score"):
        plc = PlcServer(free_port(), read_only=(name,))
        try:
            proc = run_bridge(daemon, ["--config", config, "--opcua", plc.url])
            untouched = not plc.read(CAMERA, "trigger_ready") and plc.read("cam1", "heartbeat") == 0
        finally:
            plc.stop()
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        where = f"{node_id(2, CAMERA, name)} ({CAMERA} {VAR[name]})"
        assert f"{where}: user access level CurrentRead, expected CurrentWrite" in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr and untouched, proc.stdout


def test_client_mode_says_in_one_line_when_a_plc_value_is_no_integer(daemon, tmp_path):
    # The variables' data types fit (so the bridge starts), but the value a PLC holds is of another type.
    config = str(write_config(tmp_path, "mode: client\n"))
    for name, held in [("inspection_id", float("inf")), ("alarm", float("nan"))]:  # read at start
        plc = PlcServer(free_port(), holds={(CAMERA, name): ua.Variant(held, ua.VariantType.Double)})
        try:
            proc = run_bridge(daemon, ["--config", config, "--opcua", plc.url])
        finally:
            plc.stop()
        assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert proc.stderr.strip() == (
            f"inspectd bridge: PLC read of {node_id(2, CAMERA, name)} ({CAMERA} {VAR[name]}): expected an integer or "
            f"Boolean, got {held!r}"
        ), proc.stderr

    # An Ack holding a String, read once the first result is handed over. The other variables are of types a PLC
    # may declare besides the server mode's: a numeric Verdict, a Double heartbeat, a UInt16 counter.
    types = {**PLC_TYPES, "verdict": "Int16", "heartbeat": "Double", "missed_acks": "UInt16", "alarm_reset": "Byte"}
    plc = PlcServer(free_port(), types=types, holds={(CAMERA, "ack"): ua.Variant("abc", ua.VariantType.String)})
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        wait(lambda: plc.read(CAMERA, "heartbeat") > 0, 10, "a Double heartbeat")
        daemon.result(1, "defect", regions=1)
        try:
            bridge.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the bridge kept running with an Ack of 'abc'") from None
        out = bridge.proc.stdout.read()
        # The ack is read before the result goes over (one left equal to its id is no ack): nothing was raised.
        assert not plc.read(CAMERA, "result_valid"), out
    finally:
        bridge.proc.kill()
        plc.stop()
    assert bridge.proc.returncode == 1 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1] == (
        f"inspectd bridge: PLC read of {node_id(2, CAMERA, 'ack')} ({CAMERA} Ack): expected an integer or Boolean, "
        "got 'abc'"
    ), out


def test_client_mode_clamps_a_score_past_a_reals_range_and_goes_on(daemon, tmp_path):
    """A finite score no float32 holds cannot be packed into a PLC's Real: the bridge writes the largest one rather
    than stop (and, with a journal, stop again on every restart's replay of it)."""
    plc = PlcServer(free_port())
    program = plc.run_program()
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        daemon.result(1, score=1e39, threshold=-1e300)
        daemon.result(2, score=0.5)
        wait(lambda: program.ids() == [1, 2], 10, "both results in the PLC's Real variables")
    finally:
        events = bridge.stop()
        plc.stop()
    first, second = program.received[CAMERA]
    assert first["score"] == pytest.approx(3.4028234e38, rel=1e-6)
    assert first["threshold"] == pytest.approx(-3.4028234e38, rel=1e-6)
    assert second["score"] == pytest.approx(0.5)
    assert events["bridge_stopped"]["acked"] == 2


def test_client_mode_acks_ids_past_the_width_of_an_s7_int_and_restarts_in_full_seqs(daemon, tmp_path):
    """An S7 "Int" InspectionId/Ack holds seqs modulo 2**15: 40000 is 7232 there, and the PLC echoes 7232.

    After a restart the daemon sends fresh seqs only (it publishes each seq once, so none is skipped as stale); the
    PLC's 7233 is placed at 40001 in full seqs, so the one seq published while the bridge was down is a gap of one,
    not of a wrap's worth, and the acks still match in the narrow width."""
    port = free_port()
    plc = PlcServer(port, types={**PLC_TYPES, "inspection_id": "Int16", "ack": "Int16"})
    program = plc.run_program()
    state = tmp_path / "state"
    bridge = client_bridge(daemon, tmp_path, plc, extra=["--state-dir", str(state)])
    try:
        daemon.result(40000)
        daemon.result(40001)
        wait(lambda: program.ids() == [7232, 7233], 10, "the wrapped ids in the PLC's variables")
    finally:
        events = bridge.stop()
    stopped = events["bridge_stopped"]
    assert stopped["acked"] == 2 and stopped["missed_acks"] == 0, stopped
    assert not plc.read(CAMERA, "alarm")
    assert json.loads((state / "acked.json").read_text())["acked"][CAMERA] == 40001  # recorded in full

    # Restarted without the recorded ack: the PLC's 7233 stands for 40001. 40002 is published while the bridge is
    # down, so 40003 is a gap of exactly one in full seqs.
    daemon.result(40002)
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        daemon.result(40003)
        daemon.result(40004)
        wait(lambda: program.ids() == [7232, 7233, 7235, 7236], 10, "results 40003 and 40004, wrapped")
        assert plc.read(CAMERA, "alarm")  # latched by the gap
    finally:
        events = bridge.stop()
        plc.stop()
    stopped = events["bridge_stopped"]
    assert stopped["acked"] == 2 and stopped["missed_acks"] == 0, stopped
    assert stopped["sequence_gaps"] == 1, stopped
    assert "resume_ahead_of_daemon" not in events and "sequence_backwards" not in events, bridge.out


def test_client_mode_counts_a_narrow_heartbeat_from_1_to_its_top_and_never_writes_0(daemon, tmp_path):
    """A Byte Heartbeat (a PLC's USINT) counts 1..255 and then 1 again: every value, and never 0. At a restart an
    InspectionId of 0 next to a Heartbeat of 0 is a PLC the bridge never wrote to; any other 0 is an id."""
    from asyncua.common.callback import CallbackType

    plc = PlcServer(free_port(), types={**PLC_TYPES, "heartbeat": "Byte"})
    heartbeats = {plc.nodes[(camera, "heartbeat")].nodeid.to_string(): camera for camera in CAMERAS}
    beats: dict[str, list[int]] = {camera: [] for camera in CAMERAS}

    def written(event, _service) -> None:  # every Write the bridge makes, in the PLC server's own loop
        for item, status in zip(event.request_params.NodesToWrite, event.response_params):
            camera = heartbeats.get(item.NodeId.to_string())
            if camera is not None and status.is_good():
                beats[camera].append(item.Value.Value.Value)

    plc.server.aio_obj.subscribe_server_callback(CallbackType.PostWrite, written)
    config = write_config(tmp_path, "mode: client\n")
    config.write_text(config.read_text().replace("heartbeat_ms: 100\n", "heartbeat_ms: 10\n"))
    bridge = Bridge(daemon, ["--config", str(config), "--opcua", plc.url], lambda: plc.read(CAMERA, "trigger_ready"))
    try:
        wait(lambda: all(len(b) >= 300 for b in beats.values()), 60, "300 heartbeats per camera, past the wrap")
        assert plc.read(CAMERA, "heartbeat") != 0
    finally:
        bridge.stop()
        plc.stop()
    for camera, values in beats.items():
        values = list(values)
        assert values[0] == 1 and 0 not in values, (camera, values)
        steps = [(a, b) for a, b in zip(values, values[1:]) if b != a % 255 + 1]
        assert not steps and values[254:256] == [255, 1], (camera, steps, values[250:260])


def test_client_mode_with_a_narrow_id_and_no_recorded_ack_replays_the_journal_at_start(daemon, tmp_path):
    # The PLC's Int16 7233 alone cannot say which wrap it belongs to; the journal's newest seq places it at 40001,
    # so what was journalled after it goes over at start, before the line sends anything live.
    from inspectd.daemon.journal import Journal

    port = free_port()
    values = {(CAMERA, "inspection_id"): 7233, (CAMERA, "ack"): 7233}
    plc = PlcServer(port, values=values, types={**PLC_TYPES, "inspection_id": "Int16", "ack": "Int16"})
    program = plc.run_program()
    journal_dir = tmp_path / "journal"
    journal = Journal(journal_dir, max_bytes=1 << 20, fsync_interval_s=3600)  # flushed by hand: no syncer spinning
    for seq in range(39990, 40005):
        journal.append(CAMERA, seq, daemon.encode(seq))
    journal.flush()
    bridge = client_bridge(daemon, tmp_path, plc, extra=["--journal", str(journal_dir)])
    try:
        wait(lambda: program.ids() == [7234, 7235, 7236], 10, "40002..40004 from the journal")
        daemon.result(40005)
        wait(lambda: program.ids() == [7234, 7235, 7236, 7237], 10, "then 40005 live")
    finally:
        events = bridge.stop()
        plc.stop()
        journal.close()
    stopped = events["bridge_stopped"]
    assert events["journal_resume"]["after"] == {CAMERA: 40001}
    assert stopped["journal_replayed"] == 3 and stopped["sequence_gaps"] == 0 and stopped["missed_acks"] == 0, stopped


def _certificate(directory: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key,
        name,
        {"organizationName": "inspectd tests"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH],
        days=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(dump_private_key_as_pem(key))
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)
    return cert_path, key_path


def test_client_mode_leaves_out_false_reject_warning_when_the_plc_program_lacks_it_but_not_a_required_variable(
    daemon, tmp_path
):
    port = free_port()
    plc = PlcServer(port, lacks=("false_reject_warning",))
    program = plc.run_program()
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        daemon.result(1, "defect", score=0.75)
        daemon.result(2)
        wait(lambda: program.ids() == [1, 2], 10, "results in a PLC program without FalseRejectWarning")
    finally:
        events = bridge.stop()
        plc.stop()
    assert events["bridge_stopped"]["written"] == 2

    plc = PlcServer(free_port(), lacks=("drift",))
    try:
        args = ["--config", str(write_config(tmp_path, "mode: client\n")), "--opcua", plc.url]
        proc = subprocess.run(
            [sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", daemon.endpoint, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        plc.stop()
    assert proc.returncode != 0 and f"{CAMERA}.Drift" in proc.stdout + proc.stderr


def test_basic256sha256_sign_and_encrypt_lets_only_trusted_clients_in(daemon, tmp_path):
    bridge_cert, bridge_key = _certificate(tmp_path / "pki", "bridge", "urn:inspectd:bridge", server=True)
    plc_cert, plc_key = _certificate(tmp_path / "pki", "plc", "urn:test:plc", server=False)
    stranger_cert, stranger_key = _certificate(tmp_path / "pki", "stranger", "urn:test:plc", server=False)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "plc.der").write_bytes(plc_cert.read_bytes())
    security = (
        f"security:\n  certificate: {bridge_cert}\n  private_key: {bridge_key}\n  trusted: {trusted}\n"
        "  policy: Basic256Sha256\n  mode: SignAndEncrypt\n"
    )
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    secure = f"Basic256Sha256,SignAndEncrypt,{plc_cert},{plc_key},{bridge_cert}"
    probe: list[PlcClient] = []

    def ready():
        try:
            if not probe:
                probe.append(PlcClient(url, secure))
            return probe[0].read(CAMERA, "trigger_ready")
        except Exception:  # noqa: BLE001 - not listening yet
            probe.clear()
            return False

    args = ["--config", str(write_config(tmp_path, security)), "--opcua", url]
    bridge = Bridge(daemon, args + ["--state-file", str(tmp_path / "state.json")], ready)
    plc = probe[0]
    try:
        program = plc.run_program()
        daemon.result(1, "defect", regions=1)
        wait(lambda: program.ids() == [1], 10, "the result over a signed and encrypted channel")
        with pytest.raises(Exception):  # noqa: B017 - asyncua refuses in several ways; any refusal will do
            PlcClient(url)  # no security: the endpoint is not offered
        with pytest.raises(Exception):  # noqa: B017
            PlcClient(url, f"Basic256Sha256,SignAndEncrypt,{stranger_cert},{stranger_key},{bridge_cert}")
    finally:
        plc.close()
        bridge.stop()


def test_client_mode_signs_and_encrypts_with_the_plcs_server(daemon, tmp_path):
    plc_cert, plc_key = _certificate(tmp_path / "pki", "plcserver", "urn:test:plcserver", server=True)
    bridge_cert, bridge_key = _certificate(tmp_path / "pki", "bridge", "urn:inspectd:bridge", server=False)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "bridge.der").write_bytes(bridge_cert.read_bytes())
    plc = PlcServer(free_port(), security=(plc_cert, plc_key, trusted))
    program = plc.run_program()
    security = f"security:\n  certificate: {bridge_cert}\n  private_key: {bridge_key}\n  trusted: {plc_cert}\n"
    config = write_config(tmp_path, "mode: client\n" + security)
    bridge = Bridge(daemon, ["--config", str(config), "--opcua", plc.url], lambda: plc.read(CAMERA, "trigger_ready"))
    try:
        daemon.result(1, "defect", regions=1)
        wait(lambda: program.ids() == [1], 10, "the result written over a signed and encrypted channel")
    finally:
        bridge.stop()
    # Without security the PLC's server offers no endpoint: the bridge says so in one line and exits 1.
    refused = subprocess.run(
        [sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", daemon.endpoint, "--mode", "client"]
        + ["--camera", CAMERA, "--opcua", plc.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    plc.stop()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.strip().startswith("inspectd bridge: PLC opc.tcp://"), refused.stderr


def test_security_files_missing_or_malformed_are_a_config_error_in_one_line(daemon, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    bridge_cert, bridge_key = _certificate(tmp_path / "pki", "bridge", "urn:inspectd:bridge", server=True)
    _, other_key = _certificate(tmp_path / "pki", "other", "urn:inspectd:bridge", server=True)
    plc_cert, _ = _certificate(tmp_path / "pki", "plc", "urn:test:plc", server=False)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "plc.der").write_bytes(plc_cert.read_bytes())
    text = tmp_path / "notes.der"
    text.write_text("not a certificate\n")
    pem_named_der = tmp_path / "bridge-pem.der"
    pem_named_der.write_bytes(x509.load_der_x509_certificate(bridge_cert.read_bytes()).public_bytes(Encoding.PEM))
    bad_trusted = tmp_path / "bad-trusted"
    bad_trusted.mkdir()
    (bad_trusted / "plc.der").write_text("garbage")
    missing = tmp_path / "missing.pem"
    good = {"certificate": bridge_cert, "private_key": bridge_key, "trusted": trusted}
    cases = [
        ("server", {"certificate": text}, "security.certificate", text, "expected a DER certificate"),
        ("server", {"certificate": pem_named_der}, "security.certificate", pem_named_der, "name it *.pem"),
        ("server", {"private_key": missing}, "security.private_key", missing, "No such file or directory"),
        ("server", {"private_key": other_key}, "security.private_key", other_key, "expected the private key of"),
        ("server", {"trusted": tmp_path / "nowhere"}, "security.trusted", tmp_path / "nowhere", "expected a folder"),
        ("server", {"trusted": bad_trusted}, "security.trusted", bad_trusted / "plc.der", "expected a DER cert"),
        ("client", {"trusted": text}, "security.trusted", text, "expected a DER certificate"),
    ]
    for mode, change, key, path, expected in cases:
        files = {**good, **change}
        security = "".join(f"  {name}: {value}\n" for name, value in files.items())
        config = write_config(tmp_path, f"mode: {mode}\nsecurity:\n{security}")
        url = f"opc.tcp://127.0.0.1:{free_port()}/inspectd/"
        proc = run_bridge(daemon, ["--config", str(config), "--opcua", url, "--state-file", str(tmp_path / "s.json")])
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (change, proc.stderr)
        assert f"{key} {path}: " in proc.stderr and expected in proc.stderr, (change, proc.stderr)


def test_config_errors_name_the_key_and_the_cli_says_one_line(tmp_path, daemon):
    cases = [
        ({"mode": "push"}, "bridge.mode: expected 'server' or 'client', got 'push'"),
        ({"endpoint": "http://x"}, "endpoint: expected an opc.tcp:// URL"),
        ({"cameras": ["cam 0"]}, "bridge.cameras[0]: expected a camera id"),
        ({"mode": "client", "node_id": "ns=2;s=x"}, "node_id: expected a template whose only fields are {camera}"),
        ({"security": {"certificate": "c"}}, "bridge.security.private_key"),
        ({"ack_timeout_ms": 0}, "bridge.ack_timeout_ms: expected at least 1, got 0"),
        ({"request_timeout_ms": 5000}, "bridge.request_timeout_ms: expected at most 2000"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError) as err:
            parse_opcua_config(raw)
        assert message in str(err.value), (raw, str(err.value))
    # asyncua sends a request once, so a timeout of 2000 ends within the stop's 2 s (Modbus, which retries, takes 1000)
    assert parse_opcua_config({"request_timeout_ms": 2000}).request_timeout_ms == 2000
    bad_state = tmp_path / "bad-state.json"
    bad_state.write_text(json.dumps({CAMERA: {"inspection_id": "12x"}}))
    bad_alarm = tmp_path / "bad-alarm.json"
    bad_alarm.write_text(json.dumps({CAMERA: {"inspection_id": 3, "alarm": 7}}))
    for args, expected in [
        (["--camera", CAMERA, "--state-file", str(bad_state)], f"{bad_state}: camera '{CAMERA}' inspection_id"),
        (["--camera", CAMERA, "--state-file", str(bad_alarm)], f"{bad_alarm}: camera '{CAMERA}' alarm: expected"),
        (["--camera", "cam0"], "state_file: expected a file path in server mode"),
        (["--state-file", str(tmp_path / "s")], "cameras: expected at least one camera id"),
        (["--mode", "client", "--camera", "cam0", "--opcua", "tcp://x"], "endpoint: expected an opc.tcp:// URL"),
        # The camera from --topic is a camera id like any other; a camera the topic leaves out could get no result.
        (
            ["--state-file", str(tmp_path / "s"), "--topic", "inspect.st1.cam 0."],
            "--topic 'inspect.st1.cam 0.': expected a camera id",
        ),
        (
            ["--state-file", str(tmp_path / "s"), "--camera", "cam1", "--topic", "inspect.st1.cam0."],
            "camera cam1: --topic 'inspect.st1.cam0.' leaves out its results",
        ),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", daemon.endpoint, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_shipped_example_config_is_the_defaults_but_its_camera_and_state_file():
    from inspectd.clients.opcua import load_opcua_config

    example = load_opcua_config(REPO / "deploy" / "opcua.example.yaml")
    assert example == parse_opcua_config({"cameras": ["cam0"], "state_file": example.state_file})
    assert example.state_file == Path("/var/lib/inspectd-bridge/opcua/state.json")


@pytest.mark.parametrize(
    "template",
    ["ns=2;s={camera}.{name}.{Value}", "ns=2;s={camera}.{name}}", "ns=2;s={0}.{camera}.{name}", "{camera.x}.{name}"],
)
def test_a_node_id_template_with_any_other_field_is_refused_at_load(template):
    """`{Value}` or a stray brace loaded, and the bridge then died of KeyError (or ValueError) in str.format once it
    reached the PLC's server, and restarted in a loop under its unit."""
    with pytest.raises(ConfigError) as refused:
        parse_opcua_config({"mode": "client", "node_id": template})
    assert str(refused.value) == (
        "bridge: node_id: expected a template whose only fields are {camera} and {name}, each at least once (a "
        f"literal brace written {{{{ or }}}}), got {template!r}"
    )
    literal = parse_opcua_config({"mode": "client", "node_id": "ns=2;s={{{camera}}}.{name}"}).node_id
    assert literal.format(camera="cam0", name="Ack") == "ns=2;s={cam0}.Ack"


@pytest.mark.parametrize("key,line", [("state_file", "state_file: state.json"), ("cache_dir", "cache_dir: cache")])
def test_a_relative_path_the_bridge_writes_is_refused_naming_the_key(tmp_path, key, line):
    """Resolved against the config file's folder, read-only under the units: the bridge started without a word,
    found no state there (a latched alarm cleared, inspection ids back to 0) and took no lock."""
    from inspectd.clients.opcua import load_opcua_config

    path = tmp_path / "opcua.yaml"
    path.write_text(f"cameras: [cam0]\n{line}\n")
    with pytest.raises(ConfigError) as refused:
        load_opcua_config(path)
    relative = line.split(": ")[1]
    assert str(refused.value) == (
        f"{path}.{key}: '{relative}' is relative, expected an absolute path: it is written to, and the config file's "
        "folder is read-only under the service units"
    )


def test_relative_security_files_resolve_against_the_config_file_and_command_line_paths_the_working_directory(
    tmp_path,
):
    """The security files are read only: found next to the config. A path on the command line is the shell's."""
    from inspectd.clients.opcua import load_opcua_config

    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "opcua.yaml"
    path.write_text(
        f"cameras: [cam0]\nstate_file: {tmp_path / 'state.json'}\ncache_dir: ''\n"
        "security: {certificate: pki/cert.der, private_key: pki/key.pem, trusted: pki/trusted}\n"
    )
    config = load_opcua_config(path)
    conf = tmp_path / "conf"
    assert (config.state_file, config.cache_dir) == (tmp_path / "state.json", "")
    assert config.security is not None
    assert (config.security.certificate, config.security.private_key, config.security.trusted) == (
        conf / "pki" / "cert.der",
        conf / "pki" / "key.pem",
        conf / "pki" / "trusted",
    )
    # The bridge itself, started in tmp_path/run with a relative --state-file: it takes that file's lock there, then
    # refuses the certificate that is not there, naming the path it looked at.
    (tmp_path / "run").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", f"tcp://127.0.0.1:{free_port()}",
         "--config", str(path), "--state-file", "state.json", "--cache-dir", "cache"],
        cwd=tmp_path / "run", capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"security.certificate {conf / 'pki' / 'cert.der'}: " in done.stderr, done.stderr
    assert (tmp_path / "run" / "state.json.lock").exists() and not (conf / "state.json.lock").exists()


@pytest.fixture
def shelf_server(monkeypatch):
    """A ServerLink made in this process serves its standard address space from this test process's shelf, as the
    PLC servers do: the seconds of CPU a build costs are saved, and no cache directory's lock stays held here."""
    from inspectd.clients import opcua

    async def init(_directory):
        server = asyncua.Server()
        await server.init(shelf_file=ASPACE_SHELF[0])
        return server

    monkeypatch.setattr(opcua, "init_server", init)


def link_config(tmp_path: Path, port: int, **more):
    raw = {"endpoint": f"opc.tcp://127.0.0.1:{port}/x/", "cameras": [CAMERA], "cache_dir": ""}
    raw |= {"state_file": str(tmp_path / "state.json"), "ack_timeout_ms": 3000, "poll_ms": 5}
    return parse_opcua_config(raw | more)


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


def test_server_mode_a_subscriber_acting_on_result_valid_rising_finds_that_results_verdict_flags(
    daemon, tmp_path, shelf_server
):
    """An MES or PLC driven by data-change notifications acts when ResultValid rises, on the Pass/Fail/Defect it has
    been notified of so far: ResultValid rises after them (and falls before them), so each part gets its own
    verdict, not the previous part's or none."""
    from inspectd.clients.handshake import Handshake
    from inspectd.clients.opcua import ServerLink
    from inspectd.protocol.messages import decode

    port = free_port()
    config = link_config(tmp_path, port)
    acted: list[tuple] = []
    seen: dict[str, object] = {}
    falls: list[int] = []

    class Handler:
        def datachange_notification(self, node, value, _data) -> None:
            name = node.nodeid.Identifier.split(".")[1]
            seen[name] = value
            if name == "ResultValid" and value:
                verdict = [flag for flag in ("Pass", "Fail", "Defect") if seen.get(flag)]
                acted.append((seen.get("InspectionId"), verdict))
            elif name == "ResultValid":
                falls.append(len(acted))

    async def line() -> None:
        link = ServerLink(config)
        await link.start()
        client = asyncua.Client(f"opc.tcp://127.0.0.1:{port}/x/", timeout=5)
        try:
            handshake = Handshake(link.targets[CAMERA], config, CAMERA)
            await handshake.start()
            await client.connect()
            index = await client.get_namespace_index("urn:inspectd:bridge")
            names = ("InspectionId", "Pass", "Fail", "Defect", "ResultValid")
            nodes = [client.get_node(f"ns={index};s={CAMERA}.{name}") for name in names]
            subscription = await client.create_subscription(20, Handler())
            await subscription.subscribe_data_change(nodes)
            await until(lambda: len(seen) == len(names), 5, "the initial values")
            ack = client.get_node(f"ns={index};s={CAMERA}.Ack")
            stop = asyncio.Event()
            runner = asyncio.ensure_future(handshake.run(stop))
            for seq, verdict in ((1, "ok"), (2, "defect"), (3, "ok"), (4, "defect")):
                handshake.offer(decode(daemon.encode(seq, verdict)))
                await until(lambda seq=seq: len(acted) == seq, 5, f"ResultValid rising for {seq}")
                await ack.write_value(ua.Variant(seq, ua.VariantType.UInt32))
                # Its fall, notified before the next rise: each in a publish of its own.
                await until(lambda seq=seq: bool(falls) and falls[-1] == seq, 5, f"ResultValid falling after {seq}")
            stop.set()
            await runner
        finally:
            await client.disconnect()
            await link.close()

    asyncio.run(line())
    assert acted == [(1, ["Pass"]), (2, ["Fail", "Defect"]), (3, ["Pass"]), (4, ["Fail", "Defect"])], acted


def test_client_mode_writes_a_rising_result_valid_in_a_request_after_the_verdict_flags(tmp_path):
    """A PLC's server may apply the items of one Write request in any order (OPC UA Part 4, Write): a rising
    ResultValid is written in a request of its own, after the one carrying the verdict flags. Falling, it goes with
    the flags (the PLC has taken that result), in one request, which is all a stop against a stalled server can send
    (test_opcua_stop.py)."""
    from asyncua.common.callback import CallbackType

    from inspectd.clients.opcua import ClientLink

    plc = PlcServer(free_port())
    result_valid = plc.nodes[(CAMERA, "result_valid")].nodeid.to_string()
    writes: list[list[tuple[str, object]]] = []

    def written(event, _service) -> None:  # every Write the bridge makes, in the PLC server's own loop
        writes.append([(item.NodeId.to_string(), item.Value.Value.Value) for item in event.request_params.NodesToWrite])

    plc.server.aio_obj.subscribe_server_callback(CallbackType.PostWrite, written)
    config = parse_opcua_config({"mode": "client", "endpoint": plc.url, "cameras": [CAMERA]})

    async def hand_over() -> None:
        link = ClientLink(config)
        await link.start()
        try:
            target = link.targets[CAMERA]
            await target.write({"status": frozenset({"trigger_ready", "result_valid", "fail", "defect"})})
            await target.write({"status": frozenset({"trigger_ready"})})
        finally:
            await link.close()

    try:
        asyncio.run(hand_over())
    finally:
        plc.stop()
    fail = plc.nodes[(CAMERA, "fail")].nodeid.to_string()
    rises = writes.index([(result_valid, True)])
    assert (fail, True) in writes[rises - 1], writes
    (falls,) = [w for w in writes[rises + 1 :] if (result_valid, False) in w]
    assert (fail, False) in falls, writes


def test_server_mode_takes_an_ack_of_another_integer_type_and_refuses_arrays_and_serves_on(tmp_path, shelf_server):
    """An Ack written as a PLC's Int32 (or an AlarmReset as 1) is taken as the variable's type, where asyncua alone
    would refuse it and every ack would time out. asyncua checks a client write's type, not its rank: Ack or
    AlarmReset written as an array (an HMI tag set up as one, a script) is refused with BadTypeMismatch and a
    warning, as is a negative Ack, a Double one or an AlarmReset of 2; the variable keeps what it held, and the
    bridge reads it as before. A non-scalar that gets in some other way reads as the last whole number, never an
    exception that would end the bridge."""
    from inspectd.clients.opcua import ServerLink

    port = free_port()
    config = link_config(tmp_path, port)

    async def writes() -> tuple[list, dict]:
        link = ServerLink(config)
        await link.start()
        target = link.targets[CAMERA]
        client = asyncua.Client(f"opc.tcp://127.0.0.1:{port}/x/", timeout=5)
        outcomes, reads = [], {}
        try:
            await client.connect()
            index = await client.get_namespace_index("urn:inspectd:bridge")
            ack = client.get_node(f"ns={index};s={CAMERA}.Ack")
            reset = client.get_node(f"ns={index};s={CAMERA}.AlarmReset")
            for node, variant in (
                (ack, ua.Variant(3, ua.VariantType.Int32)),  # a PLC's DINT: taken as the UInt32 it fits
                (reset, ua.Variant(1, ua.VariantType.Int16)),
                (ack, ua.Variant(5, ua.VariantType.UInt32)),
                (ack, ua.Variant([7, 7], ua.VariantType.UInt32)),
                (reset, ua.Variant([True, True], ua.VariantType.Boolean)),
                (ack, ua.Variant(-1, ua.VariantType.Int32)),
                (ack, ua.Variant(6.0, ua.VariantType.Double)),
                (reset, ua.Variant(2, ua.VariantType.Byte)),
            ):
                try:
                    await node.write_value(ua.DataValue(variant))
                    outcomes.append("accepted")
                except ua.UaStatusCodeError as exc:
                    outcomes.append(type(exc).__name__)
                if len(outcomes) == 2:
                    reads["first_ack"] = await target.read("ack")
                    reads["reset"] = await reset.read_data_value()
            reads["ack"], reads["alarm_reset"] = await target.read("ack"), await target.read("alarm_reset")
            reads["held"] = await ack.read_data_value()
            array = ua.DataValue(ua.Variant([9, 9], ua.VariantType.UInt32))
            await link.server.write_attribute_value(target.nodes["ack"].nodeid, array)
            reads["after_inside"] = await target.read("ack")
        finally:
            await client.disconnect()
            await link.close()
        return outcomes, reads

    with structlog.testing.capture_logs() as logs:
        outcomes, reads = asyncio.run(writes())
    assert outcomes == ["accepted"] * 3 + ["BadTypeMismatch"] * 5, outcomes
    held, reset = reads.pop("held"), reads.pop("reset")
    assert (held.Value.Value, held.Value.VariantType) == (5, ua.VariantType.UInt32), held
    assert (reset.Value.Value, reset.Value.VariantType) == (True, ua.VariantType.Boolean), reset
    assert reads == {"first_ack": 3, "ack": 5, "alarm_reset": 1, "after_inside": 5}, reads
    refused = [entry for entry in logs if entry["event"] == "plc_write_refused"]
    # One warning per variable within REFUSED_WRITE_LOG_S; the later refusals are counted for the next one.
    assert [(entry["variable"], entry["log_level"]) for entry in refused] == [
        ("Ack", "warning"),
        ("AlarmReset", "warning"),
    ], refused
    assert refused[0]["expected"] == "a scalar UInt32, or a whole number 0..4294967295 of an integer type", refused


def test_server_mode_keeps_missed_acks_and_sequence_gaps_in_its_state_file_across_a_restart(
    daemon, tmp_path, shelf_server
):
    """The server's variables die with the bridge: the counters a PLC or HMI trends are kept in state_file with the
    restart rule's id, and a restarted bridge shows them going on, not back at 0."""
    from inspectd.clients.handshake import Handshake
    from inspectd.clients.opcua import ServerLink
    from inspectd.protocol.messages import decode

    port = free_port()
    config = link_config(tmp_path, port)
    (tmp_path / "state.json").write_text(
        json.dumps({CAMERA: {"inspection_id": 100, "alarm": 0, "missed_acks": 17, "sequence_gaps": 5}})
    )

    async def line() -> list[tuple[int, int]]:
        link = ServerLink(config)
        await link.start()
        client = asyncua.Client(f"opc.tcp://127.0.0.1:{port}/x/", timeout=5)
        shown = []
        try:
            handshake = Handshake(link.targets[CAMERA], config, CAMERA)
            await handshake.start()
            await client.connect()
            index = await client.get_namespace_index("urn:inspectd:bridge")

            def node(name: str):
                return client.get_node(f"ns={index};s={CAMERA}.{name}")

            # Before any result: an HMI polling them after the restart must not see 0.
            shown.append((await node("MissedAcks").read_value(), await node("SequenceGaps").read_value()))
            stop = asyncio.Event()
            runner = asyncio.ensure_future(handshake.run(stop))
            for seq in (101, 103):  # 102 never came: a gap
                handshake.offer(decode(daemon.encode(seq)))
                await until(lambda seq=seq: handshake.waiting_for == seq, 5, f"{seq} handed over")
                shown.append((await node("MissedAcks").read_value(), await node("SequenceGaps").read_value()))
                await node("Ack").write_value(ua.Variant(seq, ua.VariantType.UInt32))
                await until(lambda: handshake.waiting_for is None, 5, f"{seq} acked")
            stop.set()
            await runner
        finally:
            await client.disconnect()
            await link.close()
        return shown

    assert asyncio.run(line()) == [(17, 5), (17, 5), (17, 6)]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state[CAMERA]["missed_acks"] == 17 and state[CAMERA]["sequence_gaps"] == 6, state


def test_server_mode_records_an_acked_id_when_its_ack_is_read_before_result_valid_drops(tmp_path, shelf_server):
    """The PLC's Ack lives only in the bridge's process: recorded at the falling edge, a bridge killed after the ack
    was read and before that write resumed before the id, and a --journal handed the PLC that verdict again (a
    reject gate firing twice). The ack's read records it, with the counters it was handed over with; the restart
    resumes after it."""
    from inspectd.clients.handshake import Handshake
    from inspectd.clients.opcua import ServerLink

    port = free_port()
    config = link_config(tmp_path, port)
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps({CAMERA: {"inspection_id": 5, "alarm": 0, "missed_acks": 0, "sequence_gaps": 0}}))
    shown = frozenset({"trigger_ready", "result_valid", "fail", "defect", "alarm"})

    async def killed_after_the_ack() -> tuple[dict, bool]:
        link = ServerLink(config)
        await link.start()
        target = link.targets[CAMERA]
        client = asyncua.Client(f"opc.tcp://127.0.0.1:{port}/x/", timeout=5)
        try:
            # 6 never came: 7 is handed over with its gap counted, as the handshake writes it.
            fields = {"inspection_id": 7, "result_code": 1, "verdict": "defect", "score": 0.9, "threshold": 0.5}
            fields |= {"region_count": 1, "model_id": "m", "thresholds_version": 1, "missed_acks": 0}
            await target.write({**fields, "sequence_gaps": 1, "status": shown}, last="status")
            assert json.loads(state_file.read_text())[CAMERA]["inspection_id"] == 5  # not acked yet: not recorded
            await client.connect()
            index = await client.get_namespace_index("urn:inspectd:bridge")
            await client.get_node(f"ns={index};s={CAMERA}.Ack").write_value(ua.Variant(7, ua.VariantType.UInt32))
            assert await target.read("ack") == 7  # the handshake's poll: next it drops ResultValid
            result_valid = await client.get_node(f"ns={index};s={CAMERA}.ResultValid").read_value()
            return json.loads(state_file.read_text())[CAMERA], result_valid
        finally:
            await client.disconnect()
            await link.close()  # the kill: no falling edge is written

    async def restarted() -> tuple[int | None, int]:
        link = ServerLink(config)
        await link.start()
        try:
            handshake = Handshake(link.targets[CAMERA], config, CAMERA)
            await handshake.start()
            return handshake.last_id, await link.targets[CAMERA].read("sequence_gaps")
        finally:
            await link.close()

    recorded, result_valid = asyncio.run(killed_after_the_ack())
    assert result_valid and recorded["inspection_id"] == 7 and recorded["sequence_gaps"] == 1, recorded
    assert asyncio.run(restarted()) == (7, 1)


@pytest.mark.parametrize(
    "endpoint",
    [
        "opc.tcp://127.0.0.1/inspectd/",  # no port: asyncua would listen on a random one
        "opc.tcp://127.0.0.1:0/x/",
        "opc.tcp://0.0.0.0:99999/x/",
        "opc.tcp://127.0.0.1:48a0/x/",
        "opc.tcp://:4840/x/",
    ],
)
def test_an_endpoint_without_a_host_and_a_port_1_to_65535_is_refused_naming_the_key(endpoint):
    with pytest.raises(ConfigError) as refused:
        parse_opcua_config({"endpoint": endpoint, "cameras": [CAMERA]})
    assert "endpoint: expected an opc.tcp:// URL with a host and a port 1..65535" in str(refused.value)
    assert parse_opcua_config({"endpoint": "opc.tcp://[::1]:4840/x/"}).endpoint == "opc.tcp://[::1]:4840/x/"


def test_a_bad_endpoint_or_a_state_file_in_no_folder_stops_the_bridge_at_start_in_one_line_exit_2(daemon, tmp_path):
    """Config errors, which the service manager must not restart: a port out of range (a traceback in server mode, a
    restart loop in client mode before), and a state_file whose folder does not exist (a typo in the instance name:
    no lock, and every restart a fresh PLC)."""
    state = str(tmp_path / "state.json")
    for args, expected in [
        (["--opcua", "opc.tcp://0.0.0.0:99999/x/", "--state-file", state], "endpoint: expected an opc.tcp:// URL"),
        (["--mode", "client", "--opcua", "opc.tcp://127.0.0.1/x/"], "endpoint: expected an opc.tcp:// URL"),
        (
            ["--state-file", str(tmp_path / "no-such-instance" / "state.json")],
            f"state_file {tmp_path / 'no-such-instance' / 'state.json'}: expected a file in an existing folder",
        ),
    ]:
        done = run_bridge(daemon, ["--camera", CAMERA, "--cache-dir", "", *args])
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "no-such-instance").exists()


def test_a_state_file_in_a_folder_this_user_may_not_write_stops_the_bridge_at_start_in_one_line_exit_2(daemon):
    """A folder that exists but is not the service user's (the daemon's /var/lib/inspectd, not the instance's
    StateDirectory): no lock could be taken and no state written, so every restart would be a fresh PLC."""
    folder = Path(tempfile.mkdtemp())  # not under tmp_path: the service user must reach it
    try:
        folder.chmod(0o555)
        state = folder / "state.json"
        # Root may write anywhere: the bridge runs as its service user, here nobody.
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        proc = subprocess.Popen(
            [*drop, sys.executable, "-m", "inspectd", "bridge", "opcua", "--endpoint", daemon.endpoint]
            + ["--camera", CAMERA, "--cache-dir", "", "--state-file", str(state)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the bridge started serving on a state_file it cannot write") from None
        assert proc.returncode == 2, stderr
        expected = f"state_file {state}: expected a folder this user may write, {folder} is not"
        assert expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not (folder / "state.json.lock").exists()
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


@pytest.mark.parametrize("security", [False, True], ids=["unsigned", "sign-and-encrypt"])
def test_server_mode_refuses_a_user_name_login_so_no_client_can_forge_a_verdict_or_delete_a_variable(
    tmp_path, shelf_server, security
):
    """asyncua's default server made any session logged in as `admin`, whatever its password, an Admin: it could write
    Verdict, Pass and ResultValid (a forged "pass" for a part never judged) and delete the bridge's variables, on the
    unsigned endpoint and, with a trusted certificate, on the signed and encrypted one. Only anonymous sessions are
    offered: the login is refused, and an anonymous session still acks."""
    from inspectd.clients.opcua import ServerLink

    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/x/"
    more: dict = {}
    secure = None
    if security:
        bridge_cert, bridge_key = _certificate(tmp_path / "pki", "bridge", "urn:inspectd:bridge", server=True)
        plc_cert, plc_key = _certificate(tmp_path / "pki", "plc", "urn:test:plc", server=False)
        trusted = tmp_path / "trusted"
        trusted.mkdir()
        (trusted / "plc.der").write_bytes(plc_cert.read_bytes())
        more["security"] = {"certificate": str(bridge_cert), "private_key": str(bridge_key), "trusted": str(trusted)}
        secure = f"Basic256Sha256,SignAndEncrypt,{plc_cert},{plc_key},{bridge_cert}"
    config = link_config(tmp_path, port, **more)

    async def session(user: str | None) -> asyncua.Client:
        client = asyncua.Client(url, timeout=5)
        client.application_uri = "urn:test:plc"
        if secure:
            await client.set_security_string(secure)
        if user:
            client.set_user(user)
            client.set_password("not-the-password")
        try:
            await client.connect()
        except BaseException:
            client.disconnect_socket()
            raise
        return client

    async def attempts() -> tuple[dict, dict]:
        link = ServerLink(config)
        await link.start()
        target = link.targets[CAMERA]
        outcomes: dict[str, str] = {}
        try:
            try:
                admin = await session("admin")
            except ua.UaStatusCodeError as exc:
                outcomes["login"] = type(exc).__name__
            else:
                outcomes["login"] = "accepted"
                try:
                    index = await admin.get_namespace_index("urn:inspectd:bridge")
                    for name, variant in (
                        ("Verdict", ua.Variant("ok", ua.VariantType.String)),
                        ("Pass", ua.Variant(True, ua.VariantType.Boolean)),
                        ("ResultValid", ua.Variant(True, ua.VariantType.Boolean)),
                    ):
                        try:
                            await admin.get_node(f"ns={index};s={CAMERA}.{name}").write_value(ua.DataValue(variant))
                            outcomes[name] = "written"
                        except ua.UaStatusCodeError as exc:
                            outcomes[name] = type(exc).__name__
                    try:
                        await admin.delete_nodes([admin.get_node(f"ns={index};s={CAMERA}.TriggerReady")])
                        outcomes["delete"] = "deleted"
                    except ua.UaStatusCodeError as exc:
                        outcomes["delete"] = type(exc).__name__
                finally:
                    await admin.disconnect()
            anonymous = await session(None)
            try:
                index = await anonymous.get_namespace_index("urn:inspectd:bridge")
                await anonymous.get_node(f"ns={index};s={CAMERA}.Ack").write_value(ua.Variant(7, ua.VariantType.UInt32))
            finally:
                await anonymous.disconnect()
            held = {name: await target.read(name) for name in ("ack", "pass", "result_valid", "trigger_ready")}
            verdict = link.server.read_attribute_value(target.nodes["verdict"].nodeid)
            held["verdict"] = verdict.Value.Value
        finally:
            await link.close()
        return outcomes, held

    outcomes, held = asyncio.run(attempts())
    assert outcomes == {"login": "BadIdentityTokenRejected"}, outcomes
    assert held == {"ack": 7, "pass": 0, "result_valid": 0, "trigger_ready": 0, "verdict": ""}, held


def test_server_mode_a_write_to_its_own_variable_that_the_address_space_refuses_ends_the_bridge_in_one_line(
    tmp_path, shelf_server
):
    """A write of the bridge's to a variable that is gone was dropped without a word: the PLC read the last value
    while the bridge believed it handed over a new one. It ends the bridge (exit 1, restarted with its variables
    built anew), as a write the PLC's server refuses does in client mode."""
    from inspectd.clients.handshake import PlcError
    from inspectd.clients.opcua import ServerLink

    config = link_config(tmp_path, free_port())

    async def write() -> str:
        link = ServerLink(config)
        await link.start()
        target = link.targets[CAMERA]
        try:
            await target.write({"verdict": "ok"})  # the variable there: written
            await link.server.delete_nodes([target.nodes["verdict"]])
            with pytest.raises(PlcError) as ended:
                await target.write({"verdict": "defect"})
        finally:
            await link.close()
        return str(ended.value)

    assert asyncio.run(write()) == f"OPC UA write of {CAMERA} Verdict (ns=1;s={CAMERA}.Verdict): BadNodeIdUnknown"


def test_a_certificate_whose_uri_is_not_application_uri_is_a_config_error_in_one_line_in_both_modes(daemon, tmp_path):
    """asyncua started with it and said nothing; every peer validating certificates then refused each session
    (BadCertificateUriInvalid), a restart loop in client mode."""
    from inspectd.clients.opcua import Security, check_security

    other_cert, other_key = _certificate(tmp_path / "pki", "bridge", "urn:plant:other", server=True)
    plc_cert, _ = _certificate(tmp_path / "pki", "plc", "urn:test:plc", server=False)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "plc.der").write_bytes(plc_cert.read_bytes())
    expected = (
        f"security.certificate {other_cert}: its subject alternative name carries urn:plant:other, "
        "expected application_uri urn:inspectd:bridge"
    )
    for mode, trusted_path in (("server", trusted), ("client", plc_cert)):
        security = f"security:\n  certificate: {other_cert}\n  private_key: {other_key}\n  trusted: {trusted_path}\n"
        config = write_config(tmp_path, f"mode: {mode}\n{security}")
        url = f"opc.tcp://127.0.0.1:{free_port()}/inspectd/"
        proc = run_bridge(daemon, ["--config", str(config), "--opcua", url, "--state-file", str(tmp_path / "s.json")])
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (mode, proc.stderr)
        assert expected in proc.stderr, (mode, proc.stderr)
        # The same files, with application_uri set to the certificate's URI: taken.
        files = Security(certificate=other_cert, private_key=other_key, trusted=trusted_path)
        check_security(files, mode, "urn:plant:other")


def test_the_camera_id_of_the_servers_root_object_is_refused_in_server_mode_in_one_line(daemon, tmp_path):
    """`inspectd` is the node id of Objects/inspectd, so a camera of that id (whose object takes its id) ended the
    server's start with a BadNodeIdExists traceback. The variables' ids, `<camera>.<Name>`, are what PLC programs
    read, so they stay, and the one id that collides is refused; client mode names no such object and takes it."""
    with pytest.raises(ConfigError) as refused:
        parse_opcua_config({"cameras": [CAMERA, "inspectd"]})
    expected = (
        "cameras: 'inspectd' is the node id of the server's root object (Objects/inspectd), expected another camera "
        "id in server mode"
    )
    assert str(refused.value) == f"bridge: {expected}"
    assert parse_opcua_config({"mode": "client", "cameras": ["inspectd"]}).cameras == ["inspectd"]
    url = f"opc.tcp://127.0.0.1:{free_port()}/inspectd/"
    state = ["--state-file", str(tmp_path / "s.json"), "--opcua", url]
    for args in (["--camera", "inspectd", *state], ["--topic", f"inspect.{STATION}.inspectd.", *state]):
        proc = run_bridge(daemon, args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert "'inspectd' is the node id of the server's root object" in proc.stderr, (args, proc.stderr)
