"""`inspectd eval` and `score_images` end to end: real image files (magnetic tiles, or the synthetic line's, see
tiny_dataset), a tiny frozen Lite0 bundle trained at 64x64, real ONNX Runtime sessions, the CLI in a subprocess,
overlays decoded by OpenCV."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from engines.data.images import MvtecFolder, load_image, load_mask
from engines.errors import DataError, EngineError
from engines.training.evaluate import score_images
from tiny_dataset import make_tiny_mvtec

REPO = Path(__file__).resolve().parents[1]
TYPES = {"good": 5, "blowhole": 3, "crack": 3}
N_IMAGES = sum(TYPES.values())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """An MVTec-like folder of real files: 10 train goods, a few test goods and defects with masks (varying sizes)."""
    root = tmp_path_factory.mktemp("tile")
    make_tiny_mvtec(root, n_train=10, n_test_good=TYPES["good"], n_test_defect=TYPES["blowhole"])
    return make_tiny_mvtec(root, n_train=0, n_test_good=0, n_test_defect=TYPES["crack"], defect_type="crack")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_data, tmp_path_factory) -> Path:
    from engines.progress import Progress
    from engines.training.train import train_bundle

    out = tmp_path_factory.mktemp("bundle") / "frozen64"
    train_bundle(tiny_data, out, method="frozen", size=(64, 64), progress=Progress(enabled=False))
    return out


def _eval(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", "eval", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def report_and_overlays(tiny_data, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    proc = _eval(
        str(tiny_bundle),
        "--data",
        str(tiny_data),
        "--out",
        str(out / "report.json"),
        "--overlays",
        str(out / "overlays"),
        "--n-overlays",
        "6",
        "--batch",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "report.json").read_text()), out / "overlays", proc


def test_eval_cli_reports_every_metric_in_unit_range(report_and_overlays):
    report, _, proc = report_and_overlays
    stdout = proc.stdout
    assert report["n_images"] == N_IMAGES and len(report["images"]) == N_IMAGES
    assert set(report["per_type"]) == {"blowhole", "crack"}
    for row in [report["overall"], *report["per_type"].values()]:
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
    assert report["overall"]["n_good"] == TYPES["good"]
    assert report["overall"]["n_defective"] == TYPES["blowhole"] + TYPES["crack"]
    assert report["images_per_s"] > 0
    # The printed table carries the same figures.
    assert "overall" in stdout and f"{report['overall']['image_auroc']:.4f}" in stdout


def test_eval_out_writes_the_file_and_json_prints_one_document_on_stdout(tiny_data, tiny_bundle, report_and_overlays):
    """Without --json the table is stdout and --out the file; with --json stdout is the report alone (the same one
    --out wrote: same images, same scores) and the table moves to stderr."""
    report, _, proc = report_and_overlays
    assert proc.stdout.startswith(report["model_id"]) and "{" not in proc.stdout
    as_json = _eval(str(tiny_bundle), "--data", str(tiny_data), "--json", "--batch", "4")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)  # fails on a table or anything else beside the one document
    assert [i["path"] for i in doc["images"]] == [i["path"] for i in report["images"]]
    for a, b in zip(doc["images"], report["images"]):
        assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-6)
    assert doc["overall"]["image_auroc"] == pytest.approx(report["overall"]["image_auroc"])
    assert f"{doc['overall']['image_auroc']:.4f}" in as_json.stderr  # the table, for the person watching


def test_eval_table_counts_defects_without_a_mask_only_when_there_are_some(
    tiny_data, tiny_bundle, report_and_overlays, tmp_path
):
    """Defective images without a mask are left out of the pixel columns; the table says how many per row, so a pixel
    AUROC over fewer images (or none, `-`) is not read as one over all of them."""
    _, _, proc = report_and_overlays
    assert "no mask" not in proc.stdout  # every defect has its mask: the table stays as it was
    data = tmp_path / "tile"
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / "ground_truth" / "blowhole")
    proc = _eval(str(tiny_bundle), "--data", str(data), "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].endswith("F1-max  no mask")
    rows = {line.split()[0]: line.split() for line in lines[3:6]}
    assert rows["overall"][-1] == str(TYPES["blowhole"]) and rows["crack"][-1] == "0"
    assert rows["blowhole"][-1] == str(TYPES["blowhole"]) and rows["blowhole"][4:6] == ["-", "-"]
    assert lines[6] == "no mask: defective images without a ground-truth mask, left out of pix AUROC and AUPRO"


def test_eval_shows_progress_with_eta_on_stderr(report_and_overlays):
    """Off a terminal (the pipe here): plain lines, no carriage returns, the first image and the last always shown,
    each with the time so far and an ETA."""
    _, _, proc = report_and_overlays
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("eval: images scored ")]
    pattern = re.compile(rf"eval: images scored (\d+)/{N_IMAGES} elapsed \d+s ETA \d+s")
    matches = [pattern.fullmatch(ln) for ln in lines]
    assert lines and all(matches), proc.stderr
    steps = [int(m.group(1)) for m in matches if m]
    assert steps[0] == 1 and steps[-1] == N_IMAGES and steps == sorted(steps), proc.stderr
    assert lines[-1].endswith("ETA 0s")
    assert "eval: images scored" not in proc.stdout  # stdout stays the report


def test_image_metrics_agree_with_sklearn_on_reported_scores(report_and_overlays):
    report, _, _ = report_and_overlays
    images = report["images"]
    labels = [i["type"] != "good" for i in images]
    scores = [i["score"] for i in images]
    assert report["overall"]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    crack = [i for i in images if i["type"] in ("good", "crack")]
    assert report["per_type"]["crack"]["image_auroc"] == pytest.approx(
        roc_auc_score([i["type"] == "crack" for i in crack], [i["score"] for i in crack])
    )
    flagged = np.array(scores) >= report["overall"]["f1_threshold"]
    labels = np.array(labels)
    f1 = 2 * np.sum(flagged & labels) / (flagged.sum() + labels.sum())
    assert f1 == pytest.approx(report["overall"]["f1_max"])


def test_pixel_auroc_matches_sklearn_over_frame_size_maps(tiny_data, tiny_bundle, report_and_overlays):
    report, _, _ = report_and_overlays
    items = MvtecFolder(tiny_data).test_items()
    values, truth = [], []
    for item, scored in zip(items, score_images(tiny_bundle, [i.path for i in items], batch=3)):
        values.append(scored.frame_map.ravel())
        truth.append(load_mask(item.mask_path, scored.frame_map.shape).ravel())
    assert report["overall"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(np.concatenate(truth), np.concatenate(values)), abs=1e-3
    )


def test_overlays_are_decodable_and_pick_the_worst_goods(report_and_overlays):
    report, overlay_dir, _ = report_and_overlays
    written = sorted(overlay_dir.glob("*.png"))
    assert [str(p) for p in written] == sorted(report["overlays"]) and len(written) == 6
    for path in written:
        picture = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert picture is not None and picture.ndim == 3
        stem = path.stem.split("_", 3)[3]
        source = next(Path(report["data"]).glob(f"test/*/{stem}.jpg"))
        frame = load_image(source)
        # Three panels of the frame's width plus two 4-pixel gaps; the caption sits on top.
        assert picture.shape[1] == 3 * frame.shape[1] + 8 and picture.shape[0] > frame.shape[0]
    goods = sorted((i for i in report["images"] if i["type"] == "good"), key=lambda i: -i["score"])
    worst_goods = {Path(p).stem.split("_", 3)[3] for p in report["overlays"] if "_worst-good_" in p}
    assert worst_goods == {Path(i["path"]).stem for i in goods[:2]}
    # The folder is not cleared: the count is this run's, and the line says so (it read as all the folder held).
    from engines.training.evaluate import format_table

    assert format_table(report).splitlines()[-1] == (
        f"overlays: 6 written to {overlay_dir} by this run (earlier runs' are left there)"
    )


def test_score_images_maps_are_frame_sized_and_batch_independent(tiny_data, tiny_bundle):
    paths = sorted((tiny_data / "test").glob("*/*.jpg"))
    one = list(score_images(tiny_bundle, paths, batch=1))
    many = list(score_images(tiny_bundle, paths, batch=4))  # 11 images: the last batch is partial
    assert [s.path for s in one] == paths == [s.path for s in many]
    for a, b in zip(one, many):
        assert a.frame_map.dtype == np.float32 and a.frame_map.shape == a.image.shape[:2]
        assert a.image.dtype == np.uint8
        assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-5)
        np.testing.assert_allclose(a.frame_map, b.frame_map, rtol=1e-3, atol=1e-3 * float(np.abs(a.frame_map).max()))
    assert len({round(s.score, 6) for s in one}) > 1  # scores depend on the image


def test_frame_maps_are_the_engines_maps_resized_by_hand(tiny_data, tiny_bundle):
    """score_images' frame maps against a path that shares none of its fitting or mapping code: each frame resized
    with cv2 to the model input, the engine's raw model-size map resized back with cv2 (the bundle stretches, so
    there is no padding to crop). A wrong Placement or map_to_frame would pass the sklearn comparison above, which
    reads the same maps as the report; not this one."""
    from engines.bundle.store import load_bundle
    from engines.runtime import open_engine

    bundle = load_bundle(tiny_bundle)
    assert bundle.resize_policy == "stretch"
    h, w, c = bundle.input_shape
    paths = [sorted((tiny_data / "test" / t).glob("*.jpg"))[0] for t in ("good", "crack")]
    with open_engine(bundle, "onnxruntime", {"intra_op_threads": 1}, max_batch=1) as engine:
        for path, scored in zip(paths, score_images(tiny_bundle, paths, batch=2)):
            image = load_image(path)
            assert image.ndim == 2 and c == 1  # grey tiles into a grey model: no channel conversion to redo
            pixels = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            raw = engine.infer(np.ascontiguousarray(pixels[None, :, :, None])).maps[0]
            expected = cv2.resize(raw, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
            assert scored.frame_map.shape == image.shape
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(scored.frame_map, expected, rtol=0, atol=1e-4 * scale)


def test_score_images_refuses_bad_batch_and_unreadable_image(tiny_bundle, tmp_path):
    with pytest.raises(EngineError, match="batch"):
        list(score_images(tiny_bundle, [], batch=0))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(EngineError, match="broken.jpg"):
        list(score_images(tiny_bundle, [broken]))


def test_eval_cli_errors_are_one_line(tiny_bundle, tiny_data, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = _eval(str(tiny_bundle), "--data", str(tiny_data), "--overlays", str(tmp_path / "a-file" / "overlays"))
    last = proc.stderr.strip().splitlines()[-1]  # after the progress lines
    assert proc.returncode == 2 and last.startswith("inspectd eval: ") and "a-file" in last, proc.stderr[-500:]
    assert "Traceback" not in proc.stderr
    proc = _eval(str(tiny_bundle), "--data", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(tmp_path) in proc.stderr and "MVTec" in proc.stderr
    proc = _eval(str(tmp_path / "missing"), "--data", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing" in proc.stderr
    # A batch of 1e8 asked numpy for 95 GiB and ended in a MemoryError traceback.
    proc = _eval(str(tiny_bundle), "--data", str(tiny_data), "--batch", "100000000")
    assert proc.returncode == 2 and "--batch: '100000000': expected an integer from 1 to 256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_refuses_an_output_it_cannot_write_before_scoring_any_image(tiny_bundle, tiny_data, tmp_path):
    """--out and --overlays were tried once every image was scored: a typo lost the evaluation and printed no table,
    and a file where a folder belongs was said as "File exists"."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir").mkdir()
    cases = [
        ("--out", tmp_path / "a-file" / "r.json", "Not a directory"),
        ("--out", tmp_path / "a-dir", "Is a directory"),
        ("--overlays", tmp_path / "a-file", "Not a directory"),
        ("--overlays", tmp_path / "a-file" / "overlays", "Not a directory"),
    ]
    for option, path, why in cases:
        proc = _eval(str(tiny_bundle), "--data", str(tiny_data), option, str(path))
        # One line and nothing else: no progress line, so no image was scored.
        assert proc.returncode == 2 and proc.stdout == "", (option, path, proc.stderr[-500:])
        assert proc.stderr == f"inspectd eval: {option} {path}: cannot write ({why})\n"
    # The folders a refused or an accepted check made for the test are gone again.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]


