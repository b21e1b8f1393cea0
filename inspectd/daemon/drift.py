"""The score-drift alarm: per camera, do the frames judged good still look like the good frames the thresholds were
set on?

Two tests, each against a reference in the thresholds document's provenance (engines.bundle.thresholds: the held-out
good frames of train, calibrate or teach, n frames), each over a window of the last WINDOW frames this camera judged
`ok`:

- score: their image scores against provenance["good_scores"];
- brightness: their mean grey level as the model saw them (engines.runtime.preprocess.mean_level) against
  provenance["good_brightness"] (written by calibrate and teach; without it this test is inactive). A model is
  built to be robust to lighting, so a change of a tenth in brightness barely moves its score (on the synthetic
  line: by 0.05 to 0.07 of the score's spread, which no window of a few hundred frames can tell from chance), yet
  it is a change of the station worth knowing of before it grows; under controlled lighting it moves the mean grey
  level by several times that level's own spread.

Test: the two-sample Kolmogorov-Smirnov statistic D = max |F_window - F_reference| over the pooled values, run every
CHECK_EVERY good frames once the window holds MIN_SAMPLES. Its critical value at level a is
c(a) * sqrt((n + m) / (n m)) with c(a) = sqrt(-ln(a / 2) / 2) (the asymptotic one; n window values, m reference
frames). A test RAISES when D exceeds the critical value at RAISE_ALPHA and CLEARS only when D falls below the one at
CLEAR_ALPHA (a lower value): hysteresis, so a window on the edge does not flap. The alarm is up while either test is
raised. False alarms: on an unchanged line (frames independent, the reference drawn from the same line) each check
raises with probability at most RAISE_ALPHA, so by the union bound an hour at 10 good frames/s (3600 checks of each
of the two tests) raises at most 2 x 3600 x 1e-6 = 0.7 % of hours, and a day at that rate 17 % of days at most; the
soak (deploy/soak.py --drift) runs an hour of frames and must stay quiet. Lighting, lens, focus and material changes
move the whole distribution, which is what KS sees, long before most frames cross the threshold.

Cut at the threshold: the window holds only frames judged ok (score below the camera's image threshold), so a
threshold that rejects a share q of good frames leaves it a cut distribution, which differs from the whole good one
by up to q in D: compared with the whole reference, a threshold that rejects more than about 15 % of good frames
(calibrate --max-f1 or --target-escape where good and defect scores overlap, a low camera override) would raise on
an unchanged line and never clear. So each test compares like with like:
- score: the window against the reference scores below the threshold (cut_reference), m then the reference frames
  they stand for (m times the kept share of the stored values). Window and cut reference are then drawn from the same
  cut distribution on an unchanged line, and the bound above holds as stated. A threshold that keeps too few
  reference frames for the test to ever raise leaves it inactive, saying so.
- brightness: the document stores the brightness and score references each sorted on its own (and thinned to
  quantiles), not paired per frame, so the brightness values of the frames below the threshold are not known. Cutting
  away a share q of any distribution moves its distribution function by at most q anywhere, so this test raises and
  clears at its critical values plus q (the share of the score reference at or above the threshold; 0 without one):
  what is left for chance is the critical value the bound is stated for (up to the small difference between the
  sampling noise of a cut distribution and of the whole one; tests/test_drift_cut.py holds seeded stations with
  brightness tied to the score quiet up to q = 40 %). Where brightness and score are unrelated, as a model robust to
  lighting makes them, the test merely needs q more D than before to raise. Thresholds at the top of the good
  scores, which calibrate and teach set by default, reject next to none (q near 0) and see both tests as they were.

Small references: D never exceeds 1, and with the 200-frame window the critical value at RAISE_ALPHA is above 1 for
a reference of 7 frames or fewer (m = 2: 1.91, m = 7: 1.04, m = 8: 0.97, m = 20: 0.63). A test on such a reference
could never raise, so it is not armed: it reports `active: false` (the score test) or `brightness_active: false`,
with the reason in the status (`inactive_reason`, `brightness_inactive_reason`) and a `drift_inactive` warning whose
`test` says which (score, brightness), rather than an alarm shown active that cannot rise. calibrate and teach warn
when they record such a reference (engines.bundle.thresholds.MIN_REFERENCE). Just above the minimum it still rises
only on a large shift (m = 20: D must exceed 0.63).

False-reject warning: do the good frames now put the image threshold measurably closer to them than the reference
did? Each side is summed up by how many of its standard deviations the threshold lies above its mean, z. The window
holds only the frames judged ok, a normal distribution cut at the threshold, so its z is read through that cut
(cut_z: the z of the whole distribution whose cut part has the window's mean and spread); its upper normal tail,
Phi(-z), is `false_reject_estimate`, an estimate of the share of good parts now rejected (a normal model of the
scores, stated as such). The warning rises when the window's z falls below the reference's by more than RAISE_SE
standard errors of that difference and clears when it is back within CLEAR_SE, the standard error by normal theory
(the variance of an estimated z over N values is (1 + z^2 / 2) / N) for the m reference scores and the WINDOW ones
together. Both are shown as rates (`warn_above`, `clear_below`), and neither goes below WARNING_FACTOR x (or half
that) the calibrated target (provenance["target"], or the camera's own in provenance["per_camera_target"] where
`calibrate --camera` set its override; when it is a false-reject target, else DEFAULT_FALSE_REJECT_TARGET), so a
threshold set far above a reference does not warn of a rate still under the target.

Why a test and not a ratio of rates: a threshold at the top of m held-out scores, the usual case, puts the reference's
own tail estimate anywhere from a few times below to a few times above the rate an unchanged line then rejects, and a
window's estimate wanders by as much; a fixed factor over the reference's estimate raised on an unchanged line at about
one station in six within an hour (seeded stations, m = 60 to 1000). Against the standard error, in a simulation of
the monitor's windows (normal, gamma and the real elpv and magnetic tile held-out scores as the line, the threshold
just above the reference's largest, m = 40 to 1000) an unchanged line raised at 0-5 % of stations within a day (this
monitor itself: 0 of 117 stations within an hour). A line moved up until about 10 % of good parts are rejected raised
it within 3000 frames at 72 % (m = 60) to 100 % (m >= 300) of the stations with normal scores; with magnetic tile's
real scores (a long upper tail, which the normal model fits worst) at about a third with m = 60, and with strongly
skewed gamma scores (shape 2) at one in ten, where the factor it replaces raised more often but also on unchanged
lines. A symmetric heavy-tailed score (Student t, 5 degrees of freedom) still raises often on an unchanged line: such a
window's spread varies more than normal theory allows.

With few reference scores the standard error is large, and warn_above can exceed the share of good parts a station
would ever let go unnoticed. Like a test that cannot raise, such a warning is not armed: unless warn_above is at most
WARNING_REJECT_RATE, the status reports `false_reject_warning_active: false` with
`false_reject_warning_inactive_reason`, and monitor_for logs `false_reject_warning_inactive` (with the threshold at the
top of the reference, seeded normal scores: armed at one station in seven with 30 reference scores, at half with 40,
nearly always from 60).

References per camera: where the document holds a camera's own (provenance["per_camera_reference"], from its own
good frames), its monitor reads them; else the references pooled over every camera. A station whose cameras see the
line under different light needs its own per camera: against a pooled reference each camera's window differs from
it by about the other cameras' share of it, which raises the alarm on an unchanged line once the reference is large.

The daemon (inspectd.daemon.service) keeps one monitor per camera and builds a fresh one at start (the windows are
not kept across a restart: a raised alarm is down until MIN_SAMPLES good frames raise it again, which the daemon logs
as `drift_reset`, reason start) and whenever the model or that camera's own inputs change (drift_inputs: its image
threshold, its target and the references it reads) on a reload, set_thresholds or rollback, which logs a raised
alarm's end as `drift_cleared`, reason "new reference". A camera whose inputs the new version leaves as they were
keeps its monitor, window and raised alarm included: the comparison it makes is the same one. It reports `status()`
in its status, metrics, log and status messages, which is where the PLC bridges take their drift and false-reject
warning bits from.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Any, NamedTuple

import numpy as np
import structlog

log = structlog.get_logger("inspectd.daemon.drift")

WINDOW = 200
MIN_SAMPLES = 100
CHECK_EVERY = 10
RAISE_ALPHA = 1e-6
CLEAR_ALPHA = 1e-2
DEFAULT_FALSE_REJECT_TARGET = 0.001
WARNING_FACTOR = 4.0
# Standard errors of the drop in z that raise and clear the false-reject warning: 4.5 keeps an unchanged line quiet
# over a day of checks every CHECK_EVERY frames, where the reference's own error is drawn once per station.
RAISE_SE = 4.5
CLEAR_SE = 2.0
# The share of good parts rejected by which the false-reject warning must be able to rise to be armed: later than a
# quarter, it tells the operator nothing the reject count has not already shouted.
WARNING_REJECT_RATE = 0.25
# cut_z's search range: below -5 all but 3e-7 of good parts are rejected (and the ratio loses its precision), above
# 40 none is.
CUT_Z_RANGE = (-5.0, 40.0)


def ks_statistic(window: np.ndarray, reference: np.ndarray) -> float:
    """max |F_window(x) - F_reference(x)| over every observed x; both arrays sorted ascending."""
    pooled = np.concatenate([window, reference])
    f_window = np.searchsorted(window, pooled, side="right") / window.size
    f_reference = np.searchsorted(reference, pooled, side="right") / reference.size
    return float(np.max(np.abs(f_window - f_reference)))


def z_above(scores: np.ndarray, threshold: float) -> float:
    """How many of the scores' standard deviations `threshold` lies above their mean (+-inf without a spread)."""
    sd = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    gap = threshold - float(scores.mean()) if scores.size else math.inf
    if sd <= 0:
        return math.inf if gap > 0 else -math.inf
    return gap / sd


