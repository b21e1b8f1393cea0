"""`inspectd train` and `train_bundle`: defect-free images in, a complete model bundle out.

First the recipe (engines.model.recipes): by default `auto` chooses one on the images themselves
(engines.training.select); `--recipe NAME` takes a catalogue recipe; recipe flags (--taps, --aggregation, --scorer,
--size, ...) change the named or auto recipes, or without --recipe describe a custom one from the method's defaults.
Then the same steps for every method (engines.model.methods): fit the images to the input size, hold some out (auto:
its held-out images, already scored out of fold by the selection, which then also go into the fit), let the method
train its head, compute features once, fit the scorer, score the held-out images for the first thresholds, export
the ONNX graph, write the bundle with the recipe (and auto's table) in its manifest. Ctrl-C during training or
feature extraction still writes a usable bundle from what exists so far (auto's with one held-out share: the fold's
fit its thresholds were set on; cross-fitted: the images read so far, with thresholds set on the rest), marked
`"interrupted": true`, and exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import (
    BIT_DEPTH_RANGE,
    EACH_AXIS,
    LEGACY_BIT_DEPTH,
    describe_recipe,
    inspectd_version,
    parse_size,
    scores_pool_the_map,
    valid_bit_depth,
)
from engines.bundle.store import load_bundle, model_id_for, not_replaceable, write_bundle
from engines.data.images import (
    CROSS_FIT_BELOW,
    MIN_HELD_OUT,
    SPLIT_HOLDOUT,
    VALIDATION_FOLDS,
    ImageFiles,
    detect_bit_depth,
    duplicates_note,
    frames_checksums,
    good_folder,
    list_images,
    nested_note,
    pixels_key,
    split_holdout,
    subfolder_hint,
    without_duplicates,
)
from engines.errors import DataError, EngineError, WeightsError
from engines.model.backbones import BACKBONES, spec_for
from engines.model.export import DEFAULT_OPSET, add_feature_graph, check_opset, export_graph
from engines.model.graph import SCORERS, InferenceGraph, build_graph, state_arrays
from engines.model.methods import METHODS, TrainSettings, available_methods, get_method
from engines.model.recipes import (
    AUTO,
    AUTO_CANDIDATES,
    CATALOGUE,
    DEFAULT_MEMORY_SIZE,
    SCORE_SHARES,
    Recipe,
    auto_candidates,
    catalogue_recipe,
)
from engines.progress import Progress
from engines.runtime.preprocess import RESIZE_POLICIES, fit_all, fit_frame, mean_level
from engines.runtime.scorer_fit import AUGMENTS, augmented
from engines.training.select import Selection, score_features, select_recipe

INTERRUPTED_EXIT = 130
# First thresholds from held-out good images (say so in provenance; `inspectd calibrate` refines them later).
IMAGE_RULE = "max held-out image score + 10% of the held-out score range"
PIXEL_QUANTILE = 0.999
PIXEL_RULE = f"{PIXEL_QUANTILE:.1%} quantile of held-out anomaly-map values"
DEFAULT_K = 2  # k = 1/2/4/8 gave image AUROC 0.678/0.711/0.709/0.691 (frozen Lite0, magnetic_tile, 256)
CUSTOM_SIZE = (256, 256)
MAX_SEED = 2**64 - 1  # torch.manual_seed's largest
# The fields a recipe flag may set; None means "not given".
RECIPE_FIELDS = (
    "method",
    "backbone",
    "taps",
    "size",
    "resize",
    "scorer",
    "aggregation",
    "memory_size",
    "k",
    "smoothing_sigma",
    "score_share",
    "augment",
)


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C after the bundle was written, while its feature graph was added: the bundle runs, teach needs the
    graph (`inspectd export BUNDLE` adds it)."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


@dataclasses.dataclass(frozen=True)
class TrainResult:
    bundle: Path
    model_id: str
    interrupted: bool
    n_fit: int
    n_holdout: int
    image_threshold: float
    pixel_threshold: float
    seconds: float
    recipe: Recipe
    n_reference: int  # good images whose scores are the drift alarm's reference
    held_in_fit: bool = False  # the held-out images were fitted too (auto: scored out of fold for the thresholds)
    n_scorer_fit: int | None = None  # images the scorer was fitted on (fewer than n_fit when interrupted)
    memory_bank: int | None = None  # patches in the fitted memory bank (the recipe's memory_size is its cap)
    threshold_images: str = "held-out"  # what the first thresholds were set on: held-out, out-of-fold or training
    pools_the_map: bool = True  # the image score pools the map (engines.bundle.format.scores_pool_the_map)


def aligned_to_taps(recipes: list[Recipe]) -> list[Recipe]:
    """Refuse an input size that is not a whole number of the coarsest tap's cells. At such a size that tap's grid
    overhangs the input and the graph's bilinear resize stretches it back over the frame, so its features land up
    to a stride off the pixels they describe (measured 6-25 px at 200x200 with taps at strides 16 and 32, against
    1-2 px at 192 or 224). Only new recipes are checked: a bundle trained at such a size still loads and runs."""
    for recipe in recipes:
        stride = max(max(r.taps) for r in recipes)  # auto's candidates share one size: the coarsest of them all
        if any(side % stride for side in recipe.size):
            height, width = recipe.size
            below = "x".join(str(max(stride, side // stride * stride)) for side in recipe.size)
            above = "x".join(str(-(-side // stride) * stride) for side in recipe.size)
            whose = f"recipe {recipe.name}" if len(recipes) == 1 else "auto's candidates"
            raise ValueError(
                f"--size {height}x{width}: expected each side a multiple of {stride}, the coarsest tap stride of "
                f"{whose} (e.g. {below} or {above}): at other sizes the map sits off the defects"
            )
    return recipes


def resolve_recipe(name: str | None, overrides: dict) -> list[Recipe]:
    """The candidate recipes: one when forced, the auto candidates otherwise. `overrides` maps RECIPE_FIELDS to
    values from flags (None = not given). No --recipe and no flags: auto. No --recipe but flags: a custom recipe
    from the method's defaults (its backbone's default taps, 256x256, window 3 for a memory bank, else none)."""
    return aligned_to_taps(_resolved(name, overrides))


def _resolved(name: str | None, overrides: dict) -> list[Recipe]:
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(RECIPE_FIELDS)
    if unknown:
        raise ValueError(f"recipe fields {sorted(unknown)}: expected some of {', '.join(RECIPE_FIELDS)}")
    for field, flag in (("memory_size", "--memory-size"), ("k", "--k")):
        if field in given and given[field] < 1:
            raise ValueError(f"{flag} {given[field]}: expected >= 1")
    if name is None and given:
        method = get_method(given.get("method", "frozen"))
        backbone = given.get("backbone", method.default_backbone)
        scorer = given.get("scorer", method.default_scorer)
        base = Recipe(
            "custom",
            method=method.name,
            backbone=backbone,
            taps=tuple(2 ** (i + 1) for i in spec_for(backbone).taps),
            size=CUSTOM_SIZE,
            scorer=scorer,
            aggregation=3 if scorer == "memory" else 1,
            k=DEFAULT_K,
            description="from flags",
        )
        return [base.replace(**given).validate()]
    if name is None or name == AUTO:
        fitting = auto_candidates(given)
        try:
            candidates = [r.validate() for r in fitting]
        except ValueError as exc:
            if any(r.window_fits() for r in fitting):
                raise
            # None fits (auto_candidates gave them all back): the first one's refusal says why, for auto.
            raise ValueError(f"recipe auto: no candidate's window fits ({exc})") from None
        if any(r.method != "frozen" for r in candidates):
            raise ValueError("--recipe auto: chooses among frozen-backbone recipes; give --method with other flags")
        return candidates
    recipe = catalogue_recipe(name)
    if not given:
        return [recipe]
    return [recipe.replace(**given, description=recipe.description + " (changed by flags)").validate()]


def chooses_auto(recipe: str | None, overrides: dict) -> bool:
    """Whether train chooses the recipe (auto): asked by name, or neither a recipe nor a recipe flag given."""
    return recipe == AUTO or (recipe is None and all(v is None for v in overrides.values()))


def check_holdout(holdout: float, auto: bool) -> None:
    """ValueError for --holdout 0 where the recipe is given: its first thresholds would be set on the images the
    scorer was fitted on, which score about 0 against it (a memory bank holds their own patches), so on the line
    every frame would be a defect. Auto sets them on out-of-fold scores whatever --holdout says. The Python API
    (train_bundle) still takes 0 for a caller that calibrates the bundle before it judges anything."""
    if holdout == 0 and not auto:
        raise ValueError(
            "--holdout 0: the first thresholds would be set on the fitted images, which score about 0 against the "
            "model fitted on them, so every frame would be a defect; expected a fraction > 0 (default 0.1), or "
            "--recipe auto (thresholds from out-of-fold scores)"
        )


def check_out(out: str | Path, data: str | Path) -> None:
    """ValueError naming --out when the bundle must not be written there: the bundle replaces what --out holds, so
    --out must be nothing yet, an empty folder or a bundle (engines.bundle.store.not_replaceable), and apart from
    --data (the same folder, one above it, or one inside it). Checked before any image is read: a slip of the flag
    lost the dataset itself after the whole training."""
    out_path, data_path = _resolved_flag(out, "--out"), _resolved_flag(data, "--data")
    if out_path == data_path:
        where = "is --data"
    elif out_path in data_path.parents:
        where = f"holds --data {data}"
    elif data_path in out_path.parents:
        where = f"lies inside --data {data}"
    else:
        why = not_replaceable(out)
        if why:
            raise ValueError(f"--out {out}: {why} (the bundle replaces what is there)")
        return
    raise ValueError(f"--out {out}: {where}, expected a bundle path outside the training data and not holding it")


def check_weights(weights: str | Path | None, backbones: set[str]) -> None:
    """WeightsError naming --weights unless it is a file this user can read. Checked with the other flags: torch
    opens it only once every training image is read and decoded, minutes on a large set."""
    if not weights:  # as build_graph takes it: no file given, the backbone's own weights
        return
    expected = ", ".join(sorted(spec_for(name).timm_name for name in backbones))
    try:
        # Opened, not stat()ed: as root access() says yes to anything, and a folder opens only to fail here.
        with open(weights, "rb") as file:
            empty = os.fstat(file.fileno()).st_size == 0
    except OSError as exc:
        raise WeightsError(
            f"--weights {weights}: cannot read ({exc.strerror or exc}), expected a torch state dict for {expected}"
        ) from None
    if empty:  # the remains of a failed download or copy
        raise WeightsError(f"--weights {weights}: empty file, expected a torch state dict for {expected}")


def check_method_args(methods: set[str], method_args: argparse.Namespace | None) -> None:
    """ValueError for the method's own flags (--cse-defects, --sla-lr, --sla-dim ...) that the method would refuse, or
    train on to NaN, once the images are read and decoded: each method's head configuration and its own checks."""
    for name in sorted(methods):
        method = get_method(name)
        method.head_config(method_args)
        method.check_args(method_args)
    if method_args is None:
        return
    for method_class in available_methods():
        if method_class.name in methods:
            continue
        # A method's flag set where no recipe trains with that method (auto's candidates are all frozen) would be
        # dropped without a word, and the bundle taken for one trained as asked. Its flags are named after it
        # (Method.add_arguments) and default to None (methods.flag), so a flag given is one that is not None.
        for dest, given in sorted(vars(method_args).items()):
            if dest.startswith(f"{method_class.name}_") and given is not None:
                flag = "--" + dest.replace("_", "-")
                shown = flag if isinstance(given, bool) else f"{flag} {given}"  # a switch, typed without a value
                raise ValueError(
                    f"{shown}: a flag of --method {method_class.name}, which no recipe here trains with "
                    f"({', '.join(sorted(methods))}), expected --method {method_class.name} or no {flag}"
                )


