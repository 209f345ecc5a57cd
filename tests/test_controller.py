"""Controller: target rule, ramp/lerp dynamics, parameter groups, applying to optimizers, exact resume."""

from __future__ import annotations

import pytest
import torch
from surge_helpers import restore_threads, tiny_teacher, use_one_thread

from sd_scripts_surge.surge.controller import (
    OTHER_GROUP,
    ControllerConfig,
    UnitLRController,
    build_unit_param_groups,
    cascade_offsets,
    nearest_anchors,
    target_multipliers,
)
from sd_scripts_surge.surge.units import HookPoint, UnitMap, UnitSpec, hop_distances, mbw_unit_map

setup_module, teardown_module = use_one_thread, restore_threads


def chain_map(n: int, skips=()) -> UnitMap:
    units = tuple(UnitSpec(f"u{i}", "x", (f"m{i}",), HookPoint(f"m{i}"), HookPoint(f"m{i}", "output"))
                  for i in range(n))
    return UnitMap("test", units, tuple(skips))


def test_nearest_anchors_sorted_and_limited():
    hops = hop_distances(chain_map(6))
    order = [f"u{i}" for i in range(6)]
    assert nearest_anchors("u2", ["u0", "u3", "u5"], hops, order, 2, 10) == [("u3", 1), ("u0", 2)]
    assert nearest_anchors("u2", ["u1", "u3"], hops, order, 1, 10) == [("u1", 1)]  # tie → unit order
    assert nearest_anchors("u0", ["u5"], hops, order, 3, 4) == []  # beyond max_hops


def test_target_rule_by_hand():
    unit_map = chain_map(5)
    hops = hop_distances(unit_map)
    d = {"u0": 0.0, "u1": 2.4, "u2": 3.0, "u3": 9.6, "u4": 0.0}  # mean 3
    cfg = ControllerConfig(shock_rate=2.0, smooth_rate=0.5, max_hops=2, anchor_grasp=1)
    targets = target_multipliers(d, anchors=["u0"], slow=["u2"], hops=hops, config=cfg)
    raw = {"u0": 0.5, "u1": 0.8, "u2": 1.0, "u3": 2.0}  # clamp(d/3, 1/2, 2)
    assert targets["u0"] == pytest.approx(raw["u0"])  # an anchor follows itself
    assert targets["u1"] == pytest.approx(0.5 * raw["u1"] + 0.5 * raw["u0"])  # pull 1/(1+1)
    assert targets["u2"] == pytest.approx((2 / 3 * raw["u2"] + 1 / 3 * raw["u0"]) * 0.5)  # pull 1/3, slow × 0.5
    assert targets["u3"] == 1.0 and targets["u4"] == 1.0  # 3 and 4 hops from the only anchor > max_hops
    assert target_multipliers(d, [], [], hops, cfg) == {u: 1.0 for u in d}


def test_measured_rule_gives_units_without_anchors_their_own_ratio():
    unit_map = chain_map(5)
    hops = hop_distances(unit_map)
    d = {"u0": 0.0, "u1": 2.4, "u2": 3.0, "u3": 9.6, "u4": 0.0}  # mean 3
    cfg = ControllerConfig(shock_rate=2.0, smooth_rate=0.5, max_hops=2, anchor_grasp=1, rule="measured")
    raw = {"u0": 0.5, "u1": 0.8, "u2": 1.0, "u3": 2.0, "u4": 0.5}  # clamp(d/3, 1/2, 2)
    # no anchors at all (the first update of a run): every unit follows its own measured ratio
    assert target_multipliers(d, [], [], hops, cfg) == pytest.approx(raw)
    targets = target_multipliers(d, ["u0"], ["u2"], hops, cfg)
    assert targets["u3"] == pytest.approx(raw["u3"]) and targets["u4"] == pytest.approx(raw["u4"])  # out of reach
    assert targets["u1"] == pytest.approx(0.5 * raw["u1"] + 0.5 * raw["u0"])  # within reach: the anchor rule
    with pytest.raises(ValueError, match="lr_rule"):
        ControllerConfig(rule="bogus")


