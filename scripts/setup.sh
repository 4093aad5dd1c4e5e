#!/usr/bin/env bash
# Installs what coatnet needs on a fresh machine: the CPU build of torch, the package with its
# test extras, and Debian's Fashion-MNIST (the built-in default dataset). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0  # the CPU wheel; see README "Dependencies"
fi
"$PY" -m pip install -q -e '.[dev]'
if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null
  else
    sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
  fi
fi
