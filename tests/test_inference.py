"""The inference stage on a real bundle and a real ONNX Runtime session: verdicts, frame-space masks and regions,
error frames, engine faults and health, and reload swapping the model state between batches."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.store import write_bundle
from inspectd.daemon.frames import Frame
from inspectd.daemon.inference import InferenceStage, ModelState
from tests.station_model import grey_graph

pytestmark = pytest.mark.timeout(60)

H = W = 32


def write_brightness_bundle(path, graph: bytes):
    """The brightness model's bundle (score: how far a pixel is from grey 128) with `graph` as its model."""
    write_bundle(
        path,
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": H, "width": W, "channels": 1, "resize": "stretch"},
            "scorer_inputs": ["centre"],
            "score_kind": "max",
        },
        graph,
        {"centre": np.array([128.0], np.float32)},
        {},
        thresholds_doc.first_version(0.5, 0.5, {"tool": "test"}),
    )
    return path


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return write_brightness_bundle(tmp_path_factory.mktemp("bundle") / "brightness", grey_graph(H))


def open_state(bundle_path, max_batch=4) -> ModelState:
    return ModelState.open(bundle_path, "onnxruntime", {}, max_batch)


def grey(h: int, w: int, blob=None, value=250) -> np.ndarray:
    image = np.full((h, w), 128, np.uint8)
    if blob is not None:
        y, x, s = blob
        image[y : y + s, x : x + s] = value
    return image


def frame(seq, image, camera="cam0", error=None) -> Frame:
    return Frame(camera, seq, f"f{seq}", time.time(), image, error=error, t_ingest=time.monotonic())


def test_verdicts_masks_and_regions_in_frame_coordinates(bundle_path):
    stage = InferenceStage(open_state(bundle_path), max_batch=4)
    frames = [
        frame(0, grey(96, 160)),
        frame(1, grey(96, 160, blob=(30, 100, 24))),
        frame(2, grey(64, 64, blob=(0, 0, 16))),
        frame(3, grey(40, 40)),
    ]
    results = stage.run_batch(frames)
    assert [r.verdict for r in results] == ["ok", "defect", "defect", "ok"]
    assert results[0].mask is None and results[0].regions == []  # ok frames skip the mask work
    defect = results[1]
    assert defect.mask.shape == (96, 160) and defect.mask.dtype == bool
    (region,) = defect.regions
    # The blob is at x 100..124, y 30..54 in the frame; the model saw it at 32x32 and mapped it back.
    assert abs(region.x - 100) <= 5 and abs(region.y - 30) <= 5
    assert abs(region.w - 24) <= 8 and abs(region.h - 24) <= 8
    assert region.area == int(defect.mask.sum()) and region.peak > 0.9
    assert defect.score >= defect.threshold == 0.5
    assert defect.model_id == stage.state.model_id and defect.thresholds_version == 1
    assert results[2].regions[0].x == 0 and results[2].mask.shape == (64, 64)


def test_masks_always_and_never(bundle_path):
    state = open_state(bundle_path)
    always = InferenceStage(state, max_batch=4, masks="always").run_batch([frame(0, grey(50, 70))])[0]
    assert always.verdict == "ok" and always.mask.shape == (50, 70) and not always.mask.any()
    never = InferenceStage(state, max_batch=4, masks="never").run_batch([frame(0, grey(50, 70, (5, 5, 20)))])[0]
    assert never.verdict == "defect" and never.mask is None and len(never.regions) == 1


