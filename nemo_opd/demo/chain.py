"""A task where a student's own mistakes compound: sums written out step by step with running
totals (``docs/reproduction.md``, finding 2).

A problem is ``terms`` numbers of ``digits`` digits, zero-padded: ``"12+07+30+05+44="``. Its
solution adds them one at a time, each step ``"<total so far>+<next number>=<new total>"`` with
totals zero-padded to the width of the largest possible sum, steps separated by one space and
the whole solution after one space::

    "12+07+30+05+44=" -> " 012+07=019 019+30=049 049+05=054 054+44=098"

Every step reads the total the previous step wrote, so one wrong digit early makes every later
total wrong: greedy exact match of the whole solution is the score. Fixed widths give every
prompt and every solution the same token count (one token per digit, as in
:mod:`nemo_opd.demo.task`), so the demo's teacher trainer and its fixed-width batches apply
unchanged. With the defaults a prompt is 15 tokens and a solution 44 (plus EOS).

The problems are split once, by a seeded generator, into disjoint train and eval sets. Files:

* train: ``{"prompt": "12+07+30+05+44=", "response": " 012+07=019 ..."}``;
* generate eval ``chain_gen``: ``{"question": prompt, "answer": solution}`` (no leading space),
  greedy generation, exact match with surrounding whitespace ignored.
"""

from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

from nemo_opd.demo.task import check_split

__all__ = ["ChainSumTask"]


@dataclasses.dataclass(frozen=True)
class ChainSumTask:
    """Sums of ``terms`` ``digits``-digit numbers with running totals, and their split."""

    terms: int = 5
    """Numbers per problem (``terms - 1`` written steps)."""
    digits: int = 2
    """Digits per number."""
    num_train: int = 20000
    """Distinct training problems."""
    num_eval: int = 500
    """Distinct held-out problems, disjoint from the training problems."""
    seed: int = 0
    """Seed of the split."""

    EVAL_TASKS: ClassVar[tuple[str, ...]] = ("chain_gen",)
    """The names :meth:`eval_records` returns."""

    def __post_init__(self) -> None:
        for name, low, high in (("terms", 2, 9), ("digits", 1, 4)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"ChainSumTask.{name} must be an int in [{low}, {high}], "
                                 f"got {value!r}")
        check_split(self, 10 ** (self.terms * self.digits))

    @property
    def total_width(self) -> int:
        """Digits of a running total: those of the largest possible sum."""
        return len(str(self.terms * (10 ** self.digits - 1)))

    def problems(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """``(train, eval)``: disjoint lists of distinct problems, the same for the same task
        (drawn as distinct indices by ``random.Random(seed)``; the first ``num_eval`` are the
        eval set)."""
        base = 10 ** self.digits
        indices = random.Random(self.seed).sample(range(base ** self.terms),
                                                  self.num_eval + self.num_train)
        problems = [tuple(i // base ** k % base for k in range(self.terms)) for i in indices]
        return problems[self.num_eval:], problems[:self.num_eval]

    def prompt(self, numbers: tuple[int, ...]) -> str:
        """``"12+07+30+05+44="``."""
        return "+".join(f"{n:0{self.digits}d}" for n in numbers) + "="

    def solution(self, numbers: tuple[int, ...]) -> str:
        """The worked solution, steps separated by single spaces (no leading space)."""
        steps, total = [], numbers[0]
        for n in numbers[1:]:
            steps.append(f"{total:0{self.total_width}d}+{n:0{self.digits}d}="
                         f"{total + n:0{self.total_width}d}")
            total += n
        return " ".join(steps)

    def train_records(self) -> list[dict[str, str]]:
        """``{"prompt", "response"}`` for every training problem (response = space + solution)."""
        train, _ = self.problems()
        return [{"prompt": self.prompt(p), "response": " " + self.solution(p)} for p in train]

    def eval_records(self) -> dict[str, list[dict[str, str]]]:
        """Eval task name → records: ``chain_gen`` (``{"question", "answer"}``)."""
        _, held_out = self.problems()
        return {"chain_gen": [{"question": self.prompt(p), "answer": self.solution(p)}
                              for p in held_out]}
