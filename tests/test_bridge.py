"""`inspectd bridge modbus` as a real subprocess between a real ZeroMQ PUB socket and a real pymodbus TCP server.

The server's registers are the PLC's memory; a small PLC-side loop (its own Modbus client, as a PLC program would
act on its own memory) watches result_valid, records each handed-over result and acknowledges it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

pytest.importorskip("pymodbus", reason="the PLC bridge needs the [plc] extra (pymodbus)")
from pymodbus.client import ModbusTcpClient  # noqa: E402
from pymodbus.constants import ExcCodes  # noqa: E402
from pymodbus.server import ModbusTcpServer  # noqa: E402
from pymodbus.simulator import SimData, SimDevice  # noqa: E402
from pymodbus.simulator.simutils import DataType  # noqa: E402

from inspectd.clients.plc import DEFAULT_BITS, DEFAULT_REGISTERS, parse_bridge_config, scaled_score  # noqa: E402
from inspectd.errors import ConfigError  # noqa: E402
from plc_peers import Daemon, Memory, wait  # noqa: E402
from ports import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REG = DEFAULT_REGISTERS
BIT = {name: 1 << bit for name, bit in DEFAULT_BITS.items()}
STATION, CAMERA = "st1", "cam0"
# The tests' journals are flushed after each append, and a reader sees a record once it is written anyway: their
# syncer need not run, and at an interval of 0 it would take a core for as long as the test runs.
SYNC_S = 3600.0
pytestmark = pytest.mark.timeout(60)
logging.getLogger("pymodbus").setLevel(logging.WARNING)  # it traces every packet at debug


class Plc:
    """A pymodbus TCP server on 127.0.0.1 (the PLC's memory) plus the PLC program that acknowledges results."""

    def __init__(self, compares_ack: bool = False) -> None:
        # compares_ack: the program docs/PLC.md outlines, which takes a result whose id differs from its own ack
        # register (not from a last id it keeps, which a cold start would leave at the daemon's first seq of 0).
        self.compares_ack = compares_ack
        self.refused: set[int] = set()  # registers whose writes the PLC refuses (an exception response)
        self.port = free_port()
        self._serve()
        self.client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2)
        wait(self.client.connect, 5, "the Modbus server to listen", interval=0.05)
        self.received: list[dict] = []  # every result seen with result_valid raised, in order
        self.acking = threading.Event()
        self.acking.set()
        self._reset = threading.Event()
        self._stop = threading.Event()
        self._program = threading.Thread(target=self._scan, daemon=True)
        self._program.start()

    def _serve(self) -> None:
        """Start the Modbus server on self.port, its registers all 0."""
        self.loop = asyncio.new_event_loop()
        self.server = None
        device = SimDevice(
            id=1, simdata=[SimData(0, count=32, values=0, datatype=DataType.REGISTERS)], action=self._refuse
        )
        listening = threading.Event()

        async def serve():
            self.server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
            listening.set()
            await self.server.serve_forever()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(serve(),), daemon=True)
        self.thread.start()
        assert listening.wait(5), "the Modbus server did not start"

    async def _refuse(self, function_code, start_address, address, count, registers, values) -> ExcCodes | None:
        if values is not None and self.refused.intersection(range(address, address + count)):
            return ExcCodes.DEVICE_FAILURE
        return None

    def restart(self) -> None:
        """The PLC's Modbus server goes away and comes back on the same port with its registers reset (a warm
        restart, a program download), every connection to it dropped."""
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        self.thread.join(5)
        self._serve()

    def registers(self) -> list[int]:
        reply = self.client.read_holding_registers(0, count=14, device_id=1)
        assert not reply.isError(), reply
        return reply.registers

    def field(self, name: str) -> int:
        regs = self.registers()
        address = REG[name]
        return regs[address] << 16 | regs[address + 1] if name in ("inspection_id", "ack") else regs[address]

    def write(self, name: str, value: int) -> None:
        words = [value >> 16, value & 0xFFFF] if name in ("inspection_id", "ack") else [value]
        assert not self.client.write_registers(REG[name], words, device_id=1).isError()

    def holds(self, seq: int) -> None:
        """The registers a bridge that ran before left: inspection id and ack at `seq`, a heartbeat (not a fresh
        PLC). The program does not act on them meanwhile."""
        self.acking.clear()
        self.write("inspection_id", seq)
        self.write("ack", seq)
        self.write("heartbeat", 321)
        self.acking.set()

    def reset(self) -> None:
        """The PLC loses its memory (replaced, program reloaded, a cold start): every register 0 and the program
        forgets the last id it consumed. Done by the scan thread, the only user of the client meanwhile."""
        self._reset.set()
        wait(lambda: not self._reset.is_set(), 5, "the PLC to reset its registers")

    def _scan(self) -> None:
        # A PLC scan cycle: on result_valid with an id it has not consumed yet, latch the result and echo its id.
        last = None
        while not self._stop.is_set():
            if self._reset.is_set():
                assert not self.client.write_registers(0, [0] * 32, device_id=1).isError()
                last = None
                self._reset.clear()
            try:
                regs = self.registers()
            except Exception:  # noqa: BLE001 - server shutting down at the end of a test
                return
            status = regs[REG["status"]]
            inspection_id = regs[REG["inspection_id"]] << 16 | regs[REG["inspection_id"] + 1]
            consumed = regs[REG["ack"]] << 16 | regs[REG["ack"] + 1] if self.compares_ack else last
            if status & BIT["result_valid"] and inspection_id != consumed and self.acking.is_set():
                self.received.append(
                    {
                        "id": inspection_id,
                        "code": regs[REG["result_code"]],
                        "score": regs[REG["score"]],
                        "regions": regs[REG["region_count"]],
                        "pass": bool(status & BIT["pass"]),
                        "fail": bool(status & BIT["fail"]),
                        "defect": bool(status & BIT["defect"]),
                    }
                )
                self.write("ack", inspection_id)
                last = inspection_id
            time.sleep(0.003)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._program.join(5)
        self.client.close()
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        self.thread.join(5)


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
def bridge_config(tmp_path):
    path = tmp_path / "bridge.yaml"
    # A generous ack timeout: on a loaded CI machine the PLC loop may take a while to ack, which must not count.
    path.write_text("ack_timeout_ms: 3000\npoll_ms: 5\nheartbeat_ms: 100\nqueue_size: 32\n")
    return path


def recorded_ack(tmp_path: Path, seq: int) -> Path:
    """A --state-dir whose acked.json, as the bridge writes it, says the PLC acked `seq` of CAMERA."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "acked.json").write_text(json.dumps({"acked": {CAMERA: seq}}))
    return state


def bridge_command(daemon: Daemon | str, plc: Plc, config: Path, *extra: str) -> list[str]:
    """`inspectd bridge modbus` from `daemon`'s results endpoint (or an endpoint as given) to `plc`."""
    return [
        sys.executable,
        "-m",
        "inspectd",
        "bridge",
        "modbus",
        "--endpoint",
        daemon if isinstance(daemon, str) else daemon.endpoint,
        "--plc",
        f"127.0.0.1:{plc.port}",
        "--config",
        str(config),
        *extra,
    ]


