"""Threshold calibration: the statistics on synthetic score arrays, then `inspectd calibrate` on a tiny real bundle
(trained on magnetic-tile images at 64x64) with versions, rollback, refusals, and --apply to a running daemon."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibration.calibrate import (
    CalibrationError,
    confusion,
    pixel_threshold_for_f1,
    pixel_threshold_for_fpr,
    threshold_for_escape,
    threshold_for_f1,
    threshold_for_false_reject,
)
from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import describe_score_share
from engines.bundle.thresholds import binom_cdf, clopper_pearson_upper, frames_needed
from engines.training.metrics import PixelHistograms
from inspectd.cli import main
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


# --- statistics -------------------------------------------------------------------------------------------------


def test_clopper_pearson_bound_matches_scipy_and_the_zero_event_formula():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 50), (1, 100), (3, 1000), (10, 500), (948, 100_000)]:
        expected = stats.beta.ppf(0.95, k + 1, n - k)
        assert clopper_pearson_upper(k, n) == pytest.approx(expected, rel=1e-6)
    assert clopper_pearson_upper(0, 2995) == pytest.approx(1 - 0.05 ** (1 / 2995))
    assert binom_cdf(5, 1000, 0.004) == pytest.approx(stats.binom.cdf(5, 1000, 0.004), rel=1e-9)


def test_frames_needed_is_the_zero_exceedance_rule():
    assert frames_needed(0.001) == math.ceil(math.log(0.05) / math.log(1 - 0.001)) == 2995
    assert frames_needed(0.01) == 299
    # With that many frames and none rejected, the bound just meets the target; one frame fewer does not.
    assert clopper_pearson_upper(0, 2995) <= 0.001 < clopper_pearson_upper(0, 2994)


def test_false_reject_threshold_is_an_order_statistic_with_a_confident_bound():
    scores = np.random.default_rng(0).normal(size=20_000).astype(np.float32)
    choice = threshold_for_false_reject(scores, 0.01)
    ordered = np.sort(scores)
    # Just above the (n-k)-th lowest score: exactly k good frames at or above it.
    assert ordered[-choice.allowed - 1] < choice.threshold <= ordered[-choice.allowed]
    assert choice.exceedances == choice.allowed == int(np.count_nonzero(scores >= choice.threshold))
    assert choice.enough and choice.upper_bound <= 0.01
    # One more allowed exceedance would break the 95 % bound: the choice is the most permissive that holds.
    assert clopper_pearson_upper(choice.allowed + 1, scores.size) > 0.01
    assert choice.allowed < 0.01 * scores.size  # stricter than the plain quantile
    assert choice.warning(0.01) is None


def test_too_few_good_frames_warn_and_the_threshold_sits_above_every_good_score():
    scores = np.random.default_rng(1).random(500)
    choice = threshold_for_false_reject(scores, 0.001)
    assert choice.allowed == 0 and choice.exceedances == 0
    assert choice.threshold > scores.max()
    assert not choice.enough
    assert choice.upper_bound == pytest.approx(1 - 0.05 ** (1 / 500))
    warning = choice.warning(0.001)
    assert warning.startswith("WARNING: 500 good frames") and ">= 2995 good frames" in warning


def test_a_float32_score_equal_to_the_highest_good_is_not_flagged():
    scores = np.array([0.1, 0.25, 0.3], np.float32)
    choice = threshold_for_false_reject(scores, 0.01)
    assert float(np.float32(0.3)) < choice.threshold
    assert choice.threshold - float(np.float32(0.3)) < 1e-7


def test_escape_threshold_lets_at_most_the_target_share_of_defects_pass_with_a_confident_bound():
    defects = np.arange(100, dtype=np.float64) / 100  # 0.00 .. 0.99
    choice = threshold_for_escape(defects, 0.05)
    # The plain quantile would let 5 of 100 pass, whose 95 % bound (0.10) is twice the target; 1 of 100 is the most
    # whose bound (0.047) still meets it.
    assert clopper_pearson_upper(1, 100) <= 0.05 < clopper_pearson_upper(2, 100)
    assert choice.threshold == 0.01 and choice.allowed == choice.escapes == 1
    assert np.count_nonzero(defects < choice.threshold) == 1
    assert choice.enough and choice.warning(0.05) is None
    # 100 defects cannot support 0.1 %: none may pass (the lowest defect score), and the choice says so.
    scarce = threshold_for_escape(defects, 0.001)
    assert scarce.threshold == 0.0 and scarce.escapes == 0 and not scarce.enough
    assert scarce.needed == frames_needed(0.001) == 2995
    warning = scarce.warning(0.001)
    assert warning.startswith("WARNING: 100 defective frames support an escape rate of at most 0.0295")
    assert warning.endswith("the target needs >= 2995 defective frames with none escaping")
    # Ties at the threshold are flagged: they lower the escapes, never raise them.
    tied = threshold_for_escape(np.array([0.2] * 400), 0.01)
    assert tied.threshold == 0.2 and tied.escapes == 0 and tied.enough
    with pytest.raises(CalibrationError, match="--target-escape: 1.5, expected a rate"):
        threshold_for_escape(defects, 1.5)


def test_f1_max_and_the_confusion_matrix():
    good = np.array([0.1, 0.2, 0.3, 0.4, 0.6])
    defect = np.array([0.5, 0.7, 0.8, 0.15])
    f1, threshold = threshold_for_f1(good, defect)
    # At 0.5: 3 of 4 defects flagged, 1 good (0.6) flagged: F1 = 6 / (6 + 1 + 1) = 0.75; at 0.15 and 0.7: 2/3.
    assert threshold == 0.5 and f1 == pytest.approx(0.75)
    matrix = confusion(good, defect, threshold)
    assert (matrix.true_defect, matrix.escaped, matrix.false_reject, matrix.true_ok) == (3, 1, 1, 4)
    table = matrix.table()
    assert "escape rate 0.2500" in table and "false-reject rate 0.2000" in table


def test_pixel_thresholds_from_good_pixels_and_from_masks():
    rng = np.random.default_rng(2)
    good = PixelHistograms()
    maps = [rng.random((64, 64)).astype(np.float32) for _ in range(4)]
    for m in maps:
        good.add(m)
    threshold = pixel_threshold_for_fpr(good, 0.01)
    share = np.mean([np.mean(m >= threshold) for m in maps])
    assert share <= 0.01 and share > 0.009  # the quantile, to histogram-bin precision
    masked = PixelHistograms()
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True
    defect_map = rng.random((64, 64)).astype(np.float32) * 0.5
    defect_map[mask] = 0.8 + rng.random(100).astype(np.float32) * 0.2
    masked.add(defect_map, mask)
    f1, pixel = pixel_threshold_for_f1(masked)
    assert f1 == 1.0
    assert np.array_equal(defect_map >= pixel, mask)  # the threshold reproduces the ground truth exactly


def test_a_pixel_threshold_on_maps_far_from_zero_is_the_quantile_not_a_bin_ten_times_the_spread_wide():
    """A Gaussian scorer's maps sit near sqrt(D) with a small spread. Keyed on the raw value, a bin at 1000 is 0.49
    wide, ten times the spread, and the threshold's false-positive share lands anywhere; keyed on the first map's
    median (as calibrate and teach make them) it is the quantile, read back in the maps' own values."""
    rng = np.random.default_rng(3)
    good = PixelHistograms(reference=None)
    maps = [(1000.0 + rng.normal(0, 0.05, (64, 64))).astype(np.float32) for _ in range(4)]
    for m in maps:
        good.add(m)
    threshold = pixel_threshold_for_fpr(good, 0.01)
    share = np.mean([np.mean(m >= threshold) for m in maps])
    assert share <= 0.01 and share > 0.009, (threshold, share)


# --- the command on a real bundle ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tiny_dataset import make_tiny_mvtec

    return make_tiny_mvtec(tmp_path_factory.mktemp("data"), n_train=8, n_test_good=6, n_test_defect=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    from engines.training.train import Progress, train_bundle

    out = tmp_path_factory.mktemp("bundles") / "frozen"
    train_bundle(data / "train" / "good", out, size=(64, 64), k=2, holdout=0.0, progress=Progress(enabled=False))
    return out


@pytest.fixture
def bundle(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "bundle"))


