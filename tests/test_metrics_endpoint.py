"""The metrics endpoint scraped over real HTTP (urllib), fed by real camera ingest threads."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import structlog.testing

from inspectd.daemon.config import parse_config
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from inspectd.daemon.metrics import Metrics
from ports import free_port

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> tuple[dict, dict]:
    """({(name, ((label, value), ...)): value}, {name: type}) from a Prometheus text exposition."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not an exposition line: {line!r}"
        name, labels, value = match.groups()
        # A bucket bound is a number: `le="2"` and `le="2.0"` are the same bucket to Prometheus.
        pairs = [(k, str(float(v)) if k == "le" and v != "+Inf" else v) for k, v in LABEL.findall(labels or "")]
        samples[(name, tuple(sorted(pairs)))] = float(value)
    return samples, types


class Station:
    """What the daemon gives Metrics: status() with health, engine failures and each camera's ingest stats."""

    def __init__(self, ingests: dict[str, CameraIngest]) -> None:
        self.ingests = ingests
        self.failed_batches = 0
        self.healthy = True

    def status(self) -> dict:
        return {
            "healthy": self.healthy,
            "failed_batches": self.failed_batches,
            "cameras": {cam: ingest.stats() for cam, ingest in self.ingests.items()},
        }


@pytest.fixture
def station():
    config = parse_config(
        {
            "station": "s",
            "model": {"bundle": "b"},
            "cameras": [
                {
                    "id": "cam0",
                    "source": {"kind": "synthetic", "rate_hz": 1000, "count": 30, "width": 32, "height": 32},
                    "queue": {"size": 10},
                },
                {
                    "id": "cam1",
                    "source": {"kind": "synthetic", "rate_hz": 1000, "count": 5, "width": 32, "height": 32},
                    "queue": {"size": 10},
                },
            ],
        }
    )
    ready = threading.Condition()
    ingests = {cam.id: CameraIngest(cam, FrameQueue(cam.queue.size, cam.queue.policy, ready)) for cam in config.cameras}
    for ingest in ingests.values():
        ingest.start()
    for ingest in ingests.values():
        ingest.join(10)
        assert ingest.stats()["state"] == "ended"
    return Station(ingests)


