"""AutoMBW: the search finds a known best block-weight vector, resumes from its SQLite study, writes a
recipe and plots; custom rewards plug in."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tools.autombw import autombw, block_groups
from merge_tools.cli import main as sd_merge
from merge_tools.engine import MergeOptions, merge
from merge_tools.recipe import load_recipe, single_method
from sd_scripts_surge.models import io
from sd_scripts_surge.models.keymap import SDXL_BLOCKS, Architecture
from tests.test_models_io import tiny_sdxl

TARGET = {"BASE": 0.2, "IN": 0.8, "M": 0.5, "OUT": 0.3}


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("autombw")
    a = io.save_single_file(tiny_sdxl(0), tmp / "a.safetensors", precision="float")
    b = io.save_single_file(tiny_sdxl(5), tmp / "b.safetensors", precision="float")
    arch = Architecture("sdxl", "ldm", SDXL_BLOCKS)
    alpha = {blk: TARGET[d] for d, blocks in block_groups(arch, "coarse").items() for blk in blocks}
    ref = tmp / "ref.safetensors"
    merge(single_method("weighted_pair", [str(a), str(b)], {"alpha": alpha}), ref,
          MergeOptions(progress=False, log=lambda s: None, output_dtype="fp32"))
    recipe = tmp / "recipe.toml"
    recipe.write_text(f'[models]\na = "{a}"\nb = "{b}"\n[nodes.mix]\nmethod = "weighted_pair"\n'
                      'inputs = ["a", "b"]\nalpha = 0.5\n')
    return {"a": a, "b": b, "ref": ref, "recipe": recipe, "dir": tmp}


@pytest.mark.slow
def test_search_finds_the_known_best_block_weights_and_resumes(problem: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "best.toml"
    first = autombw(problem["recipe"], out, reference=problem["ref"], trials=20, groups="coarse", seed=1,
                    progress=False, log=lambda s: None)
    result = autombw(problem["recipe"], out, reference=problem["ref"], trials=45, groups="coarse", seed=1,
                     plots=tmp_path / "plots", progress=False, log=lambda s: None)
    assert result.trials == 45  # the first 20 were reused from the SQLite study, not run again
    assert result.best_value >= first.best_value
    # IN and OUT move the probes' prediction ~1000x more than M and BASE (measured: −0.08 vs −1e-4 for a
    # 0.1 step), so those two are what a probe reward can pin down within this budget
    for d in ("IN", "OUT"):
        blocks = [b for b in SDXL_BLOCKS if b.rstrip("0123456789") == d]
        assert all(abs(result.best_weights[b] - TARGET[d]) < 0.1 for b in blocks), (d, result.best_weights)
    assert result.best_value > -0.02
    data = tomllib.loads(out.read_text())
    assert data["nodes"]["mix"]["alpha"]["IN04"] == pytest.approx(result.best_weights["IN04"])
    load_recipe(out)  # the written recipe is a valid recipe
    assert (tmp_path / "plots" / "objective.png").stat().st_size > 0
    assert (tmp_path / "plots" / "importance.png").stat().st_size > 0


def test_search_recovers_every_weight_of_a_well_conditioned_reward(problem: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging zeros with ones makes each block's tensors equal to its weight: a reward with a known optimum."""
    zeros = {k: torch.zeros_like(v) for k, v in load_file(str(problem["a"])).items()}
    ones = {k: torch.ones_like(v) for k, v in zeros.items()}
    save_file(zeros, str(tmp_path / "zeros.safetensors"))
    save_file(ones, str(tmp_path / "ones.safetensors"))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[models]\na = "zeros.safetensors"\nb = "ones.safetensors"\n[nodes.mix]\n'
                      'method = "weighted_pair"\ninputs = ["a", "b"]\n')
    (tmp_path / "known_best.py").write_text(
        "from safetensors import safe_open\n"
        f"TARGET = {TARGET!r}\n"
        "U = 'model.diffusion_model.'\n"
        "KEYS = {'BASE': U + 'time_embed.0.weight', 'IN': U + 'input_blocks.4.1.proj_in.weight',\n"
        "        'M': U + 'middle_block.1.proj_in.weight', 'OUT': U + 'output_blocks.2.0.in_layers.2.weight'}\n"
        "def score(path):\n"
        "    with safe_open(str(path), 'pt') as f:\n"
        "        return -sum((float(f.get_tensor(k).double().mean()) - TARGET[g]) ** 2 for g, k in KEYS.items())\n"
    )
    monkeypatch.chdir(tmp_path)
    result = autombw(recipe, tmp_path / "best.toml", reward_fn="known_best:score", trials=40, groups="coarse",
                     seed=0, progress=False, log=lambda s: None)
    probe_block = {"BASE": "BASE", "IN": "IN04", "M": "M00", "OUT": "OUT02"}
    for d, want in TARGET.items():
        assert abs(result.best_weights[probe_block[d]] - want) < 0.1, (d, result.best_weights)


def test_custom_reward_function(problem: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_reward.py").write_text(
        "from safetensors import safe_open\n"
        "KEY = 'model.diffusion_model.out.2.weight'\n"
        "def score(path):\n"
        "    with safe_open(str(path), 'pt') as f:\n"
        "        return -float(f.get_tensor(KEY).abs().mean())\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "best.toml"
    assert sd_merge(["autombw", str(problem["recipe"]), "-o", str(out), "--reward-fn", "my_reward:score",
                     "--trials", "6", "--groups", "coarse", "--no-progress"]) == 0
    assert "alpha" in tomllib.loads(out.read_text())["nodes"]["mix"]


def test_clear_errors(problem: dict[str, Path], tmp_path: Path) -> None:
    out = str(tmp_path / "x.toml")
    assert sd_merge(["autombw", str(problem["recipe"]), "-o", out, "--no-progress"]) == 2  # no reward given
    assert sd_merge(["autombw", str(problem["recipe"]), "-o", out, "--reward-fn", "nope", "--no-progress"]) == 2
    assert sd_merge(["autombw", str(problem["recipe"]), "-o", out, "--reference", str(problem["ref"]),
                     "--param", "beta", "--no-progress"]) == 2
