"""Optimizer and LR-scheduler names of our trainer, with sd-scripts' meaning (`--optimizer_type`, `--lr_scheduler`).

Optimizers (case-insensitive): ADA_SURGE (alias AdaSurge), AdamW, AdamW8bit / PagedAdamW8bit / Lion8bit
(bitsandbytes' blockwise 8-bit state, also on the CPU with bitsandbytes ≥ 0.45), Adafactor
(transformers; kohya's defaults: relative_step=True unless given, then the lr is only the initial lr and the
``adafactor`` schedule is used), SGD, SGDNesterov, Lion (lion_pytorch), any ``torch.optim`` class by name, and
any dotted path ``module.Class`` (called as ``Class(params, lr=learning_rate, **optimizer_args)``).

``--optimizer_args`` / ``--lr_scheduler_args`` items are ``key=value`` with the value parsed by
``ast.literal_eval`` like sd-scripts (library/train_util.py get_optimizer / get_scheduler_fix). Two
conveniences over upstream: we split at the first "=" only, and a value that is not a Python literal stays a
string (``state_dtype=fp64`` works here; upstream needs ``state_dtype='fp64'``).

Schedulers: kohya/diffusers names constant, constant_with_warmup, linear, cosine, cosine_with_restarts,
polynomial (and the other diffusers ones), adafactor, plus ``cascade`` (library.cascade_scheduler.CascadeLR,
fed the trainer's warmup / step count / cycles; ``--lr_scheduler_args`` such as min_lr_ratio, spread win).
``--lr_scheduler_type`` takes a torch.optim.lr_scheduler class name or a dotted path, called with only the
optimizer and ``--lr_scheduler_args`` (like upstream, which then refuses a warmup ≠ 0); for CascadeLR we fill
num_training_steps / warmup_steps / num_cycles from the trainer when the args leave them out.
"""

from __future__ import annotations

import ast
import importlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from library.cascade_scheduler import CascadeLR
from library.surge_optimizer import AdaSurge

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES = ("ADA_SURGE", "AdaSurge", "AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion8bit", "Adafactor", "SGD",
                   "SGDNesterov", "Lion")
BITSANDBYTES = {"adamw8bit": "AdamW8bit", "pagedadamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}
SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                   "adafactor", "cascade")


# ------------------------------------------------------------------------------------------- arguments


def parse_kv_args(args: Sequence[str] | Mapping[str, Any] | str | None, flag: str = "--optimizer_args"
                  ) -> dict[str, Any]:
    """``["k=v", …]`` → {k: literal_eval(v) or the raw string}; a mapping (from TOML) passes through."""
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, str):
        args = [args]
    out: dict[str, Any] = {}
    for item in args:
        key, sep, raw = str(item).partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValueError(f"{flag}: {item!r} is not key=value (e.g. {flag} \"weight_decay=0.01\")")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def import_dotted(path: str, default_module: Any, what: str) -> Any:
    """``pkg.mod.Name`` → the attribute (module imported by path); a bare name is looked up in `default_module`."""
    if "." not in path:
        if not hasattr(default_module, path):
            raise ValueError(f"unknown {what} {path!r}: not one of ours and not in {default_module.__name__}; "
                             f"use a dotted path like mypackage.module.Class")
        return getattr(default_module, path)
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    if not hasattr(module, name):
        raise ValueError(f"{what} {path!r}: module {module_name!r} has no attribute {name!r}")
    return getattr(module, name)


# ------------------------------------------------------------------------------------------ optimizers


def create_optimizer(optimizer_type: str | None, params: Iterable[Any], learning_rate: float | None,
                     optimizer_args: Sequence[str] | Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """Build the optimizer named `optimizer_type` (None/"" = AdamW, like sd-scripts) over `params`."""
    kwargs = parse_kv_args(optimizer_args, "--optimizer_args")
    name = (optimizer_type or "AdamW").strip()
    key = name.lower()
    params = list(params)

    if key in ("ada_surge", "adasurge"):
        cls: Any = AdaSurge
    elif key == "adamw":
        cls = torch.optim.AdamW
    elif key == "sgd":
        cls = torch.optim.SGD
    elif key == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        kwargs["nesterov"] = True
        cls = torch.optim.SGD
    elif key in BITSANDBYTES:
        cls = _bitsandbytes(BITSANDBYTES[key])
    elif key == "lion":
        cls = _lion()
    elif key == "adafactor":
        return _kohya_adafactor(params, learning_rate, kwargs)
    else:
        cls = import_dotted(name, torch.optim, "--optimizer_type")
    logger.info("optimizer %s.%s %s", cls.__module__, cls.__name__, kwargs)
    try:
        return cls(params, lr=learning_rate, **kwargs)
    except TypeError as e:
        raise TypeError(f"--optimizer_type {name}: {e}; check --optimizer_args {kwargs}") from e


def _bitsandbytes(name: str) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"--optimizer_type {name} needs bitsandbytes: `pip install bitsandbytes==0.50.2` "
                          "(or use AdamW / ADA_SURGE)") from e
    return getattr(bnb.optim, name)


def _lion() -> Any:
    try:
        import lion_pytorch
    except ImportError as e:
        raise ImportError("--optimizer_type Lion needs lion-pytorch: `pip install lion-pytorch`") from e
    return lion_pytorch.Lion


