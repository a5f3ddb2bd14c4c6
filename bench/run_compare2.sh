#!/usr/bin/env bash
# Second (shorter) comparison, after bench/profile_step.py showed ~13 training steps/s per process:
# uniform and SpeeD with seeds 0 and 1, the published SpeeD variants with seed 0, all sharing one
# H100 and trained for BUDGET seconds; curves compared on the evaluation steps every run reached.
#   BUDGET=230 bash bench/run_compare2.sh runs/compare
set -u
root=../shared; [ -d shared/data ] && root=shared
DATA=${DATA:-$root/data/cifar10-train-jpeg75.zip}
FD=${FD:-$root/metrics/cifar10-fdnet.pt}
OUTDIR=${1:-runs/compare}
BUDGET=${BUDGET:-230}
COMMON="--data $DATA --fid-model $FD --model tiny --batch-size 128 --lr 5e-4 --warmup 200 --ema-decay 0.995
        --steps 100000 --eval-every 250 --eval-samples 2000 --sample-steps 20 --time-budget $BUDGET --out $OUTDIR"
python3 train_tiny.py --compare uniform,speed --seeds 0,1 --parallel 4 $COMMON &
python3 train_tiny.py --compare speed:k=2,speed:dual=1,speed:lam=0.5 --seeds 0 --parallel 3 $COMMON &
wait
