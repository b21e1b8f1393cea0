"""The journal catch-up (inspectd.clients.subscribe.JournalCatchUp, CatchUpSubscriber) over a real ZeroMQ PUB/SUB
pair and a real journal written by the daemon's writer: results lost on the way to a subscriber are fetched from the
journal and delivered in order, a restart resumes after a known seq without a duplicate, and what the journal does
not hold either is reported as a gap."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from inspectd.clients.subscribe import CatchUpSubscriber, JournalCatchUp, Subscriber
from inspectd.daemon.journal import Journal
from inspectd.errors import InspectdError
from inspectd.protocol.messages import Result, encode_result, encode_status

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


def result_frames(camera: str, seq: int) -> list[bytes]:
    return encode_result(
        station=STATION,
        camera=camera,
        seq=seq,
        frame_id=f"{camera}-{seq}",
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

    def emit(self, camera: str, seq: int, send: bool = True, journal: bool = True) -> None:
        frames = result_frames(camera, seq)
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
    assert catch_up.missed == [("cam0", 2, 3)] and catch_up.gaps.missed == {"cam0": 2}


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
    replayed = both.resume({"cam0": 4, "cam1": -1})
    assert [(r.camera, r.seq) for r in replayed] == [("cam0", 5)] + [("cam1", s) for s in range(6)]
    # A live result the journal already delivered is dropped; the next one passes.
    line.emit("cam0", 6, send=False)
    assert both.take(replayed[0]) == []
    with pytest.raises(InspectdError, match="no journal directory"):
        JournalCatchUp(None).resume(0)
