"""End to end: surge full fine-tune, plain fine-tune, diffusers output, a NaN loss skipped with LR back-off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd_scripts_surge.config import ConfigError, parse_train_args
from sd_scripts_surge.models.io import load_model
from sd_scripts_surge.training import optimization, surge_setup
from sd_scripts_surge.training.train import train
from tests.tiny_fixtures import tiny_kit  # noqa: F401
from tests.train_helpers import one_repeat_dataset, unet_tensors, write_config


@pytest.mark.slow
def test_surge_full_fine_tune_writes_checkpoint_report_and_history(tiny_kit, tmp_path: Path,  # noqa: F811
                                                                   capsys) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=3)
    final = train(parse_train_args(["--config_file", str(cfg)]))
    assert final == out / "dev.safetensors" and final.exists()
    keys = unet_tensors(final)
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys)

    trained = load_model(str(final), dtype=torch.float32)
    base = load_model(str(tiny_kit.base_dir), dtype=torch.float32)
    assert trained.arch == "sdxl"
    changed = [n for (n, a), (_, b) in zip(trained.unet.named_parameters(), base.unet.named_parameters())
               if not torch.equal(a, b)]
    assert changed, "training left every UNet weight as it was"

    assert (out / "report" / "report.html").exists()
    history = json.loads((out / "report" / "history.json").read_text())
    text = json.dumps(history)
    for term in ("task", "kd", "traj"):
        assert f'"{term}"' in text, f"loss term {term} missing from history.json"
    epochs = history["epochs"]
    assert len(epochs) == 1 and epochs[0]["multipliers"]

    # --estimate's flavor cache (probes × seeds × probe timesteps) is what was written, within 10 %
    from sd_scripts_surge.training.estimate import estimate

    run_cfg = parse_train_args(["--config_file", str(cfg)])
    width, height = 64, 64
    predicted = estimate(run_cfg, tiny_kit.base_dir, resolution=(height, width)).total("disk")
    written = sum(f.stat().st_size for f in (out / "flavor_cache").rglob("*.safetensors"))
    assert abs(written - predicted) < 0.1 * written, (written, predicted)

    # the run ends with its memory per phase beside the estimate
    out_text = capsys.readouterr().out
    for phase in ("load student", "teacher, flavor capture", "first optimizer step", "save", "measured peak"):
        assert phase in out_text, phase


@pytest.mark.slow
def test_plain_fine_tune_without_teacher_and_diffusers_output(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=2, surge=False)
    final = train(parse_train_args(["--config_file", str(cfg), "--surge", "false", "--save_model_as", "diffusers"]))
    assert final == out / "dev" and (final / "unet").is_dir()
    assert load_model(str(final), dtype=torch.float32).arch == "sdxl"
    history = json.loads((out / "report" / "history.json").read_text())
    assert '"kd"' not in json.dumps(history)


@pytest.mark.slow
def test_nan_loss_skips_step_and_backs_off_lr(tiny_kit, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: F811
    calls = {"loss": 0}
    captured: dict = {}
    real_build_loss, real_build_scheduler = surge_setup.build_loss, optimization.build_scheduler

    def nan_once_loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        loss_fn = real_build_loss(*args, **kwargs)

        def call(*a, **k):  # noqa: ANN002, ANN003, ANN202
            calls["loss"] += 1
            loss, terms = loss_fn(*a, **k)
            if calls["loss"] == 2:
                return loss * float("nan"), terms
            return loss, terms
        return call

    def keep_scheduler(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        captured["scheduler"] = real_build_scheduler(*args, **kwargs)
        captured["base_lrs"] = list(captured["scheduler"].base_lrs)
        return captured["scheduler"]

    monkeypatch.setattr(surge_setup, "build_loss", nan_once_loss)
    monkeypatch.setattr(optimization, "build_scheduler", keep_scheduler)
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=3, surge=False)
    final = train(parse_train_args(["--config_file", str(cfg), "--surge", "false"]))

    assert calls["loss"] == 4, "the skipped batch must not count as an optimizer step"
    assert "loss is NaN/Inf; step skipped" in capsys.readouterr().out
    assert captured["scheduler"].base_lrs == [lr * 0.5 for lr in captured["base_lrs"]]
    weights = unet_tensors(final)
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a run with another mixed_precision needs it reset (and after)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset() -> None:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    yield
    reset()


@pytest.mark.slow
def test_bf16_full_bf16_and_gradient_checkpointing_train_on_cpu(tiny_kit, tmp_path: Path, capsys,  # noqa: F811
                                                                 fresh_accelerate_state) -> None:
    """The mixed-precision path a GPU run takes (bf16 autocast, bf16 weights, checkpointing), here on the CPU."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=2)
    final = train(parse_train_args(["--config_file", str(cfg), "--mixed_precision", "bf16", "--full_bf16",
                                    "--gradient_checkpointing", "--save_precision", "bf16"]))
    assert "trained weights are kept in bf16" in capsys.readouterr().out
    tensors = unet_tensors(final)
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    trained = load_model(str(final), dtype=torch.float32).unet
    base = load_model(str(tiny_kit.base_dir), dtype=torch.float32).unet
    assert any(not torch.equal(a, b.to(torch.bfloat16).float())
               for a, b in zip(trained.parameters(), base.parameters())), "bf16 training changed nothing"
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())


