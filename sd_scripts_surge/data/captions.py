"""Captions: reading, tag splitting, shuffle, dropout, prefix/suffix — per (seed, epoch, entry)."""

from __future__ import annotations

import random
from pathlib import Path

from sd_scripts_surge.data.dataset_config import (
    SubsetConfig,
)


# ------------------------------------------------------------------------------------------------ captions
def read_caption(image_path: Path, subset: SubsetConfig) -> str:
    """First non-empty line of the caption file beside the image, else the subset's class tokens."""
    caption_file = image_path.with_suffix(subset.caption_extension)
    if caption_file.is_file():
        for line in caption_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                return line.strip()
    return subset.class_tokens or ""


def split_tags(caption: str, keep_tokens: int, separator: str = "") -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed suffix) comma-separated tags. With `separator` in the caption the text before it
    is fixed and, after a second separator, the rest is a fixed suffix (sd-scripts); else the first
    `keep_tokens` tags are fixed. Only the flexible tags are shuffled or dropped."""

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    if separator and separator in caption:
        fixed, _, rest = caption.partition(separator)
        flexible, _, suffix = rest.partition(separator)
        return tags(fixed), tags(flexible), tags(suffix)
    everything = tags(caption)
    return everything[:keep_tokens], everything[keep_tokens:], []


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random, separator: str = "") -> str:
    """Shuffle comma-separated tags; the first `keep_tokens` tags (or all text before `separator`) stay first."""
    fixed, flexible, suffix = split_tags(caption, keep_tokens, separator)
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible + suffix)


def caption_varies(subset: SubsetConfig) -> bool:
    """True when the subset's captions change from epoch to epoch (so their embeddings cannot be cached)."""
    return (subset.shuffle_caption or subset.caption_dropout_rate > 0 or subset.caption_tag_dropout_rate > 0
            or subset.caption_dropout_every_n_epochs > 0)


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random | None, epoch: int = 0) -> str:
    """The caption a training step of `epoch` (0-based) sees (order and rules: module docstring).

    `rng` None gives the canonical caption: prefix/suffix only, no dropout, no shuffle."""
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}"
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}"
    separator = subset.keep_tokens_separator
    if rng is not None:
        dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
        every = subset.caption_dropout_every_n_epochs
        if dropped or (every > 0 and (epoch + 1) % every == 0):  # sd-scripts counts epochs from 1
            return ""
    if rng is None or not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        if separator and separator in caption:
            return ", ".join(t for part in split_tags(caption, 0, separator) for t in part)
        return caption
    fixed, flexible, suffix = split_tags(caption, subset.keep_tokens, separator)
    if subset.shuffle_caption:
        rng.shuffle(flexible)
    if subset.caption_tag_dropout_rate > 0:
        flexible = [t for t in flexible if rng.random() >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + suffix)


