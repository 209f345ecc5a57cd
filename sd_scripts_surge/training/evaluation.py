"""Held-out teacher matching: the metric of the benchmark and of `target_teacher_mse`."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from sd_scripts_surge.training.surge_setup import SurgeSetup


@torch.no_grad()
def teacher_matching_error(student_unet: nn.Module, surge: SurgeSetup, accelerator: Accelerator) -> float:
    """Held-out noise-prediction MSE between student and teacher on fixed probes (the benchmark's metric)."""
    was_training = student_unet.training
    student_unet.eval()
    total, count = 0.0, 0
    try:
        for k, index in enumerate(surge.eval_probes.batches(8)):
            kwargs = surge.eval_probes.unet_kwargs(index, device=accelerator.device)
            s = student_unet(**kwargs).sample.float()
            t = surge.eval_teacher[k] if surge.eval_teacher is not None else surge.teacher_call(kwargs).float()
            total += float(((s - t) ** 2).mean()) * len(index)
            count += len(index)
    finally:
        student_unet.train(was_training)
    return total / max(1, count)


