"""The scoring calls of `--recipe auto` and train's check images are sized by a memory budget: a nearest-neighbour
scorer's distance matrix grows with the square of the input side, so the images per call shrink as it grows. Real
graph (Lite0 with its ImageNet weights, PatchCore's recipe), real features of real frames, a real fitted memory bank."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engines.model.graph import build_graph
from engines.model.methods import get_method
from engines.model.recipes import CATALOGUE
from engines.runtime.preprocess import fit_all
from engines.training.select import SCORING_BUDGET, images_per_call, score_features
from engines.training.train import score_with_graph

SIZE = (96, 64)


def _frames(n: int, seed: int) -> list[np.ndarray]:
    """Shaded grey frames with a few random strokes: each location's nearest memory vector is a near thing."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = cv2.GaussianBlur(rng.normal(0, 1, (120, 80)).astype(np.float32), (0, 0), 8)
        image = 128 + 60 * base / (np.abs(base).max() + 1e-6) + rng.normal(0, 4, base.shape)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, 80, 2))
            cv2.line(image, (x, y), (x + 15, y + 9), float(rng.integers(0, 256)), 2)
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def fitted():
    recipe = CATALOGUE["patchcore"].replace(size=SIZE, memory_size=300)
    graph = build_graph(recipe.architecture(get_method(recipe.method).head_config(None), 1)).eval()
    fit_images = fit_all(_frames(6, 0), (*SIZE, 1), "stretch")
    images = fit_all(_frames(7, 1), (*SIZE, 1), "stretch")
    with torch.inference_mode():
        params = graph.scorer.fit(graph.embed(torch.from_numpy(fit_images)), memory_size=300, seed=0)
        features = graph.embed(torch.from_numpy(images))
    return graph, params, images, features


def _counted(graph, monkeypatch) -> list[int]:
    """The images each call of `graph`'s scorer (its distance search) is given; the call itself runs unchanged."""
    calls: list[int] = []
    real = graph.scorer.forward

    def counting(features, *params):
        calls.append(len(features))
        return real(features, *params)

    monkeypatch.setattr(graph.scorer, "forward", counting)
    return calls


def test_the_budget_sets_the_images_per_search_and_no_score_changes(fitted, monkeypatch):
    graph, params, _, features = fitted
    n, _, h, w = features.shape
    memory = params["memory_bank"].shape[0]
    per_image = h * w * memory * 4  # bytes of one image's rows of the distance matrix
    assert memory == 300 and n == 7
    assert images_per_call(graph, features.shape, params, SCORING_BUDGET) == SCORING_BUDGET // per_image
    assert images_per_call(graph, features.shape, params, 3 * per_image) == 3
    assert images_per_call(graph, features.shape, params, 3 * per_image - 1) == 2
    assert images_per_call(graph, features.shape, params, per_image // 2) == 1  # never none: one image at least

    calls = _counted(graph, monkeypatch)
    for batch, by_default, budgets in [
        (16, [7], [(3 * per_image, [3, 3, 1]), (2 * per_image + 1, [2, 2, 2, 1]), (1, [1] * 7)]),
        (4, [4, 3], [(3 * per_image, [3, 1, 3]), (1, [1] * 7)]),
    ]:
        calls.clear()
        whole = score_features(graph, features, params, batch=batch)
        assert calls == by_default  # the default budget holds a whole batch at this size
        for budget, expected in budgets:
            calls.clear()
            scores, maps = score_features(graph, features, params, batch=batch, budget=budget)
            assert calls == expected, (batch, budget)
            assert np.array_equal(scores, whole[0]) and np.array_equal(maps, whole[1]), (batch, budget)


def test_the_budget_follows_the_input_size_and_binds_only_nearest_neighbour_scorers(fitted):
    """At the selection's 16 images a batch, a memory bank of 16 384 vectors fits up to 128x128; at 640x640 one image
    a search is already 400 MiB of matrix, where 16 took 6.4 GiB (13 at peak)."""
    graph, _, _, _ = fitted
    bank = {"memory_bank": np.zeros((16384, 4), np.float32)}
    assert images_per_call(graph, (16, 4, 16, 16), bank) == 16
    assert images_per_call(graph, (16, 4, 32, 32), bank) == 4
    assert images_per_call(graph, (16, 4, 80, 80), bank) == 1
    gaussian = next(r for r in CATALOGUE.values() if r.scorer == "gaussian")
    g_graph = build_graph(
        gaussian.replace(size=SIZE).architecture(get_method(gaussian.method).head_config(None), 1), pretrained=False
    )
    assert images_per_call(g_graph, (16, 4, 80, 80), {}) is None


def test_train_scores_its_check_images_as_before_through_the_budgeted_search(fitted, monkeypatch):
    """train's held-out scoring embeds `batch` images at a time and scores them through score_features: the same
    scores as the whole graph run on the pixels of each batch (what it ran before)."""
    graph, params, images, _ = fitted
    tensors = [torch.from_numpy(params[k]) for k in graph.scorer_inputs]
    with torch.inference_mode():
        before = [graph(torch.from_numpy(images[s : s + 4]), *tensors) for s in (0, 4)]
    calls = _counted(graph, monkeypatch)
    scores, maps = score_with_graph(graph, images, params, batch=4)
    assert calls == [4, 3]
    assert np.array_equal(scores, np.concatenate([s.numpy() for s, _ in before]))
    assert np.array_equal(maps, np.concatenate([m.numpy() for _, m in before]))
