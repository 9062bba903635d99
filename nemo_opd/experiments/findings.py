"""The seed findings as data: the runs each one needs and the claims judged on them.

A :class:`Finding` names its configurations (:class:`Cell`: recipe overrides of
``recipes/onpolicy_qat.py``) and its :class:`Claim` s, each judged by one rule of
:mod:`nemo_opd.experiments.stats` on the cells' per-seed scores. A :class:`Preset` says how many
seeds and steps a run gets and which cells it runs (``quick`` checks the harness on a subset with
one seed; ``full`` is the protocol of ``docs/reproduction.md``). :func:`plan_runs` turns findings
and a preset into the list of runs, each the recipe command a user could type.

Registered so far: finding 1 (``quantization``, seeds 000–002) on the demo's own assets, and
finding 2 (``size_gap``, seed 004) on the chain-sum task's teacher and weak student
(:mod:`nemo_opd.demo.chain`; shipped, or trained on first use by :func:`prepare_assets`),
finding 3's loss and temperature cells (``sampled_loss``, seed 003) and its self-distillation
after fine-tuning (``self_distill``, seed 003 §4, on the demo teacher fine-tuned on subtraction,
:mod:`nemo_opd.demo.finetune`), finding 4's gap sweep (``gap``: three student sizes, on- vs
off-policy) and its quantized case (``quantized_distilled``: INT4 students of finding 2's
on-policy-distilled models, whose runs export them for it) (``docs/reproduction.md``).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Cell", "Claim", "FINDINGS", "Finding", "PRESETS", "Preset", "RunSpec",
           "asset_root", "check_finding_names", "metric_label", "metric_name", "plan_runs",
           "prepare_assets"]

METRICS = ("score", "gap_recovered", "gain", "relative", "seconds_per_step", "start", "teacher")
"""Per-run values: the trained student's ``score``; ``gap_recovered`` = (score − start) /
(teacher − start); ``gain`` = score − start; ``relative`` = score / start, where start is the
untrained (PTQ, or for ``quant.format=none`` the initial) student's score; ``seconds_per_step``
the median training step's wall time (``metrics.jsonl``); ``start`` and ``teacher`` the two
baselines' scores (the figure's reference lines). Each is of the eval tasks' average; a metric
``<metric>@<task>`` (e.g. ``gain@sub_gen``) is the same of one eval task."""
METRIC_LABELS = {"score": "score", "gap_recovered": "PTQ gap recovered",
                 "gain": "gain over start", "relative": "score / start",
                 "seconds_per_step": "s / step (median)", "start": "start",
                 "teacher": "teacher"}
RULES = ("difference", "change", "at_least", "at_most")

ASSETS = ("chain", "chain_2x256", "chain_4x256", "finetuned")
"""Asset sets a cell can name: :class:`~nemo_opd.demo.chain.ChainSumTask` with finding 2's
teacher and a student of ``nemo_opd.demo.teacher.CHAIN_STUDENTS`` (``chain``: the shipped weak
2 × 128 one; the others are trained on first use, minutes); ``finetuned``: the demo teacher and
its fine-tuned copy ``nemo_opd.demo.teacher.FINETUNED_DEMO`` (trained on first use, ~2 min)."""


def metric_name(metric: str) -> tuple[str, str]:
    """``(base metric, eval task)`` of ``"gain@sub_gen"`` (task "" = the average); ``ValueError``
    unless the base is one of :data:`METRICS`."""
    base, _, task = metric.partition("@")
    if base not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: one of {METRICS}, optionally @<eval task>")
    return base, task


def metric_label(metric: str) -> str:
    base, task = metric_name(metric)
    return f"{METRIC_LABELS[base]} ({task})" if task else METRIC_LABELS[base]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of a finding."""

    name: str
    """Directory-safe name, unique in its finding."""
    label: str
    """How tables and plots name it."""
    overrides: tuple[str, ...]
    """``recipes/onpolicy_qat.py`` overrides (on top of the preset's steps and seed); ``{assets}``
    stands for the directory of :attr:`assets`, ``{half}`` for half the run's steps."""
    assets: str = ""
    """"" = the recipe's built-in demo; else a key of :data:`ASSETS`."""
    after: str = ""
    """``"<finding>/<cell>"``: this cell starts from that cell's run of the same seed (its
    exported student, ``{after}/export``), so that run goes first; "" = none."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of a finding and the rule that judges it (module docstring of ``stats``)."""

    key: str
    """Short id ("1b ...") used in tables."""
    text: str
    rule: str
    """One of :data:`RULES`: ``difference`` of two cells' means (Welch), ``change`` of one
    cell's metric from 0 (its own interval; for ``gain``), each judged by
    ``stats.judge_difference``; ``at_least`` / ``at_most`` a level."""
    a: str
    """The cell judged (for ``difference``: the minuend, ``a − b``)."""
    b: str = ""
    """``difference`` only: the subtrahend cell."""
    direction: str = "none"
    """``difference`` and ``change`` only: "greater", "less" or "none"."""
    level: float = 0.0
    """``at_least`` / ``at_most`` only."""
    metric: str = "score"
    """One of :data:`METRICS`, optionally ``@<eval task>``."""

    def __post_init__(self) -> None:
        metric_name(self.metric)
        if self.rule not in RULES:
            raise ValueError(f"Claim {self.key}: rule must be one of {RULES}, "
                             f"got {self.rule!r}")
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
    steps: dict[str, int]
    """Optimizer steps per run, by preset name."""
    columns: tuple[str, ...] = ("score", "gap_recovered")
    """The metrics its table shows (:data:`METRICS`, optionally ``@<eval task>``); its figure
    plots the first."""

    def __post_init__(self) -> None:
        for metric in self.columns:
            metric_name(metric)
        names = [c.name for c in self.cells]
        if len(set(names)) != len(names):
            raise ValueError(f"finding {self.name}: cell names repeat")
        if {c.assets for c in self.cells} - {"", *ASSETS}:
            raise ValueError(f"finding {self.name}: cells name unknown asset sets; known: "
                             f"{', '.join(ASSETS)}")
        for cell in self.cells:
            if cell.after and cell.after.count("/") != 1:
                raise ValueError(f"finding {self.name}: cell {cell.name}'s after must be "
                                 f"'<finding>/<cell>', got {cell.after!r}")
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
    quick: bool
    """Run each finding's ``quick_cells`` only."""
    budget_minutes: float
    """The whole grid must fit (``docs/reproduction.md``)."""


