"""The daemon as a real process: `python -m inspectd run --config ...` with real sources, a real SUB socket, a real
REQ control socket, real signals and a real systemd notify socket.

A tiny frozen bundle (64x64) is trained once per session on the synthetic line and calibrated so planted defects
(dark blobs pasted into line frames) score above the image threshold and plain line frames below it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from daemon_harness import Station
from inspectd.protocol.messages import Result

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

FRAME = 128
MODEL = 64
REPO = Path(__file__).resolve().parents[1]


def blob(image: np.ndarray, seed: int) -> np.ndarray:
    """A dark spot (a pit or stain) pasted at a seeded place."""
    rng = np.random.default_rng(seed)
    y, x = (int(v) for v in rng.integers(16, FRAME - 40, 2))
    out = image.copy()
    out[y : y + 24, x : x + 24] = 10
    return out


@pytest.fixture(scope="session")
def line_frames():
    from engines.data.synthline import SyntheticLine

    line = SyntheticLine(FRAME, FRAME, defect_rate=0.0, seed=7)
    return [line.next()[0] for _ in range(80)]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, line_frames):
    from engines.bundle import thresholds as thresholds_doc
    from engines.bundle.store import load_bundle
    from engines.progress import Progress
    from engines.training.train import train_bundle
    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import InferenceStage, ModelState

    root = tmp_path_factory.mktemp("model")
    good = root / "good"
    good.mkdir()
    for i, image in enumerate(line_frames[:32]):
        cv2.imwrite(str(good / f"{i:03d}.png"), image)
    path = train_bundle(
        good, root / "bundle", method="frozen", size=(MODEL, MODEL), holdout=0.0, progress=Progress(enabled=False)
    ).bundle
    # Calibrate on frames the model did not train on: halfway between the worst good and the mildest blob.
    stage = InferenceStage(ModelState.open(path, "onnxruntime", {}, 8), max_batch=8)
    frames = [Frame("c", i, "", 0.0, img) for i, img in enumerate(line_frames[32:48])]
    frames += [Frame("c", i, "", 0.0, blob(img, i)) for i, img in enumerate(line_frames[48:56])]
    scores = [j.score for k in range(0, len(frames), 8) for j in stage.run_batch(frames[k : k + 8])]
    worst_good, mildest_blob = max(scores[:16]), min(scores[16:])
    assert mildest_blob > worst_good, (worst_good, mildest_blob)
    b = load_bundle(path)
    v1 = b.thresholds()
    b.replace_file(
        "thresholds.json",
        thresholds_doc.dumps(thresholds_doc.next_version(v1, image_threshold=(worst_good + mildest_blob) / 2)),
    )
    return path


@pytest.fixture
def station(tmp_path, bundle):
    stations = []

    def start(cameras, model=None, **overrides):
        s = Station(tmp_path, model or bundle, cameras, **overrides)
        stations.append(s)
        return s

    yield start
    for s in stations:
        s.close()


def assert_contiguous(results: list[Result], camera: str, first: int = 0) -> list[int]:
    seqs = [r.seq for r in results if r.camera == camera]
    assert seqs == list(range(first, first + len(seqs))), f"{camera} seq gaps or disorder: {seqs}"
    return seqs


def test_folder_source_every_frame_judged_with_masks(station, tmp_path, line_frames):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    s = station([{"id": "cam0", "source": {"kind": "folder", "path": str(inbox), "poll_ms": 20}}])
    s.wait_ready()
    planted = set()
    for i, image in enumerate(line_frames[56:72]):
        name = f"{i:03d}.png"
        if i % 4 == 1:
            image = blob(image, 100 + i)
            planted.add(name)
        cv2.imwrite(str(tmp_path / f".{name}"), image)
        os.replace(tmp_path / f".{name}", inbox / name)  # appears whole, as a camera's FTP upload would
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    results = s.results(17, timeout=60)
    assert s.stop() == 0, s.log_tail()
    assert len(results) == 17, f"{len(results)} results; log:\n{s.log_tail()}"
    assert_contiguous(results, "cam0")
    by_name = {r.frame_id: r for r in results}
    assert by_name["broken.png"].verdict == "error" and "broken.png" in by_name["broken.png"].error
    for name, r in by_name.items():
        if name == "broken.png":
            continue
        assert r.verdict == ("defect" if name in planted else "ok"), (name, r.score, r.threshold)
        assert r.model_id.startswith("frozen-") and r.thresholds_version == 2 and r.latency_ms > 0
        assert (r.width, r.height) == (FRAME, FRAME)
        if r.verdict == "defect":
            mask = r.mask()
            assert mask.shape == (FRAME, FRAME) and mask.any() and r.regions
    notes = s.note_lines
    assert "READY=1" in notes and any(n.startswith("WATCHDOG=1") for n in notes)
    assert any(n.startswith("STATUS=") and "frames/s" in n for n in notes)
    assert "STOPPING=1" in notes


def push_frames(push: zmq.Socket, frames: list[tuple[str, np.ndarray]], encoding: str = "raw") -> None:
    for frame_id, image in frames:
        header = {
            "frame_id": frame_id,
            "t_capture": time.time(),
            "dtype": "uint8",
            "encoding": encoding,
            "shape": list(image.shape),
        }
        payload = image.tobytes() if encoding == "raw" else cv2.imencode(".png", image)[1].tobytes()
        push.send_multipart([json.dumps(header).encode(), payload])


def test_zmq_source_results_for_every_frame_and_bad_frames_are_errors(station, tmp_path, line_frames):
    endpoint = f"ipc://{tmp_path}/frames.sock"
    s = station([{"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint}, "queue": {"policy": "block"}}])
    s.wait_ready()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(endpoint)
    try:
        frames = [(f"z{i}", blob(img, i) if i % 3 == 0 else img) for i, img in enumerate(line_frames[56:68])]
        push_frames(push, frames[:6])
        push_frames(push, frames[6:], encoding="png")
        push.send_multipart([b'{"frame_id": "bad", "dtype": "float32", "shape": [2, 2]}', b"x" * 16])
        results = s.results(13, timeout=60)
    finally:
        push.close()
    assert s.stop() == 0, s.log_tail()
    assert len(results) == 13, f"{len(results)} results; log:\n{s.log_tail()}"
    assert_contiguous(results, "cam0")
    by_id = {r.frame_id: r for r in results}
    assert by_id["bad"].verdict == "error" and "dtype" in by_id["bad"].error and not by_id["bad"].has_mask
    for i in range(12):
        r = by_id[f"z{i}"]
        assert r.verdict == ("defect" if i % 3 == 0 else "ok"), (i, r.score, r.threshold)
        if r.verdict == "defect":
            assert r.mask().shape == (FRAME, FRAME)
            # The mask marks the pasted blob: its largest region overlaps the blob's 24x24 square.
            region = r.regions[0]
            rng = np.random.default_rng(i)
            y, x = (int(v) for v in rng.integers(16, FRAME - 40, 2))
            assert region.x < x + 24 and x < region.x + region.w and region.y < y + 24 and y < region.y + region.h


def test_ipv6_endpoints_bind_and_serve_frames_results_and_control(station, line_frames):
    """`tcp://[::1]:PORT` passed the config and `run --check`, then `run` could not bind it: ZeroMQ takes an IPv6
    address only on a socket with its IPv6 option on."""
    from inspectd.clients.subscribe import Subscriber
    from inspectd.protocol.control import ControlClient
    from ports import free_port

    publish, control, frames = (f"tcp://[::1]:{free_port()}" for _ in range(3))
    s = station(
        [{"id": "cam0", "source": {"kind": "zmq", "endpoint": frames}, "queue": {"policy": "block"}}],
        publish={"endpoint": publish},
        control={"endpoint": control},
    )
    s.sub.close()
    s.sub = Subscriber(publish)  # the harness subscribes to its default ipc endpoint
    s.wait_ready()  # READY=1, then a status message over IPv6
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.ipv6 = True
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(frames)
    try:
        with ControlClient(control, timeout_s=10) as client:
            assert client.request({"cmd": "status"})["ok"] is True
        push_frames(push, [("v6", line_frames[60])])
        results = s.results(1, timeout=30)
        assert [(r.frame_id, r.verdict) for r in results] == [("v6", "ok")], s.log_tail()
    finally:
        push.close()
    assert s.stop() == 0, s.log_tail()


def test_sigterm_mid_stream_loses_no_accepted_frame(station):
    # A fast synthetic camera with a blocking queue: at SIGTERM there is a backlog queued and a batch in flight.
    s = station(
        [
            {
                "id": f"cam{i}",
                "source": {
                    "kind": "synthetic",
                    "rate_hz": 400,
                    "width": FRAME,
                    "height": FRAME,
                    "defect_rate": 0.2,
                    "seed": i,
                },
                "queue": {"size": 32, "policy": "block"},
            }
            for i in range(2)
        ]
    )
    s.wait_ready()
    early = s.results(10, timeout=30)
    assert len(early) == 10
    s.proc.send_signal(signal.SIGTERM)
    results = early + s.until_exit(timeout=20)
    assert s.proc.returncode == 0, s.log_tail()
    stopped = [e for e in s.events() if e.get("event") == "stopped"]
    assert stopped and stopped[0]["clean"], s.log_tail()
    for camera in ("cam0", "cam1"):
        # Results published before the subscription took hold are not ours to see; from the first one on, every
        # frame the camera accepted (gave a seq) was published before exit.
        first = min(r.seq for r in results if r.camera == camera)
        seqs = assert_contiguous(results, camera, first)
        assert seqs[-1] == stopped[0]["frames_in"][camera] - 1, (camera, seqs[-1], stopped[0])
    s.close()


@pytest.mark.parametrize("unit", ["inspectd.service", "inspectd@.service"])
def test_the_daemon_judges_frames_and_stops_cleanly_under_the_units_seccomp_restrictions(station, unit):
    """The unit's call filter (EPERM outside @system-service, less @privileged), W^X memory and address families, set
    up as systemd sets them up (tests/unit_sandbox.py): ONNX Runtime, ZeroMQ, the control socket and the notify
    socket all work inside them."""
    sandbox = (sys.executable, "-m", "tests.unit_sandbox", str(REPO / "systemd" / unit))
    camera = {"kind": "synthetic", "rate_hz": 50, "width": FRAME, "height": FRAME, "defect_rate": 0.3, "seed": 3}
    s = station([{"id": "cam0", "source": camera}], exec_under=sandbox)
    s.wait_ready()
    results = s.results(30, timeout=30)
    assert len(results) == 30 and all(r.error is None for r in results), [r.error for r in results]
    assert {"ok", "defect"} <= {r.verdict for r in results}, [r.verdict for r in results]
    assert s.control({"cmd": "status"})["healthy"] is True
    with open(f"/proc/{s.proc.pid}/status") as status:  # the daemon itself runs filtered (execs keep the filters)
        assert "Seccomp:\t2" in status.read()
    assert s.stop() == 0, s.log_tail()
    assert [e for e in s.events() if e.get("event") == "stopped"][0]["clean"], s.log_tail()


def test_the_torch_backend_judges_frames_under_the_units_write_execute_rule(station):
    """oneDNN builds its CPU kernels in writable and executable memory, which the unit's MemoryDenyWriteExecute=yes
    refuses: the torch backend finds that out when it opens, runs torch's own kernels instead and says why."""
    pytest.importorskip("torch")
    sandbox = (sys.executable, "-m", "tests.unit_sandbox", str(REPO / "systemd" / "inspectd.service"))
    camera = {"kind": "synthetic", "rate_hz": 50, "width": FRAME, "height": FRAME, "defect_rate": 0.3, "seed": 3}
    s = station(
        [{"id": "cam0", "source": camera}],
        exec_under=sandbox,
        engine={"backend": "torch", "options": {"device": "cpu", "threads": 1}},
    )
    s.wait_ready()
    results = s.results(20, timeout=30)
    assert len(results) == 20 and all(r.error is None for r in results), [r.error for r in results]
    assert {"ok", "defect"} <= {r.verdict for r in results}, [r.verdict for r in results]
    [disabled] = s.events("onednn_disabled")
    assert "PROT_WRITE|PROT_EXEC" in disabled["reason"], disabled
    assert s.stop() == 0, s.log_tail()
    assert s.events("stopped")[0]["clean"], s.log_tail()


