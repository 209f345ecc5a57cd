"""Loading and saving checkpoints: single file <-> diffusers folder round trips, precision, metadata, bad inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sd_scripts_surge.models import io
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.models.configs import clean_config
from sd_scripts_surge.models.convert import clip_canonical_state_dict
from sd_scripts_surge.models.fileio import CheckpointError, read_safetensors_header
from sd_scripts_surge.tiny.architecture import build_tiny_text_encoders, build_tiny_unet, build_tiny_vae

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def make_tokenizer_dir(path: Path) -> Path:
    """A minimal CLIP BPE tokenizer (printable ASCII characters, no merges), built locally."""
    path.mkdir(parents=True, exist_ok=True)
    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def tiny_sdxl(seed: int = 0) -> ModelBundle:
    te1, te2 = build_tiny_text_encoders(seed + 1)
    return ModelBundle("sdxl", build_tiny_unet(seed), te1, build_tiny_vae(seed + 2), te2)


def tiny_sd1(seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=16,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=200,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    )
    return ModelBundle("sd1", unet, te, vae)


def canonical(bundle: ModelBundle) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, module in bundle.modules().items():
        sd = module.state_dict()
        out[name] = clip_canonical_state_dict(sd) if name.startswith("text_encoder") else dict(sd)
    return out


def assert_same_weights(a: ModelBundle, b: ModelBundle, dtype: torch.dtype | None = None) -> None:
    sa, sb = canonical(a), canonical(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        for key, tensor in sa[name].items():
            if dtype is None:
                assert torch.equal(sb[name][key], tensor), (name, key)
            else:
                assert torch.equal(sb[name][key].float(), tensor.to(dtype).float()), (name, key)


def rewrite(path: Path, out: Path, change) -> Path:
    """Copy a safetensors file through `change(tensors) -> tensors`, keeping its metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = change(load_file(str(path)))
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.fixture(scope="module")
def saved_sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelBundle, Path]:
    bundle = tiny_sdxl()
    path = io.save_single_file(bundle, tmp_path_factory.mktemp("sdxl") / "tiny.safetensors")
    return bundle, path


# ---------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------


def test_single_file_round_trip_is_bit_exact(saved_sdxl: tuple[ModelBundle, Path]) -> None:
    bundle, path = saved_sdxl
    header = read_safetensors_header(path)
    assert any(
        k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj") for k in header.tensors
    )
    assert all(t.dtype == "F32" for t in header.tensors.values())
    loaded = io.load_model(path)
    assert loaded.arch == "sdxl"
    assert loaded.metadata["surge.config_source"] == "metadata"
    assert_same_weights(bundle, loaded)
    assert clean_config(loaded.unet.config) == clean_config(bundle.unet.config)
    assert clean_config(loaded.vae.config) == clean_config(bundle.vae.config)
    assert loaded.text_encoder_2.config.hidden_act == bundle.text_encoder_2.config.hidden_act
    assert loaded.tokenizer_1 is None and "tokenizer_dir" in loaded.metadata["surge.note.tokenizers"]
    # the loaded model computes what the original computes
    ids = torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        a = bundle.text_encoder_2(ids, output_hidden_states=True)
        b = loaded.text_encoder_2(ids, output_hidden_states=True)
    assert torch.equal(a.text_embeds, b.text_embeds)
    assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])


def test_diffusers_round_trip_with_tokenizers(tmp_path: Path) -> None:
    tok = make_tokenizer_dir(tmp_path / "tok")
    bundle = tiny_sdxl(seed=3)
    bundle.tokenizer_1 = bundle.tokenizer_2 = io.load_tokenizer(tok)
    folder = io.save_diffusers(bundle, tmp_path / "diffusers")
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"
    ]  # fmt: skip
    assert not list(tmp_path.glob(".diffusers.*"))  # temp folder renamed away
    loaded = io.load_model(folder)
    assert loaded.arch == "sdxl"
    assert_same_weights(bundle, loaded)
    assert loaded.tokenizer_2("red circle").input_ids == bundle.tokenizer_1("red circle").input_ids
    # diffusers -> single file -> back: still bit-exact
    single = io.save_single_file(loaded, tmp_path / "from_diffusers.safetensors")
    assert_same_weights(bundle, io.load_model(single))
    # saving again over an existing folder replaces it
    io.save_diffusers(tiny_sdxl(seed=9), folder)
    assert_same_weights(tiny_sdxl(seed=9), io.load_model(folder))


