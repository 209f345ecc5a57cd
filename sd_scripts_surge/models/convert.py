"""Key conversion between the original SAI/ldm single-file layout and diffusers/transformers naming.

Three naming worlds meet here:
- ldm / sgm (what A1111, ComfyUI and sd-scripts save): `model.diffusion_model.input_blocks.4.1.proj_in.weight`,
  `first_stage_model.decoder.up.3.block.0.conv1.weight`, OpenCLIP-G as `conditioner.embedders.1.model.*`.
- diffusers: `down_blocks.1.attentions.0.proj_in.weight`, `decoder.up_blocks.0.resnets.0.conv1.weight`.
- transformers CLIP ("canonical" here: always with the `text_model.` prefix, the form on disk in real
  diffusers folders; transformers 5 drops it inside `CLIPTextModel`, see `clip_module_state_dict`).

All functions are pure: state dict in, state dict out, tensors never copied unless their layout changes
(VAE mid-block attention: linear [C, C] in diffusers, conv 1x1 [C, C, 1, 1] in ldm; OpenCLIP fused
`in_proj` [3H, H] vs separate q/k/v; `text_projection` stored transposed in OpenCLIP). They work on
meta tensors too, which is how the real-size layout tests run without memory.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------------------------
# Prefixes of the components inside one single-file checkpoint.
# ---------------------------------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
SD1_TE1_PREFIX = "cond_stage_model.transformer."

COMPONENT_PREFIXES: dict[str, dict[str, str]] = {
    "sdxl": {
        "unet": UNET_PREFIX,
        "vae": VAE_PREFIX,
        "text_encoder_1": SDXL_TE1_PREFIX,
        "text_encoder_2": SDXL_TE2_PREFIX,
    },
    "sd1": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder_1": SD1_TE1_PREFIX},
}

TEXT_MODEL_PREFIX = "text_model."

# ---------------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------------

# diffusers ResnetBlock2D child -> ldm ResBlock child
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_layout(unet_config: Mapping[str, Any]) -> tuple[int, list[bool]]:
    layers = unet_config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ValueError(f"per-level layers_per_block {layers} has no ldm layout")
        layers = int(layers[0])
    up_types = unet_config.get("up_block_types")
    if up_types is None:
        raise ValueError("unet_config has no up_block_types")
    return layers, ["CrossAttn" in t for t in up_types]


def _resnet_child(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _UNET_RESNET:
        raise KeyError(rest)
    return f"{_UNET_RESNET[head]}.{tail}"


def unet_name_to_ldm(name: str, layers_per_block: int, up_block_has_attention: Sequence[bool]) -> str:
    """One diffusers UNet parameter (or module) name -> its ldm name, without `model.diffusion_model.`.

    Raises KeyError for a name that has no ldm counterpart.
    """
    lpb = layers_per_block
    for dif, ldm in _UNET_TOP.items():
        if name == dif or name.startswith(dif + "."):
            return ldm + name[len(dif) :]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        idx = 1 + i * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0" + (f".{_resnet_child(rest)}" if rest else "")
        return f"input_blocks.{idx}.1" + (f".{rest}" if rest else "")
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", name)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op" + (m[2] or "")
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(\..+)?", name)
    if m:
        kind, j, rest = m[1], int(m[2]), (m[3] or "")[1:]
        if kind == "resnets":
            return f"middle_block.{2 * j}" + (f".{_resnet_child(rest)}" if rest else "")
        return "middle_block.1" + (f".{rest}" if rest else "")
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        idx = i * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0" + (f".{_resnet_child(rest)}" if rest else "")
        return f"output_blocks.{idx}.1" + (f".{rest}" if rest else "")
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?", name)
    if m:
        i = int(m[1])
        slot = 2 if up_block_has_attention[i] else 1
        return f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv" + (m[2] or "")
    raise KeyError(f"diffusers UNet name {name!r} has no ldm counterpart")


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list)


@functools.lru_cache(maxsize=8)
def _unet_param_names(config_json: str) -> tuple[str, ...]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**json.loads(config_json))
    return tuple(model.state_dict().keys())


def unet_diffusers_to_ldm_map(unet_config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Every UNet parameter name in diffusers naming -> its ldm name (with `prefix` prepended).

    `unet_config` is a diffusers `UNet2DConditionModel` config (dict or FrozenDict). The map covers all
    parameters (keys end in `.weight` / `.bias`); strip the suffix to get module names, e.g.
    `down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`
    (kohya LoRA: `lora_unet_input_blocks_4_1_proj_in`).
    Use prefix="model.diffusion_model." for full single-file keys.
    """
    lpb, up_attn = _unet_layout(unet_config)
    names = _unet_param_names(_config_key(unet_config))
    return {n: prefix + unet_name_to_ldm(n, lpb, up_attn) for n in names}


