#!/usr/bin/env bash
# The full strategy comparison (CIFAR-10 JPEG-75 copy, FD-fdnet, one GPU): ten runs, two seeds each.
#   BUDGET=360 bash bench/run_compare.sh runs/compare
# Ten runs share the GPU (uniform and SpeeD variants, seeds 0 and 1), each with the same model, data
# order, optimiser and evaluation; each trains until BUDGET seconds have passed, and the curves are
# compared on the evaluation steps that every run reached.
# Status: its only run (after a compile benchmark in the same 10-minute device call) was cut off
# before any run reached its first evaluation. The README's results come from bench/run_compare3.sh
# (CUDA graphs, resumable across device calls) and, earlier, the shorter bench/run_compare2.sh.
set -u
root=../shared; [ -d shared/data ] && root=shared      # on the device machine shared/ is carried in
DATA=${DATA:-$root/data/cifar10-train-jpeg75.zip}
FD=${FD:-$root/metrics/cifar10-fdnet.pt}
OUTDIR=${1:-runs/compare}
BUDGET=${BUDGET:-360}
MAIN_SEEDS=${MAIN_SEEDS:-0,1}          # uniform and SpeeD
VARIANT_SEEDS=${VARIANT_SEEDS:-0,1}    # the published SpeeD variants
COMMON="--data $DATA --fid-model $FD --model tiny --batch-size 128 --lr 5e-4 --warmup ${WARMUP:-500}
        --ema-decay ${EMA:-0.999} --steps 100000 --eval-every ${EVAL_EVERY:-750}
        --eval-samples ${EVAL_SAMPLES:-5000} --sample-steps 20 --time-budget $BUDGET --out $OUTDIR"
n_main=$(( 2 * $(echo "$MAIN_SEEDS" | tr ',' '\n' | wc -l) ))
n_var=$(( 3 * $(echo "$VARIANT_SEEDS" | tr ',' '\n' | wc -l) ))
python3 train_tiny.py --compare uniform,speed --seeds "$MAIN_SEEDS" --parallel $n_main $COMMON &
python3 train_tiny.py --compare speed:k=2,speed:dual=1,speed:lam=0.5 --seeds "$VARIANT_SEEDS" --parallel $n_var $COMMON &
wait
python3 train_tiny.py --compare uniform,speed,speed:k=2,speed:dual=1,speed:lam=0.5 --seeds 0,1 --summarize --out $OUTDIR
