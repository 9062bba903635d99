"""Pipeline parallelism through megatron-core's schedules, on gloo ranks.

* PP=2 equals PP=1 (fp32): per-step losses and gradient norms of off-policy training (the
  loss on the last stage inside megatron's 1F1B schedule, backward through both stages), with
  the teacher scoring through the same PP=2 pipeline;
* a teacher on its own PP=2 layout next to a PP=1 student (DP=2, top-k loss) equals a whole
  teacher: its pipeline scores both ranks' batches and broadcasts the top-k;
* a PP=2 run stopped and resumed from its checkpoint reproduces the uninterrupted losses, and
  its export (restored whole from the checkpoint, no rerun) equals a single-process export;
* bad layouts (PP not dividing the layers, rollouts at PP>1, the full-vocabulary loss across
  layouts, sequence parallel on CPU, recompute groups larger than a stage) are refused before
  any weight loads.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

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
)
from nemo_opd.rollout import SamplingParams
from nemo_opd.runtime import ParallelConfig


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
        # Export straight from the PP=2 run: restored whole from its checkpoint.
        from nemo_opd.launch.plans import ExportPlan
        from nemo_opd.launch.stages import export_trained_student
        from nemo_opd.runtime import distributed_runtime

        with distributed_runtime(resume.model.student_parallel, seed=7):
            export_trained_student(None, resume, ExportPlan(dir=f"{root}/export_pp2"))
    return out


def _teacher_pp_body(dirs: dict[str, str], train_file: str, root: str) -> dict:
    """A PP=1 student on 2 ranks (DP=2) with its teacher at PP=1 and on its own PP=2 layout
    (top-k loss): the teacher pipeline scores both ranks' batches in one pass."""
    import torch.distributed as dist

    from nemo_opd.train import run_distillation

    dist.init_process_group("gloo")
    out = {}
    for teacher_pp in (1, 2):
        model = ModelConfig(student=dirs["llama"], teacher=dirs["qwen3"],
                            teacher_parallel=ParallelConfig(1, teacher_pp))
        cfg = _config(dirs, train_file, f"{root}/teacher_pp{teacher_pp}", pp=1, model=model,
                      distill=DistillConfig(lmbda=0.0, beta=0.5, loss="topk", topk=16))
        out[teacher_pp] = _history(run_distillation(cfg))
    return out


@pytest.mark.multirank
def test_teacher_on_its_own_pipeline_equals_a_whole_teacher(tiny_model_dirs, train_file,
                                                            tmp_path):
    ranks = run_ranks(_teacher_pp_body, world_size=2, timeout=600, dirs=tiny_model_dirs,
                      train_file=train_file, root=str(tmp_path))
    for out in ranks:
        for whole, piped in zip(out[1], out[2], strict=True):
            # loss, grad norm and teacher NLL; the KL metrics are full-vocabulary on one
            # layout and over top-k buckets across layouts, by definition.
            loss, norm, _, nll = piped
            assert (loss, norm, nll) == pytest.approx((whole[0], whole[1], whole[3]),
                                                      rel=1e-5, abs=1e-6)
    assert ranks[0] == ranks[1]


def _export_at_tp1(cfg: RunConfig, export_dir: str) -> None:
    """The reference: the same checkpoint restored and exported in a world of one."""
    from nemo_opd.launch.plans import ExportPlan
    from nemo_opd.launch.stages import export_trained_student, whole_student_from_checkpoint
    from nemo_opd.runtime import distributed_runtime

    whole_cfg = _config_like(cfg)
    with distributed_runtime(ParallelConfig(), seed=7):
        student, _ = whole_student_from_checkpoint(whole_cfg)
        export_trained_student(student, whole_cfg, ExportPlan(dir=export_dir))


def _config_like(cfg: RunConfig) -> RunConfig:
    model = dataclasses.replace(cfg.model, student_parallel=ParallelConfig(),
                                teacher_parallel=ParallelConfig())
    return dataclasses.replace(cfg, model=model)


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
    # The export of the PP=2 run equals one made from its checkpoint in a single process.
    resume = _config(tiny_model_dirs, train_file, f"{tmp_path}/resume", pp=2)
    _export_at_tp1(resume, f"{tmp_path}/export_tp1")
    pp2_export = _exported_tensors(tmp_path / "export_pp2")
    tp1_export = _exported_tensors(tmp_path / "export_tp1")
    assert pp2_export.keys() == tp1_export.keys() and len(pp2_export) > 10
    for name, tensor in tp1_export.items():
        assert torch.equal(pp2_export[name], tensor), name


def _exported_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _bad(dirs: dict[str, str], train_file: str, out: str, **changes) -> RunConfig:
    return _config(dirs, train_file, out, pp=1, **changes)


def test_bad_layouts_refused_before_weights_load(tiny_model_dirs, train_file, tmp_path):
    from nemo_opd.models import read_hf_config, transformer_config

    with pytest.raises(ValueError, match="rollouts.*tensor parallelism"):
        _bad(tiny_model_dirs, train_file, str(tmp_path), model=ModelConfig(
            student="s", student_parallel=ParallelConfig(1, 2),
            teacher_parallel=ParallelConfig(1, 2)), distill=DistillConfig(lmbda=0.5))
    with pytest.raises(ValueError, match="loss = 'full' needs the teacher's layout"):
        _bad(tiny_model_dirs, train_file, str(tmp_path), model=ModelConfig(
            student="s", teacher_parallel=ParallelConfig(1, 2)))
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


def _count(calls: collections.Counter, name: str, *_: object) -> None:
    calls[name] += 1


def test_recompute_recomputes_with_equal_gradients(tiny_model_dirs):
    """megatron's selective/full recompute on CPU (accommodation 6): the layers' forward runs
    again in backward, and the gradients are bit-identical to no recompute."""
    from nemo_opd.models import RecomputeConfig, load_hf_gpt
    from nemo_opd.models.pipeline import model_logits
    from nemo_opd.runtime import distributed_runtime

    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    with distributed_runtime(ParallelConfig(), seed=5):
        for recompute in (RecomputeConfig(), RecomputeConfig("selective"),
                          RecomputeConfig("full", "uniform", 1),
                          RecomputeConfig("full", "block", 2)):
            model = load_hf_gpt(tiny_model_dirs["qwen3"], recompute=recompute)
            calls = collections.Counter()
            for layer in model.decoder.layers:
                layer.register_forward_hook(functools.partial(_count, calls, "layer"))
                layer.self_attention.core_attention.register_forward_hook(
                    functools.partial(_count, calls, "core_attention"))
            model_logits(model, tokens).float().pow(2).mean().backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results[recompute.granularity, recompute.method] = (dict(calls), grads)
    plain_calls, plain_grads = results["none", "uniform"]
    assert plain_calls == {"layer": 2, "core_attention": 2}
    assert results["selective", "uniform"][0] == {"layer": 2, "core_attention": 4}
    assert results["full", "uniform"][0] == {"layer": 4, "core_attention": 4}
    assert results["full", "block"][0] == {"layer": 4, "core_attention": 4}
    for _, grads in results.values():
        assert torch.equal(grads, plain_grads)