def test_sd1_round_trip(tmp_path: Path) -> None:
    bundle = tiny_sd1()
    path = io.save_single_file(bundle, tmp_path / "sd1.safetensors")
    keys = read_safetensors_header(path).tensors
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # upsampler slot 1: no attention there
    assert io.detect_arch(keys) == "sd1"
    loaded = io.load_model(path)
    assert loaded.arch == "sd1" and loaded.text_encoder_2 is None
    assert_same_weights(bundle, loaded)
    folder = io.save_diffusers(loaded, tmp_path / "sd1_diffusers")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert_same_weights(bundle, io.load_model(folder))
    assert read_safetensors_header(path).metadata["modelspec.architecture"] == "stable-diffusion-v1"


@pytest.mark.parametrize("precision,dtype,code", [("fp16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16")])
def test_save_precision(tmp_path: Path, precision: str, dtype: torch.dtype, code: str) -> None:
    bundle = tiny_sdxl(seed=4)
    path = io.save_single_file(bundle, tmp_path / f"m-{precision}.safetensors", precision=precision)
    assert {t.dtype for t in read_safetensors_header(path).tensors.values()} == {code}
    assert bundle.unet.conv_in.weight.dtype == torch.float32  # the bundle itself is untouched
    loaded = io.load_model(path, dtype=dtype)
    assert loaded.unet.conv_in.weight.dtype == dtype
    assert_same_weights(bundle, loaded, dtype=dtype)
    folder = io.save_diffusers(bundle, tmp_path / f"d-{precision}", precision=precision)
    unet_header = read_safetensors_header(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet_header.tensors.values()} == {code}
    with pytest.raises(ValueError, match="fp16"):
        io.save_single_file(bundle, tmp_path / "x.safetensors", precision="fp8")


def test_metadata_written(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path) -> None:
    bundle, _ = saved_sdxl
    ss = {"ss_output_name": "tiny", "ss_training_started_at": 1700000000.5, "ss_tag_frequency": {"a": {"b": 1}}}
    path = io.save_single_file(bundle, tmp_path / "tiny-000001.safetensors", metadata=ss)
    meta = read_safetensors_header(path).metadata
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "tiny-000001"
    assert meta["modelspec.resolution"] == "64x64"  # tiny: latent 8 x VAE factor 8
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert len(meta["modelspec.date"]) == 19 and meta["modelspec.date"][10] == "T"
    assert meta["ss_output_name"] == "tiny" and meta["ss_training_started_at"] == "1700000000.5"
    assert json.loads(meta["ss_tag_frequency"]) == {"a": {"b": 1}}
    assert json.loads(meta["surge.unet_config"])["block_out_channels"] == [32, 64, 64]
    assert json.loads(meta["surge.text_encoder_2_config"])["projection_dim"] == 32


# ---------------------------------------------------------------------------------------------------------------
# configs and tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_configs_without_metadata_are_inferred_or_taken_from_config_dir(
    saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle, path = saved_sdxl
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # same tensors, no metadata at all
    with caplog.at_level(logging.WARNING):
        inferred = io.load_model(bare)
    assert inferred.metadata["surge.config_source"] == "inferred"
    assert "guess" in caplog.text
    assert_same_weights(bundle, inferred)
    assert list(inferred.unet.config.block_out_channels) == [32, 64, 64]
    assert list(inferred.unet.config.transformer_layers_per_block) == [1, 1, 2]
    assert inferred.unet.config.projection_class_embeddings_input_dim == 80
    assert inferred.unet.config.addition_time_embed_dim == 8
    assert inferred.text_encoder_2.config.projection_dim == 32

    config_dir = io.save_diffusers(bundle, tmp_path / "configs")
    exact = io.load_model(bare, config_dir=config_dir)
    assert exact.metadata["surge.config_source"] == "config_dir"
    assert exact.unet.config.norm_num_groups == 16 and list(exact.unet.config.attention_head_dim) == [2, 4, 4]
    assert exact.text_encoder_1.config.hidden_act == "quick_gelu"
    assert_same_weights(bundle, exact)


