"""One distillation step's loss, and the surge update that opens every epoch.

`DistillLoss` = w_task·denoise + w_out·MSE(student out, teacher out) + trajectory loss on hidden units
(DESIGN §3 F). The student runs with capture hooks that keep the autograd graph on the watched units; the
teacher runs under no_grad with the same hooks, on the same noisy latents.

`surge_epoch_update` is DESIGN §3 B–E in one place: capture the student on the probes, compare it with the
teacher's cached flavors, find anchors and zones, move the controller, replay the worst units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sd_scripts_surge.surge.anchors import UnitStatsAccumulator, ZoneRules, Zones, find_zones
from sd_scripts_surge.surge.capture import CaptureOptions, Flavor, UnitCapture, capture_flavor
from sd_scripts_surge.surge.controller import UnitLRController
from sd_scripts_surge.surge.flavors import FlavorStore
from sd_scripts_surge.surge.losses import (
    add_noise,
    alpha_sigma,
    apply_noise_offset,
    denoise_loss,
    output_kd_loss,
    teacher_scales,
    trajectory_loss,
)
from sd_scripts_surge.surge.probes import ProbeSet
from sd_scripts_surge.surge.replay import ReplayResult, lerp_unit, replay_all_units, replay_unit, window_units
from sd_scripts_surge.surge.targets import Pairs, TeacherTargets
from sd_scripts_surge.surge.units import UnitMap

# Teacher call: UNet keyword arguments -> noise prediction (no grad inside).
TeacherForward = Callable[[dict], torch.Tensor]


@dataclass(frozen=True)
class LossWeights:
    task: float = 1.0
    out: float = 1.0
    traj: float = 0.5
    feature: float = 0.0  # BK-SDM-style feature KD: mean over units of MSE(h_S, h_T), equal weights


def sub_unit_map(unit_map: UnitMap, names: Sequence[str]) -> UnitMap:
    """The units of `unit_map` named in `names`, in map order (for capturing only what a loss needs)."""
    wanted = set(names)
    units = tuple(u for u in unit_map.units if u.name in wanted)
    return UnitMap(f"{unit_map.name}[{len(units)}]", units, ())


def trajectory_units(unit_map: UnitMap) -> list[str]:
    """Hidden units that carry the trajectory loss: every unit on the feature path (not the time embedding)."""
    return [u.name for u in unit_map.units if u.kind != "embed"]


def scales_from_flavors(store: FlavorStore, units: Sequence[str]) -> dict[str, float]:
    """s_l = RMS of the teacher's output of unit l over all cached probe batches."""
    sums = {u: 0.0 for u in units}
    counts = {u: 0 for u in units}
    for i in range(len(store)):
        flavor = store.load(i)
        for unit in units:
            out = flavor.units[unit].output.double()
            sums[unit] += float(out.pow(2).sum())
            counts[unit] += out.numel()
    rms = {u: (sums[u] / max(1, counts[u])) ** 0.5 for u in units}
    return teacher_scales({u: torch.tensor([v]) for u, v in rms.items()})


@dataclass
class NoisedBatch:
    x0: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    unet_kwargs: dict


def noise_batch(latents: torch.Tensor, context: torch.Tensor, added_cond: dict | None,
                alphas_cumprod: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0,
                timestep_range: tuple[int, int] = (0, 1000)) -> NoisedBatch:
    """Draw ε (with sd-scripts' noise offset) and t, and build x_t and the UNet's keyword arguments.

    Random numbers come from `generator` on the CPU, so a resumed run draws exactly what it would have.
    """
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        noise = apply_noise_offset(noise, noise_offset, generator)
    timesteps = torch.randint(timestep_range[0], timestep_range[1], (b,), generator=generator).to(latents.device)
    return noised_batch(latents, context, added_cond, noise, timesteps, alphas_cumprod)


