"""`inspectd build-engine BUNDLE`: build a TensorRT plan from the bundle's ONNX graph and store it in the bundle.

The plan gets one optimisation profile (batch 1..max, tuned for --opt-batch; --streams N makes N copies, of which
inspectd's runtime uses only the first: it runs one batch at a time), a workspace limit, and a timing cache shared by
every build on the station (loaded before, saved after: rebuilds take seconds, not minutes). It is written to
`engines/<gpu>-trt<version>-b<max>[-fp16|-int8].plan` with a JSON sidecar (engines.bundle.plans) and both are listed
with their checksums in the manifest; the timing cache is saved after them, and a cache that cannot be read or
written is a warning, not a failed build.

Precision, TensorRT 10 vs 11:
- fp32: strongly typed network from model.onnx; TF32 is switched off so the scorer is real FP32.
- fp16: strongly typed network from the FP16 variant of the graph (engines.model.half_precision: backbone and head in
  float16, scorer in float32). TensorRT 11 removed BuilderFlag.FP16 so precision must come from the graph; using the
  same graph on 10 keeps one path and keeps the Mahalanobis/nearest-reference arithmetic out of float16 on both.
- int8 (TensorRT 10 only): weakly typed network with the INT8 and FP16 flags and an IInt8EntropyCalibrator2 fed with
  defect-free frames; layers outside the backbone are pinned to float32. TensorRT 11 removed implicit calibration
  (int8_calibrator) in favour of Q/DQ nodes in the graph, which inspectd does not export: refused with the reason.

TensorRT's UINT8 is an I/O-only type (it must be converted before any other layer), while the exported graph
transposes the uint8 pixels before casting them; the graph handed to TensorRT therefore casts `pixels` first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engines.bundle.format import GRAPH, PIXELS, ROW_LIMITS
from engines.bundle.plans import (
    INSTALL_HINT,
    MAX_PROFILES,
    PlanInfo,
    fp16_graph_name,
    import_tensorrt,
    plan_name,
    sidecar_name,
    slug,
    tensorrt_major,
)
from engines.bundle.store import Bundle, load_bundle
from engines.errors import EngineError
from engines.runtime import cuda_buffers

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto data types
MAX_CALIBRATION_FRAMES = 512
DEFAULT_WORKSPACE_MB = 2048


def default_timing_cache(gpu_name: str, tensorrt_version: str) -> Path:
    """Per station, not per bundle: tactic timings depend on the GPU and TensorRT, not on the model's weights."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inspectd"
    return root / f"trt-timing-{slug(gpu_name)}-trt{tensorrt_version}.cache"


def import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise EngineError(f"the Python package 'onnx' is not installed ({exc}): {INSTALL_HINT}") from exc
    return onnx


def cast_pixels_first(model, to: int):
    """`model` with `pixels` converted to float (`to`) before anything reads it (TensorRT's UINT8 is I/O only).

    Exact: every uint8 value is representable in float16 and float32, so the graph computes the same thing; the
    exported Cast that followed the transpose becomes a no-op cast."""
    import_onnx()
    from onnx import helper

    from engines.model.half_precision import infer_types

    cast_output = f"{PIXELS}__as_float"
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name == PIXELS:
                node.input[slot] = cast_output
    model.graph.node.insert(0, helper.make_node("Cast", [PIXELS], [cast_output], to=to, name=f"{cast_output}/Cast"))
    # Tensors between the input and the old Cast were annotated uint8: drop the annotations and infer them again.
    del model.graph.value_info[:]
    return infer_types(model, "graph for TensorRT")


def prepare_graph(bundle: Bundle, variant: str, destination: Path) -> tuple[Path, set[str]]:
    """Write the graph TensorRT parses (`variant` "fp32" or "fp16"); also return the names of the backbone/head
    nodes (the feature region)."""
    onnx = import_onnx()
    from engines.model.half_precision import feature_region, to_fp16_variant

    model = onnx.load(str(bundle.graph_path))
    region = {model.graph.node[i].name for i in feature_region(model, PIXELS, bundle.scorer_inputs)}
    if variant == "fp16":
        model = to_fp16_variant(model, PIXELS, bundle.scorer_inputs)
    model = cast_pixels_first(model, FLOAT16 if variant == "fp16" else FLOAT)
    onnx.save(model, str(destination))
    return destination, region


