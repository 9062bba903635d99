"""Results tables in the seeds' format, as Markdown, JSON and a PNG figure.

Rows are runs (one :func:`~nemo_opd.eval.evaluate.evaluate_model` record each), columns the
tasks, then ``Avg`` (mean over the tasks every row has) and the share of the PTQ gap a run
recovers::

    gap recovered = (Avg(run) − Avg(ptq)) / (Avg(teacher) − Avg(ptq))

where ``teacher`` and ``ptq`` are the rows with those roles (1.0 = back to the teacher,
0 = no better than PTQ; undefined when the table has no teacher or PTQ row, or they tie).
Every row names its numerics (``megatron fake-quant fp32``, ``HF dequantised bf16``,
``TRT-LLM``...), since the same weights score differently under different kernels.

The figure (:func:`results_figure`) has a title (for a run: model, format, steps, λ, β), one
group of bars per task and ``Avg`` with the score written on every bar, a score axis fitted to
the scores (not 0..1, so 0.954 and 0.952 stay apart), and one legend entry per row,
``<run> — <numerics>``. With :class:`TrainingCurves` (``metrics.jsonl`` and the in-loop
evaluations of a run's output directory) a second row shows the training loss and the in-loop
evaluation over the steps, with the teacher's and PTQ's ``Avg`` as reference lines.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nemo_opd.eval.evaluate import RESULT_SCHEMA, ROLES

__all__ = ["build_table", "gap_recovered", "load_results", "render_markdown", "results_figure",
           "read_training", "run_title", "write_plot", "write_report", "PlotUnavailable",
           "TrainingCurves"]

logger = logging.getLogger(__name__)


class PlotUnavailable(RuntimeError):
    """The plot cannot be drawn here (matplotlib is not installed)."""


def gap_recovered(run: float, teacher: float, ptq: float) -> float | None:
    """``(run − ptq) / (teacher − ptq)``; None when teacher and PTQ score the same."""
    return None if teacher == ptq else (run - ptq) / (teacher - ptq)


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Result records from JSON files: one record, a list of them, or a report's ``records``."""
    records = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"result file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        found = data["records"] if isinstance(data, dict) and "records" in data else data
        for record in found if isinstance(found, list) else [found]:
            if not isinstance(record, dict) or record.get("schema") != RESULT_SCHEMA:
                raise ValueError(f"{path}: not a nemo_opd evaluation result (expected "
                                 f"'schema': {RESULT_SCHEMA!r})")
            records.append(record)
    return records


def build_table(records: Sequence[dict[str, Any]], *, teacher: str | None = None,
                ptq: str | None = None) -> dict[str, Any]:
    """The table as data: ``{"columns": [{"task", "label"}], "average_over": [task],
    "rows": [{"run", "name", "role", "numerics", "values": {task: value}, "average",
    "gap_recovered"}]}``.

    ``name`` is how the Markdown and the figure show the run: ``run`` without a trailing
    parenthesis that its numerics repeat (``export int4 (HF dequantised)`` with numerics
    ``HF dequantised float32`` shows as ``export int4``, the numerics saying the rest).
    ``teacher``/``ptq`` name the runs with those roles, overriding the records' own roles.
    """
    if not records:
        raise ValueError("no results to tabulate")
    runs = [r["run"] for r in records]
    duplicates = sorted({name for name in runs if runs.count(name) > 1})
    if duplicates:
        raise ValueError(f"run names must be unique in one table, repeated: {duplicates} "
                         "(pass run_name= / --name when evaluating)")
    roles = {r["run"]: r.get("role") for r in records}
    for role, name in (("teacher", teacher), ("ptq", ptq)):
        if name is not None:
            if name not in roles:
                raise ValueError(f"--{role} {name!r} is not a run in the table: {runs}")
            roles = {run: (None if value == role else value) for run, value in roles.items()}
            roles[name] = role
    for role in ("teacher", "ptq"):
        holders = [run for run, value in roles.items() if value == role]
        if len(holders) > 1:
            raise ValueError(f"several runs have role {role!r}: {holders}; name one with "
                             f"--{role}")
    columns: dict[str, str] = {}
    for record in records:
        for task, cell in record["tasks"].items():
            columns.setdefault(task, cell.get("label", task))
    shared = [t for t in columns if all(t in r["tasks"] for r in records)]
    if not shared:
        raise ValueError("the runs share no task, so no average can be compared")
    rows = []
    for record in records:
        values = {t: record["tasks"][t]["value"] for t in columns if t in record["tasks"]}
        rows.append({"run": record["run"], "role": roles[record["run"]],
                     "numerics": record.get("numerics", "?"), "values": values,
                     "average": sum(values[t] for t in shared) / len(shared)})
    _name_rows(rows)
    by_role = {row["role"]: row["average"] for row in rows if row["role"] in ROLES[:2]}
    for row in rows:
        row["gap_recovered"] = (
            gap_recovered(row["average"], by_role["teacher"], by_role["ptq"])
            if {"teacher", "ptq"} <= by_role.keys() and row["role"] not in ("teacher", "ptq")
            else None)
    return {"columns": [{"task": t, "label": label} for t, label in columns.items()],
            "average_over": shared, "rows": rows}


