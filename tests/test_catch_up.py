"""The journal catch-up (inspectd.clients.subscribe.JournalCatchUp, CatchUpSubscriber) over a real ZeroMQ PUB/SUB
pair and a real journal written by the daemon's writer: results lost on the way to a subscriber are fetched from the
journal and delivered in order, a restart resumes after a known seq without a duplicate, and what the journal does
not hold either is reported as a gap."""

from __future__ import annotations

import fcntl
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import zmq

from cli_child import inspectd_argv
from inspectd.clients.subscribe import (
    CORRUPT,
    NO_JOURNAL,
    NOT_JOURNALLED,
    ROTATED,
    CatchUpSubscriber,
    Gap,
    JournalCatchUp,
    Subscriber,
)
from inspectd.daemon.journal import Journal
from inspectd.errors import InspectdError
from inspectd.protocol import journal as journal_format
from inspectd.protocol.journal import encode_record
from inspectd.protocol.messages import Result, decode, encode_result, encode_status
from test_journal_open import flip_header_seq

REPO = Path(__file__).resolve().parents[1]
STATION = "t1"
STATUS = {
    "t": 0.0,
    "uptime_s": 1.0,
    "healthy": True,
    "model_id": "m",
    "thresholds_version": 1,
    "throughput_fps": 0.0,
    "cameras": {},
}


