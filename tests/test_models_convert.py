"""Key conversion ldm <-> diffusers: lossless on the tiny model; official layout at real SDXL/SD1 size (meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_scripts_surge.models import convert
from sd_scripts_surge.models.configs import standard_configs
from sd_scripts_surge.models.io import detect_arch
from sd_scripts_surge.tiny.architecture import (
    build_tiny_text_encoders,
    build_tiny_unet,
    build_tiny_vae,
    tiny_unet_config,
)

DATA = Path(__file__).parent / "data"
COMPONENTS = {"sdxl": ("clip_l", "clip_g", "vae", "diffuser"), "sd1": ("clip_l", "vae", "diffuser")}


def _tiny_components() -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    unet = build_tiny_unet(seed=1)
    te1, te2 = build_tiny_text_encoders(seed=2)
    vae = build_tiny_vae(seed=3)
    comps = {
        "unet": unet.state_dict(),
        "vae": vae.state_dict(),
        "text_encoder_1": convert.clip_canonical_state_dict(te1.state_dict()),
        "text_encoder_2": convert.clip_canonical_state_dict(te2.state_dict()),
    }
    return comps, dict(unet.config)


def test_tiny_round_trip_is_bit_exact() -> None:
    comps, unet_config = _tiny_components()
    ldm = convert.components_to_ldm("sdxl", comps, unet_config)
    back, leftovers = convert.ldm_to_components("sdxl", ldm, unet_config)
    assert leftovers == []
    for name, sd in comps.items():
        assert set(back[name]) == set(sd), name
        for key, tensor in sd.items():
            assert back[name][key].dtype == tensor.dtype
            assert torch.equal(back[name][key], tensor), (name, key)
    # every ldm key is in one of the four namespaces and the count is preserved except fused q/k/v
    n_te2_layers = 3
    assert len(ldm) == sum(len(sd) for sd in comps.values()) - 4 * n_te2_layers


def test_open_clip_fuses_qkv_and_transposes_projection() -> None:
    _, te2 = build_tiny_text_encoders(seed=5)
    hf = convert.clip_canonical_state_dict(te2.state_dict())
    ldm = convert.convert_open_clip_to_ldm(hf)
    attn = "text_model.encoder.layers.1.self_attn."
    fused = ldm["transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = (hf[attn + f"{p}_proj.weight"] for p in "qkv")
    assert torch.equal(fused, torch.cat([q, k, v]))
    assert torch.equal(ldm["transformer.resblocks.1.attn.in_proj_bias"][:32], hf[attn + "q_proj.bias"])
    assert torch.equal(ldm["text_projection"], hf["text_projection.weight"].T)
    assert torch.equal(ldm["positional_embedding"], hf["text_model.embeddings.position_embedding.weight"])
    assert torch.equal(ldm["ln_final.weight"], hf["text_model.final_layer_norm.weight"])
    # the text projection really is used as x @ text_projection in OpenCLIP: same result as the HF Linear
    x = torch.randn(2, 32)
    assert torch.allclose(x @ ldm["text_projection"], te2.text_projection(x), atol=1e-6)


def test_vae_mid_attention_becomes_conv_1x1() -> None:
    vae = build_tiny_vae(seed=4)
    ldm = convert.convert_vae_to_ldm(vae.state_dict())
    q_linear = vae.state_dict()["encoder.mid_block.attentions.0.to_q.weight"]
    q_conv = ldm["encoder.mid.attn_1.q.weight"]
    assert q_conv.shape == (*q_linear.shape, 1, 1)
    x = torch.randn(1, q_linear.shape[1], 3, 3)
    as_conv = torch.nn.functional.conv2d(x, q_conv)
    as_linear = torch.einsum("oc,bchw->bohw", q_linear, x)
    assert torch.allclose(as_conv, as_linear, atol=1e-6)
    # decoder levels are stored in reverse order in ldm
    assert torch.equal(
        ldm["decoder.up.3.block.0.conv1.weight"], vae.state_dict()["decoder.up_blocks.0.resnets.0.conv1.weight"]
    )
    assert "encoder.down.1.block.0.nin_shortcut.weight" in ldm


def test_unet_map_known_names() -> None:
    config = tiny_unet_config()
    mapping = convert.unet_diffusers_to_ldm_map(config, prefix="model.diffusion_model.")
    expect = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_1.weight": "time_embed.0.weight",
        "add_embedding.linear_2.bias": "label_emb.0.2.bias",
        "down_blocks.0.resnets.1.conv1.weight": "input_blocks.2.0.in_layers.2.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.1.attentions.0.proj_in.weight": "input_blocks.4.1.proj_in.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight": (
            "middle_block.1.transformer_blocks.1.attn2.to_k.weight"
        ),
        "up_blocks.0.resnets.2.norm2.weight": "output_blocks.2.0.out_layers.0.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
        "up_blocks.2.resnets.0.conv2.bias": "output_blocks.6.0.out_layers.3.bias",
        "conv_norm_out.weight": "out.0.weight",
        "conv_out.bias": "out.2.bias",
    }
    for dif, ldm in expect.items():
        assert mapping[dif] == "model.diffusion_model." + ldm
    assert len(set(mapping.values())) == len(mapping)  # a bijection
    inverse = convert.unet_ldm_to_diffusers_map(config)
    assert inverse["output_blocks.2.2.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert convert.unet_module_name_to_ldm("up_blocks.1.attentions.2.proj_out", config) == "output_blocks.5.1.proj_out"


def test_unet_map_sd1_upsampler_slot() -> None:
    """SD1's last up block has no attention: its upsampler sits at slot 1, the others (with attention) at 2."""
    config = standard_configs("sd1").unet
    assert convert.unet_module_name_to_ldm("up_blocks.0.upsamplers.0.conv", config) == "output_blocks.2.1.conv"
    assert convert.unet_module_name_to_ldm("up_blocks.1.upsamplers.0.conv", config) == "output_blocks.5.2.conv"
    with pytest.raises(KeyError):
        convert.unet_module_name_to_ldm("down_blocks.0.nonsense", config)


