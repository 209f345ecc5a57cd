"""Latent and text-embedding caches, and the trainer's data (`build_train_data` → `TrainData`), with the tiny
SDXL-architecture UNet, VAE, text encoders and tokenizers: what the training loop's batch iterator yields
(flips, caption dropout, tag dropout), resume, probes and prompts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import CLIPTokenizer

from sd_scripts_surge.config import ConfigError, TrainConfig
from sd_scripts_surge.data import (
    TextEmbeddingCache,
    TrainData,
    build_dataset,
    build_train_data,
    encode_pixels,
    latent_cache_path,
    load_bucket_image,
    to_pixels,
)
from sd_scripts_surge.data.dataset_config import dataset_config_from_folder
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.models.text import encode_prompts_sdxl
from sd_scripts_surge.tiny.architecture import build_tiny_text_encoders, build_tiny_unet, build_tiny_vae
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


def test_kept_embedding_does_not_depend_on_its_companions(text_stack):
    """A caption's kept embedding is the same whether it was cached alone or with others (resume, warm caches)."""
    tokenizers, encoders = text_stack
    alone, with_others = TextEmbeddingCache(tokenizers, encoders), TextEmbeddingCache(tokenizers, encoders)
    context_a, pooled_a = alone(["a red circle"])
    context_b, pooled_b = with_others(["green square, small", "a red circle", "blue dot"])
    assert torch.equal(context_a[0], context_b[1]) and torch.equal(pooled_a[0], pooled_b[1])


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


def test_latents_are_encoded_in_same_bucket_chunks_matching_single_encodes(tmp_path, vae):
    folder = tmp_path / "1_x"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 64)] * 5 + [(200, 100)] * 3):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    datasets = dataset_config_from_folder(tmp_path, resolution=64, enable_bucket=True, min_bucket_reso=32,
                                          max_bucket_reso=128, bucket_reso_steps=16)
    data = build_dataset(datasets=datasets)
    counting = CountingVAE(vae)
    data.cache_latents(counting, progress=False, batch_size=4)
    assert sorted(counting.calls) == [1, 3, 4]  # 64x64: 4 + 1, 80x48: 3; never one call per image
    single = build_dataset(datasets=datasets)
    single.cache_latents(vae, progress=False, batch_size=1)
    for a, b in zip(data.records, single.records):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)


def test_cache_write_is_atomic(tmp_path, vae, monkeypatch):
    data = build_dataset(datasets=make_images(tmp_path))
    original = np.savez

    def failing_savez(file, **arrays):
        original(file, **arrays)
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        data.cache_latents(vae, to_disk=True, progress=False)
    assert not [p for p in tmp_path.rglob("*") if ".npz" in p.name]  # neither a partial cache nor a temporary


# --------------------------------------------------------------------------------------------- the trainer's data


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts `encode` calls and their batch sizes (the real VAE does the work)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.calls: list[int] = []

    def state_dict(self, *args, **kwargs):  # the wrapped VAE's keys: same fingerprint as the VAE itself
        return self.vae.state_dict(*args, **kwargs)

    def encode(self, pixels: torch.Tensor):
        self.calls.append(pixels.shape[0])
        return self.vae.encode(pixels)


@pytest.fixture(scope="module")
def bundle(text_stack) -> ModelBundle:
    (tok1, tok2), (te1, te2) = text_stack
    return ModelBundle("sdxl", build_tiny_unet(0), te1, build_tiny_vae(0).eval(), te2, tok1, tok2)


def noise_png(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_dataset(tmp_path: Path, images: dict[str, tuple[int, int]], *, repeats: int = 1, subset: str = "",
                  captions: dict[str, str] | None = None) -> Path:
    image_dir = tmp_path / "img"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(images.items()):
        noise_png(image_dir / name, size, seed=i)
    for name, text in (captions or {}).items():
        (image_dir / name).with_suffix(".txt").write_text(text)
    toml = tmp_path / "data.toml"
    toml.write_text(f"""[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
batch_size = 2
caption_extension = ".txt"

[[datasets]]
[[datasets.subsets]]
image_dir = "{image_dir.as_posix()}"
num_repeats = {repeats}
class_tokens = "sks dog"
{subset}
""")
    return toml


def build(toml: Path, bundle: ModelBundle, messages: list[str] | None = None, **cfg) -> TrainData:
    config = TrainConfig(**{"seed": 3, "output_dir": str(toml.parent / "out"), **cfg})
    log = messages.append if messages is not None else (lambda _m: None)
    return build_train_data(config, str(toml), None, bundle, Accelerator(cpu=True), log)


def epoch_batches(data: TrainData, epoch: int, skip: int = 0) -> list:
    data.sampler.set_epoch(epoch)
    return list(data.batches(skip=skip))


def test_flip_aug_is_applied_by_the_batch_iterator(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 48), "b.png": (64, 64)}, repeats=3, subset="flip_aug = true")
    data = build(toml, bundle)
    seen = set()
    for epoch in range(4):
        for batch in epoch_batches(data, epoch):
            for row, entry in enumerate(batch.indices):
                record = data.records[data.dataset.entries[entry]]
                flipped = data.dataset.flipped(entry, epoch)
                expected = record.latents_flipped if flipped else record.latents
                assert torch.equal(batch.latents[row], expected)
                crop = record.flipped_crop_top_left() if flipped else record.crop_top_left
                assert batch.added_cond["time_ids"][row, 2:4].tolist() == list(crop)
                seen.add(flipped)
    assert seen == {True, False}  # both orientations reach the training loop
    record = data.records[0]
    assert not torch.equal(record.latents, record.latents_flipped)
    torch.testing.assert_close(record.latents_flipped, encode_pixels(bundle.vae, to_pixels(
        [load_bucket_image(record.path, record.resized_size, record.crop_top_left, record.bucket)[:, ::-1].copy()]))[0])


