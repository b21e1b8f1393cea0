"""The results journal's on-disk format and its readers: a bounded, append-only record of every published result,
per camera, written by the daemon (inspectd.daemon.journal) and read by anyone on the station.

It serves two needs. A subscriber that was away (a PLC bridge restarting) fetches what it missed by seq
(`inspectd subscribe --since SEQ --journal DIR`, or `read_since`). A daemon killed with SIGKILL resumes each camera's
seq after the last one it gave out, so a seq is never published twice and the frames the kill cost show as a gap.

Layout: `<dir>/<camera>/<first seq, 12 digits or more>.seg`, one active segment per camera. A record is

    magic "IJR1" | u32 body length | u64 seq | u32 crc32(body) | body
    body = u16 frame count, then per frame: u32 length | bytes      (the multipart message exactly as published)

so a record torn by a kill mid-write is recognised (cut short) and readers stop at it. The CRC covers the body alone:
the header's seq is checked against the seq of the result the body holds, and a record where they differ is corrupt
(the format, and every journal already written, stay as they are). Beside the segments each
camera has an `accepted` mark: the seq most recently given to a frame (8 bytes, little-endian), and a `reserved` mark
in the same form: the seq up to which its numbering may have been given out, fsynced before any seq past it is, so
while its writes succeed every seq of the numbering lies at or below it (a PLC bridge checks its resume point against
it at start). The directory holds a `clean` mark while no writer has it open, and a `boot` mark: the kernel's boot id
at the last open.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from inspectd.errors import InspectdError, MessageError
from inspectd.protocol import wirejson

MAGIC = b"IJR1"
PAGE = 4096  # the least a kernel writes back of a file: what a power cut leaves unwritten comes in pages
RECORD = struct.Struct("<4sIQI")  # magic, body length, seq, crc32(body)
COUNT = struct.Struct("<H")
LENGTH = struct.Struct("<I")
# Named by the first seq, at least 12 digits: a numbering past 10**12 (moved there by a damaged mark) gets longer names,
# still listed, so its results stay readable and trimmed. 20 digits hold any u64 seq.
SEGMENT_RE = re.compile(r"(\d{12,20})\.seg")
CAMERA_RE = re.compile(r"[a-zA-Z0-9_-]+")
MAX_BODY = 256 << 20  # a result with its mask is kB; anything bigger is a corrupt length field
CLEAN_MARK = "clean"  # present only while no writer has the journal open: absent at open = a crash
ACCEPTED_MARK = "accepted"
# The seq up to which a camera's numbering may have been given out, fsynced before any seq past it is (the accepted
# mark is synced only every interval): where numbering resumes after the machine itself went down.
RESERVED_MARK = "reserved"
BOOT_MARK = "boot"  # the kernel's boot id when the journal was last opened: a change means the machine restarted
ACCEPTED = struct.Struct("<q")


class JournalError(InspectdError):
    """The journal directory cannot be used (not a directory, unreadable, a camera id that is not a name)."""


def segment_files(camera_dir: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of a camera's segments, oldest first."""
    try:
        names = os.listdir(camera_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), camera_dir / name) for name in names if (m := SEGMENT_RE.fullmatch(name))]
    return sorted(found)


class JournalCorrupt(JournalError):
    """A segment holds bytes that are not whole records where no write can still be under way: damage, not a torn
    tail."""


# Called with (segment path, offset of the damage, bytes skipped) for each corrupt stretch inside a segment.
OnCorrupt = Callable[[Path, int, int], None]

# Where a result header gives its seq: compact JSON, as the writer's encoder makes it. Only a match with the header's
# seq is taken on sight; anything else is settled by parsing the whole header (a mismatch is rare: damage).
_BODY_SEQ = re.compile(rb'[{,]"seq":(\d{1,20})[,}]')


