"""`inspectd bridge opcua` stopped while the PLC's own OPC UA server does not answer: a real bridge subprocess, a real
asyncua server as the PLC (tests/test_bridge_opcua.py's), its event loop held to stand for a PLC that stalls."""

from __future__ import annotations

import json
import signal
import threading
import time

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
    client_bridge,
)

pytestmark = pytest.mark.timeout(120)
TIMEOUT_STOP_S = 10  # systemd/inspectd-bridge@.service's TimeoutStopSec: the kill after it leaves the flags as they are
EXIT_S = 30  # at most: the cut test's 7 s wait and its writes' timeout, with room for a loaded machine


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


def test_a_stop_that_cuts_unacked_results_short_as_the_plcs_server_stalls_leaves_no_flag_up_once_it_answers(
    daemon, tmp_path
):
    """Each camera's result waits for an ack the PLC does not give (ack_timeout_ms 20 s), so the stop cuts the wait
    short after STOP_WAIT_S, and the PLC's server stalls just before that. The last read of a cut result's Ack would
    time out, and asyncua refuses every request after it: the flags must be written before it, so that once the
    server answers again no camera is left TriggerReady or ResultValid by a bridge that is gone. The bridge exits 0,
    each camera's failed write logged and its result counted as a missed ack."""
    from inspectd.clients.bridge import STOP_WAIT_S

    config = tmp_path / "opcua.yaml"
    # The ack polls 10 s apart: none in flight at the cut, so the stall times out no request before the stop's own.
    config.write_text(
        f"mode: client\nack_timeout_ms: 20000\npoll_ms: 10000\nheartbeat_ms: 100\ncameras: [{', '.join(CAMERAS)}]\n"
    )
    plc = PlcServer(free_port())  # no PLC program: nothing acks
    bridge = Bridge(daemon, ["--config", str(config), "--opcua", plc.url], lambda: plc.read(CAMERA, "trigger_ready"))
    held, release = threading.Event(), threading.Event()

    def stall() -> None:
        held.set()
        release.wait(EXIT_S)

    try:
        daemon.result(1)
        daemon.result(11, camera="cam1")
        daemon.status()
        wait(
            lambda: all(plc.read(c, "result_valid") and plc.read(c, "trigger_ready") for c in CAMERAS),
            10,
            "every camera's result valid and waiting for its ack, every camera ready",
        )
        loop = plc.server.tloop.loop
        signalled = time.monotonic()
        bridge.proc.send_signal(signal.SIGTERM)
        # Half a second before the cut: asyncua's client probes the server each second, with a timeout of one, and
        # gives the session up when a probe fails, so a stall begun much earlier ends the session before the stop's
        # requests are sent.
        at = signalled + STOP_WAIT_S - 0.5
        loop.call_soon_threadsafe(lambda: loop.call_later(max(0.0, at - time.monotonic()), stall))
        out, _ = bridge.proc.communicate(timeout=EXIT_S)
    except BaseException:
        if bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.communicate()
        raise
    finally:
        release.set()  # the server answers again once the bridge is gone
    assert bridge.proc.returncode == 0, out
    assert held.is_set(), "the PLC's server did not stall before the bridge exited"
    # Each camera's request timed out: the stall covered the stop's requests.
    failed = [line for line in out.splitlines() if '"shutdown_write_failed"' in line]
    assert all(any(f'"camera": "{camera}"' in line for line in failed) for camera in CAMERAS), out
    [stopped] = [json.loads(line) for line in out.splitlines() if '"bridge_stopped"' in line]
    assert stopped["missed_acks"] == len(CAMERAS) and stopped["acked"] == 0, stopped

    def flags() -> dict[str, tuple[bool, bool]]:
        return {c: (plc.read(c, "trigger_ready"), plc.read(c, "result_valid")) for c in CAMERAS}

    try:
        wait(lambda: not any(any(f) for f in flags().values()), 10, "every camera's flags down once the PLC answers")
    except AssertionError:
        raise AssertionError(f"(TriggerReady, ResultValid): {flags()}") from None


def test_a_session_whose_server_stopped_answering_is_closed_without_a_goodbye():
    """Closing a session is one more request: after a request the server did not answer, the link closes its socket
    without it. A goodbye waited out another request_timeout_ms, and at a stop that pushed the bridge's exit past
    the unit's TimeoutStopSec."""
    import asyncio

    from inspectd.clients.handshake import PlcError
    from inspectd.clients.opcua import ClientLink, parse_opcua_config

    plc = PlcServer(free_port())
    config = parse_opcua_config({"mode": "client", "endpoint": plc.url, "cameras": ["cam0"]})  # requests: 2 s
    held, release = threading.Event(), threading.Event()

    def stall() -> None:
        held.set()
        release.wait(30)

    async def scenario() -> float:
        link = ClientLink(config)
        await link.start()
        try:
            plc.server.tloop.loop.call_soon_threadsafe(stall)
            assert held.wait(10)
            with pytest.raises(PlcError):
                await link.targets["cam0"].write({"trigger_ready": False})
        finally:
            began = time.monotonic()
            await link.close()
        return time.monotonic() - began

    try:
        took = asyncio.run(scenario())
    finally:
        release.set()
        plc.stop()
    assert took < 1.0, f"close() took {took:.1f} s: it waited on the stalled server (request timeout 2 s)"
