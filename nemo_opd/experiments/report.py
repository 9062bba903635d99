"""Tabulate a reproduction grid: per-cell estimates over seeds, a verdict per claim.

Each run of :func:`~nemo_opd.experiments.findings.plan_runs` wrote the recipe's
``results.json`` and ``metrics.jsonl``; :func:`collect` reads each run's
:data:`~nemo_opd.experiments.findings.METRICS` (the trained student's score, i.e. the megatron
row's average; its start, gain and gap recovered; the teacher's score; the median step time),
:func:`judge` turns them into :class:`~nemo_opd.experiments.stats.Estimate` s and verdicts, and
:func:`write_reproduction` writes ``results.json``, ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_opd.experiments.findings import (
    FINDINGS,
    MARGIN,
    Claim,
    Finding,
    RunSpec,
    metric_label,
    metric_name,
)
from nemo_opd.experiments.stats import (
    Estimate,
    difference,
    judge_at_least,
    judge_at_most,
    judge_difference,
    mean_interval,
)

__all__ = ["collect", "judge", "write_reproduction"]

Scores = dict[str, dict[str, dict[str, list[float]]]]
"""finding → cell → metric → per-seed values."""


def _score_metrics(score: float, start: float, teacher: float, task: str = "") -> dict[str, float]:
    """score, gain, relative, start and teacher, named ``<metric>@<task>`` for one eval task."""
    suffix = f"@{task}" if task else ""
    values = {"score": score, "gain": score - start,
              "relative": score / start if start else math.nan, "start": start,
              "teacher": teacher}
    return {f"{metric}{suffix}": value for metric, value in values.items()}


def _run_values(path: Path) -> dict[str, float]:
    """The :data:`~nemo_opd.experiments.findings.METRICS` of one run's ``results.json``, of the
    eval tasks' average and (``<metric>@<task>``) of each task."""
    data = json.loads(path.read_text())
    rows = data["table"]["rows"]
    students = [r for r in rows if r["role"] == "student" and r["numerics"].startswith("megatron")]
    starts = [r for r in rows if r["role"] == "ptq"]
    if len(students) != 1 or len(starts) != 1:
        raise ValueError(f"{path}: expected one trained-student row and one start (PTQ) row, "
                         f"found {len(students)} and {len(starts)}")
    teachers = [r for r in rows if r["role"] == "teacher"]
    student, start, teacher = students[0], starts[0], teachers[0] if teachers else None
    gap = student.get("gap_recovered")
    metrics = path.parent / "metrics.jsonl"
    step_seconds = [json.loads(line)["step_seconds"] for line in
                    (metrics.read_text().splitlines() if metrics.is_file() else [])
                    if '"step_seconds"' in line]
    values = {"gap_recovered": math.nan if gap is None else float(gap),
              "seconds_per_step": statistics.median(step_seconds) if step_seconds else math.nan,
              **_score_metrics(float(student["average"]), float(start["average"]),
                               float(teacher["average"]) if teacher else math.nan)}
    for task, score in student.get("values", {}).items():
        values.update(_score_metrics(
            float(score), float(start.get("values", {}).get(task, math.nan)),
            float(teacher.get("values", {}).get(task, math.nan)) if teacher else math.nan, task))
    return values


def collect(runs: Sequence[RunSpec]) -> tuple[Scores, list[str]]:
    """Per-seed metrics of the finished runs, and the names of the runs without results."""
    scores: Scores = {}
    missing = []
    for spec in runs:
        path = Path(spec.output_dir) / "results.json"
        if not path.is_file():
            missing.append(spec.name)
            continue
        cell = scores.setdefault(spec.finding, {}).setdefault(spec.cell, {})
        for metric, value in _run_values(path).items():
            cell.setdefault(metric, []).append(value)
    return scores, missing


def _estimate(values: list[float]) -> Estimate | None:
    finite = [v for v in values if math.isfinite(v)]
    return mean_interval(finite) if finite else None


def _judge_claim(claim: Claim, cells: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"key": claim.key, "text": claim.text, "rule": claim.rule,
                           "cells": list(claim.cells)}
    if any(c not in cells for c in claim.cells):
        return {**out, "verdict": "not run", "estimate": None}
    if claim.rule == "difference":
        a, b = (cells[c].get(claim.metric, []) for c in claim.cells)
        if not a or not b:  # the metric's eval task was not run
            return {**out, "verdict": "inconclusive", "estimate": None}
        est = difference(a, b)
        verdict = judge_difference(est, claim.direction, MARGIN)
        out["claim"] = f"{claim.a} − {claim.b}: {claim.direction}"
    else:  # one cell's values: against 0 ("change") or a level
        est = _estimate(cells[claim.a].get(claim.metric, []))
        if est is None:
            return {**out, "verdict": "inconclusive", "estimate": None}
        if claim.rule == "change":
            verdict = judge_difference(est, claim.direction, MARGIN)
            out["claim"] = f"{claim.metric} of {claim.a}: {claim.direction}"
        else:
            judge = judge_at_least if claim.rule == "at_least" else judge_at_most
            verdict = judge(est, claim.level)
            out["claim"] = (f"{claim.metric} {'≥' if claim.rule == 'at_least' else '≤'} "
                            f"{claim.level:g}")
    return {**out, "verdict": verdict, "estimate": est.__dict__, "text_estimate": est.text()}


