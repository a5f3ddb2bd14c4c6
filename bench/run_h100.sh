#!/usr/bin/env bash
# One device call on one H100 (nvidia-h100-x1), one job after the other so nothing shares the host:
#   1. the default `python train_tiny.py` timed end to end, as a user runs it (h100 preset), with cold
#      caches of its own: data decoding, reference statistics and torch.compile are all included;
#   2. bench_train.py with CUDA graphs (reduce-overhead) for the small and ddpm UNets, eager alongside
#      (tiny's graph rate on an H100 is in bench/results/step_variants.json).
#   bash bench/run_h100.sh        (writes logs and results under $OUT, or out/ without it)
# The committed call hit the 10-minute limit during ddpm; ddpm's line in bench_train_graphs.json is the
# same bench_train.py command with --sizes ddpm --compile ddpm, alone, in a second call on an H100.
# As it ran at commit 6b09aca: bench_train.py is no longer in the tree (git show 6b09aca:bench/bench_train.py);
# to re-run, check that commit out (bench/README.md, "Code version").
set -u
OUT=${OUT:-out}; mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.csv"
t0=$(date +%s.%N)
TORCHINDUCTOR_CACHE_DIR=/tmp/preset-inductor TRITON_CACHE_DIR=/tmp/preset-triton \
    python3 train_tiny.py --data shared/data/cifar10-train-jpeg75.zip --fid-model shared/metrics/cifar10-fdnet.pt \
    --out runs/preset --cache runs/preset-cache > "$OUT/preset.log" 2>&1
echo "[timing] exit $? after $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s end to end" >> "$OUT/preset.log"
tar czf "$OUT/preset.tgz" --exclude=ckpt.pt runs/preset
TORCHINDUCTOR_CACHE_DIR=/tmp/bench-inductor TRITON_CACHE_DIR=/tmp/bench-triton \
    python3 bench/bench_train.py --sizes small,ddpm --compile small,ddpm --mode reduce-overhead \
    --overhead 0 --sampler 0 --out "$OUT/bench_train_graphs.json" > "$OUT/bench_train_graphs.log" 2>&1
