"""Step-wide rollout batching (issue 14): the engine is called with all of a step's prompts
(``rollout.batch_size=0``) or in calls of ``rollout.batch_size`` prompts, independent of the
micro-batch size; the scored micro batches hold the same rows either way, so greedy rollouts
give the same losses whatever the rollout batch."""

from __future__ import annotations

import dataclasses

from multirank import run_ranks

from nemo_opd.config import (
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    RolloutConfig,
    RunConfig,
)
from nemo_opd.rollout import SamplingParams


class RecordingEngine:
    """The real MegatronEngine; records how many prompts each call had."""

    def __init__(self, model, tp_group, calls: list[int], pad_id: int, eos_id: int) -> None:
        from nemo_opd.rollout.megatron_engine import MegatronEngine

        self.inner = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id, tp_group=tp_group)
        self.calls = calls

    def generate(self, prompts, params, forced_prefixes=None):
        self.calls.append(len(prompts))
        return self.inner.generate(prompts, params, forced_prefixes)

    def update_weights(self, model) -> None:
        self.inner.update_weights(model)


def _runs(dirs: dict[str, str], train_file: str, root: str) -> dict:
    from transformers import AutoTokenizer

    from nemo_opd.train import run_distillation

    tok = AutoTokenizer.from_pretrained(dirs["llama"])
    base = RunConfig(
        model=ModelConfig(student=dirs["llama"], teacher=dirs["qwen3"]),
        data=DataConfig(train_files=(train_file,), max_response_length=8, shuffle=False),
        quant=QuantConfig(format="mxfp4", calibration_batches=1),
        distill=DistillConfig(lmbda=1.0, beta=0.5),
        sampling=SamplingParams(max_new_tokens=5, temperature=0.0, n=2),
        optim=OptimConfig(steps=2, micro_batch_size=2, grad_accumulation=2, lr=3e-3,
                          warmup_steps=0),
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
        output_dir=root, seed=7)
    out = {}
    for batch_size in (0, 3, 1):
        calls: list[int] = []
        cfg = dataclasses.replace(base, rollout=RolloutConfig(batch_size=batch_size),
                                  output_dir=f"{root}/bs{batch_size}")
        result = run_distillation(cfg, engine_factory=lambda model, group, calls=calls:
                                  RecordingEngine(model, group, calls, tok.pad_token_id,
                                                  tok.eos_token_id))
        out[batch_size] = {"calls": calls, "losses": [h["loss"] for h in result.history]}
    return out


def test_rollouts_are_batched_per_step_not_per_micro_batch(tiny_model_dirs, train_file,
                                                           tmp_path):
    (out,) = run_ranks(_runs, world_size=1, dirs=tiny_model_dirs, train_file=train_file,
                       root=str(tmp_path))
    # 2 micro batches x 2 prompts per step: one call of 4 prompts, or 3 + 1, or 4 x 1.
    assert out[0]["calls"] == [4, 4]
    assert out[3]["calls"] == [3, 1, 3, 1]
    assert out[1]["calls"] == [1] * 8
    # Greedy: the same rollouts, so the same micro batches and losses.
    for batch_size in (3, 1):
        assert all(abs(a - b) < 1e-6 for a, b in zip(out[batch_size]["losses"],
                                                     out[0]["losses"], strict=True))


def _prefill_rows(model_dir: str) -> dict:
    import torch

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.rollout import MegatronEngine
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    with distributed_runtime(ParallelConfig(1)):
        model = load_hf_gpt(model_dir, ParallelConfig(1))
        fed: list[tuple[int, int]] = []
        model.register_forward_pre_hook(lambda module, args: fed.append(tuple(args[0].shape)))
        engine = MegatronEngine(model, pad_id=0, eos_id=None)
        no_cache = MegatronEngine(model, pad_id=0, eos_id=None, use_kv_cache=False)
        params = SamplingParams(temperature=1.0, n=3, max_new_tokens=4, seed=3)
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        shared = engine.generate(prompts, params)
        calls = list(fed)
        reference = no_cache.generate(prompts, params)
        return {"calls": calls, "tokens_equal": torch.equal(shared.tokens, reference.tokens),
                "logprob_err": float((shared.logprobs - reference.logprobs).abs().max())}


def test_samples_of_a_prompt_share_one_prefill(tiny_model_dirs):
    """n = 3 samples of 2 prompts: the prefill runs on 2 rows (one per prompt; its KV cache is
    copied), the decode steps on all 6; tokens and log-probs as recomputing without a cache."""
    (out,) = run_ranks(_prefill_rows, world_size=1, model_dir=tiny_model_dirs["llama"])
    assert out["calls"][0] == (2, 3)  # prompts' common length 3: one row per prompt
    assert out["calls"][1] == (6, 1)  # then one token per row, all six
    assert out["tokens_equal"] and out["logprob_err"] < 1e-5
