"""`nemo run recipes/onpolicy_qat.py` end to end on CPU, as a subprocess: the built-in demo
(shipped tiny teacher, its local tasks) with a few steps and 40 documents per task, at TP=1
in-process (teacher, PTQ, 3 distillation steps, student, export and the export's evaluation),
the same job started again as a requeued SLURM job would be (baselines reused, training already
done, the student evaluated from its checkpoint), and at TP=2 through the local torchrun
executor (2 gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    return {"root": root, "demo_dir": root / "demo_assets"}


def _nemo_run(job: dict[str, Path], output_dir: Path, *extra: str,
              returncode: int = 0) -> subprocess.CompletedProcess:
    """The default (built-in demo) recipe with a few steps and 40 documents per task; its exit
    status must be ``returncode``."""
    args = [str(BIN / "nemo"), "run", "recipes/onpolicy_qat.py", "optim.steps=3",
            "optim.micro_batch_size=8", "evaluation.limit=40",
            f"demo_dir={job['demo_dir']}", f"output_dir={output_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMORUN_HOME": str(job["root"] / "home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(args, cwd=ROOT, env=env, text=True, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == returncode, proc.stdout[-4000:]
    return proc


ROWS = ["teacher", "PTQ int4", "on-policy QAT (int4)", "export int4 (HF dequantised)"]


def _rows(output_dir: Path) -> dict[str, dict]:
    table = json.loads((output_dir / "results.json").read_text())["table"]
    return {row["run"]: row for row in table["rows"]}


@pytest.fixture(scope="module")
def tp1(job) -> Path:
    out = job["root"] / "tp1"
    job["tp1_console"] = _nemo_run(job, out).stdout
    return out


def test_console_of_a_run_in_a_log_file(job, tp1):
    """stdout and stderr are a pipe here, as in a SLURM log: no carriage returns, no
    third-party warning, one line per stage, and at most 40 lines in all."""
    console = job["tp1_console"]
    lines = console.splitlines()
    assert "\r" not in console and "Warning" not in console, console
    assert len(lines) <= 40, console
    stages = [line.split("nemo_opd: ", 1)[1] for line in lines if "nemo_opd: [" in line]
    names = ["teacher eval", "PTQ eval", "distill", "student eval", "export", "export eval",
             "table"]
    assert [s.split(" ...")[0] for s in stages[::2]] == [f"[{i}/7] {n}"
                                                        for i, n in enumerate(names, 1)]
    assert all(" done in " in s for s in stages[1::2])
    assert [line.split("nemo_opd: ")[1].split()[1] for line in lines
            if "nemo_opd: step " in line] == ["1/3", "2/3", "3/3"]
    assert "Dry run for task" not in console  # NeMo-Run's table: --dryrun/--verbose only


def test_tp1_end_to_end_writes_every_row(job, tp1):
    report = json.loads((tp1 / "results.json").read_text())
    rows = _rows(tp1)
    assert list(rows) == ROWS
    assert [r["role"] for r in rows.values()] == ["teacher", "ptq", "student", "student"]
    for record in report["records"]:  # every task, 40 documents each
        assert {k: v["n"] for k, v in record["tasks"].items()} == {"arith_gen": 40,
                                                                   "arith_mc": 40}
    assert rows["export int4 (HF dequantised)"]["numerics"] == "HF dequantised float32"
    steps = [json.loads(line) for line in (tp1 / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]
    quant_config = json.loads((tp1 / "export" / "hf_quant_config.json").read_text())
    assert quant_config["quantization"]["quant_algo"]
    assert (tp1 / "results.md").read_text().startswith("| Run |")
    # The demo's premise, on the rows the recipe wrote: a good teacher, a PTQ student far
    # below it (the demo's own tests pin the numbers).
    assert rows["teacher"]["average"] > 0.9 > rows["PTQ int4"]["average"] + 0.2


def test_teacher_row_matches_lm_eval_on_the_hf_model(job, tp1):
    """Peer check of the recipe's teacher row: lm-eval's own HF model on the demo teacher."""
    from nemo_opd.demo import prepare_demo
    from nemo_opd.eval.evaluate import evaluate_model
    from nemo_opd.eval.exported import hf_lm

    assets = prepare_demo(job["demo_dir"])  # cached by the run: file checks only
    lm = hf_lm(assets.teacher_dir, dtype="float32", batch_size=8)
    reference = evaluate_model(lm, (), local_tasks=assets.eval_tasks, limit=40)
    assert _rows(tp1)["teacher"]["values"] == pytest.approx(
        {k: v["value"] for k, v in reference["tasks"].items()})


def test_requeued_job_reuses_baselines_and_its_final_checkpoint(job, tp1):
    """Started again on the same output_dir with resume on (the real-model presets' default;
    the tiny one starts over), as SLURM's requeue does: no step trains, the
    teacher/PTQ records are reused, and the student row comes from the final checkpoint with
    the values the first attempt measured in memory."""
    before = _rows(tp1)
    proc = _nemo_run(job, tp1, "export.enabled=false", "checkpoint.resume=true")
    assert proc.stdout.count("reusing") == 2
    history = json.loads((tp1 / "eval_history.json").read_text())
    assert history == []  # the second attempt ran no training step, so no in-loop evaluation
    rows = _rows(tp1)
    assert list(rows) == ["teacher", "PTQ int4", "on-policy QAT (int4)"]
    for run in rows:
        assert rows[run]["values"] == before[run]["values"]
    steps = [json.loads(line) for line in (tp1 / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]  # no step was appended


def test_divergent_learning_rate_stops_before_saving_the_collapse(job, tp1):
    """optim.lr=1e6 (the demo collapses from its second step on): the job exits non-zero naming
    the step and the quantity, and the newest checkpoint is the one saved before it."""
    import re
    import shutil

    out = job["root"] / "diverged"
    out.mkdir()
    for name in ("eval_teacher.json", "eval_ptq.json"):  # same baselines: reused, not re-run
        shutil.copy2(tp1 / name, out / name)
    proc = _nemo_run(job, out, "optim.steps=8", "optim.lr=1e6", "optim.min_lr=1e6",
                     "optim.warmup_steps=0", "optim.grad_clip=0", "checkpoint.save_every=1",
                     "export.enabled=false", returncode=1)
    stop = re.search(r"training stopped at step (\d+): (.*?); nothing was saved", proc.stdout)
    assert stop, proc.stdout[-4000:]
    assert re.search(r"loss|forward_kl|reverse_kl|gradient norm|non-finite", stop.group(2))
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved[-1] == f"step_{int(stop.group(1)):08d}", (saved, stop.group(0))
    assert not (out / "results.json").exists()


@pytest.mark.multirank
def test_tp2_through_the_local_torchrun_executor(job, tp1):
    out = job["root"] / "tp2"
    _nemo_run(job, out, "run.executor=local", "run.executor.nproc_per_node=2",
              "model.student_parallel.tensor_model_parallel_size=2",
              "model.teacher_parallel.tensor_model_parallel_size=2")
    rows, reference = _rows(out), _rows(tp1)
    # The export is restored whole (TP=1) from the final checkpoint on both ranks.
    assert list(rows) == ROWS
    for run in ("teacher", "PTQ int4"):  # deterministic evaluations: TP=2 equals TP=1
        assert rows[run]["values"] == pytest.approx(reference[run]["values"])
    student, export = rows["on-policy QAT (int4)"], rows["export int4 (HF dequantised)"]
    assert export["values"] == pytest.approx(student["values"], abs=0.05)


@pytest.mark.multirank
def test_pp2_off_policy_through_the_local_torchrun_executor(job, tp1):
    """PP=2 (λ=0: rollouts need PP=1): baselines and student evaluated as whole models on each
    rank, the student from its final checkpoint, and exported from it."""
    out = job["root"] / "pp2"
    _nemo_run(job, out, "run.executor=local", "run.executor.nproc_per_node=2",
              "model.student_parallel.pipeline_model_parallel_size=2",
              "model.teacher_parallel.pipeline_model_parallel_size=2", "distill.lmbda=0.0",
              "distill.beta=0.0")
    rows, reference = _rows(out), _rows(tp1)
    assert list(rows) == ROWS
    for run in ("teacher", "PTQ int4"):  # the same whole models as at TP=PP=1
        assert rows[run]["values"] == pytest.approx(reference[run]["values"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["on_policy_fraction"] for s in steps if "loss" in s] == [0.0, 0.0, 0.0]
    student, export = rows["on-policy QAT (int4)"], rows["export int4 (HF dequantised)"]
    assert export["values"] == pytest.approx(student["values"], abs=0.05)
