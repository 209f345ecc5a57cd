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


from sd_scripts_surge.data.buckets import (
    Size,
    crop_plan,
    load_bucket_image,
    make_bucket_resolutions,
    no_upscale_bucket,
    sdxl_time_ids,
    select_bucket,
    to_pixels,
)
from sd_scripts_surge.data.captions import caption_varies, process_caption, read_caption, shuffle_caption, split_tags
from sd_scripts_surge.data.dataset import Batch, SurgeDataset, build_dataset, load_datasets
from sd_scripts_surge.data.errors import DataError
from sd_scripts_surge.data.latent_cache import encode_pixels, latent_cache_path
from sd_scripts_surge.data.records import IMAGE_EXTENSIONS, ImageRecord
from sd_scripts_surge.data.sampler import BucketBatchSampler
from sd_scripts_surge.data.text_cache import TextEmbeddingCache
from sd_scripts_surge.data.train_data import TrainData, build_train_data

__all__ = [
    "IMAGE_EXTENSIONS", "Batch", "BucketBatchSampler", "DataError", "ImageRecord", "Size", "SurgeDataset",
    "TextEmbeddingCache", "TrainData", "build_dataset", "build_train_data", "caption_varies", "crop_plan",
    "encode_pixels", "latent_cache_path", "load_bucket_image", "load_datasets", "make_bucket_resolutions",
    "no_upscale_bucket", "process_caption", "read_caption", "sdxl_time_ids", "select_bucket", "shuffle_caption",
    "split_tags", "to_pixels",
]
