"""From merged argument values to a checked TrainConfig: parsing of composite values, the schema's range and
choice checks, and the checks that involve several options."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

from sd_scripts_surge.config.errors import ConfigError, parse_bool
from sd_scripts_surge.config.schema import SDXL_BLOCK_LR_COUNT, SurgeConfig, TrainConfig, declared
from sd_scripts_surge.models.fileio import parse_size


def parse_resolution(value: Any, where: str) -> tuple[int, int]:
    """sd-scripts' resolution: `N`, `"W,H"` or `[W, H]` → (width, height)."""
    if isinstance(value, bool):
        numbers: list[int] = []
    elif isinstance(value, int | float):
        numbers = [int(value)]
    elif isinstance(value, list | tuple):
        numbers = [int(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) != len(value):
            numbers = []
    else:
        try:
            numbers = [int(p) for p in str(value).replace("x", ",").split(",") if p.strip()]
        except ValueError:
            numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) <= 0:
        raise ConfigError(f"{where}: resolution must be N, \"W,H\" or [W, H] with positive sizes, got {value!r}")
    return numbers[0], numbers[1]


def parse_block_lr(value: Any, where: str) -> list[float]:
    """`--block_lr "a,b,…"` or `block_lr = [a, b, …]`: sd-scripts' 23 SDXL block LRs."""
    raw = str(value).split(",") if isinstance(value, str) else list(value)
    try:
        lrs = [float(x) for x in raw]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: key 'block_lr' must be {SDXL_BLOCK_LR_COUNT} numbers, got {value!r}") from e
    if len(lrs) != SDXL_BLOCK_LR_COUNT or any(lr < 0 for lr in lrs):
        raise ConfigError(f"{where}: key 'block_lr' needs {SDXL_BLOCK_LR_COUNT} values ≥ 0 for SDXL (time/label emb, "
                          f"input 0-8, middle 0-2, output 0-8, out), got {len(lrs)}")
    return lrs


def parse_lora_arg(item: str) -> tuple[str, float]:
    """`path[:multiplier]` → (path, multiplier); a Windows drive letter is not a multiplier."""
    head, sep, tail = item.rpartition(":")
    if sep and len(head) > 1:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return item, 1.0


def parse_teacher_lora(items: list[str], where: str) -> list[str]:
    for item in items:
        _, multiplier = parse_lora_arg(item)
        if not math.isfinite(multiplier):
            raise ConfigError(f"{where}: teacher_lora {item!r}: the multiplier must be a finite number")
    return items


def parse_teacher_specs(tables: Any, where: str) -> list:
    """`[[surge.teachers]]` tables → TeacherSpec list (specs already parsed pass through)."""
    if not isinstance(tables, list):
        raise ConfigError(f"{where}: [surge] teachers must be a list of [[surge.teachers]] tables")
    if not tables:
        return []
    from sd_scripts_surge.surge.teachers import TeacherSpec  # the heavy import only when teachers are configured

    specs = []
    for i, table in enumerate(tables):
        if isinstance(table, TeacherSpec):
            specs.append(table)
            continue
        try:
            specs.append(TeacherSpec.from_config(table, where=f"[[surge.teachers]] #{i + 1}"))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
    return specs


# Values whose typed form is not what a flag or a TOML key holds: dest → parser(value, where).
PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "resolution": lambda v, where: parse_resolution(v, f"{where}: key 'resolution'"),
    "block_lr": parse_block_lr,
    "teacher_lora": parse_teacher_lora,
    "surge_teachers": parse_teacher_specs,
    "surge": lambda v, where: parse_bool(v),
}


def check_options(obj: Any, where: str) -> None:
    """The schema's checks on a parsed options object: choices and ranges, finite numbers. Names the key."""
    for d in declared(type(obj)):
        value = getattr(obj, d.attr)
        if value is None or isinstance(value, bool) or isinstance(value, list | tuple | dict):
            continue
        o = d.option
        if o.choices is not None and value not in o.choices:
            raise ConfigError(f"{where}: key {d.dest!r} must be one of {list(o.choices)} (got {value!r})")
        if not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{where}: key {d.dest!r} must be a finite number (got {value})")
        if not _in_range(value, o):
            note = f" {o.note}" if o.note else ""
            raise ConfigError(f"{where}: key {d.dest!r} must be {_range_text(o)}{note} (got {value})")


def _in_range(value: float, o: Any) -> bool:
    return ((o.ge is None or value >= o.ge) and (o.gt is None or value > o.gt)
            and (o.le is None or value <= o.le))


def _range_text(o: Any) -> str:
    low = f"≥ {o.ge:g}" if o.ge is not None else f"> {o.gt:g}" if o.gt is not None else ""
    if low and o.le is not None:
        bracket = "[" if o.ge is not None else "("
        return f"in {bracket}{(o.ge if o.ge is not None else o.gt):g}, {o.le:g}]"
    return low or f"≤ {o.le:g}"


