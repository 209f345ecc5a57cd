"""The one key map: architecture detection by key set, MBW block tables and the key → block map
(supermerger's convention), MBW presets and elemental rules.

Used by the merge engine and its MBW weights (merge_tools), `sd-merge blocks`/`inspect`, LoRA extraction
(per-block energy, with models/lora_keys for kohya names), AutoMBW and the GUI's block sliders. The surge
unit map (surge/units.py walks the diffusers module tree for the structure) and `--block_lr`
(training/block_lr.py) take their block names from `block_of` here; tests check that every UNet
parameter's unit is the block this module gives its key, in both layouts, depth-pruned UNets included.

Blocks
- SD1 / SD2 (26): BASE, IN00–IN11, M00, OUT00–OUT11.   SDXL (20): BASE, IN00–IN08, M00, OUT00–OUT08.
  UNet ``input_blocks.N`` → INnn, ``middle_block`` → M00, ``output_blocks.N`` → OUTnn; ``time_embed`` and
  ``label_emb`` → BASE (before the input blocks); the final ``out.`` (norm + conv) → the last OUT block;
  every key outside the UNet (text encoders, VAE, scheduler buffers) → BASE. This is supermerger's
  ``blockfromkey`` convention (sd-mecha's ``convert_sd1_blocks_to_ldm`` documents the same sources).
  Diffusers UNet keys map to the same blocks: conv_in → IN00, down_blocks.i.{resnets,attentions}.j →
  IN(1+3i+j), down_blocks.i.downsamplers → IN(3i+3), mid_block → M00, up_blocks.i.{resnets,attentions}.j →
  OUT(3i+j), up_blocks.i.upsamplers → OUT(3i+2), conv_norm_out/conv_out → last OUT, time/add embeddings → BASE.
  (Those offsets are for the standard levels; the levels are counted from the keys, so a UNet with other
  layer counts, e.g. a BK-SDM student, is numbered in execution order the same way. The block list follows
  the keys too for diffusers: a UNet without a middle block has no M00. ldm keys carry their block index
  themselves, so ldm files keep the standard block list.)
- SD3: BASE + JB00… (one per ``joint_blocks.N`` / diffusers ``transformer_blocks.N``).
- Flux: BASE + DB00… (``double_blocks.N`` / diffusers ``transformer_blocks.N``) + SB00…
  (``single_blocks.N`` / ``single_transformer_blocks.N``).
Unknown architectures have no block map: they merge per key, and MBW weights are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_INP = re.compile(r"(?:^|\.)input_blocks\.(\d+)\.")
_MID = re.compile(r"(?:^|\.)middle_block\.")
_OUT = re.compile(r"(?:^|\.)output_blocks\.(\d+)\.")
_D_DOWN = re.compile(r"(?:^|\.)down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.")
_D_UP = re.compile(r"(?:^|\.)up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.")
_JOINT = re.compile(r"(?:^|\.)joint_blocks\.(\d+)\.")
_DOUBLE = re.compile(r"(?:^|\.)double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"(?:^|\.)single_blocks\.(\d+)\.")
_D_SINGLE = re.compile(r"(?:^|\.)single_transformer_blocks\.(\d+)\.")
_D_TRANSFORMER = re.compile(r"(?:^|\.)transformer_blocks\.(\d+)\.")
UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Architecture:
    name: str  # sd1, sd2, sdxl, sd3, flux, unknown
    layout: str  # ldm (single-file original layout), diffusers, or "" when unknown
    blocks: tuple[str, ...]  # MBW block names in order; empty when unknown
    # diffusers UNet layout, per level: (resnets, has a downsampler) on the down side and resnets on the up
    # side. Empty means the standard SD1/SDXL levels (2 resnets + downsampler down, 3 resnets up); detection
    # fills it from the keys, so depth-pruned students (BK-SDM) get their own block numbering.
    down_levels: tuple[tuple[int, bool], ...] = ()
    up_levels: tuple[int, ...] = ()

    @property
    def known(self) -> bool:
        return bool(self.blocks)


def unet_blocks(n_in: int, n_out: int, mid: bool = True) -> tuple[str, ...]:
    return ("BASE", *(f"IN{i:02d}" for i in range(n_in)), *(("M00",) if mid else ()),
            *(f"OUT{i:02d}" for i in range(n_out)))


SD1_BLOCKS = unet_blocks(12, 12)
SDXL_BLOCKS = unet_blocks(9, 9)
UNKNOWN = Architecture("unknown", "", ())


def _max_index(keys: Sequence[str], pattern: re.Pattern[str]) -> int:
    best = -1
    for k in keys:
        if m := pattern.search(k):
            best = max(best, int(m.group(1)))
    return best


def _context_dim(shapes: Mapping[str, Sequence[int]], suffix: str) -> int | None:
    for k, shape in shapes.items():
        if k.endswith(suffix) and len(shape) == 2:
            return int(shape[1])
    return None


def detect_architecture(shapes: Mapping[str, Sequence[int]]) -> Architecture:
    """Name the architecture from a checkpoint's key → shape map (shapes tell SD1 from SD2)."""
    keys = list(shapes)
    if any(_JOINT.search(k) for k in keys):
        n = _max_index(keys, _JOINT) + 1
        return Architecture("sd3", "ldm", ("BASE", *(f"JB{i:02d}" for i in range(n))))
    if any(_DOUBLE.search(k) for k in keys) and any(_SINGLE.search(k) for k in keys):
        nd, ns = _max_index(keys, _DOUBLE) + 1, _max_index(keys, _SINGLE) + 1
        return Architecture(
            "flux", "ldm", ("BASE", *(f"DB{i:02d}" for i in range(nd)), *(f"SB{i:02d}" for i in range(ns)))
        )
    if any(_D_SINGLE.search(k) for k in keys):
        nd, ns = _max_index(keys, _D_TRANSFORMER) + 1, _max_index(keys, _D_SINGLE) + 1
        # _D_TRANSFORMER also matches inside single_transformer_blocks; count double blocks without them
        nd = _max_index([k for k in keys if "single_transformer_blocks" not in k], _D_TRANSFORMER) + 1
        return Architecture(
            "flux", "diffusers", ("BASE", *(f"DB{i:02d}" for i in range(nd)), *(f"SB{i:02d}" for i in range(ns)))
        )
    if (
        any(_D_TRANSFORMER.search(k) for k in keys)
        and any("context_embedder" in k for k in keys)
        and any("pos_embed" in k for k in keys)
    ):
        n = _max_index(keys, _D_TRANSFORMER) + 1
        return Architecture("sd3", "diffusers", ("BASE", *(f"JB{i:02d}" for i in range(n))))
    if any(_INP.search(k) for k in keys):
        # ldm keys name their block (input_blocks.N), so block_of needs no counting; the block list is the
        # standard table (a partial key set, e.g. a UNet subset, still takes the model's full MBW weights)
        if any(".label_emb." in k for k in keys) or _max_index(keys, _INP) <= 8:
            return Architecture("sdxl", "ldm", SDXL_BLOCKS)
        ctx = _context_dim(shapes, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        sd2 = ctx == 1024 or any(k.startswith("cond_stage_model.model.") for k in keys)
        return Architecture("sd2" if sd2 else "sd1", "ldm", SD1_BLOCKS)
    if any(_D_DOWN.search(k) for k in keys):
        down, up = _diffusers_levels(keys)
        sdxl = any("add_embedding." in k for k in keys)
        standard = SDXL_BLOCKS if sdxl else SD1_BLOCKS
        n_in = 1 + sum(n + has_down for n, has_down in down) if down else standard.index("M00") - 1
        n_out = sum(up) if up else len(standard) - standard.index("M00") - 1
        blocks = unet_blocks(n_in, n_out, any("mid_block." in k for k in keys) or not (down and up))
        if sdxl:
            return Architecture("sdxl", "diffusers", blocks, down, up)
        ctx = _context_dim(shapes, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
        return Architecture("sd2" if ctx == 1024 else "sd1", "diffusers", blocks, down, up)
    return UNKNOWN


def _diffusers_levels(keys: Sequence[str]) -> tuple[tuple[tuple[int, bool], ...], tuple[int, ...]]:
    """Per level of a diffusers UNet: (resnets, downsampler?) down and resnets up, counted from the keys."""
    down: dict[int, list] = {}
    up: dict[int, int] = {}
    for k in keys:
        if m := _D_DOWN.search(k):
            level = down.setdefault(int(m.group(1)), [0, False])
            if m.group(2) == "downsamplers":
                level[1] = True
            elif m.group(2) == "resnets":
                level[0] = max(level[0], int(m.group(3)) + 1)
        elif m := _D_UP.search(k):
            count = int(m.group(3)) + 1 if m.group(2) == "resnets" else 0
            up[int(m.group(1))] = max(up.get(int(m.group(1)), 0), count)

    # a partial key set (a level missing, or one without resnets) cannot be counted: standard levels apply
    def complete(levels: dict, counts: list[int]) -> bool:
        return sorted(levels) == list(range(len(levels))) and all(counts)

    down_levels = tuple((down[i][0], down[i][1]) for i in sorted(down))
    up_levels = tuple(up[i] for i in sorted(up))
    return (down_levels if complete(down, [n for n, _ in down_levels]) else (),
            up_levels if complete(up, list(up_levels)) else ())


_STANDARD_DOWN = ((2, True), (2, True), (2, True), (2, False))  # SD1 (the first three of them for SDXL)


def _diffusers_block(kind: str, level: int, index: int, arch: Architecture, side: str) -> str:
    """INnn / OUTnn of a diffusers down/up block member, from the arch's per-level layer counts."""
    if side == "down":
        levels = arch.down_levels or _STANDARD_DOWN
        offset = 1 + sum(n + has_down for n, has_down in levels[:level])
        n_res = levels[level][0] if level < len(levels) else 2
        return f"IN{offset + (n_res if kind == 'downsamplers' else index):02d}"
    ups = arch.up_levels or (3,) * (level + 1)
    offset = sum(ups[:level])
    n_res = ups[level] if level < len(ups) else 3
    return f"OUT{offset + (n_res - 1 if kind == 'upsamplers' else index):02d}"


def block_of(key: str, arch: Architecture) -> str | None:
    """The MBW block of a key (None for unknown architectures)."""
    if not arch.known:
        return None
    if arch.name in ("sd1", "sd2", "sdxl"):
        last_out = arch.blocks[-1]
        if arch.layout == "ldm":
            if not key.startswith(UNET_PREFIX):
                return "BASE"
            if ".time_embed" in key or ".label_emb" in key:
                return "BASE"
            if ".out." in key:
                return last_out
            if m := _INP.search(key):
                return f"IN{int(m.group(1)):02d}"
            if _MID.search(key):
                return "M00"
            if m := _OUT.search(key):
                return f"OUT{int(m.group(1)):02d}"
            return last_out
        if "time_embedding" in key or "add_embedding" in key:
            return "BASE"
        if "conv_in." in key and "down_blocks" not in key:
            return "IN00"
        if m := _D_DOWN.search(key):
            return _diffusers_block(m.group(2), int(m.group(1)), int(m.group(3)), arch, "down")
        if "mid_block." in key:
            return "M00"
        if m := _D_UP.search(key):
            return _diffusers_block(m.group(2), int(m.group(1)), int(m.group(3)), arch, "up")
        if "conv_norm_out." in key or "conv_out." in key:
            return last_out
        return "BASE"
    if arch.name == "sd3":
        m = _JOINT.search(key) if arch.layout == "ldm" else _D_TRANSFORMER.search(key)
        return f"JB{int(m.group(1)):02d}" if m else "BASE"
    if arch.name == "flux":
        if arch.layout == "ldm":
            if m := _DOUBLE.search(key):
                return f"DB{int(m.group(1)):02d}"
            if m := _SINGLE.search(key):
                return f"SB{int(m.group(1)):02d}"
            return "BASE"
        if m := _D_SINGLE.search(key):
            return f"SB{int(m.group(1)):02d}"
        if m := _D_TRANSFORMER.search(key):
            return f"DB{int(m.group(1)):02d}"
        return "BASE"
    return None


# ------------------------------------------------------------------------------ MBW presets (supermerger)


def _smoothstep(x: float) -> float:
    return x * x * (3.0 - 2.0 * x)


def _triangle(y: float) -> float:
    """0→1→0→1… with period 2: the fold supermerger's SMOOTHSTEP*k and /k presets use."""
    r = math.fmod(y, 2.0)
    return r if r <= 1.0 else 2.0 - r


def _fake_cubic_hermite(x: float) -> float:
    """The cubic through (0, 0), (½, ½), (1, 1) that supermerger's FAKE_CUBIC_HERMITE table samples."""
    return x * (25.0 / 6.0 + x * (-19.0 / 2.0 + x * 19.0 / 3.0))


def _true_cubic_hermite(x: float) -> float:
    """The cubic supermerger's TRUE_CUBIC_HERMITE table samples (f(1) = 1); its first block (x = 0) is 0, not
    the cubic's 1/24, as in the table."""
    if x <= 0.0:
        return 0.0
    return 1.0 / 24.0 + x * (25.0 / 6.0 + x * (-77.0 / 8.0 + x * 77.0 / 12.0))


def _shape_presets() -> dict[str, Callable[[float], float]]:
    out: dict[str, Callable[[float], float]] = {
        "GRAD_V": lambda x: abs(2.0 * x - 1.0),
        "GRAD_A": lambda x: 1.0 - abs(2.0 * x - 1.0),
        "FLAT_25": lambda x: 0.25,
        "FLAT_75": lambda x: 0.75,
        "SMOOTHSTEP": _smoothstep,
        "REVERSE-SMOOTHSTEP": lambda x: 1.0 - _smoothstep(x),
        "COSINE": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
        "REVERSE_COSINE": lambda x: (1.0 - math.cos(math.pi * x)) / 2.0,
        "TRUE_CUBIC_HERMITE": _true_cubic_hermite,
        "TRUE_REVERSE_CUBIC_HERMITE": lambda x: 1.0 - _true_cubic_hermite(x),
        "FAKE_CUBIC_HERMITE": _fake_cubic_hermite,
        "FAKE_REVERSE_CUBIC_HERMITE": lambda x: 1.0 - _fake_cubic_hermite(x),
    }
    for k in (2, 3, 4):
        out[f"SMOOTHSTEP*{k}"] = lambda x, k=k: _triangle(k * _smoothstep(x))
        out[f"R_SMOOTHSTEP*{k}"] = lambda x, k=k: 1.0 - _triangle(k * _smoothstep(x))
        out[f"SMOOTHSTEP/{k}"] = lambda x, k=k: _smoothstep(_triangle(k * x))
        out[f"R_SMOOTHSTEP/{k}"] = lambda x, k=k: 1.0 - _smoothstep(_triangle(k * x))
    return out


_SHAPES = _shape_presets()
# count presets: (leading blocks, trailing blocks) set to 1, plus an optional 0.5 before the trailing run
_COUNTS = {"WRAP08": (4, 4, False), "WRAP12": (6, 6, False), "WRAP14": (7, 7, False), "WRAP16": (8, 8, False),
           "OUT07": (0, 7, False), "OUT12": (0, 12, False), "OUT12_5": (0, 12, True)}
# ring presets: blocks whose distance from the middle block (M00) lies in [inner, outer] are 1; "soft" ones also
# give 0.5 to the two distances just outside. MID12_50: 0.5 except the first 5 and last 6 blocks (as in the table).
_RINGS = {"RING08_SOFT": (4, 6, True), "RING08_5": (3, 6, False), "RING10_5": (3, 7, False),
          "RING10_3": (2, 6, False)}
PRESETS: tuple[str, ...] = ("ALL_A", "ALL_B", *_SHAPES, *_COUNTS, *_RINGS, "MID12_50")


def preset_weights(name: str, n_blocks: int) -> list[float]:
    """supermerger's MBW preset `name` for an architecture with `n_blocks` blocks (BASE first).

    Shape presets are functions of the position x = j/(m−1) of the j-th of the m non-BASE blocks (IN00 …
    last OUT), so SD1's 26-block values equal supermerger's table and SDXL gets the same curve on 19
    points; BASE is 0 (ALL_B: 1). Count presets set the first/last n non-BASE blocks to 1; ring presets the
    blocks at a distance (in blocks) from the middle one, M00, so SDXL's rings hold as many blocks as SD1's.
    """
    key = name.upper()
    m = n_blocks - 1
    if key == "ALL_A":
        return [0.0] * n_blocks
    if key == "ALL_B":
        return [1.0] * n_blocks
    if key in _SHAPES:
        f = _SHAPES[key]
        return [0.0] + [f(j / (m - 1)) if m > 1 else f(0.0) for j in range(m)]
    if key in _COUNTS:
        lead, trail, half = _COUNTS[key]
        values = [0.0] * m
        for j in range(min(lead, m)):
            values[j] = 1.0
        for j in range(max(m - trail, 0), m):
            values[j] = 1.0
        if half and m - trail - 1 >= 0:
            values[m - trail - 1] = 0.5
        return [0.0] + values
    if key in _RINGS:
        inner, outer, soft = _RINGS[key]
        middle = (m - 1) // 2
        values = [0.0] * m
        for j in range(m):
            distance = abs(j - middle)
            if inner <= distance <= outer:
                values[j] = 1.0
            elif soft and distance in (inner - 1, outer + 1):
                values[j] = 0.5
        return [0.0] + values
    if key == "MID12_50":
        return [0.0] + [0.5 if 5 <= j < m - 6 else 0.0 for j in range(m)]
    raise ValueError(f"unknown MBW preset {name!r}; presets: {', '.join(PRESETS)}")


# ------------------------------------------------------------------------- elemental merge (supermerger)


@dataclass(frozen=True)
class ElementalRule:
    blocks: tuple[str, ...]  # empty: every block
    elements: tuple[str, ...]  # substrings of the key; empty: every key
    value: float
    not_blocks: bool = False
    not_elements: bool = False

    def matches(self, block: str | None, key: str) -> bool:
        in_blocks = not self.blocks or block in self.blocks
        in_elements = not self.elements or any(e in key for e in self.elements)
        return (in_blocks != self.not_blocks) and (in_elements != self.not_elements)


def parse_elemental(text: str, arch: Architecture) -> tuple[ElementalRule, ...]:
    """supermerger's elemental syntax: 'BLOCKS:ELEMENTS:RATIO' rules split by commas or new lines.

    BLOCKS and ELEMENTS are space-separated lists (blank: all), either may start with NOT to invert it;
    elements match as substrings of the key. Rules are applied in order, so a later rule wins.
    """
    rules = []
    for raw in text.splitlines():
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            fields = part.split(":")
            if len(fields) != 3:
                raise ValueError(f"elemental rule {part!r}: expected BLOCKS:ELEMENTS:RATIO")
            blocks, elements = fields[0].split(), fields[1].split()
            not_b = bool(blocks) and blocks[0].upper() == "NOT"
            not_e = bool(elements) and elements[0].upper() == "NOT"
            blocks = [b.upper() for b in blocks[1:]] if not_b else [b.upper() for b in blocks]
            elements = elements[1:] if not_e else elements
            unknown = [b for b in blocks if b not in arch.blocks]
            if unknown:
                raise ValueError(f"elemental rule {part!r}: unknown block(s) {unknown} for {arch.name}")
            try:
                value = float(fields[2])
            except ValueError:
                raise ValueError(f"elemental rule {part!r}: {fields[2]!r} is not a number") from None
            rules.append(ElementalRule(tuple(blocks), tuple(elements), value, not_b, not_e))
    return tuple(rules)


def elemental_value(rules: Sequence[ElementalRule], block: str | None, key: str, value: float) -> float:
    for rule in rules:
        if rule.matches(block, key):
            value = rule.value
    return value


@dataclass(frozen=True)
class BlockWeights:
    """A parameter value per MBW block: from a list in block order, or a {block: value} table."""

    values: tuple[tuple[str, float], ...]
    default: float | None = None

    @staticmethod
    def parse(spec: Any, arch: Architecture, param: str, default: float | None = None) -> BlockWeights:
        if not arch.known:
            raise ValueError(
                f"block weights for {param!r} need a known architecture (SD1/SD2/SDXL/SD3/Flux); "
                "these inputs were not recognised, so merge with a single value instead"
            )
        if isinstance(spec, str):
            if "," in spec:
                spec = [float(v) for v in spec.replace(" ", "").split(",") if v]
            else:
                spec = preset_weights(spec.strip(), len(arch.blocks))
        if isinstance(spec, Mapping) and "default" in spec:
            inner = spec["default"]
            rest = {b: v for b, v in spec.items() if b != "default"}
            if isinstance(inner, (int, float)):
                default, spec = float(inner), rest
            else:
                base = BlockWeights.parse(inner, arch, param)
                merged = dict(base.values)
                merged.update({b: float(v) for b, v in rest.items()})
                spec = merged
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(arch.blocks))
            if unknown:
                raise ValueError(
                    f"{param}: unknown block(s) {unknown} for {arch.name}; blocks are {', '.join(arch.blocks)}"
                )
            missing = [b for b in arch.blocks if b not in spec]
            if missing and default is None:
                raise ValueError(f"{param}: no value for block(s) {missing} and no default value")
            return BlockWeights(tuple((b, float(spec[b])) for b in arch.blocks if b in spec), default)
        spec = list(spec)
        if len(spec) != len(arch.blocks):
            raise ValueError(
                f"{param}: {len(spec)} block weights given, {arch.name} has {len(arch.blocks)} "
                f"({arch.blocks[0]}, {arch.blocks[1]} … {arch.blocks[-1]})"
            )
        return BlockWeights(tuple(zip(arch.blocks, (float(v) for v in spec))), default)

    def value(self, block: str) -> float:
        for b, v in self.values:
            if b == block:
                return v
        assert self.default is not None
        return self.default
