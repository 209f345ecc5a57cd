"""End to end: a BK-SDM-Small student learns from the full tiny teacher; --block_lr reaches the optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd_scripts_surge.config import parse_train_args
from sd_scripts_surge.models.io import load_model
from sd_scripts_surge.models.prune import prune_pipeline_folder
from sd_scripts_surge.training import optimization
from sd_scripts_surge.training.train import train
from tests.tiny_fixtures import tiny_kit  # noqa: F401
from tests.train_helpers import write_config


@pytest.mark.slow
def test_pruned_student_trains_against_deeper_teacher(tiny_kit, tmp_path: Path, capsys) -> None:  # noqa: F811
    student_dir = prune_pipeline_folder(tiny_kit.teacher_dir, tmp_path / "student", 1, True)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=2)
    final = train(parse_train_args(["--config_file", str(cfg), "--pretrained_model_name_or_path", str(student_dir),
                                    "--surge_eval_every_n_steps", "2"]))
    assert "aligned with the teacher's stage by stage" in capsys.readouterr().out
    trained = load_model(str(final), dtype=torch.float32).unet
    assert trained.config.layers_per_block == 1 and trained.mid_block is None
    history = json.loads((out / "report" / "history.json").read_text())
    assert history["epochs"][0]["multipliers"] and '"traj"' in json.dumps(history)
    first, last = history["eval"][0]["teacher_mse"], history["eval"][-1]["teacher_mse"]
    assert last < first, f"teacher-matching error did not fall ({first} -> {last})"


@pytest.mark.slow
def test_block_lr_sets_group_lrs_and_freezes(tiny_kit, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    seen: dict = {}
    real = optimization.build_optimizer

    def spy(cfg, groups):  # noqa: ANN001, ANN202
        seen["groups"] = groups
        return real(cfg, groups)

    monkeypatch.setattr(optimization, "build_optimizer", spy)
    lrs = [2e-4] * 23
    lrs[22] = 0.0  # freeze "out"
    lrs[10] = 5e-4
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=1, surge=False)
    final = train(parse_train_args(["--config_file", str(cfg), "--surge", "false", "--optimizer_type", "AdamW",
                                    "--optimizer_args", "weight_decay=0.0", "--lr_scheduler", "constant",
                                    "--block_lr", ",".join(map(str, lrs))]))
    groups = seen["groups"]
    assert all(g["unit"] != "out" for g in groups)
    assert {g["lr"] for g in groups if g.get("block") == 10} == {5e-4}
    trained = load_model(str(final), dtype=torch.float32).unet
    base = load_model(str(tiny_kit.base_dir), dtype=torch.float32).unet
    assert torch.equal(trained.conv_out.weight, base.conv_out.weight), "a block with LR 0 changed"
    assert not torch.equal(trained.conv_in.weight, base.conv_in.weight)
