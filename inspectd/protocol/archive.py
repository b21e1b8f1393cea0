"""The image archive's on-disk format and its readers: the frames the daemon kept (inspectd.daemon.archive writes
them), read by `inspectd archive`, the web view and anyone on the station.

Layout under the archive directory (by default `<state_dir>/archive`):

    index.sqlite3                          one row per archived frame (FIELDS), SQLite in WAL mode, so readers in
                                           other processes never block the writer
    <camera>/<YYYY-MM-DD>/<id>.png         the frame as received (decoded pixels, lossless)
    <camera>/<YYYY-MM-DD>/<id>.overlay.jpg the frame with the defect mask and regions drawn on it
    live/<camera>.jpg                      the camera's most recent frame, replaced about once a second (not indexed)

An id is `<camera>-<UTC capture time YYYYmmddTHHMMSSmmm>-<seq>`: unique per frame even when seq restarts (a daemon
without a journal), and sortable by time within a camera. It is what a published result's `archive_id` names. A
capture time that is no date (`dated`: milliseconds, 0, far in the future) is replaced by the time the frame was
offered to the archive, in the id, the day folder and the index's `t_capture` alike.

An index row may name a frame file that is empty or cut short: the images are not fsynced (that would halve the
writer's rate), so a power cut can leave one whose row reached the disk. `frame_bytes` checks a file's structure (a
PNG, as the daemon writes them: its signature first, its IEND chunk last), reading it once and decoding nothing, and
refuses anything else (UnreadableFrame); `export` and teach skip such a frame and name it.

Exported folders are MVTec-layout (`<out>/<split>/<verdict folder>/<id>.png`, good frames in `good`, defect verdicts
in `defect`), so `inspectd train --data OUT` and `inspectd calibrate --good OUT` read them directly. An export adds
to OUT: `<out>/archive.jsonl` gets one row per frame copied (its index row, `exported_to`, and `export_run`, an id
the rows of one export run share), none for a frame it already names in that folder. Whether to add to a folder that
holds frames of an earlier export is the caller's to decide (`split_frames` says what it holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import re
import sqlite3
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, overload

from inspectd.errors import InspectdError
from inspectd.protocol.journal import CAMERA_RE

INDEX_NAME = "index.sqlite3"
LIVE_DIR = "live"
# A camera id begins the names of its archive files and journal folder (`<id>-<time>-<n>.overlay.jpg.tmp`, some 60
# bytes past the id): bounded so that every such name stays well under the 255 bytes a file name may have.
MAX_CAMERA_ID = 64
# Not a camera id: the image archive's folder of live frames, beside the cameras' folders, which a camera's entries
# would share (and its day folders escape the sweep of what a kill left).
RESERVED_CAMERA_IDS = (LIVE_DIR,)
_CAMERA_ID_RE = re.compile(rf"(?={CAMERA_RE.pattern}\Z).{{1,{MAX_CAMERA_ID}}}")
ID_RE = re.compile(rf"{CAMERA_RE.pattern}-\d{{8}}T\d{{9}}-\d+")
_ID_TIME_RE = re.compile(r"-(\d{8}T\d{6})(\d{3})-\d+\Z")
EXPORT_SPLITS = ("train", "test")
EXPORT_FOLDERS = {"ok": "good", "defect": "defect"}  # verdict -> the folder of <out>/<split>/ an export copies it to
MANIFEST_NAME = "archive.jsonl"  # what an export took, one JSON object per frame
# In every row of an export's manifest: the same id for the rows one export run wrote. An export adds to its folder,
# so the rows of the frames taught on tell whether they come from one span or from several exported into it.
EXPORT_RUN = "export_run"
# Where the installed daemon keeps it: <state_dir>/archive with the installed config's state_dir (/var/lib/inspectd);
# the default of every command that reads the archive without a daemon config.
DEFAULT_ARCHIVE = Path("/var/lib/inspectd/archive")
# The capture times taken as dates: 2000-01-01 to 2100-01-01 UTC. Milliseconds since the epoch lie far beyond, a
# camera without a clock near 0.
DATED_FROM, DATED_UNTIL = 946684800.0, 4102444800.0
# A whole PNG starts with its signature and ends with the IEND chunk: length 0, the type, the type's CRC.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND" + zlib.crc32(b"IEND").to_bytes(4, "big")

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id TEXT PRIMARY KEY,
    camera TEXT NOT NULL,
    seq INTEGER NOT NULL,
    frame_id TEXT NOT NULL,
    t_capture REAL NOT NULL,
    verdict TEXT NOT NULL,
    score REAL,
    threshold REAL,
    model_id TEXT,
    thresholds_version INTEGER,
    regions INTEGER NOT NULL,
    frame_file TEXT NOT NULL,
    overlay_file TEXT,
    bytes INTEGER NOT NULL,
    t_written REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_by_time ON frames (t_capture);
CREATE INDEX IF NOT EXISTS frames_by_camera ON frames (camera, t_capture);
CREATE INDEX IF NOT EXISTS frames_by_written ON frames (t_written);
"""


