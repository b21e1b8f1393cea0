"""Frames in, results out: the one place that fits frames into a batch, runs the engine and maps results back.

uint8 frames of any size, grey or RGB, are fitted (engines.runtime.preprocess.fit_frame: the bundle's resize policy,
channel conversion) into one uint8 [max_batch, H, W, C] buffer allocated when the Predictor is made; `infer` runs the
engine once on the rows filled; `frame_map` crops and resizes a row's anomaly map back to its own frame's size
(Placement.map_to_frame). Nothing is allocated per frame or per batch here beyond what the resizes themselves need
and the engine's outputs (measured below 0.3 ms a frame together, docs/PERFORMANCE.md). The daemon's inference stage,
`inspectd eval` (and through it `inspectd calibrate`) and `inspectd bench engine` all go through it.
"""

from __future__ import annotations

import numpy as np

from engines.errors import EngineError
from engines.runtime.base import InferenceResult
from engines.runtime.preprocess import Placement, fit_frame


class Predictor:
    """One engine and one preallocated batch buffer for it.

    Fill a batch with `add` (after `clear`), run it with `infer`, then read each row's score from the result and its
    frame-sized map with `frame_map`. `predict(frames)` does all three for frames that are known to fit. Not
    thread-safe: one Predictor per thread that runs batches.
    """

    def __init__(self, engine, bundle=None, max_batch: int | None = None) -> None:
        """`engine` needs only `infer`; the input shape and resize policy come from `bundle` (default: the engine's)
        and the batch size from `max_batch` (default: the engine's)."""
        bundle = engine.bundle if bundle is None else bundle
        self.engine = engine
        self.input_shape: tuple[int, int, int] = tuple(bundle.input_shape)
        self.resize_policy: str = bundle.resize_policy
        self.each_axis: bool = bundle.each_axis
        self.max_batch = engine.max_batch if max_batch is None else max_batch
        if self.max_batch < 1:
            raise EngineError(f"batch: {self.max_batch}, expected an integer >= 1")
        self.pixels = np.empty((self.max_batch, *self.input_shape), dtype=np.uint8)
        self.placements: list[Placement | None] = [None] * self.max_batch
        self.count = 0

    def clear(self) -> None:
        """Start a new batch (the buffer is reused; nothing is freed or allocated)."""
        self.count = 0

    def add(self, frame: np.ndarray) -> int:
        """Fit `frame` (uint8 HxW or HxWx3, RGB) into the next row and return the row. If the frame cannot be fitted
        the exception propagates and the row stays free for the next frame."""
        row = self.count
        if row >= self.max_batch:
            raise EngineError(f"batch full: {self.max_batch} frames (max_batch), run it before adding more")
        _, self.placements[row] = fit_frame(
            frame, self.input_shape, self.resize_policy, out=self.pixels[row], each_axis=self.each_axis
        )
        self.count = row + 1
        return row

    @property
    def batch(self) -> np.ndarray:
        """The rows filled so far: uint8 [count, H, W, C], a view into the buffer."""
        return self.pixels[: self.count]

    def infer(self) -> InferenceResult:
        """Run the engine once on the rows filled; scores [count] and model-size maps [count, H, W]."""
        return self.engine.infer(self.pixels[: self.count])

    def predict(self, frames) -> InferenceResult:
        """clear, add every frame (at most max_batch), infer."""
        self.clear()
        for frame in frames:
            self.add(frame)
        return self.infer()

    def frame_map(self, result: InferenceResult, row: int) -> np.ndarray:
        """Row `row`'s anomaly map in its frame's own coordinates: padding cropped away, resized to the frame's size.
        A map that needed no resize is a view into `result.maps`."""
        placement = self.placements[row]
        assert placement is not None, f"row {row}: no frame added since clear()"
        return placement.map_to_frame(result.maps[row])
