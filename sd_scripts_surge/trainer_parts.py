"""The pieces `train.py` assembles, each built from the parsed config in one place.

Nothing here holds the training loop; every function does one job: resolve the inputs (the tiny kit's
`tiny:` names or real paths), load the student, build the data, the trainable (full UNet or LoRA), the param
groups (one per unit), optimizer and scheduler, the surge setup (teacher, probes, flavor cache), save models,
sample images.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from .anchors import ZoneRules
from .block_lr import apply_block_lr
from .capture import CaptureOptions
from .config import TrainConfig, parse_lora_arg
from .controller import ControllerConfig, UnitLRController, build_unit_param_groups
from .data import TrainData, build_train_data
from .distill import DistillLoss, LossWeights, scales_from_flavors, trajectory_units
from .flavors import FlavorStore, build_or_load_flavors, make_cache_key
from .losses import scaled_linear_alphas_cumprod
from .models.bundle import ModelBundle
from .models.io import load_model, precision_dtype, save_diffusers, save_single_file
from .probes import ProbeSet, make_probes
from .sampling import contact_sheet, decode_to_images, generate_latents, save_samples
from .teachers import LoRARef, Teacher, TeacherSpec, build_teacher, teacher_fingerprint
from .train_state import TrainProgress
from .units import UnitMap, aligned_teacher_map, build_unit_map, hop_distances

logger = logging.getLogger(__name__)
TINY_PREFIX = "tiny:"
PROBE_TIMESTEPS = (150, 450, 750, 950)


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Sources:
    """Where the student, teacher(s), data and sample prompts come from, after resolving `tiny:` names."""

    student: str
    teachers: list[TeacherSpec]
    dataset_config: str | None
    train_data_dir: str | None
    tokenizer_dir: str | None = None
    prompts: list[str] = field(default_factory=list)
    kit: object | None = None


def _tiny(value: str | None, kit_getter: Callable[[], object]) -> str | None:
    if not value or not value.startswith(TINY_PREFIX):
        return value
    kit = kit_getter()
    name = value[len(TINY_PREFIX):]
    table = {"base": kit.base_dir, "student": kit.base_dir, "teacher": kit.teacher_dir,
             "dataset": kit.dataset_toml, "train": kit.train_data_dir}
    if name not in table:
        raise ValueError(f"unknown tiny-kit name {value!r}; use one of: " + ", ".join(TINY_PREFIX + k for k in table))
    return str(table[name])


def resolve_sources(cfg: TrainConfig, log: Callable[[str], None] = print) -> Sources:
    kit_holder: dict[str, object] = {}

    def kit() -> object:
        if "kit" not in kit_holder:
            from .tiny.kit import ensure_tiny_kit

            kit_holder["kit"] = ensure_tiny_kit()
        return kit_holder["kit"]

    student = _tiny(cfg.pretrained_model_name_or_path, kit)
    if not student:
        raise ValueError("--pretrained_model_name_or_path is required (a .safetensors file, a diffusers folder, "
                         "or tiny:base for the embedded tiny model)")
    teachers: list[TeacherSpec] = []
    for spec in cfg.surge.teachers:
        spec = TeacherSpec.from_config(spec) if not isinstance(spec, TeacherSpec) else spec
        teachers.append(TeacherSpec(path=_tiny(spec.path, kit), loras=spec.loras, weight=spec.weight,
                                    timestep_range=spec.timestep_range, name=spec.name))
    if cfg.teacher_model or cfg.teacher_lora:
        loras = tuple(LoRARef(*parse_lora_arg(item)) for item in (cfg.teacher_lora or []))
        teachers.append(TeacherSpec(path=_tiny(cfg.teacher_model, kit), loras=loras))
    prompts: list[str] = []
    if cfg.sample_prompts:
        prompts = [line.strip() for line in Path(cfg.sample_prompts).read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    sources = Sources(student=student, teachers=teachers, dataset_config=_tiny(cfg.dataset_config, kit),
                      train_data_dir=_tiny(cfg.train_data_dir, kit), tokenizer_dir=cfg.tokenizer_dir,
                      prompts=prompts, kit=kit_holder.get("kit"))
    if sources.kit is not None and not prompts:
        sources.prompts = sources.kit.prompts_file.read_text().splitlines()[:4]
    if not sources.dataset_config and not sources.train_data_dir:
        raise ValueError("give --dataset_config (kohya dataset TOML) or --train_data_dir (folders NN_name)")
    return sources


def load_student(cfg: TrainConfig, sources: Sources) -> ModelBundle:
    bundle = load_model(sources.student, tokenizer_dir=sources.tokenizer_dir, dtype=torch.float32)
    if bundle.arch != "sdxl":
        raise ValueError(f"{sources.student} is an {bundle.arch} checkpoint; train_surge_sdxl.py trains SDXL")
    for module in (bundle.vae, bundle.text_encoder_1, bundle.text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
    return bundle


def build_data(cfg: TrainConfig, sources: Sources, student: ModelBundle, accelerator: Accelerator,
               log: Callable[[str], None]) -> TrainData:
    return build_train_data(cfg, sources.dataset_config, sources.train_data_dir, student, accelerator, log)


# -------------------------------------------------------------------------------------------- trainable


@dataclass
class Trainable:
    """What the optimizer updates: the full UNet, or a LoRA network hooked into it."""

    description: str
    module: nn.Module
    network: nn.Module | None
    named: list[tuple[str, nn.Parameter]]  # names in diffusers UNet paths (units are found from them)
    unit_map: UnitMap | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    def unit_params(self, unit: str) -> list[tuple[str, nn.Parameter]] | None:
        """Parameters replay may change for `unit` (None: the unit's own UNet weights)."""
        if self.network is None or self.unit_map is None:
            return None
        from .units import unit_of_module_path

        lookup = unit_of_module_path(self.unit_map)
        return [(n, p) for n, p in self.named if lookup(n) == unit]


def make_trainable(cfg: TrainConfig, student: ModelBundle, log: Callable[[str], None]) -> Trainable:
    if not cfg.network_module:
        student.unet.requires_grad_(True).train()
        return Trainable("the full UNet", student.unet, None, list(student.unet.named_parameters()))
    if cfg.network_module != "networks.lora":
        raise ValueError(f"--network_module {cfg.network_module}: only networks.lora is built in")
    from networks.lora import create_network

    student.unet.requires_grad_(False)
    kwargs = dict(arg.split("=", 1) for arg in (cfg.network_args or []))
    network = create_network(1.0, cfg.network_dim or 4, cfg.network_alpha or 1.0, student.vae,
                             [student.text_encoder_1, student.text_encoder_2], student.unet, **kwargs)
    network.apply_to([student.text_encoder_1, student.text_encoder_2], student.unet, apply_text_encoder=False,
                     apply_unet=True)
    if cfg.network_weights:
        network.load_weights(cfg.network_weights)
        log(f"LoRA weights loaded from {cfg.network_weights}")
    named = []
    for lora in network.unet_loras:
        for pname, p in lora.named_parameters():
            if p.requires_grad:
                named.append((f"{lora.module_name}.{pname}", p))
    return Trainable(f"a LoRA (dim {network.lora_dim}, alpha {network.alpha}) on the UNet", network, network, named)


def apply_full_bf16(cfg: TrainConfig, trainable: Trainable, log: Callable[[str], None]) -> None:
    """sd-scripts' --full_bf16: the trained weights themselves in bf16 (half the memory of weights and grads).

    Called after the teacher is built, so a teacher hooked onto a copy of the student keeps fp32 weights.
    ADA_SURGE updates bf16 weights through fp32 math with stochastic rounding."""
    if cfg.full_fp16:
        log("full_fp16 is not applied: the trained weights stay fp32 under fp16 autocast (fp16 weights need "
            "accelerate's GradScaler patched, as sd-scripts does); use full_bf16 + mixed_precision bf16 for "
            "half-precision weights")
    if not cfg.full_bf16:
        return
    trainable.module.to(torch.bfloat16)
    log("full_bf16: trained weights are kept in bf16")


def unit_map_for(cfg: TrainConfig, unet: nn.Module) -> UnitMap:
    return build_unit_map(unet, cfg.surge.unit_map)


def param_groups(cfg: TrainConfig, trainable: Trainable, unit_map: UnitMap) -> list[dict]:
    trainable.unit_map = unit_map
    lr = cfg.unet_lr or cfg.learning_rate
    groups = build_unit_param_groups(trainable.module, unit_map, lr, named_parameters=trainable.named)
    if cfg.block_lr:  # sd-scripts' per-block LRs (full fine-tune); LR 0 freezes a block
        groups = apply_block_lr(groups, cfg.block_lr, trainable.module)
        trainable.named = [(n, p) for n, p in trainable.named if p.requires_grad]
    return groups


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * steps_per_epoch
    return cfg.max_train_steps


# ------------------------------------------------------------------------------------ optimizer, scheduler


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    from .optim_registry import create_optimizer

    return create_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args or [])


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int, num_processes: int):
    from .optim_registry import create_scheduler

    # accelerate steps a prepared scheduler once per process per step; scale the counts like sd-scripts.
    return create_scheduler(
        cfg.lr_scheduler, optimizer, num_training_steps=total * num_processes,
        num_warmup_steps=(cfg.lr_warmup_steps or 0) * num_processes, num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power, scheduler_type=cfg.lr_scheduler_type,
        scheduler_args=cfg.lr_scheduler_args or [],
    )