def check_epochs(epochs: int | None, methods: set[str]) -> None:
    """ValueError for --epochs where no recipe trains anything: a frozen backbone fits only its scorer, so the epochs
    would be dropped without a word and written into the manifest as if trained, as a method's flag would be."""
    if not epochs or any(get_method(name).default_epochs for name in methods):
        return
    trainers = [method.name for method in available_methods() if method.default_epochs]
    raise ValueError(
        f"--epochs {epochs}: no recipe here trains a head ({', '.join(sorted(methods))} fits only its scorer), "
        f"expected {' or '.join('--method ' + name for name in trainers)}, or no --epochs"
    )


# The recipe fields only some scorers use (engines.runtime.scorer_fit ignores the others' settings): k-means' references
# and the memory bank's cap.
SCORER_FIELDS = {"k": ("--k", ("kmeans", "kmeans_local")), "memory_size": ("--memory-size", ("memory",))}


def check_scorer_flags(candidates: list[Recipe], overrides: dict) -> None:
    """ValueError for --k or --memory-size where no candidate's scorer uses it: it would be dropped without a word
    and written into the manifest's recipe as if it had shaped the model, as a method's flag would be. The Python API
    (train_bundle) still takes either with any scorer."""
    scorers = sorted({recipe.scorer for recipe in candidates})
    for field, (flag, users) in SCORER_FIELDS.items():
        value = overrides.get(field)
        if value is None or any(scorer in users for scorer in scorers):
            continue
        raise ValueError(
            f"{flag} {value}: used only by the {' and '.join(users)} scorer{'s' * (len(users) > 1)}, and no recipe "
            f"here scores with {'them' if len(users) > 1 else 'it'} ({', '.join(scorers)}), expected "
            f"{' or '.join('--scorer ' + name for name in users)}, or no {flag}"
        )


