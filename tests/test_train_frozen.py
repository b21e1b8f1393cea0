"""`inspectd train --method frozen` end to end on real image files (see tiny_dataset): a complete, loadable, runnable
bundle; first thresholds from held-out images; repeatable with --seed; Ctrl-C still leaves a usable bundle (exit 130);
the scorers' fitting (k-means picks real samples, Ledoit-Wolf matches sklearn); one-line errors for bad arguments."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engines.bundle.store import load_bundle
from engines.data.images import MvtecFolder, list_images
from engines.errors import DataError
from engines.runtime import open_engine
from engines.training.train import Progress, add_arguments, run, train_bundle, training_images
from tiny_dataset import good_images, make_tiny_mvtec, one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see tiny_dataset.one_torch_thread


def cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_mvtec(tmp_path_factory.mktemp("data"), n_train=12, n_test_good=2, n_test_defect=2)


@pytest.fixture(scope="module")
def cli_bundle(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "frozen"
    done = cli(
        "--method", "frozen", "--data", str(data), "--out", str(out), "--size", "64", "--seed", "3", "--batch", "4"
    )
    return out, done


def test_cli_writes_a_complete_bundle(cli_bundle, data):
    out, done = cli_bundle
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(out)
    assert bundle.model_id in done.stdout and "11 images fitted, 1 held out" in done.stdout
    assert "features 11/11" in done.stderr and "ETA" in done.stderr  # the progress line
    assert bundle.manifest["interrupted"] is False
    training = bundle.manifest["training"]
    assert (training["n_fit"], training["n_holdout"], training["n_scorer_fit"], training["seed"]) == (11, 1, 11, 3)
    # How the 11 were chosen, so `inspectd teach` on the same images fits on the same 11.
    assert (training["split"], training["holdout"]) == ("split_holdout", 0.1)
    assert training["scorer"] == "gaussian" and bundle.scorer_inputs == ("gauss_mean", "gauss_precision")
    # Fitted axis by axis in training, so in the daemon, calibrate and teach too.
    assert bundle.manifest["input"]["resample"] == "each_axis" and bundle.each_axis
    thresholds = bundle.thresholds()
    assert thresholds.provenance["good_dir"] == str(data.resolve())
    assert thresholds.provenance["images"] == "held-out" and thresholds.provenance["n_good"] == 1
    assert "max held-out" in thresholds.provenance["rule"]["image"]
    # Both drift references, so a freshly trained bundle's alarm watches brightness from its first frame; the one
    # held-out score is too few for the score alarm, which stays off, as train says.
    from inspectd.daemon.drift import monitor_for

    assert thresholds.provenance["good_brightness"]["n"] == 12
    monitor = monitor_for(thresholds, "cam0")
    assert monitor.brightness.active and not monitor.active
    assert "WARNING: 1 good images scored for the first thresholds are too few" in done.stdout
    with open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=2) as engine:
        assert engine.input_shape == (64, 64, 1)
        result = engine.infer(np.full((2, 64, 64, 1), 128, np.uint8))
    assert result.scores.shape == (2,) and np.isfinite(result.maps).all()


def test_painted_defect_scores_higher_and_is_localised(cli_bundle, data):
    from engines.data.images import load_image
    from engines.runtime.preprocess import fit_frame

    out, _ = cli_bundle
    bundle = load_bundle(out)
    clean = fit_frame(load_image(sorted((data / "test" / "good").iterdir())[0]), bundle.input_shape)[0]
    damaged = clean.copy()
    cv2.circle(damaged, (46, 18), 7, 0, thickness=-1)  # a dark hole, like a blowhole, off centre
    with open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=2) as engine:
        result = engine.infer(np.stack([clean, damaged]))
    assert result.scores[1] > result.scores[0]
    peak_y, peak_x = np.unravel_index(np.argmax(result.maps[1] - result.maps[0]), (64, 64))
    assert abs(peak_x - 46) <= 12 and abs(peak_y - 18) <= 12, (peak_x, peak_y)


def test_same_seed_same_bundle(data, tmp_path):
    quiet = Progress(enabled=False)
    first = train_bundle(data, tmp_path / "a", size=(64, 64), scorer="kmeans", k=3, seed=5, progress=quiet)
    second = train_bundle(data, tmp_path / "b", size=(64, 64), scorer="kmeans", k=3, seed=5, progress=quiet)
    assert first.model_id == second.model_id
    assert (first.image_threshold, first.pixel_threshold) == (second.image_threshold, second.pixel_threshold)
    assert (tmp_path / "a" / "scorer.npz").read_bytes() == (tmp_path / "b" / "scorer.npz").read_bytes()


def as_twelve_bit(source: Path, target: Path) -> Path:
    """Every image of an MVTec folder as a 12-bit camera would save it: 16-bit PNG, value << 4 plus noise in the low
    bits, which narrowing >> 4 takes off again. Masks are copied."""
    rng = np.random.default_rng(0)
    for path in sorted(source.rglob("*")):
        out = target / path.relative_to(source)
        if path.is_dir() or "ground_truth" in path.parts:
            out.mkdir(parents=True, exist_ok=True) if path.is_dir() else shutil.copy(path, out)
            continue
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        twelve = (grey.astype(np.uint16) << 4) | rng.integers(0, 16, grey.shape, dtype=np.uint16)
        assert cv2.imwrite(str(out.with_suffix(".png")), twelve)
    return target


def test_16_bit_images_train_and_score_by_their_detected_bit_depth(data, tmp_path):
    """A 12-bit camera's training set (16-bit PNGs, 0-4095) is taken as 12-bit: the bundle is the one its 8-bit
    images give, records input.bit_depth 12, and scores the 12-bit test images as the 8-bit ones. Narrowed >> 8 as
    before, the images were 0-15 grey levels."""
    from engines.data.images import DetectedDepth, detect_bit_depth
    from engines.training.evaluate import evaluate, format_table, score_images

    twelve = as_twelve_bit(data, tmp_path / "twelve")
    quiet = Progress(enabled=False)
    lines: list[str] = []
    eight_bit = train_bundle(
        data, tmp_path / "a", size=(64, 64), scorer="gaussian", seed=2, progress=quiet, report=lines.append
    )
    assert lines[0].startswith("recipe flags without --recipe: a custom recipe from the flags, not auto")
    assert lines[1].startswith("8-bit images: no bit depth recorded, so 16-bit frames on the line are narrowed >> 8")
    detected = train_bundle(
        twelve, tmp_path / "b", size=(64, 64), scorer="gaussian", seed=2, progress=quiet, report=lines.append
    )
    assert load_bundle(detected.bundle).bit_depth == 12 and load_bundle(eight_bit.bundle).declared_bit_depth is None
    # The same fit; the declared depth is part of the id (it decides what a 16-bit frame is judged on).
    assert (tmp_path / "a" / "scorer.npz").read_bytes() == (tmp_path / "b" / "scorer.npz").read_bytes()
    assert detected.model_id != eight_bit.model_id
    # The training set's own largest value, not the tiles' (4080-4095): the synthetic line's frames stay darker.
    largest = max(int(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).max()) for p in (twelve / "train" / "good").iterdir())
    assert 2048 <= largest < 4096
    assert any(line.startswith(f"16-bit images: largest value {largest}, taken as 12-bit") for line in lines), lines
    tests = sorted((data / "test").rglob("*.jpg"))
    expected = [s.score for s in score_images(eight_bit.bundle, tests, batch=2)]
    scored = score_images(detected.bundle, [twelve / p.relative_to(data).with_suffix(".png") for p in tests], batch=2)
    np.testing.assert_allclose([s.score for s in scored], expected, rtol=1e-5)
    report = evaluate(detected.bundle, twelve, batch=2, progress=quiet)
    assert report["bit_depth"] == 12 and "16-bit images as 12-bit" in format_table(report).splitlines()[0]
    assert report["overall"] == evaluate(eight_bit.bundle, data, batch=2, progress=quiet)["overall"]
    forced = train_bundle(
        twelve, tmp_path / "c", size=(64, 64), scorer="gaussian", seed=2, progress=quiet, bit_depth=16
    )
    assert load_bundle(forced.bundle).declared_bit_depth == 16
    assert (tmp_path / "c" / "scorer.npz").read_bytes() != (tmp_path / "a" / "scorer.npz").read_bytes()
    with pytest.raises(ValueError, match=r"--bit-depth 12\.0: expected an integer 8-16"):
        train_bundle(twelve, tmp_path / "d", size=(64, 64), scorer="gaussian", progress=quiet, bit_depth=12.0)

    folder = tmp_path / "depths"
    folder.mkdir()
    assert detect_bit_depth(sorted((data / "train" / "good").iterdir())) is None  # 8-bit JPEGs
    # An odd value beside the largest: the low bits are in use (not left-aligned).
    for largest, depth in ((1, 8), (255, 8), (256, 10), (1023, 10), (1500, 12), (4095, 12), (4096, 14), (65535, 16)):
        for suffix in (".png", ".tiff"):
            assert cv2.imwrite(str(folder / f"a{suffix}"), np.array([[1, largest]], np.uint16))
            detected = detect_bit_depth([folder / f"a{suffix}"])
            assert (detected.bits, detected.largest) == (depth, largest)
    # A 16-bit RGBA PNG: its opaque alpha (65535) is no pixel value.
    assert cv2.imwrite(
        str(folder / "rgba.png"), np.dstack([np.full((2, 2, 3), 4001, np.uint16)] + [np.full((2, 2), 65535, np.uint16)])
    )
    assert detect_bit_depth([folder / "a.png", folder / "rgba.png"]).bits == 16
    assert (detect_bit_depth([folder / "rgba.png"]).bits, detect_bit_depth([folder / "rgba.png"]).largest) == (12, 4001)
    # A 12-bit camera's words saved left-aligned (<< 4, as some tools do): full scale is 16-bit's. Dark (below
    # 2**14) they read as 14-bit pixels too, which keeps every level: taken so, and train says so with a note
    # (tests/test_train_inputs.py).
    assert cv2.imwrite(str(folder / "left.png"), np.array([[16, 999 << 4, 3000 << 4]], np.uint16))
    assert detect_bit_depth([folder / "left.png"]) == DetectedDepth(16, 48000, 4)
    assert cv2.imwrite(str(folder / "dark.png"), np.array([[16, 999 << 4, 1000 << 4]], np.uint16))
    assert detect_bit_depth([folder / "dark.png"]).ambiguous and not detect_bit_depth([folder / "left.png"]).ambiguous
    assert detect_bit_depth([folder / "dark.png"]).bits == 14
    # One 8-bit image among 16-bit ones would be narrowed unlike them: refused, naming one of each.
    assert cv2.imwrite(str(folder / "b.png"), np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError) as mixed:
        detect_bit_depth([folder / "b.png", folder / "rgba.png"])
    assert str(mixed.value) == (
        f"{folder / 'b.png'}: 8-bit pixels, and {folder / 'rgba.png'}: 16-bit, expected images of one bit depth "
        "(frames saved the same way from one camera)"
    )


def test_plain_folder_colour_and_padding(data, tmp_path):
    """A plain folder (no MVTec layout) with one colour image: 3 channels, non-square input, pad policy, no holdout."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for path in sorted((data / "train" / "good").iterdir())[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    grey = cv2.imread(str(sorted(folder.iterdir())[0]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(folder / "tinted.png"), cv2.merge([grey, grey // 2, grey]))
    result = train_bundle(
        folder,
        tmp_path / "g",
        size=(64, 96),
        resize="pad",
        scorer="gaussian",
        holdout=0.0,
        progress=Progress(enabled=False),
    )
    bundle = load_bundle(result.bundle)
    assert bundle.input_shape == (64, 96, 3) and bundle.resize_policy == "pad"
    assert bundle.scorer_inputs == ("gauss_mean", "gauss_precision")
    params = bundle.scorer_params()
    d = params["gauss_mean"].shape[0]
    assert params["gauss_mean"].shape == (d, 4, 6) and params["gauss_precision"].shape == (d, d)
    np.testing.assert_allclose(params["gauss_precision"], params["gauss_precision"].T, rtol=0, atol=1e-5)
    assert bundle.thresholds().provenance["images"] == "training" and result.n_holdout == 0
    with open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=1) as engine:
        assert engine.infer(np.zeros((1, 64, 96, 3), np.uint8)).maps.shape == (1, 64, 96)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_leaves_a_usable_interrupted_bundle(tmp_path, signum):
    paths = good_images(tmp_path / "source", 4)
    source = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(240):
        # Each file its own image (one grey level apart): copies of the same pixels as the model takes them would be
        # left out as duplicates, and one pixel apart vanishes in the resize to the model's input.
        image = cv2.add(source[i % 4], i // 4)
        assert cv2.imwrite(str(folder / f"{i:04d}.png"), image)
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inspectd",
            "train",
            "--data",
            str(folder),
            "--out",
            str(out),
            "--size",
            "96",
            "--batch",
            "1",
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while not line.startswith("features") and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "trainer exited before extracting features"
        assert line.startswith("features"), "no progress line within 120 s"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "INTERRUPTED" in stdout
    bundle = load_bundle(out)
    assert bundle.manifest["interrupted"] is True
    training = bundle.manifest["training"]
    assert training["n_scorer_fit"] >= 1 and training["n_scorer_fit"] < training["n_fit"] == 216
    with open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=1) as engine:
        assert np.isfinite(engine.infer(np.full((1, 96, 96, 1), 100, np.uint8)).scores).all()


