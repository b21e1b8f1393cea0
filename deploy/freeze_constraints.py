"""Write constraints.txt: the exact versions, installed in this environment, of everything pyproject.toml's
dependencies and the given extras pull in (transitively), so `pip install -c constraints.txt` reproduces it.

    make constraints                      what the Makefile runs: the train, test and plc extras of .venv
    python deploy/freeze_constraints.py --extras train,test,plc [NAME ...] > constraints.txt

NAMEs are further distributions to pin with their dependencies although pyproject.toml does not list them yet. Only
what is installed here is pinned; a requirement that is not installed (the gpu extra's cuda-python on a machine
without it) is named on stderr and left unpinned. `--keep FILE` (the Makefile passes the current constraints.txt)
carries over FILE's pins of distributions not installed here at all, such as onnxruntime-gpu, which a GPU station
installs in place of onnxruntime: a file regenerated on a CPU machine keeps the version the GPU stations use (a
kept pin is never dropped: delete its line when the dependency goes, and move it on a machine that has it). The
header records the Python the pins need: the highest Requires-Python floor among them, which the Makefile and
deploy/install.sh check before installing.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found]  # only where the venv is older than 3.11

REPO = Path(__file__).resolve().parents[1]
PYTHONS = [f"3.{minor}" for minor in range(8, 20)]


def roots(pyproject: Path, extras: list[str], names: list[str]) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"freeze_constraints: extra {unknown[0]!r} not in {pyproject}, expected {', '.join(optional)}")
    found = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in extras:
        found += [Requirement(r) for r in optional[extra]]
    return found + [Requirement(n) for n in names]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras or {""})


def closure(start: list[Requirement]) -> tuple[dict[str, md.Distribution], list[str]]:
    """name -> installed distribution for every requirement reachable from `start`, and the ones not installed."""
    pinned: dict[str, md.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    todo = [(req, {""}) for req in start]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(str(req))
            continue
        pinned[name] = dist
        wanted = {""} | set(req.extras)
        todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return pinned, missing


def python_floor(pinned: dict[str, md.Distribution]) -> tuple[str, list[str]]:
    """The lowest 3.x every pin's Requires-Python admits, and the pins that rule out the one before it."""
    specs = {name: SpecifierSet((d.metadata.get_all("Requires-Python") or [""])[0]) for name, d in pinned.items()}
    floor = next(v for v in PYTHONS if all(s.contains(f"{v}.0") for s in specs.values()))
    before = PYTHONS[PYTHONS.index(floor) - 1]
    return floor, sorted(name for name, s in specs.items() if not s.contains(f"{before}.0"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="train,test,plc", help="comma-separated extras (default train,test,plc)")
    parser.add_argument(
        "--keep", type=Path, default=None, help="an earlier constraints file whose pins of what is not installed stay"
    )
    parser.add_argument("names", nargs="*", help="further distributions to pin, with their dependencies")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    pinned, missing = closure(roots(REPO / "pyproject.toml", extras, args.names))
    pinned.pop("inspectd", None)
    kept = kept_pins(args.keep, pinned) if args.keep is not None else {}
    for req in sorted(set(missing)):
        if canonicalize_name(Requirement(req).name) not in kept:
            print(f"freeze_constraints: {req}: not installed here, left unpinned", file=sys.stderr)
    for name, version in sorted(kept.items()):
        print(f"freeze_constraints: {name}=={version}: not installed here, kept from {args.keep}", file=sys.stderr)
    floor, limiting = python_floor(pinned)
    here = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    print("# Generated by `make constraints` (deploy/freeze_constraints.py) from the environment the tests passed in;")
    print("# regenerate after changing a dependency in pyproject.toml rather than editing by hand.")
    print(f"# extras: {','.join(extras)}{' + ' + ' '.join(args.names) if args.names else ''}")
    print(f"# resolved on: Python {here}, {platform.system()} {platform.machine()}")
    print(f"# requires-python: >={floor}" + (f" ({', '.join(limiting)} need it)" if limiting else ""))
    versions = {name: dist.version for name, dist in pinned.items()} | kept
    for name in sorted(versions):
        print(f"{name}=={versions[name]}")
    return 0


def kept_pins(path: Path, pinned: dict[str, md.Distribution]) -> dict[str, str]:
    """name -> version of the pins in constraints file `path` for distributions not installed here (one installed
    but no longer required is dropped, as it would be without the file); {} when there is no such file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    kept: dict[str, str] = {}
    for line in lines:
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if not sep:
            continue
        name = canonicalize_name(name)
        if name in pinned:
            continue
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            kept[name] = version.strip()
    return kept


if __name__ == "__main__":
    sys.exit(main())
