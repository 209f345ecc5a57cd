"""Trainer data pipeline (sd_scripts_surge/train_data.py): buckets, captions, bad images, latent cache, sampler."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import CLIPTokenizer

from sd_scripts_surge import train_data as td
from sd_scripts_surge.config import TrainConfig
from sd_scripts_surge.dataset_config import SubsetConfig
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.tiny.architecture import build_tiny_text_encoders, build_tiny_unet, build_tiny_vae
from sd_scripts_surge.tiny.tokenizer import EOS_TOKEN, TE2_PAD_TOKEN, build_tokenizer

# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> ModelBundle:
    root = tmp_path_factory.mktemp("tok")
    texts = ["red blue green circle square cat dog photo"]
    tok1 = CLIPTokenizer.from_pretrained(build_tokenizer(root / "t1", texts=texts, pad_token=EOS_TOKEN))
    tok2 = CLIPTokenizer.from_pretrained(build_tokenizer(root / "t2", texts=texts, pad_token=TE2_PAD_TOKEN))
    te1, te2 = build_tiny_text_encoders(0)
    return ModelBundle("sdxl", build_tiny_unet(0), te1, build_tiny_vae(0), te2, tok1, tok2)


def png(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_dataset(tmp_path: Path, images: dict[str, tuple[int, int]], *, repeats: int = 1, extra: str = "",
                  general: str = "") -> Path:
    image_dir = tmp_path / "img"
    image_dir.mkdir(exist_ok=True)
    for i, (name, size) in enumerate(images.items()):
        png(image_dir / name, size, seed=i)
    toml = tmp_path / "data.toml"
    toml.write_text(f"""[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
batch_size = 2
caption_extension = ".txt"
{general}
[[datasets]]
[[datasets.subsets]]
image_dir = "{image_dir.as_posix()}"
num_repeats = {repeats}
class_tokens = "sks dog"
{extra}
""")
    return toml


def build(toml: Path, bundle: ModelBundle, messages: list[str] | None = None, **cfg) -> td.TrainData:
    config = TrainConfig(**{"seed": 3, **cfg})
    log = messages.append if messages is not None else (lambda _m: None)
    return td.build_train_data(config, str(toml), None, bundle, Accelerator(cpu=True), log)


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts `encode` calls and encoded images (the real VAE does the work)."""

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


# --------------------------------------------------------------------------------------------- buckets

EXPECTED_BUCKETS = [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]


def test_bucket_list_matches_sd_scripts_rule():
    buckets = td.make_buckets((64, 64), 32, 128, 16)
    assert buckets == EXPECTED_BUCKETS
    assert all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert td.nearest_bucket((64, 48), buckets) == (80, 48)
    assert td.nearest_bucket((48, 64), buckets) == (48, 80)
    assert td.nearest_bucket((50, 50), buckets) == (64, 64)
    assert td.nearest_bucket((400, 100), buckets) == (128, 32)


def test_bucket_list_for_sdxl_1024_has_the_known_sd_scripts_entries():
    buckets = td.make_buckets((1024, 1024), 256, 2048, 64)
    assert {(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344), (640, 1536), (512, 2048)} <= set(buckets)
    assert max(w * h for w, h in buckets) <= 1024 * 1024


def test_resize_and_crop_geometry_and_crop_top_left():
    image = Image.new("RGB", (100, 60))
    out, (top, left) = td.resize_and_crop(image, (80, 48))  # scale 0.8 → exactly 80x48: no crop
    assert out.size == (80, 48) and (top, left) == (0, 0)
    out, (top, left) = td.resize_and_crop(image, (64, 64))  # scale 64/60 → 107x64, centre crop in width
    assert out.size == (64, 64) and top == 0 and left == (107 - 64) // 2
    out, (top, left) = td.resize_and_crop(Image.new("RGB", (30, 90)), (48, 80))  # scale 1.6 → 48x144
    assert out.size == (48, 80) and (top, left) == ((144 - 80) // 2, 0)


def test_sdxl_time_ids_order(tmp_path):
    subset = SubsetConfig(image_dir=tmp_path)
    item = td.ImageItem(tmp_path / "a.png", "", subset, bucket=(80, 48), original_size=(100, 60), crop_top_left=(3, 7))
    assert item.time_ids.tolist() == [60.0, 100.0, 3.0, 7.0, 48.0, 80.0]


# --------------------------------------------------------------------------------------------- captions


def test_caption_file_with_subset_extension_else_class_tokens(tmp_path):
    subset = SubsetConfig(image_dir=tmp_path, caption_extension=".txt", class_tokens="sks dog")
    (tmp_path / "a.txt").write_text("a red circle\n")
    (tmp_path / "a.caption").write_text("wrong extension")
    (tmp_path / "b.caption").write_text("wrong extension")
    assert td.read_caption(tmp_path / "a.png", subset) == "a red circle"
    assert td.read_caption(tmp_path / "b.png", subset) == "sks dog"
    decorated = SubsetConfig(image_dir=tmp_path, caption_prefix="pre", caption_suffix="post")
    assert td.decorate_caption("mid", decorated) == "pre, mid, post"


def test_shuffle_caption_keeps_tokens_and_separator():
    caption = "sks, dog, red, blue, green, big, small, photo"
    seen = set()
    for seed in range(20):
        out = td.shuffle_caption(caption, 2, random.Random(seed))
        parts = out.split(", ")
        assert parts[:2] == ["sks", "dog"] and sorted(parts) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5
    out = td.shuffle_caption("sks, dog ||| red, blue, green", 0, random.Random(1), "|||")
    assert out.split(", ")[:2] == ["sks", "dog"] and sorted(out.split(", ")[2:]) == ["blue", "green", "red"]


def test_shuffled_captions_depend_on_seed_and_epoch_only(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64)}, extra="shuffle_caption = true\nkeep_tokens = 1")
    (tmp_path / "img" / "a.txt").write_text("sks, " + ", ".join(f"t{i}" for i in range(12)))
    data = build(toml, bundle)
    item = data.items[0]
    by_epoch = []
    for epoch in range(4):
        data.sampler.set_epoch(epoch)
        by_epoch.append(data._caption(item))
        assert by_epoch[-1].startswith("sks, ")
        assert data._caption(item) == by_epoch[-1]
    assert len(set(by_epoch)) > 1
    data.sampler.set_epoch(2)
    # the same (seed, epoch) gives the same caption in a fresh build (another process): no hash() salt
    again = build(toml, bundle)
    again.sampler.set_epoch(2)
    assert again._caption(again.items[0]) == by_epoch[2]


