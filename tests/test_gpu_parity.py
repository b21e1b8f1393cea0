"""The GPU engine path: parity of TensorRT (FP32, FP16) and torch-CUDA against ONNX Runtime CPU on the same real frames,
and everything of that path that runs without a GPU (the FP16 graph variant, plan compatibility refusals, the
missing-library messages).

Tolerances, all against ONNX Runtime CPU on the FP32 graph (`ref`), per output (score, anomaly_map):
- TensorRT FP32 and torch CUDA: |d| <= 1e-3 + 1e-4 * max|ref| (TF32 is off in the plan; only summation order differs).
- FP16 variant on ONNX Runtime CPU: |d| <= 1e-2 * max|ref| (measured 0.1-0.3 % on magnetic-tile frames).
- TensorRT FP16: |d| <= 2e-2 * max|ref| (real float16 kernels round more than CPU's float16-at-node-boundaries).
GPU tests skip with the reason when TensorRT, cuda-python or a CUDA device is missing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.bundle.plans import PlanInfo, check_compatible, parse_sidecar, pick_plan, plan_name, sidecar_name
from engines.bundle.store import load_bundle
from engines.data.images import load_image
from engines.errors import BundleError, EngineError
from engines.model.build_engine import cast_pixels_first, precision_recipe
from engines.model.half_precision import FLOAT16, to_fp16_variant
from engines.runtime import backend_class, open_engine
from engines.runtime.preprocess import fit_frame
from tiny_dataset import DATA

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
FP32_ATOL, FP32_RTOL = 1e-3, 1e-4
FP16_CPU_RTOL = 1e-2
FP16_TRT_RTOL = 2e-2

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Tiny real bundles (frozen Lite0 at 64x64 on 8 defect-free tiles), one per scorer kind."""
    from engines.training.train import Progress, train_bundle

    root = tmp_path_factory.mktemp("gpu")
    good = root / "good"
    good.mkdir()
    for path in sorted((DATA / "train" / "good").glob("*.jpg"))[:8]:
        shutil.copy(path, good / path.name)
    made = {}
    for scorer in ("gaussian", "kmeans"):
        made[scorer] = train_bundle(
            good,
            root / f"bundle-{scorer}",
            size=SIZE,
            scorer=scorer,
            k=2,
            batch=8,
            holdout=0.0,
            progress=Progress(enabled=False),
        ).bundle
    return made


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Four real test frames, good and defective, fitted to the model input: uint8 [4, 64, 64, 1]."""
    paths = [sorted((DATA / "test" / kind).glob("*.jpg"))[0] for kind in ("good", "blowhole", "crack", "fray")]
    return np.stack([fit_frame(load_image(p), (*SIZE, 1))[0] for p in paths])


def ort_run(model_or_path, pixels: np.ndarray, params: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["score", "anomaly_map"], {"pixels": pixels, **params})


def reference(bundle_path: Path, pixels: np.ndarray):
    with open_engine(load_bundle(bundle_path), "onnxruntime", {"providers": "cpu"}, max_batch=len(pixels)) as engine:
        return engine.infer(pixels)


def assert_close(actual, expected, atol: float, rtol_of_max: float, what: str) -> None:
    for name, a, e in zip(("score", "anomaly_map"), actual, expected):
        assert a.shape == e.shape and a.dtype == np.float32, f"{what} {name}: {a.shape} {a.dtype}"
        bound = atol + rtol_of_max * float(np.abs(e).max())
        worst = float(np.abs(a - e).max())
        assert worst <= bound, f"{what} {name}: max |diff| {worst:.3g} > {bound:.3g}"


def fake_info(**changes) -> PlanInfo:
    base = dict(
        tensorrt_version="10.13.0.35",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        precision="fp16",
        max_batch=8,
        opt_batch=8,
        graph_sha256="a" * 64,
        profiles=2,
        created="2026-11-23T12:00:00Z",
        workspace_mb=2048,
    )
    return PlanInfo(**{**base, **changes})


STATION = dict(
    tensorrt_version="10.13.0.35",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    graph_sha256="a" * 64,
    max_batch=8,
)


# ------------------------------------------------------------------------------------- runs here: FP16 graph variant
@pytest.mark.parametrize("scorer", ["gaussian", "kmeans"])
def test_fp16_variant_runs_on_onnxruntime_cpu_and_agrees_with_fp32(bundles, frames, scorer):
    bundle = load_bundle(bundles[scorer])
    fp32 = onnx.load(str(bundle.graph_path))
    variant = to_fp16_variant(fp32, "pixels", bundle.scorer_inputs)

    types = {v.name: v.type.tensor_type.elem_type for v in variant.graph.value_info}
    convs = [n for n in variant.graph.node if n.op_type == "Conv"]
    half_convs = [n for n in convs if types.get(n.output[0]) == FLOAT16]
    # The backbone's convolutions are float16; the two smoothing convolutions after the scorer are not.
    assert len(half_convs) >= len(convs) - 2 and len(half_convs) > 20
    assert any(n.name.endswith("__fp32/Cast") for n in variant.graph.node), "no cast back at the scorer boundary"
    # Sums of squares and products would overflow or lose the result in float16: the scorer keeps them float32.
    sensitive = [n for n in variant.graph.node if n.op_type in ("ReduceL2", "ReduceSum", "MatMul", "Pow", "Sqrt")]
    assert sensitive and all(types.get(n.output[0]) == onnx.TensorProto.FLOAT for n in sensitive)
    assert [i.name for i in variant.graph.input] == [i.name for i in fp32.graph.input]
    assert [o.type.tensor_type.elem_type for o in variant.graph.output] == [onnx.TensorProto.FLOAT] * 2

    params = bundle.scorer_params()
    expected = ort_run(bundle.graph_path, frames, params)
    actual = ort_run(variant, frames, params)
    assert_close(actual, expected, 0.0, FP16_CPU_RTOL, f"FP16 variant ({scorer})")
    # Reduced precision must not reorder the frames' verdicts.
    assert list(np.argsort(actual[0])) == list(np.argsort(expected[0]))


def test_pixels_cast_first_graph_is_exact(bundles, frames):
    """TensorRT gets the graph with `pixels` cast before the transpose: same numbers, in both variants."""
    bundle = load_bundle(bundles["gaussian"])
    params = bundle.scorer_params()
    fp32 = onnx.load(str(bundle.graph_path))
    fp16 = to_fp16_variant(fp32, "pixels", bundle.scorer_inputs)
    for original, to in ((fp32, onnx.TensorProto.FLOAT), (fp16, onnx.TensorProto.FLOAT16)):
        want = ort_run(original, frames, params)
        model = cast_pixels_first(onnx.load_from_string(original.SerializeToString()), to)
        first = model.graph.node[0]
        assert first.op_type == "Cast" and list(first.input) == ["pixels"]
        assert all("pixels" not in node.input for node in model.graph.node[1:])
        for got, expected in zip(ort_run(model, frames, params), want):
            np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------ runs here: plan compatibility checks
def test_plan_name_and_sidecar_name():
    name = plan_name("NVIDIA H100 80GB HBM3", "10.13.0.35", 8, "fp16")
    assert name == "engines/nvidia-h100-80gb-hbm3-trt10.13.0.35-b8-fp16.plan"
    assert sidecar_name(name) == "engines/nvidia-h100-80gb-hbm3-trt10.13.0.35-b8-fp16.json"
    assert plan_name("NVIDIA A10", "11.4.0.12", 4, "fp32").endswith("nvidia-a10-trt11.4.0.12-b4.plan")


def test_sidecar_from_another_tensorrt_or_gpu_is_refused_with_the_rebuild_command():
    info = parse_sidecar(
        json.dumps(
            {
                "format": "inspectd-trt-plan",
                **dataclasses.asdict(
                    fake_info(tensorrt_version="10.8.0.43", gpu_name="NVIDIA A10", compute_capability="8.6")
                ),
            }
        ),
        "fake.json",
    )
    with pytest.raises(BundleError) as refused:
        check_compatible(info, "b/engines/x.plan", "b", **STATION)
    message = str(refused.value)
    assert "\n" not in message
    assert "TensorRT 10.8.0.43 (this station: 10.13.0.35)" in message
    assert "'NVIDIA A10' sm 8.6" in message and "'NVIDIA H100 80GB HBM3' sm 9.0" in message
    assert message.endswith("rebuild with `inspectd build-engine b --max-batch 8 --fp16`")

    check_compatible(fake_info(), "b/engines/x.plan", "b", **STATION)  # same version, GPU, graph: accepted
    with pytest.raises(BundleError, match=r"model\.onnx aaaaaaaaaaaa"):
        check_compatible(fake_info(), "p", "b", **{**STATION, "graph_sha256": "b" * 64})
    with pytest.raises(BundleError, match=r"max batch 8 \(engine needs 16\).*--max-batch 16 --fp16`$"):
        check_compatible(fake_info(), "p", "b", **{**STATION, "max_batch": 16})


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("gpu_name"), "key 'gpu_name' missing"),
        (lambda d: d.update(max_batch="8"), "max_batch: expected int, got '8'"),
        (lambda d: d.update(precision="bf16"), "precision 'bf16', expected one of fp32, fp16, int8"),
        (lambda d: d.update(opt_batch=9), "opt_batch 9, expected 1..max_batch (8)"),
        (lambda d: d.update(format="other"), "format 'other', expected 'inspectd-trt-plan'"),
    ],
)
def test_sidecar_errors_name_the_key(edit, expected):
    doc = {"format": "inspectd-trt-plan", **dataclasses.asdict(fake_info())}
    edit(doc)
    with pytest.raises(BundleError) as refused:
        parse_sidecar(json.dumps(doc), "side.json")
    assert str(refused.value) == f"side.json: {expected}"


def test_pick_plan_takes_the_compatible_plan_and_the_manifest_checksums_it(bundles, tmp_path):
    path = shutil.copytree(bundles["gaussian"], tmp_path / "bundle")
    bundle = load_bundle(path)
    graph_sha = bundle.manifest["files"]["model.onnx"]
    station = {k: v for k, v in STATION.items() if k != "graph_sha256"}
    with pytest.raises(BundleError, match=r"no TensorRT plan in the bundle: build one with `inspectd build-engine"):
        pick_plan(bundle, **station)

    other = fake_info(gpu_name="NVIDIA A10", compute_capability="8.6", graph_sha256=graph_sha)
    ours = fake_info(graph_sha256=graph_sha, precision="fp32")
    for info, payload in ((other, b"plan for an A10"), (ours, b"plan for an H100")):
        name = plan_name(info.gpu_name, info.tensorrt_version, info.max_batch, info.precision)
        bundle.replace_file(name, payload, add=True)
        bundle.replace_file(sidecar_name(name), info.to_json().encode(), add=True)

    bundle = load_bundle(path)  # the new files are listed and verified like the others
    plan, info = pick_plan(bundle, **station)
    assert plan.read_bytes() == b"plan for an H100" and info == ours
    with pytest.raises(BundleError, match=r"GPU 'NVIDIA A10' sm 8\.6 .*rebuild with `inspectd build-engine "):
        pick_plan(bundle, **{**station, "gpu_name": "NVIDIA A10"}, precision="fp16")

    plan.write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"nvidia-h100-80gb-hbm3-trt10\.13\.0\.35-b8\.plan: sha256 .* does not match"):
        load_bundle(path)


def test_tensorrt_10_and_11_precision_recipes():
    assert precision_recipe("10.13.0.35", "fp32") == (True, "fp32")
    assert precision_recipe("11.4.0.12", "fp16") == (True, "fp16")  # FP16 from the graph, strongly typed
    assert precision_recipe("10.13.0.35", "int8") == (False, "fp32")  # calibration needs weak typing
    with pytest.raises(EngineError, match=r"--int8: TensorRT 11\.4\.0\.12 removed implicit INT8 calibration"):
        precision_recipe("11.4.0.12", "int8")
    with pytest.raises(EngineError, match=r"TensorRT 8\.6\.1: expected 10 or 11"):
        precision_recipe("8.6.1", "fp32")


# --------------------------------------------------------------------------- runs here: missing-library messages
def tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_build_engine_without_tensorrt_exits_with_one_line(bundles):
    if tensorrt_installed():
        pytest.skip("TensorRT is installed here: the missing-library path cannot be exercised")
    done = run_cli("build-engine", str(bundles["gaussian"]), "--fp16")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("inspectd build-engine: TensorRT Python package 'tensorrt' is not installed")
    assert "pip install 'inspectd[gpu]'" in lines[0]
    assert not (bundles["gaussian"] / "engines").exists()


def test_build_engine_int8_without_calibration_data_is_refused(bundles):
    done = run_cli("build-engine", str(bundles["gaussian"]), "--int8")
    assert done.returncode == 2
    assert done.stderr.strip() == "inspectd build-engine: --int8 and --calibration-data DIR: expected both or neither"


def test_registry_reports_the_tensorrt_backends_missing_dependency(bundles):
    cls = backend_class("tensorrt")  # importing the backend never imports tensorrt or CUDA
    assert cls.name == "tensorrt" and cls.Options().streams == 2
    with pytest.raises(EngineError, match=r"engine\.options\.streams: expected an integer, got 'two'"):
        cls.parse_options({"streams": "two"}, where="engine.options")
    with pytest.raises(EngineError, match=r"engine\.options\.plan_file: unknown key \(known: device, plan,"):
        cls.parse_options({"plan_file": "x"}, where="engine.options")
    if tensorrt_installed():
        pytest.skip("TensorRT is installed here: the missing-library path cannot be exercised")
    with pytest.raises(EngineError) as refused:
        open_engine(load_bundle(bundles["gaussian"]), "tensorrt")
    message = str(refused.value)
    assert "\n" not in message and "'tensorrt' is not installed" in message and "inspectd[gpu]" in message


def test_no_cuda_device_is_one_line():
    pytest.importorskip("cuda.bindings", reason="cuda-python not installed")
    from engines.runtime.cuda_buffers import select_device

    try:
        name, capability = select_device(0)
    except EngineError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("CUDA cudaGetDeviceCount")
    else:
        pytest.skip(f"a CUDA device is present ({name}, sm {capability}): the no-device path cannot be exercised")


# ---------------------------------------------------------------------------------------- GPU: skipped without one
def require_tensorrt_gpu() -> None:
    if not tensorrt_installed():
        pytest.skip("TensorRT not installed")
    try:
        from engines.runtime.cuda_buffers import select_device

        select_device(0)
    except EngineError as exc:
        pytest.skip(f"no CUDA device ({exc})")


@pytest.fixture(scope="module")
def plans(bundles, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Per (scorer, precision): a copy of the bundle with a max-batch-4 plan built into it (lazily)."""
    root = tmp_path_factory.mktemp("plans")
    built: dict[tuple[str, str], Path] = {}

    def get(scorer: str, precision: str) -> Path:
        if (scorer, precision) not in built:
            from engines.model.build_engine import build_plan

            path = shutil.copytree(bundles[scorer], root / f"{scorer}-{precision}")
            build_plan(path, precision, max_batch=4, streams=2, timing_cache=root / "timing.cache")
            built[scorer, precision] = path
        return built[scorer, precision]

    return get