def test_kmeans_references_are_real_samples_one_per_cluster():
    from engines.model.graph import NearestReferenceScorer

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1, 8, 2, 2, generator=generator)
    b = -a
    features = torch.cat(
        [
            a + 0.05 * torch.randn(6, 8, 2, 2, generator=generator),
            b + 0.05 * torch.randn(5, 8, 2, 2, generator=generator),
        ]
    )
    references = torch.from_numpy(NearestReferenceScorer.fit(features, k=2, seed=1)["references"])
    assert references.shape == (2, 8, 2, 2)
    rows = [int(torch.nonzero((features == r).flatten(1).all(dim=1))[0]) for r in references]
    assert sorted(row < 6 for row in rows) == [False, True]  # one from each cluster, each a real training sample
    assert NearestReferenceScorer.fit(features, k=50)["references"].shape[0] <= 11


def test_kmeans_keeps_the_same_reference_of_a_two_member_cluster_under_float_noise():
    """A two-member cluster's centroid is exactly as near to both members, so which one became the reference was
    decided by float noise: train (torch features) and teach (ONNX Runtime's, ~1e-6 apart) kept different ones."""
    from engines.runtime.scorer_fit import fit_kmeans

    rng = np.random.default_rng(0)
    pair = rng.standard_normal((1, 8, 2, 2)).astype(np.float32)
    features = np.concatenate(
        [pair + 0.1 * rng.standard_normal((2, 8, 2, 2)), -pair + 0.1 * rng.standard_normal((6, 8, 2, 2))]
    )
    features = features.astype(np.float32)
    for trial in range(12):
        noisy = features * (1 + 1e-6 * np.random.default_rng(trial).standard_normal(features.shape)).astype(np.float32)
        references = fit_kmeans(noisy, k=2, seed=3)["references"]
        chosen = sorted(int(np.argmin(np.abs(noisy - r).reshape(len(noisy), -1).max(axis=1))) for r in references)
        assert chosen[0] == 0 and chosen[1] >= 2, (trial, chosen)  # the pair's first member, and one of the rest


