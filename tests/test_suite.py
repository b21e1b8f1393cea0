"""`inspectd eval-suite`: every dataset folder under the root is trained and evaluated, and the table has a row per
dataset, the mean, and the recipe each run used."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.training import suite
from tests.tiny_dataset import make_tiny_mvtec

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def suite_cli(root: Path, out: Path) -> subprocess.CompletedProcess:
    """`inspectd eval-suite` on ROOT with the cheapest recipe (a Gaussian per location, no memory bank to build)."""
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "eval-suite", "--data-root", str(root), "--out", str(out)]
        + ["--recipe", "aligned"],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_suite_covers_every_dataset_folder_and_writes_the_table(tmp_path):
    root = tmp_path / "data"
    make_tiny_mvtec(root / "tile_a", n_train=6, n_test_good=2, n_test_defect=2)
    make_tiny_mvtec(root / "tile_b", n_train=6, n_test_good=2, n_test_defect=2, defect_type="crack")
    (root / "not_a_dataset").mkdir()
    # A file that does not decode is left out of the eval with a warning, not the dataset failed after its training;
    # BTAD's test/ok is the defect-free images.
    broken = root / "tile_a" / "test" / "good" / "broken.png"
    broken.write_bytes(b"not an image")
    (root / "tile_b" / "test" / "good").rename(root / "tile_b" / "test" / "ok")
    out = tmp_path / "suite"
    result = suite_cli(root, out)
    assert result.returncode == 0, result.stderr
    assert f"== tile_a: WARNING: skipped 1 image(s) that do not decode: {broken}" in result.stdout.splitlines()
    table = (out / "suite.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| tile_a", "| tile_b", "| mean"]
    assert all(" | aligned, score max | " in line for line in table[2:4])  # a forced recipe keeps the maximum
    report = json.loads((out / "suite.json").read_text())
    a, b = (report["reports"][name]["eval"]["overall"]["image_auroc"] for name in ("tile_a", "tile_b"))
    assert report["mean"]["image_auroc"] == pytest.approx((a + b) / 2)
    assert (out / "tile_a" / "bundle" / "manifest.json").is_file()
    assert "tile_a" in result.stdout and "suite.md written" in result.stdout
    skipped = "eval-suite: skipped not_a_dataset: no train/good/ (good/ or ok/, any case), no test/"
    assert result.stdout.splitlines()[0] == skipped  # before any training


def test_suite_records_a_dataset_that_fails_and_goes_on_with_the_others(tmp_path):
    """One dataset refused (here an empty train/good) used to stop the suite with nothing written, losing every
    dataset already trained: its row now says why, the others are trained and evaluated, and the exit says so."""
    root = tmp_path / "data"
    (root / "a_empty" / "train" / "good").mkdir(parents=True)
    (root / "a_empty" / "test" / "good").mkdir(parents=True)
    make_tiny_mvtec(root / "tile_b", n_train=6, n_test_good=2, n_test_defect=2)
    out = tmp_path / "suite"
    result = suite_cli(root, out)
    assert result.returncode == 1, result.stderr
    error = (
        f"train: {root / 'a_empty'}: no images (read {root / 'a_empty' / 'train' / 'good'}), expected "
        "train/good/*.png|jpg or a folder of images"
    )
    assert result.stderr.strip().splitlines()[-1] == (
        "inspectd eval-suite: 1 of 2 dataset(s) failed: a_empty (the error is in each one's row)"
    )
    report = json.loads((out / "suite.json").read_text())
    assert report["failed"] == ["a_empty"] and report["reports"]["a_empty"] == {"error": error}
    failed, trained = report["rows"]
    assert failed["error"] == error and all(failed[m] is None for m in suite.METRICS)
    assert trained["dataset"] == "tile_b" and trained["image_auroc"] is not None
    assert report["mean"]["image_auroc"] == trained["image_auroc"] and report["mean"]["n_datasets"]["image_auroc"] == 1
    table = (out / "suite.md").read_text().splitlines()
    assert table[2].startswith(f"| a_empty | FAILED {error.replace('|', '/')} | - | - | - | - |")
    assert table[3].startswith("| tile_b | aligned, score max | ") and table[4].startswith("| mean |")
    assert (out / "tile_b" / "bundle" / "manifest.json").is_file()


def test_mean_row_says_how_many_datasets_a_mean_covers_when_not_all():
    """A dataset without masks has no pixel metrics, so the pixel means cover fewer datasets than the image means:
    the table says so in the cell and suite.json in a count beside the (still numeric) mean."""
    rows = [
        {"dataset": "tile_a", "recipe": "local", "train_s": 1, "load": 0.5}
        | {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7, "f1_max": 0.85},
        {"dataset": "tile_b", "recipe": "local", "train_s": 1, "load": 0.5}
        | {"image_auroc": 0.7, "pixel_auroc": None, "aupro": None, "f1_max": 0.75},
    ]
    mean = suite.mean_row(rows)
    assert mean["pixel_auroc"] == pytest.approx(0.8) and mean["image_auroc"] == pytest.approx(0.8)
    assert mean["n_datasets"] == {"image_auroc": 2, "pixel_auroc": 1, "aupro": 1, "f1_max": 2}
    lines = suite.format_table({"rows": rows, "mean": mean}).splitlines()
    assert lines[-1] == "| mean |  | 0.800 | 0.800 (1/2) | 0.700 (1/2) | 0.800 |  |"
    assert lines[-2] == "| tile_b | local | 0.700 | - | - | 0.750 | 1 (0.5) |"


# inspectd with torch made unimportable: a refusal of the arguments must come before the seconds torch takes to load.
WITHOUT_TORCH = "import runpy, sys; sys.modules['torch'] = None; runpy.run_module('inspectd', run_name='__main__')"


def _refusal(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "eval-suite", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout
    return result.stderr.strip()


def test_suite_refuses_a_root_without_datasets_or_no_root_in_one_line(tmp_path):
    out = str(tmp_path / "o")
    assert (
        _refusal("--data-root", str(tmp_path), "--out", out)
        == f"inspectd eval-suite: {tmp_path}: no datasets, expected folders with train/good/ and test/"
    )
    missing = tmp_path / "missing"
    assert (
        _refusal("--data-root", str(missing), "--out", out)
        == f"inspectd eval-suite: --data-root {missing}: not a directory, expected a folder of datasets"
    )


def test_a_data_root_that_is_itself_a_dataset_is_said_to_be_one_with_the_root_to_give(tmp_path):
    """Its train/, test/ and ground_truth/ were each skipped as "not a dataset", then "no datasets": nothing said
    that the folder given was one, nor which --data-root was meant."""
    root = tmp_path / "data"
    make_tiny_mvtec(root / "tile_a", n_train=2, n_test_good=1, n_test_defect=1)
    out = tmp_path / "o"
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "eval-suite", "--data-root", str(root / "tile_a"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr == (
        f"inspectd eval-suite: --data-root {root / 'tile_a'}: is itself a dataset (train/good/ and test/), expected "
        f"the folder of datasets that holds it: --data-root {root} --only tile_a (or `inspectd eval BUNDLE --data "
        f"{root / 'tile_a'}`)\n"
    )
    assert not out.exists()


def test_suite_refuses_a_dataset_name_it_does_not_have_before_training_any(tmp_path):
    root = tmp_path / "data"
    make_tiny_mvtec(root / "tile_a", n_train=6, n_test_good=2, n_test_defect=2)
    make_tiny_mvtec(root / "tile_b", n_train=6, n_test_good=2, n_test_defect=2)
    out = tmp_path / "o"
    assert _refusal("--data-root", str(root), "--out", str(out), "--only", "tile_a", "tile_c") == (
        f"inspectd eval-suite: --only tile_c: no such dataset in {root}, expected some of tile_a, tile_b"
    )
    assert not out.exists()


def test_suite_refuses_only_without_a_name_instead_of_running_every_dataset(tmp_path):
    """`--only $DATASETS` with the variable empty ran the whole suite, hours of it."""
    root = tmp_path / "data"
    make_tiny_mvtec(root / "tile_a", n_train=6, n_test_good=2, n_test_defect=2)
    out = tmp_path / "o"
    assert (
        _refusal("--data-root", str(root), "--out", str(out), "--only")
        == "inspectd eval-suite: --only: expected at least one dataset name"
    )
    assert not out.exists()


@pytest.mark.parametrize("stop", ["ctrl-c", "ctrl-c kept by train", "sigterm"])
def test_a_suite_stopped_by_ctrl_c_keeps_the_datasets_it_finished(tmp_path, monkeypatch, stop):
    """Ctrl-C in the second dataset wrote nothing (and left an earlier run's suite.md standing beside the new
    bundles): the rows done are written, marked interrupted, and the interrupt goes on to the caller. Train keeps
    what it fitted on a Ctrl-C and returns it marked interrupted: the suite then evaluated that part-model as the
    dataset's row and went on. `inspectd`'s SIGTERM (a SystemExit) wrote nothing."""
    import dataclasses

    from engines.training import train

    root = tmp_path / "data"
    for name in ("tile_a", "tile_b"):
        make_tiny_mvtec(root / name, n_train=6, n_test_good=2, n_test_defect=2)
    out = tmp_path / "suite"
    out.mkdir()
    (out / "suite.md").write_text("an earlier run's table\n")
    real = train.train_bundle

    def second_interrupted(data, *args, **kwargs):
        if data.name == "tile_b" and stop == "ctrl-c":
            raise KeyboardInterrupt
        if data.name == "tile_b" and stop == "sigterm":
            raise SystemExit(143)
        result = real(data, *args, **kwargs)
        return dataclasses.replace(result, interrupted=data.name == "tile_b")

    monkeypatch.setattr(train, "train_bundle", second_interrupted)
    with pytest.raises(SystemExit if stop == "sigterm" else KeyboardInterrupt):
        suite.run_suite(root, out, "aligned", None)
    report = json.loads((out / "suite.json").read_text())
    assert report["interrupted"] is True and [r["dataset"] for r in report["rows"]] == ["tile_a"]
    assert (out / "suite.md").read_text().splitlines()[2].startswith("| tile_a | aligned, score max | ")


# `inspectd ARGS` started as a shell without job control starts a background command (`eval-suite ... &` in a script):
# with SIGINT ignored, which the command inherits.
IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, '-m', 'inspectd', *sys.argv[1:]])"
)


def test_a_suite_started_in_the_background_by_a_script_stops_on_kill_int(tmp_path):
    """Such a suite dropped `kill -INT` and went on training (hours on a full root), where train stops on it."""
    root = tmp_path / "data"
    make_tiny_mvtec(root / "tile_a", n_train=6, n_test_good=2, n_test_defect=2)
    (root / "not_a_dataset").mkdir()  # its line comes before the suite loads torch
    args = ["eval-suite", "--data-root", str(root), "--out", str(tmp_path / "suite"), "--recipe", "aligned"]
    proc = subprocess.Popen(
        [sys.executable, "-c", IGNORING_SIGINT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not select.select([proc.stdout], [], [], 0.5)[0]:
            assert time.monotonic() < deadline and proc.poll() is None, "no first line from eval-suite"
        assert proc.stdout.readline().startswith("eval-suite: skipped not_a_dataset: ")
        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("eval-suite goes on 30 s after SIGINT")
        said = proc.stdout.read() + proc.stderr.read()
        assert code == 130 and "interrupted" in said and "Traceback" not in said, said
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_folders_that_are_not_datasets_are_each_said_with_the_reason(tmp_path):
    """A dataset one level off the layout (Train/good, no test/) used to drop out of the table without a word, and
    `--only` then said it did not exist."""
    root = tmp_path / "data"
    make_tiny_mvtec(root / "e_caps", n_train=2, n_test_good=1, n_test_defect=1)
    (root / "e_caps" / "train").rename(root / "e_caps" / "Train")
    make_tiny_mvtec(root / "h_no_test", n_train=2, n_test_good=1, n_test_defect=1)
    for sub in ("test", "ground_truth"):
        shutil.rmtree(root / "h_no_test" / sub)
    (root / "f_empty").mkdir()
    (root / ".cache").mkdir()  # hidden: not a dataset, not worth a line
    (root / "README.md").write_text("the datasets\n")
    out = str(tmp_path / "o")
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "eval-suite", "--data-root", str(root), "--out", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    no_good = "no train/good/ (good/ or ok/, any case)"
    assert result.returncode == 2 and result.stdout.splitlines() == [
        f"eval-suite: skipped e_caps: {no_good}; image folders: Train/good/ (2), ground_truth/blowhole/ (1), "
        "test/blowhole/ (1)",
        f"eval-suite: skipped f_empty: {no_good}, no test/",
        "eval-suite: skipped h_no_test: no test/",
    ], result.stdout
    assert result.stderr == f"inspectd eval-suite: {root}: no datasets, expected folders with train/good/ and test/\n"
    assert _refusal("--data-root", str(root), "--out", out, "--only", "h_no_test") == (
        f"inspectd eval-suite: --only h_no_test: {root / 'h_no_test'} is not a dataset: no test/"
    )
    # train/ok (BTAD, OK/NG sets) is a training set: that folder is a dataset.
    make_tiny_mvtec(root / "c_btad", n_train=2, n_test_good=1, n_test_defect=1)
    (root / "c_btad" / "train" / "good").rename(root / "c_btad" / "train" / "ok")
    lines: list[str] = []
    assert suite.datasets(root, report=lines.append) == [root / "c_btad"]
    assert [line.split(":")[0] for line in lines] == ["eval-suite"] * 3 and "c_btad" not in "".join(lines)
    # A train/ that cannot be listed (here a link to itself; another user's folder alike) is a skipped line, not the
    # end of the suite for every other dataset.
    (root / "g_loop").mkdir()
    (root / "g_loop" / "train").symlink_to(root / "g_loop" / "train")
    lines = []
    assert suite.datasets(root, report=lines.append) == [root / "c_btad"]
    assert "eval-suite: skipped g_loop: cannot read train/ (Too many levels of symbolic links)" in lines, lines


def test_what_train_would_refuse_for_every_dataset_is_refused_before_any_trains_and_the_table_stays(tmp_path):
    """A mistyped --recipe or a negative --seed was found inside each dataset's train: every row FAILED, and the
    table of an earlier run (hours on a full root) was replaced by them. An OUT whose bundle paths lie in the datasets
    (OUT = the data root) failed every dataset the same way."""
    root = tmp_path / "data"
    for name in ("tile_a", "tile_b"):
        make_tiny_mvtec(root / name, n_train=2, n_test_good=1, n_test_defect=1)
    out = tmp_path / "suite"
    out.mkdir()
    (out / "suite.md").write_text("an earlier run's table\n")
    (out / "suite.json").write_text("{}\n")

    def refusal(*args: str) -> str:  # checked as train checks them, with train's functions: torch is loaded
        result = subprocess.run(
            [sys.executable, "-m", "inspectd", "eval-suite", "--data-root", str(root), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and "== tile_a" not in result.stdout, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        return result.stderr.strip()

    assert refusal("--out", str(out), "--recipe", "Aligned").startswith(
        "inspectd eval-suite: --recipe 'Aligned': expected auto or one of "
    )
    assert refusal("--out", str(out), "--seed", "-1") == "inspectd eval-suite: --seed -1: expected an integer >= 0"
    assert refusal("--out", str(root)) == (
        f"inspectd eval-suite: --out {root / 'tile_a' / 'bundle'}: lies inside --data {root / 'tile_a'}, expected a "
        "bundle path outside the training data and not holding it"
    )
    assert sorted(p.name for p in out.iterdir()) == ["suite.json", "suite.md"]
    assert (out / "suite.md").read_text() == "an earlier run's table\n"
    assert sorted(p.name for p in (root / "tile_a").iterdir()) == ["ground_truth", "test", "train"]


def test_a_run_that_measured_nothing_keeps_the_earlier_table_and_one_that_did_moves_it_aside(tmp_path, monkeypatch):
    """An interrupt before the first dataset's row replaced an earlier table with an empty one; a run with rows now
    moves the earlier one to suite.prev.md/json, and an interrupted suite.md says it is a part, as suite.json does."""
    from engines.errors import DataError
    from engines.training import train

    root = tmp_path / "data"
    for name in ("tile_a", "tile_b", "tile_c"):
        make_tiny_mvtec(root / name, n_train=2, n_test_good=1, n_test_defect=1)
    out = tmp_path / "suite"
    out.mkdir()
    (out / "suite.md").write_text("an earlier run's table\n")
    (out / "suite.json").write_text('{"rows": "earlier"}\n')

    def stopped_at(name: str):
        def train_bundle(data, *args, **kwargs):
            if data.name == name:
                raise KeyboardInterrupt
            raise DataError(f"{data}: refused for the test")

        return train_bundle

    monkeypatch.setattr(train, "train_bundle", stopped_at("tile_a"))
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(root, out, "aligned", None)
    assert sorted(p.name for p in out.iterdir()) == ["suite.json", "suite.md"]
    assert (out / "suite.md").read_text() == "an earlier run's table\n"
    assert (out / "suite.json").read_text() == '{"rows": "earlier"}\n'

    monkeypatch.setattr(train, "train_bundle", stopped_at("tile_b"))
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(root, out, "aligned", None)
    assert (out / "suite.prev.md").read_text() == "an earlier run's table\n"
    assert (out / "suite.prev.json").read_text() == '{"rows": "earlier"}\n'
    table = (out / "suite.md").read_text().splitlines()
    assert table[2].startswith("| tile_a | FAILED train: ") and table[3].startswith("| mean |")
    assert table[-1] == "INTERRUPTED: 1 of 3 dataset(s) done; not measured: tile_b, tile_c"
    report = json.loads((out / "suite.json").read_text())
    assert report["interrupted"] is True and report["not_measured"] == ["tile_b", "tile_c"]


def test_a_dataset_whose_test_set_has_no_defects_says_so_in_its_row(tmp_path):
    """Its row of dashes counted as a dataset measured like the others, with nothing to say why."""
    root = tmp_path / "data"
    data = make_tiny_mvtec(root / "only_good", n_train=4, n_test_good=2, n_test_defect=1)
    for sub in ("test/blowhole", "ground_truth"):
        shutil.rmtree(data / sub)
    out = tmp_path / "suite"
    result = suite_cli(root, out)
    assert result.returncode == 0, result.stderr
    note = f"== only_good: note: {data / 'test'} has no defective images, which image AUROC, F1-max and the pixel "
    assert any(line.startswith(note) for line in result.stdout.splitlines()), result.stdout
    row = (out / "suite.md").read_text().splitlines()[2]
    assert row.startswith("| only_good | aligned, score max; blank: no defective test images | - | - | - | - | ")
    assert json.loads((out / "suite.json").read_text())["rows"][0]["note"] == "blank: no defective test images"


def test_only_runs_merge_into_the_table_and_no_run_pushes_the_last_whole_table_out(tmp_path, monkeypatch, capsys):
    """suite.prev kept one generation, whatever it held: `--only a` then `--only b` after a whole run left a table of
    b alone beside one of a alone, and two interrupted or all-FAILED runs lost the whole table. An --only run's rows
    now merge into the table it finds, and only a whole table moves to suite.prev."""
    from engines.errors import DataError
    from engines.training import train

    root = tmp_path / "data"
    for name in ("tile_a", "tile_b"):
        make_tiny_mvtec(root / name, n_train=4, n_test_good=1, n_test_defect=1)
    out = tmp_path / "suite"
    real = train.train_bundle

    def trained(data, *args, **kwargs):  # the suite's own training, at the cheapest size
        return real(data, *args, size=(64, 64), **kwargs)

    def refused(data, *args, **kwargs):
        raise DataError(f"{data}: refused for the test")

    def interrupted(data, *args, **kwargs):
        if data.name == "tile_b":
            raise KeyboardInterrupt
        raise DataError(f"{data}: refused for the test")

    def table(name: str = "suite") -> tuple[list[str], dict]:
        return (out / f"{name}.md").read_text().splitlines(), json.loads((out / f"{name}.json").read_text())

    monkeypatch.setattr(train, "train_bundle", trained)
    first = suite.run_suite(root, out, "aligned", None)
    assert not (out / "suite.prev.md").exists()
    when = first.get("created")
    merged = suite.run_suite(root, out, "aligned", ["tile_a"])
    lines, doc = table()
    assert [r["dataset"] for r in doc["rows"]] == ["tile_a", "tile_b"]
    assert (
        first["whole"] is doc["whole"] is True
        and doc["kept_from_earlier"] == ["tile_b"]
        and doc["reports"]["tile_b"]["eval"]["overall"]["image_auroc"] > 0
    )
    assert lines[2].startswith("| tile_a | aligned, score max | ")
    assert lines[3].startswith(f"| tile_b | aligned, score max; earlier run {when} | ")
    assert doc["rows"][1] == {**first["rows"][1], "measured": when}
    assert table("suite.prev")[1]["created"] == when
    suite.run_suite(root, out, "aligned", ["tile_b"])
    lines, doc = table()
    assert lines[2].startswith(f"| tile_a | aligned, score max; earlier run {merged['created']} | ")
    assert lines[3].startswith("| tile_b | aligned, score max | ") and doc["whole"] is True
    whole = (out / "suite.md").read_text()

    # Two interrupted runs, then two runs of which every dataset FAILED: the last whole table stays in suite.prev.
    monkeypatch.setattr(train, "train_bundle", interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            suite.run_suite(root, out, "aligned", None)
        assert table()[0][-1] == "INTERRUPTED: 1 of 2 dataset(s) done; not measured: tile_b"
        assert (out / "suite.prev.md").read_text() == whole
    monkeypatch.setattr(train, "train_bundle", refused)
    for _ in range(2):
        assert suite.run_suite(root, out, "aligned", None)["whole"] is False
        assert (out / "suite.prev.md").read_text() == whole
    assert "(the last whole table) kept" in capsys.readouterr().out
    # An --only run of another recipe merges into none: it says so, and its table says which datasets it lacks.
    assert suite.run_suite(root, out, "patchcore", ["tile_a"])["missing"] == ["tile_b"]
    said = capsys.readouterr().out
    assert f"eval-suite: {out / 'suite.json'}: a table of recipe aligned (this run: patchcore), not merged" in said
    assert table()[0][-1] == "PART: no row for tile_b (not run by this --only run)"
    assert (out / "suite.prev.md").read_text() == whole


def test_an_interrupt_while_a_dataset_trains_names_its_part_trained_bundle(tmp_path, monkeypatch, capsys):
    """Train writes its Ctrl-C checkpoint at OUT/<dataset>/bundle, which the suite never scores: the table said the
    dataset was not measured, but the bundle, complete-looking beside the measured ones, was not mentioned."""
    import dataclasses

    from engines.training import train

    root = tmp_path / "data"
    for name in ("tile_a", "tile_b"):
        make_tiny_mvtec(root / name, n_train=6, n_test_good=2, n_test_defect=2)
    out = tmp_path / "suite"
    real = train.train_bundle

    def stopped_in(name: str):
        def train_bundle(data, *args, **kwargs):
            result = real(data, *args, **kwargs)  # what a Ctrl-C in the training returns: a checkpoint written
            return dataclasses.replace(result, interrupted=data.name == name)

        return train_bundle

    checkpoint = out / "tile_b" / "bundle"
    monkeypatch.setattr(train, "train_bundle", stopped_in("tile_b"))
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(root, out, "aligned", None)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"eval-suite: interrupted; {out / 'suite.md'} holds the 1 dataset(s) done; {checkpoint} is a part-trained "
        "checkpoint, not measured (a later --only replaces it)"
    )
    assert (checkpoint / "manifest.json").is_file()  # kept: a later --only tile_b replaces it
    shutil.rmtree(out)
    monkeypatch.setattr(train, "train_bundle", stopped_in("tile_a"))
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(root, out, "aligned", None)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "eval-suite: interrupted before the first dataset was measured, no table written; "
        f"{out / 'tile_a' / 'bundle'} is a part-trained checkpoint, not measured (a later --only replaces it)"
    )


def _installed_copy(tmp_path: Path) -> Path:
    """The packages copied into a venv's site-packages, as `deploy/install.sh --with-train` leaves them: no checkout
    around them. The folder to put on PYTHONPATH."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    repo = Path(__file__).resolve().parents[1]
    for package in ("inspectd", "engines", "calibration"):
        shutil.copytree(repo / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def test_an_installed_copy_takes_the_default_data_root_beside_the_checkout_it_is_run_in_or_asks_for_one(tmp_path):
    """The default --data-root came from the package's own place, so an installed copy looked inside its venv
    (venv/lib/python3.11/shared/data). It is README's ../shared/data beside the checkout the command is run in, and
    where there is none, one line asks for --data-root."""
    site = _installed_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def refusal(cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, "eval-suite", "--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd,
            env=env,
        )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = refusal(elsewhere)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr == (
        "inspectd eval-suite: --data-root needed: the default is ../shared/data beside the inspectd checkout, and "
        f"none holds the current directory ({elsewhere}) or this package ({site / 'engines' / 'training'})\n"
    )

    checkout = tmp_path / "work" / "inspectd"
    (checkout / "sub").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "inspectd"\n')
    proc = refusal(checkout / "sub")
    data = tmp_path / "work" / "shared" / "data"
    assert proc.returncode == 2 and proc.stderr == (
        f"inspectd eval-suite: --data-root needed: no folder of datasets at {data} (the default, ../shared/data "
        "beside the inspectd checkout)\n"
    ), proc.stderr[-2000:]

    (data / "notes").mkdir(parents=True)
    proc = refusal(checkout / "sub")
    assert proc.returncode == 2 and proc.stderr == (
        f"inspectd eval-suite: {data}: no datasets, expected folders with train/good/ and test/\n"
    ), proc.stderr[-2000:]
    assert proc.stdout.startswith("eval-suite: skipped notes: ")
