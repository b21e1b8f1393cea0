"""`inspectd bench daemon`: the real daemon as a subprocess, fed at saturation and at a fixed offered rate.

Each scenario (source kind x camera count x load) writes a config, starts `python -m inspectd run --config ...`, waits
for its first status message, feeds it, and measures for a fixed window with a real SUB subscriber: end-to-end latency
(t_capture -> received here), delivered frames/s, drops (queue drops from the status messages and seq gaps seen by
the subscriber), and the daemon's CPU seconds (utime + stime from /proc/<pid>/stat) per delivered frame.

Sources: `synthetic` (the daemon renders the synthetic line itself), `folder` (a backlog of JPEG files, drained as fast
as the daemon can: saturation only; t_capture is the file's mtime, so no latency), `zmq-raw` and `zmq-jpeg` (this
process PUSHes raw uint8 frames or JPEG bytes of the same frames with the ingest header). Saturation runs use queue
policy `block`, so the daemon takes frames only as fast as it judges them and no CPU goes to frames it would drop;
fixed-rate runs use the default `drop_oldest` with the offered rate split evenly over the cameras.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from engines.bundle.store import load_bundle
from engines.progress import Progress
from inspectd.clients.subscribe import GapTracker, Subscriber
from inspectd.daemon.config import MAX_SHUTDOWN_TIMEOUT_S
from inspectd.daemon.notify import PARENT_PID_ENV
from inspectd.errors import MessageError
from inspectd.tools.bench.measure import MB, CpuClock, latency_ms, p99_or_none, p99_text, proc_peak_rss_bytes
from inspectd.tools.children import killed_on_a_stop

SOURCES = ("synthetic", "folder", "zmq-raw", "zmq-jpeg")
SATURATION_RATE_HZ = 5000.0  # synthetic source rate standing in for "as fast as possible"
START_TIMEOUT_S = 90.0  # imports, bundle checksums, ONNX Runtime session, warm-up, on a small loaded machine
# A saturated run stops with every camera's queue full: the daemon drains them (4 cameras x 64 frames at 10 frames/s
# take 26 s) within the longest shutdown_timeout_s the config allows, then its graces (publish, archive, sockets).
STOP_TIMEOUT_S = MAX_SHUTDOWN_TIMEOUT_S + 20.0
WARMUP_S = 1.5
BURST_GAP_MIN_S = 0.02
# A folder backlog holds this many frames/s of the run at least, and FOLDER_ENGINE_MARGIN x the engine's best
# frames/s where that is more: a daemon faster than its backlog would idle through the rest of the window.
FOLDER_FPS_CEILING = 300
FOLDER_ENGINE_MARGIN = 1.5
# A saturated folder run that took in every file of its backlog and whose results stop this long (or this share of the
# window, if more) before the window's end ran out of files: its figures would divide by frames that never came.
FOLDER_DRY_S = 0.5
FOLDER_DRY_SHARE = 0.1
# A scenario whose error verdicts are more than this share of its results measured a failing daemon, not its speed.
ERROR_SHARE_MAX = 0.01
# A fixed-rate run that sent less than this share of the rate asked for measured a lighter load than it names.
SENT_SHARE_MIN = 0.9
# The load of the --profile run: a saturated run of its own, after the plain one. cProfile in every thread slows the
# daemon, so its figures count towards no goal and set no offered rate.
PROFILED_LOAD = "saturation, profiled (not in the goals)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FrameSet:
    """The frames every scenario is fed: JPEG file bytes and their decoded raw arrays, in the same order."""

    def __init__(self, paths: list[Path], channels: int) -> None:
        self.paths = paths
        self.jpeg = [p.read_bytes() for p in paths]
        flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
        self.raw = []
        for path, data in zip(paths, self.jpeg):
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            if image is None:
                raise ValueError(f"{path}: OpenCV cannot decode it")
            if image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            self.raw.append(np.ascontiguousarray(image))


class Pusher(threading.Thread):
    """PUSHes frames round-robin to each zmq camera's endpoint; paced at `rate_hz` in total, or as fast as the
    daemon takes them when `rate_hz` is None (the PUSH socket blocks at its high-water mark)."""

    def __init__(self, endpoints: list[str], frames: FrameSet, encoding: str, rate_hz: float | None) -> None:
        super().__init__(name="bench-push", daemon=True)
        self.ctx = zmq.Context.instance()
        self.socks = []
        for endpoint in endpoints:
            sock = self.ctx.socket(zmq.PUSH)
            sock.sndhwm = 16
            sock.sndtimeo = 100
            sock.linger = 0
            sock.connect(endpoint)
            self.socks.append(sock)
        self.frames = frames
        self.encoding = encoding
        self.rate_hz = rate_hz
        self.sent = 0
        self.stop = threading.Event()

    def _message(self, i: int) -> list:
        k = i % len(self.frames.raw)
        image = self.frames.raw[k]
        header = {
            "frame_id": str(i),
            "t_capture": time.time(),
            "shape": list(image.shape),
            "dtype": "uint8",
            "encoding": self.encoding,
        }
        payload = image if self.encoding == "raw" else self.frames.jpeg[k]
        return [json.dumps(header).encode(), payload]

    def run(self) -> None:
        period = 1.0 / self.rate_hz if self.rate_hz else 0.0
        next_t = time.monotonic()
        i = 0
        while not self.stop.is_set():
            if period:
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_t = max(next_t + period, time.monotonic() - period)
            sock = self.socks[i % len(self.socks)]
            try:
                sock.send_multipart(self._message(i), copy=False)
            except zmq.Again:
                continue  # the daemon is full: try this camera again (saturation)
            i += 1
            self.sent = i
        for sock in self.socks:
            sock.close(0)


def write_config(
    workdir: Path,
    bundle: Path,
    source: str,
    cameras: int,
    saturate: bool,
    rate_hz: float | None,
    frames: FrameSet,
    max_batch: int,
    max_wait_ms: float,
    backend: str,
    options: dict,
    frame_hw: tuple[int, int],
    channels: int,
    duration_s: float,
    folder_fps: float,
) -> tuple[Path, str, list[str]]:
    """The daemon config for one scenario; returns (path, publish endpoint, zmq ingest endpoints)."""
    publish = f"tcp://127.0.0.1:{free_port()}"
    cams, ingest = [], []
    for k in range(cameras):
        if source == "synthetic":
            if saturate:
                per_camera = SATURATION_RATE_HZ
            else:
                assert rate_hz is not None, "a fixed-rate scenario has a rate"
                per_camera = rate_hz / cameras
            src = {
                "kind": "synthetic",
                "rate_hz": per_camera,
                "width": frame_hw[1],
                "height": frame_hw[0],
                "channels": channels,
                "seed": k,
            }
        elif source == "folder":
            folder = workdir / f"cam{k}"
            folder.mkdir(parents=True, exist_ok=True)
            fill_folder(folder, frames, int(folder_fps * (WARMUP_S + duration_s + 5) / cameras))
            # The watcher waits one poll for a file's size to hold still; the files are complete, so keep it short.
            src = {"kind": "folder", "path": str(folder), "pattern": "*.jpg", "poll_ms": 20}
        else:
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            ingest.append(endpoint)
            src = {"kind": "zmq", "endpoint": endpoint}
        cams.append(
            {"id": f"cam{k}", "source": src, "queue": {"size": 64, "policy": "block" if saturate else "drop_oldest"}}
        )
    config = {
        "station": "bench",
        "model": {"bundle": str(bundle)},
        "engine": {"backend": backend, "options": options},
        "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms},
        "cameras": cams,
        "publish": {"endpoint": publish, "masks": "defects", "sndhwm": 10000, "status_interval_s": 0.5},
        "control": {"endpoint": f"ipc://{workdir}/control.sock"},
        "logging": {"level": "warning", "format": "json"},
        "metrics": {"listen": None},
        "state_dir": str(workdir / "state"),
        "shutdown_timeout_s": MAX_SHUTDOWN_TIMEOUT_S,
    }
    path = workdir / "inspectd.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path, publish, ingest


def fill_folder(folder: Path, frames: FrameSet, count: int) -> None:
    """`count` JPEG files for a folder source: each frame written once from memory, the rest hard links to those.
    Links cost no disk for a backlog of thousands of files, and linking inside the folder cannot cross filesystems
    (--frames on a station's disk, TMPDIR on tmpfs); where the filesystem has no hard links, every file is written."""
    linkable = True
    for i in range(count):
        k = i % len(frames.jpeg)
        path = folder / f"{i:06d}.jpg"
        if linkable and i >= len(frames.jpeg):
            try:
                os.link(folder / f"{k:06d}.jpg", path)
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                linkable = False
        path.write_bytes(frames.jpeg[k])


def arrival_rate(arrivals: list[float], max_batch: int) -> float | None:
    """Frames/s from arrival times, free of the window's edges. Results arrive in bursts, one per batch, so count
    the frames from the first whole burst to the last burst over the time between their first arrivals; the window
    may open part-way through a burst and close part-way through another, and counting whole batches in a fixed
    window would be off by up to a batch (10% at 10 frames/s in batches of 8 over 8 s).
    A burst ends at a gap longer than a fifth of the mean interval between full batches (and than BURST_GAP_MIN_S, as
    a descheduled publisher can pause inside a batch). None with fewer than three bursts: the caller then divides
    by the window, which is exact for steady arrivals."""
    n = len(arrivals)
    if n < 2 or arrivals[-1] <= arrivals[0]:
        return None
    times = np.asarray(arrivals)
    gap_floor = max(BURST_GAP_MIN_S, 0.2 * (times[-1] - times[0]) / max(1.0, n / max_batch))
    breaks = np.nonzero(np.diff(times) > gap_floor)[0]
    if breaks.size < 2:
        return None
    first_burst, last_burst = int(breaks[0]) + 1, int(breaks[-1]) + 1
    return (last_burst - first_burst) / (times[last_burst] - times[first_burst])


def queue_drops(status: dict | None) -> int | None:
    """The frames every camera's queue has dropped since the daemon started, from a status message or the control
    `status` reply (the same `cameras` block); None when it holds no such count."""
    cameras = (status or {}).get("cameras")
    if not isinstance(cameras, dict) or not cameras:
        return None
    return sum(cam.get("dropped", 0) for cam in cameras.values() if isinstance(cam, dict))


def control_status(endpoint: str, timeout_ms: int = 2000) -> dict | None:
    """The daemon's `{"cmd": "status"}` reply (None if it does not answer in time)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = sock.sndtimeo = timeout_ms
    try:
        sock.connect(endpoint)
        sock.send_json({"cmd": "status"})
        reply = sock.recv_json()
        return reply if isinstance(reply, dict) and reply.get("ok", True) else None
    except zmq.ZMQError:
        return None
    finally:
        sock.close(0)


class Scenario:
    """One daemon subprocess, fed and measured."""

    def __init__(
        self,
        bundle: Path,
        source: str,
        cameras: int,
        frames: FrameSet,
        workdir: Path,
        *,
        saturate: bool,
        rate_hz: float | None = None,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        backend: str = "onnxruntime",
        options: dict | None = None,
        profile: Path | None = None,
        duration_s: float = 10.0,
        folder_fps: float | None = None,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"--source {source!r}: expected one of {', '.join(SOURCES)}")
        if not saturate and (rate_hz is None or rate_hz <= 0):
            raise ValueError(f"offered rate {rate_hz!r}: expected frames/s > 0")
        if not saturate and source == "folder":
            raise ValueError("--source folder: a backlog of files measures saturation only, not a fixed rate")
        h, w, c = load_bundle(bundle).input_shape
        self.source, self.cameras, self.saturate, self.rate_hz = source, cameras, saturate, rate_hz
        self.frames, self.workdir, self.profile = frames, workdir, profile
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        frame_hw = frames.raw[0].shape[:2]
        self.config, self.publish, self.ingest = write_config(
            workdir,
            bundle,
            source,
            cameras,
            saturate,
            rate_hz,
            frames,
            max_batch,
            max_wait_ms,
            backend,
            options or {},
            frame_hw,
            c,
            duration_s,
            FOLDER_FPS_CEILING if folder_fps is None else folder_fps,
        )
        self.control = f"ipc://{workdir}/control.sock"
        self.log_path = workdir / "daemon.log"

    def command(self) -> list[str]:
        if self.profile is not None:
            return [
                sys.executable,
                "-m",
                "inspectd.tools.bench.profiling",
                str(self.profile),
                "run",
                "--config",
                str(self.config),
            ]
        return [sys.executable, "-m", "inspectd", "run", "--config", str(self.config)]

    def run(self, duration_s: float) -> dict[str, Any]:
        """The scenario's row; RuntimeError when the daemon did not start, exited on its own or did not stop
        cleanly on SIGTERM (its figures would then describe a daemon that was not running)."""
        log_path = self.log_path
        # The daemon imports this very checkout, installed or not.
        root = str(Path(__file__).resolve().parents[1])
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        )
        env[PARENT_PID_ENV] = str(os.getpid())  # the daemon stops when the bench dies, even of SIGKILL
        sub = Subscriber(self.publish, topic="inspect.bench.", context=zmq.Context.instance(), rcvhwm=100000)
        pusher = None
        proc: subprocess.Popen | None = None
        try:
            # Started inside the `try` whose `finally` stops it: Ctrl-C or SIGTERM a moment later must not leave it.
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir)
                )
            self._wait_ready(proc, sub, log_path)
            if self.ingest:
                pusher = Pusher(
                    self.ingest,
                    self.frames,
                    "raw" if self.source == "zmq-raw" else "jpeg",
                    None if self.saturate else self.rate_hz,
                )
                pusher.start()
            row = self._measure(proc, sub, duration_s, pusher)
        finally:
            # Claimed over the whole clean-up, before the daemon is told to stop, so that a stop asked for while the
            # pusher ends or while the daemon drains always finds it claimed.
            with killed_on_a_stop(proc) if proc is not None else contextlib.nullcontext():
                if pusher is not None:
                    pusher.stop.set()
                    pusher.join(2.0)
                sub.socket.close(0)
                stopped = self._stop(proc) if proc is not None else None
        if stopped is not None:
            raise RuntimeError(stopped)
        return row

    def _wait_ready(self, proc: subprocess.Popen, sub: Subscriber, log_path: Path) -> None:
        """A status message means the PUB socket is bound, ingest started and the SUB has joined."""
        give_up = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < give_up:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode} before it was ready: {_tail(log_path)}")
            try:
                msg = sub.recv(0.2)
            except MessageError:
                continue
            if isinstance(msg, dict):
                return
        raise RuntimeError(f"daemon sent no status within {START_TIMEOUT_S:.0f}s: {_tail(log_path)}")

    def _exited(self, proc: subprocess.Popen, when: str) -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} {when}: {_tail(self.log_path)}")

    def _measure(self, proc: subprocess.Popen, sub: Subscriber, duration_s: float, pusher: Pusher | None) -> dict:
        """Discard the warm-up, then count what arrives in the window. Throughput, latency and CPU per frame count
        judged frames (ok or defect) only: an error verdict is published quickly and did no inspection."""
        gaps = GapTracker()
        t_warm_end = time.monotonic() + WARMUP_S
        while time.monotonic() < t_warm_end:
            msg = sub.recv(0.05)
            if msg is not None and not isinstance(msg, dict):
                gaps.see(msg.camera, msg.seq)  # seeds each camera's last seq; warm-up losses are not the window's
        self._exited(proc, "during the warm-up")
        gaps_before = sum(gaps.missed.values())
        before = control_status(self.control)
        cpu = CpuClock(proc.pid).start()
        own_cpu = CpuClock().start()
        sent0 = pusher.sent if pusher else 0
        t0 = time.monotonic()
        end = t0 + duration_s
        latencies, arrivals, delivered, errors, defects = [], [], 0, 0, 0
        last_status, first_status = None, None
        while True:
            now = time.monotonic()
            if now >= end:
                break
            # A daemon that died sends nothing more: look at it whenever the socket goes quiet.
            msg = sub.recv(min(end - now, 0.25))
            t_recv = time.time()
            if msg is None:
                if proc.poll() is not None:
                    break
                continue
            if isinstance(msg, dict):
                first_status = first_status or msg
                last_status = msg
                continue
            delivered += 1
            gaps.see(msg.camera, msg.seq)
            if msg.verdict == "error":
                errors += 1
                continue
            arrivals.append(time.monotonic())
            defects += msg.verdict == "defect"
            if self.source != "folder":
                latencies.append(t_recv - msg.t_capture)
        wall = time.monotonic() - t0
        pushed_count = pusher.sent - sent0 if pusher else None  # at the window's end, not after the control round trip
        self._exited(proc, "during the measured window")
        daemon_cpu = cpu.elapsed()
        bench_cpu = own_cpu.elapsed()
        after = control_status(self.control)
        judged = delivered - errors
        backlog_left = None
        if self.source == "folder":
            # Files stay in a folder camera's folder (no delete_after): what is left is what was prepared less what
            # the daemon took in.
            prepared = sum(len(list(self.workdir.glob(f"cam{k}/*.jpg"))) for k in range(self.cameras))
            cams = (after or {}).get("cameras") or {}
            taken = sum(cam.get("frames_in", 0) for cam in cams.values())
            backlog_left = prepared - taken if after else None
        pushed = pushed_count / wall if pushed_count is not None else None
        fps = arrival_rate(arrivals, self.max_batch) or judged / wall
        frames_in_window = fps * wall  # continuous, like the CPU seconds it divides
        batches = published = None
        if before and after:
            batches = after["batches"] - before["batches"]
            published = after["published"] - before["published"]
        # The control replies are read at the window's edges; the status messages only every status interval inside
        # it, which left up to an interval's drops uncounted at each end (all of them in a window of one interval).
        dropped = None
        edges = [queue_drops(before), queue_drops(after)]
        if edges[0] is None or edges[1] is None:
            edges = [queue_drops(first_status), queue_drops(last_status)]
        if edges[0] is not None and edges[1] is not None:
            dropped = edges[1] - edges[0]
        # What reached the daemon at a fixed rate: the pusher's count, or for a source inside the daemon what it
        # produced (published or dropped from a queue). The offered rate is only what was asked for.
        sent = pushed
        if pusher is None and not self.saturate and dropped is not None:
            sent = (delivered + dropped) / wall
        return {
            "source": self.source,
            "cameras": self.cameras,
            "load": "saturation" if self.saturate else "fixed",
            "offered_fps": None if self.saturate else self.rate_hz,
            "pushed_fps": pushed,
            "sent_fps": sent,
            "delivered_fps": fps,
            "delivered": delivered,
            "judged": judged,
            "seconds": wall,
            "latency_ms": latency_ms(latencies),
            "dropped_in_queue": dropped,
            "seq_gaps": sum(gaps.missed.values()) - gaps_before,
            "errors": errors,
            "defects": defects,
            # The two counters are read a moment apart: clamp the skew.
            "mean_batch": min(published / batches, self.max_batch) if batches else None,
            "daemon_cpu_ms_per_frame": daemon_cpu / frames_in_window * 1000.0 if judged else None,
            "daemon_cpu_cores": daemon_cpu / wall,
            "bench_cpu_cores": bench_cpu / wall,
            "daemon_peak_rss_mb": proc_peak_rss_bytes(proc.pid) / MB,
            # Seconds at the window's end with no judged result: a saturated daemon that idles there ran dry.
            "quiet_end_s": wall - (arrivals[-1] - t0) if arrivals else wall,
            "backlog_left": backlog_left,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_ms,
        }

    def _stop(self, proc: subprocess.Popen) -> str | None:
        """SIGTERM and wait; why the run cannot count (None when the daemon stopped cleanly, exit code 0). `run` claims
        the stops around it (killed_on_a_stop)."""
        if proc.poll() is not None:
            return f"daemon exited with {proc.returncode} on its own, before SIGTERM: {_tail(self.log_path)}"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return f"daemon did not stop within {STOP_TIMEOUT_S:.0f}s of SIGTERM (killed): {_tail(self.log_path)}"
        if proc.returncode != 0:
            return f"daemon exited with {proc.returncode} after SIGTERM: {_tail(self.log_path)}"
        return None


def _tail(path: Path, lines: int = 50) -> str:
    """The log line that says why the daemon ended: the last error-level JSON line or plain-text line (a traceback's
    last line, a one-line refusal) among its last `lines`, else its last line. The last lines as they stand were
    often a routine warning that the table's cut then showed as the reason."""
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    if not tail:
        return "(empty log)"
    for line in reversed(tail):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if line.strip():
                return line.strip()
            continue
        if str(record.get("level", "")).lower() in ("error", "critical"):
            return line
    return tail[-1]


def load_label(load: str) -> str:
    """How a row names its load, measured or failed: 'saturation', '50% of saturation', or the profiled run's."""
    if load == "sat":
        return "saturation"
    if load == PROFILED_LOAD:
        return load
    return f"{float(load):.0%} of saturation"


def row_failure(row: dict) -> str | None:
    """Why a measured row cannot count towards any goal: it judged no frame, or too many of its results were error
    verdicts (a failing engine or undecodable frames publish errors fast)."""
    # Both: results come in bursts, one per batch, so a quiet end alone is also a long batch's; files left alone are
    # also a daemon that starved for another reason.
    ran_dry = row.get("backlog_left") is None or row["backlog_left"] <= 0  # not known (no status): the quiet end alone
    if row["judged"] == 0:
        if row["source"] == "folder" and not row["delivered"] and row.get("backlog_left") == 0:
            # A daemon faster than the backlog was sized for took all of it during the warm-up.
            return (
                f"the folder backlog ran out before the {row['seconds']:.1f}s window: no file was left to judge, "
                "so the run measured nothing"
            )
        what = f"{row['delivered']} results, all error verdicts" if row["delivered"] else "no result at all"
        return f"no frame judged in the {row['seconds']:.1f}s window ({what})"
    quiet = row.get("quiet_end_s")
    if (
        row["source"] == "folder"
        and ran_dry
        and quiet is not None
        and quiet > max(FOLDER_DRY_S, FOLDER_DRY_SHARE * row["seconds"])
    ):
        return (
            f"the folder backlog ran out: no result in the last {quiet:.1f}s of the {row['seconds']:.1f}s window, "
            "so its frames/s and CPU per frame would count frames that never came"
        )
    if row["errors"] > ERROR_SHARE_MAX * row["delivered"]:
        return (
            f"{row['errors']} of {row['delivered']} results were error verdicts "
            f"(more than {ERROR_SHARE_MAX:.0%}): the daemon failed frames rather than judged them"
        )
    return None


def engine_cpu_at(engine_rows: list[dict], batch: float) -> float | None:
    """Engine CPU ms per frame at a (mean) batch size, interpolated between the measured batch sizes."""
    if not engine_rows or batch is None:
        return None
    rows = sorted(engine_rows, key=lambda r: r["batch"])
    xs = [r["batch"] for r in rows]
    ys = [r["cpu_ms_per_frame"] for r in rows]
    return float(np.interp(batch, xs, ys))


def bench_daemon(
    bundle: str | Path,
    frames: FrameSet,
    sources: list[str],
    cameras: list[int],
    duration_s: float,
    loads: list[str],
    engine_rows: list[dict] | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    backend: str = "onnxruntime",
    options: dict | None = None,
    profile: Path | None = None,
    log=print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every (source, cameras) at saturation, then at each fractional load of the saturated rate just measured;
    with `profile`, one more saturated run under cProfile (PROFILED_LOAD) after the plain one of the profiled pair.
    `progress` counts the scenarios."""
    bundle = Path(bundle).resolve()
    rows = []
    engine_best = max((r["fps"]["median"] for r in engine_rows or []), default=0.0)
    folder_fps = max(FOLDER_FPS_CEILING, FOLDER_ENGINE_MARGIN * engine_best)

    def planned(source: str, load: str) -> bool:
        """A fixed rate is a fraction of a measured saturation; folders have none."""
        return load == "sat" or (source != "folder" and "sat" in loads)

    # The profile shows the hot path best where the daemon does the least besides inference: raw frames over ZeroMQ.
    profiled = ("zmq-raw" if "zmq-raw" in sources else sources[0], cameras[0])

    def plan(source: str, n_cameras: int) -> list[str]:
        chosen = [load for load in loads if planned(source, load)]
        if profile is not None and (source, n_cameras) == profiled:
            chosen.insert(chosen.index("sat") + 1 if "sat" in chosen else len(chosen), PROFILED_LOAD)
        return chosen

    progress = progress or Progress(enabled=False)
    progress.start(sum(len(plan(s, n)) for s in sources for n in cameras), "bench daemon: scenarios")
    done = 0
    with tempfile.TemporaryDirectory(prefix="inspectd-bench-daemon-") as tmp:
        k = 0
        for source in sources:
            for n_cameras in cameras:
                saturated: float | None = None
                for load in plan(source, n_cameras):
                    done += 1
                    saturate = load in ("sat", PROFILED_LOAD)
                    prof = profile if load == PROFILED_LOAD else None
                    label = load_label(load)
                    failed = {"source": source, "cameras": n_cameras, "load": label, "profiled": prof is not None}
                    rate: float | None = None
                    if not saturate:
                        if saturated is None:  # a fixed rate is a fraction of a saturation, and that one failed
                            why = f"not run: the saturation run of {source} x{n_cameras} failed"
                            log(f"bench daemon: {source} x{n_cameras} {label}: FAILED: {why}")
                            rows.append({**failed, "error": why})
                            progress.update(done)
                            continue
                        rate = float(load) * saturated
                    workdir = Path(tmp) / f"s{k}"
                    workdir.mkdir()
                    k += 1
                    try:
                        row = Scenario(
                            bundle,
                            source,
                            n_cameras,
                            frames,
                            workdir,
                            saturate=saturate,
                            rate_hz=rate,
                            max_batch=max_batch,
                            max_wait_ms=max_wait_ms,
                            backend=backend,
                            options=options,
                            profile=prof,
                            duration_s=duration_s,
                            folder_fps=folder_fps,
                        ).run(duration_s)
                    except Exception as exc:  # one scenario failing must not lose the others' figures
                        # The bench's own errors say what failed; anything else (a bug) by its type too.
                        why = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
                        log(f"bench daemon: {source} x{n_cameras} {label}: FAILED: {why}")
                        rows.append({**failed, "error": why})
                        progress.update(done)
                        continue
                    row["load"] = label
                    row["profiled"] = prof is not None
                    why_not = row_failure(row)
                    if why_not is not None:
                        # Its figures stay in the JSON; the error keeps them out of the goals and the exit code 0.
                        log(f"bench daemon: {source} x{n_cameras} {row['load']}: FAILED: {why_not}")
                        rows.append({**row, "error": why_not})
                        progress.update(done)
                        continue
                    if load == "sat":
                        saturated = row["delivered_fps"]
                    engine_cpu = engine_cpu_at(engine_rows or [], row["mean_batch"] or max_batch)
                    row["engine_cpu_ms_per_frame"] = engine_cpu
                    if engine_cpu is not None and row["daemon_cpu_ms_per_frame"] is not None:
                        row["outside_engine_cpu_ms_per_frame"] = row["daemon_cpu_ms_per_frame"] - engine_cpu
                    else:
                        row["outside_engine_cpu_ms_per_frame"] = None
                    log(
                        f"bench daemon: {source} x{n_cameras} {row['load']}: {row['delivered_fps']:.1f} frames/s, "
                        f"{p99_text(row['latency_ms'])}"
                    )
                    rows.append(row)
                    progress.update(done)
    progress.finish()
    return {"kind": "daemon", "bundle": str(bundle), "duration_s": duration_s, "rows": rows}


def rows_for_table(report: dict) -> tuple[list[str], list[list]]:
    headers = [
        "source",
        "cameras",
        "load",
        "offered/s",
        "sent/s",
        "delivered/s",
        "latency p50 ms",
        "p99 ms",
        "max ms",
        "latency n",
        "dropped",
        "seq gaps",
        "errors",
        "defect %",
        "mean batch",
        "daemon CPU ms/frame",
        "outside engine ms/frame",
        "cores",
        "daemon peak RSS MB",
    ]
    rows = []
    for r in report["rows"]:
        if "error" in r:
            rows.append([r["source"], r["cameras"], r["load"], "FAILED: " + r["error"][:80]] + [None] * 15)
            continue
        lat = r["latency_ms"]
        has_lat = lat["n"] > 0
        rows.append(
            [
                r["source"],
                r["cameras"],
                r["load"],
                r["offered_fps"],
                r["sent_fps"],
                r["delivered_fps"],
                lat["p50"] if has_lat else None,
                p99_or_none(lat),
                lat["max"] if has_lat else None,
                lat["n"],
                r["dropped_in_queue"],
                r["seq_gaps"],
                r["errors"],
                100.0 * r["defects"] / r["judged"] if r["judged"] else None,
                r["mean_batch"],
                r["daemon_cpu_ms_per_frame"],
                r["outside_engine_cpu_ms_per_frame"],
                r["daemon_cpu_cores"],
                r.get("daemon_peak_rss_mb"),
            ]
        )
    return headers, rows