def upper_tail(z: float) -> float:
    """The share of a normal distribution more than z standard deviations above its mean."""
    return 0.5 * math.erfc(z / math.sqrt(2))


_UNIT = statistics.NormalDist()


def _cut_ratio(z: float) -> float:
    """z_above of a unit normal cut at z (only the values below it kept): its mean lies mills below 0 and its variance
    is 1 - z mills - mills^2."""
    mills = _UNIT.pdf(z) / _UNIT.cdf(z)
    return (z + mills) / math.sqrt(max(1.0 - z * mills - mills * mills, 1e-300))


def cut_z(ratio: float) -> float:
    """The z at which a normal distribution must be cut for its kept part to show z_above `ratio`: what a window of
    the frames judged ok says of the whole line's z. The ratio rises with z, so a bisection finds it."""
    low, high = CUT_Z_RANGE
    if not ratio > _cut_ratio(low):
        return low
    if ratio >= _cut_ratio(high):
        return ratio  # so far out that cutting changes nothing
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _cut_ratio(middle) < ratio else (low, middle)
    return high


def z_standard_error(z: float, m: int, window: int) -> float:
    """The standard error of the difference between a z estimated from m values and one from `window` values, by
    normal theory."""
    return math.sqrt((1.0 + z * z / 2.0) * (1.0 / m + 1.0 / window))


