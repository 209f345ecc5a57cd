"""Load and save Stable Diffusion checkpoints (SDXL, SD1): single files in the SAI/ldm layout and diffusers folders.

Loading is defensive: the safetensors header is validated first (truncated / corrupt / lying files), then the
key set and every shape are checked against the model config before a single tensor is read, then every
tensor is checked for NaN/Inf as it is read. Each problem is a `CheckpointError` naming the file and key.

Configs (see configs.py): an explicit `config_dir` wins; then configs stored by us in the file's metadata
(`surge.unet_config`, ...); then the standard SDXL/SD1 configs when the shapes match them; else inferred
from shapes. Tokenizers come from a diffusers folder or `tokenizer_dir`; never downloaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sd_scripts_surge.models import configs as cfg
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.models.convert import (
    COMPONENT_PREFIXES,
    IGNORED_LDM_KEYS,
    SDXL_TE2_PREFIX,
    UNET_PREFIX,
    clip_canonical_state_dict,
    clip_module_state_dict,
    components_to_ldm,
    ldm_to_components,
)
from sd_scripts_surge.models.fileio import (
    CheckpointError,
    check_finite,
    read_safetensors_header,
    save_safetensors_atomic,
)
from sd_scripts_surge.models.metadata import build_modelspec, header_metadata

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
Shapes = dict[str, tuple[int, ...]]

PRECISIONS: dict[str, torch.dtype] = {
    "float": torch.float32,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONFIG_METADATA_KEYS = {
    "unet": "surge.unet_config",
    "vae": "surge.vae_config",
    "text_encoder_1": "surge.text_encoder_config",
    "text_encoder_2": "surge.text_encoder_2_config",
}
DIFFUSERS_SUBFOLDERS = {
    "unet": "unet",
    "vae": "vae",
    "text_encoder_1": "text_encoder",
    "text_encoder_2": "text_encoder_2",
}
MAX_LISTED = 5


def precision_dtype(precision: str | torch.dtype) -> torch.dtype:
    """sd-scripts' `--save_precision` names (float | fp16 | bf16) or a torch dtype -> torch dtype."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of float, fp16, bf16")
    return PRECISIONS[precision]


# ---------------------------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------------------------


def detect_arch(keys: Iterable[str]) -> str:
    """ "sdxl" or "sd1" from the key set of a single-file checkpoint in the ldm/sgm layout.

    Raises CheckpointError for layouts we do not load (SD2, SDXL refiner, SD3, Flux, diffusers-named files).
    """
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise CheckpointError("this looks like the SDXL refiner (OpenCLIP-G only); only SDXL base layouts load")
    if has("cond_stage_model.transformer.") and has("model.diffusion_model."):
        return "sd1"
    if has("cond_stage_model.model."):
        raise CheckpointError("this looks like SD2 (OpenCLIP-H text encoder); SD2 is not supported")
    if has("model.diffusion_model.joint_blocks.") or has("double_blocks.") or has("joint_blocks."):
        raise CheckpointError("this looks like SD3 or Flux; only SDXL and SD1 checkpoints load here")
    if has("down_blocks.") or has("unet.down_blocks."):
        raise CheckpointError(
            "this file uses diffusers names, not the single-file ldm layout; load a diffusers folder instead"
        )
    raise CheckpointError(
        "unknown checkpoint layout: no `model.diffusion_model.*` with `conditioner.embedders.*` (SDXL) or "
        "`cond_stage_model.transformer.*` (SD1) keys"
    )


# ---------------------------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------------------------


