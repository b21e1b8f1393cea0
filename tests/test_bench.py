"""Tests of `inspectd bench engine` and `inspectd bench naive` on a tiny real bundle (64x64, trained on a few frames
of the built-in synthetic line): each prints a Markdown table and writes JSON whose figures agree with each other
(throughput against latency, frames against windows and batches, table against JSON). No speed is asserted: speed
goals are met in benchmark runs that print figures (docs/PERFORMANCE.md), never in timed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from engines.data.synthline import SyntheticLine
    from engines.progress import Progress
    from engines.training.train import train_bundle

    images = tmp_path_factory.mktemp("good")
    SyntheticLine(64, 64, seed=5).write_folder(images, 4)  # the built-in line: the test runs on every machine
    result = train_bundle(
        images,
        tmp_path_factory.mktemp("bundle") / "b64",
        method="frozen",
        backbone="lite0",
        size=(64, 64),
        progress=Progress(enabled=False),
    )
    return result.bundle


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def table_rows(stdout: str) -> list[list[str]]:
    """Body rows of the first Markdown table printed."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, f"no Markdown table in:\n{stdout}"
    assert set(lines[1].replace("|", "")) == {"-"}
    return [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[2:]]


@pytest.mark.exclusive
def test_bench_engine_prints_table_and_json(tiny_bundle, tmp_path):
    out = tmp_path / "engine.json"
    proc = bench("engine", str(tiny_bundle), "--batch", "1,2", "--windows", "1", "--window-s", "0.2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert [r[1] for r in rows] == ["1", "2"]
    for row in rows:
        assert row[0] == "64x64x1"
        assert float(row[2]) > 0 and float(row[4]) > 0 and float(row[6]) > 0  # frames/s, latency, CPU per frame
    report = json.loads(out.read_text())
    assert report["kind"] == "engine" and report["peak_rss_mb"] > 0
    (size,) = report["sizes"]
    assert size["input"] == [64, 64, 1] and size["trained_for_bench"] is False
    for row, printed in zip(size["rows"], rows):
        assert row["fps"]["median"] > 0 and row["latency_ms"]["p50"] > 0 and row["frames"] >= row["batch"]
        assert row["fps"]["min"] <= row["fps"]["median"] <= row["fps"]["max"]
        # The calls run back to back, so frames per second is the batch over the time of one call: a throughput
        # counted per call instead of per frame, or a latency in the wrong unit, is off by far more than 2x.
        implied = row["batch"] * 1000.0 / row["latency_ms"]["p50"]
        assert 0.5 < row["fps"]["median"] / implied < 2.0, (row["fps"], row["latency_ms"])
        assert row["frames"] % row["batch"] == 0 and row["latency_ms"]["n"] == row["frames"] // row["batch"]
        assert len(row["windows"]) == 1 and row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert float(printed[2]) == pytest.approx(row["fps"]["median"], rel=0.01, abs=0.1)  # the table shows the JSON
    assert report["best"]["batch"] == max(size["rows"], key=lambda r: r["fps"]["median"])["batch"]


def test_bench_naive_on_five_synthetic_frames(tiny_bundle):
    proc = bench("naive", str(tiny_bundle), "--synthetic", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = table_rows(proc.stderr)  # --json: stdout is the one JSON document, the table goes to stderr
    assert row[0].startswith("naive") and row[1] == "5"
    assert float(row[2]) > 0 and float(row[3]) > 0
    report = json.loads(proc.stdout)
    assert report["frames"] == 5 and report["fps"] > 0 and report["latency_ms"]["n"] == 5
    assert report["received"] == 5  # every published result reached the subscriber
    # One frame at a time: the frames' latencies cannot add up to more than the run took. At least half the frames
    # took the median or longer, so median x ceil(frames / 2) is a lower bound of that sum (median x frames is not).
    slower_half = -(-report["frames"] // 2)
    assert report["latency_ms"]["p50"] * slower_half / 1000.0 <= report["seconds"] * 1.05
    # CPU time in the right unit (seconds, not ms) and of this process alone. Over a run this short (tens of ms) the
    # process clock sums every thread's time, ONNX Runtime's spinning pool included, and read 2.34 cores on a
    # 2-core machine once: the bound allows that, and still fails a unit error (x1000) or another process's time.
    assert 0 < report["cpu_cores_used"] <= (os.cpu_count() or 1) * 2, report["cpu_cores_used"]


def test_bench_naive_refuses_an_empty_frames_folder(tiny_bundle, tmp_path):
    proc = bench("naive", str(tiny_bundle), "--frames", str(tmp_path), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and str(tmp_path) in proc.stderr and "expected" in proc.stderr


def test_arrival_rate_counts_whole_batches_only():
    from inspectd.tools.bench.daemon import arrival_rate

    # 10 frames/s in batches of 8 (one every 0.8 s, results 2 ms apart), the window opening mid-way between batches:
    # a plain count over the window would say 96 / 9.5 s = 10.1, and 8 frames more or less moves it by 8%.
    arrivals = [0.3 + 0.8 * k + 0.002 * j for k in range(12) for j in range(8)]
    assert arrival_rate(arrivals, max_batch=8) == pytest.approx(10.0)
    # Steady single-frame arrivals and a lone burst have no bursts to count: the caller divides by its window.
    assert arrival_rate([0.2 * i for i in range(50)], max_batch=8) is None
    assert arrival_rate([1.0, 1.001], max_batch=8) is None


@pytest.mark.parametrize(
    "args, refused",
    [
        (["daemon", "--bundle", "b", "--max-wait-ms", "-1"], "--max-wait-ms: '-1': expected at least 0, got -1.0"),
        (
            ["daemon", "--bundle", "b", "--max-wait-ms", "nan"],
            "--max-wait-ms: 'nan': expected a finite number, got nan",
        ),
        (["all", "b", "--max-wait-ms", "1e9"], "--max-wait-ms: '1e9': expected at most 3600000, got 1000000000.0"),
        (["all", "b", "--max-batch", "300"], "--max-batch: '300': expected at most 256, got 300"),
        (["naive", "b", "--synthetic", "5", "--duration", "-1"], "--duration: '-1': expected a finite float >= 0"),
        (["engine", "b", "--window-s", "inf"], "--window-s: 'inf': expected a finite float > 0"),
    ],
)
def test_bench_refuses_what_the_daemon_would_refuse_before_measuring_anything(args, refused):
    proc = bench(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"inspectd bench {args[0]}: error: argument {refused}"


def test_bench_daemon_exits_1_when_a_scenario_failed_and_keeps_the_others_figures(tiny_bundle, tmp_path):
    # Every daemon's control socket goes under TMPDIR, and a socket path past 107 bytes cannot be bound: each daemon
    # of this run exits at start (the engine measured first in this process does not mind).
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    out = tmp_path / "daemon.json"
    args = ["daemon", "--bundle", str(tiny_bundle), "--source", "zmq-raw", "--cameras", "1", "--load", "sat"]
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "bench", *args, "--synthetic", "2", "--duration", "0.5", "--max-batch", "1"]
        + ["--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TMPDIR": str(deep)},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("inspectd bench daemon: 1 of 1 daemon scenarios failed, the first zmq-raw x1 sat: "), last
    (row,) = json.loads(out.read_text())["rows"]  # the figures are still written
    assert "error" in row and "FAILED" in proc.stdout


def test_the_profiled_daemon_run_is_a_run_of_its_own_outside_the_goals(tiny_bundle, tmp_path):
    from inspectd.tools.bench.command import ratios

    args = ["daemon", "--bundle", str(tiny_bundle), "--source", "zmq-raw", "--cameras", "1", "--load", "sat,0.5"]
    args += ["--synthetic", "2", "--duration", "1", "--max-batch", "1", "--profile", str(tmp_path / "p.pstats")]
    proc = bench(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["profile"]["frames"] > 0
    (profiled,) = [r for r in report["rows"] if r["profiled"]]
    (plain,) = [r for r in report["rows"] if r["load"] == "saturation" and not r["profiled"]]
    (half,) = [r for r in report["rows"] if r["load"] == "50% of saturation"]
    assert len(report["rows"]) == 3 and not half["profiled"]
    # The fixed rate is half of the plain run's saturation, whatever cProfile made of the profiled one.
    assert half["offered_fps"] == pytest.approx(0.5 * plain["delivered_fps"])
    # Marked as such in the table and kept out of every ratio: they are the same without it.
    assert "profiled" in profiled["load"] and profiled["load"] in proc.stderr
    engine_rows = report["engine_rows"]
    best = max(engine_rows, key=lambda r: r["fps"]["median"])
    engine = {"best": best, "sizes": [{"trained_for_bench": False, "rows": engine_rows}]}
    without = {**report, "rows": [plain, half]}
    assert ratios(engine, None, report, 10.0, 1) == ratios(engine, None, without, 10.0, 1)
