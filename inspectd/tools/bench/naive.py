"""`inspectd bench naive`: the loop a user would write without inspectd, on the same frames and model.

One thread, one frame at a time: cv2.imread the JPEG, resize it to the model input with OpenCV, run the bundle's ONNX
graph through a plain `InferenceSession.run` at batch 1 (scorer parameters fed every call, as the graph asks), apply the
thresholds, bring the mask back to the frame's size, find its regions, PNG-encode it for a defect, and publish one
JSON message with pyzmq. A SUB socket in a second thread receives everything, as a line controller would.

It is deliberately the obvious code, not a straw man: the graph normalises inside, so the loop feeds it the resized
uint8 frame rather than converting to float NCHW in numpy first; that spares the naive loop work, so the
daemon / naive ratio it yields is conservative.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from engines.bundle.store import load_bundle
from engines.data.images import list_images
from engines.runtime.onnxruntime_backend import ort  # imported as the backend sets it up (telemetry off)
from inspectd.tools.bench.measure import MB, CpuClock, latency_ms, p99_or_none, rss_bytes

SUB_READY_TIMEOUT_S = 5.0


def write_synthetic_jpegs(
    folder: str | Path, n: int, width: int = 256, height: int = 256, channels: int = 1, seed: int = 0
) -> list[Path]:
    """`n` synthetic-line frames as JPEG files (quality 90), the frame set the naive loop and the daemon share."""
    from engines.data.synthline import SyntheticLine

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    line = SyntheticLine(width=width, height=height, channels=channels, defect_rate=0.2, seed=seed)
    paths = []
    for i in range(n):
        image = line.next()[0]
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        path = folder / f"{i:06d}.jpg"
        if not cv2.imwrite(str(path), image, (cv2.IMWRITE_JPEG_QUALITY, 90)):
            raise OSError(f"{path}: cannot write JPEG")
        paths.append(path)
    return paths


class _Receiver(threading.Thread):
    """Counts what arrives on a SUB socket, so the published messages demonstrably reach a subscriber."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        super().__init__(name="naive-sub", daemon=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.received = 0
        self.probes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stop.is_set():
            if poller.poll(50):
                topic = self.sock.recv_multipart()[0]
                if topic == b"probe":
                    self.probes += 1
                else:
                    self.received += 1
        self.sock.close()


