"""Peak memory per phase of a training run, printed at its end beside the estimate (issue 11: `--estimate`
within 15 % of the measured peak, and where the peak comes from when it is not).

On the CPU the peak is the process's resident set: Linux's high-water mark (VmHWM in /proc/self/status), reset
at each phase start by writing 5 to /proc/self/clear_refs, so each phase gets its own peak. Where that reset is
not available the lifetime peak (`resource.getrusage`) is shown, and a phase's peak is a running maximum. On CUDA
it is `torch.cuda.max_memory_allocated`, reset per phase too.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The resident set now (0 where /proc is not available)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def _lifetime_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Phase:
    name: str
    seconds: float
    peak: int  # bytes: resident (CPU) or allocated (CUDA) at the phase's highest
    after: int  # bytes when the phase ended


@dataclass
class MemoryTrace:
    """`mark(name)` closes the phase that ran since the last mark; `table()` lists them, the highest flagged."""

    device: torch.device
    phases: list[Phase] = field(default_factory=list)
    per_phase: bool = False  # whether each phase's peak is its own (the high-water mark could be reset)

    def __post_init__(self) -> None:
        self._start = time.perf_counter()
        self._running_peak = 0
        self.per_phase = self._reset()

    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def _reset(self) -> bool:
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return _reset_peak()

    def _measure(self) -> tuple[int, int]:
        if self._cuda():
            return torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
        now = rss_bytes()
        hwm = _status_kib("VmHWM")
        peak = hwm * 1024 if (self.per_phase and hwm is not None) else _lifetime_peak_bytes()
        return max(peak, now), now

    def mark(self, name: str) -> None:
        """Close the phase that ran since the last mark as `name`; a name seen before adds to that row (its seconds
        summed, its peak the higher), so the phases of a loop stay one row each."""
        peak, after = self._measure()
        now = time.perf_counter()
        seen = next((p for p in self.phases if p.name == name), None)
        if seen is None:
            self.phases.append(Phase(name, now - self._start, peak, after))
        else:
            seen.seconds += now - self._start
            seen.peak, seen.after = max(seen.peak, peak), after
        self._running_peak = max(self._running_peak, peak)
        self._start = now
        self._reset()

    def has(self, name: str) -> bool:
        return any(p.name == name for p in self.phases)

    @property
    def peak(self) -> int:
        return self._running_peak

    def table(self, estimate_bytes: float | None = None) -> str:
        """Markdown-ish lines: phase, seconds, peak, memory after; the highest phase marked; the estimate beside."""
        what = "CUDA allocated" if self._cuda() else "resident (RSS)"
        lines = [f"memory per phase ({what}; {'each phase its own peak' if self.per_phase else 'running peak'}):",
                 f"  {'phase':34s} {'seconds':>8s} {'peak GiB':>9s} {'after GiB':>10s}"]
        top = max(self.phases, key=lambda p: p.peak, default=None)
        for p in self.phases:
            flag = "  ← highest" if p is top else ""
            lines.append(f"  {p.name:34s} {p.seconds:8.1f} {p.peak / GIB:9.2f} {p.after / GIB:10.2f}{flag}")
        if estimate_bytes and top is not None:
            # what the process held before any model was loaded (Python, torch, the libraries): not in the estimate
            base = self.phases[0].after
            lines.append(f"  measured peak {self.peak / GIB:.2f} GiB vs estimate {estimate_bytes / GIB:.2f} GiB "
                         f"({self.peak / estimate_bytes - 1.0:+.0%}); {(self.peak - base) / GIB:.2f} GiB above the "
                         f"{base / GIB:.2f} GiB held before loading ({(self.peak - base) / estimate_bytes - 1.0:+.0%})")
        return "\n".join(lines)

