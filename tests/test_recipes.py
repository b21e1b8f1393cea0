"""Recipes as data and `--recipe auto`: a recipe survives the manifest and rebuilds the same graph, auto chooses the
window a surface needs without labels, the false-alarm guard holds, and flags resolve to the recipe a user meant."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import cv2
import numpy as np
import pytest
import torch

from calibration.teach import teach, training_split
from engines.bundle.format import LEGACY_MEMORY_AGGREGATION, recipe_of
from engines.bundle.store import load_bundle
from engines.data.images import ImageFiles, validation_folds
from engines.errors import DataError
from engines.model.graph import ImageScore, build_graph
from engines.model.recipes import CATALOGUE, Recipe, auto_candidates
from engines.runtime import open_engine
from engines.runtime.preprocess import fit_all
from engines.training import select
from engines.training.evaluate import evaluate, format_table
from engines.training.select import (
    MAX_COPY_AUROC,
    MIN_COPY_CHECK,
    MIN_KEPT_PER_KIND,
    PLANTS,
    Planted,
    Scored,
    choose,
    fit_mask,
    select_recipe,
)
from engines.training.train import Progress, resolve_recipe, train_bundle
from tests.tiny_dataset import make_tiny_mvtec

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
QUIET = Progress(enabled=False)


def smooth_surface(n: int, seed: int, size: int = 96) -> list[np.ndarray]:
    """A gently shaded, low-noise surface: nothing in a good frame looks like a defect at any scale."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 12)
        base = 128 + 40 * base / (np.abs(base).max() + 1e-6)
        out.append(np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8))
    return out


