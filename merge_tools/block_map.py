"""`sd-merge blocks MODEL [--json out.json] [--png map.png]`: the architecture, the MBW block of every key, and
parameter counts per block and per component (the merging seed's model comparison table), from the header alone.

Components by key prefix (original single-file layouts): `unet` (model.diffusion_model.), `text_encoder_1`
(cond_stage_model.transformer. / conditioner.embedders.0.), `text_encoder_2` (conditioner.embedders.1.),
`text_encoder` (cond_stage_model.model., SD2), `vae` (first_stage_model.), `ema` (model_ema.), else `other`;
diffusers-layout UNet files count as `unet`. Blocks count the UNet's parameters (BASE = its time/label
embeddings; text encoders and VAE are counted per component). Reading only the header, it is instant at any size.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sd_scripts_surge.models.fileio import read_safetensors_header
from sd_scripts_surge.models.keymap import block_of, detect_architecture

COMPONENTS = (
    ("model.diffusion_model.", "unet"), ("cond_stage_model.transformer.", "text_encoder_1"),
    ("conditioner.embedders.0.", "text_encoder_1"), ("conditioner.embedders.1.", "text_encoder_2"),
    ("cond_stage_model.model.", "text_encoder"), ("first_stage_model.", "vae"), ("model_ema.", "ema"),
)


def component_of(key: str, layout: str) -> str:
    for prefix, name in COMPONENTS:
        if key.startswith(prefix):
            return name
    return "unet" if layout == "diffusers" else "other"


def block_map(path: str | Path) -> dict:
    """{"architecture", "layout", "keys": {key: {"block", "component", "shape", "dtype", "params"}},
    "blocks": {block: params}, "components": {component: params}, "total": params} of one checkpoint."""
    header = read_safetensors_header(path)
    shapes = {k: info.shape for k, info in header.tensors.items()}
    arch = detect_architecture(shapes)
    keys, blocks, components = {}, Counter(), Counter()
    for key, info in header.tensors.items():
        block = block_of(key, arch) or "-"
        component = component_of(key, arch.layout)
        keys[key] = {"block": block, "component": component, "shape": list(info.shape), "dtype": info.dtype,
                     "params": info.numel}
        components[component] += info.numel
        if component == "unet" or arch.name in ("sd3", "flux"):
            blocks[block] += info.numel
    order = {b: i for i, b in enumerate(arch.blocks)}
    return {"path": str(path), "architecture": arch.name, "layout": arch.layout,
            "blocks": dict(sorted(blocks.items(), key=lambda kv: order.get(kv[0], len(order)))),
            "components": dict(components.most_common()), "total": sum(components.values()), "keys": keys}


def draw(report: dict, png: Path) -> Path:
    """The block map as a bar diagram in network order: parameters per MBW block, the U shape of a UNet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, counts = list(report["blocks"]), [v / 1e6 for v in report["blocks"].values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3.6))
    colors = ["#888" if n in ("BASE", "-") else "#3a7" if n.startswith(("IN", "DB", "JB")) else
              "#c53" if n.startswith("M") else "#37c" for n in names]
    ax.bar(range(len(names)), counts, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax.set_ylabel("parameters (M)")
    parts = ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in report["components"].items())
    ax.set_title(f"{Path(report['path']).name}: {report['architecture']} ({report['layout']}); {parts}", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def run(path: str, json_path: str | None, png: str | None) -> dict:
    report = block_map(path)
    print(f"{path}: {report['architecture']} ({report['layout'] or 'unknown layout'}), "
          f"{report['total'] / 1e6:.1f} M parameters in {len(report['keys'])} tensors")
    for name, count in report["components"].items():
        print(f"  {name:16s} {count / 1e6:10.2f} M")
    for name, count in report["blocks"].items():
        print(f"  {name:8s} {count / 1e6:10.2f} M")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    if png:
        draw(report, Path(png))
    return report
