"""The ONNX Runtime backend: runs a bundle's model.onnx on the CPU, or on an NVIDIA GPU through ONNX Runtime's CUDA
execution provider (the `onnxruntime-gpu` build, installed in place of `onnxruntime`: docs/GPU.md).

Everything that does not change per call is done once: the session, the I/O binding, the scorer parameters bound as
OrtValues, the output bindings. `infer` binds the pixel buffer, runs, and copies the two outputs out.

On CUDA: ONNX Runtime does not fail when its CUDA provider cannot start (no device, a driver too old for the build,
missing CUDA or cuDNN libraries); it logs and runs the whole graph on the CPU, ten times slower and unnoticed. So the
session's providers are read back after it opens, and an engine asked for CUDA that did not get it is refused. TF32
is off (`use_tf32=0`): it keeps 10 mantissa bits in the convolutions and matrix products, and FP32 is meant to be
FP32. `precision: fp16` runs the bundle's FP16 graph (backbone in float16, scorer in float32), which
`inspectd build-engine BUNDLE --fp16 --onnxruntime` writes into the bundle; this module never rewrites a graph itself
(that needs the onnx package, which a runtime station does not have).
"""

from __future__ import annotations

import os
import threading
from typing import Annotated

import numpy as np

# ONNX Runtime starts its telemetry as the module is imported: it keeps a device id and a database under
# $XDG_CACHE_HOME or ~/.cache (the state dir, for the service user), and where that cannot be written (an
# inspectd@NAME instance, whose HOME is read-only to it) prints a coloured warning on stderr that is not JSON, where
# `journalctl -o cat | jq` stops reading. Only this variable, read at the import, stops both. An operator's own
# setting stands.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort  # noqa: E402
from pydantic import Field  # noqa: E402

from engines.bundle.format import OUTPUTS, PIXELS
from engines.bundle.plans import fp16_graph_name
from engines.errors import BundleError, EngineError
from engines.runtime.base import (
    MAX_DEVICE_INDEX,
    MAX_THREADS,
    Engine,
    InferenceResult,
    check_pixels,
    check_scorer_params,
)
from engines.schema import Flag, Int, declared, one_of

