"""The one declaration of every training option: type, default, range, choices, help and help group.

Each option is a dataclass field carrying an `Option` in its metadata. Everything else is derived from it:
the command-line flags (`cli.build_parser`), the training-TOML keys (`files.read_config_file`), the range and
choice checks (`values.check_options`), the kohya dataset TOML's subset and bucket keys
(`data.dataset_config` uses `SubsetOptions` / `BucketOptions`), the GUI's fields and the written TOML.

Groups follow sd-scripts' help: a class decorated with `@options_group(title)` gives its own fields that group.
`TrainConfig` is every group together (attribute names are sd-scripts' flag names); `SurgeConfig` is the
`[surge]` section, whose flags are `--surge_<name>`.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from sd_scripts_surge.surge.controller import LR_RULES
from sd_scripts_surge.surge.placement import PLACEMENTS
from sd_scripts_surge.training.sampling import SAMPLERS

UNIT_MAPS = ("mbw", "fine")
SDXL_BLOCK_LR_COUNT = 23  # time/label emb, input_blocks 0-8, middle 0-2, output_blocks 0-8, out
SUBSET_DEFAULT = "; a subset default: a --dataset_config value wins, as in sd-scripts"


@dataclass
class Option:
    """What the schema knows about one option besides its type and default."""

    help: str
    choices: tuple[Any, ...] | None = None
    ge: float | None = None  # value ≥ ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value ≤ le
    note: str = ""  # said after a range error, e.g. "(0: never)"
    cli: bool = True  # a command-line flag
    toml: bool = True  # a key of the training TOML
    value_bool: bool = False  # a bool flag that takes true/false (`--surge_controller false`); else store_true
    append: bool = False  # a repeatable flag (--teacher_lora a --teacher_lora b)
    cli_type: Callable[[str], Any] | None = None  # what argparse reads when it differs from the field type
    group: str = ""  # set by @options_group
    dest: str = ""  # flag / TOML name; set by @options_group (surge fields: surge_<name>)
    section: str = ""  # the table a written TOML puts it in; set by @options_group
    order: int = 0  # declaration order in this file (--help lists a group's options in it)


def opt(default: Any = None, help: str = "", **option: Any) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field declaring one option (a list default becomes a fresh list per instance)."""
    meta = {"option": Option(help=help, order=next(_declaration_order), **option)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_declaration_order = itertools.count()
GROUPS: dict[str, str] = {}  # title → description, in --help order


def options_group(title: str, description: str, section: str, prefix: str = "") -> Callable[[type], type]:
    """Give the fields declared in this class (not its bases) `title` as their help group, `section` as their
    table in a written TOML and `prefix` before their flag names."""
    GROUPS.setdefault(title, description)

    def stamp(cls: type) -> type:
        own = cls.__dict__.get("__annotations__", {})
        for f in fields(cls):
            option = f.metadata.get("option")
            if option is not None and f.name in own:
                option.group = title
                option.section = option.section or section
                option.dest = option.dest or prefix + f.name
        return cls
    return stamp


@dataclass(frozen=True)
class Declared:
    """One option as the front ends see it: name, type, default and its `Option`."""

    dest: str
    attr: str  # attribute on its dataclass
    owner: type
    type: Any  # the field's type without `| None`
    optional: bool  # None is allowed (unset)
    default: Any
    option: Option

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) is list or self.type is list


