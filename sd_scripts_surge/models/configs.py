"""Model configs: the standard SDXL / SD1 ones (written out, never downloaded) and inference from shapes.

Configs are plain dicts in diffusers/transformers form: `UNet2DConditionModel(**unet)`,
`AutoencoderKL(**vae)`, `CLIPTextConfig(**te)`. Shapes fix most fields; a few (number of attention heads,
GroupNorm groups, activation) are not visible in weights - inference then follows the SDXL/SD1 conventions
and says so with a warning. Files written by us carry their exact configs in metadata (see io.py).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)

SD1_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    use_linear_projection=False,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)

_VAE_BASE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
)
SDXL_VAE_CONFIG: dict[str, Any] = {**_VAE_BASE, "sample_size": 1024, "scaling_factor": 0.13025}
SD1_VAE_CONFIG: dict[str, Any] = {**_VAE_BASE, "sample_size": 512, "scaling_factor": 0.18215}

# CLIP ViT-L/14 text tower as shipped in SD1/SDXL diffusers folders (bos/eos ids as in those configs;
# eos_token_id=2 keeps transformers' argmax pooling, which finds the real EOS 49407 as the highest id).
CLIP_L_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2, CLIPTextModelWithProjection).
CLIP_G_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


@dataclass
class ModelConfigs:
    """The configs of one checkpoint's components (text_encoder_2 is None for SD1)."""

    arch: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder_1: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    source: str = "standard"  # standard | metadata | config_dir | inferred | diffusers

    def get(self, component: str) -> dict[str, Any] | None:
        return getattr(self, component)


def standard_configs(arch: str) -> ModelConfigs:
    """The published configs of SDXL base 1.0 or SD 1.x, as fresh copies."""
    if arch == "sdxl":
        return ModelConfigs(
            "sdxl",
            copy.deepcopy(SDXL_UNET_CONFIG),
            copy.deepcopy(SDXL_VAE_CONFIG),
            copy.deepcopy(CLIP_L_CONFIG),
            copy.deepcopy(CLIP_G_CONFIG),
        )
    if arch == "sd1":
        return ModelConfigs(
            "sd1", copy.deepcopy(SD1_UNET_CONFIG), copy.deepcopy(SD1_VAE_CONFIG), copy.deepcopy(CLIP_L_CONFIG)
        )
    raise ValueError(f"unknown architecture {arch!r}; expected 'sdxl' or 'sd1'")


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers/transformers config without private (`_name_or_path`, `_class_name` ...) entries, JSON-able."""
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_") or k in ("transformers_version", "architectures", "model_type"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Inference from ldm shapes (for checkpoints of non-standard size without stored configs)
# ---------------------------------------------------------------------------------------------------------------

Shapes = Mapping[str, tuple[int, ...]]


def _groups_for(channels: list[int]) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if all(c % g == 0 for c in channels):
            return g
    return 1


def infer_unet_config(shapes: Shapes, arch: str) -> dict[str, Any]:
    """UNet config from ldm UNet shapes (keys without `model.diffusion_model.`)."""

    def count(pattern: str) -> set[int]:
        return {int(m[1]) for k in shapes if (m := re.match(pattern, k))}

    conv_in = shapes["input_blocks.0.0.weight"]
    n_inputs = max(count(r"input_blocks\.(\d+)\.")) + 1
    levels: list[list[int]] = [[]]  # input block indices per level
    for idx in range(1, n_inputs):
        if f"input_blocks.{idx}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(idx)
    layers = len(levels[0])
    channels = [shapes[f"input_blocks.{lv[0]}.0.out_layers.3.weight"][0] for lv in levels]
    depths = [len(count(rf"input_blocks\.{lv[0]}\.1\.transformer_blocks\.(\d+)\.")) for lv in levels]
    has_attn = [d > 0 for d in depths]
    linear = None
    cross_dim = None
    for k, s in shapes.items():
        if k.endswith("proj_in.weight"):
            linear = len(s) == 2
        if k.endswith("attn2.to_k.weight"):
            cross_dim = s[1]
    mid_depth = len(count(r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    config: dict[str, Any] = dict(
        sample_size=128 if arch == "sdxl" else 64,
        in_channels=conv_in[1],
        out_channels=shapes["out.2.weight"][0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        block_out_channels=channels,
        layers_per_block=layers,
        norm_num_groups=_groups_for(channels),
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if cross_dim is not None:
        config["cross_attention_dim"] = cross_dim
        config["use_linear_projection"] = bool(linear)
        tl = [max(d, 1) for d in depths]
        if mid_depth:
            tl[-1] = mid_depth
        config["transformer_layers_per_block"] = tl
    # heads are not visible in weights: SDXL uses 64-wide heads, SD1 uses 8 heads
    if arch == "sdxl":
        config["attention_head_dim"] = [max(c // 64, 1) for c in channels]
    else:
        config["attention_head_dim"] = 8
    if "label_emb.0.0.weight" in shapes:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shapes["label_emb.0.0.weight"][1]
    logger.warning(
        "UNet config inferred from shapes: attention heads %s and GroupNorm groups %s are guesses "
        "(not visible in weights); pass config_dir=<diffusers folder> if the model differs",
        config["attention_head_dim"],
        config["norm_num_groups"],
    )
    return config


def infer_vae_config(shapes: Shapes, arch: str) -> dict[str, Any]:
    """AutoencoderKL config from ldm VAE shapes (keys without `first_stage_model.`)."""
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    layers = len({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    base = SDXL_VAE_CONFIG if arch == "sdxl" else SD1_VAE_CONFIG
    config = dict(
        base,
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=shapes["post_quant_conv.weight"][0],
        norm_num_groups=_groups_for(channels),
    )
    if channels != base["block_out_channels"]:
        logger.warning("VAE config inferred from shapes: GroupNorm groups %s is a guess", config["norm_num_groups"])
    return config


def infer_clip_config(hf_shapes: Shapes, *, open_clip: bool) -> dict[str, Any]:
    """CLIP text config from canonical HF shapes (`text_model.*`). open_clip selects TE2 conventions."""
    vocab, hidden = hf_shapes["text_model.embeddings.token_embedding.weight"]
    layers = {int(m[1]) for k in hf_shapes if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    base = CLIP_G_CONFIG if open_clip else CLIP_L_CONFIG
    config = dict(
        base,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hf_shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=hf_shapes["text_model.embeddings.position_embedding.weight"][0],
    )
    if "text_projection.weight" in hf_shapes:
        config["projection_dim"] = hf_shapes["text_projection.weight"][0]
    if (vocab, hidden) != (base["vocab_size"], base["hidden_size"]):
        logger.warning(
            "text encoder config inferred from shapes: %d attention heads and %s activation are guesses",
            config["num_attention_heads"],
            config["hidden_act"],
        )
    return config
