"""sd-merge extract-lora / merge-lora: kohya names on real single-file layouts, fp64 merge of LoRA, LoCon,
LoHa and LoKr, full-rank extract → merge reproduces the fine-tune, diffusers loads what we extract."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tools.cli import main as sd_merge
from merge_tools.lora_tools import choose_rank, extract_lora, merge_lora, parse_lora_arg
from networks import lora as L
from sd_scripts_surge.models import io
from sd_scripts_surge.models.fileio import CheckpointError
from sd_scripts_surge.models.lora_keys import checkpoint_lora_keys
from tests.test_lora import _tiny_pipeline, randomize, run_unet, unet_inputs
from tests.test_models_io import tiny_sdxl

Q_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
Q_NAME = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
CONV_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
CONV_NAME = "lora_unet_input_blocks_1_0_in_layers_2"
TE2_QKV = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("lora_tools")
    bundle = tiny_sdxl(0)
    path = io.save_single_file(bundle, tmp / "base.safetensors", precision="float")
    return path, bundle


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(path)).items()}


def test_every_module_our_lora_network_writes_lands_on_a_checkpoint_tensor(base_file) -> None:
    path, bundle = base_file
    keymap = checkpoint_lora_keys(_shapes(path))
    net = L.create_network(1.0, 4, 2, None, [bundle.text_encoder_1, bundle.text_encoder_2], bundle.unet,
                           conv_dim="2")
    names = {lora.lora_name for lora in net.loras}
    assert names and all(keymap.resolve(n) is not None for n in names), sorted(n for n in names
                                                                              if keymap.resolve(n) is None)[:5]
    for lora in net.loras:
        assert keymap.resolve(lora.lora_name).shape == tuple(lora.org_module.weight.shape), lora.lora_name
    assert keymap.resolve(Q_NAME).key == Q_KEY
    q = keymap.resolve("lora_te2_text_model_encoder_layers_0_self_attn_k_proj")
    assert q.key == TE2_QKV and q.rows == (q.shape[0], 2 * q.shape[0])
    # SDXL LoRAs written in diffusers layout resolve to the same tensor
    assert keymap.resolve("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q").key == Q_KEY


def test_merge_lora_equals_our_networks_merge(base_file, tmp_path: Path) -> None:
    path, bundle = base_file
    models = copy.deepcopy(bundle)
    tes = [models.text_encoder_1, models.text_encoder_2]
    net = L.create_network(1.0, 4, 2, None, tes, models.unet, conv_dim="2", conv_alpha="1")
    randomize(net, std=0.1)
    lora = net.save_weights(tmp_path / "l.safetensors", torch.float32)
    out = tmp_path / "merged.safetensors"
    counts = merge_lora(path, [(lora, 0.7)], out, progress=False, log=lambda s: None)
    assert counts["modules"] == len(net.loras) and counts["unmatched"] == 0
    net.set_multiplier(0.7)
    net.merge_to(tes, models.unet)
    merged = io.load_single_file(out)
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(merged.unet, inputs), run_unet(models.unet, inputs), atol=1e-4, rtol=1e-4)
    assert (run_unet(bundle.unet, inputs) - run_unet(models.unet, inputs)).abs().max() > 1e-3
    before, after = load_file(str(path)), load_file(str(out))
    untouched = "model.diffusion_model.input_blocks.0.0.weight"  # conv_in: not a LoRA target, copied as is
    assert torch.equal(before[untouched], after[untouched])


def _tuned(path: Path, tmp: Path, seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(path))
    out = {k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in sd.items()}
    tuned = tmp / "tuned.safetensors"
    save_file(out, str(tuned))
    return tuned


def test_full_rank_extract_then_merge_reproduces_the_fine_tune(base_file, tmp_path: Path) -> None:
    path, _ = base_file
    tuned = _tuned(path, tmp_path)
    lora = tmp_path / "x.safetensors"
    report = extract_lora(tuned, path, lora, dim=100000, conv_dim=100000, clamp_quantile=1.0, save_dtype="fp32",
                          progress=False, log=lambda s: None)
    assert all(v == pytest.approx(1.0) for v in report.energy_per_block.values())
    assert {"IN04", "TE1", "TE2"} <= set(report.energy_per_block)
    out = tmp_path / "back.safetensors"
    merge_lora(path, [(lora, 1.0)], out, progress=False, log=lambda s: None)
    keymap = checkpoint_lora_keys(_shapes(path))
    want, got = load_file(str(tuned)), load_file(str(out))
    for target in keymap.targets.values():
        torch.testing.assert_close(got[target.key], want[target.key], atol=2e-5, rtol=0)
    low = tmp_path / "low.safetensors"
    report = extract_lora(tuned, path, low, dim=2, energy=0.5, progress=False, log=lambda s: None)
    assert max(report.ranks.values()) <= 2 and all(v < 1.0 for v in report.energy_per_block.values())


def test_extracted_lora_loads_in_diffusers_with_the_merged_output(base_file, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    path, bundle = base_file
    tuned = _tuned(path, tmp_path, seed=2)
    lora = tmp_path / "x.safetensors"
    extract_lora(tuned, path, lora, dim=4, conv_dim=2, clamp_quantile=1.0, save_dtype="fp32", progress=False,
                 log=lambda s: None)
    merged_path = tmp_path / "m.safetensors"
    merge_lora(path, [(lora, 1.0)], merged_path, progress=False, log=lambda s: None)
    merged = io.load_single_file(merged_path)
    pipe = _tiny_pipeline(tmp_path, copy.deepcopy(bundle.unet), copy.deepcopy(bundle.text_encoder_1),
                          copy.deepcopy(bundle.text_encoder_2))
    pipe.load_lora_weights(str(lora))
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(pipe.unet, inputs), run_unet(merged.unet, inputs), atol=1e-4, rtol=1e-4)
    assert (run_unet(bundle.unet, inputs) - run_unet(merged.unet, inputs)).abs().max() > 1e-3


def _merge_one(path: Path, tmp: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lora = tmp / "lyco.safetensors"
    save_file(tensors, str(lora))
    out = tmp / "lyco_merged.safetensors"
    merge_lora(path, [(lora, 0.5)], out, dtype="fp32", progress=False, log=lambda s: None)
    return load_file(str(out))


def test_loha_and_lokr_follow_the_lycoris_formulas(base_file, tmp_path: Path) -> None:
    path, _ = base_file
    base = load_file(str(path))
    out_f, in_f = base[Q_KEY].shape
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w1a, w1b, w2a, w2b = r(out_f, 3), r(3, in_f), r(out_f, 3), r(3, in_f)
    got = _merge_one(path, tmp_path, {f"{Q_NAME}.hada_w1_a": w1a, f"{Q_NAME}.hada_w1_b": w1b,
                                      f"{Q_NAME}.hada_w2_a": w2a, f"{Q_NAME}.hada_w2_b": w2b,
                                      f"{Q_NAME}.alpha": torch.tensor(1.5)})
    expected = base[Q_KEY].double() + 0.5 * (1.5 / 3) * (w1a @ w1b) * (w2a @ w2b)
    torch.testing.assert_close(got[Q_KEY].double(), expected.float().double(), atol=1e-6, rtol=0)
    # LoKr on a 3x3 conv: ΔW = kron(w1, w2), full factors → scale 1 (alpha ignored)
    o, i, kh, kw = base[CONV_KEY].shape
    w1, w2 = r(2, 2), r(o // 2, i // 2, kh, kw)
    got = _merge_one(path, tmp_path, {f"{CONV_NAME}.lokr_w1": w1, f"{CONV_NAME}.lokr_w2": w2,
                                      f"{CONV_NAME}.alpha": torch.tensor(7.0)})
    expected = base[CONV_KEY].double() + 0.5 * torch.kron(w1[:, :, None, None], w2)
    torch.testing.assert_close(got[CONV_KEY].double(), expected.float().double(), atol=1e-6, rtol=0)


def test_te2_q_proj_changes_only_its_rows_of_the_fused_in_proj(base_file, tmp_path: Path) -> None:
    path, _ = base_file
    base = load_file(str(path))
    width = base[TE2_QKV].shape[0] // 3
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = torch.ones(1, base[TE2_QKV].shape[1]), torch.ones(width, 1)
    got = _merge_one(path, tmp_path, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                      f"{name}.alpha": torch.tensor(1.0)})
    diff = got[TE2_QKV] - base[TE2_QKV]
    torch.testing.assert_close(diff[:width], torch.full_like(diff[:width], 0.5))
    assert torch.equal(diff[width:], torch.zeros_like(diff[width:]))


def test_errors_are_clear_and_leave_nothing(base_file, tmp_path: Path) -> None:
    path, _ = base_file
    bad = tmp_path / "other.safetensors"
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.ones(1, 4),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.ones(4, 1)}, str(bad))
    out = tmp_path / "o.safetensors"
    with pytest.raises(CheckpointError, match="match no tensor"):
        merge_lora(path, [(bad, 1.0)], out, progress=False, log=lambda s: None)
    assert not out.exists() and not list(tmp_path.glob(".o.safetensors*"))
    merge_lora(path, [(bad, 1.0)], out, skip_unmatched=True, progress=False, log=lambda s: None)
    assert torch.equal(load_file(str(out))[Q_KEY], load_file(str(path))[Q_KEY])
    dora = tmp_path / "dora.safetensors"
    save_file({f"{Q_NAME}.lora_down.weight": torch.ones(1, 4), f"{Q_NAME}.dora_scale": torch.ones(4)}, str(dora))
    with pytest.raises(CheckpointError, match="DoRA"):
        merge_lora(path, [(dora, 1.0)], tmp_path / "d.safetensors", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="overwrite"):
        merge_lora(path, [(bad, 1.0)], path, progress=False, log=lambda s: None)
    assert sd_merge(["merge-lora", str(path), f"{bad}:0.5", "-o", str(path), "--no-progress"]) == 2


def test_rank_choice_and_lora_arguments() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert choose_rank(s, 8, 0.9) == 2 and choose_rank(s, 1, 0.9) == 1 and choose_rank(s, 8, None) == 3
    assert parse_lora_arg("a/b.safetensors:0.7") == (Path("a/b.safetensors"), 0.7)
    assert parse_lora_arg("C:/x.safetensors") == (Path("C:/x.safetensors"), 1.0)


def test_cli_round_trip(base_file, tmp_path: Path) -> None:
    path, _ = base_file
    tuned = _tuned(path, tmp_path, seed=3)
    lora = tmp_path / "cli.safetensors"
    assert sd_merge(["extract-lora", str(tuned), str(path), "-o", str(lora), "--dim", "4", "--no-progress"]) == 0
    out = tmp_path / "cli_merged.safetensors"
    assert sd_merge(["merge-lora", str(path), f"{lora}:1.0", "-o", str(out), "--dtype", "fp16",
                     "--no-progress"]) == 0
    assert load_file(str(out))[Q_KEY].dtype == torch.float16


def test_unet_only_files_work(base_file, tmp_path: Path) -> None:
    path, _ = base_file
    unet_only = {k: v for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}
    p = tmp_path / "unet.safetensors"
    save_file(unet_only, str(p))
    keymap = checkpoint_lora_keys(_shapes(p))
    assert keymap.arch == "sdxl" and keymap.resolve(Q_NAME).key == Q_KEY
    assert not any(t.component != "unet" for t in keymap.targets.values())
    down, up = torch.ones(1, unet_only[Q_KEY].shape[1]), torch.ones(unet_only[Q_KEY].shape[0], 1)
    lora = tmp_path / "q.safetensors"
    save_file({f"{Q_NAME}.lora_down.weight": down, f"{Q_NAME}.lora_up.weight": up,
               f"{Q_NAME}.alpha": torch.tensor(1.0)}, str(lora))
    out = tmp_path / "unet_merged.safetensors"
    merge_lora(p, [(lora, 1.0)], out, progress=False, log=lambda s: None)
    assert torch.allclose(load_file(str(out))[Q_KEY], unet_only[Q_KEY] + 1.0)
