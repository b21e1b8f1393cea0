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
    detect_bit_depth,
    duplicates_note,
    frames_checksums,
    good_folder,
    list_images,
    load_image,
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


def test_masks_kept_beside_their_images_in_test_are_refused_naming_the_first_and_the_layout(tmp_path):
    """Labelling tools save `x.jpg` and `x_mask.png` side by side: each mask was scored as one more defective image,
    which doubled the defect count and changed every metric, with nothing said."""
    root = tmp_path / "set"
    _write(root / "test" / "good" / "g.png", 0)
    _write(root / "test" / "scratch" / "b.jpg", 1)
    _mask(root / "test" / "scratch" / "b_mask.png", slice(0, 4))  # another extension than its image's
    _write(root / "test" / "scratch" / "c.png", 2)
    _mask(root / "test" / "scratch" / "c_mask.png", slice(0, 4))
    with pytest.raises(DataError) as refused:
        MvtecFolder(root).test_items()
    assert str(refused.value) == (
        f"{root / 'test' / 'scratch' / 'b_mask.png'}: a mask beside its image b.jpg, expected masks in "
        "ground_truth/scratch/<name>_mask.png and only images in test/scratch/"
    )
    # In test/good too: there each would be one more good image.
    shutil.rmtree(root / "test" / "scratch")
    _mask(root / "test" / "good" / "G_MASK.png", slice(0, 4))
    with pytest.raises(
        DataError, match=r"G_MASK\.png: a mask beside its image g\.png, expected masks in ground_truth/"
    ):
        MvtecFolder(root).test_items()


def test_images_whose_names_end_in_mask_without_their_image_beside_them_are_images(tmp_path):
    """Only a `_mask` name with its image beside it is a mask: a set whose images are named so (`face_mask.png`,
    a product) is read as before."""
    root = tmp_path / "set"
    _write(root / "test" / "good" / "face_mask.png", 0)
    _write(root / "test" / "torn" / "gas_mask.png", 1)
    _write(root / "test" / "torn" / "mask.png", 2)  # no stem before `_mask`
    _write(root / "test" / "torn" / "ski_mask_2.png", 3)
    _mask(root / "ground_truth" / "torn" / "gas_mask_mask.png", slice(0, 4))
    items = {item.path.name: item.mask_path for item in MvtecFolder(root).test_items()}
    assert items == {
        "face_mask.png": None,
        "gas_mask.png": root / "ground_truth" / "torn" / "gas_mask_mask.png",
        "mask.png": None,
        "ski_mask_2.png": None,
    }


@pytest.mark.parametrize(
    ("image", "mask"),
    [("10000.png", "10000_GT.png"), ("Part0.jpg", "Part0_label.bmp"), ("x.png", "X_gt.png"), ("y.png", "y_Label.png")],
)
def test_gt_and_label_masks_kept_beside_their_images_are_refused_as_mask_ones_are(tmp_path, image, mask):
    """KolektorSDD2 keeps `10000_GT.png` beside `10000.png`, KolektorSDD `Part0_label.bmp` beside `Part0.jpg`: copied
    into test/<type>/, each mask was scored as one more defective image, with nothing said."""
    root = tmp_path / "set"
    _write(root / "test" / "crack" / image, 1)
    _mask(root / "test" / "crack" / mask, slice(0, 4))
    with pytest.raises(DataError) as refused:
        MvtecFolder(root).test_items()
    assert str(refused.value) == (
        f"{root / 'test' / 'crack' / mask}: a mask beside its image {image}, expected masks in "
        "ground_truth/crack/<name>_mask.png and only images in test/crack/"
    )


@pytest.mark.parametrize(("first", "second"), [("exp1_num_1.jpg", "exp1_num_1.png"), ("A.png", "a.png")])
def test_two_files_of_one_name_in_a_test_folder_are_refused_naming_both(tmp_path, first, second):
    """The raw Magnetic-tile release keeps each mask as `x.png` beside its photo `x.jpg`: copied into test/<type>/,
    each was scored as one more image. Masks are found by name, so two images of one name (in any case) could not be
    told apart either."""
    root = tmp_path / "set"
    _write(root / "test" / "blowhole" / first, 1)
    _mask(root / "test" / "blowhole" / second, slice(0, 4))
    _write(root / "test" / "blowhole" / "other.png", 2)
    with pytest.raises(DataError) as refused:
        MvtecFolder(root).test_items()
    assert str(refused.value) == (
        f"{root / 'test' / 'blowhole' / first}: {first} and {second} share one name, expected one image per name in "
        "test/blowhole/ (masks are found by name; a mask kept beside its image goes in "
        "ground_truth/blowhole/<name>_mask.png)"
    )


