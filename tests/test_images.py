"""engines.data.images on real files: how a dataset folder's masks, defect-free folder, hidden folders and duplicated
files are found (every image written by OpenCV and read back through the project's own decoding)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.data.images import (
    HEAD_BYTES,
    MvtecFolder,
    ascii_name,
    duplicates_note,
    frames_checksums,
    good_folder,
    load_mask,
    subfolder_hint,
    without_duplicates,
)
from engines.errors import DataError


def _write(path: Path, seed: int, shape: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    return path


def _mask(path: Path, rows: slice) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((24, 32), np.uint8)
    mask[rows] = 255
    assert cv2.imwrite(str(path), mask)
    return path


def test_masks_are_found_under_mvtec_visa_and_btad_names_with_any_image_extension(tmp_path):
    """Only `<stem>_mask.png` used to be read: a VisA- or BTAD-style `<stem>.png`, a `.bmp` mask or `_mask.PNG` left
    the type without pixel metrics. `<stem>_mask.<ext>` is looked up before `<stem>.<ext>`."""
    root = tmp_path / "set"
    _write(root / "test" / "good" / "g.png", 0)
    gt = root / "ground_truth" / "scratch"
    names = {
        "a.png": "a_mask.png",  # MVTec AD
        "b.png": "b.png",  # VisA after anomalib's split, BTAD
        "c.jpg": "c_mask.bmp",
        "d.png": "d_mask.PNG",
        "e.PNG": "e.TIF",
        "f.png": "f_mask.png",  # beside a stem-named f.png: the _mask one wins
    }
    for i, (image, mask) in enumerate(names.items()):
        _write(root / "test" / "scratch" / image, i + 1)
        _mask(gt / mask, slice(i, i + 4))
    _mask(gt / "f.png", slice(20, 24))
    _write(root / "test" / "scratch" / "g_nomask.png", 9)
    items = {item.path.name: item for item in MvtecFolder(root).test_items()}
    assert {name: item.mask_path.name for name, item in items.items() if item.mask_path} == names
    assert items["g_nomask.png"].mask_path is None and items["g.png"].mask_path is None
    # Each mask is the one written for its image: its defect rows, decoded through load_mask.
    for i, image in enumerate(names):
        assert np.flatnonzero(load_mask(items[image].mask_path, (24, 32)).any(axis=1)).tolist() == list(
            range(i, i + 4)
        ), image
    assert MvtecFolder(root).unmatched_masks() == []


def test_a_photo_copied_into_ground_truth_is_never_its_own_mask_and_stems_match_in_any_case(tmp_path):
    """A dataset's own folder copied into ground_truth/ holds its photos beside their masks: magnetic tile's
    `exp1_num_1.jpg` by `exp1_num_1.png`, KolektorSDD2's `10000.png` by `10000_GT.png`. The photo, taken as the mask,
    marked every pixel a defect and gave believable figures without a word."""
    root = tmp_path / "set"
    gt = root / "ground_truth" / "crack"
    photo = _write(root / "test" / "crack" / "exp1_num_1.jpg", 1)
    gt.mkdir(parents=True)
    shutil.copy(photo, gt / "exp1_num_1.jpg")
    _mask(gt / "exp1_num_1.png", slice(0, 4))  # the real mask: lossless, beside the copied photo
    ksdd = _write(root / "test" / "crack" / "10000.png", 2)
    shutil.copy(ksdd, gt / "10000.png")  # the photo itself; its mask is named 10000_GT.png, which eval does not read
    _write(root / "test" / "crack" / "Part7.png", 3)
    _mask(gt / "part7_MASK.png", slice(8, 12))
    _write(root / "test" / "crack" / "a.png", 4)  # beside A.png's mask, its own spelt as it is
    _mask(gt / "A_mask.png", slice(0, 2))
    _mask(gt / "a_mask.png", slice(2, 4))
    items = {item.path.name: item.mask_path for item in MvtecFolder(root).test_items()}
    assert items == {
        "10000.png": None,
        "Part7.png": gt / "part7_MASK.png",
        "a.png": gt / "a_mask.png",
        "exp1_num_1.jpg": gt / "exp1_num_1.png",
    }


def test_masks_kept_in_a_folder_per_image_are_reported_not_skipped_without_a_word(tmp_path):
    """MVTec LOCO keeps each image's masks in a sub-folder of its own, which eval does not read."""
    root = tmp_path / "set"
    _write(root / "test" / "logical" / "000.png", 1)
    _mask(root / "ground_truth" / "logical" / "000" / "000.png", slice(0, 4))
    (unmatched,) = MvtecFolder(root).unmatched_masks()
    assert unmatched.folder == root / "ground_truth" / "logical" and unmatched.n_files == 1


