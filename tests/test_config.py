"""The config loader refuses every bad value with a one-line ConfigError that starts with the key path."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.daemon.config import load_config, parse_config
from inspectd.daemon.ingest import SOURCES
from inspectd.daemon.ingest.folder import FolderSource
from inspectd.daemon.ingest.opencv import OpenCVSource
from inspectd.daemon.ingest.synthetic import SyntheticSource
from inspectd.daemon.ingest.zmq_pull import ZmqSource
from inspectd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "inspectd.example.yaml"

MINIMAL = {
    "station": "line1",
    "model": {"bundle": "bundle"},
    "cameras": [
        {"id": "cam0", "source": {"kind": "synthetic"}},
        {"id": "cam1", "source": {"kind": "folder", "path": "in"}},
        {"id": "cam2", "source": {"kind": "zmq", "endpoint": "ipc:///tmp/x.sock"}},
        {"id": "cam3", "source": {"kind": "opencv", "url": "video.avi"}},
    ],
}


def with_value(path: list, value) -> dict:
    """MINIMAL with `value` set at `path` (keys and list indices)."""
    doc = copy.deepcopy(MINIMAL)
    node = doc
    for key in path[:-1]:
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return doc


def test_example_file_loads_with_every_source_kind():
    config = load_config(EXAMPLE)
    assert config.station == "line1"
    kinds = [type(c.source) for c in config.cameras]
    assert kinds == [SyntheticSource, FolderSource, ZmqSource, OpenCVSource]
    assert config.model.bundle == Path("/var/lib/inspectd/bundles/current")
    assert config.cameras[1].queue.policy == "block"
    assert config.metrics.address == ("127.0.0.1", 9108)


def test_the_example_shows_every_key_of_every_source_kind_and_backend_with_its_default():
    """The example says it shows every key: each declaration's keys are in it, the commented genicam camera loads as
    it is written, and each backend's option list, commented as the other kinds are, gives the declared defaults."""
    import re

    import yaml

    from engines.runtime import BACKENDS, backend_class

    text = EXAMPLE.read_text()
    for kind, source in SOURCES.items():
        missing = [f.name for f in dataclasses.fields(source.Options) if not re.search(rf"\b{f.name}:", text)]
        assert not missing, f"kind {kind}: {missing} not in the example"

    lines = text.splitlines()
    start = lines.index("  # - id: cam4")
    block = "\n".join(line.removeprefix("  # ") for line in lines[start : lines.index("", start)])
    genicam = parse_config({**MINIMAL, "cameras": yaml.safe_load(block)}).cameras[0].source
    defaults = type(genicam)()
    # The header names identity, address, trigger and exposure as example values; every other key is its default
    # (pixel_format Mono8 or gain_db 0, uncommented, forced mono and fixed the gain on the camera).
    examples = {"kind", "device", "trigger", "exposure_us"}
    keys = [f.name for f in dataclasses.fields(defaults) if f.name not in examples]
    assert [key for key in keys if getattr(genicam, key) != getattr(defaults, key)] == []
    synthetic = load_config(EXAMPLE).cameras[0].source
    assert (synthetic.lighting_jitter, synthetic.lighting) == (SyntheticSource().lighting_jitter, {})

    shown: dict[str, dict] = {}
    backend = None
    for line in lines[lines.index("engine:") : lines.index("  options: {}")]:
        match = re.match(r"  #\s+(?:(\w+):\s+)?(\w+): (\S+)", line)
        if match:
            backend = match.group(1) or backend
            assert backend is not None
            shown.setdefault(backend, {})[match.group(2)] = yaml.safe_load(match.group(3))
    assert set(shown) == set(BACKENDS)
    for name, options in shown.items():
        declaration = backend_class(name).Options
        declared = {f.name: f.default for f in dataclasses.fields(declaration)}
        assert options == declared, name


def test_defaults_and_relative_paths(tmp_path):
    config = parse_config(MINIMAL, base_dir=tmp_path)
    assert config.model.bundle == tmp_path / "bundle"
    assert config.batching.max_batch == 8 and config.batching.max_wait_ms == 10.0
    assert config.engine.backend == "onnxruntime"
    cam0, cam1, _, cam3 = config.cameras
    assert cam0.queue.policy == "drop_oldest" and cam0.queue.size == 64
    assert cam1.queue.policy == "block"  # a folder backlog is never dropped by default
    assert cam1.source.path == tmp_path / "in"
    assert cam3.source.target == str(tmp_path / "video.avi")
    assert cam0.source.count is None and cam0.source.encoding == "raw"
    assert config.control.endpoint == "ipc:///var/lib/inspectd/control.sock"
    assert config.publish.journal.path is None
    assert config.camera("cam2").source.endpoint == "ipc:///tmp/x.sock"


BAD_VALUES = [
    (["station"], "Line 1", "station"),
    (["station"], 5, "station"),
    (["model", "bundle"], 3, "model.bundle"),
    (["engine", "backend"], "cuda", "engine.backend"),
    (["engine", "options"], [1], "engine.options"),
    (["engine", "options"], {"intra_op_threads": "two"}, "engine.options.intra_op_threads"),
    (["engine", "options"], {"bogus": 1}, "engine.options.bogus"),
    (["batching", "max_batch"], 0, "batching.max_batch"),
    (["batching", "max_batch"], 257, "batching.max_batch"),
    (["batching", "max_batch"], True, "batching.max_batch"),
    (["batching", "max_wait_ms"], -1, "batching.max_wait_ms"),
    (["batching", "max_wait_ms"], "10", "batching.max_wait_ms"),
    (["cameras"], [], "cameras"),
    (["cameras"], {"id": "x"}, "cameras"),
    (["cameras", 0, "id"], "cam 0", "cameras[0].id"),
    (["cameras", 1, "id"], "cam0", "cameras[1].id"),
    (["cameras", 0, "source"], "synthetic", "cameras[0].source"),
    (["cameras", 0, "source", "kind"], "usb", "cameras[0].source.kind"),
    (["cameras", 0, "source", "rate_hz"], 0, "cameras[0].source.rate_hz"),
    (["cameras", 0, "source", "width"], 2.5, "cameras[0].source.width"),
    (["cameras", 0, "source", "height"], 0, "cameras[0].source.height"),
    (["cameras", 0, "source", "channels"], 2, "cameras[0].source.channels"),
    (["cameras", 0, "source", "defect_rate"], 1.5, "cameras[0].source.defect_rate"),
    (["cameras", 0, "source", "seed"], "x", "cameras[0].source.seed"),
    (["cameras", 0, "source", "count"], -1, "cameras[0].source.count"),
    (["cameras", 0, "source", "encoding"], "webp", "cameras[0].source.encoding"),
    (["cameras", 1, "source", "path"], None, "cameras[1].source.path"),
    (["cameras", 1, "source", "pattern"], 7, "cameras[1].source.pattern"),
    (["cameras", 1, "source", "poll_ms"], 0, "cameras[1].source.poll_ms"),
    (["cameras", 1, "source", "delete_after"], "yes", "cameras[1].source.delete_after"),
    (["cameras", 1, "source", "done_dir"], 1, "cameras[1].source.done_dir"),
    (["cameras", 2, "source", "endpoint"], "localhost:5560", "cameras[2].source.endpoint"),
    (["cameras", 3, "source", "url"], 5, "cameras[3].source.url"),
    (["cameras", 3, "source", "device"], 0, "cameras[3].source"),  # url and device: exactly one
    (["cameras", 0, "queue", "size"], 0, "cameras[0].queue.size"),
    (["cameras", 0, "queue", "policy"], "drop_newest", "cameras[0].queue.policy"),
    (["cameras", 0, "resize"], "crop", "cameras[0].resize"),
    (["cameras", 0, "max_pixels"], 0, "cameras[0].max_pixels"),
    (["publish", "endpoint"], 5556, "publish.endpoint"),
    (["publish", "masks"], "some", "publish.masks"),
    (["publish", "sndhwm"], -1, "publish.sndhwm"),
    (["publish", "status_interval_s"], 0, "publish.status_interval_s"),
    (["publish", "journal", "path"], 5, "publish.journal.path"),
    (["publish", "journal", "max_mb"], 0, "publish.journal.max_mb"),
    (["control", "endpoint"], "/tmp/sock", "control.endpoint"),
    (["control", "curve"], {"secret": "x"}, "control.curve"),
    (["logging", "level"], "verbose", "logging.level"),
    (["logging", "format"], "xml", "logging.format"),
    (["metrics", "listen"], "9108", "metrics.listen"),
    (["metrics", "listen"], "localhost:99999", "metrics.listen"),
    (["metrics", "listen"], "::1:9108", "metrics.listen"),  # an IPv6 host goes in brackets, as in a URL
    (["state_dir"], 1, "state_dir"),
    (["shutdown_timeout_s"], -3, "shutdown_timeout_s"),
    (["shutdown_timeout_s"], float("nan"), "shutdown_timeout_s"),
]

