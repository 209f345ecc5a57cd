"""Every random choice of the data pipeline is keyed by its parts (seed, epoch, entry), never a global RNG,
so a resumed run or another rank makes the same choice."""

from __future__ import annotations

import random


def stable_rng(*parts: object) -> random.Random:
    """A generator seeded by the parts joined as a string (str seeds hash with sha512: the same in every process)."""
    return random.Random(":".join(str(p) for p in parts))
