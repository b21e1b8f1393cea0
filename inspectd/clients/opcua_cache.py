"""The OPC UA server mode's cache of asyncua's standard address space: the several thousand nodes every OPC UA server
holds, which asyncua otherwise builds at each start (seconds of CPU), kept as a shelf that asyncua loads lazily
instead (Server.init(shelf_file=...)), in the bridge's cache directory (`cache_dir`, default $CACHE_DIRECTORY, which
the unit's CacheDirectory= sets).

The cache directory is one running bridge's at a time (it holds opcua-address-space.lock; another bridge given the
same directory builds in memory):

    opcua-address-space-asyncua-<version>-py<X.Y>/   the shelf asyncua wrote (`standard` and the files its dbm
                                                     backend puts beside it) and manifest.json: both versions and
                                                     each file's sha256
    .opcua-address-space-*.tmp/                      a build under way, renamed to the name above once complete

A shelf is written whole into a temporary directory and renamed into place, so the name above only ever holds a
complete one. One that does not verify at start (a file changed, truncated or missing, another version's, a dbm
backend this Python lacks) is renamed aside, removed as far as this user can, and rebuilt with one warning. Nothing
here stops the bridge: a cache that cannot be used is one warning and the address space is built in memory, as
without a cache.
"""

from __future__ import annotations

import asyncio
import dbm
import importlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from inspectd.durable import fsync_dir, hold_lock, sha256_file, write_file
from inspectd.errors import one_line

log = structlog.get_logger("inspectd.clients.opcua")

PREFIX = "opcua-address-space-"
LOCK = "opcua-address-space.lock"
# No suffix: asyncua looks for a shelf at this name itself (gdbm) or at this name + .db (Berkeley DB's ndbm).
SHELF = "standard"
MANIFEST = "manifest.json"


class Unusable(Exception):
    """The cache directory cannot be used for this start; the message says why in one line."""


def versions() -> dict[str, str]:
    """What a shelf is keyed by: its pickled nodes are asyncua's classes, and its dbm files the Python's."""
    try:
        asyncua = metadata.version("asyncua")
    except metadata.PackageNotFoundError:
        # asyncua imports (vendored, frozen, a broken reinstall) but says no version: nothing to tell its shelves by.
        # Unusable, not the ModuleNotFoundError this subclasses, which the bridge reports as asyncua missing.
        raise Unusable("asyncua has no package metadata, expected its version to key the shelf by") from None
    return {"asyncua": asyncua, "python": "{}.{}".format(*sys.version_info[:2])}