def ks_critical(alpha: float, n: int, m: int) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def can_raise(m: int, window: int = WINDOW) -> bool:
    """Whether a test against a reference of m frames can ever raise: D is at most 1, so a critical value at or
    above 1 (even with the window full) would leave it reported active yet deaf."""
    return ks_critical(RAISE_ALPHA, window, m) < 1.0


def min_reference(window: int = WINDOW) -> int:
    """The fewest reference frames can_raise accepts (8 for the default window)."""
    m = 1
    while not can_raise(m, window):
        m += 1
    return m


def cut_reference(
    reference: tuple[int, list[float]] | None, threshold: float
) -> tuple[tuple[int, list[float]] | None, float]:
    """(the reference values a frame judged ok could hold, with the frames they stand for; the share of the reference
    at or above `threshold`, which the threshold rejects). Stored values are rounded to 7 significant digits
    (engines.bundle.thresholds.good_score_reference), so a good score just below a threshold set just above it may be
    stored at or above it: one that ties the threshold at that precision is kept."""
    if reference is None:
        return None, 0.0
    m, values = reference
    rounded = float(f"{threshold:.7g}")
    kept = [v for v in values if v < threshold or v <= rounded]
    if len(kept) == len(values):
        return reference, 0.0
    # A reference of more than REFERENCE_POINTS frames is stored as that many evenly spaced quantiles: each stands
    # for an equal share of its m frames.
    share = len(kept) / len(values)
    return (round(m * share) if len(values) < m else len(kept), kept), 1.0 - share


