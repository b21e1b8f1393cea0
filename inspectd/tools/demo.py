"""`inspectd demo` (`make demo`): a whole station on one machine, no camera or dataset needed.

1. Trains a small frozen-backbone model on defect-free frames of the synthetic line, unless the workdir has one.
2. Writes a daemon config whose cameras stream the synthetic line (with planted defects) and starts `inspectd run`
   as a child process, exactly as systemd would.
3. Subscribes to its results, prints a line per verdict as it arrives, stops the daemon with SIGTERM (which drains)
   and ends with a summary: frames, defects planted vs caught, false alarms, latency p50/p99.

Ground truth travels in each result header's optional `truth` field, which the synthetic camera fills in.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from inspectd.clients.subscribe import GapTracker, Subscriber, format_result
from inspectd.daemon.notify import PARENT_PID_ENV
from inspectd.daemon.security import ALLOW_ROOT_ENV
from inspectd.durable import LockHeld, hold_pid_lock
from inspectd.errors import Terminated
from inspectd.protocol.messages import Result
from inspectd.tools.bench.measure import latency_ms, p99_text
from inspectd.tools.children import killed_on_a_stop

MODEL_SIZE = (128, 128)
TRAIN_FRAMES = 400
# A quarter held out sets the first threshold: 16 frames (10 % of 160) let about 4 % of good frames through as
# false alarms; 100 frames bring that under 1 % at a few seconds more training.
HOLDOUT = 0.25
FRAME_SIZE = (256, 256)  # frames are larger than the model input, as on a real line
DEFECT_RATE = 0.25
MAX_CAMERAS = 4  # camera i shows the surface of synthetic-line seed FIRST_SEED + i; training sees them all
FIRST_SEED = 1000
START_TIMEOUT_S = 120.0  # first result after start: engine load and warm-up, with room for a small, loaded machine
STOP_WAIT_S = 30  # the daemon's drain after SIGTERM: its own bound (shutdown_timeout_s) and room to close
LOCK_NAME = "demo.lock"
# ZeroMQ binds an ipc:// endpoint to a Unix socket, whose path (sun_path) holds at most 107 bytes and a NUL.
IPC_PATH_MAX = 107


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds of streaming [20]")
    parser.add_argument("--rate", type=float, default=5.0, metavar="HZ", help="frames per second per camera [5]")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="model, config, logs [runs/demo]")
    parser.add_argument("--cameras", type=int, default=2, metavar="N", help=f"synthetic cameras, 1..{MAX_CAMERAS} [2]")
    parser.add_argument(
        "--size",
        type=int,
        default=MODEL_SIZE[0],
        metavar="N",
        help=f"model input N x N when a model is trained [{MODEL_SIZE[0]}]",
    )
    parser.add_argument(
        "--train-frames",
        type=int,
        default=TRAIN_FRAMES,
        metavar="N",
        help=f"defect-free frames to train on when a model is trained [{TRAIN_FRAMES}]",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not a line per verdict")


class MissingTrainExtra(Exception):
    """The demo has no model and this installation cannot train one."""


def build_model(workdir: Path, size: int = MODEL_SIZE[0], frames: int = TRAIN_FRAMES) -> Path:
    """The demo bundle: reused when present, else trained on the synthetic line's defect-free frames. ValueError
    naming --workdir where WORKDIR/bundle holds what training must not replace (train's own refusal would name an
    --out the demo's user never gave), before any frame is written."""
    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():
        print(f"demo: using the model in {bundle} (delete that folder to retrain)", flush=True)
        return bundle
    from engines.bundle.store import not_replaceable

    if why := not_replaceable(bundle):
        raise ValueError(
            f"--workdir {workdir}: {bundle}: {why} (the demo trains its model there): move it away or give another "
            "--workdir"
        )
    from engines.data.synthline import SyntheticLine
    from engines.progress import Progress

    try:
        from engines.training.train import train_bundle
    except ImportError as exc:  # a runtime-only install: said before any frame is written
        raise MissingTrainExtra(
            f"training the demo model needs the Python package {exc.name!r}, which is not installed (pip install "
            f"'inspectd[train]'), or put a bundle in {bundle}"
        ) from None

    good = workdir / "train_good"
    _clear_training_frames(workdir, good)
    print(f"demo: writing {frames} defect-free synthetic frames to {good}", flush=True)
    for i in range(MAX_CAMERAS):
        # The seed fixes a camera's surface texture and grain bank; the crops and lighting the model trains on come
        # from another stream, so the camera never replays a training frame.
        line = SyntheticLine(width=FRAME_SIZE[1], height=FRAME_SIZE[0], seed=FIRST_SEED + i)
        line.rng = np.random.default_rng(FIRST_SEED + 100 + i)
        # The first cameras take the remainder: exactly the frames said, and each camera's frames the same as before.
        for path in line.write_folder(good / f"cam{i}", frames // MAX_CAMERAS + (i < frames % MAX_CAMERAS)):
            path.replace(good / f"cam{i}_{path.name}")
        (good / f"cam{i}").rmdir()
    print(f"demo: training a frozen EfficientNet-Lite0 model at {size}x{size}", flush=True)
    try:
        result = train_bundle(
            good, bundle, method="frozen", size=(size, size), holdout=HOLDOUT, progress=Progress(stream=sys.stdout)
        )
        if result.interrupted:  # training stops early on Ctrl-C and writes what it has; the demo stops there too
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        # A model fitted on part of the frames would be taken for a whole one by the next demo: that one trains again.
        shutil.rmtree(bundle, ignore_errors=True)
        raise
    print(
        f"demo: model {result.model_id} written to {bundle} in {result.seconds:.0f} s "
        f"(image threshold {result.image_threshold:.4f})",
        flush=True,
    )
    return bundle


def _clear_training_frames(workdir: Path, good: Path) -> None:
    """Remove the frames an earlier demo wrote to `good` (and a camera folder a killed one left), so that the model is
    trained on this run's frames alone. ValueError naming --workdir where `good` holds anything the demo did not
    write: training would take it in, and it is not the demo's to delete."""
    if not good.is_dir():
        return
    cams = f"cam[0-{MAX_CAMERAS - 1}]"
    others = []
    for entry in good.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            if entry.is_symlink() or not re.fullmatch(rf"{cams}_\d+\.png", entry.name):
                others.append(entry.name)
        elif re.fullmatch(cams, entry.name):  # a killed run's camera folder: its frames alone
            for inner in entry.iterdir():
                if inner.is_symlink() or not inner.is_file() or not re.fullmatch(r"\d+\.png", inner.name):
                    others.append(f"{entry.name}/{inner.name}")
        else:
            others.append(entry.name)
    others.sort()
    if others:
        raise ValueError(
            f"--workdir {workdir}: {good} holds {len(others)} entr{'y' if len(others) == 1 else 'ies'} the demo did "
            f"not write ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) and trains on every frame there: "
            "move them away or give another --workdir"
        )
    shutil.rmtree(good)


def write_config(workdir: Path, bundle: Path, cameras: int, rate: float) -> tuple[Path, str]:
    # ipc endpoints in the workdir: no port to collide with anything else on the machine.
    endpoint = f"ipc://{workdir.resolve()}/results.sock"
    config = {
        "station": "demo",
        "model": {"bundle": str(bundle.resolve())},
        "engine": {"backend": "onnxruntime"},
        "batching": {"max_batch": 8, "max_wait_ms": 20},
        "cameras": [
            {
                "id": f"cam{i}",
                "source": {
                    "kind": "synthetic",
                    "rate_hz": rate,
                    "width": FRAME_SIZE[1],
                    "height": FRAME_SIZE[0],
                    "defect_rate": DEFECT_RATE,
                    "seed": FIRST_SEED + i,
                },
            }
            for i in range(cameras)
        ],
        "publish": {"endpoint": endpoint, "masks": "defects", "status_interval_s": 1.0},
        "control": {"endpoint": f"ipc://{workdir.resolve()}/control.sock"},
        "metrics": {"listen": None},
        "state_dir": str(workdir.resolve() / "state"),
        "shutdown_timeout_s": 10.0,
    }
    path = workdir / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, endpoint


# A batch's verdicts are published together, microseconds apart, or a few milliseconds where the demo is
# descheduled between them; the line's frames reach the daemon at --rate, tens of milliseconds apart at most rates.
BATCH_GAP_S = 0.02


def verdict_rate(arrivals: list[float], stopped_at: float | None) -> tuple[float, float | None]:
    """(seconds, frames/s) of the verdicts' own window: from the first result to the demo's stop, counting the
    results that arrived after the first and before the stop (the first opens the window: counted too, a short run
    read 10.8 for 10 offered). Without a stop (ended early, interrupted), from the first batch of verdicts to the
    start of the last, counting the frames before the last batch: the last batch's frames belong to the interval
    after it, and two cameras' first verdicts, a batch microseconds apart, read thousands of frames/s. None for the
    rate where fewer than two batches arrived: no interval to take it over. The drain after the stop and the quiet
    wait that ends the demo are no part of the line's rate."""
    if not arrivals:
        return 0.0, None
    if stopped_at is not None and stopped_at > arrivals[0]:
        seconds = stopped_at - arrivals[0]
        return seconds, (sum(1 for t in arrivals if t <= stopped_at) - 1) / seconds
    last_batch = next((k for k in range(len(arrivals) - 1, 0, -1) if arrivals[k] - arrivals[k - 1] > BATCH_GAP_S), None)
    if last_batch is None:
        return arrivals[-1] - arrivals[0], None
    seconds = arrivals[last_batch] - arrivals[0]
    return seconds, last_batch / seconds


def summarise(results: list[Result], gaps: GapTracker, fps: float | None) -> dict:
    judged = [r for r in results if r.verdict != "error"]
    planted = [r for r in judged if r.truth]
    caught = [r for r in planted if r.verdict == "defect"]
    false_alarms = [r for r in judged if r.truth is False and r.verdict == "defect"]
    return {
        "frames": len(results),
        "errors": len(results) - len(judged),
        "planted": len(planted),
        "caught": len(caught),
        "false_alarms": len(false_alarms),
        "good": sum(1 for r in judged if r.truth is False),
        "catch_rate": len(caught) / len(planted) if planted else None,
        # Milliseconds already: latency_ms takes seconds.
        "latency_ms": latency_ms(r.latency_ms / 1000.0 for r in results),
        "fps": fps,
        "missed_seq": sum(gaps.missed.values()),
    }


def errors_line(results: list[Result]) -> str | None:
    """The demo's one-line failure when any verdict was an error, naming how many and the first one's reason."""
    errors = [r for r in results if r.verdict == "error"]
    if not errors:
        return None
    return (
        f"inspectd demo: {len(errors)} of {len(results)} verdicts were errors, not judged "
        f"(the first, {errors[0].camera} seq {errors[0].seq}: {errors[0].error or 'no reason given'})"
    )


def summary_lines(s: dict, cameras: int, wall: float, until: str = "the stop") -> list[str]:
    """The summary's figures; where there is nothing to take one from (no result, no planted defect), it says so."""
    lat = s["latency_ms"]
    rate = "-" if s["catch_rate"] is None else f"{s['catch_rate']:.0%}"
    if lat["n"]:
        latency = f"latency p50 {lat['p50']:.1f} ms, {p99_text(lat)} (ingest to publish)"
    else:
        latency = "latency: no result received"
    if s["fps"] is None:
        fps = "frames/s - (one batch of verdicts: no interval to take a rate over)"
    else:
        fps = f"{s['fps']:.1f} frames/s over the {wall:.1f} s from the first verdict to {until}"
    return [
        f"summary: {s['frames']} frames from {cameras} camera(s), {fps}, {s['errors']} errors, {s['missed_seq']} lost",
        f"summary: defects planted {s['planted']}, caught {s['caught']} "
        f"(catch rate {rate}), false alarms {s['false_alarms']} of {s['good']} good frames",
        f"summary: {latency}",
    ]


def bad_option(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line naming the option, or None."""
    if not 1 <= args.cameras <= MAX_CAMERAS:
        return f"--cameras {args.cameras}: expected 1..{MAX_CAMERAS}"
    for name, value, unit in (("--duration", args.duration, "seconds"), ("--rate", args.rate, "frames per second")):
        # NaN passes `<= 0`, and a NaN or infinite duration never ends.
        if not math.isfinite(value) or value <= 0:
            return f"{name} {value:g}: expected a finite number of {unit} > 0"
    # The frozen recipe's taps reach stride 32, so train refuses other sizes: said here, before the frames are drawn.
    if args.size < 32 or args.size % 32:
        return f"--size {args.size}: expected a multiple of 32, at least 32"
    if args.train_frames < MAX_CAMERAS:
        return f"--train-frames {args.train_frames}: expected at least {MAX_CAMERAS}"
    # The daemon's endpoints are sockets in the workdir: a longer path ended in ZeroMQ's traceback at the subscribe.
    longest = len(os.fsencode(args.workdir.resolve() / "control.sock"))
    if longest > IPC_PATH_MAX:
        return (
            f"--workdir {args.workdir}: path too long for the demo's ZeroMQ ipc sockets in it ({longest} bytes with "
            f"control.sock, at most {IPC_PATH_MAX}); give a shorter --workdir"
        )
    return None


def take_workdir(workdir: Path) -> str | None:
    """Hold the workdir for this demo until it exits, or say why not. A second demo in it would rewrite the first
    one's config, truncate the log its daemon writes, race its training and read its results as its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir / LOCK_NAME
    try:
        hold_pid_lock(lock)
    except LockHeld as held:
        return f"--workdir {workdir} is in use by another demo (pid {held.holder or '?'}); give another --workdir"
    return None


def inspectd_command() -> str:
    """`inspectd` as the user can type it in another shell: `make demo` runs .venv/bin/inspectd without activating the
    venv, so a bare `inspectd` is found only where PATH leads to this environment's own script. Otherwise its path,
    relative where it lies under the current directory; `python -m inspectd` where this environment has no script
    (the package run from a source tree)."""
    script = Path(sysconfig.get_path("scripts")) / "inspectd"
    if not script.is_file():
        return f"{_shown(Path(sys.executable))} -m inspectd"
    on_path = shutil.which("inspectd")
    if on_path is not None and Path(on_path).resolve() == script.resolve():
        return "inspectd"
    return _shown(script)


def _shown(path: Path) -> str:
    """`path` for a shell in the current directory: relative below it (with ./ where a bare name would be looked up
    on PATH), else absolute; quoted where it needs to be."""
    path = Path(os.path.abspath(path))  # not resolved: a venv's python is a link whose target is no venv
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    if os.sep not in shown:
        shown = f".{os.sep}{shown}"
    return shlex.quote(shown)


def run(args: argparse.Namespace) -> int:
    bad = bad_option(args)
    if bad is not None:
        print(f"inspectd demo: {bad}", file=sys.stderr)
        return 2
    workdir: Path = args.workdir
    log_path = workdir / "daemon.log"
    try:
        busy = take_workdir(workdir)
        if busy is not None:
            print(f"inspectd demo: {busy}", file=sys.stderr)
            return 2
        bundle = build_model(workdir, args.size, args.train_frames)
        config_path, endpoint = write_config(workdir, bundle, args.cameras, args.rate)
        log = open(log_path, "wb")
    except ValueError as exc:
        print(f"inspectd demo: {exc}", file=sys.stderr)
        return 2
    except MissingTrainExtra as exc:
        print(f"inspectd demo: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and str(exc.filename) != str(workdir) else ""
        print(f"inspectd demo: --workdir {workdir}: cannot write ({exc.strerror or exc}{where})", file=sys.stderr)
        return 1
    print(f"demo: starting the daemon (config {config_path}, log {log_path}); results on {endpoint}", flush=True)
    command = inspectd_command()
    print(f"demo: in another shell: {command} subscribe --endpoint {endpoint}", flush=True)
    archive = workdir.resolve() / "state" / "archive"
    print(
        f"demo: watch it in a browser: {command} web --endpoint {endpoint} --archive {archive}, "
        f"then open http://127.0.0.1:8088/",
        flush=True,
    )
    print(f"demo: steer it: {command} ctl --endpoint ipc://{workdir.resolve()}/control.sock pause cam0", flush=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if os.geteuid() == 0 and env.get(ALLOW_ROOT_ENV) != "1":
        # A fresh development container is often root; the demo's daemon lives in a throwaway workdir, so it may.
        # A station's daemon still refuses root (inspectd run).
        print(
            "demo: running as root, so the demo's own daemon is allowed to; a station's daemon refuses root", flush=True
        )
        env[ALLOW_ROOT_ENV] = "1"

    env[PARENT_PID_ENV] = str(os.getpid())  # the daemon stops when the demo dies, even of SIGKILL
    results: list[Result] = []
    gaps = GapTracker()
    interrupted: KeyboardInterrupt | Terminated | None = None
    daemon: subprocess.Popen | None = None
    started: float | None = None  # the first result's arrival
    ended_early: float | None = None  # when the daemon was seen gone before the demo stopped it
    arrivals: list[float] = []
    stopped_at: float | None = None  # the demo's SIGTERM to its daemon at the end of --duration
    cut_drain: KeyboardInterrupt | Terminated | None = None  # a stop during that drain: the run itself was whole

    def show(message: Result) -> float:
        arrived = time.monotonic()
        results.append(message)
        arrivals.append(arrived)
        missed = gaps.see(message.camera, message.seq)
        if missed:
            print(f"gap: {message.camera} missed seq {missed[0]}..{missed[1]}", flush=True)
        if not args.quiet:
            print(format_result(message) + ("  [planted]" if message.truth else ""), flush=True)
        return arrived

    with log, Subscriber(endpoint, topic="inspect.demo.") as subscriber:
        try:
            # Inside the try: a Ctrl-C while it starts (its child forked, Popen not yet returned) still ends in the
            # summary; a daemon whose Popen it cut short stops with the demo (PARENT_PID_ENV).
            daemon = subprocess.Popen(
                [sys.executable, "-m", "inspectd", "run", "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            first_deadline = time.monotonic() + START_TIMEOUT_S
            stop_at = None
            while True:
                now = time.monotonic()
                if started is None and (now > first_deadline or daemon.poll() is not None):
                    reason = (
                        f"daemon exited with status {daemon.returncode}"
                        if daemon.poll() is not None
                        else f"no result within {START_TIMEOUT_S:.0f} s"
                    )
                    log.flush()
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                    print(f"inspectd demo: {reason}; last lines of {log_path}:", *tail, sep="\n", file=sys.stderr)
                    return 1
                if daemon.poll() is not None:
                    # It ended before it was told to: what still arrives on the endpoint is not its to show.
                    ended_early = now
                    log.flush()
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                    print(
                        f"inspectd demo: daemon exited with status {daemon.returncode} before its stop; "
                        f"last lines of {log_path}:",
                        *tail,
                        sep="\n",
                        file=sys.stderr,
                    )
                    break
                if stop_at is not None and now >= stop_at:
                    break
                message = subscriber.recv(0.2)
                if not isinstance(message, Result):
                    continue
                arrived = show(message)
                if started is None:
                    started = arrived
                    stop_at = started + args.duration
            if ended_early is None:
                stopped_at = time.monotonic()  # taken out here: a stop during the drain ends _drain in its exception
                try:
                    _drain(daemon, subscriber, show, stopped_at + STOP_WAIT_S)
                except (KeyboardInterrupt, Terminated) as stop:
                    # Taken once the daemon it killed is reaped: the demo ends as the stop says, its run summarised
                    # as whole, since it had reached its --duration.
                    cut_drain = stop
        except (KeyboardInterrupt, Terminated) as stop:
            # Ctrl-C or `kill PID` (a job's timeout) ends the demo early: the summary of what was shown still follows.
            interrupted = stop
        finally:
            try:
                if daemon is not None:
                    _stop(daemon)
            except KeyboardInterrupt as stop:
                # A second stop cuts the drain short; the summary still follows, and the demo ends as the first says.
                interrupted = interrupted or stop
                if daemon is not None and daemon.returncode is None:
                    # One that came before the claim took SIGINT killed nothing, or killed the daemon unwaited.
                    daemon.kill()
                    daemon.wait()
            except SystemExit:
                # A SIGTERM that cut short the drain of a demo stopped already: it ends as the first stop says.
                if interrupted is None:
                    raise
    wall, fps = verdict_rate(arrivals, stopped_at)
    s = summarise(results, gaps, fps)
    print()
    if interrupted is not None:
        print("summary: interrupted; what follows covers the results shown until then")
    elif ended_early is not None:
        print("summary: ended early: the daemon stopped on its own; what follows covers the results shown until then")
    if results:
        until = "the stop" if arrivals and stopped_at is not None and stopped_at > arrivals[0] else "the last batch"
        print(*summary_lines(s, args.cameras, wall, until), sep="\n")
    else:
        print("summary: no result received before the stop, so no figures")
    status = "- (not started)" if daemon is None else daemon.returncode
    print(f"summary: daemon exit status {status}; log {log_path}", flush=True)
    if interrupted is not None:
        raise interrupted
    if cut_drain is not None:
        # Said, so that the daemon's exit status -9 is not read as its crash; the exit status is the stop's.
        print(
            f"inspectd demo: stopped during its daemon's drain after the {args.duration:g} s asked: daemon killed",
            file=sys.stderr,
            flush=True,
        )
        raise cut_drain
    if ended_early is not None and started is not None:
        # Whatever its exit status: a script must not take a demo that ran part of its time for a passed one.
        print(
            f"inspectd demo: ended early: the daemon stopped on its own (exit status {status}) "
            f"{ended_early - started:.1f} s into the {args.duration:g} s asked",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if (line := errors_line(results)) is not None:
        # An error verdict is a frame the station failed to judge: a demo that shows them has not passed.
        print(line, file=sys.stderr, flush=True)
        return 1
    return 0 if daemon is not None and daemon.returncode == 0 and s["frames"] > 0 else 1


def _drain(daemon: subprocess.Popen, subscriber: Subscriber, show: Callable[[Result], float], deadline: float) -> None:
    """The end of --duration: SIGTERM to the daemon, then its drain's results shown until it exits, or until
    `deadline` (then killed, and said). Claimed before the daemon is told, so that a stop during the drain kills it at
    once; that stop is raised once it is reaped."""
    with killed_on_a_stop(daemon) as caught:
        daemon.send_signal(signal.SIGTERM)  # drains: every accepted frame still gets its result
        while not caught:
            exited = daemon.poll() is not None
            if not exited and time.monotonic() >= deadline:
                _killed_after_wait(daemon)
                break
            message = subscriber.recv(0.5 if exited else 0.2)
            if message is None:
                if exited:
                    break
                continue
            if isinstance(message, Result):
                show(message)
        daemon.wait()


def _killed_after_wait(daemon: subprocess.Popen) -> None:
    # Said, so that exit status -9 in the summary is not read as the demo's own crash or a second stop.
    print(
        f"inspectd demo: the daemon did not stop within {STOP_WAIT_S} s of its SIGTERM: killed "
        "(its daemon.log says how far its drain got)",
        file=sys.stderr,
        flush=True,
    )
    daemon.kill()
    daemon.wait()


def _stop(daemon: subprocess.Popen) -> None:
    """SIGTERM to the daemon and wait for its drain; claimed before the daemon is told, so that a second stop during
    its drain kills it at once."""
    with killed_on_a_stop(daemon):
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                # Its drain's own bound (shutdown_timeout_s, 10 s) and room to close on a busy machine: killed
                # sooner, it leaves its journal unclean for the next demo.
                daemon.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                _killed_after_wait(daemon)