def test_eval_refuses_outputs_inside_a_bundle_or_overlays_inside_the_data_before_scoring(
    tiny_bundle, tiny_data, tmp_path
):
    """`--out BUNDLE/manifest.json` replaced the manifest with the report (the bundle then no longer loaded, the
    daemon's at its next reload), files added to a bundle made train refuse to replace it, and overlays written into
    the test set were scored by the next eval as test images."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    other = Path(shutil.copytree(tiny_bundle, tmp_path / "other"))
    data = _copy(tiny_data, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    outside_any = "expected a path outside any bundle folder"
    evaluated = f"inside the bundle being evaluated ({bundle}), {outside_any}"
    cases = [
        ("--out", bundle / "manifest.json", evaluated),
        ("--out", bundle / "reports" / "eval.json", evaluated),
        ("--out", tmp_path / "bundle" / ".." / "bundle" / "eval.json", evaluated),
        ("--out", other / "eval.json", f"inside the bundle {other}, {outside_any}"),
        ("--overlays", bundle, evaluated),
        ("--overlays", other / "overlays", f"inside the bundle {other}, {outside_any}"),
        (
            "--overlays",
            data / "test" / "good",
            f"inside --data {data}, expected a folder outside the dataset (the next eval would score the overlays as "
            "test images)",
        ),
    ]
    (tmp_path / "link").symlink_to(other)
    cases.append(("--out", tmp_path / "link" / "eval.json", f"inside the bundle {other}, {outside_any}"))
    for option, path, why in cases:
        proc = _eval(str(bundle), "--data", str(data), option, str(path), "--batch", "4")
        assert proc.returncode == 2 and proc.stdout == "", (option, path, proc.stderr[-500:])
        assert proc.stderr == f"inspectd eval: {option} {path}: {why}\n"
    assert (bundle / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in tiny_bundle.iterdir())
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in tiny_bundle.iterdir())
    assert sorted(p.name for p in (data / "test" / "good").iterdir()) == sorted(
        p.name for p in (tiny_data / "test" / "good").iterdir()
    )
    # Beside the bundles and the data, and a JSON report inside --data (never scored), are fine.
    proc = _eval(
        str(bundle), "--data", str(data), "--out", str(data / "eval.json"), "--overlays", str(tmp_path / "ov"),
        "--n-overlays", "1", "--batch", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-500:]
    assert len(list((tmp_path / "ov").iterdir())) == 1 and (data / "eval.json").is_file()


@pytest.mark.parametrize(("option", "what"), [("--out", "a file"), ("--overlays", "a folder")])
def test_eval_refuses_an_empty_out_or_overlays_before_scoring(tiny_bundle, tiny_data, tmp_path, option, what):
    """A script's `--overlays "$DIR"` with the variable unset wrote the overlays into the working directory (here
    the bundle) past the check that refuses `--overlays .` there; `--out ""` wrote no report and exited 0."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "eval", str(bundle), "--data", str(tiny_data), option, "", "--batch", "4"],
        cwd=bundle,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-500:]
    assert proc.stderr == f"inspectd eval: {option}: an empty path, expected {what} to write\n"
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in tiny_bundle.iterdir())


