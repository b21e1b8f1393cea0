"""The score-drift alarm on the synthetic line: a bundle taught on the line's good frames, a stream of the same line
through a real ONNX Runtime engine. Unchanged frames never raise it; a lighting change raises it within a stated
number of good frames; back to normal lighting it clears (hysteresis); without a reference it stays inactive. The
same taught bundle, in a real daemon process: the alarm end to end (log, status, status message = the PLC bit,
metrics), and `inspectd teach --apply` / `--rollback --apply` swapping versions under a running line with no seq gap."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from engines.data.synthline import SyntheticLine
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
SIZE = 64
LINE = 96  # the synthetic line's frame size
# The daemon test's line: normal lighting, half again as bright from LIGHT_ON, normal again from LIGHT_OFF. The
# bounds leave room over one measurement each (in parentheses, taken with an earlier grain of the synthetic line).
LIGHT_ON, LIGHT_OFF, FRAMES = 1000, 2000, 2800
DAEMON_FRAMES_TO_ALARM = 250  # frames after LIGHT_ON until drift_raised (measured: 128)
DAEMON_FRAMES_TO_CLEAR = 400  # frames after LIGHT_OFF until drift_cleared (measured: 142)
FRAMES_TO_ALARM = 200  # good frames after a 1.5x lighting change (measured: 142)
# A station with controlled lighting: the line's own level within +-2 % (engines.data.synthline.lighting_jitter).
CONTROLLED = 0.02
FRAMES_TO_ALARM_10PCT = 120  # good frames after a 1.1x or 0.9x lighting change on it (measured: 79 and 83)


def lit_line(count: int, lighting: dict[int, float]) -> dict:
    """The daemon's synthetic camera: the good frames of the line taught on (seed 2), under a lighting schedule."""
    return {
        "kind": "synthetic",
        "width": LINE,
        "height": LINE,
        "seed": 2,
        "defect_rate": 0.0,
        "rate_hz": 400.0,
        "count": count,
        "lighting": lighting,
    }


def stream(engine, line, monitor, n: int, gain: float) -> list[tuple[int, str]]:
    from engines.runtime.preprocess import fit_frame, mean_level

    events, batch = [], np.empty((8, SIZE, SIZE, 1), np.uint8)
    done = 0
    while done < n:
        k = min(8, n - done)
        for j in range(k):
            image, _ = line.next()
            fit_frame(np.clip(image * np.float32(gain), 0, 255).astype(np.uint8), batch.shape[1:], "stretch", batch[j])
        for j, score in enumerate(engine.infer(batch[:k]).scores):
            if score < monitor.threshold:  # the window holds frames judged ok
                event = monitor.add(float(score), mean_level(batch[j]))
                if event:
                    events.append((done + j, event))
        done += k
    return events


def taught_on(root: Path, jitter: float) -> Path:
    """A 64x64 memory bundle trained on 30 frames of the 96x96 synthetic line (seed 2, its lighting varying by
    `jitter`), then taught on 120 more with half held out: 60 good frames are the drift references."""
    from calibration.teach import teach
    from engines.training.train import Progress, train_bundle

    line = SyntheticLine(LINE, LINE, seed=2, defect_rate=0.0, lighting_jitter=jitter)
    for _ in range(FRAMES):  # the streams below are the line's first frames: none of them trained or taught on
        line.next()
    line.write_folder(root / "train", 30)
    line.write_folder(root / "teach", 120)
    train_bundle(
        root / "train",
        root / "b",
        size=(SIZE, SIZE),
        scorer="memory",
        memory_size=200,
        progress=Progress(enabled=False),
    )
    teach(root / "b", root / "teach", holdout=0.5, out=io.StringIO())
    return root / "b"


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    """The bundle on the loosely lit line (the synthetic line's default, +-10 %). Tests copy it before changing it."""
    return taught_on(tmp_path_factory.mktemp("drift"), 0.1)


def test_lighting_change_raises_and_clears_the_alarm(taught: Path):
    from engines.bundle.store import load_bundle
    from engines.runtime import open_engine
    from inspectd.daemon.drift import monitor_for

    line = SyntheticLine(LINE, LINE, seed=2, defect_rate=0.0)
    bundle = load_bundle(taught)
    monitor = monitor_for(bundle.thresholds(), "cam0")
    assert monitor.active and monitor.score.m == 60
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


