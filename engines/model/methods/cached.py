"""What lets a learned head train on CPU: the frozen backbone's taps computed once per image, and a fixed pool of
synthetic-defect variants (with their SLA soft labels and masks) whose taps are computed once too.

CSE and SLA both train only a small head on top of frozen taps, so every epoch after the first costs the head alone.
The pool can be redrawn (and its taps recomputed) every epoch when more defect variety is worth the backbone passes.
"""

from __future__ import annotations

import dataclasses

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