def test_eval_refuses_overlays_with_n_overlays_0_which_would_write_none(tiny_bundle, tiny_data, tmp_path):
    """`--overlays DIR --n-overlays 0` scored the set and wrote nothing, not even the folder, without a word."""
    overlays = tmp_path / "ov"
    proc = _eval(str(tiny_bundle), "--data", str(tiny_data), "--overlays", str(overlays), "--n-overlays", "0")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-500:]
    assert proc.stderr == (
        f"inspectd eval: --overlays {overlays} with --n-overlays 0: nothing would be written there, expected "
        "--n-overlays 1 or more, or no --overlays\n"
    )


def test_masks_kept_beside_their_images_in_test_are_refused_not_scored_as_images(tiny_data, tiny_bundle, tmp_path):
    """Each mask moved beside its image (no ground_truth/) was scored as one more defective image: the defect count
    doubled, image AUROC and F1-max changed, the pixel columns went blank, and only the "no mask" footnote hinted."""
    data = _copy(tiny_data, tmp_path)
    for mask in sorted((data / "ground_truth" / "blowhole").iterdir()):
        mask.rename(data / "test" / "blowhole" / mask.name)
    first = sorted((data / "test" / "blowhole").glob("*_mask.png"))[0]
    (image,) = [p for p in (data / "test" / "blowhole").iterdir() if p.stem == first.stem.removesuffix("_mask")]
    proc = _eval(str(tiny_bundle), "--data", str(data), "--batch", "4")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-500:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"inspectd eval: {first}: a mask beside its image {image.name}, expected masks "
        "in ground_truth/blowhole/<name>_mask.png and only images in test/blowhole/"
    ), proc.stderr


