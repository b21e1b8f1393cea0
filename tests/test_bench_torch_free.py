"""The bench's measured process never imports torch: `--size` and `--frame-size` are read without training's module,
and a bundle at another size is trained in a child. On a runtime-only install they work, or refuse in one line;
with torch installed, the bench's memory figures do not carry it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_bench import train_tiny_bundle

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return train_tiny_bundle(tmp_path_factory)


def bench_in_process(args: list[str], without_torch: bool) -> subprocess.CompletedProcess:
    """`inspectd bench ARGS` in a child that says on its last stderr line whether torch was imported."""
    code = (
        "import sys\n"
        + ("sys.modules['torch'] = None\n" if without_torch else "")
        + "from inspectd.cli import main\n"
        + f"code = main(['bench', *{args!r}])\n"
        + "print('torch imported:', sys.modules.get('torch') is not None, file=sys.stderr)\n"
        + "sys.exit(code)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=200, cwd=ROOT)


def test_bench_naive_with_a_frame_size_runs_without_torch(tiny_bundle):
    proc = bench_in_process(["naive", str(tiny_bundle), "--synthetic", "2", "--frame-size", "64"], without_torch=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "torch imported: False"


def test_bench_engine_at_another_size_without_torch_says_so_in_one_line(tiny_bundle):
    proc = bench_in_process(["engine", str(tiny_bundle), "--size", "32", "--batch", "1"], without_torch=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-2] == (
        "inspectd bench engine: --size 32x32: training a bundle at another size than the bundle's needs the Python "
        "package 'torch', which is not installed (pip install 'inspectd[train]')"
    )


def test_bench_engine_trains_another_size_in_a_child_and_never_imports_torch(tiny_bundle):
    """With `--size` the bench process had torch and timm loaded: 650 MB more in every memory figure it reports."""
    args = ["engine", str(tiny_bundle), "--size", "64", "32", "--batch", "1", "--windows", "1", "--window-s", "0.2"]
    proc = bench_in_process([*args, "--json"], without_torch=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "torch imported: False"
    report = json.loads(proc.stdout)
    assert [s["input"][:2] for s in report["sizes"]] == [[64, 64], [32, 32]]
    assert [s["trained_for_bench"] for s in report["sizes"]] == [False, True]
    # Resident now, not the peak: a child's ru_maxrss starts at its parent's at the fork, and pytest holds torch.
    assert all(s["rss_end_mb"] < 400 for s in report["sizes"]), [s["rss_end_mb"] for s in report["sizes"]]
