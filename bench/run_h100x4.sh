#!/usr/bin/env bash
# One device call on a 4-GPU host (nvidia-h100-x4), each GPU its own job:
#   GPU 0: the default `python train_tiny.py` timed end to end, as a user runs it (h100 preset: SpeeD,
#          10,000 steps with CUDA graphs, 5 x 5,000-sample FD), with cold caches of its own (data
#          decoding, reference statistics and torch.compile all included);
#   GPU 1: bench_train.py with CUDA graphs (reduce-overhead) for every UNet size, eager alongside;
#   GPUs 2, 3: bench/run_compare4.sh (the comparison's remaining runs; continue with a second call).
# The other GPUs' jobs share the host's 64 cores, so the two timings are of a busy host.
#   bash bench/run_h100x4.sh        (writes logs and results under $OUT, or out/ without it)
# As it ran at commit 6b09aca: bench_train.py is no longer in the tree (git show 6b09aca:bench/bench_train.py);
# to re-run, check that commit out (bench/README.md, "Code version").
set -u
OUT=${OUT:-out}; mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.csv"
( t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=/tmp/preset-inductor TRITON_CACHE_DIR=/tmp/preset-triton \
      python3 train_tiny.py --data shared/data/cifar10-train-jpeg75.zip --fid-model shared/metrics/cifar10-fdnet.pt \
      --out runs/preset --cache runs/preset-cache
  echo "[timing] exit $? after $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s end to end"
) > "$OUT/preset.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=/tmp/bench-inductor TRITON_CACHE_DIR=/tmp/bench-triton \
    python3 bench/bench_train.py --sizes small,ddpm,tiny --compile small,ddpm,tiny --mode reduce-overhead \
    --overhead 0 --sampler 0 --out "$OUT/bench_train_graphs.json" > "$OUT/bench_train_graphs.log" 2>&1 &
GPUS="2 3" BUDGET=${BUDGET:-470} bash bench/run_compare4.sh runs/compare3 > "$OUT/compare4.log" 2>&1 &
pack() { tar czf "$OUT/runs.tgz" --exclude=ckpt.pt --exclude='*.tmp*' runs/preset runs/compare3 2>/dev/null; }
while [ -n "$(jobs -r)" ]; do sleep 30; pack; done
pack
