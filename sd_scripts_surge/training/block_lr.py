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

from sd_scripts_surge.models import keymap

SDXL_BLOCK_COUNT = 23
_MID_PARTS = (("mid_block.resnets.0", 10), ("mid_block.attentions.0", 11), ("mid_block.resnets.1", 12))
_OUT_MODULES = ("conv_norm_out.", "conv_out.")


def block_index_lookup(unet: nn.Module):  # noqa: ANN201 (returns a callable)
    """A function: diffusers UNet parameter name → sd-scripts block index (0–22). SDXL layout only.

    The MBW block of a name comes from the one key map (models/keymap.py); sd-scripts' index splits the
    middle block into its 3 parts and gives the final norm + conv (which the key map folds into OUT08) 22."""
    arch = keymap.detect_architecture({n: tuple(p.shape) for n, p in unet.named_parameters()})
    if arch.name != "sdxl" or arch.blocks != keymap.SDXL_BLOCKS:
        raise ValueError("--block_lr needs the SDXL UNet layout (input_blocks 0-8, middle_block, output_blocks "
                         f"0-8); this UNet is {arch.name} with blocks {', '.join(arch.blocks) or 'unknown'}")

    def index(param_name: str) -> int:
        name = param_name.removeprefix("unet.")
        if name.startswith(_OUT_MODULES):
            return 22
        block = keymap.block_of(name, arch)
        if block == "BASE":
            return 0
        if block.startswith("IN"):
            return 1 + int(block[2:])
        if block.startswith("OUT"):
            return 13 + int(block[3:])
        for prefix, i in _MID_PARTS:
            if name.startswith(prefix + "."):
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