def calibrate(capsys, *args) -> tuple[int, str, str]:
    code = main(["calibrate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_good_only_calibration_writes_the_next_version_with_provenance(bundle, data, capsys):
    from engines.bundle.store import load_bundle
    from engines.training.evaluate import score_images

    before = load_bundle(bundle).thresholds()
    code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.01", "--pixel")
    assert code == 0, err
    after = load_bundle(bundle).thresholds()  # load_bundle verifies the rewritten file's checksum
    assert after.version == before.version + 1
    assert after.history[0]["version"] == before.version
    good = [s.score for s in score_images(bundle, sorted((data / "test" / "good").iterdir()))]
    assert after.image_threshold > max(good)  # 6 frames cannot support 1 %: zero exceedances allowed
    assert after.pixel_threshold != before.pixel_threshold
    assert "WARNING: 6 good frames" in out and "needs >= 299 good frames" in out
    prov = after.provenance
    assert prov["n_good"] == 6 and prov["good_dir"] == str(data.resolve())
    assert prov["target"]["kind"] == "false_reject" and prov["target"]["value"] == 0.01
    assert prov["tool"].startswith("inspectd calibrate") and prov["time"]
    assert prov["engine_precision"] == "fp32"
    assert "--good frames are frames" not in out  # test/good of the root: held out, no WARNING
    # A WARNING of the pixel threshold above the image one may follow it.
    assert prov["observed"]["warning"].startswith("too few good frames for the target")
    # The drift alarm's references: the same good frames' scores, and their grey level as the model sees them.
    from engines.bundle.thresholds import GOOD_BRIGHTNESS, reference_scores
    from engines.data.images import load_image
    from engines.runtime.preprocess import fit_frame, mean_level

    assert reference_scores(after) == (6, sorted(float(f"{score:.7g}") for score in good))
    shape, policy = load_bundle(bundle).input_shape, load_bundle(bundle).resize_policy
    paths = sorted((data / "test" / "good").iterdir())
    levels = [mean_level(fit_frame(load_image(path), shape, policy)[0]) for path in paths]
    assert reference_scores(after, GOOD_BRIGHTNESS) == (6, sorted(float(f"{v:.7g}") for v in levels))


def test_defects_give_escape_and_f1_thresholds_with_a_confusion_matrix(bundle, data, capsys):
    from engines.bundle.store import load_bundle

    code, out, err = calibrate(
        capsys, bundle, "--good", data, "--defective", data / "test" / "blowhole", "--max-f1", "--pixel"
    )
    assert code == 0, err
    assert "confusion matrix at this threshold" in out and "judged defect" in out
    assert "pixel F1-max" in out  # blowhole has ground-truth masks
    doc = load_bundle(bundle).thresholds()
    assert doc.provenance["target"]["kind"] == "max_f1" and doc.provenance["n_defective"] == 4
    matrix = doc.provenance["observed"]["confusion"]
    assert matrix["true_defect"] + matrix["escaped"] == 4 and matrix["false_reject"] + matrix["true_ok"] == 6

    code, out, err = calibrate(capsys, bundle, "--good", data, "--defective", data, "--target-escape", "0.25")
    assert code == 0, err
    observed = load_bundle(bundle).thresholds().provenance["observed"]
    # 4 defects support no escape rate below 0.53 (95 %): none may pass, and the report says how many 0.25 needs.
    assert observed["confusion"]["escaped"] == 0
    assert "WARNING: 4 defective frames support an escape rate of at most 0.5271" in out, out
    assert "the target needs >= 11 defective frames with none escaping" in out
    assert observed["warning"].startswith("too few defective frames for the target")
    assert observed["escape_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 4))


def test_masks_beside_their_images_are_refused_in_a_type_folder_given_directly_and_only_where_read(
    bundle, data, tmp_path, capsys
):
    """`--defective ROOT/test/<type>` scored each mask kept beside its image as one more defect (8 defects for 4),
    which moved the --max-f1 threshold and the escape rate, while `--defective ROOT` refused the same folder; and
    `--defective ROOT` refused a mask kept in test/good, which it does not read (--good does)."""
    from engines.bundle.store import load_bundle

    version = load_bundle(bundle).thresholds().version
    copy = Path(shutil.copytree(data, tmp_path / "set"))
    blowhole = copy / "test" / "blowhole"
    for mask in sorted((copy / "ground_truth" / "blowhole").iterdir()):
        mask.rename(blowhole / mask.name.replace("_mask", "_GT"))
    first = sorted(blowhole.glob("*_GT.png"))[0]
    image = blowhole / (first.stem.removesuffix("_GT") + ".jpg")
    expected = (
        f"inspectd calibrate: {first}: a mask beside its image {image.name}, expected masks in "
        "ground_truth/blowhole/<name>_mask.png and only images in test/blowhole/\n"
    )
    for defective in (blowhole, copy):
        code, out, err = calibrate(capsys, bundle, "--good", data, "--defective", defective, "--max-f1", "--dry-run")
        assert (code, err) == (2, expected), (defective, out)

    # A mask kept in test/good: refused where --good reads it, not where only --defective names the root.
    good = copy / "test" / "good"
    kept = sorted(good.iterdir())[0]
    shutil.rmtree(copy / "test" / "blowhole")
    shutil.copytree(data / "test" / "blowhole", copy / "test" / "blowhole")
    shutil.copy(kept, good / f"{kept.stem}_mask.png")
    code, out, err = calibrate(capsys, bundle, "--good", data, "--defective", copy, "--max-f1", "--dry-run")
    assert code == 0, err
    code, out, err = calibrate(capsys, bundle, "--good", copy, "--max-f1", "--defective", copy, "--dry-run")
    assert (code, err) == (
        2,
        f"inspectd calibrate: {good / (kept.stem + '_mask.png')}: a mask beside its image {kept.name}, expected "
        "masks in ground_truth/good/<name>_mask.png and only images in test/good/\n",
    )
    assert load_bundle(bundle).thresholds().version == version


def test_escape_and_f1_targets_are_refused_without_defects(bundle, data, capsys):
    from engines.bundle.store import load_bundle

    version = load_bundle(bundle).thresholds().version
    for flags in (["--target-escape", "0.01"], ["--max-f1"]):
        code, out, err = calibrate(capsys, bundle, "--good", data, *flags)
        assert code == 2
        assert f"{flags[0]} needs labelled defective images" in err and "flag everything" in err
        assert len(err.strip().splitlines()) == 1
    assert load_bundle(bundle).thresholds().version == version


def test_camera_override_then_rollback_restores_values_at_a_higher_version(bundle, data, capsys):
    from engines.bundle.store import load_bundle

    v1 = load_bundle(bundle).thresholds()
    assert calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2")[0] == 0
    v2 = load_bundle(bundle).thresholds()
    assert calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.7", "--camera", "cam7")[0] == 0
    v3 = load_bundle(bundle).thresholds()
    assert v3.version == v2.version + 1 == v1.version + 2
    assert v3.image_threshold == v2.image_threshold  # the global value is untouched
    assert v3.for_camera("cam7")[0] < v2.image_threshold  # 70 % allows one of 6 good frames above it: lower
    assert v3.for_camera("cam0") == (v2.image_threshold, v2.pixel_threshold)
    # One camera's images do not replace the drift references of every camera.
    assert v3.provenance["good_scores"] == v2.provenance["good_scores"]
    assert v3.provenance["good_brightness"] == v2.provenance["good_brightness"]

    code, out, err = calibrate(capsys, bundle, "--rollback", v1.version)
    assert code == 0, err
    v4 = load_bundle(bundle).thresholds()
    assert v4.version == v3.version + 1
    assert (v4.image_threshold, v4.pixel_threshold, v4.per_camera) == (
        v1.image_threshold,
        v1.pixel_threshold,
        v1.per_camera,
    )
    assert v4.provenance["rollback_to"] == v1.version

    code, out, err = calibrate(capsys, bundle, "--rollback", 99)
    assert code == 2 and "no version 99 in history" in err
    code, out, err = calibrate(capsys, bundle, "--good", data, "--dry-run")
    assert code == 0 and f"dry run: version {v4.version + 1} not written" in out
    assert load_bundle(bundle).thresholds().version == v4.version


def test_a_camera_recalibration_keeps_its_pixel_override_and_every_other_cameras_drift_target(bundle, data, capsys):
    """`--camera cam2` without --pixel once dropped cam2's pixel override, and its target became the document's, which
    every camera's drift false-reject warning reads: a lenient camera switched the warning off on all of them."""
    from engines.bundle.store import load_bundle
    from inspectd.daemon.drift import monitor_for

    trained = load_bundle(bundle).thresholds()
    v = thresholds_doc.next_version(
        trained,
        per_camera={"cam2": {"image_threshold": 5.0, "pixel_threshold": 0.7}},
        provenance={**trained.provenance, "target": {"kind": "false_reject", "value": 0.002}, "observed": {"x": 1}},
    )
    load_bundle(bundle).replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(v))

    code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--camera", "cam2")
    assert code == 0, err
    new = load_bundle(bundle).thresholds()
    assert new.for_camera("cam2")[1] == 0.7 and new.for_camera("cam2")[0] != 5.0
    assert new.provenance["target"] == v.provenance["target"] and new.provenance["observed"] == {"x": 1}
    own = new.provenance[thresholds_doc.PER_CAMERA_TARGET]["cam2"]
    assert own["target"] == {"kind": "false_reject", "value": 0.2} and own["observed"]["false_reject_upper_95"] > 0
    assert monitor_for(new, "cam0").target == 0.002 and monitor_for(new, "cam2").target == 0.2

    # A global calibration carries cam2's override, and with it what it was set on.
    assert calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.01")[0] == 0
    glob = load_bundle(bundle).thresholds()
    assert glob.per_camera == new.per_camera and glob.provenance[thresholds_doc.PER_CAMERA_TARGET] == {"cam2": own}
    assert monitor_for(glob, "cam0").target == 0.01 and monitor_for(glob, "cam2").target == 0.2

    # A rollback restores the targets with the overrides: v's cam2 override was set on v's global target.
    assert calibrate(capsys, bundle, "--rollback", v.version)[0] == 0
    back = load_bundle(bundle).thresholds()
    assert thresholds_doc.PER_CAMERA_TARGET not in back.provenance
    assert monitor_for(back, "cam2").target == 0.002
    assert calibrate(capsys, bundle, "--rollback", new.version)[0] == 0
    assert monitor_for(load_bundle(bundle).thresholds(), "cam2").target == 0.2


def test_the_training_frames_given_as_good_are_warned_of_however_they_are_named(bundle, data, tmp_path, capsys):
    """The bundle was fitted on data/train/good (its manifest's training.data is the root): given as --good, by its
    path or through a link to it, a WARNING says the threshold comes out too low; held-out frames (the root's
    test/good) get none."""
    train_good = data / "train" / "good"
    link = tmp_path / "frames"
    link.symlink_to(train_good)
    for given in (train_good, link):
        code, out, err = calibrate(capsys, bundle, "--good", given, "--target-false-reject", "0.2", "--dry-run")
        assert code == 0, err
        warning = [line for line in out.splitlines() if line.startswith("WARNING: ") and "--good" in line]
        assert warning == [
            f"WARNING: 8 of 8 --good frames are frames {bundle} was trained on ({train_good.resolve()}): a model "
            "scores the frames it was fitted on lower than new ones, so a threshold set on them comes out too low "
            "and rejects good parts; calibrate on held-out frames (an MVTec root's test/good, or frames captured "
            "since)"
        ], out
    code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--dry-run")
    assert code == 0 and "--good frames are frames" not in out, out


@pytest.fixture(scope="module")
def taught(tmp_path_factory, trained, data) -> tuple[Path, Path]:
    """(the trained bundle taught on a line's 8 frames, 2 of them held out; those frames' folder)."""
    import io

    from calibration.teach import teach

    root = tmp_path_factory.mktemp("taught")
    line = Path(shutil.copytree(data / "train" / "good", root / "line"))
    bundle = Path(shutil.copytree(trained, root / "bundle"))
    teach(bundle, line, holdout=0.25, by="tester", out=io.StringIO())
    return bundle, line


def fitted_warning(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("WARNING: ") and "--good frames are" in line]


def test_a_copy_of_the_taught_frames_is_warned_of_with_the_held_out_ones_counted_apart(taught, tmp_path, capsys):
    """The WARNING once went by path alone: a copy of the taught folder (or of its frames under other names) gave
    none, and the folder itself was "8 of 8 ... taught on" though teach fitted on 6 and held 2 out."""
    bundle, line = taught
    record = json.loads((bundle / "manifest.json").read_text())["teach"]["frames"]
    assert (record["n_fit"], record["n_holdout"]) == (6, 2)
    copy = Path(shutil.copytree(line, tmp_path / "copy"))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, path in enumerate(sorted(line.iterdir())):
        shutil.copyfile(path, renamed / f"frame-{7 - i}{path.suffix}")
    for given in (line, copy, renamed):
        code, out, err = calibrate(capsys, bundle, "--good", given, "--target-false-reject", "0.2", "--dry-run")
        assert code == 0, err
        assert fitted_warning(out) == [
            f"WARNING: 6 of 8 --good frames are frames {bundle} version 2 was fitted on ({line.resolve()}); 2 more "
            "are frames it held out of that fit, as new ones are: a model scores the frames it was fitted on lower "
            "than new ones, so a threshold set on them comes out too low and rejects good parts; calibrate on "
            "held-out frames (an MVTec root's test/good, or frames captured since)"
        ], out


@pytest.fixture(scope="module")
def archive_taught(tmp_path_factory, trained, data) -> tuple[Path, Path, Path]:
    """(the trained bundle taught from an archive on the first 8 of its 14 frames, 6 fitted and 2 held out; the
    archive; `inspectd archive export` of all 14 frames, named by their ids)."""
    import datetime
    import io

    import cv2

    from calibration.teach import archive_frames, teach
    from inspectd.daemon.archive import Archive
    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import Judged
    from inspectd.protocol.archive import ArchiveReader

    root = tmp_path_factory.mktemp("archive_taught")
    bundle = Path(shutil.copytree(trained, root / "bundle"))
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((data / "train" / "good").iterdir())]
    images += [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((data / "test" / "good").iterdir())]
    archive = Archive(root / "archive", max_mb=100, max_age_h=24, good_every=1, queue_size=20).start()
    start = time.time() - 300
    for seq, image in enumerate(images):
        judged = Judged(Frame("cam0", seq, f"{seq:06d}.png", start + seq, image), "ok", 1.0, 35.0, "m", 1, [], None)
        assert archive.offer(judged) is not None
    assert archive.close(timeout=30.0)
    until = datetime.datetime.fromtimestamp(start + 7.5).isoformat()
    frames = archive_frames(root / "archive", since="1h", until=until)
    teach(bundle, frames, holdout=0.25, by="tester", out=io.StringIO())
    assert json.loads((bundle / "manifest.json").read_text())["teach"]["frames"]["n_fit"] == 6
    with ArchiveReader(root / "archive") as reader:
        assert reader.export(reader.query(), root / "export", "test") == 14
    return bundle, root / "archive", root / "export"


def archive_taught_warning(bundle: Path, archive: Path, n_good: int) -> list[str]:
    return [
        f"WARNING: 6 of {n_good} --good frames are frames {bundle} version 2 was fitted on ({archive.resolve()}); 2 "
        "more are frames it held out of that fit, as new ones are: a model scores the frames it was fitted on lower "
        "than new ones, so a threshold set on them comes out too low and rejects good parts; calibrate on held-out "
        "frames (an MVTec root's test/good, or frames captured since)"
    ]


def test_frames_of_an_archive_teach_are_known_by_their_ids_in_an_export(archive_taught, tmp_path, capsys):
    """`inspectd archive export` of the very span taught on names each frame by its archive id, which the teach
    record keeps: calibrate on it warns, counting only the frames fitted on; frames captured after give none."""
    bundle, archive, export = archive_taught
    code, out, err = calibrate(capsys, bundle, "--good", export, "--target-false-reject", "0.2", "--dry-run")
    assert code == 0, err
    assert fitted_warning(out) == archive_taught_warning(bundle, archive, 14), out
    later = tmp_path / "later"
    later.mkdir()
    for path in sorted((export / "test" / "good").iterdir())[8:]:
        shutil.copyfile(path, later / path.name)
    code, out, err = calibrate(capsys, bundle, "--good", later, "--target-false-reject", "0.2", "--dry-run")
    assert code == 0 and fitted_warning(out) == [], out


def test_an_export_of_the_archive_taught_on_is_known_with_its_files_renamed(archive_taught, tmp_path, capsys):
    """The frames an archive teach fitted on were known by their ids alone: an export of that span whose files were
    renamed (`frame-000.png`, as a script or a copy tool names them) gave no warning, where the same frames copied
    from a folder teach's are known by their bytes. They are compared with the archive's own files too."""
    bundle, archive, export = archive_taught
    frames = sorted((export / "test" / "good").iterdir())
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, path in enumerate(frames):
        shutil.copyfile(path, renamed / f"frame-{13 - i:03d}.png")
    code, out, err = calibrate(capsys, bundle, "--good", renamed, "--target-false-reject", "0.2", "--dry-run")
    assert code == 0, err
    assert fitted_warning(out) == archive_taught_warning(bundle, archive, 14), out
    # Half of them named by id again: each frame is counted once, by whichever it is known.
    for i, path in enumerate(frames[:7]):
        (renamed / f"frame-{13 - i:03d}.png").rename(renamed / path.name)
    code, out, err = calibrate(capsys, bundle, "--good", renamed, "--target-false-reject", "0.2", "--dry-run")
    assert code == 0, err
    assert fitted_warning(out) == archive_taught_warning(bundle, archive, 14), out
    # The archive moved away since: the renamed frames cannot be compared, and none is taken for a fitted one.
    for i, path in enumerate(frames[:7]):
        (renamed / path.name).rename(renamed / f"frame-{13 - i:03d}.png")
    moved = tmp_path / "moved"
    shutil.move(archive, moved)
    try:
        code, out, err = calibrate(capsys, bundle, "--good", renamed, "--target-false-reject", "0.2", "--dry-run")
    finally:
        shutil.move(moved, archive)
    assert code == 0, err
    assert "--good frames" not in out and "Traceback" not in err, out
    # One that cannot be read is said, in the one note line a folder that cannot be read gets.
    index = archive / "index.sqlite3"
    kept = index.read_bytes()
    index.write_bytes(b"not a database" * 100)
    try:
        code, out, err = calibrate(capsys, bundle, "--good", renamed, "--target-false-reject", "0.2", "--dry-run")
    finally:
        index.write_bytes(kept)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "were not compared" in line]
    assert len(notes) == 1 and notes[0].startswith(
        f"note: the --good frames were not compared with the frames {bundle} version 2 was taught on ({index}: "
        "cannot read the archive index ("
    ), out


