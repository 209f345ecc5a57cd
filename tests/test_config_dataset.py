"""Dataset TOML: inheritance general → dataset → subset, folder form repeats, key and value errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_scripts_surge.config import ConfigError, parse_train_args
from sd_scripts_surge.data.dataset_config import dataset_config_from_folder, load_dataset_config

DATA = Path(__file__).parent / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_realistic_dataset_toml_inheritance():
    first, second = load_dataset_config(DATA / "kohya_dataset.toml")
    assert first.resolution == (1024, 768) and first.batch_size == 4 and first.enable_bucket
    assert (first.min_bucket_reso, first.max_bucket_reso, first.bucket_reso_steps) == (512, 2048, 64)
    img, reg = first.subsets
    assert img.image_dir == DATA / "subject/img"  # relative, not in cwd -> next to the TOML
    assert img.num_repeats == 10 and img.class_tokens == "sks dog"
    assert img.keep_tokens == 2  # the subset's own value wins
    assert img.shuffle_caption is True and img.caption_extension == ".txt"  # from [general]
    assert reg.is_reg and reg.caption_extension == ".caption" and reg.shuffle_caption is False
    assert reg.keep_tokens == 1  # [general]
    assert second.resolution == (512, 512) and second.batch_size == 1 and not second.enable_bucket
    (style,) = second.subsets
    assert style.image_dir == Path("/data/style")
    assert style.keep_tokens_separator == "|||"  # dataset level -> subset
    assert style.caption_dropout_rate == pytest.approx(0.05)
    assert style.flip_aug is True
    assert style.extra == {"token_warmup_step": 0}  # accepted, not used


def test_cli_values_are_defaults_under_general(tmp_path):
    path = write(tmp_path / "d.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    train = parse_train_args(["--resolution", "64", "--caption_extension", ".txt", "--train_batch_size", "3",
                              "--enable_bucket", "--min_bucket_reso", "32", "--bucket_reso_steps", "16"])
    (ds,) = load_dataset_config(path, train)
    assert ds.resolution == (64, 64) and ds.batch_size == 3 and ds.enable_bucket and ds.bucket_reso_steps == 16
    assert ds.subsets[0].caption_extension == ".txt"
    assert ds.subsets[0].image_dir == tmp_path / "x"


@pytest.mark.parametrize("text, fragment", [
    ('[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n',
     r"'shufle_caption' in \[general\].*did you mean 'shuffle_caption'"),
    ('[[datasets]]\nbatchsize = 2\n[[datasets.subsets]]\nimage_dir = "x"\n',
     r"'batchsize' in \[\[datasets\]\] #1.*'batch_size'"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeat = 3\n',
     r"'num_repeat' in \[\[datasets.subsets\]\] #1 of \[\[datasets\]\] #1.*'num_repeats'"),
    ('[dataset]\nresolution = 5\n', r"'dataset' in the top level"),
])
def test_unknown_keys_name_key_file_and_suggestion(tmp_path, text, fragment):
    path = write(tmp_path / "d.toml", text)
    with pytest.raises(ConfigError, match=fragment) as err:
        load_dataset_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text, key", [
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeats = "ten"\n', "num_repeats"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeats = 0\n', "num_repeats"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nshuffle_caption = 1\n', "shuffle_caption"),
    ('[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = "x"\n', "batch_size"),
    ('[[datasets]]\nresolution = [1, 2, 3]\n[[datasets.subsets]]\nimage_dir = "x"\n', "resolution"),
    ('[[datasets]]\nresolution = "512"\n[[datasets.subsets]]\nimage_dir = "x"\n', "resolution"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_dropout_rate = 2\n', "caption_dropout_rate"),
    ('[[datasets]]\nmin_bucket_reso = 900\nmax_bucket_reso = 800\n[[datasets.subsets]]\nimage_dir = "x"\n',
     "min_bucket_reso"),
    ('[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n', "image_dir"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_dataset_config(write(tmp_path / "d.toml", text))


def test_no_datasets_or_no_subsets_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no \\[\\[datasets\\]\\]"):
        load_dataset_config(write(tmp_path / "a.toml", "[general]\nkeep_tokens = 1\n"))
    with pytest.raises(ConfigError, match="no \\[\\[datasets.subsets\\]\\]"):
        load_dataset_config(write(tmp_path / "b.toml", "[[datasets]]\nbatch_size = 2\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_dataset_config(tmp_path / "missing.toml")


def test_folder_form_repeats_and_class_tokens(tmp_path):
    for name in ("10_shapes", "3_sks dog", "not_a_subset", "2_x"):
        (tmp_path / name).mkdir()
    (tmp_path / "10_file.txt").write_text("files are not subsets")
    (ds,) = dataset_config_from_folder(tmp_path, resolution=64, bucket_reso_steps=16)
    by_name = {s.image_dir.name: s for s in ds.subsets}
    assert set(by_name) == {"10_shapes", "3_sks dog", "2_x"}
    assert by_name["10_shapes"].num_repeats == 10 and by_name["10_shapes"].class_tokens == "shapes"
    assert by_name["3_sks dog"].num_repeats == 3 and by_name["3_sks dog"].class_tokens == "sks dog"
    assert ds.resolution == (64, 64) and ds.bucket_reso_steps == 16


def test_folder_form_errors(tmp_path):
    with pytest.raises(ConfigError, match="folder not found"):
        dataset_config_from_folder(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match="10_name"):
        dataset_config_from_folder(tmp_path)
    (tmp_path / "1_a").mkdir()
    with pytest.raises(ConfigError, match="num_repeat.*did you mean"):
        dataset_config_from_folder(tmp_path, num_repeat=2)


def test_reg_data_dir_adds_regularisation_subsets(tmp_path):
    (tmp_path / "train" / "5_sks dog").mkdir(parents=True)
    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    cfg = parse_train_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path / "train"),
                            "--reg_data_dir", str(tmp_path / "reg"), "--prior_loss_weight", "0.5"])
    (ds,) = dataset_config_from_folder(cfg.train_data_dir, cfg, reg_data_dir=cfg.reg_data_dir)
    flags = {s.image_dir.name: s.is_reg for s in ds.subsets}
    assert flags == {"5_sks dog": False, "1_dog": True}
    with pytest.raises(ConfigError, match="--reg_data_dir .*not found"):
        dataset_config_from_folder(tmp_path / "train", reg_data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--reg_data_dir .*10_name"):
        dataset_config_from_folder(tmp_path / "train", reg_data_dir=tmp_path / "empty")


SUBSET_FLAGS = ["--flip_aug", "--random_crop", "--caption_dropout_rate", "0.25", "--caption_dropout_every_n_epochs",
                "3", "--caption_tag_dropout_rate", "0.1", "--caption_prefix", "pre", "--caption_suffix", "post",
                "--keep_tokens_separator", "|||", "--shuffle_caption", "--keep_tokens", "2"]


def test_training_flags_reach_every_folder_subset(tmp_path):
    for name in ("10_a", "2_b"):
        (tmp_path / name).mkdir()
    (ds,) = dataset_config_from_folder(tmp_path, parse_train_args(["--train_data_dir", str(tmp_path), *SUBSET_FLAGS]))
    for subset in ds.subsets:
        assert subset.flip_aug and subset.random_crop and subset.shuffle_caption and subset.keep_tokens == 2
        assert subset.caption_dropout_rate == 0.25 and subset.caption_dropout_every_n_epochs == 3
        assert subset.caption_tag_dropout_rate == 0.1 and subset.keep_tokens_separator == "|||"
        assert (subset.caption_prefix, subset.caption_suffix) == ("pre", "post")
    (plain,) = dataset_config_from_folder(tmp_path, parse_train_args([]))
    assert not plain.subsets[0].flip_aug and plain.subsets[0].caption_dropout_rate == 0.0
    assert plain.subsets[0].caption_prefix == ""


def test_training_toml_keys_reach_folder_subsets(tmp_path):
    (tmp_path / "img" / "5_x").mkdir(parents=True)
    cfg = write(tmp_path / "cfg.toml", f'[dataset]\ntrain_data_dir = "{tmp_path / "img"}"\nflip_aug = true\n'
                                       'caption_dropout_rate = 0.2\ncaption_prefix = "masterpiece"\n')
    (ds,) = dataset_config_from_folder(tmp_path / "img", parse_train_args(["--config_file", str(cfg)]))
    (subset,) = ds.subsets
    assert subset.flip_aug and subset.caption_dropout_rate == 0.2 and subset.caption_prefix == "masterpiece"


def test_dataset_toml_values_win_over_training_flags(tmp_path):
    # sd-scripts' config_util looks a key up in subset → dataset → [general] → command line
    path = write(tmp_path / "d.toml", """
