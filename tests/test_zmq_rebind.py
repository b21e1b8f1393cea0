"""A zmq camera bound to an ipc socket file that is removed, or taken by another bind, while it runs: a real camera
(CameraIngest on the real zmq source) and real PUSH and PULL sockets. Producers can no longer reach such a socket,
so the camera must say so and bind the path again rather than wait on in silence as `running`, also while it
receives without pause, and without losing what producers connected through the old file handed over."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from structlog.testing import capture_logs

from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from inspectd.daemon.ingest.zmq_pull import ZmqPullSource
from test_ingest import camera, drain, wait_for

pytestmark = pytest.mark.timeout(60)

# Binds a PULL socket to the endpoint given, then holds it until its stdin closes.
OTHER_BINDER = "import sys, zmq; s = zmq.Context().socket(zmq.PULL); s.bind(sys.argv[1]); sys.stdin.read(); s.close(0)"


def start(ingest_threads, endpoint: str, queue: FrameQueue) -> CameraIngest:
    ingest = CameraIngest(camera({"kind": "zmq", "endpoint": endpoint}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    return ingest


def message(frame_id: str) -> list[bytes]:
    return [json.dumps({"frame_id": frame_id, "dtype": "uint8", "shape": [4, 4]}).encode(), bytes(16)]


def send(endpoint: str, queue: FrameQueue, tag: str, count: int = 3) -> list[Frame]:
    """`count` frames from a fresh producer, as the camera queued them."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    try:
        push.connect(endpoint)
        for i in range(count):
            push.send_multipart(message(f"{tag}{i}"))
        assert wait_for(lambda: len(queue) >= count, 5), f"{len(queue)} of {count} frames {tag}*"
    finally:
        push.close()
    return drain(queue)


GONE = "its socket file is gone (No such file or directory), expected it there while bound: producers could not "
GONE += "connect, bound again"