def build_controller(cfg: TrainConfig, unit_map: UnitMap) -> UnitLRController:
    config = ControllerConfig(shock_rate=cfg.surge.shock_rate, smooth_rate=cfg.surge.smooth_rate,
                              max_hops=cfg.surge.max_hops, anchor_grasp=cfg.surge.anchor_grasp,
                              keep_mean=cfg.surge.keep_mean_lr)
    return UnitLRController(unit_map, hop_distances(unit_map), config)


def noise_schedule(student: ModelBundle) -> torch.Tensor:
    """ᾱ_t of the model's scheduler config when it has one, else SDXL's scaled_linear schedule."""
    meta = student.metadata or {}
    start = float(meta.get("beta_start", 0.00085))
    end = float(meta.get("beta_end", 0.012))
    return scaled_linear_alphas_cumprod(1000, start, end)


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
    scales: dict[str, float]
    teacher_map: UnitMap  # the student's units located in the teacher (differs for a depth-pruned student)

    def teacher_call(self, unet_kwargs: dict) -> torch.Tensor:
        return self.teacher.unet_forward(unet_kwargs["sample"], unet_kwargs["timestep"],
                                         unet_kwargs["encoder_hidden_states"], unet_kwargs.get("added_cond_kwargs"))


def _probe_set(data: TrainData, captions: list[str], latents: torch.Tensor | None, seeds: list[int],
               alphas_cumprod: torch.Tensor) -> ProbeSet:
    context, pooled = data.encode_prompts(captions)
    added = {"text_embeds": pooled, "time_ids": data.time_ids_for(len(captions))}
    return make_probes(context, PROBE_TIMESTEPS, seeds, alphas_cumprod, data.latent_shape, latents=latents,
                       added_cond=added)


