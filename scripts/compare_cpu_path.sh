#!/usr/bin/env bash
# The CPU training path before and after a change, interleaved on one machine (issue 23: "the CPU path stays as
# fast as today or faster"). Run it on an idle machine; it takes about 10 minutes on 2 cores.
#
#   scripts/compare_cpu_path.sh [BEFORE_COMMIT] [ROUNDS]     # default: b38a910 (before issue 23), 3 rounds
#
# Each round trains, in both trees one after the other, (1) the default recipe on Fashion-MNIST (in memory,
# 4,096 images, one epoch) and (2) coatnet_nano on a generated folder of 512 JPEGs at 64 px with the paper
# recipe's augmentation and 2 DataLoader workers, for two epochs (the second shows the workers that persist).
# It prints each run's training img/s (the "img/s" of every epoch line); compare the medians per row.
set -eu
cd "$(dirname "$0")/.."
BEFORE=${1:-b38a910}
ROUNDS=${2:-3}
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/before" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add --detach "$WORK/before" "$BEFORE" >/dev/null
PYTHONPATH="$PWD/src" python3 -c "from coatnet.pipeline_bench import write_jpeg_folder; write_jpeg_folder('$WORK/jpegs', 512)"
COMMON=(--precision fp32 --threads 2 --no-progress --seed 0)
for round in $(seq "$ROUNDS"); do
    for tree in "$WORK/before" "$PWD"; do
        name=$([ "$tree" = "$PWD" ] && echo after || echo before)
        fm=$(PYTHONPATH="$tree/src" python3 -m coatnet train "${COMMON[@]}" --train-subset 4096 --val-subset 500 \
            --epochs 1 2>/dev/null | grep -o '[0-9]* img/s' | tr '\n' ' ')
        jp=$(PYTHONPATH="$tree/src" python3 -m coatnet train "${COMMON[@]}" --data "$WORK/jpegs" --model coatnet_nano \
            --img-size 64 --batch-size 32 --epochs 2 --workers 2 --randaugment 2 15 --mixup 0.8 \
            --drop-path 0.2 --val-fraction 0.1 2>/dev/null | grep -o '[0-9]* img/s' | tr '\n' ' ')
        echo "round $round $name: fashion-mnist ${fm}| jpeg folder (epochs 1, 2) ${jp}"
    done
done
