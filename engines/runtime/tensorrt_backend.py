"""The TensorRT backend: runs a plan that `inspectd build-engine` stored in the bundle, on one NVIDIA GPU.

Two batches are in flight (Options.streams): each stream has its own execution context (bound to its own optimisation
profile, as TensorRT requires for contexts running concurrently with dynamic shapes), its own pinned host buffers and
its own device buffers, all allocated once for max_batch. While stream k computes batch k, stream k+1 uploads batch
k+1, so the PCIe copies hide behind the compute: `submit(pixels) -> ticket`, then `collect(ticket)`. The scorer
parameters live in device buffers shared by every context; `set_scorer_params` drains the streams and re-uploads them.

tensorrt and cuda-python are imported when this backend is chosen, never before; a station without them gets one line
saying what to install. Written against the TensorRT 10/11 and cuda-python documentation; see docs/GPU.md for what has
and has not run on real hardware.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np
from pydantic import Field

from engines.bundle.format import OUTPUTS, PIXELS
from engines.bundle.plans import PRECISIONS, check_compatible, import_tensorrt, pick_plan, read_sidecar, sidecar_name
from engines.errors import BundleError, EngineError
from engines.runtime import cuda_buffers
from engines.runtime.base import Engine, InferenceResult, check_pixels, check_scorer_params
from engines.schema import Int, declared, one_of

MAX_STREAMS = 8


class Ticket(NamedTuple):
    """A submitted batch: which stream runs it, how many frames, and which submission on that stream it was."""

    slot: int
    count: int
    generation: int


class _Slot:
    """One stream's worth of everything: context, stream, pinned and device buffers for max_batch frames."""

    def __init__(self, engine, index: int, max_batch: int, input_shape: tuple[int, int, int]) -> None:
        height, width, _ = input_shape
        self.buffers: list = []
        self.context = None
        self.stream = cuda_buffers.Stream()
        try:
            self.context = engine.create_execution_context()
            if self.context is None:
                raise EngineError("TensorRT create_execution_context failed (out of GPU memory?)")
            if index:
                if not self.context.set_optimization_profile_async(index, self.stream.address):
                    raise EngineError(f"TensorRT set_optimization_profile_async({index}) refused")
                self.stream.synchronize()
            self.host_pixels = self._own(cuda_buffers.PinnedBuffer((max_batch, *input_shape), np.uint8))
            self.host_score = self._own(cuda_buffers.PinnedBuffer((max_batch,), np.float32))
            self.host_map = self._own(cuda_buffers.PinnedBuffer((max_batch, height, width), np.float32))
            self.pixels = self._own(cuda_buffers.DeviceBuffer(self.host_pixels.nbytes))
            self.score = self._own(cuda_buffers.DeviceBuffer(self.host_score.nbytes))
            self.anomaly_map = self._own(cuda_buffers.DeviceBuffer(self.host_map.nbytes))
            for name, buffer in ((PIXELS, self.pixels), (OUTPUTS[0], self.score), (OUTPUTS[1], self.anomaly_map)):
                if not self.context.set_tensor_address(name, buffer.ptr):
                    raise EngineError(f"TensorRT set_tensor_address({name!r}) refused")
        except BaseException:
            self.close()
            raise
        self.generation = 0
        self.pending: Ticket | None = None

    def _own(self, buffer):
        self.buffers.append(buffer)
        return buffer

    def close(self) -> None:
        if self.stream.handle is not None:
            self.stream.synchronize()
        self.context = None
        for buffer in self.buffers:
            buffer.close()
        self.buffers = []
        self.stream.close()


