"""The colocated rollout engine: the training student generates its own rollouts.

:class:`MegatronEngine` runs megatron-core's ``GPTModel`` — the very module the trainer
optimises, with its current (fake-quant) weights, so there is no weight sync — in eval mode under
``no_grad``, batched, with megatron-core's static KV cache
(:class:`~megatron.core.inference.contexts.StaticInferenceContext` passed as
``GPTModel.forward(inference_context=...)``). It runs on CPU (gloo) and GPU, at any TP size.

Why not megatron's whole static engine (``StaticInferenceEngine`` + ``TextGenerationController``):
its generation loop creates ``torch.cuda.Event``\\ s and calls ``.cuda()`` unconditionally, records
only raw (temperature-1) log-probs, and has no forced prefixes or ``min_new_tokens``. The loop
here is the same algorithm in ~100 lines on the same KV cache, and needs no CPU accommodation
beyond those in :mod:`nemo_opd.runtime.cpu_backend` (the cache is allocated on
``torch.cuda.current_device()``).

Unequal lengths (per-row handling, as megatron's static controller does it). Rows are not
padded on the left: the prefill runs all rows up to the shortest context (prompt + forced
prefix); after that every step feeds one token per row — the row's own context token while it
still has context left, else the token just sampled. Every row thus sees exactly its own
positions (no attention mask, no shifted RoPE), so its log-probs equal a teacher-forced forward of
that row alone. Finished rows are moved to the back of the cache
(``StaticInferenceContext.swap_key_value_dict``) and no longer computed. The ``n`` samples of a
prompt share one prefill: it runs on one row per prompt and the KV cache is copied to the
others (the same swap), not recomputed.

Quantized students. The weights do not change during a call, so each ModelOpt weight quantizer
runs once per call (:func:`nemo_opd.quant.student.weights_quantized_once`), not once per decoded
token; tokens and log-probs are bit-identical to quantizing in every forward.

Decoding speed. A decoding step of a small model is mostly per-call overhead, not arithmetic, so
the call runs under ``torch.inference_mode`` (its tensors are copied out as ordinary ones) and
megatron-core's attention and linears run as their decoding forms
(:mod:`nemo_opd.rollout.decode_layers`: keys rotated once, matmuls outside autograd), bit-identical
to the modules as they are.

Tensor parallelism. Logits are gathered over the model's TP group (``runtime_gather_output``), so
every TP rank holds the same full-vocabulary logits and samples with the same seeded generator:
tokens are identical across TP ranks. Every TP rank must call :meth:`MegatronEngine.generate`
with the same prompts and parameters; the engine checks that (one all-gather of a fingerprint)
and, when ``seed`` is None, takes the first rank's random seed.

Length policy. Prompts are never truncated: a prompt (+ forced prefix) that leaves no room for
one new token within ``max_sequence_length`` (default: the model's maximum positions) raises
``ValueError``; rows that reach ``max_sequence_length`` while generating end there
(``stopped`` False), like rows that reach ``max_new_tokens``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time

import torch
import torch.distributed as dist
from megatron.core.inference.contexts.static_context import StaticInferenceContext

from nemo_opd.quant.student import weights_quantized_once
from nemo_opd.rollout.decode import RowDecoder, expand_rows, rollout_batch
from nemo_opd.rollout.decode_layers import decoding_layers
from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, SamplingParams
from nemo_opd.rollout.external import check_prompts

__all__ = ["MegatronEngine"]

logger = logging.getLogger(__name__)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module style wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class MegatronEngine:
    """Generate rollouts with a megatron-core ``GPTModel`` in place (see the module docstring).

    Args:
        model: the ``GPTModel`` (or a DDP-style wrapper of one); its output layer must be the
            last pipeline stage (pipeline parallelism is not supported).
        pad_id: id filling the right padding of :attr:`RolloutBatch.tokens`.
        eos_id: id that ends a row (added to every call's ``stop_token_ids``); None: only the
            call's stop ids end rows.
        tp_group: the model's tensor-parallel group; None: the model's own
            (``model.pg_collection.tp``).
        max_sequence_length: most positions a row may use (prompt + prefix + new tokens);
            None: the model's ``max_sequence_length``.
        use_kv_cache: False recomputes the whole sequence every step (a reference for tests and
            debugging; same tokens, quadratically slower).
        decoding_layers: run megatron-core's attention and linears as their decoding forms
            during a call (:mod:`nemo_opd.rollout.decode_layers`: keys rotated once, matmuls
            outside autograd; bit-identical). False runs them as they are (a reference for tests
            and benchmarks).
    """

    def __init__(self, model: torch.nn.Module, *, pad_id: int, eos_id: int | None,
                 tp_group: dist.ProcessGroup | None = None,
                 max_sequence_length: int | None = None, use_kv_cache: bool = True,
                 decoding_layers: bool = True) -> None:
        self.model = model
        gpt = _unwrap(model)
        for attr in ("vocab_size", "max_sequence_length", "pg_collection"):
            if not hasattr(gpt, attr):
                raise TypeError(f"MegatronEngine needs a megatron-core GPTModel; "
                                f"{type(gpt).__name__} has no {attr!r}")
        if not getattr(gpt, "post_process", True) or not getattr(gpt, "pre_process", True):
            raise ValueError("MegatronEngine does not support pipeline parallelism: the model "
                             "must hold both the embedding and the output layer")
        self.vocab_size: int = gpt.vocab_size
        for name, value in (("pad_id", pad_id), ("eos_id", eos_id)):
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be an id in [0, {self.vocab_size}), got {value!r}")
        limit = gpt.max_sequence_length if max_sequence_length is None else max_sequence_length
        if not isinstance(limit, int) or limit < 2:
            raise ValueError(f"max_sequence_length must be an int >= 2, got {limit!r}")
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_sequence_length = limit
        self.use_kv_cache = use_kv_cache
        self.decoding_layers = decoding_layers
        self.tp_group = tp_group if tp_group is not None else gpt.pg_collection.tp

    def update_weights(self, model: torch.nn.Module) -> None:
        """Colocated: generation reads the module's live weights, so nothing is copied. A
        different module (e.g. after the trainer re-wrapped it) replaces the engine's."""
        if _unwrap(model) is not _unwrap(self.model):
            if _unwrap(model).vocab_size != self.vocab_size:
                raise ValueError(f"update_weights: vocab size {_unwrap(model).vocab_size} differs "
                                 f"from the engine's {self.vocab_size}")
            self.model = model

    # ------------------------------------------------------------------ checks

    def _agree_across_tp(self, prompts: list[list[int]], prefixes: list[list[int]] | None,
                         params: SamplingParams, device: torch.device) -> int:
        """The sampling seed, after checking every TP rank asked for the same rollouts.

        Ranks that sampled from different prompts would silently diverge; a fingerprint of the
        inputs is all-gathered and compared. With ``params.seed`` None every rank draws a seed
        from its global generator and all use the first rank's.
        """
        own_seed = (params.seed if params.seed is not None
                    else int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return own_seed
        digest = hashlib.sha256(repr((prompts, prefixes, params)).encode()).digest()
        mine = torch.tensor([int.from_bytes(digest[:7], "little"), own_seed], dtype=torch.int64,
                            device=device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.tp_group))]
        dist.all_gather(gathered, mine, group=self.tp_group)
        if any(int(g[0]) != int(mine[0]) for g in gathered):
            raise ValueError("MegatronEngine.generate was called with different prompts, "
                             "prefixes or sampling params on the ranks of one TP group; every TP "
                             "rank must ask for the same rollouts")
        return int(gathered[0][1])

    # ------------------------------------------------------------------ generation

    def _next_logits(self, cache: StaticInferenceContext | None, tokens: torch.Tensor,
                     rows_in_cache_order: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``[k, V]`` float32 logits predicting position ``end`` for ``rows_in_cache_order``,
        feeding positions ``[start, end)`` (with a cache) or ``[0, end)`` (without)."""
        if cache is None:
            start = 0
        ids = tokens[rows_in_cache_order, start:end]
        positions = torch.arange(start, end, device=ids.device).expand_as(ids)
        logits = self.model(ids, positions, None, inference_context=cache,
                            runtime_gather_output=True)
        if cache is not None:
            cache.increment_sequence_len_offset(end - start)
            cache.enable_decode_mode()
        return logits[:, -1].float()

    def _shared_prefill(self, cache: StaticInferenceContext, tokens: torch.Tensor,
                        slots: torch.Tensor, active: int, group: int, end: int) -> torch.Tensor:
        """The prefill of rows that come in groups of ``group`` identical contexts (``n``
        samples per prompt): one row per group is computed, its KV cache copied to the group's
        other slots; returns the ``[active, V]`` logits of ``slots[:active]``."""
        groups, rep_of = torch.unique(slots[:active] // group, return_inverse=True)
        logits = self._next_logits(cache, tokens, groups * group, 0, end)
        rest = torch.arange(active, len(slots), device=slots.device)
        cache.swap_key_value_dict(torch.cat([rep_of, rest]))
        return logits[rep_of]

    @torch.inference_mode()
    def _generate_rows(self, contexts: list[list[int]], prefix_stopped: torch.Tensor,
                       params: SamplingParams, stop_ids: list[int], seed: int,
                       device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  LogprobKind]:
        """Tokens ``[R, T]``, log-probs ``[R, T]``, lengths ``[R]``, stopped ``[R]`` and the
        log-prob kind for rows continuing ``contexts``, which come in groups of ``params.n``
        identical ones (their prefill is shared); rows flagged in ``prefix_stopped`` (a forced
        prefix that ends with a stop id) are complete already."""
        rows, group = len(contexts), params.n
        state = RowDecoder.start(contexts, prefix_stopped, params, stop_ids, seed,
                                 pad_id=self.pad_id,
                                 max_sequence_length=self.max_sequence_length, device=device)
        done, total, tokens = state.done, state.total, state.tokens

        cache = (StaticInferenceContext(max_batch_size=rows, max_sequence_length=total)
                 if self.use_kv_cache else None)
        # slots[i] = the row held in KV-cache slot i; slots[:active] are still generating.
        slots = torch.arange(rows, device=device)
        slots = torch.cat([slots[~done], slots[done]])
        active = int((~done).sum())
        position = int(state.context_lengths.min())
        fed = 0
        while active:
            if fed == 0 and cache is not None and group > 1:
                logits = self._shared_prefill(cache, tokens, slots, active, group, position)
            else:
                logits = self._next_logits(cache, tokens, slots[:active], fed, position)
            fed = position
            live = slots[:active]
            state.step(logits, live, position, params)
            position += 1
            finished = done[live]
            if finished.any():
                order = torch.cat([torch.nonzero(~finished).squeeze(1),
                                   torch.nonzero(finished).squeeze(1),
                                   torch.arange(active, rows, device=device)])
                if cache is not None and cache.key_value_memory_dict:
                    cache.swap_key_value_dict(order)
                slots = slots[order]
                active = int((~finished).sum())
        return state.result()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 forced_prefixes: list[list[int]] | None = None) -> RolloutBatch:
        """``params.n`` continuations of each prompt (after its forced prefix, if any).

        Rows are ``prompt_index * n + sample_index``; the loss mask covers the tokens written
        here (stop token included). See :class:`~nemo_opd.rollout.engine.RolloutEngine`.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        started = time.perf_counter()
        device = next(self.model.parameters()).device
        # Agree first: a rank whose inputs fail the checks must not leave the others waiting.
        seed = self._agree_across_tp(prompts, forced_prefixes, params, device)
        prefixes = check_prompts(prompts, forced_prefixes, vocab_size=self.vocab_size,
                                 max_sequence_length=self.max_sequence_length)
        # A forced prefix that already ends with a stop id leaves nothing to write.
        expanded, stop_ids, prefix_stopped = expand_rows(prompts, prefixes, params, self.eos_id,
                                                         device)
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            # The weights are fixed for the whole call: quantize them once, not once per token.
            with weights_quantized_once(self.model), \
                    (decoding_layers(self.model) if self.decoding_layers
                     else contextlib.nullcontext()):
                result = self._generate_rows(
                    [p + q for p, q in expanded], prefix_stopped, params, stop_ids, seed, device)
            # Made in inference mode (cheaper per op than no_grad), such tensors may not enter
            # autograd later, as the trainer's losses use the log-probs: hand out plain copies.
            result = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in result)
        finally:
            for module, training in modes:
                module.training = training
        batch = rollout_batch(expanded, result, params, pad_id=self.pad_id, started=started,
                              device=device)
        logger.debug("generated %d tokens in %.3f s (%.1f tokens/s)", batch.num_generated_tokens,
                     batch.generation_seconds, batch.tokens_per_second)
        return batch
