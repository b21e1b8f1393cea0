"""A model state is made of one bundle: a teach (a real one, in a child process) or a hand edit landing between
load_bundle's verification and the engine and thresholds reads is caught and the bundle loaded once more, and a
bundle whose scores are not finite is refused by a real daemon's reload, which keeps the running model.

The writes land from the `accept` hook ModelState.open calls between load_bundle and opening the engine (where reload
checks the bit depth), so the timing is fixed, not raced."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.store import ChangedOnDisk, load_bundle, write_bundle
from engines.errors import BundleError, EngineError
from inspectd.daemon.inference import ModelState
from inspectd.protocol.messages import Result
from tests.daemon_harness import Station
from tests.station_model import FRAME, TEACH_RECORDED, M, grey_graph, write_grey_bundle

pytestmark = pytest.mark.timeout(120)

CPU = {"providers": "cpu"}


def teach(bundle) -> None:
    done = subprocess.run([sys.executable, "-c", TEACH_RECORDED, str(bundle)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_teach_swapping_the_bundle_while_it_opens_ends_on_the_taught_bundle_whole(tmp_path):
    """Before: the old manifest's model_id and scorer (centre 128) with the taught version's thresholds (0.9, set for
    centre 129), silently, until the next reload."""
    path = write_grey_bundle(tmp_path / "bundle")
    before = load_bundle(path).model_id
    checked = []

    def teach_lands_now(bundle):
        checked.append(bundle.model_id)
        if len(checked) == 1:
            teach(path)

    state = ModelState.open(path, "onnxruntime", CPU, 2, accept=teach_lands_now)
    try:
        on_disk = load_bundle(path)
        assert on_disk.model_id != before
        assert state.model_id == on_disk.model_id
        assert state.thresholds == on_disk.thresholds() and state.thresholds.image_threshold == 0.9
        # The taught bundle went through accept too (reload's bit-depth check) before its engine was opened.
        assert checked == [before, on_disk.model_id]
        assert state.bundle.scorer_params()["centre"].tolist() == [129.0]
        score = state.engine.infer(np.full((1, M, M, 1), 224, np.uint8)).scores[0]
        assert score == pytest.approx((224 - 129) / 128)  # the taught scorer runs, not the one loaded first
    finally:
        state.close()


def test_a_write_landing_while_load_bundle_hashes_the_files_is_a_change_on_disk_not_a_corrupt_bundle(
    tmp_path, monkeypatch
):
    """A teach's swap (or a calibrate) landing while load_bundle hashes the files leaves it a file that matches its
    manifest no more: that is a write to load again, which a reload does once, not a damaged bundle to refuse (and
    mark refused, which a teach --apply answers by putting back the version before)."""
    import shutil

    from engines.bundle import store

    path = write_grey_bundle(tmp_path / "bundle")
    taught = tmp_path / "taught"
    shutil.copytree(path, taught)
    teach(taught)
    hashed = []
    real = store.sha256_file

    def swap_after_the_first_file(member):
        digest = real(member)
        if not hashed:
            path.rename(tmp_path / "aside")
            taught.rename(path)
        hashed.append(member.name)
        return digest

    monkeypatch.setattr(store, "sha256_file", swap_after_the_first_file)
    with pytest.raises(ChangedOnDisk) as changed:
        load_bundle(path)
    assert "\n" not in str(changed.value) and "changed on disk since it was loaded" in str(changed.value)
    # Swapped back, then once more while a reload opens it: it loads again and ends on the taught bundle.
    path.rename(taught)
    (tmp_path / "aside").rename(path)
    hashed.clear()
    state = ModelState.open(path, "onnxruntime", CPU, 2)
    try:
        assert state.model_id == load_bundle(path).model_id != load_bundle(tmp_path / "aside").model_id
    finally:
        state.close()


def test_a_bundle_changing_twice_while_it_opens_is_refused_in_one_line(tmp_path):
    path = write_grey_bundle(tmp_path / "bundle")

    def teach_every_time(bundle):
        teach(path)

    with pytest.raises(ChangedOnDisk) as refused:
        ModelState.open(path, "onnxruntime", CPU, 2, accept=teach_every_time)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "changed twice while it was opened" in message


def test_thresholds_rewritten_without_the_manifest_after_verification_are_not_used(tmp_path):
    """The thresholds parsed are the bytes whose sha256 the verified manifest lists, not whatever the file holds when
    it is read by name: a document written beside the manifest is refused as at any load, not judged with."""
    path = write_grey_bundle(tmp_path / "bundle")
    member = path / thresholds_doc.FILE_NAME
    loaded = []

    def edit_thresholds(bundle):
        loaded.append(bundle)
        if len(loaded) == 1:
            edited = thresholds_doc.next_version(bundle.thresholds(), image_threshold=0.2)
            member.write_bytes(thresholds_doc.dumps(edited))

    with pytest.raises(BundleError, match=r"thresholds\.json: sha256 .* does not match the manifest") as refused:
        ModelState.open(path, "onnxruntime", CPU, 2, accept=edit_thresholds)
    assert "\n" not in str(refused.value)


def overflowing_bundle(path, output: str = "score"):
    """Finite scorer params (centre 1e30) that the graph squares past float32's range on a blank frame: `output`
    ("score" or "anomaly_map") is inf, the other finite."""
    import onnx
    from onnx import helper

    graph = onnx.load_from_string(grey_graph(M))
    nodes = graph.graph.node
    sub = next(node for node in nodes if node.op_type == "Sub")
    divide = next(node for node in nodes if node.op_type == "Div")
    reduce_max = next(node for node in nodes if node.op_type == "ReduceMax")
    at = list(nodes).index(sub) + 1
    nodes.insert(at, helper.make_node("Mul", ["d", "d"], ["d_squared"]))
    nodes.insert(at + 1, helper.make_node("Div", ["d_squared", "scale"], ["overflowed"]))
    if output == "score":
        reduce_max.input[0] = "overflowed"
    else:
        divide.output[0] = reduce_max.input[0] = "finite_map"
        nodes.append(helper.make_node("Identity", ["overflowed"], ["anomaly_map"]))
    return write_bundle(
        path,
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": M, "width": M, "channels": 1, "resize": "stretch"},
            "scorer_inputs": ["centre"],
            "score_kind": "max",
        },
        graph.SerializeToString(),
        {"centre": np.array([1e30], np.float32)},
        {},
        thresholds_doc.first_version(0.5, 0.5, {"tool": "tests/test_reload_consistency.py"}),
    )


@pytest.mark.parametrize("output", ["score", "anomaly_map"])
def test_warm_up_refuses_scores_or_maps_that_are_not_finite_in_one_line(tmp_path, output):
    path = overflowing_bundle(tmp_path / "bundle", output)
    state = ModelState.open(path, "onnxruntime", CPU, 2)
    try:
        with pytest.raises(EngineError, match="finite") as refused:
            state.warm_up()
    finally:
        state.close()
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_reload_to_a_bundle_whose_scores_are_not_finite_is_refused_and_the_running_model_kept(tmp_path):
    """Before: `ok: true`, then every frame an error verdict ("non-finite score") and the station unhealthy."""
    bundle = write_grey_bundle(tmp_path / "bundle")
    running = load_bundle(bundle).model_id
    camera = {"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 20, "width": FRAME, "height": FRAME}}
    station = Station(tmp_path, bundle, [camera])
    try:
        station.wait_ready()
        assert station.results(2, 20), f"no results; log:\n{station.log_tail()}"
        overflowing_bundle(bundle)
        reply = station.control({"cmd": "reload"})
        assert reply["ok"] is False and reply.get("bundle_refused") is True, reply
        assert str(bundle) in reply["error"] and "finite" in reply["error"] and "\n" not in reply["error"]
        deadline = time.monotonic() + 10
        while not station.events("control_request_failed") and time.monotonic() < deadline:
            time.sleep(0.05)
        (logged,) = station.events("control_request_failed")
        assert logged["cmd"] == "reload" and logged["error"] == reply["error"]
        # Judged on by the running model, results after the refusal included.
        after = [m for m in station.results(6, 20) if isinstance(m, Result)]
        assert len(after) == 6 and {r.model_id for r in after} == {running}, station.log_tail()
        assert all(r.verdict != "error" for r in after), [(r.verdict, r.error) for r in after]
        status = station.control({"cmd": "status"})
        assert status["model_id"] == running and status["healthy"] is True, status
    finally:
        station.close()
