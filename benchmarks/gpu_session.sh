#!/usr/bin/env bash
# One GPU session: the throughput figures (train_throughput.py) and the carl-cifar10 run
# (gpu_cifar10.py), writing what comes back to $OUT (default ./gpu-out).
#
#   DATA=path/to/cifar10_webp90.npz bash benchmarks/gpu_session.sh
#
# STEP=throughput or STEP=train runs one half (each fits a 10-minute call; default: both).
# Set EPOCHS to shorten the training run (default: the recipe's 200 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
DATA=${DATA:?set DATA to a CIFAR-10 .npz}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The installed layout (carlzoo, carlzoo.training, ...) without pip: a copy on PYTHONPATH.
SITE=$(mktemp -d)
cp -r carlzoo "$SITE/carlzoo"
cp -r training "$SITE/carlzoo/training"
cp -r export "$SITE/carlzoo/export"
cp -r cli "$SITE/carlzoo/cli"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
STEP=${STEP:-all}
if [ "$STEP" = all ] || [ "$STEP" = throughput ]; then
    timeout 240 python3 benchmarks/train_throughput.py --data "$DATA" --batch-size 512 \
        --workers 16 --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"
fi
if [ "$STEP" = all ] || [ "$STEP" = train ]; then
    timeout 560 python3 benchmarks/gpu_cifar10.py --data "$DATA" --out "$OUT" \
        ${EPOCHS:+--epochs "$EPOCHS"} 2>&1 | tee "$OUT/train.log"
fi
