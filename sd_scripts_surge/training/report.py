"""The end-of-run report: what a user looks at after training.

`TrainingHistory` collects numbers during the run (loss terms per step; per-unit multipliers, relative
differences and anchors per epoch); `write_report` turns them into PNG figures and one HTML page:
loss curves, a per-unit LR heatmap over epochs, an anchor map, and sample images if there are any.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class EpochRecord:
    epoch: int
    multipliers: dict[str, float]
    relative_difference: dict[str, float]
    anchors: list[str]
    high_difference: list[str] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)
    replay: list[dict] = field(default_factory=list)  # {"unit", "accepted", "before", "after"}


@dataclass
class TrainingHistory:
    steps: list[int] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    epochs: list[EpochRecord] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)  # {"step", "teacher_mse"}

    def log_step(self, step: int, terms: dict[str, float]) -> None:
        self.steps.append(step)
        for name, value in terms.items():
            self.losses.setdefault(name, [math.nan] * (len(self.steps) - 1)).append(float(value))
        for series in self.losses.values():
            if len(series) < len(self.steps):  # a term missing this step
                series.append(math.nan)

    def log_epoch(self, record: EpochRecord) -> None:
        self.epochs.append(record)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "losses": self.losses, "epochs": [asdict(e) for e in self.epochs],
                "eval": self.eval}

    @classmethod
    def from_dict(cls, data: dict) -> TrainingHistory:
        return cls(
            steps=list(data.get("steps", [])),
            losses={k: list(v) for k, v in data.get("losses", {}).items()},
            epochs=[EpochRecord(**e) for e in data.get("epochs", [])],
            eval=list(data.get("eval", [])),
        )


def plot_losses(history: TrainingHistory, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, series in history.losses.items():
        ax.plot(history.steps, series, label=name, linewidth=1)
    if history.eval:
        ax.plot([e["step"] for e in history.eval], [e["teacher_mse"] for e in history.eval], "k--o",
                label="held-out teacher MSE", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss terms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _unit_order(history: TrainingHistory) -> list[str]:
    seen: dict[str, None] = {}
    for record in history.epochs:
        for unit in record.multipliers:
            seen.setdefault(unit, None)
    return list(seen)


def plot_multiplier_heatmap(history: TrainingHistory, path: Path) -> Path:
    units = _unit_order(history)
    grid = [[record.multipliers.get(u, math.nan) for record in history.epochs] for u in units]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(history.epochs) + 3), max(4, 0.25 * len(units) + 1)))
    image = ax.imshow(grid, aspect="auto", cmap="coolwarm", norm=matplotlib.colors.LogNorm(vmin=0.2, vmax=5.0))
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ax.set_xticks(range(len(history.epochs)), [str(r.epoch) for r in history.epochs], fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_title("per-unit learning-rate multiplier")
    for row, unit in enumerate(units):
        for col, record in enumerate(history.epochs):
            if unit in record.anchors:
                ax.text(col, row, "A", ha="center", va="center", fontsize=6, color="black")
    fig.colorbar(image, ax=ax, label="multiplier (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_anchor_map(history: TrainingHistory, path: Path) -> Path:
    """Last epoch: relative difference per unit, coloured by zone."""
    record = history.epochs[-1]
    units = list(record.relative_difference)
    values = [record.relative_difference[u] for u in units]
    colours = [
        "tab:green" if u in record.anchors else "tab:red" if u in record.high_difference
        else "tab:orange" if u in record.slow else "tab:gray"
        for u in units
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(units)), 4))
    ax.bar(range(len(units)), values, color=colours)
    ax.set_xticks(range(len(units)), units, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("relative difference d_l")
    ax.set_title(f"epoch {record.epoch}: anchors (green), high-difference (red), slow (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(history: TrainingHistory, out_dir: str | Path, samples: dict[str, list[Path]] | None = None,
                 title: str = "surge training report") -> Path:
    """Write figures, `history.json` and `report.html` into `out_dir`; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.json").write_text(json.dumps(history.to_dict(), indent=1))
    figures: list[Path] = []
    if history.steps:
        figures.append(plot_losses(history, out_dir / "losses.png"))
    if history.epochs and history.epochs[0].multipliers:
        figures.append(plot_multiplier_heatmap(history, out_dir / "unit_lr_heatmap.png"))
        figures.append(plot_anchor_map(history, out_dir / "anchor_map.png"))
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for fig in figures:
        parts.append(f"<h2>{html.escape(fig.stem.replace('_', ' '))}</h2><img src='{fig.name}'>")
    if history.epochs and history.epochs[-1].replay:
        parts.append("<h2>unit replay (last epoch)</h2><table border=1><tr><th>unit</th><th>accepted</th>"
                     "<th>downstream error before</th><th>after</th></tr>")
        for r in history.epochs[-1].replay:
            before, after = r.get("before", math.nan), r.get("after", math.nan)
            parts.append(f"<tr><td>{html.escape(str(r.get('unit')))}</td><td>{r.get('accepted')}</td>"
                         f"<td>{before:.4g}</td><td>{after:.4g}</td></tr>")
        parts.append("</table>")
    for label, images in (samples or {}).items():
        parts.append(f"<h2>samples: {html.escape(label)}</h2>")
        for image in images:
            rel = Path(image).resolve()
            try:
                rel = rel.relative_to(out_dir.resolve())
            except ValueError:
                pass
            parts.append(f"<img src='{html.escape(str(rel))}' width=128>")
    parts.append("</body></html>")
    page = out_dir / "report.html"
    page.write_text("\n".join(parts))
    return page
