"""Fitting a uint8 frame of any size, grey (HxW, HxWx1) or RGB (HxWx3), to the model's input, and mapping results back.

The graph takes uint8 [N, H, W, C] at the bundle's input size; normalisation happens inside the graph. What stays on
the host is only the geometric fit (OpenCV resize, optionally keeping the aspect ratio with padding) and channel
conversion, written into a caller-owned batch buffer so that no model-size input is allocated per frame. It is not
allocation-free: cv2.resize (when the frame's size differs; twice where one axis shrinks and the other grows) and an
RGB-to-grey conversion each return a new array per frame, which is then copied into the buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from engines.bundle.format import RESIZE_POLICIES
from engines.errors import DataError


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a frame landed inside the model input: the region [top:top+height, left:left+width]."""

    frame_height: int
    frame_width: int
    top: int
    left: int
    height: int
    width: int

    def map_to_frame(self, model_map: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """Crop the padding away and resize a model-size map (H x W, float or uint8) to the frame's own size."""
        region = model_map[self.top : self.top + self.height, self.left : self.left + self.width]
        if region.shape == (self.frame_height, self.frame_width):
            return region
        return cv2.resize(region, (self.frame_width, self.frame_height), interpolation=interpolation)


def placement_for(frame_shape: tuple[int, ...], input_hw: tuple[int, int], policy: str) -> Placement:
    fh, fw = frame_shape[:2]
    h, w = input_hw
    if policy == "stretch":
        return Placement(fh, fw, 0, 0, h, w)
    if policy == "pad":
        scale = min(h / fh, w / fw)
        rh, rw = max(1, round(fh * scale)), max(1, round(fw * scale))
        return Placement(fh, fw, (h - rh) // 2, (w - rw) // 2, rh, rw)
    raise ValueError(f"resize policy {policy!r}: expected one of {', '.join(RESIZE_POLICIES)}")


def fit_frame(
    frame: np.ndarray,
    input_shape: tuple[int, int, int],
    policy: str = "stretch",
    out: np.ndarray | None = None,
    each_axis: bool = True,
) -> tuple[np.ndarray, Placement]:
    """Write `frame` (uint8 HxW or HxWx3, RGB) into `out` (uint8 H x W x C of the model input) and say where.
    `each_axis`: resized axis by axis (_resized); False for a bundle written before, fitted as it was trained.

    With policy "pad" the border is filled with the frame's mean grey so padding looks like neither defect nor edge.
    """
    h, w, c = input_shape
    # Anything else would be cast modulo 256 or truncated below: garbage verdicts with no error.
    if frame.dtype != np.uint8:
        raise DataError(f"frame: dtype {frame.dtype}, expected uint8 (8-bit grey or RGB)")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3) or frame.size == 0:
        raise DataError(f"frame: shape {frame.shape}, expected HxW grey or HxWx3 RGB")
    if out is None:
        out = np.empty((h, w, c), dtype=np.uint8)
    placement = placement_for(frame.shape, (h, w), policy)
    if frame.ndim == 3 and c == 1:
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    # Grey into a colour model is replicated after the resize (bit-identical, and no full-size RGB copy per frame).
    if each_axis:
        frame = _resized(frame, placement.height, placement.width)
    elif placement.height != frame.shape[0] or placement.width != frame.shape[1]:
        interpolation = cv2.INTER_AREA if placement.height < frame.shape[0] else cv2.INTER_LINEAR
        frame = cv2.resize(frame, (placement.width, placement.height), interpolation=interpolation)
    target = out[placement.top : placement.top + placement.height, placement.left : placement.left + placement.width]
    if policy == "pad" and (placement.height, placement.width) != (h, w):
        out[...] = int(frame.mean())
    if frame.ndim == 2 and c == 3:
        target[...] = frame[:, :, None]
    else:
        target[...] = frame.reshape(target.shape)
    return out, placement


def _resized(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """`frame` at height x width: averaged along an axis that shrinks (INTER_AREA), interpolated along one that
    grows. Per axis: with one axis shrinking and the other growing or kept, OpenCV's one-step resize samples the
    shrinking axis without averaging (INTER_LINEAR, and INTER_AREA as well when either axis grows), and a scratch
    thinner than the step vanished at most of its positions."""
    fh, fw = frame.shape[:2]
    if (fh, fw) == (height, width):
        return frame
    if height <= fh and width <= fw:
        return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    if height >= fh and width >= fw:
        return cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)
    shrunk = (fh, width) if width < fw else (height, fw)
    frame = cv2.resize(frame, (shrunk[1], shrunk[0]), interpolation=cv2.INTER_AREA)
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)


def fit_all(
    frames: Sequence[np.ndarray], input_shape: tuple[int, int, int], policy: str = "stretch", each_axis: bool = True
) -> np.ndarray:
    """Every frame fitted to the model input, uint8 [N, H, W, C]. `frames` may decode each frame as it is read
    (engines.data.images.ImageFiles), so only one frame at its own size is held at a time."""
    fitted = np.empty((len(frames), *input_shape), dtype=np.uint8)
    for i, frame in enumerate(frames):
        fit_frame(frame, input_shape, policy, out=fitted[i], each_axis=each_axis)
    return fitted


def mean_level(pixels: np.ndarray) -> float:
    """The mean grey level of a fitted model input (uint8 H x W x C), over all its pixels and channels: what the
    drift alarm's brightness test compares with its reference. OpenCV's mean, a few microseconds at 256x256."""
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    return float(sum(cv2.mean(pixels)[:channels]) / channels)