@pytest.mark.slow
def test_effective_scale_follows_the_controller_ramp_from_the_first_step(tiny_kit, tmp_path: Path,  # noqa: F811
                                                                         monkeypatch) -> None:
    """Trainer level: with ADA_SURGE and lr_rule=measured, every unit group's effective scale after N steps is
    the controller's documented ramp m = 1 + (goal − 1)·min(1, (N−1)/shock_rate), goal = 1 + smooth·(target − 1)
    (the multiplier applied at the last step), and the controller moved the LRs in the first epoch already."""
    captured: dict = {}
    real_optimizer, real_controller = optimization.build_optimizer, surge_setup.build_controller

    def keep_optimizer(*args, **kwargs):
        captured["optimizer"] = real_optimizer(*args, **kwargs)
        return captured["optimizer"]

    def keep_controller(*args, **kwargs):
        captured["controller"] = real_controller(*args, **kwargs)
        return captured["controller"]

    monkeypatch.setattr(optimization, "build_optimizer", keep_optimizer)
    monkeypatch.setattr(surge_setup, "build_controller", keep_controller)
    steps = 3
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=steps)
    train(parse_train_args(["--config_file", str(cfg), "--surge_lr_rule", "measured", "--surge_replay_units", "0"]))
    controller, optimizer = captured["controller"], captured["optimizer"]
    c = controller.config
    frac = min(1.0, (steps - 1) / c.shock_rate)
    moved = 0
    for group in optimizer.param_groups:
        if "unit" not in group or group["unit"] not in controller.targets:
            continue
        goal = 1.0 + c.smooth_rate * (controller.targets[group["unit"]] - 1.0)
        assert group["surge_effective"] == pytest.approx(1.0 + (goal - 1.0) * frac, rel=0, abs=1e-15)
        moved += group["surge_effective"] != 1.0
    assert moved, "no unit's LR moved in the first epoch"


