"""Model bundles on disk: writing them, and loading them only after every file's checksum is verified.

A bundle is a directory (docs/ARCHITECTURE.md): manifest.json, model.onnx, scorer.npz, weights.npz, thresholds.json.
The manifest lists every other file with its SHA-256; loading refuses anything missing, tampered, of an unknown format
version, or outside the directory. Arrays are read with allow_pickle=False: nothing is ever unpickled. This module
needs neither torch nor onnx, so a runtime-only station can load bundles.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import (
    BIT_DEPTH_RANGE,
    FORMAT,
    FORMAT_VERSION,
    GRAPH,
    LEGACY_BIT_DEPTH,
    MANIFEST,
    REQUIRED_FILES,
    REQUIRED_KEYS,
    RESIZE_POLICIES,
    SCORER,
    THRESHOLDS,
    WEIGHTS,
    recipe_of,
    valid_bit_depth,
)
from engines.durable import exchange, fsync_dir, replace_dir, replace_file, sha256_file, write_file
from engines.errors import BundleError

# Readable by a daemon running as another user, as the bundle directory is (write_bundle).
FILE_MODE = 0o644
# manifest["replacing"]: {file: sha256} of a rewrite in progress (Bundle.replace_file); the file may hold either.
PENDING = "replacing"


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz np.load reads, written byte-for-byte reproducibly (fixed zip timestamps, so the same arrays give the
    same checksums and model_id) and refusing object arrays (allow_pickle=False)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(
                zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True
            ) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)
    return buffer.getvalue()


def write_bundle(
    path: str | Path,
    manifest_fields: dict[str, Any],
    graph: bytes | str | Path,
    scorer_params: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    thresholds: thresholds_doc.Thresholds,
) -> Path:
    """Write a complete bundle at `path`, replacing any bundle already there only once the new one is whole.

    `manifest_fields` must hold at least method, backbone, input {height, width, channels, resize} and scorer_inputs;
    format, model_id (method-backbone-shorthash over the files), graph, created and files are filled in here.
    """
    path = Path(path)
    for key in ("method", "backbone", "input", "scorer_inputs"):
        if key not in manifest_fields:
            raise BundleError(f"write_bundle: manifest field {key!r} missing")
    missing = [name for name in manifest_fields["scorer_inputs"] if name not in scorer_params]
    if missing:
        raise BundleError(f"write_bundle: scorer params lack {', '.join(missing)} named in scorer_inputs")
    graph_bytes = graph if isinstance(graph, (bytes, bytearray)) else Path(graph).read_bytes()
    contents = {
        GRAPH: bytes(graph_bytes),
        SCORER: _npz_bytes(scorer_params),
        WEIGHTS: _npz_bytes(weights),
        THRESHOLDS: thresholds_doc.dumps(thresholds),
    }
    files = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": _model_id(manifest_fields, files[WEIGHTS], files[SCORER]),
        "graph": GRAPH,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{k: v for k, v in manifest_fields.items() if k not in ("format", "format_version", "files")},
        "files": files,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise BundleError(f"{path}: not written ({exc.strerror or exc}); it holds what it held before") from exc
    try:
        try:
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from a daemon running as another user
            # Every file and the staging directory durable before the bundle takes the name: a power cut after the
            # switch must not leave `path` naming a directory of empty files.
            for name, data in contents.items():
                write_file(staging / name, data, FILE_MODE)
            write_file(staging / MANIFEST, _manifest_bytes(manifest), FILE_MODE)
            fsync_dir(staging)
        except OSError as exc:  # a full disk, a quota: reported in one line by train and teach
            raise BundleError(
                f"{path}: not written ({exc.strerror or exc} writing its new copy in {path.parent}); it holds what "
                "it held before"
            ) from exc
        if path.exists() or path.is_symlink():
            # Errors here are BundleErrors naming `path`: train and teach report those in one line.
            try:
                swapped = exchange(staging, path)  # one step: a reader of `path` finds the old bundle or the new one
            except OSError as exc:  # nothing moved; EXDEV among them, which two renames could not cross either
                raise BundleError(f"{path}: not replaced ({exc.strerror}); it holds what it held before") from exc
            if swapped:
                _remove(staging)
            else:
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                try:
                    replace_dir(path, staging, old)
                except OSError as exc:
                    raise BundleError(str(exc)) from exc
                _remove(old)
        else:
            os.replace(staging, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove(staging)
        raise
    return path


def model_id_for(
    manifest_fields: dict[str, Any], scorer_params: dict[str, np.ndarray], weights: dict[str, np.ndarray]
) -> str:
    """The model_id write_bundle gives a bundle of these manifest fields, scorer parameters and weights, known before
    it is written: a thresholds document written with the bundle can name the model it was set for."""
    return _model_id(
        manifest_fields,
        hashlib.sha256(_npz_bytes(weights)).hexdigest(),
        hashlib.sha256(_npz_bytes(scorer_params)).hexdigest(),
    )


def _model_id(manifest_fields: dict[str, Any], weights_sha256: str, scorer_sha256: str) -> str:
    # The id names what decides the outputs: the graph's weights and the scorer (not thresholds, which calibrate), and
    # a declared bit depth, which decides the pixels a 16-bit frame is judged on (a bundle without one keeps its id).
    depth = manifest_fields["input"].get("bit_depth") if isinstance(manifest_fields["input"], dict) else None
    decided = weights_sha256 + scorer_sha256 + ("" if depth is None else f"bit_depth={depth}")
    short = hashlib.sha256(decided.encode()).hexdigest()[:8]
    return f"{manifest_fields['method']}-{manifest_fields['backbone']}-{short}"


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _safe_member(root: Path, name: Any) -> Path:
    """The path of manifest entry `name` inside `root`, refusing anything that could point elsewhere."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"{root}: manifest file entry {name!r}: expected a plain file name inside the bundle")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise BundleError(f"{root}/{name}: path escapes the bundle directory, expected a name inside it")
    member = root / name
    if member.is_symlink():
        raise BundleError(f"{member}: is a symlink, expected a regular file inside the bundle")
    if not member.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{member}: resolves outside the bundle directory, expected a file inside it")
    return member


