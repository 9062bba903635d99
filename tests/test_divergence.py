"""Divergence: the guard's rules against hand-made metric sequences, a run at a learning rate
far too high stopping with the step and the quantity named and its last good checkpoint kept,
and non-finite rollout logits refused before torch's sampler sees them."""

from __future__ import annotations

import math

import pytest
import torch
from multirank import run_ranks

from nemo_opd.rollout import SamplingParams
from nemo_opd.rollout.sampling import sample_tokens
from nemo_opd.train.divergence import DivergenceError, DivergenceGuard


def _steps(guard: DivergenceGuard, values: list[dict]) -> int | None:
    """The step at which ``guard`` stops, or None."""
    for step, metrics in enumerate(values):
        try:
            guard.check(step, {"grad_norm": 1.0, **metrics})
        except DivergenceError:
            return step
    return None


@pytest.mark.parametrize(("values", "stops_at"), [
    # A falling loss, and a small KL growing 50x below the 1-nat floor: no divergence.
    ([{"loss": 2.0 - 0.1 * i, "forward_kl": 1e-3 * (1 + 10 * i)} for i in range(8)], None),
    # The lr=1e6 collapse seen in the demo: forward KL ~3e14 from step 4 on.
    ([{"loss": 2.0, "forward_kl": 0.5}] * 4 + [{"loss": 15.0, "forward_kl": 3e14}], 4),
    # A loss 12x its running level (2 nats) after warm-up.
    ([{"loss": 2.0}] * 3 + [{"loss": 24.0}], 3),
    # The same jump before the warm-up has seen 3 steps: not judged yet.
    ([{"loss": 2.0}] * 2 + [{"loss": 24.0}], None),
    # Zero gradient norm with a non-zero loss stops at once; NaN metrics are skipped (they are
    # stop_if_nonfinite's job, and None is how a NaN mean is reported).
    ([{"loss": 2.0, "grad_norm": 0.0}], 0),
    ([{"loss": None, "reverse_kl": math.nan}] * 5, None),
])
def test_guard_rules(values, stops_at):
    assert _steps(DivergenceGuard(), values) == stops_at


def test_guard_factor_zero_keeps_only_the_zero_gradient_check():
    guard = DivergenceGuard(0.0)
    assert _steps(guard, [{"loss": 2.0}] * 3 + [{"loss": 1e9}]) is None
    assert _steps(guard, [{"loss": 2.0, "grad_norm": 0.0}]) == 0


def test_nonfinite_rollout_logits_are_named():
    logits = torch.zeros(2, 8)
    logits[1, 3] = math.nan
    with pytest.raises(FloatingPointError, match=r"non-finite logits .*1 NaN, 0 inf of 16"):
        sample_tokens(logits, SamplingParams(temperature=1.0))


def _divergent_run(dirs: dict[str, str], train_file: str, root: str) -> dict:
    from nemo_opd.config import (
        CheckpointConfig,
        DataConfig,
        DistillConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        QuantConfig,
        RunConfig,
    )
    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import latest_checkpoint, run_distillation

    cfg = RunConfig(
        model=ModelConfig(student=dirs["llama"], teacher=dirs["qwen3"]),
        data=DataConfig(train_files=(train_file,), max_response_length=8),
        quant=QuantConfig(format="mxfp4", calibration_batches=1),
        distill=DistillConfig(lmbda=0.5, beta=0.5),
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
        optim=OptimConfig(steps=12, micro_batch_size=2, lr=1e6, warmup_steps=0, grad_clip=0.0,
                          min_lr=1e6),
        checkpoint=CheckpointConfig(save_every=1, keep_last=2),
        logging=LoggingConfig(progress_bar=False, tensorboard=False), output_dir=root, seed=7)
    with distributed_runtime(ParallelConfig(), seed=7):
        try:
            run_distillation(cfg)
        except DivergenceError as err:
            return {"error": str(err), "kind": type(err).__name__,
                    "latest": latest_checkpoint(cfg.checkpoint_dir).name,
                    "jsonl": open(f"{root}/metrics.jsonl").read()}
    return {"error": None}


@pytest.mark.multirank
def test_a_learning_rate_far_too_high_stops_before_saving_the_collapse(tiny_model_dirs,
                                                                        train_file, tmp_path):
    import re

    (out,) = run_ranks(_divergent_run, world_size=1, dirs=tiny_model_dirs,
                       train_file=train_file, root=str(tmp_path))
    assert out["error"] is not None, "the run finished all 12 steps"
    step = int(re.search(r"training stopped at step (\d+)", out["error"]).group(1))
    assert re.search(r"(loss|forward_kl|reverse_kl|gradient norm)", out["error"]), out["error"]
    # Saved after every completed step before the divergent one, never at or after it.
    assert out["latest"] == f"step_{step:08d}", (out["latest"], out["error"])
    assert f"the last good checkpoint is {tmp_path}/checkpoints/step_{step:08d}" in out["error"]
    assert "divergence_stop" in out["jsonl"]
