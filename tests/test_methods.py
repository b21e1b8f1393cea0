"""CSE and SLA end to end: tiny `inspectd train` runs whose ONNX graph agrees with torch, and a trained CSE head that
separates clean frames from synthetic defects it has not seen."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engines.bundle.store import load_bundle
from engines.data import defects
from engines.data.synthline import SyntheticLine
from engines.model.graph import InferenceGraph, build_graph
from engines.model.methods import TrainSettings, get_method
from engines.model.recipes import Recipe
from engines.runtime import open_engine
from engines.training.metrics import auroc
from engines.training.train import Progress

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def line_frames(n: int, size: int, seed: int) -> np.ndarray:
    line = SyntheticLine(width=size, height=size, channels=1, defect_rate=0.0, seed=seed)
    return np.stack([line.next()[0] for _ in range(n)])[..., None]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    for i, frame in enumerate(line_frames(8, 64, seed=1)):
        assert cv2.imwrite(str(folder / f"good_{i:02d}.png"), frame)
    return folder


@pytest.mark.parametrize("method", ["cse", "sla"])
def test_train_cli_writes_a_bundle_whose_onnx_graph_agrees_with_torch(method, good_dir, tmp_path):
    out = tmp_path / f"{method}_bundle"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspectd",
            "train",
            "--method",
            method,
            "--data",
            str(good_dir),
            "--out",
            str(out),
            "--size",
            "64",
            "--epochs",
            "1",
            "--batch",
            "4",
            "--holdout",
            "0.25",
            f"--{method}-pool",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = load_bundle(out)
    assert bundle.method == method and bundle.input_shape == (64, 64, 1)
    expected_inputs = ("references",) if method == "cse" else ("gauss_mean", "gauss_precision")
    assert bundle.scorer_inputs == expected_inputs

    pixels = np.ascontiguousarray(line_frames(3, 64, seed=7))
    pixels[2] = defects.perlin(pixels[2], np.random.default_rng(0)).image
    with open_engine(bundle, "onnxruntime", max_batch=4) as onnx, open_engine(bundle, "torch", max_batch=4) as ref:
        got, want = onnx.infer(pixels), ref.infer(pixels)
    assert got.scores.shape == (3,) and got.maps.shape == (3, 64, 64)
    assert np.isfinite(got.scores).all() and np.isfinite(got.maps).all()
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-3, atol=1e-3 * float(np.abs(want.maps).max()))
    # A map that varies at all: a constant output would agree trivially.
    assert float(want.maps.std()) > 0


def _trained_cse(images: np.ndarray, epochs: int) -> torch.nn.Module:
    method = get_method("cse")
    args = argparse.Namespace(
        cse_lr=4e-3, cse_defects="perlin", cse_defect_fraction=0.5, cse_pool=2, cse_regenerate=False, cse_pool_stride=2
    )
    recipe = Recipe("cse", method="cse", taps=(16, 32), size=images.shape[1:3], scorer="kmeans")
    arch = recipe.architecture(method.head_config(args), images.shape[3])
    torch.manual_seed(0)
    graph = build_graph(arch, pretrained=True)
    method.train(graph, images, TrainSettings(epochs=epochs, batch=8, seed=0, args=args), Progress(enabled=False))
    return graph


def test_trained_cse_head_separates_clean_from_held_out_synthetic_defects():
    train = line_frames(16, 128, seed=3)
    held_out = line_frames(12, 128, seed=99)
    rng = np.random.default_rng(123)
    defective = np.stack([defects.perlin(x, rng).image for x in held_out])
    graph = _trained_cse(train, epochs=6)
    with torch.inference_mode():
        features = graph.embed(torch.from_numpy(train))
        references = torch.from_numpy(graph.scorer.fit(features, k=1)["references"])
        clean_scores = graph(torch.from_numpy(held_out), references)[0].numpy()
        defect_scores = graph(torch.from_numpy(defective), references)[0].numpy()
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(defect_scores))]
    separation = auroc(labels, np.r_[clean_scores, defect_scores])
    assert separation > 0.75, f"trained CSE head: AUROC {separation:.3f} between clean and synthetic defects"
    # The decoder is a training-only regulariser: it has weights but the graph's output does not depend on it.
    with torch.inference_mode():
        before = graph(torch.from_numpy(held_out[:2]), references)[0]
        for p in graph.head.decoder.parameters():
            p.add_(1.0)
        after = graph(torch.from_numpy(held_out[:2]), references)[0]
    assert torch.equal(before, after)


def test_sla_targets_put_the_soft_label_on_the_class_and_the_rest_on_normal():
    from engines.model.methods.sla import cell_labels, soft_targets

    target = soft_targets(torch.tensor([0, 1, 2]), torch.tensor([0.0, 0.9, 0.25]))
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.9, 0.0], [0.75, 0.0, 0.25]])
    assert torch.allclose(target, expected)
    changed = np.zeros((1, 32, 32), bool)
    changed[0, :8, :4] = True  # half of the top-left 8x8 cell, nothing elsewhere
    cells = cell_labels(changed, (4, 4))
    assert cells[0, 0, 0].item() == pytest.approx(2 / (1 + np.exp(-5)) - 1, abs=1e-6)
    assert cells[0].flatten()[1:].abs().max().item() == 0.0


def test_bad_method_flags_are_refused_naming_the_flag(good_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspectd",
            "train",
            "--method",
            "cse",
            "--data",
            str(good_dir),
            "--out",
            str(tmp_path / "x"),
            "--size",
            "64",
            "--epochs",
            "1",
            "--cse-defects",
            "perlin:1,blob:2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown defect 'blob'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_local_reference_scorer_is_the_nearest_location_of_any_reference():
    from engines.model.graph import LocalReferenceScorer

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 4, 5, generator=generator)
    references = torch.randn(3, 8, 4, 5, generator=generator)
    # A location copied from the third reference's far corner: distance 0 there, although not at the same place.
    features[1, :, 0, 0] = references[2, :, 3, 4]
    score, low = LocalReferenceScorer()(features, references)
    memory = references.permute(0, 2, 3, 1).reshape(-1, 8)
    query = features.permute(0, 2, 3, 1).reshape(2, 20, 8)
    brute = torch.cdist(query, memory).pow(2).amin(-1).reshape(2, 4, 5)
    assert score is None
    assert torch.allclose(low, brute, atol=1e-4)
    assert low[1, 0, 0].item() == pytest.approx(0.0, abs=1e-4) and low[0].min().item() > 0.1


def _train_cli(args: list[str], good_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "train", "--data", str(good_dir), "--out", str(out), "--size", "64", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _graph_for(method: str, args: argparse.Namespace) -> InferenceGraph:
    trainer = get_method(method)
    recipe = Recipe(method, method=method, taps=(16, 32), size=(64, 64), scorer="kmeans")
    return build_graph(recipe.architecture(trainer.head_config(args), 1), pretrained=True)


@pytest.mark.parametrize("method", ["cse", "sla"])
def test_a_regenerated_pool_keeps_the_training_progress_line(method):
    # The redraw's own line used to replace the training's: "defect taps 9/8 loss ... ETA -0s", and off a terminal
    # (this StringIO) one line per step past its total.
    args = argparse.Namespace(**{f"{method}_pool": 1, f"{method}_regenerate": True})
    stream = io.StringIO()
    get_method(method).train(
        _graph_for(method, args),
        line_frames(8, 64, seed=1),
        TrainSettings(epochs=3, batch=2, seed=0, args=args),
        Progress(stream=stream),
    )
    lines = stream.getvalue().splitlines()
    with_loss = [line for line in lines if " loss " in line]
    assert with_loss and all(line.startswith(f"{method} ") for line in with_loss), lines
    counts = [tuple(map(int, m.groups())) for m in (re.search(r" (\d+)/(\d+) ", line) for line in lines) if m]
    assert counts and all(step <= total for step, total in counts), lines
    steps = 3 * 8 // (2 if method == "cse" else 1)  # sla's batch 2 is one clean image and one variant a step
    assert with_loss[-1].startswith(f"{method} {steps}/{steps} "), lines


@pytest.mark.parametrize("method", ["cse", "sla"])
def test_a_diverged_training_is_refused_naming_the_learning_rate(method, good_dir, tmp_path):
    # At 1e6 SLA's ReLUs die (a bundle scoring every frame 0, exit 0) and CSE's features overflow float32 distances
    # (a NaN thresholds message); neither loss is NaN, so the trained features are what shows it.
    out = tmp_path / "bundle"
    proc = _train_cli(
        ["--method", method, "--epochs", "1", "--batch", "4", f"--{method}-lr", "1e6", f"--{method}-pool", "1"],
        good_dir,
        out,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"inspectd train: --{method}-lr 1e+06: the {method} training diverged"), proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("method", ["cse", "sla"])
def test_a_nan_loss_stops_the_training_at_its_epoch(method):
    args = argparse.Namespace(**{f"{method}_pool": 1, f"{method}_lr": 1e20})
    stream = io.StringIO()
    with pytest.raises(ValueError) as raised:
        get_method(method).train(
            _graph_for(method, args),
            line_frames(8, 64, seed=1),
            TrainSettings(epochs=2, batch=4, seed=0, args=args),
            Progress(stream=stream),
        )
    message = str(raised.value)
    assert message == (
        f"--{method}-lr 1e+20: the {method} training diverged, the loss became nan at epoch 1 of 2; "
        "expected a smaller learning rate"
    )
    assert " loss nan" not in stream.getvalue()  # stopped at the step, not after the epochs


def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pytest.skip("no physical memory size on this platform")


def test_memory_sizes_are_said_in_their_binary_unit():
    """The refusal said 2 TiB of a 2 GiB need, and the machine's 23.5 GiB as 23.5 TiB: each unit a power too high."""
    from engines.model.methods.cached import gib

    assert [gib(2 * 1024**3), gib(3 * 1024**4), gib(1.5 * 1024**5)] == ["2 GiB", "3 TiB", "1.5 PiB"]


