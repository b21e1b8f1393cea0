"""The torch backend: rebuilds a bundle's graph from its manifest and weights.npz (nothing unpickled) and runs it
under torch.inference_mode. The reference the ONNX graph is checked against, and a fallback where ONNX Runtime is not
an option.

The one runtime module that imports upwards, into engines.model, because it runs the torch graph itself rather than an
exported one. It is imported only when a config or command chooses backend `torch` (engines.runtime.BACKENDS), never
by the rest of the runtime, so a runtime-only station without torch never loads it (tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from engines.bundle.format import VARIABLE_ROWS
from engines.errors import EngineError
from engines.model.export import graph_from_bundle
from engines.runtime.base import Engine, InferenceResult, check_pixels, check_scorer_params


@dataclasses.dataclass(frozen=True)
class Options:
    device: str = "cpu"
    threads: int = 0  # > 0 sets torch's intra-op threads for the whole process


class TorchEngine(Engine):
    name = "torch"
    Options = Options

    def __init__(self, bundle, options: Options, max_batch: int = 8) -> None:
        super().__init__(bundle, options, max_batch)
        try:
            self.device = torch.device(options.device)
        except RuntimeError as exc:
            raise EngineError(f"engine.options.device: {options.device!r}, expected cpu, cuda or cuda:N") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"engine.options.device: {options.device!r} but torch sees no CUDA device")
        if options.threads < 0:
            raise EngineError(f"engine.options.threads: {options.threads}, expected an integer >= 0")
        if options.threads:
            torch.set_num_threads(options.threads)
        self.graph = graph_from_bundle(bundle).to(self.device)
        example = bundle.scorer_params()
        # Shapes as the exported graph declares them: the row count of a VARIABLE_ROWS input may change on a refit.
        self._param_shapes = {
            n: ["dynamic" if n in VARIABLE_ROWS and i == 0 else d for i, d in enumerate(example[n].shape)]
            for n in bundle.scorer_inputs
        }
        self.set_scorer_params(example)

    def set_scorer_params(self, params: dict[str, np.ndarray]) -> None:
        checked = check_scorer_params(params, self._param_shapes)
        self._params = tuple(torch.from_numpy(checked[n]).to(self.device) for n in self.bundle.scorer_inputs)

    def infer(self, pixels: np.ndarray) -> InferenceResult:
        check_pixels(pixels, self.input_shape, self.max_batch)
        with torch.inference_mode():
            score, anomaly_map = self.graph(torch.from_numpy(pixels).to(self.device), *self._params)
        return InferenceResult(score.cpu().numpy(), anomaly_map.cpu().numpy())
