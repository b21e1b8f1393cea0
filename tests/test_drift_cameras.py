"""The drift alarm per camera: each camera's monitor reads its own references where the thresholds document holds
them (a station whose cameras see the line under different light stays quiet on an unchanged line), the pooled ones
where it does not; `inspectd calibrate --camera` records them from that camera's --good images, a new model drops
them. And the false-reject warning, like the drift test, is not shown armed where it could rise only far too late."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
from structlog.testing import capture_logs

from engines.bundle import thresholds as T
from inspectd.daemon.drift import DriftMonitor, monitor_for
from test_calibrate import bundle, calibrate, data, trained  # noqa: F401 (fixtures: a tiny real bundle)

BRIGHT, DARK = 120.0, 84.0  # two cameras' mean grey levels: the same line, the second under 0.7x the light
SPREAD = 1.5


def view(level: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, mean grey levels) of n good frames of a camera whose frames average `level`."""
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 0.1, n), rng.normal(level, SPREAD, n)


def station_document() -> T.Thresholds:
    """Thresholds set on 100 good frames of each camera: pooled references over all 200, and each camera's own, as
    a teach on frames that know their camera records them (written with the literal key a reader must find)."""
    bright, dark = view(BRIGHT, 100, 1), view(DARK, 100, 2)
    return T.first_version(
        2.0,
        0.5,
        {
            "model_id": "m-1",
            T.GOOD_SCORES: T.good_score_reference(np.concatenate([bright[0], dark[0]])),
            T.GOOD_BRIGHTNESS: T.good_score_reference(np.concatenate([bright[1], dark[1]])),
            "per_camera_reference": {
                camera: {"good_scores": T.good_score_reference(s), "good_brightness": T.good_score_reference(b)}
                for camera, (s, b) in (("cam0", bright), ("cam1", dark))
            },
        },
    )


def feed(monitor: DriftMonitor, level: float, n: int, seed: int) -> list[str]:
    scores, brightness = view(level, n, seed)
    return [e for e in (monitor.add(float(s), float(b)) for s, b in zip(scores, brightness, strict=True)) if e]


def test_each_camera_on_its_own_reference_stays_quiet_on_an_unchanged_line_and_raises_on_its_own_change():
    doc = station_document()
    for camera, level in (("cam0", BRIGHT), ("cam1", DARK)):
        monitor = monitor_for(doc, camera)
        assert feed(monitor, level, 400, 10) == [], (camera, monitor.status())
        assert monitor.brightness.m == 100 and monitor.score.m == 100, camera
        assert not monitor.status()["alarm"] and monitor.status()["brightness_statistic"] is not None
        # Armed on its own reference: a tenth less light on this camera alone raises it.
        assert feed(monitor, level * 0.9, 200, 11)[:1] == ["raised"], camera
        assert monitor.status()["brightness_alarm"]


def test_a_camera_without_its_own_reference_reads_the_pooled_one():
    doc = station_document()
    assert T.reference_scores(doc, camera="cam2") == T.reference_scores(doc)
    assert T.reference_scores(doc, T.GOOD_BRIGHTNESS, "cam2") == T.reference_scores(doc, T.GOOD_BRIGHTNESS)
    assert T.reference_scores(doc, T.GOOD_BRIGHTNESS, "cam1") != T.reference_scores(doc, T.GOOD_BRIGHTNESS)
    pooled = monitor_for(doc, "cam2")
    assert pooled.brightness.m == 200
    # The pooled reference of two views: one camera's frames sit half off it, as every camera's did before.
    assert feed(pooled, DARK, 400, 10)[:1] == ["raised"]
    # A document from before per-camera references: every camera on the pooled ones, as before.
    old = T.parse(
        {**doc.to_dict(), "provenance": {k: v for k, v in doc.provenance.items() if k != "per_camera_reference"}}
    )
    assert monitor_for(old, "cam1").brightness.m == 200 and feed(monitor_for(old, "cam0"), 300.0, 200, 3)


