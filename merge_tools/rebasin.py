"""`sd-merge rebasin A B -o B_aligned`: Git Re-Basin weight matching for SD1/SD2/SDXL UNets (ldm layout).

B is rewritten in A's "basis": hidden units that the network's function does not order are permuted so
that B's weights line up with A's, which makes averaging them meaningful (Ainsworth et al. 2023, weight
matching). The aligned B computes exactly what B computes: only the order of units changes.

Permutation groups (all inside a block; see `permutation_groups`):
- ResBlock hidden channels: rows of `in_layers.2` (conv) and `emb_layers.1`, the `out_layers.0` GroupNorm,
  columns of `out_layers.3`. GroupNorm normalises groups of C/G consecutive channels, so only permutations
  that keep groups whole are symmetries: channels move within a group and groups move as blocks.
- attention heads (attn1, attn2): heads move as blocks through to_q/to_k/to_v rows and to_out.0 columns;
  inside a head the q/k dimensions move together (q·k is unchanged) and the v dimensions with to_out's
  columns, each head with its own inner permutation.
- feed-forward hidden units: GEGLU rows of `ff.net.0.proj` (value and gate halves together), columns of
  `ff.net.2`.
The residual stream (block input/output channels) is not permuted: skip connections tie it across a whole
resolution level, encoder to decoder. Every tensor is touched by one group per axis, so the groups are
independent and each is solved exactly: for block-structured groups an outer assignment over blocks whose
scores are the inner assignments' optima (scipy's linear_sum_assignment, maximising Σ <A, P·B>).
Memory: one group's tensors of both models at a time; each group's tensors are written as soon as its
permutation is solved, so B is read once and the output is streamed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from tqdm import tqdm

from merge_tools.io import OutputEntry, SafetensorsWriter, TensorReader, finalize, refuse_overwrite, side_paths
from merge_tools.methods import Workspace
from sd_scripts_surge.models.fileio import CheckpointError
from sd_scripts_surge.models.keymap import detect_architecture

UNET = "model.diffusion_model."
REBASIN_PARAMS = ("head_dim", "heads", "norm_groups")


@dataclass(frozen=True)
class Member:
    """Elements [offset, offset + size) along `axis` of tensor `key` follow the part's permutation."""

    key: str
    axis: int
    offset: int = 0


@dataclass
class Part:
    members: list[Member]


@dataclass
class PermGroup:
    name: str
    size: int  # permuted elements per part
    block: int  # elements per block (GroupNorm group, attention head); == size: no block structure
    parts: list[Part]  # parts share the block permutation; each has its own permutation inside blocks


@dataclass
class GroupResult:
    name: str
    perms: list[np.ndarray]  # per part: new position i takes B's element perms[i]
    before: float  # Σ <A, B> over the group's weights
    after: float  # Σ <A, P·B>


@dataclass
class RebasinReport:
    groups: list[GroupResult] = field(default_factory=list)
    bf16_parts: int = 0  # unblocked parts whose matching the certified bf16 GEMM settled

    @property
    def changed(self) -> int:
        return sum(any((p != np.arange(p.size)).any() for p in g.perms) for g in self.groups)


