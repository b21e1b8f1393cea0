"""The daemon's config file, declared: one frozen dataclass per section, every value validated at load.

Owns the daemon's schema and its defaults (deploy/inspectd.example.yaml shows every key). What config chooses among
declares its own options where it lives: each camera source in its module under inspectd.daemon.ingest (`source` is
the union of those, chosen by its `kind`), each engine backend in its module under engines.runtime (`engine.options`
are the chosen `backend`'s `Options`). Every refusal is one ConfigError whose message starts with the key path
(`cameras[1].source.url: expected ..., got 5`), so an operator can find the line to fix without reading code. Unknown
keys are refused rather than ignored: a misspelt key silently falling back to its default is the worst kind of config
bug on a production line.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import operator
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engines.errors import EngineError
from engines.runtime import BACKENDS, backend_class
from engines.schema import Flag, Int, Number, check, declared, invalid, matching, one_of, refuse, show
from inspectd.configfile import (
    CameraId,
    ConfigPath,
    Endpoint,
    StatePath,
    ipc_path_problem,
    parse,
    read_yaml,
    resolve,
)
from inspectd.daemon.inference import MASK_POLICIES
from inspectd.daemon.ingest import SOURCES
from inspectd.daemon.ingest.opencv import is_finite_url, scheme_of, video_device_of, video_path
from inspectd.daemon.ingest.queue import QUEUE_POLICIES
from inspectd.daemon.ingest.synthetic import SyntheticSource
from inspectd.daemon.security import Curve
from inspectd.errors import ConfigError
from inspectd.logs import LOG_FORMATS, LOG_LEVELS
from inspectd.protocol.keys import is_local_endpoint

STATION_RE = r"[a-z0-9_-]+"
DEFAULT_STATE_DIR = Path("/var/lib/inspectd")
# The units' TimeoutStopSec (90 s) holds this plus what a stop takes past it (the publish and archive graces, closing
# sockets and engines): with more, systemd would SIGKILL the drain half-way and accepted frames lose their results.
MAX_SHUTDOWN_TIMEOUT_S = 60


@declared
class ModelConfig:
    bundle: ConfigPath


@declared
class EngineConfig:
    backend: Annotated[str, one_of(BACKENDS)] = "onnxruntime"
    # A plain mapping of what the file sets, as engines.runtime.open_engine takes it, checked here against the chosen
    # backend's own `Options` declaration (engines.runtime.*_backend).
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @field_validator("backend", mode="after")
    @classmethod
    def _importable(cls, name: str) -> str:
        try:
            backend_class(name)  # its module declares its options; it imports without the backend's library
        except EngineError as exc:
            raise invalid(str(exc)) from None
        return name

    @field_validator("options", mode="before")
    @classmethod
    def _backend_options(cls, raw: Any, info: ValidationInfo) -> Any:
        backend = info.data.get("backend")
        if backend is None:
            return {}  # the backend was refused: that is the error to report
        options: Any = check(backend_class(backend).Options, raw, info.context)
        return {key: getattr(options, key) for key in raw or {}}


@declared
class BatchingConfig:
    max_batch: Annotated[Int, Field(ge=1, le=256)] = 8
    # Bounded like every wait in here: a timeout beyond what time_t holds (1e10 s) raises OverflowError in the
    # thread that waits, long after the config loaded.
    max_wait_ms: Annotated[Number, Field(ge=0, le=3_600_000)] = 10.0


# kind -> that source's own declaration (inspectd.daemon.ingest.SOURCES: kind -> source class with `Options`).
SOURCE_OPTIONS: dict[str, type] = {kind: source.Options for kind, source in SOURCES.items()}


def _by_kind(raw: Any, info: ValidationInfo) -> Any:
    """A camera's `source`, checked against the declaration its `kind` names. Chosen here rather than by pydantic's
    discriminated union so that error paths stay the file's own (pydantic would insert the kind into them)."""
    kinds = "|".join(SOURCE_OPTIONS)
    if isinstance(raw, tuple(SOURCE_OPTIONS.values())):
        return raw  # declared in code, already validated
    if not isinstance(raw, dict):
        raise invalid(f"expected a mapping with kind {kinds}, got {show(raw)}")
    if "kind" not in raw:
        refuse("kind", f"required, expected one of {kinds}", None)
    kind = raw["kind"]
    if not isinstance(kind, str) or kind not in SOURCE_OPTIONS:
        refuse("kind", f"expected one of {kinds}, got {show(kind)}", kind)
    return check(SOURCE_OPTIONS[kind], raw, info.context)


