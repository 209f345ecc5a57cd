"""Cached teacher targets (DESIGN §3 G): draws keyed by (seed, entry, draw), loss from the cache == live loss."""

from __future__ import annotations

import copy

import pytest
import torch

from sd_scripts_surge.models.fileio import parse_size
from sd_scripts_surge.surge.distill import DistillLoss, LossWeights, noised_batch, trajectory_units
from sd_scripts_surge.surge.losses import scaled_linear_alphas_cumprod
from sd_scripts_surge.surge.targets import TargetCache, draw_noise
from sd_scripts_surge.surge.units import build_unit_map
from sd_scripts_surge.tiny.architecture import TINY_CONTEXT_DIM, TINY_TE2_PROJECTION, build_tiny_unet


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = build_tiny_unet(0).eval().requires_grad_(False)
    unit_map = build_unit_map(teacher, "mbw")
    n = 6
    latents = torch.randn(n, 4, 8, 8)
    context = torch.randn(n, 77, TINY_CONTEXT_DIM)
    added = {"text_embeds": torch.randn(n, TINY_TE2_PROJECTION),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * n)}
    return teacher, unit_map, latents, context, added


def test_draws_are_a_function_of_seed_entry_and_draw():
    a, ta = draw_noise(3, 17, 1, (4, 8, 8), noise_offset=0.05)
    b, tb = draw_noise(3, 17, 1, (4, 8, 8), noise_offset=0.05)
    assert torch.equal(a, b) and ta == tb
    c, _ = draw_noise(3, 17, 2, (4, 8, 8))
    d, _ = draw_noise(3, 18, 1, (4, 8, 8))
    assert not torch.equal(a, c) and not torch.equal(a, d)
    cache = TargetCache(draws=3, seed=3)
    assert [cache.draw_of(e) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="draws"):
        TargetCache(draws=0, seed=0)


def test_loss_from_cached_targets_equals_live_teacher_loss(setup):
    teacher, unit_map, latents, context, added = setup
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    with torch.no_grad():
        student.mid_block.resnets[0].conv1.weight.mul_(1.3)
    alphas = scaled_linear_alphas_cumprod()
    loss_fn = DistillLoss(unit_map, alphas, LossWeights(task=1.0, out=1.0, traj=0.5, feature=0.2),
                          scales={u: 1.0 for u in trajectory_units(unit_map)})
    teacher_call = lambda kw: teacher(**kw).sample  # noqa: E731
    entries = list(range(len(latents)))
    cache = TargetCache(draws=2, seed=5)

    def batches():
        for chunk in (entries[:4], entries[4:]):  # batched differently from training below
            yield chunk, latents[chunk], {"encoder_hidden_states": context[chunk],
                                          "added_cond_kwargs": {k: v[chunk] for k, v in added.items()}}

    logs: list[str] = []
    cache.build(batches, len(entries), lambda kw: loss_fn.teacher_targets(teacher_call, teacher, kw), alphas,
                log=logs.append)
    assert len(cache.items) == 12 and "MiB" in logs[0] and cache.capture_seconds > 0
    for draw in (0, 1):
        chosen = [5, 1, 2]
        noise, t = cache.noise(chosen, draw, latents.shape[1:])
        batch = noised_batch(latents[chosen], context[chosen], {k: v[chosen] for k, v in added.items()}, noise, t,
                             alphas)
        live, live_terms = loss_fn(student, student, teacher_call, teacher, batch)
        cached, cached_terms = loss_fn(student, student, None, None, batch, cached=cache.targets(chosen, draw, "cpu"))
        assert set(cached_terms) == {"task", "kd", "traj", "feature"} == set(live_terms)
        for name in live_terms:
            assert cached_terms[name] == pytest.approx(live_terms[name], rel=1e-5, abs=1e-8), name
        assert float(cached.detach()) == pytest.approx(float(live.detach()), rel=1e-5)
    with pytest.raises(KeyError, match="no cached teacher targets"):
        cache.targets([99], 0, "cpu")