def result_frames(camera: str, seq: int, frame_id: str | None = None) -> list[bytes]:
    return encode_result(
        station=STATION,
        camera=camera,
        seq=seq,
        frame_id=f"{camera}-{seq}" if frame_id is None else frame_id,
        t_capture=time.time(),
        t_publish=time.time(),
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


class Line:
    """A daemon's publishing end: every result journalled first, then published unless the test drops it."""

    def __init__(self, tmp_path) -> None:
        self.journal_dir = tmp_path / "journal"
        self.journal = Journal(self.journal_dir, max_bytes=1 << 20)
        self.endpoint = f"ipc://{tmp_path}/pub.sock"
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.endpoint)
        self.padding = 0

    def small_journal(self) -> None:
        """A journal of a few dozen results, and results padded to about 0.5 KiB: rotation takes the oldest within a
        test."""
        self.journal.close()
        self.journal = Journal(self.journal_dir, max_bytes=24 << 10, segment_bytes=3 << 10)
        self.padding = 400

    def emit(self, camera: str, seq: int, send: bool = True, journal: bool = True) -> None:
        frames = result_frames(camera, seq, f"{camera}-{seq}-" + "p" * self.padding if self.padding else None)
        if journal:
            self.journal.append(camera, seq, frames)
        if send:
            self.pub.send_multipart(frames)

    def join(self, sub: Subscriber) -> None:
        """Status messages until `sub` hears one: its subscription has taken hold (ZeroMQ's slow joiner)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.pub.send_multipart(encode_status(STATION, STATUS))
            if sub.recv(0.05) is not None:
                return
        raise AssertionError("the subscription never took hold")

    def close(self) -> None:
        self.pub.close(0)
        self.journal.close()


@pytest.fixture
def line(tmp_path):
    made = Line(tmp_path)
    yield made
    made.close()


def drain(source, count: int, timeout_s: float = 10.0) -> list[Result]:
    out: list[Result] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        message = source.recv(0.2)
        if isinstance(message, Result):
            out.append(message)
    return out


def test_results_lost_on_the_way_are_fetched_from_the_journal_in_order(line):
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir, topic="inspect.")
        source = CatchUpSubscriber(sub, catch_up)
        lost = {3, 4, 5, 8}  # journalled, never received: a slow subscriber past its high-water mark
        for seq in range(10):
            line.emit("cam0", seq, send=seq not in lost)
            line.emit("cam1", seq, send=seq != 0)  # cam1's very first result is lost: no known seq before it
        got = drain(source, 19)
    cam0 = [r.seq for r in got if r.camera == "cam0"]
    cam1 = [r.seq for r in got if r.camera == "cam1"]
    assert cam0 == list(range(10)), cam0
    assert cam1 == list(range(1, 10)), cam1  # nothing to measure a hole against before the first result
    assert catch_up.recovered == len(lost)
    assert catch_up.missed == [] and catch_up.gaps.missed == {}
    assert all(r.frame_id == f"{r.camera}-{r.seq}" for r in got)  # the journalled ones decode like live ones


def test_a_hole_the_journal_does_not_hold_is_reported_as_a_gap(line):
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        line.emit("cam0", 0)
        line.emit("cam0", 1, send=False)  # recoverable
        line.emit("cam0", 2, send=False, journal=False)  # lost in flight at a crash: no result anywhere
        line.emit("cam0", 3, send=False, journal=False)
        line.emit("cam0", 4)
        got = drain(source, 3)
    assert [r.seq for r in got] == [0, 1, 4]
    assert catch_up.recovered == 1
    assert catch_up.missed == [Gap("cam0", 2, 3, NOT_JOURNALLED)] and catch_up.gaps.missed == {"cam0": 2}


def test_resume_after_a_known_seq_then_live_without_a_duplicate_or_a_hole(line):
    for seq in range(10):  # published while the subscriber was away
        line.emit("cam0", seq, send=False)
    stop = threading.Event()

    def produce() -> None:
        seq = 10
        while not stop.is_set():
            line.emit("cam0", seq)
            seq += 1
            time.sleep(0.01)

    producer = threading.Thread(target=produce, daemon=True)
    with Subscriber(line.endpoint) as sub:
        producer.start()
        try:
            catch_up = JournalCatchUp(line.journal_dir)
            source = CatchUpSubscriber(sub, catch_up)
            source.start(since=4, settle_s=5.0)  # the first live result, then the journal, then the live stream
            got = drain(source, 40)
        finally:
            stop.set()
            producer.join(5)
    seqs = [r.seq for r in got]
    assert seqs == list(range(5, 45)), seqs
    assert catch_up.gaps.missed == {}


def test_resume_per_camera_and_only_the_cameras_asked_for(line):
    for seq in range(6):
        line.emit("cam0", seq, send=False)
        line.emit("cam1", seq, send=False)
    only_cam1 = JournalCatchUp(line.journal_dir, cameras=["cam1"])
    assert [(r.camera, r.seq) for r in only_cam1.resume(3)] == [("cam1", 4), ("cam1", 5)]
    both = JournalCatchUp(line.journal_dir)
    replayed = list(both.resume({"cam0": 4, "cam1": -1}))
    assert [(r.camera, r.seq) for r in replayed] == [("cam0", 5)] + [("cam1", s) for s in range(6)]
    # A live result the journal already delivered is dropped; the next one passes.
    line.emit("cam0", 6, send=False)
    assert list(both.take(replayed[0])) == []
    with pytest.raises(InspectdError, match="no journal directory"):
        JournalCatchUp(None).resume(0)


def test_a_camera_that_journalled_nothing_before_the_resume_gets_its_results_from_seq_0(line):
    """A camera the listing lacks has journalled nothing yet (new since, added by a reload): its seqs start at 0,
    whatever --since says of the others. Counted as delivered up to SEQ, its first SEQ+1 results were dropped with no
    gap and no count."""
    for seq in range(7):
        line.emit("cam0", seq, send=False)
    catch_up = JournalCatchUp(line.journal_dir)
    assert [(r.camera, r.seq) for r in catch_up.resume(5)] == [("cam0", 6)]
    taken = [r.seq for seq in range(8) for r in catch_up.take(decode(result_frames("cam1", seq)))]
    assert taken == list(range(8)) and not catch_up.missed and not catch_up.gaps.missed
    # cam2 journalled 0..3 before its first live result (the subscription not yet joined): filled from the journal.
    for seq in range(4):
        line.emit("cam2", seq, send=False)
    assert [r.seq for r in catch_up.take(decode(result_frames("cam2", 4)))] == [0, 1, 2, 3, 4]
    # cam3 journalled nothing before its first live result 2: the seqs before it are a gap, not passed over.
    assert [r.seq for r in catch_up.take(decode(result_frames("cam3", 2)))] == [2]
    assert catch_up.missed == [Gap("cam3", 0, 1, NOT_JOURNALLED)] and catch_up.gaps.missed == {"cam3": 2}
    # Named with --camera too: cam4 journalled nothing before the resume, so its seqs from 0 are delivered.
    named = JournalCatchUp(line.journal_dir, cameras={"cam0", "cam4"})
    assert [(r.camera, r.seq) for r in named.resume(5)] == [("cam0", 6)]
    assert [r.seq for seq in range(3) for r in named.take(decode(result_frames("cam4", seq)))] == [0, 1, 2]


def journal_of(tmp_path, count: int, segment_bytes: int) -> tuple[Path, list[Path]]:
    """A journal of results 0..count-1 on cam0, in several closed segments; (directory, segments oldest first)."""
    directory = tmp_path / "journal"
    journal = Journal(directory, max_bytes=64 << 20, segment_bytes=segment_bytes)
    for seq in range(count):
        journal.append("cam0", seq, result_frames("cam0", seq))
    journal.close()
    segments = sorted((directory / "cam0").glob("*.seg"))
    assert len(segments) >= 5, segments
    return directory, segments


def first_seqs(segments: list[Path]) -> list[int]:
    return [int(path.stem) for path in segments]


def test_a_replay_is_read_as_it_is_pulled_and_reports_what_rotation_took_meanwhile(tmp_path):
    directory, segments = journal_of(tmp_path, 200, 4 << 10)
    starts = first_seqs(segments)
    catch_up = JournalCatchUp(directory)
    replay = catch_up.resume(-1)
    first = next(replay)  # the replay is reading the first segment now
    for path in segments[1:3]:
        path.unlink()  # what the writer's rotation does meanwhile
    seqs = [first.seq] + [r.seq for r in replay]
    taken = set(range(starts[1], starts[3]))
    assert seqs == [s for s in range(200) if s not in taken]  # read after the deletion: nothing held from before
    assert catch_up.missed == [Gap("cam0", starts[1], starts[3] - 1, ROTATED)]
    assert catch_up.gaps.missed == {"cam0": len(taken)}


def test_a_replay_from_before_the_oldest_segment_and_a_corrupt_record_are_gaps_with_their_reasons(tmp_path):
    directory, segments = journal_of(tmp_path, 200, 4 << 10)
    starts = first_seqs(segments)
    segments[0].unlink()  # rotated away before the replay started
    damaged = segments[2]
    data = bytearray(damaged.read_bytes())
    bad = starts[2] + 3  # flip a byte inside the fourth record of this segment
    at = [i for i in range(len(data)) if data.startswith(b"IJR1", i)][3]
    data[at + 30] ^= 0xFF
    damaged.write_bytes(bytes(data))
    catch_up = JournalCatchUp(directory)
    seqs = [r.seq for r in catch_up.resume(-1)]
    assert seqs == [s for s in range(starts[1], 200) if s != bad]
    assert catch_up.missed == [
        Gap("cam0", 0, starts[1] - 1, ROTATED),
        Gap("cam0", bad, bad, CORRUPT),
    ]


def test_a_fill_across_a_record_whose_header_seq_was_damaged_reports_that_record_alone(tmp_path):
    """Bit 40 of record 15's header seq flipped. Read by its header, the fill of 11..24 stopped there (seq >= 25) and
    16..24, all in the journal, were reported never journalled. The record is corrupt: the rest of the fill comes."""
    directory = tmp_path / "journal"
    journal = Journal(directory, max_bytes=1 << 20)
    for seq in range(30):
        journal.append("cam0", seq, result_frames("cam0", seq))
    journal.close()
    flip_header_seq(journal_format.segment_files(directory / "cam0")[-1][1], 15, 40)
    catch_up = JournalCatchUp(directory)
    assert [r.seq for seq in range(11) for r in catch_up.take(decode(result_frames("cam0", seq)))] == list(range(11))
    filled = [r.seq for r in catch_up.take(decode(result_frames("cam0", 25)))]
    assert filled == [s for s in range(11, 26) if s != 15]
    assert catch_up.missed == [Gap("cam0", 15, 15, CORRUPT)] and catch_up.gaps.missed == {"cam0": 1}


def test_a_damaged_header_seq_in_the_last_record_neither_moves_the_numbering_nor_repeats_a_result(tmp_path):
    """Bit 40 of the last record's header seq flipped while the daemon is down. Before, it restarted at 2**40 + 30,
    and the fill up to its first result delivered the damaged record (result 29) a second time, then reported a gap
    of 2**40 results. Now the restarted writer numbers on at 30 and the subscriber gets 30 alone; a replay from an
    earlier seq reports the record as corrupt instead of returning it."""
    directory = tmp_path / "journal"
    journal = Journal(directory, max_bytes=1 << 20)
    catch_up = JournalCatchUp(directory)
    for seq in range(30):
        journal.mark_accepted("cam0", seq)
        journal.append("cam0", seq, result_frames("cam0", seq))
        assert [r.seq for r in catch_up.take(decode(result_frames("cam0", seq)))] == [seq]
    journal.close()
    flip_header_seq(journal_format.segment_files(directory / "cam0")[-1][1], 29, 40)
    restarted = Journal(directory, max_bytes=1 << 20)
    try:
        seq, skipped = restarted.resume("cam0")
        assert (seq, skipped) == (30, range(29, 30)) and restarted.status()["corrupt"] == 1
        restarted.mark_accepted("cam0", seq)
        restarted.append("cam0", seq, result_frames("cam0", seq))
    finally:
        restarted.close()
    assert [r.seq for r in catch_up.take(decode(result_frames("cam0", seq)))] == [30]
    assert catch_up.missed == [] and catch_up.gaps.missed == {}
    replay = JournalCatchUp(directory)
    assert [r.seq for r in replay.resume(20)] == [*range(21, 29), 30]
    assert replay.missed == [Gap("cam0", 29, 29, CORRUPT)]


@pytest.mark.parametrize("damage", ["flipped", "cut-short", "zero-filled"])
def test_damage_at_the_end_of_a_closed_segment_is_a_corrupt_record_a_tear_is_not(tmp_path, damage):
    """A bad last record of an older segment whose whole length is there is damage: before, it ended that segment's
    read without a word, and the hole was put down to a crash or a full queue ("never journalled"). One cut short, or
    ending in a page of zeros, is what a power cut leaves (a round of fsyncs covers the segment just closed and the
    new one): a tear, whose results were never durable."""
    directory, segments = journal_of(tmp_path, 400, 3 * journal_format.PAGE)
    starts = first_seqs(segments)
    lost = [starts[1] - 1]  # the last record of the first segment
    ends = [0] + [end for end, _, _ in journal_format.read_records(segments[0])]
    data = bytearray(segments[0].read_bytes())
    if damage == "flipped":
        data[ends[-2] + 40] ^= 0x01  # inside its body: the CRC no longer matches, its whole length is there
    elif damage == "cut-short":
        del data[(ends[-2] + ends[-1]) // 2 :]
    else:  # the size on disk, its last pages never written: every record from the one across that boundary on
        page = 2 * journal_format.PAGE
        lost = [starts[0] + i for i, end in enumerate(ends[1:]) if end > page]
        data[page:] = bytes(len(data) - page)
    segments[0].write_bytes(bytes(data))
    reported: list[tuple[Path, int, int]] = []
    seqs = [s for s, _ in journal_format.read_since(directory, "cam0", -1, on_corrupt=lambda *a: reported.append(a))]
    assert seqs == [s for s in range(400) if s not in lost] and len(lost) >= 1
    bad = lost[0]
    catch_up = JournalCatchUp(directory)
    assert [r.seq for r in catch_up.resume(-1)] == seqs
    if damage != "flipped":
        assert reported == [] and [gap.reason for gap in catch_up.missed] != [CORRUPT], catch_up.missed
        return
    with pytest.raises(journal_format.JournalCorrupt, match=rf"corrupt bytes at offset {ends[-2]}"):
        list(journal_format.read_since(directory, "cam0", -1))
    assert [(path, offset) for path, offset, _ in reported] == [(segments[0], ends[-2])]
    assert catch_up.missed == [Gap("cam0", bad, bad, CORRUPT)]


def test_subscribe_since_streams_the_replay_and_reports_segments_rotated_away_during_it(tmp_path):
    """`inspectd subscribe --journal DIR --since -1` as a real process whose stdout nobody reads: it blocks writing
    the replay (a pipe holds 64 kB), the journal loses segments further on, and the gap comes out with its reason.
    A replay read whole before it is printed would deliver the deleted results and report nothing."""
    count = 6000
    directory, segments = journal_of(tmp_path, count, 64 << 10)
    starts = first_seqs(segments)
    endpoint = f"ipc://{tmp_path}/pub.sock"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    stop = threading.Event()

    def status() -> None:  # the daemon's 1 Hz status, faster: the subscriber's first live message
        while not stop.is_set():
            pub.send_multipart(encode_status(STATION, STATUS))
            time.sleep(0.05)

    later = [i for i, s in enumerate(starts) if s > count // 2][:2]  # two segments well past a pipe's worth
    taken = set(range(starts[later[0]], starts[later[1] + 1]))
    heartbeat = threading.Thread(target=status, daemon=True)
    heartbeat.start()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inspectd",
            "subscribe",
            "--endpoint",
            endpoint,
            "--journal",
            str(directory),
            "--since",
            "-1",
            "--count",
            str(count - len(taken)),
            "--timeout",
            "60",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        queued = previous = -1
        while time.monotonic() < deadline:  # the pipe is full and stays full: the subscriber is blocked writing
            time.sleep(0.3)
            queued = struct.unpack("i", fcntl.ioctl(proc.stdout.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            if queued >= 60_000 and queued == previous:
                break
            previous = queued
        assert queued >= 60_000, f"the subscriber never filled its stdout pipe ({queued} bytes)"
        printed = queued // 40  # at most: every line is longer than 40 bytes
        assert printed < starts[later[0]], "the test's segments must lie beyond what the blocked replay printed"
        for index in later:
            segments[index].unlink()  # the writer's rotation while the subscriber replays
        out, err = proc.communicate(timeout=60)
    finally:
        stop.set()
        heartbeat.join(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close(0)
    seqs = [int(line.split()[1].removeprefix("seq=")) for line in out.decode().splitlines()]
    assert seqs == [s for s in range(count) if s not in taken], err.decode()
    first, last = min(taken), max(taken)
    assert f"gap: seq {first}-{last} on cam0 ({len(taken)} results): rotated out of the journal" in err.decode()
    assert proc.returncode == 0, err.decode()


def replay_all(tmp_path: Path, directory: Path, count: int) -> subprocess.CompletedProcess:
    """`inspectd subscribe --since -1 --journal DIRECTORY` with no daemon: the replay starts after the settle wait."""
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", f"ipc://{tmp_path}/nobody.sock"]
        + ["--journal", str(directory), "--since", "-1", "--count", str(count), "--timeout", "30"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_subscribe_reports_a_corrupt_record_as_a_gap_and_carries_on(tmp_path):
    directory, segments = journal_of(tmp_path, 200, 4 << 10)
    starts = first_seqs(segments)
    data = bytearray(segments[1].read_bytes())
    data[40] ^= 0xFF  # inside the first record of the second segment
    segments[1].write_bytes(bytes(data))
    bad = starts[1]
    proc = replay_all(tmp_path, directory, 199)
    assert proc.returncode == 0, proc.stderr
    seqs = [int(line.split()[1].removeprefix("seq=")) for line in proc.stdout.splitlines()]
    assert seqs == [s for s in range(200) if s != bad]
    assert f"gap: seq {bad}-{bad} on cam0 (1 results): corrupt record" in proc.stderr


def test_subscribe_reports_a_record_of_no_frames_as_a_gap_and_carries_on(tmp_path):
    """A damaged or crafted segment can hold a record whose CRC matches a body of zero frames: no message at all,
    which one reader must not die of."""
    directory = tmp_path / "journal"
    (directory / "cam0").mkdir(parents=True)
    records = [
        encode_record(0, result_frames("cam0", 0)),
        encode_record(1, []),
        encode_record(2, result_frames("cam0", 2)),
    ]
    (directory / "cam0" / f"{0:012d}.seg").write_bytes(b"".join(records))
    proc = replay_all(tmp_path, directory, 2)
    assert proc.returncode == 0, proc.stderr
    assert [int(line.split()[1].removeprefix("seq=")) for line in proc.stdout.splitlines()] == [0, 2]
    assert "gap: seq 1-1 on cam0 (1 results): corrupt record" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_live_seq_that_goes_back_is_delivered_and_reported_not_dropped_as_a_duplicate(line):
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        for seq in (5, 6, 7):
            line.emit("cam0", seq)
        for seq in (0, 1):  # the daemon restarted without its journal: numbering starts again
            line.emit("cam0", seq, journal=False)
        got = drain(source, 5)
    assert [r.seq for r in got] == [5, 6, 7, 0, 1]
    assert catch_up.backwards == [("cam0", 7, 0)]
    assert catch_up.missed == []


def older_numbering(line, camera: str, seqs) -> None:
    """Records under `seqs` from a numbering before the daemon's: other parts' verdicts (another capture time)."""
    for seq in seqs:
        line.journal.append(camera, seq, result_frames(camera, seq, f"old-{seq}"))


def test_a_journal_of_another_numbering_fills_no_hole_and_is_told(line):
    """The daemon journals each result before it publishes it, so a journal holding another result under a live
    seq is not the daemon's: the hole at 4 is a gap with that reason, not filled with another part's verdict."""
    from inspectd.clients.subscribe import OTHER_NUMBERING

    older_numbering(line, "cam0", range(10))
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        line.emit("cam0", 3, journal=False)  # the daemon of now journals elsewhere
        line.emit("cam0", 4, journal=False, send=False)
        line.emit("cam0", 5, journal=False)
        line.emit("cam0", 6, journal=False)
        got = drain(source, 3)
    assert [(r.seq, r.frame_id) for r in got] == [(3, "cam0-3"), (5, "cam0-5"), (6, "cam0-6")]
    assert catch_up.missed == [Gap("cam0", 4, 4, OTHER_NUMBERING)]
    assert len(source.notices) == 1 and "another numbering's results for cam0 (seq 3: frame old-3" in source.notices[0]


def test_a_replay_of_another_numbering_does_not_swallow_the_live_results_below_it(line):
    """`--since -1` replays the old numbering's 0-9; the daemon then publishes 2 and 3 of its own: they are delivered
    (the catch-up counted 0-9 as delivered and would drop them), and the replay is said to be another numbering's."""
    older_numbering(line, "cam0", range(10))
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        line.pub.send_multipart(encode_status(STATION, STATUS))  # a quiet line: status, no result to check first
        source.start(-1, settle_s=0.5)
        replayed = drain(source, 10)
        line.emit("cam0", 2, journal=False)
        line.emit("cam0", 3, journal=False)
        got = drain(source, 2)
    assert [r.frame_id for r in replayed] == [f"old-{seq}" for seq in range(10)]
    assert [(r.seq, r.frame_id) for r in got] == [(2, "cam0-2"), (3, "cam0-3")]
    assert len(source.notices) == 1 and "another numbering's results for cam0" in source.notices[0]