def naive_loop(bundle_path: str | Path, paths: list[Path], duration_s: float = 0.0) -> dict[str, Any]:
    """Run the naive loop over `paths` (again and again until `duration_s` has passed; at least once)."""
    if not paths:
        raise ValueError("bench naive: no frames, expected --frames DIR with images or --synthetic N > 0")
    for path in paths:  # a link whose target is gone: named as such, before the loop reads it as undecodable
        try:
            path.stat()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read ({exc.strerror or exc}), expected a JPEG/PNG image") from None
    bundle = load_bundle(bundle_path)
    h, w, c = bundle.input_shape
    thresholds = bundle.thresholds()
    image_thr, pixel_thr = thresholds.image_threshold, thresholds.pixel_threshold
    session = ort.InferenceSession(str(bundle.graph_path), providers=["CPUExecutionProvider"])
    params = bundle.scorer_params()
    read_flag = cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 1000
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    receiver = _Receiver(ctx, f"tcp://127.0.0.1:{port}")
    receiver.start()
    give_up = time.monotonic() + SUB_READY_TIMEOUT_S
    while receiver.probes == 0 and time.monotonic() < give_up:  # PUB drops until the SUB has joined
        pub.send_multipart([b"probe", b""])
        time.sleep(0.01)

    defects = 0

    def one(path: Path, seq: int) -> float:
        nonlocal defects
        t0 = time.perf_counter()
        t_capture = time.time()
        image = cv2.imread(str(path), read_flag)
        if image is None:
            raise ValueError(f"{path}: cannot decode, expected a JPEG/PNG image")
        if c == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        # INTER_AREA, the usual choice for shrinking camera frames and the daemon's too when it shrinks: both see
        # nearly the same pixels, so they flag about the same share of frames and publish about as many masks.
        x = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).reshape(1, h, w, c)
        score, amap = session.run(None, {"pixels": x, **params})
        score = float(score[0])
        verdict = "defect" if score >= image_thr else "ok"
        regions, frames = [], []
        if verdict == "defect":
            defects += seq >= 0
            fh, fw = image.shape[:2]
            frame_map = cv2.resize(amap[0], (fw, fh), interpolation=cv2.INTER_LINEAR)
            mask = (frame_map >= pixel_thr).astype(np.uint8)
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            regions = [dict(zip(("x", "y", "w", "h", "area"), map(int, s))) for s in stats[1:]]
            frames.append(cv2.imencode(".png", mask * 255)[1].tobytes())
        message = {
            "frame_id": path.name,
            "seq": seq,
            "t_capture": t_capture,
            "t_publish": time.time(),
            "verdict": verdict,
            "score": score,
            "threshold": image_thr,
            "regions": regions,
        }
        pub.send_multipart([b"naive.result", json.dumps(message).encode(), *frames])
        return time.perf_counter() - t0

    try:
        one(paths[0], -1)  # warm-up: ONNX Runtime allocates its arena on the first run
        latencies = []
        cpu = CpuClock().start()
        rss_start = rss_bytes()
        started = time.perf_counter()
        seq = 0
        while True:
            for path in paths:
                latencies.append(one(path, seq))
                seq += 1
            if time.perf_counter() - started >= duration_s:
                break
        wall = time.perf_counter() - started
        cpu_s = cpu.elapsed()
        rss_end = rss_bytes()
        give_up = time.monotonic() + 2.0
        while receiver.received < seq + 1 and time.monotonic() < give_up:
            time.sleep(0.01)
    finally:
        receiver.stop.set()
        receiver.join(2.0)
        pub.close()
        ctx.term()
    return {
        "kind": "naive",
        "bundle": str(bundle.path),
        "model_id": bundle.model_id,
        "input": [h, w, c],
        "frames": seq,
        "distinct_frames": len(paths),
        "seconds": wall,
        "fps": seq / wall,
        "latency_ms": latency_ms(latencies),
        "cpu_ms_per_frame": cpu_s / seq * 1000.0,
        "cpu_cores_used": cpu_s / wall,
        "defects": defects,
        "received": max(0, receiver.received - 1),  # less the warm-up frame's message
        "rss_growth_mb": (rss_end - rss_start) / MB,
    }


def frames_from(
    frames_dir: str | Path | None,
    synthetic: int | None,
    workdir: Path,
    size: tuple[int, int] = (256, 256),
    channels: int = 1,
) -> list[Path]:
    """The frame files of `--frames DIR` or `--synthetic N` (written as JPEGs into `workdir`)."""
    if frames_dir is not None:
        paths = list_images(frames_dir)
        if not paths:
            raise ValueError(f"--frames {frames_dir}: no images, expected JPEG/PNG files")
        return paths
    if synthetic is None or synthetic < 1:
        raise ValueError(f"--synthetic {synthetic}: expected a number of frames >= 1")
    return write_synthetic_jpegs(workdir / "frames", synthetic, width=size[1], height=size[0], channels=channels)


def rows_for_table(report: dict) -> tuple[list[str], list[list]]:
    headers = [
        "loop",
        "frames",
        "frames/s",
        "latency p50 ms",
        "p99 ms",
        "latency n",
        "CPU ms/frame",
        "cores",
        "defect %",
        "received",
    ]
    lat = report["latency_ms"]
    return headers, [
        [
            "naive (1 thread, batch 1)",
            report["frames"],
            report["fps"],
            lat["p50"],
            p99_or_none(lat),
            lat["n"],
            report["cpu_ms_per_frame"],
            report["cpu_cores_used"],
            100.0 * report["defects"] / report["frames"],
            report["received"],
        ]
    ]