def test_a_mask_folder_none_of_whose_files_match_is_reported_with_the_names_looked_for(tmp_path):
    root = tmp_path / "set"
    (root / "ground_truth" / "crack").mkdir(parents=True)
    for i in range(3):  # masks saved as arrays, which eval does not read
        _write(root / "test" / "crack" / f"{i:03d}.png", i)
        np.save(root / "ground_truth" / "crack" / f"{i:03d}.npy", np.zeros((24, 32), bool))
    (root / "ground_truth" / "crack" / "._000.png").write_bytes(b"\x00\x05\x16\x07")  # hidden: not counted
    _write(root / "test" / "dent" / "000.png", 7)  # no ground_truth/dent at all: nothing to report
    _write(root / "test" / "hole" / "000.png", 8)
    _mask(root / "ground_truth" / "hole" / "000_mask.png", slice(0, 4))
    (unmatched,) = MvtecFolder(root).unmatched_masks()
    assert unmatched.folder == root / "ground_truth" / "crack" and unmatched.n_files == 3
    assert unmatched.note() == (
        f"note: {root / 'ground_truth' / 'crack'} holds 3 file(s), none of them the mask of an image in test/crack/, "
        "so that type has no pixel metrics: expected 000_mask.png or 000.png (any image extension, any case)"
    )


@pytest.mark.parametrize("name", ["good", "Good", "OK", "ok"])
def test_the_defect_free_folder_is_good_or_ok_in_any_case_for_test_and_train(tmp_path, name):
    """BTAD's test/ok, an OK/NG set's OK or a `Good` folder used to be scored as a defect type without a mask, and
    train/ok was not a training set."""
    root = tmp_path / "set"
    _write(root / "train" / name / "t.png", 0)
    _write(root / "test" / name / "g.png", 1)
    _write(root / "test" / "ko" / "k.png", 2)
    _write(root / "test" / ".ipynb_checkpoints" / "x.png", 3)  # hidden: no defect type
    folder = MvtecFolder(root)
    assert folder.defect_types() == ["ko"] and folder.good_dir == root / "test" / name
    assert {item.path.name: (item.defect_type, item.is_defective) for item in folder.test_items()} == {
        "g.png": ("good", False),
        "k.png": ("ko", True),
    }
    assert good_folder(root, ("train",)) == root / "train" / name
    assert good_folder(root, ("test",)) == root / "test" / name


def test_two_defect_free_folders_are_refused_naming_both(tmp_path):
    root = tmp_path / "set"
    _write(root / "test" / "good" / "g.png", 0)
    _write(root / "test" / "OK" / "o.png", 1)
    _write(root / "train" / "good" / "t.png", 2)
    _write(root / "train" / "ok" / "t.png", 3)
    message = r"{}: {} and {} are both defect-free folders, expected one \(good/ or ok/, any case\)$"
    with pytest.raises(DataError, match=message.format(root / "test", "OK/", "good/")):
        MvtecFolder(root).test_items()
    with pytest.raises(DataError, match=message.format(root / "train", "good/", "ok/")):
        good_folder(root, ("train",))


def test_byte_identical_files_are_left_out_after_the_first(tmp_path):
    """Copies are found by their bytes: a re-encoded copy of the same pixels is another file and stays (hashing
    decoded pixels would cost a second decode of every frame)."""
    folder = tmp_path / "good"
    a, b, c = (_write(folder / f"{n}.png", i) for i, n in enumerate("abc"))
    copy, z, zz, bmp = (folder / n for n in ("a (copy).png", "z.png", "zz.png", "c.bmp"))
    shutil.copy(a, copy)
    shutil.copy(b, z)
    shutil.copy(a, zz)
    assert cv2.imwrite(str(bmp), cv2.imread(str(c), cv2.IMREAD_UNCHANGED))  # the same pixels, other bytes
    kept, left_out = without_duplicates([a, b, c, copy, bmp, z, zz])
    assert kept == [a, b, c, bmp]
    assert left_out == [(copy, a), (z, b), (zz, a)]
    assert duplicates_note(left_out, most=2) == (
        "note: 3 duplicate image(s) left out: a (copy).png (same as a.png), z.png (same as b.png) ..."
    )
    assert without_duplicates(kept) == (kept, [])


