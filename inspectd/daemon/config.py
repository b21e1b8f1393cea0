"""The daemon's config file: YAML in, frozen typed dataclasses out, every value validated at load.

Owns the schema (deploy/inspectd.example.yaml shows every key) and its defaults. Every refusal is one
`ConfigError` whose message starts with the key path (`cameras[1].source.url: expected ..., got 5`), so an operator
can find the line to fix without reading code. Unknown keys are refused rather than ignored: a misspelt key silently
falling back to its default is the worst kind of config bug on a production line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from inspectd.configfile import key_path, read_yaml
from inspectd.errors import ConfigError

STATION_RE = re.compile(r"[a-z0-9_-]+")
CAMERA_ID_RE = re.compile(r"[a-zA-Z0-9_-]+")
BACKENDS = ("onnxruntime", "torch", "tensorrt")
QUEUE_POLICIES = ("drop_oldest", "block")
ENCODINGS = ("raw", "jpeg", "png")
RESIZE_CHOICES = ("stretch", "pad")
MASK_POLICIES = ("defects", "always", "never")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    bundle: Path


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    backend: str = "onnxruntime"
    # A plain mapping, as engines.runtime.open_engine takes it. Validated here by the backend's own parse_options
    # when its module imports at config time; otherwise the daemon fails on it, clearly, when it opens the engine.
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 8
    max_wait_ms: float = 10.0


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    rate_hz: float = 10.0
    width: int = 256
    height: int = 256
    channels: int = 1
    defect_rate: float = 0.2
    seed: int = 0
    count: int | None = None  # None: endless
    encoding: str = "raw"  # raw frames, or encode+decode each one to exercise the decoder path
    kind: str = "synthetic"


@dataclasses.dataclass(frozen=True)
class FolderSource:
    path: Path
    pattern: str = "*"
    poll_ms: float = 100.0
    delete_after: bool = False
    done_dir: Path | None = None
    kind: str = "folder"


@dataclasses.dataclass(frozen=True)
class ZmqSource:
    endpoint: str  # bound by the daemon; producers connect PUSH sockets to it
    kind: str = "zmq"


@dataclasses.dataclass(frozen=True)
class OpenCVSource:
    url: str | None = None  # rtsp://, http://, or a (resolved) video file path
    device: int | None = None  # /dev/videoN index
    pipeline: str | None = None  # GStreamer pipeline string
    kind: str = "opencv"

    @property
    def target(self) -> str | int:
        """What cv2.VideoCapture is opened with."""
        if self.device is not None:
            return self.device
        return self.url if self.url is not None else self.pipeline


Source = SyntheticSource | FolderSource | ZmqSource | OpenCVSource


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    size: int = 64
    policy: str = "drop_oldest"


@dataclasses.dataclass(frozen=True)
class CameraConfig:
    id: str
    source: Source
    queue: QueueConfig = QueueConfig()
    resize: str | None = None  # None: the bundle's own policy
    max_pixels: int = 50_000_000


@dataclasses.dataclass(frozen=True)
class JournalConfig:
    path: Path | None = (
        None  # a directory (inspectd.protocol.journal); None: no journal, seq restarts at 0 after a restart
    )
    max_mb: float = 256.0


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """CurveZMQ for a server socket: the daemon's key pair and the directory of client public keys let in."""

    server_secret_key: Path
    allowed_clients_dir: Path


@dataclasses.dataclass(frozen=True)
class PublishConfig:
    endpoint: str = "tcp://127.0.0.1:5556"
    masks: str = "defects"
    sndhwm: int = 1000
    status_interval_s: float = 1.0
    journal: JournalConfig = JournalConfig()
    curve: CurveConfig | None = None  # None: results published in the clear


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    endpoint: str
    curve: CurveConfig | None = None  # required when the endpoint is a network (non-loopback) address


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = "127.0.0.1:9108"

    @property
    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host, int(port)


@dataclasses.dataclass(frozen=True)
class Config:
    station: str
    model: ModelConfig
    cameras: tuple[CameraConfig, ...]
    control: ControlConfig
    engine: EngineConfig = EngineConfig()
    batching: BatchingConfig = BatchingConfig()
    publish: PublishConfig = PublishConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    state_dir: Path = Path("/var/lib/inspectd")
    shutdown_timeout_s: float = 10.0
    source: str = "<dict>"  # where the config came from, for messages

    def camera(self, camera_id: str) -> CameraConfig:
        for camera in self.cameras:
            if camera.id == camera_id:
                return camera
        raise KeyError(camera_id)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    return parse_config(read_yaml(path), source=str(path), base_dir=path.resolve().parent)


