"""OpenCV VideoCapture as a camera: a video file, an RTSP/HTTP stream, a device or a GStreamer pipeline."""

from __future__ import annotations

import collections
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast
from urllib.parse import unquote

import cv2
import structlog
from pydantic import AfterValidator, Field, PlainValidator, ValidationInfo, model_validator

from engines.data.images import DEFAULT_BIT_DEPTH, as_uint8_gray_or_rgb
from engines.errors import DataError
from engines.schema import Int, Text, declared, invalid, show
from inspectd.configfile import resolve
from inspectd.daemon.frames import Frame
from inspectd.daemon.ingest.source import READ_TIMEOUT_S, Source, SourceEnded

if TYPE_CHECKING:
    from inspectd.daemon import config as cfg

STREAM_TIMEOUT_MS = 5000  # network video streams and pipelines: how long open and each read may block
MAX_DEVICE = 1023  # /dev/videoN: far above any real count, far below what VideoCapture refuses as not a C int
VIDEO4LINUX_MAJOR = 81  # the kernel's character device major of every V4L2 node
_VIDEO_NODE = re.compile(r"/dev/video(\d+)")
# Undecodable frames in a row a video file may hold before the rest counts as its end: the reads that find the end
# return at once, so looking this far ahead costs nothing.
MAX_UNDECODABLE_RUN = 64
# A failed read of a clip over the network that took this long was a stalled peer, not an undecodable frame: looking
# further would block stop() for a read timeout per frame.
STALLED_READ_S = STREAM_TIMEOUT_MS / 2000
# Frames past its count after which a url over the network is a live stream (an endless AVI), not a clip whose count
# was an estimate a little short (ended, never replayed): this many, or a quarter of the count if more.
OUTRUN_MARGIN = 30
log = structlog.get_logger("inspectd.ingest")
# A dead RTSP/HTTP peer, or a pipeline whose appsink stops delivering, would otherwise block open/read for the
# backend's default (30 s), and with it stop() and the reopen backoff.
TIMEOUTS = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
# OpenCV's GStreamer backend takes them from 4.7 on; an older one (Debian 12's is 4.6) refuses to open with them.
GSTREAMER_TIMEOUTS = tuple(int(part) for part in cv2.__version__.split(".")[:2] if part.isdigit()) >= (4, 7)


def silence_opencv() -> None:
    """Keep OpenCV's and FFmpeg's own messages (a refused RTSP connection, a V4L2 device that is not there, once per
    reopen) out of the daemon's output, whose every line must be JSON (docs/DEPLOY.md, Logs). OpenCV read
    OPENCV_LOG_LEVEL when cv2 loaded, so its level is set here unless the operator set that variable; FFmpeg's is read
    from OPENCV_FFMPEG_LOGLEVEL once, at the first capture FFmpeg opens. A level FFmpeg would print at goes to stdout,
    the log itself, so it is quiet (-8) unless the operator asks for it."""
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


# At import, on the thread that loads the config: before any camera thread opens a capture, and before any thread that
# could read the environment while it is written.
silence_opencv()


