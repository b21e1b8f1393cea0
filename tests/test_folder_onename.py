"""A folder camera that saves every part under one name, and the folder counters in its camera's status."""

from __future__ import annotations

import os
import queue as queues
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from engines.data.synthline import SyntheticLine
from inspectd.clients.ctl import _status as status_text
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest, make_source
from inspectd.daemon.metrics import Metrics
from test_ingest import camera, drain, start, wait_for
from test_metrics_endpoint import scrape

pytestmark = pytest.mark.timeout(60)

# Called with every audit event while a test has one here: the real listings, opens and unlinks of the camera's thread
# are held at their start while a test's writer acts, so which of them sees which part is known, with no timing.
# An audit hook cannot be removed, so it is installed once and does nothing while the list is empty.
HOOKS: list[Callable[[str, tuple], None]] = []


def _run_hooks(event: str, args: tuple) -> None:
    for hook in list(HOOKS):
        hook(event, args)


sys.addaudithook(_run_hooks)


class OneCamera:
    """The daemon's side of a metrics scrape, for one camera's ingest."""

    def __init__(self, ingest: CameraIngest) -> None:
        self.ingest = ingest

    def status(self) -> dict:
        return {"cameras": {"cam0": self.ingest.stats()}}


def _path(args: tuple) -> str | None:
    return os.fspath(args[0]) if args and isinstance(args[0], (str, os.PathLike)) else None


class Turns:
    """The camera's listings of `folder` and its opens of `name` there, each held at its start until the writer has
    taken its turn (10 s at most)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.file = str(folder), str(folder / name)
        self.events: queues.Queue[str] = queues.Queue()
        self.turn = threading.Semaphore(0)
        self.over = threading.Event()

    def __call__(self, event: str, args: tuple) -> None:
        if self.over.is_set() or threading.current_thread().name != "ingest-cam0":
            return
        held = {"os.scandir": self.folder, "open": self.file}.get(event)
        if held is None or _path(args) != held:
            return
        self.events.put("listing" if event == "os.scandir" else "open")
        self.turn.acquire(timeout=10)

    def next(self) -> str:
        return self.events.get(timeout=10)

    def end(self) -> None:
        self.over.set()
        self.turn.release()  # a listing or open that came in as the writer finished


# What becomes of a part: replaced at the listing after the first that saw it, before it could hold still over a
# poll; read (the second listing finds it still) and replaced at the listing after; replaced as its read opens it.
LOST, READ, LOST_AS_READ = "lost", "read", "lost as read"


def test_parts_renamed_into_place_under_one_name_faster_than_the_poll_are_each_published_or_counted_lost(
    tmp_path, ingest_threads
):
    """A camera saving every part as current.png faster than about two polls lost parts with nothing counted or logged
    (a review: 11 of 20 at 0.15 s a part, poll_ms 100). Each part renamed into place is a new file: one replaced
    before it was read is counted in the camera's status, at a listing or at the read itself, and the run of losses is
    logged once. A writer thread replaces each part at a set listing or read of the camera's, so every part written is
    either published or counted."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    line = SyntheticLine(32, 32, seed=11)
    fates = [LOST, LOST, READ, LOST_AS_READ, READ, LOST, LOST_AS_READ, LOST, READ]
    parts = [line.next()[0] for _ in fates]
    current, tmp = inbox / "current.png", inbox / "current.png.tmp"  # the writer's own name is never read
    turns = Turns(inbox, "current.png")
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            at, count = "listing", 1  # the first part goes in at the camera's first listing
            first_mtime = time.time_ns() - len(parts) * 10**9
            for i, (part, fate) in enumerate(zip(parts, fates)):
                tmp.write_bytes(cv2.imencode(".png", part)[1].tobytes())
                mtime = first_mtime + i * 10**9  # one of its own, whatever the grain of the filesystem's times
                os.utime(tmp, ns=(mtime, mtime))
                while True:
                    if turns.next() == at:
                        count -= 1
                    if count == 0:
                        break
                    turns.turn.release()
                os.replace(tmp, current)
                turns.turn.release()
                # The listings that see the part: from this one when it went in at a listing, from the next at an open.
                first = 0 if at == "listing" else 1
                if fate == LOST_AS_READ:
                    at, count = "open", 1
                else:
                    at, count = "listing", first + (1 if fate == LOST else 2)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failed.append(exc)
        finally:
            turns.end()

    queue = FrameQueue(16, "block")
    thread = threading.Thread(target=writer, name="writer", daemon=True)
    HOOKS.append(turns)
    try:
        with capture_logs() as logs:
            ingest = start(ingest_threads, camera({"kind": "folder", "path": str(inbox), "poll_ms": 20}), queue)
            thread.start()
            thread.join(30)
            assert not thread.is_alive() and not failed, failed
            read = [part for part, fate in zip(parts, fates) if fate == READ]
            assert wait_for(lambda: len(queue) == len(read))
            time.sleep(0.1)  # five polls more: no part comes twice
            frames = drain(queue)
            assert [f.frame_id for f in frames] == ["current.png"] * len(read)
            assert [np.array_equal(f.image, part) for f, part in zip(frames, read)] == [True] * len(read)
            stats = ingest.stats()
            assert len(frames) + stats["replaced_unread"] == len(parts), stats
            assert stats["replaced_unread"] == len(parts) - len(read) and stats["disposal_backlog"] == 0
    finally:
        turns.end()
        HOOKS.remove(turns)
    lost = [e for e in logs if e["event"] == "folder_file_replaced_unread"]
    assert len(lost) == 1, logs  # a run of losses, said once
    assert lost[0]["file"] == "current.png" and lost[0]["replaced_unread"] == 1 and lost[0]["log_level"] == "warning"


