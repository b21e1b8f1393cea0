"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis, with exposure, gain, pixel format and trigger from config.

Aravis is reached through PyGObject (`gi`, Aravis-0.8 typelib): Debian's gir1.2-aravis-0.8 and python3-gi, which a
plain virtualenv cannot see until deploy/aravis.sh links `gi` into it (docs/CAMERAS.md). It is imported when the
camera opens, so a station without it can still check a config naming this source.

Each frame's id is the camera's own frame counter (the GigE Vision block id, 16 bits on GEV 1.x, skipping 0 when
it wraps). A jump in it means frames were lost between the camera and this host (packets dropped, buffers
overrun): each lost frame becomes an error Frame naming the jump, so the loss shows in the results and the camera's
error count instead of vanishing; a frame that arrived incomplete is an error Frame too. A counter that goes back
(the camera restarted) is not a loss.

A camera that stops answering (Aravis' control-lost, a software trigger it does not acknowledge, or a frame `stall_s`
late in free-run or software trigger) is an OSError, so the ingest supervisor reopens it with backoff, and letting go
of it happens on a thread of its own. With a hardware trigger no frame simply means no part.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import numpy as np
import structlog
from pydantic import Field, model_validator

from engines.data.images import DEFAULT_BIT_DEPTH, narrow_to_uint8
from engines.schema import Int, Number, Text, declared, one_of, refuse
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.source import READ_TIMEOUT_S, Source, SourceFatal

if TYPE_CHECKING:
    from inspectd.daemon import config as cfg

# What the engine takes (uint8 gray or RGB) and how each camera format gets there. Bayer and packed formats are left
# out on purpose: have the camera convert (most GenICam colour cameras offer RGB8), rather than guess a demosaic.
PIXEL_FORMATS = ("Mono8", "Mono10", "Mono12", "Mono16", "RGB8", "BGR8")
TRIGGERS = ("free_run", "software", "line")
GEV_BLOCK_ID_MAX = 0xFFFF
MAX_LOST_FRAMES = 1000  # one jump never turns into more error frames than this; the last names how many more
RMEM_MAX = Path("/proc/sys/net/core/rmem_max")  # the most a socket's receive buffer may be asked to hold

log = structlog.get_logger("inspectd.ingest")


@declared
class GenICamSource:
    """A camera `source` of `kind: genicam`. Unset settings leave the camera's own (its user set) as they are."""

    device: Text | None = None  # Aravis device id ("Basler-21234567"), serial number or IP address; None: the first
    pixel_format: Annotated[str, one_of(PIXEL_FORMATS)] | None = None
    exposure_us: Annotated[Number, Field(gt=0)] | None = None  # ExposureTime, in microseconds; auto exposure off
    gain_db: Annotated[Number, Field(ge=0)] | None = None  # Gain; auto gain off
    trigger: Annotated[str, one_of(TRIGGERS)] = "free_run"
    frame_rate_hz: Annotated[Number, Field(gt=0)] | None = None  # free_run: AcquisitionFrameRate
    software_rate_hz: Annotated[Number, Field(gt=0, le=1000)] = 10.0  # software: how often this host triggers
    line: Text = "Line0"  # line: the TriggerSource input (rising edge)
    buffers: Annotated[Int, Field(ge=2, le=256)] = 16
    packet_size: Annotated[Int, Field(ge=576, le=16384)] | None = None  # GigE Vision: None negotiates it
    # free_run/software: a frame this late (past when the configured rate makes it due) means the camera is gone
    stall_s: Annotated[Number, Field(gt=0)] = 5.0
    kind: Literal["genicam"] = "genicam"

    @model_validator(mode="after")
    def _frame_rate_for_free_run(self) -> GenICamSource:
        # Only free_run sets AcquisitionFrameRate: with a trigger the frames come when triggered, and a rate set
        # here would sit in the config unused while another one ran.
        if self.frame_rate_hz is not None and self.trigger != "free_run":
            refuse(
                "frame_rate_hz",
                f"applies only with trigger: free_run (trigger is {self.trigger}), expected null; for software "
                "triggering set software_rate_hz",
                self.frame_rate_hz,
            )
        return self

    @property
    def stall_after_s(self) -> float:
        """How long without a frame counts as a dead camera: `stall_s` past the configured frame period, so a slow
        trigger or frame rate (a part every 10 s) is not taken for a camera that stopped answering."""
        if self.trigger == "software":
            return self.stall_s + 1 / self.software_rate_hz
        if self.trigger == "free_run" and self.frame_rate_hz is not None:
            return self.stall_s + 1 / self.frame_rate_hz
        return self.stall_s