def _resolved_flag(path: str | Path, flag: str) -> Path:
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 says a loop by RuntimeError, later ones by OSError
        raise ValueError(f"{flag} {path}: a symbolic link loop, expected a folder or a link to one") from exc


def _input_key(image: np.ndarray, size: tuple[int, int], resize: str) -> bytes:
    """pixels_key of `image` as the model will take it: fitted to the input, a colour frame whose channels are equal
    taken as the grey one it is (a colour model replicates grey frames), so the frames teach and calibrate would find
    the same are found the same here, before the set's channels are known."""
    if image.ndim == 3 and (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
        image = image[..., 0]
    channels = 1 if image.ndim == 2 else 3
    return pixels_key(fit_frame(image, (size[0], size[1], channels), resize)[0])


def training_images(data: str | Path) -> list[Path]:
    """train/good (or train/ok, any case: good_folder) of an MVTec-layout root, else the images of a plain folder."""
    data = Path(data)
    folder = good_folder(data, ("train",))
    paths = list_images(folder)
    if not paths:
        where = "" if folder == data else f" (read {folder})"
        raise DataError(
            f"{data}: no images{where}, expected train/good/*.png|jpg or a folder of images"
            + subfolder_hint(data, folder, "--data")
        )
    return paths


def training_nested_note(data: str | Path) -> str | None:
    """nested_note's line for the folder training reads (training_images'), whose sub-folders it leaves out."""
    data = Path(data)
    return nested_note(good_folder(data, ("train",)), data, "trained on", "point --data at a sub-folder to train on it")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def extract_features(
    graph: InferenceGraph, images: np.ndarray, batch: int, progress: Progress
) -> tuple[torch.Tensor, bool]:
    """Features of every image, batched, written into one tensor (a list of batches joined after would hold them
    twice). On Ctrl-C returns what exists (at least the first batch) and True."""
    out: torch.Tensor | None = None
    done, interrupted = 0, False

    def embed_batch(start: int) -> int:
        nonlocal out
        features = graph.embed(torch.from_numpy(images[start : start + batch]))
        if out is None:
            out = torch.empty((len(images), *features.shape[1:]), dtype=features.dtype)
        out[start : start + len(features)] = features
        return start + len(features)

    progress.start(len(images), "features")
    graph.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            try:
                done = embed_batch(start)
                progress.update(done)
            except KeyboardInterrupt:
                interrupted = True
                if not done:  # nothing to fit a scorer on yet: finish this one batch first
                    done = embed_batch(start)
                break
    progress.finish()
    assert out is not None, "no images to embed"
    return out[:done], interrupted


def score_with_graph(
    graph: InferenceGraph, images: np.ndarray, params: dict[str, np.ndarray], batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of `images`, embedded `batch` at a time and scored within the selection's memory budget."""
    scores, maps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            score, anomaly_map = score_features(
                graph, graph.embed(torch.from_numpy(images[start : start + batch])), params, batch
            )
            scores.append(score)
            maps.append(anomaly_map)
    return np.concatenate(scores), np.concatenate(maps)


def first_thresholds(scores: np.ndarray, maps: np.ndarray, provenance: dict) -> thresholds_doc.Thresholds:
    top, bottom = float(scores.max()), float(scores.min())
    image_threshold = top + 0.1 * (top - bottom) + 1e-6 * max(1.0, abs(top))
    pixel_threshold = float(np.quantile(maps, PIXEL_QUANTILE))
    return thresholds_doc.first_version(
        image_threshold, pixel_threshold, {**provenance, "rule": {"image": IMAGE_RULE, "pixel": PIXEL_RULE}}
    )


def train_bundle(
    data: str | Path,
    out: str | Path,
    recipe: str | None = None,
    method: str | None = None,
    backbone: str | None = None,
    size: tuple[int, int] | None = None,
    resize: str | None = None,
    scorer: str | None = None,
    k: int | None = None,
    memory_size: int | None = None,
    taps: tuple[int, ...] | None = None,
    aggregation: int | None = None,
    smoothing_sigma: float | None = None,
    score_share: float | None = None,
    augment: str | None = None,
    epochs: int | None = None,
    batch: int | None = None,
    seed: int = 0,
    weights: str | Path | None = None,
    holdout: float = 0.1,
    opset: int = DEFAULT_OPSET,
    progress: Progress | None = None,
    method_args: argparse.Namespace | None = None,
    report=None,
    bit_depth: int | None = None,
) -> TrainResult:
    """Train and write a complete bundle at `out`. Python API of `inspectd train` (the demo calls it). `recipe` and
    the recipe fields resolve as resolve_recipe says; `report(line)` receives auto's table (default: nothing).
    `bit_depth`: significant bits of 16-bit images (None: detect_bit_depth on the training images), recorded in the
    bundle as the depth its 16-bit frames are narrowed with."""
    started = time.monotonic()
    check_out(out, data)
    progress = progress or Progress()
    report = report or (lambda _line: None)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed {seed}: expected an integer 0 to {MAX_SEED}")
    seed_everything(seed)
    overrides = dict(
        method=method,
        backbone=backbone,
        taps=taps,
        size=size,
        resize=resize,
        scorer=scorer,
        aggregation=aggregation,
        memory_size=memory_size,
        k=k,
        smoothing_sigma=smoothing_sigma,
        score_share=score_share,
        augment=augment,
    )
    candidates = resolve_recipe(recipe, overrides)
    auto = chooses_auto(recipe, overrides)
    if recipe is None and not auto:
        # Recipe flags alone describe a custom recipe: a user who gave --resize pad only to letterbox would
        # otherwise not know that nothing was chosen.
        keep_choosing = "; add --recipe auto to keep choosing with these flags" * (candidates[0].method == "frozen")
        report(f"recipe flags without --recipe: a custom recipe from the flags, not auto{keep_choosing}")
    if auto and len(candidates) < len(AUTO_CANDIDATES):
        left = [name for name in AUTO_CANDIDATES if name not in {r.name for r in candidates}]
        grid = "x".join(map(str, candidates[0].size))
        report(f"auto: {', '.join(left)} left out: their window is wider than the feature grid at {grid}")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch {batch}: expected an integer >= 1")
    if epochs is not None and epochs < 0:
        raise ValueError(f"--epochs {epochs}: expected an integer >= 0")
    check_opset(opset)
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"--holdout {holdout}: expected a fraction in [0, 1)")

    if bit_depth is not None and not valid_bit_depth(bit_depth):
        raise ValueError(f"--bit-depth {bit_depth!r}: expected {BIT_DEPTH_RANGE}")
    check_weights(weights, {c.backbone for c in candidates})
    check_method_args({c.method for c in candidates}, method_args)
    check_epochs(epochs, {c.method for c in candidates})
    # Before the split and auto's folds: a held-out image's twin in the fit would score it about 0.
    paths, duplicates = without_duplicates(training_images(data))
    if note := training_nested_note(data):
        report(note)
    if duplicates:
        report(duplicates_note(duplicates))
    if len(paths) < 2:
        # Whatever the recipe: the first thresholds are set on images the scorer was not fitted on, and one image
        # leaves none. Set on its own score (about 0), they made every frame a defect, the image itself included.
        copies = f" ({len(duplicates)} more left out as copies of it)" if duplicates else ""
        raise DataError(
            f"{paths[0].parent}: 1 distinct training image{copies}, expected at least 2 to hold one out for the "
            "thresholds: add images"
        )
    bit_depth = _bit_depth(paths, bit_depth, report)
    # The same pixels in other bytes (re-encoded, another compression, a metadata stamp) are as much a twin, compared
    # as the model sees them, as teach and calibrate compare them (a grey frame and its colour copy, a frame and its
    # upscale are one input): one decoding pass more, a few seconds for hundreds of frames. Where the candidates fit
    # frames to several inputs, the decoded frames are compared.
    decoded = ImageFiles(paths, bit_depth or LEGACY_BIT_DEPTH)
    fits = {(c.size, c.resize) for c in candidates}
    if len(fits) == 1:
        ((size, resize),) = fits
        keys = [_input_key(image, size, resize) for image in decoded]
    else:
        keys = [pixels_key(image) for image in decoded]
    paths, twins = without_duplicates(paths, keys)
    if twins:
        report(duplicates_note(twins, pixels=True))
        duplicates += twins
    if len(paths) < 2:
        raise DataError(
            f"{paths[0].parent}: 1 distinct training image ({len(duplicates)} more left out as copies of it), "
            "expected at least 2 to hold one out for the thresholds: add images"
        )
    # Decoded when read: a full-size frame is held only while it is fitted or planted.
    frames = ImageFiles(paths, bit_depth or LEGACY_BIT_DEPTH)
    channels = frames.channels
    selection: Selection | None = None
    if not auto:
        chosen = candidates[0]
    else:
        selection = select_recipe(
            frames,
            candidates,
            channels,
            holdout,
            seed,
            batch or 16,
            str(weights) if weights else None,
            report,
            SCORE_SHARES if score_share is None else (score_share,),
            augment,
            progress,
        )
        chosen = selection.chosen.recipe
    trainer = get_method(chosen.method)
    epochs = trainer.default_epochs if epochs is None else epochs
    batch = trainer.default_batch if batch is None else batch
    spec = spec_for(chosen.backbone)
    input_shape = (chosen.size[0], chosen.size[1], channels)
    images = fit_all(frames, input_shape, chosen.resize)
    del frames
    # `inspectd teach` on these same frames then knows which of them the current scorer was fitted on.
    checksums = frames_checksums(paths, images)
    # The drift alarm's brightness reference: every good frame as the model sees it.
    brightness = np.array([mean_level(image) for image in images])

    architecture = chosen.architecture(trainer.head_config(method_args), channels)
    graph = build_graph(architecture, pretrained=True, weights=str(weights) if weights else None)
    interrupted = False
    if selection is not None:
        # Auto's held-out images chose the recipe and set the thresholds (scored by the fold fit that left them
        # out); the bundle is then fitted on every image, so no good image is lost to the model (one held-out share
        # of at least 24 images is 40 % of a 60-image set).
        fit_idx, hold_idx = np.arange(len(images)), np.zeros(0, np.int64)
    else:
        fit_idx, hold_idx = split_holdout(len(images), holdout, seed)
    fit_images, hold_images = images[fit_idx], images[hold_idx]
    settings = TrainSettings(epochs=epochs, batch=batch, seed=seed, args=method_args)
    try:
        trainer.train(graph, fit_images, settings, progress)
    except KeyboardInterrupt:
        interrupted = True
    progress.finish()
    features, stopped = extract_features(graph, augmented(fit_images, chosen.augment), batch, progress)
    interrupted = interrupted or stopped
    # Images whose own features the scorer was fitted on (fewer when interrupted); their copies come after them.
    n_scored = min(int(features.shape[0]), len(fit_images))
    # Auto with one held-out share: the fold's fit, on which the thresholds were set, is whole. Stopped in the refit on
    # every image, that is what is written: a scorer of the images read so far would be judged by thresholds set on
    # another, larger fit.
    fold_fit = selection.chosen.params if selection is not None and len(selection.folds) == 1 else None
    params = None
    if not (interrupted and fold_fit is not None):
        try:
            params = graph.scorer.fit(features, k=chosen.k, seed=seed, memory_size=chosen.memory_size)
        except KeyboardInterrupt:
            if fold_fit is None:
                raise
            interrupted = True
    del features
    n_fit, n_hold = len(fit_images), len(hold_images)
    every_image = selection is not None
    if selection is not None and interrupted and fold_fit is not None:
        fold = selection.folds[0]
        params, n_fit, n_scored, every_image = fold_fit, len(fold.fit), len(fold.fit), False
    assert params is not None
    if selection is not None and interrupted and fold_fit is None and n_scored < len(fit_images):
        # Cross-fitted, stopped in the refit: no fold fit is whole, and the out-of-fold scores came from fits on more
        # images than this partial scorer holds, so the images it never reached are its held-out ones.
        check_images, check_kind = fit_images[n_scored:], "held-out"
        scores, maps = score_with_graph(graph, check_images, params, batch)
        n_fit, n_hold, every_image = n_scored, len(check_images), False
    elif selection is not None:
        scores, maps, check_kind = selection.chosen.clean_scores, selection.chosen.clean_maps, "out-of-fold"
        n_hold = len(scores)
    else:
        # Without held-out images the first thresholds come from the fitting images (and provenance says so).
        check_images, check_kind = (hold_images, "held-out") if len(hold_images) else (fit_images, "training")
        scores, maps = score_with_graph(graph, check_images, params, batch)
    manifest = {
        "method": chosen.method,
        "backbone": chosen.backbone,
        "input": {
            "height": input_shape[0],
            "width": input_shape[1],
            "channels": channels,
            "resize": chosen.resize,
            "resample": EACH_AXIS,
            **({} if bit_depth is None else {"bit_depth": bit_depth}),
        },
        "preprocessing": {
            "layout": "NHWC uint8",
            "grey": "replicated to 3 channels in the graph",
            "normalise": "(x / 255 - mean) / std",
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "score_kind": SCORE_KINDS.get(chosen.scorer, chosen.scorer),
        "scorer_inputs": list(graph.scorer_inputs),
        "architecture": architecture,
        "recipe": chosen.to_json(),
        "recipe_selection": selection.to_json() if selection else None,
        "interrupted": interrupted,
        "training": {
            "data": str(Path(data).resolve()),
            "n_fit": int(n_fit),
            "n_holdout": int(n_hold),
            "n_scorer_fit": int(n_scored),
            "n_duplicates": len(
                duplicates
            ),  # files left out as copies of others, in bytes or pixels (not in the names)
            # How the fitted images were chosen, so `inspectd teach` on the same images refits the same ones: the
            # function (auto's folds when it chose the recipe) and the --holdout given to it.
            "split": VALIDATION_FOLDS if selection is not None else SPLIT_HOLDOUT,
            # Auto's bundles are fitted on every image, its one held-out share too (n_holdout counts the images whose
            # fold scores set the thresholds); bundles before this field were fitted on the fold's fitting share.
            "fit_all": every_image,
            "holdout": float(holdout),
            **checksums,
            "epochs": epochs,
            "batch": batch,
            "seed": seed,
            "k": chosen.k if "references" in graph.scorer_inputs else None,
            "scorer": chosen.scorer,
            "memory_size": int(params["memory_bank"].shape[0]) if "memory_bank" in params else None,
            "seconds": round(time.monotonic() - started, 1),
        },
        "versions": {
            "inspectd": inspectd_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "opset": opset,
        },
    }
    graph_weights = state_arrays(graph)
    thresholds = first_thresholds(
        scores,
        maps,
        {
            "tool": "inspectd train",
            # The daemon refuses thresholds whose provenance names another model than the one it runs: without the
            # id, another model's version 1 (a copy, a rollback) could not be told apart.
            "model_id": model_id_for(manifest, params, graph_weights),
            "good_dir": str(Path(data).resolve()),
            "n_good": int(len(scores)),
            "images": check_kind,
            "n_fit": int(n_fit),
            "n_holdout": int(n_hold),
            thresholds_doc.GOOD_SCORES: thresholds_doc.good_score_reference(scores),
            thresholds_doc.GOOD_BRIGHTNESS: thresholds_doc.good_score_reference(brightness),
        },
    )
    graph_bytes = export_graph(graph, params, opset)
    path = write_bundle(out, manifest, graph_bytes, params, graph_weights, thresholds)
    try:
        add_feature_graph(load_bundle(path), graph, opset)  # what `inspectd teach` refits the scorer from
    except KeyboardInterrupt:
        raise InterruptedAfterWrite(path) from None
    bundle = load_bundle(path)  # what the daemon will do first: verify it
    return TrainResult(
        path,
        bundle.model_id,
        interrupted,
        n_fit,
        n_hold,
        thresholds.image_threshold,
        thresholds.pixel_threshold,
        time.monotonic() - started,
        chosen,
        int(len(scores)),
        every_image,
        n_scored,
        int(params["memory_bank"].shape[0]) if "memory_bank" in params else None,
        check_kind,
        scores_pool_the_map(manifest),
    )


def _bit_depth(paths: list[Path], forced: int | None, report) -> int | None:
    """The depth the bundle declares for 16-bit frames: forced, or detected from 16-bit training images; None for
    8-bit ones (16-bit frames are then narrowed as 16-bit). Images that read two ways (DetectedDepth.ambiguous) are
    taken by their largest value, with a note naming the other reading: that keeps every grey level they have (taken
    as left-aligned 16-bit, a 10-bit sensor in Mono12 words narrowed to 15), where the other way's risk is a frame
    brighter than any trained on saturating; and the default train does not refuse a dataset it can read."""
    detected = detect_bit_depth(paths)  # also refuses a set that mixes 8- and 16-bit images
    if forced is not None:
        kind = "16-bit images" if detected else "8-bit images; 16-bit frames on the line"
        line = f"{kind} narrowed as {forced}-bit (--bit-depth): >> {forced - 8}, above full scale saturates"
        if detected and detected.largest >= 1 << forced:
            line += f" (these images reach {detected.largest}, above {forced}-bit full scale {(1 << forced) - 1})"
        report(line)
        return forced
    if detected is None:
        report(
            "8-bit images: no bit depth recorded, so 16-bit frames on the line are narrowed >> 8; --bit-depth N "
            "where these are frames the daemon narrowed from an N-bit camera's (an archive export)"
        )
        return None
    if detected.ambiguous:
        report(detected.ambiguity(paths[0].parent))
        return detected.bits
    why = (
        f"low {detected.padding} bits 0 in every value (left-aligned)"
        if detected.padding >= 2
        else f"largest value {detected.largest}"
    )
    report(
        f"16-bit images: {why}, taken as {detected.bits}-bit (>> {detected.bits - 8}; a frame above full scale "
        f"saturates); --bit-depth N if the camera gives more bits than these images use"
    )
    return detected.bits


SCORE_KINDS = {
    "kmeans": "image: 1 - cosine to the nearest k-means reference; map: squared feature distance to it",
    "kmeans_local": "image: max of the map; map: squared distance to the nearest location of any k-means reference",
    "gaussian": "image: max of the map; map: Mahalanobis distance (per-location mean, shared covariance)",
    "memory": "image: max of the map; map: distance of the aggregated patch to its nearest memory-bank patch",
}


def _odd_window(text: str) -> int:
    value = int(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"{text}: expected an odd window >= 1 (1, 3, 5, ...)")
    return value


def parse_seed(text: str) -> int:
    # numpy refuses a negative seed only after every image is decoded, and torch one above MAX_SEED, in words that
    # name no flag.
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 0")
    if int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer 0 to {MAX_SEED}")
    return int(text)


def _strides(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", "+").split("+"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected backbone strides joined by +, e.g. 8+16") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    catalogue = "; ".join(f"{name}: {r.description}" for name, r in CATALOGUE.items())
    parser.add_argument("--data", required=True, help="MVTec-layout root (uses train/good) or a folder of images")
    parser.add_argument(
        "--out",
        required=True,
        help="bundle directory to write: a new path, an empty folder or a bundle (replaced when complete), not inside "
        "--data",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="auto|NAME",
        help=f"auto (the default without recipe flags) chooses on planted defects in held-out good images; or one of: "
        f"{catalogue}. Recipe flags below change it; recipe flags without --recipe describe a custom recipe",
    )
    group = parser.add_argument_group("recipe fields (default: the recipe's own)")
    group.add_argument("--method", choices=list(METHODS), default=None, help="training method (frozen, cse, sla)")
    group.add_argument("--backbone", choices=list(BACKBONES), default=None, help="ImageNet backbone")
    group.add_argument("--taps", type=_strides, default=None, help="backbone strides to tap, e.g. 8+16")
    group.add_argument("--size", default=None, help="model input: N or HxW")
    group.add_argument("--resize", choices=RESIZE_POLICIES, default=None, help="fit frames by stretching or letterbox")
    group.add_argument("--scorer", choices=list(SCORERS), default=None, help="kmeans, kmeans_local, gaussian or memory")
    group.add_argument("--aggregation", type=_odd_window, default=None, help="patch aggregation window (odd, 1 = none)")
    group.add_argument("--k", type=int, default=None, help=f"k-means references (custom default {DEFAULT_K})")
    group.add_argument(
        "--memory-size", type=int, default=None, help=f"memory bank patches (default {DEFAULT_MEMORY_SIZE})"
    )
    group.add_argument("--sigma", type=float, default=None, help="smoothing sigma of the map, in pixels")
    group.add_argument(
        "--score-share",
        type=float,
        default=None,
        help="image score: mean of this share of the map's highest values (0 = the maximum, 1 = the mean; "
        "auto chooses it per recipe)",
    )
    group.add_argument(
        "--augment",
        choices=list(AUGMENTS),
        default=None,
        help="also fit the scorer on copies of the good images: rot180 = each turned half a turn, for surfaces "
        "that look the same turned round (auto decides with few images)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the method's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the method's)")
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed for torch, numpy and random (default 0)")
    parser.add_argument("--weights", default=None, help="backbone ImageNet weights file (else the torch hub cache)")
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="fraction of good images held out for the first thresholds and for auto's planted defects (default 0.1)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--bit-depth",
        type=int,
        default=None,
        metavar="N",
        help="significant bits of 16-bit images (8-16): 12 narrows 0-4095 to 0-255; recorded in the bundle, which "
        "narrows the line's 16-bit frames the same way (default: from the training images' largest value, none for "
        "8-bit images; images that read as either N-bit or dark left-aligned 16-bit are taken as N-bit, with a "
        "note). Give the running bundle's depth when training on 8-bit frames the daemon narrowed from a 16-bit "
        "camera's (an archive export)",
    )
    for method_class in available_methods():
        method_class.add_arguments(parser)


def threshold_lines(result: TrainResult, auto: bool) -> list[str]:
    """What the first thresholds rest on, after the summary: the false-reject rate their good images support (as
    calibrate says it), a WARNING where those are fewer than auto's fewest held-out share, and the regionless WARNING
    calibrate gives. Set on one held-out image, the image threshold is that image's score plus a hair, which most of
    a line's good frames can exceed: the count of images it rests on is what tells the operator to set it again."""
    lines = []
    n, kind = result.n_reference, result.threshold_images
    if kind != "training":  # fitted images score about 0 against their own fit: they bound nothing
        upper = thresholds_doc.clopper_pearson_upper(0, n)
        lines.append(
            f"first image threshold above the {n} {kind} good image score(s): "
            + thresholds_doc.supported_rate(n, "good", "a false-reject", upper)
        )
        if n < MIN_HELD_OUT:
            instead = (
                f"`--recipe auto`, with any recipe flags given here (its threshold is set on out-of-fold scores: of "
                f"every image below {CROSS_FIT_BELOW} images, of {MIN_HELD_OUT} or more above), or "
                if not auto and result.recipe.method == "frozen"
                else ""
            )
            lines.append(
                f"WARNING: the first image threshold is set on {n} {kind} image(s), fewer than {MIN_HELD_OUT}: on the "
                f"line it may reject far more good frames than they did; {instead}`inspectd calibrate "
                f"{result.bundle} --good DIR` on good frames the model was not fitted on"
            )
    if result.pools_the_map and (
        warning := thresholds_doc.regionless_warning(
            result.image_threshold,
            result.pixel_threshold,
            remedy=f"`inspectd calibrate {result.bundle} --good DIR --pixel` sets the pixel threshold at a good-pixel "
            "rate (--pixel-fpr) on the same frames as the image one",
        )
    ):
        lines.append(warning)
    return lines


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    # A run started in the background (nohup, a script, a job runner) is stopped with SIGTERM: that must leave the
    # same usable checkpoint Ctrl-C does. (SIGINT, which a shell without job control starts background commands with
    # ignored, is claimed by `inspectd` itself: inspectd.cli STOPPED_BY_SIGINT.)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        overrides = dict(
            method=args.method,
            backbone=args.backbone,
            size=parse_size(args.size) if args.size is not None else None,
            resize=args.resize,
            scorer=args.scorer,
            k=args.k,
            memory_size=args.memory_size,
            taps=args.taps,
            aggregation=args.aggregation,
            smoothing_sigma=args.sigma,
            score_share=args.score_share,
            augment=args.augment,
        )
        check_holdout(args.holdout, chooses_auto(args.recipe, overrides))
        check_scorer_flags(resolve_recipe(args.recipe, overrides), overrides)
        result = train_bundle(
            args.data,
            args.out,
            recipe=args.recipe,
            **overrides,
            epochs=args.epochs,
            batch=args.batch,
            seed=args.seed,
            weights=args.weights,
            holdout=args.holdout,
            opset=args.opset,
            method_args=args,
            report=lambda line: print(line, flush=True),
            bit_depth=args.bit_depth,
        )
    except (EngineError, ValueError) as exc:
        print(f"inspectd train: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a quota under the bundle's files (the bundle itself is all or nothing)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"inspectd train: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except InterruptedAfterWrite as stop:
        print(
            f"inspectd train: interrupted after {stop.path} was written, before its feature graph (features.onnx): "
            f"the bundle runs; `inspectd export {stop.path}` adds the graph, which `inspectd teach` needs",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT
    except KeyboardInterrupt:
        print("inspectd train: interrupted before anything could be written", file=sys.stderr)
        return INTERRUPTED_EXIT
    state = ""
    if result.interrupted:
        state = f" (INTERRUPTED: weights so far, the scorer fitted on {result.n_scorer_fit} images)"
    print(
        f"{result.bundle}: {result.model_id}{state}, {result.n_fit} images fitted, {result.n_holdout} "
        f"{'of them scored out of fold' if result.held_in_fit else 'held out'}, "
        f"image threshold {result.image_threshold:.4g}, pixel threshold {result.pixel_threshold:.4g}, "
        f"{result.seconds:.1f}s\nrecipe {describe_recipe(result.recipe.to_json(), result.memory_bank)}"
    )
    for line in threshold_lines(result, chooses_auto(args.recipe, overrides)):
        print(line)
    warning = thresholds_doc.reference_warning(result.n_reference, "good images scored for the first thresholds")
    if warning:
        print(f"{warning} (`inspectd calibrate` on >= {thresholds_doc.MIN_REFERENCE} good images records one)")
    return INTERRUPTED_EXIT if result.interrupted else 0
