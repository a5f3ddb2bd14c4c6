#!/usr/bin/env bash
# The longer comparison (CIFAR-10 JPEG-75 copy, FD-fdnet, one GPU), made possible by CUDA graphs
# (--compile reduce-overhead: 3.4x the eager step rate, bench/results/step_variants.json).
# Seven runs share the GPU: uniform and SpeeD (k=5, lambda=0.6) with seeds 0 and 1, and the published
# SpeeD variants k=2, dual sampling, lambda=0.5 with seed 0. Each call trains for BUDGET seconds and
# checkpoints; calling it again continues every run (--resume), so a 10-minute limit per command is
# no obstacle. Evaluation every 500 steps: 2,000 DDIM-20 samples with the same noise for every run.
#   BUDGET=480 bash bench/run_compare3.sh runs/compare3      # repeat to train longer
# The committed results (bench/results/compare3): BUDGET=455, then BUDGET=470, on one H200. The
# other strategies and second seeds in that folder come from bench/run_compare4.sh (same settings).
set -u
root=../shared; [ -d shared/data ] && root=shared      # on the device machine shared/ is carried in
OUTDIR=${1:-runs/compare3}
SPECS=uniform,speed,speed:k=2,speed:dual=1,speed:lam=0.5
COMMON="--data $root/data/cifar10-train-jpeg75.zip --fid-model $root/metrics/cifar10-fdnet.pt --model tiny
        --batch-size 128 --lr 5e-4 --warmup 200 --ema-decay 0.999 --steps 100000 --eval-every 500
        --eval-samples 2000 --sample-steps 20 --compile reduce-overhead --time-budget ${BUDGET:-480}
        --resume --out $OUTDIR"
python3 train_tiny.py --compare uniform,speed --seeds 0,1 --parallel 4 $COMMON &
python3 train_tiny.py --compare speed:k=2,speed:dual=1,speed:lam=0.5 --seeds 0 --parallel 3 $COMMON &
wait
python3 train_tiny.py --compare "$SPECS" --seeds 0,1 --summarize --out "$OUTDIR"