# Finite but past what a wait can take (time_t): each loaded, then ended its thread with OverflowError.
TOO_LONG = [
    (["publish", "status_interval_s"], 1e10, "publish.status_interval_s: expected at most 3600"),
    (["shutdown_timeout_s"], 1e10, "shutdown_timeout_s: expected at most 60"),
    (["batching", "max_wait_ms"], 1e13, "batching.max_wait_ms: expected at most 3600000"),
    (["cameras", 1, "source", "poll_ms"], 1e13, "cameras[1].source.poll_ms: expected at most 60000"),
    (["cameras", 0, "source", "rate_hz"], 1e-11, "cameras[0].source.rate_hz: expected at least 0.001"),
    # Sizes past what the ingest can use: a queue too large to allocate, more pixels than OpenCV decodes.
    (["cameras", 0, "queue", "size"], 10**12, "cameras[0].queue.size: expected at most 10000"),
    (["cameras", 0, "max_pixels"], 2**31, "cameras[0].max_pixels: expected at most 1073741824"),
    # A size near the largest float (1e303 to mean "no limit") made int(max_mb * 2**20) infinite: an OverflowError
    # traceback at start, after `run --check` had passed it.
    (["publish", "journal", "max_mb"], 1e303, "publish.journal.max_mb: expected at most 1048576"),
    (["archive", "max_mb"], 1e303, "archive.max_mb: expected at most 1048576"),
]


@pytest.mark.parametrize("path,value,message", TOO_LONG, ids=[m.split(":")[0] for _, _, m in TOO_LONG])
def test_waits_too_long_for_a_timeout_are_refused_at_load(path, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(with_value(path, value))


@pytest.mark.parametrize("max_mb", [1e-9, 0.0001, 0.1249])
def test_a_journal_too_small_to_keep_a_replay_is_refused_naming_the_key(max_mb):
    """1e-9 loaded, then the start failed saying "0"; 0.0001 ran, keeping one result per camera, and the replay
    bridges and `subscribe --since` catch up from was gone without a word."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["publish", "journal", "max_mb"], max_mb))
    assert str(refused.value) == f"publish.journal.max_mb: expected at least 0.125, got {max_mb:g}"
    assert parse_config(with_value(["publish", "journal", "max_mb"], 0.125)).publish.journal.max_mb == 0.125


def test_a_publish_hwm_of_0_is_refused_saying_it_means_no_limit():
    # ZeroMQ reads SNDHWM 0 as no limit: one subscriber that stopped reading made the daemon queue every result for
    # it, and its memory grew until it was killed.
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["publish", "sndhwm"], 0))
    assert str(refused.value) == (
        "publish.sndhwm: expected at least 1, got 0 (0 is no limit to ZeroMQ: one stuck subscriber would grow the "
        "daemon's memory without bound)"
    )
    assert parse_config(with_value(["publish", "sndhwm"], 1)).publish.sndhwm == 1


def test_a_shutdown_timeout_longer_than_the_units_allow_is_refused_in_one_line_naming_the_key():
    # The units SIGKILL a stop after TimeoutStopSec=90 (tests/test_deploy.py checks the pair): a longer drain would
    # be cut off half-way, its accepted frames left without results.
    assert parse_config(with_value(["shutdown_timeout_s"], 60)).shutdown_timeout_s == 60
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["shutdown_timeout_s"], 61))
    assert str(refused.value) == "shutdown_timeout_s: expected at most 60, got 61"


SHARED = [
    (
        ["cameras", 2, "source", "endpoint"],
        "ipc:///tmp/pub.sock",
        ["publish", "endpoint"],
        "ipc:///tmp/pub.sock",
        "cameras[2].source.endpoint: ipc socket /tmp/pub.sock is already used by publish.endpoint",
    ),
    (
        ["cameras", 2, "source", "endpoint"],
        "ipc:///tmp//ctl.sock",
        ["control", "endpoint"],
        "ipc:///tmp/ctl.sock",
        "cameras[2].source.endpoint: ipc socket /tmp/ctl.sock is already used by control.endpoint",
    ),
    (
        ["control", "endpoint"],
        "tcp://127.0.0.1:5556",
        ["publish", "endpoint"],
        "tcp://*:5556",
        "control.endpoint: tcp port 5556 on 127.0.0.1 is already used by publish.endpoint",
    ),
    (
        ["cameras", 2, "source", "endpoint"],
        "tcp://127.0.0.1:9108",
        ["metrics", "listen"],
        "127.0.0.1:9108",
        "cameras[2].source.endpoint: tcp port 9108 on 127.0.0.1 is already used by metrics.listen",
    ),
    (
        ["cameras", 2, "source", "endpoint"],
        "tcp://127.0.0.1:9109",
        ["metrics", "listen"],
        "localhost:9109",
        "cameras[2].source.endpoint: tcp port 9109 on 127.0.0.1 is already used by metrics.listen",
    ),
    (
        ["cameras", 2, "source", "endpoint"],
        "tcp://[::1]:9110",
        ["metrics", "listen"],
        "[::1]:9110",
        "cameras[2].source.endpoint: tcp port 9110 on [::1] is already used by metrics.listen",
    ),
    (
        ["control", "endpoint"],
        "tcp://localhost:5557",
        ["publish", "endpoint"],
        "tcp://127.0.0.1:5557",
        "control.endpoint: tcp port 5557 on 127.0.0.1 is already used by publish.endpoint",
    ),
    # A port with a leading zero is the same port to libzmq and to the metrics server.
    (
        ["control", "endpoint"],
        "tcp://127.0.0.1:20001",
        ["publish", "endpoint"],
        "tcp://127.0.0.1:020001",
        "control.endpoint: tcp port 20001 on 127.0.0.1 is already used by publish.endpoint",
    ),
    (
        ["publish", "endpoint"],
        "tcp://127.0.0.1:09108",
        ["station"],
        "line1",
        "metrics.listen: tcp port 9108 on 127.0.0.1 is already used by publish.endpoint",
    ),
    (
        ["cameras", 3],
        {"id": "cam3", "source": {"kind": "zmq", "endpoint": "ipc:///tmp/x.sock"}},
        ["station"],
        "line1",
        "cameras[3].source.endpoint: ipc socket /tmp/x.sock is already used by cameras[2].source.endpoint",
    ),
    (
        ["cameras", 3],
        {"id": "cam3", "source": {"kind": "folder", "path": "in/"}},
        ["station"],
        "line1",
        "cameras[3].source.path: folder ",
    ),
]


@pytest.mark.parametrize(
    "path,value,other,other_value,message", SHARED, ids=[f"{n}-{m.split(':')[0]}" for n, (*_, m) in enumerate(SHARED)]
)
def test_an_address_bound_twice_is_refused_naming_both_keys(path, value, other, other_value, message):
    """A second ZeroMQ bind to an ipc path takes the socket over without a word: a camera copied onto
    publish.endpoint left every subscriber without results while status said healthy."""
    doc = with_value(path, value)
    node = doc
    for key in other[:-1]:
        node = node.setdefault(key, {})
    node[other[-1]] = other_value
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_config(doc)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("other", ["cameras", "publish", "control"])
def test_an_ipc_socket_file_named_through_a_symlinked_folder_is_the_one_file(tmp_path, other):
    """Two cameras on one socket file, one through a link to its folder: both loaded and bound the file, each taking
    it from the other in turn, and one camera's parts were judged under the other's id."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    doc = with_value(["cameras", 2, "source", "endpoint"], f"ipc://{tmp_path}/real/cam.sock")
    if other == "cameras":
        doc["cameras"].append({"id": "cam4", "source": {"kind": "zmq", "endpoint": f"ipc://{tmp_path}/link/cam.sock"}})
        key, first = "cameras[4].source.endpoint", "cameras[2].source.endpoint"
    else:
        doc[other] = {"endpoint": f"ipc://{tmp_path}/link/./cam.sock"}
        key, first = "cameras[2].source.endpoint", f"{other}.endpoint"
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    real = tmp_path.resolve() / "real" / "cam.sock"
    assert str(refused.value) == f"{key}: ipc socket {real} is already used by {first}, expected one of its own"
    # A link to the socket file itself is not followed: a bind replaces the link with a socket file of its own.
    (tmp_path / "real" / "other.sock").symlink_to(tmp_path / "real" / "cam.sock")
    doc = with_value(["cameras", 2, "source", "endpoint"], f"ipc://{tmp_path}/real/cam.sock")
    doc["cameras"].append({"id": "cam4", "source": {"kind": "zmq", "endpoint": f"ipc://{tmp_path}/real/other.sock"}})
    assert len(parse_config(doc).cameras) == 5


@pytest.mark.parametrize("key", ["path", "done_dir"])
def test_a_folder_cameras_folder_that_is_a_file_is_refused_at_load(tmp_path, key):
    """It loaded, and the camera then retried "folder not found" forever: a file there never becomes a folder."""
    (tmp_path / "in").mkdir()
    (tmp_path / "frame.png").write_bytes(b"not a folder")
    doc = with_value(["cameras", 1, "source", "path"], str(tmp_path / "in"))
    doc["cameras"][1]["source"][key] = str(tmp_path / "frame.png")
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    expected = f"cameras[1].source.{key}: {tmp_path / 'frame.png'} is a file, expected a folder"
    assert str(refused.value).startswith(expected), refused.value


def test_a_folder_reached_through_a_symlink_is_the_folder_it_names(tmp_path):
    """Two folder cameras on one directory race for each file; a symlink to it is the same directory."""
    (tmp_path / "in").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    doc = with_value(["cameras", 1, "source", "path"], str(tmp_path / "in"))
    doc["cameras"].append({"id": "cam9", "source": {"kind": "folder", "path": str(tmp_path / "alias")}})
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    assert str(refused.value) == (
        f"cameras[4].source.path: folder {tmp_path / 'in'} is already used by cameras[1].source.path, "
        "expected one of its own"
    )


def test_a_folder_reached_through_a_bind_mount_is_the_folder_it_shows(tmp_path):
    """A bind mount of one camera's folder under another name resolves to itself, not to the folder: the two cameras
    would still race for each file (checked by device and inode). Inside a private mount namespace."""
    (tmp_path / "in").mkdir()
    (tmp_path / "mounted").mkdir()
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_config import with_value; "
        "from inspectd.daemon.config import parse_config, ConfigError\n"
        "doc = with_value(['cameras', 1, 'source', 'path'], sys.argv[2])\n"
        "doc['cameras'].append({'id': 'cam9', 'source': {'kind': 'folder', 'path': sys.argv[3]}})\n"
        "try:\n    parse_config(doc)\nexcept ConfigError as exc:\n    print(exc)\n"
    )
    script = f'mount --bind "$1" "$2" && exec "{sys.executable}" -c "$3" "$4" "$1" "$2"'
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
        + [str(tmp_path / "in"), str(tmp_path / "mounted"), check, tests],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"no private mount namespace for this user: {done.stderr.strip()}")  # not an install step
    assert done.stdout.strip() == (
        f"cameras[4].source.path: folder {tmp_path / 'mounted'} is already used by cameras[1].source.path, "
        "expected one of its own"
    ), done.stdout + done.stderr


