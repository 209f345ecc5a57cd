"""SDXL text conditioning: tokenize and encode captions with the two CLIP text encoders."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


# ------------------------------------------------------------------------------------------------ text
def tokenize(tokenizer: Callable[..., Any], captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, max_length) from any tokenizer with the Hugging Face `__call__` interface."""
    max_length = int(getattr(tokenizer, "model_max_length", 77))
    out = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
    return out["input_ids"] if isinstance(out, Mapping) else out.input_ids


@torch.no_grad()
def encode_prompts_sdxl(captions: Sequence[str], tokenizers: Sequence[Callable[..., Any]],
                        text_encoders: Sequence[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: context = concat(TE1, TE2 penultimate hidden states) (B, T, d1+d2), pooled = TE2's
    projected embedding (B, projection_dim). Encoders are transformers CLIPTextModel / ...WithProjection."""
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ValueError("SDXL needs two tokenizers and two text encoders (TE1 CLIP-L, TE2 OpenCLIP-bigG)")
    te1, te2 = text_encoders
    device = next(te1.parameters()).device
    ids1 = tokenize(tokenizers[0], captions).to(device)
    ids2 = tokenize(tokenizers[1], captions).to(next(te2.parameters()).device)
    out1 = te1(ids1, output_hidden_states=True)
    out2 = te2(ids2, output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2].float(), out2.hidden_states[-2].float().to(device)], dim=-1)
    return context, out2.text_embeds.float().to(device)


