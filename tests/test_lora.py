"""networks.lora: kohya names, hook/merge math, files, diffusers interop, optimizer groups."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from networks import lora as L
from sd_scripts_surge.tiny.architecture import build_tiny_text_encoders, build_tiny_unet, build_tiny_vae

CTX_LEN = 7


def tiny_models(seed: int = 0):
    unet = build_tiny_unet(seed)
    te1, te2 = build_tiny_text_encoders(seed)
    return unet, [te1, te2]


def randomize(network: L.LoRANetwork, seed: int = 1, std: float = 0.2) -> None:
    """Training leaves lora_up non-zero; do the same so that every module changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def unet_inputs(batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700][:batch] + [400] * max(0, batch - 2))
    context = torch.randn(batch, CTX_LEN, 64, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return latents, t, context, added


@torch.no_grad()
def run_unet(unet, inputs):
    latents, t, context, added = inputs
    return unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


@torch.no_grad()
def run_te(te, ids):
    return te(ids, output_hidden_states=True).hidden_states[-2]


IDS = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(5))


# ------------------------------------------------------------------------------------------------ names


def test_sdxl_names_follow_ldm_layout_and_kohya_counts():
    unet, tes = tiny_models()
    net = L.create_network(1.0, 4, 1, None, tes, unet)
    names = {m.lora_name for m in net.loras}
    # diffusers down_blocks.1.attentions.0 == ldm input_blocks.4.1 (layers_per_block 2)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_4_1_proj_in" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj" in names
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    # per transformer block: attn1 q/k/v/out + attn2 q/k/v/out + ff 2 = 10; per Transformer2DModel + proj_in/out
    n_blocks = sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    n_t2d = sum(1 for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    assert len(net.unet_loras) == 10 * n_blocks + 2 * n_t2d
    assert len(net.text_encoder_loras) == 2 * 3 * 6  # 2 encoders x 3 layers x (q, k, v, out, fc1, fc2)
    assert not any("proj_in" in n or "emb_layers" in n for n in names if "_0_0_" in n)  # no resnet targets


def test_sd_scripts_sdxl_keys_land_on_the_matching_diffusers_layers():
    unet, tes = tiny_models()
    tb = "transformer_blocks_0"
    expected = {  # kohya name written by sd-scripts (ldm UNet) -> our diffusers module
        f"lora_unet_input_blocks_4_1_{tb}_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_8_1_proj_out": "down_blocks.2.attentions.1.proj_out",
        f"lora_unet_middle_block_1_{tb}_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
        f"lora_unet_output_blocks_3_1_{tb}_ff_net_2": "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
        "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
        "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
        "lora_unet_input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": "text_model.encoder.layers.1.self_attn.out_proj",
        "lora_te1_text_model_encoder_layers_2_mlp_fc1": "encoder.layers.2.mlp.fc1",
    }
    sd = {}
    for name, path in expected.items():
        root = tes[1] if name.startswith("lora_te2") else tes[0] if name.startswith("lora_te1") else unet
        layer = root.get_submodule(path)
        k = layer.kernel_size if isinstance(layer, torch.nn.Conv2d) else None
        fan_in = layer.in_channels if k else layer.in_features
        fan_out = layer.out_channels if k else layer.out_features
        sd[f"{name}.lora_down.weight"] = torch.zeros((2, fan_in, *k) if k else (2, fan_in))
        sd[f"{name}.lora_up.weight"] = torch.zeros((fan_out, 2, 1, 1) if k else (fan_out, 2))
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    net, weights = L.create_network_from_weights(1.0, None, None, tes, unet, weights_sd=sd)
    net.load_state_dict(weights)
    for m in net.loras:
        root = tes[1] if m.lora_name.startswith("lora_te2") else tes[0] if m.lora_name.startswith("lora_te1") else unet
        assert m.org_module is root.get_submodule(expected[m.lora_name]), m.lora_name
    assert len(net.loras) == len(expected)


def test_conv_dim_adds_resnet_and_sampler_layers():
    unet, tes = tiny_models()
    net = L.create_network(1.0, 4, 1, None, tes, unet, conv_dim="2", conv_alpha="1")
    by_name = {m.lora_name: m for m in net.unet_loras}
    assert by_name["lora_unet_input_blocks_1_0_in_layers_2"].lora_dim == 2  # 3x3 conv: conv_dim
    assert by_name["lora_unet_input_blocks_1_0_emb_layers_1"].lora_dim == 4  # Linear: network_dim
    assert by_name["lora_unet_input_blocks_4_0_skip_connection"].lora_dim == 4  # 1x1 conv: network_dim
    assert "lora_unet_input_blocks_3_0_op" in by_name  # downsampler
    assert "lora_unet_output_blocks_2_2_conv" in by_name  # upsampler after attention
    assert "lora_unet_output_blocks_5_2_conv" in by_name
    assert not any(n.startswith(("lora_unet_time_embed", "lora_unet_input_blocks_0_0")) for n in by_name)


@pytest.mark.slow
def test_real_size_sdxl_module_counts_on_meta():
    from sd_scripts_surge.models.configs import standard_configs
    from sd_scripts_surge.models.io import _empty_module

    c = standard_configs("sdxl")
    unet = _empty_module("unet", c.unet)
    tes = [_empty_module("text_encoder_1", c.text_encoder_1), _empty_module("text_encoder_2", c.text_encoder_2)]
    net = L.create_network(1.0, 4, 1, None, tes, unet)
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (722, 264)  # what sd-scripts prints for SDXL
    # every UNet / TE1 LoRA names a real layer of an SDXL single file, with the same weight shape
    real = json.loads((Path(__file__).parent / "data" / "sdxl-sgm.json").read_text())["components"]
    conv = L.create_network(1.0, 4, 1, None, tes, unet, conv_dim=4)
    for m in conv.unet_loras + [m for m in conv.text_encoder_loras if m.component == "text_encoder_1"]:
        if m.component == "unet":
            key = "model.diffusion_model." + L.unet_module_path(m.module_name, unet) + ".weight"
            entry = real["diffuser"].get(key)
        else:
            key = "conditioner.embedders.0.transformer." + L.text_encoder_module_path(m.module_name) + ".weight"
            entry = real["clip_l"].get(key)
        assert entry is not None, key
        assert tuple(entry["shape"]) == tuple(m.org_module.weight.shape), key
        path = key.removeprefix("model.diffusion_model.").removeprefix("conditioner.embedders.0.transformer.")
        prefix = "lora_unet_" if m.component == "unet" else "lora_te1_"
        assert m.lora_name == prefix + path.removesuffix(".weight").replace(".", "_")


# ------------------------------------------------------------------------------------------------ math


def test_hooked_linear_matches_formula_and_restores():
    lin = torch.nn.Linear(6, 5)
    mod = L.LoRAModule("lora_x", lin, multiplier=0.7, lora_dim=3, alpha=1.5)
    with torch.no_grad():
        mod.lora_up.weight.normal_()
    x = torch.randn(4, 6)
    base = lin(x)
    mod.apply_to()
    expected = base + 0.7 * (1.5 / 3) * (x @ mod.lora_down.weight.T @ mod.lora_up.weight.T)
    torch.testing.assert_close(lin(x), expected)
    mod.multiplier = 0.0
    assert torch.equal(lin(x), base)
    mod.multiplier = 0.7
    mod.enabled = False
    assert torch.equal(lin(x), base)
    mod.enabled = True
    mod.restore()
    assert "forward" not in lin.__dict__
    assert torch.equal(lin(x), base)
    assert torch.equal(lin.weight, lin.weight.clone())  # hooking never changed the weight


def test_alpha_none_or_zero_means_rank():
    lin = torch.nn.Linear(4, 4)
    assert L.LoRAModule("a", lin, lora_dim=8, alpha=None).scale == 1.0
    assert L.LoRAModule("b", lin, lora_dim=8, alpha=0).scale == 1.0
    assert L.LoRAModule("c", lin, lora_dim=8, alpha=2).scale == 0.25


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_delta_weight_equals_hooked(kernel):
    conv = torch.nn.Conv2d(4, 6, kernel, padding=kernel // 2, stride=1)
    mod = L.LoRAModule("lora_c", conv, multiplier=1.3, lora_dim=2, alpha=3.0)
    with torch.no_grad():
        mod.lora_up.weight.normal_()
    x = torch.randn(2, 4, 5, 5)
    merged = copy.deepcopy(conv)
    with torch.no_grad():
        merged.weight += mod.delta_weight()
    mod.apply_to()
    torch.testing.assert_close(conv(x), merged(x), atol=1e-5, rtol=1e-5)


def test_network_merge_equals_hooked_unet_and_text_encoders():
    unet, tes = tiny_models()
    merged_unet, merged_tes = copy.deepcopy(unet), copy.deepcopy(tes)
    net = L.create_network(0.8, 4, 2, None, tes, unet, conv_dim=2, conv_alpha=3)
    randomize(net)
    sd = net.state_dict()
    net.apply_to(tes, unet)
    inputs = unet_inputs()
    hooked = run_unet(unet, inputs)
    hooked_te = [run_te(te, IDS) for te in tes]

    other, weights = L.create_network_from_weights(0.8, None, None, merged_tes, merged_unet, weights_sd=sd)
    other.merge_to(merged_tes, merged_unet, weights, torch.float32, "cpu")
    torch.testing.assert_close(run_unet(merged_unet, inputs), hooked, atol=1e-4, rtol=1e-4)
    for a, te in zip(hooked_te, merged_tes):
        torch.testing.assert_close(run_te(te, IDS), a, atol=1e-4, rtol=1e-4)
    base_unet = build_tiny_unet(0)
    assert (run_unet(base_unet, inputs) - hooked).abs().max() > 1e-2  # the LoRA does change the output


def test_multiplier_runtime_and_chained_networks_restore_lifo():
    unet, tes = tiny_models()
    inputs = unet_inputs()
    base = run_unet(unet, inputs)
    a = L.create_network(1.0, 2, 2, None, tes, unet)
    b = L.create_network(1.0, 2, 2, None, tes, unet)
    randomize(a, 1)
    randomize(b, 2)
    a.apply_to(tes, unet)
    b.apply_to(tes, unet)
    both = run_unet(unet, inputs)
    b.multiplier = 0.0
    only_a = run_unet(unet, inputs)
    b.multiplier = 1.0
    with pytest.raises(RuntimeError, match="reverse order"):
        a.restore()
    b.restore()
    torch.testing.assert_close(run_unet(unet, inputs), only_a)
    a.restore()
    assert torch.equal(run_unet(unet, inputs), base)
    assert not torch.allclose(both, only_a)


def test_dropouts_only_in_training_mode():
    lin = torch.nn.Linear(8, 8)
    mod = L.LoRAModule("d", lin, lora_dim=4, alpha=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.0)
    with torch.no_grad():
        mod.lora_up.weight.normal_()
    mod.apply_to()
    x = torch.randn(3, 8)
    mod.eval()
    ref = x @ (lin.weight + mod.delta_weight()).T + lin.bias
    torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=1e-5)
    mod.train()
    assert not torch.allclose(lin(x), ref)
    mod.module_dropout = 1.0
    assert torch.equal(lin(x), x @ lin.weight.T + lin.bias)


def test_max_norm_regularization_caps_delta_norm():
    unet, tes = tiny_models()
    net = L.create_network(1.0, 4, 4, None, tes, unet)
    randomize(net, std=1.0)
    scaled, _, max_norm = net.apply_max_norm_regularization(1.0, "cpu")
    assert scaled > 0
    assert max_norm <= 1.0 + 1e-4
    assert max(float(m.delta_weight(1.0).detach().norm()) for m in net.loras) <= 1.0 + 1e-4


# ------------------------------------------------------------------------------------------------ files


def test_save_metadata_hashes_and_round_trip(tmp_path):
    unet, tes = tiny_models()
    net = L.create_network(1.0, 4, 2, None, tes, unet)
    randomize(net)
    path = net.save_weights(tmp_path / "lora.safetensors", torch.float16, {"ss_output_name": "mine", "ss_seed": 7})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_output_name"] == "mine" and meta["ss_seed"] == "7"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    tensors = load_file(str(path))
    assert tensors[f"{name}.alpha"].shape == () and float(tensors[f"{name}.alpha"]) == 2.0
    assert all(t.dtype == torch.float16 for t in tensors.values())
    # sshs_model_hash = sha256 of the data section (what sd-webui-additional-networks computes)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file

    unet2, tes2 = tiny_models()
    fresh = L.create_network(1.0, 4, 2, None, tes2, unet2)
    fresh.load_weights(path)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, tensors[k].float())


