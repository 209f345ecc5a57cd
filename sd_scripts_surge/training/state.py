"""What a resumed run needs beyond model/optimizer/scheduler: step counters, our RNG, history, controller.

accelerate's `save_state`/`load_state` store models, optimizers, schedulers, the global RNG states of
every process, and any object registered with `register_for_checkpointing` (anything with `state_dict`/
`load_state_dict`). `TrainProgress` is such an object: it carries the counters, the noise generator (so
the noise and timesteps after a resume are the ones an uninterrupted run would have drawn) and the report
history. The data sampler and the surge controller are registered next to it by the trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd_scripts_surge.training.report import TrainingHistory


@dataclass
class TrainProgress:
    seed: int
    global_step: int = 0
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches consumed in the current epoch
    skipped_nonfinite: int = 0
    lr_backoff: float = 1.0  # multiplies every LR after non-finite losses (halved each time)
    surge_updated_epoch: int = -1  # last epoch whose surge update ran (so a resume does not redo it)
    history: TrainingHistory = field(default_factory=TrainingHistory)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "skipped_nonfinite": self.skipped_nonfinite,
            "lr_backoff": self.lr_backoff,
            "surge_updated_epoch": self.surge_updated_epoch,
            "history": json.dumps(self.history.to_dict()),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.lr_backoff = float(state["lr_backoff"])
        self.surge_updated_epoch = int(state["surge_updated_epoch"])
        self.history = TrainingHistory.from_dict(json.loads(state["history"]))
        self.generator.set_state(state["generator"])


PROGRESS_MARKER = "surge_progress.json"  # written into every state folder by the trainer


def find_resume_dir(resume: str | Path) -> Path:
    """`--resume` takes a state folder, or an output folder (its newest `*-state` folder is used)."""
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such folder")
    if (path / PROGRESS_MARKER).exists():
        return path
    candidates = sorted((p for p in path.glob("*-state") if (p / PROGRESS_MARKER).exists()),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--resume {resume}: no saved state (a '*-state' folder written by --save_state)")
    return candidates[-1]
