"""What the optimizer updates (full UNet or LoRA), its precision, unit map and param groups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sd_scripts_surge.config.schema import NetworkOptions, TrainingOptions
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.surge.controller import build_unit_param_groups
from sd_scripts_surge.surge.units import UnitMap
from sd_scripts_surge.training.block_lr import apply_block_lr


# -------------------------------------------------------------------------------------------- trainable
@dataclass
class Trainable:
    """What the optimizer updates: the full UNet, or a LoRA network hooked into it."""

    description: str
    module: nn.Module
    network: nn.Module | None
    named: list[tuple[str, nn.Parameter]]  # names in diffusers UNet paths (units are found from them)
    unit_map: UnitMap | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    def unit_params(self, unit: str) -> list[tuple[str, nn.Parameter]] | None:
        """Parameters replay may change for `unit` (None: the unit's own UNet weights)."""
        if self.network is None or self.unit_map is None:
            return None
        from sd_scripts_surge.surge.units import unit_of_module_path

        lookup = unit_of_module_path(self.unit_map)
        return [(n, p) for n, p in self.named if lookup(n) == unit]


def make_trainable(cfg: NetworkOptions, student: ModelBundle, log: Callable[[str], None]) -> Trainable:
    if not cfg.network_module:
        student.unet.requires_grad_(True).train()
        return Trainable("the full UNet", student.unet, None, list(student.unet.named_parameters()))
    if cfg.network_module != "networks.lora":
        raise ValueError(f"--network_module {cfg.network_module}: only networks.lora is built in")
    from networks.lora import create_network

    student.unet.requires_grad_(False)
    kwargs = dict(arg.split("=", 1) for arg in (cfg.network_args or []))
    network = create_network(1.0, cfg.network_dim or 4, cfg.network_alpha or 1.0, student.vae,
                             [student.text_encoder_1, student.text_encoder_2], student.unet, **kwargs)
    network.apply_to([student.text_encoder_1, student.text_encoder_2], student.unet, apply_text_encoder=False,
                     apply_unet=True)
    if cfg.network_weights:
        network.load_weights(cfg.network_weights)
        log(f"LoRA weights loaded from {cfg.network_weights}")
    named = []
    for lora in network.unet_loras:
        for pname, p in lora.named_parameters():
            if p.requires_grad:
                named.append((f"{lora.module_name}.{pname}", p))
    return Trainable(f"a LoRA (dim {network.lora_dim}, alpha {network.alpha}) on the UNet", network, network, named)


def apply_full_bf16(cfg: TrainingOptions, trainable: Trainable, log: Callable[[str], None]) -> None:
    """sd-scripts' --full_bf16: the trained weights themselves in bf16 (half the memory of weights and grads).

    Called after the teacher is built, so a teacher hooked onto a copy of the student keeps fp32 weights.
    ADA_SURGE updates bf16 weights through fp32 math with stochastic rounding."""
    if cfg.full_fp16:
        log("full_fp16 is not applied: the trained weights stay fp32 under fp16 autocast (fp16 weights need "
            "accelerate's GradScaler patched, as sd-scripts does); use full_bf16 + mixed_precision bf16 for "
            "half-precision weights")
    if not cfg.full_bf16:
        return
    trainable.module.to(torch.bfloat16)
    log("full_bf16: trained weights are kept in bf16")


def param_groups(cfg: TrainingOptions, trainable: Trainable, unit_map: UnitMap) -> list[dict]:
    """One group per unit at the UNet LR (split further per sd-scripts block with --block_lr)."""
    trainable.unit_map = unit_map
    lr = cfg.unet_lr or cfg.learning_rate
    groups = build_unit_param_groups(trainable.module, unit_map, lr, named_parameters=trainable.named)
    if cfg.block_lr:  # sd-scripts' per-block LRs (full fine-tune); LR 0 freezes a block
        groups = apply_block_lr(groups, cfg.block_lr, trainable.module)
        trainable.named = [(n, p) for n, p in trainable.named if p.requires_grad]
    return groups


def total_steps(cfg: TrainingOptions, steps_per_epoch: int) -> int:
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * steps_per_epoch
    return cfg.max_train_steps


