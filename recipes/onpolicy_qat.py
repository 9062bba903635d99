"""On-policy QAT distillation: quantize a model to 4 bits, then win its accuracy back.

    nemo run recipes/onpolicy_qat.py                       # built-in tiny CPU demo (~2 min)
    nemo run recipes/onpolicy_qat.py distill.beta=0.5 quant.format=mxfp4 optim.steps=20
    nemo run recipes/onpolicy_qat.py --factory qwen3_4b_int4 model.student=/models/Qwen3-4B \\
        data.train_files=[/data/prompts.jsonl] run.executor=slurm run.executor.nodes=2
    nemo run recipes/onpolicy_qat.py --help                # presets and every overridable field

(``python recipes/onpolicy_qat.py ...`` is the same.) The run, top to bottom:

1. build the config (the built-in demo's teacher and data are made and cached on first use);
2. evaluate the full-precision teacher and the PTQ student (quantized, not trained);
3. distill: ModelOpt QAT student, on-policy rollouts, vocab-parallel divergence to the teacher;
4. evaluate the trained student, export it as a ModelOpt unified HF checkpoint, and evaluate
   the export through lm-eval's HF model (the deployable numerics);
5. print the seeds' table (teacher / PTQ / student, share of the PTQ gap recovered) and write
   ``<output_dir>/results.{json,md,png}``.
"""

# No `from __future__ import annotations`: NeMo-Run 0.11 reads this function's annotations
# (help, task serialization) and cannot resolve string ones.
import dataclasses
import logging
from pathlib import Path
from typing import Any

import nemo_run as run
import torch.distributed as dist

from nemo_opd.config import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    RolloutConfig,
    RunConfig,
    StrategyConfig,
)
from nemo_opd.console import Stages, configure_console
from nemo_opd.launch import executors  # noqa: F401  (registers run.executor=local|slurm|docker)
from nemo_opd.launch.executors import check_world_fits, executor_gpu_memory_gib
from nemo_opd.launch.memory import check_memory_fits, format_plan
from nemo_opd.launch.plans import DEMO, EvalPlan, ExportPlan
from nemo_opd.launch.recipe import config_tree, recipe_main
from nemo_opd.launch.stages import (
    baseline_fingerprints,
    baseline_path,
    check_inputs_exist,
    check_output_dir,
    evaluate_export,
    evaluator,
    exit_preempted,
    export_trained_student,
    log_rank0,
    reuse_or_evaluate,
    use_demo_assets,
    whole_layout,
    whole_student_from_checkpoint,
    write_results,
)
from nemo_opd.rollout.engine import SamplingParams
from nemo_opd.runtime import ParallelConfig, is_rank0

logger = logging.getLogger("onpolicy_qat")

STAGES = ("teacher eval", "PTQ eval", "distill", "student eval", "export", "export eval",
          "table")
"""The run's stages, each announced on the console with its elapsed time at the end."""


