"""Unit replay: re-running units alone, the accept and rollback paths, pre-change inputs, LERP."""

from __future__ import annotations

import pytest
import torch
from surge_helpers import perturbed_copy, restore_threads, tiny_kwargs, tiny_teacher, use_one_thread

from sd_scripts_surge.surge.capture import CaptureOptions, capture_flavor
from sd_scripts_surge.surge.replay import (
    lerp_unit,
    replay_all_units,
    replay_unit,
    run_unit,
    unit_parameters,
    window_error,
)
from sd_scripts_surge.surge.units import fine_unit_map, mbw_unit_map

setup_module, teardown_module = use_one_thread, restore_threads


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(0)


@pytest.fixture(scope="module")
def flavors(teacher):
    unit_map = mbw_unit_map(teacher)
    with torch.no_grad():
        return [capture_flavor(teacher, unit_map, tiny_kwargs(batch=2, seed=s))[1] for s in range(3)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("map_builder", [mbw_unit_map, fine_unit_map])
def test_every_unit_reruns_alone_exactly(teacher, map_builder, masked):
    unit_map = map_builder(teacher)
    kwargs = tiny_kwargs(batch=2)
    if masked:
        kwargs["encoder_attention_mask"] = (torch.arange(77) < 30).float().expand(2, 77)
    with torch.no_grad():
        _, flavor = capture_flavor(teacher, unit_map, kwargs)
        for spec in unit_map.units:
            f = flavor.units[spec.name]
            assert torch.equal(run_unit(teacher, spec, f.input, flavor.shared, f.side), f.output), spec.name


@pytest.mark.parametrize("map_builder", [mbw_unit_map, fine_unit_map])
def test_teacher_chain_reproduces_its_own_flavors(teacher, map_builder):
    """Running any window of the teacher in chain (skips, residuals, pre-change re-runs) from its cached inputs
    gives exactly its cached outputs: the window error of the teacher against itself is zero everywhere."""
    unit_map = map_builder(teacher)
    with torch.no_grad():
        flavor = capture_flavor(teacher, unit_map, tiny_kwargs(batch=1))[1]
    for spec in unit_map.units:
        if spec.kind != "embed":
            assert window_error(teacher, unit_map, spec.name, [flavor], pre_change_layers=3,
                                post_change_layers=4) == 0.0, spec.name


def weights(unet, unit_map, unit):
    return {n: p.detach().clone() for n, p in unit_parameters(unet, unit_map[unit])}


def test_accept_path(teacher, flavors):
    unit_map = mbw_unit_map(teacher)
    student = perturbed_copy(teacher, unit_map, ["IN05"], scale=0.3)
    before_weights = weights(student, unit_map, "IN05")
    result = replay_unit(student, unit_map, "IN05", flavors, replay_steps=30, lr=1e-3, post_change_layers=2)
    assert result.accepted and result.after < result.before and result.mode == "train"
    assert result.after == pytest.approx(window_error(student, unit_map, "IN05", flavors, 0, 2))
    after_weights = weights(student, unit_map, "IN05")
    assert any(not torch.equal(before_weights[n], after_weights[n]) for n in before_weights)
    # other units untouched
    assert torch.equal(student.conv_in.weight, teacher.conv_in.weight)


def test_accept_path_fine_transformer_block(teacher):
    unit_map = fine_unit_map(teacher)
    unit = "down_blocks.2.attentions.0.transformer_blocks.1"
    student = perturbed_copy(teacher, unit_map, [unit], scale=0.3)
    with torch.no_grad():
        flavors = [capture_flavor(teacher, unit_map, tiny_kwargs(batch=2, seed=s))[1] for s in range(2)]
    result = replay_unit(student, unit_map, unit, flavors, replay_steps=20, lr=1e-3, post_change_layers=3)
    assert result.accepted and result.after < result.before


def test_rollback_restores_exact_weights_and_grad_state(teacher, flavors):
    unit_map = mbw_unit_map(teacher)
    student = perturbed_copy(teacher, unit_map, ["IN05"], scale=0.3)
    params = unit_parameters(student, unit_map["IN05"])
    params[0][1].requires_grad_(False)
    marker = torch.ones_like(params[1][1])
    params[1][1].grad = marker
    before_weights = weights(student, unit_map, "IN05")
    result = replay_unit(student, unit_map, "IN05", flavors, replay_steps=5, lr=10.0, post_change_layers=2)
    assert not result.accepted and result.after > result.before
    for n, w in weights(student, unit_map, "IN05").items():
        assert torch.equal(w, before_weights[n]), n  # bitwise
    assert not params[0][1].requires_grad and params[1][1].grad is marker


def test_pre_change_layers_use_student_inputs(teacher, flavors):
    unit_map = mbw_unit_map(teacher)
    student = perturbed_copy(teacher, unit_map, ["IN04", "IN05"], scale=0.3)
    own_inputs = window_error(student, unit_map, "IN05", flavors, pre_change_layers=0, post_change_layers=1)
    real_inputs = window_error(student, unit_map, "IN05", flavors, pre_change_layers=2, post_change_layers=1)
    assert own_inputs != real_inputs  # IN04's perturbation reaches IN05 only through the re-run upstream
    healthy = perturbed_copy(teacher, unit_map, ["IN05"], scale=0.3)
    assert window_error(healthy, unit_map, "IN05", flavors, 2, 1) == pytest.approx(
        window_error(healthy, unit_map, "IN05", flavors, 0, 1), rel=1e-5)  # identical upstream → same inputs
    result = replay_unit(student, unit_map, "IN05", flavors, replay_steps=20, lr=1e-3, pre_change_layers=2,
                         post_change_layers=1)
    assert result.accepted and result.after < result.before


def test_lerp_accept_and_reject(teacher, flavors):
    unit_map = mbw_unit_map(teacher)
    student = perturbed_copy(teacher, unit_map, ["OUT03"], scale=0.3)
    result = lerp_unit(student, teacher, unit_map, "OUT03", flavors, alpha=1.0, post_change_layers=1)
    assert result.accepted and result.after < result.before and result.mode == "lerp"
    assert all(torch.equal(w, weights(teacher, unit_map, "OUT03")[n])
               for n, w in weights(student, unit_map, "OUT03").items())
    # LERP toward an unrelated model makes the matching unit worse → rolled back bitwise
    other = tiny_teacher(1)
    kept = weights(student, unit_map, "IN04")
    result = lerp_unit(student, other, unit_map, "IN04", flavors, alpha=0.5, post_change_layers=1)
    assert not result.accepted
    assert all(torch.equal(w, kept[n]) for n, w in weights(student, unit_map, "IN04").items())


def test_errors(teacher, flavors):
    unit_map = mbw_unit_map(teacher)
    with pytest.raises(ValueError, match="cannot be replayed"):
        replay_unit(teacher, unit_map, "BASE", flavors, replay_steps=1)
    with torch.no_grad():
        pooled = [capture_flavor(teacher, unit_map, tiny_kwargs(), CaptureOptions(pool_to=1))[1]]
    with pytest.raises(ValueError, match="full size"):
        window_error(teacher, unit_map, "IN01", pooled)


def test_all_unit_replay_trains_every_unit_locally_and_keeps_only_what_passes(teacher, flavors):
    """Teacher-forced local distillation of every unit at once: the perturbed units get closer to the teacher,
    every kept unit's window error did not grow, and a rolled-back unit is bitwise as it was."""
    unit_map = mbw_unit_map(teacher)
    perturbed = ["IN02", "IN05", "M00", "OUT03"]
    student = perturbed_copy(teacher, unit_map, perturbed, scale=0.3)
    units = [u.name for u in unit_map.units if u.kind != "embed"]
    before_weights = {u: weights(student, unit_map, u) for u in units}
    before = {u: window_error(student, unit_map, u, flavors, 0, 2) for u in perturbed}
    results = replay_all_units(student, unit_map, units, flavors, replay_steps=30, lr=1e-3, post_change_layers=2)
    by_unit = {r.unit: r for r in results}
    assert set(by_unit) == set(units) and all(r.mode == "train_all" and r.steps == 30 for r in results)
    for r in results:
        assert r.after == pytest.approx(window_error(student, unit_map, r.unit, flavors, 0, 2))
        if r.accepted:
            assert r.after <= r.before
        else:
            assert all(torch.equal(before_weights[r.unit][n], w) for n, w in weights(student, unit_map, r.unit).items())
    improved = [u for u in perturbed if window_error(student, unit_map, u, flavors, 0, 2) < before[u]]
    assert len(improved) >= 3, (before, {u: by_unit[u] for u in perturbed})
    # an empty parameter list skips a unit; no steps change nothing
    assert replay_all_units(student, unit_map, units, flavors, replay_steps=0) == []
    assert replay_all_units(student, unit_map, units, flavors, params_of=lambda u: []) == []


def test_all_unit_replay_retests_the_windows_a_rollback_changes(teacher, flavors):
    """Every unit perturbed, 5 replay steps: some changes are rolled back; every kept unit's recorded error
    is its window's error with the final weights (only windows holding a rolled-back unit are tested again)."""
    unit_map = mbw_unit_map(teacher)
    units = [u.name for u in unit_map.units if u.kind != "embed"]
    student = perturbed_copy(teacher, unit_map, units, scale=0.3)
    results = replay_all_units(student, unit_map, units, flavors, replay_steps=5, lr=1e-3, post_change_layers=2)
    assert any(not r.accepted for r in results) and any(r.accepted for r in results)
    for r in results:
        if r.accepted:
            assert r.after == pytest.approx(window_error(student, unit_map, r.unit, flavors, 0, 2), rel=1e-6)
            assert r.after <= r.before
        else:  # the error its change made, which got it rolled back
            assert r.after > r.before


def test_replay_rows_take_the_batch_in_turn() -> None:
    from sd_scripts_surge.surge.replay import _replay_rows

    assert [_replay_rows(8, 4, t) for t in range(3)] == [slice(0, 4), slice(4, 8), slice(0, 4)]
    assert [_replay_rows(8, 3, t) for t in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 8), slice(0, 3)]
    assert _replay_rows(8, 0, 5) == _replay_rows(8, 8, 1) == _replay_rows(8, 20, 0) == slice(None)


