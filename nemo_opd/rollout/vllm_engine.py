"""vLLM rollout engine, in-process with the trainer's ranks: sleep/wake and in-memory refit.

**Not run here**: vLLM's wheels are CUDA-only; this module is written against vLLM's offline API
as read in its sources (``vllm/entrypoints/llm.py``: ``LLM.sleep(level)``,
``LLM.wake_up(tags)`` with tags in ``("weights", "kv_cache")``,
``LLM.collective_rpc(method: str | Callable, timeout, args, kwargs)`` whose callable gets the
worker as its first argument; ``vllm/config/model.py``: ``enable_sleep_mode`` and
``logprobs_mode``; ``vllm/config/parallel.py``: ``external_launcher`` turns V1 multiprocessing
off, so the callable runs in this process) and imports vLLM lazily; the pieces that do not need
vLLM (sampling-parameter mapping, log-prob extraction, the refit call, the sleep/wake sequence)
are unit-tested with fakes, and ``containers/smoke_engine.py --engine vllm`` exercises the whole
engine in a vLLM container.

Layout: every trainer rank builds one ``LLM`` with ``distributed_executor_backend=
"external_launcher"`` (vLLM joins the ranks torchrun started instead of spawning workers) and
``tensor_parallel_size`` = the student's TP size, so vLLM's TP groups are megatron's (contiguous
ranks, megatron's default order). Every TP rank calls :meth:`VLLMEngine.generate` with the same
prompts and one seed and gets the same tokens.

One step: ``generate`` wakes the engine (``wake_up(tags=["kv_cache"])``, and ``["weights"]`` if
still asleep), samples, and puts it back to sleep (``sleep(level)``: KV cache freed, weights
offloaded to CPU (level 1) or dropped (level 2)) so the trainer's forward/backward has the memory;
after the optimizer step :meth:`VLLMEngine.update_weights` wakes only the weights and loads the
student's dequantised tensors in place through ``collective_rpc`` with a function that calls the
model runner's ``model.load_weights(weights)`` on each (in-process) worker (as vLLM's
``examples/offline_inference/rlhf_utils.py`` does) — no disk, no
``reload_weights`` (vLLM's ``collective_rpc("reload_weights")`` re-reads the checkpoint from disk,
which is not what a trainer wants each step). Prefix caching is off: cached KV of the previous
weights would be reused.

Log-probs: ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob only
(``vllm/v1/sample/metadata.py``: "0 means sampled token logprobs only"). vLLM computes them
from the **raw** logits by default (``LogprobsMode`` = ``"raw_logits" | "raw_logprobs" |
"processed_logits" | "processed_logprobs"``, default ``"raw_logprobs"``: before temperature,
top-k, top-p — :data:`~nemo_opd.rollout.engine.LogprobKind` ``"raw"``); built with
``logprob_kind="sampling"`` the engine asks for ``"processed_logprobs"`` (after them). Stop ids
are passed as ``stop_token_ids`` with ``ignore_eos=True`` (EOS is among them; vLLM's
``check_stop`` still honours ``stop_token_ids`` under ``ignore_eos``), so rows stop on exactly
the megatron engine's ids and keep the stop token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, SamplingParams
from nemo_opd.rollout.external import (
    Completion,
    EngineUnavailable,
    LibraryEngine,
    assemble_batch,
    check_prompts,
    completions_of,
    plan_requests,
)
from nemo_opd.rollout.hf_engine import (
    check_hf_tensors,
    student_hf_tensors,
)

__all__ = ["VLLMEngine", "import_vllm", "load_weights_on_worker", "vllm_sampling_kwargs"]

logger = logging.getLogger(__name__)

_LOGPROBS_MODE = {"raw": "raw_logprobs", "sampling": "processed_logprobs"}


def import_vllm() -> Any:
    """``vllm``, or :class:`EngineUnavailable` naming where it runs."""
    try:
        import vllm
    except ImportError as err:
        raise EngineUnavailable(
            "rollout.engine='vllm' needs vLLM (CUDA wheels only), which is not installed here: "
            "run in a GPU container with vLLM (e.g. vllm/vllm-openai, or pip install vllm in the "
            f"NGC PyTorch container); see containers/README.md ({err})") from err
    return vllm


def vllm_sampling_kwargs(params: SamplingParams, *, stop_ids: list[int], max_tokens: int,
                         seed: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one request (greedy: ``temperature=0``;
    top-k 0 / top-p 1 (off) are left at vLLM's defaults, which are off)."""
    kwargs: dict[str, Any] = dict(
        n=params.n, max_tokens=max_tokens, min_tokens=params.min_new_tokens, seed=seed,
        stop_token_ids=list(stop_ids), ignore_eos=True, logprobs=0, detokenize=False,
        temperature=0.0 if params.greedy else float(params.temperature))
    if not params.greedy:
        if params.top_k:
            kwargs["top_k"] = params.top_k
        if params.top_p < 1:
            kwargs["top_p"] = float(params.top_p)
    return kwargs