def test_thresholds_set_on_an_fp16_engine_record_it_and_need_no_fp32_comparison(bundle, data, capsys):
    """The remedy the FP16 score-shift refusal gives: calibrate on the engine's own precision. The scores are the FP16
    graph's, and the document says so, so a daemon on that engine takes it as it is (needs_check); one set on FP32
    scores, as before, says fp32."""
    from engines.bundle.store import load_bundle
    from engines.bundle.thresholds import reference_scores
    from engines.model.build_engine import store_onnxruntime_fp16
    from engines.runtime.score_shift import needs_check
    from engines.training.evaluate import score_images

    assert calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2")[0] == 0
    on_fp32 = load_bundle(bundle).thresholds()
    assert on_fp32.provenance["engine_precision"] == "fp32" and needs_check("fp16", on_fp32)
    store_onnxruntime_fp16(bundle, log=lambda *_: None)
    code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--precision", "fp16")
    assert code == 0, err
    on_fp16 = load_bundle(bundle).thresholds()
    assert on_fp16.provenance["engine_precision"] == "fp16" and not needs_check("fp16", on_fp16)
    paths = sorted((data / "test" / "good").iterdir())
    fp16 = [s.score for s in score_images(bundle, paths, options={"precision": "fp16"})]
    assert reference_scores(on_fp16) == (6, sorted(float(f"{score:.7g}") for score in fp16))


