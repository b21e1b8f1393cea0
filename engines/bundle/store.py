"""Model bundles on disk: writing them, and loading them only after every file's checksum is verified.

A bundle is a directory (docs/ARCHITECTURE.md): manifest.json, model.onnx, scorer.npz, weights.npz, thresholds.json.
The manifest lists every other file with its SHA-256; loading refuses anything missing, tampered, of an unknown format
version, or outside the directory. Arrays are read with allow_pickle=False: nothing is ever unpickled. This module
needs neither torch nor onnx, so a runtime-only station can load bundles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.format import (
    BIT_DEPTH_RANGE,
    DEFAULT_SIGMA,
    EACH_AXIS,
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
    aggregation_of,
    recipe_of,
    valid_bit_depth,
)
from engines.durable import exchange, fsync_dir, replace_dir, replace_file, sha256_file, try_lock, write_file
from engines.errors import BundleError, one_line

# Readable by a daemon running as another user, as the bundle directory is (write_bundle).
FILE_MODE = 0o644
# manifest["replacing"]: {file: sha256} of a rewrite in progress (Bundle.replace_file); the file may hold either.
PENDING = "replacing"
# numpy dtype kinds a scorer array may hold: float, signed and unsigned integer, bool (converted to float32).
REAL_KINDS = "fiub"


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
    """Write a complete bundle at `path`, replacing any bundle already there only once the new one is whole; anything
    else there but an empty folder, a bundle holding files of a user's among them, is refused (BundleError, nothing
    written: not_replaceable).

    `manifest_fields` must hold at least method, backbone, input {height, width, channels, resize} and scorer_inputs;
    format, model_id (method-backbone-shorthash over the files), graph, created and files are filled in here.
    """
    path = Path(path)
    if why := not_replaceable(path):
        raise BundleError(f"{path}: {why}; not written, it holds what it held before")
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
            with swapping(path):
                try:
                    swapped = exchange(staging, path)  # one step: a reader of `path` finds the old bundle or the new
                except OSError as exc:  # nothing moved; EXDEV among them, which two renames could not cross either
                    raise BundleError(f"{path}: not replaced ({exc.strerror}); it holds what it held before") from exc
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                if not swapped:
                    try:
                        replace_dir(path, staging, old)
                    except OSError as exc:
                        raise BundleError(str(exc)) from exc
            _remove(staging if swapped else old)
        else:
            os.replace(staging, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove(staging)
        raise
    return path


def not_replaceable(path: str | Path) -> str | None:
    """Why a bundle must not be written at `path`, None where it may: nothing there (a dangling link, of which only
    the link goes), an empty folder, or an inspectd bundle that holds only its own entries (replaced whole, as every
    retraining replaces it; foreign_entries). The swap write_bundle ends with deletes whatever `path` held, so a
    dataset, a folder of notes, a file given as the bundle's path by a slip, or a README put into a bundle would be
    lost."""
    path = Path(path)
    expected = "expected a new path, an empty folder or an inspectd bundle to replace"
    if path.is_symlink() and path.exists():
        # The swap would turn the link into a folder: the bundle it pointed to, and teach's versions beside it, would
        # be left behind with nothing naming them, and `current` would stop being a link a later switch can move.
        return (
            f"a symbolic link to {os.readlink(path)}, expected a folder of its own: write the new bundle into a new "
            "folder beside it and switch the link to that (docs/DEPLOY.md, Update a model)"
        )
    if not path.exists():
        for parent in path.parents:  # a file where a folder above the bundle should be
            if parent.exists():
                return None if parent.is_dir() else f"{parent} is a file, {expected} in a folder"
        return None
    if not path.is_dir():
        return f"a file, {expected}"
    foreign: list[str] = []
    try:
        held = sorted(p.name for p in path.iterdir())
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8")) if MANIFEST in held else None
        foreign = foreign_entries(path, manifest) if isinstance(manifest, dict) else []
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc}), {expected}"
    except ValueError:  # not JSON (or not UTF-8): no manifest this module wrote
        manifest = None
    if not held:
        return None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        if not foreign:
            return None
        entries = "entry" if len(foreign) == 1 else "entries"
        return (
            f"an inspectd bundle that also holds {len(foreign)} {entries} its manifest does not list "
            f"({_shown(foreign)}), expected only the bundle's own files: move them out first"
        )
    entries = "entry" if len(held) == 1 else "entries"
    return f"a folder of {len(held)} {entries} ({_shown(held)}) that is no inspectd bundle, {expected}"


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def foreign_entries(root: Path, manifest: dict[str, Any]) -> list[str]:
    """The entries of bundle directory `root` that are not the bundle's (relative, a folder's with a trailing /):
    what a user put there, a README or notes/. The bundle's are manifest.json, every file the manifest lists or has
    pending (PENDING), the folders those lie in (engines/, where build-engine's plans go) and the temporary files of
    writers killed mid-write (_LEFTOVER). Teach's versions live beside the bundle (BUNDLE.versions), not in it.
    OSError where a folder cannot be listed."""
    names = {MANIFEST}
    for key in ("files", PENDING):
        listed = manifest.get(key)
        if isinstance(listed, dict):
            names.update(name for name in listed if isinstance(name, str))
    folders = {parent.as_posix() for name in names for parent in PurePosixPath(name).parents if parent.parts}
    foreign: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            name = prefix + entry.name
            if name in names or _LEFTOVER.fullmatch(entry.name):
                continue
            if name in folders and entry.is_dir() and not entry.is_symlink():
                walk(entry, name + "/")
            else:
                foreign.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))

    walk(root, "")
    return foreign


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


class ScorerParams(dict[str, np.ndarray]):
    """A bundle's scorer arrays and the file they were read from, which an engine refusing them names
    (engines.runtime.base.check_scorer_params); a refit's plain dict has no file to name."""

    def __init__(self, arrays: dict[str, np.ndarray], source: Path) -> None:
        super().__init__(arrays)
        self.source = source


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
    def each_axis(self) -> bool:
        """Whether frames are resized axis by axis for this bundle (engines.bundle.format.EACH_AXIS)."""
        return self.manifest["input"].get("resample") == EACH_AXIS

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
            # numpy's words for an object array; a file neither zip nor .npy it calls "pickled data" too
            if "Object arrays" in str(exc):
                raise BundleError(f"{member}: holds pickled objects, expected plain numeric arrays") from exc
            raise BundleError(f"{member}: cannot read as .npz ({one_line(exc)})") from exc
        except (AttributeError, TypeError) as exc:  # a single .npy under the .npz name: np.load gives an ndarray
            raise BundleError(f"{member}: not an .npz archive ({exc}), expected named arrays") from exc
        except Exception as exc:  # a damaged member: zipfile's, numpy's header parser (tokenize, SyntaxError), ...
            raise BundleError(f"{member}: cannot read as .npz ({one_line(exc)})") from exc

    def scorer_params(self) -> dict[str, np.ndarray]:
        """Arrays named in scorer_inputs (a fresh dict each call; the arrays are shared, treat them as read-only)."""
        if self._scorer_params is None:
            params = self._arrays(SCORER)
            missing = [n for n in self.scorer_inputs if n not in params]
            if missing:
                raise BundleError(f"{self.path / SCORER}: lacks {', '.join(missing)}, expected every scorer input")
            for n in self.scorer_inputs:
                # Text would fail in numpy's words naming no file; complex would lose its imaginary part silently.
                if params[n].dtype.kind not in REAL_KINDS:
                    raise BundleError(f"{self.path / SCORER}: {n} has dtype {params[n].dtype}, expected real numbers")
            self._scorer_params = {n: np.ascontiguousarray(params[n], dtype=np.float32) for n in self.scorer_inputs}
        return ScorerParams(self._scorer_params, self.path / SCORER)

    def weights(self) -> dict[str, np.ndarray]:
        return self._arrays(WEIGHTS)

    def thresholds(self) -> thresholds_doc.Thresholds:
        try:
            return thresholds_doc.read(self.path / THRESHOLDS)
        except thresholds_doc.ThresholdsError as exc:
            raise BundleError(str(exc)) from exc

    def replace_file(self, name: str, data: bytes, add: bool = False, wait_s: float | None = None) -> None:
        """Rewrite one listed file (e.g. thresholds.json after calibration) and its checksum; with `add=True` the
        file may be new and is listed (a TensorRT plan under engines/ from inspectd build-engine).

        Only into the bundle this object was loaded from: when the manifest on disk is no longer that one (teach
        replaced the directory or switched the link, someone rebuilt it) the write is refused, since the old
        manifest written over a newer bundle would break it. Only over the content this object loaded, too (a
        compare-and-swap on the file's checksum), so a version number never names two documents: another process's
        thresholds of the same version written since would otherwise be replaced by a different document under
        that number. Exceptions: a file that already holds exactly `data` (calibrate writes a version, then the
        daemon it applies it to writes the same bytes), and a thresholds document of a higher version than the one
        on disk whose history, where it names the version on disk, holds that document (calibrate without --apply
        wrote a version, then calibrate --apply computes the next from it and the daemon, which loaded the one
        before, writes that). The whole compare-and-swap holds an exclusive lock on the bundle directory (flock), so
        a daemon and a calibrate never both pass the check and interleave their writes; a writer waits for another's
        write up to `wait_s` (default LOCK_WAIT_S), then BundleError, nothing written.

        A kill or power cut at any point leaves a bundle that loads, with the file's old content or its new one: the
        manifest first names the new checksum as pending (PENDING), then the file is replaced, then the manifest
        lists it; load_bundle accepts either content while it is pending. A step that fails is reported as what the
        disk then holds: before the manifest lists the new checksum the old content is put back and the error says
        not written; after it (only a sync failed) NotDurable says written. Each file keeps its mode (a new one gets
        FILE_MODE). Temporary files of writers that were killed are removed here."""
        # One directory for every step, even if a link is switched meanwhile.
        root = self.path.resolve()
        member = _safe_member(root, name)
        if name not in self.manifest["files"] and not add:
            raise BundleError(
                f"{member}: not listed in the manifest, expected one of {', '.join(self.manifest['files'])}"
            )
        digest = hashlib.sha256(data).hexdigest()
        with _locked(root, name, wait_s) as locked:
            if locked:
                _sweep({root, member.parent})
            raw = _read_manifest(root / MANIFEST)
            on_disk = _settled(root, raw)
            if _without(on_disk, name) != _without(self.manifest, name):
                raise _changed(
                    self.path,
                    on_disk,
                    self.manifest,
                    f"{name} not written; load the bundle again (the daemon: reload) and retry",
                )
            loaded, now = self.manifest["files"].get(name), on_disk["files"].get(name)
            if now not in (loaded, digest) and not (name == THRESHOLDS and _supersedes(member, now, data)):
                later = ", or a later version whose history holds the one there" if name == THRESHOLDS else ""
                raise BundleError(
                    f"{member}: changed on disk since it was loaded (now {_described(member, now)}, loaded "
                    f"{_described(None, loaded)}), expected the content loaded{later}: {name} not written; load the "
                    "bundle again (the daemon: reload) and retry"
                )
            if raw["files"].get(name) == digest and PENDING not in raw:
                manifest = on_disk  # already there, listed and durable: nothing to write
            else:
                manifest = self._write(root, member, name, data, digest, on_disk)
        self.manifest = manifest
        if name == SCORER:
            self._scorer_params = None

    def _write(
        self, root: Path, member: Path, name: str, data: bytes, digest: str, on_disk: dict[str, Any]
    ) -> dict[str, Any]:
        """replace_file's steps, under its lock; the manifest that lists `data`."""
        manifest = json.loads(json.dumps(on_disk))
        manifest["files"][name] = digest
        step = f"creating {member.parent}"
        aside: Path | None = None
        try:
            manifest_mode = _mode(root / MANIFEST, FILE_MODE)
            if not member.parent.is_dir():
                member.parent.mkdir(parents=True)
                fsync_dir(root)
            step = f"writing {MANIFEST}"
            if name in on_disk["files"]:
                _replace(root / MANIFEST, _manifest_bytes({**on_disk, PENDING: {name: digest}}), manifest_mode)
            # A second name for the old content, to put it back by a rename (which needs no free space) should the
            # manifest not take the new checksum.
            aside = _temporary(member, "old")
            try:
                os.link(member, aside)
            except OSError:  # none there yet (add=True), or links not allowed here: nothing to put back by a rename
                aside = None
            step = f"writing {name}"
            _replace(member, data, _mode(member, FILE_MODE))
            step = f"writing {MANIFEST}"
            _replace(root / MANIFEST, _manifest_bytes(manifest), manifest_mode)
        except OSError as exc:
            error = _failed(root, member, name, digest, aside, f"{exc.strerror or exc} {step}")
            if isinstance(error, NotDurable):
                self.manifest = manifest
                if name == SCORER:
                    self._scorer_params = None
            raise error from exc
        finally:
            if aside is not None:
                aside.unlink(missing_ok=True)
        return manifest

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model_id={self.model_id!r})"


