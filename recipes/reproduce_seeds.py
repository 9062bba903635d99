"""Reproduce the seed findings in miniature: a grid of recipe runs, several seeds, one verdict per
claim (protocol and results: docs/reproduction.md).

    nemo run recipes/reproduce_seeds.py                      # quick: every finding, 1 seed, 8 runs
    nemo run recipes/reproduce_seeds.py --factory full       # the protocol: 3 seeds, 2 at a time
    nemo run recipes/reproduce_seeds.py --factory full --dryrun   # one line per run
    nemo run recipes/reproduce_seeds.py report_only=true     # tabulate finished runs only

Every run is ``python recipes/onpolicy_qat.py --factory tiny <cell overrides> optim.steps=N
seed=K output_dir=<output_root>/<finding>/<cell>/seed<K>``, launched as a ``run.Script`` of a
NeMo-Run Experiment on ``run.executor`` (default: this machine), ``parallel`` runs at a time.
Findings on their own task or models (``size_gap``, ``self_distill``, ...) read them from
``<output_root>/assets``, made before the first run (copied from the shipped ones, or trained
there: minutes); on a cluster ``output_root`` must be a path every node sees. Runs
whose ``results.json`` exists are not run again, so an interrupted grid resumes. The first run
is timed alone and the whole grid's time estimated from it; an estimate over the preset's
budget is reported before the rest starts. The findings and their claims are data
(:mod:`nemo_opd.experiments.findings`); the statistics and verdict rules are
:mod:`nemo_opd.experiments.stats`; the table and figure go to
``<output_root>/results.{json,md,png}``.
"""

import logging
import sys
import time
from pathlib import Path
from typing import Any

import nemo_run as run

from nemo_opd.experiments.findings import (
    FINDINGS,
    PRESETS,
    RunSpec,
    check_finding_names,
    plan_runs,
    prepare_assets,
)
from nemo_opd.launch import executors  # noqa: F401  (registers run.executor=local|slurm|docker)
from nemo_opd.launch.recipe import apply_overrides, built_arguments, recipe_main, resolve_preset

RECIPE = Path(__file__).with_name("onpolicy_qat.py")

logger = logging.getLogger("reproduce_seeds")


def _launch(runs: list[RunSpec], executor: run.Executor, entrypoint: str, path: str,
            title: str, parallel: int) -> None:
    """``runs`` as one Experiment. One at a time: NeMo-Run's sequential mode, in plan order
    (which puts every run after the one it starts from). ``parallel`` > 1: run ``i`` depends on
    run ``i - parallel``, so they form ``parallel`` chains (a cluster queues the chains; the
    local executor runs them ``parallel`` at a time, batch after batch), and on the run it
    starts from (``RunSpec.after``) when that one is part of ``runs`` too."""
    with run.Experiment(title, executor=executor) as experiment:
        ids: list[str] = []
        id_of: dict[str, str] = {}
        for i, spec in enumerate(runs):
            job_executor = executor.clone()
            if parallel > 1 and isinstance(job_executor, run.LocalExecutor):
                # runs side by side on one machine: one thread each, not every core each
                job_executor.env_vars.setdefault("OMP_NUM_THREADS", "1")
            dependencies = [ids[i - parallel]] if parallel > 1 and i >= parallel else []
            # NeMo-Run refuses dependencies in sequential mode, where order alone suffices
            if parallel > 1 and spec.after in id_of and id_of[spec.after] not in dependencies:
                dependencies.append(id_of[spec.after])
            ids.append(experiment.add(
                run.Script(path=path, args=list(spec.args), entrypoint=entrypoint),
                executor=job_executor, name=spec.name, dependencies=dependencies or None))
            id_of[spec.output_dir] = ids[-1]
        experiment.run(sequential=parallel == 1)


