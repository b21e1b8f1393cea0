"""`inspectd subscribe` (inspectd.clients.subscribe) over real ZeroMQ sockets, as a real process where it prints: a tail
lost before the first status it hears of a daemon run (also of one numbered anew, and none where a `--since` replay
ran ahead of that status, and none taken from the journal past what that status covers where the journal could not
write the tail), and a flood of messages it cannot read."""

from __future__ import annotations

import contextlib
import grp
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from cli_child import inspectd_argv
from inspectd.clients import subscribe
from inspectd.clients.subscribe import CatchUpSubscriber, JournalCatchUp, Subscriber
from inspectd.daemon.journal import Journal
from inspectd.protocol.messages import encode_status
from ports import free_port
from test_catch_up import REPO, STATION, STATUS, Line, drain, result_frames, until_status


@pytest.fixture
def line(tmp_path):
    with contextlib.closing(Line(tmp_path)) as made:
        yield made


def send_status(
    pub: zmq.Socket,
    start: float,
    uptime: float,
    cameras: dict[str, dict[str, int]] | None = None,
    journal_lost: int = 0,
    **cam0: int,
) -> None:
    """A status of the run started at `start`, `uptime` into it, with cam0's counters (published, first_seq,
    dropped), or each camera's in `cameras`: what the daemon's says of a camera, which the first status heard of a
    run is read by; `journal_lost`: the results its journal could not write in this run."""
    cameras = {"cam0": cam0} if cameras is None else cameras
    doc = {**STATUS, "t": start + uptime, "uptime_s": uptime, "cameras": cameras, "journal": {"lost": journal_lost}}
    pub.send_multipart(encode_status(STATION, doc))


NEWER_SCHEMA = "result header.schema: 2, this decoder reads schema 1"  # what the subscriber says of one


def newer_schema_result() -> list[bytes]:
    """A result of a newer schema, as a foreign publisher (or a newer daemon) on the endpoint sends it."""
    frames = result_frames("cam0", 0)
    frames[1] = frames[1].replace(b'"schema":1', b'"schema":2')
    return frames


