"""The inference graph: uint8 NHWC pixels -> (image score [N], anomaly map [N, H, W]), one torch module per bundle.

    pixels -> Preprocess (to float, grey replicated to 3 channels, the backbone's normalisation)
           -> Backbone taps -> method head (frozen: TapConcat; CSE: embedding; SLA: its features)
           -> patch aggregation (mean over a window x window neighbourhood; 1 = none) -> features [N,D,h,w]
           -> scorer (nearest reference, memory bank or Gaussian) -> low-resolution map [N,h,w] (+ a global score
              for some scorers)
           -> bilinear upsampling to H x W (MapUpsampling: a grid that stops short of the borders is put back where
              it lies) -> Gaussian smoothing (the recipe's sigma) -> anomaly map
           -> image score: the map's maximum, or the mean of its highest share (the recipe's score_share).

The recipe (engines.model.recipes) decides taps, window, sigma, size and scorer; nothing here is tuned to a dataset.

Scorer parameters (references; Gaussian mean and precision) are graph INPUTS, not weights, so a refit or reload never
needs a re-export. Every frame is scored on its own: nothing is normalised across frames.

A graph is described by a JSON-able `architecture` dict (stored in the bundle manifest) from which `build_graph`
rebuilds it; the weights come from the backbone's ImageNet file (training) or the bundle's weights.npz (runtime).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines.bundle.format import DEFAULT_SIGMA, aggregation_of
from engines.model.backbones import Backbone, create_backbone
from engines.model.recipes import POOL_BLOCK, pooled_count
from engines.runtime import scorer_fit
from engines.runtime.scorer_fit import DEFAULT_MEMORY_SIZE


class Preprocess(nn.Module):
    """uint8 [N,H,W,C] -> normalised float [N,3,H,W]; (x/255 - mean)/std folded into one multiply-add."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"input channels {channels}: expected 1 (grey) or 3 (RGB)")
        self.channels = channels
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return x * self.scale + self.shift