def test_apply_to_a_running_daemon(bundle, data, tmp_path, capsys):
    """--apply against a real `inspectd run` process: its control socket answers with the version it now uses."""
    control = f"ipc://{tmp_path}/control.sock"
    config = {
        "station": "t1",
        "model": {"bundle": str(bundle)},
        "engine": {"backend": "onnxruntime", "options": {"intra_op_threads": 1}},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}],
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
        "control": {"endpoint": control},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
        "logging": {"level": "warning"},
    }
    (tmp_path / "inspectd.yaml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "inspectd", "run", "--config", str(tmp_path / "inspectd.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        from inspectd.protocol.control import ControlClient, ControlTimeout

        deadline = time.monotonic() + 60
        with ControlClient(control, timeout_s=2) as client:
            while True:
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the daemon never answered status"
                try:
                    before = client.request({"cmd": "status"})
                    break
                except ControlTimeout:
                    continue
        from engines.bundle.store import load_bundle

        earlier = load_bundle(bundle).thresholds()
        code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--apply", control)
        daemon_log = (tmp_path / "daemon.log").read_text(errors="replace")[-2000:]
        assert code == 0, err + daemon_log
        written = load_bundle(bundle).thresholds().version
        assert f"now judges with thresholds version {written}" in out, out + daemon_log
        with ControlClient(control, timeout_s=10) as client:
            status = client.request({"cmd": "status"})
        assert status["thresholds_version"] == written == before["thresholds_version"] + 1, (status, before)

        # A version the daemon refuses is not written: the bundle set back to the version before (as a copy
        # restored by hand would be), calibrate proposes the version the daemon already runs.
        from engines.bundle import thresholds as thresholds_doc

        applied = load_bundle(bundle).thresholds()
        load_bundle(bundle).replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(earlier))
        code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--apply", control)
        assert code == 1 and "the daemon refused" in err and f"version {written} not written" in err, err
        assert load_bundle(bundle).thresholds().version == before["thresholds_version"]
        load_bundle(bundle).replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(applied))

        # No daemon behind the endpoint: one line and exit 1 (the new version is still written to the bundle).
        code, out, err = calibrate(
            capsys, bundle, "--rollback", 1, "--apply", "ipc://" + str(tmp_path / "none.sock"), "--timeout", "0.5"
        )
        assert code == 1 and "no reply within 0.5 s" in err
        on_disk = load_bundle(bundle).thresholds()
        assert on_disk.version == written + 1 and on_disk.provenance["rollback_to"] == 1

        # That version waits on disk for the daemon's reload. A set-thresholds of another document of the same
        # version before it would write over it (and the daemon judge by a version the disk names differently): it
        # is refused, in the reply, until the daemon has loaded what is on disk.
        other = thresholds_doc.next_version(applied, provenance={**applied.provenance, "note": "typed by hand"})
        assert other.version == on_disk.version
        with ControlClient(control, timeout_s=10) as client:
            refused = client.request({"cmd": "set_thresholds", "thresholds": other.to_dict()})
            assert refused["ok"] is False, refused
            assert (
                f"{thresholds_doc.FILE_NAME}: changed on disk since it was loaded (now version {other.version}"
                in (refused["error"])
            ), refused
            assert refused["error"].endswith("load the bundle again (the daemon: reload) and retry"), refused
            assert client.request({"cmd": "status"})["thresholds_version"] == written
            assert load_bundle(bundle).thresholds().to_dict() == on_disk.to_dict()
            assert client.request({"cmd": "reload"})["ok"]
            assert client.request({"cmd": "status"})["thresholds_version"] == on_disk.version

        # Calibrate without --apply, then with it before any reload: the second version is computed from the first,
        # whose number it holds in its history, so the daemon writes it over the one it never loaded.
        code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.1")
        assert code == 0, err
        unapplied = load_bundle(bundle).thresholds()
        assert unapplied.version == on_disk.version + 1
        code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--apply", control)
        assert code == 0, err + (tmp_path / "daemon.log").read_text(errors="replace")[-2000:]
        final = load_bundle(bundle).thresholds()
        assert final.version == unapplied.version + 1 and final.history[0]["version"] == unapplied.version
        with ControlClient(control, timeout_s=10) as client:
            assert client.request({"cmd": "status"})["thresholds_version"] == final.version
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        log.close()


def test_apply_over_curve_to_a_control_socket_on_the_network(bundle, data, pki, tmp_path, capsys):
    """A remote daemon's control socket requires CurveZMQ: --apply with the operator's keys gets in, others do not."""

    from engines.bundle.store import load_bundle
    from inspectd.daemon.control import ControlServer
    from inspectd.daemon.security import CurveServer

    server_public, server_secret = pki["server"]
    operator_secret, stranger_secret = pki["allowed"][1], pki["intruder"][1]
    allowed = pki["allow_dir"]

    class Daemon:
        """The control handler's contract as calibrate --apply uses it: status (asked before scoring), then
        set_thresholds: validate, require a higher version, answer with it."""

        version = 1

        def status(self):
            from engines.bundle.store import load_bundle

            return {"model_id": load_bundle(bundle).model_id, "thresholds_version": self.version, "cameras": {}}

        def set_thresholds(self, doc, force=False):
            new = thresholds_doc.parse(doc)
            if new.version <= self.version:
                raise ValueError(f"thresholds.version: {new.version}, expected more than the current {self.version}")
            self.version = new.version
            return {"thresholds_version": new.version}

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    handler = Daemon()
    server = ControlServer(endpoint, handler, curve=CurveServer("control", server_secret, allowed))
    server.start()
    try:
        code, out, err = calibrate(
            capsys,
            bundle,
            "--good",
            data,
            "--target-false-reject",
            "0.2",
            "--apply",
            endpoint,
            "--server-key",
            server_public,
            "--client-key",
            operator_secret,
        )
        assert code == 0, err
        assert f"now judges with thresholds version {handler.version}" in out and handler.version == 2
        # A key the daemon does not let in, or a server key that is not the daemon's: the handshake is ended, and
        # calibrate says which before anything is scored or written (it used to wait out --timeout, then write).
        for server_key, client_key, expected in [
            (server_public, stranger_secret, "refused this client's key, expected --client-key"),
            (stranger_secret.with_suffix(".key"), operator_secret, "a --server-key that is not its public key"),
        ]:
            keys_given = ("--server-key", server_key, "--client-key", client_key)
            code, out, err = calibrate(
                capsys, bundle, "--rollback", 1, "--apply", endpoint, "--timeout", "1", *keys_given
            )
            assert code == 2 and expected in err, err
        assert handler.version == 2
        assert load_bundle(bundle).thresholds().version == 2, "a refused --apply wrote the rollback"
        code, out, err = calibrate(capsys, bundle, "--rollback", 1, "--apply", endpoint, "--server-key", server_public)
        assert code == 2 and "expected both (CurveZMQ) or neither" in err
    finally:
        server.stop()


def test_a_training_folder_calibrate_may_not_enter_leaves_a_note_not_a_refusal(trained, data, open_tmp_path):
    """DEPLOY's `sudo -u inspectd calibrate` on a bundle trained under a trainer's 0700 home: pathlib's is_dir() on
    its train/good raised PermissionError, and calibrate stopped (exit 2) before scoring, over a warning. It scores,
    and a note says the --good frames were not compared with the training frames. The training data lies under a
    folder this user may not enter: 0700 root's, run as nobody when this is root; 000 otherwise."""
    import json

    from engines.bundle.store import load_bundle
    from other_user import as_nobody

    shared = open_tmp_path / "shared"
    shared.mkdir()
    bundle = Path(shutil.copytree(trained, shared / "bundle"))
    good = Path(shutil.copytree(data / "test" / "good", shared / "good"))
    home = open_tmp_path / "home"
    shutil.copytree(data, home / "trainer" / "data")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["training"]["data"] = str(home / "trainer" / "data")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(bundle).manifest["training"]["data"] == str(home / "trainer" / "data")

    home.chmod(0o700 if os.geteuid() == 0 else 0o000)
    try:
        argv = ["calibrate", str(bundle), "--good", str(good), "--target-false-reject", "0.2", "--dry-run"]
        out = subprocess.run(
            as_nobody([sys.executable, "-m", "inspectd", *argv]), capture_output=True, text=True, cwd=REPO, timeout=120
        )
    finally:
        home.chmod(0o755)
    assert out.returncode == 0, out.stderr
    assert "dry run: version 2 not written" in out.stdout and "image threshold" in out.stdout, out.stdout
    notes = [line for line in out.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, out.stdout
    assert notes[0].startswith(f"note: the --good frames were not compared with the frames {bundle} was trained on (")
    assert f"{home / 'trainer' / 'data' / 'train'}: Permission denied, as " in notes[0], notes
    assert "--good frames are frames" not in out.stdout, out.stdout


def fp16_calibrated(bundle, data, capsys, *overrides: str):
    """The bundle calibrated on fp32 scores (with --camera overrides for `overrides`), then its FP16 graph stored."""
    from engines.model.build_engine import store_onnxruntime_fp16

    assert calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2")[0] == 0
    for camera in overrides:
        code, _, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.7", "--camera", camera)
        assert code == 0, err
    store_onnxruntime_fp16(bundle, log=lambda *_: None)


def test_a_rollback_to_thresholds_set_on_fp16_scores_says_so(bundle, data, capsys):
    """A rollback once dropped engine_precision: thresholds set with --precision fp16 came back as set on fp32
    scores, and the fp16 engine that had run them measured its shift against them (and refused it above 1 %). Both
    ways: back to fp16-set thresholds says fp16, back to fp32-set ones says fp32 again."""
    from engines.bundle.store import load_bundle
    from engines.runtime.score_shift import needs_check

    fp16_calibrated(bundle, data, capsys)
    on_fp32 = load_bundle(bundle).thresholds()
    for target in ("0.3", "0.2"):
        code, _, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", target, "--precision", "fp16")
        assert code == 0, err
    on_fp16 = thresholds_doc.parse({**load_bundle(bundle).thresholds().history[0], "history": []})
    assert on_fp16.provenance["engine_precision"] == "fp16"

    code, out, err = calibrate(capsys, bundle, "--rollback", on_fp16.version)
    assert code == 0, err
    back = load_bundle(bundle).thresholds()
    assert back.image_threshold == on_fp16.image_threshold and back.provenance["rollback_to"] == on_fp16.version
    assert back.provenance["engine_precision"] == "fp16" and not needs_check("fp16", back)
    assert back.provenance["model_id"] == on_fp16.provenance["model_id"] == load_bundle(bundle).model_id

    assert calibrate(capsys, bundle, "--rollback", on_fp32.version)[0] == 0
    again = load_bundle(bundle).thresholds()
    assert again.provenance["engine_precision"] == "fp32" and needs_check("fp16", again)
    assert calibrate(capsys, bundle, "--rollback", 1)[0] == 0  # as trained: nothing recorded, fp32
    first = load_bundle(bundle).thresholds()
    assert "engine_precision" not in first.provenance and needs_check("fp16", first)


def test_every_camera_calibrated_on_another_precision_drops_the_overrides_set_on_the_old_one(bundle, data, capsys):
    """The document names one precision for every threshold in it: a whole-station --precision fp16 once kept cam2's
    override set on fp32 scores inside an fp16 document, where the fp16 engine's shift check passed it unmeasured. The
    override is dropped with a WARNING that names it and says how to set it again; set again on fp16 it stays."""
    from engines.bundle.store import load_bundle

    fp16_calibrated(bundle, data, capsys, "cam2", "cam5")
    before = load_bundle(bundle).thresholds()
    assert set(before.per_camera) == {"cam2", "cam5"} and before.provenance[thresholds_doc.PER_CAMERA_TARGET]

    code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--precision", "fp16")
    assert code == 0, err
    warning = [line for line in out.splitlines() if "per-camera overrides" in line]
    assert warning == [
        f"WARNING: every camera on fp16 scores: the per-camera overrides of cam2, cam5 (thresholds version "
        f"{before.version}) were set on fp32 scores and are dropped, so those cameras judge by the new fp16 "
        f"thresholds: set them again with `inspectd calibrate {bundle} --camera ID --precision fp16`"
    ], out
    on_fp16 = load_bundle(bundle).thresholds()
    assert on_fp16.provenance["engine_precision"] == "fp16" and on_fp16.per_camera == {}
    assert thresholds_doc.PER_CAMERA_TARGET not in on_fp16.provenance

    flags = ["--target-false-reject", "0.7", "--camera", "cam2", "--precision", "fp16"]
    assert calibrate(capsys, bundle, "--good", data, *flags)[0] == 0
    code, out, err = calibrate(capsys, bundle, "--good", data, "--target-false-reject", "0.2", "--precision", "fp16")
    assert code == 0 and "per-camera overrides" not in out, out
    kept = load_bundle(bundle).thresholds()
    assert set(kept.per_camera) == {"cam2"} and set(kept.provenance[thresholds_doc.PER_CAMERA_TARGET]) == {"cam2"}


# --- on the grey model of tests/station_model.py (score = the map's maximum; no training) --------------------------


def grey_station(tmp_path: Path, n_good: int = 60, n_defect: int = 0) -> tuple[Path, Path, Path]:
    """(a grey bundle, a folder of `n_good` good frames, an MVTec-style test/crack folder of `n_defect` defect frames
    with their ground_truth masks)."""
    import cv2

    from station_model import defect_frame, good_frame, write_grey_bundle

    bundle = write_grey_bundle(tmp_path / "grey")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(n_good):
        cv2.imwrite(str(good / f"{i:04d}.png"), good_frame(i))
    crack = tmp_path / "mv" / "test" / "crack"
    masks = tmp_path / "mv" / "ground_truth" / "crack"
    crack.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n_defect):
        image = defect_frame(i)
        cv2.imwrite(str(crack / f"{i:03d}.png"), image)
        cv2.imwrite(str(masks / f"{i:03d}_mask.png"), ((image == 250) * 255).astype(np.uint8))
    return bundle, good, crack