class Cache:
    """One cache directory, for this asyncua and Python: take() it, load usable() or build into begin() and commit()."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.versions = versions()
        self.path = directory / f"{PREFIX}asyncua-{self.versions['asyncua']}-py{self.versions['python']}"
        self.lock: int | None = None  # the descriptor holding LOCK, once take() has it

    def take(self) -> None:
        """Lock the directory for this bridge (until it exits) and remove what earlier runs left: builds a kill cut
        short, and other versions' shelves, which no bridge can be using while the lock is held here."""
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            lock = hold_lock(self.directory / LOCK)
        except BlockingIOError:
            raise Unusable("another bridge uses it (give each bridge a cache directory of its own)") from None
        except OSError as exc:
            raise Unusable(
                f"expected a directory this user may write, cannot make or open it ({exc.strerror or exc})"
            ) from None
        if lock is None:
            raise Unusable(f"cannot create or lock {LOCK} in it, expected a writable directory with file locks")
        self.lock = lock
        try:
            for entry in self.directory.iterdir():
                if entry.name.startswith((PREFIX, "." + PREFIX)) and entry != self.path and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass  # what is left costs disk only: the next start tries again

    def usable(self) -> Path | None:
        """The shelf to load, or None to build one: it is missing, or it failed verification (refused: one warning)."""
        if not self.path.exists():
            return None
        reason = self._verify()
        if reason is None:
            return self.path / SHELF
        self.refuse(reason)
        return None

    def refuse(self, reason: str) -> None:
        """Free self.path for a rebuild (one warning). It is renamed aside before anything is deleted: a rename within
        the cache directory needs write access to that directory only, so content this user cannot delete (left by a
        run as root) never keeps the name, and a kill leaves the name free or the shelf whole. What cannot be deleted
        of it stays aside, swept by take() at each start. Unusable when even the rename fails."""
        aside = self.directory / f".{PREFIX}{secrets.token_hex(8)}.tmp"
        try:
            os.rename(self.path, aside)
            moved = True
        except FileNotFoundError:
            moved = False  # gone already: the name is free
        except OSError as exc:
            raise Unusable(
                f"{self.path}: {reason}, and it cannot be renamed aside to rebuild it ({one_line(exc)}); "
                "expected it removable by this user: remove it"
            ) from None
        log.warning("address_space_cache_rebuilt", path=str(self.path), reason=reason)
        if not moved:
            return
        try:
            if stat.S_ISDIR(os.lstat(aside).st_mode):
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.unlink()
        except OSError:
            pass  # what is left costs disk only: take() tries again at the next start

    def _verify(self) -> str | None:
        """Why the shelf at self.path may not be loaded, in a few words; None when it may."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{MANIFEST}: unreadable ({one_line(exc)})"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            return f"{MANIFEST}: expected an object with the shelf's files"
        for key, expected in self.versions.items():
            if manifest.get(key) != expected:
                return f"written for {key} {manifest.get(key)}, expected {expected}"
        try:
            present = sorted(entry.name for entry in self.path.iterdir() if entry.name != MANIFEST)
            if present != sorted(files):
                return f"holds {', '.join(present) or 'nothing'}, expected {', '.join(sorted(files))}"
            for name, digest in files.items():
                if sha256_file(self.path / name) != digest:
                    return f"{name}: changed since it was written (its sha256 differs)"
        except OSError as exc:
            return f"unreadable ({one_line(exc)})"
        # The files are the ones written; what remains is whether this Python has the dbm backend that wrote them
        # (by their headers: reading a record would parse the index asyncua parses again).
        backend = dbm.whichdb(str(self.path / SHELF))
        if not backend:
            return "not a dbm database this Python recognizes"
        try:
            importlib.import_module(backend)
        except ImportError:
            return f"written by {backend}, which this Python lacks"
        return None

    def begin(self) -> Path:
        """A fresh temporary directory for a build, in the cache directory (the rename into place stays on one file
        system)."""
        return Path(tempfile.mkdtemp(prefix="." + PREFIX, suffix=".tmp", dir=self.directory))

    def commit(self, build: Path) -> None:
        """Put the shelf asyncua wrote into `build` in place, durably: its files and manifest fsynced, the directory
        renamed to self.path (none is there: take() holds the lock and usable() removed a refused one)."""
        shelf = build / SHELF
        if not (shelf.is_file() or shelf.with_suffix(".db").is_file()):
            # Python's fallback dbm (.dat, .dir, .bak) and gdbm's ndbm (.pag, .dir) write only files beside the name,
            # where asyncua does not look: an empty file there lets it find the shelf, which dbm then opens by its
            # own detection of those files.
            shelf.touch()
        files = {entry.name: sha256_file(entry, sync=True) for entry in sorted(build.iterdir())}
        manifest = {**self.versions, "files": files}
        write_file(build / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"), mode=0o640)
        fsync_dir(build)
        os.rename(build, self.path)
        fsync_dir(self.directory)


async def init_server(directory: Path | None) -> Any:
    """An asyncua Server with its standard address space in place (Server.init done): from the shelf in `directory`
    when one there verifies, else built and written there for the next start; without a directory, built in memory.
    Logs address_space_loaded with where it came from and the seconds it took, when a directory is given."""
    from asyncua import Server

    if directory is None:
        server = Server()
        await server.init()
        return server
    try:
        return await _cached(directory)
    except Exception as exc:  # noqa: BLE001 - a cache only saves time: whatever fails in it, the bridge goes on
        reason = str(exc) if isinstance(exc, Unusable) else one_line(exc)
    # Outside the handler: the in-memory build is the bridge's own start, whose failure ends it as without a cache.
    return await _in_memory(directory, reason)


async def _cached(directory: Path) -> Any:
    """init_server's way through the cache: raises when the cache cannot be used, never once a Server.init succeeded
    (a shelf that cannot be put in place still leaves this start a whole address space)."""
    from asyncua import Server

    started = time.monotonic()
    cache = Cache(directory)
    await asyncio.to_thread(cache.take)
    shelf = await asyncio.to_thread(cache.usable)
    if shelf is not None:
        server = Server()
        try:
            await server.init(shelf_file=shelf)
        except Exception as exc:  # noqa: BLE001 - verified, yet asyncua failed on it: rebuilt, as one that fails it
            await asyncio.to_thread(cache.refuse, f"asyncua could not load it ({one_line(exc)})")
        else:
            _loaded("cache", cache.path, started)
            return server
    try:
        build = await asyncio.to_thread(cache.begin)
    except OSError as exc:
        raise Unusable(f"cannot make a directory in it for the shelf ({one_line(exc)})") from None
    server = Server()
    try:
        # asyncua builds the address space and, finding no shelf at this name, writes it there before going on.
        await server.init(shelf_file=build / SHELF)
    except Exception as exc:  # noqa: BLE001 - the write failed (a full disk): asyncua stopped short of a whole one
        await asyncio.to_thread(shutil.rmtree, build, True)
        raise Unusable(f"cannot write the shelf ({one_line(exc)})") from None
    try:
        await asyncio.to_thread(cache.commit, build)
    except Exception as exc:  # noqa: BLE001 - this start's address space is whole; only the next start pays again
        await asyncio.to_thread(shutil.rmtree, build, True)
        _unused(directory, f"cannot write the shelf ({one_line(exc)})")
        return server
    _loaded("built", cache.path, started)
    return server


async def _in_memory(directory: Path, reason: str) -> Any:
    from asyncua import Server

    _unused(directory, reason)
    server = Server()
    await server.init()
    return server


def _unused(directory: Path, reason: str) -> None:
    log.warning(
        "address_space_cache_unused",
        cache=str(directory),
        error=reason,
        effect="the standard address space is built in memory, at every start until this is fixed",
    )


def _loaded(source: str, path: Path, started: float) -> None:
    log.info("address_space_loaded", source=source, path=str(path), seconds=round(time.monotonic() - started, 3))
