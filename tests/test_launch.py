"""The launch layer in-process: override parsing against the config dataclasses, every RunConfig
field overridable, presets, executors and their pre-submission checks, the 2 × 8 SLURM sbatch,
the `nemo run` verb's recipe lookup, the `nemo_opd` command, and the container files."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import math
import re
import subprocess
import sys
import typing
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest

from nemo_opd.config import RunConfig
from nemo_opd.launch.executors import (
    check_world_fits,
    docker_executor,
    local_executor,
    slurm_executor,
)
from nemo_opd.launch.plans import DEMO, EvalPlan
from nemo_opd.launch.recipe import (
    RecipeError,
    apply_overrides,
    built_arguments,
    override_fields,
    presets,
    render_sbatch,
    resolve_preset,
)
from nemo_opd.launch.verb import resolve_recipe
from nemo_opd.runtime import ParallelConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
    """recipes/onpolicy_qat.py as a module (its `__main__` block does not run)."""
    spec = importlib.util.spec_from_file_location("onpolicy_qat", ROOT / "recipes/onpolicy_qat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # fiddle serializes functions by importable module name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _leaf_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf field of a dataclass tree, from the dataclass definitions."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            keys |= _leaf_keys(kind, f"{prefix}{field.name}.")
        else:
            keys.add(f"{prefix}{field.name}")
    return keys


# ------------------------------------------------------------------------- values and overrides

@pytest.mark.parametrize(("text", "expected"), [
    ("[arc_easy,gsm8k]", ("arc_easy", "gsm8k")), ("['arc_easy', 'gsm8k']", ("arc_easy", "gsm8k")),
    ("(seed,)", ("seed",)), ("seed", ("seed",)), ("[]", ()),
])
def test_tuple_values_in_the_forms_users_type(recipe, text, expected):
    """NeMo-Run has no tuple parser; ours (registered with its type parser) takes lists with or
    without quotes and a bare item."""
    task = recipe.tiny()
    apply_overrides(task, [f"evaluation.tasks={text}"])
    assert built_arguments(task)["evaluation"].tasks == expected


def test_nemo_run_operators_and_optional_values(recipe):
    """NeMo-Run's own operators work on the config tree, and ``X | None`` fields take None."""
    task = recipe.tiny()
    apply_overrides(task, ["optim.lr*=2", "optim.steps+=2", "sampling.seed=7",
                           "evaluation.limit=None", "evaluation.num_fewshot=3"])
    args, tiny = built_arguments(task), built_arguments(recipe.tiny())
    assert args["optim"].lr == 2 * tiny["optim"].lr
    assert args["optim"].steps == tiny["optim"].steps + 2
    assert args["sampling"].seed == 7 and args["evaluation"].limit is None
    assert args["evaluation"].num_fewshot == 3


def test_overrides_build_the_same_config_as_the_dataclasses(recipe):
    task = recipe.tiny()
    apply_overrides(task, [
        "distill.beta=0.5", "quant.format=mxfp4", "optim.steps=3", "optim.warmup_steps=0",
        "data.train_files=[a.jsonl,b.jsonl]", "distill.strategy.name=hybrid",
        "model.student_parallel.tensor_model_parallel_size=2", "distill.loss=topk",
        "sampling.seed=null", "evaluation.limit=0.5", "output_dir=/tmp/out"])
    args = built_arguments(task)
    tiny = built_arguments(recipe.tiny())
    # The reference: the same values set directly on the dataclasses the preset holds.
    assert args["distill"] == dataclasses.replace(
        tiny["distill"], beta=0.5, loss="topk",
        strategy=dataclasses.replace(tiny["distill"].strategy, name="hybrid"))
    assert args["quant"] == dataclasses.replace(tiny["quant"], format="mxfp4")
    assert args["optim"] == dataclasses.replace(tiny["optim"], steps=3, warmup_steps=0)
    assert args["data"].train_files == ("a.jsonl", "b.jsonl")
    assert args["model"].student_parallel == ParallelConfig(tensor_model_parallel_size=2)
    assert args["sampling"].seed is None and args["evaluation"].limit == 0.5
    assert args["output_dir"] == "/tmp/out"
    unchanged = ("checkpoint", "logging", "export", "seed", "eval_every")
    assert {k: args[k] for k in unchanged} == {k: tiny[k] for k in unchanged}


