"""The opencv camera source on real video files written by cv2.VideoWriter, and its declaration through the real
config loader."""

from __future__ import annotations

import functools
import http.server
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from inspectd.daemon.config import load_config
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest import opencv
from inspectd.daemon.ingest.opencv import FFMPEG_SCHEMES, MAX_DEVICE, VideoCaptureSource, gstreamer_built_in
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.source import SourceEnded
from inspectd.daemon.ingest.supervisor import CameraIngest
from inspectd.errors import ConfigError
from ports import free_port
from test_ingest import camera, drain, wait_for

pytestmark = pytest.mark.timeout(60)
FRAMES = 12


def write_video(path: Path) -> Path:
    """MJPG frames whose green bar grows by 4 pixels a frame, so each frame's place in the file can be read back."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    assert writer.isOpened()
    for i in range(FRAMES):
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, : 4 + 4 * i, 1] = 255
        writer.write(image)
    writer.release()
    return path


def bar(frame: Frame) -> int:
    """Which frame of the file this is, from its green bar's width."""
    return (int((frame.image[24, :, 1] > 128).sum()) - 4) // 4


def corrupt_frame(path: Path, *indices: int) -> None:
    """Overwrite the start of the JPEG of each frame `indices` names (its SOI marker and headers) with zeros, as a bad
    sector or a cut write leaves it: FFmpeg cannot decode that frame and goes on with the next."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
    assert len(starts) == FRAMES, len(starts)
    for index in indices:
        data[starts[index] : starts[index] + 200] = bytes(200)
    path.write_bytes(bytes(data))


def test_an_undecodable_frame_in_a_video_file_is_its_own_error_and_the_file_plays_on(tmp_path, ingest_threads):
    path = write_video(tmp_path / "line.avi")
    corrupt_frame(path, 5)
    queue = FrameQueue(32, "block")
    ingest = CameraIngest(camera({"kind": "opencv", "url": str(path)}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["state"] == "ended"), ingest.stats()
    frames = drain(queue)
    assert [f.frame_id for f in frames] == [str(i) for i in range(FRAMES)]
    assert frames[5].image is None and frames[5].error == "frame 5: empty frame from VideoCapture (undecodable)"
    good = [f for f in frames if f.error is None]
    assert [bar(f) for f in good] == [i for i in range(FRAMES) if i != 5]  # each id names its place in the file
    assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["errors"] == 1


def test_frames_a_stop_leaves_queued_behind_an_undecodable_run_are_each_logged_as_not_accepted(
    tmp_path, ingest_threads
):
    """Frames 1 and 2 do not decode: reading frame 3 queues their error frames ahead of it in the source. A stop while
    the first waits for room in a full `block` queue refuses that one (frame_not_accepted, as ever); the error frame
    and the whole frame 3 still held in the source vanished without a line. Each must be logged as not accepted, and
    lost (a video frame is not given again)."""
    path = write_video(tmp_path / "line.avi")
    corrupt_frame(path, 1, 2)
    queue = FrameQueue(1, "block")
    ingest = CameraIngest(camera({"kind": "opencv", "url": str(path)}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    with capture_logs() as logs:
        ingest.start()
        # Frame 0 fills the queue; frame 1's error waits for room, frame 2's and frame 3 wait in the source.
        assert wait_for(lambda: len(ingest._source.pending) == 2 and len(queue) == 1), ingest.stats()
        time.sleep(0.2)
        ingest.stop()
        ingest.join(5)
    assert not ingest.is_alive()
    assert [f.frame_id for f in drain(queue)] == ["0"]
    refused = [(e["frame_id"], e["seq"], e["lost"], e["log_level"]) for e in logs if e["event"] == "frame_not_accepted"]
    assert refused == [("1", 1, True, "warning"), ("2", None, True, "warning"), ("3", None, True, "warning")]
    assert all(e["reason"] == "the daemon is stopping" for e in logs if e["event"] == "frame_not_accepted")
    assert len(ingest._source.pending) == 0


def test_an_empty_frame_reported_as_read_is_an_error_frame_not_a_replay_from_the_start(tmp_path):
    """OpenCV's own VideoCapture.read() returns False with every empty image (its C++ read() returns
    `!image.empty()`), so no real backend gives (True, None): a backend plugin or build that does is stood in for by
    wrapping the real capture of a real file, and the real source code reads through it."""
    source = VideoCaptureSource(camera({"kind": "opencv", "url": str(write_video(tmp_path / "line.avi"))}), time.time)
    stop = threading.Event()
    source.open(stop)

    class EmptyAtThree:
        def __init__(self, cap: cv2.VideoCapture) -> None:
            self.cap, self.reads = cap, 0

        def read(self):
            ok, image = self.cap.read()
            self.reads += 1
            return (True, None) if self.reads == 4 else (ok, image)

        def release(self) -> None:
            self.cap.release()

    source.cap = EmptyAtThree(source.cap)  # type: ignore[assignment]
    frames = []
    try:
        with pytest.raises(SourceEnded):
            for _ in range(FRAMES + 2):
                frame = source.read(stop)
                assert frame is not None
                frames.append(frame)
    finally:
        source.close()
    assert [f.frame_id for f in frames] == [str(i) for i in range(FRAMES)]
    assert frames[3].error == "frame 3: empty frame from VideoCapture (undecodable)"
    assert [bar(f) for f in frames if f.error is None] == [i for i in range(FRAMES) if i != 3]


def test_device_index_is_bounded_at_config_load():
    assert camera({"kind": "opencv", "device": MAX_DEVICE}).source.device == MAX_DEVICE
    with pytest.raises(ConfigError) as err:
        camera({"kind": "opencv", "device": 1 << 40})
    assert str(err.value) == f"cameras[0].source.device: expected at most {MAX_DEVICE}, got 1099511627776"


@pytest.mark.parametrize("source", [{"url": "rtsp://127.0.0.1:1/line"}, {"url": "line.avi"}, {"device": 0}])
def test_a_url_or_device_camera_does_not_tie_reloads_to_the_starting_bit_depth(source):
    """The daemon refuses a reload to a bundle of another bit depth while a camera narrows 16-bit frames; a url or
    device gives 8-bit frames only, so an RTSP-only station can reload to any bundle."""
    ingest = CameraIngest(camera({"kind": "opencv", **source}), FrameQueue(4))
    assert ingest.narrows_16_bit is False


def test_a_gstreamer_pipeline_camera_narrows_16_bit_frames(monkeypatch):
    """Only a pipeline can deliver GRAY16_LE. This OpenCV may lack GStreamer, which the loader checks: the camera is
    built, never opened."""
    monkeypatch.setattr("inspectd.daemon.ingest.opencv.gstreamer_built_in", lambda: True)
    pipeline = "videotestsrc ! video/x-raw,format=GRAY16_LE ! appsink"
    ingest = CameraIngest(camera({"kind": "opencv", "pipeline": pipeline}), FrameQueue(4))
    assert ingest.narrows_16_bit is True


def load_url(tmp_path: Path, url: str):
    """The camera of a config file whose one opencv camera has `url`, loaded as the daemon loads it."""
    path = tmp_path / "inspectd.yaml"
    path.write_text(
        f"station: line1\nmodel:\n  bundle: bundle\ncameras:\n  - id: cam0\n"
        f"    source:\n      kind: opencv\n      url: '{url}'\n"
    )
    return load_config(path).cameras[0]


@pytest.mark.skipif(gstreamer_built_in(), reason="GStreamer takes any scheme one of its plugins handles")
@pytest.mark.parametrize(
    "url,message",
    [
        (
            "rstp://192.0.2.10:554/stream1",
            "unknown scheme 'rstp', expected one FFmpeg reads (rtsp, rtsps, http, https, rtmp, srt, udp, rtp, tcp, "
            "...: docs/CAMERAS.md lists them all) or a video file path",
        ),
        ("v4l2:///dev/video0", "unknown scheme 'v4l2', expected one FFmpeg reads"),
        ("icecast://192.0.2.10/line", "unknown scheme 'icecast', expected one FFmpeg reads"),  # FFmpeg writes it only
        ("RTSP://192.0.2.10/stream1", "scheme 'RTSP' must be lower case (rtsp://): FFmpeg matches it exactly"),
        # A slash short: read as a file beside the config, it was reopened forever.
        (
            "rtsp:/192.0.2.10:554/stream1",
            "scheme 'rtsp' without '//' in 'rtsp:/192.0.2.10:554/stream1', expected rtsp://HOST/...",
        ),
        (
            "http:192.0.2.10/cam.mjpg",
            "scheme 'http' without '//' in 'http:192.0.2.10/cam.mjpg', expected http://HOST/...",
        ),
    ],
)
def test_a_url_whose_scheme_no_backend_reads_is_refused_at_load(tmp_path, url, message):
    """It loaded, and its camera then retried the url forever: no reopen makes FFmpeg know the scheme."""
    with pytest.raises(ConfigError) as refused:
        load_url(tmp_path, url)
    assert str(refused.value).startswith(f"cameras[0].source.url: {message}"), refused.value
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "url", ["rtsp://192.0.2.10:554/stream1", "rtsps://h/s", "https://h/mjpg", "srt://h:9000", "hls+http://h/l.m3u8"]
)
def test_a_url_of_a_scheme_ffmpeg_reads_loads_as_given(tmp_path, url):
    assert load_url(tmp_path, url).source.url == url


def test_a_url_without_a_scheme_is_a_video_file_beside_the_config_file(tmp_path):
    """Also one with "://" further on: FFmpeg reads that as a file path too."""
    source = load_url(tmp_path, "videos/line://1.avi").source
    assert source.url == str(tmp_path / "videos" / "line:" / "1.avi")
    assert VideoCaptureSource(camera({"kind": "opencv", "url": source.url}), time.time).finite is True


def test_a_url_of_any_scheme_loads_where_gstreamer_may_take_it(tmp_path, monkeypatch):
    """GStreamer's uridecodebin takes whatever scheme an installed plugin handles, which cannot be listed here. This
    OpenCV may lack GStreamer: the config is loaded, the camera never opened."""
    monkeypatch.setattr("inspectd.daemon.ingest.opencv.gstreamer_built_in", lambda: True)
    assert load_url(tmp_path, "v4l2:///dev/video0").source.url == "v4l2:///dev/video0"


def test_every_protocol_this_opencvs_ffmpeg_reads_is_a_known_scheme():
    """The list is FFmpeg's; a newer FFmpeg in the OpenCV wheel may bring a protocol it lacks, which would then be
    refused at load. Read from the libavformat the wheel carries, where it carries one."""
    import ctypes

    libs = sorted(Path(cv2.__file__).parents[1].glob("opencv_python*.libs/libavformat*.so*"))
    if not libs:
        pytest.skip("this OpenCV carries no libavformat of its own")
    avformat = ctypes.CDLL(str(libs[0]))
    avformat.avio_enum_protocols.restype = ctypes.c_char_p
    avformat.avio_enum_protocols.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    cursor, read = ctypes.c_void_p(None), []
    while name := avformat.avio_enum_protocols(ctypes.byref(cursor), 0):
        read.append(name.decode())
    assert "http" in read and "rtsp" not in read, read  # rtsp is a demuxer's, listed by hand
    assert set(read) - FFMPEG_SCHEMES == set()


def played_once(ingest_threads, url: str) -> CameraIngest:
    """The camera at `url` (write_video's clip), once it has ended: every frame once, in order, never reopened."""
    queue = FrameQueue(4 * FRAMES, "block")
    ingest = CameraIngest(camera({"kind": "opencv", "url": url}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["state"] == "ended", 5), ingest.stats()
    frames = drain(queue)
    assert [f.frame_id for f in frames] == [str(i) for i in range(FRAMES)]
    assert [bar(f) for f in frames] == list(range(FRAMES))
    stats = ingest.stats()
    assert stats["reopen_count"] == 0 and stats["last_error"] is None and stats["frames_in"] == FRAMES, stats
    return ingest


def test_a_file_url_video_plays_once_and_ends_as_its_plain_path_does(tmp_path, ingest_threads):
    """Taken for a stream, a file:// video's end was a dropped stream: reopened, and played again from its first
    frame, each replay judged as new parts, for as long as the daemon ran."""
    played_once(ingest_threads, f"file://{write_video(tmp_path / 'line.avi')}")


@pytest.fixture
def http_server():
    """Serve with a real http.server on a free port: serve(handler class) gives the url of its root."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> str:
        handler.log_message = lambda *args: None  # type: ignore[method-assign]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_an_http_url_of_a_recorded_clip_plays_once_and_ends_as_a_video_file_does(tmp_path, ingest_threads, http_server):
    """Taken for a stream, the clip's end was a dropped stream: reopened after the backoff and played again from its
    first frame, each pass judged as new parts under new ids, for as long as the daemon ran."""
    write_video(tmp_path / "clip.avi")
    root = http_server(functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    ingest = played_once(ingest_threads, f"{root}/clip.avi")
    assert not ingest._source.live  # not read while paused: a recording has no current frame to keep up with


def test_an_http_clip_whose_connection_drops_ends_there_saying_how_many_of_its_frames_came(
    tmp_path, ingest_threads, http_server
):
    """A reopen would play it again from its first frame."""
    writer = cv2.VideoWriter(str(tmp_path / "long.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    noise = np.random.default_rng(0)
    for _ in range(120):  # noise, so the half sent is far more than what FFmpeg reads ahead to open it
        writer.write(noise.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = (tmp_path / "long.avi").read_bytes()

    class HalfSent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

    url = f"{http_server(HalfSent)}/long.avi"
    queue = FrameQueue(240, "block")
    ingest = CameraIngest(camera({"kind": "opencv", "url": url}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["state"] == "ended", 10), ingest.stats()
    frames = drain(queue)
    assert 0 < len(frames) < 120 and [f.frame_id for f in frames] == [str(i) for i in range(len(frames))]
    stats = ingest.stats()
    assert stats["reopen_count"] == 0, stats
    assert stats["last_error"] == (
        f"{url}: ended after {len(frames)} frames, expected 120 (the clip's frame count): its connection dropped or "
        "stalled, or the count was an estimate"
    )


def test_a_live_mjpeg_stream_over_http_counts_no_frames_and_is_reopened_when_it_drops(ingest_threads, http_server):
    class Mjpeg(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for level in range(5):
                jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 40 * level, np.uint8))[1].tobytes()
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                self.wfile.write(head + jpeg + b"\r\n")
            self.close_connection = True

    queue = FrameQueue(1000, "block")
    url = f"{http_server(Mjpeg)}/stream.mjpg"
    ingest = CameraIngest(camera({"kind": "opencv", "url": url}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["reopen_count"] >= 2 and ingest.stats()["frames_in"] > 10), ingest.stats()
    assert ingest.stats()["state"] != "ended" and ingest._source.live


def test_an_http_clip_whose_container_counts_a_few_frames_short_plays_once_and_ends(
    tmp_path, ingest_threads, http_server
):
    """A count that is an estimate a little short is a clip still, not a live stream: taken for one, it was replayed
    without end, each pass judged as new parts."""
    data = bytearray(write_video(tmp_path / "clip.avi").read_bytes())
    for chunk, at in ((b"avih", 16), (b"strh", 32)):  # total frames, stream length: two short
        struct.pack_into("<I", data, data.find(chunk) + 8 + at, FRAMES - 2)
    (tmp_path / "clip.avi").write_bytes(data)
    root = http_server(functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    played_once(ingest_threads, f"{root}/clip.avi")


def test_a_stream_over_http_that_gives_more_frames_than_its_container_counts_is_reopened_at_a_drop(
    tmp_path, ingest_threads, http_server
):
    """An endless AVI (a camera's live stream in a container that states a count) first looks like a recorded clip:
    at its first drop it was ended for good, the camera silent from then on. Past its count it is a live stream."""
    data = write_video(tmp_path / "clip.avi").read_bytes()
    movi, index = data.find(b"movi"), data.find(b"idx1")
    header = bytearray(data[: movi + 4])
    struct.pack_into("<I", header, 4, 0xFFFFFFF0)  # RIFF and movi sizes of a stream that does not end
    struct.pack_into("<I", header, movi - 4, 0xFFFFFFF0)
    body, chunks, at = data[movi + 4 : index], [], 0
    while at + 8 <= len(body):
        size = struct.unpack("<I", body[at + 4 : at + 8])[0]
        chunks.append(body[at : at + 8 + size + (size & 1)])
        at += 8 + size + (size & 1)
    assert len(chunks) == FRAMES

    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/x-msvideo")
            self.end_headers()
            self.wfile.write(bytes(header))
            for k in range(60 * FRAMES):  # then the connection drops
                self.wfile.write(chunks[k % FRAMES])
            self.close_connection = True

    queue = FrameQueue(100, "drop_oldest")  # nobody takes them: a live stream's frames go on regardless
    url = f"{http_server(Endless)}/live.avi"
    ingest = CameraIngest(camera({"kind": "opencv", "url": url}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["reopen_count"] >= 2, 10), ingest.stats()
    assert ingest.stats()["state"] != "ended" and ingest.stats()["frames_in"] > 60 * FRAMES, ingest.stats()
    assert ingest._source.live


def test_a_file_url_whose_file_is_missing_is_retried_naming_it_as_a_path_is(tmp_path, ingest_threads):
    queue = FrameQueue(4 * FRAMES, "block")
    url = f"file://{tmp_path}/later.avi"
    ingest = CameraIngest(camera({"kind": "opencv", "url": url}), queue, backoff_s=(0.05, 0.1))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["reopen_count"] >= 2, 5), ingest.stats()
    assert ingest.stats()["last_error"] == f"FileNotFoundError: {url}: video file not found"
    os.replace(write_video(tmp_path / "writing.avi"), tmp_path / "later.avi")  # whole, as a recorder would leave it
    assert wait_for(lambda: ingest.stats()["state"] == "ended", 5), ingest.stats()
    assert [f.frame_id for f in drain(queue)] == [str(i) for i in range(FRAMES)]


@pytest.mark.parametrize(
    "url,finite",
    [
        ("file:///srv/line.avi", True),
        ("concat:///srv/a.avi|/srv/b.avi", True),
        ("crypto+file:///srv/line.avi", True),
        ("rtsp://192.0.2.10/stream1", False),
        ("http://192.0.2.10/cam.mjpg", False),
        ("hls+http://192.0.2.10/l.m3u8", False),
    ],
)
def test_a_url_of_a_scheme_that_reads_local_files_is_a_video_that_ends(tmp_path, url, finite):
    source = VideoCaptureSource(load_url(tmp_path, url), time.time)
    assert source.finite is finite


@pytest.mark.parametrize("url", ["file://localhost/srv/line.avi", "file://videos/line.avi"])
def test_a_file_url_with_a_host_or_a_relative_path_is_refused_at_load(tmp_path, url):
    """FFmpeg reads what follows `file:` as the path: file://videos/line.avi is /videos/line.avi, not the file beside
    the config, and the camera would retry a file that is never there."""
    with pytest.raises(ConfigError) as refused:
        load_url(tmp_path, url)
    assert str(refused.value) == (
        f"cameras[0].source.url: {url!r} names a host or a relative path, expected file:///ABSOLUTE/PATH or a plain "
        "video file path (relative to the config file)"
    )


@pytest.fixture
def fifo_writer(tmp_path):
    """A named pipe a recorder writes the same video into, pass after pass (each pass opens the pipe anew, as
    `ffmpeg ... -f avi PIPE` run in a loop does): started by calling the fixture with the pipe's path."""
    writers: list[subprocess.Popen] = []

    def start(fifo: Path) -> None:
        video = write_video(tmp_path / "pass.avi")
        loop = f"while true; do cat '{video}' > '{fifo}'; sleep 0.2; done"
        writers.append(subprocess.Popen(["sh", "-c", loop]))

    yield start
    for writer in writers:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("form", ["path", "file://", "concat://"])
def test_a_named_pipe_a_recorder_writes_is_a_stream_read_pass_after_pass(tmp_path, ingest_threads, fifo_writer, form):
    """Taken for a video file by its url, a file:// pipe never opened ("video file not found") and a concat: one
    played the first pass and ended, its writer left blocked, with queue policy block stalling it besides."""
    fifo = tmp_path / "line.fifo"
    os.mkfifo(fifo)
    url = {"path": str(fifo), "file://": f"file://{fifo}", "concat://": f"concat://{fifo}"}[form]
    cam = load_url(tmp_path, url)
    assert cam.queue.policy == "drop_oldest"
    fifo_writer(fifo)
    queue = FrameQueue(10 * FRAMES, "block")
    ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.1))
    ingest_threads.append(ingest)
    ingest.start()
    # Three passes: more than one file's frames, whether FFmpeg read on through a pass's end or reopened.
    assert wait_for(lambda: ingest.stats()["frames_in"] >= 3 * FRAMES, 15), ingest.stats()
    assert ingest.stats()["state"] in ("running", "reopening"), ingest.stats()
    assert ingest._source.live is True and ingest._source.finite is False
    frames = drain(queue)
    assert [bar(f) for f in frames[: 3 * FRAMES]] == 3 * list(range(FRAMES))


def test_a_named_pipe_without_a_writer_waits_for_one_and_lets_a_stop_through(tmp_path, ingest_threads, fifo_writer):
    fifo = tmp_path / "line.fifo"
    os.mkfifo(fifo)
    queue = FrameQueue(10 * FRAMES, "block")
    ingest = CameraIngest(camera({"kind": "opencv", "url": str(fifo)}), queue, backoff_s=(0.05, 0.1))
    ingest.start()
    time.sleep(0.5)
    stats = ingest.stats()
    assert (stats["state"], stats["frames_in"], stats["last_error"]) == ("reopening", 0, None), stats
    ingest.stop()
    ingest.join(2)  # FFmpeg's own open of the pipe would block until a writer came
    assert not ingest.is_alive() and ingest.stats()["state"] == "stopped"

    ingest = CameraIngest(camera({"kind": "opencv", "url": str(fifo)}), queue, backoff_s=(0.05, 0.1))
    ingest_threads.append(ingest)
    ingest.start()
    time.sleep(0.3)
    fifo_writer(fifo)
    assert wait_for(lambda: ingest.stats()["frames_in"] >= FRAMES, 10), ingest.stats()


def test_a_character_device_named_by_a_url_is_opened_as_a_stream_not_looked_for_as_a_video_file(
    tmp_path, ingest_threads
):
    """A video4linux node made here with mknod (no driver behind it, so it cannot open): the camera tries to open it
    as the device it is, rather than retrying it forever as a video file that is not found."""
    node = tmp_path / "video0"
    try:
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(81, 0))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    cam = load_url(tmp_path, str(node))
    assert cam.queue.policy == "drop_oldest"
    queue = FrameQueue(4, "block")
    ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.1))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["reopen_count"] >= 1, 5), ingest.stats()
    assert ingest.stats()["last_error"] == f"OSError: {node}: cv2.VideoCapture cannot open it"
    assert ingest._source.live is True and ingest._source.finite is False


