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


def test_moment_8bit_state_estimate_equals_the_optimizers_state():
    """ADA_SURGE with moment_8bit: the estimate is the bytes the optimizer really holds after a step."""
    pytest.importorskip("bitsandbytes.functional", reason="moment_8bit needs bitsandbytes")
    from library.surge_optimizer import AdaSurge

    params = [torch.nn.Parameter(torch.zeros(100, 50)), torch.nn.Parameter(torch.zeros(5))]
    args = ["beta1=0.9", "moment_8bit=True"]
    opt = AdaSurge(params, lr=1e-3, beta1=0.9, moment_8bit=True, standalone=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    held = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    meta = [torch.empty(p.shape, device="meta") for p in params]
    assert optimizer_state_bytes("ADA_SURGE", meta, args) == held == (100 + 50 + 5) * 4 + 5000 + 20 * 4 + 5 * 4
    assert optimizer_state_bytes("ADA_SURGE", meta, args) < optimizer_state_bytes("ADA_SURGE", meta, args[:1])


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


def test_a_lora_students_shared_teacher_base_costs_nothing(sdxl_folder):
    lora = ["--network_module", "networks.lora", "--network_dim", "16", "--teacher_lora", "t.safetensors"]
    shared = parts(plan_for(sdxl_folder, *lora))
    copied = parts(plan_for(sdxl_folder, *lora, "--surge_teacher_dtype", "bf16"))
    own = parts(plan_for(sdxl_folder, *lora, "--teacher_model", "other.safetensors"))
    assert shared["teacher UNet"] == 0  # frozen_copy shares the frozen fp32 base
    assert copied["teacher UNet"] == shared["student UNet (frozen)"] // 2  # a bf16 copy
    assert own["teacher UNet"] == shared["student UNet (frozen)"]  # another checkpoint: a UNet of its own


def test_run_start_notes_a_large_full_size_flavor_cache_and_sizes_the_target_cache(sdxl_folder, tmp_path):
    from sd_scripts_surge.surge.teachers import TeacherSpec
    from sd_scripts_surge.training.inputs import Sources
    from sd_scripts_surge.training.train import memory_plan

    images = tmp_path / "data" / "5_thing"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"")  # counted from the folder, never opened by the plan
    sources = Sources(str(sdxl_folder), [TeacherSpec(path=None)], None, str(tmp_path / "data"))
    lines: list[str] = []
    cfg = parse_train_args(["--resolution", "1024", "--train_data_dir", str(tmp_path / "data"),
                            "--surge_teacher", "cached", "--surge_traj_weight", "0"])
    plan = memory_plan(cfg, sources, lines.append)
    assert any("full-size flavor cache will take about" in line for line in lines), lines
    target = next(p for p in plan.parts if p.name == "teacher target cache")
    assert target.where == "ram" and "15 entries" in target.note  # 3 images × 5 repeats × 1 draw
    assert target.bytes == 15 * 4 * 128 * 128 * 4  # the prediction only (no trajectory loss), fp32
    pooled: list[str] = []
    memory_plan(parse_train_args(["--resolution", "1024", "--train_data_dir", str(tmp_path / "data"),
                                  "--surge_flavor_resolution", "8"]), sources, pooled.append)
    assert not any("full-size flavor cache" in line for line in pooled)


def test_a_cpu_placed_teacher_costs_the_device_one_block(sdxl_folder):
    resident = plan_for(sdxl_folder, "--teacher_model", "t.safetensors", "--surge_teacher_dtype", "bf16")
    streamed = plan_for(sdxl_folder, "--teacher_model", "t.safetensors", "--surge_teacher_dtype", "bf16",
                        "--surge_teacher_placement", "cpu")
    teacher = next(p for p in streamed.parts if p.name == "teacher UNet")
    block = next(p for p in streamed.parts if p.name == "teacher block on the device")
    assert teacher.where == "ram" and teacher.bytes == parts(resident)["teacher UNet"]
    assert 0 < block.bytes < 0.03 * teacher.bytes  # SDXL's largest block (one transformer layer) is ~2 %
    assert streamed.total("device") < resident.total("device") - 4 * GIB


def test_epoch_start_replay_is_a_phase_of_its_own(sdxl_folder):
    """Replay state (gradient, AdamW moments, snapshot: 4 × the unit's bytes) and the teacher's flavors read into
    RAM are counted at epoch starts, instead of (not on top of) a step's gradients and activations."""
    flags = ("--optimizer_type", "ADA_SURGE", "--fused_backward_pass", "--full_bf16", "--mixed_precision", "bf16",
             "--gradient_checkpointing", "--surge_teacher", "cached")
    single = plan_for(sdxl_folder, *flags)
    every = plan_for(sdxl_folder, *flags, "--surge_replay_mode", "all")
    none = plan_for(sdxl_folder, *flags, "--surge_replay_units", "0")
    p_single, p_every = parts(single), parts(every)
    n = 2_567_463_684
    assert 0.1 * n * 8 < p_single["unit replay state"] < 0.2 * n * 8  # the largest unit (a 1280-wide level)
    assert 0.95 * n * 8 < p_every["unit replay state"] <= n * 8  # every unit but the embeddings, at once
    # one unit's window at a time (the unit and post_change_layers = 2 downstream) vs every unit's flavors
    assert p_every["flavors read for replay"] == p_every["flavor cache"]
    assert 0.02 * p_single["flavor cache"] < p_single["flavors read for replay"] < 0.4 * p_single["flavor cache"]
    assert "unit replay state" not in parts(none)
    resident = sum(p.bytes for p in single.parts if p.where == "device" and not p.phase)
    step = p_single["gradients"] + p_single["activations"]
    assert single.total() == resident + max(step, p_single["unit replay state"])
    assert none.total() == resident + step
    # all-unit replay of a full SDXL fine-tune needs ~19 GiB more at epoch starts: it does not fit 24 GB
    assert single.fits(24 * GIB) != "does NOT fit" and every.fits(24 * GIB) == "does NOT fit"
