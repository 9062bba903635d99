"""Pieces every engine outside the trainer shares: input checks, per-request planning, log-prob
extraction from an inference library's outputs, and assembling a :class:`RolloutBatch`.

The inference libraries (TensorRT-LLM, vLLM) return, per request, ``n`` completions with the new
token ids, per-token log-prob entries (a ``{token_id: Logprob}`` dict per token, a ``Logprob``
object, or a float) and a finish reason. :func:`assemble_batch` turns those into the protocol's
right-padded ``[B*n, T]`` batch with the megatron engine's row order and masks, so every engine's
batches look alike to the trainer. Everything here is plain Python and torch (tested without the
libraries).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, SamplingParams

__all__ = ["Completion", "EngineUnavailable", "LibraryEngine", "Request", "assemble_batch",
           "check_prompts",
           "completions_of", "expected_hf_shapes", "plan_requests", "request_seed",
           "sampled_logprobs"]

logger = logging.getLogger(__name__)


class EngineUnavailable(ImportError):
    """The inference library an engine needs is not installed here."""


class LibraryEngine:
    """What the TensorRT-LLM and vLLM engines share: the served model's description (from the
    student's HF directory: vocabulary, positions, tokenizer, the tensor shapes a refit must
    fill), the ids and log-prob kind, and the student's TP group and device."""

    def _describe(self, model: torch.nn.Module, hf_dir: Any, *, pad_id: int,
                  eos_id: int | None, tp_group: Any, logprob_kind: LogprobKind,
                  known_kinds: Sequence[str], max_sequence_length: int | None) -> None:
        from transformers import AutoConfig

        from nemo_opd.rollout.hf_engine import _unwrap, load_engine_tokenizer

        if logprob_kind not in known_kinds:
            raise ValueError(f"logprob_kind must be one of {tuple(known_kinds)}, got "
                             f"{logprob_kind!r}")
        gpt = _unwrap(model)
        self.hf_dir = str(hf_dir)
        config = AutoConfig.from_pretrained(self.hf_dir)
        self.vocab_size: int = config.vocab_size
        self.max_sequence_length = max_sequence_length or config.max_position_embeddings
        self.pad_id, self.eos_id = pad_id, eos_id
        self.logprob_kinds: tuple[LogprobKind, ...] = (logprob_kind,)
        self.tp_group = tp_group if tp_group is not None else gpt.pg_collection.tp
        self.device = next(gpt.parameters()).device
        self._shapes = expected_hf_shapes(self.hf_dir)
        self.tokenizer = load_engine_tokenizer(self.hf_dir)


def check_prompts(prompts: Sequence[Sequence[int]],
                  forced_prefixes: Sequence[Sequence[int]] | None, *, vocab_size: int,
                  max_sequence_length: int) -> list[list[int]]:
    """Every engine's input checks; returns the prefixes (empty lists when None).

    Raises:
        ValueError: no prompts, an empty prompt, a prefix count that differs from the prompts',
            ids outside ``[0, vocab_size)``, or a prompt (+ prefix) leaving no room for one new
            token within ``max_sequence_length`` (prompts are never truncated).
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate needs a non-empty list of prompts (lists of token ids)")
    if forced_prefixes is None:
        forced_prefixes = [[] for _ in prompts]
    elif len(forced_prefixes) != len(prompts):
        raise ValueError(f"forced_prefixes has {len(forced_prefixes)} entries for "
                         f"{len(prompts)} prompts")
    for kind, seqs in (("prompt", prompts), ("forced prefix", forced_prefixes)):
        for i, seq in enumerate(seqs):
            if kind == "prompt" and len(seq) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token "
                                 "(e.g. BOS)")
            bad = [t for t in seq if not isinstance(t, int) or not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{kind} {i} holds ids outside the vocabulary "
                                 f"[0, {vocab_size}): {bad[:5]}")
    for i, (prompt, prefix) in enumerate(zip(prompts, forced_prefixes, strict=True)):
        if len(prompt) + len(prefix) >= max_sequence_length:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens (+ {len(prefix)} forced prefix tokens) "
                f"but the model allows {max_sequence_length} positions and one new token must "
                "fit; policy: prompts are never truncated — shorten the prompt or filter it out "
                "(data max_prompt_length)")
    return [list(p) for p in forced_prefixes]


def request_seed(seed: int, prompt_index: int) -> int:
    """The seed of prompt ``prompt_index``'s request: distinct per prompt (two equal prompts must
    not draw equal samples), a pure function of ``(seed, prompt_index)``, < 2**31."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt's request to an inference library."""

    index: int
    """The prompt's position in the call (rows ``index * n ...``)."""
    prompt: list[int]
    prefix: list[int]
    max_tokens: int
    """New tokens allowed: ``min(max_new_tokens, max_sequence_length - len(context))``."""
    seed: int
    """:func:`request_seed` of the call's seed."""

    @property
    def context(self) -> list[int]:
        """What the engine continues: prompt + forced prefix."""
        return self.prompt + self.prefix


def plan_requests(prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]],
                  params: SamplingParams, *, stop_ids: Sequence[int], max_sequence_length: int,
                  seed: int) -> list[Request]:
    """The requests to send: one per prompt whose forced prefix does not already end with a stop
    id (those rows are complete with no new token, as in the megatron engine)."""
    requests = []
    for i, (prompt, prefix) in enumerate(zip(prompts, prefixes, strict=True)):
        if prefix and prefix[-1] in stop_ids:
            continue
        budget = min(params.max_new_tokens, max_sequence_length - len(prompt) - len(prefix))
        requests.append(Request(i, list(prompt), list(prefix), budget, request_seed(seed, i)))
    return requests


