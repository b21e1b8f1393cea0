"""The drift alarm's reference, on thresholds documents alone (no model): a reference too small for the test to ever
raise leaves the monitor inactive with the reason shown and logged, and a thresholds rollback keeps the alarm armed
on the restored version's reference (or the current one's, where that version recorded none)."""

from __future__ import annotations

import json

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


def station(cameras: int) -> T.Thresholds:
    """Version 1 of a station whose good frames were calibrated per camera, as `calibrate --camera` records them."""
    return T.first_version(
        0.8,
        0.5,
        {
            "model_id": "m",
            T.GOOD_SCORES: reference(500),
            T.GOOD_BRIGHTNESS: reference(500, seed=1, mean=120.0),
            T.PER_CAMERA_REFERENCE: {
                f"cam{i}": {
                    T.GOOD_SCORES: reference(500, seed=10 + i),
                    T.GOOD_BRIGHTNESS: reference(500, seed=50 + i, mean=120.0),
                }
                for i in range(cameras)
            },
        },
    )


def test_the_next_version_of_a_long_history_still_fits_a_control_request():
    """Every version copied the drift references of the ones before into its history: on 16 cameras a few versions,
    on 4 about 40, made the next one larger than a control request, and `calibrate --apply` could never send one
    again. Rollbacks back and forth (each carrying every camera's references) fill the history fastest."""
    from inspectd.protocol.control import MAX_REQUEST_BYTES, encode_request

    doc = T.next_version(station(16), image_threshold=0.85, provenance=station(16).provenance)
    while doc.version < 80:
        doc = T.rollback(doc, doc.version - 1)
    assert len(doc.history) == T.MAX_HISTORY
    request = encode_request(
        {"cmd": "set_thresholds", "thresholds": T.next_version(doc, image_threshold=0.82).to_dict()}
    )
    assert len(request) < MAX_REQUEST_BYTES // 2, len(request)
    kept = [h["version"] for h in doc.history if T.PER_CAMERA_REFERENCE in h["provenance"]]
    assert kept == [h["version"] for h in doc.history[: T.KEPT_REFERENCES]]
    # The document as the daemon writes it loads again, references and all.
    again = T.parse(json.loads(T.dumps(doc)))
    assert again == doc and T.reference_scores(again, camera="cam3") == T.reference_scores(station(16), camera="cam3")


def test_a_rollback_to_a_version_whose_references_were_dropped_keeps_the_current_ones():
    v1 = station(2)
    doc = v1
    for threshold in (0.9, 0.91, 0.92, 0.93):  # global recalibrations of the same model: cameras' references carried
        provenance = {"model_id": "m", T.GOOD_SCORES: reference(60, seed=7), T.GOOD_BRIGHTNESS: reference(60, seed=8)}
        provenance[T.PER_CAMERA_REFERENCE] = T.carried_camera_references(doc, provenance)
        doc = T.next_version(doc, image_threshold=threshold, provenance=provenance)
    old = next(h for h in doc.history if h["version"] == 1)
    back = T.rollback(doc, 1)
    assert back.image_threshold == v1.image_threshold
    assert T.reference_scores(back) == T.reference_scores(doc)
    assert T.reference_scores(back, camera="cam1") == T.reference_scores(v1, camera="cam1")
    assert back.provenance["references_from"] == {
        T.GOOD_SCORES: doc.version,
        T.GOOD_BRIGHTNESS: doc.version,
        T.PER_CAMERA_REFERENCE: doc.version,
    }
    assert monitor_for(back, "cam1").status()["active"] is True
    assert sorted(old["provenance"][T.REFERENCES_DROPPED]) == sorted(T.REFERENCES)
    assert T.REFERENCES_DROPPED in back.provenance["rolled_back_provenance"]
    # What the range check reads of a dropped reference stays: the good scores' lowest and highest.
    lows = [min(reference(n, seed)["quantiles"]) for n, seed in ((500, 0), (60, 7))]
    assert old["provenance"][T.GOOD_SCORES]["min"] == lows[0]
    assert T.calibrated_range(doc, "image")[0] == min(lows)