def permutation_groups(
    shapes: dict[str, tuple[int, ...]], head_dim: Callable[[int], int], norm_groups: int
) -> list[PermGroup]:
    """The permutation groups of an ldm UNet (keys with `model.diffusion_model.`).

    head_dim(inner) gives the head width of an attention with `inner` channels.
    """
    groups: list[PermGroup] = []
    for key in shapes:
        if key.startswith(UNET) and key.endswith(".in_layers.2.weight"):
            p = key[: -len(".in_layers.2.weight")]
            hidden = shapes[key][0]
            if hidden % norm_groups:
                raise CheckpointError(f"{p}: {hidden} channels do not split into {norm_groups} GroupNorm groups")
            members = [Member(f"{p}.in_layers.2.weight", 0), Member(f"{p}.in_layers.2.bias", 0),
                       Member(f"{p}.out_layers.0.weight", 0), Member(f"{p}.out_layers.0.bias", 0),
                       Member(f"{p}.out_layers.3.weight", 1)]
            if f"{p}.emb_layers.1.weight" in shapes:
                members += [Member(f"{p}.emb_layers.1.weight", 0), Member(f"{p}.emb_layers.1.bias", 0)]
            groups.append(PermGroup(p[len(UNET):], hidden, hidden // norm_groups, [Part(members)]))
        elif key.startswith(UNET) and key.endswith(".ff.net.0.proj.weight"):
            p = key[: -len(".ff.net.0.proj.weight")]
            hidden = shapes[key][0] // 2
            members = [Member(f"{p}.ff.net.0.proj.weight", 0), Member(f"{p}.ff.net.0.proj.weight", 0, hidden),
                       Member(f"{p}.ff.net.2.weight", 1)]
            if f"{p}.ff.net.0.proj.bias" in shapes:
                members += [Member(f"{p}.ff.net.0.proj.bias", 0), Member(f"{p}.ff.net.0.proj.bias", 0, hidden)]
            groups.append(PermGroup(p[len(UNET):] + ".ff", hidden, hidden, [Part(members)]))
        elif key.startswith(UNET) and re.search(r"\.attn[12]\.to_q\.weight$", key):
            p = key[: -len(".to_q.weight")]
            inner = shapes[key][0]
            width = head_dim(inner)
            if width < 1 or inner % width:
                raise CheckpointError(f"{p}: {inner} attention channels do not split into heads of {width} "
                                      "(set --head-dim or --heads)")
            qk = Part([Member(f"{p}.to_q.weight", 0), Member(f"{p}.to_k.weight", 0)])
            v = Part([Member(f"{p}.to_v.weight", 0), Member(f"{p}.to_out.0.weight", 1)])
            groups.append(PermGroup(p[len(UNET):], inner, width, [qk, v]))
    for g in groups:
        for part in g.parts:
            part.members = [m for m in part.members if m.key in shapes]
    return groups


def _take(ws: Workspace, role: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A persistent buffer of `ws` shaped `shape`: a group's reads, rows and products reuse memory already
    faulted in (fresh ~100 MB allocations cost as much in page faults as the copies that fill them)."""
    return ws.get((role,), math.prod(shape), dtype).view(tuple(shape))


def _into(ws: Workspace, role: str) -> Callable[[int], Tensor]:
    return lambda nbytes: ws.get((role,), nbytes, torch.uint8)


def _part_rows(part: Part, size: int, t: dict[str, Tensor], out: Tensor) -> Tensor:
    """The members' rows side by side in `out` ([size, Σ rest] fp32): each copied (and widened) once."""
    views = [t[m.key].narrow(m.axis, m.offset, size).movedim(m.axis, 0).reshape(size, -1) for m in part.members]
    col = 0
    for v in views:
        out[:, col : col + v.shape[1]].copy_(v)
        col += v.shape[1]
    return out


def _rows_pair(part: Part, size: int, a: dict[str, Tensor], b: dict[str, Tensor],
               ws: Workspace) -> tuple[Tensor, Tensor]:
    """Both models' rows of a part, fp32, in `ws`'s persistent row buffers."""
    width = sum(a[m.key].numel() // a[m.key].shape[m.axis] for m in part.members)
    return (_part_rows(part, size, a, _take(ws, "rows_a", (size, width), torch.float32)),
            _part_rows(part, size, b, _take(ws, "rows_b", (size, width), torch.float32)))


def _similarity(part: Part, size: int, a: dict[str, Tensor], b: dict[str, Tensor], ws: Workspace,
                role: str) -> np.ndarray:
    """S[i, j] = Σ_members <A_i, B_j> as one fp32 GEMM of the members' rows side by side (the similarities only
    rank candidate matches; fp32 runs at twice to four times the fp64 speed and the sum needs no extra pass)."""
    rows_a, rows_b = _rows_pair(part, size, a, b, ws)
    return torch.mm(rows_a, rows_b.T, out=_take(ws, "sim" + role, (size, size), torch.float32)).numpy()


BF16_UNIT = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
FP32_UNIT = 2.0**-24
SIMILARITY_MODES = ("auto", "fp32", "bf16")
BF16_MIN_MACS = 1 << 30  # auto: products smaller than this stay in fp32 (the bound's passes would not pay)


@functools.cache
def bf16_gemm_pays() -> bool:
    """Whether a bf16 GEMM runs clearly faster than fp32 here (AMX / AVX512-BF16 CPUs, GPUs): timed once."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 2048, generator=gen), torch.randn(1024, 2048, generator=gen)

    def best(a: Tensor, b: Tensor) -> float:
        a @ b.T
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b.T
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(x.bfloat16(), y.bfloat16()) < 0.6 * best(x, y)


def _certified_bf16_match(
    rows_a: Tensor, rows_b: Tensor, ws: Workspace | None = None
) -> tuple[np.ndarray, float, float] | None:
    """The assignment of an unblocked part from a bf16 GEMM, when a rounding-error bound proves it is the one the
    fp32 similarities give (each row's best column, all distinct); None when the bound cannot prove it.

    rows_a, rows_b: fp32 [size, k], the stored values. With u = 2^-8 (bf16) and γ = k·2^-24/(1 - k·2^-24) (an fp32
    sum of k terms, in any order), the bf16 product Ŝ (inputs rounded to bf16, products exact in fp32, fp32 sums,
    output rounded to bf16) is within u/(1-u)·|Ŝ_ij| + ((1+u)²(1+γ) - 1)·‖a_i‖‖b_j‖ of the exact S_ij, and the fp32
    GEMM within γ‖a_i‖‖b_j‖ (Cauchy-Schwarz bounds Σ|a_k b_k|). Row i's pick σ(i) = argmax_j Ŝ_ij is certified
    when its fp32 score less 2γ‖a_i‖‖b_σ(i)‖ beats the runner-up R_i = max_{j≠σ(i)} Ŝ_ij raised by that bound
    (R_i + u/(1-u)|R_i| + (((1+u)²(1+γ) - 1) + γ)·‖a_i‖·max_j ‖b_j‖): then σ(i) is also row i's best column in the
    fp32 similarities, so σ, a permutation, is what the fp32 path returns (`_assign`'s row-maximum case). Rows
    the coarse max_j ‖b_j‖ leaves unsure (at most size/8) are settled on their own fp32 rows, each column with its
    own ±2γ‖a_i‖‖b_j‖. Two fine-tunes of one base clear it by a wide margin (measured on SDXL: the best column
    leads by 0.9‖a‖‖b‖, the bound is 0.008‖a‖ max‖b‖). Returns (σ, Σ<A_i, B_i>, Σ<A_i, B_σ(i)>), the sums in fp32."""
    size, k = rows_a.shape
    if size < 2:  # nothing to match
        return None
    ws = ws or Workspace()
    low_a = _take(ws, "bf16_a", (size, k), torch.bfloat16).copy_(rows_a)
    low_b = _take(ws, "bf16_b", (size, k), torch.bfloat16).copy_(rows_b)
    top = torch.mm(low_a, low_b.T, out=_take(ws, "bf16_sim", (size, size), torch.bfloat16)).topk(2, dim=1)
    cols = top.indices[:, 0]
    if int(torch.bincount(cols, minlength=size).max()) > 1:
        return None
    runner_up = top.values[:, 1].float()
    norm_a, norm_b = rows_a.norm(dim=1), rows_b.norm(dim=1)
    gamma = k * FP32_UNIT / (1 - k * FP32_UNIT)
    # 1.01: room for the fp32 rounding of the bound's own arithmetic (relative ~1e-6, against c ≥ 2u ≈ 8e-3)
    c = 1.01 * ((1 + BF16_UNIT) ** 2 * (1 + gamma) - 1 + gamma)
    rival = runner_up + 1.01 * BF16_UNIT / (1 - BF16_UNIT) * runner_up.abs() + c * norm_a * norm_b.max()
    identity = bool((cols == torch.arange(size)).all())
    picked = torch.einsum("ij,ij->i", rows_a, rows_b if identity else rows_b[cols])
    lower = picked - 2.02 * gamma * norm_a * norm_b[cols]
    unsure = torch.nonzero(lower <= rival).flatten()
    if unsure.numel() > size // 8:
        return None
    if unsure.numel():  # rows the coarse bound cannot settle (small ‖a_i‖ against max ‖b‖): their fp32 rows
        rows = rows_a[unsure] @ rows_b.T  # ± γ‖a_i‖‖b_j‖ of the exact ones, as is the full fp32 GEMM
        slack = 2.02 * gamma * torch.outer(norm_a[unsure], norm_b)
        best = (rows - slack).gather(1, cols[unsure, None])[:, 0]
        rows.add_(slack)
        rows.scatter_(1, cols[unsure, None], -torch.inf)
        if not bool((best > rows.max(dim=1).values).all()):
            return None
    before = picked if identity else torch.einsum("ij,ij->i", rows_a, rows_b)
    return cols.numpy(), float(before.double().sum()), float(picked.double().sum())


def _argmax_permutation(score: np.ndarray) -> np.ndarray | None:
    """Each row's best column, when no two rows share one: then it is the optimal assignment (its value, the sum
    of the row maxima, bounds every assignment's from above), found without solving the assignment problem."""
    cols = score.argmax(axis=1)
    return cols if np.bincount(cols, minlength=score.shape[1]).max() <= 1 else None


def _assign(score: np.ndarray) -> tuple[np.ndarray, float]:
    cols = _argmax_permutation(score)
    if cols is not None:  # two fine-tunes of one base: nearly always, and 20-1000x cheaper than the solver
        return cols, float(score[np.arange(score.shape[0]), cols].sum())
    rows, cols = linear_sum_assignment(score, maximize=True)
    return cols[np.argsort(rows)], float(score[rows, cols].sum())


def solve_group(group: PermGroup, sims: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per part, the permutation maximising Σ_parts trace(S P) under the group's block structure.

    Block structure: the outer assignment over blocks scores block pair (i, j) with the optimum of its inner
    assignments. Each pair starts at an upper bound, the sum of its rows' maxima, which is its exact value when
    the row maxima fall in distinct columns (`_argmax_permutation`, checked for every pair at once); the outer
    problem is solved on these values, and the pairs it picks whose value is only a bound are solved exactly and
    it is solved again, until every picked pair is exact. The result is optimal for the exact values: the bounds
    are never below them, and the final choice scores its exact value."""
    bs, nb = group.block, group.size // group.block
    if nb == 1:
        return [_assign(s)[0] for s in sims]
    score = np.zeros((nb, nb))
    exact = np.ones((nb, nb), dtype=bool)
    inner: list[np.ndarray] = []  # per part: [nb, nb, bs] the inner permutation of each pair, where exact
    for s in sims:
        blocks = np.asarray(s).reshape(nb, bs, nb, bs).transpose(0, 2, 1, 3)  # [i, j, row, col]
        cols = blocks.argmax(axis=3)
        score += np.take_along_axis(blocks, cols[..., None], axis=3)[..., 0].sum(axis=2)
        exact &= (np.sort(cols, axis=2) == np.arange(bs)).all(axis=2)
        inner.append(cols)
    solved: dict[tuple[int, int], list[np.ndarray]] = {}
    while True:
        outer = _assign(score)[0]
        pending = [(i, int(j)) for i, j in enumerate(outer) if not exact[i, j] and (i, int(j)) not in solved]
        if not pending:
            break
        for i, j in pending:
            perms, value = [], 0.0
            for s in sims:
                perm, v = _assign(np.asarray(s)[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs])
                perms.append(perm)
                value += v
            solved[i, j] = perms
            score[i, j] = value
            exact[i, j] = True
    out = []
    for k in range(len(sims)):
        perm = np.empty(group.size, dtype=np.int64)
        for i, j in enumerate(outer):
            found = solved[i, int(j)][k] if (i, int(j)) in solved else inner[k][i, int(j)]
            perm[i * bs : (i + 1) * bs] = int(j) * bs + found
        out.append(perm)
    return out


def match_group(
    group: PermGroup, a: dict[str, Tensor], b: dict[str, Tensor], bf16: bool | str = False,
    ws: Workspace | None = None,
) -> tuple[list[np.ndarray], float, float, int]:
    """The group's permutations and Σ<A, B> before / after, and how many parts the certified bf16 GEMM settled.

    bf16: try `_certified_bf16_match` on unblocked parts (True: every one; "large": those of ≥ BF16_MIN_MACS
    multiply-adds); a part it cannot certify falls back to the fp32 similarities. The result is the same."""
    ws = ws or Workspace()
    n = group.size
    for side, tensors in (("A", a), ("B", b)):  # a non-finite weight would poison every similarity it touches
        for key, t in tensors.items():
            if t.is_floating_point() and t.numel() and not all(map(math.isfinite, map(float, torch.aminmax(t)))):
                raise CheckpointError(f"{key} in model {side} holds NaN or Inf values; rebasin needs finite weights")
    if group.block == n and bf16:
        perms, before, after, fast = [], 0.0, 0.0, 0
        for part in group.parts:
            rows_a, rows_b = _rows_pair(part, n, a, b, ws)
            found = None
            if bf16 is True or n * n * rows_a.shape[1] >= BF16_MIN_MACS:
                found = _certified_bf16_match(rows_a, rows_b, ws)
            if found is None:
                sim = torch.mm(rows_a, rows_b.T, out=_take(ws, "sim", (n, n), torch.float32)).numpy()
                perm, value = _assign(sim)
                found = perm, float(np.trace(sim)), value
            else:
                fast += 1
            perms.append(found[0])
            before += found[1]
            after += found[2]
        return perms, before, after, fast
    sims = [_similarity(part, n, a, b, ws, str(i)) for i, part in enumerate(group.parts)]
    perms = solve_group(group, sims)
    before = float(sum(np.trace(s) for s in sims))
    after = float(sum(s[np.arange(group.size), p].sum() for s, p in zip(sims, perms)))
    return perms, before, after, 0


def _read(reader: TensorReader, key: str, into: Callable[[int], Tensor] | None = None) -> Tensor:
    info = reader.header.tensors[key]
    return reader.read(key, into=into).view(tuple(info.shape))


def head_width(arch: str, head_dim: int | None, heads: int | None) -> Callable[[int], int]:
    """Head width per attention: --head-dim, or channels / --heads; by default SDXL/SD2 use 64-wide heads
    and SD1 8 heads (diffusers' configs for those models)."""
    if head_dim is not None and heads is not None:
        raise ValueError("give --head-dim or --heads, not both")
    if head_dim is None and heads is None:
        head_dim, heads = (64, None) if arch in ("sdxl", "sd2") else (None, 8)
    if head_dim is not None:
        return lambda inner: head_dim
    assert heads is not None
    return lambda inner: inner // heads if inner % heads == 0 else 0


def rebasin(
    a: str | os.PathLike,
    b: str | os.PathLike,
    output: str | os.PathLike,
    *,
    head_dim: int | None = None,
    heads: int | None = None,
    norm_groups: int = 32,
    similarity: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RebasinReport:
    """Write B aligned to A (function-identical to B) to `output`.

    similarity: "fp32", "bf16" (the feed-forward-sized products as bf16 GEMMs, each result proven equal to the
    fp32 one by a rounding-error bound or recomputed in fp32: `_certified_bf16_match`), or "auto" (bf16 for the
    products of ≥ BF16_MIN_MACS multiply-adds where a bf16 GEMM measures faster here). The output is the same."""
    if similarity not in SIMILARITY_MODES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITY_MODES)}, not {similarity!r}")
    a, b, output = Path(a), Path(b), Path(output)
    refuse_overwrite(output, (a, b))
    ra, rb = TensorReader(a), TensorReader(b)
    try:
        shapes_a = {k: tuple(v.shape) for k, v in ra.header.tensors.items()}
        shapes_b = {k: tuple(v.shape) for k, v in rb.header.tensors.items()}
        arch = detect_architecture(shapes_b)
        if arch.name not in ("sd1", "sd2", "sdxl") or arch.layout != "ldm":
            raise CheckpointError(f"{b}: rebasin needs an SD1/SD2/SDXL single-file (ldm) UNet, found {arch.name}")
        groups = permutation_groups(shapes_b, head_width(arch.name, head_dim, heads), norm_groups)
        for g in groups:
            for part in g.parts:
                for m in part.members:
                    if shapes_a.get(m.key) != shapes_b[m.key]:
                        raise CheckpointError(
                            f"{m.key}: shape {shapes_a.get(m.key)} in {a} vs {shapes_b[m.key]} in {b}; "
                            "rebasin needs two models of the same architecture"
                        )
        owner: dict[str, str] = {}
        for g in groups:
            for key in {m.key for part in g.parts for m in part.members}:
                if key in owner:
                    raise RuntimeError(f"{key} is in two permutation groups ({owner[key]}, {g.name})")
                owner[key] = g.name
        report = RebasinReport()
        use_bf16: bool | str = {"fp32": False, "bf16": True}.get(similarity, "large" if bf16_gemm_pays() else False)
        metadata = dict(rb.header.metadata) | {
            "sd_merge_rebasin": json.dumps({"reference": a.name, "groups": len(groups)})
        }
        entries = [OutputEntry(k, info.dtype, tuple(info.shape)) for k, info in rb.header.tensors.items()]
        partial, _ = side_paths(output)
        writer = SafetensorsWriter(partial, entries, metadata)
        pool: ThreadPoolExecutor | None = None
        try:
            # each group's tensors are written as soon as its permutation is known (B is read once)
            # the next group's tensors are read on a thread while this one is solved (preadv releases the GIL),
            # into buffers of its own parity, so reads, rows and products all reuse memory
            ws = Workspace()

            def load(n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
                keys = sorted({m.key for part in groups[n].parts for m in part.members})
                return ({k: _read(ra, k, _into(ws, f"{n % 2}a{i}")) for i, k in enumerate(keys)},
                        {k: _read(rb, k, _into(ws, f"{n % 2}b{i}")) for i, k in enumerate(keys)})

            pool = ThreadPoolExecutor(1, thread_name_prefix="rebasin-read")
            pending = pool.submit(load, 0) if groups else None
            for n, g in enumerate(tqdm(groups, desc="rebasin", unit="group", disable=not progress)):
                assert pending is not None
                ta, tb = pending.result()
                pending = pool.submit(load, n + 1) if n + 1 < len(groups) else None
                perms, before, after, fast = match_group(g, ta, tb, use_bf16, ws)
                report.groups.append(GroupResult(g.name, perms, before, after))
                report.bf16_parts += fast
                index: dict[str, dict[int, np.ndarray]] = {}
                for part, perm in zip(g.parts, perms):
                    for m in part.members:
                        idx = index.setdefault(m.key, {}).setdefault(m.axis, np.arange(shapes_b[m.key][m.axis]))
                        idx[m.offset : m.offset + g.size] = m.offset + perm
                for key, axes in index.items():
                    t = tb[key]
                    for axis, idx in axes.items():
                        if (idx != np.arange(idx.size)).any():
                            t = t.index_select(axis, torch.from_numpy(idx))
                    writer.write(key, 0, t.contiguous().reshape(-1))
            pool.shutdown()
            for key, info in rb.header.tensors.items():  # the rest: copied as stored, chunk by chunk
                if key in owner:
                    continue
                for start in range(0, info.numel, 1 << 24):
                    writer.write(key, start, rb.read(key, start, min(info.numel, start + (1 << 24))))
            writer.sync()
            writer.close()
            finalize(partial, output)
        except BaseException:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            writer.close()
            partial.unlink(missing_ok=True)
            raise
    finally:
        ra.close()
        rb.close()
    total_before = sum(g.before for g in report.groups)
    total_after = sum(g.after for g in report.groups)
    fast = f"; {report.bf16_parts} settled by the certified bf16 GEMM" if report.bf16_parts else ""
    log(f"wrote {output}: {report.changed} of {len(report.groups)} permutation groups reordered; "
        f"Σ<A, B> {total_before:.6g} → {total_after:.6g}{fast}")
    return report


def aligned_cache_path(a: Path, b: Path, params: dict[str, object]) -> Path:
    """Where a recipe's `rebasin` node keeps B aligned to A: the cache folder, keyed by both files' sampled
    hashes and the parameters, so an unchanged recipe reuses it ($SURGE_CACHE_DIR or ~/.cache/sd-scripts-surge)."""
    import hashlib

    from merge_tools.io import file_fingerprint

    fingerprints = [file_fingerprint(p) if p.exists() else str(p.resolve()) for p in (a, b)]
    key = json.dumps([fingerprints, sorted(params.items())], sort_keys=True, default=str)
    root = Path(os.environ.get("SURGE_CACHE_DIR", Path.home() / ".cache" / "sd-scripts-surge"))
    return root / "rebasin" / f"{b.stem}.aligned-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def materialize(models: Sequence[object], log: Callable[[str], None] = print) -> None:
    """Make the aligned files of a recipe's rebasin nodes that are not cached yet."""
    for m in models:
        derive = getattr(m, "derive", None)
        if derive is None or m.path.exists():  # type: ignore[attr-defined]
            continue
        _, a, b, params = derive
        m.path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[attr-defined]
        log(f"rebasin: aligning {b.path.name} to {a.path.name} for the recipe")
        rebasin(a.path, b.path, m.path, log=log, **params)  # type: ignore[attr-defined]
