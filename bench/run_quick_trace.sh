#!/usr/bin/env bash
# One device call (one GPU, issue 11): the h100 preset's quick check under torch's structured trace, to see
# whether its evaluation reads the compile of train_tiny's child from the on-disk cache (lease 10: the sampler's
# first call cost ~29 s, as if not). Every process (train_tiny and its child) writes its own log under
# /tmp/trace; bench/cache_keys.py then names the key components of each miss that differ from the other
# process's entry. A previous call must have cached the Inception file in /tmp/devcache (bench/README).
#   bash bench/run_quick_trace.sh SEED   (writes qs.json, qs.log, cache_keys.txt, cache_files.txt, trace.tgz,
#                                        runs.tgz to $OUT)
# The trace writes every graph: the wall is not a timing.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: the runs are packed from /tmp
test -f /tmp/devcache/inception-fid-fp16.pt || { echo "no /tmp/devcache/inception-fid-fp16.pt: a new machine"; exit 3; }
test -f .devdata/cifar10-train-jpeg75.zip || { echo "no .devdata/cifar10-train-jpeg75.zip: carry .devdata"; exit 3; }
rm -rf /tmp/quick_search /tmp/trace
TORCH_TRACE=/tmp/trace timeout -k 20 -s TERM 520 python3 bench/quick_search.py --data .devdata/cifar10-train-jpeg75.zip \
    --fid-model /tmp/devcache/inception-fid-fp16.pt --gpus 0 --seeds "${1:-2}" --out "$OUT/qs.json" \
    --only h100_preset > "$OUT/qs.log" 2>&1
rc=$?
python3 bench/cache_keys.py /tmp/trace > "$OUT/cache_keys.txt" 2>&1
find /tmp/quick_search/cache_* -path '*inductor*' -type f \( -path '*fxgraph*' -o -path '*aotautograd*' \) \
    -printf '%TT %s %p\n' > "$OUT/cache_files.txt" 2>&1  # the entries each process wrote, and when
tar czf "$OUT/trace.tgz" -C /tmp trace
(cd /tmp/quick_search && tar czf "$OUT/runs.tgz" --exclude=ckpt.pt --exclude='cache_*' .)
tail -3 "$OUT/qs.log"
head -c 3000 "$OUT/cache_keys.txt"
exit $rc
