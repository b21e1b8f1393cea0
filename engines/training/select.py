"""`--recipe auto`: choosing a recipe on the station's own good images, without labelled defects.

1. Validation folds (engines.data.images.validation_folds; `inspectd teach` splits an auto bundle's frames with it
   too). Some good images are held out and the rest fit each candidate. With fewer than CROSS_FIT_BELOW
   images one held-out share would be a handful of images, so the images are cross-fitted instead: CROSS_FIT_FOLDS
   folds, each image held out exactly once and fitting the others.
2. Planted defects. Into held-out images go synthetic defects of every kind in PLANTS (engines.data.defects): large
   and small, sharp and diffuse, pasted, filled and shaded. They are drawn in the frame's own coordinates, once, and
   fitted to each candidate's input like real frames, so every candidate faces the same defects. A defect with no
   pixel left at some model input (a scar across a strip's short side) is dropped, and a kind left with fewer than
   MIN_KEPT_PER_KIND defects is not planted at all; the `recipe auto:` line names every kind that lost defects, with
   how many it kept. Both are decided after the whole draw, so the same seed plants the same defects.
3. Candidates. The backbone runs once per (backbone, size, resize) group over the fitting, held-out and planted
   images (and the images' copies, step 4); each candidate then only re-runs its head, aggregation and scorer on
   those taps.
4. Metrics per candidate, per plant kind (each kind against the clean held-out images): image AUROC, pixel AUROC and
   AUPRO (engines.training.metrics); then their means over the kinds planted (step 2), so a frequent easy kind cannot
   hide a failing one.
   False alarms: the share of clean held-out images that score at or above the median planted image.
   The image score's pooling (the maximum of the map, the mean of its highest share, or its mean: SCORE_SHARES) is
   chosen per candidate here, as the one with the best mean image AUROC (ties to the sharper pool). It changes only
   the image score, so it is judged by the image metric alone; the candidate's image AUROC and false alarms are
   then those of its chosen pool.
   Copies (cross-fitted stations only). With few images a memory bank has seen each patch of the surface in few
   orientations, so each candidate is fitted on the images plus their copies turned half a turn (AUTO_AUGMENT,
   the recipe's `augment`) where the surface admits it: its clean held-out images, turned, must not stand out from
   the same images unturned when scored against the fit without copies (AUROC of turned against unturned at most
   MAX_COPY_AUROC; 0.5 = indistinguishable), and there must be at least MIN_COPY_CHECK of them for that AUROC to
   mean anything. An oriented part (a polarity mark, a connector on one side) whose turned frames stand out that
   clearly is fitted without copies: with them, a part mounted the wrong way round would pass. A candidate that
   passes is scored fitted with the copies, and its metrics are those. `--augment` skips the check.
5. The rule (`choose`), in order:
   a. reject candidates whose false-alarm share exceeds MAX_FALSE_ALARMS (unless every candidate does);
   b. keep those whose mean image AUROC is within IMAGE_TOLERANCE of the best: telling good from bad parts is the
      station's first job;
   c. of those, keep those whose mean AUPRO is within PRO_TOLERANCE of the best: maps that cover every defect, small
      ones as much as large ones;
   d. of those, the first in the catalogue's order: PatchCore's recipe, then from the sharpest maps to the widest
      context. Where the planted defects cannot tell recipes apart, the field's standard recipe is the safest guess
      (its 3x3 neighbourhood at strides 8+16 averages out single-patch texture noise and still keeps a small defect
      sharp; PatchCore's own ablation found it the best neighbourhood); after it a sharper map still localises a
      small defect, while a wide window that is not needed smears every small defect (the failure of a fixed wide
      window on object parts).
The tolerances are a few hundredths because differences below that are within the spread of the planted draw.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from engines.bundle.format import describe_score_share
from engines.data import defects
from engines.data.images import Fold, validation_folds
from engines.errors import DataError
from engines.model.graph import (
    ImageScore,
    InferenceGraph,
    LocalReferenceScorer,
    MemoryBankScorer,
    TapConcat,
    build_graph,
)
from engines.model.methods import get_method
from engines.model.recipes import SCORE_SHARES, Recipe
from engines.progress import Progress
from engines.runtime.preprocess import fit_all, fit_frame
from engines.runtime.scorer_fit import AUGMENTS, check_augment
from engines.training import metrics

PLANTED_PER_KIND = 21
# A kind with fewer of its defects left at the model input is left out, like a kind with none. One defect moves its
# kind's image AUROC by up to 1/n, so the mean over seven kinds by 1/(7n): at 11 at most 0.013, inside IMAGE_TOLERANCE;
# at 5 (scars of 100x3000 frames stretched to 320x320) 0.029, noise larger than the tolerance is set for.
MIN_KEPT_PER_KIND = 11
MAX_FALSE_ALARMS = 0.2
IMAGE_TOLERANCE = 0.02
PRO_TOLERANCE = 0.02
AUTO_AUGMENT = "rot180"
# Turned clean images may rank above unturned ones at most this often: about two standard errors above 0.5 for 18
# images against their 18 turned copies. Below MIN_COPY_CHECK images the AUROC is too noisy to tell an oriented part
# (near 1) from a symmetric surface (near 0.5), so no copies are fitted.
MAX_COPY_AUROC = 0.7
MIN_COPY_CHECK = 12
# A nearest-neighbour scorer's call holds an [images, h*w, M] float32 distance matrix and one temporary of its size
# (engines.model.graph.MemoryBankScorer), so a fixed number of images per call costs memory with the square of the
# input side: 16 images at 640x640 on a stride-8 grid against 16 384 memory vectors would need 13 GiB. score_features
# gives each search only as many images as keep that matrix within this many bytes (at least one image), so a larger
# --size costs more calls rather than more memory. A matmul of a few thousand rows already runs at full speed, so
# searches this small cost no time to speak of; 16 images fit it up to 128x128 (and 4 at 256x256).
SCORING_BUDGET = 256 * 2**20

# name -> generator(image, rng) -> Defect. Sizes span pinholes to a third of the frame.
PLANTS: dict[str, Callable[[np.ndarray, np.random.Generator], defects.Defect]] = {
    "cutpaste": defects.cutpaste,
    "cutpaste-small": partial(defects.cutpaste, area_ratio=(0.002, 0.01)),
    "scar": defects.cutpaste_scar,
    "cutout": defects.cutout,
    "cutout-small": partial(defects.cutout, area_ratio=(0.001, 0.006)),
    "perlin": defects.perlin,
    "shading": defects.shading,
}


Input = tuple[tuple[int, int, int], str]  # a model input: (height, width, channels), resize policy


@dataclasses.dataclass
class Planted:
    """Synthetic defects drawn once in frame coordinates: which held-out image, which kind; and, per model input the
    candidates use, the planted images and their masks fitted to it (the full-size frames are not kept)."""

    fold: list[int]
    source: list[int]
    kind: list[str]
    images: dict[Input, np.ndarray]  # N x H x W x C uint8
    masks: dict[Input, np.ndarray]  # N x H x W bool
    # Per kind in PLANTS: defects drawn, and those with pixels at every input (a kind below MIN_KEPT_PER_KIND is then
    # not among `kind`).
    drawn: dict[str, int] = dataclasses.field(default_factory=dict)
    kept: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.kind)

    @classmethod
    def draw(cls, frames: Sequence[np.ndarray], folds: list[Fold], seed: int, inputs: Sequence[Input]) -> Planted:
        rng = np.random.default_rng(seed + 7919)
        out = cls([], [], [], {}, {})
        images: dict[Input, list[np.ndarray]] = {i: [] for i in inputs}
        masks: dict[Input, list[np.ndarray]] = {i: [] for i in inputs}
        per_fold = math.ceil(PLANTED_PER_KIND / len(folds))
        out.drawn = {kind: per_fold * len(folds) for kind in PLANTS}
        for f, fold in enumerate(folds):
            for kind, plant in PLANTS.items():
                for j in range(per_fold):
                    source = int(fold.held[j % len(fold.held)])
                    defect = plant(frames[source], rng)
                    if not defect.mask.any():
                        continue
                    fitted = {(shape, resize): fit_mask(defect.mask, shape[:2], resize) for shape, resize in inputs}
                    # A defect thinner than half an input pixel (a scar scaled by a strip's short side) is gone
                    # once fitted: no candidate could see it, and it would count as a missed defect. Skipped after
                    # drawing it, so that the next defects are the same ones either way.
                    if not all(mask.any() for mask in fitted.values()):
                        continue
                    out.fold.append(f)
                    out.source.append(source)
                    out.kind.append(kind)
                    for shape, resize in inputs:
                        images[shape, resize].append(fit_frame(defect.image, shape, resize)[0])
                        masks[shape, resize].append(fitted[shape, resize])
        out.kept = {kind: out.kind.count(kind) for kind in PLANTS}
        # Left out once everything is drawn, so that the other kinds' defects are the same either way.
        keep = [out.kept[kind] >= MIN_KEPT_PER_KIND for kind in out.kind]
        out.fold = [v for v, k in zip(out.fold, keep) if k]
        out.source = [v for v, k in zip(out.source, keep) if k]
        out.kind = [v for v, k in zip(out.kind, keep) if k]
        images = {i: [v for v, k in zip(values, keep) if k] for i, values in images.items()}
        masks = {i: [v for v, k in zip(values, keep) if k] for i, values in masks.items()}
        out.images = {i: np.stack(v) if v else np.zeros((0, *i[0]), np.uint8) for i, v in images.items()}
        out.masks = {i: np.stack(v) if v else np.zeros((0, *i[0][:2]), bool) for i, v in masks.items()}
        return out

    def shortfall(self) -> str:
        """'scar 5 of 21 kept, fewer than 11: left out; perlin 20 of 21 kept': each kind that lost defects at the
        model input, in PLANTS' order; empty when none did."""
        return "; ".join(
            f"{kind} {self.kept[kind]} of {self.drawn[kind]} kept"
            + ("" if self.kept[kind] >= MIN_KEPT_PER_KIND else f", fewer than {MIN_KEPT_PER_KIND}: left out")
            for kind in PLANTS
            if self.kept[kind] < self.drawn[kind]
        )