def test_the_output_check_probes_through_a_link_and_leaves_it_a_link(tmp_path):
    """latest.json -> reports/today.json, not there yet: the probe made the target through the link, then removed the
    link in its place, so eval wrote a plain latest.json and left an empty today.json behind."""
    from engines.durable import unwritable

    (tmp_path / "reports").mkdir()
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "reports" / "today.json")
    for parents in (False, True):
        assert unwritable(link, parents=parents) is None
        assert link.is_symlink() and os.listdir(tmp_path / "reports") == []


def test_eval_prints_the_table_when_out_fails_once_written(tiny_bundle, tiny_data):
    """A --out that passes the check and fails when written (a disk filled while scoring: /dev/full) still leaves
    the result on stdout; the file was written first, so the table was lost."""
    proc = _eval(str(tiny_bundle), "--data", str(tiny_data), "--out", "/dev/full")
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "img AUROC" in proc.stdout and "\noverall " in proc.stdout, proc.stdout
    assert (
        proc.stderr.strip().splitlines()[-1] == "inspectd eval: --out /dev/full: cannot write (No space left on device)"
    )


def test_a_mask_marks_every_non_zero_pixel_however_it_is_stored(tmp_path):
    """MVTec AD's evaluation counts any non-zero value as defect. Masks stored as 0/1, as label indices, in 16 bits
    or in colour used to read as empty (grey > 127), so every defect pixel counted as a defect-free one. With an alpha
    channel, transparent pixels are no defect."""
    truth = np.zeros((48, 64), bool)
    truth[10:30, 20:40] = True
    stored = {
        "0-255": truth.astype(np.uint8) * 255,
        "0-1": truth.astype(np.uint8),
        "labels": np.where(truth, 3, 0).astype(np.uint8),
        "16-bit": truth.astype(np.uint16) * 1000,
        "red": np.dstack([np.zeros_like(truth), np.zeros_like(truth), truth]).astype(np.uint8) * 255,  # BGR
        "blue-on-opaque-alpha": np.dstack([truth * 255, truth * 0, truth * 0, np.full(truth.shape, 255)]).astype(
            np.uint8
        ),
        # An editor's transparent background keeps whatever colour was under it: transparent is no defect.
        "white-on-transparent": np.dstack([np.full((*truth.shape, 3), 255), truth * 255]).astype(np.uint8),
        "dark-under-transparent": np.dstack([np.where(truth[..., None], 255, 60).repeat(3, 2), truth * 255]).astype(
            np.uint8
        ),
        "drawn-in-alpha": np.dstack([np.zeros((*truth.shape, 3)), truth * 255]).astype(np.uint8),  # black, alpha
        # A black brush on a layer whose transparent pixels hold white: only the opaque pixels' colour counts.
        "black-on-transparent-white": np.dstack([np.where(truth[..., None], 0, 255).repeat(3, 2), truth * 255]).astype(
            np.uint8
        ),
    }
    for name, mask in stored.items():
        path = tmp_path / f"{name}.png"
        assert cv2.imwrite(str(path), mask)
        assert np.array_equal(load_mask(path, truth.shape), truth), name
    empty = tmp_path / "opaque-black.png"  # an RGBA export of a defect-free mask
    assert cv2.imwrite(str(empty), np.dstack([np.zeros((*truth.shape, 3)), np.full(truth.shape, 255)]).astype(np.uint8))
    assert not load_mask(empty, truth.shape).any()
    half = tmp_path / "half.png"  # the same mask saved at half the resolution: scaled back
    assert cv2.imwrite(str(half), cv2.resize(truth.astype(np.uint8) * 255, (32, 24), interpolation=cv2.INTER_NEAREST))
    assert np.array_equal(load_mask(half, truth.shape), truth)
    turned = tmp_path / "turned.png"  # another image's mask (height and width swapped): refused, not stretched
    assert cv2.imwrite(str(turned), truth.T.astype(np.uint8) * 255)
    with pytest.raises(DataError, match=r"^.*turned\.png: mask 48x64, expected the image's size 64x48"):
        load_mask(turned, truth.shape)


def _copy(tiny_data: Path, tmp_path: Path) -> Path:
    data = tmp_path / "tile"
    shutil.copytree(tiny_data, data)
    return data


