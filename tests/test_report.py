"""The results figure and table labels (nemo_opd.eval.report) and the recipe's writer of them
(nemo_opd.launch.stages.write_results): title, value labels, a score axis fitted to the scores,
legend and row labels that say each thing once, and the training row (loss and in-loop
evaluation over the steps) read from a run's output directory. The figure is checked through
matplotlib's objects, not its pixels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from nemo_opd.eval.evaluate import RESULT_SCHEMA  # noqa: E402
from nemo_opd.eval.report import (  # noqa: E402
    TrainingCurves,
    build_table,
    read_training,
    render_markdown,
    results_figure,
    run_title,
    write_report,
)

TASKS = {"arith_gen": "Arith gen", "arith_mc": "Arith MC"}


def _record(run: str, role: str | None, numerics: str, values: list[float]) -> dict:
    return {"schema": RESULT_SCHEMA, "run": run, "role": role, "numerics": numerics,
            "tasks": {t: {"label": label, "metric": "acc,none", "value": v, "stderr": None,
                          "n": 40} for (t, label), v in zip(TASKS.items(), values, strict=True)}}


def _records() -> list[dict]:
    """The recipe's five rows, named as it names them; the trained student and its export
    differ in the third decimal."""
    return [_record("teacher", "teacher", "megatron bf16", [0.975, 0.955]),
            _record("PTQ int4", "ptq", "megatron fake-quant fp32", [0.70, 0.80]),
            _record("on-policy QAT (int4)", "student", "megatron fake-quant fp32", [0.954, 0.93]),
            _record("export int4 (HF dequantised)", "student", "HF dequantised float32",
                    [0.952, 0.93]),
            _record("export int4 (TRT-LLM)", "student", "TRT-LLM", [0.950, 0.925])]


def _curves() -> TrainingCurves:
    return TrainingCurves(loss=tuple((s, 2.0 * math.exp(-s / 4) + 0.3) for s in range(1, 9)),
                          evals={"arith_gen": ((4, 0.90), (8, 0.954)),
                                 "arith_mc": ((4, 0.88), (8, 0.93))})


def _bar_axes(fig):
    return fig.axes[0]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    figures = []

    def make(*args, **kwargs):
        figures.append(results_figure(*args, **kwargs))
        return figures[-1]

    yield make
    for fig in figures:
        plt.close(fig)


def test_rows_name_the_run_once_and_the_numerics_once():
    table = build_table(_records())
    names = [row["name"] for row in table["rows"]]
    assert names == ["teacher", "PTQ int4", "on-policy QAT (int4)", "export int4", "export int4"]
    assert [row["run"] for row in table["rows"]][3] == "export int4 (HF dequantised)"  # the key
    markdown = render_markdown(table)
    assert "| teacher | megatron bf16 |" in markdown  # not "teacher (teacher)"
    assert "| PTQ int4 | megatron fake-quant fp32 |" in markdown  # not "PTQ int4 (ptq)"
    assert "| export int4 | HF dequantised float32 | 0.952 |" in markdown
    assert "| export int4 | TRT-LLM | 0.950 |" in markdown
    assert "(HF dequantised)" not in markdown
    # A role the name does not say is shown: "--teacher base" makes "base" the teacher row.
    records = [_record("base", None, "megatron bf16", [0.9, 0.9]), *_records()[1:3]]
    assert "| base (teacher) | megatron bf16 |" in render_markdown(
        build_table(records, teacher="base"))
    # Shortening never makes two rows read the same: both keep their whole run name.
    records = [_record("x (HF)", None, "HF d", [0.5, 0.5]),
               _record("x (HF d)", None, "HF d", [0.6, 0.6])]
    assert [row["name"] for row in build_table(records)["rows"]] == ["x (HF)", "x (HF d)"]


def test_figure_has_title_value_labels_fitted_axis_and_unambiguous_legend(figure):
    title = run_title(model="/ckpt/Qwen3-0.6B/", fmt="int4", steps=200, lmbda=1.0, beta=0.5,
                      teacher="/ckpt/Qwen3-8B")
    assert title == "Qwen3-0.6B → INT4 · 200 steps · λ=1 · β=0.5 · teacher Qwen3-8B"
    assert "teacher" not in run_title(model="/m/a", fmt="mxfp4", steps=3, lmbda=0, beta=1,
                                      teacher="/m/a")
    table = build_table(_records())
    fig = figure(table, title=title)
    assert fig.get_suptitle() == title
    assert len(fig.axes) == 1  # no training curves: the bars only
    ax = _bar_axes(fig)
    labels = _texts(ax)
    # a label on every bar: 5 rows x (2 tasks + Avg), the close scores told apart
    assert len([t for t in labels if t]) == 15
    assert {"0.954", "0.952", "0.950", "0.975", "0.700"} <= set(labels)
    assert f"{table['rows'][0]['average']:.3f}" in labels
    low, high = ax.get_ylim()
    scores = [v for row in table["rows"] for v in (*row["values"].values(), row["average"])]
    assert 0.5 < low < min(scores) and max(scores) < high < 1.1, (low, high)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Arith gen", "Arith MC", "Avg"]
    legend = _legend(ax)
    assert legend[:2] == ["teacher — megatron bf16", "PTQ int4 — megatron fake-quant fp32"]
    assert legend[3].startswith("export int4 — HF dequantised float32, ")
    assert legend[4].startswith("export int4 — TRT-LLM, ")
    assert "of PTQ gap recovered" in legend[2]
    for entry in legend:  # the numerics once, no "(...) (...)" of a name and its numerics
        assert entry.count("HF dequantised") <= 1 and ") (" not in entry, entry


def test_fitted_axis_is_never_below_zero_and_missing_cells_have_no_label(figure):
    records = [_record("a", None, "m", [0.0, 0.4]),
               {**_record("b", None, "m", [0.1, 0.2]), "tasks": {
                   "arith_gen": _record("b", None, "m", [0.1, 0.2])["tasks"]["arith_gen"]}}]
    ax = _bar_axes(figure(build_table(records)))
    assert ax.get_ylim()[0] == 0.0
    assert "nan" not in _texts(ax)


def test_training_row_plots_loss_and_in_loop_evaluation(figure):
    table = build_table(_records())
    fig = figure(table, title="t", training={"on-policy QAT (int4)": _curves()})
    assert len(fig.axes) == 3  # the bars, then the second row: loss | in-loop evaluation
    bars, loss, evals = fig.axes
    assert loss.get_ylabel() == "training loss" and loss.get_xlabel() == "step"
    (line,) = loss.get_lines()
    assert list(line.get_xdata()) == list(range(1, 9))
    # the curves take the trained row's colour in the bars
    student_bar = bars.containers[2].patches[0]
    import matplotlib.colors as mcolors

    assert mcolors.to_hex(line.get_color()) == mcolors.to_hex(student_bar.get_facecolor())
    assert set(_legend(evals)) == {"Arith gen", "Arith MC", "Avg", "teacher Avg (0.965)",
                                   "PTQ int4 Avg (0.750)"}
    avg = next(line for line in evals.get_lines() if line.get_label() == "Avg")
    assert list(avg.get_ydata()) == pytest.approx([0.89, 0.942])
    assert evals.get_ylim()[0] < 0.75 < 0.965 < evals.get_ylim()[1]
    # only a loss (no in-loop evaluation): one panel in the second row
    fig = figure(table, training={"x": TrainingCurves(loss=((1, 1.0), (2, 0.5)))})
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "training loss"
    # empty curves draw nothing
    assert len(figure(table, training={"x": TrainingCurves()}).axes) == 1


def test_several_runs_get_one_curve_each_in_their_colour(figure):
    records = _records()[:2] + [
        {**_record("opd", "student", "megatron fake-quant fp32", [0.9, 0.9]), "run": run}
        for run in ("opd [λ=0, β=0.5]", "opd [λ=1, β=0.5]")]
    training = {records[2]["run"]: _curves(),
                records[3]["run"]: TrainingCurves(loss=((1, 3.0), (8, 1.0)),
                                                  evals={"arith_gen": ((8, 0.9),),
                                                         "arith_mc": ((8, 0.8),)})}
    fig = figure(build_table(records), title="sweep runs/sweep", training=training)
    bars, loss, evals = fig.axes
    assert fig.get_suptitle() == "sweep runs/sweep"
    assert [line.get_label() for line in loss.get_lines()] == list(training)
    import matplotlib.colors as mcolors

    for i, line in enumerate(loss.get_lines()):
        bar = bars.containers[2 + i].patches[0]
        assert mcolors.to_hex(line.get_color()) == mcolors.to_hex(bar.get_facecolor())
    per_run = [line for line in evals.get_lines() if line.get_label() in training]
    assert [len(line.get_ydata()) for line in per_run] == [2, 1]
    assert [*per_run[0].get_ydata(), *per_run[1].get_ydata()] == pytest.approx([0.89, 0.942,
                                                                               0.85])


def _write_run_dir(out: Path) -> None:
    lines = [{"step": s, "loss": 3.0 / s, "lr": 1e-5} for s in (1, 2, 3, 4)]
    lines.insert(2, {"step": 2, "event": "eval", "eval/arith_gen": 0.5, "eval/arith_mc": 0.6})
    lines.append({"step": 4, "event": "eval", "eval/arith_gen": 0.7, "eval/arith_mc": 0.8})
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 5, "lo'  # torn
    (out / "metrics.jsonl").write_text(text)


def test_read_training_from_an_output_directory(tmp_path):
    assert not read_training(tmp_path)  # nothing written yet: no curves
    _write_run_dir(tmp_path)
    curves = read_training(tmp_path)
    assert curves.loss == ((1, 3.0), (2, 1.5), (3, 1.0), (4, 0.75))
    # no eval_history.json: the eval events of metrics.jsonl
    assert curves.evals == {"arith_gen": ((2, 0.5), (4, 0.7)), "arith_mc": ((2, 0.6), (4, 0.8))}
    (tmp_path / "eval_history.json").write_text(json.dumps([{"step": 4, "eval/arith_gen": 0.9}]))
    assert read_training(tmp_path).evals == {"arith_gen": ((4, 0.9),)}
    history = [{"step": 3, "eval/arith_mc": 0.1}]
    assert read_training(tmp_path, history=history).evals == {"arith_mc": ((3, 0.1),)}
    # a requeued job's empty history: the first attempt's evaluations are still found
    (tmp_path / "eval_history.json").write_text("[]")
    assert read_training(tmp_path, history=[]).evals["arith_gen"] == ((2, 0.5), (4, 0.7))


def test_write_report_draws_the_training_row_of_run_directories(tmp_path, monkeypatch):
    """The sweep's use: run name → output directory; the defaults keep the old call working."""
    import nemo_opd.eval.report as report

    drawn = []
    monkeypatch.setattr(report, "results_figure",
                        lambda *a, **k: drawn.append(results_figure(*a, **k)) or drawn[-1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_run_dir(run_dir)
    paths = write_report(_records()[:3], tmp_path / "compare", title="sweep x",
                         training={"on-policy QAT (int4)": run_dir})
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn[-1].get_suptitle() == "sweep x" and len(drawn[-1].axes) == 3
    write_report(_records()[:3], tmp_path / "plain")  # the sweep's current call
    assert len(drawn[-1].axes) == 1 and "3 runs" in drawn[-1].get_suptitle()


def test_write_results_titles_the_run_and_plots_its_curves(tmp_path, monkeypatch, capsys):
    """stages.write_results (the recipe's step 5): the title from the run's config (here: the
    one its newest checkpoint recorded), the curves from metrics.jsonl and ``history``."""
    import nemo_opd.eval.report as report
    from nemo_opd.launch.stages import write_results

    drawn = []
    monkeypatch.setattr(report, "results_figure",
                        lambda *a, **k: drawn.append(results_figure(*a, **k)) or drawn[-1])
    _write_run_dir(tmp_path)
    config = {"model": {"student": "/m/Qwen3-0.6B", "teacher": "/m/Qwen3-8B"},
              "quant": {"format": "mxfp4"}, "distill": {"lmbda": 0.5, "beta": 0.25}}
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "meta.json").write_text(
            json.dumps({"step": step, "total_steps": 4, "config": config}))
    history = [{"step": 2, "eval/arith_gen": 0.5, "eval/arith_mc": 0.6},
               {"step": 4, "eval/arith_gen": 0.954, "eval/arith_mc": 0.93}]
    table = write_results(_records(), tmp_path, history=history)
    assert len(table["rows"]) == 5
    fig = drawn[-1]
    assert fig.get_suptitle() == ("Qwen3-0.6B → MXFP4 · 4 steps · λ=0.5 · β=0.25 · "
                                  "teacher Qwen3-8B")
    bars, loss, evals = fig.axes
    assert [len(line.get_xdata()) for line in loss.get_lines()] == [4]
    assert "in-loop evaluation of on-policy QAT (int4)" == evals.get_title()
    assert json.loads((tmp_path / "eval_history.json").read_text()) == history
    assert (tmp_path / "results.png").is_file()
    printed = capsys.readouterr().out
    assert "| teacher | megatron bf16 |" in printed and "teacher (teacher)" not in printed
    # the recipe's RunConfig, when passed, names the run (over the checkpoint's record)
    from types import SimpleNamespace

    cfg = SimpleNamespace(total_steps=200, to_dict=lambda: {
        **config, "model": {"student": "/m/Llama-1B", "teacher": ""},
        "quant": {"format": "int4"}})
    write_results(_records(), tmp_path, history=history, cfg=cfg)
    assert drawn[-1].get_suptitle() == "Llama-1B → INT4 · 200 steps · λ=0.5 · β=0.25"
