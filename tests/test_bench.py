"""Tests of `inspectd bench engine` and `inspectd bench naive` on a tiny real bundle (64x64, trained on a few frames
of the built-in synthetic line): each prints a Markdown table and writes JSON whose figures agree with each other
(throughput against latency, frames against windows and batches, table against JSON). No speed is asserted: speed
goals are met in benchmark runs that print figures (docs/PERFORMANCE.md), never in timed tests."""

from __future__ import annotations

import cProfile
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_child import inspectd_argv
from plc_peers import wait as wait_for

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]


def train_tiny_bundle(tmp_path_factory) -> Path:
    """A 64x64 frozen Lite0 bundle fitted on 4 frames of the built-in synthetic line: the test runs on every machine."""
    from engines.data.synthline import SyntheticLine
    from engines.progress import Progress
    from engines.training.train import train_bundle

    images = tmp_path_factory.mktemp("good")
    SyntheticLine(64, 64, seed=5).write_folder(images, 4)
    result = train_bundle(
        images,
        tmp_path_factory.mktemp("bundle") / "b64",
        method="frozen",
        backbone="lite0",
        size=(64, 64),
        progress=Progress(enabled=False),
    )
    return result.bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return train_tiny_bundle(tmp_path_factory)


def bench(*args: str, timeout: float = 180, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "bench", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def cli(args: list[str], stdout, stderr, env: dict | None = None) -> subprocess.Popen:
    """`inspectd ARGS` in a process group of its own (a terminal's Ctrl-C reaches the group), with SIGINT at its
    default action: a test run from a background job inherits it ignored, and Python then never raises
    KeyboardInterrupt."""
    return subprocess.Popen(
        inspectd_argv(*args), cwd=ROOT, stdout=stdout, stderr=stderr, env=env, start_new_session=True
    )


def is_daemon(pid: int) -> bool:
    """An `inspectd run` process, alive: not a zombie, which an orphan may stay when PID 1 does not reap."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"inspectd" in argv and b"run" in argv and state != "Z"


def daemon_children(pid: int) -> list[int]:
    """The `inspectd run` processes `pid` started (from its main thread, as the bench and the demo do)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in children if is_daemon(int(child))]


def kill_daemons(pids: list[int]) -> None:
    """Test cleanup: the daemons a stopped command left running, by their pid once it is seen to be one still."""
    for pid in pids:
        if is_daemon(pid):
            os.kill(pid, signal.SIGKILL)


def stopped_by(signum: int) -> tuple[int, str]:
    """What `inspectd` exits with, and says last, when a signal ends a command that has no stop of its own."""
    if signum == signal.SIGINT:
        return 130, "interrupted"
    return 143, "stopped by SIGTERM"


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
        assert float(row[2]) > 0 and float(row[4]) > 0 and float(row[7]) > 0  # frames/s, latency, CPU per frame
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
        # A p99 of fewer than 100 calls is their maximum under another name: the table gives the count, and "-".
        n = row["latency_ms"]["n"]
        assert printed[6] == str(n) and (printed[5] == "-") == (n < 100), (printed, n)
    assert report["best"]["batch"] == max(size["rows"], key=lambda r: r["fps"]["median"])["batch"]


def test_bench_naive_on_five_synthetic_frames(tiny_bundle):
    proc = bench("naive", str(tiny_bundle), "--synthetic", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = table_rows(proc.stderr)  # --json: stdout is the one JSON document, the table goes to stderr
    assert row[0].startswith("naive") and row[1] == "5"
    assert float(row[2]) > 0 and float(row[3]) > 0
    assert row[4] == "-" and row[5] == "5"  # no p99 from 5 latencies, and the count it would rest on
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
    # A link whose target is gone is named as such (it read as an image that does not decode, with OpenCV's warning).
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    gone = bench("naive", str(tiny_bundle), "--frames", str(tmp_path), timeout=60)
    assert gone.returncode == 1 and gone.stderr.strip().splitlines() == [
        f"inspectd bench naive: {tmp_path / 'gone.png'}: cannot read (No such file or directory), expected a JPEG/PNG "
        "image"
    ], gone.stderr


def test_arrival_rate_counts_whole_batches_only():
    from inspectd.tools.bench.daemon import arrival_rate

    # 10 frames/s in batches of 8 (one every 0.8 s, results 2 ms apart), the window opening mid-way between batches:
    # a plain count over the window would say 96 / 9.5 s = 10.1, and 8 frames more or less moves it by 8%.
    arrivals = [0.3 + 0.8 * k + 0.002 * j for k in range(12) for j in range(8)]
    assert arrival_rate(arrivals, max_batch=8) == pytest.approx(10.0)
    # The window opening part-way through a burst: its first burst is short, and counting from its tail read 9.2.
    for skipped in (3, 7):
        assert arrival_rate(arrivals[skipped:], max_batch=8) == pytest.approx(10.0), skipped
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
        (
            ["daemon", "--bundle", "b", "--frame-size", "4"],
            "--frame-size: '4': expected each side between 32 and 4096 pixels",
        ),
        (["engine", "b", "--size", "0"], "--size: '0': expected each side between 32 and 4096 pixels"),
    ],
)
def test_bench_refuses_what_the_daemon_would_refuse_before_measuring_anything(args, refused, capsys):
    # In this process: the parser refuses, and a child pays seconds for torch where --size or --frame-size is checked
    # by train's functions. The command line once, below: its entry point is the same for every refusal.
    from inspectd.cli import main

    with pytest.raises(SystemExit) as ended:
        main(["bench", *args])
    assert ended.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"inspectd bench {args[0]}: error: argument {refused}"


