"""calibrate and teach refuse what they cannot do in one line, before the work it would waste: teach's arguments
(a lone CurveZMQ key, a rate outside (0, 1)) before it reads a frame, --apply's endpoint, timeout and key files
before either reads a frame, calibrate's unwritable bundle before it scores an image, and scores of NaN or infinity
(named by image) before they count or reach thresholds.json. teach --apply fails, as `ctl reload` does, when the
daemon's reload kept an old allow-list.

The bundles are tiny (tests/test_bundle_writes.make, a stand-in graph): every refusal here comes before anything
would run it, which is the point; the old order failed on the graph, or later."""

from __future__ import annotations

import argparse
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibration import calibrate, teach
from engines.bundle import thresholds as T
from engines.bundle.store import load_bundle
from other_user import as_nobody
from ports import free_port
from test_bundle_writes import make

pytestmark = [pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[1]


def frames(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 100 + i, np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def teach_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    teach.add_arguments(parser)
    return parser.parse_args(list(argv))


# What ControlClient would refuse only when --apply runs, after the work: each is refused before it instead.
BAD_APPLY = [
    *(
        (["--apply", "ipc:///nowhere.sock", "--timeout", text], f"--timeout {shown}: expected a finite number")
        for text, shown in (("nan", "nan"), ("inf", "inf"), ("1e7", "10000000.0"))
    ),
    (["--apply", "nowhere.sock"], "--apply: expected a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)"),
    # libzmq cuts the port to 16 bits: the version was written, then applied to whatever listened on port 4464.
    (
        ["--apply", "tcp://127.0.0.1:70000"],
        "--apply: expected tcp://HOST:PORT, PORT the daemon's port, a number from 1 to 65535",
    ),
    (["--apply", "tcp://10.1.2.3:5555"], "--apply tcp://10.1.2.3:5555: a network address, expected --server-key"),
    (
        ["--apply", "ipc:///nowhere.sock", "--server-key", "missing.key", "--client-key", "missing.key_secret"],
        "server public key missing.key: cannot load",
    ),
]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--apply", "ipc:///nowhere.sock", "--server-key", "server.key"],
            "--server-key and --client-key: expected both",
        ),
        (["--server-key", "s.key", "--client-key", "c.key_secret"], "--server-key/--client-key are for --apply"),
        (["--target-false-reject", "2"], "--target-false-reject 2.0: expected a fraction strictly between 0 and 1"),
        (["--pixel-fpr", "0"], "--pixel-fpr 0.0: expected a fraction strictly between 0 and 1"),
        # An unset $CAM in a script: taken as no --camera, every camera's frames.
        (["--camera", ""], "--camera '': expected a camera id"),
        (["--camera", " "], "--camera ' ': expected a camera id"),
        (["--camera", "cam 0"], "--camera: expected a camera id ([a-zA-Z0-9_-]+, at most 64 characters"),
        *BAD_APPLY,
    ],
)
def test_teach_refuses_bad_arguments_before_any_work(tmp_path, capsys, extra, expected):
    bundle = make(tmp_path / "b")
    # No frames at all: any work (reading the folder, the bundle's graph) would fail otherwise first.
    code = teach.run(teach_args(str(bundle), "--good", str(tmp_path / "missing"), *extra))
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert load_bundle(bundle).manifest.get("bundle_version", 1) == 1
    assert not (tmp_path / "b.versions").exists()


