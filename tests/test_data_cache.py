"""Latent and text-embedding caches with the tiny SDXL-architecture VAE, text encoders and tokenizers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from sd_scripts_surge.data import (
    TextEmbeddingCache,
    build_dataset,
    encode_pixels,
    encode_prompts_sdxl,
    latent_cache_path,
    load_bucket_image,
    to_pixels,
)
from sd_scripts_surge.dataset_config import dataset_config_from_folder
from sd_scripts_surge.tiny.architecture import build_tiny_text_encoders, build_tiny_vae
from sd_scripts_surge.tiny.tokenizer import EOS_TOKEN, TE2_PAD_TOKEN, build_tokenizer


@pytest.fixture(scope="module")
def vae():
    return build_tiny_vae(0).eval()


@pytest.fixture(scope="module")
def text_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    tok1 = CLIPTokenizer.from_pretrained(str(build_tokenizer(root / "t1", pad_token=EOS_TOKEN)))
    tok2 = CLIPTokenizer.from_pretrained(str(build_tokenizer(root / "t2", pad_token=TE2_PAD_TOKEN)))
    te1, te2 = build_tiny_text_encoders(0)
    return (tok1, tok2), (te1.eval(), te2.eval())


def make_images(root: Path, flip: bool = False) -> list:
    folder = root / "2_shapes"
    folder.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (64, 48), (200, 100)]):
        Image.new("RGB", size, (40 * i, 200, 90)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"shape {i}, green")
    return dataset_config_from_folder(root, resolution=64, enable_bucket=True, min_bucket_reso=32,
                                      max_bucket_reso=128, bucket_reso_steps=16, caption_extension=".txt",
                                      flip_aug=flip)


def test_latents_are_scaled_vae_modes_in_bucket_shape(tmp_path, vae):
    data = build_dataset(datasets=make_images(tmp_path))
    counts = data.cache_latents(vae, progress=False)
    assert counts == {"encoded": 3, "reused": 0, "skipped": 0}
    for record in data.records:
        w, h = record.bucket
        assert record.latents.shape == (4, h // 8, w // 8)
        image = load_bucket_image(record.path, record.resized_size, record.crop_top_left, record.bucket)
        with torch.no_grad():
            expected = vae.encode(to_pixels([image])).latent_dist.mode()[0] * 0.13025
        torch.testing.assert_close(record.latents, expected)
    batch = data.get_batch([0, 1], epoch=0)
    assert batch.latents.shape[0] == 2 and batch.pixels is None


def test_disk_cache_reused_then_rebuilt_when_corrupt_or_stale(tmp_path, vae, caplog):
    datasets = make_images(tmp_path)
    first = build_dataset(datasets=datasets)
    assert first.cache_latents(vae, to_disk=True, progress=False)["encoded"] == 3
    paths = [latent_cache_path(r) for r in first.records]
    assert all(p.is_file() and p.parent == r.path.parent for p, r in zip(paths, first.records))
    assert paths[1].name == "img1_0064x0064_surge.npz"

    second = build_dataset(datasets=datasets)
    assert second.cache_latents(vae, to_disk=True, progress=False) == {"encoded": 0, "reused": 3, "skipped": 0}
    for a, b in zip(first.records, second.records):
        assert torch.equal(a.latents, b.latents)

    paths[0].write_bytes(b"PK\x03\x04 definitely not a zip")  # corrupt
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="sd_scripts_surge.data"):
        third = build_dataset(datasets=datasets)
        assert third.cache_latents(vae, to_disk=True, progress=False) == {"encoded": 2, "reused": 1, "skipped": 0}
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    for a, b in zip(first.records, third.records):
        torch.testing.assert_close(a.latents, b.latents)

    other_vae = build_tiny_vae(1).eval()  # a different VAE: every cache is stale
    fourth = build_dataset(datasets=datasets)
    assert fourth.cache_latents(other_vae, to_disk=True, progress=False)["encoded"] == 3

    image = first.records[2].path  # an edited image invalidates its own cache only
    Image.new("RGB", (200, 100), (1, 2, 3)).save(image)
    os.utime(image, ns=(1, 1))
    fifth = build_dataset(datasets=datasets)
    assert fifth.cache_latents(other_vae, to_disk=True, progress=False) == {"encoded": 1, "reused": 2, "skipped": 0}


def test_cache_dir_keeps_the_image_folder_clean(tmp_path, vae):
    datasets = make_images(tmp_path / "img")
    data = build_dataset(datasets=datasets)
    data.cache_latents(vae, to_disk=True, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("*_surge.npz"))) == 3
    assert not list((tmp_path / "img").rglob("*.npz"))


def test_image_that_fails_to_decode_at_caching_is_skipped(tmp_path, vae):
    datasets = make_images(tmp_path)
    data = build_dataset(datasets=datasets)
    data.records[0].path.write_bytes(b"gone bad after the scan")
    counts = data.cache_latents(vae, progress=False)
    assert counts["skipped"] == 1 and len(data.records) == 2 and len(data) == 4
    assert len(data.skipped) == 1
    assert sorted(i for b in data.make_sampler() for i in b) == list(range(4))


def test_flip_aug_caches_flipped_latents_and_mirrors_the_crop(tmp_path, vae):
    datasets = make_images(tmp_path, flip=True)
    asymmetric = Image.new("RGB", (64, 48), (0, 0, 0))
    asymmetric.paste((255, 255, 255), (0, 0, 20, 48))  # white on the left only: flipping changes it
    asymmetric.save(tmp_path / "2_shapes" / "img1.png")
    data = build_dataset(datasets=datasets, seed=2)
    data.cache_latents(vae, progress=False)
    record = next(r for r in data.records if r.original_size == (64, 48))
    assert record.latents_flipped is not None and not torch.equal(record.latents, record.latents_flipped)
    assert record.flipped_crop_top_left() == (0, 85 - 10 - 64)
    entry = data.entries.index(data.records.index(record))
    time_left = {float(data.get_batch([entry], epoch).time_ids[0, 3]) for epoch in range(12)}
    assert time_left == {10.0, 11.0}  # both orientations are used over the epochs


def test_sdxl_text_embeddings_shapes_and_values(text_stack):
    tokenizers, encoders = text_stack
    context, pooled = encode_prompts_sdxl(["a red circle", "green square, small"], tokenizers, encoders)
    te1, te2 = encoders
    assert context.shape == (2, tokenizers[0].model_max_length,
                             te1.config.hidden_size + te2.config.hidden_size)
    assert pooled.shape == (2, te2.config.projection_dim)
    ids = tokenizers[0](["a red circle"], padding="max_length", max_length=tokenizers[0].model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        penultimate = te1(ids, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(context[0, :, : te1.config.hidden_size], penultimate)


def test_text_embedding_cache_memory_and_disk(tmp_path, text_stack):
    tokenizers, encoders = text_stack
    cache = TextEmbeddingCache(tokenizers, encoders, cache_dir=tmp_path)
    context, pooled = cache(["a", "b", "a"])
    assert cache.encoded == 2 and torch.equal(context[0], context[2])
    cache(["b"])
    assert cache.encoded == 2
    again = TextEmbeddingCache(tokenizers, encoders, cache_dir=tmp_path)
    context2, pooled2 = again(["a", "b", "a"])
    assert again.encoded == 0
    torch.testing.assert_close(context2, context)
    torch.testing.assert_close(pooled2, pooled)
    next(tmp_path.glob("te_*.npz")).write_bytes(b"broken")
    third = TextEmbeddingCache(tokenizers, encoders, cache_dir=tmp_path)
    third(["a", "b"])
    assert third.encoded == 1


def test_dataset_text_cache_fills_batches(tmp_path, vae, text_stack):
    tokenizers, encoders = text_stack
    data = build_dataset(datasets=make_images(tmp_path))
    data.cache_latents(vae, progress=False)
    cache = data.cache_text_embeddings(tokenizers, encoders, progress=False)
    assert cache.encoded == 3  # the three fixed captions, once each
    batch = next(data.iterate(data.make_sampler()))
    assert batch.context.shape[0] == batch.latents.shape[0] == batch.pooled.shape[0]
    assert set(batch.added_cond) == {"text_embeds", "time_ids"}
    assert cache.encoded == 3  # served from the cache


def test_encode_pixels_uses_the_vae_scaling_factor(vae):
    pixels = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(encode_pixels(vae, pixels), raw * vae.config.scaling_factor)
    torch.testing.assert_close(encode_pixels(vae, pixels, scaling_factor=1.0), raw)


def test_non_finite_latents_are_an_error_not_a_cache(tmp_path):
    broken = build_tiny_vae(0).eval()
    with torch.no_grad():
        broken.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    data = build_dataset(datasets=make_images(tmp_path))
    with pytest.raises(ValueError, match="no_half_vae"):
        data.cache_latents(broken, to_disk=True, progress=False)
    assert not list(tmp_path.rglob("*.npz"))