@dataclasses.dataclass
class Scored:
    recipe: Recipe
    per_kind: dict[str, dict[str, float]]
    image_auroc: float
    pixel_auroc: float
    aupro: float
    false_alarms: float
    seconds: float
    # Mean image AUROC of each image-score pool tried, by share; the recipe carries the chosen one.
    pools: dict[float, float]
    # The copies check (step 4): AUROC of the turned clean held-out images against the unturned; None = not judged.
    copy_auroc: float | None
    # Out-of-fold scores and maps of the clean held-out images (the first thresholds), and the fitted parameters
    # when there was one fold (what train keeps when it is stopped in its refit on every image).
    clean_scores: np.ndarray
    clean_maps: np.ndarray
    params: dict[str, np.ndarray] | None

    def to_json(self) -> dict:
        return {
            "recipe": self.recipe.name,
            "image_auroc": round(self.image_auroc, 4),
            "pixel_auroc": round(self.pixel_auroc, 4),
            "aupro": round(self.aupro, 4),
            "false_alarms": round(self.false_alarms, 4),
            "score_share": self.recipe.score_share,
            "image_auroc_by_score": {describe_score_share(k): round(v, 4) for k, v in self.pools.items()},
            "augment": self.recipe.augment,
            "copy_auroc": None if self.copy_auroc is None else round(self.copy_auroc, 4),
            "seconds": round(self.seconds, 1),
            "per_kind": {k: {m: round(v, 4) for m, v in row.items()} for k, row in self.per_kind.items()},
        }