def test_ledoit_wolf_matches_sklearn():
    covariance = pytest.importorskip("sklearn.covariance", reason="scikit-learn (test extra) is the reference")
    from engines.runtime.scorer_fit import ledoit_wolf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40)) * 0.3
    x -= x.mean(axis=0)
    expected, _shrinkage = covariance.ledoit_wolf(x, assume_centered=True)
    np.testing.assert_allclose(ledoit_wolf(x), expected, rtol=1e-10, atol=1e-12)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bad_arguments_are_one_line_errors(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(data), "--out", str(tmp_path / "x"), "--size", "10"], "--size '10': expected each side"),
        (["--data", str(data), "--out", str(tmp_path / "x"), "--size", "64x"], "expected N or HxW"),
        (["--data", str(data), "--out", str(tmp_path / "x"), "--holdout", "1.5"], "--holdout 1.5: expected"),
        (["--data", str(data), "--out", str(tmp_path / "x"), "--memory-size", "0"], "--memory-size 0: expected"),
        (
            ["--data", str(data), "--out", str(tmp_path / "x"), "--bit-depth", "7"],
            "--bit-depth 7: expected an integer 8-16",
        ),
        # Refused before training: the export at its end failed only after the whole run.
        (["--data", str(data), "--out", str(tmp_path / "x"), "--opset", "21"], "--opset 21: expected 17 to 20"),
        (["--data", str(empty), "--out", str(tmp_path / "x")], "no images"),
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "not a directory"),
    ]
    for argv, expected in cases:
        assert run(parse(*argv)) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 256, (32, 32), dtype=np.uint8))
    return folder


