#!/usr/bin/env bash
# One time-boxed GPU job: the carl-cifar10 run (gpu_cifar10.py) or the throughput figures
# (train_throughput.py), writing its results to $OUT (default ./gpu-out).
#
#   DATA=path/to/cifar10_webp90.npz bash benchmarks/gpu_run.sh
#
# STEP=train (default) trains, evaluates and writes metrics + weight shards: 6 files.
# STEP=throughput measures model-only vs carlzoo (eager and compiled augmentation) vs
# DataLoader at batch 512, and what one augmentation call costs next to a training step
# (augment_cost.py): 3 files.
# STEP=sweep compares recipe variants for EPOCHS epochs each: 2 files, e.g.
#   STEP=sweep EPOCHS=40 VARIANTS="base lr0.3:optim.lr=0.3 k300:model.num_prototypes=300"
# STEP=runs trains up to 4 variants at once, each a whole train step's run sharing the GPU;
# the last-listed ones are stopped if not all would finish (list the best bet first). It leaves
# a run.tar per variant, the weight shards of the best (of two variants both, of three or four
# one), runs.json and runs.log: at most 8 files (gpu_runs.py --finish --pack), e.g.
#   STEP=runs VARIANTS="k512crop:model.num_prototypes=512,augment.crop_scale=[0.14,1.0] \
#       k512:model.num_prototypes=512"
# EPOCHS must exceed the recipe's warm-up (10 epochs), else add SETS="optim.warmup_epochs=N".
# Each step fits a 10-minute job. TIME_LIMIT (default 560 s) bounds the training script:
# it ends training early, evaluates and says so when the recipe would not fit, keeping
# EVAL_RESERVE seconds (train and runs; default 45) for the evaluation and the files. EPOCHS
# shortens the schedule itself (default: the recipe's 200 epochs). SETS="key=value ..." changes
# the recipe (train, sweep and runs), e.g. SETS="optim.lr=0.3 model.num_prototypes=300".
# CONFIG names another recipe for train, sweep and runs (a preset name such as cifar10_adamw, or a YAML
# path from the repository root; default: training/configs/cifar10_fast.yaml).
# Each step needs an empty (or new) OUT of its own: an earlier result there would be
# overwritten, or joined with this one. A step whose script refuses its arguments (exit
# status 2: an unknown recipe, a missing file) leaves OUT as it found it, its log printed
# only, so the corrected command can run into the same OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
DATA=${DATA:?set DATA to a CIFAR-10 .npz}
STEP=${STEP:-train}
case "$STEP" in
    train | throughput | sweep | runs) ;;
    *)
        echo "gpu_run.sh: STEP=$STEP: expected train, throughput, sweep or runs" >&2
        exit 2
        ;;
esac
# Checked before tee writes its log: an earlier result would be overwritten, two training
# runs' files would be joined as one, and two steps' files together can exceed the 8 files
# that come back from a machine that limits them.
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    held=$(ls -A "$OUT" | head -n 8 | tr '\n' ' ')
    echo "gpu_run.sh: OUT=$OUT is not empty (it holds: ${held% }); each step writes into an" \
        "empty OUT: choose another OUT or empty it" >&2
    exit 2
fi
if [ "$STEP" = sweep ]; then
    : "${VARIANTS:?set VARIANTS to NAME[:key=value,...] words}" "${EPOCHS:?set EPOCHS}"
fi
if [ "$STEP" = runs ]; then
    : "${VARIANTS:?set VARIANTS to NAME[:key=value,...] words}"
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The installed layout (carlzoo, carlzoo.training, ...) without pip: a copy on PYTHONPATH.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
cp -r carlzoo "$SITE/carlzoo"
cp -r training "$SITE/carlzoo/training"
cp -r export "$SITE/carlzoo/export"
cp -r cli "$SITE/carlzoo/cli"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
status=0
sets=()
# read -a: a value such as [0.14,1.0] is no glob; -d '': words on several lines all count
read -r -d '' -a words <<<"${SETS:-}" || true
for kv in "${words[@]}"; do
    sets+=(--set "$kv")
done
args=()  # sweep and runs: one --variant per word of VARIANTS
read -r -d '' -a words <<<"${VARIANTS:-}" || true
for v in "${words[@]}"; do
    args+=(--variant "$v")
done
case "$STEP" in
    train)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
            timeout 595 python3 benchmarks/gpu_cifar10.py --data "$DATA" --out "$OUT" \
                ${CONFIG:+--config "$CONFIG"} --time-limit "${TIME_LIMIT:-560}" \
                ${EVAL_RESERVE:+--eval-reserve "$EVAL_RESERVE"} \
                ${EPOCHS:+--epochs "$EPOCHS"} "${sets[@]}"
        } 2>&1 | tee "$OUT/train.log" || status=$?
        log=train.log
        ;;
    throughput)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
            # `&&`: errexit does not apply inside a pipeline that `|| status=$?` tests.
            timeout 360 python3 benchmarks/train_throughput.py --data "$DATA" --batch-size 512 \
                --workers 16 --compile-augment --json "$OUT/throughput.json" &&
                timeout 180 python3 benchmarks/augment_cost.py --device cuda --compile \
                    --json "$OUT/augment_cost.json"
        } 2>&1 | tee "$OUT/throughput.txt" || status=$?
        log=throughput.txt
        ;;
    runs)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
            timeout 595 python3 benchmarks/gpu_runs.py --data "$DATA" --out "$OUT" --pack --finish \
                ${CONFIG:+--config "$CONFIG"} --time-limit "${TIME_LIMIT:-560}" \
                ${EVAL_RESERVE:+--eval-reserve "$EVAL_RESERVE"} \
                ${EPOCHS:+--epochs "$EPOCHS"} "${args[@]}" "${sets[@]}"
        } 2>&1 | tee "$OUT/runs.log" || status=$?
        log=runs.log
        ;;
    sweep)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
            timeout 590 python3 benchmarks/gpu_sweep.py --data "$DATA" --out "$OUT" \
                ${CONFIG:+--config "$CONFIG"} --time-limit "${TIME_LIMIT:-540}" \
                --epochs "$EPOCHS" \
                "${args[@]}" "${sets[@]}"
        } 2>&1 | tee "$OUT/sweep.log" || status=$?
        log=sweep.log
        ;;
esac
if [ "$status" -ne 0 ]; then
    # Exit status 2 is a refusal before any work (argparse's and the scripts' own): with
    # nothing in OUT but the log, whose text is above, OUT is left empty for the rerun.
    if [ "$status" -eq 2 ] && [ "$(ls -A "$OUT")" = "$log" ]; then
        rm -f "$OUT/$log"
    fi
    exit "$status"
fi
# Results small enough to copy off a machine that limits them: at most 8 files of 16 MiB.
n=$(find "$OUT" -type f | wc -l)
big=$(find "$OUT" -type f -size +16M | wc -l)
echo "$OUT: $n files, $big over 16 MiB"
[ "$n" -le 8 ] && [ "$big" -eq 0 ]
