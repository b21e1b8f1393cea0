"""What every benchmark measures with: timed windows, latency percentiles, CPU time, resident memory, tables.

Figures from a shared, noisy machine are only comparable inside one run, so each benchmark reports the median
of several windows with their spread, and `inspectd bench all` reports ratios of figures taken minutes apart.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024
# Below this many samples the 99th percentile is the largest one or two under another name: shown as "-", beside
# the sample count, and no goal is judged on it.
P99_MIN_SAMPLES = 100


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now, from /proc/<pid>/statm (pages resident * page size)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def peak_rss_bytes() -> int:
    """This process's lifetime peak resident set (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_cpu_s(pid: int) -> float:
    """utime + stime of another process (all its threads), from /proc/<pid>/stat; psutil is not a dependency."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_peak_rss_bytes(pid: int) -> int:
    """Peak resident set (VmHWM) of another process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and range of per-window figures."""
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def latency_ms(seconds: Iterable[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds of latencies given in seconds (zeros when there are none)."""
    a = np.fromiter(seconds, dtype=np.float64)
    if a.size == 0:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    p50, p99 = np.percentile(a, (50, 99)) * 1000.0
    return {"p50": float(p50), "p99": float(p99), "max": float(a.max() * 1000.0), "n": int(a.size)}


def p99_or_none(latency: dict[str, float]) -> float | None:
    """The p99 of a `latency_ms` dict, None when it rests on fewer than P99_MIN_SAMPLES samples."""
    return latency["p99"] if latency["n"] >= P99_MIN_SAMPLES else None


def p99_text(latency: dict[str, float]) -> str:
    """'p99 12.3 ms', or what stands in for it when too few samples were taken (for log and summary lines)."""
    p99 = p99_or_none(latency)
    if p99 is not None:
        return f"p99 {p99:.1f} ms"
    return f"p99 - ({latency['n']} samples, a p99 needs {P99_MIN_SAMPLES})"


class CpuClock:
    """CPU seconds (all threads) of this process or of `pid`, read as a difference from `start()`."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.t0 = 0.0

    def now(self) -> float:
        return time.process_time() if self.pid is None else proc_cpu_s(self.pid)

    def start(self) -> CpuClock:
        self.t0 = self.now()
        return self

    def elapsed(self) -> float:
        return self.now() - self.t0


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
