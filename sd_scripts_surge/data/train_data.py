"""What the training loop gets from the data: dataset, this rank's sampler, text encoding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sd_scripts_surge.config import ConfigError, TrainConfig
from sd_scripts_surge.data.buckets import Size, sdxl_time_ids
from sd_scripts_surge.data.captions import caption_varies
from sd_scripts_surge.data.dataset import Batch, SurgeDataset, build_dataset, load_datasets
from sd_scripts_surge.data.dataset_config import (
    DatasetConfig,
)
from sd_scripts_surge.data.records import ImageRecord, SkipLog
from sd_scripts_surge.data.sampler import BucketBatchSampler
from sd_scripts_surge.data.text_cache import TextEmbeddingCache

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sd_scripts_surge.models.bundle import ModelBundle


# ------------------------------------------------------------------------------------------------ trainer
class TrainData:
    """What the training loop needs from the data: the dataset with cached latents and text embeddings, this
    rank's sampler, and the prompt encoder, all on one device (see module docstring)."""

    def __init__(self, dataset: SurgeDataset, sampler: BucketBatchSampler, text: TextEmbeddingCache,
                 device: torch.device, latent_channels: int, vae_scale: int) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.text = text
        self.device = device
        self.latent_channels = latent_channels
        self.vae_scale = vae_scale

    @property
    def records(self) -> list[ImageRecord]:
        return self.dataset.records

    @property
    def skipped(self) -> SkipLog:
        return self.dataset.skipped

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) of the first dataset's base resolution, for samples and probes."""
        w, h = self.dataset.datasets[0].resolution
        return h, w

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h, w = self.resolution
        return self.latent_channels, h // self.vae_scale, w // self.vae_scale

    def time_ids_for(self, count: int) -> torch.Tensor:
        """SDXL time ids of an uncropped image at the base resolution, `count` rows (CPU)."""
        h, w = self.resolution
        return sdxl_time_ids((w, h), (0, 0), (w, h)).expand(count, 6).clone()

    def encode_prompts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) on the training device; prompts are kept in the cache (probes, samples)."""
        context, pooled = self.text(list(captions))
        return context.to(self.device), pooled.to(self.device)

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        """This rank's batches of the sampler's current epoch after the first `skip`, on the training device.

        Flips and captions are a function of (seed, epoch, entry), so `skip` after a resume gives exactly the
        batches the uninterrupted run would have seen. The sampler's position follows what was handed out."""
        epoch = self.sampler.epoch
        for position, entries in enumerate(self.sampler.rank_batches(epoch)[skip:], start=skip):
            self.sampler.position = position + 1
            yield self.dataset.get_batch(entries, epoch).to(self.device)

    def probe_examples(self, count: int) -> tuple[list[str], torch.Tensor]:
        """Up to `count` distinct (canonical caption, latents) pairs from the most common bucket (CPU latents)."""
        by_bucket: dict[Size, list[ImageRecord]] = {}
        for record in self.dataset.records:
            by_bucket.setdefault(record.bucket, []).append(record)
        common = max(by_bucket.values(), key=len)
        chosen = common[:: max(1, len(common) // count)][:count]
        return [self.dataset.canonical_caption(r) for r in chosen], torch.stack([r.latents for r in chosen])


LATENT_BATCH = 8  # images of one bucket per VAE call while caching


def check_text_cache_rules(datasets: Sequence[DatasetConfig], cfg: TrainConfig) -> None:
    """sd-scripts refuses cache_text_encoder_outputs when captions change per epoch; so do we (the message says
    which subset and key). Without the flag, varying captions are simply encoded per batch."""
    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk):
        return
    for i, dataset in enumerate(datasets, 1):
        for j, subset in enumerate(dataset.subsets, 1):
            if caption_varies(subset):
                keys = [k for k in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                                    "caption_dropout_every_n_epochs") if getattr(subset, k)]
                raise ConfigError(f"dataset #{i} subset #{j} ({subset.image_dir}): {', '.join(keys)} change the "
                                  "caption every epoch, so its text embeddings cannot be cached; remove "
                                  "cache_text_encoder_outputs(_to_disk) or those keys")


def build_train_data(cfg: TrainConfig, dataset_config: str | None, train_data_dir: str | None,
                     bundle: ModelBundle, accelerator: Accelerator, log: Callable[[str], None]) -> TrainData:
    """Scan the dataset (TOML, else NN_name folders), cache latents (and `.npz` files with
    cache_latents_to_disk) and fixed captions' text embeddings, and make this rank's sampler."""
    if bundle.tokenizer_1 is None or bundle.tokenizer_2 is None:
        raise ValueError("the model has no tokenizers; give --tokenizer_dir (a folder with tokenizer/ and "
                         "tokenizer_2/) for a single-file checkpoint")
    datasets = load_datasets(cfg, dataset_config, train_data_dir)
    check_text_cache_rules(datasets, cfg)
    dataset = build_dataset(datasets=datasets, seed=cfg.seed, log=log)
    device = accelerator.device
    bundle.vae.to(device)
    skipped_before = len(dataset.skipped)
    dataset.cache_latents(bundle.vae, to_disk=cfg.cache_latents_to_disk, progress=accelerator.is_local_main_process,
                          batch_size=LATENT_BATCH)
    if len(dataset.skipped) > skipped_before:
        log(dataset.skipped.summary())
    for module in (bundle.text_encoder_1, bundle.text_encoder_2):
        module.to(device)
    text_dir = Path(cfg.output_dir) / "text_encoder_cache" if cfg.cache_text_encoder_outputs_to_disk else None
    text = dataset.cache_text_embeddings([bundle.tokenizer_1, bundle.tokenizer_2],
                                         [bundle.text_encoder_1, bundle.text_encoder_2], text_dir,
                                         progress=accelerator.is_local_main_process)
    sampler = dataset.make_sampler(accelerator.process_index, accelerator.num_processes, cfg.seed)
    vae_scale = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    return TrainData(dataset, sampler, text, device, int(bundle.unet.config.in_channels), vae_scale)
