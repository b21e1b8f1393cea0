"""Prometheus metrics: the daemon's metric names, on prometheus-client, and the HTTP thread serving GET /metrics.

Two ways values get in:
  - pushed on the hot path (`observe_batch`, `observe_result`): prometheus-client counters and histograms, their label
    children looked up once per camera/verdict and kept, so a call is a dict lookup and a locked add;
  - pulled at scrape time from the daemon's `status()` (per-camera ingest counters, health, engine failures, journal
    and archive alarms) by a collector: ingest already counts those, so counting them twice on the hot path would be
    waste.
Each Metrics has its own registry (two daemons in one test process must not share counters), with
prometheus-client's process and platform collectors: RSS, CPU seconds, open file descriptors, start time.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from inspectd.daemon.drift import CLEAR_SE, RAISE_SE, WARNING_FACTOR
from inspectd.logs import lines_lost

log = structlog.get_logger("inspectd.daemon.metrics")

# The `_created` series prometheus-client adds to every counter and histogram double the exposition and tell an
# operator nothing the process start time does not.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IDLE_TIMEOUT_S = 10.0  # a /metrics connection silent this long (no request, or a reader that stopped) is closed
# Connections served at once, each on its own thread; one more closes the oldest. A scraper needs one, a few
# dashboards a few more; a flood of idle connections would otherwise hold a thread each for IDLE_TIMEOUT_S.
MAX_CONNECTIONS = 16
EVICTED_LOG_S = 60.0  # connections closed to make room, or ended by a reset: logged at most once per this

# Pulled per camera from status()["cameras"][camera][key]: (metric name without _total, help, status key).
CAMERA_COUNTERS = (
    ("inspectd_frames_in", "Frames taken in per camera.", "frames_in"),
    ("inspectd_frames_dropped", "Frames dropped by a full queue (drop_oldest) per camera.", "dropped"),
    ("inspectd_frames_error", "Frames with verdict error per camera.", "errors"),
    ("inspectd_camera_reopen", "Attempts to reopen a failed camera source.", "reopen_count"),
    (
        "inspectd_frames_discarded",
        "Frames a paused live camera delivered and the daemon discarded, not inspected.",
        "discarded",
    ),
    (
        "inspectd_frames_not_accepted",
        "Frames a zmq camera received but never took in (still in its socket when it was reopened or closed): lost.",
        "not_accepted",
    ),
    (
        "inspectd_folder_replaced_unread",
        "Parts a folder camera lost: replaced under their name before they were read (a lower bound).",
        "replaced_unread",
    ),
)


class _StatusCollector(Collector):
    """The counters the daemon already keeps, read from `source.status()` once per scrape."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        try:
            status = self.source.status()
        except Exception as exc:  # a half-started daemon must not make the scrape fail: serve what we have
            log.warning("metrics_collect_failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        cameras = status.get("cameras") or {}
        for name, help_text, key in CAMERA_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["camera"])
            for camera, stats in cameras.items():
                if key in stats:
                    family.add_metric([camera], int(stats[key]))
            yield family
        up = GaugeMetricFamily(
            "inspectd_camera_up",
            "1 while the camera's source is up (state running, or paused: up but not inspected), "
            "0 while it is reopening, failed, ended or stopped.",
            labels=["camera"],
        )
        for camera, stats in cameras.items():
            if "state" in stats:
                up.add_metric([camera], 1 if stats["state"] in ("running", "paused") else 0)
        yield up
        backlog = GaugeMetricFamily(
            "inspectd_folder_disposal_backlog",
            "Files of a folder camera whose results are out, waiting to be deleted or moved.",
            labels=["camera"],
        )
        for camera, stats in cameras.items():
            if "disposal_backlog" in stats:
                backlog.add_metric([camera], int(stats["disposal_backlog"]))
        yield backlog
        queued = GaugeMetricFamily(
            "inspectd_queued", "Frames taken in and waiting in the camera's queue for the engine.", labels=["camera"]
        )
        for camera, stats in cameras.items():
            if "queued" in stats:
                queued.add_metric([camera], int(stats["queued"]))
        yield queued
        if "throughput_fps" in status:
            yield GaugeMetricFamily(
                "inspectd_throughput_fps",
                "Frames judged per second over the last few seconds, every camera together.",
                value=float(status["throughput_fps"]),
            )
        yield from _drift_families(cameras)
        if "failed_batches" in status:
            yield CounterMetricFamily(
                "inspectd_engine_failures", "Batches the engine failed.", value=int(status["failed_batches"])
            )
        if "healthy" in status:
            yield GaugeMetricFamily(
                "inspectd_healthy",
                "1 while the daemon is healthy: the engine's batches succeed, the pipeline moves (no batch stuck in "
                "the engine, results taken by the publisher) and every serving thread runs; 0 otherwise (the "
                "status's unhealthy list says why).",
                value=1 if status["healthy"] else 0,
            )
        journal = status.get("journal")
        if journal:
            yield GaugeMetricFamily(
                "inspectd_journal_degraded",
                "1 while journal writes fail (disk full, I/O error): results are published but not journalled.",
                value=1 if journal["degraded"] else 0,
            )
            yield CounterMetricFamily(
                "inspectd_journal_lost", "Results published without being journalled.", value=int(journal["lost"])
            )
        archive = status.get("archive")
        if archive:
            yield GaugeMetricFamily(
                "inspectd_archive_degraded",
                "1 while archive writes fail (disk full, I/O error): results are published without their images.",
                value=1 if archive["degraded"] else 0,
            )
            written = CounterMetricFamily(
                "inspectd_archive_written", "Frames written to the image archive, per verdict.", labels=["verdict"]
            )
            for verdict, count in (archive.get("written") or {}).items():
                written.add_metric([verdict], int(count))
            yield written
            yield CounterMetricFamily(
                "inspectd_archive_lost",
                "Frames chosen for the archive but not written (writer behind, or the disk failing).",
                value=int(archive["lost"]),
            )
            yield GaugeMetricFamily(
                "inspectd_archive_bytes", "Bytes the image archive holds on disk.", value=int(archive["bytes"])
            )
        yield CounterMetricFamily(
            "inspectd_log_lines_lost",
            "Log lines stdout did not take (its reader gone, a full disk): lost, the daemon goes on.",
            value=lines_lost(),
        )
        refused = CounterMetricFamily(
            "inspectd_auth_refused", "CurveZMQ connection attempts refused per socket.", labels=["socket"]
        )
        for role, count in (status.get("auth_refused") or {}).items():
            refused.add_metric([role], int(count))
        yield refused