def test_images_whose_names_merely_end_in_gt_or_label_are_images(tmp_path):
    """Only a suffixed name with its image beside it is a mask."""
    root = tmp_path / "set"
    for i, name in enumerate(["bolt_gt.png", "cable_label.png", "gt.png", "label_2.png"]):
        _write(root / "test" / "torn" / name, i)
    assert [item.path.name for item in MvtecFolder(root).test_items()] == [
        "bolt_gt.png",
        "cable_label.png",
        "gt.png",
        "label_2.png",
    ]


def test_test_good_is_not_read_where_only_the_defect_types_are_asked_for(tmp_path):
    """calibrate --defective ROOT reads the defect types only (test/good is --good's): a mask kept in test/good, which
    it does not read, refused it."""
    root = tmp_path / "set"
    _write(root / "test" / "good" / "g.png", 0)
    _mask(root / "test" / "good" / "g_mask.png", slice(0, 4))
    _write(root / "test" / "scratch" / "b.png", 1)
    assert [item.path.name for item in MvtecFolder(root).test_items(good=False)] == ["b.png"]
    with pytest.raises(DataError, match=r"g_mask\.png: a mask beside its image g\.png"):
        MvtecFolder(root).test_items()


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


def test_images_in_sub_folders_of_test_good_and_a_type_folder_are_noted_one_line_each(tmp_path):
    """Eval and calibrate read only the images directly in test/good and test/<type>: 9 good frames in day2/ and a
    type's 6 in batch1/ were left out without a word, while train said so of train/good."""
    root = tmp_path / "set"
    for i in range(2):
        _write(root / "test" / "good" / f"g{i}.png", i)
        _write(root / "test" / "good" / "day2" / f"d{i}.png", 10 + i)
    _write(root / "test" / "crack" / "batch1" / "c0.png", 20)
    _write(root / "test" / "hole" / "h0.png", 30)  # nothing below it: no line
    notes = MvtecFolder(root).nested_notes("evaluated", "move them up into it to evaluate them")
    good, crack = root / "test" / "good", root / "test" / "crack"
    assert notes == [
        f"note: 2 images in sub-folders of {good} left out, only the images directly in it are evaluated: "
        "test/good/day2/ (2); move them up into it to evaluate them",
        f"note: 1 image in sub-folders of {crack} left out, only the images directly in it are evaluated: "
        "test/crack/batch1/ (1); move them up into it to evaluate them",
    ]
    assert len(MvtecFolder(root).nested_notes("evaluated", "", good=False)) == 1


def _disc_and_line() -> np.ndarray:
    mask = np.zeros((96, 96), np.uint8)
    cv2.circle(mask, (40, 40), 12, 255, -1)
    mask[70:72, 10:90] = 255  # a thin scratch, which compression noise widens the most
    return mask