[general]
caption_dropout_rate = 0.05
[[datasets]]
[[datasets.subsets]]
image_dir = "a"
flip_aug = false
[[datasets.subsets]]
image_dir = "b"
caption_prefix = "own"
""")
    first, second = load_dataset_config(path, parse_train_args(SUBSET_FLAGS))[0].subsets
    assert first.flip_aug is False and second.flip_aug is True  # the subset's false wins; else the flag
    assert first.caption_dropout_rate == second.caption_dropout_rate == 0.05  # [general] wins over the flag
    assert second.caption_prefix == "own" and first.caption_prefix == "pre"
    assert first.caption_tag_dropout_rate == 0.1 and first.caption_dropout_every_n_epochs == 3  # only the flag
    assert first.keep_tokens_separator == "|||" and first.random_crop


def test_color_aug_flag_is_refused_when_the_dataset_is_built(tmp_path):
    from sd_scripts_surge.data import build_dataset

    (tmp_path / "1_a").mkdir()
    cfg = parse_train_args(["--train_data_dir", str(tmp_path), "--color_aug"])
    with pytest.raises(ConfigError, match="color_aug.*cached latents"):
        build_dataset(cfg)


@pytest.mark.parametrize("flags, key", [
    (["--caption_dropout_rate", "1.5"], "caption_dropout_rate"),
    (["--caption_tag_dropout_rate", "-0.1"], "caption_tag_dropout_rate"),
    (["--caption_dropout_every_n_epochs", "-1"], "caption_dropout_every_n_epochs"),
    (["--prior_loss_weight", "-1"], "prior_loss_weight"),
    (["--prior_loss_weight", "nan"], "prior_loss_weight"),
])
def test_bad_subset_flags_name_the_key(flags, key):
    with pytest.raises(ConfigError, match=key):
        parse_train_args(flags)