def parse_config(raw: Any, source: str = "<dict>", base_dir: str | Path | None = None) -> Config:
    """Validate a plain mapping (as YAML gives it). Relative paths resolve against `base_dir` (default: cwd)."""
    r = _Reader(Path(base_dir) if base_dir is not None else Path.cwd())
    if raw is None:
        raise ConfigError(f"{source}: empty config, expected a mapping with at least station, model and cameras")
    top = r.section(
        raw,
        "",
        {
            "station",
            "model",
            "engine",
            "batching",
            "cameras",
            "publish",
            "control",
            "logging",
            "metrics",
            "state_dir",
            "shutdown_timeout_s",
        },
    )
    station = r.string(top, "station", "", pattern=STATION_RE)
    state_dir = r.path(top, "state_dir", "", default=Path("/var/lib/inspectd"))

    model = r.section(top.get("model", r.REQUIRED_SECTION), "model", {"bundle"})
    engine = _parse_engine(r, top.get("engine", {}))

    batching = r.section(top.get("batching", {}), "batching", {"max_batch", "max_wait_ms"})
    cameras_raw = top.get("cameras")
    if cameras_raw is None:
        raise ConfigError("cameras: required, expected a list of at least one camera")
    if not isinstance(cameras_raw, list) or not cameras_raw:
        raise ConfigError(f"cameras: expected a list of at least one camera, got {_show(cameras_raw)}")
    cameras = tuple(_parse_camera(r, c, f"cameras[{i}]") for i, c in enumerate(cameras_raw))
    seen: dict[str, int] = {}
    for i, camera in enumerate(cameras):
        if camera.id in seen:
            raise ConfigError(
                f"cameras[{i}].id: {camera.id!r} is already used by cameras[{seen[camera.id]}], expected unique ids"
            )
        seen[camera.id] = i

    publish = r.section(
        top.get("publish", {}), "publish", {"endpoint", "masks", "sndhwm", "status_interval_s", "journal", "curve"}
    )
    journal = r.section(publish.get("journal", {}), "publish.journal", {"path", "max_mb"})
    control = r.section(top.get("control", {}), "control", {"endpoint", "curve"})
    control_endpoint = r.endpoint(control, "endpoint", "control", default=f"ipc://{state_dir}/control.sock")
    control_curve = _parse_curve(r, control.get("curve"), "control.curve")
    if control_curve is None:
        from inspectd.daemon.security import is_local_endpoint

        if not is_local_endpoint(control_endpoint):
            raise ConfigError(
                f"control.curve: required when control.endpoint is a network address "
                f"({control_endpoint}), expected {{server_secret_key: PATH, allowed_clients_dir: DIR}} "
                f"or a loopback/ipc endpoint"
            )
    logging = r.section(top.get("logging", {}), "logging", {"level", "format"})
    metrics = r.section(top.get("metrics", {}), "metrics", {"listen"})

    return Config(
        station=station,
        model=ModelConfig(bundle=r.path(model, "bundle", "model")),
        engine=engine,
        batching=BatchingConfig(
            max_batch=r.integer(batching, "max_batch", "batching", default=8, lo=1, hi=256),
            max_wait_ms=r.number(batching, "max_wait_ms", "batching", default=10.0, lo=0.0),
        ),
        cameras=cameras,
        publish=PublishConfig(
            endpoint=r.endpoint(publish, "endpoint", "publish", default="tcp://127.0.0.1:5556"),
            masks=r.string(publish, "masks", "publish", default="defects", choices=MASK_POLICIES),
            sndhwm=r.integer(publish, "sndhwm", "publish", default=1000, lo=0),
            status_interval_s=r.number(publish, "status_interval_s", "publish", default=1.0, lo=0.0, lo_open=True),
            journal=JournalConfig(
                path=r.path(journal, "path", "publish.journal", default=None, nullable=True),
                max_mb=r.number(journal, "max_mb", "publish.journal", default=256.0, lo=0.0, lo_open=True),
            ),
            curve=_parse_curve(r, publish.get("curve"), "publish.curve"),
        ),
        control=ControlConfig(endpoint=control_endpoint, curve=control_curve),
        logging=LoggingConfig(
            level=r.string(logging, "level", "logging", default="info", choices=LOG_LEVELS),
            format=r.string(logging, "format", "logging", default="json", choices=LOG_FORMATS),
        ),
        metrics=MetricsConfig(listen=_parse_listen(r, metrics)),
        state_dir=state_dir,
        shutdown_timeout_s=r.number(top, "shutdown_timeout_s", "", default=10.0, lo=0.0, lo_open=True),
        source=source,
    )


