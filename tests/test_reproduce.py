"""The seed-reproduction harness: the grid each preset plans, the verdicts the report draws from
per-seed results (synthetic results.json files through the real reader), the recipe's checks,
and the quick preset end to end with fewer steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_opd.experiments.findings import (
    PRESETS,
    Claim,
    check_finding_names,
    plan_runs,
)
from nemo_opd.experiments.report import collect, judge, write_reproduction

ROOT = Path(__file__).resolve().parents[1]


def test_plans_of_the_presets():
    quick = plan_runs(["quantization"], PRESETS["quick"], "/out")
    assert [r.cell for r in quick] == ["int4_lambda0_beta1", "int4_lambda1_beta1"]
    assert quick[0].args[:2] == ("--factory", "tiny")
    assert {"optim.steps=10", "seed=0", "export.enabled=false", "quant.format=int4",
            "distill.lmbda=0.0", "distill.beta=1.0"} <= set(quick[0].args)
    assert quick[0].output_dir == "/out/quantization/int4_lambda0_beta1/seed0"
    full = plan_runs(["quantization"], PRESETS["full"], "/out", ["optim.lr=1e-4"])
    assert len(full) == 2 * 3 * 2 * 3  # formats x λ x β x seeds
    assert len({r.name for r in full}) == len(full)
    assert all(r.args[-1] == "optim.lr=1e-4" for r in full)


def test_size_gap_plan_fills_assets_and_schedule_lengths():
    from nemo_opd.experiments.findings import FINDINGS, asset_root

    runs = plan_runs(["size_gap"], PRESETS["full"], "/out")
    assert len(runs) == 9 * 3  # strategies x seeds
    root = asset_root("chain", "/out")
    assert root.parent == Path("/out/assets") and root.name.startswith("chain-")
    hybrid = next(r for r in runs if r.cell == "hybrid")
    assert {f"model.student={root}/student", f"model.teacher={root}/teacher",
            f"data.train_files=[{root}/train.jsonl]", "quant.format=none", "optim.steps=60",
            "distill.strategy.switch_step=30"} <= set(hybrid.args)
    assert not any("{" in a for r in runs for a in r.args)
    quick = plan_runs(["size_gap"], PRESETS["quick"], "/out")
    assert [r.cell for r in quick] == ["on_policy_gkd", "hybrid"]
    assert "distill.strategy.switch_step=4" in quick[1].args and "optim.steps=8" in quick[1].args
    assert FINDINGS["size_gap"].columns == ("score", "gain", "relative")


def test_gap_plan_shares_finding_2s_runs():
    """Finding 4's smallest-student cells are finding 2's off-policy KD and on_policy_gkd runs:
    planned together they point at the same directories; the larger students get their own
    asset sets."""
    from nemo_opd.experiments.findings import asset_root

    runs = plan_runs(["size_gap", "gap"], PRESETS["full"], "/out")
    by_name = {r.name: r for r in runs}
    assert by_name["gap-2x128_on-seed1"].output_dir == "/out/size_gap/on_policy_gkd/seed1"
    assert by_name["gap-2x128_off-seed0"].output_dir == "/out/size_gap/offpolicy_kd/seed0"
    assert by_name["gap-4x256_on-seed2"].output_dir == "/out/gap/4x256_on/seed2"
    assert f"model.student={asset_root('chain_4x256', '/out')}/student" in \
        by_name["gap-4x256_on-seed2"].args
    assert len({r.output_dir for r in runs}) == 27 + 12
    alone = plan_runs(["gap"], PRESETS["full"], "/out")  # finding 2's runs, asked for or not
    assert alone[0].output_dir == "/out/size_gap/offpolicy_kd/seed0"


def test_quantized_distilled_plan_starts_from_finding_2s_exports():
    runs = plan_runs(["quantized_distilled"], PRESETS["full"], "/out")
    sources = [r for r in runs if r.finding == "size_gap"]
    assert [r.cell for r in sources] == ["on_policy_gkd"] * 3  # added: their finding not asked
    assert all("export.enabled=true" in r.args for r in sources)
    for i, spec in enumerate(runs):
        if spec.finding == "quantized_distilled":
            assert spec.after == f"/out/size_gap/on_policy_gkd/seed{spec.seed}"
            assert spec.after in {r.output_dir for r in runs[:i]}  # its start runs first
            assert f"model.student={spec.after}/export" in spec.args
            assert "quant.format=int4" in spec.args
    assert len(runs) == 3 + 4 * 3
    # asked together with finding 2, the sources are finding 2's own runs, not added again
    both = plan_runs(["size_gap", "quantized_distilled"], PRESETS["full"], "/out")
    assert len(both) == 27 + 12 and len({r.output_dir for r in both}) == 39


def test_sampled_loss_plan():
    runs = {r.cell: r for r in plan_runs(["size_gap", "sampled_loss"], PRESETS["full"], "/out")
            if r.seed == 0}
    assert runs["full_t1"].output_dir == runs["on_policy_gkd"].output_dir  # the same run
    assert {"distill.loss=sampled", "sampling.temperature=0.3"} <= set(runs["sampled_t0.3"].args)
    assert "distill.loss=sampled" not in runs["full_t1"].args


def test_size_gap_verdicts(tmp_path):
    """Synthetic results: on-policy gains 0.3 over a 0.1 start, off-policy strategies fall to
    0.02 (collapse) except mixture (0.2), teacher_seeded equals on_policy_gkd."""
    runs = plan_runs(["size_gap"], PRESETS["full"], str(tmp_path))
    for spec in runs:
        jitter = 0.003 * (spec.seed - 1)
        score = {"offpolicy_kd": 0.02, "hybrid": 0.02, "reverse_curriculum": 0.01,
                 "mixture": 0.2}.get(spec.cell, 0.4) + jitter
        _write_run(spec, score, (score - 0.1) / 0.88, start=0.1)
    report = judge(collect(runs)[0])["size_gap"]
    verdicts = {c["key"]: c["verdict"] for c in report["claims"]}
    assert verdicts == {"2a": "reproduced", "2b offpolicy_kd": "reproduced",
                        "2b hybrid": "reproduced", "2b mixture": "not reproduced",
                        "2b reverse_curriculum": "reproduced", "2c": "not reproduced"}
    assert report["cells"]["on_policy_gkd"]["gain"]["mean"] == pytest.approx(0.3)
    assert report["cells"]["mixture"]["relative"]["mean"] == pytest.approx(2.0)
    md = write_reproduction(judge(collect(runs)[0]), tmp_path / "r", header="# t",
                            title="t")[1].read_text()
    assert "| cell | score | gain over start | score / start |" in md


def _write_task_run(spec, **roles: dict[str, float]) -> None:
    """results.json with per-task values for the roles teacher, ptq (the start) and student."""
    rows = [{"role": role, "numerics": "megatron fp32", "values": values,
             "average": sum(values.values()) / len(values)} for role, values in roles.items()]
    out = Path(spec.output_dir)
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"table": {"rows": rows}}))


def test_self_distill_verdicts_per_eval_task(tmp_path):
    """Synthetic per-task results: self-distillation lifts addition 0.48 -> ~0.90 and leaves
    subtraction within 0.01 of its 0.958; the claims read the two tasks apart."""
    runs = plan_runs(["self_distill"], PRESETS["full"], str(tmp_path))
    assert {r.cell for r in runs} == {"self_distill", "offpolicy_kd"} and len(runs) == 6
    assert "evaluation.local_tasks=[arith_gen=" in " ".join(runs[0].args)
    for spec in runs:
        jitter = 0.004 * (spec.seed - 1)
        arith = (0.90 if spec.cell == "self_distill" else 0.70) + jitter
        _write_task_run(spec, teacher={"arith_gen": 0.994, "sub_gen": 0.002},
                        ptq={"arith_gen": 0.48, "sub_gen": 0.958},
                        student={"arith_gen": arith, "sub_gen": 0.95 - jitter})
    report = judge(collect(runs)[0])["self_distill"]
    verdicts = {c["key"]: c["verdict"] for c in report["claims"]}
    assert verdicts == {"3c behaviour": "reproduced", "3c knowledge": "reproduced"}
    cell = report["cells"]["self_distill"]
    assert cell["gain@arith_gen"]["mean"] == pytest.approx(0.42)
    assert cell["gain@sub_gen"]["mean"] == pytest.approx(-0.008)
    assert cell["teacher@arith_gen"]["mean"] == pytest.approx(0.994)
    assert cell["score"]["mean"] == pytest.approx((0.90 + 0.95) / 2)  # the average, as before
    paths = write_reproduction(judge(collect(runs)[0]), tmp_path / "r", header="# t", title="t")
    assert ("| cell | score (arith_gen) | gain over start (arith_gen) | score (sub_gen) | "
            "gain over start (sub_gen) |") in paths[1].read_text()
    assert paths[2].stat().st_size > 0


def test_asset_sets_built_side_by_side(tmp_path):
    """Two asset sets (finding 2's shipped pair, finding 3c's fine-tuned model) in two worker
    processes: the same roots the plan names, each complete."""
    from nemo_opd.experiments.findings import asset_root, prepare_assets

    roots = prepare_assets(["size_gap", "self_distill"], PRESETS["quick"], str(tmp_path),
                           parallel=2)
    assert roots == [asset_root(name, str(tmp_path)) for name in ("chain", "finetuned")]
    assert all((root / "READY").is_file() for root in roots)
    assert (roots[1] / "sub_gen.jsonl").is_file() and (roots[1] / "student").is_dir()


def test_bad_names():
    with pytest.raises(ValueError, match="did you mean 'quantization'"):
        check_finding_names(["quantisation"])
    with pytest.raises(ValueError, match="no finding given"):
        check_finding_names([])
    with pytest.raises(ValueError, match="compares two cells"):
        Claim("x", "t", "difference", "a")
    with pytest.raises(ValueError, match="unknown metric 'gane@sub_gen'"):
        Claim("x", "t", "change", "a", metric="gane@sub_gen")


def _write_run(spec, score: float, gap: float, start: float = 0.446) -> None:
    out = Path(spec.output_dir)
    out.mkdir(parents=True)
    rows = [{"role": "teacher", "numerics": "megatron fp32", "average": 0.996},
            {"role": "ptq", "numerics": "megatron fake-quant int4 fp32", "average": start},
            {"role": "student", "numerics": "megatron fake-quant int4 fp32", "average": score,
             "gap_recovered": gap},
            {"role": "student", "numerics": "HF dequantised float32", "average": 0.1}]
    (out / "results.json").write_text(json.dumps({"table": {"rows": rows}}))


def test_verdicts_from_per_seed_results(tmp_path):
    runs = plan_runs(["quantization"], PRESETS["full"], str(tmp_path))
    # Synthetic per-seed scores: λ does not matter (1b holds), β=0 wins off-policy by ~0.05
    # (1c at λ=0 holds), β makes no difference on-policy (1c at λ=1 does not), INT4 recovers
    # 0.8-0.9 of its gap (1a holds); one run is missing.
    jitter = {0: -0.002, 1: 0.0, 2: 0.002}
    for spec in runs[:-1]:
        lmbda = float(spec.cell.split("lambda")[1].split("_")[0])
        beta = float(spec.cell.split("beta")[1])
        score = 0.90 + (0.05 if (lmbda == 0 and beta == 0) else 0.0) + jitter[spec.seed]
        _write_run(spec, score, 0.85 + jitter[spec.seed])
    scores, missing = collect(runs)
    assert missing == [runs[-1].name]
    report = judge(scores)["quantization"]
    verdicts = {c["key"]: c["verdict"] for c in report["claims"]}
    assert verdicts["1a int4_lambda1_beta1"] == "reproduced"
    assert verdicts["1b int4 β=1"] == "reproduced"
    assert verdicts["1b int4 β=0"] == "not reproduced"  # β=0 at λ=0 is 0.05 above λ=1
    assert verdicts["1c int4 λ=0"] == "reproduced"
    assert verdicts["1c int4 λ=1"] == "not reproduced"  # no difference beyond the margin
    # the missing run leaves its cell with two seeds: still judged
    assert report["cells"][runs[-1].cell]["score"]["n"] == 2
    paths = write_reproduction(judge(scores), tmp_path / "report", header="# t", title="t")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    md = paths[1].read_text()
    assert "| 1c int4 λ=0: off-policy: forward KL (β=0) beats reverse KL (β=1) |" in md
    assert "0.950 ± 0.005 (n=3)" in md


def _recipe(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "reproduce_seeds.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


class _FakeExperiment:
    """Stands in for ``nemo_run.Experiment``: records the jobs' dependencies and the mode."""

    def __init__(self, title, executor=None):
        self.jobs, self.sequential = [], None

    def __enter__(self):
        _FakeExperiment.last = self
        return self

    def __exit__(self, *exc):
        return False

    def add(self, task, executor=None, name="", dependencies=None):
        self.jobs.append((name, dependencies))
        return name

    def run(self, sequential=False):
        if sequential and any(deps for _, deps in self.jobs):
            raise AssertionError("NeMo-Run refuses dependencies in sequential mode")
        self.sequential = sequential


