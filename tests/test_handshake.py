"""Where a restarted bridge resumes (Handshake.start, Handshake.place): the PLC holds a seq modulo its id's width, and
the bridge must find the full seq it stands for from what it knows (the recorded ack, the daemon's newest seq, the
first result), and tell a fresh PLC from one holding a residue of 0 by the heartbeat it never writes as 0. And the
status flags the handshake keeps between results: trigger_ready following the camera's state in the daemon's status
messages, and an alarm reset that cannot clear an alarm the PLC may not have seen.

On a Handshake whose PLC is a few values in memory, driven as the bridge drives it (offer and run for results,
follow_daemon for status messages, set_status and service for the heartbeat tick); the bridge tests drive the same
rules end to end.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from inspectd.clients.handshake import ID_MODULUS, Handshake, HandshakeSettings, PlcError
from inspectd.protocol.messages import Result, decode, encode_result, encode_status
from plc_peers import Memory

S7_INT = 1 << 15  # an S7 Int InspectionId holds seqs modulo this


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
        # The PLC's id is past the journal and past the id written after the ack, which the journal holds: not an id
        # this bridge left there, so the ack says what the PLC took.
        (ID_MODULUS, 500, 480, 490, 490),
        (ID_MODULUS, 481, 480, 480, 481),  # the id written after the ack, lost with the journal's tail: kept
        (ID_MODULUS, 500, 480, 470, 500),  # the ack past the journal too: kept until the first result decides
        (ID_MODULUS, 0, 480, 1000, 480),  # registers reset: only the recorded ack says where
    ],
)
def test_the_plc_id_is_placed_at_the_seq_it_stands_for(modulus, plc_id, acked, newest, expected):
    assert started(modulus, plc_id, acked, newest).last_id == expected


@pytest.mark.parametrize(
    "heartbeat, expected",
    [
        (17, 32768),  # the bridge wrote to this PLC (its heartbeat is never 0): residue 0, like any other residue
        (0, None),  # id 0 and heartbeat 0: a fresh PLC, nothing to skip
    ],
)
def test_a_narrow_id_reading_0_is_a_fresh_plc_only_when_its_heartbeat_reads_0_too(heartbeat, expected):
    """Every 32768th seq an S7 Int reads 0: taken for a fresh PLC, the results journalled after it would be lost with
    no gap and no alarm."""
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
    assert handshake.last_id == first and handshake.counters.written == 1
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


async def tick(handshake: Handshake, beat: int) -> None:
    """One heartbeat of the bridge (its `tick`) for this handshake, with the daemon heard from and healthy."""
    await handshake.set_status(daemon_alive=True, daemon_healthy=True)
    await handshake.service(beat)


async def hand_over(handshake: Handshake, *results: Result) -> None:
    """Offer `results` and let the handshake's run hand them all over, as the bridge does."""
    for each in results:
        handshake.offer(each)
    stop = asyncio.Event()
    running = asyncio.ensure_future(handshake.run(stop))
    while handshake.queue:
        await asyncio.sleep(0.001)
    stop.set()  # run finishes the hand-over in flight, then returns
    await running


def logging_handshake(plc_id: int, logged: list[tuple[str, dict]]) -> Handshake:
    """A handshake on a PLC holding `plc_id` (full width, a heartbeat the bridge wrote) that logs into `logged`."""
    plc = Memory(ID_MODULUS, plc_id, 17)
    return Handshake(plc, HandshakeSettings(), "cam0", log=lambda event, **kw: logged.append((event, kw)))


def events(logged: list[tuple[str, dict]], name: str) -> list[dict]:
    return [kw for event, kw in logged if event == name]


@pytest.mark.parametrize("first", ["at-or-below", "above"])
@pytest.mark.parametrize(
    "plc_id, acked, newest",
    [
        (1000, 1000, 995),  # a power cut: acked.json is fsynced at each ack, the journal every fsync_interval_s
        (1001, 1000, 995),  # likewise, with the result written after that ack on the PLC
        (481, 480, 480),  # the id written after the ack is all the journal lost
        (500, None, 100),  # no ack recorded: the PLC's id alone
        (0, 4000, 5),  # registers reset: the ack alone
        (7, 4000, 5),
    ],
)
def test_a_resume_point_past_the_journal_at_start_is_kept_until_the_first_result_decides(plc_id, acked, newest, first):
    """A power cut leaves the recorded ack (and the PLC's id) past the journal's newest, as does a daemon whose
    numbering restarted: at start the two look alike. Taken for a renumbering, every power cut of a running line
    warned of one and counted what the PLC had acked as missing. So the start only says so (info) and keeps the
    resume point; the first result decides: at or below it, the numbering restarted (one warning, the alarm, and the
    bridge resumes before that result); above it, the journal lost its tail, and what lies between is a gap from the
    resume point, with no warning."""
    logged: list[tuple[str, dict]] = []
    resume = max(plc_id, acked or 0)

    async def restart() -> Handshake:
        handshake = logging_handshake(plc_id, logged)
        await handshake.start(acked, lambda: newest)
        assert handshake.last_id == resume and not handshake.alarm, logged
        assert "alarm" not in handshake.target.status  # type: ignore[attr-defined]
        past = events(logged, "resume_past_journal")
        assert len(past) == 1 and past[0]["resume_after"] == resume and past[0]["journal_newest"] == newest, logged
        assert past[0]["inspection_id"] == plc_id and past[0]["recorded_ack"] == acked
        assert not events(logged, "resume_ahead_of_daemon"), logged
        await hand_over(handshake, result(seq))
        return handshake

    seq = newest + 1 if first == "at-or-below" else resume + 24
    handshake = asyncio.run(restart())
    assert handshake.target.values["inspection_id"] == seq and handshake.last_id == seq  # type: ignore[attr-defined]
    assert handshake.counters.written == 1 and handshake.alarm
    warned = events(logged, "resume_ahead_of_daemon")
    if first == "at-or-below":
        assert len(warned) == 1 and warned[0]["level"] == "warning" and warned[0]["seq"] == seq, logged
        assert warned[0]["resume_after"] == resume and warned[0]["recorded_ack"] == acked
        assert handshake.counters.sequence_gaps == 0
    else:
        assert not warned, logged
        assert handshake.counters.sequence_gaps == 23
        assert events(logged, "sequence_gap") == [{"camera": "cam0", "after": resume, "seq": seq, "missing": 23}]


