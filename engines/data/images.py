"""The one image loader: decoding image files and walking MVTec-layout dataset folders.

Layout: `train/good/*`, `test/<type>/*`, `ground_truth/<type>/<stem>_mask.png` (optional). The defect-free folder
is `good` or `ok` in any case (MVTec AD's, BTAD's and OK/NG sets' names); `ground_truth/` and its type folders are
found in any case too (the name as spelt first); a mask is `<stem>_mask.<ext>` or `<stem>.<ext>` (VisA after
anomalib's split, BTAD), any image extension in any case. Names starting with "." are neither images nor folders of
them.
Images keep their own size and channel count (grayscale stays 2-D); colour images come back RGB. 16-bit pixels are
narrowed to 8 bits by the significant bits they hold (`bit_depth`): a bundle records the depth of the images it was
trained on (`input.bit_depth`), and every 16-bit frame it judges is narrowed with that depth.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.errors import DataError

# Every file OpenCV decodes that cameras, tools and browsers save frames as: `.jfif` is what Windows and Chrome save a
# JPEG as, and a suffix left out here made its images vanish from a folder without a word.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm"}

# How a refusal names the formats IMAGE_SUFFIXES holds: OpenCV decodes each by its content, whatever its suffix.
FORMATS = "JPEG/PNG/BMP/TIFF/PNM/WebP"

# A 16-bit file holds as many significant bits as its camera gave: 12-bit pixels (0-4095) shifted down by 8 would be
# 0-15, nearly black. Without a depth, 16-bit pixels are taken as using all 16 bits.
DEFAULT_BIT_DEPTH = 16  # engines.bundle.format.LEGACY_BIT_DEPTH: what a bundle that declares no depth narrows by


def decode_image(data: bytes | np.ndarray, what: str = "image", bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
    """Decode encoded bytes (JPEG, PNG, ...) to uint8 HxW (grayscale) or HxWx3 (RGB)."""
    return as_uint8_gray_or_rgb(decode_native(data, what), what, bit_depth)


def decode_native(data: bytes | np.ndarray, what: str = "image") -> np.ndarray:
    """Decode encoded bytes to the decoder's own array (any depth, BGR order); DataError when it cannot."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise DataError(f"{what}: empty file, expected an encoded image (JPEG, PNG, ...)")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # its own limits (size, memory) raise instead of returning None
        reason = (getattr(exc, "err", None) or str(exc)).strip().splitlines()[-1]
        raise DataError(f"{what}: cannot decode ({reason}), expected a {FORMATS} image") from None
    if image is None:
        raise DataError(f"{what}: cannot decode, expected a {FORMATS} image")
    return image


class PixelsRefused(DataError):
    """An image that decodes, to pixels the model cannot take (float, signed or 32-bit, two channels): told apart from
    a file that does not decode, which sends the operator looking for a damaged file."""