class TapConcat(nn.Module):
    """All taps upsampled (bilinear) to the finest tap's grid and concatenated along channels: the frozen head, and
    the first step of learned heads."""

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        size = taps[0].shape[-2:]
        return torch.cat(
            [taps[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in taps[1:]], dim=1
        )


class PatchAggregation(nn.Module):
    """Mean of each location's window x window neighbourhood (PatchCore's local aggregation), borders averaged over
    the locations that exist. A patch then carries its surroundings: wide windows let diffuse defects stand out and
    blur small ones, which is why the window is a recipe field and not a constant."""

    def __init__(self, window: int = 1) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"aggregation window {window}: expected an odd number >= 1")
        self.window = int(window)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.window == 1:
            return features
        w = self.window
        return F.avg_pool2d(features, kernel_size=w, stride=1, padding=w // 2, count_include_pad=False)


class MapUpsampling(nn.Module):
    """Bilinear upsampling of a low-resolution [N,h,w] map to the frame's [N,H,W], cell centres on the pixels they
    describe. A head's grid usually tiles the whole frame (stride s: cell i centred at (i + 1/2) s), which is what
    align_corners=False assumes. A grid inset by `margin` pixels from every border (CSE's 2x2 pool at stride 1:
    cell i centred at (i + 1) s, half a cell in) tiles only the inner frame: stretched over the whole one, its cells
    would land up to half a cell off, towards the nearer border. It is upsampled over the inner frame, and the border
    strips repeat their edge, which is what bilinear resizing does beyond the outermost cell centres anyway."""

    def __init__(self, height: int, width: int, margin: int = 0) -> None:
        super().__init__()
        if margin < 0 or 2 * margin >= min(height, width):
            raise ValueError(f"map margin {margin} px: expected 0 to less than half of {height}x{width}")
        self.inner = (height - 2 * margin, width - 2 * margin)
        self.margin = int(margin)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        full = F.interpolate(low.unsqueeze(1), size=self.inner, mode="bilinear", align_corners=False)
        if self.margin:
            m = self.margin
            full = F.pad(full, (m, m, m, m), mode="replicate")
        return full.squeeze(1)


class GaussianSmoothing(nn.Module):
    """Fixed separable Gaussian blur (radius 4 sigma, reflected borders) of a [N,H,W] map."""

    kernel_y: torch.Tensor
    kernel_x: torch.Tensor

    def __init__(self, sigma: float = DEFAULT_SIGMA) -> None:
        super().__init__()
        radius = max(1, int(math.ceil(4 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel /= kernel.sum()
        self.radius = radius
        self.register_buffer("kernel_y", kernel.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("kernel_x", kernel.view(1, 1, 1, -1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps.unsqueeze(1)
        r = self.radius
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), self.kernel_y)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), self.kernel_x)
        return x.squeeze(1)


class ImageScore(nn.Module):
    """The image score of a [N,H,W] map: its maximum (share 0), its mean (share 1), or the mean of its highest
    `share` of POOL_BLOCK x POOL_BLOCK block means. On a noisy texture the maximum is one noise peak, while a
    defect raises a whole region; on a clean surface the maximum is the most sensitive to a pinhole. Which is better
    depends on the surface, so the share is a recipe field chosen by `--recipe auto`. The block means keep the
    count handed to TopK small (TensorRT's TopK has a limit, engines.model.recipes.TOPK_LIMIT) and lose little:
    the map is already smoothed."""

    def __init__(self, share: float, height: int, width: int) -> None:
        super().__init__()
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"score_share {share}: expected a share of the map in [0, 1]")
        self.share = float(share)
        # A constant of the graph (the map's size is the model input's), so the export's TopK has a fixed k.
        self.count = pooled_count(self.share, height, width)
        # Whole blocks end at (whole_h, whole_w); a side that is not a multiple of POOL_BLOCK leaves a strip of
        # partial blocks (and a corner) after them.
        self.whole_h, self.whole_w = height - height % POOL_BLOCK, width - width % POOL_BLOCK
        self.rest_h, self.rest_w = height % POOL_BLOCK, width % POOL_BLOCK

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.share == 0.0:
            return maps.flatten(1).amax(dim=1)
        if self.share == 1.0:
            return maps.flatten(1).mean(dim=1)
        if not (self.rest_h or self.rest_w):
            blocks = F.avg_pool2d(maps.unsqueeze(1), POOL_BLOCK).flatten(1)
        else:
            # The last rows and columns are partial blocks, each the mean of the pixels it holds: pooled apart from
            # the whole blocks (static slices and plain AveragePool, which every backend reads the same way, where
            # ceil-mode pooling's partial windows have not always been).
            h, w, b = self.whole_h, self.whole_w, POOL_BLOCK
            x = maps.unsqueeze(1)
            parts = [F.avg_pool2d(x[:, :, :h, :w], b).flatten(1)]
            if self.rest_h:
                parts.append(F.avg_pool2d(x[:, :, h:, :w], (self.rest_h, b)).flatten(1))
            if self.rest_w:
                parts.append(F.avg_pool2d(x[:, :, :h, w:], (b, self.rest_w)).flatten(1))
            if self.rest_h and self.rest_w:
                parts.append(x[:, :, h:, w:].flatten(1).mean(dim=1, keepdim=True))
            blocks = torch.cat(parts, dim=1)
        return blocks.topk(self.count, dim=1).values.mean(dim=1)


# --------------------------------------------------------------------------------------------------- scorers
class Scorer(nn.Module):
    """What every scorer declares: its graph inputs (in order), whether it gives an image score of its own (else
    ImageScore pools the map), and `fit(features, **settings)` -> those inputs as arrays."""

    kind: str
    input_names: tuple[str, ...]
    has_global_score: bool

    @staticmethod
    def fit(features: torch.Tensor, **settings) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def input_shapes(depth: int, height: int, width: int) -> dict[str, list]:
        """Each input's shape for features [N, depth, height, width], as export declares it: a row count that a refit
        may change (engines.bundle.format.VARIABLE_ROWS) is named after its input."""
        raise NotImplementedError


class NearestReferenceScorer(Scorer):
    """CSE's scorer. Input `references` [K,D,h,w]: real training feature maps nearest to k-means centroids.

    Image score: 1 - cosine(flattened features, nearest reference). Map: per-location squared distance to that same
    reference, summed over channels.
    """

    kind = "kmeans"  # in engines.bundle.format.OWN_IMAGE_SCORE
    input_names = ("references",)
    has_global_score = True

    @staticmethod
    def input_shapes(depth: int, height: int, width: int) -> dict[str, list]:
        return {"references": ["references", depth, height, width]}

    def forward(self, features: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = F.normalize(features.flatten(1), dim=1)
        refs = F.normalize(references.flatten(1), dim=1)
        best, index = (flat @ refs.T).max(dim=1)
        nearest = references.index_select(0, index)
        return 1.0 - best, (features - nearest).pow(2).sum(dim=1)

    @staticmethod
    def fit(features: torch.Tensor, k: int = 1, seed: int = 0, **settings) -> dict[str, np.ndarray]:
        """Spherical k-means on the flattened feature maps, references the nearest real samples
        (engines.runtime.scorer_fit.fit_kmeans, shared with `inspectd teach`)."""
        return scorer_fit.fit_kmeans(_as_array(features), k=k, seed=seed, **settings)


class LocalReferenceScorer(Scorer):
    """CSE's references scored per location, for surfaces that are not aligned from frame to frame (magnetic tiles
    vary in size and position): each location's distance is the squared distance to its nearest location in ANY
    reference map (a memory of K*h*w vectors), not to the same location of one whole-image reference. Same input
    `references` [K,D,h,w] and the same k-means fit as `NearestReferenceScorer`; image score: max of the map."""

    kind = "kmeans_local"
    input_names = ("references",)
    has_global_score = False
    input_shapes = staticmethod(NearestReferenceScorer.input_shapes)

    def forward(self, features: torch.Tensor, references: torch.Tensor) -> tuple[None, torch.Tensor]:
        n, d, h, w = features.shape
        memory = references.permute(0, 2, 3, 1).reshape(-1, d)
        query = features.permute(0, 2, 3, 1).reshape(n, h * w, d)
        # |q - m|^2 expanded so the (h*w) x (K*h*w) distance matrix is one matmul.
        squared = (query.pow(2).sum(-1, keepdim=True) - 2.0 * query @ memory.T + memory.pow(2).sum(-1)).amin(-1)
        return None, squared.clamp_min(0).reshape(n, h, w)

    fit = staticmethod(NearestReferenceScorer.fit)


def _as_array(features: torch.Tensor) -> np.ndarray:
    return features.detach().cpu().float().numpy()


class MemoryBankScorer(Scorer):
    """PatchCore's scorer (Roth et al., "Towards total recall in industrial anomaly detection", CVPR 2022). Input
    `memory_bank` [M,D]: patch features of ALL training images, locally aggregated and cut to M by greedy k-center
    coreset selection. Map: per location, the Euclidean distance from its aggregated feature to the nearest memory
    vector (any position of any training image, so tiles need not be aligned); image score: the recipe's pool of
    the smoothed map (ImageScore).
    The features arrive already aggregated (the graph's PatchAggregation, the recipe's window).

    The nearest-neighbour search is one matmul per batch; its [N, h*w, M] matrix is the scorer's transient memory
    (N*h*w*M*4 bytes: 17 MB per frame for 16x16 locations and M = 16 384) and its cost h*w*M*D*2 FLOP (3.6 GFLOP per
    frame at 256x256 with Lite0's 432 channels at strides 16+32, several times the backbone's).
    """

    kind = "memory"
    input_names = ("memory_bank",)
    has_global_score = False

    @staticmethod
    def input_shapes(depth: int, height: int, width: int) -> dict[str, list]:
        return {"memory_bank": ["memory_bank", depth]}

    def forward(self, features: torch.Tensor, memory_bank: torch.Tensor) -> tuple[None, torch.Tensor]:
        n, d, h, w = features.shape
        query = features.permute(0, 2, 3, 1).reshape(n, h * w, d)
        # The search ranks |m|^2 - 2 q.m (|q - m|^2 less |q|^2): one matmul. Its cancellation error is too large
        # for the distance itself (a patch in the memory came out at 0.05, not 0), so that is recomputed exactly
        # against the one nearest vector.
        nearest = (memory_bank.pow(2).sum(-1) - 2.0 * query @ memory_bank.T).argmin(-1)
        difference = query - memory_bank[nearest]
        return None, difference.pow(2).sum(-1).sqrt().reshape(n, h, w)

    @staticmethod
    def fit(
        features: torch.Tensor, memory_size: int = DEFAULT_MEMORY_SIZE, seed: int = 0, **settings
    ) -> dict[str, np.ndarray]:
        """Greedy k-center coreset of `memory_size` patches over a random pool of CORESET_POOL x `memory_size`
        (engines.runtime.scorer_fit.fit_memory, shared with `inspectd teach`)."""
        return scorer_fit.fit_memory(_as_array(features), memory_size=memory_size, seed=seed, **settings)


class GaussianScorer(Scorer):
    """Mahalanobis distance per location. Inputs `gauss_mean` [D,h,w] (a mean per location) and `gauss_precision`
    [D,D] (the inverse of ONE covariance shared by all locations, Ledoit-Wolf shrunk).

    Why shared: a full covariance per location (PaDiM) costs h*w*D^2 floats -- 191 MB for Lite0's 432 channels on a
    16x16 grid -- and needs far more images than a line usually has to be well conditioned; the shared one is D^2
    floats (0.75 MB) estimated from N*h*w samples and keeps every channel. Image score: the recipe's pool of the map.
    """

    kind = "gaussian"
    input_names = ("gauss_mean", "gauss_precision")
    has_global_score = False

    @staticmethod
    def input_shapes(depth: int, height: int, width: int) -> dict[str, list]:
        return {"gauss_mean": [depth, height, width], "gauss_precision": [depth, depth]}

    def forward(self, features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> tuple[None, torch.Tensor]:
        n, d, h, w = features.shape
        centred = (features - mean.unsqueeze(0)).reshape(n, d, h * w)
        squared = (centred * torch.matmul(precision, centred)).sum(dim=1)
        return None, squared.clamp_min(0).sqrt().reshape(n, h, w)

    @staticmethod
    def fit(features: torch.Tensor, **settings) -> dict[str, np.ndarray]:
        """Per-location mean and one Ledoit-Wolf shrunk covariance of the residuals
        (engines.runtime.scorer_fit.fit_gaussian, shared with `inspectd teach`)."""
        return scorer_fit.fit_gaussian(_as_array(features), **settings)


SCORERS: dict[str, type[Scorer]] = {
    "kmeans": NearestReferenceScorer,
    "kmeans_local": LocalReferenceScorer,
    "gaussian": GaussianScorer,
    "memory": MemoryBankScorer,
}


def scorer_class(kind: str) -> type[Scorer]:
    if kind not in SCORERS:
        raise ValueError(f"scorer {kind!r}: expected one of {', '.join(SCORERS)}")
    return SCORERS[kind]


# --------------------------------------------------------------------------------------------------- the graph
class InferenceGraph(nn.Module):
    """forward(pixels uint8 [N,H,W,C], *scorer_params) -> (score float32 [N], anomaly_map float32 [N,H,W])."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        scorer: Scorer,
        input_shape: tuple[int, int, int],
        sigma: float = DEFAULT_SIGMA,
        aggregation: int = 1,
        score_share: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.preprocess = Preprocess(self.input_shape[2], backbone.spec.mean, backbone.spec.std)
        self.backbone = backbone
        self.head = head
        self.aggregation = PatchAggregation(aggregation)
        self.scorer = scorer
        # A head whose grid stops short of the frame's borders says by how much, in cells of the finest tap.
        margin = float(getattr(head, "map_inset", 0.0)) * backbone.strides[0]
        if margin != int(margin):
            raise ValueError(f"head map inset {margin} px: expected a whole number of pixels")
        self.upsampling = MapUpsampling(self.input_shape[0], self.input_shape[1], int(margin))
        self.smoothing = GaussianSmoothing(sigma)
        self.image_score = ImageScore(score_share, *self.input_shape[:2])

    @property
    def scorer_inputs(self) -> tuple[str, ...]:
        return tuple(self.scorer.input_names)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features [N,D,h,w] that the scorer compares: what training fits the scorer on."""
        return self.embed_taps(self.backbone(self.preprocess(pixels)))

    def embed_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """The part of `embed` after the backbone, for callers that computed the taps once (recipe selection)."""
        return self.aggregation(self.head(taps))

    def forward(self, pixels: torch.Tensor, *scorer_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_features(self.embed(pixels), *scorer_params)

    def score_features(
        self, features: torch.Tensor, *scorer_params: torch.Tensor, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The second half of forward, for callers that computed the features once (evaluating several scorers).
        `step` runs the scorer on that many images a call (a nearest-neighbour search's distance matrix is what grows
        with the input); the maps are still smoothed and pooled as one batch, whose convolution's last bits depend on
        the batch's size, so no score changes."""
        if step is None or step >= len(features):
            global_score, low = self.scorer(features, *scorer_params)
        else:
            parts = [self.scorer(features[s : s + step], *scorer_params) for s in range(0, len(features), step)]
            global_score = None if parts[0][0] is None else torch.cat([g for g, _ in parts])
            low = torch.cat([m for _, m in parts])
        anomaly_map = self.smoothing(self.upsampling(low))
        score = global_score if global_score is not None else self.image_score(anomaly_map)
        return score, anomaly_map


def build_graph(architecture: dict, pretrained: bool = True, weights: str | None = None) -> InferenceGraph:
    """Rebuild a graph from its manifest description. `pretrained=False` leaves the weights to the caller
    (a bundle's weights.npz); `weights` is the user's --weights for the backbone."""
    from engines.model.methods import get_method

    sigma = architecture.get("smoothing_sigma", DEFAULT_SIGMA)
    if not 0 < sigma < math.inf:  # as a recipe's is (engines.model.recipes): 0 makes every map NaN
        raise ValueError(f"architecture: smoothing_sigma {sigma!r}, expected a number > 0")
    method = get_method(architecture["method"])
    backbone = create_backbone(
        architecture["backbone"], weights=weights, pretrained=pretrained, taps=tuple(architecture["taps"])
    )
    head = method.build_head(backbone, architecture.get("head", {}))
    scorer = scorer_class(architecture["scorer"])()
    return InferenceGraph(
        backbone,
        head,
        scorer,
        tuple(architecture["input_shape"]),
        sigma,
        aggregation_of(architecture),
        float(architecture.get("score_share", 0.0)),
    )


def state_arrays(graph: nn.Module) -> dict[str, np.ndarray]:
    """The graph's weights as plain arrays for weights.npz."""
    return {k: v.detach().cpu().numpy() for k, v in graph.state_dict().items()}


def load_state_arrays(graph: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    graph.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)
