"""`inspectd bridge opcua` (client mode, two cameras) ended by a PLC request that fails while it runs: a real bridge
subprocess, a real asyncua server as the PLC (tests/test_bridge_opcua.py's). The bridge exits 1 as before, but not
before it tried to drop every camera's flags: a PLC must not take a bridge that is gone for ready, nor a result it
left up for valid."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("asyncua", reason="the OPC UA bridge needs the [plc] extra (asyncua)")
from plc_peers import CAMERA, Daemon, wait  # noqa: E402
from ports import free_port  # noqa: E402
from test_bridge_opcua import (  # noqa: E402, F401 - the fixtures by name: the address space, the servers' stop
    CAMERAS,
    Bridge,
    PlcServer,
    _address_space_shelf,
    _stop_plc_servers,
)

pytestmark = pytest.mark.timeout(120)
TIMEOUT_STOP_S = 10  # systemd/inspectd-bridge@.service's TimeoutStopSec: what the kill would leave, had it been a stop


@pytest.fixture
def daemon():
    publisher = Daemon()
    yield publisher
    publisher.close()


def unacked_config(tmp_path: Path) -> Path:
    """Client mode, both cameras; no PLC program runs, and a result waits 20 s for the ack it never gets."""
    path = tmp_path / "opcua.yaml"
    path.write_text(
        f"mode: client\nack_timeout_ms: 20000\npoll_ms: 5\nheartbeat_ms: 100\ncameras: [{', '.join(CAMERAS)}]\n"
    )
    return path


def killed(bridge: Bridge) -> None:
    """A bridge a failed test leaves running, ended."""
    if bridge.proc.poll() is None:
        bridge.proc.kill()
        bridge.proc.communicate()


def test_one_cameras_refused_write_ends_the_bridge_with_every_cameras_flags_dropped(daemon, tmp_path):
    """cam0's result is valid and waits for its ack when the PLC starts refusing OPC UA writes to cam1's
    InspectionId, and cam1's next result fails to be written: the bridge exits 1 with that error, having first cut
    cam0's wait short and dropped both cameras' TriggerReady and cam0's ResultValid (the cut result counted as a
    missed ack, as at a stop)."""
    plc = PlcServer(free_port())
    args = ["--config", str(unacked_config(tmp_path)), "--opcua", plc.url]
    bridge = Bridge(daemon, args, lambda: all(plc.read(camera, "trigger_ready") for camera in CAMERAS))
    try:
        daemon.result(1)
        wait(lambda: plc.read(CAMERA, "result_valid"), 10, "cam0's result valid, waiting for its ack")
        plc.nodes[("cam1", "inspection_id")].set_writable(False)
        daemon.status()  # heard just now: no silence of the daemon takes TriggerReady down before the failure
        daemon.result(11, camera="cam1")
        out, _ = bridge.proc.communicate(timeout=15)
    except BaseException:
        killed(bridge)
        raise
    assert bridge.proc.returncode == 1, out
    assert out.strip().splitlines()[-1].startswith("inspectd bridge: PLC write of cam1 InspectionId"), out
    flags = {camera: (plc.read(camera, "trigger_ready"), plc.read(camera, "result_valid")) for camera in CAMERAS}
    assert flags == {camera: (False, False) for camera in CAMERAS}, f"(TriggerReady, ResultValid): {flags}\n{out}"
    assert plc.read(CAMERA, "alarm") and plc.read(CAMERA, "missed_acks") == 1, out
    assert '"shutdown_write_failed"' not in out, out


def test_a_plc_server_that_stops_answering_ends_the_bridge_without_waiting_on_it_each_camera_tried(daemon, tmp_path):
    """The PLC's server stalls while the bridge runs (its loop held 12 s, much longer than a request's 2 s timeout):
    a heartbeat request times out and the bridge ends (exit 1). Every camera's flags are still tried, and on the one
    link the cameras share, which asyncua gives up after a timeout, each try fails or times out within its own
    request's bound: the bridge is gone long before the server answers again, each camera's failed write logged."""
    plc = PlcServer(free_port())
    args = ["--config", str(unacked_config(tmp_path)), "--opcua", plc.url]
    bridge = Bridge(daemon, args, lambda: all(plc.read(camera, "trigger_ready") for camera in CAMERAS))
    held, release = threading.Event(), threading.Event()

    def stall() -> None:
        held.set()
        release.wait(12)

    try:
        daemon.status()
        plc.server.tloop.loop.call_soon_threadsafe(stall)
        assert held.wait(10), "the PLC's server loop did not take the stall"
        out, _ = bridge.proc.communicate(timeout=TIMEOUT_STOP_S)  # the server still stalled: not waited for
    except BaseException:
        killed(bridge)
        raise
    finally:
        release.set()
    assert bridge.proc.returncode == 1, out
    assert out.strip().splitlines()[-1].startswith("inspectd bridge: PLC "), out
    failed = [line for line in out.splitlines() if '"shutdown_write_failed"' in line]
    assert all(any(f'"camera": "{camera}"' in line for line in failed) for camera in CAMERAS), out