def test_teachs_helper_records_each_camera_with_enough_frames_and_a_new_model_drops_them():
    bright, dark = view(BRIGHT, 30, 1), view(DARK, 5, 2)
    references = T.camera_references({"cam0": bright[0], "cam1": dark[0]}, {"cam0": bright[1], "cam1": dark[1]})
    # cam1's 5 frames could never raise: left out, it stays on the pooled reference rather than off.
    assert set(references) == {"cam0"} and references["cam0"][T.GOOD_BRIGHTNESS]["n"] == 30
    assert T.camera_reference_warning("cam1", 5, "held-out frames").startswith("WARNING: 5 held-out frames of camera")
    assert T.camera_reference_warning("cam0", 30, "held-out frames") is None

    doc = station_document()
    same = T.next_version(doc, image_threshold=2.1, provenance={"model_id": "m-1"})
    assert T.carried_camera_references(doc, same.provenance) == doc.provenance[T.PER_CAMERA_REFERENCE]
    assert T.carried_camera_references(doc, {"model_id": "m-2"}) == {}  # teach: another scorer's scores
    assert T.carried_camera_references(doc, {"model_id": "m-1", T.ENGINE_PRECISION: "fp16"}) == {}
    taught = T.next_version(doc, provenance={"model_id": "m-2", T.GOOD_SCORES: doc.provenance[T.GOOD_SCORES]})
    assert monitor_for(taught, "cam1").score.reference.tolist() == T.reference_scores(doc)[1]  # type: ignore[index]

    # A thresholds rollback restores the version's own; to a version set before them, it keeps the current ones
    # (the same model).
    v2 = T.next_version(doc, image_threshold=2.2, provenance=dict(doc.provenance))
    back = T.rollback(T.next_version(v2, provenance={"model_id": "m-1"}), 2)
    assert back.provenance[T.PER_CAMERA_REFERENCE] == doc.provenance[T.PER_CAMERA_REFERENCE]
    bare = T.first_version(2.0, 0.5, {"model_id": "m-1"})
    later = T.next_version(bare, provenance=dict(doc.provenance))
    back = T.rollback(later, 1)
    assert back.provenance[T.PER_CAMERA_REFERENCE] == doc.provenance[T.PER_CAMERA_REFERENCE]
    assert back.provenance["references_from"][T.PER_CAMERA_REFERENCE] == later.version


def test_calibrate_camera_records_that_cameras_references_from_its_good_images(bundle, data, capsys, tmp_path):  # noqa: F811
    """`--camera cam7` on images of cam7's darker view: cam7's monitor reads references from them, cam0's the pooled
    ones; a later global calibration of the same model keeps cam7's."""
    from engines.bundle.store import load_bundle

    plain, dark = tmp_path / "plain", tmp_path / "dark"
    plain.mkdir()
    dark.mkdir()
    images = [p for split in ("train", "test") for p in sorted((data / split / "good").glob("*.*"))]
    for i, path in enumerate(images):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(plain / f"{i:03d}.png"), image)
        cv2.imwrite(str(dark / f"{i:03d}.png"), (image * 0.6).astype(image.dtype))
    assert calibrate(capsys, bundle, "--good", plain, "--target-false-reject", "0.2")[0] == 0
    pooled = load_bundle(bundle).thresholds()
    code, out, err = calibrate(capsys, bundle, "--good", dark, "--target-false-reject", "0.2", "--camera", "cam7")
    assert code == 0, err
    own = load_bundle(bundle).thresholds()
    assert set(own.provenance[T.PER_CAMERA_REFERENCE]) == {"cam7"}
    assert own.provenance[T.GOOD_BRIGHTNESS] == pooled.provenance[T.GOOD_BRIGHTNESS]
    cam7 = T.reference_scores(own, T.GOOD_BRIGHTNESS, "cam7")
    assert cam7 is not None and cam7[0] == len(images)
    assert np.mean(cam7[1]) < 0.8 * np.mean(T.reference_scores(own, T.GOOD_BRIGHTNESS)[1])  # type: ignore[index]
    assert monitor_for(own, "cam7").brightness.m == len(images)
    on_pooled = monitor_for(own, "cam0").brightness
    assert on_pooled.m == len(images)
    assert on_pooled.reference.tolist() == sorted(pooled.provenance[T.GOOD_BRIGHTNESS]["quantiles"])

    assert calibrate(capsys, bundle, "--good", plain, "--target-false-reject", "0.2")[0] == 0
    again = load_bundle(bundle).thresholds()
    assert again.provenance[T.PER_CAMERA_REFERENCE] == own.provenance[T.PER_CAMERA_REFERENCE]

    # Too few images of cam7 for a reference of its own: its earlier one goes too, and it says so.
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(dark.glob("*.png"))[:5]:
        shutil.copy(path, few / path.name)
    code, out, err = calibrate(capsys, bundle, "--good", few, "--target-false-reject", "0.5", "--camera", "cam7")
    assert code == 0, err
    assert "WARNING: 5 good images of camera cam7 are too few for its own drift reference" in out, out
    assert T.PER_CAMERA_REFERENCE not in load_bundle(bundle).thresholds().provenance