def _replace(path: Path, data: bytes, mode: int) -> None:
    replace_file(path, data, mode, temporary=_temporary(path, "tmp"))


def _temporary(path: Path, kind: str) -> Path:
    # A name of its own per writer: a daemon and a calibrate writing the same bundle never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.{kind}")


class ChangedOnDisk(BundleError):
    """The bundle's manifest on disk is no longer the one its writer loaded: nothing was written or switched."""


def _changed(path: Path, on_disk: dict[str, Any], loaded: dict[str, Any], outcome: str) -> ChangedOnDisk:
    now, files = on_disk.get("files", {}), loaded.get("files", {})
    # The same model and version with a file rewritten (thresholds a calibrate wrote): which, or it reads as no change.
    rewritten = sorted(name for name in {*now, *files} if now.get(name) != files.get(name))
    same = (on_disk.get("model_id"), on_disk.get("bundle_version")) == (
        loaded.get("model_id"),
        loaded.get("bundle_version"),
    )
    also = f" with {', '.join(rewritten)} rewritten" if same and rewritten else ""
    return ChangedOnDisk(
        f"{path}: changed on disk since it was loaded (now model {on_disk.get('model_id')!r} bundle_version "
        f"{on_disk.get('bundle_version', 1)}{also}, loaded {loaded.get('model_id')!r} bundle_version "
        f"{loaded.get('bundle_version', 1)}), expected the bundle loaded: {outcome}"
    )


