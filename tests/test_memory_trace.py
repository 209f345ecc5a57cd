"""MemoryTrace: each phase's own peak resident set (Linux high-water mark reset), rows merged by name."""

from __future__ import annotations

import torch

from sd_scripts_surge.training.memory_trace import GIB, MemoryTrace, rss_bytes


def test_each_phase_gets_its_own_peak_and_loops_merge_into_one_row():
    trace = MemoryTrace(torch.device("cpu"))
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    big += 1
    del big
    trace.mark("big")
    small = torch.ones(1024)
    trace.mark("small")
    trace.mark("loop")
    trace.mark("loop")
    del small
    names = [p.name for p in trace.phases]
    assert names == ["big", "small", "loop"]
    big_row, small_row = trace.phases[0], trace.phases[1]
    assert big_row.peak >= big_row.after + 60 * 2**20  # the 64 MiB were resident during the phase, gone after it
    if trace.per_phase:  # the high-water mark could be reset (Linux): the next phase does not inherit the peak
        assert small_row.peak < big_row.peak - 60 * 2**20
    else:
        assert small_row.peak >= big_row.peak
    assert trace.peak == max(p.peak for p in trace.phases)
    assert rss_bytes() > 0


def test_table_flags_the_highest_phase_and_compares_with_the_estimate():
    trace = MemoryTrace(torch.device("cpu"))
    trace.mark("start")
    trace.mark("work")
    text = trace.table(estimate_bytes=0.5 * GIB)
    assert "start" in text and "work" in text and "← highest" in text
    assert "vs estimate 0.50 GiB" in text and "held before loading" in text
    assert "vs estimate" not in trace.table(None)