def read_records(
    path: Path, on_corrupt: OnCorrupt | None = None, check_seq: bool = True
) -> Iterator[tuple[int, int, list[bytes]]]:
    """(end offset, seq, frames) of each complete record, in order.

    A bad record with nothing whole after it that is cut short (a short header or body), or whose bytes from a page
    boundary to the end of the file are all zero, is a torn tail (a kill mid-write, a record still being written, or
    a power cut that left the file's new size on disk before its last pages): the iteration ends there. Any other bad
    record is corruption: wrong magic, an impossible length, or a CRC or layout mismatch followed by whole records; a
    last record whose whole declared length is there but fails its checks; and, with `check_seq`, a whole record whose
    header seq is not the seq of the result in its body (the CRC does not cover the header: a flipped bit there would
    move a replay's bounds, or the numbering at the next start).
    `on_corrupt(path, offset, skipped)` is told of each, and the records after it are still returned; without
    `on_corrupt` it raises JournalCorrupt, so damage is never a silent end of a replay."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return  # rotated away while we were getting to it
    with f:
        offset = 0
        while True:
            head = f.read(RECORD.size)
            if not head:
                return
            record, whole = _record(head, f)
            if record is None:
                f.seek(offset)
                rest = f.read()
                found = _resync(rest)
                if found is not None:
                    skipped, what = found, "followed by whole records"
                elif whole is None or _zero_filled(rest, offset):
                    return  # a torn or unfinished tail
                else:
                    skipped, what = whole, "a record whose whole length is there but whose CRC or layout is wrong"
                _corrupt(path, offset, skipped, what, on_corrupt)
                offset += skipped
                f.seek(offset)
                continue
            seq, body = record
            size = RECORD.size + len(body)
            frames = _split(body)
            if check_seq:
                given = _body_seq(seq, frames)
                if given is not None:
                    _corrupt(
                        path, offset, size, f"a record whose header seq {seq} is not its result's {given}", on_corrupt
                    )
                    offset += size
                    continue
            offset += size
            yield offset, seq, frames


def _zero_filled(rest: bytes, offset: int) -> bool:
    """Whether `rest` (the file from `offset` on) ends in zeros from a page boundary on: the file's size reached the
    disk before its last pages did (a power cut on a file system that allocates before it writes). A flipped bit
    leaves no page of zeros; a page is the least that writeback writes."""
    zeros_from = offset + len(rest.rstrip(b"\0"))
    boundary = -(-zeros_from // PAGE) * PAGE
    return boundary < offset + len(rest)


def _corrupt(path: Path, offset: int, skipped: int, what: str, on_corrupt: OnCorrupt | None) -> None:
    if on_corrupt is None:
        raise JournalCorrupt(
            f"journal segment {path}: {skipped} corrupt bytes at offset {offset} ({what}), expected only whole records"
        )
    on_corrupt(path, offset, skipped)


def _body_seq(seq: int, frames: list[bytes]) -> int | None:
    """The seq of the result in a record's body where it is not `seq` (its header's), None where they agree or the
    body gives none (not a result header: the decoder refuses it, as it refuses any message it cannot read)."""
    if len(frames) < 2:
        return None
    header = frames[1]
    found = _BODY_SEQ.search(header)
    if found is not None and int(found.group(1)) == seq:
        return None
    try:
        doc = wirejson.loads(header, "journal record header", "a result header")
    except MessageError:
        return None
    given = doc.get("seq") if isinstance(doc, dict) else None
    return given if type(given) is int and given != seq else None


def _record(head: bytes, f) -> tuple[tuple[int, bytes] | None, int | None]:
    """The (seq, body) of the record whose header is `head`, the body read from `f`, or None if it is not whole; and
    where it is not, its size when all of its declared length was there (damage, not a write cut short)."""
    if len(head) < RECORD.size:
        return None, None
    magic, length, seq, crc = RECORD.unpack(head)
    if magic != MAGIC or length > MAX_BODY:
        return None, None
    body = f.read(length)
    if len(body) < length:
        return None, None
    if zlib.crc32(body) != crc or not _well_formed(body):
        return None, RECORD.size + length
    return (seq, body), None


def _resync(data: bytes) -> int | None:
    """Offset in `data` (which starts at a bad record) of the next whole record, or None when none follows."""
    at = data.find(MAGIC, 1)
    while at >= 0:
        if at + RECORD.size <= len(data):
            _, length, _, crc = RECORD.unpack_from(data, at)
            body = data[at + RECORD.size : at + RECORD.size + length]
            if length <= MAX_BODY and len(body) == length and zlib.crc32(body) == crc and _well_formed(body):
                return at
        at = data.find(MAGIC, at + 1)
    return None


def _well_formed(body: bytes) -> bool:
    """The body holds at least one frame (the writer never journals fewer) and its frame lengths add up to its size
    (a CRC match on garbage is possible, a matching layout is not)."""
    if len(body) < COUNT.size:
        return False
    (count,) = COUNT.unpack_from(body, 0)
    if count < 1:
        return False
    at = COUNT.size
    for _ in range(count):
        if at + LENGTH.size > len(body):
            return False
        (n,) = LENGTH.unpack_from(body, at)
        at += LENGTH.size + n
    return at == len(body)


def _split(body: bytes) -> list[bytes]:
    view = memoryview(body)
    (count,) = COUNT.unpack_from(view, 0)
    at = COUNT.size
    frames = []
    for _ in range(count):
        (n,) = LENGTH.unpack_from(view, at)
        at += LENGTH.size
        frames.append(bytes(view[at : at + n]))
        at += n
    return frames


def encode_record(seq: int, frames: list) -> bytes:
    parts = [COUNT.pack(len(frames))]
    for frame in frames:
        data = bytes(frame)
        parts.append(LENGTH.pack(len(data)))
        parts.append(data)
    body = b"".join(parts)
    return RECORD.pack(MAGIC, len(body), seq, zlib.crc32(body)) + body


def check_camera(camera: str) -> None:
    if not isinstance(camera, str) or not CAMERA_RE.fullmatch(camera):
        raise JournalError(f"journal camera {camera!r}: expected a camera id of characters {CAMERA_RE.pattern}")


def read_since(
    directory: str | Path,
    camera: str,
    seq: int,
    on_corrupt: OnCorrupt | None = None,
    on_rotated: Callable[[Path], None] | None = None,
) -> Iterator[tuple[int, list[bytes]]]:
    """(seq, frames) of every journalled result of `camera` with a seq greater than `seq`, in order, read as it
    goes (one record in memory at a time), so a long replay costs no more memory than a short one.

    Works on a journal another process is writing: a record still being written ends the iteration. Corruption
    inside a segment goes to `on_corrupt` (see read_records), or raises JournalCorrupt without one. What rotation took
    is told to `on_rotated(path)`, its results a gap whose reason is rotation, not loss in transit: a segment the
    writer deleted after this listing found it (its path), and results after `seq` older than the oldest segment
    listed (that segment's path). Both come from this one listing: a second one, made before or after, can see
    another rotation and disagree with what is read."""
    check_camera(camera)
    segments = segment_files(Path(directory) / camera)
    if segments and segments[0][0] > seq + 1 and on_rotated is not None:
        on_rotated(segments[0][1])
    # Skip whole segments that end before `seq`: a segment ends where the next one begins.
    start = 0
    for i in range(len(segments) - 1):
        if segments[i + 1][0] <= seq + 1:
            start = i + 1
    for _, path in segments[start:]:
        read = False
        for _, record_seq, frames in read_records(path, on_corrupt):
            read = True
            if record_seq > seq:
                yield record_seq, frames
        if not read and on_rotated is not None and not path.exists():
            on_rotated(path)


def cameras(directory: str | Path) -> list[str]:
    """Camera ids that have a journal under `directory`; JournalError where it cannot be listed."""
    try:
        return sorted(e.name for e in os.scandir(directory) if e.is_dir() and CAMERA_RE.fullmatch(e.name))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _unreadable(Path(directory), Path(directory), exc) from exc


def check_readable(directory: str | Path, only: list[str] | None = None) -> None:
    """JournalError, naming what and why, where `directory` is not a journal directory this user can read: the
    directory (or a folder above it), a camera's folder or a segment in it, of the cameras `only` (default every
    camera), or a directory not laid out as a journal (the state dir above it). What a reader checks before it relies
    on the journal: the writer makes it group-readable, so the usual cause is a user outside the service user's
    group."""
    directory = Path(directory)
    try:
        is_dir = stat.S_ISDIR(os.stat(directory).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as exc:  # a folder above it this user may not enter: is_dir() would raise, or say False
        raise _unreadable(directory, directory, exc) from None
    if not is_dir:
        raise JournalError(f"journal {directory}: not a directory, expected the daemon's journal directory")
    found = cameras(directory)
    if not _looks_like_journal(directory, found):
        # Any directory would otherwise do, its sub-folders taken for cameras: the state dir above the journal (an
        # easy slip) replays nothing, and the results it was meant to fill in look like the start of the stream.
        raise JournalError(
            f"journal {directory}: not a journal directory (no {BOOT_MARK} mark, no camera folder with segments), "
            f"expected the daemon's publish.journal.path (by default <state_dir>/journal)"
        )
    for camera in found:
        if only is not None and camera not in only:
            continue
        try:
            segments = segment_files(directory / camera)
        except OSError as exc:
            raise _unreadable(directory, directory / camera, exc) from None
        for _, path in segments:
            try:
                os.close(os.open(path, os.O_RDONLY))
            except FileNotFoundError:
                pass  # rotated away meanwhile
            except OSError as exc:
                raise _unreadable(directory, path, exc) from None


def _looks_like_journal(directory: Path, found: list[str]) -> bool:
    """Whether `directory` is laid out as the writer lays out a journal: empty (just made, or a freshly formatted
    disk's mount point, before the disk took its boot mark, or on a machine without a boot id), or holding the boot
    or clean mark, or a camera folder with a segment or a mark in it."""
    try:
        with os.scandir(directory) as entries:
            names = {e.name for e in entries}
    except OSError as exc:
        raise _unreadable(directory, directory, exc) from None
    # A journal on a disk of its own before the daemon's first start holds the filesystem's lost+found alone.
    if not names - {"lost+found"} or BOOT_MARK in names or CLEAN_MARK in names:
        return True
    for camera in found:
        try:
            with os.scandir(directory / camera) as entries:
                if any(e.name in (ACCEPTED_MARK, RESERVED_MARK) or SEGMENT_RE.fullmatch(e.name) for e in entries):
                    return True
        except FileNotFoundError:
            continue
        except OSError:
            return True  # a camera folder this user may not list: check_readable names it where it matters
    return False


def _unreadable(directory: Path, path: Path, exc: OSError) -> JournalError:
    what = "it" if path == directory else path.relative_to(directory).as_posix()
    return JournalError(
        f"journal {directory}: cannot read {what} ({exc.strerror or exc}), expected a journal this user may read "
        f"(as the daemon's user or a member of its group)"
    )


# A mark more than this past the camera's last journalled seq is damage (a flipped bit), not seqs given out: at 1000
# frames a second that is 50 days of results published while not one was journalled. So is one past MAX_MARK, where
# the numbering would have no room left for its reservations in the marks' signed 64 bits.
MARK_SLACK = 1 << 32
MAX_MARK = 1 << 62


def mark_damage(mark: int, last: int | None) -> str | None:
    """Why `mark` (a camera's accepted or reserved mark) cannot be seqs given out, where `last` is the last seq
    journalled for the camera (None: none): below -1, past MAX_MARK, or more than MARK_SLACK past `last`. None where
    it may be right. The writer and the PLC bridge judge a mark by this one rule."""
    if mark < -1:
        return "below -1"
    if mark > MAX_MARK:
        return f"past {MAX_MARK}, leaving no room for the numbering"
    if last is not None and mark > last + MARK_SLACK:
        return f"{mark - last} past the last seq journalled ({last})"
    return None


def read_mark(camera_dir: Path, name: str) -> int | None:
    """A camera's ACCEPTED_MARK or RESERVED_MARK, None where there is none (or one cut short); OSError where it
    cannot be read."""
    try:
        mark = (camera_dir / name).read_bytes()
    except FileNotFoundError:
        return None
    return ACCEPTED.unpack(mark)[0] if len(mark) == ACCEPTED.size else None


def oldest_seq(directory: str | Path, camera: str) -> int | None:
    """The first seq still held for `camera` (older ones were rotated away), or None when there is none."""
    check_camera(camera)
    for _, path in segment_files(Path(directory) / camera):
        for _, seq, _ in read_records(path, on_corrupt=lambda *_: None):
            return seq
    return None


def newest_seq(directory: str | Path, camera: str) -> int | None:
    """The last seq journalled for `camera` (read from its newest segment that holds a record), or None when there
    is none. A torn tail is not a record; corruption inside the segment is skipped."""
    check_camera(camera)
    for _, path in reversed(segment_files(Path(directory) / camera)):
        last = None
        for _, seq, _ in read_records(path, on_corrupt=lambda *_: None):
            last = seq
        if last is not None:
            return last
    return None
