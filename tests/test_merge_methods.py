"""Each merge method pinned to its formula (DESIGN §6) on small tensors worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merge_tools import methods
from merge_tools.methods import ChunkContext, della_drop_probability, get, topk_threshold, uniform_for


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_soup_and_weighted_sum() -> None:
    a, b = t(1, 2), t(3, 6)
    assert torch.equal(get("soup")([a, b]), t(2, 4))
    assert torch.equal(get("uniform_soup")([a, b, t(5, 10)]), t(3, 6))
    assert torch.allclose(get("weighted_sum")([a, b], weights=[0.25, 0.75]), t(2.5, 5.0))
    assert torch.allclose(get("weighted_pair")([a, b], alpha=0.25), t(1.5, 3.0))


def test_add_difference_and_task_arithmetic() -> None:
    a, b, c = t(1, 1), t(5, 2), t(3, 4)
    assert torch.equal(get("add_difference")([a, b, c], alpha=0.5), t(2, 0))
    base, m1, m2 = t(1, 1), t(2, 0), t(4, 1)
    # base + λ Σ τ_i = [1,1] + 0.5·([1,-1] + [3,0])
    assert torch.equal(get("task_arithmetic")([base, m1, m2], lam=0.5), t(3, 0.5))


def test_ties_trim_elect_disjoint_mean() -> None:
    base = t(0, 0, 0, 0)
    m1, m2 = t(3, -1, 0.5, 2), t(-2, -2, 1, 0.1)
    # k=0.5: thresholds are the 2nd smallest |τ|: 1 for both. Trimmed: [3,-1,0,2], [-2,-2,1,0]
    # γ = sgn Σ = [+,-,+,+]; agreeing means: 3, (-1-2)/2, 1, 2
    out = get("ties")([base, m1, m2], k=0.5, lam=1.0)
    assert torch.equal(out, t(3, -1.5, 1, 2))
    assert torch.equal(get("ties")([base + 1, m1 + 1, m2 + 1], k=0.5, lam=0.5), t(2.5, 0.25, 1.5, 2))


def test_ties_soup_votes_by_count_not_mass() -> None:
    base = t(0, 0)
    ms = [t(1, -1), t(2, -3), t(-5, 1)]
    # count vote: el0 two +, el1 two - → means 1.5 and -2; mass vote (TIES, k=1) picks -5 for el0
    assert torch.equal(get("ties_soup")([base, *ms]), t(1.5, -2))
    assert torch.equal(get("ties")([base, *ms], k=1.0), t(-5, -2))


def test_topk_threshold_convention() -> None:
    vals = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    # keep top 40%: m = floor(0.6·5) = 3 → 3rd smallest = 3 → keep {3,4,5}
    assert topk_threshold(vals.copy(), 0.4) == 3.0
    assert topk_threshold(vals.copy(), 1.0) == 1.0  # keep everything


def test_uniform_for_is_chunk_independent() -> None:
    n = methods.RNG_BLOCK * 2 + 123
    whole = uniform_for(ChunkContext("k", (n,), 0, n, seed=7), 1)
    cut = methods.RNG_BLOCK - 5
    parts = torch.cat(
        [uniform_for(ChunkContext("k", (n,), 0, cut, 7), 1), uniform_for(ChunkContext("k", (n,), cut, n, 7), 1)]
    )
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, uniform_for(ChunkContext("k", (n,), 0, n, seed=8), 1))
    assert not torch.equal(whole, uniform_for(ChunkContext("other", (n,), 0, n, seed=7), 1))
    assert not torch.equal(whole, uniform_for(ChunkContext("k", (n,), 0, n, seed=7), 2))


def _masks(key: str, n: int, seed: int, count: int) -> list[torch.Tensor]:
    return [uniform_for(ChunkContext(key, (n,), 0, n, seed), i) for i in range(count)]


def test_dare_keeps_with_prob_1_minus_p_and_rescales() -> None:
    n, p = 20000, 0.3
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    m1 = base + torch.randn(n, generator=g, dtype=torch.float64)
    out = get("dare")([base, m1], key="k", seed=3, p=p, lam=1.0)
    (u,) = _masks("k", n, 3, 1)
    expected = base + (m1 - base) * (u >= p) / (1 - p)
    assert torch.equal(out, expected)
    kept = float(((out - base).abs() > 0).double().mean())
    assert abs(kept - (1 - p)) < 0.02
    assert torch.equal(out, get("dare")([base, m1], key="k", seed=3, p=p))  # reproducible


def test_tsd_is_ties_soup_over_dare_with_lambda_1_minus_p() -> None:
    n, p = 1000, 0.1
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    ms = [base + torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3)]
    out = get("tsd")([base, *ms], key="w", seed=5, p=p)
    us = _masks("w", n, 5, 3)
    dropped = [(m - base) * (u >= p) / (1 - p) for m, u in zip(ms, us)]
    soup = get("ties_soup")([torch.zeros(n, dtype=torch.float64), *dropped])
    assert torch.allclose(out, base + soup * (1 - p), rtol=0, atol=1e-12)
    assert torch.equal(get("tsd")([base, *ms], key="w", seed=5, p=0.0), get("ties_soup")([base, *ms]))


def test_della_drop_probability_by_rank_in_row() -> None:
    row = t(0.1, -3, 2, 0.5).view(1, 4)
    # ascending |τ| ranks 1,4,3,2; centred r/4 − 5/8 → −0.375, 0.375, 0.125, −0.125
    prob = della_drop_probability(row, p=0.2, eps=0.1)
    assert torch.allclose(prob, t(0.1625, 0.2375, 0.2125, 0.1875).view(1, 4), atol=1e-15)
    # ε < 0 protects large magnitudes (DGMLA's setting)
    assert della_drop_probability(row, 0.2, -0.1)[0, 1] < della_drop_probability(row, 0.2, -0.1)[0, 0]


def test_della_formula() -> None:
    shape = (6, 5)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    ms = [base + torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    out = get("della")([base, *ms], key="d", seed=1, p=0.3, eps=-0.2, lam=0.7)
    n = base.numel()
    us = _masks("d", n, 1, 3)
    dropped = []
    for m, u in zip(ms, us):
        d = m - base
        prob = della_drop_probability(d, 0.3, -0.2).reshape(-1)
        dropped.append((d.reshape(-1) * (u >= prob) / (1 - prob)).view(shape))
    merged = get("ties")([torch.zeros(shape, dtype=torch.float64), *dropped], k=1.0)
    assert torch.allclose(out, base + 0.7 * merged, rtol=0, atol=1e-12)


def test_model_stock_per_tensor() -> None:
    base = t(0, 0)
    # orthogonal deltas: cos = 0 → t = 0 → base
    assert torch.equal(get("model_stock")([base, t(1, 0), t(0, 1)]), base)
    base = t(1, 1)
    m1, m2 = base + t(1, 0), base + t(1, 1)
    c = 1 / math.sqrt(2)
    tt = 2 * c / (1 + c)
    expected = tt * (m1 + m2) / 2 + (1 - tt) * base
    assert torch.allclose(get("model_stock")([base, m1, m2]), expected, rtol=0, atol=1e-15)


def test_model_stock_per_channel() -> None:
    base = torch.zeros(2, 2, dtype=torch.float64)
    m1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    m2 = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    out = get("model_stock")([base, m1, m2], per_channel=True)
    # row 0: cos 0 → t 0 → base; row 1: cos 1 → t = 2/2 = 1 → mean
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [1.5, 0.0]], dtype=torch.float64), atol=1e-15)


def naive_weiszfeld(points: list[torch.Tensor], eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-20):
    """Direct Weiszfeld over whole vectors (the loop of Pillutla's weiszfeld_list_of_array)."""
    w = torch.ones(len(points), dtype=torch.float64)

    def avg(weights: torch.Tensor) -> torch.Tensor:
        return sum(p * weights[i] for i, p in enumerate(points)) / weights.sum()

    median = avg(w)
    obj = torch.stack([torch.dist(p, median) for p in points]).mean()
    new_w = w
    for _ in range(maxiter):
        prev = obj
        denom = torch.stack([torch.dist(p, median) for p in points])
        new_w = w / denom.clamp(min=eps)
        median = avg(new_w)
        obj = torch.stack([torch.dist(p, median) for p in points]).mean()
        if abs(prev - obj) <= ftol * obj:
            break
    return avg(new_w)


def test_geometric_median_matches_weiszfeld() -> None:
    pts = [t(0, 0), t(4, 0), t(0, 3), t(10, 10)]
    out = get("geometric_median")(pts)
    assert torch.allclose(out, naive_weiszfeld(pts), rtol=0, atol=1e-9)
    # 1-D: the geometric median of 0, 1, 10 is the median 1
    assert abs(float(get("gm")([t(0.0), t(1.0), t(10.0)])) - 1.0) < 1e-4
    # robust to one outlier, unlike the mean
    assert float(out.norm()) < float((sum(pts) / 4).norm())


def test_tgmd_and_dgmla() -> None:
    base = t(1, 1, 1)
    ms = [base + t(1, -1, 2), base + t(2, 1, -1), base + t(-3, -2, 1)]
    deltas = [m - base for m in ms]
    # count vote: el0 (+,+,-) → +; el1 (-,+,-) → -; el2 (+,-,+) → +
    filtered = [
        d * torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1]][i], dtype=torch.float64) for i, d in enumerate(deltas)
    ]
    expected = base + naive_weiszfeld(filtered)
    # The median lands on a point here, where the engine's Gram-matrix distances (‖a‖²+‖b‖²−2a·b) lose about
    # √ε of precision to cancellation (≈1e-8 on some BLAS kernels); the direct loop does not.
    assert torch.allclose(get("tgmd")([base, *ms]), expected, rtol=0, atol=1e-6)
    assert torch.allclose(get("dgmla")([base, *ms], p=0.0, della_eps=0.0), expected, rtol=0, atol=1e-6)