def check_unchanged(path: Path, loaded: dict[str, Any], outcome: str) -> None:
    """ChangedOnDisk naming `outcome` when the manifest of the bundle directory `path` is no longer `loaded` (a
    Bundle's manifest), its files' checksums included: a thresholds write since counts. Call it holding the lock
    (swapping) the writers of `path` take, so no write lands between the check and what it guards."""
    on_disk = _settled(path, _read_manifest(path / MANIFEST))
    if on_disk != loaded:
        raise _changed(path, on_disk, loaded, outcome)


class NotDurable(BundleError):
    """Bundle.replace_file wrote the file and the manifest lists it; only a sync after that failed, so a power cut
    before the system writes its caches out may still bring back the old content. The object holds the new one."""


# How long a writer waits for another's write into the same bundle (a TensorRT plan of hundreds of MB on a slow disk
# takes seconds) before it gives up.
LOCK_WAIT_S = 30.0
# Temporary names of Bundle.replace_file (_temporary), and of the code before it (no kind): .NAME.PID-HEX[.old|.tmp]
_LEFTOVER = re.compile(r"\..+\.(\d+)-[0-9a-f]{8}(?:\.old|\.tmp)?")


@contextlib.contextmanager
def _locked(root: Path, name: str, wait_s: float | None = None) -> Iterator[bool]:
    """Hold an exclusive flock on directory `root` (its own descriptor: a lock file would be one more file in the
    bundle), waiting up to `wait_s` (default LOCK_WAIT_S) for another writer's, and on the directory `root` names once
    the lock is held: a swap (teach in place, train over the bundle) that took its turn first has put another there.
    Yields False, unlocked, on a file system without locks (as before locks were taken there)."""
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise BundleError(
                f"{root}: cannot be opened to lock it ({exc.strerror or exc}), expected a bundle directory this user "
                f"may read and write: {name} not written"
            ) from exc
        try:
            locked = _lock(fd, root, name, deadline, wait_s)
            if locked:
                try:
                    held, now = os.fstat(fd), os.stat(root)
                except OSError as exc:
                    raise BundleError(
                        f"{root}: gone while this writer waited for its lock ({exc.strerror or exc}), expected the "
                        f"bundle directory: {name} not written"
                    ) from exc
                if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
                    continue  # swapped while this writer waited: lock the one there now (closed below)
            yield locked
            return
        finally:
            os.close(fd)  # releases the lock


