"""Latent cache: VAE latents per image in memory and as `.npz` files keyed by image, crop and VAE."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_scripts_surge.data.records import ImageRecord

logger = logging.getLogger(__name__)

SDXL_LATENT_SCALE = 0.13025
CACHE_FORMAT = 1  # bump when the .npz layout changes; older files are rebuilt

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


def latent_cache_key(record: ImageRecord, vae_hash: str) -> dict[str, Any]:
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


