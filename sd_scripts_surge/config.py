"""Training arguments in sd-scripts' language, parsed once into typed objects.

- Flags keep sd-scripts' names and meanings (`--pretrained_model_name_or_path`, `--optimizer_args k=v …`).
- `--config_file cfg.toml`: like sd-scripts' `read_config_from_file`, the keys of every section are flattened
  one level into arguments (`[training] learning_rate = 1e-4` sets `--learning_rate`). Our `[surge]` section is
  the exception: its keys map to `--surge_<key>`, and `[[surge.teachers]]` lists teacher experts.
- Precedence: flags typed on the command line > the TOML > defaults.
- `--output_config` writes the merged configuration as TOML to the `--config_file` path and exits.
- A key nobody knows is an error naming the key, the file and the closest valid name. Keys that sd-scripts (or
  the kohya_ss GUI) writes but this trainer does not use are accepted with one warning, so real kohya TOMLs load.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import toml

from sd_scripts_surge.models.fileio import parse_size
from sd_scripts_surge.surge.controller import LR_RULES
from sd_scripts_surge.training.sampling import SAMPLERS

try:  # TOML 1.0 (mixed arrays such as loras = [["a.safetensors", 0.7]]); the `toml` package reads 0.5 only
    import tomllib as _toml_reader
except ImportError:  # Python 3.10
    _toml_reader = None

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and where it came from."""


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


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

SURGE_KEYS = ("shock_rate", "smooth_rate", "max_hops", "anchor_grasp", "pre_change_layers", "post_change_layers",
              "num_seeds", "probes", "flavor_resolution", "flavor_cache_dir", "replay_steps", "replay_units",
              "replay_mode", "lerp_alpha", "teacher", "teacher_dtype", "target_draws", "cache_budget",
              "replay_lr", "traj_weight", "w_task", "w_out", "feature_weight", "unit_map", "teachers", "controller",
              "random_lr", "keep_mean_lr", "lr_rule", "update_every_n_steps", "eval_every_n_steps",
              "target_teacher_mse")
UNIT_MAPS = ("mbw", "fine")
SDXL_BLOCK_LR_COUNT = 23  # time/label emb, input_blocks 0-8, middle 0-2, output_blocks 0-8, out
_warned_ignored: set[str] = set()


def is_ignored_key(key: str) -> bool:
    """True for sd-scripts / kohya_ss keys that parse but do nothing here."""
    return key in IGNORED_SD_SCRIPTS_KEYS or key.startswith(IGNORED_PREFIXES)