def test_every_run_config_field_is_overridable(recipe):
    """The recipe takes every RunConfig field, and each leaf is a listed override key."""
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert run_fields <= set(recipe.onpolicy_qat.__code__.co_varnames)
    keys = {f.key for f in override_fields(recipe.tiny())}
    assert _leaf_keys(RunConfig) <= keys
    assert _leaf_keys(EvalPlan, "evaluation.") <= keys


@pytest.mark.parametrize(("arg", "message"), [
    ("distill.bta=0.5", r"unknown override key 'distill.bta'; did you mean distill\.beta"),
    ("quant.formt=int4", r"did you mean quant\.format"),
    ("beta=0.5", r"unknown override key 'beta'; did you mean .*distill\.beta"),
    ("model.student_parallel=2", r"unknown override key 'model.student_parallel'"),
    ("distill.beta", r"overrides look like key=value"),
    ("optim.steps=many", r"optim\.steps=many: Invalid integer literal"),
    ("optim.lr=fast", r"optim\.lr=fast: Could not convert string to float"),
])
def test_bad_overrides(recipe, arg, message):
    with pytest.raises(RecipeError, match=message):
        apply_overrides(recipe.tiny(), [arg])


def test_presets_and_unknown_preset(recipe):
    names = set(presets(recipe.onpolicy_qat))
    assert names == {"tiny", "qwen3_4b_int4", "llama31_8b_mxfp4", "qwen3_4b_from_qwen3_30b_a3b",
                     "llama31_8b_from_llama33_70b"}
    with pytest.raises(RecipeError, match=r"unknown preset 'qwen3_4b_int8'; did you mean "
                                          r"qwen3_4b_int4"):
        resolve_preset(recipe.onpolicy_qat, "qwen3_4b_int8", recipe.tiny)
    for name in names:  # every preset builds into a valid RunConfig
        args = built_arguments(resolve_preset(recipe.onpolicy_qat, name, recipe.tiny))
        model = args["model"]
        recipe.check(args, None if name == "tiny" else local_executor(math.lcm(
            model.student_parallel.model_parallel_size,
            model.teacher_parallel.model_parallel_size)))
    tiny = built_arguments(recipe.tiny())
    assert tiny["model"].student == DEMO and tiny["data"].train_files == (DEMO,)
    llama = built_arguments(recipe.llama31_8b_mxfp4())
    assert llama["quant"].format == "mxfp4" and llama["model"].student_dtype == "bfloat16"


def _run_config(args: dict) -> RunConfig:
    return RunConfig(**{f.name: args[f.name] for f in dataclasses.fields(RunConfig)})


def test_size_distillation_presets_build_valid_run_configs(recipe):
    """The two size-distillation presets: a larger bf16 teacher on its own layout, the top-k
    loss, GSM8K; Qwen3-30B-A3B teacher-seeded with seed 004's schedule, Llama-3.3-70B on-policy
    GKD from a teacher TP larger than the student's (which rules teacher_seeded out)."""
    qwen = built_arguments(recipe.qwen3_4b_from_qwen3_30b_a3b())
    cfg = _run_config(qwen)
    assert (cfg.model.student, cfg.model.teacher) == ("/models/Qwen3-4B-Instruct-2507",
                                                      "/models/Qwen3-30B-A3B-Instruct-2507")
    assert not cfg.model.self_distillation
    assert (cfg.model.student_parallel, cfg.model.teacher_parallel) == (
        ParallelConfig(tensor_model_parallel_size=4), ParallelConfig(tensor_model_parallel_size=2))
    assert (cfg.model.student_dtype, cfg.model.teacher_dtype) == ("bfloat16", "bfloat16")
    assert cfg.quant.format == "int4" and cfg.distill.loss == "topk"
    strategy = cfg.distill.strategy
    assert (strategy.name, strategy.seed_tokens, strategy.seed_decay_steps) == (
        "teacher_seeded", 20, 50)
    assert qwen["evaluation"] == EvalPlan(tasks=("gsm8k",), limit=None)

    llama = built_arguments(recipe.llama31_8b_from_llama33_70b())
    cfg = _run_config(llama)
    assert (cfg.model.student, cfg.model.teacher) == ("/models/Llama-3.1-8B-Instruct",
                                                      "/models/Llama-3.3-70B-Instruct")
    assert (cfg.model.student_parallel, cfg.model.teacher_parallel) == (
        ParallelConfig(tensor_model_parallel_size=2), ParallelConfig(tensor_model_parallel_size=8))
    assert cfg.model.teacher_dtype == "bfloat16" and cfg.quant.format == "mxfp4"
    assert (cfg.distill.strategy.name, cfg.distill.lmbda, cfg.distill.loss) == (
        "on_policy_gkd", 1.0, "topk")
    assert cfg.needs_rollouts and llama["evaluation"].tasks == ("gsm8k",)
    # Overrides reach the new presets like any other: teacher_seeded is refused at this layout.
    task = recipe.llama31_8b_from_llama33_70b()
    apply_overrides(task, ["distill.strategy.name=teacher_seeded"])
    with pytest.raises(ValueError, match=r"'teacher_seeded' needs teacher TP \(8\) <= student "
                                         r"TP \(2\)"):
        recipe.check(built_arguments(task), local_executor(8))


