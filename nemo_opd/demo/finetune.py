"""Seed 003 §4 in miniature: new knowledge fine-tuned into the demo teacher damages what it
could do; self-distillation from the original weights is to bring it back
(``docs/reproduction.md``, finding 3c).

* The *knowledge*: fixed-width subtraction, :class:`SubtractionTask` — ``"47-15="`` → ``" 032"``
  (``a ≥ b``, the answer zero-padded to ``digits + 1`` digits as the addition task's), unseen by
  the demo teacher.
* The *fine-tuning data*: :class:`FineTuneTask`, the subtraction training problems mixed with a
  share of the addition ones (the seed mixed 70 % documents with 30 % chat SFT and its
  instruction following still fell).
* The *behaviour*: the addition the teacher was trained for (``arith_gen``), measured next to
  the knowledge (``sub_gen``).

Problems are split once, by a seeded generator, into disjoint train and eval sets, as in
:mod:`nemo_opd.demo.task`; the files have that module's formats.
"""

from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

from nemo_opd.demo.task import AdditionTask, check_split, generate_records, train_records

__all__ = ["FineTuneTask", "SubtractionTask"]


@dataclasses.dataclass(frozen=True)
class SubtractionTask:
    """Fixed-width ``digits``-digit subtraction ``a - b`` with ``a ≥ b``, and its split."""

    digits: int = 2
    """Digits per operand (answers have ``digits + 1``, as the addition task's)."""
    num_train: int = 4000
    """Distinct training problems."""
    num_eval: int = 500
    """Distinct held-out problems, disjoint from the training problems."""
    seed: int = 0
    """Seed of the split."""

    EVAL_TASKS: ClassVar[tuple[str, ...]] = ("sub_gen",)
    """The names :meth:`eval_records` returns."""

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 4:
            raise ValueError(f"SubtractionTask.digits must be an int in [1, 4], "
                             f"got {self.digits!r}")
        check_split(self, self.num_problems)

    @property
    def num_problems(self) -> int:
        """Distinct problems ``(a, b)`` with ``a ≥ b``."""
        base = 10 ** self.digits
        return base * (base + 1) // 2

    def problems(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(train, eval)``: disjoint lists of distinct ``(a, b)``, the same for the same task
        (the first ``num_eval`` drawn by ``random.Random(seed)`` are the eval set)."""
        base = 10 ** self.digits
        pairs = [(a, b) for a in range(base) for b in range(a + 1)]
        drawn = random.Random(self.seed).sample(pairs, self.num_eval + self.num_train)
        return drawn[self.num_eval:], drawn[:self.num_eval]

    def prompt(self, problem: tuple[int, int]) -> str:
        """``"47-15="`` (operands zero-padded to ``digits``)."""
        a, b = problem
        return f"{a:0{self.digits}d}-{b:0{self.digits}d}="

    def solution(self, problem: tuple[int, int]) -> str:
        """``a - b`` zero-padded to ``digits + 1`` digits (no leading space)."""
        return f"{problem[0] - problem[1]:0{self.digits + 1}d}"

    def train_records(self) -> list[dict[str, str]]:
        """``{"prompt", "response"}`` for every training problem (response = space + answer)."""
        train, _ = self.problems()
        return [{"prompt": self.prompt(p), "response": " " + self.solution(p)} for p in train]

    def eval_records(self) -> dict[str, list[dict[str, str]]]:
        """Eval task name → records: ``sub_gen`` (``{"question", "answer"}``, exact match)."""
        _, held_out = self.problems()
        return {"sub_gen": [{"question": self.prompt(p), "answer": self.solution(p)}
                            for p in held_out]}


@dataclasses.dataclass(frozen=True)
class FineTuneTask:
    """Fine-tuning data: every :attr:`new` training problem, plus :attr:`old` ones making up
    :attr:`old_share` of the mixture, shuffled (seeded)."""

    new: SubtractionTask = SubtractionTask()
    """The knowledge fine-tuned in."""
    old: AdditionTask = AdditionTask()
    """The task the model was trained for (its behaviour)."""
    old_share: float = 0.3
    """Fraction of the mixture drawn from :attr:`old`'s training problems, in [0, 1)."""
    seed: int = 0
    """Seed of the draw of old problems and of the shuffle."""

    EVAL_TASKS: ClassVar[tuple[str, ...]] = ("arith_gen", "sub_gen")
    """The names :meth:`eval_records` returns: the behaviour, then the knowledge."""

    def __post_init__(self) -> None:
        if not isinstance(self.old_share, (int, float)) or not 0 <= self.old_share < 1:
            raise ValueError(f"FineTuneTask.old_share must be a number in [0, 1), "
                             f"got {self.old_share!r}")
        if self.num_old > self.old.num_train:
            raise ValueError(f"FineTuneTask: old_share {self.old_share} needs {self.num_old} "
                             f"old training problems; the old task has {self.old.num_train}")

    @property
    def num_old(self) -> int:
        """Old problems in the mixture: ``old_share`` of the whole, rounded."""
        return round(self.new.num_train * self.old_share / (1 - self.old_share))

    def train_records(self) -> list[dict[str, str]]:
        """The mixture's ``{"prompt", "response"}`` records."""
        rng = random.Random(self.seed)
        records = self.new.train_records() + rng.sample(train_records(self.old), self.num_old)
        rng.shuffle(records)
        return records

    def eval_records(self) -> dict[str, list[dict[str, str]]]:
        """``arith_gen`` (the old task's generate records) and ``sub_gen``."""
        return {"arith_gen": generate_records(self.old), **self.new.eval_records()}
