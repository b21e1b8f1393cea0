"""`inspectd train` on datasets as users hand them over: 16-bit frames whose depth reads two ways, file names that
are not UTF-8."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.bundle.store import load_bundle
from engines.data.images import detect_bit_depth
from engines.progress import Progress
from engines.training.train import _bit_depth, add_arguments, run, train_bundle
from tiny_dataset import good_images, one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _sixteen_bit(folder: Path, n: int, shift: int, top: int) -> list[Path]:
    """n 16-bit PNGs of values 0..top shifted up by `shift` (the low bits always 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        values = rng.integers(0, top + 1, (32, 32), dtype=np.uint16)
        values[0, 0] = top
        path = folder / f"{i:03d}.png"
        assert cv2.imwrite(str(path), values << shift)
        paths.append(path)
    return paths


def test_a_bit_depth_the_values_read_two_ways_is_taken_by_value_and_said(tmp_path):
    """A 10-bit sensor in a Mono12 camera's words gives multiples of 4 up to 4092: taken as left-aligned 16-bit it
    narrowed to 15 grey levels. Below 2**14 with the low bits empty the images alone cannot say: train takes the
    reading that keeps every level, says so and names the other (the default train must not refuse such a set)."""
    good = tmp_path / "m12" / "train" / "good"
    paths = _sixteen_bit(good, 3, 2, 1023)
    lines: list[str] = []
    assert _bit_depth(paths, None, lines.append) == 12
    assert lines == [
        f"note: {good}: 16-bit images whose values all end in 2 zero bits and reach 4092: either 12-bit pixels or "
        "left-aligned 16-bit ones; taken as 12-bit (>> 4, every grey level kept; a frame above full scale "
        "saturates): --bit-depth 16 if the camera left-aligns its pixels"
    ]
    # Given, the depth decides either way.
    assert _bit_depth(paths, 12, lines.append) == 12 and _bit_depth(paths, 16, lines.append) == 16
    # A 12-bit camera's words left-aligned past 2**14 read one way only: 16.
    left = _sixteen_bit(tmp_path / "left", 2, 4, 4000)
    assert _bit_depth(left, None, lines.append) == 16 and not detect_bit_depth(left).ambiguous
    assert lines[-1].startswith("16-bit images: low 4 bits 0 in every value (left-aligned), taken as 16-bit")
    # Right-aligned 12-bit pixels with an odd value among them: by value, as before.
    right = _sixteen_bit(tmp_path / "right", 2, 0, 4001)
    assert _bit_depth(right, None, lines.append) == 12


def test_names_that_are_not_utf8_train_under_a_strict_locale(tmp_path):
    """Latin-1 names (a Windows ZIP unpacked): every image decoded and trained, then the checksum of the names
    raised, naming no file, and no bundle was written. In a folder of such a name too, with stdout strict as under
    de_DE.UTF-8 (PYTHONIOENCODING here), where the last line names --out."""
    data = Path(os.fsdecode(bytes(tmp_path) + b"/Daten_\xe4"))
    paths = good_images(data, 4)
    renamed = [Path(os.fsdecode(bytes(p.parent) + b"/Pr\xfcfteil_" + p.name.encode())) for p in paths[:2]]
    for path, name in zip(paths, renamed):
        path.rename(name)
    out = Path(os.fsdecode(bytes(tmp_path) + b"/b\xfc"))
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "train", "--data", str(data), "--out", str(out)]
        + ["--method", "frozen", "--size", "64", "--batch", "4"],
        cwd=REPO,
        capture_output=True,
        timeout=150,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    bundle = load_bundle(out)
    assert f"{tmp_path}/b\\udcfc: {bundle.model_id}," in done.stdout.decode("ascii")
    names = b"\n".join(sorted(os.fsencode(p.name) for p in data.iterdir()))
    assert bundle.manifest["training"]["names_sha256"] == hashlib.sha256(names).hexdigest()


