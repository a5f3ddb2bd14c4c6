#!/usr/bin/env bash
# The comparison protocol of issue 10 on the device: Inception FID under DDPM-250 and DDIM-25, tiny UNet
# (dropout 0.1), 20,000 steps at batch 128 and lr 5e-4, FID-5k at 10 checkpoints and FID-10k at the end, controlled
# seeds. The model, dropout, batch, lr and cool-down are named: the h100 preset under them changed after these runs
# (test_train_tiny.py).
#
# Measured on 4x H200 (2026-11-28): one run of the tiny UNet takes 6 minutes (7.5 for the first runs on a
# fresh machine, which compile from an empty cache and compute the 50k reference statistics), so a 10-minute
# call finishes one run per GPU: 4 runs a call on nvidia-h200-x4. Checkpoints (~40 MB a run) do not fit in
# what a call returns: each run must finish in its call (a run cut off checkpoints on the machine, and the
# next call resumes it only if it is issued while the machine is still warm, ~30 s).
# The Inception file (44 MB) and the data (52 MB) do not fit in one call's 64 MiB, and ignored folders of
# the checkout that a call does not carry are removed on the next call, so the file waits in /tmp:
#   call 1: run(kind="nvidia-h200-x4", carry=[".dev"], command="mkdir -p /tmp/devcache && cp .dev/inception-fid-fp16.pt /tmp/devcache/")
#   call 2, right after: run(carry=[".devdata"], command="ARM=full STRATEGIES=uniform,speed SEEDS=0,1 bash bench/run_protocol.sh")
# .dev holds ../shared/inception/inception-fid-fp16.pt, .devdata ../shared/data/cifar10-train-jpeg75.zip.
# Unpack each returned arm-*.tgz into the repository root and commit it; then, here:
#   python bench/compare.py --strategies uniform,speed,... --seeds 0,1,2 --out bench/results/protocol/full --summarize
#   python bench/protocol_report.py      (report.md and protocol.png, which the README copies)
# (one STRATEGIES x SEEDS grid per script; two arms share a call on split GPUs, e.g. on x4:
#   GPUS=0,1 ARM=small ... bash bench/run_protocol.sh > $OUT/small.log 2>&1 & GPUS=2,3 ARM=attrib ... bash bench/run_protocol.sh; wait)
#
# Arms (strategy:seed): full   uniform x3, speed x3, speed:k=2 x2, min_snr x2, p2 x2
#                       small  the same with --subset 1336 (uniform x3, speed x3)
#                       attrib speed:lam=none x2 (sampling alone), speed:k=1 x2 (weighting alone), speedit x2;
#                              summarized against the full arm's uniform runs (compare.py --runs-from, bench/README.md)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
ARM=${ARM:?set ARM=full, small or attrib}
test -f /tmp/devcache/inception-fid-fp16.pt || { echo "no /tmp/devcache/inception-fid-fp16.pt: the machine was replaced; make call 1 again"; exit 3; }
EXTRA=""
[ "$ARM" = small ] && EXTRA="--subset 1336"
# the checkout is replaced on every call: runs of earlier calls on this machine (finished, or cut off with their
# checkpoints) wait in /tmp and come back before compare looks for them
mkdir -p /tmp/protocol_keep/$ARM bench/results/protocol/$ARM && cp -r /tmp/protocol_keep/$ARM/. bench/results/protocol/$ARM/
# compare.py packs the runs on the GPUs, prepares the data and reference statistics once, and with --resume
# skips runs already finished (their metrics committed under bench/results/protocol/$ARM)
timeout -s TERM "${LIMIT_S:-550}" python3 bench/compare.py --strategies "${STRATEGIES:?e.g. uniform,speed}" --seeds "${SEEDS:?e.g. 0}" \
    --out bench/results/protocol/$ARM --per-gpu "${PER_GPU:-1}" ${GPUS:+--gpus "$GPUS"} --resume -- \
    --data .devdata/cifar10-train-jpeg75.zip --fid-model /tmp/devcache/inception-fid-fp16.pt --model tiny --dropout 0.1 \
    --steps 20000 --batch-size 128 --lr 5e-4 --cooldown 0 --evals 10 --eval-samplers ddpm250,ddim25 --eval-samples 5000 --final-samples 10000 $EXTRA
cp -r bench/results/protocol/$ARM/. /tmp/protocol_keep/$ARM/
# sample grids travel as JPEG-95, a third of the PNG's size (committed re-encoded at quality 90: bench/README.md)
python3 -c "import glob, os, PIL.Image as I
for f in glob.glob('bench/results/protocol/$ARM/*/samples.png'):
    I.open(f).convert('RGB').save(f[:-3] + 'jpg', quality=95, subsampling=0); os.remove(f)"
tar czf "$OUT/arm-$ARM-$(date +%s).tgz" --exclude=ckpt.pt bench/results/protocol/$ARM