def cut_short(path: Path) -> None:
    """As a copy cut off mid-file leaves it: the first half of the PNG."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_images_that_do_not_decode_are_skipped_counted_and_named(tmp_path, capsys):
    """Once one file cut short by a copy ended the whole run (exit 2, nothing written) after every image before it was
    scored: now it is left out with a WARNING naming it, counted in the provenance, and the threshold is set on the
    images that decoded, just as without it."""
    bundle, good, crack = grey_station(tmp_path, n_good=60, n_defect=20)
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", crack, "--dry-run")
    assert code == 0, err
    clean = [line for line in out.splitlines() if line.startswith("image threshold")]
    cut_short(good / "0059.png")
    cut_short(crack / "003.png")
    (good / "0007.png").write_bytes(b"")
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", crack)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if "do not decode" in line]
    assert warnings == [
        f"WARNING: skipped 3 image(s) that do not decode: {good / '0007.png'}, {good / '0059.png'}, {crack / '003.png'}"
    ], out
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    prov = written.provenance
    assert (prov["n_good"], prov["n_skipped_good"], prov["n_defective"], prov["n_skipped_defective"]) == (58, 2, 19, 1)
    # 0059 and 0007 are not the highest-scored good frames here: the same threshold as with them.
    assert [line for line in out.splitlines() if line.startswith("image threshold")][0].split(":")[0] == clean[0].split(
        ":"
    )[0]


def test_a_mask_that_does_not_decode_leaves_its_image_out_with_the_warning_eval_gives(bundle, data, tmp_path, capsys):
    """With --pixel, one mask that did not decode ended the run (exit 2, nothing written) after every image before it
    was scored, where eval leaves its image out with a WARNING naming the mask: calibrate now does the same."""
    from engines.training.evaluate import evaluate

    copy = Path(shutil.copytree(data, tmp_path / "data"))
    masks = sorted((copy / "ground_truth" / "blowhole").iterdir())
    cut_short(masks[1])
    code, out, err = calibrate(
        capsys, bundle, "--good", copy, "--defective", copy / "test" / "blowhole", "--max-f1", "--pixel"
    )
    assert code == 0, err
    warning = f"WARNING: skipped 1 image(s) that do not decode: {masks[1]}"
    assert warning in out.splitlines(), out
    assert warning in evaluate(bundle, copy)["notes"]  # eval's words for the same file
    assert "pixel F1-max" in out  # the other masks still set the pixel threshold
    prov = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME).provenance
    assert (prov["n_defective"], prov["n_skipped_defective"]) == (3, 1)


def test_a_run_where_every_good_image_fails_to_decode_is_still_refused(tmp_path, capsys):
    bundle, good, _ = grey_station(tmp_path, n_good=3)
    for path in good.iterdir():
        cut_short(path)
    code, out, err = calibrate(capsys, bundle, "--good", good)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"inspectd calibrate: {good / '0000.png'}: cannot decode, expected a JPEG/PNG/BMP/TIFF/PNM/WebP image"
    ), err
    assert thresholds_doc.read(bundle / thresholds_doc.FILE_NAME).version == 1


def test_an_image_in_both_good_and_defective_is_refused_before_scoring(tmp_path, capsys):
    """--defective typed as the --good folder (or a link to it) once gave a threshold that rejects every good frame,
    exit 0."""
    bundle, good, _ = grey_station(tmp_path, n_good=5)
    (tmp_path / "linked").symlink_to(good)
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", tmp_path / "linked", "--max-f1")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == [
        f"inspectd calibrate: --defective: 5 image(s) are also in --good ({tmp_path / 'linked' / '0000.png'}, "
        f"{tmp_path / 'linked' / '0001.png'}, {tmp_path / 'linked' / '0002.png'} ...), expected labelled defective "
        "images apart from the held-out good ones"
    ], lines
    assert thresholds_doc.read(bundle / thresholds_doc.FILE_NAME).version == 1


@pytest.mark.parametrize("target", [["--max-f1"], ["--target-escape", "0.01"]])
def test_a_threshold_that_rejects_most_good_frames_is_warned_of_whatever_the_target(tmp_path, capsys, target):
    """Defect-free frames given as --defective (the good ones' pixels, saved again: a byte copy is refused as a frame
    in both sets): both targets pick the lowest score, which rejects every good frame; that was written with exit 0
    and no WARNING."""
    import cv2

    bundle, good, _ = grey_station(tmp_path, n_good=40)
    copies = tmp_path / "not-defective"
    copies.mkdir()
    for path in sorted(good.iterdir()):
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert cv2.imwrite(str(copies / path.name), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert (copies / path.name).read_bytes() != path.read_bytes()
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", copies, *target)
    assert code == 0, err
    warning = [line for line in out.splitlines() if "good frames (rate" in line]
    assert (
        len(warning) == 1
        and warning[0].startswith("WARNING: image threshold ")
        and " rejects 40 of 40 good " in (warning[0])
    ), out
    observed = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME).provenance["observed"]
    assert "rejects 40 of 40 good frames (rate 1)" in observed["warning"]


def mean_pooled(bundle: Path) -> Path:
    """Grey bundle `bundle` rewritten to score an image by its map's mean (score_share 1, as recipe field), the
    graph's ReduceMax made a ReduceMean."""
    import onnx

    from engines.bundle.store import load_bundle, write_bundle
    from station_model import grey_graph

    graph = onnx.load_from_string(grey_graph())
    (pool,) = [node for node in graph.graph.node if node.op_type == "ReduceMax"]
    pool.op_type = "ReduceMean"
    grey = load_bundle(bundle)
    fields = {k: grey.manifest[k] for k in ("method", "backbone", "input", "scorer_inputs")}
    fields["architecture"] = {"score_share": 1.0}
    write_bundle(bundle, fields, graph.SerializeToString(), grey.scorer_params(), grey.weights(), grey.thresholds())
    assert describe_score_share(load_bundle(bundle).recipe["score_share"]) == "mean"
    return bundle


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_a_pixel_threshold_above_the_image_one_is_warned_of_whatever_the_pooling(tmp_path, capsys, pooling):
    """A frame scored between the image threshold and a higher pixel threshold can be a defect with no region: its
    score is at most its map's maximum, whatever the pooling. The document's pixel threshold 0.5 stays above a
    calibrated image one. Once warned of only for a model scored by its map's maximum."""
    bundle, good, _ = grey_station(tmp_path, n_good=60)
    if pooling == "mean":
        mean_pooled(bundle)
    code, out, err = calibrate(capsys, bundle, "--good", good)
    assert code == 0, err
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    image = written.image_threshold
    assert image < 0.5 == written.pixel_threshold
    warning = [line for line in out.splitlines() if "no region" in line]
    assert warning == [
        f"WARNING: the pixel threshold 0.5 is above the image threshold {image:.6g}, and an image score is at most "
        f"its map's maximum: frames scored from {image:.6g} to below 0.5 can be defects with no region (an empty "
        "mask); calibrate with --pixel to set both from the same frames"
    ], out
    assert "can be defects with no region" in written.provenance["observed"]["warning"]

    # One camera's override is checked against the pixel threshold in force for it: the document's.
    code, out, err = calibrate(capsys, bundle, "--good", good, "--camera", "cam1")
    assert code == 0, err
    assert "WARNING: camera cam1's pixel threshold 0.5 is above the image threshold" in out, out
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    assert "no region" in written.provenance[thresholds_doc.PER_CAMERA_TARGET]["cam1"]["observed"]["warning"]

    # A pixel threshold at or below the image one leaves every defect a region: warned of only when above it.
    code, out, err = calibrate(capsys, bundle, "--good", good, "--pixel", "--pixel-fpr", "0.2")
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    assert code == 0 and ("no region" in out) == (written.pixel_threshold > written.image_threshold), out


