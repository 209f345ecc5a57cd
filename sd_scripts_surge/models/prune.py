"""Depth-pruned students (BK-SDM, Kim et al. 2023) initialised from their teacher's weights.

BK-SDM removes whole residual + attention pairs: *Base* keeps one pair per down stage and two per up stage
(SDXL/SD1 have 2 and 3), *Small* also drops the mid block. The student keeps every width, so the kept layers
take the teacher's weights as they are. Which teacher layer each student layer copies follows
`units.aligned_teacher_map`: layer 0 of a stage copies the teacher's layer 0, layer j > 0 copies teacher
layer j + (n_teacher − n_student) — the last layer of an up stage must be the teacher's last, because only it
takes the stage-input skip connection with that channel count.

    python -m sd_scripts_surge.models.prune TEACHER_DIR OUT_DIR --preset bk-small
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel

PRESETS = {"bk-base": {"layers_per_block": 1, "drop_mid": False},
           "bk-small": {"layers_per_block": 1, "drop_mid": True}}

_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")


def pruned_config(config: dict, layers_per_block: int, drop_mid: bool) -> dict:
    """The teacher's UNet config with fewer layers per stage (and no mid block)."""
    teacher_layers = config["layers_per_block"]
    if not isinstance(teacher_layers, int):
        raise ValueError("per-stage layers_per_block lists are not supported for pruning")
    if not 1 <= layers_per_block <= teacher_layers:
        raise ValueError(f"layers_per_block must be between 1 and the teacher's {teacher_layers} "
                         f"(got {layers_per_block})")
    out = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    out["layers_per_block"] = layers_per_block
    if drop_mid:
        out["mid_block_type"] = None
    return out


def prune_unet(teacher: UNet2DConditionModel, layers_per_block: int, drop_mid: bool) -> UNet2DConditionModel:
    """A depth-pruned copy of `teacher`; every student weight is copied from the matching teacher layer."""
    student = UNet2DConditionModel.from_config(pruned_config(teacher.config, layers_per_block, drop_mid))
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        state[key] = source[_teacher_key(key, teacher, student)]
    student.load_state_dict(state, strict=True)
    return student


def _teacher_key(key: str, teacher: UNet2DConditionModel, student: UNet2DConditionModel) -> str:
    match = _LAYER.match(key)
    if not match:
        return key
    side, stage, kind, j, rest = match.groups()
    stage_i, j_i = int(stage), int(j)
    n_student = len(getattr(student, side)[stage_i].resnets)
    n_teacher = len(getattr(teacher, side)[stage_i].resnets)
    teacher_j = 0 if j_i == 0 else j_i + n_teacher - n_student
    return f"{side}.{stage}.{kind}.{teacher_j}.{rest}"


def prune_pipeline_folder(teacher_dir: str | Path, out_dir: str | Path, layers_per_block: int = 1,
                          drop_mid: bool = True) -> Path:
    """Copy a diffusers SDXL/SD folder to `out_dir` with its UNet depth-pruned; returns `out_dir`."""
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if out_dir.resolve() == teacher_dir.resolve():
        raise ValueError("the pruned student needs its own folder; the teacher is never overwritten")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    student = prune_unet(teacher, layers_per_block, drop_mid)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(teacher_dir, partial, ignore=shutil.ignore_patterns("unet"))
    student.save_pretrained(partial / "unet")
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher_dir", help="diffusers folder of the teacher (model_index.json, unet/, ...)")
    parser.add_argument("out_dir", help="new folder for the pruned student")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bk-small")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = prune_pipeline_folder(args.teacher_dir, args.out_dir, preset["layers_per_block"], preset["drop_mid"])
    print(f"pruned student ({args.preset}) written to {out}")


if __name__ == "__main__":
    main()
