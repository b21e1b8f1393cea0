"""Fuzzing the parsers of outside input with hypothesis: the config loader, the frame-header parser (ZeroMQ frame
messages and encoded-image headers), the control-message parser and the published-message decoder. Whatever comes
in, each either accepts it or raises the project's own error type; nothing else may escape (an escaping
RecursionError or struct.error would kill a control thread or send a camera into reopen loops).

Bounded: a few hundred examples per parser, no deadline (the CI machine is shared), seeds derandomised so a failure
reproduces.
"""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engines.errors import EngineError
from inspectd.daemon import config as cfg
from inspectd.daemon.ingest.headers import PNG_SIGNATURE, check_and_decode, encoded_dims
from inspectd.daemon.ingest.zmq_pull import ZmqPullSource, ZmqSource
from inspectd.errors import ConfigError, InspectdError, MessageError
from inspectd.protocol.control import parse_request
from inspectd.protocol.messages import decode, encode_result

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

DEEP = "[" * 50_000  # nests beyond the interpreter's recursion limit in every recursive parser

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=8),
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
yaml_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4)
    ),
    max_leaves=15,
)

MINIMAL = {
    "station": "line1",
    "model": {"bundle": "bundle"},
    "engine": {"backend": "onnxruntime", "options": {"intra_op_threads": 1}},
    "batching": {"max_batch": 8, "max_wait_ms": 10},
    "cameras": [
        {
            "id": "cam0",
            "source": {"kind": "synthetic", "rate_hz": 5, "count": 3},
            "queue": {"size": 4, "policy": "block"},
            "max_pixels": 65536,
        },
        {"id": "cam1", "source": {"kind": "folder", "path": "in", "pattern": "*.png", "done_dir": "d"}},
        {"id": "cam2", "source": {"kind": "zmq", "endpoint": "ipc:///tmp/x.sock"}},
        {"id": "cam3", "source": {"kind": "opencv", "url": "rtsp://h/s"}},
    ],
    "publish": {
        "endpoint": "tcp://127.0.0.1:5556",
        "masks": "always",
        "sndhwm": 10,
        "status_interval_s": 1,
        "journal": {"path": "state/j", "max_mb": 1},
        "curve": None,
    },
    "control": {"endpoint": "ipc:///tmp/c.sock", "curve": None},
    "logging": {"level": "info", "format": "json"},
    "metrics": {"listen": "127.0.0.1:9108"},
    "state_dir": "state",
    "shutdown_timeout_s": 5,
}


