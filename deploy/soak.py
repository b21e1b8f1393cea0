#!/usr/bin/env python3
"""Soak run: a real daemon on the synthetic line at a fixed fraction of its saturation, reloaded periodically, for a
long time; reports the daemon's memory trend (RSS slope) and whether any frame was lost.

    python deploy/soak.py --bundle BUNDLE --duration 3600 --load 0.8 --reload-every 60
    python deploy/soak.py --bundle BUNDLE --duration 150 --rate 80 --cameras 2 --json

Without --rate it first measures saturation (cameras flat out for --saturation-s seconds, frames dropped freely) and
then runs each camera at load * saturation / cameras frames per second.

Nothing lost means: every frame the daemon accepted (gave a seq) has a journalled result, the subscriber saw no seq
gap from its first result on, and no queue dropped a frame (queues are drop_oldest, so falling behind shows as drops).
The RSS slope is a least-squares fit of the daemon's VmRSS over time after a warm-up (the first 20% of the run). Each
second's sample also records the machine's CPU steal (the hypervisor running someone else on our cores, from
/proc/stat) and the daemon's cumulative queue drops, so a drop can be put beside what the machine was doing; the
samples are written to <workdir>/run/rss.csv. The workdir's previous state (journal) is removed first: seqs start at 0.

Score drift: the status messages' cameras.<id>.drift give, per camera, whether the monitor was active and how many
status seconds the drift alarm was up (an unchanged line should show 0). It counts as a failure only with
--fail-on-drift: whether the soak's cameras (synthetic line seeds 0, 1, ...) look like the bundle's reference depends
on the frames the bundle was calibrated on.

Drift mode (--drift): does the drift alarm stay quiet over an hour of an unchanged line?

    python deploy/soak.py --drift --bundle BUNDLE --frames 36000 --size 96 --lighting-jitter 0.02

The bundle is copied into the workdir and taught (`inspectd teach`, the real command) on --teach-frames frames of the
very line the daemon then runs (one synthetic camera, seed --seed, --lighting-jitter, --defect-rate), taken from past
the frames the run streams so none is both reference and window; then one daemon streams --frames frames of that line
(an hour at --line-rate frames/s) as fast as it takes them (queue policy block), without reloads (a reload starts the
monitor afresh). It fails on any drift_raised or false_reject_warning_raised in the daemon's log, an alarm or warning
in a status message, or a frame not published; the report gives the frames, the seconds, the frames/s, the load
average before and after, and the largest D / critical value each test reached.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inspectd.clients.subscribe import GapTracker, Subscriber  # noqa: E402
from inspectd.protocol.control import ControlClient  # noqa: E402
from inspectd.protocol.journal import read_since  # noqa: E402
from inspectd.protocol.messages import Result  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path, help="model bundle the daemon runs")
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of soak after start-up [3600]")
    p.add_argument("--cameras", type=int, default=2, help="synthetic cameras [2]")
    p.add_argument("--size", type=int, default=128, help="frame width and height [128]")
    p.add_argument("--rate", type=float, default=None, help="frames/s per camera; default: load x measured saturation")
    p.add_argument("--load", type=float, default=0.8, help="fraction of saturation when --rate is not given [0.8]")
    p.add_argument("--saturation-s", type=float, default=15.0, help="seconds to measure saturation [15]")
    p.add_argument("--reload-every", type=float, default=60.0, help="seconds between control reloads [60]")
    p.add_argument("--fail-on-drift", action="store_true", help="a drift alarm during the run fails it")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--workdir", type=Path, default=Path("runs/soak"))
    p.add_argument(
        "--journal-mb",
        type=float,
        default=1024.0,
        help="journal cap; it must hold every result of the run for the no-loss check [1024]",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON line at the end")
    drift = p.add_argument_group("drift mode")
    drift.add_argument("--drift", action="store_true", help="the drift soak: an hour of an unchanged line, no alarm")
    drift.add_argument("--frames", type=int, default=36000, help="frames to stream [36000: an hour at 10/s]")
    drift.add_argument("--line-rate", type=float, default=10.0, help="frames/s of the line the hour is counted at [10]")
    drift.add_argument("--teach-frames", type=int, default=120, help="frames to teach on, half held out [120]")
    drift.add_argument("--lighting-jitter", type=float, default=0.02, help="the line's own lighting variation [0.02]")
    drift.add_argument("--defect-rate", type=float, default=0.0, help="share of frames with a planted defect [0]")
    drift.add_argument("--seed", type=int, default=2, help="the synthetic line's seed [2]")
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()  # the daemon resolves relative config paths against the config's folder
    return args


class Daemon:
    def __init__(
        self,
        args: argparse.Namespace,
        workdir: Path,
        rate: float,
        tag: str,
        bundle: Path | None = None,
        cameras: list[dict] | None = None,
        status_interval_s: float = 1.0,
    ) -> None:
        shutil.rmtree(workdir / "state", ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        self.publish = f"ipc://{workdir}/pub.sock"
        self.control_endpoint = f"ipc://{workdir}/control.sock"
        self.journal = workdir / "state" / "journal"
        config = {
            "station": "soak",
            "model": {"bundle": str((bundle or args.bundle).resolve())},
            "engine": {"backend": args.backend},
            "batching": {"max_batch": args.max_batch, "max_wait_ms": 10},
            "cameras": cameras
            or [
                {
                    "id": f"cam{i}",
                    "source": {
                        "kind": "synthetic",
                        "rate_hz": rate,
                        "width": args.size,
                        "height": args.size,
                        "defect_rate": 0.2,
                        "seed": i,
                    },
                    "queue": {"size": 64, "policy": "drop_oldest"},
                }
                for i in range(args.cameras)
            ],
            "publish": {
                "endpoint": self.publish,
                "status_interval_s": status_interval_s,
                "sndhwm": 100000,
                "journal": {"path": str(self.journal), "max_mb": args.journal_mb},
            },
            "control": {"endpoint": self.control_endpoint},
            "metrics": {"listen": None},
            "state_dir": str(workdir / "state"),
            "shutdown_timeout_s": 30,
        }
        config_path = workdir / f"{tag}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{tag}.log"
        self._log = open(self.log_path, "wb")
        # Subscribed before the daemon binds, so the subscription is live from (nearly) its first result.
        self.sub = Subscriber(self.publish, topic="inspect.soak.", rcvhwm=1_000_000)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "run", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        # A soak that ends on an exception (a timeout, Ctrl-C, SIGTERM) must not leave its daemon streaming at full
        # load.
        atexit.register(self.kill)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def control(self, request: dict) -> dict:
        with ControlClient(self.control_endpoint, timeout_s=30) as client:
            return client.request(request)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"soak: daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.control({"cmd": "status"})
                return
            except Exception:
                time.sleep(0.2)
        raise SystemExit(f"soak: daemon not answering after {timeout:g} s:\n{self.log_tail()}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self._log.close()
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "stopped":
                return event
        raise SystemExit(f"soak: no 'stopped' event (exit {self.proc.returncode}):\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def cpu_steal_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def measure_saturation(args: argparse.Namespace) -> float:
    d = Daemon(args, args.workdir / "saturation", rate=5000.0, tag="saturation")
    d.wait_ready()
    time.sleep(3.0)  # warm-up
    t0, n0 = time.monotonic(), d.control({"cmd": "status"})["published"]
    time.sleep(args.saturation_s)
    fps = (d.control({"cmd": "status"})["published"] - n0) / (time.monotonic() - t0)
    d.stop()
    d.sub.close()
    return fps


def soak(args: argparse.Namespace) -> dict:
    saturation = None
    rate = args.rate
    if rate is None:
        saturation = measure_saturation(args)
        rate = args.load * saturation / args.cameras
        print(f"saturation {saturation:.1f} frames/s -> {rate:.1f} frames/s per camera", file=sys.stderr)
    workdir = args.workdir / "run"
    d = Daemon(args, workdir, rate=rate, tag="soak")
    gaps = GapTracker()
    first: dict[str, int] = {}
    received = 0
    drift_active: dict[str, bool] = {}
    drift_alarm_s: dict[str, int] = {}  # status messages (one a second) with the camera's drift alarm up
    samples: list[tuple[float, float, float, int]] = []  # t, RSS MB, CPU steal % over the last second, drops
    last_steal = cpu_steal_jiffies()
    reloads = 0
    reload_failures = 0
    dropped = 0
    d.wait_ready()
    t_start = time.monotonic()
    next_sample = next_reload = t_start
    next_reload += args.reload_every

    def drain(until: float) -> None:
        nonlocal received
        while True:
            left = until - time.monotonic()
            message = d.sub.recv(max(0.0, left))
            if message is None:
                return
            if isinstance(message, Result):
                received += 1
                first.setdefault(message.camera, message.seq)
                gaps.see(message.camera, message.seq)
            else:
                for camera, stats in message["cameras"].items():
                    drift = stats.get("drift") or {}
                    drift_active[camera] = drift_active.get(camera, False) or bool(drift.get("active"))
                    drift_alarm_s[camera] = drift_alarm_s.get(camera, 0) + int(drift.get("alarm") is True)

    while time.monotonic() - t_start < args.duration:
        now = time.monotonic()
        if now >= next_sample:
            dropped = sum(cam["dropped"] for cam in d.control({"cmd": "status"})["cameras"].values())
            steal = cpu_steal_jiffies()
            steal_in_second = 100.0 * (steal[0] - last_steal[0]) / max(1, steal[1] - last_steal[1])
            last_steal = steal
            samples.append((now - t_start, d.rss_mb(), steal_in_second, dropped))
            next_sample += 1.0
        if now >= next_reload:
            reply = d.control({"cmd": "reload"})
            reloads += 1
            reload_failures += 0 if reply.get("ok") else 1
            next_reload += args.reload_every
        drain(min(next_sample, next_reload, t_start + args.duration))
    dropped = sum(cam["dropped"] for cam in d.control({"cmd": "status"})["cameras"].values())
    stopped = d.stop()
    drain(time.monotonic() + 2.0)  # what the shutdown drain published
    d.sub.close()

    frames_in = stopped["frames_in"]
    journalled = {cam: [seq for seq, _ in read_since(d.journal, cam, -1)] for cam in frames_in}
    not_journalled = sum(n - len(set(journalled[cam]) & set(range(n))) for cam, n in frames_in.items())
    (workdir / "rss.csv").write_text(
        "t_s,rss_mb,cpu_steal_pct,dropped\n" + "".join(f"{t:.1f},{m:.1f},{st:.1f},{dr}\n" for t, m, st, dr in samples)
    )
    steal_pct = np.array([s[2] for s in samples])
    drops = np.array([s[3] for s in samples])
    # Seconds in which the drop count rose, with the steal of that second and the one before.
    drop_seconds = [
        {
            "t_s": round(samples[i][0], 1),
            "dropped": int(drops[i] - drops[i - 1]),
            "cpu_steal_pct": round(float(steal_pct[max(0, i - 1) : i + 1].max()), 1),
        }
        for i in range(1, len(samples))
        if drops[i] > drops[i - 1]
    ]
    t = np.array([s[0] for s in samples]) / 3600.0
    rss = np.array([s[1] for s in samples])
    keep = t >= 0.2 * t[-1] if len(t) else t
    slope = float(np.polyfit(t[keep], rss[keep], 1)[0]) if keep.sum() >= 3 else float("nan")
    return {
        "duration_s": round(time.monotonic() - t_start, 1),
        "cameras": args.cameras,
        "rate_per_camera": rate,
        "saturation_fps": saturation,
        "frames_in": sum(frames_in.values()),
        "published": stopped["published"],
        "journalled": sum(len(v) for v in journalled.values()),
        "results_received": received,
        "missed_before_subscription": sum(first.values()),
        "seq_gaps": sum(gaps.missed.values()),
        "dropped": dropped,
        "frames_lost": not_journalled,  # a frame a full queue dropped has its seq and no journal entry: counted once
        "clean_shutdown": bool(stopped.get("clean")),
        "reloads": reloads,
        "reload_failures": reload_failures,
        "rss_start_mb": round(float(rss[keep][0]), 1) if keep.any() else None,
        "rss_end_mb": round(float(rss[-1]), 1) if len(rss) else None,
        "rss_max_mb": round(float(rss.max()), 1) if len(rss) else None,
        "rss_growth_mb": round(float(rss[-1] - rss[keep][0]), 1) if keep.any() else None,
        "rss_slope_mb_per_hour": round(slope, 2),
        "cpu_steal_pct_mean": round(float(steal_pct.mean()), 2) if len(steal_pct) else None,
        "cpu_steal_pct_max_1s": round(float(steal_pct.max()), 1) if len(steal_pct) else None,
        "drop_seconds": drop_seconds,
        "drift_active": drift_active,
        "drift_alarm_s": drift_alarm_s,
    }


def drift_soak(args: argparse.Namespace) -> dict:
    from engines.bundle.store import load_bundle
    from engines.bundle.thresholds import reference_scores
    from engines.data.synthline import SyntheticLine

    workdir = args.workdir / "drift"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    line = SyntheticLine(args.size, args.size, 1, 0.0, args.seed, args.lighting_jitter)
    for _ in range(args.frames):  # the run streams these: the reference comes from past them
        line.next()
    line.write_folder(workdir / "teach", args.teach_frames)
    bundle = workdir / "bundle"
    shutil.copytree(args.bundle, bundle)
    teach = subprocess.run(
        [sys.executable, "-m", "inspectd", "teach", str(bundle), "--good", str(workdir / "teach"), "--holdout", "0.5"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if teach.returncode != 0:
        raise SystemExit(f"soak: inspectd teach failed:\n{teach.stdout}{teach.stderr}")
    source = {
        "kind": "synthetic",
        "rate_hz": 1_000_000.0,  # as fast as the station takes them: the queue blocks the source
        "width": args.size,
        "height": args.size,
        "defect_rate": args.defect_rate,
        "seed": args.seed,
        "lighting_jitter": args.lighting_jitter,
        "count": args.frames,
    }
    camera = {"id": "cam0", "source": source, "queue": {"size": 64, "policy": "block"}}
    load_before = os.getloadavg()
    # Status ten times a second: the drift figures are sampled from it (the log has every alarm change regardless).
    d = Daemon(args, workdir / "run", rate=0.0, tag="drift", bundle=bundle, cameras=[camera], status_interval_s=0.1)
    d.wait_ready()
    t_start = time.monotonic()
    last_seq = -1
    worst = {"statistic": 0.0, "brightness_statistic": 0.0}  # largest D / its critical value, per test
    alarm_s = warning_s = 0  # status messages showing the alarm / the warning
    active = brightness_active = False
    deadline = t_start + max(600.0, args.frames / 20.0)
    while last_seq < args.frames - 1 and time.monotonic() < deadline and d.proc.poll() is None:
        message = d.sub.recv(0.5)
        if isinstance(message, Result):
            last_seq = max(last_seq, message.seq)
        elif isinstance(message, dict):
            drift = message["cameras"].get("cam0", {}).get("drift") or {}
            active = active or bool(drift.get("active"))
            brightness_active = brightness_active or bool(drift.get("brightness_active"))
            alarm_s += int(drift.get("alarm") is True)
            warning_s += int(drift.get("false_reject_warning") is True)
            for key, limit in (("statistic", "raise_at"), ("brightness_statistic", "brightness_raise_at")):
                if drift.get(key) is not None and drift.get(limit):
                    worst[key] = max(worst[key], drift[key] / drift[limit])
    seconds = time.monotonic() - t_start
    reference = reference_scores(load_bundle(bundle).thresholds())
    reference_frames = reference[0] if reference else 0
    final = d.control({"cmd": "status"})["cameras"]["cam0"]
    stopped = d.stop()
    d.sub.close()
    events: dict[str, int] = {}
    for line_text in d.log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line_text).get("event")
        except (json.JSONDecodeError, AttributeError):
            continue
        if event in ("drift_raised", "drift_cleared", "false_reject_warning_raised", "false_reject_warning_cleared"):
            events[event] = events.get(event, 0) + 1
    published = final["published"]
    return {
        "frames": args.frames,
        "published": published,
        "hour_at_line_rate": round(args.frames / args.line_rate / 3600.0, 3),
        "seconds": round(seconds, 1),
        "frames_per_s": round(published / seconds, 1) if seconds > 0 else None,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "lighting_jitter": args.lighting_jitter,
        "defect_rate": args.defect_rate,
        "defects": final["defects"],
        "drift_active": active,
        "brightness_active": brightness_active,
        "reference_frames": reference_frames,
        "drift_events": events,
        "status_messages_with_alarm": alarm_s,
        "status_messages_with_warning": warning_s,
        "worst_score_d_over_raise_at": round(worst["statistic"], 3),
        "worst_brightness_d_over_raise_at": round(worst["brightness_statistic"], 3),
        "final_drift": final["drift"],
        "clean_shutdown": bool(stopped.get("clean")),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (a timeout, a CI job cancelled) ends the soak as Ctrl-C does, through its exit handlers: the daemon too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.drift:
        report = drift_soak(args)
        for key, value in report.items():
            print(f"{key:34s} {value}", file=sys.stderr)
        if args.json:
            print(json.dumps(report))
        alarms = report["status_messages_with_alarm"] + report["status_messages_with_warning"]
        quiet = not report["drift_events"] and not alarms
        whole = report["published"] == args.frames and report["drift_active"] and report["brightness_active"]
        return 0 if quiet and whole else 1
    report = soak(args)
    for key, value in report.items():
        print(f"{key:28s} {value}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    drifted = args.fail_on_drift and any(report["drift_alarm_s"].values())
    clean = report["frames_lost"] == 0 and report["seq_gaps"] == 0 and report["reload_failures"] == 0
    return 0 if clean and not drifted else 1


if __name__ == "__main__":
    sys.exit(main())
