"""`inspectd teach`: refit a bundle's scorer on confirmed-good frames, on the station, without torch.

    inspectd teach BUNDLE --good DIR [--holdout H] [--any-model] [--by NAME] [--apply tcp://host:port]
    inspectd teach BUNDLE --archive [DIR] --since 8h [--until TIME] [--camera ID] [--any-model] [...]
    inspectd teach BUNDLE --rollback [--apply tcp://host:port]

The confirmed-good frames come from a folder (`--good`, e.g. an `inspectd archive export`) or straight from the
daemon's image archive (`--archive`, read with inspectd.protocol.archive's ArchiveReader): the frames archived with
verdict ok, captured in the span, of one camera or all, judged by this bundle's model or one it was taught from (the
teach record's `ancestor_model_ids`; `--any-model` takes every model's). A folder that is an export or MVTec root
gives its train/good (else test/good); an export's frames are kept by the same rule, by the model its archive.jsonl
names for each frame's archive id (its file name), wherever the review moved it; a frame it does not name (copied in by
hand) is left out too. Either way they are taken in the order of their file names
(an archived frame's is `<id>.png`, in the archive and in an export alike), so teaching from the archive and from an
export of the same frames fits the same parameters.

The scorer's parameters (memory bank, Gaussian mean and precision, k-means references) are graph inputs, so a refit
needs no new graph and no new TensorRT plan: the bundle's feature graph (engines.runtime.features) computes the features
with ONNX Runtime, engines.runtime.scorer_fit fits them with numpy (the same code and seed `inspectd train` runs, with
the recipe's copies of the frames when it has them, so the same frames give the same parameters), and model.onnx,
weights.npz and every plan are carried over byte for byte. A share of the frames is held out: the current and the
refitted model both score it, the thresholds are recalibrated on it with `inspectd calibrate`'s false-reject rule,
and its scores become the reference of the daemon's score-drift alarm. Frames as many as train split are split as
`inspectd train` split this bundle's (the function, holdout and seed its manifest records: recipe auto's validation
folds where auto chose the recipe, else split_holdout), so teaching on train's frames fits on train's fitted frames;
any other set (a station's) is held out DEFAULT_HOLDOUT by split_holdout, a share the thresholds need, and
`--holdout` is that share by split_holdout. Where auto cross-fitted (fewer than 60 frames), so does teach: the
parameters are fitted on every frame, as train's were, and each frame's score for the thresholds comes from a fit on
the folds without it.

Versions: the taught bundle has `bundle_version` one higher and a `teach` record (frames, time, who, what it
replaced, the comparison). Where it goes depends on what BUNDLE is:

- a symlink to a bundle directory (deploy's layout: bundles/current -> bundles/<name>): the new version is written
  beside the directory the link points to, as <name>-v<N> (the name without an earlier -v<M>; a free name if that
  one is taken), and the link is switched to it atomically (a new link renamed over the old one), so a daemon
  reading BUNDLE sees the old version or the new one, never a half-written one; the old directory stays as it was
  until `--rollback` switches the link back to it (the record's previous_dir) and rewrites its thresholds.
- a directory: the taught bundle replaces it in place (so a daemon's `reload` picks it up) and the bundle it
  replaced moves to BUNDLE.versions/v<N> (v<N>-2, -3, ... when that name is taken: version numbers repeat after a
  rollback, and nothing kept there is ever deleted); the teach record names it (previous_in_versions).
  `--rollback` moves the current one there too (a free name the same way) and puts the version it was taught from
  back; after a teach cut off between its two renames, from where that left it (`.NAME.teach-*` beside BUNDLE).

The switch (and a rollback's) holds the lock every writer of the bundle takes and first checks that BUNDLE is still
the bundle teach loaded, its files' checksums included: another teach that switched first, or thresholds a calibrate
or the daemon wrote meanwhile, refuse it (nothing switched, the staged copy removed; teach again). A teach starts by
clearing the staged copies of teaches that were killed: one that holds a version that was in service moves into
BUNDLE.versions, and the rest are removed (remove_dead_staging). A frame that does not decode is left out with a
WARNING and named in the record's `frames.unreadable`. A frame whose bytes, or once decoded whose pixels, are an
earlier one's is left out with a `note:` and counted in `frames.n_duplicates`: a held-out frame's twin in the fit
scores it about 0.

The thresholds name the model they were set for (provenance.model_id), so the daemon refuses a taught document for
any other model. `--rollback` gives the restored bundle its own thresholds again as a new version, numbered above
both its own and the taught one's, so a thresholds version never names two different documents.

`--apply` sends `reload` to the daemon, which swaps the model between batches (no frame is skipped, no seq gap). Its
endpoint, --timeout and key files, and that the daemon runs BUNDLE's model, are checked before any work; a reply
saying an allow-list kept its old keys, or naming another model than the one taught (or rolled back to), is exit 1.
So is a reload the daemon refuses. Where it refused the taught bundle itself (the reply's bundle_refused: it did not
load, pass the daemon's checks or warm up), the taught version is switched back at once, as `--rollback` does (and
kept, as it keeps it), with the thresholds as they were, the document the daemon still runs: left in place, it is
what the daemon's next start opens, and refuses the same way. Any other refusal (the daemon stopping, a key no
longer allowed), or a reload the daemon took and had not ended at --timeout, leaves the taught version in place and
prints the command that puts it back.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import datetime
import getpass
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import REQUIRED_FILES, inspectd_version, scores_pool_the_map
from engines.bundle.store import (
    Bundle,
    ChangedOnDisk,
    check_unchanged,
    load_bundle,
    model_id_for,
    pid_gone,
    swapping,
    write_bundle,
)
from engines.data.images import (
    CROSS_FIT_BELOW,
    MAX_HELD_OUT,
    SPLIT_HOLDOUT,
    VALIDATION_FOLDS,
    ImageFiles,
    duplicates_note,
    frames_checksums,
    good_folder,
    list_images,
    nested_note,
    pixels_key,
    split_holdout,
    subfolder_hint,
    validation_folds,
    without_duplicates,
)
from engines.durable import exchange, fsync_dir, replace_dir
from engines.errors import BundleError, DataError, EngineError
from engines.runtime import open_engine
from engines.runtime.features import FeatureExtractor
from engines.runtime.preprocess import fit_all, mean_level
from engines.runtime.scorer_fit import augmented, fit_scorer
from engines.schema import show
from inspectd.errors import InspectdError
from inspectd.protocol.archive import (
    DEFAULT_ARCHIVE,
    EXPORT_RUN,
    EXPORT_SPLITS,
    ID_RE,
    MANIFEST_NAME,
    ArchiveReader,
    Entry,
    UnreadableFrame,
    camera_id_problem,
    parse_span,
)
from inspectd.protocol.control import BUNDLE_REFUSED, ControlClient, ControlTimeout, allow_list_errors, client_for

DEFAULT_HOLDOUT = 0.2  # for a bundle that does not say what train held out
SPLITS = (SPLIT_HOLDOUT, VALIDATION_FOLDS)
MIN_FRAMES = 2  # at least one fitted and one held out (split_holdout)
BATCH = 8
VERSIONS_SUFFIX = ".versions"


class TeachError(ValueError):
    """The request cannot be met; the message says why and what is expected."""


def versions_dir(bundle_path: Path) -> Path:
    return bundle_path.with_name(bundle_path.name + VERSIONS_SUFFIX)


def linked_dir(path: Path) -> Path | None:
    """The bundle directory BUNDLE points to when it is a symlink, else None."""
    return path.resolve() if path.is_symlink() else None


def next_dir(target: Path, version: int) -> Path:
    """A free name beside `target` for its taught version `version`: <name>-v<version>, then -2, -3, ..."""
    base = re.sub(r"-v\d+(-\d+)?$", "", target.name)
    candidate = target.with_name(f"{base}-v{version}")
    k = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = target.with_name(f"{base}-v{version}-{k}")
        k += 1
    return candidate


def free_version_dir(versions: Path, version: int) -> Path:
    """A free name in BUNDLE.versions for a bundle of version `version`: v<version>, then v<version>-2, -3, ..."""
    candidate = versions / f"v{version}"
    k = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = versions / f"v{version}-{k}"
        k += 1
    return candidate


def switch_link(link: Path, new_dir: Path) -> None:
    """Point `link` at `new_dir` atomically, relative when it was relative (so the tree can be moved as a whole)."""
    text = str(new_dir) if os.path.isabs(os.readlink(link)) else os.path.relpath(new_dir, link.parent.resolve())
    fresh = link.with_name(f".{link.name}.new-{os.getpid()}")
    if fresh.is_symlink() or fresh.exists():
        fresh.unlink()
    os.symlink(text, fresh)
    os.replace(fresh, link)
    fsync_dir(link.parent)  # else a power cut can bring the old link back under a daemon already told to reload


def swap_in(
    path: Path, incoming: Path, keep: Path, expected: dict[str, Any] | None = None, again: str = "teach again"
) -> None:
    """Put directory `incoming` at `path` and what was there at `keep`, durably and all or nothing; a reader of
    `path` finds one of the two at every moment where the kernel can swap them in one step (else for the instant
    between two renames). With `expected` (the manifest of the bundle the caller loaded from `path`), ChangedOnDisk
    and nothing swapped when `path` holds another by then: another teach's version, or thresholds a calibrate or
    the daemon wrote since, which the swap would move aside unseen."""
    with swapping(path):
        if expected is not None:
            check_unchanged(path, expected, f"nothing switched; {again}")
        if exchange(incoming, path):
            try:
                os.replace(incoming, keep)
            except BaseException:
                # All or nothing: the caller's cleanup of `incoming` must not hit the old version. Unless the move
                # went through and a signal came after it: then the swap is whole, and `incoming` is no more.
                if os.path.lexists(incoming):
                    exchange(incoming, path)
                raise
        else:
            replace_dir(path, incoming, keep)  # undoes its first rename when the second fails, for the same reason
    fsync_dir(path.parent)
    if keep.parent != path.parent:
        fsync_dir(keep.parent)


def switch_checked(link: Path, target: Path, expected: dict[str, Any], to, again: str = "teach again") -> Path:
    """Switch link `link` from `target`, the bundle directory it pointed to when the bundle with manifest `expected`
    was loaded through it, to the directory `to()` gives (called under the lock, so two teaches never pick one name);
    ChangedOnDisk and nothing switched when the link points elsewhere by then (another teach switched it) or
    `target` holds another manifest (thresholds written since). Under the lock every writer of `target` takes."""
    with swapping(target):
        now = link.resolve()
        if now != target:
            raise ChangedOnDisk(
                f"{link}: switched since it was loaded (now to {now}, loaded {target}), expected the bundle loaded: "
                f"nothing switched; {again}"
            )
        check_unchanged(target, expected, f"nothing switched; {again}")
        new_dir = to()
        switch_link(link, new_dir)
    return new_dir


def bundle_version(bundle: Bundle) -> int:
    return int(bundle.manifest.get("bundle_version", 1))


def scorer_settings(bundle: Bundle) -> tuple[str, dict[str, Any]]:
    """The scorer kind and the fit settings `inspectd train` used for this bundle (recipe k, memory size, seed)."""
    recipe = bundle.recipe
    training = bundle.manifest.get("training", {})
    kind = str(bundle.architecture.get("scorer") or recipe.get("scorer"))
    settings: dict[str, Any] = {"seed": int(training.get("seed", 0))}
    if recipe.get("k") is not None:
        settings["k"] = int(recipe["k"])
    if recipe.get("memory_size") is not None:
        settings["memory_size"] = int(recipe["memory_size"])
    return kind, settings


@dataclasses.dataclass(frozen=True)
class Split:
    """How teach splits the frames into fitted and held-out ones: by default as `inspectd train` split this bundle's
    (the function and holdout its manifest records, and its seed), so that teaching on train's frames refits train's
    parameters."""

    kind: str  # split_holdout, or validation_folds where recipe auto chose the bundle's recipe
    holdout: float
    note: str | None = None  # a line for the report where teach does not split as train did
    # Train's frame count where this is train's split because the frames are as many: any other count is a station's,
    # held out DEFAULT_HOLDOUT by split_holdout, which is what a hint to teach on more frames must count with.
    train_n: int | None = None
    # Auto's folds with the parameters fitted on every frame, the one held-out share's too, as train fits them now;
    # False: one held-out share's parameters on its fitting frames alone, as train fitted bundles before.
    fit_all: bool = True

    @property
    def auto(self) -> bool:
        return self.kind == VALIDATION_FOLDS

    def folds(self, n: int, seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """(the frames the taught parameters are fitted on, [(fit, held)]): each fold's held frames are scored by a
        fit on its own fit frames, and those scores set the thresholds and the drift reference."""
        if not self.auto:
            fit, held = split_holdout(n, self.holdout, seed)
            return fit, [(fit, held)]
        folds = validation_folds(n, self.holdout, seed)
        if len(folds) == 1 and not self.fit_all:
            return folds[0].fit, [(folds[0].fit, folds[0].held)]
        # As train fits auto's recipe: the parameters on every frame (train's), and each held-out frame's score for
        # the thresholds from the fold fit that left it out, so none is judged by a fit it was in.
        return np.arange(n), [(f.fit, f.held) for f in folds]


def training_split(bundle: Bundle, holdout: float | None = None, n: int | None = None) -> Split:
    """How to split `n` frames for BUNDLE: a `holdout` given is that share, held out as split_holdout does; by
    default the split `inspectd train` fitted BUNDLE with, where the frames are as many as train split (so teaching
    on train's frames refits train's parameters), else DEFAULT_HOLDOUT. A station's frames are not train's, and its
    thresholds want the larger share: auto's validation fold holds out at most 80 frames however many there are."""
    if holdout is not None:
        return Split(SPLIT_HOLDOUT, holdout)
    training = bundle.manifest.get("training") or {}
    selection = bundle.manifest.get("recipe_selection") or {}
    # Bundles trained before the split was recorded: auto's folds wherever auto chose the recipe.
    kind = training.get("split") or (VALIDATION_FOLDS if selection else SPLIT_HOLDOUT)
    if kind not in SPLITS:
        raise TeachError(
            f"{bundle.path}: training.split {kind!r}, expected one of {', '.join(SPLITS)} (a newer inspectd's bundle?)"
        )
    recorded = training.get("holdout")
    n_fit, n_held = training.get("n_fit"), training.get("n_holdout")
    # A cross-fit's counts (every image fitted and held out once) say nothing of the share it was given.
    cross_fitted = int(selection.get("folds", 1)) > 1
    # Fitted on every frame: an auto bundle that records it, or a cross-fitted one from before it was recorded (earlier
    # one-share bundles fitted that share's frames); a cross-fit stopped in its refit records False, and its images are
    # still train's.
    fit_all = training.get("fit_all") is True or (cross_fitted and "fit_all" not in training)
    trained_on = None
    if isinstance(n_fit, int) and isinstance(n_held, int) and n is not None:
        trained_on = n_fit if fit_all else n_fit + n_held
        if n != trained_on:
            return Split(SPLIT_HOLDOUT, DEFAULT_HOLDOUT)
    share = DEFAULT_HOLDOUT
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and 0.0 <= recorded < 1.0:
        share = float(recorded)
    elif isinstance(n_fit, int) and isinstance(n_held, int) and n_fit + n_held > 0 and not fit_all:
        share = n_held / (n_fit + n_held)
    split = Split(kind, share, train_n=trained_on, fit_all=fit_all)
    if share == 0 and not split.auto:  # auto's folds hold out at least 0.1 whatever they are given
        return Split(
            kind,
            DEFAULT_HOLDOUT,
            f"train held no frames out (--holdout 0) and fitted on all of them; teach holds out {DEFAULT_HOLDOUT:g} "
            "to set the thresholds on, so it fits on fewer frames than train did",
        )
    return split


