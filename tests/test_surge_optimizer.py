"""AdaSurge (library/surge_optimizer.py): Adafactor equality, the surge-scale rule, standalone mode, numerics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.optimization import Adafactor

from library.surge_optimizer import (
    AdaSurge,
    advance_surge_scale,
    copy_stochastic_bf16,
    copy_stochastic_fp16,
    parse_state_dtype,
    standalone_targets,
    surge_step_rate,
)

SHAPES = [(7,), (5, 6), (4, 3, 3, 3), (3, 4, 5)]  # 1-D, 2-D, 4-D (conv), 3-D


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for s in steps:
        set_grads(params, s)
        opt.step()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


# relative_step, scale_parameter, warmup_init, beta1, weight_decay
CONFIGS = [
    (False, False, False, None, 0.0),
    (False, True, False, 0.9, 0.01),
    (False, False, False, 0.9, 0.1),
    (True, True, False, None, 0.0),
    (True, False, False, None, 0.01),
    (True, True, True, 0.9, 0.0),
    (True, False, True, None, 0.01),
]


@pytest.mark.parametrize("relative_step,scale_parameter,warmup_init,beta1,weight_decay", CONFIGS)
@pytest.mark.parametrize("standalone", [False, None])
def test_equals_transformers_adafactor_when_scales_are_one(relative_step, scale_parameter, warmup_init, beta1,
                                                            weight_decay, standalone):
    # standalone=None is automatic (on here: no "unit" groups); one group's standalone target is exactly 1.0
    ref_params, our_params = make_params(), make_params()
    kw = dict(relative_step=relative_step, scale_parameter=scale_parameter, warmup_init=warmup_init, beta1=beta1,
              weight_decay=weight_decay)
    lr = None if relative_step else 1e-2
    ref = Adafactor(ref_params, lr=lr, **kw)
    ours = AdaSurge(our_params, lr=lr, standalone=standalone, **kw)
    assert ours.standalone is (standalone is None)
    run(ref, ref_params, range(100))
    run(ours, our_params, range(100))
    for a, b, start in zip(our_params, ref_params, make_params()):
        assert not torch.equal(b, start)  # the reference moved
        assert rel_err(a, b) < 1e-6
        assert rel_err(a - start, b - start) < 1e-5  # the accumulated updates themselves agree
    assert ours.effective_scales() == [1.0]


@pytest.mark.parametrize("state_dtype", ["fp64", "fp32"])  # fp64 parameters always get fp64 state
def test_fp64_state_and_params_match_reference_in_fp64(state_dtype):
    ref_params, our_params = make_params(torch.float64), make_params(torch.float64)
    ref = Adafactor(ref_params, lr=1e-2, relative_step=False, scale_parameter=True, beta1=0.9)
    ours = AdaSurge(our_params, lr=1e-2, scale_parameter=True, beta1=0.9, state_dtype=state_dtype, standalone=False)
    run(ref, ref_params, range(50))
    run(ours, our_params, range(50))
    for a, b in zip(our_params, ref_params):
        assert rel_err(a, b) < 1e-13
    assert all(v.dtype == torch.float64 for st in ours.state.values() for v in st.values() if torch.is_tensor(v))


def test_fp64_state_with_fp32_params_keeps_fp64_state_and_stays_close():
    ref_params, our_params = make_params(), make_params()
    ref = Adafactor(ref_params, lr=1e-2, relative_step=False, scale_parameter=False)
    ours = AdaSurge(our_params, lr=1e-2, state_dtype=64, standalone=False)
    run(ref, ref_params, range(30))
    run(ours, our_params, range(30))
    for a, b in zip(our_params, ref_params):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < 1e-6
    rows = [st["exp_avg_sq_row"] for st in ours.state.values() if "exp_avg_sq_row" in st]
    assert rows and all(r.dtype == torch.float64 for r in rows)


# ------------------------------------------------------------------------------------- surge-scale rule


def test_step_rate_composes_to_one_smooth_rate_lerp():
    s, k = 0.5641895835, 5
    a = surge_step_rate(s, k)
    assert a == 1.0 - (1.0 - s) ** (1.0 / k)
    e, target = 1.0, 3.0
    for _ in range(k):
        e = advance_surge_scale(e, target, s, k)
    assert e == pytest.approx(1.0 + s * (target - 1.0), rel=1e-13)
    assert advance_surge_scale(2.5, 2.5, s, k) == 2.5  # at the target: unchanged, bit for bit
    assert advance_surge_scale(1.0, 0.2, 1.0, k) == 0.2  # smooth_rate 1 jumps


def test_optimizer_follows_the_scale_rule_exactly_and_scales_the_update():
    params = make_params()
    opt = AdaSurge(params, lr=1e-2, smooth_rate=0.5641895835, shock_rate=5, standalone=False)
    group = opt.param_groups[0]
    expected, targets = 1.0, [2.0, 2.0, 2.0, 0.5, 0.5, 1.0, 4.0]
    for i, t in enumerate(targets):
        group["surge_scale"] = t
        expected = expected + (1.0 - (1.0 - 0.5641895835) ** (1.0 / 5.0)) * (t - expected)
        set_grads(params, i)
        opt.step()
        assert group["surge_effective"] == expected  # exact: fp64 Python arithmetic, same formula


def test_scale_multiplies_the_first_update():
    base, scaled = make_params(), make_params()
    start = make_params()
    opt_a = AdaSurge(base, lr=1e-2, standalone=False)
    opt_b = AdaSurge(scaled, lr=1e-2, standalone=False, smooth_rate=1.0, surge_scale=3.0)
    run(opt_a, base, range(1))
    run(opt_b, scaled, range(1))
    assert opt_b.effective_scales() == [3.0]
    for a, b, s in zip(base, scaled, start):
        torch.testing.assert_close(b - s, 3.0 * (a - s), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ standalone


def test_standalone_targets_formula():
    ratios = [0.01, 0.04, None, 1.0]
    ref = math.exp((math.log(0.01) + math.log(0.04) + math.log(1.0)) / 3)
    out = standalone_targets(ratios, shock_rate=5)
    assert out[0] == pytest.approx(min(ref / 0.01, 5.0))
    assert out[1] == pytest.approx(ref / 0.04)
    assert out[2] == 1.0
    assert out[3] == pytest.approx(max(ref / 1.0, 0.2))
    assert standalone_targets([0.3], 5) == [1.0]
    assert standalone_targets([None, 0.0], 5) == [1.0, 1.0]
    assert standalone_targets([0.01, 1.0], [2, 50]) == pytest.approx([2.0, 0.1])  # per-group shock rates


def test_standalone_mode_sets_targets_from_update_to_weight_ratios():
    g = torch.Generator().manual_seed(3)
    small = torch.nn.Parameter(0.01 * torch.randn(8, 8, generator=g))
    large = torch.nn.Parameter(10.0 * torch.randn(8, 8, generator=g))
    opt = AdaSurge([{"params": [small]}, {"params": [large]}], lr=1e-3, shock_rate=5)
    assert opt.standalone
    for i in range(2):
        set_grads([small, large], i)
        opt.step()
    ratios = [grp["surge_ratio"] for grp in opt.param_groups]
    assert ratios[0] > ratios[1] > 0
    expected = standalone_targets(ratios, 5)
    set_grads([small, large], 2)
    opt.step()
    assert [grp["surge_scale"] for grp in opt.param_groups] == expected
    assert expected[0] == pytest.approx(1 / 5) and expected[1] == pytest.approx(5.0)  # clamped both ways
    assert opt.effective_scales()[0] < 1.0 < opt.effective_scales()[1]


def test_unit_groups_turn_standalone_off_automatically():
    opt = AdaSurge([{"params": make_params(), "unit": "down.0"}], lr=1e-3)
    assert not opt.standalone


# -------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_that_tensor_and_counts(bad_value):
    params = make_params()
    opt = AdaSurge(params, lr=1e-2, beta1=0.9, weight_decay=0.1)
    run(opt, params, range(3))
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state[params[1]])
    set_grads(params, 3)
    params[1].grad[0, 0] = bad_value
    opt.step()
    assert torch.equal(params[1], before[1])
    assert opt.state[params[1]]["step"] == state_before["step"]
    assert torch.equal(opt.state[params[1]]["exp_avg"], state_before["exp_avg"])
    assert all(not torch.equal(p, b) for i, (p, b) in enumerate(zip(params, before)) if i != 1)
    assert opt.skipped_steps == 1
    assert torch.isfinite(torch.cat([p.flatten() for p in params])).all()


@pytest.mark.parametrize("beta1,state_dtype,standalone", [(None, "fp32", False), (0.9, "fp64", True)])
def test_state_dict_round_trip_continues_bit_identically(beta1, state_dtype, standalone):
    def build(ps):
        return AdaSurge([{"params": ps[:2]}, {"params": ps[2:], "surge_scale": 2.0}], lr=1e-2, beta1=beta1,
                        scale_parameter=True, weight_decay=0.01, state_dtype=state_dtype, standalone=standalone)

    params = make_params()
    opt = build(params)
    run(opt, params, range(7))
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.step()
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, range(7, 20))

    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = build(resumed)
    opt2.load_state_dict(saved_opt)
    assert opt2.skipped_steps == 1
    run(opt2, resumed, range(7, 20))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    assert opt.effective_scales() == opt2.effective_scales()
    assert [g["surge_scale"] for g in opt.param_groups] == [g["surge_scale"] for g in opt2.param_groups]
    dt = parse_state_dtype(state_dtype)
    assert all(v.dtype == dt for st in opt2.state.values() for v in st.values() if torch.is_tensor(v))


def test_bf16_params_use_fp32_math():
    ref_params = make_params()
    bf = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in make_params()]
    ref_params = [torch.nn.Parameter(p.detach().to(torch.bfloat16).float()) for p in ref_params]
    opt_ref = AdaSurge(ref_params, lr=1e-2, standalone=False)
    opt_bf = AdaSurge(bf, lr=1e-2, standalone=False, stochastic_rounding=False)
    set_grads(ref_params, 0)
    for p, r in zip(bf, ref_params):
        p.grad = r.grad.to(torch.bfloat16)
        r.grad = p.grad.float()  # the same (bf16-representable) gradient for both
    opt_ref.step()
    opt_bf.step()
    for p, r in zip(bf, ref_params):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, r.detach().to(torch.bfloat16))  # fp32 result rounded once to nearest
    assert all(v.dtype == torch.float32 for st in opt_bf.state.values() for v in st.values() if torch.is_tensor(v))


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    torch.manual_seed(0)
    x = torch.full((20000,), 1.0 + 2 ** -10, dtype=torch.float32)  # 1/8 of the way between bf16 1.0 and 1.0078125
    out = torch.empty_like(x, dtype=torch.bfloat16)
    copy_stochastic_bf16(out, x)
    values = set(out.float().unique().tolist())
    assert values <= {1.0, 1.0078125} and len(values) == 2
    assert float(out.float().mean()) == pytest.approx(1.0 + 2 ** -10, abs=2e-4)
    exact = torch.tensor([1.5, -2.0, 0.0])
    copy_stochastic_bf16(out[:3], exact)
    assert torch.equal(out[:3].float(), exact)  # representable values stay exact


def test_parse_state_dtype_and_errors():
    assert parse_state_dtype("fp64") is torch.float64
    assert parse_state_dtype("'fp64'") is torch.float64
    assert parse_state_dtype(64) is torch.float64
    assert parse_state_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="state_dtype"):
        parse_state_dtype("bf16")
    with pytest.raises(ValueError, match="lr must be"):
        AdaSurge(make_params())
    with pytest.raises(ValueError, match="shock_rate"):
        AdaSurge(make_params(), lr=1e-3, shock_rate=0.5)


def test_fp16_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    torch.manual_seed(1)
    x = torch.full((20000,), -(3.0 + 0.3 * 2 ** -9), dtype=torch.float32)  # 0.3 of an fp16 ulp (2^-9 at 2..4)
    out = torch.empty_like(x, dtype=torch.float16)
    copy_stochastic_fp16(out, x)
    assert set(out.float().unique().tolist()) == {-3.0, -(3.0 + 2 ** -9)}
    assert float(out.float().mean()) == pytest.approx(float(x[0]), abs=3e-5)
    exact = torch.tensor([1.5, -2.0, 0.0, 65504.0])
    copy_stochastic_fp16(out[:4], exact)
    assert torch.equal(out[:4].float(), exact)


def test_half_params_train_with_stochastic_rounding():
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        params = make_params(dtype)
        opt = AdaSurge(params, lr=1e-2, beta1=0.9, standalone=False)
        start = [p.detach().clone() for p in params]
        run(opt, params, range(5))
        assert all(p.dtype == dtype and not torch.equal(p, s) for p, s in zip(params, start))
        assert all(torch.isfinite(p).all() for p in params)


# ------------------------------------------------------------------------------------ multi-tensor path


@pytest.mark.parametrize("relative_step,scale_parameter,warmup_init,beta1,weight_decay", CONFIGS)
@pytest.mark.parametrize("standalone,surge_scale", [(False, 2.5), (True, 1.0)])
def test_foreach_path_is_bitwise_the_per_tensor_path(relative_step, scale_parameter, warmup_init, beta1,
                                                     weight_decay, standalone, surge_scale):
    kw = dict(relative_step=relative_step, scale_parameter=scale_parameter, warmup_init=warmup_init, beta1=beta1,
              weight_decay=weight_decay, lr=None if relative_step else 1e-2, standalone=standalone,
              surge_scale=surge_scale, smooth_rate=1.0)
    fast, slow = make_params(), make_params()
    fast.append(torch.nn.Parameter(torch.ones(3, 2, dtype=torch.bfloat16)))  # takes the per-tensor path in both
    slow.append(torch.nn.Parameter(torch.ones(3, 2, dtype=torch.bfloat16)))
    opt_fast, opt_slow = AdaSurge(fast, foreach=True, **kw), AdaSurge(slow, foreach=False, **kw)
    torch.manual_seed(0)
    for s in range(8):
        set_grads(fast, s)
        set_grads(slow, s)
        if s == 3:  # one tensor skips a step: the tensors' step counts differ from then on
            fast[1].grad[0, 0] = float("nan")
            slow[1].grad[0, 0] = float("nan")
        torch.manual_seed(s)
        opt_fast.step()
        torch.manual_seed(s)
        opt_slow.step()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    assert opt_fast.param_groups[0]["surge_ratio"] == opt_slow.param_groups[0]["surge_ratio"]
    assert opt_fast.state[fast[1]]["step"] == 7 and opt_fast.state[fast[0]]["step"] == 8


# ------------------------------------------------------------------------------------------ fused backward


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_fused_backward_gives_the_weights_of_the_unfused_path(beta1):
    """--fused_backward_pass: updated per parameter during backward, gradients freed; identical weights after N
    steps (per-unit surge scales changing on the way), and no gradient left resident."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    nets = [net, copy.deepcopy(net)]

    def make(model):
        groups = [{"params": list(model[0].parameters()), "unit": "a"},
                  {"params": list(model[2].parameters()), "unit": "b"}]
        return AdaSurge(groups, lr=1e-2, beta1=beta1, weight_decay=0.01)

    plain, fused = make(nets[0]), make(nets[1])
    handles = fused.register_fused_backward()
    for step in range(6):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for opt in (plain, fused):
            for g, s in zip(opt.param_groups, (1.0 + 0.3 * step, 1.0 / (1 + step))):
                g["surge_scale"] = s
        plain.zero_grad()
        nets[0](x).square().mean().backward()
        plain.step()
        fused.begin_fused_step()
        nets[1](x).square().mean().backward()
        assert all(p.grad is None for p in nets[1].parameters())
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert plain.effective_scales() == fused.effective_scales()
    for h in handles:
        h.remove()
    with pytest.raises(RuntimeError, match="standalone=False"):
        AdaSurge(nets[1].parameters(), lr=1e-2).begin_fused_step()