def unet_ldm_to_diffusers_map(unet_config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Inverse of `unet_diffusers_to_ldm_map`: ldm name (with `prefix`) -> diffusers parameter name."""
    return {v: k for k, v in unet_diffusers_to_ldm_map(unet_config, prefix).items()}


def unet_module_name_to_ldm(name: str, unet_config: Mapping[str, Any]) -> str:
    """A diffusers UNet module name (e.g. `up_blocks.0.attentions.1.proj_out`) -> ldm module name."""
    lpb, up_attn = _unet_layout(unet_config)
    return unet_name_to_ldm(name, lpb, up_attn)


def convert_unet_to_ldm(state_dict: Mapping[str, Tensor], unet_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers UNet state dict -> ldm names (no prefix). Tensors are shared, not copied."""
    lpb, up_attn = _unet_layout(unet_config)
    return {unet_name_to_ldm(k, lpb, up_attn): v for k, v in state_dict.items()}


def convert_unet_from_ldm(state_dict: Mapping[str, Tensor], unet_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """ldm UNet state dict (no prefix) -> diffusers names. Keys without a diffusers counterpart raise KeyError."""
    inverse = unet_ldm_to_diffusers_map(unet_config)
    out = {}
    for k, v in state_dict.items():
        if k not in inverse:
            raise KeyError(f"ldm UNet key {k!r} has no diffusers counterpart for this config")
        out[inverse[k]] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")


def _vae_resnet_child(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut", 1) if rest.startswith("conv_shortcut") else rest


def vae_name_to_ldm(name: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL parameter name -> ldm name (no `first_stage_model.` prefix)."""
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet_child(m[3])}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name)
    if m:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet_child(m[3])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name)
    if m:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet_child(m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", name)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", name)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(quant_conv|post_quant_conv)\..+", name):
        return name
    raise KeyError(f"diffusers VAE name {name!r} has no ldm counterpart")


def _is_vae_attn_weight(diffusers_name: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_name and diffusers_name.endswith(
        tuple(f"{p}.weight" for p in _VAE_ATTN_LINEAR)
    )


def _vae_levels_from_diffusers(names: Sequence[str]) -> int:
    levels = {int(m[1]) for n in names if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", n))}
    if not levels:
        raise ValueError("VAE state dict has no encoder.down_blocks.*; is it a VAE?")
    return max(levels) + 1


def _vae_levels_from_ldm(names: Sequence[str]) -> int:
    levels = {int(m[1]) for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n))}
    if not levels:
        raise ValueError("VAE state dict has no encoder.down.*; is it an ldm VAE?")
    return max(levels) + 1


def convert_vae_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> ldm names; mid-block attention linears become 1x1 convs."""
    levels = _vae_levels_from_diffusers(list(state_dict))
    out = {}
    for k, v in state_dict.items():
        if _is_vae_attn_weight(k) and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[vae_name_to_ldm(k, levels)] = v
    return out


def convert_vae_from_ldm(state_dict: Mapping[str, Tensor], unknown: list[str] | None = None) -> dict[str, Tensor]:
    """ldm VAE state dict (no prefix) -> diffusers names; 1x1 conv attention weights become linears.

    Keys with no counterpart raise KeyError, or are appended to `unknown` when a list is given.
    """
    levels = _vae_levels_from_ldm(list(state_dict))
    out = {}
    for k, v in state_dict.items():
        try:
            name = vae_name_from_ldm(k, levels)
        except KeyError:
            if unknown is None:
                raise
            unknown.append(k)
            continue
        if _is_vae_attn_weight(name) and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[name] = v
    return out


def vae_name_from_ldm(name: str, num_levels: int) -> str:
    """Inverse of `vae_name_to_ldm`."""
    m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", name)
    if m:
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3].replace('nin_shortcut', 'conv_shortcut', 1)}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", name)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", name)
    if m:
        rest = m[3].replace("nin_shortcut", "conv_shortcut", 1)
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{rest}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", name)
    if m:
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d+)\.(.+)", name)
    if m:
        rest = m[3].replace("nin_shortcut", "conv_shortcut", 1)
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)", name)
    if m:
        inverse = {v: k for k, v in _VAE_ATTN.items()}
        return f"{m[1]}.mid_block.attentions.0.{inverse[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", name)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(quant_conv|post_quant_conv)\..+", name):
        return name
    raise KeyError(f"ldm VAE key {name!r} has no diffusers counterpart")