if TYPE_CHECKING:  # a type checker cannot follow a union built at run time; each source casts to its own
    Source = Any
else:  # the union of the sources' declarations, built from the registry (one line there adds a source kind)
    Source = Annotated[functools.reduce(operator.or_, SOURCE_OPTIONS.values()), BeforeValidator(_by_kind)]


# Frames a camera's queue may hold: each is a whole image, so far more than this would only fill the memory.
MAX_QUEUE = 10_000
# A TiB, for every size in MiB (queue, journal, archive): a typing slip past it is refused rather than taken as no
# bound, and a float near its largest (1e303, written to mean "no limit") made int(max_mb * 2**20) infinite, an
# OverflowError at start after `run --check` had passed it.
MAX_MB = 1 << 20


@declared
class QueueConfig:
    size: Annotated[Int, Field(ge=1, le=MAX_QUEUE)] = 64
    # drop_oldest, except for a source that ends, whose every frame is a part to judge: a folder, and an opencv
    # video file (a url without a scheme, file:// or another local one, naming a regular file): block there
    # (CameraConfig). Set it to keep drop_oldest for those too.
    policy: Annotated[str, one_of(QUEUE_POLICIES)] = "drop_oldest"
    # The bytes of the images queued, in MiB: the frame count alone let a camera of large frames (50 MP in colour is
    # 150 MB a frame) hold gigabytes. Whichever bound comes first applies, with the policy.
    max_mb: Annotated[Number, Field(gt=0, le=MAX_MB)] = 512.0

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * (1 << 20))


@declared
class CameraConfig:
    id: CameraId
    source: Source
    queue: QueueConfig = QueueConfig()
    # At most what OpenCV's decoders take (CV_IO_MAX_IMAGE_PIXELS): they raise above it.
    max_pixels: Annotated[Int, Field(ge=1, le=1 << 30)] = 50_000_000

    @model_validator(mode="before")
    @classmethod
    def _finite_sources_block(cls, raw: Any, info: ValidationInfo) -> Any:
        # A folder is a backlog of files, and a video file a recording, each frame of which is a part to inspect:
        # dropping them is never the right default. A video file is decoded as fast as FFmpeg goes, so with
        # drop_oldest most of it was dropped as soon as the batcher fell behind. A named pipe or a device is a live
        # stream: blocking there would stall its writer, out of sight of every counter.
        source = raw.get("source") if isinstance(raw, dict) else None
        url = source.get("url") if isinstance(source, dict) else None
        if isinstance(url, str) and url and scheme_of(url) is None:
            try:
                url = str(resolve(url, info))  # as the url's own validator resolves it
            except PydanticCustomError:
                return raw  # a path no system call could take: the url's own validator refuses it
        if isinstance(source, dict) and (
            source.get("kind") == "folder"
            or (source.get("kind") == "opencv" and isinstance(url, str) and is_finite_url(url))
        ):
            queue = raw.get("queue")
            queue = {} if queue is None else queue
            if isinstance(queue, dict) and "policy" not in queue:
                return {**raw, "queue": {**queue, "policy": "block"}}
        return raw


# Two of the journal's smallest segments (64 KiB, shared by the cameras: inspectd.daemon.journal). Rotation deletes
# whole closed segments to make room for the next, so under a cap this small the journal kept only each camera's open
# segment (at 0.0001, one result), and the replay that bridges and `subscribe --since` catch up from was gone unsaid;
# at 1e-9 the start failed (exit 1, retried). Here one camera keeps some 400 results, eight some 30 to 50 each.
MIN_JOURNAL_MB = 0.125


@declared
class JournalConfig:
    # On by default: without a journal seq restarts at 0 after every restart, and subscribers and PLC bridges that
    # remember the last seq they saw would drop the new results as stale.
    enabled: Flag = True
    path: StatePath | None = None  # a directory (inspectd.protocol.journal); None: <state_dir>/journal
    max_mb: Annotated[Number, Field(ge=MIN_JOURNAL_MB, le=MAX_MB)] = 256.0
    fsync_interval_s: Annotated[Number, Field(gt=0, le=60)] = 1.0  # the most a power cut may cost


