"""Teacher flavor cache: capture the teacher once, store flavors as safetensors shards + a JSON manifest.

Layout of a cache directory::

    manifest.json            key (hashes), key digest, unit names, capture options, one entry per shard
    shard-00000.safetensors  the flavors of probe batch 0 (tensor names: unit/<unit>/out, unit/<unit>/in, …)

The cache is reused only when the key matches: hash of the teacher weights, the LoRA set ((file hash,
multiplier) pairs), the probe set, the unit map, dtype, flavor resolution and capture options. Every shard's
sha256 is in the manifest; a missing, truncated or corrupt shard is detected on open and recaptured (never
silently used). The manifest is rewritten after every shard, so an interrupted capture resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from sd_scripts_surge.models.fileio import (
    CheckpointError,
    atomic_output,
    read_safetensors_header,
    save_safetensors_atomic,
)
from sd_scripts_surge.surge.capture import CaptureOptions, Flavor, UnitCapture, UnitFlavor
from sd_scripts_surge.surge.probes import ProbeSet
from sd_scripts_surge.surge.units import UnitMap

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------- hashing


def hash_state_dict(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict: names, dtypes, shapes and raw bytes (blake2b, streamed per tensor)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach()
        if t.is_meta:
            raise ValueError(f"cannot hash tensor {name!r}: it is on the meta device (weights not loaded)")
        t = t.cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def hash_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lora_set_key(loras: Sequence[tuple[str | os.PathLike, float]]) -> tuple[tuple[str, float], ...]:
    """(file sha256, multiplier) for each LoRA hooked into the teacher, in order."""
    return tuple((hash_file(path), float(mult)) for path, mult in loras)


@dataclass(frozen=True)
class CacheKey:
    teacher: str
    probes: str
    unit_map: str
    dtype: str
    resolution: int | None = None
    loras: tuple[tuple[str, float], ...] = ()
    options: str = ""

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def make_cache_key(teacher: nn.Module, probes: ProbeSet, unit_map: UnitMap, dtype: torch.dtype,
                   options: CaptureOptions, loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> CacheKey:
    opts = {k: v for k, v in asdict(options).items() if k not in ("keep_graph", "pool_to")}
    return CacheKey(teacher=hash_state_dict(teacher), probes=probes.fingerprint(), unit_map=unit_map.fingerprint(),
                    dtype=str(dtype).replace("torch.", ""), resolution=options.pool_to, loras=lora_set_key(loras),
                    options=json.dumps(opts, sort_keys=True))


# ----------------------------------------------------------------------------------- flavor <-> tensors


def flavor_to_tensors(flavor: Flavor) -> dict[str, torch.Tensor]:
    """Flatten a flavor into safetensors-ready named CPU tensors."""
    return {name: t.detach().cpu().contiguous().clone() for name, t in _named_tensors(flavor)}


def _named_tensors(flavor: Flavor) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []

    def put(name: str, t: torch.Tensor) -> None:
        out.append((name, t))

    for unit, f in flavor.units.items():
        put(f"unit/{unit}/out", f.output)
        if f.input is not None:
            put(f"unit/{unit}/in", f.input)
        for k, v in f.side.items():
            put(f"unit/{unit}/side/{k}", v)
        if f.topk is not None:
            put(f"unit/{unit}/topk", f.topk)
        put(f"unit/{unit}/time", torch.tensor([f.time_s], dtype=torch.float64))
        for which, shape in (("in_shape", f.in_shape), ("out_shape", f.out_shape)):
            if shape is not None:
                put(f"unit/{unit}/{which}", torch.tensor(shape, dtype=torch.int64))
        for attn, stats in f.heads.items():
            for k, v in stats.items():
                put(f"unit/{unit}/heads/{attn}/{k}", v)
    for k, v in flavor.shared.items():
        put(f"shared/{k}", v)
    if flavor.model_output is not None:
        put("model_output", flavor.model_output)
    put("meta/pool_to", torch.tensor([-1 if flavor.pool_to is None else flavor.pool_to]))
    return out


def estimate_flavor_bytes(unet: nn.Module, unit_map: UnitMap, unet_kwargs: dict,
                          options: CaptureOptions | None = None) -> int | None:
    """Bytes of one batch's flavor, from a capture of the same architecture on the meta device (shapes only:
    no compute, no memory). None when the model cannot be rebuilt or run there."""
    try:
        with torch.device("meta"):
            meta = type(unet).from_config(unet.config)
        kwargs = {k: ({kk: vv.to("meta") for kk, vv in v.items()} if isinstance(v, dict) else
                      v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in unet_kwargs.items()}
        with torch.no_grad(), UnitCapture(meta, unit_map, options or CaptureOptions()) as cap:
            meta(**kwargs)
            flavor = cap.take()
    except Exception:  # an estimate only: never let it stop the capture
        return None
    return sum(t.numel() * t.element_size() for _, t in _named_tensors(flavor))


def flavor_from_tensors(tensors: dict[str, torch.Tensor]) -> Flavor:
    units: dict[str, dict] = {}
    shared: dict[str, torch.Tensor] = {}
    model_output = tensors.get("model_output")
    pool_to = int(tensors["meta/pool_to"][0]) if "meta/pool_to" in tensors else -1
    for name, t in tensors.items():
        parts = name.split("/")
        if parts[0] == "shared":
            shared[parts[1]] = t
        elif parts[0] == "unit":
            entry = units.setdefault(parts[1], {"side": {}, "heads": {}})
            field_name = parts[2]
            if field_name == "side":
                entry["side"][parts[3]] = t
            elif field_name == "heads":
                entry["heads"].setdefault(parts[3], {})[parts[4]] = t
            elif field_name == "time":
                entry["time_s"] = float(t[0])
            elif field_name in ("in_shape", "out_shape"):
                entry[field_name] = tuple(int(v) for v in t.tolist())
            else:
                entry[{"out": "output", "in": "input"}.get(field_name, field_name)] = t
    return Flavor({u: UnitFlavor(**e) for u, e in units.items()}, shared, model_output,
                  None if pool_to < 0 else pool_to)


# ------------------------------------------------------------------------------------------------ store


class FlavorStore:
    """A verified flavor cache on disk; `load(i)` returns the Flavor of probe batch i."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.manifest["shards"])

    def probe_indices(self, i: int) -> list[int]:
        return list(self.manifest["shards"][i]["probes"])

    def load(self, i: int, units: Collection[str] | None = None) -> Flavor:
        """Probe batch i's flavor; with `units`, only those units' tensors (and the shared ones) are read."""
        path = str(self.directory / self.manifest["shards"][i]["file"])
        if units is None:
            return flavor_from_tensors(load_file(path))
        wanted = set(units)
        with safe_open(path, framework="pt") as f:
            return flavor_from_tensors({k: f.get_tensor(k) for k in f.keys()
                                        if not k.startswith("unit/") or k.split("/", 2)[1] in wanted})

    def total_bytes(self) -> int:
        return sum(s["bytes"] for s in self.manifest["shards"])


