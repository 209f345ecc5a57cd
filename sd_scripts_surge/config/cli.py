"""The command line: flags built from the schema, merged with `--config_file`, parsed once into a TrainConfig.

- Flags keep sd-scripts' names and meanings (`--pretrained_model_name_or_path`, `--optimizer_args k=v …`).
- Precedence: flags typed on the command line > the TOML > defaults. A step count typed on the command line
  beats epochs from the TOML, and a warning names both.
- `--output_config` writes the merged configuration as TOML to the `--config_file` path and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from typing import Any

from sd_scripts_surge.config.errors import ConfigError, parse_bool
from sd_scripts_surge.config.files import (
    coerce_file_values,
    is_ignored_key,
    read_config_file,
    suggest,
    toml_keys,
    warn_ignored_once,
    write_config_file,
)
from sd_scripts_surge.config.schema import GROUPS, Declared, TrainConfig, all_options
from sd_scripts_surge.config.values import to_train_config

logger = logging.getLogger(__name__)


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    """Every option with a flag, in sd-scripts' help groups, with its help text and default."""
    p = argparse.ArgumentParser(
        exit_on_error=exit_on_error,
        prog="train_surge_sdxl.py",
        description="Surge training for SDXL (kohya sd-scripts flags; see README).",
        allow_abbrev=False,  # an abbreviation would not count as "given on the command line" for precedence
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {title: p.add_argument_group(title, description) for title, description in GROUPS.items()}
    for d in all_options():
        if d.option.cli:
            groups[d.option.group].add_argument(f"--{d.dest}", **_argument(d))
    return p


def _argument(d: Declared) -> dict[str, Any]:
    if not d.option.help:
        raise AssertionError(f"--{d.dest} has no help text in the schema")  # a developer error, caught by tests
    kwargs: dict[str, Any] = {"dest": d.dest, "help": d.option.help.replace("%", "%%")}
    if d.type is bool and d.option.value_bool:  # --surge_controller false; a bare --estimate means true
        return {**kwargs, "type": parse_bool, "nargs": "?", "const": True, "default": d.default,
                "metavar": "true|false"}
    if d.type is bool:
        return {**kwargs, "action": "store_true"}
    if d.option.cli_type is not None:  # shown (and given to the GUI) as typed: resolution 1024,1024
        default = ",".join(map(str, d.default)) if isinstance(d.default, tuple | list) else d.default
        return {**kwargs, "type": d.option.cli_type, "default": default}
    if d.is_list:
        element = (typing.get_args(d.type) or (str,))[0]
        if d.option.append:
            return {**kwargs, "type": element, "action": "append"}  # default None: the schema's [] applies
        return {**kwargs, "type": element, "nargs": "*", "default": d.default}
    return {**kwargs, "type": d.type, "default": d.default, "choices": d.option.choices}


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
    raise ConfigError(f"command line: unknown flag {flags[0]}{suggest(name, valid)}; run with --help for the list")


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line (+ `--config_file`) once into a validated TrainConfig.

    `--output_config` writes the merged values to `--config_file` and raises SystemExit(0).
    """
    parser = build_parser(exit_on_error=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:  # a wrong value or choice: one line naming the flag, not the usage
        raise ConfigError(f"command line: key {(e.argument_name or '?').lstrip('-')!r}: {e.message}") from e
    if unknown:
        _reject_unknown_flags(unknown, parser)
    merged = vars(args).copy()
    explicit = _explicit_flags(argv, parser)
    ignored: dict[str, Any] = {}
    source = "command line"
    if args.config_file and not args.output_config:
        file_values, ignored = read_config_file(args.config_file, toml_keys())
        file_values = coerce_file_values(file_values, str(args.config_file))
        merged.update({k: v for k, v in file_values.items() if k not in explicit})
        source = str(args.config_file)
        if "max_train_steps" in explicit and file_values.get("max_train_epochs") and "max_train_epochs" not in explicit:
            # sd-scripts lets epochs override steps; a step count typed on the command line is the user's intent
            logger.warning("--max_train_steps %s on the command line overrides max_train_epochs = %s in %s",
                           merged["max_train_steps"], file_values["max_train_epochs"], source)
            merged["max_train_epochs"] = None
    if merged.get("max_train_epochs") and {"max_train_steps", "max_train_epochs"} <= explicit:
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
