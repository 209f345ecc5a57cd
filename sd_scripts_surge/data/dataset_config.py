"""kohya dataset configuration: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`, or the folder form.

- Values inherit general → dataset → subset as in sd-scripts (a subset key may be set at any of the three
  levels; the nearest wins). Command-line values (`--resolution`, `--caption_extension`, `--flip_aug`,
  `--caption_dropout_rate` …) are the defaults under `[general]`, as in sd-scripts: they reach every subset of
  the folder form, and a dataset TOML's own value wins over them.
- Everything is parsed once into typed dataclasses. An unknown key is an error naming the key, the table,
  the file and the closest valid name; a value of the wrong type or range is an error naming the key.
- sd-scripts keys this pipeline does not act on (token warm-up, face crop, alpha masks …) are accepted and kept
  in `extra`, so real kohya dataset TOMLs load.
- Folder form (`--train_data_dir` only): every `NN_name` subfolder is a subset with NN repeats and class
  tokens "name" (sd-scripts ignores, and we warn about, folders without the `NN_` prefix).
- A relative `image_dir` is taken as given (relative to the working directory, like sd-scripts) when it exists
  there, else relative to the TOML file's folder.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_scripts_surge.config import (
    BucketOptions,
    ConfigError,
    SubsetOptions,
    TrainConfig,
    check_options,
    load_toml,
    parse_resolution,
)
from sd_scripts_surge.config.schema import opt, toml_types

logger = logging.getLogger(__name__)

SUBSET_ACCEPTED_UNUSED = {"secondary_separator", "enable_wildcard",
                          "token_warmup_min", "token_warmup_step", "face_crop_aug_range", "alpha_mask", "cache_info",
                          "metadata_file", "conditioning_data_dir", "custom_attributes", "validation_seed",
                          "validation_split", "resize_interpolation"}
DATASET_ACCEPTED_UNUSED = {"network_multiplier", "debug_dataset", "qwen_image_edit_no_resize_control",
                           "validation_seed", "validation_split"}
FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")


@dataclass(kw_only=True)
class SubsetConfig(SubsetOptions):
    """One folder of images and how its captions are read: the shared subset options (also flags) plus the keys
    only a subset has."""

    image_dir: Path = opt(Path(), "folder with the images (required)")
    num_repeats: int = opt(1, "times each image is seen per epoch", ge=1)
    class_tokens: str | None = opt(None, "caption for images without a caption file")
    is_reg: bool = opt(False, "regularisation images (loss weighted by prior_loss_weight)")
    extra: dict[str, Any] = field(default_factory=dict)  # accepted sd-scripts keys this trainer does not use


@dataclass(kw_only=True)
class DatasetConfig(BucketOptions):
    """One `[[datasets]]` table: its subsets and bucket settings. resolution is (width, height)."""

    subsets: list[SubsetConfig]
    resolution: tuple[int, int] = opt((1024, 1024), "W,H or one number")
    batch_size: int = opt(1, "images per batch", ge=1)
    bucket_no_upscale: bool = opt(False, "keep small images at their size instead of upscaling them to a bucket")
    extra: dict[str, Any] = field(default_factory=dict)


# key -> expected TOML type(s), from the declarations (float keys accept integers)
SUBSET_SCHEMA = toml_types(SubsetConfig)
DATASET_SCHEMA = toml_types(DatasetConfig)
SUBSET_KEYS = set(SUBSET_SCHEMA) | SUBSET_ACCEPTED_UNUSED
DATASET_KEYS = set(DATASET_SCHEMA) | DATASET_ACCEPTED_UNUSED
GENERAL_KEYS = SUBSET_KEYS | DATASET_KEYS


def _check_keys(table: dict, allowed: set[str], where: str, path: Path | str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} in {where}{hint}")


def _check_types(values: dict[str, Any], schema: dict[str, tuple[type, ...]], where: str) -> None:
    for key, value in values.items():
        expected = schema.get(key)
        if expected is None:
            continue
        ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        if not ok:
            names = " or ".join("array" if t is list else t.__name__ for t in expected)
            raise ConfigError(f"{where}: key {key!r} must be {names}, got {value!r}")


def _resolve_dir(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return base_dir / path


def _subset(values: dict[str, Any], base_dir: Path, where: str) -> SubsetConfig:
    _check_types(values, SUBSET_SCHEMA, where)
    if not values.get("image_dir"):
        raise ConfigError(f"{where}: key 'image_dir' is required (the folder with the images)")
    kwargs = {k: v for k, v in values.items() if k in SUBSET_SCHEMA and k != "image_dir"}
    extra = {k: v for k, v in values.items() if k in SUBSET_ACCEPTED_UNUSED}
    subset = SubsetConfig(image_dir=_resolve_dir(values["image_dir"], base_dir), extra=extra, **kwargs)
    check_options(subset, where)
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        setattr(subset, key, float(getattr(subset, key)))
    if subset.caption_extension and not subset.caption_extension.startswith("."):
        subset.caption_extension = "." + subset.caption_extension  # sd-scripts accepts "txt" as well
    return subset


def _dataset(values: dict[str, Any], subsets: list[SubsetConfig], where: str) -> DatasetConfig:
    _check_types(values, DATASET_SCHEMA, where)
    kwargs = {k: v for k, v in values.items() if k in DATASET_SCHEMA}
    if "resolution" in kwargs:
        kwargs["resolution"] = parse_resolution(kwargs["resolution"], f"{where}: key 'resolution'")
    extra = {k: v for k, v in values.items() if k in DATASET_ACCEPTED_UNUSED}
    config = DatasetConfig(subsets=subsets, extra=extra, **kwargs)
    check_options(config, where)
    if config.min_bucket_reso > config.max_bucket_reso:
        raise ConfigError(f"{where}: key 'min_bucket_reso' ({config.min_bucket_reso}) must be ≤ "
                          f"max_bucket_reso ({config.max_bucket_reso})")
    if config.enable_bucket and min(config.resolution) < config.min_bucket_reso:
        raise ConfigError(f"{where}: key 'min_bucket_reso' ({config.min_bucket_reso}) is larger than the "
                          f"resolution {config.resolution}; lower it")
    return config


# Training arguments that are also dataset/subset keys: sd-scripts' config_util looks a key up in the subset,
# its dataset, [general] and then the command line, so these are defaults that any dataset TOML level overrides.
CLI_SUBSET_DEFAULTS = tuple(toml_types(SubsetOptions))
CLI_BUCKET_DEFAULTS = tuple(toml_types(BucketOptions))


def _cli_defaults(train: TrainConfig | None) -> dict[str, Any]:
    if train is None:
        return {}
    defaults = {"resolution": list(train.resolution), "batch_size": train.train_batch_size}
    defaults.update({key: getattr(train, key) for key in CLI_SUBSET_DEFAULTS + CLI_BUCKET_DEFAULTS})
    return defaults


def parse_dataset_tables(data: dict[str, Any], path: Path | str, base_dir: Path,
                         defaults: dict[str, Any] | None = None) -> list[DatasetConfig]:
    """Typed datasets from an already-read dataset TOML dict (`path` only names the source in errors)."""
    _check_keys(data, {"general", "datasets"}, "the top level", path)
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise ConfigError(f"{path}: [general] must be a table")
    _check_keys(general, GENERAL_KEYS, "[general]", path)
    tables = data.get("datasets", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[datasets]] table; add one with at least one [[datasets.subsets]]")
    datasets = []
    for i, table in enumerate(tables):
        where = f"{path} [[datasets]] #{i + 1}"
        _check_keys(table, DATASET_KEYS | SUBSET_KEYS | {"subsets"}, f"[[datasets]] #{i + 1}", path)
        inherited = {**(defaults or {}), **general, **{k: v for k, v in table.items() if k != "subsets"}}
        subsets = []
        for j, sub in enumerate(table.get("subsets", [])):
            _check_keys(sub, SUBSET_KEYS, f"[[datasets.subsets]] #{j + 1} of [[datasets]] #{i + 1}", path)
            merged = {k: v for k, v in {**inherited, **sub}.items() if k in SUBSET_KEYS}
            subsets.append(_subset(merged, base_dir, f"{where} subset #{j + 1}"))
        if not subsets:
            raise ConfigError(f"{where}: no [[datasets.subsets]]; add one with image_dir = \"...\"")
        datasets.append(_dataset({k: v for k, v in inherited.items() if k in DATASET_KEYS}, subsets, where))
    return datasets


def _folder_subsets(root: Path, values: dict, flag: str, is_reg: bool) -> list[SubsetConfig]:
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = FOLDER_PATTERN.match(folder.name)
        if not match:
            logger.warning("%s: ignoring folder %r (not named like '10_name', where 10 = repeats)", root, folder.name)
            continue
        subset_values = {k: v for k, v in values.items() if k in SUBSET_KEYS}
        subset_values.update(image_dir=str(folder), num_repeats=int(match.group(1)), class_tokens=match.group(2),
                             is_reg=is_reg)
        subsets.append(_subset(subset_values, root, str(folder)))
    if not subsets:
        raise ConfigError(f"{flag} {root}: no subfolders named like '10_name' (10 = repeats)")
    return subsets


def load_dataset_config(path: str | Path, train: TrainConfig | None = None) -> list[DatasetConfig]:
    """Parse a kohya dataset TOML. `train` supplies the defaults sd-scripts takes from the command line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--dataset_config {path}: file not found")
    return parse_dataset_tables(load_toml(path), path, path.parent, _cli_defaults(train))


