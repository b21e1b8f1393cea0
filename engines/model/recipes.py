"""Recipes: every choice that shapes a detector, as data.

A recipe names the method, backbone, taps, input size and resize policy, scorer, patch-aggregation window, memory size,
k, smoothing sigma, how the image score pools the map (score_share) and which copies of the good images the scorer is
fitted on besides the images (augment). `inspectd train` writes the recipe it used into the bundle manifest ("recipe"),
the graph is rebuilt from it, and `inspectd eval` prints it. Nothing that shapes a detector is a module constant tuned
on one dataset: the catalogue below holds the named recipes, and `--recipe auto` (engines.training.select) chooses among
the AUTO_CANDIDATES, and each one's score_share and (with few images) augment, by scoring them on synthetic defects
planted in held-out good images, without labels.

The catalogue spans what surfaces need rather than what one dataset rewarded: fine taps and small windows keep small
sharp defects (scratches, pits, contamination on an object) sharp; coarse taps and wide windows let diffuse defects
(shading, uneven texture) stand out and suppress texture noise. A window that fits one kind of surface collapses on
the other, which is why the choice is made per station, on its own images.

This module needs no torch: evaluation and the manifest read it on a runtime-only station.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from engines.bundle.format import DEFAULT_SIGMA
from engines.bundle.store import recipe_refusal
from engines.runtime.scorer_fit import AUGMENTS, DEFAULT_MEMORY_SIZE

AUTO = "auto"
# The image score's pooling (engines.model.graph.ImageScore) averages POOL_BLOCK x POOL_BLOCK block means of the map,
# at most TOPK_LIMIT of them (TensorRT's TopK).
POOL_BLOCK = 4
TOPK_LIMIT = 3840
# The image-score pools auto tries on each candidate's maps, sharpest first: the maximum, the mean of the highest
# 0.1 %, 1 % and 5 % of the map, and the whole map's mean.
SCORE_SHARES = (0.0, 0.001, 0.01, 0.05, 1.0)
# Cells a side of the finest tap's grid a method's head needs: CSE pools its embedding 2x2
# (engines.model.methods.cse.CseHead), which a 1-cell grid cannot feed (at pool stride 1 its map's margin would be
# half the frame).
MIN_GRID_CELLS = {"cse": 2}


def pooled_count(share: float, height: int, width: int) -> int:
    """How many block means of a height x width map the image score averages; 0 = the map's maximum."""
    if share == 0.0:
        return 0
    return max(1, round(share * -(-height // POOL_BLOCK) * -(-width // POOL_BLOCK)))  # partial blocks count


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    method: str = "frozen"
    backbone: str = "lite0"
    taps: tuple[int, ...] = (16, 32)  # strides of the backbone's taps, shallowest first
    size: tuple[int, int] = (320, 320)  # model input, height x width
    resize: str = "stretch"
    scorer: str = "memory"
    aggregation: int = 1  # window x window mean of the features before scoring; 1 = none
    memory_size: int = DEFAULT_MEMORY_SIZE
    k: int = 2
    smoothing_sigma: float = DEFAULT_SIGMA
    # Share of the map's highest values whose mean is the image score; 0 = the map's maximum, 1 = its mean.
    score_share: float = 0.0
    # Copies of the fitting images the scorer is also fitted on (engines.runtime.scorer_fit.AUGMENTS).
    augment: str = "none"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "smoothing_sigma", float(self.smoothing_sigma))
        object.__setattr__(self, "score_share", float(self.score_share))

    def validate(self) -> Recipe:
        """Raise ValueError naming the field and what was expected; return self."""
        # Each field alone: the checks load_bundle makes on a manifest's recorded recipe.
        data = self.to_json()
        if refused := recipe_refusal(data):
            raise ValueError(f"recipe {self.name}: {refused}")
        grid = self.grid
        size = f"{self.size[0]}x{self.size[1]}"
        if min(grid) < MIN_GRID_CELLS.get(self.method, 1):
            raise ValueError(
                f"recipe {self.name}: --size {size} with --taps {'+'.join(map(str, self.taps))} gives a "
                f"{grid[0]}x{grid[1]} grid at the finest tap, expected at least {MIN_GRID_CELLS[self.method]} cells a "
                f"side for --method {self.method}: a larger --size or finer --taps"
            )
        if not self.window_fits():
            raise ValueError(
                f"recipe {self.name}: --aggregation {self.aggregation} at --size {size} is wider than the "
                f"{grid[0]}x{grid[1]} grid of the finest tap (stride {min(self.taps)}), expected an odd window of at "
                f"most {min(grid) - 1 + min(grid) % 2}: a wider one averages the whole map, which then localises "
                "nothing; a smaller --aggregation or a larger --size"
            )
        if max(1, math.ceil(4 * self.smoothing_sigma)) >= min(self.size):  # the blur reaches 4 sigma, reflected
            raise ValueError(
                f"recipe {self.name}: smoothing_sigma {self.smoothing_sigma} at {self.size[0]}x{self.size[1]}, "
                f"expected at most {(min(self.size) - 1) / 4:g} (the blur reaches 4 sigma into a map of that size)"
            )
        if self.augment not in AUGMENTS:
            raise ValueError(f"recipe {self.name}: augment {self.augment!r}, expected one of {', '.join(AUGMENTS)}")
        if not self.score_share_fits(self.score_share):
            raise ValueError(
                f"recipe {self.name}: score_share {self.score_share} averages {self.score_count} map blocks at "
                f"{self.size[0]}x{self.size[1]}, expected at most {TOPK_LIMIT} (TensorRT's TopK): a smaller share"
            )
        return self

    @property
    def grid(self) -> tuple[int, int]:
        """Cells of the finest tap's grid, height x width: the map the aggregation window moves over. Rounded up, as
        the backbone's padded stride-2 convolutions round each halving (200 px at stride 16: 13 cells, not 12)."""
        stride = max(1, min(self.taps, default=1))  # validate refuses taps below 2
        return -(-self.size[0] // stride), -(-self.size[1] // stride)

    def window_fits(self) -> bool:
        """Whether the aggregation window is no wider than the finest tap's grid (auto leaves out the candidates
        whose window does not fit at the size asked for)."""
        return self.aggregation <= min(self.grid)

    @property
    def score_count(self) -> int:
        return pooled_count(self.score_share, *self.size)

    def score_share_fits(self, share: float) -> bool:
        """Whether a share's TopK stays within TOPK_LIMIT at this recipe's size (the maximum and mean need none)."""
        return share in (0.0, 1.0) or pooled_count(share, *self.size) <= TOPK_LIMIT

    @property
    def tap_indices(self) -> tuple[int, ...]:
        """timm feature indices of the taps (0..4 = stride 2..32)."""
        return tuple(int(math.log2(t)) - 1 for t in self.taps)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["taps"] = list(self.taps)
        out["size"] = list(self.size)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(fields))}")
        # Before __post_init__, whose float() and int() would read the text "4" as a number or fail on a bare one.
        if refused := recipe_refusal(data):
            raise ValueError(f"recipe {data.get('name')}: {refused}")
        return cls(**data).validate()

    def architecture(self, head: dict[str, Any], channels: int) -> dict[str, Any]:
        """The manifest's architecture section, from which engines.model.graph.build_graph rebuilds the graph."""
        return {
            "method": self.method,
            "backbone": self.backbone,
            "taps": list(self.tap_indices),
            "head": head,
            "scorer": self.scorer,
            "aggregation": self.aggregation,
            "input_shape": [self.size[0], self.size[1], channels],
            "smoothing_sigma": self.smoothing_sigma,
            "score_share": self.score_share,
        }

    def summary(self) -> str:
        from engines.bundle.format import describe_recipe

        return describe_recipe(self.to_json())


def _frozen(name: str, taps: tuple[int, ...], window: int, description: str, scorer: str = "memory") -> Recipe:
    return Recipe(name, taps=taps, aggregation=window, scorer=scorer, description=description)


# Named recipes: PatchCore's first, the standard one, then from the sharpest maps to the widest context (auto breaks
# ties in this order; engines.training.select, step 5d). All are the frozen Lite0 backbone at 320x320 (stretched):
# only the taps, window and scorer differ, so `auto` extracts the backbone once and shares it among them.
CATALOGUE: dict[str, Recipe] = {
    r.name: r
    for r in (
        _frozen("patchcore", (8, 16), 3, "PatchCore's recipe: strides 8+16, 3x3 neighbourhood, coreset memory bank"),
        _frozen("fine", (8, 16), 1, "strides 8+16, no aggregation: the sharpest maps, small defects on fine texture"),
        _frozen("local", (16, 32), 3, "strides 16+32, 3x3: mid-size defects, more context per patch"),
        _frozen("context", (16, 32), 7, "strides 16+32, 7x7: textured surfaces whose defects span several patches"),
        _frozen("wide", (16, 32), 15, "strides 16+32, 15x15: diffuse defects (shading, uneven areas) on noisy texture"),
        _frozen(
            "aligned",
            (16, 32),
            1,
            "strides 16+32, a Gaussian per location: parts that sit in the same place in every frame",
            scorer="gaussian",
        ),
    )
}
AUTO_CANDIDATES = tuple(CATALOGUE)


def catalogue_recipe(name: str) -> Recipe:
    if name not in CATALOGUE:
        raise ValueError(f"--recipe {name!r}: expected {AUTO} or one of {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def auto_candidates(given: dict[str, Any] | None = None) -> list[Recipe]:
    """The auto candidates with the fields `given` (flags) set, less those whose window is wider than the finest
    tap's grid at the size given (Recipe.window_fits: `wide` at 64x64 would average the whole map); all of them where
    none fits, so that validate says why."""
    candidates = [CATALOGUE[name].replace(**(given or {})) for name in AUTO_CANDIDATES]
    return [r for r in candidates if r.window_fits()] or candidates
