"""SAI ModelSpec and kohya `ss_*` metadata builders."""

from __future__ import annotations

import datetime
import json

import pytest

from sd_scripts_surge.models import metadata as md


def test_modelspec_for_sdxl_checkpoint() -> None:
    ts = 1_700_000_000.7
    meta = md.build_modelspec("sdxl", title="my model", timestamp=ts)
    assert meta == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "my model",
        "modelspec.date": datetime.datetime.fromtimestamp(1_700_000_000).isoformat(),
        "modelspec.resolution": "1024x1024",
        "modelspec.prediction_type": "epsilon",
    }
    assert all(isinstance(v, str) for v in meta.values())


def test_modelspec_options() -> None:
    meta = md.build_modelspec(
        "sd1",
        adapter="lora",
        implementation=md.IMPL_DIFFUSERS,
        resolution=(768, 512),
        prediction_type="v_prediction",
        timestamp=0,
        tags=["anime", "style"],
        merged_from=["a.safetensors", "b.safetensors"],
        timestep_range=(0, 500),
        encoder_layer=2,
        author="me",
    )
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.resolution"] == "768x512"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.title"] == "LoRA@0"
    assert meta["modelspec.tags"] == "anime, style"
    assert meta["modelspec.merged_from"] == "a.safetensors, b.safetensors"
    assert meta["modelspec.timestep_range"] == "0,500"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.author"] == "me"
    assert "modelspec.license" not in meta  # unset optional keys are left out
    assert md.build_modelspec("sd1", timestamp=0)["modelspec.resolution"] == "512x512"
    with pytest.raises(ValueError, match="prediction_type"):
        md.build_modelspec("sdxl", prediction_type="x0")
    with pytest.raises(ValueError, match="architecture"):
        md.build_modelspec("sd3")


def test_kohya_metadata_strings_and_prefix() -> None:
    meta = md.kohya_metadata(
        {
            "ss_output_name": "tiny",
            "ss_training_started_at": 1700000000.25,
            "ss_network_dim": 8,
            "ss_cache_latents": True,
            "ss_tag_frequency": {"10_shapes": {"red circle": 3}},
            "ss_seed": None,
        }
    )
    assert meta["ss_output_name"] == "tiny"
    assert meta["ss_training_started_at"] == "1700000000.25"
    assert meta["ss_network_dim"] == "8"
    assert meta["ss_cache_latents"] == "True"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_shapes": {"red circle": 3}}
    assert meta["ss_seed"] == "None"
    with pytest.raises(ValueError, match="must start with 'ss_'"):
        md.kohya_metadata({"output_name": "x"})


def test_header_metadata_accepts_any_namespace() -> None:
    assert md.header_metadata({"ss_a": 1, "modelspec.title": "t", "surge.x": [1, 2]}) == {
        "ss_a": "1",
        "modelspec.title": "t",
        "surge.x": "[1, 2]",
    }
    assert md.header_metadata(None) == {}
    with pytest.raises(ValueError, match="non-empty string"):
        md.header_metadata({"": "x"})
