"""Registration: AdaSurge / CascadeLR built the way unmodified sd-scripts builds them, and by our trainer's names.

`upstream_get_optimizer` / `upstream_get_scheduler` reproduce, without installing sd-scripts, the calling
convention of kohya-ss/sd-scripts library/train_util.py (commit 0005867b) for dotted paths:

* get_optimizer: each ``--optimizer_args`` item is ``key, value = arg.split("=")`` then
  ``value = ast.literal_eval(value)`` (no fallback); a type that matches none of the built-in names is used with
  its original case: ``values = optimizer_type.split(".")``, ``importlib.import_module(".".join(values[:-1]))``,
  ``getattr(module, values[-1])``, then ``optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)``; the
  name saved in metadata is ``optimizer_class.__module__ + "." + optimizer_class.__name__``.
* get_scheduler_fix: ``--lr_scheduler_args`` parsed the same way; with ``--lr_scheduler_type`` the class is
  imported the same way and called as ``lr_scheduler_class(optimizer, **lr_scheduler_kwargs)``, and a
  ``--lr_warmup_steps`` other than None/0 raises ValueError.
"""

from __future__ import annotations

import ast
import importlib
import math

import pytest
import torch
from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup, get_scheduler

from library.cascade_scheduler import CascadeLR
from library.surge_optimizer import AdaSurge
from sd_scripts_surge.training.optim_registry import create_optimizer, create_scheduler, parse_kv_args


def upstream_get_optimizer(optimizer_type: str, optimizer_args: list[str], learning_rate: float, trainable_params):
    optimizer_kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        optimizer_kwargs[key] = ast.literal_eval(value)
    values = optimizer_type.split(".")
    optimizer_module = importlib.import_module(".".join(values[:-1]))
    optimizer_class = getattr(optimizer_module, values[-1])
    optimizer = optimizer_class(trainable_params, lr=learning_rate, **optimizer_kwargs)
    optimizer_name = optimizer_class.__module__ + "." + optimizer_class.__name__
    return optimizer_name, optimizer


def upstream_get_scheduler(lr_scheduler_type: str, lr_scheduler_args: list[str], optimizer, lr_warmup_steps=None):
    lr_scheduler_kwargs = {}
    for arg in lr_scheduler_args:
        key, value = arg.split("=")
        lr_scheduler_kwargs[key] = ast.literal_eval(value)
    values = lr_scheduler_type.split(".")
    module = importlib.import_module(".".join(values[:-1]))
    scheduler = getattr(module, values[-1])(optimizer, **lr_scheduler_kwargs)
    if lr_warmup_steps is not None and lr_warmup_steps != 0:
        raise ValueError(f"{lr_scheduler_type} does not require `num_warmup_steps`. Set None or 0.")
    return scheduler


def sdxl_train_params():
    """sdxl_train.py hands the optimizer a list of {"params", "lr"} dicts (unet, text encoders)."""
    g = torch.Generator().manual_seed(0)
    unet = [torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]
    te = [torch.nn.Parameter(torch.randn(6, 5, generator=g))]
    return [{"params": unet, "lr": 1e-3}, {"params": te, "lr": 5e-4}]


