"""`inspectd bridge opcua` stopped while the PLC's own OPC UA server does not answer: a real bridge subprocess, a real
asyncua server as the PLC (tests/test_bridge_opcua.py's), its event loop held to stand for a PLC that stalls."""

from __future__ import annotations

import signal
import threading
import time

import pytest

pytest.importorskip("asyncua", reason="the OPC UA bridge needs the [plc] extra (asyncua)")
from plc_peers import Daemon, wait  # noqa: E402
from ports import free_port  # noqa: E402
from test_bridge_opcua import (  # noqa: E402, F401 - the fixtures by name: the address space, the servers' stop
    CAMERAS,
    PlcServer,
    _address_space_shelf,
    _stop_plc_servers,
    client_bridge,
)

pytestmark = pytest.mark.timeout(120)
TIMEOUT_STOP_S = 10  # systemd/inspectd-bridge@.service's TimeoutStopSec: the kill after it leaves the flags as they are


@pytest.fixture
def daemon():
    publisher = Daemon()
    yield publisher
    publisher.close()


def test_a_stop_while_the_plcs_server_does_not_answer_leaves_no_camera_ready_once_it_answers_again(daemon, tmp_path):
    """The PLC's server stalls (its loop held for 4 s, longer than a request's timeout) as the bridge is stopped. The
    bridge cannot wait for it: it exits 0 within the unit's stop timeout, each camera's failed write logged. But each
    camera's write must have left it: asyncua refuses every request after one times out, so writes sent one camera
    after another would leave every camera but the first TriggerReady once the PLC takes its requests again, for a
    bridge that is gone."""
    plc = PlcServer(free_port())  # a request's timeout is the config's default, 2 s
    bridge = client_bridge(daemon, tmp_path, plc)
    try:
        wait(lambda: all(plc.read(camera, "trigger_ready") for camera in CAMERAS), 10, "every camera ready")
        held = threading.Event()

        def stall() -> None:
            held.set()
            time.sleep(4.0)

        plc.server.tloop.loop.call_soon_threadsafe(stall)
        assert held.wait(10), "the PLC's server loop did not take the stall"
        bridge.proc.send_signal(signal.SIGTERM)
        out, _ = bridge.proc.communicate(timeout=TIMEOUT_STOP_S)
    except BaseException:
        if bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.communicate()
        raise
    assert bridge.proc.returncode == 0, out
    failed = [line for line in out.splitlines() if '"shutdown_write_failed"' in line]
    assert all(any(f'"camera": "{camera}"' in line for line in failed) for camera in CAMERAS), out
    try:
        wait(
            lambda: not any(plc.read(camera, "trigger_ready") for camera in CAMERAS),
            10,
            "every camera's TriggerReady down once the PLC's server answers again",
        )
    except AssertionError:
        raise AssertionError({camera: plc.read(camera, "trigger_ready") for camera in CAMERAS}) from None
