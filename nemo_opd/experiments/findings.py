"""The seed findings as data: the runs each one needs and the claims judged on them.

A :class:`Finding` names its configurations (:class:`Cell`: recipe overrides of
``recipes/onpolicy_qat.py``) and its :class:`Claim` s, each judged by one rule of
:mod:`nemo_opd.experiments.stats` on the cells' per-seed scores. A :class:`Preset` says how many
seeds and steps a run gets and which cells it runs (``quick`` checks the harness on a subset with
one seed; ``full`` is the protocol of ``docs/reproduction.md``). :func:`plan_runs` turns findings
and a preset into the list of runs, each the recipe command a user could type.

Registered so far: finding 1 (``quantization``, seeds 000–002). Findings 2–4 need tasks and
models that are not built yet (``docs/reproduction.md``).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Sequence

__all__ = ["Cell", "Claim", "FINDINGS", "Finding", "PRESETS", "Preset", "RunSpec",
           "check_finding_names", "plan_runs"]

METRICS = ("score", "gap_recovered")
RULES = ("difference", "at_least", "at_most")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of a finding."""

    name: str
    """Directory-safe name, unique in its finding."""
    label: str
    """How tables and plots name it."""
    overrides: tuple[str, ...]
    """``recipes/onpolicy_qat.py`` overrides (on top of the preset's steps and seed)."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of a finding and the rule that judges it (module docstring of ``stats``)."""

    key: str
    """Short id ("1b ...") used in tables."""
    text: str
    rule: str
    """One of :data:`RULES`."""
    a: str
    """The cell judged (for ``difference``: the minuend, ``a − b``)."""
    b: str = ""
    """``difference`` only: the subtrahend cell."""
    direction: str = "none"
    """``difference`` only: "greater", "less" or "none"."""
    level: float = 0.0
    """``at_least`` / ``at_most`` only."""
    metric: str = "score"
    """One of :data:`METRICS`."""

    def __post_init__(self) -> None:
        if self.rule not in RULES or self.metric not in METRICS:
            raise ValueError(f"Claim {self.key}: rule must be one of {RULES} and metric one of "
                             f"{METRICS}, got {self.rule!r}, {self.metric!r}")
        if (self.rule == "difference") != bool(self.b):
            raise ValueError(f"Claim {self.key}: a 'difference' claim compares two cells (a and "
                             "b); the level rules judge one")

    @property
    def cells(self) -> tuple[str, ...]:
        return (self.a, self.b) if self.b else (self.a,)


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    seeds: str
    """Which seed documents it comes from ("000–002")."""
    summary: str
    cells: tuple[Cell, ...]
    claims: tuple[Claim, ...]
    quick_cells: tuple[str, ...]
    """The cells the ``quick`` preset runs."""

    def __post_init__(self) -> None:
        names = [c.name for c in self.cells]
        if len(set(names)) != len(names):
            raise ValueError(f"finding {self.name}: cell names repeat")
        unknown = {n for claim in self.claims for n in claim.cells} | set(self.quick_cells)
        if unknown - set(names):
            raise ValueError(f"finding {self.name}: claims or quick_cells name unknown cells "
                             f"{sorted(unknown - set(names))}")

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Seeds, steps and cells of one reproduction preset."""

    name: str
    seeds: tuple[int, ...]
    steps: int
    quick: bool
    """Run each finding's ``quick_cells`` only."""
    budget_minutes: float
    """The whole grid must fit (``docs/reproduction.md``)."""


PRESETS = {
    "quick": Preset("quick", seeds=(0,), steps=10, quick=True, budget_minutes=10),
    "full": Preset("full", seeds=(0, 1, 2), steps=40, quick=False, budget_minutes=60),
}

MARGIN = 0.02
"""The size of an accuracy difference that counts (``docs/reproduction.md``, common rules)."""


