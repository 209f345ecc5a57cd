"""LoRA training: kohya keys and metadata, one param group per unit, loads in diffusers and changes the UNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_scripts_surge.config import parse_train_args
from sd_scripts_surge.training import trainables
from sd_scripts_surge.training.train import train
from tests.tiny_fixtures import tiny_kit  # noqa: F401
from tests.train_helpers import write_config


@pytest.mark.slow
def test_lora_training_saves_kohya_lora_that_diffusers_loads(tiny_kit, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    captured: dict = {}
    real_param_groups = trainables.param_groups

    def keep_groups(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        captured["groups"] = real_param_groups(*args, **kwargs)
        captured["trainable"] = args[1]
        return captured["groups"]

    monkeypatch.setattr(trainables, "param_groups", keep_groups)
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=2)
    final = train(parse_train_args(["--config_file", str(cfg), "--network_module", "networks.lora",
                                    "--network_dim", "4", "--network_alpha", "2"]))

    with safe_open(str(final), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
        up_weights = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 2.0
    assert any(bool(w.abs().sum() > 0) for w in up_weights), "LoRA up weights stayed zero: nothing trained"

    # the student UNet's own weights are frozen; the LoRA params are spread over the unit groups
    trainable = captured["trainable"]
    assert all(not p.requires_grad for p in trainable.module.parameters() if all(p is not q for q in
                                                                                 trainable.parameters()))
    groups = captured["groups"]
    sizes = {g.get("unit", i): len(g["params"]) for i, g in enumerate(groups)}
    total = sum(sizes.values())
    assert total == len(trainable.parameters())
    assert sum(1 for n in sizes.values() if n) > 1, f"all LoRA params landed in one group: {sizes}"

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_kit.base_dir), local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(1, 32, generator=generator),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        before = pipe.unet(sample, 500, context, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(final))
        after = pipe.unet(sample, 500, context, added_cond_kwargs=added).sample
    assert not torch.allclose(before, after), "the loaded LoRA does not change the UNet output"
