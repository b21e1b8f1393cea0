"""The one small interface every runtime backend implements, and the argument checks they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import numpy as np

from engines.errors import EngineError
from engines.schema import declared, validate

# The most threads an engine option may ask for: far more than a station has cores. Each is started at session
# creation or the first batch, long after the config loaded, and the runtimes take a C int (2**31 failed there with a
# traceback that named no key).
MAX_THREADS = 1024
# The highest CUDA device index a backend takes: torch keeps an index in a signed byte and wraps a larger one without
# a word (cuda:128 becomes cuda:-128), and no process sees anywhere near that many GPUs. One past the GPUs present is
# refused when an engine opens.
MAX_DEVICE_INDEX = 127


class InferenceResult(NamedTuple):
    scores: np.ndarray  # float32 [N]: image anomaly score per frame
    maps: np.ndarray  # float32 [N, H, W]: anomaly map at the model's input size


@declared
class NoOptions:
    pass


class Engine(ABC):
    """Runs one bundle's graph. Subclasses set `name` and `Options`: the declaration (engines.schema.declared) of
    their options, each with a default, so that a config's `engine.options` is checked by the backend it names when
    the config loads, not when the engine opens."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # The arithmetic the scores come from: "fp32", or "fp16"/"int8" for a reduced-precision graph or plan, whose
    # scores may move away from the FP32 ones the thresholds were set on (engines.runtime.score_shift).
    precision: str = "fp32"

    def __init__(self, bundle, options, max_batch: int = 8) -> None:
        self.bundle = bundle
        self.options = options
        self.max_batch = max_batch

    @classmethod
    def parse_options(cls, raw: dict[str, Any], where: str = "options") -> Any:
        """`raw` (a plain mapping, as YAML gives it) as this backend's `Options`; EngineError naming the key."""
        return validate(cls.Options, raw, where=where, error=EngineError)

    @classmethod
    def check_bundle(cls, bundle, options) -> None:
        """BundleError when `bundle` lacks a file these `options` need (an FP16 graph, a named plan), decided without
        opening anything: `inspectd run --check` asks here, and opening the engine refuses through the same code."""

    @classmethod
    def needs_device(cls, options) -> bool:
        """Whether opening an engine with these `options` needs a GPU, which `inspectd run --check` does not
        assume is there yet (the start waits for it): where it does not, --check opens the engine as the start
        does."""
        return True

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the uint8 frames `infer` takes."""
        return self.bundle.input_shape

    @abstractmethod
    def infer(self, pixels: np.ndarray) -> InferenceResult:
        """pixels: uint8 [N, H, W, C] with N <= max_batch, C-contiguous."""

    @abstractmethod
    def set_scorer_params(self, params: dict[str, np.ndarray]) -> None:
        """Swap the scorer parameters (references, Gaussian mean and precision) without rebuilding anything."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_pixels(pixels, input_shape: tuple[int, int, int], max_batch: int) -> None:
    """One-line EngineError unless `pixels` is C-contiguous uint8 [N, H, W, C] with 1 <= N <= max_batch."""
    if not isinstance(pixels, np.ndarray):
        raise EngineError(f"pixels: {type(pixels).__name__}, expected a numpy array uint8 [N, H, W, C]")
    if pixels.dtype != np.uint8:
        raise EngineError(f"pixels: dtype {pixels.dtype}, expected uint8")
    expected = (*input_shape,)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
        raise EngineError(f"pixels: shape {tuple(pixels.shape)}, expected [N, {', '.join(map(str, expected))}]")
    if not 1 <= pixels.shape[0] <= max_batch:
        raise EngineError(f"pixels: batch {pixels.shape[0]}, expected 1..{max_batch} (max_batch)")
    if not pixels.flags.c_contiguous:
        raise EngineError("pixels: not C-contiguous, expected a contiguous batch buffer")


def check_scorer_params(params: dict[str, np.ndarray], expected: dict[str, list]) -> dict[str, np.ndarray]:
    """float32 C-contiguous copies of `params`, checked against the graph's input shapes (str = dynamic).

    Always copies: the backends bind these arrays without copying (ONNX Runtime, torch.from_numpy), so an array the
    caller still holds and later writes would change the running engine past these checks."""
    # The bundle's scorer.npz where they were read from one (engines.bundle.store.ScorerParams), not a refit's.
    where = getattr(params, "source", "scorer params")
    checked = {}
    for name, shape in expected.items():
        if name not in params:
            raise EngineError(f"{where}: {name!r} missing, expected {', '.join(expected)}")
        value = np.array(params[name], dtype=np.float32, order="C", copy=True)
        if value.ndim != len(shape) or any(isinstance(d, int) and d != v for d, v in zip(shape, value.shape)):
            raise EngineError(f"{where}: {name} has shape {tuple(value.shape)}, expected {list(shape)}")
        if 0 in value.shape:
            raise EngineError(f"{where}: {name} has shape {tuple(value.shape)}, expected at least one row")
        if not np.isfinite(value).all():  # every frame would score NaN: refused before it replaces a running model
            raise EngineError(f"{where}: {name} holds NaN or infinity, expected finite numbers")
        checked[name] = value
    return checked