def test_a_plc_id_ahead_of_the_daemon_resumes_after_the_journals_newest_and_a_first_result_after_the_ack():
    """The PLC's block holds 50000 while the state file says the PLC acked 100. At start, with the journal at 200,
    the ack does not say what the PLC took (missed acks leave the PLC's id past it: the bridge moves on), so the
    bridge resumes after the journal's newest, with one warning and the alarm: resuming after the ack would hand the
    results after it over again. Without a journal the first result decides: at 150, below the PLC's id, it resumes
    after the ack, which lies before it, and what it cannot hand over counts as a gap."""
    logged: list[tuple[str, dict]] = []

    async def with_journal() -> Handshake:
        handshake = logging_handshake(50000, logged)
        await handshake.start(100, lambda: 200)
        return handshake

    handshake = asyncio.run(with_journal())
    assert handshake.last_id == 200 and handshake.alarm and "alarm" in handshake.target.status  # type: ignore[attr-defined]
    warned = events(logged, "resume_ahead_of_daemon")
    assert len(warned) == 1 and warned[0]["level"] == "warning" and warned[0]["journal_newest"] == 200, logged
    assert warned[0]["inspection_id"] == 50000 and warned[0]["recorded_ack"] == 100
    assert warned[0]["resume_after"] == 50000 and "after 200" in warned[0]["effect"]
    assert not events(logged, "resume_past_journal")

    logged.clear()

    async def without_journal() -> Handshake:
        handshake = logging_handshake(50000, logged)
        await handshake.start(100)
        assert handshake.last_id == 50000 and not handshake.alarm
        await hand_over(handshake, result(150), result(151))
        return handshake

    handshake = asyncio.run(without_journal())
    assert handshake.counters.written == 2 and handshake.last_id == 151 and handshake.alarm
    assert handshake.counters.sequence_gaps == 49
    warned = events(logged, "resume_ahead_of_daemon")
    assert len(warned) == 1 and warned[0]["seq"] == 150 and warned[0]["recorded_ack"] == 100, logged
    assert events(logged, "sequence_gap") == [{"camera": "cam0", "after": 100, "seq": 150, "missing": 49}]


def daemon_status(cameras: dict) -> dict:
    """A daemon status message reporting `cameras`, as the bridge decodes it off the wire."""
    fields = {"t": time.time(), "uptime_s": 1.0, "healthy": True, "model_id": "m", "thresholds_version": 1}
    message = decode(encode_status("st1", {**fields, "throughput_fps": 10.0, "cameras": cameras}))
    assert isinstance(message, dict)
    return message


@pytest.mark.parametrize("state", ["failed", "reopening", "paused", "stopped", "ended"])
def test_trigger_ready_drops_while_the_daemon_reports_the_camera_not_running(state):
    """A camera that is not running publishes no verdicts (a pulled cable, a paused camera, a finite source done), so
    the PLC must not trigger parts for it: the bit drops on the first heartbeat after such a status, stays down through
    a result handed over meanwhile (a verdict still queued), and rises on the first heartbeat after "running". The
    daemon itself stays healthy throughout."""
    logged: list[tuple[str, dict]] = []

    async def follow() -> tuple[list[frozenset], list[frozenset]]:
        plc = Memory(ID_MODULUS)
        handshake = Handshake(plc, HandshakeSettings(), "cam0", log=lambda event, **kw: logged.append((event, kw)))
        await handshake.start()
        beats = []
        for beat, camera in enumerate([{"state": "running"}, {"state": state}, {"state": "running"}], start=1):
            handshake.follow_daemon(daemon_status({"cam0": {"published": 7, **camera}}))
            await tick(handshake, beat)
            beats.append(plc.status)
            if beat == 2:
                before = len(plc.statuses)
                await hand_over(handshake, result(1))
                handed = plc.statuses[before:]
        return beats, handed

    beats, handed = asyncio.run(follow())
    assert ["trigger_ready" in status for status in beats] == [True, False, True]
    assert not any("daemon_unhealthy" in status for status in beats)
    assert "result_valid" in handed[0] and not any("trigger_ready" in status for status in handed), handed
    changes = [kw["state"] for event, kw in logged if event == "camera_state"]
    assert changes == ["running", state, "running"]


