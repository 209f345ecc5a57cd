"""The tiny kit end to end on the reduced recipe: diffusers folders load offline and run, the teacher learned,
the cache is stamped, reused, and rebuilt when stale or incomplete."""

from __future__ import annotations

import json

import pytest
import torch

from sd_scripts_surge.tiny.__main__ import main as tiny_main
from sd_scripts_surge.tiny.kit import (
    QUICK_RECIPE,
    STAMP_NAME,
    KitRecipe,
    PromptEncoder,
    default_cache_dir,
    denoising_mse,
    deterministic,
    encode_latents,
    ensure_tiny_kit,
    init_vae_as_pixel_codec,
    kit_is_valid,
    load_image_tensor,
    load_tokenizers,
    recipe_hash,
    rescale_vae_latents,
    sdxl_noise_schedule,
)
from tests.tiny_fixtures import tiny_kit  # noqa: F401  (session fixture)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler")


def test_kit_layout(tiny_kit):  # noqa: F811
    for folder in (tiny_kit.base_dir, tiny_kit.teacher_dir):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        for name in COMPONENTS:
            assert (folder / name).is_dir(), name
    assert tiny_kit.student_dir == tiny_kit.base_dir
    assert (tiny_kit.train_data_dir / "10_shapes").is_dir() and tiny_kit.dataset_toml.is_file()
    assert tiny_kit.prompts_file.read_text().strip()
    assert kit_is_valid(tiny_kit.root, QUICK_RECIPE)
    # the TOML points at the final location, not at the staging directory it was built in
    assert str(tiny_kit.train_data_dir) in tiny_kit.dataset_toml.read_text()


def test_pipeline_loads_offline_and_generates(tiny_kit):  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_kit.teacher_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = tiny_kit.prompts_file.read_text().splitlines()[0]
    with deterministic():
        images = [
            pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
            for _ in range(2)
        ]
    assert images[0].shape == (1, 64, 64, 3) and (images[0] == images[1]).all()
    assert 0 <= images[0].min() and images[0].max() <= 1 and images[0].std() > 0


def test_scheduler_is_sdxl_ddpm_schedule(tiny_kit):  # noqa: F811
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_pretrained(str(tiny_kit.base_dir), subfolder="scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.num_train_timesteps == 1000
    assert torch.allclose(scheduler.alphas_cumprod, sdxl_noise_schedule(), atol=1e-6)


def _load(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return (
        UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval(),
        AutoencoderKL.from_pretrained(str(folder / "vae")).eval(),
        CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval(),
        CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")).eval(),
    )


def test_teacher_learned_more_than_base(tiny_kit):  # noqa: F811
    """Recompute held-out denoising MSE from the saved folders: teacher clearly below base, and the stamp agrees."""
    base_unet, vae, te1, te2 = _load(tiny_kit.base_dir)
    teacher_unet = _load(tiny_kit.teacher_dir)[0]
    encode = PromptEncoder(*load_tokenizers(tiny_kit.tokenizer_dir, tiny_kit.tokenizer_2_dir), te1, te2)
    pngs = sorted(tiny_kit.eval_dir.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    with deterministic():  # the build measured on one thread; same here, so the numbers match the stamp
        latents = encode_latents(vae, [load_image_tensor(p) for p in pngs])
        steps = QUICK_RECIPE.eval_timesteps
        base = denoising_mse(base_unet, latents, captions, encode, num_timesteps=steps)
        teacher = denoising_mse(teacher_unet, latents, captions, encode, num_timesteps=steps)
    assert teacher < 0.8 * base, (teacher, base)
    assert base == pytest.approx(tiny_kit.metrics["base_eval_mse"], rel=1e-3)
    assert teacher == pytest.approx(tiny_kit.metrics["teacher_eval_mse"], rel=1e-3)
    # the base and teacher differ only in the UNet
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a = (tiny_kit.base_dir / name / "config.json").read_text()
        assert a == (tiny_kit.teacher_dir / name / "config.json").read_text()


def test_vae_rescale_keeps_decoding_and_gives_unit_latents(tiny_kit):  # noqa: F811
    vae = _load(tiny_kit.base_dir)[1]
    images = [load_image_tensor(p) for p in sorted(tiny_kit.eval_dir.glob("*.png"))]
    with torch.no_grad(), deterministic():
        before = vae.decode(vae.encode(images[0][None]).latent_dist.mean).sample
        c = rescale_vae_latents(vae, images)  # already rescaled on the training set: c close to 1 here
        after = vae.decode(vae.encode(images[0][None]).latent_dist.mean).sample
    assert torch.allclose(before, after, atol=1e-4)
    assert 0.5 < c < 2.0
    with deterministic():
        latents = torch.cat([z.flatten() for z in encode_latents(vae, images)])
    assert latents.std() == pytest.approx(1.0, rel=0.05)


def test_pixel_codec_vae_is_average_pool_and_nearest_upsample():
    import torch.nn.functional as F

    from sd_scripts_surge.tiny.architecture import build_tiny_vae

    vae = build_tiny_vae(0).eval()
    init_vae_as_pixel_codec(vae)
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad(), deterministic():
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.mean).sample
    pooled = F.avg_pool2d(images, 8)
    assert torch.allclose(posterior.mean[:, :3], pooled, atol=5e-3)
    assert torch.allclose(posterior.mean[:, 3], pooled.mean(dim=1), atol=5e-3)
    assert posterior.std.max() < 1e-2
    assert torch.allclose(decoded, F.interpolate(pooled, scale_factor=8, mode="nearest"), atol=1e-2)


def test_kit_vae_reconstructs_dataset_images(tiny_kit):  # noqa: F811
    vae = _load(tiny_kit.base_dir)[1]
    images = torch.stack([load_image_tensor(p) for p in sorted(tiny_kit.eval_dir.glob("*.png"))])
    with torch.no_grad(), deterministic():
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample
    assert (decoded - images).abs().mean() < 0.08  # blocky, but colours and places are right
    assert tiny_kit.metrics["vae_eval_mae"] == pytest.approx(float((decoded - images).abs().mean()), rel=1e-3)


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path, tiny_kit):  # noqa: F811
    recipe = QUICK_RECIPE
    root = tmp_path / "kit"
    # a copy of the built kit stands in for a cache (building another one would be slow)
    import shutil

    shutil.copytree(tiny_kit.root, root)
    assert kit_is_valid(root, recipe)
    stamp = json.loads((root / STAMP_NAME).read_text())
    assert stamp["recipe_hash"] == recipe_hash(recipe)
    assert not kit_is_valid(root, KitRecipe(**{**stamp["recipe"], "teacher_steps": recipe.teacher_steps + 1}))
    # a missing file or a truncated one makes the cache invalid
    victim = root / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:100])
    assert not kit_is_valid(root, recipe)
    victim.write_bytes(data)
    assert kit_is_valid(root, recipe)
    (root / STAMP_NAME).unlink()  # a half-written kit has no stamp
    assert not kit_is_valid(root, recipe)


