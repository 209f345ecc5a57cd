"""Every accepted kohya flag does what it says, or is refused with the reason (issue: no flag accepted and ignored)."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
import torch

from sd_scripts_surge.config import ConfigError, flag_notes, parse_train_args
from sd_scripts_surge.tiny.architecture import TINY_CONTEXT_DIM, TINY_TE2_PROJECTION, build_tiny_unet
from sd_scripts_surge.training.inputs import set_attention_backend
from sd_scripts_surge.training.sampling import SAMPLERS, generate_latents, make_scheduler
from sd_scripts_surge.training.train import main
from tests.tiny_fixtures import tiny_kit  # noqa: F401


@pytest.mark.parametrize(("argv", "key", "why"), [
    (["--train_text_encoder"], "train_text_encoder", "frozen"),
    (["--text_encoder_lr", "1e-5"], "text_encoder_lr", "frozen"),
    (["--tokenizer_cache_dir", "x"], "tokenizer_cache_dir", "never downloads"),
    (["--xformers", "--sdpa"], "xformers", "one"),
    (["--sample_sampler", "bogus"], "sample_sampler", "ddim"),
])
def test_unimplemented_flags_are_refused_with_the_reason(argv, key, why):
    with pytest.raises(ConfigError, match=why) as info:
        parse_train_args(argv)
    assert repr(key) in str(info.value)


def test_text_encoder_lr_is_unused_with_unet_only_lora_as_in_sd_scripts():
    cfg = parse_train_args(["--text_encoder_lr", "1e-5", "--network_train_unet_only", "--network_module",
                            "networks.lora"])
    assert any("UNet only" in note for note in flag_notes(cfg))


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_without_the_package_falls_back_to_sdpa_and_says_so():
    cfg = parse_train_args(["--xformers"])
    assert any("PyTorch SDPA" in note for note in flag_notes(cfg))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_refused():
    with pytest.raises(ConfigError, match="pip install wandb"):
        parse_train_args(["--log_with", "wandb"])


def test_ckpt_is_not_offered(tmp_path: Path):
    with pytest.raises(ConfigError, match="'save_model_as'.*invalid choice.*ckpt"):  # one line, not the usage
        parse_train_args(["--save_model_as", "ckpt"])
    toml_path = tmp_path / "c.toml"
    toml_path.write_text('[output]\nsave_model_as = "ckpt"\n')
    with pytest.raises(ConfigError, match="save_model_as.*ckpt"):
        parse_train_args(["--config_file", str(toml_path)])


def test_flags_whose_form_differs_say_so():
    notes = "\n".join(flag_notes(parse_train_args(["--max_data_loader_n_workers", "2", "--no_half_vae"])))
    assert "no loader workers" in notes and "fp32" in notes and "always caches latents" in notes
    assert not any("always caches" in n for n in flag_notes(parse_train_args(["--cache_latents"])))


def test_cli_steps_beat_toml_epochs_and_say_so(tmp_path: Path, caplog):
    toml_path = tmp_path / "c.toml"
    toml_path.write_text("[training]\nmax_train_epochs = 5\n")
    assert parse_train_args(["--config_file", str(toml_path)]).max_train_epochs == 5
    with caplog.at_level(logging.WARNING, logger="sd_scripts_surge.config"):
        cfg = parse_train_args(["--config_file", str(toml_path), "--max_train_steps", "7"])
    assert cfg.max_train_steps == 7 and cfg.max_train_epochs is None
    assert "overrides max_train_epochs = 5" in caplog.text and str(toml_path) in caplog.text
    with pytest.raises(ConfigError, match="both given"):
        parse_train_args(["--max_train_steps", "7", "--max_train_epochs", "2"])


def test_config_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--surge_shock_rate", "0.5"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "surge_shock_rate" in err and "\n" not in err and "Traceback" not in err


def test_attention_backend_sdpa_sets_every_processor():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = build_tiny_unet(0)
    unet.set_attn_processor(AttnProcessor())
    set_attention_backend(unet, "sdpa")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


def test_sample_sampler_names_map_to_diffusers_schedulers_and_change_the_samples():
    import diffusers

    for name, (cls, extra) in SAMPLERS.items():
        scheduler = make_scheduler(name)
        assert type(scheduler) is getattr(diffusers, cls), name
        assert all(scheduler.config[k] == v for k, v in extra.items())
    assert make_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    unet = build_tiny_unet(0).eval()

    def encode(prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(len(prompts), 77, TINY_CONTEXT_DIM, generator=g), \
            torch.randn(len(prompts), TINY_TE2_PROJECTION, generator=g)

    outs = {s: generate_latents(unet, encode, ["a"], height=32, width=32, steps=3, sampler=s)
            for s in ("euler", "euler_a", "ddim")}
    assert not torch.equal(outs["euler"], outs["ddim"]) and not torch.equal(outs["euler"], outs["euler_a"])
    again = generate_latents(unet, encode, ["a"], height=32, width=32, steps=3, sampler="euler_a")
    assert torch.equal(again, outs["euler_a"])  # ancestral noise comes from the seed


@pytest.mark.slow
def test_tensorboard_tracker_log_prefix_and_lora_resolution(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    """--log_with tensorboard writes event files under <logging_dir>/<log_prefix><time>/; a LoRA records the
    training resolution in modelspec.resolution (not 1024x1024)."""
    from safetensors import safe_open

    from sd_scripts_surge.training.train import train
    from tests.train_helpers import write_config

    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, tmp_path / "out", steps=2)
    final = train(parse_train_args(["--config_file", str(cfg), "--network_module", "networks.lora",
                                    "--network_dim", "4", "--log_with", "tensorboard", "--log_prefix", "myrun_",
                                    "--logging_dir", str(tmp_path / "logs"), "--surge_replay_units", "0"]))
    runs = list((tmp_path / "logs").glob("myrun_*"))
    assert len(runs) == 1
    events = list(runs[0].rglob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 0 for e in events)
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    size = int(re.search(r"resolution = (\d+)", Path(tiny_kit.dataset_toml).read_text()).group(1))
    assert meta["modelspec.resolution"] == f"{size}x{size}"
    assert meta["ss_resolution"].startswith("(")


def test_help_describes_every_flag_in_groups_with_defaults():
    from sd_scripts_surge.config import build_parser

    parser = build_parser()
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not missing, f"flags without help: {missing}"
    text = parser.format_help()
    for group in ("model and dataset", "saving", "training and optimizer", "logging and samples", "network (LoRA)",
                  "surge", "config files"):
        assert f"{group}:" in text, group
    assert "(default: 5.0)" in text and "--surge_shock_rate" in text
