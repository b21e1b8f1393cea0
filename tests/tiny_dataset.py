"""The model-core tests' images (not a test module itself): tiny MVTec-layout copies and loose good or defective
frames, taken from the real magnetic-tile set where it is present and drawn from the synthetic line where it is not,
so training, export, calibrate, teach, recipes, suite and eval run on every machine.

The synthetic stand-in keeps what the tests rely on from the real tiles: grayscale JPEGs of several sizes and aspect
ratios (96-256 px a side, smaller than the tiles' 105-632 so the tests stay fast), one binary PNG mask per defective
image (`ground_truth/<type>/<stem>_mask.png`), names that sort in the order drawn (so the first n of a larger set are
the n of a smaller one), and any defect type name. Each image is seeded by its folder and index: two calls write
byte-identical files. `INSPECTD_TEST_DATA=synthetic` takes the synthetic path even where the real set exists.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.data.synthline import SyntheticLine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
SYNTHETIC = os.environ.get("INSPECTD_TEST_DATA", "") == "synthetic"
if os.environ.get("INSPECTD_TEST_DATA", "") not in ("", "synthetic"):
    raise ValueError(f"INSPECTD_TEST_DATA={os.environ['INSPECTD_TEST_DATA']}: expected synthetic, or unset")
SIDES = (96, 256)


def real_data() -> Path | None:
    """The magnetic-tile set, or None where the synthetic line stands in for it."""
    return None if SYNTHETIC or not (DATA / "train" / "good").is_dir() else DATA


def _synthetic(name: str, index: int, defective: bool) -> tuple[np.ndarray, np.ndarray | None]:
    # crc32, not hash(): str hashes change from one process to the next, and the files must not.
    seed = zlib.crc32(f"{name}/{index}".encode())
    lo, hi = SIDES
    height, width = np.random.default_rng(seed).integers(lo, hi + 1, size=2)
    line = SyntheticLine(int(width), int(height), defect_rate=1.0 if defective else 0.0, seed=seed)
    return line.next()


def _write(folder: Path, name: str, n: int, defective: bool, mask_folder: Path | None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image, mask = _synthetic(name, i, defective)
        path = folder / f"{name.replace('/', '_')}_{i:03d}.jpg"
        if not cv2.imwrite(str(path), image):
            raise OSError(f"{path}: cannot write JPEG")
        if mask is not None and mask_folder is not None:
            mask_folder.mkdir(parents=True, exist_ok=True)
            mask_path = mask_folder / f"{path.stem}_mask.png"
            if not cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255):
                raise OSError(f"{mask_path}: cannot write PNG")
        paths.append(path)
    return paths


def _copy(source: Path, folder: Path, n: int, mask_source: Path | None, mask_folder: Path | None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in sorted(source.glob("*.jpg"))[:n]:
        paths.append(Path(shutil.copy(path, folder / path.name)))
        if mask_source is not None and mask_folder is not None:
            mask_folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(mask_source / f"{path.stem}_mask.png", mask_folder)
    if len(paths) < n:
        raise FileNotFoundError(f"{source}: {len(paths)} JPEG(s), the test asks for {n}")
    return paths


def good_images(folder: Path, n: int, split: str = "train") -> list[Path]:
    """Write n defect-free images (of `split`'s good/, train or test) into folder; their paths, sorted."""
    data = real_data()
    if data is None:
        return _write(folder, f"{split}/good", n, False, None)
    return _copy(data / split / "good", folder, n, None, None)


def defect_images(folder: Path, kind: str, n: int, mask_folder: Path | None = None) -> list[Path]:
    """Write n defective images of type `kind` into folder, and their `<stem>_mask.png` into mask_folder (none where
    it is None); their paths, sorted."""
    data = real_data()
    if data is None:
        return _write(folder, kind, n, True, mask_folder)
    return _copy(data / "test" / kind, folder, n, data / "ground_truth" / kind, mask_folder)


def make_tiny_mvtec(
    root: Path, n_train: int = 12, n_test_good: int = 2, n_test_defect: int = 2, defect_type: str = "blowhole"
) -> Path:
    """root/train/good (n_train images), root/test/good, root/test/<defect_type> and its ground_truth masks. Called
    again on the same root with another defect type (and n_train=0, n_test_good=0) it adds that type."""
    good_images(root / "train" / "good", n_train, "train")
    good_images(root / "test" / "good", n_test_good, "test")
    defect_images(root / "test" / defect_type, defect_type, n_test_defect, root / "ground_truth" / defect_type)
    return root


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`. CI and dev boxes have two shared
    cores: torch's two intra-op threads then wait on each other at every small op (measured 30x slower under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