def test_a_done_dir_that_another_camera_watches_is_refused_naming_both(tmp_path):
    """Every frame moved there would be read again by the other camera as a new frame, for ever."""
    (tmp_path / "in").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    doc = with_value(["cameras", 1, "source", "path"], str(tmp_path / "in"))
    doc["cameras"].append(
        {"id": "cam9", "source": {"kind": "folder", "path": str(tmp_path / "b"), "done_dir": str(tmp_path / "alias")}}
    )
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    assert str(refused.value) == (
        f"cameras[4].source.done_dir: {tmp_path / 'alias'} is the folder cameras[1].source.path watches, "
        "expected a folder no camera watches"
    )
    # Shared by two cameras, or beside the folders, it is fine.
    doc["cameras"][-1]["source"]["done_dir"] = str(tmp_path / "done")
    doc["cameras"][1]["source"]["done_dir"] = str(tmp_path / "done")
    parse_config(doc)


def test_addresses_that_do_not_clash_are_accepted():
    doc = with_value(["publish", "endpoint"], "tcp://127.0.0.1:5556")
    doc["cameras"][2]["source"]["endpoint"] = "tcp://127.0.0.2:5556"  # same port, another address
    doc["control"] = {"endpoint": "tcp://127.0.0.1:*"}  # an ephemeral port
    parse_config(doc)
    doc = with_value(["publish", "endpoint"], "tcp://127.0.0.1:0")  # port 0: ephemeral as well
    doc["metrics"] = {"listen": "127.0.0.1:0"}
    parse_config(doc)


@pytest.mark.parametrize("path,value,key", BAD_VALUES, ids=[f"{k}={v!r}" for _, v, k in BAD_VALUES])
def test_bad_value_names_its_key_path(path, value, key):
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(path, value))
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert "\n" not in message


UNREACHABLE_ENDPOINTS = [
    # No port: `run --check` passed it and `run` could not bind it.
    ("tcp://127.0.0.1", "expected tcp://HOST:PORT, PORT a number up to 65535 or *, got 'tcp://127.0.0.1'"),
    ("tcp://127.0.0.1:", "expected tcp://HOST:PORT, PORT a number up to 65535 or *, got 'tcp://127.0.0.1:'"),
    ("tcp://:5556", "expected tcp://HOST:PORT, PORT a number up to 65535 or *, got 'tcp://:5556'"),
    ("tcp://127.0.0.1:http", "expected tcp://HOST:PORT, PORT a number up to 65535 or *, got 'tcp://127.0.0.1:http'"),
    ("tcp://127.0.0.1:65536", "expected tcp://HOST:PORT, PORT a number up to 65535 or *, got 'tcp://127.0.0.1:65536'"),
    ("tcp://::1:5556", "expected an IPv6 host in brackets, as tcp://[::1]:5556, got 'tcp://::1:5556'"),
    # A daemon publishing to, or steered from, its own process alone: it ran, and nothing could ever reach it.
    ("inproc://x", "expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH), got 'inproc://x'"),
    # ZeroMQ bound the path cut at the NUL, past the check that no address is bound twice.
    (
        "ipc:///tmp/a\0b",
        "'ipc:///tmp/a\\x00b' holds a NUL byte, expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)",
    ),
    # An abstract socket without a name: the bind failed at start (Invalid argument).
    ("ipc://@", "'ipc://@': an abstract socket with no name, expected ipc://@NAME"),
]


