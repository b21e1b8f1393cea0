"""The drift alarm where the image threshold cuts into the good reference: the window holds only frames judged ok,
so each test must compare it with what an unchanged line's ok frames look like. Seeded stations of normal scores
(the line drawn from the reference's own distribution), through the thresholds document the daemon reads (its
reference thinned to quantiles and rounded), stay quiet with a threshold rejecting up to 40 % of good frames, with
brightness tied to the score too; a moved line still raises; a threshold set just above the top good score, as
calibrate and teach set it, leaves the reference whole."""

from __future__ import annotations

import numpy as np

from engines.bundle import thresholds as T
from inspectd.daemon.drift import cut_reference, monitor_for

STATIONS = 12
FRAMES = 2500  # good frames each station sees, about 250 checks once the window is full
M = 1000  # reference frames: stored as T.REFERENCE_POINTS quantiles


def station(seed: int, kept: float) -> tuple[np.random.Generator, T.Thresholds]:
    """A station's thresholds: M good frames' scores (normal) and mean grey levels (tied to the score, as a scorer
    less robust to lighting makes them), the image threshold at their `kept` quantile."""
    rng = np.random.default_rng(seed)
    scores, brightness = line(rng, M)
    doc = T.first_version(
        float(np.quantile(scores, kept)),
        0.5,
        {T.GOOD_SCORES: T.good_score_reference(scores), T.GOOD_BRIGHTNESS: T.good_score_reference(brightness)},
    )
    return rng, doc


def line(rng: np.random.Generator, n: int, shift: float = 0.0, light: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n good frames: scores N(10 + shift, 1), grey levels 128 + 2 x (score - 10) + N(0, 0.5) + light."""
    scores = rng.normal(10.0 + shift, 1.0, n)
    return scores, 128.0 + 2.0 * (scores - 10.0 - shift) + rng.normal(0.0, 0.5, n) + light


def raised_within(rng: np.random.Generator, doc: T.Thresholds, frames: int, **moved) -> tuple[str | None, dict]:
    """Which test raised first ("score", "brightness" or None) over `frames` good frames of the line, each judged
    by the document's threshold and fed to the monitor only when judged ok; and the monitor's status."""
    monitor = monitor_for(doc, "cam0")
    scores, brightness = line(rng, frames, **moved)
    for score, level in zip(scores.tolist(), brightness.tolist(), strict=True):
        if score < monitor.threshold and monitor.add(score, level) == "raised":
            status = monitor.status()
            return ("score" if status["score_alarm"] else "brightness"), status
    return None, monitor.status()


def test_an_unchanged_line_stays_quiet_when_the_threshold_rejects_a_share_of_good_frames():
    """The window against the reference cut alike: with the whole reference, D tends to the rejected share, which
    raises the alarm on every station from about 15 % on (and never clears it)."""
    for kept in (0.6, 0.8):
        raised = []
        for seed in range(STATIONS):
            rng, doc = station(seed, kept)
            which, status = raised_within(rng, doc, FRAMES)
            assert status["active"] and status["brightness_active"], status
            if which:
                raised.append((seed, which, status["statistic"], status["raise_at"], status["brightness_statistic"]))
        assert raised == [], f"threshold at the good frames' {kept:.0%} quantile: raised at {raised}"


def test_a_moved_line_still_raises_through_the_cut_reference():
    """The cut must not deafen the alarm: with a threshold at the 80 % quantile, a line whose scores moved up by
    their spread (its ok frames' grey levels move with them), or one lit by 1.5 times the grey levels' own spread
    (about 2 %), raises within 1000 good frames on every station."""
    for seed in range(STATIONS // 2):
        rng, doc = station(100 + seed, 0.8)
        assert raised_within(rng, doc, 1000, shift=1.0)[0] is not None, seed
        rng, doc = station(200 + seed, 0.8)
        which, status = raised_within(rng, doc, 1000, light=3.0)
        assert which == "brightness", (seed, status)


def test_a_threshold_just_above_the_top_good_score_leaves_the_reference_whole():
    """calibrate and teach set it a float32 step above the top good score; the document rounds that score to 7
    digits, which may put it at or above the threshold: still one of the frames judged ok."""
    top = float(np.float32(1.2345678))
    threshold = float(np.nextafter(np.float32(top), np.float32(np.inf)))
    stored = T.good_score_reference(np.linspace(0.5, top, 60))
    assert stored["quantiles"][-1] >= threshold  # rounded up past it: the case at hand
    reference = (stored["n"], stored["quantiles"])
    assert cut_reference(reference, threshold) == (reference, 0.0)

    # Below most of it: the frames the kept quantiles stand for, and the rejected share the brightness test allows.
    many = (M, T.good_score_reference(np.random.default_rng(0).normal(10.0, 1.0, M))["quantiles"])
    (m, values), rejected = cut_reference(many, 10.0)
    assert 450 <= m <= 550 and max(values) < 10.0 and abs(rejected - (1 - len(values) / 200)) < 1e-12

    # Below every one: no reference frame judged ok, so no test, and the reason says why.
    doc = T.first_version(0.1, 0.5, {T.GOOD_SCORES: stored})
    monitor = monitor_for(doc, "cam0")
    assert not monitor.active
    assert "holds 0 good frame(s) below the image threshold 0.1" in monitor.status()["inactive_reason"]
