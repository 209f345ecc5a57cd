"""Metadata written into safetensors headers: SAI ModelSpec (`modelspec.*`) and kohya-style training keys (`ss_*`).

ModelSpec (https://github.com/Stability-AI/ModelSpec) identifies what a file is so UIs can load it;
the `ss_*` keys are what kohya's sd-scripts writes about a training run and what A1111/ComfyUI metadata
viewers show. All values in a safetensors header must be strings; builders here convert and check.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping
from typing import Any

MODELSPEC_VERSION = "1.0.0"

ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "sd1": "stable-diffusion-v1"}
DEFAULT_RESOLUTION = {"sdxl": 1024, "sd1": 512}
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v", "v_prediction": "v"}


def modelspec_architecture(arch: str, adapter: str | None = None) -> str:
    """`stable-diffusion-xl-v1-base`, or with an adapter suffix such as `.../lora`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch] + (f"/{adapter}" if adapter else "")


def build_modelspec(
    arch: str,
    *,
    title: str | None = None,
    adapter: str | None = None,
    implementation: str = IMPL_STABILITY_AI,
    resolution: int | tuple[int, int] | None = None,
    prediction_type: str = "epsilon",
    timestamp: float | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    merged_from: str | list[str] | None = None,
    usage_hint: str | None = None,
    timestep_range: tuple[int, int] | None = None,
    encoder_layer: int | None = None,
) -> dict[str, str]:
    """SAI ModelSpec keys for a checkpoint (or an adapter such as "lora") of `arch` ("sdxl" | "sd1").

    A full checkpoint in the original layout uses the Stability-AI implementation URL (as sd-scripts does);
    pass implementation="diffusers" for SD1 adapters in diffusers naming.
    """
    architecture = modelspec_architecture(arch, adapter)
    timestamp = time.time() if timestamp is None else timestamp
    if resolution is None:
        resolution = DEFAULT_RESOLUTION[arch]
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}: expected one of {sorted(PREDICTION_TYPES)}")
    if title is None:
        title = f"{'LoRA' if adapter == 'lora' else 'Checkpoint'}@{int(timestamp)}"
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": PREDICTION_TYPES[prediction_type],
    }
    optional: dict[str, Any] = {
        "modelspec.author": author,
        "modelspec.description": description,
        "modelspec.license": license,
        "modelspec.usage_hint": usage_hint,
        "modelspec.tags": ", ".join(tags) if isinstance(tags, list) else tags,
        "modelspec.merged_from": ", ".join(merged_from) if isinstance(merged_from, list) else merged_from,
        "modelspec.timestep_range": f"{timestep_range[0]},{timestep_range[1]}" if timestep_range else None,
        "modelspec.encoder_layer": str(encoder_layer) if encoder_layer is not None else None,
    }
    meta.update({k: str(v) for k, v in optional.items() if v is not None})
    return meta


def metadata_value(value: Any) -> str:
    """One header value as a string: str as is, bool/int/float via str, containers as JSON (like sd-scripts)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def kohya_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """kohya-style training metadata: every key must start with `ss_`; values become strings.

    e.g. {"ss_output_name": "mymodel", "ss_training_started_at": 1700000000.0, "ss_tag_frequency": {...}}.
    """
    out = {}
    for k, v in values.items():
        if not isinstance(k, str) or not k.startswith("ss_"):
            raise ValueError(f"kohya metadata key {k!r} must start with 'ss_' (e.g. ss_output_name)")
        out[k] = metadata_value(v)
    return out


def header_metadata(values: Mapping[str, Any] | None) -> dict[str, str]:
    """Caller-supplied header metadata of any namespace (`ss_*`, `modelspec.*`, own keys) as strings."""
    if not values:
        return {}
    out = {}
    for k, v in values.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"metadata key {k!r} must be a non-empty string")
        out[k] = metadata_value(v)
    return out
