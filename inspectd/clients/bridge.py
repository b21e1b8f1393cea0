"""`inspectd bridge KIND`: subscribe to a daemon's results and hand each verdict to a PLC, one protocol per KIND.

This module owns the process every protocol shares: the CLI, the ZeroMQ subscription, the journal catch-up after a
restart, routing results to one handshake (inspectd.clients.handshake) per camera, the heartbeat, the daemon's
health, and the shutdown on SIGTERM/SIGINT. A protocol is an adapter module listed in PROTOCOLS (Modbus TCP in
inspectd.clients.plc, OPC UA in inspectd.clients.opcua) with:

    add_arguments(parser)      its own options (the protocol's library is imported only when the PLC side opens)
    configure(args) -> config  its config (a HandshakeSettings declaration), ConfigError naming the key or option
    describe(config, args)     what the bridge_started log line says about the PLC side (a dict)
    connect(config, args)      async; returns a link with `slots()`: [(camera or None, Target)], one per camera it
                               serves (None: bound to the first camera whose result arrives), and async `close()`

docs/PLC.md documents both protocols; the adapters raise PlcError when the PLC refuses or does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio

from inspectd.errors import ConfigError, InspectdError, MessageError
from inspectd.logs import LOG_FORMATS, configure_logging
from inspectd.protocol.messages import Result, decode

log = structlog.get_logger("inspectd.clients.bridge")

PROTOCOLS = {"modbus": "inspectd.clients.plc", "opcua": "inspectd.clients.opcua"}
HELP = {
    "modbus": "write verdicts to holding registers of a Modbus TCP PLC",
    "opcua": "serve verdicts as OPC UA variables, or write them into a PLC's OPC UA server",
}
# trigger_ready drops when the daemon has published nothing (result or status) for this long; status is 1 Hz.
DAEMON_SILENT_S = 3.0
# With --journal: longest wait for the subscription to take hold (the first live message) before the journal is read.
SETTLE_S = 5.0


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
            help="the daemon's journal directory: after a restart, hand over what the PLC missed before going live",
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
        config = protocol.configure(args)
        if not args.topic.startswith("inspect."):
            raise ConfigError(f"--topic {args.topic!r}: expected a prefix of inspect.<station>.<camera>.result")
        if (args.server_key is None) != (args.client_key is None):
            raise ConfigError("--server-key and --client-key: expected both (CurveZMQ) or neither")
        if args.journal is not None and not args.journal.is_dir():
            raise ConfigError(f"--journal {args.journal}: expected the daemon's journal directory")
        curve = None
        if args.server_key is not None:
            from inspectd.protocol.keys import curve_client

            curve = curve_client(args.server_key, args.client_key)
    except InspectdError as exc:
        print(f"inspectd bridge: {exc}", file=sys.stderr)
        return 2
    configure_logging("info", args.log_format)  # the daemon's log format, so one jq filter reads both
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # it logs every refused request as a traceback
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # likewise, for each dropped connection
    from inspectd.clients.handshake import PlcError

    try:
        return asyncio.run(_serve(protocol, config, args, curve))
    except ModuleNotFoundError as exc:  # pymodbus, asyncua: the [plc] extra, imported when the PLC side opens
        print(f"inspectd bridge: needs the Python package {exc.name!r}: pip install 'inspectd[plc]'", file=sys.stderr)
        return 2
    except (PlcError, OSError) as exc:
        print(f"inspectd bridge: {exc}", file=sys.stderr)
        return 1


def _subscriptions(prefix: str) -> list[bytes]:
    """The result prefix, plus the station's status topic when the prefix names a station (for trigger_ready)."""
    parts = prefix.split(".")
    topics = [prefix.encode("ascii")]
    if len(parts) >= 3 and parts[1]:
        topics.append(f"inspect.{parts[1]}.status".encode("ascii"))
    return topics


def _topic_camera(prefix: str) -> str | None:
    """The camera a topic prefix names in full (inspect.<station>.<camera>.), else None."""
    parts = prefix.split(".")
    return parts[2] if len(parts) >= 4 and parts[2] else None


class Router:
    """Hands each result to its camera's handshake; a slot without a camera takes the first unknown camera."""

    def __init__(self, handshakes: list) -> None:
        self.handshakes = handshakes
        self.other_camera = 0

    def route(self, result: Result) -> None:
        for handshake in self.handshakes:
            if handshake.camera == result.camera:
                handshake.offer(result)
                return
        for handshake in self.handshakes:
            if handshake.camera is None:
                handshake.camera = result.camera
                handshake.offer(result)
                return
        self.other_camera += 1
        if self.other_camera == 1:
            log.info(
                "result_refused",
                camera=result.camera,
                serving=[h.camera for h in self.handshakes],
                reason="no block for this camera in the PLC (one bridge serves the cameras its config names)",
            )

    def counters(self) -> dict[str, Any]:
        totals: dict[str, Any] = {}
        for handshake in self.handshakes:
            for name, value in vars(handshake.counters).items():
                totals[name] = totals.get(name, 0) + value
        totals["other_camera"] = self.other_camera
        return totals