@pytest.mark.parametrize(
    "path", [["publish", "endpoint"], ["control", "endpoint"], ["cameras", 2, "source", "endpoint"]]
)
@pytest.mark.parametrize("endpoint,message", UNREACHABLE_ENDPOINTS, ids=[e for e, _ in UNREACHABLE_ENDPOINTS])
def test_an_endpoint_no_other_process_could_reach_is_refused_naming_its_key(path, endpoint, message):
    key = "cameras[2].source.endpoint" if path[0] == "cameras" else ".".join(path)
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(path, endpoint))
    assert str(info.value) == f"{key}: {message}"


@pytest.mark.parametrize(
    "path", [["publish", "endpoint"], ["control", "endpoint"], ["cameras", 2, "source", "endpoint"]]
)
@pytest.mark.parametrize("abstract", [False, True], ids=["file", "abstract"])
def test_an_ipc_path_longer_than_a_socket_address_holds_is_refused_naming_its_key(tmp_path, path, abstract):
    """`run --check` passed it and the bind at start failed (exit 1, retried by the unit for ever). The longest one
    accepted binds."""
    import zmq

    key = "cameras[2].source.endpoint" if path[0] == "cameras" else ".".join(path)
    prefix = "@" if abstract else f"{tmp_path}/"
    longest = "ipc://" + prefix + "s" * (zmq.IPC_PATH_MAX_LEN - len(prefix))
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(path, longest + "s"))
    assert str(info.value).startswith(f"{key}: 'ipc://"), info.value
    assert str(info.value).endswith(": its path is 108 bytes, expected at most 107 (all a socket address holds)")
    assert parse_config(with_value(path, longest))
    sock = zmq.Context.instance().socket(zmq.PULL)
    try:
        sock.bind(longest)
    finally:
        sock.close(linger=0)


def test_a_control_socket_left_out_whose_default_path_is_too_long_is_refused_naming_control_endpoint(tmp_path):
    """The default ipc://<state_dir>/control.sock of a deep state_dir: `run --check` passed, `run` could not bind."""
    state_dir = tmp_path / ("d" * (120 - len(str(tmp_path))))
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(["state_dir"], str(state_dir)))
    message = str(info.value)
    assert message.startswith("control.endpoint: left out, so the default in state_dir 'ipc://"), message
    assert message.endswith("expected at most 107 (all a socket address holds); set it, or a shorter state_dir")
    doc = with_value(["state_dir"], str(state_dir))
    doc["control"] = {"endpoint": f"ipc://{tmp_path}/control.sock"}
    assert parse_config(doc).state_dir == state_dir


def test_endpoints_of_every_form_a_bind_takes_are_accepted():
    import socket

    # A host name or interface this machine has: one the resolver calls unknown is refused (the test below).
    interface = socket.if_nameindex()[-1][1]
    forms = ("tcp://127.0.0.1:*", "tcp://*:5556", "tcp://[::1]:5556", f"tcp://{interface}:5556", "tcp://localhost:0")
    for endpoint in forms:
        assert parse_config(with_value(["publish", "endpoint"], endpoint)).publish.endpoint == endpoint


NO_SUCH_HOME = "cannot expand '~nosuchuser/x' (no such user or home directory), expected an absolute path or one "
UNUSABLE_PATHS = [
    (["model", "bundle"], "~nosuchuser/x", "model.bundle: " + NO_SUCH_HOME),
    (["state_dir"], "~nosuchuser/x", "state_dir: " + NO_SUCH_HOME),
    (["cameras", 1, "source", "path"], "~nosuchuser/x", "cameras[1].source.path: " + NO_SUCH_HOME),
    (["cameras", 3, "source", "url"], "~nosuchuser/x", "cameras[3].source.url: " + NO_SUCH_HOME),
    (["model", "bundle"], "/b\0x", "model.bundle: '/b\\x00x' holds a NUL byte, expected a path"),
    (["state_dir"], "/tmp/a\0b", "state_dir: '/tmp/a\\x00b' holds a NUL byte, expected a path"),
    (["publish", "journal", "path"], "/j\0", "publish.journal.path: '/j\\x00' holds a NUL byte, expected a path"),
    (["cameras", 1, "source", "path"], "in\0", "cameras[1].source.path: 'in\\x00' holds a NUL byte, expected a path"),
]


@pytest.mark.parametrize("path,value,message", UNUSABLE_PATHS, ids=[f"{p[-1]}={v!r}" for p, v, _ in UNUSABLE_PATHS])
def test_a_path_no_system_call_could_take_is_refused_naming_its_key(path, value, message):
    """~user with no such user made pathlib raise RuntimeError (a traceback from `run` and `run --check`); a NUL byte
    was refused without its key, or not at all."""
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(path, value))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_run_check_refuses_a_home_that_cannot_be_expanded_in_one_line(tmp_path):
    config = tmp_path / "inspectd.yaml"
    config.write_text(
        "station: s\nmodel: {bundle: ~nosuchuser/bundles/current}\ncameras: [{id: c, source: {kind: synthetic}}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--check", "--config", str(config), "--service-user", ""],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "model.bundle: cannot expand '~nosuchuser" in done.stderr


def test_url_error_message_says_what_was_expected():
    with pytest.raises(
        ConfigError,
        match=r"^cameras\[3\]\.source\.url: expected a string \(rtsp://, http://, "
        r"file path\), got 5$",
    ):
        parse_config(with_value(["cameras", 3, "source", "url"], 5))


@pytest.mark.parametrize(
    "path,key",
    [
        (["colour"], "colour"),
        (["batching", "max_batches"], "batching.max_batches"),
        (["cameras", 0, "source", "fps"], "cameras[0].source.fps"),
        (["cameras", 1, "source", "rate_hz"], "cameras[1].source.rate_hz"),  # a synthetic key on a folder source
        (["cameras", 0, "queue", "length"], "cameras[0].queue.length"),
        (["publish", "journal", "max_files"], "publish.journal.max_files"),
        (["metrics", "port"], "metrics.port"),
    ],
)
def test_unknown_keys_are_refused(path, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('[', '.').replace(']', '.')}: unknown key"):
        parse_config(with_value(path, 1))


@pytest.mark.parametrize("missing", ["station", "model", "cameras"])
def test_required_sections(missing):
    doc = copy.deepcopy(MINIMAL)
    del doc[missing]
    with pytest.raises(ConfigError, match=rf"^{missing}"):
        parse_config(doc)


