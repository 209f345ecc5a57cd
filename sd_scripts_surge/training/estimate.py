"""`--estimate`: what a run will hold in accelerator memory, component by component, before anything is loaded.

Built on the meta device (no weights are read, so it is instant for a full-size SDXL): the student's configs
come from the checkpoint's header or its diffusers `config.json` files, the modules are built empty, and
activations are measured by a meta forward + backward graph at the configured batch and resolution. Components:

- student weights: trained parameters in their dtype (fp32, or bf16 with full_bf16); a LoRA run holds the frozen
  UNet in fp32 plus the network;
- gradients: one per trained parameter, in its dtype; with the fused backward pass only the largest one;
- optimizer state, by optimizer: AdamW 2 × fp32 per parameter, 8-bit Adam/Lion 2 / 1 bytes, Lion/SGD momentum
  1 × fp32, Adafactor/ADA_SURGE the factored second moment (rows + columns of every ≥ 2-D tensor, full for 1-D)
  in the state dtype (+ a full first moment with beta1, or ≈ 1 byte per element with moment_8bit=True);
- teacher: a second UNet when live (per teacher), in its storage dtype (`surge_teacher_dtype`: fp32, fp16/bf16,
  fp8 weights), none on the device with `surge_teacher cached` (offloaded to CPU);
- text encoders and VAE (fp32, frozen);
- activations: what autograd saves for backward in one step (saved-tensor hooks on the meta graph); with
  gradient checkpointing, the checkpointed blocks' inputs plus the largest block recomputed in backward;
  halved for tensors autocast keeps in bf16/fp16;
- on disk: the flavor cache (probes × seeds × the 4 probe timesteps, every unit's input and output, measured by a
  meta capture, at flavor_resolution when set).
- at epoch starts, instead of a step's gradients and activations (a phase of its own: `total` takes the larger):
  unit replay's state (gradient, AdamW moments and rollback snapshot of the largest unit, or of every unit with
  `replay_mode = all`) and the teacher's flavors read into RAM.

Numbers are estimates: allocator fragmentation, CUDA context (~0.3–0.5 GB) and kernels' workspaces come on top
(`overhead`), so a plan within ~10 % of the device size is reported as tight.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from library.surge_optimizer import MIN_8BIT_SIZE, QUANT_BLOCKSIZE
from sd_scripts_surge.config import TrainConfig
from sd_scripts_surge.models import configs as model_configs

GIB = 2**30
CUDA_OVERHEAD = int(0.5 * GIB)  # context + cuBLAS/cuDNN workspaces, observed 0.3–0.5 GB
# the blocks diffusers' gradient checkpointing wraps: every ResBlock and Transformer2D of the UNet
CHECKPOINTED = re.compile(r"^(?:(?:down|up)_blocks\.\d+|mid_block)\.(?:resnets|attentions)\.\d+$")


@dataclass
class Part:
    name: str
    bytes: int
    where: str = "device"  # device | ram | disk
    note: str = ""
    phase: str = ""  # "": held all run; "step": only inside a training step; "replay": only during epoch-start replay


@dataclass
class MemoryPlan:
    parts: list[Part] = field(default_factory=list)

    def total(self, where: str | tuple[str, ...] = "device") -> int:
        """The peak of `where` (one place or several together): what is held all run plus the larger of the
        phases that never overlap (a training step's gradients and activations; the epoch-start replay)."""
        wheres = (where,) if isinstance(where, str) else where
        mine = [p for p in self.parts if p.where in wheres]
        phases = {p.phase for p in mine if p.phase}
        return sum(p.bytes for p in mine if not p.phase) + max(
            (sum(p.bytes for p in mine if p.phase == phase) for phase in phases), default=0)


    def fits(self, device_bytes: int) -> str:
        need = self.total() + CUDA_OVERHEAD
        if need > device_bytes:
            return "does NOT fit"
        return "fits (tight)" if need > 0.9 * device_bytes else "fits"

    def table(self, device_bytes: int = 0) -> str:
        lines = [f"{'component':28s} {'GiB':>8s}  where   note"]
        for p in self.parts:
            when = {"step": " [training steps only]", "replay": " [epoch-start replay only]"}.get(p.phase, "")
            lines.append(f"{p.name:28s} {p.bytes / GIB:8.2f}  {p.where:6s}  {p.note}{when}")
        lines.append(f"{'total on the device':28s} {self.total() / GIB:8.2f}  (+{CUDA_OVERHEAD / GIB:.1f} overhead)")
        if device_bytes:
            lines.append(f"{'device':28s} {device_bytes / GIB:8.2f}  → {self.fits(device_bytes)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- configs


def read_model_configs(path: str | Path) -> model_configs.ModelConfigs:
    """The component configs of a checkpoint without reading its weights (header or config.json files)."""
    path = Path(path)
    if path.is_dir():
        def read(sub: str) -> dict | None:
            f = path / sub / "config.json"
            return model_configs.clean_config(json.loads(f.read_text())) if f.is_file() else None

        unet = read("unet")
        if unet is None:
            raise FileNotFoundError(f"{path}: no unet/config.json (not a diffusers model folder)")
        arch = "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd1"
        standard = model_configs.standard_configs(arch)
        return model_configs.ModelConfigs(arch, unet, read("vae") or standard.vae,
                                          read("text_encoder") or standard.text_encoder_1,
                                          read("text_encoder_2") or standard.text_encoder_2, source="diffusers")
    from sd_scripts_surge.models.fileio import read_safetensors_header
    from sd_scripts_surge.models.io import _resolve_single_file_configs, detect_arch

    header = read_safetensors_header(path)
    shapes = {k: tuple(info.shape) for k, info in header.tensors.items()}
    arch = detect_arch(shapes)
    return _resolve_single_file_configs(arch, shapes, header.metadata, None, path)


def meta_module(component: str, config: dict) -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights(include_buffers=True):
        if component == "unet":
            return UNet2DConditionModel(**config)
        if component == "vae":
            return AutoencoderKL(**config)
        te = CLIPTextConfig(**config)
        return CLIPTextModel(te) if component == "text_encoder_1" else CLIPTextModelWithProjection(te)


def _bytes(params: Sequence[torch.Tensor], bytes_per: int) -> int:
    return sum(p.numel() for p in params) * bytes_per


# ----------------------------------------------------------------------------------------- optimizer state


def optimizer_state_bytes(optimizer_type: str, params: Sequence[torch.Tensor], optimizer_args: Sequence[str]) -> int:
    """Bytes of optimizer state for `params` (shapes only)."""
    name = optimizer_type.lower().replace("_", "").rsplit(".", 1)[-1]
    args = dict(a.split("=", 1) for a in optimizer_args if "=" in a)
    n = sum(p.numel() for p in params)
    if name in ("adasurge", "adafactor"):
        state = 8 if str(args.get("state_dtype", "'fp32'")).strip("'\"") in ("fp64", "64", "float64") else 4
        factored = sum((math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) if p.dim() >= 2
                       else p.numel() for p in params)
        beta1 = args.get("beta1", "None").strip() not in ("None", "0", "0.0")
        if not beta1:
            return factored * state
        if name == "adasurge" and args.get("moment_8bit", "False").strip() in ("True", "1"):
            # 1 byte per element and an fp32 absmax per block of 256 from MIN_8BIT_SIZE elements up
            big = sum(p.numel() for p in params if p.numel() >= MIN_8BIT_SIZE)
            blocks = sum(-(-p.numel() // QUANT_BLOCKSIZE) for p in params if p.numel() >= MIN_8BIT_SIZE)
            return factored * state + big + 4 * blocks + (n - big) * state
        return factored * state + n * state
    if "8bit" in name:
        return n * (1 if "lion" in name else 2)
    if name.startswith("lion") or name == "sgd":
        return n * 4
    return n * 8  # AdamW and Adam-like: exp_avg + exp_avg_sq in fp32


# --------------------------------------------------------------------------------------------- activations


def activation_bytes(unet: nn.Module, batch: int, height: int, width: int, checkpointing: bool,
                     half: bool) -> int:
    """Bytes autograd keeps from the forward for the backward, measured on a meta graph."""
    kwargs = meta_inputs(unet, batch, height, width)
    params = {id(p) for p in unet.parameters()}
    per_block: dict[str, int] = {}
    current = {"block": "other"}
    saved = {"total": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params and t.is_floating_point():
            size = t.numel() * (2 if half else t.element_size())
            saved["total"] += size
            per_block[current["block"]] = per_block.get(current["block"], 0) + size
        return t

    blocks = [m for name, m in unet.named_modules() if CHECKPOINTED.match(name)]
    inputs = {"bytes": 0}
    handles = []
    for i, block in enumerate(blocks):
        def pre(module, args, i=i):  # noqa: ANN001
            current["block"] = str(i)
            x = args[0] if args else None
            if torch.is_tensor(x):
                inputs["bytes"] += x.numel() * (2 if half else x.element_size())

        def post(module, args, out):  # noqa: ANN001
            current["block"] = "other"
        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    unet.requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(**kwargs)
    finally:
        for h in handles:
            h.remove()
    if not checkpointing:
        return saved["total"]
    outside = per_block.get("other", 0)
    largest = max((v for k, v in per_block.items() if k != "other"), default=0)
    return outside + inputs["bytes"] + largest


# ------------------------------------------------------------------------------------------------- the plan


def estimate(cfg: TrainConfig, student_path: str | Path, *, resolution: tuple[int, int] | None = None,
             teachers: int = 1, entries: int | None = None) -> MemoryPlan:
    """The memory plan of `cfg` with the student at `student_path` (see module docstring). `entries` (images ×
    repeats of the dataset) sizes the cached-teacher target cache; None leaves that part out."""
    configs = read_model_configs(student_path)
    unet = meta_module("unet", configs.unet)
    height, width = resolution or (cfg.resolution[1], cfg.resolution[0])
    plan = MemoryPlan()
    unet_params = list(unet.parameters())
    lora = bool(cfg.network_module)
    if lora:
        dim = cfg.network_dim or 4
        lora_params = [torch.empty(dim * (m.in_features + m.out_features), device="meta")
                       for m in unet.modules() if isinstance(m, nn.Linear)]
        trained = lora_params
        plan.parts.append(Part("student UNet (frozen)", _bytes(unet_params, 4), note="fp32"))
        plan.parts.append(Part("LoRA network", _bytes(lora_params, 4), note=f"dim {dim}, Linear layers"))
        weight_bytes = 4
    else:
        trained = unet_params
        weight_bytes = 2 if cfg.full_bf16 else 4
        plan.parts.append(Part("student UNet (trained)", _bytes(unet_params, weight_bytes),
                               note="bf16" if cfg.full_bf16 else "fp32"))
    if cfg.fused_backward_pass:
        largest = max(p.numel() for p in trained)
        plan.parts.append(Part("gradients", largest * weight_bytes, note="fused backward: one tensor at a time",
                               phase="step"))
    else:
        plan.parts.append(Part("gradients", _bytes(trained, weight_bytes), note="one per trained parameter",
                               phase="step"))
    plan.parts.append(Part("optimizer state", optimizer_state_bytes(cfg.optimizer_type, trained, cfg.optimizer_args),
                           note=cfg.optimizer_type))
    if cfg.surge.enabled:
        from sd_scripts_surge.surge.precision import storage_bytes

        weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d))
        others = sum(p.numel() for p in unet_params) - weights
        storage = cfg.surge.teacher_dtype
        teacher_bytes = storage_bytes(storage, weights, others) * teachers
        stored = "fp32" if storage == "float" else storage
        # a LoRA student's frozen fp32 base is shared by a teacher that is that base plus LoRAs (frozen_copy)
        shared = lora and storage == "float" and not cfg.teacher_model and all(
            spec.path is None for spec in cfg.surge.teachers)
        if shared:
            plan.parts.append(Part("teacher UNet", 0, note="shares the LoRA student's frozen base UNet"))
        elif cfg.surge.teacher_placement == "cpu":
            from sd_scripts_surge.surge.placement import streamed_blocks

            largest = max(storage_bytes(storage, sum(m.weight.numel() for m in b.modules()
                                                     if isinstance(m, nn.Linear | nn.Conv2d)),
                                        sum(p.numel() for p in b.parameters())
                                        - sum(m.weight.numel() for m in b.modules()
                                              if isinstance(m, nn.Linear | nn.Conv2d)))
                          for _, b in streamed_blocks(unet))
            plan.parts.append(Part("teacher UNet", teacher_bytes, "ram", f"{stored} × {teachers}, in CPU memory"))
            plan.parts.append(Part("teacher block on the device", largest * teachers,
                                   note="--surge_teacher_placement cpu: the largest streamed block"))
        elif cfg.surge.teacher == "cached" and cfg.surge.target_fill == "upfront":
            plan.parts.append(Part("teacher UNet", teacher_bytes, "ram",
                                   f"{stored}, cached targets: offloaded while training"))
        elif cfg.surge.teacher == "cached":
            plan.parts.append(Part("teacher UNet", teacher_bytes, note=f"{stored} × {teachers}, on the device until "
                                   "the last first-use target is filled"))
        else:
            plan.parts.append(Part("teacher UNet", teacher_bytes, note=f"live, {stored} × {teachers}"))
    frozen = sum(sum(p.numel() for p in meta_module(c, configs.get(c)).parameters())
                 for c in ("vae", "text_encoder_1", "text_encoder_2") if configs.get(c) is not None)
    plan.parts.append(Part("text encoders + VAE", frozen * 4, note="fp32, frozen"))
    half = cfg.mixed_precision in ("bf16", "fp16")
    acts = activation_bytes(unet, cfg.train_batch_size, height, width, cfg.gradient_checkpointing, half)
    plan.parts.append(Part("activations", acts, note=f"batch {cfg.train_batch_size} at {width}x{height}"
                           + (", gradient checkpointing" if cfg.gradient_checkpointing else ""), phase="step"))
    if cfg.surge.enabled:
        per_unit, shared = flavor_bytes_by_unit(unet, cfg.surge.unit_map, height, width,
                                                cfg.surge.flavor_resolution or None)
        per_probe = shared + sum(per_unit.values())
        pooled = f"pooled to {cfg.surge.flavor_resolution}" if cfg.surge.flavor_resolution else "full size"
        from sd_scripts_surge.training.surge_setup import PROBE_TIMESTEPS

        samples = cfg.surge.probes * cfg.surge.num_seeds * len(PROBE_TIMESTEPS)
        plan.parts.append(Part("flavor cache", per_probe * samples, "disk",
                               f"{cfg.surge.probes} probes × {cfg.surge.num_seeds} seeds × {len(PROBE_TIMESTEPS)} "
                               f"timesteps, every unit's input and output, {pooled}"))
        plan.parts += replay_parts(cfg, unet, per_unit, shared, samples, weight_bytes if not lora else 4)
    if cfg.surge.enabled and cfg.surge.teacher == "cached" and entries:
        traj = bool(cfg.surge.traj_weight) and teachers == 1
        per_entry = target_bytes(unet, cfg.surge.unit_map, height, width, traj)
        draws = cfg.surge.target_draws
        where = "disk" if cfg.surge.target_cache_dir else "ram"
        plan.parts.append(Part("teacher target cache", per_entry * entries * draws, where,
                               f"{entries} entries × {draws} draws, prediction"
                               + (" + every trajectory unit's input and output" if traj else "")
                               + (" (shards on disk)" if where == "disk" else " (in memory)")))
    return plan


def replay_parts(cfg: TrainConfig, unet: nn.Module, unit_flavor_bytes: dict[str, int], shared_bytes: int,
                 samples: int, weight_bytes: int) -> list[Part]:
    """The epoch-start replay / unit LERP (surge/distill.py): the teacher's flavors read into RAM, and per replayed
    parameter its gradient, AdamW's two moments and the rollback snapshot (4 × the parameter's bytes; LERP: the
    snapshot only). replay_mode single trains one unit at a time (the largest counts) and reads one unit's
    window of the flavors at a time (the largest window counts); all trains every unit on every unit's flavors.
    unit_flavor_bytes / shared_bytes: one probe sample's flavor bytes per unit and shared; `samples` of them."""
    s = cfg.surge
    replaying = s.replay_units > 0 and s.replay_steps > 0
    if not (replaying or s.lerp_alpha):
        return []
    from sd_scripts_surge.surge.units import build_unit_map

    unit_map = build_unit_map(unet, s.unit_map)
    dim = cfg.network_dim or 4

    def trained(spec) -> int:  # noqa: ANN001
        modules = [unet.get_submodule(m) for m in spec.modules]
        if cfg.network_module:  # the LoRA's down + up of every Linear inside the unit
            return sum(dim * (lin.in_features + lin.out_features) for m in modules for lin in m.modules()
                       if isinstance(lin, nn.Linear))
        return sum(p.numel() for m in modules for p in m.parameters())

    sizes = [trained(spec) for spec in unit_map.units if spec.kind != "embed"]
    if not sizes:
        return []
    per = 4 if replaying else 1
    every = replaying and s.replay_mode == "all"
    count = sum(sizes) if every else max(sizes)
    what = "every unit at once" if every else "the largest unit, one at a time"
    if every:
        read, read_note = shared_bytes + sum(unit_flavor_bytes.values()), "the teacher's whole flavor cache"
    else:
        from sd_scripts_surge.surge.replay import window_units

        windows = [window_units(unit_map, spec.name, s.pre_change_layers, s.post_change_layers)
                   for spec in unit_map.units if spec.kind != "embed"]
        read = shared_bytes + max(sum(unit_flavor_bytes.get(n, 0) for n in w) for w in windows)
        read_note = "the largest unit window's share of the flavor cache, one window at a time"
    return [Part("unit replay state", count * weight_bytes * per, note=f"{what}: gradient, AdamW moments, snapshot"
                 if replaying else "unit LERP: the snapshot of the largest unit", phase="replay"),
            Part("flavors read for replay", read * samples, "ram", read_note, phase="replay")]


def target_bytes(unet: nn.Module, unit_map: str, height: int, width: int, trajectory: bool) -> int:
    """Bytes of one cached-teacher entry: the prediction and, with the trajectory loss, each trajectory unit's
    full-size (input, output) in fp32 (an input is left out where the unit changes shape, as the cache does)."""
    from sd_scripts_surge.surge.capture import CaptureOptions, capture_flavor
    from sd_scripts_surge.surge.distill import trajectory_units
    from sd_scripts_surge.surge.units import build_unit_map

    kwargs = meta_inputs(unet, 1, height, width)
    total = kwargs["sample"].numel() * 4
    if not trajectory:
        return total
    units = build_unit_map(unet, unit_map)
    with torch.no_grad():
        _, flavor = capture_flavor(unet, units, kwargs, CaptureOptions(head_stats=False, time_units=False))
    for name in trajectory_units(units):
        u = flavor.units[name]
        total += u.output.numel() * 4
        if u.input is not None and u.input.shape == u.output.shape:
            total += u.input.numel() * 4
    return total


def flavor_bytes_by_unit(unet: nn.Module, unit_map: str, height: int, width: int,
                         pool_to: int | None) -> tuple[dict[str, int], int]:
    """Bytes of one probe sample's flavor, per unit (input, output, side inputs) and shared (embeddings,
    context), from a meta capture; stored as fp32."""
    from sd_scripts_surge.surge.capture import CaptureOptions, capture_flavor
    from sd_scripts_surge.surge.units import build_unit_map

    kwargs = meta_inputs(unet, 1, height, width)
    with torch.no_grad():
        _, flavor = capture_flavor(unet, build_unit_map(unet, unit_map), kwargs,
                                   CaptureOptions(pool_to=pool_to, head_stats=False, time_units=False))

    def nbytes(tensors) -> int:  # noqa: ANN001
        return sum(t.numel() * 4 for t in tensors if torch.is_tensor(t))

    per_unit = {name: nbytes((u.input, u.output, *u.side.values())) for name, u in flavor.units.items()}
    return per_unit, nbytes(flavor.shared.values())


def meta_inputs(unet: nn.Module, batch: int, height: int, width: int) -> dict:
    """UNet keyword arguments of the right shapes on the meta device."""
    cfg = unet.config
    dev = torch.device("meta")
    kwargs = {"sample": torch.empty(batch, cfg.in_channels, height // 8, width // 8, device=dev),
              "timestep": torch.tensor([500] * batch, device=dev),
              "encoder_hidden_states": torch.empty(batch, 77, cfg.cross_attention_dim, device=dev)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, device=dev),
                                       "time_ids": torch.empty(batch, 6, device=dev)}
    return kwargs