class TensorRTEngine(Engine):
    name = "tensorrt"

    @declared
    class Options:
        """`engine.options` when `engine.backend` is tensorrt."""

        # plan file (relative to the bundle or absolute); "" picks the bundle's best match
        plan: Annotated[str, Field(strict=True)] = ""
        # with plan "": only plans of this precision (fp32, fp16, int8); "" any
        precision: Annotated[str, one_of(("", *PRECISIONS))] = ""
        device: Annotated[Int, Field(ge=0)] = 0  # CUDA device index
        # batches in flight; the plan needs at least this many optimisation profiles
        streams: Annotated[Int, Field(ge=1, le=MAX_STREAMS)] = 2

    def __init__(self, bundle, options: Options, max_batch: int = 8) -> None:
        super().__init__(bundle, options, max_batch)
        trt = import_tensorrt()
        cuda_buffers.import_cudart()
        gpu_name, capability = cuda_buffers.select_device(options.device)
        self._device = cuda_buffers.DeviceBinding(options.device)
        self._device.ensure()
        self.plan_path, self.plan_info = self._choose_plan(trt.__version__, gpu_name, capability)
        if self.plan_info.profiles < options.streams:
            raise BundleError(
                f"{self.plan_path}: has {self.plan_info.profiles} optimisation profile(s), "
                f"engine.options.streams is {options.streams}: rebuild with `inspectd build-engine "
                f"{bundle.path} --max-batch {self.plan_info.max_batch} --streams {options.streams}`"
            )

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.plan_path}: TensorRT could not deserialize the plan (see the log above)")
        self._check_io(trt)
        self._param_shapes = {
            name: [d if d >= 0 else "dynamic" for d in self.engine.get_tensor_shape(name)]
            for name in bundle.scorer_inputs
        }
        self._params: dict[str, cuda_buffers.DeviceBuffer] = {}
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._next = 0
        try:
            for index in range(options.streams):
                self._slots.append(_Slot(self.engine, index, max_batch, self.input_shape))
            self.set_scorer_params(bundle.scorer_params())
        except BaseException:
            self.close()
            raise

    def _choose_plan(self, tensorrt_version: str, gpu_name: str, capability: str):
        station = dict(
            tensorrt_version=tensorrt_version,
            gpu_name=gpu_name,
            compute_capability=capability,
            max_batch=self.max_batch,
        )
        if not self.options.plan:
            return pick_plan(self.bundle, precision=self.options.precision, **station)
        plan = Path(self.options.plan)
        plan = plan if plan.is_absolute() else self.bundle.path / plan
        if not plan.is_file():
            raise BundleError(f"engine.options.plan: {plan} does not exist, expected a plan from inspectd build-engine")
        info = read_sidecar(plan.with_name(Path(sidecar_name(plan.name)).name))
        graph_sha = self.bundle.manifest["files"][self.bundle.manifest["graph"]]
        check_compatible(info, plan, self.bundle.path, graph_sha256=graph_sha, **station)
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
        checked = check_scorer_params(params, self._param_shapes)
        self._device.ensure()
        with self._lock:
            # Every in-flight batch reads the old parameters: let them finish before overwriting.
            for slot in self._slots:
                slot.stream.synchronize()
            for name, value in checked.items():
                buffer = self._params.get(name)
                if buffer is None or buffer.nbytes < value.nbytes:
                    if buffer is not None:
                        buffer.close()
                    buffer = self._params[name] = cuda_buffers.DeviceBuffer(value.nbytes)
                cuda_buffers.upload_blocking(buffer, value)
                for index, slot in enumerate(self._slots):
                    self._bind_param(slot, index, name, buffer, value.shape)

    def _bind_param(self, slot: _Slot, index: int, name: str, buffer, shape: tuple[int, ...]) -> None:
        if not slot.context.set_tensor_address(name, buffer.ptr):
            raise EngineError(f"TensorRT set_tensor_address({name!r}) refused")
        if "dynamic" in self._param_shapes[name]:
            low, _, high = self.engine.get_tensor_profile_shape(name, index)
            if any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                raise BundleError(
                    f"scorer params: {name} has shape {tuple(shape)}, the plan accepts {tuple(low)}.."
                    f"{tuple(high)}: rebuild with `inspectd build-engine {self.bundle.path} "
                    f"--max-batch {self.plan_info.max_batch}`"
                )
            if not slot.context.set_input_shape(name, tuple(shape)):
                raise EngineError(f"TensorRT set_input_shape({name!r}, {tuple(shape)}) refused")

    # ------------------------------------------------------------------------------------------------ inference
    def submit(self, pixels: np.ndarray) -> Ticket:
        """Enqueue one batch (upload, execute, download) on the next stream and return at once."""
        check_pixels(pixels, self.input_shape, self.max_batch)
        self._device.ensure()
        count = pixels.shape[0]
        with self._lock:
            index = self._next
            slot = self._slots[index]
            if slot.pending is not None:
                raise EngineError(f"all {len(self._slots)} streams busy: collect() a ticket before submitting more")
            self._next = (index + 1) % len(self._slots)
            np.copyto(slot.host_pixels.array[:count], pixels)
            stream = slot.stream
            stream.upload(slot.pixels, slot.host_pixels.array, pixels.nbytes)
            if not slot.context.set_input_shape(PIXELS, pixels.shape):
                raise EngineError(f"TensorRT set_input_shape({PIXELS!r}, {pixels.shape}) refused")
            if not slot.context.execute_async_v3(stream.address):
                raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            stream.download(slot.host_score.array, slot.score, count * 4)
            stream.download(slot.host_map.array, slot.anomaly_map, slot.host_map.array[:count].nbytes)
            stream.mark_done()
            slot.generation += 1
            slot.pending = Ticket(index, count, slot.generation)
            return slot.pending

    def collect(self, ticket: Ticket) -> InferenceResult:
        """Wait for `ticket`'s batch and return its results (copies: the pinned buffers are reused next submit)."""
        slot = self._slots[ticket.slot]
        if slot.pending != ticket:
            raise EngineError(f"ticket {tuple(ticket)}: not pending (already collected or from another engine)")
        slot.stream.wait_done()
        result = InferenceResult(
            slot.host_score.array[: ticket.count].copy(), slot.host_map.array[: ticket.count].copy()
        )
        with self._lock:
            slot.pending = None
        return result

    def infer(self, pixels: np.ndarray) -> InferenceResult:
        return self.collect(self.submit(pixels))

    def close(self) -> None:
        if not self._slots and not self._params:
            return
        self._device.ensure()
        with self._lock:
            for slot in self._slots:
                slot.close()
            self._slots = []
            for buffer in self._params.values():
                buffer.close()
            self._params = {}
            self.engine = None
