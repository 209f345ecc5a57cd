"""The dataset: records + buckets + captions + cached latents → batches (see the package docstring)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from sd_scripts_surge.config import ConfigError, TrainConfig
from sd_scripts_surge.data.buckets import Size, load_bucket_image, make_bucket_resolutions, sdxl_time_ids, to_pixels
from sd_scripts_surge.data.captions import caption_varies, process_caption
from sd_scripts_surge.data.dataset_config import (
    DatasetConfig,
    dataset_config_from_folder,
    load_dataset_config,
)
from sd_scripts_surge.data.errors import DataError
from sd_scripts_surge.data.latent_cache import (
    encode_pixels,
    latent_cache_key,
    latent_cache_path,
    module_fingerprint,
    read_latent_cache,
    write_latent_cache,
)
from sd_scripts_surge.data.records import ImageRecord, SkipLog, scan_subset
from sd_scripts_surge.data.sampler import BucketBatchSampler
from sd_scripts_surge.data.seeding import stable_rng
from sd_scripts_surge.data.text_cache import TextEmbeddingCache

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ dataset
@dataclass
class Batch:
    """One training batch; `latents` when cached, else `pixels` for the trainer to encode."""

    indices: list[int]
    paths: list[Path]
    captions: list[str]
    time_ids: torch.Tensor  # (B, 6)
    is_reg: torch.Tensor  # (B,) bool
    latents: torch.Tensor | None = None  # (B, 4, H/8, W/8), already × scaling factor
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    context: torch.Tensor | None = None  # (B, T, 2048 for SDXL)
    pooled: torch.Tensor | None = None  # (B, 1280 for SDXL)

    @property
    def added_cond(self) -> dict[str, torch.Tensor]:
        """diffusers UNet2DConditionModel `added_cond_kwargs` for SDXL (needs text embeddings)."""
        if self.pooled is None:
            raise ValueError("no text embeddings in this batch; call SurgeDataset.cache_text_embeddings first")
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Batch(**moved)


class SurgeDataset:
    """The scanned images of all datasets with repeats expanded into entries (see module docstring)."""

    def __init__(self, records: list[ImageRecord], datasets: list[DatasetConfig], skipped: SkipLog, seed: int = 0):
        if not records:
            detail = f"; {skipped.summary(5)}" if len(skipped) else ""
            dirs = ", ".join(str(s.image_dir) for d in datasets for s in d.subsets)
            raise DataError(f"the dataset has no usable images (looked in: {dirs}){detail}")
        self.records = records
        self.datasets = datasets
        self.skipped = skipped
        self.seed = seed
        self.entries = expand_entries(records)
        self.text_cache: TextEmbeddingCache | None = None
        self.latents_cached = False

    def __len__(self) -> int:
        return len(self.entries)

    def group_of(self, entry: int) -> tuple[int, Size]:
        record = self.records[self.entries[entry]]
        return record.dataset_index, record.bucket

    def make_sampler(self, rank: int = 0, world_size: int = 1, seed: int | None = None) -> BucketBatchSampler:
        sizes = {(r.dataset_index, r.bucket): self.datasets[r.dataset_index].batch_size for r in self.records}
        return BucketBatchSampler([self.group_of(e) for e in range(len(self))], sizes,
                                  self.seed if seed is None else seed, rank, world_size)

    @property
    def buckets(self) -> dict[Size, int]:
        counts: dict[Size, int] = {}
        for record in self.records:
            counts[record.bucket] = counts.get(record.bucket, 0) + record.subset.num_repeats
        return dict(sorted(counts.items()))

    # -- caching
    def cache_latents(self, vae: torch.nn.Module, to_disk: bool = False, cache_dir: str | Path | None = None,
                      progress: bool = True, batch_size: int = 4) -> dict[str, int]:
        """Encode every image once (reusing valid disk caches), `batch_size` images of one bucket at a time;
        images that fail to decode are dropped and counted. Returns counts {"encoded", "reused", "skipped"}."""
        from tqdm import tqdm

        vae_hash = module_fingerprint(vae) if to_disk else ""
        factor = 2 ** (len(getattr(vae.config, "block_out_channels", (0,) * 4)) - 1)
        channels = int(getattr(vae.config, "latent_channels", 4))
        counts = {"encoded": 0, "reused": 0, "skipped": 0}
        pending: dict[Size, list[tuple[ImageRecord, Path, dict[str, Any]]]] = {}
        for record in self.records:
            key = latent_cache_key(record, vae_hash)
            path = latent_cache_path(record, Path(cache_dir) if cache_dir else None)
            shape = (channels, record.bucket[1] // factor, record.bucket[0] // factor)
            cached = read_latent_cache(path, key, shape) if to_disk else None
            if cached is not None:
                record.latents, record.latents_flipped = cached
                counts["reused"] += 1
            else:
                pending.setdefault(record.bucket, []).append((record, path, key))
        failed: set[int] = set()
        bar = tqdm(total=sum(len(v) for v in pending.values()), desc="caching latents",
                   disable=not progress or len(self.records) < 16)
        for jobs in pending.values():
            for start in range(0, len(jobs), max(1, batch_size)):
                chunk, images = [], []
                for record, path, key in jobs[start:start + max(1, batch_size)]:
                    try:
                        image = load_bucket_image(record.path, record.resized_size, record.crop_top_left,
                                                  record.bucket)
                    except Exception as e:  # noqa: BLE001 - a file that fails to decode is skipped, not fatal
                        self.skipped.add(record.path, e)
                        failed.add(id(record))
                        counts["skipped"] += 1
                        continue
                    chunk.append((record, path, key, len(images)))
                    images += [image, image[:, ::-1].copy()] if record.subset.flip_aug else [image]
                bar.update(len(jobs[start:start + max(1, batch_size)]))
                if not images:
                    continue
                latents = encode_pixels(vae, to_pixels(images)).cpu()
                if not torch.isfinite(latents).all():
                    raise DataError(f"the VAE produced NaN/Inf latents for {chunk[0][0].path} (and its batch); "
                                    "SDXL's VAE overflows in fp16: use --no_half_vae or an fp16-fixed VAE")
                for record, path, key, at in chunk:
                    record.latents = latents[at].clone()
                    record.latents_flipped = latents[at + 1].clone() if record.subset.flip_aug else None
                    if to_disk:
                        write_latent_cache(path, key, record.latents, record.latents_flipped)
                    counts["encoded"] += 1
        bar.close()
        if failed:
            self._drop_missing([r for r in self.records if id(r) not in failed])
        self.latents_cached = True
        return counts

    def _drop_missing(self, kept: list[ImageRecord]) -> None:
        if not kept:
            raise DataError(f"the dataset has no usable images; {self.skipped.summary(5)}")
        logger.warning(self.skipped.summary())
        self.records = kept
        self.entries = expand_entries(kept)

    def cache_text_embeddings(self, tokenizers: Sequence[Callable[..., Any]],
                              text_encoders: Sequence[torch.nn.Module], cache_dir: str | Path | None = None,
                              progress: bool = True) -> TextEmbeddingCache:
        """Encode the captions that are the same every epoch now and keep them (the text encoders are frozen);
        captions that vary (shuffle, dropout) are encoded per batch and not kept."""
        self.text_cache = TextEmbeddingCache(tokenizers, text_encoders, cache_dir)
        fixed = [self.canonical_caption(r) for r in self.records if not caption_varies(r.subset)]
        self.text_cache.fill(fixed, progress=progress)
        return self.text_cache

    # -- batches
    def caption_for(self, entry: int, epoch: int) -> str:
        """The caption `entry` has in `epoch`: a function of (seed, epoch, entry) only."""
        record = self.records[self.entries[entry]]
        return process_caption(record.caption, record.subset, stable_rng("caption", self.seed, epoch, entry), epoch)

    @staticmethod
    def canonical_caption(record: ImageRecord) -> str:
        """The caption without random changes (prefix/suffix only): for probes and the text cache."""
        return process_caption(record.caption, record.subset, None)

    def flipped(self, entry: int, epoch: int) -> bool:
        """Whether `entry` is mirrored in `epoch` (flip_aug subsets; a function of (seed, epoch, entry))."""
        record = self.records[self.entries[entry]]
        return record.subset.flip_aug and stable_rng("flip", self.seed, epoch, entry).random() < 0.5

    def get_batch(self, entries: Sequence[int], epoch: int) -> Batch:
        """The batch for these entry indices in `epoch` (captions and flips depend on (seed, epoch, entry))."""
        records, kept, captions, time_ids, latents, pixels = [], [], [], [], [], []
        for entry in entries:
            record = self.records[self.entries[entry]]
            flip = self.flipped(entry, epoch)
            if self.latents_cached:
                latents.append(record.latents_flipped if flip else record.latents)
            else:
                try:
                    image = load_bucket_image(record.path, record.resized_size, record.crop_top_left, record.bucket)
                except Exception as e:  # noqa: BLE001 - the batch goes on without this image
                    self.skipped.add(record.path, e)
                    logger.warning("skipping unreadable image %s (%s)", record.path, e)
                    continue
                pixels.append(image[:, ::-1].copy() if flip else image)
            crop = record.flipped_crop_top_left() if flip else record.crop_top_left
            records.append(record)
            kept.append(entry)
            captions.append(self.caption_for(entry, epoch))
            time_ids.append(sdxl_time_ids(record.original_size, crop, record.bucket))
        if not records:
            raise DataError(f"every image of this batch is unreadable; {self.skipped.summary(5)}")
        batch = Batch(indices=kept, paths=[r.path for r in records], captions=captions,
                      time_ids=torch.stack(time_ids), is_reg=torch.tensor([r.subset.is_reg for r in records]),
                      latents=torch.stack(latents) if latents else None, pixels=to_pixels(pixels) if pixels else None)
        if self.text_cache is not None:
            batch.context, batch.pooled = self.text_cache(captions, store=False)
        return batch

    def iterate(self, sampler: BucketBatchSampler) -> Iterator[Batch]:
        """The rest of the sampler's current epoch as batches."""
        epoch = sampler.epoch
        for entries in sampler:
            yield self.get_batch(entries, epoch)