@pytest.mark.slow
def test_cached_teacher_trains_from_targets_and_refuses_varying_inputs(tiny_kit, tmp_path: Path, monkeypatch,  # noqa: F811
                                                                      capsys) -> None:
    """--surge_teacher cached: the teacher is answered up front (size/time printed), training never calls it, the
    run still distils; a dataset whose inputs change per epoch (flip_aug) is refused with the subset named."""
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=3)
    real_build = surge_setup.build_surge
    calls = {"during_training": 0, "training": False}

    def counting_build(*args, **kwargs):
        setup = real_build(*args, **kwargs)
        real_call = setup.teacher.unet_forward

        def counted(*a, **k):
            calls["during_training"] += calls["training"]
            return real_call(*a, **k)

        setup.teacher.unet_forward = counted
        return setup

    real_loss = surge_setup.build_loss

    def marking_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        real_call = loss.__call__

        class Marked:
            def __getattr__(self, name):
                return getattr(loss, name)

            def __call__(self, *a, **k):
                calls["training"] = True
                try:
                    return real_call(*a, **k)
                finally:
                    calls["training"] = False

        return Marked()

    monkeypatch.setattr(surge_setup, "build_surge", counting_build)
    monkeypatch.setattr(surge_setup, "build_loss", marking_loss)
    train(parse_train_args(["--config_file", str(cfg), "--surge_teacher", "cached", "--surge_target_draws", "2",
                            "--surge_replay_units", "0"]))
    out = capsys.readouterr()
    assert "teacher targets:" in out.out and "MiB" in out.out
    assert calls["during_training"] == 0, "the teacher ran inside the training loop"
    history = json.loads((tmp_path / "out" / "report" / "history.json").read_text())
    assert {"kd", "traj"} <= set(history["losses"]) and len(history["steps"]) == 3

    flip = tmp_path / "flip.toml"
    flip.write_text(Path(tiny_kit.dataset_toml).read_text().replace("[[datasets.subsets]]",
                                                                  "[[datasets.subsets]]\nflip_aug = true"))
    with pytest.raises(Exception, match="flip_aug"):
        train(parse_train_args(["--config_file", str(cfg), "--dataset_config", str(flip), "--surge_teacher", "cached",
                                "--output_dir", str(tmp_path / "out2")]))


@pytest.mark.slow
def test_disk_target_cache_trains_the_same_weights_and_is_reused(tiny_kit, tmp_path: Path, capsys) -> None:  # noqa: F811
    """--surge_target_cache_dir: the shards give the same training as the in-memory cache, and a second run with the
    same teacher, data and seed reuses every shard instead of running the teacher again."""
    finals = {}
    for name, extra in (("memory", []), ("disk", ["--surge_target_cache_dir", str(tmp_path / "targets")]),
                        ("again", ["--surge_target_cache_dir", str(tmp_path / "targets")])):
        cfg = write_config(tmp_path / f"{name}.toml", tiny_kit, tmp_path / name, steps=3)
        finals[name] = train(parse_train_args(["--config_file", str(cfg), "--surge_teacher", "cached",
                                               "--surge_replay_units", "0", *extra]))
        finals[name + "_log"] = capsys.readouterr().out
    assert "in memory" in finals["memory_log"]
    assert ", 0 reused)" in finals["disk_log"] and "(0 shards computed," in finals["again_log"]
    # --estimate's target cache (entries counted from the folders × draws) is what was written, within 10 %
    from sd_scripts_surge.training import inputs
    from sd_scripts_surge.training.train import memory_plan

    run_cfg = parse_train_args(["--config_file", str(tmp_path / "disk.toml"), "--surge_teacher", "cached",
                                "--surge_target_cache_dir", str(tmp_path / "targets")])
    plan = memory_plan(run_cfg, inputs.resolve_sources(run_cfg, lambda s: None), lambda s: None)
    predicted = sum(p.bytes for p in plan.parts if p.name == "teacher target cache")
    written = sum(f.stat().st_size for f in (tmp_path / "targets").glob("*.safetensors"))
    assert abs(written - predicted) < 0.1 * written, (written, predicted)
    weights = {k: unet_tensors(finals[k]) for k in ("memory", "disk", "again")}
    for key, value in weights["memory"].items():
        assert torch.equal(value, weights["disk"][key]) and torch.equal(value, weights["again"][key]), key