def test_a_url_naming_a_directory_is_refused_at_load(tmp_path):
    (tmp_path / "videos").mkdir()
    for url in ("videos", f"file://{tmp_path}/videos"):
        with pytest.raises(ConfigError) as refused:
            load_url(tmp_path, url)
        assert str(refused.value) == (
            f"cameras[0].source.url: {tmp_path}/videos is a directory, expected a video file, a named pipe or a "
            "video device (a folder of images is a camera of kind folder)"
        )


def test_a_url_whose_regular_file_became_a_named_pipe_is_read_as_what_it_is_at_open(tmp_path, ingest_threads):
    """Its queue policy is the load's; whether it ends and is read while paused is decided again at each open."""
    path = write_video(tmp_path / "line.avi")
    cam = camera({"kind": "opencv", "url": str(path)})
    source = VideoCaptureSource(cam, time.time)
    assert (source.finite, source.live, cam.queue.policy) == (True, False, "block")
    path.unlink()
    os.mkfifo(path)
    stop = threading.Event()
    stop.set()  # no writer comes: the open gives up at once
    source.open(stop)
    assert (source.finite, source.live, source.cap) == (False, True, None)


@pytest.mark.parametrize("form", ["node", "by-id link", "file:// link"])
def test_a_url_naming_a_video_device_is_opened_as_that_device(tmp_path, ingest_threads, form):
    """/dev/video1023 (no machine has that many, so it cannot open here), named as itself or through a udev-style
    link: the camera opens device 1023 as `device: 1023` does, as a stream, and says so when it cannot. It was taken
    for a video file: queue policy block, not read while paused, retried forever as "video file not found"."""
    node = "/dev/video1023"
    assert not os.path.exists(node)
    link = tmp_path / "usb-Cam_1234-video-index0"
    link.symlink_to(node)
    url = {"node": node, "by-id link": str(link), "file:// link": f"file://{link}"}[form]
    cam = load_url(tmp_path, url)
    assert cam.queue.policy == "drop_oldest"
    queue = FrameQueue(4, "block")
    ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.1))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["reopen_count"] >= 1, 5), ingest.stats()
    assert ingest.stats()["last_error"] == (
        f"OSError: {url}: cv2.VideoCapture cannot open it (video device 1023): no {node} (unplugged, or another index)"
    )
    assert ingest._source.live is True and ingest._source.finite is False


