#!/usr/bin/env bash
# Teacher, student and KD student on speechocean762 in ../shared/data/speechocean762 (real speech); see run.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { make .venv/.installed >/dev/null; PY=.venv/bin/python; }
exec "$PY" recipes/speechocean762/run.py "$@"