@dataclasses.dataclass
class Selection:
    chosen: Scored
    candidates: list[Scored]
    folds: list[Fold]
    reason: str
    # The kinds planted, in PLANTS' order: a kind left with fewer than MIN_KEPT_PER_KIND defects at the model input
    # (Planted.draw) is not among them.
    kinds: list[str]

    def to_json(self) -> dict:
        return {
            "chosen": self.chosen.recipe.name,
            "reason": self.reason,
            "rule": RULE,
            "folds": len(self.folds),
            "held_out": int(sum(len(f.held) for f in self.folds)),
            "planted_kinds": list(self.kinds),
            "candidates": [c.to_json() for c in self.candidates],
        }


RULE = (
    f"cross-fitted with at least {MIN_COPY_CHECK} images and no --augment: each candidate fitted with {AUTO_AUGMENT} "
    f"copies where its turned clean images rank above the unturned with AUROC <= {MAX_COPY_AUROC}; "
    "each candidate's image score pooled as its best mean image AUROC says; "
    f"reject false alarms > {MAX_FALSE_ALARMS}; keep mean image AUROC within {IMAGE_TOLERANCE} of the best; "
    f"of those keep mean AUPRO within {PRO_TOLERANCE} of the best; first of those in catalogue order"
)


def choose(candidates: list[Scored]) -> tuple[Scored, str]:
    """The documented rule (module docstring, step 5); candidates in catalogue order."""
    pool = [c for c in candidates if c.false_alarms <= MAX_FALSE_ALARMS] or list(candidates)
    rejected = [c.recipe.name for c in candidates if c not in pool]
    best_image = max(c.image_auroc for c in pool)
    pool = [c for c in pool if c.image_auroc >= best_image - IMAGE_TOLERANCE]
    image_ties = [c.recipe.name for c in pool]
    best_pro = max(c.aupro for c in pool)
    pool = [c for c in pool if c.aupro >= best_pro - PRO_TOLERANCE]
    chosen = pool[0]
    reason = (
        f"image AUROC {chosen.image_auroc:.3f} (best {best_image:.3f}), AUPRO {chosen.aupro:.3f} (best {best_pro:.3f})"
    )
    if len(image_ties) > 1:
        reason += f"; image AUROC within {IMAGE_TOLERANCE} of the best: {', '.join(image_ties)}"
    if len(pool) > 1:
        reason += f"; first in catalogue order of {', '.join(c.recipe.name for c in pool)}"
    if rejected:
        reason += f"; false alarms rejected {', '.join(rejected)}"
    if not any(c.false_alarms <= MAX_FALSE_ALARMS for c in candidates):
        reason += (
            f"; every candidate flags more than {MAX_FALSE_ALARMS * 100:.0f} % of clean held-out images: "
            "the guard could not choose"
        )
    return chosen, reason