def _bounded_hwm(sndhwm: int) -> int:
    # ZeroMQ reads 0 as no limit: the PUB socket would then queue every result for a subscriber that stopped reading
    # (a frozen bridge, a paused pager), and the daemon's memory would grow until it is killed.
    if sndhwm < 1:
        raise invalid(
            f"expected at least 1, got {show(sndhwm)} (0 is no limit to ZeroMQ: one stuck subscriber would grow the "
            "daemon's memory without bound)"
        )
    return sndhwm


def _not_null(raw: Any, off: str) -> Any:
    # A null section is read as an empty one elsewhere (all defaults), but here that is the section turned on, while
    # `curve: null` and `listen: null` turn things off: which one was meant is a guess, so the operator writes it.
    if raw is None:
        raise invalid(f"null, expected {off} to turn it off, or the section left out for its defaults")
    return raw


@declared
class PublishConfig:
    endpoint: Endpoint = "tcp://127.0.0.1:5556"
    masks: Annotated[str, one_of(MASK_POLICIES)] = "defects"
    # Per subscriber, the most results queued for it (ZeroMQ takes a C int).
    sndhwm: Annotated[Int, Field(le=2**31 - 1), AfterValidator(_bounded_hwm)] = 1000
    status_interval_s: Annotated[Number, Field(gt=0, le=3600)] = 1.0
    journal: JournalConfig = JournalConfig()
    curve: Curve = None  # None: results published in the clear

    @field_validator("journal", mode="before")
    @classmethod
    def _journal_not_null(cls, raw: Any) -> Any:
        return _not_null(raw, "enabled: false")


@declared
class ControlConfig:
    endpoint: Endpoint | None = None  # None: ipc://<state_dir>/control.sock
    curve: Curve = None  # required when the endpoint is a network (non-loopback) address


@declared
class LoggingConfig:
    level: Annotated[str, one_of(LOG_LEVELS)] = "info"
    format: Annotated[str, one_of(LOG_FORMATS)] = "json"


# How long the load waits on the lookup of a host name (metrics.listen's, a tcp bind endpoint's): a resolver that
# drops packets holds getaddrinfo for its timeout times its attempts times its servers (10-30 s with glibc's defaults).
LISTEN_LOOKUP_S = 3.0
# getaddrinfo's answers that the name has no IPv4 address (none at all, or none of that family): the resolver was
# reached and answered, so a restart would get the same answer. Every other failure (EAI_AGAIN: no DNS server reached
# yet, as at boot after a power cut; EAI_FAIL; a lookup still running) may pass, so it is left to the start, whose
# failed bind exits 1, which the units retry, where a config error (exit 2) is never retried.
_UNKNOWN_NAME = frozenset(
    code for code in (getattr(socket, name, None) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")) if code
)


def _lookup(host: str) -> BaseException | None:
    """getaddrinfo's error for `host` in the family a host name is bound with (IPv4), None when it
    resolves or did not answer within LISTEN_LOOKUP_S (the thread is left to finish on its own: it holds nothing)."""
    failed: list[BaseException | None] = []

    def look() -> None:
        try:
            socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)  # with no port, as bind() looks up
            failed.append(None)
        except (OSError, UnicodeError) as exc:
            failed.append(exc)

    thread = threading.Thread(target=look, name="config-host-lookup", daemon=True)
    thread.start()
    thread.join(LISTEN_LOOKUP_S)
    return failed[0] if failed else None


def _unknown_host(host: str) -> str | None:
    """The resolver's reason where it says no machine has the name `host`; None where it resolves or cannot answer
    yet (left to the start)."""
    exc = _lookup(host)
    if isinstance(exc, UnicodeError) or (isinstance(exc, socket.gaierror) and exc.errno in _UNKNOWN_NAME):
        return str(getattr(exc, "strerror", None) or exc)
    return None


