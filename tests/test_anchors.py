"""Per-unit statistics and zones, on formulas and on a constructed case whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from surge_helpers import perturbed_copy, restore_threads, tiny_probes, tiny_teacher, use_one_thread

from sd_scripts_surge.surge.anchors import (
    STATISTICS,
    UnitStats,
    UnitStatsAccumulator,
    ZoneRules,
    Zones,
    cosine_similarity,
    find_zones,
    jaccard,
    relative_difference,
)
from sd_scripts_surge.surge.capture import capture_flavor
from sd_scripts_surge.surge.units import mbw_unit_map

setup_module, teardown_module = use_one_thread, restore_threads
PERTURBED = ["IN05", "OUT03"]
UPSTREAM = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04"]


def test_formulas():
    t = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    s = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(relative_difference(t, s, eps=0.0), torch.tensor([16 / 25, 2.0], dtype=torch.float64))
    torch.testing.assert_close(cosine_similarity(t, s), torch.tensor([9 / 15, 0.0], dtype=torch.float64))
    torch.testing.assert_close(jaccard(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[3, 2, 9], [7, 8, 9]])),
                               torch.tensor([2 / 4, 0.0], dtype=torch.float64))


def collect(teacher, student, unit_map, probes, batch_size=4, num_seeds=None):
    acc = UnitStatsAccumulator(unit_map.names, num_seeds or probes.num_seeds)
    with torch.no_grad():
        for idx in probes.batches(batch_size):
            kwargs = probes.unet_kwargs(idx)
            _, ft = capture_flavor(teacher, unit_map, kwargs)
            _, fs = capture_flavor(student, unit_map, kwargs)
            acc.add(ft, fs, probes.seed_index[idx])
    return acc


@pytest.fixture(scope="module")
def case():
    teacher = tiny_teacher(0)
    unit_map = mbw_unit_map(teacher)
    student = perturbed_copy(teacher, unit_map, PERTURBED, scale=0.5, seed=0)
    probes = tiny_probes(num_conditions=2, timesteps=(200, 700), seeds=(0, 1, 2))  # 12 probes, K = 3
    return teacher, student, unit_map, probes


RULES = ZoneRules(slow_time_ratio=None)  # timing is machine noise in a test


def test_perturbed_units_are_the_high_difference_zone(case):
    teacher, student, unit_map, probes = case
    stats = collect(teacher, student, unit_map, probes).finalize()
    zones = find_zones(stats, RULES)
    assert sorted(zones.high_difference) == sorted(PERTURBED)
    assert set(UPSTREAM) <= set(zones.anchors)
    assert not set(PERTURBED) & set(zones.anchors)
    assert zones.slow == []
    rows = stats.as_dict()
    for u in UPSTREAM:
        assert rows[u]["d"] == 0.0 and rows[u]["cos"] == pytest.approx(1.0)
    for u in PERTURBED:
        assert rows[u]["d"] > 0.05 and rows[u]["d_std"] < 0.5 * rows[u]["d"]  # high and consistent across seeds
    # time shares are shares
    assert float(stats.time_share_student.sum()) == pytest.approx(1.0)


def test_zones_stable_across_seeds_and_reproducible(case):
    teacher, student, unit_map, probes = case
    per_seed = []
    for k in range(probes.num_seeds):
        subset = probes.subset([i for i in range(len(probes)) if int(probes.seed_index[i]) == k])
        per_seed.append(find_zones(collect(teacher, student, unit_map, subset).finalize(), RULES))
    assert all(sorted(z.high_difference) == sorted(PERTURBED) for z in per_seed)
    assert all(set(UPSTREAM) <= set(z.anchors) for z in per_seed)
    a = collect(teacher, student, unit_map, probes).finalize()
    b = collect(teacher, student, unit_map, probes).finalize()
    assert torch.equal(a.d, b.d) and torch.equal(a.cos, b.cos) and torch.equal(a.jaccard, b.jaccard)
    assert find_zones(a, RULES) == find_zones(b, RULES)


def test_accumulator_sums_like_an_all_reduce(case):
    teacher, student, unit_map, probes = case
    half = len(probes) // 2
    first = collect(teacher, student, unit_map, probes.subset(range(half)), num_seeds=3)
    second = collect(teacher, student, unit_map, probes.subset(range(half, len(probes))), num_seeds=3)
    whole = collect(teacher, student, unit_map, probes)
    timeless = [i for i, name in enumerate(STATISTICS) if not name.startswith("time")]
    # (batches are grouped differently, so float32 forwards differ in the last bits)
    torch.testing.assert_close((first.sums + second.sums)[timeless], whole.sums[timeless], rtol=1e-5, atol=1e-6)
    # a seed without probes is NaN, not zero
    only_seed0 = collect(teacher, student, unit_map, probes.subset(range(4)), num_seeds=3).finalize()
    assert math.isnan(float(only_seed0.d[0, 1])) and not math.isnan(float(only_seed0.d[0, 0]))


def synthetic(d, cos=None, jac=None, time_t=None, time_s=None) -> UnitStats:
    d = torch.tensor(d, dtype=torch.float64)
    n = d.shape[0]
    return UnitStats([f"u{i}" for i in range(n)], d, torch.zeros_like(d),
                     torch.tensor(cos, dtype=torch.float64) if cos is not None else torch.ones_like(d),
                     torch.tensor(jac, dtype=torch.float64) if jac is not None else torch.ones_like(d),
                     torch.tensor(time_t or [1 / n] * n, dtype=torch.float64),
                     torch.tensor(time_s or [1 / n] * n, dtype=torch.float64))


def test_zone_rules_on_synthetic_stats():
    stats = synthetic(d=[[0.0, 0.0], [1.0, 0.1], [0.9, 0.5], [0.01, 0.01]],
                      cos=[[1, 1], [0.5, 0.9], [0.7, 0.7], [0.99, 0.97]],
                      jac=[[1, 0.2], [0.5, 0.5], [0.5, 0.5], [0.9, 0.9]],
                      time_t=[0.25, 0.25, 0.25, 0.25], time_s=[0.1, 0.1, 0.1, 0.7])
    zones = find_zones(stats, ZoneRules(anchor_cos=0.95, anchor_jaccard=0.5, high_ratio=1.5, slow_cv=0.5,
                                        slow_time_ratio=2.0))
    assert zones.anchors == ["u3"]  # u0 is similar but its top-k channels are unstable in seed 1
    assert zones.high_difference == ["u2"]  # u1 is high in one seed only
    assert zones.slow == ["u1", "u3"]  # u1: inconsistent across seeds; u3: time share 0.7 vs 0.25
    tiny_unit = synthetic(d=[[0.1, 0.1]] * 4, time_t=[0.1, 0.3, 0.3, 0.3], time_s=[0.5, 0.2, 0.2, 0.1])
    assert find_zones(tiny_unit, ZoneRules(slow_time_ratio=2.0)).slow == []  # 0.1 < half an even share


def test_no_evidence_no_zones():
    identical = synthetic(d=[[0.0, 0.0], [1e-12, 1e-12], [0.0, 0.0]])
    zones = find_zones(identical, RULES)
    assert zones.high_difference == [] and zones.slow == []  # float noise is not a difference
    assert zones.anchors == ["u0", "u1", "u2"]
    unseen = synthetic(d=[[float("nan")], [float("nan")]], cos=[[float("nan")], [float("nan")]])
    assert find_zones(unseen, RULES) == Zones()
