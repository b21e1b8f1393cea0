"""Where a restarted bridge resumes (Handshake.start, Handshake.place): the PLC holds a seq modulo its id's width, and
the bridge must find the full seq it stands for from what it knows (the recorded ack, the daemon's newest seq, the
first result), and tell a fresh PLC from one holding a residue of 0 by the heartbeat it never writes as 0.

The arithmetic alone, on a Handshake whose PLC is a few values in memory; the bridge tests drive the same rule end to
end.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from inspectd.clients.handshake import ID_MODULUS, Handshake, HandshakeSettings
from inspectd.protocol.messages import Result, decode, encode_result

S7_INT = 1 << 15  # an S7 Int InspectionId holds seqs modulo this


class Memory:
    """What a handshake reads of and writes to a PLC, as values in memory: its id's width, its inspection id and
    heartbeat; the PLC program acknowledges whatever inspection id is written at once."""

    def __init__(self, modulus: int, inspection_id: int = 0, heartbeat: int = 0) -> None:
        self.id_modulus = modulus
        self.values = {"inspection_id": inspection_id, "heartbeat": heartbeat, "alarm": 0, "alarm_reset": 0}

    async def read(self, name: str) -> int:
        if name == "ack":
            return self.values["inspection_id"] % self.id_modulus
        return self.values[name]

    async def write(self, fields: dict, last: str | None = None) -> None:
        self.values.update({name: value for name, value in fields.items() if name in self.values})


def started(modulus: int, plc_id: int, acked: int | None, newest: int | None, heartbeat: int = 17) -> Handshake:
    handshake = Handshake(Memory(modulus, plc_id, heartbeat), HandshakeSettings(), "cam0")  # type: ignore[arg-type]
    asyncio.run(handshake.start(acked, None if newest is None else lambda: newest))
    return handshake


@pytest.mark.parametrize(
    "modulus, plc_id, acked, newest, expected",
    [
        (S7_INT, 7233, 40000, None, 40001),  # the PLC holds the result written after the last recorded ack
        (S7_INT, 7232, 40001, None, 40001),  # it holds an older one: the ack is later
        (S7_INT, 7233, None, 40005, 40001),  # no ack recorded: the latest seq at or before the newest published
        (S7_INT, 7233, 60000, 60010, 60000),  # nearest the ack is 72769, not published yet: a stray id, the ack wins
        (S7_INT, 7233, None, None, None),  # nothing to place it by: the first result will
        (ID_MODULUS, 1, None, (1 << 32) + 7, (1 << 32) + 1),  # a full-width id past 2**32
        (ID_MODULUS, 500, None, None, 500),  # full width, nothing else known: taken as it reads
        (ID_MODULUS, 500, 480, 1000, 500),
        (ID_MODULUS, 500, 480, 490, 490),  # past the journal (renumbered, or a power cut took its tail): its newest
        (ID_MODULUS, 0, 480, 1000, 480),  # registers reset: only the recorded ack says where
    ],
)
def test_the_plc_id_is_placed_at_the_seq_it_stands_for(modulus, plc_id, acked, newest, expected):
    assert started(modulus, plc_id, acked, newest).last_id == expected


def test_a_resume_point_ahead_of_the_daemons_journal_resumes_after_the_journals_newest():
    """Changed deliberately (review s31, finding 2): the row (ID_MODULUS, 500, None, 100) used to resume after 500,
    so every result of a daemon renumbered below it (state wiped, journal off, an id the bridge never wrote) was
    skipped as stale, silently, until seq passed 500. Now the bridge resumes after the journal's newest, with one
    warning naming both numbers and the alarm latched; likewise a recorded ack ahead of it."""
    logged: list[tuple[str, dict]] = []
    for plc_id, acked, newest in [(500, None, 100), (0, 4000, 5), (7, 4000, 5)]:
        handshake = Handshake(Memory(ID_MODULUS, plc_id, 17), HandshakeSettings(), "cam0")  # type: ignore[arg-type]
        handshake.log = lambda event, **kw: logged.append((event, kw))
        asyncio.run(handshake.start(acked, lambda newest=newest: newest))
        assert handshake.last_id == newest and handshake.alarm, (plc_id, acked)
        warned = [kw for event, kw in logged if event == "resume_ahead_of_daemon"]
        assert len(warned) == 1 and warned[0]["level"] == "warning", logged
        assert warned[0]["resume_after"] == max(plc_id, acked or 0) and warned[0]["journal_newest"] == newest
        assert warned[0]["inspection_id"] == plc_id and warned[0]["recorded_ack"] == acked
        logged.clear()


@pytest.mark.parametrize(
    "heartbeat, expected",
    [
        (17, 32768),  # the bridge wrote to this PLC (its heartbeat is never 0): residue 0, like any other residue
        (0, None),  # id 0 and heartbeat 0: a fresh PLC, nothing to skip
    ],
)
def test_a_narrow_id_reading_0_is_a_fresh_plc_only_when_its_heartbeat_reads_0_too(heartbeat, expected):
    """Used to be one row, (S7_INT, 0, None, 40005) -> None: every 32768th seq an S7 Int reads 0 and was taken for a
    fresh PLC, so the results journalled after it were lost with no gap and no alarm (review s31, finding 8)."""
    assert started(S7_INT, 0, None, 40005, heartbeat=heartbeat).last_id == expected


@pytest.mark.parametrize(
    "modulus, acked, newest, expected",
    [
        (S7_INT, 20000, 40005, 20000),  # a recorded ack decides, whether the id was cleared or is residue 0
        (ID_MODULUS, None, 40005, None),  # a full-width 0 is no id: residue 0 of 2**32 seqs is years away
        (ID_MODULUS, 480, 1000, 480),
    ],
)
def test_an_id_of_0_is_no_id_where_anything_else_can_place_the_resume_point(modulus, acked, newest, expected):
    """A PLC program or an operator that clears the id (the bridge still writing a heartbeat) must not have 0 taken
    for residue 0: placed nearest a recorded ack of 20000 it would stand for 32768, and 20001..32768 would never be
    handed over; with no ack, a full-width 0 placed against the journal would hand all of it over again."""
    assert started(modulus, 0, acked, newest, heartbeat=17).last_id == expected


def result(seq: int) -> Result:
    now = time.time()
    frames = encode_result(
        station="st1",
        camera="cam0",
        seq=seq,
        frame_id=f"f{seq}",
        t_capture=now,
        t_publish=now,
        verdict="ok",
        score=0.1,
        threshold=0.5,
        model_id="m",
        thresholds_version=1,
        regions=[],
        latency_ms=1.0,
        width=8,
        height=8,
    )
    return decode(frames)


@pytest.mark.parametrize("modulus", [S7_INT, 1 << 8, ID_MODULUS])
def test_a_plc_id_placed_against_the_first_result_stands_for_a_seq_before_it(modulus):
    """The PLC cannot hold a seq published after the bridge subscribed: an id with the first result's residue is the
    one a wrap before it (s - m), so that result is handed over (a wrap's gap), not skipped as stale. Full width: the
    daemon has no seq a wrap back, so its numbering restarted and the bridge follows it."""
    first = 40005 if modulus < ID_MODULUS else 500
    handshake = started(modulus, first % modulus, None, None)
    handshake.offer(result(first))
    if modulus < ID_MODULUS:
        assert handshake.last_id == first - modulus
    asyncio.run(handshake._hand_over(handshake.queue.popleft()))
    assert handshake.last_id == first and handshake.counters.written == 1 and handshake.counters.stale_skipped == 0
    assert handshake.target.values["inspection_id"] == first  # type: ignore[attr-defined]
    assert handshake.counters.sequence_gaps == (modulus - 1 if modulus < ID_MODULUS else 0)
    assert handshake.alarm


@pytest.mark.parametrize("modulus", [None, 1 << 16])
def test_the_heartbeat_is_never_0_at_any_width_it_wraps_at(modulus):
    """Counted 1..top of the target's heartbeat when the target says its width (Modbus: 1..65535), else never on a
    multiple of 128, the 0 of every integer width (8 bits and more, signed ones as their non-negative half)."""
    target = Memory(ID_MODULUS)
    if modulus is not None:
        target.heartbeat_modulus = modulus  # type: ignore[attr-defined]
    handshake = Handshake(target, HandshakeSettings(), "cam0")  # type: ignore[arg-type]
    beats = [handshake.heartbeat(beat) for beat in range(1, 200_000)]
    masks = [0xFFFF] if modulus is not None else [0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
    for mask in masks:
        assert all(beat & mask for beat in beats), mask
    assert all(a != b for a, b in zip(beats, beats[1:]))  # it moves every beat
    if modulus is not None:
        assert beats[65534:65537] == [65535, 1, 2]  # 1..65535, then 1 again