def test_predictor_fits_frames_into_one_buffer_and_maps_back_to_each_frame(bundle_path):
    from engines.errors import DataError, EngineError
    from engines.runtime.predictor import Predictor

    state = open_state(bundle_path, max_batch=2)
    predictor = Predictor(state.engine)
    buffer = predictor.pixels
    predictor.clear()
    assert predictor.add(grey(96, 160, blob=(30, 100, 24))) == 0
    with pytest.raises(DataError, match=r"frame: shape \(4, 4, 5\), expected HxW grey or HxWx3 RGB"):
        predictor.add(np.zeros((4, 4, 5), np.uint8))  # cannot be fitted: the row stays free
    assert predictor.add(grey(32, 32)) == 1
    with pytest.raises(EngineError, match="batch full"):
        predictor.add(grey(32, 32))
    result = predictor.infer()
    assert result.scores.shape == (2,) and predictor.batch.shape == (2, H, W, 1)
    assert predictor.frame_map(result, 0).shape == (96, 160) and predictor.frame_map(result, 1).shape == (32, 32)
    assert result.scores[0] > 0.9 > result.scores[1]
    again = predictor.predict([grey(40, 40)])
    assert again.scores.shape == (1,) and predictor.pixels is buffer  # one buffer, reused batch after batch


@pytest.mark.parametrize(
    "frame, message",
    [
        (np.full((40, 60), 1000, np.uint16), "dtype uint16, expected uint8"),  # would be fitted as 1000 mod 256
        (np.full((32, 32, 3), 0.7, np.float32), "dtype float32, expected uint8"),  # would be fitted as 0
        (np.zeros((32, 32, 4), np.uint8), r"shape \(32, 32, 4\), expected HxW grey or HxWx3 RGB"),
        (np.zeros((0, 32), np.uint8), r"shape \(0, 32\), expected"),
    ],
)
def test_a_frame_that_is_not_8_bit_grey_or_rgb_is_refused_in_one_line(frame, message):
    from engines.errors import DataError
    from engines.runtime.preprocess import fit_frame

    with pytest.raises(DataError, match=message):
        fit_frame(frame, (32, 32, 1))


def test_a_one_channel_frame_is_grey_and_grey_into_colour_is_replicated_after_the_resize():
    import tracemalloc

    from engines.runtime.preprocess import fit_frame

    assert fit_frame(np.full((40, 40, 1), 9, np.uint8), (32, 32, 1))[0].max() == 9
    frame = np.random.default_rng(0).integers(0, 256, (2048, 2448), dtype=np.uint8)
    for policy in ("stretch", "pad"):
        out = np.empty((256, 256, 3), np.uint8)
        tracemalloc.start()
        fit_frame(frame, out.shape, policy, out=out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # What converting first gives (the reference), without a full-size colour copy (15 MB) per frame.
        expected = fit_frame(cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB), out.shape, policy)[0]
        np.testing.assert_array_equal(out, expected)
        assert peak < 2_000_000, f"{policy}: {peak} bytes allocated"


def test_error_frames_skip_the_engine_and_bad_frames_fail_alone(bundle_path):
    stage = InferenceStage(open_state(bundle_path), max_batch=4)
    results = stage.run_batch(
        [frame(0, None, error="decode: not a JPEG"), frame(1, grey(32, 32)), frame(2, np.zeros((4, 4, 5), np.uint8))]
    )
    assert [r.verdict for r in results] == ["error", "ok", "error"]
    assert results[0].error == "decode: not a JPEG" and results[2].error.startswith("preprocess:")
    assert stage.healthy


class FailingEngine:
    """Wraps the real engine and raises on demand, as a GPU fault or a corrupt model would."""

    def __init__(self, engine):
        self.engine, self.fail = engine, True

    def infer(self, pixels):
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access\nmore detail")
        return self.engine.infer(pixels)

    def close(self):
        self.engine.close()


def test_engine_faults_fail_the_batch_then_mark_unhealthy(bundle_path):
    state = open_state(bundle_path)
    failing = FailingEngine(state.engine)
    stage = InferenceStage(ModelState(state.bundle, failing, state.thresholds), max_batch=4, unhealthy_after=3)
    for i in range(3):
        assert stage.healthy
        results = stage.run_batch([frame(i, grey(32, 32)), frame(i + 10, grey(32, 32))])
        assert all(r.verdict == "error" for r in results)
        assert results[0].error == "engine: RuntimeError: CUDA error: an illegal memory access"
    assert not stage.healthy and stage.failed_batches == 3
    failing.fail = False
    assert stage.run_batch([frame(9, grey(32, 32))])[0].verdict == "ok"
    assert stage.healthy


