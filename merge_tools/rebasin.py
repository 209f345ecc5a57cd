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

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from tqdm import tqdm

from merge_tools.io import OutputEntry, SafetensorsWriter, TensorReader, finalize, refuse_overwrite, side_paths
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


def _rows(t: Tensor, m: Member, size: int) -> Tensor:
    """The member's elements as rows: [size, rest] (fp32: the similarities only rank candidate matches)."""
    moved = t.narrow(m.axis, m.offset, size).movedim(m.axis, 0)
    return moved.reshape(size, -1).to(torch.float32)


def _similarity(part: Part, size: int, a: dict[str, Tensor], b: dict[str, Tensor]) -> np.ndarray:
    """S[i, j] = Σ_members <A_i, B_j> as one fp32 GEMM of the members' rows side by side (the similarities only
    rank candidate matches; fp32 runs at twice to four times the fp64 speed and the sum needs no extra pass)."""
    rows_a = torch.cat([_rows(a[m.key], m, size) for m in part.members], dim=1)
    rows_b = torch.cat([_rows(b[m.key], m, size) for m in part.members], dim=1)
    return (rows_a @ rows_b.T).numpy()


def _assign(score: np.ndarray) -> tuple[np.ndarray, float]:
    rows, cols = linear_sum_assignment(score, maximize=True)
    return cols[np.argsort(rows)], float(score[rows, cols].sum())


def solve_group(group: PermGroup, sims: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per part, the permutation maximising Σ_parts trace(S P) under the group's block structure."""
    bs, nb = group.block, group.size // group.block
    if nb == 1:
        return [_assign(s)[0] for s in sims]
    inner: dict[tuple[int, int], list[np.ndarray]] = {}
    score = np.zeros((nb, nb))
    for i in range(nb):
        for j in range(nb):
            perms = []
            for s in sims:
                perm, value = _assign(s[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs])
                perms.append(perm)
                score[i, j] += value
            inner[i, j] = perms
    outer, _ = _assign(score)
    out = []
    for k in range(len(sims)):
        perm = np.empty(group.size, dtype=np.int64)
        for i, j in enumerate(outer):
            perm[i * bs : (i + 1) * bs] = j * bs + inner[i, int(j)][k]
        out.append(perm)
    return out


def _read(reader: TensorReader, key: str) -> Tensor:
    info = reader.header.tensors[key]
    return reader.read(key).view(tuple(info.shape))


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
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RebasinReport:
    """Write B aligned to A (function-identical to B) to `output`."""
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
        metadata = dict(rb.header.metadata) | {
            "sd_merge_rebasin": json.dumps({"reference": a.name, "groups": len(groups)})
        }
        entries = [OutputEntry(k, info.dtype, tuple(info.shape)) for k, info in rb.header.tensors.items()]
        partial, _ = side_paths(output)
        writer = SafetensorsWriter(partial, entries, metadata)
        try:
            # each group's tensors are written as soon as its permutation is known (B is read once)
            for g in tqdm(groups, desc="rebasin", unit="group", disable=not progress):
                keys = {m.key for part in g.parts for m in part.members}
                ta = {k: _read(ra, k) for k in keys}
                tb = {k: _read(rb, k) for k in keys}
                sims = [_similarity(part, g.size, ta, tb) for part in g.parts]
                perms = solve_group(g, sims)
                before = float(sum(np.trace(s) for s in sims))
                after = float(sum(s[np.arange(g.size), p].sum() for s, p in zip(sims, perms)))
                report.groups.append(GroupResult(g.name, perms, before, after))
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
            for key, info in rb.header.tensors.items():  # the rest: copied as stored, chunk by chunk
                if key in owner:
                    continue
                for start in range(0, info.numel, 1 << 24):
                    writer.write(key, start, rb.read(key, start, min(info.numel, start + (1 << 24))))
            writer.sync()
            writer.close()
            finalize(partial, output)
        except BaseException:
            writer.close()
            partial.unlink(missing_ok=True)
            raise
    finally:
        ra.close()
        rb.close()
    total_before = sum(g.before for g in report.groups)
    total_after = sum(g.after for g in report.groups)
    log(f"wrote {output}: {report.changed} of {len(report.groups)} permutation groups reordered; "
        f"Σ<A, B> {total_before:.6g} → {total_after:.6g}")
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
