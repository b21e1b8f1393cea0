"""ONNX export and the two runtime backends: the exported graph (uint8 pixels -> score, map; scorer params as inputs;
dynamic batch) agrees with torch on real frames at batch 1 and 3, for every scorer, and for a top-share image score at
a size with partial pooling blocks on padded frames; `inspectd export` rewrites a bundle's graph; swapping scorer
params needs no export and keeps its own copy; bad input (pixels, a scorer.npz or weights.npz that does not fit the
graph) is refused with one line; a spot in a stretched or padded frame comes back to its own place in the frame-sized
map."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.bundle.format import recipe_of
from engines.bundle.store import load_bundle
from engines.errors import EngineError
from engines.model.graph import SCORERS
from engines.model.recipes import POOL_BLOCK, pooled_count
from engines.runtime import open_engine
from engines.runtime.predictor import Predictor
from engines.runtime.preprocess import fit_frame
from tiny_dataset import make_tiny_mvtec, one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[1]
SIZE = 64
# Not a multiple of POOL_BLOCK: the image score's last row and column of blocks are partial (2 of 4 pixels).
POOLED_SIZE = 66
POOLED_SHARE = 0.05


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_mvtec(tmp_path_factory.mktemp("data"), n_train=8, n_test_good=1, n_test_defect=2)


@pytest.fixture(scope="module", params=list(SCORERS))
def bundle(request, data, tmp_path_factory):
    from engines.training.train import Progress, train_bundle

    out = tmp_path_factory.mktemp("bundles") / request.param
    train_bundle(data, out, size=(SIZE, SIZE), scorer=request.param, k=2, progress=Progress(enabled=False))
    return load_bundle(out)


@pytest.fixture(scope="module")
def engines(bundle):
    """Both backends on the same bundle, opened once per module (max_batch 3)."""
    with (
        open_engine(bundle, "torch", {}, max_batch=3) as reference,
        open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=3) as engine,
    ):
        yield {"torch": reference, "onnxruntime": engine}


@pytest.fixture(scope="module")
def frames(data) -> np.ndarray:
    """Three real frames (one good, two with blowholes) fitted the way the daemon fits them."""
    from engines.data.images import load_image
    from engines.runtime.preprocess import fit_frame

    paths = sorted((data / "test").glob("*/*.jpg"))[:3]
    batch = np.empty((3, SIZE, SIZE, 1), np.uint8)
    for i, path in enumerate(paths):
        fit_frame(load_image(path), (SIZE, SIZE, 1), "stretch", out=batch[i])
    return batch


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Agreement to 1e-4 of the quantity's scale (map values are sums of squares in the hundreds)."""
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(actual - expected).max() <= 1e-4 * scale, (np.abs(actual - expected).max(), scale)