# ------------------------------------------------------------------------------------ 8-bit first moment


BIG_SHAPES = [(64, 96), (5000,), (6, 5)]  # two quantized (≥ 4096 elements), one kept in full precision


def _big_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in BIG_SHAPES]


def _big_grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(2000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_moment_8bit_first_step_uses_the_full_moment_and_stores_its_blockwise_code():
    """Step 1: the weights equal the full-precision moment's bit for bit (the update uses the dequantized-and-
    updated m before it is requantized), and the stored code is bitsandbytes' blockwise code of that m."""
    bnb = pytest.importorskip("bitsandbytes.functional", reason="moment_8bit needs bitsandbytes")
    full, small = _big_params(), _big_params()
    opt_full = AdaSurge(full, lr=1e-2, beta1=0.9, standalone=False)
    opt_8 = AdaSurge(small, lr=1e-2, beta1=0.9, standalone=False, moment_8bit=True)
    _big_grads(full, 0)
    _big_grads(small, 0)
    opt_full.step()
    opt_8.step()
    for a, b in zip(full, small):
        assert torch.equal(a, b)
    code = bnb.create_dynamic_map(signed=True)
    for p_full, p_8 in zip(full, small):
        st_full, st_8 = opt_full.state[p_full], opt_8.state[p_8]
        if p_8.numel() < 4096:
            assert torch.equal(st_8["exp_avg"], st_full["exp_avg"])
            continue
        assert "exp_avg" not in st_8 and st_8["exp_avg_8bit"].dtype == torch.uint8
        want, qstate = bnb.quantize_blockwise(st_full["exp_avg"], code=code, blocksize=256)
        assert torch.equal(st_8["exp_avg_8bit"], want)
        assert torch.equal(st_8["exp_avg_absmax"], qstate.absmax)
        # 8 bits per element plus one fp32 absmax per block of 256
        assert st_8["exp_avg_absmax"].numel() == math.ceil(p_8.numel() / 256)


def test_moment_8bit_tracks_the_full_precision_moment_over_a_run():
    """A least-squares fit for 100 steps: the 8-bit moment's loss curve stays within 5 % of the full-precision
    run's at every checkpoint and its weights within 3 % (bitsandbytes' AdamW8bit vs AdamW differ as much)."""
    pytest.importorskip("bitsandbytes.functional", reason="moment_8bit needs bitsandbytes")
    g = torch.Generator().manual_seed(5)
    x, target_w = torch.randn(256, 96, generator=g), torch.randn(96, 64, generator=g)
    y = x @ target_w
    results = []
    for eight in (False, True):
        w = torch.nn.Parameter(torch.zeros(96, 64))
        opt = AdaSurge([w], lr=3e-2, beta1=0.9, standalone=False, moment_8bit=eight)
        curve = []
        for _ in range(100):
            opt.zero_grad()
            loss = (x @ w - y).square().mean()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        results.append((w.detach().clone(), curve))
    (w_full, curve_full), (w_8, curve_8) = results
    assert rel_err(w_8, w_full) < 3e-2
    for i in (20, 40, 60, 99):
        assert abs(curve_8[i] - curve_full[i]) / curve_full[i] < 5e-2
    assert curve_full[-1] < 1e-2 * curve_full[0]  # the fit moved: the comparison is not of two idle runs


def test_moment_8bit_foreach_equals_per_tensor_and_resumes_bit_identically():
    pytest.importorskip("bitsandbytes.functional", reason="moment_8bit needs bitsandbytes")

    def build(ps, foreach=True):
        return AdaSurge([{"params": ps[:1]}, {"params": ps[1:], "surge_scale": 2.0}], lr=1e-2, beta1=0.9,
                        weight_decay=0.01, standalone=False, smooth_rate=1.0, moment_8bit=True, foreach=foreach)

    fast, slow = _big_params(), _big_params()
    opt_fast, opt_slow = build(fast), build(slow, foreach=False)
    for s in range(5):
        for ps, opt in ((fast, opt_fast), (slow, opt_slow)):
            _big_grads(ps, s)
            opt.step()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)

    saved_opt = copy.deepcopy(opt_fast.state_dict())
    saved_params = [p.detach().clone() for p in fast]
    for s in range(5, 12):
        _big_grads(fast, s)
        opt_fast.step()
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = build(resumed)
    opt2.load_state_dict(saved_opt)
    st = opt2.state[resumed[0]]
    assert st["exp_avg_8bit"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
    for s in range(5, 12):
        _big_grads(resumed, s)
        opt2.step()
    for a, b in zip(fast, resumed):
        assert torch.equal(a, b)


def test_moment_8bit_errors(monkeypatch):
    with pytest.raises(ValueError, match="give beta1"):
        AdaSurge(_big_params(), lr=1e-2, moment_8bit=True)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        AdaSurge(_big_params(), lr=1e-2, beta1=0.9, moment_8bit=True)