def test_check_validates_the_whole_config(recipe):
    task = recipe.tiny()
    apply_overrides(task, ["model.student_parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ValueError, match="needs the teacher's layout"):  # RunConfig's own check
        recipe.check(built_arguments(task), local_executor(2))
    apply_overrides(task, ["model.teacher_parallel.tensor_model_parallel_size=2"])
    recipe.check(built_arguments(task), local_executor(2))
    with pytest.raises(ValueError, match=r"in-process run .* = 1 rank\(s\) .* = 2; add "
                                         r"run.executor=local run.executor.nproc_per_node=2"):
        recipe.check(built_arguments(task), None)
    bad = recipe.tiny()
    apply_overrides(bad, ["distill.beta=1.5"])
    with pytest.raises(ValueError, match=r"DistillConfig.beta must be a number in \[0, 1\], "
                                         r"got 1.5"):
        built_arguments(bad)


# ------------------------------------------------------------------------------------ executors

@pytest.mark.parametrize(("nodes", "gpus", "tp", "pp"), [
    (2, 8, 2, 1), (2, 8, 4, 4), (1, 8, 3, 1), (2, 3, 2, 1), (1, 1, 1, 1), (2, 4, 8, 1),
    (3, 2, 2, 3),
])
def test_check_world_fits_matches_parallel_config(tmp_path, nodes, gpus, tp, pp):
    executor = slurm_executor(account="a", nodes=nodes, gpus_per_node=gpus,
                              container_image="/c.sqsh", job_dir=str(tmp_path))
    parallel = ParallelConfig(tp, pp)
    try:  # reference: megatron's own rule, world size divisible by TP x PP
        parallel.data_parallel_size(nodes * gpus)
        fits = True
    except ValueError:
        fits = False
    if fits:
        assert check_world_fits(executor, parallel) == nodes * gpus
    else:
        with pytest.raises(ValueError, match=rf"{nodes} node\(s\) x {gpus} process\(es\) per "
                                             rf"node = {nodes * gpus} rank\(s\) is not a "
                                             rf"multiple of .*= {tp * pp}"):
            check_world_fits(executor, parallel)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"container_image": ""}, "container_image is empty: SLURM jobs run inside a container"),
    ({"account": ""}, "account is empty"),
    ({"nodes": 0}, "nodes must be a positive integer, got 0"),
    ({"gpus_per_node": -8}, "gpus_per_node must be a positive integer"),
    ({"time": "4 hours"}, r"time must look like \[D-\]HH:MM:SS"),
    ({"container_mounts": "relative:/x"}, "HOST_PATH:CONTAINER_PATH"),
    ({"job_dir": "jobs"}, "job_dir must be an absolute path"),
    ({"packager": "zip"}, "packager must be 'git' or 'none'"),
    ({"env_vars": "NOVALUE"}, "KEY=VALUE"),
])
def test_slurm_executor_bad_input(monkeypatch, kwargs, message):
    for var in ("SBATCH_ACCOUNT", "NEMO_OPD_CONTAINER", "NEMO_OPD_JOB_DIR"):
        monkeypatch.delenv(var, raising=False)
    good = {"account": "acct", "container_image": "/c.sqsh", "job_dir": "/shared/jobs"}
    with pytest.raises(ValueError, match=message):
        slurm_executor(**{**good, **kwargs})


