"""The daemon's set_thresholds and rollback over its real control socket: an in-process Daemon on a real bundle and
ONNX Runtime session, a synthetic camera, requests through ControlClient."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import structlog

from daemon_harness import in_process_config
from engines.bundle import thresholds as thresholds_doc
from engines.errors import BundleError
from inspectd.protocol.control import ControlClient
from station_model import write_grey_bundle

pytestmark = pytest.mark.timeout(60)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def daemon(tmp_path):
    from inspectd.daemon.service import Daemon

    source = {"kind": "synthetic", "rate_hz": 20, "width": 64, "height": 64}
    running = Daemon(in_process_config(tmp_path, write_grey_bundle(tmp_path / "bundle"), source))
    running.start()
    try:
        yield running
    finally:
        running.shutdown()


def ask(daemon, request: dict, timeout: float = 8.0) -> dict:
    with ControlClient(daemon.config.control.endpoint, timeout_s=timeout) as client:
        return client.request(request)


def release(fifo, manifest, content: bytes, timeout: float = 10.0) -> None:
    """The manifest as a file again, and its bytes to the reload waiting on the named pipe."""
    deadline = time.monotonic() + timeout
    while True:
        try:  # succeeds only while a reader (the reload) has the pipe open
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline, "no reload reading the manifest"
            time.sleep(0.02)
    try:
        (manifest.parent / "manifest.tmp").write_bytes(content)
        os.replace(manifest.parent / "manifest.tmp", manifest)  # every later read gets the file
        os.write(fd, content)
    finally:
        os.close(fd)


def on_disk(daemon) -> thresholds_doc.Thresholds:
    return thresholds_doc.read(daemon.config.model.bundle / thresholds_doc.FILE_NAME)


def test_set_thresholds_and_rollback_during_a_sighup_reload_are_refused_in_one_line_and_the_channel_answers(
    daemon, tmp_path
):
    """A SIGHUP reload holds the model while it opens the new bundle (here its manifest is a named pipe nobody writes
    yet, as a bundle that takes minutes to open): a set_thresholds or rollback meanwhile waits BUNDLE_LOCK_WAIT_S at
    most and is refused, nothing written, and `status` is answered, rather than the control channel waiting on the
    reload."""
    from inspectd.daemon import service
    from inspectd.daemon.control import BUNDLE_LOCK_WAIT_S

    current = daemon.stage.state.thresholds
    v2 = thresholds_doc.next_version(current, image_threshold=0.45)
    assert ask(daemon, {"cmd": "set_thresholds", "thresholds": v2.to_dict()})["ok"]
    manifest = daemon.config.model.bundle / "manifest.json"
    content = manifest.read_bytes()
    fifo = tmp_path / "slow-manifest"
    os.mkfifo(fifo)
    os.link(fifo, tmp_path / "fifo")  # to reach the pipe once manifest.json is a file again
    os.replace(fifo, manifest)
    reloader = threading.Thread(target=service._reload, args=(daemon, structlog.get_logger("test")), daemon=True)
    reloader.start()
    try:
        wait_for(daemon._reload_lock.locked, 10, "the reload to hold the model")
        v3 = thresholds_doc.next_version(on_disk(daemon), image_threshold=0.55)
        for request, what in (
            ({"cmd": "set_thresholds", "thresholds": v3.to_dict()}, "set_thresholds"),
            ({"cmd": "rollback", "version": 1}, "rollback"),
        ):
            t0 = time.monotonic()
            reply = ask(daemon, request, timeout=BUNDLE_LOCK_WAIT_S + 4)
            assert time.monotonic() - t0 < BUNDLE_LOCK_WAIT_S + 2
            assert reply["ok"] is False, reply
            assert reply["error"].startswith(f"{what}: a reload of the bundle is under way"), reply
            assert "nothing written" in reply["error"] and "\n" not in reply["error"]
            assert ask(daemon, {"cmd": "status"}, timeout=3)["thresholds_version"] == 2
        assert on_disk(daemon).version == 2
    finally:
        release(tmp_path / "fifo", manifest, content)
        reloader.join(30)
    assert not reloader.is_alive() and daemon.stage.state.thresholds_version == 2
    # Once the reload has ended, the same request goes through.
    assert ask(daemon, {"cmd": "set_thresholds", "thresholds": v3.to_dict()})["thresholds_version"] == 3
    assert json.loads((daemon.config.model.bundle / thresholds_doc.FILE_NAME).read_text())["version"] == 3


def versions(doc: thresholds_doc.Thresholds) -> list[tuple[int, float]]:
    return [(h["version"], h["image_threshold"]) for h in doc.history]


def set_own_versions(daemon) -> thresholds_doc.Thresholds:
    """Versions 2 and 3 of the running model, set through the daemon: v3 with history [v2, v1]."""
    model = daemon.stage.state.model_id
    for image in (0.45, 0.4):
        doc = thresholds_doc.next_version(on_disk(daemon), image_threshold=image, provenance={"model_id": model})
        assert ask(daemon, {"cmd": "set_thresholds", "thresholds": doc.to_dict()})["ok"]
    current = on_disk(daemon)
    assert current.version == 3 and versions(current) == [(2, 0.45), (1, 0.5)]
    return current


def test_a_rollback_that_waited_out_a_reload_bringing_another_model_is_refused_not_put_on_that_model(
    daemon, tmp_path, monkeypatch
):
    """The rollback was built from the running model's history before the reload's lock was taken: once a reload to
    another model had finished meanwhile, the old model's values judged the new one, its thresholds.json held them and
    their history, and the reply said it went through."""
    import shutil

    import numpy as np

    from engines.bundle.store import write_bundle
    from inspectd.errors import InspectdError
    from station_model import M, grey_graph

    set_own_versions(daemon)
    old_model = daemon.stage.state.model_id
    other = write_bundle(
        tmp_path / "other",
        {
            "method": "test",
            "backbone": "none",
            "input": {"height": M, "width": M, "channels": 1, "resize": "stretch"},
            "scorer_inputs": ["centre"],
            "score_kind": "max",
        },
        grey_graph(),
        {"centre": np.array([100.0], np.float32)},
        {},
        thresholds_doc.first_version(0.7, 0.7, {"tool": "test"}),
    )
    bundle = daemon.config.model.bundle
    shutil.rmtree(bundle)
    other.rename(bundle)
    opening = daemon._open_reloaded

    def slowly():  # a real model takes seconds to open and warm
        time.sleep(0.5)
        return opening()

    monkeypatch.setattr(daemon, "_open_reloaded", slowly)
    reloader = threading.Thread(target=daemon.reload)
    reloader.start()
    try:
        wait_for(daemon._reload_lock.locked, 10, "the reload to hold the model")
        with pytest.raises(InspectdError, match=r"^rollback: a reload changed the running thresholds while it waited"):
            daemon.rollback(2)
    finally:
        reloader.join(30)
    state = daemon.stage.state
    assert state.model_id != old_model and state.thresholds_version == 1 and state.thresholds.image_threshold == 0.7
    assert on_disk(daemon).image_threshold == 0.7 and on_disk(daemon).history == []


def test_another_models_document_without_a_model_id_keeps_the_daemons_history_so_rollback_restores_its_own(daemon):
    """A document of another model that records no model_id (train's version 1, a rollback to it) passes the fit
    check; its history must not replace the daemon's: `ctl rollback 2` afterwards means this model's version 2, not
    the other model's."""
    set_own_versions(daemon)
    foreign = {
        "version": 5,
        "image_threshold": 0.3,
        "pixel_threshold": 0.5,
        "provenance": {"rollback_to": 1},
        "history": [
            {
                "version": v,
                "image_threshold": image,
                "pixel_threshold": 0.5,
                "per_camera": {},
                "provenance": {"model_id": "test-none-another"},
            }
            for v, image in ((4, 0.2), (3, 0.25), (2, 0.3))
        ]
        + [{"version": 1, "image_threshold": 0.5, "pixel_threshold": 0.5, "per_camera": {}, "provenance": {}}],
    }
    assert ask(daemon, {"cmd": "set_thresholds", "thresholds": foreign})["thresholds_version"] == 5
    written = on_disk(daemon)
    assert (written.version, written.image_threshold) == (5, 0.3)
    assert versions(written) == [(3, 0.4), (2, 0.45), (1, 0.5)]
    assert ask(daemon, {"cmd": "rollback", "version": 2})["thresholds_version"] == 6
    assert daemon.stage.state.thresholds.image_threshold == 0.45
    assert on_disk(daemon).image_threshold == 0.45


def test_a_hand_written_document_keeps_the_rollback_history(daemon):
    """`ctl set-thresholds` of a document typed by hand (no history) still leaves every earlier version to roll back
    to, the running one included."""
    set_own_versions(daemon)
    hand = {"version": 4, "image_threshold": 0.42, "pixel_threshold": 0.5}
    assert ask(daemon, {"cmd": "set_thresholds", "thresholds": hand})["thresholds_version"] == 4
    assert versions(on_disk(daemon)) == [(3, 0.4), (2, 0.45), (1, 0.5)]
    assert ask(daemon, {"cmd": "rollback", "version": 3})["thresholds_version"] == 5
    assert on_disk(daemon).image_threshold == 0.4


def test_a_document_built_on_the_bundles_thresholds_is_written_as_sent_so_calibrates_own_write_goes_through(daemon):
    """calibrate --apply sends next_version of the bundle's thresholds.json and then writes the same document
    itself: the daemon keeps its history, also over a version written to disk since the daemon loaded its own
    (calibrate without --apply), so the bytes on disk are calibrate's and its write is no conflict."""
    from engines.bundle.store import load_bundle

    bundle_dir = daemon.config.model.bundle
    # A version the daemon has not loaded: calibrate without --apply.
    load_bundle(bundle_dir).replace_file(
        thresholds_doc.FILE_NAME,
        thresholds_doc.dumps(thresholds_doc.next_version(on_disk(daemon), image_threshold=0.45)),
    )
    assert daemon.stage.state.thresholds_version == 1
    calibrating = load_bundle(bundle_dir)  # as calibrate loads it, before it applies
    sent = thresholds_doc.next_version(calibrating.thresholds(), image_threshold=0.4)
    assert ask(daemon, {"cmd": "set_thresholds", "thresholds": sent.to_dict()})["thresholds_version"] == 3
    on = (bundle_dir / thresholds_doc.FILE_NAME).read_bytes()
    assert on == thresholds_doc.dumps(sent)
    assert versions(on_disk(daemon)) == [(2, 0.45), (1, 0.5)]
    calibrating.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(sent))  # calibrate's own write


