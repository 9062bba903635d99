"""Where a recipe runs: NeMo-Run executors for local torchrun, SLURM (pyxis/enroot) and Docker.

Each executor has a plain builder function (``local_executor``, ``slurm_executor``,
``docker_executor``) that checks its arguments and returns the NeMo-Run executor, and a NeMo-Run
CLI factory (``local``, ``slurm``, ``docker``) returning ``run.Config(<builder>, ...)`` so that
every builder argument is a command-line override and the checks run after the overrides:

    nemo run recipes/onpolicy_qat.py run.executor=slurm run.executor.nodes=2 \\
        run.executor.container_image=/shared/nemo_opd.sqsh run.executor.account=my_acct

All three start the job with torchrun (one process per GPU; ``nproc_per_node`` processes on
CPU). Whether the ranks fit the model's parallel layout is checked by :func:`check_world_fits`,
which the recipe calls with the built executor before anything is submitted.

GPU memory. Each builder takes ``gpu_memory_gib``, the memory of one GPU (H100-80GB: 80 by
default on SLURM and Docker); the recipe's pre-submission check refuses a layout whose memory
plan (:mod:`nemo_opd.launch.memory`) exceeds it, before any weight loads. The check applies
when the executor targets GPUs: SLURM always, Docker unless ``num_gpus=0``, local torchrun when
``nvidia-smi`` reports a GPU (its memory is used) or ``gpu_memory_gib`` is set; ``0`` turns it
off. The figure travels in the job's environment as ``NEMO_OPD_GPU_MEMORY_GIB``
(:func:`executor_gpu_memory_gib` reads it back).

SLURM jobs save checkpoints on the shared filesystem and survive preemption: the batch script is
submitted with ``--requeue``; ``--signal=USR1@<preempt_grace_s>`` makes torchrun forward SIGUSR1
to the workers (``TORCHELASTIC_SIGNALS_TO_HANDLE``) and give them ``preempt_grace_s`` seconds
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) to checkpoint (:mod:`nemo_opd.train.preemption`); the job
then exits non-zero, NeMo-Run's script requeues it (up to ``retries`` times) and the trainer
resumes from the newest checkpoint in the run's checkpoint directory.
"""

import os
import re
import shutil
import subprocess
import sys

import nemo_run as run

from nemo_opd.runtime import ParallelConfig

__all__ = [
    "PREEMPT_SIGNAL",
    "GPU_MEMORY_ENV",
    "local_executor",
    "slurm_executor",
    "docker_executor",
    "executor_world_size",
    "executor_gpu_memory_gib",
    "local_gpu_memory_gib",
    "check_world_fits",
    "local",
    "slurm",
    "docker",
]

PREEMPT_SIGNAL = "SIGUSR1"
"""Signal SLURM sends ``preempt_grace_s`` before the time limit; workers checkpoint on it."""
GPU_MEMORY_ENV = "NEMO_OPD_GPU_MEMORY_GIB"
"""Executor environment variable holding the GPU memory the memory plan is checked against."""

_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
_TORCHRUN_SIGNALS = f"SIGTERM,SIGINT,SIGHUP,SIGQUIT,{PREEMPT_SIGNAL}"


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"executor {name} must be a positive integer, got {value!r}")


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _env(text: str) -> dict[str, str]:
    pairs = [item.partition("=") for item in _split_list(text)]
    bad = [k for k, sep, _ in pairs if not sep or not k]
    if bad:
        raise ValueError(f"executor env_vars must be 'KEY=VALUE,KEY2=VALUE2', got {text!r}")
    return {k: v for k, _, v in pairs}


def _mounts(text: str, field: str) -> list[str]:
    mounts = _split_list(text)
    for mount in mounts:
        parts = mount.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]) or not parts[0].startswith("/"):
            raise ValueError(f"executor {field} entries must be 'HOST_PATH:CONTAINER_PATH[:ro]' "
                             f"with an absolute host path, got {mount!r}")
    return mounts


