"""The TensorRT backend: runs a plan that `inspectd build-engine` stored in the bundle, on one NVIDIA GPU.

One execution context on the plan's first optimisation profile, one non-blocking CUDA stream, and pinned host and
device buffers for max_batch frames, all allocated once. `infer` copies the batch into the pinned buffer, enqueues
upload, `execute_async_v3` and download on the stream, and waits for it: one batch in flight, like every other backend,
so the daemon's inference stage has one way to run a batch. The scorer parameters live in their own device buffers;
`set_scorer_params` (new parameters on an open engine, as `inspectd teach` scores a refit; a daemon reload opens a
second engine instead) checks the new shapes against the plan's profile before it touches any of them.

tensorrt and cuda-python (cuda-bindings) are imported when this backend is chosen, never before; a station without
them gets one line saying what to install. Written against the TensorRT 10/11 and cuda-python documentation; see
docs/GPU.md for what has and has not run on real hardware.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import Field

from engines.bundle.format import OUTPUTS, PIXELS
from engines.bundle.plans import (
    PRECISIONS,
    PlanInfo,
    check_compatible,
    import_tensorrt,
    pick_plan,
    read_sidecar,
    rebuild_command,
    sidecar_name,
)
from engines.errors import BundleError, EngineError
from engines.runtime import cuda_buffers
from engines.runtime.base import MAX_DEVICE_INDEX, Engine, InferenceResult, check_pixels, check_scorer_params
from engines.schema import Int, declared, one_of

PROFILE = 0  # the optimisation profile the context runs on (the first; a plan holds at least one)
Buffer = TypeVar("Buffer", cuda_buffers.PinnedBuffer, cuda_buffers.DeviceBuffer)


def profile_violations(
    shapes: dict[str, tuple[int, ...]], ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
) -> list[str]:
    """For each scorer input with a dynamic dimension (`ranges`: name -> (min shape, max shape) of the profile), why
    its new shape in `shapes` does not fit; empty when every one fits. Pure, so a reload can be refused before any
    device buffer is touched."""
    wrong = []
    for name, (low, high) in ranges.items():
        shape = tuple(shapes[name])
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            wrong.append(f"{name} has shape {shape}, the plan accepts {tuple(low)}..{tuple(high)}")
    return wrong


class TensorRTEngine(Engine):
    name = "tensorrt"

    @declared
    class Options:
        """`engine.options` when `engine.backend` is tensorrt."""

        # plan file (relative to the bundle or absolute); "" picks the bundle's best match
        plan: Annotated[str, Field(strict=True)] = ""
        # with plan "": only plans of this precision (fp32, fp16, int8); "" any
        precision: Annotated[str, one_of(("", *PRECISIONS))] = ""
        device: Annotated[Int, Field(ge=0, le=MAX_DEVICE_INDEX)] = 0  # CUDA device index

    def __init__(self, bundle, options: Options, max_batch: int = 8) -> None:
        super().__init__(bundle, options, max_batch)
        trt = import_tensorrt()
        cuda_buffers.import_cudart()
        gpu_name, capability = cuda_buffers.select_device(options.device)
        self._device = cuda_buffers.DeviceBinding(options.device)
        self._device.ensure()
        self.plan_path, self.plan_info = self._choose_plan(trt.__version__, gpu_name, capability)
        self.precision = self.plan_info.precision
        self._params: dict[str, cuda_buffers.DeviceBuffer] = {}
        self._param_bound_shapes: dict[str, tuple[int, ...]] = {}
        self._buffers: list[cuda_buffers.PinnedBuffer | cuda_buffers.DeviceBuffer] = []
        self._lock = threading.Lock()
        self._closed = False
        self.stream = cuda_buffers.Stream()
        try:
            self._open(trt, max_batch)
        except RuntimeError as exc:
            # TensorRT's bindings raise RuntimeError where its C++ API reports an error: one line, like the rest.
            self.close()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{self.plan_path}: TensorRT refused it ({reason})") from exc
        except BaseException:
            self.close()
            raise

    def _open(self, trt, max_batch: int) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine: Any = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.plan_path}: TensorRT could not deserialize the plan (see the log above)")
        self._check_io(trt)
        self._param_shapes = {
            name: [d if d >= 0 else "dynamic" for d in self.engine.get_tensor_shape(name)]
            for name in self.bundle.scorer_inputs
        }
        # (min shape, max shape) in the profile of every scorer input with a dynamic dimension
        self._param_ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for name, shape in self._param_shapes.items():
            if "dynamic" in shape:
                low, _, high = self.engine.get_tensor_profile_shape(name, PROFILE)
                self._param_ranges[name] = (tuple(low), tuple(high))
        self.context: Any = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT create_execution_context failed (out of GPU memory?)")
        height, width, _ = self.input_shape
        self.host_pixels = self._own(cuda_buffers.PinnedBuffer((max_batch, *self.input_shape), np.uint8))
        self.host_score = self._own(cuda_buffers.PinnedBuffer((max_batch,), np.float32))
        self.host_map = self._own(cuda_buffers.PinnedBuffer((max_batch, height, width), np.float32))
        self.pixels = self._own(cuda_buffers.DeviceBuffer(self.host_pixels.nbytes))
        self.score = self._own(cuda_buffers.DeviceBuffer(self.host_score.nbytes))
        self.anomaly_map = self._own(cuda_buffers.DeviceBuffer(self.host_map.nbytes))
        for name, buffer in ((PIXELS, self.pixels), (OUTPUTS[0], self.score), (OUTPUTS[1], self.anomaly_map)):
            if not self.context.set_tensor_address(name, buffer.ptr):
                raise EngineError(f"TensorRT set_tensor_address({name!r}) refused")
        self.set_scorer_params(self.bundle.scorer_params())

    @classmethod
    def check_bundle(cls, bundle, options: Options) -> None:
        # Which plan `plan: ""` picks depends on the GPU and TensorRT here: only a named plan is checked without them.
        if options.plan:
            cls._named_plan(bundle, options)

    @staticmethod
    def _named_plan(bundle, options: Options) -> Path:
        plan = Path(options.plan)
        plan = plan if plan.is_absolute() else bundle.path / plan
        if not plan.is_file():
            raise BundleError(f"engine.options.plan: {plan} does not exist, expected a plan from inspectd build-engine")
        return plan

    def _own(self, buffer: Buffer) -> Buffer:
        self._buffers.append(buffer)
        return buffer

    def _choose_plan(self, tensorrt_version: str, gpu_name: str, capability: str) -> tuple[Path, PlanInfo]:
        if not self.options.plan:
            return pick_plan(
                self.bundle,
                tensorrt_version=tensorrt_version,
                gpu_name=gpu_name,
                compute_capability=capability,
                max_batch=self.max_batch,
                precision=self.options.precision,
            )
        plan = self._named_plan(self.bundle, self.options)
        info = read_sidecar(plan.with_name(Path(sidecar_name(plan.name)).name))
        check_compatible(
            info,
            plan,
            self.bundle.path,
            tensorrt_version=tensorrt_version,
            gpu_name=gpu_name,
            compute_capability=capability,
            graph_sha256=self.bundle.manifest["files"][self.bundle.manifest["graph"]],
            max_batch=self.max_batch,
        )
        return plan, info

    def _check_io(self, trt) -> None:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        expected = [PIXELS, *self.bundle.scorer_inputs]
        if sorted(inputs) != sorted(expected) or sorted(outputs) != sorted(OUTPUTS):
            raise EngineError(
                f"{self.plan_path}: engine tensors in {inputs} out {outputs}, expected in {expected} "
                f"out {list(OUTPUTS)}"
            )
        for name in names:
            want = trt.uint8 if name == PIXELS else trt.float32
            if engine.get_tensor_dtype(name) != want:
                raise EngineError(
                    f"{self.plan_path}: tensor {name!r} is {engine.get_tensor_dtype(name)}, expected {want}"
                )

    # ------------------------------------------------------------------------------------------------ parameters
    def set_scorer_params(self, params: dict[str, np.ndarray]) -> None:
        """Validate every new array against the graph and the plan's profile, then swap: a refused reload leaves the
        engine exactly as it was, still running on the old parameters."""
        if self._closed:  # before any device allocation
            raise EngineError(f"{self.plan_path}: engine closed")
        checked = check_scorer_params(params, self._param_shapes)
        wrong = profile_violations({name: value.shape for name, value in checked.items()}, self._param_ranges)
        if wrong:
            raise BundleError(
                f"scorer params: {'; '.join(wrong)}: rebuild the plan with "
                f"`{rebuild_command(self.bundle.path, self.plan_info)}` after the refit"
            )
        self._device.ensure()
        fresh: dict[str, cuda_buffers.DeviceBuffer] = {}
        try:
            # Uploaded into new buffers while the old ones are still bound: nothing the context reads changes yet.
            for name, value in checked.items():
                fresh[name] = cuda_buffers.DeviceBuffer(value.nbytes)
                cuda_buffers.upload_blocking(fresh[name], value)
        except BaseException:
            for buffer in fresh.values():
                buffer.close()
            raise
        with self._lock:
            if self._closed:  # closed while the new parameters were uploading
                for buffer in fresh.values():
                    buffer.close()
                raise EngineError(f"{self.plan_path}: engine closed")
            try:
                self.stream.synchronize()  # no batch may be reading the old parameters while they are swapped
                self._bind_params(fresh, {name: value.shape for name, value in checked.items()})
            except BaseException:
                # A CUDA error, or TensorRT refused a binding the checks above allowed: back to the old buffers,
                # which are intact, and the new ones freed.
                try:
                    self._bind_params(self._params, self._param_bound_shapes)
                finally:
                    for buffer in fresh.values():
                        buffer.close()
                raise
            old, self._params = self._params, fresh
            self._param_bound_shapes = {name: value.shape for name, value in checked.items()}
            for buffer in old.values():
                buffer.close()

    def _bind_params(self, buffers: dict, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, buffer in buffers.items():
            if not self.context.set_tensor_address(name, buffer.ptr):
                raise EngineError(f"TensorRT set_tensor_address({name!r}) refused")
            if name in self._param_ranges and not self.context.set_input_shape(name, tuple(shapes[name])):
                raise EngineError(f"TensorRT set_input_shape({name!r}, {tuple(shapes[name])}) refused")

    # ------------------------------------------------------------------------------------------------ inference
    def infer(self, pixels: np.ndarray) -> InferenceResult:
        check_pixels(pixels, self.input_shape, self.max_batch)
        self._device.ensure()
        count = pixels.shape[0]
        with self._lock:
            if self._closed:  # close() frees the buffers below
                raise EngineError(f"{self.plan_path}: engine closed")
            # Before anything is enqueued: a refusal here leaves nothing running on the stream.
            if not self.context.set_input_shape(PIXELS, pixels.shape):
                raise EngineError(f"TensorRT set_input_shape({PIXELS!r}, {pixels.shape}) refused")
            np.copyto(self.host_pixels.array[:count], pixels)
            stream = self.stream
            try:
                stream.upload(self.pixels, self.host_pixels.array, pixels.nbytes)
                if not self.context.execute_async_v3(stream.address):
                    raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log)")
                stream.download(self.host_score.array, self.score, count * 4)
                stream.download(self.host_map.array, self.anomaly_map, self.host_map.array[:count].nbytes)
            finally:
                # Also when an enqueue failed: the upload may still be reading the pinned buffer, which the next
                # batch's copyto would overwrite under it.
                stream.synchronize()
            # Copies: the pinned buffers are overwritten by the next batch.
            return InferenceResult(self.host_score.array[:count].copy(), self.host_map.array[:count].copy())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._device.ensure()
        with self._lock:
            if self.stream.handle is not None:
                self.stream.synchronize()
            self.context = None
            for buffer in [*self._buffers, *self._params.values()]:
                buffer.close()
            self._buffers = []
            self._params = {}
            self.stream.close()
            self.engine = None
