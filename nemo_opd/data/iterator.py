"""Deterministic, resumable batches of examples for one data-parallel rank.

Each epoch visits every example once in an order drawn from ``(seed, epoch)`` alone, so the
order does not depend on how many batches were taken before a restart; :meth:`state_dict` is just
``(epoch, position)``. A global batch of ``batch_size × dp_size`` examples is taken, and rank
``dp_rank`` keeps its contiguous slice; an epoch's tail shorter than a global batch is skipped
(every batch has the same size, as gradient normalisation assumes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["EpochBatches"]

T = TypeVar("T")


class EpochBatches:
    """Endless seeded batches over ``items`` with a saveable position."""

    def __init__(self, items: Sequence[T], batch_size: int, *, seed: int, shuffle: bool = True,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        if batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                             f"{batch_size}, {dp_rank}, {dp_size}")
        if len(items) < batch_size * dp_size:
            raise ValueError(f"{len(items)} examples cannot fill one global batch of "
                             f"micro_batch_size {batch_size} x data-parallel size {dp_size}")
        self.items, self.batch_size, self.seed, self.shuffle = items, batch_size, seed, shuffle
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(f"{self.seed}/epoch/{self.epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[T]:
        """This rank's next ``batch_size`` items."""
        global_size = self.batch_size * self.dp_size
        if self.position + global_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        start = self.position + self.dp_rank * self.batch_size
        self.position += global_size
        return [self.items[i] for i in self._order[start:start + self.batch_size]]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()
