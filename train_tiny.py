"""train_tiny.py: the quick CIFAR-10 check for SpeeD, and the side-by-side strategy comparison.

    python train_tiny.py                                   # SpeeD, 6 min on one H100, prints FID/FD
    python train_tiny.py --data ../shared/data/cifar10-train-jpeg75.zip --fid-model ../shared/metrics/cifar10-fdnet.pt
    python train_tiny.py --preset t4                       # a Colab T4 budget (fp16)
    python train_tiny.py --preset cpu                      # seconds-long smoke run on the CPU
    python train_tiny.py --compare uniform,speed --seeds 0,1   # same data order, model, budget
    python train_tiny.py --compare uniform,speed:k=2,speed:dual=1,speed:lam=0.5
    python train_tiny.py --resume                          # continue an interrupted run

Writes to --out: metrics.json, samples.png, loss_areas.png, ckpt.pt (and for --compare one folder per
run plus compare.json, compare.md and compare.png with the quality-vs-steps curves and speed-ups).
"""

import argparse
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

import speed

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
SHARED_ZIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data",
                          "cifar10-train-jpeg75.zip")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Budgets, sized from measured rates (bench/results/step_variants.json, H100): with CUDA graphs
# (compile="reduce-overhead") the tiny UNet trains at 42 steps/s at batch 128 (eager: 13 steps/s,
# host-bound), compilation takes about 80 s, and DDIM-25 samples about 1,000 img/s. h100: 365 s
# on one H100 end to end, data decoding and evaluation included (bench/results/preset_h100);
# t4: a Colab T4 in about 10 minutes (fp16, eager; not run on a T4); cpu: a seconds-long smoke run.
PRESETS = {
    "h100": dict(model="tiny", steps=10000, batch_size=128, lr=5e-4, warmup=200, ema_decay=0.999,
                 evals=5, eval_samples=5000, sample_steps=25, limit=None, compile="reduce-overhead"),
    "t4": dict(model="tiny", steps=2000, batch_size=64, lr=5e-4, warmup=200, ema_decay=0.995,
               evals=4, eval_samples=2000, sample_steps=25, limit=None, compile="none"),
    "cpu": dict(model="micro", steps=20, batch_size=8, lr=1e-3, warmup=5, ema_decay=0.9,
                evals=2, eval_samples=64, sample_steps=5, limit=64, compile="none"),
}
MICRO = dict(ch=16, ch_mult=(1, 2), num_blocks=1, attn_res=(16,), dropout=0.0)  # CPU smoke model


class DataError(RuntimeError):
    """Data could not be read or fetched; the message says how to provide it."""


# ------------------------------------------------------------------------------------------------
# Data: an EDM-style dataset zip, a folder of images, or the official CIFAR-10 archive (downloaded).
# Everything becomes a uint8 tensor [N, 3, H, W] plus labels (or None), cached as one .pt file.
# ------------------------------------------------------------------------------------------------

def _decode(data):
    import numpy as np
    from PIL import Image
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def load_zip(path, limit=None):
    """EDM/StyleGAN dataset zip: images plus an optional dataset.json {"labels": [[name, label], ...]}."""
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTS))
            if not names:
                raise DataError(f"{path} holds no images ({', '.join(IMAGE_EXTS)})")
            labels = None
            if "dataset.json" in z.namelist():
                meta = json.loads(z.read("dataset.json")).get("labels")
                if meta:
                    table = dict(meta)
                    labels = torch.tensor([table[n] for n in names[:limit]])
            raw = [z.read(n) for n in names[:limit]]
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
            imgs = list(pool.map(_decode, raw, chunksize=256))
    except (zipfile.BadZipFile, zlib.error, OSError, KeyError, ValueError) as e:
        raise DataError(f"could not read dataset zip {path}: {e}") from e
    return _stack(imgs, path), labels


def load_folder(path, limit=None):
    names = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not names:
        raise DataError(f"folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
    imgs = []
    for n in names[:limit]:
        with open(n, "rb") as f:
            try:
                imgs.append(_decode(f.read()))
            except OSError as e:
                raise DataError(f"could not decode image {n}: {e}") from e
    return _stack(imgs, path), None


def _stack(imgs, path):
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) != 1:
        raise DataError(f"images in {path} have different sizes {sorted(shapes)[:4]}; resize them first")
    return torch.stack(imgs)


