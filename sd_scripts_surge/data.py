"""Training data: images + captions → aspect-ratio buckets → cached latents and text embeddings → batches.

The one data pipeline of the trainer (`build_train_data` → `TrainData`) and of the tools and tests that need
images without models (`build_dataset` → `SurgeDataset`). Rules (sd-scripts' behaviour unless said otherwise):
- Images are the png/jpg/jpeg/webp/bmp files in each subset's `image_dir`; the caption is the first non-empty
  line of the file beside it with the subset's `caption_extension`, else the subset's `class_tokens`.
  Every image appears `num_repeats` times per epoch; regularisation subsets (`is_reg`) are cycled or cut to as
  many entries as the training images have, and batches carry an `is_reg` mask (for prior_loss_weight).
- Captions, per (seed, epoch, entry) — never from a global RNG, so a resumed run sees the same captions:
  `caption_prefix`/`caption_suffix` joined with a space (as sd-scripts does; write "masterpiece, " to get a
  comma), then whole-caption dropout (`caption_dropout_rate`, and every `caption_dropout_every_n_epochs`-th
  epoch counted from 1 like sd-scripts), then `shuffle_caption` of the tags after the first `keep_tokens` (or of
  the text between `keep_tokens_separator`s: before the first is fixed, after a second is a fixed suffix), then
  `caption_tag_dropout_rate` on those same flexible tags. Deliberate difference: without shuffle/tag dropout
  sd-scripts leaves the separator in the text; we replace it with a comma.
- Buckets: (width, height) with sides multiples of `bucket_reso_steps` in [min, max] and area ≤ resolution²
  (plus the square base bucket); an image goes to the bucket whose aspect ratio is nearest (exact
  arithmetic; ties → the larger area). `bucket_no_upscale` makes the bucket the image size (scaled down to the
  area if larger) rounded down to the steps. Without buckets every image goes to `resolution`.
  Images are resized to cover the bucket, then centre-cropped. SDXL time ids are
  (original h, original w, crop top, crop left, target h, target w), crop measured on the resized image.
- Augmentations with cached latents (the trainer always caches them): `flip_aug` encodes each image and its
  mirror once and picks one per (seed, epoch, entry), with the crop's left edge mirrored in the time ids (like
  sd-scripts' cached flipped latents). `random_crop` (sd-scripts refuses it with cached latents) picks a crop
  position per image from the seed, fixed for the whole run. `color_aug` cannot be cached: a ConfigError.
- Latents (× the VAE's scaling factor, 0.13025 for SDXL) are encoded in same-bucket chunks and cached in memory,
  and with `to_disk` as `.npz` beside the image (or in `cache_dir`), keyed by bucket size, crop, the image
  file's size/mtime and a VAE fingerprint; a valid file is reused, a stale or corrupt one rebuilt; files are
  written to a temporary name and renamed into place.
- Text embeddings: context = concat(TE1 penultimate, TE2 penultimate) hidden states, pooled = TE2's projected
  embedding. The text encoders are frozen, so a caption that is the same every epoch is encoded once and kept
  (optionally on disk); captions that vary (shuffle, dropout) are encoded per batch and not kept.
- Unreadable, corrupt, zero-byte or missing images are skipped, counted and logged ("skipped N unreadable
  images: …"); a dataset that ends up empty is an error.
- `BucketBatchSampler`: batches from one (dataset, bucket) group; the order is a function of (seed, epoch);
  ranks take every world_size-th batch of the same list; `state_dict()` holds (seed, epoch, position), and
  `TrainData.batches(skip=n)` gives exactly the rest of an epoch, so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, TrainConfig
from .dataset_config import DatasetConfig, SubsetConfig, dataset_config_from_folder, load_dataset_config

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .models.bundle import ModelBundle

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SDXL_LATENT_SCALE = 0.13025
CACHE_FORMAT = 1  # bump when the .npz layout changes; older files are rebuilt


class DataError(ValueError):
    """The training data cannot be used as configured; the message says what and where."""


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


# ------------------------------------------------------------------------------------------------ captions


def read_caption(image_path: Path, subset: SubsetConfig) -> str:
    """First non-empty line of the caption file beside the image, else the subset's class tokens."""
    caption_file = image_path.with_suffix(subset.caption_extension)
    if caption_file.is_file():
        for line in caption_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                return line.strip()
    return subset.class_tokens or ""