@dataclasses.dataclass(frozen=True)
class GoodFrames:
    """Confirmed-good frames to teach on: their image files in the order they are fitted, and where they came from."""

    paths: list[Path]
    source: str  # for messages: "--good DIR" or "--archive DIR ..."
    record: dict[str, Any]  # where they came from, for the teach record's `frames`
    provenance: dict[str, Any]  # the same, shorter, for the thresholds' provenance
    hint: str = ""  # how to get more of them, for the too-few refusal
    # (file left out, the earlier file with its very bytes, or after decoding its very pixels): as train leaves them
    # out, since a held-out frame's twin in the fit scores it about 0 (a stuck camera exports one frame under many ids)
    duplicates: Sequence[tuple[Path, Path]] = ()
    # frame -> the camera that took it, where known (the archive's index): each camera's drift reference of its own
    cameras: Mapping[Path, str] = dataclasses.field(default_factory=dict)
    notes: Sequence[str] = ()  # printed before the teach: what the folder held that teach leaves out


def export_root(folder: Path) -> Path | None:
    """The `inspectd archive export` root that good-frame folder `folder` (<root>/<split>/good) is in, by the
    export's manifest; None for any other folder."""
    # As typed (made absolute: `good` typed inside train/ names no root of its own), then resolved (a link to an
    # export's good folder); an export not recognised would be taught on whatever model judged its frames.
    for candidate in (Path(os.path.abspath(folder)), folder.resolve()):
        root = candidate.parent.parent
        if candidate.name == "good" and candidate.parent.name in EXPORT_SPLITS and (root / MANIFEST_NAME).is_file():
            return root
    return None


class Exported(NamedTuple):
    """What an export's manifest says of one frame it wrote."""

    model_id: str | None  # the model that judged it
    t_capture: float | None
    run: str | None  # the export run that wrote it (None: a row from before runs were recorded)
    camera: str | None  # the camera that took it


def exported_rows(root: Path) -> tuple[dict[str, Exported], dict[str | None, tuple[float, float]]]:
    """What the manifest of an export at `root` says of each frame it wrote, by the file name the export gave it
    (`<archive id>.png`, whichever folder it is in now), and each export run's span: the first and last capture time
    of every row it wrote. A row that does not parse (an export cut off while it appended) is skipped: its frame is
    then one the manifest does not name."""
    path = root / MANIFEST_NAME
    rows: dict[str, Exported] = {}
    runs: dict[str | None, tuple[float, float]] = {}
    try:
        # Bytes: a line that is not UTF-8 is one more row that does not parse, not a failure of the whole file.
        with open(path, "rb") as manifest:
            for line in manifest:
                try:
                    row = json.loads(line)
                    model, run, camera = row.get("model_id"), row.get(EXPORT_RUN), row.get("camera")
                    exported = rows[f"{row['id']}.png"] = Exported(
                        model if isinstance(model, str) else None,
                        _capture_time(row),
                        run if isinstance(run, str) else None,
                        camera if isinstance(camera, str) else None,
                    )
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue
                if (t := exported.t_capture) is not None:
                    low, high = runs.get(exported.run, (t, t))
                    runs[exported.run] = (min(low, t), max(high, t))
    except OSError as exc:  # an export another user keeps to itself (0600, read by `sudo -u inspectd`)
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return rows, runs


def _capture_time(row: dict) -> float | None:
    """A row's `t_capture`, None where it is none a date can be told of (a hand-edited or corrupt row): its frame is
    still the export's, only out of the span."""
    t = row.get("t_capture")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    try:
        _iso(t := float(t))
    except (ValueError, OverflowError, OSError):
        return None
    return t


def captured_span(times: list[float]) -> dict[str, str | None]:
    """`since`/`until` as --archive records them (UTC, to the second, `until` excluded) around capture times
    `times`: the span an `--archive` teach would take them from."""
    if not times:
        return {"since": None, "until": None}
    # The second after the last one: --archive's --until is "captured before", and the times are cut to the second.
    return {"since": _iso(min(times)), "until": _iso(math.floor(max(times)) + 1)}


def separate_spans(runs: Sequence[tuple[float, float]]) -> int:
    """How many separate spans of capture time export `runs` (each one's first and last capture) cover: runs whose
    spans overlap count as one, as the per-camera exports of one span do (`archive export --camera`, once per camera,
    into one folder), and as the ok and the defect export of one span the review makes (`--verdict defect --add`);
    only a run of a span apart from the others' makes one more."""
    spans, end = 0, -math.inf
    for low, high in sorted(runs):
        if low > end:
            spans += 1
        end = max(end, high)
    return spans


def folder_frames(good: str | Path, models: list[str] | None = None) -> GoodFrames:
    """The frames of folder `good`. In an `inspectd archive export` (its root, or its train/good or test/good), only
    those judged by one of `models` (teach_lineage's: the bundle's own first) or, when None, by any model."""
    # An export or MVTec root: its train/good (what an export with --split train writes, what train fits), else
    # its test/good.
    folder = good_folder(good, ("train", "test"))
    source = f"--good {good}" + (f" ({folder.relative_to(good)})" if folder != Path(good) else "")
    resolved = str(folder.resolve())
    paths = list_images(folder)
    root = export_root(folder)
    if root is None:
        # Images a level down (a folder per day or camera): train's hint, not a bare "0 good frame(s)".
        hint = "" if paths else subfolder_hint(Path(good), folder, "--good")
        move_up = "move them up into it to teach on them"
        nested = nested_note(folder, Path(good), "taught on", move_up) if paths else None
        paths, duplicates = without_duplicates(paths)
        record = {"folder": resolved, **_counted_duplicates(duplicates)}
        notes = [nested] if nested else []
        return GoodFrames(paths, source, record, {"good_dir": resolved}, hint, duplicates, notes=notes)
    # None where nothing was looked up (--any-model), so the record does not claim "checked, none".
    other: dict[str, int] | None = None
    unnamed: int | None = None
    rows, run_spans = exported_rows(root)
    if models is not None:
        other, unnamed = {}, 0
        # The same changeover as --archive's: an export of a span that crosses it holds the previous product's
        # frames too, and its manifest names the model that judged each.
        kept = []
        for path in paths:
            # By file name, not by the folder the export wrote the frame to: a false reject the review moved from
            # defect into good was still judged by this model, and is just what the refit should learn.
            if path.name not in rows:
                # Copied in by hand, renamed, or its row cut off: nothing says which product it shows, so it is left
                # out as a frame of another model is.
                unnamed += 1
                continue
            model = rows[path.name].model_id
            if model in models:
                kept.append(path)
            else:
                other[model or "unknown"] = other.get(model or "unknown", 0) + 1
        if not kept and (other or unnamed):
            instead = "export a span after the line switched to it"
            if not rows:
                raise TeachError(
                    f"{source}: {root / MANIFEST_NAME} names no frame (its export cut off?), expected a row per "
                    "frame as `inspectd archive export` writes them: export again, or --any-model to take the frames"
                )
            raise TeachError(_no_lineage_frames(source, models, other, instead, unnamed))
        paths = kept
    # After the lineage rule: of a frame and its copy under another name, the one the export names is what stays.
    paths, duplicates = without_duplicates(paths)
    # An export appends to its folder: one exported into again still holds the older spans' frames, which the
    # lineage rule keeps and --any-model takes, so the span actually taught on, and whether it is one export's, is
    # worth saying. Rows from before runs were recorded count as one run.
    named = [rows[path.name] for path in paths if path.name in rows]
    times = [row.t_capture for row in named if row.t_capture is not None]
    judged: dict[str, int] = {}
    for row in named:
        judged[row.model_id or "unknown"] = judged.get(row.model_id or "unknown", 0) + 1
    span = {
        **captured_span(times),
        "n_captured": len(times),
        "export_runs": len({row.run for row in named}),
        # Each run's span from every row it wrote, not only the frames kept: of a defect export, only the few false
        # rejects the review moved into good are kept, and those (clustered at one end after a product change) may
        # lie outside the ok export's span over the very same time.
        "export_spans": separate_spans([run_spans[run] for run in {row.run for row in named} if run in run_spans]),
        "judged_by": judged,
    }
    record = {
        "folder": resolved,
        "export": str((root / MANIFEST_NAME).resolve()),
        "model_ids": models,
        **_counted_duplicates(duplicates),
    }
    left = [f"{_counted(other)} left out"] if other else []
    if unnamed:
        left.append(f"{unnamed} not named in {MANIFEST_NAME} left out")
    hint = f" ({', '.join(left)}: --any-model takes them)" if left else ""
    return GoodFrames(
        paths,
        source,
        {**record, **span, "other_models": other, "not_in_export": unnamed},
        # Where the thresholds came from, as an --archive teach's say it.
        {"good_dir": resolved, "since": span["since"], "until": span["until"]},
        hint,
        duplicates,
        # As an --archive teach of the span records them: each camera's drift reference of its own.
        {path: camera for path in paths if path.name in rows and (camera := rows[path.name].camera) is not None},
    )