def _empty_module(component: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """A module whose parameters live on the meta device (buffers are real), ready for load_state_dict(assign)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        if component == "unet":
            return UNet2DConditionModel(**config)
        if component == "vae":
            return AutoencoderKL(**config)
        te_config = CLIPTextConfig(**config)
        if component == "text_encoder_1":
            return CLIPTextModel(te_config)
        return CLIPTextModelWithProjection(te_config)


def _component_configs(configs: cfg.ModelConfigs) -> dict[str, dict[str, Any]]:
    names = COMPONENT_PREFIXES[configs.arch]
    return {name: configs.get(name) for name in names}


def _canonical_state_dict(component: str, module: torch.nn.Module) -> dict[str, Tensor]:
    sd = module.state_dict()
    return clip_canonical_state_dict(sd) if component.startswith("text_encoder") else dict(sd)


def _expected_shapes(modules: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {name: _canonical_state_dict(name, m) for name, m in modules.items()}


def _fill_module(
    component: str, module: torch.nn.Module, state_dict: Mapping[str, Tensor], source: str
) -> torch.nn.Module:
    if component.startswith("text_encoder"):
        state_dict = clip_module_state_dict(module, state_dict)
    result = module.load_state_dict(dict(state_dict), strict=False, assign=True)
    if result.missing_keys:
        _raise_missing(source, component, result.missing_keys)
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        _raise_missing(source, component, left)
    return module.eval()


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _raise_missing(source: str | os.PathLike, what: str, missing: list[str]) -> None:
    listed = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
    raise CheckpointError(
        f"{source}: {len(missing)} {what} key(s) missing: {listed}. The file is incomplete or is a different "
        "model/size than its config; pass config_dir=<diffusers folder> if the config is wrong"
    )


def validate_shapes(
    source: str | os.PathLike,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    ignore: re.Pattern[str] | None = None,
) -> list[str]:
    """Check a checkpoint's key -> shape table against what the model needs.

    Missing keys and shape mismatches raise CheckpointError; unexpected keys are logged as a warning and
    returned (keys matching `ignore` are skipped silently).
    """
    missing = [k for k in expected if k not in found]
    if missing:
        _raise_missing(source, "model", missing)
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {list(found[k])}, the model config expects {list(shape)}; "
                "the file belongs to a different model size or its header is wrong"
            )
    unexpected = [k for k in found if k not in expected and not (ignore and ignore.match(k))]
    if unexpected:
        listed = ", ".join(unexpected[:MAX_LISTED]) + (" ..." if len(unexpected) > MAX_LISTED else "")
        logger.warning("%s: %d unexpected key(s) ignored: %s", source, len(unexpected), listed)
    return unexpected


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors
# ---------------------------------------------------------------------------------------------------------------


class _TensorSource:
    """Key -> shape table plus a reader, for a safetensors file (lazy) or an opted-in pickle (in memory)."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path = path
        self.metadata: dict[str, str] = {}
        self._pickled: dict[str, Tensor] | None = None
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            header = read_safetensors_header(path)
            self.metadata = header.metadata
            self.shapes: Shapes = {k: t.shape for k, t in header.tensors.items()}
        elif suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise CheckpointError(
                    f"{path}: {suffix} files are pickles, which can run code when loaded; convert the file to "
                    ".safetensors, or pass allow_pickle=True (--allow_pickle) if you trust its source"
                )
            self._pickled = _load_pickle(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._pickled.items()}
        else:
            raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors")

    def read(self, keys: Iterable[str], dtype: torch.dtype | None, desc: str) -> dict[str, Tensor]:
        """The tensors of `keys`, checked finite, floats cast to `dtype` (None: as stored)."""
        keys = list(keys)
        out: dict[str, Tensor] = {}
        with contextlib.ExitStack() as stack:
            handle = None
            if self._pickled is None:
                from safetensors import safe_open

                handle = stack.enter_context(safe_open(str(self.path), framework="pt", device="cpu"))
            for k in tqdm(keys, desc=desc, unit="tensor", leave=False, disable=None):
                t = self._pickled[k] if handle is None else handle.get_tensor(k)
                check_finite(k, t, self.path)
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def _load_pickle(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------------------------
# Config resolution
# ---------------------------------------------------------------------------------------------------------------


def _read_config_dir(config_dir: Path, component: str) -> dict[str, Any] | None:
    path = config_dir / DIFFUSERS_SUBFOLDERS[component] / "config.json"
    if not path.is_file():
        return None
    try:
        return cfg.clean_config(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _standard_shapes(arch: str, component: str) -> dict[str, tuple[int, ...]]:
    key = (arch, component)
    if key not in _STANDARD_SHAPE_CACHE:
        config = _component_configs(cfg.standard_configs(arch))[component]
        module = _empty_module(component, config)
        sd = {component: _canonical_state_dict(component, module)}
        ldm = components_to_ldm(arch, sd, config if component == "unet" else None, partial=True)
        _STANDARD_SHAPE_CACHE[key] = {k: tuple(v.shape) for k, v in ldm.items()}
    return _STANDARD_SHAPE_CACHE[key]


_STANDARD_SHAPE_CACHE: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}


def _resolve_single_file_configs(
    arch: str, shapes: Shapes, metadata: Mapping[str, str], config_dir: Path | None, source: Path
) -> cfg.ModelConfigs:
    prefixes = COMPONENT_PREFIXES[arch]
    parts: dict[str, Shapes] = {name: {} for name in prefixes}
    for k, s in shapes.items():
        for name, prefix in prefixes.items():
            if k.startswith(prefix):
                parts[name][k[len(prefix) :]] = s
                break
    standard = _component_configs(cfg.standard_configs(arch))
    chosen: dict[str, dict[str, Any]] = {}
    origins = set()
    for name in prefixes:
        config = _read_config_dir(config_dir, name) if config_dir else None
        origin = "config_dir"
        if config is None and CONFIG_METADATA_KEYS[name] in metadata:
            try:
                config = json.loads(metadata[CONFIG_METADATA_KEYS[name]])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{source}: metadata {CONFIG_METADATA_KEYS[name]} is not valid JSON") from e
            origin = "metadata"
        if config is None and _looks_standard(arch, name, parts[name]):
            config, origin = standard[name], "standard"
        if config is None:
            config, origin = _infer_component(arch, name, parts[name], source), "inferred"
        chosen[name] = config
        origins.add(origin)
    if "inferred" in origins and arch == "sdxl" and "addition_time_embed_dim" not in chosen["unet"]:
        unet = chosen["unet"]
        if "projection_class_embeddings_input_dim" in unet:
            proj = chosen["text_encoder_2"].get("projection_dim", 0)
            unet["addition_time_embed_dim"] = max((unet["projection_class_embeddings_input_dim"] - proj) // 6, 1)
    source_name = origins.pop() if len(origins) == 1 else "mixed"
    return cfg.ModelConfigs(arch, source=source_name, **chosen)


def _looks_standard(arch: str, component: str, part: Shapes) -> bool:
    """True when a component's shapes (keys without prefix) are exactly those of the standard config."""
    prefix = COMPONENT_PREFIXES[arch][component]
    signature = _standard_shapes_sig(arch, component)
    if any(tuple(part.get(k[len(prefix) :], ())) != s for k, s in signature.items()):
        return False  # cheap reject before building the standard model on the meta device
    full = _standard_shapes(arch, component)
    return all(tuple(part.get(k[len(prefix) :], ())) == s for k, s in full.items())


def _standard_shapes_sig(arch: str, component: str) -> dict[str, tuple[int, ...]]:
    """Signature shapes of the standard configs, computed without building models."""
    c = _component_configs(cfg.standard_configs(arch))[component]
    p = COMPONENT_PREFIXES[arch][component]
    if component == "unet":
        ch = c["block_out_channels"][0]
        return {p + "input_blocks.0.0.weight": (ch, c["in_channels"], 3, 3), p + "time_embed.0.weight": (4 * ch, ch)}
    if component == "vae":
        ch = c["block_out_channels"]
        return {p + "encoder.conv_in.weight": (ch[0], 3, 3, 3), p + "decoder.conv_out.weight": (3, ch[0], 3, 3)}
    emb = (c["vocab_size"], c["hidden_size"])
    if component == "text_encoder_1":
        return {p + "text_model.embeddings.token_embedding.weight": emb}
    return {p + "token_embedding.weight": emb, p + "positional_embedding": (c["max_position_embeddings"], emb[1])}


def _infer_component(arch: str, component: str, part: Shapes, source: Path) -> dict[str, Any]:
    try:
        if component == "unet":
            return cfg.infer_unet_config(part, arch)
        if component == "vae":
            return cfg.infer_vae_config(part, arch)
        if component == "text_encoder_1":
            return cfg.infer_clip_config(part, open_clip=False)
        hf = _open_clip_shapes_to_hf(part)
        return cfg.infer_clip_config(hf, open_clip=True)
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"{source}: cannot infer the {component} config from the tensor shapes (missing {e}); the file is "
            "incomplete, or pass config_dir=<diffusers folder with the model's config.json files>"
        ) from e


def _open_clip_shapes_to_hf(part: Shapes) -> Shapes:
    from sd_scripts_surge.models.convert import convert_open_clip_from_ldm

    meta = {k: torch.empty(s, device="meta") for k, s in part.items()}
    return {k: tuple(v.shape) for k, v in convert_open_clip_from_ldm(meta, unknown=[]).items()}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """A CLIP tokenizer from a local folder (vocab.json + merges.txt, or tokenizer.json). Never downloads."""
    from transformers import AutoTokenizer, CLIPTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {directory} does not exist")
    try:
        return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _tokenizers_from(root: Path, arch: str) -> tuple[Any, Any]:
    """(tokenizer_1, tokenizer_2) from a folder with tokenizer/ [tokenizer_2/] or a single tokenizer folder."""
    if (root / "tokenizer").is_dir():
        tok1 = load_tokenizer(root / "tokenizer")
        tok2 = None
        if arch == "sdxl":
            tok2 = load_tokenizer(root / "tokenizer_2") if (root / "tokenizer_2").is_dir() else tok1
        return tok1, tok2
    tok = load_tokenizer(root)
    return tok, (tok if arch == "sdxl" else None)


def attach_tokenizers(bundle: ModelBundle, root: Path | None, what: str) -> None:
    """Tokenizers from `root` (see `_tokenizers_from`), or a note in the metadata that there are none."""
    if root is not None:
        bundle.tokenizer_1, bundle.tokenizer_2 = _tokenizers_from(root, bundle.arch)
        return
    note = (
        f"no tokenizer: {what} carries none and no tokenizer_dir was given; pass tokenizer_dir=<folder with "
        "tokenizer/ and tokenizer_2/ (or one CLIP tokenizer folder)> to encode prompts"
    )
    bundle.metadata["surge.note.tokenizers"] = note
    logger.warning(note)


# ---------------------------------------------------------------------------------------------------------------
# Public: load
# ---------------------------------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    unet_dtype: torch.dtype | None = None,
) -> ModelBundle:
    """Load an SDXL or SD1 checkpoint: a single file (ldm/SAI layout) or a diffusers folder.

    arch: "sdxl" | "sd1" to skip detection. config_dir: a diffusers-style folder whose unet/, vae/,
    text_encoder/, text_encoder_2/ config.json files override the configs. tokenizer_dir: where tokenizers
    come from for single files (a folder with tokenizer/ [tokenizer_2/], or one CLIP tokenizer folder).
    allow_pickle: opt in to .ckpt/.pt files (loaded with torch.load(weights_only=True)).
    unet_dtype: read the UNet in this dtype instead of `dtype` (e.g. bf16 for a full_bf16 run: no fp32 UNet is
    ever held).
    """
    path = Path(path)
    if path.is_dir():
        return load_diffusers(path, arch=arch, tokenizer_dir=tokenizer_dir, dtype=dtype, allow_pickle=allow_pickle,
                              unet_dtype=unet_dtype)
    return load_single_file(
        path, arch=arch, tokenizer_dir=tokenizer_dir, config_dir=config_dir, dtype=dtype, allow_pickle=allow_pickle,
        unet_dtype=unet_dtype,
    )


def load_single_file(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    unet_dtype: torch.dtype | None = None,
) -> ModelBundle:
    """Load a single-file checkpoint in the original layout; see `load_model`."""
    plan = plan_single_file(path, arch=arch, config_dir=config_dir, allow_pickle=allow_pickle)
    unet_keys = [k for k in plan.expected if k.startswith(UNET_PREFIX)]
    other_keys = [k for k in plan.expected if not k.startswith(UNET_PREFIX)]
    tensors = plan.src.read(unet_keys, unet_dtype or dtype, desc=f"loading {plan.path.name} (UNet)")
    tensors |= plan.src.read(other_keys, dtype, desc=f"loading {plan.path.name}")
    components, _ = ldm_to_components(plan.arch, tensors, plan.configs.unet)
    for name, module in plan.modules.items():
        _fill_module(name, module, components[name], str(plan.path))
    bundle = plan.bundle()
    attach_tokenizers(bundle, Path(tokenizer_dir) if tokenizer_dir else None, plan.path.name)
    return bundle


@dataclass
class SingleFilePlan:
    """A single file checked before its tensors are read: architecture, configs, the expected ldm key → shape
    table (validated against the file) and the components as meta-device modules."""

    path: Path
    src: _TensorSource
    arch: str
    configs: cfg.ModelConfigs
    modules: dict[str, torch.nn.Module]
    expected: dict[str, tuple[int, ...]]

    def metadata(self) -> dict[str, str]:
        metadata = dict(self.src.metadata)
        metadata["surge.source"] = str(self.path)
        metadata["surge.config_source"] = self.configs.source
        logit_key = SDXL_TE2_PREFIX + "logit_scale"
        if self.arch == "sdxl" and logit_key in self.src.shapes:
            value = self.src.read([logit_key], torch.float32, "logit_scale")[logit_key]
            metadata["surge.te2_logit_scale"] = repr(float(value))
        if _is_v_prediction(self.src.shapes, metadata):
            metadata["modelspec.prediction_type"] = "v"
        return metadata

    def bundle(self) -> ModelBundle:
        """The bundle of `modules` (filled by the caller, or still on the meta device for configs only)."""
        m = self.modules
        return ModelBundle(arch=self.arch, unet=m["unet"], text_encoder_1=m["text_encoder_1"], vae=m["vae"],
                           text_encoder_2=m.get("text_encoder_2"), metadata=self.metadata())


def plan_single_file(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    config_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> SingleFilePlan:
    """Detect, resolve configs and validate every key and shape of a single file, reading no tensor."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    src = _TensorSource(path, allow_pickle)
    ema = sum(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in src.shapes)
    if ema:
        logger.warning("%s holds EMA weights (%d model_ema.* tensors); loading the non-EMA model. "
                       "`sd-merge prune-ema %s --keep ema -o OUT` makes the EMA weights the model", path, ema, path)
    arch = arch or detect_arch(src.shapes)
    if arch not in COMPONENT_PREFIXES:
        raise ValueError(f"arch {arch!r}: expected 'sdxl' or 'sd1'")
    configs = _resolve_single_file_configs(
        arch, src.shapes, src.metadata, Path(config_dir) if config_dir else None, path
    )
    modules = {name: _empty_module(name, c) for name, c in _component_configs(configs).items()}
    expected_ldm = components_to_ldm(arch, _expected_shapes(modules), configs.unet)
    expected = {k: tuple(v.shape) for k, v in expected_ldm.items()}
    validate_shapes(path, expected, src.shapes, ignore=IGNORED_LDM_KEYS)
    return SingleFilePlan(path, src, arch, configs, modules, expected)


def _is_v_prediction(shapes: Mapping[str, Any], metadata: Mapping[str, str]) -> bool:
    return "v_pred" in shapes or metadata.get("modelspec.prediction_type") in ("v", "v_prediction")


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of one diffusers/transformers component folder (sharded or not)."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        if ".fp16." in index.name or ".bf16." in index.name:
            continue
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    plain = [p for p in sorted(folder.glob("*.safetensors")) if p.name.count(".") == 1]
    if plain:
        return plain
    variants = sorted(folder.glob("*.safetensors"))
    if variants:
        return variants[:1]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: holds only pickled weights ({pickles[0].name}); pass allow_pickle=True if you trust it"
            )
        return pickles
    raise CheckpointError(f"{folder}: no weight file (*.safetensors) found")


def _diffusers_arch(folder: Path) -> str:
    index = folder / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if "XL" in name:
            return "sdxl"
        if name.startswith("StableDiffusion"):
            return "sd1"
    return "sdxl" if (folder / "text_encoder_2").is_dir() else "sd1"


def load_diffusers(
    folder: str | os.PathLike,
    *,
    arch: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    unet_dtype: torch.dtype | None = None,
) -> ModelBundle:
    """Load a diffusers folder (unet/, vae/, text_encoder/[, text_encoder_2/], tokenizer dirs, model_index.json)."""
    plan = plan_diffusers(folder, arch=arch, allow_pickle=allow_pickle)
    modules = {}
    for name, part in plan.components.items():
        tensors: dict[str, Tensor] = {}
        part_dtype = unet_dtype or dtype if name == "unet" else dtype
        for src, keys in part.by_source():
            read = src.read(keys, part_dtype, f"loading {part.folder.name}/{src.path.name}")
            tensors.update({keys[k]: v for k, v in read.items()})
        modules[name] = _fill_module(name, part.module, tensors, str(part.folder))
    bundle = plan.bundle(modules)
    tok_root = Path(tokenizer_dir) if tokenizer_dir else (plan.folder if (plan.folder / "tokenizer").is_dir() else None)
    attach_tokenizers(bundle, tok_root, str(plan.folder))
    return bundle


@dataclass
class DiffusersComponent:
    """One component folder, checked: its meta-device module and where each canonical key is stored."""

    folder: Path
    module: torch.nn.Module
    expected: dict[str, tuple[int, ...]]  # canonical key -> shape
    owners: dict[str, tuple[_TensorSource, str]]  # canonical key -> (weight file, key in that file)

    def by_source(self) -> list[tuple[_TensorSource, dict[str, str]]]:
        """[(weight file, {file key: canonical key})] for every expected key."""
        groups: dict[int, tuple[_TensorSource, dict[str, str]]] = {}
        for canon in self.expected:
            src, k = self.owners[canon]
            groups.setdefault(id(src), (src, {}))[1][k] = canon
        return list(groups.values())


@dataclass
class DiffusersPlan:
    folder: Path
    arch: str
    components: dict[str, DiffusersComponent]

    def metadata(self) -> dict[str, str]:
        metadata = {"surge.source": str(self.folder), "surge.config_source": "diffusers"}
        scheduler_config = self.folder / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            prediction = json.loads(scheduler_config.read_text()).get("prediction_type", "epsilon")
            metadata["modelspec.prediction_type"] = "v" if prediction == "v_prediction" else "epsilon"
        return metadata

    def bundle(self, modules: Mapping[str, torch.nn.Module] | None = None) -> ModelBundle:
        """A bundle of `modules` (default: the meta-device modules, for configs only)."""
        m = dict(modules) if modules is not None else {n: c.module for n, c in self.components.items()}
        return ModelBundle(arch=self.arch, unet=m["unet"], text_encoder_1=m["text_encoder_1"], vae=m["vae"],
                           text_encoder_2=m.get("text_encoder_2"), metadata=self.metadata())


def plan_diffusers(
    folder: str | os.PathLike, *, arch: str | None = None, allow_pickle: bool = False
) -> DiffusersPlan:
    """Read the configs of a diffusers folder and validate every component's keys and shapes (no tensor read)."""
    folder = Path(folder)
    arch = arch or _diffusers_arch(folder)
    components: dict[str, DiffusersComponent] = {}
    for name in COMPONENT_PREFIXES[arch]:
        sub = folder / DIFFUSERS_SUBFOLDERS[name]
        config = _read_config_dir(folder, name)
        if config is None:
            raise CheckpointError(f"{sub}: config.json missing; a diffusers folder needs one per component")
        module = _empty_module(name, config)
        expected = {k: tuple(v.shape) for k, v in _canonical_state_dict(name, module).items()}
        found: Shapes = {}
        owners: dict[str, tuple[_TensorSource, str]] = {}
        for file in _weight_files(sub, allow_pickle):
            src = _TensorSource(file, allow_pickle)
            for k, shape in src.shapes.items():
                canon = _canonical_key(name, k)
                if canon is not None:
                    found[canon] = shape
                    owners[canon] = (src, k)
        validate_shapes(sub, expected, found)
        components[name] = DiffusersComponent(sub, module, expected, owners)
    return DiffusersPlan(folder, arch, components)


def _canonical_key(component: str, key: str) -> str | None:
    """A key of a component weight file in the canonical naming (None: a buffer we ignore)."""
    if not component.startswith("text_encoder"):
        return key
    if key.endswith("position_ids"):
        return None
    return next(iter(clip_canonical_state_dict({key: torch.empty(0)})))


# ---------------------------------------------------------------------------------------------------------------
# Public: save
# ---------------------------------------------------------------------------------------------------------------


def bundle_configs(bundle: ModelBundle) -> cfg.ModelConfigs:
    """The diffusers/transformers configs of the bundle's modules, as clean JSON-able dicts."""
    te2 = bundle.text_encoder_2
    return cfg.ModelConfigs(
        bundle.arch,
        unet=cfg.clean_config(bundle.unet.config),
        vae=cfg.clean_config(bundle.vae.config),
        text_encoder_1=cfg.clean_config(bundle.text_encoder_1.config.to_dict()),
        text_encoder_2=cfg.clean_config(te2.config.to_dict()) if te2 is not None else None,
        source="bundle",
    )


def _component_state_dicts(bundle: ModelBundle, dtype: torch.dtype) -> dict[str, dict[str, Tensor]]:
    out = {}
    for name, module in bundle.modules().items():
        sd = _canonical_state_dict(name, module)
        out[name] = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()) for k, v in sd.items()}
    return out