# The schemes of the urls FFmpeg (OpenCV's backend for them) reads: the names of libavformat's protocols
# (libavformat/protocols.c; those on external libraries by the names they register: libsrt srt, librist rist, libssh
# sftp, libsmbclient smb, libzmq zmq, libamqp amqp, librtmfp rtmfp, android_content content) less the write-only ones
# (icecast, md5, prompeg, tee), and those of its demuxers that open a url themselves (rtsp, rtsps, satip, sap). A build
# may lack some of them: such a url still loads and its camera retries with FFmpeg's reason, as any unreachable one.
FFMPEG_SCHEMES = frozenset(
    "amqp async bluray cache concat concatf content crypto data dtls fd ffrtmpcrypt ffrtmphttp file ftp gopher "
    "gophers hls http httpproxy https ipfs ipns mmsh mmst pipe rist rtmfp rtmp rtmpe rtmps rtmpt rtmpte rtmpts rtp "
    "rtsp rtsps sap satip sctp sftp shared smb srt srtp subfile tcp tls udp udplite unix zmq".split()
)
FFMPEG_NESTING = ("hls", "crypto")  # taken as outer+inner as well: hls+http://, crypto+file://
# FFmpeg's protocols that read local files (one, a list, part of one, the url itself) or a descriptor this process
# inherited: where a regular file's frames end the video ends, as a video file path's does. Taken as a stream, a failed
# read at the end reopened the url and played it again from its first frame, judged as new parts. The file a path,
# file:// or concat: url names decides (is_finite_url): a named pipe or a device goes on after each end.
LOCAL_SCHEMES = frozenset({"file", "concat", "concatf", "subfile", "data", "fd", "pipe"})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")  # RFC 3986's scheme, at the start of the url
_PROTOCOL = re.compile(r"([A-Za-z0-9+.-]+):")  # the protocol FFmpeg opens a url with, when the url names one
_SLASHLESS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?!//)")  # rtsp:/host, rtsp:host: a url missing a slash


def scheme_of(url: str) -> str | None:
    """The url's scheme, None for a video file path (also one with "://" further on, as FFmpeg reads it)."""
    match = _SCHEME.match(url)
    return match.group(1) if match else None


def is_finite_url(url: str) -> bool:
    """Whether a camera's url (a path resolved already) is a video that ends rather than a stream that drops and is
    reopened, from what it names on disk now: a path, file:// or concat: url is one when each file it names is a
    regular file (or is not there yet); another local scheme, or crypto+ one, is one; any other scheme is a stream."""
    path = video_path(url)
    if path is not None:
        return _ends(path)
    scheme = scheme_of(url)
    assert scheme is not None  # video_path takes every url without one
    outer, _, inner = scheme.partition("+")
    if scheme == "concat":
        return all(_ffmpeg_url_ends(member) for member in url[len("concat:") :].split("|"))
    if outer == "crypto" and inner == "file":
        return _ffmpeg_url_ends(url[len("crypto+") :])
    return scheme in LOCAL_SCHEMES or (outer == "crypto" and inner in LOCAL_SCHEMES)


def over_network(url: str) -> bool:
    """Whether FFmpeg reads the url over a network protocol (http, rtsp, ...; hls+http), not local data."""
    scheme = scheme_of(url)
    if scheme is None:
        return False
    outer, _, inner = scheme.partition("+")
    return scheme not in LOCAL_SCHEMES and not (outer in FFMPEG_NESTING and inner in LOCAL_SCHEMES)


def _ends(path: str) -> bool:
    """Whether the file at `path` is a video that ends: a regular file, or nothing there yet (a recording to come,
    retried as not found until it is there). A named pipe goes on with its writer's next pass, a device with its next
    frame, so each, and anything else that is not a regular file, is a stream: reopened at its end, read while
    paused, drop_oldest by default. So is /dev/videoN while it is unplugged."""
    if video_device_of(path) is not None:
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, out of this user's reach, or a path no file can have
        return True


def _ffmpeg_url_ends(url: str) -> bool:
    """A url FFmpeg opens itself (a concat: member, crypto+'s inner url): one of its file protocol (a path, or file:
    and the path, undecoded as FFmpeg reads it) ends as that file does; one of another protocol is a stream."""
    protocol = _PROTOCOL.match(url)
    if protocol is None:
        return _ends(url)
    return protocol.group(1) == "file" and _ends(url[len("file:") :])


def file_url_path(url: str) -> str | None:
    """The path a file:// url names: what follows `file:`, no host (file:///a/b.avi is /a/b.avi), its %XX escapes
    decoded as RFC 8089 writes a path (file:///srv/my%20video.avi is "/srv/my video.avi"); None for any other url.
    FFmpeg's file protocol decodes none, so the url is never handed to it: an escaped name was never found."""
    if scheme_of(url) != "file":
        return None
    return "/" + unquote(url[len("file:") :].lstrip("/"), errors="surrogateescape")


