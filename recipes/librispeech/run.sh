#!/usr/bin/env bash
# LibriSpeech: manifests -> shards -> BPE -> teacher, student, KD student -> dev/test WER;
# see run.py (stages, GPU presets). CI runs it as `run.sh --tiny` on a tree built from AN4.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { make .venv/.installed >/dev/null; PY=.venv/bin/python; }
exec "$PY" recipes/librispeech/run.py "$@"
