"""Camera ingest against real things: files in a tmp folder, a real ZeroMQ PUSH socket, a real MJPG video file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from structlog.testing import capture_logs

from engines.data.synthline import SyntheticLine
from engines.errors import DataError
from inspectd.daemon.config import parse_config
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.headers import encoded_dims
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from other_user import NOBODY, REPO, as_nobody
from tiny_dataset import good_images

FAST_BACKOFF = (0.05, 0.2)

pytestmark = pytest.mark.timeout(60)


def camera(source: dict, **extra):
    return parse_config(
        {"station": "s", "model": {"bundle": "b"}, "cameras": [{"id": "cam0", "source": source, **extra}]}
    ).cameras[0]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def drain(queue: FrameQueue) -> list[Frame]:
    frames = []
    while (frame := queue.get_nowait()) is not None:
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """Four real grayscale JPEGs of varying sizes (magnetic tiles, or the synthetic line's, see tiny_dataset)."""
    return good_images(tmp_path_factory.mktemp("jpegs"), 4)


def start(ingest_threads, cam, queue, **kwargs) -> CameraIngest:
    ingest = CameraIngest(cam, queue, backoff_s=FAST_BACKOFF, **kwargs)
    ingest_threads.append(ingest)
    ingest.start()
    return ingest


def frame(i: int) -> Frame:
    return Frame("cam0", i, str(i), 0.0, None)


# --- the queue ------------------------------------------------------------------------------------------------------


def test_drop_oldest_keeps_newest_counts_drops_and_notifies():
    ready = threading.Condition()
    queue = FrameQueue(3, "drop_oldest", ready)
    woken = []

    def waiter():
        with ready:
            woken.append(ready.wait_for(lambda: len(queue) > 0, timeout=5))

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    for i in range(5):
        assert queue.put(frame(i))
    thread.join(5)
    assert woken == [True]
    assert queue.dropped == 2 and len(queue) == 3
    assert [f.seq for f in drain(queue)] == [2, 3, 4]
    assert queue.get_nowait() is None and len(queue) == 0


def test_block_waits_for_room_and_gives_up_on_stop():
    queue = FrameQueue(2, "block")
    queue.put(frame(0))
    queue.put(frame(1))
    done = threading.Event()
    results = []

    def producer():
        results.append(queue.put(frame(2)))
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    assert not done.wait(0.3), "put returned while the queue was full"
    assert queue.get_nowait().seq == 0
    assert done.wait(5) and results == [True]
    assert [f.seq for f in drain(queue)] == [1, 2] and queue.dropped == 0

    queue.put(frame(3))
    queue.put(frame(4))
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    t0 = time.monotonic()
    assert queue.put(frame(5), stop) is False
    assert 0.15 < time.monotonic() - t0 < 3
    assert len(queue) == 2


def image_frame(i: int, nbytes: int) -> Frame:
    return Frame("cam0", i, str(i), 0.0, np.zeros(nbytes, np.uint8))


def test_the_queue_holds_no_more_image_bytes_than_its_bound_under_either_policy():
    """Bounded by its frame count alone, a camera of 50 MP colour frames could hold 64 x 150 MB."""
    queue = FrameQueue(64, "drop_oldest", max_bytes=1000)
    for i in range(5):
        assert queue.put(image_frame(i, 300))
    assert [len(queue), queue.bytes, queue.dropped] == [3, 900, 2]
    assert queue.put(Frame("cam0", 5, "5", 0.0, None))  # an error frame holds no image: it always fits
    assert queue.put(image_frame(6, 5000))  # larger than the bound on its own: taken once it is alone
    assert [len(queue), queue.bytes, queue.dropped] == [1, 5000, 6]
    assert [f.seq for f in drain(queue)] == [6] and queue.bytes == 0

    queue = FrameQueue(64, "block", max_bytes=1000)
    for i in range(3):
        assert queue.put(image_frame(i, 300))
    done = threading.Event()
    threading.Thread(target=lambda: queue.put(image_frame(3, 300)) and done.set(), daemon=True).start()
    assert not done.wait(0.3), "put returned with the bytes queued past the bound"
    assert queue.get_nowait().seq == 0
    assert done.wait(5)
    assert [f.seq for f in drain(queue)] == [1, 2, 3] and queue.dropped == 0 and queue.bytes == 0


def test_bad_queue_arguments():
    with pytest.raises(ValueError, match="queue policy"):
        FrameQueue(4, "lifo")
    with pytest.raises(ValueError, match="queue size"):
        FrameQueue(0)


# --- folder ---------------------------------------------------------------------------------------------------------


def test_folder_picks_up_real_jpegs_in_arrival_order_each_once(tmp_path, ingest_threads, jpegs):
    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    sources = jpegs
    # Arrival order (mtime) deliberately opposite to name order; two files share an mtime, so name breaks the tie.
    names = ["d.jpg", "c.jpg", "b.jpg", "a.jpg"]
    base = time.time() - 100
    for i, (src, name) in enumerate(zip(sources, names)):
        shutil.copy(src, inbox / name)
        stamp = base + min(i, 2)
        os.utime(inbox / name, (stamp, stamp))
    (inbox / "empty.jpg").write_bytes(b"")
    os.utime(inbox / "empty.jpg", (base + 10, base + 10))
    (inbox / "notes.txt").write_text("not an image")

    queue = FrameQueue(16, "block")
    cam = camera({"kind": "folder", "path": str(inbox), "pattern": "*.jpg", "poll_ms": 20, "done_dir": str(done)})
    ingest = start(ingest_threads, cam, queue, first_seq=100)
    assert wait_for(lambda: len(queue) == 5)
    time.sleep(0.2)  # more polls: nothing is picked up twice
    frames = drain(queue)
    assert [f.frame_id for f in frames] == ["d.jpg", "c.jpg", "a.jpg", "b.jpg", "empty.jpg"]
    assert [f.seq for f in frames] == [100, 101, 102, 103, 104]
    for f, src in zip(frames[:4], sources[:2] + sources[3:4] + sources[2:3]):
        assert f.error is None and f.camera == "cam0"
        assert np.array_equal(f.image, cv2.imread(str(src), cv2.IMREAD_GRAYSCALE))
    assert frames[4].image is None and "empty (0 bytes)" in frames[4].error
    assert abs(frames[0].t_capture - base) < 1
    assert list(done.iterdir()) == [] and len(list(inbox.iterdir())) == 6  # nothing moved before its result
    # The empty file may be a writer's that paused before its first byte: it is never moved, it is read again once
    # written.
    assert frames[4].on_published is None
    for f in frames[:4]:
        f.on_published()  # what the publisher calls once each result is journalled and sent
    assert wait_for(lambda: len(list(done.iterdir())) == 4)
    assert sorted(p.name for p in done.iterdir()) == sorted(names)
    assert sorted(p.name for p in inbox.iterdir()) == ["empty.jpg", "notes.txt"]
    stats = ingest.stats()
    assert stats["frames_in"] == 5 and stats["errors"] == 1 and stats["state"] == "running"


def test_done_dir_keeps_every_part_of_a_name_and_leaves_a_file_rewritten_before_its_result(tmp_path, ingest_threads):
    """A camera that writes every part as current.png: each part moved to done_dir beside the earlier ones, none
    replaced. A file rewritten under its name after it was read and before its result went out holds content that
    was never inspected: it stays in the folder and is read again."""
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    line = SyntheticLine(32, 32, seed=6)
    parts = [line.next()[0] for _ in range(3)]
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(inbox), "poll_ms": 20, "done_dir": str(done)}), queue)
    for i, part in enumerate(parts[:2]):
        assert cv2.imwrite(str(inbox / "current.png"), part)
        os.utime(inbox / "current.png", (time.time() - 10 + i, time.time() - 10 + i))
        assert wait_for(lambda: len(queue) == 1)
        queue.get_nowait().on_published()
        assert wait_for(lambda n=i + 1: len(list(done.iterdir())) == n)
    kept = sorted(done.iterdir())
    assert len(kept) == 2 and kept[0].name == "current.png" and kept[1].name.startswith("current~")
    assert [np.array_equal(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), part) for p, part in zip(kept, parts)] == [1, 1]

    assert cv2.imwrite(str(inbox / "current.png"), parts[2])
    os.utime(inbox / "current.png", (time.time() - 5, time.time() - 5))
    assert wait_for(lambda: len(queue) == 1)
    read = queue.get_nowait()
    assert cv2.imwrite(str(inbox / "current.png"), parts[0])  # rewritten before the result of what was read
    with capture_logs() as logs:
        read.on_published()
        assert wait_for(lambda: logs)
    assert (inbox / "current.png").exists() and len(list(done.iterdir())) == 2
    assert [e["event"] for e in logs] == ["folder_file_rewritten"]
    assert wait_for(lambda: len(queue) == 1)
    assert np.array_equal(queue.get_nowait().image, parts[0])


# Run once, on the first rename into a watched path, before it happens: another camera's move at that instant.
# An audit hook cannot be removed, so it is installed once and does nothing while the dict is empty.
BEFORE_RENAME_TO: dict[str, list] = {}


def _before_rename_to(event: str, args: tuple) -> None:
    if event == "os.rename" and BEFORE_RENAME_TO:
        pending = BEFORE_RENAME_TO.get(os.fspath(args[1]))
        if pending:
            pending.pop()()


sys.addaudithook(_before_rename_to)


def test_two_cameras_moving_one_name_into_a_shared_done_dir_at_once_keep_both_parts(tmp_path):
    """Two cameras of one model write every part as current.bmp and share a done_dir. Camera B moves its part in
    after camera A found current.bmp free and before A's own rename: A's rename replaced B's part, the only copy of an
    inspected part. Either part is kept, under its own name."""
    from inspectd.daemon.ingest.folder import FolderWatcher, _stamp

    done = tmp_path / "done"
    cams = parse_config(
        {
            "station": "s",
            "model": {"bundle": "b"},
            "cameras": [
                {"id": f"cam{x}", "source": {"kind": "folder", "path": str(tmp_path / x), "done_dir": str(done)}}
                for x in "ab"
            ],
        }
    ).cameras
    parts = {}
    for x in "ab":
        (tmp_path / x).mkdir()
        parts[x] = tmp_path / x / "current.bmp"
        parts[x].write_bytes(f"part of camera {x}".encode())
    a, b = (FolderWatcher(cam, time.time) for cam in cams)
    done.mkdir()
    BEFORE_RENAME_TO[str(done / "current.bmp")] = [lambda: b._dispose(parts["b"], _stamp(os.stat(parts["b"])), None)]
    try:
        a._dispose(parts["a"], _stamp(os.stat(parts["a"])), None)
    finally:
        BEFORE_RENAME_TO.clear()
    assert not parts["a"].exists() and not parts["b"].exists()
    assert sorted(p.read_text() for p in done.iterdir()) == ["part of camera a", "part of camera b"]
    assert (done / "current.bmp").read_text() == "part of camera b"  # the first in keeps the name