def _counted_duplicates(duplicates: Sequence[tuple[Path, Path]]) -> dict[str, int]:
    return {"n_duplicates": len(duplicates)} if duplicates else {}


def _no_lineage_frames(where: str, models: list[str], other: dict[str, int], instead: str, unnamed: int = 0) -> str:
    """The refusal when none of the frames is of `models`: `other` counts those of other models, `unnamed` an
    export's frames its manifest does not name."""
    ancestors = f" or the models it was taught from ({', '.join(models[1:])})" if models[1:] else ""
    head = f"{where}: 0 good frame(s) of model {models[0]}{ancestors}"
    if not other:
        # Another span would not help: these frames were never the export's.
        return (
            f"{head}: none of its {unnamed} frame(s) is named in {MANIFEST_NAME} (added by hand, renamed, or the "
            "export cut off?), expected frames `inspectd archive export` wrote, which it names with the model that "
            "judged each, or --any-model to take them"
        )
    also = (
        f", and {unnamed} frame(s) not named in {MANIFEST_NAME} (added by hand, renamed, or the export cut off?)"
        if unnamed
        else ""
    )
    return (
        f"{head} ({_counted(other)} left out{also}), expected frames this bundle's model judged: {instead}, or "
        "--any-model to take every model's frames"
    )


def teach_lineage(bundle: Bundle) -> list[str]:
    """BUNDLE's model id, then the models it was taught from, nearest first: what its archived frames may have been
    judged by while the line ran the same product. A bundle taught before teach records kept the whole chain has only
    its previous model recorded."""
    return lineage_of(bundle.manifest)


def lineage_of(manifest: dict[str, Any]) -> list[str]:
    """teach_lineage of the bundle with manifest `manifest`, read as it is (one not loaded, not verified)."""
    record = manifest.get("teach") or {}
    ancestors = record.get("ancestor_model_ids")
    if not isinstance(ancestors, list):
        ancestors = [record["previous_model_id"]] if isinstance(record.get("previous_model_id"), str) else []
    # A refit on the same frames gives the same parameters, so the same id can recur in the chain.
    return list(dict.fromkeys([manifest["model_id"], *(a for a in ancestors if isinstance(a, str))]))


def _counted(counts: dict[str, int], kind: str = "model ") -> str:
    return ", ".join(f"{n} of {kind}{key}" for key, n in sorted(counts.items(), key=lambda c: (-c[1], c[0])))


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def archive_frames(
    archive: str | Path,
    since: str,
    until: str | None = None,
    camera: str | None = None,
    models: list[str] | None = None,
) -> GoodFrames:
    """The frames the daemon's archive at `archive` kept with verdict ok, captured from `since` to `until` (ISO times
    or spans back from now, as `inspectd archive` takes them), of `camera` or of every camera, judged by one of
    `models` (teach_lineage's: the bundle's own first) or, when None, by any model."""
    t_since, t_until = parse_span(since, until)
    where = f"--archive {archive}" + (f" --camera {camera}" if camera is not None else "") + f" --since {since}"
    where += f" --until {until}" if until is not None else ""
    other: dict[str, int] | None = None  # None: not looked up (--any-model)
    with ArchiveReader(archive) as reader:
        entries = reader.query(camera=camera, verdict="ok", since=t_since, until=t_until)
        other_cameras = None if camera is None else _other_cameras(reader, camera, t_since, t_until, models)
        # Every reject is archived, so the span's rejects by the same models are counted in the index: the ok frames
        # alone are those the current threshold let pass, and a good part it rejected is missing from the refit.
        rejected = {
            cam: count
            for cam, count in reader.counts("defect", t_since, t_until, models).items()
            if camera is None or cam == camera
        }
        rejects = reader.query(camera=camera, verdict="defect", since=t_since, until=t_until)
        same_models = [e for e in entries if models is None or e.model_id in models]
        near_above = good_spread(same_models)
        rejected_near = near_rejects(
            [e for e in rejects if models is None or e.model_id in models], near_above, _highest(same_models)
        )
        if models is not None:
            other = {}
            # "ok" is the verdict of the model that judged the frame: after a changeover the span also holds the
            # previous product's frames, whose patches in this memory bank would let that product's look pass.
            accepted = set(models)
            for e in entries:
                if e.model_id not in accepted:
                    key = e.model_id or "unknown"
                    other[key] = other.get(key, 0) + 1
            entries = [e for e in entries if e.model_id in accepted]
            if not entries and other:
                instead = "teach on a span after the line switched to it"
                raise TeachError(_no_lineage_frames(where, models, other, instead))
        # The camera's frames of any verdict: one with none in the span is a --camera typo, one whose every frame
        # was rejected (a product the model rejects every good part of, what teach is run for) is not.
        held = 0
        if camera is not None and not entries:
            # At least its rejects: the archive's age bound may have expired some of them since they were read.
            held = max(reader.counts(None, t_since, t_until).get(camera, 0), len(rejects))
        # The order an export of these frames lists in, so both sources fit alike. A frame the archive's age or size
        # bound deleted since the query is left out, and so is one whose file is empty or not a whole PNG (a power
        # cut), as export leaves it out: named, not fitted. A structural check, not a decode: the fit decodes each
        # frame once.
        kept: list[tuple[str, Path]] = []
        taken_by: dict[Path, str] = {}
        unreadable: list[str] = []
        for e in sorted(entries, key=lambda e: e.export_name):
            try:
                if reader.frame_bytes(e) is not None:
                    kept.append((e.id, reader.file(e)))
                    taken_by[kept[-1][1]] = e.camera
            except UnreadableFrame:
                unreadable.append(e.id)
        root = str(reader.root.resolve())
    if unreadable:
        print(
            f"inspectd teach: WARNING: {where}: skipped {len(unreadable)} frame(s) whose file is empty, not a whole "
            f"PNG or a link loop: {', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}",
            file=sys.stderr,
        )
    # As an export of the span is read (folder_frames): a stuck camera's copies of one frame are one frame.
    paths, duplicates = without_duplicates([path for _, path in kept])
    ids = dict((path, entry_id) for entry_id, path in kept)
    span = {"camera": camera, "since": _iso(t_since), "until": _iso(t_until)}
    hint = "; the archive keeps one good frame in archive.good_every per camera: a longer span holds more"
    if held:
        # Not "a longer span holds more": the model that rejected all of these would reject its parts there too.
        # The archive keeps ok and defect frames only: every one held here was judged defect (counted by two
        # queries, the daemon archiving between them, so not split further).
        hint = f"; the span holds {held} frame(s) of camera {camera}, none judged ok"
        if rejects:
            export = ["inspectd", "archive", "export", "DIR", "--archive", str(archive), "--camera", str(camera)]
            export += ["--since", since, *(["--until", until] if until is not None else [])]
            hint += (
                f": if good parts are among them, review them (`{shlex.join(export)} --verdict defect --split "
                "train`), move the good ones into DIR/train/good, and teach with --good DIR"
            )
    elif camera is not None and not entries and not other and other_cameras:
        # A --camera typo: no span is long enough, so the cameras the span does hold are named instead.
        held_by = ", ".join(f"{cam} ({n})" for cam, n in sorted(other_cameras.items()))
        hint = (
            f"; no good frame of camera {camera} in the span, which holds {held_by}: expected one of those --camera ids"
        )
    if other:
        hint += f" ({_counted(other)} left out: --any-model takes them)"
    return GoodFrames(
        paths,
        where,
        {
            "archive": root,
            **span,
            "verdict": "ok",
            "ids": [ids[path] for path in paths],
            **_counted_duplicates(duplicates),
            "unreadable": unreadable,  # files empty or not a whole PNG, left out
            "model_ids": models,  # None: --any-model
            "other_models": other,
            # None: every camera's taken; else the good frames of the same models that other cameras left out.
            "other_cameras": other_cameras,
            # camera -> frames of the span the same models judged defect (any model's with --any-model): left out.
            "rejected": rejected,
            # camera -> those of them scored below their threshold plus near_above[camera] (that camera's good
            # frames' own spread above their median), or no higher than one of its good frames: the rejects that
            # could be good parts.
            "rejected_near": rejected_near,
            "near_above": near_above,
        },
        {"archive": root, **span},
        hint,
        duplicates,
        {path: taken_by[path] for path in paths},
    )


