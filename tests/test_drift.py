"""The score-drift alarm on the synthetic line: a bundle taught on the line's good frames, a stream of the same line
through a real ONNX Runtime engine. Unchanged frames never raise it; a lighting change raises it within a stated
number of good frames; back to normal lighting it clears (hysteresis); without a reference it stays inactive."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from engines.data.synthline import SyntheticLine
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
SIZE = 64
FRAMES_TO_ALARM = 200  # good frames after a 1.5x lighting change (measured: 142)


def stream(engine, line, monitor, n: int, gain: float) -> list[tuple[int, str]]:
    from engines.runtime.preprocess import fit_frame

    events, batch = [], np.empty((8, SIZE, SIZE, 1), np.uint8)
    done = 0
    while done < n:
        k = min(8, n - done)
        for j in range(k):
            image, _ = line.next()
            fit_frame(np.clip(image * np.float32(gain), 0, 255).astype(np.uint8), batch.shape[1:], "stretch", batch[j])
        for j, score in enumerate(engine.infer(batch[:k]).scores):
            if score < monitor.threshold:  # the window holds frames judged ok
                event = monitor.add(float(score))
                if event:
                    events.append((done + j, event))
        done += k
    return events


def test_lighting_change_raises_and_clears_the_alarm(tmp_path: Path):
    from calibration.teach import teach
    from engines.bundle.store import load_bundle
    from engines.runtime import open_engine
    from engines.training.train import Progress, train_bundle
    from inspectd.daemon.drift import monitor_for

    line = SyntheticLine(96, 96, seed=2, defect_rate=0.0)
    line.write_folder(tmp_path / "train", 30)
    line.write_folder(tmp_path / "teach", 120)
    train_bundle(
        tmp_path / "train",
        tmp_path / "b",
        size=(SIZE, SIZE),
        scorer="memory",
        memory_size=200,
        progress=Progress(enabled=False),
    )
    teach(tmp_path / "b", tmp_path / "teach", holdout=0.5, out=io.StringIO())  # 60 held-out good scores: the reference
    bundle = load_bundle(tmp_path / "b")
    monitor = monitor_for(bundle.thresholds(), "cam0")
    assert monitor.active and monitor.m == 60
    with open_engine(bundle, "onnxruntime", {"providers": "cpu", "intra_op_threads": 1}, max_batch=8) as engine:
        assert stream(engine, line, monitor, 1000, 1.0) == []
        assert monitor.status()["samples"] == 200 and not monitor.status()["alarm"]
        events = stream(engine, line, monitor, 400, 1.5)
        assert events and events[0][1] == "raised" and events[0][0] < FRAMES_TO_ALARM, events
        assert monitor.status()["false_reject_warning"]
        assert stream(engine, line, monitor, 600, 1.0)[-1][1] == "cleared"

    from engines.bundle import thresholds as thresholds_doc

    bare = thresholds_doc.first_version(1.0, 1.0, {})
    inactive = monitor_for(bare, "cam0")
    assert not inactive.active and all(inactive.add(9.0) is None for _ in range(500))
