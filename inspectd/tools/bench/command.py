"""`inspectd bench engine|naive|daemon|all`: throughput, latency, CPU and memory of the engine alone, of the loop a user
would write without inspectd, and of the real daemon, side by side (figures in docs/PERFORMANCE.md).

This module owns the command line and the combined report with its goals; the measuring lives in the modules engine,
naive and daemon beside it (and measure, profiling). Every mode prints a Markdown table on stdout; with --json,
stdout is instead its full figures as one JSON document (the table goes to stderr), and --out FILE writes them to a
file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engines.durable import unwritable
from engines.progress import Progress
from inspectd.tools.bench.measure import (
    MB,
    P99_MIN_SAMPLES,
    cpu_model,
    fmt,
    markdown_table,
    p99_or_none,
    peak_rss_bytes,
)

# What the daemon is held to, set for a CPU station with 2 cores: name -> (what, comparison, target).
GOALS = {
    "daemon_vs_engine_raw": ("daemon saturated frames/s (zmq raw) / engine-only best frames/s", ">=", 0.90),
    "daemon_vs_engine_raw_cpu": (
        "the same from CPU time: engine CPU ms/frame (at the daemon's mean batch) / daemon "
        "CPU ms/frame (zmq raw, saturated); the throughput ratio on 2 cores of its own",
        ">=",
        0.90,
    ),
    "daemon_vs_engine_jpeg": ("daemon saturated frames/s (zmq JPEG) / engine-only best frames/s", "info", None),
    "daemon_vs_naive": ("daemon saturated frames/s (zmq JPEG) / naive loop frames/s, same JPEG frames", ">=", 1.5),
    "daemon_vs_naive_cpu": (
        "the same from CPU time: naive CPU ms/frame / daemon CPU ms/frame (zmq JPEG, saturated)",
        "info",
        None,
    ),
    "p99_at_half_load": (
        "p99 latency at 50% of saturation / (2 x (max_wait + one batch's engine time)); not judged when the rate "
        "sent fell short of the rate offered",
        "<=",
        1.0,
    ),
    "outside_engine_cpu": ("daemon CPU per frame outside the engine / engine CPU per frame", "<", 0.10),
}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,4,8") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def _sources(text: str) -> list[str]:
    from inspectd.tools.bench.daemon import SOURCES

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in SOURCES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(SOURCES)}")
    return values


def _loads(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v != "sat":
            try:
                ok = 0 < float(v) <= 1
            except ValueError:
                ok = False
            if not ok:
                raise argparse.ArgumentTypeError(f"{v!r}: expected 'sat' or a fraction of saturation in (0, 1]")
    if "sat" not in values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'sat' among the loads (fixed rates are fractions of it)")
    return ["sat"] + [v for v in values if v != "sat"]


def _options(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a JSON object of engine options, e.g. '{{\"intra_op_threads\": 2}}'"
        )
    return value


def _positive(kind, zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (value < 0 if zero else value <= 0):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite {kind.__name__} {'>=' if zero else '>'} 0")
        return value

    return parse


def _batching(key: str, kind):
    """A `batching.<key>` for the daemon, refused here as the daemon's config would refuse it (one rule, in
    inspectd.daemon.config), not by every scenario's daemon after minutes of measuring."""

    def parse(text: str):
        from pydantic import ValidationError

        from engines.schema import check, one_line
        from inspectd.daemon.config import BatchingConfig

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a {kind.__name__}") from None
        try:
            check(BatchingConfig, {key: value})
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {one_line(exc).split(': ', 1)[1]}") from None
        return value

    return parse


def _size(text: str) -> tuple[int, int]:
    """train's --size rule (engines.bundle.format.parse_size: no torch, which a runtime-only install lacks and whose
    memory every figure of this process would carry), as an argparse type."""
    from engines.bundle.format import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--size ")) from None


def _output(text: str) -> Path:
    """An output file, made absolute against the caller's directory: a profiled daemon runs in a scenario folder
    of its own and would resolve a relative path there, a folder removed with the scenario."""
    return Path(text).absolute()


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="onnxruntime", help="runtime backend (default onnxruntime)")
    p.add_argument("--options", type=_options, default={}, help="backend options as a JSON object")


