"""`sd-merge convert IN -o OUT [--dtype fp16] [--allow-pickle] [--to single|diffusers]`.

- single file → single file (`.safetensors` or an opted-in pickle `.ckpt`/`.pt` → `.safetensors`): streamed
  tensor by tensor, floats cast to `--dtype` (default: kept); non-tensor pickle entries and the
  `state_dict` wrapper dropped. A pickle is read only with `--allow-pickle`, through
  `torch.load(weights_only=True)` (no code runs), and then held in memory once (pickles cannot be streamed).
- ldm/sgm single file ↔ diffusers folder (SD1, SDXL): through the project's loader and writer
  (sd_scripts_surge.models.io), which check every key and shape; that path holds one model in memory (in the
  output dtype) — it is the layout change, not a merge. A diffusers folder written here loads with
  `DiffusionPipeline.from_pretrained`; tokenizers come from the input folder or `--tokenizer-dir`.
Outputs are written to a temp file / folder and renamed; never over an input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from merge_tools.io import TensorReader, copy_tensors, refuse_overwrite
from sd_scripts_surge.models.fileio import CheckpointError, save_safetensors_atomic

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp16": ("F16", torch.float16), "bf16": ("BF16", torch.bfloat16), "fp32": ("F32", torch.float32)}


def _is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def _pickle_to_safetensors(src: Path, output: Path, dtype: str | None) -> int:
    from sd_scripts_surge.models.io import _load_pickle

    tensors = _load_pickle(src)
    if not tensors:
        raise CheckpointError(f"{src}: no tensors in the pickle")
    out = {k: v.to(DTYPES[dtype][1]) if dtype and v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors_atomic(out, output, {"sd_merge_converted_from": src.name}, protect=(src,))
    return len(out)


def convert(
    src: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Convert `src` into `output`; returns what was done, in words."""
    src, output = Path(src), Path(output)
    refuse_overwrite(output, [src])
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
    if not src.exists():
        raise CheckpointError(f"{src}: not found")
    to = to or ("diffusers" if output.suffix == "" else "single")
    if to not in ("single", "diffusers"):
        raise ValueError("--to must be single or diffusers")
    if _is_pickle(src) and not allow_pickle:
        raise CheckpointError(f"{src}: a pickled checkpoint can run code when loaded; pass --allow-pickle to read it "
                              "with torch.load(weights_only=True), which refuses anything but tensors")
    if src.is_dir() or to == "diffusers":
        from sd_scripts_surge.models import io

        bundle = io.load_model(src, tokenizer_dir=tokenizer_dir, allow_pickle=allow_pickle)
        precision = dtype or "float"
        if to == "diffusers":
            io.save_diffusers(bundle, output, precision=precision)
            return f"{bundle.arch} {'folder' if src.is_dir() else 'single file'} → diffusers folder {output}"
        if output.suffix.lower() != ".safetensors":
            raise ValueError(f"{output}: single files are written as .safetensors")
        io.save_single_file(bundle, output, precision=precision, protect=(src,))
        return f"{bundle.arch} diffusers folder → single file {output}"
    if output.suffix.lower() != ".safetensors":
        raise ValueError(f"{output}: single files are written as .safetensors")
    if _is_pickle(src):
        n = _pickle_to_safetensors(src, output, dtype)
        return f"pickle → safetensors: {n} tensors" + (f" as {dtype}" if dtype else "")
    reader = TensorReader(src)
    try:
        tensors = reader.header.tensors
        dtypes = {}
        if dtype:
            dtypes = {k: DTYPES[dtype][0] for k, info in tensors.items() if info.dtype in ("F16", "BF16", "F32", "F64")}
        metadata = dict(reader.header.metadata) | {"sd_merge_converted_from": src.name}
        copy_tensors(output, {k: (reader, k) for k in tensors}, metadata, dtypes=dtypes)
    finally:
        reader.close()
    return f"safetensors → safetensors: {len(tensors)} tensors" + (f", floats as {dtype}" if dtype else "")