def reproduce_seeds(
    ctx: run.cli.RunContext,
    preset: str = "quick",
    findings: tuple[str, ...] = tuple(FINDINGS),
    overrides: tuple[str, ...] = (),
    output_root: str = "runs/reproduce",
    report_only: bool = False,
    parallel: int = 1,
) -> None:
    """Run every (finding, cell, seed) of ``preset`` that has no results yet, then judge the
    claims and write ``<output_root>/results.{json,md,png}``.

    Args:
        preset: "quick" (the harness on a subset, 1 seed) or "full" (docs/reproduction.md).
        findings: registered findings to run (nemo_opd.experiments.findings.FINDINGS):
            ``quantization`` (finding 1), ``size_gap`` (finding 2), ``sampled_loss`` and
            ``self_distill`` (finding 3), ``gap`` and ``quantized_distilled`` (finding 4; the
            latter starts from finding 2's on_policy_gkd students, run first if needed).
        overrides: extra recipe overrides for every run (e.g. ``[optim.micro_batch_size=16]``);
            a result made with them is not the protocol's.
        output_root: where runs and the table go (on a cluster: a shared absolute path).
        report_only: skip the runs; tabulate the finished ones.
        parallel: runs at a time (local: processes side by side, one thread each — at most the
            core count; a cluster: independent chains of runs). The ``full`` preset uses 2.
    """
    from nemo_opd.experiments.report import collect, judge, write_reproduction

    settings = PRESETS[preset]
    executor = ctx.executor or run.LocalExecutor()
    local = isinstance(executor, run.LocalExecutor)
    if local:  # local runs start in NeMo-Run's job directory, not here
        output_root = str(Path(output_root).resolve())
    runs = plan_runs(findings, settings, output_root, overrides)
    entrypoint = sys.executable if local else "python"
    path = str(RECIPE) if local else f"recipes/{RECIPE.name}"
    # A run shared by two findings (same directory) runs once.
    unique = [r for i, r in enumerate(runs)
              if r.output_dir not in {q.output_dir for q in runs[:i]}]
    todo = [r for r in unique if not (Path(r.output_dir) / "results.json").is_file()]
    for spec in runs:
        state = "shared" if spec not in unique else "to run" if spec in todo else "done"
        after = f" (after {spec.after})" if spec.after else ""
        print(f"{spec.name} [{state}]{after}: {entrypoint} {path} {' '.join(spec.args)}")
    if ctx.dryrun:
        return
    if todo and not report_only:
        # shipped, or trained here (minutes): `parallel` sets at a time
        for root in prepare_assets(findings, settings, output_root, parallel):
            print(f"assets: {root}")
        started = time.perf_counter()
        _launch(todo[:1], executor, entrypoint, path, "reproduce_seeds_probe", 1)
        per_run = time.perf_counter() - started
        estimate = per_run * len(todo) / min(parallel, len(todo)) / 60
        print(f"first run: {per_run:.0f} s; the grid ({len(todo)} runs, {parallel} at a time) "
              f"needs ~{estimate:.0f} min (budget of '{preset}': {settings.budget_minutes:g} "
              "min; an upper bound where later runs reuse the teacher / PTQ evaluations the "
              "first one made, a lower one where runs side by side slow each other)")
        if estimate > settings.budget_minutes:
            print(f"WARNING: the grid does not fit the '{preset}' budget: ~{estimate:.0f} min > "
                  f"{settings.budget_minutes:g} min; lower the steps uniformly (and say so in "
                  "docs/reproduction.md) or run fewer findings")
        if todo[1:]:
            _launch(todo[1:], executor, entrypoint, path, "reproduce_seeds", parallel)
    scores, missing = collect(runs)
    if missing:
        print(f"{len(missing)} run(s) have no results yet: {', '.join(missing[:5])}"
              f"{' ...' if len(missing) > 5 else ''}")
    report = judge(scores)
    extra = f", overrides {' '.join(overrides)}" if overrides else ""
    steps = ", ".join(f"{name} {FINDINGS[name].steps[preset]}" for name in findings)
    header = (f"# Seed reproduction, preset '{preset}' ({len(settings.seeds)} seed(s); steps "
              f"per run: {steps}{extra})")
    paths = write_reproduction(report, output_root, header=header,
                               title=f"seed reproduction ({preset})")
    print(paths[1].read_text())
    print("results: " + ", ".join(map(str, paths)))


PARALLEL = {"quick": 1, "full": 2}
"""Runs at a time per preset: ``full`` runs two side by side (the 2-core CPU of
docs/reproduction.md's budget)."""


def _factory(preset: str) -> Any:
    def factory() -> run.Partial:
        return run.Partial(reproduce_seeds, preset=preset, parallel=PARALLEL[preset])

    factory.__name__ = factory.__qualname__ = preset
    factory.__doc__ = f"The '{preset}' preset of docs/reproduction.md."
    return run.cli.factory(factory, target=reproduce_seeds)


FACTORIES = {name: _factory(name) for name in PRESETS}


def _load_recipe() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("onpolicy_qat", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(kwargs: dict[str, Any], executor: run.Executor | None) -> None:
    """Before any run: a known preset and findings, and every run's arguments valid for the
    recipe (override keys and values, ranks vs layout)."""
    if kwargs["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {kwargs['preset']!r}; presets: {', '.join(PRESETS)}")
    parallel = kwargs.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an int >= 1, got {parallel!r}")
    check_finding_names(kwargs["findings"])
    recipe = _load_recipe()
    for spec in plan_runs(kwargs["findings"], PRESETS[kwargs["preset"]], kwargs["output_root"],
                          kwargs["overrides"]):
        task = resolve_preset(recipe.onpolicy_qat, "tiny", recipe.tiny)
        apply_overrides(task, list(spec.args[2:]))
        recipe.check(built_arguments(task), executor)


if __name__ == "__main__":
    recipe_main(reproduce_seeds, default_preset=FACTORIES["quick"], check=check,
                entrypoint_type="experiment")
