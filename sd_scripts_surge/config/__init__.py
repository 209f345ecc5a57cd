"""Training arguments in sd-scripts' language, declared once and parsed once into typed objects.

- `schema`: every option (type, default, range, choices, help, group) as a dataclass field: `TrainConfig`,
  `SurgeConfig`, and the subset/bucket options the dataset TOML shares.
- `cli`: the flags built from the schema and `parse_train_args` (command line + `--config_file`).
- `files`: the training TOML (read, checked, written) and the sd-scripts keys accepted but not used.
- `values`: composite values (resolution, block LRs, teacher tables), the schema's checks and the cross-option
  checks.
"""

from sd_scripts_surge.config.cli import build_parser, parse_train_args
from sd_scripts_surge.config.errors import ConfigError, parse_bool
from sd_scripts_surge.config.files import (
    IGNORED_PREFIXES,
    IGNORED_SD_SCRIPTS_KEYS,
    coerce_file_values,
    is_ignored_key,
    load_toml,
    read_config_file,
    toml_keys,
    warn_ignored_once,
    write_config_file,
)
from sd_scripts_surge.config.schema import (
    SDXL_BLOCK_LR_COUNT,
    SURGE_KEYS,
    UNIT_MAPS,
    BucketOptions,
    SubsetOptions,
    SurgeConfig,
    TrainConfig,
    all_options,
    declared,
)
from sd_scripts_surge.config.values import (
    check_options,
    flag_notes,
    parse_lora_arg,
    parse_resolution,
    to_train_config,
    validate,
    xformers_available,
)

__all__ = [
    "IGNORED_PREFIXES", "IGNORED_SD_SCRIPTS_KEYS", "SDXL_BLOCK_LR_COUNT", "SURGE_KEYS", "UNIT_MAPS", "BucketOptions",
    "ConfigError", "SubsetOptions", "SurgeConfig", "TrainConfig", "all_options", "build_parser", "check_options",
    "coerce_file_values", "declared", "flag_notes", "is_ignored_key", "load_toml", "parse_bool", "parse_lora_arg",
    "parse_resolution", "parse_train_args", "read_config_file", "to_train_config", "toml_keys", "validate",
    "warn_ignored_once", "write_config_file", "xformers_available",
]
