"""The built-in demo's synthetic task: fixed-width addition, generated deterministically.

A problem is ``"{a}+{b}="`` with both operands zero-padded to ``digits`` digits; its answer is the
sum zero-padded to ``digits + 1`` digits, written after one space: ``"47+85="`` → ``" 132"``,
``"07+05="`` → ``" 012"`` (the default is two digits).
Fixed widths give every prompt and every answer the same number of tokens (the tokenizer below
splits digits individually), so one forward pass scores a whole batch (greedy exact match is
"every answer token is the argmax", see :mod:`nemo_opd.demo.score`).

The problems are split once, by a seeded generator, into disjoint train and eval sets; the eval
problems are never trained on, so the accuracy measured on them is the model's arithmetic, not
its memory. Files written (all jsonl, one JSON object per line):

* train: ``{"prompt": "47+85=", "response": " 132"}`` — prompt and response joined without a
  separator are the text the teacher was trained on (the trainer appends EOS to the response);
* generate eval: ``{"question": "47+85=", "answer": "132"}`` — greedy generation after the
  question, exact match with surrounding whitespace ignored;
* multiple-choice eval: ``{"query": "47+85=", "choices": ["132", ...], "gold": i}`` — lm-eval's
  default ``target_delimiter`` (one space) joins query and choice, which reproduces the training
  text exactly. The distractors are the near misses a model that slips makes: the sum ± 1, ± 10,
  ± 100 (a carry dropped or added), each kept only when in range.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from nemo_opd.demo.chain import ChainSumTask
    from nemo_opd.demo.finetune import SubtractionTask

__all__ = [
    "TASK_VERSION",
    "AdditionTask",
    "check_split",
    "Problem",
    "make_task_tokenizer",
    "split_problems",
    "train_records",
    "generate_records",
    "choice_records",
    "write_jsonl",
    "read_jsonl",
]

TASK_VERSION = 1
"""Bump when the generated text changes: cached demo assets are keyed on it."""

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One addition problem ``a + b``."""

    a: int
    b: int


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    """Fixed-width ``digits``-digit addition and its deterministic train/eval split."""

    digits: int = 2
    """Digits per operand (answers have ``digits + 1``)."""
    num_train: int = 9000
    """Distinct training problems (the train jsonl)."""
    num_eval: int = 500
    """Distinct held-out problems (each eval jsonl), disjoint from the training problems."""
    num_choices: int = 4
    """Choices per multiple-choice question (the sum and ``num_choices - 1`` near misses)."""
    seed: int = 0
    """Seed of the split and of the distractor choice."""

    EVAL_TASKS: ClassVar[tuple[str, ...]] = ("arith_gen", "arith_mc")
    """The names :meth:`eval_records` returns."""

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 6:
            raise ValueError(f"AdditionTask.digits must be an int in [1, 6], got {self.digits!r}")
        check_split(self, self.num_problems)
        if not isinstance(self.num_choices, int) or not 2 <= self.num_choices <= 7:
            raise ValueError(f"AdditionTask.num_choices must be an int in [2, 7] (the sum and up "
                             f"to six near misses), got {self.num_choices!r}")

    @property
    def num_problems(self) -> int:
        """Distinct ordered problems ``(a, b)``."""
        return 10 ** (2 * self.digits)

    def prompt(self, problem: Problem) -> str:
        """``"47+85="`` (operands zero-padded to ``digits``)."""
        return f"{problem.a:0{self.digits}d}+{problem.b:0{self.digits}d}="

    def answer(self, value: int) -> str:
        """``value`` as an answer string, zero-padded to ``digits + 1`` digits (no space)."""
        return f"{value:0{self.digits + 1}d}"

    def solution(self, problem: Problem) -> str:
        """The correct answer of ``problem`` (no leading space)."""
        return self.answer(problem.a + problem.b)

    def train_records(self) -> list[dict[str, str]]:
        """:func:`train_records` of this task (what the teacher trainer reads)."""
        return train_records(self)

    def eval_records(self) -> dict[str, list[dict]]:
        """Eval task name → records: ``arith_gen`` (:func:`generate_records`) and ``arith_mc``
        (:func:`choice_records`)."""
        return {"arith_gen": generate_records(self), "arith_mc": choice_records(self)}


def check_split(task: AdditionTask | ChainSumTask | SubtractionTask, num_problems: int) -> None:
    """``ValueError`` unless ``task.num_train`` and ``task.num_eval`` are ints >= 1 that fit
    together in the task's ``num_problems`` distinct problems (the shared rule of the demo
    tasks)."""
    kind = type(task).__name__
    for name in ("num_train", "num_eval"):
        if not isinstance(getattr(task, name), int) or getattr(task, name) < 1:
            raise ValueError(f"{kind}.{name} must be an int >= 1, got {getattr(task, name)!r}")
    if task.num_train + task.num_eval > num_problems:
        raise ValueError(f"{kind}.num_train + num_eval = {task.num_train + task.num_eval} "
                         f"exceeds the {num_problems} distinct problems")


def split_problems(task: AdditionTask) -> tuple[list[Problem], list[Problem]]:
    """``(train, eval)``: disjoint lists of distinct problems, the same for the same task.

    Problems are drawn as distinct indices ``a · 10^digits + b`` by ``random.Random(seed)``; the
    first ``num_eval`` are the eval set.
    """
    base = 10 ** task.digits
    indices = random.Random(task.seed).sample(range(task.num_problems),
                                              task.num_eval + task.num_train)
    problems = [Problem(i // base, i % base) for i in indices]
    return problems[task.num_eval:], problems[:task.num_eval]


def _near_misses(task: AdditionTask, total: int, rng: random.Random) -> list[int]:
    largest = 2 * (10 ** task.digits - 1)
    candidates = [total + d for d in (1, -1, 10, -10, 100, -100) if 0 <= total + d <= largest]
    return rng.sample(candidates, task.num_choices - 1)


def train_records(task: AdditionTask) -> list[dict[str, str]]:
    """``{"prompt", "response"}`` for every training problem (response = space + answer)."""
    train, _ = split_problems(task)
    return [{"prompt": task.prompt(p), "response": " " + task.solution(p)} for p in train]


def generate_records(task: AdditionTask) -> list[dict[str, str]]:
    """``{"question", "answer"}`` for every eval problem."""
    _, held_out = split_problems(task)
    return [{"question": task.prompt(p), "answer": task.solution(p)} for p in held_out]


def choice_records(task: AdditionTask) -> list[dict]:
    """``{"query", "choices", "gold"}`` for every eval problem; the gold position is seeded."""
    _, held_out = split_problems(task)
    rng = random.Random(task.seed + 1)
    records = []
    for p in held_out:
        total = p.a + p.b
        values = [total, *_near_misses(task, total, rng)]
        rng.shuffle(values)
        records.append({"query": task.prompt(p), "choices": [task.answer(v) for v in values],
                        "gold": values.index(total)})
    return records


def make_task_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` that puts every digit in its own token.

    Digits are split before BPE (``pre_tokenizers.Digits(individual_digits=True)``), so a number
    is always one token per digit, whatever its neighbours: the model sees place value directly.
    The task's text has nothing left to merge (digits, ``+``, ``=``, space), so the vocabulary is
    the 256 byte tokens plus ``<|endoftext|>`` (EOS/BOS) and ``<pad>``; no chat template (prompts
    are plain text).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["0123456789+= "], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0],
                                   bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1])


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write ``records`` one JSON object per line; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a jsonl file written by :func:`write_jsonl`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]