class NonFiniteEngine:
    """Wraps the real engine and puts `value` in the score of the rows named, as an FP16 graph that overflows on a
    saturated frame would."""

    def __init__(self, engine, value: float, rows: tuple[int, ...]):
        self.engine, self.value, self.rows = engine, value, rows

    def infer(self, pixels):
        result = self.engine.infer(pixels)
        scores = result.scores.copy()
        scores[list(self.rows)] = self.value
        return type(result)(scores, result.maps)

    def close(self):
        self.engine.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_score_is_an_error_verdict_and_only_a_batch_of_them_a_failed_one(bundle_path, value):
    """NaN fails every comparison, so `score >= threshold` judged it ok; inf was a defect no client could read. A
    batch whose other rows were judged is no engine failure (one camera's blown-out frames must not make the station
    unhealthy, and the watchdog restart it for every camera); a batch with no row judged is, as an exception is."""
    state = open_state(bundle_path)
    engine = NonFiniteEngine(state.engine, value, rows=(1,))
    stage = InferenceStage(ModelState(state.bundle, engine, state.thresholds), max_batch=4, unhealthy_after=2)
    for n in range(3):
        batch = [frame(3 * n, grey(32, 32)), frame(3 * n + 1, grey(32, 32)), frame(3 * n + 2, grey(32, 32, (4, 4, 8)))]
        results = stage.run_batch(batch)
        assert [r.verdict for r in results] == ["ok", "error", "defect"]  # the finite rows are still judged
        bad = results[1]
        assert bad.error == f"engine: non-finite score ({value})" and bad.score is None and bad.brightness is None
        assert stage.failed_batches == 0 and stage.last_error == bad.error and stage.healthy
    engine.rows = (0, 1)
    stage.run_batch([frame(10, grey(32, 32)), frame(11, grey(32, 32))])
    stage.run_batch([frame(12, grey(32, 32)), frame(13, grey(32, 32))])
    assert not stage.healthy and stage.failed_batches == 2  # as many in a row as engine exceptions: unhealthy
    engine.rows = ()
    assert stage.run_batch([frame(14, grey(32, 32))])[0].verdict == "ok" and stage.healthy


def test_a_non_finite_anomaly_map_under_a_finite_score_is_an_error_not_a_defect_without_regions(bundle_path):
    """An FP16 map head that overflows while the score path does not: a NaN map has no pixel over any threshold, so
    the frame went out as a defect with no region and an empty mask, and nothing said the engine was sick."""

    class NanMap:
        def __init__(self, engine):
            self.engine = engine

        def infer(self, pixels):
            result = self.engine.infer(pixels)
            maps = result.maps.copy()
            maps[0] = np.nan
            return type(result)(result.scores, maps)

        def __getattr__(self, name):
            return getattr(self.engine, name)

    state = open_state(bundle_path)
    stage = InferenceStage(ModelState(state.bundle, NanMap(state.engine), state.thresholds), max_batch=4)
    results = stage.run_batch([frame(0, grey(32, 32, (4, 4, 8))), frame(1, grey(32, 32, (4, 4, 8)))])
    assert [r.verdict for r in results] == ["error", "defect"]
    assert results[0].error == "engine: non-finite anomaly map" and results[1].regions


class ShortEngine(NonFiniteEngine):
    """Wraps the real engine and drops the last row of its output, as a plan or graph of the wrong batch shape
    would."""

    def infer(self, pixels):
        result = self.engine.infer(pixels)
        return type(result)(result.scores[:-1], result.maps[:-1])