def onpolicy_qat(
    model: ModelConfig,
    data: DataConfig,
    quant: QuantConfig,
    distill: DistillConfig,
    sampling: SamplingParams,
    rollout: RolloutConfig,
    optim: OptimConfig,
    checkpoint: CheckpointConfig,
    logging: LoggingConfig,  # RunConfig's field name; the module logger is `logger`
    evaluation: EvalPlan,
    export: ExportPlan,
    output_dir: str = "runs/onpolicy_qat",
    eval_every: int = 0,
    seed: int = 1234,
    demo_dir: str = "runs/demo_assets",
    baseline_dir: str = "",
) -> dict[str, Any]:
    """Quantize ``model.student`` (``quant.format``), distill it from the teacher on-policy,
    evaluate teacher / PTQ / student / export, and write the results table.

    All parameters but ``evaluation``, ``export``, ``demo_dir`` and ``baseline_dir`` are the
    fields of :class:`nemo_opd.config.RunConfig`; paths
    equal to ``"<demo>"`` are filled with the built-in demo's cached assets (made in
    ``demo_dir`` on first use). ``baseline_dir``: a directory several runs share for their
    teacher and PTQ evaluations, kept by what each depends on (a grid of runs evaluates its
    teacher once); "" = ``output_dir``. Returns the results table (also in
    ``<output_dir>/results.json``).
    """
    from nemo_opd.models.checkpoint import load_model_checkpoint
    from nemo_opd.runtime import distributed_runtime
    from nemo_opd.train import PreemptionFlag, run_distillation
    from nemo_opd.train.setup import (
        build_fresh_student_shell,
        build_student,
        build_teacher,
        calibration_batches,
        check_models,
        load_examples,
        load_tokenizer,
        teacher_groups,
    )

    configure_console()
    stages = Stages(STAGES, enabled=is_rank0())
    with distributed_runtime(model.student_parallel, seed=seed):
        # 1. The config. The demo's teacher is trained and cached the first time only.
        model, data, evaluation = use_demo_assets(model, data, evaluation, demo_dir)
        cfg = RunConfig(model=model, data=data, quant=quant, distill=distill, sampling=sampling,
                        rollout=rollout, optim=optim, checkpoint=checkpoint, logging=logging,
                        output_dir=output_dir, eval_every=eval_every, seed=seed)
        check_inputs_exist(cfg)  # a missing model or data file fails before any weight loads
        log_rank0(logger, "student %s -> %s, teacher %s, %d steps on %d rank(s), output in %s",
                  cfg.model.student, cfg.quant.format, cfg.model.teacher or "(self)",
                  cfg.total_steps, dist.get_world_size(), cfg.output_dir)
        out = Path(cfg.output_dir)
        tokenizer = load_tokenizer(cfg.model.tokenizer_path)
        evaluate = evaluator(evaluation, tokenizer)

        # 2. Baselines: the full-precision teacher, then the student quantized but not trained
        # (what the trainer starts from: same calibration batches). One model in memory at a
        # time; a requeued job (or, with baseline_dir, another run of the same models) reuses
        # the records saved before.
        examples, _ = load_examples(cfg, tokenizer)
        # Layouts, an MoE student, the two vocabularies: refused here, before any weight loads.
        check_models(cfg, dist.get_world_size(), tokenizer,
                     [tokenizer.decode(e.prompt_ids) for e in examples[:8]])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        fingerprints = baseline_fingerprints(cfg, evaluation)
        records_at = {role: baseline_path(out, baseline_dir, role, fp)
                      for role, fp in fingerprints.items()}
        # With pipeline parallelism, evaluation builds whole models (TP = PP = 1) on each rank.
        eval_cfg, eval_groups = whole_layout(cfg)
        stages.start("teacher eval")
        records = [reuse_or_evaluate(records_at["teacher"], fingerprints["teacher"],
                                     lambda: evaluate(
            build_teacher(eval_cfg, eval_groups or teacher_groups(cfg)[0]),
            run_name="teacher", role="teacher"))]
        stages.start("PTQ eval")
        records.append(reuse_or_evaluate(records_at["ptq"], fingerprints["ptq"], lambda: evaluate(
            build_student(eval_cfg, calibration_batches(cfg, examples, pad_id),
                          pg_collection=eval_groups),
            run_name=f"PTQ {cfg.quant.format}", role="ptq")))

        # 3. Distillation. The hook evaluates every `eval_every` steps and after the last one;
        # that last call also exports the trained student while it is in memory.
        exported: list[Path] = []

        def eval_hook(student: Any, steps_done: int) -> dict[str, float]:
            final = steps_done == cfg.total_steps
            if final:
                stages.start("student eval")
            if eval_groups is not None:  # a pipeline stage: evaluate this step's checkpoint
                student = whole_student_from_checkpoint(cfg, steps_done)[0]
            record = evaluate(student, run_name=f"student step {steps_done}", role="student")
            if final:
                records.append({**record, "run": f"on-policy QAT ({cfg.quant.format})"})
                if export.enabled:
                    stages.start("export")
                    exported.extend(export_trained_student(student, cfg, export))
                stages.end()
            return {f"eval/{k}": v["value"] for k, v in record["tasks"].items()}

        # SLURM's signals (SIGUSR1 before the time limit, SIGTERM on preemption) stop training
        # after the step in flight, with a checkpoint there; the job then exits non-zero without
        # writing the table, and its requeue resumes from that checkpoint.
        stages.start("distill", f"{cfg.total_steps} steps")
        with PreemptionFlag() as preempted:
            result = run_distillation(cfg, eval_hook=eval_hook, should_stop=preempted)
        if result.preempted or preempted():  # (or signalled in the last step's evaluation)
            exit_preempted(result.steps_done, resume=cfg.checkpoint.resume)
        if records[-1]["role"] != "student":
            # A requeued job whose training had already finished: the loop ran no step, so the
            # hook never saw the trained student; evaluate (and export) its final checkpoint.
            student = load_model_checkpoint(build_fresh_student_shell(cfg),
                                            result.last_checkpoint / "model")
            eval_hook(student, cfg.total_steps)
            del student

        # 4. The deployable artifact: its packed codes, dequantised, through lm-eval's HF model
        # (and TensorRT-LLM where installed). A failure here must not lose the table of a long
        # run: it is written first, then the failure is raised.
        export_error = None
        if exported and export.evaluate:
            stages.start("export eval")
            try:
                records += evaluate_export(exported[0], evaluation,
                                           run_name=f"export {cfg.quant.format}")
            except (ValueError, NotImplementedError, RuntimeError) as err:
                export_error = err

        # 5. The seeds' table.
        stages.start("table")
        table = write_results(records, out, history=result.evaluations, cfg=cfg)
        stages.end(f"run total {stages.elapsed:.0f} s")
        if export_error is not None:
            raise RuntimeError(f"evaluating the export in {exported[0]} failed ({export_error}); "
                               f"the table without it is in {out}/results.json") from export_error
        return table


