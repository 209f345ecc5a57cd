"""The surge pieces of a run: teacher, probes, flavor cache, controller, loss."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from sd_scripts_surge.config import ConfigError, SurgeConfig
from sd_scripts_surge.data import TrainData
from sd_scripts_surge.data.captions import caption_varies
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.models.fileio import parse_size
from sd_scripts_surge.surge.anchors import ZoneRules
from sd_scripts_surge.surge.capture import CaptureOptions
from sd_scripts_surge.surge.controller import ControllerConfig, UnitLRController
from sd_scripts_surge.surge.distill import DistillLoss, LossWeights, scales_from_flavors, trajectory_units
from sd_scripts_surge.surge.flavors import FlavorStore, build_or_load_flavors, make_cache_key
from sd_scripts_surge.surge.losses import scaled_linear_alphas_cumprod
from sd_scripts_surge.surge.placement import stream_from_cpu
from sd_scripts_surge.surge.precision import compute_dtype, frozen_copy, set_unet_precision
from sd_scripts_surge.surge.probes import ProbeSet, make_probes
from sd_scripts_surge.surge.targets import TargetCache
from sd_scripts_surge.surge.teachers import Teacher, build_teacher, teacher_fingerprint
from sd_scripts_surge.surge.units import UnitMap, aligned_teacher_map, hop_distances
from sd_scripts_surge.training.inputs import Sources

PROBE_TIMESTEPS = (150, 450, 750, 950)


def build_controller(cfg: SurgeConfig, unit_map: UnitMap) -> UnitLRController:
    config = ControllerConfig(shock_rate=cfg.shock_rate, smooth_rate=cfg.smooth_rate, max_hops=cfg.max_hops,
                              anchor_grasp=cfg.anchor_grasp, keep_mean=cfg.keep_mean_lr, rule=cfg.lr_rule)
    return UnitLRController(unit_map, hop_distances(unit_map), config)


def noise_schedule(student: ModelBundle) -> torch.Tensor:
    """ᾱ_t of the model's scheduler config when it has one, else SDXL's scaled_linear schedule."""
    meta = student.metadata or {}
    start = float(meta.get("beta_start", 0.00085))
    end = float(meta.get("beta_end", 0.012))
    return scaled_linear_alphas_cumprod(1000, start, end)


# ------------------------------------------------------------------------------------------------ surge
@dataclass
class SurgeSetup:
    teacher: Teacher
    teacher_module: nn.Module | None  # the UNet the trajectory loss hooks (single teacher only)
    probes: ProbeSet
    eval_probes: ProbeSet
    store: FlavorStore
    capture_options: CaptureOptions
    rules: ZoneRules
    replay_units: int
    replay_lr: float
    replay_mode: str
    scales: dict[str, float]
    teacher_map: UnitMap  # the student's units located in the teacher (differs for a depth-pruned student)
    teacher_id: str = ""  # teacher_fingerprint: equal ids compute the same function (keys the caches)

    eval_teacher: list[torch.Tensor] | None = None  # the teacher on the eval probe batches (cached teacher)
    lerp_teacher: nn.Module | None = None  # a same-architecture teacher UNet for unit LERP (--surge_lerp_alpha)

    def teacher_call(self, unet_kwargs: dict) -> torch.Tensor:
        return self.teacher.unet_forward(unet_kwargs["sample"], unet_kwargs["timestep"],
                                         unet_kwargs["encoder_hidden_states"], unet_kwargs.get("added_cond_kwargs"))


def _probe_set(data: TrainData, captions: list[str], latents: torch.Tensor | None, seeds: list[int],
               alphas_cumprod: torch.Tensor) -> ProbeSet:
    context, pooled = data.encode_prompts(captions)
    added = {"text_embeds": pooled, "time_ids": data.time_ids_for(len(captions))}
    return make_probes(context, PROBE_TIMESTEPS, seeds, alphas_cumprod, data.latent_shape, latents=latents,
                       added_cond=added)


def build_surge(cfg: SurgeConfig, sources: Sources, student: ModelBundle, unit_map: UnitMap, data: TrainData,
                alphas_cumprod: torch.Tensor, accelerator: Accelerator, log: Callable[[str], None], *,
                output_dir: str | Path, learning_rate: float) -> SurgeSetup:
    """Teacher, probes, flavor cache and replay settings. The flavor cache defaults to <output_dir>/flavor_cache
    and replay's LR to learning_rate × 0.1."""
    if not sources.teachers:
        raise ValueError("surge training needs a teacher: --teacher_model (and/or --teacher_lora), or "
                         "[[surge.teachers]] in the config; use --surge false for a plain fine-tune")
    # Specs without a path hook their LoRAs into a frozen copy of the student (never the student itself): its frozen
    # text encoders and VAE shared, not copied; its UNet shared too when the student does not train it (a LoRA
    # student) and the teacher keeps its dtype, else cast to the teacher's dtype while copying.
    storage = cfg.teacher_dtype
    base = None
    if any(s.path is None for s in sources.teachers):
        base = frozen_copy(student, compute_dtype(storage), share=storage != "fp8")
        if getattr(base.unet, "_surge_shared", False):
            log("teacher: the student's frozen base UNet is shared (its LoRA is hooked on a copy of the modules "
                "only), so no second UNet is held")
    teacher = build_teacher(sources.teachers, base=base, device=accelerator.device,
                            tokenizer_dir=sources.tokenizer_dir, load_dtype=compute_dtype(storage))
    for expert in teacher.experts:
        set_unet_precision(expert.unet, storage, expert.networks)
    log(teacher.describe() + ("" if storage == "float" else f"; teacher UNet stored as {storage}"))
    if cfg.teacher_placement == "cpu":
        for expert in teacher.experts:
            if getattr(expert.unet, "_surge_shared", False):
                log("teacher_placement cpu: this teacher's UNet is the LoRA student's own frozen base, so it holds "
                    "no weights of its own to offload")
                continue
            blocks = stream_from_cpu(expert.unet, accelerator.device)
            log(f"teacher UNet kept in CPU memory, {len(blocks)} blocks streamed to {accelerator.device} while "
                "they run")
    teacher_module = teacher.unet if teacher.mode == "single" else None
    if teacher_module is None and cfg.traj_weight:
        log("trajectory loss needs one teacher network; with several experts it is off (output KD stays on)")

    seeds = list(range(cfg.num_seeds))
    count = max(1, cfg.probes)
    captions, latents = data.probe_examples(count)
    probes = _probe_set(data, captions, latents, seeds, alphas_cumprod)
    eval_captions = (sources.prompts or captions)[:count]
    eval_probes = _probe_set(data, eval_captions, None, [1000 + s for s in seeds[:1]], alphas_cumprod)

    options = CaptureOptions(pool_to=cfg.flavor_resolution or None)
    capture_teacher = teacher_module if teacher_module is not None else teacher.unet
    teacher_map = aligned_teacher_map(unit_map, student.unet, capture_teacher)
    if teacher_map is not unit_map:
        log("the student has fewer layers than the teacher (pruned): its units are aligned with the teacher's stage "
            "by stage (units.aligned_teacher_map)")
    key = make_cache_key(capture_teacher, probes, teacher_map, torch.float32, options, loras=teacher.lora_files())
    key = type(key)(**{**key.__dict__, "teacher": teacher_fingerprint(teacher)})
    cache_dir = Path(cfg.flavor_cache_dir or Path(output_dir) / "flavor_cache")
    store = build_or_load_flavors(cache_dir, capture_teacher, teacher_map, probes, key, batch_size=8, options=options,
                                  device=accelerator.device, log=log)
    replay_units = cfg.replay_units
    if options.pool_to and replay_units:
        log("unit replay needs full-size flavors; it is off because surge flavor_resolution is set")
        replay_units = 0
    scales = scales_from_flavors(store, trajectory_units(unit_map))
    rules = ZoneRules()
    lerp_teacher = None
    if cfg.lerp_alpha:
        lerp_teacher = lerp_target(teacher, student.unet)
    setup = SurgeSetup(teacher, teacher_module, probes, eval_probes, store, options, rules, replay_units,
                       cfg.replay_lr or (learning_rate * 0.1), cfg.replay_mode, scales, teacher_map)
    setup.lerp_teacher = lerp_teacher
    setup.teacher_id = key.teacher
    return setup