class KsTest:
    """One test: a window of values against a sorted reference of m frames, with hysteresis; D must exceed each
    critical value by `margin` more (what the window's cut may move it by where the reference cannot be cut alike).
    Inactive, with the reason in `inactive`, without a reference or with one too small to ever raise; `kept` says
    which part of the stored reference it is, for that reason."""

    def __init__(
        self,
        reference: tuple[int, list[float]] | None,
        window: int,
        name: str = "good_scores",
        margin: float = 0.0,
        kept: str = "",
    ) -> None:
        self.inactive: str | None = None
        self.margin = margin
        if reference is None:
            self.inactive = f"the thresholds carry no {name} reference"
        elif reference[0] < 1 or not can_raise(reference[0], window):
            self.inactive = (
                f"the {name} reference holds {reference[0]} good frame(s){kept}, expected at least "
                f"{min_reference(window)} (with fewer the test can never raise): calibrate or teach on more good frames"
            )
            reference = None
        elif ks_critical(RAISE_ALPHA, window, reference[0]) + margin >= 1.0:
            self.inactive = (
                f"the {name} reference's {reference[0]} good frames need D above "
                f"{ks_critical(RAISE_ALPHA, window, reference[0]):.3g} plus the image threshold's {margin:.0%} share "
                "of rejected reference scores (the frames judged ok are a cut of the line), more than D can reach: "
                "calibrate with a threshold that rejects fewer good frames, or on more of them"
            )
            reference = None
        self.active = reference is not None
        self.m = reference[0] if reference else 0
        self.reference = np.asarray(reference[1] if reference else [], dtype=np.float64)
        self.values: collections.deque[float] = collections.deque(maxlen=window)
        self.alarm = False
        self.statistic: float | None = None  # D of the last check
        self.raise_at: float | None = None  # the critical value it is compared with
        self.clear_at: float | None = None  # the lower one a raised test must fall below to clear

    def add(self, value: float | None) -> None:
        if self.active and value is not None and math.isfinite(value):
            self.values.append(value)

    def window(self) -> np.ndarray:
        return np.sort(np.fromiter(self.values, dtype=np.float64))

    def check(self, window: np.ndarray) -> str | None:
        n = window.size
        self.statistic = ks_statistic(window, self.reference)
        self.raise_at = ks_critical(RAISE_ALPHA, n, self.m) + self.margin
        self.clear_at = ks_critical(CLEAR_ALPHA, n, self.m) + self.margin
        if not self.alarm and self.statistic > self.raise_at:
            self.alarm = True
            return "raised"
        if self.alarm and self.statistic < self.clear_at:
            self.alarm = False
            return "cleared"
        return None


@dataclasses.dataclass
class DriftState:
    alarm: bool = False  # either test raised
    statistic: float | None = None  # the score test's D of the last check
    raise_at: float | None = None  # the critical value it is compared with
    # What a raised alarm's D must fall below to clear (hysteresis): between the two the alarm holds, and an operator
    # checking a fix needs the level it is waiting for.
    clear_at: float | None = None
    false_reject_estimate: float | None = None
    false_reject_warning: bool = False
    score_alarm: bool = False
    brightness_active: bool = False
    brightness_alarm: bool = False
    brightness_statistic: float | None = None
    brightness_raise_at: float | None = None
    brightness_clear_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in (
            "statistic",
            "raise_at",
            "clear_at",
            "false_reject_estimate",
            "brightness_statistic",
            "brightness_raise_at",
            "brightness_clear_at",
        ):
            if out[key] is not None:
                out[key] = round(out[key], 6)
        return out