def split_tags(caption: str, keep_tokens: int, separator: str = "") -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed suffix) comma-separated tags. With `separator` in the caption the text before it
    is fixed and, after a second separator, the rest is a fixed suffix (sd-scripts); else the first
    `keep_tokens` tags are fixed. Only the flexible tags are shuffled or dropped."""

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    if separator and separator in caption:
        fixed, _, rest = caption.partition(separator)
        flexible, _, suffix = rest.partition(separator)
        return tags(fixed), tags(flexible), tags(suffix)
    everything = tags(caption)
    return everything[:keep_tokens], everything[keep_tokens:], []


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random, separator: str = "") -> str:
    """Shuffle comma-separated tags; the first `keep_tokens` tags (or all text before `separator`) stay first."""
    fixed, flexible, suffix = split_tags(caption, keep_tokens, separator)
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible + suffix)


def caption_varies(subset: SubsetConfig) -> bool:
    """True when the subset's captions change from epoch to epoch (so their embeddings cannot be cached)."""
    return (subset.shuffle_caption or subset.caption_dropout_rate > 0 or subset.caption_tag_dropout_rate > 0
            or subset.caption_dropout_every_n_epochs > 0)


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random | None, epoch: int = 0) -> str:
    """The caption a training step of `epoch` (0-based) sees (order and rules: module docstring).

    `rng` None gives the canonical caption: prefix/suffix only, no dropout, no shuffle."""
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}"
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}"
    separator = subset.keep_tokens_separator
    if rng is not None:
        dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
        every = subset.caption_dropout_every_n_epochs
        if dropped or (every > 0 and (epoch + 1) % every == 0):  # sd-scripts counts epochs from 1
            return ""
    if rng is None or not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        if separator and separator in caption:
            return ", ".join(t for part in split_tags(caption, 0, separator) for t in part)
        return caption
    fixed, flexible, suffix = split_tags(caption, subset.keep_tokens, separator)
    if subset.shuffle_caption:
        rng.shuffle(flexible)
    if subset.caption_tag_dropout_rate > 0:
        flexible = [t for t in flexible if rng.random() >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + suffix)


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


def _stable_rng(*parts: object) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))  # str seeds hash with sha512: same in every process


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
        resized, crop = crop_plan(size, bucket, subset.random_crop, _stable_rng("crop", seed, path.name))
        records.append(ImageRecord(path, read_caption(path, subset), dataset_index, subset, size, bucket,
                                   resized, crop))
    return records


# ------------------------------------------------------------------------------------------------ fingerprints


def module_fingerprint(module: torch.nn.Module, samples_per_tensor: int = 1024) -> str:
    """A short hash of a module's weights: names, shapes, dtypes and an evenly strided sample of each tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _image_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


# ------------------------------------------------------------------------------------------------ latent cache


def latent_cache_path(record: ImageRecord, cache_dir: Path | None = None) -> Path:
    """`<stem>_<W>x<H>_surge.npz` beside the image, or in `cache_dir` with a hash of the image path."""
    name = f"{record.path.stem}_{record.bucket[0]:04d}x{record.bucket[1]:04d}_surge.npz"
    if cache_dir is None:
        return record.path.with_name(name)
    tag = hashlib.sha1(str(record.path.resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{tag}-{name}"


def _cache_key(record: ImageRecord, vae_hash: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "vae": vae_hash, "bucket": list(record.bucket), "crop": list(record.crop_top_left),
            "image": _image_stamp(record.path), "flip": bool(record.subset.flip_aug)}


def read_latent_cache(path: Path, key: dict[str, Any], latent_shape: tuple[int, ...] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(latents, flipped latents or None) if `path` holds a valid cache for `key`; None if absent/stale/corrupt."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {k: data[f"key_{k}"].tolist() for k in key}
            if stored != key:
                logger.info("latent cache %s is stale (%s changed); re-encoding", path,
                            ", ".join(k for k in key if stored[k] != key[k]))
                return None
            latents = torch.from_numpy(np.array(data["latents"], dtype=np.float32))
            flipped = torch.from_numpy(np.array(data["latents_flipped"], dtype=np.float32)) if key["flip"] else None
    except Exception as e:  # noqa: BLE001 - a damaged zip/npz raises BadZipFile, ValueError, EOFError, KeyError …
        logger.warning("latent cache %s is unreadable (%s: %s); re-encoding", path, type(e).__name__, e)
        return None
    for tensor in (latents, flipped):
        if tensor is None:
            continue
        if (latent_shape is not None and tuple(tensor.shape) != latent_shape) or not torch.isfinite(tensor).all():
            logger.warning("latent cache %s has a wrong shape or non-finite values; re-encoding", path)
            return None
    return latents, flipped


def write_latent_cache(path: Path, key: dict[str, Any], latents: torch.Tensor, flipped: torch.Tensor | None) -> None:
    """Write atomically (temp file + rename) so an interrupted run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"key_{k}": np.array(v) for k, v in key.items()}
    arrays["latents"] = latents.float().cpu().numpy()
    if flipped is not None:
        arrays["latents_flipped"] = flipped.float().cpu().numpy()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    """Latents (mode of the posterior) × the VAE's scaling factor (SDXL 0.13025) for pixels in [-1, 1]."""
    param = next(vae.parameters())
    scale = scaling_factor if scaling_factor is not None else \
        float(getattr(getattr(vae, "config", None), "scaling_factor", SDXL_LATENT_SCALE))
    posterior = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    return (posterior.mode() * scale).float()


