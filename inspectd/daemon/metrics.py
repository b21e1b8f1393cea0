"""Prometheus metrics: a small registry (counters, gauges, labelled histograms) and its text exposition over HTTP.

Owns the daemon's metric names and the stdlib http.server thread that serves them at `metrics.listen` (GET /metrics).
Two ways values get in:
  - pushed on the hot path (`observe_batch`, `observe_result`): one lock and a few number adds per call; label
    children are looked up in nested dicts built once per camera/verdict, so a call allocates nothing;
  - pulled at scrape time from the daemon's `status()` (per-camera ingest counters, health, engine failures):
    ingest already counts those, so counting them twice on the hot path would be waste.
Written here instead of depending on prometheus-client: the exposition format is a few lines and the station stays
small.
"""

from __future__ import annotations

import bisect
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

log = structlog.get_logger("inspectd.daemon.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Value:
    __slots__ = ("value", "_lock")

    def __init__(self, lock: threading.Lock) -> None:
        self.value: float = 0
        self._lock = lock

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        with self._lock:
            self.value = value


class _Buckets:
    __slots__ = ("bounds", "counts", "sum", "count", "_lock")

    def __init__(self, bounds: tuple[float, ...], lock: threading.Lock) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is above every bound
        self.sum = 0.0
        self.count = 0
        self._lock = lock

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += 1
            self.sum += value
            self.count += 1


class Family:
    """One metric name with its label names; `labels(*values)` gives the child to keep and update."""

    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = (),
        lock: threading.Lock | None = None,
    ) -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self.labelnames = labelnames
        self.buckets = tuple(buckets)
        self._lock = lock or threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: {len(values)} label values, expected {len(self.labelnames)} "
                f"({', '.join(self.labelnames)})"
            )
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.get(values)
                if child is None:
                    child = _Buckets(self.buckets, self._lock) if self.kind == "histogram" else _Value(self._lock)
                    self._children[values] = child
        return child

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} {self.kind}")
        with self._lock:
            items = sorted(self._children.items())
            # (label values, a histogram's (counts, sum, count) or a counter's/gauge's value)
            snapshot: list[tuple[tuple[str, ...], Any]] = [
                (k, (list(c.counts), c.sum, c.count) if isinstance(c, _Buckets) else c.value) for k, c in items
            ]
        for values, data in snapshot:
            pairs = [f'{n}="{_escape(v)}"' for n, v in zip(self.labelnames, values)]
            if self.kind != "histogram":
                out.append(f"{self.name}{{{','.join(pairs)}}} {_fmt(data)}" if pairs else f"{self.name} {_fmt(data)}")
                continue
            counts, total, count = data
            running = 0
            for bound, n in zip(self.buckets + (math.inf,), counts):
                running += n
                le = ",".join(pairs + [f'le="{_fmt(bound)}"'])
                out.append(f"{self.name}_bucket{{{le}}} {running}")
            labels = f"{{{','.join(pairs)}}}" if pairs else ""
            out.append(f"{self.name}_sum{labels} {_fmt(total)}")
            out.append(f"{self.name}_count{labels} {count}")