def load_cifar10_archive(path):
    """The official cifar-10-python.tar.gz -> the 50,000 training images and labels."""
    imgs, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for i in range(1, 6):
                f = tar.extractfile(f"cifar-10-batches-py/data_batch_{i}")
                d = pickle.load(f, encoding="bytes")
                imgs.append(torch.tensor(d[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
                labels.append(torch.tensor(d[b"labels"]))
    except (tarfile.TarError, EOFError, KeyError, OSError, pickle.UnpicklingError, zlib.error, ValueError) as e:
        raise DataError(f"CIFAR-10 archive {path} is corrupt or truncated ({e}); delete it and retry") from e
    return torch.cat(imgs), torch.cat(labels)


def load_data(data=None, cache_dir="data", limit=None):
    """uint8 images [N, 3, H, W] and labels. data: a .zip, a folder, or None for CIFAR-10 (download)."""
    os.makedirs(cache_dir, exist_ok=True)
    if data is None:
        archive = os.path.join(cache_dir, "cifar-10-python.tar.gz")
        try:
            speed.download(CIFAR10_URL, archive, md5=CIFAR10_MD5)
        except (OSError, ValueError) as e:
            hint = f" (here: --data {os.path.relpath(SHARED_ZIP)})" if os.path.exists(SHARED_ZIP) else ""
            raise DataError(f"could not download CIFAR-10 from {CIFAR10_URL}: {e}\nWithout internet, pass "
                            f"--data PATH: an EDM-style dataset zip or a folder of images{hint}.") from e
        source = archive
    else:
        if not os.path.exists(data):
            raise DataError(f"--data {data}: no such file or folder")
        source = data
    st = os.stat(source)
    key = f"{os.path.basename(os.path.abspath(source))}-{st.st_size}-{int(st.st_mtime)}-{limit}"
    cache = os.path.join(cache_dir, f"decoded-{key}.pt")
    if os.path.exists(cache):
        d = torch.load(cache, weights_only=True)
        return d["images"], d["labels"]
    if data is None:
        images, labels = load_cifar10_archive(source)
        images, labels = images[:limit], labels[:limit]
    elif os.path.isdir(source):
        images, labels = load_folder(source, limit)
    else:
        images, labels = load_zip(source, limit)
    speed._save_atomic({"images": images, "labels": labels}, cache)
    return images, labels


# ------------------------------------------------------------------------------------------------
# Speed-up: steps the baseline needs to reach its own final quality, over the steps a strategy needs
# to reach that quality (first crossing, linearly interpolated; None = not reached).
# ------------------------------------------------------------------------------------------------

def steps_to_reach(steps, fd, target):
    """First step at which the curve (steps, fd) reaches fd <= target, linearly interpolated between
    evaluations; None if it never does. Lower fd is better; curves need not be monotone."""
    for i, (s, f) in enumerate(zip(steps, fd)):
        if f <= target:
            if i == 0:
                return float(s)
            s0, f0 = steps[i - 1], fd[i - 1]
            return float(s0 + (s - s0) * (f0 - target) / (f0 - f))
    return None


def speedup(base_steps, base_fd, steps, fd):
    """(factor, steps needed): base steps to its final fd / strategy steps to that fd."""
    target = base_fd[-1]
    need_base = steps_to_reach(base_steps, base_fd, target)
    need = steps_to_reach(steps, fd, target)
    return (need_base / need if need else None), need


def steps_to_levels(curves, base, levels):
    """For each curve {spec: {"steps", "mean"}} and each quality level: (steps to reach it, the base
    curve's steps to reach it / those steps); None where a curve never reaches the level."""
    def reach(spec, level):
        return steps_to_reach(curves[spec]["steps"], curves[spec]["mean"], level)
    table = {}
    for spec in curves:
        table[spec] = []
        for level in levels:
            need, ref = reach(spec, level), reach(base, level)
            table[spec].append((need, ref / need if need and ref is not None else None))
    return table


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------

def parse_strategy(spec):
    """'speed:k=2:dual=1' -> ('speed', {'k': 2, 'dual': True})."""
    name, *opts = spec.split(":")
    options = {}
    for o in opts:
        if "=" not in o:
            raise SystemExit(f"--strategy {spec!r}: options are written name:key=value:key=value")
        k, v = o.split("=", 1)
        if k == "dual":
            if v.lower() not in ("0", "1", "true", "false"):
                raise SystemExit(f"--strategy {spec!r}: dual takes 0/1 or true/false, not {v!r}")
            options[k] = v.lower() in ("1", "true")
            continue
        try:
            options[k] = None if v.lower() == "none" else int(v) if v.isdigit() else float(v)
        except ValueError:
            raise SystemExit(f"--strategy {spec!r}: {k}={v!r} is not a number (or none)") from None
    return name, options


def metric_name(net):
    if net is None:
        return None
    if net.kind == "inception":
        return "FID"
    stem = net.name.split(":")[0].rsplit(".", 1)[0]
    return "FD-" + stem.replace("cifar10-", "")


def load_metric(args, device):
    if args.fid_model in (None, "none"):
        return None
    try:
        return speed.load_feature_net(args.fid_model, cache_dir=os.path.join(args.cache, "nets"), device=device)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"[train_tiny] no quality metric: {e}\n[train_tiny] pass --fid-model PATH (a TorchScript "
              f"feature net, e.g. ../shared/metrics/cifar10-fdnet.pt) to get an FD.", file=sys.stderr)
        return None


def save_grid(images, path, nrow=8):
    """uint8 images [N, 3, H, W] -> an RGB PNG grid, nrow images a row (an incomplete last row dropped)."""
    from einops import rearrange
    from PIL import Image
    n = (len(images) // nrow) * nrow
    grid = rearrange(images[:n].cpu(), "(r c) ch h w -> (r h) (c w) ch", c=nrow)
    Image.fromarray(grid.numpy()).save(path, optimize=True)  # RGB: no constant alpha channel to store


def plot_losses(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for a in speed.AREA_NAMES:
        ax.plot(steps, [h[f"mse_{a}"] for h in history], label=f"{a} (unweighted MSE)")
    ax.plot(steps, [h["loss"] for h in history], "k--", lw=1, label="training loss (weighted)")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compile_mode_for(mode, device):
    """--compile value -> speed.train's compile argument. On a GPU torch.compile needs Triton (not
    available everywhere, e.g. on some Windows installs): without it, say so and train eagerly."""
    if mode in (None, "none"):
        return False
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is None:
        print(f"[train_tiny] --compile {mode} needs Triton, which is not installed: training without "
              f"torch.compile (about 3x slower for the tiny UNet; pass --compile none to silence this)")
        return False
    return mode


def run_one(args, spec, seed, out):
    os.makedirs(out, exist_ok=True)
    device = torch.device(args.device) if args.device else speed._default_device()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images, labels = load_data(args.data, os.path.join(args.cache, "data"), args.limit)
    res = images.shape[-1]
    name, options = parse_strategy(spec)
    compile_mode = compile_mode_for(args.compile, device)
    schedule = speed.make_schedule(args.schedule, args.T)
    strategy = speed.make_strategy(name, schedule, **options)
    arch = MICRO if args.model == "micro" else speed.UNET_SIZES[args.model]
    model = speed.UNet(**{**arch, "img_res": res, "img_channels": images.shape[1]})
    net = load_metric(args, device)
    metric = metric_name(net)
    ref = None
    if net is not None:
        ref = speed.reference_stats(net, images, os.path.join(args.cache, f"ref-{metric}-{len(images)}.pt"),
                                    device=device)
    gen = torch.Generator(device=device)
    eval_every = args.eval_every or max(1, args.steps // args.evals)
    stop_at = args.stop_at if args.stop_at is not None else (
        time.time() + args.time_budget if args.time_budget is not None else None)
    t0 = time.time() - (_previous_wall_s(out) if args.resume else 0.0)  # wall_s counts every call of a run

    def write_metrics(result, done):
        evals = result.extra.get("evals", [])
        metrics = dict(strategy=spec, seed=seed, metric=metric, final=evals[-1][1] if evals else None,
                       evals=evals, steps=result.step, planned_steps=args.steps, finished=done,
                       wall_s=time.time() - t0,
                       device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       data=args.data or "CIFAR-10 (download)", n_images=len(images),
                       config={k: v for k, v in vars(args).items() if k != "child_args"},
                       history=result.history)
        tmp = os.path.join(out, "metrics.json.tmp")
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(tmp, os.path.join(out, "metrics.json" if done else "metrics.partial.json"))
        if done and os.path.exists(os.path.join(out, "metrics.partial.json")):
            os.remove(os.path.join(out, "metrics.partial.json"))
        return metrics

    def evaluate(result):
        """Runs every `check` steps: FD at each eval_every step; True (stop) once past the deadline."""
        if net is not None and (result.step % eval_every == 0 or result.step == args.steps):
            gen.manual_seed(12345)  # the same noise for every evaluation, strategy and seed
            samples = speed.ddim_sample(result.ema, schedule, args.eval_samples, shape=tuple(images.shape[1:]),
                                        steps=args.sample_steps, generator=gen, device=device)
            fd = speed.fd_of_samples(net, samples, ref)
            result.extra.setdefault("evals", []).append([result.step, fd])
            print(f"\n[{spec} seed {seed}] step {result.step}: {metric} {fd:.3f}", flush=True)
            write_metrics(result, done=False)
        return stop_at is not None and time.time() > stop_at

    check = min(eval_every, 50) if stop_at is not None else eval_every
    result = speed.train(model, images, schedule, strategy, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay, precision=args.precision,
                         compile=compile_mode, seed=seed, device=device, log_every=args.log_every,
                         callback=evaluate, callback_every=check, ckpt_path=os.path.join(out, "ckpt.pt"),
                         ckpt_every=eval_every, resume=args.resume, progress=not args.quiet)
    if result.step < args.steps:
        print(f"[train_tiny] {spec} seed {seed}: time budget reached at step {result.step}")
    gen.manual_seed(0)
    grid = speed.ddim_sample(result.ema, schedule, 64, shape=tuple(images.shape[1:]), steps=args.sample_steps,
                             generator=gen, device=device)
    save_grid(grid, os.path.join(out, "samples.png"))
    plot_losses(result.history, os.path.join(out, "loss_areas.png"), f"{spec}, seed {seed}")
    metrics = write_metrics(result, done=True)
    if metric and metrics["final"] is not None:
        print(f"[train_tiny] {spec} seed {seed}: final {metric} {metrics['final']:.3f} after {result.step} steps "
              f"({metrics['wall_s']:.0f} s) -> {out}")
    return metrics


# ------------------------------------------------------------------------------------------------
# Comparison: every (strategy, seed) as its own process (several share one GPU with --parallel),
# then a table, a quality-vs-steps plot and the speed-up factors.
# ------------------------------------------------------------------------------------------------

def run_dir(out, spec, seed):
    return os.path.join(out, f"{spec.replace(':', '_').replace('=', '')}_s{seed}")


def compare(args):
    specs, seeds = args.compare.split(","), [int(s) for s in args.seeds.split(",")]
    if args.summarize:
        return summarize(args.out, specs, seeds)
    stop_at = time.time() + args.time_budget if args.time_budget is not None else None
    images, _ = load_data(args.data, os.path.join(args.cache, "data"), args.limit)  # decode once for all runs
    device = torch.device(args.device) if args.device else speed._default_device()
    net = load_metric(args, device)
    if net is not None:  # reference statistics once, cached for every run
        speed.reference_stats(net, images, os.path.join(args.cache, f"ref-{metric_name(net)}-{len(images)}.pt"),
                              device=device)
    jobs = []
    for spec in specs:
        for seed in seeds:
            d = run_dir(args.out, spec, seed)
            if args.resume and _finished(d, args.steps):
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--strategy", spec, "--seed", str(seed), "--out", d,
                   "--quiet"] + args.child_args + (["--stop-at", str(stop_at)] if stop_at is not None else [])
            jobs.append((spec, seed, d, cmd))
    running, failed = [], []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, min(2, cores // args.parallel)))}  # no oversubscription
    while jobs or running:
        while jobs and len(running) < args.parallel:
            spec, seed, d, cmd = jobs.pop(0)
            os.makedirs(d, exist_ok=True)
            log = open(os.path.join(d, "log.txt"), "a")
            running.append((spec, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"[compare] started {spec} seed {seed}", flush=True)
        for r in list(running):
            if r[2].poll() is not None:
                running.remove(r)
                r[3].close()
                print(f"[compare] {r[0]} seed {r[1]} exited with {r[2].returncode}", flush=True)
                if r[2].returncode:
                    failed.append(r[:2])
        time.sleep(1)
    summary = summarize(args.out, specs, seeds)
    if failed:
        print(f"[compare] failed runs (see their log.txt): {failed}", file=sys.stderr)
    return summary


def _previous_wall_s(out):
    """Seconds the earlier calls of the run in `out` took (from its last metrics file), 0 if none."""
    for name in ("metrics.partial.json", "metrics.json"):
        try:
            with open(os.path.join(out, name)) as f:
                return float(json.load(f)["wall_s"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return 0.0


def _finished(d, steps):
    """True if the run in folder d has reached `steps` (one stopped by a time budget has not)."""
    try:
        with open(os.path.join(d, "metrics.json")) as f:
            return json.load(f)["steps"] >= steps
    except (OSError, ValueError, KeyError):
        return False


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5 if len(xs) > 1 else 0.0


def summarize(out, specs, seeds):
    """Read every run's metrics.json and write compare.json, compare.md and compare.png. Each row also
    says how a strategy splits its objective over the three areas (Strategy.area_shares)."""
    runs = {}
    for spec in specs:
        for seed in seeds:
            for name in ("metrics.json", "metrics.partial.json"):  # partial: a run that was killed
                p = os.path.join(run_dir(out, spec, seed), name)
                if os.path.exists(p):
                    runs.setdefault(spec, {})[seed] = json.load(open(p))
                    break
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    base = specs[0]
    first = next(iter(next(iter(runs.values())).values()))  # data, device and metric are shared by all runs
    metric = first["metric"] or "FD"
    # Runs stopped by a time budget reach different steps: compare on the evaluations all runs have.
    common = sorted(set.intersection(*[{s for s, _ in r["evals"]} for by in runs.values() for r in by.values()]))
    rows, curves = [], {}
    for spec, by_seed in runs.items():
        fds = [[f for s, f in r["evals"] if s in common] for r in by_seed.values()]
        mean = [sum(c[i] for c in fds) / len(fds) for i in range(len(common))] if common else []
        curves[spec] = (common, mean, fds)
    bsteps, bmean, bfds = curves.get(base, ([], [], []))
    cfg = first.get("config") or {}
    schedule = speed.make_schedule(cfg.get("schedule", "linear"), cfg.get("T", 1000))
    areas = speed.find_areas(schedule)
    for spec, (steps, mean, fds) in curves.items():
        final_m, final_s = _mean_std([c[-1] for c in fds if c])
        factor, need = speedup(bsteps, bmean, steps, mean) if bmean and mean else (None, None)
        per_seed = []
        for seed in seeds:
            if seed in runs.get(base, {}) and seed in runs[spec]:
                b = [f for st, f in runs[base][seed]["evals"] if st in common]
                s = [f for st, f in runs[spec][seed]["evals"] if st in common]
                if b and s:
                    per_seed.append(speedup(bsteps, b, steps, s)[0])
        sm, ss = _mean_std(per_seed)
        name, options = parse_strategy(spec)
        shares = speed.make_strategy(name, schedule, **options).area_shares(areas)
        rows.append(dict(strategy=spec, seeds=len(fds), final_mean=final_m, final_std=final_s, area_shares=shares,
                         speedup_mean_curve=factor, steps_to_base_final=need, speedup_per_seed=per_seed,
                         speedup_seed_mean=sm, speedup_seed_std=ss,
                         not_reached_seeds=sum(1 for x in per_seed if x is None)))
    summary = dict(metric=metric, baseline=base, rows=rows, common_steps=common,
                   steps_reached={f"{k}_s{sd}": r["steps"] for k, by in runs.items() for sd, r in by.items()},
                   wall_s={f"{k}_s{sd}": r["wall_s"] for k, by in runs.items() for sd, r in by.items()},
                   device=first["device"], data=first["data"], n_images=first["n_images"],
                   curves={k: dict(steps=v[0], mean=v[1], per_seed=v[2]) for k, v in curves.items()})
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    fmt = lambda x, d=2: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"| strategy | seeds | final {metric} (mean ± std) | speed-up vs {base} (mean curve) | "
             f"speed-up per seed (mean ± std; not reached) | objective share acc / dec / conv |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        sp = "not reached" if r["speedup_mean_curve"] is None else f"{r['speedup_mean_curve']:.2f}×"
        ps = (f"{fmt(r['speedup_seed_mean'])} ± {fmt(r['speedup_seed_std'])}" if r["speedup_seed_mean"] else "—") + \
             (f"; {r['not_reached_seeds']} not reached" if r["not_reached_seeds"] else "")
        sh = " / ".join(f"{x:.2f}" for x in r["area_shares"].values())
        lines.append(f"| {r['strategy']} | {r['seeds']} | {fmt(r['final_mean'])} ± {fmt(r['final_std'])} "
                     f"| {sp} | {ps} | {sh} |")
    table = "\n".join(lines)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(table + "\n")
    plot_compare(curves, metric, os.path.join(out, "compare.png"))
    print(table)
    return summary


def plot_compare(curves, metric, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for spec, (steps, mean, fds) in curves.items():
        if not mean:
            continue
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{spec} ({len(fds)} seeds)")
        if len(fds) > 1:
            lo = [min(c[i] for c in fds) for i in range(len(steps))]
            hi = [max(c[i] for c in fds) for i in range(len(steps))]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="training step", ylabel=f"{metric} (lower is better)", yscale="log",
           title="Quality vs training steps (band: min–max over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --compare forwards the options to its runs verbatim
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="budget: h100 (default on a GPU), t4 (Colab), cpu (default without a GPU; smoke run)")
    p.add_argument("--data", default=None, help="dataset zip or image folder (default: download CIFAR-10)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--strategy", default="speed", help="uniform, speed, p2, min_snr, lognormal, logitnormal, "
                   "loss_aware; options as name:key=value, e.g. speed:k=2:lam=0.5:dual=1")
    p.add_argument("--compare", default=None, help="comma-separated strategies trained side by side")
    p.add_argument("--seeds", default="0", help="comma-separated seeds for --compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=1, help="--compare runs sharing the GPU at once")
    p.add_argument("--model", choices=["micro", *speed.UNET_SIZES], default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--evals", type=int, default=None, help="number of evaluations during training")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/evals)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; stop at the first check after it (curves are compared on common steps)")
    p.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--summarize", action="store_true", help="with --compare: only rebuild the table and plot")
    p.add_argument("--eval-samples", type=int, default=None, help="samples per evaluation")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps for evaluation samples")
    p.add_argument("--fid-model", default="inception",
                   help="'inception' (standard FID, downloaded once), a TorchScript feature net path, or none")
    p.add_argument("--schedule", choices=speed.SCHEDULES, default="linear")
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--compile", choices=["none", *speed.COMPILE_MODES], default=None,
                   help="torch.compile mode for the model (h100 preset: reduce-overhead, i.e. CUDA graphs)")
    p.add_argument("--device", default=None)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=None, help="output folder (default runs/<strategy> or runs/compare)")
    p.add_argument("--cache", default="runs/cache", help="decoded data, reference statistics, feature nets")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.child_args = _child_args(argv if argv is not None else sys.argv[1:])
    args.preset = args.preset or ("h100" if torch.cuda.is_available() else "cpu")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = os.path.join("runs", "compare" if args.compare else args.strategy.replace(":", "_"))
    for name in ("steps", "batch_size", "evals", "eval_samples", "sample_steps", "parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _child_args(argv):
    """The command line minus the options that --compare sets per run."""
    drop = {"--compare", "--seeds", "--parallel", "--strategy", "--seed", "--out", "--time-budget", "--summarize"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in drop:
            skip = "=" not in a and key != "--summarize"  # a flag: the next argument is not its value
            continue
        out.append(a)
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.compare:
            args.child_args += ["--cache", args.cache] if "--cache" not in args.child_args else []
            compare(args)
        else:
            run_one(args, args.strategy, args.seed, args.out)
    except DataError as e:
        print(f"train_tiny: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