# ---------------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------------


def clip_canonical_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Give every CLIP text key the `text_model.` prefix (transformers 5 `CLIPTextModel` drops it).

    `text_projection.*` (CLIPTextModelWithProjection) stays at the top level. Non-persistent buffers such
    as `position_ids` are dropped: they are rebuilt by the model and are optional in checkpoints.
    """
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        if not k.startswith(TEXT_MODEL_PREFIX) and not k.startswith("text_projection"):
            k = TEXT_MODEL_PREFIX + k
        out[k] = v
    return out


def clip_module_state_dict(module: torch.nn.Module, canonical: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical (`text_model.`-prefixed) CLIP keys -> the names `module.load_state_dict` expects."""
    own = set(module.state_dict().keys())
    out = {}
    for k, v in canonical.items():
        if k in own:
            out[k] = v
        elif k.startswith(TEXT_MODEL_PREFIX) and k[len(TEXT_MODEL_PREFIX) :] in own:
            out[k[len(TEXT_MODEL_PREFIX) :]] = v
        else:
            out[k] = v  # left for the caller to report as unexpected
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def convert_open_clip_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical HF CLIPTextModelWithProjection state dict -> OpenCLIP names (no prefix).

    q/k/v projections are concatenated into `attn.in_proj_weight` / `in_proj_bias` (order q, k, v);
    `text_projection.weight` ([proj, hidden], nn.Linear) becomes `text_projection` ([hidden, proj]).
    """
    sd = clip_canonical_state_dict(state_dict)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[k]] = v
            continue
        if k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous() if v.device.type != "meta" else v.t()
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if not m:
            raise KeyError(f"CLIP key {k!r} has no OpenCLIP counterpart")
        layer, module, kind = int(m[1]), m[2], m[3]
        pm = re.fullmatch(r"self_attn\.(q|k|v)_proj", module)
        if pm:
            qkv.setdefault((layer, kind), {})[pm[1]] = v
            continue
        if module not in _OPEN_CLIP_LAYER:
            raise KeyError(f"CLIP key {k!r} has no OpenCLIP counterpart")
        out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{kind}"] = v
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"CLIP layer {layer} has {sorted(parts)} {kind} projections; need q, k and v")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{layer}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert_open_clip_from_ldm(state_dict: Mapping[str, Tensor], unknown: list[str] | None = None) -> dict[str, Tensor]:
    """OpenCLIP text tower names (no prefix) -> canonical HF CLIPTextModelWithProjection names.

    `logit_scale` (a CLIP training scalar with no use in SDXL) is not part of the result; read it from the
    input if you want to keep it. Unknown keys raise KeyError, or go to `unknown` when a list is given.
    """
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    layer_map = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if k == "logit_scale":
            continue
        if k in top:
            out[top[k]] = v
            continue
        if k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous() if v.device.type != "meta" else v.t()
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k)
        if m:
            layer, kind = int(m[1]), m[2]
            if v.shape[0] % 3:
                raise ValueError(f"OpenCLIP {k!r} has shape {list(v.shape)}; first dim must be 3 x hidden")
            for part, chunk in zip("qkv", v.chunk(3, dim=0), strict=True):
                out[f"text_model.encoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = chunk
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m[2] in layer_map:
            out[f"text_model.encoder.layers.{m[1]}.{layer_map[m[2]]}.{m[3]}"] = v
            continue
        if unknown is None:
            raise KeyError(f"OpenCLIP key {k!r} has no transformers counterpart")
        unknown.append(k)
    return out


def convert_clip_l_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel -> ldm: the ldm file keeps HF names under its prefix (`...transformer.text_model.*`)."""
    return clip_canonical_state_dict(state_dict)