# ------------------------------------------------------------------------------------ presets


def _preset(**sections: Any) -> run.Partial:
    """``run.Partial(onpolicy_qat, ...)``: ``sections`` over the defaults, every section a
    nested ``run.Config`` (so each field is a dotted override)."""
    defaults = {"quant": QuantConfig(), "distill": DistillConfig(),
                "sampling": SamplingParams(max_new_tokens=128), "rollout": RolloutConfig(),
                "optim": OptimConfig(), "checkpoint": CheckpointConfig(),
                "logging": LoggingConfig(),
                "evaluation": EvalPlan(), "export": ExportPlan()}
    return run.Partial(onpolicy_qat, **{name: config_tree(value)
                                        for name, value in {**defaults, **sections}.items()})


@run.cli.factory(target=onpolicy_qat)
def tiny() -> run.Partial:
    """Built-in CPU demo: the demo's shipped tiny teacher (2-digit addition; outlier channels
    make 4-bit PTQ lose accuracy), INT4 student, on-policy reverse KL (λ=1, β=1)."""
    return _preset(
        model=ModelConfig(student=DEMO, teacher=DEMO),
        # Problems are "47+85=" -> " 132": a handful of tokens each.
        data=DataConfig(train_files=(DEMO,), max_prompt_length=16, max_response_length=8),
        quant=QuantConfig(format="int4", calibration_batches=4),
        distill=DistillConfig(beta=1.0, lmbda=1.0, temperature=1.0),
        sampling=SamplingParams(max_new_tokens=8, temperature=1.0),
        optim=OptimConfig(lr=1e-4, steps=40, warmup_steps=2, micro_batch_size=32),
        checkpoint=CheckpointConfig(resume=False),  # a rerun with other overrides starts over
        logging=LoggingConfig(tensorboard=False),
        output_dir="runs/onpolicy_qat_tiny",
        evaluation=EvalPlan(tasks=(), limit=None),  # the demo's own local tasks
        export=ExportPlan(enabled=True),
    )