def test_a_tenth_brighter_or_darker_under_controlled_lighting_raises_the_alarm_through_brightness(tmp_path: Path):
    """Under controlled lighting (+-2 %) a 1.1x or 0.9x change raises the alarm within FRAMES_TO_ALARM_10PCT good
    frames, by the brightness test (the model is robust to it: its score barely moves), and clears once the light is
    back. That an hour of unchanged frames stays quiet is the soak's to show (deploy/soak.py --drift)."""
    from engines.bundle.store import load_bundle
    from engines.runtime import open_engine
    from inspectd.daemon.drift import monitor_for

    bundle = load_bundle(taught_on(tmp_path, CONTROLLED))
    line = SyntheticLine(LINE, LINE, seed=2, defect_rate=0.0, lighting_jitter=CONTROLLED)
    monitor = monitor_for(bundle.thresholds(), "cam0")
    assert monitor.active and monitor.brightness.active and monitor.brightness.m == 60
    with open_engine(bundle, "onnxruntime", {"providers": "cpu", "intra_op_threads": 1}, max_batch=8) as engine:
        assert stream(engine, line, monitor, 1000, 1.0) == []
        for gain in (1.1, 0.9):  # 2800 frames in all: none the bundle was trained or taught on
            events = stream(engine, line, monitor, 300, gain)
            assert events and events[0][1] == "raised" and events[0][0] < FRAMES_TO_ALARM_10PCT, (gain, events)
            assert monitor.status()["brightness_alarm"]
            assert [event for _, event in stream(engine, line, monitor, 600, 1.0)] == ["cleared"], gain


def test_the_brightness_test_is_inactive_without_its_reference():
    """Thresholds from before brightness was recorded (or from `inspectd train`): the score test alone."""
    from engines.bundle import thresholds as thresholds_doc
    from inspectd.daemon.drift import monitor_for

    rng = np.random.default_rng(0)
    reference = thresholds_doc.good_score_reference(rng.normal(1.0, 0.1, 100))
    doc = thresholds_doc.first_version(2.0, 2.0, {thresholds_doc.GOOD_SCORES: reference})
    monitor = monitor_for(doc, "cam0")
    assert monitor.active and not monitor.brightness.active
    events = [monitor.add(float(score), 255.0) for score in rng.normal(1.0, 0.1, 500)]
    assert not any(events) and monitor.status()["brightness_statistic"] is None
    assert not monitor.status()["brightness_active"]


def test_an_inactive_test_is_one_drift_inactive_warning_naming_the_test():
    """DEPLOY.md names one `drift_inactive` line for a drift test that cannot run; the brightness test logged
    `drift_brightness_inactive` at info, which a search for the documented name, or a log filtered to warnings,
    missed, while it may be the station's only drift alarm."""
    from structlog.testing import capture_logs

    from engines.bundle import thresholds as thresholds_doc
    from inspectd.daemon.drift import monitor_for

    rng = np.random.default_rng(0)
    scores = thresholds_doc.good_score_reference(rng.normal(1.0, 0.1, 100))
    few = thresholds_doc.good_score_reference(rng.normal(1.0, 0.1, 3))
    brightness = thresholds_doc.good_score_reference(rng.normal(120.0, 2.0, 100))
    cases = {
        "score": {thresholds_doc.GOOD_SCORES: few, thresholds_doc.GOOD_BRIGHTNESS: brightness},
        "brightness": {thresholds_doc.GOOD_SCORES: scores, thresholds_doc.GOOD_BRIGHTNESS: few},
    }
    for test, provenance in cases.items():
        with capture_logs() as logs:
            monitor_for(thresholds_doc.first_version(2.0, 2.0, provenance), "cam1")
        inactive = [e for e in logs if e["event"].startswith("drift")]
        assert [(e["event"], e["log_level"], e["test"], e["camera"]) for e in inactive] == [
            ("drift_inactive", "warning", test, "cam1")
        ], logs
        assert "3 good frame(s), expected at least 8" in inactive[0]["reason"] and inactive[0]["thresholds_version"]


