"""The training TOML: read (sections flattened, `[surge]` mapped to `--surge_<key>`), checked against the schema's
types, and written back.

- Like sd-scripts' `read_config_from_file`, the keys of every section are flattened one level into arguments
  (`[training] learning_rate = 1e-4` sets `--learning_rate`). `[surge]` is the exception: its keys map to
  `--surge_<key>`, and `[[surge.teachers]]` lists teacher experts.
- A key nobody knows is an error naming the key, the file and the closest valid name. Keys that sd-scripts (or
  the kohya_ss GUI) writes but this trainer does not use are accepted with one warning, so real kohya TOMLs load.
"""

from __future__ import annotations

import difflib
import logging
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import toml

from sd_scripts_surge.config.errors import ConfigError
from sd_scripts_surge.config.schema import SURGE_KEYS, Declared, all_options

try:  # TOML 1.0 (mixed arrays such as loras = [["a.safetensors", 0.7]]); the `toml` package reads 0.5 only
    import tomllib as _toml_reader
except ImportError:  # Python 3.10
    _toml_reader = None

logger = logging.getLogger(__name__)

# sd-scripts / kohya_ss GUI keys this trainer accepts but does not act on (warned once per process).
IGNORED_SD_SCRIPTS_KEYS = frozenset("""
    huber_c huber_scale huber_schedule loss_type ip_noise_gamma ip_noise_gamma_random_strength
    noise_offset_random_strength adaptive_noise_scale multires_noise_iterations multires_noise_discount
    persistent_data_loader_workers lowram highvram mem_eff_attn clip_skip max_token_length vae vae_batch_size
    save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_state_on_train_end
    save_state_to_huggingface log_tracker_name log_tracker_config log_config training_comment metadata_title
    metadata_author metadata_description metadata_license metadata_tags face_crop_aug_range debug_dataset in_json
    dataset_repeats token_warmup_min token_warmup_step weighted_captions scale_v_pred_loss_like_noise_pred
    v_pred_like_loss zero_terminal_snr min_timestep max_timestep timestep_sampling discrete_flow_shift fp8_base
    fp8_base_unet fused_optimizer_groups lr_scheduler_min_lr_ratio lr_scheduler_timescale
    lr_decay_steps stop_text_encoder_training dim_from_weights scale_weight_norms network_dropout base_weights
    base_weights_multiplier no_metadata save_n_epoch_ratio learning_rate_te learning_rate_te1 learning_rate_te2
    text_encoder_lr1 text_encoder_lr2 network_train_text_encoder_only bucket_no_upscale secondary_separator
    enable_wildcard ddp_timeout ddp_gradient_as_bucket_view ddp_static_graph console_log_level console_log_file
    console_log_simple cache_info skip_cache_check initial_epoch initial_step skip_until_initial_step sample_at_first
    sample_every_n_steps output_config_and_exit masked_loss alpha_mask disable_mmap_load_safetensors dynamo_backend
    dynamo_mode dynamo_fullgraph dynamo_use_dynamic torch_compile noise_offset_type epoch sdxl sdxl_no_half_vae v2
    v_pred full_fp16_vae save_every_n_steps_state huggingface_repo_id huggingface_repo_type huggingface_path_in_repo
    huggingface_token huggingface_repo_visibility resume_from_huggingface async_upload max_timestep_range
    min_timestep_range cache_text_encoder_outputs_batch_size network_multiplier conv_dim conv_alpha unit lycoris_preset
    loraplus_lr_ratio loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio mixed_precision_vae color_aug_strength
    use_8bit_adam use_lion_optimizer train_text_encoder_t5xxl apply_t5_attn_mask blocks_to_swap
    cpu_offload_checkpointing skip_latents_validity_check sample_sampler_steps save_model_as_dir no_token_padding
    max_bucket_reso_steps gradient_accumulation deepspeed zero_stage offload_optimizer_device offload_param_device
    zero3_init_flag zero3_save_16bit_model fp16_master_weights_and_gradients num_cpu_threads_per_process num_processes
    num_machines multi_gpu gpu_ids main_process_port extra_accelerate_launch_args
""".split())
IGNORED_PREFIXES = ("wandb_", "huggingface_", "metadata_", "dynamo_", "deepspeed_")
_warned_ignored: set[str] = set()


def is_ignored_key(key: str) -> bool:
    """True for sd-scripts / kohya_ss keys that parse but do nothing here."""
    return key in IGNORED_SD_SCRIPTS_KEYS or key.startswith(IGNORED_PREFIXES)


def warn_ignored_once(ignored: dict[str, Any], where: str) -> None:
    """One warning per process listing the accepted-but-unused sd-scripts keys not yet reported."""
    new = sorted(set(ignored) - _warned_ignored)
    if new:
        _warned_ignored.update(new)
        logger.warning("%s: sd-scripts keys accepted but not used by this trainer: %s", where, ", ".join(new))