def test_images_in_sub_folders_beside_loose_ones_are_said_to_be_left_out(tmp_path):
    """train/good/{000,001}.png beside day1/ and day2/ of 20 more trained on the 2 without a word: only a folder with
    no loose images got the hint. Training still reads only the loose ones, as eval reads test/<type>/."""
    root = tmp_path / "nested"
    good = root / "train" / "good"
    good_images(good, 2)
    for day, n in (("day1", 3), ("day2", 2)):
        good_images(good / day, n)
    good_images(good / "day2" / "cam1", 1)
    lines: list[str] = []
    result = train_bundle(
        root,
        tmp_path / "b",
        method="frozen",
        size=(64, 64),
        batch=4,
        progress=Progress(enabled=False),
        report=lines.append,
    )
    assert result.n_fit + result.n_holdout == 2
    assert (
        f"note: 6 images in sub-folders of {good} left out, only the images directly in it are trained on: "
        "train/good/day1/ (3), train/good/day2/ (2), train/good/day2/cam1/ (1); point --data at a sub-folder to "
        "train on it"
    ) in lines, lines


def test_a_symbolic_link_loop_as_data_or_out_is_a_one_line_error(tmp_path, capsys):
    loop_a, loop_b = tmp_path / "loopA", tmp_path / "loopB"
    os.symlink("loopB", loop_a)
    os.symlink("loopA", loop_b)
    data = tmp_path / "data"
    good_images(data, 2)
    for flag, argv in (
        ("--data", ["--data", str(loop_a), "--out", str(tmp_path / "b")]),
        ("--out", ["--data", str(data), "--out", str(loop_a)]),
    ):
        assert run(parse(*argv, "--size", "64", "--method", "frozen")) == 2
        assert capsys.readouterr().err == (
            f"inspectd train: {flag} {loop_a}: a symbolic link loop, expected a folder or a link to one\n"
        )
    assert not (tmp_path / "b").exists()


def test_the_first_thresholds_name_the_model_they_were_set_on(tmp_path):
    """Version 1's provenance named no model, so a daemon could not tell another model's version 1 (a copy of its
    thresholds.json, a rollback) from its own; teach's documents name theirs."""
    data = tmp_path / "data"
    good_images(data, 3)
    result = train_bundle(data, tmp_path / "b", method="frozen", size=(64, 64), batch=4, progress=Progress(False))
    bundle = load_bundle(result.bundle)
    thresholds = bundle.thresholds()
    assert thresholds.version == 1 and thresholds.provenance["model_id"] == bundle.model_id == result.model_id