def test_cache_budget_is_enforced_before_the_rest_runs(setup):
    teacher, unit_map, latents, context, added = setup
    alphas = scaled_linear_alphas_cumprod()
    cache = TargetCache(draws=4, seed=0)
    calls = {"n": 0}

    def batches():
        for i in range(len(latents)):
            calls["n"] += 1
            yield [i], latents[i:i + 1], {"encoder_hidden_states": context[i:i + 1],
                                          "added_cond_kwargs": {k: v[i:i + 1] for k, v in added.items()}}

    loss_fn = DistillLoss(unit_map, alphas, LossWeights(task=0.0, out=1.0, traj=0.0))
    with pytest.raises(MemoryError, match="surge_cache_budget"):
        cache.build(batches, len(latents), lambda kw: loss_fn.teacher_targets(lambda k: teacher(**k).sample, None, kw),
                    alphas, max_bytes=1000, log=lambda s: None)
    assert calls["n"] == 1  # refused after the first batch measured the size


def test_parse_size():
    assert parse_size("8GB") == 8 * 2**30 and parse_size("512MiB") == 512 * 2**20 and parse_size(0) == 0
    assert parse_size("1.5 gb") == int(1.5 * 2**30) and parse_size("2048") == 2048
    with pytest.raises(ValueError, match="size like"):
        parse_size("lots")


def _disk_setup(setup):
    teacher, unit_map, latents, context, added = setup
    alphas = scaled_linear_alphas_cumprod()
    loss_fn = DistillLoss(unit_map, alphas, LossWeights(task=1.0, out=1.0, traj=0.5),
                          scales={u: 1.0 for u in trajectory_units(unit_map)})
    calls = {"n": 0, "fail_after": None}

    def answer(kw):
        if calls["fail_after"] is not None and calls["n"] >= calls["fail_after"]:
            raise KeyboardInterrupt  # Ctrl-C mid-capture
        calls["n"] += 1
        return loss_fn.teacher_targets(lambda k: teacher(**k).sample, teacher, kw)

    def batches(scale=1.0):
        def gen():
            for chunk in ([0, 1], [2, 3], [4, 5]):
                yield chunk, latents[chunk] * scale, {"encoder_hidden_states": context[chunk],
                                                      "added_cond_kwargs": {k: v[chunk] for k, v in added.items()}}
        return gen
    return alphas, answer, batches, calls


