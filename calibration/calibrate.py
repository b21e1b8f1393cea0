"""`inspectd calibrate`: choose thresholds from scored images, version them into the bundle, apply them to a daemon.

Owns the statistics of threshold choice (all numpy, on score arrays, so they are tested without a model):
  - good frames only: the image threshold is an order statistic of the held-out good scores at the target
    false-reject rate p: just above the (n-k)-th lowest score, with k the most exceedances whose one-sided 95 %
    Clopper-Pearson upper bound on the false-reject rate is still <= p. The bound that the observed exceedances
    support is reported with the number of good frames that p needs (zero exceedances: n >= ln(0.05)/ln(1-p));
    too few frames is a WARNING (threshold above the highest good score), not a silent pass;
  - with labelled defects: the defect scores' order statistic whose escape rate (defective frames scored below it)
    meets the target with 95 % confidence, by the same rule and with the same WARNING when too few defects support it,
    or the F1-max threshold (engines.training.metrics.f1_max); the confusion matrix is printed. Without
    defects these two targets are refused: a threshold chosen "from defects" with no defects would flag everything;
  - pixel threshold: the quantile of good frames' pixel scores at a target pixel false-positive rate, or the pixel
    F1-max over ground-truth masks when any defective image has one (those without are left out of the pixel
    histograms, as eval leaves them out, with a WARNING counting them; both streamed through
    engines.training.metrics.PixelHistograms, so maps are never held).
16-bit --good and --defective images of another depth than the bundle narrows them as are a WARNING, and a set
mixing 8- and 16-bit images is refused, as train refuses one.
An image that cannot be read or does not decode (or, with --pixel, whose mask cannot be read or does not decode, as in
eval) is left out with a WARNING saying which file, and counted (provenance
n_skipped_good/n_skipped_defective); an image in both --good and --defective is refused before scoring; a threshold
that rejects more than half the good frames, and a pixel threshold above the image one (whatever the model's
pooling), are WARNINGs recorded in observed["warning"]; with --apply the first is neither written nor applied
(exit 1), since a daemon loads whatever its bundle holds at its next reload or restart. A --camera id must be one a
camera can have (the config's rule), and is checked against the cameras of the daemon at --apply (refused when not one
of them); unchecked there, a WARNING names the cameras the bundle's thresholds know.
Scoring is engines.training.evaluate.score_images; the document is engines.bundle.thresholds (next_version,
rollback; the Clopper-Pearson bound and the regionless WARNING, which train prints too); the bundle file is
rewritten through Bundle.replace_file; --apply speaks the daemon's control protocol (set_thresholds)
through inspectd.protocol, so calibrating needs nothing of the daemon itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import inspectd_version, scores_pool_the_map
from engines.bundle.plans import PRECISIONS
from engines.bundle.thresholds import clopper_pearson_upper, frames_needed, regionless_warning, supported_rate
from engines.schema import listed, show
from inspectd.errors import InspectdError, MessageError
from inspectd.protocol.archive import camera_id_problem
from inspectd.protocol.control import ControlClient, ControlTimeout, HandshakeFailed, client_for

if TYPE_CHECKING:
    from engines.errors import DataError
    from engines.training.metrics import PixelHistograms

DEFAULT_FALSE_REJECT = 0.001
DEFAULT_PIXEL_FPR = 0.01
# The batch is one buffer allocated up front (engines.runtime.predictor), the engine's float copy of it and its maps:
# a mistyped --batch asked for tens of GiB and ended in a traceback, while past a few dozen frames a batch scores no
# faster on any backend.
MAX_BATCH = 256


class CalibrationError(ValueError):
    """The request cannot be met with the data given; the message says why and what is expected."""


# --- statistics on score arrays -------------------------------------------------------------------------------


def _finite_scores(scores, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise CalibrationError(f"{what}: no scores, expected at least one scored image")
    if not np.isfinite(scores).all():
        raise CalibrationError(f"{what}: scores contain NaN or infinity, expected finite numbers")
    return scores


def _rate(value: float, what: str) -> float:
    if not 0.0 < value < 1.0:
        raise CalibrationError(f"{what}: {value}, expected a rate strictly between 0 and 1")
    return value


def _just_above(value: float) -> float:
    """The smallest threshold that a score equal to `value` does not reach. Engines emit float32 scores, so the step
    is a float32 one: every float32 score <= value stays below it after widening to float64."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def _bound_warning(n: int, frames: str, rate: str, upper: float, target: float, needed: int, none: str) -> str:
    return (
        f"WARNING: {supported_rate(n, frames, rate, upper)}, not the target {target:g}; the target needs >= {needed} "
        f"{frames} frames with none {none}"
    )


@dataclasses.dataclass(frozen=True)
class FalseRejectChoice:
    threshold: float
    n_good: int
    allowed: int  # exceedances whose 95 % bound still meets the target (0 when n is too small)
    exceedances: int  # good frames at or above the threshold
    observed_rate: float
    upper_bound: float  # one-sided 95 % Clopper-Pearson bound on the false-reject rate
    needed: int  # good frames the target needs with zero exceedances
    enough: bool  # upper_bound <= target

    def warning(self, target: float) -> str | None:
        if self.enough:
            return None
        return _bound_warning(self.n_good, "good", "a false-reject", self.upper_bound, target, self.needed, "rejected")


@dataclasses.dataclass(frozen=True)
class EscapeChoice:
    threshold: float
    n_defect: int
    allowed: int  # escapes whose 95 % bound still meets the target (0 when n is too small)
    escapes: int  # defective frames below the threshold
    observed_rate: float
    upper_bound: float  # one-sided 95 % Clopper-Pearson bound on the escape rate
    needed: int  # defective frames the target needs with zero escapes
    enough: bool  # upper_bound <= target

    def warning(self, target: float) -> str | None:
        if self.enough:
            return None
        return _bound_warning(
            self.n_defect, "defective", "an escape", self.upper_bound, target, self.needed, "escaping"
        )


def _most_events_within(n: int, target: float) -> int:
    """The most events k of n whose Clopper-Pearson upper bound on the rate is still <= target; 0 when even none
    cannot support it (n < frames_needed(target))."""
    lo, hi = 0, int(math.floor(target * n))  # above target * n events the bound exceeds the target
    if clopper_pearson_upper(0, n) > target:
        hi = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if clopper_pearson_upper(mid, n) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def threshold_for_false_reject(good_scores, target: float) -> FalseRejectChoice:
    """An order statistic of the good scores chosen so the false-reject rate is <= target with 95 % confidence.

    The plain quantile (floor(target * n) exceedances) would meet the target only on average; here the threshold
    allows the most exceedances k whose Clopper-Pearson upper bound is still <= target, i.e. it sits just above the
    (n-k)-th lowest good score. When even k = 0 cannot support the target (n < frames_needed) it sits just above the
    highest good score and the choice says it is not enough.
    """
    target = _rate(target, "--target-false-reject")
    scores = np.sort(_finite_scores(good_scores, "good scores"))
    n = scores.size
    allowed = _most_events_within(n, target)
    threshold = _just_above(scores[n - allowed - 1])
    exceedances = int(np.count_nonzero(scores >= threshold))
    upper = clopper_pearson_upper(exceedances, n)
    return FalseRejectChoice(
        threshold, n, allowed, exceedances, exceedances / n, upper, frames_needed(target), upper <= target
    )


def threshold_for_escape(defect_scores, target: float) -> EscapeChoice:
    """The defect scores' order statistic chosen so the escape rate is <= target with 95 % confidence, as the
    false-reject rule does for good frames.

    The plain quantile (floor(target * n) escapes) would meet the target only on average, and its bound never does;
    here the threshold allows the most escapes k whose Clopper-Pearson upper bound is still <= target: it is the
    (k+1)-th lowest defect score (escapes are scores below it). When even k = 0 cannot support the target
    (n < frames_needed) it is the lowest defect score and the choice says it is not enough.
    """
    target = _rate(target, "--target-escape")
    scores = np.sort(_finite_scores(defect_scores, "defective scores"))
    n = scores.size
    allowed = _most_events_within(n, target)
    threshold = float(scores[allowed])
    escapes = int(np.count_nonzero(scores < threshold))  # ties at the threshold are flagged: fewer than allowed
    upper = clopper_pearson_upper(escapes, n)
    return EscapeChoice(threshold, n, allowed, escapes, escapes / n, upper, frames_needed(target), upper <= target)


def threshold_for_f1(good_scores, defect_scores) -> tuple[float, float]:
    """(F1, threshold) at the F1 maximum, defects as the positive class."""
    from engines.training.metrics import f1_max

    good = _finite_scores(good_scores, "good scores")
    defect = _finite_scores(defect_scores, "defective scores")
    labels = np.concatenate([np.zeros(good.size, bool), np.ones(defect.size, bool)])
    f1, threshold = f1_max(labels, np.concatenate([good, defect]))
    return f1, threshold