def test_a_part_rewritten_in_place_before_it_was_read_is_not_counted_lost(tmp_path, ingest_threads):
    """A file written again in place (the same inode) cannot be told from one still being written: the part it held
    before is lost uncounted, as the docs say, and never counted on a guess."""
    line = SyntheticLine(32, 32, seed=12)
    parts = [line.next()[0], line.next()[0]]
    current = tmp_path / "current.png"
    turns = Turns(tmp_path, "current.png")
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            for i, part in enumerate(parts):  # at the camera's first listing, then again at its second
                assert turns.next() == "listing"
                with open(current, "r+b" if i else "wb") as f:
                    f.truncate()
                    f.write(cv2.imencode(".png", part)[1].tobytes())
                os.utime(current, ns=(10**18 + i, 10**18 + i))
                turns.turn.release()
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failed.append(exc)
        finally:
            turns.end()

    queue = FrameQueue(8, "block")
    thread = threading.Thread(target=writer, name="writer", daemon=True)
    HOOKS.append(turns)
    try:
        ingest = start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 20}), queue)
        thread.start()
        thread.join(30)
        assert not thread.is_alive() and not failed, failed
        assert wait_for(lambda: len(queue) == 1)
        time.sleep(0.1)  # five polls more: no part comes twice
        frames = drain(queue)
    finally:
        turns.end()
        HOOKS.remove(turns)
    assert len(frames) == 1 and np.array_equal(frames[0].image, parts[1])
    assert ingest.stats()["replaced_unread"] == 0