def test_one_smoothing_rule_with_ada_surge():
    """The controller's ramp is the only smoothing: AdaSurge's effective scale is m(k) exactly, every step."""
    from library.surge_optimizer import AdaSurge

    unit_map = chain_map(3)
    cfg = ControllerConfig(shock_rate=4.0, smooth_rate=0.5641895835, max_hops=5, anchor_grasp=1, rule="measured")
    ctl = UnitLRController(unit_map, hop_distances(unit_map), cfg)
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(3)]
    opt = AdaSurge([{"params": [p], "unit": f"u{i}"} for i, p in enumerate(params)], lr=1e-2,
                   relative_step=False, scale_parameter=False, warmup_init=False)
    targets = ctl.update({"u0": 0.5, "u1": 1.0, "u2": 6.0}, anchors=[])
    assert len(set(targets.values())) == 3  # acts on the first update, before any anchor exists
    for k in range(7):
        ctl.apply(opt)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        for i, group in enumerate(opt.param_groups):
            u = f"u{i}"
            goal = 1.0 + cfg.smooth_rate * (targets[u] - 1.0)
            assert group["surge_effective"] == 1.0 + (goal - 1.0) * min(1.0, k / cfg.shock_rate)
        ctl.step()


def test_keep_mean_rescales_targets_to_mean_one():
    unit_map = chain_map(5)
    hops = hop_distances(unit_map)
    d = {"u0": 0.0, "u1": 2.4, "u2": 3.0, "u3": 9.6, "u4": 0.0}
    plain = target_multipliers(d, ["u0"], ["u2"], hops, ControllerConfig(shock_rate=2.0, smooth_rate=0.5,
                                                                         max_hops=2, anchor_grasp=1))
    kept = target_multipliers(d, ["u0"], ["u2"], hops, ControllerConfig(shock_rate=2.0, smooth_rate=0.5,
                                                                        max_hops=2, anchor_grasp=1, keep_mean=True))
    level = sum(plain.values()) / len(plain)
    assert level < 1.0  # the plain rule lowers the average LR here
    assert kept == pytest.approx({u: min(max(t / level, 0.5), 2.0) for u, t in plain.items()})
    assert sum(kept.values()) / len(kept) == pytest.approx(1.0)  # no clamp bites in this case


def test_grasp_uses_several_anchors():
    unit_map = chain_map(5)
    hops = hop_distances(unit_map)
    d = {"u0": 1.0, "u1": 1.0, "u2": 4.0, "u3": 1.0, "u4": 3.0}  # mean 2 → raw .5 .5 2 .5 1.5
    cfg = ControllerConfig(shock_rate=5.0, smooth_rate=0.5, max_hops=4, anchor_grasp=2)
    t = target_multipliers(d, anchors=["u0", "u3"], slow=[], hops=hops, config=cfg)
    # u2: nearest two anchors u3 (1 hop) and u0 (2 hops): pull = (1/2 + 1/3)/2, anchor level 0.5
    pull = (0.5 + 1 / 3) / 2
    assert t["u2"] == pytest.approx((1 - pull) * 2.0 + pull * 0.5)


def test_cascade_offsets():
    hops = hop_distances(chain_map(8))
    off = cascade_offsets([f"u{i}" for i in range(8)], ["u0"], hops, max_hops=2)
    assert off["u0"] == 0.0 and off["u1"] == pytest.approx(1 / 4) and off["u2"] == pytest.approx(2 / 4)
    assert off["u3"] == off["u7"] == pytest.approx(3 / 4)
    assert all(0 <= v < 1 for v in off.values())
    assert set(cascade_offsets(["u0"], [], hops, 2).values()) == {0.0}


def test_ramp_and_lerp_dynamics():
    unit_map = chain_map(3)
    cfg = ControllerConfig(shock_rate=4.0, smooth_rate=0.5, max_hops=5, anchor_grasp=1)
    ctl = UnitLRController(unit_map, hop_distances(unit_map), cfg)
    targets = ctl.update({"u0": 0.0, "u1": 1.0, "u2": 5.0}, anchors=["u0"])
    goal = {u: 1.0 + 0.5 * (targets[u] - 1.0) for u in targets}
    assert ctl.multipliers() == {u: 1.0 for u in targets}  # nothing moves before the first step
    for k in range(1, 7):
        ctl.step()
        frac = min(1.0, k / 4)
        for u, m in ctl.multipliers().items():
            assert m == pytest.approx(1.0 + (goal[u] - 1.0) * frac)
    # the next update lerps from the multiplier in force
    targets2 = ctl.update({"u0": 0.0, "u1": 1.0, "u2": 5.0}, anchors=["u0"])
    ctl.step()
    for u, m in ctl.multipliers().items():
        assert m == pytest.approx(goal[u] + (goal[u] + 0.5 * (targets2[u] - goal[u]) - goal[u]) / 4)


