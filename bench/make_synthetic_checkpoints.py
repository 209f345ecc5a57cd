"""Write synthetic full-size SD1 / SDXL checkpoints for the merge benchmark.

Every file carries the real key set and shapes of a single-file checkpoint (the non-optional keys of the
reference key list in bench/keys/, plus the text encoders' optional last layer, final norm and
projection, which real files carry), stored as fp16 safetensors. The files form a family around one
shared base, the way fine-tunes of one release do:

    base_k    ~ N(0, s_k^2)                          s_k from the tensor's role (fan-in scaled weights,
                                                     norm weights near 1, small biases)
    model_i,k = base_k + shared_k + lowrank_i,k + noise_i,k + outliers_i,k

shared_k is a low-rank direction common to all models (fine-tunes of one base move alike, so deltas
have a positive mean cosine as Model Stock assumes); lowrank_i,k is each model's own low-rank update;
noise is small and dense (a per-key pool read at a per-model cyclic offset, to keep generation fast);
outliers are a sparse set (1e-4 of the entries) of large values, the entries TIES' top-k trim is for.
Each tensor is drawn from its own generator seeded by (seed, model, key), so a file's bytes depend
only on the seed, never on the order or on N: the first 4 models of an N = 16 family are the N = 4 family.

Writing is streamed: the header is computed from shapes alone, then one tensor at a time is drawn and
appended to all N + 1 files, so memory holds a few copies of the largest tensor, not a model.

    python bench/make_synthetic_checkpoints.py --arch sd1 -n 16 -o /work/bench_data/sd1
    python bench/make_synthetic_checkpoints.py --arch sdxl -n 4 -o /work/bench_data/sdxl --components diffuser
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

KEYS_DIR = Path(__file__).resolve().parent / "keys"
ARCH_KEY_FILES = {"sd1": "sd1-ldm.json", "sdxl": "sdxl-sgm.json"}

# Relative sizes of the delta parts, as fractions of the base tensor's scale.
SHARED_SCALE = 0.02
OWN_SCALE = 0.02
NOISE_SCALE = 0.004
OUTLIER_SCALE = 0.2
OUTLIER_FRACTION = 1e-4
LOW_RANK = 4


@dataclass(frozen=True)
class TensorSpec:
    """One key of the output files."""

    key: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def load_key_specs(arch: str, components: list[str] | None = None) -> list[TensorSpec]:
    """The float keys of `arch`'s reference key list (optional ones only for the text encoders), sorted,
    optionally limited to components."""
    path = KEYS_DIR / ARCH_KEY_FILES[arch]
    if not path.is_file():
        raise FileNotFoundError(f"reference key list {path} is missing; copy it from shared/reference/keys/")
    doc = json.loads(path.read_text())
    available = list(doc["components"])
    wanted = components or available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown} for {arch}; choose from {available}")
    specs = []
    for component in wanted:
        for key, info in doc["components"][component].items():
            if not info["dtype"].startswith("float"):
                continue
            # the text encoders' "optional" keys (last layer, final norm, projection: a checkpoint may omit
            # what SDXL's penultimate-layer conditioning skips) are in real files and the loader needs them;
            # the other optional keys (schedule buffers, v-pred/EDM flags) would change what the file means
            if info.get("optional") and component not in ("clip_l", "clip_g"):
                continue
            specs.append(TensorSpec(key, tuple(info["shape"])))
    return sorted(specs, key=lambda s: s.key)


def tensor_seed(seed: int, model: int, key: str, part: str) -> int:
    """A 63-bit seed for one (model, key, part); model -1 is the base, -2 the shared direction."""
    digest = hashlib.blake2b(f"{seed}|{model}|{key}|{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, model: int, key: str, part: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(tensor_seed(seed, model, key, part))
    return g


def base_scale(spec: TensorSpec) -> tuple[float, float]:
    """(mean, std) of the base tensor: fan-in scaled weights, norm weights near one, small biases."""
    key = spec.key
    if len(spec.shape) >= 2:
        fan_in = math.prod(spec.shape[1:])
        if "embedding" in key or "embed_tokens" in key or "positional" in key:
            return 0.0, 0.02
        return 0.0, 1.0 / math.sqrt(max(fan_in, 1))
    is_norm = any(part in key for part in ("norm", "ln_", "layer_norm", ".gamma"))
    if is_norm and key.endswith("weight"):
        return 1.0, 0.05
    return 0.0, 0.02


def low_rank_factors(spec: TensorSpec, g: torch.Generator, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of a rank-`rank` matrix of about unit RMS; rows = first dim, cols = the rest."""
    rows = spec.shape[0]
    cols = spec.numel // rows
    r = min(rank, rows, cols)
    u = torch.randn(rows, r, generator=g).div_(math.sqrt(r))
    v = torch.randn(r, cols, generator=g)
    return u, v


def low_rank(spec: TensorSpec, g: torch.Generator, rank: int) -> torch.Tensor:
    """A rank-`rank` matrix of about unit RMS shaped like the tensor; a plain vector for 0/1-D tensors."""
    if len(spec.shape) < 2:
        return torch.randn(spec.shape, generator=g)
    u, v = low_rank_factors(spec, g, rank)
    return (u @ v).reshape(spec.shape)


