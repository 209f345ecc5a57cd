"""`sd-merge convert IN -o OUT [--dtype fp16] [--allow-pickle] [--to single|diffusers]`.

- single file → single file (`.safetensors` or an opted-in pickle `.ckpt`/`.pt` → `.safetensors`): streamed
  tensor by tensor, floats cast to `--dtype` (default: kept); non-tensor pickle entries and the
  `state_dict` wrapper dropped. A pickle is read only with `--allow-pickle`, through
  `torch.load(weights_only=True)` (no code runs), and then held in memory once (pickles cannot be streamed).
- ldm/sgm single file ↔ diffusers folder (SD1, SDXL): every key and shape is checked against the configs
  first (the project's loader checks, `models.io.plan_single_file` / `plan_diffusers`), then the UNet, a pure
  renaming, streams tensor by tensor; the VAE and each text encoder (whose layouts differ: OpenCLIP's fused
  q/k/v, 1×1-conv attention) are converted whole, one component at a time. Peak memory is therefore the
  largest text encoder, not the model (SDXL: OpenCLIP-G, 1.4 GB in fp16). Floats keep their stored dtype
  unless `--dtype` is given; NaN/Inf is refused. A diffusers folder written here loads with
  `DiffusionPipeline.from_pretrained`; tokenizers come from the input folder or `--tokenizer-dir`.
Outputs are written to a temp file / folder and renamed; never over an input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from merge_tools.io import TensorReader, copy_tensors, refuse_overwrite
from sd_scripts_surge.models.convert import (
    COMPONENT_PREFIXES,
    components_to_ldm,
    convert_clip_l_from_ldm,
    convert_open_clip_from_ldm,
    convert_vae_from_ldm,
    unet_diffusers_to_ldm_map,
    unet_ldm_to_diffusers_map,
)
from sd_scripts_surge.models.fileio import SAFETENSORS_DTYPES, CheckpointError, save_safetensors_atomic

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
    if _is_pickle(src) and to == "diffusers":
        from sd_scripts_surge.models import io  # a pickle is in memory anyway: through the loader

        bundle = io.load_model(src, tokenizer_dir=tokenizer_dir, allow_pickle=True)
        io.save_diffusers(bundle, output, precision=dtype or "float")
        return f"{bundle.arch} pickle → diffusers folder {output}"
    if to == "diffusers":
        if src.is_dir():
            raise ValueError(f"{src} is already a diffusers folder; --to single writes a single file")
        arch = _single_to_diffusers(src, output, dtype, tokenizer_dir, log)
        return f"{arch} single file → diffusers folder {output}"
    if src.is_dir():
        if output.suffix.lower() != ".safetensors":
            raise ValueError(f"{output}: single files are written as .safetensors")
        arch = _diffusers_to_single(src, output, dtype, allow_pickle, log)
        return f"{arch} diffusers folder → single file {output}"
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


# ------------------------------------------------------------------------------------- layout changes, streamed

_FROM_LDM = {"vae": convert_vae_from_ldm, "text_encoder_1": convert_clip_l_from_ldm,
             "text_encoder_2": convert_open_clip_from_ldm}


def _float_casts(entries: dict[str, str], dtype: str | None) -> dict[str, str]:
    """{key: safetensors dtype} for the float entries of {key: stored safetensors dtype} when casting."""
    return {k: DTYPES[dtype][0] for k, st in entries.items() if st in _FLOATS} if dtype else {}


_FLOATS = ("F16", "BF16", "F32", "F64")


def _single_to_diffusers(src: Path, output: Path, dtype: str | None, tokenizer_dir: str | os.PathLike | None,
                         log: Callable[[str], None]) -> str:
    from sd_scripts_surge.models import io

    plan = io.plan_single_file(src)  # every key and shape checked before anything is written
    bundle = plan.bundle()  # meta-device modules: configs, metadata and tokenizers only
    io.attach_tokenizers(bundle, Path(tokenizer_dir) if tokenizer_dir else None, src.name)
    prefixes = COMPONENT_PREFIXES[plan.arch]
    reader = TensorReader(src)
    stored = {k: reader.header.tensors[k].dtype for k in plan.expected}
    out_dtype = DTYPES[dtype][1] if dtype else _torch_dtype(stored[next(iter(stored))])

    def weights(name: str, module: torch.nn.Module, path: Path) -> None:
        del module
        if name == "unet":  # a renaming: streamed tensor by tensor
            rename = unet_ldm_to_diffusers_map(plan.configs.unet, prefix=prefixes["unet"])
            plan_map = {rename[k]: (reader, k) for k in plan.expected if k in rename}
            copy_tensors(path, plan_map, {"format": "pt"}, dtypes=_float_casts(
                {d: stored[s] for d, (_, s) in plan_map.items()}, dtype), check_finite=True)
        else:
            keys = [k for k in plan.expected if k.startswith(prefixes[name])]
            ldm = plan.src.read(keys, DTYPES[dtype][1] if dtype else None, f"converting {name}")
            state = _FROM_LDM[name]({k[len(prefixes[name]):]: v for k, v in ldm.items()})
            del ldm
            copy_tensors(path, state, {"format": "pt"})
        log(f"  {name}: written")

    try:
        io.write_diffusers_folder(bundle, output, out_dtype, weights)
    finally:
        reader.close()
    return plan.arch


def _diffusers_to_single(src: Path, output: Path, dtype: str | None, allow_pickle: bool,
                         log: Callable[[str], None]) -> str:
    from sd_scripts_surge.models import io

    plan = io.plan_diffusers(src, allow_pickle=allow_pickle)
    bundle = plan.bundle()
    prefixes = COMPONENT_PREFIXES[plan.arch]
    readers: dict[Path, TensorReader] = {}
    out_plan: dict[str, tuple[TensorReader, str] | torch.Tensor] = {}
    stored: dict[str, str] = {}
    try:
        unet = plan.components["unet"]
        rename = unet_diffusers_to_ldm_map(unet.module.config, prefix=prefixes["unet"])
        for canon in unet.expected:
            source, key = unet.owners[canon]
            if source.path.suffix.lower() != ".safetensors":  # an opted-in pickle: already in memory
                out_plan[rename[canon]] = source.read([key], None, "unet")[key]
                continue
            reader = readers.get(source.path) or readers.setdefault(source.path, TensorReader(source.path))
            out_plan[rename[canon]] = (reader, key)
            stored[rename[canon]] = reader.header.tensors[key].dtype
        for name, part in plan.components.items():
            if name == "unet":
                continue
            state: dict[str, torch.Tensor] = {}
            for source, keys in part.by_source():
                read = source.read(keys, DTYPES[dtype][1] if dtype else None, f"converting {name}")
                state.update({keys[k]: v for k, v in read.items()})
            out_plan.update(components_to_ldm(plan.arch, {name: state}, None, partial=True))
            log(f"  {name}: converted")
        metadata = io.single_file_metadata(bundle, title=output.stem, metadata={"sd_merge_converted_from": src.name})
        copy_tensors(output, out_plan, metadata, dtypes=_float_casts(stored, dtype), check_finite=True)
    finally:
        for reader in readers.values():
            reader.close()
    return plan.arch


def _torch_dtype(st_name: str) -> torch.dtype:
    return SAFETENSORS_DTYPES[st_name][0]
