"""sd-merge prune-ema: drop EMA tensors or keep them as the UNet; never silently (the loader warns)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_tools.cli import main
from merge_tools.ema import ema_name, prune_ema
from sd_scripts_surge.models.fileio import CheckpointError

UNET_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
             "model.diffusion_model.middle_block.1.norm.bias": (8,),
             "model.diffusion_model.out.2.weight": (4, 8, 3, 3)}


def write(path: Path, with_twin: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g).half() for k, s in UNET_KEYS.items()}
    sd["first_stage_model.decoder.conv_out.bias"] = torch.randn(3, generator=g).half()
    for k in list(UNET_KEYS)[: 3 if with_twin else 2]:
        sd[ema_name(k)] = (sd[k].float() + 1).half()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    save_file(sd, str(path), metadata={"note": "test"})
    return sd


def test_ema_name_convention():
    assert ema_name("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_keep_model_drops_ema_and_copies_the_rest_exactly(tmp_path: Path):
    src = tmp_path / "m.safetensors"
    sd = write(src)
    before = src.read_bytes()
    summary = prune_ema(src, tmp_path / "o.safetensors", keep="model")
    out = load_file(str(tmp_path / "o.safetensors"))
    assert not any(k.startswith("model_ema.") for k in out) and summary["dropped_ema"] == 5
    assert all(torch.equal(out[k], sd[k]) for k in out)
    assert src.read_bytes() == before  # the input is never touched
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert f.metadata()["note"] == "test" and f.metadata()["sd_merge_prune_ema"] == "model"


def test_keep_ema_makes_the_ema_weights_the_unet(tmp_path: Path):
    src = tmp_path / "m.safetensors"
    sd = write(src, with_twin=False)
    summary = prune_ema(src, tmp_path / "o.safetensors", keep="ema")
    out = load_file(str(tmp_path / "o.safetensors"))
    keys = list(UNET_KEYS)
    assert torch.equal(out[keys[0]], sd[ema_name(keys[0])]) and torch.equal(out[keys[1]], sd[ema_name(keys[1])])
    assert torch.equal(out[keys[2]], sd[keys[2]])  # no twin: kept as it was, and counted
    assert summary["swapped"] == 2 and summary["unet_without_ema"] == 1
    assert not any(k.startswith("model_ema.") for k in out)


def test_refusals(tmp_path: Path, capsys):
    src = tmp_path / "m.safetensors"
    write(src)
    with pytest.raises(ValueError, match="overwrite the input"):
        prune_ema(src, src)
    plain = tmp_path / "plain.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="no model_ema"):
        prune_ema(plain, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob(".x.safetensors*"))
    assert main(["prune-ema", str(src), "-o", str(tmp_path / "cli.safetensors"), "--keep", "ema"]) == 0
    assert "swapped 3" in capsys.readouterr().out


def test_loader_says_when_it_skips_ema_weights(tmp_path: Path, caplog):
    import sd_scripts_surge.models.io as io
    from sd_scripts_surge.models.io import IGNORED_LDM_KEYS  # noqa: F401 - the loader's ignore rule

    source = tmp_path / "with_ema.safetensors"
    save_file({"model_ema.diffusion_modelout2weight": torch.zeros(1),
               "model.diffusion_model.out.2.weight": torch.zeros(1)}, str(source))
    with caplog.at_level(logging.WARNING, logger=io.__name__), pytest.raises(Exception):  # noqa: B017
        io.load_single_file(source, arch="sd1")  # the tiny file is not a full model; the warning comes first
    assert "holds EMA weights (1 model_ema.* tensors)" in caplog.text and "prune-ema" in caplog.text
