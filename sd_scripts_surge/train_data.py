"""Training data: images + captions → aspect-ratio buckets → cached latents and text embeddings → batches.

- Images are found in each subset's folder (png/jpg/jpeg/webp/bmp); the caption is the file beside it with
  the subset's caption extension (else the class tokens). Unreadable images are skipped, counted and
  reported, never fatal; a dataset left empty is an error.
- Buckets follow sd-scripts: sides are multiples of `bucket_reso_steps` within [min, max] with area about
  resolution²; each image goes to the bucket nearest its aspect ratio, is resized to cover it and
  centre-cropped. SDXL's size/crop conditioning (original h, w, crop top, left, target h, w) is recorded.
- Latents (× the VAE's scaling factor) are encoded once and kept in memory; with cache_latents_to_disk also
  as `.npz` beside the image, keyed by bucket size and a VAE hash, reused when valid, rebuilt when not.
- Text embeddings (SDXL: context = concat(TE1, TE2 penultimate hidden states), pooled = TE2 projection)
  are cached per caption; with shuffle_caption, captions are shuffled per epoch (keep_tokens kept first)
  and encoded per batch. With keep_tokens_separator (sd-scripts' "|||"), the part before it is kept in
  place and keep_tokens is ignored, as in sd-scripts. caption_prefix/suffix are added around the caption.
- Latents are encoded in chunks of up to 8 images of one bucket per VAE call. A corrupt or truncated `.npz`
  is re-encoded; the `.npz` is written to a temporary name and renamed into place.
- Deliberate differences from sd-scripts: the nearest bucket is chosen by log aspect ratio (sd-scripts uses
  the plain ratio difference; the two only differ at ties), the cache file is
  `{stem}_{w}x{h}_surge.npz` (sd-scripts: `{stem}.npz` / `{stem}_{w}x{h}_sdxl.npz`) so it never collides
  with an sd-scripts cache made by another VAE, and shuffle order comes from sha256(name, epoch, seed).
- The order of batches is a function of (seed, epoch): a resumed run skips the batches already done and
  sees exactly the rest.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, UnidentifiedImageError

from .config import TrainConfig
from .dataset_config import DatasetConfig, SubsetConfig, dataset_config_from_folder, load_dataset_config
from .models.bundle import ModelBundle

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------ buckets


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """(width, height) buckets with area ≤ resolution², sides multiples of `step` in [min_reso, max_reso]."""
    max_area = resolution[0] * resolution[1]
    buckets = {(resolution[0] // step * step, resolution[1] // step * step)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger area)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(ratio)), -b[0] * b[1]))


def resize_and_crop(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover `bucket` (w, h), centre-crop; returns the image and the crop's (top, left)."""
    w, h = image.size
    scale = max(bucket[0] / w, bucket[1] / h)
    new_w, new_h = max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - bucket[0]) // 2, (new_h - bucket[1]) // 2
    return image.crop((left, top, left + bucket[0], top + bucket[1])), (top, left)


# ------------------------------------------------------------------------------------------------ items


@dataclass
class ImageItem:
    path: Path
    caption: str
    subset: SubsetConfig
    bucket: tuple[int, int]  # (w, h)
    original_size: tuple[int, int]  # (w, h)
    crop_top_left: tuple[int, int] = (0, 0)
    latents: torch.Tensor | None = None

    @property
    def time_ids(self) -> torch.Tensor:
        """SDXL: (original h, original w, crop top, crop left, target h, target w)."""
        return torch.tensor([self.original_size[1], self.original_size[0], *self.crop_top_left,
                             self.bucket[1], self.bucket[0]], dtype=torch.float32)


def read_caption(image: Path, subset: SubsetConfig) -> str:
    caption_file = image.with_suffix(subset.caption_extension)
    if caption_file.is_file():
        text = caption_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if text and text[0].strip():
            return text[0].strip()
    return subset.class_tokens or ""