def _frame_args(p: argparse.ArgumentParser, default_synthetic: int | None) -> None:
    group = p.add_mutually_exclusive_group(required=default_synthetic is None)
    group.add_argument("--frames", type=Path, help="a folder of JPEG/PNG frames")
    group.add_argument(
        "--synthetic",
        type=_positive(int),
        default=default_synthetic,
        help="write this many synthetic-line JPEG frames and use them"
        + (f" (default {default_synthetic})" if default_synthetic else ""),
    )
    p.add_argument(
        "--frame-size",
        type=_size,
        default=None,
        help="size of --synthetic frames, N or HxW (default: the bundle's input size)",
    )


def _daemon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-batch", type=_batching("max_batch", int), default=8, help="daemon batching.max_batch (default 8)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=_batching("max_wait_ms", float),
        default=10.0,
        help="daemon batching.max_wait_ms (default 10)",
    )
    p.add_argument(
        "--profile",
        type=_output,
        default=None,
        help="run one more saturated daemon (zmq-raw if chosen, else the first source; the first camera "
        "count) under cProfile in every thread, into this pstats file; cProfile slows it, so that run counts "
        "towards no goal and sets no offered rate",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    p = modes.add_parser("engine", help="engine-only frames/s and latency per batch size")
    p.add_argument("bundle", type=Path)
    _engine_args(p)
    p.add_argument("--batch", type=_ints, default=[1, 4, 8, 16], help="batch sizes (default 1,4,8,16)")
    p.add_argument(
        "--size",
        type=_size,
        nargs="+",
        default=None,
        help="input sizes (N or HxW); others than the bundle's train a frozen bundle for the bench",
    )
    p.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="defect-free images for --size bundles (default: the bundle's own training data)",
    )
    p.add_argument("--windows", type=_positive(int), default=5, help="timed windows per batch size (default 5)")
    p.add_argument("--window-s", type=_positive(float), default=2.0, help="seconds per window (default 2)")
    _json_args(p)

    p = modes.add_parser("naive", help="the single-threaded loop a user would write without inspectd")
    p.add_argument("bundle", type=Path)
    _frame_args(p, None)
    p.add_argument(
        "--duration",
        type=_positive(float, zero=True),
        default=0.0,
        help="repeat the frames until this many seconds have passed (default: one pass)",
    )
    _json_args(p)

    p = modes.add_parser("daemon", help="the real daemon as a subprocess, at saturation and a fixed rate")
    p.add_argument("--bundle", type=Path, required=True)
    _engine_args(p)
    _frame_args(p, 32)
    p.add_argument("--cameras", type=_ints, default=[1, 4], help="camera counts (default 1,4)")
    p.add_argument(
        "--source",
        type=_sources,
        default=["synthetic", "folder", "zmq-raw", "zmq-jpeg"],
        help="sources (default synthetic,folder,zmq-raw,zmq-jpeg)",
    )
    p.add_argument(
        "--load",
        type=_loads,
        default=["sat", "0.5"],
        help="'sat' and fractions of the measured saturation to offer (default sat,0.5)",
    )
    p.add_argument("--duration", type=_positive(float), default=8.0, help="measured seconds per scenario (default 8)")
    _daemon_args(p)
    _json_args(p)

    p = modes.add_parser("all", help="engine, naive and daemon in one run, with the ratios against the goals")
    p.add_argument("bundle", type=Path)
    _engine_args(p)
    _frame_args(p, 32)
    p.add_argument("--batch", type=_ints, default=[1, 2, 4, 8], help="engine batch sizes (default 1,2,4,8)")
    p.add_argument("--windows", type=_positive(int), default=5, help="engine windows per batch size (default 5)")
    p.add_argument("--window-s", type=_positive(float), default=2.0, help="seconds per engine window (default 2)")
    p.add_argument("--cameras", type=_ints, default=[1, 4], help="daemon camera counts (default 1,4)")
    p.add_argument(
        "--source",
        type=_sources,
        default=["zmq-raw", "zmq-jpeg", "synthetic", "folder"],
        help="daemon sources (default zmq-raw,zmq-jpeg,synthetic,folder)",
    )
    p.add_argument(
        "--duration",
        type=_positive(float),
        default=8.0,
        help="measured seconds per daemon scenario and for the naive loop (default 8)",
    )
    _daemon_args(p)
    _json_args(p)
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown report to this file")


# The one progress line of this run (on stderr); log lines go through it so a terminal keeps the two apart.
_progress = Progress()


def _json_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print the figures as one JSON document on stdout (the tables go to stderr)",
    )
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the figures as JSON to this file")


