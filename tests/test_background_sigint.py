"""`kill -INT` stops the offline commands (eval, calibrate, teach, train) also when a script started them in the
background: a shell without job control starts such a command with SIGINT ignored, which it inherits, and eval then
went on to the end of its thousands of images (as calibrate and teach did) while train and eval-suite stopped. Real
subprocesses, a real bundle, real image files."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tiny_dataset import make_tiny_mvtec

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
# Unbuffered, so the first line the command prints (teach's) reaches the pipe when it is printed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_FRAMES = 1500
# `inspectd ARGS` as a script's `inspectd ARGS &` starts it: with SIGINT ignored.
IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, '-m', 'inspectd', *sys.argv[1:]])"
)


@pytest.fixture(scope="module")
def bundle_and_frames(tmp_path_factory) -> tuple[Path, Path]:
    """A cheap bundle (recipe aligned at 64x64) and a test set of N_FRAMES distinct good frames (one copy more, which
    calibrate and teach say they leave out before their work starts), enough for each command to run for seconds."""
    from engines.progress import Progress
    from engines.training.train import train_bundle

    root = tmp_path_factory.mktemp("sigint")
    data = make_tiny_mvtec(root / "data", n_train=6, n_test_good=1, n_test_defect=1)
    bundle = root / "bundle"
    train_bundle(data, bundle, recipe="aligned", size=(64, 64), progress=Progress(enabled=False))
    frames = root / "set" / "test" / "good"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_FRAMES):
        assert cv2.imwrite(str(frames / f"{i:04d}.png"), rng.integers(0, 256, (64, 64), dtype=np.uint8))
    shutil.copy(frames / "0000.png", frames / "copy.png")
    return bundle, root / "set"


def _stopped_by_kill_int(*args: str) -> tuple[int, str]:
    """(exit status, everything printed) of `inspectd ARGS` started with SIGINT ignored and sent SIGINT at its first
    line of output."""
    proc = subprocess.Popen(
        [sys.executable, "-c", IGNORING_SIGINT, *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not select.select([proc.stdout, proc.stderr], [], [], 0.5)[0]:
            assert time.monotonic() < deadline and proc.poll() is None, f"no first line from {args[0]}"
        os.kill(proc.pid, signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args[0]} goes on 60 s after SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stdout + stderr


@pytest.mark.parametrize("command", ["eval", "calibrate", "teach", "train"])
def test_an_offline_command_started_in_the_background_by_a_script_stops_on_kill_int(
    bundle_and_frames, tmp_path, command
):
    bundle, data = bundle_and_frames
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))  # teach replaces the bundle it is given
    args = {
        "eval": ["eval", str(copy), "--data", str(data), "--batch", "1", "--out", str(tmp_path / "report.json")],
        "calibrate": ["calibrate", str(copy), "--good", str(data), "--batch", "1", "--dry-run"],
        "teach": ["teach", str(copy), "--good", str(data / "test" / "good")],
        "train": ["train", "--data", str(data / "test" / "good"), "--out", str(tmp_path / "trained")],
    }[command]
    code, said = _stopped_by_kill_int(*args)
    if command == "train":  # what it fitted by then is written, marked interrupted (test_train_frozen)
        assert code == 130 and "interrupted" in said.lower() and "Traceback" not in said, said
        return
    assert code == 130 and f"inspectd {command}: interrupted" in said and "Traceback" not in said, said
    assert not (tmp_path / "report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # teach wrote no version beside it