# --------------------------------------------------------------------------------------------- bad images


def test_unreadable_images_are_skipped_counted_and_logged_once(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"good1.png": (64, 64), "good2.png": (64, 48)})
    img = tmp_path / "img"
    corrupt = (img / "good1.png").read_bytes()
    (img / "corrupt.png").write_bytes(corrupt[:8] + b"\x00" * 40 + corrupt[48:])
    (img / "empty.png").write_bytes(b"")
    jpeg = img / "trunc.jpg"
    Image.new("RGB", (64, 64), "red").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (img / "notes.webp").write_text("this is not an image")
    messages: list[str] = []
    data = build(toml, bundle, messages)
    assert sorted(i.path.name for i in data.items) == ["good1.png", "good2.png"]
    assert len(data.skipped) == 4
    summaries = [m for m in messages if "skipped 4 unreadable" in m]
    assert len(summaries) == 1
    for name in ("corrupt.png", "empty.png", "trunc.jpg", "notes.webp"):
        assert name in summaries[0]


def test_dataset_left_empty_names_image_dir(tmp_path, bundle):
    toml = write_dataset(tmp_path, {})
    (tmp_path / "img" / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable images") as err:
        build(toml, bundle)
    assert str(tmp_path / "img") in str(err.value)


def test_missing_image_dir_is_a_clear_error(tmp_path, bundle):
    toml = write_dataset(tmp_path, {})
    (tmp_path / "img").rmdir()
    with pytest.raises(FileNotFoundError, match="image_dir .*img"):
        build(toml, bundle)


# --------------------------------------------------------------------------------------------- latents


def make_items(tmp_path: Path, sizes: list[tuple[int, int]]) -> list[td.ImageItem]:
    tmp_path.mkdir(exist_ok=True)
    subset = SubsetConfig(image_dir=tmp_path)
    buckets = td.make_buckets((64, 64), 32, 128, 16)
    return [td.ImageItem(png(tmp_path / f"{i}.png", s, seed=i), "", subset, td.nearest_bucket(s, buckets), s)
            for i, s in enumerate(sizes)]


def test_latents_are_encoded_in_batches_per_bucket_and_match_single_encodes(tmp_path, bundle):
    sizes = [(64, 64)] * 5 + [(64, 48)] * 3
    items = make_items(tmp_path, sizes)
    vae = CountingVAE(bundle.vae)
    td.encode_latents(items, vae, torch.device("cpu"), to_disk=False, progress=False, chunk=4)
    assert sorted(vae.calls) == [1, 3, 4]  # 64x64: 4 + 1, 80x48: 3; never one call per image
    assert items[0].latents.shape == (4, 8, 8) and items[5].latents.shape == (4, 6, 10)
    single = make_items(tmp_path / "single", sizes[:1])
    td.encode_latents(single, bundle.vae, torch.device("cpu"), to_disk=False, progress=False)
    torch.testing.assert_close(single[0].latents, items[0].latents, atol=1e-4, rtol=1e-4)


def test_disk_cache_reused_rebuilt_on_vae_change_and_corruption(tmp_path, bundle):
    sizes = [(64, 64), (64, 64), (64, 48)]
    device = torch.device("cpu")
    items = make_items(tmp_path, sizes)
    vae = CountingVAE(bundle.vae)
    td.encode_latents(items, vae, device, to_disk=True, progress=False)
    assert sum(vae.calls) == 3
    caches = sorted(tmp_path.glob("*_surge.npz"))
    assert [p.name for p in caches] == ["0_64x64_surge.npz", "1_64x64_surge.npz", "2_80x48_surge.npz"]
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temporaries
    first = [item.latents.clone() for item in items]

    again = make_items(tmp_path, sizes)
    vae2 = CountingVAE(bundle.vae)
    td.encode_latents(again, vae2, device, to_disk=True, progress=False)
    assert vae2.calls == []  # all reused
    for a, b in zip(first, again):
        assert torch.equal(a, b.latents)

    caches[0].write_bytes(caches[0].read_bytes()[:50])  # truncated npz
    caches[1].write_bytes(b"garbage")
    again = make_items(tmp_path, sizes)
    vae3 = CountingVAE(bundle.vae)
    td.encode_latents(again, vae3, device, to_disk=True, progress=False)
    assert vae3.calls == [2]  # the two broken ones, one batched call
    torch.testing.assert_close(again[0].latents, first[0], atol=1e-5, rtol=1e-5)

    other = CountingVAE(build_tiny_vae(seed=1))
    again = make_items(tmp_path, sizes)
    td.encode_latents(again, other, device, to_disk=True, progress=False)
    assert sum(other.calls) == 3  # another VAE: every cache is stale


def test_cache_write_is_atomic(tmp_path, bundle, monkeypatch):
    items = make_items(tmp_path, [(64, 64)])
    original = np.savez

    def failing_savez(path, **arrays):
        original(path, **arrays)
        raise OSError("disk full")

    monkeypatch.setattr(td.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        td.encode_latents(items, bundle.vae, torch.device("cpu"), to_disk=True, progress=False)
    assert list(tmp_path.glob("*.npz")) == []  # neither a partial cache nor a temporary is left


def test_build_with_disk_cache_reuses_latents(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64), "b.png": (64, 48)})
    first = build(toml, bundle, cache_latents=True, cache_latents_to_disk=True)
    assert len(list((tmp_path / "img").glob("*_surge.npz"))) == 2
    vae = bundle.vae
    counting = CountingVAE(vae)
    bundle.vae = counting
    try:
        second = build(toml, bundle, cache_latents=True, cache_latents_to_disk=True)
    finally:
        bundle.vae = vae
    assert counting.calls == []
    for a, b in zip(first.items, second.items):
        assert torch.equal(a.latents, b.latents)


