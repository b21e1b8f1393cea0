"""`inspectd eval`: score a bundle on an MVTec-layout folder, report metrics, draw overlays.

Owns `score_images`, the one way to run a bundle over a list of image files (the calibration tool uses it too): each
image is decoded by engines.data.images.load_image and run through a runtime backend (engines.runtime.open_engine) by
an engines.runtime Predictor, which fits it into one preallocated batch buffer and maps its anomaly map back to the
frame's own size. Metrics come from engines.training.metrics: image AUROC and F1-max
over image scores, pixel AUROC and AUPRO (FPR <= 0.3) over every pixel at frame size, streamed into histograms so
nothing but a few overlay candidates is held. Per-defect-type rows compare that type against the good images.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import heapq
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from engines.bundle.format import FORMAT, describe_recipe, fitted_memory_bank
from engines.data.images import (
    DEFECT_FREE_WORDS,
    GOOD,
    MvtecFolder,
    TestItem,
    ascii_name,
    binary_mask,
    load_image,
    read_error,
    read_mask,
    skipped_warnings,
    unread_warning,
)
from engines.durable import unwritable
from engines.errors import DataError, EngineError
from engines.progress import Progress
from engines.runtime.predictor import Predictor
from engines.training import metrics

OVERLAY_GROUPS = ("worst-good", "best-defect", "worst-defect")


@dataclasses.dataclass(frozen=True)
class ScoredImage:
    path: Path
    image: np.ndarray  # uint8 HxW or HxWx3 as loaded (RGB)
    score: float
    frame_map: np.ndarray  # float32 HxW anomaly map in the frame's own coordinates


def score_images(
    bundle,
    paths: Iterable[str | Path],
    backend: str = "onnxruntime",
    batch: int = 8,
    options: dict | None = None,
    on_unreadable: Callable[[Path, DataError], None] | None = None,
) -> Iterator[ScoredImage]:
    """Score image files with `bundle` (an engines.bundle.store.Bundle, or a bundle directory), in order, `batch` at a
    time.

    The engine is opened on the first item and closed when the iterator is exhausted or closed. Decoding of the next
    batch overlaps inference of the current one. An image that cannot be read or does not decode ends the run with
    its DataError, unless `on_unreadable` is given: it is then called with the image's path and that DataError
    (engines.data.images.read_error tells which of the two), and the image is left out of what is yielded.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise EngineError(f"batch: {batch!r}, expected an integer >= 1")
    if isinstance(bundle, (str, Path)):
        from engines.bundle.store import load_bundle

        bundle = load_bundle(bundle)
    from engines.runtime import open_engine

    chunks = _chunks((Path(p) for p in paths), batch)
    skip = on_unreadable is not None
    with (
        open_engine(bundle, backend, options, max_batch=batch) as engine,
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decoder,
    ):
        predictor = Predictor(engine)
        pending = _submit_decode(decoder, next(chunks, None), bundle.bit_depth, skip)
        while pending is not None:
            chunk, images, failed = pending.result()
            pending = _submit_decode(decoder, next(chunks, None), bundle.bit_depth, skip)
            for path, reason in failed:
                on_unreadable(path, reason)  # type: ignore[misc]  # failures come back only where it is given
            if not images:
                continue
            result = predictor.predict(images)
            for i, (path, image) in enumerate(zip(chunk, images)):
                frame_map = predictor.frame_map(result, i)
                # A map that needed no resize is a view into the engine's output, which the next batch may reuse.
                if np.shares_memory(frame_map, result.maps):
                    frame_map = frame_map.copy()
                yield ScoredImage(path, image, float(result.scores[i]), frame_map.astype(np.float32, copy=False))