def _gpu_memory(value: float) -> dict[str, str]:
    """The executor environment entry for ``gpu_memory_gib`` (none when 0: no check)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"executor gpu_memory_gib must be a number of GiB >= 0 (0 = no memory "
                         f"check), got {value!r}")
    return {GPU_MEMORY_ENV: f"{float(value):g}"} if value else {}


def local_gpu_memory_gib() -> float | None:
    """Memory of this machine's first GPU in GiB as ``nvidia-smi`` reports it (no CUDA context
    is created in this process); None without ``nvidia-smi`` or a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0]) / 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def local_executor(nproc_per_node: int = 1, env_vars: str = "",
                   gpu_memory_gib: float = -1.0) -> run.LocalExecutor:
    """torchrun with ``nproc_per_node`` processes on this machine (GPUs when present, else
    CPU ranks over gloo). ``gpu_memory_gib``: -1 = this machine's GPU memory
    (:func:`local_gpu_memory_gib`; no memory check on CPU ranks), 0 = no check, > 0 = check the
    memory plan against it."""
    _positive("nproc_per_node", nproc_per_node)
    if gpu_memory_gib == -1:
        gpu_memory_gib = local_gpu_memory_gib() or 0.0
    # torchrun from this interpreter's environment, also when it is not activated (a plain
    # `.venv/bin/python recipe.py` leaves the venv's bin/ off PATH).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun",
                             env_vars={"OMP_NUM_THREADS": "1", "PATH": path,
                                       **_gpu_memory(gpu_memory_gib), **_env(env_vars)})


