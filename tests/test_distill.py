import copy

import pytest
import torch

from sd_scripts_surge.surge.distill import DistillLoss, LossWeights, noise_batch, sub_unit_map, trajectory_units
from sd_scripts_surge.surge.losses import prior_loss_weights, scaled_linear_alphas_cumprod
from sd_scripts_surge.surge.units import build_unit_map
from sd_scripts_surge.tiny.architecture import TINY_CONTEXT_DIM, TINY_TE2_PROJECTION, build_tiny_unet


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = build_tiny_unet(0).eval().requires_grad_(False)
    unit_map = build_unit_map(teacher, "mbw")
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, TINY_CONTEXT_DIM)
    added = {"text_embeds": torch.randn(2, TINY_TE2_PROJECTION),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return teacher, unit_map, latents, context, added


def _loss(unit_map, weights):
    units = trajectory_units(unit_map)
    return DistillLoss(unit_map, scaled_linear_alphas_cumprod(), weights, scales={u: 1.0 for u in units})


def test_noise_batch_is_reproducible(setup):
    _, _, latents, context, added = setup
    ac = scaled_linear_alphas_cumprod()
    a = noise_batch(latents, context, added, ac, torch.Generator().manual_seed(5), noise_offset=0.05)
    b = noise_batch(latents, context, added, ac, torch.Generator().manual_seed(5), noise_offset=0.05)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.unet_kwargs["sample"], b.unet_kwargs["sample"])


def test_identical_student_has_zero_distillation_terms(setup):
    teacher, unit_map, latents, context, added = setup
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    batch = noise_batch(latents, context, added, scaled_linear_alphas_cumprod(), torch.Generator().manual_seed(1))
    loss_fn = _loss(unit_map, LossWeights(task=0.0, out=1.0, traj=1.0))
    teacher_call = lambda kw: teacher(**kw).sample  # noqa: E731
    total, terms = loss_fn(student, student, teacher_call, teacher, batch)
    assert terms["kd"] == pytest.approx(0.0, abs=1e-10)
    assert terms["traj"] == pytest.approx(0.0, abs=1e-10)
    assert set(terms) == {"kd", "traj"}


def _perturbed_student(teacher):
    """A trainable copy of `teacher` whose first mid-block ResBlock conv is scaled by 1.5."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    with torch.no_grad():
        student.get_submodule("mid_block").resnets[0].conv1.weight.mul_(1.5)
    return student


def test_perturbed_student_gets_gradients_from_every_term(setup):
    teacher, unit_map, latents, context, added = setup
    student = _perturbed_student(teacher)
    batch = noise_batch(latents, context, added, scaled_linear_alphas_cumprod(), torch.Generator().manual_seed(1))
    loss_fn = _loss(unit_map, LossWeights(task=1.0, out=1.0, traj=1.0))
    total, terms = loss_fn(student, student, lambda kw: teacher(**kw).sample, teacher, batch)
    assert terms["kd"] > 0 and terms["traj"] > 0 and terms["task"] > 0
    assert total.item() == pytest.approx(terms["task"] + terms["kd"] + terms["traj"], rel=1e-5)
    total.backward()
    assert student.mid_block.resnets[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_trajectory_weight_follows_multipliers(setup):
    teacher, unit_map, latents, context, added = setup
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.get_submodule("mid_block").resnets[0].conv1.weight.mul_(1.5)
    batch = noise_batch(latents, context, added, scaled_linear_alphas_cumprod(), torch.Generator().manual_seed(1))
    loss_fn = _loss(unit_map, LossWeights(task=0.0, out=0.0, traj=1.0))
    call = lambda kw: teacher(**kw).sample  # noqa: E731
    _, base = loss_fn(student, student, call, teacher, batch)
    _, doubled = loss_fn(student, student, call, teacher, batch, {u: 2.0 for u in unit_map.names})
    assert doubled["traj"] == pytest.approx(2 * base["traj"], rel=1e-5)


def test_sub_unit_map_keeps_order(setup):
    _, unit_map, *_ = setup
    names = trajectory_units(unit_map)
    sub = sub_unit_map(unit_map, list(reversed(names[:3])))
    assert sub.names == names[:3]


def test_feature_kd_is_mean_of_unit_mses(setup):
    teacher, unit_map, latents, context, added = setup
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.get_submodule("mid_block").resnets[0].conv1.weight.mul_(1.5)
    batch = noise_batch(latents, context, added, scaled_linear_alphas_cumprod(), torch.Generator().manual_seed(2))
    loss_fn = _loss(unit_map, LossWeights(task=0.0, out=0.0, traj=0.0, feature=1.0))
    _, terms = loss_fn(student, student, lambda kw: teacher(**kw).sample, teacher, batch)
    from sd_scripts_surge.surge.capture import CaptureOptions, capture_flavor

    sub = loss_fn.traj_map
    _, fs = capture_flavor(student, sub, batch.unet_kwargs, CaptureOptions(head_stats=False))
    _, ft = capture_flavor(teacher, sub, batch.unet_kwargs, CaptureOptions(head_stats=False))
    expected = sum(float(((fs.units[u].output - ft.units[u].output) ** 2).mean()) for u in sub.names) / len(sub.names)
    assert terms["feature"] == pytest.approx(expected, rel=1e-5)
    assert terms["feature"] > 0


def test_prior_loss_weight_down_weights_regularisation_samples_in_the_task_term(setup):
    teacher, unit_map, latents, context, added = setup
    student = _perturbed_student(teacher)
    batch = noise_batch(latents, context, added, scaled_linear_alphas_cumprod(), torch.Generator().manual_seed(3))
    loss_fn = _loss(unit_map, LossWeights(task=1.0, out=1.0, traj=0.0))
    call = lambda kw: teacher(**kw).sample  # noqa: E731
    is_reg = torch.tensor([False, True])
    with torch.no_grad():
        _, plain = loss_fn(student, student, call, teacher, batch)
        _, first_only = loss_fn(student, student, call, teacher, batch, sample_weights=torch.tensor([1.0, 0.0]))
        _, weighted = loss_fn(student, student, call, teacher, batch, sample_weights=prior_loss_weights(is_reg, 0.5))
    # the regularisation sample counts half: task = (L0 + 0.5·L1)/2 with L0 = 2·first_only, L1 = 2·plain − L0
    l0 = 2 * first_only["task"]
    l1 = 2 * plain["task"] - l0
    assert l1 > 0 and weighted["task"] < plain["task"]
    assert weighted["task"] == pytest.approx((l0 + 0.5 * l1) / 2, rel=1e-5)
    assert weighted["kd"] == pytest.approx(plain["kd"], rel=1e-6)  # teacher matching is not a prior: unweighted
