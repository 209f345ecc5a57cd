"""Saving the trained model (checkpoint, diffusers folder or LoRA) with kohya's `ss_*` metadata."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from sd_scripts_surge.config import TrainConfig
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.models.io import precision_dtype, save_diffusers, save_single_file
from sd_scripts_surge.training.state import TrainProgress
from sd_scripts_surge.training.trainables import Trainable


# ---------------------------------------------------------------------------------------------- saving
def save_model(cfg: TrainConfig, trainable: Trainable, student: ModelBundle, name: str, accelerator: Accelerator,
               progress: TrainProgress, resolution: tuple[int, int] | None = None) -> Path:
    """Write `name` (+ extension) into output_dir on the main process; returns the path.
    `resolution` (height, width) is the training resolution recorded in the metadata."""
    out_dir = Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    dtype = precision_dtype(cfg.save_precision or "float")
    metadata = training_metadata(cfg, progress, resolution)
    if trainable.network is not None:
        path = out_dir / f"{name}.safetensors"
        if accelerator.is_main_process:
            trainable.network.save_weights(path, dtype, metadata)
    elif cfg.save_model_as == "diffusers":
        path = out_dir / name
        if accelerator.is_main_process:
            save_diffusers(student, path, precision=cfg.save_precision or "float")
    else:
        path = out_dir / f"{name}.safetensors"
        if accelerator.is_main_process:
            save_single_file(student, path, precision=cfg.save_precision or "float", metadata=metadata)
    accelerator.wait_for_everyone()
    return path


def training_metadata(cfg: TrainConfig, progress: TrainProgress,
                      resolution: tuple[int, int] | None = None) -> dict[str, str]:
    """kohya-style `ss_*` training metadata (+ `modelspec.resolution`, width x height, when known)."""
    extra = {} if resolution is None else {"ss_resolution": f"({resolution[1]}, {resolution[0]})",
                                           "modelspec.resolution": f"{resolution[1]}x{resolution[0]}"}
    return extra | {
        "ss_output_name": cfg.output_name,
        "ss_training_comment": "sd-scripts-surge",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_optimizer": str(cfg.optimizer_type),
        "ss_lr_scheduler": str(cfg.lr_scheduler),
        "ss_steps": str(progress.global_step),
        "ss_epoch": str(progress.epoch),
        "ss_seed": str(cfg.seed),
        "ss_mixed_precision": str(cfg.mixed_precision),
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_surge": json.dumps({"enabled": cfg.surge.enabled, "shock_rate": cfg.surge.shock_rate,
                                "smooth_rate": cfg.surge.smooth_rate, "unit_map": cfg.surge.unit_map}),
    }


