"""The in-memory form of a Stable Diffusion checkpoint: diffusers modules plus what they need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelBundle:
    """UNet, text encoder(s), VAE and tokenizers of one checkpoint, as diffusers/transformers modules.

    `arch` is "sdxl" or "sd1". SD1 has no `text_encoder_2` / `tokenizer_2`.
    """

    arch: str
    unet: torch.nn.Module
    text_encoder_1: torch.nn.Module
    vae: torch.nn.Module
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_1: Any = None
    tokenizer_2: Any = None
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"unet": self.unet, "text_encoder_1": self.text_encoder_1, "vae": self.vae}
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self
