"""Camera ingest: one thread per camera reads its source, stamps Frames and puts them into that camera's queue.

A camera's frames go source -> `supervisor.CameraIngest` (the thread that keeps the camera alive) -> `queue.FrameQueue`
(bounded, drained by the batcher). One module per part:

    queue       the bounded per-camera FrameQueue
    supervisor  CameraIngest: the thread per camera, reopening a failed source with capped exponential backoff
    headers     image dimensions read from PNG/JPEG/BMP/TIFF headers, and check_and_decode
    source      the Source interface every frame source implements
    synthetic, folder, zmq_pull, opencv, genicam
                one frame source each, with the declaration of its options (`Options`)

SOURCES below maps a config's `kind` to its source class; the config's camera `source` is the union of their
`Options`, so adding a kind is its module plus one line there.

A source that fails (camera unplugged, RTSP drop, folder gone, socket error) is reopened with capped exponential
backoff while the other cameras keep going; a finite source (synthetic with a count, a video file) ends cleanly.

A bad frame is never dropped silently: it becomes a Frame with image=None and a one-line `error` naming what was wrong
and what was expected, so the pipeline publishes verdict "error" for it. Encoded frames have their dimensions read from
the PNG IHDR / JPEG SOF header and checked against `max_pixels` before anything is decoded, because the decoder
would otherwise allocate whatever a (hostile or broken) header asks for.

Pausing: live sources (synthetic, zmq, an opencv stream, device or named pipe, genicam) keep being read while paused
and their frames are discarded (counted as `discarded`), so a resumed camera delivers current frames rather than a
stale backlog; a folder or an opencv video file (a regular file) is not read while paused, so its files wait on disk,
or the video where it stopped, and are all inspected after resume, the frame a pause caught mid-read included.
"""

from __future__ import annotations

from inspectd.daemon.ingest.folder import FolderWatcher
from inspectd.daemon.ingest.genicam import GenICamCamera
from inspectd.daemon.ingest.opencv import VideoCaptureSource
from inspectd.daemon.ingest.source import Source
from inspectd.daemon.ingest.synthetic import SyntheticLineSource
from inspectd.daemon.ingest.zmq_pull import ZmqPullSource

SOURCES: dict[str, type[Source]] = {
    "synthetic": SyntheticLineSource,
    "folder": FolderWatcher,
    "zmq": ZmqPullSource,
    "opencv": VideoCaptureSource,
    "genicam": GenICamCamera,
}
