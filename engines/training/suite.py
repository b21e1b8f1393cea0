"""`inspectd eval-suite`: the accuracy benchmark. Train with the default recipe on every dataset under a data root,
evaluate each on its test set, and write one table (per dataset, then the mean) with the recipe auto chose.
Each column's mean covers the datasets that have that metric; where that is not all of them, the table says how many,
`0.821 (1/2)`, and suite.json's mean row counts them per metric in `n_datasets`.

A dataset is any folder of the root with train/good/ (or train/ok/, any case) and test/ (MVTec layout); new ones are
picked up by their folder, and every other folder (hidden ones aside) gets a line saying why it was not taken.
Defaults are chosen by this table, never by one dataset. Output: OUT/suite.md (the table), OUT/suite.json (every
report), OUT/<dataset>/bundle (the bundles). A dataset that train or eval refuses gets a row saying why, with no metrics
(so the means cover the others and say how many), the others still run, and the command exits 1; what train would
refuse for every dataset (--recipe, --seed, an OUT that is no place for bundles) is refused before the first one trains.
The table is written once there is a row, at the end or on an interrupt (then marked so, with the datasets not run).

A run limited by --only merges its rows into the earlier table in OUT/suite.json (one of the same data root, recipe and
seed; otherwise it says why and its table holds only its own rows): those datasets' rows are replaced, every other
dataset's row is kept, marked `earlier run TIME` with when its run started. Finishing an interrupted run is so
`--only` with the datasets it did not measure.

suite.prev.md and suite.prev.json keep the last whole table: one with a row for every dataset of the root, not
interrupted, and with at least one dataset measured (not every row FAILED). An earlier suite.md and suite.json move to
suite.prev.* only when they are whole; an earlier part table (interrupted, an --only run's that merged into none, or
every row FAILED) is replaced and suite.prev.* left as it is. So the newest whole table is always in suite.md or
suite.prev.md: no run, however cut short or failed, loses it, and an older whole one goes only once a newer whole one
stands. suite.json says which a table is (`whole`, and `missing`: the datasets without a row).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engines.bundle.format import describe_augment, describe_score_share
from engines.data.images import DEFECT_FREE_WORDS, defect_free_folders, image_folders
from engines.errors import EngineError

# README's default: the data folder beside the checkout, ../shared/data from its root.
DEFAULT_ROOT_BESIDE = Path("..") / "shared" / "data"
DEFAULT_ROOT_HELP = (
    f"folder of datasets (default {DEFAULT_ROOT_BESIDE} from the root of the inspectd checkout that holds the current "
    "directory, else of the one this package runs from)"
)
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


class StoppedInTraining(KeyboardInterrupt):
    """Ctrl-C while a dataset trained: train wrote its checkpoint bundle (`"interrupted": true`) at `bundle`, which
    the suite never scores. Left there (a later --only run replaces it), and named in the interrupt line: it looks
    like the measured bundles beside it."""

    def __init__(self, bundle: Path) -> None:
        super().__init__(str(bundle))
        self.bundle = bundle


def checkout_of(folder: Path) -> Path | None:
    """The inspectd checkout (a folder whose pyproject.toml names the project inspectd) that is `folder` or holds it."""
    for candidate in (folder, *folder.parents):
        try:
            text = (candidate / "pyproject.toml").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if re.search(r'^name\s*=\s*"inspectd"\s*$', text, re.M):
            return candidate
    return None


def default_root() -> Path:
    """README's ../shared/data beside the checkout: the current directory's, which an installed copy (its package in
    a venv's site-packages) has no other way to find, then the package's own, for an editable install run from
    elsewhere. EngineError naming what was looked for where neither has one."""
    here, package = Path.cwd(), Path(__file__).resolve().parent
    looked: list[str] = []
    for start in (here, package):
        checkout = checkout_of(start)
        if checkout is None:
            continue
        root = checkout.parent / "shared" / "data"
        if root.is_dir():
            return root
        if str(root) not in looked:
            looked.append(str(root))
    if looked:
        raise EngineError(
            f"--data-root needed: no folder of datasets at {' nor '.join(looked)} (the default, "
            f"{DEFAULT_ROOT_BESIDE} beside the inspectd checkout)"
        )
    raise EngineError(
        f"--data-root needed: the default is {DEFAULT_ROOT_BESIDE} beside the inspectd checkout, and none holds the "
        f"current directory ({here}) or this package ({package})"
    )


def datasets(root: Path, only: list[str] | None = None, report: Callable[[str], None] | None = None) -> list[Path]:
    """The dataset folders under `root`, or those of them named in `only` (each name must be one). Without `only`,
    `report(line)` gets one line for each other folder, saying why it is not a dataset (default: nothing)."""
    if not root.is_dir():
        raise EngineError(f"--data-root {root}: not a directory, expected a folder of datasets")
    found, skipped = [], {}
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        reason = not_a_dataset(folder)
        if reason is None:
            found.append(folder)
        else:
            skipped[folder.name] = reason
    if not found and not_a_dataset(root) is None:
        # A dataset's own folder: its train/, test/ and ground_truth/ said one by one as "not a dataset" hid that the
        # folder above it was meant.
        whole = root.resolve()
        raise EngineError(
            f"--data-root {root}: is itself a dataset (train/good/ and test/), expected the folder of datasets that "
            f"holds it: --data-root {whole.parent} --only {whole.name} (or `inspectd eval BUNDLE --data {root}`)"
        )
    for name in only or []:
        if name in skipped:
            raise EngineError(f"--only {name}: {root / name} is not a dataset: {skipped[name]}")
    if not only and report is not None:
        for name, reason in skipped.items():
            report(f"eval-suite: skipped {name}: {reason}")
    if not found:
        raise EngineError(f"{root}: no datasets, expected folders with train/good/ and test/")
    if not only:
        return found
    names = [p.name for p in found]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise EngineError(f"--only {' '.join(unknown)}: no such dataset in {root}, expected some of {', '.join(names)}")
    return [p for p in found if p.name in only]


def not_a_dataset(folder: Path) -> str | None:
    """Why `folder` is not a dataset (no train/good/, with the image folders it does hold, or no test/), None when it
    is one. Two defect-free folders in train/ still make one: train then refuses it, in its row."""
    missing, holds = [], []
    try:
        defect_free = defect_free_folders(folder / "train")
    except OSError as exc:  # a folder this user may not read: a skipped line, not the end of the suite
        return f"cannot read train/ ({exc.strerror or exc})"
    if not defect_free:
        missing.append(f"no train/good/ ({DEFECT_FREE_WORDS})")
        holds = [f"{sub.relative_to(folder).as_posix()}/ ({n})" for sub, n in image_folders(folder)]
    if not (folder / "test").is_dir():
        missing.append("no test/")
    if not missing:
        return None
    return ", ".join(missing) + (f"; image folders: {', '.join(holds)}" if holds else "")


def run_suite(root: Path, out: Path, recipe: str | None, only: list[str] | None, seed: int = 0) -> dict:
    """Train and evaluate every dataset; the table (as written to OUT/suite.md and suite.json). ValueError before
    anything is trained or written for what train would refuse of every dataset (--recipe, --seed, --out)."""
    found = datasets(root, only, report=lambda line: print(line, flush=True))
    check_arguments(found, out, recipe, seed)
    # A whole table has a row for each of these, whichever of them this run measures.
    every = [p.name for p in datasets(root)] if only else [p.name for p in found]
    this: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "every": every}
    this["only"] = list(only) if only else None
    earlier = _earlier_table(out, root, recipe, seed) if only else None
    rows: list[dict] = []
    reports: dict[str, dict] = {}
    try:
        _run_each(found, out, recipe, seed, rows, reports, this["created"])
    except (KeyboardInterrupt, SystemExit) as stop:  # SystemExit: `inspectd`'s SIGTERM
        part = ""
        if isinstance(stop, StoppedInTraining):
            part = f"; {stop.bundle} is a part-trained checkpoint, not measured (a later --only replaces it)"
        if not rows:  # an earlier run's table is worth more than an empty one
            kept = f"; {out / 'suite.md'} left as it was" if (out / "suite.md").exists() else ""
            print(
                f"eval-suite: interrupted before the first dataset was measured, no table written{kept}{part}",
                flush=True,
            )
            raise
        # What was measured before the Ctrl-C is kept, marked as a part.
        not_measured = [d.name for d in found if d.name not in reports]
        _write(out, rows, reports, recipe, root, seed, this, earlier, not_measured=not_measured)
        print(f"eval-suite: interrupted; {out / 'suite.md'} holds the {len(rows)} dataset(s) done{part}", flush=True)
        raise
    return _write(out, rows, reports, recipe, root, seed, this, earlier)


def check_arguments(found: list[Path], out: Path, recipe: str | None, seed: int) -> None:
    """ValueError for what train would refuse in every dataset's row: a mistyped recipe or seed, or an OUT whose
    bundle paths are not bundles or lie in the data. Refused up front, before the first dataset trains and before an
    earlier table is moved aside. Train is imported here, once the data root holds what was asked for: a mistyped
    root or name is refused in a moment, not after the seconds torch takes to load."""
    from engines.training.train import check_out, parse_seed, resolve_recipe

    resolve_recipe(recipe, {})
    try:
        parse_seed(str(seed))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--seed {exc}") from None
    for data in found:
        check_out(out / data.name / "bundle", data)


def _run_each(
    found: list[Path], out: Path, recipe: str | None, seed: int, rows: list[dict], reports: dict, measured: str
) -> None:
    from engines.training.evaluate import evaluate
    from engines.training.train import Progress, train_bundle, training_images

    for data in found:
        print(f"== {data.name}: train ({recipe or 'default'})", flush=True)
        load = os.getloadavg()[0]
        step = "train"
        # One dataset the recipe cannot handle must not lose the others already trained (hours on a full root):
        # its row records the refusal and the suite goes on; `run` exits non-zero at the end.
        try:
            result = train_bundle(
                data,
                out / data.name / "bundle",
                recipe=recipe,
                seed=seed,
                progress=Progress(enabled=False),
                report=lambda line: print(line, flush=True),
            )
            if result.interrupted:  # train keeps what it fitted on a Ctrl-C; the suite stops, not scores a part-model
                raise StoppedInTraining(result.bundle)
            print(f"== {data.name}: eval", flush=True)
            step = "eval"
            report = evaluate(result.bundle, data)
            for note in report["notes"]:  # what the row's blank or partial metrics lack, said where it happened
                print(f"== {data.name}: {note}", flush=True)
        except (EngineError, ValueError) as exc:
            error = f"{step}: {exc}"
            print(f"== {data.name}: FAILED {error}", flush=True)
            reports[data.name] = {"error": error}
            rows.append(
                {
                    "dataset": data.name,
                    "n_train": None,
                    "recipe": "FAILED " + error.replace("|", "/"),
                    "train_s": None,
                    "load": None,
                }
                | {m: None for m in METRICS}
                | {"error": error, "measured": measured}
            )
            continue
        reports[data.name] = {"train_seconds": round(result.seconds, 1), "eval": report}
        overall = report["overall"]
        row = {
            "dataset": data.name,
            "n_train": len(training_images(data)),
            "recipe": f"{result.recipe.name}, score {describe_score_share(result.recipe.score_share)}"
            + ("" if result.recipe.augment == "none" else f", {describe_augment(result.recipe.augment)}"),
            "train_s": round(result.seconds),
            "load": round(max(load, os.getloadavg()[0]), 1),
            **{m: overall[m] for m in METRICS},
            "measured": measured,
        }
        if blank := blank_reason(overall):
            # Said in the row: a row of dashes otherwise passes for a dataset measured like the others.
            row["note"] = blank
            row["recipe"] += f"; {blank}"
        rows.append(row)


def blank_reason(overall: dict) -> str | None:
    """Why an eval's overall row has no image metrics, where its test set is why: no defective images (then no
    pixel metrics either) or no defect-free ones."""
    if not overall["n_defective"]:
        return "blank: no defective test images"
    if not overall["n_good"]:
        return "no image metrics: no defect-free test images"
    return None


# What format_table and mean_row read of every row: an earlier suite.json's rows must hold them to be merged.
ROW_KEYS = ("dataset", "recipe", "train_s", "load", *METRICS)


def _earlier_table(out: Path, root: Path, recipe: str | None, seed: int) -> dict | None:
    """The table in OUT/suite.json an --only run merges its rows into, None where there is none to merge into (said
    in a line where there is a suite.json: one of another root, recipe or seed, or none this module wrote)."""
    path = out / "suite.json"
    if not path.exists():
        return None
    alone = "not merged: suite.md will hold only this run's datasets"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"eval-suite: {path}: cannot be read ({getattr(exc, 'strerror', None) or exc}), {alone}", flush=True)
        return None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in ROW_KEYS) for r in rows):
        print(f"eval-suite: {path}: no eval-suite table, {alone}", flush=True)
        return None
    given = {"data root": str(root), "recipe": recipe or "default", "seed": seed}
    theirs = {"data root": doc.get("data_root"), "recipe": doc.get("recipe"), "seed": doc.get("seed", seed)}
    same_root = theirs["data root"] is not None and Path(theirs["data root"]).resolve() == root.resolve()
    differ = [k for k in given if (not same_root if k == "data root" else given[k] != theirs[k])]
    if differ:
        said = ", ".join(f"{k} {theirs[k]} (this run: {given[k]})" for k in differ)
        print(f"eval-suite: {path}: a table of {said}, {alone}", flush=True)
        return None
    return doc


def _write(
    out: Path,
    rows: list[dict],
    reports: dict,
    recipe: str | None,
    root: Path,
    seed: int,
    this: dict,
    earlier: dict | None,
    not_measured: list[str] | None = None,
) -> dict:
    """Write OUT/suite.json and suite.md: this run's rows, with an --only run's merged into `earlier` (the table it
    found), after moving a whole earlier table to suite.prev.* (_keep_previous). `this`: the run's start time
    (created), the root's datasets (every) and --only. `not_measured`: the datasets an interrupt left out (None: the
    run was not interrupted)."""
    every = this["every"]
    this_run = [r["dataset"] for r in rows]
    kept = []
    if earlier is not None:
        # A row of a dataset the root no longer holds is left out: the table covers the root as it is.
        kept = [r for r in earlier["rows"] if r["dataset"] in every and r["dataset"] not in this_run]
        for r in kept:
            r.setdefault("measured", earlier.get("created"))
        theirs = earlier.get("reports")
        theirs = theirs if isinstance(theirs, dict) else {}
        reports = {r["dataset"]: theirs.get(r["dataset"]) for r in kept} | reports
    rows = sorted([*rows, *kept], key=lambda r: every.index(r["dataset"]))
    have = {r["dataset"] for r in rows}
    missing = [name for name in every if name not in have]
    table: dict[str, Any] = {"rows": rows, "mean": mean_row(rows), "recipe": recipe or "default", "seed": seed}
    table["data_root"] = str(root)
    table["created"] = this["created"]
    table["only"] = this["only"]
    table["this_run"] = this_run
    table["merged"] = earlier is not None
    table["kept_from_earlier"] = [r["dataset"] for r in kept]
    # This run's failures: a FAILED row kept from an earlier run is that run's, said in its row.
    table["failed"] = [r["dataset"] for r in rows if r.get("error") and r["dataset"] in this_run]
    if not_measured is not None:
        table["interrupted"] = True
        table["not_measured"] = not_measured
    table["missing"] = missing
    table["whole"] = not_measured is None and not missing and any(not r.get("error") for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    if done := _keep_previous(out):
        print(f"eval-suite: {done}", flush=True)
    (out / "suite.json").write_text(json.dumps({**table, "reports": reports}, indent=2) + "\n", encoding="utf-8")
    (out / "suite.md").write_text(format_table(table) + "\n", encoding="utf-8")
    return table


def _keep_previous(out: Path) -> str | None:
    """Move an earlier run's suite.md and suite.json to suite.prev.* where they are a whole table (is_whole), the two
    kept a pair: a prev file of a run older still, whose partner this run moves, goes. An earlier part table is left
    for this run's to replace, so suite.prev.* keeps the last whole one. What was done, in words (None: none there)."""
    pairs = [(out / f"suite{suffix}", out / f"suite.prev{suffix}") for suffix in (".md", ".json")]
    if not any(current.exists() for current, _ in pairs):
        return None
    if not is_whole(out / "suite.json"):
        kept = f", {out / 'suite.prev.md'} (the last whole table) kept" if (out / "suite.prev.md").exists() else ""
        part = "a part table (interrupted, --only or every row FAILED)"
        return f"the earlier {out / 'suite.md'} was {part}: replaced{kept}"
    for current, previous in pairs:
        if current.exists():
            os.replace(current, previous)
        else:
            previous.unlink(missing_ok=True)
    return f"the earlier table moved to {out / 'suite.prev.md'}"


