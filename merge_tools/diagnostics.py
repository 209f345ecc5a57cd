"""`sd-merge inspect M... [--base B] [--json out.json] [--out DIR]`: how a set of models relates, block by block.

Deltas τ_i = θ_i − ref, where ref is `--base` or, without one, the mean of the models. Per MBW block (the
architecture's table in sd_scripts_surge/models/keymap.py; keys outside every block count as "other"; "ALL" is
the whole model) and per pair of models:
- cosine(τ_i, τ_j) and L2 ‖τ_i − τ_j‖ = √(G_ii + G_jj − 2 G_ij) from the Gram matrix G of the deltas (fp64);
- sign-conflict rate: among entries where both deltas are non-zero, the fraction with opposite signs;
and per model: ‖θ_i‖, ‖τ_i‖ and the count of NaN/Inf entries, its architecture and dtypes.

Streaming: one key at a time, in chunks of at most `chunk_elements` entries, so memory stays at a few chunks × N
whatever the model size. Pictures: a cosine heatmap per block (grid) and the whole-model one, and a 2-D map of the
models (classical MDS of the whole-model L2 distances) with outliers marked: models whose mean distance to the
others is above median + 3·MAD of those means.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from merge_tools.io import TensorReader
from sd_scripts_surge.models.fileio import CheckpointError
from sd_scripts_surge.models.keymap import block_of, detect_architecture

ALL = "ALL"


@dataclass
class BlockStats:
    n: int
    gram: np.ndarray = field(init=False)
    opposite: np.ndarray = field(init=False)
    both: np.ndarray = field(init=False)
    norm_sq: np.ndarray = field(init=False)
    nonfinite: np.ndarray = field(init=False)
    elements: int = 0

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.n, self.n))
        self.opposite = np.zeros((self.n, self.n))
        self.both = np.zeros((self.n, self.n))
        self.norm_sq = np.zeros(self.n)
        self.nonfinite = np.zeros(self.n, dtype=np.int64)

    def add(self, weights: torch.Tensor, deltas: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """weights, deltas: (N, E) fp64 with non-finite entries zeroed; nonfinite: (N,) counts."""
        self.gram += (deltas @ deltas.T).numpy()
        signs = torch.sign(deltas)
        self.opposite += ((signs @ signs.T).neg_().add_((signs != 0).double() @ (signs != 0).double().T)
                          ).div_(2).numpy()  # per pair: #(s_i·s_j = −1) = (#both non-zero − Σ s_i s_j) / 2
        self.both += ((signs != 0).double() @ (signs != 0).double().T).numpy()
        self.norm_sq += weights.square().sum(dim=1).numpy()
        self.nonfinite += nonfinite.numpy()
        self.elements += deltas.shape[1]

    def result(self) -> dict:
        g = self.gram
        d = np.sqrt(np.clip(np.diag(g)[:, None] + np.diag(g)[None, :] - 2 * g, 0, None))
        norms = np.sqrt(np.diag(g))
        denom = np.outer(norms, norms)
        cosine = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
        conflict = np.divide(self.opposite, self.both, out=np.zeros_like(g), where=self.both > 0)
        return {"cosine": cosine.round(6).tolist(), "l2": d.round(6).tolist(),
                "sign_conflict": conflict.round(6).tolist(),
                "norm": np.sqrt(self.norm_sq).round(6).tolist(), "delta_norm": norms.round(6).tolist(),
                "nonfinite": self.nonfinite.tolist(), "elements": self.elements}


def inspect_models(models: Sequence[str | Path], base: str | Path | None = None, chunk_elements: int = 1 << 20,
                   progress: bool = True) -> dict:
    """The diagnostics of `models` (see module docstring) as a JSON-ready dict."""
    if len(models) < 2:
        raise ValueError("inspect needs at least two models")
    readers = [TensorReader(p) for p in models]
    base_reader = TensorReader(base) if base else None
    try:
        shapes = {k: t.shape for k, t in readers[0].header.tensors.items()}
        arch = detect_architecture(shapes)
        common = [k for k in readers[0].header.tensors if all(k in r.header.tensors for r in readers[1:])
                  and (base_reader is None or k in base_reader.header.tensors)]
        float_keys = [k for k in common if readers[0].header.tensors[k].torch_dtype.is_floating_point]
        for r in readers[1:] + ([base_reader] if base_reader else []):
            for k in float_keys:
                if r.header.tensors[k].shape != readers[0].header.tensors[k].shape:
                    raise CheckpointError(f"{r.path}: tensor {k!r} has shape {r.header.tensors[k].shape}, "
                                          f"{readers[0].path} has {readers[0].header.tensors[k].shape}")
        stats: dict[str, BlockStats] = {}
        order = [*arch.blocks, "other", ALL]
        n = len(readers)
        for key in tqdm(float_keys, desc="inspect", disable=not progress, dynamic_ncols=True):
            block = block_of(key, arch) or "other"
            numel = readers[0].header.tensors[key].numel
            for start in range(0, numel, chunk_elements):
                stop = min(numel, start + chunk_elements)
                w = torch.stack([r.read(key, start, stop).double() for r in readers])
                bad = ~torch.isfinite(w)
                counts = bad.sum(dim=1)
                w = w.masked_fill(bad, 0.0)
                ref = base_reader.read(key, start, stop).double().nan_to_num(0.0, 0.0, 0.0) if base_reader \
                    else w.mean(dim=0)
                deltas = w - ref
                for name in (block, ALL):
                    stats.setdefault(name, BlockStats(n)).add(w, deltas, counts)
        blocks = {name: stats[name].result() for name in order if name in stats}
        dtypes = [sorted({t.dtype for t in r.header.tensors.values()}) for r in readers]
        return {"models": [str(p) for p in models], "base": str(base) if base else None,
                "reference": "base" if base else "mean of the models", "architecture": arch.name,
                "layout": arch.layout, "dtypes": dtypes, "keys": len(float_keys),
                "missing_keys": len(set().union(*(r.header.tensors for r in readers))) - len(common),
                "outliers": outliers(blocks[ALL]["l2"]), "blocks": blocks}
    finally:
        for r in readers + ([base_reader] if base_reader else []):
            r.close()


def outliers(l2: list[list[float]]) -> list[int]:
    """Indices of models whose mean distance to the others is above median + 3·MAD of those means."""
    d = np.asarray(l2)
    n = len(d)
    if n < 3:
        return []
    means = d.sum(axis=1) / (n - 1)
    median = float(np.median(means))
    mad = float(np.median(np.abs(means - median))) or 1e-12
    return [int(i) for i in np.nonzero(means > median + 3 * mad)[0]]


def mds_2d(l2: list[list[float]]) -> np.ndarray:
    """Classical MDS: 2-D points whose distances approximate `l2` (double-centred squared distances)."""
    d2 = np.asarray(l2) ** 2
    n = len(d2)
    j = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * j @ d2 @ j
    values, vectors = np.linalg.eigh(b)
    top = np.argsort(values)[::-1][:2]
    return vectors[:, top] * np.sqrt(np.clip(values[top], 0, None))


def write_pictures(report: dict, out_dir: Path) -> list[Path]:
    """Cosine heatmaps (per block grid + whole model) and the 2-D map of the models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [Path(m).stem for m in report["models"]]
    blocks = report["blocks"]
    written = []
    names = [b for b in blocks if b != ALL]
    cols = min(6, max(1, len(names)))
    rows = math.ceil(len(names) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        ax.axis("on")
        ax.imshow(np.asarray(blocks[name]["cosine"]), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"cosine of deltas per block (ref: {report['reference']})")
    fig.tight_layout()
    written.append(out_dir / "cosine_blocks.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    for metric in ("cosine", "l2"):
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
        image = ax.imshow(np.asarray(blocks[ALL][metric]), cmap="RdBu_r" if metric == "cosine" else "viridis",
                          **({"vmin": -1, "vmax": 1} if metric == "cosine" else {}))
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        fig.colorbar(image, ax=ax)
        ax.set_title(f"whole model: {metric}")
        fig.tight_layout()
        written.append(out_dir / f"{metric}_all.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    points = mds_2d(blocks[ALL]["l2"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    flagged = set(report["outliers"])
    for i, (x, y) in enumerate(points):
        ax.scatter([x], [y], c="crimson" if i in flagged else "steelblue", s=40)
        ax.annotate(labels[i] + (" (outlier)" if i in flagged else ""), (x, y), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_title("models (classical MDS of whole-model L2 distances)")
    fig.tight_layout()
    written.append(out_dir / "model_map.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def run(models: Sequence[str], base: str | None, json_path: str | None, out_dir: str | None,
        progress: bool = True) -> dict:
    report = inspect_models(models, base, progress=progress)
    if json_path:
        from merge_tools.io import finalize

        partial = Path(json_path).with_suffix(".json.partial")
        partial.write_text(json.dumps(report, indent=1))
        finalize(partial, Path(json_path))
    if out_dir:
        write_pictures(report, Path(out_dir))
    all_block = report["blocks"][ALL]
    print(f"{report['architecture']} ({report['layout'] or '?'}), {report['keys']} keys, reference: "
          f"{report['reference']}")
    for i, model in enumerate(report["models"]):
        mean_cos = (sum(all_block["cosine"][i]) - 1) / (len(report["models"]) - 1)
        flag = "  OUTLIER" if i in report["outliers"] else ""
        print(f"  {Path(model).name:40s} ‖τ‖ {all_block['delta_norm'][i]:.4g}  mean cos {mean_cos:+.3f}  "
              f"NaN/Inf {all_block['nonfinite'][i]}{flag}")
    return report
