#!/usr/bin/env bash
# Submit recipes/onpolicy_qat.py as one multi-node SLURM job (pyxis/enroot container, torchrun on
# every node), from a login node. `slurm/submit.sh --dryrun` only writes the sbatch script
# (./onpolicy_qat.sbatch, or $NEMO_OPD_SBATCH_OUT) and submits nothing.
#
#   export SBATCH_ACCOUNT=my_account SBATCH_PARTITION=batch
#   export NEMO_OPD_CONTAINER=/shared/containers/nemo_opd.sqsh   # containers/README.md
#   export NEMO_OPD_SHARED=/lustre/$USER                          # shared filesystem, mounted as is
#   NODES=2 GPUS_PER_NODE=8 slurm/submit.sh model.student=/lustre/models/Qwen3-4B \
#       data.train_files=[/lustre/data/prompts.jsonl] [more key=value overrides] [--dryrun]
#
# Every variable below has a default; any recipe override or run.executor.* argument can follow.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NEMO_OPD_SHARED:?set NEMO_OPD_SHARED to a directory on the shared filesystem}"
PRESET=${PRESET:-qwen3_4b_int4}
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TIME=${TIME:-04:00:00}
RUN_NAME=${RUN_NAME:-${PRESET}_${NODES}x${GPUS_PER_NODE}}
export NEMO_OPD_JOB_DIR=${NEMO_OPD_JOB_DIR:-$NEMO_OPD_SHARED/nemo_opd/jobs}
NEMO=${NEMO:-nemo}

# Checkpoints, metrics and results live in output_dir on the shared filesystem: a requeued job
# (preemption, time limit, node failure) resumes from the newest checkpoint there.
exec "$NEMO" run recipes/onpolicy_qat.py --factory "$PRESET" --name "$RUN_NAME" \
  run.executor=slurm \
  run.executor.nodes="$NODES" \
  run.executor.gpus_per_node="$GPUS_PER_NODE" \
  run.executor.time="$TIME" \
  run.executor.container_mounts="$NEMO_OPD_SHARED:$NEMO_OPD_SHARED" \
  output_dir="$NEMO_OPD_SHARED/nemo_opd/runs/$RUN_NAME" \
  "$@"
