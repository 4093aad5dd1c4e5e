#!/usr/bin/env bash
# coatnet's prepared GPU check: one `run` call of the device tool, at most 8 minutes on one H100/H200.
#
#   scripts/gpu_check.sh --prepare     # here, once: Fashion-MNIST into .fmnist/, wheels into .whl/ (both git-ignored)
#   scripts/gpu_check.sh [ARGS...]     # there: every part of scripts/gpu_check.py, results under $OUT
#
# The device call (docs/performance.md):  run(command="scripts/gpu_check.sh", carry=[".fmnist", ".whl"], timeout_s=540)
# The machine has torch, timm, torchvision, onnx and onnxruntime but no network: kornia (RandAugment of the main
# job) and webdataset travel as wheels, the Fashion-MNIST files as .fmnist/. ARGS go to scripts/gpu_check.py
# (e.g. --budget 300, --parts env,parity, --main-args '--epochs 3').
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    exclude="$(git rev-parse --git-path info/exclude)"
    for path in /.fmnist/ /.whl/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"; done
    mkdir -p .fmnist .whl
    cp "${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz .fmnist/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl kornia==0.9.0 kornia_rs==0.2.0 webdataset==1.0.2 braceexpand==0.1.7
    du -sh .fmnist .whl
    exit 0
fi

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
source scripts/device_env.sh  # the carried wheels on PYTHONPATH; DATA=(--data-dir .fmnist)
{ nvidia-smi -L 2>&1; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'; } \
    | tee -a "$OUT/gpu_check.log"
# The script keeps to its --budget (450 s by default); the outer limit only guards against a hang in between.
timeout -k 10 480 python3 scripts/gpu_check.py --out "$OUT" "${DATA[@]}" "$@"
status=$?
[ $status -eq 124 ] && [ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"  # stopped from outside: what was done
exit $status
