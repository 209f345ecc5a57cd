"""Loss terms of surge training (DESIGN §3 F), as pure tensor functions.

- denoise loss: MSE to the ε target or the v target (v = α_t·ε − σ_t·x0), optional min-SNR-γ weighting in
  sd-scripts' form (weight = min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v), and the noise offset
  (noise + offset·randn(b, c, 1, 1)); regularisation images weighted by prior_loss_weight (mean_b(w_b·L_b),
  w_b = prior_loss_weight where is_reg else 1, as sd-scripts' train_network.py);
- output KD: MSE(student output, teacher output);
- trajectory loss on hidden units: v_l = (α_t·(h_out − h_in) − σ_t·h_out)/s_l, the v-prediction formula applied
  to a unit's residual and state, with s_l the teacher's RMS of that unit's output;
  L_traj = Σ_l w_l·MSE(v_S,l, v_T,l), w_l = traj_weight·m_l/K. Where the unit changes shape (down/up-sampling,
  channel change, skip concat) the residual term is zero and only −σ_t·h_out/s_l is matched.

α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) from the noise schedule's cumulative alphas.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of the SD/SDXL "scaled_linear" schedule (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) per sample, shape (B,), float64."""
    a = alphas_cumprod.to(torch.float64)[timesteps.long().cpu()].to(timesteps.device)
    return a.sqrt(), (1.0 - a).sqrt()


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) vector to broadcast against `like` (B, ...), in `like`'s dtype."""
    return x.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = α_t·x0 + σ_t·ε."""
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * noise


def apply_noise_offset(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """sd-scripts' noise offset: noise + offset·randn(b, c, 1, 1)."""
    if not offset:
        return noise
    shift = torch.randn((noise.shape[0], noise.shape[1], 1, 1), generator=generator, dtype=noise.dtype,
                        device="cpu" if generator is None else generator.device).to(noise.device)
    return noise + offset * shift


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = α_t·ε − σ_t·x0."""
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return _per_sample(alpha, x0) * noise - _per_sample(sigma, x0) * x0


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = α_t² / σ_t² = ᾱ_t / (1 − ᾱ_t)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return (alpha / sigma) ** 2


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                   v_prediction: bool = False) -> torch.Tensor:
    """min(SNR, γ)/SNR (ε) or min(SNR, γ)/(SNR + 1) (v), per sample, float32 as in sd-scripts."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return (clipped / (s + 1) if v_prediction else clipped / s).float()


def prior_loss_weights(is_reg: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """sd-scripts' per-sample loss weights: `prior_loss_weight` for regularisation images, 1 for the others."""
    ones = torch.ones(is_reg.shape, dtype=torch.float32, device=is_reg.device)
    return torch.where(is_reg.bool(), ones * prior_loss_weight, ones)


def denoise_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 alphas_cumprod: torch.Tensor, v_prediction: bool = False,
                 min_snr_gamma: float | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE to the ε (or v) target, optionally min-SNR-γ weighted.

    `noise` is the noise that was added to x0 (after any noise offset). `sample_weights` (B,) multiply each
    sample's loss before the batch mean (sd-scripts' `loss_weights`, see `prior_loss_weights`): the mean is
    still over B, not normalised by the sum of the weights, as in sd-scripts."""
    target = velocity_target(x0, noise, timesteps, alphas_cumprod) if v_prediction else noise
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, x0.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weight(alphas_cumprod, timesteps, min_snr_gamma, v_prediction).to(
            per_sample.device)
    return per_sample.mean()


def output_kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """MSE(student output, teacher output)."""
    return F.mse_loss(student_out.float(), teacher_out.float().to(student_out.device))


def unit_velocity(h_in: torch.Tensor | None, h_out: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """v_l = (α_t·(h_out − h_in) − σ_t·h_out)/s_l; the residual term is zero when h_in's shape differs."""
    h_out = h_out.float()
    v = -_per_sample(sigma, h_out) * h_out
    if h_in is not None and h_in.shape == h_out.shape:
        v = v + _per_sample(alpha, h_out) * (h_out - h_in.float())
    return v / scale


def teacher_scales(teacher_outputs: Mapping[str, torch.Tensor], eps: float = 1e-8) -> dict[str, float]:
    """s_l: RMS of each unit's teacher output (floored at eps)."""
    return {name: max(float(t.float().pow(2).mean().sqrt()), eps) for name, t in teacher_outputs.items()}


def trajectory_loss(student: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]],
                    teacher: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]],
                    alpha: torch.Tensor, sigma: torch.Tensor, scales: Mapping[str, float],
                    multipliers: Mapping[str, float] | None = None, traj_weight: float = 1.0) -> torch.Tensor:
    """L_traj = Σ_l w_l·MSE(v_S,l, v_T,l), w_l = traj_weight·m_l/K over the K units in `student`.

    `student` / `teacher` map unit name → (h_in, h_out); `multipliers` (m_l, default 1) are the controller's."""
    units = list(student)
    if not units:
        raise ValueError("trajectory_loss needs at least one unit")
    total = None
    for name in units:
        s_in, s_out = student[name]
        t_in, t_out = teacher[name]
        device = s_out.device
        a, s = alpha.to(device), sigma.to(device)
        v_s = unit_velocity(s_in, s_out, a, s, scales[name])
        v_t = unit_velocity(None if t_in is None else t_in.to(device), t_out.to(device), a, s, scales[name])
        m = 1.0 if multipliers is None else float(multipliers.get(name, 1.0))
        term = (traj_weight * m / len(units)) * F.mse_loss(v_s, v_t)
        total = term if total is None else total + term
    return total
