"""Unit maps and the UNet graph, on real-size SDXL/SD1 UNets (meta device) and on the tiny model."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_scripts_surge.surge.units import build_unit_map, fine_unit_map, hop_distances, mbw_unit_map, unit_of_module_path
from sd_scripts_surge.tiny.architecture import build_tiny_unet

DATA = Path(__file__).parent / "data"

SDXL = dict(sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD1 = dict(sample_size=64, in_channels=4, out_channels=4,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
           block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
           attention_head_dim=8)


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.fixture(scope="module")
def sdxl() -> UNet2DConditionModel:
    return meta_unet(SDXL)


@pytest.fixture(scope="module")
def sd1() -> UNet2DConditionModel:
    return meta_unet(SD1)


def ldm_block_numel(path: Path) -> dict[str, int]:
    """Parameter count per MBW block from the real ldm key list (input_blocks.N → INnn, …)."""
    keys = json.loads(path.read_text())["components"]["diffuser"]
    out: dict[str, int] = defaultdict(int)
    for key, info in keys.items():
        parts = key.split(".")
        if parts[:2] != ["model", "diffusion_model"]:
            continue
        block = parts[2]
        name = {"input_blocks": f"IN{int(parts[3]):02d}" if block == "input_blocks" else None,
                "output_blocks": f"OUT{int(parts[3]):02d}" if block == "output_blocks" else None,
                "middle_block": "M00", "time_embed": "BASE", "label_emb": "BASE", "out": "out"}[block]
        n = 1
        for s in info["shape"]:
            n *= s
        out[name] += n
    return dict(out)


def unit_numel(unet, unit_map) -> dict[str, int]:
    lookup = unit_of_module_path(unit_map)
    out: dict[str, int] = defaultdict(int)
    for name, p in unet.named_parameters():
        unit = lookup(name)
        assert unit is not None, f"parameter {name} belongs to no unit"
        out[unit] += p.numel()
    return dict(out)


def test_sdxl_mbw_names_and_modules(sdxl):
    m = mbw_unit_map(sdxl)
    assert m.names == ["BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)], "out"]
    assert m["IN00"].modules == ("conv_in",)
    assert m["IN01"].modules == ("down_blocks.0.resnets.0",)
    assert m["IN03"].modules == ("down_blocks.0.downsamplers.0",)
    assert m["IN04"].modules == ("down_blocks.1.resnets.0", "down_blocks.1.attentions.0")
    assert m["IN06"].modules == ("down_blocks.1.downsamplers.0",)
    assert m["IN08"].modules == ("down_blocks.2.resnets.1", "down_blocks.2.attentions.1")
    assert m["M00"].modules == ("mid_block",)
    assert m["OUT02"].modules == ("up_blocks.0.resnets.2", "up_blocks.0.attentions.2", "up_blocks.0.upsamplers.0")
    assert m["OUT08"].modules == ("up_blocks.2.resnets.2",)
    assert m["BASE"].modules == ("time_embedding", "add_embedding")
    assert m["out"].modules == ("conv_norm_out", "conv_act", "conv_out")
    # attention units expose their attention modules: IN07 has 10 transformer blocks × (attn1, attn2)
    assert len(m["IN07"].attention) == 20 and not m["IN01"].attention


@pytest.mark.parametrize("which,data", [("sdxl", "sdxl-sgm.json"), ("sd1", "sd1-ldm.json")])
def test_mbw_blocks_match_ldm_parameter_counts(which, data, request):
    """Each MBW unit owns exactly the parameters of its ldm block (input_blocks.N, middle_block, …)."""
    unet = request.getfixturevalue(which)
    ours = unit_numel(unet, mbw_unit_map(unet))
    assert ours == ldm_block_numel(DATA / data)


def test_sd1_mbw_names(sd1):
    m = mbw_unit_map(sd1)
    assert m.names == ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)], "out"]
    assert m["IN09"].modules == ("down_blocks.2.downsamplers.0",)
    assert m["IN11"].modules == ("down_blocks.3.resnets.1",)
    assert m["OUT02"].modules == ("up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0")
    assert m["BASE"].modules == ("time_embedding",)
    assert [s for s in m.skips][0] == ("IN11", "OUT00") and m.skips[-1] == ("IN00", "OUT11")


def test_sdxl_fine_map_covers_every_parameter_once(sdxl):
    fine = fine_unit_map(sdxl)
    assert len(set(fine.names)) == len(fine.names)
    ours = unit_numel(sdxl, fine)  # asserts every parameter has a unit
    assert sum(ours.values()) == sum(p.numel() for p in sdxl.parameters())
    tblocks = [u for u in fine.units if u.kind == "tblock"]
    assert len(tblocks) == 2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10
    assert all(len(u.attention) == 2 for u in tblocks)
    assert len([u for u in fine.units if u.kind == "resnet"]) == 6 + 2 + 9


def test_skips_and_hops(sdxl):
    m = mbw_unit_map(sdxl)
    assert m.skips == tuple((f"IN{8 - j:02d}", f"OUT{j:02d}") for j in range(9))
    assert m["OUT00"].skip_from == "IN08" and m["OUT08"].skip_from == "IN00" and m["IN04"].skip_from is None
    hops = hop_distances(m)
    assert hops["BASE"]["IN00"] == 1
    assert hops["IN00"]["OUT08"] == 1  # the skip
    assert hops["IN00"]["out"] == 2  # IN00 → OUT08 (skip) → out, not 20 chain hops
    assert hops["IN04"]["OUT04"] == 1
    assert hops["M00"]["IN08"] == 1 and hops["M00"]["OUT00"] == 1
    for a in m.names:
        assert hops[a][a] == 0
        for b in m.names:
            assert hops[a][b] == hops[b][a]


def test_fine_map_skips_use_layer_ends():
    unet = build_tiny_unet(0)
    fine = fine_unit_map(unet)
    assert fine["up_blocks.0.resnets.0"].skip_from == "down_blocks.2.attentions.1.out"
    assert fine["up_blocks.2.resnets.2"].skip_from == "conv_in"
    assert hop_distances(fine)["conv_in"]["up_blocks.2.resnets.2"] == 1


def test_lora_and_prefixed_names_map_to_units():
    unet = build_tiny_unet(0)
    mbw = build_unit_map(unet, "mbw")
    fine = build_unit_map(unet, "fine")
    lora = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert unit_of_module_path(mbw)(lora) == "IN04"
    assert unit_of_module_path(fine)(lora) == "down_blocks.1.attentions.0.transformer_blocks.0"
    proj_in = "unet.down_blocks.1.attentions.0.proj_in.weight"
    assert unit_of_module_path(fine)(proj_in) == "down_blocks.1.attentions.0.in"
    assert unit_of_module_path(mbw)("lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight") == "OUT02"
    assert unit_of_module_path(mbw)("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight") is None
    with pytest.raises(ValueError, match="unknown unit map"):
        build_unit_map(unet, "nope")


def test_fingerprint_changes_with_map():
    unet = build_tiny_unet(0)
    assert mbw_unit_map(unet).fingerprint() == mbw_unit_map(build_tiny_unet(1)).fingerprint()
    assert mbw_unit_map(unet).fingerprint() != fine_unit_map(unet).fingerprint()


@pytest.mark.parametrize("which", ["sdxl", "sd1"])
def test_unit_map_and_merge_key_map_agree_on_every_parameter(which, request):
    """One block table: the surge unit of every UNet parameter is the MBW block models/keymap gives its key."""
    from sd_scripts_surge.models.keymap import block_of, detect_architecture

    unet = request.getfixturevalue(which)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    arch = detect_architecture({**shapes, **({"add_embedding.linear_1.weight": (1, 1)} if which == "sdxl" else {})})
    unit_of = unit_of_module_path(mbw_unit_map(unet))
    checked = 0
    for key in shapes:
        unit = unit_of(key.rsplit(".", 1)[0])
        if unit in (None, "out"):  # the final norm + conv: its own unit here, the last OUT block in MBW
            assert block_of(key, arch) == arch.blocks[-1] or unit is None, key
            continue
        assert block_of(key, arch) == unit, (key, unit, block_of(key, arch))
        checked += 1
    assert checked > 100


def test_pruned_unet_blocks_agree_in_both_layouts():
    """A BK-SDM student (1 resnet per level, no mid block): the key map counts its levels from the keys, so the
    unit map, the diffusers keys and the same UNet in ldm names give every parameter the same block."""
    from sd_scripts_surge.models.convert import unet_diffusers_to_ldm_map
    from sd_scripts_surge.models.keymap import block_of, detect_architecture
    from sd_scripts_surge.models.prune import prune_unet

    student = prune_unet(build_tiny_unet(0), 1, True)
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    diffusers_arch = detect_architecture(shapes)
    to_ldm = unet_diffusers_to_ldm_map(student.config, prefix="model.diffusion_model.")
    ldm_arch = detect_architecture({to_ldm[k]: s for k, s in shapes.items() if k in to_ldm})
    unit_map = mbw_unit_map(student)
    assert "M00" not in unit_map.names and "M00" not in diffusers_arch.blocks
    assert diffusers_arch.blocks == tuple(n for n in unit_map.names if n != "out")
    assert len(diffusers_arch.blocks) < 20  # fewer than a full SDXL's
    unit_of = unit_of_module_path(unit_map)
    for key in to_ldm:
        unit = unit_of(key.rsplit(".", 1)[0])
        if unit == "out":  # ldm files keep the standard block list, so their final norm + conv go to its last OUT
            assert block_of(key, diffusers_arch) == diffusers_arch.blocks[-1], key
            continue
        assert block_of(key, diffusers_arch) == block_of(to_ldm[key], ldm_arch) == unit, key
