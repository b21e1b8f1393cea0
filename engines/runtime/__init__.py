"""Running a bundle's graph: uint8 NHWC pixels in, image scores and anomaly maps out.

    base        the Engine interface every backend implements, and the checks they share
    predictor   Predictor: frames of any size in, scores and frame-sized maps out, through one preallocated batch
    preprocess  fitting a frame to the model input (fit_frame) and mapping results back (Placement)
    onnxruntime_backend, tensorrt_backend, torch_backend   one module per backend
    cuda_buffers   CUDA memory and a stream for the TensorRT backend
    score_shift    whether thresholds set on FP32 scores may judge a reduced-precision engine's scores

Every backend is one module with one class implementing `engines.runtime.base.Engine` and declaring its own options
(`Options`, an engines.schema declaration). Adding a backend is that module plus one line in BACKENDS. Backends are
imported only when chosen (the daemon's config imports the one it names, to check its options), and a backend module
imports its heavy library (torch, TensorRT) only when an engine opens, so a station without them can still load and
check a config that names them. The runtime imports only engines.bundle and engines.schema (and engines.errors); the
torch backend alone reaches into engines.model, for the torch graph it runs.
"""

from __future__ import annotations

import importlib

from engines.errors import EngineError
from engines.runtime.base import Engine, InferenceResult

# backend name -> "module:Class"
BACKENDS: dict[str, str] = {
    "onnxruntime": "engines.runtime.onnxruntime_backend:OnnxRuntimeEngine",
    "torch": "engines.runtime.torch_backend:TorchEngine",
    "tensorrt": "engines.runtime.tensorrt_backend:TensorRTEngine",
}


def backend_class(name: str) -> type[Engine]:
    if name not in BACKENDS:
        raise EngineError(f"engine backend {name!r}: expected one of {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"engine backend {name!r}: cannot import {exc.name or module_name} ({exc})") from exc
    return getattr(module, class_name)


def open_engine(bundle, backend: str = "onnxruntime", options: dict | None = None, max_batch: int = 8) -> Engine:
    """Open `bundle` (an engines.bundle.store.Bundle) on `backend` with that backend's options as a plain dict."""
    cls = backend_class(backend)
    return cls(bundle, cls.parse_options(options or {}, where="engine.options"), max_batch=max_batch)


__all__ = ["BACKENDS", "Engine", "InferenceResult", "backend_class", "open_engine"]