def test_a_file_url_has_its_percent_escapes_decoded(tmp_path, ingest_threads):
    """FFmpeg's file protocol decodes no escape: file:///.../my%20video.avi was retried forever as not found."""
    folder = tmp_path / "rec ü#1"
    folder.mkdir()
    write_video(folder / "my video.avi")
    url = f"file://{tmp_path}/rec%20%C3%BC%231/my%20video.avi"
    cam = load_url(tmp_path, url)
    assert cam.queue.policy == "block"
    queue = FrameQueue(4 * FRAMES, "block")
    ingest = CameraIngest(cam, queue, backoff_s=(0.05, 0.1))
    ingest_threads.append(ingest)
    ingest.start()
    assert wait_for(lambda: ingest.stats()["state"] == "ended", 5), ingest.stats()
    assert [bar(f) for f in drain(queue)] == list(range(FRAMES))
    assert ingest.stats()["reopen_count"] == 0 and ingest.stats()["last_error"] is None
    # An unescaped '#' is a character of the name, as FFmpeg reads it.
    assert VideoCaptureSource(load_url(tmp_path, f"file://{folder}/a.avi"), time.time).path == f"{folder}/a.avi"


@pytest.mark.parametrize(
    "url,message",
    [
        (
            "file:///srv/line.avi?raw=1",
            "'file:///srv/line.avi?raw=1' has a query string (?raw=1), expected file:///ABSOLUTE/PATH alone (a '?' in "
            "a file name is written %3F)",
        ),
        ("file:///srv/a%FF.avi", "'file:///srv/a%FF.avi' has %XX escapes that are not UTF-8, expected the escapes"),
        ("file:///srv/a%00.avi", "'file:///srv/a%00.avi' decodes to a path with a NUL byte (%00), expected a path"),
    ],
)
def test_a_file_url_with_a_query_or_escapes_no_path_holds_is_refused_at_load(tmp_path, url, message):
    with pytest.raises(ConfigError) as refused:
        load_url(tmp_path, url)
    assert str(refused.value).startswith(f"cameras[0].source.url: {message}"), refused.value


