"""The torch backend: rebuilds a bundle's graph from its manifest and weights.npz (nothing unpickled) and runs it
under torch.inference_mode. The reference the ONNX graph is checked against, and a fallback where ONNX Runtime is not
an option.

The one runtime module that imports upwards, into engines.model, because it runs the torch graph itself rather than an
exported one. It is imported only when a config or command chooses backend `torch` (engines.runtime.BACKENDS), never
by the rest of the runtime, and it imports torch and engines.model only when an engine opens: the daemon imports this
module at config load to check its `Options`, on a runtime-only station too, which has no torch
(tests/test_layering.py).
"""

from __future__ import annotations

import mmap
from typing import Annotated

import numpy as np
import structlog
from pydantic import AfterValidator, Field

from engines.errors import EngineError, one_line, show
from engines.runtime.base import (
    MAX_DEVICE_INDEX,
    MAX_THREADS,
    Engine,
    InferenceResult,
    check_pixels,
    check_scorer_params,
)
from engines.schema import Int, declared, invalid, matching

log = structlog.get_logger("engines.runtime.torch")


def bounded_device(value: str) -> str:
    index = value.partition(":")[2]
    # The length first: int() refuses a string of thousands of digits with its own error.
    if index and (len(index) > len(str(MAX_DEVICE_INDEX)) or int(index) > MAX_DEVICE_INDEX):
        raise invalid(f"expected cuda:N with N at most {MAX_DEVICE_INDEX}, got {show(value)}")
    return value


def write_execute_refused() -> str | None:
    """Why this process may not map memory writable and executable (None: it may). systemd's
    MemoryDenyWriteExecute=yes (every shipped daemon unit), the kernel's PR_SET_MDWE and SELinux's execmem rule refuse
    such a mapping, and oneDNN builds its CPU kernels in one."""
    try:
        probe = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as exc:
        return f"mmap(PROT_WRITE|PROT_EXEC) failed: {exc.strerror or exc}"
    probe.close()
    return None


class TorchEngine(Engine):
    name = "torch"

    @declared
    class Options:
        """`engine.options` when `engine.backend` is torch."""

        device: Annotated[
            str, matching(r"cpu|cuda(:(0|[1-9][0-9]*))?", "cpu, cuda or cuda:N"), AfterValidator(bounded_device)
        ] = "cpu"
        # > 0 sets torch's intra-op threads for the whole process.
        threads: Annotated[Int, Field(ge=0, le=MAX_THREADS)] = 0

    @classmethod
    def needs_device(cls, options: Options) -> bool:
        return options.device != "cpu"

    def __init__(self, bundle, options: Options, max_batch: int = 8) -> None:
        super().__init__(bundle, options, max_batch)
        try:
            import torch

            from engines.model.export import graph_from_bundle
        except ImportError as exc:
            raise EngineError(
                f"engine backend 'torch': cannot import {exc.name} ({exc}); pip install 'inspectd[train]'"
            ) from exc
        self.device = torch.device(options.device)  # the form and the index were checked at load
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise EngineError(f"engine.options.device: {options.device!r} but torch sees no CUDA device")
            # torch refuses an index past the last GPU only when the graph moves there, in its own words.
            count = torch.cuda.device_count()
            if self.device.index is not None and self.device.index >= count:
                raise EngineError(
                    f"engine.options.device: {options.device!r}, expected cuda:0..cuda:{count - 1} "
                    f"({count} CUDA device(s))"
                )
        if options.threads:
            torch.set_num_threads(options.threads)
        # oneDNN JIT-compiles its convolution kernels into writable and executable memory: under a W^X rule the first
        # convolution fails with "could not create a primitive", which reads as a broken graph. Torch's own kernels
        # need no such memory. Probed, not assumed, so that a process allowed W+X keeps oneDNN's speed.
        self.onednn_off = write_execute_refused() if self.device.type == "cpu" else None
        if self.onednn_off is not None:
            # Per process, as the TF32 switches below. Typed as the descriptor (ContextProp) that takes the bool.
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
            log.info(
                "onednn_disabled",
                backend="torch",
                reason=self.onednn_off,
                effect="torch's own CPU kernels, slower; MemoryDenyWriteExecute=no in a drop-in keeps oneDNN",
            )
        # cuDNN convolutions default to TF32 on Ampere and later, which keeps 10 mantissa bits: the FP32 graph would
        # not compute in FP32, and its scores would drift from the ONNX graph's that the thresholds were set on.
        # The switches are per process; an engine that runs FP32 sets them for every torch user in it.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        graph = graph_from_bundle(bundle)
        try:
            self.graph = graph.to(self.device)
        except RuntimeError as exc:  # out of memory on the GPU, a device torch's CUDA cannot start: one line
            raise EngineError(
                f"engine backend 'torch': cannot place the graph on {self.device} ({one_line(exc)})"
            ) from exc
        # As the ONNX Runtime backend checks its graph: the manifest has no checksum of its own, and an input or
        # scorer inputs edited there would run with maps placed at the wrong size, or fail every batch.
        if tuple(self.graph.input_shape) != tuple(bundle.input_shape):
            built = "x".join(map(str, self.graph.input_shape))
            raise EngineError(
                f"{bundle.path}: its architecture builds a graph for {built} pixels, the manifest's input is "
                f"{'x'.join(map(str, bundle.input_shape))}"
            )
        if list(self.graph.scorer_inputs) != list(bundle.scorer_inputs):
            raise EngineError(
                f"{bundle.path}: its architecture builds a graph with scorer inputs {list(self.graph.scorer_inputs)}, "
                f"the manifest's scorer_inputs are {list(bundle.scorer_inputs)}"
            )
        self._param_shapes = self._graph_param_shapes(torch)
        self.set_scorer_params(bundle.scorer_params())

    def _graph_param_shapes(self, torch) -> dict[str, list]:
        """The scorer inputs' shapes as the exported graph declares them (what the ONNX Runtime backend reads off
        model.onnx), from the features [1, D, h, w] of one blank frame: never from the scorer.npz being checked."""
        try:
            with torch.inference_mode():
                blank = torch.zeros((1, *self.graph.input_shape), dtype=torch.uint8, device=self.device)
                _, depth, height, width = self.graph.embed(blank).shape
        except RuntimeError as exc:
            raise EngineError(
                f"{self.bundle.path}: the graph fails on one blank frame ({one_line(exc)}), expected a graph that "
                "runs at its input size"
            ) from exc
        shapes = self.graph.scorer.input_shapes(depth, height, width)
        return {n: shapes[n] for n in self.bundle.scorer_inputs}

    def set_scorer_params(self, params: dict[str, np.ndarray]) -> None:
        import torch  # imported by __init__ already: a dictionary lookup

        checked = check_scorer_params(params, self._param_shapes)
        self._params = tuple(torch.from_numpy(checked[n]).to(self.device) for n in self.bundle.scorer_inputs)

    def infer(self, pixels: np.ndarray) -> InferenceResult:
        import torch

        check_pixels(pixels, self.input_shape, self.max_batch)
        with torch.inference_mode():
            score, anomaly_map = self.graph(torch.from_numpy(pixels).to(self.device), *self._params)
        return InferenceResult(score.cpu().numpy(), anomaly_map.cpu().numpy())