def _shard_is_valid(directory: Path, entry: dict) -> str | None:
    """None when the shard is intact, else why not."""
    path = directory / entry["file"]
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["bytes"]:
        return f"size {path.stat().st_size} != {entry['bytes']} (truncated?)"
    try:
        read_safetensors_header(path)
    except CheckpointError as e:
        return str(e)
    if hash_file(path) != entry["sha256"]:
        return "sha256 mismatch (corrupt)"
    return None


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_manifest(directory: Path, manifest: dict) -> None:
    with atomic_output(directory / MANIFEST) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1))


def build_or_load_flavors(directory: str | os.PathLike, teacher: nn.Module, unit_map: UnitMap, probes: ProbeSet,
                          key: CacheKey, batch_size: int = 4, options: CaptureOptions | None = None,
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                          log=print, estimate: bool = True) -> FlavorStore:
    """Return the teacher's flavors for `probes`, capturing only what is missing or invalid.

    Reuses shards when `key` matches the manifest and their checksums verify; otherwise (re)captures with a
    progress bar, printing a size estimate first (from a shape-only pass on the meta device; `estimate=False`
    skips it) and a time/size extrapolation from the first batch.

    Under torch.distributed (a shared directory), rank 0 builds while the other ranks wait at a barrier and
    then open the finished cache; call it on every rank.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        if rank != 0:
            dist.barrier()
        store = _build_or_load(directory, teacher, unit_map, probes, key, batch_size, options, device, dtype,
                               log if rank == 0 else (lambda *_: None), estimate and rank == 0)
        if rank == 0:
            dist.barrier()
        return store
    return _build_or_load(directory, teacher, unit_map, probes, key, batch_size, options, device, dtype, log,
                          estimate)


def _build_or_load(directory, teacher, unit_map, probes, key, batch_size, options, device, dtype, log,
                   estimate) -> FlavorStore:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = options or CaptureOptions()
    if options.keep_graph:
        raise ValueError("teacher flavors are captured without a graph; pass CaptureOptions(keep_graph=False)")
    batches = list(probes.batches(batch_size))
    digest = key.digest()
    old = _read_manifest(directory)
    shards: list[dict | None] = [None] * len(batches)
    if old is not None and old.get("key_digest") == digest and old.get("format") == FORMAT_VERSION \
            and [s["probes"] for s in old["shards"]] == batches:
        for i, entry in enumerate(old["shards"]):
            if entry.get("sha256") is None:
                continue
            problem = _shard_is_valid(directory, entry)
            if problem is None:
                shards[i] = entry
            else:
                log(f"flavor cache: shard {directory / entry['file']} is invalid ({problem}); recapturing it")
    elif old is not None:
        log(f"flavor cache in {directory} was built for another teacher, LoRA set, probe set, unit map, dtype or "
            "batch size; rebuilding it")
        for entry in old.get("shards", []):
            name = str(entry.get("file", ""))
            if name.startswith("shard-") and Path(name).name == name:  # only our own files, only in this folder
                (directory / name).unlink(missing_ok=True)

    todo = [i for i, s in enumerate(shards) if s is None]
    manifest = {"format": FORMAT_VERSION, "key": asdict(key), "key_digest": digest, "units": unit_map.names,
                "batch_size": batch_size, "complete": False,
                "shards": [s or {"file": f"shard-{i:05d}.safetensors", "probes": b, "sha256": None, "bytes": 0}
                           for i, (s, b) in enumerate(zip(shards, batches))]}
    if not todo:
        log(f"flavor cache: reusing {len(batches)} shards in {directory} ({_megabytes(manifest)} MB)")
        manifest["complete"] = True
        return FlavorStore(directory, manifest)

    per_batch_bytes = estimate_flavor_bytes(teacher, unit_map, probes.unet_kwargs(batches[0]), options) \
        if estimate else None
    if per_batch_bytes is not None:
        log(f"flavor cache: {len(todo)} batches to capture, about {per_batch_bytes * len(todo) / 2**20:.1f} MB "
            f"({per_batch_bytes / 2**20:.2f} MB per batch of {len(batches[0])} probes)")
    was_training = teacher.training
    teacher.eval()
    started = time.perf_counter()
    try:
        with UnitCapture(teacher, unit_map, options) as cap, torch.no_grad():
            for n, i in enumerate(tqdm(todo, desc="teacher flavors", unit="batch", disable=len(todo) < 2)):
                t0 = time.perf_counter()
                teacher(**probes.unet_kwargs(batches[i], device=device, dtype=dtype))
                entry = manifest["shards"][i]
                path = save_safetensors_atomic(flavor_to_tensors(cap.take()), directory / entry["file"],
                                               metadata={"key_digest": digest})
                entry.update(sha256=hash_file(path), bytes=path.stat().st_size)
                _write_manifest(directory, manifest)
                if n == 0:
                    per_batch = time.perf_counter() - t0
                    log(f"flavor cache: first batch took {per_batch:.2f} s and {entry['bytes'] / 2**20:.2f} MB → "
                        f"≈{per_batch * len(todo):.1f} s and ≈{entry['bytes'] * len(todo) / 2**20:.1f} MB in all")
    finally:
        teacher.train(was_training)
    manifest["complete"] = True
    manifest["capture_seconds"] = round(time.perf_counter() - started, 3)
    _write_manifest(directory, manifest)
    log(f"flavor cache: wrote {len(todo)} shards to {directory} ({_megabytes(manifest)} MB) "
        f"in {manifest['capture_seconds']:.2f} s")
    return FlavorStore(directory, manifest)


def _megabytes(manifest: dict) -> str:
    return f"{sum(s['bytes'] for s in manifest['shards']) / 2**20:.2f}"