def import_aravis() -> Any:
    """The Aravis 0.8 module through PyGObject; ImportError or ValueError where this Python cannot import it."""
    import gi

    gi.require_version("Aravis", "0.8")
    from gi.repository import Aravis

    return Aravis


def aravis_missing(exc: BaseException) -> str:
    """Why a genicam camera cannot open here, and what to install: said at open and by `run --check`."""
    return (
        f"genicam: Aravis through PyGObject is not importable ({exc}); install gir1.2-aravis-0.8 and python3-gi and "
        "run deploy/aravis.sh VENV (docs/CAMERAS.md)"
    )


def short_socket_buffer(frame_bytes: int, rmem_max: Path = RMEM_MAX) -> str | None:
    """Why a GigE Vision stream socket cannot hold one frame of `frame_bytes`, or None when it can (or the limit
    cannot be read)."""
    try:
        limit = int(rmem_max.read_text())
    except (OSError, ValueError):
        return None
    if frame_bytes <= limit:
        return None
    return (
        f"frames of {frame_bytes} bytes exceed net.core.rmem_max ({limit}): most will arrive with packets missing; "
        f"raise it (sysctl -w net.core.rmem_max={2 * frame_bytes}, kept in /etc/sysctl.d/)"
    )


def frames_lost(previous: int | None, current: int) -> int:
    """Frames missing between two camera frame counters; 0 for the first, a repeat, or a counter reset."""
    if previous is None or current == previous:
        return 0
    if current > previous:
        return current - previous - 1
    if previous > GEV_BLOCK_ID_MAX - 256 and current < 256:  # a 16-bit block id wrapped (0 is never used)
        return GEV_BLOCK_ID_MAX - previous + current - 1
    return 0


def to_image(
    data: bytes, width: int, height: int, pixel_format: str, row_padding: int = 0, tail: int = 0
) -> np.ndarray:
    """A frame's image data as uint8 gray [H, W] or RGB [H, W, 3]; ValueError when the size does not match.

    `row_padding`: bytes after each row (the buffer's x padding); `tail`: how many bytes may follow the last row (y
    padding, chunk data), which are not pixels."""
    if width <= 0 or height <= 0:  # a buffer of chunk data alone
        raise ValueError(f"no image in the buffer ({width}x{height}, {len(data)} bytes)")
    channels = 3 if pixel_format in ("RGB8", "BGR8") else 1
    wide = pixel_format not in ("Mono8", "RGB8", "BGR8")  # Mono10/12/16: little-endian 16-bit words
    itemsize = 2 if wide else 1
    stride = width * channels * itemsize + row_padding
    needed = height * stride
    if not needed <= len(data) <= needed + tail:
        layout = f"{width}x{height} 16-bit words" if wide else f"{width}x{height}x{channels}"
        rows = f" in rows of {stride} bytes" if row_padding else ""
        raise ValueError(f"{len(data)} bytes, expected {layout} for {pixel_format}{rows}")
    shape = (height, width, channels) if channels == 3 else (height, width)
    if pixel_format in ("Mono8", "RGB8") and not row_padding:
        # `data` is already this frame's own copy (PyGObject hands a buffer's pixels over as bytes), so the pixels
        # are used in place: read-only, as every source's frames may be.
        image = np.frombuffer(data, np.uint8, count=needed).reshape(shape)
        image.flags.writeable = False
        return image
    strides = (stride, channels * itemsize, itemsize) if channels == 3 else (stride, itemsize)
    image = np.ndarray(shape, "<u2" if wide else np.uint8, buffer=data, strides=strides)
    if wide:
        # Values above the format's full scale (a camera that sets the unused high bits, or aligns its words to the
        # top) saturate at 255, as on every other source, instead of wrapping around to dark.
        return narrow_to_uint8(image, int(pixel_format[4:]))
    # BGR8 turned to RGB, or rows with padding between them: one copy makes the contiguous image the engine fits.
    return np.ascontiguousarray(image[..., ::-1]) if pixel_format == "BGR8" else np.ascontiguousarray(image)


