"""Depth-pruned (BK-SDM) students: weights copied from the right teacher layers, units aligned with the teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_scripts_surge.models.prune import prune_pipeline_folder, prune_unet, pruned_config
from sd_scripts_surge.surge.capture import capture_flavor
from sd_scripts_surge.surge.units import aligned_teacher_map, build_unit_map
from sd_scripts_surge.tiny.architecture import build_tiny_unet


def _kwargs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500][:batch]),
                encoder_hidden_states=torch.randn(batch, 77, 64, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g),
                                   "time_ids": torch.randn(batch, 6, generator=g)})


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny_unet().eval()


@pytest.mark.parametrize("layers, drop_mid", [(1, True), (1, False), (2, True)])
def test_aligned_units_have_matching_shapes(teacher, layers: int, drop_mid: bool) -> None:
    student = prune_unet(teacher, layers, drop_mid).eval()
    s_map = build_unit_map(student)
    t_map = aligned_teacher_map(s_map, student, teacher)
    assert t_map.names == s_map.names
    with torch.no_grad():
        _, s_flavor = capture_flavor(student, s_map, _kwargs())
        _, t_flavor = capture_flavor(teacher, t_map, _kwargs())
    for name in s_map.names:
        s_unit, t_unit = s_flavor.units[name], t_flavor.units[name]
        assert s_unit.output.shape == t_unit.output.shape, name
        assert (s_unit.input is None) == (t_unit.input is None), name
        if s_unit.input is not None:
            assert s_unit.input.shape == t_unit.input.shape, name


def test_bk_small_alignment_and_weights(teacher) -> None:
    student = prune_unet(teacher, 1, True)
    assert student.mid_block is None and len(student.down_blocks[1].resnets) == 1
    assert len(student.up_blocks[1].resnets) == 2
    s_map = build_unit_map(student)
    t_map = aligned_teacher_map(s_map, student, teacher)
    # the single down layer of a stage stands for both teacher layers; the last down unit absorbs the mid block
    assert t_map["IN03"].input_at.module == "down_blocks.1.resnets.0"
    assert t_map["IN03"].output_at.module == "down_blocks.1.attentions.1"
    assert t_map["IN05"].output_at.module == "mid_block"
    # the last up layer of a stage is the teacher's last one (it takes the stage-input skip)
    assert t_map["OUT03"].input_at.module == "up_blocks.1.resnets.2"
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert torch.equal(s_state["up_blocks.1.resnets.1.conv1.weight"], t_state["up_blocks.1.resnets.2.conv1.weight"])
    assert torch.equal(s_state["up_blocks.1.resnets.0.conv1.weight"], t_state["up_blocks.1.resnets.0.conv1.weight"])
    assert torch.equal(s_state["down_blocks.2.attentions.0.proj_in.weight"],
                       t_state["down_blocks.2.attentions.0.proj_in.weight"])


def test_same_layout_keeps_the_map_and_bad_layouts_fail(teacher) -> None:
    s_map = build_unit_map(teacher)
    assert aligned_teacher_map(s_map, teacher, teacher) is s_map
    student = prune_unet(teacher, 1, True)
    with pytest.raises(ValueError, match="unit map 'mbw'"):
        aligned_teacher_map(build_unit_map(student, "fine"), student, teacher)
    with pytest.raises(ValueError, match="fewer layers"):
        aligned_teacher_map(build_unit_map(teacher), teacher, student)
    with pytest.raises(ValueError, match="between 1 and"):
        pruned_config(teacher.config, 3, False)


def test_prune_pipeline_folder_never_overwrites(tmp_path: Path, teacher) -> None:
    src = tmp_path / "teacher"
    teacher.save_pretrained(src / "unet")
    (src / "model_index.json").write_text("{}")
    out = prune_pipeline_folder(src, tmp_path / "student", 1, True)
    assert (out / "unet" / "config.json").exists() and (out / "model_index.json").exists()
    with pytest.raises(FileExistsError):
        prune_pipeline_folder(src, out, 1, True)
    with pytest.raises(ValueError, match="own folder"):
        prune_pipeline_folder(src, src, 1, True)