def test_daemon_raises_drift_in_status_metrics_log_and_the_plc_flag_and_clears_it(taught: Path, tmp_path: Path):
    """A real daemon process streaming the synthetic line through the taught bundle, its lighting changed mid-stream
    by the source's schedule: nothing over the first LIGHT_ON unchanged frames; the alarm within
    DAEMON_FRAMES_TO_ALARM frames of the change, in the log, the status messages (the PLC bridges' drift bit), the
    control `status` and the metrics; cleared within DAEMON_FRAMES_TO_CLEAR frames of the light going back."""
    import shutil
    import time
    import urllib.request

    from daemon_harness import Station
    from inspectd.clients.handshake import daemon_drift_flags
    from inspectd.protocol.messages import Result
    from ports import free_port

    shutil.copytree(taught, tmp_path / "b")
    port = free_port()
    source = lit_line(FRAMES, {LIGHT_ON: 1.5, LIGHT_OFF: 1.0})
    station = Station(
        tmp_path,
        tmp_path / "b",
        [{"id": "cam0", "source": source, "queue": {"policy": "block"}}],
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    try:
        station.wait_ready()
        last_seq, flags = -1, []  # (last seq received, the PLC flag the bridge takes from this status message)
        seen_in_control = seen_in_metrics = False
        deadline = time.monotonic() + 120
        while last_seq < FRAMES - 1 and time.monotonic() < deadline:
            message = station.sub.recv(0.5)
            if isinstance(message, Result):
                last_seq = max(last_seq, message.seq)
            elif isinstance(message, dict):
                flags.append((last_seq, daemon_drift_flags(message, "cam0")[0]))
                if flags[-1][1] and not seen_in_control:
                    seen_in_control = station.control({"cmd": "status"})["cameras"]["cam0"]["drift"]["alarm"]
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                        seen_in_metrics = 'inspectd_drift_alarm{camera="cam0"} 1.0' in reply.read().decode()
        assert last_seq == FRAMES - 1, station.log_tail()
        time.sleep(0.5)  # the last status messages and log lines
        final = station.control({"cmd": "status"})["cameras"]["cam0"]["drift"]
    finally:
        assert station.stop() == 0, station.log_tail()

    raised, cleared = station.events("drift_raised"), station.events("drift_cleared")
    assert len(raised) == 1 and len(cleared) == 1, (raised, cleared)
    assert LIGHT_ON <= raised[0]["seq"] < LIGHT_ON + DAEMON_FRAMES_TO_ALARM, raised
    assert LIGHT_OFF <= cleared[0]["seq"] < LIGHT_OFF + DAEMON_FRAMES_TO_CLEAR, cleared
    assert raised[0]["samples"] >= 100 and raised[0]["brightness_active"]
    assert (
        raised[0]["statistic"] > raised[0]["raise_at"]
        or raised[0]["brightness_statistic"] > raised[0]["brightness_raise_at"]
    )
    on = [seq for seq, flag in flags if flag]
    assert on and LIGHT_ON <= on[0] and on[-1] < LIGHT_OFF + DAEMON_FRAMES_TO_CLEAR, flags
    assert not any(flag for seq, flag in flags if seq < LIGHT_ON), "drift over unchanged frames"
    warnings = station.events("false_reject_warning_raised")
    assert warnings and all(w["seq"] >= LIGHT_ON for w in warnings), warnings
    assert seen_in_control and seen_in_metrics
    assert final["active"] and not final["alarm"] and final["samples"] == 200


def test_synthetic_source_lighting_schedule_and_its_errors(tmp_path: Path):
    import yaml

    from inspectd.daemon.config import load_config
    from inspectd.daemon.ingest.synthetic import SyntheticLineSource
    from inspectd.errors import InspectdError

    def config(lighting):
        doc = {
            "station": "s",
            "model": {"bundle": str(tmp_path)},
            "state_dir": str(tmp_path),
            "cameras": [{"id": "c", "source": {"kind": "synthetic", "width": 16, "height": 16, "lighting": lighting}}],
        }
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        return load_config(tmp_path / "c.yaml")

    source = SyntheticLineSource(config({5: 1.5, 9: 1.0}).cameras[0], lambda: 0.0)
    assert [source.gain(i) for i in (0, 4, 5, 8, 9, 100)] == [1.0, 1.0, 1.5, 1.5, 1.0, 1.0]
    with pytest.raises(InspectdError, match=r"cameras\[0\]\.source\.lighting\[9\]: expected more than 0"):
        config({9: 0})


def test_teach_apply_hot_swaps_into_a_running_daemon_without_a_seq_gap_and_rollback_returns(taught, tmp_path):
    """`inspectd teach --apply` (the CLI, as a process) while the line runs: the subscriber sees every seq once, in
    order, the results switch to the taught version at one seq, and `--rollback --apply` brings back the model before,
    judged by its own thresholds as the next thresholds version (a version number never names two documents)."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from daemon_harness import REPO, Station
    from inspectd.protocol.messages import Result

    shutil.copytree(taught, tmp_path / "b")
    line = SyntheticLine(LINE, LINE, seed=2, defect_rate=0.0)
    for _ in range(FRAMES + 150):  # past every frame the other tests stream or the bundle saw
        line.next()
    line.write_folder(tmp_path / "good", 80)
    source = {"kind": "synthetic", "width": LINE, "height": LINE, "seed": 2, "defect_rate": 0.0, "rate_hz": 100.0}
    station = Station(tmp_path, tmp_path / "b", [{"id": "cam0", "source": source, "queue": {"policy": "block"}}])
    results: list[Result] = []

    def receive_while(proc: subprocess.Popen | None, then: int) -> None:
        """Results until `proc` has exited, then `then` more."""
        stop_at = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            message = station.sub.recv(0.2)
            if isinstance(message, Result):
                results.append(message)
            if stop_at is None and (proc is None or proc.poll() is not None):
                stop_at = len(results) + then
            if stop_at is not None and len(results) >= stop_at:
                return
        raise AssertionError(f"timed out; daemon log:\n{station.log_tail()}")

    def teach(*args: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "inspectd", "teach", str(tmp_path / "b"), *args]
        return subprocess.Popen(
            [*command, "--apply", station.control_endpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            text=True,
        )

    try:
        station.wait_ready()
        receive_while(None, 50)
        before = (results[-1].model_id, results[-1].thresholds_version)
        taught_proc = teach("--good", str(tmp_path / "good"), "--holdout", "0.5")
        receive_while(taught_proc, 100)
        assert taught_proc.wait() == 0, taught_proc.stdout.read() if taught_proc.stdout else ""
        after_teach = (results[-1].model_id, results[-1].thresholds_version)
        back = teach("--rollback")
        receive_while(back, 100)
        assert back.wait() == 0, back.stdout.read() if back.stdout else ""
        after_rollback = (results[-1].model_id, results[-1].thresholds_version)
    finally:
        assert station.stop() == 0, station.log_tail()

    seqs = [r.seq for r in results]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq gap or disorder across the reloads"
    assert after_teach != before and after_teach[1] > before[1]
    assert after_rollback == (before[0], after_teach[1] + 1)
    versions = [(r.model_id, r.thresholds_version) for r in results]
    switches = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
    assert len(switches) == 2, "each reload switches at one seq, no result judged by a mix"
    assert all(r.verdict != "error" for r in results)
    assert [e["thresholds_version"] for e in station.events("reloaded")] == [after_teach[1], after_teach[1] + 1]


def test_short_drift_soak_stays_quiet_on_an_unchanged_line(taught: Path, tmp_path: Path):
    """deploy/soak.py --drift, shortened for CI (the hour is 36000 frames, docs/DEPLOY.md): teach the bundle on the
    soak's own controlled line, stream 1500 unchanged frames through a real daemon: every frame published, both tests
    active, no drift or false-reject event or status."""
    import json
    import os
    import subprocess
    import sys

    from daemon_harness import REPO

    out = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "soak.py"), "--drift", "--bundle", str(taught), "--frames", "1500",
         "--size", str(LINE), "--workdir", str(tmp_path / "soak"), "--json"],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["published"] == 1500 and report["drift_active"] and report["brightness_active"], report
    assert report["drift_events"] == {} and report["status_messages_with_alarm"] == 0, report
    assert report["status_messages_with_warning"] == 0 and report["reference_frames"] == 60, report


def test_the_bridge_drift_bit_is_the_daemon_alarm_and_nothing_else():
    from inspectd.clients.handshake import daemon_drift_flags

    def drift(cam, camera="cam0"):
        return daemon_drift_flags({"cameras": {"cam0": cam}}, camera)[0]

    assert drift({"drift": {"active": True, "alarm": True}})
    assert not drift({"drift": {"active": True, "alarm": False}})
    assert not drift({"published": 3})  # a daemon from before drift was reported
    for hostile in (5, None, [], {"drift": "yes"}, {"drift": {"alarm": 1}}, {"drift": {"alarm": "true"}}):
        assert not drift(hostile)
    assert not drift({"drift": {"alarm": True}}, "cam1") and not drift({}, None)
    assert daemon_drift_flags({"cameras": "hostile"}, "cam0") == (False, False)


def test_samples_counts_the_good_frames_in_the_window_from_the_first():
    """`samples` is the good frames in the window (docs/PROTOCOL.md), from the first frame on: not 0 until the first
    check at MIN_SAMPLES, nor as of the last check, and WINDOW once full. With the score test inactive, the
    brightness window's."""
    from engines.bundle import thresholds as thresholds_doc
    from inspectd.daemon.drift import MIN_SAMPLES, WINDOW, monitor_for

    rng = np.random.default_rng(0)
    reference = thresholds_doc.good_score_reference(rng.normal(1.0, 0.1, 100))
    monitor = monitor_for(thresholds_doc.first_version(2.0, 2.0, {thresholds_doc.GOOD_SCORES: reference}), "cam0")
    counts = []
    for _ in range(WINDOW + 50):
        monitor.add(float(rng.normal(1.0, 0.1)))
        counts.append(monitor.status()["samples"])
    assert counts[: MIN_SAMPLES + 15] == list(range(1, MIN_SAMPLES + 16)), counts[: MIN_SAMPLES + 15]
    assert counts[-1] == WINDOW

    brightness = thresholds_doc.good_score_reference(rng.normal(128.0, 2.0, 100))
    only = monitor_for(thresholds_doc.first_version(2.0, 2.0, {thresholds_doc.GOOD_BRIGHTNESS: brightness}), "cam0")
    assert not only.active and only.brightness.active
    for _ in range(7):
        only.add(1.0, float(rng.normal(128.0, 2.0)))
    assert only.status()["samples"] == 7


def test_a_reload_that_changes_nothing_keeps_a_raised_drift_alarm_and_a_new_thresholds_version_clears_it(
    taught: Path, tmp_path: Path
):
    """A real daemon whose line runs half again as bright as the taught frames: the alarm is up. `inspectd ctl
    reload` with the same bundle on disk (what revoking a key takes) keeps it up, in the control status and in the
    status messages' PLC drift bit, with no drift_cleared line. A reload that reads a new thresholds version with
    another image threshold starts a new reference: drift_cleared with reason "new reference", the bit drops. The
    start logged drift_reset."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from daemon_harness import REPO, Station
    from engines.bundle import thresholds as thresholds_doc
    from engines.bundle.store import load_bundle
    from inspectd.clients.handshake import daemon_drift_flags
    from inspectd.protocol.messages import Result

    shutil.copytree(taught, tmp_path / "b")
    frames = 400  # the line then stops: what the status says after each reload is the reload's doing alone
    source = lit_line(frames, {0: 1.5})
    station = Station(tmp_path, tmp_path / "b", [{"id": "cam0", "source": source, "queue": {"policy": "block"}}])

    def reload() -> None:
        done = subprocess.run(
            [sys.executable, "-m", "inspectd", "ctl", "--endpoint", station.control_endpoint, "reload"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert done.returncode == 0, done.stderr + station.log_tail()

    def plc_bits_since(since: float, count: int = 3) -> list[bool]:
        """The drift bit of the next `count` status messages sent after `since` (time.time())."""
        bits: list[bool] = []
        deadline = time.monotonic() + 10
        while len(bits) < count:
            assert time.monotonic() < deadline, "no status messages"
            message = station.sub.recv(0.5)
            if isinstance(message, dict) and message.get("t", 0) > since:
                bits.append(daemon_drift_flags(message, "cam0")[0])
        return bits

    try:
        station.wait_ready()
        last_seq, deadline = -1, time.monotonic() + 120
        while last_seq < frames - 1 and time.monotonic() < deadline:
            message = station.sub.recv(0.5)
            if isinstance(message, Result):
                last_seq = max(last_seq, message.seq)
        assert last_seq == frames - 1, station.log_tail()
        assert station.events("drift_raised"), station.log_tail()
        assert station.control({"cmd": "status"})["cameras"]["cam0"]["drift"]["alarm"]

        since = time.time()
        reload()
        assert len(station.events("reloaded")) == 1
        kept = station.control({"cmd": "status"})["cameras"]["cam0"]["drift"]
        assert kept["alarm"] and kept["samples"] > 0, kept
        assert station.events("drift_cleared") == [], "a reload that changed nothing cleared the alarm"
        assert all(plc_bits_since(since)), "the PLC drift bit dropped on a reload that changed nothing"

        bundle = load_bundle(tmp_path / "b")
        current = bundle.thresholds()
        bundle.replace_file(
            thresholds_doc.FILE_NAME,
            thresholds_doc.dumps(
                thresholds_doc.next_version(
                    current, image_threshold=current.image_threshold * 1.01, provenance=dict(current.provenance)
                )
            ),
        )
        reload()
        since = time.time()  # those sent while it reloaded may still carry the alarm
        fresh = station.control({"cmd": "status"})
        assert fresh["thresholds_version"] == current.version + 1
        assert not fresh["cameras"]["cam0"]["drift"]["alarm"] and fresh["cameras"]["cam0"]["drift"]["active"]
        assert not any(plc_bits_since(since))
    finally:
        assert station.stop() == 0, station.log_tail()
    cleared = station.events("drift_cleared")
    assert [(e["reason"], e["thresholds_version"]) for e in cleared] == [("new reference", current.version + 1)]
    # A restart is what drops a raised alarm without a word from the window: the start says so, the reloads do not.
    resets = station.events("drift_reset")
    assert [(e["camera"], e["reason"], e["samples_needed"]) for e in resets] == [("cam0", "start", 100)], resets


def test_a_thresholds_version_for_one_camera_keeps_another_cameras_raised_alarm(taught: Path, tmp_path: Path):
    """Two cameras in a real daemon, cam1 under half again as much light: its alarm is up. A version that changes
    only cam0's override (what `calibrate --camera cam0 --apply` sends), and a rollback from it, leave cam1's
    threshold, target and references as they were: its alarm stays up, in the status and the PLC drift bit, with
    no drift_cleared line, while cam0, whose threshold changed, starts afresh. A version that changes the threshold
    cam1 judges by ends its alarm with reason "new reference"."""
    import shutil
    import time

    from daemon_harness import Station
    from engines.bundle import thresholds as thresholds_doc
    from inspectd.clients.handshake import daemon_drift_flags
    from inspectd.protocol.messages import Result

    shutil.copytree(taught, tmp_path / "b")
    frames = 400  # each line then stops: what the status says after each write is the write's doing alone
    cameras = [
        {"id": "cam0", "source": lit_line(frames, {0: 1.0}), "queue": {"policy": "block"}},
        {"id": "cam1", "source": lit_line(frames, {0: 1.5}), "queue": {"policy": "block"}},
    ]
    station = Station(tmp_path, tmp_path / "b", cameras)

    def drift(camera: str) -> dict:
        return station.control({"cmd": "status"})["cameras"][camera]["drift"]

    def plc_bits_since(since: float, count: int = 3) -> list[bool]:
        """cam1's drift bit in the next `count` status messages sent after `since` (time.time())."""
        bits: list[bool] = []
        deadline = time.monotonic() + 10
        while len(bits) < count:
            assert time.monotonic() < deadline, "no status messages"
            message = station.sub.recv(0.5)
            if isinstance(message, dict) and message.get("t", 0) > since:
                bits.append(daemon_drift_flags(message, "cam1")[0])
        return bits

    def write(request: dict) -> int:
        reply = station.control(request)
        assert reply["ok"], reply
        return station.control({"cmd": "status"})["thresholds_version"]

    try:
        station.wait_ready()
        last = {"cam0": -1, "cam1": -1}
        deadline = time.monotonic() + 120
        while min(last.values()) < frames - 1 and time.monotonic() < deadline:
            message = station.sub.recv(0.5)
            if isinstance(message, Result):
                last[message.camera] = max(last[message.camera], message.seq)
        assert min(last.values()) == frames - 1, station.log_tail()
        assert [e["camera"] for e in station.events("drift_raised")] == ["cam1"], station.log_tail()
        raised = drift("cam1")
        assert raised["alarm"] and drift("cam0")["samples"] > 0

        current = thresholds_doc.read(tmp_path / "b" / thresholds_doc.FILE_NAME)
        cam0 = {"cam0": {"image_threshold": current.for_camera("cam0")[0] * 1.01}}
        # As calibrate sets it: not a teach, which no rollback may go below.
        provenance = {**current.provenance, "tool": "inspectd calibrate"}
        other = thresholds_doc.next_version(current, per_camera=cam0, provenance=provenance)
        assert other.for_camera("cam1") == current.for_camera("cam1")
        since = time.time()
        assert write({"cmd": "set_thresholds", "thresholds": other.to_dict()}) == current.version + 1
        kept = drift("cam1")
        assert kept["alarm"] and kept["samples"] == raised["samples"], kept
        assert drift("cam0")["samples"] == 0  # its threshold changed: a fresh window on it
        assert station.events("drift_cleared") == [], "a version for cam0 cleared cam1's alarm"
        assert all(plc_bits_since(since)), "the PLC drift bit dropped on a version for another camera"

        assert write({"cmd": "rollback", "version": current.version}) == current.version + 2
        assert drift("cam1")["alarm"] and station.events("drift_cleared") == []

        moved = thresholds_doc.next_version(
            thresholds_doc.read(tmp_path / "b" / thresholds_doc.FILE_NAME),
            image_threshold=current.image_threshold * 1.01,
            provenance=provenance,
        )
        assert write({"cmd": "set_thresholds", "thresholds": moved.to_dict()}) == current.version + 3
        fresh = drift("cam1")
        assert not fresh["alarm"] and fresh["samples"] == 0 and fresh["active"], fresh
        time.sleep(0.3)  # those sent while it was set may still carry the alarm
        assert not any(plc_bits_since(time.time()))
    finally:
        assert station.stop() == 0, station.log_tail()
    cleared = station.events("drift_cleared")
    assert [(e["camera"], e["reason"], e["thresholds_version"]) for e in cleared] == [
        ("cam1", "new reference", current.version + 3)
    ], cleared


def in_hysteresis(brightness: bool) -> dict:
    """The status of a monitor whose line drifted (its scores, or with `brightness` its grey level, moved by two of
    their spreads), raising the alarm, and then came back: taken at the first check where that test's D is no
    longer above raise_at, the alarm still up as it waits for D to fall below clear_at."""
    from inspectd.daemon.drift import DriftMonitor

    rng = np.random.default_rng(1)
    monitor = DriftMonitor(
        (500, sorted(rng.normal(1.0, 0.1, 500).tolist())),
        1.5,
        brightness_reference=(500, sorted(rng.normal(128.0, 2.0, 500).tolist())),
    )
    prefix = "brightness_" if brightness else ""
    for back in (False, True):
        for _ in range(400):
            score, level = float(rng.normal(1.0, 0.1)), float(rng.normal(128.0, 2.0))
            if not back:
                score, level = (score, level + 4.0) if brightness else (score + 0.2, level)
            if score >= 1.5:
                continue  # judged defect: not in the window
            monitor.add(score, level)
            status = monitor.status()
            if back and monitor.since_check == 0 and status[f"{prefix}statistic"] <= status[f"{prefix}raise_at"]:
                assert status["alarm"] and status[f"{prefix}alarm" if brightness else "score_alarm"], status
                return status
        assert monitor.status()["alarm"], "the drift did not raise the alarm"
    raise AssertionError("D never came back below raise_at")


def test_the_status_says_what_d_must_fall_below_for_a_raised_alarm_to_clear():
    """While a raised test holds through its hysteresis (D no longer above raise_at, not yet below the lower level
    it clears at), the status carries that level, clear_at (brightness_clear_at for the brightness test): what an
    operator checking a fix needs. It is the critical value at CLEAR_ALPHA, and the test clears below it."""
    from inspectd.daemon.drift import CLEAR_ALPHA, ks_critical

    for brightness in (False, True):
        prefix = "brightness_" if brightness else ""
        status = in_hysteresis(brightness)
        clear_at = status[f"{prefix}clear_at"]
        assert clear_at == round(ks_critical(CLEAR_ALPHA, 200, 500), 6), status
        assert clear_at < status[f"{prefix}statistic"] <= status[f"{prefix}raise_at"], status
