"""`inspectd teach`: the scorer refitted on the station (ONNX Runtime features, numpy fit) matches `inspectd train`'s
fit of the same recipe on the same frames, for every scorer; the new version keeps the graph and carries provenance,
recalibrated thresholds and the comparison; rollback puts the previous version back; a bundle without the feature
graph gets one line; teaching straight from a real daemon's image archive fits what teaching on its export fits."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon_harness import free_port
from engines.bundle.format import FEATURE_GRAPH, GRAPH, MANIFEST, WEIGHTS
from engines.bundle.store import load_bundle
from engines.data.synthline import SyntheticLine
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
SIZE = 64
HOLDOUT = 0.25
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    SyntheticLine(96, 96, seed=3).write_folder(folder, 16)
    return folder


@pytest.fixture(scope="module", params=["memory", "gaussian", "kmeans"])
def trained(request, good, tmp_path_factory) -> Path:
    from engines.training.train import Progress, train_bundle

    out = tmp_path_factory.mktemp("bundles") / request.param
    # memory_size below the patch count (12 frames x 4x4 locations), so the coreset selection itself is compared.
    train_bundle(
        good,
        out,
        size=(SIZE, SIZE),
        scorer=request.param,
        k=2,
        memory_size=40,
        seed=5,
        holdout=HOLDOUT,
        progress=Progress(enabled=False),
    )
    return out


def args(bundle: Path, **kw) -> argparse.Namespace:
    base = dict(
        bundle=str(bundle),
        good=None,
        archive=None,
        since=None,
        until=None,
        camera=None,
        rollback=False,
        holdout=HOLDOUT,
        by="tester",
        target_false_reject=None,
        pixel_fpr=None,
        apply=None,
        timeout=5.0,
        server_key=None,
        client_key=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_teach_matches_train_and_rolls_back(trained, good, tmp_path):
    from calibration.teach import teach, versions_dir

    before = load_bundle(trained)
    trained_params = before.scorer_params()
    before_version = before.thresholds().version
    out = io.StringIO()
    taught = teach(trained, good, holdout=HOLDOUT, by="tester", out=out)

    # Same recipe, same frames, same seed: the same parameters to float tolerance (ONNX Runtime's features differ
    # from torch's by ~1e-6 relative), and the same verdicts on the held-out frames.
    params = taught.scorer_params()
    assert params.keys() == trained_params.keys()
    for name, value in params.items():
        assert value.shape == trained_params[name].shape, name
        np.testing.assert_allclose(value, trained_params[name], rtol=2e-3, atol=2e-4 * float(np.abs(value).max()))
    record = taught.manifest["teach"]
    comparison = record["comparison"]
    assert comparison["frames"] == 4 and record["frames"]["n_fit"] == 12 and record["by"] == "tester"
    assert comparison["current"]["score_median"] == pytest.approx(comparison["taught"]["score_median"], rel=1e-3)
    assert taught.manifest["bundle_version"] == 2 and record["previous_model_id"] == before.model_id

    # The graph and weights are carried over byte for byte: nothing was rebuilt.
    for name in (GRAPH, WEIGHTS, FEATURE_GRAPH):
        assert taught.manifest["files"][name] == before.manifest["files"][name]
    thresholds = taught.thresholds()
    assert thresholds.version == before_version + 1
    assert thresholds.provenance["good_scores"]["n"] == 4
    assert thresholds.provenance["tool"].startswith("inspectd teach")
    assert "version 2" in out.getvalue() and "held-out" in out.getvalue()

    from calibration.teach import rollback

    restored = rollback(trained, out=io.StringIO())
    assert restored.model_id == before.model_id and restored.manifest.get("bundle_version", 1) == 1
    assert (versions_dir(trained) / "v2").is_dir()


def test_teach_drops_the_old_scorers_camera_overrides_and_its_thresholds_cannot_be_rolled_back_to(
    trained, good, tmp_path
):
    """Per-camera thresholds and earlier versions were set on the old scorer's scores: teach drops the overrides
    (saying so) and a thresholds rollback to a version before it is refused, pointing at teach --rollback."""
    import shutil

    from calibration.teach import teach
    from engines.bundle import thresholds as thresholds_doc

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundle = tmp_path / "b"
    shutil.copytree(trained, bundle)
    before = load_bundle(bundle)
    override = thresholds_doc.next_version(
        before.thresholds(), per_camera={"cam1": {"image_threshold": 123.0}}, provenance={"tool": "test"}
    )
    before.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(override))
    out = io.StringIO()
    taught = teach(bundle, good, holdout=HOLDOUT, by="tester", out=out).thresholds()
    assert taught.per_camera == {} and taught.provenance["dropped_per_camera"] == override.per_camera
    assert "per-camera thresholds of cam1 were set on the old scorer's scores and are dropped" in out.getvalue()
    assert thresholds_doc.calibrated_range(taught, "image") == thresholds_doc.calibrated_range(taught, "image", False)

    with pytest.raises(thresholds_doc.ThresholdsError, match="inspectd teach --rollback"):
        thresholds_doc.rollback(taught, override.version)
    # Versions from the teach on roll back as before.
    later = thresholds_doc.next_version(taught, image_threshold=taught.image_threshold * 2, provenance={"tool": "x"})
    assert thresholds_doc.rollback(later, taught.version).image_threshold == taught.image_threshold


def test_a_bundle_without_the_feature_graph_gets_one_line(trained, good, tmp_path, capsys):
    from calibration import teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    old = tmp_path / "old"
    import shutil

    shutil.copytree(trained, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["files"].pop(FEATURE_GRAPH)
    (old / FEATURE_GRAPH).unlink()
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert teach.run(args(old, good=str(good))) == 2
    err = capsys.readouterr().err.strip()
    expected = f"bundle {old} has no features output ({FEATURE_GRAPH}); re-export with inspectd export {old}"
    assert err == f"inspectd teach: {expected}"
    assert teach.run(args(old)) == 2  # neither --good nor --rollback
    assert "exactly one of --good" in capsys.readouterr().err
    assert teach.run(args(old, rollback=True)) == 2  # not a taught bundle
    assert "was not taught" in capsys.readouterr().err


def test_apply_to_a_daemon_that_shuts_the_key_out_is_refused_before_any_work(pki, tmp_path, capsys):
    """A --server-key that is not the daemon's: the handshake is ended, and teach says so before it reads a frame or
    writes a version the daemon would never load (it used to teach, write, then report the daemon as silent)."""
    from calibration import teach
    from inspectd.daemon.control import ControlServer
    from inspectd.daemon.security import CurveServer

    operator_public, operator_secret = pki["allowed"]

    class Daemon:
        def status(self):
            return {"model_id": "m"}

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    guard = CurveServer("control", pki["server"][1], pki["allow_dir"])
    server = ControlServer(endpoint, Daemon(), curve=guard)
    server.start()
    try:
        bundle = tmp_path / "no-bundle-read"  # nothing is read before the refusal
        wrong = args(bundle, good=str(tmp_path / "no-frames-read"), apply=endpoint, timeout=2.0)
        wrong.server_key, wrong.client_key = str(operator_public), str(operator_secret)
        assert teach.run(wrong) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"inspectd teach: control {endpoint}: the daemon ended the CurveZMQ handshake"), err
        assert "a --server-key that is not its public key" in err and len(err.splitlines()) == 1
        assert not bundle.exists()
    finally:
        server.stop()
        guard.stop()


def test_a_linked_bundle_gets_its_new_version_beside_the_target_and_the_link_switches_back_and_forth(
    trained, good, tmp_path
):
    """deploy's layout: bundles/current -> <name> (a relative link). teach writes <name>-v2 beside <name> and switches
    the link atomically, leaving <name> as it was and nothing else in bundles/; --rollback points the link back; a
    second teach finds <name>-v2 taken and picks a free name."""
    import os
    import shutil

    from calibration.teach import rollback, teach

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(trained, bundles / "frozen-a")
    (bundles / "current").symlink_to("frozen-a")
    before = load_bundle(bundles / "frozen-a")

    out = io.StringIO()
    taught = teach(bundles / "current", good, holdout=HOLDOUT, by="tester", out=out)
    assert os.readlink(bundles / "current") == "frozen-a-v2"  # still a relative link, now to the new directory
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "frozen-a", "frozen-a-v2"]
    assert taught.manifest["bundle_version"] == 2 and taught.manifest["teach"]["previous_dir"] == "frozen-a"
    untouched = load_bundle(bundles / "frozen-a")
    assert untouched.manifest == before.manifest and untouched.model_id == before.model_id
    assert load_bundle(bundles / "current").model_id == taught.model_id
    assert str(bundles / "frozen-a-v2") in out.getvalue()

    restored = rollback(bundles / "current", out=io.StringIO())
    assert os.readlink(bundles / "current") == "frozen-a" and restored.model_id == before.model_id
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "frozen-a", "frozen-a-v2"]

    teach(bundles / "current", good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    assert os.readlink(bundles / "current") == "frozen-a-v2-2"
    assert load_bundle(bundles / "frozen-a-v2").model_id == taught.model_id  # the first taught version stays

    absolute = tmp_path / "absolute"
    absolute.symlink_to(bundles / "frozen-a")
    teach(absolute, good, holdout=HOLDOUT, by="tester", out=io.StringIO())
    assert os.readlink(absolute) == str(bundles / "frozen-a-v2-3")  # absolute stays absolute
    assert rollback(absolute, out=io.StringIO()).model_id == before.model_id
    assert os.readlink(absolute) == str(bundles / "frozen-a")


def inspectd(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", *argv], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_teach_from_the_daemons_archive_equals_teach_on_its_export(trained, tmp_path):
    """A real daemon archives one good frame in two (and every defect) of two synthetic cameras; `inspectd teach
    --archive DIR --since 1h --camera cam0` takes exactly cam0's frames judged ok, records them, and fits what `inspectd
    teach --good` fits on the same frames exported with `inspectd archive export`. Too few frames: one line, nothing
    written."""
    import datetime
    import shutil
    import time

    from daemon_harness import Station
    from engines.bundle import thresholds as thresholds_doc
    from inspectd.protocol.archive import ArchiveReader
    from inspectd.protocol.messages import Result

    if "memory" not in trained.name:
        pytest.skip("once is enough")
    count = 40
    cameras = [
        {
            "id": cam,
            "source": {
                "kind": "synthetic",
                "width": 96,
                "height": 96,
                "seed": seed,
                "defect_rate": 0.3,
                "rate_hz": 100.0,
                "count": count,
            },
            "queue": {"policy": "block"},
        }
        for cam, seed in (("cam0", 11), ("cam1", 12))
    ]
    # The running copy's threshold between this line's good frames (scores up to ~28 against a bundle fitted on 12
    # frames of another seed) and its defects (from ~41), so the daemon judges most good frames ok.
    shutil.copytree(trained, tmp_path / "running")
    running = load_bundle(tmp_path / "running")
    loose = thresholds_doc.next_version(running.thresholds(), image_threshold=35.0, provenance={"tool": "test"})
    running.replace_file(thresholds_doc.FILE_NAME, thresholds_doc.dumps(loose))
    station = Station(tmp_path, tmp_path / "running", cameras, archive={"good_every": 2})
    results: list[Result] = []
    try:
        station.wait_ready()
        last = {"cam0": -1, "cam1": -1}
        deadline = time.monotonic() + 60
        while min(last.values()) < count - 1 and time.monotonic() < deadline:
            message = station.sub.recv(0.5)
            if isinstance(message, Result):
                results.append(message)
                last[message.camera] = max(last[message.camera], message.seq)
        assert min(last.values()) == count - 1, station.log_tail()
    finally:
        assert station.stop() == 0, station.log_tail()  # the archive's writer drains before the daemon exits
    archive = tmp_path / "state" / "archive"
    archived = {r.archive_id: r for r in results if r.archive_id}
    assert any(r.verdict == "defect" and r.camera == "cam0" for r in archived.values()), "no defect to leave out"

    from_archive, from_export = tmp_path / "from-archive", tmp_path / "from-export"
    shutil.copytree(trained, from_archive)
    shutil.copytree(trained, from_export)
    common = ("--holdout", str(HOLDOUT), "--by", "tester")
    taught = inspectd(
        "teach", str(from_archive), "--archive", str(archive), "--since", "1h", "--camera", "cam0", *common
    )
    assert taught.returncode == 0, taught.stdout + taught.stderr
    exported = inspectd(
        "archive", "export", str(tmp_path / "export"), "--archive", str(archive), "--since", "1h",
        "--camera", "cam0", "--verdict", "ok", "--split", "train",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    good = inspectd("teach", str(from_export), "--good", str(tmp_path / "export" / "train" / "good"), *common)
    assert good.returncode == 0, good.stdout + good.stderr

    a, b = load_bundle(from_archive), load_bundle(from_export)
    frames = a.manifest["teach"]["frames"]
    ids = frames["ids"]
    # Exactly cam0's frames the daemon judged ok and archived: every one published with that verdict is there, no
    # defect verdict and no other camera's frame is.
    assert ids == sorted(ids) and len(ids) == frames["n"] >= 8
    assert {i for i, r in archived.items() if r.camera == "cam0" and r.verdict == "ok"} <= set(ids)
    assert all(archived[i].camera == "cam0" and archived[i].verdict == "ok" for i in ids if i in archived)
    assert all(i.startswith("cam0-") for i in ids)
    assert frames["archive"] == str(archive.resolve()) and frames["camera"] == "cam0" and frames["verdict"] == "ok"
    since = datetime.datetime.fromisoformat(frames["since"]).timestamp()
    assert abs(since - (time.time() - 3600)) < 60 and frames["until"] is None
    assert sorted(p.stem for p in (tmp_path / "export" / "train" / "good").glob("*.png")) == ids
    assert a.thresholds().provenance["archive"] == str(archive.resolve())
    assert "good_dir" not in a.thresholds().provenance
    assert f"{len(ids)} good frame(s) of cam0" in taught.stdout

    # The same frames in the same order, so the same fit, thresholds and drift references.
    other = b.manifest["teach"]["frames"]
    assert (frames["names_sha256"], frames["pixels_sha256"]) == (other["names_sha256"], other["pixels_sha256"])
    assert (frames["n_fit"], frames["n_holdout"]) == (other["n_fit"], other["n_holdout"])
    pa, pb = a.scorer_params(), b.scorer_params()
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-5, atol=1e-6 * float(np.abs(pb[name]).max()))
    ta, tb = a.thresholds(), b.thresholds()
    assert ta.image_threshold == pytest.approx(tb.image_threshold, rel=1e-5)
    for reference in ("good_scores", "good_brightness"):
        got, expected = ta.provenance[reference], tb.provenance[reference]
        assert got["n"] == expected["n"] and got["quantiles"] == pytest.approx(expected["quantiles"], rel=1e-5)

    # Too few: one line saying how many were found and how many are needed; the bundle stays as it was.
    before = load_bundle(from_archive).model_id
    with ArchiveReader(archive) as reader:
        first = reader.query(camera="cam0", verdict="ok")[0].t_capture

    def iso(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()

    for selection, found in (
        (("--since", "1h", "--camera", "cam9"), 0),
        (("--since", "1h", "--until", "2000-01-01"), 0),
        (("--since", iso(first - 0.0005), "--until", iso(first + 0.0005), "--camera", "cam0"), 1),
    ):
        refused = inspectd("teach", str(from_archive), "--archive", str(archive), *selection)
        assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and line.startswith(f"inspectd teach: --archive {archive}"), line
        assert f": {found} good frame(s), expected at least 2 (some fit, some are held out)" in line, line
    no_span = inspectd("teach", str(from_archive), "--archive", str(archive))
    assert no_span.returncode == 2 and "--archive: expected --since TIME" in no_span.stderr
    assert load_bundle(from_archive).model_id == before
