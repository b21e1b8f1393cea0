"""A ZeroMQ PULL socket as a camera: producers send multipart [JSON header, payload] (docs/PROTOCOL.md)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import structlog
from pydantic import model_validator

from engines.data.images import DEFAULT_BIT_DEPTH, PNG_SIGNATURE
from engines.errors import DataError
from engines.schema import declared, refuse
from inspectd.configfile import Endpoint
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.headers import ENCODINGS, check_and_decode, max_frame_bytes
from inspectd.daemon.ingest.source import READ_TIMEOUT_S, Source, SourceFatal, frame_id_of
from inspectd.daemon.security import Curve, CurveServer, open_ipc_to_group, refuse_served_ipc
from inspectd.daemon.socket_file import SOCKET_FILE_CHECK_S, SocketFile
from inspectd.errors import MessageError, one_line
from inspectd.protocol import wirejson
from inspectd.protocol.endpoints import take_endpoint
from inspectd.protocol.keys import is_local_endpoint
from inspectd.protocol.messages import printable

if TYPE_CHECKING:
    import zmq

    from inspectd.daemon import config as cfg

HEADER_FIELDS = {"camera", "frame_id", "t_capture", "shape", "dtype", "encoding"}
# Messages the daemon's socket holds beyond the one being read: enough to keep the ingest thread fed, few because a
# stop must take in (or refuse and log) each one, while a backlog left in the producer's own queue outlives a daemon
# restart (ZeroMQ sends it to the next daemon).
RCVHWM = 4
# The most messages a closing socket is emptied of: a bound, not a budget. It is unbound first, so it holds at most
# RCVHWM per producer connection and nothing more arrives.
CLOSE_DRAIN_MAX = 100_000
# A producer's frame id is published, journalled, archived and shown by every client: a name, not a payload.
MAX_FRAME_ID = 256
# A refusal quotes producer values and is repeated as the camera's last_error in every status message.
MAX_REASON = 300

log = structlog.get_logger("inspectd.ingest")


@declared
class ZmqSource:
    """A camera `source` of `kind: zmq`."""

    endpoint: Endpoint  # bound by the daemon; producers connect PUSH sockets to it
    # CurveZMQ: required when the endpoint is a network address, so only listed producers can feed the line.
    curve: Curve = None
    kind: Literal["zmq"] = "zmq"

    @model_validator(mode="after")
    def _network_needs_curve(self) -> ZmqSource:
        if self.curve is None and not is_local_endpoint(self.endpoint):
            refuse(
                "curve",
                f"required when endpoint is a network address ({self.endpoint}), expected "
                f"{{server_secret_key: PATH, allowed_clients_dir: DIR}} or a loopback/ipc endpoint",
                None,
            )
        return self


class ZmqPullSource(Source):
    """A PULL socket the daemon binds; producers send multipart [JSON header, payload]."""

    Options = ZmqSource
    narrows_16_bit = True

    def __init__(
        self,
        camera: cfg.CameraConfig,
        clock: Callable[[], float],
        bit_depth: int = DEFAULT_BIT_DEPTH,
        where: str | None = None,
    ) -> None:
        super().__init__(camera, clock, bit_depth, where)
        spec = cast(ZmqSource, camera.source)
        self.endpoint = spec.endpoint
        # Keys loaded (and their permissions checked) here, when the daemon builds its cameras: a bad key fails the
        # start, not a reopen loop.
        self.curve = (
            None
            if spec.curve is None
            else CurveServer(
                f"ingest-{camera.id}",
                spec.curve.server_secret_key,
                spec.curve.allowed_clients_dir,
                where=f"{self.where}.source",
            )
        )
        self.sock: zmq.Socket | None = None
        self.poller: zmq.Poller | None = None
        self.received = 0
        self.not_accepted = 0  # messages received but never handed on: still in the socket when it closed
        self._bound: str | None = None  # the address to unbind, while bound
        # The ipc socket file bound, and when it was last looked at. Bound again in place at most
        # socket_file.MAX_REBINDS times since the open: each leaves a listener on the file that was removed, open until
        # the socket closes, so that the producers connected through it lose nothing.
        self._socket_file = SocketFile()
        self._socket_file_seen = 0.0
        self._reopen_when_idle: str | None = None  # why the socket is to be reopened at its next idle read
        self._stop: threading.Event | None = None
        self._receiving = True
        self.drained = threading.Event()  # after stop_receiving(): everything the socket held has been read
        self._log = log.bind(camera=camera.id, source="zmq")

    def stop_receiving(self) -> threading.Event:
        """Take no more messages from producers (at the next read, on the ingest thread, which owns the socket: the
        endpoint is unbound), go on reading those the socket already holds, and set the event returned once it is
        empty. What producers have not handed over stays in their queues, for the daemon's next start."""
        self._receiving = False
        if self.sock is None:  # between opens, or the camera ended: nothing is held
            self.drained.set()
        return self.drained

    def open(self, stop: threading.Event) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.PULL)
        try:
            sock.linger = 0
            take_endpoint(sock, self.endpoint)
            sock.rcvhwm = RCVHWM
            # A message part larger than the largest frame this camera accepts makes ZeroMQ disconnect its producer
            # before the part is buffered, not parsed after. The limit is per part: a message of many parts, each
            # under it, is buffered whole before parse() sees how many it has (docs/PROTOCOL.md, Frame ingest).
            sock.maxmsgsize = max_frame_bytes(self.camera.max_pixels)
            if self.curve is not None:
                self.curve(sock)
            refuse_served_ipc(self.endpoint)  # another daemon's socket file: retried as a taken port is
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            if exc.errno in (zmq.EPROTONOSUPPORT, zmq.EINVAL):
                raise SourceFatal(f"{self.endpoint}: cannot bind ({exc}), expected a bindable ZeroMQ endpoint") from exc
            raise  # address in use (or an ipc path another process serves), ipc dir missing, ...: retry with backoff
        except BaseException:
            sock.close()  # at once, not at garbage collection: its watcher and descriptors go with it
            raise
        self.sock = sock  # close() closes it should the mode below fail: the supervisor reopens
        self._bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = stop
        open_ipc_to_group(sock)  # frame producers run as other users in the service's group
        self._reopen_when_idle = None
        self._socket_file_seen = time.monotonic()
        if (gone := self._socket_file.bound(self._bound)) is not None:
            raise gone
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def _unbind(self) -> None:
        import zmq

        assert self.sock is not None
        if self._bound is not None:
            bound, self._bound = self._bound, None
            try:
                # The connections go with the endpoint; the messages they delivered stay readable.
                self.sock.unbind(bound)
            except zmq.ZMQError as exc:
                self._log.warning("unbind_failed", endpoint=bound, error=one_line(exc))

    def close(self) -> None:
        """Close the socket, after reading what it still holds: those messages were handed over by their producers,
        which will not send them again, so each is logged as not accepted (`lost`), never dropped unseen."""
        import zmq

        if self.sock is None:
            return
        try:
            self._unbind()
            for _ in range(CLOSE_DRAIN_MAX):
                frame = self._take(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                if frame is not None:
                    self.not_accepted += 1
                    stopping = self._stop is not None and self._stop.is_set()
                    self._log.warning(
                        "frame_not_accepted",
                        frame_id=frame.frame_id,
                        seq=None,
                        lost=True,
                        reason="the daemon is stopping" if stopping else "the camera's socket is reopened",
                    )
        except zmq.ZMQError:
            pass  # empty (EAGAIN), or a socket that failed: nothing more can be read from it
        finally:
            self.sock.close(linger=0)
            self.sock = None
            self.poller = None
            if not self._receiving:
                self.drained.set()

    def stats(self) -> dict[str, int]:
        return {"not_accepted": self.not_accepted}

    def read(self, stop: threading.Event) -> Frame | None:
        assert self.sock is not None and self.poller is not None, "read() before open()"
        if not self._receiving and self._bound is not None:
            self._unbind()
        # Checked busy or idle: a camera that always has a message waiting never idles, and new producers could not
        # connect for as long as its load lasted.
        if self._bound is not None and self._socket_file.watched and self._reopen_when_idle is None:
            if time.monotonic() - self._socket_file_seen >= SOCKET_FILE_CHECK_S:
                self._check_socket_file()
        if not self.poller.poll(int(READ_TIMEOUT_S * 1000)):
            if not self._receiving:
                self.drained.set()
            elif self._reopen_when_idle is not None:
                raise OSError(self._reopen_when_idle)
            return None
        return self._take(self.sock.recv_multipart(copy=False))

    def _check_socket_file(self) -> None:
        """Bind the path again when the ipc socket file bound is gone or is another file (SocketFile.look): producers
        can no longer connect (a tmp cleaner or an operator removed it, or a process bound the path, which ZeroMQ
        unlinks first), while the socket itself would go on waiting without an error. The socket is bound to the path
        once more rather than closed: the producers connected through the old file stay connected, and nothing they
        handed over (in the socket, or on its way in the OS buffers, which a close drops) is lost. OSError, for the
        supervisor to reopen, where another process serves the path now (the reopen retries naming it, as for a
        taken port) or where the bind fails; past socket_file.MAX_REBINDS, at the first read that finds the socket
        idle."""
        assert self.sock is not None
        self._socket_file_seen = time.monotonic()
        found = self._socket_file.look(self.sock, self.endpoint)
        if found.kind == "unchanged":
            return
        if found.kind == "taken":
            raise OSError(
                f"{self.endpoint}: its socket file was bound by another process, which serves it now: producers "
                "reach that process, not this camera; binding again once the path is free"
            )
        if found.kind == "over_limit":
            # Not at once: a close drops what producers handed over that is still on its way in the OS buffers.
            self._reopen_when_idle = (
                f"{self.endpoint}: its socket file {found.what}, bound again {self._socket_file.rebinds} times: "
            )
            self._reopen_when_idle += "reopening"
            error = f"{self._reopen_when_idle} once no producer sends"
            self._log.warning("socket_file_gone", endpoint=self.endpoint, error=error)
            self.report_error(error)
            return
        if (failed := found.error or found.gone) is not None:  # the bind, the group's mode, or the file gone at once
            raise OSError(f"{self.endpoint}: its socket file {found.what}; binding it again failed ({failed})")
        error = f"{self.endpoint}: its socket file {found.what}: producers could not connect, bound again"
        self._log.warning("socket_file_rebound", endpoint=self.endpoint, error=error)
        self.report_error(error)

    def _take(self, parts: list) -> Frame | None:
        if self.curve is not None and not self.curve.admits(parts[0]):
            return None  # a producer whose key a reload removed: counted and logged as refused, never judged
        self.received += 1
        try:
            return self.parse(parts)
        except Exception as exc:  # noqa: BLE001 - a reopen would close the socket and lose the messages behind this one
            error = f"message {self.received}: cannot be read ({one_line(exc)})"
            return self._refused(f"msg{self.received}", self.clock(), error)

    def _refused(self, frame_id: str, t_capture: float, reason: str) -> Frame:
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 3] + "..."
        return self.frame(frame_id, t_capture, None, reason)

    def parse(self, parts: list) -> Frame:
        fallback_id = f"msg{self.received}"
        now = self.clock()
        if len(parts) != 2:
            return self._refused(fallback_id, now, f"message of {len(parts)} parts, expected 2: [JSON header, payload]")
        try:
            # A key given twice is refused, not settled by whichever comes last.
            header = wirejson.loads(
                parts[0].buffer,
                "header",
                "a JSON object {frame_id, t_capture, shape, dtype, encoding}",
                unique_keys=True,
            )
        except MessageError as exc:
            return self._refused(fallback_id, now, str(exc))
        if not isinstance(header, dict):
            return self._refused(fallback_id, now, f"header: {type(header).__name__}, expected a JSON object")
        frame_id = header.get("frame_id")
        frame_id = str(frame_id) if isinstance(frame_id, (str, int)) and not isinstance(frame_id, bool) else fallback_id
        frame_id = frame_id or fallback_id  # an empty id names nothing: refused in _decode under msg<N>
        t_capture = header.get("t_capture")
        t_capture = (
            float(t_capture)
            if isinstance(t_capture, (int, float)) and not isinstance(t_capture, bool) and math.isfinite(t_capture)
            else now
        )
        try:
            # A lone surrogate (what a Python producer's json.dumps writes for a non-UTF-8 file name) is written as
            # the folder camera writes it, \xNN: strict JSON decoders, the archive's index and PLC gateways refuse it.
            frame_id = frame_id_of(frame_id)
        except UnicodeEncodeError:
            return self._refused(
                fallback_id,
                t_capture,
                f"frame_id {_shown(frame_id)} holds a lone surrogate that stands for no byte, "
                "expected text (or \\udc80-\\udcff for an undecodable byte)",
            )
        if len(frame_id) > MAX_FRAME_ID:
            return self._refused(
                frame_id[:MAX_FRAME_ID],
                t_capture,
                f"frame_id of {len(frame_id)} characters, expected at most {MAX_FRAME_ID}",
            )
        try:
            image = self._decode(header, frame_id, parts[1].buffer)
        except DataError as exc:
            return self._refused(frame_id, t_capture, str(exc))
        return self.frame(frame_id, t_capture, image)

    def _decode(self, header: dict, frame_id: str, payload: memoryview) -> np.ndarray:
        # The producer's own id names the frame in every refusal; shown escaped when it holds a newline or another
        # control character, so a refusal stays one line.
        what = f"frame {_shown(frame_id)}"
        unknown = sorted(set(header) - HEADER_FIELDS)
        if unknown:
            known = ", ".join(sorted(HEADER_FIELDS))
            raise DataError(f"{what}: unknown header field {unknown[0]!r}, expected only {known}")
        if "frame_id" not in header:
            raise DataError(f"{what}: header has no frame_id, expected a string or integer")
        if not isinstance(header["frame_id"], (str, int)) or isinstance(header["frame_id"], bool):
            raise DataError(f"{what}: frame_id {header['frame_id']!r}, expected a string or integer")
        if header["frame_id"] == "":
            raise DataError(f"{what}: frame_id is empty, expected a non-empty string or an integer")
        if "t_capture" in header and not (
            isinstance(header["t_capture"], (int, float))
            and not isinstance(header["t_capture"], bool)
            and math.isfinite(header["t_capture"])
        ):
            raise DataError(f"{what}: t_capture {header['t_capture']!r}, expected epoch seconds (a number)")
        camera = header.get("camera")
        if camera is not None and camera != self.camera.id:
            raise DataError(
                f"{what}: header camera {camera!r} sent to camera {self.camera.id!r}'s endpoint, "
                f"expected {self.camera.id!r} or no camera field"
            )
        encoding = header.get("encoding", "raw")
        if encoding not in ENCODINGS:
            raise DataError(f"{what}: encoding {encoding!r}, expected one of {'|'.join(ENCODINGS)}")
        if encoding == "raw" and "dtype" not in header:
            raise DataError(f'{what}: raw frame without dtype, expected dtype "uint8"')
        dtype = header.get("dtype", "uint8")
        # A PNG names its own depth: one labelled honestly as 16-bit is narrowed by the bundle's depth like any other.
        if dtype != "uint8" and not (encoding == "png" and dtype == "uint16"):
            accepted = '"uint8" or "uint16"' if encoding == "png" else '"uint8"'
            hint = "" if encoding == "png" else " (16-bit frames go as png)"
            raise DataError(f"{what}: dtype {dtype!r}, expected {accepted} for a {encoding} payload{hint}")
        shape = header.get("shape")
        if shape is not None:
            if (
                not isinstance(shape, list)
                or len(shape) not in (2, 3)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            ):
                raise DataError(f"{what}: shape {shape!r}, expected [height, width] or [height, width, channels]")
            if len(shape) == 3 and shape[2] not in (1, 3):
                raise DataError(f"{what}: shape {shape} has {shape[2]} channels, expected 1 or 3")
            if shape[0] * shape[1] > self.camera.max_pixels:
                raise DataError(
                    f"{what}: shape {shape} is {shape[0] * shape[1]} pixels, "
                    f"expected at most max_pixels={self.camera.max_pixels}"
                )
        if encoding == "png" and header.get("dtype") == "uint8":
            # A PNG names its own depth: 16 bits under a "uint8" label is a producer wrong about what it sends
            # (frames it believes narrowed to 8 bits going out as 16-bit), told here rather than narrowed unsaid.
            # "uint16" is a ceiling a producer of mixed depths may state for every frame: an 8-bit PNG under it is
            # taken as it is.
            depth = _png_depth(payload)
            if depth == 16:
                raise DataError(f'{what}: dtype "uint8" for a png of bit depth 16, expected "uint16" (or no dtype)')
        if encoding == "raw":
            if shape is None:
                raise DataError(f"{what}: raw frame without shape, expected shape [height, width(, channels)]")
            expected = math.prod(shape)
            if len(payload) != expected:
                raise DataError(f"{what}: payload {len(payload)} bytes, expected {expected} for shape {shape} uint8")
            # Zero-copy: the array views the received message, which it keeps alive.
            image: np.ndarray = np.frombuffer(payload, dtype=np.uint8).reshape(shape)
            return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        image = check_and_decode(payload, what, self.camera.max_pixels, expected=encoding, bit_depth=self.bit_depth)
        if shape is not None:
            h, w = shape[0], shape[1]
            c = shape[2] if len(shape) == 3 else 1
            got_c = image.shape[2] if image.ndim == 3 else 1
            if image.shape[:2] != (h, w) or got_c != c:
                raise DataError(f"{what}: decoded {encoding} is {list(image.shape)}, expected header shape {shape}")
        return image


def _png_depth(payload: memoryview) -> int | None:
    """The bit depth a PNG's IHDR declares (1, 2, 4, 8 or 16), before decoding; None for a payload that is not a PNG,
    which check_and_decode refuses naming what it is."""
    if len(payload) < 25 or payload[:8] != PNG_SIGNATURE or payload[12:16] != b"IHDR":
        return None
    return int(payload[24])


def _shown(frame_id: str) -> str:
    """The producer's id as a reason names it: escaped (one line), and short enough that the reason's cap leaves room
    for what was wrong (an id of control characters escapes to six characters each)."""
    shown = printable(frame_id[:80])
    return shown if len(shown) <= 100 else shown[:97] + "..."
