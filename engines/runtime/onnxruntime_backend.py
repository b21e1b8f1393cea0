"""The ONNX Runtime backend: runs a bundle's model.onnx on the CPU (or CUDA when ONNX Runtime has it).

Everything that does not change per call is done once: the session, the I/O binding, the scorer parameters bound as
OrtValues, the output bindings. `infer` binds the pixel buffer, runs, and copies the two outputs out.
"""

from __future__ import annotations

import threading
from typing import Annotated

import numpy as np
import onnxruntime as ort
from pydantic import Field

from engines.bundle.format import OUTPUTS, PIXELS
from engines.errors import EngineError
from engines.runtime.base import Engine, InferenceResult, check_pixels, check_scorer_params
from engines.schema import Flag, Int, declared, one_of

PROVIDER_CHOICES = ("auto", "cpu", "cuda")


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    @declared
    class Options:
        """`engine.options` when `engine.backend` is onnxruntime."""

        intra_op_threads: Annotated[Int, Field(ge=0)] = 0  # 0: ONNX Runtime's default (one per core)
        inter_op_threads: Annotated[Int, Field(ge=0)] = 1
        providers: Annotated[str, one_of(PROVIDER_CHOICES)] = "auto"  # auto: CUDA when this build has it, else CPU
        # ONNX Runtime's workers busy-wait between runs by default. In a daemon that waits for frames, and on a station
        # whose cores ingest and decode too, that spinning nearly doubles the CPU time per frame at batch 1
        # (docs/PERFORMANCE.md). Turn it on only on a dedicated machine running back-to-back batches.
        allow_spinning: Flag = False

    def __init__(self, bundle, options: Options, max_batch: int = 8) -> None:
        super().__init__(bundle, options, max_batch)
        available = ort.get_available_providers()
        want_cuda = options.providers == "cuda" or (
            options.providers == "auto" and "CUDAExecutionProvider" in available
        )
        if want_cuda and "CUDAExecutionProvider" not in available:
            raise EngineError("engine.options.providers: 'cuda' but this onnxruntime has no CUDAExecutionProvider")
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        self.device = "cuda" if want_cuda else "cpu"
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spinning = "1" if options.allow_spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        try:
            self.session = ort.InferenceSession(str(bundle.graph_path), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for an unreadable graph
            raise EngineError(f"{bundle.graph_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        expected_names = [PIXELS, *bundle.scorer_inputs]
        if list(inputs) != expected_names or [o.name for o in self.session.get_outputs()] != list(OUTPUTS):
            raise EngineError(
                f"{bundle.graph_path}: graph inputs {list(inputs)}, expected {expected_names} "
                f"and outputs {list(OUTPUTS)}"
            )
        self._param_shapes = {name: inputs[name] for name in bundle.scorer_inputs}
        self._lock = threading.Lock()  # one binding per engine: serialise callers
        self._binding = self.session.io_binding()
        self._param_values: dict[str, ort.OrtValue] = {}
        self.set_scorer_params(bundle.scorer_params())

    def set_scorer_params(self, params: dict[str, np.ndarray]) -> None:
        checked = check_scorer_params(params, self._param_shapes)
        values = {name: ort.OrtValue.ortvalue_from_numpy(value, self.device, 0) for name, value in checked.items()}
        with self._lock:
            for name, value in values.items():
                self._binding.bind_ortvalue_input(name, value)
            self._param_values = values  # the binding does not own them: keep them alive

    def infer(self, pixels: np.ndarray) -> InferenceResult:
        check_pixels(pixels, self.input_shape, self.max_batch)
        with self._lock:
            self._binding.bind_cpu_input(PIXELS, pixels)
            # Rebound per call: a bound output keeps the shape of the run that allocated it, and N varies.
            for output in OUTPUTS:
                self._binding.bind_output(output, "cpu")
            self.session.run_with_iobinding(self._binding)
            score, anomaly_map = self._binding.copy_outputs_to_cpu()
        return InferenceResult(score, anomaly_map)

    def close(self) -> None:
        self._binding = None
        self.session = None
