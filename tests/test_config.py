"""Training arguments: sd-scripts flags, --config_file flattening, precedence, --output_config, key errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import toml

from sd_scripts_surge import config as config_module
from sd_scripts_surge.config import ConfigError, TrainConfig, build_parser, parse_train_args

DATA = Path(__file__).parent / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_anything():
    cfg = parse_train_args([])
    assert isinstance(cfg, TrainConfig)
    assert cfg.surge.enabled is True
    assert cfg.surge.shock_rate == 5.0
    assert cfg.surge.smooth_rate == pytest.approx(0.5641895835)
    assert cfg.surge.anchor_grasp == 3
    assert cfg.resolution == (1024, 1024)
    assert cfg.optimizer_args == [] and cfg.teacher_lora == []


def test_cli_flags_typed():
    cfg = parse_train_args(["--learning_rate", "2e-5", "--resolution", "768,512", "--optimizer_args", "a=1", "b=2",
                            "--cache_latents", "--surge", "false", "--teacher_lora", "x.safetensors:0.5",
                            "--teacher_lora", "y.safetensors", "--surge_shock_rate", "3", "--full_bf16",
                            "--mixed_precision", "bf16", "--block_lr", ",".join(["1e-6"] * 23)])
    assert cfg.learning_rate == 2e-5
    assert cfg.resolution == (768, 512)
    assert cfg.optimizer_args == ["a=1", "b=2"]
    assert cfg.cache_latents is True and cfg.full_bf16 is True
    assert cfg.surge.enabled is False
    assert cfg.teacher_lora == ["x.safetensors:0.5", "y.safetensors"]
    assert cfg.surge.shock_rate == 3.0
    assert cfg.block_lr == [1e-6] * 23


def test_precedence_cli_over_toml_over_default(tmp_path):
    path = write(tmp_path / "cfg.toml", """
[training]
learning_rate = 3e-4
train_batch_size = 4
[surge]
shock_rate = 2.0
""")
    cfg = parse_train_args(["--config_file", str(path), "--learning_rate", "1e-3"])
    assert cfg.learning_rate == 1e-3  # CLI wins
    assert cfg.train_batch_size == 4  # TOML beats the default 1
    assert cfg.surge.shock_rate == 2.0  # [surge] shock_rate -> --surge_shock_rate
    assert cfg.max_train_steps == 1600  # default
    # a flag given on the CLI with its default value still wins over the TOML
    cfg = parse_train_args(["--config_file", str(path), "--train_batch_size=1"])
    assert cfg.train_batch_size == 1


def test_sections_flattened_one_level_and_surge_teachers(tmp_path):
    path = write(tmp_path / "cfg.toml", """
