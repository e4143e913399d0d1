#!/usr/bin/env bash
# The GPU run (docs/testing.md, "The GPU run"): every check that needs CUDA in at most 10 minutes, into one folder.
#   scripts/gpu_check.sh [OUT]               on a machine with a GPU; OUT defaults to $OUT, else gpu-check-out/
#   scripts/gpu_check.sh --cpu [OUT]         the same steps at tiny sizes on the CPU (about 40 s on 2 cores)
#   scripts/gpu_check.sh --wheels DIR [OUT]  first install the wheels in DIR (offline, for this run only)
# The steps, their limits and the summary are scripts/gpu_check.py's; this wrapper picks the Python: $PYTHON, else
# the repository's .venv, else python3 (on a GPU image, the one that holds torch).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  py="$ROOT/.venv/bin/python"
else
  py=python3
fi
exec "$py" "$ROOT/scripts/gpu_check.py" "$@"