def test_a_done_dir_files_cannot_be_moved_to_fails_the_camera_in_one_line(tmp_path, ingest_threads):
    """Checked at open with a real rename, not per file: another filesystem (or mount) fails every move, and the
    watched folder itself would hand each file back to the scan under a new name, forever. (The config refuses that
    at load; a symlink made after the load still leads there.)"""
    later = Path(tempfile.mkdtemp()) / "later"
    cam = camera({"kind": "folder", "path": str(tmp_path), "done_dir": str(later)})
    later.symlink_to(tmp_path)
    itself = start(ingest_threads, cam, FrameQueue(4, "block"))
    assert wait_for(lambda: itself.stats()["state"] == "failed")
    assert itself.stats()["last_error"] == f"done_dir {later}: the watched folder itself, expected another folder"
    shutil.rmtree(later.parent)
    if not os.access("/dev/shm", os.W_OK) or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip(f"no writable /dev/shm on another filesystem than {tmp_path} here")
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        cam = camera({"kind": "folder", "path": str(tmp_path), "done_dir": str(other / "done")})
        ingest = start(ingest_threads, cam, FrameQueue(4, "block"))
        assert wait_for(lambda: ingest.stats()["state"] == "failed")
        assert ingest.stats()["last_error"] == (
            f"done_dir {other / 'done'}: cannot move files there from {tmp_path} (Invalid cross-device link), "
            "expected a folder on the same filesystem and mount (files are moved by rename; under systemd, one "
            "ReadWritePaths= entry that holds both folders, as each entry is a mount of its own)"
        )
        assert [p.name for p in tmp_path.iterdir()] == [] and [p.name for p in (other / "done").iterdir()] == []
    finally:
        shutil.rmtree(other)


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` with no file to be made or deleted in it, by root too (root passes over modes: the immutable flag
    binds it); yields why a write there fails (strerror). Writable again after the block."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.geteuid() == 0 and shutil.which("chattr") is not None:
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        try:
            (folder / ".writable").touch()
        except OSError as exc:
            reason = exc.strerror
        else:
            (folder / ".writable").unlink()
            pytest.skip(f"{folder}: neither its mode nor chattr +i keeps this user from writing there")
        yield reason
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("key", ["delete_after", "done_dir"])
def test_a_folder_files_cannot_be_disposed_of_in_keeps_the_camera_reopening_in_one_line_until_it_can(
    tmp_path, ingest_threads, capsys, key
):
    """Checked at open on a hidden file, as the move to done_dir always was: a folder the daemon may not write (the
    capture software's, or one the systemd unit leaves read-only) used to give a camera `running` that logged an
    error at every part and left every file to be inspected again after a restart. Put right, the camera runs."""
    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    done.mkdir()
    SyntheticLine(32, 32, seed=3).write_folder(inbox, 2)
    source = {"kind": "folder", "path": str(inbox), "poll_ms": 20}
    source.update({"delete_after": True} if key == "delete_after" else {"done_dir": str(done)})
    queue = FrameQueue(8, "block")
    with unwritable(inbox if key == "delete_after" else done) as reason:
        ingest = start(ingest_threads, camera(source), queue)
        assert wait_for(lambda: ingest.stats()["reopen_count"] >= 3)
        stats = ingest.stats()
        assert stats["state"] == "reopening" and len(queue) == 0, stats
        expected = (
            f"OSError: delete_after {inbox}: cannot delete files there ({reason}), expected a folder writable by the "
            "daemon (under systemd: listed in ReadWritePaths=) whose files it may delete (in a sticky folder, mode "
            "1777, only a file's owner may)"
            if key == "delete_after"
            else f"OSError: done_dir {done}: cannot move files there from {inbox} ({reason}), expected both folders "
            "writable by the daemon (under systemd: listed in ReadWritePaths=)"
        )
        assert stats["last_error"] == expected[: len("OSError: ") + 300]  # status keeps 300 characters of a reason
    assert sorted(p.name for p in inbox.iterdir()) == ["000000.png", "000001.png"]  # no probe left behind
    assert list(done.iterdir()) == []
    assert wait_for(lambda: len(queue) == 2), ingest.stats()
    assert ingest.stats()["state"] == "running"
    for frame in drain(queue):
        frame.on_published()
    assert wait_for(lambda: list(inbox.iterdir()) == [])
    assert capsys.readouterr().out.count("state=reopening") == 1  # one line for the whole outage


def test_files_a_folder_stops_letting_go_of_put_the_camera_in_error_once_and_are_deleted_when_it_can(
    tmp_path, ingest_threads, capsys
):
    """A delete that fails after a good start (the folder's mode or owner changed under a running daemon): the
    camera is reopened, once, with the file and the reason, instead of a log line at every part; the files whose
    results went out meanwhile are deleted once it can again, not left to be inspected again after a restart."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    SyntheticLine(32, 32, seed=4).write_folder(inbox, 3)
    queue = FrameQueue(8, "block")
    ingest = start(
        ingest_threads, camera({"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True}), queue
    )
    assert wait_for(lambda: len(queue) == 3)
    frames = drain(queue)
    assert ingest.stats()["state"] == "running"
    with unwritable(inbox) as reason:
        for frame in frames:
            frame.on_published()  # what the publisher calls once each result is out: never raises at it
        assert wait_for(lambda: ingest.stats()["reopen_count"] >= 3)
        assert ingest.stats()["state"] == "reopening"
        assert sorted(p.name for p in inbox.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert wait_for(lambda: list(inbox.iterdir()) == []), ingest.stats()
    assert wait_for(lambda: ingest.stats()["state"] == "running")
    assert len(queue) == 0  # deleted as what they were: inspected, their results out
    out = capsys.readouterr().out
    assert out.count("state=reopening") == 1, out
    assert (
        f"cannot delete 000000.png there ({reason}), expected a folder writable by the daemon (under systemd: "
        "listed in ReadWritePaths=)" in out
    )
    # Said once for the outage when it began, not per file: at a stop no read is left to raise it.
    assert out.count("folder_file_not_disposed") == 1 and "000000.png" in out, out


def test_one_file_that_cannot_be_deleted_is_warned_of_once_however_many_reopens_it_lasts(
    tmp_path, ingest_threads, capsys
):
    """The folder passes its check at every reopen, the one file does not go (a capture program's file in a sticky
    folder): the warning came again at every reopen, hundreds an hour."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("a file that cannot be deleted from a writable folder needs chattr +i, as root")
    inbox = tmp_path / "in"
    inbox.mkdir()
    SyntheticLine(32, 32, seed=6).write_folder(inbox, 2)
    queue = FrameQueue(8, "block")
    ingest = start(
        ingest_threads, camera({"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True}), queue
    )
    assert wait_for(lambda: len(queue) == 2)
    frames = drain(queue)
    stuck = inbox / "000000.png"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        for frame in frames:
            frame.on_published()
        assert wait_for(lambda: ingest.stats()["reopen_count"] >= 4), ingest.stats()
        assert ingest.stats()["state"] == "reopening"
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert wait_for(lambda: list(inbox.iterdir()) == []), ingest.stats()
    out = capsys.readouterr().out
    assert out.count("folder_file_not_disposed") == 1, out


# Unlinks of these paths wait for the paired event (10 s at most): the real unlink held up, as on a share that
# stalls. An audit hook cannot be removed, so it is installed once and does nothing while the dict is empty.
STALLED_UNLINKS: dict[str, threading.Event] = {}


def _stall_unlinks(event: str, args: tuple) -> None:
    if event == "os.remove" and STALLED_UNLINKS:
        gate = STALLED_UNLINKS.get(os.fspath(args[0]))
        if gate is not None:
            gate.wait(10)


sys.addaudithook(_stall_unlinks)


def test_a_share_that_stalls_deleting_holds_up_neither_the_publisher_nor_the_order_and_a_close_names_what_is_left(
    tmp_path, ingest_threads
):
    """The publisher, which serves every camera, called the delete itself: each stalled unlink held back every other
    camera's results. It only hands the file over; the camera's own thread deletes, in order, and a close that
    cannot wait for it says how many files are left, which are still deleted once the share answers."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    SyntheticLine(32, 32, seed=7).write_folder(inbox, 2)
    queue = FrameQueue(8, "block")
    ingest = start(
        ingest_threads, camera({"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True}), queue
    )
    assert wait_for(lambda: len(queue) == 2)
    frames = drain(queue)
    gate = STALLED_UNLINKS[str(inbox / frames[0].frame_id)] = threading.Event()
    try:
        with capture_logs() as logs:
            began = time.monotonic()
            for frame in frames:
                frame.on_published()
            assert time.monotonic() - began < 1.0  # the publisher went on at once
            time.sleep(0.2)
            # The second file waits behind the stalled first one: deleted in the order the results went out.
            assert sorted(p.name for p in inbox.iterdir()) == ["000000.png", "000001.png"]
            ingest.stop()
            ingest.join(10)
            assert not ingest.is_alive()
            assert not ingest.settle(0.2)  # what the daemon's stop does once its last results are out
        pending = [e for e in logs if e["event"] == "folder_disposal_pending"]
        assert len(pending) == 1 and pending[0]["files"] == 2 and pending[0]["first"] == "000000.png", logs
    finally:
        gate.set()
        STALLED_UNLINKS.clear()
    assert wait_for(lambda: list(inbox.iterdir()) == [])


def test_a_share_slower_than_the_parts_holds_new_files_back_once_the_queues_worth_wait_to_be_deleted(
    tmp_path, ingest_threads
):
    """Deletes slower than parts come piled up files whose results were out, without end and unseen, each inspected
    again after a stop. Once as many wait as the camera's queue holds, no new file is taken (said once) until the
    share catches up."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    SyntheticLine(32, 32, seed=7).write_folder(inbox, 6)
    queue = FrameQueue(16, "block")
    source = {"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True}
    start(ingest_threads, camera(source, queue={"size": 2}), queue)
    assert wait_for(lambda: len(queue) == 6)
    frames = drain(queue)
    SyntheticLine(32, 32, seed=8).write_folder(tmp_path / "more", 2)
    gate = STALLED_UNLINKS[str(inbox / frames[0].frame_id)] = threading.Event()
    try:
        with capture_logs() as logs:
            for frame in frames[:2]:
                frame.on_published()
            for path in sorted((tmp_path / "more").iterdir()):
                path.rename(inbox / f"new-{path.name}")
            time.sleep(0.5)  # ten polls: the new files would have been taken
            assert len(queue) == 0, "a new file was taken while the queue's worth waited to be deleted"
            backlog = [e for e in logs if e["event"] == "folder_disposal_backlog"]
            assert len(backlog) == 1 and backlog[0]["files"] == 2, logs
        gate.set()
        assert wait_for(lambda: len(queue) == 2), "the new files were not taken once the share caught up"
    finally:
        gate.set()
        STALLED_UNLINKS.clear()


def test_a_file_never_inspected_is_neither_deleted_nor_moved_after_its_error_result(tmp_path, ingest_threads):
    """A writer that pauses mid-file past the grace (a share's hiccup) got its file published as truncated and then
    deleted under it, and an unreadable file was deleted after "cannot read": the part's image lost. Both stay; the
    finished file is read again as new and judged, also when its writer puts its first modification time back (a copy
    that keeps the source's times)."""
    image = SyntheticLine(64, 48, seed=2).next()[0]
    data = cv2.imencode(".png", image)[1].tobytes()
    (tmp_path / "b-unreadable.png").symlink_to("/proc/self/mem")  # an I/O error: root reads any mode
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 20, "delete_after": True}), queue)
    with open(tmp_path / "a-part.png", "wb") as writer:
        writer.write(data[: len(data) // 2])
        writer.flush()
        assert wait_for(lambda: len(queue) == 2)  # the grace (2 s) ran out while the writer paused
        frames = {f.frame_id: f for f in drain(queue)}
        assert "truncated" in frames["a-part.png"].error
        assert frames["b-unreadable.png"].error == "b-unreadable.png: cannot read (Input/output error)"
        for f in frames.values():
            if f.on_published is not None:
                f.on_published()
        time.sleep(0.3)  # a disposal would have run by now
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-part.png", "b-unreadable.png"]
        first = os.stat(tmp_path / "a-part.png")
        writer.write(data[len(data) // 2 :])
    os.utime(tmp_path / "a-part.png", ns=(first.st_atime_ns, first.st_mtime_ns))
    assert wait_for(lambda: len(queue) == 1)
    finished = queue.get_nowait()
    assert finished.frame_id == "a-part.png" and finished.error is None and np.array_equal(finished.image, image)
    finished.on_published()
    assert wait_for(lambda: sorted(p.name for p in tmp_path.iterdir()) == ["b-unreadable.png"])


def test_pattern_ignores_case_and_temporary_and_system_files_are_never_read(tmp_path, ingest_threads):
    """`*.jpg` missed IMG_0001.JPG, and the default `*` judged (and deleted) a writer's file before its rename into
    place, and Windows' Thumbs.db, as parts."""
    data = cv2.imencode(".png", SyntheticLine(32, 32, seed=8).next()[0])[1].tobytes()
    upper, anything = tmp_path / "upper", tmp_path / "any"
    upper.mkdir()
    anything.mkdir()
    for name in ["IMG_0001.PNG", "img_0002.Png", "img_0003.jpg"]:
        (upper / name).write_bytes(data)
    skipped = [
        "part1.png.tmp", "part2.PNG.part", "part3.png.partial", "part4.png.filepart", "part5.png.crdownload",
        "part6.png~", "~$part7.png", ".part8.png", "Thumbs.db", "desktop.ini", "DESKTOP.INI",
    ]  # fmt: skip
    for name in [*skipped, "part0.png"]:
        (anything / name).write_bytes(data)
    queue = FrameQueue(16, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(upper), "pattern": "*.png", "poll_ms": 20}), queue)
    start(ingest_threads, camera({"kind": "folder", "path": str(anything), "poll_ms": 20}), queue)
    assert wait_for(lambda: len(queue) == 3)
    time.sleep(0.3)  # more polls: nothing else is taken
    assert sorted(f.frame_id for f in drain(queue)) == ["IMG_0001.PNG", "img_0002.Png", "part0.png"]


def test_files_left_in_place_are_read_once_unless_rewritten(tmp_path, ingest_threads):
    line = SyntheticLine(32, 32, seed=5)
    line.write_folder(tmp_path, 2)
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "pattern": "*.png", "poll_ms": 20}), queue)
    assert wait_for(lambda: len(queue) == 2)
    time.sleep(0.2)
    assert len(queue) == 2
    first = drain(queue)
    later = time.time() + 5
    os.utime(tmp_path / "000001.png", (later, later))  # rewritten in place: a new frame under an old name
    assert wait_for(lambda: len(queue) == 1)
    again = queue.get_nowait()
    assert again.frame_id == "000001.png" and np.array_equal(again.image, first[1].image)
    time.sleep(0.2)
    assert len(queue) == 0


def test_folder_waits_for_a_file_still_being_written(tmp_path, ingest_threads, jpegs):
    data = jpegs[0].read_bytes()
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 50, "delete_after": True}), queue)
    with open(tmp_path / "slow.jpg", "wb") as f:
        for i in range(0, len(data), len(data) // 4 + 1):
            f.write(data[i : i + len(data) // 4 + 1])
            f.flush()
            time.sleep(0.12)  # longer than a poll: only the size-stability check keeps it from being read half-done
    assert wait_for(lambda: len(queue) == 1)
    got = queue.get_nowait()
    assert got.error is None and got.image.shape == cv2.imdecode(np.frombuffer(data, np.uint8), 0).shape
    # Read and queued, but not published yet: the file stays until its result is out.
    time.sleep(0.2)
    assert (tmp_path / "slow.jpg").exists()
    got.on_published()  # what the publisher calls once the result is journalled and sent
    assert wait_for(lambda: not (tmp_path / "slow.jpg").exists())


def test_folder_waits_for_a_file_cut_before_its_dimensions(tmp_path, ingest_threads, jpegs):
    """A writer that pauses inside the first bytes (a JPEG before its SOF, a TIFF before its strips' end): the file
    looks headless or undecodable, not truncated. It must get the same grace as a file cut after its header: one
    frame, the whole image (it used to be an error result first, and with delete_after the file deleted mid-write)."""
    image = cv2.imdecode(np.frombuffer(jpegs[0].read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
    ok, tiff = cv2.imencode(".tiff", image)
    files = {"slow.jpg": jpegs[0].read_bytes(), "slow.tiff": tiff.tobytes()}
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 50, "delete_after": True}), queue)
    for name, data in files.items():
        cut = 20 if name.endswith(".jpg") else len(data) // 2
        with open(tmp_path / name, "wb") as f:
            f.write(data[:cut])
            f.flush()
            time.sleep(0.4)  # several polls: the cut file holds still, as a paused writer's does
            f.write(data[cut:])
    assert wait_for(lambda: len(queue) >= 2)
    time.sleep(0.3)  # nothing more comes: no second frame for the same part
    frames = drain(queue)
    assert sorted(f.frame_id for f in frames) == ["slow.jpg", "slow.tiff"], [(f.frame_id, f.error) for f in frames]
    for f in frames:
        assert f.error is None and np.array_equal(f.image, image), f.error


def test_a_file_appended_to_while_other_files_arrive_is_taken_once_whole_and_only_after_holding_still(
    tmp_path, ingest_threads
):
    """A writer appends to big.jpg every 20 ms (the JPEG, then metadata after its EOI) while small files keep
    arriving, so the folder has files to read at every scan. Each file is taken only once this host saw it unchanged
    for a whole poll: big.jpg once, whole, not at its EOI (then again as rewritten) nor half-written (a scan a
    millisecond after the previous one used to take a file that had been still for that millisecond)."""
    poll_s = 0.3  # 15 times the writer's step: a loaded box stalling the writer for a poll is far off
    line = SyntheticLine(320, 240, seed=8)
    encoded = cv2.imencode(".jpg", line.next()[0])[1].tobytes()
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    small = cv2.imencode(".png", line.next()[0][:16, :16])[1].tobytes()
    steps = [encoded[i : i + 2048] for i in range(0, len(encoded), 2048)] + [b"META" * 256] * 4
    written: dict[str, float] = {}  # name -> this host's time just before its last write began

    def write() -> None:
        with open(tmp_path / "big.jpg", "wb") as f:
            for i, step in enumerate(steps):
                written["big.jpg"] = time.monotonic()
                f.write(step)
                f.flush()
                written[f"s{i:02}.png"] = time.monotonic()
                (tmp_path / f"s{i:02}.png").write_bytes(small)
                time.sleep(0.02)

    queue = FrameQueue(64, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": poll_s * 1000}), queue)
    writer = threading.Thread(target=write)
    writer.start()
    writer.join(30)
    assert wait_for(lambda: len(queue) == len(steps) + 1)
    assert not wait_for(lambda: len(queue) > len(steps) + 1, timeout=3 * poll_s)
    frames = drain(queue)
    assert sorted(f.frame_id for f in frames) == sorted(written), [(f.frame_id, f.error) for f in frames]
    for f in frames:
        assert f.error is None and f.t_ingest - written[f.frame_id] >= poll_s, (f.frame_id, f.error)
    (big,) = [f for f in frames if f.frame_id == "big.jpg"]
    assert np.array_equal(big.image, image)
    assert big.t_capture == os.stat(tmp_path / "big.jpg").st_mtime_ns / 1e9  # the file as it was finished


def test_a_preallocated_file_stalled_mid_write_is_waited_for_and_not_deleted(tmp_path, ingest_threads):
    """A writer that sets the file's final size first (an SMB copy: ftruncate; or posix_fallocate) and stalls for
    several polls: the file has a hole where it is not written yet. A BMP decoded with its zero rows was judged and
    deleted mid-write, a TIFF whose directory (written last) was still zeros was an error and deleted, as was any file
    stalled before its first byte. Each is waited for, then taken once, whole. A complete BMP that ends in zeros (a
    black last row) has no hole and is taken at once: it was held for the whole write grace, after newer files."""
    image = np.full((480, 640), 200, np.uint8)
    files = {
        "a.bmp": (cv2.imencode(".bmp", image)[1].tobytes(), 0.5, "ftruncate"),
        "b.tiff": (cv2.imencode(".tiff", image)[1].tobytes(), 0.5, "ftruncate"),
        "c.png": (cv2.imencode(".png", image)[1].tobytes(), 0.0, "ftruncate"),  # nothing written yet
        "e.bmp": (cv2.imencode(".bmp", image)[1].tobytes(), 0.3, "fallocate"),
    }
    black = np.zeros_like(image)
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 50, "delete_after": True}), queue)
    taken: list[Frame] = []
    for name, (data, written, how) in files.items():
        cut = int(len(data) * written)
        with open(tmp_path / name, "wb") as out:
            if how == "fallocate":
                os.posix_fallocate(out.fileno(), 0, len(data))
            else:
                out.truncate(len(data))
            out.write(data[:cut])
            out.flush()
            os.fsync(out.fileno())  # written to the disk: a hole is still a hole
            time.sleep(0.5)  # ten polls: the file holds still at its final size
            for got in drain(queue):
                got.on_published()  # an earlier file's result goes out, as the publisher's would
                taken.append(got)
            assert name not in [got.frame_id for got in taken] and (tmp_path / name).exists(), name
            out.write(data[cut:])
    assert cv2.imwrite(str(tmp_path / "d.bmp"), black)
    ready = time.monotonic()
    assert wait_for(lambda: len(taken) + len(queue) == 5)
    assert time.monotonic() - ready < 1.0  # the black one has no hole: taken after one still poll, not the grace
    assert not wait_for(lambda: len(queue) > 5 - len(taken), timeout=0.3)
    published = {f.frame_id for f in taken}
    frames = {f.frame_id: f for f in taken + drain(queue)}
    assert sorted(frames) == ["a.bmp", "b.tiff", "c.png", "d.bmp", "e.bmp"], [
        (f.frame_id, f.error) for f in frames.values()
    ]
    for name, f in frames.items():
        assert f.error is None and np.array_equal(f.image, black if name == "d.bmp" else image), (name, f.error)
        if name not in published:
            f.on_published()
    assert wait_for(lambda: not list(tmp_path.iterdir()))


def test_complete_bmp_and_tiff_ending_in_zero_bytes_are_taken_at_once_and_oldest_first(tmp_path, ingest_threads):
    """Images that end in zero bytes without a black last row: an 8-bit BMP whose top-right pixel is black (three
    of its last four bytes are row padding), a 24-bit one whose top-right pixel has no red, a multi-page TIFF whose
    last directory ends the file. Each was held for the write grace, read again at every poll, and published after
    the newer files written next to it."""
    image_module = pytest.importorskip("PIL.Image")
    gray = np.full((48, 641), 120, np.uint8)
    gray[0, -1] = 0
    bgr = np.full((48, 643, 3), 200, np.uint8)
    bgr[0, -1] = (255, 255, 0)
    pages = [image_module.fromarray(np.full((48, 64), v, np.uint8)) for v in (60, 90)]
    tiff = tmp_path.parent / f"{tmp_path.name}-pages.tiff"
    pages[0].save(tiff, save_all=True, append_images=pages[1:])
    files = {
        "part0.bmp": cv2.imencode(".bmp", gray)[1].tobytes(),
        "part1.bmp": cv2.imencode(".bmp", bgr)[1].tobytes(),
        "part2.tiff": tiff.read_bytes(),
        "part3.png": cv2.imencode(".png", gray)[1].tobytes(),
    }
    assert all(not any(data[-4:]) for name, data in files.items() if name != "part3.png")
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 50}), queue)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        time.sleep(0.1)
    written = time.monotonic()
    assert wait_for(lambda: len(queue) == 4, timeout=1.0), [f.frame_id for f in drain(queue)]
    assert time.monotonic() - written < 1.0
    frames = drain(queue)
    assert [f.frame_id for f in frames] == list(files), [(f.frame_id, f.error) for f in frames]
    assert all(f.error is None for f in frames), [(f.frame_id, f.error) for f in frames]
    assert np.array_equal(frames[0].image, gray) and np.array_equal(frames[2].image, np.full((48, 64), 60, np.uint8))


def test_a_finished_file_that_starts_with_zero_bytes_is_disposed_of_and_a_stalled_preallocated_one_kept(
    tmp_path, ingest_threads
):
    """A raw dump whose first bytes are zero, finished and left alone: one error result after the write grace, then
    deleted, as any file that is no image is (it was kept for ever, "not written yet" at every start). A file set to
    its final size with nothing written, stalled past the grace, still has its hole: its error result says so and it
    is kept, to be read again once its writer finishes it."""
    dump = bytes(8) + bytes(range(256)) * 64
    (tmp_path / "dump.raw").write_bytes(dump)
    with open(tmp_path / "stalled.png", "wb") as out:
        out.truncate(len(dump))
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 50, "delete_after": True}), queue)
    assert wait_for(lambda: len(queue) == 2, timeout=5.0)
    frames = {f.frame_id: f for f in drain(queue)}
    assert frames["stalled.png"].on_published is None
    frames["dump.raw"].on_published()
    assert wait_for(lambda: sorted(p.name for p in tmp_path.iterdir()) == ["stalled.png"])
    time.sleep(0.3)  # a second result, or a disposal, would have come by now
    assert len(queue) == 0 and (tmp_path / "stalled.png").exists()
    for name, f in frames.items():
        assert f.error == (
            f"{name}: zero bytes where its image header should be (not written yet?), expected a complete "
            "JPEG/PNG/BMP/TIFF/PNM/WebP image"
        )


SECCOMP_MOVES = """
import json, os, sys, time
import cv2, numpy as np
from inspectd.daemon.config import parse_config
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
inbox, done = sys.argv[1] + "/in", sys.argv[1] + "/done"
source = {"kind": "folder", "path": inbox, "done_dir": done, "pattern": "*.png", "poll_ms": 50}
cam = parse_config({"station": "s", "model": {"bundle": "b"}, "cameras": [{"id": "cam0", "source": source}]}).cameras[0]
queue = FrameQueue(8, "block")
ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.2))
ingest.start()
for i in range(3):
    cv2.imwrite(f"{inbox}/p{i}.png", np.full((8, 8), 200, np.uint8))
deadline, frames = time.monotonic() + 5, 0
while time.monotonic() < deadline and len(os.listdir(done)) < 3:
    while (frame := queue.get_nowait()) is not None:
        frames += 1
        frame.on_published()
    time.sleep(0.05)
time.sleep(0.3)
state = ingest.stats()
ingest.stop()
ingest.join(5)
print(json.dumps({"frames": frames, "inbox": sorted(os.listdir(inbox)), "done": sorted(os.listdir(done)),
                  "state": state["state"], "last_error": state["last_error"]}))
"""


def test_a_done_dir_move_that_a_seccomp_filter_refuses_renameat2_falls_back_and_the_camera_runs_on(tmp_path):
    """The shipped units answer a system call they do not allow with EPERM (SystemCallErrorNumber=EPERM); an older
    systemd's @system-service, or a container profile, may not allow renameat2. That EPERM was taken as the folder's
    own: every move into done_dir failed and the camera reopened for ever. It means "not here", as for the bundle
    writes (engines.durable), and the move falls back to a link or a rename. strace answers renameat2 as such a
    filter would."""
    strace = shutil.which("strace")
    assert strace, "strace is not installed: `make test` installs it (apt-get install strace)"
    (tmp_path / "in").mkdir()
    (tmp_path / "done").mkdir()
    command = [strace, "-f", "-qq", "-o", "/dev/null", "-e", "trace=renameat2", "-e", "inject=renameat2:error=EPERM"]
    run = subprocess.run(
        [*command, sys.executable, "-c", SECCOMP_MOVES, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result == {
        "frames": 3,
        "inbox": [],
        "done": ["p0.png", "p1.png", "p2.png"],
        "state": "running",
        "last_error": None,
    }, run.stderr


def test_a_writer_whose_clock_is_behind_pausing_mid_file_does_not_get_it_published_as_truncated(
    tmp_path, ingest_threads
):
    """The PC writing into the folder keeps time a minute behind this host, and pauses mid-file for several polls.
    The cut-short grace runs from when this host saw the file change, not from the writer's mtime (by which the
    half-written file looked a minute old and was published as truncated, and the whole file again later)."""
    encoded = cv2.imencode(".jpg", SyntheticLine(320, 240, seed=9).next()[0])[1].tobytes()
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 50}), queue)
    path = tmp_path / "part.jpg"
    with open(path, "wb") as f:
        for piece in (encoded[: len(encoded) // 2], encoded[len(encoded) // 2 :]):
            f.write(piece)
            f.flush()
            behind = time.time() - 60
            os.utime(path, (behind, behind))
            time.sleep(0.6)  # several polls, well inside the grace
    assert wait_for(lambda: len(queue) >= 1)
    assert not wait_for(lambda: len(queue) > 1, timeout=0.5)
    (got,) = drain(queue)
    assert got.error is None, got.error
    assert np.array_equal(got.image, cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED))


def exif_with_thumbnail(encoded: bytes, thumbnail: bytes) -> bytes:
    """A JPEG with an EXIF-like APP1 segment right after SOI that holds a whole JPEG thumbnail, SOI to EOI, as
    cameras write them."""
    payload = b"Exif\0\0MM\0*\0\0\0\x08" + thumbnail
    return encoded[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + encoded[2:]


def test_images_with_bytes_after_their_end_decode_and_cut_ones_are_still_cut_short(tmp_path, ingest_threads):
    """Some cameras and tools append metadata or 0xFF padding after a JPEG's EOI or a PNG's IEND: the image is whole
    and decodes (it used to be refused as truncated). A file cut short is still one, also where an earlier EOI
    lies inside it (an EXIF thumbnail) or the cut falls between a progressive JPEG's scans."""
    line = SyntheticLine(96, 64, seed=10)
    gray, thumb_image = line.next()[0], line.next()[0][:16, :16]
    jpeg = cv2.imencode(".jpg", gray)[1].tobytes()
    progressive = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    png = cv2.imencode(".png", gray)[1].tobytes()
    exif = exif_with_thumbnail(jpeg, cv2.imencode(".jpg", thumb_image)[1].tobytes())
    main_scan = exif.index(b"\xff\xda", len(exif) - len(jpeg))  # the main image's SOS, not the thumbnail's
    last_scan = progressive.rindex(b"\xff\xda")
    whole = {
        "padded.jpg": (jpeg + b"\xff" * 7, jpeg),
        "metadata.jpg": (jpeg + b"TRAILER-META-123", jpeg),
        "progressive.jpg": (progressive + b"\0\0\xff\xff<x:xmpmeta/>", progressive),
        "exif.jpg": (exif + b"\xff\xff", jpeg),
        "trailer.png": (png + b"\xff\xffTRAILER\0", png),
    }
    cut = {
        "mid-scan.jpg": jpeg[: len(jpeg) * 2 // 3],
        "exif-mid-scan.jpg": exif[: main_scan + (len(exif) - main_scan) // 2],
        "between-scans.jpg": progressive[:last_scan],
        "exif-after-thumbnail.jpg": exif[: len(exif) - len(jpeg) + 2],  # ends at the thumbnail's own EOI
        "mid-chunk.png": png[:-20],
    }
    for name, data in {**{n: d for n, (d, _) in whole.items()}, **cut}.items():
        (tmp_path / name).write_bytes(data)
    queue = FrameQueue(16, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 20}), queue)
    assert wait_for(lambda: len(queue) == len(whole) + len(cut))  # the cut ones after the grace
    frames = {f.frame_id: f for f in drain(queue)}
    for name, (_, clean) in whole.items():
        assert frames[name].error is None, frames[name].error
        assert np.array_equal(frames[name].image, cv2.imdecode(np.frombuffer(clean, np.uint8), cv2.IMREAD_UNCHANGED))
    assert {name: frames[name].error for name in cut} == {
        "mid-scan.jpg": "mid-scan.jpg: truncated JPEG (no end-of-image marker), expected a complete file",
        "exif-mid-scan.jpg": "exif-mid-scan.jpg: truncated JPEG (no end-of-image marker), expected a complete file",
        "between-scans.jpg": "between-scans.jpg: truncated JPEG (no end-of-image marker), expected a complete file",
        "exif-after-thumbnail.jpg": "exif-after-thumbnail.jpg: ends before its image header, expected a complete "
        "JPEG/PNG/BMP/TIFF/PNM/WebP image",
        "mid-chunk.png": "mid-chunk.png: truncated PNG (no IEND chunk), expected a complete file",
    }


OUT_OF_MEMORY = """
import json, os, resource, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from inspectd.daemon.config import parse_config
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
source = {{"kind": "folder", "path": sys.argv[1], "poll_ms": 20}}
cam = parse_config(
    {{"station": "s", "model": {{"bundle": "b"}}, "cameras": [{{"id": "c", "source": source, "max_pixels": 1 << 28}}]}}
).cameras[0]
# Address space for what the process has now and ordinary work, not for one read of the 1.5 GiB max_pixels allows.
size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (768 << 20), resource.RLIM_INFINITY))
queue = FrameQueue(8, "block")
ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.2))
ingest.start()
deadline = time.monotonic() + 10
while len(queue) < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
frames = []
while (frame := queue.get_nowait()) is not None:
    frames.append([frame.frame_id, frame.error, None if frame.image is None else list(frame.image.shape)])
ingest.stop()
ingest.join(5)
print(json.dumps({{"frames": frames, "reopen_count": ingest.stats()["reopen_count"]}}))
"""


def test_a_file_is_read_at_its_own_size_and_one_memory_cannot_hold_is_its_own_error(tmp_path):
    """Each read reserved max_bytes (6 bytes a pixel of max_pixels), so under an address-space limit (LimitAS, or a
    small box's overcommit) every file failed with MemoryError, the source was reopened and met the same file again,
    forever. Now a read takes what the file holds, and a file too large for the memory left is one error result."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    assert cv2.imwrite(str(inbox / "b-small.png"), SyntheticLine(64, 48, seed=11).next()[0])
    with open(inbox / "a-huge.png", "wb") as f:
        # Sparse 1.25 GiB: under max_bytes, over the memory left. All hole, it is held for the write grace as a
        # file still being filled would be, so it comes after the small one.
        f.truncate(5 << 28)
    old = time.time() - 60
    os.utime(inbox / "a-huge.png", (old, old))
    script = tmp_path / "oom.py"
    script.write_text(OUT_OF_MEMORY.format(repo=str(Path(__file__).parents[1]), tests=str(Path(__file__).parent)))
    out = subprocess.run([sys.executable, str(script), str(inbox)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert report == {
        "frames": [
            ["b-small.png", None, [48, 64]],
            ["a-huge.png", f"a-huge.png: cannot read its {5 << 28} bytes (out of memory)", None],
        ],
        "reopen_count": 0,
    }


def test_a_file_opencv_refuses_to_decode_is_one_error_result_and_the_folder_goes_on(tmp_path, ingest_threads):
    """A 54-byte BMP declaring 1 100 000 x 1 pixels (under max_pixels) makes OpenCV raise, not return None: that
    must be the file's own error result, not a source failure (which reopened the folder and met the file again at
    every scan, forever)."""
    header = struct.pack("<2sIHHI", b"BM", 0, 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, 1_100_000, 1, 1, 24, 0, 0, 0, 0, 0, 0
    )
    (tmp_path / "a-poison.bmp").write_bytes(header)
    SyntheticLine(64, 48, seed=1).write_folder(tmp_path / "frames", 1)
    os.replace(tmp_path / "frames" / "000000.png", tmp_path / "b-good.png")
    old = time.time() - 60
    os.utime(tmp_path / "a-poison.bmp", (old, old))
    queue = FrameQueue(8, "block")
    ingest = start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "pattern": "*.*"}), queue)
    assert wait_for(lambda: len(queue) == 2), ingest.stats()
    time.sleep(0.5)
    frames = {f.frame_id: f for f in drain(queue)}
    assert sorted(frames) == ["a-poison.bmp", "b-good.png"]
    error = frames["a-poison.bmp"].error
    assert error.startswith("a-poison.bmp: ") and "1100000" in error and "\n" not in error, error
    assert frames["b-good.png"].image.shape == (48, 64)
    assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["state"] == "running"


def test_folder_refuses_a_file_too_large_for_max_pixels_without_reading_it(tmp_path, ingest_threads):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB that would be read into memory whole
    old = time.time() - 60
    os.utime(big, (old, old))
    queue = FrameQueue(8, "block")
    cam = camera({"kind": "folder", "path": str(tmp_path)}, max_pixels=1000)
    ingest = start(ingest_threads, cam, queue)
    assert wait_for(lambda: len(queue) == 1), ingest.stats()
    (got,) = drain(queue)
    assert got.image is None and got.error == (
        f"big.png: {4 << 30} bytes, expected at most {6 * 1000 + (64 << 10)} for max_pixels=1000"
    )
    assert ingest.stats()["reopen_count"] == 0


def test_folder_that_disappears_is_reopened_when_it_comes_back(tmp_path, ingest_threads):
    inbox = tmp_path / "in"
    inbox.mkdir()
    queue = FrameQueue(8, "block")
    line = SyntheticLine(64, 48, seed=1)
    cam = camera({"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True})
    ingest = start(ingest_threads, cam, queue)
    line.write_folder(tmp_path / "batch1", 1)
    os.replace(tmp_path / "batch1" / "000000.png", inbox / "first.png")
    assert wait_for(lambda: len(queue) == 1)
    shutil.rmtree(inbox)
    assert wait_for(lambda: ingest.stats()["state"] == "reopening")
    assert "in" in ingest.stats()["last_error"]
    inbox.mkdir()
    line.write_folder(tmp_path / "batch2", 1)
    os.replace(tmp_path / "batch2" / "000000.png", inbox / "second.png")
    assert wait_for(lambda: len(queue) == 2)
    assert ingest.stats()["state"] == "running" and ingest.stats()["reopen_count"] >= 1
    assert [f.frame_id for f in drain(queue)] == ["first.png", "second.png"]


def test_a_camera_still_failing_after_thousands_of_reopens_keeps_retrying_and_comes_back(tmp_path, ingest_threads):
    # Its backoff doubled once per failure: past about a thousand (an hour and a half at the longest backoff) the
    # float overflowed and the camera's thread ended for good. Zero backoff gets there in a moment.
    inbox = tmp_path / "in"
    queue = FrameQueue(8, "block")
    cam = camera({"kind": "folder", "path": str(inbox), "poll_ms": 20})
    ingest = CameraIngest(cam, queue, backoff_s=(0.0, 0.0))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["reopen_count"] > 1500 or not ingest.is_alive(), 30)
    assert ingest.is_alive() and ingest.stats()["state"] == "reopening", ingest.stats()
    inbox.mkdir()
    SyntheticLine(64, 48, seed=1).write_folder(inbox, 1)
    assert wait_for(lambda: len(queue) == 1), ingest.stats()
    assert ingest.stats()["state"] == "running"


def test_an_unreadable_file_is_one_error_result_and_the_folder_goes_on(tmp_path, ingest_threads):
    # A file whose read fails with an I/O error (root reads any mode, so permissions cannot stand in for it here).
    (tmp_path / "a-unreadable.png").symlink_to("/proc/self/mem")
    SyntheticLine(64, 48, seed=1).write_folder(tmp_path / "frames", 1)
    os.replace(tmp_path / "frames" / "000000.png", tmp_path / "b-good.png")
    queue = FrameQueue(8, "block")
    ingest = start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "pattern": "*.png"}), queue)
    assert wait_for(lambda: len(queue) == 2), ingest.stats()
    time.sleep(0.5)  # further scans add nothing: the unreadable file was taken once
    frames = {f.frame_id: f for f in drain(queue)}
    assert sorted(frames) == ["a-unreadable.png", "b-good.png"]
    assert frames["a-unreadable.png"].error == "a-unreadable.png: cannot read (Input/output error)"
    assert frames["b-good.png"].error is None and frames["b-good.png"].image.shape == (48, 64)
    assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["state"] == "running"


def test_an_entry_that_cannot_be_stated_is_one_error_result_and_the_folder_goes_on(tmp_path, ingest_threads):
    """A symlink loop the pattern matches (as a stale handle on a share, or EIO, would be): its stat failed at every
    scan, which reopened the camera for ever and inspected no file. It is one error result naming it, not repeated
    at later scans, and is neither deleted nor moved; the good file beside it comes through."""
    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    (inbox / "a-loop.png").symlink_to("a-loop.png")
    SyntheticLine(64, 48, seed=1).write_folder(tmp_path / "frames", 1)
    os.replace(tmp_path / "frames" / "000000.png", inbox / "b-good.png")
    queue = FrameQueue(8, "block")
    source = {"kind": "folder", "path": str(inbox), "pattern": "*.png", "poll_ms": 20, "done_dir": str(done)}
    ingest = start(ingest_threads, camera(source), queue)
    assert wait_for(lambda: len(queue) == 2), ingest.stats()
    time.sleep(0.3)  # more scans add nothing: the entry was taken once
    frames = {f.frame_id: f for f in drain(queue)}
    assert sorted(frames) == ["a-loop.png", "b-good.png"]
    assert frames["a-loop.png"].error == "a-loop.png: cannot read (Too many levels of symbolic links)"
    assert frames["a-loop.png"].on_published is None  # never inspected: kept
    assert frames["b-good.png"].error is None and frames["b-good.png"].image.shape == (48, 64)
    frames["b-good.png"].on_published()
    assert wait_for(lambda: [p.name for p in done.iterdir()] == ["b-good.png"])
    assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["state"] == "running"
    assert (inbox / "a-loop.png").is_symlink()


def test_odd_file_names_give_one_line_errors_and_frame_ids_any_json_decoder_takes(tmp_path, ingest_threads):
    """A newline in a file name made a multi-line error; a name that is not UTF-8 reached the result as lone
    surrogates, which strict JSON decoders (a PLC gateway's) refuse."""
    (tmp_path / "a\nb.png").write_bytes(b"not an image")
    SyntheticLine(64, 48, seed=1).write_folder(tmp_path / "frames", 1)
    os.replace(tmp_path / "frames" / "000000.png", os.path.join(os.fsencode(tmp_path), b"c\xffd.png"))
    old = time.time() - 60
    for entry in os.scandir(tmp_path):
        os.utime(entry.path, (old, old))
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "pattern": "*.png"}), queue)
    assert wait_for(lambda: len(queue) == 2)
    bad, good = sorted(drain(queue), key=lambda f: f.frame_id)
    assert (
        bad.error == "'a\\nb.png': no image header found (JPEG SOF, PNG IHDR, BMP, TIFF, PNM or WebP), expected a "
        "complete JPEG/PNG/BMP/TIFF/PNM/WebP image"
    )
    assert good.error is None and good.frame_id == "c\\xffd.png"
    for f in (bad, good):
        f.frame_id.encode("utf-8")  # no lone surrogates
        json.loads(json.dumps({"frame_id": f.frame_id}, ensure_ascii=False))


def test_a_folder_whose_files_stay_says_so_once_at_open(tmp_path, ingest_threads, capsys):
    kept = start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path / "missing")}), FrameQueue(8, "block"))
    assert wait_for(lambda: kept.stats()["reopen_count"] >= 2)
    (tmp_path / "missing").mkdir()  # opens now, after reopens
    assert wait_for(lambda: kept.stats()["state"] == "running")
    cleared = camera({"kind": "folder", "path": str(tmp_path), "delete_after": True})
    deleting = start(ingest_threads, cleared, FrameQueue(8, "block"))
    assert wait_for(lambda: deleting.stats()["state"] == "running")
    out = capsys.readouterr().out
    assert out.count("folder_files_kept") == 1 and str(tmp_path / "missing") in out


def test_folder_is_not_read_while_paused(tmp_path, ingest_threads):
    queue = FrameQueue(8, "block")
    ingest = start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 20}), queue)
    ingest.paused = True
    assert wait_for(lambda: ingest.stats()["state"] == "paused")
    SyntheticLine(32, 32).write_folder(tmp_path, 2)
    time.sleep(0.3)
    assert len(queue) == 0
    ingest.paused = False
    assert wait_for(lambda: len(queue) == 2)
    assert ingest.stats()["discarded"] == 0


def test_a_frame_a_stuck_read_returns_after_stop_is_not_accepted(tmp_path, ingest_threads):
    """A source whose read ignores stop (a GStreamer pipeline or V4L2 device waits out its own timeout): what it
    returns once stop() was called is not accepted (no seq, no journal mark, not queued), because shutdown has
    stopped waiting for it and drained the queues already; a frame accepted then would never get a result."""
    from inspectd.daemon.ingest.source import Source

    reading = threading.Event()

    class StuckRead(Source):
        def read(self, stop):
            reading.set()
            time.sleep(2.0)  # does not look at stop, as a blocking driver call cannot (long: CI may stall the test)
            return self.frame("late", 0.0, np.zeros((4, 4), np.uint8))

    marks: list[int] = []
    queue = FrameQueue(8, "block")
    cam = camera({"kind": "synthetic", "width": 8, "height": 8})
    ingest = CameraIngest(cam, queue, first_seq=100, backoff_s=FAST_BACKOFF, mark_seq=marks.append)
    ingest._source = StuckRead(cam, time.time)
    ingest_threads.append(ingest)
    ingest.start()
    assert reading.wait(5)
    ingest.stop()
    ingest.join(5)
    assert not ingest.is_alive()
    assert len(queue) == 0 and marks == [] and ingest.next_seq == 100


@pytest.mark.parametrize("redelivers, level", [(True, "info"), (False, "warning")])
def test_a_frame_whose_journal_mark_outlasts_the_drain_is_not_accepted(ingest_threads, redelivers, level):
    """The ingest thread passed its stop check, then its journal mark (an fsync on a slow card) took longer than
    shutdown waits for ingest: shutdown closes the queues before it drains them, so the frame is refused, its mark
    taken back, and the refusal logged, instead of a frame queued after the drain that never gets a result. A warning
    where the frame is lost (a camera's), info where it comes again (the synthetic line, a folder's file)."""
    from inspectd.daemon.ingest.synthetic import SyntheticLineSource

    class Line(SyntheticLineSource):
        pass

    Line.redelivers = redelivers
    marking = threading.Event()
    release = threading.Event()
    marks: list[int] = []

    def slow_mark(seq: int) -> None:
        marks.append(seq)
        if len(marks) == 1:
            marking.set()
            assert release.wait(5)

    queue = FrameQueue(8, "drop_oldest")
    queue.put(Frame("cam", 99, "queued-before", 0.0, np.zeros((4, 4), np.uint8)))
    cam = camera({"kind": "synthetic", "width": 8, "height": 8})
    ingest = CameraIngest(cam, queue, first_seq=100, backoff_s=FAST_BACKOFF, mark_seq=slow_mark)
    ingest._source = Line(cam, time.time)
    ingest_threads.append(ingest)
    with capture_logs() as logs:
        ingest.start()
        assert marking.wait(5)
        ingest.stop()  # what Daemon.shutdown does: stop, wait for ingest (here in vain), close, drain
        queue.close()
        release.set()
        ingest.join(5)
    assert not ingest.is_alive()
    assert marks == [100, 99] and ingest.next_seq == 100 and ingest.frames_in == 0
    assert [queue.get_nowait().frame_id, queue.get_nowait()] == ["queued-before", None]  # what was queued stays
    refused = [e for e in logs if e["event"] == "frame_not_accepted"]
    assert len(refused) == 1 and refused[0]["reason"] == "the daemon is stopping"
    assert refused[0]["log_level"] == level and refused[0]["lost"] is not redelivers and refused[0]["seq"] == 100
    block = FrameQueue(1, "block")
    block.close()
    assert not block.put(Frame("cam", 0, "late", 0.0, np.zeros((4, 4), np.uint8)))


def test_a_source_that_fails_after_every_frame_still_backs_off(ingest_threads):
    """An RTSP server that sends one frame and drops: one frame used to reset the backoff, so the camera reopened at
    the first backoff (0.1 s) forever, two log lines each time. It must grow as for a source that never opens."""
    from inspectd.daemon.ingest.source import Source

    class Flapping(Source):
        sent = False

        def open(self, stop):
            self.sent = False

        def read(self, stop):
            if self.sent:
                raise ConnectionError("stream dropped")
            self.sent = True
            return self.frame("f", 0.0, np.zeros((8, 8), np.uint8))

    queue = FrameQueue(1000, "drop_oldest")
    cam = camera({"kind": "synthetic", "width": 8, "height": 8})
    ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.4))
    ingest._source = Flapping(cam, time.time)
    ingest_threads.append(ingest)
    ingest.start()
    time.sleep(2.0)
    # Backing off: 0.05, 0.1, 0.2, then 0.4 s: about 7 reopens in 2 s; without it, one every 0.05 s (about 40).
    assert 4 <= ingest.stats()["reopen_count"] <= 10, ingest.stats()


# --- ZeroMQ ---------------------------------------------------------------------------------------------------------


def png_with_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG start whose IHDR declares width x height: a decompression bomb's calling card."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def jpeg_with_sof(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its SOF dimensions rewritten."""
    buf = bytearray(data)
    pos = 2
    while True:
        marker, length = buf[pos + 1], struct.unpack(">H", buf[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            buf[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(buf)
        pos += 2 + length


def test_encoded_dims_reads_headers_without_decoding(jpegs):
    jpeg = jpegs[0].read_bytes()
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert encoded_dims(jpeg) == ("jpeg", image.shape[0], image.shape[1])
    ok, png = cv2.imencode(".png", np.zeros((17, 31), np.uint8))
    assert encoded_dims(png.tobytes()) == ("png", 17, 31)
    assert encoded_dims(png_with_header(50_000, 40_000)) == ("png", 40_000, 50_000)
    assert encoded_dims(jpeg_with_sof(jpeg, 50_000, 50_000)) == ("jpeg", 50_000, 50_000)
    ok, bmp = cv2.imencode(".bmp", np.zeros((13, 21, 3), np.uint8))
    assert encoded_dims(bmp.tobytes()) == ("bmp", 13, 21)
    for size in ((9, 300), (700, 5)):  # SHORT and LONG dimension tags
        ok, tiff = cv2.imencode(".tiff", np.zeros(size, np.uint8))
        assert encoded_dims(tiff.tobytes()) == ("tiff", *size)
    assert encoded_dims(b"GIF89a....") is None
    assert encoded_dims(jpeg[:10]) is None


def test_zmq_frames_good_and_bad(tmp_path, ingest_threads, jpegs):
    endpoint = f"ipc://{tmp_path}/cam0.sock"
    queue = FrameQueue(64, "block")
    ingest = start(ingest_threads, camera({"kind": "zmq", "endpoint": endpoint}, max_pixels=10_000_000), queue)
    jpeg = jpegs[0].read_bytes()
    jpeg_image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    gray = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def header(frame_id, **fields):
        return json.dumps({"frame_id": frame_id, "t_capture": 1700000000.5, **fields}).encode()

    messages = [
        ("raw-gray", [header("raw-gray", shape=[48, 64], dtype="uint8", encoding="raw"), gray.tobytes()], None),
        ("raw-rgb", [header("raw-rgb", shape=[20, 30, 3], dtype="uint8", camera="cam0"), rgb.tobytes()], None),
        ("jpeg", [header("jpeg", shape=list(jpeg_image.shape), encoding="jpeg"), jpeg], None),
        ("png", [header("png", encoding="png"), png.tobytes()], None),
        ("zero", [header("zero", encoding="jpeg"), b""], "empty (0 bytes)"),
        ("trunc", [header("trunc", encoding="jpeg"), jpeg[: len(jpeg) // 2]], "truncated JPEG"),
        ("headless", [header("headless", encoding="jpeg"), jpeg[:1] + jpeg[5:]], "no image header found"),
        (
            "size",
            [header("size", shape=[48, 64], dtype="uint8"), gray.tobytes()[:-7]],
            "payload 3065 bytes, expected 3072 for shape [48, 64]",
        ),
        (
            "bomb-png",
            [header("bomb-png", encoding="png"), png_with_header(50_000, 50_000)],
            "declares 50000x50000 = 2500000000 pixels, expected at most max_pixels=10000000",
        ),
        (
            "bomb-jpeg",
            [header("bomb-jpeg", encoding="jpeg"), jpeg_with_sof(jpeg, 50_000, 50_000)],
            "jpeg header declares 50000x50000",
        ),
        ("png-as-jpeg", [header("png-as-jpeg", encoding="jpeg"), png.tobytes()], "payload is png, expected jpeg"),
        ("bomb-raw", [header("bomb-raw", shape=[50_000, 50_000], dtype="uint8"), b"x"], "expected at most max_pixels"),
        (
            "float",
            [header("float", shape=[4, 4], dtype="float32"), np.full((4, 4), np.nan, np.float32).tobytes()],
            "dtype 'float32', expected \"uint8\"",
        ),
        ("rgba", [header("rgba", shape=[4, 4, 4], dtype="uint8"), bytes(64)], "4 channels, expected 1 or 3"),
        (
            "shape-mismatch",
            [header("shape-mismatch", shape=[10, 10], encoding="jpeg"), jpeg],
            "expected header shape [10, 10]",
        ),
        (
            "extra",
            [header("extra", shape=[4, 4], dtype="uint8", exposure=3), bytes(16)],
            "unknown header field 'exposure'",
        ),
        (
            "othercam",
            [header("othercam", shape=[4, 4], dtype="uint8", camera="cam9"), bytes(16)],
            "header camera 'cam9'",
        ),
        ("nodtype", [header("nodtype", shape=[4, 4]), bytes(16)], "raw frame without dtype"),
        (None, [b"{not json", bytes(16)], "header: not JSON"),
        (None, [header("one-part")], "message of 1 parts, expected 2"),
    ]
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(endpoint)
    try:
        for _, parts, _ in messages:
            push.send_multipart(parts)
        assert wait_for(lambda: len(queue) == len(messages)), ingest.stats()
    finally:
        push.close()
    frames = drain(queue)
    assert [f.seq for f in frames] == list(range(len(messages)))
    for (frame_id, _, error), f in zip(messages, frames):
        if frame_id is not None:
            assert f.frame_id == frame_id
        if error is None:
            assert f.error is None and f.image is not None and f.image.dtype == np.uint8, f.error
            assert f.t_capture == 1700000000.5
        else:
            assert f.image is None and error in f.error, (frame_id, f.error)
            assert "\n" not in f.error
    assert np.array_equal(frames[0].image, gray)
    assert np.array_equal(frames[1].image, rgb)
    assert np.array_equal(frames[2].image, jpeg_image)
    assert np.array_equal(frames[3].image, rgb)
    stats = ingest.stats()
    assert stats["errors"] == len(messages) - 4 and stats["frames_in"] == len(messages)


def test_a_zmq_frame_opencv_refuses_to_decode_is_its_own_error_and_the_frames_after_it_are_kept(
    tmp_path, ingest_threads, jpegs
):
    """A PNG whose IHDR declares 1 100 000 x 1 pixels (far under max_pixels): OpenCV raises on its own limit of a
    side. That frame gets its error; the socket stays open, so the frames received behind it are not lost."""
    endpoint = f"ipc://{tmp_path}/cam0.sock"
    queue = FrameQueue(64, "block")
    ingest = start(ingest_threads, camera({"kind": "zmq", "endpoint": endpoint}), queue)
    jpeg = jpegs[0].read_bytes()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.connect(endpoint)
    try:
        push.send_multipart([json.dumps({"frame_id": "f", "encoding": "png"}).encode(), png_with_header(1_100_000, 1)])
        for _ in range(5):
            push.send_multipart([json.dumps({"frame_id": "f", "encoding": "jpeg"}).encode(), jpeg])
        assert wait_for(lambda: len(queue) == 6), ingest.stats()
    finally:
        push.close()
    frames = drain(queue)
    assert [f.seq for f in frames] == list(range(6))
    assert frames[0].image is None and "1100000x1" in frames[0].error and "\n" not in frames[0].error, frames[0].error
    assert all(f.error is None for f in frames[1:])
    assert ingest.stats()["reopen_count"] == 0


def test_zmq_endpoint_in_use_keeps_retrying_then_binds(tmp_path, ingest_threads):
    ctx = zmq.Context.instance()
    blocker = ctx.socket(zmq.PULL)
    blocker.linger = 0
    port = blocker.bind_to_random_port("tcp://127.0.0.1")
    queue = FrameQueue(4)
    ingest = start(ingest_threads, camera({"kind": "zmq", "endpoint": f"tcp://127.0.0.1:{port}"}), queue)
    try:
        assert wait_for(lambda: ingest.stats()["state"] == "reopening")
        assert "Address already in use" in ingest.stats()["last_error"]
    finally:
        blocker.close()
    assert wait_for(lambda: ingest.stats()["state"] == "running" and ingest.stats()["reopen_count"] >= 1)


def test_folder_decodes_bmp_and_tiff_and_refuses_bad_files(tmp_path, ingest_threads):
    image = SyntheticLine(40, 30, channels=3, seed=4).next()[0]
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(tmp_path / "a.bmp"), bgr) and cv2.imwrite(str(tmp_path / "b.tiff"), bgr)
    ok, png = cv2.imencode(".png", bgr)
    (tmp_path / "c.png").write_bytes(png.tobytes()[:-30])
    (tmp_path / "d.png").write_bytes(png_with_header(60_000, 60_000))
    (tmp_path / "e.gif").write_bytes(b"GIF89a" + bytes(64))
    old = time.time() - 60  # an mtime says nothing of a writer's progress: c.png still gets its grace, then is broken
    for i, name in enumerate(["a.bmp", "b.tiff", "c.png", "d.png", "e.gif"]):
        os.utime(tmp_path / name, (old + i, old + i))
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(tmp_path), "poll_ms": 20}), queue)
    assert wait_for(lambda: len(queue) == 5)
    a, b, d, e, c = drain(queue)
    assert np.array_equal(a.image, image) and np.array_equal(b.image, image)
    assert c.image is None and c.error == "c.png: truncated PNG (no IEND chunk), expected a complete file"
    assert d.image is None and "expected at most max_pixels=50000000" in d.error
    assert e.image is None and e.error.startswith("e.gif: no image header found")


def _every_format(image: np.ndarray) -> dict[str, bytes]:
    """`image` (8-bit grey) saved as every file kind `inspectd train` reads, by OpenCV and Pillow as cameras' tools
    save them: 8- and 16-bit, binary and text PNM, and each kind of WebP (lossless VP8L, lossy VP8, extended VP8X)."""
    from PIL import Image

    rgb = np.dstack([image, 255 - image, image // 2])
    wide = image.astype(np.uint16) << 4  # a 12-bit camera's words
    files = {
        # A .jfif is a JPEG under the name Windows and browsers save it as.
        name: cv2.imencode(Path(name.replace(".jfif", ".jpg")).suffix, pixels, params)[1].tobytes()
        for name, pixels, params in (
            ("a.png", image, []),
            ("b.jpg", image, []),
            ("c.jpeg", rgb, []),
            ("d.jfif", image, []),
            ("e.bmp", rgb, []),
            ("f.tif", image, []),
            ("g.tiff", wide, []),
            ("h.pgm", image, []),
            ("i.pgm", wide, []),
            ("j.ppm", rgb, []),
            ("k.pnm", image, []),
            ("l.pgm", image, [cv2.IMWRITE_PXM_BINARY, 0]),
            ("m.ppm", rgb, [cv2.IMWRITE_PXM_BINARY, 0]),
            ("n.webp", image, []),
            ("o.webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, 90]),
        )
    }
    extended = io.BytesIO()
    Image.fromarray(np.dstack([rgb, image])).save(extended, "WEBP", exif=b"Exif\0\0MM\0*")
    files["p.webp"] = extended.getvalue()
    assert files["n.webp"][12:16] == b"VP8L" and files["o.webp"][12:16] == b"VP8 " and files["p.webp"][12:16] == b"VP8X"
    return files


def test_every_format_train_reads_a_folder_camera_reads_and_does_not_dispose_of_unjudged(tmp_path, ingest_threads):
    """The folder camera refused PGM/PPM/PNM/WebP (`no image header found`), which `inspectd train` reads, and with
    delete_after then deleted each such part after its error result. Every suffix train reads is read here, decoded
    as train's loader decodes it (a 16-bit PGM narrowed as a 16-bit PNG is), and deleted only once judged."""
    from engines.data.images import IMAGE_SUFFIXES, load_image

    inbox = tmp_path / "in"
    inbox.mkdir()
    files = _every_format(SyntheticLine(40, 30, seed=21).next()[0])
    assert {Path(name).suffix for name in files} == IMAGE_SUFFIXES
    old = time.time() - 60
    for i, (name, data) in enumerate(files.items()):
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (old + i, old + i))
    expected = {name: load_image(inbox / name) for name in files}
    queue = FrameQueue(32, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(inbox), "poll_ms": 20, "delete_after": True}), queue)
    assert wait_for(lambda: len(queue) == len(files))
    frames = drain(queue)
    assert [f.frame_id for f in frames] == list(files)  # oldest first
    assert {f.frame_id: f.error for f in frames} == dict.fromkeys(files)
    for f in frames:
        assert np.array_equal(f.image, expected[f.frame_id]), f.frame_id
        f.on_published()
    assert wait_for(lambda: not list(inbox.iterdir()))


def test_a_cut_pnm_or_webp_is_told_from_a_complete_one():
    """A PNM's raster length follows from its header (2 bytes a value over maxval 255; text values counted), and a
    WebP's from its RIFF size: a file cut anywhere is incomplete (a folder waits for it), never decoded to grey."""
    from inspectd.daemon.ingest.headers import IncompleteImage, check_and_decode

    files = _every_format(SyntheticLine(40, 30, seed=22).next()[0])
    for name, data in files.items():
        kind = Path(name).suffix
        if kind not in {".pgm", ".ppm", ".pnm", ".webp"}:
            continue
        assert encoded_dims(data) == (("webp" if kind == ".webp" else "pnm"), 30, 40), name
        check_and_decode(data, name, 1200)
        with pytest.raises(DataError, match="expected at most max_pixels=1199"):
            check_and_decode(data, name, 1199)
        # Cut after its last byte but one, inside its raster, and inside its header.
        text = data[1] in b"23"
        for cut in (len(data) - (20 if text else 1), len(data) // 2, 5):
            with pytest.raises(IncompleteImage):
                check_and_decode(data[:cut], name, 1200)
        assert check_and_decode(data + b"\0" * 16, name, 1200) is not None  # bytes after its end do not matter
    assert encoded_dims(b"P5\n# GIMP\n40 30\n255\n") == ("pnm", 30, 40)
    assert encoded_dims(b"P5\n40 30\n70000\n") is None  # no maxval a PNM can have
    assert encoded_dims(b"RIFF\0\0\0\0AVI LIST" + bytes(32)) is None


def test_a_complete_tiff_of_pixels_frames_cannot_have_is_refused_at_once_not_waited_for():
    """Only a TIFF that does not decode may be one still being written; a float32 or two-channel one is complete."""
    from inspectd.daemon.ingest.headers import IncompleteImage, check_and_decode

    for pixels in (np.full((12, 16), 0.5, np.float32), np.full((12, 16), -3, np.int16)):
        ok, encoded = cv2.imencode(".tiff", pixels)
        assert ok
        with pytest.raises(DataError) as refused:
            check_and_decode(encoded.tobytes(), "f.tiff", max_pixels=10_000)
        assert not isinstance(refused.value, IncompleteImage)
        assert (
            str(refused.value)
            == f"f.tiff: dtype {pixels.dtype}, expected unsigned 8- or 16-bit pixels (uint8 or uint16)"
        )


def test_16_bit_frames_are_narrowed_with_the_bundles_bit_depth(tmp_path, ingest_threads):
    """A 12-bit camera's frames saved as 16-bit PNG/TIFF (0-4095): narrowed >> 4 when the daemon's bundle says 12
    bits, the same 8-bit pixels the camera's 8-bit frames would give; the old >> 8 made them 0-15. A value above full
    scale saturates. The same through a ZeroMQ camera's PNG."""
    rng = np.random.default_rng(4)
    eight = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    twelve = (eight.astype(np.uint16) << 4) | rng.integers(0, 16, eight.shape, dtype=np.uint16)
    over = twelve.copy()
    over[0, :5] = 60_000
    folder = tmp_path / "in"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a.png"), twelve) and cv2.imwrite(str(folder / "b.tiff"), over)
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "folder", "path": str(folder), "poll_ms": 20}), queue, bit_depth=12)
    assert wait_for(lambda: len(queue) == 2)
    a, b = drain(queue)
    assert a.error is None and np.array_equal(a.image, eight)
    saturated = eight.copy()
    saturated[0, :5] = 255
    assert b.error is None and np.array_equal(b.image, saturated)

    endpoint = f"ipc://{tmp_path}/cam1.sock"
    queue = FrameQueue(8, "block")
    start(ingest_threads, camera({"kind": "zmq", "endpoint": endpoint}), queue, bit_depth=12)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.connect(endpoint)
    png16 = cv2.imencode(".png", twelve)[1].tobytes()
    try:
        push.send_multipart([b'{"frame_id": "z", "encoding": "png"}', png16])
        # A producer that says what its PNG holds is taken at its word, not told 16-bit frames are refused.
        push.send_multipart([b'{"frame_id": "said", "encoding": "png", "dtype": "uint16"}', png16])
        push.send_multipart([b'{"frame_id": "jpeg16", "encoding": "jpeg", "dtype": "uint16"}', png16])
        assert wait_for(lambda: len(queue) == 3)
    finally:
        push.close()
    z, said, jpeg16 = drain(queue)
    assert z.error is None and np.array_equal(z.image, eight)
    assert said.error is None and np.array_equal(said.image, eight), said.error
    assert jpeg16.image is None and 'expected "uint8" for a jpeg payload' in jpeg16.error, jpeg16.error


# --- OpenCV and the synthetic line ------------------------------------------------------------------------------------


def test_video_file_plays_through_and_ends(tmp_path, ingest_threads):
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    assert writer.isOpened()
    for i in range(12):
        image = np.full((48, 64, 3), 0, np.uint8)
        image[:, :, 2] = 200  # red in BGR: must come out as red in RGB
        image[:, : 4 + 4 * i, 1] = 255  # a growing green bar tells the frames apart
        writer.write(image)
    writer.release()
    queue = FrameQueue(32, "block")
    ingest = start(ingest_threads, camera({"kind": "opencv", "url": str(path)}), queue)
    assert wait_for(lambda: ingest.stats()["state"] == "ended")
    frames = drain(queue)
    assert [f.frame_id for f in frames] == [str(i) for i in range(12)]
    assert all(f.image.shape == (48, 64, 3) and f.error is None for f in frames)
    assert frames[0].image[:, 32:, 0].mean() > 150 and frames[0].image[:, 32:, 2].mean() < 50
    bars = [int((f.image[24, :, 1] > 128).sum()) for f in frames]
    assert bars == sorted(bars) and bars[-1] > bars[0] + 30
    assert ingest.stats()["reopen_count"] == 0


def test_missing_video_file_is_retried_not_ended(tmp_path, ingest_threads):
    queue = FrameQueue(4)
    ingest = start(ingest_threads, camera({"kind": "opencv", "url": str(tmp_path / "none.avi")}), queue)
    assert wait_for(lambda: ingest.stats()["reopen_count"] >= 2)
    assert ingest.stats()["state"] == "reopening" and "video file not found" in ingest.stats()["last_error"]


def test_synthetic_source_paces_counts_and_knows_the_truth(ingest_threads):
    queue = FrameQueue(64, "block")
    t0 = time.monotonic()
    ingest = start(
        ingest_threads,
        camera(
            {
                "kind": "synthetic",
                "rate_hz": 50,
                "count": 20,
                "width": 96,
                "height": 64,
                "defect_rate": 0.5,
                "seed": 3,
                "encoding": "png",
            }
        ),
        queue,
    )
    assert wait_for(lambda: ingest.stats()["state"] == "ended")
    elapsed = time.monotonic() - t0
    assert 0.3 < elapsed < 5, elapsed  # 20 frames at 50 Hz: ~0.38 s
    frames = drain(queue)
    assert len(frames) == 20 and all(f.image.shape == (64, 96) for f in frames)
    truths = [f.truth for f in frames]
    assert set(truths) == {True, False}


def test_live_source_is_read_and_discarded_while_paused(ingest_threads):
    queue = FrameQueue(64)
    ingest = start(ingest_threads, camera({"kind": "synthetic", "rate_hz": 100, "width": 32, "height": 32}), queue)
    ingest.paused = True
    drain(queue)
    assert wait_for(lambda: ingest.stats()["discarded"] >= 5)
    stats = ingest.stats()
    assert stats["state"] == "paused" and len(queue) <= 1
    ingest.paused = False
    assert wait_for(lambda: len(queue) >= 3)


def test_synthetic_line_frames_masks_and_speed(tmp_path):
    line = SyntheticLine(256, 256, channels=1, defect_rate=1.0, seed=0)
    a, mask_a = line.next()
    b, mask_b = line.next()
    assert a.dtype == np.uint8 and a.shape == (256, 256) and not np.array_equal(a, b)
    assert mask_a.dtype == bool and 0 < mask_a.sum() < 0.05 * mask_a.size
    # The defect is visible: its pixels differ clearly from the rest of the frame.
    assert abs(float(a[mask_a].mean()) - float(a[~mask_a].mean())) > 25
    assert SyntheticLine(64, 64, defect_rate=0.0).next()[1] is None
    rgb, _ = SyntheticLine(64, 48, channels=3).next()
    assert rgb.shape == (48, 64, 3)

    line = SyntheticLine(256, 256, defect_rate=0.2, seed=1)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        line.next()
    per_frame_ms = (time.perf_counter() - t0) / n * 1e3
    assert per_frame_ms < 2.0 * 3, per_frame_ms  # budget 2 ms; slack for a CPU shared with other jobs

    paths = SyntheticLine(64, 64, seed=2).write_folder(tmp_path / "good", 5, defect_rate=0.0)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(5)]
    assert cv2.imread(str(paths[0]), cv2.IMREAD_UNCHANGED).shape == (64, 64)
    assert not (tmp_path / "good" / "masks").exists()
    SyntheticLine(64, 64, seed=2).write_folder(tmp_path / "mixed", 4, defect_rate=1.0)
    assert len(list((tmp_path / "mixed" / "masks").glob("*_mask.png"))) == 4


def test_a_gstreamer_pipeline_is_refused_at_config_load_by_an_opencv_without_gstreamer():
    from inspectd.daemon.ingest.opencv import gstreamer_built_in
    from inspectd.errors import ConfigError

    source = {"kind": "opencv", "pipeline": "videotestsrc ! videoconvert ! appsink"}
    if gstreamer_built_in():
        assert camera(source).source.pipeline == source["pipeline"]
        return
    with pytest.raises(ConfigError) as refused:
        camera(source)
    assert str(refused.value).startswith("cameras[0].source.pipeline: this OpenCV (")
    assert "built without GStreamer" in str(refused.value)


# --- the camera's state ---------------------------------------------------------------------------------------------


def test_a_camera_whose_first_open_is_still_blocked_is_not_reported_running(ingest_threads):
    """An HTTP/RTSP peer that takes the connection and never answers holds the first open for its 5 s timeout. The
    camera delivered nothing all that while, yet it reported `running`: a PLC bridge's trigger_ready up and
    inspectd_camera_up 1 for a camera that was never open."""
    with socket.socket() as silent, capture_logs() as logs:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes each handshake; nothing is ever read or written
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/line.mjpg"
        ingest = start(ingest_threads, camera({"kind": "opencv", "url": url}), FrameQueue(4))
        time.sleep(1.0)
        stats = ingest.stats()
        assert (stats["state"], stats["frames_in"], stats["reopen_count"], stats["last_error"]) == (
            "reopening",
            0,
            0,
            None,
        ), stats
        ingest.paused = True  # paused is shown for a camera that runs, not for one that never opened
        assert ingest.stats()["state"] == "reopening"
        assert wait_for(lambda: ingest.stats()["last_error"] is not None, 10), ingest.stats()
        ingest.stop()
        ingest.join(10)
    states = [(e["state"], e.get("error")) for e in logs if e["event"] == "camera_state"]
    assert states == [("reopening", f"OSError: {url}: cv2.VideoCapture cannot open it"), ("stopped", None)], states


def test_a_camera_is_running_and_says_so_once_its_first_open_succeeds(tmp_path, ingest_threads):
    with capture_logs() as logs:
        cam = camera({"kind": "zmq", "endpoint": f"ipc://{tmp_path}/cam0.sock"})
        ingest = start(ingest_threads, cam, FrameQueue(4))
        assert wait_for(lambda: ingest.stats()["state"] == "running", 5), ingest.stats()
        ingest.paused = True
        assert ingest.stats()["state"] == "paused"
    states = [(e["state"], e.get("reopen_count")) for e in logs if e["event"] == "camera_state"]
    assert states == [("running", 0)], states


ANOTHER_DAEMON = """
import sys, time
from inspectd.daemon.config import parse_config
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
source = {"kind": "folder", "path": sys.argv[1], "poll_ms": 20}
cam = parse_config({"station": "s", "model": {"bundle": "b"}, "cameras": [{"id": "cam0", "source": source}]}).cameras[0]
ingest = CameraIngest(cam, FrameQueue(8, "block"), backoff_s=(0.05, 0.2))
ingest.start()
while ingest.stats()["state"] != "running":
    time.sleep(0.02)
print("running", flush=True)
sys.stdin.read()
ingest.stop()
ingest.join(5)
"""


def test_a_folder_another_daemon_watches_keeps_the_camera_reopening_in_one_line_until_it_lets_go(
    tmp_path, ingest_threads
):
    """Two daemons (a config copied for inspectd@line2, its folder left unchanged) both took the folder's files: each
    part got a result on two stations, or one on the station that did not see it. The other daemon runs as this
    test's user, as every shipped unit runs as the one service user; its camera answers each probe of its lock."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    SyntheticLine(32, 32, seed=3).write_folder(inbox, 2)
    other = subprocess.Popen(
        [sys.executable, "-c", ANOTHER_DAEMON, str(inbox)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        while (line := other.stdout.readline()) not in ("running\n", ""):
            pass  # its log lines
        assert line == "running\n", "the other daemon's camera ended before it ran"
        queue = FrameQueue(8, "block")
        ingest = start(ingest_threads, camera({"kind": "folder", "path": str(inbox), "poll_ms": 20}), queue)
        # More reopens, each a probe of the lock, than its backlog holds: the holder closes them as it scans.
        assert wait_for(lambda: ingest.stats()["reopen_count"] >= 20, 30), ingest.stats()
        stats = ingest.stats()
        assert stats["state"] == "reopening" and len(queue) == 0, stats
        assert stats["last_error"] == (
            f"OSError: {inbox}: watched by another process of this user (pid {other.pid}: another daemon's folder "
            "camera), expected a folder no other camera watches"
        )
    finally:
        other.communicate(timeout=20)
    assert other.returncode == 0, other.stderr
    assert wait_for(lambda: len(queue) == 2), ingest.stats()
    assert ingest.stats()["state"] == "running"


SQUATTER = """
import hashlib, os, socket, sys
digest = hashlib.sha256(os.fsencode(os.path.realpath(sys.argv[1]))).hexdigest()
held = []
for name in (f"inspectd-folder-{digest}", f"inspectd-folder-0-{digest}"):  # every name a root camera might use
    held.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    held[-1].bind(b"\\0" + name.encode())
    if sys.argv[2] == "listening":
        held[-1].listen(16)
print("bound", os.geteuid(), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs another user to hold the name, so the test must run as root")
@pytest.mark.parametrize("listening", [True, False])
def test_a_folder_lock_name_held_by_another_user_does_not_keep_the_camera_from_opening(open_tmp_path, listening):
    """The lock's name is predictable and an abstract socket has no permissions: user nobody, who may not even list
    the folder, bound it first and kept the camera `reopening` for as long as it lived, blamed on another daemon."""
    from inspectd.daemon.ingest.folder import FolderWatcher

    inbox = open_tmp_path / "in"
    inbox.mkdir(mode=0o700)
    other = subprocess.Popen(
        as_nobody([sys.executable, "-c", SQUATTER, str(inbox), "listening" if listening else "bound"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert other.stdout.readline() == f"bound {NOBODY}\n", other.stderr.read() if other.poll() else ""
        watcher = FolderWatcher(camera({"kind": "folder", "path": str(inbox), "poll_ms": 20}), time.time)
        with capture_logs() as logs:
            watcher.open(threading.Event())
        watcher.close()
        taken = [entry for entry in logs if entry["event"] == "folder_lock_taken"]
        assert [entry["holder_uid"] for entry in taken] == [NOBODY if listening else None], logs
    finally:
        other.communicate("", timeout=20)


def test_a_folder_lock_that_cannot_be_made_is_said_and_the_folder_watched(tmp_path, monkeypatch):
    """A unit whose RestrictAddressFamilies= left out AF_UNIX, or a full descriptor table: the folder was watched
    unlocked without a word, so two daemons on it were not kept apart and nothing said why."""
    import errno

    from inspectd.daemon.ingest import folder as folder_source

    inbox = tmp_path / "in"
    inbox.mkdir()

    def refused(*args, **kwargs):
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(folder_source.socket, "socket", refused)
    watcher = folder_source.FolderWatcher(camera({"kind": "folder", "path": str(inbox), "poll_ms": 20}), time.time)
    with capture_logs() as logs:
        watcher.open(threading.Event())
    watcher.close()
    said = [entry for entry in logs if entry["event"] == "folder_lock_unavailable"]
    assert len(said) == 1 and "Address family not supported" in said[0]["error"], logs


def test_a_folder_cameras_own_reopen_and_a_new_camera_after_its_close_are_not_locked_out(tmp_path, ingest_threads):
    """The lock is this camera's while it is open: a reopen (close, then open) of the same camera takes it again, and
    after its close another camera on the folder (a daemon started after this one stopped) runs."""
    from inspectd.daemon.ingest.folder import FolderWatcher

    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    done.mkdir()
    SyntheticLine(32, 32, seed=3).write_folder(inbox, 2)
    source = {"kind": "folder", "path": str(inbox), "done_dir": str(done), "poll_ms": 20}
    stop = threading.Event()
    first = FolderWatcher(camera(source), time.time)
    first.open(stop)
    second = FolderWatcher(camera(source), time.time)
    with pytest.raises(OSError, match="watched by another process"):
        second.open(stop)
    second.close()
    first.close()
    first.open(stop)  # a reopen of the same camera
    first.close()
    second.open(stop)
    second.close()
    # Through the supervisor: an outage (done_dir made unwritable) reopens the camera, which then runs and moves.
    queue = FrameQueue(8, "block")
    with unwritable(done):
        ingest = start(ingest_threads, camera(source), queue)
        assert wait_for(lambda: ingest.stats()["reopen_count"] >= 2), ingest.stats()
        assert "cannot move files there" in ingest.stats()["last_error"]
    assert wait_for(lambda: len(queue) == 2), ingest.stats()
    assert ingest.stats()["state"] == "running"
    for frame in drain(queue):
        frame.on_published()
    assert wait_for(lambda: len(list(done.iterdir())) == 2)


def test_a_folder_put_anew_at_the_watched_path_is_still_refused_to_a_second_camera(tmp_path):
    """The lock was taken on the folder's inode at open, while every scan reads the path: after `mv in in.old; mkdir
    in` (or a share mounted over it) the first camera kept watching the path and a second daemon locked the new
    folder and watched it too."""
    from inspectd.daemon.ingest.folder import FolderWatcher

    inbox = tmp_path / "in"
    inbox.mkdir()
    source = {"kind": "folder", "path": str(inbox), "poll_ms": 20}
    stop = threading.Event()
    first = FolderWatcher(camera(source), time.time)
    first.open(stop)
    try:
        inbox.rename(tmp_path / "in.old")
        inbox.mkdir()
        second = FolderWatcher(camera(source), time.time)
        with pytest.raises(OSError, match="watched by another process"):
            second.open(stop)
        # And by another spelling of the same path, through a symlinked parent.
        (tmp_path / "link").symlink_to(tmp_path)
        third = FolderWatcher(camera({**source, "path": str(tmp_path / "link" / "in")}), time.time)
        with pytest.raises(OSError, match="watched by another process"):
            third.open(stop)
    finally:
        first.close()
    second.open(stop)
    second.close()


def test_a_watching_folder_camera_holds_nothing_in_its_folder_so_its_mount_can_be_unmounted(tmp_path):
    """The lock held a descriptor of the watched folder for as long as the camera was open: `umount` of a camera
    share or disk failed with "target is busy" until the daemon stopped."""
    from inspectd.daemon.ingest.folder import FolderWatcher

    inbox = tmp_path / "in"
    inbox.mkdir()
    stop = threading.Event()

    def held_in(folder: Path) -> list[str]:
        held = []
        for entry in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{entry}")
                if target == str(folder) or target.startswith(f"{folder}/"):
                    held.append(target)
        return held

    watcher = FolderWatcher(camera({"kind": "folder", "path": str(inbox), "poll_ms": 20}), time.time)
    watcher.open(stop)
    try:
        assert held_in(inbox) == []
    finally:
        watcher.close()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inbox)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs mount here (as uid {os.geteuid()}): the umount part needs one")
    try:
        watcher = FolderWatcher(camera({"kind": "folder", "path": str(inbox), "poll_ms": 20}), time.time)
        watcher.open(stop)
        try:
            done = subprocess.run(["umount", str(inbox)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        finally:
            watcher.close()
    finally:
        if os.path.ismount(inbox):
            subprocess.run(["umount", "-l", str(inbox)], check=False)
