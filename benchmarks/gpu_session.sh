#!/usr/bin/env bash
# One GPU lease, one script: everything this project measures or makes on a GPU, written to $OUT.
#
#   checks    the CUDA paths (benchmarks/gpu_checks.py); the session stops here if training or
#             detection is broken; then the test suite's CUDA tests under pytest (the device's
#             python has pytest, not napari; those tests need neither Qt nor napari); small tiles
#             against one tile in fp16 (benchmarks/tiling.py)
#   speed     the network alone (benchmarks/speed.py) and end to end on a 16x larger field of view
#             with the time per stage (benchmarks/profile_detect.py), the series held on the GPU:
#             a lone series, then three series in turn; linking alone
#             (benchmarks/linking_speed.py); the layouts and types of the network's additions
#             (benchmarks/addition_layouts.py); turned sessions; a 64x field if time is left
#             (page-locked staging against pageable copies, and tiles read on the CPU:
#             benchmarks/results/gpu_session_h200_9.txt; cuDNN's benchmark mode, slower:
#             profile_detect.py --cudnn-benchmark, gpu_session_h200_10.txt; keeping the cached GPU
#             memory from series to series, no gain: gpu_session_h200_11.txt)
#   epilogues the biases, residual additions and ReLUs inside cuDNN's convolutions against apart
#             (model.use_cudnn_epilogues): the network alone, then end to end on the 16x series,
#             alternating on and off twice, each kernel table once; three series in turn; the 64x
#             field if time is left
#   train     the shipped weights: `train --init spinenet-synth` on the GPU for TRAIN_MINUTES with
#             batch workers (train.log, spinenet-synth.pt and .json); TRAIN_PRESETS sets its mix of
#             synthetic presets (`train --presets`) and TRAIN_HARD weights its heatmap's negatives at
#             the engine's axon boutons (`train --hard-negative-weight`); CONTROL=1
#             trains a second model beside it with none of these nor TRAIN_SIZE (the default mix,
#             the initial model's architecture) and the same seed (control.log, control.pt), the
#             workers shared;
#             VAL_SERIES validates on that many synthetic series instead of six (`train --val-series`);
#             TRAIN_COARSE renders that share of the preset series at coarser voxels (`train
#             --coarse-fraction`); TRAIN_INIT starts from another model (a name or a path, default
#             spinenet-synth), TRAIN_LR sets the peak learning rate (default 1e-3), TRAIN_EMA
#             saves a moving average of the weights with that decay (`train --ema`, e.g. 0.999)
#   finetune  the fine-tuning benchmark with the GPU's default budget (finetune.txt); beside the
#             training when both are asked for, alone otherwise
#   compare   the new model on the benchmark's test series (compare.txt), then beside the shipped
#             one on a second microscope's series, with the model's threshold and the adapted one
#             (benchmarks/adaptive_threshold.py, second_microscope.txt), the check a new default
#             must also pass
#   compile   the cost and gain of torch.compile (benchmarks/speed.py)
#
#   OUT=... bash benchmarks/gpu_session.sh                        # all phases
#   OUT=... PHASES="speed finetune" bash benchmarks/gpu_session.sh
# Rehearse it on a CPU first, with tiny budgets:
#   OUT=/tmp/out DEVICE=cpu TRAIN_MINUTES=0.3 FT_MINUTES=0.2 REPEAT_XY=1 QUICK=--quick bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
PHASES=${PHASES:-checks speed train finetune compare compile}  # epilogues: on demand
DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-5.5}
TRAIN_WORKERS=${TRAIN_WORKERS:-11}
TRAIN_SIZE=${TRAIN_SIZE:-}  # e.g. deep: grow the shipped model into that preset
TRAIN_SEED=${TRAIN_SEED:-3}
VAL_EVERY=${VAL_EVERY:-600}
TRAIN_PRESETS=${TRAIN_PRESETS:-}  # e.g. "default large_drift low_snr:2 crowded:2 faint:2"
VAL_SERIES=${VAL_SERIES:-}  # e.g. 24: ranks checkpoints finer than the six by default
TRAIN_COARSE=${TRAIN_COARSE:-}  # e.g. 0.5: half the preset series at coarser voxels
TRAIN_INIT=${TRAIN_INIT:-spinenet-synth}
TRAIN_LR=${TRAIN_LR:-1e-3}
CONTROL=${CONTROL:-}
TRAIN_HARD=${TRAIN_HARD:-}  # e.g. 5: hard negatives at the synthetic axon boutons
TRAIN_EMA=${TRAIN_EMA:-}  # e.g. 0.999: validate and save a moving average of the weights
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
wants() { [[ " $PHASES " == *" $1 "* ]]; }

