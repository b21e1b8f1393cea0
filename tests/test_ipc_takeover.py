"""An ipc:// path another live process serves is not taken over: ZeroMQ's ipc bind unlinks whatever socket file is
there and binds anew, so without a check a second daemon naming the first one's path would silently take it (whoever
connects next follows the newcomer). The daemon treats such a path as a taken tcp port: the publisher and the control
channel fail the start, a zmq camera retries, a publisher rebinding retries. A stale file (no process listening) is
bound over as before. Real daemons, real sockets, real processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from daemon_harness import REPO, Station
from inspectd.clients.subscribe import Subscriber
from inspectd.daemon import publish
from inspectd.daemon.config import parse_config
from inspectd.daemon.control import ControlServer
from inspectd.daemon.ingest.zmq_pull import ZmqPullSource
from inspectd.daemon.publish import Publisher
from inspectd.daemon.security import refuse_served_ipc
from inspectd.protocol.control import ControlClient
from station_model import QUIET_STATUS, result_for, write_grey_bundle

pytestmark = pytest.mark.timeout(120)

SERVED = "another process serves ipc socket"
SYNTHETIC = {"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 5, "width": 64, "height": 64}}
# Another process publishing on an endpoint until its stdin closes: a daemon's publisher without the daemon.
FOREIGN_PUBLISHER = r"""
import json, sys
from inspectd.daemon.publish import Publisher
status = json.loads(sys.argv[2])
publisher = Publisher(sys.argv[1], "foreign", status_interval_s=0.1, status=lambda: status).start()
print("serving", flush=True)
sys.stdin.read()
publisher.stop(5)
"""


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def _station_heard(sub: Subscriber, timeout: float = 10.0) -> str:
    """The station named by the next status message `sub` receives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = sub.recv(0.2)
        if isinstance(message, dict):
            return message["station"]
    raise AssertionError(f"no status message on {sub.endpoint} within {timeout} s")


def _path(endpoint: str) -> str:
    return endpoint[len("ipc://") :]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_grey_bundle(tmp_path_factory.mktemp("model") / "bundle")


@pytest.fixture(scope="module")
def first(tmp_path_factory, bundle):
    """The daemon already serving: publish, control and a zmq camera, each on an ipc socket file of its own."""
    tmp = tmp_path_factory.mktemp("first")
    camera = {"id": "cam0", "source": {"kind": "zmq", "endpoint": f"ipc://{tmp}/cam0.sock"}}
    station = Station(tmp, bundle, [camera], station="first")
    try:
        station.wait_ready()
        yield station
    finally:
        assert station.stop() == 0, station.log_tail()


def _refused_start(second: Station, key: str, path: str) -> None:
    """`second` ends its start with exit 1, its one error naming `key`, the path, and that another process serves it."""
    _wait(
        lambda: second.proc.poll() is not None or "READY=1" in second.note_lines,
        "the second daemon's start to end",
        60,
    )
    assert second.proc.poll() == 1, f"the second daemon started over the first one's {key}; log:\n{second.log_tail()}"
    [failed] = second.events("start_failed")
    assert failed["error"].startswith(f"{key} ") and f"{SERVED} {path} " in failed["error"], failed
    assert "\n" not in failed["error"]


def test_a_second_daemon_on_the_first_ones_publish_path_fails_to_start_and_the_first_keeps_its_subscribers(
    first, tmp_path, bundle
):
    second = Station(tmp_path, bundle, [SYNTHETIC], station="second", publish={"endpoint": first.publish})
    try:
        _refused_start(second, "publish.endpoint", _path(first.publish))
    finally:
        second.close()
    assert _station_heard(first.sub) == "first"  # connected before the second daemon came
    with Subscriber(first.publish) as fresh:  # and one that connects now
        assert _station_heard(fresh) == "first"


def test_a_second_daemon_on_the_first_ones_control_path_fails_to_start_and_the_first_keeps_answering(
    first, tmp_path, bundle
):
    second = Station(tmp_path, bundle, [SYNTHETIC], station="second", control={"endpoint": first.control_endpoint})
    try:
        _refused_start(second, "control.endpoint", _path(first.control_endpoint))
    finally:
        second.close()
    reply = first.control({"cmd": "status"}, timeout=10)
    assert reply["ok"] and reply["station"] == "first"


