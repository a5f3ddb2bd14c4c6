"""bench/compile_cpu_dryrun.py: bench_speed's compile parts on the CPU (tiny UNet, Inductor's C++ backend), without and
with train_tiny's child compiling the sampler's network during training. A dry run: it checks that the parts work and
that the child's compile is a cache hit for the parent; CPU seconds say nothing about a GPU.

    python bench/compile_cpu_dryrun.py > bench/results/compile_cpu_dryrun.jsonl
"""
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_speed  # noqa: E402

for child in (False, True):
    r = bench_speed.compile_breakdown("tiny", batch=8, steps=4, sample_batch=8, device="cpu", child=child)
    r.pop("table")
    print(json.dumps(dict(host=f"{platform.processor() or platform.machine()} × {os.cpu_count()}",
                          **{k: v for k, v in r.items() if "phases" not in k})), flush=True)
