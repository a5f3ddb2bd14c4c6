"""Where does a training step's time go? Step rate of the tiny UNet under layout/precision variants,
and a torch.profiler table of one short run.   python bench/profile_step.py  (GPU; allow 3 minutes:
the first run was given 75 s and was cut off before it printed the tables)"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import speed  # noqa: E402

sch = speed.make_schedule()
imgs = torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8)


def rate(steps=120, **kw):
    r = speed.train(speed.make_unet("tiny"), imgs, sch, speed.make_strategy("uniform", sch), steps=steps,
                    batch_size=128, log_every=40, progress=False, **kw)
    return r.history[-1]["img_per_s"]


for name, kw in [("channels_last bf16", dict(channels_last=True, precision="bf16")),
                 ("contiguous bf16", dict(channels_last=False, precision="bf16")),
                 ("contiguous fp32", dict(channels_last=False, precision="fp32")),
                 ("channels_last fp32", dict(channels_last=True, precision="fp32"))]:
    print(f"{name:22s} {rate(**kw):8.0f} img/s", flush=True)

from torch.profiler import ProfilerActivity, profile  # noqa: E402
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    rate(steps=40)
    torch.cuda.synchronize()
print(f"40 steps incl. setup: {time.perf_counter() - t0:.2f} s")
ka = prof.key_averages()
print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=40))
print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