PRESETS = {
    "quick": Preset("quick", seeds=(0,), quick=True, budget_minutes=10),
    "full": Preset("full", seeds=(0, 1, 2), quick=False, budget_minutes=60),
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
        quick_cells=(name("int4", 0.0, 1.0), name("int4", 1.0, 1.0)),
        steps={"quick": 10, "full": 40})


_CHAIN_RUN = (
    "model.student={assets}/student", "model.teacher={assets}/teacher",
    "model.tokenizer={assets}/teacher", "data.train_files=[{assets}/train.jsonl]",
    "evaluation.local_tasks=[chain_gen={assets}/chain_gen.jsonl]", "evaluation.max_gen_toks=44",
    # 15 prompt tokens, 44 solution tokens + EOS; a full-precision student, nothing to export.
    "data.max_prompt_length=16", "data.max_response_length=48", "sampling.max_new_tokens=48",
    "quant.format=none", "quant.calibration_batches=0", "export.enabled=false",
    "optim.lr=0.0005", "optim.warmup_steps=3")
"""Finding 2's runs: the chain-sum teacher and weak student (``{assets}``), reverse KL (β = 1)
at temperature 1 as the recipe's tiny preset, lr 5e-4 (a quarter of the student's own
pre-training peak)."""

_OFF_POLICY = {
    # name: (label, strategy overrides); "{half}" is half the run's steps (seed 004 switched
    # and decayed at step 50 of 100).
    "offpolicy_kd": ("off-policy KD (λ=0)", ("distill.lmbda=0.0",)),
    "hybrid": ("hybrid", ("distill.strategy.name=hybrid", "distill.strategy.switch_step={half}")),
    "mixture": ("mixture", ("distill.strategy.name=mixture",)),
    "reverse_curriculum": ("reverse_curriculum", ("distill.strategy.name=reverse_curriculum",
                                                  "distill.strategy.switch_step={half}")),
}
_EXPORTED = ("export.enabled=true", "export.evaluate=false", "export.dtype=float32")
"""A run whose student a later run starts from (finding 4b): its full-precision export."""

_ON_POLICY = {
    "on_policy_gkd": ("on_policy_gkd", ("distill.strategy.name=on_policy_gkd", *_EXPORTED)),
    "extended_on_policy": ("extended_on_policy (2×)", (
        "distill.strategy.name=extended_on_policy",)),
    "teacher_seeded": ("teacher_seeded", ("distill.strategy.name=teacher_seeded",
                                          "distill.strategy.seed_tokens=20",
                                          "distill.strategy.seed_decay_steps={half}")),
    "kl_anchored": ("kl_anchored", ("distill.strategy.name=kl_anchored",)),
    "replay_buffer": ("replay_buffer", ("distill.strategy.name=replay_buffer",)),
}