def lerp_target(teacher: Teacher, student_unet: nn.Module) -> nn.Module:
    """The teacher UNet unit LERP moves toward: one plain checkpoint of the student's architecture (a LoRA
    hooked into it is not in its weights, so LERP toward those weights would miss the LoRA)."""
    if teacher.mode != "single" or teacher.experts[0].networks:
        raise ConfigError("surge_lerp_alpha needs one teacher checkpoint without hooked LoRAs (the LoRA is not "
                          "in the teacher's weights); set it to 0 for this teacher")
    theirs = {n: p.shape for n, p in teacher.unet.named_parameters()}
    ours = {n: p.shape for n, p in student_unet.named_parameters()}
    if theirs != ours:
        raise ConfigError("surge_lerp_alpha needs a teacher of the student's architecture (same parameters and "
                          "shapes); a pruned student cannot LERP toward its teacher")
    return teacher.unet


def build_loss(cfg: SurgeConfig, unit_map: UnitMap, alphas_cumprod: torch.Tensor, surge: SurgeSetup | None, *,
               v_prediction: bool, min_snr_gamma: float | None) -> DistillLoss:
    """The denoising loss alone without surge; with it, the surge weights of task, output KD, trajectory and
    feature terms."""
    if surge is None:
        weights = LossWeights(task=1.0, out=0.0, traj=0.0)
        scales = None
    else:
        weights = LossWeights(task=cfg.w_task, out=cfg.w_out, traj=cfg.traj_weight, feature=cfg.feature_weight)
        scales = surge.scales
    return DistillLoss(unit_map, alphas_cumprod, weights, scales=scales, v_prediction=v_prediction,
                       min_snr_gamma=min_snr_gamma, teacher_map=surge.teacher_map if surge else None)


