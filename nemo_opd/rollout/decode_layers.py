"""Decoding forms of megatron-core's local modules, swapped in for the duration of a rollout.

A decoding step feeds one token per row through the whole model, so a module's fixed per-call
cost counts as much as its arithmetic. Two such costs in megatron-core's local spec are not
needed once nothing is differentiated (``torch.no_grad``, eval mode), and :func:`decoding_layers`
removes them for the block, with every tensor computed bit for bit as before:

* :class:`DecodingSelfAttention`: with the static KV cache, megatron-core stores keys before
  RoPE and rotates the whole cached prefix again at every step (``k_pos_emb[:sequence_end]``), a
  cost that grows with the sequence. Here each new key is rotated once, at its own positions,
  before it is stored — what megatron-core itself does for its dynamic cache ("Apply rotary
  embeddings before appending KV cache"). RoPE is elementwise per position, so the stored keys
  equal the ones megatron rotates later.
* :class:`DecodingColumnParallelLinear` / :class:`DecodingRowParallelLinear`: megatron-core's
  matmul runs in an autograd ``Function`` (``linear_with_grad_accumulation_and_async_allreduce``)
  whose bookkeeping (saving inputs, the TP-group lookup), like that of the TP mappings around
  it, costs more than a decode step's small matmul. Under ``no_grad`` without sequence
  parallelism the same ``torch.matmul(input, weight.t()) (+ bias)`` runs directly, followed by
  the collective the mapping's forward runs (megatron-core's ``_gather_along_last_dim`` /
  ``_reduce``; nothing at TP = 1), with the bias where megatron-core adds it.

Only modules of exactly megatron-core's classes are swapped (after
:func:`nemo_opd.quant.student.weights_quantized_once` returned weight-only quantized linears to
them); Transformer Engine modules, ModelOpt modules that still quantize activations or hold LoRA
adapters, and subclasses keep their class. Measured in ``bench/bench_rollout.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention

__all__ = ["DecodingColumnParallelLinear", "DecodingRowParallelLinear", "DecodingSelfAttention",
           "decoding_layers"]


class DecodingSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` rotating each new query and key once, in one call, and
    storing the rotated keys in the static KV cache."""

    def _adjust_key_value_for_inference(self, inference_context: BaseInferenceContext | None,
                                        query: torch.Tensor, key: torch.Tensor,
                                        value: torch.Tensor, rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or not inference_context.is_static_batching()
                or not isinstance(rotary_pos_emb, tuple) or self.config.flash_decode
                or rotary_pos_emb[0] is not rotary_pos_emb[1]
                or self.pg_collection.cp.size() > 1):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        start = inference_context.sequence_len_offset
        # Queries and keys share their positions: one RoPE call rotates both (elementwise, so
        # bit for bit what two calls give).
        rotated = apply_rotary_pos_emb(
            torch.cat([query, key], dim=2), rotary_pos_emb[0][start:start + key.size(0)],
            config=self.config, mscale=_yarn_get_concentration_factor_from_config(self.config),
            cp_group=self.pg_collection.cp)
        query, key = rotated.split([query.size(2), key.size(2)], dim=2)
        # Nothing left to rotate: megatron-core's forward skips RoPE for a None embedding.
        return super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs)


def _decoding(linear: ColumnParallelLinear | RowParallelLinear) -> bool:
    """Whether ``linear``'s forward may run as a plain matmul: nothing is differentiated and no
    sequence parallelism or expert communication is configured."""
    return not (torch.is_grad_enabled() or linear.sequence_parallel
                or linear.explicit_expert_comm or linear.config.defer_embedding_wgrad_compute)


def _matmul(input_: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """What megatron-core's linear ``Function`` computes in its forward."""
    output = torch.matmul(input_, weight.t())
    return output if bias is None else output + bias


class DecodingColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear`` as a matmul (+ the TP all-gather of the output
    where it gathers) when decoding, outside autograd."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not _decoding(self) or (weight is None and self.weight is None):
            return super().forward(input_, weight, runtime_gather_output)
        output = _matmul(input_, self.weight if weight is None else weight,
                         None if self.skip_bias_add else self.bias)
        if self.gather_output if runtime_gather_output is None else runtime_gather_output:
            output = mappings._gather_along_last_dim(output, self.tp_group)
        return output, self.bias if self.skip_bias_add else None


class DecodingRowParallelLinear(RowParallelLinear):
    """megatron-core's ``RowParallelLinear`` as a matmul and the TP all-reduce when decoding,
    outside autograd."""

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not _decoding(self) or not self.input_is_parallel:
            return super().forward(input_)
        output = mappings._reduce(_matmul(input_, self.weight, None), self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output if self.bias is None else output + self.bias), None


_DECODING_CLASSES: dict[type, type] = {
    SelfAttention: DecodingSelfAttention,
    ColumnParallelLinear: DecodingColumnParallelLinear,
    RowParallelLinear: DecodingRowParallelLinear,
}


@contextlib.contextmanager
def decoding_layers(model: torch.nn.Module) -> Iterator[int]:
    """Run ``model``'s megatron-core modules as their decoding forms for the block (see the
    module docstring); yields how many modules were swapped. Classes are restored on exit."""
    swapped = [(module, type(module)) for module in model.modules()
               if type(module) in _DECODING_CLASSES]
    try:
        for module, cls in swapped:
            module.__class__ = _DECODING_CLASSES[cls]
        yield len(swapped)
    finally:
        for module, cls in swapped:
            module.__class__ = cls