def camera_id_problem(value: Any, shown: str) -> str | None:
    """Why `value` (written in messages as `shown`) cannot be the id of a daemon's camera, None when it can: the
    config's rule, and a client's for its --camera, which would otherwise wait in silence for results that never
    come, or write an override no camera ever takes."""
    if not isinstance(value, str) or not _CAMERA_ID_RE.fullmatch(value):
        return (
            f"expected a camera id ({CAMERA_RE.pattern}, at most {MAX_CAMERA_ID} characters: it begins file names), "
            f"got {shown}"
        )
    if value in RESERVED_CAMERA_IDS:
        return f"{shown} is reserved (the image archive's live-frame folder), expected another camera id"
    return None


class ArchiveError(InspectdError):
    """The archive cannot be read (no index, unreadable), a request names nothing in it, or an export cannot be
    written."""


class NoArchive(ArchiveError):
    """No index where the archive should be: none written yet, or not an archive directory."""


class NotArchived(ArchiveError):
    """An id the index does not name: not written yet, never written, or expired."""


class UnreadableFrame(ArchiveError):
    """An entry's frame file is empty, not a whole PNG (cut short) or its path cannot be resolved (a symlink loop):
    not a frame to copy or to train on."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One archived frame. Paths are relative to the archive directory."""

    id: str
    camera: str
    seq: int
    frame_id: str
    t_capture: float
    verdict: str
    score: float | None
    threshold: float | None
    model_id: str | None
    thresholds_version: int | None
    regions: int
    frame_file: str
    overlay_file: str | None
    bytes: int
    t_written: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def export_name(self) -> str:
        """The file name `ArchiveReader.export` gives this frame (and the order teach lists an archive's frames in)."""
        return f"{self.id}.png"


FIELDS = tuple(f.name for f in dataclasses.fields(Entry))


def dated(t_capture: float) -> bool:
    """Whether `t_capture` (epoch seconds) names a date the archive files a frame under."""
    return DATED_FROM <= t_capture < DATED_UNTIL


def archive_id(camera: str, seq: int, t_capture: float) -> str:
    when = datetime.datetime.fromtimestamp(t_capture, datetime.timezone.utc)
    return f"{camera}-{when:%Y%m%dT%H%M%S}{when.microsecond // 1000:03d}-{seq}"


def id_time(entry_id: str) -> float | None:
    """The time (epoch seconds, to the millisecond) an archive id names; None for what is no id or no date."""
    match = _ID_TIME_RE.search(entry_id) if ID_RE.fullmatch(entry_id) else None
    if match is None:
        return None
    try:
        when = datetime.datetime.strptime(match[1], "%Y%m%dT%H%M%S").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return when.timestamp() + int(match[2]) / 1000


def day_dir(camera: str, t_capture: float) -> str:
    return f"{camera}/{datetime.datetime.fromtimestamp(t_capture, datetime.timezone.utc):%Y-%m-%d}"


def unreadable(path: Path, what: str, exc: OSError) -> ArchiveError:
    """The refusal for a file of the archive this user cannot read (`what`: "archive", "frame image", "overlay
    image", "live frame")."""
    return ArchiveError(f"{path}: cannot read the {what} ({exc.strerror or exc})")