def _parse_engine(r: _Reader, raw: Any) -> EngineConfig:
    engine = r.section(raw, "engine", {"backend", "options"})
    backend = r.string(engine, "backend", "engine", default="onnxruntime", choices=BACKENDS)
    options = engine.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"engine.options: expected a mapping of {backend} options, got {_show(options)}")
    from engines.errors import EngineError
    from engines.runtime import backend_class

    try:
        cls = backend_class(backend)
    except EngineError as exc:
        if isinstance(exc.__cause__, ImportError):
            # A station may validate its config where the backend (TensorRT, torch) is not installed; the daemon
            # re-validates these options when it opens the engine and fails there with the backend's own message.
            return EngineConfig(backend=backend, options=dict(options))
        raise ConfigError(f"engine.backend: {exc}") from None
    try:
        cls.parse_options(options, where="engine.options")
    except EngineError as exc:
        raise ConfigError(str(exc)) from None
    except TypeError as exc:  # a required option missing: the dataclass constructor says which
        raise ConfigError(f"engine.options: {exc}") from None
    return EngineConfig(backend=backend, options=dict(options))


def _parse_camera(r: _Reader, raw: Any, where: str) -> CameraConfig:
    camera = r.section(raw, where, {"id", "source", "queue", "resize", "max_pixels"})
    camera_id = r.string(camera, "id", where, pattern=CAMERA_ID_RE)
    source = _parse_source(r, camera.get("source", r.REQUIRED_SECTION), f"{where}.source")
    queue = r.section(camera.get("queue", {}), f"{where}.queue", {"size", "policy"})
    # A folder is a backlog of files that must each be inspected: dropping them is never the right default.
    default_policy = "block" if isinstance(source, FolderSource) else "drop_oldest"
    return CameraConfig(
        id=camera_id,
        source=source,
        queue=QueueConfig(
            size=r.integer(queue, "size", f"{where}.queue", default=64, lo=1),
            policy=r.string(queue, "policy", f"{where}.queue", default=default_policy, choices=QUEUE_POLICIES),
        ),
        resize=r.string(camera, "resize", where, default=None, choices=RESIZE_CHOICES, nullable=True),
        max_pixels=r.integer(camera, "max_pixels", where, default=50_000_000, lo=1),
    )


