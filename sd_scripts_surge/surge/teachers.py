"""Frozen teachers for surge training: a checkpoint, base + LoRA(s) hooked at run time, or several experts.

A teacher is one or more *experts*. Each expert is a frozen model (a `ModelBundle` or a plain UNet module)
plus kohya LoRA files hooked into it with their multipliers (never merged into any file or weight), a mixing
`weight` and an optional `timestep_range` [start, end). For every sample of a batch, the experts whose range
holds its timestep are mixed with their weights normalised to sum 1:
- one expert: the teacher is that model;
- no ranges: weighted ensemble, Σ_e w_e·ε_e / Σ_e w_e;
- ranges: routing by timestep (e.g. A for [0, 500), B for [500, 1000)); overlapping ranges mix.

Experts loaded from the same checkpoint share its modules; each expert's LoRAs are enabled only while that
expert runs, so two LoRA variants of one base cost one base in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from networks.lora import LoRANetwork, create_network_from_weights, read_lora_file
from sd_scripts_surge.models.bundle import ModelBundle

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000

# ---------------------------------------------------------------------------------------------------------------
# Specs (what the user writes)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRARef:
    """One LoRA file hooked into an expert with a multiplier."""

    path: str
    multiplier: float = 1.0


@dataclass(frozen=True)
class TeacherSpec:
    """One expert: checkpoint `path` (None = the base model handed to `build_teacher`), LoRAs, weight, range.

    timestep_range is half-open [start, end): (0, 500) holds t = 0 … 499.
    """

    path: str | None = None
    loras: tuple[LoRARef, ...] = ()
    weight: float = 1.0
    timestep_range: tuple[float, float] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"teacher {self.label}: weight must be >= 0, got {self.weight}")
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            if not lo < hi:
                raise ValueError(f"teacher {self.label}: timestep_range {self.timestep_range} must have start < end")

    @property
    def label(self) -> str:
        return self.name or self.path or "base"

    @classmethod
    def from_config(cls, value: str | Mapping[str, Any], where: str = "teachers") -> TeacherSpec:
        """From a TOML value: a path string, or a table with path, loras, weight, timestep_range, name.

        loras entries: "file.safetensors", ["file.safetensors", 0.8] or {path = "...", multiplier = 0.8}.
        """
        if isinstance(value, str):
            return cls(path=value)
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a path or a table, got {type(value).__name__}")
        known = {"path", "loras", "weight", "timestep_range", "name"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        loras = tuple(_lora_ref(item, f"{where}.loras[{i}]") for i, item in enumerate(value.get("loras", ())))
        rng = value.get("timestep_range")
        if rng is not None:
            if len(rng) != 2:
                raise ValueError(f"{where}.timestep_range: expected [start, end], got {rng!r}")
            rng = (float(rng[0]), float(rng[1]))
        return cls(path=value.get("path"), loras=loras, weight=float(value.get("weight", 1.0)), timestep_range=rng,
                   name=str(value.get("name", "")))


def _lora_ref(item: Any, where: str) -> LoRARef:
    if isinstance(item, LoRARef):
        return item
    if isinstance(item, (str, os.PathLike)):
        return LoRARef(str(item))
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"path", "multiplier"})
        if unknown or "path" not in item:
            raise ValueError(f"{where}: expected {{path = ..., multiplier = ...}}, got keys {sorted(item)}")
        return LoRARef(str(item["path"]), float(item.get("multiplier", 1.0)))
    if isinstance(item, Sequence) and len(item) == 2:
        return LoRARef(str(item[0]), float(item[1]))
    raise ValueError(f"{where}: expected a path, [path, multiplier] or a table, got {item!r}")


# ---------------------------------------------------------------------------------------------------------------
# Experts and the teacher
# ---------------------------------------------------------------------------------------------------------------


def freeze(module: nn.Module) -> nn.Module:
    """eval mode and requires_grad False on every parameter."""
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass(eq=False)
class Expert:
    """A frozen UNet (+ its text encoders) with hooked LoRA networks, a mixing weight and a timestep range."""

    unet: nn.Module
    text_encoders: list[nn.Module] = field(default_factory=list)
    networks: list[LoRANetwork] = field(default_factory=list)
    weight: float = 1.0
    timestep_range: tuple[float, float] | None = None
    name: str = ""
    arch: str = "sdxl"
    loras: tuple[LoRARef, ...] = ()  # the files the networks came from (for display and cache keys)

    def covers(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Bool mask: which timesteps lie in [start, end) (all, without a range)."""
        if self.timestep_range is None:
            return torch.ones(timesteps.shape, dtype=torch.bool, device=timesteps.device)
        lo, hi = self.timestep_range
        return (timesteps >= lo) & (timesteps < hi)


def _batch_timesteps(timesteps: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timesteps, device=device)
    if t.dim() == 0 or t.shape == (1,):
        t = t.reshape(()).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps: expected a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t


