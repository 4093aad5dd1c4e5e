#!/usr/bin/env bash
# The prepared call for a session lent a GPU (issues 22 item 9, 23 item 4): one `run` of the device tool.
#
#   scripts/gpu_check.sh --prepare          # here, once: Fashion-MNIST into .fmnist/, wheels into .whl/
#   scripts/gpu_session.sh [--tiny]         # there (or here with --tiny, on the CPU, in about two minutes)
#
# The device call:  run(command="scripts/gpu_session.sh", carry=[".fmnist", ".whl"], timeout_s=590)
#
# 1. scripts/gpu_check.py's CHECK_PARTS (default env, parity and speed_eager: ours against timm, bf16 training and
#    inference steps), alone on the GPU, within CHECK_BUDGET seconds; the input pipeline's checks are
#    CHECK_PARTS=env,sync_debug,pipeline,parity,speed_eager CHECK_BUDGET=360 (less time for the campaign);
# 2. the study campaign: every row of `coatnet study all` not yet in docs/results (the rows already recorded
#    travel with the checkout and are skipped), PARALLEL rows at a time on the one GPU, each in its own process,
#    until TOTAL seconds from the start; each finished row is written at once to $OUT/<study>.json.
# 3. with the time left, the device check: C-C-T-T at 1,000 and 4,000 images, three seeds, in exact fp32.
# Everything lands under $OUT (8 files at most come back): gpu_check.json, gpu_check.md, the studies' JSON files
# (layouts, attention, norms, norms.speed), device-check.json and session.log. Merge the rows here with scripts/merge_rows.py.
set -u
cd "$(dirname "$0")/.."
TOTAL=${TOTAL:-545}          # seconds for everything (the call's limit is 590 s)
CHECK_BUDGET=${CHECK_BUDGET:-240}
CHECK_PARTS=${CHECK_PARTS:-env,sync_debug,pipeline,speed_eager}
PARALLEL=${PARALLEL:-12}
DEVICE=cuda
EXTRA=()
if [ "${1:-}" = "--tiny" ]; then  # the CPU rehearsal: tiny sizes, two rows at a time
    TOTAL=${TOTAL_TINY:-300} CHECK_BUDGET=120 PARALLEL=2 DEVICE=cpu EXTRA=(--quick)
fi
START=$(date +%s)
OUT="${OUT:-$PWD/gpu_session_out}"
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/session.log"
source scripts/device_env.sh  # the carried wheels on PYTHONPATH; DATA=(--data-dir .fmnist)
{ date -u; nvidia-smi -L 2>&1; nproc; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'; } \
    2>&1 | tee -a "$LOG"

# 1. the checks that time models: alone on the device
check_args=(--budget "$CHECK_BUDGET" --parts "$CHECK_PARTS" --out "$WORK/check")
[ "$DEVICE" = cpu ] && check_args+=(--tiny)
timeout -k 10 $((CHECK_BUDGET + 20)) python3 scripts/gpu_check.py "${check_args[@]}" "${DATA[@]}" >>"$LOG" 2>&1
echo "gpu_check exit $?" | tee -a "$LOG"
cp "$WORK"/check/gpu_check.json "$WORK"/check/gpu_check.md "$OUT"/ 2>/dev/null
cat "$WORK"/check/gpu_check.log >>"$LOG" 2>/dev/null
cat "$OUT/gpu_check.md" 2>/dev/null

# 2. the campaign, until TOTAL: the rows recorded so far are copied in, so that only missing rows run
mkdir -p "$WORK/studies"
cp docs/results/layouts.json docs/results/attention.json docs/results/norms.json "$WORK/studies/" 2>/dev/null
[ "$DEVICE" = cpu ] && rm -f "$WORK"/studies/*.json
LEFT=$((TOTAL - ($(date +%s) - START) - 15))
echo "campaign: $LEFT s, $PARALLEL rows at a time" | tee -a "$LOG"
timeout -k 10 $((LEFT + 25)) python3 -m coatnet study all --device "$DEVICE" --parallel "$PARALLEL" --threads 1 \
    --time-limit "$LEFT" --out "$WORK/studies" --no-report "${EXTRA[@]}" "${DATA[@]}" 2>&1 | tee -a "$LOG" | tail -40
echo "campaign exit ${PIPESTATUS[0]}" | tee -a "$LOG"
for f in layouts attention norms norms.speed; do
    [ -f "$WORK/studies/$f.json" ] && cp "$WORK/studies/$f.json" "$OUT/$f.json"
done
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    rows = json.loads(p.read_text())
    if isinstance(rows, list):
        new = [r for r in rows if isinstance(r, dict) and r.get("device") == "cuda"]
        print(f"{p.name}: {len(rows)} rows, {len(new)} from this device")
EOF

# 3. the device check, with what is left: C-C-T-T's small cells in exact fp32 (--deterministic: no TF32), to
# compare with the campaign's TF32 rows and the CPU's (docs/results/device-check.json, layouts.notes.md)
LEFT=$((TOTAL - ($(date +%s) - START) - 10))
if [ "$LEFT" -gt 60 ]; then
    sizes=(1000 4000); [ "$DEVICE" = cpu ] && sizes=(64)
    echo "device check: $LEFT s" | tee -a "$LOG"
    timeout -k 10 $((LEFT + 20)) python3 -m coatnet study layouts --variants C-C-T-T --sizes "${sizes[@]}" --seeds 0 1 2 \
        --device "$DEVICE" --deterministic --parallel 6 --threads 2 --time-limit "$LEFT" --out "$WORK/devcheck" \
        --no-report "${EXTRA[@]}" "${DATA[@]}" 2>&1 | tee -a "$LOG" | tail -8
    [ -f "$WORK/devcheck/layouts.json" ] && cp "$WORK/devcheck/layouts.json" "$OUT/device-check.json"
fi
echo "total $(($(date +%s) - START)) s" | tee -a "$LOG"
