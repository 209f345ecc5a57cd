"""AdaSurge: Adafactor with per-parameter-group learning-rate scales ("surge scales"), DESIGN §4.

Self-contained (torch + standard library only) so the file can be copied into an sd-scripts checkout's
``library/`` folder and used from an unmodified ``sdxl_train.py``::

    --optimizer_type library.surge_optimizer.AdaSurge --learning_rate 4e-7
    --optimizer_args "shock_rate=5" "state_dtype='fp64'" "weight_decay=0.01"

sd-scripts splits every ``--optimizer_args`` item at "=" and passes the right side through
``ast.literal_eval`` with no fallback, so string values need quotes there (``state_dtype='fp64'``);
``state_dtype=64`` works unquoted. Every option below has a literal type (bool, int, float, str, tuple, None).

Adafactor core (Shazeer & Stern 2018, as in ``transformers.optimization.Adafactor``), per tensor with gradient g:

* step t += 1; β2_t = 1 − t^decay_rate; v = g² + eps[0]
* ≥2-D tensors (factored): R ← β2_t·R + (1−β2_t)·mean_last(v), C ← β2_t·C + (1−β2_t)·mean_second_last(v),
  u = g · rsqrt(R / mean(R)) ⊗ rsqrt(C); 1-D tensors: V ← β2_t·V + (1−β2_t)·v, u = g · rsqrt(V)
* u ← u / max(1, RMS(u)/clip_threshold)
* step size α = ρ · (max(eps[1], RMS(w)) if scale_parameter else 1), where ρ = group lr, or with
  relative_step ρ = min(1e-6·t if warmup_init else 1e-2, 1/√t) (then the lr argument is ignored)
* with surge scale s (below): u ← α·s·u; with beta1: m ← β1·m + (1−β1)·u, u = m
* w ← w − weight_decay·α·s·w; w ← w − u

With every surge scale at 1.0 this is the reference Adafactor step for step (tests pin it).

Surge scales. Every param group carries ``group["surge_scale"]``, the *target* scale (default 1.0; the surge
controller or the user sets it at any time). The scale in force, ``group["surge_effective"]`` (starts at 1.0),
moves toward the target once per ``step()``, before the update, by the rule (`advance_surge_scale`)::

    a = 1 − (1 − smooth_rate) ** (1 / shock_rate)        # per-step rate
    effective ← effective + a · (target − effective)      # Python floats, i.e. IEEE fp64

so `shock_rate` steps at a fixed target compose to exactly one lerp of rate `smooth_rate`
(gap × (1 − smooth_rate)); the scale never overshoots and reaches a constant target geometrically.
A target equal to the effective scale leaves it bit-for-bit unchanged; smooth_rate = 1 jumps to the target.

Standalone mode (no controller, e.g. plain sdxl_train.py; `standalone=None` = automatic: on unless a group
has a "unit" key, the surge controller's grouping key). Each step measures every group's update-to-weight
ratio r_g = RMS(α·u over the group, before momentum and surge) / max(eps[1], RMS(w over the group)); the
next step's targets are (`standalone_targets`) target_g = clamp(r̄ / r_g, 1/shock_rate, shock_rate) with r̄ the
geometric mean of the positive ratios: groups that move relatively slowly are pushed, fast ones held back.
The target is written to ``group["surge_scale"]`` and the effective scale follows the rule above.

Numerics: optimizer state in `state_dtype` (fp32 or fp64; fp64 parameters always get fp64) and all math in
that dtype; bf16/fp16 parameters
are updated through an fp32/fp64 copy and written back with stochastic rounding when `stochastic_rounding`
(default; uses torch's global RNG), round-to-nearest otherwise. A gradient containing NaN/Inf
skips that tensor for this step (weights and state untouched) and counts it in
``group["skipped_tensors"]`` (sum: `optimizer.skipped_steps`). All of this lives in param groups and state,
so ``state_dict()``/``load_state_dict()`` continue a run bit-identically (fp32/fp64 parameters).

8-bit first moment (`moment_8bit=True`, needs `beta1` and the optional package bitsandbytes): the first moment m
of every tensor with ≥ 4096 elements is stored as bitsandbytes' blockwise 8-bit code (its signed dynamic map,
blocks of 256, one fp32 absmax per block: 1.016 bytes per element instead of 4 or 8), as its 8-bit optimizers do.
Each step dequantizes m, updates it in the state dtype, uses that full-precision m for this step's update and
stores it quantized again; smaller tensors keep a full-precision m. Resuming from a state dict stays bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

DEFAULT_SMOOTH_RATE = 0.5641895835  # 1/√π
DEFAULT_SHOCK_RATE = 5
MIN_8BIT_SIZE = 4096  # tensors below this keep a full-precision first moment (as bitsandbytes' 8-bit optimizers)
QUANT_BLOCKSIZE = 256

_STATE_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64, "64": torch.float64,
}


def parse_state_dtype(value: Any) -> torch.dtype:
    """'fp32'/'float32'/32 → torch.float32, 'fp64'/'float64'/'double'/64 → torch.float64 (or a torch dtype)."""
    if value in (torch.float32, torch.float64):
        return value
    key = str(value).strip().strip("'\"").lower().replace("torch.", "")
    if key not in _STATE_DTYPES:
        raise ValueError(f"AdaSurge: state_dtype must be 'fp32' or 'fp64' (or 32/64), got {value!r}. "
                         "From sd-scripts write --optimizer_args \"state_dtype='fp64'\" or \"state_dtype=64\".")
    return _STATE_DTYPES[key]


# ------------------------------------------------------------------------------------------ pure rules


def surge_step_rate(smooth_rate: float, shock_rate: float) -> float:
    """Per-step lerp rate a with (1 − a)^shock_rate = 1 − smooth_rate (fp64)."""
    return 1.0 - (1.0 - float(smooth_rate)) ** (1.0 / float(shock_rate))


def advance_surge_scale(effective: float, target: float, smooth_rate: float, shock_rate: float) -> float:
    """One optimizer step of the effective scale toward its target: effective + a·(target − effective)."""
    effective, target = float(effective), float(target)
    if target == effective:
        return effective
    rate = surge_step_rate(smooth_rate, shock_rate)
    return target if rate >= 1.0 else effective + rate * (target - effective)


def standalone_targets(ratios: Sequence[float | None], shock_rate: float | Sequence[float]) -> list[float]:
    """Targets clamp(r̄/r_g, 1/k_g, k_g), r̄ = geometric mean of the positive finite ratios, k_g = shock rate.

    `shock_rate` is one value for all groups or one per group. A group with no measured ratio (None, 0,
    non-finite) gets 1.0.
    """
    shocks = [float(k) for k in shock_rate] if isinstance(shock_rate, Sequence) else [float(shock_rate)] * len(ratios)
    valid = [r for r in ratios if r is not None and math.isfinite(r) and r > 0]
    if not valid:
        return [1.0 for _ in ratios]
    # one group: r̄ = r exactly, so its target is exactly 1.0 (exp∘log would not round-trip)
    ref = valid[0] if len(valid) == 1 else math.exp(math.fsum(math.log(r) for r in valid) / len(valid))
    return [min(max(ref / r, 1.0 / k), k) if (r is not None and math.isfinite(r) and r > 0) else 1.0
            for r, k in zip(ratios, shocks)]


def copy_stochastic_bf16(target: torch.Tensor, source: torch.Tensor) -> None:
    """Write fp32 `source` into bf16 `target`, rounding up or down with probability by distance."""
    bits = source.to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = (bits + noise).bitwise_and_(-65536)
    target.copy_(rounded.view(torch.float32))


def copy_stochastic_fp16(target: torch.Tensor, source: torch.Tensor) -> None:
    """Write `source` into fp16 `target`, taking the upper neighbour with probability by distance."""
    src = source.to(torch.float32)
    nearest = src.to(torch.float16)
    toward = torch.where(nearest.float() > src, -torch.inf, torch.inf).to(torch.float16)
    other = torch.nextafter(nearest, toward)
    near32, other32 = nearest.float(), other.float()
    gap = other32 - near32
    p_other = torch.where(torch.isfinite(gap) & (gap != 0), (src - near32) / gap, torch.zeros_like(src))
    target.copy_(torch.where(torch.rand_like(src) < p_other, other, nearest))


def _quantizer() -> Any:
    """bitsandbytes.functional (blockwise 8-bit quantization), imported only when moment_8bit asks for it."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as e:
        raise ImportError("AdaSurge: moment_8bit=True needs bitsandbytes: `pip install bitsandbytes==0.50.2` "
                          "(or leave moment_8bit off)") from e
    return bnb_functional


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _nonfinite_flags(grads: list[torch.Tensor]) -> list[bool]:
    """True where a gradient holds NaN/Inf; one host sync for all tensors (max-abs norm propagates NaN)."""
    if not grads:
        return []
    try:
        norms = torch._foreach_norm(grads, float("inf"))
    except (AttributeError, RuntimeError):
        norms = [torch.linalg.vector_norm(g, float("inf")) for g in grads]
    by_device: dict[torch.device, list[int]] = {}
    for i, n in enumerate(norms):
        by_device.setdefault(n.device, []).append(i)
    flags = [False] * len(grads)
    for idx in by_device.values():
        bad = (~torch.isfinite(torch.stack([norms[i].float() for i in idx]))).tolist()
        for i, b in zip(idx, bad):
            flags[i] = bool(b)
    return flags


