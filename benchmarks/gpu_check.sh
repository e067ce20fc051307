#!/usr/bin/env bash
# GPU check (docs/scale.md): train the LibriSpeech presets for a few hundred bf16 steps on one
# CUDA GPU, print throughput and peak memory, record them in BENCHMARKS.md. Run it only where
# a GPU is present (an accelerator is lent to some sessions only): it stops with a message
# otherwise. Usage: bash benchmarks/gpu_check.sh [--steps 200]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch here; nothing measured" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu_check.py --markdown BENCHMARKS.md "$@"