def _scores_by_camera(entries: list[Entry]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for e in entries:
        if e.score is not None:
            found.setdefault(e.camera, []).append(e.score)
    return found


def good_spread(entries: list[Entry]) -> dict[str, float]:
    """camera -> how far the highest of its good frames' scores (`entries`) lies above their median: how far above
    its threshold a good part rejected by the same scorer may still score. Per camera, as each sees the line under
    its own light and scores on its own scale; a camera none of whose good frames is scored has no entry."""
    return {camera: float(max(s) - np.median(s)) for camera, s in _scores_by_camera(entries).items()}


def _highest(entries: list[Entry]) -> dict[str, float]:
    """camera -> the highest score of its good frames `entries`."""
    return {camera: max(s) for camera, s in _scores_by_camera(entries).items()}


def near_rejects(
    rejects: list[Entry], near_above: Mapping[str, float], highest_good: Mapping[str, float]
) -> dict[str, int]:
    """camera -> how many of `rejects` could be good parts: scored below their own threshold plus their camera's
    `near_above` (a good part the threshold rejected scores just above it, within the good frames' own spread, where
    a true defect mostly scores far above), or no higher than a good frame of their camera in the span (a threshold
    lowered inside it rejects, well above itself, parts as good as those it let pass before). A reject without a
    score or threshold is not counted; on a camera with no good frame scored every reject counts, as nothing tells
    a near one from a far one."""
    near: dict[str, int] = {}
    for e in rejects:
        spread, top = near_above.get(e.camera), highest_good.get(e.camera)
        if spread is None:
            counted = True
        else:
            counted = e.score is not None and e.threshold is not None and e.score < e.threshold + spread
            counted = counted or (e.score is not None and top is not None and e.score <= top)
        if counted:
            near[e.camera] = near.get(e.camera, 0) + 1
    return near


def _by_camera(cameras: Mapping[Path, str], held: list[Path]) -> dict[str, list[int]]:
    """camera -> the indices in `held` of its frames, for the frames whose camera is known."""
    found: dict[str, list[int]] = {}
    for i, path in enumerate(held):
        if (camera := cameras.get(path)) is not None:
            found.setdefault(camera, []).append(i)
    return found


def _other_cameras(
    reader: ArchiveReader, camera: str, since: float, until: float | None, models: list[str] | None
) -> dict[str, int]:
    """camera -> how many good frames of the span the other cameras than `camera` have, of `models` (any model's:
    None): the refit is the one scorer every camera is judged by, and these are their views missing from it. Counted
    in the index, not loaded: a span of a busy line holds every camera's rows."""
    counts = reader.counts("ok", since, until, models)
    return {other: count for other, count in counts.items() if other != camera}


def score(engine, images: np.ndarray, params: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N], maps [N, H, W]) of `images` through `engine`, with `params` swapped in first when given."""
    if params is not None:
        engine.set_scorer_params(params)
    scores, maps = [], []
    for start in range(0, len(images), engine.max_batch):
        result = engine.infer(np.ascontiguousarray(images[start : start + engine.max_batch]))
        scores.append(result.scores)
        maps.append(result.maps)
    return np.concatenate(scores), np.concatenate(maps)


def teach(
    bundle_path: str | Path,
    good: str | Path | GoodFrames,
    holdout: float | None = None,
    by: str | None = None,
    target_false_reject: float | None = None,
    pixel_fpr: float | None = None,
    out=None,
) -> Bundle:
    """Refit BUNDLE's scorer on `good` (a folder of frames, or frames from archive_frames or folder_frames), write
    the result as BUNDLE's next version, return it. `holdout` None: split as `inspectd train` split BUNDLE's frames
    (training_split)."""
    from calibration.calibrate import (
        DEFAULT_FALSE_REJECT,
        DEFAULT_PIXEL_FPR,
        check_writable,
        pixel_threshold_for_fpr,
        refuse_non_finite,
        threshold_for_false_reject,
    )
    from engines.data.images import skipped_warnings
    from engines.training.metrics import PixelHistograms

    out = out or sys.stdout
    check_numbers(holdout, target_false_reject, pixel_fpr)  # before the bundle, the frames and minutes of fitting
    started = time.monotonic()
    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    check_switch_writable(bundle_path, check_writable)
    kind, settings = scorer_settings(bundle)
    frames = good if isinstance(good, GoodFrames) else folder_frames(good, teach_lineage(bundle))
    if frames.duplicates:
        print(duplicates_note(frames.duplicates), file=out)
    for line in frames.notes:
        print(line, file=out)
    paths = frames.paths
    if len(paths) < MIN_FRAMES:
        raise TeachError(
            f"{frames.source}: {len(paths)} good frame(s), expected at least {MIN_FRAMES} (some fit, some are held out)"
            + frames.hint
        )
    images, decoded, failures = fit_decodable(paths, bundle)
    if failures:
        skipped = [path for path, _ in failures]
        for line in skipped_warnings(failures):
            print(line, file=out)
        frames = without_unreadable(frames, decoded, skipped)
        paths = frames.paths
        if len(paths) < MIN_FRAMES:
            raise TeachError(
                f"{frames.source}: {len(paths)} good frame(s) that decode, expected at least {MIN_FRAMES} (some fit, "
                "some are held out)" + frames.hint
            )
    # The bytes were compared before decoding; the same pixels in other bytes (a stuck frame the camera encoded again,
    # another PNG compression level) are as much a twin, and a held-out frame's twin in the fit scores it about 0. As
    # the model takes them: frames it cannot tell apart are one frame to it.
    distinct, twins = without_duplicates(paths, [pixels_key(image) for image in images])
    if twins:
        print(duplicates_note(twins, pixels=True), file=out)
        kept = {id(path) for path in distinct}
        images = images[[i for i, path in enumerate(paths) if id(path) in kept]]
        frames = without_twins(frames, distinct, twins)
        paths = frames.paths
        if len(paths) < MIN_FRAMES:
            raise TeachError(
                f"{frames.source}: {len(paths)} distinct good frame(s) ({len(twins)} more left out with the same "
                f"pixels), expected at least {MIN_FRAMES} (some fit, some are held out)" + frames.hint
            )
    split = training_split(bundle, holdout, len(paths))
    fit_idx, folds = split.folds(len(images), settings["seed"])

    extractor = FeatureExtractor(bundle, max_batch=BATCH)
    augment = str(bundle.recipe.get("augment", "none"))
    features = extractor.extract(augmented(images[fit_idx], augment))
    t_features = time.monotonic() - started
    params = fit_scorer(kind, features, **settings)
    fold_params = [
        params if np.array_equal(fit, fit_idx) else fit_scorer(kind, rows_of(features, fit_idx, fit), **settings)
        for fit, _ in folds
    ]
    del features
    t_fit = time.monotonic() - started - t_features
    weights = bundle.weights()
    # The daemon refuses thresholds whose provenance names another model than the one it runs: without the id, a
    # saved copy of these could be set on the old model, whose scores they do not describe.
    taught_id = model_id_for(bundle.manifest, params, weights)

    # In frame order, each scored by its own fold's fit.
    hold_idx = np.concatenate([h for _, h in folds])
    order = np.argsort(hold_idx, kind="stable")
    hold_idx = hold_idx[order]
    held = images[hold_idx]
    with open_engine(bundle, "onnxruntime", {"providers": "cpu"}, max_batch=BATCH) as engine:
        old_scores, _ = score(engine, held)
        by_fold = [score(engine, images[h], p) for (_, h), p in zip(folds, fold_params, strict=True)]
    new_scores = np.concatenate([s for s, _ in by_fold])[order]
    new_maps = np.concatenate([m for _, m in by_fold])[order]
    del by_fold
    held_paths = [paths[i] for i in hold_idx]
    refuse_non_finite(old_scores, held_paths, f"{frames.source}: held out, by the current model")
    refuse_non_finite(new_scores, held_paths, f"{frames.source}: held out, by the taught model")
    # Scored by fold fits other than the taught one (cross-fitted, or auto's one share with every frame fitted).
    out_of_fold = any(not np.array_equal(fit, fit_idx) for fit, _ in folds)
    checksums = frames_checksums(paths, images)
    fitted = current_fit(bundle, checksums, len(paths))
    # Where the current fit was of other frames, an --archive teach's record still names each by archive id: an
    # export's frames carry theirs in their file names, an --archive teach's in its record.
    held_ids = archive_ids(frames)
    current = bundle.thresholds()
    old_threshold = current.image_threshold
    fr_target = DEFAULT_FALSE_REJECT if target_false_reject is None else target_false_reject
    fr = threshold_for_false_reject(new_scores, fr_target)
    histograms = PixelHistograms(reference=None)  # as calibrate: bins follow the maps' spread, not their offset
    for m in new_maps:
        histograms.add(m)
    pixel = pixel_threshold_for_fpr(histograms, DEFAULT_PIXEL_FPR if pixel_fpr is None else pixel_fpr)
    comparison = {
        "frames": int(len(held)),
        "current": {
            "model_id": bundle.model_id,
            "image_threshold": old_threshold,
            "rejected": int((old_scores >= old_threshold).sum()),
            "score_median": float(np.median(old_scores)),
            "score_max": float(old_scores.max()),
            # How many of these frames it was fitted on (it scores those lower than a new frame); None: not known.
            "in_sample": int(np.isin(hold_idx, fitted).sum())
            if fitted is not None
            else in_sample_by_id(bundle, [held_ids[i] for i in hold_idx]),
        },
        "taught": {
            # Out-of-fold: each frame's score is the fold fit's that left it out, not the taught fit's.
            "scores": "out-of-fold" if out_of_fold else "held-out",
            "image_threshold": fr.threshold,
            "rejected": int((new_scores >= fr.threshold).sum()),
            "score_median": float(np.median(new_scores)),
            "score_max": float(new_scores.max()),
        },
    }
    who = by or getpass.getuser()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    brightness = [mean_level(frame) for frame in held]
    provenance = {
        "tool": f"inspectd teach {inspectd_version()}",
        "model_id": taught_id,
        **frames.provenance,
        "n_good": int(len(held)),
        "images": "out-of-fold" if out_of_fold else "held-out",  # as train records the same kind of scores
        "target": {"kind": "false_reject", "value": fr_target},
        "observed": {"false_reject_upper_95": fr.upper_bound, "exceedances": fr.exceedances},
        thresholds_doc.GOOD_SCORES: thresholds_doc.good_score_reference(new_scores),
        thresholds_doc.GOOD_BRIGHTNESS: thresholds_doc.good_score_reference(brightness),
    }
    # Cameras that see the line under other light each need a reference of their own: against the pooled one, an
    # unchanged line raises the drift alarm.
    by_camera = _by_camera(frames.cameras, held_paths)
    if references := thresholds_doc.camera_references(
        {camera: new_scores[at] for camera, at in by_camera.items()},
        {camera: [brightness[i] for i in at] for camera, at in by_camera.items()},
    ):
        provenance[thresholds_doc.PER_CAMERA_REFERENCE] = references
    if current.per_camera:
        # Overrides were chosen on the old scorer's scores; against the refitted scorer's they mean nothing.
        provenance["dropped_per_camera"] = current.per_camera
    thresholds = thresholds_doc.next_version(
        current, image_threshold=fr.threshold, pixel_threshold=pixel, per_camera={}, provenance=provenance
    )
    version = bundle_version(bundle) + 1
    target = linked_dir(bundle_path)
    record = {
        "version": version,
        "previous_version": bundle_version(bundle),
        "previous_model_id": bundle.model_id,
        # The whole chain, so --archive can tell this lineage's frames from another product's without the old
        # versions (a linked layout's may have been cleaned up, an in-place one's are overwritten by number).
        "ancestor_model_ids": teach_lineage(bundle),
        # Linked: the directory (beside this one) the link pointed to, which --rollback points it back to.
        **({"previous_dir": target.name} if target is not None else {}),
        "time": when,
        "by": who,
        "frames": {
            **frames.record,
            "n": len(paths),
            "n_fit": int(len(fit_idx)),
            "n_holdout": int(len(hold_idx)),
            # How: so a teach on train's frames can be checked against the manifest's training record.
            "split": split.kind,
            "holdout": split.holdout,
            "folds": len(folds),
            "fit_all": split.auto and split.fit_all,
            # Which frames: their names and one checksum over their bytes, so a teach can be repeated and audited.
            **checksums,
        },
        "scorer": kind,
        "settings": settings,
        "augment": augment,
        "comparison": comparison,
        "seconds": {"features": round(t_features, 2), "fit": round(t_fit, 2)},
    }
    try:
        taught = write_version(bundle, params, thresholds, version, record, weights)
        seconds = time.monotonic() - started
        warnings = [
            split.note,
            fr.warning(fr_target),
            thresholds_doc.reference_warning(len(held), "out-of-fold frames" if out_of_fold else "held-out frames"),
        ]
        # Both count held-out frames only; the operator chooses how many to teach on.
        if warnings[1]:
            warnings[1] += _teach_on(fr.needed, split, "held out: ")
        if warnings[2]:
            warnings[2] += _teach_on(thresholds_doc.MIN_REFERENCE, split)
        if (warning := rejects_warning(frames)) is not None:
            warnings.append(warning)
        if scores_pool_the_map(taught.manifest):
            warnings.append(
                thresholds_doc.regionless_warning(
                    fr.threshold,
                    pixel,
                    remedy="a higher --pixel-fpr sets a lower pixel threshold (teach again with it, or `inspectd "
                    f"calibrate {bundle_path} --good DIR --pixel --pixel-fpr RATE`)",
                )
            )
        if len(by_camera) > 1:
            what = "out-of-fold frames" if out_of_fold else "held-out frames"
            warnings += [
                thresholds_doc.camera_reference_warning(camera, len(at), what)
                for camera, at in sorted(by_camera.items())
            ]
        left_out = frames.record.get("other_cameras")
        if left_out:
            warnings.append(
                f"WARNING: --camera {frames.record['camera']}: {sum(left_out.values())} good frame(s) of other "
                f"cameras in the same span ({_counted(left_out, '')}) are left out of the refit, yet the one taught "
                "scorer judges every camera: a view it was not fitted on scores higher, so those cameras may reject "
                f"good parts, and their drift alarms now compare them with {frames.record['camera']}'s good frames and "
                "may rise on an unchanged line (teach without --camera to fit every camera's view)"
            )
        if current.per_camera:
            warnings.append(
                f"per-camera thresholds of {', '.join(sorted(current.per_camera))} were set on the old scorer's scores "
                "and are dropped: every camera now judges with the taught thresholds (calibrate --camera to set them "
                "again)"
            )
        _report(out, taught, taught.manifest["teach"], warnings, seconds)
    except BaseException:
        # Ctrl-C, SIGTERM or an error after the switch: "interrupted" alone would hide that BUNDLE now holds the
        # taught version, which the daemon's next start or reload opens. Read from disk, as the switch may not have
        # happened yet, or have been undone.
        if (note := switched_note(bundle_path, record)) is not None:
            print(note, file=sys.stderr)
        raise
    return taught


# A WARNING from this many of the span's near rejects (near_rejects: those that could be good parts) per good frame
# taught on: the archive keeps every reject but only one good frame in archive.good_every (200 by default), so 1 in 20
# is a rate of 0.025 % of the parts there, which true defects alone pass on any line; counting only the rejects within
# the good frames' own spread above the threshold leaves out the true defects that score far above it. Below this
# the near rejects are too few to move a threshold set at the top of the good frames' scores.
REJECTS_WARNING_SHARE = 0.05


def rejects_warning(frames: GoodFrames) -> str | None:
    """The WARNING for an --archive teach whose span holds at least REJECTS_WARNING_SHARE near rejects of the same
    models per good frame taught on: a good part among them is missing from the refit, whose threshold and drift
    reference then come out low; None below that, or for frames not from the archive."""
    rejected = frames.record.get("rejected") or {}
    near = frames.record.get("rejected_near")
    near = rejected if near is None else near  # not told apart: every reject counts
    n_near = sum(near.values())
    if not n_near or n_near < REJECTS_WARNING_SHARE * len(frames.paths):
        return None
    cameras = f" ({_counted(near, '')})" if len(near) > 1 else ""
    known = frames.record.get("near_above") or {}
    spreads = {camera: spread for camera, spread in known.items() if camera in near}
    rule = ""  # no good frame's score known: every reject counts
    if spreads:
        shown = {f"{spread:.4g}" for spread in spreads.values()}
        amount = (
            f"less than {shown.pop()}"
            if len(shown) == 1
            else "less than " + ", ".join(f"{spread:.4g} ({camera})" for camera, spread in sorted(spreads.items()))
        )
        rule = (
            f" that scored {amount} above their threshold (their camera's good frames' own spread: the highest score "
            "minus the median) or no higher than a good frame of the span"
        )
        # A camera with no scored good frame in the span has nothing to judge its rejects by: each counts.
        if unjudged := sorted(camera for camera in near if camera not in known):
            rule += f", and every one of {', '.join(unjudged)}, which has no scored good frame in the span"
        rule += f" ({sum(rejected.values())} rejected in all)"
    return (
        f"WARNING: {frames.source}: the span also holds {n_near} frame(s) the same model(s) rejected{cameras}{rule}, "
        f"beside the {len(frames.paths)} good frame(s) taught on (the archive keeps every reject but only one good "
        "frame in archive.good_every: not a reject rate). Teach learns only the frames the current threshold let "
        "pass: if good parts are among the rejects, the taught threshold and drift reference come out low and such "
        "parts go on being rejected. Review them: "
        f"`inspectd archive export DIR {frames.source} --verdict ok --split train`, the same with `--verdict defect "
        "--add`, move the good ones into DIR/train/good, and teach with --good DIR"
    )


def check_switch_writable(bundle_path: Path, check_writable) -> None:
    """CalibrationError (calibrate's check_writable, passed in) unless this user can make every change the switch
    makes, before minutes of work: a link's new version is written beside the directory it points to and the link
    is replaced in its own folder; a directory's is staged beside it, and the directory it replaces moves from
    BUNDLE's folder into BUNDLE.versions, which a directory's own write permission must allow (its `..` changes)."""
    target = linked_dir(bundle_path)
    if target is not None:
        folders = [target.parent, bundle_path.parent]
    else:
        versions = versions_dir(bundle_path)
        folders = [bundle_path.parent, bundle_path, *([versions] if versions.is_dir() else [])]
    for folder in dict.fromkeys(folders):  # a link beside its target: its folder once
        moved = (
            f" (the version it replaces moves from there into {versions_dir(bundle_path)})"
            if folder == bundle_path
            else ""
        )
        check_writable(folder, "teach", moved)


def switched_note(bundle_path: Path, record: dict[str, Any]) -> str | None:
    """The line for a teach stopped after its switch: BUNDLE holds the version of teach record `record` (by its
    version, the model it replaced and its time), where the version it replaced is and how to put it back; None
    where BUNDLE does not hold it."""
    from engines.bundle.store import manifest_of

    manifest = manifest_of(bundle_path) or {}
    written = manifest.get("teach")
    if not isinstance(written, dict) or any(
        # `seconds` too: a teach of the same version in the same second elsewhere is not this one.
        written.get(key) != record[key]
        for key in ("version", "previous_model_id", "time", "seconds")
    ):
        return None
    if written.get("previous_dir"):
        previous = bundle_path.resolve().with_name(str(written["previous_dir"]))
    else:
        previous = versions_dir(bundle_path) / str(written.get("previous_in_versions"))
    return (
        f"inspectd teach: stopped after the switch: {bundle_path} holds the taught version {written['version']} "
        f"({manifest.get('model_id')}), which the daemon's next start or reload opens; the version taught from is "
        f"{previous}: `inspectd teach {shlex.quote(str(bundle_path))} --rollback` puts it back"
    )


def fit_decodable(paths: list[Path], bundle: Bundle) -> tuple[np.ndarray, list[Path], list[tuple[Path, DataError]]]:
    """(the frames of `paths` that decode, fitted to BUNDLE's input as fit_all fits them, their paths, and (path,
    why) for each left out): one that cannot be read or does not decode (a file cut short by a copy, another user's
    0600 file) is left out, not the end of the teach; where none decodes, the first's DataError."""
    try:
        frames = ImageFiles(paths, bundle.bit_depth)
        return fit_all(frames, bundle.input_shape, bundle.resize_policy, bundle.each_axis), paths, []
    except DataError:
        pass  # one or more do not decode: each is tried once more, alone, to tell which
    decoded, failures = [], []
    for path in paths:
        try:
            ImageFiles([path], bundle.bit_depth)[0]
        except DataError as exc:
            failures.append((path, exc))
            continue
        decoded.append(path)
    if not decoded and failures:
        raise failures[0][1]
    fitted = fit_all(ImageFiles(decoded, bundle.bit_depth), bundle.input_shape, bundle.resize_policy, bundle.each_axis)
    return fitted, decoded, failures


