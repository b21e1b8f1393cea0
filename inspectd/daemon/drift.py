"""The score-drift alarm: per camera, do the scores of the frames judged good still look like the good scores the
thresholds were set on?

Reference: the thresholds document's provenance["good_scores"] (engines.bundle.thresholds: the held-out good scores
of train, calibrate or teach, n frames). Window: the last WINDOW scores of frames this camera judged `ok`.

Test: the two-sample Kolmogorov-Smirnov statistic D = max |F_window - F_reference| over the pooled scores, run every
CHECK_EVERY good frames once the window holds MIN_SAMPLES. Its critical value at level a is
c(a) * sqrt((n + m) / (n m)) with c(a) = sqrt(-ln(a / 2) / 2) (the asymptotic one; n window scores, m reference
frames). The alarm RAISES when D exceeds the critical value at RAISE_ALPHA and CLEARS only when D falls below the one
at CLEAR_ALPHA (a lower value): hysteresis, so a window on the edge does not flap. RAISE_ALPHA is small because the
test runs hundreds of times an hour on overlapping windows; the soak (an hour of unchanged frames) must stay quiet.
Lighting, lens, focus and material changes move the whole distribution, which is what KS sees, long before most
frames cross the threshold.

False-reject warning: the rate a normal distribution fitted to the window puts at or above the image threshold (an
estimate of the tail from the window's mean and spread, stated as such). Its baseline is the larger of the calibrated
target (provenance["target"] when it is a false-reject target, else DEFAULT_FALSE_REJECT_TARGET) and the same estimate
made on the reference scores: a threshold set at the top of a few held-out scores makes the normal tail of those very
scores exceed the target already, and an unchanged line must not warn. A tail this far out estimated from WINDOW scores
is noisy (on the unchanged synthetic line it wanders between 0.5x and 3x the baseline), so the warning rises only when
the estimate exceeds WARNING_FACTOR x the baseline and falls when it is back below half that, so it does not flap.

The daemon (inspectd.daemon.service) keeps one monitor per camera, builds a fresh one whenever the model or the
thresholds change (reload, set_thresholds, rollback: a new reference), and reports `status()` in its status, metrics,
log and status messages, which is where the PLC bridges take their drift bit from.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import numpy as np

WINDOW = 200
MIN_SAMPLES = 100
CHECK_EVERY = 10
RAISE_ALPHA = 1e-6
CLEAR_ALPHA = 1e-2
DEFAULT_FALSE_REJECT_TARGET = 0.001
WARNING_FACTOR = 4.0


def ks_statistic(window: np.ndarray, reference: np.ndarray) -> float:
    """max |F_window(x) - F_reference(x)| over every observed x; both arrays sorted ascending."""
    pooled = np.concatenate([window, reference])
    f_window = np.searchsorted(window, pooled, side="right") / window.size
    f_reference = np.searchsorted(reference, pooled, side="right") / reference.size
    return float(np.max(np.abs(f_window - f_reference)))


def normal_tail(scores: np.ndarray, threshold: float) -> float:
    """The share of a normal distribution with the scores' mean and spread at or above `threshold`."""
    sd = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    if sd <= 0:
        return 0.0 if scores.size == 0 or float(scores.mean()) < threshold else 1.0
    return 0.5 * math.erfc((threshold - float(scores.mean())) / sd / math.sqrt(2))


def ks_critical(alpha: float, n: int, m: int) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


@dataclasses.dataclass
class DriftState:
    alarm: bool = False
    statistic: float | None = None  # D of the last check
    raise_at: float | None = None  # the critical value it is compared with
    samples: int = 0
    false_reject_estimate: float | None = None
    false_reject_warning: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("statistic", "raise_at", "false_reject_estimate"):
            if out[key] is not None:
                out[key] = round(out[key], 6)
        return out


class DriftMonitor:
    """One camera's window and alarm. `add(score)` for every frame judged ok; returns "raised"/"cleared" when the
    alarm changes, else None. Inactive (never alarms, status says so) without a reference."""

    def __init__(
        self,
        reference: tuple[int, list[float]] | None,
        threshold: float,
        target: float = DEFAULT_FALSE_REJECT_TARGET,
        window: int = WINDOW,
        min_samples: int = MIN_SAMPLES,
        check_every: int = CHECK_EVERY,
    ) -> None:
        self.active = reference is not None
        self.m = reference[0] if reference else 0
        self.reference = np.asarray(reference[1] if reference else [], dtype=np.float64)
        self.threshold = threshold
        self.target = target
        self.warn_above = WARNING_FACTOR * max(target, normal_tail(self.reference, threshold))
        self.scores: collections.deque[float] = collections.deque(maxlen=window)
        self.min_samples = min(min_samples, window)
        self.check_every = check_every
        self.since_check = 0
        self.state = DriftState()

    def add(self, score: float) -> str | None:
        if not self.active or not math.isfinite(score):
            return None
        self.scores.append(score)
        self.since_check += 1
        if len(self.scores) < self.min_samples or self.since_check < self.check_every:
            return None
        self.since_check = 0
        return self.check()

    def check(self) -> str | None:
        window = np.sort(np.fromiter(self.scores, dtype=np.float64))
        n = window.size
        state = self.state
        state.samples = n
        state.statistic = ks_statistic(window, self.reference)
        state.raise_at = ks_critical(RAISE_ALPHA, n, self.m)
        state.false_reject_estimate = normal_tail(window, self.threshold)
        if state.false_reject_estimate > self.warn_above:
            state.false_reject_warning = True
        elif state.false_reject_estimate < self.warn_above / 2:
            state.false_reject_warning = False
        if not state.alarm and state.statistic > state.raise_at:
            state.alarm = True
            return "raised"
        if state.alarm and state.statistic < ks_critical(CLEAR_ALPHA, n, self.m):
            state.alarm = False
            return "cleared"
        return None

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active,
            **self.state.to_dict(),
            "target": self.target,
            "warn_above": round(self.warn_above, 6),
        }


def monitor_for(thresholds, camera: str) -> DriftMonitor:
    """The monitor for `camera` under `thresholds` (an engines.bundle.thresholds.Thresholds)."""
    from engines.bundle.thresholds import reference_scores

    target = thresholds.provenance.get("target")
    rate = DEFAULT_FALSE_REJECT_TARGET
    if isinstance(target, dict) and target.get("kind") == "false_reject" and isinstance(target.get("value"), float):
        rate = target["value"]
    return DriftMonitor(reference_scores(thresholds), thresholds.for_camera(camera)[0], rate)
