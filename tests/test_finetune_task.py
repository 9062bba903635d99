"""Finding 3c's task and model: subtraction checked by redoing every answer, the fine-tuning
mixture's share, the trainer starting from another model's weights (bit-identical before any
update; another shape refused), the asset cache fine-tuning a student from its own teacher (eval
tasks of both, a key that includes the teacher's), and the shipped fine-tuned model's premise —
addition damaged, subtraction learned — on the 500 held-out problems."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from nemo_opd.demo.finetune import FineTuneTask, SubtractionTask
from nemo_opd.demo.task import AdditionTask, make_task_tokenizer, read_jsonl
from nemo_opd.demo.teacher import TeacherConfig

SMALL_SUB = SubtractionTask(num_train=200, num_eval=30, seed=2)
SMALL_ADD = AdditionTask(num_train=300, num_eval=20)
PROBLEM = re.compile(r"^(\d\d)-(\d\d)=$")


def test_subtraction_answers_and_disjoint_split():
    train = SMALL_SUB.train_records()
    evals = SMALL_SUB.eval_records()["sub_gen"]
    assert len(train) == 200 and len(evals) == 30
    for prompt, answer in ([(r["prompt"], r["response"]) for r in train]
                           + [(r["question"], " " + r["answer"]) for r in evals]):
        a, b = map(int, PROBLEM.match(prompt).groups())
        assert a >= b and answer == f" {a - b:03d}"
    assert not {r["prompt"] for r in train} & {r["question"] for r in evals}
    assert len({r["prompt"] for r in train}) == 200
    assert SubtractionTask().num_problems == 5050  # 0 <= b <= a <= 99


def test_mixture_holds_the_old_share():
    task = FineTuneTask(new=SMALL_SUB, old=SMALL_ADD, old_share=0.2)
    records = task.train_records()
    old = [r for r in records if "+" in r["prompt"]]
    assert task.num_old == 50 and len(old) == 50 and len(records) == 250
    assert {r["prompt"] for r in old} <= {r["prompt"] for r in SMALL_ADD.train_records()}
    assert records == task.train_records()  # seeded
    assert records[:200] != SMALL_SUB.train_records()  # shuffled, not appended
    assert list(task.eval_records()) == list(FineTuneTask.EVAL_TASKS) == ["arith_gen", "sub_gen"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(old_share=1.0), r"old_share must be a number in \[0, 1\)"),
    (dict(old_share=0.9, old=SMALL_ADD), "needs 36000 old training problems; the old task has 300"),
])
def test_bad_mixture(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FineTuneTask(**kwargs)


def test_bad_subtraction_split():
    with pytest.raises(ValueError, match="exceeds the 55 distinct problems"):
        SubtractionTask(digits=1, num_train=50, num_eval=10)


TINY = dataclasses.replace(TeacherConfig(), hidden_size=128, intermediate_size=256, steps=2,
                           warmup_steps=0, batch_size=8, outlier_channels=0)


def test_training_starts_from_the_init_weights(tmp_path):
    """One step at a negligible lr from ``init_dir``: the saved (bf16) weights are the init's
    exactly; another shape is refused before training."""
    from safetensors.torch import load_file

    from nemo_opd.demo.teacher import train_teacher

    base = train_teacher(tmp_path / "base", SMALL_ADD, TINY).model_dir
    frozen = dataclasses.replace(TINY, steps=1, lr=1e-30)
    tuned = train_teacher(tmp_path / "tuned", FineTuneTask(new=SMALL_SUB, old=SMALL_ADD),
                          frozen, init_dir=base).model_dir
    before, after = (load_file(d / "model.safetensors") for d in (base, tuned))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    scratch = train_teacher(tmp_path / "scratch", SMALL_ADD, frozen).model_dir
    assert not torch.equal(load_file(scratch / "model.safetensors")["lm_head.weight"],
                           before["lm_head.weight"])
    with pytest.raises(ValueError, match="does not have the configured model's shape"):
        train_teacher(tmp_path / "wide", SMALL_ADD,
                      dataclasses.replace(frozen, hidden_size=256, intermediate_size=512),
                      init_dir=base)


def test_cache_fine_tunes_the_student_from_its_teacher(tmp_path):
    from nemo_opd.demo import prepare_demo
    from nemo_opd.demo.assets import cache_key, model_key
    from nemo_opd.demo.teacher import FineTuned

    student = FineTuned(task=FineTuneTask(new=SMALL_SUB, old=SMALL_ADD), cfg=TINY)
    assets = prepare_demo(tmp_path, SMALL_ADD, TINY, student)
    assert list(assets.eval_tasks) == ["arith_gen", "arith_mc", "sub_gen"]
    assert len(read_jsonl(assets.eval_tasks["sub_gen"])) == 30
    assert len(read_jsonl(assets.train_file)) == 300  # the distillation's prompts: addition
    teacher_key = cache_key(SMALL_ADD, TINY)
    recorded = (assets.student_dir / "nemo_opd_demo.json").read_text()
    assert model_key(student.task, TINY, teacher_key) in recorded
    assert model_key(student.task, TINY, teacher_key) != model_key(student.task, TINY)
    assert assets.root != prepare_demo(tmp_path, SMALL_ADD, TINY).root


def test_shipped_fine_tuned_model_has_the_premise(tmp_path):
    """Addition damaged (0.480 when chosen) and subtraction learned (0.958), on the 500 held-out
    problems each (docs/reproduction.md, finding 3c); the shipped copy's key is current."""
    from transformers import AutoModelForCausalLM

    from nemo_opd.demo.assets import model_key, shipped_copy
    from nemo_opd.demo.score import exact_match, hf_logits_fn
    from nemo_opd.demo.teacher import FINETUNED_DEMO

    shipped = shipped_copy(FINETUNED_DEMO.task, FINETUNED_DEMO.cfg,
                           model_key(AdditionTask(), TeacherConfig()))
    assert shipped is not None, ("the shipped fine-tuned model is stale: run `python -m "
                                 "nemo_opd.demo.teacher OUT --model demo_finetuned --ship`")
    model = AutoModelForCausalLM.from_pretrained(shipped, dtype=torch.float32).eval()
    tokenizer = make_task_tokenizer()
    with torch.no_grad():
        scores = {name: exact_match(hf_logits_fn(model), tokenizer, records)
                  for name, records in FINETUNED_DEMO.task.eval_records().items()}
    assert 0.3 <= scores["arith_gen"] <= 0.7 and scores["sub_gen"] >= 0.9, scores
