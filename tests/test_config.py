"""The config loader refuses every bad value with a one-line ConfigError that starts with the key path."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from inspectd.daemon.config import FolderSource, OpenCVSource, SyntheticSource, ZmqSource, load_config, parse_config
from inspectd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "inspectd.example.yaml"

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
    (["state_dir"], 1, "state_dir"),
    (["shutdown_timeout_s"], -3, "shutdown_timeout_s"),
    (["shutdown_timeout_s"], float("nan"), "shutdown_timeout_s"),
]


@pytest.mark.parametrize("path,value,key", BAD_VALUES, ids=[f"{k}={v!r}" for _, v, k in BAD_VALUES])
def test_bad_value_names_its_key_path(path, value, key):
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(path, value))
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert "\n" not in message


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
        "publish: {journal: {path: j.log}}\nstate_dir: state\n"
    )
    config = load_config(path)
    assert config.model.bundle == tmp_path / "b"
    assert config.cameras[0].source.done_dir == tmp_path / "conf" / "done"
    assert config.publish.journal.path == tmp_path / "conf" / "j.log"
    assert config.control.endpoint == f"ipc://{tmp_path / 'conf' / 'state'}/control.sock"


def test_engine_options_are_validated_by_the_backend_and_kept_as_a_mapping():
    config = parse_config(with_value(["engine"], {"backend": "onnxruntime", "options": {"intra_op_threads": 2}}))
    assert config.engine.options == {"intra_op_threads": 2}
    with pytest.raises(ConfigError, match=r"^engine.options.providers: expected str, got 5$"):
        parse_config(with_value(["engine"], {"backend": "onnxruntime", "options": {"providers": 5}}))


def test_config_is_frozen():
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.station = "other"  # type: ignore[misc]