def scratched_surface(n: int, seed: int, size: int = 96) -> list[np.ndarray]:
    """A flat surface with a few long scratches of any brightness and direction in random places on every good frame:
    normal here, but each is new to a patch that sees only itself; a wide window sees a surface like every other."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = np.full((size, size), 128, np.float32) + rng.normal(0, 3, (size, size))
        for _ in range(8):
            y, x = rng.integers(0, size, 2)
            length, angle = rng.integers(8, 24), rng.uniform(0, np.pi)
            end = (int(x + length * np.cos(angle)), int(y + length * np.sin(angle)))
            cv2.line(image, (int(x), int(y)), end, float(rng.integers(0, 256)), int(rng.integers(1, 3)))
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


def oriented_surface(n: int, seed: int, size: int = 96) -> list[np.ndarray]:
    """Ramps that rise slowly and drop at once, left to right: turned half a turn they fall slowly and rise at once,
    which no good frame shows (an oriented part, as a polarity mark is)."""
    rng = np.random.default_rng(seed)
    ramp = np.tile(60 + 140 * (np.arange(size) % 24 / 24.0), (size, 1))
    out = []
    for _ in range(n):
        image = ramp + rng.normal(0, 3, (size, size))
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


# A memory cut to a coreset, as a station's frames fill it (a few hundred frames at 320x320 are some 80 000 patches
# for the default 16 384): here 1 024 of ~6 000, which also halves the nearest-neighbour search each test pays for.
SMALL = Recipe("small", taps=(8, 16), size=(96, 96), aggregation=1, memory_size=1024)
LARGE = Recipe("large", taps=(8, 16), size=(96, 96), aggregation=9, memory_size=1024)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("surface", "expected"), [(smooth_surface, "small"), (scratched_surface, "large")])
def test_auto_picks_the_window_the_surface_needs(surface, expected, seed):
    frames = surface(56, seed)
    # The window's choice with the image score held at the map's maximum; the pool's own choice is the next test
    # (on the scratched surface a mean pool lifts the small window's image AUROC level with the large one's).
    selection = select_recipe(frames, [SMALL, LARGE], channels=1, seed=seed, score_shares=(0.0,))
    table = {s.recipe.name: s for s in selection.candidates}
    assert selection.chosen.recipe.name == expected, {n: s.to_json() for n, s in table.items()}
    # Cross-fitted (56 images): every image validated exactly once.
    assert len(selection.folds) == 4
    held = np.sort(np.concatenate([f.held for f in selection.folds]))
    assert np.array_equal(held, np.arange(56))
    assert len(selection.chosen.clean_scores) == 56


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_picks_the_image_score_pool_the_surface_needs(seed):
    # Quiet surface: a defect is the frame's peak, and averaging the whole map dilutes it. Scratched surface: every
    # good frame has peaks of its own, and only a wide pool sees that a planted defect raises more of the map.
    quiet = select_recipe(smooth_surface(56, seed), [SMALL], channels=1, seed=seed).chosen
    assert quiet.recipe.score_share < 1.0 and quiet.pools[1.0] < quiet.pools[0.0], quiet.pools
    busy = select_recipe(scratched_surface(56, seed), [SMALL], channels=1, seed=seed).chosen
    assert busy.recipe.score_share >= 0.05 and busy.pools[busy.recipe.score_share] > busy.pools[0.0] + 0.05, busy.pools
    # The candidate's figures and first thresholds are those of its pool: what the exported graph will compute.
    assert busy.image_auroc == pytest.approx(busy.pools[busy.recipe.score_share])
    graph = build_graph(busy.recipe.architecture({}, 1), pretrained=False).eval()
    assert graph.image_score.share == busy.recipe.score_share
    with torch.inference_mode():
        again = graph.image_score(torch.from_numpy(busy.clean_maps)).numpy()
    np.testing.assert_allclose(again, busy.clean_scores, rtol=1e-6)


@pytest.mark.parametrize(("surface", "copies"), [(scratched_surface, "rot180"), (oriented_surface, "none")])
def test_auto_fits_turned_copies_only_where_the_surface_looks_the_same_turned_round(surface, copies):
    chosen = select_recipe(surface(40, 0), [SMALL], channels=1, seed=0, score_shares=(0.0,)).chosen
    assert chosen.recipe.augment == copies, chosen.copy_auroc
    assert (chosen.copy_auroc <= MAX_COPY_AUROC) == (copies == "rot180")
    assert chosen.to_json()["augment"] == copies
    if copies == "rot180":
        # With one held-out share (many images) nothing is judged and nothing is copied.
        many = select_recipe(surface(64, 0), [SMALL], channels=1, seed=0, score_shares=(0.0,)).chosen
        assert many.recipe.augment == "none" and many.copy_auroc is None
        # Nor with too few images for the check to mean anything.
        few = select_recipe(surface(MIN_COPY_CHECK - 1, 0), [SMALL], channels=1, seed=0, score_shares=(0.0,)).chosen
        assert few.recipe.augment == "none" and few.copy_auroc is None


def test_auto_reads_full_size_frames_from_disk_as_it_fits_and_plants_them(tmp_path):
    """A station's frames can be large: auto must not hold them all at full size, nor its planted frames (only the
    model inputs fitted from them). The same 40 frames on disk at 800x800 and at 200x200: held at once, the large
    ones and their 168 planted copies would take 134 MB more than the small ones; read as needed, about the same."""

    def peak(side: int) -> int:
        paths = []
        for i, frame in enumerate(smooth_surface(40, 0)):
            path = tmp_path / f"{side}-{i:03d}.png"
            cv2.imwrite(str(path), cv2.resize(frame, (side, side), interpolation=cv2.INTER_LINEAR))
            paths.append(path)
        frames = ImageFiles(paths)
        assert frames.channels == 1 and frames[3].shape == (side, side)
        tracemalloc.start()  # numpy's and OpenCV's arrays are traced; torch's tensors are not, nor need to be here
        try:
            selection = select_recipe(frames, [SMALL], channels=1, seed=0, score_shares=(0.0,))
            held = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert selection.chosen.image_auroc > 0.9
        return held

    grown = peak(800) - peak(200)
    held = (40 + 168) * (800 * 800 - 200 * 200)
    assert grown < held / 4, f"auto's peak grew {grown / 1e6:.1f} MB with the frames' size: it holds full-size frames"


def test_a_bundle_fitted_with_turned_copies_scores_the_turned_part_as_good_and_teach_keeps_them(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i, frame in enumerate(oriented_surface(24, 0)):
        cv2.imwrite(str(good / f"{i:03d}.png"), frame)
    unturned = np.stack(oriented_surface(8, 1))[..., None]
    turned = np.ascontiguousarray(unturned[:, ::-1, ::-1])

    def scores(path) -> tuple[np.ndarray, np.ndarray]:
        with open_engine(load_bundle(path), "onnxruntime", max_batch=8) as engine:
            return engine.infer(unturned).scores, engine.infer(turned).scores

    settings = dict(recipe="patchcore", size=(96, 96), memory_size=2000, progress=QUIET, holdout=0.25)
    plain = train_bundle(good, tmp_path / "plain", **settings)
    copied = train_bundle(good, tmp_path / "copied", augment="rot180", **settings)
    assert load_bundle(copied.bundle).recipe["augment"] == "rot180"
    assert "fitted with rot180 copies" in copied.recipe.summary()
    # Without copies the oriented part turned round stands out from every good frame; fitted with them, it scores
    # as the good frames do.
    normal, round_ = scores(plain.bundle)
    assert round_.min() > 1.5 * normal.max(), (normal, round_)
    normal, round_ = scores(copied.bundle)
    assert round_.mean() < 1.2 * normal.mean() and round_.max() < 1.5 * normal.max(), (normal, round_)
    teach(copied.bundle, good, out=open(tmp_path / "teach.log", "w"))
    assert load_bundle(copied.bundle).recipe["augment"] == "rot180"
    normal, round_ = scores(copied.bundle)
    assert round_.mean() < 1.2 * normal.mean(), (normal, round_)


def test_image_score_pools_the_map_as_documented():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 64, 96)).astype(np.float32)
    maps[1, 8:16, 8:16] += 5.0  # one raised region: the top blocks
    blocks = maps.reshape(3, 16, 4, 24, 4).mean(axis=(2, 4)).reshape(3, -1)
    with torch.inference_mode():
        pooled = {s: ImageScore(s, 64, 96)(torch.from_numpy(maps)).numpy() for s in (0.0, 0.01, 0.05, 1.0)}
    np.testing.assert_allclose(pooled[0.0], maps.reshape(3, -1).max(1))
    np.testing.assert_allclose(pooled[1.0], maps.reshape(3, -1).mean(1), rtol=1e-6)
    for share, count in ((0.01, 4), (0.05, 19)):
        want = np.sort(blocks, axis=1)[:, ::-1][:, :count].mean(1)
        np.testing.assert_allclose(pooled[share], want, rtol=1e-5)
    assert Recipe("r", size=(64, 96), score_share=0.05).score_count == 19
    with pytest.raises(ValueError, match="score_share 0.05 averages 52429 map blocks at 4096x4096, expected at most"):
        Recipe("r", size=(4096, 4096), score_share=0.05).validate()
    with pytest.raises(ValueError, match="score_share 1.5, expected a share in \\[0, 1\\]"):
        resolve_recipe("local", {"score_share": 1.5})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter the product uses, as it does
def test_image_score_keeps_the_partial_blocks_of_a_side_that_is_not_a_multiple_of_four(tmp_path):
    import io

    import onnxruntime as ort

    maps = np.zeros((2, 66, 66), np.float32)
    maps[0, 64:66, 20:24] = 1.0  # hot only in the last two rows: a partial block of 2x4 pixels
    maps[1, 20:22, 20:24] = 1.0  # the same spot inside whole blocks
    pool = ImageScore(0.05, 66, 66)
    assert pool.count == round(0.05 * 17 * 17)
    with torch.inference_mode():
        scores = pool(torch.from_numpy(maps)).numpy()
    assert scores[0] > 0 and scores[0] > scores[1], scores  # a partial block averages over the pixels it holds
    # The exported graph's AveragePool divides the same way.
    buffer = io.BytesIO()
    torch.onnx.export(pool, (torch.from_numpy(maps),), buffer, input_names=["maps"], opset_version=17, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"maps": maps})[0], scores, rtol=1e-6)


def _scored(name: str, image: float, pro: float, false_alarms: float) -> Scored:
    empty = np.zeros(0, np.float32)
    return Scored(CATALOGUE[name], {}, image, 0.9, pro, false_alarms, 0.0, {}, None, empty, empty, None)


def test_false_alarm_guard_rejects_a_recipe_that_flags_clean_images():
    flagging = _scored("fine", image=0.99, pro=0.9, false_alarms=0.5)
    quiet = _scored("wide", image=0.90, pro=0.5, false_alarms=0.05)
    chosen, reason = choose([flagging, quiet])
    assert chosen is quiet and "false alarms rejected fine" in reason
    assert "the guard could not choose" not in reason
    # When every candidate flags clean images, the guard cannot choose and the rest of the rule decides; the reason
    # (in the manifest and eval's table) says so, or a recipe flagging half the good parts would read as fine.
    chosen, reason = choose([flagging, _scored("wide", image=0.90, pro=0.5, false_alarms=0.4)])
    assert chosen is flagging
    assert reason.endswith(
        "; every candidate flags more than 20 % of clean held-out images: the guard could not choose"
    ), reason


def test_rule_image_first_then_aupro_then_catalogue_order():
    a = _scored("patchcore", image=0.95, pro=0.70, false_alarms=0.0)
    b = _scored("local", image=0.96, pro=0.71, false_alarms=0.0)
    c = _scored("wide", image=0.99, pro=0.40, false_alarms=0.0)
    assert choose([a, b, c])[0] is c  # image AUROC more than the tolerance ahead
    c = _scored("wide", image=0.965, pro=0.40, false_alarms=0.0)
    chosen, reason = choose([a, b, c])
    assert chosen is a  # a and b tie on both within tolerance: the first in catalogue order
    assert "within 0.02 of the best: patchcore, local, wide" in reason
    assert "catalogue order of patchcore, local" in reason
    a = _scored("patchcore", image=0.95, pro=0.60, false_alarms=0.0)
    assert choose([a, b, c])[0] is b  # a's AUPRO is past the tolerance
    # Where the planted defects tie every candidate, auto takes PatchCore's standard recipe.
    tied = [_scored(r.name, image=0.9, pro=0.7, false_alarms=0.0) for r in auto_candidates()]
    assert choose(tied)[0].recipe.name == "patchcore"


def test_recipe_round_trips_through_the_manifest_and_rebuilds_the_same_graph(tmp_path):
    data = make_tiny_mvtec(tmp_path / "data", n_train=8, n_test_good=2, n_test_defect=2)
    result = train_bundle(
        data,
        tmp_path / "b",
        recipe="patchcore",
        size=(64, 64),
        memory_size=200,
        score_share=0.05,
        progress=QUIET,
        holdout=0.25,
    )
    bundle = load_bundle(result.bundle)
    recipe = Recipe.from_json(bundle.recipe)
    want = CATALOGUE["patchcore"].replace(size=(64, 64), memory_size=200, score_share=0.05)
    assert recipe == want.replace(description=recipe.description)
    assert bundle.manifest["recipe_selection"] is None
    graph = build_graph(bundle.architecture, pretrained=False)
    assert graph.aggregation.window == 3 and [graph.backbone.strides[i] for i in range(2)] == [8, 16]
    assert graph.image_score.share == 0.05
    assert bundle.scorer_params()["memory_bank"].shape[0] == 200
    # The exported graph (its image score a TopK of the map's blocks) and the torch graph rebuilt from the recipe
    # agree.
    frames = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (64, 64)) for p in data.glob("test/*/*.*")])
    frames = frames[..., None]
    with open_engine(bundle, "onnxruntime", max_batch=4) as ort, open_engine(bundle, "torch", max_batch=4) as ref:
        got, want = ort.infer(frames), ref.infer(frames)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-3, atol=1e-4)
    # eval shows the recipe.
    report = evaluate(bundle, data)
    assert report["recipe"]["name"] == "patchcore"
    line = "recipe patchcore: frozen lite0 taps 8+16 64x64 stretch, memory bank 200, window 3, sigma 4, score top 5%"
    assert line in format_table(report)


def test_auto_records_its_table_and_choice(tmp_path):
    data = make_tiny_mvtec(tmp_path / "data", n_train=10, n_test_good=1, n_test_defect=1)
    lines: list[str] = []
    result = train_bundle(data, tmp_path / "b", recipe="auto", size=(64, 64), progress=QUIET, report=lines.append)
    manifest = load_bundle(result.bundle).manifest
    selection = manifest["recipe_selection"]
    # At 64x64 the grid of stride 16 is 4x4: context's and wide's windows do not fit it and are left out.
    names = [r.name for r in auto_candidates({"size": (64, 64)})]
    assert [c["recipe"] for c in selection["candidates"]] == names == ["patchcore", "fine", "local", "aligned"]
    assert selection["chosen"] == manifest["recipe"]["name"] == result.recipe.name
    assert all(0 <= c["image_auroc"] <= 1 and set(c["per_kind"]) for c in selection["candidates"])
    # Each candidate records the pools it tried and the one it keeps, whose image AUROC is its own.
    for c in selection["candidates"]:
        assert set(c["image_auroc_by_score"]) == {"max", "top 0.1%", "top 1%", "top 5%", "mean"}
        assert c["image_auroc"] == max(c["image_auroc_by_score"].values())
    assert manifest["recipe"]["score_share"] == selection["candidates"][names.index(result.recipe.name)]["score_share"]
    assert any(line.startswith("chosen: ") for line in lines) and len(lines) >= len(names) + 3
    assert "auto: context, wide left out: their window is wider than the feature grid at 64x64" in lines
    assert manifest["recipe"]["size"] == [64, 64]  # the size flag changed every candidate
    json.dumps(manifest)


def test_bundle_without_a_recipe_reads_back_what_it_did(tmp_path):
    data = make_tiny_mvtec(tmp_path / "data", n_train=6, n_test_good=1, n_test_defect=1)
    result = train_bundle(data, tmp_path / "b", scorer="memory", size=(64, 64), memory_size=200, progress=QUIET)
    manifest = dict(load_bundle(result.bundle).manifest)
    del manifest["recipe"]
    manifest["architecture"] = {
        k: v for k, v in manifest["architecture"].items() if k not in ("aggregation", "score_share")
    }
    legacy = recipe_of(manifest)
    assert legacy["name"] == "legacy" and legacy["aggregation"] == LEGACY_MEMORY_AGGREGATION
    assert (
        legacy["score_share"] == 0.0 and build_graph(manifest["architecture"], pretrained=False).image_score.share == 0
    )
    assert legacy["taps"] == [16, 32] and legacy["size"] == [64, 64] and legacy["scorer"] == "memory"
    assert build_graph(manifest["architecture"], pretrained=False).aggregation.window == LEGACY_MEMORY_AGGREGATION


def test_resolve_recipe_from_flags():
    assert [r.name for r in resolve_recipe(None, {})] == list(CATALOGUE)
    assert {r.size for r in resolve_recipe("auto", {"size": (128, 128)})} == {(128, 128)}
    (custom,) = resolve_recipe(None, {"scorer": "memory", "size": (96, 96)})
    assert (custom.name, custom.taps, custom.aggregation, custom.size) == ("custom", (16, 32), 3, (96, 96))
    (gaussian,) = resolve_recipe(None, {"method": "frozen"})
    assert gaussian.scorer == "gaussian" and gaussian.aggregation == 1
    (named,) = resolve_recipe("wide", {"aggregation": 11})
    assert named.name == "wide" and named.aggregation == 11 and "changed by flags" in named.description
    with pytest.raises(ValueError, match="--recipe 'nope': expected auto or one of patchcore, fine"):
        resolve_recipe("nope", {})
    with pytest.raises(ValueError, match="aggregation 4, expected an odd window"):
        resolve_recipe("wide", {"aggregation": 4})
    with pytest.raises(ValueError, match="taps \\[12\\]"):
        resolve_recipe(None, {"taps": (12,)})
    with pytest.raises(ValueError, match="auto: chooses among frozen"):
        resolve_recipe("auto", {"method": "cse"})
    with pytest.raises(ValueError, match="augment 'rot90', expected one of none, rot180"):
        resolve_recipe("local", {"augment": "rot90"})
    # A blur wider than the map failed in torch after the whole fit, as a traceback.
    with pytest.raises(ValueError, match="smoothing_sigma 8.0 at 32x32, expected at most 7.75"):
        resolve_recipe("fine", {"size": (32, 32), "smoothing_sigma": 8})
    assert resolve_recipe("fine", {"size": (32, 32), "smoothing_sigma": 7.75})[0].smoothing_sigma == 7.75
    with pytest.raises(ValueError, match="unknown field\\(s\\) window"):
        Recipe.from_json({**CATALOGUE["wide"].to_json(), "window": 3})


def test_the_fields_load_checks_are_the_recipes_fields():
    """One declaration of what each field must be, read by load_bundle (which cannot import this layer) and by
    Recipe.validate: a field added to Recipe without a check would go unchecked in every manifest."""
    import dataclasses

    from engines.bundle.store import RECIPE_FIELD_CHECKS

    assert list(RECIPE_FIELD_CHECKS) == [f.name for f in dataclasses.fields(Recipe)]
    for recipe in CATALOGUE.values():
        assert Recipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("smoothing_sigma", "4", "smoothing_sigma '4', expected a number in (0, 64]"),
        ("taps", 16, "taps 16, expected increasing strides from 2,4,..,32"),
        ("size", ["64", "64"], "size ['64', '64'], expected height and width in 32..4096"),
        ("k", 2.0, "k 2.0, expected an integer >= 1"),
        ("memory_size", 0, "memory_size 0, expected an integer >= 1"),
    ],
)
def test_a_recipe_read_from_json_is_checked_before_it_is_converted(field, value, expected):
    """__post_init__'s float() and int() read the text "4" as a number and failed with a TypeError on a bare int."""
    with pytest.raises(ValueError) as refused:
        Recipe.from_json({**CATALOGUE["wide"].to_json(), field: value})
    assert str(refused.value) == f"recipe wide: {expected}"


