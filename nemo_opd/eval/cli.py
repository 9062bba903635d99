"""``nemo_opd eval``: evaluate a model directory, or tabulate result files.

Evaluate (one results row; launch with ``torchrun --nproc-per-node N`` for ``--tp N``); the
``<out>.json`` written holds the record, which ``compare`` reads::

    nemo_opd eval --model /models/Qwen3-8B --tasks seed --name teacher --role teacher \\
        --out results/teacher
    nemo_opd eval --model export/ --export --backend hf --tasks seed gsm8k --out results/export
    nemo_opd eval --model tiny/ --local-task arith=arith.jsonl --tasks arith --out results/tiny

Compare (the seeds' table from several runs)::

    nemo_opd eval compare results/teacher.json results/ptq.json results/opd.json \\
        --out results/table

What this adds to lm-eval's own command line (``nemo_opd lm_eval --model nemo_opd ...`` runs
that one with the megatron model registered): the megatron backend at any TP size, dequantised
ModelOpt exports, local jsonl tasks without a YAML, offline benchmark data, and the results
record / table. The model work is lm-eval's: ``--backend hf`` is lm-eval's ``hf`` model built as
``lm_eval --model hf`` builds it, ``--backend megatron`` the same ``MegatronLM`` as
``--model nemo_opd``.

Nothing heavy is imported at module level: ``--help`` answers without torch, lm-eval, megatron
or ModelOpt.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nemo_opd.eval.evaluate import ROLES
from nemo_opd.eval.tasks import HUB_TASKS, TASK_SETS, LocalTask, load_tasks, resolve_tasks

__all__ = ["main", "build_eval_parser", "build_compare_parser"]

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")  # nemo_opd.eval.exported.DTYPES (torch-free here)
_BACKENDS = ("megatron", "hf", "trtllm")


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo_opd eval",
        description="Evaluate a model with lm-eval and write <out>.json (the result record), "
                    "<out>.md and <out>.png. 'nemo_opd eval compare --help' tabulates several "
                    "result files.",
        epilog="task sets: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in TASK_SETS.items())
               + f". Benchmarks: {', '.join(HUB_TASKS)}.",
    )
    parser.add_argument("--model", required=True, type=Path,
                        help="Hugging Face model directory, or a ModelOpt unified export with "
                             "--export")
    parser.add_argument("--export", action="store_true",
                        help="--model is a ModelOpt unified checkpoint (hf_quant_config.json): "
                             "dequantise it for the megatron/hf backends, serve it as is with "
                             "trtllm")
    parser.add_argument("--backend", choices=_BACKENDS, default="megatron",
                        help="megatron: megatron-core GPTModel (TP with torchrun; lm-eval's "
                             "--model nemo_opd); hf: lm-eval's --model hf; trtllm: lm-eval's "
                             "--model trtllm (containers only). Default: megatron")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="NAME",
                        help="task sets, benchmarks or local task names (default: all "
                             "--local-task)")
    parser.add_argument("--local-task", action="append", default=[], metavar="NAME=JSONL",
                        help="a local jsonl task ({query, choices, gold} multiple choice or "
                             "{question, answer} generation); repeatable")
    parser.add_argument("--data-dir", type=Path,
                        help="read benchmark data from <dir>/<dataset_path>/<name>/<split>.jsonl "
                             "instead of the hub")
    parser.add_argument("--limit", type=float,
                        help="documents per task (>= 1) or fraction (< 1); default all")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: per task)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size for --backend megatron (world size must be a "
                             "multiple)")
    parser.add_argument("--dtype", choices=_DTYPES,
                        help="weights dtype for the megatron/hf backends (default: the "
                             "checkpoint's: config.json's dtype, or for --export the dtype of "
                             "its unquantized tensors)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    parser.add_argument("--max-length", type=int,
                        help="longest sequence in tokens (default: the model's)")
    parser.add_argument("--name", help="run name in tables (default: the model directory name)")
    parser.add_argument("--role", choices=ROLES,
                        help="teacher / ptq / student: where this row sits in the gap column")
    parser.add_argument("--out", required=True, type=Path,
                        help="output prefix: writes <out>.json, <out>.md, <out>.png")
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo_opd eval compare",
        description="Build the results table (runs x tasks, Avg, share of the PTQ gap "
                    "recovered) from result JSON files; writes <out>.md, <out>.json, <out>.png.")
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files")
    parser.add_argument("--out", required=True, type=Path, help="output prefix")
    parser.add_argument("--teacher", metavar="RUN", help="run name of the teacher row "
                        "(default: the record with role teacher)")
    parser.add_argument("--ptq", metavar="RUN", help="run name of the PTQ baseline row "
                        "(default: the record with role ptq)")
    return parser


def _local_tasks(specs: list[str]) -> dict[str, LocalTask]:
    tasks = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--local-task expects NAME=PATH.jsonl, got {spec!r}")
        tasks[name] = LocalTask.from_file(name, path)
    return tasks


@contextlib.contextmanager
def _open_lm(args: argparse.Namespace) -> Iterator[Any]:
    """The lm-eval LM for ``args`` (runtime and temporary files live as long as the block)."""
    from nemo_opd.eval import exported

    if args.backend == "trtllm":
        if not args.export:
            raise ValueError("--backend trtllm serves a ModelOpt export; pass --export")
        yield exported.trtllm_lm(args.model, tensor_parallel_size=args.tp)
        return
    if args.backend == "hf":
        if args.tp != 1:
            raise ValueError("--backend hf runs on one process; --tp must be 1")
        from nemo_opd.eval.lm import dtype_label

        with exported.plain_checkpoint(args.model, export=args.export,
                                       dtype=args.dtype) as (model_dir, dtype):
            prefix = "dequantised " if args.export else ""
            yield exported.hf_lm(model_dir, dtype=dtype, batch_size=args.batch_size,
                                 max_length=args.max_length,
                                 numerics=f"HF {prefix}{dtype_label(dtype)}")
        return
    from nemo_opd.eval.lm import LMConfig, open_megatron_lm

    with open_megatron_lm(args.model, tp=args.tp, dtype=args.dtype, export=args.export,
                          config=LMConfig(batch_size=args.batch_size,
                                          max_length=args.max_length)) as lm:
        yield lm


def _evaluate(argv: list[str]) -> int:
    args = build_eval_parser().parse_args(argv)
    from nemo_opd.eval.evaluate import evaluate_model
    from nemo_opd.eval.report import write_report
    from nemo_opd.runtime import is_rank0

    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    local = _local_tasks(args.local_task)
    # Names and data are checked (and datasets cached) before any model loads.
    load_tasks(resolve_tasks(args.tasks, local, data_dir=args.data_dir,
                             num_fewshot=args.num_fewshot))
    name = args.name or args.model.resolve().name
    with _open_lm(args) as lm:
        record = evaluate_model(lm, args.tasks, local_tasks=local, data_dir=args.data_dir,
                                limit=args.limit, num_fewshot=args.num_fewshot, run_name=name,
                                role=args.role)
        reporting = is_rank0()  # asked while the runtime (if any) is still up
    if reporting:
        paths = write_report([record], args.out)
        print(Path(paths["md"]).read_text(), end="")
        print(f"wrote {', '.join(str(p) for p in paths.values() if p is not None)}")
    return 0


def _compare(argv: list[str]) -> int:
    args = build_compare_parser().parse_args(argv)
    from nemo_opd.eval.report import load_results, write_report

    paths = write_report(load_results(args.results), args.out, teacher=args.teacher,
                         ptq=args.ptq)
    print(Path(paths["md"]).read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values() if p is not None)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``nemo_opd eval [compare] ...``; returns the exit code (2 for bad input, with a message)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = _compare if argv[:1] == ["compare"] else _evaluate
    try:
        return command(argv[1:] if command is _compare else argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"nemo_opd eval: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from nemo_opd.eval.exported import BackendUnavailable  # imports torch: only on error

        if not isinstance(err, BackendUnavailable):
            raise
        print(f"nemo_opd eval: error: {err}", file=sys.stderr)
        return 2