def video_device_of(path: str) -> int | None:
    """N when `path` names the V4L2 device /dev/videoN: that node or a link to it (/dev/v4l/by-id/...), there or
    not (unplugged), or another node of video4linux's major that the kernel knows as videoN; else None."""
    try:
        node = _VIDEO_NODE.fullmatch(os.path.realpath(path))
        st = None if node else os.stat(path)
    except (OSError, ValueError):
        return None
    if st is not None:
        if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != VIDEO4LINUX_MAJOR:
            return None
        try:
            name = os.readlink(f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        except OSError:
            return None  # no such device on this machine: opened as the node it is, which then fails
        node = re.fullmatch(r"video(\d+)", os.path.basename(name))
    device = int(node.group(1)) if node else None
    return device if device is not None and device <= MAX_DEVICE else None


def video_path(url: str) -> str | None:
    """The file a camera's url is opened as: the url itself when it has no scheme, the path a file:// url names;
    None for a url of another scheme, which FFmpeg opens itself."""
    return url if scheme_of(url) is None else file_url_path(url)


def _check_scheme(scheme: str) -> None:
    """Refuse a scheme no backend of this OpenCV opens, at load: the camera would otherwise retry it forever."""
    if scheme in FFMPEG_SCHEMES or scheme.partition("+")[0] in FFMPEG_NESTING:
        return
    if gstreamer_built_in():
        return  # GStreamer's uridecodebin takes any scheme an installed plugin handles (v4l2://, ...): not listable
    if scheme.lower() in FFMPEG_SCHEMES:
        raise invalid(f"scheme {scheme!r} must be lower case ({scheme.lower()}://): FFmpeg matches it exactly")
    raise invalid(
        f"unknown scheme {scheme!r}, expected one FFmpeg reads (rtsp, rtsps, http, https, rtmp, srt, udp, rtp, tcp, "
        "...: docs/CAMERAS.md lists them all) or a video file path"
    )


def _url(value: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(f"expected a string (rtsp://, http://, file path), got {show(value)}")
    scheme = scheme_of(value)
    if scheme is None:
        slashless = _SLASHLESS.match(value)
        if slashless and slashless.group(1).lower() in FFMPEG_SCHEMES:
            # Read as a file path, it would be a file beside the config that is never there: reopened forever.
            name = slashless.group(1)
            raise invalid(f"scheme {name!r} without '//' in {value!r}, expected {name}://HOST/... or a video file path")
        value = str(resolve(value, info))  # a video file, relative to the config file
    else:
        _check_scheme(scheme)
        if scheme == "file":
            _check_file_url(value)
    path = video_path(value)
    if path is not None and os.path.isdir(path):
        # It would be retried for ever: a folder of images is a camera of kind folder.
        raise invalid(
            f"{path} is a directory, expected a video file, a named pipe or a video device (a folder of images is a "
            "camera of kind folder)"
        )
    return value


def _check_file_url(url: str) -> None:
    if not url.startswith("file:///"):
        # FFmpeg reads file://host/a.avi as the path //host/a.avi, and file://videos/a.avi as /videos/a.avi.
        raise invalid(
            f"{url!r} names a host or a relative path, expected file:///ABSOLUTE/PATH or a plain video file path "
            "(relative to the config file)"
        )
    if "?" in url:
        # A file has no options to ask for: FFmpeg would look for a file whose name holds the query.
        query = url[url.index("?") :]
        raise invalid(
            f"{url!r} has a query string ({query}), expected file:///ABSOLUTE/PATH alone (a '?' in a file name is "
            "written %3F)"
        )
    path = file_url_path(url)
    assert path is not None
    try:
        path.encode()
    except UnicodeEncodeError:
        raise invalid(f"{url!r} has %XX escapes that are not UTF-8, expected the escapes of a UTF-8 path") from None
    if "\0" in path:
        raise invalid(f"{url!r} decodes to a path with a NUL byte (%00), expected a path")


def gstreamer_built_in() -> bool:
    """Whether this OpenCV was built with GStreamer (PyPI's opencv-python wheels are not)."""
    for line in cv2.getBuildInformation().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "GStreamer":
            return value.strip().upper().startswith("YES")
    return False


def _pipeline(value: str) -> str:
    if not gstreamer_built_in():
        raise invalid(
            f"this OpenCV ({cv2.__version__}) is built without GStreamer, so a pipeline cannot open; use url or "
            "device, or install an OpenCV built with GStreamer"
        )
    return value


@declared
class OpenCVSource:
    """A camera `source` of `kind: opencv`: exactly one of url, device, pipeline."""

    url: Annotated[str, PlainValidator(_url)] | None = None  # rtsp://, http://, or a (resolved) video file path
    device: Annotated[Int, Field(ge=0, le=MAX_DEVICE)] | None = None  # /dev/videoN index
    pipeline: Annotated[Text, AfterValidator(_pipeline)] | None = None  # GStreamer pipeline string
    kind: Literal["opencv"] = "opencv"

    @model_validator(mode="after")
    def _exactly_one(self) -> OpenCVSource:
        given = [key for key in ("url", "device", "pipeline") if getattr(self, key) is not None]
        if len(given) != 1:
            raise invalid(f"expected exactly one of url, device, pipeline, got {', '.join(given) or 'none'}")
        return self

    @property
    def target(self) -> str | int:
        """What cv2.VideoCapture is opened with."""
        target = self.device if self.device is not None else self.url if self.url is not None else self.pipeline
        assert target is not None  # the declaration holds exactly one of them
        return target


class VideoCaptureSource(Source):
    """cv2.VideoCapture on a video file (a path or file:// url naming a regular file, or another local scheme: it
    ends, and is not read while paused), a named pipe or a device named by a path (streams), an RTSP/HTTP URL, a
    device index or a GStreamer pipeline."""

    Options = OpenCVSource

    def __init__(
        self,
        camera: cfg.CameraConfig,
        clock: Callable[[], float],
        bit_depth: int = DEFAULT_BIT_DEPTH,
        where: str | None = None,
    ) -> None:
        super().__init__(camera, clock, bit_depth, where)
        self.spec = cast(OpenCVSource, camera.source)  # the supervisor builds this class for kind opencv only
        # Only a GStreamer pipeline can deliver 16-bit frames (GRAY16_LE); a url or device gives 8-bit BGR, so such a
        # camera does not tie the daemon to the bit depth of the bundle it started with.
        self.narrows_16_bit = self.spec.pipeline is not None
        url = self.spec.url
        self.finite = False
        self._ends_or_not()
        # The file to open: a file:// url is opened as the path it names, so it plays as that path would.
        self.path = None if url is None else video_path(url)
        self.cap: cv2.VideoCapture | None = None
        self.pipe_fd: int | None = None  # a named pipe's read descriptor, FFmpeg's to read and ours to close
        self.opened_as = ""  # what the capture was opened as, where the url does not say it: " (video device N)"
        self.counter = 0
        self.counted = 0  # the frames a clip over the network counts (http://nas/shift.avi); 0 for any other video
        self.first = 0  # the id of the first frame this open read
        # A url over the network that gave more frames than it counted: a live stream whose container states a count
        # (an endless AVI), reopened at each drop from then on rather than ended for good.
        self.outran_count = False
        self.pending: collections.deque[Frame] = collections.deque()

    def _ends_or_not(self) -> None:
        """Whether the url is a video that ends, from what it names now (a recording may have been replaced by a
        named pipe since the load, or the other way round)."""
        self.finite = self.spec.url is not None and is_finite_url(self.spec.url)
        # A video that ends is not read while paused, as a folder is not: it has no current frame to keep up with,
        # and read at decode speed a short pause threw the rest of it away.
        self.live = not self.finite

    def open(self, stop: threading.Event) -> None:
        target = self.spec.target
        self._ends_or_not()
        if self.spec.pipeline is not None:
            cap = cv2.VideoCapture(target, cv2.CAP_GSTREAMER, TIMEOUTS if GSTREAMER_TIMEOUTS else [])
        elif self.path is not None:
            opened = self._open_path(stop)
            if opened is None:
                return  # stopped while it waited for a named pipe's writer
            cap = opened
        elif self.spec.url is not None:
            # Also the other local schemes: a pipe or descriptor whose writer stalls must not hold stop() longer.
            cap = cv2.VideoCapture(target, cv2.CAP_ANY, TIMEOUTS)
        else:
            cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            self.close()
            raise OSError(f"{target}: cv2.VideoCapture cannot open it{self.opened_as}{self._why_not_opened()}")
        self.cap = cap
        self.counted = 0
        self.first = self.counter
        if not self.finite and not self.outran_count and self.spec.url is not None and over_network(self.spec.url):
            # A recorded clip on a web server or NAS counts its frames; a live stream (rtsp, MJPEG over http) does
            # not (FFmpeg gives it a negative count). Taken as a stream, the clip's end was a drop: reopened and
            # played again from its first frame, each pass judged as new parts. A local url is judged by what it
            # names on disk instead: a named pipe's clip counts its frames too, and its writer's next pass follows.
            counted = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            if counted > 0:
                self.counted = int(counted)
                self.finite = True
                self.live = False

    def _why_not_opened(self) -> str:
        """What can be told of a failed open beyond OpenCV's word: for a device, what its node says; nothing for a url
        or a pipeline, as OpenCV gives no reason (its setExceptionMode error is "could not open" too) and FFmpeg's
        (Connection refused, 404) went only to FFmpeg's log, silenced above."""
        device = self.spec.device
        if device is None and self.path is not None:
            device = video_device_of(self.path)
        if device is None:
            return ""
        node = f"/dev/video{device}"
        try:
            # The kernel's word on the node, which OpenCV's V4L2 backend only writes to its own log.
            os.close(os.open(node, os.O_RDWR | os.O_NONBLOCK))
        except FileNotFoundError:
            return f": no {node} (unplugged, or another index)"
        except OSError as exc:
            return f": {node}: {exc.strerror}"
        return f": {node} opens, but gives no video (a metadata node, or in use by another process)"

    def _open_path(self, stop: threading.Event) -> cv2.VideoCapture | None:
        """The capture of the file a path or file:// url names, opened as what it is now: a video file; a V4L2 device
        as `device` opens it; a named pipe once a writer holds it (None: stopped before one did); anything else as a
        stream."""
        assert self.path is not None
        device = video_device_of(self.path)
        if device is not None:
            # By its index, as `device: N`: this OpenCV's V4L2 backend opens no device by name, and FFmpeg would
            # read the node as a file.
            self.opened_as = f" (video device {device})"
            return cv2.VideoCapture(device)
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.spec.target}: video file not found") from None
        if stat.S_ISREG(mode):
            return cv2.VideoCapture(self.path)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(
                f"{self.spec.target}: a directory, expected a video file, a named pipe or a video device"
            )
        if not stat.S_ISFIFO(mode):
            return cv2.VideoCapture(self.path, cv2.CAP_ANY, TIMEOUTS)
        self.pipe_fd = _pipe_with_a_writer(self.path, stop)
        if self.pipe_fd is None:
            return None
        # FFmpeg reads the descriptor held, not the path: its own open of the path would block in the kernel, past
        # any timeout, whenever the writer had already written its whole pass and gone. The descriptor stays
        # non-blocking, so a writer that stops writing times the read out as a dead stream's does.
        return cv2.VideoCapture(f"pipe:{self.pipe_fd}", cv2.CAP_ANY, TIMEOUTS)

    def unread(self) -> list[Frame]:
        frames = list(self.pending)
        self.pending.clear()
        return frames

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
        if self.pipe_fd is not None:  # FFmpeg's pipe protocol leaves the descriptor it was given open
            os.close(self.pipe_fd)
            self.pipe_fd = None

    def read(self, stop: threading.Event) -> Frame | None:
        assert self.cap is not None, "read() before open()"
        if self.pending:
            return self.pending.popleft()
        ok, image = self.cap.read()
        if not ok and self.counted and self.counter - self.first > self.counted + max(OUTRUN_MARGIN, self.counted // 4):
            self.outran_count = True
            self.counted, self.finite, self.live = 0, False, True
            log.warning(
                "video_outran_count",
                camera=self.camera.id,
                url=self.spec.target,
                effect="taken for a live stream: reopened at each drop, never ended",
            )
        elif not ok and self.finite:
            ok, image = self._past_undecodable()
        if not ok:
            raise OSError(f"{self.spec.target}: no frame (stream dropped or device unplugged)")
        frame = self._frame(image)
        if self.pending:  # the undecodable frames before this one come first
            self.pending.append(frame)
            return self.pending.popleft()
        return frame

    def _frame(self, image: Any) -> Frame:
        frame_id = str(self.counter)
        self.counter += 1
        now = self.clock()
        if image is None or image.size == 0:
            # Never a reopen: on a video file that would start again from its first frame.
            return self.frame(frame_id, now, None, f"frame {frame_id}: empty frame from VideoCapture (undecodable)")
        if image.shape[0] * image.shape[1] > self.camera.max_pixels:
            return self.frame(
                frame_id,
                now,
                None,
                f"frame {frame_id}: {image.shape[1]}x{image.shape[0]} pixels, "
                f"expected at most max_pixels={self.camera.max_pixels}",
            )
        try:
            return self.frame(frame_id, now, as_uint8_gray_or_rgb(image, f"frame {frame_id}", self.bit_depth))
        except DataError as exc:
            return self.frame(frame_id, now, None, str(exc))

    def _past_undecodable(self) -> tuple[bool, Any]:
        """After a video file's read failed: the next frame that decodes, with an error Frame queued for each one
        before it that did not (FFmpeg skips a corrupt frame and goes on with the next), or SourceEnded when none
        does. Undecodable frames at the very end cannot be told from the end: the container's frame count may be
        an estimate. A clip over the network ends too where its connection dropped or stalled (a reopen would play
        it again from its first frame), and says so when that is short of its count."""
        assert self.cap is not None
        for skipped in range(1, MAX_UNDECODABLE_RUN + 1):
            started = time.monotonic()
            ok, image = self.cap.read()
            if ok:
                self.pending.extend(self._frame(None) for _ in range(skipped))
                return ok, image
            if self.counted and time.monotonic() - started >= STALLED_READ_S:
                break
        taken = self.counter - self.first
        if taken < self.counted:
            cut = (
                f"{self.spec.target}: ended after {taken} frames, expected {self.counted} (the clip's frame count): "
                "its connection dropped or stalled, or the count was an estimate"
            )
            self.report_error(cut)
            log.warning("video_cut_short", camera=self.camera.id, error=cut)
        raise SourceEnded()


def _pipe_with_a_writer(path: str, stop: threading.Event) -> int | None:
    """A non-blocking read descriptor of the named pipe at `path`, once a writer has written to it; None when `stop`
    came first. FFmpeg's own open of a pipe blocks until a writer comes, which stop() could not cut short."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # Linux reports no hang-up on a pipe opened so until a writer has come: this waits for the first byte.
        while not stop.is_set():
            if poller.poll(int(READ_TIMEOUT_S * 1000)):
                return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None
