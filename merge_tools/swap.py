"""`sd-merge swap --unet A [--te B] [--te2 C] [--vae D] -o OUT`: one checkpoint from the components of several.

The merging seed's first step: try a UNet with another model's text encoders ("Replicant-V3 UNET + WD1.5B3 CLIP"),
or reset the CLIP / swap the VAE. Components are the original single-file layout's key groups (see block_map):
`unet` (model.diffusion_model.*), `te` (SD1 cond_stage_model.transformer.*, SD2 cond_stage_model.model.*, SDXL
conditioner.embedders.0.*), `te2` (SDXL conditioner.embedders.1.*), `vae` (first_stage_model.*). The UNet file also
gives every other key (scheduler buffers, metadata); a component not given comes from the UNet file too.
Every file must be of one architecture (SD1, SD2 or SDXL, detected from keys and shapes), hold the component
asked of it, and its tensors must have the shapes the UNet file's architecture has; else a clear error before
anything is written. Streamed tensor by tensor, written to a temp file and renamed; never over an input.
"""

from __future__ import annotations

from pathlib import Path

from merge_tools.block_map import component_of
from merge_tools.io import TensorReader, copy_tensors, refuse_overwrite
from sd_scripts_surge.models.fileio import CheckpointError
from sd_scripts_surge.models.keymap import detect_architecture

ROLES = {"te": ("text_encoder_1", "text_encoder"), "te2": ("text_encoder_2",), "vae": ("vae",)}


def swap(unet: str | Path, output: str | Path, te: str | Path | None = None, te2: str | Path | None = None,
         vae: str | Path | None = None) -> dict[str, str]:
    """Write `output` with the UNet (and everything else) of `unet` and the components given; returns
    {component: source path}."""
    sources = {"unet": Path(unet)} | {role: Path(p) for role, p in (("te", te), ("te2", te2), ("vae", vae)) if p}
    output = Path(output)
    refuse_overwrite(output, sources.values())
    readers = {role: TensorReader(path) for role, path in sources.items()}
    try:
        archs = {role: detect_architecture({k: t.shape for k, t in r.header.tensors.items()})
                 for role, r in readers.items()}
        base_arch = archs["unet"].name
        if "te2" in sources and base_arch != "sdxl":
            raise CheckpointError(f"--te2 is SDXL's second text encoder; {sources['unet']} is {base_arch}")
        for role, arch in archs.items():
            if arch.name != base_arch:
                raise CheckpointError(f"{sources[role]} is {arch.name}, the UNet file {sources['unet']} is "
                                      f"{base_arch}: components of different architectures do not fit together")
        layout = archs["unet"].layout
        base = readers["unet"].header.tensors
        chosen = {k: "unet" for k in base}
        for role, components in ROLES.items():
            if role not in readers:
                continue
            theirs = {k: t for k, t in readers[role].header.tensors.items()
                      if component_of(k, archs[role].layout) in components}
            if not theirs:
                raise CheckpointError(f"{sources[role]} holds no {role} tensors ({', '.join(components)} keys)")
            ours = {k for k in base if component_of(k, layout) in components}
            for k, info in theirs.items():
                if k in base and base[k].shape != info.shape:
                    raise CheckpointError(f"{sources[role]}: {k} has shape {info.shape}, the UNet file's "
                                          f"architecture has {base[k].shape}")
            for k in ours - set(theirs):
                del chosen[k]  # the UNet file's own copy of this component is replaced as a whole
            chosen.update({k: role for k in theirs})
        metadata = dict(readers["unet"].header.metadata) | {
            f"sd_merge_swap_{role}": str(path) for role, path in sources.items()}
        copy_tensors(output, {k: (readers[role], k) for k, role in chosen.items()}, metadata)
    finally:
        for r in readers.values():
            r.close()
    return {role: str(path) for role, path in sources.items()}
