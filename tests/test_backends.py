"""What a sharding backend (FSDP, DeepSpeed) cannot do is refused before loading, with the way out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from sd_scripts_surge.config import ConfigError, parse_train_args
from sd_scripts_surge.training.train import check_backend

BASE = ["--pretrained_model_name_or_path", "x", "--teacher_model", "y"]


def zero(stage: int) -> SimpleNamespace:
    return SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))


def test_fused_backward_is_refused_under_sharding_backends() -> None:
    cfg = parse_train_args([*BASE, "--fused_backward_pass", "--optimizer_type", "ADA_SURGE",
                            "--surge_replay_units", "0"])
    for backend in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match="fused_backward_pass"):
            check_backend(cfg, backend, zero(2))
    check_backend(cfg, DistributedType.MULTI_GPU)
    check_backend(cfg, DistributedType.NO)


def test_replay_and_lerp_need_whole_units() -> None:
    replay = parse_train_args(BASE)  # default: 2 replayed units
    with pytest.raises(ConfigError, match="surge_replay_units = 0"):
        check_backend(replay, DistributedType.FSDP)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_backend(replay, DistributedType.DEEPSPEED, zero(3))
    check_backend(replay, DistributedType.DEEPSPEED, zero(2))  # ZeRO-2 keeps whole weights on every rank
    lerp = parse_train_args([*BASE, "--surge_replay_units", "0", "--surge_lerp_alpha", "0.5"])
    with pytest.raises(ConfigError, match="LERP"):
        check_backend(lerp, DistributedType.FSDP)
    check_backend(parse_train_args([*BASE, "--surge_replay_units", "0"]), DistributedType.FSDP)
    check_backend(parse_train_args([*BASE, "--surge", "false"]), DistributedType.FSDP)  # no surge, no replay
