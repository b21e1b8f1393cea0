"""The interface every frame source implements, and the exceptions a source ends with."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from engines.data.images import DEFAULT_BIT_DEPTH
from inspectd.daemon.frames import Frame

if TYPE_CHECKING:
    from inspectd.daemon import config as cfg  # the config imports the sources, for their declarations
    from inspectd.daemon.security import CurveServer

READ_TIMEOUT_S = 0.1  # longest a source read blocks, so stop() and pause are noticed promptly


class SourceEnded(Exception):
    """A finite source has delivered everything: end cleanly, do not reopen."""


class SourceFatal(Exception):
    """The source can never work as configured (e.g. an endpoint ZeroMQ refuses): stop retrying."""


class Source:
    """One camera's frame source. `read` blocks at most ~READ_TIMEOUT_S and returns None when nothing came.

    Subclasses set `Options`: the declaration (engines.schema.declared) of their camera `source` mapping.
    `bit_depth`: what a source that `narrows_16_bit` narrows 16-bit frames to 8 bits by, the bundle's
    (Bundle.bit_depth), so that they are judged as its training images were."""

    live = True  # read and discard while paused (see inspectd.daemon.ingest)
    # Whether a frame refused at stop comes again (a folder keeps its file, the synthetic line makes another); a
    # camera's frame is then lost.
    redelivers = False
    # Whether 16-bit frames it may give are narrowed by `bit_depth` (a source whose pixel format names its own depth,
    # or that gives 8-bit frames only, does not).
    narrows_16_bit = False
    Options: ClassVar[type]
    # A source that clients connect to with CurveZMQ: its allow-list is reloaded and its refusals counted with the
    # daemon's own sockets.
    curve: CurveServer | None = None

    def __init__(
        self,
        camera: cfg.CameraConfig,
        clock: Callable[[], float],
        bit_depth: int = DEFAULT_BIT_DEPTH,
        where: str | None = None,
    ) -> None:
        self.camera = camera
        # The camera's key in the config file (`cameras[1]`), for errors about its options: by position, as every
        # error at load names it, since an id may itself be a number.
        self.where = where if where is not None else f"camera {camera.id!r}"
        self.clock = clock
        self.bit_depth = bit_depth
        # A fault the source got over by itself, without a reopen (a zmq camera binding its removed socket file
        # again), in one line: set by the camera's supervisor to show it as the camera's last_error.
        self.report_error: Callable[[str], None] = lambda error: None

    def open(self, stop: threading.Event) -> None:
        pass

    def read(self, stop: threading.Event) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def unread(self) -> list[Frame]:
        """When the camera's thread ends (a stop, the source's end or failure), before its last close(): the frames
        the source has read but not returned yet (a whole frame queued behind the error frames of those lost before
        it), given up so that each is logged as not accepted rather than dropped unseen."""
        return []

    def stop_receiving(self) -> threading.Event | None:
        """Before a stop: a source whose producers have already handed frames over (a zmq socket's buffer) stops
        taking new ones and returns an event set once those are read; None for a source that holds nothing."""
        return None

    def settle(self, timeout: float) -> bool:
        """After a stop's last result is out: finish, within `timeout`, what the source does once a result is out
        (a folder camera's deletes and moves); whether all of it was done."""
        return True

    def stats(self) -> dict[str, int]:
        """Counters of the source's own, added to its camera's status (a folder camera's parts lost unread)."""
        return {}

    def frame(
        self,
        frame_id: str,
        t_capture: float,
        image: np.ndarray | None,
        error: str | None = None,
        truth: bool | None = None,
    ) -> Frame:
        return Frame(self.camera.id, -1, frame_id, t_capture, image, error, truth)


def frame_id_of(name: str) -> str:
    """A name (a file's, or one a producer sent) as a frame id: bytes that are not UTF-8 (kept by Python as lone
    surrogates, which strict JSON decoders refuse, as does the archive's index) written as \\xNN. UnicodeEncodeError
    for a lone surrogate that stands for no byte."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
