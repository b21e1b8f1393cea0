"""CUDA memory and streams through cuda-python's runtime bindings, owned by the TensorRT backend.

Everything is allocated once (pinned host buffers viewed as numpy arrays, device buffers, a stream) and freed by
`close()`; the hot path only enqueues copies. The bindings come from the `cuda-bindings` package
(`cuda.bindings.runtime`, pinned per CUDA major by the gpu-cu12 / gpu-cu13 extras: a 13.x build needs a CUDA 13
driver); releases of cuda-python before 12.6 exposed the same module as `cuda.cudart`, which is accepted too.
Every call returns `(cudaError_t, *values)`; `call` turns a failure into one EngineError line naming the CUDA
function and the error.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from engines.bundle.plans import INSTALL_HINT
from engines.errors import EngineError

_cudart = None


def import_cudart():
    """The cuda-python runtime module, or EngineError saying what is missing and how to install it."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError as exc:
                raise EngineError(f"cuda-python is not installed ({exc}): {INSTALL_HINT}") from exc
        _cudart = cudart
    return _cudart


def call(result, what: str):
    """Unwrap a cuda-python `(err, *values)` tuple: the value(s), or EngineError naming `what` and the error."""
    cudart = import_cudart()
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        name = name.decode() if isinstance(name, bytes) else str(err)
        raise EngineError(f"CUDA {what}: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def select_device(index: int) -> tuple[str, str]:
    """Make device `index` current for this thread; returns (GPU name, compute capability "major.minor")."""
    cudart = import_cudart()
    count = call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount (is an NVIDIA driver installed?)")
    if not 0 <= index < count:
        raise EngineError(f"engine.options.device: {index}, expected 0..{count - 1} ({count} CUDA device(s))")
    call(cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
    props = call(cudart.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


class DeviceBinding:
    """Keeps `index` the current device of every thread that uses it. CUDA's current device is per thread, and the
    daemon opens the engine in one thread and infers in another: a stream of device 1 used from a thread still on
    device 0 fails. One cudaSetDevice per thread, then nothing."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._local = threading.local()

    def ensure(self) -> None:
        if not getattr(self._local, "bound", False):
            call(import_cudart().cudaSetDevice(self.index), f"cudaSetDevice({self.index})")
            self._local.bound = True


class PinnedBuffer:
    """Page-locked host memory (so async copies really are async), seen as one numpy array of fixed shape."""

    def __init__(self, shape: tuple[int, ...], dtype) -> None:
        cudart = import_cudart()
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.ptr = call(cudart.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})")
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=self.dtype).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            del self.array  # the view must not outlive the pinned memory it points into
            call(import_cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = call(import_cudart().cudaMalloc(max(1, self.nbytes)), f"cudaMalloc({self.nbytes})")

    def close(self) -> None:
        if self.ptr:
            call(import_cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class Stream:
    """A non-blocking stream: no implicit synchronisation with the legacy default stream."""

    def __init__(self) -> None:
        cudart = import_cudart()
        self.handle = call(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def address(self) -> int:
        """The raw cudaStream_t, as TensorRT's execute_async_v3 takes it."""
        return int(self.handle)

    def upload(self, device: DeviceBuffer, host: np.ndarray, nbytes: int) -> None:
        cudart = import_cudart()
        call(
            cudart.cudaMemcpyAsync(
                device.ptr, host.ctypes.data, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle
            ),
            "cudaMemcpyAsync H2D",
        )

    def download(self, host: np.ndarray, device: DeviceBuffer, nbytes: int) -> None:
        cudart = import_cudart()
        call(
            cudart.cudaMemcpyAsync(
                host.ctypes.data, device.ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle
            ),
            "cudaMemcpyAsync D2H",
        )

    def synchronize(self) -> None:
        call(import_cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            call(import_cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


def upload_blocking(device: DeviceBuffer, host: np.ndarray) -> None:
    """Synchronous copy for rare uploads (scorer parameters) from ordinary, pageable memory."""
    cudart = import_cudart()
    host = np.ascontiguousarray(host)
    if host.nbytes > device.nbytes:
        raise EngineError(f"upload of {host.nbytes} bytes into a {device.nbytes}-byte device buffer")
    call(
        cudart.cudaMemcpy(device.ptr, host.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice),
        "cudaMemcpy H2D",
    )
    # From pageable memory cudaMemcpy may return before the DMA lands, and the engine's non-blocking stream does not
    # order against it: wait, so the next batch reads the new parameters.
    call(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
