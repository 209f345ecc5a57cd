"""Merge methods: one registry of pure tensor functions (formulas in DESIGN.md §6).

Every method is written once, as two small pieces the engine can stream:

- ``prepare(source, ctx, **params)``: whole-tensor statistics (TIES' top-k thresholds, Model Stock's
  cosines, the geometric median's Weiszfeld weights, SLERP's angle). It reads the inputs as a sequence
  of chunks, possibly several times. Methods that need none leave it out.
- ``apply(inputs, ctx, stats, **params)``: the result for one chunk of the flattened tensor.

``MethodSpec.__call__`` runs both on whole tensors: that is the pure function the tests pin to the formulas.
The engine runs the same two pieces over chunks that it aligns so that results are bit-identical whatever
the chunk size:
- chunks of row-wise methods hold whole rows (a row = one output channel: ``numel // shape[0]`` elements);
- reductions sum fixed blocks of ``REDUCE_BLOCK`` elements at fixed global offsets (chunks start on block
  boundaries) and then add the block partials exactly (``math.fsum``);
- random masks come from a counter-style generator keyed by (seed, tensor key, input index, block of
  ``RNG_BLOCK`` elements at a fixed global offset), so a chunk sees the same random numbers as the whole.

Inputs are 1-D views (one chunk of the flattened tensor) in the compute dtype (fp64 by default).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

REDUCE_BLOCK = 4096  # elements per partial sum; chunk starts are multiples of it for whole-tensor statistics
RNG_BLOCK = 1 << 18  # elements per random block; fixed global offsets make masks chunk-independent
_GRAM_MIN_BATCH = 8  # a batched matmul of one block may split the dot products across threads: pad to >1


class Workspace:
    """Flat buffers that outlive a chunk, owned by the engine: a method asks for one with `ctx.buffer(slot)`
    instead of allocating its temporaries afresh for every chunk (a fresh tensor of tens of MB is a fresh
    mmap, faulted in page by page: measured 2× slower than reusing one for a 4-model fp16 → fp64 sum)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], Tensor] = {}

    def get(self, key: tuple[Any, ...], numel: int, dtype: torch.dtype) -> Tensor:
        """The first `numel` elements of the buffer for `key` (grown when too small); contents undefined."""
        key = (*key, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # free the old one before allocating the larger one
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


@dataclass(frozen=True)
class ChunkContext:
    """Where a chunk lies: tensor key and shape, flat element range [start, stop), random seed."""

    key: str
    shape: tuple[int, ...]
    start: int
    stop: int
    seed: int = 0
    dtype: torch.dtype = torch.float64  # compute dtype (inputs of `linear` methods may arrive in their stored dtype)
    workspace: Workspace | None = field(default=None, compare=False, repr=False)
    owner: int = 0  # which node's buffers `buffer` hands out

    def buffer(self, slot: str, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised flat tensor of this chunk's length for a temporary or the result. In the engine it
        is the node's own persistent buffer for `slot`: valid until the same node asks for `slot` again (the
        next chunk), so a method may return it but must not keep it in its statistics. Outside the engine
        (the pure call) it is a new tensor."""
        dtype = self.dtype if dtype is None else dtype
        if self.workspace is None:
            return torch.empty(self.stop - self.start, dtype=dtype)
        return self.workspace.get(("node", self.owner, slot), self.stop - self.start, dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_len(self) -> int:
        return row_length(self.shape)


def row_length(shape: Sequence[int]) -> int:
    """Elements per output channel (row): the whole tensor for 0-D/1-D tensors."""
    numel = math.prod(shape)
    if len(shape) < 2 or shape[0] == 0:
        return max(numel, 1)
    return numel // shape[0]


class ChunkSource(Protocol):
    """What ``prepare`` gets: the method's inputs for one tensor, as chunks (one pass per call)."""

    n_inputs: int

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[tuple[ChunkContext, list[Tensor]]]: ...

    def buffer(self, slot: str, dtype: torch.dtype) -> Tensor:
        """A flat tensor of the whole tensor's length: in the engine the node's persistent buffer for `slot` (the
        one `ctx.buffer(slot)` hands out in apply when the tensor is one chunk), else a new one. For statistics
        of one-chunk tensors that apply consumes in place of computing that slot again."""
        ...


_KINDS = {bool: "bool", int: "int", float: "float"}


@dataclass(frozen=True)
class Param:
    """A typed, range-checked method parameter.

    kind: "float", "int", "bool" or "floats" (a list, one value per model); inferred from the default.
    [low, high]: the allowed range (None: unbounded); low_open/high_open exclude the end.
    A float parameter also takes MBW block weights (a list in block order, a {block: value} table, or a
    preset name); each weight is range-checked.
    """

    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            kind = "floats" if self.default is None else _KINDS.get(type(self.default), "")
            if not kind:
                raise TypeError(f"cannot infer the kind of a parameter whose default is {self.default!r}")
            object.__setattr__(self, "kind", kind)

    @property
    def range_text(self) -> str:
        if self.low is None and self.high is None:
            return ""
        lo = "−∞" if self.low is None else f"{self.low:g}"
        hi = "∞" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def _check_number(self, method: str, name: str, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{method}: {name} must be a number, not {value!r}")
        if self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{method}: {name} must be a whole number, not {value!r}")
            value = int(value)
        else:
            value = float(value)
        if math.isnan(value):
            raise ValueError(f"{method}: {name} is NaN")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ValueError(f"{method}: {name}={value:g} is outside its range {self.range_text}")
        return value

    def check(self, method: str, name: str, value: Any) -> Any:
        """The value, coerced to the parameter's kind; a clear error when it is of the wrong kind or range."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{method}: {name} must be true or false, not {value!r}")
            return value
        if self.kind == "floats":
            if value is None:
                return None
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{method}: {name} must be a list of numbers, not {value!r}")
            return [float(self._check_number(method, name, v if not isinstance(v, str) else float(v))) for v in value]
        if self.kind == "float" and isinstance(value, (list, tuple)):  # MBW block weights, in block order
            return [self._check_number(method, f"{name} (block weight)", v) for v in value]
        if self.kind == "float" and isinstance(value, dict):  # MBW table; "elemental" holds per-key rules
            return {
                b: (v if b == "elemental" else self._check_number(method, f"{name}[{b}]", v)) for b, v in value.items()
            }
        if self.kind == "float" and isinstance(value, str):  # an MBW preset name or a comma list, parsed later
            return value
        return self._check_number(method, name, value)


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    inputs: "models" (θ_1..θ_N), "base+models" (θ_base then θ_1..θ_N), or a fixed count (add_difference: 3).
    needs(params) -> subset of {"row", "tensor", "whole", "select"}: what the engine must plan — chunks of
      whole rows, chunks starting on reduction blocks, the whole tensor as one chunk, or one model's
      |values| of the whole tensor in fp64 held during prepare (an exact selection such as TIES' top-k).
    strength: the parameter that MBW block weights set by default (None: no MBW for this method).
    max_models: the most models (θ_1..θ_N) the method takes (None: any number).
    """

    name: str
    summary: str
    apply: Callable[..., Tensor]
    params: dict[str, Param]
    inputs: str | int = "models"
    prepare: Callable[..., Any] | None = None
    needs: Callable[[dict[str, Any]], frozenset[str]] = field(default=lambda p: frozenset())
    strength: str | None = None
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    source: str = ""  # where the method comes from (paper, peer tool)
    # linear: apply() promotes its inputs itself (the engine may pass leaves in their stored dtype), and the
    # output is finite exactly when every input is (so the NaN/Inf check can look at the output only)
    linear: bool = False
    # compute-dtype temporaries per element alive at once, for n inputs (the engine's memory plan)
    temporaries: Callable[[int], int] = field(default=lambda n: 3 * n + 4)
    # model-wide statistics (supermerger's cosineA/B rescale by the similarity range of the whole model):
    # model_prepare(items) gets (ctx, whole inputs) of every merged tensor once, before the merge (one more read
    # of the inputs), and its result is `stats` for every tensor's apply. Such a method has no per-tensor
    # prepare and needs whole tensors.
    model_prepare: Callable[[Iterable[tuple[ChunkContext, list[Tensor]]]], Any] | None = None

    def __post_init__(self) -> None:
        if self.model_prepare is not None and self.prepare is not None:
            raise ValueError(f"method {self.name!r}: model_prepare and prepare cannot both be set")

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items()}

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            hints = [difflib.get_close_matches(u, list(self.params), n=1) for u in unknown]
            near = "".join(f" (did you mean {h[0]!r}?)" for h in hints if h)
            raise ValueError(
                f"method {self.name!r} has no parameter(s) {unknown}{near}; it takes {sorted(self.params) or 'none'}"
            )
        out = self.defaults
        for k, v in given.items():
            out[k] = self.params[k].check(self.name, k, v)
        return out

    def check_inputs(self, n: int) -> None:
        if isinstance(self.inputs, int):
            if n != self.inputs:
                raise ValueError(f"method {self.name!r} takes exactly {self.inputs} inputs, got {n}")
            return
        models = n - 1 if self.inputs == "base+models" else n
        what = "a base and " if self.inputs == "base+models" else ""
        if models < self.min_models:
            raise ValueError(f"method {self.name!r} needs {what}at least {self.min_models} model(s), got {n} inputs")
        if self.max_models is not None and models > self.max_models:
            raise ValueError(f"method {self.name!r} takes {what}at most {self.max_models} model(s), got {n} inputs")

    def __call__(self, inputs: Sequence[Tensor], *, key: str = "", seed: int = 0, **params: Any) -> Tensor:
        """Pure whole-tensor form: the formula applied to full tensors (same code path as streaming)."""
        self.check_inputs(len(inputs))
        p = self.resolve_params(params)
        shape = tuple(inputs[0].shape)
        flat = [t.reshape(-1) for t in inputs]
        dtype = flat[0].dtype if flat[0].is_floating_point() else torch.float64
        ctx = ChunkContext(key, shape, 0, flat[0].numel(), seed, dtype)
        if self.model_prepare is not None:  # the "model" is this one tensor
            stats = self.model_prepare(iter([(ctx, flat)]))
        else:
            stats = self.prepare(_WholeSource(ctx, flat), ctx, **p) if self.prepare else None
        return self.apply(flat, ctx, stats, **p).reshape(shape)

    def over_model(self, tensors: dict[str, Sequence[Tensor]], *, seed: int = 0, **params: Any) -> dict[str, Tensor]:
        """Pure whole-model form: every key's inputs → its result, model-wide statistics taken over all keys
        (for other methods the same as calling the spec per key)."""
        p = self.resolve_params(params)
        items = []
        for key, inputs in tensors.items():
            self.check_inputs(len(inputs))
            flat = [t.reshape(-1) for t in inputs]
            dtype = flat[0].dtype if flat[0].is_floating_point() else torch.float64
            items.append((ChunkContext(key, tuple(inputs[0].shape), 0, flat[0].numel(), seed, dtype), flat))
        if self.model_prepare is None:
            return {ctx.key: self(list(tensors[ctx.key]), key=ctx.key, seed=seed, **p) for ctx, _ in items}
        stats = self.model_prepare(iter(items))
        return {ctx.key: self.apply(flat, ctx, stats, **p).reshape(ctx.shape) for ctx, flat in items}


class _WholeSource:
    def __init__(self, ctx: ChunkContext, inputs: list[Tensor]):
        self.ctx, self.inputs = ctx, inputs
        self.n_inputs = len(inputs)

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[tuple[ChunkContext, list[Tensor]]]:
        sel = self.inputs if indices is None else [self.inputs[i] for i in indices]
        yield self.ctx, sel

    def buffer(self, slot: str, dtype: torch.dtype) -> Tensor:
        return self.ctx.buffer(slot, dtype)


REGISTRY: dict[str, MethodSpec] = {}
ALIASES = {"uniform_soup": "soup", "n_average": "soup", "gm": "geometric_median", "ties-soup": "ties_soup",
           "cosinea": "cosine_a", "cosineb": "cosine_b"}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; a name (or alias) already taken is an error, never a silent overwrite."""
    if spec.name in REGISTRY or spec.name in ALIASES:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def merge_method(
    name: str, summary: str, *, params: dict[str, Param] | None = None, **fields: Any
) -> Callable[[Callable[..., Tensor]], MethodSpec]:
    """Register the decorated ``apply(inputs, ctx, stats, **params)`` as method `name`; returns its MethodSpec.

    The spec is the pure function: ``spec([θ_1, θ_2], alpha=0.3)`` runs prepare + apply on whole tensors.
    """

    def wrap(apply: Callable[..., Tensor]) -> MethodSpec:
        return register(MethodSpec(name, summary, apply, dict(params or {}), **fields))

    return wrap


def get(name: str) -> MethodSpec:
    key = ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key not in REGISTRY:
        near = difflib.get_close_matches(key, [*REGISTRY, *ALIASES], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise KeyError(f"unknown merge method {name!r}{hint}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


# ----------------------------------------------------------------------------------------------- helpers


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    """Σ in a fixed order (element-wise, so identical for any chunking)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    acc = tensors[0] + tensors[1]
    for t in tensors[2:]:
        acc += t
    return acc


def _sum_into(out: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """`_sum` written into `out` (same order, same bits)."""
    if len(tensors) == 1:
        return out.copy_(tensors[0])
    torch.add(tensors[0], tensors[1], out=out)
    for t in tensors[2:]:
        out += t
    return out


def _scratch(ctx: ChunkContext | None, slot: str, like: Tensor) -> Tensor:
    """A temporary shaped like the flat chunk `like`: the node's buffer in the engine, else a new tensor."""
    return torch.empty_like(like) if ctx is None else ctx.buffer(slot, like.dtype)


def _promoted_sum(tensors: Sequence[Tensor], ctx: ChunkContext) -> Tensor:
    """Σ in the compute dtype, in input order, of tensors that may be stored in a narrower dtype. Each one is
    widened into a scratch buffer first: an add of two fp64 tensors runs 2.3× faster than torch's add with
    an fp16 operand promoted inside it (measured, 38 M elements), and the widening is exact, so the sum is
    the same bit for bit."""
    acc = ctx.buffer("acc").copy_(tensors[0])
    wide: Tensor | None = None
    for t in tensors[1:]:
        if t.dtype != acc.dtype:
            wide = ctx.buffer("widen") if wide is None else wide
            t = wide.copy_(t)
        acc.add_(t)
    return acc


def _deltas(inputs: Sequence[Tensor], ctx: ChunkContext | None = None) -> list[Tensor]:
    """τ_i = θ_i − θ_base, in the node's buffers when `ctx` is given."""
    base = inputs[0]
    if ctx is None:
        return [m - base for m in inputs[1:]]
    return [torch.sub(m, base, out=ctx.buffer(f"delta{i}")) for i, m in enumerate(inputs[1:])]


def _stable_seed(*parts: Any) -> int:
    h = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def uniform_for(ctx: ChunkContext, index: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """U[0,1) numbers for elements [ctx.start, ctx.stop) of input `index`: the same whatever the chunking."""
    n = ctx.stop - ctx.start
    out = torch.empty(n, dtype=dtype)
    first, last = ctx.start // RNG_BLOCK, (ctx.stop - 1) // RNG_BLOCK if n else -1
    gen = torch.Generator()
    for b in range(first, last + 1):
        gen.manual_seed(_stable_seed(ctx.seed, ctx.key, index, b))
        block = torch.rand(RNG_BLOCK, generator=gen, dtype=torch.float64)
        lo, hi = max(ctx.start, b * RNG_BLOCK), min(ctx.stop, (b + 1) * RNG_BLOCK)
        out[lo - ctx.start : hi - ctx.start] = block[lo - b * RNG_BLOCK : hi - b * RNG_BLOCK]
    return out


def gram_partials(fill: Callable[[Tensor], None], n_vectors: int, n: int, dtype: torch.dtype) -> Tensor:
    """Dot products <v_i, v_j> per REDUCE_BLOCK block: [blocks, N, N]. The chunk must start on a block.

    `fill(buf)` writes the N vectors into the rows of a zero-padded [N, n] view (no stacked copies).
    """
    blocks = -(-n // REDUCE_BLOCK)
    padded_blocks = max(blocks, _GRAM_MIN_BATCH)
    x = torch.empty(n_vectors, padded_blocks * REDUCE_BLOCK, dtype=dtype)
    x[:, n:] = 0
    fill(x[:, :n])
    a = x.view(n_vectors, padded_blocks, REDUCE_BLOCK).transpose(0, 1)
    return torch.bmm(a, a.transpose(1, 2))[:blocks]


def exact_total(partials: Sequence[Tensor]) -> np.ndarray:
    """Exact (correctly rounded) sum over the block axis of [blocks, ...] partials, in fp64."""
    p = torch.cat(list(partials)).to(torch.float64)
    flat = p.reshape(p.shape[0], -1).T.tolist()
    return np.array([math.fsum(col) for col in flat], dtype=np.float64).reshape(tuple(p.shape[1:]))


def gram_matrix(
    source: ChunkSource, fill: Callable[[ChunkContext, list[Tensor], Tensor], None], n_vectors: int
) -> np.ndarray:
    """Gram matrix G_ij = <v_i, v_j>, exact over chunks; `fill(ctx, inputs, buf)` writes v_i into buf[i]."""
    parts = []
    for ctx, xs in source.chunks():
        parts.append(gram_partials(functools.partial(fill, ctx, xs), n_vectors, ctx.stop - ctx.start, xs[0].dtype))
    return exact_total(parts)


def _fill_deltas(ctx: ChunkContext, xs: list[Tensor], buf: Tensor) -> None:
    for i, m in enumerate(xs[1:]):
        torch.sub(m, xs[0], out=buf[i])


def _fill_copy(ctx: ChunkContext, xs: list[Tensor], buf: Tensor) -> None:
    for i, v in enumerate(xs):
        buf[i].copy_(v)


def _fill_filtered(
    make: Callable[[list[Tensor], ChunkContext], list[Tensor]],
) -> Callable[[ChunkContext, list[Tensor], Tensor], None]:
    """Fill with the filtered deltas `make(inputs, ctx)`, centred on the first (the GM is translation-equivariant)."""

    def fill(ctx: ChunkContext, xs: list[Tensor], buf: Tensor) -> None:
        vs = make(xs, ctx)
        buf[0] = 0
        for i in range(1, len(vs)):
            torch.sub(vs[i], vs[0], out=buf[i])

    return fill


def _fill_centred(ctx: ChunkContext, xs: list[Tensor], buf: Tensor) -> None:
    buf[0] = 0
    for i, m in enumerate(xs[1:], start=1):
        torch.sub(m, xs[0], out=buf[i])


def weiszfeld_weights(gram: np.ndarray, eps: float, maxiter: int, ftol: float) -> np.ndarray:
    """Weiszfeld iterations for the geometric median of N points known through their Gram matrix.

    The median is z(w) = Σ w_i p_i / Σ w_i; with c_i = p_i − p_0 (translation invariant, avoids the
    cancellation of large norms), |p_i − z|² = G_ii − 2 (G w)_i / W + wᵀ G w / W². Same loop as Pillutla's
    weiszfeld_list_of_array (the reference sd-mecha uses): start at the mean, objective = mean distance,
    stop when |Δobjective| <= ftol · objective or after maxiter steps. Returns the final weights.
    """
    n = gram.shape[0]

    def distances(w: np.ndarray) -> np.ndarray:
        total = w.sum()
        gw = gram @ w
        sq = np.diag(gram) - 2.0 * gw / total + float(w @ gw) / (total * total)
        return np.sqrt(np.maximum(sq, 0.0))

    weights = np.ones(n)
    dist = distances(weights)
    objective = float(dist.mean())
    new_weights = weights
    for _ in range(max(0, maxiter)):
        previous = objective
        new_weights = 1.0 / np.maximum(dist, eps)
        dist = distances(new_weights)
        objective = float(dist.mean())
        if abs(previous - objective) <= ftol * objective:
            break
    return new_weights


def _weighted_average(points: Sequence[Tensor], weights: np.ndarray, ctx: ChunkContext | None = None) -> Tensor:
    """Σ w_i p_i / Σ w_i, left to right (one scratch buffer, no per-model allocation; the node's buffers when
    `ctx` is given)."""
    acc = torch.mul(points[0], float(weights[0]), out=_scratch(ctx, "wavg", points[0]))
    scratch = _scratch(ctx, "wscratch", acc)
    for p, w in zip(points[1:], weights[1:]):
        acc += torch.mul(p, float(w), out=scratch)
    return acc.div_(float(weights.sum()))


def topk_threshold(values: np.ndarray, k: float) -> float:
    """Threshold that keeps the top-k fraction of `values` (consumed: partitioned in place).

    Keep |τ| >= the m-th smallest |τ|, m = max(floor((1−k)·n), 1) (ties at the threshold are kept;
    k = 1 keeps everything). Exact selection, O(n), no copy.
    """
    n = values.size
    m = max(int((1.0 - k) * n), 1)
    values.partition(m - 1)
    return float(values[m - 1])


def _elect(deltas: list[Tensor], vote: str, ctx: ChunkContext | None, agree: Tensor) -> Tensor:
    """TIES elect: γ = sgn Σ τ_i (vote="mass") or sgn Σ sgn τ_i (vote="count"); `agree` is scratch."""
    gamma = _scratch(ctx, "gamma", deltas[0])
    if vote == "mass":
        _sum_into(gamma, deltas)
    else:
        torch.sign(deltas[0], out=gamma)
        for d in deltas[1:]:
            gamma += torch.sign(d, out=agree)
    return gamma.sign_()


def _agreeing(d: Tensor, gamma: Tensor, out: Tensor) -> Tensor:
    """[τ·γ > 0] as 0/1 in the compute dtype: exact (γ ∈ {−1, 0, 1}); same sign as γ and non-zero. (Bool masks
    make the mixed-dtype kernels that use it ~3× slower.)"""
    return torch.mul(d, gamma, out=out).gt_(0)


def _signed_filter(deltas: list[Tensor], vote: str, ctx: ChunkContext | None = None) -> tuple[list[Tensor], Tensor]:
    """TIES elect and filter: zeroes the entries of the given (fresh) delta tensors that disagree with γ, in
    place; returns them and the count of agreeing non-zero entries."""
    agree = _scratch(ctx, "agree", deltas[0])  # also the signs of the count vote
    gamma = _elect(deltas, vote, ctx, agree)
    count = _scratch(ctx, "count", deltas[0]).zero_()
    for d in deltas:
        d.mul_(_agreeing(d, gamma, agree))
        count.add_(agree)
    return deltas, count


def _disjoint_mean(deltas: list[Tensor], vote: str, ctx: ChunkContext | None = None) -> Tensor:
    """Σ_i [τ_i·γ > 0] τ_i / max(1, count): `_signed_filter` then the sum, fused (the masked τ_i are added
    with addcmul instead of being zeroed first; the products are exact, so the bits are the same). The result
    is the first delta's tensor."""
    agree = _scratch(ctx, "agree", deltas[0])
    gamma = _elect(deltas, vote, ctx, agree)
    count = _scratch(ctx, "count", deltas[0]).zero_()
    acc = deltas[0]
    for i, d in enumerate(deltas):
        _agreeing(d, gamma, agree)
        if i == 0:
            acc.mul_(agree)
        else:
            acc.addcmul_(d, agree)
        count.add_(agree)
    return acc.div_(count.clamp_(min=1))


def _dare_drop(deltas: Sequence[Tensor], ctx: ChunkContext, p: float) -> list[Tensor]:
    if p <= 0:
        return list(deltas)
    out = []
    for i, d in enumerate(deltas):
        keep = uniform_for(ctx, i, d.dtype) >= p
        out.append(d * keep / (1.0 - p))
    return out


def della_drop_probability(delta_rows: Tensor, p: float, eps: float) -> Tensor:
    """p_i = p + ε·(r_i/R − (R+1)/(2R)), r_i = ascending rank (1..R) of |τ| within its row, clamped to [0, 1)."""
    rows, r = delta_rows.shape
    # |τ| >= 0, so its IEEE bits order as integers: the integer sort is faster and gives the same ranks
    bits = delta_rows.abs().view(torch.int64 if delta_rows.dtype == torch.float64 else torch.int32)
    order = torch.argsort(bits, dim=1, stable=True)
    del bits
    rank = torch.empty_like(delta_rows)  # ranks 1..R are exact in the float dtype (R < 2^24)
    rank.scatter_(1, order, torch.arange(1, r + 1, dtype=rank.dtype).expand(rows, r))
    del order
    return rank.div_(r).sub_((r + 1) / (2 * r)).mul_(eps).add_(p).clamp_(0.0, 1.0 - 1e-12)


def _della_drop(deltas: Sequence[Tensor], ctx: ChunkContext, p: float, eps: float) -> list[Tensor]:
    r = ctx.row_len
    out = []
    for i, d in enumerate(deltas):
        prob = della_drop_probability(d.view(-1, r), p, eps).reshape(-1)
        keep = uniform_for(ctx, i, d.dtype) >= prob
        out.append(d * keep / (1.0 - prob))
    return out


def _model_stock_t(gram: np.ndarray, cos_eps: float) -> float:
    """t = N·cosθ / (1 + (N−1)·cosθ), cosθ = mean pairwise cosine of the deltas (0 when undefined)."""
    n = gram.shape[0]
    if n < 2:
        return 1.0
    norms = np.maximum(np.sqrt(np.maximum(np.diag(gram), 0.0)), cos_eps)
    cos = gram / np.outer(norms, norms)
    iu = np.triu_indices(n, 1)
    c = float(cos[iu].mean())
    denom = 1.0 + (n - 1) * c
    return 0.0 if abs(denom) < 1e-12 else n * c / denom


# ----------------------------------------------------------------------------------------------- methods

_NO_NEEDS: Callable[[dict[str, Any]], frozenset[str]] = lambda p: frozenset()  # noqa: E731
_TENSOR = lambda p: frozenset({"tensor"})  # noqa: E731
_ROW = lambda p: frozenset({"row"})  # noqa: E731


LAM = Param(1.0, "scale of the merged task vector (MBW)")
ALPHA = Param(1.0, "strength (MBW)")


@merge_method(
    "weighted_sum",
    "Σ w_i θ_i (weights as given; none = 1/N)",
    params={"weights": Param(None, "comma-separated weights, one per model (default 1/N each)")},
    temporaries=lambda n: 3,
    source="A1111 / supermerger weighted sum, generalised to N models",
)
def _weighted_sum(x: list[Tensor], ctx: ChunkContext, stats: None, weights: Sequence[float] | None) -> Tensor:
    if weights is None:
        return _sum(x).div_(len(x))
    if len(weights) != len(x):
        raise ValueError(f"weighted_sum: {len(weights)} weights for {len(x)} models")
    acc = x[0] * float(weights[0])
    for t, w in zip(x[1:], weights[1:]):
        acc += t * float(w)
    return acc




@merge_method(
    "soup", "uniform soup: Σ θ_i / N", linear=True, temporaries=lambda n: 2, source="Wortsman et al. 2022 (model soups)"
)
def _soup(x: list[Tensor], ctx: ChunkContext, stats: None) -> Tensor:
    return _promoted_sum(x, ctx).div_(len(x))


@merge_method(
    "weighted_pair",
    "(1−α)·A + α·B (supermerger's weighted sum; MBW sets α)",
    params={"alpha": Param(0.5, "share of B (MBW)")},
    inputs=2,
    strength="alpha",
    source="A1111 checkpoint merger / supermerger",
)
def _weighted_pair(x: list[Tensor], ctx: ChunkContext, stats: None, alpha: float) -> Tensor:
    return x[0] * (1.0 - alpha) + x[1] * alpha


@merge_method(
    "add_difference",
    "A + α·(B − C)",
    params={"alpha": ALPHA},
    inputs=3,
    strength="alpha",
    linear=True,
    temporaries=lambda n: 2,
    source="A1111 checkpoint merger",
)
def _add_difference(x: list[Tensor], ctx: ChunkContext, stats: None, alpha: float) -> Tensor:
    return x[1].to(ctx.dtype, copy=True).sub_(x[2]).mul_(alpha).add_(x[0])


@merge_method(
    "task_arithmetic",
    "θ_base + λ·Σ τ_i",
    params={"lam": LAM},
    inputs="base+models",
    strength="lam",
    temporaries=lambda n: n + 2,
    source="Ilharco et al. 2023 (task arithmetic)",
)
def _task_arithmetic(x: list[Tensor], ctx: ChunkContext, stats: None, lam: float) -> Tensor:
    return _sum_into(ctx.buffer("sum"), _deltas(x, ctx)).mul_(lam).add_(x[0])


@dataclass
class _TiesStats:
    thresholds: list[float]
    deltas: list[Tensor] | None  # the τ_i of a one-chunk tensor, handed to apply (computed once)


def _ties_prepare(source: ChunkSource, ctx: ChunkContext, k: float, **_: Any) -> _TiesStats | None:
    """Per-model top-k thresholds of |τ_i|: one model's |τ_i| (fp64, numel) in memory at a time."""
    if k >= 1.0:
        return None
    thresholds: list[float] = []
    deltas: list[Tensor] | None = []
    for i in range(1, source.n_inputs):
        buf: np.ndarray | None = None
        for c, (b, m) in source.chunks([0, i]):
            if c.start == 0 and c.stop == ctx.numel:  # one chunk: keep τ_i for apply, select on a copy of |τ_i|
                assert deltas is not None  # τ_i in apply's own delta buffer, |τ_i| in a persistent one
                d = torch.sub(m, b, out=source.buffer(f"delta{i - 1}", torch.promote_types(m.dtype, b.dtype)))
                deltas.append(d)
                sel = source.buffer("select", torch.float64)
                buf = (torch.abs(d, out=sel) if d.dtype == torch.float64 else sel.copy_(d).abs_()).numpy()
                break
            d = torch.sub(m, b)
            deltas = None
            if buf is None:
                buf = np.empty(ctx.numel, dtype=np.float64)
            buf[c.start : c.stop] = d.abs_().to(torch.float64).numpy()
        assert buf is not None
        thresholds.append(topk_threshold(buf, k))
    return _TiesStats(thresholds, deltas)


def _kept_deltas(stats: _TiesStats | _FilteredGM | None, ctx: ChunkContext) -> list[Tensor] | None:
    """The deltas prepare kept for a tensor that is one chunk, handed over once (apply changes them in place)."""
    if stats is None or stats.deltas is None or not (ctx.start == 0 and ctx.stop == ctx.numel):
        return None
    deltas, stats.deltas = stats.deltas, None
    return deltas


def _ties_apply(x: list[Tensor], ctx: ChunkContext, stats: _TiesStats | None, k: float, lam: float) -> Tensor:
    deltas = _kept_deltas(stats, ctx)
    if deltas is None:
        deltas = _deltas(x, ctx)
    if stats is not None:
        keep = _scratch(ctx, "agree", deltas[0])  # free until _signed_filter takes it
        for d, t in zip(deltas, stats.thresholds):
            d.mul_(torch.abs(d, out=keep).ge_(t))  # keep = [|τ| >= t] as 0/1 in the compute dtype
    return _disjoint_mean(deltas, "mass", ctx).mul_(lam).add_(x[0])


TOPK = Param(0.2, "fraction of each τ_i kept by magnitude (1 = all)", 0.0, 1.0, low_open=True)
DROP_P = Param(0.1, "drop probability", 0.0, 1.0, high_open=True)
DELLA_EPS = Param(-0.1, "spread of the drop probability by magnitude rank (< 0: large |τ| dropped less)", -1.0, 1.0)

merge_method(
    "ties",
    "θ_base + λ·disjoint mean of top-k trimmed τ_i agreeing with γ = sgn Σ τ_i",
    params={"k": TOPK, "lam": LAM},
    inputs="base+models",
    prepare=_ties_prepare,
    needs=lambda p: frozenset({"tensor", "select"}) if p["k"] < 1.0 else frozenset(),
    strength="lam",
    temporaries=lambda n: n + 5,
    source="Yadav et al. 2023 (TIES-merging)",
)(_ties_apply)


@merge_method(
    "ties_soup",
    "θ_base + disjoint mean of τ_i agreeing with γ = sgn Σ sgn τ_i (k = 100%, λ = 1)",
    inputs="base+models",
    temporaries=lambda n: n + 4,
    source="sd-mecha ties_sum_extended (vote_sgn)",
)
def _ties_soup(x: list[Tensor], ctx: ChunkContext, stats: None) -> Tensor:
    return _disjoint_mean(_deltas(x, ctx), "count", ctx).add_(x[0])


@merge_method(
    "dare",
    "θ_base + λ·Σ DARE(τ_i): keep with prob 1−p, rescale 1/(1−p)",
    params={"p": DROP_P, "lam": LAM},
    inputs="base+models",
    strength="lam",
    random=True,
    source="Yu et al. 2024 (DARE)",
)
def _dare(x: list[Tensor], ctx: ChunkContext, stats: None, p: float, lam: float) -> Tensor:
    return _sum(_dare_drop(_deltas(x), ctx, p)).mul_(lam).add_(x[0])


@merge_method(
    "tsd",
    "TIES-SOUP over DARE-dropped deltas, λ = 1−p",
    params={"p": DROP_P},
    inputs="base+models",
    random=True,
    source="the merging seed (TIES-SOUP + DARE)",
)
def _tsd(x: list[Tensor], ctx: ChunkContext, stats: None, p: float) -> Tensor:
    return _disjoint_mean(_dare_drop(_deltas(x), ctx, p), "count").mul_(1.0 - p).add_(x[0])


@merge_method(
    "della",
    "θ_base + λ·TIES elect/disjoint mean of DELLA-dropped τ_i (p_i by magnitude rank in the row)",
    params={"p": DROP_P, "eps": DELLA_EPS, "lam": LAM},
    inputs="base+models",
    needs=_ROW,
    strength="lam",
    random=True,
    source="Deep et al. 2024 (DELLA-merging)",
)
def _della(x: list[Tensor], ctx: ChunkContext, stats: None, p: float, eps: float, lam: float) -> Tensor:
    return _disjoint_mean(_della_drop(_deltas(x), ctx, p, eps), "mass").mul_(lam).add_(x[0])


def _model_stock_prepare(source: ChunkSource, ctx: ChunkContext, per_channel: bool, cos_eps: float) -> float | None:
    if per_channel and len(ctx.shape) >= 2:
        return None
    return _model_stock_t(gram_matrix(source, _fill_deltas, source.n_inputs - 1), cos_eps)


def _model_stock_apply(x: list[Tensor], ctx: ChunkContext, t: float | None, per_channel: bool, cos_eps: float):
    base, models = x[0], x[1:]
    mean = _sum(models) / len(models)
    if t is not None:
        return mean * t + base * (1.0 - t)
    r = ctx.row_len
    rows = torch.stack([d.view(-1, r) for d in _deltas(x)], dim=1)  # [rows, N, R]
    n_rows = rows.shape[0]
    if n_rows < _GRAM_MIN_BATCH:  # same kernel path whatever the number of rows in the chunk
        rows = torch.cat([rows, rows.new_zeros(_GRAM_MIN_BATCH - n_rows, *rows.shape[1:])])
    g = torch.bmm(rows, rows.transpose(1, 2))[:n_rows]  # per-row Gram, each row computed whole
    n = len(models)
    norms = torch.diagonal(g, dim1=1, dim2=2).clamp(min=0).sqrt().clamp(min=cos_eps)
    cos = g / (norms.unsqueeze(2) * norms.unsqueeze(1))
    iu = torch.triu_indices(n, n, 1)
    c = cos[:, iu[0], iu[1]].mean(dim=1) if n > 1 else torch.ones(n_rows, dtype=base.dtype)
    denom = 1.0 + (n - 1) * c
    t_rows = torch.where(denom.abs() < 1e-12, torch.zeros_like(c), n * c / denom) if n > 1 else c
    t_el = t_rows.repeat_interleave(r)
    return mean * t_el + base * (1.0 - t_el)


merge_method(
    "model_stock",
    "t·mean(θ_i) + (1−t)·θ_base, t = N·cos/(1+(N−1)·cos), cos = mean pairwise cosine of τ",
    params={
        "per_channel": Param(False, "one t per output channel instead of per tensor"),
        "cos_eps": Param(1e-6, "floor of the norms in the cosine", 0.0),
    },
    inputs="base+models",
    prepare=_model_stock_prepare,
    needs=lambda p: frozenset({"row"} if p["per_channel"] else {"tensor"}),
    temporaries=lambda n: 2 * n + 4,
    source="Jang et al. 2024 (Model Stock)",
)(_model_stock_apply)

_GM_PARAMS = {
    "eps": Param(1e-6, "Weiszfeld: floor of the distances", 0.0, low_open=True),
    "maxiter": Param(100, "Weiszfeld: most iterations", 0),
    "ftol": Param(1e-20, "Weiszfeld: relative change of the objective that stops it", 0.0),
}


def _gm_prepare(source: ChunkSource, ctx: ChunkContext, eps: float, maxiter: int, ftol: float) -> np.ndarray:
    return weiszfeld_weights(gram_matrix(source, _fill_centred, source.n_inputs), eps, maxiter, ftol)


@merge_method(
    "geometric_median",
    "Weiszfeld geometric median of θ_i (whole tensor as one point)",
    params=_GM_PARAMS,
    prepare=_gm_prepare,
    needs=_TENSOR,
    temporaries=lambda n: n + 3,
    source="Pillutla et al. 2022 (robust aggregation); sd-mecha geometric_median",
)
def _geometric_median(x: list[Tensor], ctx: ChunkContext, w: np.ndarray, **_: Any) -> Tensor:
    return _weighted_average(x, w, ctx)


@dataclass
class _FilteredGM:
    weights: np.ndarray  # Weiszfeld weights of the filtered τ_i
    deltas: list[Tensor] | None  # the filtered τ_i of a one-chunk tensor, handed to apply (computed once)


def _filtered_gm_prepare(source: ChunkSource, ctx: ChunkContext, make: Callable[[list[Tensor], ChunkContext],
                         list[Tensor]], eps: float, maxiter: int, ftol: float) -> _FilteredGM:
    """GM weights of the filtered deltas `make(inputs, ctx)`; a tensor that is one chunk keeps them for apply."""
    kept: list[list[Tensor]] = []

    def keeping(xs: list[Tensor], c: ChunkContext) -> list[Tensor]:
        vs = make(xs, c)
        if c.start == 0 and c.stop == ctx.numel:
            kept.append(vs)
        return vs

    gram = gram_matrix(source, _fill_filtered(keeping), source.n_inputs - 1)
    return _FilteredGM(weiszfeld_weights(gram, eps, maxiter, ftol), kept[0] if kept else None)


def _filtered(stats: _FilteredGM, x: list[Tensor], ctx: ChunkContext,
              make: Callable[[list[Tensor], ChunkContext], list[Tensor]]) -> list[Tensor]:
    """The filtered deltas of this chunk: those prepare kept (used once), else made again."""
    kept = _kept_deltas(stats, ctx)
    return kept if kept is not None else make(x, ctx)


def _tgmd_deltas(x: list[Tensor], ctx: ChunkContext) -> list[Tensor]:
    return _signed_filter(_deltas(x, ctx), "count", ctx)[0]


def _tgmd_prepare(source: ChunkSource, ctx: ChunkContext, eps: float, maxiter: int, ftol: float) -> _FilteredGM:
    return _filtered_gm_prepare(source, ctx, _tgmd_deltas, eps, maxiter, ftol)


@merge_method(
    "tgmd",
    "θ_base + GM of TIES-SOUP sign-filtered τ_i (disagreeing entries as zeros)",
    params=_GM_PARAMS,
    inputs="base+models",
    prepare=_tgmd_prepare,
    needs=_TENSOR,
    source="the merging seed (TIES-SOUP + geometric median)",
)
def _tgmd(x: list[Tensor], ctx: ChunkContext, stats: _FilteredGM, **_: Any) -> Tensor:
    return _weighted_average(_filtered(stats, x, ctx, _tgmd_deltas), stats.weights, ctx).add_(x[0])


def _dgmla_deltas(x: list[Tensor], ctx: ChunkContext, p: float, della_eps: float) -> list[Tensor]:
    return _signed_filter(_della_drop(_deltas(x), ctx, p, della_eps), "count")[0]


def _dgmla_prepare(
    source: ChunkSource, ctx: ChunkContext, p: float, della_eps: float, eps: float, maxiter: int, ftol: float
) -> _FilteredGM:
    make = lambda xs, c: _dgmla_deltas(xs, c, p, della_eps)  # noqa: E731
    return _filtered_gm_prepare(source, ctx, make, eps, maxiter, ftol)


@merge_method(
    "dgmla",
    "TGMD over DELLA-dropped deltas (p = 0.1, ε = −0.1)",
    params={"p": DROP_P, "della_eps": DELLA_EPS, **_GM_PARAMS},
    inputs="base+models",
    prepare=_dgmla_prepare,
    needs=lambda p: frozenset({"tensor", "row"}),
    random=True,
    source="the merging seed (DELLA + TGMD)",
)
def _dgmla(x: list[Tensor], ctx: ChunkContext, stats: _FilteredGM, p: float, della_eps: float, **_: Any) -> Tensor:
    make = lambda xs, c: _dgmla_deltas(xs, c, p, della_eps)  # noqa: E731
    return _weighted_average(_filtered(stats, x, ctx, make), stats.weights, ctx).add_(x[0])


def _slerp_prepare(source: ChunkSource, ctx: ChunkContext, t: float) -> tuple[float, float]:
    g = gram_matrix(source, _fill_copy, 2)
    na, nb = math.sqrt(max(g[0, 0], 0.0)), math.sqrt(max(g[1, 1], 0.0))
    if na == 0.0 or nb == 0.0:
        return 1.0, 0.0
    return float(g[0, 1]) / (na * nb), 0.0


def _slerp_apply(x: list[Tensor], ctx: ChunkContext, stats: tuple[float, float], t: float) -> Tensor:
    cos = max(-1.0, min(1.0, stats[0]))
    if abs(cos) > 0.9995:  # nearly parallel: SLERP degenerates to LERP
        return x[0] * (1.0 - t) + x[1] * t
    omega = math.acos(cos)
    s = math.sin(omega)
    return x[0] * (math.sin((1.0 - t) * omega) / s) + x[1] * (math.sin(t * omega) / s)


merge_method(
    "slerp",
    "sin((1−t)Ω)/sin Ω·A + sin(tΩ)/sin Ω·B, Ω = angle between A and B (LERP when |cos Ω| > 0.9995)",
    params={"t": Param(0.5, "position from A (0) to B (1) (MBW)")},
    inputs=2,
    prepare=_slerp_prepare,
    needs=_TENSOR,
    strength="t",
    temporaries=lambda n: 4,
    source="Shoemake 1985; mergekit / sd-mecha slerp",
)(_slerp_apply)

# the methods of mergekit, sd-mecha and supermerger that the seed did not have
from merge_tools import peer_methods as _peer_methods  # noqa: E402,F401  (registers them)
