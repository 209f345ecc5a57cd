"""Per-unit teacher/student statistics across K seeds, and the zones derived from them (DESIGN §3 B–C).

Statistics per unit l and seed k (means over that seed's probes):
- relative difference d = ‖h_T − h_S‖² / (‖h_T‖² + ε) of the unit outputs;
- cosine similarity of the flattened outputs;
- Jaccard overlap of the teacher's and the student's top-k channel sets;
- wall time through the unit (teacher and student), turned into time shares.

They are kept as sums + counts (`UnitStatsAccumulator`) so that processes can all-reduce them before
anything is decided: every rank then derives the same zones and the same multipliers.

Zones (`find_zones`):
- anchors: in every seed, cosine ≥ `anchor_cos` and Jaccard ≥ `anchor_jaccard` (similar *and* stable);
- high-difference: in every seed, the unit's *excess* difference max(d_l − d_in,l, 0) (d_in = the same measure
  on the unit's input; the part of the difference born in this unit rather than inherited from upstream)
  ≥ `high_ratio` × (mean excess over units in that seed) — consistently high where it originates;
- slow: the difference is inconsistent across seeds (std_k d / mean_k d ≥ `slow_cv`, for units whose mean d
  is at least `slow_min_ratio` × the unit mean, so numerical noise on near-identical units does not count), or
  the student's time share is more than `slow_time_ratio` × the teacher's for that unit (judged only for units
  whose teacher time share is at least half an even share: tiny units are timing noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd_scripts_surge.surge.capture import Flavor

EPS = 1e-12
STATISTICS = ("d", "d_in", "cos", "jaccard", "count", "time_t", "time_s")


# ------------------------------------------------------------------------------------------ pure formulas


def relative_difference(h_t: torch.Tensor, h_s: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per sample: ‖h_T − h_S‖² / (‖h_T‖² + ε), float64, shape (B,)."""
    t = h_t.detach().double().flatten(1)
    s = h_s.detach().double().to(t.device).flatten(1)
    return (t - s).pow(2).sum(1) / (t.pow(2).sum(1) + eps)


