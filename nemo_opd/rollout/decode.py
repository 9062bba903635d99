"""The per-row decoding state the in-process engines (megatron, Hugging Face) share.

Both engines run the same scheme: prefill to the shortest context, then one position per step;
a row feeds its own context token while it lasts and samples once past it; a row ends on a stop
id or when its budget (``max_new_tokens``, capped by the model's positions) is written. How the
logits of a step are computed (KV cache, slots, shared prefill) is the engine's own; what happens
to them is :meth:`RowDecoder.step`, so both engines draw the same tokens from the same logits.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, SamplingParams
from nemo_opd.rollout.sampling import sample_tokens

__all__ = ["RowDecoder", "expand_rows", "rollout_batch"]


@dataclasses.dataclass
class RowDecoder:
    """Tokens, log-probs and stop state of ``R`` rows being decoded (all ``[R]`` or ``[R, T]``)."""

    context_lengths: torch.Tensor
    budget: torch.Tensor
    """New tokens each row may write."""
    tokens: torch.Tensor
    """``[R, T]`` contexts, then what is written; right padding ``pad_id``."""
    logprobs: torch.Tensor
    stop: torch.Tensor
    stopped: torch.Tensor
    done: torch.Tensor
    written: torch.Tensor
    generator: torch.Generator
    kind: LogprobKind

    @classmethod
    def start(cls, contexts: list[list[int]], prefix_stopped: torch.Tensor,
              params: SamplingParams, stop_ids: list[int], seed: int, *, pad_id: int,
              max_sequence_length: int, device: torch.device) -> RowDecoder:
        """Rows continuing ``contexts``; rows flagged in ``prefix_stopped`` (a forced prefix that
        ends with a stop id) are complete already. Sampling draws from a generator seeded
        ``seed``."""
        rows = len(contexts)
        context_lengths = torch.tensor([len(c) for c in contexts], device=device)
        budget = (max_sequence_length - context_lengths).clamp(max=params.max_new_tokens)
        total = int((context_lengths + budget).max())
        tokens = torch.full((rows, total), pad_id, dtype=torch.int64, device=device)
        for r, context in enumerate(contexts):
            tokens[r, :len(context)] = torch.tensor(context, dtype=torch.int64)
        stopped = prefix_stopped.clone()
        return cls(context_lengths=context_lengths, budget=budget, tokens=tokens,
                   logprobs=torch.zeros(rows, total, dtype=torch.float32, device=device),
                   stop=torch.tensor(stop_ids, dtype=torch.int64, device=device),
                   stopped=stopped, done=stopped.clone(),
                   written=torch.zeros(rows, dtype=torch.int64, device=device),
                   generator=torch.Generator(device=device).manual_seed(seed),
                   kind="raw" if params.greedy else params.logprobs)

    @property
    def total(self) -> int:
        """Positions per row (longest context + its budget)."""
        return self.tokens.shape[1]

    def step(self, logits: torch.Tensor, live: torch.Tensor, position: int,
             params: SamplingParams) -> None:
        """Consume ``logits`` ``[k, V]`` predicting ``position`` for rows ``live`` ``[k]`` (in
        order): rows past their context sample a token there (stop ids banned while fewer than
        ``min_new_tokens`` are written), others keep their context token."""
        generating = self.context_lengths[live] <= position
        if not generating.all():  # some rows still feed their context: leave them out
            if not generating.any():
                return
            live, logits = live[generating], logits[generating]
        banned = None
        if params.min_new_tokens and self.stop.numel():
            early = self.written[live] < params.min_new_tokens
            if early.any():
                stop_ids = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                stop_ids[self.stop] = True
                banned = early[:, None] & stop_ids[None, :]
        drawn = sample_tokens(logits, params, banned=banned, generator=self.generator)
        self.tokens[live, position] = drawn.tokens
        self.logprobs[live, position] = drawn.logprobs
        written = self.written[live] + 1
        self.written[live] = written
        hit_stop = torch.isin(drawn.tokens, self.stop)
        self.stopped[live] = hit_stop
        self.done[live] = hit_stop | (written >= self.budget[live])

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              LogprobKind]:
        """Tokens and log-probs cut to the longest row, lengths, stopped, the log-prob kind."""
        lengths = self.context_lengths + self.written
        width = int(lengths.max())
        return (self.tokens[:, :width], self.logprobs[:, :width], lengths, self.stopped,
                self.kind)


Rows = list[tuple[list[int], list[int]]]
"""(prompt, forced prefix) per row, ``prompt_index * n + sample_index``."""


def expand_rows(prompts: list[list[int]], prefixes: list[list[int]], params: SamplingParams,
                eos_id: int | None, device: torch.device) -> tuple[Rows, list[int], torch.Tensor]:
    """The rows of a call (``params.n`` per prompt), its stop ids (the call's and EOS) and which
    rows are complete before any token is written (a forced prefix ending with a stop id)."""
    stop_ids = sorted(set(params.stop_token_ids) | ({eos_id} - {None}))
    rows = [(list(p), q) for p, q in zip(prompts, prefixes, strict=True) for _ in range(params.n)]
    prefix_stopped = torch.tensor([bool(q) and q[-1] in stop_ids for _, q in rows],
                                  device=device)
    return rows, stop_ids, prefix_stopped


def rollout_batch(rows: Rows, result: tuple, params: SamplingParams, *, pad_id: int,
                  started: float, device: torch.device) -> RolloutBatch:
    """The :class:`RolloutBatch` of decoded ``rows`` (:meth:`RowDecoder.result`), its loss mask
    the generated tokens, timed from ``started`` (``time.perf_counter()``)."""
    tokens, logprobs, lengths, stopped, kind = result
    batch = RolloutBatch(
        tokens=tokens,
        prompt_lengths=torch.tensor([len(p) for p, _ in rows], device=device),
        prefix_lengths=torch.tensor([len(q) for _, q in rows], device=device),
        lengths=lengths,
        logprobs=logprobs,
        loss_mask=torch.zeros_like(tokens, dtype=torch.bool),
        logprob_kind=kind,
        stopped=stopped,
        pad_id=pad_id,
        generation_seconds=time.perf_counter() - started,
        samples_per_prompt=params.n,
    )
    batch.loss_mask = batch.generated_mask()
    return batch
