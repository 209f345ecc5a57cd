"""Image records: scanning a subset's folder into one record per readable image, skipping the rest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sd_scripts_surge.data.buckets import Size, crop_plan, no_upscale_bucket, sdxl_time_ids, select_bucket
from sd_scripts_surge.data.captions import read_caption
from sd_scripts_surge.data.dataset_config import (
    DatasetConfig,
    SubsetConfig,
)
from sd_scripts_surge.data.errors import DataError
from sd_scripts_surge.data.seeding import stable_rng

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# ------------------------------------------------------------------------------------------------ records
@dataclass
class ImageRecord:
    """One image of the dataset and everything fixed about it."""

    path: Path
    caption: str
    dataset_index: int
    subset: SubsetConfig
    original_size: Size
    bucket: Size
    resized_size: Size
    crop_top_left: tuple[int, int]
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None

    @property
    def time_ids(self) -> torch.Tensor:
        return sdxl_time_ids(self.original_size, self.crop_top_left, self.bucket)

    def flipped_crop_top_left(self) -> tuple[int, int]:
        """The crop position seen by a horizontally flipped image (left edge mirrored on the resized image)."""
        return self.crop_top_left[0], self.resized_size[0] - self.crop_top_left[1] - self.bucket[0]


@dataclass
class SkipLog:
    """Images that could not be used: counted and reported, never fatal on their own."""

    entries: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.entries.append((Path(path), reason))
        logger.debug("skipping image %s (%s)", path, reason)

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self, limit: int = 20) -> str:
        lines = [f"{p} ({reason})" for p, reason in self.entries[:limit]]
        more = f"\n  … and {len(self.entries) - limit} more" if len(self.entries) > limit else ""
        return f"skipped {len(self.entries)} unreadable images:\n  " + "\n  ".join(lines) + more


def scan_subset(subset: SubsetConfig, dataset: DatasetConfig, dataset_index: int, buckets: Sequence[Size] | None,
                skipped: SkipLog, seed: int = 0) -> list[ImageRecord]:
    """Records for a subset's images; unreadable ones go to `skipped`."""
    if not subset.image_dir.is_dir():
        raise DataError(f"dataset #{dataset_index + 1}: image_dir {subset.image_dir} is not a folder; "
                        "fix image_dir in the dataset config (or the NN_name folder)")
    records = []
    candidates = sorted(p for p in subset.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for path in candidates:
        try:
            with Image.open(path) as image:
                image.verify()  # header and structure; decoding errors are caught again when loading
            with Image.open(path) as image:
                size = image.size
            if size[0] < 1 or size[1] < 1:
                raise ValueError(f"empty image {size}")
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files; each is just a skip
            skipped.add(path, e)
            continue
        if dataset.enable_bucket:
            bucket = no_upscale_bucket(size, dataset.resolution, dataset.bucket_reso_steps) \
                if dataset.bucket_no_upscale else select_bucket(size, buckets or [])
        else:
            bucket = dataset.resolution
        resized, crop = crop_plan(size, bucket, subset.random_crop, stable_rng("crop", seed, path.name))
        records.append(ImageRecord(path, read_caption(path, subset), dataset_index, subset, size, bucket,
                                   resized, crop))
    return records