def test_set_thresholds_and_reload_mid_stream_without_gaps(station, bundle, tmp_path):
    from engines.bundle import thresholds as thresholds_doc
    from engines.bundle.store import load_bundle, write_bundle

    bundle = Path(shutil.copytree(bundle, tmp_path / "bundle"))  # this test rewrites its thresholds
    s = station(
        model=bundle,
        cameras=[
            {
                "id": "cam0",
                "source": {
                    "kind": "synthetic",
                    "rate_hz": 40,
                    "width": FRAME,
                    "height": FRAME,
                    "defect_rate": 0.0,
                    "seed": 3,
                },
                "queue": {"policy": "block"},
            }
        ],
    )
    s.wait_ready()
    before = s.results(5, timeout=30)
    assert len(before) == 5
    status = s.control({"cmd": "status"})
    assert status["ok"] and status["thresholds_version"] == 2 and status["healthy"]
    assert status["cameras"]["cam0"]["frames_in"] >= 5

    current = load_bundle(bundle).thresholds()
    strict = thresholds_doc.next_version(current, image_threshold=123.0)
    # Far above every score seen at calibration (everything passes): the range check wants it forced.
    reply = s.control({"cmd": "set_thresholds", "thresholds": strict.to_dict(), "force": True})
    assert reply == {"ok": True, "thresholds_version": 3}, reply
    stale = s.control({"cmd": "set_thresholds", "thresholds": current.to_dict()})
    assert stale["ok"] is False and "thresholds.version" in stale["error"]
    bad = s.control({"cmd": "set_thresholds", "thresholds": {"version": 9, "image_threshold": "high"}})
    assert bad["ok"] is False and "image_threshold" in bad["error"]
    middle = s.results(10, timeout=30)

    s.proc.send_signal(signal.SIGHUP)  # reload from disk: the bundle now holds version 3
    deadline = time.monotonic() + 30
    while not any(e.get("event") == "reloaded" for e in s.events()):
        assert time.monotonic() < deadline, f"SIGHUP did not reload; log:\n{s.log_tail()}"
        time.sleep(0.1)
    reply = s.control({"cmd": "reload"})
    assert reply["ok"] and reply["thresholds_version"] == 3
    after = s.results(5, timeout=30)
    assert s.control({"cmd": "pause", "camera": "cam9"})["ok"] is False

    # A different model (another input size too) replaces the bundle on disk; reload swaps it in mid-stream.
    trained_id = after[-1].model_id
    write_bundle(
        bundle,
        {
            "method": "test",
            "backbone": "none",
            "scorer_inputs": ["centre"],
            "input": {"height": 48, "width": 48, "channels": 1, "resize": "stretch"},
        },
        brightness_graph(48),
        {"centre": np.array([128.0], np.float32)},
        {},
        thresholds_doc.next_version(strict, image_threshold=0.99),
    )
    reply = s.control({"cmd": "reload"})
    assert reply["ok"] and reply["model_id"].startswith("test-") and reply["thresholds_version"] == 4, reply
    swapped: list[Result] = []  # results already on their way when the reply came are still on the old model
    deadline = time.monotonic() + 30
    while sum(r.thresholds_version == 4 for r in swapped) < 5 and time.monotonic() < deadline:
        swapped += s.results(1, timeout=1)
    assert s.stop() == 0, s.log_tail()

    results = before + middle + after + swapped
    assert_contiguous(results, "cam0", first=before[0].seq)
    versions = [r.thresholds_version for r in results]
    assert versions[0] == 2 and versions[-1] == 4 and versions == sorted(versions)
    assert all(r.threshold == 123.0 for r in results if r.thresholds_version == 3)
    assert {r.model_id for r in results if r.thresholds_version < 4} == {trained_id}
    assert {r.model_id for r in swapped if r.thresholds_version == 4} == {reply["model_id"]}
    assert all(r.verdict in ("ok", "defect") for r in results)  # no frame failed across the swaps
    assert load_bundle(bundle).thresholds().version == 4
    events = [e["event"] for e in s.events()]
    assert "thresholds_set" in events and events.count("reloaded") == 3


