"""SLA (Hu and Wang): a CutPaste-family pretext classification trained with soft labels, then a Gaussian density.

Pretext task: classes (normal, CutPaste, Scar), the CPS task. A transformed sample's target puts its SLA soft label
y (engines.data.defects.soft_label) on its transformation's class and 1 - y on normal, so an invalid transformation (a
paste that changed nothing) is trained as normal instead of as a wrong "defect". Half of every batch is transformed
(b ~ Bernoulli(0.5)). SGD momentum 0.9, lr 0.03, weight decay 3e-5, one cosine decay, batch 64.

Two heads share the learned features:
- image level (CPS): global average pool -> linear -> 3 classes;
- localisation (CutPaste-Fusion): the paper classifies 32 px patches at stride 4. Here that is dense: a 1x1
  classifier on every feature location, each location's soft label computed by SLA over its own cell (changed pixels
  of the cell / the cell's area), which is what the patch-wise task gives at the feature grid's stride without
  running the network once per patch (far too slow on a CPU).

Deviation for the CPU: the ImageNet backbone is frozen and its taps are cached once per image and once for a fixed
pool of transformed variants (engines.model.methods.cached); what learns is a feature head on the concatenated taps
(1x1 convolutions + BatchNorm + ReLU). `--sla-regenerate` redraws the pool every epoch.

Scoring (the main task): a Gaussian on the learned feature maps (per-location mean, one Ledoit-Wolf shrunk precision),
Mahalanobis distance per location -> upsampled, smoothed map; the image score is the map's maximum.
"""

from __future__ import annotations

import argparse
import math
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
    gib,
    machine_memory,
    pool_bytes,
    tap_bytes,
)

CLASSES = ("normal", "cutpaste", "scar")
FEATURE_DIM = 128
LEARNING_RATE = 0.03
MOMENTUM = 0.9
WEIGHT_DECAY = 3e-5


class SlaHead(nn.Module):
    """taps -> learned features [N, D, h, w] (forward); the two pretext classifiers are training-only."""

    def __init__(self, tap_channels: list[int], dim: int) -> None:
        super().__init__()
        self.concat = TapConcat()
        in_channels = sum(tap_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 2 * dim, 1, bias=False),
            nn.BatchNorm2d(2 * dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * dim, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.image_classifier = nn.Linear(dim, len(CLASSES))
        self.dense_classifier = nn.Conv2d(dim, len(CLASSES), 1)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return self.features(self.concat(taps))


def soft_targets(kind: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """[..., 3] targets: y on the transformation's class, 1 - y on normal (kind 0 = normal gets [1, 0, 0])."""
    target = torch.zeros(kind.shape + (len(CLASSES),), dtype=torch.float32)
    target.scatter_(-1, kind.unsqueeze(-1), label.unsqueeze(-1))
    target[..., 0] += 1.0 - label
    return target


def cell_labels(changed: np.ndarray, grid: tuple[int, int], alpha: float = defects.SLA_ALPHA) -> torch.Tensor:
    """SLA per feature cell: V' = changed pixels in the cell / cell area, y = 2 / (1 + exp(-alpha V')) - 1."""
    fraction = F.adaptive_avg_pool2d(torch.from_numpy(changed).unsqueeze(1).float(), grid).squeeze(1)
    return 2.0 / (1.0 + torch.exp(-alpha * fraction)) - 1.0


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, dim: int) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=dim)).sum(dim=dim).mean()


