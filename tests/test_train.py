"""The trainer end to end on tiny models, at TP=1 (one rank) and TP=2 (two gloo ranks).

Checks, grouped into few processes (each rank start costs seconds):
* the loss falls over 20 steps on a tiny task;
* λ=0 scores dataset sequences only and never calls the rollout engine; λ=1 scores exactly the
  engine's rollouts (engine instrumented, token counts compared);
* teacher-seeded rollouts ask the teacher for PrefixSchedule(step) tokens and put loss only on
  the student's;
* a run interrupted and resumed from its checkpoint reproduces the uninterrupted losses exactly;
* a NaN loss stops training with a clear error, the last good checkpoint intact and loadable;
* a save that crashes half-way leaves the previous checkpoint the latest;
* TP=2 (teacher TP=2 full loss; teacher TP=1 top-k loss) equals TP=1;
* 2 data-parallel ranks equal 2 accumulated micro batches (loss and gradient norm), also with
  a TP=2 teacher spanning both student ranks;
* teacher/student vocabulary disagreement raises before training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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


def _config(dirs: dict[str, str], train_file: str, out: str, tp: int = 1, teacher_tp: int = 1,
            **changes) -> RunConfig:
    fields = dict(
        model=ModelConfig(student=dirs["llama"], teacher=dirs["qwen3"],
                          student_parallel=ParallelConfig(tp),
                          teacher_parallel=ParallelConfig(teacher_tp)),
        data=DataConfig(train_files=(train_file,), max_response_length=8),
        # Weight-only (MXFP4, CPU backend): TP=1 and TP=2 logits agree to ~1e-6 (activation
        # quantization would flip roundings between layouts).
        quant=QuantConfig(format="mxfp4", calibration_batches=1),
        distill=DistillConfig(lmbda=0.5, beta=0.5),
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
        optim=OptimConfig(steps=4, micro_batch_size=2, lr=3e-3, warmup_steps=1),
        checkpoint=CheckpointConfig(save_every=0),
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
        output_dir=out, seed=7)
    return RunConfig(**{**fields, **changes})


class CountingEngine:
    """The real MegatronEngine, with every call and result recorded (instrumentation)."""

    def __init__(self, model, tp_group, log: list, role: str, pad_id: int, eos_id: int) -> None:
        from nemo_opd.rollout.megatron_engine import MegatronEngine

        self.inner = MegatronEngine(model, pad_id=pad_id, eos_id=eos_id, tp_group=tp_group)
        self.log, self.role = log, role

    def generate(self, prompts, params, forced_prefixes=None):
        batch = self.inner.generate(prompts, params, forced_prefixes)
        self.log.append({"role": self.role, "max_new_tokens": params.max_new_tokens,
                         "loss_tokens": int(batch.loss_mask[:, 1:].sum()),
                         "generated": batch.num_generated_tokens,
                         "prefix_lengths": batch.prefix_lengths.tolist()})
        return batch

    def update_weights(self, model) -> None:
        self.inner.update_weights(model)


def _counting_factory(log: list, tokenizer_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def factory(model, tp_group):
        role = "teacher" if all(not p.requires_grad for p in model.parameters()) else "student"
        return CountingEngine(model, tp_group, log, role, tok.pad_token_id, tok.eos_token_id)

    return factory


def _eval_hook(model, step: int) -> dict[str, float]:
    """An evaluation the recipe could pass: mean next-token log-prob of a fixed sequence."""
    tokens = torch.arange(1, 9).unsqueeze(0)
    logits = model(tokens, torch.arange(8).unsqueeze(0), attention_mask=None)
    return {"grad_enabled": float(torch.is_grad_enabled()),
            "mean_logit": float(logits.float().mean())}


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


# Resume equality: replay buffer contents, sampling seeds and AdamW state all matter.
_RESUME = dict(distill=DistillConfig(lmbda=1.0, beta=0.5, strategy=StrategyConfig(
    name="replay_buffer", replay_every=2)), checkpoint=CheckpointConfig(save_every=2))
_TOPK = dict(distill=DistillConfig(lmbda=0.5, beta=0.5, loss="topk", topk=16))
# One example per micro batch, unshuffled: 2 data-parallel ranks x 1 micro batch must equal
# 1 rank x 2 accumulated micro batches (same examples, gradients averaged alike).
_DP_DATA = dict(distill=DistillConfig(lmbda=0.0, beta=0.5), optim=OptimConfig(
    steps=3, micro_batch_size=1, lr=3e-3))


def _dp_reference(dirs: dict[str, str], train_file: str, root: str, *, accumulation: int,
                  teacher_tp: int = 1, loss: str = "full") -> list[tuple[float, float]]:
    from nemo_opd.train import run_distillation

    changes = dict(_DP_DATA, optim=dataclasses.replace(_DP_DATA["optim"],
                                                       grad_accumulation=accumulation),
                   distill=dataclasses.replace(_DP_DATA["distill"], loss=loss, topk=16),
                   data=DataConfig(train_files=(train_file,), max_response_length=8,
                                   shuffle=False))
    result = run_distillation(_config(dirs, train_file, root, teacher_tp=teacher_tp,
                                      **changes))
    return [(h["loss"], h["grad_norm"]) for h in result.history]


def _resume_runs(dirs: dict[str, str], train_file: str, root: str, tp: int) -> dict:
    """An uninterrupted 4-step run, and the same run stopped after 2 steps and resumed."""
    from nemo_opd.train import run_distillation

    full = run_distillation(_config(dirs, train_file, f"{root}/full", tp=tp, teacher_tp=tp,
                                    **_RESUME))
    part_cfg = _config(dirs, train_file, f"{root}/parts", tp=tp, teacher_tp=tp, **_RESUME)
    first = run_distillation(part_cfg, stop_after=2)
    second = run_distillation(part_cfg)
    return {"full": _losses(full), "parts": _losses(first) + _losses(second),
            "sources_full": [h["sources"] for h in full.history],
            "sources_parts": [h["sources"] for h in first.history + second.history]}


def _tp1_body(dirs: dict[str, str], train_file: str, root: str) -> dict:
    from nemo_opd.models.hf_import import build_gpt_model, read_hf_config
    from nemo_opd.rollout.teacher_seeded import PrefixSchedule
    from nemo_opd.runtime import distributed_runtime
    from nemo_opd.train import NonFiniteLossError, latest_checkpoint, run_distillation
    from nemo_opd.train.checkpoint import load_checkpoint, save_checkpoint
    from nemo_opd.train.optim import build_optimizer

    out: dict = {}
    with distributed_runtime(ParallelConfig(1), seed=7):
        # Loss falls over 20 steps (λ mixing on).
        cfg = _config(dirs, train_file, f"{root}/decrease",
                      optim=OptimConfig(steps=20, micro_batch_size=2, lr=1e-2, warmup_steps=2,
                                        min_lr=1e-3))
        out["decrease"] = _losses(run_distillation(cfg))

        # λ=0: dataset only, engine never called; λ=1: exactly the engine's rollouts. The λ=1
        # run also has an evaluation hook every 2 steps.
        for lmbda in (0.0, 1.0):
            log: list = []
            cfg = _config(dirs, train_file, f"{root}/lambda{lmbda}",
                          distill=DistillConfig(lmbda=lmbda), eval_every=2,
                          data=DataConfig(train_files=(train_file,), max_response_length=8,
                                          shuffle=False))
            result = run_distillation(cfg, engine_factory=_counting_factory(log, dirs["llama"]),
                                      eval_hook=_eval_hook if lmbda else None)
            out[f"lambda{lmbda}"] = {
                "history": result.history, "engine": log, "evaluations": result.evaluations,
                "jsonl": [json.loads(line) for line in open(result.metrics_file)]}

        # Teacher top-k cache: the second epoch (step 5, batches of 4 of 16 records) reads it
        # and gives exactly the losses of an uncached run.
        cache = dict(distill=DistillConfig(lmbda=0.0, loss="topk", topk=8,
                                           teacher_cache_dir=f"{root}/cache"),
                     optim=OptimConfig(steps=5, micro_batch_size=4, lr=3e-3))
        cached = run_distillation(_config(dirs, train_file, f"{root}/cached", **cache))
        cache["distill"] = dataclasses.replace(cache["distill"], teacher_cache_dir="")
        uncached = run_distillation(_config(dirs, train_file, f"{root}/uncached", **cache))
        out["cache"] = {"hits": [h["teacher_cache_hits"] for h in cached.history],
                        "nll": [h["teacher_nll"] for h in cached.history],
                        "cached": _losses(cached), "uncached": _losses(uncached)}

        # Teacher-seeded prefixes.
        log = []
        schedule = PrefixSchedule(start=4, end=0, decay_steps=3)
        cfg = _config(dirs, train_file, f"{root}/seeded", distill=DistillConfig(
            strategy=StrategyConfig(name="teacher_seeded", seed_tokens=4, seed_decay_steps=3)))
        result = run_distillation(cfg, engine_factory=_counting_factory(log, dirs["llama"]))
        out["seeded"] = {"history": result.history, "engine": log,
                         "schedule": [schedule(s) for s in range(4)]}

        out["resume"] = _resume_runs(dirs, train_file, f"{root}/tp1", tp=1)
        # Resuming that directory with another objective is refused.
        other = dict(_RESUME, distill=dataclasses.replace(_RESUME["distill"], beta=0.25))
        try:
            run_distillation(_config(dirs, train_file, f"{root}/tp1/parts", **other))
            out["resume_mismatch"] = None
        except ValueError as err:
            out["resume_mismatch"] = str(err)
        # LoRA on the quantized base: adapters are the only trainable (and checkpointed
        # optimizer) state; resume stays exact.
        lora = dict(quant=QuantConfig(format="mxfp4", calibration_batches=1, lora=True,
                                      lora_r=4), optim=OptimConfig(steps=3, micro_batch_size=2,
                                                                   lr=3e-2),
                    checkpoint=CheckpointConfig(save_every=1))
        lora_full = run_distillation(_config(dirs, train_file, f"{root}/lora_full", **lora))
        lora_cfg = _config(dirs, train_file, f"{root}/lora_parts", **lora)
        lora_first = run_distillation(lora_cfg, stop_after=1)
        lora_second = run_distillation(lora_cfg)
        out["lora"] = {"full": _losses(lora_full),
                       "parts": _losses(lora_first) + _losses(lora_second),
                       "kept": sorted(p.name for p in lora_full.last_checkpoint.parent.iterdir())}

        # Self-distillation (teacher = the student's original weights; unquantized student):
        # the first step's divergence is zero; with few-shot context for the teacher only, not.
        for name, context in (("self", ""), ("context", "question: what is 2 plus 2? answer: 4\n")):
            cfg = _config(dirs, train_file, f"{root}/{name}", quant=QuantConfig(format="none"),
                          model=ModelConfig(student=dirs["llama"]),
                          distill=DistillConfig(lmbda=0.5, beta=0.5, teacher_context=context),
                          optim=OptimConfig(steps=1, micro_batch_size=2))
            out[name] = _losses(run_distillation(cfg))[0]
        out["topk"] = _losses(run_distillation(_config(dirs, train_file, f"{root}/tp1_topk",
                                                       **_TOPK)))
        out["accumulated"] = _dp_reference(dirs, train_file, f"{root}/ga2", accumulation=2)
        out["accumulated_topk"] = _dp_reference(dirs, train_file, f"{root}/ga2_topk",
                                                accumulation=2, loss="topk")

        # NaN stop: an absurd learning rate makes step 2's forward overflow.
        cfg = _config(dirs, train_file, f"{root}/nan", distill=DistillConfig(lmbda=0.0),
                      optim=OptimConfig(steps=4, micro_batch_size=2, lr=1e30, grad_clip=0.0),
                      checkpoint=CheckpointConfig(save_every=1))
        from nemo_opd.train import Trainer

        trainer = Trainer(cfg)
        try:
            trainer.train()
            out["nan_error"] = None
        except NonFiniteLossError as err:
            out["nan_error"] = str(err)
        good = latest_checkpoint(cfg.checkpoint_dir)
        out["nan_latest"] = good.name if good else None
        shell = build_gpt_model(read_hf_config(cfg.model.student), ParallelConfig(1))
        loaded, _, state, meta = load_checkpoint(
            good, shell, lambda m: build_optimizer(m, cfg.optim, cfg.total_steps))
        live = dict(trainer.models.student.named_parameters())
        out["nan_ckpt_equal"] = all(torch.equal(p, live[n]) for n, p in loaded.named_parameters())
        out["nan_ckpt_finite"] = all(torch.isfinite(p).all() for p in loaded.parameters())

        # A save that crashes half-way (unpicklable trainer state after model + optimizer were
        # written) leaves the previous checkpoint the latest, and loadable.
        try:
            save_checkpoint(cfg.checkpoint_dir, 99, trainer.models.student, trainer.optim,
                            {"unpicklable": lambda: None}, {"world_size": 1}, keep_last=2)
            out["crash_raised"] = False
        except Exception:  # noqa: BLE001 - whatever pickling raises
            out["crash_raised"] = True
        after = latest_checkpoint(cfg.checkpoint_dir)
        out["crash_latest"] = after.name
        out["crash_tmp_left"] = sorted(p.name for p in Path(cfg.checkpoint_dir).iterdir())
        shell = build_gpt_model(read_hf_config(cfg.model.student), ParallelConfig(1))
        load_checkpoint(after, shell, lambda m: build_optimizer(m, cfg.optim, cfg.total_steps))
        out["crash_loadable"] = True
    return out


def _tp2_body(dirs: dict[str, str], train_file: str, root: str) -> dict:
    import torch.distributed as dist

    from nemo_opd.runtime import distributed_runtime
    from nemo_opd.train import run_distillation

    # Created here, so both runtimes below (TP=2, then TP=1 x DP=2) reuse it.
    dist.init_process_group("gloo")
    with distributed_runtime(ParallelConfig(1), seed=7):
        data_parallel = _dp_reference(dirs, train_file, f"{root}/dp2", accumulation=1)
        # A teacher at TP=2 spanning both student data-parallel ranks (student TP=1): it scores
        # both ranks' batches in one forward and each keeps its rows of the top-k.
        wide_teacher = _dp_reference(dirs, train_file, f"{root}/dp2_teacher_tp2",
                                     accumulation=1, teacher_tp=2, loss="topk")
    with distributed_runtime(ParallelConfig(2), seed=7):
        resume = _resume_runs(dirs, train_file, f"{root}/tp2", tp=2)
        # Teacher at TP=1 next to the TP=2 student: only its top-k crosses layouts.
        topk = _losses(run_distillation(_config(dirs, train_file, f"{root}/tp2_topk", tp=2,
                                                teacher_tp=1, **_TOPK)))
    return {"resume": resume, "topk": topk, "data_parallel": data_parallel,
            "wide_teacher": wide_teacher}


@pytest.mark.multirank
def test_trainer_tp1_and_tp2(tiny_model_dirs, train_file, tmp_path):
    (out,) = run_ranks(_tp1_body, world_size=1, dirs=tiny_model_dirs, train_file=train_file,
                       root=str(tmp_path))
    tp2, _ = run_ranks(_tp2_body, world_size=2, dirs=tiny_model_dirs, train_file=train_file,
                       root=str(tmp_path))
    losses = out["decrease"]
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses

    off, on = out["lambda0.0"], out["lambda1.0"]
    assert off["engine"] == []
    assert all(h["sources"] == ["dataset"] for h in off["history"])
    # Reference: unshuffled, step s scores records 2s and 2s+1; their response tokens (EOS
    # included) counted from the data file and tokenizer directly (all fit max_response_length).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    lengths = [len(tok(json.loads(line)["response"], add_special_tokens=False)["input_ids"]) + 1
               for line in open(train_file)]
    assert all(n <= 8 for n in lengths)
    assert [h["loss_tokens"] for h in off["history"]] == [lengths[2 * s] + lengths[2 * s + 1]
                                                           for s in range(4)]
    assert all(h["sources"] == ["rollout"] for h in on["history"])
    assert [e["role"] for e in on["engine"]] == ["student"] * 4
    assert [h["loss_tokens"] for h in on["history"]] == [e["loss_tokens"] for e in on["engine"]]
    assert [h["loss_tokens"] for h in on["history"]] == [e["generated"] for e in on["engine"]]

    assert [e["step"] for e in on["evaluations"]] == [2, 4]
    assert all(e["grad_enabled"] == 0.0 for e in on["evaluations"])
    steps = [r for r in on["jsonl"] if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "forward_kl", "reverse_kl", "teacher_nll", "rollout_length",
                "rollout_tokens_per_s", "time_rollout_s", "time_teacher_s", "time_student_s",
                "time_optimizer_s", "lr", "grad_norm"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert all(r["rollout_tokens_per_s"] > 0 and r["rollout_length"] > 0 for r in steps)
    assert [r["step"] for r in on["jsonl"] if r.get("event") == "eval"] == [2, 4]

    assert out["cache"]["hits"] == [0, 0, 0, 0, 1]
    assert out["cache"]["nll"][4] is None and all(n > 0 for n in out["cache"]["nll"][:4])
    assert out["cache"]["cached"] == out["cache"]["uncached"]

    seeded = out["seeded"]
    teacher_calls = [e for e in seeded["engine"] if e["role"] == "teacher"]
    student_calls = [e for e in seeded["engine"] if e["role"] == "student"]
    expected = [n for n in seeded["schedule"] if n > 0]
    assert [c["max_new_tokens"] for c in teacher_calls] == expected
    assert len(student_calls) == 4
    for call, n in zip(student_calls, seeded["schedule"], strict=True):
        assert max(call["prefix_lengths"]) <= n
        assert call["loss_tokens"] == call["generated"]  # the teacher's tokens carry no loss
    assert [h["teacher_prefix_length"] for h in seeded["history"]][-1] == 0

    resume = out["resume"]
    assert resume["sources_full"] == resume["sources_parts"]
    assert "replay" in sum(resume["sources_full"], [])
    assert resume["full"] == resume["parts"]  # exact
    assert "different distill settings" in out["resume_mismatch"]
    assert out["lora"]["full"] == out["lora"]["parts"]
    assert len(set(out["lora"]["full"])) == 3  # the adapters do train
    assert out["lora"]["kept"] == ["step_00000002", "step_00000003"]  # keep_last = 2

    # float32 log-softmax of ~6-nat log-probs rounds at ~1e-6: identical models give ~1e-7
    assert abs(out["self"]) < 1e-5, out["self"]
    assert out["context"] > 1e-4, out["context"]  # ~2.6e-4: 10x above the noise bound

    assert out["nan_error"] is not None and "step 1" in out["nan_error"], out["nan_error"]
    assert "last good checkpoint" in out["nan_error"]
    assert out["nan_latest"] == "step_00000001"
    assert out["nan_ckpt_equal"] and out["nan_ckpt_finite"]

    assert out["crash_raised"]
    assert out["crash_latest"] == "step_00000001"
    assert out["crash_loadable"]
    assert ".tmp_step_00000099" not in out["crash_tmp_left"]  # a failed save cleans up

    # TP=2: exact resume, and the same losses as TP=1 (fp32 summation order differs between
    # layouts: KLs of ~4e-3 are differences of O(1) log-probs, so compare to ~1e-5 absolute).
    assert tp2["resume"]["full"] == tp2["resume"]["parts"]
    assert tp2["resume"]["sources_full"] == out["resume"]["sources_full"]
    for tp1_losses, tp2_losses in ((out["resume"]["full"], tp2["resume"]["full"]),
                                   (out["topk"], tp2["topk"])):
        torch.testing.assert_close(torch.tensor(tp2_losses), torch.tensor(tp1_losses),
                                   rtol=1e-3, atol=1e-5)
    # Data parallel: the DP-mean loss and the global grad norm equal gradient accumulation's.
    torch.testing.assert_close(torch.tensor(tp2["data_parallel"]),
                               torch.tensor(out["accumulated"]), rtol=1e-6, atol=0)
    # Teacher TP=2 over two student DP ranks equals a TP=1 teacher (fp32 layout rounding only:
    # seen ~1e-8 absolute on KLs of ~5e-4).
    torch.testing.assert_close(torch.tensor(tp2["wide_teacher"]),
                               torch.tensor(out["accumulated_topk"]), rtol=1e-4, atol=1e-7)


def test_vocab_mismatch_raises_before_training(tiny_model_dirs, train_file, tmp_path):
    from nemo_opd.models.tiny import TinyModelSpec, make_tiny_hf_model, make_tiny_tokenizer
    from nemo_opd.train import check_teacher_student_agreement
    from nemo_opd.train.setup import load_tokenizer

    other = make_tiny_hf_model(tmp_path / "other", "llama",
                               TinyModelSpec(vocab_multiple=256), seed=4,
                               tokenizer=make_tiny_tokenizer(vocab_size=300, seed=5))
    cfg = _config(tiny_model_dirs, train_file, str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher=str(other)))
    with pytest.raises(ValueError) as err:
        check_teacher_student_agreement(cfg, load_tokenizer(cfg.model.student),
                                        ["question: what is 3 plus 4?"])
    assert "vocab_size: student 384 != teacher 512" in str(err.value)
    assert "tokenize differently" in str(err.value)
    # Same teacher config, same tokenizer: passes.
    check_teacher_student_agreement(_config(tiny_model_dirs, train_file, str(tmp_path)),
                                    load_tokenizer(cfg.model.student), ["a b c"])