# --------------------------------------------------------------------------------------------- sampler


def sampler_items(tmp_path: Path) -> list[td.ImageItem]:
    subsets = [SubsetConfig(image_dir=tmp_path, num_repeats=3), SubsetConfig(image_dir=tmp_path, num_repeats=1)]
    buckets = [(64, 64), (80, 48), (48, 80)]
    return [td.ImageItem(tmp_path / f"{i}.png", "", subsets[i % 2], buckets[i % 3], (64, 64)) for i in range(14)]


def test_sampler_repeats_single_bucket_batches_and_seeded_order(tmp_path):
    items = sampler_items(tmp_path)
    sampler = td.BucketBatchSampler(items, batch_size=4, seed=7)
    batches = sampler.rank_batches()
    counts = np.bincount([i for b in batches for i in b], minlength=len(items))
    assert counts.tolist() == [item.subset.num_repeats for item in items]
    assert all(len({items[i].bucket for i in b}) == 1 and 1 <= len(b) <= 4 for b in batches)
    same = td.BucketBatchSampler(items, batch_size=4, seed=7)
    assert same.rank_batches() == batches
    same.set_epoch(1)
    assert same.rank_batches() != batches
    same.load_state_dict(sampler.state_dict())
    assert same.rank_batches() == batches
    assert td.BucketBatchSampler(items, batch_size=4, seed=8).rank_batches() != batches


