#!/usr/bin/env bash
# The GPU smoke run of issue 11 (tests/test_gpu_smoke.py), plus the other GPU-only checks
# (tests/test_cuda.py): Transformer Engine specs, bf16 with fp32 master weights in megatron's
# distributed optimizer, quantize -> rollout -> steps -> save -> resume -> export. One GPU,
# under 5 minutes. Run it inside an NGC container (megatron-core, ModelOpt, Transformer Engine
# present) with nemo_opd installed, e.g. `pip install --no-deps -e .`; record results in
# docs/gpu.md. The CPU suite never needs it (everything here skips without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: the GPU smoke run needs one")'
exec "$PYTHON" -m pytest -q -rs tests/test_gpu_smoke.py tests/test_cuda.py "$@"
