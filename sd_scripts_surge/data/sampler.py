"""Bucket batch sampler: same-bucket batches in an order fixed by (seed, epoch), split across ranks."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence

from sd_scripts_surge.data.errors import DataError
from sd_scripts_surge.data.seeding import stable_rng


# ------------------------------------------------------------------------------------------------ sampler
class BucketBatchSampler:
    """Batches of entries from one group (dataset, bucket), in an order fixed by (seed, epoch).

    Iterating yields the rest of the current epoch from `position`, counting a batch as consumed when it is
    handed out; at the end the epoch advances. With several processes each rank takes every world_size-th
    batch of the same list (the list is cut to a multiple of world_size, so all ranks step together).
    """

    def __init__(self, groups: Sequence[Hashable], batch_size: int | Mapping[Hashable, int], seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if not groups:
            raise DataError("the sampler got no entries: the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def _size_of(self, group: Hashable) -> int:
        size = self.batch_size[group] if isinstance(self.batch_size, Mapping) else self.batch_size
        if size < 1:
            raise ValueError(f"batch size for {group!r} must be ≥ 1")
        return size

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of `epoch` (default: the current one) over all ranks, in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = stable_rng("batches", self.seed, epoch)
        by_group: dict[Hashable, list[int]] = {}
        for index, group in enumerate(self.groups):
            by_group.setdefault(group, []).append(index)
        batches = []
        for group in sorted(by_group, key=repr):
            indices = by_group[group]
            if self.shuffle:
                rng.shuffle(indices)
            size = self._size_of(group)
            batches += [indices[i:i + size] for i in range(0, len(indices), size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of `epoch`."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            batches = self.all_batches(epoch)
            while len(batches) < self.world_size:  # tiny datasets: every rank still gets a batch
                batches += batches[: self.world_size - len(batches)]
            usable = len(batches) // self.world_size * self.world_size
            self._cache = (epoch, batches[self.rank:usable:self.world_size])
        return self._cache[1]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.rank_batches())

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield list(batch)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "entries": len(self.groups),
                "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("entries", len(self.groups))) != len(self.groups):
            raise DataError(f"cannot resume the data position: the saved run had {state['entries']} dataset entries, "
                            f"this one has {len(self.groups)} (images were added or removed)")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise DataError(f"cannot resume the data position: saved with {state['world_size']} processes, "
                            f"now {self.world_size}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.position = int(state.get("position", 0))  # states saved before positions were recorded: 0