def test_another_cameras_state_leaves_this_cameras_trigger_ready_alone():
    """Two cameras served by one bridge (one handshake each), fed the same status messages: each bit follows its own
    camera's state only."""

    async def follow() -> dict[str, list[bool]]:
        handshakes = {camera: Handshake(Memory(ID_MODULUS), HandshakeSettings(), camera) for camera in ("cam0", "cam1")}
        for handshake in handshakes.values():
            await handshake.start()
        ready: dict[str, list[bool]] = {camera: [] for camera in handshakes}
        states = [("running", "failed"), ("failed", "running"), ("paused", "paused"), ("running", "running")]
        for beat, (cam0, cam1) in enumerate(states, start=1):
            message = daemon_status({"cam0": {"state": cam0}, "cam1": {"state": cam1}})
            for camera, handshake in handshakes.items():
                handshake.follow_daemon(message)
                await tick(handshake, beat)
                ready[camera].append("trigger_ready" in handshake.target.status)  # type: ignore[attr-defined]
        return ready

    assert asyncio.run(follow()) == {"cam0": [True, False, False, True], "cam1": [False, True, False, True]}


def test_a_status_that_does_not_report_the_cameras_state_does_not_hold_trigger_ready_down():
    """Each status message reports every camera the daemon runs, so one without this camera's state (a daemon or a
    publisher that does not report states, another camera listed without a state, a state that is not a string)
    means "not reported", not "unchanged": the bit follows the daemon's health as it did before camera states
    counted, rather than stay down on a state from a message long gone. A slot not bound to a camera yet has no
    state."""

    async def follow() -> tuple[list[bool], list[bool]]:
        bound = Handshake(Memory(ID_MODULUS), HandshakeSettings(), "cam0")
        unbound = Handshake(Memory(ID_MODULUS), HandshakeSettings(), None)
        for handshake in (bound, unbound):
            await handshake.start()
        ready: tuple[list[bool], list[bool]] = ([], [])
        cameras = [
            {"cam0": {"state": "failed"}},
            {"cam0": {"published": 3}},
            {"cam0": {"state": "failed"}},
            {"cam1": {"published": 3}},
            {"cam0": {"state": "failed"}},
            {"cam0": {"state": None}},
            {"cam0": {"state": "failed"}},
            {},
        ]
        for beat, reported in enumerate(cameras, start=1):
            for handshake, seen in zip((bound, unbound), ready):
                handshake.follow_daemon(daemon_status(reported))
                await tick(handshake, beat)
                seen.append("trigger_ready" in handshake.target.status)  # type: ignore[attr-defined]
        return ready

    bound, unbound = asyncio.run(follow())
    assert bound == [False, True] * 4
    assert unbound == [True] * 8


def test_a_camera_the_daemons_status_leaves_out_while_it_reports_others_holds_trigger_ready_down():
    """A daemon that reports its cameras' states lists every camera it runs: one it leaves out was taken out of its
    config or renamed, and publishes no verdict for the parts the PLC would trigger. The bit drops, the change is
    logged once however many such messages come (a warning saying why), and it rises once the camera runs again. A
    slot not bound to a camera yet has none to miss."""
    logged: list[tuple[str, dict]] = []

    async def follow() -> tuple[list[bool], list[bool]]:
        bound = Handshake(
            Memory(ID_MODULUS), HandshakeSettings(), "cam0", log=lambda event, **kw: logged.append((event, kw))
        )
        unbound = Handshake(Memory(ID_MODULUS), HandshakeSettings(), None)
        for handshake in (bound, unbound):
            await handshake.start()
        ready: tuple[list[bool], list[bool]] = ([], [])
        cameras = [
            {"cam0": {"state": "running"}, "cam1": {"state": "running"}},
            {"cam1": {"state": "running"}},  # cam0 taken out of the daemon's config
            {"cam1": {"state": "running"}},
            {"cam0_new": {"state": "running"}, "cam1": {"state": "failed"}},  # renamed
            {"cam0": {"state": "running"}},
        ]
        for beat, reported in enumerate(cameras, start=1):
            for handshake, seen in zip((bound, unbound), ready):
                handshake.follow_daemon(daemon_status(reported))
                await tick(handshake, beat)
                seen.append("trigger_ready" in handshake.target.status)  # type: ignore[attr-defined]
        return ready

    bound, unbound = asyncio.run(follow())
    assert bound == [True, False, False, False, True]
    assert unbound == [True] * 5
    told = [(kw["state"], kw.get("level", "info")) for kw in events(logged, "camera_state")]
    assert told == [("running", "info"), ("absent", "warning"), ("running", "info")], logged
    assert "does not run this camera" in events(logged, "camera_state")[1]["reason"]


