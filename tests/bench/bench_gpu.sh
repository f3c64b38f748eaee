#!/usr/bin/env bash
# The GPU benchmark in one command: 3B-size random weights on CUDA, one table, within 8 minutes.
#     tests/bench/bench_gpu.sh            (PYTHON=/path/to/python to pick the interpreter)
# Fails at once, saying why, on a machine without CUDA.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench_gpu.sh: no CUDA device here (torch.cuda.is_available() is False); it needs one" >&2
    exit 2
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout 480 "$PY" tests/bench/bench_gpu.py "$@"
