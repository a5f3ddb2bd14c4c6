"""bench/bench_speed.py: training and evaluation throughput on one GPU, side by side in one run.

    python bench/bench_speed.py --inception PATH/inception-fid-fp16.pt --before PATH/speed_before.py

--before is the previous speed.py (`git show 6b09aca:speed.py > speed_before.py`): its train() with
compile="reduce-overhead" graphs only the network (the state before the whole-step graph). Merges its
numbers into bench/results/speed.json (keys listed in the README of bench/) and writes a log.
Random uint8 images stand in for data: throughput does not depend on the pixels.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import speed  # noqa: E402
import train_tiny  # noqa: E402

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, datasheet
FWD_GFLOP = {"tiny": 0.84, "small": 3.2, "ddpm": 12.4}  # per 32x32 image (torch.utils.flop_counter)


def log(*a):
    print(*a, flush=True)


def images(n=16384):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def run_train(mod, size, batch, steps, arch=None, device="cuda", prepare=None, **kw):
    """`mod.train` (speed or the previous file) of a new `size` UNet (arch: overrides of its options; prepare(model):
    changes it first) for `steps` steps, logging each half; its result once the device is done."""
    torch.manual_seed(0)
    model = mod.make_unet(size, **(arch or {}))
    prepare and prepare(model)
    sch = mod.make_schedule()
    r = mod.train(model, images(), sch, mod.make_strategy("speed", sch), steps=steps, batch_size=batch,
                  log_every=steps // 2, progress=False, device=device, **kw)
    device == "cuda" and torch.cuda.synchronize()
    if getattr(r, "interrupted", False):  # stopped by SIGTERM (`timeout`) or Ctrl-C: no numbers, stop the script
        raise KeyboardInterrupt(f"{size} batch {batch}: interrupted at step {r.step}")
    return r


def train_rate(mod, size, batch, steps, arch=None, **kw):
    """img/s over the last half of `steps` training steps (run_train)."""
    return run_train(mod, size, batch, steps, arch, **kw).history[-1]["img_per_s"]


KINDS = (("matmul/conv", ("triton_tem", "gemm", "conv", "cutlass", "xmma", "cudnn", "nvjet", "wgrad", "dgrad")),
         ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("fused by torch.compile", ("triton",)),
         ("normalization", ("norm",)))


def kernel_kind(name):
    """The kind of a CUDA kernel from its name: the first kind of KINDS with a matching key, else 'other'. Triton
    kernels that torch.compile fused count as fused even where their names mention a convolution they surround."""
    low = name.lower()
    if low.startswith("triton_") and not low.startswith("triton_tem"):
        return "fused by torch.compile"
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def kernel_table(prof, steps):
    """(ms per step by kind, ms per step by kernel name, kernels per step) of a profile's CUDA kernels. The GPU ranges
    that torch.compile annotates ('## Call CompiledFxGraph ... ##', the span of a compiled graph's kernels) are not
    kernels: counting them would count their kernels twice."""
    by_kind, by_name, n = {}, {}, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## "):
            ms, n = e.time_range.elapsed_us() / 1e3 / steps, n + 1
            by_kind[kernel_kind(e.name)] = by_kind.get(kernel_kind(e.name), 0.0) + ms
            by_name[e.name[:100]] = by_name.get(e.name[:100], 0.0) + ms
    return by_kind, by_name, n / steps


def top8(ms):  # the eight entries with the most ms, longest first
    return dict(sorted(ms.items(), key=lambda kv: -kv[1])[:8])


def profile_step(size, batch, compile=True, graph=True, device="cuda"):
    """GPU kernel time per step vs wall time per step for the graphed step (20 replays), kernel time by kind and the
    eight longest kernels (ms per step). graph=False: the same step launched op by op, so that each kernel has the op
    that launched it: then also the eight ops with the most device time, with their input shapes (top_ops_ms)."""
    torch.manual_seed(0)
    model = speed.make_unet(size)
    sch = speed.make_schedule()
    holder = {}
    acts = ([] if graph else [torch.profiler.ProfilerActivity.CPU]) + (  # CPU ops: what launched each kernel
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])

    def cb(r):
        holder["prof"] = torch.profiler.profile(activities=acts, record_shapes=not graph)
        holder["prof"].__enter__()
        holder["t0"] = time.perf_counter()
    speed.train(model, images(), sch, speed.make_strategy("speed", sch), steps=50, batch_size=batch, progress=False,
                compile=compile, graph=graph, device=device, callback=lambda r: cb(r) if r.step == 30 else None,
                callback_every=1, log_every=1000)
    device == "cuda" and torch.cuda.synchronize()
    wall = (time.perf_counter() - holder["t0"]) / 20
    holder["prof"].__exit__(None, None, None)
    ops = {}  # graph=False: (op, input shapes) -> device ms per step, from the op's own kernels
    for a in holder["prof"].key_averages(group_by_input_shape=True) if not graph else []:
        ops[f"{a.key} {a.input_shapes}"[:160]] = getattr(a, "self_device_time_total", 0) / 1e3 / 20
    by_kind, by_name, per_step = kernel_table(holder["prof"], 20)
    top, top_ops = top8(by_name), top8(ops)
    return dict(wall_ms=wall * 1e3, kernel_ms=sum(by_kind.values()), kernels_per_step=per_step,
                kernel_ms_by_kind=by_kind, top_kernels_ms=top, **({"top_ops_ms": top_ops} if not graph else {}))


def sample_time(n=10000, steps=250, batch=2500, compile=False):
    torch.manual_seed(0)
    model = speed.make_unet("tiny").cuda().eval().to(memory_format=torch.channels_last)  # as train() leaves it
    model = torch.compile(model) if compile else model
    sch = speed.make_schedule()
    g = torch.Generator(device="cuda")
    speed.ddpm_sample(model, sch, batch, steps=10, batch_size=batch, generator=g.manual_seed(0))  # cuDNN warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    speed.ddpm_sample(model, sch, n, steps=steps, batch_size=batch, generator=g.manual_seed(0))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    # the graphed sampler equals the eager one (same code without capture), on a trained-looking model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    a, b = (speed.ddim_sample(model, sch, 256, steps=25, eta=1.0, batch_size=256, precision="fp32", graph=graph,
                              generator=g.manual_seed(1)) for graph in (True, False))
    return seconds, int((a.int() - b.int()).abs().max())


def profile_sample(batch=2500, steps=50, device="cuda"):
    """The DDPM sampler of the tiny UNet (compiled, channels-last, as the quick check evaluates): wall ms per reverse
    step graphed; kernel ms per step by kind and the eight longest kernels, profiled op by op (graph=False: the same
    kernels, not captured under the profiler)."""
    torch.manual_seed(0)
    model = torch.compile(speed.make_unet("tiny").to(device).eval().to(memory_format=torch.channels_last))
    sch, g = speed.make_schedule(), torch.Generator(device=device)

    def sample(graph):
        speed.ddpm_sample(model, sch, batch, steps=steps, batch_size=batch, generator=g.manual_seed(0), graph=graph)
        device == "cuda" and torch.cuda.synchronize()
    sample(True), sample(False)  # compile, cuDNN autotuning
    t = time.perf_counter()
    sample(True)
    wall = (time.perf_counter() - t) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sample(False)
    by_kind, by_name, per_step = kernel_table(prof, steps)
    return dict(batch=batch, wall_ms_per_step=wall * 1e3, kernel_ms_per_step=sum(by_kind.values()),
                kernels_per_step=per_step, kernel_ms_by_kind=by_kind, tflops=FWD_GFLOP["tiny"] * batch / wall / 1e3,
                top_kernels_ms=top8(by_name))


@contextlib.contextmanager
def cold_cache():
    """torch.compile as a new user compiles: a fresh on-disk cache (removed after), Dynamo reset, the backend flags
    train_tiny sets. What this process compiled before stays in its memory: a cold number needs its own process (a
    scratch CPU check: a second compile of one UNet in the process took 11.7 s against 44.7 s the first time)."""
    cache = tempfile.mkdtemp(prefix="inductor-")
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    torch._dynamo.reset()
    train_tiny.fast_math()
    try:
        yield cache
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def compile_phases():
    """A function giving Dynamo's seconds per compile phase (tracing, Inductor, ...) spent since this call."""
    spent = torch._dynamo.utils.calculate_time_spent  # cumulative over the process
    since = dict(spent())
    return lambda: {k: v - since.get(k, 0.0) for k, v in spent().items()}


def compile_breakdown(size="small", batch=256, steps=40, sample_batch=2500, device="cuda", child=False):
    """Where the quick check's compiling goes, from empty caches: seconds to the end of the first `steps` steps (the
    preset's UNet, dropout 0, compiled inside the whole-step graph) and to the first sampler call of its EMA network
    (train_tiny.sampler_net at batch `sample_batch`, bf16, channels-last: as train_tiny samples), each with Dynamo's
    split of its compile time. child: as train_tiny does, train_tiny.precompile compiles the sampler's network in a
    child process from the start of training, and the sampler's own compile reads its cache."""
    with cold_cache() as cache:
        torch._dynamo.utils.counters.clear()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        phases = compile_phases()
        proc = child and train_tiny.precompile({**speed.UNET_SIZES[size], "dropout": 0.0}, (3, 32, 32), sample_batch,
                                               device, os.path.join(cache, "compile.log"))
        t = time.perf_counter()
        r = run_train(speed, size, batch, steps, dict(dropout=0.0), device=device, compile=True)
        out = dict(steps=steps, child=bool(child), step_first_s=time.perf_counter() - t, step_phases=phases(),
                   step_img_s=r.history[-1]["img_per_s"])  # the last half: compiled and captured
        t = time.perf_counter()
        proc and proc.wait()
        out["child_wait_s"], net, walls = time.perf_counter() - t, train_tiny.sampler_net(r.ema), []
        for steps in (1, 1, 50):  # compile; run; 50 steps: are kernels autotuned beside the training (child) as fast?
            t = time.perf_counter()
            speed.ddim_sample(net, speed.make_schedule(), sample_batch, steps=steps, batch_size=sample_batch,
                              device=device)
            sync()
            walls.append(time.perf_counter() - t)
        out.update(sampler_net_first_s=walls[0], sampler_net_second_s=walls[1], sample_50_steps_s=walls[2],
                   all_phases=phases(),
                   fxgraph_cache_hits=torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"],
                   table=torch._dynamo.utils.compile_times(repr="str", aggregate=True))
        return out


def compile_by_block(model):
    """torch.compile each residual block and attention layer of `model` in place instead of the whole network: blocks
    of one shape share their compiled code (the small UNet: 11 shapes for 22 residual blocks, 2 for 6 attention
    layers), so Inductor generates less; fusion across blocks is lost."""
    torch._dynamo.config.recompile_limit = 64  # one compiled entry per block shape, more than the default 8
    torch._dynamo.config.accumulated_recompile_limit = 1024
    for m in model.modules():
        isinstance(m, (speed.ResBlock, speed.Attention)) and m.compile(dynamic=False)  # one graph per shape


def compile_blocks_time(size="small", batch=256, steps=40, device="cuda", ways=("whole", "blocks")):
    """Seconds to the end of the first `steps` steps from an empty cache and the rate after, compiling the whole
    network (as speed.train does) against block by block (compile_by_block), each in a fresh cache. A cold number
    needs its own process (cold_cache): run one way per process (--ways)."""
    out = {}
    for name in ways:  # "_noat": Inductor's pointwise kernels take one heuristic config instead of benchmarking several
        with cold_cache():  # (after its fast_math, which turns that autotuning off)
            torch._inductor.config.triton.autotune_pointwise = not name.endswith("_noat")
            t = time.perf_counter()
            r = run_train(speed, size, batch, steps, dict(dropout=0.0), device=device, compile=name.startswith("whole"),
                          prepare=compile_by_block if name.startswith("blocks") else None)
            out[f"{name}_first_s"], out[f"{name}_img_s"] = time.perf_counter() - t, r.history[-1]["img_per_s"]
    return out


SAMPLE_WAYS = ("at", "noat", "noat_child", "noat_child_ref")


def sample_first(way, size="small", n=10000, steps=250, batch=2500, device="cuda", ref_opts=None):
    """The quick check's sampling alone, from a cold cache (lease 10: 74-76 s in train_tiny against ~46 s from
    lease 7's 50-step timing): seconds of the first call of train_tiny.sampler_net (compile or cache load, one step)
    with Dynamo's split of it, then n DDPM-`steps` samples at `batch`, and the cache counters. way: "at" (pointwise
    kernels autotuned), "noat" (fast_math's heuristic configs, as train_tiny runs), "noat_child" (train_tiny's child
    compiles first and this process reads its cache) or "noat_child_ref" (the child first computes the reference
    statistics, as train_tiny's does: ref_opts, setup's options data, cache, limit, subset, fid_model, device).
    One way per process."""
    if way not in SAMPLE_WAYS:
        raise ValueError(f"sample_first: way {way!r} is not one of {', '.join(SAMPLE_WAYS)}")
    with cold_cache() as cache:
        torch._inductor.config.triton.autotune_pointwise = not way.startswith("noat")
        arch, out = {**speed.UNET_SIZES[size], "dropout": 0.0}, {}
        t, log = time.perf_counter(), os.path.join(cache, "compile.log")
        if "_child" in way:  # the child inherits the environment (this cache) and calls fast_math
            opts = {**ref_opts, "cache": os.path.join(cache, "data")} if way.endswith("_ref") else None
            out["child_rc"] = train_tiny.precompile(arch, (3, 32, 32), batch, device, log, opts).wait()
            out["child_log"] = open(log).read()[-500:]
        out["child_s"] = time.perf_counter() - t
        torch._dynamo.utils.counters.clear()
        phases = compile_phases()
        fmt = torch.channels_last if device == "cuda" else torch.contiguous_format  # as train() leaves the EMA
        ema = speed.UNet(**arch).to(device, memory_format=fmt).eval().requires_grad_(False)
        net, sch, g = train_tiny.sampler_net(ema), speed.make_schedule(), torch.Generator(device).manual_seed(0)
        for name, k, steps_k in (("first_s", batch, 1), ("n_s", n, steps)):
            t = time.perf_counter()
            speed.ddpm_sample(net, sch, k, steps=steps_k, batch_size=batch, generator=g, device=device)
            device == "cuda" and torch.cuda.synchronize()
            out[name] = time.perf_counter() - t
            out.setdefault("first_phases", phases())
        c = torch._dynamo.utils.counters
        out.update({k: v for grp in ("inductor", "aot_autograd") for k, v in c[grp].items() if "cache" in k})
    return out


def inception_first(path, way, n=10000, batch=500):
    """Seconds of a process's first Inception features, as train_tiny's first evaluation meets them (lease 8: its
    evaluation took 23 s longer once the reference statistics moved to the child): loading, the first and second
    batch, then n images. way: "bench" (cuDNN times its algorithms per new shape, as fast_math sets it), "nobench",
    or "noopt" (bench, TorchScript's profiling and fusion off). One way per process: both caches live in it."""
    torch.backends.cudnn.benchmark = way != "nobench"
    out, t = {}, time.perf_counter()
    with torch.jit.optimized_execution(way != "noopt"), torch.no_grad():
        net = train_tiny.load_feature_net(path, device="cuda")
        out["load_s"] = time.perf_counter() - t
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device="cuda")
        for name, imgs in (("first_batch_s", x[:batch]), ("second_batch_s", x[batch:2 * batch]), ("n_s", x)):
            t = time.perf_counter()
            net(imgs, batch_size=batch)
            torch.cuda.synchronize()
            out[name] = time.perf_counter() - t
    return out