def _log(message: str) -> None:
    _progress.note(message)


def _frames(args, bundle_path: Path, workdir: Path) -> list[Path]:
    from engines.bundle.store import load_bundle
    from inspectd.tools.bench.naive import frames_from

    h, w, c = load_bundle(bundle_path).input_shape
    return frames_from(args.frames, args.synthetic, workdir, args.frame_size or (h, w), channels=c)


def _table(module, report: dict) -> str:
    headers, rows = module.rows_for_table(report)
    return markdown_table(headers, rows)


def run_engine(args) -> dict:
    from inspectd.tools.bench import engine as bench_engine

    report = bench_engine.bench_engine(
        args.bundle,
        args.backend,
        args.options,
        args.batch,
        args.size,
        args.windows,
        args.window_s,
        args.train_data,
        progress=_progress,
    )
    print(_table(bench_engine, report))
    for r in report["sizes"]:
        print(
            f"\n{'x'.join(map(str, r['input']))}: opening the engine added {r['rss_engine_mb']:.0f} MB resident, "
            f"the larger batches {r['rss_batches_mb']:.0f} MB more; {r['rss_end_mb']:.0f} MB at the end"
        )
    print(
        f"peak RSS {report['peak_rss_mb']:.0f} MB; median of {args.windows} windows of {args.window_s:g}s "
        f"after {bench_engine.WARMUP_S:g}s warm-up"
    )
    return report


def run_naive(args) -> dict:
    from inspectd.tools.bench import naive as bench_naive

    with tempfile.TemporaryDirectory(prefix="inspectd-bench-") as tmp:
        paths = _frames(args, args.bundle, Path(tmp))
        report = bench_naive.naive_loop(args.bundle, paths, args.duration)
    print(_table(bench_naive, report))
    return report


