#!/usr/bin/env bash
# Every GPU check of the performance issue in one call (a few minutes on one GPU):
#   the GPU tests (sync-free env step under torch.cuda.set_sync_debug_mode("error"), stage 1 with bf16 +
#   activation checkpointing + accumulation + channels_last, PPO on cuda), `python -m gfenv.bench --device cuda`
#   with the peak-memory figure of GFNet's ResNet-50 P=96 T=5 batch-256 stage-1 step, and the CPU bench beside it.
# Usage on a GPU machine, from the repository root:  bash benchmarks/gpu_checks.sh OUT_DIR
# Needs torch + torchvision with CUDA, gymnasium, stable-baselines3, sb3-contrib, pytest (a `pip install -e ".[dev]"`);
# wheels in .whl/ (if present) are installed into /tmp/site first, for machines without an index.
set -uo pipefail
OUT="${1:-${OUT:-runs/gpu_checks}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
PY="${PYTHON:-python3}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, torchvision, gymnasium, stable_baselines3 as s; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'gymnasium', gymnasium.__version__, 'sb3', s.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/versions.txt"
status=0
"$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -W ignore::UserWarning 2>&1 | tee "$OUT/gpu_tests.log" || status=1
"$PY" -m gfenv.bench --device cuda --memory --profile --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log" || status=1
"$PY" -m gfenv.bench --device cpu --threads 2 --skip sb3_ppo --profile --json "$OUT/bench_cpu2.json" 2>&1 | tee "$OUT/bench_cpu2.log" || status=1
echo "gpu_checks exit status $status" | tee -a "$OUT/versions.txt"
exit $status