def as_another_user(locked: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`inspectd ARGV` as a user who may not write in `locked` (nobody, when this is root; else `locked` is 0555)."""
    locked.chmod(0o555)
    try:
        return subprocess.run(
            as_nobody([sys.executable, "-m", "inspectd", *argv]), capture_output=True, text=True, cwd=REPO, timeout=60
        )
    finally:
        locked.chmod(0o755)


def test_calibrate_refuses_an_unwritable_bundle_before_scoring(open_tmp_path):
    shared = open_tmp_path / "shared"
    shared.mkdir()
    bundle = make(shared / "b")
    good = frames(shared / "good")
    out = as_another_user(bundle, ["calibrate", str(bundle), "--good", str(good)])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bundle}: not writable by " in lines[0] and "Permission denied" in lines[0], lines
    assert "images scored" not in out.stderr and load_bundle(bundle).thresholds().version == 1


def test_teach_refuses_a_folder_it_cannot_write_the_new_version_in_before_any_work(open_tmp_path):
    shared = open_tmp_path / "shared"
    shared.mkdir()
    bundle = make(shared / "b")
    good = frames(open_tmp_path / "good")
    out = as_another_user(shared, ["teach", str(bundle), "--good", str(good)])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{shared}: not writable by " in lines[0] and "run teach as" in lines[0], lines


def test_teach_rollback_refuses_a_directory_it_cannot_write_the_restored_thresholds_in_with_nothing_changed(
    open_tmp_path,
):
    """The linked layout, the directory taught from kept pristine (root's, or a read-only mount): rollback rewrites
    that directory's thresholds (a version above the taught one's), so it is refused before anything is written or
    the link moves, in one line saying what else to do."""
    from engines.bundle.store import write_bundle

    bundles = open_tmp_path / "bundles"
    bundles.mkdir()
    before = load_bundle(make(bundles / "frozen-a"))
    taught = {
        **{k: before.manifest[k] for k in ("method", "backbone", "input", "scorer_inputs")},
        "bundle_version": 2,
        "teach": {"previous_dir": "frozen-a", "previous_version": 1, "previous_model_id": before.model_id},
    }
    params = {"memory_bank": np.random.default_rng(1).normal(size=(4, 2)).astype(np.float32)}
    weights = {"w": np.zeros(2, np.float32)}
    write_bundle(bundles / "frozen-a-v2", taught, b"stand-in graph", params, weights, before.thresholds())
    (bundles / "current").symlink_to("frozen-a-v2")
    manifest = (bundles / "frozen-a" / "manifest.json").read_bytes()
    out = as_another_user(bundles / "frozen-a", ["teach", str(bundles / "current"), "--rollback"])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bundles / 'frozen-a'}: not writable by " in lines[0], lines
    assert f"nothing changed (or point the link back at {bundles / 'frozen-a'} by hand" in lines[0], lines
    assert os.readlink(bundles / "current") == "frozen-a-v2"
    assert (bundles / "frozen-a" / "manifest.json").read_bytes() == manifest


def scored(defect: list[float]) -> calibrate._Scored:
    good = np.linspace(0.1, 0.5, 50)
    return calibrate._Scored(
        good,
        np.asarray(defect),
        None,
        False,
        np.full(50, 100.0),
        [Path(f"good/{i:03d}.png") for i in range(50)],
        [Path(f"defect/{i:03d}.png") for i in range(len(defect))],
    )


def choose_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"target_false_reject": 0.01, "target_escape": None, "max_f1": False, **kw})


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_defective_image_scored_nan_or_inf_is_refused_by_name(value):
    """With the false-reject target the defect scores set nothing, yet a NaN one was counted as an escape."""
    with pytest.raises(calibrate.CalibrationError) as refused:
        calibrate._choose(choose_args(), scored([0.9, value, 0.7]), io.StringIO())
    message = str(refused.value)
    assert "--defective: 1 image(s) scored NaN or infinity (defect/001.png)" in message and "\n" not in message


def test_an_escape_target_too_few_defects_can_support_is_warned_of_and_recorded():
    """Once the lowest of 5 crack scores was taken for a 1 % escape rate, silently: 0 escapes in 5 bound it at 45 %."""
    args = choose_args(target_false_reject=None, target_escape=0.01)
    out = io.StringIO()
    image, _, chosen = calibrate._choose(args, scored([0.9, 0.8, 0.95, 0.85, 0.7]), out)
    assert image == 0.7
    lines = out.getvalue().splitlines()
    warning = [line for line in lines if line.startswith("WARNING")]
    assert warning == [
        "WARNING: 5 defective frames support an escape rate of at most 0.4507 (95% upper bound), not the target "
        "0.01; the target needs >= 299 defective frames with none escaping"
    ], lines
    assert chosen["observed"]["warning"] == "too few defective frames for the target"
    assert chosen["observed"]["escape_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 5))

    # Enough defects: the threshold lets none of 400 pass (one would bound the rate above 1 %), and no warning.
    out = io.StringIO()
    defects = list(np.linspace(0.6, 1.0, 400))
    image, _, chosen = calibrate._choose(args, scored(defects), out)
    assert image == 0.6 and "WARNING" not in out.getvalue() and "warning" not in chosen["observed"]
    assert chosen["observed"]["escape_observed"] == 0 and chosen["observed"]["escape_upper_95"] <= 0.01
    assert "observed 0/400, 95% upper bound 0.007461" in out.getvalue()


def unreadable(folder: Path, listable: bool) -> int:
    """The mode that keeps `folder` from the user as_nobody runs as: no access at all, or (listable=False) entry to
    known names yet no listing. As root, nobody is neither owner nor group; as another user, this user is the owner."""
    if listable:
        return 0o711 if os.geteuid() == 0 else 0o111
    return 0o700 if os.geteuid() == 0 else 0o000


@pytest.mark.parametrize(
    ("flag", "listable"), [("--good", False), ("--good", True), ("--defective", False), ("--defective", True)]
)
def test_calibrate_names_a_folder_it_cannot_read_in_one_line(open_tmp_path, flag, listable):
    """As `sudo -u inspectd calibrate --good /srv/heldout/good` on the operator's 0700 folder: a PermissionError
    traceback, once (from pathlib's is_dir() on its test/good, or from listing it)."""
    shared = open_tmp_path / "shared"
    shared.mkdir()
    bundle = make(shared / "b")
    good = frames(shared / "good")
    locked = frames(shared / "locked")
    argv = ["calibrate", str(bundle), "--good", str(locked if flag == "--good" else good)]
    if flag == "--defective":
        argv += ["--defective", str(locked), "--target-escape", "0.1"]
    bundle.chmod(0o777)  # the service user may write the bundle: the folder is what it cannot read
    locked.chmod(unreadable(locked, listable))
    try:
        out = subprocess.run(
            as_nobody([sys.executable, "-m", "inspectd", *argv]), capture_output=True, text=True, cwd=REPO, timeout=60
        )
    finally:
        locked.chmod(0o755)
        bundle.chmod(0o755)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [f"inspectd calibrate: {locked}: cannot read (Permission denied)"], lines
    assert "images scored" not in out.stderr and load_bundle(bundle).thresholds().version == 1


def test_thresholds_never_carry_nan():
    document = T.next_version(
        T.first_version(1.0, 0.5, {}), provenance={T.IMAGE_SCORES: {"n": 3, "min": math.nan, "max": 0.9}}
    )
    with pytest.raises(T.ThresholdsError, match="expected finite numbers"):
        T.dumps(document)


class StatusOnly:
    """The control handler's status contract, as far as calibrate --apply asks it before scoring."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def status(self):
        return {"model_id": self.model_id, "thresholds_version": 1, "cameras": {"cam0": {}, "cam1": {}}}


def calibrate_against(tmp_path, capsys, handler, *extra: str) -> tuple[int, str, Path]:

    from inspectd.cli import main
    from inspectd.daemon.control import ControlServer

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bundle = make(tmp_path / "b")
    handler.model_id = handler.model_id or load_bundle(bundle).model_id
    server = ControlServer(endpoint, handler)
    server.start()
    try:
        code = main(["calibrate", str(bundle), "--good", str(frames(tmp_path / "good")), "--apply", endpoint, *extra])
    finally:
        server.stop()
    return code, capsys.readouterr().err, bundle


@pytest.mark.parametrize(("extra", "expected"), BAD_APPLY)
def test_calibrate_refuses_a_bad_apply_before_scoring(tmp_path, capsys, extra, expected):
    """Once taken for a daemon that does not answer: minutes of scoring, then a version written and not applied."""
    from inspectd.cli import main

    bundle = make(tmp_path / "b")
    code = main(["calibrate", str(bundle), "--good", str(frames(tmp_path / "good")), *extra])
    captured = capsys.readouterr()
    assert code == 2 and expected in captured.err and captured.err.count("\n") == 1, captured.err
    assert "scored" not in captured.out and load_bundle(bundle).thresholds().version == 1


@pytest.mark.parametrize("camera", ["cam 0", "cam0 ", "x" * 65, "live"])
def test_calibrate_refuses_a_camera_id_no_camera_can_have_before_scoring(tmp_path, capsys, camera):
    """Written into per_camera, such an id ('cam 0' pasted with its space) was an override the daemon never applied,
    while the operator took that camera for calibrated."""
    from inspectd.cli import main

    bundle = make(tmp_path / "b")
    code = main(["calibrate", str(bundle), "--good", str(frames(tmp_path / "good")), "--camera", camera])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("inspectd calibrate: --camera: "), captured.err
    assert "expected a camera id" in captured.err or "expected another camera id" in captured.err, captured.err
    assert camera[:20] in captured.err and captured.err.count("\n") == 1 and "scored" not in captured.out
    assert load_bundle(bundle).thresholds().version == 1


class Reloads:
    """The control handler's reload contract: the model reloaded, and what became of each allow-list."""

    def __init__(self, allow_lists: dict) -> None:
        self.allow_lists = allow_lists

    def reload(self):
        return {"model_id": "frozen-lite0-0000beef", "thresholds_version": 1, "allow_lists": self.allow_lists}


@pytest.mark.parametrize(
    ("allow_lists", "code"),
    [({"control": {"added": [], "removed": []}}, 0), ({"control": {"error": "colleague.key: not a key"}}, 1)],
)
def test_teach_apply_fails_when_the_reload_kept_an_old_allow_list(tmp_path, capsys, allow_lists, code):
    """As `inspectd ctl reload`: the model is reloaded, yet a key meant to be revoked may still get in."""
    from inspectd.daemon.control import ControlServer
    from inspectd.protocol.control import client_for

    endpoint = f"ipc://{tmp_path}/control.sock"
    server = ControlServer(endpoint, Reloads(allow_lists))
    server.start()
    try:
        assert teach._apply(endpoint, client_for(endpoint, 5.0)) == code
    finally:
        server.stop()
    captured = capsys.readouterr()
    assert "now runs frozen-lite0-0000beef" in captured.out
    if code:
        assert captured.err.count("\n") == 1, captured.err
        assert "allow-list control not reloaded, the previous one stays: colleague.key: not a key" in captured.err
    else:
        assert captured.err == ""


@pytest.mark.parametrize("dry_run", [(), ("--dry-run",)], ids=["apply", "dry-run"])
def test_calibrate_refuses_a_camera_the_daemon_does_not_run_before_scoring(tmp_path, capsys, dry_run):
    """A dry run with --apply asks the daemon too (a status request writes nothing): it once said the id was not
    checked, told the operator to give --apply, which they had, and let a camera the daemon does not run through."""
    code, err, bundle = calibrate_against(tmp_path, capsys, StatusOnly(""), "--camera", "cam9", *dry_run)
    assert code == 2 and "--camera cam9: the daemon at" in err and "expected one of cam0, cam1" in err, err
    assert err.count("\n") == 1 and load_bundle(bundle).thresholds().version == 1


def test_calibrate_refuses_a_bundle_of_another_model_than_the_daemons_before_scoring(tmp_path, capsys):
    code, err, bundle = calibrate_against(tmp_path, capsys, StatusOnly("frozen-lite0-0000beef"))
    assert code == 2 and "the daemon runs model frozen-lite0-0000beef" in err, err
    assert err.count("\n") == 1 and load_bundle(bundle).thresholds().version == 1


class Refuses:
    """A daemon that answers every request with a refusal, as it does a key its allow-list no longer holds."""

    model_id = ""

    def status(self):
        from inspectd.errors import InspectdError

        raise InspectdError("client key not in the allow-list")


def test_calibrate_stops_before_scoring_when_the_daemon_refuses_its_status(tmp_path, capsys):
    code, err, bundle = calibrate_against(tmp_path, capsys, Refuses())
    assert code == 2 and "the daemon refused: client key not in the allow-list" in err, err
    assert err.count("\n") == 1 and load_bundle(bundle).thresholds().version == 1


@pytest.mark.parametrize(
    "extra",
    [
        ["--target-false-reject", "0.01", "--pixel-fpr", "7"],
        ["--target-escape", "0.1"],
        ["--max-f1"],
        ["--pixel-fpr", "0.01"],
        ["--precision", "fp16"],
    ],
    ids=lambda extra: extra[0],
)
def test_calibrate_rollback_refuses_flags_that_choose_new_thresholds(tmp_path, capsys, extra):
    """A rollback restores an earlier version's values, so a target given with it would be ignored: refused in one
    line naming the flags, as --good is (the old code exited 0, an invalid --pixel-fpr 7 included)."""
    from inspectd.cli import main

    bundle = make(tmp_path / "b")
    earlier = load_bundle(bundle)
    earlier.replace_file(T.FILE_NAME, T.dumps(T.next_version(earlier.thresholds(), image_threshold=0.9)))
    code = main(["calibrate", str(bundle), "--rollback", "1", "--dry-run", *extra])
    err = capsys.readouterr().err
    flags = ", ".join(flag for flag in extra if flag.startswith("--"))
    assert code == 2 and err.count("\n") == 1, err
    assert f"--rollback restores an earlier version as a whole: {flags} given, expected none of" in err, err


def test_teach_refuses_an_empty_camera_with_archive_before_reading_it(tmp_path, capsys):
    bundle = make(tmp_path / "b")
    code = teach.run(teach_args(str(bundle), "--archive", str(tmp_path / "none"), "--since", "8h", "--camera", ""))
    err = capsys.readouterr().err
    assert code == 2 and err == "inspectd teach: --camera '': expected a camera id\n", err


def taught_document(bundle: Path) -> T.Thresholds:
    """Versions 1 (train's), 2 (a teach's: set on the refitted scorer) and 3 (a calibrate on it) in `bundle`."""
    loaded = load_bundle(bundle)
    taught = T.next_version(loaded.thresholds(), image_threshold=2.0, provenance={"tool": "inspectd teach 0.1"})
    latest = T.next_version(taught, image_threshold=2.5, provenance={"tool": "inspectd calibrate 0.1"})
    loaded.replace_file(T.FILE_NAME, T.dumps(latest))
    return latest


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("-1", "thresholds: version -1: expected a version number >= 1"),
        ("0", "thresholds: version 0: expected a version number >= 1"),
        (
            "3",
            "thresholds: version 3 is the one in use, nothing to roll back: expected an earlier version (known: 2, 1)",
        ),
        ("9", "thresholds: no version 9 in history (known: 2, 1)"),
        ("1", "thresholds: version 1 was set on the scores of the scorer `inspectd teach` replaced at version 2"),
    ],
)
def test_calibrate_rollback_on_a_taught_bundle_says_which_versions_do_not_exist(tmp_path, capsys, version, expected):
    """Below a teach, -1, 0 or a version never written were each told they were set on the replaced scorer's
    scores, pointing at teach --rollback: a version that does not exist is said to be none."""
    from inspectd.cli import main

    bundle = make(tmp_path / "b")
    taught_document(bundle)
    code = main(["calibrate", str(bundle), "--rollback", version])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"inspectd calibrate: {expected}"), err
    assert load_bundle(bundle).thresholds().version == 3
    code = main(["calibrate", str(bundle), "--rollback", "2"])
    assert code == 0 and load_bundle(bundle).thresholds().image_threshold == 2.0


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--precision", "fp16"],
            "engine.options.precision: 'fp16' but {bundle} has no FP16 graph for its current model.onnx",
        ),
        (["--backend", "torch", "--precision", "fp16"], "--precision fp16: the torch backend computes in fp32 only"),
        (["--precision", "int8"], "engine.options.precision: expected one of fp32|fp16, got 'int8'"),
    ],
    ids=["no-fp16-graph", "torch", "int8-on-onnxruntime"],
)
def test_calibrate_refuses_a_precision_the_engine_cannot_score_in_before_scoring(tmp_path, capsys, extra, expected):
    """--precision is the engine option the daemon's engine runs with, so thresholds can be set on its own scores
    (provenance engine_precision); one it cannot have is refused in one line before any image is scored (the
    stand-in graph would fail then)."""
    from inspectd.cli import main

    bundle = make(tmp_path / "b")
    code = main(["calibrate", str(bundle), "--good", str(frames(tmp_path / "good")), *extra])
    err = capsys.readouterr().err
    assert code == 2 and expected.format(bundle=bundle) in err and err.count("\n") == 1, err
    assert load_bundle(bundle).thresholds().version == 1