def test_save_refuses_other_extensions(tmp_path):
    unet, tes = tiny_models()
    net = L.create_network(1.0, 2, 1, None, tes, unet)
    with pytest.raises(ValueError, match="safetensors"):
        net.save_weights(tmp_path / "x.pt")


def test_unet_only_network_has_no_text_encoder_keys(tmp_path):
    unet, tes = tiny_models()
    net = L.create_network(1.0, 2, 1, None, tes, unet)
    net.apply_to(tes, unet, apply_text_encoder=False, apply_unet=True)
    assert not any(k.startswith("lora_te") for k in net.state_dict())
    q_proj = tes[0].get_submodule("encoder.layers.0.self_attn.q_proj")
    assert "forward" not in q_proj.__dict__  # the text encoder is not hooked
    meta_path = net.save_weights(tmp_path / "u.safetensors")
    with safe_open(str(meta_path), "pt") as f:
        assert f.metadata()["ss_network_train_unet_only"] == "True"


def test_diffusers_layout_names_and_missing_alpha_load_onto_same_layers():
    unet, tes = tiny_models()
    net = L.create_network(1.0, 4, 4, None, tes, unet)
    randomize(net)
    sd = net.state_dict()
    # rename to diffusers layout (what some tools write) and drop alpha (old files: alpha = rank)
    ldm_to_dif = {m.lora_name: L.lora_name("lora_unet", m.module_name) for m in net.unet_loras}
    renamed = {}
    for k, v in sd.items():
        name, part = k.split(".", 1)
        if part != "alpha":
            renamed[f"{ldm_to_dif.get(name, name)}.{part}"] = v
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in renamed)
    other, weights = L.create_network_from_weights(1.0, None, None, tes, unet, weights_sd=renamed)
    other.load_state_dict(weights)
    assert {m.lora_name for m in other.loras} == {m.lora_name for m in net.loras}
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k])  # alpha restored as rank == 4