def _listen(raw: Any) -> str:
    """host:port as the metrics server binds it (inspectd.daemon.metrics): an IP address, or a host name not known to
    be unknown (looked up here, so that `run --check` refuses a name the resolver says no machine has)."""
    host, sep, port = raw.rpartition(":") if isinstance(raw, str) else ("", "", "")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise invalid(f'expected "host:port" (e.g. 127.0.0.1:9108) or null, got {show(raw)}')
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        # As in a URL: without brackets, where the address ends and the port begins is a guess.
        raise invalid(f'expected an IPv6 host in brackets, as "[::1]:9108", got {show(raw)}')
    bare = host.removeprefix("[").removesuffix("]")
    if bare == "*":  # as zmq endpoints write every address: no resolver knows it
        raise invalid(f'expected an IP address or a host name, "0.0.0.0:{port}" for every address, got {show(raw)}')
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if host.startswith("["):
            raise invalid(f'expected an IPv6 address in the brackets, as "[::1]:9108", got {show(raw)}') from None
        if (reason := _unknown_host(bare)) is not None:
            raise invalid(
                f"cannot resolve host {bare!r} ({reason}), expected an IP address or a host name this machine "
                f'resolves, as "127.0.0.1:9108" ("0.0.0.0:{port}" for every address), got {show(raw)}'
            ) from None
    return raw


def _bind_host_problem(endpoint: str) -> str | None:
    """Why a bind to tcp `endpoint` always fails at start, None when it may bind: its host is not an IP address, `*`
    nor a network interface, and the resolver says no machine has that name (libzmq looks a bind's host name up)."""
    scheme, _, rest = endpoint.partition("://")
    host = rest.rpartition(":")[0]
    if scheme != "tcp" or host == "*" or host.startswith("["):  # bracketed: an IPv6 address (endpoint_problem)
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        if host in {name for _, name in socket.if_nameindex()}:
            return None
    except OSError:
        pass
    if (reason := _unknown_host(host)) is None:
        return None
    unexpanded = ": environment variables are not expanded" if "$" in host else ""
    return (
        f"cannot resolve host {host!r} ({reason}), expected an IP address, * or a network interface, or a host name "
        f"this machine resolves, got {show(endpoint)}{unexpanded}"
    )


@declared
class MetricsConfig:
    listen: Annotated[str, PlainValidator(_listen)] | None = "127.0.0.1:9108"  # None: no metrics endpoint

    @property
    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)


@declared
class ArchiveConfig:
    """The image archive (inspectd.daemon.archive): defect frames with overlays and a sample of good frames."""

    enabled: Flag = True
    path: StatePath | None = None  # None: <state_dir>/archive
    max_mb: Annotated[Number, Field(gt=0, le=MAX_MB)] = 2048.0  # oldest frames deleted beyond it
    max_age_h: Annotated[Number, Field(gt=0)] = 168.0  # frames older than this are deleted
    good_every: Annotated[Int, Field(ge=0)] = 200  # keep one good frame in this many per camera; 0: none
    queue: Annotated[Int, Field(ge=1, le=4096)] = 32  # frames waiting for the writer; beyond it, not archived


