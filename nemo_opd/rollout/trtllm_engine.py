"""TensorRT-LLM rollout engine (LLM API, PyTorch backend), refit through its weight-update RPC.

**Not run here**: TensorRT-LLM has no wheel on this project's registry; this module is written
against TensorRT-LLM's LLM API (PyTorch backend) as read in its sources: ``tensorrt_llm.LLM`` with
``orchestrator_type="ray"`` (``llmapi/llm_args.py``: ``Literal["rpc", "ray"]``) and
``ray_worker_extension_cls="tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"`` (that class's
docstring; ``executor`` passes ``llm_args.ray_worker_extension_cls`` to the Ray workers),
``llm._collective_rpc(method, args=(), ...)`` (``llmapi/llm.py``, "prototype") and
``tensorrt_llm.SamplingParams(logprobs=0, logprobs_mode=...)``. It imports the library lazily;
the pieces that do not need it (sampling-parameter mapping, log-prob extraction, the refit
payload) are unit-tested with fakes, and ``containers/smoke_engine.py --engine trtllm`` exercises
the whole engine inside the TensorRT-LLM NGC container.

Layout. In each data-parallel replica, the student's TP rank 0 owns one ``LLM`` (engine TP = 1, on
that rank's GPU, next to the trainer: colocated). :meth:`TensorRTLLMEngine.update_weights` runs on
every TP rank (the student's shards are gathered into full HF tensors,
:func:`~nemo_opd.rollout.hf_engine.student_hf_tensors`); the owner sends CUDA IPC handles of its
tensors — ``{device_uuid: base64(pickle([(hf_name, reduce_tensor(t)), ...]))}``, the serialized
form TensorRT-LLM's ``WorkerExtension.update_weights`` reads — then ``update_weights(None)`` to
finalise (post-load processing, prefix-cache reset), and the TP group waits at a barrier so the
tensors outlive the copy. :meth:`TensorRTLLMEngine.generate` runs on the owner; the batch is
broadcast to the other TP ranks.

Weights: the engine serves an unquantized model in ``dtype`` (bf16 by default) refit with the
student's *dequantised* fake-quant weights (``weight_quantizer(weight)``). A refit with the packed
low-bit codes and scales into a real-quantized engine (the export's tensors) is the next step.

Log-probs: ``logprobs=0`` returns only the sampled token's log-prob (``SamplingParams`` docs);
``logprobs_mode`` is ``LogprobMode.RAW`` (``"raw"``, the default) — the
:data:`~nemo_opd.rollout.engine.LogprobKind` ``"raw"`` — or ``"processed"`` (after temperature /
top-k / top-p) — ``"sampling"`` (``LogprobMode`` since TensorRT-LLM PR #9675; its
``tests/unittest/_torch/sampler/test_logits_logprobs.py`` passes ``"raw"`` / ``"processed"``; vLLM's
``"raw_logprobs"`` spellings are not these). The kind is chosen when the engine is built.
Stop ids: every stop id (EOS included) is passed as ``stop_token_ids`` with
``include_stop_str_in_output=True``, so the stop token stays in the row with its log-prob
(``executor/result.py`` trims stop words only without it), and ``end_id=-1``: no end token of
its own. Not ``ignore_eos=True``: ``executor/base_worker.py`` then sends ``stop_words=[]`` (and
``end_id=-1``), dropping every stop id; and an explicit ``end_id`` is required anyway, since
with ``skip_tokenizer_init`` ``LLM._prepare_sampling_params`` cannot fill it in (ValueError).
``min_new_tokens`` is refused: the TorchSampler's min-length penalty masks only ``end_id``.
"""

from __future__ import annotations

import base64
import logging
import pickle
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

__all__ = ["TensorRTLLMEngine", "import_tensorrt_llm", "ipc_payload", "trtllm_sampling_kwargs"]

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
"""TensorRT-LLM's own Ray worker extension (``tensorrt_llm/llmapi/rlhf_utils.py``) with the
``update_weights(ipc_handles: dict | None)`` RPC: a dict loads a bucket, ``None`` finalises."""

_LOGPROBS_MODE = {"raw": "raw", "sampling": "processed"}


def import_tensorrt_llm() -> Any:
    """``tensorrt_llm``, or :class:`EngineUnavailable` naming the container that has it."""
    try:
        import tensorrt_llm
    except ImportError as err:
        raise EngineUnavailable(
            "rollout.engine='trtllm' needs TensorRT-LLM (>= 1.2, PyTorch backend, with ray), "
            "which is not installed here: run inside the TensorRT-LLM NGC container "
            "(containers/Dockerfile.trtllm, nvcr.io/nvidia/tensorrt-llm/release); see "
            f"containers/README.md ({err})") from err
    return tensorrt_llm