def fit_mask(mask: np.ndarray, size: tuple[int, int], resize: str) -> np.ndarray:
    """A defect mask fitted like its frame (same policy), thresholded back to booleans; padding is never defect
    (fit_frame pads a frame with its mean, which for a mask over half the frame would read as defect)."""
    fitted, at = fit_frame(mask.astype(np.uint8) * 255, (size[0], size[1], 1), resize)
    out = np.zeros(size, dtype=bool)
    rows, cols = slice(at.top, at.top + at.height), slice(at.left, at.left + at.width)
    out[rows, cols] = fitted[rows, cols, 0] > 127
    return out


def select_recipe(
    frames: Sequence[np.ndarray],
    candidates: list[Recipe],
    channels: int,
    holdout: float = 0.1,
    seed: int = 0,
    batch: int = 16,
    weights: str | None = None,
    report: Callable[[str], None] | None = None,
    score_shares: Sequence[float] = SCORE_SHARES,
    augment: str | None = None,
    progress: Progress | None = None,
) -> Selection:
    """Score every candidate on planted defects in held-out frames and pick one by `choose`. `frames` are the
    training images at their own size (uint8 HxW or HxWxC), read in order per model input and at random while
    planting (engines.data.images.ImageFiles decodes each as it is read); `score_shares` the image-score pools to try
    on each candidate (one: that pool for all); `augment` the copies every candidate is fitted with, in place of
    the candidates' own (None: auto judges AUTO_AUGMENT per candidate when cross-fitting, step 4); `progress` shows
    the candidates scored so far and the time left, beside the table `report` writes."""
    progress = progress or Progress(enabled=False)
    report = partial(progress.around, report or (lambda _line: None))
    if augment is not None:
        check_augment(augment)
    folds = validation_folds(len(frames), holdout, seed)
    groups: dict[tuple, list[Recipe]] = {}
    for recipe in candidates:
        groups.setdefault((recipe.backbone, recipe.size, recipe.resize), []).append(recipe)
    inputs = list(dict.fromkeys(((size[0], size[1], channels), resize) for _, size, resize in groups))
    planted = Planted.draw(frames, folds, seed, inputs)
    if not len(planted):
        height, width = frames[int(folds[0].held[0])].shape[:2]
        fitted = ", ".join(f"{h}x{w} (HxW) {resize}" for (h, w, _), resize in inputs)
        other = "stretch" if all(resize == "pad" for _, resize in inputs) else "pad"
        lost = (
            "no planted defect keeps a pixel"
            if not any(planted.kept.values())
            else f"no plant kind keeps {MIN_KEPT_PER_KIND} defects with a pixel ({planted.shortfall()})"
        )
        raise DataError(
            f"--recipe auto: {lost} once frames {height} high and {width} wide are fitted "
            f"to the model input {fitted}, so auto cannot compare recipes: give --size HxW nearer the frames' shape "
            f"or --resize {other}, or force a recipe, e.g. --recipe patchcore"
        )
    judge = augment is None and len(folds) > 1
    if judge and len(frames) < MIN_COPY_CHECK:
        judge, augment = False, "none"
    trial = AUTO_AUGMENT if judge else augment or "none"
    shortfall = planted.shortfall()
    report(
        f"recipe auto: {len(candidates)} candidates, {len(folds)} fold(s), "
        f"{sum(len(f.held) for f in folds)} held-out images, {len(planted)} planted defects "
        f"({len(dict.fromkeys(planted.kind))} kinds{'; ' + shortfall if shortfall else ''})"
    )
    report(format_header())
    scored: list[Scored] = []
    # Counted in candidates: each group's features come before its first candidate, so the ETA includes them.
    progress.start(len(candidates), "recipe auto")
    progress.update(0)
    for (backbone, size, resize), members in groups.items():
        shape = (size[0], size[1], channels)
        taps = sorted({t for r in members for t in r.tap_indices})
        every_tap = members[0].replace(taps=tuple(2 ** (i + 1) for i in taps))
        extractor = build_graph(every_tap.architecture({}, channels), weights=weights)
        extractor.eval()
        started = time.monotonic()
        images = fit_all(frames, shape, resize)
        train_taps = _taps(extractor, images, batch)
        copy_taps = [_taps(extractor, np.ascontiguousarray(copy(images)), batch) for copy in AUGMENTS[trial]]
        del images
        planted_taps = _taps(extractor, planted.images[shape, resize], batch)
        masks = planted.masks[shape, resize]
        report(f"  features: {backbone} {size[0]}x{size[1]} {resize}, {time.monotonic() - started:.0f}s")
        for recipe in members:
            keep = [taps.index(i) for i in recipe.tap_indices]
            scored.append(
                _score_candidate(
                    recipe.replace(augment=trial),
                    judge,
                    channels,
                    train_taps,
                    copy_taps,
                    planted_taps,
                    keep,
                    planted,
                    masks,
                    folds,
                    seed,
                    batch,
                    weights,
                    score_shares,
                )
            )
            report(format_row(scored[-1]))
            progress.update(len(scored))
    progress.finish()
    order = {r.name: i for i, r in enumerate(candidates)}
    scored.sort(key=lambda s: order[s.recipe.name])
    chosen, reason = choose(scored)
    report(f"chosen: {chosen.recipe.name} ({reason})")
    return Selection(chosen, scored, folds, reason, list(dict.fromkeys(planted.kind)))