def _logprob_value(entry: Any) -> float:
    value = getattr(entry, "logprob", entry)
    return float(value)


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[Any] | None, *,
                     engine: str) -> list[float]:
    """The log-prob of each sampled token from a library's per-token entries.

    Each entry is a ``{token_id: Logprob | float}`` mapping holding (at least) the sampled token
    (``logprobs=0``: only it), a ``Logprob``-like object with ``.logprob``, or a float.

    Raises:
        RuntimeError: no entries, a count that differs from the tokens', or a mapping without
            the sampled token (the engine was not asked for the sampled token's log-prob).
    """
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(f"{engine} returned {0 if logprobs is None else len(logprobs)} "
                           f"log-prob entries for {len(token_ids)} tokens; the request must ask "
                           "for the sampled token's log-prob (logprobs=0)")
    out = []
    for position, (token, entry) in enumerate(zip(token_ids, logprobs, strict=True)):
        if isinstance(entry, dict) or hasattr(entry, "keys"):
            if token not in entry:
                raise RuntimeError(f"{engine}: the log-probs of new token {position} do not hold "
                                   f"the sampled token {token} (keys {list(entry.keys())[:4]})")
            entry = entry[token]
        out.append(_logprob_value(entry))
    return out


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sample of one request, as the library returned it."""

    token_ids: list[int]
    """New tokens (no prompt)."""
    logprobs: list[float]
    """Log-prob of each new token (:func:`sampled_logprobs`)."""
    finished_by_stop: bool
    """The library ended it on a stop/end id (not on the token budget)."""


def completions_of(output: Any, *, engine: str) -> list[Completion]:
    """The samples of one request's ``RequestOutput`` (TensorRT-LLM and vLLM alike: ``.outputs``,
    each with ``index``, ``token_ids``, ``logprobs`` and ``finish_reason``), in sample order:
    ``index`` numbers the samples, the list need not be in that order."""
    samples = sorted(output.outputs, key=lambda c: getattr(c, "index", 0))
    return [Completion([int(t) for t in c.token_ids],
                       sampled_logprobs([int(t) for t in c.token_ids], c.logprobs, engine=engine),
                       str(getattr(c, "finish_reason", "")) == "stop")
            for c in samples]


def assemble_batch(prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]],
                   completions: dict[int, list[Completion]], params: SamplingParams, *,
                   stop_ids: Sequence[int], pad_id: int, kind: LogprobKind,
                   generation_seconds: float, device: torch.device | str = "cpu",
                   engine: str = "engine") -> RolloutBatch:
    """The :class:`RolloutBatch` of a call: rows ``prompt_index * n + sample_index``.

    ``completions[i]`` holds the ``n`` samples of prompt ``i`` (absent: its forced prefix ended
    with a stop id, so its rows are complete with nothing written). A completion the library
    ended on a stop id but whose tokens do not end with one (a library that strips the stop
    token) gets the first stop id appended *without* loss (its log-prob is unknown), with a
    warning; rows keep the megatron engine's rule otherwise: the stop token is kept and carries
    loss.
    """
    rows: list[tuple[list[int], int, int, list[float], bool, bool]] = []
    stripped = 0
    for i, (prompt, prefix) in enumerate(zip(prompts, prefixes, strict=True)):
        samples = completions.get(i)
        if samples is None:
            rows.extend([(list(prompt) + list(prefix), len(prompt), len(prefix), [], True,
                          False)] * params.n)
            continue
        if len(samples) != params.n:
            raise RuntimeError(f"{engine} returned {len(samples)} samples for prompt {i}; "
                               f"asked for n={params.n}")
        for sample in samples:
            new, lps = list(sample.token_ids), list(sample.logprobs)
            hit = [j for j, t in enumerate(new) if t in stop_ids]
            if hit:  # anything after the first stop id is not part of the row
                new, lps = new[:hit[0] + 1], lps[:hit[0] + 1]
            no_loss_last = False
            if sample.finished_by_stop and not hit:
                new, lps = new + [min(stop_ids)], lps + [0.0]
                no_loss_last = True
                stripped += 1
            rows.append((list(prompt) + list(prefix) + new, len(prompt), len(prefix), lps,
                         bool(hit) or sample.finished_by_stop, no_loss_last))
    if stripped:
        logger.warning("%s: %d rows ended on a stop id the library left out of the tokens; it was "
                       "appended without loss (no log-prob for it)", engine, stripped)
    width = max(len(r[0]) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    logprobs = torch.zeros(len(rows), width, dtype=torch.float32)
    no_loss = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (ids, prompt_len, prefix_len, lps, _, drop_last) in enumerate(rows):
        tokens[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        start = prompt_len + prefix_len
        if lps:
            logprobs[r, start:start + len(lps)] = torch.tensor(lps, dtype=torch.float32)
        if drop_last:
            no_loss[r, len(ids) - 1] = True
    batch = RolloutBatch(
        tokens=tokens.to(device),
        prompt_lengths=torch.tensor([r[1] for r in rows], device=device),
        prefix_lengths=torch.tensor([r[2] for r in rows], device=device),
        lengths=torch.tensor([len(r[0]) for r in rows], device=device),
        logprobs=logprobs.to(device),
        loss_mask=torch.zeros(len(rows), width, dtype=torch.bool, device=device),
        logprob_kind=kind,
        stopped=torch.tensor([r[4] for r in rows], device=device),
        pad_id=pad_id,
        generation_seconds=generation_seconds,
        samples_per_prompt=params.n,
    )
    batch.loss_mask = batch.generated_mask() & ~no_loss.to(device)
    return batch


def expected_hf_shapes(hf_dir: str) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape of the HF model ``hf_dir``'s config describes, built on the meta
    device (no memory, no weights read): what a refit of an engine serving that model must
    fill."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}