def test_queue_overflow_is_logged_at_the_first_drop_then_as_one_count_at_most_every_interval(monkeypatch):
    """A PLC that stops acking while the line runs: every result past the queue drops the oldest, and each drop is
    counted, but only the first is a log line at once; the drops after it come as one line with their count once the
    interval has passed (at the next drop or the next heartbeat, whichever is first)."""
    import inspectd.clients.handshake as module

    monkeypatch.setattr(module, "OVERFLOW_LOG_S", 0.3, raising=False)
    logged: list[tuple[str, dict]] = []

    async def overflow() -> Handshake:
        plc = Memory(ID_MODULUS)
        handshake = Handshake(
            plc, HandshakeSettings(queue_size=4), "cam0", log=lambda event, **kw: logged.append((event, kw))
        )
        await handshake.start()
        for seq in range(1, 51):  # nothing handed over: the queue keeps the newest 4
            handshake.offer(result(seq))
        assert len(events(logged, "queue_overflow")) == 1, logged
        deadline = time.monotonic() + 10
        beat = 0
        while len(events(logged, "queue_overflow")) < 2 and time.monotonic() < deadline:
            beat += 1
            await tick(handshake, beat)
            await asyncio.sleep(0.02)
        return handshake

    handshake = asyncio.run(overflow())
    assert handshake.counters.overflow_drops == 46 and [r.seq for r in handshake.queue] == [47, 48, 49, 50]
    told = events(logged, "queue_overflow")
    assert [(kw["dropped"], kw["dropped_seq"], kw["dropped_total"]) for kw in told] == [(1, 1, 1), (45, 46, 46)]
    assert all(kw["level"] == "warning" for kw in told)


@pytest.mark.parametrize(
    "cause, asked, kept",
    [
        (None, "before", False),  # only the alarm the PLC saw: one reset clears it
        ("gap", "before", True),  # the request predates the gap: that alarm stays until the PLC resets again
        ("missed ack", "before", True),
        ("gap", "after", False),  # the PLC asked after the gap was shown, within the same heartbeat: one reset
        ("missed ack", "after", False),
    ],
)
def test_an_alarm_latched_after_the_plc_asked_for_a_reset_stays_until_the_plc_resets_again(cause, asked, kept):
    """The bridge reads alarm_reset once a heartbeat, so a request it finds may have been written before an alarm that
    latched since: clearing that with the older one would leave the PLC without its alarm (the alarm bit was already
    set, so no edge told it). A request written after the new cause was shown to the PLC clears it at once, even
    before the next heartbeat. The request is written back to 0 either way."""

    async def reset() -> tuple[bool, bool, list[int]]:
        plc = Memory(ID_MODULUS)
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=20), "cam0")
        await handshake.start()
        await hand_over(handshake, result(1), result(3))  # 2 missing: the alarm the PLC sees and resets
        await tick(handshake, 1)
        assert "alarm" in plc.status and handshake.counters.sequence_gaps == 1
        if asked == "before":
            plc.values["alarm_reset"] = 1
        if cause == "gap":
            await hand_over(handshake, result(5))
            assert handshake.counters.sequence_gaps == 2
        elif cause == "missed ack":
            plc.acking = False
            await hand_over(handshake, result(4))
            plc.acking = True
            assert handshake.counters.missed_acks == 1
        if asked == "after":
            plc.values["alarm_reset"] = 1
        await tick(handshake, 2)
        written_back = [plc.values["alarm_reset"]]
        held = "alarm" in plc.status and handshake.alarm
        plc.values["alarm_reset"] = 1  # the PLC resets again, before the bridge read alarm_reset as 0 again
        await tick(handshake, 3)
        written_back.append(plc.values["alarm_reset"])
        return held, "alarm" in plc.status or handshake.alarm, written_back

    assert asyncio.run(reset()) == (kept, False, [0, 0])


def test_an_alarm_counted_before_the_plc_is_shown_its_cause_stays_through_a_reset_written_meanwhile():
    """A seq that goes back latches the alarm when its result is offered, but the PLC is shown that cause only by the
    next status write after it: here, with no result on the PLC, the hand-over of that result (in a running bridge
    usually the falling edge after the ack of the result on the PLC). With the alarm up already (an earlier gap),
    nothing the PLC holds changes meanwhile, so a reset it writes then is for the gap alone and must not clear the new
    cause; once the result is on the PLC, the next reset clears it."""

    async def reset() -> list[bool]:
        plc = Memory(ID_MODULUS)
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=20), "cam0")
        await handshake.start()
        await hand_over(handshake, result(1), result(3))  # 2 missing: the alarm the PLC sees
        await tick(handshake, 1)  # alarm_reset reads 0: a request from now on comes after the gap was shown
        handshake.offer(result(2))  # the numbering went back: latched now, on the PLC with result 2
        shown = plc.status
        await tick(handshake, 2)  # the alarm is up already: the status written again unchanged; alarm_reset reads 0
        assert plc.statuses[-1] == shown and handshake.queue
        plc.values["alarm_reset"] = 1  # the PLC resets the alarm it saw
        await tick(handshake, 3)
        kept = ["alarm" in plc.status and handshake.alarm]
        assert plc.values["alarm_reset"] == 0  # written back either way
        await hand_over(handshake)  # result 2 goes over: the cause is shown
        await tick(handshake, 4)
        plc.values["alarm_reset"] = 1
        await tick(handshake, 5)
        kept.append("alarm" in plc.status or handshake.alarm)
        return kept

    assert asyncio.run(reset()) == [True, False]


