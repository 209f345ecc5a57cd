"""A tiny captioned image dataset drawn procedurally: one coloured shape on a plain background.

Captions say exactly what is drawn ("a small red circle in the top left on a blue background"), so a
model can learn colour, shape, size and position from text. Written in kohya's folder form:

    dataset/
      train/10_shapes/shape_000.png + .txt   64×64, 10 repeats
      train/5_mixed/mixed_000.png + .txt      64×64, 64×48 and 48×64 (exercises bucketing), 5 repeats
      eval/eval_000.png + .txt                held-out captions (never in train/) with their images
      prompts.txt                             the held-out captions, one a line (evaluation / probes)
      manifest.json                           what each file shows (shape, colours, box, size)
      dataset.toml                            kohya dataset config pointing at train/

Drawing is pure numpy (2× supersampled masks, box-filtered), so the same arguments give the same
pixels on every machine; PNGs are written by PIL without timestamps, so the same bytes too.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES: dict[str, float] = {"small": 0.13, "large": 0.21}  # radius as a fraction of the shorter side
# name -> (x, y) of the shape centre as fractions of width / height
POSITIONS: dict[str, tuple[float, float]] = {
    f"{row} {col}": (x, y)
    for (row, y), (col, x) in itertools.product(
        (("top", 0.24), ("middle", 0.5), ("bottom", 0.76)), (("left", 0.24), ("middle", 0.5), ("right", 0.76))
    )
}
POSITIONS["center"] = POSITIONS.pop("middle middle")
TRAIN_SUBSETS = (("10_shapes", "shape", 10), ("5_mixed", "mixed", 5))


@dataclass(frozen=True)
class ShapeSpec:
    """Everything one image shows; the caption is derived from it."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    width: int = 64
    height: int = 64

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.position} on a {self.background} background"

    def centre_and_radius(self) -> tuple[float, float, float]:
        fx, fy = POSITIONS[self.position]
        return fx * self.width, fy * self.height, SIZES[self.size] * min(self.width, self.height)


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (for the tokenizer's merges)."""
    words = {"a", "in", "the", "on", "background"}
    words.update(COLOURS, SHAPES, SIZES)
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def _star_radius(angle: np.ndarray, radius: float) -> np.ndarray:
    """Outline radius of a 5-pointed star (inner radius 0.45) as a function of angle."""
    sector = 2 * math.pi / 5
    phase = np.mod(angle + math.pi / 2, sector) / sector  # 0 at a point, 0.5 between points
    inner = 0.45 * radius
    t = np.abs(phase - 0.5) * 2  # 1 at a point, 0 midway
    return inner + (radius - inner) * t


def _triangle_mask(dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Upward equilateral triangle inscribed in a circle of `radius` (image y grows downwards)."""
    slope = math.tan(math.radians(60))
    below_apex = dy + radius  # the two slanted edges pass through the apex (0, -r)
    return (dy <= radius * 0.5) & (below_apex >= slope * dx) & (below_apex >= -slope * dx)


MaskFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
_MASKS: dict[str, MaskFn] = {
    "circle": lambda dx, dy, r: dx**2 + dy**2 <= r**2,
    "square": lambda dx, dy, r: (np.abs(dx) <= 0.82 * r) & (np.abs(dy) <= 0.82 * r),
    "diamond": lambda dx, dy, r: np.abs(dx) + np.abs(dy) <= 1.1 * r,
    "cross": lambda dx, dy, r: ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r))
    | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)),
    "triangle": _triangle_mask,
    "star": lambda dx, dy, r: np.hypot(dx, dy) <= _star_radius(np.arctan2(dy, dx), r),
}


def shape_mask(spec: ShapeSpec, supersample: int = 2) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape, shape (height, width)."""
    s = supersample
    cx, cy, radius = spec.centre_and_radius()
    ys = (np.arange(spec.height * s) + 0.5) / s
    xs = (np.arange(spec.width * s) + 0.5) / s
    dx, dy = np.meshgrid(xs - cx, ys - cy)
    fine = _MASKS[spec.shape](dx, dy, radius).astype(np.float64)
    return fine.reshape(spec.height, s, spec.width, s).mean(axis=(1, 3))


def render(spec: ShapeSpec) -> Image.Image:
    coverage = shape_mask(spec)[..., None]
    fg = np.array(COLOURS[spec.colour], dtype=np.float64)
    bg = np.array(COLOURS[spec.background], dtype=np.float64)
    pixels = np.rint(coverage * fg + (1 - coverage) * bg).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def all_specs(width: int = 64, height: int = 64) -> list[ShapeSpec]:
    """Every (shape, colour, size, position, background ≠ colour) combination, in a fixed order."""
    return [
        ShapeSpec(shape, colour, size, position, background, width, height)
        for shape, colour, size, position, background in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, COLOURS)
        if background != colour
    ]


def _balanced_pick(rng: np.random.Generator, count: int, taken: set[str]) -> list[ShapeSpec]:
    """`count` distinct specs cycling through shapes and colours so each appears about equally often."""
    specs = all_specs()
    order = rng.permutation(len(specs))
    by_key: dict[tuple[str, str], list[ShapeSpec]] = {}
    for index in order:
        spec = specs[index]
        by_key.setdefault((spec.shape, spec.colour), []).append(spec)
    keys = [(SHAPES[i % len(SHAPES)], list(COLOURS)[(i + i // len(SHAPES)) % len(COLOURS)])
            for i in range(len(SHAPES) * len(COLOURS))]
    picked: list[ShapeSpec] = []
    cursor = 0
    while len(picked) < count:
        candidates = by_key[keys[cursor % len(keys)]]
        cursor += 1
        while candidates and candidates[-1].caption in taken:
            candidates.pop()
        if candidates:
            spec = candidates.pop()
            taken.add(spec.caption)
            picked.append(spec)
    return picked


@dataclass(frozen=True)
class DatasetItem:
    image: str  # path relative to the dataset directory
    caption: str
    spec: dict


def plan_dataset(seed: int = 0, num_shapes: int = 48, num_mixed: int = 16, num_eval: int = 16) -> dict[str, list]:
    """Decide every image of every folder (pure; no files). Keys: subset folder names and 'eval'."""
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    shapes = _balanced_pick(rng, num_shapes, taken)
    mixed = _balanced_pick(rng, num_mixed, taken)
    sizes = [(64, 64), (64, 48), (48, 64)]
    mixed = [
        ShapeSpec(s.shape, s.colour, s.size, s.position, s.background, *sizes[i % 3]) for i, s in enumerate(mixed)
    ]
    evaluation = _balanced_pick(rng, num_eval, taken)
    return {"10_shapes": shapes, "5_mixed": mixed, "eval": evaluation}


def _write_png(image: Image.Image, path: Path) -> None:
    # No ancillary chunks (no time, no text): identical inputs give identical bytes.
    image.save(path, format="PNG", optimize=False, compress_level=6)


def write_dataset_toml(dataset_dir: Path, path: Path, batch_size: int = 4) -> Path:
    """kohya sd-scripts dataset config for the train/ subsets, with absolute paths under `dataset_dir`."""
    lines = [
        "# kohya sd-scripts dataset config for the tiny offline kit (sd_scripts_surge.tiny)",
        "[general]",
        "shuffle_caption = false",
        'caption_extension = ".txt"',
        "keep_tokens = 0",
        "",
        "[[datasets]]",
        "resolution = 64",
        f"batch_size = {batch_size}",
        "enable_bucket = true",
        "min_bucket_reso = 32",
        "max_bucket_reso = 128",
        "bucket_reso_steps = 16  # 64 px at 1024 is 4 latent cells; 16 px is 2 latent cells at this scale",
        "bucket_no_upscale = false",
    ]
    for folder, _prefix, repeats in TRAIN_SUBSETS:
        image_dir = dataset_dir / "train" / folder
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = {json.dumps(str(image_dir))}",
                  f"  num_repeats = {repeats}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_dataset(
    directory: str | Path,
    *,
    seed: int = 0,
    num_shapes: int = 48,
    num_mixed: int = 16,
    num_eval: int = 16,
    final_dir: str | Path | None = None,
) -> Path:
    """Draw and write the dataset into `directory` (see module doc for the layout); return `directory`.

    `final_dir`: where the dataset will live when `directory` is a staging place that gets renamed
    (the TOML holds absolute paths); default `directory`.
    """
    directory = Path(directory)
    plan = plan_dataset(seed, num_shapes, num_mixed, num_eval)
    manifest: list[dict] = []
    for folder, prefix, _repeats in TRAIN_SUBSETS:
        out = directory / "train" / folder
        out.mkdir(parents=True, exist_ok=True)
        for index, spec in enumerate(plan[folder]):
            stem = f"{prefix}_{index:03d}"
            _write_png(render(spec), out / f"{stem}.png")
            (out / f"{stem}.txt").write_text(spec.caption + "\n", encoding="utf-8")
            manifest.append(asdict(DatasetItem(f"train/{folder}/{stem}.png", spec.caption, asdict(spec))))
    eval_dir = directory / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    for index, spec in enumerate(plan["eval"]):
        stem = f"eval_{index:03d}"
        _write_png(render(spec), eval_dir / f"{stem}.png")
        (eval_dir / f"{stem}.txt").write_text(spec.caption + "\n", encoding="utf-8")
        manifest.append(asdict(DatasetItem(f"eval/{stem}.png", spec.caption, asdict(spec))))
    (directory / "prompts.txt").write_text("\n".join(s.caption for s in plan["eval"]) + "\n", encoding="utf-8")
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    write_dataset_toml(Path(final_dir or directory).absolute(), directory / "dataset.toml")
    return directory


def load_manifest(directory: str | Path) -> list[DatasetItem]:
    """The items written by make_dataset, train ones first, then eval."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the dataset with make_dataset() or ensure_tiny_kit()")
    return [DatasetItem(**item) for item in json.loads(path.read_text(encoding="utf-8"))]