stamp "environment (phases: $PHASES)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
nproc
lscpu 2>/dev/null | grep -E "^(Model name|CPU max MHz|Thread\(s\) per core|Hypervisor vendor)" || true
$PY -c "import sys, torch, numpy, scipy, pandas, skimage, tifffile, filelock, tqdm
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

if wants checks; then
    stamp "CUDA paths"
    $PY benchmarks/gpu_checks.py --device "$DEVICE" 2>&1 | grep -v "^INFO"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
    stamp "the test suite's CUDA tests (pytest -m cuda; they skip on a machine without CUDA)"
    $PY -m pytest -m cuda -p no:cacheprovider -q -rs tests/test_infer.py tests/test_register.py tests/test_link.py \
        tests/test_model.py 2>&1 | tail -n 15
    stamp "small tiles against one tile, in fp16 (benchmarks/tiling.py; on the CPU results/tiling.txt)"
    $PY benchmarks/tiling.py --device "$DEVICE" --tile 192 --cases default large_drift rotated 2>&1 | grep -v "^INFO"
fi

if wants speed; then
    stamp "speed: network alone"
    $PY benchmarks/speed.py --device "$DEVICE" --no-compile
    $PY benchmarks/speed.py --device "$DEVICE" --no-compile --shape 4 32 512 512
    stamp "speed: end to end, ${REPEAT_XY}x${REPEAT_XY} field of view (the series held on the GPU), a lone series"
    $PY benchmarks/profile_detect.py --device "$DEVICE" --repeat-xy "$REPEAT_XY" --resident on --top 25 --trace 25
    stamp "speed: three series in turn (each its own drift, so its own registration shapes)"
    $PY benchmarks/profile_detect.py --device "$DEVICE" --repeat-xy "$REPEAT_XY" --resident on --series 3
    stamp "speed: linking alone (its local motion on the GPU, on this host's CPU in threads, on one thread)"
    $PY benchmarks/linking_speed.py --device "$DEVICE" --repeat-xy "$REPEAT_XY"
    stamp "speed: the network's additions whose operands differ in layout or type (generic kernels)"
    $PY benchmarks/addition_layouts.py --device "$DEVICE" --repeat-xy "$REPEAT_XY"
    stamp "speed: end to end on turned sessions (rotated preset)"
    $PY benchmarks/profile_detect.py --device "$DEVICE" --case rotated
    if [ "$(left)" -gt 90 ]; then
        stamp "speed: a 64x field of view (6 x 32 x 2048 x 2048 on the default preset), a lone series"
        $PY benchmarks/profile_detect.py --device "$DEVICE" --repeat-xy $(( 2 * REPEAT_XY )) --resident on --repeat 2
    fi
fi

if wants epilogues; then
    stamp "cuDNN epilogues: the network alone"
    $PY benchmarks/speed.py --device "$DEVICE" --no-compile
    $PY benchmarks/speed.py --device "$DEVICE" --no-compile --shape 4 32 512 512
    for round in 1 2; do
        for epilogues in on off; do
            stamp "cuDNN epilogues $epilogues, round $round: end to end, ${REPEAT_XY}x${REPEAT_XY} field, a lone series"
            # shellcheck disable=SC2046
            $PY benchmarks/profile_detect.py --device "$DEVICE" --repeat-xy "$REPEAT_XY" --resident on \
                --epilogues "$epilogues" $([ "$round" = 1 ] && echo --trace 25)
        done
    done
    for epilogues in on off; do
        stamp "cuDNN epilogues $epilogues: three series in turn"
        $PY benchmarks/profile_detect.py --device "$DEVICE" --repeat-xy "$REPEAT_XY" --resident on --series 3 \
            --epilogues "$epilogues"
    done
    for epilogues in on off; do
        if [ "$(left)" -gt 60 ]; then
            stamp "cuDNN epilogues $epilogues: a $(( 2 * REPEAT_XY ))x$(( 2 * REPEAT_XY )) field of view, a lone series"
            $PY benchmarks/profile_detect.py --device "$DEVICE" --repeat-xy $(( 2 * REPEAT_XY )) --resident on \
                --repeat 2 --epilogues "$epilogues"
        fi
    done
fi

