#!/usr/bin/env bash
# One GPU lease, one script: everything this project measures or makes on a GPU, written to $OUT.
#
#   1. the CUDA paths (benchmarks/gpu_checks.py): stops here if training or detection is broken
#   2. speed: the network alone (benchmarks/speed.py) and end to end on a 16x larger field of
#      view with the time per stage (benchmarks/profile_detect.py)
#   3. the shipped weights: `train --init spinenet-synth` on the GPU for TRAIN_MINUTES, with batch
#      workers (train.log, spinenet-synth.pt and .json), and beside it, on the same GPU, the
#      fine-tuning benchmark with the GPU's default budget (finetune.txt)
#   4. the new model on the benchmark's test series (compare.txt) and, time allowing, the cost of
#      torch.compile
#
# Rehearse it on a CPU first, with tiny budgets:
#   OUT=/tmp/out DEVICE=cpu TRAIN_MINUTES=0.3 FT_MINUTES=0.2 REPEAT_XY=1 QUICK=--quick bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-5.5}
TRAIN_WORKERS=${TRAIN_WORKERS:-11}
FT_MINUTES=${FT_MINUTES:-}
FT_WORKERS=${FT_WORKERS:-2}
REPEAT_XY=${REPEAT_XY:-4}
QUICK=${QUICK:-}
DEADLINE=${DEADLINE:-565}  # seconds: the device call's limit less a margin
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NAPARI_SPINE_TRACKER_DATA_DIR=${NAPARI_SPINE_TRACKER_DATA_DIR:-/tmp/nst-data}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
stamp() { echo; echo "=== $(elapsed) s: $*"; }
left() { echo $(( DEADLINE - $(elapsed) )); }

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
nproc
$PY -c "import sys, torch, numpy, scipy, pandas, skimage, tifffile, filelock, tqdm
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

stamp "1. CUDA paths"
$PY benchmarks/gpu_checks.py --device "$DEVICE" 2>&1 | grep -v "^INFO" || exit 1
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

stamp "2. speed: network alone"
$PY benchmarks/speed.py --device "$DEVICE" --no-compile
$PY benchmarks/speed.py --device "$DEVICE" --no-compile --shape 4 32 512 512
stamp "2. speed: end to end, ${REPEAT_XY}x${REPEAT_XY} field of view"
$PY benchmarks/profile_detect.py --device "$DEVICE" --repeat-xy "$REPEAT_XY"

stamp "3. training for $TRAIN_MINUTES min with $TRAIN_WORKERS batch workers; fine-tuning beside it"
(nvidia-smi dmon -s u -d 10 > "$OUT/gpu_util.txt" 2>&1 &)
$PY -m napari_spine_tracker -v train --init spinenet-synth --out "$OUT/spinenet-synth.pt" --device "$DEVICE" \
    --minutes "$TRAIN_MINUTES" --lr 1e-3 --val-every 600 --workers "$TRAIN_WORKERS" --seed 3 -q \
    > "$OUT/train.log" 2>&1 &
train_pid=$!
$PY benchmarks/finetune.py --preset second_microscope --device "$DEVICE" --workers "$FT_WORKERS" \
    ${FT_MINUTES:+--minutes "$FT_MINUTES"} > "$OUT/finetune.txt" 2>&1 &
ft_pid=$!
wait "$train_pid"; echo "training exit status $?"; tail -n 25 "$OUT/train.log"
stamp "training done"
wait "$ft_pid"; echo "fine-tuning benchmark exit status $?"; cat "$OUT/finetune.txt" | grep -v "^INFO"
pkill -f "nvidia-smi dmon" 2>/dev/null

stamp "4. the new model on the test series ($(left) s left)"
if [ -f "$OUT/spinenet-synth.pt" ] && [ "$(left)" -gt 70 ]; then
    timeout $(( $(left) - 5 )) $PY benchmarks/compare.py --methods spinenet --device "$DEVICE" \
        --model "$OUT/spinenet-synth.pt" $QUICK > "$OUT/compare.txt" 2>&1
    echo "exit status $?"; cat "$OUT/compare.txt"
fi
if [ "$(left)" -gt 60 ]; then
    stamp "4. torch.compile ($(left) s left)"
    timeout $(( $(left) - 3 )) $PY benchmarks/speed.py --device "$DEVICE"
fi
stamp "done"
