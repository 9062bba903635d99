"""Stages of ``recipes/onpolicy_qat.py`` that are plumbing rather than the method: filling the
demo's paths, checking inputs exist, evaluating with the plan's settings, exporting, reporting.

Every function runs on all ranks of the job (they may hold collectives); files are written by
rank 0 only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from nemo_opd.config import DataConfig, ModelConfig, RunConfig
from nemo_opd.console import third_party_prints_off
from nemo_opd.launch.plans import DEMO, EvalPlan, ExportPlan
from nemo_opd.runtime import is_rank0

__all__ = [
    "log_rank0",
    "use_demo_assets",
    "check_inputs_exist",
    "check_output_dir",
    "evaluator",
    "baseline_fingerprints",
    "baseline_path",
    "reuse_or_evaluate",
    "export_trained_student",
    "whole_layout",
    "whole_student_from_checkpoint",
    "evaluate_export",
    "write_results",
    "PREEMPTED_EXIT_CODE",
    "exit_preempted",
]

logger = logging.getLogger(__name__)

Evaluate = Callable[..., dict[str, Any]]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log_rank0(log: logging.Logger, message: str, *args: Any) -> None:
    if is_rank0():
        log.info(message, *args)


def use_demo_assets(model: ModelConfig, data: DataConfig, evaluation: EvalPlan,
                    demo_dir: str) -> tuple[ModelConfig, DataConfig, EvalPlan]:
    """Replace every ``"<demo>"`` path with the built-in demo's cached assets and add the demo's
    evaluation tasks; unchanged when no path is ``"<demo>"``.

    Rank 0 makes (or validates) the cache first; the other ranks then find it ready.
    """
    paths = (model.student, model.teacher, model.tokenizer, *data.train_files)
    if DEMO not in paths:
        return model, data, evaluation
    from nemo_opd.demo import prepare_demo

    if is_rank0():
        assets = prepare_demo(Path(demo_dir))
    _barrier()
    if not is_rank0():
        assets = prepare_demo(Path(demo_dir))

    def fill(value: str, demo_value: Path) -> str:
        return str(demo_value) if value == DEMO else value

    model = dataclasses.replace(
        model, student=fill(model.student, assets.student_dir),
        teacher=fill(model.teacher, assets.teacher_dir),
        tokenizer=fill(model.tokenizer, assets.teacher_dir))
    data = dataclasses.replace(
        data, train_files=tuple(fill(f, assets.train_file) for f in data.train_files))
    demo_tasks = tuple(f"{name}={path}" for name, path in assets.eval_tasks.items())
    evaluation = dataclasses.replace(evaluation,
                                     local_tasks=(*demo_tasks, *evaluation.local_tasks))
    return model, data, evaluation


def check_output_dir(path: str | Path) -> None:
    """Raise ``ValueError`` unless ``path`` is (or can be made) a directory this process can
    write, judged at its nearest existing ancestor without creating anything: a file there, a
    read-only file system or missing permissions would otherwise end the run at its first save,
    after the models were loaded and evaluated."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # nothing is created
    if not existing.is_dir():
        raise ValueError(f"output_dir={str(path)!r}: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".nemo_opd_write_probe_"):
            pass
    except OSError as err:
        raise ValueError(f"output_dir={str(path)!r} is not writable: {existing}: "
                         f"{err.strerror}") from None


def check_inputs_exist(cfg: RunConfig) -> None:
    """Raise ``FileNotFoundError`` naming the first missing model directory or data file, and
    ``ValueError`` for an output directory that cannot be written (:func:`check_output_dir`)."""
    dirs = {"model.student": cfg.model.student, "model.teacher": cfg.model.teacher,
            "model.tokenizer": cfg.model.tokenizer}
    for key, path in dirs.items():
        if path and not (Path(path) / "config.json").is_file() and key != "model.tokenizer":
            raise FileNotFoundError(f"{key}={path!r}: no Hugging Face model there (no "
                                    "config.json); pass a local HF directory")
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{key}={path!r} does not exist")
    for path in cfg.data.train_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.train_files: {path!r} does not exist")
    check_output_dir(cfg.output_dir)


def evaluator(plan: EvalPlan, tokenizer: Any) -> Evaluate:
    """``evaluate(model_or_lm, run_name=..., role=...) -> record`` with the plan's settings
    (:func:`nemo_opd.eval.evaluate.evaluate_model`)."""
    from nemo_opd.eval.evaluate import evaluate_model
    from nemo_opd.eval.lm import LMConfig

    lm_config = LMConfig(batch_size=plan.batch_size)
    local_tasks = _local_tasks(plan)

    def evaluate(model: Any, *, run_name: str, role: str | None) -> dict[str, Any]:
        return evaluate_model(model, plan.tasks, local_tasks=local_tasks,
                              tokenizer=tokenizer, lm_config=lm_config,
                              data_dir=plan.data_dir or None, limit=plan.limit,
                              num_fewshot=plan.num_fewshot, run_name=run_name, role=role)

    return evaluate


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def whole_layout(cfg: RunConfig) -> tuple[RunConfig, Any]:
    """``(cfg, None)`` at PP = 1. At PP > 1, where MegatronLM cannot evaluate a pipeline stage:
    ``cfg`` with TP = PP = 1 layouts and the process groups (collective) on which every rank
    builds whole models for evaluation."""
    from nemo_opd.runtime import ParallelConfig, model_process_groups

    if cfg.model.student_parallel.pipeline_model_parallel_size == 1:
        return cfg, None
    whole = dataclasses.replace(cfg.model, student_parallel=ParallelConfig(),
                                teacher_parallel=ParallelConfig())
    return dataclasses.replace(cfg, model=whole), model_process_groups(ParallelConfig())


def whole_student_from_checkpoint(cfg: RunConfig, step: int | None = None
                                  ) -> tuple[torch.nn.Module, Any]:
    """The run's checkpoint of ``step`` (default: the newest) restored at TP = PP = 1 on every
    rank (megatron's dist checkpointing reshards; the vocabulary keeps the padding of the
    run's TP size), with the process groups it was built on (collective)."""
    from nemo_opd.models import build_gpt_model, read_hf_config
    from nemo_opd.models.checkpoint import load_model_checkpoint
    from nemo_opd.runtime import ParallelConfig, model_parallel_layout, model_process_groups
    from nemo_opd.train import latest_checkpoint

    checkpoint = latest_checkpoint(cfg.checkpoint_dir)
    if checkpoint is None or (step is not None and not checkpoint.name.endswith(f"_{step:08d}")):
        raise FileNotFoundError(f"no checkpoint of step {step if step is not None else 'any'} "
                                f"in {cfg.checkpoint_dir} (newest: {checkpoint})")
    groups = model_process_groups(ParallelConfig())
    config = read_hf_config(cfg.model.student)
    shell = build_gpt_model(config, ParallelConfig(), dtype=_DTYPES[cfg.model.student_dtype],
                            pg_collection=groups,
                            vocab_rows=config.padded_vocab_size(
                                cfg.model.student_parallel.tensor_model_parallel_size))
    with model_parallel_layout(groups):
        return load_model_checkpoint(shell, checkpoint / "model"), groups


def export_trained_student(student: torch.nn.Module | None, cfg: RunConfig, plan: ExportPlan
                           ) -> list[Path]:
    """Export the trained student (rank 0 writes); ``[export_dir]``.

    ModelOpt's exporter needs whole weights: ``student`` None, or one sharded with TP or
    PP > 1, is first restored whole from the run's newest checkpoint on every rank (the trainer
    saves one after its last step), so no rerun is needed."""
    from nemo_opd.quant.export import export_full_precision, export_student
    from nemo_opd.runtime import model_parallel_layout

    export_dir = Path(plan.dir or Path(cfg.output_dir) / "export")
    if student is None or (student.config.tensor_model_parallel_size
                           * student.config.pipeline_model_parallel_size > 1):
        log_rank0(logger, "restoring the %s student at TP = PP = 1 for export",
                  cfg.model.student_parallel)
        student, _ = whole_student_from_checkpoint(cfg)
    # ModelOpt's exporter gathers metadata from every rank of the job, so every rank exports
    # its whole copy; only rank 0's lands in export_dir, the others' in scratch space.
    target = export_dir if is_rank0() else Path(tempfile.mkdtemp(prefix="nemo_opd_export_"))
    try:
        with model_parallel_layout(student.pg_collection), third_party_prints_off():
            # a full-precision student (quant.format=none) is written as a plain HF checkpoint
            export = export_student if cfg.quant.format != "none" else export_full_precision
            export(student, cfg.model.student, target, dtype=_DTYPES[plan.dtype],
                   tokenizer_dir=cfg.model.tokenizer_path)
    finally:
        if not is_rank0():
            shutil.rmtree(target, ignore_errors=True)
    _barrier()
    return [export_dir]


def baseline_fingerprints(cfg: RunConfig, evaluation: EvalPlan) -> dict[str, dict[str, Any]]:
    """What each baseline evaluation depends on, as JSON: the teacher's (``"teacher"``) on the
    teacher (its path, or the student's for self-distillation; tokenizer, dtype, layouts) and the
    evaluation; the PTQ student's (``"ptq"``) on the models, the quantization, the evaluation
    and, when it calibrates, the calibration batches (data, seed, micro batch size). Greedy
    evaluation uses no seed, so runs that differ only in seed or training settings share both
    records, and runs with other students share the teacher's."""
    import json

    model = cfg.model
    teacher = {"teacher": model.teacher or model.student, "tokenizer": model.tokenizer_path,
               "teacher_dtype": model.teacher_dtype, "teacher_parallel": model.teacher_parallel,
               "student_parallel": model.student_parallel, "evaluation": evaluation}
    ptq = {"model": model, "quant": cfg.quant, "evaluation": evaluation}
    if cfg.quant.format != "none" and cfg.quant.calibration_batches:
        ptq |= {"data": cfg.data, "seed": cfg.seed,
                "optim.micro_batch_size": cfg.optim.micro_batch_size}
    return {role: json.loads(json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v)
                                         else v for k, v in inputs.items()}))
            for role, inputs in (("teacher", teacher), ("ptq", ptq))}