def _size_gap() -> Finding:
    cells = tuple(Cell(name=name, label=label, overrides=(*_CHAIN_RUN, *strategy),
                       assets="chain")
                  for name, (label, strategy) in {**_OFF_POLICY, **_ON_POLICY}.items())
    claims = [Claim("2a", "pure on-policy distillation improves the weak student", "change",
                    "on_policy_gkd", direction="greater", metric="gain")]
    claims += [Claim(f"2b {name}", "a strategy with an off-policy part collapses (score at most "
                     "half the start)", "at_most", name, level=0.5, metric="relative")
               for name in _OFF_POLICY]
    claims += [Claim("2c", "teacher_seeded beats on_policy_gkd", "difference", "teacher_seeded",
                     "on_policy_gkd", direction="greater")]
    return Finding(
        name="size_gap", seeds="004",
        summary="a 2-layer hidden-128 student trained briefly (weak) distilled from a 4-layer "
                "hidden-256 teacher on step-by-step sums (44 generated tokens), by strategy",
        cells=cells, claims=tuple(claims), quick_cells=("on_policy_gkd", "hybrid"),
        steps={"quick": 8, "full": 60}, columns=("score", "gain", "relative"))


def _sampled_loss() -> Finding:
    gkd = (*_CHAIN_RUN, *_ON_POLICY["on_policy_gkd"][1])  # finding 2's on_policy_gkd runs
    variants = {"full_t1": ("full-vocabulary reverse KL, T=1", ()),
                "sampled_t1": ("sampled-token reverse KL, T=1", ("distill.loss=sampled",)),
                "sampled_t0.3": ("sampled-token reverse KL, T=0.3", (
                    "distill.loss=sampled", "sampling.temperature=0.3")),
                "sampled_t0": ("sampled-token reverse KL, T=0 (greedy)", (
                    "distill.loss=sampled", "sampling.temperature=0.0"))}
    cells = tuple(Cell(name=name, label=label, overrides=(*gkd, *extra), assets="chain")
                  for name, (label, extra) in variants.items())
    claims = (Claim("3a", "at equal steps the sampled-token loss trains as well as the full one",
                    "difference", "sampled_t1", "full_t1", direction="none"),
              Claim("3b", "sampling at T=0.3 beats greedy rollouts (T=0)", "difference",
                    "sampled_t0.3", "sampled_t0", direction="greater"))
    return Finding(
        name="sampled_loss", seeds="003",
        summary="on_policy_gkd on finding 2's task and weak student: the sampled-token reverse "
                "KL (k = 1, importance-sampled) against the full-vocabulary one, and the "
                "rollout temperature",
        cells=cells, claims=claims, quick_cells=("sampled_t0.3",),
        steps={"quick": 8, "full": 60}, columns=("score", "gain", "seconds_per_step"))


def _gap() -> Finding:
    sizes = ("2x128", "2x256", "4x256")
    modes = {"off": _OFF_POLICY["offpolicy_kd"], "on": _ON_POLICY["on_policy_gkd"]}
    cells = tuple(Cell(name=f"{size}_{mode}", label=f"{size} {label}",
                       overrides=(*_CHAIN_RUN, *strategy),
                       assets="chain" if size == "2x128" else f"chain_{size}")
                  for size in sizes for mode, (label, strategy) in modes.items())
    claims = tuple(Claim(f"4 {size}", "on-policy minus off-policy (reported against 'none')",
                         "difference", f"{size}_on", f"{size}_off", direction="none")
                   for size in sizes)
    return Finding(
        name="gap", seeds="beyond 000–004",
        summary="on_policy_gkd vs off-policy KD as the capability gap shrinks: students of "
                "2 layers × hidden 128, 2 × 256 and 4 × 256 (the teacher's shape), each "
                "pre-trained the same 600 steps, distilled from finding 2's teacher",
        cells=cells, claims=claims, quick_cells=("2x128_off", "2x128_on"),
        steps={"quick": 8, "full": 60}, columns=("score", "gain"))


