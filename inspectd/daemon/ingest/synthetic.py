"""The synthetic line as a camera: frames rendered in-process at a fixed rate, with planted defects, and a lighting
schedule so a test or a demo can change the line's brightness mid-stream (what the score-drift alarm watches for)."""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Literal, cast

import cv2
from pydantic import Field

from engines.data.images import DEFAULT_BIT_DEPTH, decode_image
from engines.schema import Int, Number, declared, one_of
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.headers import ENCODINGS
from inspectd.daemon.ingest.source import READ_TIMEOUT_S, Source, SourceEnded

if TYPE_CHECKING:
    from inspectd.daemon import config as cfg


@declared
class SyntheticSource:
    """A camera `source` of `kind: synthetic`."""

    rate_hz: Annotated[Number, Field(ge=0.001)] = 10.0  # its period is a wait: 1e-11 Hz overflowed time_t
    width: Annotated[Int, Field(ge=8, le=16384)] = 256
    height: Annotated[Int, Field(ge=8, le=16384)] = 256
    channels: Annotated[int, one_of((1, 3))] = 1
    defect_rate: Annotated[Number, Field(ge=0, le=1)] = 0.2
    seed: Annotated[Int, Field(ge=0)] = 0  # numpy's generator takes no negative seed
    count: Annotated[Int, Field(ge=0)] | None = None  # None: endless
    # raw frames, or encode+decode each one to exercise the decoder path
    encoding: Annotated[str, one_of(ENCODINGS)] = "raw"
    # the line's own per-frame lighting variation (engines.data.synthline.LIGHTING_JITTER): level within +-this, a
    # gradient up to 2.5x it; 0.1 is a loosely lit line, a station with controlled lighting is nearer 0.02
    lighting_jitter: Annotated[Number, Field(ge=0, le=0.5)] = 0.1
    # frame index -> brightness gain from that frame on (1.0 before the first entry): {500: 1.5, 1000: 1.0} is half
    # again as bright for frames 500..999. On top of the line's own per-frame level (lighting_jitter).
    lighting: dict[Annotated[Int, Field(ge=0)], Annotated[Number, Field(gt=0, le=10)]] = dataclasses.field(
        default_factory=dict
    )
    kind: Literal["synthetic"] = "synthetic"


class SyntheticLineSource(Source):
    Options = SyntheticSource
    redelivers = True

    def __init__(
        self,
        camera: cfg.CameraConfig,
        clock: Callable[[], float],
        bit_depth: int = DEFAULT_BIT_DEPTH,
        where: str | None = None,
    ) -> None:
        super().__init__(camera, clock, bit_depth, where)
        from engines.data.synthline import SyntheticLine

        s = cast(SyntheticSource, camera.source)  # the supervisor builds this class for kind synthetic only
        self.spec = s
        self.line = SyntheticLine(s.width, s.height, s.channels, s.defect_rate, s.seed, s.lighting_jitter)
        self.period = 1.0 / s.rate_hz
        self.produced = 0
        self._next_t = 0.0
        self._lighting = sorted(s.lighting.items())

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
        gain = self.gain(self.produced)
        if gain != 1.0:
            image = cv2.convertScaleAbs(image, alpha=gain)  # saturates at 255, as an overexposed sensor does
        frame_id = f"{self.produced:08d}"
        self.produced += 1
        if self.spec.encoding != "raw":
            # Exercise the same decode path real encoded cameras take.
            ext = ".jpg" if self.spec.encoding == "jpeg" else ".png"
            _, buf = cv2.imencode(ext, image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            image = decode_image(buf, what=frame_id)
        return self.frame(frame_id, self.clock(), image, truth=mask is not None)

    def gain(self, index: int) -> float:
        at = bisect.bisect_right(self._lighting, index, key=lambda step: step[0])
        return self._lighting[at - 1][1] if at else 1.0
