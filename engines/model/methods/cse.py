"""CSE (Thomine and Snoussi, VISAPP 2024): a contrastively selected embedding of frozen backbone taps.

Head: the stride-32 tap upsampled x2 and concatenated with the stride-16 tap (TapConcat), three 1x1 convolutions
C -> C/2 -> C/4 -> 64 each followed by ReLU and BatchNorm, then a 2x2 average pool: that map is what the scorer
compares. A decoder of 1x1 convolutions reconstructs each backbone tap from the embedding; it is a training-only
regulariser against a trivial embedding and `forward` never runs it.

Training: pairs (clean image i, other) where other is another clean image or a synthetic defect made from image i
(Perlin blobs with foreign texture by default). L_intra = 1 - cos(e1, e2) for clean pairs, (1 + cos(e1, e2)) / 2 for
defective ones, on the flattened pooled embeddings; L_extra = 0.5 ||normalise(decoded) - normalise(tap)||^2 per
location; loss = 10 L_intra + L_extra; Adam 4e-4 under a OneCycle schedule. The backbone is frozen, so its taps are
computed once for the clean images and once for a fixed pool of defect variants (engines.model.methods.cached); only the
head trains, which is what makes this practical on a CPU. `--cse-regenerate` redraws the pool every epoch.

Scoring is the graph's: `--scorer kmeans` is the paper's (nearest whole-image reference, per-location difference to
it). Surfaces that are not aligned from frame to frame (magnetic tiles vary in size and position) do better with
`--scorer kmeans_local --k 16`: the same references, each location compared with its nearest location in any of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines.data import defects
from engines.model.graph import TapConcat
from engines.model.methods import Method, TrainSettings, flag
from engines.model.methods.cached import (
    DefectPool,
    backbone_taps,
    check_fits,
    check_loss,
    check_not_collapsed,
    check_pool_flag,
    pool_bytes,
    tap_bytes,
)

EMBED_DIM = 64
INTRA_WEIGHT = 10.0
LEARNING_RATE = 4e-4
DEFAULT_MIX = "perlin:3,cutpaste:1,scar:1"


class CseHead(nn.Module):
    """taps -> pooled embedding [N, 64, h', w'] (forward); `decode` reconstructs the taps (training only)."""

    def __init__(self, tap_channels: list[int], widths: list[int], pool_stride: int) -> None:
        super().__init__()
        self.concat = TapConcat()
        layers: list[nn.Module] = []
        previous = sum(tap_channels)
        for width in widths:
            layers += [nn.Conv2d(previous, width, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(width)]
            previous = width
        self.embedding = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2, stride=pool_stride)
        # At stride 1 the 2x2 windows are centred on the corners between the finest grid's cells: one cell fewer a
        # side, half a cell in from each border (engines.model.graph.MapUpsampling puts the map back there). At
        # stride 2 they tile the frame.
        self.map_inset = 0.5 if pool_stride == 1 else 0.0
        self.decoder = nn.ModuleList(nn.Conv2d(previous, channels, 1) for channels in tap_channels)

    def embed_full(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """The embedding at the finest tap's grid, before pooling."""
        return self.embedding(self.concat(taps))

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return self.pool(self.embed_full(taps))

    def reconstruction_loss(self, embedding: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """L_extra: 0.5 ||normalise(decoded) - normalise(tap)||^2, channels normalised per location, averaged over
        locations; coarser taps are compared at their own resolution."""
        total = embedding.new_zeros(())
        for decoder, tap in zip(self.decoder, taps):
            decoded = decoder(embedding)
            if decoded.shape[-2:] != tap.shape[-2:]:
                decoded = F.adaptive_avg_pool2d(decoded, tap.shape[-2:])
            diff = F.normalize(decoded, dim=1) - F.normalize(tap, dim=1)
            total = total + 0.5 * diff.pow(2).sum(dim=1).mean()
        return total / len(taps)


def head_widths(in_channels: int) -> list[int]:
    """CSE's 520 -> 260 -> 130 -> 64, scaled to the backbone: halve twice, then 64."""
    return [max(EMBED_DIM, in_channels // 2), max(EMBED_DIM, in_channels // 4), EMBED_DIM]


class CseMethod(Method):
    name = "cse"
    default_scorer = "kmeans"
    default_backbone = "lite0"
    # On magnetic tile image AUROC rises with the epochs up to about 30 and barely moves beyond, up to the paper's
    # 50-100 (docs/ACCURACY.md); on cached taps 30 epochs take minutes on a CPU.
    default_epochs = 30
    default_batch = 8

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("cse")
        group.add_argument("--cse-lr", type=float, help="Adam peak learning rate (4e-4)")
        group.add_argument(
            "--cse-defects",
            help=f"synthetic defect mix name:weight,... of {', '.join(defects.DEFECTS)} (default {DEFAULT_MIX})",
        )
        group.add_argument(
            "--cse-defect-fraction",
            type=float,
            help="share of pairs whose second image is defective (default 0.5)",
        )
        group.add_argument(
            "--cse-pool",
            type=int,
            help="defect variants drawn per training image, taps cached once (default 2)",
        )
        group.add_argument(
            "--cse-regenerate",
            action="store_true",
            default=None,
            help="redraw the defect pool (and recompute its taps) every epoch",
        )
        group.add_argument(
            "--cse-pool-stride",
            type=int,
            choices=(1, 2),
            help="stride of the 2x2 average pool of the embedding: 2 as the paper, 1 keeps the "
            "stride-16 grid for finer maps (default 2)",
        )

    def head_config(self, args: argparse.Namespace | None) -> dict[str, Any]:
        return {"pool_stride": int(flag(args, "cse_pool_stride", 2))}

    def build_head(self, backbone: nn.Module, config: dict[str, Any]) -> nn.Module:
        channels = list(backbone.channels)
        return CseHead(channels, head_widths(sum(channels)), int(config.get("pool_stride", 2)))

    def check_args(self, args: argparse.Namespace | None) -> None:
        CseOptions.from_args(args)

    def train(self, graph: nn.Module, images: np.ndarray, settings: TrainSettings, progress) -> None:
        options = CseOptions.from_args(settings.args)
        for p in graph.backbone.parameters():
            p.requires_grad_(False)
        graph.eval()
        if settings.epochs == 0 or len(images) == 0:
            return
        rng = np.random.default_rng(settings.seed)
        per_image_taps, _ = tap_bytes(graph, images)
        per_variant, fixed = pool_bytes(images, per_image_taps, regenerate=options.regenerate)
        check_fits(
            "--cse-pool",
            options.per_image,
            len(images) * per_variant,
            fixed,
            f"the defect pool of {len(images)} images",
        )

        def draw_pool(shown: bool) -> list[torch.Tensor]:
            variants = DefectPool.draw(images, rng, options.mix, options.per_image).images
            # A redraw belongs to the training phase: its own line would take over the training's step/total.
            return backbone_taps(graph, variants, settings.batch * 2, progress if shown else None, "defect taps")

        clean = backbone_taps(graph, images, settings.batch * 2, progress, "clean taps")
        try:
            fit_head(graph.head, clean, draw_pool, options, settings.epochs, settings.batch, rng, progress)
            check_not_collapsed(graph.head, clean, "--cse-lr", options.lr)
        finally:
            graph.eval()


@dataclasses.dataclass(frozen=True)
class CseOptions:
    lr: float = LEARNING_RATE
    mix: dict = dataclasses.field(default_factory=lambda: defects.parse_mix(DEFAULT_MIX))
    fraction: float = 0.5  # share of pairs whose second image is defective
    per_image: int = 2  # defect variants per training image in the pool
    regenerate: bool = False  # redraw the pool every epoch

    @classmethod
    def from_args(cls, args: argparse.Namespace | None) -> CseOptions:
        options = cls(
            lr=float(flag(args, "cse_lr", LEARNING_RATE)),
            mix=_mix(flag(args, "cse_defects", DEFAULT_MIX)),
            fraction=float(flag(args, "cse_defect_fraction", 0.5)),
            per_image=int(flag(args, "cse_pool", 2)),
            regenerate=bool(flag(args, "cse_regenerate", False)),
        )
        if not 0.0 <= options.fraction <= 1.0:
            raise ValueError(f"--cse-defect-fraction {options.fraction}: expected a fraction in [0, 1]")
        if options.per_image < 1:
            raise ValueError(f"--cse-pool {options.per_image}: expected an integer >= 1")
        check_pool_flag("--cse-pool", options.per_image)
        if not (math.isfinite(options.lr) and options.lr > 0):
            raise ValueError(f"--cse-lr {options.lr}: expected a finite learning rate > 0")
        return options


def _mix(text: str) -> dict[str, float]:
    try:
        return defects.parse_mix(text)
    except ValueError as exc:
        raise ValueError(f"--cse-defects {text}: {str(exc).removeprefix(f'defect mix {text!r}: ')}") from None


def fit_head(
    head: CseHead,
    clean: list[torch.Tensor],
    draw_pool: Callable[[bool], list[torch.Tensor]],
    options: CseOptions,
    epochs: int,
    batch: int,
    rng: np.random.Generator,
    progress,
) -> None:
    """Train `head` on cached taps: `clean` [N, ...] per tap, and `draw_pool(shown)` giving the taps of
    options.per_image defect variants per clean image (variant v of image i at row i * per_image + v), with its own
    progress line when `shown`. ValueError naming --cse-lr when the loss is no longer finite."""
    n = len(clean[0])
    pool = draw_pool(True)
    batch = min(batch, n)
    total = -(-n // batch) * epochs
    optimizer = torch.optim.Adam(head.parameters(), lr=options.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=options.lr, total_steps=total)
    progress.start(total, "cse")
    step = 0
    for epoch in range(epochs):
        if options.regenerate and epoch > 0:
            pool = draw_pool(False)
        head.train()
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, batch):
            anchor = order[start : start + batch]
            defective = torch.from_numpy(rng.random(len(anchor)) < options.fraction)
            # Clean partner: another training image; defective partner: a variant of the anchor itself.
            partner = torch.from_numpy(rng.integers(0, n, len(anchor)))
            variant = anchor * options.per_image + torch.from_numpy(rng.integers(0, options.per_image, len(anchor)))
            first = [t[anchor] for t in clean]
            second = [torch.where(defective.view(-1, 1, 1, 1), p[variant], c[partner]) for c, p in zip(clean, pool)]
            loss = pair_loss(head, first, second, defective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            progress.update(step, check_loss(loss, "--cse-lr", options.lr, epoch, epochs))
    head.eval()


def pair_loss(
    head: CseHead, first: list[torch.Tensor], second: list[torch.Tensor], defective: torch.Tensor
) -> torch.Tensor:
    """10 L_intra + L_extra for a batch of pairs; one pass over both halves so BatchNorm sees clean and defective
    samples together."""
    b = len(defective)
    taps = [torch.cat([a, c]) for a, c in zip(first, second)]
    full = head.embed_full(taps)
    pooled = head.pool(full).flatten(1)
    cos = F.cosine_similarity(pooled[:b], pooled[b:], dim=1)
    intra = torch.where(defective, (1 + cos) / 2, 1 - cos).mean()
    return INTRA_WEIGHT * intra + head.reconstruction_loss(full, taps)
