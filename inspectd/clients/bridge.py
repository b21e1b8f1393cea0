"""`inspectd bridge KIND`: subscribe to a daemon's results and hand each verdict to a PLC, one protocol per KIND.

This module owns the process every protocol shares: the CLI, the ZeroMQ subscription, the journal catch-up
(inspectd.clients.subscribe.JournalCatchUp, the one `inspectd subscribe` runs: after a restart it replays what the
journal holds after each camera's last handed-over id, and it fills every hole in the live stream from the journal),
the record of what the PLC acknowledged (AckedState, a file in the bridge's state directory, which one bridge at a
time may use: a lock file beside it), routing results to one handshake (inspectd.clients.handshake) per camera, the
heartbeat, the daemon's health, and the shutdown on SIGTERM/SIGINT (within the service manager's stop timeout). A
protocol is an adapter module listed in PROTOCOLS (Modbus TCP in inspectd.clients.plc, OPC UA in
inspectd.clients.opcua) with:

    add_arguments(parser)      its own options (the protocol's library is imported only when the PLC side opens)
    configure(args) -> config  its config (a HandshakeSettings declaration), ConfigError naming the key or option
    describe(config, args)     what the bridge_started log line says about the PLC side (a dict)
    connect(config, args)      async; returns a link with `slots()`: [(camera or None, Target)], one per camera it
                               serves (None: bound at start to the one camera the state file records, else to the first
                               camera whose result arrives), and async `close()`

docs/PLC.md documents both protocols; the adapters raise PlcError when the PLC refuses or does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio

from inspectd.clients.subscribe import OTHER_NUMBERING, RECHECK_S, JournalCatchUp
from inspectd.durable import hold_lock, replace_file
from inspectd.errors import ConfigError, InspectdError, MessageError
from inspectd.logs import LOG_FORMATS, configure_logging
from inspectd.protocol.control import connect_error
from inspectd.protocol.endpoints import connect_endpoint_problem, take_endpoint
from inspectd.protocol.journal import CAMERA_RE, check_readable
from inspectd.protocol.keys import HandshakeWatch, Readmission, curve_from_flags, open_watched_sub
from inspectd.protocol.messages import Result, decode, status_interval, subscriptions

log = structlog.get_logger("inspectd.clients.bridge")

PROTOCOLS = {"modbus": "inspectd.clients.plc", "opcua": "inspectd.clients.opcua"}
HELP = {
    "modbus": "write verdicts to holding registers of a Modbus TCP PLC",
    "opcua": "serve verdicts as OPC UA variables, or write them into a PLC's OPC UA server",
}
# trigger_ready drops when the daemon has published nothing (result or status) for SILENT_GAPS times the interval its
# status messages say they come at (publish.status_interval_s, 1 s by default, up to an hour), and never sooner than
# this (the limit too until a status says its interval): three status messages missed, as the web view counts them.
DAEMON_SILENT_S = 3.0
SILENT_GAPS = 3
# A message the bridge has been taking in for this long waits on a journal read that is stuck (a failing disk), not
# slow (a full segment parses in a fraction of a second): trigger_ready drops, as for a silent daemon.
READ_STUCK_S = 10.0
# The bridge's wait for a liveness limit ends this long after it, so the limit is past when it is looked at (the
# heartbeat keeps its own schedule).
LIMIT_SLACK_S = 0.01
# A restart's replay of a camera waits this long at most for the camera's first live result, which shows whether the
# journal is the daemon's current numbering before any of it is handed over (a quiet line: then it goes unchecked).
# Counted from the end of the restart's reads, it leaves room for the other cameras' first results to be checked first
# (a check may parse a segment: 0.2 s for a full one).
HOLD_S = 5.0
# With --journal: longest wait for the subscription to take hold (the first live message) before the journal is read.
SETTLE_S = 5.0
# Results of a camera no block serves reach no PLC: the first one is a warning at once, the ones after it at most this
# often as one line with their count, so a station-wide topic left in place keeps saying so without flooding the log.
REFUSED_LOG_S = 60.0
STATE_FILE = "acked.json"  # in --state-dir: the last inspection id the PLC acknowledged, per camera
LOCK_FILE = ".lock"  # in --state-dir: locked by the bridge that uses the directory, while it runs
# Longest a stop waits for the PLC to ack the result on it: the unit's TimeoutStopSec=10 kills the bridge after 10 s;
# of the 3 s left, 2 are for dropping trigger_ready and result_valid (one request, which a PLC that stopped answering
# times out), and 1 for the process to end, so that a stop against such a PLC still ends cleanly.
STOP_WAIT_S = 7.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="bridge_kind", metavar="KIND", required=True)
    for kind in PROTOCOLS:
        sub = kinds.add_parser(kind, help=HELP[kind])
        sub.add_argument(
            "--endpoint", required=True, help="the daemon's result PUB endpoint (tcp://host:port, ipc://...)"
        )
        sub.add_argument("--config", default=None, help="bridge YAML: the PLC side and the handshake (docs/PLC.md)")
        sub.add_argument(
            "--topic",
            default="inspect.",
            help="topic prefix to subscribe to, e.g. inspect.line1.cam0. (default: every result)",
        )
        sub.add_argument(
            "--journal",
            type=Path,
            default=None,
            metavar="DIR",
            help="the daemon's journal directory: after a restart, hand over what the PLC missed before going live, "
            "and fill every hole in the live stream from it",
        )
        sub.add_argument(
            "--state-dir",
            type=Path,
            default=os.environ.get("STATE_DIRECTORY") or None,
            metavar="DIR",
            help=f"where the bridge records the last id the PLC acknowledged per camera ({STATE_FILE}), so a restart "
            "resumes after it even when the PLC's registers were reset (default: $STATE_DIRECTORY, set by systemd's "
            "StateDirectory=; none: only the PLC's own inspection id)",
        )
        sub.add_argument(
            "--server-key",
            type=Path,
            default=None,
            metavar="PATH",
            help="CurveZMQ: the daemon's publish public key file (with --client-key)",
        )
        sub.add_argument(
            "--client-key",
            type=Path,
            default=None,
            metavar="PATH",
            help="CurveZMQ: this bridge's .key_secret file, in the daemon's allow-list",
        )
        sub.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default="json",
            help="log lines on stdout: json (for journald | jq, the default) or console",
        )
        importlib.import_module(PROTOCOLS[kind]).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    protocol = importlib.import_module(PROTOCOLS[args.bridge_kind])
    try:
        if not args.topic.startswith("inspect."):
            raise ConfigError(f"--topic {args.topic!r}: expected a prefix of inspect.<station>.<camera>.result")
        topic_camera(args.topic)
        config = protocol.configure(args)
        _check_cameras(config, args.topic)
        if args.journal is not None:
            try:
                check_readable(args.journal)
            except InspectdError as exc:
                raise ConfigError(str(exc)) from None
        acked = AckedState(None if args.state_dir is None else Path(args.state_dir))
        curve = curve_from_flags(args.server_key, args.client_key)
        _check_endpoint(args.endpoint)
    except InspectdError as exc:
        print(f"inspectd bridge: {exc}", file=sys.stderr)
        return 2
    configure_logging("info", args.log_format)  # the daemon's log format, so one jq filter reads both
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # it logs every refused request as a traceback
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # likewise, for each dropped connection
    from inspectd.clients.handshake import PlcError

    try:
        return asyncio.run(_serve(protocol, config, args, curve, acked))
    except ModuleNotFoundError as exc:  # pymodbus, asyncua: the [plc] extra, imported when the PLC side opens
        print(f"inspectd bridge: needs the Python package {exc.name!r}: pip install 'inspectd[plc]'", file=sys.stderr)
        return 2
    except (PlcError, OSError) as exc:
        print(f"inspectd bridge: {exc}", file=sys.stderr)
        return 1


def _check_endpoint(endpoint: str) -> None:
    """Refuse an endpoint no daemon could be configured with (in the words of subscribe and ctl), then one ZeroMQ
    cannot connect to, before the PLC side is opened and written to: the bridge would otherwise wait in silence on a
    tcp port above 65535 (libzmq cuts it to 16 bits, another daemon's or nobody's) or on port 0."""
    from engines.schema import show

    problem = connect_endpoint_problem(endpoint, show)
    if problem is not None:
        raise InspectdError(f"--endpoint: {problem}")
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    take_endpoint(sock, endpoint)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise connect_error("--endpoint", endpoint, exc) from None
    finally:
        sock.close(0)
        context.term()


class Subscription:
    """The bridge's SUB socket, watched for the daemon ending its handshakes (HandshakeWatch).

    A daemon that refuses the bridge's key (revoked, the allow-list emptied) ends the connection for good
    (keys.Readmission): `look`, called each beat, then opens a new socket in its place with the same options,
    subscriptions and keys, with backoff, so a bridge whose key is put back hands the PLC results again without a
    restart. What was published meanwhile is a hole in seq, which the journal catch-up fills."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, topics: list[bytes], curve) -> None:
        self.endpoint, self._topics, self._curve = endpoint, topics, curve
        self._context = context
        self._readmission = Readmission()
        self.reopened = 0  # sockets opened in place of one the daemon refused
        self.socket, self._watch = self._open()
        self._linked_once = False  # a connection to the daemon was up at some point, on this socket or one before
        self._wake: Callable[[], None] | None = None
        self._told: tuple = ()  # the watch's state when `_wake` was last called for it

    def _open(self) -> tuple[zmq.asyncio.Socket, HandshakeWatch]:
        return open_watched_sub(self._context, self.endpoint, self._curve, self._topics)

    def look(self) -> str | None:
        """Read the handshake events (which must not pile up) and replace a socket the daemon refused when it is
        due; why the daemon shuts the bridge out (a phrase after "the daemon"), None while it lets it in."""
        # What the refused socket still holds (published before the refusal) is taken in before it is let go.
        due = self._readmission.look(self._watch)
        self._note_link(self._watch)
        if due and not int(self.socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._readmission.reopened()
            try:
                sock, watch = self._open()
            except zmq.ZMQError:
                return self._readmission.failure  # the endpoint took a connect before: tried again when next due
            old, old_watch = self.socket, self._watch
            self.socket, self._watch = sock, watch
            self._unlisten(old_watch)
            old_watch.close()
            self._listen()
            old.close(0)  # cancels the receive waiting on it: `recv` takes it up on the new socket
            self.reopened += 1
        return self._readmission.failure

    def _note_link(self, watch: HandshakeWatch) -> None:
        self._linked_once = self._linked_once or watch.linked or watch.closed_at is not None

    def wake_on_change(self, wake: Callable[[], None]) -> None:
        """Call `wake` when the connection or its handshake changes (up, closed, refused), read as the monitor tells
        it: a daemon that closed it is acted on then, not at the next `look` a heartbeat later."""
        self._wake = wake
        self._listen()

    def _listen(self) -> None:
        if self._wake is None:
            return
        watch = self._watch
        self._told = self._state(watch)
        asyncio.get_running_loop().add_reader(int(watch.monitor.getsockopt(zmq.FD)), self._changed, watch)

    def _unlisten(self, watch: HandshakeWatch) -> None:
        if self._wake is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(int(watch.monitor.getsockopt(zmq.FD)))
        except (RuntimeError, zmq.ZMQError):
            pass  # no loop running any more, or the monitor already closed: nothing left to listen to

    @staticmethod
    def _state(watch: HandshakeWatch) -> tuple:
        return watch.linked, watch.closed_at, watch.failure()

    def _changed(self, watch: HandshakeWatch) -> None:
        # libzmq's FD stays readable until the monitor's pending commands are taken in, which reading its events
        # (failure) does: one call per batch of events, not a busy loop. A connect retried (nothing listening, every
        # 100 ms) changes none of this state, so it wakes nobody.
        state = self._state(watch)
        self._note_link(watch)
        if state != self._told and self._wake is not None:
            self._told = state
            self._wake()

    def connection(self) -> str:
        """The daemon's connection as of the last `look`, for the log: "up" (connected, handshake done), "closed" (one
        was up, none is now) or "never made" (none ever was up: nothing there, another port, refused)."""
        if self._watch.linked:
            return "up"
        return "closed" if self._linked_once else "never made"

    def closed_since(self, heard: float) -> bool:
        """Whether the daemon's connection was seen closed (as of the last `look`) after `heard`, the last message, and
        none is up: a daemon that stopped or crashed closes it at once, long before three status intervals pass."""
        closed = self._watch.closed_at
        return closed is not None and closed >= heard and not self._watch.linked

    async def recv(self) -> list[bytes]:
        """The next message's frames, from whichever socket is current when it comes."""
        while True:
            received = asyncio.ensure_future(self.socket.recv_multipart())
            # Waited on, not awaited: a receive cancelled by `look` closing its socket then tells apart from the
            # bridge cancelling this task, which asyncio.wait raises (and which must not be swallowed).
            try:
                await asyncio.wait([received])
            except asyncio.CancelledError:
                received.cancel()
                raise
            if not received.cancelled():
                return received.result()

    def close(self) -> None:
        self._unlisten(self._watch)
        self._watch.close()
        self.socket.close(0)


def topic_camera(prefix: str) -> str | None:
    """The camera a topic prefix names in full (inspect.<station>.<camera>.), else None; ConfigError naming --topic
    when that is no camera id."""
    parts = prefix.split(".")
    if len(parts) < 3 or not parts[2]:
        return None
    if not CAMERA_RE.fullmatch(parts[2]):
        raise ConfigError(f"--topic {prefix!r}: expected a camera id ({CAMERA_RE.pattern}), got {parts[2]!r}")
    return parts[2] if len(parts) >= 4 else None


def _check_cameras(config: Any, prefix: str) -> None:
    """Refuse a configured camera (Modbus `camera`, OPC UA `cameras`) whose results the topic prefix leaves out: the
    bridge would hold trigger_ready up for a camera it can never hand a verdict of. Without a configured camera,
    refuse a prefix that names one without the dot after it: it takes cam10..cam19 with cam1, and the block would
    bind to whichever is heard first (and record it, for every restart)."""
    cameras = getattr(config, "cameras", None) or [getattr(config, "camera", None)]
    parts = prefix.split(".")
    if len(parts) == 3 and parts[2] and all(camera is None for camera in cameras):
        raise ConfigError(
            f"--topic {prefix!r}: expected inspect.<station>.<camera>. with the dot after the camera, or a camera in "
            f"the config (without either, every camera whose id starts with {parts[2]!r} matches too)"
        )
    for camera in cameras:
        if camera is not None and not _takes(prefix, camera):
            raise ConfigError(
                f"camera {camera}: --topic {prefix!r} leaves out its results (inspect.<station>.{camera}.result); "
                "expected a topic that takes them"
            )


def _takes(prefix: str, camera: str) -> bool:
    """Whether the topic prefix takes `camera`'s results (on a station it names, or on any where it names none)."""
    parts = prefix.split(".")
    if len(parts) < 3:  # no station named in full: every camera's results match
        return True
    return camera == parts[2] if len(parts) >= 4 else camera.startswith(parts[2])


def _recorded_camera(handshakes: list, acked: AckedState, prefix: str) -> str | None:
    """The camera the one slot without a camera served before a restart: the one camera the state file records,
    where the topic takes it and no other slot serves it; None otherwise (a first start, several recorded cameras).
    Bound at start, it is that block's as a configured camera is: a result of another camera that arrives first (one
    part per camera, the status only once a second) must not take over a PLC that holds this camera's id."""
    free = [h for h in handshakes if h.camera is None]
    recorded = list(acked.acked)
    if len(free) != 1 or len(recorded) != 1:
        return None
    camera = recorded[0]
    if not _takes(prefix, camera) or any(h.camera == camera for h in handshakes):
        return None
    return camera


class Router:
    """Hands each result to its camera's handshake; a slot without a camera takes the first unknown camera."""

    def __init__(self, handshakes: list, acked: AckedState | None = None) -> None:
        self.handshakes = handshakes
        self.acked = acked
        self.other_camera = 0
        # The camera the slot without a camera was bound to at start from the state file (_recorded_camera), until a
        # status shows the daemon no longer runs it (release): a rename, or a state directory from another station.
        self.from_state: str | None = None
        # camera -> (its results refused since the last result_refused line, when that line was logged)
        self.refused: dict[str, tuple[int, float]] = {}

    def handshake(self, camera: str):
        """The handshake serving `camera`, None when none does (yet)."""
        return next((h for h in self.handshakes if h.camera == camera), None)

    def bind(self, camera: str, newest: int | None, heard: str = "result"):
        """The handshake serving `camera`, binding a slot without a camera to it when there is one (placed by the
        camera's recorded ack, or against `newest`, the latest seq the PLC can hold: the one before the camera's
        result that arrived first, or the newest journalled); None when none serves it."""
        handshake = self.handshake(camera)
        if handshake is not None:
            return handshake
        for handshake in self.handshakes:
            if handshake.camera is None:
                handshake.camera = camera
                handshake.place(None if self.acked is None else self.acked.get(camera), newest)
                log.info("camera_bound", camera=camera, resume_after=handshake.last_id, heard=heard)
                return handshake
        return None

    def release(self, status: dict[str, Any], prefix: str):
        """Unbind the slot bound at start to the camera the state file records, where a daemon status message of the
        topic's station lists the cameras it runs and leaves that one out (renamed, removed, or a state directory
        copied from another station): bound to it for good, the block would refuse every verdict and keep
        trigger_ready down. The slot then takes a camera as at a first start. Returns the released handshake."""
        camera = self.from_state
        handshake = None if camera is None else self.handshake(camera)
        station, cameras = status.get("station"), status.get("cameras")
        if handshake is None or not isinstance(station, str) or not isinstance(cameras, dict) or not cameras:
            return None
        if camera in cameras or not f"inspect.{station}.{camera}.".startswith(prefix):
            return None
        self.from_state = None
        handshake.camera = None
        handshake.camera_state = None
        log.warning(
            "camera_unbound",
            camera=camera,
            state_file=None if self.acked is None else str(self.acked.path),
            running=sorted(str(name) for name in cameras),
            reason="the block without a camera was bound at start to the one camera the state file records, and the "
            "daemon does not run it (taken out of its config or renamed)",
            effect="the first result heard binds the block, as at a first start; set camera: to fix it",
        )
        return handshake

    def recorded(self, status: dict[str, Any], prefix: str) -> str | None:
        """The camera the one slot without a camera served before a restart, where a daemon status message shows
        it still runs: the only camera the state file records that the status lists, that the topic prefix takes and
        that no other slot serves. None where that is not one camera (several slots without a camera, or several
        such cameras: the first results decide which block gets which, as at a first start). A camera the status
        reports as other than running is not taken (a later status takes it once it runs). Where the state file
        records one camera only, the slot was bound to it at start (_recorded_camera) and this finds none."""
        from inspectd.clients.handshake import daemon_camera_state

        if self.acked is None or sum(h.camera is None for h in self.handshakes) != 1:
            return None
        station, cameras = status.get("station"), status.get("cameras")
        if not isinstance(station, str) or not isinstance(cameras, dict):
            return None
        found = [
            camera
            for camera in list(self.acked.acked)  # a copy: a worker thread records acks into it
            if camera in cameras
            and daemon_camera_state(status, camera) in (None, "running")  # not one that failed, stopped or ended
            and f"inspect.{station}.{camera}.".startswith(prefix)
            and self.handshake(camera) is None
        ]
        return found[0] if len(found) == 1 else None

    def route(self, result: Result) -> None:
        handshake = self.bind(result.camera, result.seq - 1)
        if handshake is not None:
            handshake.offer(result)
            return
        self.other_camera += 1
        # Per camera: one the daemon gains later (months after another was refused) reaches no PLC either.
        untold, told_at = self.refused.get(result.camera, (0, -REFUSED_LOG_S))
        untold += 1
        now = time.monotonic()
        if now - told_at >= REFUSED_LOG_S:
            log.warning(
                "result_refused",
                camera=result.camera,
                seq=result.seq,
                refused=untold,
                serving=[h.camera for h in self.handshakes],
                reason=self._refusal(),
                effect=f"not handed to any PLC; told at most every {REFUSED_LOG_S:.0f} s with the count since",
            )
            untold, told_at = 0, now
        self.refused[result.camera] = (untold, told_at)

    def _refusal(self) -> str:
        if self.from_state is None or self.acked is None:
            return "no block for this camera in the PLC (one bridge serves the cameras its config names)"
        return (
            f"no block for this camera in the PLC: the block without a camera was bound at start to "
            f"{self.from_state}, the one camera {self.acked.path} records; set camera: in the config, or remove that "
            "file, to move it"
        )

    def counters(self) -> dict[str, Any]:
        totals: dict[str, Any] = {}
        for handshake in self.handshakes:
            for name, value in vars(handshake.counters).items():
                totals[name] = totals.get(name, 0) + value
        totals["other_camera"] = self.other_camera
        return totals


class AckedState:
    """The last inspection id the PLC acknowledged, per camera, in `<directory>/acked.json`: the bridge's progress kept
    outside the PLC, so a restart resumes after it even when the PLC's registers were reset (replaced, reloaded).

    Written after each ack, atomically (a temporary file, fsync, rename, fsync of the directory), so a kill or a power
    cut leaves the previous record or the new one, never a torn one. Without a directory it records nothing.

    The directory is the bridge's alone while it runs (`hold_lock` on its LOCK_FILE): a second bridge given the same
    one is refused (ConfigError) before it touches its PLC."""

    def __init__(self, directory: Path | None) -> None:
        self.path = None if directory is None else directory / STATE_FILE
        self.acked: dict[str, int] = {}
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._held: int | None = None  # the descriptor holding the directory's lock, open until the process ends
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--state-dir {directory}: cannot create ({exc.strerror or exc})") from None
            try:
                self._held = hold_lock(directory / LOCK_FILE)
            except BlockingIOError:
                raise ConfigError(
                    f"--state-dir {directory}: another bridge uses it (give each bridge a state directory of its own)"
                ) from None
            except PermissionError as exc:
                raise ConfigError(
                    f"--state-dir {directory}: cannot open its {LOCK_FILE} ({exc.strerror}), expected one this user "
                    "may read: remove it (left by a run as another user)"
                ) from None
            self.acked = self._load()

    def _load(self) -> dict[str, int]:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--state-dir: {self.path}: cannot read ({exc})") from None
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        acked = doc.get("acked") if isinstance(doc, dict) else None
        if not isinstance(acked, dict) or not all(
            isinstance(camera, str) and type(seq) is int and seq >= 0 for camera, seq in acked.items()
        ):
            raise ConfigError(
                f'--state-dir: {self.path}: expected {{"acked": {{camera: inspection id}}}} as the bridge writes it; '
                "move it away to resume after the PLC's own inspection ids"
            )
        return dict(acked)

    def get(self, camera: str | None) -> int | None:
        return None if camera is None else self.acked.get(camera)

    async def record(self, camera: str, seq: int) -> None:
        if self.path is None:
            return
        try:
            await asyncio.to_thread(self._write, camera, seq)
        except OSError as exc:
            # The PLC's own inspection id still says where to resume while its registers last; say so once.
            if str(exc) != self._failed:
                self._failed = str(exc)
                log.warning("acked_state_write_failed", path=str(self.path), error=str(exc))

    def _write(self, camera: str, seq: int) -> None:
        assert self.path is not None
        with self._lock:
            self.acked[camera] = seq
            replace_file(self.path, json.dumps({"acked": self.acked}, sort_keys=True).encode("utf-8"))


def _journal_newest(directory: Path, camera: str) -> int | None:
    """The last seq the daemon journalled for `camera`, None without a record of it: what a PLC's id is placed
    against at start (Handshake.place), how far behind a replay starts (Feeder.resume), and whether the journal is
    the one the daemon writes (Feeder.live)."""
    from inspectd.protocol import journal

    try:
        return journal.newest_seq(directory, camera)
    except (InspectdError, OSError):
        return None  # placed against the first live result instead; the replay reports the journal's trouble


def _journal_holds(
    catch_up: JournalCatchUp, camera: str, seq: int
) -> tuple[int | None, int | None, tuple[str, float] | None]:
    """(the newest and the oldest seq journalled for `camera`, the frame id and capture time of its record at `seq`):
    None for what the journal does not hold or cannot be read."""
    assert catch_up.directory is not None
    held = catch_up.held(camera, seq)
    return _journal_newest(catch_up.directory, camera), catch_up.oldest(camera), held


def _journal_reserved(directory: Path, camera: str) -> int | None:
    """The seq up to which the daemon's journal reserved `camera`'s numbering (its reservation mark, fsynced before
    any seq past it is given out), None when there is none, it cannot be read, or it is damage the daemon ignores
    too (journal.mark_damage: a flipped bit would pass any resume point, or latch a false numbering restart)."""
    from inspectd.protocol import journal

    try:
        journal.check_camera(camera)
        mark = journal.read_mark(directory / camera, journal.RESERVED_MARK)
    except (InspectdError, OSError):
        return None
    if mark is None or journal.mark_damage(mark, _journal_newest(directory, camera)) is not None:
        return None
    return mark


def _overlap(stretches: list[tuple[int, int]], first: int, last: int) -> int:
    """How many seqs from `first` to `last` the disjoint (first, last) `stretches` hold."""
    return sum(max(0, min(end, last) - max(begin, first) + 1) for begin, end in stretches)


class Feeder:
    """Feeds each camera's handshake from a JournalCatchUp, pulling the journal only as fast as the PLC takes results.

    Per camera: a replay or hole fill in progress (an iterator over the journal) is pulled while the handshake's
    queue has room; live results that arrive meanwhile wait behind it, up to a queue of them (beyond, the oldest goes:
    it is in the journal, and the hole fill before the next one fetches it). So a catch-up of any length costs two
    queues of results, and nothing is dropped for lack of room. Without a journal, results go straight to the
    handshake (whose full queue drops the oldest, counted as a gap).

    With a journal a PLC slower than the line falls behind: more than a queue behind is logged (`plc_behind`, once
    until it is back within half a queue), and more than `max_backlog` makes the bridge skip to the newest result
    (`backlog_skipped`; the handshake counts the jump as a gap and latches the alarm). With `max_backlog` set, behind
    is counted in results that can still reach the PLC: seqs known not to be in the journal (a daemon crash or reboot
    numbered on past them, a stretch rotated away) are no backlog. They are learnt from the records a restart's replay
    is measured by, and, past a jump in the live stream, from one bounded journal read when the count in seqs would
    skip or change what is logged; forgotten once the PLC is past them. A read that fails, or does not hold the live
    result the daemon journalled before publishing it, learns nothing: those seqs count. Without `max_backlog` the
    journal is not read for it, and behind counts seqs. Every such read is made off the event loop, and awaited: the
    bridge takes in nothing after the result it is for until it is done.

    The replays and hole fills are pulled off the event loop too, one result per step (a pull that starts a read
    parses the camera's journal segment from its start: 0.2 s for a full one from the page cache), so the handshakes
    go on beating and polling acks meanwhile. One step, measurement or change of the catch-up's state at a time
    (`_reading`); a pull that cannot read (a live result in order) is made on the loop, and one that would is left to
    `run`, the Feeder's task, which also refills the queues the PLC makes room in, a step per camera in turn: a live
    result of any camera waits for at most the step in progress, never for a catch-up."""

    def __init__(self, catch_up: JournalCatchUp, router: Router) -> None:
        self.catch_up = catch_up
        self.router = router
        self.pending: dict[str, Iterator[Result | dict[str, Any]]] = {}
        # camera -> the live results waiting behind its catch-up, oldest first, at most a queue of them (the oldest
        # goes first: it is in the journal, and the hole fill before the next one fetches it)
        self.newest: dict[str, collections.deque[Result]] = {}
        self.replayed = 0  # results handed on from the replay after a restart
        self.heard: set[str] = set()  # cameras whose first live result came (or whose replay already started)
        self.behind: set[str] = set()  # cameras whose PLC is more than a queue behind (logged once)
        self.skipped: dict[str, int] = {}  # camera -> the last seq a backlog skip gave up on
        self.since: dict[str, int] = {}  # camera -> where its replay resumed (the handshake's resume point)
        self.went_live: set[str] = set()  # cameras whose first live result came
        self.checked: set[str] = set()  # cameras whose journal was checked against a live result of this numbering
        self.unjournalled: dict[str, list[tuple[int, int]]] = {}  # camera -> stretches (first, last) not in the journal
        # camera -> how far the journal's holes are known (`unjournalled`): past a jump in the live stream they are
        # not, until a read says (or the PLC has taken what lies before)
        self.examined: dict[str, int] = {}
        self.numbering: dict[str, int] = {}  # camera -> numberings seen go back: a read made in an older one is void
        self._reading = asyncio.Lock()
        self._reads: set[str] = set()  # cameras whose pending iterator may read the journal when pulled
        # camera -> its newest journal segment when its disowned journal was last looked at (JournalCatchUp.signature)
        self._signature: dict[str, tuple[str, int, int] | None] = {}
        self._looked: dict[str, float] = {}  # camera -> when its disowned journal's signature was last read
        self._held: dict[str, float] = {}  # camera -> until when its replay waits for its journal's check (HOLD_S)
        # Cameras whose queue the PLC made room in, in turn (a dict as an ordered set): what `run` refills.
        self._room: dict[str, None] = {}
        self._roomed = asyncio.Event()

    async def resume(self, since: dict[str, int]) -> None:
        """Replay each camera's journal after its seq in `since` (a restart's catch-up), as the PLC takes it."""
        async with self._reading:
            await self._resume(since)
        for camera in since:
            await self._pump(camera, read=True)

    async def _resume(self, since: dict[str, int]) -> None:
        """Start each camera's replay (pulled by `_step`)."""
        unchecked = []
        for camera, seq in since.items():
            self.heard.add(camera)
            self.since[camera] = seq
            self.unjournalled.pop(camera, None)
            self.examined[camera] = seq
            after = seq
            handshake = self.router.handshake(camera)
            limit = None if handshake is None else handshake.settings.max_backlog
            directory = self.catch_up.directory
            if limit is not None and directory is not None:
                # A replay longer than max_backlog (a restart after a long stop, on a line that may stay quiet) is
                # skipped like any backlog: the PLC gets the newest journalled result, the jump is its gap.
                # Counted in journal records, not seqs: seqs that never existed (a daemon crash or reboot numbered
                # on past them) are no backlog; the replay reports them as a gap with its reason. The newest first:
                # a read that stops short of it failed, and what it did not reach counts in seqs.
                newest = await asyncio.to_thread(_journal_newest, directory, camera)
                held = await asyncio.to_thread(self.catch_up.journalled, camera, seq, limit + 1)
                whole = newest is None or newest <= seq or (bool(held) and held[-1] >= newest)
                if len(held) <= limit and whole:
                    # The whole replay: the holes between its records stay no backlog when live results come.
                    self._learn(camera, seq, held)
                elif len(held) > limit or (newest is not None and newest - seq > limit):
                    # `newest` was read before `held`, which may hold records appended since: a newest at or below
                    # the resume point (a power cut's lost tail, a quiet line) would replay what the PLC has.
                    target = max(held[-1] if held else seq, -1 if newest is None else newest)
                    assert target > seq
                    self._skipped(camera, seq, target, limit)
                    after = target - 1
                    self.examined[camera] = target
            self.pending[camera] = self._counted(camera, after, self.catch_up.resume({camera: after}))
            self._reads.add(camera)
            if camera not in self.checked:
                unchecked.append(camera)
        until = time.monotonic() + HOLD_S  # from the end of every camera's measuring reads
        for camera in unchecked:
            self._held[camera] = until
        if unchecked:
            self._roomed.set()  # `run` waits until then at most

    async def released(self) -> None:
        """The slot bound from the state file was released (Router.release): the journal is read for every camera the
        topic takes again, and the released camera's replay goes (the daemon no longer runs it: its journalled
        results would bind the slot to it again)."""
        async with self._reading:  # not while a step pulls the replay: what it pulled would bind the slot again
            self.catch_up.cameras = None
            for camera in list(self.pending):
                if self.router.handshake(camera) is None:
                    self.pending.pop(camera, None)
                    self.newest.pop(camera, None)
                    self._reads.discard(camera)

    def _counted(self, camera: str, after: int, replay: Iterator[Result]) -> Iterator[Result]:
        count = 0
        for result in replay:
            count += 1
            self.replayed += 1
            yield result
        log.info("journal_caught_up", camera=camera, after=after, results=count)

    async def status(self, status: dict[str, Any], prefix: str) -> None:
        """A daemon status message: a slot without a camera binds to the camera it served before a restart where the
        message shows that camera still runs (Router.recorded), and the camera's replay starts at its first live
        result or after HOLD_S (see _resume), not at the next part: on a quiet line its next result may be long in
        coming."""
        async with self._reading:
            camera = self.router.recorded(status, prefix)
            if camera is None or camera in self.heard:
                return
            directory = self.catch_up.directory
            newest = None if directory is None else await asyncio.to_thread(_journal_newest, directory, camera)
            handshake = self.router.bind(camera, newest, heard="status")
            if handshake is None or not handshake.placed() or handshake.last_id is None:
                return  # its first result places it, and starts the replay
            self.heard.add(camera)
            if directory is not None:
                await self._resume({camera: handshake.last_id})
        await self._pump(camera)

    async def live(self, result: Result) -> None:
        """Take a result heard live, and hand over what it lets through (after any hole fill before it)."""
        async with self._reading:
            await self._live(result)
        await self._pump(result.camera)

    async def _live(self, result: Result) -> None:
        camera = result.camera
        first = camera not in self.went_live
        if camera not in self.heard:
            # Where a camera resumes may be known only now: a slot without a camera binds to the first one heard, and
            # a PLC id that could not be placed at start is placed against this result. Its replay comes first.
            self.heard.add(camera)
            handshake = self.router.bind(camera, result.seq - 1)
            if handshake is not None:
                # Before this result: the PLC cannot hold a seq published after the bridge subscribed.
                handshake.place(None, result.seq - 1)
                if self.catch_up.directory is not None and handshake.last_id is not None:
                    await self._resume({camera: handshake.last_id})
        if camera not in self.went_live:
            self.went_live.add(camera)
            resumed = self.since.get(camera)
            if resumed is not None and result.seq <= resumed:
                # The daemon publishes each seq once, and this one after the bridge subscribed: this numbering is not
                # the one resumed on (the handshake warns and follows it). The journal after the resume point is not
                # this numbering's, and the catch-up would drop every live result up to it. Where the handshake
                # resumes after a recorded ack before this seq, the journal fills what lies between.
                self.pending.pop(camera, None)
                self._renumbered(camera)
                handshake = self.router.handshake(camera)
                after = result.seq - 1 if handshake is None else handshake.rebase(result.seq)
                self.catch_up.renumbered(camera, after + 1)
        # Checked at the first result of each numbering, and while disowned at each jump (a hole the journal would
        # fill if the daemon journals into it again).
        jump = result.seq > self.catch_up.delivered.get(camera, result.seq) + 1
        now = time.monotonic()
        if jump and self.catch_up.disowned(camera) and now >= self._looked.get(camera, 0.0) + RECHECK_S:
            # Only where something was journalled since the last look (a journal nobody writes costs no read), and
            # not more often than RECHECK_S (one another daemon writes changes at every record).
            self._looked[camera] = now
            signature = await asyncio.to_thread(self.catch_up.signature, camera)
            if signature != self._signature.get(camera):
                self._signature[camera] = signature
                self.checked.discard(camera)
        # Results already waiting behind a catch-up are older: the first of them is checked when it is taken (_step).
        if camera not in self.checked and not self.newest.get(camera):
            await self._check(result, first)
        if self.catch_up.directory is not None:
            await self._watch_backlog(camera, result.seq)
        waiting = self.newest.get(camera)
        if waiting is None:
            handshake = self.router.handshake(camera)
            waiting = self.newest[camera] = collections.deque(maxlen=handshake.settings.queue_size if handshake else 1)
        waiting.append(result)

    async def _check(self, result: Result, first: bool) -> None:
        """Check the journal against `result` where its camera was not checked in this numbering."""
        camera = result.camera
        if camera in self.checked:
            return
        self.checked.add(camera)
        if self.catch_up.directory is not None and self.router.handshake(camera) is not None:
            await self._check_journal(result, first)
        if self._held.pop(camera, None) is not None:
            self._room.setdefault(camera)  # its replay, checked (or stopped): `run` steps it
            self._roomed.set()

    async def _check_journal(self, result: Result, first: bool) -> None:
        """`result`, the first live result of its camera in this numbering (`first`: since the bridge started), is in
        the journal the daemon writes: it journals each result before it publishes it. A --journal that lacks it is
        not that journal (the daemon's moved, or another daemon's) or one whose writes fail; holes are not filled from
        it, which only its gap lines would say. One that holds another result under its seq, or starts past it (an old
        numbering whose low seqs were rotated away), is a journal of another numbering (a daemon that
        restarted without its journal, beside an old one; a copy): its records are other parts' verdicts, so nothing
        more of this camera is read from it (see `_disown`) until it holds a live result again, checked at each jump in
        the live stream."""
        directory = self.catch_up.directory
        assert directory is not None
        camera, seq = result.camera, result.seq
        newest, oldest, held = await asyncio.to_thread(_journal_holds, self.catch_up, camera, seq)
        # Rotation takes the oldest first, so a journal that starts past the live seq lost it to no rotation of its
        # own: an old numbering whose low seqs were rotated away (a hole of its own, a record its failing disk lost,
        # lies above its start).
        if (held is not None and held != (result.frame_id, result.t_capture)) or (
            held is None and oldest is not None and oldest > seq
        ):
            if not self.catch_up.disowned(camera):
                self._signature[camera] = await asyncio.to_thread(self.catch_up.signature, camera)
                self._disown(result, None if held is None else held[0], oldest, first)
            return
        if self.catch_up.disowned(camera):
            if held is not None:
                # The daemon journals into it again: what lay between is another numbering's, no hole to fill.
                self.catch_up.disown(camera, None)
                self._between_numberings(camera, seq)
                log.info("journal_current_again", journal=str(directory), camera=camera, seq=seq)
            return
        if newest is None or newest < seq:
            log.warning(
                "journal_not_current",
                journal=str(self.catch_up.directory),
                camera=camera,
                seq=seq,
                journal_newest=newest,
                effect="the daemon journals each result before publishing it, so this is not the journal it writes "
                "(point --journal at its publish.journal.path) or its writes fail (a full disk): holes in the live "
                "stream are not filled from it",
            )

    def _disown(self, result: Result, journal_frame_id: str | None, oldest: int | None, first: bool) -> None:
        """The journal holds another numbering's results for `result`'s camera: its replay or hole fill under way
        stops, what the replay queued before the first live result goes (all of it came from the journal; what the
        PLC took of it already cannot be called back), and the live stream is delivered from `result` on."""
        camera, seq = result.camera, result.seq
        self.catch_up.disown(camera, OTHER_NUMBERING)
        self.pending.pop(camera, None)
        self._reads.discard(camera)
        self._between_numberings(camera, seq)  # what counted as delivered came from that journal
        handshake = self.router.handshake(camera)
        dropped = handshake.skip_queued(None) if first and handshake is not None else 0
        log.warning(
            "journal_other_numbering",
            journal=str(self.catch_up.directory),
            camera=camera,
            seq=seq,
            frame_id=result.frame_id,
            journal_frame_id=journal_frame_id,
            journal_oldest=oldest,
            dropped=dropped,
            effect=(
                "the journal holds another result under this seq"
                if journal_frame_id is not None
                else "the journal starts past this seq"
            )
            + ": nothing more of this camera is read from it (replay stopped, holes are gaps, alarm) until it holds a "
            "live result again",
        )

    def _between_numberings(self, camera: str, seq: int) -> None:
        """`seq` starts what is delivered of `camera` after a switch between the journal's numbering and another:
        what lies before it is no hole to fill and no backlog (the handshake counts it as a gap, with the alarm)."""
        self.catch_up.renumbered(camera, seq)
        self.skipped[camera] = seq - 1
        self.examined[camera] = seq - 1
        self.behind.discard(camera)

    async def _watch_backlog(self, camera: str, seq: int) -> None:
        handshake = self.router.handshake(camera)
        if handshake is None:
            return
        settings = handshake.settings
        examined = self.examined.get(camera)
        if examined is None or seq == examined + 1:
            self.examined[camera] = seq
        # Past a jump (seq > examined + 1) what lies between is results lost on the way (in the journal, so backlog)
        # or seqs that never existed (a daemon crash or reboot numbered on past them), which the hole fill reports as
        # a gap with its reason: unknown until the journal is read.
        if handshake.last_id is None:
            return
        limit = settings.max_backlog
        handed, behind = self._behind(camera, handshake, seq)
        start = max(self.examined[camera], handed)
        # A read can only lower the count: it matters where a lower one could decide otherwise.
        hangs_on = self._decision(camera, behind, settings) != self._decision(camera, 0, settings)
        if limit is not None and seq > start + 1 and hangs_on:
            # Only where the count in seqs would skip or change what is logged: a jump of each frame an overloaded
            # daemon drops, on a PLC that keeps up, reads nothing. Without max_backlog nothing is read at all: the
            # count feeds the plc_behind warning alone.
            if not await self._read_holes(camera, seq, handed, start, limit):
                return  # the numbering went back meanwhile: the count was of the old one
            handed, behind = self._behind(camera, handshake, seq)
        decision = self._decision(camera, behind, settings)
        if decision == "skip":
            assert limit is not None
            self.pending.pop(camera, None)
            handshake.skip_queued(seq)
            self.catch_up.skip(camera, seq)
            self._skipped(camera, handed, seq, limit)
        elif decision == "plc_behind":
            self.behind.add(camera)
            log.warning("plc_behind", camera=camera, behind=behind, handed_over=handed, newest=seq)
        elif decision == "plc_caught_up":
            self.behind.discard(camera)
            log.info("plc_caught_up", camera=camera, behind=max(0, behind))

    def _behind(self, camera: str, handshake, seq: int) -> tuple[int, int]:
        """(the last result handed over or given up, how many results from it up to `seq` may still reach the PLC):
        seqs known not to be in the journal are not counted, seqs not known either way are."""
        handed = max(handshake.last_id, self.skipped.get(camera, 0))
        stretches = self.unjournalled.get(camera, [])
        stretches[:] = [(first, last) for first, last in stretches if last > handed]
        return handed, seq - handed - _overlap(stretches, handed + 1, seq)

    def _decision(self, camera: str, behind: int, settings) -> str | None:
        """What `behind` results waiting decide: "skip" (past max_backlog), "plc_behind" (past the queue, said once),
        "plc_caught_up" (back within half of it after that), else None."""
        if settings.max_backlog is not None and behind > settings.max_backlog:
            return "skip"
        if camera not in self.behind:
            return "plc_behind" if behind > settings.queue_size else None
        return "plc_caught_up" if behind <= max(1, settings.queue_size // 2) else None

    async def _read_holes(self, camera: str, seq: int, handed: int, start: int, limit: int) -> bool:
        """Learn which seqs after `start` up to the live `seq` the journal holds, reading no more records than a skip
        of more than `limit` after `handed` needs; False when `camera`'s numbering went back meanwhile."""
        known = start - handed - _overlap(self.unjournalled.get(camera, []), handed + 1, start)
        most = limit + 1 - known
        if most <= 0:
            return True  # more than max_backlog journalled results wait already
        numbering = self.numbering.get(camera, 0)
        held = await asyncio.to_thread(self.catch_up.journalled, camera, start, most)
        if self.numbering.get(camera, 0) != numbering:
            return False
        if seq in held:
            self._learn(camera, start, [each for each in held if each <= seq])
        elif len(held) == most and held[-1] < seq:
            self._learn(camera, start, held)  # more than max_backlog results wait: these holes are enough to say so
        else:
            # The live result is not in what the read found: it failed part way, or the journal is not being written
            # (see _check_journal). What it did not reach counts in seqs, and is not read again.
            self.examined[camera] = max(self.examined.get(camera, seq), seq)
        return True

    def _learn(self, camera: str, after: int, held: list[int]) -> None:
        """`held`: seqs of `camera` the journal holds after `after`, in order, with nothing else in it between them:
        the holes between them are not in the journal."""
        stretches = self.unjournalled.setdefault(camera, [])
        previous = after
        for seq in held:
            if seq > previous + 1:
                stretches.append((previous + 1, seq - 1))
            previous = max(previous, seq)
        stretches.sort()
        merged: list[tuple[int, int]] = []
        for first, last in stretches:
            if merged and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        stretches[:] = merged
        self.examined[camera] = max(self.examined.get(camera, previous), previous)

    def _renumbered(self, camera: str) -> None:
        """`camera`'s numbering went back: how far behind its PLC is was measured in the old one."""
        self.numbering[camera] = self.numbering.get(camera, 0) + 1
        self.checked.discard(camera)
        self.skipped.pop(camera, None)
        self.behind.discard(camera)
        self.unjournalled.pop(camera, None)
        self.examined.pop(camera, None)

    def _skipped(self, camera: str, handed: int, newest: int, limit: int) -> None:
        """What lies between `handed` and `newest` is given up on (more than `limit` results behind)."""
        self.skipped[camera] = newest - 1
        self.behind.discard(camera)
        log.warning(
            "backlog_skipped",
            camera=camera,
            first=handed + 1,
            last=newest - 1,
            skipped=newest - handed - 1,
            max_backlog=limit,
        )

    def room(self, handshake) -> None:
        """The handshake's queue has room (it is called on the event loop and must not wait): `run` refills it."""
        if handshake.camera is not None:
            self._room[handshake.camera] = None
            self._roomed.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Refill the queues the PLC makes room in, until `stop`; a task beside the handshakes' own."""
        from inspectd.clients.handshake import either

        while not stop.is_set():
            now = time.monotonic()
            for camera, until in list(self._held.items()):
                if until <= now:  # its first live result did not come in time: the replay goes unchecked
                    del self._held[camera]
                    self._room.setdefault(camera)
            if not self._room:
                self._roomed.clear()
                soonest = min(self._held.values(), default=None)
                await either(self._roomed, stop, None if soonest is None else max(0.0, soonest - now))
                continue
            camera = next(iter(self._room))
            del self._room[camera]
            async with self._reading:
                more = await self._step(camera)
            if more:
                self._room.setdefault(camera)  # after the others: one camera's long catch-up holds up no other's

    async def _pump(self, camera: str, read: bool = False) -> None:
        """Step `camera` on while its queue has room and there is something to hand over. A step that would read
        the journal is left to `run` unless `read` (a restart's replay at start, before the handshakes run; one held
        for the journal's check is stepped by `run`): a message the
        bridge takes in then waits for no catch-up, only for the step in progress."""
        while True:
            async with self._reading:
                moved = await self._step(camera, read)
                if moved is None:
                    self._room.setdefault(camera)
                    self._roomed.set()
                if not moved:
                    return

    async def _step(self, camera: str, read: bool = True) -> bool | None:
        """Pull one item of `camera`'s replay or hole fill (starting the hole fill before its newest live result)
        and hand it over, nothing while its queue is full; whether anything moved, None where the pull would read the
        journal and `read` is False. Called holding `_reading`."""
        handshake = self.router.handshake(camera)
        until = self._held.get(camera)
        if until is not None and camera in self.pending:
            if time.monotonic() < until:
                return False  # a replay held for its journal's check (`run` steps it when the time is up)
            del self._held[camera]
        # Bounded where the journal fills holes: a newest replaced while the queue is full is fetched from it.
        if self.catch_up.fills(camera) and handshake is not None and handshake.space() <= 0:
            return False
        pending = self.pending.get(camera)
        if pending is None:
            waiting = self.newest.get(camera)
            if not waiting:
                return False
            newest = waiting.popleft()  # later live results wait behind its hole fill
            await self._check(newest, False)  # the numbering went back since it came (see _live)
            reads = self.catch_up.reads(newest)
            pending = self.pending[camera] = self.catch_up.take(newest)
            if reads:
                self._reads.add(camera)
            else:
                self._reads.discard(camera)
        if camera in self._reads and not read:
            return None
        # A pull that may read (a replay, a hole fill: its segment parsed from the start) is made off the loop.
        item = await asyncio.to_thread(next, pending, None) if camera in self._reads else next(pending, None)
        if item is None:
            self.pending.pop(camera, None)  # so a camera in `pending` has a replay or hole fill under way
        elif isinstance(item, Result):
            self.router.route(item)
        self._report()
        return True

    def _report(self) -> None:
        for gap in self.catch_up.missed:
            log.warning("gap", camera=gap.camera, first=gap.first, last=gap.last, reason=gap.reason)
        self.catch_up.missed.clear()
        # The handshake latches the alarm and logs sequence_backwards; the backlog is measured in the new numbering.
        for camera, _, _ in self.catch_up.backwards:
            self._renumbered(camera)
            self.examined[camera] = self.catch_up.live[camera]
        self.catch_up.backwards.clear()


async def _serve(protocol, config, args: argparse.Namespace, curve, acked: AckedState) -> int:
    from inspectd.clients.handshake import Handshake, PlcError

    prefix = args.topic
    link = await protocol.connect(config, args)
    try:
        handshakes = [
            Handshake(
                target,
                config,
                camera or topic_camera(prefix),
                log=lambda event, level="info", **kw: getattr(log, level)(event, **kw),
                acked=acked.record,
            )
            for camera, target in link.slots()
        ]
        recorded = _recorded_camera(handshakes, acked, prefix)
        if recorded is not None:
            next(h for h in handshakes if h.camera is None).camera = recorded
        for handshake in handshakes:
            camera = handshake.camera
            if args.journal is None or camera is None:
                await handshake.start(acked.get(camera))
                continue
            await handshake.start(
                acked.get(camera),
                functools.partial(_journal_newest, args.journal, camera),
                functools.partial(_journal_reserved, args.journal, camera),
            )
        for handshake in handshakes:
            if recorded is not None and handshake.camera == recorded:
                log.info("camera_bound", camera=recorded, resume_after=handshake.last_id, heard="state_file")
        return await _bridge(handshakes, config, args, curve, acked, protocol.describe(config, args), recorded)
    finally:
        try:
            await link.close()
        except PlcError:
            pass


async def _shut_down(handshake, waited: float) -> None:
    """Drop one camera's flags at the stop (Handshake.shutdown) and log how that went."""
    from inspectd.clients.handshake import PlcError

    cut = handshake.waiting_for
    try:
        acked = await handshake.shutdown()
    except PlcError as exc:  # each camera's own: one link failing must not keep another's flags up
        # A result cut short (`seq`) then counts as a missed ack, which the PLC may never have been told of.
        log.warning("shutdown_write_failed", camera=handshake.camera, seq=cut, error=str(exc))
        return
    if acked is False:
        log.warning(
            "stop_before_ack",
            camera=handshake.camera,
            seq=cut,
            waited_s=waited,
            effect="result_valid dropped without the PLC's ack: a missed ack, alarm latched, not recorded",
        )


async def _bridge(
    handshakes: list,
    config,
    args: argparse.Namespace,
    curve,
    acked: AckedState,
    plc: dict[str, Any],
    from_state: str | None = None,
) -> int:
    prefix = args.topic
    router = Router(handshakes, acked)
    router.from_state = from_state
    bound = [h.camera for h in handshakes]
    catch_up = JournalCatchUp(args.journal, prefix, None if None in bound else bound)
    feeder = Feeder(catch_up, router)
    for handshake in handshakes:
        handshake.room = feeder.room
    context = zmq.asyncio.Context()
    sub = Subscription(context, args.endpoint, subscriptions(prefix), curve)
    refused: list[str | None] = [None]  # the handshake failure logged, until a message comes: once per outage

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last_heard = [-DAEMON_SILENT_S]
    feeding: list[float | None] = [None]  # since when a message is in the Feeder, which may wait on a journal read
    stuck_told = [False]
    healthy = [True]
    silent_after = [DAEMON_SILENT_S]  # from the interval the daemon's last status message said
    # What the log last said of the daemon, for one line per change: heard (the start counts as heard, so a daemon
    # never heard is told once the silence limit has passed since the start) and healthy.
    told_heard, told_healthy = [True], [True]
    # Liveness is written as it changes, not only at the next heartbeat (up to a minute away): set by a message while
    # trigger_ready is down for the daemon, a change of its health, and the connection's changes (Subscription).
    wake = asyncio.Event()
    written_alive = [False]
    sub.wake_on_change(wake.set)
    log.info(
        "bridge_started",
        endpoint=args.endpoint,
        topic=prefix,
        cameras=bound,
        journal=None if args.journal is None else str(args.journal),
        acked_state=None if acked.path is None else str(acked.path),
        **plc,
    )

    async def take(frames: list[bytes]) -> None:
        last_heard[0] = time.monotonic()
        if not written_alive[0]:
            wake.set()
        if refused[0] is not None:
            log.info("readmitted", endpoint=args.endpoint, reopened=sub.reopened)
            refused[0] = None
        try:
            message = decode(frames)
        except MessageError as exc:
            log.warning("message_refused", error=str(exc))
            return
        # One message at a time: a journal read it waits for holds up the next. Whatever the daemon sends meanwhile
        # waits on the socket, so that wait is the bridge's, not the daemon's silence: the tick takes the daemon as
        # alive through it (dropping trigger_ready for a slow disk would stop the line), and its silence is counted
        # from the end of it, the last message having come just before.
        feeding[0] = time.monotonic()
        try:
            if isinstance(message, Result):
                await feeder.live(message)
                return
            if router.from_state is not None and router.release(message, prefix) is not None:
                await feeder.released()
            if any(handshake.camera is None for handshake in handshakes):
                await feeder.status(message, prefix)
        finally:
            feeding[0] = None
            stuck_told[0] = False
            last_heard[0] = time.monotonic()
        interval = status_interval(message)
        silent_after[0] = DAEMON_SILENT_S if interval is None else max(DAEMON_SILENT_S, SILENT_GAPS * interval)
        if message.get("healthy") is not None:
            healthy[0] = message["healthy"] is True  # a string "false" is no health either
            if healthy[0] != told_healthy[0]:
                wake.set()
        for handshake in handshakes:  # written with the next result or heartbeat
            handshake.follow_daemon(message)

    if args.journal is not None:
        # Subscribed first and waited for the first live message, so everything journalled after the read below is
        # already queued on the socket: nothing falls between the journal and the live stream (the catch-up drops what
        # arrives twice).
        first = None
        if await sub.socket.poll(SETTLE_S * 1000):
            first = await sub.socket.recv_multipart()
        since = {
            h.camera: h.last_id for h in handshakes if h.camera is not None and h.last_id is not None and h.placed()
        }
        try:
            await feeder.resume(since)
        except InspectdError as exc:
            log.warning("journal_unreadable", journal=str(args.journal), error=str(exc))
        log.info("journal_resume", journal=str(args.journal), after=since)
        if first is not None:
            await take(first)

    async def receive() -> None:
        while not stop.is_set():
            await take(await sub.recv())

    async def tick() -> None:
        from inspectd.clients.handshake import either

        beat = 0
        started = time.monotonic()
        beat_due = started
        while not stop.is_set():
            wake.clear()
            failure = sub.look()  # first: the connection as the monitor tells it now; the events must not pile up
            now = time.monotonic()
            waited = None if feeding[0] is None else now - feeding[0]
            if waited is not None and waited >= READ_STUCK_S and not stuck_told[0]:
                stuck_told[0] = True
                log.warning(
                    "journal_read_stuck",
                    journal=None if args.journal is None else str(args.journal),
                    waited_s=round(waited, 1),
                    effect="trigger_ready down until the read returns: no verdict can come meanwhile",
                )
            closed = sub.closed_since(last_heard[0])
            alive = not closed and (
                (waited is not None and waited < READ_STUCK_S) or now - last_heard[0] < silent_after[0]
            )
            quiet = now - max(last_heard[0], started)
            heard = alive or (quiet < silent_after[0] and not closed)
            if heard != told_heard[0]:
                told_heard[0] = heard
                if heard:
                    log.info("daemon_heard", endpoint=args.endpoint, trigger_ready="allowed by the daemon again")
                else:
                    log.warning(
                        "daemon_silent",
                        endpoint=args.endpoint,
                        topic=prefix,
                        silent_s=round(quiet, 1),
                        since="the start" if last_heard[0] == -DAEMON_SILENT_S else "the last message",
                        silent_after_s=silent_after[0],
                        connection=sub.connection(),
                        trigger_ready="down until the daemon is heard again",
                    )
            if healthy[0] != told_healthy[0]:
                told_healthy[0] = healthy[0]
                if healthy[0]:
                    log.info("daemon_healthy", endpoint=args.endpoint, trigger_ready="allowed by the daemon again")
                else:
                    log.warning(
                        "daemon_unhealthy",
                        endpoint=args.endpoint,
                        trigger_ready="down while the daemon's status says healthy: false",
                    )
            if failure is not None and not alive and failure != refused[0]:
                # A daemon that shuts the bridge out would otherwise look like one that is down.
                log.warning("handshake_failed", endpoint=args.endpoint, error=f"the daemon {failure}")
                refused[0] = failure
            written_alive[0] = alive
            for handshake in handshakes:
                await handshake.set_status(daemon_alive=alive, daemon_healthy=healthy[0])  # written when changed
            if time.monotonic() >= beat_due:
                beat += 1
                for handshake in handshakes:
                    await handshake.service(beat)
                # On its own schedule, so the PLC's watchdog sees the period it was set to; after a stall, from now.
                beat_due = max(beat_due + config.heartbeat_ms / 1000, time.monotonic())
            # Awake again at the next heartbeat, or sooner when a limit this pass saw ahead runs out first: the
            # silence limit, the whole-start limit of a daemon never heard, a journal read turning stuck. Each limit
            # wakes the loop once (once past, it is no longer ahead), so the PLC sees no more writes than changes.
            soonest = beat_due
            for limit in (
                last_heard[0] + silent_after[0],
                max(last_heard[0], started) + silent_after[0],
                None if feeding[0] is None or stuck_told[0] else feeding[0] + READ_STUCK_S,
            ):
                if limit is not None and now < limit < soonest:
                    soonest = limit + LIMIT_SLACK_S  # past the limit when it is looked at
            await either(wake, stop, max(0.0, soonest - time.monotonic()))

    runs = [asyncio.ensure_future(h.run(stop)) for h in handshakes]
    refill = asyncio.ensure_future(feeder.run(stop))
    tasks = [asyncio.ensure_future(receive()), asyncio.ensure_future(tick()), refill, *runs]
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    failure = next((t.exception() for t in done if t is not stopper and t.exception()), None)
    stop.set()  # after a failure too: a task whose cancel is lost (Handshake.cut_short) ends, waits for nothing new
    waited = 0.0  # a failure waits for no ack: the bridge is ending, and the link may be what failed
    if failure is None:
        # A stop lets the result on the PLC finish its handshake (its ack is recorded), then no new one starts; but
        # not past STOP_WAIT_S, or the service manager's kill would leave the PLC a valid result and trigger_ready.
        waited = min(config.ack_timeout_ms / 1000 + 1.0, STOP_WAIT_S)
        deadline = time.monotonic() + waited
        await asyncio.wait(runs, timeout=waited)
        # A refill stuck on a read must not hold the flags up past the stop's budget.
        await asyncio.wait([refill], timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        failure = next(
            (t.exception() for t in [*runs, refill] if t.done() and not t.cancelled() and t.exception()), None
        )
    for handshake in handshakes:
        handshake.cut_short()
    for task in [*tasks, stopper]:
        task.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    # All cameras at once, each within its own requests' bounds: a PLC that does not answer one camera holds up no
    # other camera's flags past the unit's kill. Where one link serves every camera (OPC UA client mode), each
    # camera's write is sent before the first can time out, and asyncua refuses every request after a timeout. After
    # a failure too (one camera's write, the heartbeat's): the other cameras' trigger_ready and result_valid must not
    # stay up for a bridge that is gone, and the failure is what the bridge still ends with.
    ended = await asyncio.gather(*(_shut_down(h, waited) for h in handshakes), return_exceptions=True)
    failure = failure or next((e for e in ended if isinstance(e, BaseException)), None)
    sub.close()
    context.term()
    log.info(
        "bridge_stopped",
        journal_replayed=feeder.replayed,
        journal_recovered=catch_up.recovered,
        gaps_unfilled=sum(catch_up.gaps.missed.values()),
        **router.counters(),
    )
    if failure is not None:
        raise failure
    return 0
