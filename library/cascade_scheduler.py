"""Cascade: cosine with hard restarts, phase-shifted per parameter group (DESIGN §5).

Self-contained (torch + standard library only): copy into an sd-scripts checkout's ``library/`` and use::

    --lr_scheduler_type library.cascade_scheduler.CascadeLR
    --lr_scheduler_args "num_training_steps=1600" "warmup_steps=100" "num_cycles=4" "min_lr_ratio=0.1" "spread=0.05"

(sd-scripts gives a custom scheduler only the optimizer and these args, and refuses ``--lr_warmup_steps``
other than 0 for it, so warmup and length are Cascade's own arguments. accelerate steps a prepared scheduler
once per process per optimizer step: with N processes pass N × max_train_steps, as sd-scripts does itself.)

Factor of group g at scheduler step s (`cascade_factor`), with W = warmup_steps, T = num_training_steps,
c = num_cycles, m = min_lr_ratio, φ_g ∈ [0, 1) the group's phase offset::

    f_g(p) = m + (1 − m) · max(0, ½(1 + cos(π · ((c·p + φ_g) mod 1))))
    s < W:        lr = base · (s / max(1, W)) · f_g(0)        (linear warmup to where the group's cycle starts)
    p = (s − W) / max(1, T − W) < 1:  lr = base · f_g(p)
    p ≥ 1:        lr = base · m

With all offsets 0 and m = 0 this is diffusers' ``get_cosine_with_hard_restarts_schedule_with_warmup`` (kohya's
``cosine_with_restarts``) step for step. Offsets, first match wins:

1. ``offsets=[φ_0, φ_1, …]``: one per param group, explicit;
2. ``group["cascade_offset"]``: set (and updated at run time) by the surge controller — hop distance from
   anchor layers, so the restart travels down the network as a wave; read at every step;
3. ``spread × depth`` with depth = ``group["depth"]`` if present, else the group's index.

Every φ is taken mod 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def cascade_factor(step: int, warmup_steps: int, num_training_steps: int, num_cycles: float, min_lr_ratio: float,
                   offset: float) -> float:
    """The LR multiplier of one group at scheduler step `step` (module docstring formula)."""
    phase = float(offset) % 1.0

    def cycle(progress: float) -> float:
        cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress + phase) % 1.0))))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps)) * cycle(0.0)
    progress = float(step - warmup_steps) / float(max(1, num_training_steps - warmup_steps))
    if progress >= 1.0:
        return float(min_lr_ratio)
    return cycle(progress)


class CascadeLR(LambdaLR):
    """Per-group phase-shifted cosine with hard restarts; see the module docstring for the rule.

    Args (literal-typed, for ``--lr_scheduler_args k=v``):
        num_training_steps: scheduler steps in the run (required). warmup_steps (alias num_warmup_steps): linear
        warmup. num_cycles: hard restarts (1). min_lr_ratio: floor m as a fraction of each group's base lr (0).
        offsets: explicit per-group phases, or None. spread: φ per unit of group depth when nothing else sets φ.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_training_steps: int,
        warmup_steps: int = 0,
        num_cycles: float = 1,
        min_lr_ratio: float = 0.0,
        offsets: Sequence[float] | None = None,
        spread: float = 0.0,
        last_epoch: int = -1,
        num_warmup_steps: int | None = None,
    ) -> None:
        if num_warmup_steps is not None:
            if warmup_steps not in (0, num_warmup_steps):
                raise ValueError("CascadeLR: give warmup_steps or num_warmup_steps, not both with different values")
            warmup_steps = num_warmup_steps
        if num_training_steps is None or int(num_training_steps) < 1:
            raise ValueError(f"CascadeLR: num_training_steps must be a positive integer (got {num_training_steps!r});"
                             " from sd-scripts pass --lr_scheduler_args \"num_training_steps=<max_train_steps>\"")
        if not 0 <= int(warmup_steps) <= int(num_training_steps):
            raise ValueError(f"CascadeLR: warmup_steps must be in [0, num_training_steps] (got {warmup_steps!r})")
        if float(num_cycles) <= 0:
            raise ValueError(f"CascadeLR: num_cycles must be > 0 (got {num_cycles!r})")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"CascadeLR: min_lr_ratio must be in [0, 1] (got {min_lr_ratio!r})")
        if offsets is not None and len(offsets) != len(optimizer.param_groups):
            raise ValueError(f"CascadeLR: offsets has {len(offsets)} values but the optimizer has "
                             f"{len(optimizer.param_groups)} param groups; give one per group")
        self.num_training_steps = int(num_training_steps)
        self.warmup_steps = int(warmup_steps)
        self.num_cycles = float(num_cycles)
        self.min_lr_ratio = float(min_lr_ratio)
        self.offsets = None if offsets is None else [float(o) for o in offsets]
        self.spread = float(spread)
        lambdas = [self._lambda_for(i) for i in range(len(optimizer.param_groups))]
        super().__init__(optimizer, lambdas, last_epoch)

    def _lambda_for(self, index: int):
        def factor(step: int) -> float:
            return cascade_factor(step, self.warmup_steps, self.num_training_steps, self.num_cycles,
                                  self.min_lr_ratio, self.group_offset(index))
        return factor

    def group_offset(self, index: int) -> float:
        """φ of param group `index` in [0, 1): explicit list, else group["cascade_offset"], else spread × depth."""
        if self.offsets is not None:
            return self.offsets[index] % 1.0
        group = self.optimizer.param_groups[index]
        if group.get("cascade_offset") is not None:
            return float(group["cascade_offset"]) % 1.0
        return (self.spread * float(group.get("depth", index))) % 1.0
