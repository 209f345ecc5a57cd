"""Unit maps: which pieces of a diffusers `UNet2DConditionModel` the surge engine watches, and how they connect.

A *unit* is a set of modules whose combined input → output we watch. Two maps come from one walk over the
model (so they fit any SD1/SD2/SDXL-shaped UNet, real size or tiny):

- ``mbw``: the merge-block-weight blocks of the original (ldm) layout. ``BASE`` = time (+ label/add)
  embedding, ``INnn`` = ``input_blocks.nn``, ``M00`` = ``middle_block``, ``OUTnn`` = ``output_blocks.nn``,
  ``out`` = final norm + conv. In diffusers terms: IN00 = conv_in; each down layer = resnets[j] (+ attentions[j]);
  each downsampler its own block; each up layer = resnets[j] (+ attentions[j]) (+ upsamplers in the last layer
  of a level). SDXL gives IN00–IN08 / OUT00–OUT08, SD1 IN00–IN11 / OUT00–OUT11. The names come from the
  one key map (``models.keymap.block_of`` on the UNet's own keys), so a unit is the block the merge tools,
  MBW and ``--block_lr`` give the same parameters; the final norm + conv, which the key map folds into the
  last OUT block, is surge's own ``out`` unit.
- ``fine``: every ResBlock, every transformer block (``transformer_blocks.k``) separately; a
  Transformer2DModel's entry (norm + proj_in, ``….in``) and exit (proj_out + residual, ``….out``) are units
  of their own so every parameter belongs to exactly one unit.

Where a unit's input or output is not simply "input of the first module / output of the last", its
`HookPoint`s say where to look (e.g. BASE's output is the ``temb`` argument the first ResBlock receives).

The graph: units in execution order (chain edges between neighbours) plus the UNet's skip connections
(down-side block i feeds the up-side block that pops its tensor). BASE is joined to the chain only at its
start, although its output (temb) reaches every ResBlock: hops measure distance along the feature path.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn

from sd_scripts_surge.models import keymap


@dataclass(frozen=True)
class HookPoint:
    """A tensor seen during the forward pass: the `arg`-th positional argument (or keyword `kw`) of `module`
    when ``when == "input"``; its return value (first element of a tuple) when ``when == "output"``."""

    module: str
    when: str = "input"  # "input" | "output"
    arg: int = 0
    kw: str | None = None


@dataclass(frozen=True)
class UnitSpec:
    name: str
    kind: str  # embed, conv_in, down_layer, downsample, mid, up_layer, out, resnet, attn_in, tblock, attn_out, upsample
    modules: tuple[str, ...]  # modules whose parameters belong to this unit, in execution order
    input_at: HookPoint
    output_at: HookPoint
    attention: tuple[str, ...] = ()  # diffusers `Attention` modules inside (per-head statistics)
    needs: tuple[str, ...] = ()  # shared side inputs needed to re-run alone: "temb", "context"
    side_points: tuple[tuple[str, HookPoint], ...] = ()  # unit-specific side inputs ("add_embeds", "residual")
    skip_from: str | None = None  # down-side unit whose output is concatenated onto this unit's input


@dataclass(frozen=True)
class UnitMap:
    name: str
    units: tuple[UnitSpec, ...]  # execution (chain) order
    skips: tuple[tuple[str, str], ...]  # (down-side source, up-side consumer)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def __getitem__(self, name: str) -> UnitSpec:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"unit {name!r} is not in unit map {self.name!r} (units: {', '.join(self.names)})")

    def index(self, name: str) -> int:
        return self.names.index(self[name].name)

    def edges(self) -> list[tuple[str, str]]:
        chain = [(a.name, b.name) for a, b in zip(self.units, self.units[1:])]
        return chain + list(self.skips)

    def fingerprint(self) -> str:
        """Stable hash of the map (names, modules, hook points): part of the flavor cache key."""
        data = json.dumps({"name": self.name, "units": [asdict(u) for u in self.units], "skips": self.skips},
                          sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the walk


@dataclass
class _Layer:
    """One ldm block (input_blocks.n / middle_block / output_blocks.n / BASE / out) and its fine units."""

    side: str  # "base" | "in" | "mid" | "out_blocks" | "final"
    mbw: UnitSpec
    fine: list[UnitSpec] = field(default_factory=list)


def _attention_modules(unet: nn.Module, prefix: str) -> tuple[str, ...]:
    from diffusers.models.attention_processor import Attention

    return tuple(f"{prefix}.{n}" for n, m in unet.get_submodule(prefix).named_modules() if isinstance(m, Attention))


def _fine_transformer(unet: nn.Module, t2d: str) -> list[UnitSpec]:
    """Split one Transformer2DModel into entry, blocks and exit units."""
    n_blocks = len(unet.get_submodule(t2d).transformer_blocks)
    blocks = [f"{t2d}.transformer_blocks.{k}" for k in range(n_blocks)]
    units = [UnitSpec(f"{t2d}.in", "attn_in", (f"{t2d}.norm", f"{t2d}.proj_in"), HookPoint(t2d, "input"),
                      HookPoint(blocks[0], "input"))]
    for b in blocks:
        units.append(UnitSpec(b, "tblock", (b,), HookPoint(b, "input"), HookPoint(b, "output"),
                              attention=_attention_modules(unet, b), needs=("context",)))
    units.append(UnitSpec(f"{t2d}.out", "attn_out", (f"{t2d}.proj_out",), HookPoint(blocks[-1], "output"),
                          HookPoint(t2d, "output"), side_points=(("residual", HookPoint(t2d, "input")),)))
    return units


def _resnet_unit(path: str) -> UnitSpec:
    return UnitSpec(path, "resnet", (path,), HookPoint(path, "input"), HookPoint(path, "output"), needs=("temb",))


def _resnet_layer(unet: nn.Module, block: str, j: int, name: str, side: str, upsampler: bool = False) -> _Layer:
    """One ldm block made of resnets[j] (+ attentions[j]) (+ the upsampler) of a diffusers down/up block."""
    res = f"{block}.resnets.{j}"
    modules: tuple[str, ...] = (res,)
    fine = [_resnet_unit(res)]
    needs: tuple[str, ...] = ("temb",)
    attention: tuple[str, ...] = ()
    attns = getattr(unet.get_submodule(block), "attentions", None)
    if attns is not None and len(attns) > j:
        t2d = f"{block}.attentions.{j}"
        modules += (t2d,)
        fine += _fine_transformer(unet, t2d)
        needs = ("temb", "context")
        attention = _attention_modules(unet, t2d)
    if upsampler:
        up = f"{block}.upsamplers.0"
        modules += (up,)
        fine.append(UnitSpec(up, "upsample", (up,), HookPoint(up, "input"), HookPoint(up, "output")))
    kind = "down_layer" if side == "in" else "up_layer"
    mbw = UnitSpec(name, kind, modules, HookPoint(res, "input"), HookPoint(modules[-1], "output"),
                   attention=attention, needs=needs)
    return _Layer(side, mbw, fine)


def _walk(unet: nn.Module) -> list[_Layer]:
    first_resnet = "down_blocks.0.resnets.0"
    layers: list[_Layer] = []
    # block names come from the one key map (models/keymap.py), counted from this UNet's own keys
    arch = keymap.detect_architecture({n: tuple(p.shape) for n, p in unet.named_parameters()})

    def block(module: str) -> str:
        name = keymap.block_of(module + ".weight", arch)
        if name is None:
            raise ValueError(f"the key map does not know this UNet ({arch.name}); no block for {module!r}")
        return name

    base_modules = ("time_embedding",)
    side_points: tuple[tuple[str, HookPoint], ...] = ()
    if getattr(unet, "add_embedding", None) is not None:
        base_modules += ("add_embedding",)
        side_points = (("add_embeds", HookPoint("add_embedding", "input")),)
    if getattr(unet, "class_embedding", None) is not None:
        raise ValueError("UNets with class_embedding are not supported by the unit maps (only SD1/SD2/SDXL shapes)")
    base = UnitSpec(block("time_embedding"), "embed", base_modules, HookPoint("time_embedding", "input"),
                    HookPoint(first_resnet, "input", 1, "temb"), side_points=side_points)
    layers.append(_Layer("base", base, [UnitSpec(**{**_fields(base), "name": "time_embed"})]))

    conv_in = UnitSpec(block("conv_in"), "conv_in", ("conv_in",), HookPoint("conv_in", "input"),
                       HookPoint("conv_in", "output"))
    layers.append(_Layer("in", conv_in, [UnitSpec(**{**_fields(conv_in), "name": "conv_in"})]))

    for i, down in enumerate(unet.down_blocks):
        for j in range(len(down.resnets)):
            res = f"down_blocks.{i}.resnets.{j}"
            layers.append(_resnet_layer(unet, f"down_blocks.{i}", j, block(res), "in"))
        if getattr(down, "downsamplers", None):
            ds = f"down_blocks.{i}.downsamplers.0"
            spec = UnitSpec(block(ds), "downsample", (ds,), HookPoint(ds, "input"),
                            HookPoint(ds, "output"))
            layers.append(_Layer("in", spec, [UnitSpec(**{**_fields(spec), "name": ds})]))

    mid = unet.mid_block
    if mid is not None:
        fine = [_resnet_unit("mid_block.resnets.0")]
        for k in range(len(getattr(mid, "attentions", []))):
            fine += _fine_transformer(unet, f"mid_block.attentions.{k}")
            fine.append(_resnet_unit(f"mid_block.resnets.{k + 1}"))
        layers.append(_Layer("mid", UnitSpec(block("mid_block"), "mid", ("mid_block",), HookPoint("mid_block", "input"),
                                             HookPoint("mid_block", "output"),
                                             attention=_attention_modules(unet, "mid_block"),
                                             needs=("temb", "context")), fine))

    for i, up in enumerate(unet.up_blocks):
        n = len(up.resnets)
        for j in range(n):
            upsampler = j == n - 1 and bool(getattr(up, "upsamplers", None))
            name = block(f"up_blocks.{i}.resnets.{j}")
            layers.append(_resnet_layer(unet, f"up_blocks.{i}", j, name, "out_blocks", upsampler))

    out_mods = tuple(m for m in ("conv_norm_out", "conv_act", "conv_out") if getattr(unet, m, None) is not None)
    out = UnitSpec("out", "out", out_mods, HookPoint(out_mods[0], "input"), HookPoint("conv_out", "output"))
    layers.append(_Layer("final", out, [out]))
    return layers


def _fields(spec: UnitSpec) -> dict:
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__}


def _with_skips(units: list[UnitSpec], sources: list[str], consumers: list[str]) -> tuple[list[UnitSpec], list]:
    """Pair skip sources and consumers like the UNet does: the up side pops the most recent down-side tensor."""
    if len(sources) != len(consumers):
        raise ValueError(f"UNet has {len(sources)} skip tensors but {len(consumers)} up-side layers")
    pairs = list(zip(reversed(sources), consumers))
    by_consumer = dict((c, s) for s, c in pairs)
    units = [UnitSpec(**{**_fields(u), "skip_from": by_consumer[u.name]}) if u.name in by_consumer else u
             for u in units]
    return units, pairs


def mbw_unit_map(unet: nn.Module) -> UnitMap:
    """The MBW-granularity map (BASE, INnn, M00, OUTnn, out)."""
    layers = _walk(unet)
    units = [layer.mbw for layer in layers]
    sources = [layer.mbw.name for layer in layers if layer.side == "in"]
    consumers = [layer.mbw.name for layer in layers if layer.side == "out_blocks"]
    units, pairs = _with_skips(units, sources, consumers)
    return UnitMap("mbw", tuple(units), tuple(pairs))


def fine_unit_map(unet: nn.Module) -> UnitMap:
    """Every ResBlock, transformer block, down/upsampler separately (plus BASE, conv_in, out)."""
    layers = _walk(unet)
    units = [u for layer in layers for u in layer.fine]
    sources = [layer.fine[-1].name for layer in layers if layer.side == "in"]
    consumers = [layer.fine[0].name for layer in layers if layer.side == "out_blocks"]
    units, pairs = _with_skips(units, sources, consumers)
    return UnitMap("fine", tuple(units), tuple(pairs))


UNIT_MAPS: dict[str, Callable[[nn.Module], UnitMap]] = {"mbw": mbw_unit_map, "fine": fine_unit_map}


def build_unit_map(unet: nn.Module, name: str = "mbw") -> UnitMap:
    """Build a registered unit map by name (`--surge_unit_map`)."""
    try:
        builder = UNIT_MAPS[name]
    except KeyError:
        raise ValueError(f"unknown unit map {name!r}; choose one of: {', '.join(UNIT_MAPS)}") from None
    return builder(unet)


# ---------------------------------------------------------------------------------------------- the graph


def hop_distances(unit_map: UnitMap) -> dict[str, dict[str, int]]:
    """All-pairs hop counts along the UNet graph (chain + skips, undirected), by breadth-first search."""
    adjacency: dict[str, set[str]] = {n: set() for n in unit_map.names}
    for a, b in unit_map.edges():
        adjacency[a].add(b)
        adjacency[b].add(a)
    result: dict[str, dict[str, int]] = {}
    for start in unit_map.names:
        dist = {start: 0}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in sorted(adjacency[node]):
                if nxt not in dist:
                    dist[nxt] = dist[node] + 1
                    queue.append(nxt)
        result[start] = dist
    return result


# ------------------------------------------------------------------------------------------ parameter owners


def unit_of_module_path(unit_map: UnitMap) -> Callable[[str], str | None]:
    """Return a function mapping a parameter or LoRA module name to its unit (None when it belongs to none).

    Accepts diffusers names (``down_blocks.1.attentions.0.proj_in.weight``, optionally prefixed ``unet.``) and
    kohya LoRA names (``lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight``): both are compared
    with dots turned into underscores, the longest owning module prefix wins.
    """
    owners = sorted(((m.replace(".", "_"), u.name) for u in unit_map.units for m in u.modules),
                    key=lambda x: -len(x[0]))

    def lookup(name: str) -> str | None:
        flat = name
        for prefix in ("lora_unet_", "unet.", "model.diffusion_model."):
            if flat.startswith(prefix):
                flat = flat[len(prefix):]
        flat = flat.replace(".", "_")
        for owner, unit in owners:
            if flat == owner or flat.startswith(owner + "_"):
                return unit
        return None

    return lookup


# ----------------------------------------------------------------------------- a deeper teacher (BK-SDM)


def _stage_of(spec: UnitSpec) -> tuple:
    """Which stage an mbw unit sits in: ("down", i), ("ds", i), ("mid",), ("up", i) or its own name."""
    first = spec.modules[0]
    parts = first.split(".")
    if parts[0] == "down_blocks":
        return ("ds" if parts[2] == "downsamplers" else "down", int(parts[1]))
    if parts[0] == "up_blocks":
        return ("up", int(parts[1]))
    if parts[0] == "mid_block":
        return ("mid",)
    return (spec.name,)


def _by_stage(unit_map: UnitMap) -> dict[tuple, list[UnitSpec]]:
    """The map's units grouped by `_stage_of`, in execution order within each stage."""
    stages: dict[tuple, list[UnitSpec]] = {}
    for spec in unit_map.units:
        stages.setdefault(_stage_of(spec), []).append(spec)
    return stages