_TRAILING_PARENTHESIS = re.compile(r"^(?P<name>.*\S)\s*\((?P<said>[^()]+)\)$")


def _name_rows(rows: list[dict[str, Any]]) -> None:
    """Set each row's display ``name`` (see :func:`build_table`); a row keeps its whole run name
    where shortening would make two rows read the same."""
    for row in rows:
        match = _TRAILING_PARENTHESIS.match(row["run"])
        said, numerics = (match["said"].strip().lower(), row["numerics"].lower()) if match \
            else ("", "")
        said_by_numerics = bool(said) and (numerics == said or numerics.startswith(said + " "))
        row["name"] = match["name"] if said_by_numerics else row["run"]
    shown = [(row["name"], row["numerics"]) for row in rows]
    for row, key in zip(rows, shown, strict=True):
        if shown.count(key) > 1:
            row["name"] = row["run"]


def _row_name(row: dict[str, Any]) -> str:
    """The Markdown's run cell: the name, with the role of the gap's two ends (``teacher``,
    ``ptq``) where the name does not say it; student rows are the ones with a gap value."""
    name = row.get("name", row["run"])
    role = row["role"]
    shown = role in ("teacher", "ptq") and role not in name.lower()
    return f"{name} ({role})" if shown else name


def _legend_label(row: dict[str, Any]) -> str:
    gap = row["gap_recovered"]
    recovered = "" if gap is None else f", {100 * gap:.0f}% of PTQ gap recovered"
    return f"{row.get('name', row['run'])} — {row['numerics']}{recovered}"


def render_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown: ``| Run | Numerics | <tasks> | Avg | PTQ gap recovered |``,
    scores to three decimals as in the seeds. The run cell adds the role (``(teacher)``)
    only where the name does not already say it."""
    tasks = [c["task"] for c in table["columns"]]
    avg = "Avg" if len(table["average_over"]) == len(tasks) else \
        f"Avg ({', '.join(table['average_over'])})"
    header = ["Run", "Numerics", *[c["label"] for c in table["columns"]], avg,
              "PTQ gap recovered"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [f"{row['values'][t]:.3f}" if t in row["values"] else "–" for t in tasks]
        gap = "–" if row["gap_recovered"] is None else f"{100 * row['gap_recovered']:.1f}%"
        lines.append("| " + " | ".join([_row_name(row), row["numerics"], *cells,
                                        f"{row['average']:.3f}", gap]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- training curves


@dataclasses.dataclass(frozen=True)
class TrainingCurves:
    """What one training run logged over its steps: the figure's second row."""

    loss: tuple[tuple[int, float], ...] = ()
    """``(step, loss)`` of the training steps (``metrics.jsonl``)."""
    evals: Mapping[str, tuple[tuple[int, float], ...]] = dataclasses.field(default_factory=dict)
    """task → ``(step, value)`` of the in-loop evaluations (``eval_history.json``); the task
    ``average`` is their mean where the evaluation hook reported it."""

    def __bool__(self) -> bool:
        return bool(self.loss) or any(self.evals.values())


