"""Capture: forward hooks that record a *flavor* per unit during one UNet forward pass.

Per unit: the input tensor, the output tensor, unit-specific side inputs (``add_embeds`` for BASE, the
Transformer2DModel ``residual`` for a fine ``….out`` unit), the top-k most active output channels in order
(mean |activation| per channel), per-head attention summaries for units with attention (entropy of each
head's attention distribution and the mean attention mass on each contiguous bucket of key tokens), and the
wall time from the unit's input to its output. Shared side inputs (``temb`` and ``context`` = the
encoder_hidden_states, plus attention masks when given) are recorded once per pass.

Attention statistics come from a wrapping processor: it recomputes q·kᵀ from the attention module's own
projections (no grad, in query chunks) and then calls the original processor unchanged, so the UNet output is
bitwise the same with capture on.

Teachers run under ``torch.no_grad`` and tensors are detached copies; a student captured with
``keep_graph=True`` keeps the autograd graph (for the trajectory loss).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sd_scripts_surge.surge.units import HookPoint, UnitMap

QUERY_CHUNK = 1024  # bounds the memory of recomputed attention probabilities


@dataclass(frozen=True)
class CaptureOptions:
    keep_graph: bool = False  # student: keep autograd graph on recorded tensors
    record_inputs: bool = True
    pool_to: int | None = None  # flavor_resolution: adaptive-average-pool spatial dims to this size
    topk: int = 8
    head_stats: bool = True
    token_buckets: int = 4
    time_units: bool = True


@dataclass
class UnitFlavor:
    output: torch.Tensor
    input: torch.Tensor | None = None
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    topk: torch.Tensor | None = None  # (B, k) channel indices, most active first
    time_s: float = float("nan")
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # attn module -> entropy/buckets
    in_shape: tuple[int, ...] | None = None  # exact shapes before any pooling
    out_shape: tuple[int, ...] | None = None

    @property
    def changes_shape(self) -> bool:
        """True when the unit's input and output differ in shape (down/up-sampling, channels, skip concat)."""
        return self.in_shape is None or self.in_shape != self.out_shape

    def trajectory_pair(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(h_in, h_out) for the trajectory loss: h_in is None where the unit changes shape, judged on the exact
        shapes (pooling to flavor_resolution can make a downsampler's input and output look alike)."""
        return (None if self.changes_shape else self.input), self.output


@dataclass
class Flavor:
    """Everything one forward pass recorded (one probe batch)."""

    units: dict[str, UnitFlavor]
    shared: dict[str, torch.Tensor]  # temb, context, attention_mask, encoder_attention_mask
    model_output: torch.Tensor | None = None
    pool_to: int | None = None  # tensors were pooled to this flavor_resolution (None: full size)


# -------------------------------------------------------------------------------------------- pure helpers


def pool_tensor(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Adaptive average pool of the spatial part: (B,C,H,W) → (B,C,s,s); (B,N,C) tokens → (B,s·s,C)."""
    if size is None:
        return x
    if x.ndim == 4 and (x.shape[2] > size or x.shape[3] > size):
        return F.adaptive_avg_pool2d(x, (min(size, x.shape[2]), min(size, x.shape[3])))
    if x.ndim == 3 and x.shape[1] > size * size:
        return F.adaptive_avg_pool1d(x.transpose(1, 2), size * size).transpose(1, 2)
    return x


def channel_activity(x: torch.Tensor) -> torch.Tensor:
    """Mean |activation| per channel and sample: (B,C,H,W) and (B,C) → (B,C); (B,N,C) tokens → (B,C)."""
    a = x.detach().abs().float()
    if a.ndim == 4:
        return a.mean(dim=(2, 3))
    if a.ndim == 3:
        return a.mean(dim=1)
    return a.reshape(a.shape[0], -1)


def top_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k most active channels per sample, most active first: (B, k) int64."""
    activity = channel_activity(x)
    return torch.topk(activity, min(k, activity.shape[1]), dim=1, sorted=True).indices


def attention_head_summary(probs: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From probabilities (B, H, Q, K): per-head entropy (B,H) averaged over queries, and the mean attention
    mass on each of `buckets` contiguous key ranges (B,H,buckets)."""
    p = probs.float()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean(-1)
    edges = torch.linspace(0, p.shape[-1], buckets + 1).round().long().tolist()
    mass = torch.stack([p[..., a:b].sum(-1).mean(-1) for a, b in zip(edges, edges[1:])], dim=-1)
    return entropy, mass


# -------------------------------------------------------------------------------- attention statistics


class HeadStatsProcessor:
    """Wraps an attention processor: records per-head statistics, then returns the wrapped processor's result."""

    def __init__(self, inner, record: Callable[[torch.Tensor, torch.Tensor], None], buckets: int) -> None:
        self.inner = inner
        self.record = record
        self.buckets = buckets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        with torch.no_grad():
            self.record(*self._summaries(attn, hidden_states, encoder_hidden_states, attention_mask))
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, temb=temb, **kwargs)

    def _summaries(self, attn, x, context, mask) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if context is None:
            context = x
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        b = x.shape[0]
        q = attn.to_q(x)
        k = attn.to_k(context)
        head_dim = k.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        k = k.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, k.shape[2], b).view(b, attn.heads, -1, k.shape[2])
        entropies, masses, counts = [], [], []
        for start in range(0, q.shape[2], QUERY_CHUNK):
            scores = (q[:, :, start:start + QUERY_CHUNK].float() @ k.float().transpose(-1, -2)) * attn.scale
            if mask is not None:  # (B, heads, 1 or Q, K) additive bias
                scores = scores + (mask if mask.shape[2] == 1 else mask[:, :, start:start + QUERY_CHUNK]).float()
            e, m = attention_head_summary(scores.softmax(-1), self.buckets)
            entropies.append(e)
            masses.append(m)
            counts.append(scores.shape[2])
        w = torch.tensor(counts, dtype=torch.float32, device=q.device) / sum(counts)
        entropy = sum(wi * e for wi, e in zip(w, entropies))
        mass = sum(wi * m for wi, m in zip(w, masses))
        return entropy, mass


# ------------------------------------------------------------------------------------------------ capture


def _tensor_at(point: HookPoint, args: tuple, kwargs: dict) -> torch.Tensor | None:
    if len(args) > point.arg:
        return args[point.arg]
    if point.kw is not None:
        return kwargs.get(point.kw)
    if point.arg == 0:
        for name in ("hidden_states", "input_tensor", "sample", "input", "x"):
            if name in kwargs:
                return kwargs[name]
    return None


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return output[0]
    return output.sample


class UnitCapture:
    """Context manager: hooks every unit of `unit_map` on `unet`; `take()` returns the last pass's `Flavor`.

    >>> with UnitCapture(unet, unit_map) as cap:
    ...     unet(**batch)
    ...     flavor = cap.take()
    """

    def __init__(self, unet: nn.Module, unit_map: UnitMap, options: CaptureOptions | None = None) -> None:
        self.unet = unet
        self.unit_map = unit_map
        self.options = options or CaptureOptions()
        self._handles: list = []
        self._processors: dict[str, object] = {}
        self._reset()

    # ----- public
    def __enter__(self) -> UnitCapture:
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, proc in self._processors.items():
            self.unet.get_submodule(name).set_processor(proc)
        self._processors.clear()

    def take(self) -> Flavor:
        """Return what the last forward pass recorded and clear the buffers."""
        missing = [u.name for u in self.unit_map.units if u.name not in self._outputs]
        if missing:
            raise RuntimeError(f"capture saw no output for units {missing}; was the UNet run inside the capture?")
        units = {}
        for spec in self.unit_map.units:
            units[spec.name] = UnitFlavor(
                output=self._outputs[spec.name],
                input=self._inputs.get(spec.name),
                side=dict(self._sides[spec.name]),
                topk=self._topk[spec.name],
                time_s=self._times.get(spec.name, float("nan")),
                heads={a: self._heads[a] for a in spec.attention if a in self._heads},
                in_shape=self._shapes.get((spec.name, "in")),
                out_shape=self._shapes.get((spec.name, "out")),
            )
        flavor = Flavor(units, dict(self._shared), self._model_output, self.options.pool_to)
        self._reset()
        return flavor

    # ----- internals
    def _reset(self) -> None:
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._topk: dict[str, torch.Tensor] = {}
        self._shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self._sides: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._shared: dict[str, torch.Tensor] = {}
        self._starts: dict[str, float] = {}
        self._times: dict[str, float] = {}
        self._heads: dict[str, dict[str, torch.Tensor]] = {}
        self._model_output: torch.Tensor | None = None

    def _keep(self, x: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """What is stored: pooled at once (bounds peak memory), a detached copy unless the graph is kept (a copy
        also protects against later in-place changes)."""
        x = pool_tensor(x, self.options.pool_to) if pool else x
        if self.options.keep_graph:
            return x
        # fp32 copies: a teacher stored in bf16/fp16/fp8 (surge/precision.py) is compared with an fp32 student
        return x.detach().to(torch.float32, copy=True) if x.is_floating_point() else x.detach().clone()

    def _now(self, x: torch.Tensor | None) -> float:
        if x is not None and x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def _install(self) -> None:
        if self._handles:
            raise RuntimeError("this UnitCapture is already installed")
        pre: dict[str, list] = defaultdict(list)
        post: dict[str, list] = defaultdict(list)
        for spec in self.unit_map.units:
            pre_or_post = pre if spec.input_at.when == "input" else post
            pre_or_post[spec.input_at.module].append(("in", spec.name, spec.input_at, None))
            pre_or_post = pre if spec.output_at.when == "input" else post
            pre_or_post[spec.output_at.module].append(("out", spec.name, spec.output_at, None))
            for side_name, point in spec.side_points:
                (pre if point.when == "input" else post)[point.module].append(("side", spec.name, point, side_name))
        # shared side inputs: temb as the first ResBlock receives it; masks as the first attention block does
        pre["down_blocks.0.resnets.0"].append(("shared", "temb", HookPoint("", "input", 1, "temb"), None))

        for module_name, actions in pre.items():
            module = self.unet.get_submodule(module_name)
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(actions), with_kwargs=True))
        for module_name, actions in post.items():
            module = self.unet.get_submodule(module_name)
            self._handles.append(module.register_forward_hook(self._post_hook(actions)))
        self._handles.append(self.unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._unet_post_hook))
        for spec in self.unit_map.units:
            if spec.attention:
                first_t2d = next((m for m in spec.modules if ".attentions." in m or m == "mid_block"), None)
                if first_t2d is not None:
                    self._handles.append(self.unet.get_submodule(first_t2d).register_forward_pre_hook(
                        self._attention_inputs_hook, with_kwargs=True))
                    break
        if self.options.head_stats:
            for spec in self.unit_map.units:
                for attn_name in spec.attention:
                    attn = self.unet.get_submodule(attn_name)
                    self._processors[attn_name] = attn.processor
                    attn.set_processor(HeadStatsProcessor(attn.processor, self._head_recorder(attn_name),
                                                          self.options.token_buckets))

    def _act(self, actions: list, value_of) -> None:
        for action, name, point, side_name in actions:
            x = value_of(point)
            if action in ("in", "out"):
                self._shapes[(name, action)] = tuple(x.shape)
            if action == "in":
                if self.options.record_inputs:
                    self._inputs[name] = self._keep(x)
                if self.options.time_units:
                    self._starts[name] = self._now(x)
            elif action == "out":
                if self.options.time_units and name in self._starts:
                    self._times[name] = self._now(x) - self._starts[name]
                self._topk[name] = top_channels(x, self.options.topk)
                self._outputs[name] = self._keep(x)
            elif action == "side":
                self._sides[name][side_name] = self._keep(x)
            elif action == "shared" and x is not None:
                self._shared[name] = self._keep(x, pool=False)

    def _pre_hook(self, actions: list):
        def hook(module, args, kwargs):
            self._act(actions, lambda point: _tensor_at(point, args, kwargs))

        return hook

    def _post_hook(self, actions: list):
        def hook(module, args, output):
            self._act(actions, lambda point: _first_tensor(output))

        return hook

    def _unet_pre_hook(self, module, args, kwargs):
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if context is not None:
            self._shared["context"] = self._keep(context, pool=False)

    def _unet_post_hook(self, module, args, output):
        out = _first_tensor(output)
        self._model_output = out if self.options.keep_graph else out.detach().clone()

    def _attention_inputs_hook(self, module, args, kwargs):
        # what the attention blocks receive (after any encoder_hid_proj), not what the UNet was called with
        for key, name in (("encoder_hidden_states", "context"), ("attention_mask", "attention_mask"),
                          ("encoder_attention_mask", "encoder_attention_mask")):
            if kwargs.get(key) is not None:
                self._shared[name] = self._keep(kwargs[key], pool=False)

    def _head_recorder(self, attn_name: str):
        def record(entropy: torch.Tensor, mass: torch.Tensor) -> None:
            self._heads[attn_name] = {"entropy": entropy.detach().clone(), "buckets": mass.detach().clone()}

        return record


def capture_flavor(unet: nn.Module, unit_map: UnitMap, unet_kwargs: dict,
                   options: CaptureOptions | None = None) -> tuple[torch.Tensor, Flavor]:
    """Run `unet(**unet_kwargs)` once with capture on; return (model output, flavor)."""
    with UnitCapture(unet, unit_map, options) as cap:
        out = _first_tensor(unet(**unet_kwargs))
        return out, cap.take()
