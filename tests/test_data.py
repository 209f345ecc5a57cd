"""Data pipeline without models (sd_scripts_surge/data.py): buckets, crops, SDXL time ids, captions, skips,
sampler order, rank sharding and resume. The trainer-facing part with the tiny models is in test_data_cache.py."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts_surge.config import ConfigError, parse_train_args
from sd_scripts_surge.data import (
    BucketBatchSampler,
    DataError,
    build_dataset,
    caption_varies,
    crop_plan,
    make_bucket_resolutions,
    no_upscale_bucket,
    process_caption,
    read_caption,
    select_bucket,
    shuffle_caption,
    split_tags,
)
from sd_scripts_surge.data.dataset_config import DatasetConfig, SubsetConfig, dataset_config_from_folder


def png(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def tiny_dataset(root: Path, sizes: dict[str, tuple[int, int]], **dataset_kwargs) -> list[DatasetConfig]:
    for name, size in sizes.items():
        png(root / "2_shapes" / f"{name}.png", size)
        (root / "2_shapes" / f"{name}.txt").write_text(f"{name}, red, square\n")
    values = dict(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                  caption_extension=".txt")
    values.update(dataset_kwargs)
    return dataset_config_from_folder(root, **values)


# ------------------------------------------------------------------------------------------------ buckets


def test_bucket_list_follows_sd_scripts_rule():
    buckets = make_bucket_resolutions((64, 64), 32, 128, 16)
    assert (64, 64) in buckets and (80, 48) in buckets and (48, 80) in buckets
    assert (128, 32) in buckets and (32, 128) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and 32 <= w <= 128 and 32 <= h <= 128 and w * h <= 64 * 64
    # real SDXL: 1024² with steps 64 gives the well-known 1152x896 / 1216x832 / 1344x768 buckets
    sdxl = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (1536, 640)} <= set(sdxl)


def test_bucket_assignment_facts():
    steps16 = make_bucket_resolutions((64, 64), 32, 128, 16)
    # 64x48 (4:3) is exactly as far from 1:1 as from 80x48 (5:3): the tie goes to the larger area
    assert select_bucket((64, 48), steps16) == (64, 64)
    assert select_bucket((200, 100), steps16) == (80, 48)
    # sd-scripts compares w/h linearly, so portraits are not the mirror image of landscapes:
    # |48/80 - 3/4| = 0.15 < |1 - 3/4| = 0.25
    assert select_bucket((48, 64), steps16) == (48, 80)
    steps8 = make_bucket_resolutions((64, 64), 32, 128, 8)
    assert select_bucket((64, 48), steps8) == (72, 56)  # 9:7 is the nearest ratio to 4:3 with 8-px steps
    assert select_bucket((48, 64), steps8) == (56, 72)


def test_no_upscale_bucket():
    assert no_upscale_bucket((40, 24), (64, 64), 16) == (32, 16)  # smaller than the area: kept, rounded down
    assert no_upscale_bucket((200, 100), (64, 64), 16) == (80, 32)  # scaled to the area, then rounded down


def test_crop_plan_and_sdxl_time_ids(tmp_path):
    assert crop_plan((64, 48), (64, 64)) == ((85, 64), (0, 10))
    assert crop_plan((200, 100), (80, 48)) == ((96, 48), (0, 8))
    resized, (top, left) = crop_plan((200, 100), (80, 48), random_crop=True, rng=random.Random(3))
    assert resized == (96, 48) and top == 0 and 0 <= left <= 16
    datasets = tiny_dataset(tmp_path, {"wide": (64, 48), "long": (200, 100)})
    data = build_dataset(datasets=datasets)
    by_name = {r.path.stem: r for r in data.records}
    assert by_name["wide"].bucket == (64, 64)
    assert by_name["wide"].time_ids.tolist() == [48, 64, 0, 10, 64, 64]
    assert by_name["long"].bucket == (80, 48)
    assert by_name["long"].time_ids.tolist() == [100, 200, 0, 8, 48, 80]


def test_without_buckets_everything_goes_to_resolution(tmp_path):
    datasets = tiny_dataset(tmp_path, {"a": (64, 48), "b": (30, 90)}, enable_bucket=False)
    data = build_dataset(datasets=datasets)
    assert {r.bucket for r in data.records} == {(64, 64)}
    batch = data.get_batch([0, 1], epoch=0)
    assert batch.pixels.shape == (2, 3, 64, 64) and batch.latents is None
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1


def test_batch_pixels_are_the_resized_centre_crop(tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32] = 255  # left half white
    folder = tmp_path / "1_x"
    folder.mkdir()
    Image.fromarray(image).save(folder / "half.png")
    data = build_dataset(datasets=dataset_config_from_folder(tmp_path, resolution=64, enable_bucket=True,
                                                             min_bucket_reso=32, max_bucket_reso=128,
                                                             bucket_reso_steps=16))
    pixels = data.get_batch([0], 0).pixels[0]
    # resized 85 wide, crop from x=10: white columns are 0..~32 of the crop (42.5 - 10), black after
    assert pixels[:, :, :30].min() > 0.9 and pixels[:, :, 36:].max() < -0.9


# ------------------------------------------------------------------------------------------------ captions


def test_caption_file_and_class_token_fallback(tmp_path):
    subset = SubsetConfig(image_dir=tmp_path, caption_extension=".txt", class_tokens="sks dog")
    png(tmp_path / "a.png", (8, 8))
    (tmp_path / "a.txt").write_text("\n  a red square, small  \nsecond line\n")
    png(tmp_path / "b.png", (8, 8))
    png(tmp_path / "c.png", (8, 8))
    (tmp_path / "c.txt").write_text("   \n")
    assert read_caption(tmp_path / "a.png", subset) == "a red square, small"
    assert read_caption(tmp_path / "b.png", subset) == "sks dog"
    assert read_caption(tmp_path / "c.png", subset) == "sks dog"


def test_shuffle_caption_keeps_first_tokens():
    caption = "sks dog, red, sitting, grass, sunny, photo"
    seen = set()
    for seed in range(20):
        out = shuffle_caption(caption, 2, random.Random(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "red"]
        assert sorted(tags) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 1  # it does shuffle
    out = shuffle_caption("sks dog, red ||| a, b, c", 0, random.Random(1), separator="|||")
    assert out.startswith("sks dog, red, ") and sorted(out.split(", ")[2:]) == ["a", "b", "c"]


def test_process_caption_dropout_prefix_and_tags(tmp_path):
    base = dict(image_dir=tmp_path)
    rng = random.Random(0)
    assert process_caption("a, b", SubsetConfig(**base, caption_dropout_rate=1.0), rng) == ""
    # sd-scripts joins prefix and suffix with a space: users write "masterpiece, " to get a comma
    decorated = SubsetConfig(**base, caption_prefix="pre,", caption_suffix=", post")
    assert process_caption("a, b", decorated, rng) == "pre, a, b , post"
    assert process_caption("a, b", SubsetConfig(**base, caption_prefix="pre"), None) == "pre a, b"
    out = process_caption("keep, x, y, z", SubsetConfig(**base, keep_tokens=1, caption_tag_dropout_rate=1.0), rng)
    assert out == "keep"
    # the prefix counts towards keep_tokens, as in sd-scripts (it is added first)
    out = process_caption("x, y", SubsetConfig(**base, caption_prefix="sks,", keep_tokens=1,
                                               caption_tag_dropout_rate=1.0), rng)
    assert out == "sks"
    # with the separator: fixed head, flexible middle, fixed suffix after a second separator
    subset = SubsetConfig(**base, keep_tokens_separator="|||", caption_tag_dropout_rate=1.0, keep_tokens=5)
    assert process_caption("sks, dog ||| x, y ||| best, end", subset, rng) == "sks, dog, best, end"
    assert split_tags("a, b ||| c ||| d", 0, "|||") == (["a", "b"], ["c"], ["d"])
    # no tag processing: the separator becomes a comma; the canonical caption (rng None) never drops
    plain = SubsetConfig(**base, keep_tokens_separator="|||", caption_dropout_rate=1.0)
    assert process_caption("sks ||| a, b", plain, None) == "sks, a, b"


def test_tag_dropout_rate_drops_about_that_share_of_flexible_tags(tmp_path):
    subset = SubsetConfig(image_dir=tmp_path, keep_tokens=1, caption_tag_dropout_rate=0.25)
    caption = "keep, " + ", ".join(f"t{i}" for i in range(40))
    kept = [len(process_caption(caption, subset, random.Random(seed)).split(", ")) - 1 for seed in range(50)]
    assert all(process_caption(caption, subset, random.Random(s)).startswith("keep") for s in range(5))
    assert 0.7 < sum(kept) / (50 * 40) < 0.8


def test_caption_dropout_every_n_epochs_counts_epochs_from_one(tmp_path):
    subset = SubsetConfig(image_dir=tmp_path, caption_dropout_every_n_epochs=2)
    captions = [process_caption("a, b", subset, random.Random(e), epoch=e) for e in range(4)]
    assert captions == ["a, b", "", "a, b", ""]  # sd-scripts epochs 2 and 4
    assert caption_varies(subset) and not caption_varies(SubsetConfig(image_dir=tmp_path, caption_prefix="x"))


def test_captions_are_deterministic_per_seed_epoch_entry(tmp_path):
    datasets = tiny_dataset(tmp_path, {"a": (64, 64)}, shuffle_caption=True, keep_tokens=1)
    data = build_dataset(datasets=datasets, seed=5)
    again = build_dataset(datasets=datasets, seed=5)
    assert [data.caption_for(0, e) for e in range(6)] == [again.caption_for(0, e) for e in range(6)]
    assert all(data.caption_for(0, e).startswith("a, ") for e in range(6))
    assert len({data.caption_for(0, e) for e in range(6)}) > 1


# ------------------------------------------------------------------------------------------------ bad input


def test_unreadable_and_missing_images_are_skipped_and_counted(tmp_path, caplog):
    datasets = tiny_dataset(tmp_path, {"good1": (64, 64), "good2": (64, 48)})
    folder = tmp_path / "2_shapes"
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    good = (folder / "good1.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:30])
    (folder / "gone.jpg").symlink_to(tmp_path / "does-not-exist.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.webp").write_text("text with an image extension")
    corrupt = bytearray(good)
    corrupt[8:48] = b"\x00" * 40  # the IHDR chunk zeroed
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    jpeg = folder / "trunc.jpg"
    Image.new("RGB", (64, 64), "red").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (folder / "notes.md").write_text("not an image extension: ignored, not skipped")
    logs: list[str] = []
    data = build_dataset(datasets=datasets, log=logs.append)
    assert sorted(r.path.name for r in data.records) == ["good1.png", "good2.png"]
    bad = ["corrupt.png", "empty.png", "garbage.png", "gone.jpg", "notes.webp", "trunc.jpg", "truncated.png"]
    assert sorted(p.name for p, _ in data.skipped.entries) == bad and len(data.skipped) == 7
    summaries = [line for line in logs if line.startswith("skipped 7 unreadable images:")]
    assert len(summaries) == 1 and all(name in summaries[0] for name in bad)  # one report naming each
    assert len(data) == 4  # 2 images x 2 repeats


def test_empty_dataset_is_a_clear_error(tmp_path):
    folder = tmp_path / "5_empty"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"no usable images.*5_empty.*skipped 1"):
        build_dataset(datasets=dataset_config_from_folder(tmp_path))


def test_color_aug_is_refused_naming_the_subset(tmp_path):
    datasets = tiny_dataset(tmp_path, {"a": (64, 64)}, color_aug=True)
    with pytest.raises(ConfigError, match=r"subset #1 .*2_shapes.*color_aug"):
        build_dataset(datasets=datasets)


def test_random_crop_is_fixed_per_image_and_seed(tmp_path):
    datasets = tiny_dataset(tmp_path, {f"w{i}": (200, 100) for i in range(6)}, random_crop=True)
    crops = [r.crop_top_left for r in build_dataset(datasets=datasets, seed=4).records]
    assert crops == [r.crop_top_left for r in build_dataset(datasets=datasets, seed=4).records]
    assert len(set(crops)) > 1 and all(top == 0 and 0 <= left <= 16 for top, left in crops)  # 96x48 → 80x48
    assert crops != [r.crop_top_left for r in build_dataset(datasets=datasets, seed=5).records]


def test_missing_image_dir_names_it(tmp_path):
    ds = DatasetConfig(subsets=[SubsetConfig(image_dir=tmp_path / "typo")], resolution=(64, 64))
    with pytest.raises(DataError, match="typo"):
        build_dataset(datasets=[ds])


def test_build_dataset_from_train_config(tmp_path):
    tiny_dataset(tmp_path / "img", {"a": (64, 64)})
    cfg = parse_train_args(["--train_data_dir", str(tmp_path / "img"), "--resolution", "64",
                            "--caption_extension", ".txt", "--seed", "3"])
    data = build_dataset(cfg)
    assert data.seed == 3 and data.records[0].caption == "a, red, square" and len(data) == 2
    with pytest.raises(DataError, match="--dataset_config"):
        build_dataset(parse_train_args([]))


# ------------------------------------------------------------------------------------------------ sampler


def sizes_dataset(root: Path) -> list[DatasetConfig]:
    sizes = {f"sq{i}": (64, 64) for i in range(5)} | {f"wd{i}": (200, 100) for i in range(4)} | {"tl": (40, 90)}
    return tiny_dataset(root, sizes, batch_size=3)


def test_batches_hold_one_bucket_and_cover_every_entry(tmp_path):
    data = build_dataset(datasets=sizes_dataset(tmp_path), seed=1)
    sampler = data.make_sampler()
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(data))) == list(range(20))
    for batch in batches:
        assert len({data.group_of(i) for i in batch}) == 1 and 1 <= len(batch) <= 3
    assert sampler.epoch == 1 and sampler.position == 0
    assert list(sampler) != batches  # a new epoch, a new order
    assert data.make_sampler().all_batches(0) == batches  # same seed, same order


def test_sampler_resume_gives_the_same_remaining_order(tmp_path):
    data = build_dataset(datasets=sizes_dataset(tmp_path), seed=7)
    reference = data.make_sampler()
    uninterrupted = [b for _ in range(3) for b in reference]  # three epochs
    first = data.make_sampler()
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == 4:
            break
    state = first.state_dict()
    resumed = data.make_sampler(seed=0)  # the state carries the seed
    resumed.load_state_dict(state)
    rest = [b for _ in range(3) for b in resumed][: len(uninterrupted) - 4]
    assert taken + rest == uninterrupted
    # the batches themselves resume too (captions depend on the epoch)
    b1 = data.get_batch(uninterrupted[5], epoch=0)
    b2 = data.get_batch(rest[1], epoch=0)
    assert b1.captions == b2.captions and torch.equal(b1.time_ids, b2.time_ids)


def test_resume_refuses_a_changed_dataset(tmp_path):
    data = build_dataset(datasets=sizes_dataset(tmp_path))
    state = data.make_sampler().state_dict()
    state["entries"] += 1
    with pytest.raises(DataError, match="added or removed"):
        data.make_sampler().load_state_dict(state)


def test_ranks_split_batches_evenly_and_disjointly():
    groups = ["a"] * 7 + ["b"] * 5
    ranks = [BucketBatchSampler(groups, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    b0, b1 = list(ranks[0]), list(ranks[1])
    assert len(b0) == len(b1) == 3  # 4 + 3 batches cut to 6
    assert not {i for b in b0 for i in b} & {i for b in b1 for i in b}
    single = BucketBatchSampler(["a"], 4, world_size=3, rank=2)
    assert list(single) == [[0]]  # fewer batches than ranks: repeated so every rank steps


def test_iterate_yields_batches(tmp_path):
    data = build_dataset(datasets=sizes_dataset(tmp_path))
    sampler = data.make_sampler()
    batches = list(data.iterate(sampler))
    assert len(batches) == len(data.make_sampler())
    assert all(b.pixels is not None and b.time_ids.shape == (len(b.indices), 6) for b in batches)


def test_tiny_kit_dataset_loads_through_the_pipeline(tmp_path):
    from sd_scripts_surge.data.dataset_config import load_dataset_config
    from sd_scripts_surge.tiny.dataset import make_dataset

    root = make_dataset(tmp_path / "kit", num_shapes=6, num_mixed=2, num_eval=1)
    datasets = load_dataset_config(root / "dataset.toml")
    data = build_dataset(datasets=datasets, seed=0)
    assert len(data.skipped) == 0 and len(data.records) == 8
    assert all(r.caption and r.bucket == (64, 64) for r in data.records)  # square 64 px images
    batch = next(data.iterate(data.make_sampler()))
    assert batch.pixels.shape[1:] == (3, 64, 64) and len(batch.captions) <= datasets[0].batch_size


def test_regularisation_images_balance_the_training_entries(tmp_path):
    for i in range(3):
        png(tmp_path / "train" / f"t{i}.png", (64, 64))
    png(tmp_path / "reg" / "r0.png", (64, 64))
    png(tmp_path / "reg" / "r1.png", (64, 64))
    ds = DatasetConfig(subsets=[SubsetConfig(image_dir=tmp_path / "train", num_repeats=2, class_tokens="sks dog"),
                                SubsetConfig(image_dir=tmp_path / "reg", is_reg=True, class_tokens="dog")],
                       resolution=(64, 64), batch_size=4)
    data = build_dataset(datasets=[ds])
    reg_entries = [e for e in range(len(data)) if data.records[data.entries[e]].subset.is_reg]
    assert len(data) == 12 and len(reg_entries) == 6  # 3 x 2 training entries, reg cycled to match
    batch = data.get_batch(list(range(len(data))), epoch=0)
    assert int(batch.is_reg.sum()) == 6
    assert set(batch.captions) == {"sks dog", "dog"}