def declared(cls: type) -> Iterator[Declared]:
    """The options of a dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        option = f.metadata.get("option")
        if option is None:
            continue
        kind, optional = _unwrap(hints[f.name])
        yield Declared(option.dest or f.name, f.name, cls, kind, optional, _default(f), option)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), True
    return hint, False


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def toml_types(cls: type) -> dict[str, tuple[type, ...]]:
    """dest → accepted TOML value types (a float key accepts an integer; a tuple or list key an array)."""
    types: dict[str, tuple[type, ...]] = {}
    for d in declared(cls):
        base = typing.get_origin(d.type) or d.type
        if base is float:
            types[d.dest] = (float, int)
        elif base in (tuple, list):
            types[d.dest] = (int, list)  # resolution = 1024 or [w, h]
        elif base in (bool, int, str):
            types[d.dest] = (base,)
        else:  # Path and other text-read values
            types[d.dest] = (str,)
    return types


# ------------------------------------------------------------------------------------------- the options


@options_group("model and dataset", "the student, tokenizers and the training images", "model")
@dataclass(kw_only=True)
class ModelOptions:
    pretrained_model_name_or_path: str | None = opt(None, "student: .safetensors (SAI layout), diffusers folder, "
                                                    "or tiny:base")
    tokenizer_dir: str | None = opt(None, "folder with tokenizer/ and tokenizer_2/ for single-file models")
    tokenizer_cache_dir: str | None = opt(None, "refused: sd-scripts' download cache (this trainer never "
                                          "downloads; give --tokenizer_dir)")
    dataset_config: str | None = opt(None, "kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    train_data_dir: str | None = opt(None, "folder of NN_name subfolders (NN = repeats)")
    reg_data_dir: str | None = opt(None, "regularisation images in NN_name subfolders (with --train_data_dir); "
                                   "their count per epoch is matched to the training images, their loss weighted "
                                   "by --prior_loss_weight")
    resolution: tuple[int, int] = opt((1024, 1024), "W,H or one number (stored as width, height)", cli_type=str)
@options_group("model and dataset", "the student, tokenizers and the training images", "model")
@dataclass(kw_only=True)
class SubsetOptions:
    """sd-scripts' subset options. Also flags: defaults for every subset of a dataset TOML or folder form."""

    caption_extension: str = opt(".caption", "caption file beside each image" + SUBSET_DEFAULT)
    shuffle_caption: bool = opt(False, "shuffle the comma-separated tags of each caption every epoch"
                                + SUBSET_DEFAULT)
    keep_tokens: int = opt(0, "leading tags that shuffling and tag dropout keep" + SUBSET_DEFAULT, ge=0)
    keep_tokens_separator: str = opt("", "tags before this separator are kept in place (instead of --keep_tokens); "
                                     "tags after a second one stay at the end" + SUBSET_DEFAULT)
    flip_aug: bool = opt(False, "train on the mirrored image half the time (both are encoded when latents are "
                         "cached)" + SUBSET_DEFAULT)
    color_aug: bool = opt(False, "refused when given: it needs latents encoded every step, and this trainer always "
                          "caches latents (sd-scripts also refuses it with cache_latents)" + SUBSET_DEFAULT)
    random_crop: bool = opt(False, "crop at a random position instead of the centre; with cached latents it is "
                            "drawn once per image from --seed (sd-scripts refuses it with cache_latents)"
                            + SUBSET_DEFAULT)
    caption_dropout_rate: float = opt(0.0, "probability that a step trains with an empty caption" + SUBSET_DEFAULT,
                                      ge=0, le=1)
    caption_dropout_every_n_epochs: int = opt(0, "drop every caption in epochs N, 2N, … (0: never)"
                                              + SUBSET_DEFAULT, ge=0, note="(0: never)")
    caption_tag_dropout_rate: float = opt(0.0, "probability to drop each tag not kept by keep_tokens"
                                          + SUBSET_DEFAULT, ge=0, le=1)
    caption_prefix: str = opt("", "text put before every caption" + SUBSET_DEFAULT)
    caption_suffix: str = opt("", "text put after every caption" + SUBSET_DEFAULT)


@options_group("model and dataset", "the student, tokenizers and the training images", "model")
@dataclass(kw_only=True)
class BucketOptions:
    """Aspect-ratio buckets: flags, and keys of a dataset TOML's [general] / [[datasets]]."""

    enable_bucket: bool = opt(False, "aspect-ratio buckets (a subset default; the dataset TOML's enable_bucket "
                              "wins)")
    min_bucket_reso: int = opt(256, "smallest bucket side in pixels", gt=0)
    max_bucket_reso: int = opt(2048, "largest bucket side in pixels", gt=0)
    bucket_reso_steps: int = opt(64, "bucket sides are multiples of this", ge=1)


