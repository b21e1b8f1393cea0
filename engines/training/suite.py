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
The table is written once there is a row, at the end or on an interrupt (then marked so, with the datasets not run), and
an earlier run's suite.md and suite.json are moved to suite.prev.md and suite.prev.json first: a run that measured
nothing never replaces a table that took hours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engines.bundle.format import describe_augment, describe_score_share
from engines.data.images import DEFECT_FREE_WORDS, defect_free_folders, image_folders
from engines.errors import EngineError

DEFAULT_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


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
    rows: list[dict] = []
    reports: dict[str, dict] = {}
    try:
        _run_each(found, out, recipe, seed, rows, reports)
    except (KeyboardInterrupt, SystemExit):  # SystemExit: `inspectd`'s SIGTERM
        if not rows:  # an earlier run's table is worth more than an empty one
            kept = f"; {out / 'suite.md'} left as it was" if (out / "suite.md").exists() else ""
            print(f"eval-suite: interrupted before the first dataset was measured, no table written{kept}", flush=True)
            raise
        # What was measured before the Ctrl-C is kept, marked as a part (an earlier run's table goes to suite.prev.md).
        _write(out, rows, reports, recipe, root, not_measured=[d.name for d in found if d.name not in reports])
        print(f"eval-suite: interrupted; {out / 'suite.md'} holds the {len(rows)} dataset(s) done", flush=True)
        raise
    return _write(out, rows, reports, recipe, root)


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


def _run_each(found: list[Path], out: Path, recipe: str | None, seed: int, rows: list[dict], reports: dict) -> None:
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
                raise KeyboardInterrupt
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
                | {"error": error}
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


def _write(
    out: Path, rows: list[dict], reports: dict, recipe: str | None, root: Path, not_measured: list[str] | None = None
) -> dict:
    """Write OUT/suite.json and suite.md, first moving an earlier run's to suite.prev.json and suite.prev.md.
    `not_measured`: the datasets an interrupt left out (None: the run was whole)."""
    table: dict[str, Any] = {"rows": rows, "mean": mean_row(rows), "recipe": recipe or "default"}
    table["data_root"] = str(root)
    table["failed"] = [r["dataset"] for r in rows if r.get("error")]
    if not_measured is not None:
        table["interrupted"] = True
        table["not_measured"] = not_measured
    out.mkdir(parents=True, exist_ok=True)
    _keep_previous(out)
    (out / "suite.json").write_text(json.dumps({**table, "reports": reports}, indent=2) + "\n", encoding="utf-8")
    (out / "suite.md").write_text(format_table(table) + "\n", encoding="utf-8")
    return table


def _keep_previous(out: Path) -> None:
    """An earlier run's suite.md and suite.json (hours of training on a full root) moved to suite.prev.*, the two
    kept a pair: a prev file of a run older still, whose partner this run moves, goes."""
    pairs = [(out / f"suite{suffix}", out / f"suite.prev{suffix}") for suffix in (".md", ".json")]
    if not any(current.exists() for current, _ in pairs):
        return
    for current, previous in pairs:
        if current.exists():
            os.replace(current, previous)
        else:
            previous.unlink(missing_ok=True)


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

    def cell(value, covered: int) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if covered == n_rows else f"{value:.3f} ({covered}/{n_rows})"

    lines = [
        "| dataset | recipe chosen | image AUROC | pixel AUROC | AUPRO | F1-max | train s (load) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [*table["rows"], table["mean"]]:
        took = "" if r["train_s"] is None else f"{r['train_s']} ({r['load']})"
        covered = r.get("n_datasets", {})
        metrics = " | ".join(cell(r[m], covered.get(m, n_rows)) for m in METRICS)
        lines.append(f"| {r['dataset']} | {r['recipe']} | {metrics} | {took} |")
    if table.get("interrupted"):
        not_measured = table.get("not_measured") or []
        lines.append(
            f"\nINTERRUPTED: {n_rows} of {n_rows + len(not_measured)} dataset(s) done"
            + (f"; not measured: {', '.join(not_measured)}" if not_measured else "")
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT), help=f"folder of datasets (default {DEFAULT_ROOT})")
    parser.add_argument(
        "--out",
        default="runs/suite",
        help="where bundles (OUT/<dataset>/bundle), suite.md and suite.json go. The table is written once a dataset "
        "has its row (an interrupt before that writes none); an earlier suite.md and suite.json are then moved to "
        "suite.prev.md and suite.prev.json",
    )
    parser.add_argument("--recipe", default=None, help="recipe to train with (default: train's default, auto)")
    parser.add_argument("--only", nargs="*", default=None, help="dataset folder names to run (default: all)")
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
    try:
        table = run_suite(Path(args.data_root), Path(args.out), args.recipe, args.only, args.seed)
    except (EngineError, ValueError) as exc:
        print(f"inspectd eval-suite: {exc}", file=sys.stderr)
        return 2
    # A KeyboardInterrupt goes on to `inspectd`'s main, which says so and exits 130 (before the first dataset, too).
    print(format_table(table))
    print(f"{args.out}/suite.md written, {time.monotonic() - started:.0f}s")
    if table["failed"]:
        print(
            f"inspectd eval-suite: {len(table['failed'])} of {len(table['rows'])} dataset(s) failed: "
            f"{', '.join(table['failed'])} (the error is in each one's row)",
            file=sys.stderr,
        )
        return 1
    return 0
