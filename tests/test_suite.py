"""`inspectd eval-suite`: every dataset folder under the root is trained and evaluated, and the table has a row per
dataset, the mean, and the recipe each run used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tiny_dataset import make_tiny_mvtec

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_suite_covers_every_dataset_folder_and_writes_the_table(tmp_path):
    root = tmp_path / "data"
    make_tiny_mvtec(root / "tile_a", n_train=6, n_test_good=2, n_test_defect=2)
    make_tiny_mvtec(root / "tile_b", n_train=6, n_test_good=2, n_test_defect=2, defect_type="crack")
    (root / "not_a_dataset").mkdir()
    out = tmp_path / "suite"
    result = subprocess.run(
        [sys.executable, "-m", "inspectd", "eval-suite", "--data-root", str(root), "--out", str(out)]
        + ["--recipe", "aligned"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    table = (out / "suite.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| tile_a", "| tile_b", "| mean"]
    assert all(" | aligned, score max | " in line for line in table[2:4])  # a forced recipe keeps the maximum
    report = json.loads((out / "suite.json").read_text())
    a, b = (report["reports"][name]["eval"]["overall"]["image_auroc"] for name in ("tile_a", "tile_b"))
    assert report["mean"]["image_auroc"] == pytest.approx((a + b) / 2)
    assert (out / "tile_a" / "bundle" / "manifest.json").is_file()
    assert "tile_a" in result.stdout and "suite.md written" in result.stdout


def _refusal(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "inspectd", "eval-suite", *args], capture_output=True, text=True, timeout=120
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


def test_suite_refuses_a_dataset_name_it_does_not_have_before_training_any(tmp_path):
    root = tmp_path / "data"
    make_tiny_mvtec(root / "tile_a", n_train=6, n_test_good=2, n_test_defect=2)
    make_tiny_mvtec(root / "tile_b", n_train=6, n_test_good=2, n_test_defect=2)
    out = tmp_path / "o"
    assert _refusal("--data-root", str(root), "--out", str(out), "--only", "tile_a", "tile_c") == (
        f"inspectd eval-suite: --only tile_c: no such dataset in {root}, expected some of tile_a, tile_b"
    )
    assert not out.exists()
