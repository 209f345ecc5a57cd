"""Merge methods of the peer tools (mergekit, sd-mecha, supermerger), written as streaming method specs.

Each method is pinned by a test to its formula on hand-worked tensors (tests/test_merge_peer_methods.py)
and documented with its source in merge_tools/README.md. The code is ours; the definitions follow the
peers so that results agree where the definitions do (differences are named in the docstrings).

Conventions: x = the method's inputs as 1-D chunks in the compute dtype; τ_i = θ_i − θ_base for
"base+models" methods; "whole" methods get the whole tensor as one chunk (ctx.shape gives its shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

from merge_tools.methods import (
    ALPHA,
    DELLA_EPS,
    DROP_P,
    LAM,
    ChunkContext,
    ChunkSource,
    Param,
    _della_drop,
    _deltas,
    _disjoint_mean,
    _fill_copy,
    _fill_deltas,
    _sum,
    gram_matrix,
    merge_method,
)

_WHOLE = lambda p: frozenset({"whole"})  # noqa: E731
_TENSOR = lambda p: frozenset({"tensor"})  # noqa: E731


def _whole(x: Sequence[Tensor], ctx: ChunkContext) -> list[Tensor]:
    """The inputs reshaped to the tensor's shape (the engine gives "whole" methods one chunk per tensor)."""
    if ctx.start != 0 or ctx.stop != ctx.numel:
        raise RuntimeError(f"{ctx.key}: a whole-tensor method got a chunk [{ctx.start}, {ctx.stop})")
    return [t.view(ctx.shape) for t in x]


def _sorted_values_at(values: np.ndarray, positions: Sequence[int]) -> list[float]:
    """values sorted ascending, read at `positions` (out of range: +inf). Partitions `values` in place, O(n)."""
    ks = sorted({p for p in positions if 0 <= p < values.size})
    if ks:
        values.partition(ks)
    return [float(values[p]) if 0 <= p < values.size else math.inf for p in positions]


def _abs_delta_values(source: ChunkSource, ctx: ChunkContext, i: int) -> np.ndarray:
    """|τ_i| of the whole tensor in fp64 (the engine reserves this buffer for "select" methods)."""
    buf = np.empty(ctx.numel, dtype=np.float64)
    for c, (b, m) in source.chunks([0, i]):
        buf[c.start : c.stop] = torch.sub(m, b).abs_().to(torch.float64).numpy()
    return buf


# ------------------------------------------------------------------------------- mergekit: breadcrumbs