def test_a_second_daemons_zmq_camera_on_the_first_ones_path_retries_and_the_first_keeps_the_frames(
    first, tmp_path, bundle
):
    endpoint = first.config["cameras"][0]["source"]["endpoint"]
    camera = {"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint}}
    second = Station(tmp_path, bundle, [camera], station="second")
    try:
        second.wait_ready()  # a camera that cannot bind fails no start: it is reopened with backoff
        _wait(
            lambda: any(
                e.get("state") == "reopening" and f"{SERVED} {_path(endpoint)} " in e.get("error", "")
                for e in second.events("camera_state")
            ),
            "the second daemon's camera refused with the path named",
            30,
        )
        assert not any(e.get("state") == "running" for e in second.events("camera_state")), second.log_tail()
        producer = zmq.Context.instance().socket(zmq.PUSH)
        producer.linger = 0
        try:
            producer.connect(endpoint)
            header = {"frame_id": "to-the-first", "dtype": "uint8", "encoding": "raw", "shape": [64, 64]}
            producer.send_multipart([json.dumps(header).encode(), bytes(64 * 64)])
            assert result_for(first, "to-the-first", timeout=20).camera == "cam0"
        finally:
            producer.close()
        assert second.stop() == 0, second.log_tail()
    finally:
        second.close()


def test_a_publisher_rebinding_leaves_the_path_to_a_process_serving_it_meanwhile_and_binds_once_it_is_gone(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(publish, "BIND_RETRY_S", 0.1)
    folder = tmp_path / "ipc"
    folder.mkdir()
    endpoint = f"ipc://{folder}/pub.sock"
    publisher = Publisher(endpoint, "first", status_interval_s=0.1, status=lambda: QUIET_STATUS).start()
    foreign = None
    try:
        # The ipc folder gone, the rebind a reload asks for fails: the publisher is unbound and retries.
        os.unlink(folder / "pub.sock")
        folder.rmdir()
        publisher.drop_peers()
        _wait(lambda: not publisher.bound, "the rebind to fail")
        # The other process binds in a folder of its own, which then takes the ipc folder's place: its socket is
        # there, served, before the publisher's next try can find the folder empty.
        staging = tmp_path / "staging"
        staging.mkdir()
        foreign = subprocess.Popen(
            [sys.executable, "-c", FOREIGN_PUBLISHER, f"ipc://{staging}/pub.sock", json.dumps(QUIET_STATUS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert foreign.stdout is not None and foreign.stdout.readline().strip() == "serving"
        staging.rename(folder)
        serving_since = time.monotonic()
        # A bind try made after the other process began serving: one that failed leaves its next try set later.
        _wait(
            lambda: publisher.bound or publisher._bind_retry_at - publish.BIND_RETRY_S > serving_since,
            "a bind try",
        )
        assert not publisher.bound, "the publisher bound over the path another process serves"
        with Subscriber(endpoint) as fresh:
            assert _station_heard(fresh) == "foreign"
        assert foreign.stdin is not None
        foreign.stdin.close()
        assert foreign.wait(10) == 0
        foreign = None
        # Its socket file stays behind, stale: bound over at the next try.
        _wait(lambda: publisher.bound, "the bind once the other process is gone")
        with Subscriber(endpoint) as fresh:
            assert _station_heard(fresh) == "first"
    finally:
        if foreign is not None:
            foreign.kill()
            foreign.wait(10)
        assert publisher.stop(5)


def _stale(path: Path) -> None:
    """A socket file nobody listens on, as a daemon that crashed leaves it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
    assert path.exists()


class _Handler:
    def status(self) -> dict:
        return {"station": "s"}


def test_a_stale_socket_file_is_bound_over_by_the_publisher_the_control_channel_and_a_zmq_camera(tmp_path):
    for name in ("pub.sock", "control.sock", "cam0.sock"):
        _stale(tmp_path / name)
    publisher = Publisher(f"ipc://{tmp_path}/pub.sock", "s", status_interval_s=0.1, status=lambda: QUIET_STATUS)
    publisher.start()
    control = ControlServer(f"ipc://{tmp_path}/control.sock", _Handler())
    config = parse_config(
        {
            "station": "s",
            "model": {"bundle": "b"},
            "cameras": [{"id": "cam0", "source": {"kind": "zmq", "endpoint": f"ipc://{tmp_path}/cam0.sock"}}],
        }
    )
    source = ZmqPullSource(config.cameras[0], clock=time.time)
    stop = threading.Event()
    producer = zmq.Context.instance().socket(zmq.PUSH)
    producer.linger = 0
    try:
        control.start()
        source.open(stop)
        with Subscriber(publisher.bound_endpoint) as sub:
            assert _station_heard(sub) == "s"
        with ControlClient(control.endpoint, timeout_s=10) as client:
            assert client.request({"cmd": "status"})["station"] == "s"
        producer.connect(f"ipc://{tmp_path}/cam0.sock")
        header = {"frame_id": "over-the-stale-file", "dtype": "uint8", "encoding": "raw", "shape": [4, 4]}
        producer.send_multipart([json.dumps(header).encode(), bytes(16)])
        deadline = time.monotonic() + 10
        frame = None
        while frame is None and time.monotonic() < deadline:
            frame = source.read(stop)
        assert frame is not None and frame.frame_id == "over-the-stale-file" and frame.error is None
    finally:
        producer.close()
        source.close()
        control.stop()
        assert publisher.stop(5)


def test_a_listener_of_this_very_process_is_bound_over_as_before(tmp_path):
    """What a camera reopened at once or a publisher rebinding meets: its own listener, not yet closed by libzmq's I/O
    thread. Not another process: bound over as before."""
    endpoint = f"ipc://{tmp_path}/pub.sock"
    own = zmq.Context.instance().socket(zmq.PUB)
    own.linger = 0
    own.bind(endpoint)
    try:
        publisher = Publisher(endpoint, "s", status_interval_s=0.1, status=lambda: QUIET_STATUS).start()
        try:
            with Subscriber(endpoint) as sub:
                assert _station_heard(sub) == "s"
        finally:
            assert publisher.stop(5)
    finally:
        own.close()


def test_an_abstract_ipc_name_another_process_holds_is_refused_by_the_kernel(tmp_path):
    """No probe for `ipc://@name`: a second bind of an abstract name fails as a taken port does."""
    endpoint = f"ipc://@inspectd-test-{uuid.uuid4().hex}"
    foreign = subprocess.Popen(
        [sys.executable, "-c", FOREIGN_PUBLISHER, endpoint, json.dumps(QUIET_STATUS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert foreign.stdout is not None and foreign.stdout.readline().strip() == "serving"
        with pytest.raises(OSError, match=r"^publish\.endpoint .*: cannot bind \(Address already in use"):
            Publisher(endpoint, "second", status=lambda: QUIET_STATUS)
        with Subscriber(endpoint) as fresh:
            assert _station_heard(fresh) == "foreign"
    finally:
        assert foreign.stdin is not None
        foreign.stdin.close()
        foreign.wait(10)


def _probe_as_a_user_shut_out(endpoint: str) -> int:
    """refuse_served_ipc(endpoint) in a forked child that may not connect to the socket file (run as nobody where the
    tests run as root, whom no file mode shuts out): 0 bound over, 3 refused as served, 4/5 anything else."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            try:
                refuse_served_ipc(endpoint)
            except zmq.ZMQError as exc:
                os._exit(3 if exc.errno == zmq.EADDRINUSE else 4)
            os._exit(0)
        except BaseException:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_served_socket_file_this_user_may_not_connect_to_is_not_taken_over():
    """Another user's daemon in a shared folder: its socket file's mode shuts this user out, so a connect cannot tell
    whether it is served (EACCES). The kernel's table of listening sockets can: a live one is refused as a taken port,
    a stale one (nobody listening) is bound over as before."""
    folder = Path(tempfile.mkdtemp(prefix="inspectd-ipc-"))
    try:
        folder.chmod(0o711)  # the shut-out user may reach the file, not connect to it
        path = folder / "pub.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            listener.listen()
            path.chmod(0)
            assert _probe_as_a_user_shut_out(f"ipc://{path}") == 3
        finally:
            listener.close()  # the file stays: a stale socket file now
        assert path.exists() and _probe_as_a_user_shut_out(f"ipc://{path}") == 0
        # A socket bound by a relative path (its binder's working directory unknown here) of the same file name: the
        # doubt is a refusal. And a line of the table that does not parse (a socket named with a newline, which any
        # user may bind) ends nothing: the scan goes on to the listener after it.
        junk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        relative = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind('pub.sock'); s.listen(); "
                "print('listening', flush=True); sys.stdin.read()",
            ],
            cwd=folder,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            junk.bind(str(folder / "x\n0000: 00000002 00000000 zz 0001 01 1 y"))
            junk.listen()
            path.unlink()
            assert relative.stdout is not None and relative.stdout.readline().strip() == "listening"
            path.chmod(0)
            assert _probe_as_a_user_shut_out(f"ipc://{path}") == 3
        finally:
            junk.close()
            assert relative.stdin is not None
            relative.stdin.close()
            relative.wait(10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_rebind_that_finds_another_process_on_the_path_gives_up_at_once_until_its_next_try(tmp_path, monkeypatch):
    """The wait after an unbind is for this publisher's own listener to close. A path another process serves (here a
    plain ZeroMQ binder that took the file over) does not come free in that wait: the rebind fails at once and is
    tried again every BIND_RETRY_S, rather than probing the other process every 10 ms for the whole wait (each probe
    a connection it sees, a refused handshake where it uses CURVE) while nothing is published."""
    monkeypatch.setattr(publish, "REBIND_WAIT_S", 60.0)
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(endpoint, "first", status_interval_s=0.1, status=lambda: QUIET_STATUS).start()
    binder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, zmq; s = zmq.Context().socket(zmq.PUB); s.bind(sys.argv[1]); print('serving', flush=True); "
            "sys.stdin.read()",
            endpoint,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert binder.stdout is not None and binder.stdout.readline().strip() == "serving"
        asked = time.monotonic()
        publisher.drop_peers()  # a reload that removed a publish key: unbind, then bind again
        _wait(lambda: publisher._bind_retry_at > asked, "the rebind to give up", timeout=20.0)
        assert not publisher.bound
    finally:
        assert binder.stdin is not None
        binder.stdin.close()
        binder.wait(10)
        assert publisher.stop(5)
