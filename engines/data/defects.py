"""Synthetic defects for self-supervised training, and SLA's soft label of how much a transformation changed.

Transformations (all numpy + OpenCV, drawn from a caller's `numpy.random.Generator` so a seed reproduces them):

- `cutpaste`      a rectangle cut from the image, colour-jittered, pasted elsewhere (Li et al., CutPaste, CVPR 2021)
- `cutpaste_scar` a thin long rectangle, jittered and rotated, pasted elsewhere (CutPaste-Scar)
- `cutout`        a rectangle filled with one constant colour (DeVries and Taylor)
- `perlin`        a thresholded Perlin-noise blob filled with a foreign texture (DRAEM / CSE style). No texture
                  dataset exists offline, so the texture is the image itself rotated/rescaled/re-toned or a
                  procedural multi-octave noise.
- `shading`       a large region brighter or darker with its grain amplified: an uneven finish, nothing pasted.

Each takes a uint8 image HxW or HxWxC (C = 1 or 3; shape and dtype are kept) and returns a `Defect`: the transformed
image, the destination region's bounding box, the destination region's own size (what SLA normalises by) and the
mask of the pixels the transformation wrote.

`soft_label` is SLA's label (Hu and Wang, eq. 6-9): the fraction of the destination region whose pixels changed by
more than eps (summed over channels, on [0, 1] images), squashed by a shifted logistic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np

SLA_EPS = 0.02
SLA_ALPHA = 10.0


class Defect(NamedTuple):
    image: np.ndarray  # transformed copy, same shape and dtype as the input
    box: tuple[int, int, int, int]  # destination bounding box (x, y, w, h) in pixels
    region_wh: tuple[int, int]  # destination region's own width and height (a rotated scar's sides, not its box)
    mask: np.ndarray  # bool HxW: pixels the transformation wrote


def soft_label(
    original: np.ndarray,
    transformed: np.ndarray,
    region_wh: tuple[int, int],
    eps: float = SLA_EPS,
    alpha: float = SLA_ALPHA,
) -> float:
    """SLA soft label y = 2 / (1 + exp(-alpha V')) - 1 with V' = V / (w' h') and V the number of pixels whose
    channel-summed absolute change exceeds eps. uint8 images are read on [0, 1] (divided by 255); float images are
    taken to be on [0, 1] already. An unchanged image (an invalid transformation) gets exactly 0."""
    if original.shape != transformed.shape:
        raise ValueError(f"soft_label: shapes {original.shape} and {transformed.shape} differ, expected the same")
    w, h = region_wh
    if w <= 0 or h <= 0:
        raise ValueError(f"soft_label: region_wh {region_wh}, expected a positive width and height")
    is_uint8 = original.dtype == np.uint8
    # uint8 images are compared as int16 against eps * 255: no float copy of the image, no wrap-around.
    delta = np.abs(original.astype(np.int16 if is_uint8 else np.float32) - transformed)
    if delta.ndim == 3:
        delta = delta.sum(axis=2)
    changed = int(np.count_nonzero(delta > (eps * 255.0 if is_uint8 else eps)))
    return float(2.0 / (1.0 + math.exp(-alpha * changed / (w * h))) - 1.0)


# --------------------------------------------------------------------------------------------------- helpers
def _as_hwc(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"synthetic defect: image dtype {image.dtype}, expected uint8")
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3 and image.shape[2] in (1, 3):
        return image
    raise ValueError(f"synthetic defect: image shape {image.shape}, expected HxW, HxWx1 or HxWx3")


def _like(result_hwc: np.ndarray, original: np.ndarray) -> np.ndarray:
    return result_hwc.reshape(original.shape)


def _uniform_log(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def colour_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """torchvision-style ColorJitter(brightness, contrast, saturation, hue = strength) on a uint8 HxWxC patch, as
    the CutPaste paper jitters its pasted patch. Saturation and hue apply to colour patches only."""
    if strength <= 0:
        return patch
    x = patch.astype(np.float32)
    x *= rng.uniform(1 - strength, 1 + strength)  # brightness
    grey_mean = x.mean()
    x = (x - grey_mean) * rng.uniform(1 - strength, 1 + strength) + grey_mean  # contrast
    if patch.shape[2] == 3:
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = (x - grey[..., None]) * rng.uniform(1 - strength, 1 + strength) + grey[..., None]  # saturation
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
        shift = int(round(rng.uniform(-strength, strength) * 180))  # OpenCV hue is 0..179
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(x, 0, 255).astype(np.uint8)


def _rect_size(
    rng: np.random.Generator, height: int, width: int, area_ratio: tuple[float, float], aspect_ratio: float
) -> tuple[int, int]:
    """CutPaste's patch: area a fraction of the image's, aspect ratio log-uniform in [aspect, 1/aspect]."""
    area = rng.uniform(*area_ratio) * height * width
    aspect = _uniform_log(rng, aspect_ratio, 1.0 / aspect_ratio)
    w = int(np.clip(round(math.sqrt(area * aspect)), 1, width))
    h = int(np.clip(round(math.sqrt(area / aspect)), 1, height))
    return w, h


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = ys[0], ys[-1], xs[0], xs[-1]
    return int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)


# --------------------------------------------------------------------------------------------------- CutPaste family
def cutpaste(
    image: np.ndarray,
    rng: np.random.Generator,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: float = 0.3,
    jitter: float = 0.1,
) -> Defect:
    """CutPaste: a rectangle of 2-15 % of the image, aspect ratio in [0.3, 3.3], colour-jittered, pasted at a
    random place (possibly overlapping its source, as in the paper)."""
    hwc = _as_hwc(image)
    height, width = hwc.shape[:2]
    w, h = _rect_size(rng, height, width, area_ratio, aspect_ratio)
    sx, sy = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    dx, dy = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    patch = colour_jitter(hwc[sy : sy + h, sx : sx + w], rng, jitter)
    out = hwc.copy()
    out[dy : dy + h, dx : dx + w] = patch
    mask = np.zeros((height, width), dtype=bool)
    mask[dy : dy + h, dx : dx + w] = True
    return Defect(_like(out, image), (dx, dy, w, h), (w, h), mask)


def cutpaste_scar(
    image: np.ndarray,
    rng: np.random.Generator,
    width_range: tuple[float, float] = (2, 16),
    height_range: tuple[float, float] = (10, 25),
    rotation: tuple[float, float] = (-45, 45),
    jitter: float = 0.1,
    reference_size: int = 256,
) -> Defect:
    """CutPaste-Scar: a thin rectangle (2-16 x 10-25 pixels at 256 px, scaled with the image), jittered, rotated by
    -45..45 degrees and pasted; only the rotated rectangle itself is written."""
    hwc = _as_hwc(image)
    height, width = hwc.shape[:2]
    scale = min(height, width) / reference_size
    w = int(np.clip(round(rng.uniform(*width_range) * scale), 1, width))
    h = int(np.clip(round(rng.uniform(*height_range) * scale), 1, height))
    sx, sy = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    patch = colour_jitter(hwc[sy : sy + h, sx : sx + w], rng, jitter)
    angle = float(rng.uniform(*rotation))
    # Rotate into a canvas large enough for any angle; nearest-neighbour keeps pasted values real pixel values.
    side = int(math.ceil(math.hypot(w, h))) + 2
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    rot[:, 2] += (side / 2 - w / 2, side / 2 - h / 2)
    channels = patch.shape[2]
    rotated = cv2.warpAffine(patch, rot, (side, side), flags=cv2.INTER_NEAREST).reshape(side, side, channels)
    inside = cv2.warpAffine(np.ones((h, w), np.uint8), rot, (side, side), flags=cv2.INTER_NEAREST) > 0
    ys, xs = np.nonzero(inside)
    y0, x0 = ys.min(), xs.min()
    rotated, inside = rotated[y0 : ys.max() + 1, x0 : xs.max() + 1], inside[y0 : ys.max() + 1, x0 : xs.max() + 1]
    bh, bw = inside.shape
    bh, bw = min(bh, height), min(bw, width)
    rotated, inside = rotated[:bh, :bw], inside[:bh, :bw]
    dx, dy = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
    out = hwc.copy()
    np.copyto(out[dy : dy + bh, dx : dx + bw], rotated, where=inside[..., None])
    mask = np.zeros((height, width), dtype=bool)
    mask[dy : dy + bh, dx : dx + bw] = inside
    return Defect(_like(out, image), (dx, dy, bw, bh), (w, h), mask)


def cutout(
    image: np.ndarray,
    rng: np.random.Generator,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: float = 0.3,
) -> Defect:
    """Cutout: a CutPaste-sized rectangle filled with one random colour."""
    hwc = _as_hwc(image)
    height, width = hwc.shape[:2]
    w, h = _rect_size(rng, height, width, area_ratio, aspect_ratio)
    dx, dy = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    out = hwc.copy()
    out[dy : dy + h, dx : dx + w] = rng.integers(0, 256, size=hwc.shape[2], dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[dy : dy + h, dx : dx + w] = True
    return Defect(_like(out, image), (dx, dy, w, h), (w, h), mask)


# --------------------------------------------------------------------------------------------------- Perlin defects
def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of `shape` with res[0] x res[1] lattice cells, float32 in about [-1, 1].
    Vectorised over the whole image: gradients at the lattice, then fade-weighted corner dot products."""
    height, width = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0, 2 * math.pi, size=(ry + 1, rx + 1)).astype(np.float32)
    gy, gx = np.sin(angles), np.cos(angles)
    ys = np.arange(height, dtype=np.float32) * (ry / height)
    xs = np.arange(width, dtype=np.float32) * (rx / width)
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return gx[iy + dy, ix + dx] * (fx - dx) + gy[iy + dy, ix + dx] * (fy - dy)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (math.sqrt(2) * (top * (1 - v) + bottom * v)).astype(np.float32)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    max_scale: int = 6,
    threshold: float = 0.5,
    min_fraction: float = 0.002,
    tries: int = 8,
) -> np.ndarray:
    """DRAEM's blob: Perlin noise at 2^a x 2^b cells (a, b < max_scale), rotated, thresholded. Never empty: after
    `tries` draws too small, the top 3 % of the last noise is taken."""
    height, width = shape
    for _ in range(tries):
        res = (2 ** int(rng.integers(0, max_scale)), 2 ** int(rng.integers(0, max_scale)))
        noise = perlin_noise(shape, res, rng)
        rot = cv2.getRotationMatrix2D((width / 2, height / 2), float(rng.uniform(-90, 90)), 1.0)
        noise = cv2.warpAffine(noise, rot, (width, height), borderMode=cv2.BORDER_REFLECT)
        mask = noise > threshold
        if mask.mean() >= min_fraction:
            return mask
    return noise >= np.quantile(noise, 0.97)


