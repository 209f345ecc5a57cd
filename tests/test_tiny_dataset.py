"""The procedural shapes dataset: deterministic bytes, kohya layout, captions that say what is drawn."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_scripts_surge.tiny.dataset import (
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    load_manifest,
    make_dataset,
    plan_dataset,
    shape_mask,
)

SMALL = dict(num_shapes=12, num_mixed=6, num_eval=4)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "dataset.toml"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "dataset", seed=0, **SMALL)


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    again = make_dataset(tmp_path / "again", seed=0, **SMALL)
    assert _digest(again) == _digest(dataset)
    other = make_dataset(tmp_path / "other", seed=1, **SMALL)
    assert _digest(other) != _digest(dataset)


def test_kohya_folder_layout_and_toml(dataset):
    shapes = sorted((dataset / "train" / "10_shapes").glob("*.png"))
    mixed = sorted((dataset / "train" / "5_mixed").glob("*.png"))
    assert len(shapes) == 12 and len(mixed) == 6
    for png in shapes + mixed:
        assert png.with_suffix(".txt").read_text().strip()
    sizes = {Image.open(p).size for p in mixed}
    assert sizes == {(64, 64), (64, 48), (48, 64)}  # bucketing gets non-square images
    config = tomllib.loads((dataset / "dataset.toml").read_text())
    (ds,) = config["datasets"]
    assert ds["resolution"] == 64 and ds["enable_bucket"] is True
    subsets = {Path(s["image_dir"]).name: s["num_repeats"] for s in ds["subsets"]}
    assert subsets == {"10_shapes": 10, "5_mixed": 5}
    assert all(Path(s["image_dir"]).is_dir() for s in ds["subsets"])


def test_held_out_prompts_are_not_training_captions(dataset):
    items = load_manifest(dataset)
    train = {i.caption for i in items if i.image.startswith("train/")}
    prompts = (dataset / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 4 and not train & set(prompts)
    assert len(train) == 18  # every training caption is distinct


def _region_colour(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return pixels[mask].reshape(-1, 3).mean(axis=0)


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - rgb) ** 2)))


def test_images_show_what_captions_say(dataset):
    """Read the picture back: background colour, shape colour and the shape's position follow the caption."""
    for item in load_manifest(dataset):
        caption = item.caption.split()
        pixels = np.asarray(Image.open(dataset / item.image).convert("RGB"), dtype=np.float64)
        background = caption[caption.index("background") - 1]
        corners = np.stack([pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]])
        assert _nearest_colour(np.median(corners, axis=0)) == background, item.image
        # pixels that differ from the background are the shape
        bg_rgb = np.array(COLOURS[background], dtype=np.float64)
        shape_pixels = np.abs(pixels - bg_rgb).sum(axis=2) > 60
        assert shape_pixels.sum() >= 20, item.image
        assert _nearest_colour(_region_colour(pixels, shape_pixels)) == caption[2], item.image
        assert caption[3] in SHAPES
        ys, xs = np.nonzero(shape_pixels)
        height, width = shape_pixels.shape
        position = " ".join(caption[caption.index("the") + 1 : caption.index("on")])
        fx, fy = POSITIONS[position]
        assert abs(xs.mean() / width - fx) < 0.12 and abs(ys.mean() / height - fy) < 0.12, (item.image, position)
        # bounding box over the shorter side: small ≤ 2·0.13 (+1 px), large ≥ 2·0.82·0.21 (the square)
        extent = (max(xs.max() - xs.min(), ys.max() - ys.min()) + 1) / min(width, height)
        assert (extent > 0.3) == (caption[1] == "large"), (item.image, extent)


def test_shapes_differ_from_each_other():
    masks = {s: shape_mask(ShapeSpec(s, "red", "large", "center", "blue")) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert np.abs(masks[a] - masks[b]).mean() > 0.01, (a, b)
    # coverage is within [0, 1] and centred
    for mask in masks.values():
        assert 0 <= mask.min() and mask.max() <= 1
        ys, xs = np.nonzero(mask > 0.5)
        assert abs(xs.mean() - 32) < 2.5 and abs(ys.mean() - 32) < 4


def test_plan_is_balanced_over_shapes():
    plan = plan_dataset(seed=0, num_shapes=48, num_mixed=0, num_eval=0)
    counts = {s: sum(spec.shape == s for spec in plan["10_shapes"]) for s in SHAPES}
    assert set(counts.values()) == {8}