@options_group("model and dataset", "the student, tokenizers and the training images", "model")
@dataclass(kw_only=True)
class DataOptions:
    prior_loss_weight: float = opt(1.0, "weight of the denoising loss of regularisation images (is_reg subsets): "
                                   "per-sample loss × this, then the batch mean, as in sd-scripts' "
                                   "train_network.py", ge=0)
    max_data_loader_n_workers: int = opt(0, "accepted for kohya TOMLs; no workers are started (data is cached in "
                                         "memory)", ge=0)
    cache_latents: bool = opt(False, "latents are always cached (in memory); the flag is accepted")
    cache_latents_to_disk: bool = opt(False, "also keep latents as .npz beside the images, reused while valid")
    cache_text_encoder_outputs: bool = opt(False, "keep text embeddings (refused with captions that change per "
                                           "epoch)")
    cache_text_encoder_outputs_to_disk: bool = opt(False, "also keep text embeddings on disk")


@options_group("saving", "where and how models and states are written", "saving")
@dataclass(kw_only=True)
class SavingOptions:
    output_dir: str = opt("output", "folder for models, states, samples, report and flavor cache")
    output_name: str = opt("last", "file name of the model ({output_name}.safetensors, "
                           "{output_name}-{epoch:06d}.safetensors)")
    save_model_as: str = opt("safetensors", "safetensors (single file, SAI layout) or diffusers (folder); ckpt "
                             "(pickle) is not written", choices=("safetensors", "diffusers"))
    save_precision: str = opt("float", "dtype of saved weights", choices=("float", "fp16", "bf16"))
    save_every_n_epochs: int = opt(0, "also save {output_name}-{epoch:06d} every N epochs (0: only the last)", ge=0)
    save_every_n_steps: int = opt(0, "also save {output_name}-step{N:08d} every N steps (0: never)", ge=0)
    save_state: bool = opt(False, "save optimizer/scheduler/controller/RNG/data state beside every model, for "
                           "--resume")
    resume: str | None = opt(None, "state folder (or output folder: its newest *-state) to resume from")


