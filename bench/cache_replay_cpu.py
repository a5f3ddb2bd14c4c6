"""bench/cache_replay_cpu.py: does the evaluation's compile hit the cache of train_tiny's child? A CPU replay of the
quick check's compiling (issue 11, lease 10: the first sampler call took ~29 s longer than with a hit).

    python bench/cache_replay_cpu.py >> bench/results/cache_replay_cpu.jsonl

Three variants, each in its own process and cold cache (Inductor's C++ backend, a 2-level UNet, 8x8 images):
plain: the child compiles (no reference statistics), this process builds a fresh EMA-like UNet and samples;
train: this process first trains the UNet compiled (2 steps, as speed.train compiles it), then samples its EMA;
train_ref: as train, and the child first computes the reference statistics (a scripted feature net), as
train_tiny's child does since lease 8. Each prints the sampler's first call in seconds and the FX-graph cache
hits and misses of that call. A GPU can differ (Triton, cuDNN): this checks the flow, not the card.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def replay(variant):
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"), OMP_NUM_THREADS="1")
    import numpy as np
    import torch
    from PIL import Image
    sys.path.insert(0, os.path.dirname(HERE))
    import speed
    import train_tiny
    torch.set_num_threads(1)  # as the child's OMP_NUM_THREADS: C++ kernels specialise on the thread count
    work = tempfile.mkdtemp()
    os.makedirs(folder := os.path.join(work, "images"))
    rng = np.random.default_rng(0)
    for i in range(16):  # the data: 16 random 8x8 images in a folder
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:02d}.png"))

    class Features(torch.nn.Module):  # a generic feature net: per-image min, max, mean
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = x.reshape(x.shape[0], -1)
            return torch.stack([f.amin(1), f.amax(1), f.mean(1)], 1)
    torch.jit.script(Features()).save(fd := os.path.join(work, "fdnet.pt"))
    arch = dict(ch=8, ch_mult=(1,), num_blocks=1, attn_res=(), dropout=0.0, img_res=8)
    train_tiny.fast_math()  # as run() starts
    opts = dict(data=folder, cache=os.path.join(work, "cache"), limit=None, subset=None, fid_model=fd, device="cpu")
    child = train_tiny.precompile(arch, (3, 8, 8), 6, "cpu", os.path.join(work, "compile.log"),
                                  opts if variant == "train_ref" else None)
    ema = speed.UNet(**arch).eval().requires_grad_(False)
    if variant != "plain":  # the step compiles UNet.forward first, at the training batch, with gradients
        sch = speed.make_schedule()
        ema = speed.train(speed.UNet(**arch), torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), sch,
                          speed.make_strategy("speed", sch), steps=2, batch_size=4, compile=True, graph=False,
                          device="cpu", progress=False).ema
    rc = child.wait()
    torch._dynamo.utils.counters.clear()
    t = time.perf_counter()
    speed.ddpm_sample(train_tiny.sampler_net(ema), speed.make_schedule(), 6, shape=(3, 8, 8), steps=2, device="cpu",
                      batch_size=6)
    c = torch._dynamo.utils.counters["inductor"]
    return dict(variant=variant, child_rc=rc, sampler_first_s=round(time.perf_counter() - t, 2),
                fxgraph_cache_hit=c["fxgraph_cache_hit"], fxgraph_cache_miss=c["fxgraph_cache_miss"],
                torch=torch.__version__, host=f"{os.cpu_count()} cores")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(replay(sys.argv[1])), flush=True)
    else:
        for v in ("plain", "train", "train_ref"):  # one process each: what a process compiled stays in its memory
            subprocess.run([sys.executable, __file__, v], check=True)
