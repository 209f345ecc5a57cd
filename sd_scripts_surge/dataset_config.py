"""kohya dataset configuration: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`, or the folder form.

Values inherit general → dataset → subset as in sd-scripts. Everything is parsed once into typed
dataclasses; an unknown key is an error naming the key, the file and the closest valid name.
Folder form: `train_data_dir/NN_name/` holds images with NN repeats and class tokens "name".
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import toml

from .config import ConfigError, TrainConfig

SUBSET_KEYS = {"image_dir", "num_repeats", "caption_extension", "shuffle_caption", "keep_tokens",
               "keep_tokens_separator", "class_tokens", "is_reg", "flip_aug", "color_aug", "random_crop",
               "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
               "caption_prefix", "caption_suffix", "secondary_separator", "enable_wildcard", "token_warmup_min",
               "token_warmup_step", "face_crop_aug_range", "alpha_mask", "cache_info", "metadata_file"}
DATASET_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale", "network_multiplier", "debug_dataset"}
GENERAL_KEYS = SUBSET_KEYS | DATASET_KEYS
FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")


@dataclass
class SubsetConfig:
    image_dir: Path
    num_repeats: int = 1
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    class_tokens: str | None = None
    is_reg: bool = False
    flip_aug: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # accepted sd-scripts keys this trainer does not use


@dataclass
class DatasetConfig:
    subsets: list[SubsetConfig]
    resolution: tuple[int, int] = (1024, 1024)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} in {where}{hint}")


def _resolution(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{where}: resolution must be an integer or [width, height], got {value!r}")


def _subset(values: dict[str, Any], base_dir: Path, where: str) -> SubsetConfig:
    known = {f.name for f in fields(SubsetConfig)} - {"extra"}
    if "image_dir" not in values:
        raise ConfigError(f"{where}: image_dir is required")
    image_dir = Path(values["image_dir"])
    if not image_dir.is_absolute():
        image_dir = base_dir / image_dir
    kwargs = {k: v for k, v in values.items() if k in known and k != "image_dir"}
    if "num_repeats" in kwargs and (not isinstance(kwargs["num_repeats"], int) or kwargs["num_repeats"] < 1):
        raise ConfigError(f"{where}: num_repeats must be an integer ≥ 1, got {kwargs['num_repeats']!r}")
    extra = {k: v for k, v in values.items() if k not in known}
    return SubsetConfig(image_dir=image_dir, extra=extra, **kwargs)


def _dataset(values: dict[str, Any], subsets: list[SubsetConfig], where: str) -> DatasetConfig:
    kwargs = {k: v for k, v in values.items() if k in {f.name for f in fields(DatasetConfig)} and k != "subsets"}
    if "resolution" in kwargs:
        kwargs["resolution"] = _resolution(kwargs["resolution"], where)
    config = DatasetConfig(subsets=subsets, **kwargs)
    if config.batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be ≥ 1")
    if config.enable_bucket and config.min_bucket_reso > config.max_bucket_reso:
        raise ConfigError(f"{where}: min_bucket_reso {config.min_bucket_reso} > max_bucket_reso "
                          f"{config.max_bucket_reso}")
    return config


def load_dataset_config(path: str | Path, train: TrainConfig | None = None) -> list[DatasetConfig]:
    """Parse a kohya dataset TOML. `train` supplies the defaults sd-scripts takes from the command line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--dataset_config {path}: file not found")
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except toml.TomlDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    _check_keys(data, {"general", "datasets"}, "the top level", path)
    general = data.get("general", {})
    _check_keys(general, GENERAL_KEYS, "[general]", path)
    defaults = _cli_defaults(train)
    datasets = []
    for i, ds in enumerate(data.get("datasets", [])):
        where = f"{path} [[datasets]] #{i + 1}"
        _check_keys(ds, DATASET_KEYS | SUBSET_KEYS | {"subsets"}, f"[[datasets]] #{i + 1}", path)
        inherited = {**defaults, **general, **{k: v for k, v in ds.items() if k != "subsets"}}
        subsets = []
        for j, sub in enumerate(ds.get("subsets", [])):
            _check_keys(sub, SUBSET_KEYS, f"[[datasets.subsets]] #{j + 1} of dataset #{i + 1}", path)
            merged = {k: v for k, v in {**inherited, **sub}.items() if k in SUBSET_KEYS}
            subsets.append(_subset(merged, path.parent, f"{where} subset #{j + 1}"))
        if not subsets:
            raise ConfigError(f"{where}: no [[datasets.subsets]]")
        datasets.append(_dataset({k: v for k, v in inherited.items() if k in DATASET_KEYS}, subsets, where))
    if not datasets:
        raise ConfigError(f"{path}: no [[datasets]] table")
    return datasets


def _cli_defaults(train: TrainConfig | None) -> dict[str, Any]:
    if train is None:
        return {}
    return {"resolution": list(train.resolution), "batch_size": train.train_batch_size,
            "enable_bucket": train.enable_bucket, "min_bucket_reso": train.min_bucket_reso,
            "max_bucket_reso": train.max_bucket_reso, "bucket_reso_steps": train.bucket_reso_steps,
            "caption_extension": train.caption_extension, "shuffle_caption": train.shuffle_caption,
            "keep_tokens": train.keep_tokens}


def dataset_config_from_folder(train_data_dir: str | Path, train: TrainConfig | None = None) -> list[DatasetConfig]:
    """sd-scripts' folder form: every `NN_name` subfolder is a subset with NN repeats and class tokens."""
    root = Path(train_data_dir)
    if not root.is_dir():
        raise ConfigError(f"--train_data_dir {root}: folder not found")
    defaults = _cli_defaults(train)
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = FOLDER_PATTERN.match(folder.name)
        if not match:
            continue  # sd-scripts ignores folders without the NN_ prefix too
        values = {k: v for k, v in defaults.items() if k in SUBSET_KEYS}
        values.update(image_dir=str(folder), num_repeats=int(match.group(1)), class_tokens=match.group(2))
        subsets.append(_subset(values, root, f"{folder}"))
    if not subsets:
        raise ConfigError(f"--train_data_dir {root}: no subfolders named like '10_name' (NN = repeats)")
    return [_dataset({k: v for k, v in defaults.items() if k in DATASET_KEYS}, subsets, str(root))]
