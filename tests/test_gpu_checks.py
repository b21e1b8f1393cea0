"""Checks of the GPU path that run without a GPU: the score-shift measurement refuses non-finite scores, a TensorRT
build stores its plan before the timing cache (whose failures are warnings), `--streams` builds one profile unless
asked, and every rebuild hint keeps the plan's precision.

Real bundles (tests/station_model.py), real ONNX Runtime engines, the real `inspectd build-engine` entry point. Where
TensorRT would run, and it is not installed, the one function that needs it (`_build_with_tensorrt`) is replaced by
one returning what it returns; nothing else is faked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.plans import PlanInfo, fp16_graph_name, read_sidecar, sidecar_name
from engines.bundle.store import load_bundle
from engines.errors import BundleError, EngineError
from engines.model import build_engine
from engines.runtime.tensorrt_backend import TensorRTEngine
from inspectd.cli import main
from inspectd.daemon.inference import ModelState
from station_model import THRESHOLD, good_frame, grey_graph, write_grey_bundle

FP16_CPU = {"providers": "cpu", "precision": "fp16"}


def grey_graph_scaled_by(scale: float) -> bytes:
    """The station model's graph with its map divided by `scale` (NaN: every score NaN)."""
    model = onnx.load_from_string(grey_graph())
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "scale":
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.array([scale], np.float32), "scale"))
    return model.SerializeToString()


def good_folder(path: Path, count: int = 8) -> Path:
    path.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(path / f"{i:03d}.png"), good_frame(i))
    return path


def measured_on(bundle_path: Path, good: Path) -> None:
    """Point the bundle's thresholds at `good`, the defect-free folder the daemon measures a reduced-precision engine
    on at start."""
    bundle = load_bundle(bundle_path)
    new = thresholds_doc.next_version(
        bundle.thresholds(), image_threshold=THRESHOLD, provenance={"good_dir": str(good)}
    )
    bundle.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(new))


def fp16_graph_slot(bundle_path: Path) -> str:
    bundle = load_bundle(bundle_path)
    return fp16_graph_name(bundle.manifest["files"][bundle.manifest["graph"]])


# ----------------------------------------------------------------------------------- score shift: non-finite scores
def test_a_reduced_precision_engine_that_scores_nan_is_refused_at_start(tmp_path):
    """The FP16 graph in the bundle scores NaN on every frame (what float16 overflow in a backbone gives once the
    float32 scorer meets it); model.onnx scores them all finite. The daemon's start measures the two against each
    other: that must refuse, not measure a shift of 0 (max(0.0, nan) is 0.0)."""
    good = good_folder(tmp_path / "good")
    path = write_grey_bundle(tmp_path / "bundle")
    measured_on(path, good)
    load_bundle(path).replace_file(fp16_graph_slot(path), grey_graph_scaled_by(float("nan")), add=True)

    with pytest.raises(EngineError) as refused:
        ModelState.open(path, "onnxruntime", FP16_CPU, max_batch=4)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"engine precision fp16: the fp16 engine gave a non-finite score on 8 of 8 frames from {good} (probe frame "
        "0, 1, 2, 3, 4, 5, 6, 7), expected a finite score on every one: float16 overflow? run an fp32 engine"
    )
    # The same bundle on its FP32 graph starts: only the reduced-precision engine is broken.
    ModelState.open(path, "onnxruntime", {"providers": "cpu"}, max_batch=4).close()


def test_a_reference_that_scores_nan_is_refused_and_named(tmp_path):
    """When model.onnx itself scores NaN on the defect-free frames, the shift means nothing and the precision is not
    to blame: refused, naming the FP32 graph."""
    good = good_folder(tmp_path / "good")
    path = write_grey_bundle(tmp_path / "bundle")
    measured_on(path, good)
    bundle = load_bundle(path)
    bundle.replace_file(bundle.manifest["graph"], grey_graph_scaled_by(float("nan")))
    build_engine.store_onnxruntime_fp16(path, log=lambda line: None)

    with pytest.raises(EngineError) as refused:
        ModelState.open(path, "onnxruntime", FP16_CPU, max_batch=4)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"engine precision fp16: the FP32 graph (ONNX Runtime CPU) gave a non-finite score on 8 of 8 frames from {good}"
    )
    assert message.endswith("the bundle's model or scorer parameters are broken")


