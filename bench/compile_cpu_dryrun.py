"""bench/compile_cpu_dryrun.py: bench_speed's compile parts on the CPU (tiny UNet, Inductor's C++ backend). A dry run:
it checks that a part works (and, for the children, that the child's compile is a cache hit for the parent); CPU
seconds say little about a GPU.

    python bench/compile_cpu_dryrun.py >> bench/results/compile_cpu_dryrun.jsonl                 # children
    python bench/compile_cpu_dryrun.py --part blocks >> bench/results/compile_cpu_dryrun.jsonl    # by block
    python bench/compile_cpu_dryrun.py --part sample_first >> bench/results/compile_cpu_dryrun.jsonl

children: without and with train_tiny's child compiling the sampler's network during training. blocks: the first
steps compiling the whole network against block by block (bench_speed.compile_blocks_time). sample_first: the
sampler's first call after the child's compile (bench_speed.sample_first, way noat_child): a cache hit?
"""
import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_speed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--part", choices=("children", "blocks", "sample_first"), default="children")
part = p.parse_args().part
host = dict(host=f"{platform.processor() or platform.machine()} × {os.cpu_count()}")
if part == "blocks":
    r = bench_speed.compile_blocks_time("tiny", batch=8, steps=4, device="cpu")
    print(json.dumps(dict(**host, part="blocks", size="tiny", batch=8, steps=4, **r)), flush=True)
if part == "sample_first":  # one thread, as the child's C++ kernels are compiled for (OMP_NUM_THREADS below)
    os.environ["OMP_NUM_THREADS"] = "1"
    bench_speed.torch.set_num_threads(1)
    r = bench_speed.sample_first("noat_child", size="tiny", n=8, steps=2, batch=8, device="cpu")
    print(json.dumps(dict(**host, part="sample_first", size="tiny", batch=8, **r)), flush=True)
for child in (False, True) if part == "children" else ():
    r = bench_speed.compile_breakdown("tiny", batch=8, steps=4, sample_batch=8, device="cpu", child=child)
    r.pop("table")
    print(json.dumps(dict(**host, **{k: v for k, v in r.items() if "phases" not in k})), flush=True)