def test_executors_environment_defaults_and_docker(monkeypatch):
    monkeypatch.setenv("SBATCH_ACCOUNT", "env_acct")
    monkeypatch.setenv("NEMO_OPD_CONTAINER", "/env/c.sqsh")
    monkeypatch.setenv("NEMO_OPD_JOB_DIR", "/env/jobs")
    executor = slurm_executor()
    assert (executor.account, executor.container_image, executor.tunnel.job_dir) == (
        "env_acct", "/env/c.sqsh", "/env/jobs")
    docker = docker_executor(nproc_per_node=2, volumes="/data:/data:ro")
    assert docker.container_image == "/env/c.sqsh" and docker.volumes == ["/data:/data:ro"]
    assert docker.nproc_per_node() == 2 and docker.runtime == "nvidia"
    local = local_executor(3)
    assert local.nproc_per_node() == 3 and local.launcher == "torchrun"
    monkeypatch.delenv("NEMO_OPD_CONTAINER")
    with pytest.raises(ValueError, match="container_image is empty"):
        docker_executor()


def test_executor_factories_resolve_by_name():
    """`run.executor=<name>` resolves through NeMo-Run's factory registry to our builders."""
    from nemo_run.cli.cli_parser import parse_cli_args, parse_factory

    config = parse_factory(run.cli.RunContext, "executor", run.Executor, "slurm")
    parse_cli_args(config, ["nodes=2", "gpus_per_node=8", "account=acct",
                            "container_image=/c.sqsh", "job_dir=/shared/jobs"])
    executor = fdl.build(config)
    assert isinstance(executor, run.SlurmExecutor)
    assert (executor.nnodes(), executor.nproc_per_node()) == (2, 8)
    assert isinstance(fdl.build(parse_factory(run.cli.RunContext, "executor", run.Executor,
                                              "local")), run.LocalExecutor)


def test_sbatch_for_two_nodes_of_eight_gpus(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "home"))
    # NeMo-Run's local tunnel runs shell commands through `invoke`, which reads stdin; pytest's
    # captured stdin raises on read.
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    task = recipe.qwen3_4b_int4()
    executor = slurm_executor(
        account="acct", partition="batch", nodes=2, gpus_per_node=8, time="02:00:00",
        container_image="/shared/containers/nemo_opd.sqsh", packager="none",
        container_mounts="/lustre/u:/lustre/u,/models:/models:ro", job_dir="/shared/jobs")
    check_world_fits(executor, built_arguments(task)["model"].student_parallel)
    script, experiment_dir = render_sbatch(task, executor, "qat2x8")
    config = next(experiment_dir.rglob("qat2x8_config.yaml")).read_text()
    assert "_target_: onpolicy_qat.onpolicy_qat" in config and "/models/Qwen3-4B" in config
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash
    flags = set(re.findall(r"^#SBATCH (\S+)$", script, re.M))
    assert {"--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--account=acct",
            "--partition=batch", "--time=02:00:00", "--requeue", "--exclusive",
            "--signal=USR1@300"} <= flags
    sruns = [line for line in script.splitlines() if line.startswith("srun ") and "torchrun" in
             line]
    assert len(sruns) == 1
    srun = sruns[0]
    assert "--container-image /shared/containers/nemo_opd.sqsh" in srun
    mounts = re.search(r"--container-mounts (\S+)", srun)[1].split(",")
    assert mounts[:2] == ["/lustre/u:/lustre/u", "/models:/models:ro"]
    assert mounts[2].startswith("/shared/jobs/") and mounts[2].endswith(":/nemo_run")
    torchrun = srun[srun.index("torchrun"):].split()
    expected = {"--nnodes": "2", "--nproc-per-node": "8", "--node-rank": "$SLURM_NODEID",
                "--rdzv-backend": "c10d", "--rdzv-endpoint": "$head_node_ip:29500"}
    assert {k: torchrun[torchrun.index(k) + 1] for k in expected} == expected
    assert "-m nemo_run.core.runners.fdl_runner" in srun
    assert "export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "TORCHX_MAX_RETRIES=3" in script


# ----------------------------------------------------------------------- verb, command, files

