"""The commands exactly as users type them, as subprocesses: `nemo run recipes/onpolicy_qat.py
--help`, an unknown key and a layout that does not fit the GPUs rejected before anything runs,
`slurm/submit.sh --dryrun` writing the 2 × 8 sbatch, and the sweep's dry run. The processes
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
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    base = {**os.environ, "OMP_NUM_THREADS": "1", "NEMORUN_HOME": str(tmp / "home"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env={**base, **env}, text=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
             for name, (cmd, env) in _commands(tmp).items()}
    out = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")
    out["tmp"] = tmp
    return out


def test_help_lists_presets_and_every_field(results):
    help_run = results["help"]
    assert help_run.returncode == 0, help_run.stdout[-3000:]
    text = help_run.stdout
    assert "Presets (--factory NAME): llama31_8b_mxfp4, qwen3_4b_int4, tiny (default)" in text
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