def build_surge(cfg: TrainConfig, sources: Sources, student: ModelBundle, unit_map: UnitMap, data: TrainData,
                alphas_cumprod: torch.Tensor, accelerator: Accelerator, log: Callable[[str], None]) -> SurgeSetup:
    if not sources.teachers:
        raise ValueError("surge training needs a teacher: --teacher_model (and/or --teacher_lora), or "
                         "[[surge.teachers]] in the config; use --surge false for a plain fine-tune")
    # Specs without a path hook their LoRAs into a frozen copy of the student (never the student itself).
    base = copy.deepcopy(student) if any(s.path is None for s in sources.teachers) else None
    teacher = build_teacher(sources.teachers, base=base, device=accelerator.device,
                            tokenizer_dir=sources.tokenizer_dir)
    log(teacher.describe())
    teacher_module = teacher.unet if teacher.mode == "single" else None
    if teacher_module is None and cfg.surge.traj_weight:
        log("trajectory loss needs one teacher network; with several experts it is off (output KD stays on)")

    seeds = list(range(cfg.surge.num_seeds))
    count = max(1, cfg.surge.probes)
    captions, latents = data.probe_examples(count)
    probes = _probe_set(data, captions, latents, seeds, alphas_cumprod)
    eval_captions = (sources.prompts or captions)[:count]
    eval_probes = _probe_set(data, eval_captions, None, [1000 + s for s in seeds[:1]], alphas_cumprod)

    options = CaptureOptions(pool_to=cfg.surge.flavor_resolution or None)
    capture_teacher = teacher_module if teacher_module is not None else teacher.unet
    teacher_map = aligned_teacher_map(unit_map, student.unet, capture_teacher)
    if teacher_map is not unit_map:
        log("the student has fewer layers than the teacher (pruned): its units are aligned with the teacher's stage "
            "by stage (units.aligned_teacher_map)")
    key = make_cache_key(capture_teacher, probes, teacher_map, torch.float32, options, loras=teacher.lora_files())
    key = type(key)(**{**key.__dict__, "teacher": teacher_fingerprint(teacher)})
    cache_dir = Path(cfg.surge.flavor_cache_dir or Path(cfg.output_dir) / "flavor_cache")
    store = build_or_load_flavors(cache_dir, capture_teacher, teacher_map, probes, key, batch_size=8, options=options,
                                  device=accelerator.device, log=log)
    replay_units = cfg.surge.replay_units
    if options.pool_to and replay_units:
        log("unit replay needs full-size flavors; it is off because surge flavor_resolution is set")
        replay_units = 0
    scales = scales_from_flavors(store, trajectory_units(unit_map))
    rules = ZoneRules()
    return SurgeSetup(teacher, teacher_module, probes, eval_probes, store, options, rules, replay_units,
                      cfg.surge.replay_lr or (cfg.learning_rate * 0.1), scales, teacher_map)


