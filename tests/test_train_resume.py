"""Save/resume: a run resumed from its step-2 state ends with the same weights as the run that went straight on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_scripts_surge.config import parse_train_args
from sd_scripts_surge.train import train
from sd_scripts_surge.train_state import PROGRESS_MARKER, find_resume_dir
from tests.tiny_fixtures import tiny_kit  # noqa: F401
from tests.train_helpers import max_abs_difference, unet_tensors, write_config


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=4, extra="save_every_n_steps = 2")
    straight = train(parse_train_args(["--config_file", str(cfg)]))
    straight_weights = unet_tensors(straight)
    state = out / "dev-step00000002-state"
    assert (state / PROGRESS_MARKER).exists()
    assert (out / "dev-state" / PROGRESS_MARKER).exists()

    resumed = train(parse_train_args(["--config_file", str(cfg), "--resume", str(state),
                                      "--output_name", "resumed"]))
    assert resumed.name == "resumed.safetensors"
    difference = max_abs_difference(straight_weights, unet_tensors(resumed))
    # one float32 ulp is tolerated (see the report of issue 7: an unexplained 1-ulp difference remains)
    assert difference <= 2.5e-7, f"resumed UNet differs from the uninterrupted one by {difference}"


def test_find_resume_dir_picks_newest_state(tmp_path: Path) -> None:
    import os

    for i, name in enumerate(["a-state", "b-state", "c-notastate"]):
        (tmp_path / name).mkdir()
        if name.endswith("-state"):
            (tmp_path / name / PROGRESS_MARKER).write_text("{}")
            os.utime(tmp_path / name, (100 + i, 100 + i))
    assert find_resume_dir(tmp_path) == tmp_path / "b-state"
    assert find_resume_dir(tmp_path / "a-state") == tmp_path / "a-state"
    with pytest.raises(FileNotFoundError, match="no saved state"):
        find_resume_dir(tmp_path / "c-notastate")
