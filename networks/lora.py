"""LoRA for the SDXL (and SD1) UNet and CLIP text encoders, in kohya-ss/sd-scripts' file format.

Usable as `--network_module networks.lora` (same entry points as sd-scripts: `create_network`,
`create_network_from_weights`), and by the surge teachers, which hook LoRA files into a frozen model.

Format facts this module keeps (so files move freely between sd-scripts, A1111/Forge/ComfyUI and diffusers):
- one LoRA module per wrapped Linear / Conv2d, named `<prefix>_<module path, '.' replaced by '_'>`;
  prefixes `lora_unet`, `lora_te1` / `lora_te2` (two text encoders) or `lora_te` (one).
- SDXL UNet paths are in the ORIGINAL (ldm/sgm) layout, because sd-scripts trains SDXL on its own ldm UNet:
  diffusers `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`
  -> `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`. SD1/SD2 LoRAs use diffusers paths
  (sd-scripts trains those on the diffusers UNet).
- text encoder paths are transformers' CLIP names with `text_model.`:
  `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`, `..._mlp_fc1`.
- tensors per module: `lora_down.weight` [r, in (, kh, kw)], `lora_up.weight` [out, r (, 1, 1)] and a scalar
  `alpha`; the module adds `multiplier * alpha / r * up(down(x))` to the wrapped layer's output, i.e.
  ΔW = multiplier · alpha/r · up @ down. A file without `alpha` means alpha = r (scale 1).
- default targets: every Linear (and 1x1 Conv2d) inside the UNet's `Transformer2DModel`s and inside the text
  encoders' `CLIPAttention` / `CLIPMLP`. With network_args `conv_dim`, also the UNet's `ResnetBlock2D`,
  `Downsample2D`, `Upsample2D` (3x3 convs get conv_dim/conv_alpha; their Linear/1x1 layers network_dim/alpha).

Hooking replaces the wrapped module's `forward` on the instance (the original is kept and restored by
`restore()`); weights are never changed unless `merge_to` is called. Several networks can be hooked onto the
same model (they chain); restore them in the reverse order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
LORA_PREFIX_TEXT_ENCODER1 = "lora_te1"
LORA_PREFIX_TEXT_ENCODER2 = "lora_te2"

UNET_TARGET_MODULES = ("Transformer2DModel",)
UNET_CONV_TARGET_MODULES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

NETWORK_MODULE = "networks.lora"
BASE_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "sd1": "sd_v1"}

# network_args this module understands (values arrive as strings from `--network_args k=v`)
KNOWN_NETWORK_ARGS = frozenset(
    {"conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
     "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
)


class LoRAFormatError(ValueError):
    """A LoRA file (or state dict) that does not fit the model: unknown module names, wrong shapes, other formats."""


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------


def is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL UNet: a diffusers UNet with `text_time` added conditioning, or sd-scripts' own ldm SDXL UNet."""
    config = getattr(unet, "config", None)
    if config is not None and hasattr(config, "get"):
        return config.get("addition_embed_type") == "text_time"
    return type(unet).__name__ == "SdxlUNet2DConditionModel"


def _diffusers_unet_config(unet: nn.Module) -> Mapping[str, Any] | None:
    config = getattr(unet, "config", None)
    if config is not None and hasattr(config, "get") and config.get("down_block_types") is not None:
        return config
    return None


def unet_module_path(module_name: str, unet: nn.Module) -> str:
    """The module path kohya names a UNet LoRA after: ldm layout for a diffusers SDXL UNet, else unchanged."""
    config = _diffusers_unet_config(unet)
    if config is None or not is_sdxl_unet(unet):
        return module_name
    from sd_scripts_surge.models.convert import unet_module_name_to_ldm

    # rstrip: convert's resnet-child mapping leaves a trailing '.' for module (not parameter) names
    return unet_module_name_to_ldm(module_name, config).rstrip(".")


def text_encoder_module_path(module_name: str) -> str:
    """transformers 5 drops `text_model.` inside CLIPTextModel; kohya names always carry it."""
    if module_name.startswith("text_model.") or module_name == "text_projection":
        return module_name
    return "text_model." + module_name


def lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}.{module_path}".replace(".", "_")


