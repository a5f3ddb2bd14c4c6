"""Why does the tiny UNet train at ~13 steps/s whatever its size, and what fixes it?

    python bench/step_variants.py --out bench/results/step_variants.json     (GPU; about 8 minutes)

Measures, through speed.train (the whole step users run), the tiny UNet at batch 128:
  1. eager bf16 and fp32, and eager bf16 at batch 512: if the loop is bound by the host (Python and
     kernel launches), images/s grows with the batch and fp32 (no autocast casts) is not slower;
  2. a torch.profiler trace of eager steps: host wall time per step against GPU kernel time per step;
  3. torch.compile default vs mode="reduce-overhead" (CUDA graphs), with the time to compile;
  4. DDIM-25 sampling (batch 1000) with the eager and the compiled network.
Results are written after each measurement, so a cut-off run keeps what it finished.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import speed  # noqa: E402
from bench_train import sample_img_s, train_img_s  # noqa: E402


def rate(images, schedule, steps, batch=128, compile=False, **kw):
    """The tiny UNet's median img/s over 8 log intervals after the first two (bench_train.train_img_s),
    and the wall time including compilation."""
    t0 = time.perf_counter()
    img_s, intervals = train_img_s("tiny", "uniform", images, schedule, steps, compile, batch, intervals=8, **kw)
    return dict(img_s=img_s, steps_s=img_s / batch, intervals=intervals, total_s=time.perf_counter() - t0)


def profile_eager(images, schedule, steps=30):
    """Host wall time and GPU kernel time per eager step (bf16, channels-last, batch 128)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    rate(images, schedule, 20)  # warm cuDNN autotuning and allocator
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rate(images, schedule, steps)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
    launches = [e for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")]
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return dict(steps=steps, wall_ms_per_step=1e3 * wall / steps, gpu_kernel_ms_per_step=gpu_us / 1e3 / steps,
                kernels_per_step=len(kernels) / steps, launch_calls_per_step=len(launches) / steps,
                top_self_cpu=[(e.key, round(e.self_cpu_time_total / steps)) for e in top])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/step_variants.json")
    p.add_argument("--only", default="", help="comma-separated parts to run: eager,profile,compile,sampler")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    torch.backends.cudnn.benchmark = True
    schedule = speed.make_schedule()
    images = torch.randint(0, 256, (20000, 3, 32, 32), dtype=torch.uint8)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cpu_count=os.cpu_count())
    parts = set(args.only.split(",")) if args.only else {"eager", "profile", "compile", "sampler"}

    def record(key, value):
        res[key] = value
        print(key, json.dumps(value), flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    if "eager" in parts:
        record("eager_bf16_b128", rate(images, schedule, 240, precision="bf16"))
        record("eager_fp32_b128", rate(images, schedule, 240, precision="fp32"))
        record("eager_bf16_b512", rate(images, schedule, 120, batch=512, precision="bf16"))
    if "profile" in parts:
        record("profile_eager_bf16_b128", profile_eager(images, schedule))
    if "compile" in parts:
        record("compile_default_b128", rate(images, schedule, 800, compile=True))
        record("compile_reduce_overhead_b128", rate(images, schedule, 1600, compile="reduce-overhead"))
    if "sampler" in parts:
        model = speed.make_unet("tiny").cuda().eval()
        record("ddim25_eager_img_s", sample_img_s(model, schedule))
        t0 = time.perf_counter()
        record("ddim25_compiled_img_s", sample_img_s(torch.compile(model), schedule))
        record("ddim25_compiled_total_s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
