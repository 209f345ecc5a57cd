"""Constructed test cases for the surge engine: a copy of a UNet with chosen units knocked off the teacher."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from sd_scripts_surge.surge.units import UnitMap


def perturbed_copy(unet: torch.nn.Module, unit_map: UnitMap, units: Iterable[str], scale: float = 0.5,
                   seed: int = 0) -> torch.nn.Module:
    """Copy of `unet` whose parameters in `units` get Gaussian noise of scale × (each tensor's std).

    The engine tests and the demo use it as a student that differs from its teacher exactly in `units`."""
    student = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in units:
            for module in unit_map[unit].modules:
                for p in student.get_submodule(module).parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * p.std() * scale)
    return student