@options_group("training and optimizer", "steps, batch, precision, optimizer and LR schedule", "training")
@dataclass(kw_only=True)
class TrainingOptions:
    learning_rate: float = opt(1e-6, "base LR of every param group (surge multiplies it per unit)", gt=0)
    unet_lr: float | None = opt(None, "LR of the UNet (default: --learning_rate)", ge=0)
    text_encoder_lr: float | None = opt(None, "refused: the text encoders stay frozen (allowed, unused, with "
                                        "--network_train_unet_only)", ge=0)
    optimizer_type: str = opt("AdamW", "AdamW, AdamW8bit, Adafactor, ADA_SURGE, Lion, SGD… or a dotted path "
                              "(case-insensitive)")
    optimizer_args: list[str] = opt([], "key=value arguments of the optimizer")
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, cosine, cosine_with_restarts, linear, "
                            "polynomial, cascade…")
    lr_warmup_steps: int = opt(0, "linear warmup steps", ge=0)
    lr_scheduler_num_cycles: int = opt(1, "restarts of cosine_with_restarts / cascade", ge=1)
    lr_scheduler_power: float = opt(1.0, "power of the polynomial schedule")
    lr_scheduler_type: str = opt("", "a custom scheduler class by dotted path (gets --lr_scheduler_args)")
    lr_scheduler_args: list[str] = opt([], "key=value arguments of --lr_scheduler_type")
    max_train_steps: int = opt(1600, "optimizer steps to train (a value typed here beats max_train_epochs from a "
                               "TOML)")
    max_train_epochs: int | None = opt(None, "epochs to train (overrides max_train_steps from the same source, as "
                                       "in sd-scripts)", ge=1)
    train_batch_size: int = opt(1, "images per batch (a dataset TOML's batch_size wins)", ge=1)
    gradient_accumulation_steps: int = opt(1, "batches per optimizer step", ge=1)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)", ge=0,
                               note="(0 disables clipping)")
    mixed_precision: str = opt("no", "autocast precision of the forward/backward pass", choices=("no", "fp16", "bf16"))
    full_fp16: bool = opt(False, "accepted and not applied: weights stay fp32 under fp16 autocast (a line says so)")
    full_bf16: bool = opt(False, "trained weights in bf16 (ADA_SURGE with stochastic rounding); needs "
                          "mixed_precision bf16")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    fused_backward_pass: bool = opt(False, "ADA_SURGE only: update each parameter as its gradient is ready and free "
                                    "the gradient (full gradients never resident); one process, no gradient "
                                    "accumulation, max_grad_norm per tensor (as sd-scripts)")
    xformers: bool = opt(False, "xformers attention when the package is installed (else SDPA, and a line says so)")
    sdpa: bool = opt(False, "PyTorch scaled_dot_product_attention (the default backend)")
    no_half_vae: bool = opt(False, "the VAE in fp32 (always so here; the flag is accepted)")
    seed: int = opt(42, "seed of every random choice (noise, timesteps, captions, flips, probes)")
    v_parameterization: bool = opt(False, "the model predicts v instead of ε")
    min_snr_gamma: float | None = opt(None, "Min-SNR weighting γ of the denoising loss (off when unset)", gt=0)
    noise_offset: float | None = opt(None, "sd-scripts' noise offset (off when unset)", ge=0)
    block_lr: list[float] | None = opt(None, "23 comma-separated LRs: time/label emb, input 0-8, middle 0-2, "
                                       "output 0-8, out", cli_type=str)


@options_group("logging and samples", "trackers and sample images", "logging")
@dataclass(kw_only=True)
class LoggingOptions:
    logging_dir: str | None = opt(None, "tracker logs go to <logging_dir>/<log_prefix><time> (default "
                                  "<output_dir>/logs)")
    log_with: str | None = opt(None, "trackers through accelerate: tensorboard, wandb (if installed) or all",
                               choices=("tensorboard", "wandb", "all"))
    log_prefix: str | None = opt(None, "prefix of the run's log folder name")
    sample_every_n_epochs: int = opt(0, "sample images every N epochs (0: only teacher / before / after)", ge=0)
    sample_prompts: str | None = opt(None, "text file, one prompt a line")
    sample_sampler: str = opt("euler_a", "sampler of the sample images (sd-scripts names)", choices=tuple(SAMPLERS))
    sample_steps: int = opt(20, "sampling steps of the sample images", ge=1)


@options_group("network (LoRA)", "train a kohya LoRA instead of the full UNet", "network")
@dataclass(kw_only=True)
class NetworkOptions:
    network_module: str | None = opt(None, "networks.lora to train a kohya LoRA (lora_unet_* keys) instead of the "
                                     "full UNet")
    network_dim: int | None = opt(None, "LoRA rank", ge=1)
    network_alpha: float | None = opt(None, "LoRA alpha (scale alpha/dim)", gt=0)
    network_weights: str | None = opt(None, "start from this LoRA file")
    network_args: list[str] = opt([], "key=value LoRA options: conv_dim, conv_alpha, dropout, rank_dropout, "
                                  "module_dropout")
    network_train_unet_only: bool = opt(False, "LoRA on the UNet only (what this trainer does; the flag is "
                                        "accepted)")
    train_text_encoder: bool = opt(False, "refused: the text encoders stay frozen")


@options_group("surge", "teachers and the surge engine (DESIGN §3); TOML section [surge]",
               "teachers")