class Bundle:
    """A verified bundle. Construct with `load_bundle`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._scorer_params: dict[str, np.ndarray] | None = None

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def backbone(self) -> str:
        return self.manifest["backbone"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.manifest["input"]
        return int(spec["height"]), int(spec["width"]), int(spec["channels"])

    @property
    def resize_policy(self) -> str:
        return self.manifest["input"].get("resize", "stretch")

    @property
    def declared_bit_depth(self) -> int | None:
        """The significant bits of 16-bit frames the bundle was trained with (from its 16-bit training images, or
        told): None for a bundle trained on 8-bit images, or written before depths were recorded."""
        depth = self.manifest["input"].get("bit_depth")
        return None if depth is None else int(depth)

    @property
    def bit_depth(self) -> int:
        """What 16-bit frames are narrowed with for this bundle (engines.data.images.narrow_to_uint8)."""
        return self.declared_bit_depth or LEGACY_BIT_DEPTH

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest["graph"]

    @property
    def scorer_inputs(self) -> tuple[str, ...]:
        return tuple(self.manifest["scorer_inputs"])

    @property
    def architecture(self) -> dict[str, Any]:
        """What engines.model.graph.build_graph needs to rebuild the torch graph."""
        # Not required at load: the ONNX Runtime and TensorRT backends run without it.
        if "architecture" not in self.manifest:
            raise BundleError(
                f"{self.path / MANIFEST}: key 'architecture' missing, needed by the torch backend and export"
            )
        return self.manifest["architecture"]

    @property
    def recipe(self) -> dict[str, Any]:
        """The recipe it was trained with (engines.model.recipes), as recorded or read back from an older manifest."""
        return recipe_of(self.manifest)

    @property
    def interrupted(self) -> bool:
        return bool(self.manifest.get("interrupted", False))

    def _arrays(self, name: str) -> dict[str, np.ndarray]:
        member = self.path / name
        try:
            with np.load(member, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except ValueError as exc:
            raise BundleError(f"{member}: holds pickled objects, expected plain numeric arrays") from exc
        except (OSError, EOFError) as exc:
            raise BundleError(f"{member}: cannot read as .npz ({exc})") from exc

    def scorer_params(self) -> dict[str, np.ndarray]:
        """Arrays named in scorer_inputs (a fresh dict each call; the arrays are shared, treat them as read-only)."""
        if self._scorer_params is None:
            params = self._arrays(SCORER)
            missing = [n for n in self.scorer_inputs if n not in params]
            if missing:
                raise BundleError(f"{self.path / SCORER}: lacks {', '.join(missing)}, expected every scorer input")
            self._scorer_params = {n: np.ascontiguousarray(params[n], dtype=np.float32) for n in self.scorer_inputs}
        return dict(self._scorer_params)

    def weights(self) -> dict[str, np.ndarray]:
        return self._arrays(WEIGHTS)

    def thresholds(self) -> thresholds_doc.Thresholds:
        try:
            return thresholds_doc.read(self.path / THRESHOLDS)
        except thresholds_doc.ThresholdsError as exc:
            raise BundleError(str(exc)) from exc

    def replace_file(self, name: str, data: bytes, add: bool = False) -> None:
        """Rewrite one listed file (e.g. thresholds.json after calibration) and its checksum; with `add=True` the
        file may be new and is listed (a TensorRT plan under engines/ from inspectd build-engine).

        Only into the bundle this object was loaded from: when the manifest on disk is no longer that one (teach
        replaced the directory or switched the link, someone rebuilt it) the write is refused, since the old
        manifest written over a newer bundle would break it. Only over the content this object loaded, too (a
        compare-and-swap on the file's checksum): another process's thresholds of the same version written since
        would otherwise be replaced by a different document under that version number. The one exception is a file
        that already holds exactly `data` (calibrate writes a version, then the daemon it applies it to writes the
        same bytes).

        A kill or power cut at any point leaves a bundle that loads, with the file's old content or its new one: the
        manifest first names the new checksum as pending (PENDING), then the file is replaced, then the manifest
        lists it; load_bundle accepts either content while it is pending. When the last step fails, the old content
        is put back, so a write reported as failed is not the one the next load takes. Each file keeps its mode (a
        new one gets FILE_MODE)."""
        # One directory for every step, even if a link is switched meanwhile.
        root = self.path.resolve()
        member = _safe_member(root, name)
        if name not in self.manifest["files"] and not add:
            raise BundleError(
                f"{member}: not listed in the manifest, expected one of {', '.join(self.manifest['files'])}"
            )
        on_disk = _settled(root, _read_manifest(root / MANIFEST))
        if _without(on_disk, name) != _without(self.manifest, name):
            raise BundleError(
                f"{self.path}: changed on disk since it was loaded (now model {on_disk.get('model_id')!r} "
                f"bundle_version {on_disk.get('bundle_version', 1)}, loaded {self.model_id!r} bundle_version "
                f"{self.manifest.get('bundle_version', 1)}), expected the bundle loaded: {name} not written; "
                "load the bundle again (the daemon: reload) and retry"
            )
        digest = hashlib.sha256(data).hexdigest()
        loaded, now = self.manifest["files"].get(name), on_disk["files"].get(name)
        if now not in (loaded, digest):
            raise BundleError(
                f"{member}: changed on disk since it was loaded (now {_described(member, now)}, loaded "
                f"{_described(None, loaded)}), expected the content loaded: {name} not written; load the bundle "
                "again (the daemon: reload) and retry"
            )
        manifest_mode = _mode(root / MANIFEST, FILE_MODE)
        if not member.parent.is_dir():
            member.parent.mkdir(parents=True)
            fsync_dir(root)
        if name in on_disk["files"]:
            _replace(root / MANIFEST, _manifest_bytes({**on_disk, PENDING: {name: digest}}), manifest_mode)
        # A second name for the old content, to put it back by a rename (which needs no free space) should the
        # manifest not take the new checksum.
        old_name = _temporary(member, "old")
        aside: Path | None = old_name
        try:
            os.link(member, old_name)
        except OSError:  # none there yet (add=True), or links not allowed here: nothing to put back by a rename
            aside = None
        try:
            _replace(member, data, _mode(member, FILE_MODE))
            manifest = json.loads(json.dumps(on_disk))
            manifest["files"][name] = digest
            try:
                _replace(root / MANIFEST, _manifest_bytes(manifest), manifest_mode)
            except OSError as exc:
                raise _undo(member, aside, name in on_disk["files"], exc) from exc
        finally:
            if aside is not None:
                aside.unlink(missing_ok=True)
        self.manifest = manifest
        if name == SCORER:
            self._scorer_params = None

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model_id={self.model_id!r})"


def _replace(path: Path, data: bytes, mode: int) -> None:
    replace_file(path, data, mode, temporary=_temporary(path, "tmp"))


def _temporary(path: Path, kind: str) -> Path:
    # A name of its own per writer: a daemon and a calibrate writing the same bundle never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.{kind}")


def _undo(member: Path, aside: Path | None, listed: bool, exc: OSError) -> BundleError:
    """The error for a rewrite whose file was replaced but whose manifest could not list the new checksum, after
    putting the old content back: a pending checksum alone would make the next load take the new content."""
    reason = f"{exc.strerror or exc} writing {MANIFEST}"
    try:
        if aside is not None:
            os.replace(aside, member)
        elif not listed:
            member.unlink()  # a new file no manifest names: nothing loads it, and nothing is left behind
        else:
            raise OSError(f"no second name for the old content in {member.parent}")
        fsync_dir(member.parent)
    except OSError as undo:
        return BundleError(
            f"{member}: written, but {MANIFEST} could not list it ({reason}) and the old content could not be put "
            f"back ({undo.strerror or undo}): the next load of the bundle takes the new content"
        )
    return BundleError(f"{member}: not written ({reason}); it holds what it held before")


def _described(member: Path | None, digest: str | None) -> str:
    """A file's content in an error: its checksum, and for a thresholds document on disk its version."""
    if digest is None:
        return "not listed"
    if member is not None and member.name == THRESHOLDS:
        try:
            return f"version {thresholds_doc.read(member).version}, sha256 {digest[:12]}..."
        except thresholds_doc.ThresholdsError:
            pass
    return f"sha256 {digest[:12]}..."


def _mode(path: Path, default: int) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return default


def _without(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """`manifest` without file `name`'s checksum: what must not change while `name` is rewritten."""
    return {**manifest, "files": {k: v for k, v in manifest.get("files", {}).items() if k != name}}


def _read_manifest(manifest_path: Path) -> Any:
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{manifest_path}: missing, expected the bundle manifest") from exc
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc


def _pending(manifest: dict[str, Any]) -> dict[str, str]:
    pending = manifest.get(PENDING)
    if not isinstance(pending, dict):
        return {}
    return {k: v for k, v in pending.items() if isinstance(k, str) and isinstance(v, str)}


def _settled(root: Path, manifest: Any) -> dict[str, Any]:
    """`manifest` as load_bundle leaves it: a pending checksum whose file already holds the new content becomes the
    listed one, and the pending entry goes."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{root / MANIFEST}: files: expected a mapping of file name to sha256")
    settled = json.loads(json.dumps(manifest))
    for name, digest in _pending(settled).items():
        member = root / name
        if name in settled["files"] and member.is_file() and sha256_file(member) == digest:
            settled["files"][name] = digest
    settled.pop(PENDING, None)
    return settled


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify the bundle at `path`; BundleError (one line naming the file) if anything is off."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        if not path.exists() and not path.is_symlink():
            # Where a file system has no exchange, a write swaps bundles by two renames; cut off between them, the
            # bundle in service is left aside: a whole-bundle write's beside it, teach's (and teach --rollback's) as
            # the version it moved into BUNDLE.versions last.
            aside = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
            versions = path.with_name(path.name + ".versions")
            # Last by the change time a rename sets: neither N nor k of v<N>-<k> says which (a rollback takes a
            # version back out, and the next teach reuses the lowest free name); within one clock tick, the highest.
            numbered: list[tuple[tuple[int, int, int], Path]] = []
            for v in versions.glob("v*"):
                if m := re.fullmatch(r"v(\d+)(?:-(\d+))?", v.name):
                    try:
                        numbered.append(((v.stat().st_ctime_ns, int(m.group(1)), int(m.group(2) or 1)), v))
                    except OSError:
                        continue  # gone since the listing: not where the bundle is
            # A clock stepped back or versions copied since change the times: the highest number is then named too.
            other = ""
            if numbered:
                aside.append(max(numbered)[1])
                highest = max(numbered, key=lambda item: item[0][1:])[1]
                if aside[0] == aside[-1] != highest:
                    other = f"; if the versions' times were changed since (copied, clock set back), it is {highest}"
            if aside:
                raise BundleError(
                    f"{path}: missing; a bundle write was cut off and left the previous bundle at {aside[0]}, "
                    f"expected it back in place (mv {aside[0]} {path}){other}"
                )
        raise BundleError(f"{path}: not a directory, expected a model bundle (directory with {MANIFEST})")
    manifest = _read_manifest(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(
            f"{manifest_path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
            f", expected {FORMAT!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise BundleError(f"{manifest_path}: key {key!r} missing")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: files: expected a mapping of file name to sha256")
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{manifest_path}: files lacks {name!r}, expected every bundle file listed")
    if not isinstance(manifest["graph"], str):
        raise BundleError(f"{manifest_path}: graph {manifest['graph']!r}, expected a file name")
    inputs = manifest["scorer_inputs"]
    if not isinstance(inputs, list) or not all(isinstance(name, str) for name in inputs):
        raise BundleError(f"{manifest_path}: scorer_inputs {inputs!r}, expected a list of graph input names")
    if manifest["graph"] not in files:
        raise BundleError(f"{manifest_path}: graph {manifest['graph']!r} is not among the checksummed files")
    pending = _pending(manifest)
    for name, expected in files.items():
        member = _safe_member(path, name)
        if not member.is_file():
            raise BundleError(f"{member}: missing, expected a file with sha256 {str(expected)[:12]}...")
        actual = sha256_file(member)
        if actual == pending.get(name):  # a rewrite interrupted after the file's rename (Bundle.replace_file)
            files[name] = actual
        elif actual != expected:
            raise BundleError(
                f"{member}: sha256 {actual[:12]}... does not match the manifest's {str(expected)[:12]}..."
                " (file changed or corrupt)"
            )
    shape = manifest["input"]
    if not isinstance(shape, dict) or not all(
        isinstance(shape.get(k), int) and shape[k] > 0 for k in ("height", "width", "channels")
    ):
        raise BundleError(f"{manifest_path}: input: expected {{height, width, channels}} positive integers")
    if shape["channels"] not in (1, 3):
        raise BundleError(f"{manifest_path}: input.channels {shape['channels']}, expected 1 (grey) or 3 (RGB)")
    if "bit_depth" in shape and not valid_bit_depth(shape["bit_depth"]):
        raise BundleError(f"{manifest_path}: input.bit_depth {shape['bit_depth']!r}, expected {BIT_DEPTH_RANGE}")
    if shape.get("resize", "stretch") not in RESIZE_POLICIES:
        expected = ", ".join(RESIZE_POLICIES)
        raise BundleError(f"{manifest_path}: input.resize {shape['resize']!r}, expected one of {expected}")
    manifest.pop(PENDING, None)
    bundle = Bundle(path, manifest)
    bundle.scorer_params()  # refuses a pickled or incomplete scorer.npz now, not at the first frame
    return bundle