def _official(arch: str) -> dict[str, dict]:
    data = json.loads((DATA / ("sdxl-sgm.json" if arch == "sdxl" else "sd1-ldm.json")).read_text())
    out: dict[str, dict] = {}
    for comp in COMPONENTS[arch]:
        out.update(data["components"][comp])
    return out


def _meta_components(arch: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    configs = standard_configs(arch)
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(**configs.unet),
            "vae": AutoencoderKL(**configs.vae),
            "text_encoder_1": CLIPTextModel(CLIPTextConfig(**configs.text_encoder_1)),
        }
        if arch == "sdxl":
            modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs.text_encoder_2))
    comps = {name: m.state_dict() for name, m in modules.items()}
    for name in ("text_encoder_1", "text_encoder_2"):
        if name in comps:
            comps[name] = convert.clip_canonical_state_dict(comps[name])
    return comps, configs.unet


@pytest.mark.parametrize("arch", ["sdxl", "sd1"])
def test_real_size_layout_matches_official(arch: str) -> None:
    official = _official(arch)
    comps, unet_config = _meta_components(arch)
    ldm = convert.components_to_ldm(arch, comps, unet_config)
    extra = sorted(k for k in ldm if k not in official)
    assert extra == [], extra[:10]
    missing = sorted(k for k, e in official.items() if not e.get("optional") and k not in ldm)
    assert missing == [], missing[:10]
    wrong = [(k, list(t.shape), official[k]["shape"]) for k, t in ldm.items() if list(t.shape) != official[k]["shape"]]
    assert wrong == [], wrong[:10]
    assert len(ldm) >= sum(1 for e in official.values() if not e.get("optional"))

    # the other direction: official ldm names/shapes -> diffusers names/shapes of the real modules
    as_meta = {k: torch.empty(e["shape"], device="meta") for k, e in official.items()}
    back, leftovers = convert.ldm_to_components(arch, as_meta, unet_config)
    assert leftovers == []
    for name, sd in comps.items():
        assert {k: tuple(v.shape) for k, v in back[name].items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert detect_arch(official) == arch
    # the name map LoRA / merge code uses covers exactly the official UNet keys
    mapping = convert.unet_diffusers_to_ldm_map(unet_config, prefix=convert.UNET_PREFIX)
    assert set(mapping.values()) == {k for k, e in official.items() if k.startswith(convert.UNET_PREFIX)}