@dataclasses.dataclass(frozen=True)
class Confusion:
    true_defect: int  # defective, flagged
    escaped: int  # defective, passed
    false_reject: int  # good, flagged
    true_ok: int  # good, passed

    def table(self) -> str:
        return (
            "                 judged defect   judged ok\n"
            f"  defective      {self.true_defect:>13d}   {self.escaped:>9d}   escape rate "
            f"{_share(self.escaped, self.true_defect + self.escaped)}\n"
            f"  good           {self.false_reject:>13d}   {self.true_ok:>9d}   false-reject rate "
            f"{_share(self.false_reject, self.false_reject + self.true_ok)}"
        )


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.4f}" if whole else "n/a"


def confusion(good_scores, defect_scores, threshold: float) -> Confusion:
    good = np.asarray(good_scores, dtype=np.float64)
    defect = np.asarray(defect_scores, dtype=np.float64)
    flagged_defect = int(np.count_nonzero(defect >= threshold))
    flagged_good = int(np.count_nonzero(good >= threshold))
    return Confusion(flagged_defect, defect.size - flagged_defect, flagged_good, good.size - flagged_good)


def pixel_threshold_for_fpr(histograms, fpr: float) -> float:
    """Lowest histogram-bin floor with at most floor(fpr * n) good pixels at or above it (bins are 0.05 % wide)."""
    fpr = _rate(fpr, "--pixel-fpr")
    total = histograms.n_normal  # flushes pending pixels into the histogram
    if not total:
        raise CalibrationError("pixel threshold: no good pixels were scored")
    normal = histograms.normal
    from_top = np.cumsum(normal[::-1])  # from_top[j]: good pixels in the top j+1 bins
    top_bins = int(np.searchsorted(from_top, math.floor(fpr * total), side="right"))
    if top_bins == 0:
        raise CalibrationError("pixel threshold: good pixels in the highest representable bin, expected finite maps")
    return float(histograms.bin_floor(np.array([normal.size - top_bins]))[0])


def _pixel_range(histograms) -> dict:
    """provenance["pixel_scores"]: the lowest and highest pixel score scored (to the histogram's bin width)."""
    total = histograms.n_normal  # flushes pending pixels into the histogram
    used = np.flatnonzero((histograms.normal > 0) | (histograms.defect > 0))
    floors = histograms.bin_floor(np.array([used[0], min(int(used[-1]) + 1, histograms.normal.size - 1)]))
    return thresholds_doc.score_range(float(floors[0]), float(floors[1]), total + int(histograms.defect.sum()))


def pixel_threshold_for_f1(histograms) -> tuple[float, float]:
    """(pixel F1, threshold) at the pixel F1 maximum over ground-truth masks, thresholds at histogram-bin floors."""
    if not histograms.n_defect or not histograms.n_normal:
        raise CalibrationError("pixel F1: needs defect pixels (masks) and good pixels")
    used = np.flatnonzero((histograms.normal > 0) | (histograms.defect > 0))[::-1]
    tp = np.cumsum(histograms.defect[used])
    fp = np.cumsum(histograms.normal[used])
    f1 = 2.0 * tp / (tp + fp + histograms.n_defect)
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    return float(f1[best]), float(histograms.bin_floor(np.array([used[best]]))[0])


# --- the command --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="model bundle directory whose thresholds.json is versioned")
    parser.add_argument(
        "--good", metavar="DIR", help="held-out defect-free images (a folder, or an MVTec root: its test/good)"
    )
    parser.add_argument(
        "--defective",
        metavar="DIR",
        action="append",
        default=[],
        help="labelled defective images: a folder (an MVTec test/<type> finds its ground_truth masks),"
        " or an MVTec root (every test/<type> but good); repeatable",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--target-false-reject",
        type=float,
        metavar="P",
        default=None,
        help=f"image threshold at this good-frame false-reject rate (default {DEFAULT_FALSE_REJECT})",
    )
    target.add_argument(
        "--target-escape",
        type=float,
        metavar="E",
        default=None,
        help="image threshold whose escape rate is at most this fraction with 95%% confidence (Clopper-Pearson, as "
        "--target-false-reject; needs defects: with too few, none may pass and a WARNING says how many it needs)",
    )
    target.add_argument("--max-f1", action="store_true", help="image threshold at the F1 maximum (needs defects)")
    parser.add_argument(
        "--pixel",
        action="store_true",
        help="also set the pixel threshold: pixel F1-max over masks when the defects have them, "
        "else the good pixels' quantile at --pixel-fpr",
    )
    parser.add_argument(
        "--pixel-fpr",
        type=float,
        default=None,
        metavar="R",
        help=f"good-pixel false-positive rate for --pixel without masks (default {DEFAULT_PIXEL_FPR})",
    )
    parser.add_argument("--camera", metavar="ID", help="write the result as this camera's override only")
    parser.add_argument(
        "--apply",
        metavar="ENDPOINT",
        help="send the new thresholds to a running daemon's control socket (tcp://host:port, ipc://)",
    )
    parser.add_argument(
        "--rollback",
        type=int,
        metavar="VERSION",
        help="write a new version with the values of an earlier VERSION (no scoring)",
    )
    parser.add_argument("--dry-run", action="store_true", help="compute and print; write and apply nothing")
    parser.add_argument("--backend", default="onnxruntime", help="runtime backend that scores (default onnxruntime)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="the engine's arithmetic (engine.options.precision), as the daemon's engine: thresholds set on fp16 or "
        "int8 scores are recorded so (provenance engine_precision), and a daemon on such an engine takes them without "
        "comparing its scores with FP32 ones (default fp32)",
    )
    parser.add_argument(
        "--batch", type=int, default=8, help=f"images per inference batch, 1 to {MAX_BATCH} (default 8)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon with --apply")
    parser.add_argument(
        "--server-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="CurveZMQ for --apply: the daemon's control public key file (with --client-key)",
    )
    parser.add_argument(
        "--client-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="CurveZMQ for --apply: this operator's .key_secret file, in the daemon's allow-list",
    )


@dataclasses.dataclass
class _Scored:
    good: np.ndarray
    defect: np.ndarray
    pixels: PixelHistograms | None  # when --pixel
    has_masks: bool
    good_brightness: np.ndarray  # mean grey level of each good image as the model sees it (the drift reference)
    good_paths: list[Path] = dataclasses.field(default_factory=list)
    defect_paths: list[Path] = dataclasses.field(default_factory=list)
    # (image, why) of those that could not be read or did not decode: left out
    skipped_good: list[tuple[Path, DataError]] = dataclasses.field(default_factory=list)
    skipped_defect: list[tuple[Path, DataError]] = dataclasses.field(default_factory=list)
    masks_left_out: set[Path] = dataclasses.field(default_factory=set)  # of skipped_defect, the masks at fault
    # (image, the earlier image of its set with its pixels) of those whose bytes differ from it: left out
    twins_good: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    twins_defect: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    n_masked: int = 0  # defective images whose masks went into the pixel histograms