def without_unreadable(frames: GoodFrames, decoded: list[Path], skipped: list[Path]) -> GoodFrames:
    """`frames` with only the `decoded` ones, the `skipped` ones named in its record's `unreadable` (as --archive
    names the frames whose file is not a whole PNG: by archive id there, by file name in a folder)."""
    record = dict(frames.record)
    if "ids" in record:  # an archive's: its ids go with its paths
        ids = dict(zip(frames.paths, record["ids"], strict=True))
        record["ids"] = [ids[path] for path in decoded]
        names = [ids[path] for path in skipped]
    else:
        names = [path.name for path in skipped]
    record["unreadable"] = [*record.get("unreadable", []), *names]
    return dataclasses.replace(frames, paths=decoded, record=record)


def without_twins(frames: GoodFrames, distinct: list[Path], twins: list[tuple[Path, Path]]) -> GoodFrames:
    """`frames` with only the `distinct` ones, the `twins` (left out, the earlier frame with its pixels) counted in
    its record's n_duplicates and listed in its duplicates, as the copies of an earlier frame's bytes are."""
    record = dict(frames.record)
    if "ids" in record:  # an archive's: its ids go with its paths
        ids = dict(zip(frames.paths, record["ids"], strict=True))
        record["ids"] = [ids[path] for path in distinct]
    record["n_duplicates"] = record.get("n_duplicates", 0) + len(twins)
    return dataclasses.replace(frames, paths=distinct, record=record, duplicates=[*frames.duplicates, *twins])


def _fit_record(bundle: Bundle) -> dict | None:
    """The record of the fit that made BUNDLE's scorer: its teach record's frames, else train's; None where there is
    none to go by."""
    taught = bundle.manifest.get("teach")
    # A taught scorer is its teach's fit alone: train's frames say nothing of it.
    record = taught.get("frames") if isinstance(taught, dict) else bundle.manifest.get("training")
    if not isinstance(record, dict) or taught is None and bundle.manifest.get("interrupted"):
        return None  # an interrupted train's n_fit counts frames its scorer may not have been fitted on
    return record


def _recorded_fit(bundle: Bundle, record: dict, n: int) -> np.ndarray | None:
    """The frames (indices into the `n` in `record`'s order) `record`'s split fitted, rebuilt from its kind, share and
    BUNDLE's seed; None where the record does not say."""
    kind, share = record.get("split"), record.get("holdout")
    if kind not in SPLITS or isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        return None
    split = Split(kind, float(share), fit_all=record.get("fit_all") is True)
    fit, _ = split.folds(n, scorer_settings(bundle)[1]["seed"])
    # A record whose count disagrees (a fit cut short) does not say which frames were fitted.
    return fit if record.get("n_fit") == len(fit) else None


def current_fit(bundle: Bundle, checksums: dict[str, str], n: int) -> np.ndarray | None:
    """The frames (indices into these `n`) BUNDLE's scorer was fitted on, where the record of the fit that made it
    names these very frames (`frames_checksums`: their names and their pixels, both): its teach record, else train's;
    None where it does not."""
    record = _fit_record(bundle)
    # Names alone (000.png, 001.png, ...) would match another folder's frames.
    if record is None or any(record.get(key) != value for key, value in checksums.items()):
        return None
    return _recorded_fit(bundle, record, n)


def archive_ids(frames: GoodFrames) -> list[str | None]:
    """Each of `frames`' archive id, None where it has none: an --archive teach's from its record, an export's from
    the file name the export gave it (`<archive id>.png`, wherever the review moved it)."""
    if "ids" in frames.record:
        return list(frames.record["ids"])
    if "export" not in frames.record:
        return [None] * len(frames.paths)
    return [path.stem if path.suffix == ".png" and ID_RE.fullmatch(path.stem) else None for path in frames.paths]


def in_sample_by_id(bundle: Bundle, held_ids: list[str | None]) -> int | None:
    """How many of the held-out frames (by archive id, None where a frame has none) BUNDLE's scorer was fitted on,
    where the record of its fit names its frames by archive id (an --archive teach's); None where that cannot be
    told."""
    record = _fit_record(bundle)
    if record is None or None in held_ids:
        return None
    ids = record.get("ids")
    if not isinstance(ids, list) or record.get("n") != len(ids):
        return None
    fit = _recorded_fit(bundle, record, len(ids))
    if fit is None:
        return None
    fitted = {ids[i] for i in fit}
    return sum(frame in fitted for frame in held_ids)


