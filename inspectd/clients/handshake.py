"""The protocol-neutral core of a PLC bridge: per camera, hand results to a PLC one at a time with an ack by id.

A protocol (Modbus in inspectd.clients.plc, OPC UA in inspectd.clients.opcua) is an adapter that gives each camera a
`Target`: named values it can read from and write to the PLC. This module owns what those values mean:

  1. a result is written (inspection_id, result_code, verdict, score, threshold, region_count, model_id,
     thresholds_version, the counters) together with `status` where result_valid is raised; an adapter that cannot
     write them in one request writes the data first and `status` last, so result_valid rises only on complete data;
  2. the PLC acknowledges by writing the inspection id into `ack` (so a late ack of an old result never releases a
     new one);
  3. the bridge drops result_valid (a falling edge, so the next result is a fresh rising edge) and writes the next
     queued result. No ack within ack_timeout_ms counts a missed ack, latches alarm and moves on.

Results arriving meanwhile are queued (queue_size); on overflow the OLDEST is dropped and, since the PLC then sees a
jump in inspection ids, counted in sequence_gaps and latched in alarm like any other gap.

Restart rule: on start the bridge reads the target's inspection_id and drops result_valid, and resumes after the later
of that id and the last id the PLC acknowledged as the bridge's own state file recorded it (`acked`, kept outside the
PLC so a PLC whose registers were reset does not get everything again). An id of 0 is no id to resume after, except a
narrow id's residue 0 with no recorded ack beside a heartbeat (`place`), and seq 0 itself left on display by a killed
bridge (result_valid up beside the ack := id - 1 the bridge wrote before it); only next to a heartbeat of 0 (which the
bridge never writes) is it a fresh PLC, whose counter registers are not carried on. A PLC id past the recorded ack with
result_valid still up and no ack of it is a result a killed or crashed bridge left waiting: the resume point is after
it, so it counts as a missed ack with alarm (`stop_before_ack`), as a stop counts it. The daemon publishes each seq
once, after the bridge subscribed, so a resume point ahead of the daemon's numbering (its state wiped or renumbered, a
journal switched off, an id the bridge never wrote) cannot be a replay: it is warned about (`resume_ahead_of_daemon`),
latches alarm, and the bridge resumes on the daemon's numbering (at a first result at or below it, after the recorded
ack where that lies before the result; at start, after the journal's newest); a seq that goes back under a running
bridge likewise (`sequence_backwards`). Nothing is skipped as stale. A resume point past the daemon's journal at start
is not proof of that: the state file is fsynced at each ack and the journal only every fsync_interval_s, so a power cut
leaves the ack ahead of the journal's newest. Only a PLC id past the journal and past the one the bridge writes after
the recorded ack, with that ack within the journal, is decided at start (missed acks leave such an id too, so the ack
does not say what the PLC took); otherwise the point is kept (`resume_past_journal`) and the first result decides: at or
below it, the numbering is not the one resumed on; above it, the journal lost its tail, and what lies between is a gap
like any other. A point past the journal's reservation mark as well (which every seq the daemon gave out in its
numbering lies at or below, a power cut's lost tail too) is not this numbering's: that line is a warning and latches
alarm at start, and the first result still decides where to resume.

Id width: a target holds ids modulo 2**32, or modulo less (`id_modulus`, e.g. 2**15 for an S7 Int): what the PLC holds
and echoes is the seq modulo that, so the ack is compared in that width, and the PLC's inspection id read at start
stands for the seq with that remainder nearest the recorded ack, or else the latest at or before the daemon's newest
journalled seq, or else the latest before the first result (`place`). What the bridge records (the acked callback,
gaps, last_id) stays in full seqs, past 2**32 too.

Stopping (SIGTERM) lets the result on the PLC finish its handshake (its ack, at most ack_timeout_ms and 7 s) before
the bridge drops result_valid, so what the PLC took is recorded as acknowledged and not handed over again after the
restart.

Counters: missed_acks and sequence_gaps as the PLC sees them go on from what it holds at start (read with the
restart rule), so a PLC or HMI that trends them or alarms on their increase sees no drop at a bridge restart; the
`counters` of a run (its bridge_stopped log line) count that run alone.

Status flags besides the result's own: trigger_ready (the daemon is heard from, says it is healthy, and does not report
this camera in any state but running: cameras.<camera>.state, see inspectd.daemon.ingest.supervisor; a status that
leaves this camera out while it reports other cameras' states says the daemon no longer runs it, and holds the bit
down; one that reports no state does not), daemon_unhealthy (its status message says healthy: false), drift
(the daemon's drift alarm for this camera, from its status message: cameras.<camera>.drift.alarm, see
inspectd.daemon.drift; the bridge has no drift rule of its own), false_reject_warning (likewise
cameras.<camera>.drift.false_reject_warning: the good frames' scores imply a false-reject rate well above the
calibrated target) and alarm (latched by a missed ack, a gap, an overflow, a seq going back or a resume point ahead of
the daemon; cleared when the PLC writes alarm_reset, except that an alarm whose status write had not reached the PLC
when the bridge last read alarm_reset as 0, each heartbeat and once after a status write shows a latch, stays set:
the request may predate it, and the PLC must reset again). `follow_daemon` takes the daemon's flags and the camera's
state from each status message.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

from pydantic import Field

from engines.schema import Int, Number, declared
from inspectd.protocol.messages import Result

RESULT_CODES = {"ok": 0, "defect": 1, "error": 2}
STATUS_FLAGS = (
    "trigger_ready",
    "result_valid",
    "pass",
    "fail",
    "defect",
    "alarm",
    "drift",
    "daemon_unhealthy",
    "false_reject_warning",
)
Status = frozenset  # the raised STATUS_FLAGS
ID_MODULUS = 1 << 32  # inspection ids are written as 32-bit values unless a target holds fewer bits
# What the stop leaves after its ack wait (TimeoutStopSec=10, STOP_WAIT_S=7) to drop the flags: one request to the PLC
# that times out, with every retry its protocol client makes, must end within it, or the service manager's kill
# leaves result_valid and trigger_ready up. Each protocol bounds its request_timeout_ms by it.
STOP_REQUEST_BUDGET_MS = 2000.0
# A PLC that stops acking while the line runs drops a result per part: the first drop is logged at once, the drops
# after it at most this often as one line with their count, so the log keeps its other lines (and journald's rate
# limit) for as long as that lasts. Every drop is still counted (overflow_drops, sequence_gaps).
OVERFLOW_LOG_S = 60.0


# The state of a camera the daemon does not run (taken out of its config, or renamed), where its status message
# reports the states of the cameras it does run.
ABSENT = "absent"


def daemon_camera_state(status: dict[str, Any], camera: str | None) -> str | None:
    """`camera`'s state in a daemon status message (cameras.<camera>.state: running, paused, reopening, failed, ended,
    stopped), ABSENT when the message leaves the camera out while it reports another camera's state, None when the
    message does not report one (a daemon that reports no states)."""
    cameras = status.get("cameras")
    if not isinstance(cameras, dict) or camera is None:
        return None
    stats = cameras.get(camera)
    if stats is None and camera not in cameras:
        # Each status lists every camera the daemon runs: a daemon that reports states runs no camera it leaves out.
        others = (other.get("state") for other in cameras.values() if isinstance(other, dict))
        return ABSENT if any(isinstance(state, str) for state in others) else None
    state = stats.get("state") if isinstance(stats, dict) else None
    return state if isinstance(state, str) else None


def daemon_drift_flags(status: dict[str, Any], camera: str | None) -> tuple[bool, bool]:
    """(drift alarm, false-reject warning) of `camera` in a daemon status message (cameras.<camera>.drift.alarm and
    .false_reject_warning, each only when exactly true); both False from a daemon that reports neither."""
    cameras = status.get("cameras")
    stats = cameras.get(camera) if isinstance(cameras, dict) and camera is not None else None
    drift = stats.get("drift") if isinstance(stats, dict) else None
    if not isinstance(drift, dict):
        return False, False
    return drift.get("alarm") is True, drift.get("false_reject_warning") is True


async def either(event: asyncio.Event, stop: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until `event` or `stop` is set (or `timeout` seconds have passed)."""
    waiter = asyncio.ensure_future(event.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    stopper.cancel()


class PlcError(RuntimeError):
    """The PLC refused a request or did not answer."""


class Target(Protocol):
    """One camera's values in the PLC, as a protocol adapter reaches them.

    `read` names: inspection_id (0 when the PLC holds none), heartbeat, ack, alarm_reset (non-zero: reset requested),
    alarm and result_valid (1 while that flag is set in the PLC), missed_acks and sequence_gaps (as last written).
    `write` names: status (a Status), inspection_id, result_code, verdict, score (float or None), threshold (float or
    None), region_count, model_id (str or None), thresholds_version (int or None), missed_acks, sequence_gaps,
    heartbeat, alarm_reset. Values an adapter has no
    place for are left out by the adapter; counters are unbounded here and wrapped by the adapter. Both raise
    PlcError."""

    async def read(self, name: str) -> int: ...

    # A target may also have `id_modulus` (int): the inspection_id and ack it holds are seqs modulo that; 2**32 without.
    # And `heartbeat_modulus` (int): the heartbeat it holds wraps at that (see Handshake.heartbeat).

    async def write(self, fields: dict[str, Any], last: str | None = None) -> None: ...


MAX_ACK_TIMEOUT_MS = 3_600_000
MAX_HEARTBEAT_MS = 60_000


@declared
class HandshakeSettings:
    """The keys every bridge config has (docs/PLC.md); a protocol's config declaration adds its own."""

    # At most an hour: each result waits it for its ack, so past that one PLC in STOP holds the line's results for a
    # shift, and 1e300 meant an ack that never came never raised the alarm.
    ack_timeout_ms: Annotated[Number, Field(ge=1, le=MAX_ACK_TIMEOUT_MS)] = 1000.0
    poll_ms: Annotated[Number, Field(ge=1, le=10_000)] = 10.0
    queue_size: Annotated[Int, Field(ge=1, le=1_000_000)] = 64
    # At most a minute: the PLC tells a live bridge by the register changing, and this period is also how soon an
    # alarm_reset is read and a cleared status word restored; 1e300 left the register still for good.
    heartbeat_ms: Annotated[Number, Field(ge=10, le=MAX_HEARTBEAT_MS)] = 1000.0
    # With a journal: how many results the PLC may fall behind the newest before the bridge skips to the newest;
    # None: never skip (the catch-up hands over everything, however old).
    max_backlog: Annotated[Int, Field(ge=1)] | None = None


@dataclasses.dataclass
class Counters:
    written: int = 0
    acked: int = 0
    missed_acks: int = 0
    sequence_gaps: int = 0
    overflow_drops: int = 0
    seq_backwards: int = 0


class Handshake:
    """Queues one camera's decoded results and hands them to its Target one at a time."""

    def __init__(
        self,
        target: Target,
        settings: HandshakeSettings,
        camera: str | None,
        log: Callable[..., None] | None = None,
        acked: Callable[[str, int], Awaitable[None]] | None = None,
        room: Callable[[Handshake], None] | None = None,
    ) -> None:
        self.target = target
        self.settings = settings
        self.camera = camera  # None until the bridge binds it to the first camera whose result arrives
        self.log = log or (lambda event, **kw: None)
        self.acked = acked  # awaited with (camera, inspection id) once the PLC acknowledged that id
        self.room = room  # called when a result leaves the queue: whoever feeds it may offer more
        self.queue: collections.deque[Result] = collections.deque()
        self._arrived = asyncio.Event()
        self.counters = Counters()  # this run's
        # What the PLC's missed_acks and sequence_gaps held at start: what it is shown goes on from there.
        self._carried = {"missed_acks": 0, "sequence_gaps": 0}
        self.last_id: int | None = None  # inspection id last handed over (or read from the PLC at start)
        self.last_received: int | None = None  # seq of the result that arrived last, handed over or not
        self.showing: str | None = None  # verdict of the result flagged valid right now, None when none is
        self.waiting_for: int | None = None  # the seq handed over whose ack is awaited
        self._cut = False  # the bridge is stopping and waits no longer for that ack
        self._alarm = False
        # Alarm latches counted; how many of them a status write that has reached the PLC showed (a latch is counted
        # when its cause is found, which may be before the write that shows it: a result offered, a status written in
        # several requests); and how many of them a reset request the PLC writes from now on covers: those shown
        # before alarm_reset was last read (or written back) as 0.
        self._latches = 0
        self._latches_shown = 0
        self._latches_before_request = 0
        # A request found at the last read of alarm_reset, and the latches counted when it was last logged: a PLC that
        # holds the request (a stuck or forced HMI button written every scan) is logged once, and again only when a
        # read clears an alarm or finds a latch since, not at every heartbeat.
        self._request_held = False
        self._request_told_latches = 0
        self._renumbering_latched = False  # the start latched the alarm for a numbering the journal never reached
        self._reset_lock = asyncio.Lock()  # a read of alarm_reset must not fall between service's read and write-back
        self.daemon_alive = False
        self.daemon_healthy = True
        self.drift = False  # the daemon's drift alarm for this camera, as its last status message said
        self.false_reject_warning = False  # likewise its false-reject warning
        self.camera_state: str | None = None  # this camera's state as the last status message said, None: not said
        self.written_status: Status | None = None
        self._overflow_untold = 0  # drops since the last queue_overflow line
        self._overflow_last_seq: int | None = None  # the seq dropped last
        self._overflow_told_at = -OVERFLOW_LOG_S  # when the last queue_overflow line was logged (monotonic)
        self._writing = False  # a hand-over's result write is on its way: no status write may land between its runs
        self._plc_residue: int | None = None  # the PLC's inspection id at start (modulo its width), until placed
        self._plc_id: int | None = None  # the PLC's inspection id as read at start, and the recorded ack: for the log
        self._recorded_ack: int | None = None

    @property
    def alarm(self) -> bool:
        return self._alarm

    @alarm.setter
    def alarm(self, latched: bool) -> None:
        # Every latch counts, one on an alarm already set too: a reset request for the older cause must not clear it.
        if latched:
            self._latches += 1
        self._alarm = latched

    def shown(self, counter: str) -> int:
        """A counter as the PLC is shown it: what it held at start and this run's count (wrapped by the adapter)."""
        return self._carried[counter] + getattr(self.counters, counter)

    def modulus(self) -> int:
        return min(int(getattr(self.target, "id_modulus", ID_MODULUS)), ID_MODULUS)

    async def start(
        self,
        acked: int | None = None,
        newest: Callable[[], int | None] | None = None,
        reserved: Callable[[], int | None] | None = None,
    ) -> None:
        """Adopt the PLC's last inspection id, or the last id it acknowledged as recorded outside it (`acked`),
        whichever is later (restart rule), and drop result_valid until a fresh result. `newest`: reads the last seq
        the daemon journalled for this camera (None when unknown), called off the event loop; a resume point past it
        is decided at start only when the PLC's id alone is past it (`_past_journal`). `reserved`: reads the seq up to
        which the daemon's journal has reserved this camera's numbering (None when unknown), likewise, and only for a
        resume point past the journal: one past that too was never given out in this numbering."""
        plc_id = await self.target.read("inspection_id")
        # A fresh PLC reads id 0 beside heartbeat 0, which the bridge never writes. An id of 0 beside a heartbeat is
        # one a PLC program or an operator cleared: its counters are the bridge's, kept for the PLC's trends.
        fresh = plc_id == 0 and await self.target.read("heartbeat") == 0
        # Or seq 0 itself (a fresh daemon's first result) left on display by a killed bridge: result_valid up beside
        # the ack := id - 1 the bridge writes before such a result, so that only the PLC's echo acknowledges it.
        written_zero = (
            plc_id == 0
            and not fresh
            and (await self.target.read("ack") + 1) % self.modulus() == 0
            and bool(await self.target.read("result_valid"))
        )
        # An id of 0 is no id to resume after (fresh or cleared), except seq 0 just above and where a narrow id's
        # residue 0 (every `modulus` seqs) has nothing else to place it by, no recorded ack, and the heartbeat says the
        # bridge wrote it.
        narrow_unplaced = plc_id == 0 and self.modulus() < ID_MODULUS and not acked
        no_id = plc_id == 0 and (not narrow_unplaced or fresh) and not written_zero
        self._plc_residue = None if no_id else plc_id % self.modulus()
        self._plc_id, self._recorded_ack = plc_id, acked
        for name in self._carried:
            if fresh:  # no result was ever written here: what the registers hold is no count of this bridge's
                self._carried[name] = 0
                continue
            try:
                self._carried[name] = max(0, await self.target.read(name))
            except PlcError:
                # A value that is no integer (another program's): counted from 0, as a fresh PLC is. A PLC that does
                # not answer fails the reads after this one.
                self._carried[name] = 0
        known = None if newest is None else await asyncio.to_thread(newest)
        # A full-width id with a recorded ack is placed by the ack alone: a journal that lost its newest records in a
        # power cut would move it a wrap back and hand over again what the PLC has.
        placing = known if self._plc_residue is not None and (not acked or self.modulus() < ID_MODULUS) else None
        self.place(acked, placing)
        # A latched alarm survives a bridge restart; not counted as a new latch, so a reset the PLC wrote meanwhile
        # clears it.
        self._alarm = bool(await self.target.read("alarm"))
        missed = not no_id and await self._left_unacked(plc_id, acked)
        if newest is not None and self.last_id is not None and (known is None or self.last_id > known):
            mark = None if reserved is None else await asyncio.to_thread(reserved)
            self._past_journal(known, mark)
        await self._write_status(force=True)
        if missed:  # after the alarm, as at a hand-over's missed ack
            await self.target.write({"missed_acks": self.shown("missed_acks")})
        await self._cover_latches()
        self.log(
            "plc_adopted",
            camera=self.camera,
            inspection_id=plc_id,
            recorded_ack=acked,
            resume_after=self.last_id,
            alarm=self.alarm,
        )

    async def _left_unacked(self, plc_id: int, acked: int | None) -> bool:
        """At start: a bridge killed or crashed while the PLC's id waited for its ack left result_valid up. The resume
        point is after that id, so unacked it is a missed ack, counted as the stop counts one. A result_valid that is
        down says the hand-over ended (its missed ack counted then), an ack equal to the id that the PLC took it."""
        if self.last_id is None or (acked is not None and self.last_id <= acked):
            return False  # no id past the recorded ack: nothing of the PLC's is skipped
        ack = await self.target.read("ack")
        if (ack - plc_id) % self.modulus() == 0 or not await self.target.read("result_valid"):
            return False
        self.counters.missed_acks += 1
        self.alarm = True  # a new latch: a reset the PLC wrote while no bridge ran predates it
        self.log(
            "stop_before_ack",
            level="warning",
            camera=self.camera,
            seq=self.last_id,
            ack=ack,
            recorded_ack=acked,
            effect="found at start: the bridge before ended (killed or crashed) with result_valid up and no ack; "
            "a missed ack, alarm latched, not handed over again",
        )
        return True

    def place(self, acked: int | None, newest: int | None = None) -> None:
        """Where to resume (restart rule): after the later of the PLC's inspection id and `acked`.

        The PLC holds its id modulo `modulus()` (2**32 for a full-width id, which seqs outgrow too), so the seq it
        stands for is the one with that remainder nearest `acked` when an ack is recorded (the PLC holds the last
        acked id or the one written after it) but not past `newest`, else the latest at or before `newest` (the
        daemon's last journalled seq, or the seq before the first result that arrives: the PLC cannot hold a seq
        published after the bridge subscribed). Without either, a full-width id is taken as it reads and a narrower
        one stays unknown; the first result places it."""
        if acked is not None:
            self._recorded_ack = acked
        residue = self._plc_residue
        if residue is None:
            if acked:
                self.last_id = max(self.last_id or 0, acked)
            return
        modulus = self.modulus()
        if acked:
            half = modulus // 2
            held = acked + (residue - acked + half) % modulus - half
            if newest is not None and held > newest:
                held -= modulus  # a PLC id another program left there, not one of ours: the ack decides
            self.last_id = max(acked, held)
        elif newest is not None:
            held = newest - (newest - residue) % modulus
            # No seq that early: the PLC's id is from a numbering the daemon has since restarted (PLC.md).
            self.last_id = held if held > 0 else residue
        else:
            self.last_id = residue if modulus == ID_MODULUS else None
            return
        self._plc_residue = None

    def placed(self) -> bool:
        """Whether where to resume is known (see `place`)."""
        return self._plc_residue is None

    def space(self) -> int:
        """How many more results the queue takes before it drops the oldest."""
        return self.settings.queue_size - len(self.queue)

    def skip_queued(self, before: int | None) -> int:
        """Drop the queued results with a seq below `before`, every one with None (the bridge gives up on a backlog,
        or on a journal of another numbering); how many."""
        kept = [result for result in self.queue if before is not None and result.seq >= before]
        dropped = len(self.queue) - len(kept)
        self.queue.clear()
        self.queue.extend(kept)
        return dropped

    def offer(self, result: Result) -> None:
        """Called for each decoded result of this camera, on the event loop; never blocks."""
        self.place(None, result.seq - 1)  # the first result places a PLC id that nothing else could
        if self.last_received is not None and result.seq <= self.last_received:
            # The daemon's numbering went back (restarted without its journal, or with it wiped): the bridge follows
            # it (the hand-over resumes before this result), and the line must hear that results may be missing.
            self.counters.seq_backwards += 1
            self.alarm = True
            self.log(
                "sequence_backwards",
                level="warning",
                camera=self.camera,
                seq=result.seq,
                after=self.last_received,
                effect="handed over as a new numbering; alarm latched",
            )
        elif self.last_received is None and self.last_id is not None and result.seq <= self.last_id:
            # A renumbering the start latched the alarm for already: said again with the seq, latched once.
            self._resume_ahead(self.rebase(result.seq), latch=not self._renumbering_latched, seq=result.seq)
        self.last_received = result.seq
        if len(self.queue) >= self.settings.queue_size:
            dropped = self.queue.popleft()
            self.counters.overflow_drops += 1
            self._overflow_untold += 1
            self._overflow_last_seq = dropped.seq
            if time.monotonic() - self._overflow_told_at >= OVERFLOW_LOG_S:
                self._tell_overflow()
        self.queue.append(result)
        self._arrived.set()

    def _tell_overflow(self) -> None:
        """One queue_overflow line for the drops since the last one (the first drop of an overflow is told at once)."""
        self.log(
            "queue_overflow",
            level="warning",
            camera=self.camera,
            dropped=self._overflow_untold,
            dropped_seq=self._overflow_last_seq,
            dropped_total=self.counters.overflow_drops,
            queue_size=self.settings.queue_size,
            effect=f"oldest queued results dropped (gaps, alarm latched); told at most every {OVERFLOW_LOG_S:.0f} s",
        )
        self._overflow_untold = 0
        self._overflow_told_at = time.monotonic()

    def _past_journal(self, known: int | None, reserved: int | None) -> None:
        """Where the resume point lies past the daemon's journal at start: past `known`, its newest seq of this
        camera (None: it holds none), with `reserved` its numbering's reservation mark (None: not known)."""
        acked = self._recorded_ack
        assert self.last_id is not None
        if known is not None and acked is not None and acked <= known and self.last_id > acked + 1:
            # An id past both the journal and the one written after the ack. Missed acks leave one (the bridge moves
            # on and writes the next ids), so the ack does not say what the PLC took: resuming after it would hand
            # those results over again. After the journal's newest nothing is repeated; what lies beyond is
            # not this numbering's, said with the alarm.
            self._resume_ahead(known, journal_newest=known)
            return
        # What is past the journal here is the ack, the id written after it, or an id with no ack to check it by;
        # the journal is fsynced less often than the state file (and the PLC keeps its id through the station's
        # power cut), so a lost journal tail alone cannot be told from a renumbering until the daemon's next seq.
        # The reservation can: the daemon fsyncs it before it gives out any seq past it, so every seq of its
        # numbering, the ones a power cut took from the journal too, lies at or below it. Past it the line hears of
        # the renumbering now, not at its first part, which may be hours away; the first result still says where
        # the new numbering resumes (or, from a --journal the daemon no longer writes, that it is not one).
        # A working reservation never lets the journal hold a seq past it, so a newest record past the mark proves
        # the mark stale (a reservation write that failed while appends went on, a daemon too old to keep it): it
        # says nothing, and an alarm from it would stop a quiet line for a renumbering that never happened.
        stale = reserved is not None and known is not None and known > reserved
        renumbered = reserved is not None and not stale and self.last_id > reserved
        if renumbered:
            self.alarm = True
            self._renumbering_latched = True
        self.log(
            "resume_past_journal",
            level="warning" if renumbered else "info",
            camera=self.camera,
            inspection_id=self._plc_id,
            recorded_ack=acked,
            resume_after=self.last_id,
            journal_newest=known,
            journal_reserved=reserved,
            effect=(
                "past the journal's reservation too: the daemon's numbering restarted (or --journal is not the "
                "journal it writes); alarm latched; resume point kept until the first result (resume_ahead_of_daemon)"
                if renumbered
                else "resume point kept; the first result decides: above it, the journal lost its newest records (a "
                "gap); at or below it, the daemon's numbering restarted (resume_ahead_of_daemon)"
                + ("; the reservation mark is behind the journal's newest record, so it says nothing" if stale else "")
            ),
        )

    def rebase(self, seq: int) -> int:
        """Where to resume when the daemon's numbering is at `seq`, at or below the resume point: after the recorded
        ack when it lies before `seq` (what the PLC took, in that numbering), else just before `seq`."""
        acked = self._recorded_ack
        return acked if acked is not None and acked < seq else seq - 1

    def _resume_ahead(self, after: int, latch: bool = True, **daemon: int) -> None:
        """The resume point is past the daemon's numbering (`daemon` names the number that says so): resume after
        `after` instead, with one warning and the alarm (`latch`: not latched already for it), rather than skip every
        result up to it."""
        if after == self._recorded_ack:
            cause = (
                f"after the recorded ack {after}, which the daemon's numbering holds (the PLC's id past it is not "
                "this bridge's, or from a numbering the daemon restarted)"
            )
        else:
            cause = f"after {after} (the daemon's numbering restarted, or the id is not this bridge's)"
        self.log(
            "resume_ahead_of_daemon",
            level="warning",
            camera=self.camera,
            inspection_id=self._plc_id,
            recorded_ack=self._recorded_ack,
            resume_after=self.last_id,
            **daemon,
            effect=f"resuming {cause}; alarm latched" + ("" if latch else " at start"),
        )
        if latch:
            self.alarm = True
        self.last_id = after

    def status(self) -> Status:
        flags = set()
        # A camera that is not running (failed, reopening, paused, stopped, ended, or absent: no longer run by the
        # daemon) publishes no verdicts for the parts the PLC would trigger. A status that does not report its state
        # leaves the bit to the daemon's health as before: dropping it on an absent field would stop a line whose
        # daemon never reports one.
        if self.daemon_alive and self.daemon_healthy and self.camera_state in (None, "running"):
            flags.add("trigger_ready")
        if not self.daemon_healthy:
            flags.add("daemon_unhealthy")
        if self.showing is not None:
            flags.add("result_valid")
            flags.add("pass" if self.showing == "ok" else "fail")
            if self.showing == "defect":
                flags.add("defect")
        if self.alarm:
            flags.add("alarm")
        if self.drift:
            flags.add("drift")
        if self.false_reject_warning:
            flags.add("false_reject_warning")
        return Status(flags)

    def follow_daemon(self, status: dict[str, Any]) -> None:
        """Take this camera's drift alarm, false-reject warning and state from a daemon status message (written with
        the next result or heartbeat)."""
        self.drift, self.false_reject_warning = daemon_drift_flags(status, self.camera)
        # Each status message reports every camera the daemon runs, so a state it leaves out is not reported any more,
        # not unchanged: keeping the last one would hold the bit down on a message long gone.
        state = daemon_camera_state(status, self.camera)
        if state == ABSENT and self.camera_state != ABSENT:
            self.log(
                "camera_state",
                level="warning",
                camera=self.camera,
                state=state,
                trigger_ready="down until the camera is running",
                reason="the daemon does not run this camera: its status lists other cameras, not this one (taken "
                "out of its config or renamed)",
            )
        elif state != self.camera_state:
            self.log(
                "camera_state",
                camera=self.camera,
                state=state,
                trigger_ready="allowed" if state in (None, "running") else "down until the camera is running",
            )
        self.camera_state = state

    async def _write_status(self, force: bool = False, again: bool = False) -> None:
        """Write the status word when it changed (or `force`). `again`: unchanged too, but that shows the PLC nothing
        new, so no latch counts as shown by it: a reset written meanwhile is for the causes it saw before."""
        if self._writing:
            # The hand-over's own write carries the status last; one landing between its runs (a scattered map, OPC
            # UA's data and flag requests) could raise result_valid over partly old data. The next beat writes it.
            return
        status = self.status()
        latches = self._latches  # counted as the status is: one counted while the write is on its way is not in it
        changed = force or status != self.written_status
        if changed or again:
            self.written_status = status
            await self.target.write({"status": status})
            if changed:
                self._shown(latches)

    def _shown(self, latches: int) -> None:
        """A status write computed when `latches` had been counted reached the PLC."""
        self._latches_shown = max(self._latches_shown, latches)

    async def set_status(
        self, *, daemon_alive: bool | None = None, daemon_healthy: bool | None = None, alarm: bool | None = None
    ) -> None:
        """Change trigger_ready / daemon_unhealthy / alarm (drift and false_reject_warning are what the last status
        message said); the result flags stay."""
        if daemon_alive is not None:
            self.daemon_alive = daemon_alive
        if daemon_healthy is not None:
            self.daemon_healthy = daemon_healthy
        if alarm is not None:
            self.alarm = alarm
        await self._write_status()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.queue:
                self._arrived.clear()
                await either(self._arrived, stop)
                continue
            result = self.queue.popleft()
            if self.room is not None:
                self.room(self)
            await self._hand_over(result)

    async def _hand_over(self, result: Result) -> None:
        seq = result.seq
        if self.last_id is not None and seq <= self.last_id:
            # The daemon publishes a seq once, so this is a new numbering (warned of and alarmed when it arrived):
            # skipping up to the old id would leave the line without verdicts.
            self.alarm = True
            self.last_id = seq - 1
        if self.last_id is not None and seq > self.last_id + 1:
            self.counters.sequence_gaps += seq - self.last_id - 1
            self.alarm = True
            self.log("sequence_gap", camera=self.camera, after=self.last_id, seq=seq, missing=seq - self.last_id - 1)
        self.last_id = seq
        await self._clear_stale_ack(seq)
        self.showing = result.verdict
        self.written_status = self.status()
        latches = self._latches
        try:
            self._writing = True
            try:
                await self.target.write(
                    {
                        "status": self.written_status,
                        "inspection_id": seq,
                        "result_code": RESULT_CODES[result.verdict],
                        "verdict": result.verdict,
                        "score": result.score,
                        "threshold": result.threshold,
                        "region_count": len(result.regions),
                        "model_id": result.model_id,
                        "thresholds_version": result.thresholds_version,
                        "missed_acks": self.shown("missed_acks"),
                        "sequence_gaps": self.shown("sequence_gaps"),
                    },
                    last="status",
                )
            finally:
                self._writing = False
            self._shown(latches)
            await self._cover_latches()
        except asyncio.CancelledError:
            # Cut before the wait for the ack began (a stop, or another task's failure ending the bridge): the id,
            # its result_valid too, may be on the PLC already, and a restart resumes after that id. shutdown() then
            # decides it as a cut wait: by one read of the ack, else a missed ack with the alarm.
            self.waiting_for = seq
            raise
        self.counters.written += 1
        self.waiting_for = seq
        acked = await self._wait_ack(seq)
        self.waiting_for = None  # not on a cancel: a stop that cut the wait counts it (shutdown)
        if acked:
            self.counters.acked += 1
            if self.acked is not None and self.camera is not None:
                await self.acked(self.camera, seq)
        else:
            self.counters.missed_acks += 1
            self.alarm = True
            # A warning as every other event that latches the alarm: the operator's log filter must show why it is up.
            self.log(
                "ack_missed",
                level="warning",
                camera=self.camera,
                seq=seq,
                ack_timeout_ms=self.settings.ack_timeout_ms,
            )
        # Falling edge of result_valid: the next result is a fresh rising edge for the PLC. Before the counter, as at
        # a stop: a PLC that sees missed_acks move finds the alarm already up and no valid result left.
        self.showing = None
        await self._write_status(force=True)
        if not acked:
            await self.target.write({"missed_acks": self.shown("missed_acks")})
        await self._cover_latches()

    async def _clear_stale_ack(self, seq: int) -> None:
        """Make an ack already equal to `seq` (in the id's width) not count for it: a fresh PLC's or a fresh server's
        0 next to the daemon's first seq 0, an ack left from another numbering. The ack is set to the id before, so
        the PLC's echo of `seq` is a change the bridge sees. Safe against the PLC's own write: it writes ack only in
        answer to a fresh result_valid, and result_valid is down until the result is written."""
        modulus = self.modulus()
        if (await self.target.read("ack") - seq) % modulus == 0:
            await self.target.write({"ack": (seq - 1) % modulus})

    def cut_short(self) -> None:
        """End a wait for an ack at its next poll, as a cancel would (shutdown() then decides whether it was acked).
        A cancel alone can be lost: Python 3.11's asyncio.wait_for, which pymodbus awaits a reply with, returns the
        reply instead of raising when both arrive in the same step."""
        self._cut = True

    async def _wait_ack(self, seq: int) -> bool:
        # Not ended by the stop event: the PLC may be acting on this result, and its ack is what the restart resumes
        # after. The bridge cuts it short past STOP_WAIT_S, and shutdown() then decides whether it was acked.
        deadline = time.monotonic() + self.settings.ack_timeout_ms / 1000
        modulus = self.modulus()
        while True:
            # The PLC echoes the id as its variable holds it: wrapped at the variable's width, like the id written.
            if (await self.target.read("ack") - seq) % modulus == 0:
                return True
            if self._cut:
                raise asyncio.CancelledError
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(self.settings.poll_ms / 1000, remaining))

    async def shutdown(self) -> bool | None:
        """Leave the PLC nothing to act on: no valid result, not ready; a latched alarm stays. A result whose ack the
        stop could not wait for (`waiting_for`) is looked at once more, as the PLC may have acked it at the cut or
        just after: acked, it is recorded as any ack; else it is a missed ack, latching the alarm, since a restart
        resumes after the PLC's id and the PLC would not see that result again. Returns whether such a result was
        acked (None: there was none). The flags are dropped first, before that read, the alarm and the counter: a
        link failing at the end must not keep the PLC a valid result, and a read that times out may end the link for
        every request after it (asyncua's client refuses them all), the flags' write too."""
        cut, self.waiting_for = self.waiting_for, None
        self.daemon_alive = False
        self.showing = None
        if cut is None:
            await self._write_status(force=True)
            return None
        acked = decided = False
        try:
            if getattr(self.target, "reads_locally", False):
                # The bridge's own server holds Ack in memory: no read there ends a link. Decided first, the flags'
                # fall and a missed ack's alarm are one write, which its state file records together (two, and a
                # kill between them would keep the cut id without the alarm).
                acked, decided = await self._acked_at(cut), True
                if not acked:
                    self.counters.missed_acks += 1
                    self.alarm = True
            await self._write_status(force=True)
            if not decided:
                # An ack the PLC wrote before it saw result_valid fall is still there to read.
                acked = await self._acked_at(cut)
        finally:
            if not acked and not decided:
                # Also where the flags' write failed: no read after it (the stop leaves time for one request that
                # times out), and a result not known to be acked is a missed one.
                self.counters.missed_acks += 1
                self.alarm = True
        if acked:
            self.counters.acked += 1
            if self.acked is not None and self.camera is not None:
                await self.acked(self.camera, cut)
            return True
        # The alarm before the counter, as after a hand-over's missed ack: a PLC that sees missed_acks move finds the
        # alarm already up.
        await self._write_status()
        await self.target.write({"missed_acks": self.shown("missed_acks")})
        return False

    async def _acked_at(self, seq: int) -> bool:
        """Whether the PLC's Ack holds `seq` now (False where it cannot be read)."""
        try:
            return (await self.target.read("ack") - seq) % self.modulus() == 0
        except PlcError:
            return False

    def heartbeat(self, beat: int) -> int:
        """The value of the `beat`th heartbeat (1, 2, ...): 1 up to the largest the target holds, then 1 again, never
        0, so that a restart tells a PLC it wrote to (id 0 and heartbeat 0 is a fresh PLC) from a residue of 0."""
        modulus = getattr(self.target, "heartbeat_modulus", None)
        if modulus is not None:
            return (beat - 1) % (int(modulus) - 1) + 1
        # A target that does not say its width wraps at 2**k (k >= 7; a signed one at its non-negative half): what
        # never lands on a multiple of 128 never wraps to 0.
        return beat + (beat - 1) // 127

    async def _cover_latches(self) -> None:
        """After a latch's alarm and counters are written: alarm_reset reading 0 then means a request from now on
        comes after the latch and may clear it. Without this read only the next heartbeat's could say so, and a PLC
        resetting within a heartbeat of seeing an alarm would have to reset twice."""
        if self._latches_shown == self._latches_before_request:
            return
        async with self._reset_lock:
            # Taken before the read: a latch shown while it is answered may come after the PLC's sample.
            shown = self._latches_shown
            if not await self.target.read("alarm_reset"):
                self._latches_before_request = shown
                self._request_held = False

    async def service(self, heartbeat: int) -> None:
        """Once per heartbeat period: heartbeat (the `heartbeat`th beat), the status word again, and the PLC's alarm
        reset request. The status is rewritten unchanged too: a PLC program, an operator or a re-initialised PLC
        that cleared it would otherwise keep trigger_ready down while the heartbeat says the bridge is alive."""
        if self._overflow_untold and time.monotonic() - self._overflow_told_at >= OVERFLOW_LOG_S:
            self._tell_overflow()  # the drops at an overflow's end, told though no further drop comes
        await self.target.write({"heartbeat": self.heartbeat(heartbeat)})
        await self._write_status(again=True)
        async with self._reset_lock:
            # Only latches a status write has shown: one counted but not on the PLC yet (its result still queued, its
            # status in a later request) is not covered by a request the PLC writes before it sees it.
            shown = self._latches_shown
            if not await self.target.read("alarm_reset"):
                self._latches_before_request = shown
                self._request_held = False
                return
            shown = self._latches_shown
            await self.target.write({"alarm_reset": 0})
            # The request was written at some point since alarm_reset last read 0, so a latch not shown by that read
            # (or counted while this poll awaited the PLC) may be one the PLC never saw: that alarm stays for the PLC
            # to see and reset again.
            unseen = self._latches - self._latches_before_request
            self._latches_before_request = shown
            cleared = self._alarm and not unseen
            if not unseen:
                self.alarm = False  # here, with the count it was decided on: a latch after this stays
            held, self._request_held = self._request_held, True
            if held and not cleared and self._latches == self._request_told_latches:
                return  # the same request, still held, and nothing to clear or keep since it was logged
            self._request_told_latches = self._latches
        if unseen:
            self.log(
                "alarm_reset",
                camera=self.camera,
                alarm_kept=True,
                latched_since_request=unseen,
                effect="alarm stays set: latched after the reset request may have been written; reset again",
            )
            return
        await self._write_status()
        self.log("alarm_reset", camera=self.camera, alarm_was_set=cleared)