def test_malformed_yaml_is_one_line_with_line_number(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("station: line1\nmodel:\n  bundle: x\ncameras: [\n  {id: cam0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:") and "malformed YAML" in message
    line = int(message.split(":")[1])
    assert 4 <= line <= 6


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty config"):
        load_config(tmp_path / "empty.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "c.yaml"
    path.write_text(
        "station: s\nmodel: {bundle: ../b}\ncameras:\n"
        "  - {id: c, source: {kind: folder, path: in, done_dir: done}}\n"
        "publish: {journal: {path: state/j.log}}\nstate_dir: state\n"
    )
    config = load_config(path)
    assert config.model.bundle == tmp_path / "b"
    assert config.cameras[0].source.done_dir == tmp_path / "conf" / "done"
    assert config.publish.journal.path == tmp_path / "conf" / "state" / "j.log"
    assert config.control.endpoint == f"ipc://{tmp_path / 'conf' / 'state'}/control.sock"


def test_engine_options_are_validated_by_the_backend_and_kept_as_a_mapping():
    config = parse_config(with_value(["engine"], {"backend": "onnxruntime", "options": {"intra_op_threads": 2}}))
    assert config.engine.options == {"intra_op_threads": 2}
    with pytest.raises(ConfigError, match=r"^engine.options.providers: expected one of auto\|cpu\|cuda, got 5$"):
        parse_config(with_value(["engine"], {"backend": "onnxruntime", "options": {"providers": 5}}))


@pytest.mark.parametrize(
    "backend,options,message",
    [
        ("onnxruntime", {"providers": "gpu"}, "engine.options.providers: expected one of auto|cpu|cuda, got 'gpu'"),
        ("onnxruntime", {"intra_op_threads": -1}, "engine.options.intra_op_threads: expected at least 0, got -1"),
        ("onnxruntime", {"allow_spinning": "no"}, "engine.options.allow_spinning: expected true or false, got 'no'"),
        ("torch", {"device": "gpu0"}, "engine.options.device: expected cpu, cuda or cuda:N, got 'gpu0'"),
        ("torch", {"threads": "4"}, "engine.options.threads: expected an integer, got '4'"),
        ("tensorrt", {"device": -1}, "engine.options.device: expected at least 0, got -1"),
        ("onnxruntime", {"precision": "bf16"}, "engine.options.precision: expected one of fp32|fp16, got 'bf16'"),
        ("tensorrt", {"precision": "fp8"}, "engine.options.precision: expected one of \"\"|fp32|fp16|int8, got 'fp8'"),
        (
            "tensorrt",
            {"plan_file": "x"},
            "engine.options.plan_file: unknown key (known: device, plan, precision)",
        ),
    ],
)
def test_engine_options_are_refused_at_load_by_the_backends_own_declaration(backend, options, message):
    """Before, `providers: gpu` loaded fine and failed only when the daemon opened the engine."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["engine"], {"backend": backend, "options": options}))
    assert str(refused.value) == message


def test_engine_options_are_checked_where_the_backends_library_is_missing():
    """A runtime-only station has no torch; its config naming the torch backend is still checked in full."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from inspectd.daemon.config import parse_config\n"
        "from inspectd.errors import ConfigError\n"
        f"doc = {MINIMAL!r}\n"
        "config = parse_config({**doc, 'engine': {'backend': 'torch', 'options': {'threads': 2}}})\n"
        "assert config.engine.options == {'threads': 2}\n"
        "try:\n"
        "    parse_config({**doc, 'engine': {'backend': 'torch', 'options': {'device': 'gpu0'}}})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "engine.options.device: expected cpu, cuda or cuda:N, got 'gpu0'"


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_each_camera_source_is_checked_by_its_own_declaration(kind):
    """The registry's kinds, each with the declaration in its own module: an unknown key names that declaration's
    keys (so a key of another kind is refused too), and a bad value of each of its fields names the field."""
    declaration = SOURCES[kind].Options
    assert declaration.__module__ == SOURCES[kind].__module__
    fields = [f.name for f in dataclasses.fields(declaration)]
    assert declaration.__dataclass_fields__["kind"].default == kind
    source = {"synthetic": {}, "folder": {"path": "in"}, "zmq": {"endpoint": "ipc:///tmp/x"}, "genicam": {}}.get(
        kind, {"device": 0}
    )
    doc = with_value(["cameras", 0, "source"], {"kind": kind, **source, "colour": 1})
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    assert str(refused.value) == f"cameras[0].source.colour: unknown key (known: {', '.join(sorted(fields))})"
    for field in fields:
        if field == "kind":
            continue
        with pytest.raises(ConfigError) as refused:
            parse_config(with_value(["cameras", 0, "source"], {"kind": kind, **source, field: [1]}))
        assert str(refused.value).startswith(f"cameras[0].source.{field}: expected "), str(refused.value)


def test_source_kind_is_required_and_checked():
    for source, message in [
        ({"rate_hz": 5}, "cameras[0].source.kind: required, expected one of synthetic|folder|zmq|opencv|genicam"),
        ({"kind": "usb"}, "cameras[0].source.kind: expected one of synthetic|folder|zmq|opencv|genicam, got 'usb'"),
        ({"kind": ["zmq"]}, "cameras[0].source.kind: expected one of synthetic|folder|zmq|opencv|genicam, got ['zmq']"),
        (None, "cameras[0].source: expected a mapping with kind synthetic|folder|zmq|opencv|genicam, got None"),
    ]:
        with pytest.raises(ConfigError) as refused:
            parse_config(with_value(["cameras", 0, "source"], source))
        assert str(refused.value) == message


def test_resize_is_no_longer_a_camera_key():
    """It was parsed and documented but never read: the bundle's manifest decides the resize policy."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["cameras", 0, "resize"], "pad"))
    assert str(refused.value) == "cameras[0].resize: unknown key (known: id, max_pixels, queue, source)"


def test_a_section_left_empty_takes_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "station: s\nmodel: {bundle: b}\ncameras: [{id: c, source: {kind: synthetic}}]\n"
        "publish:\n  # endpoint: tcp://127.0.0.1:5556\nengine: {options: null}\n"
    )
    config = load_config(path)
    assert config.publish.endpoint == "tcp://127.0.0.1:5556" and config.metrics.listen == "127.0.0.1:9108"
    assert config.engine.options == {}
    # Except the sections whose null would read as off (`listen: null` is off): there the operator says which.
    path.write_text(path.read_text() + "metrics:\n  # listen: 127.0.0.1:9108\n")
    with pytest.raises(ConfigError, match="^metrics: null, expected listen: null to turn it off, or the section left"):
        load_config(path)


@pytest.mark.parametrize(
    "text,line,message",
    [
        ("station: a\nstation: b\n", 2, "station: duplicate key (first on line 1)"),
        (
            "cameras:\n  - id: c\n    source:\n      kind: zmq\n      kind: folder\n",
            5,
            "cameras[0].source.kind: duplicate key (first on line 4)",
        ),
        ("publish: {masks: always, sndhwm: 1, masks: never}\n", 1, "publish.masks: duplicate key (first on line 1)"),
        ("metrics:\n  listen: null\n\n\nmetrics: {}\n", 5, "metrics: duplicate key (first on line 1)"),
    ],
)
def test_duplicate_yaml_keys_are_refused_with_key_path_and_line(tmp_path, text, line, message):
    """PyYAML alone keeps the last of two equal keys without a word."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}:{line}: {message}, expected each key once"


def test_yaml_merge_keys_may_be_overridden_without_counting_as_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "station: s\nmodel: {bundle: b}\n"
        "cameras:\n  - &first {id: a, source: {kind: synthetic, rate_hz: 5}}\n"
        "  - <<: *first\n    id: b\n"
    )
    assert [c.id for c in load_config(path).cameras] == ["a", "b"]


def test_config_is_frozen():
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.station = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "backend,key",
    [("onnxruntime", "intra_op_threads"), ("onnxruntime", "inter_op_threads"), ("torch", "threads")],
)
def test_a_thread_count_beyond_the_bound_is_refused_at_load(backend, key):
    """2**31 loaded and `run --check` said valid; the engine's open then died in pybind11 with a TypeError naming no
    key, and a large count below it would have started that many threads."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["engine"], {"backend": backend, "options": {key: 2**31}}))
    assert str(refused.value) == f"engine.options.{key}: expected at most 1024, got 2147483648"
    assert parse_config(with_value(["engine"], {"backend": backend, "options": {key: 1024}})).engine.options == {
        key: 1024
    }


GENICAM = {"kind": "genicam"}
ONE_DEVICE = [
    (
        [{**GENICAM, "device": "10.0.0.5"}, {**GENICAM, "device": "10.0.0.5"}],
        "cameras[1].source.device: genicam device 10.0.0.5 is already used by cameras[0].source.device, expected one "
        "of its own",
    ),
    (
        [GENICAM, GENICAM],
        "cameras[1].source.device: left out, as is cameras[0].source.device: both would open the first genicam device "
        "found, expected a device set for each genicam camera when there are several",
    ),
    (
        [{**GENICAM, "device": "Basler-1"}, GENICAM],
        "cameras[1].source.device: left out: the first genicam device found, which cameras[0].source.device (genicam "
        "device Basler-1) may be, expected a device set for each genicam camera when there are several",
    ),
    (
        [GENICAM, {**GENICAM, "device": "Basler-1"}],
        "cameras[1].source.device: genicam device Basler-1 may be the first genicam device found, which "
        "cameras[0].source.device opens, expected a device set for each genicam camera when there are several",
    ),
    (
        [{"kind": "opencv", "device": 0}, {"kind": "opencv", "device": 0}],
        "cameras[1].source.device: video device 0 (/dev/video0) is already used by cameras[0].source.device, expected "
        "one of its own",
    ),
    (
        [{"kind": "opencv", "device": 2}, {"kind": "opencv", "url": "/dev/video2"}],
        "cameras[1].source.url: video device 2 (/dev/video2) is already used by cameras[0].source.device, expected "
        "one of its own",
    ),
]


@pytest.mark.parametrize(
    "sources,message", ONE_DEVICE, ids=["same", "first-found", "mixed", "mixed-after", "opencv", "opencv-url"]
)
def test_two_cameras_on_one_device_are_refused_naming_both_keys(sources, message):
    """The second camera found the device held by the first and reopened for ever behind a "write_register timeout"
    logged at info; two genicam cameras with no device both opened the first camera found."""
    doc = {**MINIMAL, "cameras": [{"id": f"c{i}", "source": source} for i, source in enumerate(sources)]}
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    assert str(refused.value) == message
    # Devices of their own, and a single genicam camera with none: accepted.
    sources = [
        GENICAM,
        {"kind": "opencv", "device": 0},
        {"kind": "opencv", "device": 1},
        {"kind": "opencv", "url": "0"},
    ]
    config = parse_config({**MINIMAL, "cameras": [{"id": f"c{i}", "source": s} for i, s in enumerate(sources)]})
    assert [c.source.kind for c in config.cameras] == ["genicam", "opencv", "opencv", "opencv"]
    two = [{**GENICAM, "device": "10.0.0.5"}, {**GENICAM, "device": "10.0.0.6"}]
    assert len(parse_config({**MINIMAL, "cameras": [{"id": f"c{i}", "source": s} for i, s in enumerate(two)]}).cameras)


@pytest.mark.parametrize("form", ["path", "file://"])
def test_a_video_node_named_through_a_link_is_the_device_it_links_to(tmp_path, form):
    """udev's /dev/v4l/by-id/... names are links to /dev/videoN: two cameras on one node, one by its index and one by
    such a link, would fight over it as two indices do; a file:// url of the link is the same node."""
    link = tmp_path / "usb-Camera_1234-video-index0"
    link.symlink_to("/dev/video3")
    url = str(link) if form == "path" else f"file://{link}"
    sources = [{"kind": "opencv", "url": url}, {"kind": "opencv", "device": 3}]
    with pytest.raises(ConfigError) as refused:
        parse_config({**MINIMAL, "cameras": [{"id": f"c{i}", "source": s} for i, s in enumerate(sources)]})
    assert str(refused.value) == (
        "cameras[1].source.device: video device 3 (/dev/video3) is already used by cameras[0].source.url, expected one "
        "of its own"
    )


