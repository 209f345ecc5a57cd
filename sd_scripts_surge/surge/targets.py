"""Cached teacher targets (DESIGN §3 G): the teacher's answers computed ahead of time, so training does not infer it.

For every training entry (an image × repeat of the dataset) and each of K draws, the (timestep, noise) pair is a
pure function of (seed, entry, draw) — `draw_noise` — and the teacher's outputs for it are computed once, before
training: the noise prediction, and for the hidden-unit losses the (input, output) of every trajectory unit.
Epoch e trains entry i on draw e mod K, so with K draws the teacher runs K times per entry however many epochs
follow, and no draw depends on the run's history (a resumed run sees exactly the same targets).

The cache needs each entry's inputs to be the same every epoch: captions that never vary (no shuffle, dropout)
and no flip_aug; `check_cacheable` says which subset breaks that. It lives in memory; `estimate_bytes` gives the
size before the capture starts and `max_bytes` (`--surge_cache_budget`) refuses a cache that would not fit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sd_scripts_surge.surge.losses import add_noise, apply_noise_offset

Pairs = dict[str, tuple[torch.Tensor | None, torch.Tensor]]


@dataclass
class TeacherTargets:
    """What the teacher answered for one batch: its prediction (B, C, H, W) and, per trajectory unit, (h_in, h_out)
    (h_in None where the unit changes shape); `pairs` is None when no hidden-unit loss needs them."""

    prediction: torch.Tensor
    pairs: Pairs | None = None

    def item(self, i: int) -> TeacherTargets:
        """Sample i of the batch, as CPU tensors without the batch dimension."""
        pairs = None if self.pairs is None else {
            u: (None if h_in is None else h_in[i].detach().cpu(), h_out[i].detach().cpu())
            for u, (h_in, h_out) in self.pairs.items()}
        return TeacherTargets(self.prediction[i].detach().cpu(), pairs)

    @staticmethod
    def stack(items: Sequence[TeacherTargets], device: torch.device | str) -> TeacherTargets:
        """One batch from per-sample items, on `device`."""
        prediction = torch.stack([it.prediction for it in items]).to(device)
        if items[0].pairs is None:
            return TeacherTargets(prediction)
        pairs = {}
        for unit, (h_in, _) in items[0].pairs.items():
            stacked_in = None if h_in is None else torch.stack([it.pairs[unit][0] for it in items]).to(device)
            pairs[unit] = (stacked_in, torch.stack([it.pairs[unit][1] for it in items]).to(device))
        return TeacherTargets(prediction, pairs)

    def nbytes(self) -> int:
        tensors = [self.prediction] + ([t for pair in self.pairs.values() for t in pair if t is not None]
                                       if self.pairs else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def draw_seed(seed: int, entry: int, draw: int) -> int:
    """A 63-bit generator seed for (seed, entry, draw); the same in every process and on every machine."""
    digest = hashlib.sha256(f"surge-target:{seed}:{entry}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_noise(seed: int, entry: int, draw: int, shape: Sequence[int], noise_offset: float = 0.0,
               timestep_range: tuple[int, int] = (0, 1000)) -> tuple[torch.Tensor, int]:
    """(ε, t) of draw `draw` of `entry`: ε ~ N(0, I) of `shape` (+ sd-scripts' noise offset), t uniform in range."""
    generator = torch.Generator().manual_seed(draw_seed(seed, entry, draw))
    noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = apply_noise_offset(noise, noise_offset, generator)
    t = int(torch.randint(timestep_range[0], timestep_range[1], (1,), generator=generator))
    return noise[0], t


class TargetCache:
    """Per (entry, draw) teacher targets in memory; `draw_of(epoch)` picks the draw an epoch trains on."""

    def __init__(self, draws: int, seed: int, noise_offset: float = 0.0) -> None:
        if draws < 1:
            raise ValueError(f"surge target draws must be ≥ 1 (got {draws})")
        self.draws, self.seed, self.noise_offset = draws, seed, noise_offset
        self.items: dict[tuple[int, int], TeacherTargets] = {}
        self.capture_seconds = 0.0

    def draw_of(self, epoch: int) -> int:
        return epoch % self.draws

    def noise(self, entries: Sequence[int], draw: int, latent_shape: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε (B, C, H, W), t (B,)) of these entries' draw."""
        drawn = [draw_noise(self.seed, e, draw, latent_shape, self.noise_offset) for e in entries]
        return torch.stack([n for n, _ in drawn]), torch.tensor([t for _, t in drawn], dtype=torch.long)

    def targets(self, entries: Sequence[int], draw: int, device: torch.device | str) -> TeacherTargets:
        missing = [e for e in entries if (e, draw) not in self.items]
        if missing:
            raise KeyError(f"no cached teacher targets for entries {missing[:5]} (draw {draw}); the cache was built "
                           "for another dataset or seed")
        return TeacherTargets.stack([self.items[(e, draw)] for e in entries], device)

    def nbytes(self) -> int:
        return sum(item.nbytes() for item in self.items.values())

    def build(self, batches: Callable[[], Iterable[tuple[Sequence[int], torch.Tensor, dict]]], total_entries: int,
              teacher: Callable[[dict], TeacherTargets], alphas_cumprod: torch.Tensor, max_bytes: int = 0,
              log: Callable[[str], None] = print) -> None:
        """Run the teacher on every entry × draw. `batches()` yields (entries, latents, unet kwargs without sample
        and timestep); `teacher(kwargs)` answers one noised batch. The size and time are estimated from the first
        batch and printed before the rest runs; over `max_bytes` (when > 0) is an error before any more work."""
        started = time.perf_counter()
        done, estimated = 0, False
        bar = tqdm(total=total_entries * self.draws, desc="teacher targets", dynamic_ncols=True)
        try:
            for draw in range(self.draws):
                for entries, latents, kwargs in batches():
                    noise, t = self.noise(entries, draw, latents.shape[1:])
                    noise, t = noise.to(latents.device, latents.dtype), t.to(latents.device)
                    noised = {**kwargs, "sample": add_noise(latents, noise, t, alphas_cumprod), "timestep": t}
                    with torch.no_grad():
                        answer = teacher(noised)
                    for i, entry in enumerate(entries):
                        self.items[(entry, draw)] = answer.item(i)
                    done += len(entries)
                    bar.update(len(entries))
                    if not estimated:
                        estimated = True
                        per_item = self.nbytes() / max(1, done)
                        size = per_item * total_entries * self.draws
                        seconds = (time.perf_counter() - started) / max(1, done) * total_entries * self.draws
                        log(f"teacher targets: {total_entries} entries × {self.draws} draws ≈ {size / 2**20:.1f} MiB "
                            f"in memory, ≈ {seconds:.0f} s to compute")
                        if max_bytes and size > max_bytes:
                            raise MemoryError(
                                f"cached teacher targets need ≈ {size / 2**30:.2f} GiB, over --surge_cache_budget "
                                f"{max_bytes / 2**30:.2f} GiB; lower --surge_target_draws, raise the budget, or use "
                                "--surge_teacher live")
        finally:
            bar.close()
        self.capture_seconds = time.perf_counter() - started
        log(f"teacher targets: {len(self.items)} cached ({self.nbytes() / 2**20:.1f} MiB) in "
            f"{self.capture_seconds:.1f} s")