def step_once(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()


def test_upstream_dotted_path_builds_adasurge_with_literal_args():
    params = sdxl_train_params()
    name, opt = upstream_get_optimizer(
        "library.surge_optimizer.AdaSurge",
        ["shock_rate=5", "state_dtype='fp64'", "beta1=0.9", "eps=(1e-30,1e-3)", "standalone=True",
         "weight_decay=0.01", "stochastic_rounding=False", "smooth_rate=0.5641895835"],
        1e-4, params)
    assert name == "library.surge_optimizer.AdaSurge" and isinstance(opt, AdaSurge)
    assert opt.state_dtype is torch.float64 and opt.standalone
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    g0 = opt.param_groups[0]
    assert g0["shock_rate"] == 5 and g0["beta1"] == 0.9 and g0["eps"] == (1e-30, 1e-3)
    step_once(opt)
    assert all(v.dtype == torch.float64 for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    # the unquoted forms: 64 is a literal; a bare word is not, and upstream has no fallback (so quote it)
    _, opt64 = upstream_get_optimizer("library.surge_optimizer.AdaSurge", ["state_dtype=64"], 1e-4,
                                      sdxl_train_params())
    assert opt64.state_dtype is torch.float64
    with pytest.raises(ValueError):
        upstream_get_optimizer("library.surge_optimizer.AdaSurge", ["state_dtype=fp64"], 1e-4, sdxl_train_params())


def test_upstream_dotted_path_builds_cascade_with_only_its_args():
    _, opt = upstream_get_optimizer("library.surge_optimizer.AdaSurge", [], 1e-3, sdxl_train_params())
    sched = upstream_get_scheduler(
        "library.cascade_scheduler.CascadeLR",
        ["num_training_steps=40", "warmup_steps=4", "num_cycles=2", "min_lr_ratio=0.1", "spread=0.25"], opt)
    assert isinstance(sched, CascadeLR)
    assert [sched.group_offset(i) for i in range(2)] == [0.0, 0.25]
    for _ in range(10):
        step_once(opt)
        sched.step()
    p = (10 - 4) / 36
    phase = (2 * p + 0.25) % 1
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * phase))))
    with pytest.raises(ValueError, match="num_warmup_steps"):
        upstream_get_scheduler("library.cascade_scheduler.CascadeLR", ["num_training_steps=40"], opt,
                               lr_warmup_steps=10)


# ---------------------------------------------------------------------------------------- our registry


@pytest.mark.parametrize("name", ["ADA_SURGE", "ada_surge", "AdaSurge", "adasurge"])
def test_ada_surge_names(name):
    opt = create_optimizer(name, sdxl_train_params(), 1e-4, ["state_dtype=fp64", "shock_rate=3"])
    assert isinstance(opt, AdaSurge) and opt.state_dtype is torch.float64
    assert opt.param_groups[0]["shock_rate"] == 3


def test_parse_kv_args_like_sd_scripts_plus_fallbacks():
    assert parse_kv_args(["a=5", "b='x'", "c=(1, 2)", "d=True", "e=fp64", "f=x=y"]) == {
        "a": 5, "b": "x", "c": (1, 2), "d": True, "e": "fp64", "f": "x=y"}
    assert parse_kv_args({"a": 1}) == {"a": 1}
    assert parse_kv_args(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_kv_args(["novalue"])


def test_builtin_optimizers():
    assert type(create_optimizer("AdamW", sdxl_train_params(), 1e-4, ["weight_decay=0.1"])) is torch.optim.AdamW
    assert type(create_optimizer(None, sdxl_train_params(), 1e-4)) is torch.optim.AdamW
    sgd = create_optimizer("SGDNesterov", sdxl_train_params(), 1e-2)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    assert type(create_optimizer("sgd", sdxl_train_params(), 1e-2)) is torch.optim.SGD
    assert type(create_optimizer("RAdam", sdxl_train_params(), 1e-3)) is torch.optim.RAdam  # torch.optim by name
    assert type(create_optimizer("torch.optim.Adam", sdxl_train_params(), 1e-3)) is torch.optim.Adam
    with pytest.raises(ValueError, match="unknown --optimizer_type 'NoSuchOpt'"):
        create_optimizer("NoSuchOpt", sdxl_train_params(), 1e-3)


def test_adamw8bit_and_lion_need_their_packages():
    for name, package in (("AdamW8bit", "bitsandbytes"), ("Lion", "lion_pytorch")):
        try:
            importlib.import_module(package)
        except ImportError:
            with pytest.raises(ImportError, match="pip install"):
                create_optimizer(name, sdxl_train_params(), 1e-4)
        else:
            assert create_optimizer(name, sdxl_train_params(), 1e-4) is not None


def test_kohya_adafactor_defaults_and_schedule():
    from transformers.optimization import Adafactor, AdafactorSchedule

    params = sdxl_train_params()
    opt = create_optimizer("Adafactor", params, 1e-4)
    assert isinstance(opt, Adafactor) and opt.param_groups[0]["relative_step"] and opt.param_groups[0]["lr"] is None
    sched = create_scheduler("constant_with_warmup", opt, 100)  # kohya switches to the adafactor schedule
    assert isinstance(sched, AdafactorSchedule)
    manual = create_optimizer("Adafactor", sdxl_train_params(), 1e-4,
                              ["relative_step=False", "scale_parameter=False", "warmup_init=False"])
    assert manual.param_groups[0]["lr"] == 1e-3  # group lrs kept
    with pytest.raises(ValueError, match="adafactor"):
        create_scheduler("adafactor", torch.optim.AdamW(sdxl_train_params()), 100)


@pytest.mark.parametrize("name,extra", [("constant", {}), ("constant_with_warmup", {}), ("linear", {}),
                                        ("cosine", {}), ("cosine_with_restarts", {"num_cycles": 3}),
                                        ("polynomial", {"power": 2.0})])
def test_kohya_scheduler_names_match_diffusers(name, extra):
    warmup = 0 if name == "constant" else 5
    ours_opt, ref_opt = torch.optim.SGD(sdxl_train_params()), torch.optim.SGD(sdxl_train_params())
    ours = create_scheduler(name, ours_opt, 50, num_warmup_steps=warmup, num_cycles=extra.get("num_cycles"),
                            power=extra.get("power"))
    ref = get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=50, **extra)
    for _ in range(55):
        assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()


