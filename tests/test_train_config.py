"""RunConfig: bad values raise before any work, naming the field and the value; schedules."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest

from nemo_opd.config import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    RunConfig,
    StrategyConfig,
)
from nemo_opd.rollout import SamplingParams
from nemo_opd.runtime import ParallelConfig
from nemo_opd.train import lr_scheduler

DATA = DataConfig(train_files=("train.jsonl",))
MODEL = ModelConfig(student="student_dir", teacher="teacher_dir")


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ModelConfig(student=""), "ModelConfig.student must be a non-empty path"),
    (lambda: ModelConfig(student="s", student_dtype="fp32"),
     "ModelConfig.student_dtype must be one of ('float32', 'bfloat16', 'float16'), got 'fp32'"),
    (lambda: QuantConfig(format="int3"), "QuantConfig.format must be one of"),
    (lambda: QuantConfig(lora_r=0), "QuantConfig.lora_r must be an int >= 1, got 0"),
    (lambda: DistillConfig(beta=-0.1), "DistillConfig.beta must be a number in [0, 1], got -0.1"),
    (lambda: DistillConfig(lmbda=2), "DistillConfig.lmbda must be a number in [0, 1], got 2"),
    (lambda: DistillConfig(temperature=0.0), "DistillConfig.temperature must be a finite number"),
    (lambda: DistillConfig(temperature=math.inf), "got inf"),
    (lambda: DistillConfig(loss="kl"), "DistillConfig.loss must be one of"),
    (lambda: DistillConfig(teacher_cache_dir="c"), "DistillConfig.teacher_cache_dir must be"),
    (lambda: OptimConfig(lr=0), "OptimConfig.lr must be a finite number > 0, got 0"),
    (lambda: OptimConfig(lr=1e-5, min_lr=1e-4), "OptimConfig.min_lr must be a number in"),
    (lambda: OptimConfig(grad_accumulation=0), "OptimConfig.grad_accumulation must be an int"),
    (lambda: OptimConfig(steps=True), "OptimConfig.steps must be an int >= 1, got True"),
    (lambda: DataConfig(train_files=("a.jsonl",), max_prompt_length=0),
     "DataConfig.max_prompt_length must be an int >= 1, got 0"),
    (lambda: DataConfig(train_files="a.jsonl"), "DataConfig.train_files must be a tuple"),
    (lambda: CheckpointConfig(keep_last=0), "CheckpointConfig.keep_last must be an int >= 1"),
    (lambda: LoggingConfig(every=0), "LoggingConfig.every must be an int >= 1, got 0"),
    (lambda: RunConfig(model=MODEL, data=DATA, output_dir=""), "RunConfig.output_dir must be"),
    (lambda: RunConfig(model=MODEL, data=DATA, seed=-1), "RunConfig.seed must be an int >= 0"),
    (lambda: RunConfig(model=dataclasses.replace(
        MODEL, student_parallel=ParallelConfig(2), teacher_parallel=ParallelConfig(3)),
        data=DATA, distill=DistillConfig(loss="topk")),
     "tensor_model_parallel_size = 3 and student_parallel.tensor_model_parallel_size = 2 must "
     "divide one another"),
    (lambda: RunConfig(model=dataclasses.replace(MODEL, teacher_parallel=ParallelConfig(2)),
                       data=DATA, distill=DistillConfig(
                           loss="topk", strategy=StrategyConfig(name="teacher_seeded"))),
     "'teacher_seeded' needs teacher TP (2) <= student TP (1)"),
    (lambda: RunConfig(model=dataclasses.replace(
        MODEL, student_parallel=ParallelConfig(2), teacher_parallel=ParallelConfig(1)),
        data=DATA), "DistillConfig.loss = 'full' needs the teacher's layout"),
    (lambda: RunConfig(model=MODEL, data=dataclasses.replace(DATA, response_field=""),
                       distill=DistillConfig(lmbda=0.5)),
     "DataConfig.response_field = '' (prompts only) but the run needs dataset responses"),
    (lambda: RunConfig(model=MODEL, data=DATA, distill=DistillConfig(
        loss="sampled", strategy=StrategyConfig(name="teacher_seeded", seed_prefix_loss=True))),
     "seed_prefix_loss = True cannot be used with DistillConfig.loss = 'sampled'"),
])
def test_bad_values_name_field_and_value(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)


def test_defaults_and_derived_paths():
    cfg = RunConfig(model=MODEL, data=DATA, sampling=SamplingParams(max_new_tokens=16))
    assert str(cfg.checkpoint_dir) == "runs/nemo_opd/checkpoints"
    assert cfg.distill.lmbda == 1.0 and cfg.distill.strategy.name == "on_policy_gkd"
    assert not cfg.model.self_distillation and cfg.model.tokenizer_path == "student_dir"
    assert ModelConfig(student="s").self_distillation
    assert cfg.to_dict()["distill"]["strategy"]["name"] == "on_policy_gkd"
    # Frozen: a run's configuration cannot drift.
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_learning_rate_warmup_then_cosine():
    """megatron's OptimizerParamScheduler, stepped as the trainer steps it: warmup without a
    step at lr 0, cosine reaching min_lr at the last step; weight decay only where wd_mult=1."""
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, steps=24, weight_decay=0.1)
    groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]
    scheduler = lr_scheduler(types.SimpleNamespace(param_groups=groups), cfg, 24)
    lrs = []
    for step in range(24):
        scheduler.num_steps = step
        scheduler.step(1)
        lrs.append(groups[0]["lr"])
        assert groups[1]["lr"] == groups[0]["lr"]
        assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    for s in range(4, 24):  # independent closed form of the cosine from lr to min_lr
        progress = (s + 1 - 4) / 20
        expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))
        assert lrs[s] == pytest.approx(expected, rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-4)