def test_tokenizer_dir_for_single_file(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path) -> None:
    _, path = saved_sdxl
    make_tokenizer_dir(tmp_path / "tokenizers" / "tokenizer")
    make_tokenizer_dir(tmp_path / "tokenizers" / "tokenizer_2")
    loaded = io.load_model(path, tokenizer_dir=tmp_path / "tokenizers")
    assert loaded.tokenizer_1 is not None and loaded.tokenizer_2 is not None
    assert "surge.note.tokenizers" not in loaded.metadata
    single = io.load_model(path, tokenizer_dir=tmp_path / "tokenizers" / "tokenizer")
    assert single.tokenizer_1 is single.tokenizer_2


def test_real_size_checkpoints_use_standard_configs() -> None:
    for arch, name, comps in [("sdxl", "sdxl-sgm.json", ("clip_l", "clip_g", "vae", "diffuser")),
                              ("sd1", "sd1-ldm.json", ("clip_l", "vae", "diffuser"))]:  # fmt: skip
        data = json.loads((DATA / name).read_text())["components"]
        shapes = {k: tuple(e["shape"]) for c in comps for k, e in data[c].items()}
        configs = io._resolve_single_file_configs(arch, shapes, {}, None, Path(name))
        assert configs.source == "standard", arch
        assert configs.unet["block_out_channels"] == ([320, 640, 1280] if arch == "sdxl" else [320, 640, 1280, 1280])


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_truncated_file(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path) -> None:
    _, path = saved_sdxl
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        io.load_model(cut)


def test_corrupt_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        io.load_model(bad)


def test_wrong_shape_names_key_expected_and_found(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path) -> None:
    _, path = saved_sdxl
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"

    def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[key] = torch.zeros(64, 48)
        return t

    bad = rewrite(path, tmp_path / "shape.safetensors", change)
    with pytest.raises(CheckpointError) as err:
        io.load_model(bad)
    msg = str(err.value)
    assert key in msg and "[64, 48]" in msg and "[64, 64]" in msg


def test_missing_keys_listed_with_count(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path) -> None:
    _, path = saved_sdxl

    def drop(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in t.items() if not k.startswith("first_stage_model.decoder.")}

    bad = rewrite(path, tmp_path / "missing.safetensors", drop)
    n_dropped = sum(1 for k in read_safetensors_header(path).tensors if k.startswith("first_stage_model.decoder."))
    with pytest.raises(CheckpointError, match=rf"{n_dropped} model key\(s\) missing: first_stage_model\.decoder\."):
        io.load_model(bad)


