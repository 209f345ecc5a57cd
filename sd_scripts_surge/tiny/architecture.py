"""The tiny SDXL-architecture model: the same classes and code path as real SDXL, small shapes.

Real SDXL: UNet2DConditionModel with 3 levels (DownBlock2D, 2× CrossAttnDownBlock2D), 2 layers per
block (so MBW blocks IN00–IN08, M00, OUT00–OUT08 exist), linear projections, `text_time` addition
embedding; CLIP-L (TE1) + OpenCLIP-G with projection (TE2), context = concat of penultimate states;
AutoencoderKL with 8× downscaling. The tiny model keeps every one of those facts and shrinks widths.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TINY_TE1_HIDDEN = 32
TINY_TE2_HIDDEN = 32
TINY_TE2_PROJECTION = 32
TINY_TIME_EMBED_DIM = 8  # SDXL: 256; y = pooled TE2 (projection) + 6 size/crop numbers × this
TINY_CONTEXT_DIM = TINY_TE1_HIDDEN + TINY_TE2_HIDDEN
TINY_VOCAB_SIZE = 1024  # the kit's generated BPE vocab is padded/capped to this size
TINY_MAX_LENGTH = 77


def tiny_unet_config() -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads in SDXL configs
        cross_attention_dim=TINY_CONTEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_TE2_PROJECTION + 6 * TINY_TIME_EMBED_DIM,
        norm_num_groups=16,
    )


def tiny_te1_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=TINY_TE1_HIDDEN,
        intermediate_size=4 * TINY_TE1_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
        pad_token_id=TINY_VOCAB_SIZE - 1,
    )


def tiny_te2_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=TINY_TE2_HIDDEN,
        intermediate_size=4 * TINY_TE2_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=TINY_TE2_PROJECTION,
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
        pad_token_id=TINY_VOCAB_SIZE - 1,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        # One group: with 8-16 channels, 8 groups would be per-channel instance norm, which removes each
        # channel's mean and so cannot pass a flat colour through the encoder's / decoder's last norm.
        # (Real SDXL: 32 groups over 128-512 channels.) The tiny kit's VAE weights rely on this.
        norm_num_groups=1,
        sample_size=64,
        scaling_factor=0.13025,
    )


def build_tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config())


def build_tiny_text_encoders(seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(seed)
    te1 = CLIPTextModel(tiny_te1_config())
    te2 = CLIPTextModelWithProjection(tiny_te2_config())
    return te1, te2


def build_tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**tiny_vae_config())