class Metrics:
    """The daemon's metrics and their HTTP endpoint, serving from construction until `stop()`.

    `address` is (host, port); port 0 picks a free one (see `.address`). `source`, when given, has `status()`
    returning the daemon's status dict (healthy, failed_batches, cameras: {id: {frames_in, dropped, errors,
    reopen_count}}), read once per scrape.
    """

    def __init__(self, address: tuple[str, int] | None = ("127.0.0.1", 9108), source: Any = None) -> None:
        self.source = source
        self._lock = threading.Lock()
        lock = self._lock

        def family(name, help_text, kind, labelnames=(), buckets=()):
            return Family(name, help_text, kind, labelnames, buckets, lock)

        self.frames_in = family("inspectd_frames_in_total", "Frames taken in per camera.", "counter", ("camera",))
        self.frames_dropped = family(
            "inspectd_frames_dropped_total",
            "Frames dropped by a full queue (drop_oldest) per camera.",
            "counter",
            ("camera",),
        )
        self.frames_error = family(
            "inspectd_frames_error_total", "Frames with verdict error per camera.", "counter", ("camera",)
        )
        self.reopens = family(
            "inspectd_camera_reopen_total", "Attempts to reopen a failed camera source.", "counter", ("camera",)
        )
        self.verdicts = family(
            "inspectd_verdicts_total", "Published results per camera and verdict.", "counter", ("camera", "verdict")
        )
        self.engine_failures = family("inspectd_engine_failures_total", "Batches the engine failed.", "counter")
        self.healthy = family("inspectd_healthy", "1 while the inference stage is healthy.", "gauge")
        self.batch_size = family(
            "inspectd_batch_size", "Frames per engine batch.", "histogram", buckets=BATCH_SIZE_BUCKETS
        )
        self.batch_seconds = family(
            "inspectd_batch_seconds", "Engine time per batch.", "histogram", buckets=BATCH_SECONDS_BUCKETS
        )
        self.latency = family(
            "inspectd_latency_seconds",
            "Ingest to publish latency per frame.",
            "histogram",
            ("camera",),
            buckets=LATENCY_BUCKETS,
        )
        self.camera_up = family(
            "inspectd_camera_up",
            "1 while the camera's source delivers (state running), 0 during an outage.",
            "gauge",
            ("camera",),
        )
        self.journal_degraded = family(
            "inspectd_journal_degraded",
            "1 while journal writes fail (disk full, I/O error): results are published but not journalled.",
            "gauge",
        )
        self.journal_lost = family(
            "inspectd_journal_lost_total", "Results published without being journalled.", "counter"
        )
        self.auth_refused = family(
            "inspectd_auth_refused_total", "CurveZMQ connection attempts refused per socket.", "counter", ("socket",)
        )
        self.families = [
            self.frames_in,
            self.frames_dropped,
            self.frames_error,
            self.reopens,
            self.verdicts,
            self.engine_failures,
            self.healthy,
            self.batch_size,
            self.batch_seconds,
            self.latency,
            self.camera_up,
            self.journal_degraded,
            self.journal_lost,
            self.auth_refused,
        ]
        self._batch_size = self.batch_size.labels()
        self._batch_seconds = self.batch_seconds.labels()
        self._verdict_children: dict[str, dict[str, _Value]] = {}
        self._latency_children: dict[str, _Buckets] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if address is not None:
            self._serve(address)

    # -- hot path ----------------------------------------------------------------------------------------------

    def observe_batch(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._batch_seconds.observe(seconds)

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

    def _collect(self) -> None:
        """Mirror the counters the daemon already keeps into their families, once per scrape."""
        if self.source is None:
            return
        status = self.source.status()
        if "healthy" in status:
            self.healthy.labels().set(1 if status["healthy"] else 0)
        if "failed_batches" in status:
            self.engine_failures.labels().set(int(status["failed_batches"]))
        for camera, stats in (status.get("cameras") or {}).items():
            for fam, key in (
                (self.frames_in, "frames_in"),
                (self.frames_dropped, "dropped"),
                (self.frames_error, "errors"),
                (self.reopens, "reopen_count"),
            ):
                if key in stats:
                    fam.labels(camera).set(int(stats[key]))
            if "state" in stats:
                self.camera_up.labels(camera).set(1 if stats["state"] in ("running", "paused") else 0)
        journal = status.get("journal")
        if journal:
            self.journal_degraded.labels().set(1 if journal["degraded"] else 0)
            self.journal_lost.labels().set(int(journal["lost"]))
        for role, count in (status.get("auth_refused") or {}).items():
            self.auth_refused.labels(role).set(int(count))

    def render(self) -> str:
        try:
            self._collect()
        except Exception as exc:  # a half-started daemon must not make the scrape fail: serve what we have
            log.warning("metrics_collect_failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        out: list[str] = []
        for fam in self.families:
            fam.render(out)
        return "\n".join(out) + "\n"

    # -- HTTP --------------------------------------------------------------------------------------------------

    def _serve(self, address: tuple[str, int]) -> None:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
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

        try:
            server = ThreadingHTTPServer(address, Handler)
        except OSError as exc:
            raise OSError(f"metrics.listen {address[0]}:{address[1]}: cannot listen ({exc.strerror or exc})") from None
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
        host, port = self.address
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(2)
            self._server = None