def _self_distill() -> Finding:
    run = ("model.student={assets}/student", "model.teacher={assets}/teacher",
           "model.tokenizer={assets}/teacher", "data.train_files=[{assets}/train.jsonl]",
           "evaluation.local_tasks=[arith_gen={assets}/arith_gen.jsonl,"
           "sub_gen={assets}/sub_gen.jsonl]",
           # the tiny preset's schedule (as finding 1 on the same model): λ=1, β=1, lr 1e-4
           "quant.format=none", "quant.calibration_batches=0", "export.enabled=false")
    cells = (Cell("self_distill", "on-policy self-distillation (λ=1)",
                  (*run, "distill.lmbda=1.0"), assets="finetuned"),
             Cell("offpolicy_kd", "off-policy KD on the teacher's answers (λ=0)",
                  (*run, "distill.lmbda=0.0"), assets="finetuned"))
    claims = (Claim("3c behaviour", "self-distillation from the original weights restores the "
                    "behaviour fine-tuning damaged (addition)", "change", "self_distill",
                    direction="greater", metric="gain@arith_gen"),
              Claim("3c knowledge", "... while keeping the new knowledge (subtraction "
                    "unchanged)", "change", "self_distill", direction="none",
                    metric="gain@sub_gen"))
    return Finding(
        name="self_distill", seeds="003 §4",
        summary="the demo teacher fine-tuned on subtraction (10 % addition mixed in: addition "
                "damaged), distilled on addition prompts from its own original weights",
        cells=cells, claims=claims, quick_cells=("self_distill",),
        steps={"quick": 8, "full": 40},
        columns=("score@arith_gen", "gain@arith_gen", "score@sub_gen", "gain@sub_gen"))


def _quantized_distilled() -> Finding:
    source = "size_gap/on_policy_gkd"
    run = (*_CHAIN_RUN, "model.student={after}/export", "quant.format=int4")
    teachers = {"own": ("its own full-precision weights", "model.teacher={after}/export"),
                "teacher": ("finding 2's teacher", "model.teacher={assets}/teacher")}
    modes = {"off": ("off-policy KD (λ=0)", _OFF_POLICY["offpolicy_kd"][1]),
             "on": ("on_policy_gkd", ("distill.strategy.name=on_policy_gkd",))}
    cells = tuple(Cell(name=f"{teacher}_{mode}", label=f"teacher: {t_label}, {m_label}",
                       overrides=(*run, t_override, *m_overrides), assets="chain", after=source)
                  for teacher, (t_label, t_override) in teachers.items()
                  for mode, (m_label, m_overrides) in modes.items())
    claims = (Claim("4b own", "like case 1: λ=1 and λ=0 end within noise (teacher: the "
                    "student's own full-precision weights)", "difference", "own_on", "own_off",
                    direction="none"),
              Claim("4b teacher", "like case 2: on-policy beats off-policy (teacher: the larger "
                    "model the student was distilled from)", "difference", "teacher_on",
                    "teacher_off", direction="greater"))
    return Finding(
        name="quantized_distilled", seeds="beyond 000–004",
        summary="INT4 students of finding 2's on_policy_gkd-distilled model (each seed's own), "
                "distilled off- and on-policy from that model's full-precision weights or from "
                "finding 2's teacher",
        cells=cells, claims=claims, quick_cells=("own_on",),
        steps={"quick": 8, "full": 40}, columns=("score", "gap_recovered", "gain"))


FINDINGS = {f.name: f for f in (_quantization(), _size_gap(), _sampled_loss(), _self_distill(),
                                _gap(), _quantized_distilled())}
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
                             f"{', '.join(FINDINGS)}")
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
    after: str = ""
    """The output directory of the run this one starts from (:attr:`Cell.after`), or ""."""

    @property
    def name(self) -> str:
        return f"{self.finding}-{self.cell}-seed{self.seed}"


def _asset_configs(name: str):
    from nemo_opd.demo.chain import ChainSumTask
    from nemo_opd.demo.task import AdditionTask
    from nemo_opd.demo.teacher import CHAIN_STUDENTS, CHAIN_TEACHER, FINETUNED_DEMO, TeacherConfig

    if name == "finetuned":
        return AdditionTask(), TeacherConfig(), FINETUNED_DEMO
    size = name.removeprefix("chain").lstrip("_") or "2x128"
    return ChainSumTask(), CHAIN_TEACHER, CHAIN_STUDENTS[size]


def asset_root(name: str, output_root: str) -> Path:
    """Where :func:`prepare_assets` puts asset set ``name`` for a grid in ``output_root``
    (known without building it)."""
    from nemo_opd.demo.assets import demo_root

    return demo_root(Path(output_root) / "assets", *_asset_configs(name))


def _cells(finding: Finding, preset: Preset) -> list[Cell]:
    return ([finding.cell(c) for c in finding.quick_cells] if preset.quick
            else list(finding.cells))


