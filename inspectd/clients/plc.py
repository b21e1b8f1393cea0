"""The Modbus protocol of `inspectd bridge`: the register map (config) and the adapter that writes it to a PLC.

The PLC sees one block of holding registers (addresses 0-based, as on the wire; docs/PLC.md has the table):

    status         bit field: trigger_ready, result_valid, pass, fail, defect, alarm, drift, daemon_unhealthy,
                   false_reject_warning (bit numbers configurable)
    inspection_id  2 registers, the result's seq (low 32 bits), high word first
    result_code    0 ok, 1 defect, 2 error
    score          score * score_scale, rounded, clamped to 0..65535 (0 for an error result)
    region_count   defect regions in the result (clamped to 65535)
    missed_acks    results the PLC did not acknowledge in time (wraps at 65536; a restarted bridge goes on from it)
    sequence_gaps  results the PLC never got: jumps in the inspection id it was handed (wraps at 65536; likewise)
    heartbeat      +1 every second while the bridge runs (1..65535, then 1 again: never 0)
    ack            2 registers the PLC writes: the inspection id it has consumed, high word first
    alarm_reset    the PLC writes non-zero to clear the latched alarm bit; the bridge writes it back to 0

The handshake (ack by echoing the inspection id, queueing, gaps, alarm, restart rule) is protocol-neutral and lives
in inspectd.clients.handshake; this module is the Modbus adapter: `ModbusTarget` turns its named values into register
writes (one FC16 write when the map is contiguous, else the data first and the status register last). A bridge
serves one camera (its register block has one inspection id); results of any other camera are refused and logged.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from engines.schema import Int, Number, declared, invalid, refuse, show
from inspectd.clients.handshake import STATUS_FLAGS, STOP_REQUEST_BUDGET_MS, HandshakeSettings, PlcError
from inspectd.configfile import CameraId, parse, read_yaml
from inspectd.errors import ConfigError

# Registers that are two words wide (32-bit, high word first).
WIDE = ("inspection_id", "ack")
# Defaults after the layout vision sensors expose to PLCs: status/control word first, then the inspection id and the
# result code, then counters, then what the PLC writes.
DEFAULT_REGISTERS = {
    "status": 0,
    "inspection_id": 1,
    "result_code": 3,
    "score": 4,
    "region_count": 5,
    "missed_acks": 6,
    "sequence_gaps": 7,
    "heartbeat": 8,
    "ack": 10,
    "alarm_reset": 12,
}
REGISTERS = tuple(DEFAULT_REGISTERS)
DEFAULT_BITS = {name: i for i, name in enumerate(STATUS_FLAGS)}
U16 = 0xFFFF
# Past this a score of 0.07 already fills the register: no score resolution is left to scale for.
MAX_SCORE_SCALE = 1e6
# pymodbus sends a request that got no answer once more (one lost frame is not a PLC gone), so a request that times
# out takes RETRIES + 1 timeouts, and all of them must fit in the stop's budget.
RETRIES = 1
MAX_REQUEST_TIMEOUT_MS = STOP_REQUEST_BUDGET_MS / (RETRIES + 1)


def _over(defaults: dict[str, int]) -> BeforeValidator:
    """Field metadata: a mapping of some of `defaults`' names to numbers, filled up with the defaults. A mapping
    rather than a declaration because one of the status bits is called `pass`."""

    def fill(raw: Any) -> Any:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise invalid(f"expected a mapping of name to number, got {show(raw)}")
        for name in raw:
            if name not in defaults:
                refuse(str(name), f"unknown key (known: {', '.join(defaults)})", raw[name])
        return {**defaults, **raw}

    return BeforeValidator(fill)


@declared
class BridgeConfig(HandshakeSettings):
    registers: Annotated[dict[str, Annotated[Int, Field(ge=0, le=U16)]], _over(DEFAULT_REGISTERS)] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_REGISTERS)
    )
    status_bits: Annotated[dict[str, Annotated[Int, Field(ge=0, le=15)]], _over(DEFAULT_BITS)] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_BITS)
    )
    unit: Annotated[Int, Field(ge=0, le=255)] = 1
    score_scale: Annotated[Number, Field(ge=1e-9, le=MAX_SCORE_SCALE)] = 1000.0
    request_timeout_ms: Annotated[Number, Field(ge=10, le=MAX_REQUEST_TIMEOUT_MS)] = 1000.0
    camera: CameraId | None = None  # None: serve the first camera whose result arrives

    def width(self, name: str) -> int:
        return 2 if name in WIDE else 1

    @field_validator("registers", mode="after")
    @classmethod
    def _no_overlap(cls, registers: dict[str, int]) -> dict[str, int]:
        spans = sorted((addr, addr + (2 if name in WIDE else 1) - 1, name) for name, addr in registers.items())
        for (lo1, hi1, n1), (lo2, _, n2) in zip(spans, spans[1:]):
            if lo2 <= hi1:
                refuse(n2, f"address {lo2} overlaps {n1} ({lo1}..{hi1})", lo2)
        if spans[-1][1] > U16:
            refuse(spans[-1][2], "a 32-bit register needs two addresses below 65536", spans[-1][0])
        return registers

    @field_validator("status_bits", mode="after")
    @classmethod
    def _distinct_bits(cls, bits: dict[str, int]) -> dict[str, int]:
        seen: dict[int, str] = {}
        for name, bit in bits.items():
            if bit in seen:
                refuse(name, f"bit {bit} is already {seen[bit]}", bit)
            seen[bit] = name
        return bits


def parse_bridge_config(raw: Any, where: str = "bridge") -> BridgeConfig:
    """Validate a plain mapping (from YAML); every error starts with the key path."""
    return parse(BridgeConfig, raw, where=where)


def load_bridge_config(path: str | Path) -> BridgeConfig:
    return parse_bridge_config(read_yaml(path, expected="a bridge config file"), where=str(path))


def scaled_score(score: float | None, scale: float) -> int:
    if score is None or not math.isfinite(score):
        return 0
    # Clamped before the product: a huge finite score times the scale is infinite, which has no integer.
    return int(round(min(max(score, 0.0), U16 / scale) * scale))


def _words(value: int) -> list[int]:
    value &= 0xFFFFFFFF
    return [value >> 16, value & U16]


# Values of the neutral handshake that have no register: the PLC reads result_code and the scaled score instead.
NOT_IN_REGISTERS = ("verdict", "threshold", "model_id", "thresholds_version")


class ModbusTarget:
    """The register block as a handshake Target, over one pymodbus async client (one request in flight)."""

    heartbeat_modulus = 1 << 16  # one register: the handshake counts 1..65535 in it, never 0

    def __init__(self, client, config: BridgeConfig) -> None:
        from pymodbus.exceptions import ModbusException

        self.client = client
        self.config = config
        self._lock = asyncio.Lock()
        self._refused: type[Exception] = ModbusException

    async def read(self, name: str) -> int:
        if name in STATUS_FLAGS:  # a bit of the status word (alarm, result_valid)
            return int(bool(await self.read("status") & 1 << self.config.status_bits[name]))
        address, count = self.config.registers[name], self.config.width(name)
        async with self._lock:
            try:
                reply = await self.client.read_holding_registers(address, count=count, device_id=self.config.unit)
            except self._refused as exc:
                raise PlcError(f"PLC read of {name} (register {address}): {exc}") from exc
        if reply.isError():
            raise PlcError(f"PLC read of {name} (register {address}, {count} words) refused: {reply}")
        regs = reply.registers
        if len(regs) < count:
            raise PlcError(f"PLC read of {name} (register {address}): asked for {count} words, got {len(regs)}")
        return (regs[0] << 16 | regs[1]) if count == 2 else regs[0]

    def encode(self, name: str, value: Any) -> int:
        if name == "status":
            return sum(1 << self.config.status_bits[flag] for flag in value)
        if name == "score":
            return scaled_score(value, self.config.score_scale)
        if name == "region_count":
            return min(int(value), U16)
        return int(value)  # counters wrap: masked to their width below

    async def write(self, fields: dict[str, Any], last: str | None = None) -> None:
        """Write named fields in as few FC16 requests as the map allows; `last` (if given) goes in the final one."""
        words: dict[int, int] = {}
        for name, raw in fields.items():
            if name in NOT_IN_REGISTERS:
                continue
            value = self.encode(name, raw)
            base = self.config.registers[name]
            for i, word in enumerate(_words(value) if name in WIDE else [value & U16]):
                words[base + i] = word
        runs = _contiguous_runs(sorted(words))
        if last is not None and len(runs) > 1:
            # Not one atomic request: everything else first, so `last` (the status word) rises only on complete data.
            last_addr = self.config.registers[last]
            runs = [r for r in runs if last_addr not in r] + [r for r in runs if last_addr in r]
        # One lock for every run: a status write of another task between the runs would raise result_valid over
        # partly old data.
        async with self._lock:
            for run in runs:
                try:
                    reply = await self.client.write_registers(
                        run[0], [words[a] for a in run], device_id=self.config.unit
                    )
                except self._refused as exc:
                    raise PlcError(f"PLC write of registers {run[0]}..{run[-1]}: {exc}") from exc
                if reply.isError():
                    raise PlcError(f"PLC write of registers {run[0]}..{run[-1]} refused: {reply}")


def _contiguous_runs(addresses: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for address in addresses:
        if runs and address == runs[-1][-1] + 1:
            runs[-1].append(address)
        else:
            runs.append([address])
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plc", required=True, metavar="HOST:PORT", help="the PLC's Modbus TCP address")
    parser.add_argument("--unit", type=int, default=None, help="Modbus unit (device) id; overrides the config's unit")


def configure(args: argparse.Namespace) -> BridgeConfig:
    config = load_bridge_config(args.config) if args.config else parse_bridge_config({})
    if args.unit is not None:
        if not 0 <= args.unit <= 255:
            raise ConfigError(f"--unit {args.unit}: expected a Modbus unit id in [0, 255]")
        config = dataclasses.replace(config, unit=args.unit)
    _host_port(args.plc)
    return config


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--plc {text!r}: expected HOST:PORT, e.g. 192.168.0.10:502")
    return host.strip("[]"), int(port)


def describe(config: BridgeConfig, args: argparse.Namespace) -> dict[str, Any]:
    return {"plc": args.plc, "unit": config.unit}


class ModbusLink:
    """One TCP connection to the PLC and the one register block it serves."""

    def __init__(self, client, config: BridgeConfig) -> None:
        self.client = client
        self.target = ModbusTarget(client, config)
        self.camera = config.camera

    def slots(self) -> list[tuple[str | None, ModbusTarget]]:
        return [(self.camera, self.target)]

    async def close(self) -> None:
        self.client.close()


async def connect(config: BridgeConfig, args: argparse.Namespace) -> ModbusLink:
    from pymodbus.client import AsyncModbusTcpClient

    host, port = _host_port(args.plc)
    # No reconnecting behind the bridge's back: a PLC that restarted (its registers maybe reset) must end the bridge,
    # so that the service manager's restart runs the restart rule and writes the status word again.
    client = AsyncModbusTcpClient(
        host, port=port, timeout=config.request_timeout_ms / 1000, retries=RETRIES, reconnect_delay=0
    )
    if not await client.connect():
        raise PlcError(f"PLC {host}:{port}: cannot connect (is it reachable, is Modbus TCP enabled?)")
    return ModbusLink(client, config)