def _lock(fd: int, root: Path, name: str, deadline: float, wait_s: float) -> bool:
    while (locked := try_lock(fd)) is False:
        if time.monotonic() > deadline:
            raise BundleError(
                f"{root}: another process is writing into this bundle (build-engine, teach, calibrate), still after "
                f"{wait_s:g} s: {name} not written; retry"
            )
        time.sleep(0.02)
    return bool(locked)


def swapping(path: Path) -> contextlib.AbstractContextManager[bool]:
    """Held around replacing the directory at `path` by another (a rename or an exchange): the lock
    Bundle.replace_file holds, so no write of a file into the old directory is under way when the swap lands, and none
    starts into the new one on the old one's check. Nothing to hold where `path` is a link or absent (a link is
    switched, not written into)."""
    if path.is_symlink() or not path.is_dir():
        return contextlib.nullcontext(False)
    return _locked(path, "the new bundle")


def _sweep(directories: set[Path]) -> None:
    """Remove the temporary files a writer killed mid-write left in `directories` (a hard link to an old content, a
    new content or manifest not yet renamed). Run under the lock, which every writer holds while it has such files;
    those of a process still running are left alone all the same, since it may be a writer from before the lock."""
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            match = _LEFTOVER.fullmatch(entry.name)
            if match is None or int(match.group(1)) == os.getpid() or not entry.is_file(follow_symlinks=False):
                continue
            if not pid_gone(int(match.group(1))):
                continue
            try:
                os.unlink(entry.path)
            except OSError:
                pass  # left for a later write; it is never loaded


