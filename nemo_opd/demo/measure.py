"""Measure the demo's premise: the teacher is accurate, 4-bit PTQ loses accuracy, and a little
distillation wins some back.

``python -m nemo_opd.demo.measure WORKDIR [--formats int4 mxfp4] [--distill-steps 40]`` prepares
the demo assets, imports teacher and student into megatron-core ``GPTModel``\\ s, quantizes the
student with ModelOpt (:func:`nemo_opd.quant.quantize_student`, weight-only PTQ calibrated on
training problems) and prints greedy exact match and multiple-choice accuracy on the held-out
problems, as JSON. With ``--distill-steps`` it then runs the simplest distillation there is and
measures again: Adam on the generalized JSD (``--beta``; 0 = forward KL) over the answer tokens,
through ModelOpt's straight-through fake quantizers — off-policy on the training problems' own
text, or with ``--on-policy`` on answers the student samples itself. A check of the premise, not
the project's trainer (:mod:`nemo_opd.train`). Measured numbers: ``nemo_opd/demo/assets/README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from nemo_opd.demo.assets import DemoAssets, prepare_demo
from nemo_opd.demo.score import choice_accuracy, encode_pairs, exact_match, megatron_logits_fn
from nemo_opd.demo.task import read_jsonl

__all__ = ["load_pair", "score_model", "training_batches", "sample_answers", "distill", "measure",
           "main"]

logger = logging.getLogger(__name__)


def score_model(model: torch.nn.Module, tokenizer, assets: DemoAssets, tp_group=None
                ) -> dict[str, float]:
    """``{"arith_gen": exact match, "arith_mc": accuracy}`` of a ``GPTModel`` on the eval files."""
    model.eval()
    logits_fn = megatron_logits_fn(model, tp_group)
    return {"arith_gen": exact_match(logits_fn, tokenizer,
                                     read_jsonl(assets.eval_tasks["arith_gen"])),
            "arith_mc": choice_accuracy(logits_fn, tokenizer,
                                        read_jsonl(assets.eval_tasks["arith_mc"]))}


def training_batches(assets: DemoAssets, tokenizer, batch_size: int, seed: int = 0):
    """Endless ``(ids [b, s], prompt_len)`` batches of training text, drawn with a seeded
    generator (the same on every TP rank)."""
    records = read_jsonl(assets.train_file)
    ids, prompt_len = encode_pairs(tokenizer, [(r["prompt"], r["response"]) for r in records])
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield ids[torch.randint(len(ids), (batch_size,), generator=generator)], prompt_len


def load_pair(assets: DemoAssets, fmt: str, tp: int = 1, calibration_batches: int = 4):
    """``(teacher, student)`` ``GPTModel``\\ s at TP ``tp``; the student PTQ-quantized to ``fmt``
    (calibrated on ``calibration_batches`` batches of 64 training problems)."""
    from transformers import AutoTokenizer

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.quant.student import quantize_student
    from nemo_opd.runtime import ParallelConfig

    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    teacher = load_hf_gpt(assets.teacher_dir, ParallelConfig(tp))
    student = load_hf_gpt(assets.student_dir, ParallelConfig(tp))
    batches = training_batches(assets, tokenizer, 64, seed=1)

    def calibrate(model: torch.nn.Module) -> None:
        for _ in range(calibration_batches):
            ids, _ = next(batches)
            model(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)

    quantize_student(student, fmt, calibrate)
    return teacher, student, tokenizer


@torch.no_grad()
def sample_answers(model: torch.nn.Module, ids: torch.Tensor, prompt_len: int, eos_id: int,
                   generator: torch.Generator, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the answers in ``ids [b, s]`` by ``model``'s own samples (temperature 1, as many
    tokens as the reference answer + EOS); return them and the mask ``[b, s]`` of the logit
    positions that predict a sampled token up to and including its first EOS.

    Every TP rank draws the same tokens: the gathered logits and ``generator`` are identical.
    """
    logits_fn = megatron_logits_fn(model, tp_group)
    seq = ids[:, :prompt_len]
    for _ in range(ids.shape[1] - prompt_len):
        probs = torch.softmax(logits_fn(seq)[:, -1], dim=-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], dim=1)
    # A sampled token counts if no EOS came before it.
    is_eos = (seq[:, prompt_len:] == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    mask = torch.zeros_like(seq, dtype=torch.bool)
    mask[:, prompt_len - 1:-1] = eos_before == 0
    return seq, mask


def distill(student: torch.nn.Module, teacher: torch.nn.Module, assets: DemoAssets, tokenizer,
            *, steps: int, lr: float = 1e-4, batch_size: int = 64, beta: float = 0.0,
            on_policy: bool = False, tp_group=None) -> list[float]:
    """``steps`` Adam steps minimising :func:`nemo_opd.loss.generalized_jsd` (β = ``beta``)
    between the frozen teacher's and the fake-quantized student's vocab-parallel logits over
    the answer tokens of training problems (``on_policy``: over answers the student samples
    itself, :func:`sample_answers`); returns the per-step losses."""
    from nemo_opd.loss import generalized_jsd

    teacher.eval()
    student.train()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    batches = training_batches(assets, tokenizer, batch_size, seed=2)
    sampler = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        ids, prompt_len = next(batches)
        if on_policy:
            ids, mask = sample_answers(student, ids, prompt_len, tokenizer.eos_token_id,
                                       sampler, tp_group)
        else:
            # Logits at positions prompt_len-1 .. s-2 predict the answer tokens and the EOS.
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, prompt_len - 1:-1] = True
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            teacher_logits = teacher(ids, positions, attention_mask=None)
        student_logits = student(ids, positions, attention_mask=None)
        loss = generalized_jsd(student_logits, teacher_logits, beta=beta, mask=mask,
                               tp_group=tp_group)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def measure(assets: DemoAssets, formats: tuple[str, ...] = ("int4", "mxfp4"), *,
            distill_steps: int = 0, tp: int = 1, **distill_kwargs) -> dict:
    """Teacher, PTQ and (optionally) distilled-student scores; call inside a distributed
    runtime of TP size ``tp``. ``distill_kwargs`` go to :func:`distill`."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    results: dict = {}
    for fmt in formats:
        teacher, student, tokenizer = load_pair(assets, fmt, tp)
        if "teacher" not in results:
            results["teacher"] = score_model(teacher, tokenizer, assets, tp_group)
        results[f"{fmt}_ptq"] = score_model(student, tokenizer, assets, tp_group)
        if distill_steps:
            start = time.perf_counter()
            losses = distill(student, teacher, assets, tokenizer, steps=distill_steps,
                             tp_group=tp_group, **distill_kwargs)
            results[f"{fmt}_distilled"] = score_model(student, tokenizer, assets, tp_group) | {
                "loss_first": losses[0], "loss_last": losses[-1],
                "seconds": round(time.perf_counter() - start, 1)}
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m nemo_opd.demo.measure WORKDIR [--formats ...] [--distill-steps N]``."""
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    parser = argparse.ArgumentParser(prog="python -m nemo_opd.demo.measure",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="demo cache directory")
    parser.add_argument("--formats", nargs="+", default=["int4", "mxfp4"])
    parser.add_argument("--distill-steps", type=int, default=0)
    parser.add_argument("--on-policy", action="store_true",
                        help="distil on the student's own sampled answers")
    parser.add_argument("--beta", type=float, default=0.0, help="generalized JSD beta")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    assets = prepare_demo(args.workdir)
    with distributed_runtime(ParallelConfig()):
        results = measure(assets, tuple(args.formats), distill_steps=args.distill_steps,
                          on_policy=args.on_policy, beta=args.beta, lr=args.lr,
                          batch_size=args.batch_size)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