def test_bench_refuses_on_the_command_line_with_exit_2():
    proc = bench("daemon", "--bundle", "b", "--max-wait-ms", "-1", timeout=60)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "inspectd bench daemon: error: argument --max-wait-ms: '-1': expected at least 0, got -1.0"


def test_bench_daemon_exits_1_when_a_scenario_failed_and_keeps_the_others_figures(tiny_bundle, tmp_path):
    # Every daemon's control socket goes under TMPDIR, and a socket path past 107 bytes cannot be bound: each daemon
    # of this run exits at start (the engine measured first in this process does not mind).
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    out = tmp_path / "daemon.json"
    # A profile left by an earlier run: the profiled daemon of this one fails too, and writes none.
    stale = tmp_path / "p.pstats"
    cProfile.run("sum(range(10))", str(stale))
    args = ["daemon", "--bundle", str(tiny_bundle), "--source", "zmq-raw", "--cameras", "1", "--load", "sat"]
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "bench", *args, "--synthetic", "2", "--duration", "0.5", "--max-batch", "1"]
        + ["--out", str(out), "--profile", str(stale)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TMPDIR": str(deep)},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    first = "inspectd bench daemon: 2 of 2 daemon scenarios failed, the first zmq-raw x1 saturation: "
    assert last.startswith(first), last
    report = json.loads(out.read_text())  # the figures are still written
    assert all("error" in row for row in report["rows"]) and "FAILED" in proc.stdout
    # Neither the earlier run's profile nor one of a daemon that never served is passed off as this run's.
    assert report["profile"]["error"].startswith(f"{stale}: not summarised, the profiled run failed: "), report
    assert f"profile: {stale}: not summarised" in proc.stdout


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
    # The daemon's own peak memory was in the JSON only; the report a reader gets names it too.
    (header,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("| source |")]
    assert header.rstrip(" |").endswith("| daemon peak RSS MB")
    (table_row,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("| zmq-raw | 1 | 50% of saturation |")]
    assert float(table_row.strip(" |").split("|")[-1]) == pytest.approx(half["daemon_peak_rss_mb"], rel=0.01, abs=1)
    engine_rows = report["engine_rows"]
    best = max(engine_rows, key=lambda r: r["fps"]["median"])
    engine = {"best": best, "sizes": [{"trained_for_bench": False, "rows": engine_rows}]}
    without = {**report, "rows": [plain, half]}
    assert ratios(engine, None, report, 10.0, 1) == ratios(engine, None, without, 10.0, 1)


# The smallest `bench all` the command line allows: about 10 s on 2 cores.
SMALLEST_ALL = ["--synthetic", "2", "--batch", "1", "--windows", "1", "--window-s", "0.05", "--max-batch", "1"]
SMALLEST_ALL += ["--cameras", "1", "--source", "zmq-raw", "--duration", "1"]


def test_bench_all_on_its_own_synthetic_frames_with_a_relative_profile_keeps_every_figure(tiny_bundle, tmp_path):
    """`bench all BUNDLE` without --frames writes its synthetic frames into a folder of its own: the report read their
    sizes once that folder was gone, and lost every figure. A relative --profile, as docs/PERFORMANCE.md gives it, was
    written into the profiled daemon's scenario folder, removed with it, and the report was lost again."""
    args = ["all", str(tiny_bundle), *SMALLEST_ALL, "--json", "--out", "run.json", "--markdown", "run.md"]
    proc = bench(*args, "--profile", "run.pstats", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["frames"] == 2 and report["frame_sizes"] == "64x64"
    assert json.loads((tmp_path / "run.json").read_text()) == report
    assert report["daemon"]["profile"]["frames"] > 0 and (tmp_path / "run.pstats").is_file()
    markdown = (tmp_path / "run.md").read_text()
    assert "### Goals" in markdown and "### Daemon profile" in markdown and "2 frames (64x64)" in markdown


@pytest.mark.parametrize("option", ["--markdown", "--out", "--profile"])
def test_bench_refuses_an_output_it_cannot_write_before_measuring_anything(tiny_bundle, tmp_path, option):
    """A report file that cannot be written was found only after the run (minutes of it), and --markdown's failure
    lost the JSON too, in an error that did not name the option."""
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "report"
    proc = bench("all", str(tiny_bundle), *SMALLEST_ALL, "--json", option, str(path), timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"inspectd bench all: {option} {path}: cannot write (Not a directory)\n"


class DaemonSockets:
    """The daemon's side of a scenario's sockets on real ZeroMQ, bound where the scenario's daemon would bind them:
    results and status on its publish endpoint, control `status` replies. `warmup` goes out once the subscriber has
    joined; `window` once the bench asks for its first status, which it does when its warm-up ends."""

    def __init__(
        self, scenario, warmup: list[list[bytes]], window: list[list[bytes]], replies: list[dict] | None = None
    ) -> None:
        import threading

        import zmq

        from inspectd.clients.subscribe import Subscriber

        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.linger = 0
        self.pub.bind(scenario.publish)
        self.rep = ctx.socket(zmq.REP)
        self.rep.linger = 0
        self.rep.bind(scenario.control)
        self.sub = Subscriber(scenario.publish, topic="inspect.bench.", context=ctx)
        self.pub.rcvtimeo = 10000
        assert self.pub.recv()[0] == 1, "the subscriber joined"
        for frames in warmup:
            self.pub.send_multipart(frames)
        self.window = window
        self.replies = replies or [
            {"ok": True, "batches": 0, "published": 0},
            {"ok": True, "batches": 10, "published": 40},
        ]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        # The bench may stop asking (the daemon it measured exited): wait in slices, and the sockets are closed only
        # once this thread is done with them (a socket closed under a blocked recv aborts libzmq).
        for k, reply in enumerate(self.replies):
            while not self.rep.poll(50):
                if self.stop.is_set():
                    return
            self.rep.recv_json()
            self.rep.send_json(reply)
            if k == 0:
                for frames in self.window:
                    self.pub.send_multipart(frames)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.sub.socket.close(0)
        self.pub.close(0)
        self.rep.close(0)


def result(seq: int, verdict: str) -> list[bytes]:
    import time

    from inspectd.protocol.messages import encode_result

    now = time.time()
    return encode_result(
        station="bench",
        camera="cam0",
        seq=seq,
        frame_id=str(seq),
        t_capture=now - 0.01,
        t_publish=now,
        verdict=verdict,
        score=None if verdict == "error" else 0.1,
        threshold=0.5,
        model_id="m",
        thresholds_version=1,
        regions=[],
        latency_ms=10.0,
        width=64,
        height=64,
        error="engine: failed" if verdict == "error" else None,
    )


def status(dropped: int) -> list[bytes]:
    import time

    from inspectd.protocol.messages import encode_status

    return encode_status(
        "bench",
        {
            "t": time.time(),
            "uptime_s": 1.0,
            "healthy": True,
            "model_id": "m",
            "thresholds_version": 1,
            "throughput_fps": 10.0,
            "cameras": {"cam0": {"dropped": dropped}},
        },
    )


@pytest.fixture
def scenario(tiny_bundle, tmp_path, monkeypatch):
    """A real Scenario (its config written, nothing started) and its frames; a short warm-up for the socket tests."""
    from engines.data.synthline import SyntheticLine
    from inspectd.tools.bench import daemon

    monkeypatch.setattr(daemon, "WARMUP_S", 0.2)
    frames_dir = tmp_path / "frames"
    SyntheticLine(64, 64, seed=1).write_folder(frames_dir, 2)
    frames = daemon.FrameSet(sorted(frames_dir.glob("*")), 1)

    def make(source: str = "synthetic", saturate: bool = False, cameras: int = 1, frames=frames, **kw):
        workdir = tmp_path / f"s{len(list(tmp_path.glob('s*')))}"
        workdir.mkdir()
        rate = None if saturate else 20.0
        return daemon.Scenario(tiny_bundle, source, cameras, frames, workdir, saturate=saturate, rate_hz=rate, **kw)

    return make


def sleeper(scenario, code: str) -> subprocess.Popen:
    """A child standing in for the daemon process, its output in the scenario's log like the daemon's."""
    with open(scenario.workdir / "daemon.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)


def test_a_window_of_error_verdicts_is_no_throughput_and_fails_the_scenario(scenario):
    from inspectd.tools.bench import daemon

    s = scenario()
    # Warm-up: seq 1 then 5, three frames lost before the window opens. Window: 6..45 with no hole, 10 of them errors,
    # and the queue counters (status messages) say 10 frames were dropped in it.
    window = [status(0)] + [result(seq, "error" if seq % 4 == 0 else "ok") for seq in range(6, 46)] + [status(10)]
    sockets = DaemonSockets(s, [result(1, "ok"), result(5, "ok")], window)
    proc = sleeper(s, "import time; time.sleep(60)")
    try:
        row = s._measure(proc, sockets.sub, 1.5, None)
    finally:
        proc.kill()
        proc.wait()
        sockets.close()
    assert row["delivered_fps"] == pytest.approx(30 / row["seconds"])  # judged frames only
    assert row["seq_gaps"] == 0  # the warm-up's losses are not the window's
    assert (row["delivered"], row["errors"], row["judged"], row["dropped_in_queue"]) == (40, 10, 30, 10)
    assert row["latency_ms"]["n"] == 30
    # A source inside the daemon: what it produced (published or dropped) is the rate sent, beside the 20/s asked.
    assert row["offered_fps"] == 20.0 and row["sent_fps"] == pytest.approx(50 / row["seconds"])
    assert daemon.row_failure(row) == (
        "10 of 40 results were error verdicts (more than 1%): the daemon failed frames rather than judged them"
    )
    assert daemon.row_failure({**row, "errors": 0, "judged": 40}) is None
    assert daemon.row_failure({**row, "errors": 40, "judged": 0}).startswith("no frame judged in the 1.")
    row.update(load="fixed", outside_engine_cpu_ms_per_frame=None)
    headers, (cells,) = daemon.rows_for_table({"rows": [row]})
    shown = dict(zip(headers, cells))
    assert shown["errors"] == 10 and shown["sent/s"] == row["sent_fps"] and shown["offered/s"] == 20.0


def test_drops_are_counted_from_the_control_replies_at_the_window_edges_not_the_status_messages_inside(scenario):
    """The status messages come every half second: the drops before the first and after the last one in the window
    were never counted, and a window of one status interval always read 0 (here 12 drops: 3 before the window's
    first status message, 2 after its last)."""
    s = scenario()
    window = [status(3)] + [result(seq, "ok") for seq in range(6, 46)] + [status(10)]
    replies = [
        {"ok": True, "batches": 0, "published": 0, "cameras": {"cam0": {"dropped": 0}}},
        {"ok": True, "batches": 10, "published": 40, "cameras": {"cam0": {"dropped": 12}}},
    ]
    sockets = DaemonSockets(s, [result(5, "ok")], window, replies)
    proc = sleeper(s, "import time; time.sleep(60)")
    try:
        row = s._measure(proc, sockets.sub, 1.0, None)
    finally:
        proc.kill()
        proc.wait()
        sockets.close()
    assert row["dropped_in_queue"] == 12
    assert row["sent_fps"] == pytest.approx((40 + 12) / row["seconds"])


def test_a_daemon_that_exits_during_the_window_fails_the_scenario_with_its_code_and_log(scenario):
    import time

    s = scenario(saturate=True)
    sockets = DaemonSockets(s, [], [status(0)])
    proc = sleeper(s, "import sys, time; time.sleep(1.0); print('engine lost'); sys.exit(3)")
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"daemon exited with 3 during the .*: engine lost"):
            s._measure(proc, sockets.sub, 6.0, None)
        # Noticed when it went quiet, not at the end of the window.
        assert time.monotonic() - started < 5.0
        assert s._stop(proc).startswith("daemon exited with 3 on its own, before SIGTERM: engine lost")
    finally:
        proc.kill()
        proc.wait()
        sockets.close()


def test_a_daemon_that_ended_says_why_with_its_error_line_not_the_routine_warnings_after_it(scenario):
    """The reason was the log's last five lines joined, and the table's cut at 80 characters left the start of a
    routine warning (drift_inactive) in place of the error that ended the daemon."""
    error = json.dumps({"event": "engine_failed", "level": "error", "error": "CUDA out of memory"})
    warning = json.dumps({"event": "drift_inactive", "level": "warning", "reason": "too few good frames"})
    s = scenario(saturate=True)
    proc = sleeper(s, f"import sys; print({error!r}); print({warning!r}); print({warning!r}); sys.exit(3)")
    try:
        proc.wait(30)
        assert s._stop(proc) == f"daemon exited with 3 on its own, before SIGTERM: {error}"
    finally:
        proc.kill()
        proc.wait()


def test_a_daemon_that_exits_non_zero_on_sigterm_fails_the_scenario(scenario):
    s = scenario(saturate=True)
    # Ready once it has printed: SIGTERM then finds its handler installed.
    code = "import signal, sys, time\n"
    code += "signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))\nprint('up', flush=True)\ntime.sleep(60)"
    proc = sleeper(s, code)
    try:
        import time

        deadline = time.monotonic() + 10
        while "up" not in s.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s._stop(proc) == "daemon exited with 1 after SIGTERM: up"
        clean = sleeper(s, "import time; time.sleep(60)")
        clean.terminate()  # the default action: -15, not a clean stop either
        clean.wait(10)
        assert s._stop(clean).startswith("daemon exited with -15 on its own")
    finally:
        proc.kill()
        proc.wait()


def test_one_bad_scenario_is_a_failed_row_and_its_fractional_loads_say_why(tmp_path):
    from inspectd.tools.bench.daemon import bench_daemon

    # A bundle that is not there fails every Scenario as it is built, before any daemon starts.
    report = bench_daemon(tmp_path / "missing", None, ["zmq-raw"], [1, 4], 1.0, ["sat", "0.5"], log=lambda m: None)
    rows = report["rows"]
    # Named as the measured rows name their loads: 'sat' and '0.5' were the command line's words.
    labels = [(r["cameras"], r["load"]) for r in rows]
    assert labels == [(1, "saturation"), (1, "50% of saturation"), (4, "saturation"), (4, "50% of saturation")]
    assert all("missing" in r["error"] for r in rows[::2]), rows
    assert rows[1]["error"] == "not run: the saturation run of zmq-raw x1 failed"


def test_the_folder_source_fills_its_backlog_when_frames_are_on_another_filesystem(scenario, tmp_path):
    import shutil
    import tempfile

    from inspectd.tools.bench.daemon import FrameSet

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's TMPDIR")
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))  # --frames on a disk, the bench's TMPDIR on tmpfs: no links
    try:
        for k, data in enumerate(scenario().frames.jpeg):
            (elsewhere / f"f{k}.jpg").write_bytes(data)
        frames = FrameSet(sorted(elsewhere.glob("*.jpg")), 1)
        s = scenario("folder", saturate=True, cameras=2, frames=frames, duration_s=1.0)
        files = sorted((s.workdir / "cam1").glob("*.jpg"))
        assert len(files) > 100
        assert [f.read_bytes() for f in files[:3]] == [frames.jpeg[0], frames.jpeg[1], frames.jpeg[0]]
    finally:
        shutil.rmtree(elsewhere)


def test_p99_at_half_load_is_judged_only_at_the_rate_it_names():
    from inspectd.tools.bench.command import half_load_line, ratios

    def row(load: str, **kw):
        return {
            "source": "zmq-raw",
            "cameras": 1,
            "load": load,
            "profiled": False,
            "delivered_fps": 40.0,
            "engine_cpu_ms_per_frame": 5.0,
            "daemon_cpu_ms_per_frame": 5.2,
            "outside_engine_cpu_ms_per_frame": 0.2,
            "latency_ms": {"p50": 20.0, "p99": 45.0, "max": 50.0, "n": 100},
            **kw,
        }

    engine_row = {"batch": 8, "fps": {"median": 42.0}, "latency_ms": {"p50": 40.0}}
    engine = {"best": engine_row, "sizes": [{"trained_for_bench": False, "rows": [engine_row]}]}

    def judged(sent: float | None, n: int = 100):
        latency = {"p50": 20.0, "p99": 45.0, "max": 50.0, "n": n}
        half = row("50% of saturation", offered_fps=20.0, sent_fps=sent, latency_ms=latency)
        daemon = {"rows": [row("saturation"), half]}
        values = ratios(engine, None, daemon, 10.0, 8)
        return values["p99_at_half_load"], half_load_line(values)

    line = "p99 bound at 50% load: 100 ms; zmq-raw x1: offered 20/s, sent 19.5/s."
    assert judged(19.5) == (pytest.approx(0.45), line)
    # The bench sent half of what it asked for: a quarter load, no goal judged on it, and the report says so.
    value, line = judged(10.0)
    assert value is None and "offered 20/s, sent 10/s (p99 goal not judged" in line
    assert judged(None)[0] is None
    # 99 latencies at half load: their p99 is their largest, no goal is judged on it, and the line says why.
    value, line = judged(19.5, n=99)
    assert value is None and line.endswith("sent 19.5/s (p99 goal not judged: 99 latency samples, a p99 needs 100).")


def test_a_saturated_scenario_may_drain_its_queues_within_the_longest_shutdown_the_config_allows(scenario):
    """At saturation every camera's queue is full when the bench stops the daemon: 4 cameras x 64 frames at 10
    frames/s take 26 s, more than the 10 s it was given, so the daemon exited 1 and a healthy run read as FAILED."""
    from inspectd.daemon.archive import CLOSE_GRACE_S
    from inspectd.daemon.config import MAX_SHUTDOWN_TIMEOUT_S
    from inspectd.daemon.service import PUB_LINGER_MS, PUBLISH_GRACE_S, SETTLE_S
    from inspectd.tools.bench import daemon

    s = scenario(saturate=True, cameras=4)
    assert json.loads(s.config.read_text())["shutdown_timeout_s"] == MAX_SHUTDOWN_TIMEOUT_S
    past_it = 2 * PUBLISH_GRACE_S + PUB_LINGER_MS / 1000 + SETTLE_S + CLOSE_GRACE_S  # its stop past its timeout
    assert daemon.STOP_TIMEOUT_S > MAX_SHUTDOWN_TIMEOUT_S + past_it


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_bench_stopped_by_a_signal_stops_its_daemon_and_removes_its_folders(
    tiny_bundle, tmp_path, tmp_path_factory, signum
):
    """`kill PID`, a CI job's timeout or a job scheduler end the bench with SIGTERM; a person with Ctrl-C. Either way
    the daemon it started must not stream on without it, nor its frame copies and logs stay behind in TMPDIR."""
    tmp = tmp_path_factory.mktemp("t")  # a short path: the daemons' control sockets are bound under it
    args = ["bench", "daemon", "--bundle", str(tiny_bundle), "--source", "zmq-raw", "--cameras", "1", "--load", "sat"]
    args += ["--synthetic", "2", "--duration", "120", "--max-batch", "1"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = cli(args, out, err, env={**os.environ, "TMPDIR": str(tmp)})
    daemons: list[int] = []
    try:

        def ready():  # its control socket is bound once it has started (its log is kept to warnings)
            return list(tmp.glob("inspectd-bench-daemon-*/s0/control.sock")) and daemon_children(proc.pid)

        daemons = wait_for(ready, 150, "the bench's daemon to start")
        proc.send_signal(signum)  # to the bench alone: it must stop the daemon itself
        code, said = stopped_by(signum)
        assert proc.wait(60) == code, (tmp_path / "err").read_text()[-2000:]
        err_text = (tmp_path / "err").read_text()
        assert err_text.strip().splitlines()[-1] == f"inspectd bench: {said}" and "Traceback" not in err_text
        wait_for(lambda: not any(map(is_daemon, daemons)), 10, "the daemon to be gone")
        assert not list(tmp.glob("inspectd-bench*"))
    finally:
        daemons = daemons or daemon_children(proc.pid)
        proc.kill()
        proc.wait()
        kill_daemons(daemons)


def held_stopped(pid: int) -> bool:
    """Every thread of `pid` stopped (SIGSTOP): from then on a signal sent to it stays pending, where a thread still
    running would take it."""
    try:
        states = [task.read_text().rsplit(")", 1)[1].split()[0] for task in Path(f"/proc/{pid}/task").glob("*/stat")]
    except OSError:  # a thread that ended meanwhile: look again
        return False
    return bool(states) and all(state == "T" for state in states)


def signal_pending(pid: int, signum: int) -> bool:
    """`signum` was sent to process `pid` and waits there (a stopped process takes none until it goes on)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = next(int(line.split()[1], 16) for line in status if line.startswith("ShdPnd:"))
    return bool(pending >> (signum - 1) & 1)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_second_stop_while_the_daemon_drains_kills_it_and_ends_the_bench_at_once(
    tiny_bundle, tmp_path, tmp_path_factory, second
):
    """After its first SIGTERM the bench waits up to STOP_TIMEOUT_S (80 s) for its daemon to drain. A second SIGTERM
    was ignored there, and a Ctrl-C ended the bench with the daemon still draining in a folder being removed. The
    daemon is held stopped (SIGSTOP) here: a drain that does not end."""
    tmp = tmp_path_factory.mktemp("t")
    args = ["bench", "daemon", "--bundle", str(tiny_bundle), "--source", "synthetic", "--cameras", "1", "--load", "sat"]
    args += ["--synthetic", "2", "--duration", "120", "--max-batch", "1"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = cli(args, out, err, env={**os.environ, "TMPDIR": str(tmp)})
    daemons: list[int] = []
    try:

        def ready():
            return list(tmp.glob("inspectd-bench-daemon-*/s0/control.sock")) and daemon_children(proc.pid)

        daemons = wait_for(ready, 150, "the bench's daemon to start")
        os.kill(daemons[0], signal.SIGSTOP)
        wait_for(lambda: held_stopped(daemons[0]), 10, "the daemon to be held stopped")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: signal_pending(daemons[0], signal.SIGTERM), 30, "the bench to stop its daemon")
        proc.send_signal(second)
        code, said = stopped_by(second)
        try:
            assert proc.wait(20) == code, (tmp_path / "err").read_text()[-2000:]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the bench still waits for its daemon 20 s after {signal.Signals(second).name}")
        err_text = (tmp_path / "err").read_text()
        assert err_text.strip().splitlines()[-1] == f"inspectd bench: {said}" and "Traceback" not in err_text
        wait_for(lambda: not any(map(is_daemon, daemons)), 10, "the daemon to be gone")
        assert not list(tmp.glob("inspectd-bench*"))
    finally:
        daemons = daemons or daemon_children(proc.pid)
        proc.kill()
        proc.wait()
        kill_daemons(daemons)


def test_a_stop_between_the_two_claims_kills_the_child_and_leaves_no_claim_behind():
    """A Ctrl-C landing after SIGTERM is claimed and before SIGINT is, taken by the old handler: SIGTERM stayed
    claimed for the rest of the process and the child was neither killed nor told to stop. A profile hook places the
    real SIGINT right after the first claim returns, a window too short to hit from outside."""
    from inspectd.tools.children import killed_on_a_stop

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    term_before = signal.getsignal(signal.SIGTERM)
    int_before = signal.signal(signal.SIGINT, signal.default_int_handler)

    def between_the_claims(_frame, event, _arg):
        # The first return from C once SIGTERM is claimed: the claim's own.
        if event == "c_return" and signal.getsignal(signal.SIGTERM) != term_before:
            sys.setprofile(None)
            signal.raise_signal(signal.SIGINT)

    try:
        with pytest.raises(KeyboardInterrupt):
            sys.setprofile(between_the_claims)
            with killed_on_a_stop(child):
                pytest.fail("the claim went through with a Ctrl-C inside it")
        sys.setprofile(None)
        assert signal.getsignal(signal.SIGTERM) == term_before
        assert child.wait(10) == -signal.SIGKILL
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGTERM, term_before)
        signal.signal(signal.SIGINT, int_before)
        child.kill()
        child.wait()


def test_a_stop_between_the_two_give_backs_leaves_no_claim_behind():
    """On the way out SIGTERM's old handler is put back first; a SIGTERM right then, whose handler raises (inspectd's
    stop), left SIGINT claimed for the rest of the process: a later Ctrl-C would only kill a child long gone. A
    profile hook places the real SIGTERM right after SIGTERM's handler is put back."""
    from inspectd.tools.children import killed_on_a_stop

    class Stopped(Exception):
        pass

    def old_term(_signum, _frame):
        raise Stopped

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    term_before = signal.signal(signal.SIGTERM, old_term)
    int_before = signal.signal(signal.SIGINT, signal.default_int_handler)

    def between_the_give_backs(_frame, event, _arg):
        if (
            event == "c_return"
            and signal.getsignal(signal.SIGTERM) is old_term
            and signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            sys.setprofile(None)
            signal.raise_signal(signal.SIGTERM)

    try:
        with pytest.raises(Stopped):
            with killed_on_a_stop(child):
                sys.setprofile(between_the_give_backs)
        sys.setprofile(None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is old_term
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGTERM, term_before)
        signal.signal(signal.SIGINT, int_before)
        child.kill()
        child.wait()


def test_a_stop_while_the_pusher_ends_still_stops_the_daemon(scenario):
    """A scenario's clean-up first ends its pusher (up to 2 s), then stops its daemon. A Ctrl-C during the pusher's
    join escaped it, and the daemon was neither told to stop nor waited for. A profile hook sends the real SIGINT as
    the join starts."""
    import threading

    from inspectd.tools.bench.daemon import Pusher

    s = scenario("zmq-raw", saturate=True)
    term_before = signal.getsignal(signal.SIGTERM)
    int_before = signal.signal(signal.SIGINT, signal.default_int_handler)

    def at_the_join(frame, event, _arg):
        if event == "call" and frame.f_code is threading.Thread.join.__code__:
            if isinstance(frame.f_locals.get("self"), Pusher):
                sys.setprofile(None)
                signal.raise_signal(signal.SIGINT)

    try:
        with pytest.raises(KeyboardInterrupt):
            sys.setprofile(at_the_join)
            s.run(0.5)
        sys.setprofile(None)
        assert not daemon_children(os.getpid())
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGTERM, term_before)
        signal.signal(signal.SIGINT, int_before)
        kill_daemons(daemon_children(os.getpid()))


def test_a_bench_killed_outright_does_not_leave_its_daemon_streaming(tiny_bundle, tmp_path, tmp_path_factory):
    """SIGKILL gives the bench no `finally`: its daemon must stop itself once its parent is gone."""
    tmp = tmp_path_factory.mktemp("t")
    args = ["bench", "daemon", "--bundle", str(tiny_bundle), "--source", "zmq-raw", "--cameras", "1", "--load", "sat"]
    args += ["--synthetic", "2", "--duration", "120", "--max-batch", "1"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = cli(args, out, err, env={**os.environ, "TMPDIR": str(tmp)})
    daemons: list[int] = []
    try:
        daemons = wait_for(lambda: daemon_children(proc.pid), 150, "the bench's daemon to start")
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not any(map(is_daemon, daemons)), 30, "the orphaned daemon to stop")
    finally:
        daemons = daemons or daemon_children(proc.pid)
        proc.kill()
        proc.wait()
        kill_daemons(daemons)


def test_a_signal_a_library_turned_into_its_own_error_is_still_the_signal(monkeypatch, capsys):
    """onnxruntime's loader, interrupted by the SIGTERM exception, raises "ImportError: initialization failed" from it:
    a 25-line traceback and exit 1 read as a broken install."""
    import signal

    from inspectd import cli
    from inspectd.clients import ctl

    def run(args):
        try:
            raise cli.Terminated(cli.TERMINATED_EXIT)
        except cli.Terminated as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(ctl, "run", run)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["ctl", "status"]) == cli.TERMINATED_EXIT
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() installed its own for ctl
    # What the clean-up after the signal raised is said too: it may have left something undone.
    assert capsys.readouterr().err == "inspectd ctl: stopped by SIGTERM (ImportError: initialization failed)\n"