def small_reference_monitor(n: int, seed: int = 1) -> DriftMonitor:
    """As teach sets it on n held-out scores: the threshold just above the largest, those scores the reference."""
    reference = np.sort(np.random.default_rng(seed).normal(0.0, 1.0, n))
    return DriftMonitor((n, reference.tolist()), float(np.nextafter(reference[-1], np.inf)), 0.001)


def test_a_false_reject_warning_that_could_rise_only_far_too_late_is_not_shown_armed():
    monitor = small_reference_monitor(30)
    status = monitor.status()
    assert status["active"] is True and status["warn_above"] > 0.09, status
    assert status["false_reject_warning_active"] is False
    assert "30 reference scores" in status["false_reject_warning_inactive_reason"]
    # Most good parts rejected: the ok frames it is fed never show it, and no warning pretends otherwise.
    shifted = np.random.default_rng(5).normal(1.5, 1.0, 3000)
    for score in shifted[shifted < monitor.threshold]:
        monitor.add(float(score))
    assert monitor.status()["false_reject_estimate"] is not None and not monitor.status()["false_reject_warning"]

    with capture_logs() as logs:
        doc = T.first_version(monitor.threshold, 0.5, {T.GOOD_SCORES: T.good_score_reference(monitor.score.reference)})
        monitor_for(doc, "cam3")
    warned = [e for e in logs if e["event"] == "false_reject_warning_inactive"]
    assert len(warned) == 1 and warned[0]["camera"] == "cam3" and "rise" in warned[0]["reason"], logs


def test_a_false_reject_warning_unarmed_by_a_lenient_target_says_the_target_is_why():
    """4x a target above 6.25 % is more than a quarter of good parts: no number of reference scores arms that."""
    reference = np.sort(np.random.default_rng(3).normal(0.0, 1.0, 3000))
    monitor = DriftMonitor((3000, reference.tolist()), float(reference[-100]), 0.1)
    reason = monitor.status()["false_reject_warning_inactive_reason"]
    assert "is 4x the false-reject target 0.1" in reason and "more good frames" not in reason, reason


def test_a_false_reject_warning_on_a_large_reference_is_armed_and_rises():
    monitor = small_reference_monitor(300)
    status = monitor.status()
    assert status["false_reject_warning_active"] is True and status["false_reject_warning_inactive_reason"] is None
    shifted = np.random.default_rng(6).normal(1.0, 1.0, 3000)
    for score in shifted[shifted < monitor.threshold]:
        monitor.add(float(score))
    assert monitor.status()["false_reject_warning"], monitor.status()
    # Without a score test there is no window to estimate on: not armed either, and said why.
    brightness_only = DriftMonitor(None, 1.0, brightness_reference=(50, list(range(50))))
    assert brightness_only.status()["false_reject_warning_active"] is False
    assert "score test is inactive" in brightness_only.status()["false_reject_warning_inactive_reason"]