def test_scrape_counters_histograms_and_gauges(station):
    metrics = Metrics(("127.0.0.1", 0), station)
    url = metrics.url
    try:
        assert url.startswith("http://127.0.0.1:")
        for _ in range(3):
            metrics.observe_batch(3, 0.004)
        metrics.observe_batch(8, 0.02)
        for latency in (0.003, 0.04, 0.04, 7.0):
            metrics.observe_result("cam0", "ok", latency)
        metrics.observe_result("cam0", "defect", 0.2)
        metrics.observe_result("cam1", "error", 0.001)
        station.failed_batches = 2
        samples, types = scrape(metrics.url)

        assert samples[("inspectd_frames_in_total", (("camera", "cam0"),))] == 30
        assert samples[("inspectd_frames_in_total", (("camera", "cam1"),))] == 5
        # 30 frames into a queue of 10 that nobody drains: exactly 20 dropped, oldest first.
        assert samples[("inspectd_frames_dropped_total", (("camera", "cam0"),))] == 20
        assert samples[("inspectd_frames_dropped_total", (("camera", "cam1"),))] == 0
        assert samples[("inspectd_frames_error_total", (("camera", "cam0"),))] == 0
        assert samples[("inspectd_camera_reopen_total", (("camera", "cam1"),))] == 0
        assert samples[("inspectd_verdicts_total", (("camera", "cam0"), ("verdict", "ok")))] == 4
        assert samples[("inspectd_verdicts_total", (("camera", "cam0"), ("verdict", "defect")))] == 1
        assert samples[("inspectd_verdicts_total", (("camera", "cam1"), ("verdict", "error")))] == 1
        assert samples[("inspectd_engine_failures_total", ())] == 2
        assert samples[("inspectd_healthy", ())] == 1

        assert samples[("inspectd_batch_size_bucket", (("le", "2.0"),))] == 0
        assert samples[("inspectd_batch_size_bucket", (("le", "4.0"),))] == 3
        assert samples[("inspectd_batch_size_bucket", (("le", "8.0"),))] == 4
        assert samples[("inspectd_batch_size_bucket", (("le", "+Inf"),))] == 4
        assert samples[("inspectd_batch_size_sum", ())] == 17
        assert samples[("inspectd_batch_size_count", ())] == 4
        assert samples[("inspectd_batch_seconds_count", ())] == 4
        assert samples[("inspectd_batch_seconds_sum", ())] == pytest.approx(0.032)

        cam0 = lambda le: samples[("inspectd_latency_seconds_bucket", (("camera", "cam0"), ("le", le)))]  # noqa
        assert cam0("0.005") == 1 and cam0("0.05") == 3 and cam0("0.25") == 4 and cam0("5.0") == 4
        assert cam0("+Inf") == 5
        assert samples[("inspectd_latency_seconds_count", (("camera", "cam0"),))] == 5
        assert samples[("inspectd_latency_seconds_count", (("camera", "cam1"),))] == 1

        assert types["inspectd_frames_in_total"] == "counter" and types["inspectd_healthy"] == "gauge"
        assert types["inspectd_latency_seconds"] == "histogram"

        # Counters only grow between scrapes; health follows the station.
        station.healthy = False
        metrics.observe_result("cam0", "ok", 0.01)
        again, _ = scrape(metrics.url)
        assert again[("inspectd_verdicts_total", (("camera", "cam0"), ("verdict", "ok")))] == 5
        assert again[("inspectd_healthy", ())] == 0
    finally:
        metrics.stop()
    assert metrics.url is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_hot_path_is_thread_safe_and_cheap():
    metrics = Metrics(None)
    threads = [
        threading.Thread(target=lambda: [metrics.observe_result("cam0", "ok", 0.01) for _ in range(20000)])
        for _ in range(4)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    per_call_us = (time.perf_counter() - t0) / 80000 * 1e6
    text = metrics.render()
    assert 'inspectd_verdicts_total{camera="cam0",verdict="ok"} 80000' in text
    assert 'inspectd_latency_seconds_count{camera="cam0"} 80000' in text
    assert per_call_us < 50, per_call_us


def test_unknown_path_is_404_and_a_busy_port_fails_clearly():
    metrics = Metrics(("127.0.0.1", 0))
    try:
        host, port = metrics.address
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
        assert info.value.code == 404
        with pytest.raises(OSError, match=rf"^metrics.listen 127.0.0.1:{port}: cannot listen"):
            Metrics(("127.0.0.1", port))
    finally:
        metrics.stop()


def test_a_scraper_that_hangs_up_mid_reply_is_one_log_line_and_the_next_scrape_is_served(capsys):
    """socketserver's default error handler printed a multi-line traceback to stderr (the journal, beside the JSON
    log lines) for each connection reset before the reply went out."""
    metrics = Metrics(("127.0.0.1", 0))
    try:
        host, port = metrics.address
        with structlog.testing.capture_logs() as logs:
            deadline = time.monotonic() + 10
            while not any(e["event"] == "metrics_request_failed" for e in logs) and time.monotonic() < deadline:
                with socket.create_connection((host, port), timeout=5) as conn:
                    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
                time.sleep(0.05)  # the server thread's write, then its error, before the next try
        failed = [e for e in logs if e["event"] == "metrics_request_failed"]
        assert failed, "no reset reached the server mid-reply within 10 s"
        assert failed[0]["client"].startswith("127.0.0.1:") and failed[0]["failed_total"] == 1
        assert failed[0]["error"].startswith(("ConnectionResetError", "BrokenPipeError")), failed[0]
        assert "Traceback" not in capsys.readouterr().err
        samples, _ = scrape(f"http://{host}:{port}/metrics")
        assert samples
        # A health probe that connects and resets every few seconds, for months: counted, not a line each.
        with structlog.testing.capture_logs() as logs:
            for _ in range(30):
                with socket.create_connection((host, port), timeout=5) as conn:
                    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                time.sleep(0.02)
            deadline = time.monotonic() + 5
            while metrics._server.failed < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert metrics._server.failed >= 2, "no further reset reached the server"
        assert not [e for e in logs if e["event"] == "metrics_request_failed"], logs
    finally:
        metrics.stop()


def test_a_fault_of_the_endpoint_itself_is_logged_with_its_traceback_not_as_a_scraper_hanging_up():
    def broken() -> str:
        raise KeyError("lost")  # a collector's bug, as a scrape would meet it

    metrics = Metrics(("127.0.0.1", 0))
    metrics.render = broken  # type: ignore[method-assign]
    try:
        host, port = metrics.address
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(OSError):  # urllib: the connection ends without a reply
                scrape(f"http://{host}:{port}/metrics")
            deadline = time.monotonic() + 10
            while not any(e["event"] == "metrics_request_crashed" for e in logs) and time.monotonic() < deadline:
                time.sleep(0.05)
        crashed = [e for e in logs if e["event"] == "metrics_request_crashed"]
        assert crashed and crashed[0]["exc_info"] is True and crashed[0]["log_level"] == "error", logs
        assert not [e for e in logs if e["event"] == "metrics_request_failed"]
    finally:
        metrics.stop()


def test_label_values_are_escaped():
    metrics = Metrics(None)
    metrics.observe_result('cam"1\\x', "ok", 0.1)
    assert 'inspectd_verdicts_total{camera="cam\\"1\\\\x",verdict="ok"} 1' in metrics.render()


def test_process_metrics_and_the_daemon_alarms_come_with_the_scrape():
    class Alarms:
        def status(self) -> dict:
            return {
                "journal": {"degraded": True, "lost": 3},
                "archive": {"degraded": True, "lost": 2, "bytes": 4096, "written": {"defect": 5, "ok": 1}},
                "auth_refused": {"control": 4},
            }

    metrics = Metrics(("127.0.0.1", 0), Alarms())
    try:
        samples, types = scrape(metrics.url)
    finally:
        metrics.stop()
    # prometheus-client's process collector: what an operator's standard dashboards expect.
    assert samples[("process_resident_memory_bytes", ())] > 1e6
    assert samples[("process_open_fds", ())] >= 3
    assert ("process_cpu_seconds_total", ()) in samples
    assert samples[("inspectd_journal_degraded", ())] == 1 and samples[("inspectd_journal_lost_total", ())] == 3
    assert samples[("inspectd_archive_degraded", ())] == 1 and samples[("inspectd_archive_lost_total", ())] == 2
    assert samples[("inspectd_archive_written_total", (("verdict", "defect"),))] == 5
    assert samples[("inspectd_archive_bytes", ())] == 4096
    assert samples[("inspectd_auth_refused_total", (("socket", "control"),))] == 4
    assert types["inspectd_archive_written_total"] == "counter"


def test_camera_up_help_agrees_with_its_value_and_an_idle_connection_is_closed(monkeypatch):
    from inspectd.daemon import metrics as metrics_module

    class Cameras:
        def status(self) -> dict:
            return {"cameras": {"a": {"state": "paused"}, "b": {"state": "reopening"}, "c": {"state": "running"}}}

    monkeypatch.setattr(metrics_module, "IDLE_TIMEOUT_S", 0.5)
    metrics = Metrics(("127.0.0.1", 0), Cameras())
    try:
        samples, _ = scrape(metrics.url)
        with urllib.request.urlopen(metrics.url, timeout=5) as response:
            help_line = next(
                line for line in response.read().decode().splitlines() if line.startswith("# HELP inspectd_camera_up ")
            )
        up = {cam: samples[("inspectd_camera_up", (("camera", cam),))] for cam in "abc"}
        assert up == {"a": 1, "b": 0, "c": 1}
        assert "paused" in help_line and "reopening" in help_line, help_line
        # A peer that connects and says nothing is let go, its handler thread with it.
        with socket.create_connection(metrics.address, timeout=5) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b"", "the server closed the idle connection"
            assert time.monotonic() - started < 4
    finally:
        metrics.stop()


def test_a_scrape_is_served_while_the_cap_is_held_by_idle_or_trickling_connections():
    """Each connection holds a thread for up to IDLE_TIMEOUT_S (a read's timeout): without a cap a flood of idle
    connections starts a thread for every one; with a cap that refused newcomers, 16 peers trickling a byte now and
    then locked the real scraper out. At the cap the oldest connection makes room."""
    from inspectd.daemon.metrics import MAX_CONNECTIONS

    metrics = Metrics(("127.0.0.1", 0))
    held: list[socket.socket] = []
    try:
        with structlog.testing.capture_logs() as logs:
            held = [socket.create_connection(metrics.address, timeout=5) for _ in range(MAX_CONNECTIONS)]
            for conn in held:
                conn.sendall(b"G")  # a request begun, never finished: a trickler's hold
            for _ in range(3):  # each closes the oldest held connection if the cap is still full when it comes
                samples, _ = scrape(metrics.url)
                assert samples
            assert held[0].recv(1) == b"", "the oldest was closed to make room"
            closed = 0
            for conn in held[1:]:
                conn.settimeout(0.2)
                try:
                    closed += conn.recv(1) == b""
                except TimeoutError:
                    pass
            # A scrape's place is free once its thread has ended, which may come after the next scrape: at most one
            # more closed per scrape, oldest first; the rest keep their place.
            assert closed <= 2, closed
            evicted = [e for e in logs if e["event"] == "metrics_connection_evicted"]
            assert len(evicted) == 1 and evicted[0]["evicted"] == 1 and evicted[0]["limit"] == MAX_CONNECTIONS
            assert evicted[0]["log_level"] == "warning"
            assert not [e for e in logs if e["event"] in ("metrics_request_failed", "metrics_request_crashed")]
        assert threading.active_count() < 2 * MAX_CONNECTIONS + 8
    finally:
        for conn in held:
            conn.close()
        metrics.stop()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_listen_address_that_the_config_accepts_is_served_over_ipv6():
    port = free_port()
    doc = {"station": "s", "model": {"bundle": "b"}, "cameras": [{"id": "c", "source": {"kind": "synthetic"}}]}
    config = parse_config({**doc, "metrics": {"listen": f"[::1]:{port}"}})
    metrics = Metrics(config.metrics.address)
    try:
        assert metrics.url == f"http://[::1]:{port}/metrics"
        samples, _ = scrape(metrics.url)
        assert samples[("process_open_fds", ())] >= 3
        # On the address asked for, and not on IPv4's loopback as well.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(OSError, match=rf"^metrics.listen \[::1\]:{port}: cannot listen"):
            Metrics(config.metrics.address)
    finally:
        metrics.stop()


def test_the_false_reject_warning_help_says_when_deploy_md_says_it_rises_and_clears():
    class Drifting:
        def status(self) -> dict:
            return {"cameras": {"a": {"drift": {"false_reject_warning": True, "false_reject_estimate": 0.01}}}}

    metrics = Metrics(("127.0.0.1", 0), Drifting())
    try:
        samples, _ = scrape(metrics.url)
        with urllib.request.urlopen(metrics.url, timeout=5) as response:
            help_line = next(
                line
                for line in response.read().decode().splitlines()
                if line.startswith("# HELP inspectd_drift_false_reject_warning ")
            )
    finally:
        metrics.stop()
    assert samples[("inspectd_drift_false_reject_warning", (("camera", "a"),))] == 1
    deploy = (REPO / "docs" / "DEPLOY.md").read_text()
    bullet = r"False-reject warning:.*?more than ([\d.]+) standard\s+errors.*?back within ([\d.]+).*?never below (\d+)x"
    documented = re.search(bullet, deploy, re.S)
    assert documented, "docs/DEPLOY.md (Score drift) no longer states when the warning rises and clears"
    rise, clear, floor = documented.groups()
    assert f"more than {rise} standard errors" in help_line and f"back within {clear}" in help_line, help_line
    assert f"above {floor}x the target" in help_line, help_line


def test_the_backlog_throughput_and_frames_lost_or_discarded_outside_the_queue_are_exported(station):
    """A dashboard alerts on a queue that fills and on frames that never got a result: the queued backlog, the
    throughput, frames a paused live camera discarded and frames a zmq camera lost at a reopen are in the status, and
    in /metrics too."""

    class WithZmqCamera:
        def status(self) -> dict:
            status = station.status()
            status["throughput_fps"] = 12.5
            status["cameras"]["cam1"].update(discarded=3, not_accepted=2)
            return status

    metrics = Metrics(("127.0.0.1", 0), WithZmqCamera())
    try:
        samples, types = scrape(metrics.url)
    finally:
        metrics.stop()
    # 30 and 5 frames into queues of 10 that nobody drains.
    assert samples[("inspectd_queued", (("camera", "cam0"),))] == 10
    assert samples[("inspectd_queued", (("camera", "cam1"),))] == 5
    assert samples[("inspectd_throughput_fps", ())] == 12.5
    assert samples[("inspectd_frames_discarded_total", (("camera", "cam0"),))] == 0
    assert samples[("inspectd_frames_discarded_total", (("camera", "cam1"),))] == 3
    assert samples[("inspectd_frames_not_accepted_total", (("camera", "cam1"),))] == 2
    assert ("inspectd_frames_not_accepted_total", (("camera", "cam0"),)) not in samples  # no zmq camera there
    assert types["inspectd_queued"] == "gauge" and types["inspectd_frames_not_accepted_total"] == "counter"


def test_every_drift_gauge_is_served_with_the_status_figure_and_named_in_deploy_md():
    """An operator graphing how far D is from clearing reads clear_at beside the statistic; DEPLOY.md's list of drift
    metrics is the one they look names up in."""
    from inspectd.daemon.metrics import DRIFT_GAUGES

    drift = {
        "alarm": True,
        "statistic": 0.31,
        "raise_at": 0.25,
        "clear_at": 0.2,
        "brightness_statistic": 0.05,
        "brightness_raise_at": 0.26,
        "brightness_clear_at": 0.21,
        "false_reject_estimate": 0.01,
        "false_reject_warning": False,
    }

    class Drifting:
        def status(self) -> dict:
            return {"cameras": {"a": {"drift": drift}}}

    metrics = Metrics(("127.0.0.1", 0), Drifting())
    try:
        samples, _ = scrape(metrics.url)
    finally:
        metrics.stop()
    served = {name: samples[(name, (("camera", "a"),))] for name, _, _ in DRIFT_GAUGES}
    assert served == {name: float(drift[key]) for name, _, key in DRIFT_GAUGES}
    assert {"inspectd_drift_clear_at", "inspectd_drift_brightness_clear_at"} <= set(served)
    section = (REPO / "docs" / "DEPLOY.md").read_text().split("## Score drift", 1)[1]
    documented = set(re.findall(r"`(inspectd_drift_\w+)`", section))
    assert documented == set(served), documented ^ set(served)