def test_an_engine_output_that_cannot_be_judged_fails_its_frames_not_the_inference_thread(bundle_path):
    """Judging a row (its score, its map mapped back to the frame, its regions) ran outside every guard: an engine
    returning fewer rows than frames ended the inference thread, and the daemon with it."""
    state = open_state(bundle_path)
    stage = InferenceStage(ModelState(state.bundle, ShortEngine(state.engine, 0.0, ()), state.thresholds), max_batch=4)
    results = stage.run_batch([frame(0, grey(32, 32)), frame(1, grey(32, 32))])
    assert results[0].verdict == "ok"
    assert results[1].verdict == "error" and results[1].error.startswith("engine: IndexError: "), results[1].error
    assert "\n" not in results[1].error and stage.failed_batches == 1 and stage.last_error == results[1].error


def test_thresholds_swap_between_batches(bundle_path):
    state = open_state(bundle_path)
    stage = InferenceStage(state, max_batch=4)
    image = grey(32, 32, blob=(4, 4, 8), value=200)  # score (200-128)/128 = 0.5625
    assert stage.run_batch([frame(0, image)])[0].verdict == "defect"
    stricter = thresholds_doc.next_version(
        state.thresholds, image_threshold=0.7, per_camera={"cam1": {"image_threshold": 0.3}}
    )
    old = stage.swap(state.with_thresholds(stricter))
    assert old is state
    results = stage.run_batch([frame(1, image), frame(2, image, camera="cam1")])
    assert [(r.verdict, r.threshold, r.thresholds_version) for r in results] == [("ok", 0.7, 2), ("defect", 0.3, 2)]


def test_swap_while_running_never_mixes_states(bundle_path):
    state = open_state(bundle_path)
    stage = InferenceStage(state, max_batch=4)
    versions, thresholds = [], state.thresholds
    for v in range(2, 22):  # versions 2..21 with image threshold 0.5 + (version - 1) / 100
        thresholds = thresholds_doc.next_version(thresholds, image_threshold=0.5 + (v - 1) / 100)
        versions.append(state.with_thresholds(thresholds))
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            stage.swap(versions[i % len(versions)])
            i += 1
            time.sleep(0.001)

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(50):
            batch = stage.run_batch([frame(j, grey(32, 32)) for j in range(4)])
            assert len({(r.thresholds_version, r.threshold) for r in batch}) == 1
            version = batch[0].thresholds_version
            assert batch[0].threshold == pytest.approx(0.5 + (version - 1) / 100)
    finally:
        stop.set()
        thread.join(5)


def test_probe_and_int8_calibration_frames_are_narrowed_with_the_bundles_bit_depth(tmp_path):
    """The frames a reduced-precision engine's score shift is measured on, and a TensorRT INT8 calibration's frames,
    read from a 12-bit camera's 16-bit PNGs as the bundle's images were (>> 4), not >> 8 (0-15)."""
    from engines.bundle.store import load_bundle
    from engines.model.build_engine import calibration_frames
    from engines.runtime.preprocess import fit_all
    from inspectd.daemon.inference import probe_frames

    rng = np.random.default_rng(1)
    good = tmp_path / "good"
    good.mkdir()
    eight = [rng.integers(0, 256, (40, 50), dtype=np.uint8) for _ in range(4)]
    for i, image in enumerate(eight):
        assert cv2.imwrite(str(good / f"{i}.png"), (image.astype(np.uint16) << 4) | 15)
    path = write_bundle(
        tmp_path / "bundle",
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": H, "width": W, "channels": 1, "resize": "stretch", "bit_depth": 12},
            "scorer_inputs": ["centre"],
            "training": {"data": str(good)},
        },
        grey_graph(H),
        {"centre": np.array([128.0], np.float32)},
        {},
        thresholds_doc.first_version(0.5, 0.5, {"tool": "test"}),
    )
    bundle = load_bundle(path)
    expected = fit_all(eight, (H, W, 1))
    frames, source = probe_frames(bundle, bundle.thresholds(), count=4)
    assert source == str(good) and np.array_equal(frames, expected)
    batches = calibration_frames(good, (H, W, 1), "stretch", 2, bundle.bit_depth, bundle.each_axis)
    assert np.array_equal(batches.reshape(expected.shape), expected)