def test_a_folder_run_whose_backlog_runs_dry_in_the_window_fails_and_says_so(scenario, monkeypatch):
    """The folder backlog held 300 frames/s of the run: a daemon faster than that idled through the rest of the window
    and its row divided the window's CPU by frames that never came. Here the backlog is made small on purpose."""
    from inspectd.tools.bench import daemon

    monkeypatch.setattr(daemon, "FOLDER_FPS_CEILING", 50)  # 460 files: gone in the first part of a 4 s window
    row = scenario("folder", saturate=True, duration_s=4.0).run(4.0)
    why = daemon.row_failure(row)
    # A daemon faster still (a quiet machine) takes them all in the warm-up: said as the backlog, not "no result".
    ran_out = "the folder backlog ran out: no result in the last " if row["judged"] else "the folder backlog ran out "
    assert why is not None and why.startswith(ran_out), row


def test_a_folder_backlog_gone_before_the_window_is_said_as_such():
    """A daemon faster than its backlog was sized for took every file in the warm-up: the row said "no result at
    all", which reads as a daemon that stopped judging."""
    from inspectd.tools.bench import daemon

    row = {"source": "folder", "judged": 0, "delivered": 0, "errors": 0, "seconds": 4.0, "quiet_end_s": None}
    assert daemon.row_failure({**row, "backlog_left": 0}) == (
        "the folder backlog ran out before the 4.0s window: no file was left to judge, so the run measured nothing"
    )
    assert daemon.row_failure({**row, "backlog_left": 12}).startswith("no frame judged in the 4.0s window")


