"""Camera ingest: one thread per camera reads its source, stamps Frames and puts them into that camera's queue.

Owns the frame sources (the synthetic line, a watched folder, a ZeroMQ PULL socket, OpenCV VideoCapture), the bounded
per-camera `FrameQueue` the batcher drains, refusing bad frames, and keeping a camera alive: a source that fails
(camera unplugged, RTSP drop, folder gone, socket error) is reopened with capped exponential backoff while the other
cameras keep going; a finite source (synthetic with a count, a video file) ends cleanly.

A bad frame is never dropped silently: it becomes a Frame with image=None and a one-line `error` naming what was wrong
and what was expected, so the pipeline publishes verdict "error" for it. Encoded frames have their dimensions read from
the PNG IHDR / JPEG SOF header and checked against `max_pixels` before anything is decoded, because the decoder
would otherwise allocate whatever a (hostile or broken) header asks for.

Pausing: live sources (synthetic, zmq, opencv) keep being read while paused and their frames are discarded (counted
as `discarded`), so a resumed camera delivers current frames rather than a stale backlog; a folder is not read while
paused, so its files wait on disk and are all inspected after resume.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import struct
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import structlog

from engines.data import as_uint8_gray_or_rgb, decode_image
from engines.errors import DataError
from inspectd import config as cfg
from inspectd.frames import Frame

log = structlog.get_logger("inspectd.ingest")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
READ_TIMEOUT_S = 0.1  # longest a source read blocks, so stop() and pause are noticed promptly
# A folder file that looks cut short is taken as still being written (a writer that paused for longer than a poll)
# until it has been left alone this long; only then is it published as a truncated frame.
WRITE_GRACE_S = 2.0
STREAM_TIMEOUT_MS = 5000  # network video streams: how long open and each read may block


class FrameQueue:
    """Bounded FIFO of Frames between one camera and the batcher.

    Every put notifies the shared `ready` Condition, the one the batcher waits on for all cameras. The slots are a
    preallocated ring, so steady-state operation allocates nothing.
    """

    def __init__(self, size: int, policy: str = "drop_oldest", ready: threading.Condition | None = None) -> None:
        if size < 1:
            raise ValueError(f"queue size {size}: expected >= 1")
        if policy not in cfg.QUEUE_POLICIES:
            raise ValueError(f"queue policy {policy!r}: expected one of {', '.join(cfg.QUEUE_POLICIES)}")
        self.size = size
        self.policy = policy
        self.ready = ready if ready is not None else threading.Condition()
        self.dropped = 0
        self._slots: list[Frame | None] = [None] * size
        self._head = 0   # index of the oldest frame
        self._count = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        """Queue `frame`. Policy block waits for room; returns False (frame not queued) if `stop` is set meanwhile."""
        with self._lock:
            if self._count == self.size:
                if self.policy == "drop_oldest":
                    self._slots[self._head] = None
                    self._head = (self._head + 1) % self.size
                    self._count -= 1
                    self.dropped += 1
                else:
                    while self._count == self.size:
                        if stop is not None and stop.is_set():
                            return False
                        self._room.wait(READ_TIMEOUT_S)
            self._slots[(self._head + self._count) % self.size] = frame
            self._count += 1
        # Appended before taking `ready`: a batcher that checked lengths under `ready` and found nothing is already
        # waiting by the time this notify can run, so no wake-up is lost.
        with self.ready:
            self.ready.notify_all()
        return True

    def get_nowait(self) -> Frame | None:
        with self._lock:
            if self._count == 0:
                return None
            frame = self._slots[self._head]
            self._slots[self._head] = None
            self._head = (self._head + 1) % self.size
            self._count -= 1
            self._room.notify()
            return frame

    def __len__(self) -> int:
        return self._count


class SourceEnded(Exception):
    """A finite source has delivered everything: end cleanly, do not reopen."""


class SourceFatal(Exception):
    """The source can never work as configured (e.g. an endpoint ZeroMQ refuses): stop retrying."""


class CameraIngest:
    """The thread that keeps one camera's frames flowing into its queue.

    `stats()["state"]`: running | reopening (failed, waiting out the backoff) | paused | ended (a finite source is
    done) | failed (misconfigured beyond retrying) | stopped (after stop()). `reopen_count` counts reopen attempts.
    Frames get `seq` from `first_seq` up, with no gaps among the frames queued. `mark_seq(seq)` is told each seq
    before its frame is queued (the daemon records it in the journal, so a crash shows in-flight frames as a gap).
    """

    def __init__(self, camera: cfg.CameraConfig, queue: FrameQueue, first_seq: int = 0,
                 clock: Callable[[], float] = time.time, backoff_s: tuple[float, float] = (BACKOFF_FIRST_S,
                                                                                           BACKOFF_MAX_S),
                 mark_seq: Callable[[int], None] | None = None) -> None:
        self.camera = camera
        self.mark_seq = mark_seq or (lambda seq: None)
        self.queue = queue
        self.clock = clock
        self.backoff_s = backoff_s
        self.paused = False
        self.next_seq = first_seq
        self.frames_in = 0
        self.errors = 0
        self.discarded = 0
        self.reopen_count = 0
        self.state = "running"
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._source = make_source(camera, clock)
        self._log = log.bind(camera=camera.id, source=camera.source.kind)
        self._thread = threading.Thread(target=self._run, name=f"ingest-{camera.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        return {"frames_in": self.frames_in, "dropped": self.queue.dropped, "errors": self.errors,
                "discarded": self.discarded, "reopen_count": self.reopen_count,
                "state": "paused" if self.paused and self.state == "running" else self.state,
                "last_error": self.last_error, "queued": len(self.queue), "next_seq": self.next_seq}

    def _set_state(self, state: str, **fields) -> None:
        if state != self.state:
            self.state = state
            self._log.info("camera_state", state=state, **fields)

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._source.open(self._stop)
                    if self.state != "running":
                        self._set_state("running", reopen_count=self.reopen_count)
                    while not self._stop.is_set():
                        if self.paused and not self._source.live:
                            self._stop.wait(READ_TIMEOUT_S)
                            continue
                        frame = self._source.read(self._stop)
                        if frame is None:
                            continue
                        failures = 0
                        if self.paused:
                            self.discarded += 1
                            continue
                        self._emit(frame)
                except SourceEnded:
                    self._set_state("ended", frames_in=self.frames_in)
                    return
                except SourceFatal as exc:
                    self.last_error = str(exc)
                    self._set_state("failed", error=self.last_error)
                    return
                except Exception as exc:  # any source failure: the camera is reopened, the others never notice
                    self.last_error = _one_line(exc)
                    self._set_state("reopening", error=self.last_error)
                    delay = min(self.backoff_s[1], self.backoff_s[0] * 2 ** failures)
                    failures += 1
                    self._source.close()
                    if self._stop.wait(delay):
                        break
                    self.reopen_count += 1
        finally:
            self._source.close()
            if self.state not in ("ended", "failed"):
                self._set_state("stopped")

    def _emit(self, frame: Frame) -> None:
        frame.seq = self.next_seq
        frame.t_ingest = time.monotonic()
        if frame.error is not None:
            self.errors += 1
            self.last_error = frame.error
        self.mark_seq(frame.seq)
        if self.queue.put(frame, self._stop):
            self.next_seq += 1
            self.frames_in += 1
        else:
            self.mark_seq(frame.seq - 1)  # stopping: the frame was never queued, its seq is not used


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- refusing bad input -------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def encoded_dims(data: bytes | memoryview) -> tuple[str, int, int] | None:
    """(format, height, width) read from a PNG, JPEG, BMP or TIFF header without decoding anything; None if none."""
    view = memoryview(data)
    if view[:8] == PNG_SIGNATURE:
        return _png_dims(view)
    if view[:2] == b"\xff\xd8":
        return _jpeg_dims(view)
    if view[:2] == b"BM":
        return _bmp_dims(view)
    if view[:4] in (b"II*\0", b"MM\0*"):
        return _tiff_dims(view)
    return None


def _png_dims(view: memoryview) -> tuple[str, int, int] | None:
    if len(view) < 24 or view[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", view[16:24])
    return "png", height, width


def _jpeg_dims(view: memoryview) -> tuple[str, int, int] | None:
    pos = 2
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers carry no length
            pos += 2
            continue
        (length,) = struct.unpack(">H", view[pos + 2:pos + 4])
        if marker in JPEG_SOF:
            if pos + 9 > len(view):
                return None
            height, width = struct.unpack(">HH", view[pos + 5:pos + 9])
            return "jpeg", height, width
        pos += 2 + length
    return None


def _bmp_dims(view: memoryview) -> tuple[str, int, int] | None:
    if len(view) < 26:
        return None
    (header_size,) = struct.unpack("<I", view[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", view[18:22])
    else:
        width, height = struct.unpack("<ii", view[18:26])
    return "bmp", abs(height), abs(width)  # negative height: rows stored top-down


def _tiff_dims(view: memoryview) -> tuple[str, int, int] | None:
    """Width and length tags of the first image file directory."""
    if len(view) < 8:
        return None
    order = "<" if view[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", view[4:8])
    if ifd + 2 > len(view):
        return None
    (entries,) = struct.unpack(order + "H", view[ifd:ifd + 2])
    dims: dict[int, int] = {}
    for i in range(entries):
        at = ifd + 2 + 12 * i
        if at + 12 > len(view):
            return None
        tag, kind = struct.unpack(order + "HH", view[at:at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt, size = ("H", 2) if kind == 3 else ("I", 4)
            (dims[tag],) = struct.unpack(order + fmt, view[at + 8:at + 8 + size])
    if 256 not in dims or 257 not in dims:
        return None
    return "tiff", dims[257], dims[256]


class IncompleteImage(DataError):
    """Empty or cut short: for a file, possibly one still being written."""


def check_and_decode(data: bytes | memoryview, what: str, max_pixels: int,
                     expected: str | None = None) -> np.ndarray:
    """Decode an encoded frame, refusing (DataError) empty, truncated, unknown-format and oversized ones first.

    `expected` ("jpeg", "png"): the format the sender declared; anything else is refused."""
    if len(data) == 0:
        raise IncompleteImage(f"{what}: empty (0 bytes), expected an encoded {expected or 'JPEG/PNG/BMP/TIFF'} image")
    dims = encoded_dims(data)
    if dims is None:
        raise DataError(f"{what}: no image header found (JPEG SOF, PNG IHDR, BMP or TIFF), expected a complete "
                        f"{expected or 'JPEG/PNG/BMP/TIFF'} image")
    fmt, height, width = dims
    if expected is not None and fmt != expected:
        raise DataError(f"{what}: payload is {fmt}, expected {expected} as the header's encoding says")
    if height * width > max_pixels:
        raise DataError(f"{what}: {fmt} header declares {width}x{height} = {width * height} pixels, "
                        f"expected at most max_pixels={max_pixels}")
    if height == 0 or width == 0:
        raise DataError(f"{what}: {fmt} header declares {width}x{height}, expected a non-empty image")
    # Decoders fill a truncated image with grey and report success; the missing trailer is the reliable sign.
    tail = bytes(memoryview(data)[-16:]).rstrip(b"\0")
    if fmt == "jpeg" and not tail.endswith(b"\xff\xd9"):
        raise IncompleteImage(f"{what}: truncated JPEG (no end-of-image marker), expected a complete file")
    if fmt == "png" and not tail.endswith(PNG_IEND):
        raise IncompleteImage(f"{what}: truncated PNG (no IEND chunk), expected a complete file")
    if fmt == "bmp" and len(data) < struct.unpack("<I", memoryview(data)[2:6])[0]:
        raise IncompleteImage(f"{what}: truncated BMP (shorter than its header's file size), expected a complete file")
    return decode_image(np.frombuffer(data, dtype=np.uint8), what=what)


# --- sources ------------------------------------------------------------------------------------------------------

class Source:
    """One camera's frame source. `read` blocks at most ~READ_TIMEOUT_S and returns None when nothing came."""

    live = True  # read and discard while paused (see the module docstring)

    def __init__(self, camera: cfg.CameraConfig, clock: Callable[[], float]) -> None:
        self.camera = camera
        self.clock = clock

    def open(self, stop: threading.Event) -> None:
        pass

    def read(self, stop: threading.Event) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def frame(self, frame_id: str, t_capture: float, image: np.ndarray | None, error: str | None = None,
              truth: bool | None = None) -> Frame:
        return Frame(self.camera.id, -1, frame_id, t_capture, image, error, truth)


