#!/usr/bin/env bash
# From a fresh checkout: build .venv (as CI does), start the local cluster (Redis, gateway, a
# GPU-queue worker and a CPU worker; tiny random-weight models unless HEARTCLUSTER_MODEL_DIR is
# set), render one song through it end to end, print the job id and the audio file, stop.
# Extra arguments go to `heartcluster demo` (e.g. --tags rock --duration 20).
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/setup-venv
exec .venv/bin/heartcluster demo "$@"
