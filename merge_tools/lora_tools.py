"""`sd-merge extract-lora` and `sd-merge merge-lora`: LoRA ↔ checkpoint, streamed module by module.

extract-lora TUNED BASE --dim N [--conv_dim M] [--energy E] -o L
    For every LoRA-able module (sd_scripts_surge.models.lora_keys) ΔW = W_tuned − W_base is factored by SVD,
    ΔW ≈ (U_r Σ_r) V_rᵀ → lora_up = U_r Σ_r, lora_down = V_rᵀ, alpha = r (scale 1), as sd-scripts'
    networks/extract_lora_from_models.py does. The rank is --dim (Linear / 1×1) or --conv_dim (k×k convs;
    0 = no conv modules), or with --energy the smallest rank keeping that share of Σσ² (capped by the dim).
    Values of up/down beyond the --clamp-quantile of |values| are clamped (sd-scripts' default 0.99; 1 = off).
    Modules whose |ΔW| stays below --min-diff are left out. Two tensors are in memory at a time.
merge-lora BASE L[:MULT] ... -o OUT
    W ← W + Σ mult·ΔW in fp64, ΔW from kohya LoRA (lora_up/lora_down/alpha, LoCon convs), LyCORIS LoHa
    (hada_w1_a/b, hada_w2_a/b, optional Tucker hada_t1/t2) or LoKr (lokr_w1[_a/_b], lokr_w2[_a/_b], lokr_t2),
    scale alpha/rank (LoKr with full w1 and w2: scale 1, as A1111/LyCORIS). Every other tensor is copied
    byte for byte. A LoRA module with no tensor in the checkpoint is an error (--skip-unmatched to go on).
Both write to a temp file that is fsynced and renamed, never over an input.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from merge_tools.io import TensorReader, copy_tensors, refuse_overwrite
from sd_scripts_surge.models.fileio import CheckpointError, read_safetensors_header, save_safetensors_atomic
from sd_scripts_surge.models.keymap import block_of, detect_architecture
from sd_scripts_surge.models.lora_keys import LoraKeyMap, LoraTarget, checkpoint_lora_keys

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")
_ALL_SUFFIXES = sorted(set(LORA_SUFFIXES + LOHA_SUFFIXES + LOKR_SUFFIXES), key=len, reverse=True)


# -------------------------------------------------------------------------------------------- reading


@dataclass
class LoraModule:
    name: str
    weights: dict[str, Tensor] = field(default_factory=dict)

    @property
    def format(self) -> str:
        if "lora_down.weight" in self.weights:
            return "lora"
        if "hada_w1_a" in self.weights:
            return "loha"
        if any(k.startswith("lokr_") for k in self.weights):
            return "lokr"
        return "unknown"


def read_lora_file(path: str | os.PathLike) -> dict[str, LoraModule]:
    """A kohya / LyCORIS LoRA file grouped by module name. Unknown tensors (DoRA scales, …) are an error."""
    path = Path(path)
    read_safetensors_header(path)  # a clear error for truncated or non-safetensors files
    modules: dict[str, LoraModule] = {}
    unknown = []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            for suffix in _ALL_SUFFIXES:
                if key.endswith("." + suffix):
                    name = key[: -len(suffix) - 1]
                    modules.setdefault(name, LoraModule(name)).weights[suffix] = f.get_tensor(key)
                    break
            else:
                unknown.append(key)
    if unknown:
        hint = " (DoRA `dora_scale` is not supported)" if any("dora_scale" in k for k in unknown) else ""
        raise CheckpointError(f"{path}: {len(unknown)} tensor(s) of no known LoRA format{hint}: {unknown[:5]}")
    if not modules:
        raise CheckpointError(f"{path}: no LoRA modules (expected kohya lora_up/lora_down or LyCORIS hada_/lokr_)")
    for m in modules.values():
        if m.format == "unknown":
            raise CheckpointError(f"{path}: module {m.name} has only {sorted(m.weights)}; its weights are incomplete")
    return modules


def _alpha(m: LoraModule) -> float | None:
    a = m.weights.get("alpha")
    return None if a is None else float(a.double().reshape(-1)[0])


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS CP/Tucker rebuild: Σ_jk t[j,k,h,w]·wa[j,p]·wb[k,r] → [p, r, h, w] (A1111's make_weight_cp)."""
    return torch.einsum("jkhw,jp,kr->prhw", t, wa, wb)


