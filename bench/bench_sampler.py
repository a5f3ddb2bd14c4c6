"""bench/bench_sampler.py: what makes 10,000 DDPM-250 samples of the tiny UNet faster (issue 11: <= 15 s)?

    python bench/bench_sampler.py --gpus 0,1 --out bench/results/sampler.jsonl

The sampler replays one CUDA graph per step, and the compiled tiny UNet at batch 2,500 does about 70 TFLOP/s:
far from the card's peak, so the step is bound by memory traffic, not arithmetic. Two things could change that:
the memory format (training runs channels-last, the sampler feeds NCHW images) and the batch size. Each
configuration runs in its own process (its own compile cache), configurations spread over the GPUs and run side
by side; every result is appended to --out (JSON lines) as soon as it exists.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import speed  # noqa: E402

CONFIGS = ["nchw:2500", "cl:2500", "cl:5000", "cl:10000"]  # memory format : batch size, measured with the sampler
# feeding NCHW images; "plain:2500" is the network as it is, with the sampler that now feeds channels-last images


class ChannelsLast(nn.Module):
    """net(x, t) with x turned channels-last first (the network's weights are channels-last too)."""

    def __init__(self, net):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x, t):
        return self.net(x.contiguous(memory_format=torch.channels_last), t)


def measure(config, n=10000, steps=250):
    fmt, batch = config.split(":")
    batch = int(batch)
    torch.manual_seed(0)
    net = speed.make_unet("tiny").cuda().eval()
    net = torch.compile(ChannelsLast(net) if fmt == "cl" else net)
    sch, g = speed.make_schedule(), torch.Generator(device="cuda")
    t = time.perf_counter()
    speed.ddpm_sample(net, sch, batch, steps=3, batch_size=batch, generator=g.manual_seed(0))  # compile, capture
    torch.cuda.synchronize()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    x = speed.ddpm_sample(net, sch, n, steps=steps, batch_size=batch, generator=g.manual_seed(0))
    torch.cuda.synchronize()
    return dict(config=config, samples=n, steps=steps, seconds=time.perf_counter() - t, warmup_s=warm,
                mean_pixel=float(x.float().mean()), device=torch.cuda.get_device_name(0), torch=torch.__version__)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=",".join(CONFIGS), help="format:batch, format nchw or cl")
    p.add_argument("--gpus", default="0")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sampler.jsonl"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one configuration after another on this process's GPU, a JSON line each, kept at once
        for c in args.worker.split(","):
            row = measure(c)
            print(f"{c:>9}: {row['seconds']:6.1f} s for 10k DDPM-250 (compile + capture {row['warmup_s']:.0f} s)",
                  flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return
    configs, gpus = args.configs.split(","), args.gpus.split(",")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", ",".join(configs[i::len(gpus)]), "--out",
                               args.out], env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpu))
             for i, gpu in enumerate(gpus)]
    sys.exit(max(pr.wait() for pr in procs))

if __name__ == "__main__":
    main()
