"""Core attention of megatron's local layer spec through ``torch.nn.functional.
scaled_dot_product_attention`` (SDPA): PyTorch's fused kernels on CPU and GPU, grouped-query
attention without materialising repeated key/value heads (``enable_gqa``).

megatron-core's local ``DotProductAttention`` repeats every KV head for GQA, forms the whole
``[b, np, sq, sk]`` score tensor with ``baddbmm`` and applies a separate softmax: in decoding
(one query per row against the whole KV cache) that is most of a step's time on CPU.
:class:`SDPAttention` is the same module (its parameters, config and checks) with a forward that
hands the same computation to SDPA; the cases SDPA cannot express the same way (a learnable
softmax offset, an attention bias, a causal mask with fewer queries than keys, attention dropout
in training, which megatron draws from its RNG tracker) fall back to megatron's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

__all__ = ["SDPAttention"]


class SDPAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` computed by SDPA (see the module docstring).

    Shapes as megatron's: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``; returns
    ``[sq, b, np * hn]``. ``attention_mask`` (megatron: True = masked out) or, without one, the
    mask type (causal: position ``i`` attends to ``j <= i``; no_mask: to every key).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None
                ) -> torch.Tensor:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        dropout = self.config.attention_dropout if self.training else 0.0
        if (self.softmax_offset is not None or attention_bias is not None or dropout
                or packed_seq_params is not None or (causal and query.shape[0] != key.shape[0])
                or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask)):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and q.shape[2] > 1,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
