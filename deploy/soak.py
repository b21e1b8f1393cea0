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
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()  # the daemon resolves relative config paths against the config's folder
    return args


class Daemon:
    def __init__(self, args: argparse.Namespace, workdir: Path, rate: float, tag: str) -> None:
        shutil.rmtree(workdir / "state", ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        self.publish = f"ipc://{workdir}/pub.sock"
        self.control_endpoint = f"ipc://{workdir}/control.sock"
        self.journal = workdir / "state" / "journal"
        config = {
            "station": "soak",
            "model": {"bundle": str(args.bundle.resolve())},
            "engine": {"backend": args.backend},
            "batching": {"max_batch": args.max_batch, "max_wait_ms": 10},
            "cameras": [
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
                "status_interval_s": 1.0,
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
        "frames_lost": not_journalled + dropped,
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


def main(argv=None) -> int:
    args = parse_args(argv)
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