def foreign_texture(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture foreign to the image's own structure at each place, same shape (HxWxC uint8): either the image
    rotated, flipped, rescaled and re-toned, or procedural multi-octave noise at a random grey/colour level."""
    hwc = _as_hwc(image)
    height, width, channels = hwc.shape
    if rng.random() < 0.5:
        zoom = rng.uniform(0.5, 2.0)
        rot = cv2.getRotationMatrix2D((width / 2, height / 2), float(rng.uniform(0, 360)), zoom)
        texture = cv2.warpAffine(hwc, rot, (width, height), borderMode=cv2.BORDER_REFLECT).reshape(hwc.shape)
        return colour_jitter(texture, rng, 0.5)
    octaves = np.zeros((height, width), np.float32)
    base = 2 ** int(rng.integers(2, 5))
    for octave in range(3):
        octaves += perlin_noise((height, width), (base << octave, base << octave), rng) / (2**octave)
    level = rng.uniform(0, 255, size=channels).astype(np.float32)
    amplitude = rng.uniform(20, 120)
    texture = level + amplitude * octaves[..., None]
    return np.clip(texture, 0, 255).astype(np.uint8)


def perlin(image: np.ndarray, rng: np.random.Generator, opacity: tuple[float, float] = (0.0, 0.8)) -> Defect:
    """DRAEM/CSE defect: blend a foreign texture into a Perlin blob, image * beta + texture * (1 - beta) there,
    with beta (the image's own share) uniform in `opacity`."""
    hwc = _as_hwc(image)
    mask = perlin_mask(hwc.shape[:2], rng)
    texture = foreign_texture(hwc, rng)
    beta = rng.uniform(*opacity)
    blended = cv2.addWeighted(hwc, beta, texture, 1.0 - beta, 0.0).reshape(hwc.shape)
    out = hwc.copy()
    np.copyto(out, blended, where=mask[..., None])
    x, y, w, h = _mask_box(mask)
    return Defect(_like(out, image), (x, y, w, h), (w, h), mask)


def shading(
    image: np.ndarray,
    rng: np.random.Generator,
    coverage: tuple[float, float] = (0.1, 0.5),
    gain: tuple[float, float] = (1.15, 1.7),
    texture_gain: tuple[float, float] = (1.3, 2.5),
) -> Defect:
    """An uneven finish: a large region (10-50 % of the frame, a low-frequency Perlin blob or a band across the
    frame) whose tone is brighter or darker and whose fine texture (the image minus its 9x9 mean) is amplified, with
    the region's own grain kept. Nothing foreign is pasted, so only the region's level and contrast against the rest
    of the same part give it away -- the defects that patch-sized transformations never produce."""
    hwc = _as_hwc(image)
    height, width = hwc.shape[:2]
    target = rng.uniform(*coverage)
    if rng.random() < 0.5:
        noise = perlin_noise((height, width), (int(rng.integers(1, 3)), int(rng.integers(1, 3))), rng)
        mask = noise >= np.quantile(noise, 1.0 - target)
    else:  # a band from one edge, as a grinding or coating pass that stopped short
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        wobble = perlin_noise((height, width), (1, 2), rng) * 0.05
        along = (yy / height if rng.random() < 0.5 else xx / width) + wobble
        mask = along < target if rng.random() < 0.5 else along > 1.0 - target
    if not mask.any():
        mask[: max(1, height // 4)] = True
    level = rng.uniform(*gain)
    if rng.random() < 0.3:
        level = 1.0 / level
    x = hwc.astype(np.float32)
    local_mean = cv2.blur(x, (9, 9)).reshape(x.shape)
    changed = local_mean * level + (x - local_mean) * rng.uniform(*texture_gain)
    # A soft edge a few pixels wide: a hard seam would be a scar, which the other transformations already teach.
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), rng.uniform(1.0, 4.0))
    alpha[alpha < 0.02] = 0.0
    written = alpha > 0.0
    alpha = alpha[..., None]
    out = np.clip(x * (1.0 - alpha) + changed * alpha, 0, 255).astype(np.uint8)
    x0, y0, w, h = _mask_box(written)
    return Defect(_like(out, image), (x0, y0, w, h), (w, h), written)


DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], Defect]] = {
    "cutpaste": cutpaste,
    "scar": cutpaste_scar,
    "cutout": cutout,
    "perlin": perlin,
    "shading": shading,
}


