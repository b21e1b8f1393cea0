"""A real bundle whose verdicts a test can plan, built in milliseconds instead of trained (not itself a test module).

The model is a hand-built ONNX graph run by a real ONNX Runtime session: anomaly map = |pixel - 128| / 128, score =
its max, thresholds 0.5 (image and pixel). So a mid-grey frame with a little noise is `ok` and a frame with a bright
square pasted on it is `defect`, its mask exactly the square.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

M = 32  # model input size
FRAME = 64  # frame size the tests send
THRESHOLD = 0.5
# The fields every status message holds (inspectd.protocol.messages.STATUS_FIELDS but the schema and station), for a
# Publisher run without a daemon behind it.
QUIET_STATUS = {
    "t": 0.0,
    "uptime_s": 0.0,
    "healthy": True,
    "model_id": "m",
    "thresholds_version": 1,
    "throughput_fps": 0.0,
    "cameras": {},
}


def grey_graph(size: int = M) -> bytes:
    """uint8 [N,size,size,1] -> anomaly_map = |pixel - centre| / 128, score = max of the map: a real graph with the
    bundle contract's inputs and outputs, built in milliseconds."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Squeeze", ["x", "axis3"], ["x2"]),
        helper.make_node("Sub", ["x2", "centre"], ["d"]),
        helper.make_node("Abs", ["d"], ["a"]),
        helper.make_node("Div", ["a", "scale"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map", "axes12"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "grey",
        [
            helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", size, size, 1]),
            helper.make_tensor_value_info("centre", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", size, size]),
        ],
        initializer=[
            helper.make_tensor("axis3", TensorProto.INT64, [1], [3]),
            helper.make_tensor("axes12", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("scale", TensorProto.FLOAT, [1], [128.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def write_grey_bundle(path: Path, bit_depth: int | None = None) -> Path:
    """`bit_depth`: the manifest's input.bit_depth (None: none declared, as a bundle trained on 8-bit images)."""
    from engines.bundle import thresholds as thresholds_doc
    from engines.bundle.store import write_bundle

    return write_bundle(
        path,
        {
            "method": "test",
            "backbone": "none",
            "input": {
                "height": M,
                "width": M,
                "channels": 1,
                "resize": "stretch",
                **({} if bit_depth is None else {"bit_depth": bit_depth}),
            },
            "scorer_inputs": ["centre"],
            "score_kind": "max",
        },
        grey_graph(),
        {"centre": np.array([128.0], np.float32)},
        {},
        thresholds_doc.first_version(THRESHOLD, THRESHOLD, {"tool": "tests/station_model.py"}),
    )


def good_frame(seed: int) -> np.ndarray:
    """Mid-grey with a little noise: scores well under the threshold, and not all the same."""
    rng = np.random.default_rng(seed)
    return (128 + rng.integers(-12, 13, (FRAME, FRAME))).astype(np.uint8)


def defect_frame(seed: int, size: int = 16) -> np.ndarray:
    """A good frame with a bright square at a seeded place: a defect whose mask is the square."""
    image = good_frame(seed)
    y, x = (int(v) for v in np.random.default_rng(1000 + seed).integers(0, FRAME - size, 2))
    image[y : y + size, x : x + size] = 250
    return image


def judged(camera: str, seq: int, image: np.ndarray, t: float | None = None):
    """What the inference stage would make of `image` under the grey model: the verdict, mask and regions (for the
    archive writer without a daemon)."""
    from inspectd.daemon.frames import Frame
    from inspectd.daemon.inference import Judged
    from inspectd.protocol.messages import Region

    amap = np.abs(image.astype(np.float32) - 128) / 128
    score = float(amap.max())
    frame = Frame(camera, seq, f"{seq:06d}.png", time.time() if t is None else t, image)
    if score < THRESHOLD:
        return Judged(frame, "ok", score, THRESHOLD, "test-none-0", 1, [], None)
    mask = amap >= THRESHOLD
    ys, xs = np.nonzero(mask)
    box = Region(int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1, int(mask.sum()), score)
    return Judged(frame, "defect", score, THRESHOLD, "test-none-0", 1, [box], mask)


def drop(inbox: Path, name: str, image: np.ndarray) -> None:
    """Write a PNG so that it appears in the watched folder whole, as a camera's upload would."""
    tmp = inbox.parent / f".{name}"
    cv2.imwrite(str(tmp), image)
    tmp.replace(inbox / name)


def result_for(station, frame_id: str, timeout: float = 30.0):
    """The result the station publishes for `frame_id` (others are passed over); AssertionError when none comes."""
    from inspectd.protocol.messages import Result

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = station.sub.recv(0.2)
        if isinstance(message, Result) and message.frame_id == frame_id:
            return message
    raise AssertionError(f"no result for {frame_id} within {timeout} s; log:\n{station.log_tail()}")


# A teach in place with the record teach writes (the model taught from named), for a child process (`python -c` with
# the bundle as its argument) to be killed in or raced against.
TEACH_RECORDED = """
import sys
from calibration.teach import bundle_version, write_version
from engines.bundle import thresholds as T
from engines.bundle.store import load_bundle
b = load_bundle(sys.argv[1])
params = {k: v + 1 for k, v in b.scorer_params().items()}
version = bundle_version(b) + 1
record = {"version": version, "previous_version": bundle_version(b), "previous_model_id": b.model_id}
write_version(b, params, T.next_version(b.thresholds(), image_threshold=0.9), version, record)
"""