@pytest.mark.parametrize("listen", ["*:9108", "nosuchhost.invalid:9108", "[localhost]:9108"])
def test_a_metrics_listen_address_the_server_cannot_bind_is_refused_at_load(listen):
    """`*:9108` (as the zmq endpoints write it) and a host that does not resolve passed `run --check`; `run` then
    exited 1 with "cannot listen (Name or service not known)"."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["metrics", "listen"], listen))
    assert str(refused.value).startswith("metrics.listen: "), refused.value
    assert "expected " in str(refused.value) and "\n" not in str(refused.value)
    for listen in ("0.0.0.0:9108", "[::1]:9108", "localhost:9108", "127.0.0.1:0"):
        assert parse_config(with_value(["metrics", "listen"], listen)).metrics.listen == listen


def test_a_state_dir_beneath_a_file_is_refused_naming_state_dir(tmp_path):
    """It passed `run --check`; the start then failed naming publish.journal.path with "File exists"."""
    (tmp_path / "afile").write_text("a file")
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["state_dir"], str(tmp_path / "afile" / "sub" / "state")))
    assert str(refused.value) == (
        f"state_dir: {tmp_path / 'afile' / 'sub' / 'state'}: {tmp_path / 'afile'} is not a directory, expected a "
        "directory (made at start when missing)"
    )
    # Missing parts under a directory are made at start.
    state = tmp_path / "missing" / "state"
    assert parse_config(with_value(["state_dir"], str(state))).state_dir == state


def test_a_state_dir_that_is_a_file_is_refused_naming_state_dir(tmp_path):
    """It loaded; the start then failed naming publish.journal.path, a key the config never set."""
    (tmp_path / "state").write_text("a file")
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["state_dir"], str(tmp_path / "state")))
    assert str(refused.value) == (
        f"state_dir: {tmp_path / 'state'} is not a directory, expected a directory (made at start when missing)"
    )


@pytest.mark.parametrize(
    "path,key,default",
    [
        (["publish", "journal", "path"], "publish.journal.path", "journal"),
        (["archive", "path"], "archive.path", "archive"),
    ],
)
def test_a_journal_or_archive_folder_that_is_a_file_is_refused_naming_its_key(tmp_path, path, key, default):
    """Both loaded: then the journal's open failed at start (exit 1, retried), and the archive ran degraded for good,
    keeping no image."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "afile").write_text("a file")
    for folder in (state / "afile", state / "afile" / "sub"):
        doc = with_value(path, str(folder))
        doc["state_dir"] = str(state)
        with pytest.raises(ConfigError) as refused:
            parse_config(doc)
        beneath = "" if folder == state / "afile" else f"{folder}: "
        assert str(refused.value) == (
            f"{key}: {beneath}{state / 'afile'} is not a directory, expected a directory (made at start when missing)"
        )
    # A symbolic link to nothing: the start can neither make the folder there nor enter it.
    (state / "gone").symlink_to(state / "nowhere")
    doc = with_value(path, str(state / "gone"))
    doc["state_dir"] = str(state)
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    assert str(refused.value) == (
        f"{key}: {state / 'gone'} is a symbolic link to {str(state / 'nowhere')!r}, which does not exist, expected "
        "a directory or a link to one"
    )
    (state / "nowhere").mkdir()  # a link to a folder is one
    assert parse_config(doc).state_dir == state
    (state / "loop").symlink_to(state / "loop")
    doc = with_value(path, str(state / "loop"))
    doc["state_dir"] = str(state)
    with pytest.raises(ConfigError, match=f"^{key}: {state / 'loop'} is a symbolic link loop, expected a directory"):
        parse_config(doc)
    # Left out, it is a folder under state_dir: a file there is refused the same way.
    (state / default).write_text("a file")
    with pytest.raises(ConfigError, match=f"^{key}: {state / default} is not a directory"):
        parse_config(with_value(["state_dir"], str(state)))
    # Turned off, nothing is made there.
    doc = with_value(path[:-1] + ["enabled"], False)
    doc["state_dir"] = str(state)
    assert parse_config(doc).state_dir == state


def test_a_camera_id_too_long_for_a_file_name_is_refused_saying_the_limit():
    """A 240-character id loaded, and every archive write then failed with ENAMETOOLONG for the whole run."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["cameras", 0, "id"], "c" * 65))
    assert str(refused.value).startswith(
        "cameras[0].id: expected a camera id ([a-zA-Z0-9_-]+, at most 64 characters: it begins file names), got 'ccc"
    ), refused.value
    assert parse_config(with_value(["cameras", 0, "id"], "c" * 64)).cameras[0].id == "c" * 64
    for bad in ("", "cam 0", "cam/0", "cam0\n"):
        with pytest.raises(ConfigError, match=r"^cameras\[0\]\.id: expected a camera id"):
            parse_config(with_value(["cameras", 0, "id"], bad))


@pytest.mark.parametrize(
    "pattern,message",
    [
        ("sub/*.png", "expected a glob on the file name, with no / (point path at the folder), got 'sub/*.png'"),
        ("*.{png,jpg}", "expected a glob on the file name (*, ?, [...]), got '*.{png,jpg}': there are no {a,b}"),
        ("[*.png", "expected a glob on the file name whose every [ is closed by a ] (a set such as [pj]; a [ of"),
        ("*.[pj][np", "expected a glob on the file name whose every [ is closed by a ]"),
        ("*[!]", "expected a glob on the file name whose every [ is closed by a ]"),
        ("img_[9-0].bmp", "expected a glob on the file name whose every [...] set holds a character, got 'img_[9-0]"),
        ("*.[z-a]*", "expected a glob on the file name whose every [...] set holds a character, got '*.[z-a]*': a "),
    ],
)
def test_a_folder_pattern_fnmatch_cannot_match_is_refused_naming_the_key(pattern, message):
    """It loaded, the camera showed running, and no file was ever taken."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(["cameras", 1, "source", "pattern"], pattern))
    assert str(refused.value).startswith(f"cameras[1].source.pattern: {message}"), refused.value
    for pattern in ("*.[pj][np]g", "*", "{x}.png", "[[]a].png", "[]]*", "[!]]*", "a]b", "[!9-0]*", "[x(?!)]*"):
        assert parse_config(with_value(["cameras", 1, "source", "pattern"], pattern)).cameras[1].source.pattern