# Help text of the flags whose declaration does not carry its own (shown with the default by --help).
HELP = {
    "enable_bucket": "aspect-ratio buckets (a subset default; the dataset TOML's enable_bucket wins)",
    "min_bucket_reso": "smallest bucket side in pixels",
    "max_bucket_reso": "largest bucket side in pixels",
    "bucket_reso_steps": "bucket sides are multiples of this",
    "caption_extension": "caption file beside each image",
    "max_data_loader_n_workers": "accepted for kohya TOMLs; no workers are started (data is cached in memory)",
    "cache_latents": "latents are always cached (in memory); the flag is accepted",
    "cache_latents_to_disk": "also keep latents as .npz beside the images, reused while valid",
    "cache_text_encoder_outputs": "keep text embeddings (refused with captions that change per epoch)",
    "cache_text_encoder_outputs_to_disk": "also keep text embeddings on disk",
    "output_dir": "folder for models, states, samples, report and flavor cache",
    "output_name": "file name of the model ({output_name}.safetensors, {output_name}-{epoch:06d}.safetensors)",
    "save_precision": "dtype of saved weights",
    "save_every_n_epochs": "also save {output_name}-{epoch:06d} every N epochs (0: only the last)",
    "save_every_n_steps": "also save {output_name}-step{N:08d} every N steps (0: never)",
    "save_state": "save optimizer/scheduler/controller/RNG/data state beside every model, for --resume",
    "learning_rate": "base LR of every param group (surge multiplies it per unit)",
    "unet_lr": "LR of the UNet (default: --learning_rate)",
    "text_encoder_lr": "refused: the text encoders stay frozen (allowed, unused, with --network_train_unet_only)",
    "optimizer_type": "AdamW, AdamW8bit, Adafactor, ADA_SURGE, Lion, SGD… or a dotted path (case-insensitive)",
    "optimizer_args": "key=value arguments of the optimizer",
    "lr_scheduler": "constant, constant_with_warmup, cosine, cosine_with_restarts, linear, polynomial, cascade…",
    "lr_warmup_steps": "linear warmup steps",
    "lr_scheduler_num_cycles": "restarts of cosine_with_restarts / cascade",
    "lr_scheduler_power": "power of the polynomial schedule",
    "lr_scheduler_type": "a custom scheduler class by dotted path (gets --lr_scheduler_args)",
    "lr_scheduler_args": "key=value arguments of --lr_scheduler_type",
    "max_train_steps": "optimizer steps to train (a value typed here beats max_train_epochs from a TOML)",
    "max_train_epochs": "epochs to train (overrides max_train_steps from the same source, as in sd-scripts)",
    "train_batch_size": "images per batch (a dataset TOML's batch_size wins)",
    "gradient_accumulation_steps": "batches per optimizer step",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "mixed_precision": "autocast precision of the forward/backward pass",
    "full_fp16": "accepted and not applied: weights stay fp32 under fp16 autocast (a line says so)",
    "full_bf16": "trained weights in bf16 (ADA_SURGE with stochastic rounding); needs mixed_precision bf16",
    "gradient_checkpointing": "recompute activations in backward to save memory",
    "xformers": "xformers attention when the package is installed (else SDPA, and a line says so)",
    "sdpa": "PyTorch scaled_dot_product_attention (the default backend)",
    "no_half_vae": "the VAE in fp32 (always so here; the flag is accepted)",
    "seed": "seed of every random choice (noise, timesteps, captions, flips, probes)",
    "v_parameterization": "the model predicts v instead of ε",
    "min_snr_gamma": "Min-SNR weighting γ of the denoising loss (off when unset)",
    "noise_offset": "sd-scripts' noise offset (off when unset)",
    "logging_dir": "tracker logs go to <logging_dir>/<log_prefix><time> (default <output_dir>/logs)",
    "log_with": "trackers through accelerate: tensorboard, wandb (if installed) or all",
    "log_prefix": "prefix of the run's log folder name",
    "sample_every_n_epochs": "sample images every N epochs (0: only teacher / before / after)",
    "sample_sampler": "sampler of the sample images (sd-scripts names: ddim, euler, euler_a, dpmsolver++, k_*…)",
    "sample_steps": "sampling steps of the sample images",
    "network_module": "networks.lora to train a kohya LoRA (lora_unet_* keys) instead of the full UNet",
    "network_dim": "LoRA rank",
    "network_alpha": "LoRA alpha (scale alpha/dim)",
    "network_weights": "start from this LoRA file",
    "network_args": "key=value LoRA options: conv_dim, conv_alpha, dropout, rank_dropout, module_dropout",
    "network_train_unet_only": "LoRA on the UNet only (what this trainer does; the flag is accepted)",
    "train_text_encoder": "refused: the text encoders stay frozen",
    "surge_shock_rate": "clamp of per-unit LR multipliers to [1/shock, shock]; ramp length in steps",
    "surge_smooth_rate": "lerp rate of the multipliers toward their targets at each update (1/√π)",
    "surge_max_hops": "reach of anchor units along the UNet graph",
    "surge_anchor_grasp": "nearest anchors a unit follows",
    "surge_pre_change_layers": "replay: upstream units re-run with the student before the replayed unit",
    "surge_post_change_layers": "replay: downstream units whose error must not grow for a change to be kept",
    "surge_num_seeds": "noise seeds per probe (K)",
    "surge_flavor_cache_dir": "where the teacher's flavors are cached (default <output_dir>/flavor_cache)",
    "surge_replay_steps": "optimizer steps of each replay",
    "surge_replay_lr": "LR of replay (default learning_rate × 0.1)",
    "surge_traj_weight": "weight of the v-style trajectory loss on hidden units",
    "surge_w_task": "weight of the denoising (task) loss",
    "surge_w_out": "weight of output KD: MSE(student prediction, teacher prediction)",
    "surge_unit_map": "mbw (IN00…M00…OUT08) or fine (every ResBlock / transformer block)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_surge_sdxl.py",
        description="Surge training for SDXL (kohya sd-scripts flags; see README).",
        allow_abbrev=False,  # an abbreviation would not count as "given on the command line" for precedence
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # --- model and data
    a, flag = _adders(p.add_argument_group("model and dataset", "the student, tokenizers and the training images"))
    a("--pretrained_model_name_or_path", type=str, help="student: .safetensors (SAI layout), diffusers folder, "
      "or tiny:base")
    a("--tokenizer_dir", type=str, help="folder with tokenizer/ and tokenizer_2/ for single-file models")
    a("--tokenizer_cache_dir", type=str, help="local tokenizer folder (never downloads)")
    a("--dataset_config", type=str, help="kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    a("--train_data_dir", type=str, help="folder of NN_name subfolders (NN = repeats)")
    a("--reg_data_dir", type=str, help="regularisation images in NN_name subfolders (with --train_data_dir); their "
      "count per epoch is matched to the training images, their loss weighted by --prior_loss_weight")
    a("--resolution", type=str, default="1024", help="W,H or one number")
    flag("--enable_bucket")
    a("--min_bucket_reso", type=int, default=256)
    a("--max_bucket_reso", type=int, default=2048)
    a("--bucket_reso_steps", type=int, default=64)
    a("--caption_extension", type=str, default=".caption")
    # sd-scripts' subset options as flags. Like sd-scripts (config_util's fallback order subset → dataset →
    # [general] → command line), they are defaults for every subset: of the --train_data_dir folders, and of a
    # --dataset_config TOML, whose [general]/[[datasets]]/[[datasets.subsets]] values win over them.
    subset_default = "; a subset default: a --dataset_config value wins, as in sd-scripts"
    flag("--shuffle_caption", help="shuffle the comma-separated tags of each caption every epoch" + subset_default)
    a("--keep_tokens", type=int, default=0, help="leading tags that shuffling and tag dropout keep" + subset_default)
    a("--keep_tokens_separator", type=str, default="", help="tags before this separator are kept in place "
      "(instead of --keep_tokens); tags after a second one stay at the end" + subset_default)
    flag("--flip_aug", help="train on the mirrored image half the time (both are encoded when latents are "
         "cached)" + subset_default)
    flag("--color_aug", help="refused when given: it needs latents encoded every step, and this trainer always "
         "caches latents (sd-scripts also refuses it with cache_latents)" + subset_default)
    flag("--random_crop", help="crop at a random position instead of the centre; with cached latents it is drawn "
         "once per image from --seed (sd-scripts refuses it with cache_latents)" + subset_default)
    a("--caption_dropout_rate", type=float, default=0.0, help="probability that a step trains with an empty "
      "caption" + subset_default)
    a("--caption_dropout_every_n_epochs", type=int, default=0, help="drop every caption in epochs N, 2N, … "
      "(0: never)" + subset_default)
    a("--caption_tag_dropout_rate", type=float, default=0.0, help="probability to drop each tag not kept by "
      "keep_tokens" + subset_default)
    a("--caption_prefix", type=str, help="text put before every caption" + subset_default)
    a("--caption_suffix", type=str, help="text put after every caption" + subset_default)
    a("--prior_loss_weight", type=float, default=1.0, help="weight of the denoising loss of regularisation images "
      "(is_reg subsets): per-sample loss × this, then the batch mean, as in sd-scripts' train_network.py")
    a("--max_data_loader_n_workers", type=int, default=0)
    flag("--cache_latents")
    flag("--cache_latents_to_disk")
    flag("--cache_text_encoder_outputs")
    flag("--cache_text_encoder_outputs_to_disk")
    # --- output and saving
    a, flag = _adders(p.add_argument_group("saving", "where and how models and states are written"))
    a("--output_dir", type=str, default="output")
    a("--output_name", type=str, default="last")
    a("--save_model_as", type=str, default="safetensors", choices=["safetensors", "diffusers"],
      help="safetensors (single file, SAI layout) or diffusers (folder); ckpt (pickle) is not written")
    a("--save_precision", type=str, default="float", choices=["float", "fp16", "bf16"])
    a("--save_every_n_epochs", type=int, default=0)
    a("--save_every_n_steps", type=int, default=0)
    flag("--save_state")
    a("--resume", type=str, help="state folder (or output folder: its newest *-state) to resume from")
    # --- optimisation
    a, flag = _adders(p.add_argument_group("training and optimizer",
                                          "steps, batch, precision, optimizer and LR schedule"))
    a("--learning_rate", type=float, default=1e-6)
    a("--unet_lr", type=float)
    a("--text_encoder_lr", type=float)
    a("--optimizer_type", type=str, default="AdamW")
    a("--optimizer_args", type=str, nargs="*", default=[])
    a("--lr_scheduler", type=str, default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_scheduler_num_cycles", type=int, default=1)
    a("--lr_scheduler_power", type=float, default=1.0)
    a("--lr_scheduler_type", type=str, default="")
    a("--lr_scheduler_args", type=str, nargs="*", default=[])
    a("--max_train_steps", type=int, default=1600)
    a("--max_train_epochs", type=int)
    a("--train_batch_size", type=int, default=1)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    flag("--full_fp16")
    flag("--full_bf16")
    flag("--gradient_checkpointing")
    flag("--fused_backward_pass", help="ADA_SURGE only: update each parameter as its gradient is ready and free "
         "the gradient (full gradients never resident); one process, no gradient accumulation, max_grad_norm per "
         "tensor (as sd-scripts)")
    flag("--xformers")
    flag("--sdpa")
    flag("--no_half_vae")
    a("--seed", type=int, default=42)
    flag("--v_parameterization")
    a("--min_snr_gamma", type=float)
    a("--noise_offset", type=float)
    a("--block_lr", type=str, help="23 comma-separated LRs: time/label emb, input 0-8, middle 0-2, output 0-8, out")
    # --- logging and samples
    a, flag = _adders(p.add_argument_group("logging and samples", "trackers and sample images"))
    a("--logging_dir", type=str)
    a("--log_with", type=str, choices=["tensorboard", "wandb", "all"])
    a("--log_prefix", type=str)
    a("--sample_every_n_epochs", type=int, default=0)
    a("--sample_prompts", type=str, help="text file, one prompt a line")
    a("--sample_sampler", type=str, default="euler_a")
    a("--sample_steps", type=int, default=20)
    # --- LoRA and what trains
    a, flag = _adders(p.add_argument_group("network (LoRA)", "train a kohya LoRA instead of the full UNet"))
    a("--network_module", type=str)
    a("--network_dim", type=int)
    a("--network_alpha", type=float)
    a("--network_weights", type=str)
    a("--network_args", type=str, nargs="*", default=[])
    flag("--network_train_unet_only")
    flag("--train_text_encoder")
    # --- teachers and surge
    a, flag = _adders(p.add_argument_group("surge", "teachers and the surge engine (DESIGN §3); TOML section [surge]"))
    a("--surge", type=_bool, default=True, help="false: plain kohya-style fine-tune (no teacher)")
    a("--teacher_model", type=str, help="teacher checkpoint (default: the student's base, for --teacher_lora)")
    a("--teacher_lora", type=str, action="append", help="LoRA file[:multiplier] hooked into the teacher; repeatable")
    a("--surge_shock_rate", type=float, default=5.0)
    a("--surge_smooth_rate", type=float, default=0.5641895835)
    a("--surge_max_hops", type=int, default=4)
    a("--surge_anchor_grasp", type=int, default=3)
    a("--surge_pre_change_layers", type=int, default=0)
    a("--surge_post_change_layers", type=int, default=2)
    a("--surge_num_seeds", type=int, default=3)
    a("--surge_probes", type=int, default=8, help="captions used as probes")
    a("--surge_flavor_resolution", type=int, default=0, help="pool flavors to this size (0: full size)")
    a("--surge_flavor_cache_dir", type=str)
    a("--surge_replay_steps", type=int, default=50)
    a("--surge_replay_units", type=int, default=2, help="replay_mode single: how many of the worst units to replay")
    a("--surge_replay_mode", type=str, default="single", choices=["single", "all"],
      help="single: the worst replay_units units one at a time; all: every unit at once, teacher-forced")
    a("--surge_replay_lr", type=float)
    a("--surge_traj_weight", type=float, default=0.5)
    a("--surge_w_task", type=float, default=1.0)
    a("--surge_w_out", type=float, default=1.0)
    a("--surge_unit_map", type=str, default="mbw", choices=list(UNIT_MAPS))
    a("--surge_feature_weight", type=float, default=0.0, help="BK-SDM-style feature KD weight (baselines)")
    a("--surge_controller", type=_bool, default=True, help="false: no per-unit LRs (output-KD baselines)")
    a("--surge_random_lr", type=_bool, default=False, help="ablation: random per-unit multipliers")
    a("--surge_keep_mean_lr", type=_bool, default=False,
      help="rescale the per-unit targets to mean 1: redistribute LR between units instead of lowering it")
    a("--surge_lr_rule", type=str, default="anchored", choices=list(LR_RULES),
      help="units with no anchor in reach: keep 1.0 (anchored, DESIGN) or their own measured ratio (measured)")
    a("--surge_update_every_n_steps", type=int, default=0,
      help="also re-measure the student on the probes and move the per-unit LRs every N steps (0: per epoch)")
    a("--surge_lerp_alpha", type=float, default=0.0,
      help="unit LERP θ ← θ + α(θ_T − θ) toward a same-architecture teacher (plain checkpoint, full fine-tune), "
           "at every epoch start, each unit kept only if its downstream error does not grow (0: off)")
    a("--surge_teacher", type=str, default="live", choices=["live", "cached"],
      help="live: run the teacher every step; cached: its answers for K draws per image computed once, up front")
    a("--surge_teacher_dtype", type=str, default="float", choices=["float", "fp16", "bf16", "fp8"],
      help="how the frozen teacher UNet is stored: float (fp32), fp16/bf16 (half the memory; computed in that "
           "dtype), fp8 (e4m3 weights, a quarter; each layer is widened to bf16 only while it runs)")
    a("--surge_target_draws", type=int, default=1,
      help="cached teacher: (timestep, noise) draws per image; epoch e trains on draw e mod K")
    a("--surge_cache_budget", type=str, default="0",
      help="cached teacher: refuse a target cache larger than this (e.g. 8GB, 512MB; 0: no limit)")
    a("--surge_eval_every_n_steps", type=int, default=0, help="held-out teacher-matching MSE every N steps")
    a("--surge_target_teacher_mse", type=float, default=0.0, help="stop once the held-out MSE is at most this")
    a("--estimate", type=_bool, default=False, nargs="?", const=True,
      help="print the memory plan (per component, built on the meta device: instant for full SDXL) and exit")
    a("--estimate_device", type=str, default="",
      help="device memory to check the plan against, e.g. 24GB (the plan is printed at the start of every run)")
    # --- config files
    a, flag = _adders(p.add_argument_group("config files", "TOML in and out"))
    a("--config_file", type=str, help="TOML with the arguments (sections flattened one level)")
    flag("--output_config", help="write the merged config to the --config_file path and exit")
    return p


def _adders(group: argparse._ArgumentGroup):  # noqa: ANN202 - (add_argument, add store_true flag)
    """add_argument for this help group, and the same for store_true flags; every flag gets help text."""
    def add(name: str, **kwargs: Any) -> argparse.Action:
        kwargs.setdefault("help", HELP.get(name.lstrip("-"), ""))
        if not kwargs["help"]:
            raise AssertionError(f"{name} has no help text: add it to HELP")  # a developer error, caught by tests
        return group.add_argument(name, **kwargs)

    def flag(name: str, **kwargs: Any) -> argparse.Action:
        return add(name, action="store_true", **kwargs)
    return add, flag


# ------------------------------------------------------------------------------------------- typed config


@dataclass
class SurgeConfig:
    """The `[surge]` section (DESIGN §3)."""

    enabled: bool = True
    shock_rate: float = 5.0
    smooth_rate: float = 0.5641895835
    max_hops: int = 4
    anchor_grasp: int = 3
    pre_change_layers: int = 0
    post_change_layers: int = 2
    num_seeds: int = 3
    probes: int = 8
    flavor_resolution: int = 0
    flavor_cache_dir: str | None = None
    replay_steps: int = 50
    replay_units: int = 2
    replay_mode: str = "single"
    lerp_alpha: float = 0.0
    teacher: str = "live"
    teacher_dtype: str = "float"
    target_draws: int = 1
    cache_budget: str = "0"
    replay_lr: float | None = None
    traj_weight: float = 0.5
    w_task: float = 1.0
    w_out: float = 1.0
    unit_map: str = "mbw"
    feature_weight: float = 0.0
    controller: bool = True
    random_lr: bool = False
    keep_mean_lr: bool = False
    lr_rule: str = "anchored"
    update_every_n_steps: int = 0
    eval_every_n_steps: int = 0
    target_teacher_mse: float = 0.0
    teachers: list = field(default_factory=list)  # teachers.TeacherSpec, one per [[surge.teachers]] table


@dataclass
class TrainConfig:
    """Every training argument, typed. Attribute names are sd-scripts' flag names."""

    pretrained_model_name_or_path: str | None = None
    tokenizer_dir: str | None = None
    tokenizer_cache_dir: str | None = None
    dataset_config: str | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    resolution: tuple[int, int] = (1024, 1024)  # (width, height) like sd-scripts
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    prior_loss_weight: float = 1.0
    max_data_loader_n_workers: int = 0
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    output_dir: str = "output"
    output_name: str = "last"
    save_model_as: str = "safetensors"
    save_precision: str = "float"
    save_every_n_epochs: int = 0
    save_every_n_steps: int = 0
    save_state: bool = False
    resume: str | None = None
    learning_rate: float = 1e-6
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer_type: str = "AdamW"
    optimizer_args: list[str] = field(default_factory=list)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_type: str = ""
    lr_scheduler_args: list[str] = field(default_factory=list)
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    gradient_checkpointing: bool = False
    fused_backward_pass: bool = False
    estimate: bool = False
    estimate_device: str = ""
    xformers: bool = False
    sdpa: bool = False
    no_half_vae: bool = False
    seed: int = 42
    v_parameterization: bool = False
    min_snr_gamma: float | None = None
    noise_offset: float | None = None
    block_lr: list[float] | None = None
    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    sample_every_n_epochs: int = 0
    sample_prompts: str | None = None
    sample_sampler: str = "euler_a"
    sample_steps: int = 20
    network_module: str | None = None
    network_dim: int | None = None
    network_alpha: float | None = None
    network_weights: str | None = None
    network_args: list[str] = field(default_factory=list)
    network_train_unet_only: bool = False
    train_text_encoder: bool = False
    teacher_model: str | None = None
    teacher_lora: list[str] = field(default_factory=list)
    surge: SurgeConfig = field(default_factory=SurgeConfig)
    config_file: str | None = None
    ignored: dict[str, Any] = field(default_factory=dict)  # sd-scripts keys accepted but not used


# ------------------------------------------------------------------------------------------- the TOML file


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes a ConfigError naming the file and line."""
    text = path.read_text(encoding="utf-8")
    try:
        if _toml_reader is not None:
            return _toml_reader.loads(text)
        return toml.loads(text)
    except (ValueError, toml.TomlDecodeError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the line it names") from e


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_config_file(path: str | Path, known: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flatten a training TOML: returns (arguments, ignored sd-scripts keys). Unknown keys raise ConfigError.

    Like sd-scripts, a path without `.toml` gets it appended. Values keep their TOML types here;
    `coerce_file_values` checks them against the flags' types.
    """
    path = Path(path)
    if not path.is_file() and path.suffix.lower() != ".toml":
        path = path.with_name(path.name + ".toml")
    if not path.is_file():
        raise ConfigError(f"--config_file {path}: file not found")
    data = load_toml(path)
    known_set = set(known)
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
            raise ConfigError(f"{path}: unknown key {where}{_suggest(key, valid)}; "
                              "run with --help for the valid names")

    for key, value in data.items():
        if key == "surge" and isinstance(value, dict):
            for sub, sub_value in value.items():
                if sub not in SURGE_KEYS:
                    raise ConfigError(f"{path}: unknown key [surge] {sub!r}{_suggest(sub, SURGE_KEYS)}")
                put(f"surge_{sub}", sub_value, f"[surge] {sub!r}")
        elif isinstance(value, dict):  # a section: flatten one level
            for sub, sub_value in value.items():
                put(sub, sub_value, f"[{key}] {sub!r}")
        else:
            put(key, value, repr(key))
    return values, ignored


def coerce_file_values(values: dict[str, Any], parser: argparse.ArgumentParser, where: str) -> dict[str, Any]:
    """Check TOML values against the flags: types, choices, lists for nargs flags. Errors name the key."""
    actions = {action.dest: action for action in parser._actions}
    out: dict[str, Any] = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None or key == "surge_teachers":
            out[key] = value
            continue
        try:
            out[key] = _coerce(value, action)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: key {key!r}: {e}") from e
        if action.choices is not None and out[key] is not None and out[key] not in action.choices:
            raise ConfigError(f"{where}: key {key!r} must be one of {list(action.choices)}, got {out[key]!r}")
    return out


def _coerce(value: Any, action: argparse.Action) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    listy = action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)
    convert = action.type or str
    if listy:
        items = value if isinstance(value, list) else [value]
        return [_scalar(item, convert) for item in items]
    if isinstance(value, list | dict):
        if action.dest in ("resolution", "block_lr") and isinstance(value, list):
            return value  # resolution = [w, h] and block_lr = [23 numbers] are fine as arrays
        raise ValueError(f"expected a single value, got {type(value).__name__} {value!r}")
    return _scalar(value, convert)


def _scalar(value: Any, convert: Any) -> Any:
    if convert is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if convert is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if convert is str:
        if isinstance(value, bool | dict | list):
            raise ValueError(f"expected text, got {value!r}")
        return str(value)
    return convert(value)


def _explicit_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> set[str]:
    """Destinations of the flags actually typed on the command line."""
    by_option = {opt: action.dest for action in parser._actions for opt in action.option_strings}
    return {by_option[token.split("=", 1)[0]] for token in argv
            if token.startswith("--") and token.split("=", 1)[0] in by_option}


def _reject_unknown_flags(unknown: Sequence[str], parser: argparse.ArgumentParser) -> None:
    flags = [token.split("=", 1)[0] for token in unknown if token.startswith("-")]
    if not flags:
        raise ConfigError(f"command line: unexpected value(s) {list(unknown)}; check the flag before them")
    name = flags[0].lstrip("-")
    if is_ignored_key(name):  # an sd-scripts flag we do not act on: say so instead of failing
        raise ConfigError(f"command line: --{name} is an sd-scripts option this trainer does not use; "
                          "remove it (in a --config_file TOML it would be accepted and ignored)")
    valid = [opt.lstrip("-") for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
    raise ConfigError(f"command line: unknown flag {flags[0]}{_suggest(name, valid)}; run with --help for the list")


def warn_ignored_once(ignored: dict[str, Any], where: str) -> None:
    new = sorted(set(ignored) - _warned_ignored)
    if new:
        _warned_ignored.update(new)
        logger.warning("%s: sd-scripts keys accepted but not used by this trainer: %s", where, ", ".join(new))


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line (+ `--config_file`) once into a validated TrainConfig.

    `--output_config` writes the merged values to `--config_file` and raises SystemExit(0).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown_flags(unknown, parser)
    merged = vars(args).copy()
    ignored: dict[str, Any] = {}
    source = "command line"
    if args.config_file and not args.output_config:
        known = [k for k in merged if k not in ("config_file", "output_config")] + ["surge_teachers"]
        file_values, ignored = read_config_file(args.config_file, known)
        file_values = coerce_file_values(file_values, parser, str(args.config_file))
        explicit = _explicit_flags(argv, parser)
        merged.update({k: v for k, v in file_values.items() if k not in explicit})
        source = str(args.config_file)
        if "max_train_steps" in explicit and file_values.get("max_train_epochs") and "max_train_epochs" not in explicit:
            # sd-scripts lets epochs override steps; a step count typed on the command line is the user's intent
            logger.warning("--max_train_steps %s on the command line overrides max_train_epochs = %s in %s",
                           merged["max_train_steps"], file_values["max_train_epochs"], source)
            merged["max_train_epochs"] = None
    if merged.get("max_train_epochs") and "max_train_steps" in _explicit_flags(argv, parser) \
            and "max_train_epochs" in _explicit_flags(argv, parser):
        raise ConfigError("--max_train_steps and --max_train_epochs both given on the command line: give one")
    if args.output_config:
        if not args.config_file:
            raise ConfigError("--output_config needs --config_file (the path to write)")
        to_train_config(merged, "command line")  # refuse to write a config that would not load
        path = write_config_file(merged, args.config_file)
        print(f"wrote {path}")
        raise SystemExit(0)
    config = to_train_config(merged, source)
    config.ignored = ignored
    warn_ignored_once(ignored, source)
    return config


def write_config_file(values: dict[str, Any], path: str | Path) -> Path:
    """Write arguments as a sectioned TOML that `--config_file` reads back to the same TrainConfig."""
    sections: dict[str, dict[str, Any]] = {"model": {}, "training": {}, "surge": {}}
    for key, value in values.items():
        if key in ("config_file", "output_config") or value is None:
            continue
        if key.startswith("surge_"):
            if key == "surge_teachers" and not value:
                continue
            sections["surge"][key[len("surge_"):]] = _toml_value(value)
        elif key in ("pretrained_model_name_or_path", "teacher_model", "teacher_lora", "tokenizer_dir", "surge"):
            sections["model"][key] = value
        else:
            sections["training"][key] = _toml_value(value)
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


# ------------------------------------------------------------------------------------------- typed values


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


def parse_lora_arg(item: str) -> tuple[str, float]:
    """`path[:multiplier]` → (path, multiplier); a Windows drive letter is not a multiplier."""
    head, sep, tail = item.rpartition(":")
    if sep and len(head) > 1:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return item, 1.0


def to_train_config(values: dict[str, Any], where: str) -> TrainConfig:
    """Typed config from merged argument values; checks ranges and choices, naming the key."""
    surge_fields = {f.name for f in fields(SurgeConfig)}
    surge_values = {k[len("surge_"):]: v for k, v in values.items()
                    if k.startswith("surge_") and k[len("surge_"):] in surge_fields and v is not None}
    surge_values["teachers"] = _teacher_specs(surge_values.get("teachers", []), where)
    surge = SurgeConfig(enabled=_bool(values.get("surge", True)), **surge_values)
    plain = {f.name for f in fields(TrainConfig)} - {"surge", "ignored"}
    kwargs = {k: v for k, v in values.items() if k in plain and v is not None}
    for key in ("optimizer_args", "lr_scheduler_args", "network_args", "teacher_lora"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]]
    if "resolution" in kwargs:
        kwargs["resolution"] = parse_resolution(kwargs["resolution"], f"{where}: key 'resolution'")
    if kwargs.get("block_lr") is not None:
        kwargs["block_lr"] = _block_lr(kwargs["block_lr"], where)
    for item in kwargs.get("teacher_lora", []):
        _, multiplier = parse_lora_arg(item)
        if not math.isfinite(multiplier):
            raise ConfigError(f"{where}: teacher_lora {item!r}: the multiplier must be a finite number")
    config = TrainConfig(surge=surge, **kwargs)
    validate(config, where)
    return config


def _block_lr(value: Any, where: str) -> list[float]:
    raw = str(value).split(",") if isinstance(value, str) else list(value)
    try:
        lrs = [float(x) for x in raw]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: key 'block_lr' must be {SDXL_BLOCK_LR_COUNT} numbers, got {value!r}") from e
    if len(lrs) != SDXL_BLOCK_LR_COUNT or any(lr < 0 for lr in lrs):
        raise ConfigError(f"{where}: key 'block_lr' needs {SDXL_BLOCK_LR_COUNT} values ≥ 0 for SDXL (time/label emb, "
                          f"input 0-8, middle 0-2, output 0-8, out), got {len(lrs)}")
    return lrs


def _teacher_specs(tables: Any, where: str) -> list:
    if not isinstance(tables, list):
        raise ConfigError(f"{where}: [surge] teachers must be a list of [[surge.teachers]] tables")
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


def validate(c: TrainConfig, where: str) -> None:
    """Range and consistency checks; the error names the key."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: key {key!r} {message}")

    need(c.learning_rate > 0, "learning_rate", f"must be > 0 (got {c.learning_rate})")
    for key in ("unet_lr", "text_encoder_lr"):
        value = getattr(c, key)
        need(value is None or value >= 0, key, f"must be ≥ 0 (got {value})")
    need(c.train_batch_size >= 1, "train_batch_size", f"must be ≥ 1 (got {c.train_batch_size})")
    need(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be ≥ 1")
    need(c.max_train_steps >= 1 or bool(c.max_train_epochs), "max_train_steps", "must be ≥ 1")
    need(c.max_train_epochs is None or c.max_train_epochs >= 1, "max_train_epochs", "must be ≥ 1")
    need(c.lr_warmup_steps >= 0, "lr_warmup_steps", "must be ≥ 0")
    need(c.lr_scheduler_num_cycles >= 1, "lr_scheduler_num_cycles", "must be ≥ 1")
    need(c.max_grad_norm >= 0, "max_grad_norm", "must be ≥ 0 (0 disables clipping)")
    need(c.keep_tokens >= 0, "keep_tokens", "must be ≥ 0")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        need(0.0 <= getattr(c, key) <= 1.0, key, f"must be in [0, 1] (got {getattr(c, key)})")
    need(c.caption_dropout_every_n_epochs >= 0, "caption_dropout_every_n_epochs", "must be ≥ 0 (0: never)")
    need(math.isfinite(c.prior_loss_weight) and c.prior_loss_weight >= 0, "prior_loss_weight",
         f"must be a finite number ≥ 0 (got {c.prior_loss_weight})")
    need(c.max_data_loader_n_workers >= 0, "max_data_loader_n_workers", "must be ≥ 0")
    need(c.bucket_reso_steps >= 1, "bucket_reso_steps", "must be ≥ 1")
    need(0 < c.min_bucket_reso <= c.max_bucket_reso, "min_bucket_reso",
         f"must be > 0 and ≤ max_bucket_reso ({c.min_bucket_reso} vs {c.max_bucket_reso})")
    for key in ("save_every_n_epochs", "save_every_n_steps", "sample_every_n_epochs"):
        need(getattr(c, key) >= 0, key, "must be ≥ 0")
    need(c.min_snr_gamma is None or c.min_snr_gamma > 0, "min_snr_gamma", "must be > 0")
    need(c.noise_offset is None or c.noise_offset >= 0, "noise_offset", "must be ≥ 0")
    need(c.network_dim is None or c.network_dim >= 1, "network_dim", "must be ≥ 1")
    need(c.network_alpha is None or c.network_alpha > 0, "network_alpha", "must be > 0")
    need(c.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "must be no, fp16 or bf16")
    need(not (c.full_fp16 and c.full_bf16), "full_bf16", "cannot be combined with full_fp16")
    need(not c.full_fp16 or c.mixed_precision == "fp16", "full_fp16", "needs mixed_precision = \"fp16\"")
    need(not c.full_bf16 or c.mixed_precision == "bf16", "full_bf16", "needs mixed_precision = \"bf16\"")
    need(c.save_precision in ("float", "fp16", "bf16"), "save_precision", "must be float, fp16 or bf16")
    need(c.save_model_as != "ckpt", "save_model_as", "ckpt (pickle) is not written by this trainer; use safetensors")
    need(c.save_model_as in ("safetensors", "diffusers"), "save_model_as", "must be safetensors or diffusers")
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
    need(c.sample_sampler in SAMPLERS, "sample_sampler",
         f"must be one of {', '.join(SAMPLERS)} (got {c.sample_sampler!r})")
    need(c.log_with != "wandb" and c.log_with != "all" or importlib.util.find_spec("wandb") is not None,
         "log_with", "wandb needs the wandb package (pip install wandb); or use tensorboard")
    need(c.block_lr is None or not c.network_module, "block_lr",
         "applies to a full fine-tune (as in sdxl_train.py), not to LoRA training; drop it or network_module")
    s = c.surge
    need(s.shock_rate >= 1, "surge_shock_rate", f"must be ≥ 1 (got {s.shock_rate})")
    need(0 < s.smooth_rate <= 1, "surge_smooth_rate", f"must be in (0, 1] (got {s.smooth_rate})")
    need(s.max_hops >= 0, "surge_max_hops", "must be ≥ 0")
    need(s.anchor_grasp >= 1, "surge_anchor_grasp", "must be ≥ 1")
    need(s.pre_change_layers >= 0, "surge_pre_change_layers", "must be ≥ 0")
    need(s.post_change_layers >= 0, "surge_post_change_layers", "must be ≥ 0")
    need(s.num_seeds >= 1, "surge_num_seeds", "must be ≥ 1")
    need(s.probes >= 1, "surge_probes", "must be ≥ 1")
    need(s.flavor_resolution >= 0, "surge_flavor_resolution", "must be ≥ 0 (0: full size)")
    need(s.replay_steps >= 0, "surge_replay_steps", "must be ≥ 0")
    need(s.replay_units >= 0, "surge_replay_units", "must be ≥ 0")
    need(0.0 <= s.lerp_alpha <= 1.0, "surge_lerp_alpha", f"must be in [0, 1] (got {s.lerp_alpha})")
    need(not s.lerp_alpha or not c.network_module, "surge_lerp_alpha",
         "moves the student's own weights toward the teacher's: a full fine-tune, not a LoRA")
    need(s.teacher in ("live", "cached"), "surge_teacher", f"must be live or cached (got {s.teacher!r})")
    need(s.teacher_dtype in ("float", "fp16", "bf16", "fp8"), "surge_teacher_dtype",
         f"must be float, fp16, bf16 or fp8 (got {s.teacher_dtype!r})")
    need(s.target_draws >= 1, "surge_target_draws", "must be ≥ 1")
    try:
        parse_size(s.cache_budget)
    except ValueError as e:
        need(False, "surge_cache_budget", str(e))
    need(s.replay_mode in ("single", "all"), "surge_replay_mode", f"must be single or all (got {s.replay_mode!r})")
    need(s.replay_lr is None or s.replay_lr > 0, "surge_replay_lr", "must be > 0")
    need(s.lr_rule in LR_RULES, "surge_lr_rule", f"must be one of {list(LR_RULES)} (got {s.lr_rule!r})")
    need(s.update_every_n_steps >= 0, "surge_update_every_n_steps", "must be ≥ 0 (0: once per epoch)")
    need(s.unit_map in UNIT_MAPS, "surge_unit_map", f"must be one of {list(UNIT_MAPS)} (got {s.unit_map!r})")
    for key in ("traj_weight", "w_task", "w_out"):
        value = getattr(s, key)
        need(math.isfinite(value) and value >= 0, f"surge_{key}", f"must be a finite number ≥ 0 (got {value})")