def cosine_similarity(h_t: torch.Tensor, h_s: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per sample cosine of the flattened tensors, float64, shape (B,)."""
    t = h_t.detach().double().flatten(1)
    s = h_s.detach().double().to(t.device).flatten(1)
    return (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1)).clamp_min(eps)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row |A ∩ B| / |A ∪ B| of two (B, k) index sets, float64."""
    out = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        sa, sb = set(ra), set(rb)
        out.append(len(sa & sb) / max(1, len(sa | sb)))
    return torch.tensor(out, dtype=torch.float64)


# -------------------------------------------------------------------------------------------- statistics


@dataclass
class UnitStats:
    """Per unit (rows, in unit-map order) and seed (columns) means; NaN where a seed had no probes."""

    units: list[str]
    d: torch.Tensor  # (L, K)
    d_in: torch.Tensor  # (L, K) the same measure on the unit inputs (0 where not recorded)
    cos: torch.Tensor  # (L, K)
    jaccard: torch.Tensor  # (L, K)
    time_share_teacher: torch.Tensor  # (L,)
    time_share_student: torch.Tensor  # (L,)

    @property
    def d_mean(self) -> torch.Tensor:
        return self.d.nanmean(dim=1)

    @property
    def excess(self) -> torch.Tensor:
        """(L, K) difference the unit adds to what it received: max(d − d_in, 0)."""
        return (self.d - self.d_in).clamp_min(0)

    @property
    def d_std(self) -> torch.Tensor:
        """Population std of d over the seeds that have probes."""
        mean = self.d_mean.unsqueeze(1)
        return ((self.d - mean) ** 2).nanmean(dim=1).sqrt()

    def as_dict(self) -> dict[str, dict[str, float]]:
        rows = {}
        for i, u in enumerate(self.units):
            rows[u] = {"d": float(self.d_mean[i]), "d_std": float(self.d_std[i]),
                       "excess": float(self.excess[i].nanmean()),
                       "cos": float(self.cos[i].nanmean()), "jaccard": float(self.jaccard[i].nanmean()),
                       "time_share_teacher": float(self.time_share_teacher[i]),
                       "time_share_student": float(self.time_share_student[i])}
        return rows


class UnitStatsAccumulator:
    """Sums of the per-probe statistics, per unit and seed; `all_reduce()` before `finalize()` under DDP."""

    def __init__(self, units: list[str], num_seeds: int) -> None:
        self.units = list(units)
        self.num_seeds = num_seeds
        self.sums = torch.zeros(len(STATISTICS), len(units), num_seeds, dtype=torch.float64)

    def add(self, teacher: Flavor, student: Flavor, seed_index: torch.Tensor) -> None:
        """Add one probe batch: teacher and student flavors of the same probes; seed_index (B,)."""
        seeds = seed_index.long().cpu()
        batch = float(seeds.numel())
        for i, unit in enumerate(self.units):
            ft, fs = teacher.units[unit], student.units[unit]
            if ft.output.shape != fs.output.shape:
                raise ValueError(f"unit {unit}: teacher flavor shape {tuple(ft.output.shape)} != student "
                                 f"{tuple(fs.output.shape)}; were both captured with the same flavor_resolution?")
            per_probe = {
                "d": relative_difference(ft.output, fs.output).cpu(),
                "d_in": _input_difference(ft.input, fs.input, seeds.numel()),
                "cos": cosine_similarity(ft.output, fs.output).cpu(),
                "jaccard": jaccard(ft.topk, fs.topk),
                "count": torch.ones(seeds.numel(), dtype=torch.float64),
                # unit times are per batch: spread them evenly over its probes
                "time_t": torch.full((seeds.numel(),), _finite(ft.time_s) / batch, dtype=torch.float64),
                "time_s": torch.full((seeds.numel(),), _finite(fs.time_s) / batch, dtype=torch.float64),
            }
            for j, name in enumerate(STATISTICS):
                self.sums[j, i].index_add_(0, seeds, per_probe[name])

    def all_reduce(self) -> None:
        """Sum the statistics over all processes (no-op without an initialised torch.distributed)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            nccl = dist.get_backend() == "nccl"
            buf = self.sums.to(torch.device("cuda", torch.cuda.current_device())) if nccl else self.sums
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            self.sums = buf.cpu()

    def finalize(self) -> UnitStats:
        count = self.sums[STATISTICS.index("count")]
        safe = count.clamp_min(1)

        def mean(name: str) -> torch.Tensor:
            m = self.sums[STATISTICS.index(name)] / safe
            return torch.where(count > 0, m, torch.full_like(m, float("nan")))

        def share(name: str) -> torch.Tensor:
            total = self.sums[STATISTICS.index(name)].sum(dim=1)
            return total / total.sum().clamp_min(EPS)

        return UnitStats(self.units, mean("d"), mean("d_in"), mean("cos"), mean("jaccard"), share("time_t"),
                         share("time_s"))


def _input_difference(t_in: torch.Tensor | None, s_in: torch.Tensor | None, n: int) -> torch.Tensor:
    if t_in is None or s_in is None or t_in.shape != s_in.shape:
        return torch.zeros(n, dtype=torch.float64)
    return relative_difference(t_in, s_in).cpu()


def _finite(x: float) -> float:
    return x if x == x and abs(x) != float("inf") else 0.0


# ------------------------------------------------------------------------------------------------- zones


@dataclass(frozen=True)
class ZoneRules:
    anchor_cos: float = 0.98
    anchor_jaccard: float = 0.5
    high_ratio: float = 2.0
    slow_cv: float = 0.5
    slow_min_ratio: float = 0.1
    slow_time_ratio: float | None = 2.0  # None: ignore timing (e.g. in reproducibility tests)
    min_difference: float = 1e-6  # excess below this (float noise) never makes a unit high-difference


@dataclass
class Zones:
    anchors: list[str] = field(default_factory=list)
    high_difference: list[str] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)


def find_zones(stats: UnitStats, rules: ZoneRules | None = None) -> Zones:
    """Anchors, high-difference and slow zones from seed-resolved statistics (see module docstring)."""
    rules = rules or ZoneRules()
    seeds_seen = ~torch.isnan(stats.d[0]) if stats.d.numel() else torch.zeros(0, dtype=torch.bool)
    if not bool(seeds_seen.any()):
        return Zones()  # no probes at all: no evidence for any zone
    cos = stats.cos[:, seeds_seen]
    jac = stats.jaccard[:, seeds_seen]
    excess = stats.excess[:, seeds_seen]
    excess_seed_mean = excess.mean(dim=0).clamp_min(EPS)  # mean over units, per seed
    unit_mean = stats.d_mean
    overall = unit_mean.mean().clamp_min(EPS)
    cv = stats.d_std / unit_mean.clamp_min(EPS)
    zones = Zones()
    for i, unit in enumerate(stats.units):
        if bool((cos[i] >= rules.anchor_cos).all()) and bool((jac[i] >= rules.anchor_jaccard).all()):
            zones.anchors.append(unit)
        threshold = torch.clamp(rules.high_ratio * excess_seed_mean, min=rules.min_difference)
        if bool((excess[i] >= threshold).all()):
            zones.high_difference.append(unit)
        inconsistent = bool(cv[i] >= rules.slow_cv) and bool(unit_mean[i] >= rules.slow_min_ratio * overall)
        slow_time = False
        if rules.slow_time_ratio is not None:
            t_share, s_share = float(stats.time_share_teacher[i]), float(stats.time_share_student[i])
            # units too small to time reliably (share < half an even share) are not judged by their time
            slow_time = t_share >= 0.5 / len(stats.units) and s_share > rules.slow_time_ratio * t_share
        if inconsistent or slow_time:
            zones.slow.append(unit)
    return zones
