"""An opencv camera on a video file (a recording played back to inspect it): real MJPG files written by
cv2.VideoWriter, read by the real source through CameraIngest, and by a real daemon. A video file ends, like a
folder: each of its frames is a part to judge, so none may be dropped by default or thrown away while paused."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon_harness import Station
from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from station_model import write_grey_bundle
from test_ingest import camera, drain, wait_for

pytestmark = pytest.mark.timeout(60)


def write_video(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> Path:
    """MJPG frames whose green bar grows by one pixel a frame (wrapping at the width), so frames differ."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, size)
    assert writer.isOpened()
    for i in range(frames):
        image = np.zeros((size[1], size[0], 3), np.uint8)
        image[:, : 1 + i % size[0], 1] = 255
        writer.write(image)
    writer.release()
    return path


@pytest.mark.parametrize(
    "source,queue,policy",
    [
        ({"url": "line.avi"}, None, "block"),
        ({"url": "file:///srv/line.avi"}, None, "block"),
        ({"url": "line.avi"}, {"size": 8}, "block"),
        ({"url": "line.avi"}, {"policy": "drop_oldest"}, "drop_oldest"),  # said outright: kept
        ({"url": "rtsp://192.0.2.10/stream1"}, None, "drop_oldest"),  # a live stream's newest frames matter most
        ({"device": 0}, None, "drop_oldest"),
    ],
)
def test_a_video_file_camera_blocks_by_default_as_a_folder_camera_does(source, queue, policy):
    cam = camera({"kind": "opencv", **source}, **({} if queue is None else {"queue": queue}))
    assert cam.queue.policy == policy
    assert cam.queue.size == (queue or {}).get("size", 64)


def test_a_daemon_judges_every_frame_of_a_video_file_once_by_path_and_by_file_url(tmp_path):
    """Before, the file was decoded far faster than the batcher judged it and its default drop_oldest queue dropped
    most of it; and the file:// camera replayed the file from its first frame at every end."""
    bundle = write_grey_bundle(tmp_path / "bundle")
    video = write_video(tmp_path / "line.avi", 300)
    cameras = [
        {"id": "cam0", "source": {"kind": "opencv", "url": str(video)}},
        {"id": "cam1", "source": {"kind": "opencv", "url": f"file://{video}"}},
    ]
    s = Station(tmp_path, bundle, cameras)
    try:
        s.wait_ready()
        deadline = time.monotonic() + 30
        while True:
            cams = s.control({"cmd": "status"})["cameras"]
            if all(c["state"] == "ended" and c["published"] == c["frames_in"] for c in cams.values()):
                break
            assert time.monotonic() < deadline, (cams, s.log_tail())
            time.sleep(0.1)
        time.sleep(0.5)  # an ended file is not opened again
        cams = s.control({"cmd": "status"})["cameras"]
        for cam in ("cam0", "cam1"):
            got = {key: cams[cam][key] for key in ("state", "frames_in", "published", "dropped", "reopen_count")}
            assert got == {"state": "ended", "frames_in": 300, "published": 300, "dropped": 0, "reopen_count": 0}, (
                cam,
                cams[cam],
            )
        assert s.stop() == 0, s.log_tail()
    finally:
        s.close()


def test_a_paused_video_file_is_not_read_and_plays_on_from_where_it_was_once_resumed(tmp_path, ingest_threads):
    """Read and discarded while paused, as a live camera is, the whole file went in a moment and the camera ended."""
    frames = 200
    video = write_video(tmp_path / "line.avi", frames)
    queue = FrameQueue(frames, "block")
    ingest = CameraIngest(camera({"kind": "opencv", "url": str(video)}), queue, backoff_s=(0.05, 0.2))
    ingest_threads.append(ingest)
    ingest.paused = True  # what the control channel's pause sets
    ingest.start()
    assert wait_for(lambda: ingest.stats()["state"] == "paused", 5), ingest.stats()
    time.sleep(1.0)
    stats = ingest.stats()
    assert (stats["state"], stats["frames_in"], stats["discarded"]) == ("paused", 0, 0), stats
    ingest.paused = False
    assert wait_for(lambda: ingest.stats()["state"] == "ended", 5), ingest.stats()
    assert [f.frame_id for f in drain(queue)] == [str(i) for i in range(frames)]
    assert ingest.stats()["discarded"] == 0 and ingest.stats()["reopen_count"] == 0
