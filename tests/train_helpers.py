"""Shared pieces of the trainer end-to-end tests: a config TOML writer and safetensors comparison."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def write_config(path: Path, kit, out_dir: Path, *, steps: int = 4, surge: bool = True, extra: str = "",
                 training_extra: str = "") -> Path:
    """A small surge (or plain) training TOML for the tiny kit; returns its path."""
    teacher = f'teacher_model = "{kit.teacher_dir}"\n' if surge else ""
    text = f"""
[model]
pretrained_model_name_or_path = "{kit.base_dir}"
{teacher}
[dataset]
dataset_config = "{kit.dataset_toml}"
[output]
output_dir = "{out_dir}"
output_name = "dev"
save_state = true
{extra}
[training]
seed = 1
max_train_steps = {steps}
learning_rate = 1e-3
optimizer_type = "ADA_SURGE"
optimizer_args = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
lr_scheduler = "cascade"
{training_extra}
[surge]
num_seeds = 2
probes = 2
replay_steps = 2
"""
    path.write_text(text)
    return path


def one_repeat_dataset(path: Path, kit) -> Path:
    """The tiny kit's images once each, batch 4 at 64 px: an epoch of a few steps (for tests spanning epochs)."""
    subsets = "".join(f'\n  [[datasets.subsets]]\n  image_dir = "{folder}"\n  num_repeats = 1\n'
                      for folder in sorted(Path(kit.train_data_dir).iterdir()) if folder.is_dir())
    path.write_text('[general]\nshuffle_caption = true\ncaption_extension = ".txt"\n\n[[datasets]]\n'
                    "resolution = 64\nbatch_size = 4\nenable_bucket = true\nmin_bucket_reso = 32\n"
                    f"max_bucket_reso = 128\nbucket_reso_steps = 16\n{subsets}")
    return path


def unet_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