def trtllm_sampling_kwargs(params: SamplingParams, *, stop_ids: list[int], max_tokens: int,
                           seed: int, logprob_kind: LogprobKind, pad_id: int) -> dict[str, Any]:
    """``tensorrt_llm.SamplingParams`` keyword arguments for one request.

    Greedy (temperature 0) is TensorRT-LLM's ``temperature=0``; top-k 0 and top-p 1 (off) are
    left unset (None: the runtime's "all tokens"). Stops are exactly ``stop_ids`` (EOS among
    them), the stop token kept in the output; ``end_id=-1`` (no end token: the value
    TensorRT-LLM itself uses for ``ignore_eos``, which would also drop the stop ids; see the
    module docstring).

    Raises:
        NotImplementedError: ``params.min_new_tokens`` > 0 (TensorRT-LLM's min-length penalty
            masks only ``end_id``, not the stop ids).
    """
    if params.min_new_tokens:
        raise NotImplementedError(
            "TensorRTLLMEngine cannot honour min_new_tokens: TensorRT-LLM's min_tokens masks "
            "only end_id, not stop_token_ids")
    kwargs: dict[str, Any] = dict(
        n=params.n, max_tokens=max_tokens, seed=seed, stop_token_ids=list(stop_ids),
        end_id=-1, include_stop_str_in_output=True, pad_id=pad_id, detokenize=False,
        logprobs=0, logprobs_mode=_LOGPROBS_MODE["raw" if params.greedy else logprob_kind])
    if params.greedy:
        kwargs["temperature"] = 0.0
    else:
        kwargs["temperature"] = float(params.temperature)
        if params.top_k:
            kwargs["top_k"] = params.top_k
        if params.top_p < 1:
            kwargs["top_p"] = float(params.top_p)
    return kwargs


def ipc_payload(tensors: dict[str, torch.Tensor], device_uuid: str,
                reduce: Callable[[torch.Tensor], Any] | None = None) -> dict[str, str]:
    """``{device_uuid: base64(pickle([(name, handle), ...]))}``: the serialized IPC-handle form
    TensorRT-LLM's ``WorkerExtension.update_weights`` accepts (its restricted unpickler reads
    it). ``reduce`` makes a handle (default ``torch.multiprocessing.reductions.reduce_tensor``,
    which needs CUDA tensors); the caller keeps ``tensors`` alive until the RPC returned."""
    if reduce is None:
        from torch.multiprocessing.reductions import reduce_tensor as reduce
    handles = [(name, reduce(tensor)) for name, tensor in tensors.items()]
    return {device_uuid: base64.b64encode(pickle.dumps(handles)).decode("ascii")}