def _prepare_set(name: str, output_root: str) -> Path:
    from nemo_opd.demo.assets import prepare_demo

    return prepare_demo(Path(output_root) / "assets", *_asset_configs(name)).root


def _worker_setup() -> None:
    import logging

    import torch

    torch.set_num_threads(1)  # sets are built side by side: one core each
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")


def prepare_assets(names: Sequence[str], preset: Preset, output_root: str,
                   parallel: int = 1) -> list[Path]:
    """Build (or find cached) the asset sets the cells of ``preset`` use; returns their roots.
    ``parallel`` > 1 builds up to that many sets at a time, each in a worker process of one
    thread (a set whose student is trained here takes minutes)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sets = sorted({c.assets for n in check_finding_names(names)
                   for c in _cells(FINDINGS[n], preset)} - {""})
    if parallel == 1 or len(sets) < 2:
        return [_prepare_set(s, output_root) for s in sets]
    with ProcessPoolExecutor(max_workers=min(parallel, len(sets)), initializer=_worker_setup,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_prepare_set, sets, [output_root] * len(sets)))


def _source(cell: Cell, seed: int) -> tuple[str, str, int]:
    """``(finding, cell, seed)`` of the run ``cell``'s run of ``seed`` starts from."""
    finding, source_cell = cell.after.split("/")
    return finding, source_cell, seed


def _settings(finding: Finding, preset: Preset, output_root: str,
              registered: dict[tuple[str, str, int], RunSpec]
              ) -> list[tuple[Cell, int, tuple[str, ...]]]:
    """``(cell, seed, recipe arguments without output and baseline dirs)`` of each run;
    ``registered`` holds the runs planned so far (``{after}`` is a directory of one of them)."""
    steps = finding.steps[preset.name]
    out = []
    for cell, seed in itertools.product(_cells(finding, preset), preset.seeds):
        fill = {"half": steps // 2,
                "assets": asset_root(cell.assets, output_root) if cell.assets else "",
                "after": registered[_source(cell, seed)].output_dir if cell.after else ""}
        out.append((cell, seed, ("--factory", "tiny", *(o.format(**fill) for o in cell.overrides),
                                 f"optim.steps={steps}", f"seed={seed}")))
    return out


def _registered_runs(preset: Preset, output_root: str, extra_overrides: Sequence[str]
                     ) -> dict[tuple[str, str, int], RunSpec]:
    """The run of every registered cell (quick or not: a quick cell may start from any cell)
    with ``preset``'s steps and seeds, by ``(finding, cell, seed)``. A run identical to one of a
    finding registered earlier (finding 4's smallest student is finding 2's) has that finding's
    directory."""
    home_of: dict[tuple[str, ...], str] = {}
    registered: dict[tuple[str, str, int], RunSpec] = {}
    every_cell = dataclasses.replace(preset, quick=False)
    for name, finding in FINDINGS.items():
        for cell, seed, setting in _settings(finding, every_cell, output_root, registered):
            home = home_of.setdefault(setting, f"{output_root}/{name}/{cell.name}/seed{seed}")
            args = (*setting, f"output_dir={home}", f"baseline_dir={output_root}/baselines",
                    *extra_overrides)
            after = registered[_source(cell, seed)].output_dir if cell.after else ""
            registered[name, cell.name, seed] = RunSpec(name, cell.name, seed, args, home, after)
    return registered


def plan_runs(names: Sequence[str], preset: Preset, output_root: str,
              extra_overrides: Sequence[str] = ()) -> list[RunSpec]:
    """Every (finding, cell, seed) run of ``preset``, in that order, each after the runs it
    starts from (:attr:`Cell.after`, added when their finding is not asked for); outputs under
    ``<output_root>/<finding>/<cell>/seed<k>``, asset sets under ``<output_root>/assets``, the
    teacher / PTQ evaluations the runs share under ``<output_root>/baselines`` (records keyed by
    what they depend on: a teacher is evaluated once). A run identical to one of a finding
    registered earlier has that finding's directory, whichever findings are asked for: it runs
    once and both read it."""
    registered = _registered_runs(preset, output_root, extra_overrides)
    runs: list[RunSpec] = []
    for name in check_finding_names(names):
        for cell, seed in itertools.product(_cells(FINDINGS[name], preset), preset.seeds):
            spec = registered[name, cell.name, seed]
            if spec.after and spec.after not in {r.output_dir for r in runs}:
                runs.append(registered[_source(cell, seed)])
            runs.append(spec)
    return runs