def _eval_points(entries: Sequence[Mapping[str, Any]]) -> dict[str, tuple[tuple[int, float], ...]]:
    points: dict[str, list[tuple[int, float]]] = {}
    for entry in entries:
        for key, value in entry.items():
            if key.startswith("eval/") and isinstance(value, (int, float)):
                points.setdefault(key[len("eval/"):], []).append((int(entry["step"]),
                                                                  float(value)))
    return {task: tuple(sorted(values)) for task, values in points.items()}


def read_training(output_dir: str | Path, *,
                  history: Sequence[Mapping[str, Any]] | None = None) -> TrainingCurves:
    """The curves of the run whose output directory is ``output_dir``: the loss of every step
    in ``metrics.jsonl``, and the in-loop evaluations from ``history`` (the trainer's
    ``evaluations``: ``[{"step", "eval/<task>": value}]``), else ``eval_history.json``, else
    the ``eval`` events of ``metrics.jsonl`` (the first of them that is not empty). Missing
    files give empty curves; torn lines are skipped."""
    output_dir = Path(output_dir)
    loss: dict[int, float] = {}
    events: list[dict[str, Any]] = []
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                step = int(entry["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed run
            if entry.get("event") == "eval":
                events.append(entry)
            elif "event" not in entry and isinstance(entry.get("loss"), (int, float)):
                loss[step] = float(entry["loss"])
    if not history and (output_dir / "eval_history.json").is_file():
        try:
            history = json.loads((output_dir / "eval_history.json").read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; the in-loop evaluations are read from %s",
                           output_dir / "eval_history.json", metrics)
            history = None
    # A requeued job whose training had finished evaluates nothing in the loop (its history is
    # empty); the first attempt's evaluations are still in metrics.jsonl.
    return TrainingCurves(loss=tuple(sorted(loss.items())),
                          evals=_eval_points(history or events))


# ---------------------------------------------------------------------------------- figure


def run_title(*, model: str, fmt: str, steps: int, lmbda: float, beta: float,
              teacher: str | None = None) -> str:
    """The figure title of one run: ``"<model> → INT4 · 200 steps · λ=1 · β=0.5"`` (model and
    teacher as the last component of their paths; the teacher only when it is another model)."""
    name = Path(str(model).rstrip("/")).name or str(model)
    title = f"{name} → {fmt.upper()} · {steps} steps · λ={lmbda:g} · β={beta:g}"
    if teacher and Path(str(teacher).rstrip("/")) != Path(str(model).rstrip("/")):
        title += f" · teacher {Path(str(teacher).rstrip('/')).name}"
    return title


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def _score_limits(values: Sequence[float]) -> tuple[float, float]:
    """A score axis fitted to ``values``: a little below the lowest, room above the highest for
    the bars' labels; never below 0."""
    finite = [v for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = max(high - low, 0.02)
    return max(0.0, low - 0.25 * span), high + 0.3 * span


def _bar_panel(ax: Any, table: dict[str, Any], colors: Sequence[Any]) -> None:
    rows = table["rows"]
    tasks = [c["task"] for c in table["columns"]]
    labels = [c["label"] for c in table["columns"]] + ["Avg"]
    width = 0.8 / len(rows)
    # Rotated labels stay inside their bar's width at 6 rows; flat ones fit a few bars only.
    rotation = 90 if len(rows) > 2 else 0
    heights_all = []
    for i, row in enumerate(rows):
        heights = [row["values"].get(t, math.nan) for t in tasks] + [row["average"]]
        heights_all += heights
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, heights, width, label=_legend_label(row), color=colors[i])
        ax.bar_label(bars, labels=["" if math.isnan(h) else f"{h:.3f}" for h in heights],
                     rotation=rotation, padding=2, fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.axvline(len(labels) - 1.5, color="0.8", linewidth=0.8)  # tasks | Avg
    ax.set_ylabel("score")
    ax.set_ylim(*_score_limits(heights_all))
    ax.grid(axis="y", color="0.92")
    ax.set_axisbelow(True)
    # the legend goes below the axes: inside them it hides the bars of high-scoring runs
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=1,
              frameon=False)


def _training_panels(fig: Any, spec: Any, table: dict[str, Any],
                     curves: Mapping[str, TrainingCurves], colors: Mapping[str, Any]) -> None:
    """Loss over steps (left) and in-loop evaluation over steps (right), whichever exist."""
    with_loss = {run: c for run, c in curves.items() if c.loss}
    with_evals = {run: c for run, c in curves.items() if any(c.evals.values())}
    panels = [kind for kind, found in (("loss", with_loss), ("evals", with_evals)) if found]
    grid = spec.subgridspec(1, len(panels), wspace=0.25)
    several = len(curves) > 1
    for k, kind in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        ax.set_xlabel("step")
        ax.grid(color="0.92")
        if kind == "loss":
            for run, c in with_loss.items():
                steps, values = zip(*c.loss, strict=True)
                ax.plot(steps, values, color=colors[run], linewidth=1.2, label=run)
            ax.set_ylabel("training loss")
            ax.set_title("training loss", fontsize="medium")
            if several:
                ax.legend(fontsize="x-small", frameon=False)
            continue
        _eval_panel(ax, table, with_evals, colors, several)


def _eval_panel(ax: Any, table: dict[str, Any], curves: Mapping[str, TrainingCurves],
                colors: Mapping[str, Any], several: bool) -> None:
    labels = {c["task"]: c["label"] for c in table["columns"]}
    shared = table["average_over"]
    plotted: list[float] = []

    def average(c: TrainingCurves) -> tuple[tuple[int, float], ...]:
        if "average" in c.evals:
            return c.evals["average"]
        if len(c.evals) == 1:
            return next(iter(c.evals.values()))
        if not all(t in c.evals for t in shared):
            return ()
        by_step = [dict(c.evals[t]) for t in shared]
        steps = sorted(set.intersection(*(set(s) for s in by_step)))
        return tuple((s, sum(v[s] for v in by_step) / len(by_step)) for s in steps)

    if several:  # one line per run: its average (or its only task)
        for run, c in curves.items():
            points = average(c)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, "o-", color=colors[run], markersize=3, label=run)
                plotted += values
        ax.set_title("in-loop evaluation (Avg)", fontsize="medium")
    else:  # one run: every task in grey (the bars' colours are the rows'), Avg in its colour
        ((run, c),) = curves.items()
        tasks = [t for t in c.evals if t != "average"]
        for k, task in enumerate(tasks):
            steps, values = zip(*c.evals[task], strict=True)
            ax.plot(steps, values, marker=_MARKERS[k % len(_MARKERS)], markersize=4,
                    linewidth=1, color=str(0.25 + 0.45 * k / max(len(tasks) - 1, 1)),
                    label=labels.get(task, task))
            plotted += values
        points = average(c) if len(c.evals) > 1 else ()
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, "o-", color=colors[run], markersize=4, linewidth=2.2,
                    label="Avg" if len(shared) == len(labels) else f"Avg ({', '.join(shared)})")
            plotted += values
        ax.set_title(f"in-loop evaluation of {run}", fontsize="medium")
    for row in table["rows"]:
        if row["role"] in ("teacher", "ptq"):
            ax.axhline(row["average"], linestyle="--", linewidth=1, color=colors[row["run"]],
                       label=f"{row['name']} Avg ({row['average']:.3f})")
            plotted.append(row["average"])
    ax.set_ylabel("score")
    low, high = _score_limits(plotted)
    ax.set_ylim(low, high - 0.15 * (high - low))  # no bar labels here: less room on top
    # outside, to the right: inside it would cover the curves; the runs' colours (several
    # runs) are named by the loss panel's legend
    handles = [h for h in ax.get_legend_handles_labels()[0]
               if not several or h.get_linestyle() == "--"]
    ax.legend(handles=handles, fontsize="x-small", frameon=False, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))