def test_a_window_wider_than_the_finest_grid_is_refused_and_auto_leaves_such_candidates_out():
    """`--recipe wide --size 64` put a 15x15 window on a 4x4 grid: every location averaged the whole map, which then
    localised nothing, without a word."""
    with pytest.raises(ValueError) as refused:
        resolve_recipe("wide", {"size": (64, 64)})
    assert str(refused.value) == (
        "recipe wide: --aggregation 15 at --size 64x64 is wider than the 4x4 grid of the finest tap (stride 16), "
        "expected an odd window of at most 3: a wider one averages the whole map, which then localises nothing; a "
        "smaller --aggregation or a larger --size"
    )
    with pytest.raises(ValueError, match="--aggregation 5 at --size 32x64 is wider than the 2x4 grid"):
        Recipe("r", taps=(16, 32), size=(32, 64), aggregation=5).validate()
    assert Recipe("r", taps=(8, 16), size=(32, 64), aggregation=3).validate().grid == (4, 8)
    # The backbone rounds each halving up: 200 px at stride 16 is a 13-cell grid, which a 13x13 window fits.
    assert Recipe("r", taps=(16, 32), size=(200, 200), aggregation=13).validate().grid == (13, 13)
    # Auto leaves out the candidates whose window does not fit at the size asked for, all of them where none does
    # (validate then says why).
    assert [r.name for r in auto_candidates({"size": (64, 64)})] == ["patchcore", "fine", "local", "aligned"]
    assert [r.name for r in auto_candidates({"size": (256, 256)})] == list(CATALOGUE)
    assert len(auto_candidates({"size": (64, 64), "aggregation": 15})) == len(CATALOGUE)