@pytest.mark.parametrize("scorer", ["gaussian", "kmeans"])
@pytest.mark.parametrize("precision, atol, rtol", [("fp32", FP32_ATOL, FP32_RTOL), ("fp16", 0.0, FP16_TRT_RTOL)])
def test_tensorrt_matches_onnxruntime_cpu(plans, frames, scorer, precision, atol, rtol):
    require_tensorrt_gpu()
    path = plans(scorer, precision)
    with open_engine(load_bundle(path), "tensorrt", {"precision": precision}, max_batch=4) as engine:
        got = engine.infer(frames)
        single = engine.infer(frames[1:2])  # a smaller batch than the profile's opt uses the same plan
    want = reference(path, frames)
    assert_close(got, want, atol, rtol, f"TensorRT {precision} ({scorer})")
    assert_close(single, reference(path, frames[1:2]), atol, rtol, f"TensorRT {precision} batch 1 ({scorer})")


def test_tensorrt_two_batches_in_flight_and_reload(plans, frames):
    require_tensorrt_gpu()
    path = plans("gaussian", "fp32")
    bundle = load_bundle(path)
    with open_engine(bundle, "tensorrt", {"precision": "fp32", "streams": 2}, max_batch=4) as engine:
        first = engine.submit(frames[:2])
        second = engine.submit(frames[2:])
        with pytest.raises(EngineError, match="streams busy"):
            engine.submit(frames[:1])
        a, b = engine.collect(first), engine.collect(second)
        assert_close(a, reference(path, frames[:2]), FP32_ATOL, FP32_RTOL, "in flight, batch 1")
        assert_close(b, reference(path, frames[2:]), FP32_ATOL, FP32_RTOL, "in flight, batch 2")

        before = engine.infer(frames)
        shifted = {k: v.copy() for k, v in bundle.scorer_params().items()}
        shifted["gauss_mean"] += 0.5
        engine.set_scorer_params(shifted)
        got = engine.infer(frames)
    assert not np.allclose(got[1], before[1]), "set_scorer_params did not reach the device"
    assert_close(got, ort_run(bundle.graph_path, frames, shifted), FP32_ATOL, FP32_RTOL, "after set_scorer_params")


def test_torch_cuda_matches_onnxruntime_cpu(bundles, frames, monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    # cuDNN convolutions default to TF32 on Ampere and later; FP32 parity is about FP32 (the plan turns it off too).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    bundle = load_bundle(bundles["gaussian"])
    with open_engine(bundle, "torch", {"device": "cuda"}, max_batch=4) as engine:
        got = engine.infer(frames)
    assert_close(got, reference(bundles["gaussian"], frames), FP32_ATOL, FP32_RTOL, "torch CUDA")