def test_disk_shards_equal_memory_and_are_reused_checked_and_resumed(setup, tmp_path):
    alphas, answer, batches, calls = _disk_setup(setup)
    quiet = lambda s: None  # noqa: E731
    memory = TargetCache(draws=2, seed=5)
    memory.build(batches(), 6, answer, alphas, log=quiet)
    calls["n"] = 0
    disk = TargetCache(draws=2, seed=5, directory=tmp_path / "t", key={"teacher": "abc"})
    disk.build(batches(), 6, answer, alphas, log=quiet)
    assert calls["n"] == 6 and len(disk) == 12 and disk.built_shards == 6
    for draw in (0, 1):
        a, b = memory.targets([5, 0, 3], draw, "cpu"), disk.targets([5, 0, 3], draw, "cpu")
        assert torch.equal(a.prediction, b.prediction) and a.pairs.keys() == b.pairs.keys()
        for unit, (h_in, h_out) in a.pairs.items():
            assert torch.equal(h_out, b.pairs[unit][1])
            other_in = b.pairs[unit][0]
            assert (h_in is None) == (other_in is None) and (h_in is None or torch.equal(h_in, other_in))

    # same teacher, data and seed: nothing is recomputed
    calls["n"] = 0
    again = TargetCache(draws=2, seed=5, directory=tmp_path / "t", key={"teacher": "abc"})
    again.build(batches(), 6, answer, alphas, log=quiet)
    assert calls["n"] == 0 and again.reused_shards == 6
    assert torch.equal(again.targets([4], 1, "cpu").prediction, memory.targets([4], 1, "cpu").prediction)

    # a corrupt shard is found by its checksum and rebuilt alone
    shard = sorted((tmp_path / "t").glob("draw001-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    logs: list[str] = []
    calls["n"] = 0
    TargetCache(draws=2, seed=5, directory=tmp_path / "t", key={"teacher": "abc"}).build(
        batches(), 6, answer, alphas, log=logs.append)
    assert calls["n"] == 1 and any("checksum" in line for line in logs)

    # changed inputs rebuild every shard of that data; another teacher empties the folder
    calls["n"] = 0
    TargetCache(draws=2, seed=5, directory=tmp_path / "t", key={"teacher": "abc"}).build(
        batches(scale=2.0), 6, answer, alphas, log=quiet)
    assert calls["n"] == 6
    calls["n"] = 0
    logs.clear()
    TargetCache(draws=2, seed=5, directory=tmp_path / "t", key={"teacher": "other"}).build(
        batches(scale=2.0), 6, answer, alphas, log=logs.append)
    assert calls["n"] == 6 and any("another teacher" in line for line in logs)
    assert len(list((tmp_path / "t").glob("*.safetensors"))) == 6


def test_interrupted_disk_capture_resumes_where_it_stopped(setup, tmp_path):
    alphas, answer, batches, calls = _disk_setup(setup)
    calls["fail_after"] = 4
    with pytest.raises(KeyboardInterrupt):
        TargetCache(draws=2, seed=1, directory=tmp_path, key={}).build(batches(), 6, answer, alphas,
                                                                        log=lambda s: None)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4 and not list(tmp_path.glob(".*.tmp"))
    calls["n"], calls["fail_after"] = 0, None
    resumed = TargetCache(draws=2, seed=1, directory=tmp_path, key={})
    resumed.build(batches(), 6, answer, alphas, log=lambda s: None)
    assert calls["n"] == 2 and resumed.reused_shards == 4 and len(resumed) == 12


def test_first_use_fill_computes_each_build_batch_once_with_the_upfront_values(setup):
    """`defer`: nothing up front; a step's entries fill their whole build batch (same batch, same noise as `build`,
    so bitwise the same targets); a batch is computed once per draw; `on_complete` runs once, when all are in."""
    teacher, unit_map, latents, context, added = setup
    alphas, answer, batches, calls = _disk_setup(setup)
    quiet = lambda s: None  # noqa: E731
    upfront = TargetCache(draws=2, seed=5)
    upfront.build(batches(), 6, answer, alphas, log=quiet)

    chunks = [[0, 1], [2, 3], [4, 5]]

    def load(entries):
        return list(entries), latents[entries], {"encoder_hidden_states": context[entries],
                                                 "added_cond_kwargs": {k: v[entries] for k, v in added.items()}}

    completed: list[int] = []
    lazy = TargetCache(draws=2, seed=5)
    calls["n"] = 0
    lazy.defer(chunks, load, answer, alphas, log=quiet, on_complete=lambda: completed.append(len(lazy)))
    assert len(lazy) == 0 and calls["n"] == 0
    got = lazy.targets([3, 0], 0, "cpu")  # a training batch that spans two build batches: both are computed
    assert calls["n"] == 2 and len(lazy) == 4
    want = upfront.targets([3, 0], 0, "cpu")
    assert torch.equal(got.prediction, want.prediction)
    for unit, (h_in, h_out) in want.pairs.items():
        assert torch.equal(h_out, got.pairs[unit][1])
        assert (h_in is None and got.pairs[unit][0] is None) or torch.equal(h_in, got.pairs[unit][0])
    lazy.targets([1, 2], 0, "cpu")
    assert calls["n"] == 2  # already in
    for draw in (0, 1):
        for chunk in chunks:
            lazy.targets(chunk, draw, "cpu")
    assert calls["n"] == 6 and completed == [12]
    for draw in (0, 1):
        a, b = lazy.targets([5, 4], draw, "cpu"), upfront.targets([5, 4], draw, "cpu")
        assert torch.equal(a.prediction, b.prediction)
    with pytest.raises(ValueError, match="in memory"):
        TargetCache(draws=1, seed=5, directory="somewhere").defer(chunks, load, answer, alphas, log=quiet)