def rows_of(features: np.ndarray, fit_idx: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """The rows of `features` (augmented's: the frames `fit_idx`, then each copy of them in the same order) that are
    the frames `subset` (a part of `fit_idx`) and their copies."""
    n = len(fit_idx)
    at = np.searchsorted(fit_idx, subset)
    return features[np.concatenate([at + c * n for c in range(len(features) // n)])]


def frames_to_hold(held: int, holdout: float, kind: str = SPLIT_HOLDOUT) -> int | None:
    """The fewest frames from which on the split `kind` holds out at least `held` however many more are taught on
    (None: no number does). For recipe auto's folds fewer may do too: cross_fitted_frames."""
    if kind == VALIDATION_FOLDS:
        # From CROSS_FIT_BELOW frames on, one share that grows with the frames up to MAX_HELD_OUT; below, every frame
        # is held out once, so the count falls at CROSS_FIT_BELOW and "at least" holds only from there.
        for n in range(CROSS_FIT_BELOW, 20 * MAX_HELD_OUT):
            if len(validation_folds(n, holdout, 0)[0].held) >= held:
                below = cross_fitted_frames(held)
                return below.start if below is not None and n == CROSS_FIT_BELOW else n
        return None
    # round(holdout * n) >= held from n >= (held - 0.5) / holdout: start just below, so the search takes a step or two
    # whatever the holdout (one frame at a time from (held - 1) / holdout took 1 / holdout steps).
    n = max(2, math.ceil((held - 0.5) / holdout) - 2)
    while min(n - 1, max(1, round(holdout * n))) < held:
        n += 1
    return n


def cross_fitted_frames(held: int) -> range | None:
    """The frame counts below CROSS_FIT_BELOW of which recipe auto's folds hold out at least `held` (each frame once,
    cross-fitted); None where none does."""
    return range(max(2, held), CROSS_FIT_BELOW) if held < CROSS_FIT_BELOW else None


def _teach_on(needed: int, split: Split, held: str = "") -> str:
    """A too-few WARNING's hint: how many frames to teach on for `needed` held-out ones with this split."""
    n = frames_to_hold(needed, split.holdout, split.kind)
    if not split.auto:
        return f" ({held}teach on >= {n} frames with --holdout {split.holdout:g})"
    how = "held out as train held out for recipe auto"
    if split.train_n is not None:
        # These are as many as train's frames, which is why auto's folds split them; any other count is not.
        n = frames_to_hold(needed, DEFAULT_HOLDOUT)
        other = f" other than {split.train_n}" if n is not None and n <= split.train_n else ""
        return (
            f" ({how} on its {split.train_n} frames; any other number is held out {DEFAULT_HOLDOUT:g} by "
            f"split_holdout: teach on >= {n} frames{other})"
        )
    # A bundle that does not record how many frames train split: auto's folds split every count.
    below = cross_fitted_frames(needed)
    if n is not None and (below is None or n == below.start):
        return f" ({how}: teach on >= {n} frames)"
    if below is not None:
        # More frames can hold out fewer: from CROSS_FIT_BELOW on only one share is, so ">= needed" would be false.
        few = f"{below.start} to {below.stop - 1}" if len(below) > 1 else f"{below.start}"
        more = f", or on >= {n}" if n is not None else f"; from {CROSS_FIT_BELOW} frames on at most {MAX_HELD_OUT}"
        return f" ({how}: teach on {few} frames, cross-fitted so that every frame is held out once{more})"
    return (
        f" ({how}: at most {MAX_HELD_OUT} frames however many are taught on; `inspectd calibrate --good` then sets "
        "the thresholds on as many other good frames as needed)"
    )


def check_numbers(holdout: float | None, target_false_reject: float | None, pixel_fpr: float | None) -> None:
    """TeachError for a rate outside (0, 1), before any work."""
    for flag, value in (
        ("--holdout", holdout),
        ("--target-false-reject", target_false_reject),
        ("--pixel-fpr", pixel_fpr),
    ):
        if value is not None and not 0.0 < value < 1.0:
            raise TeachError(f"{flag} {value}: expected a fraction strictly between 0 and 1")


def write_version(
    bundle: Bundle,
    params: dict[str, np.ndarray],
    thresholds,
    version: int,
    record: dict[str, Any],
    weights: dict[str, np.ndarray] | None = None,
) -> Bundle:
    """Write BUNDLE's next version, then switch: a linked BUNDLE to a new directory beside the one it points to, a
    directory BUNDLE in place with the current one moved to a free name in BUNDLE.versions (recorded in the new
    version's teach record as previous_in_versions)."""
    path = bundle.path
    target = linked_dir(path)
    remove_dead_staging(target if target is not None else path, bundle.manifest.get("teach"))
    keep = None
    if target is None:
        # Chosen before the manifest is written, since the record names it for --rollback.
        keep = free_version_dir(versions_dir(path), bundle_version(bundle))
        record = {**record, "previous_in_versions": keep.name}
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("model_id", "created", "files", "graph")}
    manifest["bundle_version"] = version
    manifest["teach"] = record
    beside = target if target is not None else path
    # Never a name already there: a teach killed between its two renames leaves the version in service under such a
    # name, and a later process may get the same PID.
    staging = beside.with_name(f".{beside.name}.teach-{os.getpid()}")
    for n in range(2, 1000):
        if not (staging.exists() or staging.is_symlink()):
            break
        staging = beside.with_name(f".{beside.name}.teach-{os.getpid()}-{n}")
    weights = bundle.weights() if weights is None else weights
    new_dir: Path | None = None
    write_bundle(staging, manifest, bundle.graph_path, params, weights, thresholds)
    try:
        written = load_bundle(staging)
        # Everything else the bundle holds (the feature graph, FP16 graph, TensorRT plans) depends only on the
        # graph, which did not change: carried over as it is.
        for name in bundle.manifest["files"]:
            if name not in (*REQUIRED_FILES, bundle.manifest["graph"]):
                written.replace_file(name, (path / name).read_bytes(), add=True)
        if keep is None:  # chosen only where BUNDLE is a directory: here it is a link

            def named() -> Path:
                nonlocal new_dir
                new_dir = next_dir(beside, version)
                os.replace(staging, new_dir)
                fsync_dir(new_dir.parent)
                return new_dir

            switch_checked(path, beside, bundle.manifest, named)
            return load_bundle(path)
        keep.parent.mkdir(exist_ok=True)
        swap_in(path, staging, keep, bundle.manifest)
    except ChangedOnDisk:
        shutil.rmtree(staging, ignore_errors=True)  # nothing was switched: staging holds the new version only
        raise
    except BaseException:
        # Only the new version: where the exchange went through and its undo failed, staging holds the one that was
        # in service, which the error names.
        if not _holds(staging, bundle.model_id):
            shutil.rmtree(staging, ignore_errors=True)
        if keep is None and new_dir is not None and not _linked_to(path, new_dir):
            # Named but never switched in: no daemon ran it, and left there it would pass for a version in service.
            shutil.rmtree(new_dir, ignore_errors=True)
        raise
    return load_bundle(path)


def _linked_to(link: Path, folder: Path) -> bool:
    """Whether `link` points to `folder` by now (its switch got as far as the rename); True where that cannot be
    told, so that a version possibly in service is never removed."""
    try:
        return link.resolve() == folder.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop
        return True


def _holds(path: Path, model_id: str) -> bool:
    try:
        return load_bundle(path).model_id == model_id
    except Exception:  # noqa: BLE001 - anything that does not load as that bundle is not it
        return False


# A staged copy changed less than this long ago is left alone even with its PID gone: its teach may run in another
# PID namespace (a container sharing the bundles folder), where the PID names another process or none.
STAGING_MARGIN_S = 3600.0


def remove_dead_staging(beside: Path, record: dict[str, Any] | None) -> None:
    """Clear the staging copies (`.NAME.teach-PID[-N]` beside `beside`) of teaches that were killed: a full bundle
    each, plans included, that nothing else removes.

    A copy is dead when no process here has its PID, its directory last changed more than STAGING_MARGIN_S ago, and
    no process holds the lock on it. The PID alone says nothing of a teach in another PID namespace; such a teach
    changes its copy's directory with every file it writes into it and swaps it in within minutes, and while it
    swaps it holds the lock it took on BUNDLE's directory, which its exchange puts at the staging name (the version
    that was in service, whose directory may be old). A flock holds across PID namespaces on one kernel. Not covered:
    a teach in another namespace stopped for longer than the margin between staging and its swap: its copy goes, and
    its swap then fails with nothing switched.

    A dead copy of a version that was in service (a teach killed between its two renames leaves the version taught
    from there) is moved into BUNDLE.versions under the name --rollback looks for it by, and kept, with a note, where
    that name is taken. In service: a teach record (BUNDLE's, or a kept version's) names its model and version as the
    one it was taught from, or, where no record names that model with a version, its model is an ancestor in such a
    lineage (_kept_names). Only a copy no version names, one that never switched in, is removed. `record`: the teach
    record of the bundle loaded from `beside`'s name."""
    from engines.bundle.store import manifest_of
    from engines.durable import try_lock

    pattern = re.compile(rf"\.{re.escape(beside.name)}\.teach-(\d+)(?:-\d+)?")
    candidates = [
        candidate
        for candidate in sorted(beside.parent.glob(f".{glob.escape(beside.name)}.teach-*"))
        if (match := pattern.fullmatch(candidate.name))
        and candidate.is_dir()
        and not candidate.is_symlink()
        and pid_gone(int(match.group(1)))
    ]
    if not candidates:
        return
    versions = versions_dir(beside)
    kept_as = _kept_names(beside, versions, record)
    removed = []
    for candidate in candidates:
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile (another teach's clean-up), or not ours to read
        try:
            if try_lock(fd) is False or time.time() - os.fstat(fd).st_mtime < STAGING_MARGIN_S:
                continue
            manifest = manifest_of(candidate) or {}
            model, version = manifest.get("model_id"), manifest.get("bundle_version", 1)
            key = (model, version) if (model, version) in kept_as else (model, None)
            if key not in kept_as:
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
                continue
            destination = versions / (kept_as[key] or f"v{version}")
            held = f"it holds version {version} ({model}), which was in service"
            if destination.exists() or destination.is_symlink():
                print(
                    f"inspectd teach: note: kept {candidate}: {held}, and {destination} is taken: move it to a free "
                    f"name in {versions} to keep it, or remove it",
                    file=sys.stderr,
                )
                continue
            try:
                versions.mkdir(exist_ok=True)
                os.rename(candidate, destination)
                fsync_dir(versions)
                fsync_dir(candidate.parent)
            except OSError as exc:
                print(
                    f"inspectd teach: note: kept {candidate}: {held}, and it cannot move to {destination} "
                    f"({exc.strerror or exc})",
                    file=sys.stderr,
                )
                continue
            print(
                f"inspectd teach: note: moved {candidate} to {destination}: {held} (a teach killed between its two "
                "renames left it there)",
                file=sys.stderr,
            )
        finally:
            os.close(fd)  # releases the lock
    if removed:
        print(
            f"inspectd teach: note: removed {len(removed)} staged version(s) left by teaches that were killed: "
            f"{', '.join(str(c) for c in removed)}",
            file=sys.stderr,
        )


def _kept_names(
    beside: Path, versions: Path, record: dict[str, Any] | None
) -> dict[tuple[str, int | None], str | None]:
    """Every version that was in service by the records beside `beside`, as (model, bundle_version): each a teach
    record names as the one it was taught from (previous_model_id, previous_version), with the name in `versions`
    that record gives it (previous_in_versions, else v<previous_version>, as --rollback reads it). A model of
    BUNDLE's or a kept version's lineage that no record names with its version counts as (model, None): any version
    of it. By model alone, a re-teach on the same frames (the same parameters, the same model id) that was killed
    before its swap would pass for the version it was taught from."""
    from engines.bundle.store import manifest_of

    kept = [versions / name for name in sorted(os.listdir(versions))] if versions.is_dir() else []
    manifests = [m for m in map(manifest_of, (beside, *kept)) if m is not None and isinstance(m.get("model_id"), str)]
    named: dict[tuple[str, int | None], str | None] = {}
    for taught in [record, *(m.get("teach") for m in manifests)]:
        if isinstance(taught, dict) and isinstance(previous := taught.get("previous_model_id"), str):
            version = taught.get("previous_version")
            version = version if isinstance(version, int) and not isinstance(version, bool) else None
            key = (previous, version)
            named[key] = named.get(key) or str(taught.get("previous_in_versions") or f"v{version}")
    versioned = {model for model, version in named if version is not None}
    for manifest in manifests:
        for model in lineage_of(manifest)[1:]:  # its ancestors; the version itself is in service where it lies
            if model not in versioned:
                named.setdefault((model, None), None)
    return named


def cut_off_teach(beside: Path, record: dict[str, Any]) -> Path | None:
    """Where a teach in place of directory `beside` that was cut off between its two renames left the version it
    was taught from (its staging name, `.NAME.teach-*`, which the exchange gave it), by the model and version
    `record` names; None where none holds it."""
    expected = record.get("previous_model_id")
    if not isinstance(expected, str):
        return None  # a record from before the model was recorded: a name alone could be another teach's leftover
    for candidate in sorted(beside.parent.glob(f".{glob.escape(beside.name)}.teach-*")):
        if candidate.is_dir() and not candidate.is_symlink() and _holds(candidate, expected):
            return candidate
    return None


def rollback(
    bundle_path: str | Path, out=None, renumber: bool = True, reload: str | None = "`inspectd ctl reload`"
) -> Bundle:
    """Put back the version the current bundle was taught from, with its own thresholds as a new version numbered
    above the current one's; a directory BUNDLE's current version moves to a free name in BUNDLE.versions.

    `reload`: the command that has the daemon load it, for the line of a rollback stopped after its switch; None
    where the daemon still runs the version put back.

    `renumber=False` puts it back as it was, thresholds file included: for a taught version no daemon ever ran (one
    the daemon refused to reload), whose thresholds version no result carries, so the one running and the one on
    disk stay the same document and the daemon's own threshold writes are not refused as "changed on disk"."""
    out = out or sys.stdout
    path = Path(bundle_path)
    bundle = load_bundle(path)
    record = bundle.manifest.get("teach")
    if not record:
        raise TeachError(f"{path}: version {bundle_version(bundle)} was not taught, expected a bundle from teach")
    target = linked_dir(path)
    cut_off = None
    if target is not None and record.get("previous_dir"):
        # Taught as a directory beside the one linked: the link goes back to it, and the taught one stays.
        previous = target.with_name(record["previous_dir"])
    else:
        # In place, or linked after a version taught in place before the link was made: the name it was kept under
        # in the versions folder (a record from before names were recorded kept it as v<N>, the only name then).
        kept = record.get("previous_in_versions") or f"v{record['previous_version']}"
        previous = versions_dir(target if target is not None else path) / kept
        if not (previous.exists() or previous.is_symlink()):
            cut_off = cut_off_teach(target if target is not None else path, record)
            previous = cut_off or previous
    restored = load_bundle(previous)
    # Verified before anything moves: by an old record's v<N>, a later teach of the same number may sit there.
    expected_id = record.get("previous_model_id")
    if bundle_version(restored) != record["previous_version"] or expected_id not in (None, restored.model_id):
        raise TeachError(
            f"{previous}: version {bundle_version(restored)} ({restored.model_id}), expected version "
            f"{record['previous_version']}{f' ({expected_id})' if expected_id else ''}, the one taught from"
        )
    from calibration.calibrate import check_writable

    thresholds = restored.thresholds()
    if renumber:
        # The restored version's thresholds are rewritten in its directory (one kept pristine, root's or on a
        # read-only mount, refuses that): found out before anything is written.
        by_hand = (
            f"point the link back at {previous}"
            if target is not None and record.get("previous_dir")
            else f"move {previous} back to {path}"
        )
        check_writable(previous, "teach --rollback", f"; nothing changed (or {by_hand} by hand, and reload)")
        # Before the switch, so a daemon never loads the restored bundle with a version number the taught one used.
        thresholds = restored_thresholds(restored, bundle)
        restored.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(thresholds))
    again = "run --rollback again"
    put_back = (restored.model_id, bundle_version(restored))
    held = None
    try:
        if target is not None:
            switch_checked(path, target, bundle.manifest, lambda: previous, again)
            where = f"the link points to {previous}"
        else:
            keep = free_version_dir(versions_dir(path), bundle_version(bundle))
            keep.parent.mkdir(exist_ok=True)
            swap_in(path, previous, keep, bundle.manifest, again)
            where = f"version {bundle_version(bundle)} ({bundle.model_id}) kept in {keep}"
        # Switched: a stop now would cut off the line that says so, and a retry would roll back one version more.
        held = _hold_stop_signals()
        if cut_off is not None:
            where += f" (the version taught from was at {cut_off}, where a teach cut off between its renames left it)"
        restored = load_bundle(path)
        print(
            f"{path}: rolled back to version {bundle_version(restored)} ({restored.model_id}), thresholds version "
            f"{thresholds.version}; {where}",
            file=out,
        )
    except BaseException:
        # Stopped or failed within the switch, after its rename: read from disk whether BUNDLE holds it by now.
        if (note := rolled_back_note(path, put_back, bundle, reload)) is not None:
            print(note, file=sys.stderr)
        raise
    finally:
        _release_stop_signals(held)
    return restored


def rolled_back_note(path: Path, put_back: tuple[str, int], replaced: Bundle, reload: str | None) -> str | None:
    """The line for a rollback stopped after its switch: BUNDLE holds `put_back` (model, version) again, which a
    second rollback would not see as done and go back from; None where BUNDLE does not hold it."""
    from engines.bundle.store import manifest_of

    manifest = manifest_of(path) or {}
    if (manifest.get("model_id"), manifest.get("bundle_version", 1)) != put_back:
        return None
    then = (
        "which the daemon still runs"
        if reload is None
        else f"which the daemon's next start or reload opens: reload it ({reload})"
    )
    return (
        f"inspectd teach: stopped after the rollback: {path} holds version {put_back[1]} ({put_back[0]}) again, the "
        f"one version {bundle_version(replaced)} ({replaced.model_id}) was taught from, {then}; --rollback again "
        "would go back one version more"
    )


def _hold_stop_signals() -> dict[signal.Signals, Any] | None:
    """Hold off Ctrl-C and SIGTERM (_ignore_stop_signals, as at exit) until _release_stop_signals(what this gave):
    the handlers they had, or None where this thread cannot set them."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    _ignore_stop_signals()
    return handlers


def _release_stop_signals(handlers: dict[signal.Signals, Any] | None) -> None:
    for stop, handler in (handlers or {}).items():
        signal.signal(stop, signal.SIG_DFL if handler is None else handler)


def restored_thresholds(restored: Bundle, replaced: Bundle) -> thresholds_doc.Thresholds:
    """`restored`'s own thresholds again, as the version after both its own and `replaced`'s: the daemon's results
    carry the thresholds version, and one that went down would name a document the taught model already used.

    The history is `restored`'s own: the taught versions were set on another scorer's scores, and a thresholds
    rollback to one of them would judge this model by them. The provenance is its own too (drift references,
    targets, score ranges, where the daemon reads them) but for `tool` and `time`, this rollback's; `restored` marks
    it as no teach of its own, so a thresholds rollback to the versions set on this same scorer stays allowed."""
    own, theirs = restored.thresholds(), replaced.thresholds()
    tool = f"inspectd teach --rollback {inspectd_version()}"
    provenance = {k: copy.deepcopy(v) for k, v in own.provenance.items() if k not in ("time", "tool")}
    provenance = {"tool": tool, **provenance}
    provenance["model_id"] = restored.model_id
    provenance["restored"] = {
        "by": tool,
        "version": own.version,  # whose provenance, tool included, is in the history
        "replaced_version": theirs.version,
        "replaced_model_id": replaced.model_id,
    }
    doc = thresholds_doc.next_version(own, provenance=provenance).to_dict()
    return thresholds_doc.parse({**doc, "version": max(own.version, theirs.version) + 1})


def _report(out, bundle: Bundle, record: dict, warnings: list[str | None], seconds: float) -> None:
    comparison = record["comparison"]
    current, taught = comparison["current"], comparison["taught"]
    frames = record["frames"]
    if record.get("previous_dir"):
        now = bundle.path.resolve()
        where = f"the link now points to {now}; previous version in {now.with_name(record['previous_dir'])}"
    else:
        where = f"previous version in {versions_dir(bundle.path) / record['previous_in_versions']}"
    how = f"{frames['n_holdout']} held out"
    if frames.get("folds", 1) > 1:
        how = (
            f"each also held out once for the thresholds (scored by a fit on the other {frames['folds'] - 1} folds' "
            f"frames, as train cross-fits recipe auto below {CROSS_FIT_BELOW} frames)"
        )
    elif frames.get("split") == VALIDATION_FOLDS and frames.get("fit_all"):
        how = (
            f"{frames['n_holdout']} of them also held out for the thresholds (scored by a fit on the other frames, as "
            "train does for recipe auto)"
        )
    elif frames.get("split") == VALIDATION_FOLDS:
        how += " as train held out for recipe auto"
    print(
        f"{bundle.path}: version {record['version']} ({bundle.model_id}), {record['scorer']} refitted on "
        f"{frames['n_fit']} frames in {seconds:.1f}s, {how}; {where}",
        file=out,
    )
    if "archive" in frames:
        span = f"{frames['since']} to {frames['until'] or 'now'}"
        print(
            f"frames: {frames['n']} good frame(s) of {frames['camera'] or 'every camera'} from {span} in the archive "
            f"{frames['archive']} (their ids are in the manifest's teach record)",
            file=out,
        )
    if "export" in frames:
        said = []
        if frames.get("since"):
            timed = frames["n_captured"]
            which, untimed = (
                (f"the {frames['n']}", "")
                if timed == frames["n"]
                else (f"{timed} of the {frames['n']}", "; the others have no capture time there")
            )
            said.append(
                f"{which} frame(s) taught on were captured from {frames['since']} to {frames['until']} "
                f"(by {MANIFEST_NAME}{untimed})"
            )
        runs = frames.get("export_runs") or 0
        spans = frames.get("export_spans") or 0
        if spans > 1:
            # Only then: a fresh folder of one span is what this advice asks for (exported camera by camera, too),
            # and hearing it there teaches operators to skip it.
            said.append(
                f"they come from {runs} exports of {spans} separate spans into {Path(frames['export']).parent}, which "
                "adds to the frames exported into it before: export each span into a fresh folder"
            )
        judged = frames.get("judged_by") or {}
        if frames.get("model_ids") is None and len(judged) > 1:
            said.append(f"--any-model took frames judged by {len(judged)} models ({_counted(judged)})")
        if said:
            print(f"frames: {'; '.join(said)}", file=out)
    if frames.get("other_models"):
        # An archive's are frames the other model judged ok; an export's are whatever lies in its good folder, a
        # frame that model judged defect and the review moved there included.
        which = "good frame(s)" if "archive" in frames else f"frame(s) in {frames['folder']}"
        print(
            f"frames: left out {sum(frames['other_models'].values())} {which} judged by other models "
            f"({_counted(frames['other_models'])}): --any-model takes them",
            file=out,
        )
    if frames.get("not_in_export"):
        print(
            f"frames: left out {frames['not_in_export']} frame(s) not named in {MANIFEST_NAME} (added by hand, "
            "renamed, or the export cut off?): --any-model takes them",
            file=out,
        )
    out_of_fold = taught.get("scores") == "out-of-fold"
    in_sample = current.get("in_sample")
    if out_of_fold:
        print(f"on the {comparison['frames']} frames, each held out of one fold:", file=out)
    else:
        print(f"on the {comparison['frames']} held-out frames:", file=out)
    rows = (("current", current), ("taught (out-of-fold)" if out_of_fold else "taught", taught))
    width = max(len(name) for name, _ in rows)
    for name, row in rows:
        print(
            f"  {name:<{width}} threshold {row['image_threshold']:.6g}: {row['rejected']} rejected, "
            f"median score {row['score_median']:.6g}, max {row['score_max']:.6g}",
            file=out,
        )
    # Then the rows are not the two models on frames neither saw: the out-of-fold fits saw fewer frames than the
    # taught one, the current one saw these, and a lower current row is no sign the teach made things worse.
    if out_of_fold:
        others = f"the other {frames['folds'] - 1} folds' frames" if frames["folds"] > 1 else "the frames not held out"
        print(
            f"  taught (out-of-fold): each frame scored by the fit on {others}, as the thresholds are set, not by the "
            "taught model, which was fitted on all of them",
            file=out,
        )
    if in_sample:
        print(
            f"  current (in-sample): fitted on {in_sample} of these {comparison['frames']} frames, so it scores them "
            "lower than new ones: a lower row here does not make the taught model worse",
            file=out,
        )
    elif in_sample is None:
        # On every split: a frame it was fitted on may be held out here whatever the split, and a silent row reads as
        # the two models on frames neither saw.
        print(
            "  current: in-sample (scored lower than new frames) on any of these frames it was fitted on; its "
            "record does not say which frames those were",
            file=out,
        )
    for warning in warnings:
        if warning:
            print(warning, file=out)  # calibrate's warnings, which say WARNING themselves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The frames come from --good DIR or --archive [DIR] (exactly one; or --rollback). --archive reads the "
        "daemon's image archive (its config's archive.path, by default <state_dir>/archive): DIR defaults to "
        f"{DEFAULT_ARCHIVE}, the installed layout's. It takes the frames the daemon archived with verdict ok (one "
        "good frame in archive.good_every) captured from --since (required) to --until, of --camera or of every "
        "camera, judged by the bundle's model or one it was taught from (--any-model: by any model); the new "
        "version's teach record names them (archive, camera, span, archive ids, the other models' frames left out). "
        "--good on an `inspectd archive export` keeps its frames by the same rule, by the model its archive.jsonl "
        "names for each frame's archive id, wherever the review moved the frame; frames it does not name (copied in "
        "by hand) are left out too. --any-model: all of them."
    )
    parser.add_argument("bundle", help="bundle directory to teach (replaced by its next version)")
    parser.add_argument(
        "--good", help="folder of confirmed-good frames, or an export/MVTec root (its train/good, else test/good)"
    )
    parser.add_argument(
        "--archive",
        nargs="?",
        const=str(DEFAULT_ARCHIVE),
        metavar="DIR",
        help=f"teach on the good frames of the daemon's image archive at DIR (default {DEFAULT_ARCHIVE})",
    )
    parser.add_argument("--since", metavar="TIME", help="--archive: captured at or after TIME: ISO or a span (8h, 30m)")
    parser.add_argument("--until", metavar="TIME", help="--archive: captured before TIME (same forms)")
    parser.add_argument(
        "--camera",
        metavar="ID",
        help="--archive: only this camera's frames (default: every camera); the taught scorer judges every camera",
    )
    parser.add_argument(
        "--any-model",
        action="store_true",
        help="--archive, or --good on an archive export: also frames judged by other models than the bundle's and "
        "those it was taught from",
    )
    parser.add_argument("--rollback", action="store_true", help="put back the version this one was taught from")
    parser.add_argument(
        "--holdout",
        type=float,
        default=None,
        help="share held out for thresholds and the comparison (default: on as many frames as train split, as train "
        f"split them, so train's frames refit train's parameters; on other frames, or where the manifest does not "
        f"say, {DEFAULT_HOLDOUT})",
    )
    parser.add_argument("--by", default=None, help="who confirmed the frames (default: the user running teach)")
    parser.add_argument("--target-false-reject", type=float, default=None, help="image threshold's target rate")
    parser.add_argument("--pixel-fpr", type=float, default=None, help="pixel threshold's good-pixel rate")
    parser.add_argument("--apply", metavar="ENDPOINT", help="then tell the daemon at ENDPOINT to reload")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon's reload")
    parser.add_argument("--server-key", default=None, help="CurveZMQ for --apply: the daemon's control public key")
    parser.add_argument("--client-key", default=None, help="CurveZMQ for --apply: this operator's .key_secret file")


def run(args: argparse.Namespace) -> int:
    try:
        archive, since, until, camera = args.archive, args.since, args.until, args.camera
        if camera is not None and not camera.strip():
            # An unset $CAM in a script: taken as no --camera, it would teach on every camera's frames.
            raise TeachError(f"--camera {camera!r}: expected a camera id")
        if camera is not None and (problem := camera_id_problem(camera, show(camera))) is not None:
            raise TeachError(f"--camera: {problem}")
        if args.by is not None and not args.by.strip():
            # An unset $OPERATOR in a script: taken as no --by, the record would name the account teach ran as.
            raise TeachError(f"--by {args.by!r}: expected who confirmed the frames (a name)")
        if [bool(args.good), archive is not None, bool(args.rollback)].count(True) != 1:
            raise TeachError("expected exactly one of --good DIR, --archive [DIR] and --rollback")
        selected = since is not None or until is not None or camera is not None
        if archive is None and (selected or (args.any_model and not args.good)):
            raise TeachError(
                "--since, --until, --camera and --any-model select archived frames: expected --archive [DIR] too"
            )
        if archive is not None and since is None:
            raise TeachError("--archive: expected --since TIME too (8h, or 2026-03-01T06:00): the span to teach on")
        # Every argument checked before any work: a refusal after the bundle was switched would leave the daemon
        # running the old version with the new one on disk.
        # The pair itself is client_for's to check, with --apply.
        if (args.server_key is not None or args.client_key is not None) and not args.apply:
            raise TeachError("--server-key/--client-key are for --apply: give the daemon's control endpoint")
        check_numbers(args.holdout, args.target_false_reject, args.pixel_fpr)
        if since is not None:
            parse_span(since, until)
        client = client_for(args.apply, args.timeout, args.server_key, args.client_key) if args.apply else None
    except (TeachError, InspectdError) as exc:
        print(f"inspectd teach: {exc}", file=sys.stderr)
        return 2
    running = None
    if client is not None:
        try:
            running = _check_daemon(args.apply, client)
        except InspectdError as exc:
            client.close()
            print(f"inspectd teach: {exc}", file=sys.stderr)
            return 2
    try:
        bundle = load_bundle(args.bundle)
        earlier = args.rollback and running in teach_lineage(bundle)
        if running is not None and running != bundle.model_id and not earlier:
            # Its reload would load its own bundle again: the taught version would be on disk and never judge. A
            # rollback to a model this bundle was taught from is let through: the daemon still on that earlier
            # version (a reload that failed or was forgotten) is when a rollback is wanted most, and the check after
            # the reload still names a wrong path.
            raise TeachError(
                f"--apply {args.apply}: the daemon runs model {running}, {bundle.path} is {bundle.model_id}, "
                "expected the bundle the daemon runs (teach its model.bundle, or --apply the daemon running this one)"
            )
        if args.rollback:
            reload = "`inspectd ctl reload`"
            if args.apply:
                keys = _key_flags(args.server_key, args.client_key)
                reload = f"`inspectd ctl --endpoint {shlex.quote(args.apply)}{keys} reload`"
            done = rollback(args.bundle, reload=reload)
        else:
            lineage = None if args.any_model else teach_lineage(bundle)
            if since is not None:
                good = archive_frames(archive, since, until, camera, lineage)
            else:
                good = folder_frames(args.good, lineage)
                if args.any_model and "export" not in good.record:
                    raise TeachError(
                        f"--any-model: {good.source} is not an `inspectd archive export` (no {MANIFEST_NAME} names "
                        "the model that judged its frames), expected --archive [DIR] or an export"
                    )
            done = teach(args.bundle, good, args.holdout, args.by, args.target_false_reject, args.pixel_fpr)
    # ValueError: what the fit and the thresholds refuse (a recipe's augment this version does not know, a
    # thresholds document it cannot write), one line as calibrate gives it.
    except (TeachError, BundleError, DataError, EngineError, InspectdError, OSError, ValueError) as exc:
        print(f"inspectd teach: {exc}", file=sys.stderr)
        if client is not None:
            client.close()
        return 2
    atexit.unregister(_ignore_stop_signals)  # once, however often run is called (in tests)
    atexit.register(_ignore_stop_signals)
    if client is None:
        return 0
    keys = _key_flags(args.server_key, args.client_key)
    try:
        if args.rollback:
            return _apply(args.apply, client, done, "restored", keys=keys)
        return _apply(args.apply, client, done, "taught", Path(args.bundle), keys)
    except (KeyboardInterrupt, SystemExit):  # SystemExit: the CLI's SIGTERM
        # The report said the version is in place, not whether the daemon took it.
        print(
            f"inspectd teach: stopped while the daemon at {args.apply} reloads: {done.path} holds version "
            f"{bundle_version(done)} ({done.model_id}), which it may or may not run now: `inspectd ctl --endpoint "
            f"{shlex.quote(args.apply)}{keys} status` names the model it runs",
            file=sys.stderr,
        )
        raise


def _ignore_stop_signals() -> None:
    """At exit, once the work is done and reported: Python puts back the default action of the signals it handled
    before it unloads its modules, which takes a while, so a Ctrl-C or SIGTERM then would end the process by the
    signal, with no line, while BUNDLE holds the version the report names, and a script's `teach ... && reload` would
    not reload. Ignored, they leave the exit status the command set."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)


PROBE_S = 5.0  # how long teach --apply waits for the daemon's status before its work


def _undo(path: Path) -> None:
    """After the daemon refused the bundle taught at `path` itself (BUNDLE_REFUSED): put back the version it was
    taught from, which the daemon still runs. Left in place, the refused version is what the daemon's next start
    opens, and it fails there the same way (a restart loop where the line ran before); put back, a refused --apply
    leaves the station as it was, as calibrate's does, and the taught version stays on disk (its record names its
    frames). Its thresholds are put back as they were, not as a new version (rollback's renumber): the daemon never
    ran the taught ones, and it still runs these, so its threshold writes (ctl set-thresholds, rollback,
    calibrate --apply) go on with no reload, which would also restart a raised drift alarm's windows."""
    try:
        taught = load_bundle(path)
        record = taught.manifest["teach"]
        # Where rollback leaves it: a linked one where the link pointed, one in place at the name rollback picks.
        linked = linked_dir(path)
        stays = linked if linked is not None else free_version_dir(versions_dir(path), bundle_version(taught))
        restored = rollback(path, renumber=False, reload=None)
    except (TeachError, BundleError, DataError, InspectdError, OSError) as exc:
        print(
            f"inspectd teach: {path} still holds the refused version, which the daemon's next start would refuse "
            f"too; switching back failed ({exc}): run `inspectd teach {shlex.quote(str(path))} --rollback`",
            file=sys.stderr,
        )
        return
    print(
        f"inspectd teach: switched {path} back to version {record['previous_version']} with thresholds version "
        f"{restored.thresholds().version} as they were, which the daemon still runs, so its next start does not "
        f"open the refused one; the taught version {record['version']} ({taught.model_id}) is kept in {stays}",
        file=sys.stderr,
    )


def _check_daemon(endpoint: str, client: ControlClient) -> str | None:
    """The model the daemon at --apply runs (None when it does not say, or does not answer), or InspectdError,
    before any work, from one that shuts this client out (its handshake ended, or it answers with a refusal): the new
    version would be written and never applied. One that does not answer is left to --apply to report after the work
    (the version is in place for its next start)."""
    try:
        # Briefly: --timeout is the reload's, and a daemon that is down should not hold up the work.
        reply = client.request({"cmd": "status"}, timeout_s=PROBE_S)
    except ControlTimeout:
        return None
    if not reply.get("ok"):
        raise InspectdError(f"--apply {endpoint}: the daemon refused: {reply.get('error')}")
    running = reply.get("model_id")
    return running if isinstance(running, str) else None


def _apply(
    endpoint: str,
    client: ControlClient,
    expected: Bundle | None = None,
    what: str = "taught",
    taught_at: Path | None = None,
    keys: str = "",
) -> int:
    """Tell the daemon to reload: 0 when it did, 1 when it refused, did not answer, kept an allow-list, or reloaded
    another model than `expected` (the bundle teach wrote or rolled back to). A reload of the version taught at
    `taught_at` that the daemon refused for the bundle itself rolls it back there (see _undo); any other refusal, or
    a reload still under way at the timeout, leaves it and says how to go back. `keys`: the --server-key and
    --client-key flags to repeat in the commands it prints."""
    try:
        with client:
            reply = client.request({"cmd": "reload"})
    except InspectdError as exc:
        print(f"inspectd teach: --apply {endpoint}: {exc}", file=sys.stderr)
        if isinstance(exc, ControlTimeout) and exc.sent and expected is not None:
            # The daemon took it and may yet load the version or refuse it: switching back now could pull the
            # bundle from under a reload that succeeds, so the operator is told how to see the outcome.
            check = f"`inspectd ctl --endpoint {shlex.quote(endpoint)}{keys} status`"
            said = (
                f"inspectd teach: the daemon may still be loading the {what} model {expected.model_id}: {check} "
                "answers once the reload has ended, and names the model it runs then"
            )
            if taught_at is not None:
                said += (
                    f"; if that is not {expected.model_id} (reload_failed in its log), {taught_at} still holds the "
                    f"taught version {bundle_version(expected)}, which the daemon's next start would open: run "
                    f"{_rollback_line(taught_at, endpoint, keys)}"
                )
            print(said, file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"inspectd teach: --apply {endpoint}: the daemon refused: {reply.get('error')}", file=sys.stderr)
        if taught_at is not None and reply.get(BUNDLE_REFUSED) is True:
            _undo(taught_at)
        elif taught_at is not None and expected is not None:
            # Stopping, a key no longer allowed, an internal error (or a daemon too old to say): the version is not
            # at fault, and the next start or reload takes it.
            print(
                f"inspectd teach: {taught_at} keeps the taught version {bundle_version(expected)} "
                f"({expected.model_id}): the daemon did not refuse the bundle itself (its reply has no "
                f"{BUNDLE_REFUSED}), so its next start or reload opens it: retry with `inspectd ctl --endpoint "
                f"{shlex.quote(endpoint)}{keys} reload`, or go back with {_rollback_line(taught_at, endpoint, keys)}",
                file=sys.stderr,
            )
        return 1
    got = reply.get("model_id")
    mismatch = expected is not None and got != expected.model_id
    if expected is not None and mismatch:
        # Its model.bundle is another path (a copy, another line's instance), which the reload read unchanged.
        print(
            f"inspectd teach: --apply {endpoint}: reloaded, but the daemon runs {got}, expected the {what} model "
            f"{expected.model_id}: the daemon's model.bundle is not {expected.path}",
            file=sys.stderr,
        )
    else:
        print(f"applied: the daemon at {endpoint} now runs {got}")
    failed = allow_list_errors(reply)
    for role, error in failed:
        print(
            f"inspectd teach: --apply {endpoint}: allow-list {role} not reloaded, the previous one stays: {error}",
            file=sys.stderr,
        )
    return 1 if failed or mismatch else 0


def _rollback_line(path: Path, endpoint: str, keys: str) -> str:
    """The command that puts back the version taught at `path` and has the daemon at `endpoint` reload it: with the
    reload, the daemon runs the thresholds version the rollback writes, so its own threshold writes are not refused
    as changed on disk."""
    return f"`inspectd teach {shlex.quote(str(path))} --rollback --apply {shlex.quote(endpoint)}{keys}`"


def _key_flags(server_key: str | None, client_key: str | None) -> str:
    """--server-key/--client-key as given, for the commands teach prints (client_for has checked they are a pair)."""
    if server_key is None or client_key is None:
        return ""
    return f" --server-key {shlex.quote(str(server_key))} --client-key {shlex.quote(str(client_key))}"