def bundle_to_ldm_state_dict(bundle: ModelBundle, precision: str | torch.dtype = "float") -> dict[str, Tensor]:
    """The whole bundle as one state dict in the original single-file layout, cast to `precision`."""
    dtype = precision_dtype(precision)
    sd = components_to_ldm(bundle.arch, _component_state_dicts(bundle, dtype), bundle.unet.config)
    logit_scale = bundle.metadata.get("surge.te2_logit_scale")
    if bundle.arch == "sdxl" and logit_scale is not None:
        sd[SDXL_TE2_PREFIX + "logit_scale"] = torch.tensor(float(logit_scale), dtype=dtype)
    return sd


def native_resolution(bundle: ModelBundle) -> int:
    """Image size the UNet was built for: latent sample_size x the VAE's downscale factor (SDXL 1024, SD1 512)."""
    factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    return int(bundle.unet.config.sample_size) * factor


def single_file_metadata(
    bundle: ModelBundle, *, title: str | None = None, metadata: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Header metadata for a single file: ModelSpec + our exact configs (`surge.*_config`) + caller keys.

    Caller keys (kohya `ss_*`, `modelspec.*` overrides, anything else) win over the defaults.
    """
    prediction = bundle.metadata.get("modelspec.prediction_type", "epsilon")
    out = build_modelspec(bundle.arch, title=title, prediction_type=prediction, resolution=native_resolution(bundle))
    configs = bundle_configs(bundle)
    for name, key in CONFIG_METADATA_KEYS.items():
        config = configs.get(name)
        if config is not None:
            out[key] = json.dumps(config, sort_keys=True)
    out.update(header_metadata(metadata))
    return out


def save_single_file(
    bundle: ModelBundle,
    path: str | os.PathLike,
    *,
    precision: str | torch.dtype = "float",
    metadata: Mapping[str, Any] | None = None,
    title: str | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write the bundle as one .safetensors file in the original SAI/ldm layout, atomically.

    precision: "float" | "fp16" | "bf16" (sd-scripts' --save_precision). metadata: extra header keys,
    e.g. kohya's {"ss_output_name": ..., "ss_training_started_at": ...}; values are stringified.
    protect: input files that must not be overwritten (the source checkpoint is protected automatically).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors only")
    source = bundle.metadata.get("surge.source")
    if source and Path(source).is_file():
        protect = (*protect, source)
    state_dict = bundle_to_ldm_state_dict(bundle, precision)
    header = single_file_metadata(bundle, title=title or path.stem, metadata=metadata)
    return save_safetensors_atomic(state_dict, path, metadata=header, protect=protect)


_PIPELINE_CLASSES = {"sdxl": "StableDiffusionXLPipeline", "sd1": "StableDiffusionPipeline"}


def _model_index(bundle: ModelBundle) -> dict[str, Any]:
    import diffusers

    tok = ["transformers", "CLIPTokenizer"]
    index: dict[str, Any] = {
        "_class_name": _PIPELINE_CLASSES[bundle.arch],
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": tok if bundle.tokenizer_1 is not None else [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if bundle.arch == "sdxl":
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = tok if bundle.tokenizer_2 is not None else [None, None]
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
    return index


def _scheduler_config(bundle: ModelBundle) -> dict[str, Any]:
    # the training schedule of SDXL and SD1 (scaled-linear betas 0.00085..0.012 over 1000 steps)
    prediction = "v_prediction" if bundle.metadata.get("modelspec.prediction_type") == "v" else "epsilon"
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction,
        "interpolation_type": "linear",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "use_karras_sigmas": False,
    }


def save_diffusers(bundle: ModelBundle, folder: str | os.PathLike, *, precision: str | torch.dtype = "float") -> Path:
    """Write the bundle as a diffusers folder (loads with `DiffusionPipeline.from_pretrained(folder)`).

    Written into a temp folder beside the target and renamed into place; an existing folder is replaced only
    after the new one is complete. The bundle's modules are not changed (weights are cast on copies, one
    component at a time).
    """
    dtype = precision_dtype(precision)

    def weights(name: str, module: torch.nn.Module, path: Path) -> None:
        sd = _canonical_state_dict(name, module)
        state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()) for k, v in sd.items()}
        save_safetensors_atomic(state, path, metadata={"format": "pt"})

    return write_diffusers_folder(bundle, folder, dtype, weights)


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder_1": "model.safetensors", "text_encoder_2": "model.safetensors"}


def write_diffusers_folder(
    bundle: ModelBundle,
    folder: str | os.PathLike,
    dtype: torch.dtype,
    weights: Callable[[str, torch.nn.Module, Path], None],
) -> Path:
    """A diffusers folder from a bundle's configs, tokenizers and metadata; `weights(component, module, path)`
    writes each component's weight file (the modules may be on the meta device when `weights` streams them
    from elsewhere). Written into a temp folder and renamed into place."""
    import diffusers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name, module in bundle.modules().items():
            sub = tmp / DIFFUSERS_SUBFOLDERS[name]
            sub.mkdir()
            if name.startswith("text_encoder"):
                config = module.config.to_dict()
                config["torch_dtype"] = str(dtype).removeprefix("torch.")
            else:
                config = {"_class_name": type(module).__name__, "_diffusers_version": diffusers.__version__}
                config.update(cfg.clean_config(module.config))
            (sub / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            weights(name, module, sub / WEIGHT_FILES[name])
        scheduler = tmp / "scheduler"
        scheduler.mkdir()
        sched = dict(_scheduler_config(bundle), _diffusers_version=diffusers.__version__)
        (scheduler / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        if bundle.tokenizer_1 is not None:
            bundle.tokenizer_1.save_pretrained(str(tmp / "tokenizer"))
        if bundle.arch == "sdxl" and bundle.tokenizer_2 is not None:
            bundle.tokenizer_2.save_pretrained(str(tmp / "tokenizer_2"))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(bundle), indent=2))
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and deleted only afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another output path")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