def slurm_executor(
    *,
    account: str = "",
    partition: str = "",
    nodes: int = 1,
    gpus_per_node: int = 8,
    time: str = "04:00:00",
    container_image: str = "",
    container_mounts: str = "",
    job_dir: str = "",
    ssh_host: str = "",
    ssh_user: str = "",
    exclusive: bool = True,
    retries: int = 3,
    preempt_grace_s: int = 300,
    rdzv_port: int = 29500,
    packager: str = "git",
    env_vars: str = "",
    gpu_memory_gib: float = 80.0,
) -> run.SlurmExecutor:
    """A multi-node SLURM job in a container through pyxis/enroot, torchrun on every node.

    Args:
        account: ``--account`` (default ``$SBATCH_ACCOUNT``; required).
        partition: ``--partition`` (default ``$SBATCH_PARTITION``; "" = the cluster default).
        nodes: ``--nodes``.
        gpus_per_node: GPUs (= torchrun processes) per node, ``--gpus-per-node``.
        time: ``--time`` limit, ``[D-]HH:MM:SS``.
        container_image: enroot squashfs path or registry image (default ``$NEMO_OPD_CONTAINER``;
            required: the job runs in the container, see containers/README.md).
        container_mounts: comma-separated ``HOST:CONTAINER[:ro]`` mounts; put models, data and
            the run's ``output_dir`` (checkpoints) on the shared filesystem and mount it.
        job_dir: NeMo-Run's experiment directory on the shared filesystem (default
            ``$NEMO_OPD_JOB_DIR``; required): packaged code, configs and logs.
        ssh_host / ssh_user: submit from another machine through SSH; "" = run ``sbatch`` here
            (a login node).
        exclusive: ``--exclusive`` nodes.
        retries: how many times a failed or preempted job is requeued.
        preempt_grace_s: seconds before the time limit at which SIGUSR1 asks the workers to
            checkpoint and stop; torchrun waits this long before killing them.
        rdzv_port: torchrun c10d rendezvous port on the first node.
        packager: "git" ships ``git archive HEAD`` of this checkout (committed code only);
            "none" runs the nemo_opd installed in the container.
        env_vars: extra environment variables for every rank, ``KEY=VALUE,KEY2=VALUE2``.
        gpu_memory_gib: memory of one GPU in GiB (80: H100-80GB; H200: 141); a layout whose
            memory plan exceeds it is refused before submission; 0 = no check.

    List-like arguments are comma-separated strings: NeMo-Run 0.11's command-line parser reads
    ``X | None`` and unquoted list items poorly, and strings pass through it unchanged.
    """
    # Unset arguments fall back to the environment, read now (not at import) so a shell that
    # exports them after starting Python is still honoured.
    account = account or os.environ.get("SBATCH_ACCOUNT", "")
    partition = partition or os.environ.get("SBATCH_PARTITION", "")
    container_image = container_image or os.environ.get("NEMO_OPD_CONTAINER", "")
    job_dir = job_dir or os.environ.get("NEMO_OPD_JOB_DIR", "")
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node),
                        ("rdzv_port", rdzv_port), ("preempt_grace_s", preempt_grace_s)):
        _positive(name, value)
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"executor retries must be an integer >= 0, got {retries!r}")
    if not account:
        raise ValueError("executor account is empty: set run.executor.account=<slurm account> "
                         "(or $SBATCH_ACCOUNT)")
    if not container_image:
        raise ValueError(
            "executor container_image is empty: SLURM jobs run inside a container through "
            "pyxis/enroot; set run.executor.container_image=/shared/path/nemo_opd.sqsh (or "
            "$NEMO_OPD_CONTAINER); containers/README.md shows how to build and import it")
    if not job_dir or not job_dir.startswith("/"):
        raise ValueError(f"executor job_dir must be an absolute path on the shared filesystem "
                         f"(set run.executor.job_dir=... or $NEMO_OPD_JOB_DIR), got {job_dir!r}")
    if not _TIME.match(time):
        raise ValueError(f"executor time must look like [D-]HH:MM:SS, got {time!r}")
    if packager not in ("git", "none"):
        raise ValueError(f"executor packager must be 'git' or 'none', got {packager!r}")
    mounts = _mounts(container_mounts, "container_mounts")
    tunnel = (run.SSHTunnel(host=ssh_host, user=ssh_user, job_dir=job_dir) if ssh_host
              else run.LocalTunnel(job_dir=job_dir))
    return run.SlurmExecutor(
        account=account,
        job_name_prefix="nemo_opd-",
        partition=partition or None,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,  # NeMo-Run turns this into torchrun --nproc-per-node
        gpus_per_node=gpus_per_node,
        time=time,
        exclusive=exclusive or None,
        container_image=container_image,
        container_mounts=mounts,
        tunnel=tunnel,
        packager=run.GitArchivePackager() if packager == "git" else run.Packager(),
        launcher=run.Torchrun(rdzv_port=rdzv_port),
        retries=retries,
        signal=f"{PREEMPT_SIGNAL.removeprefix('SIG')}@{preempt_grace_s}",
        additional_parameters={"requeue": True},
        env_vars={
            "TORCHELASTIC_SIGNALS_TO_HANDLE": _TORCHRUN_SIGNALS,
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(preempt_grace_s),
            "NEMO_OPD_PREEMPT_SIGNAL": PREEMPT_SIGNAL,
            **_gpu_memory(gpu_memory_gib),
            **_env(env_vars),
        },
    )