def _bytes_read() -> int:
    """Bytes this process has read through read() and its kin so far (Linux's /proc/self/io `rchar`)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar")


def test_fixed_size_frames_are_read_whole_only_when_their_heads_match(tmp_path):
    """Uncompressed frames (BMP, TIFF) all have one size, and every one of them was read in full to compare it: a
    calibrate read the training folder twice over. A file is now read whole only when its size and first HEAD_BYTES
    match another's, and copies are still found by all of their bytes: `late` differs from frame 1 only in its last
    row, past the head, and is kept."""
    if not Path("/proc/self/io").is_file():
        pytest.skip("no /proc/self/io to count the bytes read")
    folder = tmp_path / "frames"
    frames = [_write(folder / f"{i:02d}.bmp", i, (1024, 1024)) for i in range(10)]
    size = frames[0].stat().st_size
    assert size > 8 * HEAD_BYTES and all(f.stat().st_size == size for f in frames)
    copy = folder / "00 (copy).bmp"
    shutil.copy(frames[0], copy)
    late = folder / "01 late.bmp"
    pixels = cv2.imread(str(frames[1]), cv2.IMREAD_UNCHANGED)
    pixels[0] ^= 1  # BMP stores rows bottom-up: the first row is the file's last bytes
    assert cv2.imwrite(str(late), pixels) and late.stat().st_size == size
    assert late.read_bytes()[:HEAD_BYTES] == frames[1].read_bytes()[:HEAD_BYTES]
    paths = [*frames, copy, late]
    before = _bytes_read()
    kept, left_out = without_duplicates(paths)
    read = _bytes_read() - before
    assert kept == [*frames, late] and left_out == [(copy, frames[0])]
    # The heads of all 12, and in full only the two pairs whose heads match (every file whole would be 12 sizes).
    assert read <= 12 * HEAD_BYTES + 4 * size + HEAD_BYTES, (read, size)


def test_the_sub_folder_hint_names_only_folders_that_may_hold_good_frames(tmp_path):
    """The "no images" hint of train's --data and calibrate's and teach's --good named every sub-folder of images:
    an export with --verdict defect (test/defect/) or an MVTec root without test/good had `--good` pointed at the
    defect frames or at their masks. Only folders of good frames are named now: the defect-free one below a train/
    or test/ split, and any folder of a plain root (a folder per day or camera)."""
    export = tmp_path / "export"
    _write(export / "test" / "defect" / "1.png", 0)
    assert subfolder_hint(export, export, "--good") == ""
    mv = tmp_path / "mv"
    _write(mv / "test" / "crack" / "000.png", 1)
    _mask(mv / "Ground_Truth" / "crack" / "000_mask.png", slice(0, 4))
    _write(mv / "train" / "good" / "000.png", 2)
    assert subfolder_hint(mv, mv, "--good", mv / "train" / "good") == ""
    assert subfolder_hint(mv / "test", mv / "test", "--good") == ""  # a split given itself: its defect types
    _write(mv / "Test" / "OK" / "day1" / "000.png", 3)
    _write(mv / "test" / "crack" / "day1" / "001.png", 4)
    assert subfolder_hint(mv, mv, "--good", mv / "train" / "good") == (
        "; found 1 image in Test/OK/day1/: point --good at it"
    )
    plain = tmp_path / "plain"
    for day, n in (("day1", 2), ("day2", 1)):
        for i in range(n):
            _write(plain / day / f"{i}.png", i)
    _write(plain / "cam2" / "defect" / "0.png", 5)  # not a split: a camera's own folders are its business
    assert subfolder_hint(plain, plain, "--data") == (
        "; found 2 images in day1/: point --data at it; found 1 image in day2/: point --data at it; found 1 image "
        "in cam2/defect/: point --data at it"
    )


def test_names_are_hashed_as_their_bytes_with_the_digests_utf8_names_always_had(tmp_path):
    """A Latin-1 name (a Windows ZIP unpacked) has no str encoding: train failed at the checksums, after the whole
    training, in words naming no file. UTF-8 names keep the digest they had, so written bundles still match."""
    pixels = np.zeros((2, 4, 4, 1), np.uint8)
    names = [tmp_path / "frame 01.png", tmp_path / "Prüfteil_ü02.png", tmp_path / "部品03.png"]
    before = hashlib.sha256("\n".join(p.name for p in names).encode()).hexdigest()
    assert frames_checksums(names, pixels)["names_sha256"] == before
    latin1 = [Path(os.fsdecode(b"Pr\xfcfteil_0.png")), Path("ok_1.png")]
    assert (
        frames_checksums(latin1, pixels)["names_sha256"] == hashlib.sha256(b"Pr\xfcfteil_0.png\nok_1.png").hexdigest()
    )
    # What OpenCV's captions get: ASCII, the name's bytes that are not UTF-8 as \xNN.
    assert ascii_name(latin1[0].name) == "Pr\\xfcfteil_0.png"
    assert ascii_name("Prüf 部品.png") == "Pr\\xfcf \\u90e8\\u54c1.png"


def test_a_link_whose_target_is_gone_is_listed_and_named_as_an_image_that_cannot_be_read(tmp_path):
    """A folder of links into an archive since pruned: the dangling links were left out of the list with no word,
    the set simply smaller, while a file that does not decode or cannot be read is named in a WARNING."""
    from engines.data.images import list_images, load_image, skipped_warnings

    folder = tmp_path / "good"
    _write(folder / "a.png", 1)
    _write(tmp_path / "archive" / "b.png", 2)
    (folder / "b.png").symlink_to(tmp_path / "archive" / "b.png")
    (folder / "gone.png").symlink_to(tmp_path / "archive" / "pruned.png")
    (folder / "loop.png").symlink_to("loop.png")  # resolve() raises on a loop: still not an image to list
    (folder / "dir.png").mkdir()
    listed = list_images(folder)
    assert [p.name for p in listed] == ["a.png", "b.png", "gone.png"]
    failures = []
    for path in listed:
        try:
            load_image(path)
        except DataError as exc:
            failures.append((path, exc))
    assert skipped_warnings(failures) == [
        f"WARNING: skipped 1 image(s) that cannot be read: {folder / 'gone.png'} (No such file or directory)"
    ]