# Pulled per camera from status()["cameras"][camera]["drift"] (inspectd.daemon.drift): (name, help, key).
DRIFT_GAUGES = (
    (
        "inspectd_drift_alarm",
        "1 while the camera's good frames (scores or brightness) have drifted from the calibration reference.",
        "alarm",
    ),
    (
        "inspectd_drift_statistic",
        "KS statistic D of the good-score window against the reference (last check).",
        "statistic",
    ),
    ("inspectd_drift_raise_at", "The D above which the drift alarm rises, for the window's size.", "raise_at"),
    (
        "inspectd_drift_clear_at",
        "The D a raised score alarm must fall below to clear (lower than raise_at: the hysteresis).",
        "clear_at",
    ),
    (
        "inspectd_drift_brightness_statistic",
        "KS statistic D of the good frames' mean grey level against the reference (last check).",
        "brightness_statistic",
    ),
    (
        "inspectd_drift_brightness_raise_at",
        "The brightness D above which the drift alarm rises, for the window's size.",
        "brightness_raise_at",
    ),
    (
        "inspectd_drift_brightness_clear_at",
        "The brightness D a raised brightness alarm must fall below to clear.",
        "brightness_clear_at",
    ),
    (
        "inspectd_drift_false_reject_estimate",
        "False-reject rate the good-score window implies (normal model, read through the threshold's cut).",
        "false_reject_estimate",
    ),
    (
        "inspectd_drift_false_reject_warning",
        f"1 from when the good frames put the image threshold more than {RAISE_SE:g} standard errors closer than the "
        f"reference did (and the implied false-reject rate is above {WARNING_FACTOR:g}x the target) until they are "
        f"back within {CLEAR_SE:g}; the status's warn_above and clear_below give both as rates.",
        "false_reject_warning",
    ),
)


def _drift_families(cameras: dict[str, Any]) -> Iterator[Metric]:
    for name, help_text, key in DRIFT_GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=["camera"])
        for camera, stats in cameras.items():
            value = (stats.get("drift") or {}).get(key)
            if value is not None:
                family.add_metric([camera], float(value))
        yield family