def test_cascade_name_uses_trainer_counts_and_args():
    opt_a, opt_b = torch.optim.SGD(sdxl_train_params()), torch.optim.SGD(sdxl_train_params())
    sched = create_scheduler("cascade", opt_a, 60, num_warmup_steps=6, num_cycles=2)
    ref = get_cosine_with_hard_restarts_schedule_with_warmup(opt_b, 6, 60, num_cycles=2)
    assert isinstance(sched, CascadeLR) and (sched.num_training_steps, sched.warmup_steps) == (60, 6)
    for _ in range(62):
        assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
        opt_a.step(), opt_b.step(), sched.step(), ref.step()
    with_args = create_scheduler("Cascade", torch.optim.SGD(sdxl_train_params()), 60, 6, 2,
                                 scheduler_args=["min_lr_ratio=0.2", "spread=0.1"])
    assert with_args.min_lr_ratio == 0.2 and with_args.group_offset(1) == pytest.approx(0.1)


def test_scheduler_type_paths():
    opt = torch.optim.SGD(sdxl_train_params())
    cascade = create_scheduler("constant", opt, 80, num_warmup_steps=8, num_cycles=3,
                               scheduler_type="library.cascade_scheduler.CascadeLR",
                               scheduler_args=["min_lr_ratio=0.1"])
    got = (cascade.num_training_steps, cascade.warmup_steps, cascade.num_cycles, cascade.min_lr_ratio)
    assert got == (80, 8, 3, 0.1)
    step = create_scheduler("constant", torch.optim.SGD(sdxl_train_params()), 80, scheduler_type="StepLR",
                            scheduler_args=["step_size=10"])
    assert isinstance(step, torch.optim.lr_scheduler.StepLR)
    with pytest.raises(ValueError, match="lr_warmup_steps 0"):
        create_scheduler("constant", torch.optim.SGD(sdxl_train_params()), 80, num_warmup_steps=5,
                         scheduler_type="StepLR", scheduler_args=["step_size=10"])
    with pytest.raises(ValueError, match="unknown"):
        create_scheduler("cosine_wobble", torch.optim.SGD(sdxl_train_params()), 80)


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_bitsandbytes_8bit_optimizers_with_per_unit_groups(name):
    """kohya_ss's default optimizer family: per-unit param groups kept, 8-bit (uint8) state, the loss goes down."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements-dev.txt pins it)")
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64) for _ in range(2)]
    groups = [{"params": list(layer.parameters()), "unit": f"u{i}", "lr": 1e-2 * (i + 1)}
              for i, layer in enumerate(layers)]
    opt = create_optimizer(name, groups, 1e-2)
    assert [g["unit"] for g in opt.param_groups] == ["u0", "u1"] and opt.param_groups[1]["lr"] == 2e-2
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layers[1](layers[0](x)), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    state = opt.state[layers[0].weight]
    assert state["state1"].dtype == torch.uint8  # blockwise-quantized moment