def check_cacheable(data: TrainData) -> None:
    """Cached teacher targets need every image's inputs to be the same every epoch."""
    for record in data.records:
        subset = record.subset
        if caption_varies(subset) or subset.flip_aug:
            what = "flip_aug" if subset.flip_aug else "captions that change per epoch (shuffle or dropout)"
            raise ConfigError(f"surge_teacher = \"cached\" needs the same inputs every epoch, but subset "
                              f"{subset.image_dir} uses {what}; turn it off or use surge_teacher = \"live\"")


def build_target_cache(cfg: SurgeConfig, surge: SurgeSetup, loss_fn: DistillLoss, data: TrainData,
                       alphas_cumprod: torch.Tensor, accelerator: Accelerator, log: Callable[[str], None], *,
                       seed: int, noise_offset: float | None, on_complete: Callable[[], None] | None = None
                       ) -> TargetCache:
    """DESIGN §3 G: the teacher's answers for every entry × draw (and the eval probes), computed once: all up front,
    or (`target_fill = first_use`) each the first time a step needs it. `on_complete` runs when all are in."""
    check_cacheable(data)
    traj = loss_fn.teacher_traj_map if surge.teacher_module is not None else None
    key = {"teacher": surge.teacher_id, "traj_units": None if traj is None else traj.names,
           "alphas_cumprod": hashlib.sha256(alphas_cumprod.detach().double().cpu().numpy().tobytes()).hexdigest()}
    cache = TargetCache(cfg.target_draws, seed, noise_offset or 0.0, directory=cfg.target_cache_dir, key=key)

    def load(entries: Sequence[int]) -> tuple[list[int], torch.Tensor, dict]:
        batch = data.dataset.get_batch(list(entries), 0).to(accelerator.device)  # unreadable images left out
        return batch.indices, batch.latents, {"encoder_hidden_states": batch.context,
                                              "added_cond_kwargs": batch.added_cond}

    build_batches = data.sampler.all_batches(0)  # every entry, whichever rank trains it in an epoch
    answer = lambda kwargs: loss_fn.teacher_targets(surge.teacher_call, surge.teacher_module, kwargs)  # noqa: E731
    if cfg.target_fill == "first_use":
        cache.defer(build_batches, load, answer, alphas_cumprod, parse_size(cfg.cache_budget), log, on_complete)
    else:
        cache.build(lambda: (load(entries) for entries in build_batches), len(data.dataset.entries),
                    answer, alphas_cumprod, parse_size(cfg.cache_budget), log)
        if on_complete is not None:
            on_complete()
    with torch.no_grad():
        surge.eval_teacher = [surge.teacher_call(surge.eval_probes.unet_kwargs(index, device=accelerator.device))
                              .float() for index in surge.eval_probes.batches(8)]
    return cache