def is_whole(path: Path) -> bool:
    """Whether the table in suite.json `path` is whole: a row for every dataset, not interrupted, one measured at
    least. A table of a version that did not record it: not interrupted and not every row FAILED. One that cannot be
    read as a table (or none beside a suite.md) counts as whole: what it holds is unknown, so it is kept."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    if not isinstance(doc, dict):
        return True
    if "whole" in doc:
        return bool(doc["whole"])
    rows = doc.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return True
    return not doc.get("interrupted") and any(not r.get("error") for r in rows)


def mean_row(rows: list[dict]) -> dict:
    """Each metric's mean over the datasets that have it, with how many those are (`n_datasets`)."""
    covered: dict[str, int] = {}
    mean = {"dataset": "mean", "recipe": "", "n_train": None, "train_s": None, "load": None, "n_datasets": covered}
    for m in METRICS:
        # A dataset without masks has no pixel metrics and a one-class test set no image metrics, so the columns'
        # means can cover different datasets; the count keeps such a mean from passing for one over all of them.
        values = [r[m] for r in rows if r[m] is not None]
        mean[m] = sum(values) / len(values) if values else None
        covered[m] = len(values)
    return mean


def format_table(table: dict) -> str:
    n_rows = len(table["rows"])
    kept = set(table.get("kept_from_earlier") or [])

    def cell(value, covered: int) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if covered == n_rows else f"{value:.3f} ({covered}/{n_rows})"

    def recipe(row: dict) -> str:
        if row is table["mean"] or row["dataset"] not in kept:
            return row["recipe"]
        # A row an --only run kept from the table it merged into: measured by another run, perhaps of other code.
        return f"{row['recipe']}; earlier run" + (f" {row['measured']}" if row.get("measured") else "")

    lines = [
        "| dataset | recipe chosen | image AUROC | pixel AUROC | AUPRO | F1-max | train s (load) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [*table["rows"], table["mean"]]:
        took = "" if r["train_s"] is None else f"{r['train_s']} ({r['load']})"
        covered = r.get("n_datasets", {})
        metrics = " | ".join(cell(r[m], covered.get(m, n_rows)) for m in METRICS)
        lines.append(f"| {r['dataset']} | {recipe(r)} | {metrics} | {took} |")
    not_measured = table.get("not_measured") or []
    if table.get("interrupted"):
        done = n_rows - len(kept)
        lines.append(
            f"\nINTERRUPTED: {done} of {done + len(not_measured)} dataset(s) done"
            + (f"; not measured: {', '.join(not_measured)}" if not_measured else "")
        )
    left_out = [name for name in table.get("missing") or [] if name not in not_measured]
    if left_out:
        also = " nor in the table it merged into" if table.get("merged") else ""
        lines.append(f"\nPART: no row for {', '.join(left_out)} (not run by this --only run{also})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None, help=DEFAULT_ROOT_HELP)
    parser.add_argument(
        "--out",
        default="runs/suite",
        help="where bundles (OUT/<dataset>/bundle), suite.md and suite.json go. The table is written once a dataset "
        "has its row (an interrupt before that writes none). suite.prev.md and suite.prev.json keep the last whole "
        "table (a row for every dataset, not interrupted, not every row FAILED): an earlier whole table moves there, "
        "an earlier part table is replaced",
    )
    parser.add_argument("--recipe", default=None, help="recipe to train with (default: train's default, auto)")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="dataset folder names to run, at least one (without --only: all); their rows are merged into "
        "OUT/suite.json's table of the same --data-root, --recipe and --seed, whose other rows are kept, marked "
        "`earlier run TIME`",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed (default 0; --recipe and --seed are checked as train checks them before the first dataset trains)",
    )


def run(args: argparse.Namespace) -> int:
    # SIGINT is claimed by `inspectd` (inspectd.cli STOPPED_BY_SIGINT), also where a script started the suite in the
    # background with it ignored.
    started = time.monotonic()
    if args.only is not None and not args.only:
        # `--only $DATASETS` with the variable empty: all of them would take hours, where none were asked for.
        print("inspectd eval-suite: --only: expected at least one dataset name", file=sys.stderr)
        return 2
    try:
        root = default_root() if args.data_root is None else Path(args.data_root)
        table = run_suite(root, Path(args.out), args.recipe, args.only, args.seed)
    except (EngineError, ValueError) as exc:
        print(f"inspectd eval-suite: {exc}", file=sys.stderr)
        return 2
    # A KeyboardInterrupt goes on to `inspectd`'s main, which says so and exits 130 (before the first dataset, too).
    print(format_table(table))
    print(f"{args.out}/suite.md written, {time.monotonic() - started:.0f}s")
    if table["failed"]:
        print(
            f"inspectd eval-suite: {len(table['failed'])} of {len(table['this_run'])} dataset(s) failed: "
            f"{', '.join(table['failed'])} (the error is in each one's row)",
            file=sys.stderr,
        )
        return 1
    return 0