@pytest.mark.slow
def test_first_use_target_fill_trains_the_same_weights_as_upfront(tiny_kit, tmp_path: Path, capsys) -> None:  # noqa: F811
    """--surge_target_fill first_use: nothing is computed before the first step, each step's draw is filled from
    the build's own batches, and the run trains bitwise the weights of the up-front cache."""
    finals, logs = {}, {}
    for fill in ("upfront", "first_use"):
        cfg = write_config(tmp_path / f"{fill}.toml", tiny_kit, tmp_path / fill, steps=3)
        finals[fill] = train(parse_train_args(["--config_file", str(cfg), "--surge_teacher", "cached",
                                               "--surge_target_draws", "2", "--surge_target_fill", fill]))
        logs[fill] = capsys.readouterr().out
    assert "each computed the first time a step trains it" in logs["first_use"]
    assert "cached in memory" in logs["upfront"] and "cached in memory" not in logs["first_use"]
    weights = {k: unet_tensors(v) for k, v in finals.items()}
    for key, value in weights["upfront"].items():
        assert torch.equal(value, weights["first_use"][key]), key
    with pytest.raises(ConfigError, match="surge_target_fill"):
        parse_train_args(["--config_file", str(tmp_path / "upfront.toml"), "--surge_target_fill", "first_use"])


@pytest.mark.slow
def test_cpu_placed_teacher_trains_the_same_weights(tiny_kit, tmp_path: Path, capsys) -> None:  # noqa: F811
    """--surge_teacher_placement cpu streams the teacher's blocks (here CPU to CPU): same training, and it says so."""
    finals = {}
    for placement in ("gpu", "cpu"):
        cfg = write_config(tmp_path / f"{placement}.toml", tiny_kit, tmp_path / placement, steps=2)
        finals[placement] = train(parse_train_args(["--config_file", str(cfg), "--surge_teacher_placement", placement,
                                                    "--surge_replay_units", "0"]))
        out = capsys.readouterr().out
        assert ("blocks streamed to" in out) == (placement == "cpu")
    gpu, cpu = unet_tensors(finals["gpu"]), unet_tensors(finals["cpu"])
    assert gpu.keys() == cpu.keys() and all(torch.equal(gpu[k], cpu[k]) for k in gpu)


@pytest.mark.slow
def test_fused_backward_pass_trains_the_same_weights_as_the_unfused_path(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    finals = {}
    for fused in (False, True):
        out = tmp_path / ("fused" if fused else "plain")
        cfg = write_config(tmp_path / f"cfg{fused}.toml", tiny_kit, out, steps=3)
        argv = ["--config_file", str(cfg), "--max_grad_norm", "0", "--surge_replay_units", "0"]
        finals[fused] = train(parse_train_args(argv + (["--fused_backward_pass"] if fused else [])))
    plain, fused = unet_tensors(finals[False]), unet_tensors(finals[True])
    assert plain.keys() == fused.keys()
    assert all(torch.equal(plain[k], fused[k]) for k in plain)
    with pytest.raises(Exception, match="ADA_SURGE"):
        parse_train_args(["--fused_backward_pass", "--optimizer_type", "AdamW"])


@pytest.mark.slow
def test_unit_lerp_toward_a_same_architecture_teacher(tiny_kit, tmp_path: Path, capsys) -> None:  # noqa: F811
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=2)
    train(parse_train_args(["--config_file", str(cfg), "--surge_lerp_alpha", "0.5", "--surge_replay_units", "0"]))
    assert "unit LERP α=0.5 toward the teacher: kept" in capsys.readouterr().out
    history = json.loads((tmp_path / "out" / "report" / "history.json").read_text())
    lerps = [r for r in history["epochs"][0]["replay"] if r["mode"] == "lerp"]
    assert lerps and all((r["after"] <= r["before"]) == r["accepted"] for r in lerps)
    assert any(r["accepted"] for r in lerps)  # halfway toward the teacher helps some unit
    with pytest.raises(Exception, match="full fine-tune"):
        parse_train_args(["--surge_lerp_alpha", "0.5", "--network_module", "networks.lora"])