def _taps(graph, images: np.ndarray, batch: int) -> list[torch.Tensor]:
    """The backbone's taps of every image, each tap written batch by batch into one tensor (as _embed does)."""
    taps: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            for i, tap in enumerate(graph.backbone(graph.preprocess(torch.from_numpy(images[start : start + batch])))):
                if not start:
                    taps.append(torch.empty((len(images), *tap.shape[1:]), dtype=tap.dtype))
                taps[i][start : start + len(tap)] = tap
    return taps


def _embed(graph, tap_sets: list[list[torch.Tensor]], keep: list[int], index, batch: int) -> torch.Tensor:
    """Features of the images at `index` in each of `tap_sets` (the images' taps, then their copies'), one set after
    the other, written batch by batch into one tensor: a list of batches joined after would hold them twice."""
    index = torch.as_tensor(np.asarray(index, dtype=np.int64))
    n = len(index)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for t, taps in enumerate(tap_sets):
            for start in range(0, n, batch):
                features = graph.embed_taps([taps[i].index_select(0, index[start : start + batch]) for i in keep])
                if out is None:
                    out = torch.empty((n * len(tap_sets), *features.shape[1:]), dtype=features.dtype)
                out[t * n + start : t * n + start + len(features)] = features
    assert out is not None, "no images to embed"
    return out