def test_probe_frames_read_a_training_set_whose_defect_free_folder_is_ok(tmp_path):
    """train reads train/ok (BTAD's name) as train/good: the probe looked for train/good alone, and a bundle trained
    on such a set could not open a reduced-precision engine."""
    from engines.bundle.store import load_bundle
    from inspectd.daemon.inference import probe_frames

    data = tmp_path / "btad"
    ok = data / "train" / "OK"
    ok.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(3):
        assert cv2.imwrite(str(ok / f"{i}.png"), rng.integers(0, 256, (40, 50), dtype=np.uint8))
    (ok / "3.png").write_bytes((ok / "0.png").read_bytes()[:40])  # cut short by a copy: the others still probe
    path = write_bundle(
        tmp_path / "bundle",
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": H, "width": W, "channels": 1, "resize": "stretch"},
            "scorer_inputs": ["centre"],
            "training": {"data": str(data)},
        },
        grey_graph(H),
        {"centre": np.array([128.0], np.float32)},
        {},
        thresholds_doc.first_version(0.5, 0.5, {"tool": "test"}),
    )
    bundle = load_bundle(path)
    frames, source = probe_frames(bundle, bundle.thresholds(), count=4)
    assert source == str(ok) and len(frames) == 3


@pytest.mark.parametrize("provenance", [None, "hand edit", ["good"]])
def test_probe_frames_pass_over_a_history_entry_whose_provenance_is_not_a_mapping(tmp_path, provenance):
    """The thresholds document checks only that each history entry is a mapping: a provenance of null there ended a
    reduced-precision engine's start with an AttributeError, where an FP32 one loaded the same bundle."""
    import dataclasses

    from engines.bundle.store import load_bundle
    from inspectd.daemon.inference import probe_frames

    older = tmp_path / "older"
    older.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        assert cv2.imwrite(str(older / f"{i}.png"), rng.integers(0, 256, (40, 50), dtype=np.uint8))
    first = thresholds_doc.first_version(0.5, 0.5, {"tool": "test"})
    history = [
        {"version": 2, "image_threshold": 0.5, "pixel_threshold": 0.5, "provenance": provenance},
        {"version": 1, "image_threshold": 0.5, "pixel_threshold": 0.5, "provenance": {"good_dir": str(older)}},
    ]
    path = write_bundle(
        tmp_path / "bundle",
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": H, "width": W, "channels": 1, "resize": "stretch"},
            "scorer_inputs": ["centre"],
            "training": {"data": str(tmp_path / "gone")},
        },
        grey_graph(H),
        {"centre": np.array([128.0], np.float32)},
        {},
        dataclasses.replace(first, version=3, history=history),
    )
    bundle = load_bundle(path)
    assert bundle.thresholds().history[0]["provenance"] == provenance  # the document itself takes it
    frames, source = probe_frames(bundle, bundle.thresholds(), count=4)
    assert source == str(older) and len(frames) == 2


class MapOf:
    """Wraps the real engine and turns its maps by `change` (rows, dtype), as a graph's own fault would."""

    def __init__(self, engine, change):
        self.engine, self.change = engine, change

    def infer(self, pixels):
        result = self.engine.infer(pixels)
        return type(result)(result.scores, self.change(result.maps.copy()))

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_a_map_gone_nan_under_an_ok_score_is_an_error_not_a_pass(bundle_path):
    """ONNX Runtime's ReduceMax, the maximum pool's image score, skips a NaN that is not the map's first element: a
    map gone NaN on a saturated spot gave a finite score under the threshold, and the part passed as ok."""

    def nan_spot(maps):
        maps[0, 10:14, 10:14] = np.nan
        return maps

    state = open_state(bundle_path)
    stage = InferenceStage(ModelState(state.bundle, MapOf(state.engine, nan_spot), state.thresholds), max_batch=4)
    results = stage.run_batch([frame(0, grey(32, 32)), frame(1, grey(32, 32))])
    assert [r.verdict for r in results] == ["error", "ok"]
    assert results[0].error == "engine: non-finite anomaly map" and results[0].score is None