def docker_executor(
    *,
    container_image: str = "",
    nproc_per_node: int = 1,
    num_gpus: int = -1,
    volumes: str = "",
    shm_size: str = "16g",
    packager: str = "git",
    env_vars: str = "",
    gpu_memory_gib: float = 80.0,
) -> run.DockerExecutor:
    """torchrun inside a local Docker container (NVIDIA runtime; ``num_gpus=-1`` = all GPUs,
    0 = CPU only); ``volumes``, ``env_vars`` and ``gpu_memory_gib`` (not checked with
    ``num_gpus=0``) as in :func:`slurm_executor`."""
    _positive("nproc_per_node", nproc_per_node)
    container_image = container_image or os.environ.get("NEMO_OPD_CONTAINER", "")
    if not container_image:
        raise ValueError("executor container_image is empty: set run.executor.container_image="
                         "<image, e.g. nemo_opd:latest built from containers/Dockerfile>")
    if not isinstance(num_gpus, int) or num_gpus < -1:
        raise ValueError(f"executor num_gpus must be -1 (all), 0 or a positive integer, "
                         f"got {num_gpus!r}")
    if packager not in ("git", "none"):
        raise ValueError(f"executor packager must be 'git' or 'none', got {packager!r}")
    mounts = _mounts(volumes, "volumes")
    memory = _gpu_memory(gpu_memory_gib)
    return run.DockerExecutor(
        container_image=container_image,
        ntasks_per_node=nproc_per_node,
        num_gpus=num_gpus if num_gpus else None,
        runtime="nvidia" if num_gpus else None,
        ipc_mode="host",
        shm_size=shm_size,
        ulimits=["memlock:-1", "stack:67108864"],
        volumes=mounts,
        packager=run.GitArchivePackager() if packager == "git" else run.Packager(),
        launcher="torchrun",
        env_vars={**(memory if num_gpus else {}), **_env(env_vars)},
    )


def executor_world_size(executor: run.Executor | None) -> int:
    """Ranks the job will have: nodes × processes per node (1 with no executor: in-process)."""
    if executor is None:
        return 1
    return executor.nnodes() * executor.nproc_per_node()


def executor_gpu_memory_gib(executor: run.Executor | None) -> float | None:
    """GPU memory in GiB the job's memory plan must fit, or None when the job runs on CPU ranks
    or the check is off: the executor's ``gpu_memory_gib``; for an in-process run (no
    executor), this machine's GPU (:func:`local_gpu_memory_gib`)."""
    if executor is None:
        return local_gpu_memory_gib()
    value = float(executor.env_vars.get(GPU_MEMORY_ENV) or 0)
    return value or None


def check_world_fits(executor: run.Executor | None, parallel: ParallelConfig) -> int:
    """Raise ``ValueError`` unless the executor's ranks are a multiple of TP × PP; returns the
    world size. Called before submission, so a layout that cannot start never queues."""
    world = executor_world_size(executor)
    if world % parallel.model_parallel_size:
        where = ("in-process run (no run.executor)" if executor is None
                 else f"{executor.nnodes()} node(s) x {executor.nproc_per_node()} process(es) "
                      f"per node")
        raise ValueError(
            f"{where} = {world} rank(s) is not a multiple of tensor_model_parallel_size "
            f"({parallel.tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({parallel.pipeline_model_parallel_size}) = {parallel.model_parallel_size}; "
            + ("add run.executor=local run.executor.nproc_per_node="
               f"{parallel.model_parallel_size}" if executor is None
               else "change the node / GPU counts or the parallel sizes"))
    return world


# NeMo-Run CLI factories: `run.executor=<name>`; their builder's arguments become
# `run.executor.<arg>=...` overrides, and the builder's checks run once they are applied.
# (No `from __future__ import annotations` in this module: NeMo-Run 0.11 parses those
# overrides by the builders' annotations and cannot read string annotations.)

@run.cli.factory(target=run.Executor, name="local")
def local() -> run.Config[run.LocalExecutor]:
    """torchrun on this machine (``run.executor.nproc_per_node=N``)."""
    return run.Config(local_executor)


@run.cli.factory(target=run.Executor, name="slurm")
def slurm() -> run.Config[run.SlurmExecutor]:
    """A SLURM job in a container (``run.executor.nodes=2 run.executor.gpus_per_node=8 ...``)."""
    return run.Config(slurm_executor)


@run.cli.factory(target=run.Executor, name="docker")
def docker() -> run.Config[run.DockerExecutor]:
    """torchrun in a local Docker container (``run.executor.container_image=...``)."""
    return run.Config(docker_executor)