class SyntheticLineSource(Source):
    def __init__(self, camera: cfg.CameraConfig, clock: Callable[[], float]) -> None:
        super().__init__(camera, clock)
        from engines.synthline import SyntheticLine
        s: cfg.SyntheticSource = camera.source
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


class FolderWatcher(Source):
    """New image files in a folder, each once, oldest first (mtime, then name); half-written files are waited for."""

    live = False

    def __init__(self, camera: cfg.CameraConfig, clock: Callable[[], float]) -> None:
        super().__init__(camera, clock)
        self.spec: cfg.FolderSource = camera.source
        self.poll_s = self.spec.poll_ms / 1000.0
        # name -> mtime_ns when inspected (files left in place): a file rewritten under the same name is new again.
        self.done: dict[str, int] = {}
        self.sizes: dict[str, tuple[int, int]] = {}         # name -> (size, mtime_ns) at the previous scan
        self.pending: list[tuple[int, str]] = []            # ready (mtime_ns, name), oldest last, popped from the end

    def open(self, stop: threading.Event) -> None:
        if not self.spec.path.is_dir():
            raise FileNotFoundError(f"{self.spec.path}: folder not found, expected a directory to watch")

    def _scan(self) -> None:
        current: dict[str, tuple[int, int]] = {}
        with os.scandir(self.spec.path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not fnmatch.fnmatch(name, self.spec.pattern) or not entry.is_file():
                    continue
                st = entry.stat()
                current[name] = (st.st_size, st.st_mtime_ns)
        ready = [(stamp[1], name) for name, stamp in current.items()
                 if self.done.get(name) != stamp[1] and self.sizes.get(name) == stamp]
        # A file is ready when its size and mtime held still over one poll interval: the writer is done with it.
        self.sizes = current
        # Forget files that left the folder, so memory follows the folder's content.
        self.done = {name: mtime for name, mtime in self.done.items() if name in current}
        ready.sort(reverse=True)
        self.pending = ready

    def read(self, stop: threading.Event) -> Frame | None:
        if not self.pending:
            self._scan()
            if not self.pending:
                stop.wait(self.poll_s)
                return None
        mtime_ns, name = self.pending.pop()
        path = self.spec.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None  # taken away by someone else between the scan and now
        try:
            image, error = check_and_decode(data, name, self.camera.max_pixels), None
        except IncompleteImage as exc:
            if time.time() - mtime_ns / 1e9 < WRITE_GRACE_S:
                self.sizes.pop(name, None)  # must hold still over another poll before it is tried again
                return None
            image, error = None, str(exc)
        except DataError as exc:
            image, error = None, str(exc)
        self.done[name] = mtime_ns
        self._dispose(path)
        return self.frame(name, mtime_ns / 1e9, image, error)

    def _dispose(self, path: Path) -> None:
        if self.spec.delete_after:
            path.unlink(missing_ok=True)
        elif self.spec.done_dir is not None:
            self.spec.done_dir.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.spec.done_dir / path.name)


