"""The rollout-engine protocol: what the trainer asks of any generator of student rollouts.

An engine turns token-id prompts into :class:`RolloutBatch` es: prompt, optional forced prefix
(tokens another policy wrote, e.g. the teacher in teacher-seeded rollouts), and the tokens the
engine sampled, right-padded into one ``[B*n, T]`` tensor, with the log-probability of every
sampled token and a loss mask.

Backends. The default, :class:`~nemo_opd.rollout.megatron_engine.MegatronEngine`, generates with
the training student itself (same module, current fake-quant weights), so
:meth:`RolloutEngine.update_weights` is a no-op there and its log-probs are those the trainer's
own forward computes. TensorRT-LLM and vLLM backends (a later issue) fit the same protocol:

* **weight refit between steps** — ``update_weights(model)`` exports the student's current
  weights (for a real-quantized engine: ModelOpt's packed 4-bit weights + scales) and pushes them
  into the running engine (TensorRT-LLM ``collective_rpc("update_weights", ipc_handles)``, vLLM
  ``collective_rpc("reload_weights")``) before the next ``generate``;
* **importance weights** — a real-quantized engine samples from a slightly different policy than
  the fake-quant student the trainer differentiates (different kernels, rounding of exported
  codes). The engine's per-token log-probs are the behaviour policy ``log μ(x_t)``; the trainer
  recomputes ``log πθ(x_t)`` with the student and weights each token by ``exp(log πθ − log μ)``
  (see :func:`~nemo_opd.loss.sampled_token_reverse_kl`'s ``rollout_logprobs``). For that ratio to
  compare like with like, :attr:`RolloutBatch.logprob_kind` says which distribution the engine's
  log-probs are under: ``"sampling"`` (after temperature / top-k / top-p — what the tokens were
  actually drawn from) or ``"raw"`` (the model's softmax at temperature 1 with no filtering, what
  vLLM and TensorRT-LLM return by default).

Row order: rows are grouped by prompt, ``row = prompt_index * n + sample_index``.

Optional engine attributes (not part of the protocol, so any object with ``generate`` and
``update_weights`` stays an engine; read them through :func:`engine_returns_logprobs` and
:func:`engine_logprob_kinds`, absent means the colocated engine's answer):

* ``returns_logprobs: bool`` — False for an engine whose :attr:`RolloutBatch.logprobs` are not
  the behaviour policy's (all zeros), which a loss needing them must refuse before the first step;
* ``logprob_kinds: tuple[LogprobKind, ...]`` — the kinds it can record (vLLM and TensorRT-LLM:
  one, chosen when the engine is built);
* ``vocab_size: int`` and ``tokenizer`` — checked against the student's before training
  (:func:`nemo_opd.rollout.factory.check_engine`).
"""


import dataclasses
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = ["LogprobKind", "RolloutBatch", "RolloutEngine", "SamplingParams",
           "engine_logprob_kinds", "engine_returns_logprobs"]

LogprobKind = Literal["sampling", "raw"]
"""``"sampling"``: log-prob under the distribution the token was drawn from (logits / T, then
top-k and top-p renormalised). ``"raw"``: log-softmax of the unscaled, unfiltered logits. Greedy
decoding (temperature 0) samples from a point mass whose log-probs (all 0) say nothing, so greedy
batches always record ``"raw"``."""