def _chunks(items: Iterator[Path], size: int) -> Iterator[list[Path]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _submit_decode(decoder, chunk, bit_depth: int, skip: bool):
    if chunk is None:
        return None
    return decoder.submit(_decode, chunk, bit_depth, skip)


def _decode(
    chunk: list[Path], bit_depth: int, skip: bool
) -> tuple[list[Path], list[np.ndarray], list[tuple[Path, DataError]]]:
    """(the paths that decoded, their images, (path, error) of those that did not: only when `skip`, else the first
    such error is raised)."""
    decoded, images, failed = [], [], []
    for path in chunk:
        try:
            images.append(load_image(path, bit_depth))
        except DataError as exc:
            if not skip:
                raise
            failed.append((path, exc))
            continue
        decoded.append(path)
    return decoded, images, failed


# --- evaluation -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _TypeTally:
    """What one test sub-folder (defect type or good) contributes: image scores and its pixel histograms."""

    scores: list[float] = dataclasses.field(default_factory=list)
    pixels: metrics.PixelHistograms | None = None  # created on the first image with a usable ground truth
    without_mask: int = 0
    empty_masks: int = 0  # defective images whose mask decodes with no defect pixel


@dataclasses.dataclass(order=True)
class _Candidate:
    key: float
    order: int
    group: str = dataclasses.field(compare=False)
    item: TestItem = dataclasses.field(compare=False)
    scored: ScoredImage = dataclasses.field(compare=False)
    mask: np.ndarray | None = dataclasses.field(compare=False)


class _OverlayPicker:
    """Keeps the k highest-scored goods, k highest- and k lowest-scored defects seen so far (bounded heaps)."""

    def __init__(self, n: int) -> None:
        base, extra = divmod(n, len(OVERLAY_GROUPS))
        self.sizes = {g: base + (i < extra) for i, g in enumerate(OVERLAY_GROUPS)}
        self.heaps: dict[str, list[_Candidate]] = {g: [] for g in OVERLAY_GROUPS}
        self.counter = itertools.count()

    def offer(self, item: TestItem, scored: ScoredImage, mask: np.ndarray | None) -> None:
        offers: tuple[tuple[str, float], ...]
        if item.is_defective:
            offers = (("best-defect", scored.score), ("worst-defect", -scored.score))
        else:
            offers = (("worst-good", scored.score),)
        for group, key in offers:
            heap, size = self.heaps[group], self.sizes[group]
            if not size:
                continue
            candidate = _Candidate(key, next(self.counter), group, item, scored, mask)
            if len(heap) < size:
                heapq.heappush(heap, candidate)
            elif candidate.key > heap[0].key:
                heapq.heapreplace(heap, candidate)

    def picked(self) -> list[_Candidate]:
        seen, out = set(), []
        for group in OVERLAY_GROUPS:
            for candidate in sorted(self.heaps[group], reverse=True):
                if candidate.item.path not in seen:
                    seen.add(candidate.item.path)
                    out.append(candidate)
        return out


def evaluate(
    bundle,
    data: str | Path,
    backend: str = "onnxruntime",
    batch: int = 8,
    options: dict | None = None,
    n_overlays: int = 0,
    overlay_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Score every test image of an MVTec-layout folder and return the report (a JSON-ready dict); `progress` shows
    images scored of all. An image that cannot be read or does not decode, or whose mask cannot be read or does not
    decode, is left out and counted (`n_skipped`, `skipped`: the file at fault); when none is left, the first one's
    DataError is raised. `notes` holds the lines that say what the metrics lack and why (the table prints them)."""
    if isinstance(bundle, (str, Path)):
        from engines.bundle.store import load_bundle

        bundle = load_bundle(bundle)
    folder = MvtecFolder(data)
    items = folder.test_items()
    if not items:
        raise EngineError(f"{folder.root / 'test'}: no test images, expected test/<type>/ folders with images")
    by_path = {item.path: item for item in items}
    tallies = {GOOD: _TypeTally()} | {t: _TypeTally() for t in folder.defect_types()}
    skipped: list[tuple[Path, DataError]] = []
    masks_left_out: set[Path] = set()  # of `skipped`, the masks: one that cannot be read is said apart
    picker = _OverlayPicker(n_overlays if overlay_dir is not None else 0)
    maskless_pixels: metrics.PixelHistograms | None = None  # only for the overlay colour scale
    # Every histogram is keyed on the first map's median (None until one is added), so that rows can add them up.
    reference: float | None = None

    per_image: list[dict] = []
    scoring_seconds = 0.0
    scored_images = score_images(
        bundle,
        [item.path for item in items],
        backend=backend,
        batch=batch,
        options=options,
        on_unreadable=lambda path, exc: skipped.append((path, exc)),
    )
    progress = progress or Progress(enabled=False)
    progress.start(len(items), "eval: images scored")
    shown = 0
    while True:
        start = time.perf_counter()
        scored = next(scored_images, None)
        scoring_seconds += time.perf_counter() - start
        if scored is None:
            break
        item = by_path[scored.path]
        mask = None
        if item.is_defective and item.mask_path is not None:
            truth = frame_mask(item.mask_path, scored.frame_map.shape)
            if isinstance(truth, DataError):
                skipped.append((item.mask_path, truth))
                masks_left_out.add(item.mask_path)
                continue
            mask = truth
        tally = tallies[item.defect_type]
        if mask is not None and not mask.any():
            tally.empty_masks += 1  # its pixels go into the defect-free histogram (metrics.PixelHistograms.add)
        tally.scores.append(scored.score)
        per_image.append({"path": str(item.path), "type": item.defect_type, "score": scored.score})
        if item.is_defective and item.mask_path is None:
            tally.without_mask += 1  # unknown ground truth: its pixels are neither defect nor defect-free
            if maskless_pixels is None:
                maskless_pixels = metrics.PixelHistograms(reference)
            pixels = maskless_pixels
        else:
            if tally.pixels is None:
                tally.pixels = metrics.PixelHistograms(reference)
            pixels = tally.pixels
        pixels.add(scored.frame_map, mask, what=str(item.path))
        reference = pixels.reference
        picker.offer(item, scored, mask)
        shown = len(per_image) + len(skipped)
        progress.update(shown)
    if len(per_image) + len(skipped) > shown:  # images that did not decode after the last one scored
        progress.update(len(per_image) + len(skipped))
    progress.finish()
    if not per_image:
        raise skipped[0][1]  # not one image decodes: as if it had been refused at the first

    report = {
        "bundle": str(bundle.path),
        "model_id": bundle.model_id,
        "method": bundle.method,
        "backbone": bundle.backbone,
        "input": list(bundle.input_shape),
        "resize": bundle.resize_policy,
        "bit_depth": bundle.declared_bit_depth,
        "recipe": bundle.recipe,
        "memory_bank": fitted_memory_bank(bundle.manifest),  # the recipe's memory_size is the bank's cap
        "recipe_choice": (bundle.manifest.get("recipe_selection") or {}).get("reason"),
        "backend": backend,
        "batch": batch,
        "data": str(folder.root),
        "n_images": len(per_image),
        "n_skipped": len(skipped),
        "skipped": [str(path) for path, _ in skipped],
        "good_folder": None if folder.good_dir is None else folder.good_dir.name,
        "unmatched_masks": [
            {"folder": str(u.folder), "n_files": u.n_files, "expected": u.expected} for u in folder.unmatched_masks()
        ],
        "notes": [],
        "seconds": round(scoring_seconds, 3),
        "images_per_s": round(len(per_image) / scoring_seconds, 2) if scoring_seconds > 0 else None,
        "overall": None,
        "per_type": {},
        "pixel_metrics": (
            "every pixel at frame size, streamed into 2^20-bin float histograms of the value less the first "
            "map's median (engines.training.metrics)"
        ),
        "overlays": [],
        "images": per_image,
    }
    good = tallies[GOOD]
    defect_types = [t for t in tallies if t != GOOD]
    report["notes"] = _notes(folder, defect_types, skipped, masks_left_out)
    report["overall"] = _row([good] + [tallies[t] for t in defect_types], n_good=len(good.scores))
    for defect_type in defect_types:
        report["per_type"][defect_type] = _row([good, tallies[defect_type]], n_good=len(good.scores))
    report["notes"] += _empty_mask_notes(folder, tallies)

    if overlay_dir is not None and n_overlays > 0:
        histograms = [h for h in [*(t.pixels for t in tallies.values()), maskless_pixels] if h is not None]
        everything = sum(histograms[1:], histograms[0])
        scale = (everything.quantile(0.01), everything.quantile(0.999))
        try:
            pixel_threshold = bundle.thresholds().pixel_threshold
        except EngineError:
            pixel_threshold = None
        report["overlays"] = [str(p) for p in write_overlays(picker.picked(), overlay_dir, scale, pixel_threshold)]
        report["overlay_scale"] = list(scale)
    return report


def frame_mask(path: Path, shape: tuple[int, int]) -> np.ndarray | DataError:
    """The ground truth of a defective image as a bool map at its frame's `shape`, or the DataError of a mask that
    cannot be read or does not decode (a file cut short by a copy): its image is then left out, as an image that does
    not decode is (read as defect-free it would falsify the pixel metrics, and a refusal would throw away every image
    scored so far). A mask that decodes at another size is refused (raised): it belongs to another image or crop, a
    mistake in the ground truth rather than one damaged file. Eval's and calibrate's one way of reading masks."""
    try:
        decoded = read_mask(path)
    except DataError as exc:
        return exc
    return binary_mask(decoded, shape, path)


def skipped_lines(skipped: list[tuple[Path, DataError]], masks: set[Path]) -> list[str]:
    """The WARNING lines for images left out: `skipped` holds (the image, or its mask where that was at fault, why)
    of each; `masks` says which of those paths are masks. A mask that cannot be read is said apart, with the system's
    reason; one that does not decode is named among the images that do not."""
    unread_masks = [(path, why) for path, exc in skipped if path in masks and (why := read_error(exc)) is not None]
    said = {path for path, _ in unread_masks}
    lines = skipped_warnings([(path, exc) for path, exc in skipped if path not in said])
    if unread_masks:
        lines.append(unread_warning(unread_masks, "whose mask cannot be read"))
    return lines


def _notes(
    folder: MvtecFolder, defect_types: list[str], skipped: list[tuple[Path, DataError]], masks: set[Path]
) -> list[str]:
    """One line for each thing that leaves metrics out or images unscored, which blank cells alone would not say.
    `skipped`: (the image or mask, why) of each image left out; `masks`: which of those paths are masks."""
    notes = skipped_lines(skipped, masks)
    test = folder.root / "test"
    if folder.good_dir is None:
        notes.append(
            f"note: {test} has no defect-free folder ({DEFECT_FREE_WORDS}), which image AUROC and "
            f"F1-max need: every test image was taken as defective (folders: {', '.join(defect_types) or 'none'})"
        )
    found = {item.defect_type for item in folder.test_items()}
    if folder.good_dir is not None and GOOD not in found:
        # A row of dashes in those columns, beside pixel metrics that are there, reads as a model that failed.
        notes.append(
            f"note: {folder.good_dir} holds no images, which image AUROC and F1-max need, so their columns are "
            "blank: expected the defect-free test images there"
        )
    if not any(t in found for t in defect_types):
        # Without this the blank columns read as a model that failed, not a test set without defects.
        empty = f" ({', '.join(t + '/' for t in defect_types)} without images)" if defect_types else ""
        good = folder.good_dir.name if folder.good_dir else "good"
        notes.append(
            f"note: {test} has no defective images{empty}, which image AUROC, F1-max and the pixel metrics need, so "
            f"their columns are blank: expected test/<type>/ folders of defective images beside {good}/"
        )
    else:
        notes += [f"note: {test / t} holds no images, so its row is blank" for t in defect_types if t not in found]
    notes += [u.note() for u in folder.unmatched_masks()]
    notes += folder.nested_notes("evaluated", "move them up into it to evaluate them")
    return notes


def _empty_mask_notes(folder: MvtecFolder, tallies: dict[str, _TypeTally]) -> list[str]:
    """A line for each defect type with masks that decode but hold no defect pixel (an export at the wrong level, a
    label tool's empty layer): their pixels are counted as defect-free, and where no mask of the type has a defect
    pixel its pixel columns are blank, which a row of dashes alone would read as a model that failed."""
    notes = []
    anywhere = any(t.pixels is not None and t.pixels.n_defect for t in tallies.values())
    for defect_type, tally in tallies.items():
        if not tally.empty_masks:
            continue
        line = (
            f"note: {tally.empty_masks} defective image(s) in {folder.root / 'test' / defect_type} have a mask with "
            "no defect pixel: their pixels count as defect-free"
        )
        if tally.pixels is None or not tally.pixels.n_defect:
            whose = "its row's" if anywhere else "its row's and overall's"
            line += f", and with no defect pixel in any of its masks {whose} pix AUROC and AUPRO are blank"
        else:
            line += " in pix AUROC and AUPRO"
        notes.append(line)
    return notes


def _row(tallies: list[_TypeTally], n_good: int) -> dict:
    """Metrics of the images in `tallies` (the first is the good images); None where a metric is undefined."""
    scores = np.array([s for t in tallies for s in t.scores], dtype=np.float64)
    labels = (
        np.concatenate([np.full(len(t.scores), i > 0) for i, t in enumerate(tallies)])
        if len(scores)
        else np.zeros(0, bool)
    )
    row: dict[str, float | int | None] = {
        "n_good": n_good,
        "n_defective": int(labels.sum()),
        "image_auroc": None,
        "f1_max": None,
        "f1_threshold": None,
        "pixel_auroc": None,
        "aupro": None,
        "n_without_mask": sum(t.without_mask for t in tallies),
    }
    if labels.any() and not labels.all():
        row["image_auroc"] = metrics.auroc(labels, scores)
        row["f1_max"], row["f1_threshold"] = metrics.f1_max(labels, scores)
    histograms = [t.pixels for t in tallies if t.pixels is not None]
    if histograms:
        pixels = sum(histograms[1:], histograms[0])
        if pixels.n_defect and pixels.n_normal:
            row["pixel_auroc"] = pixels.auroc()
            row["aupro"] = pixels.aupro()
    return row


# --- overlays -------------------------------------------------------------------------------------------------------


def write_overlays(
    candidates: list[_Candidate], out_dir: str | Path, scale: tuple[float, float], pixel_threshold: float | None = None
) -> list[Path]:
    """One PNG per candidate: frame | anomaly map (inferno, `scale` for all) | ground truth, with a caption."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, candidate in enumerate(candidates):
        item, scored = candidate.item, candidate.scored
        path = out_dir / f"{rank:02d}_{candidate.group}_{item.defect_type}_{item.path.stem}.png"
        caption = [
            # putText draws ASCII only, and ends the process on a name that is not UTF-8.
            ascii_name(f"{candidate.group}: {item.defect_type}/{item.path.name}"),
            f"score {scored.score:.4g}  map scale {scale[0]:.3g}..{scale[1]:.3g}",
        ]
        picture = overlay_image(scored.image, scored.frame_map, candidate.mask, scale, pixel_threshold, caption)
        # Encoded here and written by Python: imwrite ends the process on a path that is not UTF-8, and the file
        # keeps the image's own name, whatever its bytes.
        ok, encoded = cv2.imencode(".png", picture)
        if not ok:
            raise EngineError(f"{path}: cannot encode overlay PNG")
        path.write_bytes(encoded.tobytes())
        written.append(path)
    return written


def overlay_image(
    image: np.ndarray,
    frame_map: np.ndarray,
    mask: np.ndarray | None,
    scale: tuple[float, float],
    pixel_threshold: float | None,
    caption: list[str],
) -> np.ndarray:
    """BGR uint8 picture: frame | colour-mapped map (pixel-threshold contour in cyan) | mask, caption above."""
    frame = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    lo, hi = scale
    span = hi - lo if hi > lo else 1.0
    levels = np.clip((frame_map - lo) * (255.0 / span), 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)
    if pixel_threshold is not None:
        contours, _ = cv2.findContours(
            (frame_map >= pixel_threshold).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(heat, contours, -1, (255, 255, 0), 1)
    truth = np.zeros_like(frame)
    if mask is not None:
        truth[mask] = 255
    cv2.rectangle(
        truth, (0, 0), (truth.shape[1] - 1, truth.shape[0] - 1), (80, 80, 80), 1
    )  # shows an empty mask's extent
    h, w = frame.shape[:2]
    gap = np.full((h, 4, 3), 128, np.uint8)
    panels = np.hstack([frame, gap, heat, gap, truth])
    line_height = 16
    header = np.zeros((line_height * len(caption) + 6, panels.shape[1], 3), np.uint8)
    for i, text in enumerate(caption):
        cv2.putText(
            header, text, (4, line_height * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA
        )
    return np.vstack([header, panels])


# --- CLI ------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from engines.runtime import BACKENDS

    parser.add_argument("bundle", metavar="BUNDLE", help="model bundle directory")
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="MVTec-layout folder (test/<type>/, ground_truth/)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON document on stdout (the table goes to stderr)",
    )
    parser.add_argument("--out", metavar="FILE", help="also write the report as JSON to this file")
    parser.add_argument("--overlays", metavar="DIR", help="write overlay PNGs (frame | map | ground truth) here")
    parser.add_argument(
        "--n-overlays",
        type=_non_negative_int,
        default=8,
        metavar="N",
        help="overlays to write: worst-scored goods, best- and worst-scored defects (default 8)",
    )
    parser.add_argument("--backend", default="onnxruntime", choices=sorted(BACKENDS), help="runtime backend")
    parser.add_argument(
        "--batch", type=_batch, default=8, help=f"images per inference call, 1 to {MAX_BATCH} (default 8)"
    )


# As the daemon's batching.max_batch: past it a batch scores no faster, and a typo of 1e8 asked numpy for 95 GiB.
MAX_BATCH = 256


def _batch(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from 1 to {MAX_BATCH}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    from engines.bundle.store import load_bundle

    # Said before the scoring, not after: a mistyped output would cost minutes of it, with no table printed.
    for option, path, what in (("out", args.out, "a file"), ("overlays", args.overlays, "a folder")):
        # A script's `--out "$REPORT"` with the variable unset: taken for no --out, the report went nowhere with
        # exit 0, and overlays went into the working directory (the bundle or the test set) past every check below.
        if path == "":
            print(f"inspectd eval: --{option}: an empty path, expected {what} to write", file=sys.stderr)
            return 2
    if args.overlays and args.n_overlays == 0:
        print(
            f"inspectd eval: --overlays {args.overlays} with --n-overlays 0: nothing would be written there, expected "
            "--n-overlays 1 or more, or no --overlays",
            file=sys.stderr,
        )
        return 2
    outputs = [("out", args.out, False), ("overlays", args.overlays, True)]
    for option, path, directory in outputs:
        why = misplaced(path, directory, args.bundle, args.data) if path else None
        if why is not None:
            print(f"inspectd eval: --{option} {path}: {why}", file=sys.stderr)
            return 2
        why = unwritable(path, directory, parents=True) if path else None
        if why is not None:
            print(f"inspectd eval: --{option} {path}: cannot write ({why})", file=sys.stderr)
            return 2
    progress = Progress()
    try:
        bundle = load_bundle(args.bundle)
        report = evaluate(
            bundle,
            args.data,
            backend=args.backend,
            batch=args.batch,
            n_overlays=args.n_overlays,
            overlay_dir=args.overlays,
            progress=progress,
        )
    except (EngineError, ValueError) as exc:  # the metrics refuse non-finite maps and scores by ValueError
        progress.finish()
        print(f"inspectd eval: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --overlays not writable
        progress.finish()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"inspectd eval: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2) + "\n"  # ASCII: a name that is not UTF-8 is escaped (\udcfc)
    # The result first: a --out that fails after all (a disk filled while scoring) leaves it on the screen. The file
    # is written when the printing fails too, so neither loses the scoring.
    try:
        # --json: stdout carries the one JSON document and nothing else; what a person reads goes to stderr.
        print(format_table(report), file=sys.stderr if args.json else sys.stdout)
        if args.json:
            sys.stdout.write(text)
    except BaseException:
        if args.out:
            _write_out(args.out, text)
        raise
    return _write_out(args.out, text) if args.out else 0


def misplaced(path: str | Path, directory: bool, bundle: str | Path, data: str | Path) -> str | None:
    """Why eval must not write `path` (--out's file, or with `directory` --overlays' folder), None where it may: not
    into a bundle (the one evaluated or any other), whose manifest --out would replace and whose folder train would
    then refuse to replace for the files it does not list; overlays not into --data, whose next eval would score
    them as test images. Paths are compared resolved, so a link or `..` does not get round it."""
    from engines.bundle.store import manifest_of

    target = Path(os.path.realpath(path))
    folders = [target, *target.parents] if directory else list(target.parents)
    evaluated = Path(os.path.realpath(bundle))
    for folder in folders:
        if folder == evaluated:
            return f"inside the bundle being evaluated ({bundle}), expected a path outside any bundle folder"
        manifest = manifest_of(folder)
        if manifest is not None and manifest.get("format") == FORMAT:
            return f"inside the bundle {folder}, expected a path outside any bundle folder"
    if directory and Path(os.path.realpath(data)) in folders:
        return (
            f"inside --data {data}, expected a folder outside the dataset (the next eval would score the overlays as "
            "test images)"
        )
    return None


def _write_out(out: str, text: str) -> int:
    try:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"inspectd eval: --out {out}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 2
    return 0


def _narrowed(bit_depth: int | None) -> str:
    return "" if bit_depth is None else f", 16-bit images as {bit_depth}-bit"


def format_table(report: dict) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        f"{report['model_id']} ({report['method']}, {report['backbone']}, input "
        f"{'x'.join(map(str, report['input']))}{_narrowed(report.get('bit_depth'))}) on {report['data']}: "
        f"{report['n_images']} images, "
        f"{report['images_per_s']} images/s ({report['backend']}, batch {report['batch']})",
        f"recipe {describe_recipe(report['recipe'], report.get('memory_bank'))}"
        + (f" (auto: {report['recipe_choice']})" if report.get("recipe_choice") else ""),
    ]
    rows = [("overall", report["overall"])] + list(report["per_type"].items())
    # Pixel columns leave out defective images without a mask, so they can cover fewer images than the image columns.
    maskless = any(row["n_without_mask"] for _, row in rows)
    lines.append(
        f"{'':<14}{'good':>6}{'defect':>8}{'img AUROC':>11}{'pix AUROC':>11}{'AUPRO':>9}{'F1-max':>9}"
        + (f"{'no mask':>9}" if maskless else "")
    )
    for name, row in rows:
        lines.append(
            f"{name:<14}{row['n_good']:>6}{row['n_defective']:>8}{cell(row['image_auroc']):>11}"
            f"{cell(row['pixel_auroc']):>11}{cell(row['aupro']):>9}{cell(row['f1_max']):>9}"
            + (f"{row['n_without_mask']:>9}" if maskless else "")
        )
    if maskless:
        lines.append("no mask: defective images without a ground-truth mask, left out of pix AUROC and AUPRO")
    lines += report.get("notes", [])
    if report["overlays"]:
        n, where = len(report["overlays"]), Path(report["overlays"][0]).parent
        lines.append(f"overlays: {n} written to {where} by this run (earlier runs' are left there)")
    return "\n".join(lines)
