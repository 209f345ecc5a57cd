"""sd-scripts' `--block_lr` for SDXL full fine-tunes: one learning rate per ldm block (23 numbers).

Order, as in sdxl_train.py: 0 = time/label embedding, 1–9 = input_blocks 0–8, 10–12 = middle_block 0–2
(ResBlock, transformer, ResBlock), 13–21 = output_blocks 0–8, 22 = out (final norm + conv). A block with
LR 0 is frozen: its parameters leave the optimizer, as in sd-scripts.

Surge keeps its per-unit groups: a unit group is split by block where it spans several (the mid block), every
part keeps its "unit" key (the controller's multiplier still applies) and gets "block" and the block's LR.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sd_scripts_surge.surge.units import mbw_unit_map, unit_of_module_path

SDXL_BLOCK_COUNT = 23
_MID_PARTS = (("mid_block.resnets.0", 10), ("mid_block.attentions.0", 11), ("mid_block.resnets.1", 12))


def block_index_lookup(unet: nn.Module):  # noqa: ANN201 (returns a callable)
    """A function: diffusers UNet parameter name → sd-scripts block index (0–22). SDXL layout only."""
    unit_map = mbw_unit_map(unet)
    names = set(unit_map.names)
    expected = {"BASE", "M00", "out"} | {f"IN{i:02d}" for i in range(9)} | {f"OUT{i:02d}" for i in range(9)}
    if names != expected:
        raise ValueError("--block_lr needs the SDXL UNet layout (input_blocks 0-8, middle_block, output_blocks "
                         f"0-8); this UNet has units {sorted(names)}")
    unit_of = unit_of_module_path(unit_map)

    def index(param_name: str) -> int:
        unit = unit_of(param_name)
        if unit is None:
            raise ValueError(f"parameter {param_name!r} belongs to no SDXL block")
        if unit == "BASE":
            return 0
        if unit == "out":
            return 22
        if unit.startswith("IN"):
            return 1 + int(unit[2:])
        if unit.startswith("OUT"):
            return 13 + int(unit[3:])
        for prefix, i in _MID_PARTS:
            if param_name.startswith(prefix + "."):
                return i
        raise ValueError(f"parameter {param_name!r} of the middle block is in none of its 3 parts")

    return index


def apply_block_lr(groups: Sequence[dict], block_lr: Sequence[float], unet: nn.Module) -> list[dict]:
    """Split unit param groups by block and give each part its block's LR; blocks with LR 0 are frozen.

    `groups` come from `controller.build_unit_param_groups` (with "param_names" holding diffusers names)."""
    if len(block_lr) != SDXL_BLOCK_COUNT:
        raise ValueError(f"--block_lr needs {SDXL_BLOCK_COUNT} values, got {len(block_lr)}")
    index = block_index_lookup(unet)
    out: list[dict] = []
    for group in groups:
        parts: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for name, p in zip(group["param_names"], group["params"]):
            parts.setdefault(index(name), []).append((name, p))
        for block, items in sorted(parts.items()):
            lr = float(block_lr[block])
            if lr == 0.0:
                for _, p in items:
                    p.requires_grad_(False)
                continue
            out.append({**group, "params": [p for _, p in items], "param_names": [n for n, _ in items],
                        "lr": lr, "block": block})
    if not out:
        raise ValueError("--block_lr is 0 for every block: nothing left to train")
    return out