def test_a_jpeg_mask_is_defect_above_half_its_range_and_a_lossless_one_wherever_non_zero(tmp_path):
    """Around every edge a JPEG holds values of 1-30: read as `> 0` a mask saved as JPEG grew by a third, a thin
    scratch by more. 0/1 and label masks are lossless files and keep `> 0`."""
    truth = _disc_and_line()
    jpeg = tmp_path / "m.jpg"
    assert cv2.imwrite(str(jpeg), truth, [cv2.IMWRITE_JPEG_QUALITY, 75])
    read = load_mask(jpeg, truth.shape)
    assert abs(int(read.sum()) - int((truth > 0).sum())) <= 20, (read.sum(), (truth > 0).sum())
    labels = tmp_path / "labels.png"
    assert cv2.imwrite(str(labels), (truth > 0).astype(np.uint8) * np.uint8(1))  # 0/1
    assert np.array_equal(load_mask(labels, truth.shape), truth > 0)
    # A 0/1 or label mask saved as JPEG has no value above half the range: its defect is where it is not 0.
    for values, name in (((truth > 0).astype(np.uint8), "01.jpg"), ((truth > 0).astype(np.uint8) * 5, "label5.jpg")):
        assert cv2.imwrite(str(tmp_path / name), values, [cv2.IMWRITE_JPEG_QUALITY, 90])
        read = load_mask(tmp_path / name, truth.shape)
        assert abs(int(read.sum()) - int((truth > 0).sum())) <= 0.1 * (truth > 0).sum(), (name, read.sum())
    # Around a 1-pixel scratch or a small dot the noise outnumbers the defect's own pixels: its level is no guide.
    thin = np.zeros((256, 256), np.uint8)
    thin[100, 20:170] = 255
    dot = np.zeros((256, 256, 3), np.uint8)
    dot[50:53, 60:63] = (0, 0, 255)  # red, in OpenCV's BGR
    for image, name, area in ((thin, "thin.jpg", 150), (dot, "dot.jpg", 9)):
        assert cv2.imwrite(str(tmp_path / name), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert int(load_mask(tmp_path / name, (256, 256)).sum()) == area, name
    # A lossy WebP, as a JPEG.
    webp = tmp_path / "m.webp"
    assert cv2.imwrite(str(webp), truth, [cv2.IMWRITE_WEBP_QUALITY, 30])
    read = load_mask(webp, truth.shape)
    assert abs(int(read.sum()) - int((truth > 0).sum())) <= 0.05 * (truth > 0).sum(), (read.sum(), (truth > 0).sum())


def test_a_photo_under_the_images_name_in_ground_truth_is_not_its_mask_and_the_note_says_so(tmp_path):
    """KolektorSDD2's folder copied into ground_truth/ while test/ holds the photos re-saved as JPEG: the PNG photo
    differs in its bytes and was taken as the mask, nearly every pixel a defect, without a note. A JPEG mask (0/255
    and its compression noise) is still a mask."""
    root = tmp_path / "set"
    gt = root / "ground_truth" / "crack"
    for i in range(2):
        photo = np.random.default_rng(i).integers(30, 220, (24, 32), dtype=np.uint8)
        (root / "test" / "crack").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / "test" / "crack" / f"{i}.jpg"), photo)
        gt.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(gt / f"{i}.png"), photo)
    folder = MvtecFolder(root)
    assert [item.mask_path for item in folder.test_items()] == [None, None]
    # A class mask named as its image, its class value mid-grey over most of it, is one level: a mask, not a photo.
    class_mask = np.zeros((24, 32), np.uint8)
    class_mask[:, 4:] = 128
    other = root / "ground_truth" / "stain"
    other.mkdir(parents=True)
    (root / "test" / "stain").mkdir()
    assert cv2.imwrite(str(root / "test" / "stain" / "s.jpg"), np.full((24, 32), 90, np.uint8))
    assert cv2.imwrite(str(other / "s.png"), class_mask)
    assert [item.mask_path for item in MvtecFolder(root).test_items() if item.defect_type == "stain"] == [
        other / "s.png"
    ]
    (unmatched,) = folder.unmatched_masks()
    assert "(2 of them photos named as the images, most of their pixels neither black nor the defect's value)" in (
        unmatched.note()
    )
    _write(root / "test" / "hole" / "0.png", 5)
    mask = np.zeros((24, 32), np.uint8)
    cv2.circle(mask, (16, 12), 6, 255, -1)
    (root / "ground_truth" / "hole").mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "ground_truth" / "hole" / "0.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, 75])
    items = {item.path.name: item.mask_path for item in MvtecFolder(root).test_items()}
    assert items["0.png"] == root / "ground_truth" / "hole" / "0.jpg"


def test_a_16_bit_bigtiff_counts_as_16_bit(tmp_path):
    """BigTIFF (`II+`) decodes as uint16 but was taken as 8-bit: 12-bit frames narrowed >> 8 to grey levels 0-15,
    and a set mixing classic and BigTIFF files refused as of two depths."""
    from PIL import Image

    frame = np.full((16, 16), 4095, np.uint16)
    big, classic = tmp_path / "big.tif", tmp_path / "classic.tif"
    Image.fromarray(frame).save(big, big_tiff=True)
    Image.fromarray(frame).save(classic)
    assert big.read_bytes()[:4] == b"II+\x00"
    depth = detect_bit_depth([big, classic])
    assert depth is not None and depth.bits == 12
    assert int(load_image(big, depth.bits).max()) == 255


