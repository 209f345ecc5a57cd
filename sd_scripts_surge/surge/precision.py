"""How a frozen teacher UNet is stored (`--surge_teacher_dtype`): fp32, fp16, bf16 or fp8.

A teacher is never trained, so it does not need fp32 master weights. In fp16/bf16 it is stored and computed in
that dtype: half the memory of fp32. In fp8 (``float8_e4m3fn``) every Linear and Conv2d weight is stored in one
byte and widened to bf16 only while its layer runs, so one layer's bf16 weight exists at a time; biases and norms
stay in bf16. A quarter of fp32 for the weights that matter.

Whatever the storage, the teacher speaks fp32 to the rest of the engine: a hook casts the UNet's floating inputs to
its compute dtype and its prediction back to fp32, and the capture code stores what it sees as fp32
(`capture.UnitCapture`), so flavors, cached targets and losses compare like with like. Hooked LoRA networks run in
the compute dtype.

`frozen_copy` copies a student into a teacher base without a second full-precision UNet: the UNet's parameters
are cast one by one while copying, and the frozen text encoders and VAE are shared with the student, not copied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

STORAGE: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                                   "fp8": torch.float8_e4m3fn}


def compute_dtype(name: str) -> torch.dtype:
    """The dtype a teacher stored as `name` computes in (fp8 computes in bf16)."""
    if name not in STORAGE:
        raise ValueError(f"teacher dtype {name!r}: choose one of {', '.join(STORAGE)}")
    return torch.bfloat16 if name == "fp8" else STORAGE[name]


def storage_bytes(name: str, weights: int, others: int) -> int:
    """Bytes of a teacher UNet stored as `name`: `weights` Linear/Conv elements, `others` the rest."""
    if name == "fp8":
        return weights + 2 * others
    return (weights + others) * STORAGE[name].itemsize


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _to_fp32(output: Any) -> Any:
    if torch.is_tensor(output):
        return output.float()
    if isinstance(output, tuple):
        return tuple(_to_fp32(o) for o in output)
    if hasattr(output, "sample") and torch.is_tensor(output.sample):
        output.sample = output.sample.float()
    return output


def _widen_while_running(module: nn.Module, forward: Callable[..., Any], dtype: torch.dtype) -> Callable[..., Any]:
    """`forward` with the module's fp8 weight widened to `dtype` for the call (a LoRA hooked later wraps this)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        stored = module.weight.data
        module.weight.data = stored.to(dtype)
        try:
            return forward(*args, **kwargs)
        finally:
            module.weight.data = stored

    return run


def set_unet_precision(unet: nn.Module, name: str, networks: list[nn.Module] = ()) -> nn.Module:
    """Store a frozen teacher UNet as `name` (see the module docstring) and make it speak fp32; `networks`
    (LoRAs hooked into it) are cast to the compute dtype. Idempotent for the same `name`."""
    dtype = compute_dtype(name)
    if getattr(unet, "_surge_teacher_dtype", None) == name:
        return unet
    if getattr(unet, "_surge_teacher_dtype", None) is not None:
        raise ValueError(f"the teacher UNet is already stored as {unet._surge_teacher_dtype}")
    if getattr(unet, "_surge_shared", False) and (name == "fp8" or any(p.dtype != dtype for p in unet.parameters())):
        raise ValueError(f"the teacher UNet shares the student's weights; storing it as {name} would change the "
                         "student's: build the teacher base with frozen_copy(..., share=False)")
    unet.to(dtype)
    for network in networks:
        network.to(dtype)
    if name == "fp8":
        for module in unet.modules():
            if isinstance(module, nn.Linear | nn.Conv2d) and module.weight.dtype == dtype:
                module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
                module.forward = _widen_while_running(module, module.forward, dtype)
    if name != "float":
        unet.register_forward_pre_hook(lambda m, args, kwargs: (_cast(args, dtype), _cast(kwargs, dtype)),
                                       with_kwargs=True)
        unet.register_forward_hook(lambda m, args, output: _to_fp32(output))
    unet._surge_teacher_dtype = name
    return unet


def frozen_copy(model: Any, unet_dtype: torch.dtype = torch.float32, share: bool = True) -> Any:
    """A copy of a ModelBundle (or a bare UNet) to serve as a frozen teacher base.

    - Modules are copied, so hooks (LoRAs) placed on the copy do not reach `model`; and hooks that `model`
      carries (the student's own LoRA) are not copied: the copy computes what its classes define.
    - Every parameter outside the UNet (text encoders, VAE) is shared with `model`, since neither side trains them.
    - The UNet's tensors are shared too when `model` does not train them (a LoRA student: its base UNet is
      frozen), they already are in `unet_dtype` and `share` is set: the teacher then holds no second UNet.
      Otherwise they are cast to `unet_dtype` one tensor at a time while copying (no second fp32 UNet exists).
    A shared part is marked `_surge_shared`, so `Teacher.to` leaves it where the student keeps it."""
    unet = getattr(model, "unet", model)
    share_unet = share and all(not p.requires_grad and p.dtype == unet_dtype for p in unet.parameters())
    memo: dict[int, Any] = {}
    for p in unet.parameters():
        memo[id(p)] = p if share_unet else nn.Parameter(p.detach().to(unet_dtype, copy=True), requires_grad=False)
    for b in unet.buffers():
        if share_unet:
            memo[id(b)] = b
        else:
            memo[id(b)] = b.detach().to(unet_dtype, copy=True) if b.is_floating_point() else b.detach().clone()
    shared = [name for name in ("text_encoder_1", "text_encoder_2", "vae") if getattr(model, name, None) is not None]
    for name in shared if unet is not model else ():
        for t in (*getattr(model, name).parameters(), *getattr(model, name).buffers()):
            memo[id(t)] = t
    # hooks live as instance `forward` attributes (networks.lora.apply_to): lift them off while copying
    hooked = {m: m.__dict__.pop("forward") for m in unet.modules() if "forward" in m.__dict__}
    try:
        out = copy.deepcopy(model, memo)
    finally:
        for m, forward in hooked.items():
            m.forward = forward
    for name in shared if unet is not model else ():
        getattr(out, name)._surge_shared = True  # Teacher.to leaves these where the student keeps them
    if share_unet:
        getattr(out, "unet", out)._surge_shared = True
    return out