class SlaMethod(Method):
    name = "sla"
    default_scorer = "gaussian"
    default_backbone = "lite0"
    default_epochs = 5  # CPU budget (the paper: 256 epochs on a GPU)
    default_batch = 64

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("sla")
        group.add_argument("--sla-lr", type=float, help="SGD learning rate (0.03)")
        group.add_argument("--sla-dim", type=int, help=f"learned feature channels (default {FEATURE_DIM})")
        group.add_argument(
            "--sla-pool",
            type=int,
            help="transformed variants drawn per training image, taps cached once (default 2)",
        )
        group.add_argument(
            "--sla-regenerate",
            action="store_true",
            default=None,
            help="redraw the transformed pool (and recompute its taps) every epoch",
        )
        group.add_argument(
            "--sla-hard-labels",
            action="store_true",
            default=None,
            help="ablation: hard labels (y = 1 for every transformed sample) instead of SLA",
        )

    def head_config(self, args: argparse.Namespace | None) -> dict[str, Any]:
        dim = int(flag(args, "sla_dim", FEATURE_DIM))
        if dim < 1:
            raise ValueError(f"--sla-dim {dim}: expected an integer >= 1")
        _check_dim(dim)
        return {"dim": dim}

    def build_head(self, backbone: nn.Module, config: dict[str, Any]) -> nn.Module:
        return SlaHead(list(backbone.channels), int(config.get("dim", FEATURE_DIM)))

    def check_args(self, args: argparse.Namespace | None) -> None:
        _rate_and_pool(args)

    def train(self, graph: nn.Module, images: np.ndarray, settings: TrainSettings, progress) -> None:
        args = settings.args
        lr, per_image = _rate_and_pool(args)
        regenerate = bool(flag(args, "sla_regenerate", False))
        hard = bool(flag(args, "sla_hard_labels", False))
        head: SlaHead = graph.head
        for p in graph.backbone.parameters():
            p.requires_grad_(False)
        graph.eval()
        n = len(images)
        if settings.epochs == 0 or n == 0:
            return
        rng = np.random.default_rng(settings.seed)
        mix = {name: 1.0 / (len(CLASSES) - 1) for name in CLASSES[1:]}
        # Half of every batch transformed: each step takes `half` clean images and `half` pool variants.
        half = max(1, min(settings.batch // 2, n))
        per_image_taps, shapes = tap_bytes(graph, images)
        cells = shapes[0][1] * shapes[0][2]  # TapConcat brings every tap to the first one's grid
        _check_dim(head.features[3].out_channels, sum(s[0] for s in shapes), 2 * half * cells)
        # Per variant: its dense targets (made [h, w, 3], then copied to [3, h, w]) and its cell labels, float32.
        extra = (2 * len(CLASSES) + 1) * cells * 4
        per_variant, fixed = pool_bytes(images, per_image_taps, extra, regenerate)
        check_fits("--sla-pool", per_image, n * per_variant, fixed, f"the transformed pool of {n} images")

        clean = backbone_taps(graph, images, 32, progress, "clean taps")
        grid = tuple(clean[0].shape[-2:])
        pool = self._pool(graph, images, rng, mix, per_image, grid, hard, progress)
        steps_per_epoch = -(-n // half)
        total = steps_per_epoch * settings.epochs
        params = [p for p in head.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        normal_image = soft_targets(torch.zeros(half, dtype=torch.long), torch.zeros(half))
        normal_dense = soft_targets(torch.zeros((half,) + grid, dtype=torch.long), torch.zeros((half,) + grid)).permute(
            0, 3, 1, 2
        )
        progress.start(total, "sla")
        step = 0
        try:
            for epoch in range(settings.epochs):
                if regenerate and epoch > 0:
                    # A redraw belongs to the training phase: its own line would take over the training's step/total.
                    pool = self._pool(graph, images, rng, mix, per_image, grid, hard, None)
                head.train()
                order = torch.from_numpy(rng.permutation(n))
                for start in range(0, n, half):
                    clean_idx = order[start : start + half]
                    variant = torch.from_numpy(rng.integers(0, len(pool["kind"]), len(clean_idx)))
                    b = len(clean_idx)
                    taps = [torch.cat([c[clean_idx], p[variant]]) for c, p in zip(clean, pool["taps"])]
                    features = head(taps)
                    image_target = torch.cat([normal_image[:b], pool["image_target"][variant]])
                    dense_target = torch.cat([normal_dense[:b], pool["dense_target"][variant]])
                    loss = soft_cross_entropy(
                        head.image_classifier(features.mean(dim=(2, 3))), image_target, 1
                    ) + soft_cross_entropy(head.dense_classifier(features), dense_target, 1)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    step += 1
                    progress.update(step, check_loss(loss, "--sla-lr", lr, epoch, settings.epochs))
            check_not_collapsed(head, clean, "--sla-lr", lr)
        finally:
            graph.eval()

    @staticmethod
    def _pool(
        graph,
        images: np.ndarray,
        rng: np.random.Generator,
        mix: dict[str, float],
        per_image: int,
        grid: tuple[int, int],
        hard: bool,
        progress,
    ) -> dict[str, torch.Tensor]:
        """Draw the transformed pool, cache its taps and its image- and cell-level soft targets."""
        pool = DefectPool.draw(images, rng, mix, per_image)
        kind = torch.from_numpy(np.array([CLASSES.index(pool.kinds[k]) for k in pool.kind]))
        label = torch.ones(len(kind)) if hard else torch.from_numpy(pool.label)
        cells = cell_labels(pool.changed, grid)
        if hard:
            cells = (cells > 0).float()
        dense_kind = kind.view(-1, 1, 1).expand_as(cells)
        return {
            "taps": backbone_taps(graph, pool.images, 32, progress, "transformed taps"),
            "kind": kind,
            "image_target": soft_targets(kind, label),
            # [M, 3, h, w]: class axis where cross-entropy over a conv's logits wants it.
            "dense_target": soft_targets(dense_kind, cells).permute(0, 3, 1, 2).contiguous(),
        }


def _rate_and_pool(args: argparse.Namespace | None) -> tuple[float, int]:
    """--sla-lr and --sla-pool, or ValueError naming the flag (a NaN rate would train the head to NaN)."""
    lr = float(flag(args, "sla_lr", LEARNING_RATE))
    per_image = int(flag(args, "sla_pool", 2))
    if per_image < 1:
        raise ValueError(f"--sla-pool {per_image}: expected an integer >= 1")
    check_pool_flag("--sla-pool", per_image)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--sla-lr {lr}: expected a finite learning rate > 0")
    return lr, per_image


def _check_dim(dim: int, in_channels: int = 0, activations: int = 0) -> None:
    """ValueError naming --sla-dim when the head cannot be held: its two 1x1 convolutions (in_channels x 2 dim and
    2 dim x dim float32 weights, each with its gradient and SGD momentum) and one step's activations (about six maps
    of `dim` channels over `activations` sample cells, float32). Before the images are read in_channels and
    activations are unknown (0): the second convolution alone, which is what grows with dim^2."""
    memory = machine_memory()
    a, b = 2 * 4 * 3, 2 * 4 * 3 * in_channels + 6 * 4 * activations  # bytes = a dim^2 + b dim
    needed = a * dim * dim + b * dim
    if memory and needed > memory:
        largest = int((-b + math.sqrt(b * b + 4 * a * memory)) / (2 * a))
        raise ValueError(
            f"--sla-dim {dim}: the feature head would need about {gib(needed)} to train, more than this machine's "
            f"{gib(memory)}; expected at most {largest}"
        )