def results_figure(table: dict[str, Any], *, title: str | None = None,
                   training: Mapping[str, TrainingCurves] | None = None) -> Any:
    """The figure of ``table`` (see the module doc) as a matplotlib ``Figure``: the bars on top
    and, when ``training`` holds any curve, a second row with the loss and the in-loop
    evaluation. ``training`` maps a run name (a row of the table: its curves take its colour)
    or any label to its curves. Raises :class:`PlotUnavailable` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotUnavailable("matplotlib is not installed; the PNG plot was not written "
                              "(pip install matplotlib)") from err
    rows = table["rows"]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {row["run"]: palette[i % len(palette)] for i, row in enumerate(rows)}
    curves = {run: c for run, c in (training or {}).items() if c}
    extra = iter(palette[len(rows):] + palette)
    for run in curves:
        colors.setdefault(run, next(extra))
    groups = len(table["columns"]) + 1
    width = min(18.0, max(7.0, 2.0 + 0.32 * groups * len(rows)))
    bars_height = 3.6 + 0.22 * len(rows)  # the legend, one line per row, sits below the bars
    height = bars_height + (3.2 if curves else 0.0)
    fig = plt.figure(figsize=(width, height), layout="constrained")
    spec = fig.add_gridspec(2 if curves else 1, 1,
                            height_ratios=[bars_height, 3.2] if curves else None)
    _bar_panel(fig.add_subplot(spec[0]), table, [colors[row["run"]] for row in rows])
    if curves:
        _training_panels(fig, spec[1], table, curves, colors)
    tasks = ", ".join(c["label"] for c in table["columns"])
    fig.suptitle(title or f"{len(rows)} runs on {tasks}", fontsize="large")
    return fig


def write_plot(table: dict[str, Any], path: str | Path, *, title: str | None = None,
               training: Mapping[str, TrainingCurves] | None = None) -> Path:
    """Save :func:`results_figure` as a PNG at ``path``. Raises :class:`PlotUnavailable`
    without matplotlib."""
    fig = results_figure(table, title=title, training=training)
    import matplotlib.pyplot as plt  # importable: results_figure drew with it

    path = Path(path)
    fig.savefig(path, dpi=120, metadata={"Title": fig.get_suptitle()})
    plt.close(fig)
    return path


def write_report(records: Sequence[dict[str, Any]], out: str | Path, *,
                 teacher: str | None = None, ptq: str | None = None, title: str | None = None,
                 training: Mapping[str, TrainingCurves | str | Path] | None = None
                 ) -> dict[str, Path | None]:
    """Write ``<out>.md``, ``<out>.json`` (table + records) and ``<out>.png``; return the paths
    (``png`` None, with a warning, when matplotlib is missing).

    Args:
        teacher, ptq: the runs with those roles (default: the records' roles).
        title: the figure's title (default: how many runs on which tasks).
        training: run name (or any label) → its :class:`TrainingCurves` or its output directory
            (read with :func:`read_training`): the figure's second row; none: bars only.
    """
    table = build_table(records, teacher=teacher, ptq=ptq)
    curves = {run: c if isinstance(c, TrainingCurves) else read_training(c)
              for run, c in (training or {}).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {"md": out.with_suffix(".md"), "json": out.with_suffix(".json")}
    paths["md"].write_text(render_markdown(table))
    try:
        paths["png"] = write_plot(table, out.with_suffix(".png"), title=title, training=curves)
    except PlotUnavailable as err:
        logger.warning("%s", err)
        paths["png"] = None
    paths["json"].write_text(json.dumps({"table": table, "records": list(records),
                                         "plot": None if paths["png"] is None
                                         else paths["png"].name}, indent=2))
    return paths
