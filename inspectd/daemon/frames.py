"""The unit that travels down the data path: one camera frame, stamped at ingest."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(slots=True)
class Frame:
    camera: str
    seq: int  # per-camera, assigned at ingest, never reused (resumes after restart from the journal)
    frame_id: str  # the source's own name for the frame (file name, acquisition id, frame counter)
    t_capture: float  # epoch seconds: when the source captured it (or ingest time when the source cannot say)
    image: np.ndarray | None  # uint8 HxW (grayscale) or HxWx3 (RGB); None when `error` is set
    error: str | None = None  # one-line reason the frame was refused at ingest; it is published with verdict "error"
    truth: bool | None = None  # ground truth "defective" where the source knows it (synthetic line), else None
    t_ingest: float = 0.0  # time.monotonic() when ingest queued it, for latency accounting
    # Called on the publisher thread once the frame's result is journalled and sent: what the source does with a frame
    # only when it can no longer be lost (a folder camera moves or deletes its file here, not when it reads it).
    on_published: Callable[[], None] | None = None