def test_no_regionless_warning_where_the_image_score_is_the_scorers_own(tmp_path, capsys):
    """CSE's k-means scorer scores an image by its own measure (0 to 2), not a pooling of its map (thousands): its
    pixel threshold is always far above the image one, and the warning said so at every calibration. Only scorers
    whose image score pools the map are checked, and which those are agrees with the graph's own scorers."""
    from engines.bundle.format import OWN_IMAGE_SCORE
    from engines.bundle.store import load_bundle, write_bundle
    from engines.model.graph import SCORERS
    from station_model import grey_graph

    assert OWN_IMAGE_SCORE == {kind for kind, scorer in SCORERS.items() if scorer.has_global_score}
    bundle, good, _ = grey_station(tmp_path, n_good=60)
    grey = load_bundle(bundle)
    fields = {k: grey.manifest[k] for k in ("method", "backbone", "input", "scorer_inputs")}
    fields["architecture"] = {"scorer": "kmeans"}
    write_bundle(bundle, fields, grey_graph(), grey.scorer_params(), grey.weights(), grey.thresholds())
    code, out, err = calibrate(capsys, bundle, "--good", good)
    assert code == 0, err
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    assert written.image_threshold < 0.5 == written.pixel_threshold
    assert "no region" not in out and "no region" not in str(written.provenance["observed"]), out


def test_a_test_type_folders_masks_are_found_under_every_name_eval_reads(tmp_path, capsys):
    """`--defective test/<type>` looked for `<stem>_mask.png` alone: VisA's and BTAD's `<stem>.png` masks were not
    found, and the pixel threshold came from the good pixels without a word."""
    bundle, good, crack = grey_station(tmp_path, n_good=20, n_defect=10)
    masks = crack.parent.parent / "ground_truth" / "crack"
    for mask in masks.iterdir():
        mask.rename(masks / mask.name.replace("_mask", ""))
    code, out, err = calibrate(
        capsys, bundle, "--good", good, "--defective", crack, "--pixel", "--pixel-fpr", "0.0001", "--dry-run"
    )
    assert code == 0, err
    assert "note: --pixel-fpr 0.0001 not used: the defects have masks, the pixel threshold is their pixel F1-max" in (
        out.splitlines()
    ), out


def test_pixel_fpr_without_pixel_is_refused_and_one_masks_leave_unused_is_noted(tmp_path, capsys):
    bundle, good, crack = grey_station(tmp_path, n_good=20, n_defect=10)
    code, out, err = calibrate(capsys, bundle, "--good", good, "--pixel-fpr", "0.0001")
    assert code == 2
    assert err.strip().splitlines() == [
        "inspectd calibrate: --pixel-fpr sets the pixel threshold's good-pixel rate: expected --pixel too (without "
        "it the pixel threshold is not set)"
    ], err
    code, out, err = calibrate(
        capsys, bundle, "--good", good, "--defective", crack, "--pixel", "--pixel-fpr", "0.0001", "--dry-run"
    )
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: --pixel-fpr 0.0001 not used: the defects have masks, the pixel threshold is their pixel F1-max"
    ], out


def test_byte_copies_of_a_frame_count_once_in_the_target_the_reference_and_the_provenance(tmp_path, capsys):
    """12 frames each copied 4 times (a camera resending one frame while the line stands) once read as 60 good frames:
    the bound, "(have 60)" and the drift reference counted copies, which the line's later frames then drifted from.
    As train and teach, calibrate leaves them out, says so, and records how many."""
    bundle, good, crack = grey_station(tmp_path, n_good=12, n_defect=4)
    for path in sorted(good.iterdir()):
        for copy in range(4):
            shutil.copyfile(path, good / f"{path.stem}~{copy}.png")
    shutil.copyfile(crack / "001.png", crack / "001~copy.png")
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", crack, "--target-false-reject", "0.2")
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: 48 duplicate image(s) left out: 0000~0.png (same as 0000.png), 0000~1.png (same as 0000.png), "
        "0000~2.png (same as 0000.png) ...",
        "note: 1 duplicate image(s) left out: 001~copy.png (same as 001.png)",
    ], out
    assert "target 0.2 needs >= 14 good frames with none rejected (have 12)" in out, out
    assert "WARNING: 12 good frames support a false-reject rate" in out, out
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    prov = written.provenance
    assert (prov["n_good"], prov["n_duplicates_good"], prov["n_defective"], prov["n_duplicates_defective"]) == (
        12,
        48,
        4,
        1,
    )
    assert thresholds_doc.reference_scores(written)[0] == 12
    assert thresholds_doc.reference_scores(written, thresholds_doc.GOOD_BRIGHTNESS)[0] == 12