def test_files_opencv_decodes_under_other_suffixes_are_images(tmp_path):
    """.webp, .pgm/.ppm/.pnm and .jfif (what Windows and Chrome save a JPEG as) decode, and vanished from a folder
    beside PNGs without a word; a 16-bit PGM says its depth as a 16-bit PNG does."""
    grey = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    colour = np.dstack([grey] * 3)
    _write(tmp_path / "a.png", 1, (16, 16))
    assert cv2.imwrite(str(tmp_path / "b.webp"), colour)
    assert cv2.imwrite(str(tmp_path / "c.pgm"), grey)
    assert cv2.imwrite(str(tmp_path / "d.ppm"), colour)
    assert cv2.imwrite(str(tmp_path / "e.pnm"), grey)
    (tmp_path / "f.JFIF").write_bytes(cv2.imencode(".jpg", grey)[1].tobytes())
    found = list_images(tmp_path)
    assert [p.name for p in found] == ["a.png", "b.webp", "c.pgm", "d.ppm", "e.pnm", "f.JFIF"]
    assert all(load_image(p).shape[:2] == (16, 16) for p in found)
    deep = tmp_path / "deep"
    deep.mkdir()
    assert cv2.imwrite(str(deep / "g.pgm"), np.full((8, 8), 4095, np.uint16))
    depth = detect_bit_depth(list_images(deep))
    assert depth is not None and depth.bits == 12


def _float_tiff(path: Path) -> Path:
    assert cv2.imwrite(str(path), np.full((16, 16), 0.5, np.float32))
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.float32
    return path


@pytest.mark.parametrize("others", ["8-bit", "16-bit", "none"])
def test_a_float_tiff_is_named_by_its_pixels_not_counted_as_8_bit(tmp_path, others):
    """A float32 TIFF decodes, to pixels the model cannot take: detect_bit_depth counted it as 8-bit (beside 16-bit
    frames the set was refused as mixing "8-bit pixels" with 16-bit ones), and train, eval and teach said it did "not
    decode", sending the operator to look for a damaged file."""
    from engines.data.images import skipped_warnings

    paths = [_float_tiff(tmp_path / "f.tiff")]
    if others == "8-bit":
        paths.append(_write(tmp_path / "a.png", 1, (16, 16)))
    elif others == "16-bit":
        assert cv2.imwrite(str(tmp_path / "a.png"), np.full((16, 16), 4095, np.uint16))
        paths.append(tmp_path / "a.png")
    reason = f"{paths[0]}: dtype float32, expected unsigned 8- or 16-bit pixels (uint8 or uint16)"
    with pytest.raises(DataError) as raised:
        detect_bit_depth(paths)
    assert str(raised.value) == reason
    with pytest.raises(DataError) as loaded:
        load_image(paths[0])
    assert str(loaded.value) == reason  # one wording, whichever meets it first
    cut = tmp_path / "cut.png"
    cut.write_bytes(cv2.imencode(".png", np.zeros((16, 16), np.uint8))[1].tobytes()[:40])
    with pytest.raises(DataError) as undecoded:
        load_image(cut)
    assert skipped_warnings([(paths[0], loaded.value), (cut, undecoded.value)]) == [
        f"WARNING: skipped 1 image(s) that decode to pixels the model cannot take: {reason}",
        f"WARNING: skipped 1 image(s) that do not decode: {cut}",
    ]


def test_a_file_that_does_not_decode_is_refused_naming_every_format_images_may_be(tmp_path):
    """The refusal named JPEG/PNG/BMP/TIFF only, while .webp, .pgm/.ppm/.pnm files are read as images too."""
    bad = tmp_path / "bad.webp"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError) as raised:
        load_image(bad)
    assert str(raised.value) == f"{bad}: cannot decode, expected a JPEG/PNG/BMP/TIFF/PNM/WebP image"
