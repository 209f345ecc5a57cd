"""Where the frozen teacher UNet lives (`--surge_teacher_placement`): on the training device, or in CPU RAM and
streamed to the device one block at a time while it runs.

`gpu` (the default) keeps the teacher on the accelerator with the student. `cpu` keeps its weights in CPU memory;
each streamed block (every ResBlock, every transformer layer and the projections around it, every
down/upsampler, the mid block's parts, and the small input/output layers) is moved to the execution device just
before it runs and back right after, so at most one block's weights sit on the device at a time: the teacher
costs the device one block (SDXL: its largest is one transformer layer, ~2 % of the UNet) instead of a whole
UNet, and each teacher forward moves its weights over the bus once (PCIe time: ~0.3 s for SDXL in bf16 at
16 GB/s). Hooked LoRA networks are small and stay on the device. `cached` (`--surge_teacher cached`) is the
third placement: the teacher is not needed while training at all.

Flavor capture and the cached-target capture run the same streamed forward; their forward hooks see the block
on the device. A teacher that shares the LoRA student's base (`precision.frozen_copy`) is the student's own
weights and is never streamed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

PLACEMENTS = ("gpu", "cpu")
_LISTS = ("resnets", "attentions", "downsamplers", "upsamplers")


def streamed_blocks(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the blocks that stream: every element of the levels' resnets / attentions / down- and
    upsamplers, and each top-level module that holds parameters outside the levels (conv_in, embeddings, norms)."""
    for name, child in unet.named_children():
        if name in ("down_blocks", "up_blocks"):
            for i, level in enumerate(child):
                yield from _level_parts(f"{name}.{i}", level)
        elif name == "mid_block":
            yield from _level_parts(name, child)
        elif any(True for _ in child.parameters()):
            yield name, child


def _level_parts(prefix: str, level: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    covered: set[int] = set()
    for list_name in _LISTS:
        for i, part in enumerate(getattr(level, list_name, None) or ()):
            pieces = _transformer_pieces(part) if list_name == "attentions" else [("", part)]
            for sub, piece in pieces:
                covered.update(id(p) for p in piece.parameters())
                yield f"{prefix}.{list_name}.{i}{sub}", piece
    if any(id(p) not in covered for p in level.parameters()):
        raise ValueError(f"{prefix}: parameters outside {', '.join(_LISTS)}; this UNet block cannot be streamed")


def _transformer_pieces(attention: nn.Module) -> list[tuple[str, nn.Module]]:
    """A transformer stack streams layer by layer (SDXL's deepest holds 10 layers: 0.7 GB in bf16 at once)."""
    pieces: list[tuple[str, nn.Module]] = []
    for name, child in attention.named_children():
        if name == "transformer_blocks":
            pieces += [(f".{name}.{j}", block) for j, block in enumerate(child)]
        elif any(True for _ in child.parameters()):
            pieces.append((f".{name}", child))
    if sum(p.numel() for _, m in pieces for p in m.parameters()) != sum(p.numel() for p in attention.parameters()):
        return [("", attention)]  # parameters held directly: stream the stack whole
    return pieces


def stream_from_cpu(unet: nn.Module, device: torch.device | str) -> list[str]:
    """Keep `unet` in CPU memory and stream each block to `device` while it runs (see module docstring).

    Returns the streamed block names. Idempotent; refused on a UNet shared with the student."""
    if getattr(unet, "_surge_shared", False):
        raise ValueError("the teacher shares the LoRA student's base UNet (its weights are the student's); it cannot "
                         "be placed on the CPU apart from the student")
    device = torch.device(device)
    if getattr(unet, "_surge_streamed", None) is not None:
        return list(unet._surge_streamed)
    unet.to("cpu")

    def arrive(module: nn.Module, args: tuple) -> None:
        module.to(device)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        module.to("cpu")

    names = []
    for name, block in streamed_blocks(unet):
        block.register_forward_pre_hook(arrive)
        block.register_forward_hook(leave)
        names.append(name)
    unet._surge_streamed = tuple(names)
    unet._surge_execution_device = device
    return names


def is_streamed(unet: nn.Module) -> bool:
    return getattr(unet, "_surge_streamed", None) is not None
