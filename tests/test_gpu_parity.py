"""The GPU engine path: parity of ONNX Runtime's CUDA provider (FP32, FP16), TensorRT (FP32, FP16) and torch-CUDA
against ONNX Runtime CPU on the same real frames, and everything of that path that runs without a GPU (the FP16 graph
on ONNX Runtime CPU, the refusal of a CUDA request that fell back to the CPU, plan compatibility refusals, the reload
checks, thresholds against a reduced-precision engine, the missing-library messages).

Tolerances, all against ONNX Runtime CPU on the FP32 graph (`ref`), per output (score, anomaly_map):
- FP32 on a GPU (ONNX Runtime CUDA, TensorRT, torch CUDA): |d| <= 1e-3 + 1e-4 * max|ref| (TF32 is off in every one of
  them; only summation order differs).
- FP16 graph on ONNX Runtime CPU: |d| <= 1e-2 * max|ref| (measured 0.1-0.3 % on magnetic-tile frames).
- FP16 on a GPU (ONNX Runtime CUDA, TensorRT): |d| <= 2e-2 * max|ref| (float16 kernels accumulate differently from the
  CPU's float16-at-node-boundaries).

The GPU tests skip only where there is no NVIDIA GPU at all (no /dev/nvidia<N>, nothing in /proc/driver/nvidia/gpus),
or, with a GPU, where the optional package they exercise (onnxruntime-gpu, TensorRT, a CUDA torch) is not installed.
A GPU whose driver or libraries are broken fails them. With INSPECTD_REQUIRE_GPU=1 nothing is skipped: every GPU test
runs or fails (deploy/gpu_check.sh sets it).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.plans import PlanInfo, check_compatible, parse_sidecar, pick_plan, plan_name, sidecar_name
from engines.bundle.store import load_bundle
from engines.data.images import load_image
from engines.errors import BundleError, EngineError
from engines.model import build_engine
from engines.model.build_engine import cast_pixels_first, precision_recipe
from engines.model.half_precision import FLOAT16, to_fp16_variant
from engines.runtime import backend_class, open_engine
from engines.runtime.preprocess import fit_frame
from engines.runtime.tensorrt_backend import profile_violations
from inspectd.daemon.inference import ModelState
from tiny_dataset import defect_images, good_images

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
FP32_ATOL, FP32_RTOL = 1e-3, 1e-4
FP16_CPU_RTOL = 1e-2
FP16_GPU_RTOL = 2e-2
REQUIRE_GPU = os.environ.get("INSPECTD_REQUIRE_GPU") == "1"
CUDA_EP = "CUDAExecutionProvider"


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Tiny real bundles (frozen Lite0 at 64x64 on 8 defect-free tiles), one per scorer kind."""
    from engines.progress import Progress
    from engines.training.train import train_bundle

    root = tmp_path_factory.mktemp("gpu")
    good = root / "good"
    good_images(good, 8)
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
def frames(tmp_path_factory) -> np.ndarray:
    """Four real test frames, good and defective, fitted to the model input: uint8 [4, 64, 64, 1]."""
    folder = tmp_path_factory.mktemp("frames")
    paths = good_images(folder / "good", 1, "test")
    paths += [defect_images(folder / kind, kind, 1)[0] for kind in ("blowhole", "crack", "fray")]
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
    assert "pip install 'inspectd[gpu-cu12]' or 'inspectd[gpu-cu13]'" in lines[0]
    assert not (bundles["gaussian"] / "engines").exists()


def test_build_engine_int8_without_calibration_data_is_refused(bundles):
    done = run_cli("build-engine", str(bundles["gaussian"]), "--int8")
    assert done.returncode == 2
    assert done.stderr.strip() == "inspectd build-engine: --int8 and --calibration-data DIR: expected both or neither"


def test_registry_reports_the_tensorrt_backends_missing_dependency(bundles):
    cls = backend_class("tensorrt")  # importing the backend never imports tensorrt or CUDA
    assert cls.name == "tensorrt" and cls.Options().device == 0
    with pytest.raises(EngineError, match=r"engine\.options\.device: expected an integer, got 'two'"):
        cls.parse_options({"device": "two"}, where="engine.options")
    with pytest.raises(
        EngineError, match=r"engine\.options\.plan_file: unknown key \(known: device, plan, precision\)"
    ):
        cls.parse_options({"plan_file": "x"}, where="engine.options")
    if tensorrt_installed():
        pytest.skip("TensorRT is installed here: the missing-library path cannot be exercised")
    with pytest.raises(EngineError) as refused:
        open_engine(load_bundle(bundles["gaussian"]), "tensorrt")
    message = str(refused.value)
    assert "\n" not in message and "'tensorrt' is not installed" in message and "inspectd[gpu-cu13]" in message