@declared
class Config:
    station: Annotated[str, matching(STATION_RE, f"characters {STATION_RE}")]
    model: ModelConfig
    cameras: Annotated[tuple[CameraConfig, ...], Field(min_length=1)]
    engine: EngineConfig = EngineConfig()
    batching: BatchingConfig = BatchingConfig()
    publish: PublishConfig = PublishConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    state_dir: StatePath = DEFAULT_STATE_DIR
    # After state_dir, which its default endpoint lives in; validated when left out too, to fill that default in.
    control: Annotated[ControlConfig, Field(validate_default=True)] = ControlConfig()
    archive: Annotated[ArchiveConfig, Field(validate_default=True)] = ArchiveConfig()
    shutdown_timeout_s: Annotated[Number, Field(gt=0, le=MAX_SHUTDOWN_TIMEOUT_S)] = 10.0

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics_not_null(cls, raw: Any) -> Any:
        return _not_null(raw, "listen: null")

    @field_validator("archive", mode="before")
    @classmethod
    def _archive_not_null(cls, raw: Any) -> Any:
        return _not_null(raw, "enabled: false")

    @property
    def journal_path(self) -> Path | None:
        """Where the journal lives, None when it is turned off."""
        journal = self.publish.journal
        if not journal.enabled:
            return None
        return journal.path if journal.path is not None else self.state_dir / "journal"

    @field_validator("state_dir", mode="after")
    @classmethod
    def _a_directory(cls, state_dir: Path) -> Path:
        # Else the start fails on the first file made under it, naming that file's key (publish.journal.path).
        problem = _not_a_directory(state_dir)
        if problem is not None:
            raise invalid(problem)
        return state_dir

    def camera(self, camera_id: str) -> CameraConfig:
        for camera in self.cameras:
            if camera.id == camera_id:
                return camera
        raise KeyError(camera_id)

    @field_validator("cameras", mode="after")
    @classmethod
    def _unique_ids(cls, cameras: tuple[CameraConfig, ...]) -> tuple[CameraConfig, ...]:
        seen: dict[str, int] = {}
        for i, camera in enumerate(cameras):
            if camera.id in seen:
                used = f"{camera.id!r} is already used by cameras[{seen[camera.id]}], expected unique ids"
                refuse((i, "id"), used, camera.id)
            seen[camera.id] = i
        return cameras

    @field_validator("cameras", mode="after")
    @classmethod
    def _synthetic_within_max_pixels(cls, cameras: tuple[CameraConfig, ...]) -> tuple[CameraConfig, ...]:
        # Every other source refuses a frame over max_pixels as it comes; a synthetic camera's frames are all one
        # size, known now.
        for i, camera in enumerate(cameras):
            source = camera.source
            if isinstance(source, SyntheticSource) and source.width * source.height > camera.max_pixels:
                pixels = source.width * source.height
                refuse(
                    (i, "source"),
                    f"frames of {source.width}x{source.height} ({pixels} pixels) are larger than this camera's "
                    f"max_pixels {camera.max_pixels}, expected at most that many pixels",
                    f"{source.width}x{source.height}",
                )
        return cameras

    @field_validator("control", mode="after")
    @classmethod
    def _control_endpoint(cls, control: ControlConfig, info: ValidationInfo) -> ControlConfig:
        endpoint = control.endpoint
        if endpoint is None:
            if "state_dir" not in info.data:
                return control  # state_dir was refused: that is the error to report
            endpoint = f"ipc://{info.data['state_dir']}/control.sock"
            problem = ipc_path_problem(endpoint)
            if problem is not None:  # the bind at start would fail, exit 1, and be retried to no end
                refuse(
                    "endpoint", f"left out, so the default in state_dir {problem}; set it, or a shorter state_dir", None
                )
            control = dataclasses.replace(control, endpoint=endpoint)
        if control.curve is None and not is_local_endpoint(endpoint):
            refuse(
                "curve",
                f"required when control.endpoint is a network address ({endpoint}), expected "
                f"{{server_secret_key: PATH, allowed_clients_dir: DIR}} or a loopback/ipc endpoint",
                None,
            )
        return control

    @field_validator("archive", mode="after")
    @classmethod
    def _archive_path(cls, archive: ArchiveConfig, info: ValidationInfo) -> ArchiveConfig:
        if archive.path is None and "state_dir" in info.data:
            archive = dataclasses.replace(archive, path=info.data["state_dir"] / "archive")
        return archive

    @model_validator(mode="after")
    def _writes_under_state_dir(self) -> Config:
        # The service may write only its state dir (systemd ReadWritePaths): said at load, so that `run --check`
        # refuses it too, rather than by systemd's EROFS at start.
        state_dir = Path(os.path.realpath(self.state_dir))
        journal = self.publish.journal
        for path, loc in (
            (journal.path if journal.enabled else None, ("publish", "journal", "path")),
            (self.archive.path if self.archive.enabled else None, ("archive", "path")),
        ):
            if path is not None and not Path(os.path.realpath(path)).is_relative_to(state_dir):
                refuse(
                    loc,
                    f"{path} is outside state_dir {state_dir}, expected a directory under it (the daemon writes only "
                    "under its state directory)",
                    str(path),
                )
        # A file where one of them goes: the journal's open failed at start (exit 1, retried), and the archive ran
        # degraded for good, keeping no image. Their defaults under state_dir too.
        archive = self.archive.path if self.archive.enabled else None
        for path, loc in ((self.journal_path, ("publish", "journal", "path")), (archive, ("archive", "path"))):
            problem = None if path is None else _not_a_directory(path)
            if problem is not None:
                refuse(loc, problem, str(path))
        return self

    @model_validator(mode="after")
    def _bind_hosts_known(self) -> Config:
        # A name the resolver says no machine has fails every start's bind (exit 1, retried): said at load, so that
        # `run --check` refuses it, as it refuses one in metrics.listen.
        binds: list[tuple[str | None, tuple[str | int, ...]]] = [
            (self.publish.endpoint, ("publish", "endpoint")),
            (self.control.endpoint, ("control", "endpoint")),
        ]
        binds += [
            (getattr(camera.source, "endpoint", None), ("cameras", i, "source", "endpoint"))
            for i, camera in enumerate(self.cameras)
            if camera.source.kind == "zmq"
        ]
        for endpoint, loc in binds:
            problem = _bind_host_problem(endpoint) if isinstance(endpoint, str) else None
            if problem is not None:
                refuse(loc, problem, None)
        return self

    @model_validator(mode="after")
    def _one_owner_per_address(self) -> Config:
        # A second ZeroMQ bind to an ipc path silently takes the socket over (a camera on publish.endpoint leaves
        # every subscriber without a result while status says healthy); on tcp it fails and retries for ever. Two
        # folder cameras on one directory would race for each file.
        owners: list[tuple[str, tuple, tuple[str | int, ...]]] = [
            ("publish.endpoint", _address(self.publish.endpoint), ("publish", "endpoint"))
        ]
        if self.control.endpoint is not None:
            owners.append(("control.endpoint", _address(self.control.endpoint), ("control", "endpoint")))
        if self.metrics.address is not None:
            host, port = self.metrics.address
            host = f"[{host}]" if ":" in host else host  # as a tcp endpoint writes it
            owners.append(("metrics.listen", _address(f"tcp://{host}:{port}"), ("metrics", "listen")))
        for i, camera in enumerate(self.cameras):
            endpoint, path = getattr(camera.source, "endpoint", None), getattr(camera.source, "path", None)
            if camera.source.kind == "zmq" and isinstance(endpoint, str):
                owners.append(
                    (f"cameras[{i}].source.endpoint", _address(endpoint), ("cameras", i, "source", "endpoint"))
                )
            elif camera.source.kind == "folder" and isinstance(path, Path):
                owners.append((f"cameras[{i}].source.path", _folder(path), ("cameras", i, "source", "path")))
            elif camera.source.kind in ("genicam", "opencv"):
                # One process controls a camera: the second open fails (GigE Vision's control channel, V4L2's
                # EBUSY) and reopens for ever, saying nothing of which camera holds it.
                device = getattr(camera.source, "device", None)
                url = getattr(camera.source, "url", None)
                if camera.source.kind == "opencv" and device is None and isinstance(url, str):
                    # A url naming a V4L2 node (/dev/video0, or a /dev/v4l/by-id link to one) is that device.
                    path = video_path(url)
                    device = None if path is None else video_device_of(path)
                if camera.source.kind == "genicam":
                    owners.append(
                        (f"cameras[{i}].source.device", ("genicam", device), ("cameras", i, "source", "device"))
                    )
                elif device is not None:
                    key = "device" if getattr(camera.source, "device", None) is not None else "url"
                    owners.append((f"cameras[{i}].source.{key}", ("video", device), ("cameras", i, "source", key)))
        for n, (_, address, loc) in enumerate(owners):
            for first, earlier, _ in owners[:n]:
                if not _same_address(address, earlier):
                    continue
                if address[0] == "genicam" and None in (address[1], earlier[1]):
                    if address[1] is None and earlier[1] is None:
                        clash = f"left out, as is {first}: both would open the first genicam device found"
                    elif address[1] is None:
                        clash = (
                            f"left out: the first genicam device found, which {first} ({address_text(earlier)}) may be"
                        )
                    else:
                        clash = f"{address_text(address)} may be the first genicam device found, which {first} opens"
                    refuse(loc, f"{clash}, expected a device set for each genicam camera when there are several", None)
                refuse(loc, f"{address_text(address)} is already used by {first}, expected one of its own", None)
        # A done_dir may be shared, but one that is a watched folder feeds every frame back in as a new one.
        inboxes = {address[2]: name for name, address, _ in owners if address[0] == "dir"}
        for i, camera in enumerate(self.cameras):
            done_dir = getattr(camera.source, "done_dir", None)
            if camera.source.kind == "folder" and isinstance(done_dir, Path):
                inbox = inboxes.get(_folder(done_dir)[2])
                if inbox is not None:
                    refuse(
                        ("cameras", i, "source", "done_dir"),
                        f"{done_dir} is the folder {inbox} watches, expected a folder no camera watches",
                        None,
                    )
        return self

    @model_validator(mode="after")
    def _folders_apart_from_the_daemons_own(self) -> Config:
        # A folder camera takes every file in its folder as a frame and may delete or move it: in state_dir itself
        # that is the daemon's lock (a second daemon then starts on the same journal), in the journal, archive or
        # bundle folders their files. A folder elsewhere under state_dir is fine (the unit may write only there).
        own = [(Path(os.path.realpath(self.state_dir)), "state_dir", False)]
        own += [
            (Path(os.path.realpath(path)), name, True)
            for path, name in (
                (self.journal_path, "publish.journal.path"),
                (self.archive.path if self.archive.enabled else None, "archive.path"),
                (self.model.bundle, "model.bundle"),
            )
            if path is not None
        ]
        for i, camera in enumerate(self.cameras):
            if camera.source.kind != "folder":
                continue
            for key in ("path", "done_dir"):
                folder = getattr(camera.source, key, None)
                if not isinstance(folder, Path):
                    continue
                resolved = Path(os.path.realpath(folder))
                for daemons, name, below in own:
                    if resolved == daemons or (below and resolved.is_relative_to(daemons)):
                        where = "is" if resolved == daemons else "is inside"
                        refuse(
                            ("cameras", i, "source", key),
                            f"{folder} {where} the daemon's {name} {daemons}, expected a folder of the camera's own "
                            "(its files would be taken as frames and deleted or moved)",
                            str(folder),
                        )
        return self