def test_a_reset_request_the_plc_holds_is_logged_once_and_again_only_when_it_clears_or_keeps_an_alarm():
    """A PLC that writes alarm_reset every scan (an HMI button stuck or forced) had a line logged at every heartbeat,
    each claiming a reset with no alarm set: 86,400 a day. The request is still written back to 0 at each heartbeat,
    and an alarm that latches while it is held is still shown before it is cleared."""
    logged: list[tuple[str, dict]] = []

    async def held() -> list[tuple[int, list[dict], bool]]:
        plc = Memory(ID_MODULUS)
        handshake = Handshake(
            plc,
            HandshakeSettings(ack_timeout_ms=20),
            "cam0",
            log=lambda event, **kw: logged.append((event, kw)),
        )
        await handshake.start()
        await hand_over(handshake, result(1))
        seen = []

        async def beats(first: int, count: int) -> None:
            for beat in range(first, first + count):
                plc.values["alarm_reset"] = 1  # the PLC writes it again before every read
                await tick(handshake, beat)
                assert plc.values["alarm_reset"] == 0
            seen.append((first, events(logged, "alarm_reset"), "alarm" in plc.status))
            logged.clear()

        await beats(1, 10)  # no alarm: one line for the request
        plc.values["alarm_reset"] = 1  # still held when the gap below is shown
        await hand_over(handshake, result(3))  # 2 missing: latched while the request is held
        await beats(11, 10)  # kept (the request may predate the gap), then cleared at the next read: two lines
        await beats(21, 10)  # nothing changed since: quiet
        await tick(handshake, 31)  # alarm_reset reads 0: the request ended
        await beats(32, 3)  # a new request: logged again
        return seen

    seen = asyncio.run(held())
    assert [(first, [line.get("alarm_kept", False) for line in lines], alarm) for first, lines, alarm in seen] == [
        (1, [False], False),
        (11, [True, False], False),
        (21, [], False),
        (32, [False], False),
    ], seen
    assert [line["alarm_was_set"] for line in seen[0][1] + seen[1][1][1:] + seen[3][1]] == [False, True, False]


@pytest.mark.parametrize(
    "acked, newest, reserved, renumbered",
    [
        (4000, 5, 256, True),  # past the reservation: no seq of the daemon's numbering is that high
        (4000, None, 256, True),  # a journal with no record of the camera yet, its reservation made
        (200, 5, 256, False),  # within it: the journal may have lost its tail in a power cut
        (4000, 5, None, False),  # no reservation mark (an older daemon): only the first result can tell
        (4000, None, None, False),
    ],
)
def test_a_resume_point_past_the_journals_reservation_is_a_renumbering_told_at_start(
    acked, newest, reserved, renumbered
):
    """The daemon fsyncs each camera's reservation before it gives out a seq past it, so every seq of its numbering
    lies at or below it, those a power cut took from the journal too: a resume point past it is not this numbering's,
    and a line that stays quiet hears so at start (a warning, the alarm), not at its first part. That first result
    still says where to resume (after the recorded ack where that lies before it, else just before it), and names its
    seq, without latching the alarm again. Otherwise the start says it is past the journal (info) and waits."""
    logged: list[tuple[str, dict]] = []

    async def restart() -> tuple[Handshake, bool]:
        handshake = Handshake(
            Memory(ID_MODULUS), HandshakeSettings(), "cam0", log=lambda event, **kw: logged.append((event, kw))
        )
        await handshake.start(acked, lambda: newest, lambda: reserved)
        alarm_at_start = "alarm" in handshake.target.status  # type: ignore[attr-defined]
        handshake.target.values["alarm_reset"] = 1  # type: ignore[attr-defined]
        await tick(handshake, 1)  # the PLC resets what it was shown
        await hand_over(handshake, result(6))
        return handshake, alarm_at_start

    handshake, alarm_at_start = asyncio.run(restart())
    past = events(logged, "resume_past_journal")
    assert len(past) == 1 and past[0]["level"] == ("warning" if renumbered else "info"), logged
    assert past[0]["journal_newest"] == newest and past[0]["journal_reserved"] == reserved
    assert past[0]["resume_after"] == acked and alarm_at_start == renumbered
    warned = events(logged, "resume_ahead_of_daemon")
    assert len(warned) == 1 and warned[0]["seq"] == 6 and warned[0]["level"] == "warning", logged
    assert handshake.last_id == 6 and handshake.counters.sequence_gaps == 0
    assert handshake.alarm is not renumbered  # latched once for the one renumbering: at start, or at the result