ort.disable_telemetry_events()
# ONNX Runtime's own warnings go to stderr as bare coloured text, beside the JSON log (an unused initializer, a node
# left on the CPU). Its errors still do: a CUDA library that does not load is explained there, before the one-line
# refusal this module raises for it.
ort.set_default_logger_severity(3)

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("fp32", "fp16")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# ONNX Runtime's names for the types the engine binds: uint8 pixels, float32 scorer parameters.
PIXELS_TYPE = "tensor(uint8)"
SCORER_TYPE = "tensor(float)"


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    @declared
    class Options:
        """`engine.options` when `engine.backend` is onnxruntime."""

        intra_op_threads: Annotated[Int, Field(ge=0, le=MAX_THREADS)] = 0  # 0: ONNX Runtime's default (one per core)
        inter_op_threads: Annotated[Int, Field(ge=0, le=MAX_THREADS)] = 1
        # auto: CUDA when this onnxruntime build has the CUDA provider, else CPU. Whenever CUDA is asked for (cuda, or
        # auto on a GPU build) and does not start, the engine is refused rather than run on the CPU.
        providers: Annotated[str, one_of(PROVIDER_CHOICES)] = "auto"
        device: Annotated[Int, Field(ge=0, le=MAX_DEVICE_INDEX)] = 0  # CUDA device index
        # fp16: the bundle's FP16 graph (written by `inspectd build-engine BUNDLE --fp16 --onnxruntime`)
        precision: Annotated[str, one_of(PRECISION_CHOICES)] = "fp32"
        # ONNX Runtime's workers busy-wait between runs by default. In a daemon that waits for frames, and on a station
        # whose cores ingest and decode too, that spinning nearly doubles the CPU time per frame at batch 1
        # (docs/PERFORMANCE.md). Turn it on only on a dedicated machine running back-to-back batches.
        allow_spinning: Flag = False

    def __init__(self, bundle, options: Options, max_batch: int = 8) -> None:
        super().__init__(bundle, options, max_batch)
        self.precision = options.precision
        want_cuda = self.needs_device(options)
        if want_cuda and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds the CUDA and cuDNN libraries of the nvidia-* wheels only once they are loaded
            # (torch does that when it is imported first; a runtime station has no torch).
            ort.preload_dlls()
        cuda_options = {"device_id": str(options.device), "use_tf32": "0"}
        providers: list = ([(CUDA, cuda_options)] if want_cuda else []) + [CPU]
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spinning = "1" if options.allow_spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        self.graph_path = self._graph(bundle, options.precision)
        try:
            self.session = ort.InferenceSession(str(self.graph_path), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for an unreadable graph
            raise EngineError(f"{self.graph_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        running = self.session.get_providers()
        if want_cuda and CUDA not in running:
            self.session = None
            raise EngineError(cuda_refusal(options, running))
        self.device = "cuda" if CUDA in running else "cpu"
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        expected_names = [PIXELS, *bundle.scorer_inputs]
        if list(inputs) != expected_names or [o.name for o in self.session.get_outputs()] != list(OUTPUTS):
            raise EngineError(
                f"{self.graph_path}: graph inputs {list(inputs)}, expected {expected_names} and outputs {list(OUTPUTS)}"
            )
        # A graph from another exporter can take other types than the ones bound here (uint8 frames, float32 scorer
        # parameters, as `inspectd export` writes them): it would open, then fail every batch with ONNX Runtime's
        # multi-line error in tools that run no warm-up (calibrate, eval, bench).
        for graph_input in self.session.get_inputs():
            expected_type = PIXELS_TYPE if graph_input.name == PIXELS else SCORER_TYPE
            if graph_input.type != expected_type:
                self.session = None
                raise EngineError(
                    f"{self.graph_path}: input {graph_input.name} is {graph_input.type}, expected "
                    f"{expected_type}{' (float32)' * (expected_type == SCORER_TYPE)}"
                )
        # The manifest has no checksum of its own: an input size edited there would open, then fail every batch with
        # ONNX Runtime's multi-line dimension error. A symbolic dimension (the batch) takes any size.
        pixel_dims = list(inputs[PIXELS])
        if len(pixel_dims) == 4 and isinstance(pixel_dims[0], int) and not pixel_dims[0] == max_batch == 1:
            # Exported without a dynamic batch: only batches of exactly that size would run. Fixed at 1, it serves an
            # engine that is never given more than one frame.
            self.session = None
            raise EngineError(
                f"{self.graph_path}: takes a fixed batch of {pixel_dims[0]} frame{'s' * (pixel_dims[0] != 1)}, "
                "expected a dynamic batch (N)"
            )
        if len(pixel_dims) != 4 or any(
            isinstance(dim, int) and dim != size for dim, size in zip(pixel_dims[1:], bundle.input_shape)
        ):
            shown = ", ".join(str(dim) for dim in ["N", *pixel_dims[1:]])
            height, width, channels = bundle.input_shape
            self.session = None
            raise EngineError(
                f"{self.graph_path}: takes pixels [{shown}], the manifest's input is {height}x{width}x{channels}"
            )
        self._param_shapes = {name: inputs[name] for name in bundle.scorer_inputs}
        self._lock = threading.Lock()  # one binding per engine: serialise callers
        self._binding = self.session.io_binding()
        self._param_values: dict[str, ort.OrtValue] = {}
        self.set_scorer_params(bundle.scorer_params())

    @classmethod
    def needs_device(cls, options: Options) -> bool:
        return options.providers == "cuda" or (options.providers == "auto" and CUDA in ort.get_available_providers())

    @classmethod
    def check_bundle(cls, bundle, options: Options) -> None:
        cls._graph(bundle, options.precision)
        # A CPU build never gains the CUDA provider, unlike a GPU that shows up late (retried at start): refused here
        # so that `run --check` says so, not a start that fails for ever.
        if options.providers == "cuda" and CUDA not in ort.get_available_providers():
            raise EngineError(cuda_refusal(options, []))

    @staticmethod
    def _graph(bundle, precision: str):
        if precision == "fp32":
            return bundle.graph_path
        name = fp16_graph_name(bundle.manifest["files"][bundle.manifest["graph"]])
        if name not in bundle.manifest["files"]:
            raise BundleError(
                f"engine.options.precision: 'fp16' but {bundle.path} has no FP16 graph for its current model.onnx "
                f"({name}): write it with `inspectd build-engine {bundle.path} --fp16 --onnxruntime`"
            )
        return bundle.path / name

    def set_scorer_params(self, params: dict[str, np.ndarray]) -> None:
        checked = check_scorer_params(params, self._param_shapes)
        device_id = self.options.device if self.device == "cuda" else 0
        values = {
            name: ort.OrtValue.ortvalue_from_numpy(value, self.device, device_id) for name, value in checked.items()
        }
        with self._lock:
            self._check_open()
            for name, value in values.items():
                self._binding.bind_ortvalue_input(name, value)
            self._param_values = values  # the binding does not own them: keep them alive

    def infer(self, pixels: np.ndarray) -> InferenceResult:
        check_pixels(pixels, self.input_shape, self.max_batch)
        with self._lock:
            self._check_open()
            self._binding.bind_cpu_input(PIXELS, pixels)
            # Rebound per call: a bound output keeps the shape of the run that allocated it, and N varies.
            for output in OUTPUTS:
                self._binding.bind_output(output, "cpu")
            self.session.run_with_iobinding(self._binding)
            score, anomaly_map = self._binding.copy_outputs_to_cpu()
        return InferenceResult(score, anomaly_map)

    def close(self) -> None:
        with self._lock:  # waits for a batch still running on the session and its binding
            self._binding = None
            self.session = None

    def _check_open(self) -> None:
        if self.session is None:
            raise EngineError(f"{self.graph_path}: engine closed")


def cuda_refusal(options, running: list[str]) -> str:
    """Why an engine that asked for CUDA runs on `running` instead, and what to do, in one line."""
    asked = f"engine.options.providers: {options.providers!r}"
    if CUDA not in ort.get_available_providers():
        return (
            f"{asked} but this onnxruntime {ort.__version__} is a CPU build (no {CUDA}): install onnxruntime-gpu in "
            "its place (docs/GPU.md), or set providers: cpu"
        )
    return (
        f"{asked} but ONNX Runtime {ort.__version__} fell back to {', '.join(running)}: its CUDA provider did not "
        f"start on device {options.device} (no such device, a driver older than this build's CUDA, or missing "
        "CUDA/cuDNN libraries; ONNX Runtime's own error is in the log above); providers: cpu to run on the CPU"
    )