def calibration_frames(
    folder: str | Path, input_shape: tuple[int, int, int], resize: str, batch: int, bit_depth: int, each_axis: bool
) -> np.ndarray:
    """Defect-free frames fitted to the model input, as [batches, batch, H, W, C] (a whole number of batches)."""
    from engines.data.images import ImageFiles, list_images
    from engines.errors import DataError
    from engines.runtime.preprocess import fit_all

    paths = list_images(folder)[:MAX_CALIBRATION_FRAMES]
    usable = len(paths) - len(paths) % batch
    if usable == 0:
        raise DataError(f"--calibration-data {folder}: {len(paths)} image(s), expected at least {batch} (one batch)")
    frames = fit_all(ImageFiles(paths[:usable], bit_depth), input_shape, resize, each_axis)
    return frames.reshape(usable // batch, batch, *input_shape)


def make_calibrator(trt, batches: np.ndarray, params: dict[str, np.ndarray]):
    """An IInt8EntropyCalibrator2 that feeds `batches` (and the fixed scorer parameters every batch needs)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.cache: bytes | None = None
            self.pixels = cuda_buffers.DeviceBuffer(batches[0].nbytes)
            self.params = {}
            for name, value in params.items():
                self.params[name] = cuda_buffers.DeviceBuffer(value.nbytes)
                cuda_buffers.upload_blocking(self.params[name], value)

        def get_batch_size(self) -> int:
            return batches.shape[1]

        def get_batch(self, names):
            if self.index >= len(batches):
                return None
            cuda_buffers.upload_blocking(self.pixels, batches[self.index])
            self.index += 1
            return [self.pixels.ptr if name == PIXELS else self.params[name].ptr for name in names]

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)

        def close(self) -> None:
            for buffer in (self.pixels, *self.params.values()):
                buffer.close()

    return Calibrator()


def scorer_row_ceilings(recipe: dict) -> dict[str, int]:
    """The most rows a refit (inspectd teach) can give each dynamic scorer input: the recipe's memory size and k.
    A first bundle can hold fewer (a memory bank of every patch of a few images; k-means merging references)."""
    return {name: int(recipe.get(field) or 0) for name, field in ROW_LIMITS.items()}


def _set_profile_shapes(
    network,
    profile,
    input_shape,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    params: dict[str, np.ndarray],
    ceilings: dict[str, int],
) -> None:
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name == PIXELS:
            profile.set_shape(PIXELS, (min_batch, *input_shape), (opt_batch, *input_shape), (max_batch, *input_shape))
        elif any(d < 0 for d in tensor.shape):
            # The row count (the number of references or memory patches) may change on a refit: down to one, up to
            # what the recipe allows, so that a refit never needs the plan rebuilt.
            actual = params[tensor.name].shape
            low = tuple(1 if d < 0 else a for d, a in zip(tensor.shape, actual))
            rows = max(actual[0], ceilings.get(tensor.name, 0)) if tensor.shape[0] < 0 else actual[0]
            profile.set_shape(tensor.name, low, actual, (rows, *actual[1:]))


def _pin_outside_region_to_fp32(trt, network, region: set[str]) -> int:
    """With weak typing (INT8), keep every layer that is not a backbone/head node in float32. Layers the parser
    named after no region node (helpers it created) stay float32 too: unknown means scorer-safe."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in region:
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outputs and all(o.dtype == trt.float32 for o in outputs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def precision_recipe(tensorrt_version: str, precision: str) -> tuple[bool, str]:
    """(strongly typed network?, graph variant "fp32"/"fp16") for `precision` on this TensorRT, or EngineError.

    Pure: the TensorRT 10 vs 11 decision is testable without TensorRT."""
    major = tensorrt_major(tensorrt_version)
    if major < 10:
        raise EngineError(f"TensorRT {tensorrt_version}: expected 10 or 11")
    if precision == "int8":
        if major >= 11:
            raise EngineError(
                f"--int8: TensorRT {tensorrt_version} removed implicit INT8 calibration "
                "(int8_calibrator) in favour of Q/DQ nodes in the graph, which inspectd does not "
                "export: use --fp16, or TensorRT 10"
            )
        return False, "fp32"
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"precision {precision!r}: expected fp32, fp16 or int8")
    return True, precision


def build_plan(
    bundle_path: str | Path,
    precision: str = "fp32",
    max_batch: int = 8,
    opt_batch: int | None = None,
    streams: int = 1,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    calibration_data: str | Path | None = None,
    device: int = 0,
    log=print,
) -> Path:
    """Build and store a plan for the bundle at `bundle_path`; returns the plan's path. Python API of the command."""
    try:
        return _build_plan(
            bundle_path,
            precision,
            max_batch,
            opt_batch,
            streams,
            workspace_mb,
            timing_cache,
            calibration_data,
            device,
            log,
        )
    except RuntimeError as exc:
        # TensorRT's Python bindings raise RuntimeError for what its C++ API reports as an error (an invalid profile
        # shape, a refused profile index), where the command owes one line, not a traceback.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"{bundle_path}: TensorRT refused the {precision} build ({reason})") from exc


def _build_plan(
    bundle_path: str | Path,
    precision: str = "fp32",
    max_batch: int = 8,
    opt_batch: int | None = None,
    streams: int = 1,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    calibration_data: str | Path | None = None,
    device: int = 0,
    log=print,
) -> Path:
    opt_batch = max_batch if opt_batch is None else opt_batch
    if max_batch < 1:
        raise EngineError(f"--max-batch {max_batch}: expected >= 1")
    if not 1 <= opt_batch <= max_batch:
        raise EngineError(f"--opt-batch {opt_batch}: expected 1..{max_batch} (--max-batch)")
    if not 1 <= streams <= MAX_PROFILES:
        raise EngineError(f"--streams {streams}: expected 1..{MAX_PROFILES}")
    if workspace_mb < 16:
        raise EngineError(f"--workspace-mb {workspace_mb}: expected >= 16")
    if (precision == "int8") != (calibration_data is not None):
        raise EngineError("--int8 and --calibration-data DIR: expected both or neither")

    started = time.monotonic()
    bundle = load_bundle(bundle_path)
    plan, info, cache_path, cache = _build_with_tensorrt(
        bundle, precision, max_batch, opt_batch, streams, workspace_mb, timing_cache, calibration_data, device, log
    )
    name = plan_name(info.gpu_name, info.tensorrt_version, max_batch, precision)
    # The plan before the timing cache: the cache only speeds up the next build, and a cache that cannot be written
    # must not cost this one.
    bundle.replace_file(name, plan, add=True)
    bundle.replace_file(sidecar_name(name), info.to_json().encode(), add=True)
    saved = save_timing_cache(cache_path, cache, log)
    log(
        f"{bundle.path / name}: {len(plan) / 1e6:.1f} MB, {precision}, batch 1..{max_batch} (opt {opt_batch}), "
        f"{streams} profile(s), {info.gpu_name} sm {info.compute_capability}, TensorRT {info.tensorrt_version}, "
        f"built in {time.monotonic() - started:.0f} s; timing cache {cache_path}{'' if saved else ' (not saved)'}"
    )
    return bundle.path / name


def read_timing_cache(path: Path, log=print) -> bytes:
    """The timing cache at `path`, or b"" (a fresh one) when there is none or it cannot be read: a cache only speeds
    the build up, so a failure is one warning line, never the end of the build."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        log(f"warning: timing cache {path}: not read ({_reason(exc, path)}), starting a new one")
        return b""


def save_timing_cache(path: Path, data: bytes, log=print) -> bool:
    """Write the timing cache to `path`; False, after one warning line, when it cannot be written."""
    # Written aside and renamed: two builds on one station must not leave a half-written cache behind.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as exc:
        log(
            f"warning: timing cache {path}: not saved ({_reason(exc, path, partial)}); the plan is stored, the next "
            "build starts without it"
        )
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    return True


def _reason(exc: OSError, *known: Path) -> str:
    """The OS's reason, with the file it concerns unless that is one of `known` (a parent that is a file)."""
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename and Path(exc.filename) not in known else reason


def _build_with_tensorrt(
    bundle: Bundle,
    precision: str,
    max_batch: int,
    opt_batch: int,
    streams: int,
    workspace_mb: int,
    timing_cache: str | Path | None,
    calibration_data: str | Path | None,
    device: int,
    log,
) -> tuple[bytes, PlanInfo, Path, bytes]:
    """Everything that needs TensorRT and a GPU: (the plan, its sidecar, the timing cache's path, the timing cache to
    save there). The plan has been deserialized once; nothing is written."""
    trt = import_tensorrt()
    version = trt.__version__
    strongly_typed, graph_variant = precision_recipe(version, precision)
    cuda_buffers.import_cudart()
    gpu_name, capability = cuda_buffers.select_device(device)
    params = bundle.scorer_params()
    ceilings = scorer_row_ceilings(bundle.recipe)
    input_shape = bundle.input_shape
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(gpu_name, version)
    batches = (
        calibration_frames(
            calibration_data, input_shape, bundle.resize_policy, opt_batch, bundle.bit_depth, bundle.each_axis
        )
        if precision == "int8"
        else None
    )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="inspectd-trt-") as tmp:
        graph, region = prepare_graph(bundle, graph_variant, Path(tmp) / GRAPH)
        if not parser.parse_from_file(str(graph)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise EngineError(f"{bundle.graph_path}: TensorRT's ONNX parser refused it ({errors})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 keeps 10 mantissa bits in matrix products: the scorer's float32 would silently not be float32.
        config.clear_flag(trt.BuilderFlag.TF32)
    for _ in range(streams):
        profile = builder.create_optimization_profile()
        _set_profile_shapes(network, profile, input_shape, 1, opt_batch, max_batch, params, ceilings)
        if config.add_optimization_profile(profile) < 0:
            raise EngineError("TensorRT add_optimization_profile refused the batch profile (see the log above)")

    calibrator = None
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pinned = _pin_outside_region_to_fp32(trt, network, region)
        calibration_profile = builder.create_optimization_profile()
        _set_profile_shapes(
            network, calibration_profile, input_shape, opt_batch, opt_batch, opt_batch, params, ceilings
        )
        config.set_calibration_profile(calibration_profile)
        calibrator = make_calibrator(trt, batches, params)
        config.int8_calibrator = calibrator
        log(
            f"int8: calibrating on {batches.shape[0] * batches.shape[1]} frames from {calibration_data}; "
            f"{pinned} layers outside the backbone kept in float32"
        )

    cache = config.create_timing_cache(read_timing_cache(cache_path, log))
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"timing cache {cache_path}: does not fit this GPU/TensorRT, starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.close()
    if serialized is None:
        raise EngineError(f"{bundle.path}: TensorRT failed to build the {precision} plan (see the log above)")
    plan = bytes(serialized)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None or engine.num_optimization_profiles != streams:
        raise EngineError(f"{bundle.path}: the plan TensorRT just built does not deserialize with {streams} profiles")
    info = PlanInfo(
        tensorrt_version=version,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=precision,
        max_batch=max_batch,
        opt_batch=opt_batch,
        graph_sha256=bundle.manifest["files"][bundle.manifest["graph"]],
        profiles=streams,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        workspace_mb=workspace_mb,
    )
    return plan, info, cache_path, bytes(config.get_timing_cache().serialize())


def store_onnxruntime_fp16(bundle_path: str | Path, log=print) -> Path:
    """Write the FP16 variant of the bundle's model.onnx for the onnxruntime backend (`precision: fp16`, on ONNX
    Runtime's CUDA provider) into the bundle, listed in the manifest; needs onnx, not TensorRT. Returns its path."""
    onnx = import_onnx()
    from engines.model.half_precision import to_fp16_variant

    bundle = load_bundle(bundle_path)
    variant = to_fp16_variant(onnx.load(str(bundle.graph_path)), PIXELS, bundle.scorer_inputs)
    name = fp16_graph_name(bundle.manifest["files"][bundle.manifest["graph"]])
    data = variant.SerializeToString()
    bundle.replace_file(name, data, add=True)
    log(f"{bundle.path / name}: {len(data) / 1e6:.1f} MB, FP16 graph for the onnxruntime backend (precision: fp16)")
    return bundle.path / name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (its model.onnx is built; the plan is stored in it)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="backbone in float16, scorer in float32")
    precision.add_argument("--int8", action="store_true", help="INT8 with entropy calibration (TensorRT 10 only)")
    parser.add_argument(
        "--calibration-data",
        metavar="DIR",
        default=None,
        help=f"defect-free images for --int8 (at most {MAX_CALIBRATION_FRAMES} used)",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch the plan accepts (default 8)")
    parser.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default: max batch)")
    parser.add_argument(
        "--streams",
        type=int,
        default=1,
        help=f"optimisation profiles in the plan, 1..{MAX_PROFILES} (default 1: inspectd runs one batch at a time, on "
        "the first; more only lengthen the build)",
    )
    parser.add_argument(
        "--workspace-mb",
        type=int,
        default=DEFAULT_WORKSPACE_MB,
        help=f"TensorRT workspace limit in MiB (default {DEFAULT_WORKSPACE_MB})",
    )
    parser.add_argument(
        "--timing-cache",
        metavar="PATH",
        default=None,
        help="timing cache to load and save (default ~/.cache/inspectd/trt-timing-<gpu>-trt<v>.cache)",
    )
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument(
        "--onnxruntime",
        action="store_true",
        help="with --fp16: write the FP16 ONNX graph for the onnxruntime backend instead of a TensorRT plan "
        "(no TensorRT needed)",
    )


def run(args: argparse.Namespace) -> int:
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    try:
        if args.onnxruntime:
            if precision != "fp16":
                raise EngineError(
                    "--onnxruntime: expected with --fp16 (the onnxruntime backend runs model.onnx as FP32)"
                )
            store_onnxruntime_fp16(args.bundle)
            return 0
        build_plan(
            args.bundle,
            precision,
            args.max_batch,
            args.opt_batch,
            args.streams,
            args.workspace_mb,
            args.timing_cache,
            args.calibration_data,
            args.device,
        )
    except EngineError as exc:
        print(f"inspectd build-engine: {exc}", file=sys.stderr)
        return 2
    return 0
