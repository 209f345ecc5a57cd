"""Unit replay (DESIGN §3 E): train one student unit alone on cached teacher inputs → outputs, then keep the
change only if the next units' error against the teacher did not grow; otherwise restore the exact weights.

The downstream test ("window"): starting from the unit's input, run the unit and the next
`post_change_layers` units of the student *in chain*, each feeding the next (an up-side unit gets the
teacher's cached skip tensor concatenated, as in the UNet), and average the relative difference of each
window unit's output against the teacher's cached output (with `post_change_layers = 0`, the unit's own
output). With `pre_change_layers = k`, the unit's input is not the teacher's cached input but what the
student's k upstream units make of the teacher's input k units up: the unit trains and is tested on its real
inputs. Shared side inputs (temb, context, masks) come from the teacher's flavors.

`lerp_unit` moves the unit's weights toward a same-architecture teacher, θ ← θ + α(θ_T − θ), under the same test.
Rollback copies the snapshot back, so a rejected change leaves every weight bitwise as it was.

`replay_all_units` (DESIGN §3 H, teacher-forced local distillation): every chosen unit gets the teacher's own
cached input and learns the teacher's cached output, all at once. The inputs are cached tensors, so each unit's
gradient is local to it and one optimizer step over the sum of the per-unit losses costs about one network
forward + backward on the probe batch, however many units train. Each unit's loss is its MSE divided by the
teacher output's mean square (the relative difference), so large and small units weigh alike. Then every unit's
window error (the test above, with all changes in place) is compared with its error before: units whose window
got worse are rolled back to their exact weights, the others kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd_scripts_surge.surge.anchors import relative_difference
from sd_scripts_surge.surge.capture import Flavor
from sd_scripts_surge.surge.units import UnitMap, UnitSpec


@dataclass
class ReplayResult:
    unit: str
    mode: str  # "train" | "lerp"
    accepted: bool
    before: float  # window error vs teacher before the change
    after: float  # … after it
    steps: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- running a unit alone


def run_unit(unet: nn.Module, spec: UnitSpec, x: torch.Tensor, shared: dict[str, torch.Tensor],
             side: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Re-run one unit on input `x` with the side inputs a forward pass recorded (see capture.py)."""
    side = side or {}
    temb = shared.get("temb")
    attn_kwargs = {"encoder_hidden_states": shared.get("context"), "attention_mask": shared.get("attention_mask"),
                   "encoder_attention_mask": shared.get("encoder_attention_mask")}
    kind = spec.kind
    if kind == "embed":
        h = unet.time_embedding(x)
        if "add_embedding" in spec.modules:
            h = h + unet.add_embedding(side["add_embeds"])
        if getattr(unet, "time_embed_act", None) is not None:
            h = unet.time_embed_act(h)
        return h
    if kind == "mid":
        return unet.mid_block(x, temb, **attn_kwargs)
    if kind == "attn_in":
        return unet.get_submodule(spec.input_at.module)._operate_on_continuous_inputs(x)[0]
    if kind == "attn_out":
        residual = side["residual"]
        b, _, height, width = residual.shape
        t2d = unet.get_submodule(spec.output_at.module)
        return t2d._get_output_for_continuous_inputs(hidden_states=x, residual=residual, batch_size=b,
                                                     height=height, width=width, inner_dim=x.shape[-1])
    h = x
    for path in spec.modules:
        module = unet.get_submodule(path)
        if ".resnets." in path:
            h = module(h, temb)
        elif ".transformer_blocks." in path:
            h = module(h, **attn_kwargs)
        elif ".attentions." in path:
            h = module(h, **attn_kwargs, return_dict=False)[0]
        else:  # conv_in, down/upsamplers, conv_norm_out / conv_act / conv_out
            h = module(h)
    return h


def _chain_input(spec: UnitSpec, previous: torch.Tensor, teacher: Flavor) -> torch.Tensor:
    """The input a unit gets from its predecessor's output: + the (teacher's) skip tensor on the up side."""
    if spec.skip_from is None:
        return previous
    cached = teacher.units[spec.name].input
    return torch.cat([previous, cached[:, previous.shape[1]:].to(previous)], dim=1)


def _side(spec: UnitSpec, teacher: Flavor, chain_residual: dict[str, torch.Tensor], like: torch.Tensor) -> dict:
    side = {k: v.to(like.device, like.dtype) if v.is_floating_point() else v.to(like.device)
            for k, v in teacher.units[spec.name].side.items()}
    if spec.kind == "attn_out" and spec.output_at.module in chain_residual:
        side["residual"] = chain_residual[spec.output_at.module]
    return side


