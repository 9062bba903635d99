"""`nemo run recipes/onpolicy_qat.py` end to end on CPU, as a subprocess, on a tiny model with
local evaluation tasks and a few steps: at TP=1 in-process (teacher, PTQ, 2 distillation steps,
student, export and the export's evaluation), the same job started again as a requeued SLURM job
would be (baselines reused, training already done, the student evaluated from its checkpoint),
and at TP=2 through the local torchrun executor (2 gloo ranks)."""

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
def job(tmp_path_factory, tiny_quant_model_dir) -> dict[str, Path]:
    """A tiny HF model (hidden 256: INT4 block 128 fits at TP=2), prompts and two local tasks."""
    root = tmp_path_factory.mktemp("recipe")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"what is {i} plus {i + 1}?",
                                         "response": f" {2 * i + 1}"}) + "\n" for i in range(16)))
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps({"query": f"what is {i} plus 2?",
                                      "choices": [f" {i + 2}", f" {i + 3}", f" {i + 5}"],
                                      "gold": i % 3}) + "\n" for i in range(6)))
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": f"what is {i} plus 1?",
                                       "answer": str(i + 1)}) + "\n" for i in range(4)))
    return {"root": root, "model": Path(tiny_quant_model_dir), "train": train, "mc": mc,
            "gen": gen}


def _nemo_run(job: dict[str, Path], output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        str(BIN / "nemo"), "run", "recipes/onpolicy_qat.py",
        f"model.student={job['model']}", "model.teacher=", f"data.train_files=[{job['train']}]",
        "data.chat_template=false", "evaluation.tasks=[]",
        f"evaluation.local_tasks=[mc={job['mc']},gen={job['gen']}]", "evaluation.batch_size=4",
        "optim.steps=2", "optim.warmup_steps=0", "optim.micro_batch_size=2",
        "sampling.max_new_tokens=4", "quant.calibration_batches=1",
        "logging.progress_bar=false", "logging.tensorboard=false", f"output_dir={output_dir}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMORUN_HOME": str(job["root"] / "home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(args, cwd=ROOT, env=env, text=True, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def _rows(output_dir: Path) -> dict[str, dict]:
    table = json.loads((output_dir / "results.json").read_text())["table"]
    return {row["run"]: row for row in table["rows"]}


@pytest.fixture(scope="module")
def tp1(job) -> Path:
    out = job["root"] / "tp1"
    _nemo_run(job, out)
    return out


def test_tp1_end_to_end_writes_every_row(job, tp1):
    report = json.loads((tp1 / "results.json").read_text())
    rows = _rows(tp1)
    assert list(rows) == ["teacher", "PTQ int4", "on-policy QAT (int4)",
                          "export int4 (HF dequantised)"]
    assert [r["role"] for r in rows.values()] == ["teacher", "ptq", "student", "student"]
    for record in report["records"]:  # every task, every document
        assert {k: v["n"] for k, v in record["tasks"].items()} == {"mc": 6, "gen": 4}
    assert rows["export int4 (HF dequantised)"]["numerics"] == "HF dequantised float32"
    steps = [json.loads(line) for line in (tp1 / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    quant_config = json.loads((tp1 / "export" / "hf_quant_config.json").read_text())
    assert quant_config["quantization"]["quant_algo"]
    assert (tp1 / "results.md").read_text().startswith("| Run |")


def test_teacher_row_matches_lm_eval_on_the_hf_model(job, tp1):
    """Peer check of the recipe's teacher row: lm-eval's own HF model on the same directory."""
    from nemo_opd.eval.evaluate import evaluate_model
    from nemo_opd.eval.exported import hf_lm

    lm = hf_lm(job["model"], dtype="float32", batch_size=4)
    reference = evaluate_model(lm, (), local_tasks={"mc": job["mc"], "gen": job["gen"]})
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
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]  # no extra step was appended


@pytest.mark.multirank
def test_tp2_through_the_local_torchrun_executor(job, tp1):
    out = job["root"] / "tp2"
    _nemo_run(job, out, "run.executor=local", "run.executor.nproc_per_node=2",
              "model.student_parallel.tensor_model_parallel_size=2",
              "model.teacher_parallel.tensor_model_parallel_size=2")
    rows, reference = _rows(out), _rows(tp1)
    assert list(rows) == ["teacher", "PTQ int4", "on-policy QAT (int4)"]  # export needs TP=1
    for run in ("teacher", "PTQ int4"):  # deterministic evaluations: TP=2 equals TP=1
        assert rows[run]["values"] == pytest.approx(reference[run]["values"])
