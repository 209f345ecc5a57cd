"""Sample sheets: teacher, student before and after training, and the per-epoch samples."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch import nn

from sd_scripts_surge.config import TrainConfig
from sd_scripts_surge.data import TrainData
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.training.inputs import Sources
from sd_scripts_surge.training.sampling import contact_sheet, decode_to_images, generate_latents, save_samples
from sd_scripts_surge.training.surge_setup import SurgeSetup


# --------------------------------------------------------------------------------------------- samples
def _sample(cfg: TrainConfig, unet: nn.Module, data: TrainData, vae: nn.Module, prompts: list[str]) -> list:
    resolution = data.resolution
    latents = generate_latents(unet, data.encode_prompts, prompts, height=resolution[0], width=resolution[1],
                               steps=cfg.sample_steps, seed=cfg.seed,
                               prediction_type="v_prediction" if cfg.v_parameterization else "epsilon",
                               sampler=cfg.sample_sampler)
    return decode_to_images(vae, latents)


def sample_images(cfg: TrainConfig, sources: Sources, student: ModelBundle, unet: nn.Module, data: TrainData,
                  label: str, accelerator: Accelerator) -> list | None:
    if not sources.prompts or not accelerator.is_main_process:
        return None
    was_training = unet.training
    unet.eval()
    try:
        images = _sample(cfg, unet, data, student.vae, sources.prompts)
    finally:
        unet.train(was_training)
    save_samples(images, sources.prompts, Path(cfg.output_dir) / "sample", label)
    return images


def final_samples(cfg: TrainConfig, sources: Sources, surge: SurgeSetup | None, student: ModelBundle,
                  data: TrainData, before: list | None, after: list | None,
                  output_dir: Path) -> dict[str, list[Path]]:
    """teacher / student before / student after, side by side; returns {label: [sheet path]} for the report.

    The teacher is sampled with the student's text encoders and VAE: the conditioning it was distilled on."""
    if not after:
        return {}
    rows: dict[str, list] = {}
    if surge is not None:
        teacher_unet = surge.teacher_module or surge.teacher.unet
        rows["teacher"] = _sample(cfg, teacher_unet, data, student.vae, sources.prompts)
        save_samples(rows["teacher"], sources.prompts, output_dir / "sample", "teacher")
    if before:
        rows["student before"] = before
    rows["student after"] = after
    sheet = contact_sheet(rows, output_dir / "sample" / "teacher_vs_student.png")
    return {"teacher / student before / after": [sheet]}