class GenICamCamera(Source):
    """One GenICam camera through Aravis: configured at open, frames popped from an ArvStream."""

    Options = GenICamSource

    def __init__(
        self,
        camera: cfg.CameraConfig,
        clock: Callable[[], float],
        bit_depth: int = DEFAULT_BIT_DEPTH,
        where: str | None = None,
    ) -> None:
        super().__init__(camera, clock, bit_depth, where)
        self.spec = cast(GenICamSource, camera.source)  # the supervisor builds this class for kind genicam only
        self.cam: Any = None
        self.stream: Any = None
        self.applied: dict[str, Any] = {}  # the settings as read back from the camera after open
        self.last_counter: int | None = None
        self.lost = 0  # frames the camera sent that never arrived whole
        self.resets = 0
        self.pending: collections.deque[Frame] = collections.deque()
        self._control_lost = threading.Event()
        self._last_frame = 0.0
        self._next_trigger = 0.0
        self._gone = False  # the camera stopped answering: closing must not wait on it
        self._image_part = False  # whether this Aravis gives a buffer's image part alone (0.8.25 on)
        self._padding = False  # whether it tells a buffer's row and end padding (0.8.23 on; none read before)

    def open(self, stop: threading.Event) -> None:
        try:
            Aravis = import_aravis()
        except (ImportError, ValueError) as exc:
            raise SourceFatal(aravis_missing(exc)) from exc
        self._aravis = Aravis
        self._image_part = hasattr(Aravis.Buffer, "get_image_data")
        self._padding = hasattr(Aravis.Buffer, "get_image_padding")
        # A fresh event per session: a late control-lost from the device just released must not end this one.
        self._control_lost = threading.Event()
        self._gone = False
        try:
            self.cam = Aravis.Camera.new(self.spec.device)
        except Exception as exc:  # GLib.GError: no such device, or it is controlled by another application
            raise OSError(f"genicam {self.spec.device or '(first found)'}: cannot open ({_gerror(exc)})") from exc
        try:
            self._configure()
            self.stream = self.cam.create_stream(None, None)
            payload = self.cam.get_payload()
            if self.cam.is_gv_device():
                # Without the packet socket (no CAP_NET_RAW, as under the unit) frames come through a UDP socket whose
                # default buffer (Aravis 0.8: the kernel's, 208 KiB) is smaller than one frame: most frames would
                # arrive with packets missing. Ask for a buffer of one frame, which the kernel caps at rmem_max.
                self.stream.set_property("socket-buffer", Aravis.GvStreamSocketBuffer.AUTO)
                reason = short_socket_buffer(payload)
                if reason is not None:
                    log.warning("genicam_socket_buffer_short", camera=self.camera.id, reason=reason)
            for _ in range(self.spec.buffers):
                self.stream.push_buffer(Aravis.Buffer.new_allocate(payload))
            lost = self._control_lost
            self.cam.get_device().connect("control-lost", lambda device: lost.set())
            # Frame counters count per stream: this one's first frame is not compared with where the last one ended
            # (that read as thousands of frames lost on the wire, or as the 16-bit wrap).
            self.last_counter = None
            self.cam.start_acquisition()
        except Exception as exc:
            self.close()
            raise OSError(f"genicam {self.spec.device or '(first found)'}: cannot start ({_gerror(exc)})") from exc
        self._last_frame = time.monotonic()
        self._next_trigger = time.monotonic()

    def _configure(self) -> None:
        Aravis, cam, spec = self._aravis, self.cam, self.spec
        cam.stop_acquisition()  # a camera left streaming by a crashed process refuses some settings
        if spec.packet_size is not None and cam.is_gv_device():
            cam.gv_set_packet_size(spec.packet_size)
        if spec.pixel_format is not None:
            cam.set_pixel_format_from_string(spec.pixel_format)
        if spec.exposure_us is not None:
            if cam.is_exposure_auto_available():
                cam.set_exposure_time_auto(Aravis.Auto.OFF)
            cam.set_exposure_time(spec.exposure_us)
        if spec.gain_db is not None:
            if cam.is_gain_auto_available():
                cam.set_gain_auto(Aravis.Auto.OFF)
            cam.set_gain(spec.gain_db)
        cam.set_acquisition_mode(Aravis.AcquisitionMode.CONTINUOUS)
        if spec.trigger == "free_run":
            cam.clear_triggers()
            if spec.frame_rate_hz is not None:
                cam.set_frame_rate(spec.frame_rate_hz)
        elif spec.trigger == "software":
            cam.set_trigger("Software")
        else:
            cam.set_trigger(spec.line)
        pixel_format = cam.get_pixel_format_as_string()
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"the camera sends {pixel_format}; set pixel_format to one of {', '.join(PIXEL_FORMATS)}")
        device = cam.get_device()
        self.applied = {
            "device": cam.get_device_id(),
            "model": f"{cam.get_vendor_name()} {cam.get_model_name()}",
            "pixel_format": pixel_format,
            "exposure_us": cam.get_exposure_time() if cam.is_exposure_time_available() else None,
            "gain_db": cam.get_gain() if cam.is_gain_available() else None,
            "trigger_mode": _read_back(device, "TriggerMode"),
            "trigger_source": _read_back(device, "TriggerSource"),
        }

    def read(self, stop: threading.Event) -> Frame | None:
        if self.pending:
            return self.pending.popleft()
        if self._control_lost.is_set():
            self._gone = True
            raise OSError(f"genicam {self.applied.get('device')}: control lost (camera unplugged or restarted)")
        now = time.monotonic()
        try:
            if self.spec.trigger == "software" and now >= self._next_trigger:
                # A camera that vanished is first seen here under a software trigger: the write waits out Aravis'
                # control-channel retries (5 s, not stall_s; Aravis 0.8 gives no setting for them) and raises.
                self.cam.software_trigger()
                self._next_trigger = max(self._next_trigger + 1 / self.spec.software_rate_hz, now)
            buffer = self.stream.timeout_pop_buffer(int(READ_TIMEOUT_S * 1e6))
        except Exception as exc:  # GLib.GError: the camera no longer answers, so closing must not wait on it
            self._gone = True
            raise OSError(f"genicam {self.applied.get('device')}: not answering ({_gerror(exc)})") from exc
        if buffer is None:
            stall = self.spec.stall_after_s
            if self.spec.trigger != "line" and time.monotonic() - self._last_frame > stall:
                self._gone = True
                raise OSError(f"genicam {self.applied.get('device')}: no frame for {stall:g} s")
            return None
        try:
            return self._take(buffer)
        finally:
            self.stream.push_buffer(buffer)  # the frame holds its own bytes of the pixels (PyGObject copies them)

    def _take(self, buffer: Any) -> Frame:
        self._last_frame = time.monotonic()
        counter = int(buffer.get_frame_id())
        now = self.clock()
        lost = frames_lost(self.last_counter, counter)
        if self.last_counter is not None and counter < self.last_counter and not lost:
            self.resets += 1  # the camera restarted: its counter starts again
        if lost:
            self.lost += lost
            shown = min(lost, MAX_LOST_FRAMES)
            for i in range(shown):
                missing = (self.last_counter or 0) + 1 + i
                missing = missing - GEV_BLOCK_ID_MAX if missing > GEV_BLOCK_ID_MAX else missing
                extra = f" ({lost - shown} more not listed)" if i == shown - 1 and lost > shown else ""
                self.pending.append(
                    self.frame(
                        str(missing),
                        now,
                        None,
                        f"frame {missing}: lost between camera and host (the camera's frame counter jumped from "
                        f"{self.last_counter} to {counter}){extra}",
                    )
                )
        self.last_counter = counter
        status = buffer.get_status()
        if status != self._aravis.BufferStatus.SUCCESS:
            frame = self.frame(str(counter), now, None, f"frame {counter}: incomplete ({status.value_nick})")
        else:
            pixel_format = self.applied["pixel_format"]
            row_padding, y_padding = buffer.get_image_padding() if self._padding else (0, 0)
            # The image part alone where this Aravis has it (0.8.25); chunk data (a camera whose user set turns
            # ChunkModeActive on) follows the image in the payload either way, and is not pixels.
            data = (buffer.get_image_data() if self._image_part else buffer.get_data()) or b""
            tail = len(data) if buffer.has_chunks() else y_padding
            try:
                image = to_image(
                    data, buffer.get_image_width(), buffer.get_image_height(), pixel_format, row_padding, tail
                )
            except ValueError as exc:
                frame = self.frame(str(counter), now, None, f"frame {counter}: {exc}")
            else:
                if image.shape[0] * image.shape[1] > self.camera.max_pixels:
                    frame = self.frame(
                        str(counter),
                        now,
                        None,
                        f"frame {counter}: {image.shape[1]}x{image.shape[0]} pixels, expected at most "
                        f"max_pixels={self.camera.max_pixels}",
                    )
                else:
                    frame = self.frame(str(counter), now, image)
        if self.pending:
            self.pending.append(frame)
            return self.pending.popleft()
        return frame

    def unread(self) -> list[Frame]:
        frames = list(self.pending)
        self.pending.clear()
        return frames

    def close(self) -> None:
        held = [self.stream, self.cam]
        self.cam = self.stream = None
        self._gone = self._gone or self._control_lost.is_set()
        if held[1] is not None and not self._gone:
            try:
                held[1].stop_acquisition()
            except Exception:  # the camera is gone already; nothing left to stop
                pass
        if self._gone:
            # Letting go of a camera that no longer answers waits out Aravis' control-channel timeouts (seconds);
            # done on a thread of its own, so the reopen backoff and stop() are not held up by it.
            threading.Thread(target=held.clear, name="genicam-release", daemon=True).start()


def _read_back(device: Any, feature: str) -> str | None:
    """A string feature's value as the camera reports it, or None where the camera lacks it (some USB3 Vision and
    line-scan models have no TriggerMode or TriggerSource): a value only recorded must not keep a camera closed."""
    try:
        return device.get_string_feature_value(feature)
    except Exception:  # noqa: BLE001 - GLib.GError: no such feature, or not readable now
        return None


def _gerror(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__
