"""The daemon's health as operators and the PLC bridge read it (control status, the PUB status message, /metrics), and
the errors a failing reload or engine teardown logs: an in-process Daemon on a real bundle, ONNX Runtime session,
synthetic camera, sockets and HTTP endpoint."""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request

import pytest
import structlog
import structlog.testing

from daemon_harness import in_process_config
from inspectd.clients.subscribe import Subscriber
from station_model import write_grey_bundle

pytestmark = pytest.mark.timeout(60)

STUCK_S = 1.0  # service.STUCK_AFTER_S for these tests (10 s in service)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def config_for(tmp_path, rate_hz: float = 20, **source):
    config = in_process_config(
        tmp_path,
        write_grey_bundle(tmp_path / "bundle"),
        {"kind": "synthetic", "rate_hz": rate_hz, "width": 64, "height": 64, **source},
    )
    return dataclasses.replace(
        config,
        metrics=dataclasses.replace(config.metrics, listen="127.0.0.1:0"),
        publish=dataclasses.replace(config.publish, status_interval_s=0.2),
    )


def healthy_metric(daemon) -> float:
    text = urllib.request.urlopen(daemon.metrics.url, timeout=5).read().decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("inspectd_healthy ")))


def next_status(sub: Subscriber, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = sub.recv(0.5)
        if isinstance(message, dict):
            return message
    raise AssertionError("no status message")


def test_an_engine_stuck_in_a_batch_is_unhealthy_in_status_metrics_and_the_pub_status_with_its_reason(
    tmp_path, monkeypatch
):
    """The watchdog stops pinging once a batch hangs in the engine; ctl status, /metrics and the PUB status message
    (on which the PLC bridge drops TriggerReady) must say unhealthy from then on too, and why; and healthy again once
    the batch returns."""
    from inspectd.daemon import service

    monkeypatch.setattr(service, "STUCK_AFTER_S", STUCK_S)
    daemon = service.Daemon(config_for(tmp_path))
    daemon.start()
    gate = threading.Event()
    real = daemon.stage.run_batch
    try:
        with Subscriber(daemon.config.publish.endpoint) as sub:
            wait_for(lambda: daemon.publisher.published >= 3, 30, "results")
            assert daemon.status()["healthy"] is True and not daemon.status().get("unhealthy")
            assert healthy_metric(daemon) == 1

            def stuck(batch):
                gate.wait()  # a driver call that does not return
                return real(batch)

            # As a warm-up whose one-time set-up took long would seed it: the cap still says stuck in time.
            monkeypatch.setattr(service, "STUCK_MAX_S", 2 * STUCK_S)
            daemon._frame_s = 1000.0
            daemon.stage.run_batch = stuck  # type: ignore[method-assign]
            wait_for(lambda: not daemon.progressing(), 10, "the watchdog to stop")
            status = daemon.status()
            assert status["healthy"] is False, status
            assert any(p.startswith("engine stuck: a batch of") for p in status["unhealthy"]), status["unhealthy"]
            assert daemon.status_message()["healthy"] is False
            assert healthy_metric(daemon) == 0
            # What the bridge reads: a status message published after the engine stuck.
            wait_for(lambda: next_status(sub)["healthy"] is False, 10, "an unhealthy status message")

            daemon.stage.run_batch = real  # type: ignore[method-assign]
            gate.set()
            wait_for(lambda: daemon.status()["healthy"], 10, "healthy again")
            assert daemon.progressing() and healthy_metric(daemon) == 1
    finally:
        gate.set()
        daemon.stage.run_batch = real  # type: ignore[method-assign]
        daemon.shutdown()


def test_an_idle_line_and_a_start_after_a_slow_model_load_are_not_stuck(tmp_path, monkeypatch):
    """No frames for longer than STUCK_AFTER_S (a paused or idle line) is no fault, nor is a model load that took
    longer than it before the start."""
    from inspectd.daemon import service

    monkeypatch.setattr(service, "STUCK_AFTER_S", STUCK_S)
    daemon = service.Daemon(config_for(tmp_path, count=2))
    time.sleep(STUCK_S * 1.5)  # as a load and warm-up taking longer than STUCK_AFTER_S
    daemon.start()
    try:
        assert daemon.progressing(), daemon.status()
        assert daemon.status()["healthy"] is True
        wait_for(lambda: daemon.publisher.published >= 2, 30, "the camera's two frames")
        time.sleep(STUCK_S * 2.5)  # the camera has ended: nothing comes in any more
        assert daemon.progressing(), daemon.status()
        status = daemon.status()
        assert status["healthy"] is True and status["unhealthy"] == [], status
        assert healthy_metric(daemon) == 1
    finally:
        daemon.shutdown()


def test_batches_that_are_slow_but_finish_are_not_stuck(tmp_path, monkeypatch):
    """A full batch on a slow CPU (hundreds of frames at tens of ms each) can run longer than STUCK_AFTER_S and finish:
    that is no fault, or the PLC bridge drops TriggerReady for every long batch. The limit follows what frames took,
    from the warm-up on."""
    from engines.runtime.onnxruntime_backend import OnnxRuntimeEngine
    from inspectd.daemon import service

    per_frame = 0.25
    real = OnnxRuntimeEngine.infer

    def slow(self, pixels):
        result = real(self, pixels)
        time.sleep(per_frame * len(pixels))
        return result

    monkeypatch.setattr(service, "STUCK_AFTER_S", STUCK_S)
    monkeypatch.setattr(OnnxRuntimeEngine, "infer", slow)
    config = config_for(tmp_path, rate_hz=40)
    camera = config.cameras[0]
    camera = dataclasses.replace(camera, queue=dataclasses.replace(camera.queue, size=8))  # a short drain at the stop
    config = dataclasses.replace(config, cameras=[camera], batching=dataclasses.replace(config.batching, max_batch=8))
    daemon = service.Daemon(config)
    daemon.start()
    seen, longest = [], 0.0
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen.append(daemon.status()["healthy"])
            started = daemon._batch_started
            if started is not None:
                longest = max(longest, time.monotonic() - started)
            time.sleep(0.05)
        assert daemon.publisher.published >= 8, "batches finished"
    finally:
        daemon.shutdown()
    assert longest > STUCK_S * 1.5, f"the batches ran past STUCK_AFTER_S (longest {longest:.1f} s)"
    assert all(seen), f"unhealthy in {seen.count(False)} of {len(seen)} looks"


@pytest.mark.parametrize("error", [MemoryError(), AssertionError(), RuntimeError("  \n")])
def test_a_failing_reload_or_engine_close_with_no_message_is_logged_in_one_line_naming_its_type(error):
    """A bare MemoryError (a failed large allocation on a starved host) has no text: the SIGHUP reload thread's and
    the retired engine closer's log lines name its type instead of ending their thread in an IndexError."""
    from inspectd.daemon import service

    class Failing:
        def reload(self):
            raise error

        def close(self):
            raise error

    with structlog.testing.capture_logs() as logs:
        reloader = threading.Thread(target=service._reload, args=(Failing(), structlog.get_logger("inspectd")))
        reloader.start()
        reloader.join(10)
        service._close_all([Failing()])  # type: ignore[list-item]
    assert [(e["event"], e["error"]) for e in logs] == [
        ("reload_failed", type(error).__name__),
        ("retired_engine_close_failed", type(error).__name__),
    ]