def decorate_caption(caption: str, subset: SubsetConfig) -> str:
    """Add the subset's caption_prefix / caption_suffix (sd-scripts joins them with ", ")."""
    parts = [p for p in (subset.caption_prefix.strip(), caption, subset.caption_suffix.strip()) if p]
    return ", ".join(parts)


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random, separator: str = "") -> str:
    """sd-scripts: comma-separated tags, the first `keep_tokens` stay in place, the rest are shuffled.

    With `separator` in the caption, everything before it is kept (in order) and keep_tokens is ignored.
    """
    if separator and separator in caption:
        fixed, rest = caption.split(separator, 1)
        head = [t.strip() for t in fixed.split(",") if t.strip()]
        tail = [t.strip() for t in rest.split(",") if t.strip()]
        rng.shuffle(tail)
        return ", ".join(head + tail)
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def scan_subset(subset: SubsetConfig, buckets: list[tuple[int, int]] | None, resolution: tuple[int, int],
                skipped: list[str]) -> list[ImageItem]:
    if not subset.image_dir.is_dir():
        raise FileNotFoundError(f"dataset subset image_dir {subset.image_dir} does not exist or is not a folder; "
                                "fix image_dir in the dataset config (or --train_data_dir)")
    items = []
    for path in sorted(p for p in subset.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                size = image.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            skipped.append(f"{path} ({type(e).__name__}: {e})")
            continue
        bucket = nearest_bucket(size, buckets) if buckets else resolution
        if size[0] < 1 or size[1] < 1:
            skipped.append(f"{path} (empty image {size[0]}x{size[1]})")
            continue
        items.append(ImageItem(path, decorate_caption(read_caption(path, subset), subset), subset, bucket, size))
    return items


# ------------------------------------------------------------------------------------------------ sampler


class BucketBatchSampler:
    """Batches of one bucket each, in an order fixed by (seed, epoch); split across processes."""

    def __init__(self, items: list[ImageItem], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.repeated: list[int] = [i for i, item in enumerate(items) for _ in range(item.subset.num_repeats)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in self.repeated:
            by_bucket.setdefault(self.items[index].bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def rank_batches(self) -> list[list[int]]:
        batches = self.all_batches()
        usable = len(batches) // self.world_size * self.world_size  # every rank the same count
        return batches[self.rank:usable:self.world_size]

    def __len__(self) -> int:
        """Batches per epoch over all processes."""
        return len(self.all_batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])


# ------------------------------------------------------------------------------------------------ encoders


class PromptEncoder:
    """SDXL conditioning from a bundle's tokenizers and text encoders, cached per caption."""

    def __init__(self, bundle: ModelBundle, device: torch.device) -> None:
        if bundle.tokenizer_1 is None or bundle.tokenizer_2 is None:
            raise ValueError("the model has no tokenizers; give --tokenizer_dir (a folder with tokenizer/ and "
                             "tokenizer_2/) for a single-file checkpoint")
        self.bundle = bundle
        self.device = device
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.bundle
        ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device) for tok in (b.tokenizer_1, b.tokenizer_2)]
        out1 = b.text_encoder_1(ids[0], output_hidden_states=True)
        out2 = b.text_encoder_2(ids[1], output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return context.float(), out2.text_embeds.float()

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self.cache})
        for start in range(0, len(missing), 32):
            chunk = missing[start:start + 32]
            context, pooled = self._encode(chunk)
            for i, caption in enumerate(chunk):
                self.cache[caption] = (context[i].cpu(), pooled[i].cpu())
        contexts, pooled = zip(*(self.cache[c] for c in captions))
        return torch.stack(contexts).to(self.device), torch.stack(pooled).to(self.device)


def vae_fingerprint(vae: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])  # a sample: enough to tell VAEs apart
    return h.hexdigest()[:16]


def _disk_cache_path(item: ImageItem) -> Path:
    return item.path.with_name(f"{item.path.stem}_{item.bucket[0]}x{item.bucket[1]}_surge.npz")


def _load_cached(item: ImageItem, vae_hash: str) -> torch.Tensor | None:
    path = _disk_cache_path(item)
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if str(data["vae"]) != vae_hash or tuple(data["crop"]) != item.crop_top_left:
                return None
            return torch.from_numpy(data["latents"].copy())
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        logger.warning("latent cache %s is corrupt; re-encoding", path)
        return None


def _save_cached(item: ImageItem, vae_hash: str) -> None:
    path = _disk_cache_path(item)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, latents=item.latents.numpy(), vae=vae_hash, crop=np.array(item.crop_top_left))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


ENCODE_CHUNK = 8


@torch.no_grad()
def encode_latents(items: list[ImageItem], vae: torch.nn.Module, device: torch.device, to_disk: bool,
                   progress: bool = True, chunk: int = ENCODE_CHUNK) -> None:
    """Fill `item.latents` (scaled by the VAE's scaling factor); reuse/refresh the `.npz` caches on disk.

    Images still to encode are grouped by bucket and encoded `chunk` at a time (one VAE call per chunk).
    """
    from tqdm import tqdm

    vae_hash = vae_fingerprint(vae) if to_disk else ""
    scaling = float(vae.config.scaling_factor)
    param = next(vae.parameters())
    todo: dict[tuple[int, int], list[tuple[ImageItem, Image.Image]]] = {}
    bar = tqdm(total=len(items), desc="caching latents", disable=not progress or len(items) < 8)

    def flush(group: list[tuple[ImageItem, Image.Image]]) -> None:
        pixels = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                              for _, img in group])
        latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode() * scaling
        for (item, _), lat in zip(group, latents.float().cpu()):
            item.latents = lat.clone()
            if to_disk:
                _save_cached(item, vae_hash)
        bar.update(len(group))

    for item in items:
        with Image.open(item.path) as image:
            rgb = image.convert("RGB")
        cropped, item.crop_top_left = resize_and_crop(rgb, item.bucket)
        if to_disk:
            cached = _load_cached(item, vae_hash)
            if cached is not None:
                item.latents = cached
                bar.update(1)
                continue
        group = todo.setdefault(item.bucket, [])
        group.append((item, cropped))
        if len(group) >= chunk:
            flush(group)
            todo[item.bucket] = []
    for group in todo.values():
        if group:
            flush(group)
    bar.close()


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    latents: torch.Tensor
    context: torch.Tensor
    added_cond: dict[str, torch.Tensor]
    captions: list[str]


