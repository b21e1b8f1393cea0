"""`inspectd bench engine`: what the engine alone can do, the ceiling every other figure is compared with.

For each input size and batch size: warm up, then several timed windows of back-to-back `engine.infer` calls on one
preallocated batch of synthetic-line frames (fitted by an engines.runtime Predictor; only the engine is timed).
Reports frames/s (median and range of the windows), per-call latency, CPU seconds per frame (all threads of this
process, so ONNX Runtime's intra-op threads count) and resident memory.

A bundle's graph is exported at one input size. A size other than the bundle's gets a bundle of its own, trained by the
frozen method (seconds) into a temporary directory on a few of the original bundle's training images. That training
runs in a child process: torch and timm would otherwise stay in this one and in every memory figure it reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.bundle.store import Bundle, load_bundle
from engines.progress import Progress
from engines.runtime import open_engine
from engines.runtime.predictor import Predictor
from inspectd.tools.bench.measure import MB, CpuClock, latency_ms, p99_or_none, peak_rss_bytes, rss_bytes, spread

WARMUP_S = 0.5
SIZED_TRAIN_IMAGES = 24


def batch_of_frames(predictor: Predictor, n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, H, W, C] of synthetic-line frames (some defective) fitted into `predictor`'s batch buffer (a view)."""
    from engines.data.synthline import SyntheticLine

    h, w, c = predictor.input_shape
    line = SyntheticLine(width=w, height=h, channels=1 if c == 1 else 3, defect_rate=0.2, seed=seed)
    predictor.clear()
    for _ in range(n):
        predictor.add(line.next()[0])
    return predictor.batch


def bench_batch(engine, pixels: np.ndarray, windows: int, window_s: float, warmup_s: float = WARMUP_S) -> dict:
    """Timed windows of back-to-back infer calls on `pixels`; at least one call per window."""
    deadline = time.perf_counter() + warmup_s
    engine.infer(pixels)
    while time.perf_counter() < deadline:
        engine.infer(pixels)
    n = pixels.shape[0]
    # After warm-up ONNX Runtime's arena has grown to this batch size; growth beyond it would be a leak.
    rss_start = rss_bytes()
    fps, calls = [], []
    cpu = CpuClock().start()
    started = time.perf_counter()
    for _ in range(windows):
        t_window = time.perf_counter()
        end = t_window + window_s
        frames = 0
        while True:
            t0 = time.perf_counter()
            engine.infer(pixels)
            t1 = time.perf_counter()
            calls.append(t1 - t0)
            frames += n
            if t1 >= end:
                break
        fps.append(frames / (t1 - t_window))
    wall = time.perf_counter() - started
    total_frames = len(calls) * n
    return {
        "batch": n,
        "fps": spread(fps),
        "latency_ms": latency_ms(calls),
        "cpu_ms_per_frame": cpu.elapsed() / total_frames * 1000.0,
        "cpu_cores_used": cpu.elapsed() / wall,
        "frames": total_frames,
        "windows": [round(v, 2) for v in fps],
        "rss_growth_mb": (rss_bytes() - rss_start) / MB,
    }


def bench_bundle(
    bundle: Bundle,
    backend: str,
    options: dict | None,
    batches: list[int],
    windows: int,
    window_s: float,
    warmup_s: float = WARMUP_S,
    on_batch=None,
) -> dict:
    """Every batch size in turn on one engine; `on_batch()` after each."""
    rss_open = rss_bytes()
    engine = open_engine(bundle, backend, options or {}, max_batch=max(batches))
    try:
        frames = batch_of_frames(Predictor(engine), max(batches))
        engine.infer(frames[:1])
        rss_start = rss_bytes()
        rows = []
        for b in batches:
            rows.append(bench_batch(engine, frames[:b], windows, window_s, warmup_s))
            if on_batch is not None:
                on_batch()
        rss_end = rss_bytes()
    finally:
        engine.close()
    return {
        "bundle": str(bundle.path),
        "model_id": bundle.model_id,
        "method": bundle.method,
        "backbone": bundle.backbone,
        "input": list(bundle.input_shape),
        "backend": backend,
        "rows": rows,
        "rss_engine_mb": (rss_start - rss_open) / MB,  # what opening the engine and one inference added
        "rss_batches_mb": (rss_end - rss_start) / MB,  # what the larger batches' buffers added after that
        "rss_end_mb": rss_end / MB,
    }


