"""Sample images during and after training: a sampling loop over the diffusers scheduler `--sample_sampler` names.

The UNet is called exactly as in training (SDXL: context + `text_embeds`/`time_ids`), so what the sample
shows is what the trained weights do. Classifier-free guidance uses the empty prompt as the negative.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

# (context, pooled) for a list of prompts
PromptEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]


def sdxl_time_ids(height: int, width: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL size/crop conditioning for an uncropped image generated at its own size."""
    ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
    return ids.expand(batch, 6)


# sd-scripts' --sample_sampler names → (diffusers scheduler class name, extra config). The k_ names are the same
# samplers under k-diffusion's spelling, as sd-scripts maps them.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def make_scheduler(sampler: str = "euler", num_train_timesteps: int = 1000, prediction_type: str = "epsilon"):
    """SDXL's noise schedule (scaled_linear 0.00085..0.012) under the diffusers scheduler `sampler` names."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sample_sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    import diffusers

    name, extra = SAMPLERS[sampler]
    config = {"num_train_timesteps": num_train_timesteps, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "prediction_type": prediction_type, "steps_offset": 1, **extra}
    if name != "PNDMScheduler":
        config["timestep_spacing"] = "leading"
    return getattr(diffusers, name).from_config(config)


def make_euler_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> EulerDiscreteScheduler:
    """SDXL's noise schedule with an Euler sampler (the default of these samples)."""
    return make_scheduler("euler", num_train_timesteps, prediction_type)


@torch.no_grad()
def generate_latents(
    unet: torch.nn.Module,
    encode: PromptEncoder,
    prompts: list[str],
    *,
    height: int,
    width: int,
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    vae_scale_factor: int = 8,
    prediction_type: str = "epsilon",
    sampler: str = "euler",
) -> torch.Tensor:
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    scheduler = make_scheduler(sampler, prediction_type=prediction_type)
    scheduler.set_timesteps(steps, device=device)
    batch = len(prompts)
    context, pooled = encode(prompts)
    neg_context, neg_pooled = encode([""] * batch)
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        context = torch.cat([neg_context, context])
        pooled = torch.cat([neg_pooled, pooled]) if pooled is not None else None
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, unet.config.in_channels, height // vae_scale_factor, width // vae_scale_factor)
    latents = torch.randn(shape, generator=generator).to(device=device, dtype=dtype) * scheduler.init_noise_sigma
    added = None
    if pooled is not None:
        rows = context.shape[0]
        added = {"text_embeds": pooled.to(dtype), "time_ids": sdxl_time_ids(height, width, rows, device, dtype)}
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in, t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample
        if use_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample \
            if _takes_generator(scheduler) else scheduler.step(pred, t, latents).prev_sample
    return latents


def _takes_generator(scheduler) -> bool:  # noqa: ANN001 - any diffusers scheduler
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


@torch.no_grad()
def decode_to_images(vae: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    param = next(vae.parameters())
    scaled = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
    pixels = vae.decode(scaled).sample.float().clamp(-1, 1)
    arrays = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def save_samples(
    images: list[Image.Image], prompts: list[str], out_dir: str | Path, prefix: str
) -> list[Path]:
    """Write `prefix_NN.png` per image plus `prefix.txt` with the prompts; return the image paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = out_dir / f"{prefix}_{index:02d}.png"
        image.save(path)
        paths.append(path)
    (out_dir / f"{prefix}.txt").write_text("\n".join(prompts) + "\n")
    return paths


def contact_sheet(rows: dict[str, list[Image.Image]], path: str | Path, cell: int = 96) -> Path:
    """One PNG with a labelled row per model (e.g. teacher / student before / student after)."""
    from PIL import ImageDraw

    labels = list(rows)
    columns = max(len(v) for v in rows.values())
    label_width = 110
    sheet = Image.new("RGB", (label_width + columns * cell, len(labels) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, label in enumerate(labels):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(rows[label]):
            sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (label_width + c * cell, r * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
