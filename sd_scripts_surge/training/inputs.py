"""Inputs of a run: resolve `tiny:` names or real paths, load the student, build the data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from sd_scripts_surge.config import TrainConfig, parse_lora_arg, xformers_available
from sd_scripts_surge.data import TrainData, build_train_data
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.models.io import load_model
from sd_scripts_surge.surge.teachers import LoRARef, TeacherSpec

TINY_PREFIX = "tiny:"
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
            from sd_scripts_surge.tiny.kit import ensure_tiny_kit

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
    bundle = load_model(sources.student, tokenizer_dir=sources.tokenizer_dir, dtype=torch.float32,
                        unet_dtype=student_unet_dtype(cfg, sources))
    if bundle.arch != "sdxl":
        raise ValueError(f"{sources.student} is an {bundle.arch} checkpoint; train_surge_sdxl.py trains SDXL")
    for module in (bundle.vae, bundle.text_encoder_1, bundle.text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
    set_attention_backend(bundle.unet, "xformers" if cfg.xformers and xformers_available() else "sdpa")
    return bundle


def student_unet_dtype(cfg: TrainConfig, sources: Sources) -> torch.dtype:
    """bf16 for a full fine-tune with full_bf16 (the weights would be cast to it anyway, so no fp32 UNet is held
    while setting up), unless a teacher built from the student's base is to be kept in fp32."""
    fp32_teacher_base = (cfg.surge.enabled and cfg.surge.teacher_dtype == "float"
                         and any(spec.path is None for spec in sources.teachers))
    if cfg.full_bf16 and not cfg.network_module and not fp32_teacher_base:
        return torch.bfloat16
    return torch.float32


def set_attention_backend(unet: torch.nn.Module, backend: str) -> None:
    """`--sdpa` (the default: PyTorch scaled_dot_product_attention) or `--xformers` on every attention layer."""
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def build_data(cfg: TrainConfig, sources: Sources, student: ModelBundle, accelerator: Accelerator,
               log: Callable[[str], None]) -> TrainData:
    return build_train_data(cfg, sources.dataset_config, sources.train_data_dir, student, accelerator, log)


