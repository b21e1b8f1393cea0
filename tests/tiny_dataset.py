"""A tiny MVTec-layout copy of real magnetic-tile images for the model-core tests (not a test module itself).

Tests skip, with the reason printed, where the shared data set is absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def require_data() -> Path:
    if not (DATA / "train" / "good").is_dir():
        pytest.skip(f"magnetic_tile data not found at {DATA}: these tests need real images")
    return DATA


def make_tiny_mvtec(
    root: Path, n_train: int = 12, n_test_good: int = 2, n_test_defect: int = 2, defect_type: str = "blowhole"
) -> Path:
    """root/train/good (n_train images), root/test/good, root/test/<defect_type> and its ground_truth masks."""
    data = require_data()
    for sub, source, count in (
        ("train/good", data / "train" / "good", n_train),
        ("test/good", data / "test" / "good", n_test_good),
        (f"test/{defect_type}", data / "test" / defect_type, n_test_defect),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir())[:count]:
            shutil.copy(path, root / sub / path.name)
            if sub.startswith("test/") and defect_type in sub:
                mask = data / "ground_truth" / defect_type / f"{path.stem}_mask.png"
                (root / "ground_truth" / defect_type).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, root / "ground_truth" / defect_type / mask.name)
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
