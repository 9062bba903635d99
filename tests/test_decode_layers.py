"""Decoding forms of megatron-core's modules (nemo_opd.rollout.decode_layers): the megatron
engine's tokens and log-probs are bit-identical with and without them — Llama, Qwen3 (QK
layernorm), a Qwen3-MoE, bf16, an MXFP4 student with and without LoRA, TP=1 and TP=2 — keys are
rotated once each instead of the whole cached prefix every step, and training forwards and
gradients are megatron-core's, inside the block too."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks
from test_quantize_once import forward_and_grads, student

from nemo_opd.rollout import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
PREFIXES = [[], [15, 16], [17]]
CASES = {
    "greedy": SamplingParams(temperature=0.0, max_new_tokens=8),
    "sampled": SamplingParams(temperature=1.0, top_k=40, n=2, max_new_tokens=8, seed=3),
}


def _both_ways(model) -> dict[str, bool]:
    """``{case: tokens and log-probs equal}`` between the engine with and without decoding
    layers, with forced prefixes (unequal contexts) and ``n = 2`` shared prefills."""
    from nemo_opd.rollout import MegatronEngine

    fast = MegatronEngine(model, pad_id=0, eos_id=None)
    reference = MegatronEngine(model, pad_id=0, eos_id=None, decoding_layers=False)
    equal = {}
    for name, params in CASES.items():
        a = fast.generate(PROMPTS, params, forced_prefixes=PREFIXES)
        b = reference.generate(PROMPTS, params, forced_prefixes=PREFIXES)
        # generated in inference mode, handed out as tensors autograd may use
        assert not any(t.is_inference() for t in (a.tokens, a.logprobs, a.lengths, a.stopped))
        equal[name] = torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    return equal


def _same(a: tuple, b: tuple) -> bool:
    return (torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys()
            and all(torch.equal(a[1][k], b[1][k]) for k in a[1]))


def _model_checks(model_dir: str, tp: int = 1, dtype: torch.dtype = torch.float32,
                  fmt: str | None = None, lora: bool = False) -> dict:
    from nemo_opd.rollout.decode_layers import decoding_layers
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=tp)):
        model = student(model_dir, tp, fmt, lora, dtype)
        classes = [type(m) for m in model.modules()]
        before = forward_and_grads(model)
        equal = _both_ways(model)
        with decoding_layers(model) as swapped:
            inside = forward_and_grads(model)  # grad enabled: megatron-core's own paths
        return {"equal": equal, "swapped": swapped,
                "classes_back": [type(m) for m in model.modules()] == classes,
                "train_same_inside": _same(before, inside),
                "train_same_after": _same(before, forward_and_grads(model)),
                "layers": len(model.decoder.layers)}


def _assert_checks(out: dict, per_layer: int) -> None:
    assert all(out["equal"].values()), out["equal"]
    # per layer: the attention and its linears (+ MLP linears); + the output layer
    assert out["swapped"] == per_layer * out["layers"] + 1, out
    assert out["classes_back"] and out["train_same_inside"] and out["train_same_after"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_bit_identical_tp1(tiny_model_dirs, family, dtype):
    # SelfAttention, linear_qkv, linear_proj, linear_fc1, linear_fc2
    _assert_checks(_model_checks(tiny_model_dirs[family], dtype=dtype), per_layer=5)


@pytest.mark.parametrize("lora", [False, True])
def test_engine_bit_identical_quantized(tiny_quant_model_dir, lora):
    out = _model_checks(tiny_quant_model_dir, fmt="mxfp4", lora=lora)
    assert all(out["equal"].values()), out["equal"]
    # Outside a rollout every linear is a ModelOpt class (the output layer too, its quantizers
    # off): only the attention modules are megatron-core's own, and LoRA's adapter linears.
    assert (out["swapped"] > out["layers"]) if lora else (out["swapped"] == out["layers"]), out
    assert out["classes_back"] and out["train_same_inside"] and out["train_same_after"]


def test_engine_bit_identical_moe(tiny_moe_model_dir):
    out = _model_checks(tiny_moe_model_dir)
    assert all(out["equal"].values()), out["equal"]
    assert out["swapped"] > out["layers"] + 1
    assert out["classes_back"] and out["train_same_inside"] and out["train_same_after"]


@pytest.mark.multirank
def test_engine_bit_identical_tp2(tiny_model_dirs):
    for out in run_ranks(_model_checks, 2, model_dir=tiny_model_dirs["qwen3"], tp=2):
        _assert_checks(out, per_layer=5)


def test_each_key_is_rotated_once(tiny_model_dirs, monkeypatch):
    """With the static KV cache megatron-core rotates the whole cached prefix at every step;
    the decoding attention rotates only the positions fed in that step, queries and keys in
    one call."""
    import megatron.core.transformer.attention as mcore_attention

    import nemo_opd.rollout.decode_layers as decode_layers
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.rollout import MegatronEngine
    from nemo_opd.runtime import distributed_runtime

    def spy(module, real):
        def rotate(t, freqs, *args, **kwargs):
            rotated[module].append(t.shape[0])
            return real(t, freqs, *args, **kwargs)
        return rotate

    rotated = {"megatron": [], "decoding": []}
    monkeypatch.setattr(mcore_attention, "apply_rotary_pos_emb",
                        spy("megatron", mcore_attention.apply_rotary_pos_emb))
    monkeypatch.setattr(decode_layers, "apply_rotary_pos_emb",
                        spy("decoding", decode_layers.apply_rotary_pos_emb))
    params = SamplingParams(temperature=0.0, max_new_tokens=6, min_new_tokens=6)
    with distributed_runtime():
        model = load_hf_gpt(tiny_model_dirs["llama"])
        layers = len(model.decoder.layers)
        MegatronEngine(model, pad_id=0, eos_id=None).generate([[5, 6, 7, 8]], params)
        assert rotated["megatron"] == []
        # the prefill (4 positions), then one position per step, once per layer
        assert rotated["decoding"] == [4] * layers + [1] * (5 * layers)
        MegatronEngine(model, pad_id=0, eos_id=None, decoding_layers=False).generate(
            [[5, 6, 7, 8]], params)
        keys = rotated["megatron"][1::2]  # megatron-core: query, then key, per layer
        assert keys == [n for n in range(4, 10) for _ in range(layers)]