def test_the_files_waiting_to_be_deleted_are_in_the_camera_status(tmp_path, ingest_threads):
    """The disposal backlog was only logged, once (folder_disposal_backlog): the status says how many files wait to
    be deleted or moved, while a share stalls and after it catches up."""
    inbox = tmp_path / "in"
    paths = SyntheticLine(32, 32, seed=13).write_folder(inbox, 3)
    gate = threading.Event()
    stalled = str(paths[0])

    def stall(event: str, args: tuple) -> None:
        if event == "os.remove" and _path(args) == stalled:
            gate.wait(10)  # the real unlink held up, as on a share that stalls

    queue = FrameQueue(8, "block")
    source = {"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True}
    ingest = start(ingest_threads, camera(source), queue)
    assert wait_for(lambda: len(queue) == 3)
    HOOKS.append(stall)
    try:
        for frame in drain(queue):
            frame.on_published()
        assert wait_for(lambda: ingest.stats()["disposal_backlog"] == 3)
        time.sleep(0.1)  # five polls: still held up
        assert ingest.stats()["disposal_backlog"] == 3 and len(list(inbox.glob("*.png"))) == 3
        # Where an operator looks: the metrics endpoint's gauge and `inspectd status`'s camera lines.
        metrics = Metrics(("127.0.0.1", 0), OneCamera(ingest))
        try:
            samples, _ = scrape(metrics.url)
        finally:
            metrics.stop()
        assert samples[("inspectd_folder_disposal_backlog", (("camera", "cam0"),))] == 3
        assert samples[("inspectd_folder_replaced_unread_total", (("camera", "cam0"),))] == 0
        shown = status_text({"cameras": {"cam0": ingest.stats()}})
        assert "0 parts replaced under their name unread (lost), 3 files waiting to be deleted or moved" in shown
    finally:
        gate.set()
        HOOKS.remove(stall)
    assert wait_for(lambda: ingest.stats()["disposal_backlog"] == 0)
    assert not list(inbox.glob("*.png"))


def test_a_writer_that_stages_each_part_under_one_name_then_renames_it_loses_none(tmp_path):
    """A unique-name camera that writes each part under one staging name the pattern matches, then renames it to its
    own: the staging name's file is replaced at every part, but the part it held is listed under its new name, so
    nothing is counted lost (it was counted, and logged as parts never inspected)."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    cam = camera({"kind": "folder", "path": str(inbox), "pattern": "*.bmp", "delete_after": True})
    source = make_source(cam, time.time)
    stop = threading.Event()
    source.open(stop)
    rng = np.random.default_rng(0)
    parts = [cv2.imencode(".bmp", rng.integers(0, 255, (64, 64), np.uint8))[1].tobytes() for _ in range(7)]
    stage = inbox / "capture.bmp"
    read: list[str] = []

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            frame = source.read(stop)
            if frame is not None:
                read.append(frame.frame_id)
                if frame.on_published:
                    frame.on_published()

    def start_part(i: int):
        staged = open(stage, "wb")  # noqa: SIM115 - held open across listings, as a writer does
        staged.write(parts[i][:2000])
        staged.flush()
        return staged

    try:
        with capture_logs() as logs:
            staged = start_part(0)
            for i in range(6):
                pump(0.25)  # listings see the staging file half written
                staged.write(parts[i][2000:])
                staged.close()
                os.rename(stage, inbox / f"part_{i}.bmp")
                staged = start_part(i + 1)  # a new file under the staging name
            staged.close()
            stage.unlink()
            assert wait_for(lambda: (pump(0.1), len([n for n in read if n.startswith("part_")]) == 6)[1])
        assert source.stats()["replaced_unread"] == 0
        assert not [e for e in logs if e["event"] == "folder_file_replaced_unread"]
    finally:
        stop.set()
        source.close()


def _pumped(source, stop: threading.Event, frames: list, count: int | None = None, seconds: float = 0.3) -> None:
    """Read the camera until `frames` holds `count` (within 10 s: a loaded machine's polls come late), then for
    `seconds` more (a dozen polls), keeping each frame."""
    deadline = time.monotonic() + 10
    while count is not None and len(frames) < count and time.monotonic() < deadline:
        frame = source.read(stop)
        if frame is not None:
            frames.append(frame)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        frame = source.read(stop)
        if frame is not None:
            frames.append(frame)


def _save_as_one_name(folder: Path, data: bytes, mtime_ns: int) -> None:
    """A camera's save: written under a name the folder never reads, stamped, renamed into place as current.bmp."""
    staged = folder / "current.bmp.tmp"
    staged.write_bytes(data)
    os.utime(staged, ns=(mtime_ns, mtime_ns))
    os.replace(staged, folder / "current.bmp")


def _bmps(count: int, seed: int) -> list[bytes]:
    """Parts of one resolution: BMPs of one size, as a fixed-resolution camera saves them."""
    rng = np.random.default_rng(seed)
    parts = [cv2.imencode(".bmp", rng.integers(0, 255, (48, 64), np.uint8))[1].tobytes() for _ in range(count)]
    assert len({len(p) for p in parts}) == 1
    return parts


def test_parts_under_one_name_with_whole_second_times_are_each_read(tmp_path):
    """Where times have whole seconds (FAT, ext3, an uploader that sets them so), parts of one resolution renamed into
    place under one name have one size and mtime: the second and later in a second were never read, with nothing
    counted (a review: 1 of 3 parts 0.6 s apart). Each new file under the name is a new part."""
    cam = camera({"kind": "folder", "path": str(tmp_path), "pattern": "*.bmp", "poll_ms": 20})
    source = make_source(cam, time.time)
    stop = threading.Event()
    source.open(stop)
    parts = _bmps(3, 1)
    second = (time.time_ns() // 10**9) * 10**9
    frames: list = []
    try:
        for n, part in enumerate(parts, 1):
            _save_as_one_name(tmp_path, part, second)
            _pumped(source, stop, frames, count=n)
    finally:
        stop.set()
        source.close()
    decoded = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_GRAYSCALE) for p in parts]
    assert [f.frame_id for f in frames] == ["current.bmp"] * 3
    assert [np.array_equal(f.image, d) for f, d in zip(frames, decoded)] == [True] * 3
    assert source.stats()["replaced_unread"] == 0


def test_delete_after_never_deletes_the_next_part_saved_under_the_name_with_the_same_time(tmp_path):
    """The disposer compared only the mtime: a part renamed into place under the name while the part before's result
    was computed, in the same second and of the same size, was deleted unread. A file is deleted only while it is
    still the one read; the next part stays, is read, and is deleted once its own result is out."""
    cam = camera({"kind": "folder", "path": str(tmp_path), "pattern": "*.bmp", "poll_ms": 20, "delete_after": True})
    source = make_source(cam, time.time)
    stop = threading.Event()
    source.open(stop)
    parts = _bmps(2, 2)
    second = (time.time_ns() // 10**9) * 10**9
    frames: list = []
    try:
        with capture_logs() as logs:
            _save_as_one_name(tmp_path, parts[0], second)
            _pumped(source, stop, frames, count=1)
            assert len(frames) == 1
            _save_as_one_name(tmp_path, parts[1], second)  # before part 1's result is out
            frames[0].on_published()
            assert wait_for(lambda: source.stats()["disposal_backlog"] == 0)
            assert (tmp_path / "current.bmp").read_bytes() == parts[1]
            _pumped(source, stop, frames, count=2)
            assert len(frames) == 2
            frames[1].on_published()
            assert wait_for(lambda: not (tmp_path / "current.bmp").exists())
    finally:
        stop.set()
        source.close()
    decoded = cv2.imdecode(np.frombuffer(parts[1], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(frames[1].image, decoded)
    assert [e["event"] for e in logs if e["event"] == "folder_file_rewritten"] == ["folder_file_rewritten"]


@pytest.mark.parametrize("delete_after", [False, True])
def test_a_file_a_share_gives_a_new_number_is_neither_read_again_nor_kept_from_deletion(tmp_path, delete_after):
    """A share that numbers files itself (CIFS noserverino, FUSE without use_ino) may give a file a new inode number
    after a while: the same size, mtime and content under a new number is the file read before. It is not judged a
    second time, and, read before its result went out, is still deleted then. A copy of it under a new inode stands
    in for the renumbered file."""
    source_cfg = {"kind": "folder", "path": str(tmp_path), "pattern": "*.bmp", "poll_ms": 20}
    source = make_source(camera({**source_cfg, "delete_after": delete_after}), time.time)
    stop = threading.Event()
    source.open(stop)
    (part,) = _bmps(1, 3)
    second = (time.time_ns() // 10**9) * 10**9
    frames: list = []
    try:
        _save_as_one_name(tmp_path, part, second)
        _pumped(source, stop, frames, count=1)
        inode = (tmp_path / "current.bmp").stat().st_ino
        _save_as_one_name(tmp_path, part, second)  # renumbered: the same bytes and times, another inode
        assert (tmp_path / "current.bmp").stat().st_ino != inode
        _pumped(source, stop, frames)
        assert len(frames) == 1
        if delete_after:
            frames[0].on_published()
            assert wait_for(lambda: not (tmp_path / "current.bmp").exists())
    finally:
        stop.set()
        source.close()
    assert source.stats()["replaced_unread"] == 0


@pytest.mark.parametrize("when", ["left in place", "before its deletion"])
def test_a_file_too_large_to_read_is_judged_once_whatever_touches_its_change_time(tmp_path, when):
    """A file judged by its size alone has no content to compare: a chmod or a backup's hard link (a new change time)
    made it a new file, judged a second time under a new seq, and before its deletion a false rewritten warning."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    big = inbox / "big.png"
    big.write_bytes(cv2.imencode(".png", np.full((16, 16), 128, np.uint8))[1].tobytes() + bytes(70000))
    spec = {"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": when == "before its deletion"}
    source = make_source(camera(spec, max_pixels=100))
    stop = threading.Event()
    source.open(stop)
    errors = []
    try:
        with capture_logs() as logs:
            deadline, settled = time.monotonic() + 10, None
            while time.monotonic() < (deadline if settled is None else settled):
                frame = source.read(stop)
                if frame is not None:
                    errors.append(frame.error)
                    os.chmod(big, 0o640)  # a new change time, before the next listing and before the deletion
                    if frame.on_published is not None:
                        frame.on_published()
                    settled = time.monotonic() + 0.5  # a dozen polls more: no second result
                time.sleep(0.02)
            if when == "before its deletion":
                assert wait_for(lambda: not big.exists())
    finally:
        stop.set()
        source.close()
    assert len(errors) == 1 and errors[0].startswith("big.png: 70"), errors
    assert big.exists() == (when == "left in place")
    assert not [e for e in logs if e["event"] == "folder_file_rewritten"], logs


def test_a_part_read_whose_change_time_moves_before_the_next_replaces_it_is_not_counted_lost(tmp_path):
    """A backup's hard link changes a read part's ctime only: when the next part then took the name, the read part
    was counted replaced_unread, with a warning telling the operator to save parts more slowly."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    source = make_source(camera({"kind": "folder", "path": str(inbox), "poll_ms": 20}))
    stop = threading.Event()
    source.open(stop)
    levels: list[int] = []

    def part(level: int) -> None:
        staged = inbox / "cur.png.tmp"
        staged.write_bytes(cv2.imencode(".png", np.full((8, 8), level, np.uint8))[1].tobytes())
        os.replace(staged, inbox / "cur.png")

    def pump(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            frame = source.read(stop)
            if frame is None:
                time.sleep(0.005)
            else:
                levels.append(int(frame.image.max()))

    try:
        with capture_logs() as logs:
            part(10)
            pump(0.3)
            os.link(inbox / "cur.png", tmp_path / "backup.png")
            source._scan()  # a listing sees the read part with its new ctime, as the ingest loop's next one would
            part(20)
            pump(0.3)
    finally:
        source.close()
    assert levels == [10, 20] and source.stats()["replaced_unread"] == 0, (levels, source.stats())
    assert not [e for e in logs if e["event"] == "folder_file_replaced_unread"], logs


def test_the_next_part_renamed_in_over_one_too_large_to_read_is_judged_and_kept_until_then(tmp_path):
    """Judged by its size alone, a part has no content to compare: the next part renamed into its name in the same
    second with the same size was deleted unjudged in its place."""
    inbox = tmp_path / "in"
    inbox.mkdir()

    def part(fill: int) -> None:
        staged = inbox / "cur.png.tmp"
        staged.write_bytes(bytes([fill]) * 70000)
        os.utime(staged, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))  # whole seconds, as a share gives
        os.replace(staged, inbox / "cur.png")

    part(1)
    spec = {"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True}
    source = make_source(camera(spec, max_pixels=100))
    stop = threading.Event()
    source.open(stop)
    errors = []
    try:
        deadline = time.monotonic() + 10
        while len(errors) < 2 and time.monotonic() < deadline:
            frame = source.read(stop)
            if frame is not None:
                errors.append(frame.error)
                if len(errors) == 1:
                    part(2)  # another file, same size and mtime, before the first one's result is out
                frame.on_published()
            time.sleep(0.02)
        assert wait_for(lambda: not (inbox / "cur.png").exists())
    finally:
        stop.set()
        source.close()
    assert len(errors) == 2 and all(e.startswith("cur.png: 70000 bytes") for e in errors), errors
    assert not (inbox / "cur.png").exists()