@pytest.mark.parametrize(
    "change, shown",
    [
        (lambda maps: maps.astype(np.float16), "output anomaly_map is float16 [2, 32, 32] for 2 blank frames"),
        (lambda maps: maps[:, :16, :16], "output anomaly_map is float32 [2, 16, 16] for 2 blank frames"),
    ],
)
def test_warm_up_refuses_outputs_the_stage_cannot_use(bundle_path, change, shown):
    """A float16 map passed the blank frames and every ok frame, then failed every defect frame of another size than
    the model's (cv2.resize takes no float16), and the station went unhealthy."""
    from engines.errors import EngineError

    state = open_state(bundle_path)
    with pytest.raises(EngineError) as refused:
        ModelState(state.bundle, MapOf(state.engine, change), state.thresholds).warm_up()
    assert str(refused.value) == f"{bundle_path}: {shown}, expected float32 [2, 32, 32]"


def fixed_batch_bundle(path, batch: int):
    import onnx

    graph = onnx.load_from_string(grey_graph(H))
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    return write_brightness_bundle(path, graph.SerializeToString())


def test_a_graph_of_a_fixed_batch_other_than_one_is_refused_at_open(tmp_path):
    """Fixed at 2 (an export without a dynamic batch), it passed the two-frame warm-up and failed every other
    batch size on the line."""
    from engines.errors import EngineError

    path = fixed_batch_bundle(tmp_path / "fixed", 2)
    with pytest.raises(EngineError) as refused:
        open_state(path)
    assert str(refused.value) == f"{path / 'model.onnx'}: takes a fixed batch of 2 frames, expected a dynamic batch (N)"


def test_a_graph_fixed_at_one_frame_is_refused_at_open_unless_no_batch_is_larger(tmp_path):
    """It opened and ran single frames, then failed the first larger batch with ONNX Runtime's multi-line error:
    calibrate, eval and bench run no warm-up, and ended in a traceback that named no file."""
    from engines.errors import EngineError

    path = fixed_batch_bundle(tmp_path / "fixed", 1)
    with pytest.raises(EngineError) as refused:
        open_state(path, max_batch=4)
    assert str(refused.value) == f"{path / 'model.onnx'}: takes a fixed batch of 1 frame, expected a dynamic batch (N)"
    state = open_state(path, max_batch=1)
    try:
        state.warm_up()
        assert state.engine.infer(np.full((1, H, W, 1), 128, np.uint8)).scores.tolist() == [0.0]
    finally:
        state.close()