@pytest.mark.slow
def test_lerp_first_leaves_the_units_it_copied_out_of_the_replay(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    """--surge_lerp_first with α = 1: LERP runs before the all-unit replay, and the replay trains only the units
    whose copy of the teacher was not kept; without it replay comes first and covers every unit."""
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=1)
    modes = {}
    for first in (True, False):
        out = tmp_path / f"out-{first}"
        train(parse_train_args(["--config_file", str(cfg), "--output_dir", str(out), "--surge_lerp_alpha", "1",
                                "--surge_replay_mode", "all", "--surge_replay_units", "1", "--surge_replay_steps",
                                "2"] + (["--surge_lerp_first"] if first else [])))
        modes[first] = json.loads((out / "report" / "history.json").read_text())["epochs"][0]["replay"]
    first, after = modes[True], modes[False]
    n_lerp = sum(r["mode"] == "lerp" for r in first)
    assert [r["mode"] for r in first] == ["lerp"] * n_lerp + ["train_all"] * (len(first) - n_lerp)
    copied = {r["unit"] for r in first if r["mode"] == "lerp" and r["accepted"]}
    assert copied and not copied & {r["unit"] for r in first if r["mode"] == "train_all"}
    assert {r["unit"] for r in first if r["mode"] == "train_all"} | copied == {r["unit"] for r in after
                                                                            if r["mode"] == "train_all"} | copied
    assert after[0]["mode"] == "train_all" and after[-1]["mode"] == "lerp"
    with pytest.raises(Exception, match="surge_lerp_alpha > 0"):
        parse_train_args(["--surge_lerp_first"])


@pytest.mark.slow
def test_replay_epochs_limits_replay_and_lerp_to_the_first_epochs(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    """--surge_replay_epochs 1: epoch 0 starts with unit LERP, epoch 1 re-measures and moves the LRs without it."""
    dataset = one_repeat_dataset(tmp_path / "dataset.toml", tiny_kit)
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=11)
    train(parse_train_args(["--config_file", str(cfg), "--dataset_config", str(dataset), "--surge_lerp_alpha", "0.5",
                            "--surge_replay_units", "0", "--surge_replay_epochs", "1"]))
    epochs = json.loads((tmp_path / "out" / "report" / "history.json").read_text())["epochs"]
    assert len(epochs) == 2
    assert [r["mode"] for r in epochs[0]["replay"]] and all(r["mode"] == "lerp" for r in epochs[0]["replay"])
    assert epochs[1]["replay"] == [] and epochs[1]["multipliers"]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["bf16", "fp8"])
def test_teacher_stored_in_half_or_fp8_trains(tiny_kit, tmp_path: Path, capsys, storage: str) -> None:  # noqa: F811
    """--surge_teacher_dtype: a base + LoRA teacher (frozen_copy of the student, cast while copying) in bf16 or
    fp8 captures flavors, answers the cached targets and trains; the teacher never holds an fp32 UNet."""
    from tests.test_teachers import write_lora

    student = load_model(str(tiny_kit.base_dir))
    lora = write_lora(tmp_path / "teacher_lora.safetensors", student, seed=4, alpha=0.5)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=2, surge=False)
    seen: dict = {}
    import sd_scripts_surge.training.surge_setup as setup_mod

    real = setup_mod.build_surge

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        setup = real(*args, **kwargs)
        seen["dtypes"] = {p.dtype for p in setup.teacher.unet.parameters()}
        return setup

    setup_mod.build_surge = spy
    try:
        final = train(parse_train_args(["--config_file", str(cfg), "--surge", "true", "--teacher_lora", lora,
                                        "--surge_teacher", "cached", "--surge_teacher_dtype", storage]))
    finally:
        setup_mod.build_surge = real
    assert f"teacher UNet stored as {storage}" in capsys.readouterr().out
    assert torch.float32 not in seen["dtypes"]
    assert (torch.float8_e4m3fn in seen["dtypes"]) == (storage == "fp8")
    assert all(torch.isfinite(v.float()).all() for v in unet_tensors(final).values())
