"""What lets a learned head train on CPU: the frozen backbone's taps computed once per image, and a fixed pool of
synthetic-defect variants (with their SLA soft labels and masks) whose taps are computed once too.

CSE and SLA both train only a small head on top of frozen taps, so every epoch after the first costs the head alone.
The pool can be redrawn (and its taps recomputed) every epoch when more defect variety is worth the backbone passes.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from engines.data import defects


def backbone_taps(graph, images: np.ndarray, batch: int = 16, progress=None, what: str = "taps") -> list[torch.Tensor]:
    """Frozen taps [N, C_i, h_i, w_i] of uint8 [N, H, W, C] images, through the graph's own preprocessing."""
    graph.backbone.eval()
    chunks: list[list[torch.Tensor]] = []
    if progress is not None:
        progress.start(len(images), what)
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
            chunks.append(graph.backbone(graph.preprocess(pixels)))
            if progress is not None:
                progress.update(min(start + batch, len(images)))
    return [torch.cat(level) for level in zip(*chunks)]


# The smallest input train accepts: one cell of the coarsest tap stride (32) a side, one grey channel.
SMALLEST_INPUT = (32, 32, 1)


def machine_memory() -> int:
    """Bytes of physical memory: the bound a method's pool or head is checked against before it is allocated. A larger
    one cannot be held at all, so it would only end in an allocation traceback after the images were decoded."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):  # a platform without these names: nothing to check against
        return 0


def gib(n: float) -> str:
    """Bytes in binary units, from GiB up."""
    for power, unit in ((6, "EiB"), (5, "PiB"), (4, "TiB")):
        if n >= 1024**power:
            return f"{n / 1024**power:.3g} {unit}"
    return f"{n / 1024**3:.3g} GiB"


def check_fits(flag: str, value: int, unit_bytes: float, fixed_bytes: float, what: str) -> None:
    """ValueError naming `flag` when `fixed_bytes + value * unit_bytes` exceed the machine's memory, with the largest
    value that would fit."""
    memory = machine_memory()
    needed = fixed_bytes + value * unit_bytes
    if memory and fixed_bytes + unit_bytes > memory:  # not even one: no value of the flag helps
        raise ValueError(
            f"{flag} {value}: {what} would need about {gib(needed)}, and the images' own features alone about "
            f"{gib(fixed_bytes)}, more than this machine's {gib(memory)}; expected fewer images or a smaller --size"
        )
    if memory and needed > memory:
        largest = max(0, int((memory - fixed_bytes) // unit_bytes)) if unit_bytes else 0
        raise ValueError(
            f"{flag} {value}: {what} would need about {gib(needed)}, more than this machine's {gib(memory)}; "
            f"expected at most {largest}"
        )


def check_pool_flag(flag: str, per_image: int) -> None:
    """Before any image is read: refuse a pool that could not be held even for one image at the smallest input (its
    variants' pixels and changed-pixel masks alone)."""
    height, width, channels = SMALLEST_INPUT
    check_fits(flag, per_image, height * width * (channels + 1), 0, f"the variants of one {height}x{width} image")


def pool_bytes(images: np.ndarray, taps_per_image: int, extra: int = 0, regenerate: bool = False) -> tuple[int, int]:
    """(bytes per pool variant, bytes held whatever the pool) of a pool over `images` whose taps take `taps_per_image`
    bytes an image: the variant's pixels, its changed-pixel mask, its taps twice (the batches' chunks and their
    concatenation are both alive at the end of backbone_taps) and `extra` (a method's targets); once more its taps
    where the pool is redrawn, since the old pool is alive while the new one is computed. Fixed: the clean images'
    taps."""
    height, width = images.shape[1:3]
    per_variant = images[0].nbytes + height * width + (3 if regenerate else 2) * taps_per_image + extra
    return per_variant, len(images) * taps_per_image


def tap_bytes(graph, images: np.ndarray) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of one image's frozen taps and the taps' shapes [C_i, h_i, w_i], from one backbone pass on one image."""
    taps = backbone_taps(graph, images[:1])
    return sum(t[0].numel() * t.element_size() for t in taps), [tuple(t.shape[1:]) for t in taps]


@dataclasses.dataclass
class DefectPool:
    """`per_image` synthetic-defect variants of every clean image, drawn once."""

    images: np.ndarray  # uint8 [M, H, W, C]
    source: np.ndarray  # int64 [M]: index of the clean image each variant was made from
    kind: np.ndarray  # int64 [M]: index into `kinds`
    label: np.ndarray  # float32 [M]: SLA soft label of the variant against its clean image
    changed: np.ndarray  # bool [M, H, W]: pixels that changed by more than SLA's eps (what the label counts)
    kinds: tuple[str, ...]

    @classmethod
    def draw(
        cls, images: np.ndarray, rng: np.random.Generator, mix: dict[str, float], per_image: int = 1
    ) -> DefectPool:
        n = len(images)
        m = n * per_image
        kinds = tuple(mix)
        out = np.empty((m,) + images.shape[1:], dtype=np.uint8)
        changed = np.empty((m,) + images.shape[1:3], dtype=bool)
        source = np.repeat(np.arange(n), per_image)
        kind = np.empty(m, dtype=np.int64)
        label = np.empty(m, dtype=np.float32)
        eps = defects.SLA_EPS * 255.0
        for i, src in enumerate(source):
            name, defect = defects.random_defect(images[src], rng, mix)
            out[i] = defect.image
            kind[i] = kinds.index(name)
            label[i] = defects.soft_label(images[src], defect.image, defect.region_wh)
            np.greater(np.abs(images[src].astype(np.int16) - defect.image).sum(axis=2), eps, out=changed[i])
        return cls(out, source, kind, label, changed, kinds)


def diverged(flag: str, lr: float, what: str) -> ValueError:
    """The one line a diverged training ends with: a learning rate too large for the head is its usual cause, and the
    one flag that fixes it."""
    method = flag.removeprefix("--").split("-")[0]
    return ValueError(f"{flag} {lr:g}: the {method} training diverged, {what}; expected a smaller learning rate")


def check_loss(loss: torch.Tensor, flag: str, lr: float, epoch: int, epochs: int) -> float:
    """The step's loss as a float (what the progress line shows), or `diverged` once it is NaN or infinite: past that
    every weight it reaches is NaN and the scorer fails later under a thresholds message."""
    value = loss.item()
    if not math.isfinite(value):
        raise diverged(flag, lr, f"the loss became {value} at epoch {epoch + 1} of {epochs}")
    return value


def check_not_collapsed(head, clean: list[torch.Tensor], flag: str, lr: float, batch: int = 64) -> None:
    """`diverged` when the trained head maps the training images to features that are not finite or too large to
    compare, or the same in every channel at every location of every image. A head driven that far (ReLUs dead behind
    BatchNorm statistics of 1e26) scores every frame 0, so its bundle would pass anything; one pass over the cached
    taps, which a working head never fails."""
    head.eval()
    low = high = None
    with torch.inference_mode():
        for start in range(0, len(clean[0]), batch):
            features = head([t[start : start + batch] for t in clean])
            # Every scorer compares features by squared distances in float32: twice a feature's squared norm bounds
            # the distance between any two, so that must be finite too.
            if not torch.isfinite((2 * features).pow(2).sum(dim=1)).all():
                largest = features.abs().max().item()
                size = f"reach {largest:.3g}, past what float32 distances hold" if math.isfinite(largest) else ""
                raise diverged(flag, lr, f"its features on the training images {size or 'are not finite'}")
            chunk_low, chunk_high = features.amin(dim=(0, 2, 3)), features.amax(dim=(0, 2, 3))
            low = chunk_low if low is None else torch.minimum(low, chunk_low)
            high = chunk_high if high is None else torch.maximum(high, chunk_high)
    if low is not None and high is not None and bool((low == high).all()):
        raise diverged(flag, lr, "its features are constant on the training images (every frame would score 0)")