# ------------------------------------------------------------------------------- build-engine: plan first, then cache
def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def test_the_plan_is_stored_when_the_timing_cache_cannot_be_written(tmp_path, monkeypatch, capsys):
    """The timing cache goes under a path whose parent is a file: a warning line, exit 0, and the plan and its sidecar
    stored and listed in the manifest. Also: without --streams the build asks for one profile."""
    if tensorrt_installed():
        pytest.skip("TensorRT is installed here: the build would run for real, not this stand-in")
    path = write_grey_bundle(tmp_path / "bundle")
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    cache_path = blocker / "trt.cache"
    asked = {}

    def built_by_tensorrt(bundle, precision, max_batch, opt_batch, streams, *rest):
        # What the TensorRT build returns: the plan, its sidecar, where the timing cache goes and its bytes.
        asked.update(precision=precision, max_batch=max_batch, streams=streams)
        info = PlanInfo(
            tensorrt_version="10.13.0.35",
            gpu_name="NVIDIA H100 80GB HBM3",
            compute_capability="9.0",
            precision=precision,
            max_batch=max_batch,
            opt_batch=opt_batch,
            graph_sha256=bundle.manifest["files"][bundle.manifest["graph"]],
            profiles=streams,
        )
        return b"serialized plan", info, cache_path, b"timing cache"

    monkeypatch.setattr(build_engine, "_build_with_tensorrt", built_by_tensorrt)
    code = main(["build-engine", str(path), "--fp16", "--max-batch", "4", "--timing-cache", str(cache_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert asked == {"precision": "fp16", "max_batch": 4, "streams": 1}
    lines = out.strip().splitlines()
    assert lines[0] == (
        f"warning: timing cache {cache_path}: not saved (File exists: {blocker}); the plan is stored, the next "
        "build starts without it"
    )
    name = "engines/nvidia-h100-80gb-hbm3-trt10.13.0.35-b4-fp16.plan"
    assert lines[1].startswith(f"{path / name}: 0.0 MB, fp16, batch 1..4 (opt 4), 1 profile(s)")
    assert lines[1].endswith(f"timing cache {cache_path} (not saved)") and len(lines) == 2
    stored = load_bundle(path)  # verifies every listed file's checksum
    assert (stored.path / name).read_bytes() == b"serialized plan"
    assert read_sidecar(stored.path / sidecar_name(name)).precision == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "not-a-directory"]


def test_a_timing_cache_that_cannot_be_read_is_a_warning(tmp_path):
    lines: list[str] = []
    unreadable = tmp_path / "cache"
    unreadable.mkdir()  # a directory where the cache file should be
    assert build_engine.read_timing_cache(unreadable, lines.append) == b""
    assert lines == [f"warning: timing cache {unreadable}: not read (Is a directory), starting a new one"]
    assert build_engine.read_timing_cache(tmp_path / "none-yet", lines.append) == b"" and len(lines) == 1
    (tmp_path / "kept").write_bytes(b"tactics")
    assert build_engine.read_timing_cache(tmp_path / "kept", lines.append) == b"tactics" and len(lines) == 1


def test_a_written_timing_cache_replaces_the_old_one_whole(tmp_path):
    lines: list[str] = []
    cache = tmp_path / "deeper" / "trt.cache"
    assert build_engine.save_timing_cache(cache, b"first", lines.append)
    assert build_engine.save_timing_cache(cache, b"second", lines.append)
    assert cache.read_bytes() == b"second" and lines == []
    assert sorted(p.name for p in cache.parent.iterdir()) == ["trt.cache"]
    taken = tmp_path / "taken"
    (taken / "inside").mkdir(parents=True)  # a directory in the cache's place: the rename fails
    assert not build_engine.save_timing_cache(taken, b"third", lines.append)
    assert lines == [
        f"warning: timing cache {taken}: not saved (Is a directory); the plan is stored, the next build starts "
        "without it"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper", "taken"]  # the partial file removed


# ------------------------------------------------------------------------------ rebuild hints keep the precision
def test_a_refit_outside_an_fp16_plans_profile_names_an_fp16_rebuild(tmp_path):
    """set_scorer_params refuses parameters outside the plan's profile before any CUDA call, so it runs here on an
    engine given the state _open() sets from the plan (its profile for `centre`: 1 row); the bundle is real."""
    bundle = load_bundle(write_grey_bundle(tmp_path / "bundle"))
    engine = TensorRTEngine.__new__(TensorRTEngine)
    engine.bundle, engine._closed, engine.plan_path = bundle, False, bundle.path / "engines/x-b8-fp16.plan"
    engine.plan_info = PlanInfo("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", "fp16", 8, 8, "a" * 64)
    engine._param_shapes = {"centre": ["dynamic"]}
    engine._param_ranges = {"centre": ((1,), (1,))}
    with pytest.raises(BundleError) as refused:
        engine.set_scorer_params({"centre": np.array([128.0, 120.0], np.float32)})
    assert str(refused.value).endswith(
        f"rebuild the plan with `inspectd build-engine {bundle.path} --max-batch 8 --fp16` after the refit"
    )


def test_build_engine_help_says_what_streams_are_for(capsys):
    with pytest.raises(SystemExit):
        main(["build-engine", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--streams STREAMS optimisation profiles in the plan, 1..8 (default 1: inspectd runs one batch" in help_text
    assert "in flight" not in help_text


# ------------------------------------------------------------------------------------ device index: bounded at load
@pytest.mark.parametrize(
    "backend, device, message",
    [
        ("torch", "cuda:99999999999999999999", "expected cuda:N with N at most 127, got 'cuda:99999999999999999999'"),
        ("torch", "cuda:128", "expected cuda:N with N at most 127, got 'cuda:128'"),
        ("torch", "cuda:007", "expected cpu, cuda or cuda:N, got 'cuda:007'"),
        ("onnxruntime", 128, "expected at most 127, got 128"),
        ("onnxruntime", 2**64, f"expected at most 127, got {2**64}"),
        ("tensorrt", 128, "expected at most 127, got 128"),
    ],
)
def test_a_device_index_no_gpu_can_have_is_refused_at_load(backend, device, message):
    """torch took cuda:99999999999999999999 at load and raised its own RuntimeError at open, a traceback from
    `inspectd run` after `run --check` (which opens no GPU engine) said valid; cuda:128 it wraps to cuda:-128."""
    from engines.runtime import backend_class

    with pytest.raises(EngineError) as refused:
        backend_class(backend).parse_options({"device": device}, where="engine.options")
    assert str(refused.value) == f"engine.options.device: {message}"
    highest = "cuda:127" if backend == "torch" else 127
    assert backend_class(backend).parse_options({"device": highest}, where="engine.options").device == highest


def test_run_check_refuses_a_torch_device_index_torch_cannot_take(tmp_path, capsys):
    import yaml

    write_grey_bundle(tmp_path / "bundle")
    path = tmp_path / "inspectd.yaml"
    config = {
        "station": "line1",
        "model": {"bundle": "bundle"},
        "engine": {"backend": "torch", "options": {"device": "cuda:99999999999999999999"}},
        "cameras": [{"id": "cam0", "source": {"kind": "synthetic"}}],
        "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
        "metrics": {"listen": None},
        "state_dir": str(tmp_path / "state"),
    }
    path.write_text(yaml.safe_dump(config))
    code = main(["run", "--check", "--config", str(path), "--service-user", ""])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert captured.err.strip() == (
        "inspectd run --check: engine.options.device: expected cuda:N with N at most 127, got "
        "'cuda:99999999999999999999'"
    )
