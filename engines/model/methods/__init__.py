"""Training methods: how a bundle's head is built and trained. Adding a method is one module plus one line in METHODS.

A method turns backbone taps into the feature map the scorer compares ([N, D, h, w]) and, if it learns anything,
trains that head (and optionally the backbone) from defect-free images. Everything else -- data loading, holding out
images, fitting the scorer, thresholds, the bundle, ONNX export -- is `engines.training.train`'s, identical for every
method.

Contract (see `Method`):
- `build_head(backbone, config)` -> nn.Module mapping `list[Tensor]` taps to features [N, D, h, w]. It is called both
  at training time and when a runtime rebuilds the graph from a bundle, with the same JSON-able `config` (what
  `head_config(args)` returned). Modules used only for training (a decoder, a classifier) may live in the head; they
  are saved with the weights but must not be used by `forward`. A head whose grid stops short of the frame's borders
  sets `map_inset` to that margin in cells of the finest tap (engines.model.graph.MapUpsampling).
- `train(graph, images, settings, progress)` trains `graph` in place from `images` (uint8 [N, H, W, C] at the model's
  input size, already fitted with engines.runtime.preprocess.fit_frame). It must leave `graph.eval()`-ready weights
  when it returns or when KeyboardInterrupt escapes from it (train.py then fits the scorer with the weights so far and
  marks the bundle interrupted). Report with `progress.update(step, loss)`; `progress.total` is set by the method via
  `progress.start(total_steps)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any, ClassVar

import numpy as np
from torch import nn

# method name -> "module:Class"
METHODS: dict[str, str] = {
    "frozen": "engines.model.methods.frozen:FrozenMethod",
    "cse": "engines.model.methods.cse:CseMethod",
    "sla": "engines.model.methods.sla:SlaMethod",
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What every method may read from `inspectd train`; `args` holds the method's own flags (add_arguments)."""

    epochs: int
    batch: int
    seed: int
    device: str = "cpu"
    args: argparse.Namespace | None = None


class Method:
    """Base of every training method. Subclasses set `name` and override what they need."""

    name: ClassVar[str]
    default_scorer: ClassVar[str] = "kmeans"
    default_backbone: ClassVar[str] = "lite0"
    default_epochs: ClassVar[int] = 0
    default_batch: ClassVar[int] = 8

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's own flags to `inspectd train`: prefixed with the method name (--cse-lr) and defaulting to
        None (read with `flag`), so train can tell which were given and refuse them where no recipe uses the method."""

    def head_config(self, args: argparse.Namespace | None) -> dict[str, Any]:
        """JSON-able configuration of the head, stored in the manifest and given back to build_head."""
        return {}

    def check_args(self, args: argparse.Namespace | None) -> None:
        """ValueError naming the flag for any of this method's own flags it would refuse in `train`: called before
        any image is read, so a typo costs no decoding and fitting."""

    def build_head(self, backbone: nn.Module, config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def train(self, graph: nn.Module, images: np.ndarray, settings: TrainSettings, progress) -> None:
        """Default: nothing to learn."""


def flag(args: argparse.Namespace | None, name: str, default: Any) -> Any:
    """A method's flag `name` from `args`, `default` where it was not given. The flags are declared with default None,
    so that train can tell one given at its default value from one not given (and refuse it where no recipe trains
    with the method)."""
    value = getattr(args, name, None)
    return default if value is None else value


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r}: expected one of {', '.join(METHODS)}")
    module_name, class_name = METHODS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ValueError(f"method {name!r}: not available in this build ({module_name} is missing)") from exc
    return getattr(module, class_name)()


def available_methods() -> list[type[Method]]:
    """Method classes whose modules import (for registering their flags)."""
    found = []
    for name in METHODS:
        try:
            found.append(type(get_method(name)))
        except ValueError:
            continue
    return found