[model_arguments]
pretrained_model_name_or_path = "student.safetensors"
[anything_goes]
seed = 7
network_args = "conv_dim=4"
[surge]
unit_map = "fine"
[[surge.teachers]]
path = "teacher.safetensors"
loras = [["style.safetensors", 0.7]]
weight = 2.0
timestep_range = [0, 500]
""")
    cfg = parse_train_args(["--config_file", str(path)])
    assert cfg.pretrained_model_name_or_path == "student.safetensors"
    assert cfg.seed == 7
    assert cfg.network_args == ["conv_dim=4"]  # a scalar for an nargs flag becomes a list
    assert cfg.surge.unit_map == "fine"
    (teacher,) = cfg.surge.teachers
    assert teacher.path == "teacher.safetensors" and teacher.weight == 2.0
    assert teacher.timestep_range == (0.0, 500.0)
    assert teacher.loras[0].path == "style.safetensors" and teacher.loras[0].multiplier == pytest.approx(0.7)


def test_config_file_without_suffix_gets_toml(tmp_path):
    write(tmp_path / "cfg.toml", "seed = 9\n")
    assert parse_train_args(["--config_file", str(tmp_path / "cfg")]).seed == 9


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path / "typo.toml", "[training]\nlearning_rat = 1e-4\n")
    with pytest.raises(ConfigError) as err:
        parse_train_args(["--config_file", str(path)])
    message = str(err.value)
    assert "learning_rat" in message and str(path) in message and "'learning_rate'" in message


def test_unknown_surge_key_suggests_surge_name(tmp_path):
    path = write(tmp_path / "typo.toml", "[surge]\nshock_rat = 3\n")
    with pytest.raises(ConfigError, match=r"shock_rat.*did you mean 'shock_rate'"):
        parse_train_args(["--config_file", str(path)])


@pytest.mark.parametrize("text, key", [
    ('learning_rate = "fast"\n', "learning_rate"),
    ("train_batch_size = 1.5\n", "train_batch_size"),
    ('cache_latents = "yes please"\n', "cache_latents"),
    ('mixed_precision = "fp8"\n', "mixed_precision"),
    ('save_model_as = "pt"\n', "save_model_as"),
    ("train_batch_size = 0\n", "train_batch_size"),
    ("[surge]\nsmooth_rate = 1.5\n", "surge_smooth_rate"),
    ('[surge]\nunit_map = "heads"\n', "surge_unit_map"),
    ("block_lr = [1.0, 2.0]\n", "block_lr"),
    ('resolution = "big"\n', "resolution"),
    ("full_fp16 = true\n", "full_fp16"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        parse_train_args(["--config_file", str(path)])
    assert key in str(err.value)


def test_bad_teacher_table_names_the_table(tmp_path):
    path = write(tmp_path / "bad.toml", '[[surge.teachers]]\npath = "t.safetensors"\nwieght = 2\n')
    with pytest.raises(ConfigError, match=r"surge.teachers.*#1.*wieght"):
        parse_train_args(["--config_file", str(path)])


def test_toml_numbers_and_strings_coerced(tmp_path):
    path = write(tmp_path / "c.toml", 'learning_rate = "1e-4"\nnetwork_alpha = 16\nresolution = [832, 1216]\n'
                                      'lr_scheduler_power = 1\n')
    cfg = parse_train_args(["--config_file", str(path)])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.network_alpha, float)
    assert cfg.resolution == (832, 1216)


def test_output_config_round_trip(tmp_path):
    out = tmp_path / "written.toml"
    argv = ["--learning_rate", "5e-5", "--resolution", "512", "--optimizer_type", "ADA_SURGE", "--optimizer_args",
            "relative_step=False", "--surge_num_seeds", "5", "--teacher_lora", "l.safetensors:0.3",
            "--surge", "false", "--shuffle_caption", "--block_lr", ",".join(["2e-6"] * 23)]
    with pytest.raises(SystemExit) as done:
        parse_train_args([*argv, "--config_file", str(out), "--output_config"])
    assert done.value.code == 0
    written = toml.loads(out.read_text())
    assert written["surge"]["num_seeds"] == 5 and "config_file" not in str(written)
    direct = parse_train_args(argv)
    reread = parse_train_args(["--config_file", str(out)])
    reread.config_file = direct.config_file = None
    assert reread == direct


def test_output_config_refuses_invalid_values(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_train_args(["--learning_rate", "-1", "--config_file", str(tmp_path / "x.toml"), "--output_config"])
    assert not (tmp_path / "x.toml").exists()


def test_realistic_kohya_gui_sdxl_lora_toml_parses_unchanged(caplog):
    path = DATA / "kohya_sdxl_lora.toml"
    config_module.files._warned_ignored.clear()
    with caplog.at_level(logging.WARNING, logger="sd_scripts_surge.config"):
        cfg = parse_train_args(["--config_file", str(path)])
        parse_train_args(["--config_file", str(path)])
    assert cfg.pretrained_model_name_or_path.endswith("sd_xl_base_1.0.safetensors")
    assert cfg.resolution == (1024, 1024)
    assert cfg.network_module == "networks.lora" and cfg.network_dim == 32 and cfg.network_alpha == 16.0
    assert cfg.network_args == ["conv_dim=8", "conv_alpha=4"]
    assert cfg.optimizer_type == "Adafactor"
    assert cfg.optimizer_args == ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
    assert cfg.lr_scheduler == "cosine_with_restarts" and cfg.lr_scheduler_num_cycles == 3
    assert cfg.mixed_precision == "bf16" and cfg.save_precision == "bf16"
    assert cfg.network_train_unet_only and cfg.cache_latents_to_disk and cfg.sdpa and cfg.no_half_vae
    assert cfg.min_snr_gamma == 5.0 and cfg.noise_offset == pytest.approx(0.0357)
    assert cfg.text_encoder_lr == 0.0 and cfg.unet_lr == 1e-4
    for key in ("huber_c", "loss_type", "clip_skip", "epoch", "dynamo_backend", "wandb_run_name", "vae_batch_size",
                "persistent_data_loader_workers", "ip_noise_gamma", "save_last_n_epochs", "max_token_length"):
        assert key in cfg.ignored
    warnings = [r for r in caplog.records if "accepted but not used" in r.getMessage()]
    assert len(warnings) == 1  # once per process, not per parse


def test_realistic_sectioned_sd_scripts_finetune_toml_parses():
    cfg = parse_train_args(["--config_file", str(DATA / "kohya_sdxl_finetune_sections.toml")])
    assert cfg.dataset_config == "/data/dataset.toml"
    assert cfg.save_model_as == "diffusers" and cfg.full_fp16 and cfg.mixed_precision == "fp16"
    assert cfg.block_lr is not None and len(cfg.block_lr) == 23
    assert cfg.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert cfg.cache_text_encoder_outputs and cfg.xformers
    assert {"vae", "lowram", "mem_eff_attn", "debug_dataset", "save_last_n_epochs"} <= set(cfg.ignored)


def test_every_design_flag_exists():
    dests = {a.dest for a in build_parser()._actions}
    wanted = """pretrained_model_name_or_path dataset_config config_file output_config output_dir output_name
        save_model_as save_precision save_every_n_epochs save_every_n_steps save_state resume learning_rate unet_lr
        text_encoder_lr lr_scheduler lr_warmup_steps lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_type
        lr_scheduler_args optimizer_type optimizer_args max_train_steps max_train_epochs train_batch_size
        gradient_accumulation_steps mixed_precision full_fp16 full_bf16 gradient_checkpointing cache_latents
        cache_latents_to_disk cache_text_encoder_outputs cache_text_encoder_outputs_to_disk seed logging_dir
        log_with log_prefix v_parameterization min_snr_gamma noise_offset block_lr network_module network_dim
        network_alpha network_weights network_args network_train_unet_only train_text_encoder max_grad_norm
        sample_every_n_epochs sample_prompts sample_sampler train_data_dir resolution enable_bucket min_bucket_reso
        max_bucket_reso bucket_reso_steps caption_extension shuffle_caption keep_tokens max_data_loader_n_workers
        xformers sdpa no_half_vae tokenizer_cache_dir surge teacher_model teacher_lora surge_shock_rate
        surge_smooth_rate surge_max_hops surge_anchor_grasp surge_pre_change_layers surge_post_change_layers
        surge_num_seeds surge_probes surge_flavor_resolution surge_replay_steps surge_traj_weight surge_unit_map
        surge_w_task surge_w_out""".split()
    assert set(wanted) <= dests
    assert not (dests & config_module.IGNORED_SD_SCRIPTS_KEYS)  # a used flag is never listed as ignored


def test_sd_scripts_subset_flags_and_prior_loss_weight_are_used_not_ignored(tmp_path):
    used = """flip_aug color_aug random_crop caption_dropout_rate caption_dropout_every_n_epochs
        caption_tag_dropout_rate caption_prefix caption_suffix keep_tokens_separator prior_loss_weight""".split()
    assert not set(used) & config_module.IGNORED_SD_SCRIPTS_KEYS
    assert set(used) <= {a.dest for a in build_parser()._actions}
    cfg = parse_train_args(["--flip_aug", "--caption_dropout_rate", "0.1", "--prior_loss_weight", "0.5"])
    assert cfg.flip_aug and cfg.caption_dropout_rate == 0.1 and cfg.prior_loss_weight == 0.5
    path = write(tmp_path / "c.toml", "[training]\nprior_loss_weight = 1\ncaption_dropout_rate = 0\n"
                                      'caption_prefix = "x"\n')
    from_toml = parse_train_args(["--config_file", str(path)])
    assert from_toml.prior_loss_weight == 1.0 and from_toml.caption_dropout_rate == 0.0
    assert from_toml.caption_prefix == "x" and not from_toml.ignored


def test_abbreviated_flags_are_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--learning", "1"])


def test_unknown_cli_flag_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"--learning_rat\b.*did you mean 'learning_rate'"):
        parse_train_args(["--learning_rat", "1e-4"])
    with pytest.raises(ConfigError, match="huber_c.*does not use"):
        parse_train_args(["--huber_c", "0.1"])


def test_teacher_tables_round_trip_through_written_toml(tmp_path):
    source = write(tmp_path / "in.toml", """
[surge]
num_seeds = 4
[[surge.teachers]]
path = "a.safetensors"
loras = [{path = "l.safetensors", multiplier = 0.5}]
timestep_range = [0, 500]
[[surge.teachers]]
path = "b.safetensors"
weight = 0.5
""")
    first = parse_train_args(["--config_file", str(source)])
    values = {f"surge_{k}": v for k, v in vars(first.surge).items() if k != "enabled"}
    values.update(learning_rate=first.learning_rate, surge=first.surge.enabled)
    out = config_module.write_config_file(values, tmp_path / "out.toml")
    second = parse_train_args(["--config_file", str(out)])
    assert second.surge == first.surge
    assert [t.path for t in second.surge.teachers] == ["a.safetensors", "b.safetensors"]