def test_a_first_live_seq_at_or_below_since_the_journal_lacks_is_a_new_numbering_and_delivered(line):
    """The journal holds 0-4 of some numbering but not the live results (the daemon restarted without it): the
    reader resumes after 100, a seq of the numbering before, and 5 and 6, published after it subscribed, are
    delivered, not dropped as already had."""
    for seq in range(5):
        line.emit("cam0", seq, send=False)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        source = CatchUpSubscriber(sub, JournalCatchUp(line.journal_dir))
        line.pub.send_multipart(encode_status(STATION, STATUS))
        source.start(100, settle_s=0.5)
        line.emit("cam0", 5, journal=False)
        line.emit("cam0", 6, journal=False)
        got = drain(source, 2)
    assert [r.seq for r in got] == [5, 6]
    assert len(source.notices) == 1 and "seq 5 on cam0 is at or below --since 100" in source.notices[0]
    assert "the daemon numbers anew" in source.notices[0]


def test_since_past_the_numbering_the_journal_holds_is_said_so_not_blamed_on_a_restart(line):
    """The journal holds 0-4 and each live result as it is published: this numbering's, healthy. --since 100 lies
    past it (mistyped, or taken from a numbering since wiped): 5 and 6 are delivered, and the notice says where the
    numbering is instead of sending the engineer looking for a restart without the journal."""
    for seq in range(5):
        line.emit("cam0", seq, send=False)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        source = CatchUpSubscriber(sub, JournalCatchUp(line.journal_dir))
        line.pub.send_multipart(encode_status(STATION, STATUS))
        source.start(100, settle_s=0.5)
        line.emit("cam0", 5)
        got = drain(source, 1)
        line.emit("cam0", 6)
        got += drain(source, 1)
    assert [r.seq for r in got] == [5, 6]
    assert source.notices == ["--since 100 is past cam0's numbering (journal newest 5): delivered from seq 5"]


