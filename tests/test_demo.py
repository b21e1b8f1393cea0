"""`inspectd demo` end to end as a real process: trains a (small) model on the synthetic line, runs the daemon,
subscribes, stops it and prints the summary."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_short_demo_catches_planted_defects(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspectd",
            "demo",
            "--workdir",
            str(workdir),
            "--duration",
            "4",
            "--rate",
            "8",
            "--cameras",
            "2",
            "--size",
            "96",
            "--train-frames",
            "48",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=REPO,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    verdicts = [line for line in out.splitlines() if re.match(r"cam[01] seq=\d+ (ok|defect)", line)]
    frames = int(re.search(r"summary: (\d+) frames from 2 camera", out).group(1))
    assert frames >= 20 and len(verdicts) == frames
    planted, caught = (int(v) for v in re.search(r"defects planted (\d+), caught (\d+)", out).groups())
    assert planted >= 3 and caught / planted >= 0.6, out[-1500:]
    assert re.search(r"latency p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "0 errors, 0 lost" in out and "daemon exit status 0" in out
    assert (workdir / "bundle" / "manifest.json").is_file() and (workdir / "inspectd.yaml").is_file()

    # A second run reuses the model instead of training again.
    again = subprocess.run(
        [sys.executable, "-m", "inspectd", "demo", "--workdir", str(workdir), "--duration", "1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "using the model in" in again.stdout and "training" not in again.stdout
    assert not re.search(r"^cam\d seq=", again.stdout, re.M) and "summary:" in again.stdout


def test_demo_refuses_bad_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "demo", "--workdir", str(tmp_path), "--cameras", "9"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "--cameras 9: expected 1..4" in proc.stderr