def _shared(teacher: Flavor, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in teacher.shared.items()}


def _run_chain(unet: nn.Module, units: Sequence[UnitSpec], x: torch.Tensor, teacher: Flavor,
               shared: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run `units` in order starting from input `x` of the first; return each unit's output."""
    outputs: list[torch.Tensor] = []
    residual: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(units):
        if i > 0:
            x = _chain_input(spec, outputs[-1], teacher)
        if spec.kind == "attn_in":
            residual[spec.input_at.module] = x
        outputs.append(run_unit(unet, spec, x, shared, _side(spec, teacher, residual, x)))
    return outputs


# ------------------------------------------------------------------------------------------ the window test


@dataclass(frozen=True)
class _Window:
    pre: list[UnitSpec]  # upstream units re-run with the student
    unit: UnitSpec
    post: list[UnitSpec]


def _window(unit_map: UnitMap, unit: str, pre_change_layers: int, post_change_layers: int) -> _Window:
    spec = unit_map[unit]
    if spec.kind == "embed":
        raise ValueError(f"unit {unit} (time/label embedding) cannot be replayed: its output is a side input "
                         "of every ResBlock, not a link in the chain; pick another unit")
    i = unit_map.index(unit)
    first = next(k for k, u in enumerate(unit_map.units) if u.kind != "embed")
    pre = list(unit_map.units[max(first, i - pre_change_layers):i])
    post = list(unit_map.units[i + 1:i + 1 + post_change_layers])
    return _Window(pre, spec, post)


def window_units(unit_map: UnitMap, unit: str, pre_change_layers: int = 0, post_change_layers: int = 1) -> list[str]:
    """The units whose flavors replaying or LERPing `unit` reads: its window (upstream, itself, downstream)."""
    w = _window(unit_map, unit, pre_change_layers, post_change_layers)
    return [s.name for s in (*w.pre, w.unit, *w.post)]


def _unit_input(unet: nn.Module, window: _Window, teacher: Flavor, device, dtype) -> torch.Tensor:
    """The unit's training/test input: the teacher's cached input, or the student's pre-window output."""
    def cached(spec: UnitSpec) -> torch.Tensor:
        x = teacher.units[spec.name].input
        if x is None:
            raise ValueError(f"flavors hold no input for unit {spec.name}; capture with record_inputs=True")
        return x.to(device, dtype)

    if not window.pre:
        return cached(window.unit)
    with torch.no_grad():
        outs = _run_chain(unet, window.pre, cached(window.pre[0]), teacher, _shared(teacher, device, dtype))
    return _chain_input(window.unit, outs[-1], teacher)


def _check_full_size(flavors: Sequence[Flavor]) -> None:
    if any(fl.pool_to is not None for fl in flavors):
        raise ValueError("replay needs flavors captured at full size, these were pooled to flavor_resolution="
                         f"{flavors[0].pool_to}; capture the replay flavors without pooling")


def _check_shapes(spec: UnitSpec, y: torch.Tensor, teacher: Flavor, rows: slice = slice(None)) -> None:
    """`y` has the shape of the teacher's cached output of `spec` (of its samples `rows`)."""
    expected = teacher.units[spec.name].output[rows].shape
    if y.shape != expected:
        raise ValueError(f"unit {spec.name}: re-run output {tuple(y.shape)} != cached {tuple(expected)}; replay needs "
                         "flavors captured at full size (flavor_resolution unset)")


@torch.no_grad()
def window_error(unet: nn.Module, unit_map: UnitMap, unit: str, flavors: Sequence[Flavor],
                 pre_change_layers: int = 0, post_change_layers: int = 1) -> float:
    """Mean relative difference vs the teacher over the window units (see module docstring)."""
    window = _window(unit_map, unit, pre_change_layers, post_change_layers)
    _check_full_size(flavors)
    device, dtype = _device_dtype(unet)
    total, count = 0.0, 0
    for fl in flavors:
        x = _unit_input(unet, window, fl, device, dtype)
        units = [window.unit, *window.post]
        outs = _run_chain(unet, units, x, fl, _shared(fl, device, dtype))
        judged = list(zip(units, outs))[1:] if window.post else list(zip(units, outs))
        for spec, y in judged:
            _check_shapes(spec, y, fl)
            total += float(relative_difference(fl.units[spec.name].output, y).mean())
            count += 1
    return total / max(1, count)


# ------------------------------------------------------------------------------------------------- replay


def unit_parameters(unet: nn.Module, spec: UnitSpec) -> list[tuple[str, nn.Parameter]]:
    return [(f"{m}.{n}", p) for m in spec.modules for n, p in unet.get_submodule(m).named_parameters()]


def _device_dtype(unet: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(unet.parameters())
    return p.device, p.dtype


def _snapshot(params: Sequence[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params}


@torch.no_grad()
def _restore(params: Sequence[tuple[str, nn.Parameter]], snapshot: dict[str, torch.Tensor]) -> None:
    for n, p in params:
        p.copy_(snapshot[n])


def _keep_if_better(unet, unit_map, unit, flavors, params, snapshot, before, pre, post, mode, steps) -> ReplayResult:
    after = window_error(unet, unit_map, unit, flavors, pre, post)
    accepted = after <= before
    if not accepted:
        _restore(params, snapshot)
    return ReplayResult(unit, mode, accepted, before, after, steps)


@contextlib.contextmanager
def _trainable(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """`tensors` require grad inside; their `requires_grad` and `.grad` are as they were afterwards."""
    saved = [(q.requires_grad, q.grad) for q in tensors]
    try:
        for q in tensors:
            q.requires_grad_(True)
        yield
    finally:
        for q, (requires_grad, grad) in zip(tensors, saved):
            q.requires_grad_(requires_grad)
            q.grad = grad


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """One replay step: gradients of `loss` for `tensors` only (the rest of the model keeps its .grad)."""
    for q, g in zip(tensors, torch.autograd.grad(loss, tensors, allow_unused=True)):
        q.grad = g
    optimizer.step()


def replay_unit(unet: nn.Module, unit_map: UnitMap, unit: str, flavors: Sequence[Flavor], *, replay_steps: int = 100,
                lr: float = 1e-4, pre_change_layers: int = 0, post_change_layers: int = 1,
                params: Sequence[tuple[str, nn.Parameter]] | None = None) -> ReplayResult:
    """Train `unit` alone (AdamW on its parameters, MSE to the teacher's cached outputs), then test/keep/rollback.

    `params`: what to train (default: the unit's own weights; pass a LoRA network's parameters of this unit
    when training a LoRA). The parameters' `.grad` and `requires_grad` are left as they were.
    """
    if not flavors:
        raise ValueError("replay needs at least one cached flavor batch")
    window = _window(unit_map, unit, pre_change_layers, post_change_layers)
    params = list(params) if params is not None else unit_parameters(unet, window.unit)
    device, dtype = _device_dtype(unet)
    before = window_error(unet, unit_map, unit, flavors, pre_change_layers, post_change_layers)
    snapshot = _snapshot(params)
    inputs = [_unit_input(unet, window, fl, device, dtype) for fl in flavors]
    tensors = [p for _, p in params]
    optimizer = torch.optim.AdamW(tensors, lr=lr, weight_decay=0.0)
    with _trainable(tensors):
        for step in range(replay_steps):
            fl, x = flavors[step % len(flavors)], inputs[step % len(flavors)]
            shared = _shared(fl, device, dtype)
            y = run_unit(unet, window.unit, x, shared, _side(window.unit, fl, {}, x))
            _check_shapes(window.unit, y, fl)
            _step(optimizer, F.mse_loss(y.float(), fl.units[unit].output.to(device).float()), tensors)
    return _keep_if_better(unet, unit_map, unit, flavors, params, snapshot, before, pre_change_layers,
                           post_change_layers, "train", replay_steps)


@torch.no_grad()
def lerp_unit(unet: nn.Module, teacher: nn.Module, unit_map: UnitMap, unit: str, flavors: Sequence[Flavor],
              alpha: float, pre_change_layers: int = 0, post_change_layers: int = 1) -> ReplayResult:
    """θ_unit ← θ_unit + α(θ_teacher − θ_unit) for a same-architecture teacher, kept only if the window improves."""
    window = _window(unit_map, unit, pre_change_layers, post_change_layers)
    params = unit_parameters(unet, window.unit)
    teacher_params = dict(unit_parameters(teacher, window.unit))
    for name, p in params:
        if name not in teacher_params or teacher_params[name].shape != p.shape:
            raise ValueError(f"teacher has no parameter {name} of shape {tuple(p.shape)}; LERP needs the same "
                             "architecture")
    before = window_error(unet, unit_map, unit, flavors, pre_change_layers, post_change_layers)
    snapshot = _snapshot(params)
    for name, p in params:
        p.lerp_(teacher_params[name].to(p), alpha)
    return _keep_if_better(unet, unit_map, unit, flavors, params, snapshot, before, pre_change_layers,
                           post_change_layers, "lerp", 0)


def _replay_rows(size: int, batch: int, turn: int) -> slice:
    """The samples of a cached batch of `size` that replay step uses on its `turn`-th visit to the batch."""
    if batch <= 0 or batch >= size:
        return slice(None)
    parts = -(-size // batch)
    start = (turn % parts) * batch
    return slice(start, min(start + batch, size))


def _take(value: torch.Tensor, rows: slice) -> torch.Tensor:
    """`value` restricted to `rows` of the batch; tensors without a batch dimension (scalars) as they are."""
    return value if rows == slice(None) or value.dim() == 0 else value[rows]


def replay_all_units(unet: nn.Module, unit_map: UnitMap, units: Sequence[str], flavors: Sequence[Flavor], *,
                     replay_steps: int = 20, lr: float = 1e-4, post_change_layers: int = 1,
                     params_of: Callable[[str], Sequence[tuple[str, nn.Parameter]] | None] | None = None,
                     batch: int = 0) -> list[ReplayResult]:
    """Train `units` together on cached teacher inputs → outputs (see module docstring), then keep or roll back
    each unit by its own downstream test. `params_of(unit)` gives what to train for a unit (default: its own
    weights; a LoRA network's parameters of the unit when training a LoRA; an empty list skips the unit).
    `batch` > 0: each step trains on that many samples of a cached batch, the next slice of it every time the
    batches come round again (step s uses batch s mod K, slice ⌊s / K⌋ mod ⌈B / batch⌉); 0: the whole batch."""
    if not flavors:
        raise ValueError("replay needs at least one cached flavor batch")
    _check_full_size(flavors)
    specs = [unit_map[u] for u in units if unit_map[u].kind != "embed"]
    device, dtype = _device_dtype(unet)
    owned: dict[str, list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for spec in specs:
        params = params_of(spec.name) if params_of is not None else None
        params = list(params) if params is not None else unit_parameters(unet, spec)
        mine = [(n, q) for n, q in params if id(q) not in seen]  # a parameter belongs to its first unit
        seen.update(id(q) for _, q in mine)
        if mine:
            owned[spec.name] = mine
    specs = [s for s in specs if s.name in owned]
    if not specs or replay_steps <= 0:
        return []
    before = {s.name: window_error(unet, unit_map, s.name, flavors, 0, post_change_layers) for s in specs}
    snapshots = {s.name: _snapshot(owned[s.name]) for s in specs}
    tensors = [q for s in specs for _, q in owned[s.name]]
    targets = [{s.name: fl.units[s.name].output.to(device).float() for s in specs} for fl in flavors]
    norms = [{u: float(y.pow(2).mean()) + 1e-12 for u, y in tgt.items()} for tgt in targets]
    inputs = [{s.name: fl.units[s.name].input.to(device, dtype) for s in specs} for fl in flavors]
    optimizer = torch.optim.AdamW(tensors, lr=lr, weight_decay=0.0)
    with _trainable(tensors):
        for step in range(replay_steps):
            k = step % len(flavors)
            fl, shared = flavors[k], _shared(flavors[k], device, dtype)
            rows = _replay_rows(inputs[k][specs[0].name].shape[0], batch, step // len(flavors))
            shared = {name: _take(v, rows) for name, v in shared.items()}
            loss = torch.zeros((), device=device)
            for spec in specs:
                x = inputs[k][spec.name]
                side = {name: _take(v, rows) for name, v in _side(spec, fl, {}, x).items()}
                y = run_unit(unet, spec, x[rows], shared, side)
                _check_shapes(spec, y, fl, rows)
                loss = loss + F.mse_loss(y.float(), targets[k][spec.name][rows]) / norms[k][spec.name]
            _step(optimizer, loss, tensors)
    results = {s.name: ReplayResult(s.name, "train_all", True, before[s.name], before[s.name], replay_steps)
               for s in specs}
    # Test with every change in place; a rollback changes the windows that contain the rolled-back unit (those of
    # the `post_change_layers` units before it), so test those again until no kept unit's window is worse than
    # before (at most one round per unit). Other windows hold the same weights and need no second test.
    pending = list(results)
    while pending:
        rolled_back: list[int] = []
        for unit in pending:
            result = results[unit]
            result.after = window_error(unet, unit_map, unit, flavors, 0, post_change_layers)
            if result.after > result.before:
                _restore(owned[unit], snapshots[unit])
                result.accepted = False
                rolled_back.append(unit_map.index(unit))
        pending = [u for u, r in results.items() if r.accepted
                   and any(0 < j - unit_map.index(u) <= post_change_layers for j in rolled_back)]
    return list(results.values())
