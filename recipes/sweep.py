"""λ × β (× lr) sweeps of recipes/onpolicy_qat.py as one NeMo-Run Experiment, then one table.

    nemo run recipes/sweep.py lmbdas=[0,1] betas=[0,0.5,1] overrides=[optim.steps=20]
    nemo run recipes/sweep.py --factory qwen3_4b_int4 lrs=[5e-6,1e-5] run.executor=slurm ...
    nemo run recipes/sweep.py ... --dryrun          # one line per run, launch nothing
    nemo run recipes/sweep.py ... compare_only=true  # only rebuild the table from finished runs

``--factory P`` (default ``tiny``) names the recipe's preset every run starts from: each preset
of recipes/onpolicy_qat.py is registered as a sweep factory of the same name.

Every grid point is the command a user would type, ``python recipes/onpolicy_qat.py --factory P
distill.lmbda=L distill.beta=B [optim.lr=R] output_dir=<output_root>/<point> [overrides]``,
run as a ``run.Script`` on the chosen executor (one after the other). Each run writes its
``results.json``; the sweep then tabulates the teacher and PTQ rows of the first run and the
student row of every run with :mod:`nemo_opd.eval.report` (``<output_root>/compare.{md,json,png}``,
the same table as ``nemo_opd eval compare``).
"""

import dataclasses
import functools
import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any

import nemo_run as run

from nemo_opd.launch import executors  # noqa: F401  (registers run.executor=local|slurm|docker)
from nemo_opd.launch.recipe import (
    apply_overrides,
    built_arguments,
    presets,
    recipe_main,
    resolve_preset,
)

RECIPE = Path(__file__).with_name("onpolicy_qat.py")