def test_caption_dropout_is_applied_by_the_batch_iterator(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)}, subset="caption_dropout_rate = 1.0",
                         captions={"a.png": "red circle", "b.png": "blue square"})
    data = build(toml, bundle)
    empty_context, empty_pooled = data.encode_prompts([""])
    for batch in epoch_batches(data, 0):
        assert batch.captions == [""] * len(batch.indices)
        torch.testing.assert_close(batch.context, empty_context.expand_as(batch.context))
        torch.testing.assert_close(batch.pooled, empty_pooled.expand_as(batch.pooled))


def test_caption_dropout_every_n_epochs_is_applied_by_the_batch_iterator(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64)}, subset="caption_dropout_every_n_epochs = 2",
                         captions={"a.png": "red circle"})
    data = build(toml, bundle)
    captions = [[c for b in epoch_batches(data, e) for c in b.captions] for e in range(4)]
    assert captions == [["red circle"], [""], ["red circle"], [""]]


def test_tag_dropout_and_shuffle_are_applied_by_the_batch_iterator(tmp_path, bundle):
    tags = ", ".join(f"t{i}" for i in range(8))
    toml = write_dataset(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)}, repeats=2,
                         subset="keep_tokens = 1\nshuffle_caption = true\ncaption_tag_dropout_rate = 0.5",
                         captions={"a.png": f"sks, {tags}", "b.png": f"sks, {tags}"})
    data = build(toml, bundle)
    seen = []
    for epoch in range(3):
        for batch in epoch_batches(data, epoch):
            for caption, context in zip(batch.captions, batch.context):
                parts = caption.split(", ")
                assert parts[0] == "sks" and set(parts[1:]) <= {f"t{i}" for i in range(8)}
                assert len(parts) - 1 < 8  # with p = 0.5 per tag, 12 keeps-all in a row would be 1 in 2^96
                torch.testing.assert_close(context, data.encode_prompts([caption])[0][0])
                seen.append(caption)
    assert len(set(seen)) > 6


def test_varying_captions_are_not_kept_in_the_text_cache(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)}, repeats=2,
                         subset="shuffle_caption = true", captions={"a.png": "x, y, z, w", "b.png": "p, q, r, s"})
    data = build(toml, bundle)
    before = dict(data.text.memory)
    for epoch in range(3):
        epoch_batches(data, epoch)
    assert data.text.memory.keys() == before.keys() == set()  # the encoders are frozen; shuffled text is not kept
    fixed = write_dataset(tmp_path / "fixed", {"a.png": (64, 64)}, captions={"a.png": "x, y"},
                          subset='caption_prefix = "best,"')
    data = build(fixed, bundle)
    encoded = data.text.encoded
    epoch_batches(data, 0)
    assert set(data.text.memory) == {"best, x, y"} and data.text.encoded == encoded  # fixed caption: encoded once


def test_cache_text_encoder_outputs_refuses_captions_that_vary(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64)}, subset="shuffle_caption = true")
    with pytest.raises(ConfigError, match=r"subset #1 .*shuffle_caption.*cache_text_encoder_outputs"):
        build(toml, bundle, cache_text_encoder_outputs=True)
    fixed = write_dataset(tmp_path / "fixed", {"a.png": (64, 64)}, captions={"a.png": "red circle"})
    data = build(fixed, bundle, cache_text_encoder_outputs_to_disk=True)
    assert set(data.text.memory) == {"red circle"}
    assert len(list((fixed.parent / "out" / "text_encoder_cache").glob("te_*.npz"))) == 1


def test_color_aug_is_a_clear_error_in_the_trainer(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64)}, subset="color_aug = true")
    with pytest.raises(ConfigError, match=r"img\).*color_aug"):
        build(toml, bundle)


