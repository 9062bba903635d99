"""SDPAttention (the local spec's core attention through torch SDPA) against megatron's own
DotProductAttention on the same inputs: causal prefill, decode against a longer KV cache (no
mask), an explicit mask, grouped-query attention, fp32 and bf16, forward and gradients."""

from __future__ import annotations

import pytest
from multirank import run_ranks


def _compare(dtype_name: str) -> dict:
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import nemo_opd.models.attention as attention
    from nemo_opd.models.attention import SDPAttention
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    dtype = getattr(torch, dtype_name)
    out = {}
    sdpa_calls = []
    real_sdpa = attention.F.scaled_dot_product_attention
    attention.F = type("F", (), {"scaled_dot_product_attention": staticmethod(
        lambda *a, **k: sdpa_calls.append(k["enable_gqa"]) or real_sdpa(*a, **k))})
    with distributed_runtime(ParallelConfig(1)):
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=8,
                                   num_query_groups=2, use_cpu_initialization=True,
                                   attention_dropout=0.0, bf16=dtype == torch.bfloat16,
                                   params_dtype=dtype)
        ours = SDPAttention(config, 1, AttnMaskType.causal, "self")
        theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self")
        gen = torch.Generator().manual_seed(0)
        b, hn = 3, 8
        cases = {
            "causal_prefill": (7, 7, None, None),
            "decode_no_mask": (1, 9, None, AttnMaskType.no_mask),
            "explicit_mask": (5, 5, torch.rand(b, 1, 5, 5, generator=gen) > 0.7, None),
        }
        for name, (sq, sk, mask, mask_type) in cases.items():
            if mask is not None:
                mask[..., 0] = False  # every query attends to something
            q = torch.randn(sq, b, 8, hn, generator=gen).to(dtype).requires_grad_()
            k = torch.randn(sk, b, 2, hn, generator=gen).to(dtype).requires_grad_()
            v = torch.randn(sk, b, 2, hn, generator=gen).to(dtype).requires_grad_()
            results = []
            for module in (ours, theirs):
                output = module(q, k, v, mask, attn_mask_type=mask_type)
                grads = torch.autograd.grad(output.float().square().sum(), (q, k, v))
                results.append((output.float(), [g.float() for g in grads]))
            (o1, g1), (o2, g2) = results
            out[name] = {"shape": tuple(o1.shape) == (sq, b, 8 * hn),
                         "out_err": float((o1 - o2).abs().max()),
                         "grad_err": max(float((a - c).abs().max())
                                         for a, c in zip(g1, g2, strict=True))}
    out["sdpa_calls"] = sdpa_calls  # ours went through SDPA (GQA without repeated heads)
    return out


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 2e-6), ("bfloat16", 3e-2)])
def test_sdpa_attention_equals_megatron_dot_product_attention(dtype, tol):
    (out,) = run_ranks(_compare, world_size=1, dtype_name=dtype)
    assert out.pop("sdpa_calls") == [True, True, True]
    for name, case in out.items():
        assert case["shape"], name
        assert case["out_err"] < tol, (name, case)
        assert case["grad_err"] < tol * 10, (name, case)
