"""Per-unit learning-rate multipliers (DESIGN §3 D), applied as per-parameter-group scales of any optimizer.

Target rule (`target_multipliers`, a pure function), for each unit l with mean relative difference d_l:

1. raw_l = clamp(d_l / mean(d), 1/shock_rate, shock_rate).
2. Anchor grasp. N_l = the `anchor_grasp` anchors nearest to l by hop distance along the UNet graph (chain +
   skips; ties broken by unit order), counting only anchors at most `max_hops` away. The unit is pulled toward
   the mean raw multiplier of those anchors with strength p_l = mean_{a∈N_l} 1/(1 + hop(l, a)):
   target_l = (1 − p_l)·raw_l + p_l·mean_{a∈N_l} raw_a.
   An anchor itself (hop 0) is pulled fully toward its anchor group; a unit next to anchors half-way; far
   units keep most of their own ratio. (Why: anchors already match the teacher; a unit that shares inputs or
   outputs with them must not be driven so hard that it disturbs them.)
3. Slow ("knotted") zones: target_l × smooth_rate.
4. Units with no anchor within `max_hops` (N_l empty), by `rule`:
   - "anchored" (DESIGN §3 D): keep 1.0, there is no reliable reference near them. With no anchors at all,
     every target is 1.0 — so the first update of a run (no anchors yet) changes nothing.
   - "measured": keep their own raw_l. The first capture already measures every unit's difference; no
     anchors is not "no information", so the controller acts from the first step.
5. Optional (`keep_mean`, not in DESIGN): targets divided by their mean over units and clamped again to
   [1/shock_rate, shock_rate], so the controller moves LR between units instead of lowering the overall LR
   (on a depth-pruned student the plain rule gives most units < 1; see bench/README.md).

Dynamics (`UnitLRController`), the one smoothing rule of a surge run (DESIGN §3 I): at each `update()` (at the
start of every epoch, and every `update_every_n_steps` steps when set) the new goal of every unit is
goal = m + smooth_rate·(target − m), a lerp from the multiplier m in force; the applied multiplier then ramps
linearly from m to goal over `shock_rate` optimizer steps (`step()` once per optimizer step):
m(k) = start + (goal − start)·min(1, k/shock_rate), k = optimizer steps since the update. `apply()` writes m(k)
into the optimizer as it is: an AdaSurge group gets surge_scale = m(k) and smooth_rate = 1, so AdaSurge's own
lerp (its standalone rule) jumps to the value and does not smooth a second time.

Cascade offsets: φ_l = min(h_l, H)/(H + 1) with h_l the hops to the nearest anchor and H = max_hops + 1
(units beyond reach get H/(H + 1)); all zero when there are no anchors. φ ∈ [0, 1).

Every rank computes the same numbers: statistics are all-reduced before (`UnitStatsAccumulator.all_reduce`),
and `update()` broadcasts rank 0's targets under torch.distributed anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sd_scripts_surge.surge.units import UnitMap, unit_of_module_path

OTHER_GROUP = "other"
LR_RULES = ("anchored", "measured")


@dataclass(frozen=True)
class ControllerConfig:
    shock_rate: float = 5.0
    smooth_rate: float = 0.5641895835  # 1/√π
    max_hops: int = 4
    anchor_grasp: int = 3
    keep_mean: bool = False
    rule: str = "anchored"

    def __post_init__(self) -> None:
        if self.rule not in LR_RULES:
            raise ValueError(f"surge lr_rule must be one of {', '.join(LR_RULES)} (got {self.rule!r})")
        if self.shock_rate < 1:
            raise ValueError(f"surge shock_rate must be ≥ 1 (got {self.shock_rate})")
        if not 0 < self.smooth_rate <= 1:
            raise ValueError(f"surge smooth_rate must be in (0, 1] (got {self.smooth_rate})")
        if self.max_hops < 0 or self.anchor_grasp < 1:
            raise ValueError("surge max_hops must be ≥ 0 and anchor_grasp ≥ 1")


# ------------------------------------------------------------------------------------------ pure rules


def nearest_anchors(unit: str, anchors: Sequence[str], hops: Mapping[str, Mapping[str, int]], order: Sequence[str],
                    grasp: int, max_hops: int) -> list[tuple[str, int]]:
    """The `grasp` anchors nearest to `unit` within `max_hops`, as (anchor, hops), nearest first."""
    rank = {u: i for i, u in enumerate(order)}
    reachable = [(a, hops[unit][a]) for a in anchors if a in hops[unit] and hops[unit][a] <= max_hops]
    reachable.sort(key=lambda x: (x[1], rank[x[0]]))
    return reachable[:grasp]


def target_multipliers(d: Mapping[str, float], anchors: Sequence[str], slow: Sequence[str],
                       hops: Mapping[str, Mapping[str, int]], config: ControllerConfig) -> dict[str, float]:
    """Per-unit LR targets from mean relative differences `d` (see module docstring for the rule)."""
    units = list(d)
    mean = sum(d.values()) / max(1, len(units))
    s = config.shock_rate
    raw = {u: min(max(d[u] / mean, 1 / s), s) if mean > 0 else 1.0 for u in units}
    targets = {}
    for u in units:
        near = nearest_anchors(u, anchors, hops, units, config.anchor_grasp, config.max_hops)
        if not near:
            if config.rule == "anchored":
                targets[u] = 1.0
                continue
            t = raw[u]
        else:
            pull = sum(1 / (1 + h) for _, h in near) / len(near)
            anchor_level = sum(raw[a] for a, _ in near) / len(near)
            t = (1 - pull) * raw[u] + pull * anchor_level
        targets[u] = t * config.smooth_rate if u in slow else t
    if config.keep_mean and targets:
        level = sum(targets.values()) / len(targets)
        targets = {u: min(max(t / level, 1 / s), s) for u, t in targets.items()}
    return targets


def cascade_offsets(units: Sequence[str], anchors: Sequence[str], hops: Mapping[str, Mapping[str, int]],
                    max_hops: int) -> dict[str, float]:
    """Phase offsets φ ∈ [0, 1) for the Cascade scheduler: a wave that starts at the anchors."""
    if not anchors:
        return {u: 0.0 for u in units}
    cap = max_hops + 1
    out = {}
    for u in units:
        nearest = min((hops[u].get(a, math.inf) for a in anchors), default=math.inf)
        out[u] = min(nearest, cap) / (cap + 1)
    return out


# -------------------------------------------------------------------------------------- parameter groups


def build_unit_param_groups(model: nn.Module, unit_map: UnitMap, base_lr: float,
                            named_parameters: Sequence[tuple[str, nn.Parameter]] | None = None) -> list[dict]:
    """One optimizer param group per unit (key "unit"), plus "other" for trainable parameters of no unit.

    Every trainable parameter lands in exactly one group; units without trainable parameters get no group.
    Works on UNet parameters (diffusers names) and on kohya LoRA networks (``lora_unet_…`` names): pass the
    network as `model`, or explicit `named_parameters`.
    """
    lookup = unit_of_module_path(unit_map)
    owned: dict[str, list[tuple[str, nn.Parameter]]] = {u: [] for u in [*unit_map.names, OTHER_GROUP]}
    seen: set[int] = set()
    for name, p in (named_parameters if named_parameters is not None else model.named_parameters()):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        owned[lookup(name) or OTHER_GROUP].append((name, p))
    return [{"params": [p for _, p in items], "param_names": [n for n, _ in items], "unit": unit, "lr": base_lr}
            for unit, items in owned.items() if items]


# ---------------------------------------------------------------------------------------------- controller


class UnitLRController:
    """Holds the multipliers, moves them toward their targets, writes them into optimizer param groups."""

    def __init__(self, unit_map: UnitMap, hops: Mapping[str, Mapping[str, int]],
                 config: ControllerConfig | None = None) -> None:
        self.units = unit_map.names
        self.hops = hops
        self.config = config or ControllerConfig()
        self.start = {u: 1.0 for u in self.units}
        self.goal = {u: 1.0 for u in self.units}
        self.targets = {u: 1.0 for u in self.units}
        self.offsets = {u: 0.0 for u in self.units}
        self.steps_since_update = 0
        self.updates = 0

    # ----- dynamics
    def multipliers(self) -> dict[str, float]:
        frac = min(1.0, self.steps_since_update / self.config.shock_rate)
        return {u: self.start[u] + (self.goal[u] - self.start[u]) * frac for u in self.units}

    def update(self, d: Mapping[str, float], anchors: Sequence[str], slow: Sequence[str] = ()) -> dict[str, float]:
        """New targets from this epoch's (all-reduced) statistics; returns them. Call on every rank."""
        unknown = set(d) - set(self.units)
        if unknown:
            raise KeyError(f"statistics for units not in the controller's unit map: {sorted(unknown)}")
        full_d = {u: float(d.get(u, 0.0)) for u in self.units}
        targets = target_multipliers(full_d, anchors, slow, self.hops, self.config)
        offsets = cascade_offsets(self.units, anchors, self.hops, self.config.max_hops)
        return self.set_targets(targets, offsets)

    def set_targets(self, targets: Mapping[str, float], offsets: Mapping[str, float] | None = None) -> dict[str, float]:
        """Move toward explicit targets (same lerp and ramp as `update`); e.g. the random-LR ablation."""
        targets = _broadcast_from_rank0({u: float(targets.get(u, 1.0)) for u in self.units})
        offsets = _broadcast_from_rank0({u: float((offsets or {}).get(u, 0.0)) for u in self.units})
        current = self.multipliers()
        r = self.config.smooth_rate
        self.start = current
        self.goal = {u: current[u] + r * (targets[u] - current[u]) for u in self.units}
        self.targets, self.offsets = targets, offsets
        self.steps_since_update = 0
        self.updates += 1
        return targets

    def step(self) -> None:
        """Advance the ramp by one optimizer step."""
        self.steps_since_update += 1

    # ----- optimizer
    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the multipliers into `optimizer`'s groups that carry a "unit" key.

        AdaSurge groups (with a "surge_scale" key) get surge_scale = multiplier. Other optimizers get
        lr = lr_base × multiplier, where lr_base is the group's lr as last set by someone else (a scheduler):
        re-applying without a scheduler step does not compound. This assumes a scheduler that sets lr from the
        group's initial_lr (LambdaLR: every diffusers/sd-scripts schedule, Cascade); a chainable scheduler that
        multiplies the current lr (StepLR, ExponentialLR) would compound the multiplier: use AdaSurge's
        surge_scale there. Every unit group also gets "cascade_offset".
        """
        mult = self.multipliers()
        for group in optimizer.param_groups:
            unit = group.get("unit")
            if unit is None:
                continue
            m = mult.get(unit, 1.0)
            group["cascade_offset"] = self.offsets.get(unit, 0.0)
            if "surge_scale" in group:
                group["surge_scale"] = m
                group["smooth_rate"] = 1.0  # the ramp above is the one smoothing rule: AdaSurge takes m as it is
                continue
            if group.get("surge_lr_applied") != group["lr"]:
                group["surge_lr_base"] = group["lr"]
            group["lr"] = group["surge_lr_base"] * m
            group["surge_lr_applied"] = group["lr"]

    # ----- resume
    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "units": list(self.units), "start": dict(self.start),
                "goal": dict(self.goal), "targets": dict(self.targets), "offsets": dict(self.offsets),
                "steps_since_update": self.steps_since_update, "updates": self.updates}

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["units"]) != list(self.units):
            raise ValueError("controller state was saved for a different unit map "
                             f"({len(state['units'])} units vs {len(self.units)}); use the same --surge_unit_map")
        self.config = ControllerConfig(**state["config"])
        for name in ("start", "goal", "targets", "offsets"):
            setattr(self, name, {u: float(v) for u, v in state[name].items()})
        self.steps_since_update = int(state["steps_since_update"])
        self.updates = int(state["updates"])


def _broadcast_from_rank0(values: dict[str, float]) -> dict[str, float]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.broadcast(buf, src=0)
    return dict(zip(keys, buf.cpu().tolist()))