HEADER_FIELDS = {"camera", "frame_id", "t_capture", "shape", "dtype", "encoding"}


class ZmqPullSource(Source):
    """A PULL socket the daemon binds; producers send multipart [JSON header, payload]."""

    def __init__(self, camera: cfg.CameraConfig, clock: Callable[[], float]) -> None:
        super().__init__(camera, clock)
        self.endpoint = camera.source.endpoint
        self.sock = None
        self.poller = None
        self.received = 0

    def open(self, stop: threading.Event) -> None:
        import zmq
        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.linger = 0
        sock.rcvhwm = max(2 * self.camera.queue.size, 16)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            if exc.errno in (zmq.EPROTONOSUPPORT, zmq.EINVAL):
                raise SourceFatal(f"{self.endpoint}: cannot bind ({exc}), expected a bindable ZeroMQ endpoint")
            raise  # address in use, ipc dir missing, ...: may clear up, retry with backoff
        self.sock = sock
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def read(self, stop: threading.Event) -> Frame | None:
        if not self.poller.poll(int(READ_TIMEOUT_S * 1000)):
            return None
        parts = self.sock.recv_multipart(copy=False)
        self.received += 1
        return self.parse(parts)

    def parse(self, parts: list) -> Frame:
        fallback_id = f"msg{self.received}"
        now = self.clock()
        if len(parts) != 2:
            return self.frame(fallback_id, now, None, f"message of {len(parts)} parts, expected 2: "
                                                      f"[JSON header, payload]")
        try:
            header = json.loads(bytes(parts[0].buffer))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return self.frame(fallback_id, now, None, "header: not JSON, expected a JSON object "
                                                      "{frame_id, t_capture, shape, dtype, encoding}")
        if not isinstance(header, dict):
            return self.frame(fallback_id, now, None, f"header: {type(header).__name__}, expected a JSON object")
        frame_id = header.get("frame_id")
        frame_id = str(frame_id) if isinstance(frame_id, (str, int)) and not isinstance(frame_id, bool) \
            else fallback_id
        t_capture = header.get("t_capture")
        t_capture = float(t_capture) if isinstance(t_capture, (int, float)) and not isinstance(t_capture, bool) \
            and math.isfinite(t_capture) else now
        try:
            image = self._decode(header, frame_id, parts[1].buffer)
        except DataError as exc:
            return self.frame(frame_id, t_capture, None, str(exc))
        return self.frame(frame_id, t_capture, image)

    def _decode(self, header: dict, frame_id: str, payload: memoryview) -> np.ndarray:
        what = f"frame {frame_id}"
        unknown = sorted(set(header) - HEADER_FIELDS)
        if unknown:
            known = ", ".join(sorted(HEADER_FIELDS))
            raise DataError(f"{what}: unknown header field {unknown[0]!r}, expected only {known}")
        if "frame_id" not in header:
            raise DataError(f"{what}: header has no frame_id, expected a string or integer")
        if not isinstance(header["frame_id"], (str, int)) or isinstance(header["frame_id"], bool):
            raise DataError(f"{what}: frame_id {header['frame_id']!r}, expected a string or integer")
        if "t_capture" in header and not (isinstance(header["t_capture"], (int, float))
                                          and not isinstance(header["t_capture"], bool)
                                          and math.isfinite(header["t_capture"])):
            raise DataError(f"{what}: t_capture {header['t_capture']!r}, expected epoch seconds (a number)")
        camera = header.get("camera")
        if camera is not None and camera != self.camera.id:
            raise DataError(f"{what}: header camera {camera!r} sent to camera {self.camera.id!r}'s endpoint, "
                            f"expected {self.camera.id!r} or no camera field")
        encoding = header.get("encoding", "raw")
        if encoding not in cfg.ENCODINGS:
            raise DataError(f"{what}: encoding {encoding!r}, expected one of {'|'.join(cfg.ENCODINGS)}")
        if encoding == "raw" and "dtype" not in header:
            raise DataError(f"{what}: raw frame without dtype, expected dtype \"uint8\"")
        dtype = header.get("dtype", "uint8")
        if dtype != "uint8":
            raise DataError(f"{what}: dtype {dtype!r}, expected \"uint8\" (float and 16-bit frames are refused)")
        shape = header.get("shape")
        if shape is not None:
            if (not isinstance(shape, list) or len(shape) not in (2, 3)
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
                raise DataError(f"{what}: shape {shape!r}, expected [height, width] or [height, width, channels]")
            if len(shape) == 3 and shape[2] not in (1, 3):
                raise DataError(f"{what}: shape {shape} has {shape[2]} channels, expected 1 or 3")
            if shape[0] * shape[1] > self.camera.max_pixels:
                raise DataError(f"{what}: shape {shape} is {shape[0] * shape[1]} pixels, "
                                f"expected at most max_pixels={self.camera.max_pixels}")
        if encoding == "raw":
            if shape is None:
                raise DataError(f"{what}: raw frame without shape, expected shape [height, width(, channels)]")
            expected = math.prod(shape)
            if len(payload) != expected:
                raise DataError(f"{what}: payload {len(payload)} bytes, expected {expected} for shape {shape} uint8")
            # Zero-copy: the array views the received message, which it keeps alive.
            image = np.frombuffer(payload, dtype=np.uint8).reshape(shape)
            return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        image = check_and_decode(payload, what, self.camera.max_pixels, expected=encoding)
        if shape is not None:
            h, w = shape[0], shape[1]
            c = shape[2] if len(shape) == 3 else 1
            got_c = image.shape[2] if image.ndim == 3 else 1
            if image.shape[:2] != (h, w) or got_c != c:
                raise DataError(f"{what}: decoded {encoding} is {list(image.shape)}, expected header shape {shape}")
        return image


class VideoCaptureSource(Source):
    """cv2.VideoCapture on a video file (finite), an RTSP/HTTP URL, a device index or a GStreamer pipeline."""

    def __init__(self, camera: cfg.CameraConfig, clock: Callable[[], float]) -> None:
        super().__init__(camera, clock)
        self.spec: cfg.OpenCVSource = camera.source
        self.finite = self.spec.url is not None and "://" not in self.spec.url
        self.cap = None
        self.counter = 0

    def open(self, stop: threading.Event) -> None:
        target = self.spec.target
        if self.finite and not Path(target).is_file():
            raise FileNotFoundError(f"{target}: video file not found")
        if self.spec.pipeline is not None:
            cap = cv2.VideoCapture(target, cv2.CAP_GSTREAMER)
        elif self.spec.url is not None and not self.finite:
            # A dead RTSP/HTTP peer would otherwise block open/read for FFmpeg's default (tens of seconds), and with
            # it stop() and the reopen backoff.
            cap = cv2.VideoCapture(target, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                                                         cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS])
        else:
            cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            raise OSError(f"{target}: cv2.VideoCapture cannot open it")
        self.cap = cap

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None

    def read(self, stop: threading.Event) -> Frame | None:
        ok, image = self.cap.read()
        if not ok:
            if self.finite:
                raise SourceEnded()
            raise OSError(f"{self.spec.target}: no frame (stream dropped or device unplugged)")
        frame_id = str(self.counter)
        self.counter += 1
        now = self.clock()
        if image.shape[0] * image.shape[1] > self.camera.max_pixels:
            return self.frame(frame_id, now, None, f"frame {frame_id}: {image.shape[1]}x{image.shape[0]} pixels, "
                                                   f"expected at most max_pixels={self.camera.max_pixels}")
        try:
            return self.frame(frame_id, now, as_uint8_gray_or_rgb(image, what=f"frame {frame_id}"))
        except DataError as exc:
            return self.frame(frame_id, now, None, str(exc))


SOURCES: dict[str, type[Source]] = {
    "synthetic": SyntheticLineSource,
    "folder": FolderWatcher,
    "zmq": ZmqPullSource,
    "opencv": VideoCaptureSource,
}


def make_source(camera: cfg.CameraConfig, clock: Callable[[], float] = time.time) -> Source:
    return SOURCES[camera.source.kind](camera, clock)