def test_two_ranks_get_disjoint_equal_batches_and_resume_skips_exactly(tmp_path):
    items = sampler_items(tmp_path)
    ranks = [td.BucketBatchSampler(items, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(5)
    b0, b1 = (s.rank_batches() for s in ranks)
    assert len(b0) == len(b1) > 0
    assert not {tuple(b) for b in b0} & {tuple(b) for b in b1}
    everything = td.BucketBatchSampler(items, 3, seed=1)
    everything.set_epoch(5)
    assert sorted(map(tuple, b0 + b1)) == sorted(map(tuple, everything.all_batches()[:2 * len(b0)]))
    resumed = td.BucketBatchSampler(items, 3, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(ranks[1].state_dict())
    assert resumed.rank_batches()[2:] == b1[2:]


def test_batches_skip_gives_the_remaining_batches(tmp_path, bundle):
    toml = write_dataset(tmp_path, {f"{i}.png": (64, 64) if i % 2 else (64, 48) for i in range(6)}, repeats=2)
    data = build(toml, bundle)
    data.sampler.set_epoch(1)
    full = [b.captions for b in data.batches()]
    full_latents = [b.latents for b in data.batches()]
    rest = list(data.batches(skip=2))
    assert [b.captions for b in rest] == full[2:]
    for a, b in zip(full_latents[2:], rest):
        assert torch.equal(a, b.latents)
    batch = rest[0]
    n = batch.latents.shape[0]
    assert batch.context.shape == (n, 77, 64) and batch.added_cond["text_embeds"].shape[0] == n
    assert batch.added_cond["time_ids"].shape == (n, 6)


# --------------------------------------------------------------------------------------------- probes, prompts


def test_probe_examples_stack_and_prompt_cache(tmp_path, bundle):
    toml = write_dataset(tmp_path, {"a.png": (64, 64), "b.png": (64, 64), "c.png": (64, 48)})
    (tmp_path / "img" / "a.txt").write_text("red circle")
    data = build(toml, bundle)
    captions, latents = data.probe_examples(2)
    assert latents.shape == (2, *data.latent_shape) and len(captions) == 2
    assert data.latent_shape == (4, 8, 8) and data.resolution == (64, 64)
    assert data.time_ids_for(3).tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 3

    context, pooled = data.encode_prompts(["red circle", "blue square", "red circle"])
    assert set(data.encode_prompts.cache) >= {"red circle", "blue square"}
    assert torch.equal(context[0], context[2])
    direct_ctx, direct_pooled = data.encode_prompts._encode(["red circle"])
    torch.testing.assert_close(context[0], direct_ctx[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[0], direct_pooled[0], atol=1e-5, rtol=1e-5)
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