def test_graph_contract(bundle):
    model = onnx.load(str(bundle.graph_path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    assert inputs == [("pixels", onnx.TensorProto.UINT8)] + [(n, onnx.TensorProto.FLOAT) for n in bundle.scorer_inputs]
    pixel_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert pixel_dims[0].dim_param and [d.dim_value for d in pixel_dims[1:]] == [SIZE, SIZE, 1]
    assert [o.name for o in model.graph.output] == ["score", "anomaly_map"]
    assert not any(i.name in bundle.scorer_inputs for i in model.graph.initializer)  # params are inputs, not weights


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_agrees_with_torch(engines, frames, batch):
    pixels = np.ascontiguousarray(frames[:batch])
    expected = engines["torch"].infer(pixels)
    actual = engines["onnxruntime"].infer(pixels)
    assert actual.scores.shape == (batch,) and actual.maps.shape == (batch, SIZE, SIZE)
    assert actual.scores.dtype == np.float32 and actual.maps.dtype == np.float32
    assert_close(actual.scores, expected.scores)
    assert_close(actual.maps, expected.maps)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_each_frame_is_scored_on_its_own_whatever_the_batch(engines, frames, backend):
    engine = engines[backend]
    together = engine.infer(frames)
    for i in (1, 0, 2):  # batch sizes 3, 1, 2, 1, ... on one engine: nothing keeps the previous run's shape
        single = engine.infer(np.ascontiguousarray(frames[i : i + 1]))
        pair = engine.infer(np.ascontiguousarray(frames[[i, (i + 1) % 3]]))
        assert_close(single.scores, together.scores[i : i + 1])
        assert_close(single.maps, together.maps[i : i + 1])
        assert_close(pair.maps[0], together.maps[i])


def test_scorer_params_swap_without_export(bundle, engines, frames):
    """Make frame 0 its own k-means reference (or the Gaussian's mean, or the memory bank): its map must drop to ~0."""
    import torch

    with torch.inference_mode():
        features = engines["torch"].graph.embed(torch.from_numpy(frames[:1]))[0].numpy()
    original = bundle.scorer_params()
    params = dict(original)
    if "references" in params:
        params["references"] = features[None]
    elif "memory_bank" in params:  # frame 0's own patches as the whole memory: a bank of another size, too
        params["memory_bank"] = np.ascontiguousarray(features.reshape(features.shape[0], -1).T)
    else:
        params["gauss_mean"] = features
    for backend, engine in engines.items():
        before = engine.infer(frames)
        engine.set_scorer_params(params)
        try:
            after = engine.infer(frames)
        finally:
            engine.set_scorer_params(original)
        assert after.maps[0].max() <= 1e-3 * max(1.0, float(before.maps[0].max())), backend
        assert after.scores[0] < before.scores[0], backend
        assert after.maps[1].max() > 10 * after.maps[0].max(), backend  # other frames still differ from it
        bad = {name: value[..., :1] for name, value in original.items()}
        with pytest.raises(EngineError, match=r"scorer params: \w+ has shape"):
            engine.set_scorer_params(bad)
        assert_close(engine.infer(frames).maps, before.maps)  # a refused swap leaves the old params in place
        # Parameters no frame could be scored against: every frame would be an error once they were swapped in.
        name = next(iter(original))
        poisoned = original[name].copy()
        poisoned.flat[0] = np.nan
        for broken, message in ((poisoned, "holds NaN or infinity"), (original[name][:0], r"has shape \(0, ")):
            with pytest.raises(EngineError, match=f"scorer params: {name} {message}"):
                engine.set_scorer_params({**original, name: broken})
        assert_close(engine.infer(frames).maps, before.maps)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_swap_keeps_its_own_copy_of_the_callers_arrays(bundle, engines, frames, backend):
    """Both backends bind the checked arrays without copying them. A caller that writes its arrays after a swap (a
    reused refit buffer) must not reach the running engine past the swap's checks: NaN written there stays there."""
    engine = engines[backend]
    before = engine.infer(frames)
    # Contiguous float32, as a refit produces them: arrays a backend could bind as they are.
    params = {name: np.array(value, np.float32, order="C") for name, value in bundle.scorer_params().items()}
    engine.set_scorer_params(params)
    try:
        for value in params.values():
            value[...] = np.nan
        after = engine.infer(frames)
    finally:
        engine.set_scorer_params(bundle.scorer_params())
    assert np.isfinite(after.scores).all() and np.isfinite(after.maps).all(), backend
    assert_close(after.maps, before.maps)
    assert_close(after.scores, before.scores)


@pytest.fixture(scope="module")
def pooled_engines(data, tmp_path_factory):
    """Both backends on a bundle whose image score is the mean of the top 5 % of 4x4 map blocks, at 66x66, fitting
    frames by padding (magnetic_tile's frames are far from square, so every frame gets a border). Train refuses 66
    now (not a multiple of the taps' stride); bundles trained before that still load and run, so one is made here
    as they were, with the size check set aside."""
    from engines.training import train
    from engines.training.train import Progress, train_bundle

    out = tmp_path_factory.mktemp("pooled") / "gaussian"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(train, "aligned_to_taps", lambda recipes: recipes)
    try:
        train_bundle(
            data,
            out,
            size=(POOLED_SIZE, POOLED_SIZE),
            resize="pad",
            scorer="gaussian",
            score_share=POOLED_SHARE,
            progress=Progress(enabled=False),
        )
    finally:
        monkeypatch.undo()
    bundle = load_bundle(out)
    assert bundle.resize_policy == "pad" and recipe_of(bundle.manifest)["score_share"] == POOLED_SHARE
    with (
        open_engine(bundle, "torch", {}, max_batch=3) as reference,
        open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=3) as engine,
    ):
        yield {"torch": reference, "onnxruntime": engine}


def _blocks(maps: np.ndarray) -> np.ndarray:
    """[N, blocks]: the mean of every block of up to 4x4 pixels, row by row of blocks; the last row and column of
    blocks are partial."""
    _, h, w = maps.shape
    b = POOL_BLOCK
    return np.stack([maps[:, y : y + b, x : x + b].mean(axis=(1, 2)) for y in range(0, h, b) for x in range(0, w, b)]).T


def test_top_share_score_agrees_at_a_size_with_partial_blocks(pooled_engines, data):
    """Stretched real frames, so every pixel of the 66x66 input is the frame's; a bright bottom strip on one of them
    puts the partial blocks among the top ones."""
    from engines.data.images import load_image

    paths = sorted((data / "test").glob("*/*.jpg"))[:3]
    pixels = np.empty((3, POOLED_SIZE, POOLED_SIZE, 1), np.uint8)
    for i, path in enumerate(paths):
        fit_frame(load_image(path), pixels.shape[1:], "stretch", out=pixels[i])
    pixels[1, -2:] = 255
    expected = pooled_engines["torch"].infer(pixels)
    actual = pooled_engines["onnxruntime"].infer(pixels)
    assert actual.maps.shape == (3, POOLED_SIZE, POOLED_SIZE)
    assert_close(actual.maps, expected.maps)
    assert_close(actual.scores, expected.scores)
    # The image score by hand: the mean of the highest pooled_count blocks, partial ones included.
    blocks = _blocks(actual.maps.astype(np.float64))
    top = np.argsort(blocks, axis=1)[:, ::-1][:, : pooled_count(POOLED_SHARE, POOLED_SIZE, POOLED_SIZE)]
    assert_close(actual.scores, np.take_along_axis(blocks, top, axis=1).mean(axis=1))
    bottom_row = blocks.shape[1] - -(-POOLED_SIZE // POOL_BLOCK)  # index of the first block of the partial row
    assert (top[1] >= bottom_row).any()  # the strip's partial blocks count in frame 1's score


def test_padded_frames_agree_between_backends(pooled_engines, data):
    """Real frames of several aspect ratios (whole, a wide strip, a tall strip) through the Predictor with the
    bundle's "pad" policy: the same scores and frame-sized maps from both backends."""
    from engines.data.images import load_image

    frame = load_image(sorted((data / "test").glob("*/*.jpg"))[1])
    h, w = frame.shape[:2]
    frames = [frame, frame[: max(8, h // 3)], frame[:, : max(8, w // 3)]]
    results = {}
    for backend, engine in pooled_engines.items():
        predictor = Predictor(engine)
        result = predictor.predict(frames)
        results[backend] = (result, [predictor.frame_map(result, i).copy() for i in range(len(frames))])
        padded = [p for p in predictor.placements[: len(frames)] if (p.height, p.width) != (POOLED_SIZE, POOLED_SIZE)]
        assert len(padded) >= 2  # the test is about borders: at least the two strips have one
    (expected, expected_maps), (actual, actual_maps) = results["torch"], results["onnxruntime"]
    assert_close(actual.scores, expected.scores)
    for i, (a, e) in enumerate(zip(actual_maps, expected_maps)):
        assert a.shape == frames[i].shape[:2]
        assert_close(a, e)


@pytest.mark.parametrize("policy", ["stretch", "pad"])
def test_a_spot_comes_back_where_it_was_in_the_frame(policy):
    """fit_frame then Placement.map_to_frame, on the fitted input itself as the map: a bright spot at a known place in
    frames of several aspect ratios (taller, wider, square, extreme) comes back within a few pixels of it. A wrong
    padding offset or a swapped axis moves it by tens of pixels."""
    model = (64, 96, 1)
    for fh, fw in ((300, 120), (120, 300), (257, 255), (64, 64), (1000, 37), (37, 1000)):
        yy, xx = np.mgrid[0:fh, 0:fw]
        cy, cx = fh * 0.3, fw * 0.7
        spot = np.exp(-(((yy - cy) / (fh * 0.08)) ** 2 + ((xx - cx) / (fw * 0.08)) ** 2))
        frame = (40 + 200 * spot).astype(np.uint8)
        fitted, placement = fit_frame(frame, model, policy)
        back = placement.map_to_frame(fitted[..., 0].astype(np.float32))
        assert back.shape == (fh, fw)
        py, px = np.unravel_index(np.argmax(back), back.shape)
        # One model pixel covers up to fh/64 or fw/96 frame pixels: the peak may land anywhere within it.
        tolerance = 2 + max(fh / placement.height, fw / placement.width)
        assert abs(py - cy) <= tolerance and abs(px - cx) <= tolerance, (policy, fh, fw, placement, (py, px))
        # The rest of the frame lines up too, but for a placement a few pixels across, which keeps little of it.
        limit = 1.0 if min(placement.height, placement.width) >= 16 else 6.0
        assert np.abs(back - frame).mean() < limit, (policy, fh, fw)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_bad_pixels_are_refused_in_one_line(engines, frames, backend):
    engine = engines[backend]
    cases = [
        (frames[:1].astype(np.float32), "dtype float32, expected uint8"),
        (frames[:1, :32], f"shape (1, 32, {SIZE}, 1), expected [N, {SIZE}, {SIZE}, 1]"),
        (frames[0], f"expected [N, {SIZE}, {SIZE}, 1]"),
        (np.concatenate([frames, frames[:1]]), "batch 4, expected 1..3"),
        (np.asfortranarray(frames[:2]), "not C-contiguous"),
        ([[0]], "expected a numpy array"),
    ]
    for pixels, expected in cases:
        with pytest.raises(EngineError) as info:
            engine.infer(pixels)
        assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_closed_engine_refuses_in_one_line(bundle, frames):
    engine = open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=3)
    engine.infer(frames)
    engine.close()
    with pytest.raises(EngineError, match=r"model.onnx: engine closed$"):
        engine.infer(frames)
    with pytest.raises(EngineError, match=r"model.onnx: engine closed$"):
        engine.set_scorer_params(bundle.scorer_params())


def test_backend_options_are_validated(bundle):
    with pytest.raises(EngineError, match=r"engine.options.providers: expected one of auto\|cpu\|cuda, got 'tpu'"):
        open_engine(bundle, "onnxruntime", {"providers": "tpu"})
    with pytest.raises(EngineError, match=r"engine.options.intra_op_threads: expected an integer, got '4'"):
        open_engine(bundle, "onnxruntime", {"intra_op_threads": "4"})
    with pytest.raises(EngineError, match=r"engine.options.device: expected cpu, cuda or cuda:N, got 'gpu0'"):
        open_engine(bundle, "torch", {"device": "gpu0"})


def test_export_cli_rewrites_the_graph_and_its_checksum(bundle, tmp_path, capsys):
    copy = Path(shutil.copytree(bundle.path, tmp_path / "copy"))
    # An empty graph whose checksum is consistent: the bundle loads, but only export can make it runnable again.
    (copy / "model.onnx").write_bytes(b"")
    doc = json.loads((copy / "manifest.json").read_text())
    doc["files"]["model.onnx"] = hashlib.sha256(b"").hexdigest()
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="ONNX Runtime cannot load it"):
        open_engine(load_bundle(copy), "onnxruntime", {})
    from engines.model.export import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    if recipe_of(bundle.manifest)["scorer"] == "memory":
        # The command line once: its entry point is the same for every scorer, and a child pays seconds for torch.
        done = subprocess.run(
            [sys.executable, "-m", "inspectd", "export", str(copy), "--opset", "18"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr
    else:
        assert run(parser.parse_args([str(copy), "--opset", "18"])) == 0
    rebuilt = load_bundle(copy)
    model = onnx.load(str(rebuilt.graph_path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    with (
        open_engine(rebuilt, "onnxruntime", {}, max_batch=1) as a,
        open_engine(bundle, "onnxruntime", {}, max_batch=1) as b,
    ):
        probe = np.full((1, SIZE, SIZE, 1), 120, np.uint8)
        assert_close(a.infer(probe).maps, b.infer(probe).maps)
    capsys.readouterr()
    for opset in (13, 21):  # past the exporter's last opset torch failed only after the export began
        assert run(parser.parse_args([str(copy), "--opset", str(opset)])) == 2
        assert capsys.readouterr().err == (
            f"inspectd export: --opset {opset}: expected 17 to 20 (what the ONNX export supports)\n"
        )


def test_the_opset_range_is_the_one_this_torch_exports():
    from torch.onnx import _constants

    from engines.model.export import MAX_OPSET

    assert MAX_OPSET == _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


@pytest.fixture(scope="module")
def kmeans_bundle(data, tmp_path_factory) -> Path:
    from engines.training.train import Progress, train_bundle

    out = tmp_path_factory.mktemp("edited") / "kmeans"
    train_bundle(data, out, size=(SIZE, SIZE), scorer="kmeans", k=2, progress=Progress(enabled=False))
    return out


def edited_copy(source: Path, where: Path, edit) -> Path:
    copy = Path(shutil.copytree(source, where))
    doc = json.loads((copy / "manifest.json").read_text())
    edit(doc)
    (copy / "manifest.json").write_text(json.dumps(doc))
    return copy


def test_export_refuses_an_architecture_edited_away_from_its_recipe(kmeans_bundle, tmp_path, capsys):
    """Export rebuilds the graph from the architecture: a sigma edited there moved ONNX Runtime's scores too, under
    the same model_id and thresholds, and nothing was said."""
    from engines.model.export import add_arguments, run

    copy = edited_copy(kmeans_bundle, tmp_path / "copy", lambda m: m["architecture"].update(smoothing_sigma=1.0))
    graph = (copy / "model.onnx").read_bytes()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    capsys.readouterr()
    assert run(parser.parse_args([str(copy)])) == 2
    assert capsys.readouterr().err == (
        f"inspectd export: {copy / 'manifest.json'}: architecture.smoothing_sigma 1.0, expected the recorded "
        "recipe's smoothing_sigma 4.0\n"
    )
    assert (copy / "model.onnx").read_bytes() == graph


@pytest.mark.parametrize("sigma", [0, -1.0, float("nan"), float("inf")])
def test_build_graph_refuses_a_smoothing_sigma_a_recipe_would_refuse(kmeans_bundle, sigma):
    """A bundle without a recipe to compare with reaches build_graph as it is: sigma 0 made every map NaN."""
    from engines.model.graph import build_graph

    architecture = {**load_bundle(kmeans_bundle).architecture, "smoothing_sigma": sigma}
    with pytest.raises(ValueError, match=r"^architecture: smoothing_sigma .*, expected a number > 0$"):
        build_graph(architecture, pretrained=False)


def test_an_architecture_the_graph_cannot_be_built_from_is_blamed_on_the_manifest(kmeans_bundle):
    """What load does not check (a method's own head settings) still ends in one line naming the manifest, not in a
    TypeError from timm: here taps as a string, in a Bundle made without load's checks."""
    from engines.bundle.store import Bundle
    from engines.errors import BundleError
    from engines.model.export import graph_from_bundle

    loaded = load_bundle(kmeans_bundle)
    manifest = {**loaded.manifest, "architecture": {**loaded.architecture, "taps": "23"}}
    with pytest.raises(BundleError) as info:
        graph_from_bundle(Bundle(kmeans_bundle, manifest))
    message = str(info.value)
    assert message.startswith(f"{kmeans_bundle / 'manifest.json'}: architecture does not build a graph ("), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "change",
    [
        {"method": "cse", "head": {"pool_stride": "x"}},  # int("x") in the method's head: a ValueError
        {"head": {}, "taps": None},  # a field build_graph indexes, gone: a KeyError
    ],
    ids=["head-setting", "no-taps"],
)
def test_a_graph_the_manifest_cannot_build_is_never_blamed_on_the_weights(kmeans_bundle, change):
    """A ValueError or KeyError from building the graph was taken as the weights not fitting: `weights.npz: does not
    fit the manifest's architecture (invalid literal for int() ...)`, the wrong file and a bare reason."""
    from engines.bundle.store import Bundle
    from engines.errors import BundleError
    from engines.model.export import graph_from_bundle

    loaded = load_bundle(kmeans_bundle)
    architecture = {k: v for k, v in {**loaded.architecture, **change}.items() if v is not None}
    with pytest.raises(BundleError) as info:
        graph_from_bundle(Bundle(kmeans_bundle, {**loaded.manifest, "architecture": architecture}))
    message = str(info.value)
    assert message.startswith(f"{kmeans_bundle / 'manifest.json'}: architecture does not build a graph ("), message
    assert "\n" not in message


@pytest.mark.parametrize("edit", ["architecture", "taps"])
def test_run_check_on_the_torch_backend_refuses_a_wrong_typed_architecture_in_one_line(kmeans_bundle, tmp_path, edit):
    """Either edit ended `inspectd run --check` (and the start) in a traceback from inside timm or build_graph."""
    import yaml

    from inspectd.daemon.security import ALLOW_ROOT_ENV

    def change(m):
        if edit == "architecture":
            m["architecture"] = "x"
        else:
            m["architecture"]["taps"] = "23"

    edited_copy(kmeans_bundle, tmp_path / "bundle", change)
    config = {
        "station": "line1",
        "model": {"bundle": "bundle"},
        "engine": {"backend": "torch"},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--check", "--config", str(path), "--service-user", ""],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != ALLOW_ROOT_ENV} | {"OMP_NUM_THREADS": "1"},
    )
    field = "architecture" if edit == "architecture" else "architecture.taps"
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"{tmp_path / 'bundle' / 'manifest.json'}: {field} " in done.stderr, (
        done.stderr
    )


def with_file(source: Path, where: Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    """A copy of `source` whose `name` holds `arrays`, its checksum fixed so the bundle loads (a hand edit)."""
    from engines.bundle.store import _npz_bytes

    data = _npz_bytes(arrays)
    copy = edited_copy(source, where, lambda m: m["files"].update({name: hashlib.sha256(data).hexdigest()}))
    (copy / name).write_bytes(data)
    return copy


def test_the_torch_backend_checks_scorer_shapes_against_its_graph_as_onnx_runtime_does(bundle, tmp_path):
    """The torch backend took its expected shapes from the scorer.npz it checked, so a file trimmed along a fixed
    dimension opened, then failed every batch (`inspectd eval --backend torch` ended in a traceback). Both backends
    must refuse it in the same line naming scorer.npz."""
    params = dict(bundle.scorer_params())
    name = bundle.scorer_inputs[-1]  # gauss_precision [D, D] for the Gaussian; D of the others
    value = params[name]
    params[name] = value[:-1, :-1] if name == "gauss_precision" else value[:, : value.shape[1] - 1]
    if "gauss_mean" in params:  # the grid too: its h and w come from the graph's features alone
        trimmed = {**params, "gauss_mean": params["gauss_mean"][:, :-1, :-1]}
        trimmed["gauss_precision"] = bundle.scorer_params()["gauss_precision"]
        cases = [params, trimmed]
    else:
        cases = [params]
    for i, case in enumerate(cases):
        copy = load_bundle(with_file(bundle.path, tmp_path / f"copy{i}", "scorer.npz", case))
        messages = {}
        for backend, options in (("onnxruntime", {"intra_op_threads": 1}), ("torch", {})):
            with pytest.raises(EngineError) as info:
                open_engine(copy, backend, options, max_batch=2)
            messages[backend] = str(info.value)
        assert messages["torch"] == messages["onnxruntime"], messages
        assert messages["torch"].startswith(f"{copy.path / 'scorer.npz'}: "), messages
        assert " has shape " in messages["torch"] and "\n" not in messages["torch"], messages


@pytest.fixture(scope="module")
def kmeans_weights(kmeans_bundle) -> dict[str, np.ndarray]:
    return load_bundle(kmeans_bundle).weights()


def _first(weights: dict[str, np.ndarray], ndim: int) -> str:
    return next(key for key, value in weights.items() if value.ndim == ndim and value.dtype.kind == "f")


WEIGHT_EDITS = {
    "missing": (
        lambda w, k: {n: v for n, v in w.items() if n != k},
        lambda w, k: f"{k} missing, expected the {len(w)} tensors of the architecture",
    ),
    "unexpected": (
        lambda w, k: {**w, "extra.weight": np.zeros(3, np.float32)},
        lambda w, k: "extra.weight is not a tensor of the architecture, expected only its tensors",
    ),
    "shape": (
        lambda w, k: {**w, k: w[k][:1]},
        lambda w, k: f"{k} has shape {(1, *w[k].shape[1:])}, expected {list(w[k].shape)}",
    ),
    "nan": (
        lambda w, k: {**w, k: np.full_like(w[k], np.nan)},
        lambda w, k: f"{k} holds NaN or infinity, expected finite numbers",
    ),
    "past-float32": (
        lambda w, k: {**w, k: np.full(w[k].shape, 1e300)},
        lambda w, k: f"{k} holds numbers past float32's range, expected finite numbers",
    ),
    "complex": (
        lambda w, k: {**w, k: w[k].astype(np.complex64)},
        lambda w, k: f"{k} has dtype complex64, expected float16, float32 or float64",
    ),
    "bool": (lambda w, k: {**w, k: w[k] > 0}, lambda w, k: f"{k} has dtype bool, expected float16, float32 or float64"),
    "float128": (
        lambda w, k: {**w, k: w[k].astype(np.longdouble)},
        lambda w, k: f"{k} has dtype {np.dtype(np.longdouble)}, expected float16, float32 or float64",
    ),
    "int": (
        lambda w, k: {**w, k: w[k].astype(np.int32)},
        lambda w, k: f"{k} has dtype int32, expected float16, float32 or float64",
    ),
}


@pytest.mark.parametrize("edit", list(WEIGHT_EDITS))
def test_weights_that_do_not_fit_the_graph_are_refused_naming_the_key(kmeans_bundle, kmeans_weights, tmp_path, edit):
    """torch's own refusal was cut to its header (`Error(s) in loading state_dict for InferenceGraph:`), naming no
    tensor; NaN, complex, bool and integer weights were cast or taken, and export wrote a graph that scored NaN."""
    from engines.errors import BundleError
    from engines.model.export import graph_from_bundle

    change, reason = WEIGHT_EDITS[edit]
    key = _first(kmeans_weights, 4)  # a convolution's weight
    copy = load_bundle(with_file(kmeans_bundle, tmp_path / "copy", "weights.npz", change(kmeans_weights, key)))
    with pytest.raises(BundleError) as info:
        graph_from_bundle(copy)
    message = str(info.value)
    assert message == f"{copy.path / 'weights.npz'}: {reason(kmeans_weights, key)}", message


def test_export_refuses_nan_weights_in_one_line_and_keeps_the_graph(kmeans_bundle, kmeans_weights, tmp_path, capsys):
    from engines.model.export import add_arguments, run

    key = _first(kmeans_weights, 1)
    copy = with_file(
        kmeans_bundle, tmp_path / "copy", "weights.npz", {**kmeans_weights, key: kmeans_weights[key] * np.nan}
    )
    graph = (copy / "model.onnx").read_bytes()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    capsys.readouterr()
    assert run(parser.parse_args([str(copy)])) == 2
    assert capsys.readouterr().err == (
        f"inspectd export: {copy / 'weights.npz'}: {key} holds NaN or infinity, expected finite numbers\n"
    )
    assert (copy / "model.onnx").read_bytes() == graph


def test_weights_torch_loads_as_they_are_still_load(kmeans_bundle, kmeans_weights, tmp_path):
    """float64 weights (cast to the graph's float32) and BatchNorm's counters stored with one element, as the
    pretrained files store them, are what torch loads: no refusal."""
    from engines.model.export import graph_from_bundle

    widened = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in kmeans_weights.items()}
    assert any(v.shape == (1,) and v.dtype.kind == "i" for v in widened.values())
    graph = graph_from_bundle(load_bundle(with_file(kmeans_bundle, tmp_path / "copy", "weights.npz", widened)))
    key = _first(kmeans_weights, 4)
    assert np.array_equal(graph.state_dict()[key].numpy(), kmeans_weights[key])