def test_a_bad_weights_file_or_method_flag_is_refused_before_any_image_is_read(tmp_path, capsys):
    """--weights was first opened, and --cse-defects first parsed, once every training image was read and decoded
    (two passes over a large set) while the other flags are refused at once. --data names no folder here: reading it
    would be refused first ("not a directory")."""
    data, out = tmp_path / "no-such-data", tmp_path / "b"
    expected = "expected a torch state dict for tf_efficientnet_lite0"
    for weights, why in ((tmp_path / "missing.pth", "No such file or directory"), (tmp_path, "Is a directory")):
        argv = ["--data", str(data), "--out", str(out), "--method", "frozen", "--size", "64", "--weights", str(weights)]
        assert run(parse(*argv)) == 2
        assert capsys.readouterr().err == f"inspectd train: --weights {weights}: cannot read ({why}), {expected}\n"
    for flags, said in (
        (
            ["--method", "cse", "--cse-defects", "foo:1"],
            "--cse-defects foo:1: unknown defect 'foo', expected one of cutpaste, scar, cutout, perlin, shading",
        ),
        (["--method", "cse", "--cse-defect-fraction", "2"], "--cse-defect-fraction 2.0: expected a fraction in [0, 1]"),
        (["--method", "sla", "--sla-dim", "-1"], "--sla-dim -1: expected an integer >= 1"),
    ):
        assert run(parse("--data", str(data), "--out", str(out), "--size", "64", *flags)) == 2
        assert capsys.readouterr().err == f"inspectd train: {said}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--method", "sla", "--sla-lr", "nan"], "--sla-lr nan: expected a finite learning rate > 0"),
        (["--method", "sla", "--sla-lr", "inf"], "--sla-lr inf: expected a finite learning rate > 0"),
        (["--method", "sla", "--sla-lr", "0"], "--sla-lr 0.0: expected a finite learning rate > 0"),
        (["--method", "sla", "--sla-lr", "-1"], "--sla-lr -1.0: expected a finite learning rate > 0"),
        (["--method", "sla", "--sla-pool", "0"], "--sla-pool 0: expected an integer >= 1"),
        (["--method", "sla", "--sla-pool", "-1"], "--sla-pool -1: expected an integer >= 1"),
        (["--method", "cse", "--cse-lr", "nan"], "--cse-lr nan: expected a finite learning rate > 0"),
        (["--method", "cse", "--cse-lr", "inf"], "--cse-lr inf: expected a finite learning rate > 0"),
        (
            ["--method", "cse", "--cse-defects", "perlin:nan"],
            "--cse-defects perlin:nan: weight nan of 'perlin', expected a finite number >= 0",
        ),
        (
            ["--method", "cse", "--cse-defects", "perlin:1,scar:inf"],
            "--cse-defects perlin:1,scar:inf: weight inf of 'scar', expected a finite number >= 0",
        ),
        (
            ["--method", "cse", "--cse-defects", "perlin:-1"],
            "--cse-defects perlin:-1: weight -1 of 'perlin', expected a finite number >= 0",
        ),
        (
            ["--method", "cse", "--cse-defects", "perlin:1e308,scar:1e308"],
            "--cse-defects perlin:1e308,scar:1e308: the weights overflow when added, expected smaller ones "
            "(perlin:3,scar:1)",
        ),
        (["--method", "frozen", "--batch", "0"], "--batch 0: expected an integer >= 1"),
        # auto's candidates are all frozen: a CSE or SLA flag would be dropped without a word.
        (
            ["--cse-lr", "nan"],
            "--cse-lr nan: a flag of --method cse, which no recipe here trains with (frozen), expected --method cse or "
            "no --cse-lr",
        ),
        (
            ["--sla-pool", "3"],
            "--sla-pool 3: a flag of --method sla, which no recipe here trains with (frozen), expected --method sla or "
            "no --sla-pool",
        ),
        (["--method", "sla", "--sla-dim", "0"], "--sla-dim 0: expected an integer >= 1"),
        (
            ["--cse-lr", "0.0004"],  # its default value, given: still not what auto trains with
            "--cse-lr 0.0004: a flag of --method cse, which no recipe here trains with (frozen), expected --method cse "
            "or no --cse-lr",
        ),
        (
            ["--cse-regenerate"],
            "--cse-regenerate: a flag of --method cse, which no recipe here trains with (frozen), expected --method "
            "cse or no --cse-regenerate",
        ),
        (
            ["--method", "cse", "--sla-lr", "0.1"],
            "--sla-lr 0.1: a flag of --method sla, which no recipe here trains with (cse), expected --method sla or "
            "no --sla-lr",
        ),
        (["--method", "frozen", "--epochs", "-1"], "--epochs -1: expected an integer >= 0"),
        # A frozen backbone trains nothing: the epochs were dropped, and written into the manifest as if trained.
        (
            ["--method", "frozen", "--epochs", "50"],
            "--epochs 50: no recipe here trains a head (frozen fits only its scorer), expected --method cse or "
            "--method sla, or no --epochs",
        ),
        (
            ["--epochs", "5"],  # auto's candidates are all frozen
            "--epochs 5: no recipe here trains a head (frozen fits only its scorer), expected --method cse or "
            "--method sla, or no --epochs",
        ),
        # CSE pools its embedding 2x2: a 1-cell grid gave a traceback after decoding, taps and the defect pool.
        (
            ["--method", "cse", "--taps", "32", "--size", "32x64"],
            "recipe custom: --size 32x64 with --taps 32 gives a 1x2 grid at the finest tap, expected at least 2 cells "
            "a side for --method cse: a larger --size or finer --taps",
        ),
        (
            ["--method", "cse", "--taps", "32", "--size", "32", "--cse-pool-stride", "1"],
            "recipe custom: --size 32x32 with --taps 32 gives a 1x1 grid at the finest tap, expected at least 2 cells "
            "a side for --method cse: a larger --size or finer --taps",
        ),
        # auto leaves out the candidates whose window does not fit; where none does, it says so as auto.
        (
            ["--recipe", "auto", "--size", "32", "--aggregation", "5"],
            "recipe auto: no candidate's window fits (recipe patchcore: --aggregation 5 at --size 32x32 is wider than "
            "the 4x4 grid of the finest tap (stride 8), expected an odd window of at most 3: a wider one averages the "
            "whole map, which then localises nothing; a smaller --aggregation or a larger --size)",
        ),
    ],
)
def test_a_method_flag_that_would_fail_in_training_is_refused_before_any_image_is_read(tmp_path, capsys, flags, said):
    """A learning rate of nan or inf, a pool of 0 and a defect weight of nan or inf were taken until the method first
    used them, after every image was read and decoded (and with nan, trained to a NaN head without a word). --data
    names no folder here: reading it would be refused first ("not a directory")."""
    out = tmp_path / "b"
    assert run(parse("--data", str(tmp_path / "no-such-data"), "--out", str(out), "--size", "64", *flags)) == 2
    assert capsys.readouterr().err == f"inspectd train: {said}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--recipe", "patchcore", "--k", "16"],
            "--k 16: used only by the kmeans and kmeans_local scorers, and no recipe here scores with them (memory), "
            "expected --scorer kmeans or --scorer kmeans_local, or no --k",
        ),
        # Auto's candidates keep a memory bank or a Gaussian: none of them has references to count.
        (
            ["--recipe", "auto", "--k", "16"],
            "--k 16: used only by the kmeans and kmeans_local scorers, and no recipe here scores with them (gaussian, "
            "memory), expected --scorer kmeans or --scorer kmeans_local, or no --k",
        ),
        (
            ["--method", "frozen", "--k", "4"],
            "--k 4: used only by the kmeans and kmeans_local scorers, and no recipe here scores with them (gaussian), "
            "expected --scorer kmeans or --scorer kmeans_local, or no --k",
        ),
        (
            ["--scorer", "gaussian", "--memory-size", "100"],
            "--memory-size 100: used only by the memory scorer, and no recipe here scores with it (gaussian), "
            "expected --scorer memory, or no --memory-size",
        ),
        (
            ["--recipe", "patchcore", "--scorer", "kmeans", "--memory-size", "100"],
            "--memory-size 100: used only by the memory scorer, and no recipe here scores with it (kmeans), "
            "expected --scorer memory, or no --memory-size",
        ),
    ],
)
def test_a_scorer_flag_no_recipe_here_uses_is_refused_before_any_image_is_read(tmp_path, capsys, flags, said):
    """--k with a memory bank or a Gaussian, --memory-size with k-means or a Gaussian: dropped by the scorer without
    a word, the model the same as without it, while the manifest's recipe recorded the value as if it had shaped
    it. --data names no folder here: reading it would be refused first ("not a directory")."""
    out = tmp_path / "b"
    assert run(parse("--data", str(tmp_path / "no-such-data"), "--out", str(out), "--size", "64", *flags)) == 2
    assert capsys.readouterr().err == f"inspectd train: {said}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--recipe", "patchcore", "--memory-size", "100"],
        ["--recipe", "auto", "--memory-size", "100"],  # most candidates keep a memory bank
        ["--scorer", "kmeans", "--k", "4"],
        ["--recipe", "auto", "--scorer", "kmeans_local", "--k", "4"],
    ],
)
def test_a_scorer_flag_a_recipe_here_uses_is_taken(tmp_path, capsys, flags):
    """The refusal above is for flags no candidate uses: one that some scorer fits with goes on to the data."""
    data = tmp_path / "no-such-data"
    assert run(parse("--data", str(data), "--out", str(tmp_path / "b"), "--size", "64", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inspectd train: {data}") and err.count("\n") == 1, err


def test_a_seed_torch_cannot_take_is_refused_naming_the_flag(tmp_path, capsys):
    """torch.manual_seed takes at most 2**64 - 1: above it train stopped in torch's words ("Overflow when unpacking
    long long"), naming no flag."""
    top = str(2**64 - 1)
    assert parse("--data", "d", "--out", "o", "--seed", top).seed == 2**64 - 1
    with pytest.raises(SystemExit) as stop:
        parse("--data", "d", "--out", "o", "--seed", str(2**64))
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument --seed: {2**64}: expected an integer 0 to {top}\n")
    with pytest.raises(ValueError, match=rf"^--seed {2**64}: expected an integer 0 to {top}$"):
        train_bundle(tmp_path / "no-such-data", tmp_path / "b", method="frozen", size=(64, 64), seed=2**64)


def test_weights_this_user_may_not_read_are_refused_before_any_image_is_read(open_tmp_path):
    """Root reads any file: run as nobody (tests/other_user.py) while the weights file is root's, 0600."""
    from other_user import inspectd_without

    weights = open_tmp_path / "w.pth"
    weights.write_bytes(b"not read")
    data, out = open_tmp_path / "no-such-data", open_tmp_path / "b"
    done = inspectd_without(
        weights, "train", "--data", str(data), "--out", str(out), "--method", "frozen", "--size", "64",
        "--weights", str(weights),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"inspectd train: --weights {weights}: cannot read (Permission denied), expected a torch state dict for "
        "tf_efficientnet_lite0\n"
    )


def test_an_empty_weights_file_is_refused_before_any_image_is_read(tmp_path, capsys):
    """A 0-byte --weights (a failed download's or copy's remains) was opened fine, then torch's message-less
    EOFError ended train in an IndexError traceback once every training image was read and decoded."""
    weights = tmp_path / "lite0.pth"
    weights.touch()
    argv = ["--data", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "b"), "--method", "frozen"]
    assert run(parse(*argv, "--size", "64", "--weights", str(weights))) == 2
    assert capsys.readouterr().err == (
        f"inspectd train: --weights {weights}: empty file, expected a torch state dict for tf_efficientnet_lite0\n"
    )


HOLDOUT_0 = (
    "inspectd train: --holdout 0: the first thresholds would be set on the fitted images, which score about 0 against "
    "the model fitted on them, so every frame would be a defect; expected a fraction > 0 (default 0.1), or --recipe "
    "auto (thresholds from out-of-fold scores)\n"
)


@pytest.mark.parametrize("recipe", [["--recipe", "patchcore"], ["--method", "frozen"]], ids=["forced", "custom"])
def test_holdout_0_with_a_given_recipe_is_refused_before_any_image_is_read(tmp_path, capsys, recipe):
    """With nothing held out the first thresholds were set on the images just fitted: each scores about 0 against its
    own memory, so image threshold 1e-06 and pixel threshold 0 made every frame on the line a defect, and train
    said nothing. --data names no folder here: reading it would be refused first ("not a directory")."""
    out = tmp_path / "b"
    argv = ["--data", str(tmp_path / "no-such-data"), "--out", str(out), *recipe, "--size", "64", "--holdout", "0"]
    assert run(parse(*argv)) == 2
    assert capsys.readouterr().err == HOLDOUT_0
    assert not out.exists()


def test_auto_with_holdout_0_sets_its_thresholds_out_of_fold(tmp_path, capsys):
    """Auto scores its held-out images out of fold whatever --holdout says, so --holdout 0 is no reason to refuse."""
    data, out = tmp_path / "data", tmp_path / "b"
    good_images(data, 4)
    assert run(parse("--data", str(data), "--out", str(out), "--recipe", "auto", "--size", "64", "--holdout", "0")) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    provenance = load_bundle(out).thresholds().provenance
    assert provenance["images"] == "out-of-fold" and provenance["n_good"] == 4
    # The bound of its out-of-fold scores is said as for a held-out share; already auto, it is not told to use auto.
    lines = captured.out.splitlines()
    assert (
        "first image threshold above the 4 out-of-fold good image score(s): 4 good frames support a false-reject "
        "rate of at most 0.5271 (95% upper bound)"
    ) in lines, captured.out
    assert (
        "WARNING: the first image threshold is set on 4 out-of-fold image(s), fewer than 24: on the line it may reject "
        f"far more good frames than they did; `inspectd calibrate {out} --good DIR` on good frames the model was not "
        "fitted on"
    ) in lines, captured.out


def test_the_recipe_line_gives_the_memory_banks_fitted_size_beside_its_cap(tmp_path, capsys):
    """`memory bank 16384` was printed for a bank of a few hundred patches: the recipe's cap, not what was fitted."""
    data, out = tmp_path / "data", tmp_path / "b"
    good_images(data, 4)
    argv = ["--data", str(data), "--out", str(out), "--recipe", "patchcore", "--size", "64", "--holdout", "0.25"]
    assert run(parse(*argv)) == 0
    fitted = load_bundle(out).manifest["training"]["memory_size"]
    assert 0 < fitted < 16384
    (recipe_line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe patchcore: ")]
    assert f", memory bank {fitted} (cap 16384), " in recipe_line


def test_thresholds_set_on_few_held_out_images_say_the_rate_they_support(tmp_path, capsys):
    """A custom recipe (--size alone) on 12 images holds out 1, and the first image threshold is that image's score:
    a daemon on it rejected 85 % of a line's good frames, while train said only that the drift alarm was off. Train
    now says what those images support, as calibrate says it, and what sets the threshold on more."""
    data, out = tmp_path / "data", tmp_path / "b"
    good_images(data, 12)
    assert run(parse("--data", str(data), "--out", str(out), "--size", "64", "--batch", "4")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert load_bundle(out).thresholds().provenance["n_holdout"] == 1
    assert (
        "first image threshold above the 1 held-out good image score(s): 1 good frames support a false-reject rate "
        "of at most 0.95 (95% upper bound)"
    ) in lines, lines
    assert (
        "WARNING: the first image threshold is set on 1 held-out image(s), fewer than 24: on the line it may reject "
        "far more good frames than they did; `--recipe auto`, with any recipe flags given here (its threshold is set "
        "on out-of-fold scores: of every image below 60 images, of 24 or more above), or `inspectd calibrate "
        f"{out} --good DIR` on good frames the model was not fitted on"
    ) in lines, lines


def test_a_pixel_threshold_above_the_image_one_is_warned_of_by_train_as_by_calibrate():
    """Train wrote image threshold 36.82 and pixel threshold 51.59 (a mean-pooled score) without a word, and real
    defects were then published with no region; only calibrate warned. Both now print the one rule's WARNING, for
    models whose image score pools the map."""
    import dataclasses

    from engines.bundle.thresholds import regionless_warning
    from engines.model.recipes import catalogue_recipe
    from engines.training.train import TrainResult, threshold_lines

    bundle = Path("/srv/b")
    result = TrainResult(bundle, "m", False, 100, 30, 36.82, 51.59, 1.0, catalogue_recipe("patchcore"), 30)
    remedy = (
        f"`inspectd calibrate {bundle} --good DIR --pixel` sets the pixel threshold at a good-pixel rate (--pixel-fpr) "
        "on the same frames as the image one"
    )
    assert threshold_lines(result, auto=False)[1:] == [
        "WARNING: the pixel threshold 51.59 is above the image threshold 36.82, and an image score is at most its "
        "map's maximum: frames scored from 36.82 to below 51.59 can be defects with no region (an empty mask); "
        + remedy
    ]
    assert threshold_lines(result, auto=False)[1:] == [regionless_warning(36.82, 51.59, remedy=remedy)]
    # At or below the image threshold every defect keeps a region; a scorer's own image score is not a pooled map.
    assert threshold_lines(dataclasses.replace(result, pixel_threshold=36.82), auto=False)[1:] == []
    assert threshold_lines(dataclasses.replace(result, pools_the_map=False), auto=False)[1:] == []


def test_a_float_tiff_among_16_bit_images_is_refused_by_its_pixels_not_as_an_8_bit_one(tmp_path):
    """A float32 TIFF counted as 8-bit: beside 16-bit frames train refused the set as mixing "8-bit pixels" (the TIFF)
    with 16-bit ones, sending the operator to look for an 8-bit frame."""
    from engines.errors import DataError

    paths = _sixteen_bit(tmp_path / "good", 2, 0, 4000)
    tiff = tmp_path / "good" / "f.tiff"
    assert cv2.imwrite(str(tiff), np.full((32, 32), 0.5, np.float32))
    with pytest.raises(DataError) as raised:
        _bit_depth([*paths, tiff], None, print)
    assert str(raised.value) == f"{tiff}: dtype float32, expected unsigned 8- or 16-bit pixels (uint8 or uint16)"