# ------------------------------------------------------------------------------------------------ text


def tokenize(tokenizer: Callable[..., Any], captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, max_length) from any tokenizer with the Hugging Face `__call__` interface."""
    max_length = int(getattr(tokenizer, "model_max_length", 77))
    out = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
    return out["input_ids"] if isinstance(out, Mapping) else out.input_ids


@torch.no_grad()
def encode_prompts_sdxl(captions: Sequence[str], tokenizers: Sequence[Callable[..., Any]],
                        text_encoders: Sequence[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: context = concat(TE1, TE2 penultimate hidden states) (B, T, d1+d2), pooled = TE2's
    projected embedding (B, projection_dim). Encoders are transformers CLIPTextModel / ...WithProjection."""
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ValueError("SDXL needs two tokenizers and two text encoders (TE1 CLIP-L, TE2 OpenCLIP-bigG)")
    te1, te2 = text_encoders
    device = next(te1.parameters()).device
    ids1 = tokenize(tokenizers[0], captions).to(device)
    ids2 = tokenize(tokenizers[1], captions).to(next(te2.parameters()).device)
    out1 = te1(ids1, output_hidden_states=True)
    out2 = te2(ids2, output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2].float(), out2.hidden_states[-2].float().to(device)], dim=-1)
    return context, out2.text_embeds.float().to(device)