def _open_copies(tiny_data: Path, tiny_bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the data and the bundle that another user may enter (copytree keeps pytest's 0700 on folders)."""
    data = _copy(tiny_data, tmp_path)
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    for copied in (data, bundle):
        for folder, _, _ in os.walk(copied):
            os.chmod(folder, 0o755)
    return data, bundle


def _eval_json(bundle: Path, data: Path) -> tuple[dict, subprocess.CompletedProcess]:
    proc = _eval(str(bundle), "--data", str(data), "--json", "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc


def test_masks_named_as_in_visa_or_btad_or_saved_as_bmp_give_the_same_pixel_metrics(
    tiny_data, tiny_bundle, report_and_overlays, tmp_path
):
    """Only `<stem>_mask.png` was read: masks named `<stem>.png` (VisA after anomalib's split, BTAD) or saved as
    `_mask.BMP` left their types without pixel metrics, and the table said only `no mask`."""
    report, _, _ = report_and_overlays
    data = _copy(tiny_data, tmp_path)
    for mask in sorted((data / "ground_truth" / "blowhole").iterdir()):
        mask.rename(mask.with_name(mask.name.replace("_mask.png", ".png")))
    for mask in sorted((data / "ground_truth" / "crack").iterdir()):
        assert cv2.imwrite(str(mask.with_suffix(".BMP")), cv2.imread(str(mask), cv2.IMREAD_UNCHANGED))
        mask.unlink()
    doc, proc = _eval_json(tiny_bundle, data)
    for name in ("blowhole", "crack"):
        for key in ("pixel_auroc", "aupro"):
            assert doc["per_type"][name][key] == pytest.approx(report["per_type"][name][key], abs=1e-6), (name, key)
    assert doc["overall"]["n_without_mask"] == 0 and doc["unmatched_masks"] == [] and doc["notes"] == []
    assert "note:" not in proc.stderr and "no mask" not in proc.stderr


def test_ground_truth_and_type_folders_spelt_in_another_case_are_found(
    tiny_data, tiny_bundle, report_and_overlays, tmp_path, capsys
):
    """Ground_Truth/, or test/Blowhole/ beside ground_truth/blowhole/, lost every mask of the type without a note (the
    table said only `no mask`), and calibrate --pixel fell back to the good-pixel rate: both find them now."""
    from inspectd.cli import main

    report, _, _ = report_and_overlays
    data = _copy(tiny_data, tmp_path)
    (data / "ground_truth").rename(data / "Ground_Truth")
    (data / "test" / "blowhole").rename(data / "test" / "Blowhole")
    doc, proc = _eval_json(tiny_bundle, data)
    assert doc["per_type"]["Blowhole"]["pixel_auroc"] == pytest.approx(report["per_type"]["blowhole"]["pixel_auroc"])
    assert doc["per_type"]["crack"]["aupro"] == pytest.approx(report["per_type"]["crack"]["aupro"])
    assert doc["overall"]["n_without_mask"] == 0 and doc["notes"] == [] and "no mask" not in proc.stderr
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    given = ["--good", str(data), "--defective", str(data / "test" / "Blowhole"), "--max-f1", "--pixel", "--dry-run"]
    assert main(["calibrate", str(bundle), *given]) == 0
    assert "pixel F1-max" in capsys.readouterr().out  # from the masks, not the good-pixel rate
    # Two spellings of one type's masks: either could be the one meant.
    shutil.copytree(data / "Ground_Truth" / "blowhole", data / "Ground_Truth" / "BLOWHOLE")
    proc = _eval(str(tiny_bundle), "--data", str(data))
    assert proc.returncode == 2 and proc.stderr == (
        f"inspectd eval: {data / 'Ground_Truth'}: BLOWHOLE/ and blowhole/ differ only in case, expected one Blowhole/ "
        "folder\n"
    )


def test_an_empty_second_spelling_of_ground_truth_or_of_a_type_folder_is_refused_too(
    tiny_data, tiny_bundle, tmp_path, capsys
):
    """An empty ground_truth/ beside Ground_Truth/ (or an empty ground_truth/blowhole/ beside Blowhole/) was taken
    because it is spelt as looked for: every mask of the set (of the type) went unused, eval said only `no mask` and
    calibrate --pixel fell back to the good-pixel rate. Two spellings are refused in one line, as two full ones are."""
    from inspectd.cli import main

    data = _copy(tiny_data, tmp_path)
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))

    def refused(expected: str) -> None:
        proc = _eval(str(bundle), "--data", str(data))
        assert proc.returncode == 2 and proc.stderr.startswith(f"inspectd eval: {expected}"), proc.stderr
        assert proc.stderr.count("\n") == 1
        given = ["--good", str(data), "--defective", str(data), "--pixel", "--dry-run"]
        assert main(["calibrate", str(bundle), *given]) == 2
        assert expected in capsys.readouterr().err

    masks = data / "Ground_Truth"
    (data / "ground_truth").rename(masks)
    (data / "ground_truth").mkdir()
    refused(f"{data}: Ground_Truth/ and ground_truth/ (empty) differ only in case, expected one ground_truth/ folder")
    (data / "ground_truth").rmdir()
    (masks / "blowhole").rename(masks / "Blowhole")
    (masks / "blowhole").mkdir()
    refused(f"{masks}: Blowhole/ and blowhole/ (empty) differ only in case, expected one blowhole/ folder")


def test_a_test_set_without_defects_or_with_an_empty_type_folder_says_why_its_cells_are_blank(
    tiny_data, tiny_bundle, tmp_path
):
    """`overall 5 0 - - - -` and nothing more, or an empty type's row of dashes, read as a model that failed."""
    data = _copy(tiny_data, tmp_path)
    (data / "test" / "scratch").mkdir()
    doc, proc = _eval_json(tiny_bundle, data)
    note = f"note: {data / 'test' / 'scratch'} holds no images, so its row is blank"
    assert doc["notes"] == [note] and note in proc.stderr.splitlines()
    assert doc["per_type"]["scratch"]["image_auroc"] is None and doc["per_type"]["crack"]["image_auroc"] is not None
    for name in ("blowhole", "crack"):
        for image in (data / "test" / name).iterdir():
            image.unlink()
    doc, proc = _eval_json(tiny_bundle, data)
    note = (
        f"note: {data / 'test'} has no defective images (blowhole/, crack/, scratch/ without images), which image "
        "AUROC, F1-max and the pixel metrics need, so their columns are blank: expected test/<type>/ folders of "
        "defective images beside good/"
    )
    assert doc["notes"] == [note] and note in proc.stderr.splitlines()
    assert doc["overall"]["n_defective"] == 0 and doc["overall"]["image_auroc"] is None
    shutil.rmtree(data / "test" / "scratch")
    for name in ("blowhole", "crack"):
        (data / "test" / name).rmdir()
    doc, _ = _eval_json(tiny_bundle, data)
    assert doc["notes"] == [
        f"note: {data / 'test'} has no defective images, which image AUROC, F1-max and the pixel metrics need, so "
        "their columns are blank: expected test/<type>/ folders of defective images beside good/"
    ]


def test_an_empty_good_folder_says_why_image_auroc_and_f1_max_are_blank(tiny_data, tiny_bundle, tmp_path):
    """`overall 0 6 - 0.54 0.25 -` and no word: a test/good/ without images read as a model that failed."""
    data = _copy(tiny_data, tmp_path)
    for image in (data / "test" / "good").iterdir():
        image.unlink()
    doc, proc = _eval_json(tiny_bundle, data)
    note = (
        f"note: {data / 'test' / 'good'} holds no images, which image AUROC and F1-max need, so their columns are "
        "blank: expected the defect-free test images there"
    )
    assert doc["notes"] == [note] and note in proc.stderr.splitlines()
    assert doc["overall"]["n_good"] == 0 and doc["overall"]["image_auroc"] is doc["overall"]["f1_max"] is None
    assert doc["overall"]["pixel_auroc"] is not None


def test_a_mask_folder_whose_files_match_no_image_is_said_in_the_table_and_the_json(tiny_data, tiny_bundle, tmp_path):
    data = _copy(tiny_data, tmp_path)
    folder = data / "ground_truth" / "blowhole"
    for mask in sorted(folder.iterdir()):
        mask.rename(folder / f"gt_{mask.name}")
    first = sorted((data / "test" / "blowhole").iterdir())[0].stem
    doc, proc = _eval_json(tiny_bundle, data)
    note = (
        f"note: {folder} holds {TYPES['blowhole']} file(s), none of them the mask of an image in test/blowhole/, so "
        f"that type has no pixel metrics: expected {first}_mask.png or {first}.png (any image extension, any case)"
    )
    assert note in proc.stderr.splitlines(), proc.stderr  # the table's lines (stderr with --json)
    assert doc["notes"] == [note]
    assert doc["unmatched_masks"] == [
        {"folder": str(folder), "n_files": TYPES["blowhole"], "expected": f"{first}_mask.png or {first}.png"}
    ]
    assert doc["per_type"]["blowhole"]["pixel_auroc"] is None and doc["per_type"]["crack"]["pixel_auroc"] is not None


def test_a_defect_free_folder_called_ok_is_the_good_images_and_hidden_folders_are_no_type(
    tiny_data, tiny_bundle, report_and_overlays, tmp_path
):
    """BTAD's test/ok (or OK, Good) was scored as one more defect type without masks: no image AUROC or F1 at all.
    A hidden folder (.ipynb_checkpoints) was a row of its own."""
    report, _, _ = report_and_overlays
    data = _copy(tiny_data, tmp_path)
    (data / "test" / "good").rename(data / "test" / "OK")
    hidden = data / "test" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(next((data / "test" / "crack").iterdir()), hidden)
    doc, _ = _eval_json(tiny_bundle, data)
    assert doc["good_folder"] == "OK" and set(doc["per_type"]) == {"blowhole", "crack"}
    assert doc["n_images"] == N_IMAGES and doc["overall"]["n_good"] == TYPES["good"]
    for key in ("image_auroc", "f1_max", "pixel_auroc"):
        assert doc["overall"][key] == pytest.approx(report["overall"][key], abs=1e-6), key
    assert {i["type"] for i in doc["images"]} == {"good", "blowhole", "crack"}


def test_two_defect_free_folders_are_refused_and_none_is_said(tiny_data, tiny_bundle, tmp_path):
    data = _copy(tiny_data, tmp_path)
    (data / "test" / "ok").mkdir()
    shutil.copy(next((data / "test" / "good").iterdir()), data / "test" / "ok")
    proc = _eval(str(tiny_bundle), "--data", str(data))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"inspectd eval: {data / 'test'}: good/ and ok/ are both defect-free folders, expected one (good/ or ok/, "
        "any case)"
    ), proc.stderr
    shutil.rmtree(data / "test" / "ok")
    shutil.rmtree(data / "test" / "good")
    doc, proc = _eval_json(tiny_bundle, data)
    note = (
        f"note: {data / 'test'} has no defect-free folder (good/ or ok/, any case), which image AUROC and F1-max "
        "need: every test image was taken as defective (folders: blowhole, crack)"
    )
    assert note in proc.stderr.splitlines() and doc["notes"] == [note], proc.stderr
    assert doc["good_folder"] is None and doc["overall"]["image_auroc"] is None