def test_param_groups_cover_each_trainable_parameter_once():
    unet = tiny_teacher(0)
    unit_map = mbw_unit_map(unet)
    unet.conv_in.bias.requires_grad_(False)
    extra = torch.nn.Linear(2, 2)  # e.g. a text-encoder LoRA: no UNet unit
    named = [*unet.named_parameters(), *(("lora_te1_x." + n, p) for n, p in extra.named_parameters())]
    groups = build_unit_param_groups(unet, unit_map, 1e-3, named_parameters=named)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for _, p in named if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    by_unit = {g["unit"]: g for g in groups}
    assert by_unit[OTHER_GROUP]["param_names"] == ["lora_te1_x.weight", "lora_te1_x.bias"]
    assert by_unit["IN00"]["param_names"] == ["conv_in.weight"]
    assert all(g["lr"] == 1e-3 for g in groups)
    torch.optim.AdamW(groups)  # any torch optimizer takes the groups as they are
    torch.optim.SGD(groups, lr=1.0)


def test_apply_to_plain_optimizer_with_scheduler_and_to_surge_groups():
    unit_map = chain_map(2)
    ctl = UnitLRController(unit_map, hop_distances(unit_map), ControllerConfig(shock_rate=1.0, smooth_rate=1.0))
    ctl.update({"u0": 0.0, "u1": 3.0}, anchors=["u0"])  # raw: u0 → 1/5 (clamped), u1 → 2
    ctl.step()
    m = ctl.multipliers()
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a], "unit": "u0", "lr": 0.1}, {"params": [b], "unit": "u1", "lr": 0.1},
                           {"params": [c], "lr": 0.1}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    ctl.apply(opt)
    ctl.apply(opt)  # re-applying does not compound
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * m["u0"])
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * m["u1"])
    assert opt.param_groups[2]["lr"] == 0.1 and "cascade_offset" not in opt.param_groups[2]
    assert opt.param_groups[0]["cascade_offset"] == 0.0 and 0 < opt.param_groups[1]["cascade_offset"] < 1
    opt.step()
    sched.step()  # the scheduler sets lr from initial_lr; the controller scales what it set
    ctl.apply(opt)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05 * m["u1"])
    # AdaSurge-style groups: the scale goes to surge_scale, lr stays
    surge = torch.optim.SGD([{"params": [a], "unit": "u1", "lr": 0.1, "surge_scale": 1.0}], lr=0.1)
    ctl.apply(surge)
    assert surge.param_groups[0]["surge_scale"] == pytest.approx(m["u1"]) and surge.param_groups[0]["lr"] == 0.1


def test_state_dict_resume_is_exact():
    unet = tiny_teacher(0)
    unit_map = mbw_unit_map(unet)
    hops = hop_distances(unit_map)
    d = {u: float(i % 5) / 3 for i, u in enumerate(unit_map.names)}
    a = UnitLRController(unit_map, hops, ControllerConfig(shock_rate=5.0))
    a.update(d, anchors=["IN01", "IN02"], slow=["OUT03"])
    for _ in range(2):
        a.step()
    state = a.state_dict()
    b = UnitLRController(unit_map, hops)
    b.load_state_dict(state)
    assert b.multipliers() == a.multipliers() and b.offsets == a.offsets and b.config == a.config
    for _ in range(4):
        a.step()
        b.step()
        assert a.multipliers() == b.multipliers()
    a.update(d, ["IN01"])
    b.update(d, ["IN01"])
    assert a.multipliers() == b.multipliers() and a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="different unit map"):
        UnitLRController(chain_map(2), hop_distances(chain_map(2))).load_state_dict(state)
    with pytest.raises(KeyError):
        a.update({"nope": 1.0}, [])