def test_hidden_files_are_not_images_in_training_or_test_folders(tmp_path):
    """A copy from a Mac to exFAT, SMB or a USB stick leaves an AppleDouble `._name.png` beside each image: read as an
    image, its first byte refused the whole training set at decode."""
    root = tmp_path / "cat"
    for folder in (_images(root / "train" / "good", 2), _images(root / "test" / "crack", 1)):
        (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        (folder / ".hidden.png").write_bytes((folder / "000.png").read_bytes())
    assert [p.name for p in list_images(root / "train" / "good")] == ["000.png", "001.png"]
    assert [p.name for p in training_images(root)] == ["000.png", "001.png"]
    assert [item.path.name for item in MvtecFolder(root).test_items()] == ["000.png"]


def test_data_refusals_name_the_folder_read_and_the_way_out(tmp_path, capsys):
    def refusal(*argv: str) -> str:
        assert run(parse("--out", str(tmp_path / "x"), *argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err.strip()

    expected = "expected train/good/*.png|jpg or a folder of images"
    nested = tmp_path / "nested"
    _images(nested / "train" / "good" / "batch1", 3)
    assert refusal("--data", str(nested)) == (
        f"inspectd train: {nested}: no images (read {nested / 'train' / 'good'}), {expected}; found 3 images in "
        "train/good/batch1/: point --data at it"
    )
    caps = tmp_path / "caps"
    _images(caps / "Train" / "Good", 2)
    assert refusal("--data", str(caps)) == (
        f"inspectd train: {caps}: no images, {expected}; found 2 images in Train/Good/: point --data at it"
    )
    cat = tmp_path / "cat"
    _images(cat / "train" / "good", 1)
    assert refusal("--data", str(cat / "train")) == (
        f"inspectd train: {cat / 'train'}: no images, {expected}; found 1 image in good/: point --data at it"
    )
    # One distinct image, whatever the recipe: thresholds set on its own score (about 0) made every frame a defect,
    # the image itself included on ONNX Runtime. Copies of it are no second image.
    one = f"inspectd train: {cat / 'train' / 'good'}: 1 distinct training image"
    expected = "expected at least 2 to hold one out for the thresholds: add images"
    assert refusal("--data", str(cat)) == f"{one}, {expected}"
    for recipe in ("patchcore", "fine", "aligned"):
        assert refusal("--data", str(cat), "--recipe", recipe, "--size", "32") == f"{one}, {expected}"
    for n in range(1, 12):
        shutil.copy(cat / "train" / "good" / "000.png", cat / "train" / "good" / f"copy{n:02d}.png")
    assert refusal("--data", str(cat), "--recipe", "patchcore", "--size", "32") == (
        f"{one} (11 more left out as copies of it), {expected}"
    )
    assert not (tmp_path / "x").exists()
    # numpy refused a negative seed only after decoding every image, in words that named no flag.
    with pytest.raises(SystemExit):
        parse("--data", str(cat), "--out", str(tmp_path / "x"), "--seed", "-1")
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("error: argument --seed: -1: expected an integer >= 0")
    )


def test_recipe_flags_without_a_recipe_say_that_auto_does_not_choose(tmp_path, capsys):
    """--resize pad alone, given to letterbox non-square frames, trains a custom recipe rather than auto's choice."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for flags, line in [
        (["--resize", "pad"], "; add --recipe auto to keep choosing with these flags"),
        (["--method", "cse"], ""),
        (["--recipe", "auto", "--resize", "pad"], None),
        ([], None),
    ]:
        assert run(parse("--data", str(empty), "--out", str(tmp_path / "x"), *flags)) == 2
        out = capsys.readouterr().out
        said = "recipe flags without --recipe: a custom recipe from the flags, not auto"
        assert out == ("" if line is None else said + line + "\n"), flags


def test_gaussian_fit_does_not_depend_on_its_chunking():
    from engines.model.graph import GaussianScorer

    features = torch.randn(9, 12, 3, 3, generator=torch.Generator().manual_seed(2))
    whole = GaussianScorer.fit(features, chunk=100)
    chunked = GaussianScorer.fit(features, chunk=2)
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole["gauss_mean"], features.mean(dim=0).numpy(), rtol=1e-5, atol=1e-6)
    single = GaussianScorer.fit(features[:1])  # no spread at all: still a finite, usable precision
    assert np.isfinite(single["gauss_precision"]).all() and np.diag(single["gauss_precision"]).min() > 0


def test_memory_scorer_bundle_finds_a_painted_defect(data, tmp_path):
    out = tmp_path / "memory"
    done = cli(
        "--method",
        "frozen",
        "--scorer",
        "memory",
        "--memory-size",
        "40",
        "--data",
        str(data),
        "--out",
        str(out),
        "--size",
        "64",
        "--batch",
        "4",
    )
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(out)
    assert bundle.scorer_inputs == ("memory_bank",) and bundle.manifest["training"]["memory_size"] == 40
    bank = bundle.scorer_params()["memory_bank"]
    assert bank.shape == (40, 432) and np.isfinite(bank).all()  # 11 images x 4x4 patches cut to 40
    from engines.data.images import load_image
    from engines.runtime.preprocess import fit_frame

    clean = fit_frame(load_image(sorted((data / "test" / "good").iterdir())[0]), bundle.input_shape)[0]
    damaged = clean.copy()
    cv2.circle(damaged, (46, 18), 7, 0, thickness=-1)
    with open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=2) as engine:
        result = engine.infer(np.stack([clean, damaged]))
    # At 64x64 the 4x4 grid lies wholly inside one 15x15 aggregation window, so the map cannot localise here: the
    # whole frame must score higher instead.
    assert result.scores[1] > result.scores[0]
    assert float((result.maps[1] - result.maps[0]).mean()) > 0


def test_greedy_coreset_keeps_rare_patterns_and_memory_scores_its_own_patches_zero():
    from engines.model.graph import MemoryBankScorer
    from engines.runtime.scorer_fit import greedy_coreset

    rng = np.random.default_rng(0)
    points = np.concatenate(
        [rng.standard_normal((500, 4)), 10 + rng.standard_normal((500, 4)), np.full((2, 4), 100.0)]
    ).astype(np.float32)
    chosen = greedy_coreset(points, 3, rng)
    generator = torch.Generator().manual_seed(0)
    assert sorted(int(i) // 500 for i in chosen) == [0, 1, 2]  # the 2-point outlier cluster is never dropped
    assert len(set(chosen.tolist())) == 3

    features = torch.randn(3, 6, 4, 4, generator=generator)
    everything = torch.from_numpy(MemoryBankScorer.fit(features, memory_size=1000)["memory_bank"])
    assert everything.shape == (48, 6)  # fewer patches than memory_size: all of them, no selection
    _, own = MemoryBankScorer()(features, everything)
    assert own.shape == (3, 4, 4) and float(own.max()) < 1e-2
    _, shifted = MemoryBankScorer()(features + 5.0, everything)
    assert float(shifted.min()) > 1.0
    cut = MemoryBankScorer.fit(features, memory_size=10, seed=1)["memory_bank"]
    assert cut.shape == (10, 6) and all(any(np.allclose(row, e) for e in everything.numpy()) for row in cut)
    with pytest.raises(ValueError, match="memory_size 0"):
        MemoryBankScorer.fit(features, memory_size=0)


def test_memory_bank_fit_gathers_only_its_pool_and_keeps_patches_whole():
    """The coreset's pool is drawn from every patch of every image: a fit on hundreds of images must not copy every
    patch first (it doubled the fit's memory), and each pooled patch is one image's features at one place."""
    import tracemalloc

    from engines.runtime.scorer_fit import CORESET_POOL, fit_memory

    n, d, h, w = 200, 64, 40, 40  # 82 MB of features; a pool of 16 x 64 patches is 0.3 MB
    features = np.random.default_rng(0).standard_normal((n, d, h, w), dtype=np.float32)
    features[:, 0] = np.arange(n * h * w, dtype=np.float32).reshape(n, h, w)  # channel 0 numbers the patch
    tracemalloc.start()
    try:
        bank = fit_memory(features, memory_size=64, seed=0)["memory_bank"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < features.nbytes / 8, f"the fit's peak {peak / 1e6:.1f} MB: it copied every patch"
    index = bank[:, 0].astype(np.int64)
    assert bank.shape == (64, d) and len(set(index.tolist())) == 64 and CORESET_POOL * 64 < n * h * w
    image, place = np.divmod(index, h * w)
    np.testing.assert_array_equal(bank, features[image, :, place // w, place % w])


def test_ctrl_c_while_the_feature_graph_is_added_says_the_bundle_was_written(data, tmp_path, monkeypatch, capsys):
    """The bundle is whole once written; a Ctrl-C while its feature graph is added said "interrupted before anything
    could be written" beside a bundle that runs. It says what was written and how to add the graph teach needs."""
    from engines.training import train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "add_feature_graph", interrupted)
    out = tmp_path / "b"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--data", str(data), "--out", str(out), "--recipe", "aligned", "--size", "64", "--batch", "4"]
    assert run(parser.parse_args(args)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"inspectd train: interrupted after {out} was written, before its feature graph (features.onnx): the bundle "
        f"runs; `inspectd export {out}` adds the graph, which `inspectd teach` needs"
    ), err
    bundle = load_bundle(out)
    with open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=1) as engine:
        assert np.isfinite(engine.infer(np.full((1, 64, 64, 1), 100, np.uint8)).scores).all()


def test_byte_identical_training_files_are_left_out_before_the_split(tmp_path):
    """A held-out image whose copy was in the fit scored 0 with a memory bank, and the first image threshold was
    then 1e-06: every frame rejected, and train said nothing."""
    root = make_tiny_mvtec(tmp_path / "set", n_train=6, n_test_good=0, n_test_defect=0)
    good = root / "train" / "good"
    twins = []
    for path in sorted(good.iterdir()):
        copy = path.with_name(f"{path.stem} (copy){path.suffix}")
        shutil.copy(path, copy)
        twins.append(sorted([path, copy]))  # the first listed is kept, the other left out
    lines: list[str] = []
    quiet = Progress(enabled=False)
    result = train_bundle(root, tmp_path / "b", recipe="patchcore", size=(64, 64), progress=quiet, report=lines.append)
    left_out = sorted(twins, key=lambda pair: pair[1])[:3]  # in the order listed
    shown = ", ".join(f"{second.name} (same as {first.name})" for first, second in left_out)
    assert f"note: 6 duplicate image(s) left out: {shown} ..." in lines, lines
    training = load_bundle(result.bundle).manifest["training"]
    assert training["n_duplicates"] == 6 and result.n_fit + result.n_holdout == 6 == training["n_fit"] + 1
    assert result.image_threshold > 1e-3  # the held-out image is scored by a fit without its twin


def test_training_files_with_the_same_pixels_in_other_bytes_are_left_out_too(tmp_path):
    """Re-encoded (another PNG compression here; a metadata stamp, a stuck frame saved again) a twin passed the byte
    compare, and the held-out one scored about 0 against the other in the fit."""
    root = make_tiny_mvtec(tmp_path / "set", n_train=6, n_test_good=0, n_test_defect=0)
    good = root / "train" / "good"
    for i, path in enumerate(sorted(good.iterdir())):
        twin = path.with_name(f"{path.stem}~z0.png")
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.ndim == 2
        if i % 2:  # the same grey frame saved in colour: a colour model takes the grey one replicated, the same input
            cv2.imwrite(str(twin), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
        else:
            cv2.imwrite(str(twin), image, [cv2.IMWRITE_PNG_COMPRESSION, 0])
        assert twin.read_bytes() != path.read_bytes()
    lines: list[str] = []
    quiet = Progress(enabled=False)
    result = train_bundle(root, tmp_path / "b", recipe="patchcore", size=(64, 64), progress=quiet, report=lines.append)
    notes = [line for line in lines if "(the same pixels in other bytes)" in line]
    assert len(notes) == 1 and notes[0].startswith("note: 6 duplicate image(s) (the same pixels in other bytes)"), lines
    bundle = load_bundle(result.bundle)
    training = bundle.manifest["training"]
    assert training["n_duplicates"] == 6 and result.n_fit + result.n_holdout == 6
    assert bundle.input_shape == (64, 64, 1)  # the colour copies were left out, so the set is grey
    assert result.image_threshold > 1e-3


def test_train_ok_is_a_training_set_and_two_defect_free_folders_are_refused(tmp_path, capsys):
    """BTAD and OK/NG-style sets keep their defect-free images in train/ok."""
    root = tmp_path / "btad"
    _images(root / "train" / "ok", 2)
    assert [p.name for p in training_images(root)] == ["000.png", "001.png"]
    _images(root / "train" / "Good", 1)
    assert run(parse("--data", str(root), "--out", str(tmp_path / "x"))) == 2
    assert capsys.readouterr().err == (
        f"inspectd train: {root / 'train'}: Good/ and ok/ are both defect-free folders, expected one (good/ or ok/, "
        "any case)\n"
    )
    assert not (tmp_path / "x").exists()


def test_out_is_refused_unless_new_empty_or_a_bundle_and_apart_from_the_data(data, tmp_path, capsys):
    """The bundle's swap deleted whatever --out held: a dataset given as both --data and --out lost train/, test/ and
    ground_truth/ to the bundle, a folder of notes lost the notes, and a file became a bundle. Each is refused in one
    line before an image is read; an existing bundle and an empty folder are still written."""
    from engines.bundle.store import write_bundle
    from engines.errors import BundleError

    copy = Path(shutil.copytree(data, tmp_path / "copy"))
    dataset = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "important.txt").write_text("precious\n")
    afile = tmp_path / "afile.txt"
    afile.write_text("precious\n")
    expected = "expected a new path, an empty folder or an inspectd bundle to replace"
    apart = "expected a bundle path outside the training data and not holding it"
    cases = [
        (copy, copy, f"is --data, {apart}"),
        (copy, copy / "bundle", f"lies inside --data {copy}, {apart}"),
        (copy / "train" / "good", copy, f"holds --data {copy / 'train' / 'good'}, {apart}"),
        (data, work, f"a folder of 1 entry (notes) that is no inspectd bundle, {expected}"),
        (data, afile, f"a file, {expected}"),
        (data, afile / "bundle", f"{afile} is a file, {expected} in a folder"),
    ]
    cheap = ("--recipe", "aligned", "--size", "64")
    for given, out, why in cases:
        assert run(parse("--data", str(given), "--out", str(out), *cheap)) == 2, out
        err = capsys.readouterr().err
        assert err.startswith(f"inspectd train: --out {out}: {why}") and err.count("\n") == 1, err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == dataset
    assert (work / "notes" / "important.txt").read_text() == afile.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "copy", "work"]  # no bundle left aside
    # An existing bundle is replaced and an empty folder filled, as before.
    bundle, empty = tmp_path / "bundle", tmp_path / "empty"
    empty.mkdir()
    for out in (bundle, bundle, empty):
        assert run(parse("--data", str(data), "--out", str(out), *cheap)) == 0, capsys.readouterr().err
        assert load_bundle(out).manifest["recipe"]["name"] == "aligned"
    # write_bundle, which teach and every other writer go through, refuses the same.
    written = load_bundle(bundle)
    with pytest.raises(BundleError, match=f"^{work}: a folder of 1 entry"):
        write_bundle(
            work, written.manifest, written.graph_path, written.scorer_params(), written.weights(), written.thresholds()
        )
    assert (work / "notes" / "important.txt").read_text() == "precious\n" and len(list(work.iterdir())) == 1