def test_an_image_that_does_not_decode_is_skipped_with_a_warning_and_counted(
    tiny_data, tiny_bundle, report_and_overlays, tmp_path
):
    """One broken file refused the whole eval (in eval-suite: after the training). It is left out as calibrate
    leaves it out; only when no image decodes is the eval refused."""
    report, _, _ = report_and_overlays
    data = _copy(tiny_data, tmp_path)
    broken = [data / "test" / "good" / "broken.png", data / "test" / "crack" / "empty.jpg"]
    broken[0].write_bytes(b"not an image")
    broken[1].write_bytes(b"")
    doc, proc = _eval_json(tiny_bundle, data)
    warning = f"WARNING: skipped 2 image(s) that do not decode: {broken[0]}, {broken[1]}"
    assert warning in proc.stderr.splitlines() and doc["notes"] == [warning], proc.stderr
    assert doc["n_skipped"] == 2 and doc["skipped"] == [str(broken[0]), str(broken[1])]
    assert doc["n_images"] == N_IMAGES and doc["overall"]["n_good"] == TYPES["good"]
    assert doc["overall"]["image_auroc"] == pytest.approx(report["overall"]["image_auroc"], abs=1e-6)
    assert re.search(rf"eval: images scored {N_IMAGES + 2}/{N_IMAGES + 2} ", proc.stderr), proc.stderr
    only_broken = tmp_path / "broken"
    (only_broken / "test" / "good").mkdir(parents=True)
    shutil.copy(broken[0], only_broken / "test" / "good")
    proc = _eval(str(tiny_bundle), "--data", str(only_broken))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"inspectd eval: {only_broken / 'test' / 'good' / 'broken.png'}: cannot decode, expected a "
        "JPEG/PNG/BMP/TIFF/PNM/WebP image"
    ), proc.stderr