def convert_clip_l_from_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return clip_canonical_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------------------------------------------

# ldm keys that carry no weights we use; they are skipped without a warning.
IGNORED_LDM_KEYS = re.compile(
    r"^(model_ema\.|alphas_cumprod|alphas_cumprod_prev|betas|log_one_minus_alphas_cumprod|posterior_|"
    r"sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
    r"v_pred$|ztsnr$|edm_vpred\.|logvar$|.*\.position_ids$|conditioner\.embedders\.1\.model\.logit_scale$)"
)


def components_to_ldm(
    arch: str,
    components: Mapping[str, Mapping[str, Tensor]],
    unet_config: Mapping[str, Any] | None,
    *,
    partial: bool = False,
) -> dict[str, Tensor]:
    """{"unet", "vae", "text_encoder_1"[, "text_encoder_2"]: diffusers/HF state dict} -> one ldm state dict.

    With partial=True any subset of the components may be given (unet_config is needed only for the UNet).
    """
    prefixes = COMPONENT_PREFIXES[arch]
    out: dict[str, Tensor] = {}
    converters = {
        "unet": lambda sd: convert_unet_to_ldm(sd, unet_config or {}),
        "vae": convert_vae_to_ldm,
        "text_encoder_1": convert_clip_l_to_ldm,
        "text_encoder_2": convert_open_clip_to_ldm,
    }
    for name, prefix in prefixes.items():
        if name not in components:
            if partial:
                continue
            raise KeyError(f"{arch} checkpoint needs component {name!r}")
        for k, v in converters[name](components[name]).items():
            out[prefix + k] = v
    return out


def split_ldm(arch: str, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Split an ldm state dict by component prefix. Returns ({component: {key without prefix: tensor}}, leftovers).

    Leftover keys (no known prefix) exclude the known-ignorable ones (EMA, schedule buffers, v-pred flags).
    """
    prefixes = COMPONENT_PREFIXES[arch]
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in prefixes}
    leftovers = []
    for k, v in state_dict.items():
        if IGNORED_LDM_KEYS.match(k):
            continue
        for name, prefix in prefixes.items():
            if k.startswith(prefix):
                parts[name][k[len(prefix) :]] = v
                break
        else:
            leftovers.append(k)
    return parts, leftovers


def ldm_to_components(
    arch: str, state_dict: Mapping[str, Tensor], unet_config: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """One ldm state dict -> ({component: diffusers/canonical-HF state dict}, leftover keys)."""
    parts, leftovers = split_ldm(arch, state_dict)
    out: dict[str, dict[str, Tensor]] = {}
    unet_inverse = unet_ldm_to_diffusers_map(unet_config)
    unet: dict[str, Tensor] = {}
    for k, v in parts["unet"].items():
        if k in unet_inverse:
            unet[unet_inverse[k]] = v
        else:
            leftovers.append(UNET_PREFIX + k)
    out["unet"] = unet
    unknown: list[str] = []
    out["vae"] = convert_vae_from_ldm(parts["vae"], unknown) if parts["vae"] else {}
    leftovers += [VAE_PREFIX + k for k in unknown]
    out["text_encoder_1"] = convert_clip_l_from_ldm(parts["text_encoder_1"])
    if "text_encoder_2" in parts:
        unknown = []
        out["text_encoder_2"] = convert_open_clip_from_ldm(parts["text_encoder_2"], unknown)
        leftovers += [SDXL_TE2_PREFIX + k for k in unknown]
    return out, leftovers