def _real_model(student: str, fmt: str, tp: int, train_files: str, **sections: Any
                ) -> run.Partial:
    """A real model on GPUs: bf16, self-distillation from the bf16 original (seeds 000-002),
    on-policy reverse KL (λ=1, β=1), the seeds' HellaSwag/ARC/WinoGrande/MMLU suite; 512
    prompt + 256 new tokens, micro batch 4, gradient accumulation 2 (docs/scaling.md's
    "short" workload). ``sections`` replace whole sections (or top-level fields)."""
    layout = ParallelConfig(tensor_model_parallel_size=tp)
    return _preset(**{
        "model": ModelConfig(student=student, student_parallel=layout, teacher_parallel=layout,
                             student_dtype="bfloat16", teacher_dtype="bfloat16"),
        "data": DataConfig(train_files=(train_files,), max_prompt_length=512,
                           max_response_length=256),
        "quant": QuantConfig(format=fmt, calibration_batches=16),
        "distill": DistillConfig(beta=1.0, lmbda=1.0),
        "sampling": SamplingParams(max_new_tokens=256, temperature=1.0),
        "optim": OptimConfig(lr=1e-5, warmup_steps=10, steps=300, micro_batch_size=4,
                             grad_accumulation=2),
        "checkpoint": CheckpointConfig(save_every=50, keep_last=2),
        "output_dir": f"runs/onpolicy_qat_{Path(student).name.lower()}_{fmt}",
        "eval_every": 100,
        "evaluation": EvalPlan(tasks=("seed",), limit=None),
        "export": ExportPlan(enabled=tp == 1),
        **sections,
    })


def _size_distillation(student: str, teacher: str, fmt: str, student_tp: int,
                       teacher_parallel: ParallelConfig, strategy: StrategyConfig) -> run.Partial:
    """:func:`_real_model` distilled from a larger bf16 ``teacher`` on its own layout: the
    top-k loss (k = 64; full-vocabulary logits are not moved between layouts), reverse KL,
    evaluated on GSM8K (the size-distillation report, ``nemo_opd.eval.tasks``)."""
    name = f"runs/onpolicy_qat_{Path(student).name.lower()}_from_{Path(teacher).name.lower()}"
    return _real_model(
        student, fmt, student_tp, "/data/prompts.jsonl",
        model=ModelConfig(student=student, teacher=teacher,
                          student_parallel=ParallelConfig(tensor_model_parallel_size=student_tp),
                          teacher_parallel=teacher_parallel, student_dtype="bfloat16",
                          teacher_dtype="bfloat16"),
        distill=DistillConfig(beta=1.0, lmbda=1.0, loss="topk", topk=64, strategy=strategy),
        output_dir=f"{name}_{fmt}",
        evaluation=EvalPlan(tasks=("gsm8k",), limit=None),
    )


@run.cli.factory(target=onpolicy_qat)
def qwen3_4b_int4() -> run.Partial:
    """Qwen3-4B, INT4 weights (block 128; TensorRT-LLM on Hopper), TP=1, from local HF dirs.
    The memory planner accepts it on H100-80GB from 2 GPUs on (docs/scaling.md)."""
    return _real_model("/models/Qwen3-4B", "int4", tp=1, train_files="/data/prompts.jsonl")


@run.cli.factory(target=onpolicy_qat)
def llama31_8b_mxfp4() -> run.Partial:
    """Llama-3.1-8B-Instruct, MXFP4 weights (served on Blackwell), TP=2, local HF dirs.
    The memory planner accepts it on H100-80GB from 4 GPUs on (docs/scaling.md)."""
    return _real_model("/models/Llama-3.1-8B-Instruct", "mxfp4", tp=2,
                       train_files="/data/prompts.jsonl")