def _same_layout(student: nn.Module, teacher: nn.Module) -> bool:
    keys = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
            "transformer_layers_per_block", "mid_block_type")
    return all(student.config.get(k) == teacher.config.get(k) for k in keys)


def _merge_range(name: str, layers: list[UnitSpec], skip_from: str | None) -> UnitSpec:
    """One unit standing for several consecutive teacher layers: input of the first, output of the last."""
    return UnitSpec(name, layers[0].kind, tuple(m for u in layers for m in u.modules), layers[0].input_at,
                    layers[-1].output_at, attention=tuple(a for u in layers for a in u.attention),
                    needs=tuple(dict.fromkeys(n for u in layers for n in u.needs)),
                    side_points=tuple(p for u in layers for p in u.side_points), skip_from=skip_from)


def aligned_teacher_map(student_map: UnitMap, student: nn.Module, teacher: nn.Module) -> UnitMap:
    """The student's unit map expressed on a deeper teacher, unit names kept (for depth-pruned students).

    Same layout: the student's map itself. Otherwise (a BK-SDM-style student with fewer layers per stage
    and/or no mid block, same widths) each stage's layers are paired: student layer 0 stands for teacher
    layers 0..n_t−n_s, student layer j > 0 for teacher layer j + n_t − n_s, so every unit's output is
    compared where the same tensor shape and role appear in the teacher and the last layer of every stage
    (which takes the stage-input skip on the up side) meets the teacher's last layer. A teacher mid block
    the student lacks is folded into the student's last down-side unit: its output is what the first
    up-side layer receives in both networks. Only the ``mbw`` map can be aligned.
    """
    if _same_layout(student, teacher):
        return student_map
    if student_map.name != "mbw":
        raise ValueError(f"the student's layout differs from the teacher's (a pruned student): use unit map 'mbw' "
                         f"(--surge_unit_map mbw), not {student_map.name!r}")
    if tuple(student.config.block_out_channels) != tuple(teacher.config.block_out_channels) or \
            tuple(student.config.down_block_types) != tuple(teacher.config.down_block_types):
        raise ValueError("only depth-pruned students can learn from a different teacher: the block types and "
                         f"widths must match (student {tuple(student.config.block_out_channels)}, teacher "
                         f"{tuple(teacher.config.block_out_channels)})")
    teacher_map = mbw_unit_map(teacher)
    t_stages, s_stages = _by_stage(teacher_map), _by_stage(student_map)
    aligned: dict[str, UnitSpec] = {}
    for stage, s_layers in s_stages.items():
        t_layers = t_stages.get(stage)
        if not t_layers or len(t_layers) < len(s_layers):
            raise ValueError(f"student stage {stage} has {len(s_layers)} layers, the teacher "
                             f"{len(t_layers or [])}: a student may only have fewer layers than its teacher")
        extra = len(t_layers) - len(s_layers)
        for j, spec in enumerate(s_layers):
            chosen = t_layers[: extra + 1] if j == 0 else [t_layers[j + extra]]
            aligned[spec.name] = _merge_range(spec.name, chosen, spec.skip_from)
    if ("mid",) in t_stages and ("mid",) not in s_stages:
        last_down = [u.name for u in student_map.units if _stage_of(u)[0] in ("down", "ds")][-1]
        aligned[last_down] = _merge_range(last_down, [aligned[last_down]] + t_stages[("mid",)],
                                          aligned[last_down].skip_from)
    units = tuple(aligned[name] for name in student_map.names)
    return UnitMap(f"mbw->{teacher_map.name}", units, student_map.skips)