def test_a_catch_up_at_the_oldest_edge_while_rotation_takes_it_reports_rotation_not_a_crash(tmp_path, monkeypatch):
    """The reader starts from the oldest seq held, and the writer's rotation deletes that segment just after the
    reader first lists the segments: the results it held are a gap whose reason is rotation. Decided from a second
    listing, made after the deletion, they were "never journalled", sending the engineer after a crash."""
    directory, segments = journal_of(tmp_path, 200, 4 << 10)
    starts = first_seqs(segments)
    listing = journal_format.segment_files
    listed = []

    def list_then_rotate(camera_dir):
        found = listing(camera_dir)
        if not listed:
            segments[0].unlink()  # what the writer's rotation does right after the first listing
        listed.append(found)
        return found

    monkeypatch.setattr(journal_format, "segment_files", list_then_rotate)
    catch_up = JournalCatchUp(directory)
    seqs = [r.seq for r in catch_up.resume(starts[0] - 1)]
    assert seqs == list(range(starts[1], 200))
    assert catch_up.missed == [Gap("cam0", 0, starts[1] - 1, ROTATED)]


def test_a_disowned_journal_is_filled_from_again_once_it_holds_live_results(line, monkeypatch):
    """Disowned at 3; the daemon then journals into it again (restarted with it) and publishes 20: what lay between
    is a gap, not the old numbering's records, and the hole at 21 is filled from the journal again."""
    from inspectd.clients import subscribe
    from inspectd.clients.subscribe import OTHER_NUMBERING

    monkeypatch.setattr(subscribe, "RECHECK_S", 0.0)
    older_numbering(line, "cam0", range(10))
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        line.emit("cam0", 3, journal=False)
        first = drain(source, 1)
        line.emit("cam0", 20)
        line.emit("cam0", 21, send=False)
        line.emit("cam0", 22)
        got = drain(source, 3)
    assert [r.seq for r in first + got] == [3, 20, 21, 22]
    assert [r.frame_id for r in got] == ["cam0-20", "cam0-21", "cam0-22"]
    assert catch_up.missed == [Gap("cam0", 4, 19, OTHER_NUMBERING)]
    assert catch_up.recovered == 1
    assert "holds cam0's live results again from seq 20" in source.notices[-1]