def test_unknown_modules_and_other_formats_are_named_in_errors(tmp_path):
    unet, tes = tiny_models()
    net = L.create_network(1.0, 2, 1, None, tes, unet)
    sd = dict(net.state_dict())
    sd["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"] = torch.zeros(2, 8)
    sd["lora_unet_input_blocks_99_1_proj_in.lora_up.weight"] = torch.zeros(8, 2)
    with pytest.raises(L.LoRAFormatError, match="input_blocks_99"):
        L.create_network_from_weights(1.0, None, None, tes, unet, weights_sd=sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(L.LoRAFormatError, match="input_blocks_99"):
        net.load_weights(tmp_path / "extra.safetensors")
    net.load_weights(tmp_path / "extra.safetensors", strict=False)  # skips with a warning
    loha = {"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(2, 2)}
    with pytest.raises(L.LoRAFormatError, match="LoHa"):
        L.create_network_from_weights(1.0, None, None, tes, unet, weights_sd=loha)


def test_rank_mismatch_is_a_clear_error():
    unet, tes = tiny_models()
    small = L.create_network(1.0, 2, 1, None, tes, unet)
    big = L.create_network(1.0, 4, 1, None, tes, unet)
    with pytest.raises(L.LoRAFormatError, match="different rank"):
        big.load_state_dict(small.state_dict())


def test_sd1_style_single_text_encoder_uses_lora_te_and_diffusers_unet_names():
    from diffusers import UNet2DConditionModel

    from sd_scripts_surge.tiny.architecture import tiny_unet_config

    config = tiny_unet_config()
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        config.pop(key)
    config["cross_attention_dim"] = 32
    unet = UNet2DConditionModel(**config)
    te1, _ = build_tiny_text_encoders()
    net = L.create_network(1.0, 2, 1, None, te1, unet)
    names = {m.lora_name for m in net.loras}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert net.default_metadata()["ss_base_model_version"] == "sd_v1"


# ------------------------------------------------------------------------------------------------ optimizer


def test_prepare_optimizer_params_groups_and_lrs():
    unet, tes = tiny_models()
    net = L.create_network(1.0, 2, 1, None, tes, unet)
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-5, 1e-4]
    n_params = sum(len(list(g["params"])) for g in groups)
    assert n_params == len(list(net.parameters()))
    groups, desc = net.prepare_optimizer_params([1e-5, 2e-5], None, 1e-3)
    assert desc == ["textencoder 1", "textencoder 2", "unet"] and [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-3]
    groups, desc = net.prepare_optimizer_params(0, 1e-4, 1e-3)
    assert desc == ["unet"]  # lr 0 = frozen, as sd-scripts
    net.set_loraplus_lr_ratio(16.0, None, None)
    groups, desc = net.prepare_optimizer_params(None, 1e-4, 1e-4)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert groups[-1]["lr"] == pytest.approx(16e-4)
    net.set_loraplus_lr_ratio(None, None, None)
    groups, desc = net.prepare_optimizer_params(0, 1e-4, None, group_key=lambda m: m.lora_name.split("_")[4])
    assert set(desc) == {"unet 4", "unet 5", "unet 7", "unet 8", "unet 1", "unet 0", "unet 2", "unet 3"}
    torch.optim.AdamW(groups)  # usable as is


# ------------------------------------------------------------------------------------------------ diffusers


def _tiny_pipeline(tmp_path, unet, te1, te2):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tokenizer_2 = None
    try:
        from transformers import CLIPTokenizer

        from sd_scripts_surge.tiny.tokenizer import TE2_PAD_TOKEN, build_tokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(build_tokenizer(tmp_path / "tok1")))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(build_tokenizer(tmp_path / "tok2", pad_token=TE2_PAD_TOKEN)))
    except ImportError:  # the tiny kit's tokenizer is optional here: tokenizers are optional pipeline parts
        pass
    return StableDiffusionXLPipeline(
        vae=build_tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler(),
    )