def test_resolve_recipe(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "onpolicy_qat.py").write_text("")
    (tmp_path / "mine.py").write_text("")
    assert resolve_recipe("recipes/onpolicy_qat.py", tmp_path) == \
        tmp_path / "recipes/onpolicy_qat.py"
    assert resolve_recipe("onpolicy_qat", tmp_path) == tmp_path / "recipes/onpolicy_qat.py"
    assert resolve_recipe(str(tmp_path / "mine.py"), tmp_path) == tmp_path / "mine.py"
    with pytest.raises(FileNotFoundError, match=r"no recipe file 'onpolicy_qta' \(did you mean "
                                                r"onpolicy_qat\?\)\. Recipes in .*onpolicy_qat"):
        resolve_recipe("onpolicy_qta", tmp_path)


def test_nemo_opd_command_dispatch(capsys):
    from nemo_opd.cli import main

    assert main(["evl"]) == 2
    assert "unknown subcommand 'evl' (did you mean eval?)" in capsys.readouterr().err
    assert main([]) == 2 and main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse's --help of nemo_opd.eval.cli
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    assert "--tasks" in capsys.readouterr().out
    assert main(["run", "no_such_recipe"]) == 2
    assert "no recipe file 'no_such_recipe'" in capsys.readouterr().err


def test_entry_points_are_registered():
    """`nemo run` needs the nemo_run.cli entry point; `nemo_opd` the console script."""
    from importlib.metadata import entry_points

    verbs = {ep.name: ep.value for ep in entry_points(group="nemo_run.cli")}
    assert verbs.get("run") == "nemo_opd.launch.verb"
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("nemo_opd") == "nemo_opd.cli:main"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.trtllm"])
def test_dockerfiles_reference_existing_files(dockerfile):
    text = (ROOT / "containers" / dockerfile).read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)[1]
    assert base.startswith("nvcr.io/nvidia/") and re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"{dockerfile} copies missing {source}"
    # torch is the image's: installed with NEMO_OPD_TORCH=skip and compared after the install.
    assert "NEMO_OPD_TORCH=skip" in text and "--system-site-packages" in text
    assert "diff /tmp/torch_before /tmp/torch_after" in text
    assert 'TORCH_SPEC" != "skip"' in (ROOT / "scripts/bootstrap.sh").read_text()
    ignore = (ROOT / "containers" / f"{dockerfile}.dockerignore").read_text().split()
    assert ".venv" in ignore


def test_enroot_import_script_arguments(tmp_path):
    script = ROOT / "containers" / "enroot_import.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    wrong = subprocess.run(["bash", str(script), "only_one"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr
    suffix = subprocess.run(["bash", str(script), "img", str(tmp_path / "x.tar")],
                            capture_output=True, text=True)
    assert suffix.returncode == 2 and "must end in .sqsh" in suffix.stderr


def test_sweep_checks_every_point_before_running():
    spec = importlib.util.spec_from_file_location("sweep_recipe", ROOT / "recipes/sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    points = sweep.grid((0.0, 1.0), (0.5,), (1e-5, 2e-5))
    assert [p.name for p in points] == ["lmbda0_beta0.5_lr1e-05", "lmbda0_beta0.5_lr2e-05",
                                        "lmbda1_beta0.5_lr1e-05", "lmbda1_beta0.5_lr2e-05"]
    assert sweep.point_args(points[0], "tiny", ("optim.steps=3",), "/r") == [
        "--factory", "tiny", "distill.lmbda=0.0", "distill.beta=0.5", "optim.lr=1e-05",
        "output_dir=/r/lmbda0_beta0.5_lr1e-05", "optim.steps=3"]
    with pytest.raises(ValueError, match="sweep betas is empty"):
        sweep.grid((0.0,), (), ())
    good = {"preset": "tiny", "lmbdas": (0.0, 1.0), "betas": (0.0,), "lrs": (),
            "overrides": ("optim.steps=3", "optim.warmup_steps=0")}
    sweep.check(good, None)
    with pytest.raises(ValueError, match=r"DistillConfig.lmbda must be a number in \[0, 1\], "
                                         r"got 2.0"):
        sweep.check({**good, "lmbdas": (0.0, 2.0)}, None)
    with pytest.raises(RecipeError, match="unknown preset 'tiney'; did you mean tiny"):
        sweep.check({**good, "preset": "tiney"}, None)
    with pytest.raises(RecipeError, match="unknown override key 'optim.step'"):
        sweep.check({**good, "overrides": ("optim.step=3",)}, None)