@pytest.mark.parametrize(
    "key,folder,owner",
    [
        ("path", "state", "state_dir"),
        ("path", "state/journal/cam0", "publish.journal.path"),
        ("path", "state/archive", "archive.path"),
        ("done_dir", "state", "state_dir"),
        ("path", "bundle", "model.bundle"),
    ],
)
def test_a_folder_camera_on_the_daemons_own_folders_is_refused(tmp_path, key, folder, owner):
    """A folder camera on state_dir with delete_after took the daemon's inspectd.lock as a frame and deleted it: a
    second daemon then started on the same journal."""
    doc = with_value(["state_dir"], "state")
    doc["cameras"][1]["source"][key] = folder
    with pytest.raises(ConfigError) as refused:
        parse_config(doc, base_dir=tmp_path)
    where = "is" if folder in ("state", "bundle", "state/archive") else "is inside"
    owned = {"publish.journal.path": "state/journal", "archive.path": "state/archive"}.get(owner, folder)
    assert str(refused.value) == (
        f"cameras[1].source.{key}: {tmp_path / folder} {where} the daemon's {owner} {tmp_path / owned}, expected a "
        "folder of the camera's own (its files would be taken as frames and deleted or moved)"
    )
    # Elsewhere under state_dir is fine: the shipped example watches /var/lib/inspectd/incoming/cam1.
    doc = with_value(["state_dir"], "state")
    doc["cameras"][1]["source"].update(path="state/incoming/cam1", done_dir="state/done")
    assert parse_config(doc, base_dir=tmp_path).cameras[1].source.path == tmp_path / "state/incoming/cam1"


def test_numbers_are_read_as_yaml_1_2_reads_them(tmp_path):
    """YAML 1.1 read 1e4 as text ("expected a number, got '1e4'"), 0123 as octal 83 and 1:30 as 90."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "station: s\nmodel: {bundle: b}\n"
        "cameras: [{id: c, source: {kind: genicam, exposure_us: 1e4, gain_db: 2.5E-1}, queue: {size: 123}}]\n"
        "archive: {max_mb: 2.5e3, good_every: 0o17}\nbatching: {max_wait_ms: .5}\n"
    )
    config = load_config(path)
    assert (config.cameras[0].source.exposure_us, config.cameras[0].source.gain_db) == (10000.0, 0.25)
    assert (config.cameras[0].queue.size, config.archive.max_mb, config.archive.good_every) == (123, 2500.0, 15)
    assert config.batching.max_wait_ms == 0.5
    path.write_text("station: s\nmodel: {bundle: b}\ncameras: [{id: c, source: {kind: synthetic}}]\n"
                    "batching: {max_wait_ms: 1:30}\n")  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == "batching.max_wait_ms: expected a number, got '1:30'"


LEADING_ZERO = [
    ("0100", 'octal 64, expected 100, 0o100 for octal 64, or "0100" in quotes for a name'),
    ("08", 'the text "08", expected 8, or "08" in quotes for a name'),
    ("0815", 'the text "0815", expected 815, or "0815" in quotes for a name'),
    ("0215439", 'the text "0215439", expected 215439, or "0215439" in quotes for a name'),
]


@pytest.mark.parametrize("number,read", LEADING_ZERO)
def test_an_integer_with_a_leading_zero_is_refused_naming_the_key(tmp_path, number, read):
    """YAML 1.1 read `0100` as octal 64 and YAML 1.2 as 100: a Modbus register written 0100 moved from 64 to 100
    without a word; `08` and `0815` were text (a camera id, a station) and became 8 and 815."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "station: s\nmodel: {bundle: b}\ncameras:\n"
        f"  - {{id: c, source: {{kind: synthetic}}, queue: {{size: {number}}}}}\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == (
        f"{path}:4: cameras[0].queue.size: {number} has a leading zero, which YAML 1.1 read as {read}"
    )
    for number, value, zero in (("0x10", 16, "0"), ("0o10", 8, "00"), ("10", 10, "0.5")):
        path.write_text(
            "station: s\nmodel: {bundle: b}\n"
            f"cameras: [{{id: c, source: {{kind: synthetic}}, queue: {{size: {number}}}}}]\n"
            f"batching: {{max_wait_ms: {zero}}}\n"
        )
        config = load_config(path)
        assert (config.cameras[0].queue.size, config.batching.max_wait_ms) == (value, float(zero))
    path.write_text("station: s\nmodel: {bundle: b}\ncameras: [{id: '0815', source: {kind: synthetic}}]\n")
    assert load_config(path).cameras[0].id == "0815"


def test_a_number_too_large_for_a_float_is_refused_naming_the_key(tmp_path):
    """A genicam serial `4E1234` became the float inf, and the refusal said "got inf", a value not in the file."""
    path = tmp_path / "c.yaml"
    path.write_text("station: s\nmodel: {bundle: b}\ncameras: [{id: c, source: {kind: genicam, device: 4E1234}}]\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == (
        f"{path}:3: cameras[0].source.device: 4E1234 is too large for a number (it would be read as infinite), "
        'expected a smaller one (or "4E1234" in quotes for a name)'
    )
    path.write_text(path.read_text().replace("4E1234", "'4E1234'"))
    assert load_config(path).cameras[0].source.device == "4E1234"
    # .inf written as such keeps its meaning: a number no finite-number key takes.
    path.write_text("station: s\nmodel: {bundle: b}\ncameras: [{id: c, source: {kind: synthetic}}]\n"
                    "batching: {max_wait_ms: .inf}\n")  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == "batching.max_wait_ms: expected a finite number, got inf"


@pytest.mark.parametrize("endpoint", ["ipc://pub.sock", "ipc://./run/pub.sock", "ipc://~/pub.sock"])
def test_a_relative_ipc_endpoint_is_refused_naming_the_key(tmp_path, endpoint):
    """Resolved against the config file's folder, read-only under the units, every start failed to bind; against
    the working directory, a client given the path on its command line looked elsewhere."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "c.yaml"
    path.write_text(
        "station: s\nmodel: {bundle: b}\nstate_dir: state\n"
        "cameras: [{id: c, source: {kind: zmq, endpoint: 'ipc://@inspectd-c'}}]\n"
        f"publish: {{endpoint: '{endpoint}'}}\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == (
        "publish.endpoint: expected an absolute socket path, as ipc:///var/lib/inspectd/NAME.sock (or an abstract "
        f"ipc://@NAME), got '{endpoint}'"
    )
    path.write_text(path.read_text().replace(endpoint, f"ipc://{tmp_path / 'pub.sock'}"))
    config = load_config(path)
    assert config.publish.endpoint == f"ipc://{tmp_path / 'pub.sock'}"
    assert config.cameras[0].source.endpoint == "ipc://@inspectd-c"  # an abstract socket: no path


# A namespace with no network (as at boot before DNS answers: EAI_AGAIN), or one whose only nameserver takes every
# query and never answers (the lookup holds for the resolver's timeout).
UNSHARED = """
set -e
if [ "$1" = silent ]; then
  ip link set lo up
  printf 'nameserver 127.0.0.1\\noptions timeout:30 attempts:1\\n' > "$2/resolv.conf"
  mount --bind "$2/resolv.conf" /etc/resolv.conf
  "$3" -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 53)); \\
