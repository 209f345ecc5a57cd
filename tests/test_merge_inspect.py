"""sd-merge inspect: per-block cosine / L2 / sign conflicts, pinned to hand-computed values; JSON, PNGs, outliers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merge_tools.cli import main
from merge_tools.diagnostics import ALL, inspect_models, mds_2d, outliers

# SD1 ldm keys of four MBW blocks (IN01, IN11, M00, OUT11) and one outside every block
KEYS = {
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (8, 4, 3, 3),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.bias": (40,),
    "model.diffusion_model.middle_block.1.proj_in.weight": (16, 16),
    "model.diffusion_model.output_blocks.11.0.out_layers.3.bias": (300,),
    "first_stage_model.decoder.conv_out.bias": (3,),
}


def write_models(tmp: Path, n: int, outlier: int | None = None, nan: bool = True) -> tuple[Path, list[Path], dict]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in KEYS.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in KEYS.items()}
    base_path = tmp / "base.safetensors"
    save_file(base, str(base_path))
    paths, tensors = [], []
    for i in range(n):
        scale = 5.0 if i == outlier else 1.0
        sd = {k: base[k] + 0.1 * shared[k] + 0.05 * scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if i == 1 and nan:
            sd[next(iter(KEYS))].view(-1)[0] = float("nan")
        p = tmp / f"model{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
        tensors.append(sd)
    return base_path, paths, {"base": base, "models": tensors}


def flat(sd: dict, keys) -> torch.Tensor:
    return torch.cat([sd[k].double().reshape(-1).nan_to_num(0.0) for k in keys])


def test_numbers_match_a_direct_computation(tmp_path: Path):
    base_path, paths, raw = write_models(tmp_path, 3)
    report = inspect_models(paths, base_path, chunk_elements=50, progress=False)  # many chunks per tensor
    assert report["architecture"] == "sd1" and report["models"] == [str(p) for p in paths]
    assert set(report["blocks"]) == {"BASE", "IN01", "IN11", "M00", "OUT11", ALL}  # BASE: keys outside the UNet
    for block, keys in (("M00", [list(KEYS)[2]]), (ALL, list(KEYS))):
        deltas = [flat(m, keys) - flat(raw["base"], keys) for m in raw["models"]]
        got = report["blocks"][block]
        for i in range(3):
            for j in range(3):
                cos = float(torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=0))
                assert got["cosine"][i][j] == pytest.approx(cos, abs=1e-6)
                assert got["l2"][i][j] == pytest.approx(float((deltas[i] - deltas[j]).norm()), abs=1e-5)
                si, sj = torch.sign(deltas[i]), torch.sign(deltas[j])
                both = (si != 0) & (sj != 0)
                assert got["sign_conflict"][i][j] == pytest.approx(float((si * sj < 0).sum() / both.sum()), abs=1e-6)
    assert report["blocks"]["IN01"]["nonfinite"] == [0, 1, 0]  # the NaN is counted, where it is
    # without a base the reference is the mean of the models
    mean_ref = inspect_models(paths, None, progress=False)
    assert mean_ref["reference"] == "mean of the models"
    keys = list(KEYS)
    mean = sum(flat(m, keys) for m in raw["models"]) / 3
    expected = float((flat(raw["models"][0], keys) - mean).norm())
    assert mean_ref["blocks"][ALL]["delta_norm"][0] == pytest.approx(expected, abs=1e-5)


def test_outlier_is_found_and_the_map_separates_it(tmp_path: Path):
    base_path, paths, _ = write_models(tmp_path, 6, outlier=4, nan=False)
    report = inspect_models(paths, base_path, progress=False)
    assert report["outliers"] == [4]
    points = mds_2d(report["blocks"][ALL]["l2"])
    d = np.asarray(report["blocks"][ALL]["l2"])
    embedded = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
    assert np.corrcoef(d.ravel(), embedded.ravel())[0, 1] > 0.95
    assert outliers([[0, 1], [1, 0]]) == []


def test_cli_writes_json_and_pictures(tmp_path: Path, capsys):
    base_path, paths, _ = write_models(tmp_path, 3)
    out_json, out_dir = tmp_path / "report.json", tmp_path / "pictures"
    assert main(["inspect", *map(str, paths), "--base", str(base_path), "--json", str(out_json), "--out",
                 str(out_dir), "--no-progress"]) == 0
    data = json.loads(out_json.read_text())
    assert data["models"] == [str(p) for p in paths]
    assert len(data["blocks"]["M00"]["cosine"]) == 3 and len(data["blocks"]["M00"]["l2"][0]) == 3
    for name in ("cosine_blocks.png", "cosine_all.png", "l2_all.png", "model_map.png"):
        assert (out_dir / name).stat().st_size > 1000
    assert "mean cos" in capsys.readouterr().out
    assert main(["inspect", str(paths[0]), "--no-progress"]) == 2  # one model is not a set