class TextEmbeddingCache:
    """Per-caption (context, pooled) memo over `encode_prompts_sdxl`; optionally persisted as .npz files."""

    def __init__(self, tokenizers: Sequence[Callable[..., Any]], text_encoders: Sequence[torch.nn.Module],
                 cache_dir: str | Path | None = None, batch_size: int = 16) -> None:
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        joined = "".join(module_fingerprint(m) for m in text_encoders)
        self.fingerprint = hashlib.sha256(joined.encode()).hexdigest()[:16]
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = 0  # captions actually run through the encoders (for tests and logs)

    def _file(self, caption: str) -> Path:
        assert self.cache_dir is not None
        digest = hashlib.sha256(f"{self.fingerprint}\0{caption}".encode()).hexdigest()[:24]
        return self.cache_dir / f"te_{digest}.npz"

    def _read(self, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self._file(caption)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["caption"]) != caption or str(data["fingerprint"]) != self.fingerprint:
                    return None
                context, pooled = torch.from_numpy(data["context"].copy()), torch.from_numpy(data["pooled"].copy())
        except Exception as e:  # noqa: BLE001 - any damage means "encode again"
            logger.warning("text embedding cache %s is unreadable (%s); re-encoding", path, type(e).__name__)
            return None
        return (context, pooled) if torch.isfinite(context).all() and torch.isfinite(pooled).all() else None

    def _write(self, caption: str, context: torch.Tensor, pooled: torch.Tensor) -> None:
        path = self._file(caption)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, context=context.numpy(), pooled=pooled.numpy(), caption=np.array(caption),
                         fingerprint=np.array(self.fingerprint))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def fill(self, captions: Sequence[str], progress: bool = False, store: bool = True
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(context, pooled) for every caption: from memory, from disk when valid, else encoded.

        With `store` the new ones are kept (and written to disk); without, they are only returned: captions that
        vary per epoch would otherwise grow the cache without end."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        missing = []
        for caption in dict.fromkeys(captions):
            if caption in self.memory:
                found[caption] = self.memory[caption]
                continue
            cached = self._read(caption) if store and self.cache_dir is not None else None
            if cached is not None:
                found[caption] = self.memory[caption] = cached
            else:
                missing.append(caption)
        from tqdm import tqdm

        # A kept embedding must not depend on which captions it was encoded with (a batch of one takes another
        # BLAS path: pooled outputs differ by ~4e-7), or a resumed run or a warm disk cache would differ from a
        # fresh run. Kept ones are encoded one caption per call; per-batch ones (store=False) batch by batch.
        size = 1 if store else self.batch_size
        starts = range(0, len(missing), size)
        for start in tqdm(starts, desc="caching text embeddings", disable=not progress or len(missing) < 64):
            chunk = missing[start:start + size]
            context, pooled = encode_prompts_sdxl(chunk, self.tokenizers, self.text_encoders)
            self.encoded += len(chunk)
            for i, caption in enumerate(chunk):
                found[caption] = (context[i].cpu().clone(), pooled[i].cpu().clone())
                if store:
                    self.memory[caption] = found[caption]
                    if self.cache_dir is not None:
                        self._write(caption, *found[caption])
        return found

    def __call__(self, captions: Sequence[str], store: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, T, D), pooled (B, P)) on the CPU, in the order of `captions`."""
        found = self.fill(captions, store=store)
        contexts, pooled = zip(*(found[c] for c in captions))
        return torch.stack(contexts), torch.stack(pooled)


# ------------------------------------------------------------------------------------------------ sampler


class BucketBatchSampler:
    """Batches of entries from one group (dataset, bucket), in an order fixed by (seed, epoch).

    Iterating yields the rest of the current epoch from `position`, counting a batch as consumed when it is
    handed out; at the end the epoch advances. With several processes each rank takes every world_size-th
    batch of the same list (the list is cut to a multiple of world_size, so all ranks step together).
    """

    def __init__(self, groups: Sequence[Hashable], batch_size: int | Mapping[Hashable, int], seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if not groups:
            raise DataError("the sampler got no entries: the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def _size_of(self, group: Hashable) -> int:
        size = self.batch_size[group] if isinstance(self.batch_size, Mapping) else self.batch_size
        if size < 1:
            raise ValueError(f"batch size for {group!r} must be ≥ 1")
        return size

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of `epoch` (default: the current one) over all ranks, in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = _stable_rng("batches", self.seed, epoch)
        by_group: dict[Hashable, list[int]] = {}
        for index, group in enumerate(self.groups):
            by_group.setdefault(group, []).append(index)
        batches = []
        for group in sorted(by_group, key=repr):
            indices = by_group[group]
            if self.shuffle:
                rng.shuffle(indices)
            size = self._size_of(group)
            batches += [indices[i:i + size] for i in range(0, len(indices), size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of `epoch`."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            batches = self.all_batches(epoch)
            while len(batches) < self.world_size:  # tiny datasets: every rank still gets a batch
                batches += batches[: self.world_size - len(batches)]
            usable = len(batches) // self.world_size * self.world_size
            self._cache = (epoch, batches[self.rank:usable:self.world_size])
        return self._cache[1]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.rank_batches())

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield list(batch)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "entries": len(self.groups),
                "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("entries", len(self.groups))) != len(self.groups):
            raise DataError(f"cannot resume the data position: the saved run had {state['entries']} dataset entries, "
                            f"this one has {len(self.groups)} (images were added or removed)")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise DataError(f"cannot resume the data position: saved with {state['world_size']} processes, "
                            f"now {self.world_size}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.position = int(state.get("position", 0))  # states saved before positions were recorded: 0


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
            key = _cache_key(record, vae_hash)
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
        return process_caption(record.caption, record.subset, _stable_rng("caption", self.seed, epoch, entry), epoch)

    @staticmethod
    def canonical_caption(record: ImageRecord) -> str:
        """The caption without random changes (prefix/suffix only): for probes and the text cache."""
        return process_caption(record.caption, record.subset, None)

    def flipped(self, entry: int, epoch: int) -> bool:
        """Whether `entry` is mirrored in `epoch` (flip_aug subsets; a function of (seed, epoch, entry))."""
        record = self.records[self.entries[entry]]
        return record.subset.flip_aug and _stable_rng("flip", self.seed, epoch, entry).random() < 0.5

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
