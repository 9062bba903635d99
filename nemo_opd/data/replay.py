"""A bounded buffer of past student rollouts (the ``replay_buffer`` strategy), saveable.

Sequences are kept as plain lists (:meth:`SequenceBatch.rows`), oldest evicted first; samples are
drawn without replacement by a generator keyed on ``(seed, step, micro_batch)``, so replays
repeat exactly after a resume given the restored contents.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from nemo_opd.data.batch import SequenceBatch
from nemo_opd.data.mixing import step_rng

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    """At most ``capacity`` rollout sequences."""

    def __init__(self, capacity: int, *, seed: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self._rows: deque[dict[str, Any]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, batch: SequenceBatch) -> None:
        """Append every sequence of ``batch`` (rollouts only)."""
        if batch.source != "rollout":
            raise ValueError(f"only fresh rollouts enter the replay buffer, got {batch.source!r}")
        self._rows.extend(batch.rows())

    def sample(self, size: int, pad_id: int, *, step: int, micro_batch: int = 0
               ) -> SequenceBatch | None:
        """``size`` distinct stored sequences as a ``"replay"`` batch, or None if too few."""
        if len(self._rows) < size:
            return None
        picks = step_rng(self.seed, step, micro_batch, "replay").sample(range(len(self._rows)),
                                                                       size)
        return SequenceBatch.from_rows([self._rows[i] for i in picks], pad_id, "replay")

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "rows": list(self._rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"replay buffer checkpoint has capacity {state['capacity']}, the "
                             f"run asks for {self.capacity}")
        self._rows = deque(state["rows"], maxlen=self.capacity)
