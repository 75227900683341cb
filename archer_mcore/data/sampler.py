"""A deterministic, resumable sampler over dataset indices.

Epoch e visits every index once, in the order of a permutation seeded by (seed, e)
(or in order when shuffle is off). `state_dict()` records (epoch, position); a
sampler restored with `load_state_dict` continues with exactly the indices the
original would have produced next.
"""

from __future__ import annotations

import random
from typing import Any


class EpochSampler:
    """Yields dataset indices epoch after epoch; `next_batch(k)` crosses epochs freely."""

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_items < 1:
            raise ValueError(f"EpochSampler needs at least one item, got num_items={num_items}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        if self.shuffle:
            random.Random(f"archer-sampler:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> EpochSampler:
        return self

    def __next__(self) -> int:
        if self.position == self.num_items:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index

    def next_batch(self, batch_size: int) -> list[int]:
        """The next `batch_size` indices (wrapping into the next epoch if needed)."""
        return [next(self) for _ in range(batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; the dataset size, seed and shuffle flag must match the saved ones."""
        for key in ("seed", "num_items", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state mismatch: saved {key}={state.get(key)!r}, "
                    f"this sampler has {key}={getattr(self, key)!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self.num_items or epoch < 0:
            raise ValueError(f"sampler state out of range: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)