def text_encoder_prefixes(count: int) -> list[str]:
    if count == 1:
        return [LORA_PREFIX_TEXT_ENCODER]
    if count == 2:
        return [LORA_PREFIX_TEXT_ENCODER1, LORA_PREFIX_TEXT_ENCODER2]
    raise ValueError(f"expected 1 or 2 text encoders, got {count}")


def _as_list(text_encoder: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    return [te for te in text_encoder if te is not None]


# ---------------------------------------------------------------------------------------------------------------
# One LoRA module
# ---------------------------------------------------------------------------------------------------------------


class LoRAModule(nn.Module):
    """Low-rank update of one Linear or Conv2d: out = org(x) + multiplier · alpha/r · up(down(x)).

    The wrapped module is referenced, not registered, so the state dict holds only `lora_down.weight`,
    `lora_up.weight` and `alpha`.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        module_name: str = "",
        component: str = "",
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.module_name = module_name  # path inside its model (diffusers / transformers naming)
        self.component = component  # "unet", "text_encoder_1", "text_encoder_2" or "text_encoder"
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                org_module.in_channels, self.lora_dim, org_module.kernel_size, org_module.stride,
                org_module.padding, bias=False,
            )
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        self.multiplier = float(multiplier)
        self.enabled = True
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org_module = [org_module]  # a list keeps it out of the registered submodules
        self._org_forward: Callable[..., torch.Tensor] | None = None

    @property
    def org_module(self) -> nn.Module:
        return self._org_module[0]

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = float(self.alpha.float().item()) / self.lora_dim

    # -- hooking ------------------------------------------------------------------------------------------------

    def apply_to(self) -> None:
        if self.is_applied:
            raise RuntimeError(f"{self.lora_name} is already applied")
        self._org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped module its previous forward back (LIFO with other networks hooked on top)."""
        if not self.is_applied:
            return
        current = self.org_module.__dict__.get("forward")
        if current != self.forward:
            raise RuntimeError(
                f"{self.lora_name}: another hook was placed on {self.module_name or 'the module'} after this LoRA; "
                "restore the networks in the reverse order of apply_to"
            )
        if self._org_forward == type(self.org_module).forward.__get__(self.org_module):
            del self.org_module.forward  # back to the class method, no instance attribute left behind
        else:
            self.org_module.forward = self._org_forward
        self._org_forward = None

    # -- math ---------------------------------------------------------------------------------------------------

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier · scale · up(down(x)) (dropouts only in training mode)."""
        weight_dtype = self.lora_down.weight.dtype
        lx = self.lora_down(x.to(weight_dtype))
        scale = self.scale
        if self.training:
            if self.dropout:
                lx = nn.functional.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
                if lx.dim() == 3:
                    mask = mask.unsqueeze(1)
                elif lx.dim() == 4:
                    mask = mask.unsqueeze(-1).unsqueeze(-1)
                lx = lx * mask
                scale = scale / (1.0 - self.rank_dropout)  # keep the expected update size
        return self.lora_up(lx) * (self.multiplier * scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._org_forward is None:
            raise RuntimeError(f"{self.lora_name} is not applied to its module; call apply_to() first")
        out = self._org_forward(x, *args, **kwargs)
        if not self.enabled or self.multiplier == 0:
            return out
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return out
        return out + self.lora_output(x).to(out.dtype)

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """ΔW in fp32 with the wrapped module's weight shape: multiplier · scale · up @ down."""
        multiplier = self.multiplier if multiplier is None else multiplier
        up = self.lora_up.weight.float()
        down = self.lora_down.weight.float()
        if down.dim() == 2:
            delta = up @ down
        elif down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3)
        else:  # k×k down followed by 1×1 up == one k×k conv with weight up ∘ down
            delta = nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return delta * (multiplier * self.scale)

    @torch.no_grad()
    def merge_to_module(self, multiplier: float | None = None) -> None:
        """Add ΔW into the wrapped module's weight (in fp32, stored back in the weight's dtype)."""
        weight = self.org_module.weight
        delta = self.delta_weight(multiplier).to(weight.device)
        weight.copy_((weight.float() + delta).to(weight.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Target discovery
# ---------------------------------------------------------------------------------------------------------------


def _is_target_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _is_small_kernel(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def _walk_targets(root: nn.Module, classes: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """(module path, layer) of every Linear/Conv2d inside modules of `classes` (None: anywhere in `root`)."""
    found: dict[str, nn.Module] = {}
    if classes is None:
        for name, module in root.named_modules():
            if _is_target_layer(module):
                found[name] = module
        return list(found.items())
    for name, module in root.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                if _is_target_layer(child):
                    path = ".".join(p for p in (name, child_name) if p)
                    found.setdefault(path, child)
    return list(found.items())


class LayerIndex:
    """kohya LoRA name -> (component, module path, layer) over a UNet and its text encoders.

    `aliases` also accepts SDXL UNet names in diffusers layout (`lora_unet_down_blocks_1_attentions_0_...`),
    which some tools write, and maps them onto the same layers.
    """

    def __init__(self, text_encoders: Sequence[nn.Module], unet: nn.Module | None) -> None:
        self.text_encoders = list(text_encoders)
        self.unet = unet
        self.prefixes = text_encoder_prefixes(len(self.text_encoders)) if self.text_encoders else []
        self.components = (
            ["text_encoder"] if len(self.text_encoders) == 1 else ["text_encoder_1", "text_encoder_2"]
        )[: len(self.text_encoders)]

    def layers(self, *, include_text_encoders: bool = True, unet_classes: Sequence[str] | None = UNET_TARGET_MODULES,
               text_encoder_classes: Sequence[str] | None = TEXT_ENCODER_TARGET_MODULES,
               ) -> list[tuple[str, str, str, nn.Module]]:
        """(lora name, component, module path, layer) for the targeted layers (classes None = every layer)."""
        out = []
        if include_text_encoders:
            for te, prefix, component in zip(self.text_encoders, self.prefixes, self.components):
                for path, layer in _walk_targets(te, text_encoder_classes):
                    out.append((lora_name(prefix, text_encoder_module_path(path)), component, path, layer))
        if self.unet is not None:
            for path, layer in _walk_targets(self.unet, unet_classes):
                try:
                    kohya_path = unet_module_path(path, self.unet)
                except (KeyError, ValueError):
                    kohya_path = path  # a layer without an ldm counterpart keeps its diffusers path
                out.append((lora_name(LORA_PREFIX_UNET, kohya_path), "unet", path, layer))
        return out

    def all_layers(self) -> dict[str, tuple[str, str, nn.Module]]:
        return {name: (comp, path, layer) for name, comp, path, layer in
                self.layers(unet_classes=None, text_encoder_classes=None)}

    def aliases(self) -> dict[str, str]:
        """Alternative name -> kohya name (SDXL UNet in diffusers layout; `text_model` spelled without it)."""
        out: dict[str, str] = {}
        for name, comp, path, _ in self.layers(unet_classes=None, text_encoder_classes=None):
            alt = lora_name(LORA_PREFIX_UNET, path) if comp == "unet" else None
            if alt and alt != name:
                out[alt] = name
            if comp != "unet":
                prefix = self.prefixes[self.components.index(comp)]
                short = lora_name(prefix, path.removeprefix("text_model."))
                if short != name:
                    out[short] = name
        return out


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


def _float_or_none(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return float(value)


def _split_key(key: str) -> tuple[str, str]:
    name, dot, rest = key.partition(".")
    if not dot:
        raise LoRAFormatError(f"LoRA key {key!r} has no '.' (expected '<lora name>.lora_down.weight' etc.)")
    return name, rest


_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
_OTHER_FORMATS = {
    "hada_w1_a": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)", "dora_scale": "DoRA", "lora_A.weight": "PEFT/diffusers",
    "lora.down.weight": "diffusers (old attn-processor LoRA)", "oft_blocks": "OFT", "diff": "LyCORIS full diff",
}


def _check_lora_keys(keys: Iterable[str], source: str) -> None:
    other = Counter()
    for key in keys:
        for marker, fmt in _OTHER_FORMATS.items():
            if key.endswith(marker):
                other[fmt] += 1
    if other:
        fmts = ", ".join(f"{fmt} ({n} keys)" for fmt, n in other.items())
        raise LoRAFormatError(
            f"{source}: contains {fmts}; networks.lora reads plain kohya LoRA "
            "(<name>.lora_down.weight / .lora_up.weight / .alpha). Convert the file or use the matching network module."
        )


def _modules_dim_alpha(weights_sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, int], dict[str, float]]:
    _check_lora_keys(weights_sd.keys(), source)
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, part = _split_key(key)
        if part == "lora_down.weight":
            dims[name] = int(value.shape[0])
        elif part == "alpha":
            alphas[name] = float(value.float().item())
        elif part != "lora_up.weight":
            raise LoRAFormatError(f"{source}: key {key!r} is not a LoRA tensor (expected one of {_LORA_PARTS})")
    for name in alphas.keys() - dims.keys():
        raise LoRAFormatError(f"{source}: {name} has an alpha but no lora_down.weight")
    for name, dim in dims.items():
        alphas.setdefault(name, float(dim))  # files without alpha: alpha = rank, scale 1
    return dims, alphas


def _list_names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


class LoRANetwork(nn.Module):
    """A set of LoRA modules over a UNet and its text encoders (kohya `networks.lora` interface).

    Either targets the default layers with one dim/alpha (training), or exactly the layers named in
    `modules_dim` / `modules_alpha` (a loaded file; any Linear/Conv2d of the models may be named).
    """

    def __init__(
        self,
        text_encoder: nn.Module | Sequence[nn.Module] | None,
        unet: nn.Module | None,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        train_text_encoder: bool = True,
        train_unet: bool = True,
    ) -> None:
        super().__init__()
        text_encoders = _as_list(text_encoder)
        self._multiplier = float(multiplier)
        self.lora_dim = int(lora_dim)
        self.alpha = float(alpha)
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.loraplus_lr_ratio: float | None = None
        self.loraplus_unet_lr_ratio: float | None = None
        self.loraplus_text_encoder_lr_ratio: float | None = None
        self.arch = "sdxl" if (unet is not None and is_sdxl_unet(unet)) or len(text_encoders) == 2 else "sd1"
        self.index = LayerIndex(text_encoders, unet)
        self._aliases = self.index.aliases()

        if modules_dim is not None:
            specs = self._specs_from_weights(modules_dim, modules_alpha or {})
        else:
            specs = self._specs_for_training(train_text_encoder, train_unet)

        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        for name, component, path, layer, dim, a in specs:
            module = LoRAModule(
                name, layer, self._multiplier, dim, a, dropout=dropout, rank_dropout=rank_dropout,
                module_dropout=module_dropout, module_name=path, component=component,
            )
            self.add_module(name, module)
            (self.unet_loras if component == "unet" else self.text_encoder_loras).append(module)
        logger.info(
            "LoRA network: %d text encoder modules, %d UNet modules", len(self.text_encoder_loras), len(self.unet_loras)
        )

    # -- construction -------------------------------------------------------------------------------------------

    def _specs_for_training(self, with_te: bool, with_unet: bool) -> list[tuple[str, str, str, nn.Module, int, float]]:
        unet_classes = UNET_TARGET_MODULES + (UNET_CONV_TARGET_MODULES if self.conv_lora_dim else ())
        specs = []
        for name, comp, path, layer in self.index.layers(include_text_encoders=with_te, unet_classes=unet_classes):
            if comp == "unet" and not with_unet:
                continue
            if _is_small_kernel(layer):
                dim, a = self.lora_dim, self.alpha
            elif self.conv_lora_dim:
                dim, a = int(self.conv_lora_dim), (1.0 if self.conv_alpha is None else float(self.conv_alpha))
            else:
                continue
            if dim > 0:
                specs.append((name, comp, path, layer, dim, a))
        self._check_unique([s[0] for s in specs])
        return specs

    def _specs_from_weights(self, modules_dim: Mapping[str, int], modules_alpha: Mapping[str, float]):  # noqa: ANN202
        layers = self.index.all_layers()
        specs, unknown = [], []
        for raw_name, dim in modules_dim.items():
            name = self._aliases.get(raw_name, raw_name)
            if name not in layers:
                unknown.append(raw_name)
                continue
            comp, path, layer = layers[name]
            specs.append((name, comp, path, layer, int(dim), float(modules_alpha.get(raw_name, dim))))
        if unknown:
            raise LoRAFormatError(
                f"{len(unknown)} LoRA module(s) name no layer of this model: {_list_names(unknown)}. "
                "The LoRA was made for another architecture (SDXL vs SD1, other text encoders) or another layout; "
                "load it with the model it was trained on."
            )
        self._check_unique([s[0] for s in specs])
        return specs

    @staticmethod
    def _check_unique(names: Sequence[str]) -> None:
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise LoRAFormatError(f"duplicated LoRA module names: {_list_names(dup)}")

    # -- access -------------------------------------------------------------------------------------------------

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.set_multiplier(value)

    def set_multiplier(self, multiplier: float) -> None:
        self._multiplier = float(multiplier)
        for lora in self.loras:
            lora.multiplier = self._multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for lora in self.loras:
            lora.enabled = bool(is_enabled)

    def canonical_state_dict(self, weights_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename alias keys (diffusers-layout SDXL UNet names etc.) to this network's kohya names."""
        out = {}
        for key, value in weights_sd.items():
            name, part = _split_key(key)
            out[f"{self._aliases.get(name, name)}.{part}"] = value
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # noqa: ANN201
        """nn.Module.load_state_dict after alias renaming; files without `alpha` keep alpha = rank."""
        state = self.canonical_state_dict(state_dict)
        own = super().state_dict()
        for key in own:
            if key.endswith(".alpha") and key not in state and key.replace(".alpha", ".lora_down.weight") in state:
                down = state[key.replace(".alpha", ".lora_down.weight")]
                state[key] = torch.tensor(float(down.shape[0]))
        for key, value in state.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise LoRAFormatError(
                    f"LoRA tensor {key}: shape {tuple(value.shape)} in the weights, {tuple(own[key].shape)} in the "
                    "network (different rank or model width); create the network from these weights instead"
                )
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- kohya network interface --------------------------------------------------------------------------------

    def apply_to(
        self,
        text_encoder: nn.Module | Sequence[nn.Module] | None = None,
        unet: nn.Module | None = None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Hook the LoRA modules into the models given at construction (the arguments are for kohya parity).

        Modules of a part that is not applied are dropped from the network (not trained, not saved), as in
        sd-scripts.
        """
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.loras:
            lora.apply_to()
        logger.info("LoRA hooked: %d text encoder modules, %d UNet modules",
                    len(self.text_encoder_loras), len(self.unet_loras))

    def _drop(self, loras: Sequence[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self) -> None:
        """Unhook every LoRA module (the models run as before apply_to)."""
        for lora in reversed(self.loras):
            lora.restore()

    @property
    def is_applied(self) -> bool:
        return any(lora.is_applied for lora in self.loras)

    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(
        self,
        text_encoder: nn.Module | Sequence[nn.Module] | None = None,
        unet: nn.Module | None = None,
        weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Add every module's ΔW (× multiplier) into the wrapped weights; hooked modules are unhooked first.

        weights_sd: load these LoRA tensors first (kohya parity). dtype/device: where the LoRA math runs
        (the merged weight keeps its own dtype); None = fp32 on the weight's device.
        """
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=False)
        self.restore()
        for lora in self.loras:
            if device is not None:
                lora.to(device)
            lora.merge_to_module()
        logger.info("merged %d LoRA modules into the model weights", len(self.loras))

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None = None,
        group_key: Callable[[LoRAModule], str] | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Param groups + descriptions, as sd-scripts: text encoder group(s), UNet group(s).

        text_encoder_lr may be one value or one per text encoder; None falls back to default_lr. A group whose
        lr resolves to 0 or None is left out (frozen). LoRA+ ratios put `lora_up` weights in their own group at
        lr × ratio. group_key (ours): split the UNet modules into one group per key (e.g. per surge unit) so a
        per-unit LR controller can scale groups; descriptions then read `unet <key>`.
        """
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        def add(loras: Sequence[LoRAModule], lr: float | None, ratio: float | None, desc: str) -> None:
            plain, plus = [], []
            for lora in loras:
                for pname, param in lora.named_parameters():
                    (plus if ratio is not None and "lora_up" in pname else plain).append(param)
            for params, factor, suffix in ((plain, 1.0, ""), (plus, ratio, " plus")):
                if not params or lr is None or lr == 0:
                    continue
                groups.append({"params": params, "lr": lr * factor})
                descriptions.append(desc + suffix)

        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        if self.text_encoder_loras:
            if isinstance(text_encoder_lr, Sequence) and not isinstance(text_encoder_lr, str):
                lrs = list(text_encoder_lr)
                for i, comp in enumerate(dict.fromkeys(lora.component for lora in self.text_encoder_loras)):
                    lr = lrs[min(i, len(lrs) - 1)] if lrs else default_lr
                    part = [m for m in self.text_encoder_loras if m.component == comp]
                    add(part, lr, te_ratio, f"textencoder {i + 1}")
            else:
                lr = default_lr if text_encoder_lr is None else text_encoder_lr
                add(self.text_encoder_loras, lr, te_ratio, "textencoder")
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        lr = default_lr if unet_lr is None else unet_lr
        if self.unet_loras:
            if group_key is None:
                add(self.unet_loras, lr, unet_ratio, "unet")
            else:
                by_key: dict[str, list[LoRAModule]] = {}
                for lora in self.unet_loras:
                    by_key.setdefault(group_key(lora), []).append(lora)
                for key, loras in by_key.items():
                    add(loras, lr, unet_ratio, f"unet {key}")
        return groups, descriptions

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None, loraplus_unet_lr_ratio: float | None,
                              loraplus_text_encoder_lr_ratio: float | None) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def enable_gradient_checkpointing(self) -> None:
        pass  # nothing to checkpoint inside the LoRA modules; the base model does its own

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def on_step_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str
    ) -> tuple[int, float, float]:
        """Scale down modules whose ‖ΔW‖ exceeds max_norm_value (kohya --scale_weight_norms)."""
        keys_scaled, norms = 0, []
        for lora in self.loras:
            norm = lora.delta_weight(1.0).to(device).norm().clamp(min=max_norm_value / 2)
            desired = torch.clamp(norm, max=max_norm_value)
            ratio = float(desired / norm)
            if ratio != 1.0:
                keys_scaled += 1
                lora.lora_up.weight.mul_(ratio**0.5)
                lora.lora_down.weight.mul_(ratio**0.5)
            norms.append(float(norm) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # -- files --------------------------------------------------------------------------------------------------

    def default_metadata(self) -> dict[str, str]:
        """ss_network_* and ss_base_model_version (sd-scripts) + SAI ModelSpec for a LoRA adapter."""
        from sd_scripts_surge.models.metadata import IMPL_DIFFUSERS, build_modelspec

        dims = {lora.lora_dim for lora in self.loras}
        alphas = {float(lora.alpha) for lora in self.loras}
        args: dict[str, str] = {}
        if self.conv_lora_dim:
            args["conv_dim"] = str(self.conv_lora_dim)
            args["conv_alpha"] = str(1.0 if self.conv_alpha is None else self.conv_alpha)
        for key in ("dropout", "rank_dropout", "module_dropout"):
            if getattr(self, key):
                args[key] = str(getattr(self, key))
        meta = {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
            "ss_network_alpha": _alpha_text(alphas.pop()) if len(alphas) == 1 else "Dynamic",
            "ss_base_model_version": BASE_MODEL_VERSIONS[self.arch],
            "ss_v2": "False",
        }
        if args:
            meta["ss_network_args"] = json.dumps(args)
        if not self.text_encoder_loras:
            meta["ss_network_train_unet_only"] = "True"
        elif not self.unet_loras:
            meta["ss_network_train_text_encoder_only"] = "True"
        impl = {} if self.arch == "sdxl" else {"implementation": IMPL_DIFFUSERS}
        meta.update(build_modelspec(self.arch, adapter="lora", **impl))
        return meta

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the LoRA as safetensors atomically (temp file + fsync + rename).

        Caller metadata wins over the defaults (`default_metadata`); `sshs_model_hash` / `sshs_legacy_hash`
        are added as sd-scripts does (hashes of the tensors saved with only the `ss_*` keys).
        """
        from sd_scripts_surge.models.fileio import save_safetensors_atomic
        from sd_scripts_surge.models.metadata import header_metadata

        path = Path(file)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path}: LoRA files are written as .safetensors only; change the extension")
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        meta = self.default_metadata()
        meta.update(header_metadata(metadata))
        model_hash, legacy_hash = safetensors_hashes(state, meta)
        meta["sshs_model_hash"] = model_hash
        meta["sshs_legacy_hash"] = legacy_hash
        return save_safetensors_atomic(state, path, metadata=meta)

    def load_weights(self, file: str | os.PathLike, strict: bool = True):  # noqa: ANN201
        """Load a kohya LoRA file into this network; unknown module names raise (strict) or warn."""
        weights_sd, _ = read_lora_file(file)
        _check_lora_keys(weights_sd.keys(), str(file))
        weights_sd = self.canonical_state_dict(weights_sd)
        own = set(self.state_dict().keys())
        unknown = sorted({k.split(".")[0] for k in weights_sd if k not in own})
        if unknown:
            msg = f"{file}: {len(unknown)} LoRA module(s) are not in this network: {_list_names(unknown)}"
            if strict:
                raise LoRAFormatError(msg + "; create the network from the file (create_network_from_weights) "
                                            "or pass strict=False to skip them")
            logger.warning(msg + "; skipped")
            weights_sd = {k: v for k, v in weights_sd.items() if k in own}
        info = self.load_state_dict(weights_sd, strict=False)
        missing = sorted({k.split(".")[0] for k in info.missing_keys})
        if missing:
            logger.warning("%s: %d LoRA modules of the network are not in the file and keep their current weights: %s",
                           file, len(missing), _list_names(missing))
        return info


def _alpha_text(alpha: float) -> str:
    return str(int(alpha)) if float(alpha).is_integer() else str(alpha)


# ---------------------------------------------------------------------------------------------------------------
# Files and hashes
# ---------------------------------------------------------------------------------------------------------------


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(model hash, legacy hash) as sd-webui-additional-networks computes them, over the tensors serialised
    with only the `ss_*` metadata: sha256 of the data after the header, and sha256 of 64 KiB at 1 MiB (8 hex)."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=ss_only)
    stream = io.BytesIO(blob)
    header_len = int.from_bytes(stream.read(8), "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def read_lora_file(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a LoRA safetensors file (the header is validated first)."""
    from safetensors.torch import load_file

    from sd_scripts_surge.models.fileio import read_safetensors_header

    path = Path(file)
    if path.suffix.lower() != ".safetensors":
        raise LoRAFormatError(f"{path}: only .safetensors LoRA files are loaded (pickled files can run code)")
    header = read_safetensors_header(path)
    return load_file(str(path)), dict(header.metadata or {})


# ---------------------------------------------------------------------------------------------------------------
# Entry points (sd-scripts signatures)
# ---------------------------------------------------------------------------------------------------------------


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """A new LoRA network for training. kwargs = network_args (strings accepted): conv_dim, conv_alpha,
    dropout, rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio."""
    unknown = sorted(set(kwargs) - KNOWN_NETWORK_ARGS)
    if unknown:
        logger.warning("networks.lora ignores unknown network_args: %s (known: %s)", unknown,
                       sorted(KNOWN_NETWORK_ARGS))
    conv_dim = kwargs.get("conv_dim")
    conv_dim = int(conv_dim) if conv_dim not in (None, "", "None") else None
    conv_alpha = _float_or_none(kwargs.get("conv_alpha"))
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    dropout = neuron_dropout if neuron_dropout is not None else _float_or_none(kwargs.get("dropout"))
    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        dropout=dropout,
        rank_dropout=_float_or_none(kwargs.get("rank_dropout")),
        module_dropout=_float_or_none(kwargs.get("module_dropout")),
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
    )
    ratios = [_float_or_none(kwargs.get(k)) for k in
              ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network with exactly the modules (and dims/alphas) of a LoRA file; returns (network, weights_sd).

    As in sd-scripts the weights are not loaded here: call `network.apply_to(...)` then
    `network.load_state_dict(weights_sd)` (hooked), or `network.merge_to(..., weights_sd)` (merged).
    Module names may be ldm (sd-scripts SDXL) or diffusers layout; names that match no layer raise
    LoRAFormatError listing them.
    """
    source = str(file) if file is not None else "<state dict>"
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd, _ = read_lora_file(file)
    weights_sd = dict(weights_sd)
    dims, alphas = _modules_dim_alpha(weights_sd, source)
    if not dims:
        raise LoRAFormatError(f"{source}: no `<name>.lora_down.weight` tensors; not a kohya LoRA file")
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas)
    return network, weights_sd


def load_lora(
    file: str | os.PathLike,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    multiplier: float = 1.0,
    apply: bool = True,
) -> LoRANetwork:
    """Read a kohya LoRA file, build its network over these models, load the tensors and (by default) hook it."""
    network, weights_sd = create_network_from_weights(multiplier, file, None, text_encoder, unet)
    network.load_state_dict(weights_sd, strict=True)
    if apply:
        network.apply_to(text_encoder, unet)
    return network