@functools.cache
def _load_recipe() -> Any:
    """recipes/onpolicy_qat.py as a module (its presets and check), without running it."""
    spec = importlib.util.spec_from_file_location("onpolicy_qat", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    lmbda: float
    beta: float
    lr: float | None

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f"_lr{self.lr:g}"
        return f"lmbda{self.lmbda:g}_beta{self.beta:g}{lr}"

    @property
    def label(self) -> str:
        lr = "" if self.lr is None else f", lr={self.lr:g}"
        return f"λ={self.lmbda:g}, β={self.beta:g}{lr}"

    def overrides(self) -> list[str]:
        lr = [] if self.lr is None else [f"optim.lr={self.lr!r}"]
        return [f"distill.lmbda={self.lmbda!r}", f"distill.beta={self.beta!r}", *lr]


def grid(lmbdas: tuple[float, ...], betas: tuple[float, ...], lrs: tuple[float, ...]
         ) -> list[Point]:
    """Every (λ, β, lr) combination; ``lrs`` empty keeps the preset's learning rate."""
    for name, values in (("lmbdas", lmbdas), ("betas", betas)):
        if not values:
            raise ValueError(f"sweep {name} is empty: give at least one value, e.g. {name}=[0,1]")
    return [Point(lmbda, beta, lr)
            for lmbda, beta, lr in itertools.product(lmbdas, betas, lrs or (None,))]


def point_args(point: Point, preset: str, overrides: tuple[str, ...], output_root: str
               ) -> list[str]:
    """The recipe's command-line arguments for one point."""
    return ["--factory", preset, *point.overrides(), f"output_dir={output_root}/{point.name}",
            *overrides]


def compare(points: list[Point], output_root: str) -> dict[str, Any]:
    """Teacher and PTQ rows of the first run + each run's student row → ``compare.*`` (the
    figure titled by the grid, with each run's training curves)."""
    from nemo_opd.eval.report import build_table, load_results, render_markdown, write_report

    records, training = [], {}
    for i, point in enumerate(points):
        run_dir = Path(output_root) / point.name
        for record in load_results([run_dir / "results.json"]):
            if record.get("role") == "student":
                name = f"{record['run']} [{point.label}]"
                records.append({**record, "run": name})
                training[name] = run_dir  # its metrics.jsonl and eval_history.json
            elif i == 0:
                records.append(record)
    grid_values = {"λ": {p.lmbda for p in points}, "β": {p.beta for p in points},
                   "lr": {p.lr for p in points} - {None}}
    title = f"sweep {Path(output_root).name}: " + ", ".join(
        f"{k} ∈ {{{', '.join(f'{v:g}' for v in sorted(values))}}}"
        for k, values in grid_values.items() if values)
    write_report(records, Path(output_root) / "compare", title=title, training=training)
    table = build_table(records)
    print(render_markdown(table))
    return table


def sweep(
    ctx: run.cli.RunContext,
    preset: str = "tiny",
    lmbdas: tuple[float, ...] = (0.0, 1.0),
    betas: tuple[float, ...] = (0.0, 0.5, 1.0),
    lrs: tuple[float, ...] = (),
    overrides: tuple[str, ...] = (),
    output_root: str = "runs/sweep",
    compare_only: bool = False,
) -> None:
    """Run recipes/onpolicy_qat.py for every (λ, β, lr) on ``run.executor`` (default: this
    machine, one process per run), then write the comparison table.

    Args:
        preset: the recipe preset every run starts from (`--factory PRESET` sets it too).
        lmbdas, betas, lrs: the grid (``lrs`` empty: the preset's lr).
        overrides: recipe overrides for every run, e.g. ``[optim.steps=20,quant.format=mxfp4]``.
        output_root: each run writes ``<output_root>/<point>/``; the table goes here (on a
            cluster: an absolute path on the shared filesystem).
        compare_only: skip the runs; tabulate the ones already finished.
    """
    points = grid(lmbdas, betas, lrs)
    if not compare_only:
        executor = ctx.executor or run.LocalExecutor()
        # The interpreter running this sweep runs local points; a cluster's container has its
        # own `python` and the code at the job's working directory.
        local = isinstance(executor, run.LocalExecutor)
        entrypoint = sys.executable if local else "python"
        path = str(RECIPE) if local else f"recipes/{RECIPE.name}"
        if local:  # local runs start in NeMo-Run's job directory, not here
            output_root = str(Path(output_root).resolve())
        commands = {point.name: point_args(point, preset, overrides, output_root)
                    for point in points}
        for name, args in commands.items():
            print(f"{name}: {entrypoint} {path} {' '.join(args)}")
        if ctx.dryrun:
            return
        with run.Experiment("onpolicy_qat_sweep", executor=executor) as experiment:
            for name, args in commands.items():
                experiment.add(run.Script(path=path, args=args, entrypoint=entrypoint),
                               executor=executor.clone(), name=name)
            experiment.run(sequential=True)
    compare(points, output_root)


def _sweep_factory(preset: str) -> Any:
    """A sweep factory named after one of the recipe's presets (``--factory PRESET``)."""

    def factory() -> run.Partial:
        return run.Partial(sweep, preset=preset)

    factory.__name__ = factory.__qualname__ = preset
    factory.__doc__ = f"Every run starts from recipes/onpolicy_qat.py --factory {preset}."
    return run.cli.factory(factory, target=sweep)


SWEEP_FACTORIES = {name: _sweep_factory(name) for name in presets(_load_recipe().onpolicy_qat)}


def check(kwargs: dict[str, Any], executor: run.Executor | None) -> None:
    """Before any run starts: the grid is not empty and every point's recipe arguments are
    valid for the recipe (preset, override keys and values, ranks vs TP × PP)."""
    recipe = _load_recipe()
    for point in grid(kwargs["lmbdas"], kwargs["betas"], kwargs["lrs"]):
        task = resolve_preset(recipe.onpolicy_qat, kwargs["preset"], recipe.tiny)
        apply_overrides(task, [*point.overrides(), *kwargs["overrides"]])
        recipe.check(built_arguments(task), executor)


if __name__ == "__main__":
    recipe_main(sweep, default_preset=SWEEP_FACTORIES["tiny"], check=check,
                entrypoint_type="experiment")