# ----------------------------------------------------------------------------------------- optimizer


class AdaSurge(torch.optim.Optimizer):
    """Adafactor + per-group surge scales (see module docstring for the exact rules).

    Args (all literal-typed, so sd-scripts' ``--optimizer_args k=v`` can set them):
        lr: step size ρ when relative_step is False (required then); ignored with relative_step.
        eps: (eps on squared gradients, floor of the parameter RMS), default (1e-30, 1e-3).
        clip_threshold: update clipping d (1.0). decay_rate: β2 exponent (−0.8). beta1: first moment or None.
        weight_decay: decoupled, multiplied by the step size. scale_parameter / relative_step / warmup_init:
            as in Adafactor; defaults False (kohya's recommended SDXL fine-tuning settings, lr is absolute).
        surge_scale: initial target scale of every group (1.0). smooth_rate (0.5641895835) and shock_rate (5):
            the lerp rule above; shock_rate also clamps standalone targets to [1/shock_rate, shock_rate].
        standalone: True / False / None (auto: on unless a group has a "unit" key).
        state_dtype: 'fp32' or 'fp64' (also 32/64). stochastic_rounding: for bf16/fp16 parameters.
        foreach: update the tensors of a group whose dtype is the state dtype together with torch's multi-tensor
            (_foreach) kernels — the same operations in the same order, far fewer kernel launches for the many
            small tensors of a LoRA or a small UNet (bitwise the per-tensor result on the CPU; CUDA's fused
            kernels may round differently). False: one by one.
        moment_8bit: keep the first moment (beta1) of every tensor with ≥ MIN_8BIT_SIZE elements in bitsandbytes'
            blockwise 8-bit code (about a quarter of the fp32 bytes); needs beta1 and bitsandbytes.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = False,
        relative_step: bool = False,
        warmup_init: bool = False,
        surge_scale: float = 1.0,
        smooth_rate: float = DEFAULT_SMOOTH_RATE,
        shock_rate: float = DEFAULT_SHOCK_RATE,
        standalone: bool | None = None,
        state_dtype: str | int = "fp32",
        stochastic_rounding: bool = True,
        foreach: bool = True,
        moment_8bit: bool = False,
    ) -> None:
        if warmup_init and not relative_step:
            raise ValueError("AdaSurge: warmup_init=True requires relative_step=True")
        if not relative_step and (lr is None or lr <= 0):
            raise ValueError(f"AdaSurge: lr must be a positive number when relative_step=False (got {lr!r}); "
                             "pass --learning_rate, or relative_step=True")
        if float(shock_rate) < 1:
            raise ValueError(f"AdaSurge: shock_rate must be ≥ 1 (got {shock_rate!r})")
        if not 0 < float(smooth_rate) <= 1:
            raise ValueError(f"AdaSurge: smooth_rate must be in (0, 1] (got {smooth_rate!r})")
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"AdaSurge: eps must be a pair like (1e-30, 1e-3) (got {eps!r})")
        if beta1 is not None and not 0 <= float(beta1) < 1:
            raise ValueError(f"AdaSurge: beta1 must be None or in [0, 1) (got {beta1!r})")
        if moment_8bit and beta1 is None:
            raise ValueError("AdaSurge: moment_8bit=True quantizes the first moment: give beta1 too (e.g. beta1=0.9)")
        self.moment_8bit = bool(moment_8bit)
        self._codes: dict[torch.device, torch.Tensor] = {}
        if self.moment_8bit:
            _quantizer()  # fail now, with the install hint, not at the first step
        self.state_dtype = parse_state_dtype(state_dtype)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.foreach = bool(foreach)
        defaults = {
            "lr": lr, "eps": tuple(float(e) for e in eps), "clip_threshold": float(clip_threshold),
            "decay_rate": float(decay_rate), "beta1": None if beta1 is None else float(beta1),
            "weight_decay": float(weight_decay), "scale_parameter": bool(scale_parameter),
            "relative_step": bool(relative_step), "warmup_init": bool(warmup_init),
            "surge_scale": float(surge_scale), "smooth_rate": float(smooth_rate), "shock_rate": float(shock_rate),
            "surge_effective": 1.0, "surge_ratio": None, "skipped_tensors": 0,
        }
        super().__init__(params, defaults)
        if standalone is None:
            standalone = not any("unit" in g for g in self.param_groups)
        self.standalone = bool(standalone)

    @property
    def skipped_steps(self) -> int:
        """Tensors whose update was skipped because their gradient held NaN/Inf (all groups, whole run)."""
        return sum(int(g.get("skipped_tensors", 0)) for g in self.param_groups)

    def effective_scales(self) -> list[float]:
        """The surge scale in force per param group (what the last step used)."""
        return [float(g["surge_effective"]) for g in self.param_groups]

    @staticmethod
    def _step_size(group: dict, step: int) -> float:
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            return min(min_step, 1.0 / math.sqrt(step))
        return float(group["lr"])

    def _dtype_for(self, p: torch.Tensor) -> torch.dtype:
        """Math and state dtype of `p`: `state_dtype`, but never below an fp64 parameter's own precision."""
        return torch.float64 if p.dtype == torch.float64 else self.state_dtype

    def _init_state(self, state: dict, grad_shape: torch.Size, device: torch.device, group: dict,
                    dt: torch.dtype) -> None:
        state["step"] = 0
        if group["beta1"] is not None and self.moment_8bit and math.prod(grad_shape) >= MIN_8BIT_SIZE:
            # code 0 with absmax 0 dequantizes to 0: the same zero start as the full-precision moment
            state["exp_avg_8bit"] = torch.zeros(grad_shape, dtype=torch.uint8, device=device)
            blocks = -(-math.prod(grad_shape) // QUANT_BLOCKSIZE)
            state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
        elif group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(grad_shape, dtype=dt, device=device)
        if len(grad_shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(grad_shape[:-1], dtype=dt, device=device)
            state["exp_avg_sq_col"] = torch.zeros(grad_shape[:-2] + grad_shape[-1:], dtype=dt, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros(grad_shape, dtype=dt, device=device)

    def _code(self, device: torch.device) -> torch.Tensor:
        if device not in self._codes:
            self._codes[device] = _quantizer().create_dynamic_map(signed=True).to(device)
        return self._codes[device]

    def _moment(self, state: dict, dt: torch.dtype) -> torch.Tensor:
        """The first moment in the math dtype: the stored tensor itself, or a dequantized copy of the 8-bit one."""
        if "exp_avg" in state:
            return state["exp_avg"]
        codes = state["exp_avg_8bit"]
        m = _quantizer().dequantize_blockwise(codes, absmax=state["exp_avg_absmax"], code=self._code(codes.device),
                                              blocksize=QUANT_BLOCKSIZE)
        return m.to(dt)

    def _store_moment(self, state: dict, m: torch.Tensor) -> None:
        """Write an updated first moment back: a no-op for a full-precision one (updated in place)."""
        if "exp_avg" in state:
            return
        codes = state["exp_avg_8bit"]
        _quantizer().quantize_blockwise(m if m.dtype == torch.float32 else m.float(), code=self._code(codes.device),
                                        absmax=state["exp_avg_absmax"], out=codes, blocksize=QUANT_BLOCKSIZE)

    def _update_tensor(self, p: torch.Tensor, group: dict, scale: float, measure: bool
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One Adafactor step of `p` with surge scale `scale`; with `measure`, (Σ(α·u)², Σw²) as fp64 tensors."""
        dt = self._dtype_for(p)
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("AdaSurge does not support sparse gradients")
        if grad.dtype != dt:
            grad = grad.to(dt)
        state = self.state[p]
        if len(state) == 0:
            self._init_state(state, grad.shape, grad.device, group, dt)
        state["step"] += 1
        step = state["step"]
        work = p if p.dtype == dt else p.to(dt)

        eps1, eps2 = group["eps"]
        rho = self._step_size(group, step)
        w_rms = _rms(work) if (group["scale_parameter"] or measure) else None
        alpha: torch.Tensor | float = rho * w_rms.clamp(min=eps2) if group["scale_parameter"] else rho

        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        upd = torch.square(grad).add_(eps1)
        if grad.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(upd.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(upd.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            torch.mul(r_factor, c_factor, out=upd)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(upd, alpha=1.0 - beta2t)
            torch.rsqrt(v, out=upd)
        upd.mul_(grad)
        u_rms = _rms(upd)
        clip = (u_rms / group["clip_threshold"]).clamp_(min=1.0)
        step_factor = alpha / clip  # α / max(1, RMS(u)/d), a 0-dim tensor
        applied = step_factor * scale if scale != 1.0 else step_factor

        if group["beta1"] is not None:
            m = self._moment(state, dt)
            upd.mul_(applied)
            m.mul_(group["beta1"]).add_(upd, alpha=1.0 - group["beta1"])
            self._store_moment(state, m)
            upd, applied = m, None
        if group["weight_decay"] != 0:
            decay = -group["weight_decay"] * alpha * scale
            if torch.is_tensor(decay):
                work.addcmul_(work, decay)
            else:
                work.add_(work, alpha=decay)
        if applied is None:
            work.sub_(upd)
        else:
            work.addcmul_(upd, -applied)

        if work is not p:
            if p.dtype == torch.bfloat16 and self.stochastic_rounding:
                copy_stochastic_bf16(p, work)
            elif p.dtype == torch.float16 and self.stochastic_rounding:
                copy_stochastic_fp16(p, work)
            else:
                p.copy_(work)
        if not measure:
            return None
        n = float(p.numel())
        u_sq = (u_rms * step_factor).double().square() * n
        w_sq = w_rms.double().square() * n
        return u_sq, w_sq

    def _update_foreach(self, params: list[torch.Tensor], group: dict, scale: float, measure: bool
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """`_update_tensor` for many tensors of one device and dtype (the state dtype) at once.

        The same operations in the same order, each as one multi-tensor (_foreach) call over the tensors that
        share a step count (normally all of them); only shape-dependent reductions (row/column means) stay per
        tensor. On the CPU the result is bitwise that of the per-tensor path. No host synchronisation."""
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(state, p.grad.shape, p.grad.device, group, p.dtype)
            state["step"] += 1
            by_step.setdefault(state["step"], []).append(p)
        u_all: list[torch.Tensor] = []
        w_all: list[torch.Tensor] = []
        for step, same in by_step.items():
            measured = self._foreach_same_step(same, group, scale, measure, step)
            if measured is not None:
                u_all += measured[0]
                w_all += measured[1]
        return (u_all, w_all) if measure else None

    def _foreach_same_step(self, params: list[torch.Tensor], group: dict, scale: float, measure: bool, step: int
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        eps1, eps2 = group["eps"]
        rho = self._step_size(group, step)
        roots = [p.numel() ** 0.5 for p in params]
        w_rms = torch._foreach_div(torch._foreach_norm(params), roots) \
            if (group["scale_parameter"] or measure) else None
        alpha = torch._foreach_mul(torch._foreach_clamp_min(w_rms, eps2), rho) if group["scale_parameter"] else None

        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        upd = torch._foreach_mul(grads, grads)  # square
        torch._foreach_add_(upd, eps1)
        factored = [i for i, g in enumerate(grads) if g.dim() >= 2]
        plain = [i for i, g in enumerate(grads) if g.dim() < 2]
        if factored:
            rows = [states[i]["exp_avg_sq_row"] for i in factored]
            cols = [states[i]["exp_avg_sq_col"] for i in factored]
            torch._foreach_mul_(rows, beta2t)
            torch._foreach_add_(rows, [upd[i].mean(dim=-1) for i in factored], alpha=1.0 - beta2t)
            torch._foreach_mul_(cols, beta2t)
            torch._foreach_add_(cols, [upd[i].mean(dim=-2) for i in factored], alpha=1.0 - beta2t)
            for i, row, col in zip(factored, rows, cols):
                r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                torch.mul(r_factor, col.unsqueeze(-2).rsqrt(), out=upd[i])
        if plain:
            vs = [states[i]["exp_avg_sq"] for i in plain]
            torch._foreach_mul_(vs, beta2t)
            torch._foreach_add_(vs, [upd[i] for i in plain], alpha=1.0 - beta2t)
            for i, v in zip(plain, vs):
                torch.rsqrt(v, out=upd[i])
        torch._foreach_mul_(upd, grads)
        u_rms = torch._foreach_div(torch._foreach_norm(upd), roots)
        clip = torch._foreach_div(u_rms, group["clip_threshold"])
        torch._foreach_clamp_min_(clip, 1.0)
        if alpha is not None:
            step_factor = torch._foreach_div(alpha, clip)
        else:  # α = ρ, a Python float: ρ / clip, exactly as the per-tensor path computes it
            step_factor = [rho / c for c in clip]
        applied = torch._foreach_mul(step_factor, scale) if scale != 1.0 else step_factor

        if group["beta1"] is not None:
            moments = [self._moment(st, p.dtype) for st, p in zip(states, params)]
            torch._foreach_mul_(upd, applied)
            torch._foreach_mul_(moments, group["beta1"])
            torch._foreach_add_(moments, upd, alpha=1.0 - group["beta1"])
            for st, m in zip(states, moments):
                self._store_moment(st, m)
            upd, applied = moments, None
        if group["weight_decay"] != 0:
            if alpha is not None:
                decay = torch._foreach_mul(torch._foreach_mul(alpha, -group["weight_decay"]), scale)
                torch._foreach_addcmul_(params, params, decay)
            else:
                torch._foreach_add_(params, params, alpha=-group["weight_decay"] * rho * scale)
        if applied is None:
            torch._foreach_sub_(params, upd)
        else:
            torch._foreach_addcmul_(params, upd, torch._foreach_neg(applied))
        if not measure:
            return None
        u_sq = [(u * f).double().square() * float(p.numel()) for u, f, p in zip(u_rms, step_factor, params)]
        w_sq = [w.double().square() * float(p.numel()) for w, p in zip(w_rms, params)]
        return u_sq, w_sq

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if self.standalone:
            targets = standalone_targets([g["surge_ratio"] for g in self.param_groups],
                                         [g["shock_rate"] for g in self.param_groups])
            for group, target in zip(self.param_groups, targets):
                group["surge_scale"] = target

        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = dict(zip(map(id, live), _nonfinite_flags([p.grad for p in live])))

        sums: list[tuple[dict, list[torch.Tensor], list[torch.Tensor], int]] = []
        for group in self.param_groups:
            scale = advance_surge_scale(group["surge_effective"], group["surge_scale"],
                                        group["smooth_rate"], group["shock_rate"])
            group["surge_effective"] = scale
            u_parts: list[torch.Tensor] = []
            w_parts: list[torch.Tensor] = []
            count = 0
            together: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if bad[id(p)]:
                    group["skipped_tensors"] = int(group["skipped_tensors"]) + 1
                    continue
                if self.foreach and p.dtype == self._dtype_for(p) and not p.grad.is_sparse:
                    together.setdefault((p.device, p.dtype), []).append(p)
                    continue
                measured = self._update_tensor(p, group, scale, self.standalone)
                if measured is not None:
                    u_parts.append(measured[0].to(live[0].device))
                    w_parts.append(measured[1].to(live[0].device))
                    count += p.numel()
            for params in together.values():
                measured_many = self._update_foreach(params, group, scale, self.standalone)
                if measured_many is not None:
                    u_parts += [u.to(live[0].device) for u in measured_many[0]]
                    w_parts += [w.to(live[0].device) for w in measured_many[1]]
                    count += sum(p.numel() for p in params)
            if self.standalone:
                sums.append((group, u_parts, w_parts, count))

        if self.standalone:
            self._record_ratios(sums)
        return loss

    # ------------------------------------------------------------------------------ fused backward pass

    def begin_fused_step(self) -> None:
        """Open one fused step (call before the backward): each group's surge scale advances once, as `step()`
        does before its updates. Fused steps need the scales set from outside (standalone=False)."""
        if self.standalone:
            raise RuntimeError("AdaSurge: the fused backward pass needs standalone=False (per-unit groups from a "
                               "controller): standalone targets are measured over all tensors of a step")
        for group in self.param_groups:
            group["surge_effective"] = advance_surge_scale(group["surge_effective"], group["surge_scale"],
                                                           group["smooth_rate"], group["shock_rate"])

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter now, with the scale of the open fused step, and free its gradient.

        The same Adafactor math as `step()` gives that tensor (its per-tensor path, which the multi-tensor path
        equals bitwise on the CPU); a NaN/Inf gradient skips the tensor and is counted, as in `step()`."""
        if p.grad is None:
            return
        if _nonfinite_flags([p.grad])[0]:
            group["skipped_tensors"] = int(group["skipped_tensors"]) + 1
        else:
            self._update_tensor(p, group, group["surge_effective"], measure=False)
        p.grad = None

    def register_fused_backward(self, clip: Callable[[torch.Tensor], None] | None = None) -> list[Any]:
        """sd-scripts' `--fused_backward_pass`: every parameter is updated as soon as its gradient is accumulated
        and the gradient is freed, so the full set of gradients is never resident. `clip(p)` runs first (e.g.
        per-tensor gradient-norm clipping, as sd-scripts does there). Returns the hook handles (`.remove()`)."""
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                def hook(tensor: torch.Tensor, group: dict = group) -> None:
                    if clip is not None:
                        clip(tensor)
                    self.step_param(tensor, group)
                handles.append(p.register_post_accumulate_grad_hook(hook))
        return handles

    @staticmethod
    def _record_ratios(sums: list[tuple[dict, list[torch.Tensor], list[torch.Tensor], int]]) -> None:
        """Per group RMS(α·u)/max(eps2, RMS(w)) over all its updated tensors; one host sync."""
        measured = [(g, u, w, n) for g, u, w, n in sums if u]
        if not measured:
            return
        totals = torch.stack([torch.stack([torch.stack(u).sum(), torch.stack(w).sum()]) for _, u, w, _ in measured])
        for (group, _, _, n), (u_sq, w_sq) in zip(measured, totals.tolist()):
            u_rms, w_rms = math.sqrt(u_sq / n), math.sqrt(w_sq / n)
            group["surge_ratio"] = u_rms / max(group["eps"][1], w_rms)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to each parameter's dtype; restore it in `state_dtype` without a detour."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in saved.get(i, {}).items():
                if not torch.is_tensor(value) or key == "step":
                    continue
                # torch casts every tensor to the parameter's dtype; the 8-bit codes and their fp32 absmax keep theirs
                keep = key in ("exp_avg_8bit", "exp_avg_absmax") or not value.is_floating_point()
                self.state[p][key] = value.to(device=p.device, dtype=value.dtype if keep else self._dtype_for(p),
                                              copy=True)