def parse_mix(text: str) -> dict[str, float]:
    """'perlin:3,cutpaste:1' -> normalised weights; a bare name weighs 1. Errors name the bad part."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        if name not in DEFECTS:
            raise ValueError(f"defect mix {text!r}: unknown defect {name!r}, expected one of {', '.join(DEFECTS)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"defect mix {text!r}: weight {weight!r} of {name!r} is not a number") from None
        if not (math.isfinite(value) and value >= 0):
            # NaN or infinity would fail only at the first draw, after every image is decoded and fitted.
            raise ValueError(f"defect mix {text!r}: weight {weight.strip()} of {name!r}, expected a finite number >= 0")
        weights[name] = value
    total = sum(weights.values())
    if not math.isfinite(total):
        raise ValueError(
            f"defect mix {text!r}: the weights overflow when added, expected smaller ones (perlin:3,scar:1)"
        )
    if total <= 0:
        raise ValueError(f"defect mix {text!r}: expected at least one defect with a positive weight")
    return {name: value / total for name, value in weights.items()}


def random_defect(image: np.ndarray, rng: np.random.Generator, mix: dict[str, float]) -> tuple[str, Defect]:
    """One defect drawn from `mix` (name -> probability, as parse_mix returns)."""
    names = list(mix)
    name = names[int(rng.choice(len(names), p=np.fromiter(mix.values(), float)))]
    return name, DEFECTS[name](image, rng)
