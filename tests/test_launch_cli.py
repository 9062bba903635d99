"""The commands exactly as users type them, as subprocesses: `nemo run recipes/onpolicy_qat.py
--help`, an unknown key and a layout that does not fit the GPUs rejected before anything runs,
`slurm/submit.sh --dryrun` writing the 2 × 8 sbatch and the size-distillation presets' 1 × 8
sbatch (their memory plans printed), and the sweep's dry run. The processes
start together (each spends most of its time importing); each test reads its own result."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = "recipes/onpolicy_qat.py"
CONFIGS = ROOT / "docs/model_configs"
# The size-distillation presets on one node of 8 × H100-80GB, with the models' config.json
# copies (docs/model_configs) standing in for /models so the memory plan runs: the plan's
# title and the peak the preset's docstring states.
SIZE_PRESETS = {
    "qwen3_4b_from_qwen3_30b_a3b": (
        "Qwen3-4B", "Qwen3-30B-A3B",
        "student TP=4 PP=1 DP=2, teacher TP=2 PP=1 EP=1; 4 rows x 788 tokens", "52.3"),
    "llama31_8b_from_llama33_70b": (
        "Llama-3.1-8B-Instruct", "Llama-3.3-70B-Instruct",
        "student TP=2 PP=1 DP=4, teacher TP=8 PP=1; 4 rows x 768 tokens", "72.6"),
}


def _commands(tmp: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    nemo = str(BIN / "nemo")
    slurm_env = {"SBATCH_ACCOUNT": "acct", "SBATCH_PARTITION": "batch",
                 "NEMO_OPD_CONTAINER": "/shared/containers/nemo_opd.sqsh",
                 "NEMO_OPD_SHARED": "/lustre/u", "NEMO_OPD_JOB_DIR": str(tmp / "jobs"),
                 "NEMO_OPD_SBATCH_OUT": str(tmp / "job.sbatch"), "NEMO": nemo}
    return {
        "help": ([nemo, "run", RECIPE, "--help"], {}),
        "bad_key": ([nemo, "run", RECIPE, "distill.bta=0.5", f"output_dir={tmp}/never"], {}),
        "sbatch": (["bash", "slurm/submit.sh", "--dryrun", "model.student=/lustre/u/Qwen3-4B",
                    "data.train_files=[/lustre/u/prompts.jsonl]"], slurm_env),
        "gpus_do_not_divide": (["bash", "slurm/submit.sh", "--dryrun"],
                               {**slurm_env, "PRESET": "llama31_8b_mxfp4", "NODES": "1",
                                "GPUS_PER_NODE": "3"}),
        "sweep": ([nemo, "run", "recipes/sweep.py", "--dryrun", "lmbdas=[0,1]", "betas=[0,1]",
                   "lrs=[1e-5]", "overrides=[optim.steps=3,optim.warmup_steps=0]",
                   f"output_root={tmp}/sweep"], {}),
        "sweep_factory": ([nemo, "run", "recipes/sweep.py", "--factory", "qwen3_4b_int4",
                           "--dryrun", "lrs=[5e-6,1e-5]", "lmbdas=[1]", "betas=[1]",
                           f"output_root={tmp}/sweep_qwen"], {}),
        # Without --dryrun or --yes: a SLURM job asks first (the answer, "n", is piped in).
        "slurm_asks": (["bash", "slurm/submit.sh", "model.student=/lustre/u/Qwen3-4B",
                        "data.train_files=[/lustre/u/prompts.jsonl]"], slurm_env),
        # A local run starts without asking (stdin is closed): it fails in the task, on the
        # missing model, after the point where a confirmation would have been asked.
        "local_starts": ([nemo, "run", RECIPE, f"model.student={tmp}/no_model",
                          f"output_dir={tmp}/local"], {}),
        "to_yaml": ([nemo, "run", RECIPE, "--to-yaml", str(tmp / "cfg.yaml"),
                     "distill.beta=0.5", "data.train_files=[a.jsonl,b.jsonl]"], {}),
        **{preset: (["bash", "slurm/submit.sh", "--dryrun", f"model.student={CONFIGS / student}",
                     f"model.teacher={CONFIGS / teacher}"],
                    {**slurm_env, "PRESET": preset, "NODES": "1",
                     "NEMORUN_HOME": str(tmp / preset / "home"),
                     "NEMO_OPD_SBATCH_OUT": str(tmp / preset / "job.sbatch")})
           for preset, (student, teacher, _, _) in SIZE_PRESETS.items()},
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    base = {**os.environ, "OMP_NUM_THREADS": "1", "NEMORUN_HOME": str(tmp / "home"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for preset in SIZE_PRESETS:
        (tmp / preset).mkdir()
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env={**base, **env}, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
             for name, (cmd, env) in _commands(tmp).items()}
    out = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate("n\n" if name == "slurm_asks" else "", timeout=600)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")
    # --to-yaml -> edit -> --yaml: the edited file is what runs (overrides still apply on top).
    config = tmp / "cfg.yaml"
    edited = config.read_text().replace("  steps: 40\n", "  steps: 7\n")
    assert edited != config.read_text()
    config.write_text(edited)
    out["yaml"] = subprocess.run(
        [str(BIN / "nemo"), "run", RECIPE, "--yaml", str(config), "--dryrun", "optim.lr*=2"],
        cwd=ROOT, env=base, text=True, stdin=subprocess.DEVNULL, capture_output=True)
    out["tmp"] = tmp
    return out


def test_help_lists_presets_and_every_field(results):
    help_run = results["help"]
    assert help_run.returncode == 0, help_run.stdout[-3000:]
    text = help_run.stdout
    assert ("Presets (--factory NAME): llama31_8b_from_llama33_70b, llama31_8b_mxfp4, "
            "qwen3_4b_from_qwen3_30b_a3b, qwen3_4b_int4, tiny (default)") in text
    for line in ("distill.beta = 1.0", "quant.format = 'int4'", "optim.lr = 0.0001",
                 "model.student_parallel.tensor_model_parallel_size = 1",
                 "evaluation.tasks = ()", "export.dtype = 'bfloat16'", "seed = 1234"):
        assert f"  {line}" in text, line
    assert "Generalized-JSD interpolation: 0 forward KL" in text  # the field's docstring
    assert re.search(r"^  slurm: account, partition, nodes, gpus_per_node, time, container_image",
                     text, re.M)


def test_bad_key_fails_before_anything_runs(results):
    bad_key = results["bad_key"]
    assert bad_key.returncode == 1
    assert ("Error: unknown override key 'distill.bta'; did you mean distill.beta"
            in bad_key.stdout)
    assert not (results["tmp"] / "never").exists()


def test_submit_dryrun_writes_the_two_node_sbatch(results):
    run = results["sbatch"]
    assert run.returncode == 0, run.stdout[-3000:]
    script = (results["tmp"] / "job.sbatch").read_text()
    assert f"sbatch script written to {results['tmp'] / 'job.sbatch'}" in run.stdout
    flags = set(re.findall(r"^#SBATCH (\S+)$", script, re.M))
    assert {"--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--account=acct",
            "--partition=batch", "--requeue", "--signal=USR1@300",
            "--job-name=nemo_opd-qwen3_4b_int4_2x8"} <= flags
    srun = next(line for line in script.splitlines()
                if line.startswith("srun ") and "torchrun" in line)
    assert "--container-image /shared/containers/nemo_opd.sqsh" in srun
    assert re.search(r"--container-mounts /lustre/u:/lustre/u,\S+:/nemo_run ", srun)
    assert re.search(r"torchrun --rdzv-backend c10d --rdzv-endpoint \$head_node_ip:29500 "
                     r"--rdzv-id \d+ --nnodes 2 --nproc-per-node 8 --node-rank \$SLURM_NODEID",
                     srun)
    # The config the job will run: the preset plus the overrides, output on the shared FS.
    config = next((results["tmp"] / "home").rglob("*_config.yaml")).read_text()
    assert "/lustre/u/nemo_opd/runs/qwen3_4b_int4_2x8" in config
    assert "/lustre/u/Qwen3-4B" in config and "/lustre/u/prompts.jsonl" in config


@pytest.mark.parametrize("preset", sorted(SIZE_PRESETS))
def test_size_distillation_presets_dryrun_one_h100_node(results, preset):
    """`PRESET=<preset> NODES=1 slurm/submit.sh --dryrun`: the memory plan passes on 8 GPUs of
    80 GiB (the figure of the preset's docstring) and a valid one-node sbatch is written, its
    job running the preset's teacher, strategy and GSM8K evaluation."""
    student, teacher, layout, peak = SIZE_PRESETS[preset]
    run = results[preset]
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"Memory per GPU, the only pipeline stage: {layout}" in run.stdout
    assert re.search(rf"= {peak} GiB per GPU\nGPU memory 80\.0 GiB: fits, \d+\.\d GiB to spare",
                     run.stdout), run.stdout[-3000:]
    script = (results["tmp"] / preset / "job.sbatch").read_text()
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash
    flags = set(re.findall(r"^#SBATCH (\S+)$", script, re.M))
    assert {"--nodes=1", "--gpus-per-node=8", "--ntasks-per-node=1", "--account=acct",
            "--partition=batch", "--requeue", "--exclusive", "--signal=USR1@300",
            f"--job-name=nemo_opd-{preset}_1x8"} <= flags
    srun = next(line for line in script.splitlines()
                if line.startswith("srun ") and "torchrun" in line)
    # One node: NeMo-Run's torchrun rendezvous stays on the node.
    assert re.search(r"torchrun --rdzv-backend c10d --rdzv-endpoint localhost:0 --rdzv-id \d+ "
                     r"--nnodes 1 --nproc-per-node 8 --node-rank 0 ", srun)
    assert "--container-image /shared/containers/nemo_opd.sqsh" in srun
    config = next((results["tmp"] / preset / "home").rglob("*_config.yaml")).read_text()
    assert f"/lustre/u/nemo_opd/runs/{preset}_1x8" in config
    assert f"teacher: {CONFIGS / teacher}" in config and "- gsm8k" in config
    assert "loss: topk" in config
    strategy = "teacher_seeded" if "qwen" in preset else "on_policy_gkd"
    assert re.search(rf"strategy:\n(    .*\n)*    name: {strategy}\n", config)


def test_slurm_layout_that_does_not_fit_is_refused_before_submission(results):
    gpus = results["gpus_do_not_divide"]
    assert gpus.returncode == 1
    assert ("1 node(s) x 3 process(es) per node = 3 rank(s) is not a multiple of "
            "tensor_model_parallel_size (2) x pipeline_model_parallel_size (1) = 2"
            in gpus.stdout)


def test_sweep_dryrun_lists_every_grid_point(results):
    run = results["sweep"]
    assert run.returncode == 0, run.stdout[-3000:]
    root = results["tmp"] / "sweep"
    lines = [line for line in run.stdout.splitlines() if re.match(r"^lmbda\S+: ", line)]
    assert [line.split(":")[0] for line in lines] == [
        "lmbda0_beta0_lr1e-05", "lmbda0_beta1_lr1e-05", "lmbda1_beta0_lr1e-05",
        "lmbda1_beta1_lr1e-05"]
    interpreter, recipe = lines[0].split()[1:3]
    assert Path(interpreter).parent == BIN and recipe == str(ROOT / RECIPE)
    assert ("distill.lmbda=0.0 distill.beta=0.0 optim.lr=1e-05 "
            f"output_dir={root}/lmbda0_beta0_lr1e-05 optim.steps=3 optim.warmup_steps=0"
            in lines[0])
    assert not root.exists()  # a dry run starts nothing
    assert len(run.stdout.splitlines()) <= len(lines) + 2  # one line per run (+ NeMo-Run's)


def test_sweep_factory_names_a_recipe_preset(results):
    run = results["sweep_factory"]
    assert run.returncode == 0, run.stdout[-3000:]
    lines = [line for line in run.stdout.splitlines() if re.match(r"^lmbda\S+: ", line)]
    assert [line.split(":")[0] for line in lines] == ["lmbda1_beta1_lr5e-06",
                                                      "lmbda1_beta1_lr1e-05"]
    assert all("--factory qwen3_4b_int4 " in line for line in lines)


def test_remote_executor_asks_for_confirmation(results):
    run = results["slurm_asks"]
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Continue? [y/N]:" in run.stdout and "Exiting..." in run.stdout
    assert "Launching" not in run.stdout and "sbatch script written" not in run.stdout


def test_local_run_starts_without_asking(results):
    run = results["local_starts"]
    assert run.returncode == 1
    assert "Continue?" not in run.stdout
    assert "Launching onpolicy_qat" in run.stdout
    assert "no_model': no Hugging Face model there" in run.stdout, run.stdout[-3000:]


def test_yaml_round_trip(results):
    """`--to-yaml` writes the resolved config; the edited file runs with `--yaml` (NeMo-Run's
    own flags), and overrides and operators apply on top of it."""
    assert results["to_yaml"].returncode == 0, results["to_yaml"].stdout[-3000:]
    run = results["yaml"]
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    table = re.sub(r"[│ ]+", " ", run.stdout)
    assert " steps=7," in table and " lr=0.0002," in table and " beta=0.5," in table
    assert "train_files=('a.jsonl', 'b.jsonl')" in table.replace(" ", "").replace(",'", ", '")