def _catch_up(directory: Path, handshakes: list, prefix: str, replayed: dict[str, int]) -> int:
    """Offer every journalled result after the PLC's last inspection id, camera by camera; returns how many.
    `replayed` gets each camera's last seq offered, so the same results arriving live are not offered twice."""
    from inspectd.protocol import journal

    offered = 0
    for handshake in handshakes:
        if handshake.camera is None or handshake.last_id is None:
            continue  # a fresh PLC (id 0) starts live; an unbound slot has no journal to read yet
        try:
            records = list(journal.read_since(directory, handshake.camera, handshake.last_id))
        except InspectdError as exc:
            log.warning("journal_unreadable", camera=handshake.camera, error=str(exc))
            continue
        for _, frames in records:
            if not bytes(frames[0]).decode("ascii", "replace").startswith(prefix):
                continue
            try:
                message = decode(frames)
            except MessageError as exc:
                log.warning("journal_record_refused", camera=handshake.camera, error=str(exc))
                continue
            if isinstance(message, Result):
                handshake.offer(message)
                replayed[handshake.camera] = message.seq
                offered += 1
    return offered


def daemon_drift(status: dict[str, Any], camera: str | None) -> bool:
    """The daemon's drift alarm for `camera` in a status message (cameras.<camera>.drift.alarm); False from a daemon
    that does not report one."""
    stats = status["cameras"].get(camera) if camera is not None else None
    drift = stats.get("drift") if isinstance(stats, dict) else None
    return isinstance(drift, dict) and drift.get("alarm") is True


async def _serve(protocol, config, args: argparse.Namespace, curve) -> int:
    from inspectd.clients.handshake import Handshake, PlcError

    prefix = args.topic
    link = await protocol.connect(config, args)
    try:
        handshakes = [
            Handshake(target, config, camera or _topic_camera(prefix), log=lambda event, **kw: log.info(event, **kw))
            for camera, target in link.slots()
        ]
        for handshake in handshakes:
            await handshake.start()
        return await _bridge(handshakes, config, args, curve, protocol.describe(config, args))
    finally:
        try:
            await link.close()
        except PlcError:
            pass


async def _bridge(handshakes: list, config, args: argparse.Namespace, curve, plc: dict[str, Any]) -> int:
    from inspectd.clients.handshake import PlcError

    prefix = args.topic
    router = Router(handshakes)
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve(sub)  # CurveZMQ client keys, before connect
    for topic in _subscriptions(prefix):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(args.endpoint)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last_heard = [-DAEMON_SILENT_S]
    healthy = [True]
    replayed: dict[str, int] = {}  # camera -> last seq handed from the journal
    log.info("bridge_started", endpoint=args.endpoint, topic=prefix, cameras=[h.camera for h in handshakes], **plc)

    def take(frames: list[bytes]) -> None:
        last_heard[0] = time.monotonic()
        try:
            message = decode(frames)
        except MessageError as exc:
            log.warning("message_refused", error=str(exc))
            return
        if isinstance(message, Result):
            if message.seq <= replayed.get(message.camera, -1):
                return  # queued on the socket while the journal was read, and offered from there already
            router.route(message)
        else:
            if message.get("healthy") is not None:
                healthy[0] = bool(message["healthy"])
            for handshake in handshakes:  # written with the next result or heartbeat
                handshake.drift = daemon_drift(message, handshake.camera)

    if args.journal is not None:
        # Subscribed first and waited for the first live message, so everything journalled after the read below is
        # already queued on the socket: nothing falls between the journal and the live stream (the restart rule
        # skips what arrives twice).
        first = None
        if await sub.poll(SETTLE_S * 1000):
            first = await sub.recv_multipart()
        caught_up = _catch_up(args.journal, handshakes, prefix, replayed)
        log.info("journal_caught_up", journal=str(args.journal), results=caught_up)
        if first is not None:
            take(first)

    async def receive() -> None:
        while not stop.is_set():
            take(await sub.recv_multipart())

    async def tick() -> None:
        beat = 0
        while not stop.is_set():
            beat += 1
            alive = time.monotonic() - last_heard[0] < DAEMON_SILENT_S
            for handshake in handshakes:
                await handshake.set_status(daemon_alive=alive, daemon_healthy=healthy[0])
                await handshake.service(beat)
            try:
                await asyncio.wait_for(stop.wait(), timeout=config.heartbeat_ms / 1000)
            except asyncio.TimeoutError:
                pass

    tasks = [asyncio.ensure_future(t) for t in (receive(), tick(), *(h.run(stop) for h in handshakes))]
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    failure = next((t.exception() for t in done if t is not stopper and t.exception()), None)
    for task in [*tasks, stopper]:
        task.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    if failure is None:
        try:
            for handshake in handshakes:
                await handshake.shutdown()
        except PlcError:
            pass
    sub.close()
    context.term()
    log.info("bridge_stopped", **router.counters())
    if failure is not None:
        raise failure
    return 0
