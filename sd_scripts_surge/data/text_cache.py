"""Text-embedding cache: (context, pooled) per caption, in memory and optionally on disk."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_scripts_surge.data.latent_cache import module_fingerprint
from sd_scripts_surge.models.text import encode_prompts_sdxl

logger = logging.getLogger(__name__)


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


