"""The bundle's feature graph at runtime: uint8 frames in, the features the scorer is fitted on out.

`inspectd teach` refits scorer parameters on a station without torch: it runs the bundle's feature graph
(engines.bundle.format.FEATURE_GRAPH, written by `inspectd train` and `inspectd export`) with ONNX Runtime and fits
with engines.runtime.scorer_fit. The feature graph is a graph of its own rather than an output of model.onnx so the
daemon's graph, its FP16 variant and its TensorRT plans stay exactly what they were: nothing on the hot path pays for
a feature map it does not need.
"""

from __future__ import annotations

import numpy as np

from engines.bundle.format import FEATURE_GRAPH, FEATURES, PIXELS
from engines.errors import BundleError, EngineError
from engines.runtime.base import check_pixels

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class FeatureExtractor:
    """One ONNX Runtime session on the bundle's feature graph; CUDA when this onnxruntime build has it."""

    def __init__(self, bundle, max_batch: int = 8, threads: int = 0) -> None:
        from engines.runtime.onnxruntime_backend import ort  # imported as the backend sets it up (telemetry off)

        if FEATURE_GRAPH not in bundle.manifest["files"]:
            raise BundleError(
                f"bundle {bundle.path} has no features output ({FEATURE_GRAPH}); "
                f"re-export with inspectd export {bundle.path}"
            )
        self.bundle = bundle
        self.max_batch = max_batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # TF32 off, as the engine has it: scorer parameters fitted on TF32 features would not be the FP32 fit that
        # `inspectd train` and the daemon's engine agree with.
        cuda = [(CUDA, {"use_tf32": "0"})] if CUDA in ort.get_available_providers() else []
        providers = [*cuda, CPU]
        path = bundle.path / FEATURE_GRAPH
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for an unreadable graph
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != ([PIXELS], [FEATURES]):
            raise EngineError(f"{path}: inputs/outputs {names}, expected [{PIXELS!r}] -> [{FEATURES!r}]")

    def extract(self, pixels: np.ndarray) -> np.ndarray:
        """pixels uint8 [N, H, W, C] (any N, run max_batch at a time) -> features float32 [N, D, h, w]."""
        out = []
        for start in range(0, len(pixels), self.max_batch):
            batch = np.ascontiguousarray(pixels[start : start + self.max_batch])
            check_pixels(batch, self.bundle.input_shape, self.max_batch)
            out.append(self.session.run([FEATURES], {PIXELS: batch})[0])
        if not out:
            raise EngineError("features: no frames, expected at least one")
        return np.concatenate(out)