def key_paths(node, prefix=()):
    """Every path to a value inside MINIMAL (dict keys and list indices)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from key_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from key_paths(v, prefix + (i,))


PATHS = [p for p in key_paths(MINIMAL) if p]


def test_minimal_config_is_valid():
    """So the edits below start from a config that loads: each one is then the only thing wrong."""
    cfg.parse_config(MINIMAL, base_dir="/tmp")


def parse_config_ok(doc):
    try:
        cfg.parse_config(doc, base_dir="/tmp")
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), yaml_values), min_size=1, max_size=3))
def test_config_with_any_value_anywhere_raises_only_config_error(edits):
    doc = copy.deepcopy(MINIMAL)
    for path, value in edits:
        node = doc
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced a parent
    parse_config_ok(doc)


@FUZZ
@given(yaml_values)
def test_config_of_any_shape_raises_only_config_error(doc):
    parse_config_ok(doc)


@FUZZ
@given(st.text(max_size=300))
@example(DEEP)
@example("station: [" * 3000)
@example("a: &x [*x]")
@example("!!python/object:os.system {}")
@example("\x00\x01")
def test_config_file_with_any_text_raises_only_config_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg.load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)


# --- control messages -------------------------------------------------------------------------------------------

commands = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["status", "reload", "set_thresholds", "pause", "resume", "nope"])},
    optional={"camera": json_values, "thresholds": json_values, "extra": json_values},
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        commands.map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
    )
)
@example(DEEP.encode())
@example(b'{"cmd": "status", "x": ' + b"{" * 50_000)
@example(b"\xff\xfe")
@example(b'{"cmd": NaN}')
def test_control_parser_raises_only_message_error(data):
    try:
        request = parse_request(data)
    except MessageError as exc:
        assert "\n" not in str(exc)
        return
    assert request.cmd in ("status", "reload", "set_thresholds", "pause", "resume")


# --- frame headers --------------------------------------------------------------------------------------------------


class _Part:
    """What recv_multipart(copy=False) yields: an object with `.buffer`."""

    def __init__(self, data: bytes) -> None:
        self.buffer = memoryview(data)


def _source() -> ZmqPullSource:
    camera = cfg.CameraConfig(id="cam0", source=ZmqSource(endpoint="ipc:///tmp/unused"), max_pixels=4096)
    return ZmqPullSource(camera, clock=lambda: 1.0)


headers = st.fixed_dictionaries(
    {},
    optional={
        "frame_id": st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none(), st.floats()),
        "t_capture": st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3), st.none()),
        "shape": st.one_of(
            st.lists(st.integers(-3, 70), max_size=4),
            st.integers(),
            st.text(max_size=3),
            st.lists(st.floats(), max_size=3),
        ),
        "dtype": st.sampled_from(["uint8", "float32", "uint16", "", None, 3]),
        "encoding": st.sampled_from(["raw", "jpeg", "png", "gif", None, 1]),
        "camera": st.sampled_from(["cam0", "cam1", None, 5]),
        "extra": st.integers(),
    },
)


@FUZZ
@given(
    st.one_of(
        st.lists(st.binary(max_size=64), max_size=4),
        st.tuples(headers.map(lambda h: json.dumps(h).encode()), st.binary(max_size=5000)).map(list),
    )
)
@example([DEEP.encode(), b""])
@example([b'{"frame_id": "\\n"}', b""])  # a newline in the producer's id must not break the one-line reason
@example([b'{"frame_id": 1, "shape": [1e400]}', b""])
@example(
    [
        json.dumps({"frame_id": "x", "encoding": "png"}).encode(),
        PNG_SIGNATURE + b"\0\0\0\rIHDR" + struct.pack(">II", 50_000, 50_000),
    ]
)
def test_frame_message_parser_never_raises_and_refuses_with_a_reason(parts):
    frame = _source().parse([_Part(p) for p in parts])
    assert (frame.image is None) != (frame.error is None)
    if frame.error is not None:
        assert "\n" not in frame.error and frame.error
    else:
        assert frame.image.dtype == np.uint8 and frame.image.ndim in (2, 3)


image_prefixes = st.sampled_from(
    [
        b"",
        PNG_SIGNATURE,
        PNG_SIGNATURE + b"\0\0\0\rIHDR",
        b"\xff\xd8",
        b"\xff\xd8\xff",
        b"BM",
        b"II*\0",
        b"MM\0*",
        b"II*\0\x08\0\0\0",
    ]
)


@FUZZ
@given(image_prefixes, st.binary(max_size=300))
@example(b"II*\0", b"")
@example(b"MM\0*", b"\0\0")
@example(b"BM", b"\0" * 30)
@example(b"\xff\xd8", b"\xff\xc0\x00\x11\x08\xc3\x50\xc3\x50\x01" + b"\0" * 8 + b"\xff\xd9")
def test_encoded_image_header_parser_raises_only_project_errors(prefix, rest):
    data = prefix + rest
    dims = encoded_dims(data)
    assert dims is None or (dims[0] in ("png", "jpeg", "bmp", "tiff") and dims[1] >= 0 and dims[2] >= 0)
    try:
        image = check_and_decode(data, "fuzz", max_pixels=10_000)
    except (InspectdError, EngineError) as exc:
        assert "\n" not in str(exc)
    else:
        assert image.dtype == np.uint8 and image.shape[0] * image.shape[1] <= 10_000


# --- published messages ----------------------------------------------------------------------------------------

GOOD = encode_result(
    station="s",
    camera="c",
    seq=1,
    frame_id="f",
    t_capture=1.0,
    t_publish=2.0,
    verdict="ok",
    score=0.1,
    threshold=0.5,
    model_id="m",
    thresholds_version=1,
    regions=[],
    latency_ms=1.0,
    width=2,
    height=2,
)


@FUZZ
@given(
    st.one_of(
        st.lists(st.binary(max_size=40), max_size=4),
        st.tuples(
            st.sampled_from([GOOD[0], b"inspect.s.status", b"x.result"]),
            st.dictionaries(st.sampled_from(list(json.loads(GOOD[1])) + ["truth", "zz"]), json_values, max_size=20)
            .map(lambda h: {**json.loads(GOOD[1]), **h})
            .map(lambda h: json.dumps(h).encode()),
        ).map(list),
    )
)
@example([GOOD[0], DEEP.encode()])
def test_published_message_decoder_raises_only_message_error(frames):
    try:
        decode(frames)
    except MessageError as exc:
        assert "\n" not in str(exc)


# --- hostile JSON in every field ------------------------------------------------------------------------------------
# The strategies above build values with json.dumps, which cannot write what a hostile sender can: integers of
# thousands of digits (Python refuses to parse more than 4300 and float() overflows on far fewer), nesting deeper
# than the recursion limit inside any field, NaN/Infinity, non-UTF-8 bytes. These write JSON text directly.

digits = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(20, 6000).map(lambda n: "9" * n),
    st.integers(300, 6000).map(lambda n: "-" + "1" * n),
)
wild_leaf = st.one_of(
    st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity", "1e400", "-0", "[]", "{}"]),
    digits,
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(max_size=10).map(json.dumps),
    st.integers(100, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(100, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
)
wild_json = st.recursive(
    wild_leaf,
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.dictionaries(st.text(max_size=6), inner, max_size=3).map(
            lambda d: "{" + ",".join(json.dumps(k) + ":" + v for k, v in d.items()) + "}"
        )
    ),
    max_leaves=6,
)


def wild_object(keys: list[str], base: dict | None = None) -> st.SearchStrategy[bytes]:
    """A JSON object over `keys` (plus `base`'s good values), any field holding any hostile JSON; sometimes with a
    byte that is not UTF-8."""

    def text(fields: dict[str, str]) -> str:
        merged = {k: json.dumps(v) for k, v in (base or {}).items()} | fields
        return "{" + ",".join(json.dumps(k) + ":" + v for k, v in merged.items()) + "}"

    body = st.fixed_dictionaries({}, optional={k: wild_json for k in keys}).map(text).map(str.encode)
    return st.one_of(
        body, st.tuples(body, st.integers(0, 10)).map(lambda bi: bi[0][: bi[1]] + b"\xff" + bi[0][bi[1] :])
    )


@FUZZ
@given(wild_object(["cmd", "camera", "thresholds", "force", "x"], {"cmd": "pause"}) | wild_object(["cmd"]))
@example(b'{"cmd": []}')
@example(b'{"cmd": ' + b"1" * 5000 + b"}")
@example(b'{"cmd": "pause", "camera": ' + b"9" * 5000 + b"}")
@example(b'{"cmd": ' + b"[" * 990 + b"]" * 990 + b"}")
def test_control_parser_refuses_hostile_json_in_any_field_with_message_error(data):
    try:
        request = parse_request(data)
    except MessageError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    assert request.cmd in ("status", "reload", "set_thresholds", "pause", "resume")


FRAME_KEYS = ["frame_id", "t_capture", "shape", "dtype", "encoding", "camera"]


@FUZZ
@given(
    wild_object(FRAME_KEYS, {"frame_id": "f", "dtype": "uint8", "encoding": "raw", "shape": [2, 2]}),
    st.binary(max_size=16),
)
@example(b'{"frame_id": ' + b"1" * 5000 + b"}", b"")
@example(b'{"frame_id": "a", "t_capture": ' + b"9" * 400 + b"}", b"")
@example(b'{"frame_id": "a", "shape": [' + b"9" * 400 + b", 1]}", b"")
def test_frame_message_parser_turns_hostile_json_in_any_field_into_an_error_frame(header, payload):
    frame = _source().parse([_Part(header), _Part(payload)])
    assert (frame.image is None) != (frame.error is None)
    if frame.error is not None:
        assert "\n" not in frame.error and frame.error


GOOD_HEADER = json.loads(GOOD[1])


@FUZZ
@given(wild_object([*GOOD_HEADER, "truth"], GOOD_HEADER))
@example(b'{"schema": 1, "seq": ' + b"1" * 5000 + b"}")
@example(GOOD[1].replace(b'"station":"s"', b'"station":"\\u00e9"'))  # a non-ASCII station: the topic check encoded it
@example(GOOD[1].replace(b'"t_capture":1.0', b'"t_capture":' + b"9" * 400))
@example(GOOD[1].replace(b'"regions":[]', b'"regions":[{"x":0,"y":0,"w":1,"h":1,"area":1,"peak":' + b"9" * 400 + b"}]"))
def test_result_decoder_refuses_hostile_json_in_any_field_with_message_error(header):
    try:
        decode([GOOD[0], header])
    except MessageError as exc:
        assert "\n" not in str(exc)
    try:
        decode([b"inspect.s.status", header])
    except MessageError as exc:
        assert "\n" not in str(exc)
