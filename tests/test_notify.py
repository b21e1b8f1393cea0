"""sd_notify against real AF_UNIX datagram sockets (a path in tmp_path and the abstract namespace)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest
import structlog.testing

from inspectd.daemon.notify import Notifier

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(3)
    yield sock, str(path)
    sock.close()


def test_messages_arrive_on_the_socket(listener):
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert notifier.enabled and notifier.watchdog_interval_s() == 3.0
    assert notifier.ready()
    assert notifier.status("12.5 frames/s,\n3 published")
    assert notifier.watchdog()
    assert notifier.stopping()
    received = [sock.recv(4096) for _ in range(4)]
    assert received == [b"READY=1", b"STATUS=12.5 frames/s, 3 published", b"WATCHDOG=1", b"STOPPING=1"]
    assert notifier.sent == 4
    notifier.close()


def test_abstract_namespace_socket():
    name = f"inspectd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(3)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()


def test_unset_is_a_no_op_and_a_vanished_socket_is_not_fatal(tmp_path):
    quiet = Notifier.from_env({})
    assert not quiet.enabled and quiet.watchdog_interval_s() is None
    assert quiet.ready() is False and quiet.watchdog() is False
    gone = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert gone.ready() is False and gone.watchdog() is False  # logged once, never raised


def test_watchdog_belongs_to_the_named_pid_only():
    assert (
        Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 2.0
    )
    assert (
        Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s()
        is None
    )
    assert Notifier.from_env({"WATCHDOG_USEC": "soon"}).watchdog_interval_s() is None
    assert Notifier.from_env({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None


def test_a_real_child_process_notifies_through_its_environment(listener):
    sock, path = listener
    code = (
        "from inspectd.daemon.notify import Notifier; n = Notifier.from_env(); "
        "n.ready(); n.status('warming up'); n.watchdog() if n.watchdog_interval_s() == 0.5 else None"
    )
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "500000"}
    env.pop("WATCHDOG_PID", None)
    subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        check=True,
        timeout=20,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert [sock.recv(64) for _ in range(3)] == [b"READY=1", b"STATUS=warming up", b"WATCHDOG=1"]


FOLLOW = "from inspectd.daemon.notify import follow_parent; follow_parent(); print('still here')"


def test_a_parent_pid_that_is_not_the_parent_is_refused_in_one_line(tmp_path):
    """Exported in a shell or an EnvironmentFile, the variable would otherwise stop a station's daemon for no reason
    (or, naming a process already gone, at once); `inspectd run` says so and exits 2 before anything starts."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (gone.stdout.strip(), "1"):
        env = {**os.environ, "INSPECTD_PARENT_PID": pid, "INSPECTD_ALLOW_ROOT": "1"}
        config = tmp_path / "missing.yaml"
        done = subprocess.run(
            [sys.executable, "-m", "inspectd", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"inspectd run: INSPECTD_PARENT_PID {pid}: not this")


def test_a_process_whose_named_parent_lives_carries_on():
    env = {**os.environ, "INSPECTD_PARENT_PID": str(os.getpid())}
    done = subprocess.run([sys.executable, "-c", FOLLOW], capture_output=True, text=True, env=env, timeout=20)
    assert done.returncode == 0 and "still here" in done.stdout, done


def test_a_parent_pid_that_is_not_a_number_is_refused_in_one_line():
    from inspectd.daemon.notify import follow_parent
    from inspectd.errors import InspectdError

    with pytest.raises(InspectdError) as refused:
        follow_parent({"INSPECTD_PARENT_PID": "demo"})
    expected = "INSPECTD_PARENT_PID 'demo': expected the process id of the tool that started the daemon"
    assert str(refused.value) == expected


def test_a_failure_after_a_brief_one_is_logged_again_and_a_flapping_socket_is_not(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    clock = [1000.0]
    monkeypatch.setattr("inspectd.daemon.notify.time.monotonic", lambda: clock[0])

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        return sock

    with structlog.testing.capture_logs() as logs:
        assert notifier.watchdog() is False  # systemd's socket not there yet: a brief failure at start
        assert notifier.watchdog() is False
        sock = listen()
        assert notifier.watchdog() is True
        sock.close()
        path.unlink()
        clock[0] += 30  # fails again within the minute, and works again: nothing more said
        assert notifier.watchdog() is False
        sock = listen()
        assert notifier.watchdog() is True
        sock.close()
        path.unlink()
        clock[0] += 3600  # an hour later the socket goes for good: said again
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
        sock = listen()
        assert notifier.watchdog() is True
        sock.close()
        path.unlink()
        clock[0] += 10  # and again 10 s later, for good this time: said once the minute is over, not never
        for _ in range(5):
            assert notifier.watchdog() is False
            clock[0] += 15
    events = [(e["event"], e.get("lost")) for e in logs if e["event"].startswith("notify_")]
    assert events == [
        ("notify_failed", 1),
        ("notify_recovered", 2),
        ("notify_failed", 1),
        ("notify_recovered", 2),
        ("notify_failed", 5),
    ]
    assert notifier.sent == 3 and notifier.failed == 10
    notifier.close()