def toml_keys() -> list[str]:
    """Every argument a training TOML may set (flattened names: surge_<key> for [surge] keys)."""
    return [d.dest for d in all_options() if d.option.toml]


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes a ConfigError naming the file and line."""
    text = path.read_text(encoding="utf-8")
    try:
        if _toml_reader is not None:
            return _toml_reader.loads(text)
        return toml.loads(text)
    except (ValueError, toml.TomlDecodeError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the line it names") from e


def suggest(key: str, known: Sequence[str]) -> str:
    """` (did you mean 'x'?)` for the closest known name, or nothing."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_config_file(path: str | Path, known: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flatten a training TOML: returns (arguments, ignored sd-scripts keys). Unknown keys raise ConfigError.

    Like sd-scripts, a path without `.toml` gets it appended. Values keep their TOML types here;
    `coerce_file_values` checks them against the schema. `known` defaults to every TOML key of the schema.
    """
    path = Path(path)
    if not path.is_file() and path.suffix.lower() != ".toml":
        path = path.with_name(path.name + ".toml")
    if not path.is_file():
        raise ConfigError(f"--config_file {path}: file not found")
    data = load_toml(path)
    known_set = set(toml_keys() if known is None else known)
    values: dict[str, Any] = {}
    ignored: dict[str, Any] = {}

    def put(key: str, value: Any, where: str) -> None:
        if key in known_set:
            if key in values:
                raise ConfigError(f"{path}: key {key!r} is set twice ({where} and earlier); keep one")
            values[key] = value
        elif is_ignored_key(key):
            ignored[key] = value
        else:
            valid = sorted(known_set | IGNORED_SD_SCRIPTS_KEYS)
            raise ConfigError(f"{path}: unknown key {where}{suggest(key, valid)}; "
                              "run with --help for the valid names")

    for key, value in data.items():
        if key == "surge" and isinstance(value, dict):
            for sub, sub_value in value.items():
                if sub not in SURGE_KEYS:
                    raise ConfigError(f"{path}: unknown key [surge] {sub!r}{suggest(sub, SURGE_KEYS)}")
                put(f"surge_{sub}", sub_value, f"[surge] {sub!r}")
        elif isinstance(value, dict):  # a section: flatten one level
            for sub, sub_value in value.items():
                put(sub, sub_value, f"[{key}] {sub!r}")
        else:
            put(key, value, repr(key))
    return values, ignored


def coerce_file_values(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check TOML values against the schema's types: bools, numbers, text, arrays for list options.

    Composite values (resolution, block_lr, [[surge.teachers]]) pass through to their parsers; choices and
    ranges are checked on the typed config. Errors name the key.
    """
    options = {d.dest: d for d in all_options()}
    out: dict[str, Any] = {}
    for key, value in values.items():
        d = options.get(key)
        try:
            out[key] = value if d is None else _coerce(value, d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: key {key!r}: {e}") from e
    return out


def _coerce(value: Any, d: Declared) -> Any:
    if d.dest == "surge_teachers" or d.option.cli_type is not None:
        return value  # parsed by values.PARSERS (resolution = [w, h], block_lr = [23 numbers], tables)
    if d.type is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if d.is_list:
        items = value if isinstance(value, list) else [value]
        element = (typing.get_args(d.type) or (str,))[0]
        return [_scalar(item, element) for item in items]
    if isinstance(value, list | dict):
        raise ValueError(f"expected a single value, got {type(value).__name__} {value!r}")
    return _scalar(value, d.type)


def _scalar(value: Any, convert: Any) -> Any:
    if convert is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if convert is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if isinstance(value, bool | dict | list):
        raise ValueError(f"expected text, got {value!r}")
    return str(value)


def write_config_file(values: dict[str, Any], path: str | Path) -> Path:
    """Write arguments (dest → value) as a sectioned TOML that `--config_file` reads back to the same config.

    Each option goes to its schema section ([model], [saving], [training], [logging], [network], [teachers]);
    `surge_<key>` goes to [surge] as `<key>`. Unset (None) values and the config-file options are left out.
    """
    options = {d.dest: d for d in all_options()}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        d = options.get(key)
        if value is None or (d is not None and not d.option.toml):
            continue
        if key.startswith("surge_"):
            if key == "surge_teachers" and not value:
                continue
            sections.setdefault("surge", {})[key[len("surge_"):]] = _toml_value(value)
        else:
            sections.setdefault(d.option.section if d else "training", {})[key] = _toml_value(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml.dumps(sections), encoding="utf-8")
    return path


def _toml_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, list):
        return [_teacher_table(v) if hasattr(v, "loras") else v for v in value]
    return value


def _teacher_table(spec: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"loras": [[lora.path, lora.multiplier] for lora in spec.loras], "weight": spec.weight}
    if spec.path:
        table["path"] = spec.path
    if spec.timestep_range is not None:
        table["timestep_range"] = list(spec.timestep_range)
    if spec.name:
        table["name"] = spec.name
    return table
