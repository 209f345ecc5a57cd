"""Loss terms against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from sd_scripts_surge.surge.losses import (
    add_noise,
    alpha_sigma,
    apply_noise_offset,
    denoise_loss,
    min_snr_weight,
    output_kd_loss,
    prior_loss_weights,
    scaled_linear_alphas_cumprod,
    snr,
    teacher_scales,
    trajectory_loss,
    unit_velocity,
    velocity_target,
)

# a two-step schedule with easy numbers: ᾱ = 0.64 (α = 0.8, σ = 0.6, SNR = 16/9) and ᾱ = 0.36 (α 0.6, σ 0.8)
ACP = torch.tensor([0.64, 0.36], dtype=torch.float64)


def test_schedule_matches_sd_scaled_linear():
    acp = scaled_linear_alphas_cumprod()
    assert acp.shape == (1000,)
    assert acp[0].item() == pytest.approx(1 - 0.00085)
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(acp.float(), reference, rtol=1e-5, atol=1e-7)


def test_alpha_sigma_snr_and_add_noise():
    t = torch.tensor([0, 1])
    a, s = alpha_sigma(ACP, t)
    torch.testing.assert_close(a, torch.tensor([0.8, 0.6], dtype=torch.float64))
    torch.testing.assert_close(s, torch.tensor([0.6, 0.8], dtype=torch.float64))
    torch.testing.assert_close(snr(ACP, t), torch.tensor([16 / 9, 9 / 16], dtype=torch.float64))
    x0 = torch.ones(2, 1, 1, 1)
    eps = torch.full((2, 1, 1, 1), 2.0)
    torch.testing.assert_close(add_noise(x0, eps, t, ACP).flatten(), torch.tensor([0.8 + 1.2, 0.6 + 1.6]))
    # v = α ε − σ x0
    torch.testing.assert_close(velocity_target(x0, eps, t, ACP).flatten(), torch.tensor([1.6 - 0.6, 1.2 - 0.8]))


def test_min_snr_weights_follow_sd_scripts():
    t = torch.tensor([0, 1])
    # γ = 1: ε → min(SNR,1)/SNR = [9/16, 1]; v → min(SNR,1)/(SNR+1) = [1/(25/9), (9/16)/(25/16)]
    torch.testing.assert_close(min_snr_weight(ACP, t, 1.0), torch.tensor([9 / 16, 1.0]))
    torch.testing.assert_close(min_snr_weight(ACP, t, 1.0, v_prediction=True), torch.tensor([9 / 25, 9 / 25]))


def test_denoise_loss_eps_v_and_min_snr():
    t = torch.tensor([0, 1])
    x0 = torch.ones(2, 1, 1, 2)
    eps = torch.full((2, 1, 1, 2), 2.0)
    pred = torch.zeros(2, 1, 1, 2)
    # ε target: per-sample MSE = 4 each
    assert denoise_loss(pred, x0, eps, t, ACP).item() == pytest.approx(4.0)
    # v target: v = [1.0, 0.4] → per-sample 1.0 and 0.16
    assert denoise_loss(pred, x0, eps, t, ACP, v_prediction=True).item() == pytest.approx((1.0 + 0.16) / 2)
    # min-SNR γ=1, ε: 4·9/16 and 4·1
    assert denoise_loss(pred, x0, eps, t, ACP, min_snr_gamma=1.0).item() == pytest.approx((4 * 9 / 16 + 4) / 2)
    assert denoise_loss(pred, x0, eps, t, ACP, v_prediction=True, min_snr_gamma=1.0).item() == pytest.approx(
        (1.0 * 9 / 25 + 0.16 * 9 / 25) / 2)


def test_prior_loss_weight_scales_regularisation_samples_like_sd_scripts():
    # sd-scripts (train_network.py): loss = mean_b(w_b · min_snr_b · MSE_b), w_b = prior_loss_weight if is_reg else 1
    is_reg = torch.tensor([False, True])
    torch.testing.assert_close(prior_loss_weights(is_reg, 0.25), torch.tensor([1.0, 0.25]))
    t = torch.tensor([0, 1])
    x0 = torch.ones(2, 1, 1, 2)
    eps = torch.full((2, 1, 1, 2), 2.0)
    pred = torch.zeros(2, 1, 1, 2)
    weights = prior_loss_weights(is_reg, 0.25)
    # ε target: MSE 4 and 4 → (4·1 + 4·0.25)/2, the mean over B (not normalised by Σw)
    assert denoise_loss(pred, x0, eps, t, ACP, sample_weights=weights).item() == pytest.approx((4 + 1) / 2)
    # with min-SNR γ=1 the weights multiply: (4·9/16·1 + 4·1·0.25)/2
    assert denoise_loss(pred, x0, eps, t, ACP, min_snr_gamma=1.0, sample_weights=weights).item() == pytest.approx(
        (4 * 9 / 16 + 4 * 0.25) / 2)
    # weight 1 everywhere (the default, or no reg images) is the unweighted loss
    ones = prior_loss_weights(torch.tensor([True, True]), 1.0)
    assert denoise_loss(pred, x0, eps, t, ACP, v_prediction=True, sample_weights=ones).item() == pytest.approx(
        denoise_loss(pred, x0, eps, t, ACP, v_prediction=True).item())


def test_noise_offset():
    noise = torch.zeros(2, 3, 4, 4)
    g = torch.Generator().manual_seed(7)
    out = apply_noise_offset(noise, 0.1, g)
    expected = 0.1 * torch.randn((2, 3, 1, 1), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected.expand(2, 3, 4, 4))
    assert apply_noise_offset(noise, 0.0) is noise


def test_output_kd():
    assert output_kd_loss(torch.zeros(2, 2), torch.ones(2, 2) * 3).item() == pytest.approx(9.0)


def test_unit_velocity_full_and_shape_changing():
    a, s = torch.tensor([0.8]), torch.tensor([0.6])
    h_in, h_out = torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)
    # (0.8·(3−1) − 0.6·3)/2 = (1.6 − 1.8)/2 = −0.1
    torch.testing.assert_close(unit_velocity(h_in, h_out, a, s, 2.0), torch.full((1, 2, 2), -0.1))
    # channel change: residual term zero → −0.6·3/2
    torch.testing.assert_close(unit_velocity(torch.ones(1, 3, 2), h_out, a, s, 2.0), torch.full((1, 2, 2), -0.9))


def test_trajectory_loss_weights_and_value():
    a, s = torch.tensor([0.8]), torch.tensor([0.6])
    teacher = {"A": (torch.zeros(1, 4), torch.ones(1, 4)), "B": (torch.zeros(1, 2), torch.full((1, 3), 2.0))}
    student = {"A": (torch.zeros(1, 4), torch.zeros(1, 4)), "B": (torch.zeros(1, 2), torch.zeros(1, 3))}
    scales = teacher_scales({k: v[1] for k, v in teacher.items()})
    assert scales == {"A": pytest.approx(1.0), "B": pytest.approx(2.0)}
    # A: v_T = 0.8·1 − 0.6·1 = 0.2, v_S = 0 → MSE 0.04; B (shape change): v_T = −0.6·2/2 = −0.6 → MSE 0.36
    m = {"A": 2.0, "B": 0.5}
    expected = 3.0 * (2.0 / 2 * 0.04 + 0.5 / 2 * 0.36)
    got = trajectory_loss(student, teacher, a, s, scales, m, traj_weight=3.0)
    assert got.item() == pytest.approx(expected)
    assert trajectory_loss(teacher, teacher, a, s, scales).item() == 0.0
    with pytest.raises(ValueError):
        trajectory_loss({}, teacher, a, s, scales)


def test_trajectory_loss_has_gradient():
    a, s = torch.tensor([0.8]), torch.tensor([0.6])
    h = torch.zeros(1, 4, requires_grad=True)
    loss = trajectory_loss({"A": (torch.zeros(1, 4), h)}, {"A": (torch.zeros(1, 4), torch.ones(1, 4))}, a, s,
                           {"A": 1.0})
    loss.backward()
    # d/dh mean((0.2 h − 0.2)²) at h=0 = 2·(−0.2)·0.2/4
    torch.testing.assert_close(h.grad, torch.full((1, 4), -0.02))
    assert math.isfinite(loss.item())