def build_loss(cfg: TrainConfig, unit_map: UnitMap, alphas_cumprod: torch.Tensor,
               surge: SurgeSetup | None) -> DistillLoss:
    if surge is None:
        weights = LossWeights(task=1.0, out=0.0, traj=0.0)
        scales = None
    else:
        weights = LossWeights(task=cfg.surge.w_task, out=cfg.surge.w_out, traj=cfg.surge.traj_weight,
                              feature=cfg.surge.feature_weight)
        scales = surge.scales
    return DistillLoss(unit_map, alphas_cumprod, weights, scales=scales, v_prediction=cfg.v_parameterization,
                       min_snr_gamma=cfg.min_snr_gamma, teacher_map=surge.teacher_map if surge else None)


@torch.no_grad()
def teacher_matching_error(student_unet: nn.Module, surge: SurgeSetup, accelerator: Accelerator) -> float:
    """Held-out noise-prediction MSE between student and teacher on fixed probes (the benchmark's metric)."""
    was_training = student_unet.training
    student_unet.eval()
    total, count = 0.0, 0
    try:
        for index in surge.eval_probes.batches(8):
            kwargs = surge.eval_probes.unet_kwargs(index, device=accelerator.device)
            s = student_unet(**kwargs).sample.float()
            t = surge.teacher_call(kwargs).float()
            total += float(((s - t) ** 2).mean()) * len(index)
            count += len(index)
    finally:
        student_unet.train(was_training)
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------- saving