def test_cli_refuses_an_unknown_recipe_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspectd",
            "train",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "b"),
            "--recipe",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "inspectd train: --recipe 'x': expected auto or one of patchcore, fine, local, context, wide, aligned"
    ]


def test_a_planted_mask_fitted_with_padding_marks_no_padding_as_defect():
    """Frames are padded with their mean grey; a planted mask over most of a wide frame used to be padded the same
    way, so the padding bands counted as defect pixels in auto's pixel metrics."""
    mask = np.zeros((200, 400), bool)
    mask[:, :260] = True  # 65 % of the frame
    fitted = fit_mask(mask, (320, 320), "pad")
    # 200x400 into 320x320: 160 rows of image between two bands of 80 rows of padding.
    assert not fitted[:80].any() and not fitted[240:].any()
    assert fitted[80:240, :200].all() and not fitted[80:240, 212:].any()
    assert np.array_equal(fit_mask(mask, (100, 200), "stretch"), mask[::2, ::2])


def strips(n: int, height: int = 40, width: int = 4000) -> list[np.ndarray]:
    """Line-scan strips (a weld seam, a cable): a scar scaled by the short side is 1-2 pixels wide at frame size."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        base = cv2.GaussianBlur(rng.normal(128, 40, (height, width)).astype(np.float32), (0, 0), 2)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def test_a_planted_defect_with_no_pixel_left_at_the_model_input_is_not_planted(monkeypatch):
    """Stretched from 40x4000 to 64x64 every scar drops below half a pixel: planted, it left a kind with no defect
    pixel (pixel AUROC raised after the whole feature extraction) and counted as a missed defect in image AUROC.
    It is drawn and skipped, so every other defect is the one drawn when nothing vanishes."""
    # Only vanished defects are dropped here; kinds left with few are the next test's.
    monkeypatch.setattr(select, "MIN_KEPT_PER_KIND", 1)
    frames = strips(8)
    folds = validation_folds(len(frames), 0.1, 0)
    model = ((64, 64, 1), "stretch")
    kept = Planted.draw(frames, folds, 0, [model])
    assert all(mask.any() for mask in kept.masks[model])
    assert "scar" not in kept.kind and set(kept.kind) == set(PLANTS) - {"scar"}
    # At the frames' own size nothing vanishes: the same draw, every defect planted.
    full = ((40, 4000, 1), "stretch")
    every = Planted.draw(frames, folds, 0, [full])
    assert set(every.kind) == set(PLANTS) and len(every) > len(kept)
    # What was kept is that draw without the vanished ones, in order: the generator was consumed as before.
    j = 0
    for i in range(len(kept)):
        while not fit_mask(every.masks[full][j], (64, 64), "stretch").any():
            j += 1
        assert (kept.fold[i], kept.source[i], kept.kind[i]) == (every.fold[j], every.source[j], every.kind[j])
        assert np.array_equal(kept.masks[model][i], fit_mask(every.masks[full][j], (64, 64), "stretch"))
        j += 1
    assert not any(fit_mask(m, (64, 64), "stretch").any() for m in every.masks[full][j:])


def test_a_plant_kind_with_few_defects_left_at_the_model_input_is_named_and_not_planted(monkeypatch):
    """Line-scan frames (100x3000) stretched to 320x320 keep a handful of their scars: counted as a full kind, one
    scar's rank moved the mean image AUROC by more than IMAGE_TOLERANCE. The kind is left out and named, and the other
    kinds' defects are those the same seed draws with every kind kept."""
    frames = strips(4, 100, 3000)
    folds = validation_folds(len(frames), 0.1, 0)
    model = ((320, 320, 1), "stretch")
    planted = Planted.draw(frames, folds, 0, [model])
    assert set(planted.kind) == set(PLANTS) - {"scar"}
    scars = planted.kept["scar"]
    assert 0 < scars < MIN_KEPT_PER_KIND and planted.drawn["scar"] == 24, planted.kept
    assert planted.shortfall() == f"scar {scars} of 24 kept, fewer than {MIN_KEPT_PER_KIND}: left out"
    monkeypatch.setattr(select, "MIN_KEPT_PER_KIND", 1)
    every = Planted.draw(frames, folds, 0, [model])
    assert every.kind.count("scar") == scars and every.shortfall() == f"scar {scars} of 24 kept"
    rows = [i for i, kind in enumerate(every.kind) if kind != "scar"]
    assert [(every.fold[i], every.source[i], every.kind[i]) for i in rows] == list(
        zip(planted.fold, planted.source, planted.kind)
    )
    assert np.array_equal(every.masks[model][rows], planted.masks[model])
    assert np.array_equal(every.images[model][rows], planted.images[model])