@pytest.mark.parametrize("acked", [4000, 280])
def test_a_reservation_mark_behind_the_journals_newest_record_raises_no_alarm_at_start(acked):
    """The journal holds 300 while its reservation mark says 256: a working reservation never lets a seq past the mark
    be given out, so the mark is stale (its write failed while appends went on, or a daemon too old to keep it ran)
    and says nothing. A resume point past both (4000) is only past the journal, as without a mark: info, no alarm; one
    between the mark and the journal's newest (280) is within the journal: nothing to say at start."""
    logged: list[tuple[str, dict]] = []

    async def restart() -> Handshake:
        handshake = Handshake(
            Memory(ID_MODULUS), HandshakeSettings(), "cam0", log=lambda event, **kw: logged.append((event, kw))
        )
        await handshake.start(acked, lambda: 300, lambda: 256)
        return handshake

    handshake = asyncio.run(restart())
    assert handshake.last_id == acked and not handshake.alarm
    assert "alarm" not in handshake.target.status  # type: ignore[attr-defined]
    assert not [kw for _, kw in logged if kw.get("level") == "warning"], logged
    past = events(logged, "resume_past_journal")
    if acked > 300:
        assert len(past) == 1 and past[0]["level"] == "info" and past[0]["journal_reserved"] == 256, logged
        assert "behind the journal's newest record" in past[0]["effect"]
    else:
        assert not past, logged


@pytest.mark.parametrize("resume_ahead", [False, True])
def test_a_reset_the_plc_asked_for_while_the_bridge_was_down_clears_only_what_was_latched_before_it(resume_ahead):
    """A restarted bridge adopts the alarm latched in the PLC; a reset the PLC wrote meanwhile clears it at the first
    heartbeat. An alarm the start itself latches (the PLC's id past the daemon's journal, the recorded ack within
    it) is newer than that request and stays."""

    async def restart() -> bool:
        plc = Memory(ID_MODULUS, inspection_id=500, heartbeat=17, alarm=1)
        plc.values["alarm_reset"] = 1
        handshake = Handshake(plc, HandshakeSettings(), "cam0")
        await handshake.start(80 if resume_ahead else 480, lambda: 100 if resume_ahead else 1000)
        assert "alarm" in plc.status
        await tick(handshake, 1)
        assert plc.values["alarm_reset"] == 0
        return "alarm" in plc.status

    assert asyncio.run(restart()) == resume_ahead


async def waiting_for_its_ack(handshake: Handshake, plc: Memory) -> asyncio.Future:
    """Start `handshake` and its run, and hand result 1 over to a PLC that holds its ack back: the run, once result 1
    is valid on the PLC and the run waits for the ack."""
    await handshake.start()
    await tick(handshake, 1)
    plc.acking = False
    handshake.offer(result(1))
    running = asyncio.ensure_future(handshake.run(asyncio.Event()))
    while "result_valid" not in plc.status:
        assert not running.done(), running.exception()
        await asyncio.sleep(0.001)
    return running


class CounterWriteFails(Memory):
    """A PLC link that fails at the last write of a stop: the missed-ack counter on its own (a result's write carries
    it too)."""

    async def write(self, fields: dict, last: str | None = None) -> None:
        if set(fields) == {"missed_acks"}:
            raise PlcError("link down")
        await super().write(fields, last)


@pytest.mark.parametrize("plc_kind, acks_at_the_cut", [(Memory, True), (Memory, False), (CounterWriteFails, False)])
def test_a_stop_that_cuts_the_wait_for_an_ack_decides_by_one_last_read_and_drops_the_flags_first(
    plc_kind, acks_at_the_cut
):
    """Past STOP_WAIT_S the bridge cancels a hand-over still waiting for its ack. An ack that came at the cut (the
    answer of the read the cancel interrupted) or just after it is recorded as any ack; none is a missed ack and
    latches the alarm, since a restart resumes after the PLC's id and the PLC would not see that result again. The
    flags drop first: a link failing at the counter's write still leaves the PLC no valid result."""

    async def stop() -> tuple[Handshake, Memory, list, bool | None]:
        plc = plc_kind(ID_MODULUS)
        recorded: list[tuple[str, int]] = []

        async def acked(camera: str, seq: int) -> None:
            recorded.append((camera, seq))

        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=60000, poll_ms=1), "cam0", acked=acked)
        running = await waiting_for_its_ack(handshake, plc)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        assert handshake.waiting_for == 1
        plc.acking = acks_at_the_cut
        try:
            outcome = await handshake.shutdown()
        except PlcError:
            outcome = None
        return handshake, plc, recorded, outcome

    handshake, plc, recorded, outcome = asyncio.run(stop())
    assert "result_valid" not in plc.status and "trigger_ready" not in plc.status, plc.status
    assert handshake.waiting_for is None
    if acks_at_the_cut:
        assert outcome is True and recorded == [("cam0", 1)] and handshake.counters.acked == 1
        assert handshake.counters.missed_acks == 0 and "alarm" not in plc.status
    else:
        assert outcome is (False if plc_kind is Memory else None) and recorded == []
        assert handshake.counters.missed_acks == 1 and "alarm" in plc.status


class AnswersLate(Memory):
    """A PLC that has taken a result's write (its id and result_valid are on it) when the bridge ends, before the
    answer to that write came back."""

    def __init__(self) -> None:
        super().__init__(ID_MODULUS)
        self.taken = asyncio.Event()

    async def write(self, fields: dict, last: str | None = None) -> None:
        await super().write(fields, last)
        if "inspection_id" in fields:
            self.taken.set()
            await asyncio.Event().wait()  # the answer never comes: the bridge's end cancels the write


