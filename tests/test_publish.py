"""Wire format, publisher and `inspectd subscribe` over real ZeroMQ sockets (ipc in a tmp dir, tcp on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import structlog.testing
import zmq

from cli_child import inspectd_argv
from inspectd.clients.subscribe import GapTracker, Subscriber
from inspectd.daemon.frames import Frame
from inspectd.daemon.inference import Judged
from inspectd.daemon.journal import Journal
from inspectd.daemon.publish import Publisher
from inspectd.errors import MessageError
from inspectd.protocol.messages import (
    Region,
    decode,
    decode_result,
    decode_status,
    encode_mask,
    encode_result,
    encode_status,
)

pytestmark = pytest.mark.timeout(60)


def make_result(**overrides):
    fields = dict(
        station="line1",
        camera="cam0",
        seq=5,
        frame_id="f5.png",
        t_capture=1.5,
        t_publish=2.5,
        verdict="defect",
        score=0.9,
        threshold=0.5,
        model_id="frozen-lite0-abc",
        thresholds_version=2,
        regions=[Region(1, 2, 3, 4, 10, 0.8)],
        latency_ms=12.25,
        width=6,
        height=5,
    )
    fields.update(overrides)
    return fields


def test_result_round_trip_with_mask():
    mask = np.zeros((5, 6), bool)
    mask[2:4, 1:4] = True
    frames = encode_result(**make_result(truth=True, mask_png=encode_mask(mask)))
    assert frames[0] == b"inspect.line1.cam0.result"
    result = decode_result(frames)
    assert (result.camera, result.seq, result.verdict, result.thresholds_version) == ("cam0", 5, "defect", 2)
    assert result.regions == (Region(1, 2, 3, 4, 10, 0.8),) and result.truth is True and result.has_mask
    np.testing.assert_array_equal(result.mask(), mask)
    assert json.loads(frames[1])["has_mask"] is True


def test_error_result_has_reason_and_no_score():
    frames = encode_result(
        **make_result(
            verdict="error", score=None, threshold=None, regions=[], width=None, height=None, error="decode: not a JPEG"
        )
    )
    result = decode(frames)
    assert result.verdict == "error" and result.error == "decode: not a JPEG" and result.score is None
    assert result.mask() is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f[:1], "expected [topic, header]"),
        (lambda f: [f[0], b"\xff\xfe", *f[2:]], "header: not JSON"),
        (lambda f: [f[0], b"[1]"], "expected a JSON object"),
        (lambda f: [b"inspect.line1.cam9.result", f[1]], "topic"),
        (lambda f: [b"inspect.line1.a\x00b.result", _patch(f[1], camera="a\x00b")], "header.camera: 'a"),
        (lambda f: [b"inspect.line1.../x.result", _patch(f[1], camera="../x")], "expected a camera id"),
        (lambda f: [f[0], _patch(f[1], schema=2)], "schema"),
        # PROTOCOL.md: schema is the int 1; true and 1.0 equal 1 only to Python.
        (lambda f: [f[0], _patch(f[1], schema=True)], "header.schema: True"),
        (lambda f: [f[0], _patch(f[1], schema=1.0)], "header.schema: 1.0"),
        (lambda f: [f[0], _patch(f[1], seq="5")], "header.seq: expected int"),
        (lambda f: [f[0], _patch(f[1], verdict="maybe")], "header.verdict"),
        (lambda f: [f[0], _patch(f[1], score=True)], "header.score"),
        (lambda f: [f[0], _patch(f[1], has_mask=True)], "has_mask is true but 2 frames"),
        (lambda f: [f[0], _patch(f[1], error="x")], "exactly when verdict is 'error'"),
        (lambda f: [f[0], _patch(f[1], regions=[{"x": 1}])], "regions[0]: missing"),
        (lambda f: [f[0], _patch(f[1], colour="red")], "unknown field 'colour'"),
        (lambda f: [f[0], _drop(f[1], "frame_id")], "missing field 'frame_id'"),
    ],
)
def test_malformed_results_are_refused_by_name(mutate, message):
    frames = encode_result(**make_result())
    with pytest.raises(MessageError, match=message.replace("[", r"\[").replace("(", r"\(")):
        decode_result(mutate(frames))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"score": float("nan")}, "result header.score"),
        ({"score": float("inf")}, "result header.score"),
        ({"threshold": float("-inf")}, "result header.threshold"),
        ({"regions": [Region(1, 2, 3, 4, 10, float("inf"))]}, "result header.regions[0].peak"),
    ],
)
def test_a_non_finite_number_is_never_written_as_json_nan_or_infinity(overrides, key):
    """Python's json writes NaN and Infinity, which are not JSON: every decoder of ours (and the PLC bridges)
    would refuse the whole message, so the encoder refuses it by name instead of sending it."""
    with pytest.raises(MessageError, match=key.replace("[", r"\[") + ": not a finite number"):
        encode_result(**make_result(**overrides))
    status = {"t": 1.0, "uptime_s": 1.0, "healthy": True, "model_id": "m", "thresholds_version": 1, "cameras": {}}
    with pytest.raises(MessageError, match=r"status message.throughput_fps: not a finite number"):
        encode_status("line1", {**status, "throughput_fps": float("nan")})


def test_mask_of_wrong_size_is_refused():
    frames = encode_result(**make_result(mask_png=encode_mask(np.ones((7, 7), bool))))
    with pytest.raises(MessageError, match="expected the frame's 6x5"):
        decode_result(frames).mask()


def _patch(header: bytes, **changes) -> bytes:
    return json.dumps({**json.loads(header), **changes}).encode()


def _drop(header: bytes, key: str) -> bytes:
    doc = json.loads(header)
    doc.pop(key)
    return json.dumps(doc).encode()


def test_status_round_trip():
    status = {
        "t": 1.0,
        "uptime_s": 3.0,
        "healthy": True,
        "model_id": "m",
        "thresholds_version": 1,
        "throughput_fps": 10.0,
        "cameras": {"cam0": {"frames_in": 3, "dropped": 0, "errors": 0, "published": 3}},
    }
    frames = encode_status("line1", status)
    assert frames[0] == b"inspect.line1.status"
    assert decode(frames)["cameras"]["cam0"]["published"] == 3
    with pytest.raises(MessageError, match="missing field 'healthy'"):
        encode_status("line1", {k: v for k, v in status.items() if k != "healthy"})
    with pytest.raises(MessageError, match="status topic"):
        decode_status([b"inspect.other.status", frames[1]])


@pytest.mark.parametrize("schema", [True, 1.0, "1"])
def test_a_status_whose_schema_is_not_the_int_1_is_refused(schema):
    status = {"t": 1.0, "uptime_s": 3.0, "healthy": True, "model_id": "m", "thresholds_version": 1,
              "throughput_fps": 10.0, "cameras": {}}  # fmt: skip
    frames = encode_status("line1", status)
    assert decode_status(frames)["schema"] == 1
    with pytest.raises(MessageError, match=r"^status message\.schema: "):
        decode_status([frames[0], _patch(frames[1], schema=schema)])


# A threshold as calibrate writes it: a float32 step above the top good score, at full precision.
THRESHOLD = 0.32843918234


@pytest.mark.parametrize("score", [THRESHOLD - 1e-7, np.nextafter(THRESHOLD, 0), THRESHOLD, THRESHOLD + 1e-8])
def test_the_published_score_and_threshold_agree_with_the_verdict_a_hair_either_side(score):
    """PROTOCOL.md: verdict is defect exactly when score >= threshold. The score went out rounded to 6 decimals
    and the threshold did not, so within 5e-7 of the threshold the header contradicted its own verdict."""
    verdict = "defect" if score >= THRESHOLD else "ok"
    result = decode_result(encode_result(**make_result(verdict=verdict, score=score, threshold=THRESHOLD)))
    assert (result.score >= result.threshold) == (result.verdict == "defect"), (result.score, result.threshold)
    assert result.score == score  # what the verdict was taken on, not a neighbour of it


def judged(seq: int, verdict: str = "ok", size=(48, 64), camera: str = "cam0") -> Judged:
    image = np.zeros(size, np.uint8)
    frame = Frame(
        camera, seq, f"{camera}-{seq}", time.time(), image, truth=verdict == "defect", t_ingest=time.monotonic()
    )
    mask = None
    regions = []
    if verdict == "defect":
        mask = np.zeros(size, bool)
        mask[10:20, 30:40] = True
        regions = [Region(30, 10, 10, 10, 100, 0.9)]
    return Judged(frame, verdict, 0.9 if verdict == "defect" else 0.1, 0.5, "m-1", 1, regions, mask)


def test_publisher_sends_every_result_in_order_with_masks(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(
        endpoint,
        "line1",
        status_interval_s=0.2,
        status=_status,
    ).start()
    with Subscriber(endpoint) as sub:
        _wait_connected(sub, publisher)
        for seq in range(1, 41):
            publisher.submit(judged(seq, "defect" if seq % 4 == 0 else "ok"))
        results = sub.results(40, timeout_s=10)
    assert publisher.stop(timeout=5)
    assert [r.seq for r in results if r.seq >= 1][:40] == list(range(1, 41))
    defects = [r for r in results if r.verdict == "defect"]
    assert len(defects) == 10 and all(r.has_mask for r in defects)
    assert not any(r.has_mask for r in results if r.verdict == "ok")
    mask = defects[0].mask()
    assert mask.shape == (48, 64) and mask.sum() == 100 and mask[10:20, 30:40].all()
    assert all(r.latency_ms >= 0 and r.truth is (r.verdict == "defect") for r in results)
    assert publisher.cameras["cam0"].defect == 10


def _wait_connected(sub: Subscriber, publisher: Publisher) -> None:
    """PUB/SUB joins late: probe with seq-0 results until one arrives so the test's own results are not lost."""
    for _ in range(100):
        publisher.submit(judged(0))
        message = sub.recv(0.05)
        if message is not None:
            break
    else:
        raise AssertionError("subscriber never connected")
    while sub.recv(0.05) is not None:
        pass