def test_a_named_pipe_whose_writer_wrote_its_whole_pass_and_left_before_ffmpeg_opened_it_is_read(tmp_path, monkeypatch):
    """A short recording written at once (`cat clip.avi > PIPE`) fits the pipe's buffer: its writer can be gone by
    the time FFmpeg opens the pipe, and FFmpeg's own open of the path then blocked in the kernel until another
    writer came, past every timeout and stop()."""
    fifo = tmp_path / "line.fifo"
    os.mkfifo(fifo)
    video = write_video(tmp_path / "clip.avi").read_bytes()
    assert len(video) < 65536  # the whole pass fits the pipe's buffer

    def write_once() -> None:
        with open(fifo, "wb") as out:  # blocks until the camera opens the pipe
            out.write(video)

    writer = threading.Thread(target=write_once, daemon=True)
    writer.start()
    waited = opencv._pipe_with_a_writer

    def writer_gone_first(path: str, stop: threading.Event) -> int | None:
        held = waited(path, stop)
        writer.join(10)  # the writer has written everything and closed the pipe before FFmpeg opens it
        assert not writer.is_alive()
        return held

    monkeypatch.setattr(opencv, "_pipe_with_a_writer", writer_gone_first)
    source = VideoCaptureSource(camera({"kind": "opencv", "url": str(fifo)}), time.time)
    opening = threading.Thread(target=source.open, args=(threading.Event(),), daemon=True)
    opening.start()
    opening.join(10)
    if opening.is_alive():
        with open(fifo, "wb"):  # lets the blocked open through, so the thread ends
            pass
        pytest.fail("the camera's open of the pipe blocked after its writer had gone")
    frames = [source.read(threading.Event()) for _ in range(FRAMES)]
    assert [bar(frame) for frame in frames] == list(range(FRAMES))
    with pytest.raises(OSError, match="no frame"):
        source.read(threading.Event())  # the pass is over: the camera reopens and waits for the next writer
    held = source.pipe_fd
    source.close()
    with pytest.raises(OSError):
        os.fstat(held)  # the descriptor FFmpeg read is closed with the capture


