import torch

from sd_scripts_surge.tiny.architecture import (
    TINY_CONTEXT_DIM,
    TINY_TE2_PROJECTION,
    build_tiny_unet,
    build_tiny_vae,
)
from sd_scripts_surge.training.sampling import contact_sheet, decode_to_images, generate_latents, sdxl_time_ids


def _encoder(prompts):
    # Deterministic fake conditioning that differs per prompt: enough to exercise the UNet call path.
    rows = [torch.full((77, TINY_CONTEXT_DIM), float(len(p)) / 10) for p in prompts]
    pooled = torch.stack([torch.full((TINY_TE2_PROJECTION,), float(len(p)) / 10) for p in prompts])
    return torch.stack(rows), pooled


def test_time_ids_are_sdxl_layout():
    ids = sdxl_time_ids(64, 48, 2, torch.device("cpu"), torch.float32)
    assert ids.tolist() == [[64, 48, 0, 0, 64, 48]] * 2


def test_generation_is_seeded_and_decodes(tmp_path):
    unet, vae = build_tiny_unet(0).eval(), build_tiny_vae(0).eval()
    a = generate_latents(unet, _encoder, ["a red circle", "b"], height=64, width=64, steps=2, seed=3)
    b = generate_latents(unet, _encoder, ["a red circle", "b"], height=64, width=64, steps=2, seed=3)
    c = generate_latents(unet, _encoder, ["a red circle", "b"], height=64, width=64, steps=2, seed=4)
    assert a.shape == (2, 4, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    images = decode_to_images(vae, a)
    assert images[0].size == (64, 64)
    sheet = contact_sheet({"teacher": images, "student": images}, tmp_path / "sheet.png", cell=32)
    assert sheet.exists()
