"""Frames a producer gets wrong, sent over a real ZeroMQ PUSH socket: to a real daemon, which must stay healthy and
archive the frames around them, or to the real zmq source, whose error results must stay names and short reasons.
And the real archive writer given an entry its index cannot hold."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import zmq
from structlog.testing import capture_logs

from daemon_harness import Station
from inspectd.daemon.archive import Archive
from inspectd.daemon.config import parse_config
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from station_model import defect_frame, judged, write_grey_bundle

pytestmark = pytest.mark.timeout(120)

# What Python's json.dumps writes for os.fsdecode(b"bad\x80name.png"), a file name that is not UTF-8.
SURROGATE_ID = json.dumps("bad\udc80name.png").encode()


def wait_until(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_a_frame_id_with_a_lone_surrogate_is_named_as_the_folder_names_it_and_the_daemon_archives_on(tmp_path):
    bundle = write_grey_bundle(tmp_path / "bundle")
    endpoint = f"ipc://{tmp_path}/frames.sock"
    s = Station(tmp_path, bundle, [{"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint}}])
    push = zmq.Context.instance().socket(zmq.PUSH)
    try:
        s.wait_ready()
        push.linger = 2000
        push.connect(endpoint)
        for i, frame_id in enumerate([b'"d0"', SURROGATE_ID, b'"d2"', b'"d3"', b'"d4"']):
            header = b'{"frame_id":%s,"dtype":"uint8","shape":[64,64]}' % frame_id
            push.send_multipart([header, defect_frame(i).tobytes()])
        results = s.results(5, timeout=60)
        assert [r.frame_id for r in results] == ["d0", "bad\\x80name.png", "d2", "d3", "d4"], s.log_tail()
        assert all(r.verdict == "defect" and r.archive_id for r in results), s.log_tail()
        status = wait_until(
            lambda: (st := s.control({"cmd": "status"}))["archive"]["written"].get("defect") == 5 and st,
            "all five defects archived",
        )
        assert status["healthy"] is True and status["archive"]["lost"] == 0, status
        assert s.stop() == 0, s.log_tail()
    finally:
        push.close()
        s.close()
    assert not s.events("thread_died") and "Traceback" not in s.log_path.read_text(errors="replace")


def test_an_entry_the_index_cannot_hold_is_lost_alone_with_one_line_and_the_writer_goes_on(tmp_path):
    """Whatever the sources let through: one entry that fails for a reason no retry cures is that entry's loss, not
    the archive's end (the daemon would turn unhealthy and be restarted, and every result after it would name an
    archive entry never written)."""
    archive = Archive(tmp_path / "archive", max_mb=100, max_age_h=24, good_every=0).start()
    try:
        items = [judged("cam0", seq, defect_frame(seq)) for seq in range(4)]
        bad = items[1].frame
        items[1].frame = Frame(bad.camera, bad.seq, "odd\ud800", bad.t_capture, bad.image)
        with capture_logs() as logs:
            for item in items:
                assert archive.offer(item) is not None
                time.sleep(0.002)
            wait_until(lambda: sum(archive.status()["written"].values()) + archive.status()["lost"] == 4, "writes")
        status = archive.status()
        assert archive.alive() and status["written"]["defect"] == 3 and status["lost"] == 1, status
        assert status["error"] is None, "one odd entry is not a failing disk"
        failed = [e for e in logs if e["event"] == "archive_entry_failed"]
        assert len(failed) == 1 and failed[0]["seq"] == 1 and failed[0]["frame_id"] == repr("odd\ud800"), failed
        assert "UnicodeEncodeError" in failed[0]["error"] and "\n" not in failed[0]["error"]
    finally:
        archive.close()


@pytest.fixture
def zmq_camera(tmp_path, ingest_threads):
    """A real zmq camera on ipc, its queue, and a PUSH socket connected to it."""
    endpoint = f"ipc://{tmp_path}/cam0.sock"
    cam = parse_config(
        {
            "station": "s",
            "model": {"bundle": "b"},
            "cameras": [{"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint}}],
        }
    ).cameras[0]
    queue = FrameQueue(64, "block")
    ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.connect(endpoint)
    yield queue, push
    push.close()


def frames_of(queue: FrameQueue, push, messages: list[list[bytes]]) -> list[Frame]:
    for parts in messages:
        push.send_multipart(parts)
    wait_until(lambda: len(queue) == len(messages), f"{len(messages)} frames")
    frames = []
    while (frame := queue.get_nowait()) is not None:
        frames.append(frame)
    assert [f.seq for f in frames] == list(range(len(messages)))
    return frames


GOOD = [b'{"frame_id":"good","dtype":"uint8","shape":[4,4]}', bytes(16)]


def test_reasons_are_capped_and_an_over_long_frame_id_is_refused_under_its_first_256_characters(zmq_camera):
    queue, push = zmq_camera
    huge_key = json.dumps({"frame_id": "k", "x" * 1_000_000: 1}).encode()
    huge_camera = json.dumps({"frame_id": "c", "camera": "y" * 2_000_000}).encode()
    long_id = "i" * 3_000_000
    at_bound = "j" * 256
    frames = frames_of(
        queue,
        push,
        [
            [huge_key, bytes(16)],
            [huge_camera, bytes(16)],
            [json.dumps({"frame_id": long_id, "dtype": "uint8", "shape": [4, 4]}).encode(), bytes(16)],
            [json.dumps({"frame_id": at_bound, "dtype": "uint8", "shape": [4, 4]}).encode(), bytes(16)],
            GOOD,
        ],
    )
    assert [f.frame_id for f in frames[:2]] == ["k", "c"]
    for f in frames[:2]:
        assert f.image is None and len(f.error) == 300 and f.error.endswith("..."), f.error[:100]
    assert "unknown header field 'xxx" in frames[0].error
    assert "header camera 'yyy" in frames[1].error
    assert frames[2].frame_id == long_id[:256] and frames[2].image is None
    assert frames[2].error == "frame_id of 3000000 characters, expected at most 256"
    assert frames[3].frame_id == at_bound and frames[3].error is None
    assert frames[4].frame_id == "good" and frames[4].error is None


def test_a_reason_for_a_frame_named_by_control_characters_still_says_what_was_wrong(zmq_camera):
    """Escaped, an id of 80 control characters filled the whole capped reason."""
    queue, push = zmq_camera
    odd = "\x01" * 80
    (frame,) = frames_of(
        queue, push, [[json.dumps({"frame_id": odd, "dtype": "uint8", "shape": [4, 5]}).encode(), bytes(16)]]
    )
    assert frame.image is None and frame.frame_id == odd
    assert "expected" in frame.error and len(frame.error) < 300, frame.error


def test_a_header_key_given_twice_is_refused_naming_it(zmq_camera):
    queue, push = zmq_camera
    frames = frames_of(
        queue,
        push,
        [
            [b'{"frame_id":"dupA","frame_id":"dupB","dtype":"uint8","shape":[4,4]}', bytes(16)],
            [b'{"frame_id":"f","dtype":"float32","dtype":"uint8","shape":[4,4]}', bytes(16)],
            GOOD,
        ],
    )
    assert [f.frame_id for f in frames] == ["msg1", "msg2", "good"]
    assert frames[0].image is None and "key 'frame_id' given twice" in frames[0].error, frames[0].error
    assert frames[1].image is None and "key 'dtype' given twice" in frames[1].error, frames[1].error
    assert frames[2].error is None


def test_frame_ids_with_lone_surrogates_become_encodable_or_are_refused(zmq_camera):
    queue, push = zmq_camera
    frames = frames_of(
        queue,
        push,
        [
            [b'{"frame_id":%s,"dtype":"uint8","shape":[4,4]}' % SURROGATE_ID, bytes(16)],
            [b'{"frame_id":"high\\ud800","dtype":"uint8","shape":[4,4]}', bytes(16)],
            GOOD,
        ],
    )
    assert frames[0].frame_id == "bad\\x80name.png" and frames[0].error is None
    assert frames[1].frame_id == "msg2" and "lone surrogate" in frames[1].error, frames[1].error
    for f in frames:
        f.frame_id.encode("utf-8")
        json.dumps(f.frame_id, ensure_ascii=False).encode("utf-8")
        assert f.error is None or f.error.isprintable()


def test_a_16_bit_png_declared_uint8_is_refused_naming_both(zmq_camera):
    """Accepted and narrowed unsaid, a producer sending 16-bit PNGs it believed narrowed to 8 bits never learnt it.
    "uint16" is a ceiling (a producer of mixed depths may state it for every frame): an 8-bit PNG under it is taken."""
    queue, push = zmq_camera
    sixteen = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    png16 = cv2.imencode(".png", sixteen)[1].tobytes()
    png8 = cv2.imencode(".png", (sixteen >> 8).astype(np.uint8))[1].tobytes()

    def header(frame_id: str, **fields) -> bytes:
        return json.dumps({"frame_id": frame_id, "encoding": "png", **fields}).encode()

    frames = frames_of(
        queue,
        push,
        [
            [header("a", dtype="uint8"), png16],
            [header("b", dtype="uint16"), png8],
            [header("c", dtype="uint16"), png16],
            [header("d", dtype="uint8"), png8],
            [header("e"), png16],  # no dtype: the PNG's own depth is taken
            [header("f", dtype="uint8"), b"\x89PNG\r\n\x1a\n" + bytes(30)],  # no IHDR: refused as not a PNG
        ],
    )
    assert [f.frame_id for f in frames] == list("abcdef")
    assert frames[0].image is None
    assert frames[0].error == 'frame a: dtype "uint8" for a png of bit depth 16, expected "uint16" (or no dtype)'
    for f in frames[1:5]:
        assert f.error is None and f.image.shape == (64, 64) and f.image.dtype == np.uint8, f.error
    assert frames[5].image is None and "dtype" not in frames[5].error, frames[5].error


def test_an_empty_frame_id_is_refused_as_a_missing_one_is_under_its_message_number(zmq_camera):
    queue, push = zmq_camera
    frames = frames_of(
        queue,
        push,
        [
            [b'{"frame_id":"","dtype":"uint8","shape":[4,4]}', bytes(16)],
            [b'{"frame_id":0,"dtype":"uint8","shape":[4,4]}', bytes(16)],
            GOOD,
        ],
    )
    assert [f.frame_id for f in frames] == ["msg1", "0", "good"]
    assert frames[0].image is None
    assert frames[0].error == "frame msg1: frame_id is empty, expected a non-empty string or an integer"
    assert frames[1].error is None and frames[2].error is None