def _select(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[index]
    if isinstance(value, Mapping):
        return {k: _select(v, index, batch) for k, v in value.items()}
    return value


def _unet_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"UNet returned {type(out).__name__}; expected a tensor, a `.sample` output or a tuple")


class Teacher:
    """Frozen experts mixed per sample by timestep; everything runs under no_grad."""

    def __init__(self, experts: Sequence[Expert], num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        if not experts:
            raise ValueError("a teacher needs at least one expert")
        self.experts = list(experts)
        self.num_train_timesteps = num_train_timesteps
        for e in self.experts:
            freeze(e.unet)
            for te in e.text_encoders:
                freeze(te)
            for net in e.networks:
                freeze(net)
        self._check_coverage()

    # -- structure ----------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        if len(self.experts) == 1:
            return "single"
        return "routed" if any(e.timestep_range is not None for e in self.experts) else "weighted"

    @property
    def unet(self) -> nn.Module:
        """The first expert's UNet (the only one for a single teacher; capture hooks go here)."""
        return self.experts[0].unet

    def _all_networks(self) -> list[LoRANetwork]:
        return [net for e in self.experts for net in e.networks]

    def _check_coverage(self) -> None:
        if sum(e.weight for e in self.experts) <= 0:
            raise ValueError("teacher weights sum to 0; give at least one expert a positive weight")
        t = torch.arange(self.num_train_timesteps, dtype=torch.float32)
        covered = torch.zeros_like(t)
        for e in self.experts:
            covered += e.covers(t).float() * e.weight
        gaps = t[covered <= 0]
        if len(gaps):
            ranges = [(e.name, e.timestep_range, e.weight) for e in self.experts]
            raise ValueError(
                f"teacher experts leave timesteps {int(gaps[0])}…{int(gaps[-1])} ({len(gaps)} of "
                f"{self.num_train_timesteps}) without a positive-weight expert; ranges are half-open [start, end): "
                f"{ranges}"
            )

    def mixing_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """[B, E] weights per sample and expert: w_e·[t in range_e], each row normalised to sum 1."""
        cols = [e.covers(timesteps).to(torch.float64) * e.weight for e in self.experts]
        w = torch.stack(cols, dim=1)
        total = w.sum(dim=1, keepdim=True)
        if bool((total <= 0).any()):
            bad = timesteps[(total <= 0).squeeze(1)].tolist()
            raise ValueError(f"no teacher expert covers timesteps {bad}")
        return w / total

    @contextlib.contextmanager
    def active(self, index: int) -> Iterator[Expert]:
        """Enable only expert `index`'s LoRA networks (experts may share hooked base modules)."""
        expert = self.experts[index]
        mine = {id(n) for n in expert.networks}
        for net in self._all_networks():
            net.set_enabled(id(net) in mine)
        try:
            yield expert
        finally:
            for net in self._all_networks():
                net.set_enabled(True)

    # -- forward ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def unet_forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        context: torch.Tensor | Sequence[torch.Tensor],
        added_cond_kwargs: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Noise prediction (whatever the experts predict: ε or v), mixed per sample by `mixing_weights`.

        context / added_cond_kwargs: one for all experts, or a sequence with one per expert (when experts have
        different text encoders, encode the prompts with each: `encode_text(..., expert=i)`).
        """
        batch = latents.shape[0]
        t = _batch_timesteps(timesteps, batch, latents.device)
        weights = self.mixing_weights(t)
        per_expert_ctx = not isinstance(context, torch.Tensor)
        per_expert_add = added_cond_kwargs is not None and not isinstance(added_cond_kwargs, Mapping)
        if per_expert_ctx and len(context) != len(self.experts):
            raise ValueError(f"context: {len(context)} tensors for {len(self.experts)} experts")
        if per_expert_add and len(added_cond_kwargs) != len(self.experts):
            raise ValueError(f"added_cond_kwargs: {len(added_cond_kwargs)} dicts for {len(self.experts)} experts")

        result: torch.Tensor | None = None
        for i in range(len(self.experts)):
            w = weights[:, i]
            rows = torch.nonzero(w > 0).squeeze(1)
            if rows.numel() == 0:
                continue
            ctx = context[i] if per_expert_ctx else context
            add = added_cond_kwargs[i] if per_expert_add else added_cond_kwargs
            full = rows.numel() == batch
            if not full:
                idx = rows.to(latents.device)
                lat, tt, ctx, add = latents[idx], t[idx], ctx[idx], _select(add, idx, batch)
            else:
                lat, tt = latents, t
            with self.active(i) as expert:
                kwargs = {"added_cond_kwargs": dict(add)} if add is not None else {}
                pred = _unet_output(expert.unet(lat, tt, encoder_hidden_states=ctx, **kwargs))
            if full and bool((w == 1).all()):
                if len(self.experts) == 1:
                    return pred
                result = pred.float() if result is None else result + pred.float()
                continue
            if result is None:
                result = torch.zeros((batch, *pred.shape[1:]), dtype=torch.float32, device=pred.device)
            scale = w[rows].to(torch.float32).to(pred.device).view(-1, *([1] * (pred.dim() - 1)))
            result.index_add_(0, rows.to(pred.device), pred.float() * scale)
        assert result is not None  # mixing_weights guarantees a covering expert per row
        return result.to(latents.dtype)

    __call__ = unet_forward

    def predict(self, unet_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """`unet_forward` from diffusers-style keyword arguments (sample, timestep, encoder_hidden_states,
        added_cond_kwargs): usable directly as distill's `TeacherForward`."""
        unknown = sorted(set(unet_kwargs) - {"sample", "timestep", "encoder_hidden_states", "added_cond_kwargs"})
        if unknown:
            raise ValueError(f"teacher.predict: unsupported UNet argument(s) {unknown}")
        return self.unet_forward(unet_kwargs["sample"], unet_kwargs["timestep"], unet_kwargs["encoder_hidden_states"],
                                 unet_kwargs.get("added_cond_kwargs"))

    @torch.no_grad()
    def text_encoder_forward(self, index: int, input_ids: torch.Tensor, expert: int = 0, **kwargs: Any) -> Any:
        """Text encoder `index` (0 = TE1, 1 = TE2) of expert `expert`, with its LoRAs enabled."""
        with self.active(expert) as e:
            if index >= len(e.text_encoders):
                raise ValueError(f"expert {e.name or expert} has {len(e.text_encoders)} text encoder(s), no #{index}")
            return e.text_encoders[index](input_ids, **kwargs)

    @torch.no_grad()
    def encode_text(self, input_ids_1: torch.Tensor, input_ids_2: torch.Tensor | None = None,
                    expert: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled) as the expert's UNet expects them.

        SDXL: context = concat(TE1 penultimate, TE2 penultimate), pooled = TE2 projected text embedding.
        SD1: context = TE1 last hidden state, pooled None.
        """
        e = self.experts[expert]
        if e.arch == "sd1":
            out = self.text_encoder_forward(0, input_ids_1, expert=expert)
            return out.last_hidden_state, None
        if input_ids_2 is None:
            input_ids_2 = input_ids_1
        out1 = self.text_encoder_forward(0, input_ids_1, expert=expert, output_hidden_states=True)
        out2 = self.text_encoder_forward(1, input_ids_2, expert=expert, output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return context, out2.text_embeds

    # -- bookkeeping --------------------------------------------------------------------------------------------

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Teacher:
        seen: set[int] = set()
        for e in self.experts:
            for m in [e.unet, *e.text_encoders, *e.networks]:
                streamed = getattr(m, "_surge_streamed", None) is not None and device is not None
                if id(m) not in seen and not getattr(m, "_surge_shared", False) and not streamed:
                    # shared with the student, or kept on the CPU and streamed block by block (placement.py)
                    seen.add(id(m))
                    m.to(device=device, dtype=dtype)
        return self

    def lora_files(self) -> list[tuple[str, float]]:
        """(path, multiplier) of every hooked LoRA file, expert by expert."""
        return [(ref.path, ref.multiplier) for e in self.experts for ref in e.loras]

    def fingerprint(self) -> str:
        return teacher_fingerprint(self)

    def close(self) -> None:
        """Unhook every LoRA (reverse order); the base modules run as plain models again."""
        for net in reversed(self._all_networks()):
            net.restore()

    def describe(self) -> str:
        lines = [f"teacher ({self.mode}, {len(self.experts)} expert(s))"]
        for e in self.experts:
            loras = ", ".join(f"{os.path.basename(r.path)}×{r.multiplier:g}" for r in e.loras) or "no LoRA"
            rng = f" t∈[{e.timestep_range[0]:g}, {e.timestep_range[1]:g})" if e.timestep_range else ""
            lines.append(f"  {e.name or 'expert'}: weight {e.weight:g}{rng}; {loras}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------


def _parts(model: ModelBundle | nn.Module) -> tuple[nn.Module, list[nn.Module], str]:
    if isinstance(model, ModelBundle):
        tes = [m for m in (model.text_encoder_1, model.text_encoder_2) if m is not None]
        return model.unet, tes, model.arch
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        sdxl = config is not None and hasattr(config, "get") and config.get("addition_embed_type") == "text_time"
        return model, [], "sdxl" if sdxl else "sd1"
    raise TypeError(f"teacher model must be a ModelBundle or an nn.Module (UNet), got {type(model).__name__}")


def hook_lora(
    ref: LoRARef, unet: nn.Module, text_encoders: Sequence[nn.Module], *, device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoRANetwork:
    """Load a kohya LoRA file and hook it (multiplier from `ref`) into the UNet and text encoders.

    With no text encoders (a plain UNet teacher), the file's text encoder modules are dropped with a warning.
    """
    weights_sd, _ = read_lora_file(ref.path)
    if not text_encoders:
        te_keys = [k for k in weights_sd if k.startswith("lora_te")]
        if te_keys:
            logger.warning("%s: %d text encoder tensors skipped (the teacher is a plain UNet)", ref.path, len(te_keys))
            weights_sd = {k: v for k, v in weights_sd.items() if not k.startswith("lora_te")}
    network, weights_sd = create_network_from_weights(
        ref.multiplier, ref.path, None, list(text_encoders), unet, weights_sd=weights_sd, for_inference=True
    )
    network.load_state_dict(weights_sd, strict=True)
    network.to(device=device, dtype=dtype)
    network.apply_to(list(text_encoders), unet)
    return freeze(network)


def make_expert(
    model: ModelBundle | nn.Module,
    loras: Sequence[LoRARef | tuple[str, float] | str] = (),
    *,
    weight: float = 1.0,
    timestep_range: tuple[float, float] | None = None,
    name: str = "",
    networks: Sequence[LoRANetwork] = (),
) -> Expert:
    """An expert over `model` with LoRA files hooked (and/or already-built `networks`, e.g. trained in memory)."""
    unet, tes, arch = _parts(model)
    refs = tuple(_lora_ref(item, f"loras[{i}]") for i, item in enumerate(loras))
    try:
        param = next(unet.parameters())
        device, dtype = param.device, (param.dtype if param.is_floating_point() else None)
    except StopIteration:
        device, dtype = None, None
    hooked = [hook_lora(ref, unet, tes, device=device, dtype=dtype) for ref in refs]
    return Expert(unet=unet, text_encoders=tes, networks=[*networks, *hooked], weight=weight,
                  timestep_range=timestep_range, name=name, arch=arch, loras=refs)


def build_teacher(
    specs: TeacherSpec | Sequence[TeacherSpec],
    *,
    base: ModelBundle | nn.Module | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    load_dtype: torch.dtype | None = None,
    **load_kwargs: Any,
) -> Teacher:
    """Load and freeze the experts of `specs`; checkpoints are loaded once per path and shared.

    dtype/device: where the experts run (None: checkpoints load in fp32, `base` stays as it is).
    load_dtype: the dtype checkpoints are read in when `dtype` is None (e.g. bf16 for a teacher stored in bf16,
    so no fp32 copy is ever held).
    base: the model used by specs without a path. The teacher takes it over (freezes it and hooks LoRAs into
    it): pass a copy, never the student being trained. load_kwargs go to `models.io.load_model`
    (tokenizer_dir, config_dir, allow_pickle, arch).
    """
    if isinstance(specs, TeacherSpec):
        specs = [specs]
    models: dict[str, ModelBundle | nn.Module] = {}
    experts = []
    for spec in specs:
        if spec.path is None:
            if base is None:
                raise ValueError(f"teacher {spec.label}: no checkpoint path and no base model given")
            model = base
        else:
            if spec.path not in models:
                from sd_scripts_surge.models.io import load_model

                logger.info("loading teacher checkpoint %s", spec.path)
                models[spec.path] = load_model(spec.path, dtype=dtype or load_dtype or torch.float32, **load_kwargs)
            model = models[spec.path]
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        experts.append(make_expert(model, spec.loras, weight=spec.weight, timestep_range=spec.timestep_range,
                                   name=spec.label))
    teacher = Teacher(experts, num_train_timesteps=num_train_timesteps)
    logger.info(teacher.describe())
    return teacher


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------------


def teacher_fingerprint(teacher: Teacher) -> str:
    """sha256 (hex) over every expert's base weights (UNet + text encoders), LoRA tensors + multipliers, weight,
    timestep range and the mode: equal fingerprints mean the teacher computes the same function.

    LoRAs are hashed by content (the hooked tensors), so a renamed copy of a file keys the same cache.
    """
    from sd_scripts_surge.surge.flavors import hash_state_dict

    module_hashes: dict[int, str] = {}

    def module_hash(m: nn.Module) -> str:
        if id(m) not in module_hashes:
            module_hashes[id(m)] = hash_state_dict(m)
        return module_hashes[id(m)]

    record = {"mode": teacher.mode, "experts": []}
    for e in teacher.experts:
        record["experts"].append({
            "unet": module_hash(e.unet),
            "text_encoders": [module_hash(te) for te in e.text_encoders],
            "loras": [[module_hash(net), net.multiplier] for net in e.networks],
            "weight": e.weight,
            "timestep_range": list(e.timestep_range) if e.timestep_range else None,
        })
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
