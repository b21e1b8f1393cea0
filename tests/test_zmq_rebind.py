"""A zmq camera bound to an ipc socket file that is removed, or taken by another bind, while it runs: a real camera
(CameraIngest on the real zmq source) and real PUSH and PULL sockets. Producers can no longer reach such a socket,
so the camera must say so and bind the path again rather than wait on in silence as `running`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from structlog.testing import capture_logs

from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from test_ingest import camera, drain, wait_for

pytestmark = pytest.mark.timeout(60)

# Binds a PULL socket to the endpoint given, then holds it until its stdin closes.
OTHER_BINDER = "import sys, zmq; s = zmq.Context().socket(zmq.PULL); s.bind(sys.argv[1]); sys.stdin.read(); s.close(0)"


def start(ingest_threads, endpoint: str, queue: FrameQueue) -> CameraIngest:
    ingest = CameraIngest(camera({"kind": "zmq", "endpoint": endpoint}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    return ingest


def send(endpoint: str, queue: FrameQueue, tag: str, count: int = 3) -> list[Frame]:
    """`count` frames from a fresh producer, as the camera queued them."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    try:
        push.connect(endpoint)
        for i in range(count):
            header = {"frame_id": f"{tag}{i}", "dtype": "uint8", "shape": [4, 4]}
            push.send_multipart([json.dumps(header).encode(), bytes(16)])
        assert wait_for(lambda: len(queue) >= count, 5), f"{len(queue)} of {count} frames {tag}*"
    finally:
        push.close()
    return drain(queue)


def test_a_removed_socket_file_is_reported_and_bound_again(tmp_path, ingest_threads):
    path = tmp_path / "cam0.sock"
    endpoint = f"ipc://{path}"
    queue = FrameQueue(16, "block")
    with capture_logs() as logs:
        ingest = start(ingest_threads, endpoint, queue)
        assert [f.frame_id for f in send(endpoint, queue, "before")] == ["before0", "before1", "before2"]
        time.sleep(1.5)  # idle past a check of the file, which is still the one bound: nothing to do
        assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["state"] == "running", ingest.stats()
        path.unlink()  # a tmp cleaner, or an operator
        assert wait_for(lambda: ingest.stats()["reopen_count"] >= 1 and ingest.stats()["state"] == "running", 5), (
            ingest.stats()
        )
        assert path.is_socket()
        frames = send(endpoint, queue, "after")
    assert [(f.frame_id, f.seq) for f in frames] == [("after0", 3), ("after1", 4), ("after2", 5)]
    gone = f"OSError: {endpoint}: its socket file is gone (No such file or directory), expected it there while "
    gone += "bound: producers cannot connect, binding again"
    assert ingest.stats()["last_error"] == gone
    states = [(e["state"], e.get("error")) for e in logs if e["event"] == "camera_state"]
    assert states[-2:] == [("reopening", gone), ("running", None)], states


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
        f"OSError: {endpoint}: its socket file is another one now (made again, or bound by another process), "
        "expected the one bound: producers cannot reach this camera, binding again"
    ), errors


def test_an_abstract_ipc_name_has_no_file_to_check_and_stays_bound(tmp_path, ingest_threads):
    endpoint = f"ipc://@inspectd-test-{os.getpid()}-{Path(tmp_path).name}"
    queue = FrameQueue(16, "block")
    ingest = start(ingest_threads, endpoint, queue)
    assert [f.frame_id for f in send(endpoint, queue, "a")] == ["a0", "a1", "a2"]
    time.sleep(1.3)
    assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["state"] == "running", ingest.stats()
    assert [f.seq for f in send(endpoint, queue, "b")] == [3, 4, 5]