def test_a_named_pipe_whose_writer_stops_writing_times_its_read_out_and_the_camera_reopens(
    tmp_path, ingest_threads, monkeypatch
):
    """A writer that keeps the pipe open but stops mid-stream held the camera's read for good: no error, no reopen."""
    monkeypatch.setattr(
        opencv, "TIMEOUTS", [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 1000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 1000]
    )
    fifo = tmp_path / "line.fifo"
    os.mkfifo(fifo)
    video = write_video(tmp_path / "clip.avi").read_bytes()
    held_open = threading.Event()

    def write_half_and_stall() -> None:
        with open(fifo, "wb") as out:
            out.write(video[:-1500])  # most frames, then nothing more
            out.flush()
            held_open.wait(30)

    writer = threading.Thread(target=write_half_and_stall, daemon=True)
    writer.start()
    queue = FrameQueue(10 * FRAMES, "block")
    ingest = CameraIngest(camera({"kind": "opencv", "url": str(fifo)}), queue, backoff_s=(0.05, 0.1))
    ingest_threads.append(ingest)
    try:
        ingest.start()
        assert wait_for(lambda: ingest.stats()["frames_in"] >= 1, 10), ingest.stats()
        assert wait_for(lambda: ingest.stats()["state"] == "reopening", 10), ingest.stats()
        assert "no frame" in ingest.stats()["last_error"]
        ingest.stop()
        ingest.join(3)
        assert not ingest.is_alive()
    finally:
        held_open.set()


