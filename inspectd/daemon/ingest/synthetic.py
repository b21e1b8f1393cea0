"""The synthetic line as a camera: frames rendered in-process at a fixed rate, with planted defects."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import cast

import cv2

from engines.data.images import decode_image
from inspectd.daemon import config as cfg
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.source import READ_TIMEOUT_S, Source, SourceEnded


class SyntheticLineSource(Source):
    def __init__(self, camera: cfg.CameraConfig, clock: Callable[[], float]) -> None:
        super().__init__(camera, clock)
        from engines.data.synthline import SyntheticLine

        s = cast("cfg.SyntheticSource", camera.source)  # the supervisor builds this class for kind synthetic only
        self.spec = s
        self.line = SyntheticLine(s.width, s.height, s.channels, s.defect_rate, s.seed)
        self.period = 1.0 / s.rate_hz
        self.produced = 0
        self._next_t = 0.0

    def open(self, stop: threading.Event) -> None:
        self._next_t = time.monotonic()

    def read(self, stop: threading.Event) -> Frame | None:
        if self.spec.count is not None and self.produced >= self.spec.count:
            raise SourceEnded()
        delay = self._next_t - time.monotonic()
        if delay > 0:
            if stop.wait(min(delay, READ_TIMEOUT_S)) or delay > READ_TIMEOUT_S:
                return None
        # Pace from the schedule, not from now, so the mean rate is exact; but never burst to catch up after a stall.
        self._next_t = max(self._next_t + self.period, time.monotonic() - self.period)
        image, mask = self.line.next()
        frame_id = f"{self.produced:08d}"
        self.produced += 1
        if self.spec.encoding != "raw":
            # Exercise the same decode path real encoded cameras take.
            ext = ".jpg" if self.spec.encoding == "jpeg" else ".png"
            _, buf = cv2.imencode(ext, image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            image = decode_image(buf, what=frame_id)
        return self.frame(frame_id, self.clock(), image, truth=mask is not None)