class TensorRTLLMEngine(LibraryEngine):
    """Rollouts from a TensorRT-LLM ``LLM`` refit from the student (see the module docstring).

    Args:
        model: the student ``GPTModel`` (or wrapper); refit at construction.
        hf_dir: the student's HF directory (config + tokenizer; weights are not read:
            ``load_format="dummy"``).
        pad_id, eos_id: as for :class:`~nemo_opd.rollout.megatron_engine.MegatronEngine`.
        tp_group: the student's TP group (None: the model's own).
        logprob_kind: ``"raw"`` or ``"sampling"`` (TensorRT-LLM ``logprobs_mode`` "raw" /
            "processed").
        dtype: the engine's dtype ("bfloat16").
        max_sequence_length: positions per row (None: the HF config's).
        llm_kwargs: more ``tensorrt_llm.LLM`` arguments (e.g. ``kv_cache_config``).
        llm, sampling_params_cls, device_uuid, reduce_tensor: stand-ins for the library and
            for CUDA IPC (tests).
    """

    returns_logprobs = True

    def __init__(self, model: torch.nn.Module, hf_dir: str | Path, *, pad_id: int,
                 eos_id: int | None, tp_group: dist.ProcessGroup | None = None,
                 logprob_kind: LogprobKind = "raw", dtype: str = "bfloat16",
                 max_sequence_length: int | None = None,
                 llm_kwargs: dict[str, Any] | None = None, llm: Any = None,
                 sampling_params_cls: Callable[..., Any] | None = None,
                 device_uuid: str | None = None,
                 reduce_tensor: Callable[[torch.Tensor], Any] | None = None) -> None:
        self._describe(model, hf_dir, pad_id=pad_id, eos_id=eos_id, tp_group=tp_group,
                       logprob_kind=logprob_kind, known_kinds=tuple(_LOGPROBS_MODE),
                       max_sequence_length=max_sequence_length)
        self.is_owner = self.tp_group is None or dist.get_rank(self.tp_group) == 0
        llm_kwargs = dict(llm_kwargs or {})
        if llm_kwargs.get("tensor_parallel_size", 1) != 1:
            raise NotImplementedError("TensorRTLLMEngine runs one engine per TP group (engine "
                                      "tensor_parallel_size=1 on the group's first GPU)")
        self.llm, self._sampling_params_cls, self._device_uuid = None, sampling_params_cls, None
        self._reduce = reduce_tensor
        if self.is_owner:
            if llm is None or sampling_params_cls is None:
                trtllm = import_tensorrt_llm()
                sampling_params_cls = sampling_params_cls or trtllm.SamplingParams
                if llm is None:
                    llm = trtllm.LLM(
                        model=self.hf_dir, dtype=dtype, load_format="dummy",
                        orchestrator_type="ray", ray_worker_extension_cls=WORKER_EXTENSION,
                        skip_tokenizer_init=True,
                        tensor_parallel_size=1, max_seq_len=self.max_sequence_length,
                        **llm_kwargs)
            self.llm, self._sampling_params_cls = llm, sampling_params_cls
            self._device_uuid = device_uuid
        self.update_weights(model)

    # ------------------------------------------------------------------ refit

    def _uuid(self) -> str:
        if self._device_uuid is None:
            from tensorrt_llm._torch.utils import get_device_uuid

            self._device_uuid = get_device_uuid(self.device.index or 0)
        return self._device_uuid

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Gather the student's dequantised weights (every TP rank) and push them into the
        engine through ``update_weights`` IPC handles (the owner); see the module docstring.

        Raises:
            ValueError: the student's tensors do not match the engine model's parameters.
        """
        tensors = student_hf_tensors(model, vocab_size=self.vocab_size, tp_group=self.tp_group)
        check_hf_tensors(tensors, self._shapes, engine="TensorRTLLMEngine")
        if self.is_owner:
            payload = ipc_payload(tensors, self._uuid(), reduce=self._reduce)
            self.llm._collective_rpc("update_weights", (payload,))
            self.llm._collective_rpc("update_weights", (None,))  # finalise, reset prefix cache
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.barrier(group=self.tp_group)  # the owner's engine has copied every tensor

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 forced_prefixes: list[list[int]] | None = None) -> RolloutBatch:
        """``params.n`` continuations of each prompt (same layout and rules as the megatron
        engine); every TP rank calls it, the owner generates."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        started = time.perf_counter()
        prefixes = check_prompts(prompts, forced_prefixes, vocab_size=self.vocab_size,
                                 max_sequence_length=self.max_sequence_length)
        batch = None
        if self.is_owner:
            batch = self._generate_owner(prompts, prefixes, params, started)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            box = [None if batch is None else _to_cpu(batch)]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.tp_group, 0),
                                       group=self.tp_group)
            batch = _to_device(box[0], self.device)
        return batch

    def _generate_owner(self, prompts: list[list[int]], prefixes: list[list[int]],
                        params: SamplingParams, started: float) -> RolloutBatch:
        stop_ids = sorted(set(params.stop_token_ids) | ({self.eos_id} - {None}))
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31, ()))
        requests = plan_requests(prompts, prefixes, params, stop_ids=stop_ids,
                                 max_sequence_length=self.max_sequence_length, seed=seed)
        kind: LogprobKind = "raw" if params.greedy else self.logprob_kinds[0]
        completions: dict[int, list[Completion]] = {}
        if requests:
            sampling = [self._sampling_params_cls(**trtllm_sampling_kwargs(
                params, stop_ids=stop_ids, max_tokens=r.max_tokens, seed=r.seed,
                logprob_kind=kind, pad_id=self.pad_id)) for r in requests]
            outputs = self.llm.generate([r.context for r in requests], sampling_params=sampling,
                                        use_tqdm=False)
            for request, output in zip(requests, outputs, strict=True):
                completions[request.index] = completions_of(output, engine="TensorRT-LLM")
        return assemble_batch(prompts, prefixes, completions, params, stop_ids=stop_ids,
                              pad_id=self.pad_id, kind=kind,
                              generation_seconds=time.perf_counter() - started,
                              device=self.device, engine="TensorRT-LLM")


def _to_cpu(batch: RolloutBatch) -> RolloutBatch:
    return _map_tensors(batch, lambda t: t.cpu())


def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    return _map_tensors(batch, lambda t: t.to(device))


def _map_tensors(batch: RolloutBatch, fn: Callable[[torch.Tensor], torch.Tensor]
                 ) -> RolloutBatch:
    import dataclasses

    return dataclasses.replace(batch, **{f.name: fn(getattr(batch, f.name))
                                         for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})
