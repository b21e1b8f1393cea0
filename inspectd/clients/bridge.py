"""`inspectd bridge modbus`: subscribe to a daemon's results and hand each verdict to a PLC over Modbus TCP.

This module owns the process: the CLI, the ZeroMQ subscription, the heartbeat and the shutdown on SIGTERM/SIGINT.
What the PLC sees (register map, handshake, restart rule) lives in inspectd.clients.plc; docs/PLC.md documents both.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path

import structlog
import zmq
import zmq.asyncio

from inspectd.errors import ConfigError, InspectdError, MessageError
from inspectd.logs import LOG_FORMATS, configure_logging
from inspectd.protocol.messages import Result, decode

log = structlog.get_logger("inspectd.clients.bridge")

# trigger_ready drops when the daemon has published nothing (result or status) for this long; status is 1 Hz.
DAEMON_SILENT_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="bridge_kind", metavar="KIND", required=True)
    modbus = kinds.add_parser("modbus", help="write verdicts to holding registers of a Modbus TCP PLC")
    modbus.add_argument(
        "--endpoint", required=True, help="the daemon's result PUB endpoint (tcp://host:port, ipc://...)"
    )
    modbus.add_argument("--plc", required=True, metavar="HOST:PORT", help="the PLC's Modbus TCP address")
    modbus.add_argument("--unit", type=int, default=None, help="Modbus unit (device) id; overrides the config's unit")
    modbus.add_argument("--config", default=None, help="bridge YAML: register map and handshake (docs/PLC.md)")
    modbus.add_argument(
        "--topic",
        default="inspect.",
        help="topic prefix to subscribe to, e.g. inspect.line1.cam0. (default: every result)",
    )
    modbus.add_argument(
        "--server-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="CurveZMQ: the daemon's publish public key file (with --client-key)",
    )
    modbus.add_argument(
        "--client-key",
        type=Path,
        default=None,
        metavar="PATH",
        help="CurveZMQ: this bridge's .key_secret file, in the daemon's allow-list",
    )
    modbus.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="json",
        help="log lines on stdout: json (for journald | jq, the default) or console",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from inspectd.clients import plc
    except ModuleNotFoundError as exc:  # pymodbus is the [plc] extra
        print(f"inspectd bridge: needs the Python package {exc.name!r}: pip install 'inspectd[plc]'", file=sys.stderr)
        return 2

    try:
        config = plc.load_bridge_config(args.config) if args.config else plc.parse_bridge_config({})
        if args.unit is not None:
            if not 0 <= args.unit <= 255:
                raise ConfigError(f"--unit {args.unit}: expected a Modbus unit id in [0, 255]")
            config = dataclasses.replace(config, unit=args.unit)
        host, port = _host_port(args.plc)
        if not args.topic.startswith("inspect."):
            raise ConfigError(f"--topic {args.topic!r}: expected a prefix of inspect.<station>.<camera>.result")
        if (args.server_key is None) != (args.client_key is None):
            raise ConfigError("--server-key and --client-key: expected both (CurveZMQ) or neither")
        curve = None
        if args.server_key is not None:
            from inspectd.protocol.keys import curve_client

            curve = curve_client(args.server_key, args.client_key)
    except InspectdError as exc:
        print(f"inspectd bridge: {exc}", file=sys.stderr)
        return 2
    configure_logging("info", args.log_format)  # the daemon's log format, so one jq filter reads both
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # it logs every refused request as a traceback
    try:
        return asyncio.run(_serve(args.endpoint, host, port, args.topic, config, curve))
    except (plc.PlcError, OSError) as exc:
        print(f"inspectd bridge: {exc}", file=sys.stderr)
        return 1


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--plc {text!r}: expected HOST:PORT, e.g. 192.168.0.10:502")
    return host.strip("[]"), int(port)


def _subscriptions(prefix: str) -> list[bytes]:
    """The result prefix, plus the station's status topic when the prefix names a station (for trigger_ready)."""
    parts = prefix.split(".")
    topics = [prefix.encode("ascii")]
    if len(parts) >= 3 and parts[1]:
        topics.append(f"inspect.{parts[1]}.status".encode("ascii"))
    return topics


async def _serve(endpoint: str, host: str, port: int, prefix: str, config, curve) -> int:
    from pymodbus.client import AsyncModbusTcpClient

    from inspectd.clients.plc import Handshake, Plc, PlcError

    client = AsyncModbusTcpClient(host, port=port, timeout=config.request_timeout_ms / 1000, retries=1)
    if not await client.connect():
        raise PlcError(f"PLC {host}:{port}: cannot connect (is it reachable, is Modbus TCP enabled?)")
    handshake = Handshake(Plc(client, config), config, log=lambda event, **kw: log.info(event, **kw))
    await handshake.start()

    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve(sub)  # CurveZMQ client keys, before connect
    for topic in _subscriptions(prefix):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last_heard = [-DAEMON_SILENT_S]
    log.info("bridge_started", endpoint=endpoint, plc=f"{host}:{port}", unit=config.unit, topic=prefix)

    async def receive() -> None:
        while not stop.is_set():
            frames = await sub.recv_multipart()
            last_heard[0] = time.monotonic()
            try:
                message = decode(frames)
            except MessageError as exc:
                log.warning("message_refused", error=str(exc))
                continue
            if isinstance(message, Result):
                handshake.offer(message)

    async def tick() -> None:
        beat = 0
        while not stop.is_set():
            beat += 1
            await handshake.set_status(daemon_alive=time.monotonic() - last_heard[0] < DAEMON_SILENT_S)
            await handshake.service(beat)
            try:
                await asyncio.wait_for(stop.wait(), timeout=config.heartbeat_ms / 1000)
            except asyncio.TimeoutError:
                pass

    tasks = [asyncio.ensure_future(t) for t in (receive(), tick(), handshake.run(stop))]
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    failure = next((t.exception() for t in done if t is not stopper and t.exception()), None)
    for task in [*tasks, stopper]:
        task.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    if failure is None:
        try:
            await handshake.shutdown()
        except PlcError:
            pass
    sub.close()
    context.term()
    client.close()
    log.info("bridge_stopped", **vars(handshake.counters))
    if failure is not None:
        raise failure
    return 0