def expand_entries(records: Sequence[ImageRecord]) -> list[int]:
    """Record index per entry: each training image `num_repeats` times; regularisation images (is_reg) are
    cycled or cut so that there are as many reg entries as training entries, as sd-scripts does."""
    train = [i for i, r in enumerate(records) if not r.subset.is_reg for _ in range(r.subset.num_repeats)]
    reg = [i for i, r in enumerate(records) if r.subset.is_reg for _ in range(r.subset.num_repeats)]
    if not train:
        return reg
    if reg:
        reg = [reg[k % len(reg)] for k in range(len(train))]
    return train + reg


def load_datasets(cfg: TrainConfig | None, dataset_config: str | Path | None,
                  train_data_dir: str | Path | None) -> list[DatasetConfig]:
    """The dataset TOML if given, else the NN_name folders; `cfg` supplies sd-scripts' command-line defaults."""
    if dataset_config:
        return load_dataset_config(dataset_config, cfg)
    if train_data_dir:
        return dataset_config_from_folder(train_data_dir, cfg, reg_data_dir=cfg.reg_data_dir if cfg else None)
    raise DataError("no training data: give --dataset_config (TOML) or --train_data_dir (NN_name folders)")


def build_dataset(cfg: TrainConfig | None = None, datasets: list[DatasetConfig] | None = None,
                  seed: int | None = None, log: Callable[[str], None] | None = None) -> SurgeDataset:
    """Scan the datasets of `cfg` (--dataset_config, else --train_data_dir) or the given DatasetConfigs."""
    if datasets is None:
        if cfg is None:
            raise ValueError("build_dataset needs a TrainConfig or a list of DatasetConfig")
        datasets = load_datasets(cfg, cfg.dataset_config, cfg.train_data_dir)
    seed = seed if seed is not None else (cfg.seed if cfg is not None else 0)
    skipped = SkipLog()
    records: list[ImageRecord] = []
    for index, dataset in enumerate(datasets):
        buckets = None
        if dataset.enable_bucket and not dataset.bucket_no_upscale:
            buckets = make_bucket_resolutions(dataset.resolution, dataset.min_bucket_reso, dataset.max_bucket_reso,
                                              dataset.bucket_reso_steps)
        for number, subset in enumerate(dataset.subsets, 1):
            if subset.color_aug:
                raise ConfigError(f"dataset #{index + 1} subset #{number} ({subset.image_dir}): color_aug cannot be "
                                  "used with cached latents, and this trainer always caches them (sd-scripts refuses "
                                  "color_aug with cache_latents too); remove color_aug from that subset (or the "
                                  "--color_aug flag)")
            records += scan_subset(subset, dataset, index, buckets, skipped, seed)
    if len(skipped):
        (log or logger.warning)(skipped.summary())
    data = SurgeDataset(records, datasets, skipped, seed)
    message = (f"dataset: {len(records)} images ({len(skipped)} skipped), {len(data)} entries with repeats, "
               f"{len(data.buckets)} buckets")
    (log or logger.info)(message)
    return data