def breadcrumb_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n_top): drop the n_bot smallest and the n_top largest |τ| (mergekit's magnitude_outliers).

    target = ⌊density·n⌋ kept, n_top = ⌊gamma·n⌋ outliers, n_bot = n − target − n_top; when that is
    negative, fewer outliers are removed so that the density is met.
    """
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    return n_bot, n_top


def _breadcrumbs_prepare(source: ChunkSource, ctx: ChunkContext, density: float, gamma: float, **_: Any):
    if density >= 1.0:
        return None
    bounds = []
    for i in range(1, source.n_inputs):
        n_bot, n_top = breadcrumb_counts(ctx.numel, density, gamma)
        lo, hi = _sorted_values_at(_abs_delta_values(source, ctx, i), [n_bot, ctx.numel - n_top])
        bounds.append((lo if n_bot > 0 else -math.inf, hi if n_top > 0 else math.inf))
    return bounds


def _breadcrumb_deltas(x: list[Tensor], bounds: list[tuple[float, float]] | None) -> list[Tensor]:
    deltas = _deltas(x)
    if bounds is None:
        return deltas
    for d, (lo, hi) in zip(deltas, bounds):
        a = d.abs()
        d.mul_(((a >= lo) & (a < hi)).to(d.dtype))
    return deltas


_BREADCRUMB_PARAMS = {
    "density": Param(0.9, "fraction of each τ_i kept", 0.0, 1.0),
    "gamma": Param(0.01, "fraction of the largest |τ_i| removed as outliers", 0.0, 1.0),
    "lam": LAM,
}


def _breadcrumbs_needs(p: dict[str, Any]) -> frozenset[str]:
    return frozenset({"select"}) if p["density"] < 1.0 else frozenset()


@merge_method(
    "breadcrumbs",
    "θ_base + λ·Σ τ_i with, per τ_i, the smallest and the gamma largest |τ| removed (density kept)",
    params=_BREADCRUMB_PARAMS,
    inputs="base+models",
    prepare=_breadcrumbs_prepare,
    needs=_breadcrumbs_needs,
    strength="lam",
    source="Davari & Belilovsky 2024 (model breadcrumbs); mergekit breadcrumbs",
)
def _breadcrumbs(x: list[Tensor], ctx: ChunkContext, bounds: Any, density: float, gamma: float, lam: float) -> Tensor:
    return _sum(_breadcrumb_deltas(x, bounds)).mul_(lam).add_(x[0])


@merge_method(
    "breadcrumbs_ties",
    "breadcrumbs, then TIES' sign election (γ = sgn Σ τ_i) and disjoint mean",
    params=_BREADCRUMB_PARAMS,
    inputs="base+models",
    prepare=_breadcrumbs_prepare,
    needs=_breadcrumbs_needs,
    strength="lam",
    source="mergekit breadcrumbs_ties",
)
def _breadcrumbs_ties(
    x: list[Tensor], ctx: ChunkContext, bounds: Any, density: float, gamma: float, lam: float
) -> Tensor:
    return _disjoint_mean(_breadcrumb_deltas(x, bounds), "mass").mul_(lam).add_(x[0])


@merge_method(
    "della_linear",
    "θ_base + λ·Σ DELLA(τ_i): magnitude-ranked drop and rescale, no sign election",
    params={"p": DROP_P, "eps": DELLA_EPS, "lam": LAM},
    inputs="base+models",
    needs=lambda p: frozenset({"row"}),
    strength="lam",
    random=True,
    source="mergekit della_linear",
)
def _della_linear(x: list[Tensor], ctx: ChunkContext, stats: None, p: float, eps: float, lam: float) -> Tensor:
    return _sum(_della_drop(_deltas(x), ctx, p, eps)).mul_(lam).add_(x[0])


# ------------------------------------------------------------------------------------- mergekit: SCE


@dataclass(frozen=True)
class _SceStats:
    threshold: float | None  # keep elements whose variance over the τ_i is >= this (None: keep all)
    weights: np.ndarray  # w_i = mean(τ̃_i²) / Σ_j mean(τ̃_j²)


def _population_variance(deltas: Sequence[Tensor]) -> Tensor:
    mean = _sum(deltas).div_(len(deltas))
    var = torch.zeros_like(mean)
    for d in deltas:
        var.add_(torch.sub(d, mean).square_())
    return var.div_(len(deltas))


def _sce_selected(xs: list[Tensor], threshold: float | None) -> list[Tensor]:
    deltas = _deltas(xs)
    if threshold is not None:
        keep = (_population_variance(deltas) >= threshold).to(deltas[0].dtype)
        for d in deltas:
            d.mul_(keep)
    return deltas


def _sce_prepare(source: ChunkSource, ctx: ChunkContext, select_topk: float) -> _SceStats:
    threshold = None
    if select_topk < 1.0:
        var = np.empty(ctx.numel, dtype=np.float64)
        for c, xs in source.chunks():
            var[c.start : c.stop] = _population_variance(_deltas(xs)).to(torch.float64).numpy()
        k = int(int(np.count_nonzero(var)) * select_topk)
        threshold = math.inf if k == 0 else _sorted_values_at(var, [ctx.numel - k])[0]

    def fill(c: ChunkContext, xs: list[Tensor], buf: Tensor) -> None:
        for i, d in enumerate(_sce_selected(xs, threshold)):
            buf[i].copy_(d)

    n = source.n_inputs - 1
    weights = np.diag(gram_matrix(source, fill, n)) / max(ctx.numel, 1)
    total = float(weights.sum())
    weights = np.full(n, 1.0 / n) if abs(total) < 1e-6 else weights / total
    return _SceStats(threshold, weights)


@merge_method(
    "sce",
    "Select (top-k variance elements), Calculate (w_i ∝ mean τ̃_i²), Erase (sign election): θ_base + Σ w_i τ̃_i / Σ w_i",
    params={"select_topk": Param(1.0, "fraction of elements kept, by variance of τ across models", 0.0, 1.0)},
    inputs="base+models",
    prepare=_sce_prepare,
    needs=lambda p: frozenset({"tensor", "select"}) if p["select_topk"] < 1.0 else frozenset({"tensor"}),
    temporaries=lambda n: 2 * n + 5,
    source="FuseChat 2.0 (SCE); mergekit sce",
)
def _sce(x: list[Tensor], ctx: ChunkContext, stats: _SceStats, select_topk: float) -> Tensor:
    deltas = _sce_selected(x, stats.threshold)
    majority = (_sum(deltas) >= 0).to(deltas[0].dtype).mul_(2).sub_(1)  # sgn Σ τ̃, 0 counted as +
    merged = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, stats.weights):
        agree = (torch.sign(d) == majority).to(d.dtype).mul_(float(w))
        merged.add_(d * agree)
        divisor.add_(agree)
    return merged.div_(divisor.clamp_(min=1e-6)).add_(x[0])


# ------------------------------------------------------------------------- spherical means (mergekit)


def _norms(gram: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(np.diag(gram), 0.0))


def _vnorm(gram: np.ndarray, c: np.ndarray) -> float:
    return math.sqrt(max(float(c @ gram @ c), 0.0))


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The Karcher (Riemannian) mean on the unit sphere, rescaled by the mean norm, as Σ c_j x_j.

    mergekit's karcher_merge_tensors with equal weights, run in the span of the inputs: unit vectors
    û_i = x_i/|x_i|; u = normalised mean of the û_i; repeat: T = Σ w_i θ_i/sin θ_i (û_i − cos θ_i u),
    θ_i = acos<u, û_i> (terms with θ_i < tol left out); stop when |T| < tol; u ← cos|T| u + sin|T| T/|T|,
    renormalised. Result: (Σ w_i |x_i|) u. Every inner product comes from the Gram matrix.
    """
    n = gram.shape[0]
    norms = _norms(gram)
    w = np.full(n, 1.0 / n)
    valid = norms > tol
    if not valid.any():
        return np.zeros(n)
    wv = np.where(valid, w, 0.0)
    wv = wv / wv.sum()
    units = np.diag(np.where(valid, 1.0 / np.where(valid, norms, 1.0), 0.0))  # row i: coefficients of û_i
    u = wv @ units
    nu = _vnorm(gram, u)
    u = units[int(np.argmax(valid))].copy() if nu < tol else u / nu
    for _ in range(max_iter):
        t = np.zeros(n)
        g_u = gram @ u
        for i in np.flatnonzero(valid):
            dot = max(-1.0, min(1.0, float(units[i] @ g_u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            t += wv[i] * (theta / math.sin(theta)) * (units[i] - dot * u)
        nt = _vnorm(gram, t)
        if nt < tol:
            break
        u = math.cos(nt) * u + math.sin(nt) * (t / nt)
        nu = _vnorm(gram, u)
        if nu > tol:
            u = u / nu
    return float(w @ norms) * u


def multislerp_coefficients(gram: np.ndarray, weights: Sequence[float] | None, eps: float) -> np.ndarray:
    """mergekit's multislerp (barycentric interpolation on the sphere) as Σ c_j x_j.

    û_i = x_i/(|x_i| + ε); m = Σ w_i û_i normalised; tangents t_i = û_i − <û_i, m> m; T = Σ w_i t_i;
    result = (Σ w_i |x_i|)·(m cos|T| + T sin|T|/|T|), |T| taken + ε. Weights are normalised to sum 1.
    """
    n = gram.shape[0]
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.size != n:
        raise ValueError(f"multislerp: {w.size} weights for {n} models")
    w = w / w.sum()
    norms = _norms(gram)
    units = np.diag(1.0 / (norms + eps))
    m = w @ units
    nm = _vnorm(gram, m)
    if nm < eps:
        if n == 2:
            return w.copy()  # antipodal pair: mergekit falls back to the weighted sum
        raise ValueError("multislerp: the weighted mean of the unit vectors is zero (antipodal inputs)")
    m = m / nm
    g_m = gram @ m
    t = sum(w[i] * (units[i] - float(units[i] @ g_m) * m) for i in range(n))
    nt = _vnorm(gram, t) + eps
    return float(w @ norms) * (m * math.cos(nt) + t * (math.sin(nt) / nt))


def _combine(points: Sequence[Tensor], c: np.ndarray) -> Tensor:
    acc = points[0] * float(c[0])
    for p, ci in zip(points[1:], c[1:]):
        acc.add_(p, alpha=float(ci))
    return acc


def _karcher_prepare(source: ChunkSource, ctx: ChunkContext, max_iter: int, tol: float) -> np.ndarray:
    return karcher_coefficients(gram_matrix(source, _fill_copy, source.n_inputs), max_iter, tol)


@merge_method(
    "karcher",
    "Karcher (Riemannian) mean of the θ_i on the sphere, scaled by their mean norm",
    params={
        "max_iter": Param(10, "most iterations", 0),
        "tol": Param(1e-5, "stop when the tangent step is shorter", 0.0, low_open=True),
    },
    prepare=_karcher_prepare,
    needs=_TENSOR,
    temporaries=lambda n: n + 3,
    source="mergekit karcher",
)
def _karcher(x: list[Tensor], ctx: ChunkContext, c: np.ndarray, max_iter: int, tol: float) -> Tensor:
    return _combine(x, c)


def _multislerp_prepare(source: ChunkSource, ctx: ChunkContext, weights: Any, eps: float) -> np.ndarray:
    return multislerp_coefficients(gram_matrix(source, _fill_deltas, source.n_inputs - 1), weights, eps)


@merge_method(
    "multislerp",
    "θ_base + barycentric SLERP of the τ_i on the sphere (one tangent-space step), scaled by their mean norm",
    params={
        "weights": Param(None, "comma-separated weights, one per model (default equal)"),
        "eps": Param(1e-8, "added to norms", 0.0),
    },
    inputs="base+models",
    prepare=_multislerp_prepare,
    needs=_TENSOR,
    temporaries=lambda n: n + 3,
    source="mergekit multislerp",
)
def _multislerp(x: list[Tensor], ctx: ChunkContext, c: np.ndarray, weights: Any, eps: float) -> Tensor:
    return _combine(_deltas(x), c).add_(x[0])


def _slerp_rows(v0: Tensor, v1: Tensor, t: float, eps: float) -> Tensor:
    """mergekit's nuslerp along the last axis: angle from the normalised rows, applied to the raw rows."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    out = (torch.sin((1.0 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    colinear = (sin.abs() < eps).expand_as(out)
    return torch.where(colinear, (1.0 - t) * v0 + t * v1, out)


@merge_method(
    "nuslerp",
    "θ_base + SLERP(τ_1, τ_2; t), over the whole tensor or per output row (row_wise); LERP when sin Ω < eps",
    params={
        "t": Param(0.5, "position from τ_1 (0) to τ_2 (1) (MBW)"),
        "row_wise": Param(False, "one angle per output row instead of per tensor"),
        "eps": Param(1e-8, "colinearity threshold on sin Ω", 0.0),
    },
    inputs="base+models",
    min_models=2,
    max_models=2,
    needs=lambda p: frozenset({"row"} if p["row_wise"] else {"whole"}),
    strength="t",
    source="mergekit nuslerp (base-relative SLERP)",
)
def _nuslerp(x: list[Tensor], ctx: ChunkContext, stats: None, t: float, row_wise: bool, eps: float) -> Tensor:
    d0, d1 = _deltas(x)
    r = ctx.row_len if row_wise else d0.numel()
    return _slerp_rows(d0.view(-1, r), d1.view(-1, r), t, eps).reshape(-1).add_(x[0])


@merge_method(
    "nearswap",
    "A + w·(B − A), w = clamp(t / |A − B|, 0, 1): take B where it is already near A",
    params={"t": Param(1e-4, "similarity threshold (|A − B| below t: take B)", 0.0)},
    inputs=2,
    source="mergekit nearswap",
)
def _nearswap(x: list[Tensor], ctx: ChunkContext, stats: None, t: float) -> Tensor:
    a, b = x
    diff = b - a
    w = torch.div(t, diff.abs().clamp(min=1e-6)).clamp_(0.0, 1.0)
    return diff.mul_(w).add_(a)


# --------------------------------------------------------------------- sd-mecha and supermerger methods


@merge_method(
    "train_difference",
    "A + 1.8·α·(B − C)·|B − A| / (|B − A| + |B − C|) (0/0 = 0)",
    params={"alpha": ALPHA},
    inputs=3,
    strength="alpha",
    source="supermerger calcmode trainDifference; sd-mecha train_difference_mask",
)
def _train_difference(x: list[Tensor], ctx: ChunkContext, stats: None, alpha: float) -> Tensor:
    a, b, c = x
    ba, bc = (b - a).abs_(), b - c
    denom = ba + bc.abs()
    scale = torch.where(denom > 0, ba / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(denom))
    return bc.mul_(scale).mul_(1.8 * alpha).add_(a)


def _perpendicular_prepare(source: ChunkSource, ctx: ChunkContext, alpha: float) -> float:
    """<a', b'> / |a'|² with a' = A − C, b' = B − C (0 when A = C, as sd-mecha's NaN → 0)."""

    def fill(c: ChunkContext, xs: list[Tensor], buf: Tensor) -> None:
        torch.sub(xs[0], xs[2], out=buf[0])
        torch.sub(xs[1], xs[2], out=buf[1])

    g = gram_matrix(source, fill, 2)
    return float(g[0, 1] / g[0, 0]) if g[0, 0] > 0 else math.nan


@merge_method(
    "add_perpendicular",
    "A + α·(b' − a'·<a', b'>/|a'|²), a' = A − C, b' = B − C: add the part of B's change orthogonal to A's",
    params={"alpha": ALPHA},
    inputs=3,
    prepare=_perpendicular_prepare,
    needs=_TENSOR,
    strength="alpha",
    source="sd-mecha add_perpendicular",
)
def _add_perpendicular(x: list[Tensor], ctx: ChunkContext, proj: float, alpha: float) -> Tensor:
    a, b, c = x
    if math.isnan(proj):  # A = C: sd-mecha's perpendicular component is NaN, replaced by zeros
        return a.clone()
    perp = (b - c).sub_((a - c).mul_(proj))
    return perp.mul_(alpha).add_(a)


def _column_cosine(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Cosine between A and B along dim 0 (one value per column, shape[1:]); norms floored at eps."""
    dot = (a * b).sum(0)
    return dot / (a.norm(dim=0).clamp(min=eps) * b.norm(dim=0).clamp(min=eps))


def _add_cosine(a: Tensor, b: Tensor, alpha: float, similarity: Tensor) -> Tensor:
    k = 1.0 - (similarity - alpha).clamp(0.0, 1.0)
    return torch.lerp(a, b, k.expand_as(a) if a.dim() else k)


@merge_method(
    "add_cosine_a",
    "lerp(A, B, k), k = 1 − clamp(cos₀(A, B) − α, 0, 1), cos₀ = cosine along dim 0 of the normalised tensors",
    params={"alpha": ALPHA},
    inputs=2,
    needs=_WHOLE,
    strength="alpha",
    source="sd-mecha add_cosine_a (supermerger cosineA without the model-wide rescaling)",
)
def _add_cosine_a(x: list[Tensor], ctx: ChunkContext, stats: None, alpha: float) -> Tensor:
    a, b = (t.reshape(1) if t.dim() == 0 else t for t in _whole(x, ctx))
    an = a / a.norm(dim=0, keepdim=True).clamp(min=1e-12)
    bn = b / b.norm(dim=0, keepdim=True).clamp(min=1e-12)
    return _add_cosine(a, b, alpha, _column_cosine(an, bn, 1e-8)).reshape(-1)


@merge_method(
    "add_cosine_b",
    "lerp(A, B, k), k = 1 − clamp(s − α, 0, 1), s = (cos₀(A, B) + cos(A, B)) / 2 (per column and whole tensor)",
    params={"alpha": ALPHA},
    inputs=2,
    needs=_WHOLE,
    strength="alpha",
    source="sd-mecha add_cosine_b (supermerger cosineB without the model-wide rescaling)",
)
def _add_cosine_b(x: list[Tensor], ctx: ChunkContext, stats: None, alpha: float) -> Tensor:
    a, b = (t.reshape(1) if t.dim() == 0 else t for t in _whole(x, ctx))
    whole = float((a * b).sum()) / max(float(a.norm()) * float(b.norm()), 1e-300)
    return _add_cosine(a, b, alpha, (_column_cosine(a, b, 1e-8) + whole) / 2.0).reshape(-1)


# supermerger's calcmodes cosineA / cosineB: the per-column similarity is rescaled by the range it spans over the
# whole model (1st–99th percentile trimmed), so the merge strength follows how similar a column is *relative to
# the rest of the model*; k → A, 1 − k → B.
_VAE_PREFIX = "first_stage_model."


def _normalized_columns(t: Tensor) -> Tensor:
    return t / t.norm(dim=0, keepdim=True).clamp(min=1e-12)


def _whole_cosine(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum()) / max(float(a.norm()) * float(b.norm()), 1e-300)


def _cosine_mode_similarity(a: Tensor, b: Tensor, normalized: bool) -> Tensor:
    """(cos₀ + cos) / 2: per column (along dim 0) and whole tensor; of the column-normalised tensors for cosineA."""
    if normalized:
        a, b = _normalized_columns(a), _normalized_columns(b)
    return (_column_cosine(a, b, 1e-8) + _whole_cosine(a, b)) / 2.0


def _trimmed_range(values: np.ndarray) -> tuple[float, float]:
    """supermerger's range: drop NaN, then the values below the 1st percentile, then those above the 99th of what
    is left (numpy's midpoint percentiles); (min, max) of the rest."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return 0.0, 1.0
    values = values[values >= np.percentile(values, 1, method="midpoint")]
    values = values[values <= np.percentile(values, 99, method="midpoint")]
    return float(values.min()), float(values.max())


def _cosine_mode_statistics(combined: bool) -> Any:
    def model_prepare(items: Any) -> tuple[float, float]:
        parts = []
        for ctx, x in items:
            if ctx.key.startswith(_VAE_PREFIX):  # as supermerger: the VAE does not enter the range
                continue
            a, b = (t.reshape(1) if t.dim() == 0 else t for t in _whole(x, ctx))
            if combined:
                sim = _cosine_mode_similarity(a, b, normalized=False)
            else:
                sim = _column_cosine(a, b, 1e-8)
            parts.append(sim.reshape(-1).double().numpy())
        return _trimmed_range(np.concatenate(parts) if parts else np.zeros(0))

    return model_prepare


def _cosine_mode(x: list[Tensor], ctx: ChunkContext, stats: tuple[float, float], alpha: float,
                 normalized: bool) -> Tensor:
    a, b = (t.reshape(1) if t.dim() == 0 else t for t in _whole(x, ctx))
    low, high = stats
    s = _cosine_mode_similarity(a, b, normalized)
    scaled = (s - low) / (high - low) if high - low > 1e-12 else torch.ones_like(s)  # one similarity: all alike
    k = (scaled - alpha).clamp(0.0, 1.0)
    return torch.lerp(b, a, k.expand_as(a) if a.dim() else k).reshape(-1)


@merge_method(
    "cosine_a",
    "lerp(B, A, k), k = clamp((s − lo)/(hi − lo) − |α|, 0, 1), s = (cos₀ + cos)/2 of the column-normalised "
    "tensors; lo, hi = the model's trimmed range of cos₀ (1st–99th percentile)",
    params={"alpha": ALPHA},
    inputs=2,
    needs=_WHOLE,
    strength="alpha",
    model_prepare=_cosine_mode_statistics(combined=False),
    source="supermerger calcmode cosineA (favours A's structure with details from B)",
)
def _cosine_a(x: list[Tensor], ctx: ChunkContext, stats: tuple[float, float], alpha: float) -> Tensor:
    return _cosine_mode(x, ctx, stats, abs(alpha), normalized=True)


@merge_method(
    "cosine_b",
    "lerp(B, A, k), k = clamp((s − lo)/(hi − lo) − α, 0, 1), s = (cos₀ + cos)/2 of the tensors; lo, hi = the "
    "model's trimmed range of s (1st–99th percentile)",
    params={"alpha": ALPHA},
    inputs=2,
    needs=_WHOLE,
    strength="alpha",
    model_prepare=_cosine_mode_statistics(combined=True),
    source="supermerger calcmode cosineB (favours B's structure with details from A)",
)
def _cosine_b(x: list[Tensor], ctx: ChunkContext, stats: tuple[float, float], alpha: float) -> Tensor:
    return _cosine_mode(x, ctx, stats, alpha, normalized=False)


def _matrix_view(t: Tensor) -> Tensor:
    """2-D view used by rotate: conv kernels as (out·in, kh·kw), other tensors as (out, rest) — sd-mecha's choice."""
    if t.dim() == 4 and t.shape[2] * t.shape[3] != 1:
        return t.reshape(t.shape[0] * t.shape[1], -1)
    return t.reshape(t.shape[0], -1)


def _orthogonal_power(q: Tensor, power: float) -> Tensor:
    """Q^power for an orthogonal Q (det +1) through its eigen-decomposition (unit-modulus eigenvalues)."""
    if power == 1.0:
        return q
    if power == 0.0:
        return torch.eye(q.shape[0], dtype=q.dtype)
    vals, vecs = torch.linalg.eig(q)
    powered = torch.polar(torch.ones_like(vals.real), torch.angle(vals) * power)
    return (vecs @ torch.diag(powered) @ torch.linalg.inv(vecs)).real.to(q.dtype)


def procrustes(a: Tensor, b: Tensor, proper: bool) -> Tensor:
    """Q = argmin over orthogonal Q of |A Q − B|: U Vᵀ from the SVD of Aᵀ B (proper: det Q = +1)."""
    u, _, vh = torch.linalg.svd(a.T @ b)
    if proper and torch.det(u @ vh) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
    return u @ vh


@merge_method(
    "rotate",
    "A aligned to B by an orthogonal Q (Procrustes on centred columns): lerp(A_c, B_c Qᵀ, α)·Q^alignment + centre",
    params={
        "alignment": Param(1.0, "how far A is rotated toward B (1: the full Procrustes rotation)", 0.0, 1.0),
        "alpha": Param(0.0, "share of B's non-rotational part (MBW)", 0.0, 1.0),
        "centralization": Param(1.0, "how much the column means are removed before aligning", 0.0, 1.0),
    },
    inputs=2,
    needs=_WHOLE,
    strength="alpha",
    temporaries=lambda n: 8,
    source="sd-mecha rotate (orthogonal Procrustes)",
)
def _rotate(x: list[Tensor], ctx: ChunkContext, stats: None, alignment: float, alpha: float, centralization: float):
    a, b = _whole(x, ctx)
    if a.dim() <= 1:
        return torch.lerp(a, b, alpha).reshape(-1)
    a2, b2 = _matrix_view(a), _matrix_view(b)
    a_mean, b_mean = a2.mean(0) * centralization, b2.mean(0) * centralization
    ac, bc = a2 - a_mean, b2 - b_mean
    q = procrustes(ac, bc, proper=not float(alignment).is_integer())
    if alpha:
        ac = torch.lerp(ac, bc @ q.T, alpha)
    out = ac @ _orthogonal_power(q, alignment) + torch.lerp(a_mean, b_mean, alignment)
    return out.reshape(-1)


def crossover_filter(shape: Sequence[int], alpha: float, tilt: float, dtype: torch.dtype) -> Tensor:
    """Weight of B per frequency of an rfftn spectrum of `shape`: 0 = low frequencies (A), 1 = high (B).

    m = radial frequency in [0, 1] (per axis |k|/(s//2), the last, halved rfft axis 0..1, combined as the
    root mean square); tilt 0: [m > 1 − α]; 0 < tilt < 1: clamp(cot(π·tilt/2)·(m + α − 1) + α, 0, 1); tilt 1: α.
    """
    spec = list(shape[:-1]) + [shape[-1] // 2 + 1]
    axes = []
    for i, s in enumerate(spec):
        if i == len(spec) - 1 or s == 1:
            axes.append(torch.linspace(0, 1, s, dtype=dtype))
        else:
            axes.append(torch.fft.fftfreq(s, dtype=dtype).abs() * s / (s // 2))
    if len(axes) > 1:
        grids = torch.meshgrid(*(g.square() for g in axes), indexing="ij")
        mesh = (torch.stack(grids).sum(0) / len(axes)).sqrt()
    else:
        mesh = axes[0]
    if tilt <= 0.0:
        return (mesh > 1.0 - alpha).to(dtype)
    if tilt >= 1.0:
        return torch.full_like(mesh, alpha)
    cot = 1.0 / math.tan(math.pi * tilt / 2.0)
    return (cot * (mesh + alpha - 1.0) + alpha).clamp_(0.0, 1.0)


@merge_method(
    "crossover",
    "irfftn((1 − F)·rfftn(A) + F·rfftn(B)): low frequencies from A, the α highest from B (tilt softens the cut)",
    params={
        "alpha": Param(0.5, "share of the spectrum taken from B (MBW)", 0.0, 1.0),
        "tilt": Param(0.0, "0: hard cut, 1: a plain weighted sum", 0.0, 1.0),
    },
    inputs=2,
    needs=_WHOLE,
    strength="alpha",
    temporaries=lambda n: 10,
    source="sd-mecha crossover",
)
def _crossover(x: list[Tensor], ctx: ChunkContext, stats: None, alpha: float, tilt: float) -> Tensor:
    a, b = _whole(x, ctx)
    if alpha == 0.0:
        return a.reshape(-1).clone()
    if alpha == 1.0:
        return b.reshape(-1).clone()
    if tilt >= 1.0 or a.dim() == 0 or torch.equal(a, b):
        return torch.lerp(a, b, alpha).reshape(-1)
    fa, fb = torch.fft.rfftn(a), torch.fft.rfftn(b)
    f = crossover_filter(a.shape, alpha, tilt, a.dtype)
    return torch.fft.irfftn(fa * (1.0 - f) + fb * f, s=a.shape).reshape(-1)


@merge_method(
    "clamp",
    "A clamped element-wise to [min, max] of the other models (stiffness pulls the bounds toward their mean)",
    params={"stiffness": Param(0.0, "0: the outermost bounds; 1: the bounds nearest the mean of the bounds", 0.0, 1.0)},
    min_models=2,
    source="sd-mecha clamp",
)
def _clamp(x: list[Tensor], ctx: ChunkContext, stats: None, stiffness: float) -> Tensor:
    a, bounds = x[0], x[1:]
    hi, lo = bounds[0].clone(), bounds[0].clone()
    for b in bounds[1:]:
        torch.maximum(hi, b, out=hi)
        torch.minimum(lo, b, out=lo)
    if stiffness:
        mean = _sum(bounds).div_(len(bounds))
        smallest_above, largest_below = hi.clone(), lo.clone()
        for b in bounds:
            smallest_above = torch.where((smallest_above >= b) & (b >= mean), b, smallest_above)
            largest_below = torch.where((largest_below <= b) & (b <= mean), b, largest_below)
        hi = torch.lerp(hi, smallest_above, stiffness)
        lo = torch.lerp(lo, largest_below, stiffness)
    return torch.minimum(torch.maximum(a, lo), hi)


@merge_method(
    "smooth_add",
    "A + α·Gσ=1(median₃(B − C)): the difference median-filtered (size 3) then Gaussian-blurred (σ = 1) over all axes",
    params={"alpha": ALPHA},
    inputs=3,
    needs=_WHOLE,
    strength="alpha",
    temporaries=lambda n: 6,
    source="supermerger calcmode smoothAdd",
)
def _smooth_add(x: list[Tensor], ctx: ChunkContext, stats: None, alpha: float) -> Tensor:
    a, b, c = _whole(x, ctx)
    diff = (b - c).numpy()
    smooth = scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(diff, size=3), sigma=1)
    return torch.from_numpy(np.ascontiguousarray(smooth)).to(a.dtype).mul_(alpha).add_(a).reshape(-1)