def load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Run on each vLLM worker by ``collective_rpc``: load HF-named tensors into the worker's
    model (vLLM's per-model ``load_weights`` fuses q/k/v and gate/up and shards for its TP rank);
    returns how many tensors were passed."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMEngine(LibraryEngine):
    """Rollouts from an in-process vLLM ``LLM`` refit from the student (module docstring).

    Args:
        model: the student ``GPTModel`` (or wrapper); refit at construction.
        hf_dir: the student's HF directory (``load_format="dummy"``: weights are not read).
        pad_id, eos_id: as for the megatron engine.
        tp_group: the student's TP group (None: the model's own); vLLM's TP size is its size.
        logprob_kind: ``"raw"`` (vLLM's default) or ``"sampling"`` (``processed_logprobs``).
        dtype: vLLM's dtype ("bfloat16").
        sleep_level: 1 (offload weights to CPU while asleep) or 2 (drop them: every refit
            loads all of them anyway); 0 never sleeps.
        gpu_memory_utilization: vLLM's share of the GPU (the trainer shares it).
        max_sequence_length: positions per row (None: the HF config's).
        llm_kwargs: more ``vllm.LLM`` arguments.
        llm, sampling_params_cls: stand-ins for vLLM (tests).
    """

    returns_logprobs = True

    def __init__(self, model: torch.nn.Module, hf_dir: str | Path, *, pad_id: int,
                 eos_id: int | None, tp_group: dist.ProcessGroup | None = None,
                 logprob_kind: LogprobKind = "raw", dtype: str = "bfloat16",
                 sleep_level: int = 1, gpu_memory_utilization: float = 0.3,
                 max_sequence_length: int | None = None,
                 llm_kwargs: dict[str, Any] | None = None, llm: Any = None,
                 sampling_params_cls: Callable[..., Any] | None = None) -> None:
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level!r}")
        self._describe(model, hf_dir, pad_id=pad_id, eos_id=eos_id, tp_group=tp_group,
                       logprob_kind=logprob_kind, known_kinds=tuple(_LOGPROBS_MODE),
                       max_sequence_length=max_sequence_length)
        self.sleep_level = sleep_level
        if llm is None or sampling_params_cls is None:
            vllm = import_vllm()
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
            if llm is None:
                tp = 1 if self.tp_group is None else dist.get_world_size(self.tp_group)
                llm = vllm.LLM(
                    model=self.hf_dir, tensor_parallel_size=tp,
                    distributed_executor_backend="external_launcher",
                    enable_sleep_mode=sleep_level > 0, load_format="dummy", dtype=dtype,
                    max_model_len=self.max_sequence_length,
                    gpu_memory_utilization=gpu_memory_utilization,
                    enable_prefix_caching=False, skip_tokenizer_init=True,
                    logprobs_mode=_LOGPROBS_MODE[logprob_kind], **(llm_kwargs or {}))
        self.llm, self._sampling_params_cls = llm, sampling_params_cls
        self._asleep: set[str] = set()
        self.update_weights(model)
        self._sleep()

    # ------------------------------------------------------------------ sleep / wake

    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        wanted = [tag for tag in tags if tag in self._asleep]
        if wanted:
            self.llm.wake_up(tags=wanted)
            self._asleep -= set(wanted)

    # ------------------------------------------------------------------ refit

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the student's dequantised weights into the engine in place (every TP rank: the
        tensors are gathered whole, vLLM's loaders take this rank's shard).

        Raises:
            ValueError: the student's tensors do not match the engine model's parameters.
        """
        tensors = student_hf_tensors(model, vocab_size=self.vocab_size, tp_group=self.tp_group)
        check_hf_tensors(tensors, self._shapes, engine="VLLMEngine")
        self._wake("weights")
        self.llm.collective_rpc(load_weights_on_worker, args=(list(tensors.items()),))
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()

    # ------------------------------------------------------------------ generation

    def _agree_seed(self, seed: int | None) -> int:
        """One seed for the whole TP group (ranks must sample the same tokens)."""
        if seed is not None:
            return seed
        own = torch.randint(0, 2**31, (1,), dtype=torch.int64, device=self.device)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.broadcast(own, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return int(own)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 forced_prefixes: list[list[int]] | None = None) -> RolloutBatch:
        """``params.n`` continuations of each prompt (same layout and rules as the megatron
        engine); every TP rank calls it with the same inputs."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        started = time.perf_counter()
        seed = self._agree_seed(params.seed)
        prefixes = check_prompts(prompts, forced_prefixes, vocab_size=self.vocab_size,
                                 max_sequence_length=self.max_sequence_length)
        stop_ids = sorted(set(params.stop_token_ids) | ({self.eos_id} - {None}))
        requests = plan_requests(prompts, prefixes, params, stop_ids=stop_ids,
                                 max_sequence_length=self.max_sequence_length, seed=seed)
        kind: LogprobKind = "raw" if params.greedy else self.logprob_kinds[0]
        completions: dict[int, list[Completion]] = {}
        if requests:
            self._wake("weights", "kv_cache")
            try:
                sampling = [self._sampling_params_cls(**vllm_sampling_kwargs(
                    params, stop_ids=stop_ids, max_tokens=r.max_tokens, seed=r.seed))
                    for r in requests]
                outputs = self.llm.generate([{"prompt_token_ids": r.context} for r in requests],
                                            sampling_params=sampling, use_tqdm=False)
            finally:
                self._sleep()
            for request, output in zip(requests, outputs, strict=True):
                completions[request.index] = completions_of(output, engine="vLLM")
        return assemble_batch(prompts, prefixes, completions, params, stop_ids=stop_ids,
                              pad_id=self.pad_id, kind=kind,
                              generation_seconds=time.perf_counter() - started,
                              device=self.device, engine="vLLM")