def test_a_mask_that_does_not_decode_leaves_its_image_out_as_an_image_that_does_not(
    tiny_data, tiny_bundle, report_and_overlays, tmp_path
):
    """A mask cut short by a copy refused the whole eval, after every image was scored. Its image is now left out
    and counted as an undecodable image is (one WARNING, `n_skipped`), not read as defect-free; a mask that decodes
    at another image's size is still refused in one line."""
    report, _, _ = report_and_overlays
    data = _copy(tiny_data, tmp_path)
    masks = sorted((data / "ground_truth" / "crack").iterdir())
    cut = masks[0]
    cut.write_bytes(cut.read_bytes()[:24])  # the PNG signature and a header cut short
    image = next(p for p in (data / "test" / "crack").iterdir() if cut.name.startswith(p.stem + "_mask"))
    doc, proc = _eval_json(tiny_bundle, data)
    warning = f"WARNING: skipped 1 image(s) that do not decode: {cut}"
    assert warning in proc.stderr.splitlines() and doc["notes"] == [warning], proc.stderr
    assert doc["n_skipped"] == 1 and doc["skipped"] == [str(cut)]
    assert doc["n_images"] == N_IMAGES - 1 and str(image) not in [i["path"] for i in doc["images"]]
    assert doc["per_type"]["crack"]["n_defective"] == TYPES["crack"] - 1
    assert doc["overall"]["n_good"] == TYPES["good"] and doc["overall"]["n_without_mask"] == 0
    assert doc["per_type"]["blowhole"] == report["per_type"]["blowhole"]  # the other type is untouched
    assert doc["per_type"]["crack"]["pixel_auroc"] is not None
    assert re.search(rf"eval: images scored {N_IMAGES}/{N_IMAGES} ", proc.stderr), proc.stderr

    other = masks[1]
    height, width = cv2.imread(str(other), cv2.IMREAD_UNCHANGED).shape[:2]
    assert cv2.imwrite(str(other), np.zeros((height, 2 * width + 7), np.uint8))
    proc = _eval(str(tiny_bundle), "--data", str(data))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"inspectd eval: {other}: mask {2 * width + 7}x{height}, expected the image's size")