def test_unexpected_keys_warn(
    saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle, path = saved_sdxl

    def add(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t["model.diffusion_model.extra_head.weight"] = torch.ones(3)
        t["model_ema.decay"] = torch.tensor(0.999)  # known-ignorable: no warning
        return t

    extra = rewrite(path, tmp_path / "extra.safetensors", add)
    with caplog.at_level(logging.WARNING):
        loaded = io.load_model(extra)
    assert "1 unexpected key(s) ignored: model.diffusion_model.extra_head.weight" in caplog.text
    assert "model_ema" not in caplog.text  # the EMA bookkeeping buffer alone is no EMA model
    assert_same_weights(bundle, loaded)

    def add_ema(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t["model_ema.diffusion_modelout2weight"] = t["model.diffusion_model.out.2.weight"].clone()
        return t

    with_ema = rewrite(path, tmp_path / "ema.safetensors", add_ema)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        io.load_model(with_ema)
    assert "holds EMA weights (1 model_ema.* tensors)" in caplog.text  # said, not dropped silently
    assert "unexpected key" not in caplog.text


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_names_tensor(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path, value: float) -> None:
    _, path = saved_sdxl
    key = "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight"

    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[key][0, 0] = value
        return t

    bad = rewrite(path, tmp_path / "nan.safetensors", poison)
    with pytest.raises(CheckpointError, match=rf"{key}.*1 NaN/Inf"):
        io.load_model(bad)


def test_nan_in_diffusers_folder(tmp_path: Path) -> None:
    folder = io.save_diffusers(tiny_sd1(), tmp_path / "d")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(str(weights))
    tensors["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="conv_out.weight"):
        io.load_model(folder)
    weights.write_bytes(original)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json missing"):
        io.load_model(folder)


def test_pickle_needs_opt_in(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path) -> None:
    bundle, path = saved_sdxl
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path))}, ckpt)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        io.load_model(ckpt)
    loaded = io.load_model(ckpt, allow_pickle=True, config_dir=io.save_diffusers(bundle, tmp_path / "cfg"))
    assert_same_weights(bundle, loaded)


def test_unsupported_layouts_are_named() -> None:
    with pytest.raises(CheckpointError, match="SD2"):
        io.detect_arch(["cond_stage_model.model.transformer.resblocks.0.ln_1.weight", "model.diffusion_model.x"])
    with pytest.raises(CheckpointError, match="diffusers names"):
        io.detect_arch(["down_blocks.0.resnets.0.conv1.weight"])
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        io.detect_arch(["foo.weight"])


def test_saving_never_overwrites_source_and_is_atomic(
    saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = saved_sdxl
    loaded = io.load_model(path)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        io.save_single_file(loaded, path)

    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        io.save_single_file(loaded, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    with pytest.raises(OSError, match="disk full"):
        io.save_diffusers(loaded, tmp_path / "folder")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# real-world file variants
# ---------------------------------------------------------------------------------------------------------------


def test_v_prediction_flag_and_logit_scale_survive(saved_sdxl: tuple[ModelBundle, Path], tmp_path: Path) -> None:
    _, path = saved_sdxl

    def add(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t["v_pred"] = torch.tensor([])  # how SDXL v-prediction checkpoints mark themselves
        t["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
        return t

    vpred = rewrite(path, tmp_path / "vpred.safetensors", add)
    loaded = io.load_model(vpred)
    assert loaded.metadata["modelspec.prediction_type"] == "v"
    out = io.save_single_file(loaded, tmp_path / "out.safetensors")
    header = read_safetensors_header(out)
    assert header.metadata["modelspec.prediction_type"] == "v"
    assert load_file(str(out))["conditioner.embedders.1.model.logit_scale"].item() == pytest.approx(4.6052)
    folder = io.save_diffusers(loaded, tmp_path / "vpred_diffusers")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert io.load_model(folder).metadata["modelspec.prediction_type"] == "v"


def test_sharded_diffusers_component(tmp_path: Path) -> None:
    bundle = tiny_sd1(seed=6)
    folder = io.save_diffusers(bundle, tmp_path / "d")
    unet_dir = folder / "unet"
    tensors = load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, str(unet_dir / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_weights(bundle, io.load_model(folder))


def test_unet_dtype_reads_only_the_unet_in_another_dtype(tmp_path) -> None:
    """A full_bf16 run reads the UNet straight into bf16 (no fp32 UNet held); the rest stays in `dtype`."""
    single = io.save_single_file(tiny_sdxl(0), tmp_path / "m.safetensors")
    for source in (single, io.save_diffusers(io.load_model(single), tmp_path / "m_diffusers")):
        mixed = io.load_model(source, dtype=torch.float32, unet_dtype=torch.bfloat16)
        full = io.load_model(source, dtype=torch.float32)
        assert {p.dtype for p in mixed.unet.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in mixed.text_encoder_2.parameters()} == {torch.float32}
        assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(mixed.unet.parameters(),
                                                                          full.unet.parameters()))