def test_calibrate_refuses_one_cameras_override_on_another_precision_than_the_document(tmp_path, capsys):
    """A document's provenance names one engine precision for every threshold in it: an override calibrated on
    fp32 scores inside a document set on fp16 ones would be judged as fp16 by the daemon's check."""
    from inspectd.cli import main

    bundle = make(tmp_path / "b")
    loaded = load_bundle(bundle)
    on_fp16 = T.next_version(loaded.thresholds(), provenance={"engine_precision": "fp16"})
    loaded.replace_file(T.FILE_NAME, T.dumps(on_fp16))
    code = main(["calibrate", str(bundle), "--good", str(frames(tmp_path / "good")), "--camera", "cam0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert (
        "--camera cam0 on fp32 scores: thresholds version 2 were set on fp16 scores, expected --precision fp16" in err
    )


def test_a_drift_reference_too_small_to_arm_is_warned_of_with_the_frames_it_needs():
    assert T.reference_warning(T.MIN_REFERENCE, "good images") is None
    warning = T.reference_warning(6, "good images")
    assert warning is not None and warning.startswith("WARNING: 6 good images are too few") and ">= 8" in warning
    assert "\n" not in warning


def test_calibrate_on_tensorrt_without_precision_names_the_precision_of_the_plans_the_bundle_has(tmp_path, capsys):
    """--backend tensorrt without --precision scores on an fp32 plan only. With only an fp16 plan in the bundle, the
    engine said to build an fp32 one, once it opened: refused before it in one line that offers --precision fp16,
    the plan the daemon likely runs."""
    from engines.bundle.plans import PlanInfo, plan_name, sidecar_name
    from inspectd.cli import main

    bundle = make(tmp_path / "b")
    good = frames(tmp_path / "good")
    loaded = load_bundle(bundle)
    for precision in ("fp16", "int8"):
        info = PlanInfo(
            "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", precision, 8, 8, loaded.manifest["files"]["model.onnx"]
        )
        name = plan_name(info.gpu_name, info.tensorrt_version, info.max_batch, precision)
        loaded.replace_file(name, b"stand-in plan", add=True)
        loaded = load_bundle(bundle)
        loaded.replace_file(sidecar_name(name), info.to_json().encode(), add=True)
        loaded = load_bundle(bundle)
    code = main(["calibrate", str(bundle), "--good", str(good), "--backend", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert (
        f"--backend tensorrt without --precision scores on an fp32 plan, and {bundle} has only fp16, int8 plans: give "
        "--precision fp16 or --precision int8 to set thresholds on that plan's scores" in err
    ), err
    assert f"or build an fp32 plan with `inspectd build-engine {bundle}`" in err
    # With --precision the plan is the engine's to open (here: no TensorRT, or a stand-in plan), not refused for this.
    code = main(["calibrate", str(bundle), "--good", str(good), "--backend", "tensorrt", "--precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and "without --precision" not in err, err
    assert load_bundle(bundle).thresholds().version == 1


class TakesThresholds(StatusOnly):
    """status, and set_thresholds that takes every document and keeps it."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id)
        self.taken: list[dict] = []

    def set_thresholds(self, doc, force=False):
        self.taken.append(doc)
        return {"thresholds_version": doc["version"]}


def test_apply_of_a_threshold_that_rejects_most_good_frames_neither_writes_nor_applies_it(tmp_path, capsys):
    """Copies of the good frames given as --defective: --max-f1 picks the lowest score, which rejects every good
    frame. Applied, the line would reject every part. Once it was not sent but written into the daemon's bundle, so
    the daemon's next reload or restart put it in service: now nothing is written, calibrate exits 1, and the one
    line says how to write it deliberately; run that way, it is written with its WARNING."""
    import cv2

    from inspectd.cli import main
    from inspectd.daemon.control import ControlServer
    from station_model import good_frame, write_grey_bundle

    bundle = write_grey_bundle(tmp_path / "grey")
    before = (bundle / "thresholds.json").read_bytes()
    good = tmp_path / "good"
    good.mkdir()
    for i in range(30):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    copies = tmp_path / "copies"
    copies.mkdir()
    for path in good.iterdir():  # the same pixels in other bytes: a byte copy of a good frame is refused as one
        cv2.imwrite(str(copies / path.name), cv2.imread(str(path)), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = TakesThresholds(load_bundle(bundle).model_id)
    server = ControlServer(endpoint, daemon)
    server.start()
    flags = ["calibrate", str(bundle), "--good", str(good), "--defective", str(copies), "--max-f1"]
    try:
        code = main([*flags, "--apply", endpoint])
    finally:
        server.stop()
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert daemon.taken == []
    assert (bundle / "thresholds.json").read_bytes() == before
    assert "WARNING: image threshold " in captured.out and "wrote thresholds version" not in captured.out
    lines = [line for line in captured.err.splitlines() if "images scored" not in line]
    assert lines == [
        f"inspectd calibrate: --apply {endpoint}: version 2 not written, not applied: its image threshold rejects "
        "most good frames; to put it in service deliberately, run this calibrate again without --apply (it writes "
        f"the version with its WARNING), then `inspectd ctl --endpoint {endpoint} reload`"
    ], lines

    assert main(flags) == 0
    written = load_bundle(bundle).thresholds()
    assert written.version == 2 and "rejects 30 of 30 good frames" in written.provenance["observed"]["warning"]


@pytest.mark.parametrize(
    ("dry_run", "where"), [(True, "tcp"), (False, "tcp"), (True, "ipc")], ids=["dry-run", "apply", "no-socket-file"]
)
def test_calibrate_says_when_the_daemon_at_apply_did_not_answer_and_so_checked_nothing(
    tmp_path, capsys, dry_run, where
):
    """`--apply EP --dry-run` is how an operator checks the model and camera before a long run; with nothing
    answering at EP it printed a clean dry run, exit 0, and a real run ended on `wrote thresholds version 2` without
    saying it was not in service. The line is ctl's for the same silence: at an ipc:// path without a socket file
    it says so, where calibrate's own line dropped it and a mistyped path read as a daemon that is slow."""
    import cv2

    from inspectd.cli import main
    from station_model import good_frame, write_grey_bundle

    bundle = write_grey_bundle(tmp_path / "grey")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(12):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    # Nothing listens there.
    endpoint = f"tcp://127.0.0.1:{free_port()}" if where == "tcp" else f"ipc://{tmp_path}/nope.sock"
    flags = ["calibrate", str(bundle), "--good", str(good), "--target-false-reject", "0.3"]
    code = main([*flags, "--apply", endpoint, "--timeout", "0.5", *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    then = (
        "a dry run checks nothing more"
        if dry_run
        else "the version is still written, and goes into service at the daemon's next reload or start"
    )
    assert lines[0].startswith(f"WARNING: control {endpoint}: no reply within 0.5 s to 'status'"), captured.out
    why = f": no socket file {tmp_path}/nope.sock, so no daemon is bound there" if where == "ipc" else ""
    assert lines[0].endswith(
        f", expected a running inspectd{why}; the model the daemon runs and the cameras of the overrides were not "
        f"checked; {then}"
    ), captured.out
    assert lines[1].startswith("image threshold "), captured.out  # said before scoring
    if dry_run:
        assert code == 0 and lines[-1] == "dry run: version 2 not written, not applied", captured.out
        # With --camera, the camera's line does not ask for the --apply that was given.
        main([*flags, "--apply", endpoint, "--timeout", "0.5", "--dry-run", "--camera", "cam7"])
        said = [line for line in capsys.readouterr().out.splitlines() if "--camera cam7 was not checked" in line]
        assert len(said) == 1 and "give --apply" not in said[0], said
        assert said[0].endswith("so reload it once it runs and watch its thresholds_unknown_cameras line"), said
        return
    assert code == 1 and "wrote thresholds version 2 (was 1)" in lines[-1], captured.out
    assert captured.err.splitlines()[-1] == (
        f"inspectd calibrate: version 2 not applied: it goes into service at the daemon's next reload "
        f"(`inspectd ctl --endpoint {endpoint} reload`, or systemctl reload) or start"
    ), captured.err


def test_calibrate_rollback_names_an_override_id_stdout_cannot_encode_escaped(tmp_path):
    """`ctl set-thresholds --force` stores any per_camera key, a lone surrogate from a JSON escape too; `calibrate
    --rollback` to that version printed its first line, then ended in "'utf-8' codec can't encode character" (exit 2)
    under a stdout that escapes only undecodable bytes (a C locale's), naming neither the camera nor the file."""
    bundle = make(tmp_path / "b")
    loaded = load_bundle(bundle)
    odd = T.next_version(loaded.thresholds(), per_camera={"cam\ud800": {"image_threshold": 0.4}})
    loaded.replace_file(T.FILE_NAME, T.dumps(T.next_version(odd, per_camera={})))
    said = subprocess.run(
        [sys.executable, "-m", "inspectd", "calibrate", str(bundle), "--rollback", "2", "--dry-run"],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"},
    )
    assert said.returncode == 0, said.stderr
    lines = said.stdout.decode().splitlines()
    assert lines[1:] == [
        "camera 'cam\\ud800': override restored: image 0.4, pixel global",
        "dry run: version 4 not written, not applied",
    ], lines


def write_float_tiff(path: Path, shape: tuple[int, int]) -> None:
    import cv2

    assert cv2.imwrite(str(path), np.full(shape, 0.5, np.float32))
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.float32


@pytest.mark.parametrize("depth", [8, 16])
def test_calibrate_names_a_float_tiff_among_the_good_frames_by_its_pixels(tmp_path, capsys, depth):
    """A float32 TIFF decodes and is refused for its pixels. Among 8-bit frames it was said to "not decode", which
    sends the operator looking for a damaged file; among 16-bit frames it counted as 8-bit, and the set was refused
    as mixing "8-bit pixels" (the TIFF) with 16-bit ones."""
    import cv2

    from inspectd.cli import main
    from station_model import good_frame, write_grey_bundle

    bundle = write_grey_bundle(tmp_path / "grey")
    good = tmp_path / "good"
    good.mkdir()
    for i in range(12):
        frame = good_frame(i)
        cv2.imwrite(str(good / f"{i:03d}.png"), frame if depth == 8 else frame.astype(np.uint16) * 257)
    write_float_tiff(good / "f.tiff", good_frame(0).shape[:2])
    code = main(["calibrate", str(bundle), "--good", str(good), "--target-false-reject", "0.3", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (
        f"WARNING: skipped 1 image(s) that decode to pixels the model cannot take: {good / 'f.tiff'}: dtype float32, "
        "expected unsigned 8- or 16-bit pixels (uint8 or uint16)"
    ) in captured.out.splitlines(), captured.out
    assert "do not decode" not in captured.out and "8-bit pixels" not in captured.err, captured


def test_calibrate_apply_answered_in_a_reply_it_cannot_read_writes_nothing_and_says_it_may_be_applied(tmp_path, capsys):
    """A daemon that answers set_thresholds took the version, and may have applied it and written it into its bundle;
    a reply calibrate could not read was told as a daemon never reached ("not applied"), and calibrate wrote the
    version into the bundle itself."""
    import cv2

    from inspectd.cli import main
    from inspectd.daemon.control import ControlServer
    from station_model import good_frame, write_grey_bundle

    class AnswersUnreadably(StatusOnly):
        def set_thresholds(self, doc, force=False):
            return {"thresholds_version": 10**20}  # 21 digits: past every client's parser

    bundle = write_grey_bundle(tmp_path / "grey")
    before = (bundle / "thresholds.json").read_bytes()
    good = tmp_path / "good"
    good.mkdir()
    for i in range(12):
        cv2.imwrite(str(good / f"{i:03d}.png"), good_frame(i))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = ControlServer(endpoint, AnswersUnreadably(load_bundle(bundle).model_id))
    server.start()
    try:
        code = main(
            ["calibrate", str(bundle), "--good", str(good), "--target-false-reject", "0.3", "--apply", endpoint]
        )
    finally:
        server.stop()
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "images scored" not in line]
    assert code == 1 and (bundle / "thresholds.json").read_bytes() == before, captured.err
    assert lines == [
        f"inspectd calibrate: --apply {endpoint}: control {endpoint}: reply: not JSON (an integer of 21 digits, "
        'expected at most 20), expected {"ok": ...}: the daemon answered in a reply calibrate cannot read, so '
        "version 2 may have been applied",
        f"inspectd calibrate: version 2 not written to {bundle} by calibrate: the daemon writes it when it accepts it "
        f"(`inspectd ctl --endpoint {endpoint} status` shows its thresholds_version)",
    ], lines
