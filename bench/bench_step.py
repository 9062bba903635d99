"""Step-time breakdown of the distillation trainer, off-policy (λ=0) vs on-policy (λ=1).

    OMP_NUM_THREADS=1 python bench/bench_step.py                 # tiny Llama, CPU, ~1 minute
    OMP_NUM_THREADS=1 python bench/bench_step.py --micro-batch 32 --max-new-tokens 8  # the demo's

The trainers live in one process on the same tiny student/teacher pair (written to a temporary
directory by :mod:`nemo_opd.models.tiny`), the same data and the same configuration but λ and,
for the λ=1 runs, the rollout engine (``--engines``: the colocated megatron engine and the HF
engine refit after every optimizer step, whose refit time is counted with the optimizer). Their
steps are interleaved (step k of every run, the order rotating every step), so load on a shared
machine lands on all; the ratio of their step times is the on-policy cost the seeds complain
about: rollouts are generated token by token, and every rollout token is scored
by the teacher and the student. The first ``--warmup`` steps of each are not counted (lazy
initialisation). Times come from the trainer's own per-step metrics (``time_rollout_s``,
``time_teacher_s``, ``time_student_s``, ``time_optimizer_s``, ``step_seconds``): the table
shows medians, the remainder of a step (data, batching, metrics) as "other", and the total
step's minimum too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
from pathlib import Path

import torch

PARTS = ("time_rollout_s", "time_teacher_s", "time_student_s", "time_optimizer_s")


def _write_data(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"question: what is {a} plus {b}?",
                                "response": f"answer: {a + b}"}) + "\n")


def _summary(history: list[dict], warmup: int) -> dict[str, float]:
    steps = history[warmup:]
    out = {k: statistics.median(h[k] for h in steps) for k in (*PARTS, "step_seconds",
                                                               "loss_tokens", "rollout_length")}
    # per step, then the median: medians of the parts need not add up to the step's
    out["other_s"] = statistics.median(h["step_seconds"] - sum(h[k] for k in PARTS)
                                       for h in steps)
    out["min_step_seconds"] = min(h["step_seconds"] for h in steps)
    out["rollout_tokens_per_s"] = statistics.median(h["rollout_tokens_per_s"] for h in steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted first steps")
    parser.add_argument("--micro-batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--format", default="mxfp4", help="student quantization format")
    parser.add_argument("--engines", default="megatron,hf",
                        help="rollout engines of the λ=1 runs, comma-separated (rollout.engine; "
                             "default: %(default)s)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

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
    from nemo_opd.models.tiny import make_tiny_hf_model, make_tiny_tokenizer
    from nemo_opd.rollout import SamplingParams
    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = make_tiny_tokenizer()
        student = make_tiny_hf_model(root / "student", "llama", seed=0, tokenizer=tokenizer)
        teacher = make_tiny_hf_model(root / "teacher", "llama", seed=1, tokenizer=tokenizer)
        _write_data(root / "train.jsonl", 256)
        with distributed_runtime(ParallelConfig(1), seed=0):
            trainers = {}
            runs = [("λ=0", 0.0, "megatron")] + [(f"λ=1 {engine}", 1.0, engine)
                                                 for engine in args.engines.split(",")]
            for name, lmbda, engine in runs:
                cfg = RunConfig(
                    model=ModelConfig(student=str(student), teacher=str(teacher)),
                    data=DataConfig(train_files=(str(root / "train.jsonl"),)),
                    quant=QuantConfig(format=args.format, calibration_batches=1),
                    distill=DistillConfig(lmbda=lmbda, beta=0.5),
                    rollout=RolloutConfig(engine=engine),
                    # min = max: every rollout has the same length, so runs compare like for like
                    sampling=SamplingParams(max_new_tokens=args.max_new_tokens,
                                            min_new_tokens=args.max_new_tokens),
                    optim=OptimConfig(steps=args.steps + args.warmup,
                                      micro_batch_size=args.micro_batch),
                    logging=LoggingConfig(progress_bar=False, tensorboard=False, jsonl=False),
                    output_dir=str(root / f"run_lambda{lmbda:g}_{engine}"))
                trainers[name] = Trainer(cfg)
            histories: dict[str, list[dict]] = {name: [] for name in trainers}
            for step in range(args.steps + args.warmup):
                rotate = step % len(trainers)  # the order rotates every step
                order = list(trainers)[rotate:] + list(trainers)[:rotate]
                for name in order:
                    histories[name].append(trainers[name].train_step(step))
            results = {name: _summary(history, args.warmup)
                       for name, history in histories.items()}

    off = results["λ=0"]
    on_runs = [name for name in results if name != "λ=0"]
    print(f"tiny Llama (hidden 64, 2 layers, vocab 384), {args.format} student, "
          f"{args.micro_batch} prompts/step, {args.max_new_tokens} new tokens/rollout, "
          f"{args.steps} steps after {args.warmup} warm-up; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    header = f"{'ms / step (medians)':<22}{'λ=0':>10}" + "".join(
        f"{name:>16}{'ratio':>7}" for name in on_runs)
    print(header)
    print("-" * len(header))
    rows = [("rollout", "time_rollout_s"), ("teacher forward", "time_teacher_s"),
            ("student fwd+bwd", "time_student_s"), ("optimizer (+ refit)", "time_optimizer_s"),
            ("other", "other_s"), ("total step", "step_seconds"),
            ("min total step", "min_step_seconds")]
    for label, key in rows:
        cells = "".join(f"{1e3 * results[name][key]:>16.1f}"
                        + (f"{results[name][key] / off[key]:>6.1f}x" if off[key] > 0 else
                           f"{'-':>7}") for name in on_runs)
        print(f"{label:<22}{1e3 * off[key]:>10.1f}{cells}")
    print(f"{'loss tokens / step':<22}{off['loss_tokens']:>10.0f}" + "".join(
        f"{results[name]['loss_tokens']:>16.0f}{'':>7}" for name in on_runs))
    print(f"{'rollout tokens / s':<22}{'-':>10}" + "".join(
        f"{results[name]['rollout_tokens_per_s']:>16.0f}{'':>7}" for name in on_runs))
    for name in on_runs:
        print(f"on-policy cost ratio ({name} / λ=0, median step time): "
              f"{results[name]['step_seconds'] / off['step_seconds']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