def test_a_folder_run_that_ends_between_two_long_batches_with_files_left_is_no_failure():
    """Results come in bursts, one per batch: a window that ends in a long batch's gap was failed as a backlog run
    dry (2 of 3 runs at batch 32 on one thread), with 2550 files still waiting."""
    from inspectd.tools.bench import daemon

    row = {"source": "folder", "judged": 80, "delivered": 80, "errors": 0, "seconds": 2.0, "quiet_end_s": 0.6}
    assert daemon.row_failure({**row, "backlog_left": 2550}) is None
    assert daemon.row_failure({**row, "backlog_left": 0}).startswith("the folder backlog ran out: ")
    assert daemon.row_failure({**row, "backlog_left": None}) is not None, "not known (no status): the quiet end alone"


def test_the_folder_backlog_is_sized_from_the_engines_best_rate(tiny_bundle, tmp_path):
    """A backlog of 300 frames/s ran dry above about 460 frames/s (a GPU station does 1357): sized from the engine's
    best frames/s measured in the same run where that is more. Only the config is written here (nothing started)."""
    from inspectd.tools.bench import daemon

    frames_dir = tmp_path / "frames"
    from engines.data.synthline import SyntheticLine

    SyntheticLine(64, 64, seed=1).write_folder(frames_dir, 2)
    frames = daemon.FrameSet(sorted(frames_dir.glob("*")), 1)
    (tmp_path / "w").mkdir()
    daemon.Scenario(tiny_bundle, "folder", 1, frames, tmp_path / "w", saturate=True, duration_s=1.0, folder_fps=2000.0)
    assert len(list((tmp_path / "w" / "cam0").glob("*.jpg"))) == int(2000 * (daemon.WARMUP_S + 1.0 + 5))


def test_a_train_data_that_is_not_here_is_named_as_the_path_and_the_flag_given(tiny_bundle, tmp_path):
    """`--train-data /nonexistent` was named as "the bundle's training data PosixPath('/nonexistent')"."""
    from engines.bundle.store import load_bundle
    from inspectd.tools.bench.engine import bundle_at_size

    bundle = load_bundle(tiny_bundle)
    with pytest.raises(ValueError) as given:
        bundle_at_size(bundle, (64, 64), tmp_path / "w", Path("/nonexistent"))
    assert str(given.value) == (
        "--size 64x64: --train-data /nonexistent: not here, expected a folder of defect-free images"
    )
    bundle.manifest.setdefault("training", {})["data"] = str(tmp_path / "pruned")
    with pytest.raises(ValueError) as recorded:
        bundle_at_size(bundle, (64, 64), tmp_path / "w", None)
    assert str(recorded.value) == (
        f"--size 64x64: the bundle's training data {tmp_path / 'pruned'} is not here; give --train-data DIR (a "
        "folder of defect-free images)"
    )
