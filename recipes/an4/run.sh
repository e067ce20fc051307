#!/usr/bin/env bash
# Teacher, student and KD student on CMU AN4 in ../shared/data/an4 (real speech); see run.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { make .venv/.installed >/dev/null; PY=.venv/bin/python; }
exec "$PY" recipes/an4/run.py "$@"
