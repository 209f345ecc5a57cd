"""Probe sets: the fixed inputs the teacher and the student are compared on.

A probe = (latent or pure-noise seed, caption conditioning, timestep, noise seed); every (conditioning,
timestep) pair is evaluated under K seeds, and `seed_index` records which seed a probe belongs to (anchors
compare units across seeds). Probes are plain tensors so a probe set has a content hash for the flavor cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sd_scripts_surge.surge.losses import add_noise


@dataclass
class ProbeSet:
    sample: torch.Tensor  # x_t (N, C, H, W)
    timesteps: torch.Tensor  # (N,) int64
    context: torch.Tensor  # encoder_hidden_states (N, L, D)
    seed_index: torch.Tensor  # (N,) int64, 0..K-1
    latents: torch.Tensor  # x0
    noise: torch.Tensor  # ε
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    @property
    def num_seeds(self) -> int:
        return int(self.seed_index.max()) + 1 if len(self) else 0

    def unet_kwargs(self, index: Sequence[int] | slice, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments for `UNet2DConditionModel.forward` for the probes at `index`."""
        idx = index if isinstance(index, slice) else torch.as_tensor(list(index), dtype=torch.long)

        def pick(t: torch.Tensor) -> torch.Tensor:
            t = t[idx].to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        kwargs = {"sample": pick(self.sample), "timestep": pick(self.timesteps),
                  "encoder_hidden_states": pick(self.context)}
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {k: pick(v) for k, v in self.added_cond.items()}
        return kwargs

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        for start in range(0, len(self), batch_size):
            yield list(range(start, min(start + batch_size, len(self))))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        tensors = {"sample": self.sample, "timesteps": self.timesteps, "context": self.context,
                   "seed_index": self.seed_index, **{f"added.{k}": v for k, v in sorted(self.added_cond.items())}}
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]

    def subset(self, index: Sequence[int]) -> ProbeSet:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return ProbeSet(self.sample[idx], self.timesteps[idx], self.context[idx], self.seed_index[idx],
                        self.latents[idx], self.noise[idx], {k: v[idx] for k, v in self.added_cond.items()})


def make_probes(contexts: torch.Tensor, timesteps: Sequence[int], seeds: Sequence[int],
                alphas_cumprod: torch.Tensor, latent_shape: tuple[int, int, int],
                latents: torch.Tensor | None = None, added_cond: dict[str, torch.Tensor] | None = None) -> ProbeSet:
    """Every (conditioning i, timestep t) under every seed; seed k draws the noise (and x0 when `latents` is None).

    contexts: (P, L, D) caption conditionings; latents: optional (P, C, H, W) encoded images; added_cond: optional
    per-conditioning SDXL tensors (text_embeds (P, ·), time_ids (P, 6)). Order: seed-major, then conditioning,
    then timestep.
    """
    rows: list[tuple[int, int, int]] = []  # (seed k, conditioning i, timestep)
    for k in range(len(seeds)):
        for i in range(contexts.shape[0]):
            for t in timesteps:
                rows.append((k, i, int(t)))
    x0s, noises = [], []
    for k, i, t in rows:
        g = torch.Generator().manual_seed(int(seeds[k]) * 1_000_003 + i * 1009 + t)
        x0s.append(latents[i] if latents is not None else torch.randn(latent_shape, generator=g))
        noises.append(torch.randn(latent_shape, generator=g))
    x0 = torch.stack(x0s).float()
    noise = torch.stack(noises)
    ts = torch.tensor([r[2] for r in rows], dtype=torch.long)
    cond_idx = torch.tensor([r[1] for r in rows], dtype=torch.long)
    sample = add_noise(x0, noise, ts, alphas_cumprod).float()
    return ProbeSet(sample, ts, contexts[cond_idx].float(), torch.tensor([r[0] for r in rows], dtype=torch.long),
                    x0, noise, {k: v[cond_idx] for k, v in (added_cond or {}).items()})
