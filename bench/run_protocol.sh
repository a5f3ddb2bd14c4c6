#!/usr/bin/env bash
# The comparison protocol of issue 10 on the device: Inception FID under DDPM-250 and DDIM-25,
# 20,000 steps at batch 128, FID-5k at 10 checkpoints and FID-10k at the end, controlled seeds.
# NOT RUN YET: the session that wrote it had spent its device time on bench/run_speed.sh.
#
# One run of the tiny UNet takes about 7 minutes on one H200 (about 3 of training at 14,000 img/s,
# about 3 of evaluation, 1 of compilation), so a 10-minute call finishes about two runs per GPU;
# checkpoints (~40 MB a run) do not fit in what a call returns, so each run must finish in its call.
#   call 1: run(kind="nvidia-h200-x2", carry=[".dev"], command="mkdir -p .devcache && cp .dev/inception-fid-fp16.pt .devcache/")
#   call 2, right after (the machine keeps ignored files while warm):
#           run(carry=[".devdata"], command="ARM=full STRATEGIES=uniform,speed SEEDS=0 bash bench/run_protocol.sh")
# .dev holds ../shared/inception/inception-fid-fp16.pt, .devdata ../shared/data/cifar10-train-jpeg75.zip.
# Then, here: unpack each returned arm-*.tgz into the repository root and
#   python bench/compare.py --strategies uniform,speed,... --seeds 0,1,2 --out bench/results/protocol/full --summarize
# (one STRATEGIES x SEEDS grid per call; arms with fewer seeds for some strategies take several calls)
#
# Arms (strategy:seed): full   uniform x3, speed x3, speed:k=2 x2, min_snr x2, p2 x2
#                       small  the same with --subset 1336 (uniform x3, speed x3)
#                       attrib speed:lam=none x2 (sampling alone), speed:k=1 x2 (weighting alone), speedit x2
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
ARM=${ARM:?set ARM=full, small or attrib}
test -f .devcache/inception-fid-fp16.pt || { echo "no .devcache/inception-fid-fp16.pt: the machine was replaced; make call 1 again"; exit 3; }
EXTRA=""
[ "$ARM" = small ] && EXTRA="--subset 1336"
# compare.py packs the runs on the GPUs, prepares the data and reference statistics once, and with --resume
# skips runs already finished (their metrics committed under bench/results/protocol/$ARM)
python3 bench/compare.py --strategies "${STRATEGIES:?e.g. uniform,speed}" --seeds "${SEEDS:?e.g. 0}" \
    --out bench/results/protocol/$ARM --per-gpu "${PER_GPU:-1}" --resume -- \
    --data .devdata/cifar10-train-jpeg75.zip --fid-model .devcache/inception-fid-fp16.pt --steps 20000 \
    --batch-size 128 --evals 10 --eval-samplers ddpm250,ddim25 --eval-samples 5000 --final-samples 10000 $EXTRA
tar czf "$OUT/arm-$ARM-$(date +%s).tgz" --exclude=ckpt.pt bench/results/protocol/$ARM