def run_daemon(args, engine_rows: list[dict] | None = None, paths: list[Path] | None = None) -> dict:
    from engines.bundle.store import load_bundle
    from inspectd.daemon.security import refuse_root
    from inspectd.tools.bench import daemon as bench_daemon
    from inspectd.tools.bench import engine as bench_engine

    refuse_root()  # the daemon subprocess would refuse: say so before minutes of measuring
    if engine_rows is None:
        # CPU per frame outside the engine needs the engine's own CPU per frame, measured in this run.
        _log("bench daemon: measuring the engine alone first (for CPU outside the engine)")
        batches = sorted({1, max(1, args.max_batch // 2), args.max_batch})
        engine = bench_engine.bench_bundle(
            load_bundle(args.bundle), args.backend, args.options, batches, windows=2, window_s=1.0
        )
        engine_rows = engine["rows"]
    before = _stamp(args.profile) if args.profile is not None else None
    with tempfile.TemporaryDirectory(prefix="inspectd-bench-") as tmp:
        paths = paths or _frames(args, args.bundle, Path(tmp))
        frames = bench_daemon.FrameSet(paths, load_bundle(args.bundle).input_shape[2])
        report = bench_daemon.bench_daemon(
            args.bundle,
            frames,
            args.source,
            args.cameras,
            args.duration,
            getattr(args, "load", ["sat", "0.5"]),
            engine_rows,
            args.max_batch,
            args.max_wait_ms,
            args.backend,
            args.options,
            args.profile,
            log=_log,
            progress=_progress,
        )
    report["engine_rows"] = engine_rows
    if args.profile is not None:
        report["profile"] = _profile(args.profile, before, report["rows"])
    if args.mode == "daemon":
        print(_table(bench_daemon, report))
        if args.profile is not None:
            print("\n" + profile_table(report["profile"]))
    return report


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _profile(path: Path, before: tuple[int, int, int] | None, rows: list[dict]) -> dict:
    """The summary of the pstats file the profiled daemon wrote in this run, or {"error": why} where that run failed
    (its profile, if any, is of a daemon that was not serving), it wrote none (a file left there by an earlier run is
    not this run's) or one that cannot be read."""
    failed = next((r["error"] for r in rows if r.get("profiled") and "error" in r), None)
    if failed is not None:
        return {"error": f"{path}: not summarised, the profiled run failed: {failed}"}
    if _stamp(path) in (None, before):
        return {"error": f"{path}: no profile written in this run"}
    try:
        return summarize_profile(path)
    except (OSError, EOFError, ValueError, TypeError) as exc:  # a daemon killed while it wrote the file
        return {"error": f"{path}: cannot read the profile ({type(exc).__name__}: {exc})"}


def summarize_profile(path: Path, top: int = 20) -> dict:
    """The functions with the most own CPU time, and our own functions with the most cumulative CPU time, per
    published frame (the publisher's `_send_result` calls count the frames)."""
    import pstats

    stats = pstats.Stats(str(path))
    entries = []
    # Stats.stats is the raw table pstats itself reads; typeshed leaves it out.
    for (filename, line, name), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append(
            {
                "function": f"{Path(filename).name}:{line}({name})",
                "file": filename,
                "calls": nc,
                "own_s": tt,
                "cumulative_s": ct,
            }
        )
    frames = sum(e["calls"] for e in entries if e["file"].endswith("publish.py") and "_send_result" in e["function"])
    for e in entries:
        e["own_us_per_frame"] = e["own_s"] / frames * 1e6 if frames else None
        e["cumulative_us_per_frame"] = e["cumulative_s"] / frames * 1e6 if frames else None
    own = sorted(entries, key=lambda e: -e["own_s"])[:top]
    ours = sorted(
        (e for e in entries if "/inspectd/" in e["file"] or "/engines/" in e["file"]), key=lambda e: -e["cumulative_s"]
    )[:top]
    return {
        "path": str(path),
        "frames": frames,
        "total_own_s": sum(e["own_s"] for e in entries),
        "top_own": own,
        "top_inspectd_cumulative": ours,
    }


def profile_table(profile: dict) -> str:
    if "error" in profile:
        return f"profile: {profile['error']}"

    def rows(entries):
        return [
            [
                e["function"],
                e["calls"],
                e["own_s"],
                e["cumulative_s"],
                e["own_us_per_frame"],
                e["cumulative_us_per_frame"],
            ]
            for e in entries
        ]

    headers = ["calls", "own CPU s", "cumulative CPU s", "own us/frame", "cumulative us/frame"]
    return "\n".join(
        [
            f"{profile['frames']} frames published; CPU time of every thread but the main one (cProfile, thread_time)",
            "",
            markdown_table(["function (most own CPU)", *headers], rows(profile["top_own"])),
            "",
            markdown_table(
                ["inspectd/engines function (most cumulative CPU)", *headers], rows(profile["top_inspectd_cumulative"])
            ),
        ]
    )


def ratios(engine: dict, naive: dict, daemon: dict, max_wait_ms: float, max_batch: int) -> dict[str, Any]:
    """The report's ratios against GOALS (None where a scenario needed for it was not run or failed, and for the
    p99 at half load where the rate sent is unknown or under SENT_SHARE_MIN of the rate offered)."""
    from inspectd.tools.bench import daemon as bench_daemon

    best = engine["best"]["fps"]["median"]
    rows = [r for r in daemon["rows"] if "error" not in r and not r.get("profiled")]

    def find(source: str, saturation: bool):
        candidates = [r for r in rows if r["source"] == source and (r["load"] == "saturation") == saturation]
        return max(candidates, key=lambda r: r["delivered_fps"], default=None)

    raw, jpeg = find("zmq-raw", True), find("zmq-jpeg", True)
    half = [r for r in rows if r["source"] == "zmq-raw" and r["load"].startswith("50%")]
    full_batch = next(
        (r for s in engine["sizes"] if not s["trained_for_bench"] for r in s["rows"] if r["batch"] == max_batch), None
    )
    bound_ms = 2 * (max_wait_ms + full_batch["latency_ms"]["p50"]) if full_batch else None
    out: dict[str, Any] = {}
    out["daemon_vs_engine_raw"] = raw["delivered_fps"] / best if raw else None
    out["daemon_vs_engine_raw_cpu"] = (
        raw["engine_cpu_ms_per_frame"] / raw["daemon_cpu_ms_per_frame"]
        if raw and raw["engine_cpu_ms_per_frame"] and raw["daemon_cpu_ms_per_frame"]
        else None
    )
    out["daemon_vs_engine_jpeg"] = jpeg["delivered_fps"] / best if jpeg else None
    out["daemon_vs_naive"] = jpeg["delivered_fps"] / naive["fps"] if jpeg and naive else None
    out["daemon_vs_naive_cpu"] = (
        naive["cpu_ms_per_frame"] / jpeg["daemon_cpu_ms_per_frame"]
        if jpeg and naive and jpeg["daemon_cpu_ms_per_frame"]
        else None
    )
    # The rate offered is what was asked for; the bench itself (on a shared box) may send less, a lighter load.
    out["half_load"] = [
        {"cameras": r["cameras"], "offered_fps": r["offered_fps"], "sent_fps": r["sent_fps"]} for r in half
    ]
    short = [r for r in half if r["sent_fps"] is None or r["sent_fps"] < bench_daemon.SENT_SHARE_MIN * r["offered_fps"]]
    out["half_load_samples"] = min((r["latency_ms"]["n"] for r in half), default=None)
    p99s = [p99_or_none(r["latency_ms"]) for r in half]
    out["p99_at_half_load"] = (
        max(p for p in p99s if p is not None) / bound_ms
        if half and bound_ms and not short and None not in p99s
        else None
    )
    outside = [
        r
        for r in rows
        if r["source"] == "zmq-raw" and r["load"] == "saturation" and r["outside_engine_cpu_ms_per_frame"] is not None
    ]
    if outside:
        # A difference of two noisy CPU figures: the mean over the saturated zmq-raw runs (1 and 4 cameras).
        out["outside_engine_cpu"] = sum(r["outside_engine_cpu_ms_per_frame"] for r in outside) / sum(
            r["engine_cpu_ms_per_frame"] for r in outside
        )
    else:
        out["outside_engine_cpu"] = None
    out["p99_bound_ms"] = bound_ms
    return out


def half_load_line(values: dict[str, Any]) -> str:
    """The p99 bound, and the rate each 50% load was offered and actually sent (what the p99 goal was judged at)."""
    from inspectd.tools.bench import daemon as bench_daemon

    rates = "; ".join(
        f"zmq-raw x{h['cameras']}: offered {fmt(h['offered_fps'])}/s, sent {fmt(h['sent_fps'])}/s"
        for h in values["half_load"]
    )
    line = f"p99 bound at 50% load: {fmt(values['p99_bound_ms'])} ms"
    if not rates:
        return f"{line}."
    few = values.get("half_load_samples")
    if values["p99_at_half_load"] is None and values["p99_bound_ms"] is not None:
        if few is not None and few < P99_MIN_SAMPLES:
            rates += f" (p99 goal not judged: {few} latency samples, a p99 needs {P99_MIN_SAMPLES})"
        else:
            rates += (
                f" (p99 goal not judged: a rate sent unknown or under {bench_daemon.SENT_SHARE_MIN:.0%} of offered)"
            )
    return f"{line}; {rates}."


def goals_table(values: dict[str, Any]) -> str:
    rows = []
    for key, (what, op, target) in GOALS.items():
        value = values.get(key)
        if value is None or target is None:
            verdict = "-" if value is None else "(info)"
        else:
            met = value >= target if op == ">=" else value <= target if op == "<=" else value < target
            verdict = "met" if met else "NOT met"
        rows.append([what, value, f"{op} {target}" if target is not None else "-", verdict])
    return markdown_table(["ratio", "measured", "goal", ""], rows)


def run_all(args) -> dict:
    from engines.bundle.store import load_bundle
    from inspectd.daemon.security import refuse_root
    from inspectd.tools.bench import engine as bench_engine
    from inspectd.tools.bench import naive as bench_naive

    refuse_root()
    started = time.time()
    bundle = load_bundle(args.bundle)
    if args.max_batch not in args.batch:
        args.batch = sorted(set(args.batch) | {args.max_batch})
    _log("bench all: engine")
    engine = bench_engine.bench_engine(
        args.bundle, args.backend, args.options, args.batch, None, args.windows, args.window_s, progress=_progress
    )
    with tempfile.TemporaryDirectory(prefix="inspectd-bench-") as tmp:
        paths = _frames(args, args.bundle, Path(tmp))
        sizes = frame_sizes(paths)  # read now: --synthetic frames go with this folder
        _log(f"bench all: naive loop on {len(paths)} frames")
        naive = bench_naive.naive_loop(args.bundle, paths, args.duration)
        _log("bench all: daemon")
        args.load = ["sat", "0.5"]
        daemon = run_daemon(args, engine["sizes"][0]["rows"], paths)
    values = ratios(engine, naive, daemon, args.max_wait_ms, args.max_batch)
    report = {
        "kind": "all",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
        "machine": machine(),
        "bundle": str(args.bundle),
        "model_id": bundle.model_id,
        "input": list(bundle.input_shape),
        "frames": len(paths),
        "frame_sizes": sizes,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "ratios": values,
        "engine": engine,
        "naive": naive,
        "daemon": daemon,
        "bench_peak_rss_mb": peak_rss_bytes() / MB,
    }
    print(markdown_report(report))
    return report


def frame_sizes(paths: list[Path]) -> str:
    """'HxW' when all frames share a size, else the range of heights and widths (read from the file headers)."""
    from inspectd.daemon.ingest.headers import encoded_dims

    dims = {d[1:] for d in (encoded_dims(p.read_bytes()) for p in paths) if d is not None}
    if not dims:
        return "sizes unknown"
    if len(dims) == 1:
        ((h, w),) = dims
        return f"{h}x{w}"
    hs, ws = [d[0] for d in dims], [d[1] for d in dims]
    return f"{min(hs)}..{max(hs)} x {min(ws)}..{max(ws)}"


def machine() -> dict[str, Any]:
    import os
    import platform

    from engines.runtime.onnxruntime_backend import ort

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "load_avg_at_start": os.getloadavg(),
    }


def markdown_report(report: dict) -> str:
    from inspectd.tools.bench import daemon as bench_daemon
    from inspectd.tools.bench import engine as bench_engine
    from inspectd.tools.bench import naive as bench_naive

    m = report["machine"]
    parts = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, ONNX Runtime {m['onnxruntime']}; "
        f"load average at start {', '.join(f'{v:.1f}' for v in m['load_avg_at_start'])}.",
        f"Bundle {report['model_id']} (input {'x'.join(map(str, report['input']))}), {report['frames']} frames "
        f"({report['frame_sizes']}); daemon max_batch {report['max_batch']}, "
        f"max_wait_ms {report['max_wait_ms']:g}.",
        "",
        "### Goals",
        "",
        goals_table(report["ratios"]),
        "",
        half_load_line(report["ratios"]),
        "",
        "### Engine only",
        "",
        _table(bench_engine, report["engine"]),
        "",
        "### Naive loop",
        "",
        _table(bench_naive, report["naive"]),
        "",
        "### Daemon",
        "",
        _table(bench_daemon, report["daemon"]),
    ]
    if "profile" in report["daemon"]:
        parts += [
            "",
            "### Daemon profile (a saturated run of its own under cProfile in every thread, not in the goals)",
            "",
            profile_table(report["daemon"]["profile"]),
        ]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    from engines.errors import EngineError
    from inspectd.errors import InspectdError

    runners = {"engine": run_engine, "naive": run_naive, "daemon": run_daemon, "all": run_all}
    # Said before minutes of measuring, not after: an output that cannot be written would lose the run's figures.
    for option in ("out", "markdown", "profile"):
        path = getattr(args, option, None)
        why = unwritable(path) if path is not None else None
        if why is not None:
            print(f"inspectd bench {args.mode}: --{option} {path}: cannot write ({why})", file=sys.stderr)
            return 1
    # --json: stdout carries the one JSON document and nothing else; the tables a person reads go to stderr.
    tables = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with tables:
            report = runners[args.mode](args)
    except (EngineError, InspectdError, ValueError, OSError, RuntimeError) as exc:
        print(f"inspectd bench {args.mode}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=1, default=str) + "\n"
    if args.json:
        sys.stdout.write(text)
    outputs = [("out", args.out, text)]
    if getattr(args, "markdown", None) is not None:
        outputs.append(("markdown", args.markdown, markdown_report(report) + "\n"))
    for option, path, content in outputs:
        if path is None:
            continue
        try:
            path.write_text(content)
        except OSError as exc:
            print(
                f"inspectd bench {args.mode}: --{option} {path}: cannot write ({exc.strerror or exc})", file=sys.stderr
            )
            return 1
    scenarios = (
        report["daemon"]["rows"] if args.mode == "all" else report.get("rows", []) if args.mode == "daemon" else []
    )
    failed = [r for r in scenarios if "error" in r]
    if failed:
        # The figures of the others are out (and in --out): a script must still not take the run for a whole one.
        first = failed[0]
        why = (first["error"] or "?").splitlines()[0]
        print(
            f"inspectd bench {args.mode}: {len(failed)} of {len(scenarios)} daemon scenarios failed, the first "
            f"{first['source']} x{first['cameras']} {first['load']}: {why}",
            file=sys.stderr,
        )
        return 1
    return 0
