"""A pause that lands while a camera's read is under way, on real sources (a folder of real PNGs, a real MJPG video,
the synthetic line) through CameraIngest. A source that is not read while paused (a folder, a video file) must hand
over the frame in hand: its file or frame is not read again this run, so discarding it lost that part unjudged. Only
a live source's frames are discarded while paused, and counted."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from inspectd.daemon.ingest.queue import FrameQueue
from inspectd.daemon.ingest.supervisor import CameraIngest
from test_ingest import camera, drain, wait_for
from test_ingest_video import write_video

pytestmark = pytest.mark.timeout(60)

PARTS = 24
PAUSE_EVERY = 3  # reads: every third one is caught by a pause


def pause_during_reads(ingest: CameraIngest, resumed_after_s: float = 0.05) -> list[int]:
    """Make every PAUSE_EVERY-th read of the camera's real source end with a pause set, as the control channel's
    pause sets it when it arrives while the read is under way; each pause is resumed a moment later. The numbers of
    the reads caught, returned, grow as they happen."""
    real_read = ingest._source.read
    caught: list[int] = []
    reads = 0

    def read(stop: threading.Event):
        nonlocal reads
        frame = real_read(stop)
        if frame is not None:
            reads += 1
            if reads % PAUSE_EVERY == 0:
                ingest.paused = True
                caught.append(reads)
                threading.Timer(resumed_after_s, setattr, (ingest, "paused", False)).start()
        return frame

    ingest._source.read = read  # type: ignore[method-assign]
    return caught


def start(ingest_threads, source: dict, queue: FrameQueue) -> tuple[CameraIngest, list[int]]:
    ingest = CameraIngest(camera(source), queue, backoff_s=(0.05, 0.2))
    caught = pause_during_reads(ingest)
    ingest_threads.append(ingest)
    ingest.start()
    return ingest, caught


def test_a_folder_file_read_as_a_pause_lands_is_handed_over_not_discarded(tmp_path, ingest_threads):
    """With delete_after, a discarded file stayed in the folder, never judged, and was not read again this run."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(PARTS):
        cv2.imwrite(str(inbox / f"p{i:03d}.png"), np.full((16, 16), i, np.uint8))
    queue = FrameQueue(2 * PARTS, "block")
    ingest, caught = start(ingest_threads, {"kind": "folder", "path": str(inbox), "delete_after": True}, queue)
    assert wait_for(lambda: len(queue) + ingest.stats()["discarded"] >= PARTS, 10), ingest.stats()
    time.sleep(0.3)  # a file read twice, or one more, would be queued by now
    names = sorted(frame.frame_id for frame in drain(queue))
    assert len(caught) == PARTS // PAUSE_EVERY
    assert ingest.stats()["discarded"] == 0, ingest.stats()
    assert names == [f"p{i:03d}.png" for i in range(PARTS)]


def test_a_video_frame_read_as_a_pause_lands_is_handed_over_not_discarded(tmp_path, ingest_threads):
    video = write_video(tmp_path / "line.avi", PARTS)
    queue = FrameQueue(2 * PARTS, "block")
    ingest, caught = start(ingest_threads, {"kind": "opencv", "url": str(video)}, queue)
    assert wait_for(lambda: ingest.stats()["state"] == "ended", 10), ingest.stats()
    assert len(caught) == PARTS // PAUSE_EVERY
    assert ingest.stats()["discarded"] == 0, ingest.stats()
    assert [frame.frame_id for frame in drain(queue)] == [str(i) for i in range(PARTS)]


def test_a_live_sources_frame_read_as_a_pause_lands_is_discarded_and_counted(ingest_threads):
    """A live camera keeps being read while paused and its frames are discarded, so that a resumed camera delivers
    current frames: the frame in hand when the pause lands is one of those."""
    queue = FrameQueue(2 * PARTS, "block")
    line = {"kind": "synthetic", "count": PARTS, "rate_hz": 50, "width": 16, "height": 16}
    ingest, caught = start(ingest_threads, line, queue)
    assert wait_for(lambda: ingest.stats()["state"] == "ended", 10), ingest.stats()
    stats = ingest.stats()
    assert len(caught) >= PARTS // PAUSE_EVERY - 1
    assert stats["discarded"] >= len(caught) and stats["frames_in"] + stats["discarded"] == PARTS, stats
    assert len(drain(queue)) == stats["frames_in"]