def retyped_bundle(path, name: str, elem_type: str):
    """The brightness bundle with its graph's input `name` declared as `elem_type` (onnx's name) and cast to float32
    inside, as another exporter could write it: ONNX Runtime loads it, and fails each run given what the engine
    binds."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(grey_graph(H))
    graph_input = next(i for i in model.graph.input if i.name == name)
    graph_input.type.tensor_type.elem_type = TensorProto.DataType.Value(elem_type)
    for node in model.graph.node:
        node.input[:] = [f"{name}_cast" if value == name else value for value in node.input]
    model.graph.node.insert(0, helper.make_node("Cast", [name], [f"{name}_cast"], to=TensorProto.FLOAT))
    return write_brightness_bundle(path, model.SerializeToString())


@pytest.mark.parametrize(
    "name, elem_type, shown",
    [
        ("centre", "DOUBLE", "input centre is tensor(double), expected tensor(float) (float32)"),
        ("centre", "FLOAT16", "input centre is tensor(float16), expected tensor(float) (float32)"),
        ("pixels", "FLOAT", "input pixels is tensor(float), expected tensor(uint8)"),
        ("pixels", "UINT16", "input pixels is tensor(uint16), expected tensor(uint8)"),
    ],
)
def test_a_graph_input_of_another_type_than_the_engine_binds_is_refused_at_open(tmp_path, name, elem_type, shown):
    """It opened, and the first batch failed with ONNX Runtime's multi-line error: a traceback in calibrate, eval
    and bench, and in the daemon a warm-up error that blamed a fixed batch."""
    from engines.errors import EngineError

    path = retyped_bundle(tmp_path / "retyped", name, elem_type)
    with pytest.raises(EngineError) as refused:
        open_state(path)
    assert str(refused.value) == f"{path / 'model.onnx'}: {shown}"


def test_calibrate_on_a_graph_of_another_input_type_ends_in_one_line(tmp_path, capsys):
    from inspectd.cli import main

    path = retyped_bundle(tmp_path / "retyped", "centre", "DOUBLE")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(4):
        cv2.imwrite(str(good / f"{i}.png"), grey(H, W, blob=(i, i, 2)))
    code = main(["calibrate", str(path), "--good", str(good), "--dry-run", "--batch", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"inspectd calibrate: {path / 'model.onnx'}: input centre is tensor(double), expected tensor(float) (float32)"
    )


@pytest.mark.parametrize("shape", [(200, 2000), (2000, 200), (256, 2000), (150, 1000)])
def test_a_thin_scratch_survives_a_fit_that_shrinks_one_axis_and_not_the_other(shape):
    """The interpolation was chosen by the height alone, and OpenCV's one-step resize samples a shrinking axis without
    averaging where the other grows: a 2-pixel scratch across the frame vanished at most of its positions."""
    from engines.runtime.preprocess import fit_frame

    long_axis = int(np.argmax(shape))
    faint = []
    for at in range(100, 140):
        image = np.full(shape, 100, np.uint8)
        if long_axis == 1:
            image[:, at : at + 2] = 200  # across the frame, along the axis that grows
        else:
            image[at : at + 2, :] = 200
        fitted = fit_frame(image, (256, 256, 1))[0][:, :, 0].astype(int)
        faint.append(int(fitted.max()) - 100)
    # 2 of ~7.8 frame pixels a model pixel: about a quarter of the contrast of 100, half that where the scratch
    # straddles two model pixels; sampled without averaging it was 0 at most positions.
    assert min(faint) >= 10, faint


def test_a_bundle_written_before_each_axis_resampling_is_fitted_as_it_was_trained(bundle_path, tmp_path):
    """Its memory and thresholds were set on frames resized in one step: fitting its frames the new way would shift
    its scores under thresholds it cannot know of. A bundle says which it is (`input.resample`)."""
    import json
    import shutil

    from engines.bundle.store import load_bundle
    from engines.errors import BundleError
    from engines.runtime.predictor import Predictor

    legacy = load_bundle(bundle_path)
    assert "resample" not in legacy.manifest["input"] and legacy.each_axis is False
    state = open_state(bundle_path)
    try:
        image = np.random.default_rng(0).integers(0, 256, (20, 2000), dtype=np.uint8)
        predictor = Predictor(state.engine, legacy, max_batch=1)
        predictor.add(image)
        one_step = cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR)  # as this bundle was trained
        assert np.array_equal(predictor.pixels[0][:, :, 0], one_step)
    finally:
        state.close()
    for value, loads in (("each_axis", True), ("lanczos", False)):
        copy = tmp_path / value
        shutil.copytree(bundle_path, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["input"]["resample"] = value
        (copy / "manifest.json").write_text(json.dumps(manifest))
        if loads:
            assert load_bundle(copy).each_axis is True
        else:
            with pytest.raises(BundleError, match="input.resample 'lanczos', expected 'each_axis' or none"):
                load_bundle(copy)