def _kohya_adafactor(params: list[Any], learning_rate: float | None, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """transformers' Adafactor with sd-scripts' defaults: relative_step=True unless given; warmup_init forces it."""
    from transformers.optimization import Adafactor

    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init") and not kwargs["relative_step"]:
        logger.info("Adafactor: warmup_init=True needs relative_step=True; turning it on")
        kwargs["relative_step"] = True
    lr = learning_rate
    if kwargs["relative_step"]:
        if learning_rate:
            logger.info("Adafactor relative_step=True: learning_rate %s is used as the initial lr only", learning_rate)
        for group in params:
            if isinstance(group, dict):
                group.pop("lr", None)
        lr = None
    optimizer = Adafactor(params, lr=lr, **kwargs)
    optimizer.kohya_initial_lr = float(learning_rate or 0.0)  # read by create_scheduler's adafactor schedule
    return optimizer


# ------------------------------------------------------------------------------------------ schedulers


def create_scheduler(name: str | None, optimizer: torch.optim.Optimizer, num_training_steps: int,
                     num_warmup_steps: int = 0, num_cycles: float | None = None, power: float | None = None,
                     scheduler_type: str | None = None,
                     scheduler_args: Sequence[str] | Mapping[str, Any] | None = None) -> Any:
    """The LR scheduler for `name` (kohya names + "cascade") or for the class `scheduler_type`."""
    kwargs = parse_kv_args(scheduler_args, "--lr_scheduler_args")
    warmup = int(num_warmup_steps or 0)
    cycles = 1 if num_cycles is None else num_cycles
    if scheduler_type:
        cls = import_dotted(scheduler_type, torch.optim.lr_scheduler, "--lr_scheduler_type")
        if isinstance(cls, type) and issubclass(cls, CascadeLR):
            kwargs.setdefault("num_training_steps", num_training_steps)
            if "num_warmup_steps" not in kwargs:
                kwargs.setdefault("warmup_steps", warmup)
            kwargs.setdefault("num_cycles", cycles)
        elif warmup:
            raise ValueError(f"--lr_scheduler_type {scheduler_type} gets only the optimizer and --lr_scheduler_args; "
                             f"set --lr_warmup_steps 0 (got {warmup}) and pass warmup through its own args")
        return cls(optimizer, **kwargs)

    key = (name or "constant").strip()
    if key.lower() == "cascade":
        kwargs.setdefault("num_training_steps", num_training_steps)
        if "num_warmup_steps" not in kwargs:
            kwargs.setdefault("warmup_steps", warmup)
        kwargs.setdefault("num_cycles", cycles)
        return CascadeLR(optimizer, **kwargs)
    if key.lower().startswith("adafactor") or _is_relative_adafactor(optimizer):
        return _adafactor_schedule(key, optimizer, warmup)
    return _diffusers_schedule(key, optimizer, num_training_steps, warmup, cycles, power, kwargs)


def _is_relative_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and any(g.get("relative_step") for g in optimizer.param_groups)


def _adafactor_schedule(key: str, optimizer: torch.optim.Optimizer, warmup: int) -> Any:
    from transformers.optimization import Adafactor, AdafactorSchedule

    if not isinstance(optimizer, Adafactor):
        raise ValueError(f"--lr_scheduler {key} works only with --optimizer_type Adafactor")
    if warmup:
        raise ValueError("--lr_scheduler adafactor has no warmup: set --lr_warmup_steps 0")
    _, _, lr_text = key.partition(":")
    initial_lr = float(lr_text) if lr_text else float(getattr(optimizer, "kohya_initial_lr", 0.0))
    return AdafactorSchedule(optimizer, initial_lr)


def _diffusers_schedule(key: str, optimizer: torch.optim.Optimizer, total: int, warmup: int, cycles: float,
                        power: float | None, kwargs: dict[str, Any]) -> Any:
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        kind = SchedulerType(key.lower())
    except ValueError as e:
        known = ", ".join(sorted({*SCHEDULER_NAMES, *(t.value for t in SchedulerType)}))
        raise ValueError(f"--lr_scheduler {key!r} is unknown; choose one of: {known} "
                         "(or --lr_scheduler_type with a class path)") from e
    fn = TYPE_TO_SCHEDULER_FUNCTION[kind]
    if kind == SchedulerType.CONSTANT:
        if warmup:
            raise ValueError("--lr_scheduler constant has no warmup: use constant_with_warmup or --lr_warmup_steps 0")
        return fn(optimizer, **kwargs)
    if kind == SchedulerType.PIECEWISE_CONSTANT:
        return fn(optimizer, **kwargs)
    if kind == SchedulerType.CONSTANT_WITH_WARMUP:
        return fn(optimizer, num_warmup_steps=warmup, **kwargs)
    if kind == SchedulerType.COSINE_WITH_RESTARTS:
        return fn(optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles, **kwargs)
    if kind == SchedulerType.POLYNOMIAL:
        return fn(optimizer, num_warmup_steps=warmup, num_training_steps=total,
                  power=1.0 if power is None else power, **kwargs)
    return fn(optimizer, num_warmup_steps=warmup, num_training_steps=total, **kwargs)
