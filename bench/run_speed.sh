#!/usr/bin/env bash
# Device calls behind bench/results/speed.json and multi_gpu.json (nvidia-h200-x2):
#   run(kind="nvidia-h200-x2", carry=[".dev"], command="bash bench/run_speed.sh")
#   run(carry=[".dev"], command="PARTS='profile_ddpm sample' MULTI=none OUT=$OUT bash bench/run_speed.sh")  # a part
# .dev holds inception-fid-fp16.pt (../shared/inception) and speed_before.py (git show 6b09aca:speed.py).
# The Inception file is also copied to .devcache/, so a call issued while the machine is warm finds
# it without carrying it (a call carries at most 64 MiB).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p .devcache "$OUT" && cp .dev/inception-fid-fp16.pt .devcache/
nvidia-smi -L | tee "$OUT/gpus.txt"
# one GPU, each part in its own process (a failed CUDA-graph capture leaves a process unusable)
for part in ${PARTS:-train sample inception fd sizes profile profile_ddpm before}; do
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 bench/bench_speed.py --only $part --inception .dev/inception-fid-fp16.pt \
      --before .dev/speed_before.py --out "$OUT/speed.json"
done 2>&1 | tee "$OUT/bench_speed.log"
# data-parallel scaling: 1 GPU vs 2 GPUs at the same global batch (MULTI=none: skipped, e.g. on one GPU)
[ "${MULTI:-}" = none ] && exit 0
while read -r model batch steps flags; do
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/bench_multi_gpu.py --model $model --batch $batch --steps $steps $flags --tag 1gpu --out-dir "$OUT"
  timeout 240 torchrun --standalone --nproc_per_node=2 bench/bench_multi_gpu.py --model $model --batch $batch --steps $steps $flags --tag 2gpu --out-dir "$OUT"
done <<< "${MULTI:-ddpm 512 200 --compile}" 2>&1 | tee "$OUT/multi_gpu.log"
cp bench/results/multi_gpu_runs.jsonl "$OUT/prev_runs.jsonl" 2>/dev/null; cat "$OUT/prev_runs.jsonl" >> "$OUT/multi_gpu_runs.jsonl" 2>/dev/null
python3 bench/bench_multi_gpu.py --merge --out-dir "$OUT"