s.settimeout(60); open('$2/ready', 'w').close(); [s.recv(4096) for _ in iter(int, 1)]" &
  nameserver=$!
  while [ ! -e "$2/ready" ]; do sleep 0.05; done
fi
rc=0
"$3" -c "import sys; from inspectd.daemon.config import load_config; load_config(sys.argv[1]); print('loaded')" \\
  "$2/inspectd.yaml" || rc=$?
if [ -n "${nameserver:-}" ]; then kill "$nameserver"; fi
exit $rc
"""


@pytest.mark.parametrize("dns", ["unreachable", "silent"])
def test_a_metrics_host_name_the_resolver_cannot_answer_yet_is_left_to_the_start(tmp_path, dns):
    """With no DNS server reached yet after a power cut the lookup's EAI_AGAIN was a config error, exit 2, which the
    units never retry: the daemon stayed down. A resolver that never answers held the load for its whole timeout."""
    if subprocess.run(["unshare", "-rnm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rnm (user, network and mount namespaces)")
    (tmp_path / "inspectd.yaml").write_text(
        "station: s\nmodel: {bundle: b}\ncameras: [{id: c, source: {kind: synthetic}}]\n"
        f"state_dir: {tmp_path / 'state'}\nmetrics: {{listen: 'inspect-host.plant.example:9108'}}\n"
    )
    (tmp_path / "unshared.sh").write_text(UNSHARED)
    done = subprocess.run(
        ["unshare", "-rnm", "bash", str(tmp_path / "unshared.sh"), dns, str(tmp_path), sys.executable],
        cwd=REPO, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loaded\n", done.stdout


CHECKS = [
    ("engine: {options: {intra_op_threads: 2147483648}}\n", "engine.options.intra_op_threads: expected at most 1024"),
    ("metrics: {listen: '*:9108'}\n", 'metrics.listen: expected an IP address or a host name, "0.0.0.0:9108"'),
    ("state_dir: STATE_FILE\n", "state_dir: "),
]


@pytest.mark.parametrize("text,message", CHECKS, ids=["threads", "metrics", "state_dir"])
def test_run_check_refuses_in_one_line_what_run_would_fail_on(tmp_path, text, message):
    (tmp_path / "file").write_text("not a directory")
    config = tmp_path / "inspectd.yaml"
    config.write_text(
        "station: s\nmodel: {bundle: b}\ncameras: [{id: c, source: {kind: synthetic}}]\n"
        + text.replace("STATE_FILE", str(tmp_path / "file"))
    )
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--check", "--config", str(config), "--service-user", ""],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


@pytest.mark.parametrize("key", [["state_dir"], ["publish", "journal", "path"], ["archive", "path"]])
@pytest.mark.parametrize("value", ["${STATE_DIRECTORY}", "$HOME/x", "/var/lib/inspectd/$STATION"])
def test_a_written_path_holding_a_dollar_is_refused_as_not_expanded(key, value):
    """`state_dir: ${STATE_DIRECTORY}` (what systemd sets for StateDirectory=) was taken literally: a folder of that
    name beside the config file, read-only under the units, and `run --check` passed it."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(key, value))
    assert str(refused.value) == (
        f"{'.'.join(key)}: {value!r} holds a $, expected the path written out: environment variables are not expanded"
    )


def test_the_bridges_written_paths_refuse_a_dollar_too():
    from pydantic_core import PydanticCustomError

    from inspectd.configfile import written_path

    with pytest.raises(PydanticCustomError, match="environment variables are not expanded"):
        written_path("${STATE_DIRECTORY}/opcua.json")
    assert written_path("/var/lib/inspectd/opcua.json") == Path("/var/lib/inspectd/opcua.json")


@pytest.mark.parametrize("endpoint", ["tcp://nosuchhost.invalid:5556", "tcp://${HOST}:20001"])
@pytest.mark.parametrize("key", ["publish", "control", "camera"])
def test_a_bind_endpoint_whose_host_the_resolver_does_not_know_is_refused_at_load(pki, key, endpoint):
    """libzmq looks a bind's host name up: one no machine has passed `run --check` and failed every start (exit 1,
    retried by the unit)."""
    curve = {"server_secret_key": str(pki["server"][1]), "allowed_clients_dir": str(pki["allow_dir"])}
    where = {"publish": ["publish"], "control": ["control"], "camera": ["cameras", 2, "source"]}[key]
    doc = with_value([*where, "endpoint"], endpoint)
    if key != "publish":  # a network address: without CurveZMQ that is the refusal
        node = doc
        for part in where:
            node = node[part]
        node["curve"] = curve
    with pytest.raises(ConfigError) as refused:
        parse_config(doc)
    message = str(refused.value)
    name = {"publish": "publish.endpoint", "control": "control.endpoint", "camera": "cameras[2].source.endpoint"}[key]
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    assert message.startswith(f"{name}: cannot resolve host {host!r} ("), message
    assert "\n" not in message and f"got {endpoint!r}" in message
    assert message.endswith(": environment variables are not expanded") == ("$" in endpoint), message


def test_a_bind_endpoint_on_an_address_a_wildcard_or_an_interface_is_not_looked_up():
    import socket

    interface = socket.if_nameindex()[0][1]  # lo, which no resolver knows as a host name
    for endpoint in ("tcp://*:5556", "tcp://0.0.0.0:5556", "tcp://[::1]:5556", "tcp://localhost:5556"):
        assert parse_config(with_value(["publish", "endpoint"], endpoint)).publish.endpoint == endpoint
    endpoint = f"tcp://{interface}:5556"
    assert parse_config(with_value(["publish", "endpoint"], endpoint)).publish.endpoint == endpoint


@pytest.mark.parametrize(
    "key,off",
    [(["metrics"], "listen: null"), (["archive"], "enabled: false"), (["publish", "journal"], "enabled: false")],
)
def test_a_null_section_that_would_turn_a_feature_on_is_refused_with_the_words_to_write(key, off):
    """`metrics: null` read as the defaults turned metrics on at 127.0.0.1:9108, where `curve: null` and
    `listen: null` turn things off: the second instance on a station then failed to bind 9108 (exit 1, retried)."""
    with pytest.raises(ConfigError) as refused:
        parse_config(with_value(key, None))
    assert str(refused.value) == (
        f"{'.'.join(key)}: null, expected {off} to turn it off, or the section left out for its defaults"
    )
    assert parse_config(with_value(key, {})) is not None  # an empty mapping is still the defaults


@pytest.mark.parametrize("text", ["- a\n- b\n", "station\n", "5\n"])
def test_a_list_or_scalar_at_the_top_of_a_config_names_the_file(tmp_path, text):
    """It said `<top>: expected a mapping`: in an inspectd@ instance's journal, nothing said which config was read."""
    path = tmp_path / "line2.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(
        f"{path}: expected a mapping with at least station, model and cameras, got "
    ), refused.value


def test_a_synthetic_camera_larger_than_its_max_pixels_is_refused_at_load():
    """max_pixels refuses larger frames of every other source as they come; a synthetic camera ignored it and made
    frames of any size the example config said were refused."""
    raw = {
        "station": "s",
        "model": {"bundle": "b"},
        "state_dir": "/var/lib/inspectd",
        "cameras": [
            {"id": "cam0", "source": {"kind": "synthetic"}},
            {"id": "cam1", "source": {"kind": "synthetic", "width": 2000, "height": 1000}, "max_pixels": 1999999},
        ],
    }
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    assert str(refused.value) == (
        "cameras[1].source: frames of 2000x1000 (2000000 pixels) are larger than this camera's max_pixels 1999999, "
        "expected at most that many pixels"
    )
    raw["cameras"][1]["max_pixels"] = 2000000
    assert parse_config(raw).cameras[1].max_pixels == 2000000
