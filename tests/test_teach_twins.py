"""teach leaves out frames with the same pixels in other bytes (a stuck frame the camera encoded again, another PNG
compression level) as it leaves out byte copies: a held-out frame's twin in the fit scores it about 0, and the
threshold and drift reference set on such scores reject most good parts. And what the fit or the thresholds refuse
(ValueError) is one line, exit 2, as calibrate gives it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.bundle.store import load_bundle
from engines.data.synthline import SyntheticLine
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[1]
N = 16


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("line")
    SyntheticLine(96, 96, seed=3).write_folder(folder, N)
    return folder


@pytest.fixture(scope="module")
def trained(line, tmp_path_factory) -> Path:
    from engines.training.train import Progress, train_bundle

    out = tmp_path_factory.mktemp("bundles") / "memory"
    # Every patch kept: a twin's patches then are the held-out frame's own, as on a line with a large memory bank.
    train_bundle(
        line,
        out,
        size=(64, 64),
        scorer="memory",
        k=2,
        memory_size=100000,
        seed=5,
        holdout=0.25,
        progress=Progress(enabled=False),
    )
    return out


def written(folder: Path, sources: list[Path], compressions: dict[str, int]) -> Path:
    """Each of `sources` as <prefix><i>.png for each prefix, PNG compression level: the same pixels in other bytes."""
    folder.mkdir()
    for i, source in enumerate(sources):
        image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
        for prefix, level in compressions.items():
            cv2.imwrite(str(folder / f"{prefix}{i:03d}.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, level])
    return folder


def test_frames_with_the_same_pixels_in_other_bytes_are_taught_on_once(trained, line, tmp_path):
    """Each frame twice, at PNG compression 1 and 9: once every held-out frame's twin was fitted, its score was
    about 0 (held-out median 0), and the taught threshold rejected 39 of 40 fresh good frames. The twins are left out
    and named, and the teach is the one on the frames alone: the same threshold, drift reference and record."""
    from calibration.teach import teach

    sources = sorted(line.glob("*.png"))
    alone = written(tmp_path / "alone", sources, {"a": 1})
    twice = written(tmp_path / "twice", sources, {"a": 1, "b": 9})
    assert (twice / "a000.png").read_bytes() != (twice / "b000.png").read_bytes()

    results = {}
    for name, folder in (("alone", alone), ("twice", twice)):
        bundle = Path(shutil.copytree(trained, tmp_path / f"bundle-{name}"))
        out = io.StringIO()
        taught = teach(bundle, folder, holdout=0.25, by="tester", out=out)
        results[name] = (taught, out.getvalue())

    (alone_taught, alone_out), (twice_taught, twice_out) = results["alone"], results["twice"]
    notes = [line for line in twice_out.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {N} duplicate image(s) (the same pixels in other bytes) left out: b000.png (same as a000.png), "
        "b001.png (same as a001.png), b002.png (same as a002.png) ..."
    ], twice_out
    assert not [line for line in alone_out.splitlines() if line.startswith("note: ")], alone_out

    record, plain = twice_taught.manifest["teach"], alone_taught.manifest["teach"]
    assert record["frames"]["n"] == N and record["frames"]["n_duplicates"] == N, record["frames"]
    # The same frames, names and pixels alike, as the teach without the twins.
    assert {k: v for k, v in record["frames"].items() if k not in ("n_duplicates", "folder")} == {
        k: v for k, v in plain["frames"].items() if k != "folder"
    }
    assert record["comparison"]["taught"] == plain["comparison"]["taught"]
    assert record["comparison"]["taught"]["score_median"] > 0
    thresholds, expected = twice_taught.thresholds(), alone_taught.thresholds()
    assert thresholds.image_threshold == expected.image_threshold
    for key in ("good_scores", "good_brightness"):
        assert thresholds.provenance[key] == expected.provenance[key], key


def test_frames_that_are_all_one_frames_pixels_are_refused_as_too_few(tmp_path):
    """Two files of one frame's pixels are one frame: nothing would be left to hold out once it is fitted."""
    from station_model import good_frame
    from test_teach import stand_in

    bundle = stand_in(tmp_path / "b")
    good = tmp_path / "good"
    good.mkdir()
    cv2.imwrite(str(good / "000.png"), good_frame(0), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    cv2.imwrite(str(good / "001.png"), good_frame(0), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    out = inspectd("teach", str(bundle), "--good", str(good))
    assert out.returncode == 2, out
    assert out.stdout.splitlines() == [
        "note: 1 duplicate image(s) (the same pixels in other bytes) left out: 001.png (same as 000.png)"
    ], out.stdout
    assert out.stderr.splitlines() == [
        f"inspectd teach: --good {good}: 1 distinct good frame(s) (1 more left out with the same pixels), expected at "
        "least 2 (some fit, some are held out)"
    ], out.stderr


def test_an_archive_teachs_ids_stay_in_step_with_its_frames_when_twins_are_left_out(tmp_path):
    from calibration import teach

    paths = [tmp_path / f"{i}.png" for i in range(4)]
    archived = teach.GoodFrames(paths, "--archive A", {"ids": ["a", "b", "c", "d"], "n_duplicates": 2}, {})
    kept = teach.without_twins(archived, [paths[0], paths[2]], [(paths[1], paths[0]), (paths[3], paths[2])])
    assert kept.paths == [paths[0], paths[2]]
    assert kept.record == {"ids": ["a", "c"], "n_duplicates": 4}
    assert list(kept.duplicates) == [(paths[1], paths[0]), (paths[3], paths[2])]


def inspectd(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", *argv], capture_output=True, text=True, cwd=REPO, timeout=240
    )


def test_a_recipe_teach_cannot_fit_is_one_line_not_a_traceback(trained, line, tmp_path):
    """A bundle whose recipe names an augment this version does not know (one a newer version trained): the fit's
    ValueError ended teach with a traceback; now one line, exit 2, and the bundle as it was."""
    bundle = Path(shutil.copytree(trained, tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recipe"]["augment"] = "rot90-v9"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = load_bundle(bundle).model_id
    out = inspectd("teach", str(bundle), "--good", str(line))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines() == ["inspectd teach: augment 'rot90-v9': expected one of none, rot180"], out.stderr
    assert load_bundle(bundle).model_id == before and not (tmp_path / "b.versions").exists()
    assert np.array_equal(
        load_bundle(bundle).scorer_params()["memory_bank"], load_bundle(trained).scorer_params()["memory_bank"]
    )
