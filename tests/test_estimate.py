"""--estimate: a memory plan from configs alone (meta device), for full-size SDXL in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd_scripts_surge.config import parse_train_args
from sd_scripts_surge.models.configs import standard_configs
from sd_scripts_surge.training.estimate import GIB, estimate, optimizer_state_bytes


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """A diffusers folder holding only the configs of SDXL base (no weights: the estimate never reads them)."""
    root = tmp_path_factory.mktemp("sdxl")
    configs = standard_configs("sdxl")
    for sub, config in (("unet", configs.unet), ("vae", configs.vae)):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(config))
    return root


def plan_for(folder: Path, *flags: str):
    cfg = parse_train_args(["--resolution", "1024", "--train_batch_size", "1", *flags])
    return estimate(cfg, folder, resolution=(1024, 1024))


def parts(plan) -> dict[str, int]:
    return {p.name: p.bytes for p in plan.parts}


def test_full_sdxl_parameter_count_and_optimizer_state(sdxl_folder):
    plan = plan_for(sdxl_folder, "--optimizer_type", "AdamW")
    p = parts(plan)
    n = 2_567_463_684  # SDXL base UNet parameters
    assert p["student UNet (trained)"] == n * 4 and p["gradients"] == n * 4
    assert p["optimizer state"] == n * 8  # AdamW: two fp32 moments
    assert p["teacher UNet"] == n * 4
    shapes = [torch.empty(6, 4, device="meta"), torch.empty(5, device="meta")]
    assert optimizer_state_bytes("ADA_SURGE", shapes, []) == (6 + 4 + 5) * 4  # rows + cols, full 1-D
    assert optimizer_state_bytes("ADA_SURGE", shapes, ["beta1=0.9", "state_dtype='fp64'"]) == (15 + 29) * 8
    assert optimizer_state_bytes("AdamW8bit", shapes, []) == 29 * 2


def test_teacher_storage_dtype(sdxl_folder):
    n = 2_567_463_684
    assert parts(plan_for(sdxl_folder, "--surge_teacher_dtype", "bf16"))["teacher UNet"] == n * 2
    fp8 = parts(plan_for(sdxl_folder, "--surge_teacher_dtype", "fp8"))["teacher UNet"]
    assert n < fp8 < 1.01 * n  # one byte per Linear/Conv weight, two for the few norms and biases


def test_targets_of_the_issue_fit_24gb_and_a_naive_config_does_not(sdxl_folder):
    naive = plan_for(sdxl_folder, "--optimizer_type", "AdamW")
    assert naive.fits(24 * GIB) == "does NOT fit"
    full = plan_for(sdxl_folder, "--optimizer_type", "ADA_SURGE", "--fused_backward_pass", "--full_bf16",
                    "--mixed_precision", "bf16", "--gradient_checkpointing", "--surge_teacher", "cached")
    assert full.total() + 0.5 * GIB <= 24 * GIB, full.table(24 * GIB)
    assert parts(full)["gradients"] < 0.1 * GIB  # fused: one tensor at a time (the largest, bf16)
    lora = plan_for(sdxl_folder, "--network_module", "networks.lora", "--network_dim", "16", "--mixed_precision",
                    "bf16", "--gradient_checkpointing", "--surge_teacher", "cached", "--optimizer_type", "ADA_SURGE")
    assert lora.fits(24 * GIB) != "does NOT fit", lora.table(24 * GIB)
    checkpointed = parts(plan_for(sdxl_folder, "--gradient_checkpointing"))["activations"]
    assert checkpointed < parts(naive)["activations"] / 4  # checkpointing keeps block inputs + one block


def test_estimate_flag_prints_the_plan_and_exits_before_loading(tiny_kit, tmp_path, capsys):  # noqa: F811
    from sd_scripts_surge.training.train import train
    from tests.train_helpers import write_config

    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=2)
    train(parse_train_args(["--config_file", str(cfg), "--estimate", "--estimate_device", "8GB"]))
    out = capsys.readouterr().out
    assert "memory plan (estimate)" in out and "→ fits" in out and "activations" in out
    assert not (tmp_path / "out" / "dev.safetensors").exists()


def test_single_file_configs_come_from_the_header(tiny_kit, tmp_path):  # noqa: F811
    """A single-file checkpoint: the configs are read from its header; the estimate matches the folder's."""
    from sd_scripts_surge.models.io import load_model, save_single_file
    from sd_scripts_surge.training.estimate import read_model_configs

    single = tmp_path / "tiny.safetensors"
    save_single_file(load_model(str(tiny_kit.base_dir)), single)
    from_file, from_folder = read_model_configs(single), read_model_configs(tiny_kit.base_dir)
    assert from_file.arch == from_folder.arch == "sdxl"
    cfg = parse_train_args(["--resolution", "64"])
    assert parts(estimate(cfg, single))["student UNet (trained)"] == \
        parts(estimate(cfg, tiny_kit.base_dir))["student UNet (trained)"]


from tests.tiny_fixtures import tiny_kit  # noqa: E402, F401
