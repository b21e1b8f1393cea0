"""The torch backend: rebuilds a bundle's graph from its manifest and weights.npz (nothing unpickled) and runs it
under torch.inference_mode. The reference the ONNX graph is checked against, and a fallback where ONNX Runtime is not
an option."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from engines.errors import EngineError
from engines.export import graph_from_bundle
from engines.runtime.base import Engine, InferenceResult
from engines.runtime.onnxruntime_backend import check_pixels, check_scorer_params


@dataclasses.dataclass(frozen=True)
class Options:
    device: str = "cpu"
    threads: int = 0   # > 0 sets torch's intra-op threads for the whole process


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
        self._param_shapes = {n: ["dynamic" if n == "references" and i == 0 else d for i, d in enumerate(v.shape)]
                              for n, v in example.items()}
        self.set_scorer_params(example)

    def set_scorer_params(self, params: dict[str, np.ndarray]) -> None:
        checked = check_scorer_params(params, self._param_shapes)
        self._params = tuple(torch.from_numpy(checked[n]).to(self.device) for n in self.bundle.scorer_inputs)

    def infer(self, pixels: np.ndarray) -> InferenceResult:
        check_pixels(pixels, self.input_shape, self.max_batch)
        with torch.inference_mode():
            score, anomaly_map = self.graph(torch.from_numpy(pixels).to(self.device), *self._params)
        return InferenceResult(score.cpu().numpy(), anomaly_map.cpu().numpy())
