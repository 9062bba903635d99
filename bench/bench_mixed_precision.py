"""bf16 numerics of the optimizer: fp32 student vs bf16 with fp32 masters vs plain bf16 AdamW.

    OMP_NUM_THREADS=1 python bench/bench_mixed_precision.py            # ~6 minutes on 2 cores
    OMP_NUM_THREADS=1 python bench/bench_mixed_precision.py --lr 1e-5 --steps 20

The demo student (the shipped teacher, INT4 QAT, self-distillation), off-policy (λ=0, reverse
KL) on one fixed batch of 32 problems, ``--steps`` steps per learning rate. "plain" reproduces
the optimizer nemo_opd had before megatron's mixed precision: AdamW stepping the bf16
parameters themselves (bf16 moments, no fp32 copy). Reported per run: the loss drop over the
run, the fraction of weight-matrix elements the run changed, and their mean absolute change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

import torch

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
from nemo_opd.train.optim import CpuMixedPrecisionAdam, lr_scheduler


class PlainAdam(CpuMixedPrecisionAdam):
    """AdamW on the model's own (bf16) parameters: what the trainer did before."""

    @staticmethod
    def _master(param: torch.nn.Parameter) -> torch.Tensor:
        return param

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        for param, _ in self.pairs:
            param.grad = param.main_grad.to(param.dtype)
        return False


def _run(demo, dtype: str, lr: float, steps: int, plain: bool) -> dict:
    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import Trainer

    cfg = RunConfig(
        model=ModelConfig(student=str(demo.student_dir), teacher=str(demo.teacher_dir),
                          student_dtype=dtype),
        data=DataConfig(train_files=(str(demo.train_file),), max_prompt_length=16,
                        max_response_length=8, shuffle=False),
        quant=QuantConfig(format="int4", calibration_batches=1),
        distill=DistillConfig(beta=1.0, lmbda=0.0),
        optim=OptimConfig(lr=lr, steps=steps, micro_batch_size=32),
        checkpoint=CheckpointConfig(resume=False),
        logging=LoggingConfig(jsonl=False, tensorboard=False, progress_bar=False),
        output_dir=tempfile.mkdtemp())
    with distributed_runtime(ParallelConfig(), seed=3):
        trainer = Trainer(cfg)
        if plain:
            optimizer = PlainAdam(trainer.models.student, cfg.optim, grad_stats_group=None)
            trainer.optim = dataclasses.replace(
                trainer.optim, optimizer=optimizer,
                scheduler=lr_scheduler(optimizer, cfg.optim, steps))
        weights = {n: p for n, p in trainer.models.student.named_parameters() if p.dim() >= 2}
        start = {n: p.detach().float().clone() for n, p in weights.items()}
        batch = trainer.batches.state_dict()
        losses = []
        for step in range(steps):
            trainer.batches.load_state_dict(batch)
            losses.append(trainer.train_step(step)["loss"])
        delta = torch.cat([(p.detach().float() - start[n]).flatten() for n, p in weights.items()])
    return {"dtype": dtype, "optimizer": "plain AdamW" if plain else "fp32 masters", "lr": lr,
            "loss_drop": losses[0] - losses[-1], "changed": float((delta != 0).float().mean()),
            "mean_abs_update": float(delta.abs().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-5, 3e-5])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from nemo_opd.demo import prepare_demo

    demo = prepare_demo(tempfile.mkdtemp())
    for lr in args.lr:  # the three optimizers interleaved per learning rate
        for dtype, plain in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
            print(json.dumps(_run(demo, dtype, lr, args.steps, plain)), flush=True)


if __name__ == "__main__":
    main()
