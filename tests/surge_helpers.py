"""Small shared fixtures for the surge-engine tests: tiny UNets, probe inputs, perturbed students."""

from __future__ import annotations

import torch

from sd_scripts_surge.surge.losses import scaled_linear_alphas_cumprod
from sd_scripts_surge.surge.perturb import perturbed_copy  # noqa: F401 (re-exported for the tests)
from sd_scripts_surge.surge.probes import ProbeSet, make_probes
from sd_scripts_surge.tiny.architecture import build_tiny_unet


def tiny_kwargs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.randint(0, 1000, (batch,), generator=g),
                encoder_hidden_states=torch.randn(batch, 77, 64, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, 32, generator=g),
                                       time_ids=torch.randn(batch, 6, generator=g)))


def tiny_probes(num_conditions: int = 2, timesteps=(200, 700), seeds=(0, 1, 2), seed: int = 0) -> ProbeSet:
    g = torch.Generator().manual_seed(seed)
    contexts = torch.randn(num_conditions, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(num_conditions, 32, generator=g),
             "time_ids": torch.randn(num_conditions, 6, generator=g)}
    return make_probes(contexts, list(timesteps), list(seeds), scaled_linear_alphas_cumprod(), (4, 8, 8),
                       added_cond=added)


def tiny_teacher(seed: int = 0) -> torch.nn.Module:
    return build_tiny_unet(seed).eval()


_saved_threads: list[int] = []


def use_one_thread() -> None:
    """Module setup: one intra-op thread. On the shared 2-core machines two threads per process oversubscribe
    the CPU and make tiny-model forwards 10–50× slower; results do not depend on the thread count."""
    _saved_threads.append(torch.get_num_threads())
    torch.set_num_threads(1)


def restore_threads() -> None:
    if _saved_threads:
        torch.set_num_threads(_saved_threads.pop())
