"""`inspectd train` and `train_bundle`: defect-free images in, a complete model bundle out.

The same steps for every method (engines.model.methods): load and fit the images to the input size, hold some out, let
the method train its head, compute features once, fit the scorer (k-means references or a Gaussian), score the held-out
images for the first thresholds, export the ONNX graph, write the bundle. Ctrl-C during training or feature
extraction still writes a usable bundle from what exists so far, marked `"interrupted": true`, and exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import inspectd_version
from engines.bundle.store import load_bundle, write_bundle
from engines.data.images import MvtecFolder, list_images, load_image
from engines.errors import DataError, EngineError
from engines.model.backbones import BACKBONES, spec_for
from engines.model.export import DEFAULT_OPSET, export_graph
from engines.model.graph import DEFAULT_MEMORY_SIZE, SCORERS, InferenceGraph, architecture_of, build_graph, state_arrays
from engines.model.methods import METHODS, TrainSettings, available_methods, get_method
from engines.runtime.preprocess import RESIZE_POLICIES, fit_frame

INTERRUPTED_EXIT = 130
# First thresholds from held-out good images (say so in provenance; `inspectd calibrate` refines them later).
IMAGE_RULE = "max held-out image score + 10% of the held-out score range"
PIXEL_QUANTILE = 0.999
PIXEL_RULE = f"{PIXEL_QUANTILE:.1%} quantile of held-out anomaly-map values"
DEFAULT_K = 2  # k = 1/2/4/8 gave image AUROC 0.678/0.711/0.709/0.691 (frozen Lite0, magnetic_tile, 256)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    bundle: Path
    model_id: str
    interrupted: bool
    n_fit: int
    n_holdout: int
    image_threshold: float
    pixel_threshold: float
    seconds: float


class Progress:
    """One updating status line on stderr: what, step/total, loss, ETA. Off a terminal it prints plain lines, at
    most one a second, so logs stay readable."""

    def __init__(self, stream=None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.what, self.total, self.started, self.last = "", 0, 0.0, -1.0

    def start(self, total: int, what: str = "train") -> None:
        self.finish()
        self.what, self.total, self.started, self.last = what, int(total), time.monotonic(), -1.0

    def update(self, step: int, loss: float | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = step >= self.total
        if not final and self.last >= 0 and now - self.last < (0.1 if self.tty else 1.0):
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / step * (self.total - step) if step else float("nan")
        line = f"{self.what} {step}/{self.total}"
        if loss is not None:
            line += f" loss {loss:.4f}"
        line += f" elapsed {elapsed:.0f}s ETA {eta:.0f}s" if step else ""
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty and self.last >= 0:
            self.stream.write("\n")
            self.stream.flush()
        self.last = -1.0


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '256x320' -> (height 256, width 320)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not match:
        raise ValueError(f"--size {text!r}: expected N or HxW, e.g. 256 or 256x320")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if not (32 <= height <= 4096 and 32 <= width <= 4096):
        raise ValueError(f"--size {text!r}: expected each side between 32 and 4096 pixels")
    return height, width


def training_images(data: str | Path) -> list[Path]:
    """train/good of an MVTec-layout root, else the images of a plain folder."""
    data = Path(data)
    paths = MvtecFolder(data).train_good() if (data / "train" / "good").is_dir() else list_images(data)
    if not paths:
        raise DataError(f"{data}: no images, expected train/good/*.png|jpg or a folder of images")
    return paths


def load_fitted(paths: list[Path], size: tuple[int, int], resize: str) -> np.ndarray:
    """uint8 [N, H, W, C] of all images fitted to the input size; C is 3 if any image has colour, else 1."""
    images = [load_image(p) for p in paths]
    channels = 3 if any(im.ndim == 3 for im in images) else 1
    batch = np.empty((len(images), size[0], size[1], channels), dtype=np.uint8)
    for i, image in enumerate(images):
        fit_frame(image, (size[0], size[1], channels), resize, out=batch[i])
    return batch


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices); at least one of each when there are two images or more."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--holdout {fraction}: expected a fraction in [0, 1)")
    n_hold = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def extract_features(
    graph: InferenceGraph, images: np.ndarray, batch: int, progress: Progress
) -> tuple[torch.Tensor, bool]:
    """Features of every image, batched. On Ctrl-C returns what exists (at least the first batch) and True."""
    chunks, interrupted = [], False
    progress.start(len(images), "features")
    graph.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            try:
                chunks.append(graph.embed(torch.from_numpy(images[start : start + batch])))
                progress.update(min(start + batch, len(images)))
            except KeyboardInterrupt:
                interrupted = True
                if not chunks:  # nothing to fit a scorer on yet: finish this one batch first
                    chunks.append(graph.embed(torch.from_numpy(images[start : start + batch])))
                break
    progress.finish()
    return torch.cat(chunks), interrupted


def score_with_graph(
    graph: InferenceGraph, images: np.ndarray, params: dict[str, np.ndarray], batch: int
) -> tuple[np.ndarray, np.ndarray]:
    tensors = [torch.from_numpy(params[name]) for name in graph.scorer_inputs]
    scores, maps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            score, anomaly_map = graph(torch.from_numpy(images[start : start + batch]), *tensors)
            scores.append(score.numpy())
            maps.append(anomaly_map.numpy())
    return np.concatenate(scores), np.concatenate(maps)


def first_thresholds(scores: np.ndarray, maps: np.ndarray, provenance: dict) -> thresholds_doc.Thresholds:
    top, bottom = float(scores.max()), float(scores.min())
    image_threshold = top + 0.1 * (top - bottom) + 1e-6 * max(1.0, abs(top))
    pixel_threshold = float(np.quantile(maps, PIXEL_QUANTILE))
    return thresholds_doc.first_version(
        image_threshold, pixel_threshold, {**provenance, "rule": {"image": IMAGE_RULE, "pixel": PIXEL_RULE}}
    )


def train_bundle(
    data: str | Path,
    out: str | Path,
    method: str = "frozen",
    backbone: str | None = None,
    size: tuple[int, int] = (256, 256),
    resize: str = "stretch",
    scorer: str | None = None,
    k: int = DEFAULT_K,
    epochs: int | None = None,
    batch: int | None = None,
    seed: int = 0,
    weights: str | Path | None = None,
    holdout: float = 0.1,
    opset: int = DEFAULT_OPSET,
    progress: Progress | None = None,
    method_args: argparse.Namespace | None = None,
    memory_size: int = DEFAULT_MEMORY_SIZE,
) -> TrainResult:
    """Train and write a complete bundle at `out`. Python API of `inspectd train` (the demo calls it)."""
    started = time.monotonic()
    progress = progress or Progress()
    seed_everything(seed)
    trainer = get_method(method)
    backbone = backbone or trainer.default_backbone
    scorer = scorer or trainer.default_scorer
    epochs = trainer.default_epochs if epochs is None else epochs
    batch = trainer.default_batch if batch is None else batch
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"--resize {resize!r}: expected one of {', '.join(RESIZE_POLICIES)}")
    if k < 1 or batch < 1 or epochs < 0:
        raise ValueError("--k and --batch must be >= 1 and --epochs >= 0")
    if memory_size < 1:
        raise ValueError(f"--memory-size {memory_size}: expected >= 1")
    spec = spec_for(backbone)

    paths = training_images(data)
    images = load_fitted(paths, size, resize)
    fit_idx, hold_idx = split_holdout(len(images), holdout, seed)
    fit_images, hold_images = images[fit_idx], images[hold_idx]
    input_shape = (size[0], size[1], images.shape[3])

    architecture = architecture_of(method, backbone, spec.taps, trainer.head_config(method_args), scorer, input_shape)
    graph = build_graph(architecture, pretrained=True, weights=str(weights) if weights else None)
    settings = TrainSettings(epochs=epochs, batch=batch, seed=seed, args=method_args)
    interrupted = False
    try:
        trainer.train(graph, fit_images, settings, progress)
    except KeyboardInterrupt:
        interrupted = True
    progress.finish()
    features, stopped = extract_features(graph, fit_images, batch, progress)
    interrupted = interrupted or stopped
    n_scored = int(features.shape[0])
    params = graph.scorer.fit(features, k=k, seed=seed, memory_size=memory_size)
    del features

    # Without held-out images the first thresholds come from the fitting images (and provenance says so).
    check_images, check_kind = (hold_images, "held-out") if len(hold_images) else (fit_images, "training")
    scores, maps = score_with_graph(graph, check_images, params, batch)
    thresholds = first_thresholds(
        scores,
        maps,
        {
            "tool": "inspectd train",
            "good_dir": str(Path(data).resolve()),
            "n_good": int(len(check_images)),
            "images": check_kind,
            "n_fit": int(len(fit_images)),
            "n_holdout": int(len(hold_images)),
        },
    )

    manifest = {
        "method": method,
        "backbone": backbone,
        "input": {"height": size[0], "width": size[1], "channels": input_shape[2], "resize": resize},
        "preprocessing": {
            "layout": "NHWC uint8",
            "grey": "replicated to 3 channels in the graph",
            "normalise": "(x / 255 - mean) / std",
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "score_kind": SCORE_KINDS.get(scorer, scorer),
        "scorer_inputs": list(graph.scorer_inputs),
        "architecture": architecture,
        "interrupted": interrupted,
        "training": {
            "data": str(Path(data).resolve()),
            "n_fit": int(len(fit_images)),
            "n_holdout": int(len(hold_images)),
            "n_scorer_fit": n_scored,
            "epochs": epochs,
            "batch": batch,
            "seed": seed,
            "k": k if "references" in graph.scorer_inputs else None,
            "scorer": scorer,
            "memory_size": int(params["memory_bank"].shape[0]) if "memory_bank" in params else None,
            "seconds": round(time.monotonic() - started, 1),
        },
        "versions": {
            "inspectd": inspectd_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "opset": opset,
        },
    }
    graph_bytes = export_graph(graph, params, opset)
    path = write_bundle(out, manifest, graph_bytes, params, state_arrays(graph), thresholds)
    bundle = load_bundle(path)  # what the daemon will do first: verify it
    return TrainResult(
        path,
        bundle.model_id,
        interrupted,
        len(fit_images),
        len(hold_images),
        thresholds.image_threshold,
        thresholds.pixel_threshold,
        time.monotonic() - started,
    )


SCORE_KINDS = {
    "kmeans": "image: 1 - cosine to the nearest k-means reference; map: squared feature distance to it",
    "kmeans_local": "image: max of the map; map: squared distance to the nearest location of any k-means reference",
    "gaussian": "image: max of the map; map: Mahalanobis distance (per-location mean, shared covariance)",
    "memory": "image: max of the map; map: distance of the aggregated patch to its nearest memory-bank patch",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=list(METHODS), default="frozen", help="training method (default frozen)")
    parser.add_argument(
        "--backbone",
        choices=list(BACKBONES),
        default=None,
        help="ImageNet backbone (default: the method's, lite0 for frozen)",
    )
    parser.add_argument("--data", required=True, help="MVTec-layout root (uses train/good) or a folder of images")
    parser.add_argument("--out", required=True, help="bundle directory to write (replaced when complete)")
    parser.add_argument("--size", default="256", help="model input: N or HxW (default 256)")
    parser.add_argument(
        "--resize",
        choices=RESIZE_POLICIES,
        default="stretch",
        help="fit frames by stretching or by keeping the aspect ratio with padding (default stretch)",
    )
    parser.add_argument(
        "--scorer",
        choices=list(SCORERS),
        default=None,
        help="k-means references, Gaussian/Mahalanobis or memory bank (default: the method's)",
    )
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"k-means references (default {DEFAULT_K})")
    parser.add_argument(
        "--memory-size",
        type=int,
        default=DEFAULT_MEMORY_SIZE,
        help=f"memory scorer: patches kept in the memory bank (default {DEFAULT_MEMORY_SIZE})",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the method's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the method's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for torch, numpy and random (default 0)")
    parser.add_argument("--weights", default=None, help="backbone ImageNet weights file (else the torch hub cache)")
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="fraction of good images held out for the first thresholds (default 0.1)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    for method_class in available_methods():
        method_class.add_arguments(parser)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    # A run started in the background (nohup, a script, a job runner) is stopped with SIGTERM: that must leave the
    # same usable checkpoint Ctrl-C does. SIGINT is claimed explicitly too, because a shell without job control
    # starts background commands with SIGINT ignored and Python then never installs its own handler: a deliberate
    # `kill -INT` would otherwise be dropped and the run would go on to the end.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        result = train_bundle(
            args.data,
            args.out,
            method=args.method,
            backbone=args.backbone,
            size=parse_size(args.size),
            resize=args.resize,
            scorer=args.scorer,
            k=args.k,
            epochs=args.epochs,
            batch=args.batch,
            seed=args.seed,
            weights=args.weights,
            holdout=args.holdout,
            opset=args.opset,
            method_args=args,
            memory_size=args.memory_size,
        )
    except (EngineError, ValueError) as exc:
        print(f"inspectd train: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inspectd train: interrupted before anything could be written", file=sys.stderr)
        return INTERRUPTED_EXIT
    state = " (INTERRUPTED: weights so far)" if result.interrupted else ""
    print(
        f"{result.bundle}: {result.model_id}{state}, {result.n_fit} images fitted, {result.n_holdout} held out, "
        f"image threshold {result.image_threshold:.4g}, pixel threshold {result.pixel_threshold:.4g}, "
        f"{result.seconds:.1f}s"
    )
    return INTERRUPTED_EXIT if result.interrupted else 0