def test_no_cuda_device_is_one_line():
    pytest.importorskip("cuda.bindings", reason="cuda-python not installed")
    from engines.runtime.cuda_buffers import select_device

    try:
        name, capability = select_device(0)
    except EngineError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("CUDA cudaGetDeviceCount")
    else:
        pytest.skip(f"a CUDA device is present ({name}, sm {capability}): the no-device path cannot be exercised")


def test_build_plan_turns_a_tensorrt_runtime_error_into_one_line(bundles, monkeypatch):
    """TensorRT's bindings raise RuntimeError (IOptimizationProfile.set_shape, an out-of-range profile index) where
    its C++ API reports an error; the command owes one line. The raise is planted: no TensorRT here."""

    def refuses(*args, **kwargs):
        raise RuntimeError("IOptimizationProfile::setDimensions: Error Code 3: min > max\n(more detail)")

    monkeypatch.setattr(build_engine, "_build_plan", refuses)
    with pytest.raises(EngineError) as refused:
        build_engine.build_plan(bundles["gaussian"], "fp16")
    assert str(refused.value) == (
        f"{bundles['gaussian']}: TensorRT refused the fp16 build "
        "(IOptimizationProfile::setDimensions: Error Code 3: min > max)"
    )


def test_profile_violations_name_each_input_outside_the_plan():
    ranges = {"references": ((1, 64), (10, 64))}
    assert profile_violations({"references": (10, 64), "gauss_mean": (64,)}, ranges) == []
    assert profile_violations({"references": (1, 64)}, ranges) == []
    assert profile_violations({"references": (11, 64)}, ranges) == [
        "references has shape (11, 64), the plan accepts (1, 64)..(10, 64)"
    ]
    assert profile_violations({"references": (5, 32)}, ranges) == [
        "references has shape (5, 32), the plan accepts (1, 64)..(10, 64)"
    ]


def test_the_plan_profile_lets_a_refit_grow_to_what_the_recipe_allows():
    """A first bundle of few images holds every patch (8 000 rows, under the recipe's 16 384): the plan's profile
    used to stop at today's rows, so teach's refit on more images was refused until the plan was rebuilt."""

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        inputs = [Tensor("pixels", (-1, 32, 32, 1)), Tensor("memory_bank", (-1, 432))]
        num_inputs = 2

        def get_input(self, i):
            return self.inputs[i]

    class Profile:
        shapes: dict = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    profile = Profile()
    params = {"memory_bank": np.zeros((8000, 432), np.float32)}
    ceilings = build_engine.scorer_row_ceilings({"memory_size": 16384, "k": 2})
    build_engine._set_profile_shapes(Network(), profile, (32, 32, 1), 1, 4, 8, params, ceilings)
    assert profile.shapes["memory_bank"] == ((1, 432), (8000, 432), (16384, 432))
    assert profile.shapes["pixels"] == ((1, 32, 32, 1), (4, 32, 32, 1), (8, 32, 32, 1))
    params = {"memory_bank": np.zeros((20000, 432), np.float32)}  # more than the recipe says: today's rows
    build_engine._set_profile_shapes(Network(), profile, (32, 32, 1), 1, 4, 8, params, ceilings)
    assert profile.shapes["memory_bank"][2] == (20000, 432)


# --------------------------------------------------------------- runs here: ONNX Runtime, CUDA asked for, FP16 graph
def test_cuda_that_fell_back_to_the_cpu_is_refused(tmp_path):
    """Asked for CUDA, ONNX Runtime opens the session anyway and runs it on the CPU; the engine reads the providers
    back and refuses. On this machine's CPU build that is the real fallback path (the session does open)."""
    if CUDA_EP in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the fallback is exercised by the GPU tests")
    from station_model import write_grey_bundle

    bundle = load_bundle(write_grey_bundle(tmp_path / "grey"))
    with pytest.raises(EngineError) as refused:
        open_engine(bundle, "onnxruntime", {"providers": "cuda"})
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"engine.options.providers: 'cuda' but this onnxruntime {ort.__version__} is a CPU build")
    assert "install onnxruntime-gpu in its place (docs/GPU.md)" in message
    with open_engine(bundle, "onnxruntime", {"providers": "auto"}) as engine:  # auto on a CPU build: the CPU
        assert engine.device == "cpu" and engine.session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match=r"engine\.options\.precision: expected one of fp32\|fp16, got 'bf16'"):
        backend_class("onnxruntime").parse_options({"precision": "bf16"}, where="engine.options")


