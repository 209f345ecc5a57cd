"""Which checkpoint tensor each kohya LoRA module name lands on, for single-file (ldm/sgm) SD1 and SDXL files.

Used by `sd-merge extract-lora` and `sd-merge merge-lora`, which work on the files directly (streaming,
no model built). The names follow networks/lora.py (kohya-ss/sd-scripts' format):
- UNet, SDXL: `lora_unet_` + the ldm module path (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`); the
  diffusers-layout spelling (`lora_unet_down_blocks_1_attentions_0_...`) is accepted as an alias.
- UNet, SD1: `lora_unet_` + the diffusers module path (sd-scripts trains SD1 on the diffusers UNet); the ldm
  spelling is the alias.
- text encoders: `lora_te_` (SD1) or `lora_te1_` / `lora_te2_` (SDXL) + transformers' CLIP path
  (`text_model.encoder.layers.0.self_attn.q_proj`). SDXL's second encoder is stored in OpenCLIP layout:
  q/k/v are row blocks of `attn.in_proj_weight`, `out_proj` → `attn.out_proj`, `mlp.fc1/fc2` → `mlp.c_fc/c_proj`.
Targets (kohya's defaults): every Linear / 1×1 conv in the UNet's transformer blocks (incl. proj_in/out) and
the CLIP attention/MLP layers ("attn"); with conv modules asked for, the ResBlock, down- and up-sampler
layers too ("resnet": 3×3 convs are `kind="conv"`, their Linear/1×1 layers `kind="linear"`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sd_scripts_surge.models.configs import infer_unet_config
from sd_scripts_surge.models.convert import (
    SD1_TE1_PREFIX,
    SDXL_TE1_PREFIX,
    SDXL_TE2_PREFIX,
    UNET_PREFIX,
    unet_ldm_to_diffusers_map,
)
from sd_scripts_surge.models.fileio import CheckpointError
from sd_scripts_surge.models.keymap import detect_architecture

SD2_TE_PREFIX = "cond_stage_model.model."

_RESNET_SUFFIXES = (".in_layers.2", ".out_layers.3", ".emb_layers.1", ".skip_connection", ".op", ".conv")
_CLIP_MODULE = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_OPEN_CLIP_MODULE = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class LoraTarget:
    """A kohya LoRA module's place in a checkpoint: the tensor key and, for fused weights, a row range."""

    name: str
    key: str
    shape: tuple[int, ...]  # the module's weight shape (the row block for fused q/k/v)
    kind: str  # "linear" (Linear or 1×1 conv: network_dim) or "conv" (k×k conv: conv_dim)
    group: str  # "attn" (kohya's default targets) or "resnet" (only with conv modules)
    component: str  # "unet", "te1", "te2"
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class LoraKeyMap:
    arch: str
    targets: dict[str, LoraTarget]  # canonical kohya name → target
    aliases: dict[str, str]  # other spellings → canonical name

    def resolve(self, name: str) -> LoraTarget | None:
        return self.targets.get(self.aliases.get(name, name))


def _kind(shape: Sequence[int]) -> str:
    return "conv" if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else "linear"


