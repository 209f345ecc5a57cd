"""CascadeLR (library/cascade_scheduler.py): equals diffusers' cosine-with-restarts at zero offsets; phases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

from library.cascade_scheduler import CascadeLR, cascade_factor


def make_optimizer(n_groups: int = 3, lrs: tuple[float, ...] = (1e-3, 2e-4, 5e-5)) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lrs[i % len(lrs)]} for i in range(n_groups)]
    return torch.optim.SGD(groups, lr=1.0)


def lrs_over(scheduler, optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup,total,cycles", [(0, 50, 1), (10, 100, 3), (7, 61, 4), (100, 100, 2)])
def test_zero_offsets_equal_diffusers_cosine_with_hard_restarts(warmup, total, cycles):
    opt_ref, opt_ours = make_optimizer(), make_optimizer()
    ref = get_cosine_with_hard_restarts_schedule_with_warmup(opt_ref, warmup, total, num_cycles=cycles)
    ours = CascadeLR(opt_ours, num_training_steps=total, warmup_steps=warmup, num_cycles=cycles)
    assert lrs_over(ours, opt_ours, total + 5) == lrs_over(ref, opt_ref, total + 5)  # exact, every step


def test_offsets_shift_the_phase_and_min_lr_ratio_floors():
    total, warmup, cycles, m = 44, 4, 2, 0.1
    opt = make_optimizer(2, (1.0,))
    sched = CascadeLR(opt, num_training_steps=total, warmup_steps=warmup, num_cycles=cycles, min_lr_ratio=m,
                      offsets=[0.0, 0.25])
    seen = lrs_over(sched, opt, total + 2)
    for s, (a, b) in enumerate(seen):
        if s < warmup:
            f0 = m + (1 - m) * 0.5 * (1 + math.cos(math.pi * 0.25))
            assert b == pytest.approx(s / warmup * f0)
            continue
        p = (s - warmup) / (total - warmup)
        if p >= 1:
            assert a == b == m
            continue
        assert a == pytest.approx(m + (1 - m) * 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1))))
        assert b == pytest.approx(m + (1 - m) * 0.5 * (1 + math.cos(math.pi * ((cycles * p + 0.25) % 1))))
        assert a >= m - 1e-12 and b >= m - 1e-12
    # the shifted group restarts earlier: at p = 0.375 its cycle position is 0.75 + 0.25 ≡ 0 → back to the top
    s = warmup + 15  # p = 15/40
    assert seen[s][1] == pytest.approx(1.0) and seen[s - 1][1] < m + 0.02
    assert seen[s][0] == pytest.approx(m + (1 - m) * 0.5 * (1 + math.cos(0.75 * math.pi)))


def test_offset_sources_priority_and_live_controller_updates():
    opt = make_optimizer(3, (1.0,))
    opt.param_groups[2]["depth"] = 10
    sched = CascadeLR(opt, num_training_steps=20, spread=0.05)
    assert [sched.group_offset(i) for i in range(3)] == pytest.approx([0.0, 0.05, 0.5])
    opt.param_groups[1]["cascade_offset"] = 1.3  # the controller writes this; taken mod 1, read at every step
    assert sched.group_offset(1) == pytest.approx(0.3)
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(cascade_factor(1, 0, 20, 1, 0.0, 0.3))
    explicit = CascadeLR(make_optimizer(3, (1.0,)), num_training_steps=20, offsets=[0.1, 0.2, 0.9], spread=0.5)
    assert [explicit.group_offset(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.9])


def test_state_dict_round_trip():
    def build():
        opt = make_optimizer()
        return opt, CascadeLR(opt, num_training_steps=60, warmup_steps=5, num_cycles=3, min_lr_ratio=0.05,
                              spread=0.1)

    opt, sched = build()
    lrs_over(sched, opt, 17)
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    tail = lrs_over(sched, opt, 30)
    opt2, sched2 = build()
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == 17 and sched2.spread == 0.1
    assert lrs_over(sched2, opt2, 30) == tail


def test_factor_edges_and_errors():
    assert cascade_factor(0, 0, 10, 1, 0.0, 0.0) == 1.0
    assert cascade_factor(10, 0, 10, 1, 0.2, 0.0) == 0.2
    assert cascade_factor(5, 10, 20, 1, 0.0, 0.0) == 0.5
    with pytest.raises(ValueError, match="num_training_steps"):
        CascadeLR(make_optimizer(), num_training_steps=0)
    with pytest.raises(ValueError, match="one per group"):
        CascadeLR(make_optimizer(3), num_training_steps=10, offsets=[0.0])
    with pytest.raises(ValueError, match="min_lr_ratio"):
        CascadeLR(make_optimizer(), num_training_steps=10, min_lr_ratio=2)
    assert CascadeLR(make_optimizer(), num_training_steps=10, num_warmup_steps=3).warmup_steps == 3
