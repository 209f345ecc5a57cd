"""sd-merge swap: a UNet with another model's text encoders / VAE; architecture mismatches are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tools.cli import main
from merge_tools.swap import swap
from sd_scripts_surge.models.fileio import CheckpointError

UNET = "model.diffusion_model."
SDXL = {f"{UNET}input_blocks.0.0.weight": (4, 4, 3, 3), f"{UNET}output_blocks.8.0.skip.bias": (4,),
        f"{UNET}label_emb.0.0.weight": (8, 12),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (6,),
        "conditioner.embedders.1.model.ln_final.weight": (10,), "first_stage_model.decoder.conv_out.bias": (3,),
        "alphas_cumprod": (5,)}
SD1 = {f"{UNET}input_blocks.11.0.out_layers.3.bias": (4,), f"{UNET}input_blocks.1.1.proj_in.weight": (4, 4),
       "cond_stage_model.transformer.text_model.final_layer_norm.weight": (6,),
       "first_stage_model.decoder.conv_out.bias": (3,)}


def model(path: Path, layout: dict, value: float) -> Path:
    save_file({k: torch.full(s, value) for k, s in layout.items()}, str(path))
    return path


def test_components_come_from_their_files(tmp_path: Path):
    a, b, c, d = (model(tmp_path / f"{n}.safetensors", SDXL, v) for n, v in zip("abcd", (1.0, 2.0, 3.0, 4.0)))
    out = tmp_path / "out.safetensors"
    sources = swap(a, out, te=b, te2=c, vae=d)
    sd = load_file(str(out))
    assert set(sd) == set(SDXL) and set(sources) == {"unet", "te", "te2", "vae"}
    value = {k: float(v.flatten()[0]) for k, v in sd.items()}
    assert value[f"{UNET}input_blocks.0.0.weight"] == 1.0 and value["alphas_cumprod"] == 1.0
    assert value["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] == 2.0
    assert value["conditioner.embedders.1.model.ln_final.weight"] == 3.0
    assert value["first_stage_model.decoder.conv_out.bias"] == 4.0
    # only a VAE: everything else stays from the UNet file
    swap(a, tmp_path / "vae_only.safetensors", vae=d)
    only = load_file(str(tmp_path / "vae_only.safetensors"))
    assert float(only["conditioner.embedders.1.model.ln_final.weight"][0]) == 1.0
    assert float(only["first_stage_model.decoder.conv_out.bias"][0]) == 4.0


def test_mismatches_are_refused_before_writing(tmp_path: Path, capsys):
    xl = model(tmp_path / "xl.safetensors", SDXL, 1.0)
    sd1 = model(tmp_path / "sd1.safetensors", SD1, 2.0)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="different architectures"):
        swap(xl, out, te=sd1)
    with pytest.raises(CheckpointError, match="--te2 is SDXL"):
        swap(sd1, out, te2=xl)
    odd = model(tmp_path / "odd.safetensors", SDXL | {"first_stage_model.decoder.conv_out.bias": (5,)}, 3.0)
    with pytest.raises(CheckpointError, match="shape"):
        swap(xl, out, vae=odd)
    with pytest.raises(ValueError, match="overwrite an input"):
        swap(xl, xl, vae=odd)
    assert not out.exists()
    assert main(["swap", "--unet", str(xl), "--te", str(sd1), "-o", str(out)]) == 2
    assert "different architectures" in capsys.readouterr().err