def test_stuck_subscriber_never_blocks_the_publisher(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(endpoint, "line1", sndhwm=10, queue_size=8, status=None).start()
    ctx = zmq.Context.instance()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 10)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt_string(zmq.SUBSCRIBE, "")
    stuck.connect(endpoint)
    time.sleep(0.2)
    t0 = time.monotonic()
    for seq in range(3000):  # never read: the publisher must drop, not wait
        publisher.submit(judged(seq, "defect", size=(120, 160)))
    assert publisher.stop(timeout=10)
    assert time.monotonic() - t0 < 10
    received = 0
    while stuck.poll(100):
        stuck.recv_multipart()
        received += 1
    stuck.close(0)
    assert publisher.published == 3000 and received < 3000


def test_gap_tracker_reports_missing_ranges():
    gaps = GapTracker()
    assert gaps.see("cam0", 3) is None
    assert gaps.see("cam0", 4) is None
    assert gaps.see("cam0", 8) == (5, 7)
    assert gaps.see("cam1", 0) is None
    assert gaps.missed == {"cam0": 3}


def subscribe_saving_masks(port: int, masks: Path) -> subprocess.Popen:
    """`inspectd subscribe` for 3 results from the local port, saving their masks in `masks`."""
    return subprocess.Popen(
        [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", f"tcp://127.0.0.1:{port}"]
        + ["--count", "3", "--timeout", "20", "--save-masks", str(masks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_subscribe_command_prints_results_gaps_and_saves_masks(tmp_path):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)  # a PUB that tells when the subscriber's subscription has arrived
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    masks = tmp_path / "masks"
    proc = subscribe_saving_masks(port, masks)
    mask = np.zeros((5, 6), bool)
    mask[1, 1] = True
    try:
        assert pub.poll(20_000), "the subscriber never subscribed"
        assert pub.recv()[0] == 1  # its subscription: from here on it receives everything sent, once
        for seq in (1, 2, 5):
            pub.send_multipart(encode_result(**make_result(seq=seq, mask_png=encode_mask(mask))))
        out, err = proc.communicate(timeout=30)
    finally:
        pub.close(0)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith("cam0 seq=") and "defect" in line for line in lines)
    assert [int(line.split()[1][4:]) for line in lines] == [1, 2, 5]
    assert "gap: seq 3-4 on cam0 (2 results): lost on the way (no journal to fill it from)" in err
    saved = sorted(masks.glob("cam0_*.png"))
    assert saved and decode_result(encode_result(**make_result(mask_png=saved[0].read_bytes()))).mask()[1, 1]


def test_subscribe_refuses_a_save_masks_dir_it_cannot_create_in_one_line(tmp_path):
    not_a_dir = tmp_path / "masks"
    not_a_dir.write_text("")
    for target in (not_a_dir, not_a_dir / "sub"):
        proc = subprocess.run(
            [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", f"ipc://{tmp_path}/none"]
            + ["--timeout", "0.5", "--save-masks", str(target)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        line = proc.stderr.strip()
        assert proc.returncode == 2 and "\n" not in line, proc.stderr
        assert f"--save-masks {target}: cannot create it" in line and "expected a directory" in line, line


def test_a_mask_that_cannot_be_written_is_reported_once_and_the_results_keep_coming(tmp_path):
    """A full disk or a removed directory loses the pictures, never the verdicts a long-running subscriber prints."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    masks = tmp_path / "masks"
    proc = subscribe_saving_masks(port, masks)
    mask = np.zeros((5, 6), bool)
    mask[1, 1] = True
    try:
        assert pub.poll(20_000), "the subscriber never subscribed"
        assert pub.recv()[0] == 1
        masks.rmdir()  # created at start; gone now, so every write fails for the same cause
        for seq in (1, 2, 3):
            pub.send_multipart(encode_result(**make_result(seq=seq, mask_png=encode_mask(mask))))
        out, err = proc.communicate(timeout=30)
    finally:
        pub.close(0)
    assert proc.returncode == 0, err
    assert [int(line.split()[1][4:]) for line in out.splitlines()] == [1, 2, 3]
    reports = [line for line in err.splitlines() if "--save-masks" in line]
    assert len(reports) == 1 and "cannot write" in reports[0] and "Traceback" not in err, err


def test_subscribe_command_json_and_timeout(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspectd",
            "subscribe",
            "--endpoint",
            f"ipc://{tmp_path}/none",
            "--count",
            "1",
            "--timeout",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "0 of 1 results" in proc.stderr


def test_subscribe_refuses_an_endpoint_zeromq_cannot_use_in_one_line():
    """A wildcard port the daemon's config takes for its bind, which no connect can take: refused by the rule every
    client applies, in the same words. One the config refuses is refused in the config's words."""
    out = subprocess.run(
        [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", "tcp://127.0.0.1:*", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0] == (
        "inspectd subscribe: --endpoint: expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535 "
        "(* and 0 are only for a bind), got 'tcp://127.0.0.1:*'"
    ), lines
    out = subprocess.run(
        [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", "127.0.0.1:5556", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and out.stderr == (
        "inspectd subscribe: --endpoint: expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH), got "
        "'127.0.0.1:5556'\n"
    ), out.stderr


def test_an_unencodable_mask_still_publishes_the_verdict(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    publisher = Publisher(endpoint, "line1", status=None).start()
    with Subscriber(endpoint) as sub:
        _wait_connected(sub, publisher)
        broken = judged(1, "defect")
        broken.mask = np.zeros((4, 4, 7), np.float64)  # no PNG can hold this
        publisher.submit(broken)
        publisher.submit(judged(2, "defect"))
        results = sub.results(2, timeout_s=10)
    assert publisher.stop(timeout=5)
    assert [(r.seq, r.verdict, r.has_mask) for r in results] == [(1, "defect", False), (2, "defect", True)]
    assert publisher.failed == 1


def _wait(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.02)


def _events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def test_a_failed_rebind_keeps_journalling_and_binds_again_once_it_can(tmp_path):
    sockets = tmp_path / "run"
    sockets.mkdir()
    endpoint = f"ipc://{sockets}/pub.sock"
    journal = Journal(tmp_path / "j", max_bytes=1 << 20)
    publisher = Publisher(endpoint, "line1", status=None, queue_size=4, journal=journal).start()
    with structlog.testing.capture_logs() as logs:
        # The socket's directory goes (a tmpfiles clean-up, a mistaken rm): the rebind a reload asks for fails.
        shutil.rmtree(sockets)
        publisher.drop_peers()
        _wait(lambda: _events(logs, "publish_rebind_failed"), "the failed rebind's log line")
        # More results than the queue holds: each is journalled, none waits for the endpoint.
        submitter = threading.Thread(target=lambda: [publisher.submit(judged(s)) for s in range(1, 11)], daemon=True)
        submitter.start()
        submitter.join(10)
        assert not submitter.is_alive(), "submit() blocked behind a publishing thread that is gone"
        _wait(lambda: journal.last_seq("cam0") == 10, "results journalled while unbound")
        assert publisher.alive() and not publisher.bound
        sockets.mkdir()
        _wait(lambda: publisher.bound, "the bind tried again")
    with Subscriber(endpoint) as sub:
        _wait_connected(sub, publisher)
        publisher.submit(judged(11))
        assert [r.seq for r in sub.results(1, timeout_s=10)] == [11]
    assert publisher.stop(timeout=5)
    assert [s for s, _ in journal.read_since("cam0", 0)][:10] == list(range(1, 11))
    assert len(_events(logs, "publish_rebind_failed")) == 1 and len(_events(logs, "publish_bound_again")) == 1
    assert publisher.rebinds == 1 and publisher.failed == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit, on purpose
def test_a_publishing_thread_that_ended_blocks_no_submit_and_its_stop_is_not_clean(tmp_path):
    release = threading.Event()

    def end_the_thread(judged, latency_ms):
        release.wait(10)
        raise SystemExit  # whatever ends the thread (not an Exception, which it survives)

    publisher = Publisher(
        f"ipc://{tmp_path}/pub.sock", "line1", status=None, queue_size=8, on_published=end_the_thread
    ).start()
    with structlog.testing.capture_logs() as logs:
        for seq in range(4):  # 0 ends the thread once released; 1..3 are queued behind it
            publisher.submit(judged(seq))
        release.set()
        _wait(lambda: not publisher.alive(), "the publishing thread's end")
        # More than the queue has room for: none may block the inference thread (or the shutdown) for good.
        submitter = threading.Thread(target=lambda: [publisher.submit(judged(s)) for s in range(4, 20)], daemon=True)
        submitter.start()
        submitter.join(10)
        assert not submitter.is_alive(), "submit() blocked behind a publishing thread that is gone"
        t0 = time.monotonic()
        assert publisher.stop(timeout=5) is False
        assert time.monotonic() - t0 < 5
    dropped = sorted((e["camera"], e["seq"]) for e in _events(logs, "publish_dropped"))
    assert dropped == [("cam0", seq) for seq in range(1, 20)]  # each accepted frame without a result, by name
    assert publisher.published == 1 and publisher.failed == 19


def test_stop_returns_within_its_timeout_while_the_thread_is_stuck_in_the_disk(tmp_path):
    journal = Journal(tmp_path / "j", max_bytes=1 << 20)
    # A FIFO where the segment goes: opening it blocks in the kernel until a peer opens the other end, as a write
    # to a failing card or a lost NFS server blocks.
    (tmp_path / "j" / "cam0").mkdir()
    fifo = tmp_path / "j" / "cam0" / f"{0:012d}.seg"
    os.mkfifo(fifo)
    publisher = Publisher(f"ipc://{tmp_path}/pub.sock", "line1", status=None, queue_size=2, journal=journal).start()
    try:
        for seq in range(3):  # 0 is taken by the stuck thread, 1 and 2 fill the queue
            publisher.submit(judged(seq))
        stopped: list[bool] = []
        stopper = threading.Thread(target=lambda: stopped.append(publisher.stop(timeout=1.0)), daemon=True)
        t0 = time.monotonic()
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive(), "stop(timeout=1.0) still waiting after 10 s"
        assert stopped == [False] and 0.9 <= time.monotonic() - t0 < 5
    finally:
        # The disk comes back: a writer lets the stuck open of the segment (to read its records) return, and an
        # open reader the append's open after it.
        deadline = time.monotonic() + 10
        while True:
            try:  # ENXIO until the thread's open is waiting for a writer
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            # Nothing queued was lost: the results go out once the stop gets through.
            assert publisher.stop(timeout=10)
            assert publisher.published == 3
        finally:
            os.close(reader)


def test_a_socket_option_libzmq_refuses_is_a_one_line_error_naming_the_endpoint(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    with pytest.raises(OSError, match=r"^publish.endpoint '.*pub.sock': cannot set its security options \("):
        Publisher(endpoint, "line1", socket_options=lambda sock: setattr(sock, "curve_secretkey", b"short"))
    assert not (tmp_path / "pub.sock").exists()


class Producer:
    """A daemon's PUB end (an XPUB, which tells when the subscription arrived) and `inspectd subscribe` on it."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        endpoint = f"ipc://{tmp_path}/pub.sock"
        self.pub = zmq.Context.instance().socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(endpoint)
        self.proc = subprocess.Popen(
            inspectd_argv("subscribe", "--endpoint", endpoint, *flags),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.pub.poll(20_000) and self.pub.recv()[0] == 1, "the subscriber never subscribed"

    def send(self, **overrides) -> None:
        self.pub.send_multipart(encode_result(**make_result(**overrides)))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.pub.close(0)


def test_subscribe_shows_a_frame_id_or_error_that_is_not_printable_quoted_on_its_own_line(tmp_path):
    """A producer names the frame: a lone surrogate (a Python producer's undecodable file name, as json.dumps sends
    it) cannot be written as UTF-8, a newline would forge a result line, an escape code would reach the terminal."""
    producer = Producer(tmp_path, "--count", "4", "--timeout", "20")
    try:
        producer.send(seq=1, frame_id="\ud800bad")
        producer.send(seq=2, frame_id="x\ncam0 seq=999 defect score=9.9999 regions=0 latency=0.0ms frame=forged")
        producer.send(seq=3, frame_id="\x1b[31mRED\x1b[0m")
        producer.send(seq=4, verdict="error", score=None, threshold=None, regions=[], error="engine:\x1b[2J\nboom")
        out, err = producer.proc.communicate(timeout=30)
    finally:
        producer.close()
    assert producer.proc.returncode == 0, err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["seq=1", "seq=2", "seq=3", "seq=4"], out
    assert lines[0].endswith(r"frame='\ud800bad'"), lines[0]
    assert lines[1].endswith(r"frame='x\ncam0 seq=999 defect score=9.9999 regions=0 latency=0.0ms frame=forged'")
    assert lines[2].endswith(r"frame='\x1b[31mRED\x1b[0m'") and "\x1b" not in out, lines[2]
    assert lines[3].endswith(r"error='engine:\x1b[2J\nboom'"), lines[3]


def test_subscribe_whose_reader_closed_the_pipe_ends_quietly_with_the_sigpipe_status(tmp_path):
    """`inspectd subscribe | head -1`: the shell's status for a writer SIGPIPE ended (141), no traceback."""
    producer = Producer(tmp_path)
    try:
        producer.send(seq=1)
        assert producer.proc.stdout is not None and producer.proc.stdout.readline().startswith("cam0 seq=1 ")
        producer.proc.stdout.close()  # what head does after its line
        deadline = time.monotonic() + 10
        seq = 2
        while producer.proc.poll() is None and time.monotonic() < deadline:
            producer.send(seq=seq)
            seq += 1
            time.sleep(0.05)
        assert producer.proc.poll() is not None, "still running after its stdout was closed"
        assert producer.proc.stderr is not None
        err = producer.proc.stderr.read()
    finally:
        producer.close()
    assert producer.proc.returncode == 141 and err == "", err


@pytest.mark.parametrize(
    ("sig", "how", "code"), [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "stopped by SIGTERM", 143)]
)
def test_subscribe_stopped_by_a_signal_prints_what_it_missed_and_exits_as_every_command(tmp_path, sig, how, code):
    """Ctrl-C, and SIGTERM (a supervisor's stop): the missed-results summary, no "before the timeout" where none was
    given, and the status every other command gives on that signal."""
    producer = Producer(tmp_path, "--count", "10")
    try:
        for seq in (1, 2, 5):
            producer.send(seq=seq)
        assert producer.proc.stdout is not None
        printed = [producer.proc.stdout.readline() for _ in range(3)]
        producer.proc.send_signal(sig)
        out, err = producer.proc.communicate(timeout=30)
    finally:
        producer.close()
    assert [line.split()[1] for line in printed] == ["seq=1", "seq=2", "seq=5"] and out == ""
    assert producer.proc.returncode == code, err
    assert err.splitlines()[-2:] == [
        "inspectd subscribe: 3 results, missed cam0: 2",
        f"inspectd subscribe: {how}",
    ], err
    assert "timeout" not in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_subscribe_refuses_a_timeout_that_is_not_a_number_of_seconds_above_zero(tmp_path, value):
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "subscribe", "--endpoint", f"ipc://{tmp_path}/none", "--timeout", value],
        capture_output=True,
        text=True,
        timeout=20,  # a NaN deadline is never reached: the subscriber would poll for ever
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("inspectd subscribe: --timeout ") and "expected a number of seconds > 0" in lines[0]


def test_subscribe_camera_keeps_only_that_cameras_results_and_gaps(tmp_path):
    producer = Producer(tmp_path, "--camera", "cam0", "--count", "3", "--timeout", "20")
    try:
        for camera, seq in [("cam1", 1), ("cam0", 1), ("cam1", 2), ("cam1", 5), ("cam0", 2), ("cam0", 3)]:
            producer.send(camera=camera, seq=seq)
        out, err = producer.proc.communicate(timeout=30)
    finally:
        producer.close()
    assert producer.proc.returncode == 0, err
    assert [line.split()[:2] for line in out.splitlines()] == [["cam0", "seq=1"], ["cam0", "seq=2"], ["cam0", "seq=3"]]
    assert err == "", err  # cam1 is left out: its hole 3-4 is not reported either


def _status() -> dict:
    return {
        "t": time.time(),
        "uptime_s": 1.0,
        "healthy": True,
        "model_id": "m-1",
        "thresholds_version": 1,
        "throughput_fps": 0.0,
        "cameras": {},
    }


def test_a_removed_publish_socket_file_is_bound_again_and_connected_subscribers_keep_theirs(tmp_path):
    """An operator or a tmp cleaner removing the socket file shut out every new subscriber (`subscribe`, the web view,
    a restarted PLC bridge), while the daemon logged nothing and stayed healthy. The path is bound again at the next
    status tick, on the same socket: the subscriber connected before keeps receiving, with no gap."""
    path = tmp_path / "pub.sock"
    endpoint = f"ipc://{path}"
    publisher = Publisher(endpoint, "line1", status_interval_s=0.1, status=_status).start()
    try:
        with structlog.testing.capture_logs() as logs, Subscriber(endpoint) as old:
            _wait_connected(old, publisher)
            for round_ in range(2):  # a second removal is found too
                path.unlink()
                _wait(lambda: path.exists(), "the socket file bound again")
                _wait(lambda n=round_ + 1: len(_events(logs, "socket_file_rebound")) == n, "its log line")
                assert oct(path.stat().st_mode & 0o777) == "0o660"  # the group's subscribers may connect
            with Subscriber(endpoint) as new:
                _wait(lambda: new.recv(0.1) is not None, "a new subscriber's first message")
                while old.recv(0) is not None:
                    pass
                for seq in range(1, 6):
                    publisher.submit(judged(seq))
                assert [r.seq for r in new.results(5, timeout_s=10)] == [1, 2, 3, 4, 5]
                assert [r.seq for r in old.results(5, timeout_s=10)] == [1, 2, 3, 4, 5]
        event = _events(logs, "socket_file_rebound")[0]
        assert event["log_level"] == "warning" and event["error"] == (
            f"{endpoint}: its socket file is gone (No such file or directory), expected it there while bound: new "
            "subscribers could not connect, bound again"
        ), event
        assert publisher.rebinds == 0 and publisher.bound  # no subscriber was disconnected
    finally:
        assert publisher.stop(timeout=5)


def test_a_publish_socket_file_removed_again_and_again_is_bound_afresh(tmp_path, monkeypatch):
    """Each bind in place leaves a listener on the removed file: past the limit the endpoint is unbound (closing
    them all) and bound afresh, the subscribers reconnecting by themselves."""
    from inspectd.daemon import socket_file

    monkeypatch.setattr(socket_file, "MAX_REBINDS", 1)
    path = tmp_path / "pub.sock"
    endpoint = f"ipc://{path}"
    publisher = Publisher(endpoint, "line1", status_interval_s=0.1, status=_status).start()
    try:
        with structlog.testing.capture_logs() as logs:
            path.unlink()
            _wait(lambda: len(_events(logs, "socket_file_rebound")) == 1, "the bind in place")
            path.unlink()
            _wait(lambda: publisher.rebinds == 1, "the endpoint bound afresh")
            _wait(lambda: path.exists(), "the socket file")
            path.unlink()  # counted from the fresh bind: bound in place again
            _wait(lambda: len(_events(logs, "socket_file_rebound")) == 3 and path.exists(), "the bind in place")
        with Subscriber(endpoint) as sub:
            _wait_connected(sub, publisher)
        assert publisher.rebinds == 1 and [e["reason"] for e in _events(logs, "publish_rebound")] == [
            "its socket file was removed too often"
        ]
    finally:
        assert publisher.stop(timeout=5)