def test_a_removed_socket_file_is_reported_and_bound_again(tmp_path, ingest_threads):
    path = tmp_path / "cam0.sock"
    endpoint = f"ipc://{path}"
    queue = FrameQueue(16, "block")
    with capture_logs() as logs:
        ingest = start(ingest_threads, endpoint, queue)
        assert [f.frame_id for f in send(endpoint, queue, "before")] == ["before0", "before1", "before2"]
        time.sleep(1.5)  # idle past a check of the file, which is still the one bound: nothing to do
        assert ingest.stats()["last_error"] is None and ingest.stats()["state"] == "running", ingest.stats()
        path.unlink()  # a tmp cleaner, or an operator
        assert wait_for(lambda: path.is_socket(), 5), ingest.stats()
        frames = send(endpoint, queue, "after")
    assert [(f.frame_id, f.seq) for f in frames] == [("after0", 3), ("after1", 4), ("after2", 5)]
    stats = ingest.stats()
    assert (stats["state"], stats["reopen_count"], stats["last_error"]) == ("running", 0, f"{endpoint}: {GONE}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # as every ipc socket file the daemon binds
    rebound = [e for e in logs if e["event"] == "socket_file_rebound"]
    assert [(e["log_level"], e["error"]) for e in rebound] == [("warning", f"{endpoint}: {GONE}")], rebound


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_socket_file_removed_under_steady_load_is_bound_again_losing_nothing(tmp_path, ingest_threads, how):
    """Producer A sends without pause, so the camera never idles: it checked the file only when idle, and a new
    producer could not connect for as long as A's load lasted. Bound again in place, A's connection stays, and every
    frame A handed over arrives, in order."""
    path = tmp_path / "cam0.sock"
    endpoint = f"ipc://{path}"
    queue = FrameQueue(2000, "block")
    ingest = start(ingest_threads, endpoint, queue)
    assert wait_for(lambda: path.is_socket(), 5)
    sending = threading.Event()
    sending.set()
    sent: list[str] = []

    def producer_a() -> None:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.linger = 5000
        push.connect(endpoint)
        try:
            while sending.is_set():
                frame_id = f"a{len(sent)}"
                push.send_multipart(message(frame_id))
                sent.append(frame_id)
                time.sleep(0.01)
        finally:
            push.close()

    a = threading.Thread(target=producer_a)
    a.start()
    try:
        assert wait_for(lambda: len(queue) >= 20, 5)
        if how == "removed":
            path.unlink()
        else:
            replacement = tmp_path / "new.sock"
            replacement.write_bytes(b"")  # a file made again at the path, no one listening on it
            os.replace(replacement, path)
        # B connects and sends while A goes on.
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.linger = 0
        push.connect(endpoint)
        for i in range(3):
            push.send_multipart(message(f"b{i}"))
        got: list[str] = []

        def b_arrived() -> bool:
            got.extend(f.frame_id for f in drain(queue))
            return {"b0", "b1", "b2"} <= set(got)

        assert wait_for(b_arrived, 4), (ingest.stats(), path.exists())
        assert sending.is_set() and a.is_alive()  # under load all along
        push.close()
    finally:
        sending.clear()
        a.join(10)
    assert wait_for(lambda: got.extend(f.frame_id for f in drain(queue)) or len(got) >= len(sent) + 3, 5)
    assert [f for f in got if f.startswith("a")] == sent
    stats = ingest.stats()
    assert stats["state"] == "running" and stats["reopen_count"] == 0, stats
    replaced = "its socket file is another one now, expected the one bound: producers could not connect, bound again"
    what = GONE if how == "removed" else replaced
    assert stats["last_error"] == f"{endpoint}: {what}"


def test_a_socket_file_removed_more_often_than_it_may_be_bound_again_in_place_reopens_the_camera(
    tmp_path, ingest_threads, monkeypatch
):
    """Each rebind in place keeps a listener open on the removed file until the socket closes: past the bound, the
    camera is reopened, which closes them."""
    monkeypatch.setattr("inspectd.daemon.socket_file.MAX_REBINDS", 1)
    path = tmp_path / "cam0.sock"
    endpoint = f"ipc://{path}"
    queue = FrameQueue(16, "block")
    ingest = start(ingest_threads, endpoint, queue)
    # Running, not only bound: a file removed between the bind and the open's look at it reopened the camera.
    assert wait_for(lambda: ingest.stats()["state"] == "running", 5)
    path.unlink()
    assert wait_for(lambda: path.is_socket(), 5)
    assert ingest.stats()["reopen_count"] == 0
    path.unlink()
    assert wait_for(lambda: ingest.stats()["reopen_count"] == 1 and ingest.stats()["state"] == "running", 5)
    assert ingest.stats()["last_error"] == (
        f"OSError: {endpoint}: its socket file is gone (No such file or directory), expected it there while bound, "
        "bound again 1 times: reopening"
    )
    assert [f.seq for f in send(endpoint, queue, "after")] == [0, 1, 2]


def test_past_the_rebind_bound_a_busy_camera_is_reopened_only_once_its_producers_pause_losing_nothing(
    tmp_path, ingest_threads, monkeypatch
):
    """Reopened at once, the camera closed its socket under load: what it still held was logged lost, and what was on
    its way in the OS buffers was dropped unseen."""
    monkeypatch.setattr("inspectd.daemon.socket_file.MAX_REBINDS", 1)
    path = tmp_path / "cam0.sock"
    endpoint = f"ipc://{path}"
    queue = FrameQueue(100_000, "block")
    ingest = start(ingest_threads, endpoint, queue)
    assert wait_for(lambda: path.is_socket(), 5)
    sending = threading.Event()
    sending.set()
    sent: list[str] = []

    def producer() -> None:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.linger = 5000
        push.connect(endpoint)
        try:
            while sending.is_set():
                for _ in range(10):
                    frame_id = f"a{len(sent)}"
                    push.send_multipart(message(frame_id))
                    sent.append(frame_id)
                time.sleep(0.002)
        finally:
            push.close()

    a = threading.Thread(target=producer)
    a.start()
    try:
        assert wait_for(lambda: len(queue) >= 100, 5)
        path.unlink()
        assert wait_for(lambda: path.is_socket(), 5)  # bound again in place: the one rebind allowed
        path.unlink()
        limit = "its socket file is gone (No such file or directory), expected it there while bound, bound again 1"
        assert wait_for(
            lambda: f"{limit} times: reopening once no producer sends" in (ingest.stats()["last_error"] or ""), 5
        )
        time.sleep(0.5)
        assert ingest.stats()["reopen_count"] == 0 and a.is_alive()  # under load all along: not reopened yet
    finally:
        sending.clear()
        a.join(10)
    assert wait_for(lambda: ingest.stats()["reopen_count"] == 1 and ingest.stats()["state"] == "running", 5)
    assert ingest.stats()["last_error"] == f"OSError: {endpoint}: {limit} times: reopening"
    got = [f.frame_id for f in drain(queue)]
    assert len(sent) > 1000 and got == sent, (len(got), len(sent), sorted(set(sent) - set(got))[:10])
    assert [f.frame_id for f in send(endpoint, queue, "after")] == ["after0", "after1", "after2"]


def test_a_socket_file_another_bind_took_is_reported_and_bound_again_once_it_is_free(tmp_path, ingest_threads):
    """ZeroMQ's ipc bind unlinks the file at the path and makes its own: the camera's socket is left with no file."""
    path = tmp_path / "cam0.sock"
    endpoint = f"ipc://{path}"
    queue = FrameQueue(16, "block")
    with capture_logs() as logs:
        ingest = start(ingest_threads, endpoint, queue)
        assert wait_for(lambda: path.is_socket(), 5)
        assert [f.frame_id for f in send(endpoint, queue, "before")] == ["before0", "before1", "before2"]
        # Another process: a listener of the daemon's own is taken for one it has yet to close, and bound over.
        other = subprocess.Popen([sys.executable, "-c", OTHER_BINDER, endpoint], stdin=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: ingest.stats()["reopen_count"] >= 2, 10), (ingest.stats(), logs)
            # While the other process serves the path the camera retries, as it does for a taken port.
            assert "another process serves ipc socket" in ingest.stats()["last_error"], ingest.stats()
            assert ingest.stats()["state"] == "reopening"
        finally:
            other.communicate("", timeout=10)  # it exits; its file stays, served by no one: the camera binds over it
        assert wait_for(lambda: ingest.stats()["state"] == "running", 5), ingest.stats()
        frames = send(endpoint, queue, "after")
    assert [(f.frame_id, f.seq) for f in frames] == [("after0", 3), ("after1", 4), ("after2", 5)]
    errors = [e.get("error") for e in logs if e["event"] == "camera_state" and e["state"] == "reopening"]
    assert errors[0] == (
        f"OSError: {endpoint}: its socket file was bound by another process, which serves it now: producers reach "
        "that process, not this camera; binding again once the path is free"
    ), errors


def test_an_abstract_ipc_name_has_no_file_to_check_and_stays_bound(tmp_path, ingest_threads):
    endpoint = f"ipc://@inspectd-test-{os.getpid()}-{Path(tmp_path).name}"
    queue = FrameQueue(16, "block")
    ingest = start(ingest_threads, endpoint, queue)
    assert [f.frame_id for f in send(endpoint, queue, "a")] == ["a0", "a1", "a2"]
    time.sleep(1.3)
    assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["state"] == "running", ingest.stats()
    assert [f.seq for f in send(endpoint, queue, "b")] == [3, 4, 5]


def test_messages_still_in_the_socket_when_it_closes_are_counted_in_the_cameras_status(tmp_path):
    """They were logged one by one as `frame_not_accepted`, but no counter of the status said a reopen had lost any."""
    endpoint = f"ipc://{tmp_path / 'cam0.sock'}"
    source = ZmqPullSource(camera({"kind": "zmq", "endpoint": endpoint}), clock=time.time)
    source.open(threading.Event())
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.connect(endpoint)
    for i in range(3):
        push.send_multipart(message(f"f{i}"))
    assert source.poller is not None and source.poller.poll(5000)  # in the camera's socket, not yet read
    time.sleep(0.2)
    with capture_logs() as logs:
        source.close()
    push.close()
    lost = [e["frame_id"] for e in logs if e["event"] == "frame_not_accepted"]
    assert lost and lost == [f"f{i}" for i in range(len(lost))]
    assert source.stats() == {"not_accepted": len(lost)}