def _name(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def _unet_targets(shapes: Mapping[str, Sequence[int]], arch: str) -> tuple[list[LoraTarget], dict[str, str]]:
    unet = {k[len(UNET_PREFIX) :]: tuple(s) for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
    configs_log = logging.getLogger("sd_scripts_surge.models.configs")
    level = configs_log.level
    configs_log.setLevel(logging.ERROR)  # head counts are guessed, which does not matter for names
    try:
        inverse = unet_ldm_to_diffusers_map(infer_unet_config(unet, arch))
    finally:
        configs_log.setLevel(level)
    targets, aliases = [], {}
    for param, shape in unet.items():
        if not param.endswith(".weight") or len(shape) not in (2, 4):
            continue
        module = param[: -len(".weight")]
        if ".transformer_blocks." in module or module.endswith((".proj_in", ".proj_out")):
            group = "attn"
        elif module.endswith(_RESNET_SUFFIXES):
            group = "resnet"
        else:
            continue
        diffusers = inverse.get(param, "")[: -len(".weight")] or None
        ldm_name = _name("lora_unet", module)
        diff_name = _name("lora_unet", diffusers) if diffusers else None
        canonical, alias = (ldm_name, diff_name) if arch == "sdxl" else (diff_name or ldm_name, ldm_name)
        targets.append(LoraTarget(canonical, UNET_PREFIX + param, shape, _kind(shape), group, "unet"))
        if alias and alias != canonical:
            aliases[alias] = canonical
    return targets, aliases


def _clip_targets(shapes: Mapping[str, Sequence[int]], prefix: str, lora_prefix: str, component: str):
    out = []
    for key, shape in shapes.items():
        if not key.startswith(prefix) or not key.endswith(".weight"):
            continue
        path = key[len(prefix) : -len(".weight")]
        if not path.startswith("text_model."):  # some SD1 files omit text_model.
            path = "text_model." + path
        if _CLIP_MODULE.match(path):
            out.append(LoraTarget(_name(lora_prefix, path), key, tuple(shape), "linear", "attn", component))
    return out


def _open_clip_targets(shapes: Mapping[str, Sequence[int]], prefix: str, lora_prefix: str, component: str):
    out = []
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key, shape in shapes.items():
        m = pattern.match(key)
        if not m:
            continue
        layer, rest = m[1], m[2]
        base = f"text_model.encoder.layers.{layer}."
        if rest == "attn.in_proj_weight":
            width = shape[0] // 3
            for i, part in enumerate("qkv"):
                name = _name(lora_prefix, base + f"self_attn.{part}_proj")
                rows = (i * width, (i + 1) * width)
                out.append(LoraTarget(name, key, (width, shape[1]), "linear", "attn", component, rows))
        elif rest.endswith(".weight") and rest[: -len(".weight")] in _OPEN_CLIP_MODULE:
            name = _name(lora_prefix, base + _OPEN_CLIP_MODULE[rest[: -len(".weight")]])
            out.append(LoraTarget(name, key, tuple(shape), "linear", "attn", component))
    return out


def checkpoint_lora_keys(shapes: Mapping[str, Sequence[int]]) -> LoraKeyMap:
    """Every LoRA-able module of an SD1, SD2 or SDXL single-file checkpoint (key → shape), by kohya name.

    The architecture comes from the UNet's keys and shapes (models/keymap), so UNet-only files work too;
    text-encoder targets are listed for the encoders the file holds.
    """
    found = detect_architecture(shapes)
    if found.name not in ("sd1", "sd2", "sdxl") or found.layout != "ldm":
        raise CheckpointError(
            "LoRA tools read SD1/SD2/SDXL single files (ldm/sgm layout); "
            f"this one is {found.name}/{found.layout or '?'}"
        )
    arch = found.name
    targets, aliases = _unet_targets(shapes, "sdxl" if arch == "sdxl" else "sd1")
    if arch == "sdxl":
        targets += _clip_targets(shapes, SDXL_TE1_PREFIX, "lora_te1", "te1")
        targets += _open_clip_targets(shapes, SDXL_TE2_PREFIX, "lora_te2", "te2")
    elif arch == "sd2":  # OpenCLIP-H, one encoder: lora_te_*
        targets += _open_clip_targets(shapes, SD2_TE_PREFIX, "lora_te", "te1")
    else:
        targets += _clip_targets(shapes, SD1_TE1_PREFIX, "lora_te", "te1")
    by_name: dict[str, LoraTarget] = {}
    for t in targets:
        if t.name in by_name:
            raise CheckpointError(f"two tensors map to the LoRA module {t.name}: {by_name[t.name].key}, {t.key}")
        by_name[t.name] = t
    return LoraKeyMap(arch, by_name, aliases)