def lora_delta(m: LoraModule, shape: Sequence[int]) -> Tensor:
    """ΔW of one module in fp64, shaped like the target weight (`shape`), scale included, multiplier not."""
    w = {k: v.to(torch.float64) for k, v in m.weights.items()}
    alpha = _alpha(m)
    numel = math.prod(shape)
    if m.format == "lora":
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in w:  # LoCon with Tucker mid: up ∘ mid ∘ down
            delta = torch.einsum("rkhw,or,ki->oihw", w["lora_mid.weight"], up.flatten(1), down.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
        scale = (alpha if alpha is not None else rank) / rank
    elif m.format == "loha":
        rank = w["hada_w1_b"].shape[0]
        if "hada_t1" in w:
            d1 = _tucker(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
            d2 = _tucker(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
        else:
            d1 = w["hada_w1_a"] @ w["hada_w1_b"].flatten(1)
            d2 = w["hada_w2_a"] @ w["hada_w2_b"].flatten(1)
        delta = d1 * d2
        scale = (alpha if alpha is not None else rank) / rank
    else:  # lokr
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = _tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"].flatten(1)
        rank = None
        if "lokr_w1_b" in w:
            rank = w["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in w:
            rank = w["lokr_w2_b"].shape[0]
        if len(shape) == 4 and w2.dim() == 2 and math.prod(shape[2:]) > 1:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        delta = torch.kron(w1, w2)
        scale = alpha / rank if alpha is not None and rank is not None else 1.0
    if delta.numel() != numel:
        raise CheckpointError(
            f"LoRA module {m.name} ({m.format}) makes a change of {tuple(delta.shape)} ({delta.numel()} values) "
            f"for a weight of shape {tuple(shape)}"
        )
    return delta.reshape(tuple(shape)) * scale


# ---------------------------------------------------------------------------------------------- merge


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`path[:multiplier]` (the multiplier after the last colon when it parses as a number)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(arg), 1.0


def merge_lora(
    base: str | os.PathLike,
    loras: Sequence[tuple[str | os.PathLike, float]],
    output: str | os.PathLike,
    *,
    dtype: str | None = None,
    skip_unmatched: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Write `output` = `base` with every LoRA of `loras` ([(path, multiplier)]) added in fp64."""
    base, output = Path(base), Path(output)
    refuse_overwrite(output, [base, *(Path(p) for p, _ in loras)])
    reader = TensorReader(base)
    try:
        tensors = reader.header.tensors
        keymap = checkpoint_lora_keys({k: v.shape for k, v in tensors.items()})
        per_key: dict[str, list[tuple[LoraTarget, LoraModule, float]]] = defaultdict(list)
        unmatched: list[str] = []
        counts = {"modules": 0, "keys": 0, "unmatched": 0}
        for path, mult in loras:
            for name, module in read_lora_file(path).items():
                target = keymap.resolve(name)
                if target is None:
                    unmatched.append(f"{name} ({Path(path).name})")
                    continue
                per_key[target.key].append((target, module, float(mult)))
                counts["modules"] += 1
        if unmatched and not skip_unmatched:
            raise CheckpointError(
                f"{len(unmatched)} LoRA module(s) match no tensor of this {keymap.arch} checkpoint, e.g. "
                f"{', '.join(unmatched[:4])}; is the LoRA for another architecture? (--skip-unmatched to go on)"
            )
        if unmatched:
            log(f"warning: {len(unmatched)} LoRA module(s) left out (no tensor in the checkpoint)")
        counts["unmatched"] = len(unmatched)
        counts["keys"] = len(per_key)

        def make(key: str) -> Callable[[Tensor], Tensor]:
            def apply(w: Tensor) -> Tensor:
                out = w.to(torch.float64)
                for target, module, mult in per_key[key]:
                    delta = lora_delta(module, target.shape) * mult
                    if target.rows is None:
                        out += delta
                    else:
                        out[target.rows[0] : target.rows[1]] += delta
                if not bool(torch.isfinite(out).all()):
                    raise CheckpointError(f"{key}: the merged weight has NaN/Inf values (check the LoRA files)")
                return out

            return apply

        st = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", None: None}[dtype]
        dtypes = {k: st for k, info in tensors.items() if st and info.dtype in ("F16", "BF16", "F32", "F64")}
        metadata = dict(reader.header.metadata) | {
            "sd_merge_lora": json.dumps([{"file": Path(p).name, "multiplier": m} for p, m in loras])
        }
        bar = tqdm(total=len(tensors), desc="merge-lora", unit="tensor", disable=not progress)
        copy_tensors(output, {k: (reader, k) for k in tensors}, metadata, transforms={k: make(k) for k in per_key},
                     dtypes=dtypes, progress=lambda k: bar.update(1))
        bar.close()
    finally:
        reader.close()
    return counts


# -------------------------------------------------------------------------------------------- extract


@dataclass
class ExtractReport:
    modules: int
    skipped_small: int
    energy_per_block: dict[str, float]  # kept Σσ² / Σσ² per MBW block (component prefix for text encoders)
    ranks: dict[str, int]


def choose_rank(s: Tensor, cap: int, energy: float | None) -> int:
    """--dim cap, or the smallest rank whose Σσ² share reaches `energy` (never above the cap)."""
    cap = max(1, min(cap, s.numel()))
    if energy is None or energy >= 1.0:
        return cap
    e = s.double().square()
    share = torch.cumsum(e, 0) / e.sum().clamp(min=1e-300)
    return max(1, min(cap, int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype))[0]) + 1))


def _clamp(t: Tensor, quantile: float) -> Tensor:
    if quantile >= 1.0 or t.numel() == 0:
        return t
    flat = t.abs().flatten().float()
    k = max(1, min(flat.numel(), math.ceil(quantile * flat.numel())))
    hi = float(flat.kthvalue(k).values)
    return t.clamp(-hi, hi)


def extract_lora(
    tuned: str | os.PathLike,
    base: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dim: int,
    conv_dim: int = 0,
    energy: float | None = None,
    clamp_quantile: float = 0.99,
    min_diff: float = 1e-6,
    save_dtype: str = "fp16",
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExtractReport:
    """Write a kohya LoRA `output` that turns `base` into (approximately) `tuned`; see the module docstring."""
    tuned, base, output = Path(tuned), Path(base), Path(output)
    refuse_overwrite(output, [tuned, base])
    if dim < 1:
        raise ValueError("--dim must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError("--energy must be in (0, 1]")
    if not 0.0 < clamp_quantile <= 1.0:
        raise ValueError("--clamp-quantile must be in (0, 1]")
    out_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[save_dtype]
    rt, rb = TensorReader(tuned), TensorReader(base)
    try:
        shapes_t = {k: v.shape for k, v in rt.header.tensors.items()}
        shapes_b = {k: v.shape for k, v in rb.header.tensors.items()}
        keymap: LoraKeyMap = checkpoint_lora_keys(shapes_b)
        if checkpoint_lora_keys(shapes_t).arch != keymap.arch:
            raise CheckpointError(f"{tuned} and {base} are different architectures")
        arch = detect_architecture(shapes_b)
        wanted = [t for t in keymap.targets.values() if t.group == "attn" or (conv_dim > 0)]
        tensors: dict[str, Tensor] = {}
        kept: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        ranks: dict[str, int] = {}
        skipped = 0
        for target in tqdm(wanted, desc="extract-lora", unit="module", disable=not progress):
            if target.key not in shapes_t:
                raise CheckpointError(f"{tuned}: no tensor {target.key} (present in {base})")
            if tuple(shapes_t[target.key]) != tuple(shapes_b[target.key]):
                raise CheckpointError(
                    f"{target.key}: shape {tuple(shapes_t[target.key])} in {tuned} vs {tuple(shapes_b[target.key])} "
                    f"in {base}"
                )
            full_shape = tuple(shapes_b[target.key])
            a = rt.read(target.key).view(full_shape).to(device=device, dtype=torch.float32)
            b = rb.read(target.key).view(full_shape).to(device=device, dtype=torch.float32)
            delta = a - b
            if target.rows is not None:
                delta = delta[target.rows[0] : target.rows[1]]
            if float(delta.abs().max()) < min_diff:
                skipped += 1
                continue
            cap = conv_dim if target.kind == "conv" else dim
            mat = delta.reshape(delta.shape[0], -1)
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            r = choose_rank(s, cap, energy)
            up, down = _clamp(u[:, :r] * s[:r], clamp_quantile), _clamp(vh[:r], clamp_quantile)
            if len(target.shape) == 4:
                up = up.reshape(up.shape[0], r, 1, 1)
                down = down.reshape(r, *target.shape[1:])
            tensors[f"{target.name}.lora_up.weight"] = up.to("cpu", out_dtype).contiguous()
            tensors[f"{target.name}.lora_down.weight"] = down.to("cpu", out_dtype).contiguous()
            tensors[f"{target.name}.alpha"] = torch.tensor(float(r), dtype=out_dtype)
            ranks[target.name] = r
            block = target.component.upper() if target.component != "unet" else (block_of(target.key, arch) or "UNET")
            e = s.double().square()
            kept[block][0] += float(e[:r].sum())
            kept[block][1] += float(e.sum())
    finally:
        rt.close()
        rb.close()
    if not tensors:
        raise CheckpointError(f"{tuned} and {base} differ by less than --min-diff {min_diff} in every module")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim) if energy is None and not conv_dim else "Dynamic",
        "ss_network_alpha": str(dim) if energy is None and not conv_dim else "Dynamic",
        "ss_network_args": json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)} if conv_dim else {}),
        "ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}.get(keymap.arch, "sd_v1"),
        "sd_merge_extract": json.dumps(
            {"tuned": tuned.name, "base": base.name, "dim": dim, "conv_dim": conv_dim, "energy": energy,
             "clamp_quantile": clamp_quantile}
        ),
    }
    save_safetensors_atomic(tensors, output, metadata, protect=(tuned, base))
    energy_per_block = {blk: (k / t if t > 0 else 1.0) for blk, (k, t) in kept.items()}
    report = ExtractReport(len(ranks), skipped, energy_per_block, ranks)
    log(f"wrote {output}: {report.modules} modules ({skipped} unchanged left out); kept energy per block:")
    for blk, share in energy_per_block.items():
        log(f"  {blk:8s} {100 * share:6.2f} %")
    return report