def pid_gone(pid: int) -> bool:
    """Whether no process has id `pid` (one alive as another user, or an id out of range, is not gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def manifest_of(path: Path) -> dict[str, Any] | None:
    """The manifest of bundle directory `path` as written, unverified (what it says it holds, read without hashing
    its files, which load_bundle does); None where it has none that parses as one."""
    try:
        manifest = _read_manifest(Path(path) / MANIFEST)
    except BundleError:
        return None
    return manifest if isinstance(manifest, dict) else None


def _supersedes(member: Path, on_disk: str | None, data: bytes) -> bool:
    """Whether thresholds document `data` may replace the document on disk (sha256 `on_disk`) that the writer did not
    load: it is of a higher version, so its number names no other document, and its history, where it names the
    version on disk, holds that very document (calibrate computes its version from the one on disk)."""
    if on_disk is None:
        return False
    try:
        there = member.read_bytes()
        if hashlib.sha256(there).hexdigest() != on_disk:
            return False
        current = thresholds_doc.parse(json.loads(there), most=thresholds_doc.LOADED_MAX_VERSION)
        new = thresholds_doc.parse(json.loads(data))
        if new.version <= current.version:
            return False
        for entry in new.history:
            if entry.get("version") == current.version:
                recorded = thresholds_doc.parse({**entry, "history": []})
                if recorded != dataclasses.replace(current, history=[]):
                    return False
    except (OSError, ValueError):  # unreadable, not JSON, not a thresholds document (ThresholdsError)
        return False
    return True


def _held(member: Path) -> str | None:
    """The sha256 of what `member` holds, None where there is no such file."""
    try:
        return sha256_file(member)
    except FileNotFoundError:
        return None


def _failed(root: Path, member: Path, name: str, digest: str, aside: Path | None, reason: str) -> BundleError:
    """The error for a rewrite (Bundle._write) a step of which failed with `reason`, told from what the disk holds
    now. Where the manifest lists the new checksum (its rename happened, only the sync after it failed), the write
    is done: NotDurable. Where it does not, the new content must not stay (a pending checksum would make the next
    load take it although the write is reported as failed): the old content is put back by a rename of its second
    name `aside` (a new file, listed nowhere, is removed)."""
    try:
        raw = _read_manifest(root / MANIFEST)
        listed = raw["files"].get(name)
        held = _held(member)
    except (BundleError, OSError, TypeError, AttributeError, KeyError) as exc:
        return BundleError(
            f"{member}: may not be written ({reason}), and what the bundle holds cannot be read back "
            f"({getattr(exc, 'strerror', None) or exc})"
        )
    if listed == digest and held == digest:
        return NotDurable(
            f"{member}: written, but it may not be on disk yet ({reason}): a power cut before the system writes it "
            "out could bring back the old content"
        )
    undo: OSError | None = None
    unsynced = ""
    if held == digest:
        try:
            if aside is not None:
                os.replace(aside, member)
            elif listed is None:
                member.unlink()  # a new file no manifest names: nothing loads it, and nothing is left behind
            else:
                raise OSError(f"no second name for the old content in {member.parent}")
        except OSError as exc:
            undo = exc
        else:
            try:
                fsync_dir(member.parent)
            except OSError as exc:
                unsynced = (
                    f", though a power cut before the system writes it out could bring back the new content "
                    f"({exc.strerror or exc})"
                )
        try:
            held = _held(member)
        except OSError as exc:
            return BundleError(
                f"{member}: may not be written ({reason}), and what it holds after putting the old content back "
                f"cannot be read ({exc.strerror or exc})"
            )
    if held == digest:
        why = undo.strerror or undo if undo is not None else "unknown"
        if digest == _pending(raw).get(name):
            return BundleError(
                f"{member}: written, but {MANIFEST} could not list it ({reason}) and the old content could not be put "
                f"back ({why}): the next load of the bundle takes the new content"
            )
        return BundleError(
            f"{member}: not written ({reason}); {MANIFEST} does not list it, and it could not be removed ({why})"
        )
    if held == listed or listed is None:  # unlisted, it is not loaded, whatever it holds
        return BundleError(f"{member}: not written ({reason}); it holds what it held before{unsynced}")
    return BundleError(  # another writer that takes no lock
        f"{member}: not written ({reason}); it now holds {_described(member, held)}, which {MANIFEST} lists as "
        f"{_described(None, listed)}"
    )


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


def _raise_if_rewritten(path: Path, first: dict[str, Any]) -> None:
    """ChangedOnDisk when the manifest of `path` is no longer `first`, the one a check under way read: a file found
    missing or changed then belongs to a write that landed meanwhile (a teach's swap, a calibrate), which a reader
    may load again, not to a damaged bundle."""
    try:
        now = _read_manifest(path / MANIFEST)
    except BundleError as exc:  # gone or cut short: a swap by two renames caught between them
        raise ChangedOnDisk(f"{exc}, since it was read a moment ago: a write under way") from exc
    if now != first:
        raise _changed(path, now, first, "a write landed while it was being checked")


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


def _check_identity(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Refuse hand edits of the manifest (the one file without a checksum) that change what results are published
    under or how frames are judged: a model_id that is not a string makes every result undecodable by subscribers; a
    method, backbone or input.resize other than the recorded recipe's judges frames otherwise than the thresholds
    were set on."""
    for key in ("model_id", "method", "backbone"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise BundleError(f"{manifest_path}: {key} {manifest[key]!r}, expected a non-empty string")
    if "recipe" in manifest:  # absent in bundles written before recipes were recorded
        recipe = manifest["recipe"]
        if not isinstance(recipe, dict):
            raise BundleError(f"{manifest_path}: recipe {recipe!r}, expected the mapping train recorded")
        # teach refits with its k and memory_size, the TensorRT profile takes its row ceilings from them and eval
        # prints it: none of them checks it again.
        if refused := recipe_refusal(recipe):
            raise BundleError(f"{manifest_path}: recipe.{refused}")
        recorded = {
            "method": manifest["method"],
            "backbone": manifest["backbone"],
            "input.resize": manifest["input"].get("resize", "stretch"),
        }
        for where, value in recorded.items():
            key = where.removeprefix("input.")
            if key in recipe and recipe[key] != value:
                raise BundleError(f"{manifest_path}: {where} {value!r}, expected the recorded recipe's {recipe[key]!r}")
    # The shape _model_id gives every bundle written since the first.
    prefix = f"{manifest['method']}-{manifest['backbone']}-"
    if not re.fullmatch(re.escape(prefix) + "[0-9a-f]{8}", manifest["model_id"]):
        raise BundleError(
            f"{manifest_path}: model_id {manifest['model_id']!r}, expected {prefix!r} and 8 hex digits (its method, "
            "backbone and the short hash write_bundle gives)"
        )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    # An int is finite however long: isfinite would first make it a float, which overflows past 1e308.
    return _count(value) or (isinstance(value, float) and math.isfinite(value))


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _strides(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(_count(t) and t in (2, 4, 8, 16, 32) for t in value)
        and list(value) == sorted(set(value))
    )


# What each field of a recipe (engines.model.recipes.Recipe) must be, and what a refusal says was expected: checked
# here on a manifest's recorded recipe, which has no checksum, and by Recipe.validate on every recipe train builds.
# It lives in the bundle layer, which cannot import the model's. A field's relation to the others (a window that fits
# the grid, a blur within the map) is Recipe.validate's alone: load compares the architecture with the recipe instead.
RECIPE_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_text, "a non-empty string"),
    "method": (_text, "a non-empty string"),
    "backbone": (_text, "a non-empty string"),
    "taps": (_strides, "increasing strides from 2,4,..,32"),
    "size": (
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_count(d) and 32 <= d <= 4096 for d in v),
        "height and width in 32..4096",
    ),
    "resize": (lambda v: isinstance(v, str) and v in RESIZE_POLICIES, f"one of {', '.join(RESIZE_POLICIES)}"),
    "scorer": (_text, "a non-empty string"),
    "aggregation": (lambda v: _count(v) and v >= 1 and v % 2 == 1, "an odd window >= 1"),
    "memory_size": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
    "k": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
    "smoothing_sigma": (lambda v: _number(v) and 0 < v <= 64, "a number in (0, 64]"),
    "score_share": (lambda v: _number(v) and 0 <= v <= 1, "a share in [0, 1]"),
    # Which names are copies is the scorer fit's (engines.runtime.scorer_fit.AUGMENTS), above this layer: teach
    # refuses an unknown one in a line, and Recipe.validate refuses it in train.
    "augment": (_text, "a non-empty string naming the copies"),
    "description": (lambda v: isinstance(v, str), "a string"),
}