@pytest.mark.parametrize("acks_at_the_cut", [True, False])
def test_a_hand_over_cut_while_its_result_is_written_is_decided_at_the_stop_as_a_cut_wait(acks_at_the_cut):
    """A failure of another camera (or a stop) cancels a hand-over inside its result's write: the PLC may already
    hold that id and result_valid, and a restart resumes after the id. Counted nowhere, the result would flash
    valid and be lost without a missed ack or an alarm; it is decided as a wait cut at the stop is."""

    async def cut() -> tuple[Handshake, AnswersLate, int | None, bool | None]:
        plc = AnswersLate()
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=60000, poll_ms=1), "cam0")
        await handshake.start()
        await tick(handshake, 1)
        plc.acking = False
        handshake.offer(result(1))
        running = asyncio.ensure_future(handshake.run(asyncio.Event()))
        await asyncio.wait_for(plc.taken.wait(), 10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        cut_at = handshake.waiting_for
        plc.acking = acks_at_the_cut
        return handshake, plc, cut_at, await handshake.shutdown()

    handshake, plc, cut_at, outcome = asyncio.run(cut())
    assert cut_at == 1
    assert "result_valid" not in plc.status and "trigger_ready" not in plc.status, plc.status
    assert outcome is acks_at_the_cut
    assert handshake.counters.missed_acks == (0 if acks_at_the_cut else 1)
    assert ("alarm" in plc.status) is not acks_at_the_cut, plc.status


class InThisProcess(Memory):
    """The bridge's own server (OPC UA server mode): its variables live in this process, a read cannot end a link."""

    reads_locally = True


@pytest.mark.parametrize("acks_at_the_cut", [True, False])
def test_a_stop_on_the_bridges_own_server_drops_the_flags_and_shows_a_missed_ack_in_one_write(acks_at_the_cut):
    """The server's state file records what each status write says: the flags' fall (the cut id kept) and a missed
    ack's alarm written apart left a moment where a kill kept the cut id without the alarm, and the next start
    resumed after a result never acked with no alarm. There the Ack is read first, and one status write says all."""

    async def stop() -> tuple[Handshake, InThisProcess, int, bool | None]:
        plc = InThisProcess(ID_MODULUS)
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=60000, poll_ms=1), "cam0")
        running = await waiting_for_its_ack(handshake, plc)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        plc.acking = acks_at_the_cut
        before = len(plc.statuses)
        outcome = await handshake.shutdown()
        return handshake, plc, before, outcome

    handshake, plc, before, outcome = asyncio.run(stop())
    written = plc.statuses[before:]
    assert len(written) == 1, written
    assert "result_valid" not in written[0] and "trigger_ready" not in written[0]
    assert outcome is acks_at_the_cut and ("alarm" in written[0]) is not acks_at_the_cut, written
    assert handshake.counters.missed_acks == (0 if acks_at_the_cut else 1)


def test_a_stop_with_nothing_waiting_for_its_ack_counts_nothing():
    async def stop() -> tuple[Handshake, Memory, bool | None]:
        plc = Memory(ID_MODULUS)
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=20), "cam0")
        await handshake.start()
        await hand_over(handshake, result(1))  # acked at once
        await tick(handshake, 1)
        return handshake, plc, await handshake.shutdown()

    handshake, plc, outcome = asyncio.run(stop())
    assert outcome is None and handshake.counters.missed_acks == 0 and handshake.counters.acked == 1
    assert "trigger_ready" not in plc.status and "alarm" not in plc.status


class EndsAtAFailure(Memory):
    """A link that ends at its first failed request and refuses every one after it, as asyncua's client does after a
    request that timed out: once `failing` is set, the request named by `fails_at` ("read ack", "write status") fails.
    Requests refused after the failure are counted in `refused`."""

    def __init__(self, fails_at: str) -> None:
        super().__init__(ID_MODULUS)
        self.fails_at = fails_at
        self.failing = False
        self.ended = False
        self.refused = 0

    def _request(self, what: str) -> None:
        if self.ended:
            self.refused += 1
            raise PlcError("the session has ended")
        if self.failing and what == self.fails_at:
            self.ended = True
            raise PlcError("timed out")

    async def read(self, name: str) -> int:
        self._request(f"read {name}")
        return await super().read(name)

    async def write(self, fields: dict, last: str | None = None) -> None:
        self._request("write status" if "status" in fields else "write")
        await super().write(fields, last)


