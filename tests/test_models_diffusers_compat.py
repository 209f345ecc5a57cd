"""Files we write load in diffusers itself, offline: folders via from_pretrained, single files via from_single_file.

diffusers picks the converter for `conditioner.embedders.1` by comparing embedding widths with the target
model: when TE1 and TE2 have the same hidden size (the stock tiny kit: 32 and 32) it converts the CLIP-L
weights into text_encoder_2 and leaves its projection empty. Real SDXL (768 vs 1280) is not affected; the
single-file test below therefore uses a tiny variant whose TE2 is 48 wide.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sd_scripts_surge.models import io
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.tiny.architecture import (
    build_tiny_text_encoders,
    build_tiny_vae,
    tiny_te2_config,
    tiny_unet_config,
)
from tests.test_models_io import make_tokenizer_dir, tiny_sd1, tiny_sdxl

TE2_WIDE = 48


def tiny_sdxl_distinct_widths(tok_dir: Path) -> ModelBundle:
    torch.manual_seed(0)
    te2_config = tiny_te2_config().to_dict()
    te2_config.update(hidden_size=TE2_WIDE, intermediate_size=4 * TE2_WIDE)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
    te1, _ = build_tiny_text_encoders(seed=1)
    unet = UNet2DConditionModel(**(tiny_unet_config() | {"cross_attention_dim": 32 + TE2_WIDE}))
    tokenizer = io.load_tokenizer(tok_dir)
    return ModelBundle("sdxl", unet, te1, build_tiny_vae(seed=2), te2, tokenizer, tokenizer)


def same_module_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert not sb[k].is_meta, f"{k} was not loaded"
        assert torch.equal(sa[k], sb[k]), k


def test_folder_loads_in_diffusers_pipeline_and_runs(tmp_path: Path) -> None:
    bundle = tiny_sdxl(seed=5)
    bundle.tokenizer_1 = bundle.tokenizer_2 = io.load_tokenizer(make_tokenizer_dir(tmp_path / "tok"))
    folder = io.save_diffusers(bundle, tmp_path / "pipe")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    same_module_weights(bundle.unet, pipe.unet)
    same_module_weights(bundle.text_encoder_2, pipe.text_encoder_2)
    same_module_weights(bundle.vae, pipe.vae)
    out = pipe(
        "a red circle", num_inference_steps=1, height=64, width=64, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_single_file_loads_in_diffusers_from_single_file(tmp_path: Path) -> None:
    bundle = tiny_sdxl_distinct_widths(make_tokenizer_dir(tmp_path / "tok"))
    config_folder = io.save_diffusers(bundle, tmp_path / "config")
    path = io.save_single_file(bundle, tmp_path / "model.safetensors", precision="float")
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True)
    same_module_weights(bundle.unet, pipe.unet)
    same_module_weights(bundle.vae, pipe.vae)
    same_module_weights(bundle.text_encoder_1, pipe.text_encoder)
    same_module_weights(bundle.text_encoder_2, pipe.text_encoder_2)
    # and our loader reads the same file to the same weights
    ours = io.load_model(path)
    same_module_weights(pipe.text_encoder_2, ours.text_encoder_2)


def test_sd1_single_file_loads_in_diffusers(tmp_path: Path) -> None:
    bundle = tiny_sd1(seed=2)
    bundle.tokenizer_1 = io.load_tokenizer(make_tokenizer_dir(tmp_path / "tok"))
    config_folder = io.save_diffusers(bundle, tmp_path / "config")
    path = io.save_single_file(bundle, tmp_path / "sd1.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True)
    same_module_weights(bundle.unet, pipe.unet)
    same_module_weights(bundle.vae, pipe.vae)
    same_module_weights(bundle.text_encoder_1, pipe.text_encoder)