def dataset_config_from_folder(train_data_dir: str | Path, train: TrainConfig | None = None,
                               reg_data_dir: str | Path | None = None, **overrides: Any) -> list[DatasetConfig]:
    """sd-scripts' folder form: every `NN_name` subfolder is a subset with NN repeats and class tokens "name".

    `reg_data_dir` adds its `NN_name` subfolders as regularisation subsets (is_reg). `overrides` are dataset or
    subset keys (e.g. resolution=64, bucket_reso_steps=16) on top of `train`'s.
    """
    root = Path(train_data_dir)
    if not root.is_dir():
        raise ConfigError(f"--train_data_dir {root}: folder not found")
    _check_keys(overrides, GENERAL_KEYS, "dataset_config_from_folder()", root)
    values = {**_cli_defaults(train), **overrides}
    subsets = _folder_subsets(root, values, "--train_data_dir", is_reg=False)
    if reg_data_dir is not None:
        reg_root = Path(reg_data_dir)
        if not reg_root.is_dir():
            raise ConfigError(f"--reg_data_dir {reg_root}: folder not found")
        subsets += _folder_subsets(reg_root, values, "--reg_data_dir", is_reg=True)
    return [_dataset({k: v for k, v in values.items() if k in DATASET_KEYS}, subsets, str(root))]