# The fields a recipe recorded before they existed lacks; every other field has been recorded since recipes were.
LATER_RECIPE_FIELDS = ("score_share", "augment")


def recipe_refusal(recipe: Mapping[str, Any]) -> str | None:
    """What is wrong with the first field of `recipe` that RECIPE_FIELD_CHECKS refuses, or that it lacks (`field
    value, expected ...`); None if nothing is. Only LATER_RECIPE_FIELDS may be missing (a recipe recorded before they
    existed: their defaults); fields it does not know are not refused (a recipe recorded by a later version)."""
    for field, (valid, expected) in RECIPE_FIELD_CHECKS.items():
        if field not in recipe:
            if field not in LATER_RECIPE_FIELDS:
                return f"{field} missing, expected {expected} (every recorded recipe holds it)"
        elif not valid(recipe[field]):
            return f"{field} {recipe[field]!r}, expected {expected}"
    return None


def _check_architecture(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Refuse an `architecture` section the torch backend and export could not rebuild a graph from, or would rebuild
    otherwise than the recorded recipe: it is what they build from, it has no checksum, and the ONNX Runtime and
    TensorRT backends never read it, so an edit there would move the torch backend's (and a re-export's) scores
    away from theirs under the same model_id and thresholds. Not required: older bundles may lack it."""
    if "architecture" not in manifest:
        return
    architecture = manifest["architecture"]
    if not isinstance(architecture, dict):
        raise BundleError(f"{manifest_path}: architecture {architecture!r}, expected the mapping train recorded")
    checks: dict[str, tuple[Any, str]] = {
        "method": (lambda v: isinstance(v, str) and v, "a non-empty string"),
        "backbone": (lambda v: isinstance(v, str) and v, "a non-empty string"),
        "scorer": (lambda v: isinstance(v, str) and v, "a non-empty string"),
        "head": (lambda v: isinstance(v, dict), "a mapping"),
        "taps": (
            lambda v: isinstance(v, list) and v and all(_count(t) and 0 <= t <= 4 for t in v),
            "a list of backbone feature indices 0..4 (stride 2..32)",
        ),
        "input_shape": (
            lambda v: isinstance(v, list) and len(v) == 3 and all(_count(d) and d > 0 for d in v),
            "[height, width, channels], positive integers",
        ),
        # As the recipe's fields that set them.
        "aggregation": RECIPE_FIELD_CHECKS["aggregation"],
        "smoothing_sigma": RECIPE_FIELD_CHECKS["smoothing_sigma"],
        "score_share": RECIPE_FIELD_CHECKS["score_share"],
    }
    for field, (valid, expected) in checks.items():
        if field in architecture and not valid(architecture[field]):
            raise BundleError(f"{manifest_path}: architecture.{field} {architecture[field]!r}, expected {expected}")
    if "recipe" not in manifest:  # older bundles: nothing recorded to compare with
        return
    recipe = recipe_of(manifest)  # _check_identity made sure it is a mapping
    taps, shape = architecture.get("taps"), architecture.get("input_shape")
    # field: (the recipe's field that set it, what build_graph makes of it in that field's terms, an absent one as it
    # defaults it; None where build_graph refuses it missing by itself)
    built: dict[str, tuple[str, Any]] = {
        "method": ("method", architecture.get("method")),
        "backbone": ("backbone", architecture.get("backbone")),
        "scorer": ("scorer", architecture.get("scorer")),
        "taps": ("taps", None if taps is None else [2 ** (i + 1) for i in taps]),
        "input_shape": ("size", None if shape is None else shape[:2]),
        "aggregation": ("aggregation", aggregation_of(architecture)),
        "smoothing_sigma": ("smoothing_sigma", architecture.get("smoothing_sigma", DEFAULT_SIGMA)),
        "score_share": ("score_share", architecture.get("score_share", 0.0)),
    }
    for field, (key, value) in built.items():
        if value is None or key not in recipe or value == recipe[key]:  # an older recipe may lack the field
            continue
        strides = f" (strides {value})" if field == "taps" else ""
        raise BundleError(
            f"{manifest_path}: architecture.{field} {architecture.get(field, value)!r}{strides}, expected the "
            f"recorded recipe's {key} {recipe[key]!r}"
        )


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify the bundle at `path`; BundleError (one line naming the file) if anything is off, a file or
    folder this user may not read included (a model.onnx left 0600 by another user's copy)."""
    try:
        return _load_bundle(Path(path))
    except OSError as exc:
        raise BundleError(
            f"{exc.filename or path}: cannot read ({exc.strerror or exc}), expected a bundle user {_user()} may read"
        ) from exc


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _load_bundle(path: Path) -> Bundle:
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
    version = manifest.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        newer = (
            " (a bundle written by a newer inspectd: upgrade this one)"
            if (isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION)
            else ""
        )
        raise BundleError(f"{manifest_path}: format_version {version!r}, expected {FORMAT_VERSION}{newer}")
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
    first = json.loads(json.dumps(manifest))  # as read: the loop settles pending checksums into `files`
    for name, expected in files.items():
        member = _safe_member(path, name)
        if not member.is_file():
            _raise_if_rewritten(path, first)
            raise BundleError(f"{member}: missing, expected a file with sha256 {str(expected)[:12]}...")
        actual = sha256_file(member)
        if actual == pending.get(name):  # a rewrite interrupted after the file's rename (Bundle.replace_file)
            files[name] = actual
        elif actual != expected:
            _raise_if_rewritten(path, first)
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
    if shape.get("resample", EACH_AXIS) != EACH_AXIS:
        raise BundleError(f"{manifest_path}: input.resample {shape['resample']!r}, expected {EACH_AXIS!r} or none")
    if shape.get("resize", "stretch") not in RESIZE_POLICIES:
        expected = ", ".join(RESIZE_POLICIES)
        raise BundleError(f"{manifest_path}: input.resize {shape['resize']!r}, expected one of {expected}")
    # What train recorded of its data: read by the reduced-precision probe, bench, teach and calibrate as a mapping.
    if not isinstance(manifest.get("training", {}), dict):
        raise BundleError(f"{manifest_path}: training {manifest['training']!r}, expected the mapping train recorded")
    # Bundle.interrupted takes bool() of it, which reads the string "false" as true.
    if not isinstance(interrupted := manifest.get("interrupted", False), bool):
        raise BundleError(f"{manifest_path}: interrupted {interrupted!r}, expected true or false")
    _check_identity(manifest_path, manifest)
    _check_architecture(manifest_path, manifest)
    manifest.pop(PENDING, None)
    bundle = Bundle(path, manifest)
    bundle.scorer_params()  # refuses a pickled or incomplete scorer.npz now, not at the first frame
    return bundle