def test_an_override_for_a_camera_the_daemon_does_not_run_is_told_at_start_and_at_reload(tmp_path):
    """`calibrate --camera cam01 ...` without --apply (for cam1) writes an override nobody uses; the daemon took it at
    its reload or start without a word, and the operator believed cam1 recalibrated."""
    from engines.bundle.store import load_bundle
    from inspectd.daemon.service import Daemon

    bundle = write_grey_bundle(tmp_path / "bundle")
    source = {"kind": "synthetic", "rate_hz": 20, "width": 64, "height": 64}
    with structlog.testing.capture_logs() as logs:
        running = Daemon(in_process_config(tmp_path, bundle, source))
        running.start()
        try:
            camera = running.config.cameras[0].id
            assert not [e for e in logs if e["event"] == "thresholds_unknown_cameras"], "none at a plain start"
            loaded = load_bundle(bundle)
            typo = {"image_threshold": 0.3}
            new = thresholds_doc.next_version(loaded.thresholds(), per_camera={camera: typo, "cam01": typo})
            loaded.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(new))
            running.reload()
        finally:
            running.shutdown()
        again = Daemon(in_process_config(tmp_path, bundle, source))
        again.start()
        again.shutdown()
    told = [e for e in logs if e["event"] == "thresholds_unknown_cameras"]
    assert [(e["cameras"], e["thresholds_version"], e["log_level"]) for e in told] == [(["cam01"], 2, "warning")] * 2
    assert told[0]["running"] == [camera], told