def test_a_mask_this_user_may_not_read_leaves_its_image_out_saying_why(tiny_data, tiny_bundle, open_tmp_path):
    """A mask the eval user may not read (0600, another user's) was skipped as one that does not decode, and OpenCV's
    imread printed two warning lines of its own on stderr. It is skipped saying why, and OpenCV prints nothing. Run as
    nobody when this is root (root reads everything)."""
    from other_user import inspectd_without

    data, bundle = _open_copies(tiny_data, tiny_bundle, open_tmp_path)
    private = sorted((data / "ground_truth" / "crack").iterdir())[0]
    proc = inspectd_without(private, "eval", str(bundle), "--data", str(data), "--json", "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    warning = f"WARNING: skipped 1 image(s) whose mask cannot be read: {private} (Permission denied)"
    assert warning in proc.stderr.splitlines() and doc["notes"] == [warning], proc.stderr
    assert doc["n_skipped"] == 1 and doc["skipped"] == [str(private)]
    assert doc["n_images"] == N_IMAGES - 1 and doc["per_type"]["crack"]["n_defective"] == TYPES["crack"] - 1
    assert "[ WARN" not in proc.stderr and "imread" not in proc.stderr, proc.stderr


def test_an_image_this_user_may_not_read_is_left_out_saying_why_not_that_it_does_not_decode(
    tiny_data, tiny_bundle, open_tmp_path
):
    """A test image the eval user may not read (0600, another user's) was left out under `WARNING: skipped 1
    image(s) that do not decode`, which sends them to look at a sound image: the reason was lost on the way from the
    decoding to the note. It is said, apart from the images that do not decode. Run as nobody when this is root (root
    reads everything)."""
    from other_user import inspectd_without

    data, bundle = _open_copies(tiny_data, tiny_bundle, open_tmp_path)
    private = sorted((data / "test" / "crack").iterdir())[0]
    broken = data / "test" / "good" / "broken.png"
    broken.write_bytes(b"not an image")
    proc = inspectd_without(private, "eval", str(bundle), "--data", str(data), "--json", "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    notes = [
        f"WARNING: skipped 1 image(s) that do not decode: {broken}",
        f"WARNING: skipped 1 image(s) that cannot be read: {private} (Permission denied)",
    ]
    assert doc["notes"] == notes and all(note in proc.stderr.splitlines() for note in notes), proc.stderr
    assert doc["n_skipped"] == 2 and sorted(doc["skipped"]) == sorted([str(private), str(broken)])
    assert doc["n_images"] == N_IMAGES - 1 and doc["per_type"]["crack"]["n_defective"] == TYPES["crack"] - 1


def test_names_that_are_not_utf8_are_scored_drawn_and_printed_under_a_strict_locale(tiny_data, tiny_bundle, tmp_path):
    """Latin-1 names (a Windows ZIP unpacked, an SMB copy): the overlay's caption and file name ended the process in
    OpenCV (rc -11, no report), and under a station locale (stdout strict, here by PYTHONIOENCODING) the table's
    print raised before --out was written."""
    data = _copy(tiny_data, tmp_path)
    good, defect = data / "test" / "good", data / "test" / "blowhole"
    first = sorted(defect.glob("*.jpg"))[0]
    os.rename(first, os.fsdecode(bytes(defect) + b"/Fehler_\xfc.jpg"))
    masks = data / "ground_truth" / "blowhole"
    os.rename(masks / f"{first.stem}_mask.png", os.fsdecode(bytes(masks) + b"/Fehler_\xfc_mask.png"))
    os.rename(sorted(good.glob("*.jpg"))[0], os.fsdecode(bytes(good) + b"/Pr\xfcf.jpg"))
    (Path(os.fsdecode(bytes(good) + b"/kaputt_\xe4.jpg"))).write_bytes(b"not a jpeg")
    out, overlays = tmp_path / "report.json", tmp_path / "overlays"
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", "eval", str(tiny_bundle), "--data", str(data), "--out", str(out)]
        + ["--overlays", str(overlays), "--n-overlays", "30", "--batch", "4"],  # every image
        cwd=REPO,
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    report = json.loads(out.read_text())
    assert report["n_images"] == N_IMAGES and report["n_skipped"] == 1
    assert report["overall"]["n_defective"] == TYPES["blowhole"] + TYPES["crack"]
    assert report["per_type"]["blowhole"]["pixel_auroc"] is not None
    stdout = proc.stdout.decode("ascii")
    assert f"WARNING: skipped 1 image(s) that do not decode: {good}/kaputt_\\udce4.jpg" in stdout.splitlines()
    # Each overlay under its image's own name, whatever its bytes, and decodable.
    names = sorted(os.listdir(bytes(overlays)))
    assert any(name.endswith(b"_good_Pr\xfcf.png") for name in names), names
    assert any(name.endswith(b"_blowhole_Fehler_\xfc.png") for name in names), names
    for name in names:
        assert cv2.imdecode(np.fromfile(os.fsdecode(bytes(overlays) + b"/" + name), np.uint8), cv2.IMREAD_COLOR).size


def test_masks_with_no_defect_pixel_are_said_and_explain_blank_pixel_columns(tiny_data, tiny_bundle, tmp_path):
    """Masks that decode but are all zero (an export at the wrong level, a label tool's empty layer) left the pixel
    columns blank with no word, and mixed in, counted their images' pixels as defect-free without one."""
    data = _copy(tiny_data, tmp_path)
    masks = sorted((data / "ground_truth" / "blowhole").iterdir())
    for mask in masks:  # every blowhole mask empty
        assert cv2.imwrite(str(mask), np.zeros_like(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)))
    crack = sorted((data / "ground_truth" / "crack").iterdir())[0]  # one crack mask of three
    assert cv2.imwrite(str(crack), np.zeros_like(cv2.imread(str(crack), cv2.IMREAD_GRAYSCALE)))
    doc, proc = _eval_json(tiny_bundle, data)
    test = data / "test"
    said = [
        f"note: {len(masks)} defective image(s) in {test / 'blowhole'} have a mask with no defect pixel: their "
        "pixels count as defect-free, and with no defect pixel in any of its masks its row's pix AUROC and AUPRO "
        "are blank",
        f"note: 1 defective image(s) in {test / 'crack'} have a mask with no defect pixel: their pixels count as "
        "defect-free in pix AUROC and AUPRO",
    ]
    assert doc["notes"] == said and all(line in proc.stderr.splitlines() for line in said), proc.stderr
    assert doc["per_type"]["blowhole"]["pixel_auroc"] is None and doc["per_type"]["crack"]["pixel_auroc"] is not None
    assert doc["per_type"]["blowhole"]["n_defective"] == len(masks)  # still scored as defective images
    for mask in sorted((data / "ground_truth" / "crack").iterdir()):
        assert cv2.imwrite(str(mask), np.zeros_like(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)))
    doc, _ = _eval_json(tiny_bundle, data)
    assert doc["notes"][1] == (
        f"note: {TYPES['crack']} defective image(s) in {test / 'crack'} have a mask with no defect pixel: their pixels "
        "count as defect-free, and with no defect pixel in any of its masks its row's and overall's pix AUROC and "
        "AUPRO are blank"
    )
    assert doc["overall"]["pixel_auroc"] is None and doc["overall"]["image_auroc"] is not None


def test_the_recipe_line_gives_the_memory_banks_fitted_size_beside_its_cap(tiny_data, tmp_path):
    """`memory bank 16384` was printed, the recipe's cap, where the manifest records the bank fitted (a few hundred
    patches on a small set)."""
    from engines.bundle.store import load_bundle
    from engines.progress import Progress
    from engines.training.train import train_bundle

    bundle = train_bundle(
        tiny_data, tmp_path / "b", recipe="patchcore", size=(64, 64), progress=Progress(enabled=False)
    ).bundle
    fitted = load_bundle(bundle).manifest["training"]["memory_size"]
    assert 0 < fitted < 16384
    doc, proc = _eval_json(bundle, tiny_data)
    assert doc["memory_bank"] == fitted
    (recipe_line,) = [line for line in proc.stderr.splitlines() if line.startswith("recipe patchcore: ")]
    assert f", memory bank {fitted} (cap 16384), " in recipe_line
