"""Engine files derived from a bundle's model.onnx for a GPU station: TensorRT plans (their names, their JSON
sidecars, and whether this station may load one) and the FP16 graph for ONNX Runtime's CUDA provider (its name).

A serialized TensorRT engine only loads on the TensorRT version that built it and is tuned for one GPU model, so each
plan `engines/<gpu-slug>-trt<version>-b<max batch>[-fp16|-int8].plan` has a sidecar `<same name>.json` saying what it
was built with and from which model.onnx. Both are listed with their SHA-256 in the bundle manifest. Everything here is
pure Python: no TensorRT or CUDA import, so the refusal logic is testable on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from engines.errors import BundleError, EngineError

PLAN_DIR = "engines"
SIDECAR_FORMAT = "inspectd-trt-plan"
PRECISIONS = ("fp32", "fp16", "int8")
# Optimisation profiles a plan may hold (`inspectd build-engine --streams`).
MAX_PROFILES = 8
# TensorRT is not in the gpu extras on purpose: its wheel must match the station's CUDA major and a plan loads only on
# the exact version that built it, so the station pins it, not a `pip install -U`.
INSTALL_HINT = (
    "pip install 'inspectd[gpu-cu12]' or 'inspectd[gpu-cu13]' (cuda-bindings and onnx for the driver's CUDA major) "
    "plus TensorRT 10 or 11 for the same CUDA (e.g. pip install tensorrt-cu12==10.*): docs/GPU.md"
)


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """What a plan's sidecar records."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str  # one of PRECISIONS
    max_batch: int
    opt_batch: int
    graph_sha256: str  # checksum of the model.onnx it was built from (the bundle manifest's)
    profiles: int = 1  # optimisation profiles, 1..MAX_PROFILES (the runtime's one context uses profile 0)
    created: str = ""
    workspace_mb: int = 0

    def to_json(self) -> str:
        return json.dumps({"format": SIDECAR_FORMAT, **dataclasses.asdict(self)}, indent=2, sort_keys=True) + "\n"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def plan_name(gpu_name: str, tensorrt_version: str, max_batch: int, precision: str) -> str:
    """The plan's path inside the bundle (relative, '/'-separated as the manifest lists it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    suffix = "" if precision == "fp32" else f"-{precision}"
    return f"{PLAN_DIR}/{slug(gpu_name)}-trt{tensorrt_version}-b{max_batch}{suffix}.plan"


def fp16_graph_name(graph_sha256: str) -> str:
    """Where the FP16 variant of the model.onnx with checksum `graph_sha256` is stored in the bundle. The checksum in
    the name ties the variant to its source: after a re-export the old variant is simply not found."""
    return f"{PLAN_DIR}/model-fp16-{graph_sha256[:16]}.onnx"


def sidecar_name(plan: str) -> str:
    return plan[: -len(".plan")] + ".json" if plan.endswith(".plan") else plan + ".json"


def parse_sidecar(text: str, where: str) -> PlanInfo:
    """Validate a sidecar document; errors name the file and the key."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != SIDECAR_FORMAT:
        raise BundleError(
            f"{where}: format {raw.get('format') if isinstance(raw, dict) else None!r}, expected {SIDECAR_FORMAT!r}"
        )
    values: dict[str, Any] = {}
    for field in dataclasses.fields(PlanInfo):
        kind = int if field.type in (int, "int") else str
        if field.name not in raw:
            if field.default is dataclasses.MISSING:
                raise BundleError(f"{where}: key {field.name!r} missing")
            continue
        value = raw[field.name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{where}: {field.name}: expected {kind.__name__}, got {value!r}")
        values[field.name] = value
    info = PlanInfo(**values)
    if info.precision not in PRECISIONS:
        raise BundleError(f"{where}: precision {info.precision!r}, expected one of {', '.join(PRECISIONS)}")
    if not 1 <= info.opt_batch <= info.max_batch:
        raise BundleError(f"{where}: opt_batch {info.opt_batch}, expected 1..max_batch ({info.max_batch})")
    if not 1 <= info.profiles <= MAX_PROFILES:
        raise BundleError(f"{where}: profiles {info.profiles}, expected 1..{MAX_PROFILES}")
    return info


def read_sidecar(path: str | Path) -> PlanInfo:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the plan's sidecar ({exc.strerror or exc})") from exc
    return parse_sidecar(text, str(path))


def build_command(bundle_path: str | Path, max_batch: int, precision: str) -> str:
    """The `inspectd build-engine` line that builds a plan of `precision` ("" or fp32: the default) for the bundle."""
    flags = {"": "", "fp32": "", "fp16": " --fp16", "int8": " --int8 --calibration-data DIR"}[precision]
    return f"inspectd build-engine {bundle_path} --max-batch {max_batch}{flags}"


def rebuild_command(bundle_path: str | Path, info: PlanInfo, max_batch: int | None = None) -> str:
    """The line that builds `info`'s plan again, at its precision (another precision would be refused, or silently
    change what the station runs)."""
    return build_command(bundle_path, max_batch or info.max_batch, info.precision)


def check_compatible(
    info: PlanInfo,
    plan: str | Path,
    bundle_path: str | Path,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    graph_sha256: str,
    max_batch: int,
) -> None:
    """Refuse (BundleError, one line ending in the exact rebuild command) a plan this station must not load."""
    problems = []
    if info.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {info.tensorrt_version} (this station: {tensorrt_version})")
    if info.gpu_name != gpu_name or info.compute_capability != compute_capability:
        problems.append(
            f"GPU {info.gpu_name!r} sm {info.compute_capability} (this station: {gpu_name!r} sm {compute_capability})"
        )
    if info.graph_sha256 != graph_sha256:
        problems.append(f"model.onnx {info.graph_sha256[:12]}... (the bundle's is now {graph_sha256[:12]}...)")
    if info.max_batch < max_batch:
        problems.append(f"max batch {info.max_batch} (engine needs {max_batch})")
    if problems:
        command = rebuild_command(bundle_path, info, max(max_batch, info.max_batch))
        raise BundleError(f"{plan}: built for {', '.join(problems)}: rebuild with `{command}`")


def listed_plans(manifest: dict) -> list[str]:
    """Plan files the manifest lists (and so checksums), in name order."""
    return sorted(
        name for name in manifest.get("files", {}) if name.startswith(f"{PLAN_DIR}/") and name.endswith(".plan")
    )


def pick_plan(
    bundle, *, tensorrt_version: str, gpu_name: str, compute_capability: str, max_batch: int, precision: str = ""
) -> tuple[Path, PlanInfo]:
    """The bundle's plan this station should load: compatible, of `precision` if given, the smallest max batch that
    covers `max_batch`, the newest among equals. Refuses with the reason of the closest miss and the rebuild command."""
    graph_sha = bundle.manifest["files"][bundle.manifest["graph"]]
    station = dict(
        tensorrt_version=tensorrt_version,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        graph_sha256=graph_sha,
        max_batch=max_batch,
    )
    names = listed_plans(bundle.manifest)
    candidates, refusal = [], None
    for name in names:
        side = sidecar_name(name)
        if side not in bundle.manifest["files"]:
            refusal = refusal or BundleError(
                f"{bundle.path / name}: sidecar {side} not listed in the manifest, expected every plan to have one"
            )
            continue
        info = read_sidecar(bundle.path / side)
        if precision and info.precision != precision:
            continue
        try:
            check_compatible(info, bundle.path / name, bundle.path, **station)
        except BundleError as exc:
            refusal = refusal or exc
            continue
        candidates.append((info.max_batch, _negated(info.created), name, info))
    if candidates:
        _, _, name, info = min(candidates)
        return bundle.path / name, info
    if refusal is not None:
        raise refusal
    wanted = f" {precision}" if precision else ""
    raise BundleError(
        f"{bundle.path}: no{wanted} TensorRT plan in the bundle: build one with "
        f"`{build_command(bundle.path, max_batch, precision)}`"
    )


def _negated(created: str) -> tuple[int, ...]:
    """Sort key that puts the newest ISO timestamp first under min()."""
    return tuple(-ord(c) for c in created)


def import_tensorrt():
    """The tensorrt module, or EngineError saying what is missing and how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(f"TensorRT Python package 'tensorrt' is not installed ({exc}): {INSTALL_HINT}") from exc
    return tensorrt


def tensorrt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError as exc:
        raise EngineError(f"TensorRT version {version!r}: expected MAJOR.MINOR...") from exc
