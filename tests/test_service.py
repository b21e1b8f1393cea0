"""The daemon in-process (inspectd.daemon.service.Daemon) on a real bundle and ONNX Runtime session, with a synthetic
camera and real sockets: what the control handler does to the bundle on disk when it refuses thresholds, reloads
whose new engine cannot run, and a dead inference thread."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from engines.bundle import thresholds as thresholds_doc
from engines.bundle.store import write_bundle
from engines.errors import EngineError
from engines.runtime.onnxruntime_backend import OnnxRuntimeEngine
from engines.runtime.score_shift import ScoreShift
from inspectd.daemon.config import parse_config
from inspectd.daemon.service import Daemon
from station_model import M, grey_graph, write_grey_bundle

pytestmark = pytest.mark.timeout(60)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def daemon(tmp_path):
    bundle = write_grey_bundle(tmp_path / "bundle")
    config = parse_config(
        {
            "station": "s1",
            "model": {"bundle": str(bundle)},
            "engine": {"options": {"intra_op_threads": 1}},
            "cameras": [{"id": "cam0", "source": {"kind": "synthetic", "rate_hz": 50, "width": 64, "height": 64}}],
            "publish": {"endpoint": f"ipc://{tmp_path}/pub.sock"},
            "control": {"endpoint": f"ipc://{tmp_path}/control.sock"},
            "metrics": {"listen": None},
            "state_dir": str(tmp_path / "state"),
            "shutdown_timeout_s": 5.0,
        }
    )
    daemon = Daemon(config)
    daemon.start()
    yield daemon
    if daemon.control is not None and daemon.control.alive():  # a test that shut it down itself has it closed
        daemon.shutdown()


def test_thresholds_the_engine_refuses_are_not_written_to_the_bundle(daemon):
    """A reduced-precision engine refuses FP32 thresholds its score shift is too large for. The refusal must leave
    thresholds.json as it was: the next start or reload loads that file, and would fail on the refused version."""
    on_disk = Path(daemon.config.model.bundle) / thresholds_doc.FILE_NAME
    before = on_disk.read_bytes()
    state = daemon.stage.state
    # The engine's scores measured 0.02 away from FP32 ones: 4% of a 0.5 threshold, more than MAX_SHIFT allows.
    daemon.stage.swap(type(state)(state.bundle, state.engine, state.thresholds, ScoreShift("fp16", 32, 0.02, "good/")))
    refused = thresholds_doc.next_version(state.thresholds, image_threshold=0.5)
    with pytest.raises(EngineError, match="engine precision fp16"):
        daemon.set_thresholds(refused.to_dict(), force=True)
    assert on_disk.read_bytes() == before, "the refused version was written"
    assert daemon.stage.state.thresholds_version == 1

    # One the engine can hold is written, then judged with.
    accepted = thresholds_doc.next_version(state.thresholds, image_threshold=4.0)
    assert daemon.set_thresholds(accepted.to_dict(), force=True) == {"thresholds_version": 2}
    assert thresholds_doc.read(on_disk).version == 2
    assert daemon.stage.state.thresholds_version == 2