# Hosts a tcp bind to which takes the port on every address.
ANY_HOST = frozenset({"*", "0.0.0.0", "::", "[::]"})
# The one host name a station's config commonly binds to, as the address it stands for (no lookup at load).
LOOPBACK_NAMES = {"localhost": "127.0.0.1"}


def _not_a_directory(directory: Path) -> str | None:
    """Why `directory` cannot be the folder the start makes (or finds) there, None when it can: the first part of it
    that exists, the one the start would make the rest under, is not a directory, or is a symbolic link to nothing
    (which the start can neither make nor enter)."""
    existing = next((path for path in (directory, *directory.parents) if os.path.lexists(path)), None)
    if existing is None or os.path.isdir(existing):
        return None
    beneath = "" if existing == directory else f"{directory}: "
    try:
        os.stat(existing)
    except FileNotFoundError:
        return (
            f"{beneath}{existing} is a symbolic link to {os.readlink(existing)!r}, which does not exist, expected a "
            "directory or a link to one"
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{beneath}{existing} is a symbolic link loop, expected a directory or a link to one"
        return None  # a target this user may not reach (run --check as another user): the start's to see
    return f"{beneath}{existing} is not a directory, expected a directory (made at start when missing)"


def _address(endpoint: str) -> tuple[str | int, ...]:
    """What binding `endpoint` takes: an ipc socket file, a tcp port on a host, else the endpoint as written."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        if rest.startswith("@") or rest == "*":  # an abstract name, or a fresh path libzmq makes: no folder
            return ("ipc", rest)
        # The file a bind makes: its folder resolved, so that one path through a symlinked folder and one through
        # the folder itself are the one file (the file's own name is not followed: a bind replaces what is there).
        folder, name = os.path.split(os.path.normpath(rest))
        return ("ipc", os.path.join(os.path.realpath(folder), name))
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        # As a number: libzmq and the metrics server read 05556 as 5556, the port 5556 takes.
        return ("tcp", LOOPBACK_NAMES.get(host.lower(), host), int(port) if port.isdigit() else port)
    return (endpoint,)


def _folder(path: Path) -> tuple[Any, ...]:
    """("dir", the folder resolved, what it is): its device and inode where it exists, so that a symlink or a bind
    mount of another camera's folder is that folder; else the resolved path."""
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
    except OSError:
        return ("dir", resolved, resolved)
    return ("dir", resolved, (st.st_dev, st.st_ino))


def _same_address(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] == b[0] == "genicam":
        # No device: the first one Aravis finds, which may be any other camera's.
        return a[1] == b[1] or a[1] is None or b[1] is None
    if a[0] == b[0] == "dir":
        return bool(a[2] == b[2])
    if a[0] == b[0] == "tcp":
        # Port * or 0 asks libzmq (and the metrics server) for an ephemeral port: never one another bind holds.
        return a[2] == b[2] and a[2] not in ("*", 0) and (a[1] == b[1] or bool({a[1], b[1]} & ANY_HOST))
    return a == b


def address_text(address: tuple[Any, ...]) -> str:
    if address[0] == "ipc":
        return f"ipc socket {address[1]}"
    if address[0] == "tcp":
        return f"tcp port {address[2]} on {address[1]}"
    if address[0] == "dir":
        return f"folder {address[1]}"
    if address[0] == "genicam":
        return (
            "the first genicam device found (no device set)" if address[1] is None else f"genicam device {address[1]}"
        )
    if address[0] == "video":
        return f"video device {address[1]} (/dev/video{address[1]})"
    return repr(address[0])


# Where the daemon units (systemd/inspectd.service, inspectd@.service) leave a socket file the daemon binds where
# others find it: its state_dir (ReadWritePaths=) and its RuntimeDirectory= under /run/inspectd. The rest of the tree
# is read-only to it (ProtectSystem=strict), and these folders it sees in a form of its own.
RUNTIME_DIR = Path("/run/inspectd")
_PRIVATE_TMP = "PrivateTmp=yes gives the daemon a {} of its own, so nothing outside the unit finds the socket"
_PROTECT_HOME = "ProtectHome=yes makes {} inaccessible to the daemon, so its bind fails at every start"
UNIT_HIDDEN_FOLDERS = {
    Path("/tmp"): _PRIVATE_TMP.format("/tmp"),
    Path("/var/tmp"): _PRIVATE_TMP.format("/var/tmp"),
    Path("/home"): _PROTECT_HOME.format("/home"),
    Path("/root"): _PROTECT_HOME.format("/root"),
    Path("/run/user"): _PROTECT_HOME.format("/run/user"),
}


def ipc_hidden_by_the_units(config: Config) -> list[str]:
    """For each ipc socket the daemon binds (publish, control, zmq cameras) where the units' sandbox hides it or makes
    it read-only, a line saying so: valid as a config, and it runs outside the units, where `run --check` runs."""
    binds = [("publish.endpoint", config.publish.endpoint)]
    if config.control.endpoint is not None:
        binds.append(("control.endpoint", config.control.endpoint))
    binds += [
        (f"cameras[{i}].source.endpoint", camera.source.endpoint)
        for i, camera in enumerate(config.cameras)
        if camera.source.kind == "zmq" and isinstance(getattr(camera.source, "endpoint", None), str)
    ]
    state_dir = Path(os.path.realpath(config.state_dir))
    lines = []
    for key, endpoint in binds:
        scheme, where = _address(endpoint)[:2]
        if scheme != "ipc" or not isinstance(where, str) or not where.startswith("/"):  # an abstract name: no folder
            continue
        path = Path(where)
        # A socket in state_dir goes where state_dir goes: a state_dir the units do not give the daemon (one under
        # /tmp, a test's) is the whole config's matter, not each socket's.
        # /dev (its shm among it) the units leave as it is: the camera and GPU devices live there.
        if path.is_relative_to(state_dir) or path.is_relative_to(RUNTIME_DIR) or path.is_relative_to("/dev"):
            continue
        why = next((why for folder, why in UNIT_HIDDEN_FOLDERS.items() if path.is_relative_to(folder)), None)
        if why is None:
            why = (
                "ProtectSystem=strict makes it read-only to the daemon, which may write only state_dir and "
                f"{RUNTIME_DIR}, so its bind fails at every start (unless a drop-in lists its folder in "
                "ReadWritePaths=)"
            )
        lines.append(
            f"{key} {endpoint}: under the systemd units {why}; expected a socket under {RUNTIME_DIR} or "
            f"state_dir {config.state_dir}"
        )
    return lines


def load_config(path: str | Path) -> Config:
    path = Path(path)
    return parse_config(read_yaml(path), source=str(path), base_dir=path.resolve().parent)


def parse_config(raw: Any, source: str = "<dict>", base_dir: str | Path | None = None) -> Config:
    """Validate a plain mapping (as YAML gives it). Relative paths resolve against `base_dir` (default: cwd)."""
    if raw is None:
        raise ConfigError(f"{source}: empty config, expected a mapping with at least station, model and cameras")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with at least station, model and cameras, got {show(raw)}")
    return parse(Config, raw, base_dir=base_dir)