def test_pause_and_resume_a_camera(station):
    s = station(
        [
            {
                "id": f"cam{i}",
                "source": {
                    "kind": "synthetic",
                    "rate_hz": 30,
                    "width": FRAME,
                    "height": FRAME,
                    "defect_rate": 0.0,
                    "seed": i,
                },
            }
            for i in range(2)
        ]
    )
    s.wait_ready()
    assert s.control({"cmd": "pause", "camera": "cam1"}) == {"ok": True, "camera": "cam1", "paused": True}
    time.sleep(0.3)  # let what cam1 had queued go through
    s.results(1000, timeout=0.5)
    paused = s.results(20, timeout=30)
    assert {r.camera for r in paused} == {"cam0"}
    assert s.control({"cmd": "resume", "camera": "cam1"})["paused"] is False
    resumed = s.results(40, timeout=30)
    assert "cam1" in {r.camera for r in resumed}
    assert s.stop() == 0, s.log_tail()


def test_bad_config_fails_with_one_line_naming_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("station: t1\nmodel: {bundle: /nonexistent}\ncameras: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "cameras" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def brightness_graph(size: int, fails_on_white: bool = False) -> bytes:
    """A real graph scoring |pixel - centre| / 128. With `fails_on_white` a batch holding a pixel at 255 fails (its
    Reshape asks for twice the elements there are): an engine that breaks on some batches while the warm-up on blank
    frames, and any batch without such a pixel, still succeeds."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT)]
    if fails_on_white:
        nodes += [
            helper.make_node("Shape", ["pixels"], ["shape"]),
            helper.make_node("Gather", ["shape", "first"], ["n"]),
            helper.make_node("ReduceMax", ["x"], ["brightest"], keepdims=0),
            helper.make_node("Equal", ["brightest", "white"], ["is_white"]),
            helper.make_node("Cast", ["is_white"], ["k"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["k", "one_dim"], ["k1"]),
            helper.make_node("Add", ["k1", "one_dim"], ["factor"]),
            helper.make_node("Mul", ["factor", "side"], ["last"]),
            helper.make_node("Concat", ["n", "side", "last"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["x1"]),
        ]
    else:
        nodes.append(helper.make_node("Reshape", ["x", "target_shape"], ["x1"]))
    nodes += [
        helper.make_node("Sub", ["x1", "centre"], ["d"]),
        helper.make_node("Abs", ["d"], ["a"]),
        helper.make_node("Div", ["a", "scale"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map", "axes12"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "brightness",
        [
            helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", size, size, 1]),
            helper.make_tensor_value_info("centre", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", size, size]),
        ],
        initializer=[
            helper.make_tensor("target_shape", TensorProto.INT64, [3], [-1, size, size]),
            helper.make_tensor("first", TensorProto.INT64, [1], [0]),
            helper.make_tensor("white", TensorProto.FLOAT, [], [255.0]),
            helper.make_tensor("one_dim", TensorProto.INT64, [1], [1]),
            helper.make_tensor("side", TensorProto.INT64, [1], [size]),
            helper.make_tensor("axes12", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("scale", TensorProto.FLOAT, [1], [128.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def test_engine_faults_stop_the_watchdog_until_a_batch_succeeds(station, tmp_path, line_frames):
    from engines.bundle import thresholds as thresholds_doc
    from engines.bundle.store import write_bundle

    model = write_bundle(
        tmp_path / "single",
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": 32, "width": 32, "channels": 1, "resize": "stretch"},
            "scorer_inputs": ["centre"],
        },
        brightness_graph(32, fails_on_white=True),
        {"centre": np.array([128.0], np.float32)},
        {},
        thresholds_doc.first_version(0.9, 0.9, {"tool": "test"}),
    )
    endpoint = f"ipc://{tmp_path}/frames.sock"
    s = station(
        model=model,
        cameras=[{"id": "cam0", "source": {"kind": "zmq", "endpoint": endpoint}, "queue": {"policy": "block"}}],
        batching={"max_batch": 8, "max_wait_ms": 300},
        metrics={"listen": "127.0.0.1:0"},
    )
    s.wait_ready()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(endpoint)
    try:
        # Three full batches at once, each holding a white pixel: three failed batches in a row make the stage
        # unhealthy.
        white = [frame.copy() for frame in line_frames[:24]]
        for frame in white:
            frame[:16, :16] = 255  # large enough to stay white when the frame is scaled to the model's 32x32
        push_frames(push, [(f"burst{i}", frame) for i, frame in enumerate(white)])
        failed = s.results(24, timeout=30)
        assert [r.verdict for r in failed] == ["error"] * 24
        assert failed[0].error.startswith("engine: ") and failed[0].model_id.startswith("test-")
        status = s.control({"cmd": "status"})
        assert status["healthy"] is False and status["failed_batches"] == 3 and status["last_error"]
        s.read_notes()
        mark = len(s.notes)
        time.sleep(2.5)  # more than two watchdog ticks (WATCHDOG_USEC is 2 s: a tick each second)
        s.read_notes()
        unhealthy = s.note_lines[mark:]
        assert not any(n == "WATCHDOG=1" for n in unhealthy), unhealthy
        assert any(n.startswith("STATUS=") and "UNHEALTHY" in n for n in unhealthy), unhealthy

        metrics_url = next(e["url"] for e in s.events() if e.get("event") == "metrics_listening")
        import urllib.request

        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        assert "inspectd_healthy 0" in text and 'inspectd_verdicts_total{camera="cam0",verdict="error"} 24' in text

        # A batch without a white pixel is one the engine can run: the stage recovers and the watchdog beats again.
        push_frames(push, [("single", np.minimum(line_frames[30], 254))])
        (ok,) = s.results(1, timeout=30)
        assert ok.verdict in ("ok", "defect") and ok.seq == 24
        assert s.control({"cmd": "status"})["healthy"] is True
        mark = len(s.notes)
        time.sleep(1.5)
        s.read_notes()
        assert "WATCHDOG=1" in s.note_lines[mark:]
    finally:
        push.close()
    assert s.stop() == 0, s.log_tail()


def test_frames_of_another_channel_count_than_the_bundle_are_told_once_per_camera(bundle, line_frames):
    """A colour camera feeding a grey bundle (a camera of the other kind swapped in, or a grey device delivered as
    BGR) is judged after a conversion on every frame: told once for that camera, with both channel counts, and the
    frames are judged as the grey ones are."""
    import structlog

    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import InferenceStage, ModelState

    state = ModelState.open(bundle, "onnxruntime", {}, 8)
    stage = InferenceStage(state, max_batch=8)
    grey = line_frames[0]
    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    try:
        with structlog.testing.capture_logs() as logs:
            judged = []
            for i in range(3):
                judged += stage.run_batch([Frame("rgb", i, "", 0.0, colour), Frame("grey", i, "", 0.0, grey)])
    finally:
        state.close()
    told = [entry for entry in logs if entry["event"] == "frame_channels_differ"]
    assert [(e["camera"], e["frame_channels"], e["bundle_channels"]) for e in told] == [("rgb", 3, 1)], told
    assert all(j.error is None for j in judged) and judged[0].score == pytest.approx(judged[1].score, abs=1e-4)


def test_a_camera_whose_frame_size_changes_is_told_once_per_change(bundle, line_frames):
    """A camera reconfigured mid-run (resolution, ROI, binning) is fitted to the model at another scale without a
    word otherwise: each change of a camera's frame size is told once, with both sizes; a camera that alternates two
    sizes tells each direction once, not each frame; one of ever new sizes stops after a bound, saying so."""
    import structlog

    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import MAX_SIZE_CHANGES_TOLD, InferenceStage, ModelState

    state = ModelState.open(bundle, "onnxruntime", {}, 8)
    stage = InferenceStage(state, max_batch=8)
    small = line_frames[0]
    large = cv2.resize(small, (FRAME + 32, FRAME + 16))
    try:
        with structlog.testing.capture_logs() as logs:
            judged = []
            for i, image in enumerate([small, small, large, small, large, large, small, large]):
                judged += stage.run_batch([Frame("cam", i, "", 0.0, image), Frame("steady", i, "", 0.0, small)])
            for i in range(MAX_SIZE_CHANGES_TOLD + 4):  # a new size each frame
                stage.run_batch([Frame("drift", i, "", 0.0, cv2.resize(small, (FRAME + i, FRAME)))])
    finally:
        state.close()
    told = [entry for entry in logs if entry["event"] == "frame_size_changed"]
    small_size, large_size = f"{FRAME}x{FRAME}", f"{FRAME + 32}x{FRAME + 16}"
    assert [(e["camera"], e["old_size"], e["new_size"]) for e in told if e["camera"] != "drift"] == [
        ("cam", small_size, large_size),
        ("cam", large_size, small_size),
    ], told
    drift = [e for e in told if e["camera"] == "drift"]
    assert len(drift) == MAX_SIZE_CHANGES_TOLD, drift
    assert [e["further_changes"] for e in drift] == ["logged"] * (MAX_SIZE_CHANGES_TOLD - 1) + ["not logged"]
    assert all(e["resize"] == "stretch" and e["log_level"] == "warning" for e in told), told
    assert all(j.error is None for j in judged)