class TrainData:
    """Everything the training loop needs from the data (see module docstring)."""

    def __init__(self, items: list[ImageItem], datasets: list[DatasetConfig], sampler: BucketBatchSampler,
                 encode_prompts: PromptEncoder, device: torch.device, latent_channels: int, vae_scale: int):
        self.items = items
        self.datasets = datasets
        self.sampler = sampler
        self.encode_prompts = encode_prompts
        self.device = device
        self.latent_channels = latent_channels
        self.vae_scale = vae_scale
        self.skipped: list[str] = []

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) of the base resolution, for samples and probes."""
        w, h = self.datasets[0].resolution
        return h, w

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h, w = self.resolution
        return self.latent_channels, h // self.vae_scale, w // self.vae_scale

    def time_ids_for(self, count: int) -> torch.Tensor:
        h, w = self.resolution
        return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32).expand(count, 6).clone()

    def _caption(self, item: ImageItem) -> str:
        if not item.subset.shuffle_caption:
            return item.caption
        key = f"{item.path.name}:{self.sampler.epoch}:{self.sampler.seed}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        return shuffle_caption(item.caption, item.subset.keep_tokens, rng, item.subset.keep_tokens_separator)

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        """This process's batches of the current epoch, after the first `skip`."""
        for indices in self.sampler.rank_batches()[skip:]:
            items = [self.items[i] for i in indices]
            captions = [self._caption(item) for item in items]
            context, pooled = self.encode_prompts(captions)
            latents = torch.stack([item.latents for item in items]).to(self.device)
            time_ids = torch.stack([item.time_ids for item in items]).to(self.device)
            yield Batch(latents, context, {"text_embeds": pooled, "time_ids": time_ids}, captions)

    def probe_examples(self, count: int) -> tuple[list[str], torch.Tensor]:
        """Up to `count` distinct (caption, latents) pairs from the most common bucket (latents stack)."""
        buckets: dict[tuple[int, int], list[ImageItem]] = {}
        for item in self.items:
            buckets.setdefault(item.bucket, []).append(item)
        common = max(buckets.values(), key=len)
        chosen = common[:: max(1, len(common) // count)][:count]
        return [item.caption for item in chosen], torch.stack([item.latents for item in chosen])


def build_train_data(cfg: TrainConfig, dataset_config: str | None, train_data_dir: str | None,
                     bundle: ModelBundle, accelerator: Accelerator, log: Callable[[str], None]) -> TrainData:
    datasets = load_dataset_config(dataset_config, cfg) if dataset_config else \
        dataset_config_from_folder(train_data_dir, cfg)
    items: list[ImageItem] = []
    skipped: list[str] = []
    for ds in datasets:
        buckets = make_buckets(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps) \
            if ds.enable_bucket else None
        for subset in ds.subsets:
            items += scan_subset(subset, buckets, ds.resolution, skipped)
    if skipped:
        log(f"skipped {len(skipped)} unreadable images:\n  " + "\n  ".join(skipped[:20]))
    if not items:
        dirs = ", ".join(str(sub.image_dir) for ds in datasets for sub in ds.subsets)
        raise ValueError(f"the dataset has no readable images (image_dir: {dirs}; {len(skipped)} unreadable "
                         "files skipped); put .png/.jpg/.webp/.bmp images there or fix image_dir")
    device = accelerator.device
    bundle.vae.to(device)
    encode_latents(items, bundle.vae, device, cfg.cache_latents_to_disk, progress=accelerator.is_local_main_process)
    for module in (bundle.text_encoder_1, bundle.text_encoder_2):
        module.to(device)
    sampler = BucketBatchSampler(items, datasets[0].batch_size, cfg.seed, accelerator.process_index,
                                 accelerator.num_processes)
    vae_scale = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    data = TrainData(items, datasets, sampler, PromptEncoder(bundle, device), device,
                     int(bundle.unet.config.in_channels), vae_scale)
    data.skipped = skipped
    log(f"dataset: {len(items)} images ({len(skipped)} skipped) in {len({i.bucket for i in items})} buckets, "
        f"{len(sampler.repeated)} with repeats, batch size {datasets[0].batch_size}")
    return data
