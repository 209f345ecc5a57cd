"""Save/resume: a run resumed from a saved state ends with exactly the weights of the run that went straight on.

Exact, not "within an ulp": every input of a step after the resume must be bit-identical. The one difference
found (issue 7) was a caption's pooled text embedding, which depends on which other captions shared its
text-encoder call (the projection of a batch of one takes another BLAS path: ~3.6e-7 apart); a resumed run
encoded its captions in other groups. The data module now encodes the fixed captions once, in dataset order, at
setup, and per-epoch captions per batch, so both runs see the same embeddings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_scripts_surge.config import parse_train_args
from sd_scripts_surge.training.state import PROGRESS_MARKER, find_resume_dir
from sd_scripts_surge.training.train import train
from tests.tiny_fixtures import tiny_kit  # noqa: F401
from tests.train_helpers import max_abs_difference, one_repeat_dataset, unet_tensors, write_config


def _straight_then_resumed(cfg: Path, state: Path, extra_args: list[str]) -> float:
    """Max |Δ| between the final UNets of the straight run and the run resumed from `state` (same config)."""
    straight = train(parse_train_args(["--config_file", str(cfg), *extra_args]))
    assert (state / PROGRESS_MARKER).exists()
    resumed = train(parse_train_args(["--config_file", str(cfg), *extra_args, "--resume", str(state),
                                      "--output_name", "resumed"]))
    assert resumed.name == "resumed.safetensors"
    return max_abs_difference(unet_tensors(straight), unet_tensors(resumed))


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    """Surge (AdaSurge + Cascade, teacher, trajectory loss), resumed mid-epoch from the step-2 state."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=4, extra="save_every_n_steps = 2")
    difference = _straight_then_resumed(cfg, out / "dev-step00000002-state", [])
    assert (out / "dev-state" / PROGRESS_MARKER).exists()
    assert difference == 0.0, f"resumed UNet differs from the uninterrupted one by {difference}"


@pytest.mark.slow
def test_plain_adamw_resume_matches_uninterrupted(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    """`--surge false` with AdamW and a constant LR: the generic path is exact too."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=4, surge=False, extra="save_every_n_steps = 2")
    plain = ["--surge", "false", "--optimizer_type", "AdamW", "--optimizer_args", "--lr_scheduler", "constant"]
    difference = _straight_then_resumed(cfg, out / "dev-step00000002-state", plain)
    assert difference == 0.0, f"resumed UNet differs from the uninterrupted one by {difference}"


@pytest.mark.slow
def test_resume_at_epoch_boundary_matches_uninterrupted(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    """Resumed from the end-of-epoch-1 state: the epoch-2 surge update (capture, anchors, controller, replay) runs
    after the resume as it did in the straight run; captions are shuffled per epoch (encoded per batch)."""
    dataset = one_repeat_dataset(tmp_path / "dataset.toml", tiny_kit)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=11, extra="save_every_n_epochs = 1")
    difference = _straight_then_resumed(cfg, out / "dev-000001-state", ["--dataset_config", str(dataset)])
    assert difference == 0.0, f"resumed UNet differs from the uninterrupted one by {difference}"


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
