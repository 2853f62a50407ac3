#!/usr/bin/env bash
# The main job on a fresh machine: install, then bring the local stack up (`loraloop up`).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/install.sh "${LORALOOP_EXTRAS:-cpu,dev,ray}"
exec "${PYTHON:-python3}" -m services.cli up "$@"
