"""Two gloo processes see different probes; after the all-reduce both derive the same zones and multipliers."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sd_scripts_surge.surge.anchors import UnitStatsAccumulator, ZoneRules, find_zones
from sd_scripts_surge.surge.capture import CaptureOptions, capture_flavor
from sd_scripts_surge.surge.controller import ControllerConfig, UnitLRController
from sd_scripts_surge.surge.units import UnitMap, hop_distances, mbw_unit_map

RULES = ZoneRules(slow_time_ratio=None)
OPTIONS = CaptureOptions(head_stats=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_flavors() -> tuple[UnitMap, list]:
    """Teacher and student flavors for 4 probes over 2 seeds (computed once, in the parent process)."""
    from surge_helpers import perturbed_copy, tiny_probes, tiny_teacher

    teacher = tiny_teacher(0)
    unit_map = mbw_unit_map(teacher)
    student = perturbed_copy(teacher, unit_map, ["IN05", "OUT03"])
    probes = tiny_probes(num_conditions=1, timesteps=(200, 700), seeds=(0, 1))
    flavors = []
    with torch.no_grad():
        for i in range(len(probes)):
            kwargs = probes.unet_kwargs([i])
            flavors.append((capture_flavor(teacher, unit_map, kwargs, OPTIONS)[1],
                            capture_flavor(student, unit_map, kwargs, OPTIONS)[1], probes.seed_index[[i]]))
    return unit_map, flavors


def multipliers_from(unit_map: UnitMap, flavors: list, all_reduce: bool) -> tuple[dict, list, dict]:
    acc = UnitStatsAccumulator(unit_map.names, num_seeds=2)
    for ft, fs, seeds in flavors:
        acc.add(ft, fs, seeds)
    if all_reduce:
        acc.all_reduce()
    stats = acc.finalize()
    zones = find_zones(stats, RULES)
    ctl = UnitLRController(unit_map, hop_distances(unit_map), ControllerConfig(shock_rate=3.0))
    ctl.update(dict(zip(unit_map.names, stats.d_mean.tolist())), zones.anchors, zones.slow)
    for _ in range(2):
        ctl.step()
    return ctl.multipliers(), zones.anchors, ctl.offsets


def worker(rank: int, world: int, port: int, unit_map: UnitMap, flavors: list, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = multipliers_from(unit_map, flavors[rank::world], all_reduce=True)  # different probes
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~14 s: two spawned processes import torch
@pytest.mark.multiprocess
def test_two_ranks_agree_on_multipliers():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unit_map, flavors = probe_flavors()
    finally:
        torch.set_num_threads(threads)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(2, free_port(), unit_map, flavors, results), nprocs=2, join=True)
    (m0, a0, o0), (m1, a1, o1) = results[0], results[1]
    assert m0 == m1 and a0 == a1 and o0 == o1  # exactly equal on both ranks
    assert len(set(m0.values())) > 1  # not trivially all 1.0
    # and they equal what one process computes from all probes (up to float summation order)
    single, anchors, _ = multipliers_from(unit_map, flavors, all_reduce=False)
    assert anchors == a0
    for unit, value in single.items():
        assert m0[unit] == pytest.approx(value, rel=1e-9)


def cache_worker(rank: int, world: int, port: int, directory: str, results) -> None:
    from surge_helpers import tiny_probes, tiny_teacher

    from sd_scripts_surge.surge.flavors import build_or_load_flavors, make_cache_key

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        teacher = tiny_teacher(0)
        unit_map = mbw_unit_map(teacher)
        probes = tiny_probes(num_conditions=1, timesteps=(300,), seeds=(0, 1))
        calls = []
        teacher.register_forward_pre_hook(lambda *a: calls.append(1))
        key = make_cache_key(teacher, probes, unit_map, torch.float32, OPTIONS)
        store = build_or_load_flavors(directory, teacher, unit_map, probes, key, batch_size=1, options=OPTIONS,
                                      estimate=False, log=lambda *a: None)
        results[rank] = (len(calls), store.load(1).units["OUT03"].output.sum().item())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~14 s: two spawned processes import torch and diffusers
@pytest.mark.multiprocess
def test_flavor_cache_is_built_once_under_ddp(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(cache_worker, args=(2, free_port(), str(tmp_path), results), nprocs=2, join=True)
    assert results[0][0] == 2 and results[1][0] == 0  # rank 0 captured both batches, rank 1 only read them
    assert results[0][1] == results[1][1]