def test_ensure_reuses_valid_kit_without_building(tiny_kit, monkeypatch):  # noqa: F811
    import sd_scripts_surge.tiny.kit as kit

    def no_build(*args, **kwargs):
        raise AssertionError("a valid kit must not be rebuilt")

    monkeypatch.setattr(kit, "build_kit", no_build)
    paths = ensure_tiny_kit(tiny_kit.root, recipe=QUICK_RECIPE, progress=False)
    assert paths.teacher_dir == tiny_kit.teacher_dir
    assert paths.metrics["teacher_eval_mse"] == tiny_kit.metrics["teacher_eval_mse"]


def test_failed_build_leaves_no_kit(tmp_path, monkeypatch):
    import sd_scripts_surge.tiny.kit as kit

    def broken_build(root, *args, **kwargs):
        (root / "base").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(kit, "build_kit", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_kit(tmp_path / "kit", recipe=QUICK_RECIPE, progress=False)
    assert not (tmp_path / "kit").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_foreign_directory_is_never_replaced(tmp_path):
    (tmp_path / "my_model.safetensors").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not part of a tiny kit"):
        ensure_tiny_kit(tmp_path, recipe=QUICK_RECIPE, progress=False)
    assert (tmp_path / "my_model.safetensors").read_bytes() == b"precious"


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SURGE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tiny-v1"
    monkeypatch.delenv("SURGE_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "sd-scripts-surge", "tiny-v1")


def test_cli_info(tiny_kit, capsys):  # noqa: F811
    assert tiny_main(["info", "--quick", "--cache_dir", str(tiny_kit.root)]) == 0
    out = capsys.readouterr().out
    assert "status: valid" in out and "teacher_eval_mse" in out
    assert tiny_main(["info", "--cache_dir", str(tiny_kit.root)]) == 1  # the full recipe is not built there


@pytest.mark.slow
def test_rebuild_gives_identical_bytes(tmp_path, tiny_kit):  # noqa: F811
    """Same recipe, same torch build → the same files, byte for byte (a second reduced build, ~30 s)."""
    import hashlib

    again = ensure_tiny_kit(tmp_path / "again", recipe=QUICK_RECIPE, progress=False)

    def digests(root):
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (STAMP_NAME, "dataset.toml")  # the TOML holds absolute paths
        }

    assert digests(again.root) == digests(tiny_kit.root)


def test_cli_build_reuses_valid_kit(tiny_kit, capsys):  # noqa: F811
    stamp_before = tiny_kit.stamp_file.read_bytes()
    assert tiny_main(["build", "--quick", "--quiet", "--cache_dir", str(tiny_kit.root)]) == 0
    assert str(tiny_kit.teacher_dir) in capsys.readouterr().out
    assert tiny_kit.stamp_file.read_bytes() == stamp_before  # nothing was rebuilt