def test_the_false_reject_warning_stays_down_on_unchanged_lines_and_its_estimate_follows_a_shifted_one():
    # Thirty stations taught on 100 held-out scores, each line unchanged: the reference's own error is drawn once per
    # station, so a warning set at a fixed multiple of the reference's tail raised on several of them.
    raised, unarmed = [], []
    for seed in range(30):
        monitor = small_reference_monitor(100, seed)
        if not monitor.status()["false_reject_warning_active"]:
            unarmed.append(seed)
        line = np.random.default_rng(100 + seed).normal(0.0, 1.0, 4000)
        for score in line[line < monitor.threshold]:
            monitor.add(float(score))
            if monitor.state.false_reject_warning:
                raised.append((seed, monitor.status()))
                break
    assert raised == [] and unarmed == [], (raised, unarmed)
    # The same stations with the line moved up by one and a half standard deviations (3 to 32 % of good parts
    # rejected): the estimate, made on the frames judged ok alone, is read through the threshold's cut into the share
    # now rejected, and the warning is up wherever that share is well above warn_above.
    for seed in range(10):
        monitor = small_reference_monitor(100, seed)
        line = np.random.default_rng(200 + seed).normal(1.5, 1.0, 3000)
        for score in line[line < monitor.threshold][-200:]:
            monitor.add(float(score))
        rejected = float(np.mean(line >= monitor.threshold))
        status = monitor.status()
        if rejected > 1.5 * status["warn_above"]:
            assert status["false_reject_warning"], (seed, rejected, status)
        elif rejected < status["warn_above"] / 1.5:
            assert not status["false_reject_warning"], (seed, rejected, status)
        assert rejected / 1.7 < status["false_reject_estimate"] < rejected * 1.7, (seed, rejected, status)
        assert status["clear_below"] < status["warn_above"]


def test_a_new_reference_that_drops_a_raised_false_reject_warning_logs_its_end(tmp_path):
    """An in-process daemon whose good parts creep towards the threshold: the false-reject warning (the PLC bit
    false_reject_warning) rises, logged. A thresholds version with another image threshold starts a fresh monitor and
    the bit drops: the log says so with false_reject_warning_cleared, reason "new reference", as it says
    drift_cleared for the alarm, so the log never shows a warning raised that was never cleared."""
    import time

    from daemon_harness import in_process_config
    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import Judged
    from inspectd.daemon.service import Daemon
    from station_model import THRESHOLD, write_grey_bundle

    grey = write_grey_bundle(tmp_path / "bundle")
    (tmp_path / "in").mkdir()
    config = in_process_config(tmp_path, grey, {"kind": "folder", "path": str(tmp_path / "in"), "poll_ms": 20})
    rng = np.random.default_rng(4)
    with capture_logs() as logs:
        daemon = Daemon(config)
        try:
            daemon.start()
            state = daemon.stage.state
            referenced = T.next_version(
                state.thresholds,
                provenance={
                    **state.thresholds.provenance,
                    T.GOOD_SCORES: T.good_score_reference(rng.normal(0.3, 0.03, 500)),
                },
            )
            daemon.set_thresholds(referenced.to_dict(), force=True)
            seq = 0
            for score in rng.normal(0.44, 0.03, 400):  # the line moves up: a good share of good parts now rejected
                if score < THRESHOLD:  # the window holds the frames judged ok only
                    frame = Frame("cam0", seq, f"{seq:06d}", time.time(), None)
                    daemon._on_published(
                        Judged(frame, "ok", float(score), THRESHOLD, state.model_id, referenced.version, [], None), 1.0
                    )
                    seq += 1
            assert daemon.drift_status("cam0")["false_reject_warning"], daemon.drift_status("cam0")
            moved = T.next_version(referenced, image_threshold=THRESHOLD * 1.2, provenance=dict(referenced.provenance))
            daemon.set_thresholds(moved.to_dict(), force=True)
            assert not daemon.drift_status("cam0")["false_reject_warning"]
        finally:
            daemon.shutdown()
    raised = [e for e in logs if e["event"] == "false_reject_warning_raised"]
    cleared = [e for e in logs if e["event"] == "false_reject_warning_cleared"]
    assert len(raised) == 1 and raised[0]["thresholds_version"] == referenced.version, raised
    assert [(e["camera"], e.get("reason"), e["thresholds_version"]) for e in cleared] == [
        ("cam0", "new reference", moved.version)
    ], cleared