def _quantization() -> Finding:
    formats, lmbdas, betas = ("int4", "mxfp4"), (0.0, 0.5, 1.0), (0.0, 1.0)
    cells = tuple(
        Cell(name=f"{fmt}_lambda{lmbda:g}_beta{beta:g}",
             label=f"{fmt.upper()} λ={lmbda:g} β={beta:g}",
             overrides=(f"quant.format={fmt}", f"distill.lmbda={lmbda!r}",
                        f"distill.beta={beta!r}", "export.enabled=false"))
        for fmt, lmbda, beta in itertools.product(formats, lmbdas, betas))

    def name(fmt: str, lmbda: float, beta: float) -> str:
        return f"{fmt}_lambda{lmbda:g}_beta{beta:g}"

    claims = [Claim(f"1a {name('int4', lmbda, beta)}",
                    "distillation recovers at least half of the INT4 PTQ gap", "at_least",
                    name("int4", lmbda, beta), level=0.5, metric="gap_recovered")
              for lmbda, beta in itertools.product(lmbdas, betas)]
    claims += [Claim(f"1b {fmt} β={beta:g}", "λ=1 and λ=0 end within noise", "difference",
                     name(fmt, 1.0, beta), name(fmt, 0.0, beta), direction="none")
               for fmt, beta in itertools.product(formats, betas)]
    claims += [Claim(f"1c {fmt} λ=0", "off-policy: forward KL (β=0) beats reverse KL (β=1)",
                     "difference", name(fmt, 0.0, 0.0), name(fmt, 0.0, 1.0), direction="greater")
               for fmt in formats]
    claims += [Claim(f"1c {fmt} λ=1", "on-policy: reverse KL (β=1) beats forward KL (β=0)",
                     "difference", name(fmt, 1.0, 1.0), name(fmt, 1.0, 0.0), direction="greater")
               for fmt in formats]
    return Finding(
        name="quantization", seeds="000–002",
        summary="INT4 / MXFP4 students of the demo teacher (4-bit-sensitive weights), "
                "λ ∈ {0, 0.5, 1} × β ∈ {0, 1}",
        cells=cells, claims=tuple(claims),
        quick_cells=(name("int4", 0.0, 1.0), name("int4", 1.0, 1.0)))


FINDINGS = {f.name: f for f in (_quantization(),)}
"""Registered findings by name."""


def check_finding_names(names: Sequence[str]) -> list[str]:
    """``names`` as a list, or ``ValueError`` naming the unknown ones (with close matches)."""
    names = list(names)
    if not names:
        raise ValueError(f"no finding given; registered: {', '.join(FINDINGS)}")
    for name in names:
        if name not in FINDINGS:
            close = difflib.get_close_matches(name, FINDINGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown finding {name!r}{hint}; registered: "
                             f"{', '.join(FINDINGS)} (findings 2-4 of docs/reproduction.md are "
                             "not built yet)")
    if len(set(names)) != len(names):
        raise ValueError(f"findings repeat: {names}")
    return names


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    finding: str
    cell: str
    seed: int
    args: tuple[str, ...]
    """``recipes/onpolicy_qat.py`` arguments."""
    output_dir: str

    @property
    def name(self) -> str:
        return f"{self.finding}-{self.cell}-seed{self.seed}"


def plan_runs(names: Sequence[str], preset: Preset, output_root: str,
              extra_overrides: Sequence[str] = ()) -> list[RunSpec]:
    """Every (finding, cell, seed) run of ``preset``, in that order; outputs under
    ``<output_root>/<finding>/<cell>/seed<k>``."""
    runs = []
    for name in check_finding_names(names):
        finding = FINDINGS[name]
        cells = ([finding.cell(c) for c in finding.quick_cells] if preset.quick
                 else list(finding.cells))
        for cell, seed in itertools.product(cells, preset.seeds):
            out = f"{output_root}/{name}/{cell.name}/seed{seed}"
            args = ("--factory", "tiny", *cell.overrides, f"optim.steps={preset.steps}",
                    f"seed={seed}", f"output_dir={out}", *extra_overrides)
            runs.append(RunSpec(name, cell.name, seed, args, out))
    return runs