def baseline_path(output_dir: str | Path, baseline_dir: str, role: str,
                  fingerprint: dict[str, Any]) -> Path:
    """Where the ``role`` baseline record lives: ``<output_dir>/eval_<role>.json``, or, with a
    ``baseline_dir`` shared by several runs, ``<baseline_dir>/eval_<role>-<hash>.json`` keyed by
    its fingerprint (so different baselines never overwrite each other)."""
    import hashlib
    import json

    if not baseline_dir:
        return Path(output_dir) / f"eval_{role}.json"
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return Path(baseline_dir) / f"eval_{role}-{digest}.json"


def reuse_or_evaluate(path: Path, fingerprint: dict[str, Any],
                      evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record saved in ``path`` when it was made with an equal ``fingerprint`` (so a requeued
    or resumed job does not re-evaluate its baselines), else ``evaluate()``, saved by rank 0."""
    import json

    fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back
    _barrier()  # every rank decides on the same file state (rank 0 may be about to write it)
    saved = json.loads(path.read_text()) if path.is_file() else None
    _barrier()
    if saved is not None and saved.get("fingerprint") == fingerprint:
        log_rank0(logger, "reusing %s (same models, quantization, data and evaluation)", path)
        return saved["record"]
    record = evaluate()
    if is_rank0():  # written whole then renamed: a run reading a shared record never sees half
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        partial.write_text(json.dumps({"fingerprint": fingerprint, "record": record}, indent=2))
        partial.replace(path)
    return record


def evaluate_export(export_dir: Path, plan: EvalPlan, *, run_name: str) -> list[dict[str, Any]]:
    """Results records of the export (rank 0; ``[]`` elsewhere): lm-eval's HF model on its
    dequantised weights (fp32 on CPU, the export's dtype on GPU), and TensorRT-LLM serving it
    unchanged where ``tensorrt_llm`` is installed (the NGC TensorRT-LLM container)."""
    if not is_rank0():
        return []
    import importlib.util
    import tempfile

    from nemo_opd.eval import exported

    # On CPU fp32: bf16 matmuls there are slow, and the dequantised codes are exact in fp32.
    cpu_dtype = "float32" if not torch.cuda.is_available() else None
    records = []
    with tempfile.TemporaryDirectory(prefix="nemo_opd_export_") as scratch:
        dtype = cpu_dtype or _export_dtype(export_dir)
        hf_dir = exported.dequantize_export(export_dir, Path(scratch) / "dequantised",
                                            dtype=_DTYPES[dtype])
        lm = exported.hf_lm(hf_dir, dtype=dtype, batch_size=plan.batch_size,
                            numerics=f"HF dequantised {dtype}")
        records.append(_evaluate_lm(lm, plan, run_name=f"{run_name} (HF dequantised)"))
    if importlib.util.find_spec("tensorrt_llm") is not None:
        lm = exported.trtllm_lm(export_dir)
        records.append(_evaluate_lm(lm, plan, run_name=f"{run_name} (TRT-LLM)"))
    else:
        logger.info("TensorRT-LLM is not installed: the export is evaluated through HF only")
    return records


def _export_dtype(export_dir: Path) -> str:
    import json

    config = json.loads((export_dir / "config.json").read_text())
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")


def _local_tasks(plan: EvalPlan) -> dict[str, Any]:
    """The plan's local tasks, generative ones with its generation budget."""
    from nemo_opd.eval.tasks import LocalTask

    return {name: LocalTask.from_file(name, path, max_gen_toks=plan.max_gen_toks)
            for name, path in plan.local_task_files.items()}


def _evaluate_lm(lm: Any, plan: EvalPlan, *, run_name: str) -> dict[str, Any]:
    from nemo_opd.eval.evaluate import evaluate_model

    return evaluate_model(lm, plan.tasks, local_tasks=_local_tasks(plan),
                          data_dir=plan.data_dir or None, limit=plan.limit,
                          num_fewshot=plan.num_fewshot, run_name=run_name, role="student")


def write_results(records: list[dict[str, Any]], output_dir: Path, *,
                  history: list[dict[str, Any]], cfg: RunConfig | None = None) -> dict[str, Any]:
    """Print the seeds' table and write ``results.{json,md,png}`` (+ the in-loop evaluations
    in ``eval_history.json``) under ``output_dir``; returns the table.

    The figure's title names the run (student, format, steps, λ, β) from ``cfg``, else from the
    config the newest checkpoint under ``output_dir/checkpoints`` recorded; its second row is
    the loss of ``metrics.jsonl`` and the in-loop evaluations (``history``) over the steps."""
    import json

    from nemo_opd.eval.report import (
        build_table,
        read_training,
        render_markdown,
        run_title,
        write_report,
    )

    table = build_table(records)
    if is_rank0():
        (output_dir / "eval_history.json").write_text(json.dumps(history, indent=2))
        if cfg is not None:
            config, steps = cfg.to_dict(), cfg.total_steps
        else:  # step_<8 digits>: the last name is the newest checkpoint
            metas = sorted((output_dir / "checkpoints").glob("step_*/meta.json"))
            meta = json.loads(metas[-1].read_text()) if metas else {}
            config, steps = meta.get("config"), meta.get("total_steps")
        title = None if not config else run_title(
            model=config["model"]["student"], fmt=config["quant"]["format"], steps=steps,
            lmbda=config["distill"]["lmbda"], beta=config["distill"]["beta"],
            teacher=config["model"]["teacher"])
        # the curves belong to the trained student's row (the first student row; the export's
        # rows follow it)
        trained = next((r["run"] for r in records if r.get("role") == "student"), "training")
        paths = write_report(records, output_dir / "results", title=title,
                             training={trained: read_training(output_dir, history=history)})
        print(render_markdown(table))
        print("results: " + ", ".join(str(p) for p in paths.values() if p is not None))
    return table


PREEMPTED_EXIT_CODE = 75
"""Exit status after a preemption signal stopped training with a checkpoint (EX_TEMPFAIL:
try again). Any non-zero status makes NeMo-Run's SLURM batch script requeue the job."""


def exit_preempted(steps_done: int, *, resume: bool = True) -> NoReturn:
    """Log that a preemption signal stopped training with a checkpoint at ``steps_done`` and
    exit with :data:`PREEMPTED_EXIT_CODE`, writing no results: the requeued job resumes from
    that checkpoint and writes them (with ``checkpoint.resume``; ``resume=False`` says how to
    continue instead)."""
    if is_rank0():
        if resume:
            logger.warning("preempted at step %d, checkpoint saved; a requeue or rerun resumes "
                           "from it", steps_done)
        else:
            logger.warning("preempted at step %d, checkpoint saved; this run has "
                           "checkpoint.resume=false, so a plain rerun starts over: rerun with "
                           "checkpoint.resume=true to continue from it", steps_done)
    raise SystemExit(PREEMPTED_EXIT_CODE)