class MonitorInputs(NamedTuple):
    """All a monitor judges by: equal inputs (for the same model) make the same comparison, so a monitor built on
    them carries over to a new thresholds version that leaves them as they were."""

    reference: tuple[int, list[float]] | None
    threshold: float
    target: float
    brightness_reference: tuple[int, list[float]] | None


class DriftMonitor:
    """One camera's windows and alarm. `add(score, brightness)` for every frame judged ok; returns "raised"/"cleared"
    when the alarm changes, else None. Each test is inactive (never raises; status says so and why) without its
    reference or with one too small to ever raise, and runs on its own while the other is inactive: a bundle trained
    on a few images holds too few held-out scores for the score test, yet enough frames for the brightness one."""

    def __init__(
        self,
        reference: tuple[int, list[float]] | None,
        threshold: float,
        target: float = DEFAULT_FALSE_REJECT_TARGET,
        window: int = WINDOW,
        min_samples: int = MIN_SAMPLES,
        check_every: int = CHECK_EVERY,
        brightness_reference: tuple[int, list[float]] | None = None,
    ) -> None:
        self.inputs = MonitorInputs(reference, threshold, target, brightness_reference)
        kept, rejected = cut_reference(reference, threshold)
        cut = "" if reference is None or kept is reference else f" below the image threshold {threshold:.6g}"
        self.score = KsTest(kept, window, kept=cut)
        self.active = self.score.active  # the status's "active": the score test
        self.brightness = KsTest(brightness_reference, window, "good_brightness", margin=rejected)
        self.running = self.score.active or self.brightness.active
        self.threshold = threshold
        self.target = target
        # The warning models the whole line's scores (cut_z reads the window as a cut of them): the whole reference.
        self.reference_m = reference[0] if reference is not None else 0
        whole = np.asarray(reference[1] if reference is not None else [], dtype=np.float64)
        self.reference_z = z_above(whole, threshold) if self.score.active else math.inf
        self.warn_above, self.clear_below = WARNING_FACTOR * target, WARNING_FACTOR * target / 2
        if math.isfinite(self.reference_z):
            error = z_standard_error(self.reference_z, self.reference_m, window)
            self.warn_above = max(self.warn_above, upper_tail(self.reference_z - RAISE_SE * error))
            self.clear_below = max(self.clear_below, upper_tail(self.reference_z - CLEAR_SE * error))
        self.warning_inactive = self._warning_inactive()
        self.min_samples = min(min_samples, window)
        self.check_every = check_every
        self.since_check = 0
        self.state = DriftState(brightness_active=self.brightness.active)

    def _warning_inactive(self) -> str | None:
        if not self.score.active:
            return "the score test is inactive (inactive_reason), and the warning reads its window"
        if not math.isfinite(self.reference_z):
            return (
                f"the {self.reference_m} reference scores have no spread (all equal), so no normal tail can be "
                "compared: calibrate or teach on more good frames"
            )
        if self.warn_above <= WARNING_REJECT_RATE:
            return None
        if WARNING_FACTOR * self.target > WARNING_REJECT_RATE:  # the target's floor, not the reference, puts it there
            return (
                f"warn_above {self.warn_above:.3g} is {WARNING_FACTOR:g}x the false-reject target {self.target:g}: "
                f"it would rise only once more than {WARNING_REJECT_RATE:.0%} of good parts are rejected, which the "
                "reject count already shows (the warning is for targets up to "
                f"{WARNING_REJECT_RATE / WARNING_FACTOR:g})"
            )
        return (
            f"warn_above {self.warn_above:.3g} (the reference's z at the threshold {self.threshold:.6g} less "
            f"{RAISE_SE:g} standard errors, with {self.reference_m} reference scores) would rise only once "
            f"{self.warn_above:.0%} of good parts are rejected, expected by {WARNING_REJECT_RATE:.0%}: calibrate or "
            "teach on more good frames"
        )

    def add(self, score: float, brightness: float | None = None) -> str | None:
        if not self.running or not math.isfinite(score):
            return None
        self.score.add(score)
        self.brightness.add(brightness)
        self.since_check += 1
        if self._samples() < self.min_samples or self.since_check < self.check_every:
            return None
        self.since_check = 0
        return self.check()

    def _samples(self) -> int:
        return len(self.score.values) if self.score.active else len(self.brightness.values)

    def check(self) -> str | None:
        state = self.state
        was = state.alarm
        if self.score.active:
            window = self.score.window()
            self.score.check(window)
            state.statistic, state.raise_at, state.clear_at = (
                self.score.statistic,
                self.score.raise_at,
                self.score.clear_at,
            )
            state.score_alarm = self.score.alarm
            state.false_reject_estimate = upper_tail(cut_z(z_above(window, self.threshold)))
            # Not armed, the estimate is still shown, but no warning that could only come far too late.
            if self.warning_inactive is None:
                if state.false_reject_estimate > self.warn_above:
                    state.false_reject_warning = True
                elif state.false_reject_estimate < self.clear_below:
                    state.false_reject_warning = False
        if self.brightness.active and len(self.brightness.values) >= self.min_samples:
            self.brightness.check(self.brightness.window())
            state.brightness_statistic = self.brightness.statistic
            state.brightness_raise_at = self.brightness.raise_at
            state.brightness_clear_at = self.brightness.clear_at
            state.brightness_alarm = self.brightness.alarm
        state.alarm = state.score_alarm or state.brightness_alarm
        if state.alarm != was:
            return "raised" if state.alarm else "cleared"
        return None

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active,
            # Not "reason": the daemon's drift log lines carry the status and a reason of their own.
            "inactive_reason": self.score.inactive,
            "brightness_inactive_reason": self.brightness.inactive,
            **self.state.to_dict(),
            # Counted now, not at the last check: the window fills from the first good frame, checked or not.
            "samples": self._samples(),
            "target": self.target,
            "warn_above": round(self.warn_above, 6),
            "clear_below": round(self.clear_below, 6),
            "false_reject_warning_active": self.warning_inactive is None,
            "false_reject_warning_inactive_reason": self.warning_inactive,
        }