def test_all_unit_replay_on_sub_batches(teacher, flavors, monkeypatch: pytest.MonkeyPatch) -> None:
    """replay batch 1 of the 2-sample flavors: step s trains on flavor s mod 3, sample ⌊s/3⌋ mod 2 (every side
    input cut to that sample), and the perturbed units still get closer to the teacher."""
    import sd_scripts_surge.surge.replay as replay

    unit_map = mbw_unit_map(teacher)
    perturbed = ["IN02", "IN05", "M00", "OUT03"]
    student = perturbed_copy(teacher, unit_map, perturbed, scale=0.3)
    units = [u.name for u in unit_map.units if u.kind != "embed"]
    before = {u: window_error(student, unit_map, u, flavors, 0, 2) for u in perturbed}
    seen: list[tuple[str, torch.Tensor, dict]] = []
    original = replay.run_unit

    def spy(unet, spec, x, shared, side=None):
        if torch.is_grad_enabled():  # the training steps (the window tests run without grad)
            seen.append((spec.name, x.detach().clone(), {k: v.shape[0] for k, v in shared.items() if v.dim()}))
        return original(unet, spec, x, shared, side)

    monkeypatch.setattr(replay, "run_unit", spy)
    replay_all_units(student, unit_map, units, flavors, replay_steps=30, lr=1e-3, post_change_layers=2, batch=1)
    per_step = len(units)
    assert len(seen) == 30 * per_step
    for step in (0, 1, 3, 4, 6):
        name, x, shared_rows = seen[step * per_step]
        row = (step // 3) % 2
        assert torch.equal(x, flavors[step % 3].units[name].input[row:row + 1]), step
        assert set(shared_rows.values()) == {1}, shared_rows
    improved = [u for u in perturbed if window_error(student, unit_map, u, flavors, 0, 2) < before[u]]
    assert len(improved) >= 3