def live_frame(root: Path, camera: str) -> Path | None:
    """The camera's latest frame under the archive `root` (written before, and without, any archived entry: no index
    needed); None for a name that is no camera id (never a path) or while there is none. ArchiveError when it cannot
    be looked for (a folder on the way this user may not enter). A name no camera could have (too long for one, or
    reserved) is not there either: asked of the disk, a long one fails with ENAMETOOLONG, which is no fault of the
    archive, and anyone who can reach the web view could raise its "archive unreadable" alarm with it."""
    if not _CAMERA_ID_RE.fullmatch(camera) or camera in RESERVED_CAMERA_IDS:
        return None
    path = root / LIVE_DIR / f"{camera}.jpg"
    try:
        return path if path.is_file() else None
    except OSError as exc:  # is_file() raises what is not "not there": e.g. a live/ folder this user cannot enter
        if exc.errno == errno.ENAMETOOLONG:  # a long archive path: no file can be there
            return None
        raise unreadable(path, "live frame", exc) from None


WAL_CHECKPOINT_PAGES = 256  # pages of the index's write-ahead log before a checkpoint (4 KiB each)
WAL_MAX_BYTES = 1 << 20  # what a checkpoint truncates the log to


def connect(root: Path) -> sqlite3.Connection:
    """The index, created if missing (the writer's way in; readers use ArchiveReader)."""
    db = sqlite3.connect(root / INDEX_NAME, timeout=5.0, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last rows, never corrupt the index
        # archive.max_mb counts the images; the log beside the index would otherwise grow to SQLite's default
        # checkpoint (1000 pages, about 4 MiB) and keep that size, uncounted.
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={WAL_MAX_BYTES}")
        db.executescript(SCHEMA)
    except BaseException:  # e.g. a full disk: the caller retries, and must not leak a connection each time
        db.close()
        raise
    return db


def parse_time(text: str, what: str, now: float | None = None) -> float:
    """Epoch seconds from an ISO 8601 time (`2026-03-01T14:00`, local time when no zone is given) or a span back
    from `now` (`90s`, `15m`, `1h`, `2d`; epoch seconds, the clock when None). Both ends of one span are parsed
    against one `now`: each reading the clock itself, `--since 1h --until 1h` would be a span microseconds long."""
    span = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if span:
        seconds = float(span.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[span.group(2)]
        return (datetime.datetime.now().timestamp() if now is None else now) - seconds
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ArchiveError(
            f"{what}: {text!r}, expected an ISO time (2026-03-01T14:00) or a span back from now (90s, 15m, 1h, 2d)"
        ) from None


@overload
def parse_span(since: str, until: str | None, now: float | None = None) -> tuple[float, float | None]: ...
@overload
def parse_span(since: str | None, until: str | None, now: float | None = None) -> tuple[float | None, float | None]: ...


def parse_span(since: str | None, until: str | None, now: float | None = None) -> tuple[float | None, float | None]:
    """(since, until) as epoch seconds (None where not given), both read against one `now` (the clock when None),
    refusing an `until` at or before `since` and a `since` not before now (a day mistyped): such a span holds
    nothing, and the empty answer would send the operator after a longer one."""
    now = time.time() if now is None else now
    t_since = parse_time(since, "--since", now) if since is not None else None
    t_until = parse_time(until, "--until", now) if until is not None else None
    if t_since is not None and t_until is not None and t_until <= t_since:
        raise ArchiveError(
            f"--since {since} --until {until}: the span ends at or before it starts, expected --until after --since"
        )
    if t_since is not None and t_since >= now:
        raise ArchiveError(
            f"--since {since}: now or in the future, expected a time in the past (nothing is archived from then yet)"
        )
    return t_since, t_until


class ArchiveReader:
    """Queries over an archive directory another process writes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index = self.root / INDEX_NAME
        try:
            with open(index, "rb"):
                pass
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NoArchive(f"{self.root}: no {INDEX_NAME}, expected an inspectd image archive directory") from None
        except OSError as exc:  # e.g. the daemon's, and this user neither its user nor in its group
            raise unreadable(index, "archive", exc) from None
        try:
            self._db = sqlite3.connect(index, timeout=5.0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ArchiveError(f"{index}: cannot read the archive index ({exc})") from None
        try:
            self._db.execute("PRAGMA query_only=ON")
            self._db.execute("SELECT 1 FROM frames LIMIT 1").fetchall()
        except sqlite3.Error as exc:  # e.g. an index the writer has not given its schema yet: a caller retries
            self._db.close()
            raise ArchiveError(f"{index}: cannot read the archive index ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def query(
        self,
        camera: str | None = None,
        verdict: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Entry]:
        where, args = _where(camera, verdict, since, until)
        sql = (
            f"SELECT {', '.join(FIELDS)} FROM frames{where} ORDER BY t_capture {'DESC' if newest_first else 'ASC'}, id"
        )
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [Entry(*row) for row in self._rows(sql, args)]

    def counts(
        self,
        verdict: str | None = None,
        since: float | None = None,
        until: float | None = None,
        model_ids: list[str] | None = None,
    ) -> dict[str, int]:
        """camera -> how many frames match (of `model_ids` where given), counted in the index, nothing loaded."""
        where, args = _where(None, verdict, since, until, model_ids)
        return dict(self._rows(f"SELECT camera, COUNT(*) FROM frames{where} GROUP BY camera", args))

    def _rows(self, sql: str, args: list[Any]) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise ArchiveError(f"{self.root / INDEX_NAME}: cannot read the archive index ({exc})") from None

    def get(self, entry_id: str) -> Entry:
        if not ID_RE.fullmatch(entry_id):
            raise ArchiveError(f"archive id {entry_id[:80]!r}: expected <camera>-<YYYYmmddTHHMMSSmmm>-<seq>")
        try:
            row = self._db.execute(f"SELECT {', '.join(FIELDS)} FROM frames WHERE id = ?", (entry_id,)).fetchone()
        except sqlite3.Error as exc:  # e.g. locked past the timeout by a writer opening the index
            raise ArchiveError(f"{self.root / INDEX_NAME}: cannot read the archive index ({exc})") from None
        if row is None:
            raise NotArchived(f"archive id {entry_id!r}: not in the archive (never written, or expired)")
        return Entry(*row)

    def file(self, entry: Entry, kind: str = "frame") -> Path:
        """The frame or overlay file of an entry; never a path outside the archive, whatever the index says.
        UnreadableFrame when its path cannot be resolved (a symlink loop)."""
        name = entry.frame_file if kind == "frame" else entry.overlay_file
        if name is None:
            raise ArchiveError(f"archive id {entry.id!r}: has no {kind} image")
        try:
            path = (self.root / name).resolve()
            root = self.root.resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError on 3.11): one frame to skip, not a crash
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a symlink loop"
            raise UnreadableFrame(
                f"archive id {entry.id!r}: {kind} file {self.root / name} cannot be resolved ({why})"
            ) from None
        if not path.is_relative_to(root):
            raise ArchiveError(f"archive id {entry.id!r}: {kind} file outside the archive")
        return path

    def cameras(self) -> list[str]:
        """The cameras the index holds a frame of, by id."""
        return [row[0] for row in self._rows("SELECT DISTINCT camera FROM frames ORDER BY camera", [])]

    def export(
        self,
        entries: list[Entry],
        out: str | Path,
        split: str = "test",
        unreadable: list[str] | None = None,
        expired: list[str] | None = None,
    ) -> int:
        """Copy the entries' frames into an MVTec-layout folder `out/<split>/<good|defect>/<id>.png`, adding to what
        is there; returns how many were copied. A frame that expired between the query and the copy is skipped, its
        id added to `expired` when given; so is a frame whose file is empty or not a whole PNG, its id added to
        `unreadable`. A frame the manifest already names in its folder (exported there before) is copied again but
        gets no second row. An ArchiveError naming `out` when it cannot be written (under a file, permission denied,
        disk full)."""
        if split not in EXPORT_SPLITS:
            raise ArchiveError(f"split {split!r}: expected one of {', '.join(EXPORT_SPLITS)}")
        out = Path(out)
        copied = 0
        run = uuid.uuid4().hex
        try:
            with contextlib.ExitStack() as stack:
                # OUT and its manifest are made at the first frame that reads: an export that copies nothing leaves
                # nothing behind that looks like an export.
                manifest = None
                named: set[tuple[str, str]] = set()
                for entry in entries:
                    if entry.verdict not in EXPORT_FOLDERS:
                        continue
                    try:
                        data = self.frame_bytes(entry)
                    except UnreadableFrame:
                        if unreadable is not None:
                            unreadable.append(entry.id)
                        continue
                    if data is None:
                        if expired is not None:
                            expired.append(entry.id)
                        continue
                    if manifest is None:
                        out.mkdir(parents=True, exist_ok=True)
                        named, whole = _manifest_rows(out / MANIFEST_NAME)
                        manifest = stack.enter_context(open(out / MANIFEST_NAME, "a", encoding="utf-8"))
                        if not whole:  # a row cut off by a kill: ours must not be appended to it and lost with it
                            manifest.write("\n")
                    folder = out / split / EXPORT_FOLDERS[entry.verdict]
                    folder.mkdir(parents=True, exist_ok=True)
                    _write_whole(folder / entry.export_name, data)
                    exported_to = f"{split}/{folder.name}"
                    if (entry.id, exported_to) not in named:
                        row = {**entry.to_dict(), "exported_to": exported_to, EXPORT_RUN: run}
                        manifest.write(json.dumps(row) + "\n")
                        named.add((entry.id, exported_to))
                    copied += 1
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename and Path(exc.filename) != out else ""
            raise ArchiveError(f"export {out}: cannot write{where} ({exc.strerror or exc})") from None
        return copied

    def frame_bytes(self, entry: Entry) -> bytes | None:
        """The frame file's bytes, checked to be a whole PNG (by its structure, not decoded: a power cut leaves
        a file empty or cut short); None when it expired since the query. UnreadableFrame when it is not."""
        path = self.file(entry)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArchiveError(f"archive id {entry.id!r}: cannot read {path} ({exc.strerror or exc})") from None
        if not data:
            raise UnreadableFrame(f"archive id {entry.id!r}: {path} is empty")
        if not (data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END)):
            raise UnreadableFrame(f"archive id {entry.id!r}: {path} is not a whole PNG (cut short?)")
        return data


def split_frames(out: str | Path, split: str) -> dict[str, list[str]]:
    """The files in each folder of `out/<split>/` (good, defect, any other a reviewer made), by the folder's name,
    hidden ones left out: every file, not only those train, calibrate and teach would read as images (which suffixes
    those are is engines.data's to say, below this layer), so a stray file counts as one more that is not this
    export's. Empty where there is no such folder yet."""
    where = Path(out) / split
    try:
        folders = sorted(p for p in where.iterdir() if not p.name.startswith(".") and p.is_dir())
        return {
            folder.name: sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
            for folder in folders
        }
    except (FileNotFoundError, NotADirectoryError):  # nothing exported there yet; one under a file fails its write
        return {}
    except OSError as exc:
        raise ArchiveError(f"export {out}: cannot read {where} ({exc.strerror or exc})") from None


def _manifest_rows(path: Path) -> tuple[set[tuple[str, str]], bool]:
    """(archive id, exported_to) of each row of the export manifest at `path`, and whether its last row is whole (it
    ends in a newline, or there is none). A row that does not parse names nothing."""
    named: set[tuple[str, str]] = set()
    line = b""
    try:
        # Bytes: a line that is not UTF-8 is one more row that does not parse, not a failure of the whole file.
        with open(path, "rb") as manifest:
            for line in manifest:
                try:
                    row = json.loads(line)
                    named.add((row["id"], row["exported_to"]))
                except (ValueError, TypeError, KeyError):
                    continue
    except FileNotFoundError:
        return named, True
    return named, not line or line.endswith(b"\n")


def _where(
    camera: str | None,
    verdict: str | None,
    since: float | None,
    until: float | None,
    model_ids: list[str] | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, or empty) and its arguments for the filters given."""
    where: list[str] = []
    args: list[Any] = []
    for column, op, value in (
        ("camera", "=", camera),
        ("verdict", "=", verdict),
        ("t_capture", ">=", since),
        ("t_capture", "<", until),
    ):
        if value is not None:
            where.append(f"{column} {op} ?")
            args.append(value)
    if model_ids is not None:
        where.append(f"model_id IN ({', '.join('?' * len(model_ids))})")
        args.extend(model_ids)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _write_whole(path: Path, data: bytes) -> None:
    """`data` into `path`, or no file there: a truncated image in an export would fail train or calibrate later."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        try:
            path.unlink()
        except OSError:
            pass
        raise OSError(exc.errno, exc.strerror, str(path)) from None