def refuse_non_finite(scores, paths, what: str) -> None:
    """CalibrationError naming the images (`paths`, or their positions when None) scored NaN or infinity: NaN
    compares false with every threshold, so counted it would pass as judged ok (an escape, if defective)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    names = [str(p) for p in paths] if paths is not None else [f"image #{i}" for i in range(values.size)]
    bad = [name for name, value in zip(names, values, strict=True) if not np.isfinite(value)]
    if bad:
        shown = listed(bad, 3)
        raise CalibrationError(
            f"{what}: {len(bad)} image(s) scored NaN or infinity ({shown}), expected finite scores: "
            "check those images and the engine"
        )


def _cannot_read(folder: Path, exc: OSError) -> Exception:
    from engines.errors import DataError

    # pathlib's is_dir()/is_file() raise on EACCES (a folder another user keeps to itself), not only iterdir().
    return DataError(f"{folder}: cannot read ({exc.strerror or exc})")


# What calibrate's note on images in sub-folders it leaves out says (engines.data.images.nested_note).
CALIBRATED_ON = "calibrated on"
MOVE_UP = "move them up into it to calibrate on them"


def _good_paths(folder: Path) -> tuple[list[Path], str | None]:
    """The --good images, and the note on those in sub-folders of the folder read, which are left out."""
    from engines.data.images import good_folder, list_test_images, nested_note

    try:
        # train/good of an MVTec root fitted the model; only test/good is held out. Read as eval reads test/good: a
        # mask kept beside its image would be one more good image.
        read = good_folder(folder, ("test",))
        return list_test_images(read), nested_note(read, folder, CALIBRATED_ON, MOVE_UP)
    except OSError as exc:
        raise _cannot_read(folder, exc) from None


def _no_good_hint(given: str) -> str:
    """What `--good given` holds instead of images: its sub-folders of images, and a train/good (an export with
    --split train, an MVTec root without test/) that is not what calibrate reads."""
    from engines.data.images import defect_free_folder, good_folder, subfolder_hint
    from engines.errors import EngineError

    root = Path(given)
    try:
        folder = good_folder(root, ("test",))
        fitted = defect_free_folder(root / "train") if folder == root else None
        hint = subfolder_hint(root, folder, "--good", fitted)
    except (OSError, EngineError):  # best effort: the refusal stands without it
        return ""
    if fitted is not None:
        hint += (
            f"; {fitted.relative_to(root).as_posix()}/ holds frames to fit on (what train and teach read), and "
            "calibrate reads a root's test/good: export held-out frames with the default --split test"
        )
    return hint


def _distinct(
    good: list[Path], defective: list[tuple[Path, Path | None]]
) -> tuple[list[Path], list[tuple[Path, Path | None]], tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]]:
    """`good` and `defective` without the files whose bytes repeat an earlier one's of the same set, and (the good,
    the defective) left out, as without_duplicates gives them: a copy is no second frame, and counted as one it
    lowers the confidence bound the target is checked against and narrows the drift reference (a camera that
    resends one frame while the line stands, a folder copied into itself)."""
    from engines.data.images import without_duplicates

    good, good_copies = without_duplicates(good)
    kept, defect_copies = without_duplicates([path for path, _ in defective])
    # without_duplicates returns the very path objects it kept, in order: each item's is kept or left out.
    at = iter(kept)
    following = next(at, None)
    distinct = []
    for item in defective:
        if item[0] is following:
            distinct.append(item)
            following = next(at, None)
    return good, distinct, (good_copies, defect_copies)


def _defective_items(folders: list[str]) -> tuple[list[tuple[Path, Path | None]], list[str], list[str]]:
    """(image, mask or None) for every defective image named by --defective; the unmatched-mask notes eval prints
    (ground_truth/<type>/ folders holding files, none of them a mask of the type's images); the notes on images in
    sub-folders of a type folder, which are left out."""
    from engines.data.images import MaskFolder, MvtecFolder, list_test_images, mask_folder, nested_note

    items: list[tuple[Path, Path | None]] = []
    unmatched: list[str] = []
    nested: list[str] = []
    for name in folders:
        folder = Path(name)
        try:
            if (folder / "test").is_dir():
                dataset = MvtecFolder(folder)
                # test/good is --good's to read (to refuse where it holds masks, and to say what it leaves out).
                items += [(i.path, i.mask_path) for i in dataset.test_items(good=False)]
                unmatched += [u.note() for u in dataset.unmatched_masks()]
                nested += dataset.nested_notes(CALIBRATED_ON, MOVE_UP, good=False)
                continue
            # An MVTec test/<type> folder: its masks live in ../../ground_truth/<type>/, found and named as eval reads
            # them. Made absolute first: `hole` typed inside test/ (or `.` inside test/hole) has no parents of its
            # own, and every mask went unused without a word.
            absolute = Path(os.path.abspath(folder))
            masks = MaskFolder(mask_folder(absolute.parent.parent, absolute.name))
            # Refused as the same folder is read through its root: a mask kept beside its image is no defect.
            paths = list_test_images(folder)
            found = [masks.mask_for(path) for path in paths]
            items += list(zip(paths, found))
            if none := masks.unmatched(paths, found):
                unmatched.append(none.note())
            if note := nested_note(folder, folder, CALIBRATED_ON, MOVE_UP):
                nested.append(note)
        except OSError as exc:
            raise _cannot_read(folder, exc) from None
    return items, unmatched, nested


def _score(
    bundle, args, good: list[Path], defective: list[tuple[Path, Path | None]], options: dict[str, Any]
) -> _Scored:
    """One pass of engines.training.evaluate.score_images over good then defective images (one engine, one batch
    buffer). An image that does not decode (a file cut short by a copy) is left out and counted, not the end of a run
    that thousands of frames took minutes to score; where every good image, or every defective one, fails, the first
    failure is raised as it would have been. An image whose pixels, as the model takes them, are an earlier one's of
    the same set is left out too (_distinct compared the bytes only): one frame counted twice claims twice the
    support for the bound and the drift reference."""
    from engines.data.images import FirstOf, pixels_key
    from engines.errors import DataError
    from engines.progress import Progress
    from engines.runtime.preprocess import fit_frame, mean_level
    from engines.training.evaluate import frame_mask, score_images
    from engines.training.metrics import PixelHistograms

    # Keyed on the first map's median, as eval keys them: thresholds read back through pixels.bin_floor.
    pixels = PixelHistograms(reference=None) if args.pixel else None
    has_masks = _has_masks(defective)
    masks = [mask for _, mask in defective]

    scores = np.empty(len(good) + len(defective), dtype=np.float64)
    decoded = np.zeros(scores.size, dtype=bool)
    brightness = np.empty(len(good), dtype=np.float64)
    fitted = np.empty(bundle.input_shape, dtype=np.uint8)
    paths = good + [path for path, _ in defective]
    twin = np.zeros(scores.size, dtype=bool)
    firsts = (FirstOf(), FirstOf())  # the good set's, the defective set's
    failures: dict[Path, DataError] = {}
    unusable_masks: dict[Path, Path] = {}  # image: its mask, which cannot be read or does not decode
    progress = Progress()
    progress.start(len(paths), "calibrate: images scored")
    at = 0
    n_masked = 0
    scored_images = score_images(
        bundle,
        paths,
        backend=args.backend,
        batch=min(args.batch, len(paths)),  # a buffer for more images than there are would stay empty
        options=options,
        on_unreadable=failures.__setitem__,
    )
    for scored in scored_images:
        # In order, with the images that did not decode left out: the next path that is this one is its place.
        while paths[at] != scored.path:
            at += 1
        i = at
        at += 1
        mask = None
        mask_path = masks[i - len(good)] if i >= len(good) else None
        if pixels is not None and has_masks and mask_path is not None:
            # Left out as eval leaves it out: one damaged mask must not end a run of minutes of scoring.
            truth = frame_mask(mask_path, scored.frame_map.shape)
            if isinstance(truth, DataError):
                failures[scored.path] = truth
                unusable_masks[scored.path] = mask_path
                progress.update(at)
                continue
            mask = truth
        fit_frame(scored.image, bundle.input_shape, bundle.resize_policy, out=fitted, each_axis=bundle.each_axis)
        if not firsts[i >= len(good)].keep(scored.path, pixels_key(fitted)):
            twin[i] = True
            progress.update(at)
            continue
        scores[i] = scored.score
        decoded[i] = True
        if i < len(good):
            brightness[i] = mean_level(fitted)
        if pixels is not None and i < len(good):
            pixels.add(scored.frame_map, None, what=str(scored.path))
        elif pixels is not None and mask is not None:
            pixels.add(scored.frame_map, mask, what=str(scored.path))
            n_masked += 1
        progress.update(at)
    progress.finish()
    n = len(good)
    for part in (slice(0, n), slice(n, None)):
        if decoded[part].size and not decoded[part].any():
            raise failures[paths[part][0]]
    kept = [path for path, ok in zip(paths, decoded, strict=True) if ok]
    # The file at fault is named: the mask, where that is what left the image out.
    lost = [
        (unusable_masks.get(path, path), failures[path])
        for path, ok, copy in zip(paths, decoded, twin, strict=True)
        if not ok and not copy
    ]
    n_lost_good = int((~decoded[:n] & ~twin[:n]).sum())
    n_kept = int(decoded[:n].sum())
    return _Scored(
        scores[:n][decoded[:n]],
        scores[n:][decoded[n:]],
        pixels,
        has_masks,
        brightness[decoded[:n]],
        kept[:n_kept],
        kept[n_kept:],
        lost[:n_lost_good],
        lost[n_lost_good:],
        set(unusable_masks.values()),
        firsts[0].left_out,
        firsts[1].left_out,
        n_masked,
    )


def _has_masks(defective: list[tuple[Path, Path | None]]) -> bool:
    """Whether --pixel takes the pixel F1-max over ground-truth masks: when any defective image has one, as eval
    scores its pixel metrics over the images with masks. The images without one are left out of the pixel histograms
    (their pixels are neither defect nor defect-free), not a reason to set aside every mask given for the good
    pixels' rate."""
    return any(mask is not None for _, mask in defective)


def _maskless_warning(defective: list[tuple[Path, Path | None]]) -> str | None:
    """The WARNING for --pixel when some defective images, not all, have a mask: the pixel threshold is set on fewer
    defects than the image threshold (a defect type not labelled yet is not in it)."""
    maskless = [path for path, mask in defective if mask is None]
    if not maskless or len(maskless) == len(defective):
        return None
    shown = listed(maskless, 3)
    return (
        f"WARNING: {len(maskless)} of {len(defective)} defective images have no ground-truth mask ({shown}): they are "
        f"left out of the pixel threshold, the pixel F1-max over those with masks, as "
        "eval leaves them out of its pixel metrics; give each its mask for the pixel threshold to cover them"
    )


def _choose(args, scored: _Scored, out) -> tuple[float, float | None, dict]:
    """(image threshold, pixel threshold or None, provenance target/observed) and the report lines on `out`."""
    good, defect = scored.good, scored.defect
    refuse_non_finite(good, scored.good_paths or None, "--good")
    refuse_non_finite(defect, scored.defect_paths or None, "--defective")
    fr_target = DEFAULT_FALSE_REJECT if args.target_false_reject is None else args.target_false_reject
    fr = threshold_for_false_reject(good, fr_target)
    escape = None
    if args.target_escape is not None:
        escape = threshold_for_escape(defect, args.target_escape)
        image = escape.threshold
        target: dict[str, Any] = {"kind": "escape", "value": args.target_escape}
        print(
            f"image threshold {image:.6g}: {escape.escapes} of {escape.n_defect} defective frames below it "
            f"(allowed {escape.allowed})",
            file=out,
        )
    elif args.max_f1:
        f1, image = threshold_for_f1(good, defect)
        target = {"kind": "max_f1", "f1": round(f1, 6)}
        print(
            f"image threshold {image:.6g}: F1-max {f1:.4f} over {good.size} good and {defect.size} defective", file=out
        )
    else:
        image = fr.threshold
        target = {"kind": "false_reject", "value": fr_target}
        print(
            f"image threshold {image:.6g}: {fr.exceedances} of {fr.n_good} good frames at or above it "
            f"(allowed {fr.allowed})",
            file=out,
        )
    exceed = int(np.count_nonzero(good >= image))
    upper = clopper_pearson_upper(exceed, good.size)
    print(f"false-reject rate on good frames: observed {exceed}/{good.size}, 95% upper bound {upper:.4g}", file=out)
    observed: dict[str, Any] = {"false_reject_observed": exceed / good.size, "false_reject_upper_95": upper}
    if target["kind"] == "false_reject":
        print(
            f"target {target['value']:g} needs >= {fr.needed} good frames with none rejected (have {fr.n_good})",
            file=out,
        )
        if fr.warning(target["value"]):
            print(fr.warning(target["value"]), file=out)
            observed["warning"] = "too few good frames for the target"
    if escape is not None:
        print(
            f"escape rate on defective frames: observed {escape.escapes}/{escape.n_defect}, 95% upper bound "
            f"{escape.upper_bound:.4g}",
            file=out,
        )
        print(
            f"target {target['value']:g} needs >= {escape.needed} defective frames with none escaping "
            f"(have {escape.n_defect})",
            file=out,
        )
        observed["escape_observed"] = escape.observed_rate
        observed["escape_upper_95"] = escape.upper_bound
        if escape.warning(target["value"]):
            print(escape.warning(target["value"]), file=out)
            observed["warning"] = "too few defective frames for the target"
    if warning := rejects_most(good, image):
        print(warning, file=out)
        _add_warning(observed, warning.removeprefix("WARNING: "))
    if defect.size:
        matrix = confusion(good, defect, image)
        print("confusion matrix at this threshold:\n" + matrix.table(), file=out)
        observed["confusion"] = dataclasses.asdict(matrix)

    pixel = None
    if scored.pixels is not None:
        if scored.has_masks:
            f1, pixel = pixel_threshold_for_f1(scored.pixels)
            target["pixel"] = {"kind": "max_f1", "f1": round(f1, 6)}
            print(
                f"pixel threshold {pixel:.6g}: pixel F1-max {f1:.4f} over ground-truth masks "
                f"({scored.n_masked} defective image{'s' * (scored.n_masked != 1)})",
                file=out,
            )
        else:
            fpr = DEFAULT_PIXEL_FPR if args.pixel_fpr is None else args.pixel_fpr
            pixel = pixel_threshold_for_fpr(scored.pixels, fpr)
            target["pixel"] = {"kind": "good_pixel_fpr", "value": fpr}
            print(
                f"pixel threshold {pixel:.6g}: at most {fpr:g} of {scored.pixels.n_normal} good pixels at or above it",
                file=out,
            )
    return image, pixel, {"target": target, "observed": observed}


def rejects_most(good, image: float) -> str | None:
    """The WARNING when image threshold `image` rejects more than half of the `good` scores, whatever the target
    chose it: the defects given then score like the good frames (a wrong --defective folder, or one holding good
    frames), and applied, it would reject most good parts. --apply neither writes nor applies such a threshold."""
    exceed = int(np.count_nonzero(np.asarray(good) >= image))
    if exceed <= good.size / 2:
        return None
    return (
        f"WARNING: image threshold {image:.6g} rejects {exceed} of {good.size} good frames (rate "
        f"{exceed / good.size:.4g}): check that --good and --defective hold what they should"
    )


def _add_warning(observed: dict[str, Any], warning: str) -> None:
    """observed["warning"]: `warning` after any already there."""
    observed["warning"] = f"{observed['warning']}; {warning}" if observed.get("warning") else warning


def run(args: argparse.Namespace) -> int:
    from engines.bundle.store import NotDurable, load_bundle
    from engines.errors import BundleError, EngineError

    out = sys.stdout
    client = None
    try:
        if not 1 <= args.batch <= MAX_BATCH:
            raise CalibrationError(f"--batch {args.batch}: expected an integer from 1 to {MAX_BATCH}")
        if args.camera is not None and not args.camera.strip():
            # An unset $CAM in a script: taken as no --camera, it would set every camera's threshold from one's frames.
            raise CalibrationError(f"--camera {args.camera!r}: expected a camera id")
        if args.camera is not None and (problem := camera_id_problem(args.camera, show(args.camera))) is not None:
            # Written into per_camera, an id no camera can have ('cam 0') is an override the daemon never applies.
            raise CalibrationError(f"--camera: {problem}")
        # The pair itself is client_for's to check, with --apply.
        if (args.server_key is not None or args.client_key is not None) and not args.apply:
            raise CalibrationError("--server-key/--client-key are for --apply: give the daemon's control endpoint")
        camera_checked = False
        client = client_for(args.apply, args.timeout, args.server_key, args.client_key) if args.apply else None
        bundle = load_bundle(args.bundle)
        current = bundle.thresholds()
        if not args.dry_run:
            check_writable(bundle.path)  # before minutes of scoring, not after
        if client is not None:  # a status request writes nothing: a dry run checks the model and --camera too
            camera_checked = _check_daemon(args, client, bundle, current, out)
        if args.rollback is not None:
            given = [flag for flag, value in _scoring_flags(args) if value]
            if given:
                raise CalibrationError(
                    f"--rollback restores an earlier version as a whole: {', '.join(given)} given, expected none of "
                    "the flags that choose new thresholds with it"
                )
            new, hold = thresholds_doc.rollback(current, args.rollback), None
            print(
                f"rollback to the values of version {args.rollback}: image {new.image_threshold:.6g}, "
                f"pixel {new.pixel_threshold:.6g} (version {current.version}: image {current.image_threshold:.6g}, "
                f"pixel {current.pixel_threshold:.6g})",
                file=out,
            )
            for line in _override_changes(current, new):
                print(line, file=out)
        else:
            if args.camera is not None and not camera_checked:
                print(_unchecked_camera_warning(args, bundle, current), file=out)
            new, hold = _calibrate(bundle, current, args, out)
    except (CalibrationError, thresholds_doc.ThresholdsError, EngineError, InspectdError, ValueError) as exc:
        print(f"inspectd calibrate: {exc}", file=sys.stderr)
        if client is not None:
            client.close()
        return 2
    except OSError as exc:  # a file the folders' checks did not reach (an image, a mask): one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"inspectd calibrate: {where}{exc.strerror or exc} (as {_user()})", file=sys.stderr)
        if client is not None:
            client.close()
        return 2

    if args.dry_run:
        if client is not None:
            client.close()
        print(f"dry run: version {new.version} not written, not applied", file=out)
        return 0
    if client is not None and hold:
        # Not written either: in the daemon's bundle, its next reload or restart would put it in service.
        import shlex

        client.close()
        print(
            f"inspectd calibrate: --apply {args.apply}: version {new.version} not written, not applied: its image "
            f"threshold rejects most good frames; to put it in service deliberately, run this calibrate again without "
            f"--apply (it writes the version with its WARNING), then `inspectd ctl --endpoint "
            f"{shlex.quote(args.apply)} reload`",
            file=sys.stderr,
        )
        return 1
    applied = None
    if client is not None:
        # The daemon checks a version before it writes it into its bundle (a reduced-precision engine may refuse
        # it); written here first, a refused version would stay on disk and stop the daemon's next start.
        applied = _apply(args.apply, client, new, out)
        if applied == REFUSED:
            print(f"inspectd calibrate: version {new.version} not written to {bundle.path}", file=sys.stderr)
            return 1
        if applied == TAKEN:
            # Written here too, a version the daemon then refuses would stay on disk and stop its next start.
            print(
                f"inspectd calibrate: version {new.version} not written to {bundle.path} by calibrate: the daemon "
                f"writes it when it accepts it (`inspectd ctl --endpoint {args.apply} status` shows its "
                "thresholds_version)",
                file=sys.stderr,
            )
            return 1
    try:
        bundle.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(new))
    except NotDurable as exc:  # written: what the next load reads
        print(f"inspectd calibrate: WARNING: version {new.version}: {_one_line(exc)}", file=sys.stderr)
    except OSError as exc:
        print(
            f"inspectd calibrate: {bundle.path}: version {new.version} not written ({exc.strerror or exc}) as "
            f"{_user()}, expected a bundle this user may write",
            file=sys.stderr,
        )
        return 2
    except BundleError as exc:  # says itself whether the file was written (a manifest that failed after it)
        print(f"inspectd calibrate: version {new.version}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (EngineError, thresholds_doc.ThresholdsError) as exc:
        print(f"inspectd calibrate: version {new.version} not written: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(
        f"wrote thresholds version {new.version} (was {current.version}) to {bundle.path / thresholds_doc.FILE_NAME}",
        file=out,
    )
    if applied == UNREACHABLE:
        # Written, not in service: the daemon reads its bundle's thresholds.json only when it loads the bundle.
        print(
            f"inspectd calibrate: version {new.version} not applied: it goes into service at the daemon's next "
            f"reload (`inspectd ctl --endpoint {args.apply} reload`, or systemctl reload) or start",
            file=sys.stderr,
        )
    return 0 if applied in (None, APPLIED) else 1


def _override_changes(current, new) -> list[str]:
    """What the version `new` does to each camera's override in `current`, a line each: the global values alone said
    nothing of a camera whose override a rollback removes or changes, and that camera judges by other thresholds."""
    lines = []
    for key in sorted(set(current.per_camera) | set(new.per_camera)):
        was, now = current.per_camera.get(key), new.per_camera.get(key)
        # A key `ctl set-thresholds --force` stored may be no camera id at all (a lone surrogate from a JSON escape,
        # which no stdout encodes): shown escaped, as the daemon's refusals show it, not a codec error ending the run.
        camera = thresholds_doc.shown_name(key)
        if now is None:
            lines.append(
                f"camera {camera}: override removed (was {_override_values(was)}): it judges by the global "
                f"image {new.image_threshold:.6g}, pixel {new.pixel_threshold:.6g}"
            )
        elif was is None:
            lines.append(f"camera {camera}: override restored: {_override_values(now)}")
        elif was == now:
            lines.append(f"camera {camera}: override kept: {_override_values(now)}")
        else:
            lines.append(f"camera {camera}: override changed from {_override_values(was)} to {_override_values(now)}")
    return lines


def _override_values(override: dict[str, float]) -> str:
    """A camera's override as the report shows it; a threshold it does not set is the document's (global) one."""
    return ", ".join(
        f"{key.removesuffix('_threshold')} {override[key]:.6g}"
        if key in override
        else f"{key.removesuffix('_threshold')} global"
        for key in ("image_threshold", "pixel_threshold")
    )


def _scoring_flags(args) -> list[tuple[str, Any]]:
    """Every flag of a calibration that scores, with its value (None, False or [] when not given)."""
    return [
        ("--good", args.good),
        ("--defective", args.defective),
        ("--pixel", args.pixel),
        ("--camera", args.camera is not None),
        ("--target-false-reject", args.target_false_reject is not None),
        ("--target-escape", args.target_escape is not None),
        ("--max-f1", args.max_f1),
        ("--pixel-fpr", args.pixel_fpr is not None),
        ("--precision", args.precision is not None),
    ]


def check_writable(path: Path, command: str = "calibrate", alternative: str = ", or --dry-run") -> None:
    """CalibrationError unless this user can create files in directory `path` (what rewriting a bundle needs). A file
    is created and removed there: permissions alone miss a read-only mount or an immutable flag."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=f".{command}-probe.", dir=Path(path).resolve())
    except OSError as exc:
        raise CalibrationError(
            f"{path}: not writable by {_user()} ({exc.strerror or exc}), expected a directory this user may write: "
            f"run {command} as the bundle's owner (e.g. sudo -u inspectd){alternative}"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _cameras_named(current) -> list[str]:
    """The cameras that thresholds document `current`, or a version in its history, has an override, a target or a
    drift reference for: those this station is known to have had."""
    named: set[str] = set()
    for doc in (current.to_dict(), *current.history):
        provenance = doc.get("provenance")
        for entries in (
            doc.get("per_camera"),
            *(
                provenance.get(key)
                for key in (thresholds_doc.PER_CAMERA_TARGET, thresholds_doc.PER_CAMERA_REFERENCE)
                if isinstance(provenance, dict)
            ),
        ):
            if isinstance(entries, dict):
                named.update(str(camera) for camera in entries)
    return sorted(named)


def _unchecked_camera_warning(args, bundle, current) -> str:
    """What calibrate says of --camera when no daemon at --apply told it the station's cameras (the daemon's answer is
    the one that counts; calibrate reaches the daemon only through its protocol): written for a camera the daemon
    does not run, the override judges nothing, and nothing else tells the operator so (a reload by the documented
    `systemctl reload` answers no one)."""
    how = (
        "the daemon at --apply did not answer, so reload it once it runs and watch its thresholds_unknown_cameras line"
        if args.apply
        else "give --apply ENDPOINT (the running daemon's control socket) to check it"
    )
    named = _cameras_named(current)
    if args.camera in named:
        return (
            f"note: --camera {args.camera} was not checked against the station's cameras ({how}); the thresholds of "
            f"{bundle.path} name camera(s) {', '.join(map(thresholds_doc.shown_name, named))}"
        )
    known = (
        f"they name camera(s) {', '.join(map(thresholds_doc.shown_name, named))}"
        if named
        else "they name no camera yet"
    )
    return (
        f"WARNING: --camera {args.camera} was not checked against the station's cameras, and no thresholds version "
        f"of {bundle.path} names it ({known}): an override for a camera the daemon does not run judges nothing; {how}"
    )


def _check_daemon(args, client: ControlClient, bundle, current, out) -> bool:
    """CalibrationError, before any scoring, when the daemon --apply names runs another model than BUNDLE (thresholds
    for other scores; e.g. teach switched the bundle since, or this is a stale copy), no camera --camera (a typo
    would become an override nobody uses), or would refuse the new version for an override it carries of a camera the
    daemon does not run (_refuse_overrides_not_run); whether it checked --camera against the daemon's cameras. A
    daemon that does not answer is a WARNING here, since nothing was checked, and is left to --apply itself to report
    (the version is still written, for its next start); a reply that is not the protocol's, or a handshake the daemon
    ended, is refused here."""
    try:
        reply = client.request({"cmd": "status"})
    except ControlTimeout as exc:
        # A dry run with --apply is how an operator checks the model and camera before a long run: its clean ending
        # must not pass for a check that never happened.
        then = (
            "a dry run checks nothing more"
            if args.dry_run
            else "the version is still written, and goes into service at the daemon's next reload or start"
        )
        # The client's own line, as ctl prints it: on an ipc:// path it says whether a socket file is there at
        # all, so a mistyped --apply is told as one before the scoring, not only at its end.
        print(
            f"WARNING: {exc}; the model the daemon runs and the cameras of the overrides were not checked; {then}",
            file=out,
        )
        return False
    if not reply.get("ok"):
        # It answered, and said no: set_thresholds would be refused the same way. (A key it does not let in, or a
        # --server-key that is not its key, ends the handshake instead: request raised that, naming the cause.)
        raise CalibrationError(f"--apply {args.apply}: the daemon refused: {reply.get('error')}")
    running = reply.get("model_id")
    if isinstance(running, str) and running != bundle.model_id:
        raise CalibrationError(
            f"--apply {args.apply}: the daemon runs model {running}, {bundle.path} is {bundle.model_id}, expected "
            "the bundle the daemon runs (reload it first, or calibrate its bundle)"
        )
    cameras = reply.get("cameras")
    if not isinstance(cameras, dict):
        return False
    if args.camera is not None and args.camera not in cameras:
        raise CalibrationError(
            f"--camera {args.camera}: the daemon at {args.apply} has no such camera, expected one of "
            f"{', '.join(sorted(cameras)) or 'its cameras (it has none)'}"
        )
    _refuse_overrides_not_run(args, bundle, current, sorted(cameras), reply.get("thresholds_version"))
    return args.camera is not None


def _versions(current) -> list[dict[str, Any]]:
    """Every version thresholds document `current` knows, itself first, then its history newest first."""
    return [current.to_dict(), *current.history]


def _overrides_of(doc: dict[str, Any]) -> set[str]:
    per_camera = doc.get("per_camera")
    return {str(camera) for camera in per_camera} if isinstance(per_camera, dict) else set()


def _overrides_sent(args, current) -> set[str] | None:
    """The cameras with an override in the version this run would send; None for a --rollback that cannot be made
    (refused later in its own words)."""
    if args.rollback is not None:
        try:
            return set(thresholds_doc.rollback(current, args.rollback).per_camera)
        except thresholds_doc.ThresholdsError:
            return None
    carried = set() if _overrides_to_drop(current, args, args.precision or "fp32") else set(current.per_camera)
    return carried | ({args.camera} if args.camera is not None else set())


def _can_roll_back(current, version: int) -> bool:
    """Whether `calibrate --rollback version` may restore it (not one set on a scorer teach has replaced since)."""
    try:
        thresholds_doc.rollback(current, version)
    except thresholds_doc.ThresholdsError:
        return False
    return True


def _refuse_overrides_not_run(args, bundle, current, cameras: list[str], running_version: Any) -> None:
    """CalibrationError, before any scoring, naming the overrides the new version would carry for cameras the
    daemon does not run, where the daemon's set_thresholds would refuse them: those not already in force there (it
    keeps an override in force for a camera taken out of its config). A `--camera cam01` written without --apply is
    carried into every later version, and each later --apply was refused only after minutes of scoring."""
    sent = _overrides_sent(args, current)
    if not sent:
        return
    # The daemon's running version, as the bundle's history holds it: its overrides are in force there. One the
    # history no longer holds is taken as having none, so every carried override is checked.
    in_force = next((_overrides_of(doc) for doc in _versions(current) if doc.get("version") == running_version), set())
    stale = sorted(sent - in_force - set(cameras))
    if not stale:
        return
    without = [
        doc["version"]
        for doc in _versions(current)
        if isinstance(doc.get("version"), int) and not _overrides_of(doc) & set(stale)
    ]
    earlier = [
        version
        for version in without
        if version not in (current.version, args.rollback) and _can_roll_back(current, version)
    ]
    if args.rollback is not None:
        what = f"version {args.rollback} holds"
        way = (
            f"roll back to a version without them (the newest is version {earlier[0]})"
            if earlier
            else "no earlier version is without them"
        )
        if current.version in without:
            way += f"; calibrate anew keeps version {current.version}'s overrides, which are none of them"
    else:
        what = "the new version would carry"
        way = (
            f"restore version {earlier[0]}, the newest without them, with `inspectd calibrate {bundle.path} "
            f"--rollback {earlier[0]}` (a rollback is calibrate's one way to remove an override), then calibrate "
            "again, --camera under the camera's right id"
            if earlier
            else f"no version of {bundle.path} is without them, and calibrate removes an override only by a "
            f"rollback: `inspectd ctl --endpoint {args.apply} reload` puts the bundle's version in service as it is, "
            "after which --apply takes them"
        )
    raise CalibrationError(
        f"--apply {args.apply}: {what} the override(s) of camera(s) {', '.join(stale)}, which the daemon does not "
        f"run (it runs {', '.join(cameras) or 'no camera'}) and refuses to take on (a --camera typo written without "
        f"--apply, or a camera renamed since): {way}"
    )


def _user() -> str:
    import getpass

    try:
        return f"user {getpass.getuser()}"
    except (KeyError, OSError):  # a uid without a name (a container's)
        return f"uid {os.getuid()}"


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _calibrate(bundle, current, args, out):
    from engines.data.images import duplicates_note
    from engines.errors import DataError

    if not args.good:
        raise CalibrationError("--good DIR is required: held-out defect-free images to set the threshold from")
    # Refuse bad numbers before minutes of scoring, not after.
    for flag, value in (
        ("--target-false-reject", args.target_false_reject),
        ("--target-escape", args.target_escape),
        ("--pixel-fpr", args.pixel_fpr),
    ):
        if value is not None:
            _rate(value, flag)
    if args.pixel_fpr is not None and not args.pixel:
        raise CalibrationError(
            "--pixel-fpr sets the pixel threshold's good-pixel rate: expected --pixel too (without it the pixel "
            "threshold is not set)"
        )
    good, good_nested = _good_paths(Path(args.good))
    defective, unmatched, nested = _defective_items(args.defective)
    if also := _in_both(good, defective):
        shown = ", ".join(str(p) for p in also[:3]) + (" ..." if len(also) > 3 else "")
        raise CalibrationError(
            f"--defective: {len(also)} image(s) are also in --good ({shown}), expected labelled defective images "
            "apart from the held-out good ones"
        )
    if (args.target_escape is not None or args.max_f1) and not defective:
        flag = "--target-escape" if args.target_escape is not None else "--max-f1"
        raise CalibrationError(
            f"{flag} needs labelled defective images (--defective DIR); without them the threshold "
            "would flag everything. Use --target-false-reject with good images only"
        )
    if not good:
        hint = _no_good_hint(args.good)
        raise DataError(f"{args.good}: no images found, expected held-out defect-free images{hint}")
    if args.defective and not defective:
        below = "".join(f"; {line.removeprefix('note: ')}" for line in nested)
        raise DataError(f"{', '.join(args.defective)}: no defective images found{below}")
    good, defective, duplicates = _distinct(good, defective)
    for line in ([good_nested] if good_nested else []) + nested:
        print(line, file=out)
    for left_out in duplicates:
        if left_out:
            print(duplicates_note(left_out), file=out)
    if args.pixel:
        # Else the pixel threshold is set on the good pixels' rate, as if no mask had been given.
        for line in unmatched:
            print(line, file=out)
    options, precision = _engine_options(bundle, current, args)
    overrides = _overrides_to_drop(current, args, precision)
    if overrides:
        dropping = ", ".join(map(thresholds_doc.shown_name, overrides))
        print(
            f"WARNING: every camera on {precision} scores: the per-camera overrides of {dropping} "
            f"(thresholds version {current.version}) were set on {_set_on(current)} scores and are dropped, so "
            f"those cameras judge by the new {precision} thresholds: set them again with `inspectd calibrate "
            f"{bundle.path} --camera ID --precision {precision}`",
            file=out,
        )
    if warning := _fitted_frames_warning(bundle, good):
        print(warning, file=out)
    for flag, paths in (("--good", good), ("--defective", [path for path, _ in defective])):
        if warning := _bit_depth_warning(bundle, flag, paths):
            print(warning, file=out)
    if args.pixel and args.pixel_fpr is not None and _has_masks(defective):
        print(
            f"note: --pixel-fpr {args.pixel_fpr:g} not used: the defects have masks, the pixel threshold is their "
            "pixel F1-max",
            file=out,
        )
    if args.pixel and (warning := _maskless_warning(defective)):
        print(warning, file=out)
    scored = _score(bundle, args, good, defective, options)
    if skipped := scored.skipped_good + scored.skipped_defect:
        from engines.training.evaluate import skipped_lines

        for line in skipped_lines(skipped, scored.masks_left_out):
            print(line, file=out)
    for left_out in (scored.twins_good, scored.twins_defect):
        if left_out:
            print(duplicates_note(left_out, pixels=True), file=out)
    image, pixel, chosen = _choose(args, scored, out)
    hold = rejects_most(scored.good, image)
    if pixel is None:  # the pixel threshold in force after this write: the camera's override's, else the document's
        override = current.per_camera.get(args.camera, {}) if args.camera is not None else {}
        in_force = override.get("pixel_threshold", current.pixel_threshold)
    else:
        in_force = pixel
    if scores_pool_the_map(bundle.manifest) and (warning := regionless_warning(image, in_force, args.camera)):
        print(warning, file=out)
        _add_warning(chosen["observed"], warning.removeprefix("WARNING: "))
    provenance = {
        "tool": f"inspectd calibrate {inspectd_version()}",
        "good_dir": str(Path(args.good).resolve()),
        "n_good": int(scored.good.size),
        "n_skipped_good": len(scored.skipped_good),
        "n_duplicates_good": len(duplicates[0]) + len(scored.twins_good),
        "defective_dirs": [str(Path(d).resolve()) for d in args.defective],
        "n_defective": int(scored.defect.size),
        "n_skipped_defective": len(scored.skipped_defect),
        "n_duplicates_defective": len(duplicates[1]) + len(scored.twins_defect),
        **(
            {"n_defective_without_mask": sum(mask is None for _, mask in defective)}
            if args.pixel and scored.has_masks
            else {}
        ),
        "model_id": bundle.model_id,
        # What the scores were computed in: a daemon whose engine runs the same precision judges by them as they are.
        thresholds_doc.ENGINE_PRECISION: precision,
        **chosen,
        # The drift alarm's references: the good images, as train and teach record their held-out ones.
        thresholds_doc.GOOD_SCORES: thresholds_doc.good_score_reference(scored.good),
        thresholds_doc.GOOD_BRIGHTNESS: thresholds_doc.good_score_reference(scored.good_brightness),
    }
    # Every score this calibration saw, which the daemon's set_thresholds checks a new threshold against.
    seen = np.concatenate([scored.good, scored.defect])
    image_scores = thresholds_doc.score_range(float(seen.min()), float(seen.max()), seen.size)
    provenance[thresholds_doc.IMAGE_SCORES] = image_scores
    if scored.pixels is not None:
        provenance[thresholds_doc.PIXEL_SCORES] = _pixel_range(scored.pixels)
    if args.camera is None and (warning := thresholds_doc.reference_warning(int(scored.good.size), "good images")):
        print(warning, file=out)
    if args.camera is not None:
        provenance["camera"] = args.camera
        # The pooled references describe every camera's good frames, and the target and observed the global threshold
        # that every other camera's drift false-reject warning is measured against: one camera's images replace
        # neither. This camera's own go under per_camera_target and per_camera_reference, where drift.monitor_for
        # looks for them first.
        for key in (thresholds_doc.GOOD_SCORES, thresholds_doc.GOOD_BRIGHTNESS, "target", "observed"):
            if key in current.provenance:
                provenance[key] = current.provenance[key]
            else:
                provenance.pop(key, None)
        # Merged, not replaced: a pixel override from an earlier --pixel run stays when this one sets no pixel.
        override = {
            **current.per_camera.get(args.camera, {}),
            "image_threshold": image,
            **({"pixel_threshold": pixel} if pixel is not None else {}),
        }
        per_camera = {**current.per_camera, args.camera: override}
        provenance[thresholds_doc.PER_CAMERA_TARGET] = {
            **thresholds_doc.camera_targets(current, per_camera),
            args.camera: chosen,
        }
        # The --good images are this camera's: its own drift references, the other cameras' carried. Too few for one,
        # an earlier reference of this camera goes too, as it may show the view this calibration was run to leave.
        references = thresholds_doc.carried_camera_references(current, provenance)
        references.pop(args.camera, None)
        references.update(
            thresholds_doc.camera_references({args.camera: scored.good}, {args.camera: scored.good_brightness})
        )
        if warning := thresholds_doc.camera_reference_warning(args.camera, int(scored.good.size), "good images"):
            print(warning, file=out)
        if references:
            provenance[thresholds_doc.PER_CAMERA_REFERENCE] = references
        return thresholds_doc.next_version(current, per_camera=per_camera, provenance=provenance), hold
    # The overrides carry over to the next version, and with them what each was set on.
    per_camera = {} if overrides else current.per_camera
    if carried := thresholds_doc.camera_targets(current, per_camera):
        provenance[thresholds_doc.PER_CAMERA_TARGET] = carried
    if references := thresholds_doc.carried_camera_references(current, provenance):
        provenance[thresholds_doc.PER_CAMERA_REFERENCE] = references
    elif isinstance(dropped := current.provenance.get(thresholds_doc.PER_CAMERA_REFERENCE), dict) and dropped:
        shown = ", ".join(map(thresholds_doc.shown_name, sorted(dropped)))
        print(
            f"note: the drift references of camera(s) {shown} were set on other scores "
            f"({_set_on(current)}, model {current.provenance.get('model_id')}) and are dropped: their drift alarms "
            f"compare with this calibration's references until `inspectd calibrate {bundle.path} --camera ID` "
            "records their own again",
            file=out,
        )
    new = thresholds_doc.next_version(
        current, image_threshold=image, pixel_threshold=pixel, per_camera=per_camera, provenance=provenance
    )
    return new, hold


def _bit_depth_warning(bundle, flag: str, paths: list[Path]) -> str | None:
    """The WARNING when the 16-bit images of `paths` (the --good or --defective set) hold another depth than BUNDLE
    narrows 16-bit frames as (its input.bit_depth, 16 where it declares none): scored narrowed that way, 12-bit frames
    on a bundle trained on 8-bit ones came out near black, and the threshold set on them was ten times the one their
    camera's frames score at. A set mixing 8- and 16-bit images is refused in train's words (detect_bit_depth's)."""
    from engines.data.images import detect_bit_depth
    from engines.errors import DataError

    try:
        detected = detect_bit_depth(paths)
    except DataError:
        # A file that does not decode is scoring's to leave out and name; the depth is that of those that decode
        # (and a mixed set is refused by this second look).
        detected = detect_bit_depth([path for path in paths if _depth_readable(path)])
    if detected is None or detected.bits == bundle.bit_depth:
        return None
    why = (
        f"low {detected.padding} bits 0 in every value (left-aligned)"
        if detected.padding >= 2 and not detected.ambiguous
        else f"largest value {detected.largest}"
    )
    declared = "its input.bit_depth" if bundle.declared_bit_depth else "it declares no input.bit_depth"
    seen = "darker" if detected.bits < bundle.bit_depth else "brighter (saturating above full scale)"
    return (
        f"WARNING: {flag}: 16-bit images, {why}: {detected.bits}-bit, and {bundle.path} narrows 16-bit frames as "
        f"{bundle.bit_depth}-bit ({declared}, >> {bundle.bit_depth - 8}): the model sees them {seen} than "
        f"{detected.bits}-bit frames are, and the threshold is set on scores the line may not give; calibrate on "
        f"frames as the daemon receives them (an archive export), or a bundle trained with --bit-depth {detected.bits}"
    )


def _depth_readable(path: Path) -> bool:
    """Whether the image at `path` counts toward its set's bit depth: it decodes, to unsigned 8- or 16-bit pixels (a
    float32 TIFF would stand as the 8-bit half of a set refused as mixed; scoring leaves it out and names it)."""
    from engines.data.images import detect_bit_depth
    from engines.errors import DataError

    try:
        detect_bit_depth([path])
    except (DataError, OSError):
        return False
    return True


def _in_both(good: list[Path], defective: list[tuple[Path, Path | None]]) -> list[str]:
    """The --defective images that are also --good images, by resolved path (a link, or the folder typed another
    way, is the same file) or by their bytes (a copy, as without_duplicates finds it), each as the refusal names
    it: scored as both, they would pull the threshold onto the good frames."""
    from engines.data.images import without_duplicates

    goods = {path.resolve() for path in good}
    same = [path for path, _ in defective if path.resolve() in goods]
    if same:
        return [str(path) for path in same]
    # The good frames first: a defective frame with a good copy is the one left out, and named with that copy.
    _, copies = without_duplicates([*good, *(path for path, _ in defective)])
    goods_given = {id(path) for path in good}  # without_duplicates gives back the very Path objects it was given
    return [
        f"{path} (a copy of {earlier})"
        for path, earlier in copies
        if id(earlier) in goods_given and id(path) not in goods_given
    ]


def _set_on(thresholds) -> str:
    """The precision of the scores `thresholds` were set on (documents from before it was recorded: fp32)."""
    return thresholds.provenance.get(thresholds_doc.ENGINE_PRECISION, "fp32")


def _overrides_to_drop(current, args, precision: str) -> list[str]:
    """The cameras whose overrides a calibration of every camera on `precision` drops: the document records one
    precision for all its thresholds, and the daemon's score-shift check reads it for the overrides too, so kept they
    would pass as set on `precision` scores. Refusing instead would leave no way to move them: --camera is refused
    on a precision other than the document's (_engine_options)."""
    if args.camera is not None or precision == _set_on(current):
        return []
    return sorted(current.per_camera)


def _engine_options(bundle, current, args) -> tuple[dict[str, Any], str]:
    """The engine options calibrate scores with and the precision they pin (--precision, default fp32: TensorRT would
    otherwise take a plan of any precision, and the document would not say which), refused before any scoring where
    the backend has no such precision or BUNDLE lacks its graph or plan."""
    from engines.runtime import backend_class

    engine = backend_class(args.backend)
    precision = args.precision or "fp32"
    if "precision" not in {field.name for field in dataclasses.fields(engine.Options)}:
        if precision != "fp32":
            raise CalibrationError(f"--precision {precision}: the {args.backend} backend computes in fp32 only")
        return {}, precision
    options = {"precision": precision}
    engine.check_bundle(bundle, engine.parse_options(options, where="engine.options"))
    if args.backend == "tensorrt" and args.precision is None:
        # The engine, once it opens, would only say to build an fp32 plan: the plan the bundle has is likely the one
        # the daemon runs, and --precision sets thresholds on its scores.
        others = _plan_precisions(bundle)
        if others and "fp32" not in others:
            raise CalibrationError(
                f"--backend tensorrt without --precision scores on an fp32 plan, and {bundle.path} has only "
                f"{', '.join(others)} plans: give {' or '.join(f'--precision {p}' for p in others)} to set thresholds "
                f"on that plan's scores (the daemon's engine.options.precision), or build an fp32 plan with "
                f"`inspectd build-engine {bundle.path}`"
            )
    in_force = _set_on(current)
    if args.camera is not None and precision != in_force:
        raise CalibrationError(
            f"--camera {args.camera} on {precision} scores: thresholds version {current.version} were set on "
            f"{in_force} scores, expected --precision {in_force} for one camera's override (or calibrate every camera "
            "on the new precision, without --camera)"
        )
    return options, precision


def _plan_precisions(bundle) -> list[str]:
    """The precisions of BUNDLE's TensorRT plans, by their sidecars; one it cannot read is left to the engine's own
    choice of plan to name."""
    from engines.bundle.plans import listed_plans, read_sidecar, sidecar_name
    from engines.errors import BundleError

    found = set()
    for name in listed_plans(bundle.manifest):
        try:
            found.add(read_sidecar(bundle.path / sidecar_name(name)).precision)
        except BundleError:
            continue
    return sorted(found)


def _fitted_frames_warning(bundle, good: list[Path]) -> str | None:
    """A WARNING when --good holds frames BUNDLE's scorer was fitted from (its teach's frames, else train's): a
    model scores those lower than the line's, so a threshold set on them is too low and rejects good parts. By the
    frames' content, not their paths: a link to the folder, its path spelt another way, a copy of it, or an archive
    export of the span taught on are the same frames. Frames the fit held out count apart: they score as new ones. A
    warning, never a refusal: a folder moved or removed since gives none, one this user may not read (a trainer's
    home, calibrate run as the service user) a note line saying the frames were not compared."""
    from engines.errors import EngineError
    from inspectd.protocol.archive import ArchiveError

    taught = bundle.manifest.get("teach")
    if isinstance(taught, dict):
        record = taught.get("frames")
        fitted_on = f"version {taught.get('version', '?')} was fitted on"
        taught_on = f"version {taught.get('version', '?')} was taught on"
    else:
        record = bundle.manifest.get("training")
        fitted_on = taught_on = "was trained on"
    if not isinstance(record, dict):
        return None

    def not_compared(reason: str) -> str:
        return (
            f"note: the --good frames were not compared with the frames {bundle.path} {taught_on} ({reason}, as "
            f"{_user()})"
        )

    ids = record.get("ids")
    if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
        # Taught from the archive: each frame's id is its file name there and in every export of it, and an id names
        # one capture (camera, time, sequence number), so the name alone is the frame. An export whose files were
        # renamed since is known by its bytes, which are the archive's own files', as a folder's frames are.
        source, fitted = str(record.get("archive", "the archive")), [Path(f"{i}.png") for i in ids]
        at = {path.name: i for i, path in enumerate(fitted)}
        by_name = {j: at[path.name] for j, path in enumerate(good) if path.name in at}
        try:
            archived = _archived_frames(source, ids)
        except ArchiveError as exc:
            if not by_name:
                return not_compared(str(exc))
            archived = {}
        _, same = _same_content(list(archived), good)
        matched = list(({j: archived[frame] for j, frame in same.items()} | by_name).values())
    else:
        folder = record.get("folder") if isinstance(taught, dict) else record.get("data")
        if not isinstance(folder, str):
            return None
        try:
            listed = _fitted_folder_frames(folder, taught, record, good)
            if listed is None:
                return None
            source, fitted, matched = listed
        except (OSError, EngineError, ValueError) as exc:
            return not_compared(
                f"{exc.filename or folder}: {exc.strerror or exc}" if isinstance(exc, OSError) else _one_line(exc)
            )
    if not matched:
        return None
    fit = _fitted_indices(bundle, fitted)
    if fit is None:
        which = " (fitted or held out: its record does not say which)" if isinstance(taught, dict) else ""
        count, said, held = len(matched), f"{taught_on}{which}", ""
    else:
        # Frames the fit held out score as new ones: calibrating on them alone is what teach itself did.
        count = sum(i in fit for i in matched)
        if not count:
            return None
        more = len(matched) - count
        said, held = fitted_on, f"; {more} more are frames it held out of that fit, as new ones are" if more else ""
    return (
        f"WARNING: {count} of {len(good)} --good frames are frames {bundle.path} {said} ({source}){held}: a model "
        "scores the frames it was fitted on lower than new ones, so a threshold set on them comes out too low and "
        "rejects good parts; calibrate on held-out frames (an MVTec root's test/good, or frames captured since)"
    )


def _fitted_folder_frames(
    folder: str, taught, record: dict, good: list[Path]
) -> tuple[str, list[Path], list[int]] | None:
    """(the folder, its frames as the fit listed them: in order, copies and frames it left out not among them, and
    for each --good frame that is one of them, its index there) of the folder train or a teach fitted on; None when
    it is gone."""
    from engines.data.images import good_folder, list_images

    if not isinstance(taught, dict):
        folder = str(good_folder(folder, ("train",)))
    # pathlib's is_dir() raises on EACCES (a folder under another user's 0700 home), not only listing it.
    if not Path(folder).is_dir():
        return None
    if not isinstance(taught, dict):
        # Train fitted on the folder less its copies: the one comparison that finds those finds the --good frames
        # among them too, so each training frame is read once.
        frames = list_images(folder)
    else:
        from calibration.teach import folder_frames

        unreadable = record.get("unreadable") or []
        if not isinstance(unreadable, list) or not all(isinstance(name, str) for name in unreadable):
            return None  # a hand-edited record: it does not say which frames the fit skipped
        skipped = set(unreadable)
        models = record.get("model_ids")
        taught_frames = folder_frames(folder, models if isinstance(models, list) else None)
        frames = [path for path in taught_frames.paths if path.name not in skipped]
    fitted, same = _same_content(frames, good)
    at = {id(path): i for i, path in enumerate(fitted)}
    return folder, fitted, [at[id(frame)] for frame in same.values()]


def _archived_frames(archive: str, ids: list[str]) -> dict[Path, int]:
    """The file in `archive` of each frame of `ids` it still keeps, and that frame's index in `ids`; none when the
    archive is gone. An ArchiveError when it cannot be read."""
    from inspectd.protocol.archive import ArchiveError, ArchiveReader, NoArchive

    try:
        reader = ArchiveReader(archive)
    except NoArchive:
        return {}
    found = {}
    with reader:
        for i, entry_id in enumerate(ids):
            try:
                found[reader.file(reader.get(entry_id))] = i
            except ArchiveError:  # expired since (the archive's age or size bound): an export still names it
                continue
    return found


def _same_content(frames: list[Path], good: list[Path]) -> tuple[list[Path], dict[int, Path]]:
    """(`frames` less the files whose bytes repeat an earlier one's, in order; for each --good frame whose bytes are
    one of those, by its place in `good`, that frame). One without_duplicates over both (only files of a size
    another has are read, and each once); with the frames first, a --good copy is the one it leaves out."""
    from engines.data.images import without_duplicates

    places = {id(path): j for j, path in enumerate(good)}  # it gives back the very Path objects it was given
    kept, copies = without_duplicates([*frames, *good])
    same = {places[id(path)]: earlier for path, earlier in copies if id(path) in places and id(earlier) not in places}
    return [path for path in kept if id(path) not in places], same


def _fitted_indices(bundle, fitted: list[Path]) -> set[int] | None:
    """The indices into `fitted` (the frames of BUNDLE's fit, in its order) of those the scorer was fitted on, the
    rest held out; None where its record does not say (another list of names, a fit cut short, a split it does not
    know). By the names' checksum only: the pixels' would decode every fitted frame, and the --good frames that
    matter were compared by their bytes."""
    from calibration.teach import current_fit
    from engines.data.images import frames_checksums

    names = frames_checksums(fitted, np.zeros(0, np.uint8))["names_sha256"]
    try:
        fit = current_fit(bundle, {"names_sha256": names}, len(fitted))
    except (ValueError, KeyError, TypeError):  # a scorer teach cannot refit, a hand-edited record
        return None
    return None if fit is None else {int(i) for i in fit}


APPLIED, REFUSED, UNREACHABLE, TAKEN = "applied", "refused", "unreachable", "taken"


def _apply(endpoint: str, client: ControlClient, new, out) -> str:
    """Send `new` to the daemon at --apply: APPLIED, REFUSED (it checked and said no), TAKEN (it took the request and
    did not answer in time: busy, e.g. with a reload; it checks and writes the version itself when it gets to it) or
    UNREACHABLE (no daemon took it; the version is still written to the bundle, for its next start or reload)."""
    try:
        with client:
            reply = client.request({"cmd": "set_thresholds", "thresholds": new.to_dict()})
    except HandshakeFailed as exc:  # a daemon that shuts this key out is running: nothing is written for it
        print(f"inspectd calibrate: --apply {endpoint}: {exc}", file=sys.stderr)
        return REFUSED
    except ControlTimeout as exc:
        print(f"inspectd calibrate: --apply {endpoint}: {exc}", file=sys.stderr)
        return TAKEN if exc.sent else UNREACHABLE
    except MessageError as exc:
        # It answered, so it took the version and may have applied it (and written it into its bundle): not a
        # daemon that was never reached, whose version calibrate writes for its next start.
        print(
            f"inspectd calibrate: --apply {endpoint}: {exc}: the daemon answered in a reply calibrate cannot read, "
            f"so version {new.version} may have been applied",
            file=sys.stderr,
        )
        return TAKEN
    except InspectdError as exc:
        print(f"inspectd calibrate: --apply {endpoint}: {exc}", file=sys.stderr)
        return UNREACHABLE
    if not reply.get("ok"):
        print(f"inspectd calibrate: --apply {endpoint}: the daemon refused: {reply.get('error')}", file=sys.stderr)
        return REFUSED
    print(
        f"applied: the daemon at {endpoint} now judges with thresholds version {reply.get('thresholds_version', '?')}",
        file=out,
    )
    return APPLIED
