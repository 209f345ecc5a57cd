"""AutoMBW's CLIP reward: the checkpoint renders the prompts, a local CLIP model scores them (formula checked),
the same trial scores the same, different models score differently, and a search runs on it end to end."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from merge_tools.autombw import ClipScoreReward, autombw
from merge_tools.cli import main as sd_merge
from sd_scripts_surge.models import io
from tests.tiny_fixtures import tiny_kit  # noqa: F401

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def clip_dir(tiny_kit, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A tiny CLIP model folder as transformers writes one (weights, config, tokenizer, image preprocessor)."""
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_kit.tokenizer_dir), local_files_only=True)
    torch.manual_seed(0)
    vocab = max(len(tokenizer), *(i + 1 for i in (tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                 tokenizer.bos_token_id) if i is not None))
    config = CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def test_clip_score_formula_and_determinism(tiny_kit, clip_dir: Path) -> None:  # noqa: F811
    reward = ClipScoreReward(clip_dir, PROMPTS, steps=2, size=32, seed=3)
    images = reward.render(tiny_kit.base_dir)
    assert len(images) == 2 and images[0].size == (32, 32)
    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    pixels = CLIPImageProcessor.from_pretrained(str(clip_dir))(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        t = clip.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        v = clip.get_image_features(pixel_values=pixels)
    t = t if torch.is_tensor(t) else t.pooler_output
    v = v if torch.is_tensor(v) else v.pooler_output
    cos = torch.nn.functional.cosine_similarity(t, v, dim=-1)
    expected = float(100 * cos.mean())
    assert reward.score_images(images) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    first = reward(tiny_kit.base_dir)
    assert math.isfinite(first) and -100 <= first <= 100
    assert reward(tiny_kit.base_dir) == first  # fixed seeds: a trial's score depends on its weights only
    plain = [Image.new("RGB", (32, 32), c) for c in ("white", "black")]
    assert reward.score_images(plain) != pytest.approx(reward.score_images(images))


def test_clip_reward_errors(tiny_kit, clip_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="not a transformers CLIP folder"):
        ClipScoreReward(tmp_path / "nowhere", PROMPTS)
    with pytest.raises(ValueError, match="at least one prompt"):
        ClipScoreReward(clip_dir, [])
    with pytest.raises(ValueError, match="multiple of 8"):
        ClipScoreReward(clip_dir, PROMPTS, size=30)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[models]\na = "a.safetensors"\n[nodes.m]\nmethod = "soup"\ninputs = ["a"]\n')
    assert sd_merge(["autombw", str(recipe), "-o", str(tmp_path / "o.toml"), "--clip-model", str(clip_dir),
                     "--no-progress"]) == 2  # no --prompts


@pytest.mark.slow
def test_search_on_the_clip_reward(tiny_kit, clip_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    base = io.save_single_file(io.load_model(tiny_kit.base_dir), tmp_path / "base.safetensors", precision="float")
    teacher = io.save_single_file(io.load_model(tiny_kit.teacher_dir), tmp_path / "teacher.safetensors",
                                  precision="float")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[models]\na = "{base}"\nb = "{teacher}"\n[nodes.mix]\nmethod = "weighted_pair"\n'
                      'inputs = ["a", "b"]\nalpha = 0.5\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one per line\n" + "\n".join(PROMPTS) + "\n")
    out = tmp_path / "best.toml"
    assert sd_merge(["autombw", str(recipe), "-o", str(out), "--clip-model", str(clip_dir), "--prompts",
                     str(prompts), "--tokenizer-dir", str(tiny_kit.base_dir), "--render-steps", "2",
                     "--render-size", "32", "--trials", "3", "--groups", "coarse", "--no-progress"]) == 0
    best = tomllib.loads(out.read_text())["nodes"]["mix"]["alpha"]
    assert isinstance(best, dict) and all(0.0 <= w <= 1.0 for w in best.values())
    with pytest.raises(ValueError, match="one reward"):
        autombw(recipe, tmp_path / "x.toml", reference=base, clip_model=clip_dir, prompts=PROMPTS)