def frechet_time(d=2048, n=10000):
    g = torch.Generator(device="cuda").manual_seed(0)
    ref = speed.feature_stats(torch.randn(n, d, device="cuda", generator=g))
    ref = (*ref, speed.sqrt_psd(ref[1]))
    feats = torch.randn(n, d, device="cuda", generator=g) * 1.1 + 0.1
    speed.frechet_distance(feats, ref)
    torch.cuda.synchronize()
    t = time.perf_counter()
    fd = speed.frechet_distance(feats, ref)
    torch.cuda.synchronize()
    return time.perf_counter() - t, fd


def inception_rate(path, n=10000):
    """Inception features per second at several batch sizes (the network is fp16 inside)."""
    out = {}
    for name, batch in (("b500", 500), ("b1000", 1000), ("b2500", 2500)):
        net = torch.jit.load(path, map_location="cuda").eval()
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device="cuda")
        with torch.no_grad():
            net(x, return_features=True)
            net(x, return_features=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n // batch):
                net(x, return_features=True)
            torch.cuda.synchronize()
        out[name] = (n // batch) * batch / (time.perf_counter() - t)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--inception", required=True)
    p.add_argument("--before", default=None, help="the previous speed.py, for train_img_s_tiny_before")
    p.add_argument("--data", default=None, help="sample_first's noat_child_ref: the data zip of the reference")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speed.json"))
    parts = ("train", "sizes", "small_batches", "profile", "profile_ddpm", "ops_ddpm", "sample", "profile_sample", "fd",
             "inception", "before", "compile", "compile_child", "compile_blocks", "inception_first", "sample_first")
    p.add_argument("--only", default=",".join(parts), help="comma-separated parts: " + ",".join(parts))
    p.add_argument("--ways", default="whole,blocks",
                   help="compile_blocks: whole, blocks, whole_noat, blocks_noat; inception_first: bench, nobench, "
                        "noopt; sample_first: at, noat, noat_child, noat_child_ref (one per process)")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    res = json.load(open(args.out)) if os.path.exists(args.out) else {}
    res.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    raw = res.setdefault("raw", {})

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    def train_part():  # tiny UNet, batch 128: whole-step graph with and without the compiled network, eager
        res["train_img_s_tiny"] = train_rate(speed, "tiny", 128, 3000, compile=True)
        raw["train_img_s_tiny_graph_no_compile"] = train_rate(speed, "tiny", 128, 3000)
        raw["train_img_s_tiny_eager"] = train_rate(speed, "tiny", 128, 400, graph=False)
        log(f"tiny: whole-step graph + compiled network {res['train_img_s_tiny']:.0f} img/s, graph alone "
            f"{raw['train_img_s_tiny_graph_no_compile']:.0f}, eager {raw['train_img_s_tiny_eager']:.0f}")

    def sizes_part():  # the other sizes and larger batches, compiled network in the whole-step graph
        for size, batch, steps in (("small", 128, 1200), ("ddpm", 128, 600), ("ddpm", 512, 200)):
            r = train_rate(speed, size, batch, steps, compile=True)
            raw[f"train_img_s_{size}_b{batch}"] = r
            raw[f"tflops_{size}_b{batch}"] = 3 * FWD_GFLOP[size] * 1e9 * r / 1e12
            log(f"{size} batch {batch}: {r:.0f} img/s, {raw[f'tflops_{size}_b{batch}']:.0f} TFLOP/s")
            save()
        best = max((k for k in raw if k.startswith("tflops_ddpm")), key=lambda k: raw[k])
        res.update(ddpm_tflops=raw[best], ddpm_tflops_batch=int(best.rsplit("_b", 1)[1]),
                   ddpm_peak_fraction=raw[best] * 1e12 / PEAK_BF16, ddpm_tflops_b128=raw["tflops_ddpm_b128"])

    def small_batches_part():  # the h100 preset's UNet (dropout 0) at 512 and at its batch: where the rate saturates
        for batch in (512, 256):  # 512 first: the one not measured yet, saved before the other starts
            raw[f"train_img_s_small_drop0_b{batch}"] = r = train_rate(speed, "small", batch, 1000 * 256 // batch,
                                                                      arch=dict(dropout=0.0), compile=True)
            log(f"small (dropout 0) batch {batch}: {r:.0f} img/s")
            save()

    def profile_part():  # kernel time vs wall time per step
        for size in ("tiny",):
            for compiled in (True, False):
                key = f"profile_{size}_b128" + ("_compiled" if compiled else "")
                raw[key] = profile_step(size, 128, compile=compiled)
                log(f"{key}: {raw[key]}")

    def profile_ddpm_part():  # the ddpm UNet at its best measured batch: what keeps it from the card's peak
        raw["profile_ddpm_b512_compiled"] = profile_step("ddpm", 512)
        log(f"profile_ddpm_b512_compiled: {raw['profile_ddpm_b512_compiled']}")

    def ops_ddpm_part():  # the same step op by op: which op launches the 19.7 ms of plain copies (H100 profile)
        raw["profile_ddpm_b512_compiled_ops"] = profile_step("ddpm", 512, graph=False)
        log(f"profile_ddpm_b512_compiled_ops: {raw['profile_ddpm_b512_compiled_ops']}")

    def sample_part():
        s, diff = sample_time()
        res["sample_ddpm250_10k_s"] = s
        raw["sample_graph_vs_eager_max_abs_diff_uint8"] = diff
        raw["sample_ddpm250_10k_s_compiled_network"] = sample_time(compile=True)[0]
        raw["sample_channels_last"] = True  # weights and images (merge_speed.py then keeps this number)
        log(f"DDPM-250, 10k samples, tiny UNet: {s:.1f} s (compiled network: "
            f"{raw['sample_ddpm250_10k_s_compiled_network']:.1f} s); graphed vs eager max |diff| {diff} (uint8 levels)")

    def profile_sample_part():  # why 10,000 DDPM-250 samples of the tiny UNet take 21 s, not 15
        raw["profile_sample_tiny_b2500"] = r = profile_sample()
        log(f"profile_sample_tiny_b2500: {r}")

    def fd_part():
        s, fd = frechet_time()
        res["frechet_2048_gpu_s"] = s
        log(f"Frechet distance 2048-d on the GPU: {s:.3f} s (FD {fd:.3f})")

    def inception_part():
        r = inception_rate(args.inception)
        raw["inception_img_s"] = r
        res["inception_img_s"] = max(v for v in r.values() if isinstance(v, float))
        log(f"Inception features: {r}")

    def sample_first_part():  # one --ways per process: at, noat, noat_child, noat_child_ref (needs --data)
        ref = dict(data=args.data, limit=None, subset=None, fid_model=args.inception, device="cuda")
        for way in args.ways.split(","):
            raw.setdefault("sample_first_small", {})[way] = r = sample_first(way, ref_opts=ref)
            log(f"the quick check's sampling, small UNet, 10k DDPM-250 ({way}): {r}")

    def inception_first_part():  # one --ways per process: bench, nobench, noopt
        for way in args.ways.split(","):
            raw.setdefault("inception_first", {})[way] = r = inception_first(args.inception, way)
            log(f"Inception's first use ({way}): {r}")

    def before_part():  # the previous file: only the network graphed, by torch.compile (minutes of compilation)
        spec = importlib.util.spec_from_file_location("speed_before", args.before)
        before = sys.modules["speed_before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        t = time.perf_counter()
        res["train_img_s_tiny_before"] = train_rate(before, "tiny", 128, 1600, compile="reduce-overhead")
        log(f"before (network graphed by torch.compile): {res['train_img_s_tiny_before']:.0f} img/s "
            f"({time.perf_counter() - t:.0f} s with compilation)")

    def compile_part(child=False):  # the quick check's compiling (lease 6: step 112 s, sampler 52 s): where it goes
        raw["compile_small_b256_static" + ("_child" if child else "")] = r = compile_breakdown(child=child)
        log(r.pop("table"))
        log(f"compile (child {child}): first {r['steps']} steps {r['step_first_s']:.1f} s at {r['step_img_s']:.0f} "
            f"img/s, waiting for the child {r['child_wait_s']:.1f} s, sampler network first call "
            f"{r['sampler_net_first_s']:.1f} s (then {r['sampler_net_second_s']:.2f} s, 50 steps "
            f"{r['sample_50_steps_s']:.2f} s, cache hits {r['fxgraph_cache_hits']}); phases {r['all_phases']}")

    def compile_child_part():  # the same with train_tiny's child process compiling the sampler's network meanwhile
        compile_part(child=True)

    def compile_blocks_part():  # the step's compile (lease 7: 115.6 s) block by block: less code to generate?
        r = compile_blocks_time(ways=args.ways.split(","))
        raw.setdefault("compile_blocks_small_b256", {}).update(r)
        log(f"compile whole vs by block (small, batch 256, 40 steps, cold caches): {r}")

    for name in args.only.split(","):
        try:
            locals()[f"{name}_part"]()
            save()
        except Exception:  # noqa: BLE001 - record the failure, measure the rest
            traceback.print_exc()


if __name__ == "__main__":
    main()