def noised_batch(latents: torch.Tensor, context: torch.Tensor, added_cond: dict | None, noise: torch.Tensor,
                 timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> NoisedBatch:
    """x_t and the UNet's keyword arguments for given ε and t (drawn by `noise_batch` or the target cache)."""
    noise, timesteps = noise.to(latents.device, latents.dtype), timesteps.to(latents.device)
    sample = add_noise(latents, noise, timesteps, alphas_cumprod)
    kwargs = {"sample": sample, "timestep": timesteps, "encoder_hidden_states": context}
    if added_cond:
        kwargs["added_cond_kwargs"] = added_cond
    return NoisedBatch(latents, noise, timesteps, kwargs)


class DistillLoss:
    """Task + output-KD + trajectory loss for one batch; returns the total and each term (floats)."""

    def __init__(self, unit_map: UnitMap, alphas_cumprod: torch.Tensor, weights: LossWeights,
                 scales: dict[str, float] | None = None, v_prediction: bool = False,
                 min_snr_gamma: float | None = None, teacher_map: UnitMap | None = None) -> None:
        """`teacher_map` locates the student's units in the teacher (`units.aligned_teacher_map`; default: the
        student's own map, for a teacher of the same layout)."""
        self.alphas_cumprod = alphas_cumprod
        self.weights = weights
        self.v_prediction = v_prediction
        self.min_snr_gamma = min_snr_gamma
        use_traj = (weights.traj > 0 or weights.feature > 0) and scales
        self.traj_map = sub_unit_map(unit_map, [u for u in trajectory_units(unit_map) if u in (scales or {})]) \
            if use_traj else None
        self.teacher_traj_map = None if self.traj_map is None else \
            sub_unit_map(teacher_map or unit_map, self.traj_map.names)
        self.scales = scales or {}
        self._options = CaptureOptions(keep_graph=True, topk=1, head_stats=False, time_units=False)

    def teacher_targets(self, teacher: TeacherForward, teacher_module: nn.Module | None,
                        unet_kwargs: dict) -> TeacherTargets:
        """The teacher's answer for one noised batch: its prediction, and the trajectory units' (h_in, h_out)
        when a hidden-unit loss needs them and the teacher can be hooked (live, or for the target cache)."""
        with torch.no_grad():
            if self.traj_map is None or teacher_module is None:
                return TeacherTargets(teacher(unet_kwargs))
            options = CaptureOptions(topk=1, head_stats=False, time_units=False)
            with UnitCapture(teacher_module, self.teacher_traj_map, options) as cap:
                prediction = teacher(unet_kwargs)
                flavor = cap.take()
        return TeacherTargets(prediction, _pairs(flavor))

    def __call__(self, student: nn.Module, student_module: nn.Module, teacher: TeacherForward | None,
                 teacher_module: nn.Module | None, batch: NoisedBatch,
                 multipliers: dict[str, float] | None = None,
                 sample_weights: torch.Tensor | None = None,
                 cached: TeacherTargets | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """`student` is what to call (maybe a DDP wrapper); `student_module` the unwrapped UNet for hooks.

        `teacher_module` is the teacher UNet to hook for the trajectory loss (None: no trajectory term).
        `cached`: the teacher's answer for this batch from the target cache (then `teacher` is not called).
        `sample_weights` (B,) weight each sample's task loss (prior_loss_weight on regularisation images); the
        teacher-matching terms are not weighted: matching the teacher on a regularisation image is not a prior."""
        w = self.weights
        if cached is not None:
            traj = self.traj_map is not None and cached.pairs is not None
        else:
            traj = self.traj_map is not None and teacher_module is not None and teacher is not None
        if traj:
            with UnitCapture(student_module, self.traj_map, self._options) as cap:
                prediction = student(**batch.unet_kwargs).sample
                s_flavor = cap.take()
        else:
            prediction = student(**batch.unet_kwargs).sample
        terms: dict[str, torch.Tensor] = {}
        if w.task:
            terms["task"] = denoise_loss(prediction, batch.x0, batch.noise, batch.timesteps, self.alphas_cumprod,
                                         self.v_prediction, self.min_snr_gamma, sample_weights)
        if (teacher is not None or cached is not None) and (w.out or traj):
            answer = cached if cached is not None else \
                self.teacher_targets(teacher, teacher_module if traj else None, batch.unet_kwargs)
            if w.out:
                terms["kd"] = output_kd_loss(prediction, answer.prediction)
            if traj and w.traj:
                alpha, sigma = alpha_sigma(self.alphas_cumprod, batch.timesteps)
                terms["traj"] = trajectory_loss(_pairs(s_flavor), answer.pairs, alpha, sigma, self.scales,
                                                multipliers, traj_weight=1.0)
            if traj and w.feature:
                terms["feature"] = feature_kd_loss(_pairs(s_flavor), answer.pairs)
        weight = {"task": w.task, "kd": w.out, "traj": w.traj, "feature": w.feature}
        total = sum(weight[name] * value for name, value in terms.items())
        if not terms:
            raise ValueError("every loss weight is zero (or no teacher for KD); nothing to train")
        return total, {name: float(value.detach()) for name, value in terms.items()}


def feature_kd_loss(student: Pairs, teacher: Pairs) -> torch.Tensor:
    """BK-SDM's feature distillation: Σ_l MSE(h_S,l, h_T,l) / K over the K captured units, equal weights.
    Both map unit → (h_in, h_out); only the outputs are compared."""
    terms = [F.mse_loss(out.float(), teacher[name][1].float().to(out.device)) for name, (_, out) in student.items()]
    return torch.stack(terms).mean()


def _pairs(flavor: Flavor) -> Pairs:
    return {name: unit.trajectory_pair() for name, unit in flavor.units.items()}


# ------------------------------------------------------------------------------------------ epoch update


@dataclass
class SurgeUpdate:
    stats: dict[str, dict[str, float]]
    zones: Zones
    targets: dict[str, float]
    replay: list[ReplayResult] = field(default_factory=list)


def random_targets(units: Sequence[str], shock_rate: float, seed: int) -> dict[str, float]:
    """Log-uniform per-unit multipliers in [1/shock_rate, shock_rate] (the random-LR ablation)."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.rand(len(units), generator=generator, dtype=torch.float64) * 2 - 1
    return {u: float(shock_rate ** e) for u, e in zip(units, exponents)}


@torch.no_grad()
def student_statistics(student: nn.Module, unit_map: UnitMap, probes: ProbeSet, store: FlavorStore,
                       options: CaptureOptions, shard_indices: Sequence[int], device: torch.device,
                       dtype: torch.dtype) -> UnitStatsAccumulator:
    """Capture the student on the probe batches `shard_indices` and accumulate per-unit statistics."""
    accumulator = UnitStatsAccumulator(unit_map.names, probes.num_seeds)
    was_training = student.training
    student.eval()
    try:
        for i in shard_indices:
            index = store.probe_indices(i)
            _, s_flavor = capture_flavor(student, unit_map, probes.unet_kwargs(index, device=device, dtype=dtype),
                                         options)
            accumulator.add(store.load(i), s_flavor, probes.seed_index[index])
    finally:
        student.train(was_training)
    return accumulator


def surge_epoch_update(student: nn.Module, unit_map: UnitMap, probes: ProbeSet, store: FlavorStore,
                       controller: UnitLRController, *, options: CaptureOptions, rules: ZoneRules,
                       replay_units: int, replay_steps: int, replay_lr: float, pre_change_layers: int,
                       post_change_layers: int, rank: int = 0, world_size: int = 1,
                       replay_params: Callable[[str], list[tuple[str, nn.Parameter]] | None] | None = None,
                       controller_mode: str = "surge", random_seed: int = 0, replay_mode: str = "single",
                       lerp_teacher: nn.Module | None = None, lerp_alpha: float = 0.0, replay_batch: int = 0,
                       lerp_first: bool = False,
                       log: Callable[[str], None] = print) -> SurgeUpdate:
    """DESIGN §3 B–E for one epoch. Every rank calls it; statistics are all-reduced so all ranks agree.

    replay_mode: "single" (DESIGN §3 E: the `replay_units` worst high-difference units, one at a time) or "all"
    (DESIGN §3 H: every unit with a difference, teacher-forced, in one batched replay; `replay_units` > 0 turns
    it on; `replay_batch` samples of a cached batch per step, 0 = all). `lerp_teacher` (a same-architecture
    teacher UNet) and `lerp_alpha` > 0: every unit with a difference is LERPed toward it after replay (DESIGN
    §3 E), each kept only by the same downstream test; `lerp_first`: before replay instead, and with α = 1 the
    units whose LERP was kept (now the teacher's own weights) are not replayed.
    controller_mode: "surge" (DESIGN §3 D), "random" (ablation: log-uniform multipliers in
    [1/shock_rate, shock_rate] drawn from `random_seed`) or "off" (every multiplier stays 1).
    Replay changes weights: every rank runs it on the same cached flavors, then the caller broadcasts the
    student's weights from rank 0 (see train.py) so tiny numerical differences cannot split the replicas.
    """
    param = next(student.parameters())
    shards = list(range(rank, len(store), world_size))
    accumulator = student_statistics(student, unit_map, probes, store, options, shards, param.device, param.dtype)
    accumulator.all_reduce()
    stats = accumulator.finalize()
    zones = find_zones(stats, rules)
    table = stats.as_dict()
    if controller_mode == "surge":
        targets = controller.update({u: row["d"] for u, row in table.items()}, zones.anchors, zones.slow)
    elif controller_mode == "random":
        targets = controller.set_targets(random_targets(unit_map.names, controller.config.shock_rate, random_seed))
    elif controller_mode == "off":
        targets = controller.multipliers()
    else:
        raise ValueError(f"controller_mode must be surge, random or off (got {controller_mode!r})")
    update = SurgeUpdate(table, zones, targets)
    replaying = replay_units > 0 and replay_steps > 0
    lerping = lerp_teacher is not None and lerp_alpha > 0
    if not (replaying or lerping):
        return update
    differing = [u for u in unit_map.names if unit_map[u].kind != "embed" and table[u]["d"] > 0]
    everything: list[Flavor] | None = None  # all-unit replay reads every unit's flavors at once

    def flavors_for(unit: str) -> list[Flavor]:
        """What replaying / LERPing one unit reads: its window's share of the flavors (the whole cache of a
        full-size SDXL at 1024 px is ~57 GiB; one window's share is a few)."""
        if everything is not None:
            return everything
        names = window_units(unit_map, unit, pre_change_layers, post_change_layers)
        return [store.load(i, units=names) for i in range(len(store))]

    if replaying and replay_mode == "all":
        everything = [store.load(i) for i in range(len(store))]

    def lerp() -> list[ReplayResult]:
        assert lerp_teacher is not None
        lerps = [lerp_unit(student, lerp_teacher, unit_map, unit, flavors_for(unit), lerp_alpha, pre_change_layers,
                           post_change_layers) for unit in differing]
        log(f"unit LERP α={lerp_alpha:g} toward the teacher: kept {sum(r.accepted for r in lerps)} of "
            f"{len(lerps)} units")
        return lerps

    copied: set[str] = set()  # units LERP (first) replaced by the teacher's: nothing left to replay there
    if lerping and lerp_first:
        update.replay += lerp()
        if lerp_alpha >= 1:
            copied = {r.unit for r in update.replay if r.accepted}
    if replaying and replay_mode == "all":
        assert everything is not None
        replays = replay_all_units(student, unit_map, [u for u in differing if u not in copied], everything,
                                   replay_steps=replay_steps, lr=replay_lr, post_change_layers=post_change_layers,
                                   params_of=replay_params, batch=replay_batch)
        update.replay += replays
        kept = [r.unit for r in replays if r.accepted]
        log(f"replay (all units, {replay_steps} steps): kept {len(kept)}/{len(replays)}; window error "
            f"{sum(r.before for r in replays):.4g} -> {sum(r.after for r in replays):.4g} (sum)")
    elif replaying:
        candidates = sorted(
            (u for u in zones.high_difference if unit_map[u].kind != "embed" and u not in copied),
            key=lambda u: -table[u]["d"],
        )[:replay_units]
        for unit in candidates:
            params = replay_params(unit) if replay_params is not None else None
            if params is not None and not params:
                continue  # nothing trainable in this unit (e.g. a LoRA that does not reach it)
            result = replay_unit(student, unit_map, unit, flavors_for(unit), replay_steps=replay_steps, lr=replay_lr,
                                 pre_change_layers=pre_change_layers, post_change_layers=post_change_layers,
                                 params=params)
            update.replay.append(result)
            log(f"replay {unit}: window error {result.before:.4g} -> {result.after:.4g} "
                f"({'kept' if result.accepted else 'rolled back'})")
    if lerping and not lerp_first:
        update.replay += lerp()
    return update
