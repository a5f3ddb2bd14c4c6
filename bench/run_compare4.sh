#!/usr/bin/env bash
# The comparison, part 2: what bench/run_compare3.sh left out. p2, min_snr and lognormal with seeds 0
# and 1, and second seeds (seed 1) of the published SpeeD variants k=2, dual sampling and lambda=0.5.
# Settings are run_compare3.sh's (tiny UNet, batch 128, lr 5e-4, warm-up 200, EMA 0.999, CUDA graphs,
# 2,000 DDIM-20 samples every 500 steps, same noise), so all curves are compared at their common steps.
# Each run is its own process; runs go round-robin to the GPUs in $GPUS (default 0). Every call trains
# for BUDGET seconds and checkpoints; calling it again continues every run (--resume) up to 9,000 steps.
#   GPUS="0 1 2 3" BUDGET=480 bash bench/run_compare4.sh runs/compare3
#   python train_tiny.py --compare uniform,speed,... --seeds 0,1 --summarize --out <folder with all runs>
# The committed runs (bench/results/compare3, next to run_compare3.sh's): bench/run_h100x4.sh (GPUs 2 and
# 3, BUDGET=470; the service gave a 4 x H200 host), then GPUS="0 1 2 3" BUDGET=400 on the same machine,
# which finished every run at 9,000 steps; the summary was rebuilt here from all 16 runs.
set -u
root=../shared; [ -d shared/data ] && root=shared      # on the device machine shared/ is carried in
OUTDIR=${1:-runs/compare3}
read -r -a gpus <<< "${GPUS:-0}"
COMMON="--data $root/data/cifar10-train-jpeg75.zip --fid-model $root/metrics/cifar10-fdnet.pt --model tiny
        --batch-size 128 --lr 5e-4 --warmup 200 --ema-decay 0.999 --steps 9000 --eval-every 500
        --eval-samples 2000 --sample-steps 20 --compile reduce-overhead --time-budget ${BUDGET:-480}
        --resume --out $OUTDIR"
RUNS="p2:0 p2:1 min_snr:0 min_snr:1 lognormal:0 lognormal:1 speed:k=2:1 speed:dual=1:1 speed:lam=0.5:1"
mkdir -p "$OUTDIR/logs"
python3 -c "import train_tiny as t; t.load_data('$root/data/cifar10-train-jpeg75.zip', 'runs/cache/data')"  # decode once
i=0
for r in $RUNS; do
    spec=${r%:*}; seed=${r##*:}; gpu=${gpus[$((i % ${#gpus[@]}))]}; i=$((i + 1))
    CUDA_VISIBLE_DEVICES=$gpu python3 train_tiny.py --compare "$spec" --seeds "$seed" $COMMON \
        >> "$OUTDIR/logs/${spec//[:=]/_}_s$seed.log" 2>&1 &
done
wait