class Bridge:
    def __init__(
        self,
        daemon: Daemon,
        plc: Plc,
        config: Path,
        topic: str = f"inspect.{STATION}.{CAMERA}.",
        extra: tuple[str, ...] = (),
        exec_under: tuple[str, ...] = (),
    ) -> None:
        self.proc = subprocess.Popen(
            [*exec_under, *bridge_command(daemon, plc, config, "--topic", topic, *extra)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.lines: list[str] = []  # its output as it comes
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")))
        self.reader.start()

        # Subscribed once the daemon's status messages reach it: trigger_ready rises. Read only after this bridge
        # said bridge_started (its start rewrote the status flags first): a bridge killed before it leaves its
        # trigger_ready on the PLC, and a test that took that for this one's would publish before it subscribed.
        def ready():
            assert self.proc.poll() is None, self.output()
            daemon.status()
            return any('"bridge_started"' in line for line in list(self.lines)) and (
                plc.field("status") & BIT["trigger_ready"]
            )

        wait(ready, 20, "the bridge to subscribe (trigger_ready)", interval=0.05)

    def output(self) -> str:
        """All it printed: whole once it has exited."""
        if self.proc.poll() is not None:
            self.reader.join(10)
        return "".join(self.lines)

    def stop(self) -> dict[str, dict]:
        """SIGTERM, a clean exit, and the bridge's JSON log events by name (the last of each)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        out = self.output()
        assert self.proc.returncode == 0, out
        events = {}
        for line in out.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                events[event["event"]] = event
        assert "bridge_stopped" in events, out
        return events


def reset_alarm(plc: Plc, timeout: float = 5) -> None:
    """Reset the latched alarm as a PLC program does: request it, and request again when the bridge has taken the
    request (alarm_reset back to 0) and kept the alarm. The bridge keeps it when it cannot tell the request from one
    written before the PLC saw the latch, which a loaded machine's timing can make of a single request."""
    deadline = time.monotonic() + timeout
    while plc.field("status") & BIT["alarm"]:
        plc.write("alarm_reset", 1)
        wait(lambda: not plc.field("alarm_reset"), deadline - time.monotonic(), "the bridge to take alarm_reset")
        # It writes alarm_reset back, then the status word: a moment between the two is no kept alarm.
        settle = min(deadline, time.monotonic() + 1)
        while plc.field("status") & BIT["alarm"] and time.monotonic() < settle:
            time.sleep(0.01)
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for the alarm to clear"


def test_every_verdict_lands_in_the_registers_in_order(plc, daemon, bridge_config):
    bridge = Bridge(daemon, plc, bridge_config, topic=f"inspect.{STATION}.")  # the station's every camera
    try:
        beat = plc.field("heartbeat")
        sent = []
        for seq in range(1, 13):
            verdict = ("ok", "defect", "error")[seq % 3]
            daemon.result(seq, verdict, score=seq / 10, regions=seq % 4 if verdict == "defect" else 0)
            sent.append((seq, verdict))
        wait(lambda: len(plc.received) >= len(sent), 15, "12 acknowledged results")
        assert [r["id"] for r in plc.received] == [seq for seq, _ in sent]
        for record, (seq, verdict) in zip(plc.received, sent):
            assert record["code"] == {"ok": 0, "defect": 1, "error": 2}[verdict]
            assert record["score"] == (0 if verdict == "error" else round(seq / 10 * 1000))
            assert record["regions"] == (seq % 4 if verdict == "defect" else 0)
            assert (record["pass"], record["fail"], record["defect"]) == (
                verdict == "ok",
                verdict != "ok",
                verdict == "defect",
            )
        # After the last ack result_valid falls; nothing missed, no gaps, no alarm; the heartbeat moves.
        wait(lambda: not plc.field("status") & BIT["result_valid"], 5, "result_valid to fall after the ack")
        assert plc.field("missed_acks") == 0 and plc.field("sequence_gaps") == 0
        assert not plc.field("status") & BIT["alarm"]
        wait(lambda: plc.field("heartbeat") > beat, 5, "the heartbeat to move (every 100 ms)")
        # The bridge serves the first camera it saw; another camera's result never reaches this block.
        daemon.result(13, camera="cam1")
        daemon.result(13)
        wait(lambda: len(plc.received) == 13, 5, "result 13")
        assert plc.received[-1]["id"] == 13
    finally:
        events = bridge.stop()
    assert events["result_refused"]["camera"] == "cam1" and events["bridge_stopped"]["other_camera"] == 1


def test_verdicts_reach_the_plc_under_the_bridge_units_seccomp_restrictions(plc, daemon, bridge_config):
    """The bridge unit's call filter, W^X memory and address families, set up as systemd sets them up
    (tests/unit_sandbox.py): ZeroMQ in, Modbus TCP out, a clean stop."""
    sandbox = (sys.executable, "-m", "tests.unit_sandbox", str(REPO / "systemd" / "inspectd-bridge@.service"))
    bridge = Bridge(daemon, plc, bridge_config, exec_under=sandbox)
    try:
        with open(f"/proc/{bridge.proc.pid}/status") as status:
            assert "Seccomp:\t2" in status.read()  # the bridge itself runs filtered
        for seq in range(1, 7):
            daemon.result(seq, ("ok", "defect")[seq % 2])
        wait(lambda: len(plc.received) >= 6, 15, "6 acknowledged results")
        assert [r["id"] for r in plc.received] == list(range(1, 7))
    finally:
        events = bridge.stop()
    assert "bridge_stopped" in events


def test_a_plc_that_stops_acking_counts_missed_acks_and_raises_the_alarm(plc, daemon, tmp_path):
    config = tmp_path / "short-ack.yaml"
    config.write_text("ack_timeout_ms: 1000\npoll_ms: 5\nheartbeat_ms: 100\n")
    bridge = Bridge(daemon, plc, config)
    try:
        daemon.result(1)
        wait(lambda: len(plc.received) == 1, 5, "the first acknowledged result")
        plc.acking.clear()
        daemon.result(2, "defect", regions=1)
        daemon.result(3)
        # Each unacknowledged result waits ack_timeout_ms (1 s), then counts and the bridge moves on.
        wait(lambda: plc.field("missed_acks") == 2, 5, "two missed acks")
        status = plc.field("status")
        assert status & BIT["alarm"]
        assert plc.field("inspection_id") == 3
        # The alarm is latched until the PLC resets it; acking again keeps results flowing.
        plc.acking.set()
        daemon.result(4)
        wait(lambda: plc.received and plc.received[-1]["id"] == 4, 5, "result 4 after acking resumed")
        assert plc.field("status") & BIT["alarm"]
        reset_alarm(plc)
        assert plc.field("alarm_reset") == 0
        assert plc.field("missed_acks") == 2
    finally:
        events = bridge.stop()
    # A warning, as every event that latches the alarm: a log filtered to warnings must say why it is up.
    assert events["ack_missed"]["seq"] == 3 and events["ack_missed"]["level"] == "warning", events["ack_missed"]


def test_a_sequence_gap_is_counted_and_raises_the_alarm(plc, daemon, bridge_config):
    bridge = Bridge(daemon, plc, bridge_config)
    try:
        for seq in (1, 2, 5):
            daemon.result(seq)
        wait(lambda: len(plc.received) == 3, 5, "three results")
        assert [r["id"] for r in plc.received] == [1, 2, 5]
        assert plc.field("sequence_gaps") == 2
        assert plc.field("status") & BIT["alarm"]
        assert plc.field("missed_acks") == 0
    finally:
        bridge.stop()


def test_a_seq_that_goes_backwards_raises_the_alarm(plc, daemon, bridge_config):
    """The daemon restarted without a journal (or with it wiped): its numbering starts again below what the PLC holds.

    Skipping 0 and 1 as stale would leave the line without verdicts until the seq caught up, and once the alarm was
    reset nothing would say so. The daemon publishes each seq once, so a seq that goes back is a new numbering, not a
    replay: the bridge hands it over, warns once (`sequence_backwards`, naming both seqs) and latches the alarm."""
    bridge = Bridge(daemon, plc, bridge_config)
    try:
        for seq in (7, 8, 9):
            daemon.result(seq)
        wait(lambda: len(plc.received) == 3, 5, "three results")
        assert not plc.field("status") & BIT["alarm"]
        for seq in (0, 1):  # the restarted daemon's first results
            daemon.result(seq)
        wait(lambda: len(plc.received) == 5, 5, "the new numbering's results")
        assert [r["id"] for r in plc.received] == [7, 8, 9, 0, 1]
        assert plc.field("status") & BIT["alarm"]
        assert plc.field("sequence_gaps") == 0
    finally:
        events = bridge.stop()
    assert events["bridge_stopped"]["seq_backwards"] == 1
    backwards = events["sequence_backwards"]
    assert backwards["seq"] == 0 and backwards["after"] == 9 and backwards["level"] == "warning"


def test_queue_overflow_drops_the_oldest_waiting_results_and_counts_them_as_gaps(plc, daemon, tmp_path):
    config = tmp_path / "small-queue.yaml"
    config.write_text("ack_timeout_ms: 3000\npoll_ms: 5\nheartbeat_ms: 100\nqueue_size: 2\n")
    bridge = Bridge(daemon, plc, config)
    try:
        plc.acking.clear()
        daemon.result(1)
        wait(lambda: plc.field("inspection_id") == 1, 5, "result 1 handed over")
        for seq in range(2, 7):  # arrive while the bridge waits for the ack of 1: only the newest two stay queued
            daemon.result(seq)
        time.sleep(0.3)
        plc.acking.set()
        wait(lambda: len(plc.received) == 3, 5, "three results")
        assert [r["id"] for r in plc.received] == [1, 5, 6]
        assert plc.field("sequence_gaps") == 3
        assert plc.field("status") & BIT["alarm"]
        assert plc.field("missed_acks") == 0
    finally:
        events = bridge.stop()
    assert events["bridge_stopped"]["overflow_drops"] == 3


def test_a_restarted_bridge_writes_no_stale_result(plc, daemon, bridge_config):
    """The daemon never publishes a seq twice, so what reaches a restarted bridge is after what the PLC holds; a seq
    at or below it is a renumbering, which test_a_resume_point_ahead_of_the_daemon... covers. Here: result_valid is
    down until a fresh result, and the fresh one follows the PLC's id without a gap."""
    bridge = Bridge(daemon, plc, bridge_config)
    for seq in (1, 2, 3):
        daemon.result(seq, "defect", regions=2)
    wait(lambda: len(plc.received) == 3, 5, "three results")
    bridge.stop()
    assert not plc.field("status") & BIT["result_valid"]

    # The PLC program forgets what it consumed (a PLC restart of its own), so only the bridge's rule prevents a repeat.
    plc.received.clear()
    plc.write("status", BIT["result_valid"] | BIT["defect"])  # a stale result_valid from before, as after a crash
    bridge = Bridge(daemon, plc, bridge_config)
    try:
        assert not plc.field("status") & BIT["result_valid"], "result_valid must stay down until a fresh result"
        daemon.result(4, "ok")
        wait(lambda: len(plc.received) >= 1, 5, "the fresh result")
        time.sleep(0.2)
        assert [r["id"] for r in plc.received] == [4]
        assert plc.received[0]["pass"]
        assert plc.field("sequence_gaps") == 0 and not plc.field("status") & BIT["alarm"]
    finally:
        events = bridge.stop()
    assert events["bridge_stopped"]["written"] == 1
    assert "resume_ahead_of_daemon" not in events


def test_a_resume_point_ahead_of_the_daemon_without_a_journal_hands_over_its_numbering_with_the_alarm(
    plc, daemon, bridge_config
):
    """The PLC holds 4000 (a bridge wrote it before the daemon's state was wiped, or another program did) and the
    daemon numbers from 0: every result used to be skipped as stale, silently, with trigger_ready up. The first result
    at or below the resume point says the numbering is not the one the PLC's id is from: one warning naming both
    numbers, the alarm, and the bridge hands over from that result on."""
    plc.holds(4000)
    log = LogLines(Bridge(daemon, plc, bridge_config))
    try:
        for seq in (0, 1, 2):
            daemon.result(seq)
        wait(lambda: [r["id"] for r in plc.received] == [0, 1, 2], 5, "the daemon's numbering handed over")
        assert plc.field("status") & BIT["alarm"] and plc.field("sequence_gaps") == 0
    finally:
        log.stop()
    warned = log.events("resume_ahead_of_daemon")
    assert len(warned) == 1 and warned[0]["level"] == "warning", warned
    assert warned[0]["resume_after"] == 4000 and warned[0]["seq"] == 0 and warned[0]["inspection_id"] == 4000
    stopped = log.events("bridge_stopped")[0]
    assert stopped["written"] == 3 and stopped["seq_backwards"] == 0, stopped


def test_with_a_journal_a_resume_point_ahead_of_the_daemons_numbering_resumes_on_it_with_the_alarm(
    plc, daemon, tmp_path, bridge_config
):
    """The bridge's state says the PLC acked 4000, but the daemon's journal ends at 5 (its state was wiped, or the
    bridge's state dir outlived a re-install): the catch-up used to take 4000 as delivered and drop every live result
    up to it, with no log line, no counter and no alarm. At start an ack past the journal may also be a power cut's
    (the journal lost its newest records), so the start only says so and the first live result decides: 6, at or
    below the ack, is a new numbering: one warning naming both numbers, the alarm, and the bridge hands over from it.
    Then the daemon's journal is switched off and its numbering restarts: the directory the bridge reads still ends at
    the recorded ack, so only the first live result can tell, and it does."""
    from inspectd.daemon.journal import Journal

    journal_dir = tmp_path / "journal"
    journal = Journal(journal_dir, max_bytes=1 << 20, fsync_interval_s=SYNC_S)
    state = recorded_ack(tmp_path, 4000)

    def line(seq: int, publish: bool = True) -> None:  # as the daemon does it: journalled, then published
        frames = daemon.encode(seq)
        journal.append(CAMERA, seq, frames)
        journal.flush()
        if publish:
            daemon.pub.send_multipart(frames)

    extra = ("--journal", str(journal_dir), "--state-dir", str(state))
    try:
        for seq in range(6):
            line(seq, publish=False)
        log = LogLines(Bridge(daemon, plc, bridge_config, extra=extra))
        try:
            for seq in range(6, 11):
                line(seq)
            wait(lambda: [r["id"] for r in plc.received] == list(range(6, 11)), 10, "6..10 live")
            assert plc.field("status") & BIT["alarm"] and plc.field("sequence_gaps") == 0
            reset_alarm(plc)
        finally:
            log.stop()
        past = log.events("resume_past_journal")
        assert len(past) == 1 and past[0]["resume_after"] == 4000 and past[0]["journal_newest"] == 5, past
        warned = log.events("resume_ahead_of_daemon")
        assert len(warned) == 1 and warned[0]["level"] == "warning", warned
        assert warned[0]["resume_after"] == 4000 and warned[0]["seq"] == 6, warned
        assert warned[0]["recorded_ack"] == 4000
        assert log.events("journal_resume")[0]["after"] == {CAMERA: 4000}
        assert json.loads((state / "acked.json").read_text()) == {"acked": {CAMERA: 10}}

        # The journal switched off, the numbering from 0 again: published, not journalled.
        log = LogLines(Bridge(daemon, plc, bridge_config, extra=extra))
        try:
            for seq in (0, 1, 2):
                daemon.result(seq)
            wait(lambda: [r["id"] for r in plc.received][5:] == [0, 1, 2], 10, "the new numbering handed over")
            assert plc.field("status") & BIT["alarm"] and plc.field("sequence_gaps") == 0
        finally:
            log.stop()
        warned = log.events("resume_ahead_of_daemon")
        assert len(warned) == 1 and warned[0]["resume_after"] == 10 and warned[0]["seq"] == 0, warned
        stopped = log.events("bridge_stopped")[0]
        assert stopped["written"] == 3, stopped
    finally:
        journal.close()


def test_after_a_power_cut_an_ack_past_the_journal_is_a_gap_from_the_ack_not_a_renumbering(
    plc, daemon, tmp_path, bridge_config
):
    """acked.json is fsynced at each ack, the journal every fsync_interval_s, so a power cut of a running line leaves
    the ack (1000) past the journal's newest (995); the daemon comes back numbering past its synced reservation
    (1024). Taken for a renumbering at start, every such cut warned that the daemon's numbering restarted, and counted
    996..1000, which the PLC had, as missing. The first result, above the ack, says the journal lost its tail: no
    warning, and what is missing is 1001..1023, from the ack."""
    state = recorded_ack(tmp_path, 1000)
    plc.holds(1000)
    line = Line(daemon, tmp_path / "journal")
    try:
        for seq in range(996):
            line.journal.append(CAMERA, seq, daemon.encode(seq))
        line.journal.flush()
        extra = ("--journal", str(tmp_path / "journal"), "--state-dir", str(state))
        log = LogLines(Bridge(daemon, plc, bridge_config, extra=extra))
        try:
            line(1024)
            wait(lambda: [r["id"] for r in plc.received] == [1024], 10, "1024 handed over")
            assert plc.field("sequence_gaps") == 23 and plc.field("status") & BIT["alarm"]
        finally:
            log.stop()
    finally:
        line.close()
    assert not log.events("resume_ahead_of_daemon")
    past = log.events("resume_past_journal")
    assert len(past) == 1 and past[0]["resume_after"] == 1000 and past[0]["journal_newest"] == 995, past
    assert past[0]["level"] == "info" and past[0]["recorded_ack"] == 1000
    gaps = log.events("gap")
    assert [(g["first"], g["last"]) for g in gaps] == [(1001, 1023)] and "never journalled" in gaps[0]["reason"], gaps
    stopped = log.events("bridge_stopped")[0]
    assert stopped["sequence_gaps"] == 23 and stopped["written"] == 1 and stopped["seq_backwards"] == 0, stopped
    assert json.loads((state / "acked.json").read_text()) == {"acked": {CAMERA: 1024}}


def test_a_plc_id_ahead_of_the_daemon_and_of_its_recorded_ack_resumes_after_the_journals_newest(
    plc, daemon, tmp_path, bridge_config
):
    """The block holds 50000 while the state file says the PLC acked 100 and the journal holds 0..200. Such an id is
    what missed acks leave too (the bridge moves on and writes the next ids, the PLC taking them or not), so the ack
    does not say what the PLC took: resuming after it would hand 101..200 over again. The bridge resumes after the
    journal's newest, with one warning and the alarm, and hands over the live results."""
    state = recorded_ack(tmp_path, 100)
    plc.holds(50000)
    line = Line(daemon, tmp_path / "journal")
    try:
        for seq in range(201):
            line.journal.append(CAMERA, seq, daemon.encode(seq))
        line.journal.flush()
        extra = ("--journal", str(tmp_path / "journal"), "--state-dir", str(state))
        log = LogLines(Bridge(daemon, plc, bridge_config, extra=extra))
        try:
            for seq in range(201, 204):
                line(seq)
            wait(lambda: [r["id"] for r in plc.received][-1:] == [203], 20, "201..203")
            time.sleep(0.2)
            assert plc.field("status") & BIT["alarm"] and plc.field("sequence_gaps") == 0
        finally:
            log.stop()
    finally:
        line.close()
    assert [r["id"] for r in plc.received] == [201, 202, 203]
    warned = log.events("resume_ahead_of_daemon")
    assert len(warned) == 1 and warned[0]["level"] == "warning", warned
    assert warned[0]["inspection_id"] == 50000 and warned[0]["recorded_ack"] == 100, warned
    assert warned[0]["journal_newest"] == 200
    assert log.events("journal_resume")[0]["after"] == {CAMERA: 200}
    stopped = log.events("bridge_stopped")[0]
    assert stopped["sequence_gaps"] == 0, stopped


@pytest.mark.parametrize("heartbeat", [0, 65535], ids=["fresh-plc", "cleared-id"])
def test_a_full_width_inspection_id_of_0_is_a_fresh_plc_whatever_the_heartbeat(plc, daemon, bridge_config, heartbeat):
    """The registers hold a seq's low 32 bits, so residue 0 comes round only every 2**32 seqs (years), while a PLC
    program or an operator that clears the id after a result leaves the bridge's heartbeat beside it: taken for
    residue 0, the cleared id would be placed at seq 0 and a journal handed over again. A full-width 0 is no id: the
    PLC gets the first result with no gap. (A narrow id with no recorded ack tells the two apart by the heartbeat:
    tests/test_handshake.py.)"""
    gaps = 0
    plc.write("heartbeat", heartbeat)
    bridge = Bridge(daemon, plc, bridge_config)
    try:
        daemon.result(5)
        wait(lambda: [r["id"] for r in plc.received] == [5], 5, "result 5")
        assert plc.field("sequence_gaps") == gaps and bool(plc.field("status") & BIT["alarm"]) == bool(gaps)
    finally:
        events = bridge.stop()
    assert events["plc_adopted"]["resume_after"] == (0 if gaps else None)


def test_the_heartbeat_register_counts_1_to_65535_and_never_reads_0(plc):
    """A restart reads an inspection id of 0 next to a heartbeat of 0 as a fresh PLC, so the bridge's heartbeat skips
    0 where the register wraps, through the Modbus adapter and the handshake as the bridge's tick drives them."""
    import argparse

    from inspectd.clients import plc as modbus
    from inspectd.clients.handshake import Handshake

    async def beats() -> list[int]:
        config = modbus.parse_bridge_config({})
        link = await modbus.connect(config, argparse.Namespace(plc=f"127.0.0.1:{plc.port}", unit=None))
        try:
            [(_, target)] = link.slots()
            handshake = Handshake(target, config, CAMERA)
            seen = []
            for beat in (1, 65535, 65536, 65537, 2 * 65535 + 1):
                await handshake.service(beat)
                seen.append(plc.field("heartbeat"))
            return seen
        finally:
            await link.close()

    assert asyncio.run(beats()) == [1, 65535, 1, 2, 1]


def test_curve_encrypted_results_reach_the_plc_with_the_bridge_keys(plc, tmp_path, bridge_config):
    from inspectd.daemon.security import CurveServer
    from inspectd.protocol import keys

    server_public, server_secret = keys.generate(tmp_path / "keys", "server")
    bridge_public, bridge_secret = keys.generate(tmp_path / "keys", "bridge1")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "bridge1.key").write_bytes(bridge_public.read_bytes())
    daemon = Daemon(curve=CurveServer("publish", server_secret, allowed))
    try:
        bridge = Bridge(
            daemon, plc, bridge_config, extra=("--server-key", str(server_public), "--client-key", str(bridge_secret))
        )
        try:
            daemon.result(1, "defect", regions=2)
            wait(lambda: len(plc.received) == 1, 5, "the result over CURVE")
            assert plc.received[0]["id"] == 1 and plc.received[0]["defect"] and plc.received[0]["regions"] == 2
        finally:
            bridge.stop()
        # Given a server key that is not the daemon's, a bridge is shut out: its log says why, where trigger_ready
        # staying down alone would read as a daemon that is down.
        keyed = ("--server-key", str(bridge_public), "--client-key", str(bridge_secret))
        wrong = subprocess.Popen(
            bridge_command(daemon, plc, bridge_config, *keyed),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        log = LogLines(wrong)
        try:
            wait(lambda: log.events("handshake_failed"), 15, "the bridge to say why it hears nothing")
            time.sleep(0.5)  # more failed handshakes meanwhile: the same cause is not logged again
            assert not plc.field("status") & BIT["trigger_ready"]
        finally:
            log.stop()
        refused = log.events("handshake_failed")
        assert len(refused) == 1 and "a --server-key that is not its public key" in refused[0]["error"], refused
    finally:
        daemon.close()


@pytest.mark.timeout(120)  # the bridge's start and three backoff waits on a loaded machine
def test_a_bridge_shut_out_by_an_emptied_allow_list_hands_the_plc_results_again_once_its_key_is_back(
    plc, pki, tmp_path, bridge_config
):
    """Revoking the bridge's key (the allow-list emptied, a reload) and putting it back (refilled, a reload) must leave
    a bridge that hands the PLC results again, without a restart: libzmq never retries a connection whose key was
    refused, so the bridge opens a new socket itself, with backoff. It logs once why it is shut out and once when it
    is let in; what was published meanwhile is filled from the journal, every seq handed over once, in order."""
    from types import SimpleNamespace

    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import Judged
    from inspectd.daemon.journal import Journal
    from inspectd.daemon.publish import Publisher
    from inspectd.daemon.security import CurveServer
    from station_model import QUIET_STATUS

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("publish", pki["server"][1], pki["allow_dir"])
    journal = Journal(tmp_path / "journal", max_bytes=1 << 20, fsync_interval_s=SYNC_S)
    pub = Publisher(
        endpoint, STATION, status_interval_s=0.1, socket_options=guard, status=lambda: QUIET_STATUS, journal=journal
    ).start()
    published = [0]

    def result() -> None:  # the daemon's own path: journalled, then published
        published[0] += 1
        frame = Frame(CAMERA, published[0], f"f{published[0]}", time.time(), None, error="x")
        pub.submit(Judged(frame, "error", None, None, "m", 1, [], None, "x"))

    listed = pki["allow_dir"] / "bridge1.key"
    key_file = listed.read_bytes()
    keyed = ("--server-key", str(pki["server"][0]), "--client-key", str(pki["allowed"][1]))
    try:
        # The publisher sends its own status: the Bridge helper's status() need not.
        daemon = SimpleNamespace(endpoint=endpoint, status=lambda: None)
        log = LogLines(Bridge(daemon, plc, bridge_config, extra=(*keyed, "--journal", str(tmp_path / "journal"))))
        try:
            for _ in range(5):
                result()
            wait(lambda: len(plc.received) == 5, 10, "results 1-5")

            listed.unlink()  # every key revoked, as DEPLOY.md says: the list emptied, then a reload
            assert [r.split()[0] for r in guard.reload()["removed"]] == ["bridge1.key"]
            pub.drop_peers()
            wait(lambda: log.events("handshake_failed"), 15, "the bridge to say it is shut out")
            for _ in range(5):  # published while it is shut out: 6-10
                result()
            # It tries again with a new socket, and is refused again (told once all the same).
            first_refusals = guard.refused
            wait(lambda: guard.refused >= first_refusals + 2, 20, "two more tries, each on a new socket")
            assert len(plc.received) == 5 and not plc.field("status") & BIT["trigger_ready"]

            listed.write_bytes(key_file)  # the key put back, and the list reloaded
            assert [a.split()[0] for a in guard.reload()["added"]] == ["bridge1.key"]
            deadline = time.monotonic() + 20  # past the bridge's wait before its next socket, however it fell
            while not any(r["id"] > 10 for r in plc.received):
                assert time.monotonic() < deadline, ("never let in again", plc.received, log.lines)
                result()
                time.sleep(0.2)
            last = published[0]
            wait(lambda: len(plc.received) >= last, 10, "every result published up to now")
            wait(lambda: plc.field("status") & BIT["trigger_ready"], 5, "trigger_ready up again")
        finally:
            log.stop()
    finally:
        pub.stop(5)
        journal.close()
        guard.stop()
    ids = [r["id"] for r in plc.received]
    assert ids == list(range(1, last + 1)), ids
    refused = log.events("handshake_failed")
    assert len(refused) == 1 and "refused this client's key" in refused[0]["error"], refused
    readmitted = log.events("readmitted")
    assert len(readmitted) == 1 and readmitted[0]["reopened"] >= 2, readmitted
    stopped = log.events("bridge_stopped")[-1]
    assert stopped["journal_recovered"] >= 5 and stopped["gaps_unfilled"] == 0, stopped


def test_cli_refuses_bad_arguments_with_one_line(tmp_path):
    bad = tmp_path / "bridge.yaml"
    bad.write_text("registers:\n  score: 2\n")
    # A bridge whose camera's results the topic never takes would hold trigger_ready up for parts it can never hand a
    # verdict of; a camera taken from the topic is a camera id like any other.
    config = tmp_path / "cam1.yaml"
    config.write_text("camera: cam1\n")
    plc = ["--plc", "127.0.0.1:1"]
    for args, expected in [
        (["--plc", "nohost"], "--plc 'nohost': expected HOST:PORT"),
        (["--plc", "127.0.0.1:502", "--config", str(bad)], "registers.score: address 2 overlaps"),
        (["--plc", "127.0.0.1:502", "--server-key", str(bad)], "expected both (CurveZMQ) or neither"),
        ([*plc, "--topic", "inspect.st1.cam 0."], "--topic 'inspect.st1.cam 0.': expected a camera id"),
        ([*plc, "--topic", "inspect.st1.cam0.", "--config", str(config)], "camera cam1: --topic 'inspect.st1.cam0.'"),
        ([*plc, "--topic", "inspect.st1.cam0", "--config", str(config)], "camera cam1: --topic 'inspect.st1.cam0'"),
        # Without the dot after it a camera's prefix takes cam10..cam19 as well, and a block without a camera bound to
        # whichever was heard first, and kept that binding in acked.json across restarts.
        ([*plc, "--topic", "inspect.st1.cam1"], "--topic 'inspect.st1.cam1': expected inspect.<station>.<camera>. "),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "inspectd", "bridge", "modbus", "--endpoint", "tcp://127.0.0.1:1", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_endpoint_zeromq_cannot_use_is_one_line_before_the_plc_is_touched(plc, bridge_config):
    """In the words subscribe, web and the control clients use; a PLC written to by a bridge that then died would
    show a stale or half-set status to the line."""
    plc.acking.clear()  # the PLC program writes nothing itself, so any change is the bridge's
    before = list(range(1, 15))  # a value in every register, which the bridge's start would clear or overwrite
    assert not plc.client.write_registers(0, before, device_id=1).isError()
    # Past the endpoint rule every client checks, ZeroMQ's own refusal is the last check.
    endpoint = "tcp://no host:5556"
    result = subprocess.run(
        bridge_command(endpoint, plc, bridge_config),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"inspectd bridge: --endpoint {endpoint!r}: cannot connect ("), line
    assert line.endswith("expected tcp://HOST:PORT or ipc://PATH"), line
    assert plc.registers() == before


def test_an_endpoint_no_daemon_could_be_configured_with_is_refused_in_the_other_clients_words(plc, bridge_config):
    """libzmq took a tcp port above 65535 cut to 16 bits (another daemon's or nobody's) and port 0, and the bridge
    opened and wrote the PLC, then waited on them in silence; '', a wildcard and a path too long for a socket were
    each told in ZeroMQ's words, not in those of subscribe, web and ctl."""
    plc.acking.clear()  # the PLC program writes nothing itself, so any change is the bridge's
    before = list(range(1, 15))
    assert not plc.client.write_registers(0, before, device_id=1).isError()
    port = "a number from 1 to 65535 (* and 0 are only for a bind)"
    long_ipc = "ipc:///" + "a" * 120
    for endpoint, expected in (
        (
            "tcp://127.0.0.1:71092",
            f"expected tcp://HOST:PORT, PORT the daemon's port, {port}, got 'tcp://127.0.0.1:71092'",
        ),
        ("tcp://127.0.0.1:0", f"expected tcp://HOST:PORT, PORT the daemon's port, {port}, got 'tcp://127.0.0.1:0'"),
        ("tcp://127.0.0.1:*", f"expected tcp://HOST:PORT, PORT the daemon's port, {port}, got 'tcp://127.0.0.1:*'"),
        ("", "expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH), got ''"),
        (long_ipc, "'ipc:///aaaaaaaaaaaaaaa...aaaaaaaaaaaaaaaaaaaaaaa': its path is 121 bytes, expected at most"),
    ):
        result = subprocess.run(
            bridge_command(endpoint, plc, bridge_config), cwd=REPO, capture_output=True, text=True, timeout=30
        )
        line = result.stderr.strip()
        assert result.returncode == 2 and "\n" not in line, (endpoint, result.stderr)
        assert line.startswith(f"inspectd bridge: --endpoint: {expected}"), line
        assert plc.registers() == before


def test_bridge_config_errors_name_the_key():
    cases = [
        ({"registers": {"scroe": 3}}, "bridge.registers.scroe: unknown key (known: status, inspection_id,"),
        ({"registers": {"score": "4"}}, "bridge.registers.score: expected an integer, got '4'"),
        ({"registers": {"ack": 65535}}, "bridge.registers.ack: a 32-bit register needs two addresses"),
        ({"status_bits": {"alarm": 1}}, "bridge.status_bits.alarm: bit 1 is already result_valid"),
        ({"ack_timeout_ms": 0}, "bridge.ack_timeout_ms: expected at least 1, got 0"),
        ({"poll_ms": "10"}, "bridge.poll_ms: expected a number, got '10'"),
        ({"queue_size": 0}, "bridge.queue_size: expected at least 1, got 0"),
        ({"queue_size": 1.5}, "bridge.queue_size: expected an integer, got 1.5"),
        ({"status_bits": {"pass": 16}}, "bridge.status_bits.pass: expected at most 15, got 16"),
        ({"speed": 1}, "bridge.speed: unknown key"),
        ({"camera": ""}, "bridge.camera: expected a camera id"),
        (
            {"camera": "cam 0"},
            "bridge.camera: expected a camera id ([a-zA-Z0-9_-]+, at most 64 characters: it begins file names), got "
            "'cam 0'",
        ),
        ({"score_scale": 1e7}, "bridge.score_scale: expected at most 1000000"),
        ({"request_timeout_ms": 5000}, "bridge.request_timeout_ms: expected at most 1000"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError) as err:
            parse_bridge_config(raw)
        assert message in str(err.value), (raw, str(err.value))
    moved = parse_bridge_config({"registers": {"status": 100, "inspection_id": 101}})
    assert moved.registers["status"] == 100 and moved.registers["result_code"] == REG["result_code"]


def test_scaled_score_is_clamped_to_a_register():
    assert scaled_score(0.4567, 1000) == 457
    assert scaled_score(-1.0, 1000) == 0
    assert scaled_score(1e9, 1000) == 65535
    assert scaled_score(1e306, 1000) == 65535  # the product is past a float's range
    assert scaled_score(-1e306, 1000) == 0
    assert scaled_score(1e306, 1e6) == 65535
    assert scaled_score(None, 1000) == 0
    assert scaled_score(float("nan"), 1000) == 0


def test_the_shipped_example_config_is_the_defaults():
    from inspectd.clients.plc import load_bridge_config

    assert load_bridge_config(REPO / "deploy" / "bridge.example.yaml") == parse_bridge_config({})


def test_bridge_config_file_errors_name_the_file_and_the_key(tmp_path):
    from inspectd.clients.plc import load_bridge_config

    path = tmp_path / "bridge.yaml"
    path.write_text("unit: 1\nstatus_bits:\n  alarm: 7\n  fail: 7\n")
    with pytest.raises(ConfigError) as refused:
        load_bridge_config(path)
    assert str(refused.value) == f"{path}.status_bits.alarm: bit 7 is already fail"
    path.write_text("unit: 1\nregisters:\n  score: 20\n  score: 21\n")
    with pytest.raises(ConfigError) as refused:
        load_bridge_config(path)
    assert str(refused.value) == f"{path}:4: registers.score: duplicate key (first on line 3), expected each key once"


def test_unreadable_bridge_yaml_is_one_config_error_naming_the_file(tmp_path):
    from inspectd.clients.plc import load_bridge_config
    from inspectd.errors import ConfigError

    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("registers: {status: 0\n", encoding="utf-8")
    nested = tmp_path / "nested.yaml"
    nested.write_text("[" * 100_000, encoding="utf-8")
    for path in (malformed, nested, tmp_path / "absent.yaml"):
        with pytest.raises(ConfigError) as refused:
            load_bridge_config(path)
        message = str(refused.value)
        assert message.startswith(str(path)) and "\n" not in message, message


def test_a_plc_that_restarts_between_two_requests_ends_the_bridge_so_the_restart_rule_runs(plc, daemon, tmp_path):
    """A PLC whose Modbus server goes away and is back before the bridge's next request (registers reset) must end
    the bridge as one that stays away does: only the service manager's restart runs the restart rule and writes the
    status word into the fresh registers. A client that reconnected by itself would carry on none the wiser."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 3000\npoll_ms: 5\nheartbeat_ms: 1000\n")  # the restart fits between two beats
    bridge = Bridge(daemon, plc, config)
    beat = plc.field("heartbeat")
    wait(lambda: plc.field("heartbeat") != beat, 5, "a heartbeat")
    plc.restart()
    try:
        bridge.proc.wait(15)
    except subprocess.TimeoutExpired:
        bridge.proc.kill()
        raise AssertionError("the bridge carried on over a PLC that restarted") from None
    out = bridge.output()
    assert bridge.proc.returncode == 1, out
    # The bridge polls alarm_reset between beats, so the request that meets the restart may be a read or a write.
    last = out.strip().splitlines()[-1]
    assert last.startswith(("inspectd bridge: PLC write of", "inspectd bridge: PLC read of")), out
    assert "Traceback" not in out, out


def test_a_status_word_the_plc_clears_is_written_again_at_the_next_heartbeat(plc, daemon, bridge_config):
    """A PLC program's init routine, an HMI or an operator zeroing the interface leaves trigger_ready down while the
    heartbeat says the bridge is alive: the bridge writes the status word every heartbeat, not only on a change."""
    bridge = Bridge(daemon, plc, bridge_config)
    try:
        plc.write("status", 0)

        def ready_again():
            daemon.status()  # the daemon's 1 Hz status: the bridge must not see it as silent meanwhile
            return plc.field("status") & BIT["trigger_ready"]

        wait(ready_again, 5, "trigger_ready written again (heartbeat 100 ms)", interval=0.05)
    finally:
        bridge.stop()


def test_seq_0_on_a_fresh_plc_that_does_not_ack_is_a_missed_ack_not_an_ack(plc, daemon, tmp_path):
    """The daemon numbers from 0 and a fresh PLC's ack reads 0: taken for the ack, the PLC's first verdict would be
    dropped at once with no missed ack, no alarm, and recorded as acknowledged."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 500\npoll_ms: 5\nheartbeat_ms: 100\n")
    state = tmp_path / "state"
    plc.acking.clear()  # the PLC program acknowledges nothing
    bridge = Bridge(daemon, plc, config, extra=("--state-dir", str(state)))
    try:
        daemon.result(0)
        wait(lambda: plc.field("missed_acks") == 1, 10, "seq 0 to count as a missed ack")
        assert plc.field("status") & BIT["alarm"] and plc.field("inspection_id") == 0
        plc.acking.set()
        daemon.result(1)
        wait(lambda: [r["id"] for r in plc.received] == [1], 10, "result 1, acked")
        wait(lambda: not plc.field("status") & BIT["result_valid"], 5, "result_valid to fall after the ack")
    finally:
        events = bridge.stop()
    stopped = events["bridge_stopped"]
    assert (stopped["written"], stopped["acked"], stopped["missed_acks"]) == (2, 1, 1), stopped
    assert json.loads((state / "acked.json").read_text())["acked"] == {CAMERA: 1}


def test_a_plc_program_comparing_the_id_with_its_own_ack_takes_seq_0_of_a_fresh_daemon_and_plc(daemon, tmp_path):
    """The program docs/PLC.md outlines: IF result_valid AND inspection_id <> ack THEN act; ack := inspection_id. A
    fresh PLC's ack is 0, and so is a fresh daemon's first seq: the bridge sets ack to the id before (0xFFFFFFFF)
    ahead of writing seq 0, so the program takes seq 0 like the others, with no missed ack and no alarm."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 3000\npoll_ms: 5\nheartbeat_ms: 100\n")
    plc = Plc(compares_ack=True)
    try:
        bridge = Bridge(daemon, plc, config)
        try:
            assert plc.field("ack") == 0 and plc.field("inspection_id") == 0
            for seq in (0, 1, 2):
                daemon.result(seq)
            wait(lambda: [r["id"] for r in plc.received] == [0, 1, 2], 10, "the program to take seqs 0, 1 and 2")
            wait(lambda: not plc.field("status") & BIT["result_valid"], 5, "result_valid to fall after the last ack")
            assert not plc.field("status") & BIT["alarm"]
            assert (plc.field("missed_acks"), plc.field("sequence_gaps"), plc.field("ack")) == (0, 0, 2)
        finally:
            events = bridge.stop()
    finally:
        plc.close()
    stopped = events["bridge_stopped"]
    assert (stopped["written"], stopped["acked"], stopped["missed_acks"]) == (3, 3, 0), stopped
    assert "ack_missed" not in events, events


def test_a_status_whose_healthy_is_not_literally_true_counts_as_unhealthy(plc, daemon, bridge_config):
    """A "healthy" of "false" (a string) is no health: only true raises trigger_ready."""
    bridge = Bridge(daemon, plc, bridge_config)
    try:

        def unhealthy():
            daemon.status(healthy="false")  # type: ignore[arg-type]
            return plc.field("status") & BIT["daemon_unhealthy"]

        wait(unhealthy, 5, "daemon_unhealthy from a healthy of 'false'", interval=0.05)
        assert not plc.field("status") & BIT["trigger_ready"]
    finally:
        bridge.stop()


def test_a_huge_finite_score_is_clamped_into_the_register_and_the_bridge_goes_on(plc, daemon, bridge_config):
    """score x score_scale past a float's range has no integer: the bridge must clamp it, not die on it (and with a
    journal, die again on every restart's replay of it)."""
    bridge = Bridge(daemon, plc, bridge_config)
    try:
        daemon.result(1, score=1e306)
        daemon.result(2, score=-1e306)
        daemon.result(3, score=0.25)
        wait(lambda: len(plc.received) == 3, 10, "three acknowledged results")
        assert [r["score"] for r in plc.received] == [65535, 0, 250]
    finally:
        bridge.stop()


def test_a_plc_that_goes_away_ends_the_bridge_with_one_line_for_the_service_manager(plc, daemon, bridge_config):
    bridge = Bridge(daemon, plc, bridge_config)
    plc.close()  # the PLC's server shuts down: the next heartbeat write fails
    try:
        bridge.proc.wait(15)
    except subprocess.TimeoutExpired:
        bridge.proc.kill()
        raise AssertionError("the bridge kept running without its PLC") from None
    out = bridge.output()
    assert bridge.proc.returncode == 1, out
    assert out.strip().splitlines()[-1].startswith("inspectd bridge: PLC"), out


def test_a_refused_register_write_ends_the_bridge_with_trigger_ready_and_result_valid_dropped(plc, daemon, tmp_path):
    """A result is valid and waits for its ack when the PLC starts refusing writes to the heartbeat register (an
    exception response): the bridge exits 1 with that error, having first dropped trigger_ready and result_valid, the
    cut result counted as a missed ack as at a stop. The PLC must not take a bridge that is gone for ready, nor the
    result it left for valid."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 20000\npoll_ms: 5\nheartbeat_ms: 100\n")
    plc.acking.clear()  # the PLC program acknowledges nothing
    bridge = Bridge(daemon, plc, config)
    try:
        daemon.result(1)
        wait(lambda: plc.field("status") & BIT["result_valid"], 10, "result 1 valid, waiting for its ack")
        daemon.status()  # heard just now: no silence of the daemon takes trigger_ready down before the failure
        plc.refused.add(REG["heartbeat"])
        bridge.proc.wait(15)
    except BaseException:
        bridge.proc.kill()
        raise
    out = bridge.output()
    assert bridge.proc.returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"inspectd bridge: PLC write of registers {REG['heartbeat']}.."), out
    status = plc.field("status")
    assert not status & (BIT["trigger_ready"] | BIT["result_valid"]), f"status word {status:#06x}\n{out}"
    assert status & BIT["alarm"] and plc.field("missed_acks") == 1, out


def kill_and_restart(
    plc,
    daemon,
    tmp_path,
    how: str,
    reset: bool,
    hold_ack: bool = False,
    topic: str = f"inspect.{STATION}.{CAMERA}.",
    forget: bool = False,
):
    """Results stream (as the daemon does it: journalled, then published, ~100 a second); the bridge is stopped with
    `how` (SIGKILL or SIGTERM) mid-stream, results keep coming while it is down, the PLC's registers are reset when
    `reset` and the state file is deleted when `forget`, then a new bridge on the same state directory and `topic`
    catches up. With `hold_ack` the kill comes while the PLC holds back the ack of the result on it (the bridge's
    usual state: waiting for an ack). Returns (the ids the PLC program consumed, in order; the count consumed before
    the kill; the two runs' log events)."""
    from inspectd.daemon.journal import Journal

    config = tmp_path / "bridge.yaml"
    # A queue far smaller than what piles up while the bridge is down: the catch-up must not overflow it.
    config.write_text("ack_timeout_ms: 5000\npoll_ms: 5\nheartbeat_ms: 100\nqueue_size: 16\n")
    journal_dir = tmp_path / "journal"
    journal = Journal(journal_dir, max_bytes=1 << 24, fsync_interval_s=0.5)
    last = 300
    published: list[int] = []
    stop = threading.Event()
    # The line is held at two points so that a loaded machine cannot reorder the story: the kill comes before 100
    # (so 50 and more are published while the bridge is down), and the last 10 come after the new bridge subscribed
    # (a bridge serving the first camera heard binds only on a live result; a line that ended while it started up
    # would leave it waiting for a part that never comes).
    killed, restarted = threading.Event(), threading.Event()
    holds = {101: killed, last - 9: restarted}

    def line() -> None:
        for seq in range(1, last + 1):
            if seq in holds:
                holds[seq].wait(60)
            if stop.is_set():
                return
            frames = daemon.encode(seq)
            journal.append(CAMERA, seq, frames)
            daemon.pub.send_multipart(frames)
            published.append(seq)
            if seq % 20 == 0:
                daemon.status()
            time.sleep(0.01)

    extra = ("--journal", str(journal_dir), "--state-dir", str(tmp_path / "state"))
    bridge = Bridge(daemon, plc, config, topic, extra=extra)
    producer = threading.Thread(target=line, daemon=True)
    producer.start()
    first_run: dict[str, dict] = {}
    try:
        wait(lambda: len(plc.received) >= 40, 20, "40 results handed over")
        if hold_ack:
            plc.acking.clear()
            taken = len(plc.received)
            wait(
                lambda: (
                    plc.field("inspection_id") > plc.received[taken - 1]["id"]
                    and plc.field("status") & BIT["result_valid"]
                ),
                10,
                "a result on the PLC waiting for its ack",
            )
        if how == "kill":
            bridge.proc.kill()
            bridge.proc.wait(10)
        else:
            first_run = bridge.stop()  # SIGTERM: a clean exit 0 within TimeoutStopSec
        killed.set()
        at_kill = len(plc.received)
        down = len(published)
        if reset:
            plc.reset()
        if forget:
            (tmp_path / "state" / "acked.json").unlink()
        plc.acking.set()
        wait(lambda: len(published) >= down + 50, 20, "50 results published while the bridge is down")
        bridge = Bridge(daemon, plc, config, topic, extra=extra)
        restarted.set()
        producer.join(30)
        wait(lambda: plc.received and plc.received[-1]["id"] == last, 30, "the last result handed over")
        time.sleep(0.2)
    finally:
        stop.set()
        killed.set()
        restarted.set()
        events = bridge.stop()
        journal.close()
    return [r["id"] for r in plc.received], at_kill, first_run, events


@pytest.mark.parametrize(
    "how, reset, hold_ack",
    [("kill", False, False), ("term", False, False), ("kill", True, True), ("term", True, False)],
    ids=["sigkill", "sigterm", "sigkill-plc-reset", "sigterm-plc-reset"],
)
def test_a_bridge_killed_mid_stream_and_restarted_hands_every_seq_to_the_plc_once_in_order(
    plc, daemon, tmp_path, how, reset, hold_ack
):
    """The restarted bridge resumes after the later of the PLC's inspection id and the last id the PLC acknowledged
    as the bridge's state file recorded it, replays the journal from there and goes live. With the PLC's registers
    reset only the state file knows where to resume; a SIGTERM lets the result on the PLC finish its handshake."""
    last = 300
    ids, _, first_run, events = kill_and_restart(plc, daemon, tmp_path, how, reset, hold_ack)
    assert ids == list(range(1, last + 1)), [i for i in range(1, last + 1) if ids.count(i) != 1][:10]
    assert events["journal_resume"]["after"]["cam0"] >= 40
    assert events["bridge_stopped"]["journal_replayed"] >= 50  # what was published while it was down
    assert events["bridge_stopped"]["sequence_gaps"] == 0 and events["bridge_stopped"]["overflow_drops"] == 0
    assert events["bridge_stopped"]["missed_acks"] == 0
    assert "journal_not_current" not in events  # the journal the daemon writes holds each live result
    if how == "term":
        assert first_run["bridge_stopped"]["missed_acks"] == 0  # the stop waited for the ack, it did not give up
    state = json.loads((tmp_path / "state" / "acked.json").read_text())
    assert state == {"acked": {CAMERA: last}}


@pytest.mark.parametrize(
    "how, reset, forget",
    [("kill", False, False), ("term", True, False), ("kill", False, True)],
    ids=["sigkill", "sigterm-plc-reset", "sigkill-state-lost"],
)
def test_a_bridge_serving_the_first_camera_heard_catches_up_once_that_camera_is_heard(
    plc, daemon, tmp_path, how, reset, forget
):
    """No camera named (`camera: null`, a --topic naming only the station): the slot binds to the first camera whose
    result arrives, and only then is it known where that camera resumes (its recorded ack, the PLC's id; the state
    file lost, the PLC's id alone); its replay comes before that live result, so every seq still reaches the PLC
    once, in order."""
    last = 300
    ids, _, _, events = kill_and_restart(plc, daemon, tmp_path, how, reset, topic=f"inspect.{STATION}.", forget=forget)
    assert ids == list(range(1, last + 1)), [i for i in range(1, last + 1) if ids.count(i) != 1][:10]
    assert events["camera_bound"]["camera"] == CAMERA and events["camera_bound"]["resume_after"] >= 40
    assert events["bridge_stopped"]["journal_replayed"] >= 50
    assert events["bridge_stopped"]["sequence_gaps"] == 0 and events["bridge_stopped"]["overflow_drops"] == 0
    assert json.loads((tmp_path / "state" / "acked.json").read_text()) == {"acked": {CAMERA: last}}


@pytest.mark.parametrize("state", ["running", None, "failed"], ids=["camera-runs", "camera-gone", "camera-failed"])
def test_a_bridge_serving_the_first_camera_heard_catches_up_on_a_quiet_line_from_the_daemons_status(
    plc, daemon, bridge_config, tmp_path, state
):
    """A `camera: null` bridge restarted while the line stands still, its state file recording two cameras (the
    block's, and one it served long ago): the results published while it was down are owed to the PLC now (the parts
    may wait at the reject gate), not at the next part. The daemon's status message lists only one of the recorded
    cameras, so the block binds to it and the replay comes at once. Where the status does not list it (renamed,
    removed), or lists it as not running, nothing is bound to it: the first result heard decides, as at a first
    start. (A state file recording one camera binds the block at start: see the test after this one.)"""
    extra = ("--journal", str(tmp_path / "journal"), "--state-dir", str(tmp_path / "state"))
    topic = f"inspect.{STATION}."
    line = Line(daemon, tmp_path / "journal")
    try:
        bridge = Bridge(daemon, plc, bridge_config, topic, extra=extra)
        for seq in range(1, 11):
            line(seq)
        wait(lambda: len(plc.received) >= 10, 20, "1..10 handed over")
        bridge.stop()
        acked = json.loads((tmp_path / "state" / "acked.json").read_text())
        (tmp_path / "state" / "acked.json").write_text(json.dumps({"acked": {**acked["acked"], "old": 3}}))
        for seq in range(11, 21):  # published while no bridge listens
            line(seq)
        bridge = Bridge(daemon, plc, bridge_config, topic, extra=extra)
        listed = state == "running"
        cameras = {CAMERA: {"state": state}} if state else {"top": {"state": "running"}}
        if listed:
            wait(lambda: daemon.status(cameras=cameras) or len(plc.received) >= 20, 20, "11..20 from the journal")
            assert [r["id"] for r in plc.received] == list(range(1, 21))
        else:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # a second of the daemon's status messages, faster than 1 Hz
                daemon.status(cameras=cameras)
                time.sleep(0.02)
            assert len(plc.received) == 10 and '"camera_bound"' not in bridge.output()
            line(21)  # the line starts: its first result binds the block, and the replay comes before it
            wait(lambda: len(plc.received) >= 21, 20, "11..21")
            assert [r["id"] for r in plc.received] == list(range(1, 22))
        events = bridge.stop()
    finally:
        line.close()
    assert events["camera_bound"]["camera"] == CAMERA
    assert events["camera_bound"]["heard"] == ("status" if listed else "result")
    assert events["camera_bound"]["resume_after"] == 10
    # Without the status the replay starts at 21, which the daemon journalled before publishing it: 11..21.
    assert events["bridge_stopped"]["sequence_gaps"] == 0
    assert events["bridge_stopped"]["journal_replayed"] == (10 if listed else 11)


def test_a_camera_null_block_keeps_the_one_camera_its_state_file_records_whichever_result_comes_first(
    plc, daemon, bridge_config, tmp_path
):
    """A `camera: null` block on a station-wide topic served cam0 before the restart (its state file records cam0 at
    5, and the PLC holds 5). On a running line another camera's part may come before cam0's (and before the 1 Hz
    status): the block is bound to cam0 at start, so the PLC that judged cam0's parts gets cam0's next verdict, not
    cam1's, and cam1's results are refused with a warning."""
    state = recorded_ack(tmp_path, 5)
    plc.holds(5)
    bridge = Bridge(daemon, plc, bridge_config, f"inspect.{STATION}.", extra=("--state-dir", str(state)))
    daemon.result(50, camera="cam1")
    daemon.result(6)
    daemon.result(51, camera="cam1")
    wait(lambda: plc.received, 10, "a result handed over")
    time.sleep(0.2)
    events = bridge.stop()
    assert [r["id"] for r in plc.received] == [6], bridge.output()
    assert events["camera_bound"]["camera"] == CAMERA and events["camera_bound"]["heard"] == "state_file"
    assert events["camera_bound"]["resume_after"] == 5
    refused = events["result_refused"]
    assert refused["camera"] == "cam1" and refused["level"] == "warning", refused
    # Bound by no config line: the warning names the file that bound it, so the fix (camera:, or removing it) is found.
    assert str(state / "acked.json") in refused["reason"], refused
    assert events["bridge_stopped"]["other_camera"] == 2
    assert json.loads((state / "acked.json").read_text()) == {"acked": {CAMERA: 6}}


def test_a_camera_null_block_bound_from_its_state_file_lets_go_of_a_camera_the_daemon_no_longer_runs(
    plc, daemon, bridge_config, tmp_path
):
    """The state file records cam0, but the daemon now runs only camA (cam0 renamed, or the state directory copied
    from another station). Once a status lists the running cameras without cam0, the block is unbound (a warning
    naming the state file) and takes camA as at a first start: trigger_ready comes up and camA's verdicts reach the
    PLC, instead of every one being refused until someone deletes acked.json."""
    state = recorded_ack(tmp_path, 5)
    plc.holds(5)
    bridge = Bridge(daemon, plc, bridge_config, f"inspect.{STATION}.", extra=("--state-dir", str(state)))
    cameras = {"camA": {"state": "running"}}
    wait(lambda: daemon.status(cameras=cameras) or '"camera_unbound"' in bridge.output(), 10, "cam0 unbound")
    daemon.result(100, camera="camA")
    wait(lambda: daemon.status(cameras=cameras) or plc.received, 10, "camA's result handed over")
    wait(lambda: plc.field("status") & BIT["trigger_ready"], 10, "trigger_ready up")
    events = bridge.stop()
    assert [r["id"] for r in plc.received] == [100], bridge.output()
    unbound = events["camera_unbound"]
    assert unbound["camera"] == CAMERA and unbound["level"] == "warning"
    assert unbound["state_file"] == str(state / "acked.json")
    assert events["camera_bound"]["camera"] == "camA"
    assert events["bridge_stopped"]["other_camera"] == 0


def test_missed_acks_and_sequence_gaps_go_on_from_what_the_plc_holds_across_a_bridge_restart(
    plc, daemon, bridge_config
):
    """The registers a previous run left (id 100, missed_acks 17, sequence_gaps 5): a PLC or HMI trending them sees
    them go on, not drop to 0, at a restart; the run's own log counts that run."""
    plc.holds(100)
    plc.write("missed_acks", 17)
    plc.write("sequence_gaps", 5)
    bridge = Bridge(daemon, plc, bridge_config)
    daemon.result(101)
    wait(lambda: len(plc.received) == 1, 10, "101 handed over")
    assert (plc.field("missed_acks"), plc.field("sequence_gaps")) == (17, 5)
    daemon.result(103)  # 102 never came: a gap
    wait(lambda: len(plc.received) == 2, 10, "103 handed over")
    assert (plc.field("missed_acks"), plc.field("sequence_gaps")) == (17, 6)
    events = bridge.stop()
    assert events["bridge_stopped"]["sequence_gaps"] == 1 and events["bridge_stopped"]["missed_acks"] == 0


def test_a_fresh_plcs_leftover_counter_registers_are_not_carried_on(plc, daemon, bridge_config):
    """A PLC no bridge has written to (inspection id 0) holding another program's values in those registers: the
    first result ever showed missed_acks 65535 and sequence_gaps 12345."""
    plc.write("missed_acks", 65535)
    plc.write("sequence_gaps", 12345)
    bridge = Bridge(daemon, plc, bridge_config)
    daemon.result(1)
    wait(lambda: len(plc.received) == 1, 10, "1 handed over")
    assert (plc.field("missed_acks"), plc.field("sequence_gaps")) == (0, 0)
    bridge.stop()


def test_an_inspection_id_cleared_beside_a_live_heartbeat_keeps_the_counters_the_plc_holds(plc, daemon, bridge_config):
    """docs/PLC.md: a fresh PLC is id 0 with heartbeat 0. An id a PLC program or an operator cleared after a bridge ran
    leaves its heartbeat beside it, and the counters there are the bridge's: the PLC's trend must not drop to 0."""
    plc.write("heartbeat", 321)
    plc.write("missed_acks", 17)
    plc.write("sequence_gaps", 5)
    bridge = Bridge(daemon, plc, bridge_config)
    daemon.result(101)
    wait(lambda: len(plc.received) == 1, 10, "101 handed over")
    assert (plc.field("missed_acks"), plc.field("sequence_gaps")) == (17, 5)
    events = bridge.stop()
    assert events["plc_adopted"]["resume_after"] is None  # still no id to resume after: no gap up to 101
    assert events["bridge_stopped"]["sequence_gaps"] == 0


@pytest.mark.parametrize("acks_meanwhile", [False, True], ids=["plc-not-acking", "plc-acks-before-restart"])
def test_a_bridge_killed_while_a_result_waits_for_its_ack_counts_it_missed_at_restart_unless_the_plc_acked(
    plc, daemon, tmp_path, acks_meanwhile
):
    """The restart resumes after the PLC's id, so a result a killed bridge left on display is never handed over again:
    unacked by then, it is a missed ack with the alarm, as after a stop (not a verdict lost without a trace). A PLC
    that took it from the registers the killed bridge left has acked it: nothing to count."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 20000\npoll_ms: 5\nheartbeat_ms: 100\n")
    extra = ("--state-dir", str(tmp_path / "state"))
    bridge = Bridge(daemon, plc, config, extra=extra)
    try:
        daemon.result(1)
        wait(lambda: len(plc.received) == 1, 10, "result 1 acked")
        plc.acking.clear()
        daemon.result(2)
        wait(lambda: plc.field("inspection_id") == 2 and plc.field("status") & BIT["result_valid"], 10, "result 2 up")
    finally:
        bridge.proc.kill()
        bridge.proc.wait(10)
    assert plc.field("ack") == 1
    if acks_meanwhile:
        plc.acking.set()
        wait(lambda: plc.field("ack") == 2, 5, "the PLC to ack 2 from the registers left")
    bridge = Bridge(daemon, plc, config, extra=extra)
    try:
        status = plc.field("status")
        assert not status & BIT["result_valid"]
        assert bool(status & BIT["alarm"]) != acks_meanwhile, bin(status)
        assert plc.field("missed_acks") == (0 if acks_meanwhile else 1)
        plc.acking.set()
        daemon.result(3)
        wait(lambda: plc.received[-1]["id"] == 3, 10, "result 3 after the restart")
    finally:
        events = bridge.stop()
    assert [r["id"] for r in plc.received] == ([1, 2, 3] if acks_meanwhile else [1, 3])
    assert plc.field("sequence_gaps") == 0
    stopped = events["bridge_stopped"]
    assert stopped["missed_acks"] == (0 if acks_meanwhile else 1), stopped
    if acks_meanwhile:
        assert "stop_before_ack" not in events and not events["plc_adopted"]["alarm"]
    else:
        cut = events["stop_before_ack"]
        assert cut["seq"] == 2 and cut["level"] == "warning" and events["plc_adopted"]["alarm"], cut


def test_seq_0_left_on_display_by_a_killed_bridge_is_a_missed_ack_at_restart(plc, daemon, tmp_path):
    """A fresh daemon's first result is seq 0, and an id of 0 reads as no id (a fresh or cleared PLC): killed with it
    on display and unacked, the restart handed over 1 next and counted 0 nowhere. The ack := id - 1 the bridge wrote
    before it, beside result_valid, says it was this bridge's result."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 20000\npoll_ms: 5\nheartbeat_ms: 100\n")
    extra = ("--state-dir", str(tmp_path / "state"))
    plc.acking.clear()
    bridge = Bridge(daemon, plc, config, extra=extra)
    try:
        daemon.result(0)
        wait(lambda: plc.field("status") & BIT["result_valid"] and plc.field("heartbeat"), 10, "result 0 up")
    finally:
        bridge.proc.kill()
        bridge.proc.wait(10)
    assert plc.field("inspection_id") == 0 and plc.field("ack") == 0xFFFFFFFF
    bridge = Bridge(daemon, plc, config, extra=extra)
    try:
        assert plc.field("missed_acks") == 1 and plc.field("status") & BIT["alarm"], bin(plc.field("status"))
        plc.acking.set()
        daemon.result(1)
        wait(lambda: plc.received and plc.received[-1]["id"] == 1, 10, "result 1 after the restart")
    finally:
        events = bridge.stop()
    assert [r["id"] for r in plc.received] == [1] and plc.field("sequence_gaps") == 0
    assert events["stop_before_ack"]["seq"] == 0 and events["bridge_stopped"]["missed_acks"] == 1, events


def test_a_missed_ack_counted_before_a_stop_is_not_counted_again_at_restart(plc, daemon, tmp_path):
    """Its ack timed out: counted then, result_valid dropped, the PLC's id still past the recorded ack and its ack
    register short of it. The restart must neither count it twice nor latch again an alarm the PLC reset."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 300\npoll_ms: 5\nheartbeat_ms: 100\n")
    extra = ("--state-dir", str(tmp_path / "state"))
    bridge = Bridge(daemon, plc, config, extra=extra)
    try:
        daemon.result(1)
        wait(lambda: len(plc.received) == 1, 10, "result 1 acked")
        plc.acking.clear()
        daemon.result(2)
        wait(lambda: plc.field("missed_acks") == 1, 10, "2 counted as a missed ack")
        reset_alarm(plc)
    finally:
        bridge.stop()
    bridge = Bridge(daemon, plc, config, extra=extra)
    try:
        assert plc.field("missed_acks") == 1 and not plc.field("status") & BIT["alarm"]
    finally:
        events = bridge.stop()
    assert "stop_before_ack" not in events and events["bridge_stopped"]["missed_acks"] == 0


class LogLines:
    """A bridge's JSON log lines as they come (read on a thread), for a test that waits on what the bridge did."""

    def __init__(self, bridge: Bridge | subprocess.Popen) -> None:
        if isinstance(bridge, Bridge):  # read already
            self.proc, self.lines, self.thread = bridge.proc, bridge.lines, bridge.reader
            return
        self.proc = bridge
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")))
        self.thread.start()

    def events(self, name: str) -> list[dict]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{") and f'"{name}"' in line]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0, "".join(self.lines)
        self.thread.join(10)


def test_with_a_journal_a_plc_too_far_behind_is_skipped_to_the_newest_result_as_a_gap(plc, daemon, tmp_path):
    """The PLC holds its ack (in STOP) while the line goes on: with --journal nothing would be dropped and the PLC
    would get every old verdict first. Past max_backlog results the bridge skips to the newest, the jump counts as a
    gap and latches the alarm. A restart after a long stop skips the same way, with no live result needed."""
    from inspectd.daemon.journal import Journal

    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 20000\npoll_ms: 5\nheartbeat_ms: 100\nqueue_size: 4\nmax_backlog: 20\n")
    journal_dir = tmp_path / "journal"
    journal = Journal(journal_dir, max_bytes=1 << 20, fsync_interval_s=SYNC_S)

    def line(seq: int, publish: bool = True) -> None:  # as the daemon does it: journalled, then published
        frames = daemon.encode(seq)
        journal.append(CAMERA, seq, frames)
        journal.flush()
        if publish:
            daemon.pub.send_multipart(frames)

    try:
        log = LogLines(Bridge(daemon, plc, config, extra=("--journal", str(journal_dir))))
        try:
            plc.acking.clear()
            line(1)
            wait(lambda: plc.field("status") & BIT["result_valid"], 10, "result 1 waiting for its ack")
            for seq in range(2, 63):
                line(seq)
            # 1 in flight: skipped at 22 (2..21), at 42 (22..41) and at 62 (42..61).
            wait(lambda: [e["last"] for e in log.events("backlog_skipped")] == [21, 41, 61], 10, "three skips")
            plc.acking.set()
            wait(lambda: [r["id"] for r in plc.received] == [1, 62], 10, "the newest result after the first")
            for seq in range(63, 67):
                line(seq)
            wait(lambda: [r["id"] for r in plc.received] == [1, *range(62, 67)], 10, "the line going on")
            assert plc.field("status") & BIT["alarm"] and plc.field("sequence_gaps") == 60
            assert log.events("plc_behind")
        finally:
            log.stop()
        stopped = log.events("bridge_stopped")[0]
        assert stopped["sequence_gaps"] == 60 and stopped["overflow_drops"] == 0 and stopped["missed_acks"] == 0

        # Down while 67..100 were journalled; back on a line that stays quiet: the PLC gets 100, not 34 old verdicts.
        for seq in range(67, 101):
            line(seq, publish=False)
        log = LogLines(Bridge(daemon, plc, config, extra=("--journal", str(journal_dir))))
        try:
            wait(lambda: [r["id"] for r in plc.received][-1] == 100, 10, "the newest journalled result")
            # Then seqs that never existed (the daemon rebooted and resumed its numbering further on): a gap with its
            # reason, not a backlog, although it is longer than max_backlog.
            time.sleep(0.3)
            line(357)
            wait(lambda: [r["id"] for r in plc.received][-1] == 357, 10, "the result after the jump")
        finally:
            log.stop()
        assert [r["id"] for r in plc.received][6:] == [100, 357]
        skipped = log.events("backlog_skipped")
        assert [(e["first"], e["last"]) for e in skipped] == [(67, 99)], skipped
        gaps = log.events("gap")
        assert [(g["first"], g["last"]) for g in gaps] == [(101, 356)] and "never journalled" in gaps[0]["reason"]
        assert log.events("bridge_stopped")[0]["sequence_gaps"] == 33 + 256

        # Down again while 358..365 and, after a reboot's jump, 700..705 were journalled: 14 results, not 348, so
        # within max_backlog: all of them go over, and the jump is a gap with its reason.
        for seq in [*range(358, 366), *range(700, 706)]:
            line(seq, publish=False)
        log = LogLines(Bridge(daemon, plc, config, extra=("--journal", str(journal_dir))))
        try:
            wait(lambda: [r["id"] for r in plc.received][-1] == 705, 10, "the catch-up")
            time.sleep(0.3)
        finally:
            log.stop()
        assert [r["id"] for r in plc.received][8:] == [*range(358, 366), *range(700, 706)]
        assert not log.events("backlog_skipped")
        assert [(g["first"], g["last"]) for g in log.events("gap")] == [(366, 699)]
    finally:
        journal.close()


class Line:
    """The daemon's side as it publishes with a journal: each result journalled (and flushed), then published."""

    def __init__(self, daemon: Daemon, journal_dir: Path) -> None:
        from inspectd.daemon.journal import Journal

        self.daemon = daemon
        self.directory = journal_dir
        self.journal = Journal(journal_dir, max_bytes=1 << 20, fsync_interval_s=SYNC_S)

    def wipe(self) -> None:
        """The daemon restarted with its journal wiped: a new one in the same directory, numbered from 0."""
        from inspectd.daemon.journal import Journal

        self.journal.close()
        shutil.rmtree(self.directory)
        self.journal = Journal(self.directory, max_bytes=1 << 20, fsync_interval_s=SYNC_S)

    def __call__(self, seq: int, publish: bool = True) -> None:
        frames = self.daemon.encode(seq)
        self.journal.append(CAMERA, seq, frames)
        self.journal.flush()
        if publish:
            self.daemon.pub.send_multipart(frames)

    def close(self) -> None:
        self.journal.close()


BACKLOG_CONFIG = "ack_timeout_ms: 20000\npoll_ms: 5\nheartbeat_ms: 100\nqueue_size: 4\nmax_backlog: 20\n"


@contextlib.contextmanager
def held_at_first(plc, daemon, tmp_path: Path, first: int = 1) -> Iterator[tuple[Line, LogLines]]:
    """The backlog tests' start: a bridge with BACKLOG_CONFIG and --journal on a `Line`, its PLC holding the ack of
    result `first`; the line and the bridge's log lines, the bridge stopped and the journal closed after."""
    config = tmp_path / "bridge.yaml"
    config.write_text(BACKLOG_CONFIG)
    line = Line(daemon, tmp_path / "journal")
    try:
        log = LogLines(Bridge(daemon, plc, config, extra=("--journal", str(tmp_path / "journal"))))
        try:
            plc.acking.clear()
            line(first)
            wait(lambda: plc.field("status") & BIT["result_valid"], 10, f"result {first} waiting for its ack")
            yield line, log
        finally:
            log.stop()
    finally:
        line.close()


def backlog_measured(log: LogLines) -> list[dict]:
    """What the bridge made of the live result that came last: more than a queue behind, or a backlog given up on."""
    return log.events("plc_behind") + log.events("backlog_skipped")


def test_seqs_never_journalled_are_no_backlog_when_a_live_result_comes_during_a_restarts_catch_up(
    plc, daemon, tmp_path
):
    """Down while 358..365 and, after a reboot's jump, 700..705 were journalled: 14 results, within max_backlog (20).
    The line goes on: 706 comes while the PLC still holds its ack of 358, with 359.. waiting. Counted in seqs, the
    334 that never existed made that a backlog of 348, and the bridge gave the 14 real verdicts up; counted without
    them it is 14, and the PLC gets every one."""
    config = tmp_path / "bridge.yaml"
    config.write_text(BACKLOG_CONFIG)
    state = recorded_ack(tmp_path, 357)
    line = Line(daemon, tmp_path / "journal")
    journalled = [*range(358, 366), *range(700, 706)]
    try:
        for seq in journalled:
            line(seq, publish=False)
        plc.acking.clear()
        extra = ("--journal", str(tmp_path / "journal"), "--state-dir", str(state))
        log = LogLines(Bridge(daemon, plc, config, extra=extra))
        try:
            wait(
                lambda: plc.field("inspection_id") == 358 and plc.field("status") & BIT["result_valid"],
                10,
                "358 on the PLC, waiting for its ack",
            )
            line(706)
            measured = wait(lambda: backlog_measured(log), 10, "the bridge to measure the backlog at 706")
            plc.acking.set()
            wait(lambda: [r["id"] for r in plc.received][-1:] == [706], 15, "the catch-up and 706")
            time.sleep(0.2)
        finally:
            log.stop()
    finally:
        line.close()
    assert [r["id"] for r in plc.received] == [*journalled, 706]
    assert not log.events("backlog_skipped")
    assert measured[0]["event"] == "plc_behind" and measured[0]["behind"] == 706 - 358 - 334, measured
    gaps = log.events("gap")
    assert [(g["first"], g["last"]) for g in gaps] == [(366, 699)] and "never journalled" in gaps[0]["reason"], gaps
    stopped = log.events("bridge_stopped")[0]
    assert stopped["sequence_gaps"] == 334 and stopped["missed_acks"] == 0, stopped


def test_a_live_jump_over_seqs_never_journalled_is_no_backlog_while_results_wait(plc, daemon, tmp_path):
    """The PLC holds its ack of 1 with 2..5 queued; the daemon crashes and numbers on at 300 (6..299 never existed).
    Nothing is skipped: 295 seqs behind, but 5 results."""
    with held_at_first(plc, daemon, tmp_path) as (line, log):
        for seq in range(2, 6):
            line(seq)
        line(300)
        measured = wait(lambda: backlog_measured(log), 10, "the bridge to measure the backlog at 300")
        plc.acking.set()
        wait(lambda: [r["id"] for r in plc.received][-1:] == [300], 15, "1..5 and 300")
        time.sleep(0.2)
    assert [r["id"] for r in plc.received] == [1, 2, 3, 4, 5, 300]
    assert not log.events("backlog_skipped")
    assert measured[0]["event"] == "plc_behind" and measured[0]["behind"] == 5, measured
    gaps = log.events("gap")
    assert [(g["first"], g["last"]) for g in gaps] == [(6, 299)] and "never journalled" in gaps[0]["reason"], gaps
    assert log.events("bridge_stopped")[0]["sequence_gaps"] == 294


def test_after_the_numbering_goes_back_max_backlog_measures_the_new_one(plc, daemon, tmp_path):
    """A backlog skip up to 121, then the daemon numbers from 0 again under the running bridge (its journal wiped).
    The PLC holds its ack of 1 while 2..31 arrive: 30 behind in the new numbering, past max_backlog (20), so the
    bridge skips 2..21. Measured against the old skip (121) it was never behind at all, and the skip came only once
    the new numbering passed 141."""
    with held_at_first(plc, daemon, tmp_path, first=101) as (line, log):
        for seq in range(102, 123):
            line(seq)
        wait(lambda: log.events("backlog_skipped"), 10, "the skip at 122")
        plc.acking.set()
        wait(lambda: [r["id"] for r in plc.received] == [101, 122], 10, "101, then the newest")
        line.wipe()
        line(0)
        wait(lambda: [r["id"] for r in plc.received][-1:] == [0], 10, "the new numbering's first result")
        plc.acking.clear()
        line(1)
        wait(lambda: plc.field("inspection_id") == 1, 10, "result 1 waiting for its ack")
        for seq in range(2, 32):
            line(seq)
        wait(lambda: len(log.events("backlog_skipped")) == 2, 10, "a skip in the new numbering")
        plc.acking.set()
        wait(lambda: [r["id"] for r in plc.received][-1:] == [31], 10, "the line going on")
    skipped = log.events("backlog_skipped")
    assert [(e["first"], e["last"]) for e in skipped] == [(102, 121), (2, 21)], skipped
    assert [r["id"] for r in plc.received] == [101, 122, 0, 1, *range(22, 32)]
    assert log.events("bridge_stopped")[0]["sequence_gaps"] == 40


def test_every_hole_a_live_jump_spans_is_learnt_not_only_the_first(plc, daemon, tmp_path):
    """The PLC holds its ack of 1 with 2..5 queued. 6..8 and 200..205 were lost on the way (journalled, never heard
    live) and the daemon rebooted twice meanwhile (9..199 and 206..299 never existed); 300 comes live. 14 results wait,
    within max_backlog (20): nothing is skipped and the PLC gets every one, each hole a gap with its reason."""
    with held_at_first(plc, daemon, tmp_path) as (line, log):
        for seq in range(2, 6):
            line(seq)
        for seq in [6, 7, 8, *range(200, 206)]:
            line(seq, publish=False)
        line(300)
        measured = wait(lambda: backlog_measured(log), 10, "the bridge to measure the backlog at 300")
        plc.acking.set()
        wait(lambda: [r["id"] for r in plc.received][-1:] == [300], 15, "1..8, 200..205 and 300")
        time.sleep(0.2)
    assert [r["id"] for r in plc.received] == [*range(1, 9), *range(200, 206), 300]
    assert not log.events("backlog_skipped")
    assert measured[0]["event"] == "plc_behind" and measured[0]["behind"] == 14, measured
    gaps = log.events("gap")
    assert [(g["first"], g["last"]) for g in gaps] == [(9, 199), (206, 299)], gaps
    assert log.events("bridge_stopped")[0]["sequence_gaps"] == 191 + 94


def test_a_journal_read_that_fails_counts_what_it_could_not_read_as_backlog(plc, daemon, tmp_path):
    """The PLC holds its ack of 1 with 2..5 queued, and the journal's segment after 5 cannot be read (an I/O error,
    here a directory in its place) when 300 comes live. Whether 6..299 are results waiting or seqs that never existed,
    only the journal could say: counted as results, 299 are past max_backlog (20) and the bridge skips to 300, rather
    than hand 2..5 over as if nothing more were owed. (300 is published without being journalled, so a read that did
    not fail would not find it either: the bridge takes both the same way.)"""
    with held_at_first(plc, daemon, tmp_path) as (line, log):
        for seq in range(2, 6):
            line(seq)
        (tmp_path / "journal" / CAMERA / "000000000006.seg").mkdir()
        daemon.pub.send_multipart(daemon.encode(300))  # live only: the read fails at the segment in its way
        wait(lambda: log.events("backlog_skipped"), 10, "the skip at 300")
        plc.acking.set()
        wait(lambda: [r["id"] for r in plc.received][-1:] == [300], 15, "the newest result")
        time.sleep(0.2)
    assert [r["id"] for r in plc.received] == [1, 300]
    skipped = log.events("backlog_skipped")
    assert [(e["first"], e["last"]) for e in skipped] == [(2, 299)], skipped
    assert log.events("bridge_stopped")[0]["sequence_gaps"] == 298


@pytest.mark.parametrize("ack, renumbered", [(4000, True), (200, False)])
def test_a_resume_point_past_the_journals_reservation_alarms_at_start_on_a_quiet_line(
    plc, daemon, tmp_path, bridge_config, ack, renumbered
):
    """The journal holds 0..5 and has reserved the numbering up to 256: the daemon fsyncs that mark before it gives out
    any seq past it, so a power cut's lost tail lies at or below it too. An ack of 4000 lies past it: the daemon's
    numbering restarted, and the PLC hears so at start (a warning and the alarm), not only at the first part on a line
    that may stay quiet for hours. The first result still says where to resume, without latching the alarm again once
    the PLC reset it. An ack of 200 may be a power cut's: info at start, and the first result decides (the alarm)."""
    state = recorded_ack(tmp_path, ack)
    line = Line(daemon, tmp_path / "journal")
    try:
        for seq in range(6):
            line.journal.mark_accepted(CAMERA, seq)  # as the daemon's ingest does before it queues the frame
            line(seq, publish=False)
        extra = ("--journal", str(tmp_path / "journal"), "--state-dir", str(state))
        log = LogLines(Bridge(daemon, plc, bridge_config, extra=extra))
        try:
            past = log.events("resume_past_journal")
            assert len(past) == 1 and past[0]["level"] == ("warning" if renumbered else "info"), past
            assert past[0]["journal_reserved"] == 256 and past[0]["journal_newest"] == 5, past
            assert bool(plc.field("status") & BIT["alarm"]) == renumbered
            if renumbered:
                reset_alarm(plc)
            line(6)
            wait(lambda: [r["id"] for r in plc.received] == [6], 10, "6 handed over")
            time.sleep(0.2)
            assert bool(plc.field("status") & BIT["alarm"]) is not renumbered
        finally:
            log.stop()
    finally:
        line.close()
    warned = log.events("resume_ahead_of_daemon")
    assert len(warned) == 1 and warned[0]["seq"] == 6 and warned[0]["resume_after"] == ack, warned
    assert log.events("bridge_stopped")[0]["sequence_gaps"] == 0


def test_a_journal_the_daemon_no_longer_writes_is_told_at_the_first_live_result(plc, daemon, tmp_path, bridge_config):
    """The daemon's journal moved (publish.journal.path changed, the old directory left behind) and --journal still
    names the old one, which ends at 5 while the daemon publishes 500 on. It journals each result before it publishes
    it, so one warning says this is not the journal it writes: no hole can be filled from it."""
    line = Line(daemon, tmp_path / "journal")
    try:
        for seq in range(6):
            line(seq, publish=False)
        log = LogLines(Bridge(daemon, plc, bridge_config, extra=("--journal", str(tmp_path / "journal"))))
        try:
            for seq in (500, 501, 502):
                daemon.result(seq)
            wait(lambda: [r["id"] for r in plc.received] == [500, 501, 502], 10, "500..502 live")
        finally:
            log.stop()
    finally:
        line.close()
    told = log.events("journal_not_current")
    assert len(told) == 1 and told[0]["level"] == "warning", told
    assert told[0]["camera"] == CAMERA and told[0]["seq"] == 500 and told[0]["journal_newest"] == 5, told
    assert told[0]["journal"] == str(tmp_path / "journal")


def reads_of_journal(daemon, journal_dir: Path, max_backlog: int | None, live, acking: bool = True):
    """Drive a Feeder as the bridge does (each of `live` journalled, then heard live; the handshake's run handing
    over what it can in between) and return the bounded journal reads it made, each (after, most, whether on the
    event loop's thread), with the Feeder and the handshake."""
    from inspectd.clients.bridge import Feeder, Router
    from inspectd.clients.handshake import Handshake, HandshakeSettings
    from inspectd.clients.subscribe import JournalCatchUp
    from inspectd.protocol.messages import decode

    reads: list[tuple[int, int, bool]] = []

    class Reads(JournalCatchUp):
        def journalled(self, camera: str, after: int, most: int) -> list[int]:
            reads.append((after, most, threading.get_ident() == loop_thread))
            return super().journalled(camera, after, most)

    line = Line(daemon, journal_dir)
    loop_thread = threading.get_ident()  # asyncio.run's loop runs on this thread

    async def feed():
        target = Memory()
        target.acking = acking
        settings = HandshakeSettings(ack_timeout_ms=60_000, poll_ms=1, queue_size=4, max_backlog=max_backlog)
        handshake = Handshake(target, settings, CAMERA)
        await handshake.start()
        feeder = Feeder(Reads(journal_dir, f"inspect.{STATION}.{CAMERA}.", [CAMERA]), Router([handshake]))
        handshake.room = feeder.room
        stop = asyncio.Event()
        running = [asyncio.ensure_future(handshake.run(stop)), asyncio.ensure_future(feeder.run(stop))]
        for seq in live:
            frames = daemon.encode(seq)
            line.journal.append(CAMERA, seq, frames)
            await feeder.live(decode(frames))
            # A PLC that keeps up has taken each result before the next comes; one that holds its ack, the first.
            while handshake.last_id is None or acking and (handshake.last_id, handshake.waiting_for) != (seq, None):
                await asyncio.sleep(0.001)
        stop.set()
        handshake.cut_short()
        await asyncio.gather(*running, return_exceptions=True)
        return feeder, handshake

    try:
        feeder, handshake = asyncio.run(feed())
    finally:
        line.close()
    return reads, feeder, handshake


@pytest.mark.parametrize("max_backlog", [None, 20])
def test_a_plc_that_keeps_up_costs_no_journal_read_at_the_jumps_of_dropped_frames(daemon, tmp_path, max_backlog):
    """An overloaded daemon dropping frames (queue policy drop_oldest) makes a jump in the live stream of each: seqs
    that were never journalled. With the PLC keeping up, no count in seqs comes near a queue or max_backlog, so
    nothing hangs on which of them the journal holds, and the Feeder reads nothing for it (the hole fill's own read
    aside)."""
    live = [1, 2, 4, 5, 8, 9, 10, 12, 15, 16, 17, 19, 22]
    reads, feeder, handshake = reads_of_journal(daemon, tmp_path / "journal", max_backlog, live)
    assert handshake.last_id == 22 and handshake.counters.sequence_gaps == 9
    assert reads == [] and not feeder.skipped and not feeder.behind


def test_a_jump_the_backlog_decision_hangs_on_is_read_once_off_the_event_loop(daemon, tmp_path):
    """The PLC holds 1 with 2..5 queued and 300 comes (6..299 never existed): 299 behind in seqs, past max_backlog
    (20), so the Feeder reads the journal once, on a worker thread (a journal read parses its segment from the start:
    the event loop would neither beat the heartbeat nor poll acks meanwhile), bounded by what the decision needs (17
    records: 4 wait already), learns 6..299 are not in it and skips nothing; 301 after it reads nothing more."""
    reads, feeder, handshake = reads_of_journal(daemon, tmp_path / "journal", 20, [1, 2, 3, 4, 5, 300, 301], False)
    assert reads == [(5, 17, False)]
    assert feeder.unjournalled[CAMERA] == [(6, 299)] and not feeder.skipped and feeder.behind == {CAMERA}
    assert [result.seq for result in handshake.queue] == [2, 3, 4, 5]


def test_one_cameras_slow_catch_up_holds_up_no_other_camera(daemon, monkeypatch):
    """Two cameras restart with 40 journalled results each to replay, every pull slow (30 ms: a slow disk). The
    replays take turns, a result each: b's is not left until a's is done. A live result of a, and then one of a third
    camera, c, that come meanwhile, are taken in at once: c's is handed over after at most the pulls in progress, not
    after a's replay."""
    from inspectd.clients import bridge
    from inspectd.clients.bridge import Feeder, Router
    from inspectd.clients.handshake import Handshake, HandshakeSettings
    from inspectd.clients.subscribe import JournalCatchUp
    from inspectd.protocol.messages import decode

    monkeypatch.setattr(bridge, "HOLD_S", 0.0)  # no live result of a or b comes to check their journal by

    class Slow(JournalCatchUp):
        def _journalled(self, camera: str, after: int, before: int | None):
            for seq in range(after + 1, 41 if before is None else before):
                time.sleep(0.03)
                yield decode(daemon.encode(seq, camera=camera))

    async def restart() -> tuple[dict[str, int], dict[str, int]]:
        settings = HandshakeSettings(ack_timeout_ms=60_000, poll_ms=1, queue_size=4)
        handshakes = {camera: Handshake(Memory(), settings, camera) for camera in "abc"}
        for handshake in handshakes.values():
            await handshake.start()  # a fresh PLC
        feeder = Feeder(Slow(None, "inspect."), Router(list(handshakes.values())))
        feeder.catch_up.directory = Path("/nonexistent")  # a journal, read by Slow alone
        for handshake in handshakes.values():
            handshake.room = feeder.room
        stop = asyncio.Event()
        await feeder.resume({"a": 0, "b": 0})
        tasks = [asyncio.ensure_future(h.run(stop)) for h in handshakes.values()]
        tasks.append(asyncio.ensure_future(feeder.run(stop)))
        while (handshakes["a"].last_id or 0) < 8:
            await asyncio.sleep(0.005)
        await feeder.live(decode(daemon.encode(41, camera="a")))  # waits behind a's replay, holding up nothing
        await feeder.live(decode(daemon.encode(1, camera="c")))
        while handshakes["c"].last_id != 1:
            await asyncio.sleep(0.001)
        at_c = {camera: h.last_id or 0 for camera, h in handshakes.items()}
        while (handshakes["a"].last_id or 0) < 40:
            await asyncio.sleep(0.005)
        at_a = {camera: h.last_id or 0 for camera, h in handshakes.items()}
        stop.set()
        for handshake in handshakes.values():
            handshake.cut_short()
        await asyncio.gather(*tasks, return_exceptions=True)
        return at_c, at_a

    at_c, at_a = asyncio.run(restart())
    assert at_c["a"] <= 25 and at_c["b"] <= 25, at_c  # c waited a few pulls (a was at 8), not for a whole replay
    assert at_a["b"] >= 25, at_a  # b's replay went on beside a's


async def feeding(target: Memory, journal_dir: Path, queue_size: int):
    """A started handshake on `target` and a Feeder on `journal_dir` feeding it, as the bridge wires them."""
    from inspectd.clients.bridge import Feeder, Router
    from inspectd.clients.handshake import Handshake, HandshakeSettings
    from inspectd.clients.subscribe import JournalCatchUp

    settings = HandshakeSettings(ack_timeout_ms=60_000, poll_ms=1, queue_size=queue_size)
    handshake = Handshake(target, settings, CAMERA)
    await handshake.start()
    feeder = Feeder(JournalCatchUp(journal_dir, f"inspect.{STATION}.{CAMERA}.", [CAMERA]), Router([handshake]))
    handshake.room = feeder.room
    return handshake, feeder


def numberings(daemon, journal_dir: Path, plc_id: int, since: int | None, live):
    """A bridge's Feeder and handshake (queue of 4) on `journal_dir`, its PLC at `plc_id`, resuming after `since` as a
    restart does (the replay queued, then the first live result taken, then the handshake runs); `live`: (seq,
    whether journalled into `journal_dir`, whether heard) for each result the daemon makes, in order, each heard one
    handed over before the next. Returns (ids handed to the PLC, the handshake, the catch-up, the log entries)."""
    from inspectd.daemon.journal import Journal
    from inspectd.protocol.messages import decode

    journal = Journal(journal_dir, max_bytes=1 << 24, fsync_interval_s=SYNC_S)

    async def feed():
        target = Memory(inspection_id=plc_id)
        handshake, feeder = await feeding(target, journal_dir, 4)
        if since is not None:
            await feeder.resume({CAMERA: since})
        stop = asyncio.Event()
        running: list[asyncio.Future] = []
        for seq, journalled, heard in live:
            frames = daemon.encode(seq)
            if journalled:
                journal.append(CAMERA, seq, frames)
                journal.flush()
            if not heard:
                continue
            await feeder.live(decode(frames))
            if not running:  # as the bridge starts: the replay and the first live result taken, then the handshake
                running = [asyncio.ensure_future(handshake.run(stop)), asyncio.ensure_future(feeder.run(stop))]
            deadline = time.monotonic() + 10
            while (handshake.last_id, handshake.waiting_for) != (seq, None) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
        stop.set()
        handshake.cut_short()
        await asyncio.gather(*running, return_exceptions=True)
        return target.handed, handshake, feeder.catch_up

    try:
        with structlog.testing.capture_logs() as logs:
            handed, handshake, catch_up = asyncio.run(feed())
    finally:
        journal.close()
    return handed, handshake, catch_up, logs


def old_numbering(daemon, journal_dir: Path, last: int) -> None:
    """1..`last` of a numbering before the daemon's current one, in `journal_dir`."""
    line = Line(daemon, journal_dir)
    for seq in range(1, last + 1):
        line(seq, publish=False)
    line.close()
    time.sleep(0.01)  # the current numbering's capture times differ from these


def test_a_journal_of_another_numbering_fills_no_hole(daemon, tmp_path):
    """The daemon restarted without its journal (its numbering starts again at 1) while the bridge's --journal still
    holds the old numbering's 1..100: those records are other parts' verdicts. The first live result is checked
    against the record under its seq, another frame there is told (`journal_other_numbering`), and the hole at 3 is a
    gap with its reason, never filled with the old 3."""
    from inspectd.clients.subscribe import OTHER_NUMBERING

    old_numbering(daemon, tmp_path / "journal", 100)
    live = [(seq, False, seq != 3) for seq in range(1, 8)]  # 3 lost on the way; the journal is off now
    handed, handshake, catch_up, logs = numberings(daemon, tmp_path / "journal", 0, None, live)
    told = [entry for entry in logs if entry["event"] == "journal_other_numbering"]
    assert len(told) == 1 and told[0]["seq"] == 1 and told[0]["log_level"] == "warning", told
    gaps = [(entry["first"], entry["last"], entry["reason"]) for entry in logs if entry["event"] == "gap"]
    assert gaps == [(3, 3, OTHER_NUMBERING)]
    assert handshake.counters.sequence_gaps == 1 and catch_up.recovered == 0
    assert handed == [1, 2, 4, 5, 6, 7]


def test_a_journal_starting_past_the_live_seq_fills_no_hole(daemon, tmp_path):
    """The old numbering's low seqs were rotated away (the --journal holds its 50..100) and the daemon, restarted
    without it, publishes 48.., losing 52 on the way. The journal starts past 48, which the daemon's own journal
    cannot (it journals each result before publishing it, and rotation takes the oldest first): another numbering,
    told at 48, and the hole at 52 is a gap, never filled with the old 52."""
    from inspectd.clients.subscribe import OTHER_NUMBERING

    line = Line(daemon, tmp_path / "journal")
    for seq in range(50, 101):
        line(seq, publish=False)
    line.close()
    time.sleep(0.01)  # the current numbering's capture times differ from these
    live = [(seq, False, seq != 52) for seq in range(48, 56)]
    handed, handshake, catch_up, logs = numberings(daemon, tmp_path / "journal", 0, None, live)
    told = [entry for entry in logs if entry["event"] == "journal_other_numbering"]
    assert len(told) == 1 and told[0]["seq"] == 48 and told[0]["journal_oldest"] == 50, told
    assert told[0]["journal_frame_id"] is None and "starts past this seq" in told[0]["effect"], told
    gaps = [(entry["first"], entry["last"], entry["reason"]) for entry in logs if entry["event"] == "gap"]
    assert gaps == [(52, 52, OTHER_NUMBERING)] and catch_up.recovered == 0
    assert handed == [48, 49, 50, 51, 53, 54, 55]


def test_the_daemons_own_journal_with_a_hole_at_the_first_live_seq_is_kept(daemon, tmp_path):
    """The daemon's own journal lost 5 while its disk failed (it holds 1..4 and 6..7): the first live result, 5, is
    not under its seq, but the journal starts before it, so it is not another numbering's: nothing is disowned, and
    a later hole is filled from it."""
    line = Line(daemon, tmp_path / "journal")
    for seq in (1, 2, 3, 4, 6, 7):
        line(seq, publish=False)
    line.close()
    live = [(5, False, True), (6, False, True), (7, False, True), (8, True, False), (9, True, True)]
    handed, handshake, catch_up, logs = numberings(daemon, tmp_path / "journal", 0, None, live)
    assert not [entry for entry in logs if entry["event"] == "journal_other_numbering"], logs
    assert handed == [5, 6, 7, 8, 9] and catch_up.recovered == 1


def test_a_restart_replays_nothing_of_a_journal_of_another_numbering(daemon, tmp_path):
    """The bridge restarts with its PLC at 50 and a --journal of an old numbering (1..100) while the daemon, which
    restarted without it, is at 52. The replay waits for the first live result, which shows the journal is another
    numbering's: none of it is queued or handed over, and the live 52..57 are not taken for the results the journal
    holds under their seqs: the PLC gets 52..57, with the gap at 51 and the alarm, and no backlog is counted."""
    old_numbering(daemon, tmp_path / "journal", 100)
    live = [(seq, False, True) for seq in range(52, 58)]
    handed, handshake, catch_up, logs = numberings(daemon, tmp_path / "journal", 50, 50, live)
    told = [entry for entry in logs if entry["event"] == "journal_other_numbering"]
    assert len(told) == 1 and told[0]["seq"] == 52 and told[0]["dropped"] == 0, told
    assert handed == list(range(52, 58))
    assert handshake.counters.sequence_gaps == 1 and handshake.alarm
    assert not [entry for entry in logs if entry["event"] in ("plc_behind", "backlog_skipped")]


def test_a_restart_hands_no_camera_the_replay_of_a_journal_of_another_numbering(daemon, tmp_path):
    """Two cameras, each with an old numbering's 1..100 in the --journal and its PLC at 50, the daemon (restarted
    without the journal) at 60. The restarted bridge hears a's 60 first and b's 60 a while later, its handshakes
    running by then: each camera's replay waits for that camera's first live result, so neither PLC is handed any of
    the old 51..100."""
    from inspectd.clients.bridge import Feeder, Router
    from inspectd.clients.handshake import Handshake, HandshakeSettings
    from inspectd.clients.subscribe import JournalCatchUp
    from inspectd.daemon.journal import Journal
    from inspectd.protocol.messages import decode

    journal = Journal(tmp_path / "journal", max_bytes=1 << 24, fsync_interval_s=SYNC_S)
    for camera in "ab":
        for seq in range(1, 101):
            journal.append(camera, seq, daemon.encode(seq, camera=camera))
    journal.close()
    time.sleep(0.01)
    targets = {camera: Memory(inspection_id=50) for camera in "ab"}

    async def restart() -> None:
        settings = HandshakeSettings(ack_timeout_ms=60_000, poll_ms=1, queue_size=4)
        handshakes = [Handshake(targets[camera], settings, camera) for camera in "ab"]
        for handshake in handshakes:
            await handshake.start()
        feeder = Feeder(JournalCatchUp(tmp_path / "journal", "inspect.", ["a", "b"]), Router(handshakes))
        for handshake in handshakes:
            handshake.room = feeder.room
        await feeder.resume({"a": 50, "b": 50})
        await feeder.live(decode(daemon.encode(60, camera="a")))  # the first message, then the handshakes run
        stop = asyncio.Event()
        running = [asyncio.ensure_future(h.run(stop)) for h in handshakes] + [asyncio.ensure_future(feeder.run(stop))]
        await asyncio.sleep(0.3)  # long enough to hand b's whole queue over, were its replay not held
        for seq, camera in ((60, "b"), (61, "a"), (61, "b")):
            await feeder.live(decode(daemon.encode(seq, camera=camera)))
        deadline = time.monotonic() + 10
        while any(target.handed[-1:] != [61] for target in targets.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        stop.set()
        for handshake in handshakes:
            handshake.cut_short()
        await asyncio.gather(*running, return_exceptions=True)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(restart())
    assert {camera: target.handed for camera, target in targets.items()} == {"a": [60, 61], "b": [60, 61]}
    told = sorted(entry["camera"] for entry in logs if entry["event"] == "journal_other_numbering")
    assert told == ["a", "b"]


def test_a_journal_the_daemon_writes_again_is_trusted_again(daemon, tmp_path):
    """Disowned while the daemon ran without it (its numbering from 1), the journal is the daemon's again when it
    goes on with it (101 on: a jump forward, not back). The jump is checked against the journal, which holds 101: the
    hole at 103 is filled from it; what lay between the numberings (6..100) is not."""
    old_numbering(daemon, tmp_path / "journal", 100)
    live = [(seq, False, True) for seq in range(1, 6)]
    live += [(101, True, True), (102, True, True), (103, True, False), (104, True, True)]
    handed, handshake, catch_up, logs = numberings(daemon, tmp_path / "journal", 0, None, live)
    assert [entry["seq"] for entry in logs if entry["event"] == "journal_other_numbering"] == [1]
    assert [entry["seq"] for entry in logs if entry["event"] == "journal_current_again"] == [101]
    assert handed == [1, 2, 3, 4, 5, 101, 102, 103, 104] and catch_up.recovered == 1
    # What lay between the numberings is the handshake's gap, with the alarm, not a backlog.
    assert handshake.counters.sequence_gaps == 95 and handshake.alarm
    assert not [entry for entry in logs if entry["event"] in ("plc_behind", "backlog_skipped")]


def test_results_of_a_new_numbering_waiting_behind_a_hole_fill_are_checked_against_the_journal(daemon, tmp_path):
    """12 comes with 11 lost on the way, and while 11 waits to be read from the journal the daemon restarts without
    its journal: its new 1, 2 and 4 (3 lost) arrive in one burst and wait behind the hole fill. The first of them
    handed on after the numbering went back is checked against the journal, which holds the old 2 under its seq: the
    hole at 3 is a gap, not the old 3."""
    from inspectd.clients.subscribe import OTHER_NUMBERING
    from inspectd.protocol.messages import decode

    line = Line(daemon, tmp_path / "journal")
    target = Memory()

    async def restart_mid_fill() -> None:
        handshake, feeder = await feeding(target, tmp_path / "journal", 8)
        stop = asyncio.Event()
        running = [asyncio.ensure_future(handshake.run(stop)), asyncio.ensure_future(feeder.run(stop))]
        for seq in range(1, 13):
            frames = daemon.encode(seq)
            line.journal.append(CAMERA, seq, frames)
            line.journal.flush()
            if seq == 11:
                continue  # lost on the way
            await feeder.live(decode(frames))
            while seq < 11 and handshake.last_id != seq:
                await asyncio.sleep(0.001)
        for seq in (1, 2, 4):  # the new numbering, not journalled: one burst, behind 12's hole fill
            await feeder.live(decode(daemon.encode(seq)))
        deadline = time.monotonic() + 10
        while len(target.handed) < 15 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        stop.set()
        handshake.cut_short()
        await asyncio.gather(*running, return_exceptions=True)

    try:
        with structlog.testing.capture_logs() as logs:
            asyncio.run(restart_mid_fill())
    finally:
        line.close()
    assert target.handed == [*range(1, 13), 1, 2, 4], target.handed
    gaps = [(entry["first"], entry["last"], entry["reason"]) for entry in logs if entry["event"] == "gap"]
    assert gaps == [(3, 3, OTHER_NUMBERING)], gaps


def test_live_results_after_a_hole_the_journal_cannot_fill_are_not_lost(daemon, tmp_path):
    """The daemon's journal writes failed after 10 (a full disk): 13 was lost on the way, and 11, 12, 14, 15, 16
    come in one burst while 13's hole fill is under way. Each result that came is handed over; only 13 is a gap."""
    from inspectd.protocol.messages import decode

    line = Line(daemon, tmp_path / "journal")
    for seq in range(1, 11):
        line(seq, publish=False)
    line.close()
    target = Memory(inspection_id=10)

    async def burst():
        handshake, feeder = await feeding(target, tmp_path / "journal", 8)
        await feeder.resume({CAMERA: 10})
        stop = asyncio.Event()
        running = [asyncio.ensure_future(handshake.run(stop)), asyncio.ensure_future(feeder.run(stop))]
        for seq in (11, 12, 14, 15, 16):  # one burst, as receive() takes the messages waiting on the socket
            await feeder.live(decode(daemon.encode(seq)))
        deadline = time.monotonic() + 10
        while (handshake.last_id, handshake.waiting_for) != (16, None) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        stop.set()
        handshake.cut_short()
        await asyncio.gather(*running, return_exceptions=True)
        return handshake

    with structlog.testing.capture_logs() as logs:
        handshake = asyncio.run(burst())
    assert target.handed == [11, 12, 14, 15, 16] and handshake.counters.sequence_gaps == 1
    assert [(entry["first"], entry["last"]) for entry in logs if entry["event"] == "gap"] == [(13, 13)]


def test_a_restart_skips_past_its_resume_point_when_the_line_starts_while_the_journal_is_read(
    daemon, tmp_path, monkeypatch
):
    """After a power cut the recorded ack (8) is past the journal's newest (5: its tail was lost) and the line starts
    while the bridge measures its replay: 20..22 are journalled between its read of the journal's newest and its read
    of the records after 8, more than max_backlog (2). The skip goes to the newest record it read (22), never back to
    the newest read before (5): that would hand 5 over again, a verdict the PLC consumed long ago."""
    from inspectd.clients import bridge
    from inspectd.clients.bridge import Feeder, Router
    from inspectd.clients.handshake import Handshake, HandshakeSettings
    from inspectd.clients.subscribe import JournalCatchUp

    monkeypatch.setattr(bridge, "HOLD_S", 0.0)  # no live result comes to check the journal by: the replay goes at once
    journal_dir = tmp_path / "journal"
    line = Line(daemon, journal_dir)

    class LineStarts(JournalCatchUp):
        def journalled(self, camera: str, after: int, most: int) -> list[int]:
            for seq in (20, 21, 22):  # after the newest was read: the resume measures its replay with one read
                line(seq, publish=False)
            return super().journalled(camera, after, most)

    async def restart():
        handshake = Handshake(Memory(), HandshakeSettings(queue_size=4, max_backlog=2), CAMERA)
        await handshake.start(8)
        feeder = Feeder(LineStarts(journal_dir, f"inspect.{STATION}.{CAMERA}.", [CAMERA]), Router([handshake]))
        await feeder.resume({CAMERA: 8})
        return feeder, handshake

    try:
        for seq in range(1, 6):
            line(seq, publish=False)
        with structlog.testing.capture_logs() as logs:
            feeder, handshake = asyncio.run(restart())
    finally:
        line.close()
    skipped = [entry for entry in logs if entry["event"] == "backlog_skipped"]
    assert [(entry["first"], entry["last"]) for entry in skipped] == [(9, 21)], skipped
    assert feeder.skipped[CAMERA] == 21 and feeder.examined[CAMERA] == 22
    assert [result.seq for result in handshake.queue] == [22] and handshake.last_id == 8 and not handshake.alarm


@pytest.mark.parametrize("stuck", [False, True], ids=["slow", "stuck"])
def test_a_slow_journal_read_is_not_the_daemons_silence(daemon, tmp_path, monkeypatch, stuck):
    """While the bridge waits on its own journal read (here the check of the first live result against the journal,
    held up as a slow disk would) it receives nothing, and the daemon's status messages wait on the socket: that is
    no silence of the daemon's, and trigger_ready stays up through many times DAEMON_SILENT_S (shortened here, with
    the heartbeat, so that takes a fraction of a second). A read held past READ_STUCK_S (shortened too) is stuck: it
    is told once and trigger_ready drops, the PLC triggering no part that could get no verdict, until it returns."""
    import argparse

    from inspectd.clients import bridge
    from inspectd.clients.handshake import Handshake, HandshakeSettings

    reading, release = threading.Event(), threading.Event()

    def slow_newest(directory: Path, camera: str) -> int | None:
        reading.set()
        release.wait(10)
        return 1

    monkeypatch.setattr(bridge, "DAEMON_SILENT_S", 0.1)
    monkeypatch.setattr(bridge, "SETTLE_S", 0.05)
    monkeypatch.setattr(bridge, "_journal_newest", slow_newest)
    if stuck:
        monkeypatch.setattr(bridge, "READ_STUCK_S", 0.2)

    async def run() -> tuple[list[frozenset], Memory]:
        target = Memory()
        settings = HandshakeSettings(ack_timeout_ms=5000, poll_ms=1, heartbeat_ms=20)
        handshake = Handshake(target, settings, CAMERA)
        await handshake.start()
        args = argparse.Namespace(topic=f"inspect.{STATION}.{CAMERA}.", journal=tmp_path, endpoint=daemon.endpoint)
        running = asyncio.ensure_future(bridge._bridge([handshake], settings, args, None, bridge.AckedState(None), {}))

        async def until(predicate, what: str) -> None:
            deadline = time.monotonic() + 10
            while not predicate():
                assert time.monotonic() < deadline and not running.done(), f"waiting for {what}"
                daemon.status()  # the daemon's 1 Hz status, much faster
                await asyncio.sleep(0.01)

        await until(lambda: target.statuses and "trigger_ready" in target.statuses[-1], "trigger_ready")
        daemon.result(1)
        await until(reading.is_set, "the journal read at the first live result")
        shown, beats = len(target.statuses), target.beats
        if stuck:
            await until(lambda: any("trigger_ready" not in s for s in target.statuses[shown:]), "trigger_ready down")
        else:
            await until(lambda: target.beats >= beats + 15, "heartbeats over three times DAEMON_SILENT_S")
        during = target.statuses[shown:]
        release.set()
        await until(lambda: target.values["inspection_id"] == 1, "result 1 handed over")
        await until(lambda: "trigger_ready" in target.statuses[-1], "trigger_ready up again")
        assert not running.done()  # its handler is installed: the signal cannot reach the test process's default
        signal.raise_signal(signal.SIGTERM)  # a clean stop
        assert await running == 0
        return during, target

    handler = signal.getsignal(signal.SIGTERM)
    try:
        with structlog.testing.capture_logs() as logs:
            during, target = asyncio.run(run())
    finally:
        release.set()
        signal.signal(signal.SIGTERM, handler)
    told = [entry for entry in logs if entry["event"] == "journal_read_stuck"]
    if stuck:
        assert len(told) == 1 and told[0]["log_level"] == "warning", told
        assert "trigger_ready" not in during[-1], during
    else:
        assert not told and all("trigger_ready" in status for status in during), during


def test_a_hole_fill_held_up_by_a_slow_disk_leaves_the_heartbeat_beating(daemon, tmp_path, monkeypatch):
    """3 and 4 were lost on the way, so 5 waits for a hole fill from the journal, whose read (a segment parsed from
    its start: a tenth of a second and more for a full one) is held up here as a slow disk would hold it. The read
    is made off the event loop: the PLC's heartbeat goes on while it lasts; then 3, 4 and 5 are handed over in order."""
    import argparse

    from inspectd.clients import bridge
    from inspectd.clients.handshake import Handshake, HandshakeSettings
    from inspectd.protocol import journal

    target = Memory()
    reading = threading.Event()
    beats_during: list[int] = []
    read_since = journal.read_since

    def slow_read_since(directory, camera, seq, *args, **kwargs):
        if seq == 2:  # the hole fill after 2 (the only read of the journal that starts there)
            reading.set()
            start, deadline = target.beats, time.monotonic() + 5
            while target.beats < start + 10 and time.monotonic() < deadline:
                time.sleep(0.005)
            beats_during.append(target.beats - start)
        yield from read_since(directory, camera, seq, *args, **kwargs)

    monkeypatch.setattr(journal, "read_since", slow_read_since)
    monkeypatch.setattr(bridge, "SETTLE_S", 0.05)
    line = Line(daemon, tmp_path / "journal")

    async def run() -> Memory:
        settings = HandshakeSettings(ack_timeout_ms=5000, poll_ms=1, heartbeat_ms=20)
        handshake = Handshake(target, settings, CAMERA)
        await handshake.start()
        args = argparse.Namespace(
            topic=f"inspect.{STATION}.{CAMERA}.", journal=line.directory, endpoint=daemon.endpoint
        )
        running = asyncio.ensure_future(bridge._bridge([handshake], settings, args, None, bridge.AckedState(None), {}))

        async def until(predicate, what: str) -> None:
            deadline = time.monotonic() + 10
            while not predicate():
                assert time.monotonic() < deadline and not running.done(), f"waiting for {what}"
                daemon.status()
                await asyncio.sleep(0.01)

        await until(lambda: target.statuses and "trigger_ready" in target.statuses[-1], "trigger_ready")
        for seq in (1, 2):
            line(seq)
            await until(lambda seq=seq: target.values["inspection_id"] == seq, f"result {seq} handed over")
        line(3, publish=False)
        line(4, publish=False)
        line(5)
        await until(reading.is_set, "the hole fill's journal read")
        await until(lambda: target.values["inspection_id"] == 5, "results 3..5 handed over")
        signal.raise_signal(signal.SIGTERM)
        assert await running == 0
        return handshake

    handler = signal.getsignal(signal.SIGTERM)
    try:
        handshake = asyncio.run(run())
    finally:
        signal.signal(signal.SIGTERM, handler)
        line.close()
    assert beats_during and beats_during[0] >= 10, beats_during
    assert handshake.counters.sequence_gaps == 0 and not handshake.alarm


def test_a_second_bridge_on_the_same_state_dir_is_refused_with_one_line(plc, daemon, bridge_config, tmp_path):
    """Two bridges on one --state-dir each rewrite acked.json from their own memory (undoing the other's acks) and can
    rename each other's half-written temporary file into place. The second is refused before it touches its PLC;
    once the first has stopped, the directory is free again."""
    state = tmp_path / "state"
    extra = ("--state-dir", str(state))
    bridge = Bridge(daemon, plc, bridge_config, extra=extra)
    try:
        second = subprocess.run(
            bridge_command(daemon, plc, bridge_config, *extra),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert "\n" not in line and str(state) in line and "another bridge uses it" in line, line
        daemon.result(1)  # the first goes on undisturbed
        wait(lambda: [r["id"] for r in plc.received] == [1], 10, "result 1 from the first bridge")
    finally:
        bridge.stop()
    assert json.loads((state / "acked.json").read_text()) == {"acked": {CAMERA: 1}}
    bridge = Bridge(daemon, plc, bridge_config, extra=extra)
    try:
        daemon.result(2)
        wait(lambda: [r["id"] for r in plc.received] == [1, 2], 10, "result 2 from a bridge started after it")
    finally:
        bridge.stop()
    assert json.loads((state / "acked.json").read_text()) == {"acked": {CAMERA: 2}}


def test_a_state_dir_lock_left_by_another_user_is_taken_over_or_refused_in_one_line(open_tmp_path):
    """A run as root under the unit's UMask=0077 leaves a lock file the service user can still open and lock; one it
    cannot open (left by some other tool) is one line, never a bridge running silently without its lock."""
    import stat

    from inspectd.durable import hold_lock
    from other_user import as_nobody

    state = open_tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    lock = state / ".lock"
    umask = os.umask(0o077)
    try:
        fd = hold_lock(lock)
    finally:
        os.umask(umask)
    assert fd is not None and stat.S_IMODE(lock.stat().st_mode) == 0o644
    os.close(fd)
    probe = "import sys, pathlib, inspectd.durable as d; print(d.hold_lock(pathlib.Path(sys.argv[1])))"
    taken = subprocess.run(as_nobody([sys.executable, "-c", probe, str(lock)]), capture_output=True, text=True,
                           cwd=REPO, timeout=60)  # fmt: skip
    assert taken.returncode == 0 and taken.stdout.strip().isdigit(), (taken.stdout, taken.stderr)
    lock.chmod(0o600)
    refused = subprocess.run(
        as_nobody([sys.executable, "-m", "inspectd", "bridge", "modbus", "--endpoint", "tcp://127.0.0.1:1", "--plc",
                   "127.0.0.1:1", "--state-dir", str(state)]),
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--state-dir {state}: cannot open its .lock (Permission denied)" in lines[0], lines


def test_the_bridges_stop_wait_leaves_time_to_drop_the_flags_before_the_units_kill():
    from inspectd.clients.bridge import STOP_WAIT_S
    from inspectd.clients.handshake import STOP_REQUEST_BUDGET_MS
    from unit_sandbox import unit_settings

    unit = REPO / "systemd" / "inspectd-bridge@.service"
    timeout_stop = unit_settings(unit)["TimeoutStopSec"][-1]
    assert timeout_stop.isdigit(), f"{unit}: TimeoutStopSec={timeout_stop}, expected whole seconds"
    # The flags' write against a PLC that stopped answering times out after the request budget; a second more for the
    # process to end (at 8 s a stalled OPC UA server's stop ended 10.1 s after SIGTERM, killed by the unit).
    assert STOP_WAIT_S + STOP_REQUEST_BUDGET_MS / 1000 + 1 <= int(timeout_stop), (
        "the capped wait leaves no time to drop the flags and end before the kill"
    )


def test_a_modbus_request_that_times_out_ends_within_the_2_s_the_stop_leaves():
    """pymodbus sends a request that got no answer twice (retries=1), each try waiting the whole request_timeout_ms.
    At the longest timeout the config takes, a PLC that accepts the connection and never answers (a CPU in STOP, a
    gateway whose device is gone) must still end the request within the 2 s the stop leaves after its ack wait, or
    the unit's kill comes before the flags are dropped."""
    import argparse

    from inspectd.clients.handshake import PlcError
    from inspectd.clients.plc import connect

    with pytest.raises(ConfigError) as refused:
        parse_bridge_config({"request_timeout_ms": 1001})
    assert str(refused.value) == "bridge.request_timeout_ms: expected at most 1000, got 1001"
    config = parse_bridge_config({"request_timeout_ms": 1000})

    async def silent_plc() -> tuple[float, str]:
        port = free_port()
        listener = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", port)
        link = await connect(config, argparse.Namespace(plc=f"127.0.0.1:{port}", unit=None))
        try:
            start = time.monotonic()
            with pytest.raises(PlcError) as failed:
                await link.target.read("ack")
            return time.monotonic() - start, str(failed.value)
        finally:
            await link.close()
            listener.close()

    took, message = asyncio.run(silent_plc())
    assert took <= 2.0 + 0.3, f"a request that timed out took {took:.2f} s"
    assert message.startswith(f"PLC read of ack (register {REG['ack']}): "), message


def test_a_stop_with_a_long_ack_timeout_drops_the_flags_within_the_units_stop_timeout(plc, daemon, tmp_path):
    """The PLC in STOP holds its ack, and ack_timeout_ms is 20 s: a stop that waited for it would outlast the unit's
    TimeoutStopSec, and systemd's SIGKILL would leave the PLC a valid result and trigger_ready from a bridge that is
    gone. The stop waits STOP_WAIT_S at most, then drops both flags and counts the cut result as a missed ack. The
    flags must drop well before the 20 s an uncapped wait would take (a wide margin, not a speed goal)."""
    config = tmp_path / "bridge.yaml"
    config.write_text("ack_timeout_ms: 20000\npoll_ms: 5\nheartbeat_ms: 100\n")
    bridge = Bridge(daemon, plc, config)
    log = LogLines(bridge)
    try:
        plc.acking.clear()
        daemon.result(1)
        wait(lambda: plc.field("status") & BIT["result_valid"], 10, "result 1 waiting for its ack")
        daemon.status()
        wait(lambda: plc.field("status") & BIT["trigger_ready"], 5, "trigger_ready up before the stop")
        signalled = time.monotonic()
        bridge.proc.send_signal(signal.SIGTERM)
        wait(lambda: not plc.field("status") & BIT["result_valid"], 30, "result_valid dropped")
        dropped_after = time.monotonic() - signalled
        code = bridge.proc.wait(60)
        log.thread.join(10)
    finally:
        if bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.wait()
    assert dropped_after < 15, f"result_valid dropped {dropped_after:.1f} s after SIGTERM: the wait was not capped"
    assert code == 0, "".join(log.lines)
    status = plc.field("status")
    assert not status & BIT["trigger_ready"] and not status & BIT["result_valid"], bin(status)
    assert status & BIT["alarm"] and plc.field("missed_acks") == 1, (bin(status), plc.field("missed_acks"))
    cut = log.events("stop_before_ack")
    assert len(cut) == 1 and cut[0]["seq"] == 1 and cut[0]["level"] == "warning", cut
    assert log.events("bridge_stopped")


def test_seqs_past_32_bits_are_handed_over_wrapped_and_resumed_in_full(plc, daemon, tmp_path, bridge_config):
    """The inspection id registers hold a seq's low 32 bits; the bridge keeps counting in full seqs, so a line that
    outgrows 2**32 results is neither skipped as stale nor counted as a gap, and a restart places the PLC's wrapped
    id at the seq it stands for."""
    top = 1 << 32
    state = tmp_path / "state"
    bridge = Bridge(daemon, plc, bridge_config, extra=("--state-dir", str(state)))
    try:
        for seq in range(top - 2, top + 2):
            daemon.result(seq)
        wait(lambda: len(plc.received) == 4, 10, "four results across the wrap")
    finally:
        events = bridge.stop()
    assert [r["id"] for r in plc.received] == [top - 2, top - 1, 0, 1]
    stopped = events["bridge_stopped"]
    assert stopped["acked"] == 4 and stopped["sequence_gaps"] == 0, stopped
    assert not plc.field("status") & BIT["alarm"]
    assert json.loads((state / "acked.json").read_text())["acked"][CAMERA] == top + 1

    # Restarted without the recorded ack: the PLC's 1 stands for 2**32 + 1 (the latest with its low bits before the
    # first result), so the next result is no gap: the daemon never publishes a seq twice, so a first result with
    # the PLC id's low bits is the one after it, not a stale repeat.
    bridge = Bridge(daemon, plc, bridge_config)
    try:
        daemon.result(top + 2)
        daemon.result(top + 3)
        wait(lambda: len(plc.received) == 6, 10, "result 2**32 + 3")
        time.sleep(0.2)
    finally:
        events = bridge.stop()
    assert [r["id"] for r in plc.received][4:] == [2, 3]
    stopped = events["bridge_stopped"]
    assert stopped["sequence_gaps"] == 0, stopped
    assert not plc.field("status") & BIT["alarm"]


def test_a_bridge_killed_at_any_instant_before_a_plc_reset_repeats_at_most_the_result_in_flight(plc, daemon, tmp_path):
    """What the state file cannot know: the PLC took the result on it and acked, and the kill came before the bridge
    read the ack and recorded it. With the PLC's registers intact its inspection id covers that; with them reset,
    that one result (and only it) is handed over again."""
    last = 300
    ids, at_kill, _, events = kill_and_restart(plc, daemon, tmp_path, "kill", reset=True)
    before, after = ids[:at_kill], ids[at_kill:]
    assert before == list(range(1, at_kill + 1))
    assert after[0] in (at_kill, at_kill + 1) and after == list(range(after[0], last + 1)), after[:5]
    assert events["bridge_stopped"]["sequence_gaps"] == 0 and events["bridge_stopped"]["overflow_drops"] == 0


def test_a_corrupt_state_file_is_refused_with_one_line_naming_it(plc, daemon, bridge_config, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "acked.json").write_text('{"acked": {"cam0": "twelve"}}')
    proc = subprocess.run(
        bridge_command(daemon, plc, bridge_config, "--state-dir", str(state)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and str(state / "acked.json") in line and "expected" in line, line


def test_the_drift_and_false_reject_warning_bits_follow_the_daemons_status_message(plc, daemon):
    """The daemon's status messages as a bridge receives them (the PUB peer, subscribed and decoded) set and clear the
    drift and false_reject_warning bits in the PLC's status register, through the Modbus adapter and the handshake;
    another camera's flags and a daemon that reports no drift leave them at 0."""
    import argparse

    import zmq

    from inspectd.clients import plc as modbus
    from inspectd.clients.handshake import Handshake
    from inspectd.protocol.messages import decode

    sub = daemon.context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(daemon.endpoint)

    def received(cameras: dict) -> dict:
        """The status message the daemon peer publishes with `cameras`, as the subscriber decodes it."""

        def arrived():
            daemon.status(cameras=cameras)
            return sub.poll(50) and decode(sub.recv_multipart())

        return wait(arrived, 10, "a status message from the daemon peer")

    def drift(alarm: bool, warning: bool) -> dict:
        return {"drift": {"active": True, "alarm": alarm, "false_reject_warning": warning}}

    messages = [
        received({CAMERA: drift(False, True), "cam1": drift(True, True)}),
        received({CAMERA: drift(True, True)}),
        received({CAMERA: drift(True, False)}),
        received({CAMERA: {"published": 3}, "cam1": drift(True, True)}),
    ]
    sub.close()

    async def follow() -> list[int]:
        config = modbus.parse_bridge_config({})
        link = await modbus.connect(config, argparse.Namespace(plc=f"127.0.0.1:{plc.port}", unit=None))
        try:
            [(_, target)] = link.slots()
            handshake = Handshake(target, config, CAMERA)
            await handshake.start()
            seen = []
            for message in messages:
                handshake.follow_daemon(message)
                await handshake.set_status(daemon_alive=True)  # what the bridge's heartbeat tick does
                seen.append(plc.field("status"))
            return seen
        finally:
            await link.close()

    flags = [(bool(s & BIT["drift"]), bool(s & BIT["false_reject_warning"])) for s in asyncio.run(follow())]
    assert flags == [(False, True), (True, True), (True, False), (False, False)]
    assert BIT["false_reject_warning"] == 1 << 8 and DEFAULT_BITS["daemon_unhealthy"] == 7  # the older bits stay
