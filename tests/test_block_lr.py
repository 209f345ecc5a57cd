"""sd-scripts' --block_lr on SDXL: parameter → block index, per-block LRs in the unit groups, LR 0 freezes."""

from __future__ import annotations

import pytest
import torch

from sd_scripts_surge.config import ConfigError, parse_train_args
from sd_scripts_surge.models.prune import prune_unet
from sd_scripts_surge.surge.controller import UnitLRController, build_unit_param_groups
from sd_scripts_surge.surge.units import build_unit_map, hop_distances
from sd_scripts_surge.tiny.architecture import build_tiny_unet
from sd_scripts_surge.training.block_lr import apply_block_lr, block_index_lookup


@pytest.fixture()
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny_unet()


def test_block_index_follows_sdxl_train_order(unet) -> None:
    index = block_index_lookup(unet)
    assert index("time_embedding.linear_1.weight") == 0
    assert index("add_embedding.linear_2.bias") == 0
    assert index("conv_in.weight") == 1  # input_blocks.0
    assert index("down_blocks.0.resnets.1.conv1.weight") == 3  # input_blocks.2
    assert index("down_blocks.0.downsamplers.0.conv.weight") == 4  # input_blocks.3
    assert index("down_blocks.2.attentions.1.proj_out.weight") == 9  # input_blocks.8
    assert index("mid_block.resnets.0.conv1.weight") == 10
    assert index("mid_block.attentions.0.proj_in.weight") == 11
    assert index("mid_block.resnets.1.conv2.bias") == 12
    assert index("up_blocks.0.resnets.0.conv1.weight") == 13  # output_blocks.0
    assert index("up_blocks.2.resnets.2.conv1.weight") == 21  # output_blocks.8
    assert index("conv_out.weight") == 22
    seen = {index(n) for n, _ in unet.named_parameters()}
    assert seen == set(range(23))


def test_groups_take_block_lrs_and_zero_freezes(unet) -> None:
    unit_map = build_unit_map(unet)
    groups = build_unit_param_groups(unet, unit_map, 1e-3)
    lrs = [1e-4 * (i + 1) for i in range(23)]
    lrs[0] = 0.0  # freeze the embeddings
    split = apply_block_lr(groups, lrs, unet)
    assert all(not p.requires_grad for p in unet.time_embedding.parameters())
    assert all("BASE" != g["unit"] for g in split)
    mid = sorted((g["block"], g["lr"]) for g in split if g["unit"] == "M00")
    assert mid == [(10, lrs[10]), (11, lrs[11]), (12, lrs[12])]
    out = [g for g in split if g["unit"] == "OUT08"]
    assert len(out) == 1 and out[0]["lr"] == lrs[21]
    trained = {id(p) for g in split for p in g["params"]}
    assert trained == {id(p) for p in unet.parameters() if p.requires_grad}
    # the controller still scales every part of a unit
    controller = UnitLRController(unit_map, hop_distances(unit_map))
    controller.set_targets({"M00": 2.0})
    controller.steps_since_update = 10_000
    optimizer = torch.optim.AdamW(split)
    controller.apply(optimizer)
    assert sorted(g["lr"] for g in optimizer.param_groups if g["unit"] == "M00") == \
        pytest.approx(sorted(lr * (1 + controller.config.smooth_rate) for lr in lrs[10:13]))


def test_bad_block_lr_is_refused(unet, tmp_path) -> None:
    with pytest.raises(ValueError, match="23 values"):
        apply_block_lr([], [1e-4] * 3, unet)
    groups = build_unit_param_groups(unet, build_unit_map(unet), 1e-3)
    with pytest.raises(ValueError, match="nothing left to train"):
        apply_block_lr(groups, [0.0] * 23, unet)
    pruned = prune_unet(unet, 1, True)
    with pytest.raises(ValueError, match="SDXL UNet layout"):
        block_index_lookup(pruned)
    with pytest.raises(ConfigError, match="block_lr"):
        parse_train_args(["--pretrained_model_name_or_path", "x", "--network_module", "networks.lora",
                          "--block_lr", ",".join(["1e-4"] * 23)])
    with pytest.raises(ConfigError, match="block_lr"):
        parse_train_args(["--pretrained_model_name_or_path", "x", "--block_lr", "1e-4,2e-4"])