def to_train_config(values: dict[str, Any], where: str) -> TrainConfig:
    """Typed, checked config from merged argument values (dest → value; None means unset)."""
    def typed(d: Any) -> Any:
        value = values[d.dest]
        if d.is_list and isinstance(value, str) and d.option.cli_type is None:
            value = [value]
        parser = PARSERS.get(d.dest)
        return parser(value, where) if parser else value

    surge = SurgeConfig(**{d.attr: typed(d) for d in declared(SurgeConfig) if values.get(d.dest) is not None})
    kwargs = {d.attr: typed(d) for d in declared(TrainConfig) if values.get(d.dest) is not None}
    config = TrainConfig(surge=surge, **kwargs)
    validate(config, where)
    return config


def validate(c: TrainConfig, where: str) -> None:
    """The schema's checks, then those that involve several options or the environment; names the key."""
    check_options(c, where)
    check_options(c.surge, where)

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: key {key!r} {message}")

    need(c.max_train_steps >= 1 or bool(c.max_train_epochs), "max_train_steps", "must be ≥ 1")
    need(c.min_bucket_reso <= c.max_bucket_reso, "min_bucket_reso",
         f"must be ≤ max_bucket_reso ({c.min_bucket_reso} vs {c.max_bucket_reso})")
    need(not (c.full_fp16 and c.full_bf16), "full_bf16", "cannot be combined with full_fp16")
    need(not c.full_fp16 or c.mixed_precision == "fp16", "full_fp16", "needs mixed_precision = \"fp16\"")
    need(not c.full_bf16 or c.mixed_precision == "bf16", "full_bf16", "needs mixed_precision = \"bf16\"")
    if c.fused_backward_pass:
        need(c.optimizer_type.lower().replace("_", "") == "adasurge", "fused_backward_pass",
             f"is implemented for ADA_SURGE (got optimizer_type {c.optimizer_type!r})")
        need(c.gradient_accumulation_steps == 1, "fused_backward_pass",
             "cannot accumulate gradients (they are applied and freed in backward): gradient_accumulation_steps 1")
        need(c.mixed_precision != "fp16", "fused_backward_pass", "cannot run under fp16 loss scaling: use bf16 or no")
    # kohya flags this trainer does not implement: refused with the reason, never accepted and ignored
    need(not c.train_text_encoder, "train_text_encoder",
         "is not supported: the text encoders stay frozen (as in the surge seed); their embeddings are cached")
    need(not c.text_encoder_lr or c.network_train_unet_only, "text_encoder_lr",
         "is not supported: the text encoders stay frozen (no text-encoder training or TE LoRA yet); drop it or "
         "set network_train_unet_only (then it is unused, as in sd-scripts)")
    need(c.tokenizer_cache_dir is None, "tokenizer_cache_dir",
         "is sd-scripts' download cache and this trainer never downloads: give --tokenizer_dir, a folder with "
         "tokenizer/ and tokenizer_2/ (a diffusers model folder carries them)")
    need(not (c.xformers and c.sdpa), "xformers", "and sdpa pick different attention backends: give one")
    need(c.log_with not in ("wandb", "all") or importlib.util.find_spec("wandb") is not None,
         "log_with", "wandb needs the wandb package (pip install wandb); or use tensorboard")
    need(c.block_lr is None or not c.network_module, "block_lr",
         "applies to a full fine-tune (as in sdxl_train.py), not to LoRA training; drop it or network_module")
    s = c.surge
    need(not s.lerp_alpha or not c.network_module, "surge_lerp_alpha",
         "moves the student's own weights toward the teacher's: a full fine-tune, not a LoRA")
    need(not s.lerp_first or s.lerp_alpha > 0, "surge_lerp_first", "orders unit LERP before replay: set "
         "surge_lerp_alpha > 0 too")
    need(s.target_fill == "upfront" or (s.teacher == "cached" and not s.target_cache_dir), "surge_target_fill",
         "first_use fills the in-memory target cache of surge_teacher = \"cached\": set that, and no "
         "surge_target_cache_dir")
    try:
        parse_size(s.cache_budget)
    except ValueError as e:
        need(False, "surge_cache_budget", str(e))


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def flag_notes(c: TrainConfig) -> list[str]:
    """One line for each kohya flag whose effect here differs in form from sd-scripts (printed at the start)."""
    notes = []
    if c.max_data_loader_n_workers:
        notes.append(f"max_data_loader_n_workers = {c.max_data_loader_n_workers}: no loader workers are started; "
                     "latents and text embeddings are cached in memory and batches are assembled in the main process")
    if not c.cache_latents:
        notes.append("cache_latents is off in the config, but this trainer always caches latents (color_aug, the "
                     "one augmentation that needs fresh encodes, is refused)")
    if c.xformers and not xformers_available():
        notes.append("xformers: the xformers package is not installed, so attention runs on PyTorch SDPA (the "
                     "default backend; same results, install xformers to use it)")
    if c.no_half_vae:
        notes.append("no_half_vae: the VAE runs in fp32 (this trainer always encodes latents in fp32)")
    if c.network_train_unet_only and c.network_module:
        notes.append("network_train_unet_only: the LoRA is on the UNet only (text encoders frozen)")
    return notes
