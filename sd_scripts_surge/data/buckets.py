"""Aspect-ratio buckets: bucket sizes, the bucket of an image, crops, SDXL size/crop conditioning, pixels."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_scripts_surge.data.errors import DataError

# ------------------------------------------------------------------------------------------------ buckets

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(resolution: Size, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """sd-scripts' bucket list: for each width w in [min, max] (step `steps`) the tallest multiple-of-steps
    height within the area resolution_w × resolution_h and max; both orientations, plus the square base."""
    if steps < 1 or min_reso < 1 or min_reso > max_reso:
        raise DataError(f"bucket settings: need 1 ≤ bucket_reso_steps and 0 < min_bucket_reso ≤ max_bucket_reso, "
                        f"got steps={steps}, min={min_reso}, max={max_reso}")
    max_area = resolution[0] * resolution[1]
    side = int(math.isqrt(max_area)) // steps * steps
    buckets = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // steps * steps)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += steps
    return sorted(buckets)


def select_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio w/h is nearest the image's (exact fractions; ties → larger area)."""
    ratio = Fraction(size[0], size[1])
    return min(buckets, key=lambda b: (abs(Fraction(b[0], b[1]) - ratio), -b[0] * b[1], b[0]))


def no_upscale_bucket(size: Size, resolution: Size, steps: int) -> Size:
    """bucket_no_upscale: the image size, scaled down to the area budget if larger, rounded down to `steps`."""
    w, h = size
    scale = min(1.0, math.sqrt(resolution[0] * resolution[1] / (w * h)))
    return max(steps, int(w * scale) // steps * steps), max(steps, int(h * scale) // steps * steps)


def crop_plan(original: Size, bucket: Size, random_crop: bool = False,
              rng: random.Random | None = None) -> tuple[Size, tuple[int, int]]:
    """Resize to cover `bucket` keeping the aspect ratio, then crop: returns (resized (w, h), (top, left))."""
    w, h = original
    scale = max(bucket[0] / w, bucket[1] / h)
    resized = (max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5)))
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        rng = rng or random.Random(0)
        return resized, (rng.randint(0, spare_y), rng.randint(0, spare_x))
    return resized, (spare_y // 2, spare_x // 2)


def sdxl_time_ids(original: Size, crop_top_left: tuple[int, int], target: Size) -> torch.Tensor:
    """SDXL size/crop conditioning: (original h, original w, crop top, crop left, target h, target w)."""
    return torch.tensor([original[1], original[0], crop_top_left[0], crop_top_left[1], target[1], target[0]],
                        dtype=torch.float32)


def load_bucket_image(path: Path, resized: Size, crop_top_left: tuple[int, int], bucket: Size) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of the image resized and cropped to `bucket`. Raises OSError if unreadable."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    downscale = resized[0] * resized[1] < rgb.size[0] * rgb.size[1]
    resample = Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS  # area average down, like INTER_AREA
    rgb = rgb.resize(resized, resample)
    top, left = crop_top_left
    return np.asarray(rgb.crop((left, top, left + bucket[0], top + bucket[1])), dtype=np.uint8)


def to_pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays → float (B, 3, H, W) in [-1, 1], what the VAE encoder expects."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