OPEN_FAILURES = """
import json, sys, time
import structlog
from inspectd.logs import configure_logging
from inspectd.daemon.config import parse_config
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest

configure_logging("info", "json")
sources = json.loads(sys.argv[1])
cameras = parse_config(
    {"station": "s", "model": {"bundle": "b"},
     "cameras": [{"id": f"cam{i}", "source": source} for i, source in enumerate(sources)]}
).cameras
ingests = [CameraIngest(cam, FrameQueue(64, "drop_oldest"), backoff_s=(0.05, 0.1)) for cam in cameras]
for ingest in ingests:
    ingest.start()
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not all(
    ingest.reopen_count >= 3 or ingest.state == "ended" for ingest in ingests
):
    time.sleep(0.05)
for ingest in ingests:
    ingest.stop()
    ingest.join(10)
log = structlog.get_logger("t")
for ingest in ingests:
    log.info("camera_result", camera=ingest.camera.id, last_error=ingest.last_error, reopen_count=ingest.reopen_count)
"""


def test_cameras_that_cannot_open_or_decode_write_nothing_but_json_lines(tmp_path):
    """The daemon's output is read with `journalctl -o cat | jq` (docs/DEPLOY.md, Logs), which stops at the first line
    that is not JSON. OpenCV's V4L2 warning and FFmpeg's "Connection refused" or corrupt-frame errors were written as
    plain text at every reopen; the reason a device cannot open belongs in the camera's one-line last_error instead."""
    from ports import free_port

    video = write_video(tmp_path / "line.avi")
    corrupt_frame(video, 5)
    sources = [
        {"kind": "opencv", "url": f"rtsp://127.0.0.1:{free_port()}/line"},  # nobody serves it: Connection refused
        {"kind": "opencv", "url": f"http://127.0.0.1:{free_port()}/line.mjpg"},
        {"kind": "opencv", "device": MAX_DEVICE},  # /dev/video1023: no machine has it
        {"kind": "opencv", "url": str(video)},
    ]
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parents[1]}{os.pathsep}{Path(__file__).parent}"}
    for name in ("OPENCV_LOG_LEVEL", "OPENCV_FFMPEG_LOGLEVEL", "JOURNAL_STREAM"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", OPEN_FAILURES, json.dumps(sources)], capture_output=True, env=env, timeout=50
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    output = done.stdout.decode(errors="replace").splitlines() + done.stderr.decode(errors="replace").splitlines()
    plain = []
    for line in output:
        try:
            json.loads(line)
        except ValueError:
            plain.append(line)
    assert plain == []
    events = [json.loads(line) for line in done.stdout.decode().splitlines()]
    result = {e["camera"]: e for e in events if e["event"] == "camera_result"}
    assert all(result[f"cam{i}"]["reopen_count"] >= 3 for i in range(3)), result
    assert result["cam0"]["last_error"] == f"OSError: {sources[0]['url']}: cv2.VideoCapture cannot open it"
    assert result["cam2"]["last_error"] == (
        f"OSError: {MAX_DEVICE}: cv2.VideoCapture cannot open it: no /dev/video{MAX_DEVICE} "
        "(unplugged, or another index)"
    )
    assert result["cam3"]["last_error"].startswith("frame 5: empty frame"), result["cam3"]
