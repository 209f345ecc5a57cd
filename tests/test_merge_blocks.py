"""Architecture detection and the key → MBW block table (checked against real key sets and the README)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from sd_scripts_surge.models.keymap import SD1_BLOCKS, SDXL_BLOCKS, UNKNOWN, BlockWeights, block_of, detect_architecture

DATA = Path(__file__).parent / "data"
README = Path(__file__).resolve().parents[1] / "merge_tools" / "README.md"


def shapes_of(name: str) -> dict[str, list[int]]:
    d = json.loads((DATA / f"{name}.json").read_text())
    return {k: v["shape"] for comp in d["components"].values() for k, v in comp.items()}


def test_block_lists() -> None:
    assert len(SD1_BLOCKS) == 26 and SD1_BLOCKS[0] == "BASE" and SD1_BLOCKS[13] == "M00" and SD1_BLOCKS[-1] == "OUT11"
    assert len(SDXL_BLOCKS) == 20 and SDXL_BLOCKS[10] == "M00" and SDXL_BLOCKS[-1] == "OUT08"


@pytest.mark.parametrize(
    "name,arch,n_blocks",
    [("sd1-ldm", "sd1", 26), ("sdxl-sgm", "sdxl", 20), ("sd3-comfyui", "sd3", 25), ("flux-flux", "flux", 58)],
)
def test_detection_and_every_block_used(name: str, arch: str, n_blocks: int) -> None:
    shapes = shapes_of(name)
    a = detect_architecture(shapes)
    assert (a.name, a.layout, len(a.blocks)) == (arch, "ldm", n_blocks)
    used = Counter(block_of(k, a) for k in shapes)
    assert set(used) == set(a.blocks)  # every block has keys, no key outside the list


def test_sd1_key_to_block_supermerger_convention() -> None:
    a = detect_architecture(shapes_of("sd1-ldm"))
    p = "model.diffusion_model."
    assert block_of(p + "time_embed.0.weight", a) == "BASE"
    assert block_of("cond_stage_model.transformer.text_model.final_layer_norm.weight", a) == "BASE"
    assert block_of("first_stage_model.decoder.conv_in.weight", a) == "BASE"
    assert block_of(p + "input_blocks.0.0.weight", a) == "IN00"
    assert block_of(p + "input_blocks.11.0.out_layers.3.weight", a) == "IN11"
    assert block_of(p + "middle_block.1.proj_in.weight", a) == "M00"
    assert block_of(p + "output_blocks.5.1.transformer_blocks.0.attn1.to_out.0.weight", a) == "OUT05"
    assert block_of(p + "out.2.weight", a) == "OUT11"
    assert block_of(p + "out.0.bias", a) == "OUT11"


def test_sdxl_key_to_block() -> None:
    a = detect_architecture(shapes_of("sdxl-sgm"))
    p = "model.diffusion_model."
    assert block_of(p + "label_emb.0.0.weight", a) == "BASE"
    assert block_of("conditioner.embedders.1.model.ln_final.weight", a) == "BASE"
    assert block_of(p + "input_blocks.8.1.proj_out.weight", a) == "IN08"
    assert block_of(p + "output_blocks.8.0.skip_connection.weight", a) == "OUT08"
    assert block_of(p + "out.2.weight", a) == "OUT08"


def test_sd3_and_flux_by_block_index() -> None:
    sd3 = detect_architecture(shapes_of("sd3-comfyui"))
    assert block_of("model.diffusion_model.joint_blocks.7.x_block.attn.qkv.weight", sd3) == "JB07"
    assert block_of("model.diffusion_model.x_embedder.proj.weight", sd3) == "BASE"
    flux = detect_architecture(shapes_of("flux-flux"))
    assert block_of("model.diffusion_model.double_blocks.3.img_attn.proj.bias", flux) == "DB03"
    assert block_of("model.diffusion_model.single_blocks.37.linear2.weight", flux) == "SB37"
    assert block_of("vae.decoder.conv_in.bias", flux) == "BASE"


def test_sd2_and_diffusers_layouts() -> None:
    sd1 = shapes_of("sd1-ldm")
    sd2 = dict(sd1)
    sd2["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = [320, 1024]
    assert detect_architecture(sd2).name == "sd2"
    unet_sd1 = {
        "conv_in.weight": [320, 4, 3, 3],
        "time_embedding.linear_1.weight": [1280, 320],
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": [320, 768],
        "down_blocks.0.resnets.1.conv1.weight": [320, 320, 3, 3],
        "down_blocks.0.downsamplers.0.conv.weight": [320, 320, 3, 3],
        "down_blocks.3.resnets.1.conv1.weight": [1280, 1280, 3, 3],
        "mid_block.resnets.0.conv1.weight": [1280, 1280, 3, 3],
        "up_blocks.0.resnets.2.conv1.weight": [1280, 2560, 3, 3],
        "up_blocks.0.upsamplers.0.conv.weight": [1280, 1280, 3, 3],
        "up_blocks.3.attentions.2.proj_out.weight": [320, 320],
        "conv_out.weight": [4, 320, 3, 3],
    }
    a = detect_architecture(unet_sd1)
    assert (a.name, a.layout) == ("sd1", "diffusers")
    got = {k: block_of(k, a) for k in unet_sd1}
    assert got == {
        "conv_in.weight": "IN00",
        "time_embedding.linear_1.weight": "BASE",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": "IN01",
        "down_blocks.0.resnets.1.conv1.weight": "IN02",
        "down_blocks.0.downsamplers.0.conv.weight": "IN03",
        "down_blocks.3.resnets.1.conv1.weight": "IN11",
        "mid_block.resnets.0.conv1.weight": "M00",
        "up_blocks.0.resnets.2.conv1.weight": "OUT02",
        "up_blocks.0.upsamplers.0.conv.weight": "OUT02",
        "up_blocks.3.attentions.2.proj_out.weight": "OUT11",
        "conv_out.weight": "OUT11",
    }
    sdxl = {**unet_sd1, "add_embedding.linear_1.weight": [1280, 2816]}
    assert detect_architecture(sdxl).name == "sdxl"
    flux_d = {
        "transformer_blocks.0.attn.to_q.weight": [3072, 3072],
        "single_transformer_blocks.5.proj_out.weight": [3072, 15360],
    }
    fa = detect_architecture(flux_d)
    assert (fa.name, fa.layout, block_of("single_transformer_blocks.5.proj_out.weight", fa)) == (
        "flux",
        "diffusers",
        "SB05",
    )
    assert block_of("transformer_blocks.0.attn.to_q.weight", fa) == "DB00"


def test_unknown_architecture_refuses_block_weights() -> None:
    a = detect_architecture({"encoder.layer.0.weight": [4, 4]})
    assert a == UNKNOWN and block_of("encoder.layer.0.weight", a) is None
    with pytest.raises(ValueError, match="need a known architecture"):
        BlockWeights.parse([0.5] * 26, a, "alpha")


def test_block_weights_parse() -> None:
    a = detect_architecture(shapes_of("sdxl-sgm"))
    w = BlockWeights.parse([i / 20 for i in range(20)], a, "alpha")
    assert w.value("BASE") == 0.0 and w.value("M00") == 0.5 and w.value("OUT08") == 0.95
    with pytest.raises(ValueError, match="26 block weights given, sdxl has 20"):
        BlockWeights.parse([0.1] * 26, a, "alpha")
    t = BlockWeights.parse({"M00": 1.0}, a, "alpha", default=0.3)
    assert t.value("M00") == 1.0 and t.value("IN03") == 0.3
    with pytest.raises(ValueError, match="unknown block"):
        BlockWeights.parse({"IN11": 1.0}, a, "alpha", default=0.3)


def test_readme_key_table_matches_code() -> None:
    """Each row of the README's key → block table, checked with a real key of that row."""
    text = README.read_text()
    assert "| SD1 / SD2 (26) | BASE, IN00 … IN11, M00, OUT00 … OUT11 |" in text
    assert "| SDXL (20) | BASE, IN00 … IN08, M00, OUT00 … OUT08 |" in text
    sd1 = detect_architecture(shapes_of("sd1-ldm"))
    sdxl = detect_architecture(shapes_of("sdxl-sgm"))
    rows = re.findall(r"^\| `model\.diffusion_model\.([a-z_]+)[.N]*\*?`.*\| (\S+) \|$", text, re.M)
    assert len(rows) >= 4
    example = {
        "time_embed": ("time_embed.0.weight", "BASE", "BASE"),
        "input_blocks": ("input_blocks.4.1.proj_in.weight", "IN04", "IN04"),
        "middle_block": ("middle_block.0.in_layers.0.weight", "M00", "M00"),
        "output_blocks": ("output_blocks.2.0.in_layers.0.weight", "OUT02", "OUT02"),
        "out": ("out.0.weight", "OUT11", "OUT08"),
    }
    for prefix, _ in rows:
        key, b1, bx = example[prefix]
        assert block_of("model.diffusion_model." + key, sd1) == b1
        assert block_of("model.diffusion_model." + key, sdxl) == bx
