"""`sd-merge prune-ema MODEL -o OUT [--keep model|ema]`: drop a checkpoint's EMA weights, or make them the model.

Original-layout checkpoints (SD1/SD2 training saves) carry the EMA copy of the UNet as `model_ema.<name>`, where
<name> is the UNet key without its leading "model." and without dots: `model.diffusion_model.input_blocks.0.0.weight`
↔ `model_ema.diffusion_modelinput_blocks00weight` (plus `model_ema.decay` and `model_ema.num_updates`).
- `--keep model` (default): every `model_ema.*` tensor is left out; the rest is copied byte for byte.
- `--keep ema`: each UNet tensor that has an EMA twin of the same shape is written with the EMA values; the
  `model_ema.*` tensors are left out. UNet tensors without a twin keep their values (counted in the summary).
Streaming (one tensor chunk at a time, so memory stays small at any size), written to a temp file, fsynced and
renamed; never over an input.
"""

from __future__ import annotations

from pathlib import Path

from merge_tools.io import TensorReader, copy_tensors, refuse_overwrite
from sd_scripts_surge.models.fileio import CheckpointError

UNET = "model.diffusion_model."


def ema_name(key: str) -> str:
    """The EMA twin's key of a UNet key (see module docstring)."""
    return "model_ema." + key[len("model."):].replace(".", "")


def prune_ema(model: str | Path, output: str | Path, keep: str = "model") -> dict[str, int]:
    """Write `output` from `model` without its EMA tensors (keep="model") or with them as the UNet (keep="ema")."""
    if keep not in ("model", "ema"):
        raise ValueError(f"--keep must be model or ema (got {keep!r})")
    model, output = Path(model), Path(output)
    refuse_overwrite(output, [model])
    reader = TensorReader(model)
    try:
        tensors = reader.header.tensors
        ema_keys = [k for k in tensors if k.startswith("model_ema.")]
        if not ema_keys:
            raise CheckpointError(f"{model}: no model_ema.* tensors; there is no EMA to prune or keep")
        kept = [k for k in tensors if not k.startswith("model_ema.")]
        source = {k: k for k in kept}
        swapped = missing = 0
        if keep == "ema":
            for k in kept:
                if k.startswith(UNET):
                    twin = ema_name(k)
                    if twin in tensors and tensors[twin].shape == tensors[k].shape:
                        source[k] = twin
                        swapped += 1
                    else:
                        missing += 1
            if not swapped:
                raise CheckpointError(f"{model}: its model_ema.* tensors match none of the UNet keys")
        metadata = dict(reader.header.metadata) | {"sd_merge_prune_ema": keep}
        copy_tensors(output, {k: (reader, source[k]) for k in kept}, metadata)
    finally:
        reader.close()
    return {"kept": len(kept), "dropped_ema": len(ema_keys), "swapped": swapped, "unet_without_ema": missing}