@pytest.fixture(scope="module")
def fp16_bundles(bundles, tmp_path_factory) -> dict[str, Path]:
    """Copies of the bundles with the FP16 graph for the onnxruntime backend written into them."""
    root = tmp_path_factory.mktemp("fp16")
    made = {}
    for scorer, path in bundles.items():
        made[scorer] = shutil.copytree(path, root / scorer)
        done = run_cli("build-engine", str(made[scorer]), "--fp16", "--onnxruntime")
        assert done.returncode == 0, done.stderr
    return made


@pytest.mark.parametrize("scorer", ["gaussian", "kmeans"])
def test_onnxruntime_fp16_graph_from_build_engine(bundles, fp16_bundles, frames, scorer):
    bundle = load_bundle(fp16_bundles[scorer])  # the new file is listed and verified like the others
    fp16 = [name for name in bundle.manifest["files"] if name.startswith("engines/model-fp16-")]
    assert len(fp16) == 1
    with open_engine(bundle, "onnxruntime", {"providers": "cpu", "precision": "fp16"}, max_batch=4) as engine:
        assert engine.precision == "fp16" and engine.graph_path == bundle.path / fp16[0]
        got = engine.infer(frames)
    want = reference(bundles[scorer], frames)
    assert_close(got, want, 0.0, FP16_CPU_RTOL, f"onnxruntime FP16 graph on the CPU ({scorer})")
    assert list(np.argsort(got.scores)) == list(np.argsort(want.scores))
    assert not np.array_equal(got.scores, want.scores), "the FP16 graph computed exactly the FP32 scores"


def test_onnxruntime_fp16_without_its_graph_and_build_engine_misuse(bundles):
    with pytest.raises(BundleError) as refused:
        open_engine(load_bundle(bundles["gaussian"]), "onnxruntime", {"providers": "cpu", "precision": "fp16"})
    message = str(refused.value)
    assert "\n" not in message and "has no FP16 graph for its current model.onnx" in message
    assert message.endswith(f"write it with `inspectd build-engine {bundles['gaussian']} --fp16 --onnxruntime`")
    done = run_cli("build-engine", str(bundles["gaussian"]), "--onnxruntime")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "inspectd build-engine: --onnxruntime: expected with --fp16 (the onnxruntime backend runs model.onnx as FP32)"
    )


def test_torch_backend_turns_tf32_off(bundles):
    torch = pytest.importorskip("torch")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with open_engine(load_bundle(bundles["gaussian"]), "torch", {"device": "cpu"}, max_batch=1):
            assert torch.backends.cudnn.allow_tf32 is False
            assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


# --------------------------------------------------- runs here: thresholds set on FP32 scores vs an FP16 engine
FP16_CPU = {"providers": "cpu", "precision": "fp16"}


def write_thresholds(path: Path, image_threshold: float, **provenance) -> None:
    bundle = load_bundle(path)
    new = thresholds_doc.next_version(bundle.thresholds(), image_threshold=image_threshold, provenance=provenance)
    bundle.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(new))


def test_fp16_engine_is_measured_against_fp32_thresholds_and_refused_past_the_bound(fp16_bundles, tmp_path):
    path = shutil.copytree(fp16_bundles["gaussian"], tmp_path / "bundle")
    state = ModelState.open(path, "onnxruntime", FP16_CPU, max_batch=4)
    try:
        shift = state.shift
        good_dir = load_bundle(path).thresholds().provenance["good_dir"]
        assert shift is not None and shift.precision == "fp16" and shift.frames == 8 and shift.source == good_dir
        assert 0 < shift.max_abs < 0.01 * state.thresholds.image_threshold  # the trained thresholds accept it
        # A threshold that set the bound below the measured shift: refused on a thresholds change ...
        tight = thresholds_doc.next_version(state.thresholds, image_threshold=shift.max_abs * 50)
        with pytest.raises(EngineError) as refused:
            state.with_thresholds(tight)
        message = str(refused.value)
        assert "\n" not in message and message.startswith("engine precision fp16: scores differ from the FP32 graph's")
        assert "2.0% of the lowest image threshold" in message and "allow 1%" in message
        # ... unless they were calibrated on this engine's own scores.
        own = thresholds_doc.next_version(tight, provenance={"engine_precision": "fp16"})
        assert state.with_thresholds(own).thresholds is own
    finally:
        state.close()
    write_thresholds(path, shift.max_abs * 50)  # and at start
    with pytest.raises(EngineError, match=r"^engine precision fp16: scores differ .* 2\.0% of the lowest"):
        ModelState.open(path, "onnxruntime", FP16_CPU, max_batch=4)
    with ModelState.open(path, "onnxruntime", {"providers": "cpu"}, max_batch=4).engine:
        pass  # the same thresholds on the FP32 graph: nothing to measure
    write_thresholds(path, shift.max_abs * 50, engine_precision="fp16")
    ModelState.open(path, "onnxruntime", FP16_CPU, max_batch=4).close()


