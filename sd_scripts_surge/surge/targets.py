"""Cached teacher targets (DESIGN §3 G): the teacher's answers computed ahead of time, so training does not infer it.

For every training entry (an image × repeat of the dataset) and each of K draws, the (timestep, noise) pair is a
pure function of (seed, entry, draw) — `draw_noise` — and the teacher's outputs for it are computed once, before
training: the noise prediction, and for the hidden-unit losses the (input, output) of every trajectory unit.
Epoch e trains entry i on draw e mod K, so with K draws the teacher runs K times per entry however many epochs
follow, and no draw depends on the run's history (a resumed run sees exactly the same targets).

The cache needs each entry's inputs to be the same every epoch: captions that never vary (no shuffle, dropout)
and no flip_aug; `check_cacheable` says which subset breaks that. The size and time are estimated from the first
batch and printed before the rest runs; `max_bytes` (`--surge_cache_budget`) refuses a cache that would not fit.

With `defer` instead of `build` (`--surge_target_fill first_use`, in memory) nothing is computed up front: the
first `targets()` call that needs an entry's draw computes the whole build batch holding that entry, exactly as
`build` would have (same batch, same noise), so the values, and a resumed run's, are the same as up front.

It lives in memory, or with `directory` (`--surge_target_cache_dir`) on disk as one safetensors shard per
(draw, build batch), read back tensor by tensor (memory-mapped) while training:
- `manifest.json` records the cache key (teacher fingerprint, seed, noise offset, noise schedule, dtype) and per
  shard its entries, a sha256 of the batch's inputs (latents and conditioning) and the file's sha256.
- A different key makes every shard stale: they are deleted and rebuilt. A shard whose inputs changed, whose file
  is missing or whose checksum does not match is rebuilt alone (the teacher runs for it only).
- Shards are written through a temp file and the manifest is rewritten after each one, so an interrupted capture
  (Ctrl-C, a crash, a full disk) resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sd_scripts_surge.models.fileio import atomic_output, ensure_free_space, save_safetensors_atomic
from sd_scripts_surge.surge.losses import add_noise, apply_noise_offset

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = 1

Pairs = dict[str, tuple[torch.Tensor | None, torch.Tensor]]


@dataclass
class TeacherTargets:
    """What the teacher answered for one batch: its prediction (B, C, H, W) and, per trajectory unit, (h_in, h_out)
    (h_in None where the unit changes shape); `pairs` is None when no hidden-unit loss needs them."""

    prediction: torch.Tensor
    pairs: Pairs | None = None

    def item(self, i: int) -> TeacherTargets:
        """Sample i of the batch, as CPU tensors without the batch dimension."""
        pairs = None if self.pairs is None else {
            u: (None if h_in is None else h_in[i].detach().cpu(), h_out[i].detach().cpu())
            for u, (h_in, h_out) in self.pairs.items()}
        return TeacherTargets(self.prediction[i].detach().cpu(), pairs)

    @staticmethod
    def stack(items: Sequence[TeacherTargets], device: torch.device | str) -> TeacherTargets:
        """One batch from per-sample items, on `device`."""
        prediction = torch.stack([it.prediction for it in items]).to(device)
        if items[0].pairs is None:
            return TeacherTargets(prediction)
        pairs = {}
        for unit, (h_in, _) in items[0].pairs.items():
            stacked_in = None if h_in is None else torch.stack([it.pairs[unit][0] for it in items]).to(device)
            pairs[unit] = (stacked_in, torch.stack([it.pairs[unit][1] for it in items]).to(device))
        return TeacherTargets(prediction, pairs)

    def nbytes(self) -> int:
        tensors = [self.prediction] + ([t for pair in self.pairs.values() for t in pair if t is not None]
                                       if self.pairs else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Deferred:
    """What `TargetCache.defer` needs to fill a draw later."""

    batches: list[list[int]]
    batch_of: dict[int, int]  # entry → index of its build batch
    load: Callable[[Sequence[int]], tuple[Sequence[int], torch.Tensor, dict]]
    teacher: Callable[[dict], TeacherTargets]
    alphas_cumprod: torch.Tensor
    max_bytes: int
    log: Callable[[str], None]
    on_complete: Callable[[], None] | None
    total: int
    estimated: bool = False
    done: set[tuple[int, int]] = field(default_factory=set)  # (build batch, draw) computed


def draw_seed(seed: int, entry: int, draw: int) -> int:
    """A 63-bit generator seed for (seed, entry, draw); the same in every process and on every machine."""
    digest = hashlib.sha256(f"surge-target:{seed}:{entry}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_noise(seed: int, entry: int, draw: int, shape: Sequence[int], noise_offset: float = 0.0,
               timestep_range: tuple[int, int] = (0, 1000)) -> tuple[torch.Tensor, int]:
    """(ε, t) of draw `draw` of `entry`: ε ~ N(0, I) of `shape` (+ sd-scripts' noise offset), t uniform in range."""
    generator = torch.Generator().manual_seed(draw_seed(seed, entry, draw))
    noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = apply_noise_offset(noise, noise_offset, generator)
    t = int(torch.randint(timestep_range[0], timestep_range[1], (1,), generator=generator))
    return noise[0], t


def _tensor_sha(h: Any, value: Any) -> None:
    """Feed tensors (nested in dicts/lists) into a hash, in a fixed order, by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value):
            h.update(str(k).encode())
            _tensor_sha(h, value[k])
    elif isinstance(value, list | tuple):
        for v in value:
            _tensor_sha(h, v)
    elif value is not None:
        h.update(repr(value).encode())


def inputs_digest(entries: Sequence[int], latents: torch.Tensor, kwargs: dict) -> str:
    """sha256 of what the teacher is given for a batch besides the draws: entries, latents, conditioning."""
    h = hashlib.sha256(json.dumps([int(e) for e in entries]).encode())
    _tensor_sha(h, latents)
    _tensor_sha(h, kwargs)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _to_tensors(entries: Sequence[int], answer: TeacherTargets) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(entries):
        item = answer.item(i)
        out[f"{entry}|prediction"] = item.prediction
        for unit, (h_in, h_out) in (item.pairs or {}).items():
            if h_in is not None:
                out[f"{entry}|in|{unit}"] = h_in
            out[f"{entry}|out|{unit}"] = h_out
    return out


class TargetCache:
    """Per (entry, draw) teacher targets, in memory or in disk shards; `draw_of(epoch)` picks an epoch's draw."""

    def __init__(self, draws: int, seed: int, noise_offset: float = 0.0, directory: str | Path | None = None,
                 key: dict[str, Any] | None = None) -> None:
        if draws < 1:
            raise ValueError(f"surge target draws must be ≥ 1 (got {draws})")
        self.draws, self.seed, self.noise_offset = draws, seed, noise_offset
        self.items: dict[tuple[int, int], TeacherTargets] = {}  # in memory (no directory)
        self.directory = None if directory is None else Path(directory)
        self.key = {"format": FORMAT, "seed": seed, "noise_offset": noise_offset, **(key or {})}
        self.shard_of: dict[tuple[int, int], str] = {}  # (entry, draw) → shard file name (on disk)
        self._open: dict[str, Any] = {}  # shard name → safe_open handle
        self._keys: dict[str, dict[str, list[str]]] = {}  # shard name → entry → its tensor names
        self.capture_seconds = 0.0
        self.reused_shards = self.built_shards = 0
        self._deferred: _Deferred | None = None

    def __len__(self) -> int:
        return len(self.shard_of) if self.directory is not None else len(self.items)

    def draw_of(self, epoch: int) -> int:
        return epoch % self.draws

    def noise(self, entries: Sequence[int], draw: int, latent_shape: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε (B, C, H, W), t (B,)) of these entries' draw."""
        drawn = [draw_noise(self.seed, e, draw, latent_shape, self.noise_offset) for e in entries]
        return torch.stack([n for n, _ in drawn]), torch.tensor([t for _, t in drawn], dtype=torch.long)

    def targets(self, entries: Sequence[int], draw: int, device: torch.device | str) -> TeacherTargets:
        known = self.shard_of if self.directory is not None else self.items
        missing = [e for e in entries if (e, draw) not in known]
        if missing and self._deferred is not None:
            self._fill(missing, draw)
            missing = [e for e in entries if (e, draw) not in known]
        if missing:
            raise KeyError(f"no cached teacher targets for entries {missing[:5]} (draw {draw}); the cache was built "
                           "for another dataset or seed")
        if self.directory is None:
            return TeacherTargets.stack([self.items[(e, draw)] for e in entries], device)
        return TeacherTargets.stack([self._read(e, draw) for e in entries], device)

    def _read(self, entry: int, draw: int) -> TeacherTargets:
        from safetensors import safe_open

        name = self.shard_of[(entry, draw)]
        if name not in self._open:
            self._open[name] = safe_open(str(self.directory / name), framework="pt")
            index: dict[str, list[str]] = {}
            for k in self._open[name].keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                index.setdefault(k.partition("|")[0], []).append(k)
            self._keys[name] = index
        f = self._open[name]
        ins: dict[str, torch.Tensor] = {}
        outs: dict[str, torch.Tensor] = {}
        for k in self._keys[name].get(str(entry), []):
            kind, _, unit = k.partition("|")[2].partition("|")
            if kind in ("in", "out"):
                (ins if kind == "in" else outs)[unit] = f.get_tensor(k)
        pairs = {u: (ins.get(u), h_out) for u, h_out in outs.items()} or None
        return TeacherTargets(f.get_tensor(f"{entry}|prediction"), pairs)

    def nbytes(self) -> int:
        if self.directory is not None:
            return sum((self.directory / n).stat().st_size for n in set(self.shard_of.values()))
        return sum(item.nbytes() for item in self.items.values())

    # ---------------------------------------------------------------------------------------------- build
    def _load_manifest(self, log: Callable[[str], None]) -> dict[str, dict]:
        """The shards recorded for this key; a manifest of another key (or unreadable) empties the folder."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / MANIFEST
        if not path.is_file():
            return {}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("key") == self.key:
                return dict(manifest.get("shards", {}))
            log(f"teacher targets in {self.directory} were built for another teacher, seed or schedule: rebuilding")
        except (OSError, ValueError) as e:
            log(f"teacher targets: {path} is unreadable ({e}); rebuilding")
        for old in self.directory.glob("*.safetensors"):
            old.unlink()
        path.unlink()
        return {}

    def _write_manifest(self, shards: dict[str, dict]) -> None:
        assert self.directory is not None
        with atomic_output(self.directory / MANIFEST) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "shards": shards}, indent=1, sort_keys=True), encoding="utf-8")

    def _reusable(self, name: str, record: dict | None, digest: str, log: Callable[[str], None]) -> bool:
        if record is None or record.get("inputs") != digest:
            return False
        path = self.directory / name  # type: ignore[operator]
        if not path.is_file():
            log(f"teacher targets: shard {name} is missing; rebuilding it")
            return False
        if file_sha256(path) != record.get("sha256"):
            log(f"teacher targets: shard {name} fails its checksum (corrupt or changed); rebuilding it")
            return False
        return True

    def build(self, batches: Callable[[], Iterable[tuple[Sequence[int], torch.Tensor, dict]]], total_entries: int,
              teacher: Callable[[dict], TeacherTargets], alphas_cumprod: torch.Tensor, max_bytes: int = 0,
              log: Callable[[str], None] = print) -> None:
        """Run the teacher on every entry × draw. `batches()` yields (entries, latents, unet kwargs without sample
        and timestep); `teacher(kwargs)` answers one noised batch. The size and time are estimated from the first
        batch the teacher answers and printed before the rest runs; over `max_bytes` (when > 0), or over the free
        disk space of `directory`, is an error before any more work. Valid disk shards are reused, not recomputed."""
        started = time.perf_counter()
        shards = self._load_manifest(log) if self.directory is not None else {}
        kept: dict[str, dict] = {}
        done, estimated = 0, False
        bar = tqdm(total=total_entries * self.draws, desc="teacher targets", dynamic_ncols=True)
        try:
            for draw in range(self.draws):
                for index, (entries, latents, kwargs) in enumerate(batches()):
                    name = f"draw{draw:03d}-batch{index:06d}.safetensors"
                    if self.directory is not None:
                        digest = inputs_digest(entries, latents, kwargs)
                        if self._reusable(name, shards.get(name), digest, log):
                            kept[name] = shards[name]
                            self.shard_of.update({(int(e), draw): name for e in entries})
                            self.reused_shards += 1
                            bar.update(len(entries))
                            continue
                    answer = self._answer(entries, latents, kwargs, draw, teacher, alphas_cumprod)
                    if self.directory is None:
                        for i, entry in enumerate(entries):
                            self.items[(entry, draw)] = answer.item(i)
                        size_now = self.nbytes()
                    else:
                        save_safetensors_atomic(_to_tensors(entries, answer), self.directory / name)
                        kept[name] = {"entries": [int(e) for e in entries], "inputs": digest,
                                      "sha256": file_sha256(self.directory / name)}
                        self._write_manifest({**shards, **kept})  # resumable from here
                        self.shard_of.update({(int(e), draw): name for e in entries})
                        self.built_shards += 1
                        size_now = (self.directory / name).stat().st_size
                    done += len(entries)
                    bar.update(len(entries))
                    if not estimated:
                        estimated = True
                        self._check_size(size_now / max(1, len(entries)), total_entries, max_bytes, started, done,
                                         log)
        finally:
            bar.close()
        if self.directory is not None:
            stale = set(shards) - set(kept)
            for name in stale:
                (self.directory / name).unlink(missing_ok=True)
            self._write_manifest(kept)
        self.capture_seconds = time.perf_counter() - started
        where = "in memory" if self.directory is None else (
            f"in {self.directory} ({self.built_shards} shards computed, {self.reused_shards} reused)")
        log(f"teacher targets: {len(self)} cached {where}, {self.nbytes() / 2**20:.1f} MiB, in "
            f"{self.capture_seconds:.1f} s")

    def _answer(self, entries: Sequence[int], latents: torch.Tensor, kwargs: dict, draw: int,
                teacher: Callable[[dict], TeacherTargets], alphas_cumprod: torch.Tensor) -> TeacherTargets:
        """The teacher's answer for these entries' draw: their pre-drawn (t, ε) applied to the clean latents."""
        noise, t = self.noise(entries, draw, latents.shape[1:])
        noise, t = noise.to(latents.device, latents.dtype), t.to(latents.device)
        noised = {**kwargs, "sample": add_noise(latents, noise, t, alphas_cumprod), "timestep": t}
        with torch.no_grad():
            return teacher(noised)

    def defer(self, batches: Sequence[Sequence[int]],
              load: Callable[[Sequence[int]], tuple[Sequence[int], torch.Tensor, dict]],
              teacher: Callable[[dict], TeacherTargets], alphas_cumprod: torch.Tensor, max_bytes: int = 0,
              log: Callable[[str], None] = print, on_complete: Callable[[], None] | None = None) -> None:
        """Compute nothing now: `targets()` fills each missing draw, a whole build batch at a time (`batches`: the
        batches `build` would run; `load(entries)` → (the entries kept, latents, unet kwargs)). `on_complete` runs
        once, when the last entry × draw is in (e.g. to move the teacher off the device)."""
        if self.directory is not None:
            raise ValueError("teacher targets filled on first use live in memory: no target cache directory")
        of = {int(e): i for i, b in enumerate(batches) for e in b}
        self._deferred = _Deferred([list(b) for b in batches], of, load, teacher, alphas_cumprod, max_bytes, log,
                                   on_complete, total=len(of) * self.draws)
        log(f"teacher targets: {len(of)} entries × {self.draws} draws, each computed the first time a step trains it")

    def _fill(self, missing: Sequence[int], draw: int) -> None:
        d = self._deferred
        assert d is not None
        started = time.perf_counter()
        for index in dict.fromkeys(d.batch_of[int(e)] for e in missing):
            entries, latents, kwargs = d.load(d.batches[index])
            answer = self._answer(entries, latents, kwargs, draw, d.teacher, d.alphas_cumprod)
            for i, entry in enumerate(entries):
                self.items[(entry, draw)] = answer.item(i)
            if not d.estimated:
                d.estimated = True
                self._check_size(self.nbytes() / max(1, len(entries)), len(d.batch_of), d.max_bytes, started,
                                 len(entries), d.log)
            d.done.add((index, draw))
        self.capture_seconds += time.perf_counter() - started
        if len(d.done) == len(d.batches) * self.draws:
            d.log(f"teacher targets: all {len(self.items)} cached in memory, {self.nbytes() / 2**20:.1f} MiB, "
                  f"{self.capture_seconds:.1f} s of teacher time spread over the steps that needed them")
            done, self._deferred = d.on_complete, None
            if done is not None:
                done()

    def _check_size(self, per_item: float, total_entries: int, max_bytes: int, started: float, done: int,
                    log: Callable[[str], None]) -> None:
        size = per_item * total_entries * self.draws
        seconds = (time.perf_counter() - started) / max(1, done) * total_entries * self.draws
        where = "in memory" if self.directory is None else f"on disk in {self.directory}"
        log(f"teacher targets: {total_entries} entries × {self.draws} draws ≈ {size / 2**20:.1f} MiB {where}, "
            f"≈ {seconds:.0f} s to compute")
        if max_bytes and size > max_bytes:
            raise MemoryError(
                f"cached teacher targets need ≈ {size / 2**30:.2f} GiB, over --surge_cache_budget "
                f"{max_bytes / 2**30:.2f} GiB; lower --surge_target_draws, raise the budget, or use "
                "--surge_teacher live")
        if self.directory is not None:
            ensure_free_space(self.directory, int(size))