def test_a_bundle_holding_files_its_manifest_does_not_list_is_refused_and_they_are_kept(data, tmp_path, capsys):
    """Train over a bundle deleted a README or a notes/ folder an operator had put into it, without a word: such
    entries are named in one line and nothing is written. The bundle's own entries (a plan under engines/ that
    build-engine listed, a killed writer's temporary file) are still replaced with it."""
    from engines.bundle.store import load_bundle

    cheap = ("--recipe", "aligned", "--size", "64")
    out = tmp_path / "bundle"
    assert run(parse("--data", str(data), "--out", str(out), *cheap)) == 0, capsys.readouterr().err
    load_bundle(out).replace_file("engines/model.plan", b"plan", add=True)
    (out / ".thresholds.json.4194304-0123abcd.tmp").write_bytes(b"left by a killed writer")
    (out / "README.txt").write_text("line 3 model, trained by X\n")
    (out / "notes").mkdir()
    (out / "notes" / "n.txt").write_text("n\n")
    (out / "engines" / "mine.txt").write_text("mine\n")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    model_id = load_bundle(out).model_id
    capsys.readouterr()
    assert run(parse("--data", str(data), "--out", str(out), *cheap, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert err == (
        f"inspectd train: --out {out}: an inspectd bundle that also holds 3 entries its manifest does not list "
        "(README.txt, engines/mine.txt, notes/), expected only the bundle's own files: move them out first (the "
        "bundle replaces what is there)\n"
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and load_bundle(out).model_id == model_id
    for mine in ("README.txt", "notes/n.txt", "notes", "engines/mine.txt"):
        (out / mine).rmdir() if (out / mine).is_dir() else (out / mine).unlink()
    assert run(parse("--data", str(data), "--out", str(out), *cheap, "--seed", "1")) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([*load_bundle(out).manifest["files"], "manifest.json"])