def base_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    mean, std = base_scale(spec)
    t = torch.randn(spec.shape, generator=generator(seed, -1, spec.key, "base"))
    return t.mul_(std).add_(mean)


@dataclass
class KeyState:
    """What all models of one key share: base + shared direction, and a noise pool each model reads shifted."""

    spec: TensorSpec
    std: float
    start: torch.Tensor  # base + shared, fp32
    noise_pool: torch.Tensor  # flat N(0, 1) of numel entries


def key_state(spec: TensorSpec, seed: int, base: torch.Tensor) -> KeyState:
    _, std = base_scale(spec)
    shared = low_rank(spec, generator(seed, -2, spec.key, "shared"), LOW_RANK)
    start = base.add(shared, alpha=SHARED_SCALE * std)
    pool = torch.randn(spec.numel, generator=generator(seed, -3, spec.key, "noise"))
    return KeyState(spec, std, start, pool)


def model_tensor(state: KeyState, seed: int, model: int) -> torch.Tensor:
    """base + shared + own low-rank + dense noise + sparse outliers, in fp32.

    The dense noise is the key's noise pool read from a per-model random offset (cyclic shift): as
    uncorrelated between models as fresh draws for this purpose, and several times cheaper.
    """
    spec, std = state.spec, state.std
    g = generator(seed, model, spec.key, "delta")
    if len(spec.shape) >= 2:
        u, v = low_rank_factors(spec, g, LOW_RANK)
        out = torch.addmm(state.start.view(u.shape[0], -1), u, v, alpha=OWN_SCALE * std).view(spec.shape)
    else:
        out = state.start.add(torch.randn(spec.shape, generator=g), alpha=OWN_SCALE * std)
    flat = out.view(-1)
    n = spec.numel
    shift = int(torch.randint(0, n, (1,), generator=g))
    flat[: n - shift].add_(state.noise_pool[shift:], alpha=NOISE_SCALE * std)
    flat[n - shift:].add_(state.noise_pool[:shift], alpha=NOISE_SCALE * std)
    n_out = max(1, int(n * OUTLIER_FRACTION))
    idx = torch.randint(0, n, (n_out,), generator=g)
    vals = torch.randn(n_out, generator=g).mul_(OUTLIER_SCALE * std)
    flat.index_add_(0, idx, vals)
    return out


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header of an fp16 safetensors file holding `specs` in order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        end = offset + spec.numel * 2
        header[spec.key] = {"dtype": "F16", "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_fp16(f: BinaryIO, t: torch.Tensor) -> None:
    f.write(t.to(torch.float16).contiguous().numpy().data)


def model_names(n: int) -> list[str]:
    return [f"model_{i:02d}.safetensors" for i in range(n)]


def make_family(arch: str, n: int, out_dir: Path, seed: int = 0, components: list[str] | None = None) -> list[Path]:
    """Write base.safetensors and model_00..model_{n-1}.safetensors into out_dir; return their paths."""
    specs = load_key_specs(arch, components)
    total_bytes = sum(s.numel for s in specs) * 2
    out_dir.mkdir(parents=True, exist_ok=True)
    need = total_bytes * (n + 1)
    free = shutil.disk_usage(out_dir).free
    if need > free - (20 << 30):
        raise SystemExit(
            f"{need / 1e9:.1f} GB needed in {out_dir} but only {free / 1e9:.1f} GB free (keeping 20 GB spare); "
            "lower -n or pass --components"
        )
    names = ["base.safetensors", *model_names(n)]
    paths = [out_dir / name for name in names]
    files = [open(p.with_suffix(".partial"), "wb") for p in paths]
    try:
        for index, f in enumerate(files):
            meta = {
                "bench.synthetic": "1",
                "bench.arch": arch,
                "bench.seed": str(seed),
                "bench.model": "base" if index == 0 else str(index - 1),
                "bench.components": ",".join(components or []),
            }
            f.write(safetensors_header(specs, meta))
        with tqdm(total=total_bytes * (n + 1), unit="B", unit_scale=True, desc=f"{arch} x{n}") as bar:
            for spec in specs:
                base = base_tensor(spec, seed)
                write_fp16(files[0], base)
                state = key_state(spec, seed, base)
                del base
                for i in range(n):
                    write_fp16(files[i + 1], model_tensor(state, seed, i))
                bar.update(spec.numel * 2 * (n + 1))
    finally:
        for f in files:
            f.close()
    for p in paths:
        p.with_suffix(".partial").rename(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCH_KEY_FILES), required=True)
    ap.add_argument("-n", "--num-models", type=int, required=True, help="models besides the base")
    ap.add_argument("-o", "--out-dir", type=Path, required=True, help="folder outside the repository")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--components", nargs="*", default=None,
                    help="limit to these components of the key list (e.g. diffuser = UNet only)")
    args = ap.parse_args(argv)
    if args.num_models < 1:
        ap.error("-n must be at least 1")
    paths = make_family(args.arch, args.num_models, args.out_dir, args.seed, args.components)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {size / 1e9:.2f} GB, into {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
