"""Results tables in the seeds' format, as Markdown, JSON and a PNG plot.

Rows are runs (one :func:`~nemo_opd.eval.evaluate.evaluate_model` record each), columns the
tasks, then ``Avg`` (mean over the tasks every row has) and the share of the PTQ gap a run
recovers::

    gap recovered = (Avg(run) − Avg(ptq)) / (Avg(teacher) − Avg(ptq))

where ``teacher`` and ``ptq`` are the rows with those roles (1.0 = back to the teacher,
0 = no better than PTQ; undefined when the table has no teacher or PTQ row, or they tie).
Every row names its numerics (``megatron fake-quant fp32``, ``HF dequantised bf16``,
``TRT-LLM``...), since the same weights score differently under different kernels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_opd.eval.evaluate import RESULT_SCHEMA, ROLES

__all__ = ["build_table", "gap_recovered", "load_results", "render_markdown", "write_plot",
           "write_report", "PlotUnavailable"]

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
    "rows": [{"run", "role", "numerics", "values": {task: value}, "average",
    "gap_recovered"}]}``.

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
    by_role = {row["role"]: row["average"] for row in rows if row["role"] in ROLES[:2]}
    for row in rows:
        row["gap_recovered"] = (
            gap_recovered(row["average"], by_role["teacher"], by_role["ptq"])
            if {"teacher", "ptq"} <= by_role.keys() and row["role"] not in ("teacher", "ptq")
            else None)
    return {"columns": [{"task": t, "label": label} for t, label in columns.items()],
            "average_over": shared, "rows": rows}


def render_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown: ``| Run | Numerics | <tasks> | Avg | PTQ gap recovered |``,
    scores to three decimals as in the seeds."""
    tasks = [c["task"] for c in table["columns"]]
    avg = "Avg" if len(table["average_over"]) == len(tasks) else \
        f"Avg ({', '.join(table['average_over'])})"
    header = ["Run", "Numerics", *[c["label"] for c in table["columns"]], avg,
              "PTQ gap recovered"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        name = row["run"] + (f" ({row['role']})" if row["role"] else "")
        cells = [f"{row['values'][t]:.3f}" if t in row["values"] else "–" for t in tasks]
        gap = "–" if row["gap_recovered"] is None else f"{100 * row['gap_recovered']:.1f}%"
        lines.append("| " + " | ".join([name, row["numerics"], *cells,
                                        f"{row['average']:.3f}", gap]) + " |")
    return "\n".join(lines) + "\n"


def write_plot(table: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: accuracy per task (and the average), one bar per run. Raises
    :class:`PlotUnavailable` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotUnavailable("matplotlib is not installed; the PNG plot was not written "
                              "(pip install matplotlib)") from err
    labels = [c["label"] for c in table["columns"]] + ["Avg"]
    tasks = [c["task"] for c in table["columns"]]
    width = 0.8 / len(table["rows"])
    # the legend goes below the axes: inside them it hides the bars of high-accuracy runs
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels)), 4.0 + 0.25 * len(table["rows"])))
    for i, row in enumerate(table["rows"]):
        heights = [row["values"].get(t, float("nan")) for t in tasks] + [row["average"]]
        xs = [j + (i - (len(table["rows"]) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, heights, width, label=f"{row['run']} ({row['numerics']})")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1,
              frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(records: Sequence[dict[str, Any]], out: str | Path, *,
                 teacher: str | None = None, ptq: str | None = None) -> dict[str, Path | None]:
    """Write ``<out>.md``, ``<out>.json`` (table + records) and ``<out>.png``; return the paths
    (``png`` None, with a warning, when matplotlib is missing)."""
    table = build_table(records, teacher=teacher, ptq=ptq)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {"md": out.with_suffix(".md"), "json": out.with_suffix(".json")}
    paths["md"].write_text(render_markdown(table))
    try:
        paths["png"] = write_plot(table, out.with_suffix(".png"))
    except PlotUnavailable as err:
        logger.warning("%s", err)
        paths["png"] = None
    paths["json"].write_text(json.dumps({"table": table, "records": list(records),
                                         "plot": None if paths["png"] is None
                                         else paths["png"].name}, indent=2))
    return paths