def bundle_at_size(
    bundle: Bundle,
    size: tuple[int, int],
    workdir: Path,
    train_data: str | Path | None = None,
    n_images: int = SIZED_TRAIN_IMAGES,
) -> Bundle:
    """A frozen-method bundle like `bundle` (backbone, resize policy) exported at `size`, trained into `workdir` by a
    child process."""
    from engines.data.images import good_folder, list_images

    name = f"--size {size[0]}x{size[1]}"
    if importlib.util.find_spec("torch") is None:
        raise ValueError(
            f"{name}: training a bundle at another size than the bundle's needs the Python package 'torch', which is "
            "not installed (pip install 'inspectd[train]')"
        )
    wanted = "a folder of defect-free images"
    data = train_data or bundle.manifest.get("training", {}).get("data")
    if train_data and not Path(train_data).exists():
        raise ValueError(f"{name}: --train-data {train_data}: not here, expected {wanted}")
    if not data:
        raise ValueError(f"{name}: the bundle names no training data; give --train-data DIR ({wanted})")
    if not Path(data).exists():
        raise ValueError(f"{name}: the bundle's training data {data} is not here; give --train-data DIR ({wanted})")
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    # A few images suffice: the figures measure the graph's cost at this size, not its accuracy.
    for path in list_images(good_folder(data, ("train",)))[:n_images]:
        link = images / path.name
        if not link.exists():
            os.symlink(path.resolve(), link)
    if not any(images.iterdir()):
        raise ValueError(f"{name}: no images in {data}, expected defect-free images to train a bundle at this size")
    job = {
        "images": str(images),
        "out": str(workdir / "bundle"),
        "backbone": bundle.backbone,
        "size": list(size),
        "resize": bundle.resize_policy,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_CHILD, json.dumps(job)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ValueError(f"{name}: training a bundle at this size failed: {lines[-1] if lines else proc.returncode}")
    return load_bundle(workdir / "bundle")


# The child that trains a bundle at another size: one line on stderr for a refusal, as the parent shows it.
_TRAIN_CHILD = """
import json, sys
job = json.loads(sys.argv[1])
from engines.errors import EngineError
from engines.progress import Progress
from engines.training.train import train_bundle
try:
    train_bundle(job["images"], job["out"], method="frozen", backbone=job["backbone"], size=tuple(job["size"]),
                 resize=job["resize"], progress=Progress(enabled=False))
except (EngineError, ValueError, OSError) as exc:
    sys.exit(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
"""


def bench_engine(
    bundle_path: str | Path,
    backend: str = "onnxruntime",
    options: dict | None = None,
    batches: Sequence[int] = (1, 4, 8, 16),
    sizes: list[tuple[int, int]] | None = None,
    windows: int = 5,
    window_s: float = 2.0,
    train_data: str | Path | None = None,
    warmup_s: float = WARMUP_S,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Engine-only figures for the bundle (and for a trained-on-the-spot bundle at each other size); `progress`
    counts the (size, batch) pairs measured."""
    bundle = load_bundle(bundle_path)
    own = (bundle.input_shape[0], bundle.input_shape[1])
    results = []
    plan = sizes or [own]
    progress = progress or Progress(enabled=False)
    progress.start(len(plan) * len(batches), "bench engine: batch sizes measured")
    done = 0

    def measured() -> None:
        nonlocal done
        done += 1
        progress.update(done)

    with tempfile.TemporaryDirectory(prefix="inspectd-bench-") as tmp:
        for size in plan:
            sized = bundle
            if tuple(size) != own:
                sized = bundle_at_size(bundle, (size[0], size[1]), Path(tmp) / f"{size[0]}x{size[1]}", train_data)
            result = bench_bundle(sized, backend, options, list(batches), windows, window_s, warmup_s, measured)
            result["trained_for_bench"] = sized is not bundle
            results.append(result)
    progress.finish()
    best = max(
        (row for r in results if not r["trained_for_bench"] for row in r["rows"]),
        key=lambda row: row["fps"]["median"],
        default=None,
    )
    return {
        "kind": "engine",
        "sizes": results,
        "best": best,
        "peak_rss_mb": peak_rss_bytes() / MB,
        "windows": windows,
        "window_s": window_s,
    }


def rows_for_table(report: dict) -> tuple[list[str], list[list]]:
    headers = [
        "input HxWxC",
        "batch",
        "frames/s median",
        "min..max",
        "latency p50 ms",
        "p99 ms",
        "latency n",
        "CPU ms/frame",
        "cores",
        "RSS growth in windows MB",
    ]
    rows = []
    for r in report["sizes"]:
        shape = "x".join(map(str, r["input"])) + (" (trained for bench)" if r["trained_for_bench"] else "")
        for row in r["rows"]:
            rows.append(
                [
                    shape,
                    row["batch"],
                    row["fps"]["median"],
                    f"{row['fps']['min']:.1f}..{row['fps']['max']:.1f}",
                    row["latency_ms"]["p50"],
                    p99_or_none(row["latency_ms"]),
                    row["latency_ms"]["n"],
                    row["cpu_ms_per_frame"],
                    row["cpu_cores_used"],
                    row["rss_growth_mb"],
                ]
            )
    return headers, rows
