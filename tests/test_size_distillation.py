"""Size distillation from a mixture-of-experts teacher, end to end through the trainer on two
gloo ranks: a dense student with fewer layers and a smaller hidden size than a tiny Qwen3-MoE
teacher (same tokenizer).

* the teacher on its own layout, experts split over the two ranks (EP=2) or its layers over
  TP=2, scores exactly as the same teacher whole on each rank (top-k losses equal);
* an on-policy run against the EP=2 teacher lowers the loss;
* teacher-seeded rollouts: the MoE teacher writes the prefixes;
* bad input (EP not dividing the experts, an MoE student, another tokenizer) is refused by
  ``check_models`` before any weight loads.
"""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

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


@pytest.fixture(scope="module")
def small_student_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A dense Qwen3 of 1 layer and hidden 32 (the MoE teacher: 3 layers, hidden 64)."""
    from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model

    spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("small") / "student", "qwen3", spec,
                                  seed=21, tokenizer=tiny_tokenizer))


def _config(student: str, teacher: str, train_file: str, out: str, teacher_parallel=None,
            **changes) -> RunConfig:
    fields = dict(
        model=ModelConfig(student=student, teacher=teacher,
                          teacher_parallel=teacher_parallel or ParallelConfig()),
        data=DataConfig(train_files=(train_file,), max_response_length=8, shuffle=False),
        quant=QuantConfig(format="mxfp4", calibration_batches=1),
        distill=DistillConfig(lmbda=0.0, beta=0.5, loss="topk", topk=16),
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
        optim=OptimConfig(steps=3, micro_batch_size=2, lr=3e-3, warmup_steps=1),
        checkpoint=CheckpointConfig(save_every=0),
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
        output_dir=out, seed=7)
    return RunConfig(**{**fields, **changes})


def _size_distillation_job(student: str, teacher: str, train_file: str, root: str) -> dict:
    from nemo_opd.runtime import distributed_runtime
    from nemo_opd.train import run_distillation

    def losses(name: str, **changes) -> list[float]:
        cfg = _config(student, teacher, train_file, f"{root}/{name}", **changes)
        return [h["loss"] for h in run_distillation(cfg).history]

    out = {}
    with distributed_runtime(ParallelConfig(), seed=7):  # student TP=1, 2 data-parallel ranks
        out["whole"] = losses("whole")
        out["ep2"] = losses("ep2", teacher_parallel=ParallelConfig(expert_model_parallel_size=2))
        out["tp2"] = losses("tp2", teacher_parallel=ParallelConfig(2))
        out["on_policy"] = losses(
            "on_policy", teacher_parallel=ParallelConfig(expert_model_parallel_size=2),
            distill=DistillConfig(lmbda=1.0, beta=0.5, loss="topk", topk=16),
            optim=OptimConfig(steps=16, micro_batch_size=4, lr=1e-2, warmup_steps=2))
        seeded = _config(student, teacher, train_file, f"{root}/seeded", distill=DistillConfig(
            lmbda=1.0, loss="topk", topk=16, strategy=StrategyConfig(
                name="teacher_seeded", seed_tokens=4, seed_decay_steps=2)))
        out["seeded_prefixes"] = [h["teacher_prefix_length"]
                                  for h in run_distillation(seeded).history]
    return out


@pytest.mark.multirank
def test_size_distillation_from_an_moe_teacher(small_student_dir, tiny_moe_model_dir,
                                               train_file, tmp_path):
    results = run_ranks(_size_distillation_job, world_size=2, timeout=900,
                        student=small_student_dir, teacher=tiny_moe_model_dir,
                        train_file=train_file, root=str(tmp_path))
    for out in results:
        whole = torch.tensor(out["whole"])
        # The experts' or the layers' split changes float summation order only.
        torch.testing.assert_close(torch.tensor(out["ep2"]), whole, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(torch.tensor(out["tp2"]), whole, rtol=1e-4, atol=1e-7)
        on_policy = out["on_policy"]
        assert sum(on_policy[-4:]) / 4 < 0.8 * sum(on_policy[:4]) / 4, on_policy
        assert out["seeded_prefixes"][0] > 0 and out["seeded_prefixes"][-1] == 0, out
    assert results[0] == results[1]  # metrics are reduced over the data-parallel ranks


def _check(student: str, teacher: str, train_file: str, tmp_path, world_size: int = 2,
           **parallel) -> None:
    from nemo_opd.train.setup import check_models, load_tokenizer

    cfg = _config(student, teacher, train_file, str(tmp_path),
                  teacher_parallel=ParallelConfig(**parallel))
    check_models(cfg, world_size, load_tokenizer(student), ["question: what is 3 plus 4?"])


def test_bad_size_distillation_inputs_are_refused_before_any_weight(
        small_student_dir, tiny_moe_model_dir, tiny_model_dirs, train_file, tmp_path):
    from nemo_opd.models.tiny import make_tiny_hf_model, make_tiny_tokenizer

    _check(small_student_dir, tiny_moe_model_dir, train_file, tmp_path,
           expert_model_parallel_size=2)  # fits: 4 experts over 2 ranks
    with pytest.raises(ValueError, match=r"model.teacher_parallel does not fit .*tiny_moe.*"
                                         r"num_experts = 4 is not divisible by "
                                         r"expert_model_parallel_size = 3"):
        _check(small_student_dir, tiny_moe_model_dir, train_file, tmp_path, world_size=3,
               expert_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"expert_model_parallel_size = 2 must divide the "
                                         r"data-parallel size 1"):
        _check(small_student_dir, tiny_moe_model_dir, train_file, tmp_path, world_size=2,
               tensor_model_parallel_size=2, expert_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"is a mixture-of-experts model \(Qwen3MoeForCausalLM\);"
                                         r" the student must be dense"):
        _check(tiny_moe_model_dir, tiny_model_dirs["qwen3"], train_file, tmp_path)
    other = make_tiny_hf_model(tmp_path / "other_tokenizer", "qwen3", seed=4,
                               tokenizer=make_tiny_tokenizer(seed=5))
    with pytest.raises(ValueError, match="vocabularies disagree.*tokenize differently"):
        _check(small_student_dir, str(other), train_file, tmp_path)
    with pytest.raises(ValueError, match="expert_model_parallel_size = 1: the student is a "
                                         "dense model"):
        ModelConfig(student=small_student_dir,
                    student_parallel=ParallelConfig(expert_model_parallel_size=2))
    with pytest.raises(ValueError, match="teacher_seeded' needs .* teacher EP = 1 \\(got 2\\)"):
        _config(small_student_dir, tiny_moe_model_dir, train_file, str(tmp_path),
                teacher_parallel=ParallelConfig(expert_model_parallel_size=2),
                distill=DistillConfig(strategy=StrategyConfig(name="teacher_seeded")))
