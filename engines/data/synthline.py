"""The synthetic production line: an endless stream of textured surface frames with known defects.

Owns the procedural surface (band-pass filtered noise, directional grain, a slow illumination gradient) and the
defects injected into it (thin scratches, spots, holes) together with their ground-truth masks. The demo trains on its
defect-free frames and the daemon's synthetic camera streams it, so a whole station runs without a camera or a dataset.

Speed matters because the daemon calls it once per frame at line rate: the expensive texture (filtering) is made once
into a bank twice the frame size, and each frame is a random crop/flip of that bank under a random crop of a seeded
grain bank and fresh lighting, computed in preallocated float buffers. Only the returned image (and a mask, for
defective frames) is allocated.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECT_KINDS = ("scratch", "spot", "hole")
# The line's own per-frame lighting variation: an overall level within +-LIGHTING_JITTER and a gradient across the
# frame of up to +-2.5 x that at the edges. A loosely lit line; a station with controlled lighting is nearer 0.02.
LIGHTING_JITTER = 0.1


class SyntheticLine:
    """`next()` -> (uint8 HxW or HxWx3 image, bool HxW defect mask or None when the frame is defect-free)."""

    def __init__(
        self,
        width: int = 256,
        height: int = 256,
        channels: int = 1,
        defect_rate: float = 0.2,
        seed: int = 0,
        lighting_jitter: float = LIGHTING_JITTER,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels {channels}: expected 1 or 3")
        if not 0.0 <= lighting_jitter <= 0.5:
            raise ValueError(f"lighting_jitter {lighting_jitter}: expected 0..0.5")
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"defect_rate {defect_rate}: expected 0..1")
        if width < 8 or height < 8:
            raise ValueError(f"size {width}x{height}: expected at least 8x8")
        self.width, self.height, self.channels = width, height, channels
        self.defect_rate = defect_rate
        self.lighting_jitter = lighting_jitter
        self.rng = np.random.default_rng(seed)
        self._bank = self._make_texture_bank(2 * height, 2 * width)
        # Sensor grain, cropped from a seeded bank per frame: drawn fresh, it took three times the rest of the frame.
        # Twice the frame each way, as the texture: with a bank only 64 pixels larger, frames' grain overlapped so
        # much that the drift alarm saw an unchanged line drift.
        self._grain_bank = self.rng.standard_normal((2 * height, 2 * width), dtype=np.float32)
        self._grain_bank *= 3.0
        # Normalised coordinate ramps for the lighting gradient, centred so gain stays ~1 on average.
        self._ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
        self._xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
        self._work = np.empty((height, width), dtype=np.float32)
        self._gain = np.empty((height, width), dtype=np.float32)
        self._mask = np.zeros((height, width), dtype=np.uint8)
        # A faint fixed colour cast so RGB frames are not three identical planes; lookup tables are the cheapest way
        # to scale a uint8 plane.
        self._tint_g = (np.arange(256) * 0.97).astype(np.uint8)
        self._tint_b = (np.arange(256) * 0.92).astype(np.uint8)

    def _make_texture_bank(self, h: int, w: int) -> np.ndarray:
        rng = self.rng
        coarse = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 6.0)
        fine = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 1.2)
        # Brushed/rolled metal: grain streaks along one axis.
        streaks = cv2.blur(rng.standard_normal((h, w), dtype=np.float32), (31, 1))
        texture = 2.5 * coarse / (coarse.std() + 1e-6) + fine / (fine.std() + 1e-6) + streaks / (streaks.std() + 1e-6)
        texture *= 8.0 / (texture.std() + 1e-6)
        texture += 128.0
        return texture

    def next(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self._sample(self.defect_rate)

    def _sample(self, defect_rate: float) -> tuple[np.ndarray, np.ndarray | None]:
        rng, h, w = self.rng, self.height, self.width
        oy, ox = rng.integers(0, h + 1), rng.integers(0, w + 1)
        base = self._bank[oy : oy + h, ox : ox + w]
        flip = rng.integers(0, 4)
        if flip & 1:
            base = base[::-1]
        if flip & 2:
            base = base[:, ::-1]
        jitter, slope = self.lighting_jitter, 2.5 * self.lighting_jitter
        a, b, level = rng.uniform(-slope, slope), rng.uniform(-slope, slope), rng.uniform(1 - jitter, 1 + jitter)
        np.multiply(self._ys, a, out=self._gain)
        self._gain += self._xs * b
        self._gain += level
        np.multiply(base, self._gain, out=self._work)
        # From the seeded generator, not cv2.randn: OpenCV's RNG is process-wide, so frames would depend on whatever
        # drew from it before and a seed would not reproduce a folder.
        gy, gx = rng.integers(0, h + 1), rng.integers(0, w + 1)
        self._work += self._grain_bank[gy : gy + h, gx : gx + w]

        mask = None
        if rng.random() < defect_rate:
            mask = self._inject_defect()

        np.clip(self._work, 0.0, 255.0, out=self._work)
        if self.channels == 1:
            return self._work.astype(np.uint8), mask
        grey = self._work.astype(np.uint8)
        return cv2.merge([grey, cv2.LUT(grey, self._tint_g), cv2.LUT(grey, self._tint_b)]), mask

    def _inject_defect(self) -> np.ndarray:
        rng, h, w = self.rng, self.height, self.width
        self._mask[...] = 0
        kind = DEFECT_KINDS[rng.integers(0, len(DEFECT_KINDS))]
        cy, cx = int(rng.integers(h // 8, h - h // 8)), int(rng.integers(w // 8, w - w // 8))
        scale = min(h, w)
        if kind == "scratch":
            angle = rng.uniform(0, np.pi)
            half = rng.uniform(0.1, 0.3) * scale
            dy, dx = half * np.sin(angle), half * np.cos(angle)
            p0 = (int(cx - dx), int(cy - dy))
            p1 = (int(cx + dx), int(cy + dy))
            cv2.line(self._mask, p0, p1, 1, thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_8)
            delta = rng.choice((-1.0, 1.0)) * rng.uniform(45, 70)
        elif kind == "spot":
            axes = (int(rng.uniform(0.02, 0.06) * scale) + 1, int(rng.uniform(0.02, 0.06) * scale) + 1)
            cv2.ellipse(self._mask, (cx, cy), axes, rng.uniform(0, 180), 0, 360, 1, thickness=-1)
            delta = -rng.uniform(35, 60)
        else:  # hole: small, nearly black
            cv2.circle(self._mask, (cx, cy), int(rng.uniform(0.015, 0.04) * scale) + 1, 1, thickness=-1)
            delta = -120.0
        mask = self._mask.astype(bool)
        self._work[mask] += delta
        return mask

    def write_folder(self, folder: str | Path, n: int, defect_rate: float = 0.0) -> list[Path]:
        """Write `n` PNG frames (`000000.png`, ...) into `folder`; masks of defective ones go to
        `folder/masks/<stem>_mask.png` (outside the image listing, so the folder stays a plain image folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(n):
            image, mask = self._sample(defect_rate)
            path = folder / f"{i:06d}.png"
            if image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(path), image):
                raise OSError(f"{path}: cannot write PNG")
            if mask is not None:
                (folder / "masks").mkdir(exist_ok=True)
                cv2.imwrite(str(folder / "masks" / f"{path.stem}_mask.png"), mask.astype(np.uint8) * 255)
            paths.append(path)
        return paths