class _Server(ThreadingHTTPServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._active: dict[Any, float] = {}  # connection -> when accepted, oldest first
        self._evicted: set[Any] = set()
        self.evicted = 0
        self._evicted_logged_at = -EVICTED_LOG_S
        # Connections that ended in a reset or a timeout: a TCP health probe that connects and resets does it every
        # few seconds, for months. The first is logged, then at most one line per EVICTED_LOG_S with the count.
        self.failed = 0
        self._failed_logged_at = -EVICTED_LOG_S
        self._failed_unlogged = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        # Full: the oldest connection makes room. A scraper's request takes milliseconds, so the oldest is one that
        # went quiet or trickles bytes to hold its place; refusing the newcomer instead would let 16 such peers
        # lock the real scraper out for as long as they keep trickling.
        with self._lock:
            if len(self._active) >= MAX_CONNECTIONS:
                oldest = next(iter(self._active))
                del self._active[oldest]
                self._evicted.add(oldest)
                self.evicted += 1
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # its handler thread then ends at its next read or write
                now = time.monotonic()
                if now - self._evicted_logged_at >= EVICTED_LOG_S:
                    self._evicted_logged_at = now
                    log.warning(
                        "metrics_connection_evicted",
                        client=_host_port(*client_address[:2]),
                        evicted=self.evicted,
                        limit=MAX_CONNECTIONS,
                    )
            self._active[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)  # no thread started to forget it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self._lock:
            self._active.pop(request, None)
            self._evicted.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr, which under the unit is the journal: non-JSON lines
        # for every scraper that hangs up mid-reply. One log line says the same.
        exc = sys.exc_info()[1]
        with self._lock:
            if request in self._evicted:  # closed here to make room: counted and logged as such
                return
        client = _host_port(*client_address[:2])
        if not isinstance(exc, (ConnectionError, TimeoutError)):  # a fault of ours: its traceback, in the log line
            log.exception("metrics_request_crashed", client=client)
            return
        lines = str(exc).strip().splitlines()
        now = time.monotonic()
        with self._lock:
            self.failed += 1
            if now - self._failed_logged_at < EVICTED_LOG_S:
                self._failed_unlogged += 1
                return
            self._failed_logged_at = now
            since, self._failed_unlogged = self._failed_unlogged, 0
        log.warning(
            "metrics_request_failed",
            client=client,
            error=type(exc).__name__ + (f": {lines[0]}" if lines else ""),
            failed_total=self.failed,
            not_logged_since=since,  # the ones since the last line, each like this one
        )


class _IPv6Server(_Server):
    # http.server's servers are IPv4 sockets, on which an IPv6 address such as ::1 cannot be bound.
    address_family = socket.AF_INET6


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Metrics:
    """The daemon's metrics and their HTTP endpoint, serving from construction until `stop()`.

    `address` is (host, port); port 0 picks a free one (see `.address`); None serves nothing (render() still works).
    An IPv6 host (`::1`: the config's `[::1]:PORT` without its brackets) is served over IPv6.
    `source`, when given, has `status()` returning the daemon's status dict (healthy, failed_batches, throughput_fps,
    cameras: {id: {frames_in, dropped, errors, discarded, not_accepted, queued, reopen_count, state, drift}}, journal,
    archive, auth_refused), read once per scrape.
    """

    def __init__(self, address: tuple[str, int] | None = ("127.0.0.1", 9108), source: Any = None) -> None:
        self.source = source
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_StatusCollector(source))
        self.verdicts = Counter(
            "inspectd_verdicts",
            "Published results per camera and verdict.",
            ("camera", "verdict"),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "inspectd_batch_size", "Frames per engine batch.", buckets=BATCH_SIZE_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "inspectd_batch_seconds", "Engine time per batch.", buckets=BATCH_SECONDS_BUCKETS, registry=self.registry
        )
        self.latency = Histogram(
            "inspectd_latency_seconds",
            "Ingest to publish latency per frame.",
            ("camera",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._verdict_children: dict[str, dict[str, Any]] = {}
        self._latency_children: dict[str, Any] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if address is not None:
            self._serve(address)

    # -- hot path ----------------------------------------------------------------------------------------------

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_result(self, camera: str, verdict: str, latency_s: float) -> None:
        try:
            counter = self._verdict_children[camera][verdict]
        except KeyError:
            counter = self.verdicts.labels(camera, verdict)
            self._verdict_children.setdefault(camera, {})[verdict] = counter
        counter.inc()
        latency = self._latency_children.get(camera)
        if latency is None:
            latency = self._latency_children[camera] = self.latency.labels(camera)
        latency.observe(latency_s)

    # -- scrape ------------------------------------------------------------------------------------------------

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    # -- HTTP --------------------------------------------------------------------------------------------------

    def _serve(self, address: tuple[str, int]) -> None:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            # A scraper that connects and goes quiet (or half-open) would hold its thread for good.
            timeout = IDLE_TIMEOUT_S

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # one log line per scrape would drown the state-change events

        host, port = address
        server_class = _IPv6Server if ":" in host else _Server
        try:
            server = server_class((host, port), Handler)
        except OSError as exc:
            raise OSError(f"metrics.listen {_host_port(host, port)}: cannot listen ({exc.strerror or exc})") from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics_listening", url=self.url)

    @property
    def address(self) -> tuple[str, int] | None:
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), port

    @property
    def url(self) -> str | None:
        if self.address is None:
            return None
        return f"http://{_host_port(*self.address)}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(2)
            self._server = None
