"""The anomaly map lines up with the frame: a small defect lights up the map where it is, not a stride beside it.

The taps' grids cover the input exactly only when each side is a whole number of the coarsest tap's cells; elsewhere
the coarser taps land up to a stride beside the pixels they describe (the `local` map's peak a median 6 px off a spot
at 200x200, against 2 px at 320), so train refuses such sizes.

CSE's 2x2 pool at stride 1 gives a grid one cell shorter a side, half a cell in from each border: stretched over the
whole frame its peaks sat up to 7 px off towards the nearer border at 256 and 320 (none at the centre), so the graph
upsamples it over the inner frame only (engines.model.graph.MapUpsampling), in torch and in the exported ONNX alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.bundle.format import PIXELS
from engines.data.synthline import SyntheticLine
from engines.model.export import export_graph
from engines.model.graph import build_graph
from engines.model.recipes import CATALOGUE, Recipe
from tiny_dataset import one_torch_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[1]


def spotted(size: int, places: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A clean frame [1,H,W,1], and one copy of it per place with a 9-pixel dark spot there."""
    clean = SyntheticLine(size, size, defect_rate=0.0, seed=5).next()[0][None, :, :, None]
    frames = np.repeat(clean, len(places), axis=0)
    for frame, (y, x) in zip(frames, places):
        cv2.circle(frame, (x, y), 4, 0, -1)
    return clean, frames


def errors_of(maps: np.ndarray, places: list[tuple[int, int]]) -> list[float]:
    """How far each map's peak lands from its spot."""
    peaks = [np.unravel_index(int(np.argmax(m)), m.shape) for m in maps]
    return [float(np.hypot(py - y, px - x)) for (py, px), (y, x) in zip(peaks, places)]


def peak_errors(recipe: str, size: int) -> list[float]:
    """The real graph of `recipe` at size x size, its memory bank the features of the clean frame itself: how far
    the map's peak lands from a 9-pixel dark spot, at twelve places."""
    graph = build_graph(CATALOGUE[recipe].replace(size=(size, size)).architecture({}, channels=1)).eval()
    rng = np.random.default_rng(1)
    places = [(int(y), int(x)) for y, x in rng.integers(24, size - 24, (12, 2))]
    clean, frames = spotted(size, places)
    with torch.no_grad():
        features = graph.embed(torch.from_numpy(clean))
        bank = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        _, maps = graph(torch.from_numpy(frames), bank)
    return errors_of(maps.numpy(), places)


@pytest.mark.parametrize("recipe", ["local", "patchcore"])
def test_a_small_defect_lights_the_map_where_it_is(recipe):
    errors = peak_errors(recipe, 320)
    # A graph one stride off (16 or 32 px) fails both; the spread is where texture near a spot outscores its edge.
    assert np.median(errors) <= 4 and max(errors) <= 12, np.round(errors, 1)


@pytest.mark.parametrize("size", [256, 320])
@pytest.mark.parametrize("pool_stride", [1, 2])
def test_a_cse_map_lines_up_at_the_centre_and_near_every_border(pool_stride, size):
    """CSE (an untrained head: where the map's cells lie does not depend on the weights), its k-means reference the
    clean frame's own features. The spots sit on the centres of the coarsest grid's cells (32 px), the border ones in
    the second cell from the border: in the first, the map is flat out to the border and peaks on it. Torch and the
    exported ONNX must both find every spot."""
    recipe = Recipe("cse", method="cse", size=(size, size), scorer="kmeans")
    torch.manual_seed(0)
    graph = build_graph(recipe.architecture({"pool_stride": pool_stride}, channels=1)).eval()
    middle, near, far = size // 2 + 16, 48, size - 48
    places = [(y, x) for y in (near, middle, far) for x in (near, middle, far)]  # the centre, 4 sides, 4 corners
    clean, frames = spotted(size, places)
    with torch.no_grad():
        references = graph.embed(torch.from_numpy(clean))
        _, maps = graph(torch.from_numpy(frames), references)
    errors = errors_of(maps.numpy(), places)
    # Measured: 1-2 px everywhere. Stretched over the frame, stride 1's grid put the border spots 4-7 px off (up to
    # 9.9 px at a corner), the centre's 0-1.
    assert max(errors) <= 4, np.round(errors, 1)

    session = ort.InferenceSession(
        export_graph(graph, {"references": references.numpy()}), providers=["CPUExecutionProvider"]
    )
    _, onnx_maps = session.run(None, {PIXELS: frames, "references": references.numpy()})
    np.testing.assert_allclose(onnx_maps, maps.numpy(), rtol=1e-3, atol=1e-3 * float(maps.abs().max()))
    assert max(errors_of(onnx_maps, places)) <= 4


def test_train_refuses_a_size_the_taps_do_not_divide_in_one_line(tmp_path):
    (tmp_path / "d" / "train" / "good").mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "inspectd", "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "b")]
        + ["--recipe", "local", "--size", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "--size 200x200: expected each side a multiple of 32, the coarsest tap stride of recipe local "
            "(e.g. 192x192 or 224x224): at other sizes the map sits off the defects"
        )
    ), done.stderr
    assert not (tmp_path / "b").exists()