def test_auto_trains_on_strips_whose_scars_vanish_at_the_model_input(tmp_path):
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for i, frame in enumerate(strips(8)):
        cv2.imwrite(str(good / f"{i:03d}.png"), frame)
    lines: list[str] = []
    result = train_bundle(
        tmp_path / "data", tmp_path / "b", recipe="auto", size=(64, 64), progress=QUIET, report=lines.append
    )
    selection = load_bundle(result.bundle).manifest["recipe_selection"]
    kinds = selection["planted_kinds"]
    assert "scar" not in kinds and "cutout-small" not in kinds, kinds  # 0 and 2 of 24 kept
    # The same draw train made (its folds, seed 0): at 64x64 the small patches keep fewer than MIN_KEPT_PER_KIND too.
    planted = Planted.draw(strips(8), validation_folds(8, 0.1, 0), 0, [((64, 64, 1), "stretch")])
    thin = {k for k, n in planted.kept.items() if n < MIN_KEPT_PER_KIND}
    assert "scar" in thin and planted.kept["scar"] == 0 and len(thin) > 1, planted.kept
    assert sorted(kinds) == sorted(set(PLANTS) - thin), kinds
    for c in selection["candidates"]:
        assert set(c["per_kind"]) == set(kinds)
        mean = np.mean([row["image_auroc"] for row in c["per_kind"].values()])
        assert c["image_auroc"] == pytest.approx(mean, abs=1e-4)
    tail = f" planted defects ({len(kinds)} kinds; {planted.shortfall()})"
    assert any(line.startswith("recipe auto: ") and line.endswith(tail) for line in lines), (tail, lines)