def save_model(cfg: TrainConfig, trainable: Trainable, student: ModelBundle, name: str, accelerator: Accelerator,
               progress: TrainProgress) -> Path:
    """Write `name` (+ extension) into output_dir on the main process; returns the path."""
    out_dir = Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    dtype = precision_dtype(cfg.save_precision or "float")
    metadata = training_metadata(cfg, progress)
    if trainable.network is not None:
        path = out_dir / f"{name}.safetensors"
        if accelerator.is_main_process:
            trainable.network.save_weights(path, dtype, metadata)
    elif cfg.save_model_as == "diffusers":
        path = out_dir / name
        if accelerator.is_main_process:
            save_diffusers(student, path, precision=cfg.save_precision or "float")
    else:
        path = out_dir / f"{name}.safetensors"
        if accelerator.is_main_process:
            save_single_file(student, path, precision=cfg.save_precision or "float", metadata=metadata)
    accelerator.wait_for_everyone()
    return path


def training_metadata(cfg: TrainConfig, progress: TrainProgress) -> dict[str, str]:
    """kohya-style `ss_*` training metadata."""
    return {
        "ss_output_name": cfg.output_name,
        "ss_training_comment": "sd-scripts-surge",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_optimizer": str(cfg.optimizer_type),
        "ss_lr_scheduler": str(cfg.lr_scheduler),
        "ss_steps": str(progress.global_step),
        "ss_epoch": str(progress.epoch),
        "ss_seed": str(cfg.seed),
        "ss_mixed_precision": str(cfg.mixed_precision),
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_surge": json.dumps({"enabled": cfg.surge.enabled, "shock_rate": cfg.surge.shock_rate,
                                "smooth_rate": cfg.surge.smooth_rate, "unit_map": cfg.surge.unit_map}),
    }


# --------------------------------------------------------------------------------------------- samples


def _sample(cfg: TrainConfig, unet: nn.Module, data: TrainData, vae: nn.Module, prompts: list[str]) -> list:
    resolution = data.resolution
    latents = generate_latents(unet, data.encode_prompts, prompts, height=resolution[0], width=resolution[1],
                               steps=cfg.sample_steps, seed=cfg.seed,
                               prediction_type="v_prediction" if cfg.v_parameterization else "epsilon")
    return decode_to_images(vae, latents)


def sample_images(cfg: TrainConfig, sources: Sources, student: ModelBundle, unet: nn.Module, data: TrainData,
                  label: str, accelerator: Accelerator) -> list | None:
    if not sources.prompts or not accelerator.is_main_process:
        return None
    was_training = unet.training
    unet.eval()
    try:
        images = _sample(cfg, unet, data, student.vae, sources.prompts)
    finally:
        unet.train(was_training)
    save_samples(images, sources.prompts, Path(cfg.output_dir) / "sample", label)
    return images


def final_samples(cfg: TrainConfig, sources: Sources, surge: SurgeSetup | None, student: ModelBundle,
                  data: TrainData, before: list | None, after: list | None,
                  output_dir: Path) -> dict[str, list[Path]]:
    """teacher / student before / student after, side by side; returns {label: [sheet path]} for the report.

    The teacher is sampled with the student's text encoders and VAE: the conditioning it was distilled on."""
    if not after:
        return {}
    rows: dict[str, list] = {}
    if surge is not None:
        teacher_unet = surge.teacher_module or surge.teacher.unet
        rows["teacher"] = _sample(cfg, teacher_unet, data, student.vae, sources.prompts)
        save_samples(rows["teacher"], sources.prompts, output_dir / "sample", "teacher")
    if before:
        rows["student before"] = before
    rows["student after"] = after
    sheet = contact_sheet(rows, output_dir / "sample" / "teacher_vs_student.png")
    return {"teacher / student before / after": [sheet]}
