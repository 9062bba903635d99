"""Score a model on the demo task: greedy exact match and multiple-choice accuracy, in one pass.

Every prompt and every answer of :class:`~nemo_opd.demo.task.AdditionTask` has the same token
count, so a batch needs no padding and teacher forcing decides greedy decoding exactly: greedy
generation reproduces the answer (and then stops at EOS) if and only if, with the answer fed in,
the argmax at every answer position (and at the EOS position) is the fed token. Multiple choice
is lm-eval's rule: the choice whose tokens have the highest summed log-probability after the
query.

Models enter as a ``logits_fn(ids [b, s]) -> logits [b, s, V]`` over the whole vocabulary:
:func:`hf_logits_fn` for a transformers model, :func:`megatron_logits_fn` for a megatron-core
``GPTModel`` at any TP size (its vocab-parallel logits are gathered; the demo's vocabulary is
tiny).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "LogitsFn",
    "encode_pairs",
    "hf_logits_fn",
    "megatron_logits_fn",
    "exact_match",
    "choice_accuracy",
]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""``ids [b, s] (int64) -> logits [b, s, V]`` over the whole vocabulary."""


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], *,
                 append_eos: bool = True) -> tuple[torch.Tensor, int]:
    """Token ids ``[n, s]`` of ``prompt + continuation`` (+ EOS) and the prompt length.

    Raises ``ValueError`` if the pairs do not all tokenize to the same prompt and total lengths
    (the fixed-width task guarantees they do), or if the prompt's tokens are not a prefix of the
    joined text's (the continuation would then be scored on tokens training never produced).
    """
    if not pairs:
        raise ValueError("encode_pairs needs at least one (prompt, continuation) pair")
    rows, prompt_lengths = [], set()
    for prompt, continuation in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{prompt!r} + {continuation!r}: the prompt's tokens are not a "
                             "prefix of the joined text's")
        rows.append(ids + [tokenizer.eos_token_id] * append_eos)
        prompt_lengths.add(len(prompt_ids))
    if len(prompt_lengths) != 1 or len({len(r) for r in rows}) != 1:
        raise ValueError("pairs tokenize to different lengths (prompt lengths "
                         f"{sorted(prompt_lengths)}); the demo task is fixed-width")
    return torch.tensor(rows, dtype=torch.long), prompt_lengths.pop()


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """``logits_fn`` of a transformers causal LM (float32 logits)."""
    return lambda ids: model(input_ids=ids).logits.float()


def megatron_logits_fn(model: torch.nn.Module, tp_group=None) -> LogitsFn:
    """``logits_fn`` of a megatron-core ``GPTModel``; ``tp_group`` gathers its vocab shards.

    megatron returns ``[b, s, V/tp]`` (batch first) from ``GPTModel.forward``; the shards are
    all-gathered along the vocabulary when ``tp_group`` has more than one rank.
    """
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        logits = model(ids, positions, attention_mask=None)
        if tp_group is not None and tp_group.size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits, group=tp_group)
        return logits.float()

    return logits_fn


@torch.no_grad()
def exact_match(logits_fn: LogitsFn, tokenizer, records: Sequence[dict], *,
                batch_size: int = 250) -> float:
    """Fraction of ``{"question", "answer"}`` records that greedy decoding answers exactly.

    The text scored is ``question + " " + answer`` + EOS (the training text); a record counts
    when the argmax after every position from the end of the question on is the next token.
    """
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        ids, prompt_len = encode_pairs(tokenizer, [(r["question"], " " + r["answer"])
                                                   for r in chunk])
        predicted = logits_fn(ids)[:, prompt_len - 1:-1].argmax(-1)
        correct += int((predicted == ids[:, prompt_len:]).all(-1).sum())
    return correct / len(records)


@torch.no_grad()
def choice_accuracy(logits_fn: LogitsFn, tokenizer, records: Sequence[dict], *,
                    batch_size: int = 250) -> float:
    """Fraction of ``{"query", "choices", "gold"}`` records whose gold choice has the highest
    summed log-probability of ``" " + choice`` after the query (no EOS; lm-eval's ``acc``)."""
    flat = [(r["query"], " " + c) for r in records for c in r["choices"]]
    scores = []
    for start in range(0, len(flat), batch_size):
        ids, prompt_len = encode_pairs(tokenizer, flat[start:start + batch_size],
                                       append_eos=False)
        logprobs = torch.log_softmax(logits_fn(ids)[:, prompt_len - 1:-1], dim=-1)
        scores.append(logprobs.gather(-1, ids[:, prompt_len:, None]).sum((1, 2)))
    scores_by_choice = torch.cat(scores).split([len(r["choices"]) for r in records])
    correct = sum(int(s.argmax()) == r["gold"] for s, r in
                  zip(scores_by_choice, records, strict=True))
    return correct / len(records)
