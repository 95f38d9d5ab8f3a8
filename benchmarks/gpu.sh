#!/usr/bin/env bash
# ACCORD step cost and throughput on a CUDA machine, in one table (< 8 minutes on one modern GPU):
# SD1.5-shaped UNet (random weights, no download) at 512 px in bf16, batch 8; the loader at 512 px;
# samples/s of the whole trainer loop. Results: $OUT/gpu_results.json and $OUT/gpu_table.md.
#
#   benchmarks/gpu.sh [OUT]              # default OUT = outputs/benchmarks-gpu
#   benchmarks/gpu.sh --dry-run [OUT]    # CPU, tiny UNet at 64 px: checks the script (the tests run this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); shift; fi
OUT="${1:-outputs/benchmarks-gpu}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [ ${#DRY[@]} -eq 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "benchmarks/gpu.sh: nvidia-smi failed: no CUDA machine? (use --dry-run on CPU)" >&2; exit 2; }
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi
exec "$PY" -m benchmarks.gpu "${DRY[@]}" --out "$OUT"