def test_resumed_batches_match_the_uninterrupted_ones(tmp_path, bundle):
    subset = "flip_aug = true\nshuffle_caption = true\nkeep_tokens = 1\ncaption_tag_dropout_rate = 0.3"
    images = {f"{i}.png": (64, 64) if i % 2 else (64, 48) for i in range(6)}
    toml = write_dataset(tmp_path, images, repeats=2, subset=subset,
                         captions={name: f"sks, a{i}, b{i}, c{i}, d{i}" for i, name in enumerate(images)})

    def rows(batches):
        return [(b.indices, b.captions, b.latents, b.added_cond["time_ids"], b.context) for b in batches]

    reference = build(toml, bundle)
    epochs = [rows(epoch_batches(reference, e)) for e in range(2)]
    assert len(epochs[1]) >= 4 and [r[:2] for r in epochs[0]] != [r[:2] for r in epochs[1]]

    interrupted = build(toml, bundle)
    interrupted.sampler.set_epoch(1)
    iterator = interrupted.batches()
    next(iterator), next(iterator), next(iterator)
    state = interrupted.sampler.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3

    resumed = build(toml, bundle, seed=999)  # the seed comes back with the state, as the run's seed would
    resumed.dataset.seed = 3
    resumed.sampler.load_state_dict(state)
    rest = rows(epoch_batches(resumed, state["epoch"], skip=state["position"]))
    assert len(rest) == len(epochs[1]) - 3
    for got, want in zip(rest, epochs[1][3:]):
        assert got[0] == want[0] and got[1] == want[1]
        for a, b in zip(got[2:], want[2:]):
            assert torch.equal(a, b)


def test_skip_gives_the_remaining_batches_and_shapes(tmp_path, bundle):
    toml = write_dataset(tmp_path, {f"{i}.png": (64, 64) if i % 2 else (64, 48) for i in range(6)}, repeats=2)
    data = build(toml, bundle)
    full = epoch_batches(data, 1)
    rest = epoch_batches(data, 1, skip=2)
    assert [b.captions for b in rest] == [b.captions for b in full[2:]]
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(full[2:], rest))
    assert len(data.sampler.rank_batches()) == len(full) == 6  # 12 entries, batch 2, one bucket each
    batch = rest[0]
    n = batch.latents.shape[0]
    assert batch.context.shape == (n, 77, 64) and batch.added_cond["text_embeds"].shape[0] == n
    assert batch.added_cond["time_ids"].shape == (n, 6)


def test_two_ranks_split_the_trainer_batches(tmp_path, bundle):
    toml = write_dataset(tmp_path, {f"{i}.png": (64, 64) for i in range(5)}, repeats=2)
    data = build(toml, bundle)
    ranks = [data.dataset.make_sampler(rank, 2, seed=3) for rank in range(2)]
    b0, b1 = (s.rank_batches(0) for s in ranks)
    assert len(b0) == len(b1) and not {i for b in b0 for i in b} & {i for b in b1 for i in b}
    assert sorted(map(tuple, b0 + b1)) == sorted(map(tuple, data.sampler.all_batches(0)[:len(b0) * 2]))


def test_unreadable_images_are_skipped_and_reported_once(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"good1.png": (64, 64), "good2.png": (64, 48)})
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "img" / "junk.jpg").write_bytes(b"not a jpeg")
    messages: list[str] = []
    data = build(toml, bundle, messages)
    assert sorted(r.path.name for r in data.records) == ["good1.png", "good2.png"] and len(data.skipped) == 2
    summaries = [m for m in messages if "skipped 2 unreadable" in m]
    assert len(summaries) == 1 and "empty.png" in summaries[0] and "junk.jpg" in summaries[0]


def test_disk_cache_is_reused_by_a_second_build(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64), "b.png": (64, 48)}, subset="flip_aug = true")
    first = build(toml, bundle, cache_latents=True, cache_latents_to_disk=True)
    assert len(list((tmp_path / "img").glob("*_surge.npz"))) == 2
    vae = bundle.vae
    bundle.vae = counting = CountingVAE(vae)
    try:
        second = build(toml, bundle, cache_latents=True, cache_latents_to_disk=True)
    finally:
        bundle.vae = vae
    assert counting.calls == []
    for a, b in zip(first.records, second.records):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.latents_flipped, b.latents_flipped)


def test_probe_examples_time_ids_and_prompt_encoding(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64), "b.png": (64, 64), "c.png": (64, 48)},
                         subset='caption_prefix = "best,"', captions={"a.png": "red circle"})
    data = build(toml, bundle)
    captions, latents = data.probe_examples(2)
    assert latents.shape == (2, *data.latent_shape) and captions[0] == "best, red circle"
    assert data.latent_shape == (4, 8, 8) and data.resolution == (64, 64)
    assert data.time_ids_for(3).tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 3

    context, pooled = data.encode_prompts(["red circle", "blue square", "red circle"])
    assert {"red circle", "blue square"} <= set(data.text.memory) and torch.equal(context[0], context[2])
    # a direct encode with the transformers modules, independent of the cache code
    ids1 = bundle.tokenizer_1(["blue square"], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    ids2 = bundle.tokenizer_2(["blue square"], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = bundle.text_encoder_1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = bundle.text_encoder_2(ids2, output_hidden_states=True)
    torch.testing.assert_close(context[1], torch.cat([h1, out2.hidden_states[-2]], -1)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[1], out2.text_embeds[0], atol=1e-5, rtol=1e-5)