def test_subscribe_says_the_journal_is_another_numbering_and_prints_the_live_results(line):
    """`inspectd subscribe --journal DIR --since -1` as a real process on a quiet line (status only, no result within
    the settle time, so the replay goes unchecked): the old numbering's replay, then the live results below it, and the
    notice on stderr."""
    older_numbering(line, "cam0", range(10))
    stop = threading.Event()

    def status() -> None:  # the daemon's 1 Hz status, faster: the subscriber's first live message
        while not stop.is_set():
            line.pub.send_multipart(encode_status(STATION, STATUS))
            time.sleep(0.05)

    heartbeat = threading.Thread(target=status, daemon=True)
    heartbeat.start()
    command = ["subscribe", "--endpoint", line.endpoint, "--journal", str(line.journal_dir), "--since", "-1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "inspectd", *command, "--count", "12", "--timeout", "30"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = [proc.stdout.readline().rstrip("\n")]  # the replay has started: the subscription took hold before it
        stop.set()
        heartbeat.join(5)  # a ZeroMQ socket is one thread's at a time
        line.emit("cam0", 2, journal=False)
        line.emit("cam0", 3, journal=False)
        proc.wait(30)
        assert proc.stderr is not None
        # Through the same buffered readers: readline above may have taken more than its line from the pipe.
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        stop.set()
        heartbeat.join(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    frames = [entry.split("frame=")[1] for entry in printed + out.splitlines()]
    assert frames == [f"old-{seq}" for seq in range(10)] + ["cam0-2", "cam0-3"], err
    assert "inspectd subscribe: journal" in err and "another numbering's results for cam0" in err, err
    assert proc.returncode == 0, err


def test_a_first_result_within_the_settle_time_is_checked_before_its_cameras_replay(line):
    """Status first, as on any line (it comes every second), then a result: start() waits for the result and checks
    it before the replay, so nothing of the old numbering's 0-9 is delivered."""
    older_numbering(line, "cam0", range(10))
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        source = CatchUpSubscriber(sub, JournalCatchUp(line.journal_dir))
        line.pub.send_multipart(encode_status(STATION, STATUS))
        line.emit("cam0", 3, journal=False)
        source.start(-1)
        line.emit("cam0", 4, journal=False)
        got = drain(source, 2)
    assert [r.frame_id for r in got] == ["cam0-3", "cam0-4"]
    assert len(source.notices) == 1 and "(seq 3: frame old-3 there, cam0-3 live)" in source.notices[0]


def test_a_journal_starting_past_the_live_seq_is_another_numbering(line):
    """The old numbering's low seqs were rotated away (it holds 100-200); the daemon, restarted without it, publishes
    5-7. The journal starts past 5, which the daemon's own journal cannot: nothing of it is replayed
    after --since 150 and the live results are delivered."""
    older_numbering(line, "cam0", range(100, 201))
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        source = CatchUpSubscriber(sub, JournalCatchUp(line.journal_dir))
        line.emit("cam0", 5, journal=False)
        source.start(150)
        line.emit("cam0", 6, journal=False)
        line.emit("cam0", 7, journal=False)
        got = drain(source, 3)
    assert [r.frame_id for r in got] == ["cam0-5", "cam0-6", "cam0-7"]
    assert len(source.notices) == 1 and "(seq 5: not there, the journal starts at 100)" in source.notices[0]


def test_a_first_live_result_rotated_away_while_it_waited_behind_the_replay_is_no_other_numbering(line):
    """cam0's first live result is checked in start(); cam1's waits on the socket while a slow reader pulls the
    replay and the line goes on, and the journal (a small cap) rotates past it. The daemon's own journal: cam1 comes
    in order, without a duplicate or a notice (it was taken for another numbering's, which moved cam1 back below
    what the replay had delivered and printed those results a second time)."""
    line.small_journal()
    emit = line.emit

    for seq in range(20):
        emit("cam0", seq, send=False)
        emit("cam1", seq, send=False)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        emit("cam0", 20)
        emit("cam1", 20)
        source = CatchUpSubscriber(sub, JournalCatchUp(line.journal_dir))
        source.start(-1, settle_s=2)
        got = drain(source, 3)
        for seq in range(21, 121):  # meanwhile: cam1's 20 is rotated away before it is taken
            emit("cam0", seq)
            emit("cam1", seq)
        assert journal_format.oldest_seq(line.journal_dir, "cam1") > 20
        got += drain(source, 10**6, timeout_s=1.5)
    cam1 = [r.seq for r in got if r.camera == "cam1"]
    assert cam1 == sorted(set(cam1)) and cam1[-1] == 120, cam1
    assert source.notices == []


def test_live_results_waiting_behind_a_replay_that_rotation_jumped_past_are_all_delivered(line):
    """cam1's replay is pulled after its live results 20-120 came on the socket, and rotation has taken 20 and
    more from the journal by then: its replay stops below 20, so every live result is delivered once, in order (the
    replay jumped to the journal's oldest seq, and the live results below it were dropped as delivered)."""
    line.small_journal()
    emit = line.emit

    for seq in range(20):
        emit("cam0", seq, send=False)
        emit("cam1", seq, send=False)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        emit("cam0", 20)
        source = CatchUpSubscriber(sub, JournalCatchUp(line.journal_dir))
        source.start(-1, settle_s=2)
        got = drain(source, 3)
        for seq in range(20, 121):
            emit("cam1", seq)
        assert journal_format.oldest_seq(line.journal_dir, "cam1") > 20
        got += drain(source, 10**6, timeout_s=1.0)
    assert [r.seq for r in got if r.camera == "cam1"] == list(range(20, 121))
    assert [g for g in source.catch_up.missed if g.camera == "cam1"] == [Gap("cam1", 0, 19, ROTATED)]
    assert source.notices == []


def test_a_camera_without_a_journal_at_start_whose_first_result_rotation_took_is_no_other_numbering(line):
    """cam1 has no record when `start` lists the journal; its first live result waits behind cam0's replay while
    the line goes on and rotation takes it. Only this numbering wrote cam1's journal since: no notice, cam1 not
    disowned, and every result comes in order (it was taken for another numbering's, from where the journal starts
    now)."""
    line.small_journal()
    emit = line.emit

    for seq in range(20):
        emit("cam0", seq, send=False)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        emit("cam0", 20)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        source.start(-1, settle_s=2)
        got = drain(source, 3)
        for seq in range(100):
            emit("cam0", 21 + seq)
            emit("cam1", seq)
        assert journal_format.oldest_seq(line.journal_dir, "cam1") > 0
        got += drain(source, 10**6, timeout_s=1.0)
    assert [r.seq for r in got if r.camera == "cam1"] == list(range(100))
    assert source.notices == [] and not catch_up.disowned("cam1")


def test_a_daemon_restarted_without_its_journal_under_a_running_subscriber_is_checked_again(line):
    """The daemon's first run journals and publishes 0-9; it restarts journalling elsewhere and numbers from 0
    again: the first result after the numbering went back is checked, and the hole at 2 is a gap, not filled with
    the first run's 2."""
    from inspectd.clients.subscribe import OTHER_NUMBERING

    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        for seq in range(10):
            line.emit("cam0", seq)
        first = drain(source, 10)
        line.emit("cam0", 0, journal=False)
        line.emit("cam0", 1, journal=False)
        line.emit("cam0", 2, journal=False, send=False)
        line.emit("cam0", 3, journal=False)
        got = drain(source, 3)
    assert [r.seq for r in first] == list(range(10))
    assert [r.seq for r in got] == [0, 1, 3] and catch_up.recovered == 0
    assert catch_up.missed == [Gap("cam0", 2, 2, OTHER_NUMBERING)]
    assert len(source.notices) == 1 and "another numbering's results for cam0 (seq 0:" in source.notices[0]


def test_subscribe_since_with_a_short_timeout_on_a_quiet_line_still_replays(line, capsys):
    """`--since -1 --timeout 3 --count 5` on a line that publishes only its 1 s status: the wait for a first result
    to check takes at most half of the timeout, and the 5 journalled results are printed before it runs out (a wait
    of the whole settle time printed none and exited 1)."""
    import argparse

    from inspectd.clients import subscribe

    for seq in range(5):
        line.journal.append("cam0", seq, result_frames("cam0", seq))
    stop = threading.Event()

    def status() -> None:  # the daemon's 1 s status on a quiet line
        while not stop.is_set():
            line.pub.send_multipart(encode_status(STATION, STATUS))
            stop.wait(1.0)

    heartbeat = threading.Thread(target=status, daemon=True)
    heartbeat.start()
    parser = argparse.ArgumentParser()
    subscribe.add_arguments(parser)
    command = ["--endpoint", line.endpoint, "--journal", str(line.journal_dir), "--since", "-1"]
    try:
        code = subscribe.run(parser.parse_args([*command, "--timeout", "3", "--count", "5"]))
    finally:
        stop.set()
        heartbeat.join(5)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [entry.split()[1] for entry in out.splitlines()] == [f"seq={seq}" for seq in range(5)]


def test_a_first_result_its_own_journal_lacks_is_delivered_in_order_after_the_replay(line):
    """The daemon's own journal lost 5 while its disk failed and holds 6 again; 5 is heard live while start() waits:
    the journal is not taken for another numbering (it does not start past 5), the replay stops below 5 and 5 is
    delivered, then 6, with no gap (a replay through 6 dropped the live 5 as delivered and called it a gap)."""
    for seq in (0, 1, 2, 3, 4, 6):
        line.journal.append("cam0", seq, result_frames("cam0", seq))
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        line.emit("cam0", 5, journal=False)
        source.start(2)
        line.emit("cam0", 6, journal=False)  # published after it was journalled above
        got = drain(source, 4)
    assert [r.seq for r in got] == [3, 4, 5, 6]
    assert source.notices == [] and catch_up.missed == []


class Run:
    """A daemon run's status messages: `uptime_s` into a run started at `start`, with cam0's results published and
    seqs given out (`next_seq`, counting the frames still in flight)."""

    def __init__(self, line: Line, start: float) -> None:
        self.line, self.start = line, start

    def status(self, uptime: float, published: int, given_out: int, dropped: int = 0) -> None:
        cameras = {"cam0": {"published": published, "next_seq": given_out, "dropped": dropped}}
        journal = {"lost": 0}  # every published result has its record
        doc = {**STATUS, "t": self.start + uptime, "uptime_s": uptime, "cameras": cameras, "journal": journal}
        self.line.pub.send_multipart(encode_status(STATION, doc))


def until_status(source, uptime: float, timeout_s: float = 10.0) -> list[Result]:
    """The results delivered before the status of `uptime`."""
    out: list[Result] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = source.recv(0.2)
        if isinstance(message, Result):
            out.append(message)
        elif isinstance(message, dict) and message["uptime_s"] == uptime:
            return out
    raise AssertionError(f"no status of uptime {uptime} within {timeout_s} s; results: {[r.seq for r in out]}")


def test_results_lost_after_the_last_one_heard_are_a_gap_once_a_status_counts_them_published(line):
    """The tail of a burst lost before the line goes quiet has no result after it to show the jump: the daemon's
    status, behind the results on the same socket, counts them published. Frames still in flight (given a seq, not
    published yet) are no gap, and nothing is inferred across a restart, which counts anew."""
    run = Run(line, time.time() - 100)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(None)
        source = CatchUpSubscriber(sub, catch_up)
        run.status(1.0, published=0, given_out=0)
        for seq in range(3):
            line.emit("cam0", seq)
        run.status(2.0, published=3, given_out=3)
        for seq in range(3, 10):
            line.emit("cam0", seq, send=seq < 6)  # 6-9: published, dropped on the way to this subscriber
        run.status(3.0, published=10, given_out=14)  # 10-13 still in flight
        heard = until_status(source, 3.0)
        assert [r.seq for r in heard] == list(range(6))
        assert catch_up.missed == [Gap("cam0", 6, 9, NO_JOURNAL)] and catch_up.gaps.missed == {"cam0": 4}
        catch_up.missed.clear()
        run.status(4.0, published=10, given_out=14)
        line.emit("cam0", 10)  # the first of those in flight: delivered, no gap before it
        run.status(5.0, published=11, given_out=14)
        assert [r.seq for r in until_status(source, 5.0)] == [10]
        # A restart, the new run already past the old one's count and uptime when its first status comes: only its
        # start (t - uptime_s) tells it apart, and its count says nothing of the seqs after the old run's.
        restarted = Run(line, run.start + 50)
        restarted.status(10.0, published=40, given_out=40)
        until_status(source, 10.0)
    assert catch_up.missed == [] and catch_up.gaps.missed == {"cam0": 4}


def test_the_tail_a_status_counts_published_is_fetched_from_the_journal(line):
    run = Run(line, time.time() - 100)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        run.status(1.0, published=0, given_out=0)
        line.emit("cam0", 0)
        run.status(2.0, published=1, given_out=1)
        for seq in range(1, 4):
            line.emit("cam0", seq, send=seq == 1)
        line.emit("cam0", 4, send=False, journal=False)  # published without its record (the journal's disk failed)
        run.status(3.0, published=5, given_out=5)
        heard = until_status(source, 3.0)
    assert [r.seq for r in heard] == [0, 1, 2, 3]
    assert catch_up.recovered == 2
    assert catch_up.missed == [Gap("cam0", 4, 4, NOT_JOURNALLED)]


def test_a_tail_lost_in_the_first_window_with_results_and_a_smaller_one_after_it_are_each_a_gap(line):
    """Counted per status window: the results the count grew by, less those heard and those the holes account for,
    were lost after the last one heard. So the tail of the first burst a subscriber hears is found, and so is a
    later one no larger than it."""
    run = Run(line, time.time() - 100)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(None)
        source = CatchUpSubscriber(sub, catch_up)
        run.status(1.0, published=0, given_out=0)
        for seq in range(10):
            line.emit("cam0", seq, send=seq < 5)
        run.status(2.0, published=10, given_out=10)
        assert [r.seq for r in until_status(source, 2.0)] == list(range(5))
        assert catch_up.missed == [Gap("cam0", 5, 9, NO_JOURNAL)]
        catch_up.missed.clear()
        for seq in range(10, 16):
            line.emit("cam0", seq, send=seq in (10, 12))  # 11 a hole the next result shows, 13-15 the tail
        run.status(3.0, published=16, given_out=18)  # 16-17 in flight
        assert [r.seq for r in until_status(source, 3.0)] == [10, 12]
    assert catch_up.missed == [Gap("cam0", 11, 11, NO_JOURNAL), Gap("cam0", 13, 15, NO_JOURNAL)]
    assert catch_up.gaps.missed == {"cam0": 9}


def test_a_tail_behind_queue_drops_is_the_published_results_from_the_journal_and_the_drops_named(line):
    """Frames a full drop_oldest queue drops take seqs and get no result (never journalled): the status counts them
    in `dropped`. The tail lost on the way is the published results after them, all delivered from the journal, and
    the drops' hole is named as such."""
    run = Run(line, time.time() - 100)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        run.status(1.0, published=0, given_out=0)
        for seq in (0, 1):
            line.emit("cam0", seq)
        for seq in range(10, 15):  # 2-9 dropped at the queue; 10-14 published, lost on the way
            line.emit("cam0", seq, send=False)
        line.journal.append("cam0", 15, result_frames("cam0", 15))  # journalled, not yet published at the status
        run.status(2.0, published=7, given_out=16, dropped=8)
        heard = until_status(source, 2.0)
    assert [r.seq for r in heard] == [0, 1, *range(10, 15)]
    reason = "not in the journal (dropped at the daemon's full drop_oldest queue: cameras.cam0.dropped rose by 8)"
    assert catch_up.missed == [Gap("cam0", 2, 9, reason)] and catch_up.recovered == 5


def test_without_a_journal_a_tail_behind_queue_drops_is_reported_by_count_and_not_counted_twice(line):
    run = Run(line, time.time() - 100)
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(None)
        source = CatchUpSubscriber(sub, catch_up)
        run.status(1.0, published=0, given_out=0)
        for seq in (0, 1):
            line.emit("cam0", seq)
        run.status(2.0, published=7, given_out=15, dropped=8)  # 2-9 dropped, 10-14 lost on the way
        assert [r.seq for r in until_status(source, 2.0)] == [0, 1]
        dropping = NO_JOURNAL + ", or dropped at the daemon's full drop_oldest queue (cameras.cam0.dropped rose by 8)"
        assert catch_up.missed == [Gap("cam0", 2, 6, dropping, exact=False)]
        assert catch_up.missed[0].describe() == (
            "gap: 5 results after seq 1 on cam0 never came (their seqs unknown: the daemon's queue dropped frames "
            f"meanwhile): {dropping}"
        )
        catch_up.missed.clear()
        line.emit("cam0", 15)
        run.status(3.0, published=8, given_out=16, dropped=8)
        assert [r.seq for r in until_status(source, 3.0)] == [15]
    assert catch_up.missed == [Gap("cam0", 2, 14, dropping + " (5 of them reported before by count)")]
    assert catch_up.gaps.missed == {"cam0": 13}


def test_subscribe_reports_the_lost_tail_of_a_burst_on_a_quiet_line_and_counts_it(tmp_path):
    """`inspectd subscribe` as a real process: the results lost after the last one it printed are reported from the
    status that follows them, before any further result, and the summary at Ctrl-C counts them."""
    endpoint = f"ipc://{tmp_path}/pub.sock"
    pub = zmq.Context.instance().socket(zmq.XPUB)  # tells when the subscription has arrived
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    start = time.time() - 100

    def status(uptime: float, published: int) -> None:
        doc = {**STATUS, "t": start + uptime, "uptime_s": uptime, "cameras": {"cam0": {"published": published}}}
        pub.send_multipart(encode_status(STATION, doc))

    proc = subprocess.Popen(
        inspectd_argv("subscribe", "--endpoint", endpoint, "--timeout", "15"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert pub.poll(20_000) and pub.recv()[0] == 1, "the subscriber never subscribed"
        status(1.0, 0)
        pub.send_multipart(result_frames("cam0", 0))
        status(2.0, 1)
        for seq in (1, 2):
            pub.send_multipart(result_frames("cam0", seq))
        status(3.0, 6)  # 3-5 published, lost on the way; the line is quiet after them
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the first line it writes there: the gap, or nothing until the timeout
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close(0)
    assert line == "gap: seq 3-5 on cam0 (3 results): lost on the way (no journal to fill it from)\n", line + err
    assert [entry.split()[1] for entry in out.splitlines()] == ["seq=0", "seq=1", "seq=2"]
    assert "inspectd subscribe: 3 results, missed cam0: 3" in err and proc.returncode == 130, err


def test_a_journal_record_that_does_not_decode_is_reported_as_such_not_as_never_journalled(tmp_path):
    directory = tmp_path / "journal"
    journal = Journal(directory, max_bytes=1 << 20)
    for seq in range(4):
        frames = result_frames("cam0", seq)
        if seq == 2:  # a newer writer's record
            frames[1] = frames[1].replace(b'"schema":1', b'"schema":2')
        journal.append("cam0", seq, frames)
    journal.close()
    catch_up = JournalCatchUp(directory)
    assert [r.seq for r in catch_up.resume(-1)] == [0, 1, 3]
    assert catch_up.refused == 1
    reason = "a journal record that does not decode (result header.schema: 2, this decoder reads schema 1)"
    assert catch_up.missed == [Gap("cam0", 2, 2, reason)]
