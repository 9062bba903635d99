"""The unit the trainer scores: right-padded token sequences with a loss mask, from either source.

Dataset examples (off-policy) become prompt + reference response; student rollouts
(:class:`~nemo_opd.rollout.RolloutBatch`) keep their tokens, loss mask and the engine's
log-probs (with their kind, for the trainer's importance correction).
Both end up as a :class:`SequenceBatch`, so everything downstream is source-agnostic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from nemo_opd.data.source import Example
from nemo_opd.rollout.engine import LogprobKind, RolloutBatch

__all__ = ["SOURCES", "SequenceBatch"]

SOURCES = ("dataset", "rollout", "replay")


@dataclasses.dataclass
class SequenceBatch:
    """``B`` sequences right-padded to ``T``."""

    tokens: torch.Tensor
    """``[B, T]`` int64 token ids (``pad_id`` past ``lengths``)."""
    loss_mask: torch.Tensor
    """``[B, T]`` bool: tokens that carry loss (their *prediction* is scored, i.e. the logits at
    position ``t − 1``)."""
    lengths: torch.Tensor
    """``[B]`` int64 valid tokens per row."""
    prompt_lengths: torch.Tensor
    """``[B]`` int64 prompt tokens per row."""
    source: str
    """One of :data:`SOURCES`."""
    rollout_logprobs: torch.Tensor | None = None
    """``[B, T]`` float32 log-probs the engine recorded for the tokens when it generated them
    (the behaviour policy ``log μ``; rollouts and replayed rollouts; placeholders 0 at prompt
    and padding positions), else None."""
    rollout_logprob_kind: LogprobKind | None = None
    """Which distribution :attr:`rollout_logprobs` are under (``"sampling"`` or ``"raw"``,
    :data:`~nemo_opd.rollout.LogprobKind`); None when unknown (no log-probs, or replayed rows
    stored before the kind was recorded: the trainer then assumes its sampling config's)."""
    example_indices: tuple[int, ...] = ()
    """Dataset row of each sequence (dataset source only: the teacher-cache key)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"SequenceBatch.source must be one of {SOURCES}, got {self.source!r}")
        if self.tokens.dim() != 2 or self.loss_mask.shape != self.tokens.shape:
            raise ValueError(f"SequenceBatch.tokens [B, T] and loss_mask must agree, got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.loss_mask.shape)}")
        if self.rollout_logprobs is not None and self.rollout_logprobs.shape != self.tokens.shape:
            raise ValueError(f"SequenceBatch.rollout_logprobs must have the tokens' shape "
                             f"{tuple(self.tokens.shape)}, got "
                             f"{tuple(self.rollout_logprobs.shape)}")
        if self.rollout_logprob_kind not in (None, "sampling", "raw"):
            raise ValueError(f"SequenceBatch.rollout_logprob_kind must be 'sampling', 'raw' or "
                             f"None, got {self.rollout_logprob_kind!r}")

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @classmethod
    def from_examples(cls, examples: Sequence[Example], pad_id: int) -> SequenceBatch:
        """Prompt + reference response per example; loss on the response tokens."""
        if any(not e.response_ids for e in examples):
            raise ValueError("off-policy batch needs reference responses; examples "
                             f"{[e.index for e in examples if not e.response_ids]} have none")
        rows = [list(e.prompt_ids) + list(e.response_ids) for e in examples]
        width = max(map(len, rows))
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (row, e) in enumerate(zip(rows, examples, strict=True)):
            tokens[r, :len(row)] = torch.tensor(row)
            loss_mask[r, len(e.prompt_ids):len(row)] = True
        return cls(tokens, loss_mask,
                   torch.tensor([len(r) for r in rows], dtype=torch.int64),
                   torch.tensor([len(e.prompt_ids) for e in examples], dtype=torch.int64),
                   "dataset", example_indices=tuple(e.index for e in examples))

    @classmethod
    def from_rollout(cls, rollout: RolloutBatch) -> SequenceBatch:
        """A rollout batch, with the loss mask the engine set."""
        return cls(rollout.tokens, rollout.loss_mask.clone(), rollout.lengths,
                   rollout.prompt_lengths, "rollout", rollout_logprobs=rollout.logprobs,
                   rollout_logprob_kind=rollout.logprob_kind)

    def rows(self) -> list[dict[str, Any]]:
        """Per-sequence plain lists (unpadded): what the replay buffer stores and checkpoints."""
        out = []
        for r in range(self.tokens.shape[0]):
            n = int(self.lengths[r])
            out.append({"tokens": self.tokens[r, :n].tolist(),
                        "loss_mask": self.loss_mask[r, :n].tolist(),
                        "prompt_length": int(self.prompt_lengths[r]),
                        "logprobs": (None if self.rollout_logprobs is None
                                     else self.rollout_logprobs[r, :n].tolist()),
                        "logprob_kind": self.rollout_logprob_kind})
        return out

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], pad_id: int, source: str) -> SequenceBatch:
        """Inverse of :meth:`rows` (re-padded). Rows without a ``"logprob_kind"`` (stored by an
        older version) give kind None; rows of different kinds raise ``ValueError``."""
        width = max(len(r["tokens"]) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        has_logprobs = all(r["logprobs"] is not None for r in rows)
        kinds = {r.get("logprob_kind") for r in rows} if has_logprobs else {None}
        if len(kinds) > 1:
            raise ValueError(f"rows hold log-probs of different kinds {sorted(map(str, kinds))}; "
                             "one batch must have one kind")
        logprobs = torch.zeros(len(rows), width) if has_logprobs else None
        for i, r in enumerate(rows):
            n = len(r["tokens"])
            tokens[i, :n] = torch.tensor(r["tokens"])
            loss_mask[i, :n] = torch.tensor(r["loss_mask"])
            if logprobs is not None:
                logprobs[i, :n] = torch.tensor(r["logprobs"])
        return cls(tokens, loss_mask, torch.tensor([len(r["tokens"]) for r in rows]),
                   torch.tensor([r["prompt_length"] for r in rows]), source,
                   rollout_logprobs=logprobs, rollout_logprob_kind=kinds.pop())
