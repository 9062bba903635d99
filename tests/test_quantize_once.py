"""Quantize once per rollout (nemo_opd.quant.student.weights_quantized_once): the megatron engine's
tokens and log-probs are bit-identical to quantizing the weights in every forward, for INT4,
MXFP4, NVFP4 and FP8, with and without LoRA adapters, at TP=1 and TP=2; afterwards the training
forward and its gradients are exactly what they were."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

from nemo_opd.rollout import SamplingParams

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
PARAMS = SamplingParams(temperature=1.0, top_k=50, n=2, max_new_tokens=10, seed=7)


def _generate_per_token(engine, params: SamplingParams):
    """The reference: the same engine call with every quantizer left on (re-quantizing in
    every forward), by making the once-per-call path a no-op."""
    import contextlib

    import nemo_opd.rollout.megatron_engine as megatron_engine

    real = megatron_engine.weights_quantized_once
    megatron_engine.weights_quantized_once = lambda model: contextlib.nullcontext(0)
    try:
        return engine.generate(PROMPTS, params)
    finally:
        megatron_engine.weights_quantized_once = real


def forward_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    positions = torch.arange(tokens.shape[1])[None]
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, None, runtime_gather_output=True)
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().clone(), grads


def student(model_dir: str, tp: int, fmt: str | None, lora: bool,
            dtype: torch.dtype = torch.float32):
    """The model at TP = ``tp`` in ``dtype``, quantized to ``fmt`` (None: not), with non-zero
    LoRA adapters (so they change the outputs) when ``lora``. Call inside a runtime."""
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.lora import add_lora
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.runtime import ParallelConfig

    model = load_hf_gpt(model_dir, ParallelConfig(tensor_model_parallel_size=tp), dtype=dtype)
    if fmt:
        quantize_student(model, fmt)
    if lora:
        add_lora(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_b" in name:
                    param.copy_(torch.randn_like(param) * 0.05)
    return model


def _checks(model_dir: str, fmt: str, lora: bool, tp: int) -> dict:
    from nemo_opd.quant.student import enabled_quantizers, weights_quantized_once
    from nemo_opd.rollout import MegatronEngine
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=tp)):
        model = student(model_dir, tp, fmt, lora)
        engine = MegatronEngine(model, pad_id=0, eos_id=None)
        before = forward_and_grads(model)
        quantizers = enabled_quantizers(model)
        per_token = _generate_per_token(engine, PARAMS)
        once = engine.generate(PROMPTS, PARAMS)
        with weights_quantized_once(model) as count:
            nested = engine.generate(PROMPTS, PARAMS)  # already quantized: nothing more to do
            plain_inside = _plain_linears(model)
        after = forward_and_grads(model)
        return {
            "count": count,
            "weight_quantizers": len(quantizers["weight"]),
            "tokens_equal": torch.equal(per_token.tokens, once.tokens)
            and torch.equal(once.tokens, nested.tokens),
            "logprobs_equal": torch.equal(per_token.logprobs, once.logprobs)
            and torch.equal(once.logprobs, nested.logprobs),
            "quantizers_back": enabled_quantizers(model) == quantizers,
            "logits_equal": torch.equal(before[0], after[0]),
            "grads_equal": before[1].keys() == after[1].keys()
            and all(torch.equal(before[1][k], after[1][k]) for k in before[1]),
            "lora_grads": sum("lora" in k for k in after[1]),
            "plain_inside": plain_inside,
            "plain_after": _plain_linears(model),
            "linears": sum(hasattr(m, "weight_quantizer") for m in model.modules()),
        }


def _plain_linears(model) -> int:
    """Linears with a weight quantizer that currently run as their original megatron class."""
    from modelopt.torch.opt.dynamic import DynamicModule

    return sum(hasattr(m, "weight_quantizer") and not isinstance(m, DynamicModule)
               for m in model.modules())


@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "nvfp4", "fp8"])
@pytest.mark.parametrize("lora", [False, True])
def test_rollouts_bit_identical_tp1(tiny_quant_model_dir, fmt, lora):
    out = _checks(tiny_quant_model_dir, fmt, lora, 1)
    assert out["count"] == out["weight_quantizers"] > 0
    assert out["tokens_equal"] and out["logprobs_equal"]
    assert out["quantizers_back"] and out["logits_equal"] and out["grads_equal"]
    assert (out["lora_grads"] > 0) is lora
    # Inside the block, weight-only formats without LoRA run every linear as its plain megatron
    # class; NVFP4 and FP8 quantize activations and LoRA adds adapters, so the quantized linears
    # keep ModelOpt's classes (only the unquantized output layer runs plain). Never after.
    weight_only = fmt in ("int4", "mxfp4") and not lora
    expected = out["linears"] if weight_only else out["linears"] - out["weight_quantizers"]
    assert out["plain_inside"] == expected, out
    assert out["plain_after"] == 0


def test_quantizers_that_still_compute_keep_the_quantized_class(tiny_quant_model_dir):
    """A disabled input quantizer with an AWQ pre_quant_scale still scales its input: such a
    linear must not run as its plain class."""
    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.student import _plain_class, quantize_student
    from nemo_opd.runtime import distributed_runtime

    with distributed_runtime():
        model = load_hf_gpt(tiny_quant_model_dir)
        quantize_student(model, "int4")
        linear = model.decoder.layers[0].mlp.linear_fc2
        assert not linear.input_quantizer.is_enabled
        linear.weight_quantizer.disable()
        assert _plain_class(linear) is not None  # everything passes through
        linear.input_quantizer.pre_quant_scale = torch.ones(linear.weight.shape[1])
        assert _plain_class(linear) is None


@pytest.mark.multirank
def test_rollouts_bit_identical_tp2(tiny_quant_model_dir):
    results = run_ranks(_checks, 2, model_dir=tiny_quant_model_dir, fmt="mxfp4", lora=True, tp=2)
    for out in results:
        assert out["count"] == out["weight_quantizers"] > 0
        assert out["tokens_equal"] and out["logprobs_equal"]
        assert out["quantizers_back"] and out["logits_equal"] and out["grads_equal"]