def judge(scores: Scores) -> dict[str, Any]:
    """``{finding: {"cells": {cell: {metric: estimate}}, "claims": [...]}}``."""
    report: dict[str, Any] = {}
    for name, cells in scores.items():
        finding: Finding = FINDINGS[name]
        estimates = {cell: {metric: (None if (e := _estimate(v)) is None else e.__dict__)
                            for metric, v in metrics.items()}
                     for cell, metrics in cells.items()}
        report[name] = {"seeds": finding.seeds, "summary": finding.summary,
                        "columns": list(finding.columns), "cells": estimates,
                        "labels": {c: finding.cell(c).label for c in cells},
                        "claims": [_judge_claim(c, cells) for c in finding.claims]}
    return report


def _markdown(report: dict[str, Any], header: str) -> str:
    lines = [header, ""]
    for name, finding in report.items():
        columns = finding["columns"]
        lines += [f"## {name} (seeds {finding['seeds']})", "", finding["summary"], "",
                  "| cell | " + " | ".join(metric_label(c) for c in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for cell, metrics in finding["cells"].items():
            texts = ["–" if metrics.get(c) is None else Estimate(**metrics[c]).text()
                     for c in columns]
            lines.append(f"| {finding['labels'][cell]} | " + " | ".join(texts) + " |")
        lines += ["", "| claim | judged | estimate | verdict |", "|---|---|---|---|"]
        for claim in finding["claims"]:
            lines.append(f"| {claim['key']}: {claim['text']} | {claim.get('claim', '')} | "
                         f"{claim.get('text_estimate', '–')} | **{claim['verdict']}** |")
        lines.append("")
    return "\n".join(lines)


def _figure(report: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    findings = list(report.items())
    fig, axes = plt.subplots(len(findings), 1, figsize=(10, 3.6 * len(findings)), squeeze=False)
    for ax, (name, finding) in zip(axes[:, 0], findings, strict=True):
        cells = list(finding["cells"])
        plotted = finding["columns"][0]  # a score, of the average or of one eval task
        _, task = metric_name(plotted)
        means, errs = [], []
        for cell in cells:
            est = finding["cells"][cell][plotted]
            means.append(est["mean"])
            errs.append(0.0 if math.isnan(est["low"]) else (est["high"] - est["low"]) / 2)
        ax.bar(range(len(cells)), means, yerr=errs, capsize=3, color="tab:blue")
        for i, (mean, est) in enumerate(zip(means, (finding["cells"][c][plotted] for c in cells),
                                            strict=True)):
            ax.text(i, mean, f"{mean:.3f}\nn={est['n']}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cells)), [finding["labels"][c] for c in cells], rotation=30,
                      ha="right", fontsize=8)
        references = []
        for metric, style in (("teacher", "--"), ("start", ":")):
            named = f"{metric}@{task}" if task else metric
            values = [(finding["cells"][c].get(named) or {}).get("mean", math.nan)
                      for c in cells]
            if not all(math.isfinite(v) for v in values):
                continue
            references += values
            if max(values) - min(values) < 1e-9:  # one baseline for every cell: a line
                ax.axhline(values[0], ls=style, color="gray", lw=1,
                           label=f"{metric} {values[0]:.3f}")
            else:  # cells with different baselines (students, formats): a mark per bar
                ax.scatter(range(len(cells)), values, marker="_", s=600, color="gray",
                           zorder=3, label=metric)
        if references:
            ax.legend(loc="lower right", fontsize=7)
        low = min([m - e for m, e in zip(means, errs, strict=True)] + references)
        ax.set_ylim(max(0.0, low - 0.05), min(1.02, max(means + references) + 0.08))
        ax.set_ylabel(f"{metric_label(plotted)} (mean ± 95 % CI)")
        ax.set_title(f"{name} (seeds {finding['seeds']})", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reproduction(report: dict[str, Any], out_dir: str | Path, *, header: str,
                       title: str) -> list[Path]:
    """``results.json`` / ``.md`` / ``.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "results.png"]
    paths[0].write_text(json.dumps(report, indent=1, allow_nan=True))
    paths[1].write_text(_markdown(report, header))
    _figure(report, paths[2], title)
    return paths
