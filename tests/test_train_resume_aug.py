"""Save/resume with sd-scripts' augmentations on (flip_aug, shuffle_caption, caption_dropout_rate): the resumed run
sees the same flips and captions as the straight one, because they are drawn from (seed, epoch, entry)."""

from __future__ import annotations

from pathlib import Path

import pytest
import toml

from sd_scripts_surge.config import parse_train_args
from sd_scripts_surge.data import build_dataset
from sd_scripts_surge.data.dataset_config import load_dataset_config
from sd_scripts_surge.training.state import PROGRESS_MARKER
from sd_scripts_surge.training.train import train
from tests.tiny_fixtures import tiny_kit  # noqa: F401
from tests.train_helpers import max_abs_difference, unet_tensors, write_config

AUGMENTATIONS = {"flip_aug": True, "shuffle_caption": True, "caption_dropout_rate": 0.2}
PLAIN_ADAMW = ["--surge", "false", "--optimizer_type", "AdamW", "--optimizer_args", "--lr_scheduler", "constant"]


def augmented_dataset_toml(kit_toml: Path, path: Path) -> Path:
    """The kit's dataset TOML with the augmentations set in every [[datasets.subsets]] table."""
    data = toml.loads(kit_toml.read_text(encoding="utf-8"))
    for dataset in data["datasets"]:
        for subset in dataset["subsets"]:
            subset.update(AUGMENTATIONS)
    path.write_text(toml.dumps(data), encoding="utf-8")
    return path


@pytest.mark.slow
def test_resume_with_flip_shuffle_and_caption_dropout_matches_uninterrupted(tiny_kit, tmp_path: Path) -> None:  # noqa: F811
    dataset = augmented_dataset_toml(Path(tiny_kit.dataset_toml), tmp_path / "dataset.toml")
    datasets = load_dataset_config(dataset)
    for subset in datasets[0].subsets:
        assert subset.flip_aug and subset.shuffle_caption and subset.caption_dropout_rate == 0.2
    # the augmentations act in the two batches trained after the resume (seed 1 as in write_config): some entries
    # are mirrored, some captions are dropped or reordered
    probe = build_dataset(datasets=datasets, seed=1)
    after_resume = [e for batch in probe.make_sampler(seed=1).rank_batches(0)[2:4] for e in batch]
    flips = [probe.flipped(e, 0) for e in after_resume]
    assert any(flips) and not all(flips)
    changed = [probe.caption_for(e, 0) != probe.canonical_caption(probe.records[probe.entries[e]])
               for e in after_resume]
    assert any(changed)

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.toml", tiny_kit, out, steps=4, surge=False, extra="save_every_n_steps = 2")
    args = ["--config_file", str(cfg), "--dataset_config", str(dataset), *PLAIN_ADAMW]
    straight = train(parse_train_args(args))
    state = out / "dev-step00000002-state"
    assert (state / PROGRESS_MARKER).exists()
    resumed = train(parse_train_args([*args, "--resume", str(state), "--output_name", "resumed"]))
    assert resumed.name == "resumed.safetensors"
    difference = max_abs_difference(unet_tensors(straight), unet_tensors(resumed))
    assert difference == 0.0, f"resumed UNet differs from the uninterrupted one by {difference}"
