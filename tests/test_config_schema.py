"""The schema is the one declaration: flags, TOML keys, defaults, ranges and the dataset TOML derive from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_scripts_surge.config import (
    ConfigError,
    SubsetOptions,
    SurgeConfig,
    TrainConfig,
    all_options,
    build_parser,
    parse_train_args,
    toml_keys,
)
from sd_scripts_surge.data.dataset_config import SUBSET_KEYS, SubsetConfig, load_dataset_config


def test_no_arguments_give_the_declared_defaults():
    parsed = parse_train_args([])
    assert parsed == TrainConfig()  # every flag's default is the dataclass default, surge section included
    assert parsed.surge == SurgeConfig()


def test_every_option_has_help_a_group_and_a_flag_or_toml_key():
    parser_dests = {a.dest for a in build_parser()._actions}
    keys = set(toml_keys())
    for d in all_options():
        assert d.option.help and d.option.group, d.dest
        assert (d.dest in parser_dests) == d.option.cli, d.dest
        assert (d.dest in keys) == d.option.toml, d.dest
    assert "surge_teachers" in keys and "surge_teachers" not in parser_dests  # TOML tables only
    assert "config_file" in parser_dests and "config_file" not in keys


def test_a_range_declared_once_is_checked_from_flags_toml_and_dataset_toml(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"'keep_tokens' must be ≥ 0 \(got -1\)"):
        parse_train_args(["--keep_tokens", "-1"])
    (tmp_path / "t.toml").write_text("[dataset]\nkeep_tokens = -1\n")
    with pytest.raises(ConfigError, match="t.toml: key 'keep_tokens' must be ≥ 0"):
        parse_train_args(["--config_file", str(tmp_path / "t.toml")])
    (tmp_path / "d.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nkeep_tokens = -1\n")
    with pytest.raises(ConfigError, match="subset #1: key 'keep_tokens' must be ≥ 0"):
        load_dataset_config(tmp_path / "d.toml")
    with pytest.raises(ConfigError, match=r"'surge_smooth_rate' must be in \(0, 1\]"):
        parse_train_args(["--surge_smooth_rate", "1.5"])
    with pytest.raises(ConfigError, match="'surge_replay_mode' must be one of"):
        (tmp_path / "s.toml").write_text("[surge]\nreplay_mode = 'most'\n")
        parse_train_args(["--config_file", str(tmp_path / "s.toml")])


def test_the_dataset_toml_shares_the_subset_options():
    shared = {d.dest for d in all_options() if d.owner is TrainConfig and d.attr in SubsetOptions.__dataclass_fields__}
    assert shared and shared <= SUBSET_KEYS  # every subset flag is a subset key, with the same default
    for name in shared:
        assert SubsetConfig.__dataclass_fields__[name] is SubsetOptions.__dataclass_fields__[name]
        assert TrainConfig.__dataclass_fields__[name] is SubsetOptions.__dataclass_fields__[name]


def test_surge_bool_flags_take_a_value_or_stand_alone():
    assert parse_train_args(["--surge_controller", "false"]).surge.controller is False
    assert parse_train_args(["--surge_keep_mean_lr"]).surge.keep_mean_lr is True
    with pytest.raises(ConfigError, match="'surge_controller'"):
        parse_train_args(["--surge_controller", "maybe"])


def test_builders_take_the_options_they_use_not_the_whole_config():
    """The setup pieces are typed with one option group (or plain values), so a builder's signature says what of
    the config it reads; only the loop (train.py) and whole-run records (metadata, estimate) see TrainConfig."""
    import inspect
    import typing

    from sd_scripts_surge.training import optimization, surge_setup, trainables

    checked = 0
    for module in (optimization, trainables, surge_setup):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__:
                continue
            hints = typing.get_type_hints(fn)
            assert TrainConfig not in hints.values(), f"{module.__name__}.{name} takes the whole TrainConfig"
            checked += 1
    assert checked >= 10


def test_docs_options_md_is_generated_from_the_schema():
    from sd_scripts_surge.config.reference import markdown

    path = Path(__file__).resolve().parents[1] / "docs" / "options.md"
    assert path.read_text(encoding="utf-8") == markdown(), \
        "docs/options.md is out of date: python -m sd_scripts_surge.config.reference > docs/options.md"
    assert "`--surge_target_cache_dir`<br>`[surge] target_cache_dir`" in markdown()