def test_a_bundle_copied_over_again_is_judged_under_a_new_version_and_rollback_reaches_the_stations_own(daemon):
    """Re-deploying the same model over the bundle brings its version 1 back: results would name version 1 again
    with other values than the first ones, and the station's versions 2 and 3 would be gone from `ctl rollback`."""
    set_own_versions(daemon)
    bundle = daemon.config.model.bundle
    with structlog.testing.capture_logs() as logs:
        write_grey_bundle(bundle)
        assert on_disk(daemon).version == 1
        reply = daemon.reload()
        assert reply["thresholds_renumbered"] == {"loaded_version": 1, "version": 4, "previous_version": 3}, reply
        write_grey_bundle(bundle)  # and again, reloaded by the operator's command, which says what it did
        endpoint = daemon.config.control.endpoint
        said = subprocess.run(
            [sys.executable, "-m", "inspectd", "ctl", "--endpoint", endpoint, "reload"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert said.returncode == 0, said.stderr
        assert said.stdout.splitlines()[:2] == [
            f"reloaded: model {daemon.stage.state.model_id}, thresholds version 5",
            "thresholds: the bundle's version 1 judged as version 5 (the running one was 4, and a number never names "
            "two documents); ctl rollback reaches the earlier versions",
        ], said.stdout
        again = daemon.reload()
        assert again["thresholds_version"] == 5, "the same files reloaded keep their number"
        assert "thresholds_renumbered" not in again
    written = on_disk(daemon)
    assert (written.version, written.image_threshold) == (5, 0.5)
    assert versions(written) == [(4, 0.5), (3, 0.4), (2, 0.45), (1, 0.5)]
    assert daemon.stage.state.thresholds == written
    told = [e for e in logs if e["event"] == "thresholds_renumbered"]
    assert [(e["loaded_version"], e["thresholds_version"], e["log_level"]) for e in told] == [(1, 4, "warning")] * 1 + [
        (1, 5, "warning")
    ]
    assert ask(daemon, {"cmd": "rollback", "version": 3})["thresholds_version"] == 6
    assert on_disk(daemon).image_threshold == 0.4


def test_a_copied_over_bundle_the_daemon_cannot_write_keeps_its_number_and_says_so(daemon):
    import fcntl

    set_own_versions(daemon)
    bundle = daemon.config.model.bundle
    write_grey_bundle(bundle)
    fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another writer (a calibrate) holding the bundle past the daemon's wait
        with structlog.testing.capture_logs() as logs:
            reply = daemon.reload()
    finally:
        os.close(fd)
    told = [e for e in logs if e["event"] == "thresholds_version_went_back"]
    assert [(e["thresholds_version"], e["previous_thresholds_version"], e["log_level"]) for e in told] == [
        (1, 3, "warning")
    ]
    assert "not written" in told[0]["error"], told
    assert reply["thresholds_version"] == 1
    assert reply["thresholds_version_went_back"] == {"previous_version": 3, "version": 1, "error": told[0]["error"]}
    assert on_disk(daemon).version == 1
    # Nor may a set-thresholds name version 2 or 3 again: they named the station's own documents.
    model = daemon.stage.state.model_id
    two = thresholds_doc.next_version(on_disk(daemon), image_threshold=0.45, provenance={"model_id": model})
    refused = ask(daemon, {"cmd": "set_thresholds", "thresholds": two.to_dict()})
    assert refused["ok"] is False and refused["error"] == "thresholds.version: 2, expected more than the current 3"
    # The writer gone, the reload tried again mends it: numbered above the station's version 3, with its history.
    again = daemon.reload()
    assert again["thresholds_renumbered"] == {"loaded_version": 1, "version": 4, "previous_version": 3}, again
    assert versions(on_disk(daemon)) == [(3, 0.4), (2, 0.45), (1, 0.5)]
    assert ask(daemon, {"cmd": "rollback", "version": 3})["thresholds_version"] == 5
    assert "thresholds_renumbered" not in daemon.reload(), "mended once"


def test_refusals_of_huge_documents_and_camera_ids_quote_them_cut_short(daemon):
    """A refusal repeated the client's input at full length: 20000 unknown cameras listed one by one, a 100 KB key or
    model id whole, a 200 KB camera id in a pause; each in the reply and in the daemon's log line. The first few
    names then how many more, and each name cut."""
    version = ask(daemon, {"cmd": "status"})["thresholds_version"] + 1
    base = {"version": version, "image_threshold": 0.5, "pixel_threshold": 0.5}
    many = {f"c{i:06d}": {"image_threshold": 0.5} for i in range(20_000)}
    with structlog.testing.capture_logs() as logs:
        cameras = ask(daemon, {"cmd": "set_thresholds", "thresholds": {**base, "per_camera": many}})
        key = ask(daemon, {"cmd": "set_thresholds", "thresholds": {**base, "k" * 100_000: 1}})
        model = ask(
            daemon, {"cmd": "set_thresholds", "thresholds": {**base, "provenance": {"model_id": "m" * 100_000}}}
        )
        camera = ask(daemon, {"cmd": "pause", "camera": "x" * 200_000})
        override = ask(daemon, {"cmd": "set_thresholds", "thresholds": {**base, "per_camera": {"y" * 100_000: 1}}})
    assert cameras["error"].startswith(
        "thresholds.per_camera: c000000, c000001, c000002, c000003, c000004 and 19995 more: not a camera of this daemon"
    )
    assert key["error"].startswith("thresholds.kkk") and "...: unknown key (known: " in key["error"]
    assert (
        model["error"].startswith("thresholds.provenance.model_id: mmm")
        and "..., expected the running" in model["error"]
    )
    assert camera["error"].startswith("camera 'xxx") and camera["error"].endswith("xxx': unknown, expected one of cam0")
    assert (
        override["error"].startswith("thresholds.per_camera.yyy")
        and "...: expected image_threshold" in override["error"]
    )
    for reply in (cameras, key, model, camera, override):
        assert reply["ok"] is False and len(reply["error"]) < 300, reply["error"][:300]
    failed = [event for event in logs if event["event"] == "control_request_failed"]
    assert len(failed) == 5 and all(len(event["error"]) < 300 for event in failed)


def test_an_override_written_for_a_camera_the_daemon_does_not_run_is_refused_by_calibrate_before_scoring(
    daemon, tmp_path, capsys
):
    """`calibrate --camera cam01` (for cam0) without --apply writes an override that every later version carries; the
    daemon refuses a version that adds it, so each later `calibrate --apply` scored every image, was refused, and was
    told "or force", which calibrate has no flag for; `calibrate --rollback N --apply` to a version holding it too.
    Now both are refused before scoring with the way out, which then goes through. An override the daemon already
    runs for a camera taken out of its config is no refusal, as the daemon takes it."""
    import cv2

    from inspectd.cli import main
    from station_model import good_frame

    bundle = daemon.config.model.bundle
    endpoint = daemon.config.control.endpoint
    good = tmp_path / "good"
    good.mkdir()
    for i in range(12):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    flags = ["calibrate", str(bundle), "--good", str(good), "--target-false-reject", "0.3"]

    def calibrate(*extra: str) -> tuple[int, str, str]:
        code = main([*flags, *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert calibrate("--camera", "cam01")[0] == 0  # the typo, written without --apply: version 2
    assert calibrate()[0] == 0  # a global calibration without --apply carries it: version 3
    refusal = (
        f"inspectd calibrate: --apply {endpoint}: {{what}} the override(s) of camera(s) cam01, which the daemon does "
        "not run (it runs cam0) and refuses to take on (a --camera typo written without --apply, or a camera renamed "
        "since): {way}\n"
    )
    for extra in ((), ("--camera", "cam0"), ("--dry-run",)):
        code, out, err = calibrate("--apply", endpoint, *extra)
        assert code == 2 and "image threshold" not in out, out  # before scoring
        assert err == refusal.format(
            what="the new version would carry",
            way=f"restore version 1, the newest without them, with `inspectd calibrate {bundle} --rollback 1` (a "
            "rollback is calibrate's one way to remove an override), then calibrate again, --camera under the "
            "camera's right id",
        ), err
    code = main(["calibrate", str(bundle), "--rollback", "2", "--apply", endpoint])
    err = capsys.readouterr().err
    assert code == 2 and err == refusal.format(
        what="version 2 holds", way="roll back to a version without them (the newest is version 1)"
    ), err
    assert on_disk(daemon).version == 3 and daemon.stage.state.thresholds_version == 1

    # The way out it names.
    assert main(["calibrate", str(bundle), "--rollback", "1"]) == 0
    code, out, err = calibrate("--apply", endpoint)
    assert code == 0 and "applied: the daemon at" in out, err
    assert on_disk(daemon).per_camera == {} and daemon.stage.state.thresholds_version == 5

    # An override already in force for a camera the daemon does not run (taken out of its config): it keeps it.
    assert calibrate("--camera", "cam9")[0] == 0
    daemon.reload()
    code, out, err = calibrate("--apply", endpoint)
    assert code == 0 and "applied: the daemon at" in out, err
    assert set(on_disk(daemon).per_camera) == {"cam9"} and daemon.stage.state.thresholds_version == 7


def test_a_version_past_the_cap_is_refused_and_every_reply_stays_readable(daemon):
    """A version of 20 digits passed the wire parser and the thresholds parser; the rollback after it made one of 21
    digits, in the daemon, which then wrote it and sent it in every reply and header: no client could read one again,
    ctl told the applied rollback as refused, and no command could undo it. The cap keeps every version, and the
    next one, within what every client reads."""
    from inspectd.protocol import wirejson

    assert len(str(thresholds_doc.MAX_VERSION + 1)) <= wirejson.MAX_INT_DIGITS
    assert float(thresholds_doc.MAX_VERSION) == thresholds_doc.MAX_VERSION  # a browser's JSON.parse reads it exactly
    for version in (10**20 - 1, thresholds_doc.MAX_VERSION + 1):
        doc = {"version": version, "image_threshold": 0.45, "pixel_threshold": 0.5}
        refused = ask(daemon, {"cmd": "set_thresholds", "thresholds": doc})
        assert refused["ok"] is False, refused
        assert refused["error"] == (
            f"thresholds.version: expected an integer from 1 to {thresholds_doc.MAX_VERSION} (2**53-1: the next "
            f"version must stay within what every client's JSON parser reads exactly), got {version}"
        ), refused
        assert ask(daemon, {"cmd": "status"})["thresholds_version"] == 1
    assert on_disk(daemon).version == 1


def test_a_bundle_at_the_highest_version_loads_and_what_would_follow_it_is_refused_in_one_line(tmp_path):
    """A version at the cap, on disk from before it, still loads at start; a rollback, which would go past it, is
    refused in one line, and status answers after it; a reload of a copy of the bundle at a lower version keeps that
    version's number (said in the reply) rather than writing one past the cap, which the next start would refuse."""
    from engines.bundle.store import load_bundle
    from inspectd.daemon.service import Daemon

    top = thresholds_doc.MAX_VERSION
    bundle = write_grey_bundle(tmp_path / "bundle")
    loaded = load_bundle(bundle)
    below = thresholds_doc.next_version(loaded.thresholds(), image_threshold=0.45)
    at_top = dataclasses.replace(thresholds_doc.next_version(below, image_threshold=0.4), version=top)
    loaded.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(at_top))
    source = {"kind": "synthetic", "rate_hz": 20, "width": 64, "height": 64}
    running = Daemon(in_process_config(tmp_path, bundle, source))
    running.start()
    try:
        assert ask(running, {"cmd": "status"})["thresholds_version"] == top
        refused = ask(running, {"cmd": "rollback", "version": 2})
        assert refused["ok"] is False and "\n" not in refused["error"], refused
        assert refused["error"].startswith(
            f"thresholds.version: {top} is the highest a version may be, so no version can follow it: "
        ), refused
        assert ask(running, {"cmd": "status"})["thresholds_version"] == top
        assert on_disk(running).version == top
        write_grey_bundle(bundle)  # the bundle copied over again: version 1 of the same model
        with structlog.testing.capture_logs():
            reply = running.reload()
        assert reply["thresholds_version"] == 1 and "thresholds_renumbered" not in reply, reply
        assert reply["thresholds_version_went_back"]["previous_version"] == top, reply
        assert on_disk(running).version == 1
        assert ask(running, {"cmd": "status"})["thresholds_version"] == 1
    finally:
        running.shutdown()


def test_a_bundle_set_past_the_cap_before_it_existed_still_loads_and_runs(tmp_path):
    """ctl set-thresholds took any version of up to 20 digits before the cap: a station left at 10**17 refused its
    own bundle at the next start, and no command could load it to put it right."""
    from engines.bundle.store import load_bundle
    from inspectd.daemon.service import Daemon

    bundle = write_grey_bundle(tmp_path / "bundle")
    loaded = load_bundle(bundle)
    doc = {**thresholds_doc.next_version(loaded.thresholds(), image_threshold=0.45).to_dict(), "version": 10**17}
    loaded.replace_file(thresholds_doc.FILE_NAME, json.dumps(doc).encode())
    assert load_bundle(bundle).thresholds().version == 10**17
    running = Daemon(
        in_process_config(tmp_path, bundle, {"kind": "synthetic", "rate_hz": 20, "width": 64, "height": 64})
    )
    running.start()
    try:
        assert ask(running, {"cmd": "status"})["thresholds_version"] == 10**17
    finally:
        running.shutdown()
    doc["version"] = 2**63  # past the archive's SQLite integers
    loaded.replace_file(thresholds_doc.FILE_NAME, json.dumps(doc).encode())
    refused = r"version: expected an integer from 1 to 9223372036854775807 \(the archive's 64-bit integers\), got"
    with pytest.raises(BundleError, match=refused):
        load_bundle(bundle).thresholds()


def test_rolling_back_to_the_version_in_use_says_so(daemon):
    """`ctl rollback 3` while version 3 runs said "no version 3 in history": the operator had just read version 3 in
    `ctl status`."""
    set_own_versions(daemon)
    refused = ask(daemon, {"cmd": "rollback", "version": 3})
    assert refused == {
        "ok": False,
        "error": "thresholds: version 3 is the one in use, nothing to roll back: expected an earlier version "
        "(known: 2, 1)",
    }, refused
    assert on_disk(daemon).version == 3