finetune() {
    $PY benchmarks/finetune.py --preset second_microscope --device "$DEVICE" ${1:+--workers "$1"} -v \
        ${FT_MINUTES:+--minutes "$FT_MINUTES"} > "$OUT/finetune.txt" 2>&1
}
if wants train; then
    workers=$TRAIN_WORKERS
    [ -n "$CONTROL" ] && workers=$(( TRAIN_WORKERS / 2 ))
    stamp "training from $TRAIN_INIT for $TRAIN_MINUTES min with $workers batch workers${TRAIN_SIZE:+, grown into $TRAIN_SIZE}${TRAIN_PRESETS:+, presets $TRAIN_PRESETS}${TRAIN_HARD:+, hard negatives x$TRAIN_HARD}${TRAIN_COARSE:+, coarse share $TRAIN_COARSE}${TRAIN_EMA:+, moving average $TRAIN_EMA}${CONTROL:+; a control with the default mix and size beside it}"
    (nvidia-smi dmon -s u -d 10 > "$OUT/gpu_util.txt" 2>&1 &)
    train() {  # train OUT_NAME EXTRA_ARGS...
        local name=$1; shift
        $PY -m napari_spine_tracker -v train --init "$TRAIN_INIT" --out "$OUT/$name.pt" --device "$DEVICE" \
            --minutes "$TRAIN_MINUTES" --lr "$TRAIN_LR" --val-every "$VAL_EVERY" --workers "$workers" \
            --seed "$TRAIN_SEED" ${VAL_SERIES:+--val-series "$VAL_SERIES"} \
            ${TRAIN_COARSE:+--coarse-fraction "$TRAIN_COARSE"} ${TRAIN_EMA:+--ema "$TRAIN_EMA"} -q "$@"
    }
    # shellcheck disable=SC2086
    train spinenet-synth ${TRAIN_SIZE:+--size "$TRAIN_SIZE"} ${TRAIN_PRESETS:+--presets $TRAIN_PRESETS} \
        ${TRAIN_HARD:+--hard-negative-weight "$TRAIN_HARD"} \
        > "$OUT/train.log" 2>&1 &
    train_pid=$!
    if [ -n "$CONTROL" ]; then
        train control > "$OUT/control.log" 2>&1 &
        control_pid=$!
    fi
    if wants finetune; then
        stamp "fine-tuning benchmark beside the training, $FT_WORKERS batch workers"
        finetune "$FT_WORKERS" &
        ft_pid=$!
    fi
    wait "$train_pid"; echo "training exit status $?"; grep -v "loss" "$OUT/train.log" | tail -n 25
    if [ -n "$CONTROL" ]; then
        wait "$control_pid"; echo "control exit status $?"; grep -v "loss" "$OUT/control.log" | tail -n 25
    fi
    stamp "training done"
    pkill -f "nvidia-smi dmon" 2>/dev/null
    if wants finetune; then
        wait "$ft_pid"; echo "fine-tuning benchmark exit status $?"; grep -v "^INFO" "$OUT/finetune.txt"
    fi
elif wants finetune; then
    stamp "fine-tuning benchmark alone, default batch workers"
    finetune ""; echo "exit status $?"; grep -v "^INFO" "$OUT/finetune.txt"; grep "validation F1" "$OUT/finetune.txt"
fi

if wants compare && [ -f "$OUT/spinenet-synth.pt" ] && [ "$(left)" -gt 70 ]; then
    stamp "the new model on the test series ($(left) s left)"
    timeout $(( $(left) - 5 )) $PY benchmarks/compare.py --methods spinenet --device "$DEVICE" \
        --model "$OUT/spinenet-synth.pt" $QUICK > "$OUT/compare.txt" 2>&1
    echo "exit status $?"; cat "$OUT/compare.txt"
    if [ "$(left)" -gt 60 ]; then
        stamp "the new model and the shipped one on a second microscope ($(left) s left)"
        timeout $(( $(left) - 5 )) $PY benchmarks/adaptive_threshold.py --models spinenet-synth \
            "$OUT/spinenet-synth.pt" --sets second_held second_tuning --device "$DEVICE" \
            ${QUICK:+--seeds 1} > "$OUT/second_microscope.txt" 2>&1
        echo "exit status $?"; grep -v "^INFO" "$OUT/second_microscope.txt"
    fi
fi
if wants compile && [ "$(left)" -gt 60 ]; then
    stamp "torch.compile ($(left) s left)"
    timeout $(( $(left) - 3 )) $PY benchmarks/speed.py --device "$DEVICE"
fi
stamp "done"
