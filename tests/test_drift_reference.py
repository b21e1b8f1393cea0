"""The drift alarm's reference, on thresholds documents alone (no model): a reference too small for the test to ever
raise leaves the monitor inactive with the reason shown and logged, and a thresholds rollback keeps the alarm armed
on the restored version's reference (or the current one's, where that version recorded none)."""

from __future__ import annotations

import numpy as np
from structlog.testing import capture_logs

from engines.bundle import thresholds as T
from inspectd.daemon.drift import can_raise, min_reference, monitor_for


def reference(n: int, seed: int = 0, mean: float = 0.5) -> dict:
    return T.good_score_reference(np.random.default_rng(seed).normal(mean, 0.05, n))


def document(n: int) -> T.Thresholds:
    return T.first_version(
        0.8,
        0.5,
        {
            T.GOOD_SCORES: reference(n),
            T.GOOD_BRIGHTNESS: reference(n, seed=1, mean=120.0),
            "target": {"kind": "false_reject", "value": 0.01},
        },
    )


def test_the_documented_minimum_is_the_drift_tests_own():
    assert T.MIN_REFERENCE == min_reference() == 8
    assert can_raise(8) and not can_raise(7)


def test_a_reference_too_small_to_raise_is_not_armed_and_says_why():
    with capture_logs() as logs:
        monitor = monitor_for(document(6), "cam0")
    status = monitor.status()
    assert status["active"] is False and status["brightness_active"] is False
    assert "6 good frame(s), expected at least 8" in status["inactive_reason"]
    assert [(e["event"], e["test"]) for e in logs] == [("drift_inactive", "score"), ("drift_inactive", "brightness")]
    assert logs[0]["camera"] == "cam0" and logs[0]["log_level"] == logs[1]["log_level"] == "warning"
    assert "expected at least 8" in logs[0]["reason"]
    # Fed frames far off the reference it stays quiet: it is off, and says so, rather than on and deaf.
    assert all(monitor.add(5.0, 250.0) is None for _ in range(400))


def test_with_too_few_reference_scores_the_brightness_test_still_raises_on_its_own():
    """A bundle trained on a few images: one held-out score, every image's brightness. The score test is off; the
    brightness test is not, and a lighting change still raises the alarm."""
    doc = document(8)
    provenance = {**doc.provenance, T.GOOD_SCORES: reference(1), T.GOOD_BRIGHTNESS: reference(40, seed=1, mean=120.0)}
    monitor = monitor_for(T.parse({**doc.to_dict(), "provenance": provenance}), "cam0")
    status = monitor.status()
    assert status["active"] is False and status["brightness_active"] is True, status
    same = np.random.default_rng(2).normal(120.0, 0.05, 300)
    assert all(monitor.add(0.5, float(b)) is None for b in same)  # unchanged lighting: quiet
    events = [monitor.add(0.5, 250.0) for _ in range(300)]
    assert "raised" in events and monitor.status()["brightness_alarm"] and not monitor.status()["score_alarm"]


def test_the_smallest_armed_reference_can_raise():
    monitor = monitor_for(document(8), "cam0")
    assert monitor.status()["active"] is True and monitor.status()["inactive_reason"] is None
    events = [monitor.add(5.0, 250.0) for _ in range(400)]
    assert "raised" in events


def test_a_thresholds_rollback_keeps_the_drift_alarm_armed_on_that_versions_reference():
    v1 = document(60)
    v2 = T.next_version(
        v1,
        image_threshold=0.9,
        provenance={T.GOOD_SCORES: reference(60, seed=5, mean=0.6), "target": {"kind": "false_reject", "value": 0.02}},
    )
    v3 = T.rollback(v2, 1)
    monitor = monitor_for(v3, "cam0")
    status = monitor.status()
    assert status["active"] is True and status["brightness_active"] is True, status
    assert T.reference_scores(v3) == T.reference_scores(v1)
    assert T.reference_scores(v3, T.GOOD_BRIGHTNESS) == T.reference_scores(v1, T.GOOD_BRIGHTNESS)
    assert status["target"] == 0.01 and v3.image_threshold == v1.image_threshold


def test_a_rollback_to_a_version_without_references_keeps_the_current_ones():
    v1 = T.first_version(0.8, 0.5, {})  # written before references were recorded
    v2 = T.next_version(v1, image_threshold=0.9, provenance={T.GOOD_SCORES: reference(60)})
    v3 = T.rollback(v2, 1)
    assert monitor_for(v3, "cam0").status()["active"] is True
    assert T.reference_scores(v3) == T.reference_scores(v2)
    assert v3.provenance["references_from"] == {T.GOOD_SCORES: 2}


def test_a_camera_with_its_own_calibrated_override_warns_against_its_own_target_and_the_others_against_the_global():
    """`calibrate --camera cam3 --target-false-reject 0.05` once wrote 0.05 as the document's target: every camera's
    false-reject warning then rose only at 4 x 0.05."""
    own = {"target": {"kind": "false_reject", "value": 0.05}, "observed": {"false_reject_upper_95": 0.04}}
    doc = T.next_version(
        document(60),
        per_camera={"cam3": {"image_threshold": 0.9}, "cam4": {"pixel_threshold": 0.6}},
        provenance={
            **document(60).provenance,
            # cam4's entry is stale: its override no longer sets the image threshold the target was chosen for.
            T.PER_CAMERA_TARGET: {"cam3": own, "cam4": own},
        },
    )
    assert monitor_for(doc, "cam3").status()["target"] == 0.05
    assert monitor_for(doc, "cam0").status()["target"] == 0.01
    assert monitor_for(doc, "cam4").status()["target"] == 0.01
    # A camera's escape target says nothing of its false-reject rate: the default, not the global 0.01.
    escape = {"target": {"kind": "escape", "value": 0.01}}
    doc = T.parse({**doc.to_dict(), "provenance": {**doc.provenance, T.PER_CAMERA_TARGET: {"cam3": escape}}})
    assert monitor_for(doc, "cam3").status()["target"] == 0.001