def test_auto_refuses_in_one_line_when_no_planted_defect_keeps_a_pixel(monkeypatch):
    # Shading covers a tenth of the frame or more and keeps pixels at any input: the catalogue of plants is cut to
    # the scar alone here to reach what a future plant list, or a stranger frame, could.
    monkeypatch.setattr(select, "PLANTS", {"scar": PLANTS["scar"]})
    with pytest.raises(DataError) as refused:
        select_recipe(strips(4), [SMALL.replace(size=(64, 64), resize="pad")], channels=1)
    assert str(refused.value) == (
        "--recipe auto: no planted defect keeps a pixel once frames 40 high and 4000 wide are fitted to the model "
        "input 64x64 (HxW) pad, so auto cannot compare recipes: give --size HxW nearer the frames' shape or "
        "--resize stretch, or force a recipe, e.g. --recipe patchcore"
    )


def test_auto_with_one_held_out_share_fits_the_bundle_on_every_image(tmp_path):
    """At 60 images auto holds out one share of 24 (it cross-fits below 60): they choose the recipe and set the
    thresholds, scored by the fit that left them out, and the bundle is then fitted on all 60, as the cross-fitted
    path fits it on all 59; fitted on the other 36 alone, 40 % of a small station's good images never reached it."""
    data = make_tiny_mvtec(tmp_path / "data", n_train=60, n_test_good=0, n_test_defect=0)
    result = train_bundle(data, tmp_path / "b", recipe="auto", size=(64, 64), progress=QUIET, report=lambda _: None)
    bundle = load_bundle(result.bundle)
    training, recipe = bundle.manifest["training"], bundle.recipe
    assert (bundle.manifest["recipe_selection"]["folds"], training["n_fit"], training["n_holdout"]) == (1, 60, 24)
    assert training["fit_all"] is True and result.held_in_fit
    thresholds = bundle.thresholds().provenance
    assert (thresholds["images"], thresholds["n_good"], thresholds["n_fit"]) == ("out-of-fold", 24, 60)
    # The whole patch pool is under the memory size here, so the bank holds every fitted image's patches.
    if recipe["scorer"] == "memory":
        per_image = (64 // recipe["taps"][0]) ** 2
        assert training["memory_size"] == 60 * per_image, (training["memory_size"], recipe)


def selections_made(monkeypatch) -> list:
    """The selections train's auto makes, each appended as it is made: once one is there, train's refit runs."""
    from engines.training import train as train_module

    selected: list = []
    real_select = train_module.select_recipe

    def select_then_mark(*args, **kwargs):
        selection = real_select(*args, **kwargs)
        selected.append(selection)
        return selection

    monkeypatch.setattr(train_module, "select_recipe", select_then_mark)
    return selected


def test_cross_fitted_auto_stopped_in_its_refit_sets_its_thresholds_on_the_images_it_did_not_reach(
    tmp_path, monkeypatch
):
    """Cross-fitted (under 60 images) no fold fit is whole to fall back on, and the out-of-fold scores came from fits
    on more images than a refit stopped part-way holds: the images it never reached are its held-out ones, and the
    thresholds are set on their scores by the scorer that was written."""
    from engines.model.graph import InferenceGraph

    data = make_tiny_mvtec(tmp_path / "data", n_train=20, n_test_good=0, n_test_defect=0)
    selected = selections_made(monkeypatch)
    refit_batches: list = []
    real_embed = InferenceGraph.embed

    def embed(self, pixels):
        if selected:
            refit_batches.append(len(pixels))
            if len(refit_batches) == 2:  # the refit's second batch: the signal lands
                raise KeyboardInterrupt
        return real_embed(self, pixels)

    monkeypatch.setattr(InferenceGraph, "embed", embed)
    result = train_bundle(data, tmp_path / "b", recipe="auto", size=(64, 64), progress=QUIET, report=lambda _: None)
    bundle = load_bundle(result.bundle)
    training, provenance = bundle.manifest["training"], bundle.thresholds().provenance
    assert bundle.manifest["recipe_selection"]["folds"] > 1
    n_read = refit_batches[0]
    assert result.interrupted and bundle.manifest["interrupted"] is True
    assert (training["n_fit"], training["n_holdout"], training["n_scorer_fit"], training["fit_all"]) == (
        n_read,
        20 - n_read,
        n_read,
        False,
    )
    assert (provenance["images"], provenance["n_good"]) == ("held-out", 20 - n_read)
    # Teach on train's 20 images still splits them as a whole cross-fitted train would have: auto's folds.
    split = training_split(bundle, n=20)
    assert split.auto and split.train_n == 20 and not split.fit_all, split
    # The thresholds' reference is what the written scorer gives the images it was not fitted on.
    unread = ImageFiles(sorted((data / "train" / "good").iterdir())[n_read:])
    frames = fit_all(unread, bundle.input_shape, bundle.resize_policy)
    with open_engine(bundle, "onnxruntime", max_batch=len(frames)) as engine:
        scores = engine.infer(frames).scores
    reference = np.asarray(provenance["good_scores"]["quantiles"], dtype=np.float64)
    np.testing.assert_allclose(np.sort(scores), reference, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("where", ["features", "scorer fit"])
def test_auto_stopped_in_its_refit_on_every_image_keeps_the_fold_fit_its_thresholds_were_set_on(
    tmp_path, monkeypatch, where
):
    """Ctrl-C in the refit on every image (after the selection: in its features, or in the scorer's fit) writes the
    fold's whole fit, the one the thresholds were set on, not a scorer of the few images read so far judged by those
    thresholds, nor nothing at all."""
    from engines.model.graph import SCORERS, InferenceGraph

    data = make_tiny_mvtec(tmp_path / "data", n_train=60, n_test_good=0, n_test_defect=0)
    selected = selections_made(monkeypatch)
    interrupted: list = []
    real_embed = InferenceGraph.embed

    def embed(self, pixels):
        if selected and not interrupted:  # the refit's first batch: the signal lands, once
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_embed(self, pixels)

    if where == "features":
        monkeypatch.setattr(InferenceGraph, "embed", embed)
    else:
        for scorer in SCORERS.values():
            real_fit = scorer.fit

            def fit(*args, _real=real_fit, **kwargs):
                if selected and not interrupted:
                    interrupted.append(True)
                    raise KeyboardInterrupt
                return _real(*args, **kwargs)

            monkeypatch.setattr(scorer, "fit", staticmethod(fit))
    result = train_bundle(data, tmp_path / "b", recipe="auto", size=(64, 64), progress=QUIET, report=lambda _: None)
    bundle = load_bundle(result.bundle)
    training = bundle.manifest["training"]
    assert result.interrupted and bundle.manifest["interrupted"] is True
    assert (training["n_fit"], training["n_scorer_fit"], training["fit_all"]) == (36, 36, False)
    assert not result.held_in_fit and result.n_scorer_fit == 36
    fold_params = selected[0].chosen.params
    for name, value in bundle.scorer_params().items():
        np.testing.assert_array_equal(value, fold_params[name])