_LOGPROB_KINDS = ("sampling", "raw")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample continuations of each prompt."""

    n: int = 1
    """Samples per prompt (rows ``prompt_index * n + sample_index``); >= 1."""
    temperature: float = 1.0
    """Divides the logits before softmax; 0 means greedy (argmax); >= 0, finite."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most-likely tokens whose probability reaches
    ``top_p`` (the token that crosses it included); in (0, 1], 1 = off."""
    top_k: int = 0
    """Keep the ``top_k`` most likely tokens (ties at the k-th value kept); 0 = off; >= 0."""
    max_new_tokens: int = 64
    """Most tokens the engine writes per row (forced prefixes do not count); >= 1."""
    min_new_tokens: int = 0
    """Stop ids are masked out of sampling until this many tokens are written;
    0 <= min_new_tokens <= max_new_tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """A row ends after writing one of these (the stop token is kept and carries loss);
    each id >= 0. The engine's ``eos_id`` is always a stop id as well."""
    seed: int | None = None
    """Seed of the sampling generator (same seed, same weights → same tokens); None: drawn from
    torch's global generator."""
    logprobs: LogprobKind = "sampling"
    """Which log-probs to record (:data:`LogprobKind`; greedy always records ``"raw"``)."""

    def __post_init__(self) -> None:
        def fail(field: str, rule: str) -> None:
            raise ValueError(f"SamplingParams.{field} must be {rule}, got "
                             f"{getattr(self, field)!r}")

        if not _is_int(self.n) or self.n < 1:
            fail("n", "an int >= 1")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not 0 <= self.temperature < float("inf")):
            fail("temperature", "a finite number >= 0 (0 = greedy)")
        if (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
                or not 0 < self.top_p <= 1):
            fail("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an int >= 0 (0 = off)")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an int >= 1")
        if (not _is_int(self.min_new_tokens)
                or not 0 <= self.min_new_tokens <= self.max_new_tokens):
            fail("min_new_tokens", f"an int in [0, max_new_tokens={self.max_new_tokens}]")
        if (not isinstance(self.stop_token_ids, tuple)
                or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)):
            fail("stop_token_ids", "a tuple of ints >= 0")
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", "an int or None")
        if self.logprobs not in _LOGPROB_KINDS:
            fail("logprobs", f"one of {_LOGPROB_KINDS}")

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (temperature 0)."""
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class RolloutBatch:
    """Rollouts of ``B`` prompts × ``n`` samples, right-padded to a common length ``T``.

    Row ``r`` holds ``tokens[r, :lengths[r]]`` = prompt (``prompt_lengths[r]`` tokens), then the
    forced prefix (``prefix_lengths[r]``), then the tokens the engine wrote
    (``lengths - prompt_lengths - prefix_lengths``); positions ``>= lengths[r]`` hold ``pad_id``.
    All tensors live on the engine's device.
    """

    tokens: torch.Tensor
    """``[B*n, T]`` int64."""
    prompt_lengths: torch.Tensor
    """``[B*n]`` int64."""
    prefix_lengths: torch.Tensor
    """``[B*n]`` int64: forced (e.g. teacher-written) tokens right after the prompt."""
    lengths: torch.Tensor
    """``[B*n]`` int64: valid tokens per row."""
    logprobs: torch.Tensor
    """``[B*n, T]`` float32: log-prob of ``tokens[:, t]`` given ``tokens[:, :t]`` (the kind in
    :attr:`logprob_kind`) at engine-written positions, 0 elsewhere."""
    loss_mask: torch.Tensor
    """``[B*n, T]`` bool: tokens that carry loss (by default the engine-written ones)."""
    logprob_kind: LogprobKind
    """Which distribution :attr:`logprobs` are under (:data:`LogprobKind`)."""
    stopped: torch.Tensor
    """``[B*n]`` bool: the row ended with a stop id (False: it hit ``max_new_tokens``)."""
    pad_id: int
    """The id right-padding fills with."""
    generation_seconds: float
    """Wall time of the call that produced the batch (in teacher-seeded rollouts: the teacher's
    prefix generation included)."""
    samples_per_prompt: int = 1
    """``n``: rows ``i * n .. i * n + n - 1`` continue prompt ``i``."""

    def __post_init__(self) -> None:
        rows, length = self.tokens.shape
        for name in ("prompt_lengths", "prefix_lengths", "lengths", "stopped"):
            if tuple(getattr(self, name).shape) != (rows,):
                raise ValueError(f"RolloutBatch.{name} must have shape ({rows},), got "
                                 f"{tuple(getattr(self, name).shape)}")
        for name in ("logprobs", "loss_mask"):
            if tuple(getattr(self, name).shape) != (rows, length):
                raise ValueError(f"RolloutBatch.{name} must have shape ({rows}, {length}), "
                                 f"got {tuple(getattr(self, name).shape)}")
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 1 \
                or rows % self.samples_per_prompt:
            raise ValueError(f"RolloutBatch.samples_per_prompt must be an int >= 1 dividing the "
                             f"{rows} rows, got {self.samples_per_prompt!r}")
        if self.logprob_kind not in _LOGPROB_KINDS:
            raise ValueError(f"RolloutBatch.logprob_kind must be one of {_LOGPROB_KINDS}, got "
                             f"{self.logprob_kind!r}")

    @property
    def response_lengths(self) -> torch.Tensor:
        """``[B*n]``: engine-written tokens per row."""
        return self.lengths - self.prompt_lengths - self.prefix_lengths

    @property
    def num_generated_tokens(self) -> int:
        """Engine-written tokens in the whole batch."""
        return int(self.response_lengths.sum())

    @property
    def tokens_per_second(self) -> float:
        """Engine-written tokens (forced prefixes excluded) per second of
        :attr:`generation_seconds`."""
        return self.num_generated_tokens / max(self.generation_seconds, 1e-9)

    def valid_mask(self) -> torch.Tensor:
        """``[B*n, T]`` bool: positions ``< lengths`` (not padding)."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return positions[None, :] < self.lengths[:, None]

    def generated_mask(self) -> torch.Tensor:
        """``[B*n, T]`` bool: the engine-written positions."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        start = self.prompt_lengths + self.prefix_lengths
        return (positions[None, :] >= start[:, None]) & self.valid_mask()

    def prefix_mask(self) -> torch.Tensor:
        """``[B*n, T]`` bool: the forced-prefix positions."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        start = self.prompt_lengths
        return ((positions[None, :] >= start[:, None])
                & (positions[None, :] < (start + self.prefix_lengths)[:, None]))


@runtime_checkable
class RolloutEngine(Protocol):
    """A generator of rollouts from token-id prompts (see the module docstring)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 forced_prefixes: list[list[int]] | None = None) -> RolloutBatch:
        """Sample ``params.n`` continuations of every prompt.

        ``forced_prefixes[i]`` (may be empty) is appended to prompt ``i`` as if the engine had
        written it — it counts as context, not toward ``max_new_tokens``, and carries no
        log-probs; the engine continues after it. Raises ``ValueError`` for an empty prompt list,
        an empty prompt, ids outside the vocabulary, or prompts (+ prefix) longer than the
        engine allows.
        """
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` use ``model``'s current weights (no-op when colocated)."""
        ...


def engine_returns_logprobs(engine: object) -> bool:
    """Whether ``engine``'s batches carry the behaviour policy's log-probs (its
    ``returns_logprobs`` attribute; True when absent, as for the colocated engine)."""
    return bool(getattr(engine, "returns_logprobs", True))


def engine_logprob_kinds(engine: object) -> tuple[LogprobKind, ...]:
    """The :data:`LogprobKind` s ``engine`` can record (its ``logprob_kinds`` attribute; both
    when absent, as for the colocated engine); empty when it returns no log-probs."""
    if not engine_returns_logprobs(engine):
        return ()
    return tuple(getattr(engine, "logprob_kinds", _LOGPROB_KINDS))