def test_a_set_whose_own_features_do_not_fit_is_told_so_not_offered_a_pool_of_0(monkeypatch):
    """The clean images' taps alone past the machine's memory: "expected at most 0" named a flag no value of which
    could help."""
    from engines.model.methods import cached

    monkeypatch.setattr(cached, "machine_memory", lambda: 8 * 1024**3)
    with pytest.raises(ValueError) as info:
        cached.check_fits("--cse-pool", 1, 1024**2, 9 * 1024**3, "the defect pool of 500 images")
    assert "expected fewer images or a smaller --size" in str(info.value) and "at most 0" not in str(info.value)


@pytest.mark.parametrize(
    "flag",
    ["--cse-pool", "--sla-pool", "--sla-dim"],
)
def test_a_pool_or_head_larger_than_the_machine_is_refused_before_the_images_are_read(flag, good_dir, tmp_path):
    _memory()
    proc = _train_cli(["--method", flag[2:5], "--epochs", "1", flag, str(10**12)], good_dir, tmp_path / "x")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"inspectd train: {flag} {10**12}: ") and "expected at most" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # no "clean taps" line: nothing was decoded
    assert "8-bit images" not in proc.stdout  # nor looked at


@pytest.mark.parametrize("method", ["cse", "sla"])
def test_a_pool_larger_than_the_machine_for_these_images_is_refused_before_it_is_drawn(method, good_dir, tmp_path):
    # Half the machine's memory in 32x32 grey variants of one image passes the check made before the images are read;
    # at 64x64 of 7 images with their taps it is far more than the machine has.
    pool = _memory() // 2048 // 2
    proc = _train_cli(["--method", method, "--epochs", "1", f"--{method}-pool", str(pool)], good_dir, tmp_path / "x")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"inspectd train: --{method}-pool {pool}: the \w+ pool of 7 images would need about .* more than this "
        r"machine's .*; expected at most \d+",
        last,
    ), proc.stderr
    assert "taps" not in proc.stderr and "Traceback" not in proc.stderr


def test_exporting_the_feature_graph_leaves_the_graph_in_eval_mode():
    from engines.model.export import export_feature_graph

    graph = _graph_for("cse", argparse.Namespace()).eval()
    export_feature_graph(graph)
    # In training mode BatchNorm would score with batch statistics and move its running ones.
    assert [name for name, module in graph.named_modules() if module.training] == []