def test_slerp() -> None:
    a, b = t(1, 0), t(0, 1)
    assert torch.allclose(get("slerp")([a, b], t=0.5), t(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-15)
    assert torch.allclose(get("slerp")([a, b], t=0.0), a, atol=1e-15)
    # (nearly) parallel vectors: LERP
    assert torch.allclose(get("slerp")([t(1, 0), t(2, 0)], t=0.25), t(1.25, 0), atol=1e-15)


def test_registry_errors_are_clear() -> None:
    with pytest.raises(KeyError, match="unknown merge method 'nope'"):
        get("nope")
    with pytest.raises(ValueError, match="no parameter"):
        get("ties")([t(0), t(1)], kk=0.3)
    with pytest.raises(ValueError, match="exactly 3 inputs"):
        get("add_difference")([t(0), t(1)])
    with pytest.raises(ValueError, match="at least"):
        get("ties")([t(0)])


def test_all_design_methods_registered() -> None:
    for name in [
        "weighted_sum",
        "soup",
        "add_difference",
        "task_arithmetic",
        "ties",
        "ties_soup",
        "dare",
        "tsd",
        "della",
        "model_stock",
        "geometric_median",
        "tgmd",
        "dgmla",
        "slerp",
    ]:
        assert get(name).name == name


def test_per_channel_model_stock_is_the_same_for_one_row_chunks() -> None:
    spec = get("model_stock")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 300, generator=g, dtype=torch.float64) for _ in range(4)]
    full = spec(xs, per_channel=True).reshape(-1)
    flat = [x.reshape(-1) for x in xs]
    for rows_per_chunk in (1, 3, 40):
        parts = []
        for r0 in range(0, 40, rows_per_chunk):
            s, e = r0 * 300, min(40, r0 + rows_per_chunk) * 300
            ctx = ChunkContext("k", (40, 300), s, e)
            parts.append(spec.apply([f[s:e] for f in flat], ctx, None, per_channel=True, cos_eps=1e-6))
        assert torch.equal(torch.cat(parts), full)
