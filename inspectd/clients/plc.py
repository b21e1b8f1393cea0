"""The PLC side of the Modbus bridge: the register map (config), and the handshake that hands results to a PLC.

The PLC sees one block of holding registers (addresses 0-based, as on the wire; docs/PLC.md has the table):

    status         bit field: trigger_ready, result_valid, pass, fail, defect, alarm (bit numbers configurable)
    inspection_id  2 registers, the result's seq (low 32 bits), high word first
    result_code    0 ok, 1 defect, 2 error
    score          score * score_scale, rounded, clamped to 0..65535 (0 for an error result)
    region_count   defect regions in the result (clamped to 65535)
    missed_acks    results the PLC did not acknowledge in time (wraps at 65536)
    sequence_gaps  results the PLC never got: jumps in the inspection id it was handed (wraps at 65536)
    heartbeat      +1 every second while the bridge runs (wraps at 65536)
    ack            2 registers the PLC writes: the inspection id it has consumed, high word first
    alarm_reset    the PLC writes non-zero to clear the latched alarm bit; the bridge writes it back to 0

Handshake (chosen: ack by echoing the inspection id, not by clearing result_valid, so the bridge can tell which result
was acknowledged and a late ack of an old result never releases a new one):
  1. the bridge writes the result fields and raises result_valid (one FC16 write when the map is contiguous, else the
     data first and the status register last);
  2. the PLC sees result_valid rise, reads the block and writes `ack` = inspection_id;
  3. the bridge sees the ack, drops result_valid (a falling edge, so the next result is a fresh rising edge) and
     writes the next queued result. An ack not seen within ack_timeout_ms counts one missed ack and latches alarm;
     the bridge then moves on to the next result.
Results arriving while the bridge waits are queued up to queue_size; on overflow the OLDEST queued result is dropped
(the PLC wants the newest parts judged) and, because the PLC will then see a jump in inspection ids, that counts in
sequence_gaps and latches alarm like any other gap.

Restart rule: on start the bridge reads the PLC's inspection_id and drops result_valid. Results with seq <= that id are
stale (already handed over, or replayed) and are skipped; an id of 0 means a fresh PLC and nothing is skipped. Per
camera seq never goes back (the daemon resumes it from its journal), so this skips only replays. A bridge serves one
camera (its register block has one inspection id); results of any other camera are refused and logged.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator
from pymodbus.exceptions import ModbusException

from engines.schema import Int, Number, declared, invalid, refuse, show
from inspectd.configfile import CameraId, parse, read_yaml

RESULT_CODES = {"ok": 0, "defect": 1, "error": 2}
STATUS_BITS = ("trigger_ready", "result_valid", "pass", "fail", "defect", "alarm")
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
DEFAULT_BITS = {name: i for i, name in enumerate(STATUS_BITS)}
U16 = 0xFFFF


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
class BridgeConfig:
    registers: Annotated[dict[str, Annotated[Int, Field(ge=0, le=U16)]], _over(DEFAULT_REGISTERS)] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_REGISTERS)
    )
    status_bits: Annotated[dict[str, Annotated[Int, Field(ge=0, le=15)]], _over(DEFAULT_BITS)] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_BITS)
    )
    unit: Annotated[Int, Field(ge=0, le=255)] = 1
    score_scale: Annotated[Number, Field(ge=1e-9)] = 1000.0
    ack_timeout_ms: Annotated[Number, Field(ge=1)] = 1000.0
    poll_ms: Annotated[Number, Field(ge=1, le=10_000)] = 10.0
    queue_size: Annotated[Int, Field(ge=1, le=1_000_000)] = 64
    heartbeat_ms: Annotated[Number, Field(ge=10)] = 1000.0
    request_timeout_ms: Annotated[Number, Field(ge=10)] = 1000.0
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
    return int(min(max(round(score * scale), 0), U16))


def _words(value: int) -> list[int]:
    value &= 0xFFFFFFFF
    return [value >> 16, value & U16]


class PlcError(RuntimeError):
    """The PLC refused a request or did not answer."""


class Plc:
    """Reads and writes the register map over one pymodbus async client (calls serialised: one request in flight)."""

    def __init__(self, client, config: BridgeConfig) -> None:
        self.client = client
        self.config = config
        self._lock = asyncio.Lock()

    async def read(self, name: str) -> int:
        address, count = self.config.registers[name], self.config.width(name)
        async with self._lock:
            try:
                reply = await self.client.read_holding_registers(address, count=count, device_id=self.config.unit)
            except ModbusException as exc:
                raise PlcError(f"PLC read of {name} (register {address}): {exc}") from exc
        if reply.isError():
            raise PlcError(f"PLC read of {name} (register {address}, {count} words) refused: {reply}")
        regs = reply.registers
        return (regs[0] << 16 | regs[1]) if count == 2 else regs[0]

    async def write(self, fields: dict[str, int], last: str | None = None) -> None:
        """Write named fields in as few FC16 requests as the map allows; `last` (if given) goes in the final one."""
        words: dict[int, int] = {}
        for name, value in fields.items():
            base = self.config.registers[name]
            for i, word in enumerate(_words(value) if name in WIDE else [value & U16]):
                words[base + i] = word
        runs = _contiguous_runs(sorted(words))
        if last is not None and len(runs) > 1:
            # Not one atomic request: everything else first, so `last` (the status word) rises only on complete data.
            last_addr = self.config.registers[last]
            runs = [r for r in runs if last_addr not in r] + [r for r in runs if last_addr in r]
        for run in runs:
            async with self._lock:
                try:
                    reply = await self.client.write_registers(
                        run[0], [words[a] for a in run], device_id=self.config.unit
                    )
                except ModbusException as exc:
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


@dataclasses.dataclass
class Counters:
    written: int = 0
    acked: int = 0
    missed_acks: int = 0
    sequence_gaps: int = 0
    overflow_drops: int = 0
    stale_skipped: int = 0
    other_camera: int = 0


class Handshake:
    """Queues decoded results and hands them to the PLC one at a time, with ack, gap and alarm bookkeeping."""

    def __init__(self, plc: Plc, config: BridgeConfig, log: Callable[..., None] | None = None) -> None:
        self.plc = plc
        self.config = config
        self.log = log or (lambda event, **kw: None)
        self.queue: collections.deque = collections.deque()
        self._arrived = asyncio.Event()
        self.counters = Counters()
        self.camera = config.camera
        self.last_id: int | None = None  # inspection id last handed over (or read from the PLC at start)
        self.showing: str | None = None  # verdict of the result flagged valid right now, None when none is
        self.alarm = False
        self.daemon_alive = False
        self.written_status: int | None = None

    def _bit(self, name: str) -> int:
        return 1 << self.config.status_bits[name]

    async def start(self) -> None:
        """Adopt the PLC's last inspection id (restart rule) and drop result_valid until a fresh result."""
        plc_id = await self.plc.read("inspection_id")
        self.last_id = plc_id or None
        status = await self.plc.read("status")
        self.alarm = bool(status & self._bit("alarm"))  # a latched alarm survives a bridge restart
        await self._write_status(force=True)
        self.log("plc_adopted", inspection_id=plc_id, alarm=self.alarm)

    def offer(self, result) -> None:
        """Called for each decoded result, on the event loop; never blocks."""
        if self.camera is None:
            self.camera = result.camera
        if result.camera != self.camera:
            self.counters.other_camera += 1
            if self.counters.other_camera == 1:
                self.log(
                    "result_refused",
                    camera=result.camera,
                    serving=self.camera,
                    reason="one bridge serves one camera's register block",
                )
            return
        if len(self.queue) >= self.config.queue_size:
            dropped = self.queue.popleft()
            self.counters.overflow_drops += 1
            self.log("queue_overflow", dropped_seq=dropped.seq, queue_size=self.config.queue_size)
        self.queue.append(result)
        self._arrived.set()

    def status(self) -> int:
        bits = 0
        if self.daemon_alive:
            bits |= self._bit("trigger_ready")
        if self.showing is not None:
            bits |= self._bit("result_valid")
            bits |= self._bit("pass") if self.showing == "ok" else self._bit("fail")
            if self.showing == "defect":
                bits |= self._bit("defect")
        if self.alarm:
            bits |= self._bit("alarm")
        return bits

    async def _write_status(self, force: bool = False) -> None:
        status = self.status()
        if force or status != self.written_status:
            self.written_status = status
            await self.plc.write({"status": status})

    async def set_status(self, *, daemon_alive: bool | None = None, alarm: bool | None = None) -> None:
        """Change trigger_ready / alarm; the result bits stay as they are."""
        if daemon_alive is not None:
            self.daemon_alive = daemon_alive
        if alarm is not None:
            self.alarm = alarm
        await self._write_status()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.queue:
                self._arrived.clear()
                waiter = asyncio.ensure_future(self._arrived.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            await self._hand_over(self.queue.popleft(), stop)

    async def _hand_over(self, result, stop: asyncio.Event) -> None:
        seq = result.seq & 0xFFFFFFFF
        if self.last_id is not None and seq <= self.last_id:
            self.counters.stale_skipped += 1
            self.log("stale_skipped", seq=result.seq, plc_inspection_id=self.last_id)
            return
        if self.last_id is not None and seq > self.last_id + 1:
            self.counters.sequence_gaps += seq - self.last_id - 1
            self.alarm = True
            self.log("sequence_gap", after=self.last_id, seq=seq, missing=seq - self.last_id - 1)
        self.last_id = seq
        self.showing = result.verdict
        self.written_status = self.status()
        await self.plc.write(
            {
                "status": self.written_status,
                "inspection_id": seq,
                "result_code": RESULT_CODES[result.verdict],
                "score": scaled_score(result.score, self.config.score_scale),
                "region_count": min(len(result.regions), U16),
                "missed_acks": self.counters.missed_acks & U16,
                "sequence_gaps": self.counters.sequence_gaps & U16,
            },
            last="status",
        )
        self.counters.written += 1
        if await self._wait_ack(seq, stop):
            self.counters.acked += 1
        else:
            self.counters.missed_acks += 1
            self.alarm = True
            self.log("ack_missed", seq=seq, ack_timeout_ms=self.config.ack_timeout_ms)
            await self.plc.write({"missed_acks": self.counters.missed_acks & U16})
        # Falling edge of result_valid: the next result is a fresh rising edge for the PLC.
        self.showing = None
        await self._write_status(force=True)

    async def _wait_ack(self, seq: int, stop: asyncio.Event) -> bool:
        deadline = time.monotonic() + self.config.ack_timeout_ms / 1000
        while not stop.is_set():
            if await self.plc.read("ack") == seq:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(self.config.poll_ms / 1000, remaining))
        return False

    async def shutdown(self) -> None:
        """Leave the PLC nothing to act on: no valid result, not ready; a latched alarm stays."""
        self.daemon_alive = False
        self.showing = None
        await self._write_status(force=True)

    async def service(self, heartbeat: int) -> None:
        """Once per heartbeat period: heartbeat register, and the PLC's alarm reset request."""
        await self.plc.write({"heartbeat": heartbeat & U16})
        if await self.plc.read("alarm_reset"):
            await self.plc.write({"alarm_reset": 0})
            await self.set_status(alarm=False)
            self.log("alarm_reset")