def images_per_call(
    graph: InferenceGraph, features_shape: Sequence[int], params: dict[str, np.ndarray], budget: int = SCORING_BUDGET
) -> int | None:
    """Images of features `features_shape` [N, D, h, w] that one call of `graph`'s scorer may take so that its
    distance matrix stays within `budget` bytes (at least 1); None for a scorer without one (no limit)."""
    locations = int(features_shape[2]) * int(features_shape[3])
    if isinstance(graph.scorer, MemoryBankScorer):
        columns = params["memory_bank"].shape[0]
    elif isinstance(graph.scorer, LocalReferenceScorer):
        columns = params["references"].shape[0] * locations
    else:
        return None
    return max(1, budget // (locations * columns * 4))


def score_features(
    graph: InferenceGraph,
    features: torch.Tensor,
    params: dict[str, np.ndarray],
    batch: int,
    budget: int = SCORING_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of `features` [N, D, h, w] by `graph`'s scorer and `params`, `batch` images at a time; within
    a batch the scorer's search runs on as few images as keep its distance matrix within `budget` bytes
    (images_per_call), which changes no score."""
    tensors = [torch.from_numpy(params[name]) for name in graph.scorer_inputs]
    step = images_per_call(graph, features.shape, params, budget)
    scores, maps = [], []
    with torch.inference_mode():
        for start in range(0, len(features), batch):
            score, anomaly_map = graph.score_features(features[start : start + batch], *tensors, step=step)
            scores.append(score.numpy())
            maps.append(anomaly_map.numpy())
    return np.concatenate(scores), np.concatenate(maps)


def _score_candidate(
    recipe: Recipe,
    judge: bool,
    channels: int,
    train_taps: list[torch.Tensor],
    copy_taps: list[list[torch.Tensor]],
    planted_taps: list[torch.Tensor],
    keep: list[int],
    planted: Planted,
    masks: np.ndarray,
    folds: list[Fold],
    seed: int,
    batch: int,
    weights: str | None,
    score_shares: Sequence[float] = SCORE_SHARES,
) -> Scored:
    """`recipe.augment` names the copies in `copy_taps` (taps of the fitting images' copies, in image order); with
    `judge` they are only used if the copies check passes, else the recipe is fitted without them."""
    started = time.monotonic()
    method = get_method(recipe.method)
    graph = build_graph(recipe.architecture(method.head_config(None), channels), weights=weights)
    if not isinstance(graph.head, TapConcat):
        raise ValueError(f"recipe {recipe.name}: auto selection needs a frozen method, got {recipe.method!r}")
    graph.eval()

    def fit(fold: Fold, copies: list[list[torch.Tensor]]) -> dict[str, np.ndarray]:
        features = _embed(graph, [train_taps, *copies], keep, fold.fit, batch)
        return graph.scorer.fit(features, k=recipe.k, seed=seed, memory_size=recipe.memory_size)

    def held_out(taps: list[torch.Tensor], fits: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-fold scores and maps of the held-out images (or of their copies, by `taps`)."""
        out = [
            score_features(graph, _embed(graph, [taps], keep, fold.held, batch), p, batch)
            for fold, p in zip(folds, fits)
        ]
        return np.concatenate([s for s, _ in out]), np.concatenate([m for _, m in out])

    copy_auroc = None
    if judge and copy_taps:
        fits = [fit(fold, []) for fold in folds]
        clean_scores, maps = held_out(train_taps, fits)
        turned = np.concatenate([held_out(taps, fits)[0] for taps in copy_taps])
        labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(turned))]
        copy_auroc = metrics.auroc(labels, np.r_[clean_scores, turned])
        if copy_auroc > MAX_COPY_AUROC:
            recipe = recipe.replace(augment="none")
    if copy_auroc is None or recipe.augment != "none":
        fits = [fit(fold, copy_taps) for fold in folds]
        clean_scores, maps = held_out(train_taps, fits)
    planted_scores = np.zeros(len(planted), np.float32)
    planted_maps: list[np.ndarray | None] = [None] * len(planted)
    for f, params in enumerate(fits):
        rows = [i for i, pf in enumerate(planted.fold) if pf == f]
        if rows:
            s, m = score_features(graph, _embed(graph, [planted_taps], keep, rows, batch), params, batch)
            planted_scores[rows] = s
            for j, row in enumerate(rows):
                planted_maps[row] = m[j]
    assert all(m is not None for m in planted_maps)  # every planted image belongs to one fold and was scored there
    planted_stack = np.stack(planted_maps)  # type: ignore[arg-type]
    pools: dict[float, float] = {}
    if not graph.scorer.has_global_score:
        # The pooling only changes the image score: recompute it from the maps for every pool the recipe allows.
        pooled = {}
        for share in filter(recipe.score_share_fits, score_shares):
            pooled[share] = (_pool(maps, share, batch), _pool(planted_stack, share, batch))
            pools[share] = float(np.mean(_image_auroc_by_kind(planted.kind, *pooled[share])))
        best = max(pools, key=lambda share: (pools[share], -share))
        recipe = recipe.replace(score_share=best)
        clean_scores, planted_scores = pooled[best]
    # Keyed on the first clean map's median, and every kind's histogram on the same, so that they can be added.
    clean_hist = metrics.PixelHistograms(reference=None)
    for m in maps:
        clean_hist.add(m)
    image_aurocs = _image_auroc_by_kind(planted.kind, clean_scores, planted_scores)
    image_by_kind = dict(zip(dict.fromkeys(planted.kind), image_aurocs, strict=True))
    per_kind: dict[str, dict[str, float]] = {}
    for kind in PLANTS:
        rows = [i for i, k in enumerate(planted.kind) if k == kind]
        if not rows:
            continue
        per_kind[kind] = {"image_auroc": image_by_kind[kind]}
        # Planted.draw keeps only defects with pixels at every input; a kind without any has no pixel metrics and
        # is left out of their means rather than stopping the run.
        if any(masks[i].any() for i in rows):
            kind_hist = metrics.PixelHistograms(clean_hist.reference)
            for i in rows:
                kind_hist.add(planted_stack[i], masks[i])
            hist = clean_hist + kind_hist
            per_kind[kind].update(pixel_auroc=hist.auroc(), aupro=hist.aupro())
    mean = {
        m: float(np.mean([row[m] for row in per_kind.values() if m in row]))
        for m in ("image_auroc", "pixel_auroc", "aupro")
    }
    false_alarms = float(np.mean(clean_scores >= np.median(planted_scores)))
    return Scored(
        recipe,
        per_kind,
        mean["image_auroc"],
        mean["pixel_auroc"],
        mean["aupro"],
        false_alarms,
        time.monotonic() - started,
        pools,
        copy_auroc,
        clean_scores,
        maps,
        fits[0] if len(folds) == 1 else None,
    )


def _pool(maps: np.ndarray, share: float, batch: int) -> np.ndarray:
    """Image scores of maps under one pool, by the graph's own ImageScore."""
    pool = ImageScore(share, *maps.shape[1:3])
    out = []
    with torch.inference_mode():
        for start in range(0, len(maps), batch):
            out.append(pool(torch.from_numpy(maps[start : start + batch])).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _image_auroc_by_kind(kinds: list[str], clean: np.ndarray, planted: np.ndarray) -> list[float]:
    """Image AUROC of each plant kind (in first-seen order) against the clean held-out images."""
    out = []
    for kind in dict.fromkeys(kinds):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        labels = np.r_[np.zeros(len(clean)), np.ones(len(rows))]
        out.append(metrics.auroc(labels, np.r_[clean, planted[rows]]))
    return out


def describe_copies(s: Scored) -> str:
    """'rot180 0.52': the copies a candidate was fitted with, and the check's AUROC where it was judged."""
    return s.recipe.augment + ("" if s.copy_auroc is None else f" {s.copy_auroc:.2f}")


def format_header() -> str:
    return (
        f"  {'recipe':<10} {'img AUROC':>9} {'score':>9} {'copies':>11} {'pix AUROC':>9} {'AUPRO':>6} {'false al.':>9}"
        f" {'time':>6}  worst kind (img AUROC)"
    )


def format_row(s: Scored) -> str:
    worst = min(s.per_kind, key=lambda k: s.per_kind[k]["image_auroc"])
    return (
        f"  {s.recipe.name:<10} {s.image_auroc:>9.3f} {describe_score_share(s.recipe.score_share):>9} "
        f"{describe_copies(s):>11} {s.pixel_auroc:>9.3f} {s.aupro:>6.3f} {s.false_alarms:>9.2f} "
        f"{s.seconds:>5.0f}s  {worst} ({s.per_kind[worst]['image_auroc']:.3f})"
    )
