"""sd-merge convert: dtype casts streamed, pickles only on opt-in and only tensors, single file ↔ diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_tools.cli import main as sd_merge
from merge_tools.convert import convert
from sd_scripts_surge.models import io
from sd_scripts_surge.models.fileio import CheckpointError
from tests.test_models_io import tiny_sdxl


def test_dtype_cast_is_streamed_and_keeps_metadata(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    save_file({"w": torch.randn(8, 8), "ids": torch.arange(4)}, str(src), metadata={"ss_output_name": "a"})
    out = tmp_path / "a16.safetensors"
    assert sd_merge(["convert", str(src), "-o", str(out), "--dtype", "fp16"]) == 0
    got, want = load_file(str(out)), load_file(str(src))
    assert got["w"].dtype == torch.float16 and torch.equal(got["w"], want["w"].half())
    assert torch.equal(got["ids"], want["ids"])  # integers untouched
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_output_name"] == "a"
    assert sd_merge(["convert", str(src), "-o", str(src)]) == 2  # never over the input


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - what a malicious checkpoint does
        return (Path.touch, (Path(__file__).parent / "PWNED",))


def test_pickles_need_opt_in_and_load_only_tensors(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, ckpt)
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert(ckpt, out)
    assert "pickle → safetensors: 1 tensors" in convert(ckpt, out, allow_pickle=True, dtype="bf16")
    assert load_file(str(out))["w"].dtype == torch.bfloat16
    evil = tmp_path / "evil.ckpt"
    torch.save({"w": torch.ones(1), "x": _Evil()}, evil)
    marker = Path(__file__).parent / "PWNED"
    with pytest.raises(CheckpointError, match="weights_only"):
        convert(evil, tmp_path / "e.safetensors", allow_pickle=True)
    assert not marker.exists() and not (tmp_path / "e.safetensors").exists()


def test_single_file_to_diffusers_and_back(tmp_path: Path) -> None:
    bundle = tiny_sdxl(0)
    single = io.save_single_file(bundle, tmp_path / "m.safetensors", precision="float")
    folder = tmp_path / "m_diffusers"
    assert "diffusers folder" in convert(single, folder)
    assert (folder / "unet" / "config.json").exists() and (folder / "model_index.json").exists()
    back = tmp_path / "back.safetensors"
    convert(folder, back, to="single")
    a, b = load_file(str(single)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_layout_change_keeps_dtype_and_matches_the_loader(tmp_path: Path) -> None:
    """single fp16 → diffusers (streamed UNet, per-component TEs/VAE): same tensors as the checked loader."""
    bundle = tiny_sdxl(1)
    single = io.save_single_file(bundle, tmp_path / "m16.safetensors", precision="fp16")
    folder = tmp_path / "m16_diffusers"
    convert(single, folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert {t.dtype for t in load_file(str(unet_file)).values()} == {torch.float16}  # kept, not widened
    via_loader = io.load_model(single, dtype=torch.float16)
    streamed = io.load_model(folder, dtype=torch.float16)
    for name, module in via_loader.modules().items():
        want, got = module.state_dict(), streamed.modules()[name].state_dict()
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    back = tmp_path / "back_bf16.safetensors"
    convert(folder, back, dtype="bf16")
    a = load_file(str(back))
    assert {v.dtype for v in a.values() if v.is_floating_point()} == {torch.bfloat16}
    ref = io.bundle_to_ldm_state_dict(via_loader, "bf16")
    assert set(a) == set(ref) and all(torch.equal(a[k], ref[k]) for k in ref)


def test_layout_change_refuses_bad_inputs_and_leaves_nothing(tmp_path: Path) -> None:
    single = io.save_single_file(tiny_sdxl(0), tmp_path / "m.safetensors", precision="float")
    tensors = load_file(str(single))
    key = next(k for k in tensors if k.startswith("model.diffusion_model.output_blocks."))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(CheckpointError, match="NaN"):
        convert(bad, tmp_path / "nan_diffusers")
    assert not (tmp_path / "nan_diffusers").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nan_diffusers")]  # temp folder removed
    wrong = dict(load_file(str(single)))
    wrong[key] = torch.zeros(3)
    save_file(wrong, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=key.split(".")[-1]):
        convert(tmp_path / "shape.safetensors", tmp_path / "shape_diffusers")
    assert not (tmp_path / "shape_diffusers").exists()