@pytest.mark.parametrize("fails_at", ["read ack", "write status"])
def test_a_stop_that_cuts_the_wait_for_an_ack_drops_the_flags_before_the_read_that_may_end_the_link(fails_at):
    """A PLC that stops answering at the stop: the last read of a cut result's ack times out, and asyncua's client
    then refuses every request. The flags' write comes first, so the PLC is left no valid result and not ready. A
    flags' write that fails is the last request (the stop leaves time for one that times out): the result, not known
    to be acked, is a missed ack, not recorded."""

    async def stop() -> tuple[Handshake, EndsAtAFailure, list]:
        plc = EndsAtAFailure(fails_at)
        recorded: list[tuple[str, int]] = []

        async def acked(camera: str, seq: int) -> None:
            recorded.append((camera, seq))

        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=60000, poll_ms=1), "cam0", acked=acked)
        running = await waiting_for_its_ack(handshake, plc)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        plc.acking = True  # an ack at the cut, which only a read that answers can take
        plc.failing = True
        with pytest.raises(PlcError):
            await handshake.shutdown()
        return handshake, plc, recorded

    handshake, plc, recorded = asyncio.run(stop())
    assert handshake.waiting_for is None and recorded == [] and handshake.counters.acked == 0
    assert handshake.counters.missed_acks == 1 and handshake.alarm
    if fails_at == "read ack":
        assert "result_valid" not in plc.status and "trigger_ready" not in plc.status, plc.status
    else:
        assert plc.refused == 0, "a request after the flags' write failed"


def test_a_wait_for_an_ack_cut_short_ends_at_its_next_poll_even_without_a_cancel():
    """A cancel can be lost (a reply arriving in the same step as it, under Python 3.11's wait_for): the stop also
    marks the wait cut short, so it ends at its next poll, not at ack_timeout_ms."""

    async def cut() -> tuple[bool, int | None]:
        plc = Memory(ID_MODULUS)
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=60000, poll_ms=1), "cam0")
        running = await waiting_for_its_ack(handshake, plc)
        handshake.cut_short()
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 10)
        return running.cancelled(), handshake.waiting_for

    assert asyncio.run(cut()) == (True, 1)


@pytest.mark.parametrize("acking", [False, True])
def test_seq_0_is_acked_by_the_plcs_echo_not_by_the_0_a_fresh_plc_holds(acking):
    """The daemon's first seq is 0 and so is a fresh PLC's (or a fresh OPC UA server's) ack: the bridge sets the ack
    to another value first, so only the PLC's echo counts, and a PLC that echoes 0 is acked as any other id."""

    async def first() -> tuple[int, int, int]:
        plc = Memory(ID_MODULUS)
        plc.acking = acking
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=50, poll_ms=1), "cam0")
        await handshake.start()
        await hand_over(handshake, result(0))
        return handshake.counters.acked, handshake.counters.missed_acks, plc.values["ack"]

    acked, missed, ack = asyncio.run(first())
    assert (acked, missed) == ((1, 0) if acking else (0, 1))
    assert ack == (0 if acking else ID_MODULUS - 1)


@pytest.mark.parametrize("modulus", [ID_MODULUS, 1 << 31, 1 << 15])
def test_a_plc_program_comparing_the_id_with_its_ack_takes_seq_0_of_a_fresh_daemon_and_plc(modulus):
    """docs/PLC.md's program acts on a result whose id differs from its own ack. A fresh PLC's ack is 0, and so is a
    fresh daemon's first seq: the bridge sets ack to the id before, in the id's width (0xFFFFFFFF for a full-width id,
    the top of a DInt or an Int), so the program takes seq 0 like the others, with no missed ack and no alarm."""

    async def fresh() -> tuple[list[int], int, int, bool]:
        plc = Memory(modulus)
        plc.compares_ack = True
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=200, poll_ms=1), "cam0")
        await handshake.start()
        await hand_over(handshake, result(0), result(1), result(2))
        return plc.acted, handshake.counters.acked, handshake.counters.missed_acks, handshake.alarm

    assert asyncio.run(fresh()) == ([0, 1, 2], 3, 0, False)


def test_no_status_write_lands_between_the_runs_of_a_hand_overs_result_write():
    """A target that writes the result's data and its status in separate requests (a scattered Modbus map, OPC UA's
    data and flag requests) raises result_valid last, on complete data: a heartbeat's status write between them would
    raise it over partly old data. It waits for the next heartbeat instead."""

    class Split(Memory):
        def __init__(self) -> None:
            super().__init__(ID_MODULUS)
            self.between = asyncio.Event()
            self.go = asyncio.Event()

        async def write(self, fields: dict, last: str | None = None) -> None:
            if "inspection_id" not in fields or "status" not in fields:
                await super().write(fields, last)
                return
            await super().write({name: value for name, value in fields.items() if name != "status"})
            self.between.set()
            await self.go.wait()
            await super().write({"status": fields["status"]})

    async def torn() -> tuple[list[frozenset], frozenset]:
        plc = Split()
        handshake = Handshake(plc, HandshakeSettings(ack_timeout_ms=50, poll_ms=1), "cam0")
        await handshake.start()
        handshake.offer(result(1))
        stop = asyncio.Event()
        running = asyncio.ensure_future(handshake.run(stop))
        await asyncio.wait_for(plc.between.wait(), 5)
        before = len(plc.statuses)
        await tick(handshake, 1)  # the daemon heard from: trigger_ready changes, and the heartbeat rewrites it
        meanwhile = plc.statuses[before:]
        plc.go.set()
        stop.set()
        await asyncio.wait_for(running, 5)
        await tick(handshake, 2)
        return meanwhile, plc.status

    meanwhile, after = asyncio.run(torn())
    assert meanwhile == []
    assert "trigger_ready" in after and "result_valid" not in after
