#!/usr/bin/env bash
# Create a separate virtual environment with NeMo for the peer comparison in nemo_compare.py.
#
# NeMo is NOT a dependency of asrkd; it lives in its own venv so that it cannot perturb ours.
# torch is pinned in the SAME pip command so that pip resolves the CPU wheel instead of pulling
# a CUDA build of torch as a NeMo dependency.
#
# Usage: benchmarks/install_nemo.sh [VENV_DIR]      (default: $NEMO_VENV or /tmp/nemo-venv)
set -euo pipefail

VENV_DIR="${1:-${NEMO_VENV:-/tmp/nemo-venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
NEMO_VERSION="${NEMO_VERSION:-3.0.0}"

if [ ! -x "${VENV_DIR}/bin/python" ]; then
    "${PYTHON}" -m venv "${VENV_DIR}"
fi
"${VENV_DIR}/bin/python" -m pip install --upgrade pip
"${VENV_DIR}/bin/python" -m pip install \
    "torch==${TORCH_VERSION}" "nemo-toolkit[asr]==${NEMO_VERSION}"
"${VENV_DIR}/bin/python" -c \
    "from nemo.collections.asr.modules import ConformerEncoder; print('nemo import ok')"
echo "NeMo venv ready: ${VENV_DIR}"
