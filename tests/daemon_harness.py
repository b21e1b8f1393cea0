"""One daemon process under test: `python -m inspectd run` with its config, SUB socket, systemd notify socket and log.

Shared by the daemon tests and the fault-injection tests (not itself a test module).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from inspectd.clients.subscribe import Subscriber
from inspectd.protocol.control import ControlClient
from inspectd.protocol.messages import Result

REPO = Path(__file__).resolve().parents[1]


def in_process_config(tmp_path: Path, bundle: Path, source: dict):
    """An in-process daemon's config: one camera with `source`, sockets and state under tmp_path, no metrics
    listener."""
    from inspectd.daemon.config import parse_config

    return parse_config(
        {
            "station": "s1",
            "model": {"bundle": str(bundle)},
            "engine": {"options": {"intra_op_threads": 1}},
            "cameras": [{"id": "cam0", "source": source}],
            "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
            "control": {"endpoint": f"ipc://{tmp_path}/control.sock"},
            "metrics": {"listen": None},
            "state_dir": str(tmp_path / "state"),
            "shutdown_timeout_s": 5.0,
        }
    )


class Station:
    """`overrides` are merged into the base config one level deep (a dict value updates the section). `wrap` is a
    command the daemon runs under (strace ...): `proc` is then that command, and `daemon_pid` the daemon itself.
    `exec_under` is a command that sets something up and then execs the daemon in its own place (the same pid)."""

    def __init__(
        self,
        tmp: Path,
        bundle: Path,
        cameras: list[dict],
        preexec_fn=None,
        watchdog_usec: int = 2_000_000,
        wrap: tuple[str, ...] = (),
        exec_under: tuple[str, ...] = (),
        **overrides,
    ) -> None:
        self.tmp = tmp
        self.publish = f"ipc://{tmp}/pub.sock"
        self.control_endpoint = f"ipc://{tmp}/control.sock"
        config = {
            "station": "t1",
            "model": {"bundle": str(bundle)},
            "engine": {"backend": "onnxruntime", "options": {"intra_op_threads": 1}},
            "batching": {"max_batch": 8, "max_wait_ms": 20},
            "cameras": cameras,
            "publish": {"endpoint": self.publish, "masks": "defects", "status_interval_s": 0.2},
            "control": {"endpoint": self.control_endpoint},
            "metrics": {"listen": None},
            "state_dir": str(tmp / "state"),
            "shutdown_timeout_s": 15.0,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        self.config = config
        self.config_path = tmp / "inspectd.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        notify_path = tmp / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.notify.settimeout(0.05)
        self.notes: list[tuple[float, str]] = []  # (time.monotonic() received, line)
        # Drained all the time, as systemd does: the kernel queues only ~10 datagrams per unix socket.
        self._closing = threading.Event()
        self._notes_thread = threading.Thread(target=self._drain_notes, daemon=True)
        self._notes_thread.start()
        self.sub = Subscriber(self.publish)
        self.early: list[Result] = []  # results wait_ready received before the first status
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(notify_path),
            "WATCHDOG_USEC": str(watchdog_usec),
            "PYTHONPATH": str(REPO),
        }
        env.pop("WATCHDOG_PID", None)
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self._wrapped = bool(wrap)
        self.proc = subprocess.Popen(
            [*wrap, *exec_under, sys.executable, "-m", "inspectd", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            preexec_fn=preexec_fn,
            start_new_session=True,  # a group of its own: close() ends a wrapped daemon with its wrapper
        )

    @property
    def daemon_pid(self) -> int:
        """The daemon's process id: `proc`'s, or with `wrap` that of the command's child (strace blocks the signals
        sent to it, so signals for the daemon go here)."""
        if not self._wrapped:
            return self.proc.pid
        deadline = time.monotonic() + 10
        while True:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except FileNotFoundError:
                children = []
            if children:
                return int(children[0])
            assert time.monotonic() < deadline and self.proc.poll() is None, f"no daemon under {self.proc.args[0]}"
            time.sleep(0.01)

    @property
    def note_lines(self) -> list[str]:
        return [line for _, line in self.notes]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """READY=1 on the notify socket, then a status message on SUB (the subscription is live). Results received
        before that status are kept in `early`: a short line (a camera with a count) may be over by then."""
        deadline = time.monotonic() + timeout
        while "READY=1" not in self.note_lines:
            assert time.monotonic() < deadline, f"no READY=1; log:\n{self.log_tail()}"
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}; log:\n{self.log_tail()}"
            self.read_notes()
        self.early = []
        while not isinstance(message := self.sub.recv(0.2), dict):
            if isinstance(message, Result):
                self.early.append(message)
            assert time.monotonic() < deadline, "no status message on the PUB socket"

    def _drain_notes(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.notify.recv(4096).decode()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.notes.extend((time.monotonic(), n) for n in data.splitlines())

    def read_notes(self) -> None:
        time.sleep(0.06)  # the drain thread's poll interval

    def results(self, count: int, timeout: float) -> list[Result]:
        return self.sub.results(count, timeout)

    def until_exit(self, timeout: float) -> list[Result]:
        """Every result until the process has exited and the socket has gone quiet."""
        deadline = time.monotonic() + timeout
        out: list[Result] = []
        while time.monotonic() < deadline:
            message = self.sub.recv(0.5)
            if isinstance(message, Result):
                out.append(message)
            elif message is None and self.proc.poll() is not None:
                break
        self.proc.wait(max(0.1, deadline - time.monotonic()))
        return out

    def control(self, request: dict, timeout: float = 30.0) -> dict:
        with ControlClient(self.control_endpoint, timeout_s=timeout) as client:
            return client.request(request)

    def metrics(self) -> str:
        listen = self.config["metrics"]["listen"]
        assert listen, "this station was started without a metrics endpoint"
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def events(self, name: str | None = None) -> list[dict]:
        """The daemon's JSON log events, all or those named `name`."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.daemon_pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.read_notes()
            self.close()

    def close(self) -> None:
        # The whole group: a daemon under strace outlives a killed strace (it detaches and lets it run).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self.sub.close()
        self._closing.set()
        self._notes_thread.join(1)
        self.notify.close()
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]
