"""The streaming merge engine: validate, plan, estimate, then evaluate a recipe tree tensor by tensor.

Per output key the engine picks a chunk size from the memory budget (aligned to what the recipe's methods
need: whole rows, fixed reduction blocks), computes whole-tensor statistics in extra passes over the chunks
when a method asks for them (TIES' thresholds, Model Stock's cosines, Weiszfeld weights), then evaluates the
tree chunk by chunk and writes each chunk at its final offset in the output. When a key fits in one chunk
its inputs are read once and kept for all passes. Peak memory is bounded by the budget whatever the number
of models: only one chunk of each input is alive at a time (TIES with k < 1 also holds one model's |τ| for
the largest tensor, in fp64, to select its exact top-k threshold).

Memory budget accounting (per chunk element; compute dtype size c, stored dtype size s per input):
inputs 2·s (read + prefetch) + c, each method node ``spec.temporaries(n_inputs)``·c, output 2 bytes; the
budget minus the process' RSS at start and 64 MiB of slack is what chunks may use. A tensor that fits is one
chunk; a chunked tensor under TIES (k < 1) also reserves numel·8 bytes for the exact top-k selection.
Results do not depend on the chunk size (see methods.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from merge_tools import methods
from merge_tools.io import (
    Journal,
    OutputEntry,
    SafetensorsWriter,
    TensorReader,
    file_fingerprint,
    finalize,
    format_size,
    side_paths,
)
from merge_tools.recipe import ModelRef, Node, Recipe, canonical_json
from sd_scripts_surge.models.fileio import SAFETENSORS_DTYPES, CheckpointError, ensure_free_space
from sd_scripts_surge.models.io import CONFIG_METADATA_KEYS
from sd_scripts_surge.models.keymap import (
    Architecture,
    BlockWeights,
    ElementalRule,
    block_of,
    detect_architecture,
    elemental_value,
    parse_elemental,
)

ENGINE_VERSION = "1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_FLOAT_ST = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_SLACK = 64 << 20
_JOURNAL_EVERY_S = 2.0


@dataclass
class MergeOptions:
    output_dtype: str = "fp16"
    compute_dtype: str = "fp64"
    threads: int = 0  # 0: all cores
    memory_budget: int | None = None  # bytes; None: 25% of available RAM
    missing_keys: str = "error"  # error | skip | base
    resume: bool = False
    seed: int = 0
    check_finite: str = "stream"  # stream (while merging) | pre (full scan first) | off
    progress: bool = True
    max_chunk_elements: int | None = None  # cap on chunk size (tests, debugging)
    log: Callable[[str], None] = print
    on_key_done: Callable[[str, int], None] | None = None  # called after each key is written (tests)


@dataclass
class KeyPlan:
    key: str
    shape: tuple[int, ...]
    out_dtype: str
    mode: str  # "merge" or "copy"
    block: str | None
    chunk: int = 0  # elements per chunk (merge)
    align: int = 1
    sources: dict[str, int] = field(default_factory=dict)  # model path -> index of the model to read it from

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        n = self.numel
        step = max(self.chunk, 1)
        return [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]


@dataclass
class MergeReport:
    output: Path
    keys: int
    merged: int
    copied: int
    seconds: float
    peak_rss: int
    budget: int
    architecture: str
    resumed_keys: int = 0


@functools.lru_cache(maxsize=4096)
def _path_key(path: Path) -> str:
    """A model file's identity (its resolved path), computed once per path: resolving per key and input
    cost ~0.1 ms each, which adds up over thousands of keys times many models."""
    return str(path.resolve())


def default_budget() -> int:
    return int(psutil.virtual_memory().available * 0.25)


# ------------------------------------------------------------------------------------------ validation


def _model_list(root: Node) -> list[ModelRef]:
    return root.models()


def validate_inputs(
    models: Sequence[ModelRef], output: Path, missing_policy: str
) -> tuple[list[TensorReader], dict[str, dict[int, Any]]]:
    """Open every input and check it before any work. Returns readers and key -> {model index: TensorInfo}."""
    if missing_policy not in ("error", "skip", "base"):
        raise ValueError(f"--missing-keys must be error, skip or base, not {missing_policy!r}")
    out_resolved = output.resolve()
    for m in models:
        if m.path.resolve() == out_resolved:
            raise ValueError(f"refusing to overwrite input {m.path}; choose another output path")
    readers = [TensorReader(m.path) for m in models]  # header validation: truncated/corrupt -> CheckpointError
    table: dict[str, dict[int, Any]] = {}
    for i, r in enumerate(readers):
        for k, info in sorted(r.header.tensors.items(), key=lambda kv: kv[1].start):
            table.setdefault(k, {})[i] = info
    for k, per in table.items():
        shapes = {info.shape for info in per.values()}
        if len(shapes) > 1:
            detail = ", ".join(f"{models[i].path.name}: {list(info.shape)}" for i, info in per.items())
            raise CheckpointError(
                f"tensor {k!r} has different shapes across inputs ({detail}); these models cannot be merged"
            )
        kinds = {info.dtype in _FLOAT_ST for info in per.values()}
        if len(kinds) > 1:
            detail = ", ".join(f"{models[i].path.name}: {info.dtype}" for i, info in per.items())
            raise CheckpointError(f"tensor {k!r} is floating point in some inputs and not in others ({detail})")
    incomplete = {k: per for k, per in table.items() if len(per) != len(models)}
    if incomplete and missing_policy == "error":
        lines = []
        for k, per in list(incomplete.items())[:8]:
            lacking = [models[i].path.name for i in range(len(models)) if i not in per]
            lines.append(f"  {k}: missing in {', '.join(lacking)}")
        more = f"\n  … and {len(incomplete) - 8} more" if len(incomplete) > 8 else ""
        raise CheckpointError(
            f"{len(incomplete)} key(s) are not in every input:\n"
            + "\n".join(lines)
            + more
            + "\nuse --missing-keys skip (leave them out) or --missing-keys base (use the base model's tensor)"
        )
    return readers, table


def scan_finite(readers: Sequence[TensorReader], chunk_elements: int = 1 << 24) -> None:
    """Full NaN/Inf scan of every floating tensor of every input (reads everything once)."""
    for r in readers:
        for k, info in r.header.tensors.items():
            if info.dtype not in _FLOAT_ST:
                continue
            for s in range(0, info.numel, chunk_elements):
                _check_finite(r.read(k, s, min(s + chunk_elements, info.numel)), r, k)


def _check_finite(raw: torch.Tensor, reader: TensorReader, key: str) -> None:
    if raw.is_floating_point() and not bool(torch.isfinite(raw).all()):
        bad = int((~torch.isfinite(raw)).sum())
        raise CheckpointError(f"{reader.path}: tensor {key!r} holds {bad} NaN/Inf values; fix or drop this model")


# ------------------------------------------------------------------------------------------ planning


def _resolve_node_params(node: Node, arch: Architecture, block: str | None, key: str | None = None) -> dict[str, Any]:
    """The node's parameters for one block (and key): MBW block weights and elemental rules resolved.

    block None: the defaults of block-weighted parameters (used for planning and the timing probe).
    """
    spec = node.spec
    params = spec.resolve_params(node.params)
    for name, value in list(params.items()):
        param = spec.params[name]
        if param.kind != "float" or not isinstance(value, (list, dict, str)):
            continue
        rules: tuple[ElementalRule, ...] = ()
        if isinstance(value, dict) and "elemental" in value:
            value = dict(value)
            rules = parse_elemental(str(value.pop("elemental")), arch)
            if set(value) == {"default"} and isinstance(value["default"], (int, float)):
                value = value["default"]
            elif not value:
                value = param.default
        label = f"{node.method}.{name}"
        if isinstance(value, (list, dict, str)):
            weights = BlockWeights.parse(value, arch, label, default=param.default if isinstance(value, dict) else None)
            resolved = weights.value(block) if block is not None else param.default
        else:
            resolved = float(value)
        if rules and block is not None and key is not None:
            resolved = elemental_value(rules, block, key, resolved)
        params[name] = param.check(node.method, name, resolved)
    return params


def _align(root: Node, plan_shape: tuple[int, ...], params_of: Callable[[Node], dict[str, Any]]) -> int:
    align = 1
    row = methods.row_length(plan_shape)
    for node in root.nodes():
        needs = node.spec.needs(params_of(node))
        if "whole" in needs:  # one chunk: the whole tensor (also satisfies every other alignment)
            return max(math.prod(plan_shape), 1)
        if "row" in needs:
            align = math.lcm(align, row)
        if "tensor" in needs:
            align = math.lcm(align, methods.REDUCE_BLOCK)
    return align


def _bytes_per_element(root: Node, readers_itemsize: Sequence[int], compute_size: int) -> int:
    per = sum(2 * s + compute_size for s in readers_itemsize) + 2
    for node in root.nodes():
        per += node.spec.temporaries(len(node.inputs)) * compute_size
    return per


def _needs_select_buffer(root: Node, params_of: Callable[[Node], dict[str, Any]]) -> bool:
    """A method selects exactly over the whole tensor (TIES' top-k): one model's |τ| in fp64 is held."""
    return any("select" in n.spec.needs(params_of(n)) for n in root.nodes())


# ------------------------------------------------------------------------------------------ evaluation


class _NodeSource:
    """methods.ChunkSource over one node's inputs, evaluated chunk by chunk by a KeyEvaluator."""

    def __init__(self, ev: KeyEvaluator, node: Node):
        self.ev, self.node = ev, node
        self.n_inputs = len(node.inputs)

    def chunks(self, indices: Sequence[int] | None = None):
        sel = [self.node.inputs[i] for i in (range(self.n_inputs) if indices is None else indices)]
        for ci, (s, e) in enumerate(self.ev.plan.chunks):
            yield self.ev.ctx(s, e), [self.ev.value(item, ci) for item in sel]

    def buffer(self, slot: str, dtype: torch.dtype) -> torch.Tensor:
        return self.ev.ctx(0, self.ev.plan.numel, owner=self.node).buffer(slot, dtype)


class KeyEvaluator:
    """Evaluates a recipe tree for one key, chunk by chunk; caches all values when there is one chunk."""

    def __init__(
        self,
        plan: KeyPlan,
        root: Node,
        read: Callable[[ModelRef, str, int, int], torch.Tensor],
        compute_dtype: torch.dtype,
        params_of: Callable[[Node], dict[str, Any]],
        seed: int,
        prefetched: dict[str, torch.Tensor] | None = None,
        check_leaf: Callable[[ModelRef, torch.Tensor, torch.Tensor], None] | None = None,
        model_stats: dict[int, Any] | None = None,
        workspace: methods.Workspace | None = None,
    ):
        self.plan, self.root, self.read, self.dtype, self.params_of, self.seed = (
            plan,
            root,
            read,
            compute_dtype,
            params_of,
            seed,
        )
        self.prefetched = prefetched or {}
        self.check_leaf = check_leaf
        self.memo: dict[tuple[int, bool], torch.Tensor] = {}
        self.memo_ci: int | None = None
        self.stats: dict[int, Any] = {}
        self.model_stats = model_stats if model_stats is not None else {}
        self.workspace = workspace  # the run's persistent buffers (leaf conversions, node temporaries)

    def ctx(self, start: int, stop: int, owner: Node | None = None) -> methods.ChunkContext:
        """A chunk's context; with `owner`, methods.ChunkContext.buffer hands out that node's buffers."""
        ws = self.workspace if owner is not None else None
        return methods.ChunkContext(self.plan.key, self.plan.shape, start, stop, self.seed, self.dtype, ws, id(owner))

    def prepare(self, below: Node | None = None) -> None:
        """Per-tensor statistics of every node (only of `below`'s inputs' subtrees when given), children first;
        a model-wide method's statistics come from `model_stats`."""
        nodes = below.nodes()[1:] if below is not None else self.root.nodes()
        for node in reversed(nodes):
            if id(node) in self.stats:
                continue
            if node.spec.model_prepare is not None:
                self.stats[id(node)] = self.model_stats[id(node)]
            elif node.spec.prepare is not None:
                ctx = self.ctx(0, self.plan.numel)
                self.stats[id(node)] = node.spec.prepare(_NodeSource(self, node), ctx, **self.params_of(node))

    def value(self, item: Node | ModelRef, ci: int, stored: bool = False) -> torch.Tensor:
        """Chunk `ci` of a node's output, or of a model tensor (in its stored dtype when `stored`)."""
        if ci != self.memo_ci:
            self.memo.clear()
            self.memo_ci = ci
        key = (id(item), stored and isinstance(item, ModelRef))
        if key in self.memo:
            return self.memo[key]
        s, e = self.plan.chunks[ci]
        if isinstance(item, ModelRef):
            if stored:
                raw = self.prefetched.pop(_path_key(item.path), None) if ci == 0 else None
                out = raw if raw is not None else self.read(item, self.plan.key, s, e)
            else:
                raw = self.value(item, ci, stored=True)
                if raw.dtype == self.dtype:
                    out = raw
                elif self.workspace is not None:  # widen into this input's persistent buffer
                    out = self.workspace.get(("leaf", id(item)), raw.numel(), self.dtype).copy_(raw)
                else:
                    out = raw.to(self.dtype)
                if self.check_leaf is not None:
                    self.check_leaf(item, raw, out)
        else:
            spec = item.spec
            inputs = [self.value(i, ci, stored=spec.linear) for i in item.inputs]
            out = spec.apply(inputs, self.ctx(s, e, owner=item), self.stats.get(id(item)), **self.params_of(item))
            if spec.linear and self.check_leaf is not None and not math.isfinite(float(out.sum())):
                for i, x in zip(item.inputs, inputs):
                    if isinstance(i, ModelRef):
                        self.check_leaf(i, x, x)
                raise CheckpointError(
                    f"{item.method} produced NaN/Inf in tensor {self.plan.key!r} (an overflow?); check its inputs"
                )
        self.memo[key] = out
        return out


def model_statistics(
    root: Node,
    plans: Sequence[KeyPlan],
    evaluator: Callable[[KeyPlan, dict[int, Any]], KeyEvaluator],
    progress: bool = False,
) -> dict[int, Any]:
    """Model-wide statistics of every node whose method has `model_prepare` (children first): one pass over the
    whole inputs of every merged tensor per such node, before anything is written."""
    stats: dict[int, Any] = {}
    for node in reversed(root.nodes()):
        if node.spec.model_prepare is None or id(node) in stats:
            continue

        def items(node: Node = node) -> Iterator[tuple[methods.ChunkContext, list[torch.Tensor]]]:
            for p in tqdm(plans, desc=f"{node.method}: model-wide statistics", unit="tensor", disable=not progress):
                if len(p.chunks) != 1:
                    raise RuntimeError(f"{p.key}: {node.method} needs whole tensors, not {len(p.chunks)} chunks")
                ev = evaluator(p, stats)
                ev.prepare(below=node)
                yield ev.ctx(0, p.numel), [ev.value(i, 0) for i in node.inputs]

        stats[id(node)] = node.spec.model_prepare(items())
    return stats


# ------------------------------------------------------------------------------------------ the merge


def prepare_resume(
    partial: Path, journal_path: Path, phash: str, resume: bool, log: Callable[[str], None]
) -> tuple[set[str], bool]:
    """(keys already done, whether to start a fresh partial file)."""
    journal = Journal(journal_path, phash)
    done = journal.completed() if partial.is_file() else None
    if resume:
        if done is None:
            log("--resume: no journal for this exact recipe, inputs and options; starting from the beginning")
            return set(), True
        log(f"--resume: {len(done)} tensor(s) already written, continuing")
        return done, False
    if done:
        log(
            f"note: an interrupted run of this merge exists ({len(done)} tensors done); starting over "
            "(add --resume to continue it instead)"
        )
    return set(), True


def _probe_seconds_per_element(
    root: Node,
    models: Sequence[ModelRef],
    compute: torch.dtype,
    params_of: Callable[[Node], dict[str, Any]],
    seed: int,
    n: int,
) -> float:
    """Time the recipe on random fp16 inputs of n elements (a multiple of 256): seconds per output element."""
    plan = KeyPlan("probe", (n // 256, 256), "F16", "merge", None, chunk=n)  # rows of 256: cheap per-row work
    gen = torch.Generator().manual_seed(0)
    data = {_path_key(m.path): torch.randn(n, generator=gen).half() for m in models}

    def read(ref: ModelRef, key: str, s: int, e: int) -> torch.Tensor:
        return data[_path_key(ref.path)][s:e]

    t = time.perf_counter()
    model_stats = model_statistics(
        root, [plan], lambda p, ms: KeyEvaluator(p, root, read, compute, params_of, seed, model_stats=ms))
    ev = KeyEvaluator(plan, root, read, compute, params_of, seed, model_stats=model_stats)
    ev.prepare()
    ev.value(root, 0)
    return (time.perf_counter() - t) / n


def plan_hash(metadata: dict[str, str], entries: Sequence[OutputEntry]) -> str:
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for e in entries:
        h.update(f"{e.key}|{e.dtype}|{list(e.shape)}\n".encode())
    return h.hexdigest()


@dataclass
class MergePlan:
    """Everything decided before the first byte is written: inputs (open), per-key plans, chunking, the
    output layout and its journal identity. `close()` releases the input files."""

    root: Node
    output: Path
    opts: MergeOptions
    models: list[ModelRef]
    readers: list[TensorReader]
    table: dict[str, dict[int, Any]]
    arch: Architecture
    compute: torch.dtype
    plans: list[KeyPlan] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    entries: list[OutputEntry] = field(default_factory=list)
    phash: str = ""
    budget: int = 0
    baseline: int = 0
    per_element: int = 0
    work: int = 0
    peak_work: int = 0
    peak_chunk: int = 0
    _params: dict[tuple[int, str | None, str | None], dict[str, Any]] = field(default_factory=dict)
    _elemental: bool = False

    @property
    def merge_plans(self) -> list[KeyPlan]:
        return [p for p in self.plans if p.mode == "merge"]

    def params_for(self, block: str | None, key: str | None = None) -> Callable[[Node], dict[str, Any]]:
        """Resolved node parameters for a block (and a key, where elemental rules exist), cached."""
        key = key if self._elemental else None

        def get(node: Node) -> dict[str, Any]:
            ck = (id(node), block, key)
            if ck not in self._params:
                self._params[ck] = _resolve_node_params(node, self.arch, block, key)
            return self._params[ck]

        return get

    def close(self) -> None:
        for r in self.readers:
            r.close()


def plan_merge(recipe: Recipe, output: str | os.PathLike, opts: MergeOptions) -> MergePlan:
    """Validate the inputs and the recipe, plan every key and its chunks under the memory budget, and fix
    the output layout. Nothing is written; a failure closes what it opened."""
    output = Path(output)
    if opts.output_dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"output dtype must be fp16, bf16 or fp32, not {opts.output_dtype!r}")
    if opts.compute_dtype not in ("fp64", "fp32"):
        raise ValueError(f"compute dtype must be fp64 or fp32, not {opts.compute_dtype!r}")
    root = recipe.root
    models = _model_list(root)
    if any(m.derive is not None for m in models):  # recipe rebasin nodes: align first (cached by content)
        from merge_tools.rebasin import materialize

        materialize(models, opts.log)
    readers, table = validate_inputs(models, output, opts.missing_keys)
    try:
        shapes0 = {k: info.shape for k, info in readers[0].header.tensors.items()}
        plan = MergePlan(root, output, opts, models, readers, table, detect_architecture(shapes0),
                         DTYPES[opts.compute_dtype])
        plan._elemental = any(isinstance(v, dict) and "elemental" in v for n in root.nodes() for v in n.params.values())
        if opts.check_finite == "pre":
            opts.log("checking every input for NaN/Inf …")
            scan_finite(readers)
        for node in root.nodes():  # surface MBW errors (wrong length, unknown arch) before any work
            plan.params_for(None)(node)
            _resolve_node_params(node, plan.arch, plan.arch.blocks[0] if plan.arch.known else None)
        _plan_keys(plan)
        _plan_chunks(plan)
        _plan_output(plan)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return plan


def _plan_keys(plan: MergePlan) -> None:
    """Each key: merged (float, in every input or taken from the base), copied (integers), or left out."""
    opts, base_index = plan.opts, 0
    out_st = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[opts.output_dtype]
    skipped: list[str] = []
    for key, per in plan.table.items():
        info0 = next(iter(per.values()))
        complete = len(per) == len(plan.models)
        if not complete and (opts.missing_keys == "skip" or base_index not in per):
            skipped.append(key)
            continue
        sources = {_path_key(m.path): (i if i in per else base_index) for i, m in enumerate(plan.models)}
        if info0.dtype not in _FLOAT_ST:
            src = base_index if base_index in per else min(per)
            plan.plans.append(KeyPlan(key, info0.shape, info0.dtype, "copy", None, sources={"": src}))
            continue
        plan.plans.append(KeyPlan(key, info0.shape, out_st, "merge", block_of(key, plan.arch), sources=sources))
    if skipped:
        opts.log(f"leaving out {len(skipped)} key(s) not present in every input (--missing-keys {opts.missing_keys})")


def _plan_chunks(plan: MergePlan) -> None:
    """Chunk sizes from the memory budget and each method's alignment needs; refuse what cannot fit."""
    opts, root = plan.opts, plan.root
    plan.budget = opts.memory_budget or default_budget()
    plan.baseline = psutil.Process().memory_info().rss
    csize = torch.empty(0, dtype=plan.compute).element_size()
    itemsizes = [max((SAFETENSORS_DTYPES[t.dtype][1] for t in r.header.tensors.values()), default=2)
                 for r in plan.readers]
    per_el = plan.per_element = _bytes_per_element(root, itemsizes, csize)
    merge_plans = plan.merge_plans
    needs_select = bool(merge_plans) and _needs_select_buffer(root, plan.params_for(None))
    work = plan.work = plan.budget - plan.baseline - _SLACK
    if work <= 0:
        raise MemoryError(
            f"memory budget {format_size(plan.budget)} is below what this process already uses "
            f"({format_size(plan.baseline)}); raise --memory-budget"
        )
    for p in merge_plans:
        p.align = _align(root, p.shape, plan.params_for(p.block, p.key))
        if p.numel * per_el <= work:  # one chunk: inputs read once; a selection copy is among the temporaries
            p.chunk = p.numel
        else:  # chunked: an exact selection (TIES' top-k) also holds one model's |τ| of the tensor in fp64
            reserve = p.numel * 8 if needs_select else 0
            avail = work - reserve
            if avail < per_el * p.align:
                raise MemoryError(
                    f"tensor {p.key!r} ({p.numel:,} elements) needs at least "
                    f"{format_size(reserve + per_el * p.align + plan.baseline + _SLACK)} with this recipe; "
                    f"raise --memory-budget (now {format_size(plan.budget)})"
                )
            p.chunk = max((avail // per_el) // p.align, 1) * p.align
        if opts.max_chunk_elements and p.chunk > opts.max_chunk_elements:
            p.chunk = max(opts.max_chunk_elements // p.align, 1) * p.align
        chunked = p.chunk < p.numel
        plan.peak_work = max(plan.peak_work,
                             min(p.chunk, p.numel) * per_el + (p.numel * 8 if chunked and needs_select else 0))
        plan.peak_chunk = max(plan.peak_chunk, min(p.chunk, p.numel))


def _plan_output(plan: MergePlan) -> None:
    """Output metadata (recipe, input hashes, options, architecture, carried model configs), layout, plan hash."""
    opts, models = plan.opts, plan.models
    fingerprints = [file_fingerprint(m.path) for m in models]
    plan.metadata = {
        "sd_merge_version": ENGINE_VERSION,
        "sd_merge_recipe": canonical_json(plan.root),
        "sd_merge_inputs": json.dumps(
            [{"name": m.name, "file": m.path.name, "sha256_sampled": fp} for m, fp in zip(models, fingerprints)]
        ),
        "sd_merge_hash_method": "sha256(file size + full header + 16 evenly spaced 64 KiB data samples)",
        "sd_merge_options": json.dumps(
            {"compute_dtype": opts.compute_dtype, "output_dtype": opts.output_dtype, "seed": opts.seed,
             "missing_keys": opts.missing_keys},
            sort_keys=True,
        ),
        "sd_merge_architecture": f"{plan.arch.name}/{plan.arch.layout}" if plan.arch.known else "unknown",
    }
    # the model configs our loader reads (heads and GroupNorm groups are not visible in weights) carry over
    # from the first input, so a merged tiny or custom model loads with the architecture it was made from
    first_meta = plan.readers[0].header.metadata
    for config_key in CONFIG_METADATA_KEYS.values():
        if config_key in first_meta:
            plan.metadata[config_key] = first_meta[config_key]
    plan.entries = [OutputEntry(p.key, p.out_dtype, p.shape) for p in plan.plans]
    plan.phash = plan_hash(plan.metadata, plan.entries)


def estimate_merge(plan: MergePlan) -> float:
    """Log what the merge will read, write, hold and take (compute timed on a probe); returns seconds."""
    opts, root = plan.opts, plan.root
    in_bytes = sum(sum(info.end - info.start for info in per.values()) for per in plan.table.values())
    out_bytes = sum(e.nbytes for e in plan.entries)
    passes = 1 + (2 if any(n.spec.prepare for n in root.nodes()) else 0) + sum(
        1 for n in root.nodes() if n.spec.model_prepare is not None)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    try:
        probe_n = max(4096, min(1 << 20, plan.work // plan.per_element)) // 256 * 256
        rate = _probe_seconds_per_element(root, plan.models, plan.compute, plan.params_for(None), opts.seed, probe_n)
    finally:
        torch.set_num_threads(old_threads)
    merge_plans = plan.merge_plans
    work_elements = sum(p.numel * (1.0 if p.chunk >= p.numel else 2.5) for p in merge_plans)
    est_s = rate * work_elements + in_bytes / 1.0e9
    opts.log(
        f"sd-merge: {root.method} over {len(plan.models)} model(s), architecture "
        f"{plan.metadata['sd_merge_architecture']}, {len(merge_plans)} tensors merged + "
        f"{len(plan.plans) - len(merge_plans)} copied\n"
        f"  reads ≈ {format_size(in_bytes)} (up to {passes} passes on chunked tensors), "
        f"writes {format_size(out_bytes)}\n"
        f"  memory: budget {format_size(plan.budget)}, estimated peak "
        f"{format_size(plan.baseline + _SLACK + plan.peak_work)} (largest chunk {plan.peak_chunk:,} elements), "
        f"compute {opts.compute_dtype}, output {opts.output_dtype}\n"
        f"  time estimate ≈ {est_s / 60:.1f} min (compute timed on a 1M-element probe, reads at ~1 GB/s; "
        "the progress bar refines it)"
    )
    return est_s


def run_merge(plan: MergePlan, started: float | None = None) -> MergeReport:
    """Write the planned output (resuming a journal when asked), then fsync and rename it into place."""
    opts, root, readers, models, log = plan.opts, plan.root, plan.readers, plan.models, plan.opts.log
    output, entries, metadata = plan.output, plan.entries, plan.metadata
    t0 = started if started is not None else time.time()
    partial, journal_path = side_paths(output)
    done, fresh = prepare_resume(partial, journal_path, plan.phash, opts.resume, log)
    out_bytes = sum(e.nbytes for e in entries)
    need = out_bytes + 8 + len(json.dumps(metadata)) - (partial.stat().st_size if not fresh and partial.exists() else 0)
    output.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(output.parent, max(need, 0))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    writer = SafetensorsWriter(partial, entries, metadata, reuse=not fresh)
    journal = Journal(journal_path, plan.phash)
    journal.open(fresh=fresh)
    pending: list[str] = []
    last_flush = time.time()
    plans_by_key = {p.key: p for p in plan.plans}
    key_now = [""]

    def flush() -> None:
        nonlocal last_flush
        if pending:
            writer.sync()
            journal.mark(pending)
            pending.clear()
        last_flush = time.time()

    # persistent buffers: node temporaries and widened inputs (`workspace`), and the raw reads in two sets that
    # alternate by key (the reader thread fills the next key's set while this one's is in use), each set
    # holding one buffer per input file (two leaves of one file read the same bytes into it); together what the
    # memory plan counts per element, held between keys
    workspace, read_sets, parity = methods.Workspace(), (methods.Workspace(), methods.Workspace()), [0]

    def read(ref: ModelRef, key: str, s: int, e: int, which: int | None = None) -> torch.Tensor:
        ws = read_sets[parity[0] if which is None else which]
        return readers[plans_by_key[key].sources[_path_key(ref.path)]].read(
            key, s, e, into=lambda nbytes: ws.get(("read", _path_key(ref.path)), nbytes, torch.uint8))

    def check_leaf(ref: ModelRef, raw: torch.Tensor, converted: torch.Tensor) -> None:
        # min and max propagate NaN and show ±Inf: both finite iff every element is (one cheap pass over the
        # stored dtype); the exact element count runs only to word the error
        if raw.numel() == 0:
            return
        low, high = torch.aminmax(raw)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            _check_finite(raw, readers[plans_by_key[key_now[0]].sources[_path_key(ref.path)]], key_now[0])

    todo = [p for p in plan.plans if p.key not in done]
    total = sum(e.nbytes for e in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", disable=not opts.progress,
               initial=total - sum(OutputEntry(p.key, p.out_dtype, p.shape).nbytes for p in todo))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-merge-read")
    leaves = {_path_key(m.path): m for m in models}
    out_dtype = DTYPES[opts.output_dtype]
    out_size = torch.empty(0, dtype=out_dtype).element_size()

    def prefetch(p: KeyPlan, which: int) -> Future | None:
        if p.mode != "merge" or len(p.chunks) != 1:
            return None
        return pool.submit(lambda: {path: read(m, p.key, 0, p.numel, which) for path, m in leaves.items()})

    def evaluator(p: KeyPlan, model_stats: dict[int, Any]) -> KeyEvaluator:
        key_now[0] = p.key
        return KeyEvaluator(p, root, read, plan.compute, plan.params_for(p.block, p.key), opts.seed, None,
                            check_leaf if opts.check_finite == "stream" else None, model_stats, workspace)

    finished = False
    try:
        # a model-wide method (supermerger's cosineA/B) first reads every tensor once for its statistics
        model_stats = model_statistics(root, plan.merge_plans, evaluator, opts.progress) if todo else {}
        nxt = prefetch(todo[0], 0) if todo else None
        for idx, p in enumerate(todo):
            parity[0] = idx % 2  # this key's reads; the prefetch of the next one fills the other set
            current, nxt = nxt, (prefetch(todo[idx + 1], (idx + 1) % 2) if idx + 1 < len(todo) else None)
            if p.mode == "copy":
                writer.write_raw(p.key, readers[p.sources[""]].read(p.key).view(torch.uint8).numpy())
                bar.update(OutputEntry(p.key, p.out_dtype, p.shape).nbytes)
            else:
                pre = current.result() if current is not None else None
                ev = evaluator(p, model_stats)
                ev.prefetched = pre or {}
                ev.prepare()
                for ci, (s, e) in enumerate(p.chunks):
                    value = ev.value(root, ci)
                    if value.dtype != out_dtype:  # narrow into a persistent buffer (written before it is reused)
                        value = workspace.get(("output",), value.numel(), out_dtype).copy_(value.reshape(-1))
                    writer.write(p.key, s, value)
                    bar.update((e - s) * out_size)
                del ev
            pending.append(p.key)
            if opts.on_key_done is not None:
                opts.on_key_done(p.key, idx)
            if time.time() - last_flush > _JOURNAL_EVERY_S:
                flush()
        flush()
        finished = True
    except BaseException as exc:
        pool.shutdown(wait=True, cancel_futures=True)
        flush()
        if isinstance(exc, CheckpointError):  # bad input: nothing to resume
            writer.close()
            journal.close()
            partial.unlink(missing_ok=True)
            journal_path.unlink(missing_ok=True)
        else:
            log(f"\nmerge interrupted; run the same command with --resume to continue from {journal_path.name}")
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        writer.close()
        journal.close()
        torch.set_num_threads(old_threads)
    assert finished
    finalize(partial, output)
    journal_path.unlink(missing_ok=True)
    seconds = time.time() - t0
    peak = max(plan.baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # high-water mark (KiB)
    log(f"wrote {output} in {seconds:.1f} s, peak RSS {format_size(peak)} (budget {format_size(plan.budget)})")
    merged = len(plan.merge_plans)
    return MergeReport(output, len(plan.plans), merged, len(plan.plans) - merged, seconds, peak, plan.budget,
                       metadata["sd_merge_architecture"], resumed_keys=len(done))


def merge(recipe: Recipe, output: str | os.PathLike, options: MergeOptions | None = None) -> MergeReport:
    """Run a recipe and write the result to `output` (safetensors): plan → estimate → run; the inputs are
    closed on every path. See the module docstring."""
    opts = options or MergeOptions()
    t0 = time.time()
    plan = plan_merge(recipe, output, opts)
    try:
        estimate_merge(plan)
        return run_merge(plan, t0)
    finally:
        plan.close()