def test_fp16_engine_without_images_to_measure_on_is_refused(fp16_bundles, tmp_path):
    path = shutil.copytree(fp16_bundles["kmeans"], tmp_path / "bundle")
    write_thresholds(path, 1.0, good_dir=str(tmp_path / "gone"))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["training"]["data"] = str(tmp_path / "also-gone")
    (path / "manifest.json").write_text(json.dumps(manifest))
    # The first thresholds' folder (training) is still in the history: point it away too.
    doc = json.loads((path / "thresholds.json").read_text())
    for entry in doc["history"]:
        entry["provenance"]["good_dir"] = str(tmp_path / "gone")
    data = json.dumps(doc).encode()
    load_bundle(path).replace_file(thresholds_doc.FILE_NAME, data)
    with pytest.raises(EngineError) as refused:
        ModelState.open(path, "onnxruntime", FP16_CPU, max_batch=4)
    message = str(refused.value)
    assert "\n" not in message and "cannot measure how far the reduced-precision engine's scores are" in message
    assert str(tmp_path / "gone") in message and str(tmp_path / "also-gone") in message


# ------------------------------------------------------------ GPU: skipped only where there is no GPU at all
def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU at all, whatever state its driver and libraries are in."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))


def require_gpu(what: str, missing: str | None = None) -> None:
    """Skip `what` where there is no GPU, or (with a GPU) where the package it exercises is `missing`; with
    INSPECTD_REQUIRE_GPU=1 either is a failure. Anything else (a driver too old, no /dev/nvidia-uvm, CUDA libraries
    that do not load) is left to fail the test itself."""
    reason = f"{what}: no NVIDIA GPU here (no /dev/nvidia<N>, nothing in /proc/driver/nvidia/gpus)"
    if gpu_present():
        if missing is None:
            return
        reason = f"{what}: {missing}"
    if REQUIRE_GPU:
        pytest.fail(f"INSPECTD_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason)


def require_tensorrt_gpu() -> None:
    require_gpu("TensorRT", None if tensorrt_installed() else "the Python package tensorrt is not installed")


def require_onnxruntime_cuda() -> None:
    missing = None
    if CUDA_EP not in ort.get_available_providers():
        missing = f"onnxruntime {ort.__version__} is a CPU build: install onnxruntime-gpu in its place (docs/GPU.md)"
    require_gpu("ONNX Runtime CUDA", missing)


@pytest.mark.parametrize("scorer", ["gaussian", "kmeans"])
@pytest.mark.parametrize("precision, atol, rtol", [("fp32", FP32_ATOL, FP32_RTOL), ("fp16", 0.0, FP16_GPU_RTOL)])
def test_onnxruntime_cuda_matches_onnxruntime_cpu(bundles, fp16_bundles, frames, scorer, precision, atol, rtol):
    require_onnxruntime_cuda()
    path = fp16_bundles[scorer]
    options = {"providers": "cuda", "precision": precision}
    with open_engine(load_bundle(path), "onnxruntime", options, max_batch=4) as engine:
        assert engine.device == "cuda" and engine.session.get_providers()[0] == CUDA_EP
        got = engine.infer(frames)
        single = engine.infer(frames[1:2])
    assert_close(got, reference(bundles[scorer], frames), atol, rtol, f"ONNX Runtime CUDA {precision} ({scorer})")
    assert_close(single, reference(bundles[scorer], frames[1:2]), atol, rtol, f"ORT CUDA {precision} batch 1")


def test_teach_features_on_cuda_are_fp32(bundles, frames):
    """teach fits on the feature graph's output: on CUDA it must be FP32 (ONNX Runtime turns TF32 on by default)."""
    require_onnxruntime_cuda()
    from engines.runtime.features import FeatureExtractor

    bundle = load_bundle(bundles["gaussian"])
    extractor = FeatureExtractor(bundle, max_batch=4)
    assert extractor.session.get_providers()[0] == CUDA_EP
    assert extractor.session.get_provider_options()[CUDA_EP]["use_tf32"] == "0"
    cpu = ort.InferenceSession(str(bundle.path / "features.onnx"), providers=["CPUExecutionProvider"])
    got, want = extractor.extract(frames), cpu.run(None, {"pixels": frames})[0]
    worst, bound = float(np.abs(got - want).max()), FP32_ATOL + FP32_RTOL * float(np.abs(want).max())
    assert got.shape == want.shape and worst <= bound, f"CUDA features: max |diff| {worst:.3g} > {bound:.3g}"


def test_onnxruntime_cuda_on_a_device_that_does_not_exist_is_refused(bundles):
    require_onnxruntime_cuda()
    with pytest.raises(EngineError) as refused:
        open_engine(load_bundle(bundles["gaussian"]), "onnxruntime", {"providers": "cuda", "device": 63})
    message = str(refused.value)
    assert "\n" not in message and "its CUDA provider did not start on device 63" in message


@pytest.fixture(scope="module")
def plans(bundles, tmp_path_factory):
    """Per (scorer, precision): a copy of the bundle with a max-batch-4 plan built into it (lazily)."""
    root = tmp_path_factory.mktemp("plans")
    built: dict[tuple[str, str], Path] = {}

    def get(scorer: str, precision: str) -> Path:
        if (scorer, precision) not in built:
            path = shutil.copytree(bundles[scorer], root / f"{scorer}-{precision}")
            build_engine.build_plan(path, precision, max_batch=4, streams=1, timing_cache=root / "timing.cache")
            built[scorer, precision] = path
        return built[scorer, precision]

    return get


@pytest.mark.parametrize("scorer", ["gaussian", "kmeans"])
@pytest.mark.parametrize("precision, atol, rtol", [("fp32", FP32_ATOL, FP32_RTOL), ("fp16", 0.0, FP16_GPU_RTOL)])
def test_tensorrt_matches_onnxruntime_cpu(plans, frames, scorer, precision, atol, rtol):
    require_tensorrt_gpu()
    path = plans(scorer, precision)
    with open_engine(load_bundle(path), "tensorrt", {"precision": precision}, max_batch=4) as engine:
        assert engine.precision == precision
        got = engine.infer(frames)
        single = engine.infer(frames[1:2])  # a smaller batch than the profile's opt uses the same plan
    want = reference(path, frames)
    assert_close(got, want, atol, rtol, f"TensorRT {precision} ({scorer})")
    assert_close(single, reference(path, frames[1:2]), atol, rtol, f"TensorRT {precision} batch 1 ({scorer})")


def test_tensorrt_reload_swaps_parameters_and_a_refused_one_changes_nothing(plans, frames):
    require_tensorrt_gpu()
    path = plans("kmeans", "fp32")
    bundle = load_bundle(path)
    params = bundle.scorer_params()
    with open_engine(bundle, "tensorrt", {"precision": "fp32"}, max_batch=4) as engine:
        before = engine.infer(frames)
        # More references than the plan's profile allows: refused before any device buffer is touched ...
        grown = {**params, "references": np.concatenate([params["references"], params["references"]])}
        with pytest.raises(BundleError, match=r"^scorer params: references has shape .* the plan accepts"):
            engine.set_scorer_params(grown)
        # ... so the engine still runs on the old parameters, bit for bit.
        after = engine.infer(frames)
        np.testing.assert_array_equal(after.scores, before.scores)
        np.testing.assert_array_equal(after.maps, before.maps)
        # Fewer references (a refit to a smaller k) fit the profile and reach the device.
        fewer = {**params, "references": params["references"][:1].copy()}
        engine.set_scorer_params(fewer)
        got = engine.infer(frames)
    assert not np.allclose(got.maps, before.maps), "set_scorer_params did not reach the device"
    assert_close(got, ort_run(bundle.graph_path, frames, fewer), FP32_ATOL, FP32_RTOL, "after set_scorer_params")


def test_tensorrt_profile_shape_errors_raise_runtime_error(bundles):
    """What build_plan's one-line conversion rests on: TensorRT reports an invalid profile shape by raising."""
    require_tensorrt_gpu()
    import tensorrt as trt

    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    profile = builder.create_optimization_profile()
    with pytest.raises(RuntimeError):
        profile.set_shape("pixels", (4, 64, 64, 1), (2, 64, 64, 1), (1, 64, 64, 1))


def test_torch_cuda_matches_onnxruntime_cpu(bundles, frames):
    torch = pytest.importorskip("torch")
    require_gpu("torch CUDA", None if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device")
    bundle = load_bundle(bundles["gaussian"])
    with open_engine(bundle, "torch", {"device": "cuda"}, max_batch=4) as engine:
        # No TF32 anywhere: the backend switches it off itself (cuDNN defaults to it on Ampere and later).
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        got = engine.infer(frames)
    assert_close(got, reference(bundles["gaussian"], frames), FP32_ATOL, FP32_RTOL, "torch CUDA")