def narrow_to_uint8(image: np.ndarray, bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
    """16-bit pixels holding `bit_depth` significant bits, as uint8: full scale (2**bit_depth - 1) becomes 255, and
    anything above full scale saturates at 255."""
    if bit_depth == 16:
        return (image >> 8).astype(np.uint8)
    shifted = image >> (bit_depth - 8)
    np.minimum(shifted, 255, out=shifted)
    return shifted.astype(np.uint8)


def as_uint8_gray_or_rgb(image: np.ndarray, what: str = "image", bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
    if image.dtype == np.uint16:
        image = narrow_to_uint8(image, bit_depth)
    if image.dtype != np.uint8:
        raise PixelsRefused(f"{what}: dtype {image.dtype}, expected unsigned 8- or 16-bit pixels (uint8 or uint16)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim != 2:
        raise PixelsRefused(f"{what}: shape {image.shape}, expected HxW or HxWx3")
    return image


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def load_image(path: str | Path, bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
    path = Path(path)
    return decode_image(read_file(path), what=str(path), bit_depth=bit_depth)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Little- and big-endian, classic and BigTIFF (`+`: 64-bit offsets, which OpenCV decodes as it does classic TIFF).
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Binary and text PGM/PPM: 16-bit when their maximum value is above 255, which only decoding reads back simply.
PNM_MAGIC = (b"P2", b"P3", b"P5", b"P6")
JPEG_MAGIC = b"\xff\xd8"
BMP_MAGIC = b"BM"


def _eight_bit_only(head: bytes) -> bool:
    """Whether a file starting with `head` (26 bytes) decodes to 8-bit pixels whatever it holds: JPEG, BMP and WebP
    always do, a PNG by its header (IHDR's bit depth)."""
    if head.startswith(PNG_SIGNATURE):
        return len(head) >= 25 and head[24] != 16
    return head.startswith((JPEG_MAGIC, BMP_MAGIC)) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _sixteen_bit(path: Path) -> np.ndarray | None:
    """The image at `path` as decoded when it holds 16-bit pixels, None when 8-bit; a DataError when it does not
    decode, and PixelsRefused (as_uint8_gray_or_rgb's words) when it decodes to pixels of another type: a float32
    TIFF counted as 8-bit stood as the 8-bit half of a set refused as mixed. Only files whose header does not say
    8 bits (TIFF, PNM, a 16-bit PNG, anything unknown) are decoded."""
    try:
        with path.open("rb") as f:
            head = f.read(26)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if _eight_bit_only(head):
        return None
    image = decode_native(read_file(path), str(path))
    if image.dtype == np.uint16:
        return image
    if image.dtype != np.uint8:
        as_uint8_gray_or_rgb(image, str(path))  # raises, naming the dtype as loading the image would
    return None


@dataclasses.dataclass(frozen=True)
class DetectedDepth:
    bits: int
    largest: int  # the largest colour or grey value
    padding: int  # low bits 0 in every value (left-aligned pixels: a 12-bit camera's words shifted up by 4)

    @property
    def by_value(self) -> int:
        """The fewest even number of bits, at least 8, that holds the largest value: the depth of right-aligned
        pixels (cameras give 8, 10, 12, 14 or 16 bits; rounding up keeps a 12-bit camera at 12 when its training
        frames never reach 2048)."""
        bits = max(8, self.largest.bit_length())
        return bits + bits % 2

    @property
    def ambiguous(self) -> bool:
        """Whether the images can be read two ways: low bits 0 in every value (left-aligned 16-bit) and a largest
        value that also fits 14 bits or fewer (right-aligned pixels whose low bits are empty: a 10-bit sensor in
        Mono12 words gives multiples of 4 up to 4092). Taken as 16-bit such a set narrowed to a few grey levels;
        taken by its value a dark left-aligned set would saturate. Above 14 bits both readings give 16."""
        return self.padding >= 2 and self.by_value < 16

    def ambiguity(self, where: str | Path) -> str:
        """The note for an ambiguous set taken by its value: the values seen and the other reading."""
        return (
            f"note: {where}: 16-bit images whose values all end in {self.padding} zero bits and reach {self.largest}: "
            f"either {self.by_value}-bit pixels or left-aligned 16-bit ones; taken as {self.by_value}-bit (>> "
            f"{self.by_value - 8}, every grey level kept; a frame above full scale saturates): --bit-depth 16 if "
            "the camera left-aligns its pixels"
        )


def detect_bit_depth(paths: Sequence[str | Path]) -> DetectedDepth | None:
    """The significant bits of a training set of 16-bit images: 16 where the low two bits or more are 0 in every
    value (pixels left-aligned in their words, as some cameras and tools save them, so full scale is 16-bit's),
    else the fewest even number of bits, at least 8, that holds the largest colour or grey value
    (DetectedDepth.by_value). Where both readings fit (DetectedDepth.ambiguous) it is the value's, which keeps every
    grey level; train says so. None when every image is 8-bit; a DataError naming one of each when 8- and 16-bit
    images are mixed (they would be narrowed unlike each other), and one naming an image that does not decode or
    decodes to pixels of another type (PixelsRefused: a float32 TIFF)."""
    largest, ored, first_16, first_8 = 0, 0, None, None
    for path in map(Path, paths):
        image = _sixteen_bit(path)
        if image is None:
            first_8 = first_8 or path
            continue
        first_16 = first_16 or path
        colour = image[..., :3] if image.ndim == 3 and image.shape[2] == 4 else image  # not the alpha
        largest = max(largest, int(colour.max()))
        ored |= int(np.bitwise_or.reduce(colour, axis=None))
    if first_16 is None:
        return None
    if first_8 is not None:
        raise DataError(
            f"{first_8}: 8-bit pixels, and {first_16}: 16-bit, expected images of one bit depth (frames saved the "
            "same way from one camera)"
        )
    padding = (ored & -ored).bit_length() - 1 if ored else 0
    detected = DetectedDepth(16, largest, padding)
    left_aligned = padding >= 2 and not detected.ambiguous
    return detected if left_aligned else dataclasses.replace(detected, bits=detected.by_value)


# The defect-free folder's names, compared lower-cased: MVTec AD's `good`, BTAD's and OK/NG-style sets' `ok`. Train's
# train/good, calibrate's and eval's test/good are all this folder.
DEFECT_FREE_NAMES = ("good", "ok")
GOOD = "good"  # the type defect-free test images get, whichever of DEFECT_FREE_NAMES their folder is spelt
DEFECT_FREE_WORDS = "good/ or ok/, any case"


def defect_free_folders(split: Path) -> list[Path]:
    """Every sub-folder of `split` (a train/ or test/ folder) named as a defect-free one, sorted; [] when `split` is
    not a folder."""
    try:
        # The name first: a plain folder of thousands of images called train/ is not stat'ed file by file.
        return sorted(p for p in split.iterdir() if p.name.lower() in DEFECT_FREE_NAMES and p.is_dir())
    except (FileNotFoundError, NotADirectoryError):  # no such split here; one this user may not read says so
        return []


def defect_free_folder(split: Path) -> Path | None:
    """The defect-free sub-folder of `split` (train/ or test/), None when it has none; a DataError when it has two
    (test/good and test/OK), since either could be the defect-free images and the other a defect type."""
    found = defect_free_folders(split)
    if len(found) > 1:
        raise DataError(
            f"{split}: {' and '.join(p.name + '/' for p in found)} are both defect-free folders, expected one "
            f"({DEFECT_FREE_WORDS})"
        )
    return found[0] if found else None


def good_folder(root: str | Path, splits: Sequence[str] = ("train", "test")) -> Path:
    """The folder of good images a command given `root` reads: `root/<split>/good` (defect_free_folder's, so `ok`
    too) for the first of `splits` an MVTec-layout or archive-export root has, else `root` itself (a plain folder of
    images)."""
    root = Path(root)
    for split in splits:
        folder = defect_free_folder(root / split)
        if folder is not None:
            return folder
    return root


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted; hidden names are not images: a copy to exFAT, SMB or a USB stick from a
    Mac leaves an AppleDouble `._name.png` of metadata beside each image. A link whose target is gone (a folder of
    links into an archive since pruned) is listed: reading it fails, and each reader names it as it names any file
    that cannot be read ("No such file or directory"), where leaving it out made the set smaller without a word."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory, expected a folder of images")
    try:
        return sorted(
            p
            for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and (p.is_file() or _dangling(p))
        )
    except OSError as exc:  # a folder another user keeps to itself: is_dir() passes, listing it does not
        raise DataError(f"{folder}: cannot read ({exc.strerror or exc})") from None


def _dangling(path: Path) -> bool:
    # Not a link in a loop: Path.resolve() raises on one (RuntimeError in Python 3.11), and callers resolve the
    # images they are given.
    try:
        path.stat()
    except FileNotFoundError:
        return path.is_symlink()
    except OSError:
        return False
    return False


def image_folders(
    folder: Path, depth: int = 3, most: int = 3, keep: Callable[[Path], bool] | None = None
) -> list[tuple[Path, int]]:
    """Sub-folders of `folder` (at most `depth` levels down, the first `most` in sorted order) that hold images, with
    how many: a set one level too deep (train/good/batch1), spelt with capitals (Train/Good) or a --data one level
    too far down (cat/train) is then a sentence away from the right flag. A sub-folder `keep` says no to is neither
    listed nor looked into."""
    found: list[tuple[Path, int]] = []
    level = [folder]
    for _ in range(depth):
        below = []
        for parent in level:
            try:
                below += [d for d in parent.iterdir() if d.is_dir() and not d.name.startswith(".")]
            except OSError:  # unreadable: the hint is best effort, the refusal stands without it
                continue
        level = sorted(d for d in below if keep is None or keep(d))
        for sub in level:
            try:
                n = len(list_images(sub))
            except DataError:
                continue
            if n:
                found.append((sub, n))
                if len(found) == most:
                    return found
    return found


def nested_note(folder: Path, named_from: Path, read_as: str, hint: str, most: int = 3) -> str | None:
    """The note for images in sub-folders of `folder`, which a command reads only the images directly in (train's
    train/good, eval's and calibrate's test/good and test/<type>, calibrate's --good), the sub-folders named from
    `named_from` as the user typed it; None when there are none. Frames copied day by day into good/day1/, day2/
    beside a few loose ones were trained on, or calibrated on, the loose ones alone without a word."""
    found = image_folders(folder, most=1_000_000)
    if not found:
        return None
    n = sum(count for _, count in found)
    shown = ", ".join(f"{sub.relative_to(named_from).as_posix()}/ ({count})" for sub, count in found[:most])
    return (
        f"note: {n} image{'s' * (n != 1)} in sub-folders of {folder} left out, only the images directly in it are "
        f"{read_as}: {shown}{' ...' if len(found) > most else ''}; {hint}"
    )


SPLIT_NAMES = ("train", "test")  # the folders of an MVTec-layout root or an export that sort frames by kind


def _of_good_frames(names: Sequence[str]) -> bool:
    """Whether the folder at `names` (the root's own name, then the sub-folders down to it) may hold good frames: not
    masks (ground_truth/, any case) and, below a train/ or test/ split, only its defect-free folder (an export with
    --verdict defect writes test/defect/, MVTec's defect types are test/<type>/). The root's own name counts:
    `--good mv/test` holds test/crack/ too."""
    names = [name.lower() for name in names]
    if "ground_truth" in names:
        return False
    return all(after in DEFECT_FREE_NAMES for name, after in zip(names, names[1:]) if name in SPLIT_NAMES)


def subfolder_hint(root: Path, folder: Path, flag: str, leave_out: Path | None = None) -> str:
    """`; found N images in SUB/: point FLAG at it` for each sub-folder of `folder` that holds images (image_folders)
    and may hold good frames (train's --data, calibrate's and teach's --good all want those: pointed at defect frames
    or masks, calibrate would set the good frames' threshold above the defects), named from `root` as the user typed
    it, not `leave_out` nor below it: the hint train, teach and calibrate add to "no images"."""
    root_name = root.resolve().name  # `.` or a link is named by the folder it is

    def keep(sub: Path) -> bool:
        if leave_out is not None and sub.is_relative_to(leave_out):
            return False
        return _of_good_frames([root_name, *sub.relative_to(root).parts])

    return "".join(
        f"; found {n} image{'s' * (n != 1)} in {sub.relative_to(root).as_posix()}/: point {flag} at it"
        for sub, n in image_folders(folder, keep=keep)
    )


# Two frames of one scene and size nearly always differ in their first rows already (sensor noise): files are read in
# full only when this much of them matches another's, so fixed-size BMP or TIFF frames cost a read of their heads.
HEAD_BYTES = 64 * 1024


def _sha256(path: Path, limit: int | None) -> bytes | None:
    """The sha256 of the file's first `limit` bytes (all of it when None), None when it cannot be read: one this user
    may not read is no duplicate, and the decoding after it names it."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            if limit is not None:
                digest.update(f.read(limit))
            else:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    except OSError:
        return None
    return digest.digest()


def _narrowed(paths: Sequence[Path], keys: list[tuple | None], limit: int | None) -> list[tuple | None]:
    """`keys` with the file's digest (`limit` bytes of it) added where another file has the same key so far; None
    (a file no other can be a copy of) where none has, or where the file cannot be read."""
    counts = collections.Counter(key for key in keys if key is not None)
    narrowed: list[tuple | None] = []
    for path, key in zip(paths, keys):
        digest = _sha256(path, limit) if key is not None and counts[key] > 1 else None
        narrowed.append(None if key is None or digest is None else (*key, digest))
    return narrowed


def pixels_key(image: np.ndarray) -> bytes:
    """What two frames with the same pixels share, whatever their files' bytes (another PNG compression level, a
    metadata chunk, a stuck frame the camera encoded again): a digest of the array's shape, dtype and buffer."""
    digest = hashlib.sha256(f"{image.shape} {image.dtype.str}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


class FirstOf:
    """Frames met one at a time, each with its key (None: a copy of none): keep() says whether a frame is the first
    with its key, and `left_out` holds (the frame, the earlier one with the same key) for each it said no to. The one
    rule of which copy stays, for copies found by their bytes before decoding (without_duplicates) and by their pixels
    after (pixels_key), where frames are decoded one at a time."""

    def __init__(self) -> None:
        self._first: dict[Any, Path] = {}
        self.left_out: list[tuple[Path, Path]] = []

    def keep(self, path: Path, key: Any) -> bool:
        if key is None:
            return True
        earlier = self._first.setdefault(key, path)
        if earlier is path:
            return True
        self.left_out.append((path, earlier))
        return False


def without_duplicates(
    paths: Sequence[Path], pixels: Sequence[bytes] | None = None
) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """`paths` less every file whose bytes are an earlier one's, and (left out, the earlier file) for each left out.
    A twin of a held-out image in the fit scores it about 0, and the first thresholds set on it then reject every
    frame; a folder copied into itself or an `img (copy).png` is no second image. The bytes are compared before
    decoding (decoding hundreds of frames twice costs seconds): a file's size, then a digest of its first HEAD_BYTES,
    then of all of it, each only where the step before matched another file's. A file that cannot be read is kept.
    Once the frames are decoded, `pixels` (each path's pixels_key) compares them by their pixels instead: the same
    pixels in other bytes are as much a twin."""
    if pixels is not None:
        first = FirstOf()
        return [path for path, key in zip(paths, pixels, strict=True) if first.keep(path, key)], first.left_out
    keys: list[tuple | None] = []
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        # An empty file is no image to be a copy of: it is left to decoding, which names it.
        keys.append((size,) if size > 0 else None)
    keys = _narrowed(paths, keys, HEAD_BYTES)
    # A file no longer than the head was hashed whole already: its key is final; a longer one's is narrowed by all.
    whole = [key is not None and key[0] <= HEAD_BYTES for key in keys]
    longer = _narrowed(paths, [None if done else key for done, key in zip(whole, keys)], None)
    keys = [key if done else wider for done, key, wider in zip(whole, keys, longer)]
    first = FirstOf()
    return [path for path, key in zip(paths, keys) if first.keep(path, key)], first.left_out


def duplicates_note(left_out: Sequence[tuple[Path, Path]], most: int = 3, pixels: bool = False) -> str:
    """The one line that says which files without_duplicates left out (the first `most` named); `pixels`: those it
    compared by their pixels, whose bytes differ (so a byte compare of the two does not send the reader astray)."""
    shown = ", ".join(f"{path.name} (same as {earlier.name})" for path, earlier in left_out[:most])
    how = " (the same pixels in other bytes)" if pixels else ""
    return f"note: {len(left_out)} duplicate image(s){how} left out: {shown}" + (" ..." if len(left_out) > most else "")


def ascii_name(name: str) -> str:
    """`name` in ASCII, anything else as a backslash escape: the bytes of a name that is not UTF-8 (Latin-1 from a
    Windows ZIP, held as surrogate escapes) as `\\xfc`, other characters as `\\xfc` or `\\u90e8`. For what cannot take
    a name as it is: OpenCV's putText and imwrite end the process on a surrogate escape."""
    return os.fsencode(name).decode("utf-8", "backslashreplace").encode("ascii", "backslashreplace").decode("ascii")


def skipped_warning(paths: Sequence[Path]) -> str:
    """The WARNING for images left out because they do not decode (eval's, calibrate's and teach's)."""
    shown = ", ".join(str(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
    return f"WARNING: skipped {len(paths)} image(s) that do not decode: {shown}"


def refused_warning(refused: Sequence[DataError]) -> str:
    """The WARNING for images left out because they decode to pixels the model cannot take (PixelsRefused), each
    with its reason, which names the file and its dtype or shape."""
    shown = "; ".join(str(exc).splitlines()[0] for exc in refused[:5]) + (" ..." if len(refused) > 5 else "")
    return f"WARNING: skipped {len(refused)} image(s) that decode to pixels the model cannot take: {shown}"


def read_error(exc: DataError) -> str | None:
    """The system's reason (`Permission denied`) when `exc` says a file could not be read at all, None when it was
    read and does not decode: "does not decode" of a file this user may not read sends them to look at a sound
    image."""
    cause = exc.__cause__
    return (cause.strerror or str(cause)) if isinstance(cause, OSError) else None


def unread_warning(unread: Sequence[tuple[Path, str]], which: str = "that cannot be read") -> str:
    """The WARNING for images left out because a file could not be read: (the file, read_error's reason) each."""
    shown = ", ".join(f"{path} ({why})" for path, why in unread[:5]) + (" ..." if len(unread) > 5 else "")
    return f"WARNING: skipped {len(unread)} image(s) {which}: {shown}"


def skipped_warnings(failures: Sequence[tuple[Path, DataError]]) -> list[str]:
    """The WARNING lines for images left out, (the image, why) each: those that decode to pixels the model cannot
    take (a float32 TIFF, which "does not decode" sent the operator to look at as a damaged file), those that do not
    decode, then those that cannot be read, with the system's reason."""
    refused = [exc for _, exc in failures if isinstance(exc, PixelsRefused)]
    reasons = [(path, read_error(exc)) for path, exc in failures if not isinstance(exc, PixelsRefused)]
    undecoded = [path for path, why in reasons if why is None]
    unread = [(path, why) for path, why in reasons if why is not None]
    return (
        ([refused_warning(refused)] if refused else [])
        + ([skipped_warning(undecoded)] if undecoded else [])
        + ([unread_warning(unread)] if unread else [])
    )


LOSSY_SUFFIXES = {".jpg", ".jpeg", ".jfif"}
LOSSY_MASK_SUFFIXES = LOSSY_SUFFIXES | {".webp"}  # WebP may be lossy: read as a JPEG mask is
# A mask file is plainly a photo, not a mask, when more than this share of its pixels lie strictly between PHOTO_LEVELS
# of its dtype's range: a mask is 0 and its defect's value (255, 1, a label), JPEG's noise about the edges included,
# while a photo of a part is mostly mid-grey.
PHOTO_SHARE = 0.5
PHOTO_LEVELS = (0.1, 0.9)
PHOTO_MASK_LEVELS = 4  # ... and its PHOTO_MASK_LEVELS most frequent values cover under PHOTO_SHARE of it


def looks_like_photo(path: Path) -> bool:
    """Whether the mask file at `path` is plainly a photo (PHOTO_SHARE, PHOTO_LEVELS); False where it cannot be read
    or decoded, which whoever reads it as a mask names."""
    try:
        image = read_mask(path)
    except DataError:
        return False
    if image.dtype.kind != "u":
        return False
    if image.ndim == 3:
        image = image[..., :3].max(axis=2) if image.shape[2] in (3, 4) else image.max(axis=2)  # not the alpha
    top = float(np.iinfo(image.dtype).max)
    low, high = PHOTO_LEVELS[0] * top, PHOTO_LEVELS[1] * top
    if np.count_nonzero((image > low) & (image < high)) <= PHOTO_SHARE * image.size:
        return False
    # Mid-level values alone are no photo: a class value of 128 or a palette colour over most of a mask is one level.
    # A mask, JPEG noise and all, is a few levels; a photo spreads over many.
    _, counts = np.unique(image, return_counts=True)
    return bool(np.sort(counts)[-PHOTO_MASK_LEVELS:].sum() < PHOTO_SHARE * image.size)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and read_file(a) == read_file(b)
    except OSError:
        return False


class MaskFolder:
    """The masks of one ground_truth/<type>/ folder, listed once: the mask of test image `<stem>.<ext>` is
    `<stem>_mask.<ext>` (MVTec AD), else `<stem>.<ext>` (VisA after anomalib's split, BTAD), with any extension
    IMAGE_SUFFIXES names, names and extensions in any case. A lossless file before a JPEG of the same name, and never
    a copy of the image itself: a dataset's own folder copied into ground_truth/ holds its photos beside their masks
    (magnetic tile's `exp1_num_1.jpg` by `exp1_num_1.png`, KolektorSDD2's `10000.png` by `10000_GT.png`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.photos: set[Path] = set()  # candidates left out as photos (looks_like_photo)
        self.by_stem: dict[str, list[Path]] = {}
        if folder.is_dir():
            for path in sorted(list_images(folder), key=lambda p: (p.suffix.lower() in LOSSY_SUFFIXES, p.name)):
                self.by_stem.setdefault(path.stem.lower(), []).append(path)

    def mask_for(self, image: Path) -> Path | None:
        for stem in (f"{image.stem}_mask", image.stem):
            # The name as spelt first: `a.png` takes `a_mask.png` over an `A_mask.png` beside it.
            for path in sorted(self.by_stem.get(stem.lower(), []), key=lambda p: p.stem != stem):
                if _same_bytes(path, image):
                    continue
                # Only a file named as the image itself can be its photo in another encoding (KolektorSDD2's
                # `10000.png` copied into ground_truth/ while test/ holds it as JPEG): `_mask` names are masks by
                # name, and decoding each of them here would read every mask twice.
                if stem == image.stem and (path in self.photos or looks_like_photo(path)):
                    self.photos.add(path)
                    continue
                return path
        return None

    def unmatched(self, images: Sequence[Path], masks: Sequence[Path | None]) -> UnmatchedMasks | None:
        """What says none of `images` (a test/<type>/ folder's) found its mask (`masks`, mask_for's for each) in a
        folder that holds files; None where one did, or where there are no images or no files."""
        if not images or any(masks) or not (n_files := self.n_files()):
            return None
        return UnmatchedMasks(self.folder, n_files, self.expected_names(images[0]), len(self.photos))

    def n_files(self) -> int:
        """Entries of any kind in the folder (masks saved as .npy or .gif, or in a folder per image, are masks too);
        hidden ones (an AppleDouble `._000.png`) are not counted."""
        if not self.folder.is_dir():
            return 0
        try:
            # A folder too: MVTec LOCO keeps each image's masks in a sub-folder of its own.
            return sum(1 for p in self.folder.iterdir() if not p.name.startswith("."))
        except OSError as exc:
            raise DataError(f"{self.folder}: cannot read ({exc.strerror or exc})") from None

    @staticmethod
    def expected_names(image: Path) -> str:
        return f"{image.stem}_mask.png or {image.stem}.png"


GROUND_TRUTH = "ground_truth"


def mask_folder(root: Path, defect_type: str) -> Path:
    """The masks of test/<defect_type>/ of MVTec-layout `root`: ground_truth/<defect_type>/, each of the two names in
    any case (Ground_Truth/, or test/Blowhole/ beside ground_truth/blowhole/), as file names and the defect-free
    folder are matched: spelt otherwise, every mask of the type went unused without a word. The path as spelt where
    nothing matches (a type without masks); a DataError where two spellings of one folder are there, even an empty
    one."""
    return _any_case(_any_case(root, GROUND_TRUTH), defect_type)


def _any_case(parent: Path, name: str) -> Path:
    """The one sub-folder of `parent` named `name` in any case, `parent/name` where there is none; a DataError where
    there are several, the spelling given among them and empty ones too (either could be the one meant: an empty
    ground_truth/ a `mkdir -p` left beside Ground_Truth/ was taken, and every mask went unused without a word)."""
    try:
        found = sorted(p for p in parent.iterdir() if p.name.lower() == name.lower() and p.is_dir())
    except OSError:  # no such folder, or one this user may not list: whoever reads it says so
        return parent / name
    if len(found) > 1:
        shown = " and ".join(p.name + "/" + (" (empty)" if _empty(p) else "") for p in found)
        raise DataError(f"{parent}: {shown} differ only in case, expected one {name}/ folder")
    return found[0] if found else parent / name


def _empty(folder: Path) -> bool:
    try:
        return next(folder.iterdir(), None) is None
    except OSError:
        return False


class ImageFiles(Sequence[np.ndarray]):
    """Image files as a sequence of decoded images, each decoded when it is read and not kept: a training set of
    hundreds of full-size frames is held only as the model inputs fitted from it."""

    def __init__(self, paths: Sequence[str | Path], bit_depth: int = DEFAULT_BIT_DEPTH) -> None:
        self.paths = [Path(p) for p in paths]
        self.bit_depth = bit_depth

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return load_image(self.paths[index], self.bit_depth)

    @functools.cached_property
    def channels(self) -> int:
        """3 if any image is in colour (grey ones are then replicated), else 1; stops at the first colour image."""
        return 3 if any(image.ndim == 3 for image in self) else 1


def frames_checksums(paths: Sequence[Path], images: np.ndarray) -> dict[str, str]:
    """What says a later fit saw the very frames of an earlier one (train's, a teach's): the checksums of their names
    in order and of their pixels as the model takes them (after fitting to its input)."""
    return {
        # As bytes: a name that is not UTF-8 (Latin-1 from a Windows ZIP) has no str encoding, and a UTF-8 name
        # gives the digest it always gave, so bundles and teach records already written still match.
        "names_sha256": hashlib.sha256(b"\n".join(os.fsencode(p.name) for p in paths)).hexdigest(),
        "pixels_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
    }


@dataclasses.dataclass(frozen=True)
class TestItem:
    path: Path
    defect_type: str  # GOOD for defect-free (test/good or test/ok, any case), else its folder's name
    mask_path: Path | None  # None when the dataset has no mask for it (or it is good)

    @property
    def is_defective(self) -> bool:
        return self.defect_type != GOOD


@dataclasses.dataclass(frozen=True)
class UnmatchedMasks:
    """A ground_truth/<type>/ folder holding files of which none is the mask of one of test/<type>/'s images."""

    folder: Path
    n_files: int
    expected: str  # the names looked for, for the first image: "000_mask.png or 000.png"
    photos: int = 0  # of them, files named as an image that are photos, not masks (looks_like_photo)

    def note(self) -> str:
        photos = (
            f" ({self.photos} of them photos named as the images, most of their pixels neither black nor the "
            "defect's value)"
            if self.photos
            else ""
        )
        return (
            f"note: {self.folder} holds {self.n_files} file(s), none of them the mask of an image in test/"
            f"{self.folder.name}/{photos}, so that type has no pixel metrics: expected {self.expected} (any image "
            "extension, any case)"
        )


class MvtecFolder:
    """An MVTec-layout dataset root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not defect_free_folders(self.root / "train") and not (self.root / "test").is_dir():
            raise DataError(
                f"{self.root}: expected an MVTec-layout folder with train/good/ and/or test/<type>/ (the defect-free "
                f"folder {DEFECT_FREE_WORDS})"
            )

    @functools.cached_property
    def good_dir(self) -> Path | None:
        """test/good (or ok, any case), None when test/ has none."""
        return defect_free_folder(self.root / "test")

    def defect_types(self) -> list[str]:
        """The test/ sub-folders other than the defect-free one; hidden ones (.ipynb_checkpoints) are none."""
        test = self.root / "test"
        if not test.is_dir():
            return []
        good = self.good_dir
        return sorted(p.name for p in test.iterdir() if not p.name.startswith(".") and p.is_dir() and p != good)

    def test_items(self, good: bool = True) -> list[TestItem]:
        """test/good's items (unless not `good`: then test/good is not read at all, as by calibrate's --defective,
        which leaves it to --good) then each test/<type>/'s."""
        return (list(self._good_items) if good else []) + list(self._scan[0])

    def unmatched_masks(self) -> list[UnmatchedMasks]:
        """ground_truth/<type>/ folders that hold files but no mask of that type's images (masks named some other
        way): without this their type's pixel metrics would be missing without a word."""
        return list(self._scan[1])

    @functools.cached_property
    def _good_items(self) -> list[TestItem]:
        return [] if self.good_dir is None else [TestItem(p, GOOD, None) for p in list_test_images(self.good_dir)]

    @functools.cached_property
    def _scan(self) -> tuple[list[TestItem], list[UnmatchedMasks]]:
        items: list[TestItem] = []
        unmatched = []
        for defect_type in self.defect_types():
            paths = list_test_images(self.root / "test" / defect_type)
            masks = MaskFolder(mask_folder(self.root, defect_type))
            found = [masks.mask_for(path) for path in paths]
            items += [TestItem(path, defect_type, mask) for path, mask in zip(paths, found)]
            if none := masks.unmatched(paths, found):
                unmatched.append(none)
        return items, unmatched

    def nested_notes(self, read_as: str, hint: str, good: bool = True) -> list[str]:
        """nested_note's line for test/good (unless not `good`) and for each test/<type>/ with images in its
        sub-folders, which are left out of test_items as train leaves out those below train/good/."""
        folders = ([self.good_dir] if good and self.good_dir is not None else []) + [
            self.root / "test" / t for t in self.defect_types()
        ]
        return [note for folder in folders if (note := nested_note(folder, self.root, read_as, hint))]


# Names labelling tools and public sets give a mask kept beside its image: `x_mask.png` (labelling tools),
# `x_GT.png` (KolektorSDD2), `x_label.bmp` (KolektorSDD).
MASK_SUFFIXES = ("_mask", "_gt", "_label")


def list_test_images(folder: str | Path) -> list[Path]:
    """list_images' of one test folder (test/good, a test/<type>/, or such a folder given directly), or a DataError
    naming the first mask kept beside its image there (`x_mask.png`, `x_GT.png` or `x_label.png` by `x.png`, any
    case), or the first two files with one name (`x.jpg` and `x.png`, the raw Magnetic-tile layout): each mask
    scored as one more image doubled the defect count and changed every metric without a word, masks are found by
    name so two images of one name could not tell theirs apart, and which layout was meant is the user's to say,
    not a guess. Only a suffixed name with its image beside it: a set whose images merely end in `_mask` is read as
    before."""
    paths = list_images(folder)
    by_stem: dict[str, Path] = {}
    twins: list[tuple[Path, Path]] = []
    for path in paths:
        stem = path.stem.lower()
        if stem in by_stem:
            twins.append((by_stem[stem], path))
        else:
            by_stem[stem] = path
    for path in paths:
        stem = path.stem.lower()
        for suffix in MASK_SUFFIXES:
            image = by_stem.get(stem[: -len(suffix)]) if stem.endswith(suffix) else None
            if image is not None:
                kind = path.parent.name
                raise DataError(
                    f"{path}: a mask beside its image {image.name}, expected masks in "
                    f"{GROUND_TRUTH}/{kind}/<name>_mask.png and only images in test/{kind}/"
                )
    if twins:
        first, second = twins[0]
        kind = first.parent.name
        raise DataError(
            f"{first}: {first.name} and {second.name} share one name, expected one image per name in test/{kind}/ "
            f"(masks are found by name; a mask kept beside its image goes in {GROUND_TRUTH}/{kind}/<name>_mask.png)"
        )
    return paths


def load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Binary mask (bool HxW) for a test item; all False when there is none. Any non-zero value is a defect pixel, as
    in MVTec AD's evaluation: 0/255, 0/1, label indices, 16-bit or coloured masks all read the same (with an alpha
    channel: a transparent pixel is no defect, and a mask of one colour is read from its varying alpha). A lossy file
    (JPEG, WebP) is defect above half its defect's value instead (_defect_level): its compression noise around every
    edge is no defect. A mask of
    another size is scaled to the image only if it has the image's aspect ratio (a mask saved at another
    resolution); any other size is refused, since it belongs to another image or crop."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    return binary_mask(read_mask(path), shape, path)


def read_mask(path: Path) -> np.ndarray:
    """The mask file as decoded (any depth, its channels as saved); a DataError that says why when it cannot be read
    (`cannot read (Permission denied)`) or decoded. Read as bytes and decoded from memory, as images are: OpenCV's
    imread gives None whatever went wrong, and prints warning lines of its own."""
    return decode_native(read_file(path), f"{path}: mask")


def binary_mask(mask: np.ndarray, shape: tuple[int, int], path: Path) -> np.ndarray:
    """A decoded mask (read_mask's) as load_mask gives it: bool HxW at `shape`; a DataError when its size is
    another image's."""
    if mask.ndim == 3 and mask.shape[2] == 4:
        colour, alpha = mask[..., :3].max(axis=2), mask[..., 3]
        # A transparent pixel is no defect whatever colour an editor left under it; a mask drawn in the alpha alone
        # (one colour wherever it is not transparent, the alpha varying) is its alpha.
        opaque = colour[alpha > 0]
        drawn_in_alpha = opaque.size > 0 and opaque.min() == opaque.max() and alpha.min() != alpha.max()
        mask = alpha if drawn_in_alpha else np.where(alpha > 0, colour, 0)
    elif mask.ndim == 3:
        mask = mask.max(axis=2)
    level = _defect_level(mask, path)
    if mask.shape != shape:
        (mh, mw), (fh, fw) = mask.shape, shape
        if abs(mh * fw - mw * fh) > max(mh, mw, fh, fw):  # more than a pixel's rounding apart
            raise DataError(f"{path}: mask {mw}x{mh}, expected the image's size {fw}x{fh} (or the same aspect ratio)")
        mask = cv2.resize((mask > level).astype(np.uint8), (fw, fh), interpolation=cv2.INTER_NEAREST_EXACT)
        level = 0
    return mask > level


def _defect_level(mask: np.ndarray, path: Path) -> int:
    """The value above which a pixel of a (one-channel) mask is defect: 0 in a lossless file (0/1 and label masks),
    half its defect's value in a lossy one, whose noise around every edge (1-30 in a 0/255 JPEG) widened a JPEG mask by
    a third, a thin scratch's by more. The defect's value is the most frequent one in the top half of the mask's range
    (255, or 1 or a label in a 0/1 or label mask saved as JPEG): not the peak, which the noise overshoots, nor the most
    frequent of all, which the noise is around a 1-pixel scratch."""
    if path.suffix.lower() not in LOSSY_MASK_SUFFIXES or mask.dtype.kind != "u":
        return 0
    peak = int(mask.max())
    values, counts = np.unique(mask[mask >= (peak + 1) // 2], return_counts=True)
    return int(values[counts.argmax()]) // 2 if peak else 0


# The split's name as bundles record it (training.split, a teach record's frames.split): fixed strings, so that a
# rename of the functions below cannot change what a bundle records or make teach refuse the bundles already written.
SPLIT_HOLDOUT = "split_holdout"
VALIDATION_FOLDS = "validation_folds"


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices) of n images; at least one of each when there are two images or more. Training
    and `inspectd teach` split with it, so the same images and seed give the same share on both."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--holdout {fraction}: expected a fraction in [0, 1)")
    n_hold = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


# `--recipe auto`'s validation folds (engines.training.select): here, beside split_holdout, so that `inspectd teach`
# splits an auto bundle's frames as train did on a station without torch.
CROSS_FIT_BELOW = 60
CROSS_FIT_FOLDS = 4
MIN_HELD_OUT, MAX_HELD_OUT = 24, 80


@dataclasses.dataclass
class Fold:
    fit: np.ndarray  # indices into the image list
    held: np.ndarray


def validation_folds(n: int, holdout: float, seed: int) -> list[Fold]:
    """Cross-fitting folds below CROSS_FIT_BELOW images, else one held-out share of round(holdout * n) images,
    clamped to MIN_HELD_OUT..MAX_HELD_OUT (fewer gives noisy metrics, more costs time without changing the pick)."""
    if n < 2:
        raise ValueError(f"--recipe auto: {n} training image(s), expected at least 2 to hold one out")
    order = np.random.default_rng(seed).permutation(n)
    if n < CROSS_FIT_BELOW:
        parts = np.array_split(order, min(CROSS_FIT_FOLDS, n))
        return [Fold(np.sort(np.concatenate(parts[:i] + parts[i + 1 :])), np.sort(p)) for i, p in enumerate(parts)]
    n_held = int(np.clip(round(max(holdout, 0.1) * n), MIN_HELD_OUT, min(MAX_HELD_OUT, n // 2)))
    return [Fold(np.sort(order[n_held:]), np.sort(order[:n_held]))]
