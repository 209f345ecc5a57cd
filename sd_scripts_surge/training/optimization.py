"""Optimizer and scheduler from the config; non-finite steps; the LR of each group for the logs."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from accelerate import Accelerator

from library.surge_optimizer import AdaSurge
from sd_scripts_surge.config import ConfigError
from sd_scripts_surge.config.schema import TrainingOptions
from sd_scripts_surge.training.state import TrainProgress


# ------------------------------------------------------------------------------------ optimizer, scheduler
def build_optimizer(cfg: TrainingOptions, groups: list[dict]) -> torch.optim.Optimizer:
    """The configured optimizer (type, base LR, its key=value args) over the param groups."""
    from sd_scripts_surge.training.optim_registry import create_optimizer

    return create_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args or [])


def build_scheduler(cfg: TrainingOptions, optimizer: torch.optim.Optimizer, total: int, num_processes: int):
    from sd_scripts_surge.training.optim_registry import create_scheduler

    # accelerate steps a prepared scheduler once per process per step; scale the counts like sd-scripts.
    return create_scheduler(
        cfg.lr_scheduler, optimizer, num_training_steps=total * num_processes,
        num_warmup_steps=(cfg.lr_warmup_steps or 0) * num_processes, num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power, scheduler_type=cfg.lr_scheduler_type,
        scheduler_args=cfg.lr_scheduler_args or [],
    )


def all_finite(loss: torch.Tensor, accelerator: Accelerator) -> bool:
    flag = torch.tensor([1.0 if bool(torch.isfinite(loss.detach())) else 0.0], device=loss.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def skip_nonfinite_step(optimizer: torch.optim.Optimizer, scheduler, progress: TrainProgress,  # noqa: ANN001
                        log: Callable[[str], None]) -> None:
    """A NaN/Inf loss: drop the step (no backward, no update) and halve every LR from the next step on.

    The halving goes into the scheduler's base LRs, so it persists (and is saved with the scheduler state)."""
    optimizer.zero_grad(set_to_none=True)
    progress.skipped_nonfinite += 1
    progress.lr_backoff *= 0.5
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
    if hasattr(inner, "base_lrs"):
        inner.base_lrs = [lr * 0.5 for lr in inner.base_lrs]
    log(f"step {progress.global_step}: loss is NaN/Inf; step skipped, learning rates x{progress.lr_backoff:g} "
        f"({progress.skipped_nonfinite} skipped so far)")


def lr_logs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The LR each group trains with now, keyed lr/<unit> (lr/<unit>.b<block> with --block_lr)."""
    logs = {}
    for i, g in enumerate(optimizer.param_groups):
        key = f"lr/{g.get('unit', i)}" + (f".b{g['block']}" if "block" in g else "")
        # AdaSurge keeps the scale actually in force in "surge_effective" ("surge_scale" is its target).
        logs[key] = float(g["lr"] or 0.0) * float(g.get("surge_effective", g.get("surge_scale", 1.0)))
    return logs


def fused_backward(max_grad_norm: float, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> AdaSurge:
    """Hook ADA_SURGE's fused backward pass (`--fused_backward_pass`); returns the AdaSurge to open each step."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if not isinstance(inner, AdaSurge):
        raise ConfigError(f"--fused_backward_pass needs ADA_SURGE (the optimizer is {type(inner).__name__})")
    if accelerator.num_processes > 1:
        raise ConfigError("--fused_backward_pass runs in one process: gradients would be applied before DDP "
                          "averages them; drop the flag for multi-process training")
    clip = None
    if max_grad_norm:
        def clip(tensor: torch.Tensor) -> None:  # per tensor, as sd-scripts' fused pass does
            torch.nn.utils.clip_grad_norm_([tensor], max_grad_norm)
    inner.register_fused_backward(clip)
    # the updates happen inside backward, so optimizer.step() is never called: torch's scheduler would warn at every
    # run that the schedule is stepped "before optimizer.step()", which here is the design, not a mistake
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step")
    return inner