class Inspectd:
    """`inspectd subscribe ARGS` as a real process on an XPUB socket, which tells when its subscription arrived."""

    def __init__(self, tmp_path, *args: str) -> None:
        endpoint = f"ipc://{tmp_path}/pub.sock"
        self.pub = zmq.Context.instance().socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(endpoint)
        self.proc = subprocess.Popen(
            inspectd_argv("subscribe", "--endpoint", endpoint, "--timeout", "15", *args),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.pub.poll(20_000) and self.pub.recv()[0] == 1, "the subscriber never subscribed"

    def stdout_line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def stderr_line(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.readline()

    def interrupt(self) -> tuple[str, str]:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.communicate(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.pub.close(0)


def test_subscribe_reports_a_tail_lost_before_the_first_status_of_a_run_at_that_status(tmp_path):
    """Just started, it hears 0-2; 3-5 are published and lost on the way, and the line goes quiet. No earlier status
    gives a count to go by, but the run's own first seq does (0, no drops: its results are 0-5): the gap is reported
    at that status, not only when the camera's next result comes, and counted once."""
    sub = Inspectd(tmp_path)
    try:
        start = time.time() - 100
        for seq in range(3):
            sub.pub.send_multipart(result_frames("cam0", seq))
        send_status(sub.pub, start, 2.0, published=6, first_seq=0, dropped=0)
        first = sub.stderr_line()  # on a quiet line: the first line it writes there, or nothing until the timeout
        sub.pub.send_multipart(result_frames("cam0", 6))
        printed = [sub.stdout_line() for _ in range(4)]  # each read ends at the subscriber's --timeout at worst
        out, err = sub.interrupt()
    finally:
        sub.close()
    assert first == "gap: seq 3-5 on cam0 (3 results): lost on the way (no journal to fill it from)\n", first + err
    assert "gap" not in err, err  # seq 6 after the status: no second report of the same hole
    assert [entry.split()[1] for entry in printed + out.splitlines()] == ["seq=0", "seq=1", "seq=2", "seq=6"]
    assert "inspectd subscribe: 4 results, missed cam0: 3" in err and sub.proc.returncode == 130, err


def test_a_tail_lost_before_the_first_status_after_a_restart_comes_from_the_journal(line):
    """After a restart (seq resumed from the journal at 2) 2-3 are heard and 4-5 published, journalled and lost on
    the way. The new run's first status (first seq 2, 4 published) shows them missing: they are delivered from the
    journal at that status, and the next live result follows as ever."""
    run_a = time.time() - 100
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        send_status(line.pub, run_a, 2.0, published=0, first_seq=0, dropped=0)
        for seq in (0, 1):
            line.emit("cam0", seq)
        send_status(line.pub, run_a, 3.0, published=2, first_seq=0, dropped=0)
        assert [r.seq for r in until_status(source, 3.0)] == [0, 1]
        run_b = run_a + 50
        for seq in range(2, 6):
            line.emit("cam0", seq, send=seq < 4)
        send_status(line.pub, run_b, 1.5, published=4, first_seq=2, dropped=0)
        assert [r.seq for r in until_status(source, 1.5)] == [2, 3, 4, 5]
        line.emit("cam0", 6)
        assert [r.seq for r in drain(source, 1)] == [6]
    assert catch_up.recovered == 2 and catch_up.missed == [] and catch_up.backwards == []
    assert catch_up.gaps.missed == {}


def test_the_first_status_of_a_run_claims_nothing_it_cannot_count(line):
    """Where the run's queue dropped frames, seqs are no count of results published; where the last seq delivered
    is an earlier run's, below this run's first, what came of the seqs between the next result shows. Nothing is
    said at such a first status, and a live result that comes after it is delivered as ever."""
    start = time.time() - 100
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(None)
        source = CatchUpSubscriber(sub, catch_up)
        for seq in (0, 1):
            line.emit("cam0", seq)
        send_status(line.pub, start, 5.0, published=2, first_seq=0, dropped=5)  # 2-6 dropped, 7-8 queued
        assert [r.seq for r in until_status(source, 5.0)] == [0, 1]
        assert catch_up.missed == [] and catch_up.gaps.missed == {}
        send_status(line.pub, start + 50, 2.0, published=3, first_seq=5, dropped=0)  # a run numbered from 5
        until_status(source, 2.0)
        assert catch_up.missed == [] and catch_up.gaps.missed == {}
        # A run whose results up to 1 all came: nothing to say either.
        send_status(line.pub, start + 100, 2.0, published=2, first_seq=0, dropped=0)
        until_status(source, 2.0)
        assert catch_up.missed == [] and catch_up.gaps.missed == {}
        line.emit("cam0", 2)
        assert [r.seq for r in drain(source, 1)] == [2]


def test_a_run_numbered_anew_whose_results_never_came_is_reported_lost_at_its_first_status(tmp_path):
    """Delivered up to 500 of one run; the daemon restarts without its journal and publishes 0-4, which are lost on
    the way (the subscriber was reconnecting). 500 is above every seq the new run gave out (next_seq 5): an earlier
    run's, so the new run's first status shows all 5 published and none heard. They are reported at that status, as
    a new numbering; 5 then follows them without a gap or a second "went back"."""
    sub = Inspectd(tmp_path)
    try:
        start = time.time() - 1000
        for seq in range(498, 501):
            sub.pub.send_multipart(result_frames("cam0", seq))
        send_status(sub.pub, start, 900.0, published=501, first_seq=0, next_seq=501, dropped=0)
        send_status(sub.pub, start + 990, 2.0, published=5, first_seq=0, next_seq=5, dropped=0)
        said = [sub.stderr_line() for _ in range(2)]  # each read ends at the subscriber's --timeout at worst
        sub.pub.send_multipart(result_frames("cam0", 5))
        printed = [sub.stdout_line() for _ in range(4)]
        out, err = sub.interrupt()
    finally:
        sub.close()
    assert said == [
        "seq went back on cam0: 0 after 500 (the daemon restarted without its journal, or reused seqs after a power "
        "cut)\n",
        "gap: seq 0-4 on cam0 (5 results): lost on the way (no journal to fill it from)\n",
    ], "".join(said) + err
    assert "gap" not in err and "went back" not in err, err
    assert [entry.split()[1] for entry in printed + out.splitlines()] == ["seq=498", "seq=499", "seq=500", "seq=5"]
    assert "inspectd subscribe: 4 results, missed cam0: 5" in err and sub.proc.returncode == 130, err


def heard_old_run(line, source, run_a: float) -> None:
    """The old run's results 0-7, journalled and heard, and its status (the run started at `run_a`)."""
    for seq in range(8):
        frames = result_frames("cam0", seq, f"old-{seq}")
        line.journal.append("cam0", seq, frames)
        line.pub.send_multipart(frames)
    send_status(line.pub, run_a, 900.0, published=8, first_seq=0, next_seq=8, dropped=0)
    assert [r.seq for r in until_status(source, 900.0)] == list(range(8))


def test_a_new_numbering_a_status_shows_is_not_filled_from_a_journal_of_the_old_one(line):
    """The journal holds the old run's results (the daemon restarted with its journal off): the new run's 0-4, lost
    on the way, are a gap at its first status, not the old 0-4 read from the journal under their seqs. Its first
    live result finds the journal another numbering's, and the hole after it stays a gap too."""
    run_a = time.time() - 1000
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        heard_old_run(line, source, run_a)
        send_status(line.pub, run_a + 990, 2.0, published=5, first_seq=0, next_seq=5, dropped=0)
        assert until_status(source, 2.0) == []
        assert [gap[:3] for gap in catch_up.missed] == [("cam0", 0, 4)]
        assert catch_up.missed[0].reason == subscribe.NEW_NUMBERING_UNCHECKED
        assert catch_up.backwards == [("cam0", 7, 0)]
        catch_up.missed.clear()
        for seq in (5, 6, 7):
            line.emit("cam0", seq, journal=False, send=seq != 6)
        got = drain(source, 2)
    assert [(r.seq, r.frame_id) for r in got] == [(5, "cam0-5"), (7, "cam0-7")]
    assert catch_up.missed == [subscribe.Gap("cam0", 6, 6, subscribe.OTHER_NUMBERING)] and catch_up.recovered == 0
    assert len(source.notices) == 1 and "another numbering's results for cam0 (seq 5: frame old-5" in source.notices[0]
    assert catch_up.gaps.missed == {"cam0": 6}


def test_a_journal_a_new_numbering_is_written_to_fills_its_holes_once_a_live_result_is_checked(line):
    """The journal was wiped and the new run writes to it: its 0-4, lost on the way, are a gap at its first status
    (no live result of it yet to check the journal against), and once 5 shows the journal is this numbering's, the
    hole at 6 is filled from it as ever, with nothing more to say."""
    run_a = time.time() - 1000
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        for seq in range(8):
            line.emit("cam0", seq, journal=False)  # the journal that held them is gone
        assert [r.seq for r in drain(source, 8)] == list(range(8))
        for seq in range(5):
            line.emit("cam0", seq, send=False)
        send_status(line.pub, run_a + 990, 2.0, published=5, first_seq=0, next_seq=5, dropped=0)
        assert until_status(source, 2.0) == []
        assert [gap[:3] for gap in catch_up.missed] == [("cam0", 0, 4)]
        assert catch_up.missed[0].reason == subscribe.NEW_NUMBERING_UNCHECKED
        catch_up.missed.clear()
        for seq in (5, 6, 7):
            line.emit("cam0", seq, send=seq != 6)
        got = drain(source, 3)
    assert [(r.seq, r.frame_id) for r in got] == [(5, "cam0-5"), (6, "cam0-6"), (7, "cam0-7")]
    assert catch_up.missed == [] and catch_up.recovered == 1 and source.notices == []
    assert catch_up.gaps.missed == {"cam0": 5} and not catch_up.disowned("cam0")


def test_a_new_numbering_whose_queue_dropped_frames_is_reported_by_count_then_by_seq(line):
    """The new run dropped 2 of its first 5 frames at its queue: its 3 results published, none heard, are a gap by
    count at its first status (their seqs unknown), and the hole its next result shows names them, counted once."""
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(None)
        source = CatchUpSubscriber(sub, catch_up)
        for seq in range(8):
            line.emit("cam0", seq)
        assert [r.seq for r in drain(source, 8)] == list(range(8))
        send_status(line.pub, time.time() - 10, 2.0, published=3, first_seq=0, next_seq=5, dropped=2)
        until_status(source, 2.0)
        assert [(gap[:3], gap.exact) for gap in catch_up.missed] == [(("cam0", 0, 2), False)]
        assert catch_up.missed[0].describe().startswith("gap: 3 results after seq -1 on cam0 never came")
        catch_up.missed.clear()
        line.emit("cam0", 5)
        assert [r.seq for r in drain(source, 1)] == [5]
    assert [gap[:3] for gap in catch_up.missed] == [("cam0", 0, 4)]
    assert catch_up.missed[0].reason.endswith("(3 of them reported before by count)"), catch_up.missed
    assert catch_up.backwards == [("cam0", 7, 0)] and catch_up.gaps.missed == {"cam0": 5}


@pytest.mark.parametrize("only", [(), ("--camera", "cam1")], ids=["all", "camera"])
def test_a_since_restart_on_a_running_line_reports_no_gap_and_prints_each_result_once(tmp_path, only):
    """`--since 4` on a running two-camera line, nothing lost or restarted. The camera of the first live result
    (cam0's 300) has its replay stop below it; cam1's stops below its first live result waiting by then (10), or
    is read to the journal's end, 14, where the daemon journalled 10-14 before they came. The status that counts up
    to next_seq 10 is older than the replay, not a run numbered anew: no seq went back, no gap, and each of 5-14 is
    printed once, in order (the cameras' order among each other is not fixed)."""
    directory = tmp_path / "journal"
    journal = Journal(directory, max_bytes=1 << 22)
    try:
        for seq in range(300):
            journal.append("cam0", seq, result_frames("cam0", seq))
        for seq in range(10):
            journal.append("cam1", seq, result_frames("cam1", seq))
        sub = Inspectd(tmp_path, "--journal", str(directory), "--since", "4", "--status", *only)
        try:
            start = time.time() - 100

            def status(uptime: float, cam0: int, cam1: int) -> None:  # the next seq each camera gives out
                cameras = {
                    cam: {"published": n, "first_seq": 0, "next_seq": n, "dropped": 0}
                    for cam, n in [("cam0", cam0), ("cam1", cam1)]
                }
                send_status(sub.pub, start, uptime, cameras)

            status(100.0, cam0=300, cam1=10)
            live = [("cam0", 300)] + [("cam1", seq) for seq in range(10, 15)]
            frames = [result_frames(camera, seq) for camera, seq in live]
            for (camera, seq), each in zip(live, frames):  # all journalled before the replay can reach cam1's end
                journal.append(camera, seq, each)
            for each in frames:
                sub.pub.send_multipart(each)
            status(101.0, cam0=301, cam1=15)
            printed: list[str] = []
            while not printed or not printed[-1].startswith(f"status {STATION}: healthy, up 0:01:41,"):
                entry = sub.stdout_line()  # ends at the subscriber's --timeout at worst
                assert entry, f"no status of uptime 101 printed; {len(printed)} lines before: {printed[-3:]}"
                printed.append(entry)
            out, err = sub.interrupt()
        finally:
            sub.close()
    finally:
        journal.close()
    results = [entry.split()[:2] for entry in printed + out.splitlines() if not entry.startswith("status ")]
    replay = [("cam0", seq) for seq in range(5, 300)] + [("cam1", seq) for seq in range(5, 15)]
    expected = [[camera, f"seq={seq}"] for camera, seq in replay + [("cam0", 300)] if not only or camera == only[-1]]
    for camera in ("cam0", "cam1"):
        mine = [entry for entry in results if entry[0] == camera]
        assert mine == [entry for entry in expected if entry[0] == camera], mine[-12:]
    assert len(results) == len(expected), results[-12:]
    assert "gap" not in err and "went back" not in err and "missed" not in err, err
    assert sub.proc.returncode == 130, err


# What a gap says of results published while the daemon's journal could not write them (journal.lost rose by 4).
JOURNAL_FAILED_4 = (
    "not in the journal (the daemon's journal could not write results: journal.lost rose by 4; see journal.error in "
    "its status)"
)


def test_a_since_restart_after_the_journal_could_not_write_prints_each_result_once_and_names_why(tmp_path):
    """The daemon's journal could not write 6-9 (its status: journal.lost 4), then wrote 10 again. `--since 2`
    replays 3-5 and stops below 10, the first result heard live; the status heard before 10 is read after that
    replay and shows 6-9 published and not come. They are a gap that names the journal's failed writes; 10, given
    out after that status, is not taken from the journal as one of them: it comes live, printed once, and no seq
    went back before 11 follows it."""
    directory = tmp_path / "journal"
    journal = Journal(directory, max_bytes=1 << 22)
    try:
        frames = {seq: result_frames("cam0", seq) for seq in [*range(6), 10, 11]}
        for seq, each in frames.items():
            journal.append("cam0", seq, each)
        sub = Inspectd(tmp_path, "--journal", str(directory), "--since", "2")
        try:
            start = time.time() - 100
            send_status(sub.pub, start, 5.0, journal_lost=4, published=10, first_seq=0, next_seq=10, dropped=0)
            for seq in (10, 11):  # the very results journalled: the journal is this numbering's
                sub.pub.send_multipart(frames[seq])
            said = sub.stderr_line()  # each read ends at the subscriber's --timeout at worst
            printed = [sub.stdout_line() for _ in range(5)]
            out, err = sub.interrupt()
        finally:
            sub.close()
    finally:
        journal.close()
    seqs = [entry.split()[1] for entry in printed + out.splitlines()]
    assert seqs == ["seq=3", "seq=4", "seq=5", "seq=10", "seq=11"], err
    assert "went back" not in said + err, said + err
    assert said == f"gap: seq 6-9 on cam0 (4 results): {JOURNAL_FAILED_4}\n", said + err
    assert "gap" not in err and sub.proc.returncode == 130, err


def test_a_tail_the_journal_could_not_write_is_a_gap_and_the_next_result_comes_once(line):
    """Heard 0-5; 6-9 were published while the daemon's journal could not write them, and lost on the way. The
    daemon journals and publishes 10 before the subscriber, behind it, reads the status that counts 6-9: 10 is not
    among that status's losses. The gap 6-9 names the failed writes, and 10 is delivered once, live, with no seq
    gone back."""
    start = time.time() - 100
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        send_status(line.pub, start, 2.0, published=0, first_seq=0, next_seq=0, dropped=0)
        for seq in range(6):
            line.emit("cam0", seq)
        send_status(line.pub, start, 3.0, published=6, first_seq=0, next_seq=6, dropped=0)
        assert [r.seq for r in until_status(source, 3.0)] == list(range(6))
        for seq in range(6, 10):
            line.emit("cam0", seq, send=False, journal=False)
        send_status(line.pub, start, 4.0, journal_lost=4, published=10, first_seq=0, next_seq=10, dropped=0)
        line.emit("cam0", 10)
        line.emit("cam0", 11)
        before = [r.seq for r in until_status(source, 4.0)]
        after = [r.seq for r in drain(source, 2)]
    assert (before, after) == ([], [10, 11]) and catch_up.backwards == [] and catch_up.recovered == 0
    assert catch_up.missed == [subscribe.Gap("cam0", 6, 9, JOURNAL_FAILED_4)]
    assert catch_up.gaps.missed == {"cam0": 4}


def test_a_journal_lacking_the_new_numberings_first_live_result_fills_no_hole(line):
    """The journal holds the old run's 0-7 (the daemon restarted with its journal off). The new run's first status
    shows 0-2 published and none heard; 3-9 are lost on the way too, and 10 comes. The daemon journals each result
    before it publishes it, so a journal without 10 is not this numbering's: the hole 3-9 is a gap, not the old
    run's 3-7 delivered under the new run's seqs, and the journal is told another numbering's."""
    run_a = time.time() - 1000
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        heard_old_run(line, source, run_a)
        send_status(line.pub, run_a + 998, 2.0, published=3, first_seq=0, next_seq=3, dropped=0)
        assert until_status(source, 2.0) == []
        assert catch_up.missed == [subscribe.Gap("cam0", 0, 2, subscribe.NEW_NUMBERING_UNCHECKED)]
        catch_up.missed.clear()
        for seq in (10, 11):
            line.emit("cam0", seq, journal=False)
        got = drain(source, 2)
    assert [(r.seq, r.frame_id) for r in got] == [(10, "cam0-10"), (11, "cam0-11")]
    assert catch_up.missed == [subscribe.Gap("cam0", 3, 9, subscribe.OTHER_NUMBERING)] and catch_up.recovered == 0
    assert source.notices == [
        f"journal {line.journal_dir} holds another numbering's results for cam0 (seq 10: not there): nothing more of "
        "cam0 is read from it (any replay of this camera from it was another numbering's; holes are gaps) until it "
        "holds a live result again"
    ]
    assert catch_up.backwards == [("cam0", 7, 0)] and catch_up.gaps.missed == {"cam0": 10}


def test_a_journal_found_another_numberings_stays_so_across_the_next_restarts_status(line):
    """The journal, already found another numbering's at a restart without it (told once), meets the next restart:
    its first status shows 0-2 published and none heard, 3-9 are lost on the way and 10 comes. That status does not
    make the journal this numbering's again: 10 is not in it, the hole 3-9 is a gap, and no old record is
    delivered under the new run's seqs."""
    with Subscriber(line.endpoint) as sub:
        line.join(sub)
        catch_up = JournalCatchUp(line.journal_dir)
        source = CatchUpSubscriber(sub, catch_up)
        for seq in range(8):
            frames = result_frames("cam0", seq, f"old-{seq}")
            line.journal.append("cam0", seq, frames)
            line.pub.send_multipart(frames)
        for seq in range(6):
            line.emit("cam0", seq, journal=False)
        assert [(r.seq, r.frame_id) for r in drain(source, 14)][8:] == [(seq, f"cam0-{seq}") for seq in range(6)]
        assert len(source.notices) == 1 and "(seq 0: frame old-0 there, cam0-0 live)" in source.notices[0]
        send_status(line.pub, time.time() - 2, 2.0, published=3, first_seq=0, next_seq=3, dropped=0)
        assert until_status(source, 2.0) == []
        assert catch_up.missed == [subscribe.Gap("cam0", 0, 2, subscribe.NEW_NUMBERING_UNCHECKED)]
        catch_up.missed.clear()
        for seq in (10, 11):
            line.emit("cam0", seq, journal=False)
        got = drain(source, 2)
    assert [(r.seq, r.frame_id) for r in got] == [(10, "cam0-10"), (11, "cam0-11")]
    assert catch_up.missed == [subscribe.Gap("cam0", 3, 9, subscribe.OTHER_NUMBERING)] and catch_up.recovered == 0
    assert len(source.notices) == 2 and "(seq 10: not there)" in source.notices[1], source.notices
    assert catch_up.backwards == [("cam0", 7, 0), ("cam0", 5, 0)] and catch_up.gaps.missed == {"cam0": 10}


def test_a_cameras_topic_prefix_still_hears_its_stations_status(tmp_path):
    """`--topic inspect.<station>.<camera>.` does not match `inspect.<station>.status`: the subscriber subscribes to
    the status as well, so `--status` prints it and a tail lost after the last result heard is still found (here:
    seq 1 published, never heard)."""
    sub = Inspectd(tmp_path, "--topic", f"inspect.{STATION}.cam0.", "--status")
    try:
        assert sub.pub.poll(10_000) and sub.pub.recv() == b"\x01" + f"inspect.{STATION}.status".encode()
        start = time.time() - 100
        sub.pub.send_multipart(result_frames("cam0", 0))
        send_status(sub.pub, start, 2.0, published=2, first_seq=0, dropped=0)
        printed = [sub.stdout_line() for _ in range(2)]  # each read ends at the subscriber's --timeout at worst
        out, err = sub.interrupt()
    finally:
        sub.close()
    assert printed[0].startswith("cam0 seq=0 ok"), printed
    # One readable line beside the result lines, not the status's raw JSON (kilobytes a second with drift blocks).
    assert printed[1].rstrip("\n") == (
        f"status {STATION}: healthy, up 0:00:02, 0.0 frames/s, model m thresholds v1; "
        "cam0 ? in 0 published 2 defects 0 errors 0 dropped 0"
    ), printed
    assert "gap: seq 1-1 on cam0 (1 results)" in err, err


def test_a_topic_naming_a_station_no_daemon_could_have_subscribes_as_written(tmp_path):
    """A station name outside ASCII (no daemon's: the config refuses it) has no status topic to add: the prefix is
    subscribed to as written, without a traceback."""
    sub = Inspectd(tmp_path, "--topic", "inspect.st\u00e9.cam0.")
    try:
        out, err = sub.interrupt()
    finally:
        sub.close()
    assert sub.proc.returncode == 130 and "Traceback" not in err, err


def flooded(sub: Inspectd, count: int) -> tuple[str, str]:
    """`count` newer-schema results, then a readable one: the line it printed for that one (behind every unreadable
    one on the socket, so all of them were read), and its stderr once interrupted."""
    try:
        foreign = newer_schema_result()
        for _ in range(count):
            sub.pub.send_multipart(foreign)
        sub.pub.send_multipart(result_frames("cam0", 0))
        printed = sub.stdout_line()
        _, err = sub.interrupt()
    finally:
        sub.close()
    return printed, err


def test_a_flood_of_unreadable_messages_is_one_line_then_a_count_and_none_is_lost(tmp_path):
    """A foreign publisher (here: a newer schema) on the endpoint sends a message per result: the first is reported
    in full, the rest counted, and the count is written at the end; the daemon's results still print."""
    printed, err = flooded(Inspectd(tmp_path), 300)
    assert printed.startswith("cam0 seq=0 ok"), printed + err
    why = NEWER_SCHEMA
    assert err.splitlines() == [
        f"inspectd subscribe: skipped a malformed message: {why}",
        f"inspectd subscribe: skipped 299 more malformed messages (300 in all; the last: {why})",
        "inspectd subscribe: interrupted",
    ], err


def test_unreadable_messages_during_the_wait_for_a_first_result_are_counted_too(tmp_path):
    """With --journal --since, the subscriber first waits for a live result to check its camera's journal against:
    what it cannot read meanwhile is reported and counted as ever, not skipped unseen."""
    journal = tmp_path / "journal"
    journal.mkdir()
    printed, err = flooded(Inspectd(tmp_path, "--journal", str(journal), "--since", "-1"), 50)
    assert printed.startswith("cam0 seq=0 ok"), printed + err
    why = NEWER_SCHEMA
    assert f"inspectd subscribe: skipped a malformed message: {why}" in err.splitlines(), err
    assert f"inspectd subscribe: skipped 49 more malformed messages (50 in all; the last: {why})" in err, err


def test_unreadable_messages_during_the_wait_for_a_first_result_are_counted_when_it_is_interrupted(tmp_path):
    """Ctrl-C during that wait: the count of what it skipped is written at exit, as it is after the wait."""
    journal = tmp_path / "journal"
    journal.mkdir()
    sub = Inspectd(tmp_path, "--journal", str(journal), "--since", "-1")
    try:
        foreign = newer_schema_result()
        for _ in range(50):
            sub.pub.send_multipart(foreign)
        first = sub.stderr_line()
        # More of them read, and waiting again for a result: its main thread asleep (in its poll) for a while.
        deadline, asleep_since = time.monotonic() + 10, None
        while asleep_since is None or time.monotonic() - asleep_since < 0.3:
            assert time.monotonic() < deadline, "the subscriber never went back to waiting"
            asleep = Path(f"/proc/{sub.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
            asleep_since = (asleep_since or time.monotonic()) if asleep else None
            time.sleep(0.01)
        out, err = sub.interrupt()
    finally:
        sub.close()
    why = NEWER_SCHEMA
    assert first == f"inspectd subscribe: skipped a malformed message: {why}\n", first + err
    # How many came before the interrupt is the socket's affair; that the rest is counted at exit is the point.
    line = rf"^inspectd subscribe: skipped (\d+) more malformed messages \((\d+) in all; the last: {re.escape(why)}\)$"
    counted = re.search(line, err, re.M)
    assert counted and int(counted[2]) == int(counted[1]) + 1 >= 2, err
    assert sub.proc.returncode == 130, err


def test_unreadable_messages_are_counted_at_most_once_an_interval_with_the_last_ones_error():
    count = subscribe.MalformedCount(every_s=10.0)
    assert count.skipped("a", 100.0) == "inspectd subscribe: skipped a malformed message: a"
    assert [count.skipped("b", 100.0 + i) for i in range(1, 10)] == [None] * 9
    assert count.due(109.5) is None
    assert count.due(110.0) == "inspectd subscribe: skipped 9 more malformed messages (10 in all; the last: b)"
    assert count.due(200.0) is None  # nothing since
    assert count.skipped("c", 201.0) == "inspectd subscribe: skipped 1 more malformed messages (11 in all; the last: c)"
    assert count.skipped("d", 202.0) is None
    assert count.rest(203.0) == "inspectd subscribe: skipped 1 more malformed messages (12 in all; the last: d)"
    assert count.rest(204.0) is None


def _refused(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        inspectd_argv("subscribe", *args, "--timeout", "3"), capture_output=True, text=True, timeout=30, cwd=REPO
    )
    return proc.returncode, proc.stdout, proc.stderr


DESTINATION_PORT = (
    "expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535 (* and 0 are only for a bind), got "
)


@pytest.mark.parametrize(
    "endpoint, expected",
    [
        ("inproc://line1", "expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH), got 'inproc://line1'"),
        ("tcp://[::1:5556", "expected an IPv6 host in brackets, as tcp://[::1]:5556, got 'tcp://[::1:5556'"),
        ("tcp://127.0.0.1:", f"{DESTINATION_PORT}'tcp://127.0.0.1:'"),
        ("ipc://pub.sock", "expected an absolute socket path, as ipc:///var/lib/inspectd/NAME.sock"),
        # libzmq's source-address form (tcp://SOURCE;HOST:PORT): its destination is checked, in its own words.
        (
            "tcp://lo:0;127.0.0.1:65536",
            f"{DESTINATION_PORT}'tcp://127.0.0.1:65536' (the destination of 'tcp://lo:0;127.0.0.1:65536', after its "
            "';')",
        ),
        *(
            (
                endpoint,
                "expected SOURCE:PORT before ';' (PORT up to 65535, 0 for any), as tcp://eth1:0;192.168.1.1:5556, got "
                f"'{endpoint}'",
            )
            # libzmq never connects from a source without a port, in silence.
            for endpoint in ("tcp://;127.0.0.1:5556", "tcp://lo;127.0.0.1:5556", "tcp://lo:65536;127.0.0.1:5556")
        ),
    ],
)
def test_an_endpoint_no_daemon_could_be_configured_with_is_refused_in_one_line(endpoint, expected):
    """Each was connected to and waited on in silence until the timeout, which then exited 0."""
    code, out, err = _refused("--endpoint", endpoint)
    assert code == 2 and out == "" and err.startswith(f"inspectd subscribe: --endpoint: {expected}"), (code, out, err)
    assert len(err.splitlines()) == 1, err


@contextlib.contextmanager
def publishing_on_tcp():
    """A PUB on a free tcp port of 127.0.0.1 sending cam0's results every 50 ms until the block ends: the port."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.wait(0.05):
            pub.send_multipart(result_frames("cam0", seq))
            seq += 1

    sender = threading.Thread(target=publish)
    sender.start()
    try:
        yield port
    finally:
        stop.set()
        sender.join()
        pub.close()


def test_a_tcp_port_above_65535_is_refused_not_cut_to_another_daemons_port():
    """libzmq cuts the port to 16 bits: port + 65536 reached whatever published on port, and printed its results."""
    with publishing_on_tcp() as port:
        code, out, err = _refused("--endpoint", f"tcp://127.0.0.1:{port + 65536}")
    assert (code, out) == (2, ""), (code, out, err)
    assert err == (f"inspectd subscribe: --endpoint: {DESTINATION_PORT}'tcp://127.0.0.1:{port + 65536}'\n")


@pytest.mark.parametrize("source", ["127.0.0.1:0", "lo:0"])
def test_a_connect_endpoint_naming_the_address_it_leaves_from_is_taken_as_libzmq_takes_it(source):
    """libzmq's tcp://SOURCE;HOST:PORT picks the network a station with two of them subscribes from: the check meant
    for the daemon's binds refused it, asking for an IPv6 host in brackets."""
    with publishing_on_tcp() as port:
        endpoint = f"tcp://{source};127.0.0.1:{port}"
        proc = subprocess.run(
            inspectd_argv("subscribe", "--endpoint", endpoint, "--count", "2", "--timeout", "20"),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("cam0" in line for line in lines), proc.stdout


@pytest.mark.parametrize("camera", ["bad/id", "c" * 65, "live", ""])
def test_a_camera_id_no_daemon_could_have_is_refused_in_one_line(tmp_path, camera):
    """No result can carry such an id (the daemon's config refuses it, and decoders refuse a result naming it): the
    filter would have let nothing through, in silence."""
    code, out, err = _refused("--endpoint", f"ipc://{tmp_path}/pub.sock", "--camera", "cam0", "--camera", camera)
    assert code == 2 and out == "" and err.startswith("inspectd subscribe: --camera: "), (code, out, err)
    assert len(err.splitlines()) == 1 and "expected" in err, err


def test_a_subscriber_started_before_its_daemon_says_so_once_then_that_it_receives(tmp_path):
    """libzmq retries a refused connect in silence: a subscriber started before the daemon (or at a wrong ipc path)
    printed nothing at all, the same as a quiet line. It says once that nothing listens there, and when the daemon
    comes that it receives; a result then prints as ever."""
    endpoint = f"ipc://{tmp_path}/pub.sock"
    proc = subprocess.Popen(
        inspectd_argv("subscribe", "--endpoint", endpoint, "--count", "1", "--timeout", "60"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pub = zmq.Context.instance().socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first == (
            f"inspectd subscribe: --endpoint {endpoint}, expected a running inspectd: no socket file "
            f"{tmp_path}/pub.sock, so no daemon is bound there; waiting for it\n"
        ), first
        pub.bind(endpoint)
        assert pub.poll(20_000) and pub.recv()[0] == 1, "the subscriber never subscribed"
        pub.send_multipart(result_frames("cam0", 0))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.close(0)
    assert proc.returncode == 0, err
    assert out.startswith("cam0 seq=0 ok"), out + err
    assert err == f"inspectd subscribe: --endpoint {endpoint}: connected, receiving\n", err


def test_a_directory_that_is_not_the_journal_is_refused_in_one_line(tmp_path):
    """Any readable directory was taken for the journal, its sub-folders for cameras: the state dir above it
    (`--journal /var/lib/inspectd`, an easy slip) replayed nothing of --since and exited 0, without a word. The
    journal itself, and an empty one a daemon has just made, are still taken."""
    state = tmp_path / "state"
    journal = Journal(state / "journal", max_bytes=1 << 20)
    journal.append("cam0", 0, result_frames("cam0", 0))
    journal.close()
    (state / "archive" / "cam0").mkdir(parents=True)
    endpoint = f"ipc://{tmp_path}/pub.sock"
    code, out, err = _refused("--endpoint", endpoint, "--since", "-1", "--journal", str(state))
    assert (code, out) == (2, ""), (code, out, err)
    assert err == (
        f"inspectd subscribe: journal {state}: not a journal directory (no boot mark, no camera folder with "
        "segments), expected the daemon's publish.journal.path (by default <state_dir>/journal)\n"
    ), err
    from inspectd.protocol.journal import check_readable

    check_readable(state / "journal")
    (tmp_path / "empty").mkdir()
    check_readable(tmp_path / "empty")  # made by a daemon that has not written its boot mark yet
    (tmp_path / "disk" / "lost+found").mkdir(parents=True)
    check_readable(tmp_path / "disk")  # a disk of its own, freshly formatted, before the daemon's first start
    # A journal whose only camera folder holds segments (the boot mark lost) is a journal too.
    (state / "journal" / "boot").unlink()
    (state / "journal" / "clean").unlink(missing_ok=True)
    check_readable(state / "journal")


def test_a_status_whose_uptime_no_timedelta_holds_is_printed_in_seconds(tmp_path):
    """A status with uptime_s past 999999999 days (a foreign or broken publisher) ended `subscribe --status` with an
    OverflowError traceback; the statuses after it were never printed."""
    sub = Inspectd(tmp_path, "--status")
    try:
        for uptime in (5, 1e15, 6):
            doc = {**STATUS, "t": 1795435881.0, "uptime_s": uptime}
            sub.pub.send_multipart(encode_status(STATION, doc))
        printed = [sub.stdout_line() for _ in range(3)]
        out, err = sub.interrupt()
    finally:
        sub.close()
    assert [line.split(",")[1] for line in printed] == [" up 0:00:05", " up 1e+15 s", " up 0:00:06"], printed + [err]
    assert "Traceback" not in err, err


def test_gap_tracker_restarts_counting_where_the_numbering_went_back():
    """A daemon restarted without its journal numbers from 0 again: the tracker kept the old maximum and found no
    hole in the new numbering until it passed that maximum."""
    gaps = subscribe.GapTracker()
    assert [gaps.see("cam0", s) for s in (4998, 4999, 5000)] == [None, None, None]
    assert gaps.see("cam0", 0) is None and gaps.see("cam0", 1) is None
    assert gaps.see("cam0", 20) == (2, 19)
    assert gaps.missed == {"cam0": 18} and gaps.backwards == [("cam0", 5000, 0)]
    assert gaps.see("cam1", 3) is None and gaps.see("cam1", 3) is None  # the same seq again: a new numbering too
    assert gaps.backwards[-1] == ("cam1", 3, 3)


TOPIC_EXPECTED = (
    "expected a prefix of inspect.<station>.<camera>.result, as inspect.line1. (every topic the daemon publishes "
    "starts with inspect.)"
)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--topic", "t1."], f"--topic 't1.': {TOPIC_EXPECTED}"),
        (["--topic", "t1.cam0"], f"--topic 't1.cam0': {TOPIC_EXPECTED}"),
        (["--topic", "inspectt1."], f"--topic 'inspectt1.': {TOPIC_EXPECTED}"),
        (
            ["--topic", "inspect.t1.cam0.result", "--camera", "cam1"],
            "--camera cam1: --topic 'inspect.t1.cam0.result' leaves out its results (inspect.<station>.cam1.result), "
            "expected a topic that takes them",
        ),
        (
            ["--topic", "inspect.t1.ca", "--camera", "cam0", "--camera", "line2"],
            "--camera line2: --topic 'inspect.t1.ca' leaves out its results (inspect.<station>.line2.result), "
            "expected a topic that takes them",
        ),
    ],
)
def test_a_topic_no_result_could_match_is_refused_in_one_line(tmp_path, args, expected):
    """Subscribed as given, it heard nothing at all: waited on in silence (forever without --timeout)."""
    code, out, err = _refused("--endpoint", f"ipc://{tmp_path}/pub.sock", *args)
    assert (code, out, err) == (2, "", f"inspectd subscribe: {expected}\n")


@pytest.mark.parametrize(
    "topic, camera",
    [("", "cam0"), ("insp", "cam0"), ("inspect.", "cam0"), ("inspect.t1.ca", "cam0"), ("inspect.t1.cam0.", "cam0")],
)
def test_a_topic_that_may_match_the_camera_subscribes(tmp_path, topic, camera):
    sub = Inspectd(tmp_path, "--topic", topic, "--camera", camera, "--count", "1")
    try:
        sub.pub.send_multipart(result_frames("cam0", 0))
        out, err = sub.proc.communicate(timeout=30)
    finally:
        sub.close()
    assert sub.proc.returncode == 0 and out.startswith("cam0 seq=0 ok"), (out, err)


def test_a_subscriber_the_socket_files_mode_shuts_out_is_told_so_not_that_no_daemon_runs(open_tmp_path):
    """libzmq retries a connect the socket file's mode refuses (a user outside the daemon's group) as it retries one
    nothing listens to: saying no daemon runs sent the operator to the daemon, not to their groups."""
    from other_user import as_nobody

    path = open_tmp_path / "pub.sock"
    endpoint = f"ipc://{path}"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    path.chmod(0o600)
    proc = subprocess.Popen(
        as_nobody([sys.executable, "-m", "inspectd", "subscribe", "--endpoint", endpoint, "--timeout", "30"]),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait()
        pub.close(0)
    group = grp.getgrgid(os.stat(path).st_gid).gr_name
    assert first == (
        f"inspectd subscribe: --endpoint {endpoint}: the socket file {path} exists but this user may not connect to it "
        f"(mode 0600, group {group}): run as its owner or a member of group {group}; waiting for it\n"
    ), first


def test_a_tcp_endpoint_nothing_listens_on_is_said_once():
    port = free_port()
    done = subprocess.run(
        inspectd_argv("subscribe", "--endpoint", f"tcp://127.0.0.1:{port}", "--count", "1", "--timeout", "3"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"inspectd subscribe: --endpoint tcp://127.0.0.1:{port}: every connection was refused, so nothing listens "
        "there, expected a running inspectd; waiting for it",
        "inspectd subscribe: 0 of 1 results before the timeout",
    ], done.stderr