def drift_inputs(thresholds, camera: str) -> MonitorInputs:
    """What `camera`'s monitor under `thresholds` (an engines.bundle.thresholds.Thresholds) judges by: its image
    threshold, its target and its own references where the document holds them, else the pooled ones."""
    from engines.bundle.thresholds import GOOD_BRIGHTNESS, reference_scores, target_for

    # A camera whose override `calibrate --camera` set judges by a threshold chosen for its own target, not the
    # document's global one.
    target = target_for(thresholds, camera)
    rate = DEFAULT_FALSE_REJECT_TARGET
    if isinstance(target, dict) and target.get("kind") == "false_reject" and isinstance(target.get("value"), float):
        rate = target["value"]
    return MonitorInputs(
        reference_scores(thresholds, camera=camera),
        thresholds.for_camera(camera)[0],
        rate,
        reference_scores(thresholds, GOOD_BRIGHTNESS, camera),
    )


def monitor_for(thresholds, camera: str) -> DriftMonitor:
    """The monitor for `camera` under `thresholds` (an engines.bundle.thresholds.Thresholds), on the camera's own
    references where the document holds them, else the pooled ones. A test or warning that cannot run on them is
    logged here, where every new model or thresholds version gets its monitors, as well as shown in
    the status: an alarm switched off must not go unnoticed."""
    inputs = drift_inputs(thresholds, camera)
    monitor = DriftMonitor(
        inputs.reference, inputs.threshold, inputs.target, brightness_reference=inputs.brightness_reference
    )
    # One event for either test, `test` saying which, and a warning for both: where the score reference is small the
    # brightness test is the station's only drift alarm, and one off must show in a log filtered to warnings.
    if not monitor.active:
        log.warning(
            "drift_inactive",
            camera=camera,
            test="score",
            thresholds_version=thresholds.version,
            reason=monitor.score.inactive,
        )
    elif monitor.warning_inactive is not None:  # with the score test off, drift_inactive has said it
        log.warning(
            "false_reject_warning_inactive",
            camera=camera,
            thresholds_version=thresholds.version,
            reason=monitor.warning_inactive,
        )
    if not monitor.brightness.active:
        log.warning(
            "drift_inactive",
            camera=camera,
            test="brightness",
            thresholds_version=thresholds.version,
            reason=monitor.brightness.inactive,
        )
    return monitor