@run.cli.factory(target=onpolicy_qat)
def qwen3_4b_from_qwen3_30b_a3b() -> run.Partial:
    """Qwen3-4B-Instruct-2507, INT4 weights (block 128), distilled from the MoE
    Qwen3-30B-A3B-Instruct-2507 in bf16: teacher-seeded (seed 004's schedule: 20 teacher tokens
    at step 0, down to 0 over 50 steps), top-k reverse KL, GSM8K.

    One node of 8×H100-80GB: student TP=4 (DP=2), teacher TP=2 (DP=4, EP=1) on its own layout
    (teacher_seeded needs teacher TP <= student TP and teacher PP = EP = 1). The memory planner:
    52.3 GiB per GPU (teacher 28.5 GiB of it); the whole teacher (TP=1, 56.9 GiB) fits only
    beside a student at TP=8, with 2.8 GiB to spare (77.2 GiB; TP=4: 82.1 GiB, over)
    (docs/scaling.md). Export is off at TP > 1 (``export.enabled=true`` restores the student
    whole from its checkpoint)."""
    return _size_distillation(
        "/models/Qwen3-4B-Instruct-2507", "/models/Qwen3-30B-A3B-Instruct-2507", "int4",
        student_tp=4,
        teacher_parallel=ParallelConfig(tensor_model_parallel_size=2),
        strategy=StrategyConfig(name="teacher_seeded", seed_tokens=20, seed_decay_steps=50))


@run.cli.factory(target=onpolicy_qat)
def llama31_8b_from_llama33_70b() -> run.Partial:
    """Llama-3.1-8B-Instruct, MXFP4 weights, distilled from Llama-3.3-70B-Instruct in bf16:
    on-policy GKD (λ = 1), top-k reverse KL, GSM8K.

    One node of 8×H100-80GB: student TP=2 (DP=4), teacher TP=8 (one teacher TP group scores
    the batches of the 4 student data-parallel ranks; its 131 GiB of weights need all 8 GPUs).
    The memory planner: 72.6 GiB per GPU (teacher 16.4 GiB of it), 7.4 GiB to spare; student
    TP=4 plans at 54.7 GiB, and two nodes with the teacher at TP=8 PP=2 at 58.1 GiB
    (docs/scaling.md). teacher_seeded is not available here (teacher TP > student TP). Export is
    off at TP > 1 (``export.enabled=true`` restores the student whole from its checkpoint)."""
    return _size_distillation(
        "/models/Llama-3.1-8B-Instruct", "/models/Llama-3.3-70B-Instruct", "mxfp4",
        student_tp=2,
        teacher_parallel=ParallelConfig(tensor_model_parallel_size=8),
        strategy=StrategyConfig(name="on_policy_gkd"))


def check(kwargs: dict[str, Any], executor: run.Executor | None) -> None:
    """Before anything is submitted: the whole config is valid, the executor's ranks are a
    multiple of the student's TP × PP, and, when the executor targets GPUs
    (``executor_gpu_memory_gib``), the memory plan of the worst rank fits one GPU: the plan is
    printed, or refused with its breakdown and the settings to change. Only the models'
    ``config.json`` files are read (nemo_opd.launch.memory)."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in kwargs.items() if k in fields})
    if executor is None or isinstance(executor, run.LocalExecutor):
        check_output_dir(cfg.output_dir)  # remote jobs check theirs where it lives
    every = cfg.checkpoint.save_every
    if (cfg.model.student_parallel.pipeline_model_parallel_size > 1 and cfg.eval_every
            and (not every or cfg.eval_every % every)):
        raise ValueError(
            f"eval_every = {cfg.eval_every} with pipeline_model_parallel_size > 1 needs "
            f"checkpoint.save_every dividing it (got {every}): a pipeline stage is evaluated "
            "through the checkpoint of that step, restored whole")
    world = check_world_fits(executor, cfg.model.student_parallel)
    try:
        cfg.model.teacher_parallel.data_parallel_size(world)
    except ValueError as err:
        raise ValueError(f"model.teacher_parallel does not fit the executor: {err}") from None
    gpu_memory_gib = executor_gpu_memory_gib(executor)
    plan = check_memory_fits(cfg, world, gpu_memory_gib)
    if plan is not None:
        print(format_plan(plan, gpu_memory_gib))


if __name__ == "__main__":
    recipe_main(onpolicy_qat, default_preset=tiny, check=check)