def test_frames_with_the_same_pixels_in_other_bytes_count_once_in_the_bound_the_reference_and_the_pixels(
    tmp_path, capsys
):
    """Each frame also saved at another PNG compression level (a stuck frame the camera encoded again): only byte
    copies were left out, so 12 frames read as 24, "observed 0/24" claimed twice the support there is, and the drift
    reference and the good pixels counted each frame twice. They are left out after decoding, named apart from the
    byte copies, and counted with them."""
    import cv2

    bundle, good, crack = grey_station(tmp_path, n_good=12, n_defect=4)
    for path in sorted(good.iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(good / f"{path.stem}~z9.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert (good / f"{path.stem}~z9.png").read_bytes() != path.read_bytes()
    shutil.copyfile(good / "0001.png", good / "0001~copy.png")
    image = cv2.imread(str(crack / "002.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(crack / "002~z9.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    masks = crack.parents[1] / "ground_truth" / "crack"
    shutil.copyfile(masks / "002_mask.png", masks / "002~z9_mask.png")
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", crack, "--target-false-reject", "0.2")
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: 1 duplicate image(s) left out: 0001~copy.png (same as 0001.png)",
        "note: 12 duplicate image(s) (the same pixels in other bytes) left out: 0000~z9.png (same as 0000.png), "
        "0001~z9.png (same as 0001.png), 0002~z9.png (same as 0002.png) ...",
        "note: 1 duplicate image(s) (the same pixels in other bytes) left out: 002~z9.png (same as 002.png)",
    ], out
    assert "false-reject rate on good frames: observed 0/12," in out, out
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    prov = written.provenance
    assert (prov["n_good"], prov["n_duplicates_good"], prov["n_defective"], prov["n_duplicates_defective"]) == (
        12,
        13,
        4,
        1,
    )
    assert prov["n_skipped_good"] == prov["n_skipped_defective"] == 0
    assert thresholds_doc.reference_scores(written)[0] == 12
    assert thresholds_doc.reference_scores(written, thresholds_doc.GOOD_BRIGHTNESS)[0] == 12

    code, out, err = calibrate(capsys, bundle, "--good", good, "--pixel", "--target-false-reject", "0.2", "--dry-run")
    assert code == 0, err
    assert "at most 0.01 of 49152 good pixels at or above it" in out, out  # 12 maps of 64 x 64 (the frame's), each once


def test_an_empty_camera_id_is_refused_not_taken_as_every_camera(tmp_path, capsys):
    """`--camera "$CAM"` with CAM unset once rewrote the global threshold from that one camera's frames."""
    bundle, good, _ = grey_station(tmp_path, n_good=12)
    for camera in ("", "  "):
        code, out, err = calibrate(capsys, bundle, "--good", good, "--camera", camera)
        assert code == 2 and out == "", out
        assert err.splitlines() == [f"inspectd calibrate: --camera {camera!r}: expected a camera id"], err
    code, out, err = calibrate(capsys, bundle, "--rollback", "1", "--camera", "")
    assert code == 2 and err.splitlines() == ["inspectd calibrate: --camera '': expected a camera id"], err
    assert thresholds_doc.read(bundle / thresholds_doc.FILE_NAME).version == 1


def test_a_good_folder_whose_images_sit_a_level_down_names_them_as_train_does(tmp_path, capsys):
    """Once a bare "no images found"; an export with --split train (or an MVTec root without test/) says its
    train/good is not what calibrate reads."""
    bundle, good, _ = grey_station(tmp_path, n_good=5)
    nested = tmp_path / "nested"
    for day, names in (("day1", ["0000.png", "0001.png", "0002.png"]), ("day2", ["0003.png"])):
        (nested / day).mkdir(parents=True)
        for name in names:
            shutil.copyfile(good / name, nested / day / name)
    code, out, err = calibrate(capsys, bundle, "--good", nested, "--dry-run")
    assert code == 2
    assert err.strip().splitlines() == [
        f"inspectd calibrate: {nested}: no images found, expected held-out defect-free images; found 3 images in "
        "day1/: point --good at it; found 1 image in day2/: point --good at it"
    ], err
    export = tmp_path / "export"
    shutil.copytree(good, export / "train" / "good")
    code, out, err = calibrate(capsys, bundle, "--good", export, "--dry-run")
    assert code == 2
    assert err.strip().splitlines() == [
        f"inspectd calibrate: {export}: no images found, expected held-out defect-free images; train/good/ holds "
        "frames to fit on (what train and teach read), and calibrate reads a root's test/good: export held-out "
        "frames with the default --split test"
    ], err


def test_a_good_folder_of_defect_frames_or_masks_is_not_offered_as_good_frames(tmp_path, capsys):
    """The hint once said `found 5 images in test/defect/: point --good at it` for an `archive export --verdict
    defect` root, and named test/crack/ and ground_truth/crack/ for an MVTec root without test/good: followed, it
    set the good frames' threshold on defect frames (above the defects: escapes) or on masks."""
    bundle, good, crack = grey_station(tmp_path, n_good=5, n_defect=4)
    export = tmp_path / "export"
    shutil.copytree(crack, export / "test" / "defect")
    mv = crack.parents[1]  # test/crack and ground_truth/crack, no test/good
    for root in (export, mv, mv / "test"):
        code, out, err = calibrate(capsys, bundle, "--good", root, "--dry-run")
        assert code == 2
        assert err.strip().splitlines() == [
            f"inspectd calibrate: {root}: no images found, expected held-out defect-free images"
        ], err
    shutil.copytree(good, mv / "test" / "good" / "day1")
    code, out, err = calibrate(capsys, bundle, "--good", mv, "--dry-run")
    assert code == 2
    assert err.strip().splitlines() == [
        f"inspectd calibrate: {mv}: no images found, expected held-out defect-free images; found 5 images in "
        "test/good/day1/: point --good at it"
    ], err


def test_a_good_frame_this_user_may_not_read_is_skipped_not_a_refusal(open_tmp_path):
    """Copies are found by their bytes, and a frame of the size another has was read to compare it: one file the
    service user may not read (0600, another user's) stopped calibrate, `cannot read (Permission denied)`, where it
    used to be skipped with a WARNING. It is skipped and named again, saying why (the WARNING once said it did not
    decode). Fixed-size BMP frames: every size is shared.
    Run as nobody when this is root (root reads everything)."""
    import cv2

    from other_user import inspectd_without

    bundle, png, _ = grey_station(open_tmp_path, n_good=20)
    good = open_tmp_path / "bmp"
    good.mkdir()
    for path in sorted(png.iterdir()):
        assert cv2.imwrite(str(good / f"{path.stem}.bmp"), cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    assert len({path.stat().st_size for path in good.iterdir()}) == 1
    private = good / "0003.bmp"
    out = inspectd_without(
        private, "calibrate", str(bundle), "--good", str(good), "--target-false-reject", "0.2", "--dry-run"
    )
    assert out.returncode == 0, out.stderr
    warning = f"WARNING: skipped 1 image(s) that cannot be read: {private} (Permission denied)"
    assert warning in out.stdout.splitlines() and "do not decode" not in out.stdout, out.stdout
    assert "dry run: version 2 not written" in out.stdout and "19 good frames" in out.stdout, out.stdout


@pytest.mark.parametrize("unreadable", [5, [["0001.png"]], "0001.png"])
def test_a_hand_edited_teach_record_is_no_traceback(tmp_path, capsys, unreadable):
    """A teach record whose frames.unreadable is not a list of names (edited by hand) ended calibrate in a
    TypeError traceback. It does not say which frames the fit skipped, so the frames are not compared."""
    bundle, good, _ = grey_station(tmp_path, n_good=20)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["teach"] = {"version": 2, "frames": {"folder": str(good.resolve()), "unreadable": unreadable}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = calibrate(capsys, bundle, "--good", good, "--target-false-reject", "0.2", "--dry-run")
    assert code == 0, err
    assert "dry run: version 2 not written" in out and "--good frames are frames" not in out, out


def test_a_defective_frame_that_is_a_copy_of_a_good_one_is_refused_naming_the_pair(tmp_path, capsys):
    """Only the same file (by resolved path) was refused in both sets: a defect frame copied into the good folder
    under another name was scored as good and as defective, exit 0."""
    bundle, good, crack = grey_station(tmp_path, n_good=30, n_defect=4)
    shutil.copyfile(crack / "002.png", good / "9999.png")
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", crack, "--max-f1", "--dry-run")
    assert code == 2
    assert err.strip().splitlines() == [
        f"inspectd calibrate: --defective: 1 image(s) are also in --good ({crack / '002.png'} (a copy of "
        f"{good / '9999.png'})), expected labelled defective images apart from the held-out good ones"
    ], err
    assert thresholds_doc.read(bundle / thresholds_doc.FILE_NAME).version == 1


def test_a_batch_beyond_the_bound_is_refused_in_one_line_before_any_scoring(tmp_path, capsys):
    """`--batch 100000000` once asked numpy for 95 GiB and ended in a MemoryError traceback."""
    bundle, good, _ = grey_station(tmp_path, n_good=12)
    for batch in (257, 100_000_000, 0):
        code, out, err = calibrate(capsys, bundle, "--good", good, "--batch", batch, "--dry-run")
        assert code == 2 and out == "", out
        assert err.splitlines() == [f"inspectd calibrate: --batch {batch}: expected an integer from 1 to 256"], err
    code, out, err = calibrate(capsys, bundle, "--good", good, "--batch", 256, "--dry-run")
    assert code == 0 and "dry run: version 2 not written" in out, err


def test_a_rollback_says_what_becomes_of_each_cameras_override(tmp_path, capsys):
    """`--rollback` printed only the global values: a camera whose override it removed (its pixel threshold back from
    0.05 to 0.5) or changed went unsaid, with --dry-run too, where the operator asks what would change."""
    bundle, good, _ = grey_station(tmp_path, n_good=12)

    def doc():
        return thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)

    def shown(override):
        return ", ".join(
            f"{key} {override[f'{key}_threshold']:.6g}" if f"{key}_threshold" in override else f"{key} global"
            for key in ("image", "pixel")
        )

    for flags in (
        ["--camera", "cam1", "--pixel"],
        ["--camera", "cam2"],
        ["--camera", "cam1", "--pixel", "--pixel-fpr", "0.3"],
    ):
        code, out, err = calibrate(capsys, bundle, "--good", good, *flags)
        assert code == 0, err
    v4 = doc()
    v2, v3 = (thresholds_doc.rollback(v4, version) for version in (2, 3))
    assert v4.per_camera["cam1"] != v2.per_camera["cam1"] and "pixel_threshold" in v2.per_camera["cam1"]
    assert set(v4.per_camera["cam2"]) == {"image_threshold"}

    def rollback_lines(version, *flags):
        code, out, err = calibrate(capsys, bundle, "--rollback", version, *flags)
        assert code == 0, err
        return [line for line in out.splitlines() if line.startswith("camera ")]

    cam1_v4, cam2 = shown(v4.per_camera["cam1"]), shown(v4.per_camera["cam2"])
    assert rollback_lines(2, "--dry-run") == [
        f"camera cam1: override changed from {cam1_v4} to {shown(v2.per_camera['cam1'])}",
        f"camera cam2: override removed (was {cam2}): it judges by the global image {v2.image_threshold:.6g}, "
        f"pixel {v2.pixel_threshold:.6g}",
    ]
    assert doc().version == 4
    assert rollback_lines(3) == [
        f"camera cam1: override changed from {cam1_v4} to {shown(v3.per_camera['cam1'])}",
        f"camera cam2: override kept: {cam2}",
    ]
    assert doc().version == 5
    removed = rollback_lines(1)
    assert [line.split(" (was ")[0] for line in removed] == [
        "camera cam1: override removed",
        "camera cam2: override removed",
    ]
    assert doc().per_camera == {}
    assert rollback_lines(4, "--dry-run") == [
        f"camera cam1: override restored: {cam1_v4}",
        f"camera cam2: override restored: {cam2}",
    ]


def test_a_camera_id_not_checked_by_a_daemon_is_said_so_naming_the_cameras_the_bundle_knows(tmp_path, capsys):
    """`--camera cam01` (for cam1) without --apply once wrote an override nobody uses, and the daemon's reload took it
    without a word: the operator believed cam1 recalibrated."""
    bundle, good, _ = grey_station(tmp_path, n_good=12)

    code, out, err = calibrate(capsys, bundle, "--good", good, "--camera", "cam01", "--dry-run")
    assert code == 0, err
    assert (
        f"WARNING: --camera cam01 was not checked against the station's cameras, and no thresholds version of {bundle} "
        "names it (they name no camera yet): an override for a camera the daemon does not run judges nothing" in out
    ), out
    assert out.rstrip().endswith("dry run: version 2 not written, not applied")

    code, out, err = calibrate(capsys, bundle, "--good", good, "--camera", "cam1")
    assert code == 0, err
    assert set(thresholds_doc.read(bundle / thresholds_doc.FILE_NAME).per_camera) == {"cam1"}

    # The cameras the bundle's thresholds name are what it can show; one of them is only noted.
    code, out, err = calibrate(capsys, bundle, "--good", good, "--camera", "cam01", "--dry-run")
    assert code == 0 and "names it (they name camera(s) cam1): an override" in out, out
    code, out, err = calibrate(capsys, bundle, "--good", good, "--camera", "cam1", "--dry-run")
    assert code == 0 and "WARNING: --camera" not in out, out
    assert (
        "note: --camera cam1 was not checked against the station's cameras (give --apply ENDPOINT (the running "
        f"daemon's control socket) to check it); the thresholds of {bundle} name camera(s) cam1" in out
    ), out
    # A daemon that does not answer checked nothing either.
    code, out, err = calibrate(
        capsys, bundle, "--good", good, "--camera", "cam9", "--apply", f"ipc://{tmp_path}/none.sock", "--timeout", "0.5"
    )
    assert code == 1 and "no reply within 0.5 s" in err, err
    assert "WARNING: --camera cam9 was not checked" in out, out


def test_a_name_that_is_not_utf8_is_named_not_fatal_under_a_strict_locale(tmp_path):
    """A Windows ZIP unpacked leaves Latin-1 names; under a station locale (stdout strict, here by PYTHONIOENCODING)
    calibrate's note naming such a file once raised inside the run and refused the whole calibration."""
    bundle, good, _ = grey_station(tmp_path, n_good=12)
    twin = os.path.join(os.fsencode(good), b"Pr\xfcfteil.png")  # a byte copy: named in the duplicates note
    shutil.copyfile(good / "0000.png", twin)
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "calibrate", str(bundle), "--good", str(good), "--dry-run"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    out = done.stdout.decode("utf-8")
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    assert "duplicate image(s) left out" in out and "Pr\\udcfcfteil.png" in out, out
    assert out.rstrip().endswith("dry run: version 2 not written, not applied"), out


def test_a_defective_image_without_a_mask_leaves_the_pixel_rule_on_the_masks_with_a_warning(tmp_path, capsys):
    """One mask missing out of 10 (a partial copy, a defect type not labelled yet) once switched --pixel, without a
    word, from the masks' F1-max to the good pixels' rate, and a mask that did not decode was then never read: now the
    masks there are set the pixel threshold as eval scores them, the maskless image is left out of the pixels and
    counted, and the damaged mask is named."""
    bundle, good, crack = grey_station(tmp_path, n_good=20, n_defect=10)
    flags = ("--good", good, "--defective", crack, "--pixel", "--pixel-fpr", "0.01")
    code, out, err = calibrate(capsys, bundle, *flags, "--dry-run")
    assert code == 0, err
    every_mask = [line for line in out.splitlines() if line.startswith("pixel threshold")]
    assert every_mask and "over ground-truth masks" in every_mask[0], out

    masks = crack.parent.parent / "ground_truth" / "crack"
    (masks / "000_mask.png").unlink()
    cut_short(masks / "001_mask.png")
    code, out, err = calibrate(capsys, bundle, *flags)
    assert code == 0, err
    lines = out.splitlines()
    assert "note: --pixel-fpr 0.01 not used: the defects have masks, the pixel threshold is their pixel F1-max" in lines
    assert (
        f"WARNING: 1 of 10 defective images have no ground-truth mask ({crack / '000.png'}): they are left out of the "
        "pixel threshold, the pixel F1-max over those with masks, as eval leaves them out of its pixel metrics; give "
        "each its mask for the pixel threshold to cover them"
    ) in lines, out
    assert f"WARNING: skipped 1 image(s) that do not decode: {masks / '001_mask.png'}" in lines, out
    pixel = [line for line in lines if line.startswith("pixel threshold")]
    assert [line.split(":")[0] for line in pixel] == [every_mask[0].split(":")[0]], out
    # Over the 8 whose masks were read, not the 9 with masks named before scoring (one did not decode).
    assert "over ground-truth masks (8 defective images)" in pixel[0], out
    written = thresholds_doc.read(bundle / thresholds_doc.FILE_NAME)
    assert written.provenance["target"]["pixel"]["kind"] == "max_f1"
    prov = written.provenance
    assert (prov["n_defective"], prov["n_skipped_defective"], prov["n_defective_without_mask"]) == (9, 1, 1)


def sixteen_bit_frames(folder: Path, n: int, shift: int) -> Path:
    """`n` good frames saved as 16-bit PNGs holding 8 + `shift` significant bits (4: a Mono12 camera's values)."""
    import cv2

    from station_model import good_frame

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), good_frame(i).astype(np.uint16) << shift)
    return folder


def test_sixteen_bit_frames_of_another_depth_than_the_bundles_are_warned_of_and_a_mixed_set_refused(tmp_path, capsys):
    """12-bit frames given to a bundle that declares no depth were narrowed >> 8 to near black without a word (a
    threshold of 0.945 where the same frames at their own depth give 0.086); a folder of 8- and 16-bit frames,
    which train refuses, was taken."""
    import cv2

    from station_model import good_frame, write_grey_bundle

    plain = write_grey_bundle(tmp_path / "plain")
    twelve = write_grey_bundle(tmp_path / "twelve", bit_depth=12)
    good = sixteen_bit_frames(tmp_path / "g12", 12, 4)
    code, out, err = calibrate(capsys, plain, "--good", good, "--target-false-reject", "0.3", "--dry-run")
    assert code == 0, err
    assert (
        f"WARNING: --good: 16-bit images, largest value {_largest(good)}: "
        f"12-bit, and {plain} narrows 16-bit frames as 16-bit (it declares no input.bit_depth, >> 8): the model sees "
        "them darker than 12-bit frames are"
    ) in out, out
    code, out, err = calibrate(capsys, twelve, "--good", good, "--target-false-reject", "0.3", "--dry-run")
    assert code == 0 and "16-bit images" not in out, out

    cv2.imwrite(str(good / "zz8.png"), good_frame(99))
    code, out, err = calibrate(capsys, twelve, "--good", good, "--target-false-reject", "0.3", "--dry-run")
    assert code == 2 and err.count("\n") == 1, err
    assert err == (
        f"inspectd calibrate: {good / 'zz8.png'}: 8-bit pixels, and {good / '000.png'}: 16-bit, expected images of "
        "one bit depth (frames saved the same way from one camera)\n"
    ), err
    assert "image threshold" not in out


def _largest(folder: Path) -> int:
    import cv2

    return max(int(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).max()) for path in folder.iterdir())


@pytest.mark.parametrize(("cwd", "typed"), [("mv/test", "crack"), ("mv/test/crack", "."), ("mv/test/good", "../crack")])
def test_a_type_folder_typed_relative_finds_its_masks(tmp_path, capsys, monkeypatch, cwd, typed):
    """`--defective crack` typed inside test/ (or `.`, `../crack`) looked for ground_truth/ beside the working
    folder: no mask was found, and --pixel set the pixel threshold on the good pixels' rate without a word."""
    bundle, good, crack = grey_station(tmp_path, n_good=20, n_defect=6)
    (crack.parent / "good").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", typed, "--pixel", "--dry-run")
    assert code == 0, err
    assert "over ground-truth masks" in out and "good pixels at or above it" not in out, out


@pytest.mark.parametrize("whole", [False, True])
def test_masks_named_otherwise_are_noted_as_eval_notes_them(tmp_path, capsys, whole):
    """Masks named `<stem>_GT.png` (KolektorSDD2): eval said none of them was the mask of an image; calibrate --pixel
    set the pixel threshold on the good pixels' rate without a word, for a dataset root and a type folder alike."""
    bundle, good, crack = grey_station(tmp_path, n_good=20, n_defect=6)
    masks = crack.parent.parent / "ground_truth" / "crack"
    for mask in masks.iterdir():
        mask.rename(masks / mask.name.replace("_mask", "_GT"))
    defective = crack.parent.parent if whole else crack
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", defective, "--pixel", "--dry-run")
    assert code == 0, err
    assert (
        f"note: {masks} holds 6 file(s), none of them the mask of an image in test/crack/, so that type has no pixel "
        "metrics: expected 000_mask.png or 000.png (any image extension, any case)"
    ) in out.splitlines(), out
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", defective, "--dry-run")
    assert code == 0 and "none of them the mask" not in out, out  # without --pixel the masks are not read


def test_images_in_sub_folders_of_good_and_of_a_type_folder_are_noted(tmp_path, capsys):
    """Calibrate read only the images directly in --good and in test/<type>: the false-reject bound and the drift
    reference were set on a third of the good frames given, and a type's images in batch1/ went unused, without a
    word (train says so of train/good)."""
    import cv2

    from station_model import defect_frame, good_frame

    bundle, good, crack = grey_station(tmp_path, n_good=20, n_defect=4)
    (good / "day2").mkdir()
    for i in range(3):
        cv2.imwrite(str(good / "day2" / f"d{i}.png"), good_frame(100 + i))
    (crack / "batch1").mkdir()
    cv2.imwrite(str(crack / "batch1" / "b0.png"), defect_frame(50))
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", crack, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert (
        f"note: 3 images in sub-folders of {good} left out, only the images directly in it are calibrated on: "
        "day2/ (3); move them up into it to calibrate on them"
    ) in lines, out
    assert (
        f"note: 1 image in sub-folders of {crack} left out, only the images directly in it are calibrated on: "
        "batch1/ (1); move them up into it to calibrate on them"
    ) in lines, out
    for image in crack.glob("*.png"):
        image.unlink()
    code, out, err = calibrate(capsys, bundle, "--good", good, "--defective", crack, "--dry-run")
    assert code == 2 and "no defective images found; 1 image in sub-folders of" in err, err


def test_eval_notes_images_in_sub_folders_of_test_good_and_a_type_folder(tmp_path):
    """Eval read only the images directly in test/good and test/<type>, as calibrate did, without a word."""
    import cv2

    from engines.training.evaluate import evaluate
    from station_model import good_frame

    bundle, good, crack = grey_station(tmp_path, n_good=2, n_defect=3)
    root = crack.parent.parent
    (root / "test" / "good" / "day2").mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(root / "test" / "good" / f"g{i}.png"), good_frame(i))
        cv2.imwrite(str(root / "test" / "good" / "day2" / f"d{i}.png"), good_frame(10 + i))
    notes = evaluate(bundle, root)["notes"]
    assert (
        f"note: 2 images in sub-folders of {root / 'test' / 'good'} left out, only the images directly in it are "
        "evaluated: test/good/day2/ (2); move them up into it to evaluate them"
    ) in notes, notes