def _parse_source(r: _Reader, raw: Any, where: str) -> Source:
    if raw is r.REQUIRED_SECTION:
        raise ConfigError(f"{where}: required, expected a mapping with kind synthetic|folder|zmq|opencv")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with kind synthetic|folder|zmq|opencv, got {_show(raw)}")
    kind = r.string(raw, "kind", where, choices=("synthetic", "folder", "zmq", "opencv"))
    if kind == "synthetic":
        s = r.section(
            raw, where, {"kind", "rate_hz", "width", "height", "channels", "defect_rate", "seed", "count", "encoding"}
        )
        return SyntheticSource(
            rate_hz=r.number(s, "rate_hz", where, default=10.0, lo=0.0, lo_open=True),
            width=r.integer(s, "width", where, default=256, lo=8, hi=16384),
            height=r.integer(s, "height", where, default=256, lo=8, hi=16384),
            channels=r.integer(s, "channels", where, default=1, choices=(1, 3)),
            defect_rate=r.number(s, "defect_rate", where, default=0.2, lo=0.0, hi=1.0),
            seed=r.integer(s, "seed", where, default=0),
            count=r.integer(s, "count", where, default=None, lo=0, nullable=True),
            encoding=r.string(s, "encoding", where, default="raw", choices=ENCODINGS),
        )
    if kind == "folder":
        s = r.section(raw, where, {"kind", "path", "pattern", "poll_ms", "delete_after", "done_dir"})
        delete_after = r.boolean(s, "delete_after", where, default=False)
        done_dir = r.path(s, "done_dir", where, default=None, nullable=True)
        if delete_after and done_dir is not None:
            raise ConfigError(f"{where}.done_dir: set together with delete_after: true, expected one or the other")
        return FolderSource(
            path=r.path(s, "path", where),
            pattern=r.string(s, "pattern", where, default="*"),
            poll_ms=r.number(s, "poll_ms", where, default=100.0, lo=0.0, lo_open=True),
            delete_after=delete_after,
            done_dir=done_dir,
        )
    if kind == "zmq":
        s = r.section(raw, where, {"kind", "endpoint"})
        return ZmqSource(endpoint=r.endpoint(s, "endpoint", where))
    s = r.section(raw, where, {"kind", "url", "device", "pipeline"})
    given = [k for k in ("url", "device", "pipeline") if s.get(k) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"{where}: expected exactly one of url, device, pipeline, got {', '.join(given) if given else 'none'}"
        )
    url = s.get("url")
    if url is not None:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{where}.url: expected a string (rtsp://, http://, file path), got {_show(url)}")
        if "://" not in url:
            url = str(r.resolve(url))
    return OpenCVSource(
        url=url,
        device=r.integer(s, "device", where, default=None, lo=0, nullable=True),
        pipeline=r.string(s, "pipeline", where, default=None, nullable=True),
    )


def _parse_curve(r: _Reader, raw: Any, where: str) -> CurveConfig | None:
    if raw is None:
        return None
    keys = ("server_secret_key", "allowed_clients_dir")
    if not isinstance(raw, dict) or set(raw) != set(keys):
        raise ConfigError(
            f"{where}: expected null or a mapping with exactly server_secret_key and "
            f"allowed_clients_dir, got {_show(raw)}"
        )
    return CurveConfig(
        server_secret_key=r.path(raw, "server_secret_key", where),
        allowed_clients_dir=r.path(raw, "allowed_clients_dir", where),
    )


def _parse_listen(r: _Reader, metrics: dict) -> str | None:
    listen = r.string(metrics, "listen", "metrics", default="127.0.0.1:9108", nullable=True)
    if listen is None:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f'metrics.listen: expected "host:port" (e.g. 127.0.0.1:9108) or null, got {listen!r}')
    return listen


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Typed getters over one YAML mapping; each names the full key path in its error."""

    REQUIRED = object()
    REQUIRED_SECTION = object()

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    @staticmethod
    def key_path(where: str, key: str) -> str:
        return key_path(where, key)

    def section(self, raw: Any, where: str, allowed: set[str]) -> dict:
        if raw is self.REQUIRED_SECTION:
            raise ConfigError(f"{where}: required, expected a mapping")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where or '<top>'}: expected a mapping, got {_show(raw)}")
        for key in raw:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(f"{self.key_path(where, str(key))}: unknown key (known: {known})")
        return raw

    def _get(self, d: dict, key: str, where: str, default: Any, nullable: bool) -> tuple[bool, Any]:
        """(present, value); raises for a missing required key or a null where none is allowed."""
        if key not in d:
            if default is self.REQUIRED:
                raise ConfigError(f"{self.key_path(where, key)}: required")
            return False, default
        value = d[key]
        if value is None and not nullable:
            raise ConfigError(f"{self.key_path(where, key)}: expected a value, got null")
        return value is not None, value

    def string(
        self,
        d: dict,
        key: str,
        where: str,
        default: Any = REQUIRED,
        choices: tuple | None = None,
        pattern: re.Pattern | None = None,
        nullable: bool = False,
    ) -> Any:
        present, value = self._get(d, key, where, default, nullable)
        if not present:
            return value
        path = self.key_path(where, key)
        if choices is not None and value not in choices:
            raise ConfigError(f"{path}: expected one of {'|'.join(map(str, choices))}, got {_show(value)}")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: expected a non-empty string, got {_show(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise ConfigError(f"{path}: expected characters {pattern.pattern}, got {value!r}")
        return value

    def integer(
        self,
        d: dict,
        key: str,
        where: str,
        default: Any = REQUIRED,
        lo: int | None = None,
        hi: int | None = None,
        choices: tuple | None = None,
        nullable: bool = False,
    ) -> Any:
        present, value = self._get(d, key, where, default, nullable)
        if not present:
            return value
        path = self.key_path(where, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{path}: expected one of {'|'.join(map(str, choices))}, got {value}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{path}: expected an integer in {_range(lo, hi)}, got {value}")
        return value

    def number(
        self,
        d: dict,
        key: str,
        where: str,
        default: Any = REQUIRED,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> Any:
        present, value = self._get(d, key, where, default, False)
        if not present:
            return value
        path = self.key_path(where, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a number, got {_show(value)}")
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
            bound = f"> {lo}" if lo_open and hi is None else _range(lo, hi)
            raise ConfigError(f"{path}: expected a number {bound}, got {value}")
        return float(value)

    def boolean(self, d: dict, key: str, where: str, default: Any = REQUIRED) -> bool:
        present, value = self._get(d, key, where, default, False)
        if present and not isinstance(value, bool):
            raise ConfigError(f"{self.key_path(where, key)}: expected true or false, got {_show(value)}")
        return value

    def path(self, d: dict, key: str, where: str, default: Any = REQUIRED, nullable: bool = False) -> Any:
        present, value = self._get(d, key, where, default, nullable)
        if not present:
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key_path(where, key)}: expected a path string, got {_show(value)}")
        return self.resolve(value)

    def endpoint(self, d: dict, key: str, where: str, default: Any = REQUIRED) -> str:
        present, value = self._get(d, key, where, default, False)
        if not present:
            return value
        if not isinstance(value, str) or not value.startswith(ZMQ_SCHEMES) or value.endswith("://"):
            raise ConfigError(
                f"{self.key_path(where, key)}: expected a ZeroMQ endpoint "
                f"(tcp://host:port or ipc://path), got {_show(value)}"
            )
        return value

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(os.path.normpath(self.base_dir / path))


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"