@pytest.mark.parametrize("conv", [False, True], ids=["attn", "attn+conv"])
def test_saved_lora_loads_in_diffusers_with_same_outputs(tmp_path, conv):
    pytest.importorskip("peft")  # diffusers' load_lora_weights needs the PEFT backend
    unet, tes = tiny_models()
    pipe = _tiny_pipeline(tmp_path, copy.deepcopy(unet), *copy.deepcopy(tes))
    extra = {"conv_dim": "2", "conv_alpha": "3"} if conv else {}
    net = L.create_network(1.0, 4, 2, None, tes, unet, **extra)  # alpha 2 / dim 4: scale 0.5 must match
    randomize(net)
    path = net.save_weights(tmp_path / "lora.safetensors", torch.float32, {"ss_output_name": "tiny"})
    net.apply_to(tes, unet)

    pipe.load_lora_weights(str(path))
    inputs = unet_inputs()
    ours = run_unet(unet, inputs)
    theirs = run_unet(pipe.unet, inputs)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (run_unet(build_tiny_unet(0), inputs) - ours).abs().max() > 1e-2
    for te, pipe_te in zip(tes, (pipe.text_encoder, pipe.text_encoder_2)):
        torch.testing.assert_close(run_te(pipe_te, IDS), run_te(te, IDS), atol=1e-5, rtol=1e-5)
    # the multiplier is a run-time knob on both sides
    net.multiplier = 0.5
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=0.5)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), run_unet(unet, inputs), atol=1e-5, rtol=1e-5)


def test_network_args_in_metadata():
    unet, tes = tiny_models()
    net = L.create_network(1.0, 4, 1, None, tes, unet, conv_dim="2", conv_alpha="0.5")
    meta = net.default_metadata()
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    assert meta["ss_network_dim"] == "Dynamic"  # 4 for linear, 2 for 3x3 conv


def test_low_precision_model_with_fp32_lora_keeps_model_dtype():
    unet, tes = tiny_models()
    net = L.create_network(1.0, 4, 2, None, tes, unet)
    randomize(net)
    net.apply_to(tes, unet)
    inputs = unet_inputs()
    ref = run_unet(unet, inputs)
    unet.to(torch.bfloat16)  # the LoRA stays fp32: its math runs in fp32 and is cast back
    latents, t, context, added = inputs
    low = run_unet(unet, (latents.bfloat16(), t, context.bfloat16(), {k: v.bfloat16() for k, v in added.items()}))
    assert low.dtype == torch.bfloat16
    assert net.loras[0].lora_down.weight.dtype == torch.float32
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
