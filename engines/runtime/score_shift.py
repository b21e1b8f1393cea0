"""Whether thresholds set on FP32 scores may judge the scores of a reduced-precision engine (an FP16 graph or plan,
an INT8 plan).

Thresholds are set on FP32 scores (`inspectd train`, `inspectd calibrate` without --precision). A reduced-
precision engine computes slightly different scores, so a frame whose FP32 score lies within that difference of the
threshold can change verdict. `measure` runs the same frames through the engine and through the bundle's model.onnx
on ONNX Runtime's CPU provider (the FP32 reference every parity test uses) and takes the largest score difference;
`check` refuses the pair when that difference exceeds MAX_SHIFT of the lowest image threshold in use. A non-finite
score on either side (float16 overflow turns into inf, then NaN in the float32 scorer) is refused by `measure` itself,
whatever thresholds are in use: no threshold can judge it. Thresholds whose provenance records `engine_precision` equal
to the engine's were calibrated on that engine's own scores, so there is nothing to compare (`needs_check`); nor is
there for an fp32 engine, whichever scores its thresholds were set on (see needs_check).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engines.bundle.thresholds import ENGINE_PRECISION
from engines.errors import EngineError

# Largest score difference, as a fraction of the lowest image threshold, that FP32 thresholds tolerate: only frames
# whose FP32 score lies within 1 % of the threshold can change verdict. The FP16 graph moves scores by 0.1-0.3 % of
# their range on ONNX Runtime (docs/GPU.md), well inside it.
MAX_SHIFT = 0.01


@dataclasses.dataclass(frozen=True)
class ScoreShift:
    """How far `precision`'s scores were from FP32 ones on `frames` frames taken from `source`."""

    precision: str
    frames: int
    max_abs: float
    source: str


def needs_check(engine_precision: str, thresholds) -> bool:
    """True when a reduced-precision engine judges by `thresholds` not set on its own precision's scores (FP32
    thresholds on an FP16 engine).

    False for an fp32 engine, even with thresholds set on fp16 or int8 scores, though they differ from its scores by as
    much: `measure` compares an engine with the FP32 graph, which for an fp32 engine gives about zero and says nothing
    of the scores those thresholds were set on. Measuring that difference needs the reduced-precision engine they were
    set on (a TensorRT plan, its GPU), so it is not measured: such thresholds are taken as they are."""
    calibrated_on = thresholds.provenance.get(ENGINE_PRECISION, "fp32")
    return engine_precision != "fp32" and engine_precision != calibrated_on


def measure(engine, frames: np.ndarray, source: str) -> ScoreShift:
    """Run `frames` (uint8 [N, H, W, C], fitted to the model input) through `engine` and through its bundle's FP32
    graph on ONNX Runtime CPU; the largest |score difference|."""
    from engines.runtime import open_engine

    if len(frames) == 0:
        raise EngineError(f"score shift of the {engine.precision} engine: no frames to measure it on ({source})")
    batch = engine.max_batch
    # Positions (in `frames`) of non-finite scores: a NaN would otherwise vanish from the largest difference
    # (max(0.0, nan) is 0.0) and let through the float16 overflow this measurement exists to catch.
    broken: dict[str, list[int]] = {"reference": [], "engine": []}
    with open_engine(engine.bundle, "onnxruntime", {"providers": "cpu"}, max_batch=batch) as reference:
        worst = 0.0
        for start in range(0, len(frames), batch):
            chunk = np.ascontiguousarray(frames[start : start + batch])
            got = engine.infer(chunk).scores.astype(np.float64)
            want = reference.infer(chunk).scores.astype(np.float64)
            broken["engine"] += (start + np.flatnonzero(~np.isfinite(got))).tolist()
            broken["reference"] += (start + np.flatnonzero(~np.isfinite(want))).tolist()
            if not broken["engine"] and not broken["reference"]:
                worst = max(worst, float(np.max(np.abs(got - want))))
    # The reference first: when FP32 fails too, the precision is not what is wrong.
    for side, positions in broken.items():
        if positions:
            who, remedy = (
                ("the FP32 graph (ONNX Runtime CPU)", "the bundle's model or scorer parameters are broken")
                if side == "reference"
                else (f"the {engine.precision} engine", "float16 overflow? run an fp32 engine")
            )
            shown = ", ".join(map(str, positions[:8])) + (", ..." if len(positions) > 8 else "")
            raise EngineError(
                f"engine precision {engine.precision}: {who} gave a non-finite score on {len(positions)} of "
                f"{len(frames)} frames from {source} (probe frame {shown}), expected a finite score on every one: "
                f"{remedy}"
            )
    return ScoreShift(engine.precision, int(len(frames)), worst, source)


def lowest_image_threshold(thresholds) -> float:
    values = [thresholds.image_threshold]
    values += [o["image_threshold"] for o in thresholds.per_camera.values() if "image_threshold" in o]
    return min(values)


def check(shift: ScoreShift, thresholds, bound: float = MAX_SHIFT) -> None:
    """One-line EngineError when `shift` is too large for `thresholds` (set on FP32 scores)."""
    threshold = lowest_image_threshold(thresholds)
    allowed = bound * abs(threshold)
    if shift.max_abs > allowed:
        share = shift.max_abs / abs(threshold) if threshold else float("inf")
        raise EngineError(
            f"engine precision {shift.precision}: scores differ from the FP32 graph's by up to {shift.max_abs:.4g} on "
            f"{shift.frames} frames from {shift.source}, {share:.1%} of the lowest image threshold {threshold:.4g} "
            f"(thresholds version {thresholds.version}, set on FP32 scores, allow {bound:.0%}): run an fp32 engine, "
            f"or thresholds calibrated on this engine's scores (`inspectd calibrate BUNDLE --precision "
            f"{shift.precision}` with this engine's backend records provenance engine_precision: {shift.precision})"
        )