@dataclass(kw_only=True)
class TeacherOptions:
    teacher_model: str | None = opt(None, "teacher checkpoint (default: the student's base, for --teacher_lora)")
    teacher_lora: list[str] = opt([], "LoRA file[:multiplier] hooked into the teacher; repeatable", append=True)
    estimate: bool = opt(False, "print the memory plan (per component, built on the meta device: instant for full "
                         "SDXL) and exit", value_bool=True)
    estimate_device: str = opt("", "device memory to check the plan against, e.g. 24GB (the plan is printed at "
                               "the start of every run)")


@options_group("surge", "teachers and the surge engine (DESIGN §3); TOML section [surge]",
               "surge", prefix="surge_")
@dataclass(kw_only=True)
class SurgeConfig:
    """The `[surge]` section (DESIGN §3): flag `--surge_<name>`, TOML `[surge] <name>`."""

    enabled: bool = opt(True, "false: plain kohya-style fine-tune (no teacher)", value_bool=True, dest="surge",
                        section="model")
    shock_rate: float = opt(5.0, "clamp of per-unit LR multipliers to [1/shock, shock]; ramp length in steps", ge=1)
    smooth_rate: float = opt(0.5641895835, "lerp rate of the multipliers toward their targets at each update "
                             "(1/√π)", gt=0, le=1)
    max_hops: int = opt(4, "reach of anchor units along the UNet graph", ge=0)
    anchor_grasp: int = opt(3, "nearest anchors a unit follows", ge=1)
    pre_change_layers: int = opt(0, "replay: upstream units re-run with the student before the replayed unit", ge=0)
    post_change_layers: int = opt(2, "replay: downstream units whose error must not grow for a change to be kept",
                                  ge=0)
    num_seeds: int = opt(3, "noise seeds per probe (K)", ge=1)
    probes: int = opt(8, "captions used as probes", ge=1)
    flavor_resolution: int = opt(0, "pool flavors to this size (0: full size)", ge=0, note="(0: full size)")
    flavor_cache_dir: str | None = opt(None, "where the teacher's flavors are cached (default "
                                       "<output_dir>/flavor_cache)")
    replay_steps: int = opt(50, "optimizer steps of each replay", ge=0)
    replay_units: int = opt(2, "replay_mode single: how many of the worst units to replay", ge=0)
    replay_epochs: int = opt(0, "replay (and unit LERP) at the starts of the first N epochs only; later epoch "
                             "starts re-measure and move the LRs without it (0: every epoch)", ge=0,
                             note="(0: every epoch)")
    replay_batch: int = opt(0, "replay_mode all: flavor samples per replay step, taken in turn from each cached "
                            "batch (a smaller batch makes a step cheaper; 0: the whole batch)", ge=0,
                            note="(0: the whole batch)")
    replay_mode: str = opt("single", "single: the worst replay_units units one at a time; all: every unit at "
                           "once, teacher-forced", choices=("single", "all"))
    lerp_alpha: float = opt(0.0, "unit LERP θ ← θ + α(θ_T − θ) toward a same-architecture teacher (plain "
                            "checkpoint, full fine-tune), at every epoch start, each unit kept only if its "
                            "downstream error does not grow (0: off)", ge=0, le=1)
    lerp_first: bool = opt(False, "unit LERP before replay instead of after it; with lerp_alpha = 1 the units whose "
                           "LERP is kept (now the teacher's weights) are left out of the replay", value_bool=True)
    teacher: str = opt("live", "live: run the teacher every step; cached: its answers for K draws per image "
                       "computed once, up front", choices=("live", "cached"))
    teacher_placement: str = opt("gpu", "where the frozen teacher UNet lives: gpu (the training device) or cpu (CPU "
                                 "RAM, each block streamed to the device only while it runs: the device holds one "
                                 "block of it)", choices=PLACEMENTS)
    teacher_dtype: str = opt("float", "how the frozen teacher UNet is stored: float (fp32), fp16/bf16 (half the "
                             "memory; computed in that dtype), fp8 (e4m3 weights, a quarter; each layer is widened "
                             "to bf16 only while it runs)", choices=("float", "fp16", "bf16", "fp8"))
    target_draws: int = opt(1, "cached teacher: (timestep, noise) draws per image; epoch e trains on draw e mod K",
                            ge=1)
    target_fill: str = opt("upfront", "cached teacher: upfront (every draw computed before the first step; the "
                           "teacher leaves the device while training) or first_use (a draw is computed the first "
                           "time a step trains it, in the same batches as upfront, so the same values; nothing "
                           "waits up front, the teacher stays on the device until the last draw is in; in memory "
                           "only)", choices=("upfront", "first_use"))
    target_cache_dir: str | None = opt(None, "cached teacher: keep the targets on disk in this folder as "
                                       "checksummed safetensors shards, read back memory-mapped; an interrupted "
                                       "capture resumes, and later runs reuse them while teacher, data and seed "
                                       "match (unset: in memory)")
    cache_budget: str = opt("0", "cached teacher: refuse a target cache larger than this (e.g. 8GB, 512MB; 0: no "
                            "limit)")
    replay_lr: float | None = opt(None, "LR of replay (default learning_rate × 0.1)", gt=0)
    traj_weight: float = opt(0.5, "weight of the v-style trajectory loss on hidden units", ge=0)
    w_task: float = opt(1.0, "weight of the denoising (task) loss", ge=0)
    w_out: float = opt(1.0, "weight of output KD: MSE(student prediction, teacher prediction)", ge=0)
    unit_map: str = opt("mbw", "mbw (IN00…M00…OUT08) or fine (every ResBlock / transformer block)",
                        choices=UNIT_MAPS)
    feature_weight: float = opt(0.0, "BK-SDM-style feature KD weight (baselines)", ge=0)
    controller: bool = opt(True, "false: no per-unit LRs (output-KD baselines)", value_bool=True)
    random_lr: bool = opt(False, "ablation: random per-unit multipliers", value_bool=True)
    keep_mean_lr: bool = opt(False, "rescale the per-unit targets to mean 1: redistribute LR between units instead "
                             "of lowering it", value_bool=True)
    lr_rule: str = opt("anchored", "units with no anchor in reach: keep 1.0 (anchored, DESIGN) or their own "
                       "measured ratio (measured)", choices=tuple(LR_RULES))
    update_every_n_steps: int = opt(0, "also re-measure the student on the probes and move the per-unit LRs every "
                                    "N steps (0: per epoch)", ge=0, note="(0: once per epoch)")
    eval_every_n_steps: int = opt(0, "held-out teacher-matching MSE every N steps", ge=0)
    target_teacher_mse: float = opt(0.0, "stop once the held-out MSE is at most this", ge=0)
    teachers: list = opt([], "teacher experts, one per [[surge.teachers]] table (TOML only)", cli=False)


@options_group("config files", "TOML in and out", "files")
@dataclass(kw_only=True)
class FileOptions:
    config_file: str | None = opt(None, "TOML with the arguments (sections flattened one level)", toml=False)
    output_config: bool = opt(False, "write the merged config to the --config_file path and exit", toml=False)


@dataclass(kw_only=True)
class TrainConfig(ModelOptions, BucketOptions, SubsetOptions, DataOptions, SavingOptions, TrainingOptions,
                  LoggingOptions, NetworkOptions, TeacherOptions, FileOptions):
    """Every training argument, typed. Attribute names are sd-scripts' flag names."""

    surge: SurgeConfig = field(default_factory=SurgeConfig)
    ignored: dict[str, Any] = field(default_factory=dict)  # sd-scripts keys accepted but not used


def all_options() -> list[Declared]:
    """Every option of the trainer, grouped in --help order (TrainConfig's own, then [surge]'s)."""
    every = list(declared(TrainConfig)) + list(declared(SurgeConfig))
    groups = list(GROUPS)
    return sorted(every, key=lambda d: (groups.index(d.option.group), d.option.order))


SURGE_KEYS = tuple(d.attr for d in declared(SurgeConfig) if d.attr != "enabled")