def test_launch_orders_runs_after_the_runs_they_start_from(monkeypatch):
    import importlib.util

    import nemo_run as run

    spec = importlib.util.spec_from_file_location(
        "reproduce_seeds", Path(__file__).parents[1] / "recipes" / "reproduce_seeds.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setattr(recipe.run, "Experiment", _FakeExperiment)
    runs = plan_runs(["quantized_distilled"], PRESETS["full"], "/out")
    recipe._launch(runs, run.LocalExecutor(), "python", "x.py", "t", 1)
    assert _FakeExperiment.last.sequential is True  # plan order: sources first
    recipe._launch(runs, run.LocalExecutor(), "python", "x.py", "t", 2)
    jobs = dict(_FakeExperiment.last.jobs)
    assert _FakeExperiment.last.sequential is False
    for i, r in enumerate(runs):
        chain = [runs[i - 2].name] if i >= 2 else []
        source = [s.name for s in runs if s.output_dir == r.after]
        assert sorted(jobs[r.name] or []) == sorted(set(chain + source)), r.name


def test_recipe_refuses_bad_input_before_any_run(tmp_path):
    done = _recipe("findings=[quantisation]", f"output_root={tmp_path}", timeout=300)
    assert done.returncode != 0
    assert "unknown finding 'quantisation' (did you mean 'quantization'?)" in done.stderr
    done = _recipe("overrides=[optim.stepz=3]", f"output_root={tmp_path}", timeout=300)
    assert done.returncode != 0 and "optim.stepz" in done.stderr
    done = _recipe("parallel=0", f"output_root={tmp_path}", timeout=300)
    assert done.returncode != 0 and "parallel must be an int >= 1, got 0" in done.stderr
    assert not any(tmp_path.iterdir())


def test_quick_preset_end_to_end(tmp_path):
    """The quick grid of every finding with 3 steps per run and 50 eval problems, two runs at a
    time (the runs after the probe as two chains): the chain and fine-tuned assets copied from
    the shipped models, the run finding 2 and finding 4 share run once, the
    probe's estimate, the table; finding 4b's run starts from the exported student of finding
    2's on_policy_gkd run, which therefore runs before it."""
    overrides = "overrides=[optim.steps=3,optim.warmup_steps=1,evaluation.limit=50]"
    done = _recipe(overrides, f"output_root={tmp_path}", "parallel=2", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the grid (8 runs, 2 at a time) needs" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert {name: set(report["cells"]) for name, report in results.items()} == {
        "quantization": {"int4_lambda0_beta1", "int4_lambda1_beta1"},
        "size_gap": {"on_policy_gkd", "hybrid"}, "sampled_loss": {"sampled_t0.3"},
        "self_distill": {"self_distill"}, "gap": {"2x128_off", "2x128_on"},
        "quantized_distilled": {"own_on"}}
    assert results["gap"]["cells"]["2x128_on"] == results["size_gap"]["cells"]["on_policy_gkd"]
    for report in results.values():
        for cell in report["cells"].values():
            assert cell["score"]["n"] == 1 and 0 <= cell["score"]["mean"] <= 1
        judged = [c for c in report["claims"] if c["verdict"] != "not run"]
        assert all(c["verdict"] == "inconclusive" for c in judged)  # one seed
    assert results["sampled_loss"]["cells"]["sampled_t0.3"]["seconds_per_step"]["mean"] > 0
    for run in ("quantization/int4_lambda1_beta1", "size_gap/hybrid"):
        steps = [json.loads(line)["step"] for line in
                 (tmp_path / run / "seed0/metrics.jsonl").read_text().splitlines()
                 if '"step"' in line]
        assert max(steps) == 3
    # the fine-tuned start is scored on both tasks, from the shipped copy
    start = results["self_distill"]["cells"]["self_distill"]
    assert start["start@arith_gen"]["mean"] < 0.7 and start["start@sub_gen"]["mean"] > 0.9
    # one teacher record for the chain task's runs, one PTQ record per untrained student
    # demo twice (its own eval tasks and asset copy for self_distill), chain, and finding 4b's
    # teacher: the distilled student's full-precision export
    assert len(list((tmp_path / "baselines").glob("eval_teacher-*.json"))) == 4
    export = tmp_path / "size_gap/on_policy_gkd/seed0/export"
    assert (export / "config.json").is_file() and not (export / "hf_quant_config.json").exists()
    distilled = results["quantized_distilled"]["cells"]["own_on"]
    assert distilled["teacher"]["mean"] == results["size_gap"]["cells"]["on_policy_gkd"][
        "score"]["mean"]  # the export scores as the trained student
    # rerun: everything is done, nothing runs again
    again = _recipe(overrides, f"output_root={tmp_path}", "--dryrun", timeout=300)
    assert again.stdout.count("[done]") == 8 and again.stdout.count("[shared]") == 1
