"""The ipc:// sockets the daemon binds (control, publish, a zmq camera) under the units' UMask=0077: each socket file
is mode 0660, so a process of another user in the service's group connects (`inspectd web`, `subscribe`, a frame
producer) and one outside the group is refused. Real sockets, and real processes of another uid
(tests/other_user.py)."""

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

from inspectd.daemon.config import parse_config
from inspectd.daemon.control import ControlServer
from inspectd.daemon.ingest.zmq_pull import ZmqPullSource
from inspectd.daemon.publish import Publisher
from other_user import NOBODY, as_nobody
from station_model import QUIET_STATUS

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[1]

# What a member of the service's group runs against each socket: the project's own clients where there is one.
GROUP_MEMBER = r"""
import json, sys
role, endpoint = sys.argv[1], sys.argv[2]
if role == "control":
    from inspectd.protocol.control import ControlClient
    with ControlClient(endpoint, timeout_s=10) as client:
        print(json.dumps(client.request({"cmd": "status"})))
elif role == "publish":
    from inspectd.clients.subscribe import Subscriber
    print(json.dumps(Subscriber(endpoint).recv(10.0)))
else:
    import zmq
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.linger = 10000  # close() waits this long for the frame to leave
    sock.immediate = True  # no queue before a connection is made: "sent" means handed to one, not only queued
    sock.sndtimeo = 10000
    sock.connect(endpoint)
    header = {"frame_id": "from-the-group", "dtype": "uint8", "encoding": "raw", "shape": [4, 4]}
    try:
        sock.send_multipart([json.dumps(header).encode(), bytes(16)])
        sent = True
    except zmq.Again:
        sent = "no connection to the camera's socket within 10 s"
    sock.close()
    print(json.dumps({"sent": sent}))
"""
# Outside the group: the kernel's answer to a plain connect, at once (ZeroMQ would retry it without a word).
OUTSIDER = r"""
import socket, sys
with socket.socket(socket.AF_UNIX) as sock:
    try:
        sock.connect(sys.argv[1])
    except PermissionError:
        print("refused")
    else:
        print("connected")
"""


class Handler:
    def status(self) -> dict:
        return {"station": "s"}


@pytest.fixture
def service_umask():
    """The units' UMask=0077, for the sockets bound during the test."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _as_group_member(role: str, endpoint: str) -> dict:
    done = subprocess.run(
        as_nobody([sys.executable, "-c", GROUP_MEMBER, role, endpoint], group=os.getegid()),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _outsider(path: Path) -> str:
    done = subprocess.run(
        as_nobody([sys.executable, "-c", OUTSIDER, str(path)], group=NOBODY),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _another_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root to become one")


def _wait(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.02)


def test_the_control_socket_lets_in_the_group_and_no_one_else(open_tmp_path, service_umask):
    path = open_tmp_path / "control.sock"
    server = ControlServer(f"ipc://{path}", Handler())
    server.start()
    try:
        assert oct(_mode(path)) == "0o660"
        _another_user()
        assert _as_group_member("control", server.endpoint) == {"ok": True, "station": "s"}
        assert _outsider(path) == "refused"
    finally:
        server.stop()


def test_the_publish_socket_lets_in_the_group_also_after_a_rebind(open_tmp_path, service_umask):
    path = open_tmp_path / "pub.sock"
    publisher = Publisher(f"ipc://{path}", "s", status_interval_s=0.1, status=lambda: QUIET_STATUS).start()
    try:
        assert oct(_mode(path)) == "0o660"
        # A reload that removed a client key binds the endpoint again: a new socket file, under the same umask.
        publisher.drop_peers()
        _wait(lambda: publisher.rebinds == 1, "the publisher's rebind")
        assert oct(_mode(path)) == "0o660"
        _another_user()
        assert _as_group_member("publish", publisher.bound_endpoint)["station"] == "s"
        assert _outsider(path) == "refused"
    finally:
        publisher.stop(5)


def test_a_zmq_cameras_socket_takes_frames_from_a_producer_in_the_group(open_tmp_path, service_umask):
    path = open_tmp_path / "cam0.sock"
    config = parse_config(
        {
            "station": "s",
            "model": {"bundle": "b"},
            "state_dir": str(open_tmp_path),
            "cameras": [{"id": "cam0", "source": {"kind": "zmq", "endpoint": f"ipc://{path}"}}],
        }
    )
    source = ZmqPullSource(config.cameras[0], clock=time.time)
    stop = threading.Event()
    source.open(stop)
    try:
        assert oct(_mode(path)) == "0o660"
        _another_user()
        assert _as_group_member("zmq", f"ipc://{path}") == {"sent": True}
        deadline = time.monotonic() + 10
        frame = None
        while frame is None and time.monotonic() < deadline:
            frame = source.read(stop)
        assert frame is not None, "the group member's frame did not arrive within 10 s"
        assert frame.frame_id == "from-the-group" and frame.error is None and frame.image.shape == (4, 4)
        assert _outsider(path) == "refused"
    finally:
        source.close()
