#!/usr/bin/env bash
# The prepared GPU check (bench/device_check.py), on one CUDA GPU node, in under 8 minutes:
# the cuda-marked tests, `stabench perf` at 16M/57M/109M/221M (16 x 2048 tokens, V = 50,304, bf16),
# and packed vs unpacked 16M trials at K = 4, 8, 16. Writes results/perf/gpu-<device>.json and .md.
#
#   scripts/device-check.sh [WHEELS_DIR]     run from anywhere; the project is this script's checkout
#
# The node needs a Python with a CUDA build of torch (>= 2.4). The project's other requirements
# (pydantic, optuna, ...) are installed from WHEELS_DIR when given (no network needed: make the
# folder on a machine with PyPI access with `scripts/device-wheels.sh WHEELS_DIR`), else from the
# package index. Extra arguments go to `stabench device-check` via $DEVICE_CHECK_ARGS
# (e.g. DEVICE_CHECK_ARGS="--budget-s 300").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "device-check: torch sees no CUDA device here")'
if [ -n "${1:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/stabench-site "$1"/*.whl
    export PYTHONPATH="/tmp/stabench-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    "$PY" -m pip install -q -e . 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.cli device-check --device cuda --out results/perf ${DEVICE_CHECK_ARGS:-}
