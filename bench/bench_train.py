"""Training-step throughput of each UNet size (eager vs torch.compile), sampler throughput, and the
cost of SpeeD's time-step sampling + weighting next to uniform.

    python bench/bench_train.py --out bench/results/bench_train.json     (on a GPU; ~4 minutes)
    python bench/bench_train.py --sizes small,ddpm --compile small,ddpm --mode reduce-overhead \
        --overhead 0 --sampler 0 --out bench/results/bench_train_graphs.json   (allow 3 minutes a size)

Every number is measured through the same code users run: speed.train (the whole step: data, flips,
time-step sampling, loss, backward, clipping, AdamW, EMA, per-area logging) and speed.ddim_sample.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import speed  # noqa: E402


def train_img_s(size, strategy_name, images, schedule, steps, compile, batch, intervals=6, **train_kwargs):
    """Median img/s of `intervals` log intervals of speed.train, skipping the first two (warm-up,
    compilation), and the rounded rates of the intervals kept."""
    model = speed.make_unet(size)
    strategy = speed.make_strategy(strategy_name, schedule)
    log = max(steps // intervals, 1)
    r = speed.train(model, images, schedule, strategy, steps=steps, batch_size=batch, log_every=log,
                    compile=compile, progress=False, warmup=10, **train_kwargs)
    rates = [h["img_per_s"] for h in r.history[2:]]
    return statistics.median(rates), [round(x) for x in rates]


def sample_img_s(model, schedule, steps=25, n=5000, batch=1000):
    """DDIM images/s after one warm-up batch (which also compiles a compiled model)."""
    speed.ddim_sample(model, schedule, batch, steps=steps, batch_size=batch, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    speed.ddim_sample(model, schedule, n, steps=steps, batch_size=batch, device="cuda")
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def sample_cost(name, schedule, batch, iters=2000):
    """Median device time of one strategy.sample(batch) call, CUDA events over `iters` calls."""
    st = speed.make_strategy(name, schedule)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(50):
        st.sample(batch, "cuda", g)
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            st.sample(batch, "cuda", g)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / iters * 1e3)  # microseconds per call
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/bench_train.json")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sizes", default="tiny,small,ddpm")
    p.add_argument("--compile", default="1", help="1 (all sizes), 0, or the sizes to compile, e.g. tiny")
    p.add_argument("--mode", default="default", choices=speed.COMPILE_MODES, help="torch.compile mode")
    p.add_argument("--rounds", type=int, default=3, help="interleaved uniform/speed rounds for the overhead")
    p.add_argument("--overhead", default="1")
    p.add_argument("--sampler", default="1")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    torch.backends.cudnn.benchmark = True
    dev = torch.cuda.get_device_name()
    schedule = speed.make_schedule("linear", 1000)
    images = torch.randint(0, 256, (20000, 3, 32, 32), dtype=torch.uint8)
    res = dict(device=dev, torch=torch.__version__, batch=args.batch, precision=speed.pick_precision("cuda"),
               compile_mode=args.mode,
               sizes={}, strategy_overhead={}, sampler={})
    from torch.utils.flop_counter import FlopCounterMode
    for size in args.sizes.split(","):
        m = speed.make_unet(size).eval()
        with FlopCounterMode(display=False) as fc:
            m(torch.randn(1, 3, 32, 32), torch.tensor([1]))
        entry = dict(params_M=sum(q.numel() for q in m.parameters()) / 1e6, gflop_fwd=fc.get_total_flops() / 1e9)
        steps = {"tiny": 600, "small": 420, "ddpm": 240}.get(size, 300)
        entry["eager_img_s"], entry["eager_intervals"] = train_img_s(size, "uniform", images, schedule, steps, False, args.batch)
        if args.compile == "1" or size in args.compile.split(","):
            t0 = time.time()
            entry["compiled_img_s"], entry["compiled_intervals"] = train_img_s(size, "uniform", images, schedule, steps,
                                                                               args.mode, args.batch)
            entry["compiled_total_s"] = time.time() - t0
            entry["compile_speedup"] = entry["compiled_img_s"] / entry["eager_img_s"]
        entry["train_tflops"] = 3 * entry["gflop_fwd"] * entry["eager_img_s"] / 1e3
        res["sizes"][size] = entry
        print(size, json.dumps(entry), flush=True)
        dump(res, args.out)
    if args.overhead == "1":
        overhead(res, schedule, images, args)
        dump(res, args.out)
    if args.sampler == "1":
        sampler(res, schedule)
    dump(res, args.out)
    print(f"{'size':6} {'params':>8} {'GFLOP':>7} {'eager img/s':>12} {'compiled img/s':>15}")
    for size, e in res["sizes"].items():
        print(f"{size:6} {e['params_M']:7.2f}M {e['gflop_fwd']:7.2f} {e['eager_img_s']:12.0f} "
              f"{e.get('compiled_img_s', float('nan')):15.0f}")


def dump(res, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def overhead(res, schedule, images, args):

    # SpeeD vs uniform: (1) the sampler call alone, (2) whole steps, interleaved to share drift.
    for name in ("uniform", "speed", "loss_aware"):
        res["strategy_overhead"][f"sample_us_{name}"] = sample_cost(name, schedule, args.batch)
    step_ms = 1e3 * args.batch / res["sizes"]["tiny"]["eager_img_s"]
    res["strategy_overhead"]["tiny_step_ms"] = step_ms
    res["strategy_overhead"]["speed_sample_fraction_of_tiny_step"] = (
        res["strategy_overhead"]["sample_us_speed"] / 1e3 / step_ms)
    rounds = {"uniform": [], "speed": []}
    for _ in range(args.rounds):
        for name in rounds:
            rounds[name].append(train_img_s("tiny", name, images, schedule, 480, False, args.batch)[0])
    res["strategy_overhead"]["tiny_img_s_uniform"] = rounds["uniform"]
    res["strategy_overhead"]["tiny_img_s_speed"] = rounds["speed"]
    res["strategy_overhead"]["speed_over_uniform_step_time"] = (
        statistics.median(rounds["uniform"]) / statistics.median(rounds["speed"]))
    print("overhead", json.dumps(res["strategy_overhead"]), flush=True)


def sampler(res, schedule):
    """Sampler throughput (DDIM, bf16, batch 1000) for the tiny model."""
    model = speed.make_unet("tiny").cuda().eval()
    for steps in (25, 100):
        res["sampler"][f"tiny_ddim{steps}_img_s"] = sample_img_s(model, schedule, steps)
    print("sampler", json.dumps(res["sampler"]), flush=True)


if __name__ == "__main__":
    main()
