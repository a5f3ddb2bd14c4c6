"""train_tiny.py: the quick CIFAR-10 check of SpeeD: train one small diffusion model, measure its FID.

    python train_tiny.py                                # SpeeD: h100 preset on a GPU, a cpu smoke run without
    python train_tiny.py --data ../shared/data/cifar10-train-jpeg75.zip --strategy speed:k=2:lam=0.5 --seed 1
    python train_tiny.py --preset t4                    # a Colab T4 budget (fp16)
    python train_tiny.py --resume                       # continue after Ctrl-C (which checkpoints first)
    torchrun --nproc_per_node=2 train_tiny.py           # one model on 2 GPUs, data-parallel (--batch-size: global)

Writes to --out: metrics.json (FD curve per sampler), samples.png, ckpt.pt (compiling: compile.log, the output of
a child process that computes the reference statistics and compiles the sampler's network). Comparisons:
bench/compare.py.
"""
import argparse, ast, functools, hashlib, io, json, os, pathlib, pickle, re, sys, tarfile, time  # noqa: E401
import atexit, contextlib, multiprocessing, subprocess, urllib.request, zipfile, zlib  # noqa: E401
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.distributed as dist

import speed

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared")  # the project's offline copies
SHARED_ZIP = os.path.join(SHARED, "data", "cifar10-train-jpeg75.zip")
SHARED_INCEPTION = os.path.join(SHARED, "inception", "inception-fid-fp16.pt")
CIFAR10_URL, CIFAR10_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DECODE_CHUNK = 2000  # images per task of read_images' worker processes
SAMPLE_BATCH = 2500  # samples per sampler batch on a GPU: the fastest in bench/ (one CUDA graph, a fixed batch)
MICRO = dict(ch=16, ch_mult=(1, 2), num_blocks=1, attn_res=(16,), dropout=0.0)  # the CPU smoke model
DEFAULTS = dict(lr=5e-4, warmup=200, cooldown=0, eval_samplers="ddim25", limit=None, fid_model="inception",
                compile=False)
PRESETS = {  # options left unset take their preset's value, else DEFAULTS'
    "h100": dict(model="small", dropout=0.0, steps=7500, batch_size=256, lr=1e-3, cooldown=1500, ema_decay=0.999,
                 evals=1, eval_samples=10000, final_samples=0, eval_samplers="ddpm250", compile=True,
                 about="the quick check (small UNet, no dropout, 7,500 steps at batch 256 with an lr cool-down, "
                       "about 7 minutes on one H100): FID of 10k DDPM-250"),
    "t4": dict(model="tiny", steps=2000, batch_size=64, ema_decay=0.995, evals=4, eval_samples=2000, final_samples=0,
               about="a Colab T4 budget (tiny UNet, 2k steps, fp16): FID of 2k DDIM-25 samples, far from converged"),
    "cpu": dict(model="micro", steps=20, batch_size=8, lr=1e-3, warmup=5, ema_decay=0.9, evals=2, eval_samples=64,
                final_samples=0, eval_samplers="ddim5", limit=64, fid_model="none",
                about="a smoke run (micro UNet, 64 images, 20 steps) that checks the pipeline: its samples are "
                      "noise and its losses say nothing about SpeeD; real numbers need a GPU (h100 or t4 preset)"),
}

class DataError(RuntimeError):
    """Data could not be read or fetched; the message says how to provide it."""

class OptionError(ValueError):
    """A bad command-line option; the message names the option and its valid values."""

# ---- Data: a dataset zip, a folder of images or the CIFAR-10 archive -> uint8 [N, 3, H, W] and labels

def read_images(path, limit=None):
    """The first `limit` images, uint8 [N, 3, H, W], and labels (or None) of a folder of images (no labels), the
    CIFAR-10 python archive (.tar.gz) or an EDM/StyleGAN dataset zip (labels from an optional dataset.json)."""
    import numpy as np
    try:
        if path.endswith(".tar.gz"):  # pickled uint8 arrays
            with tarfile.open(path, "r:gz") as tar:
                ds = [pickle.load(tar.extractfile(f"cifar-10-batches-py/data_batch_{i}"), encoding="bytes")
                      for i in range(1, 6)]
            return (torch.cat([torch.tensor(d[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32) for d in ds])[:limit],
                    torch.cat([torch.tensor(d[b"labels"]) for d in ds])[:limit])
        if os.path.isdir(path):
            names = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs
                           if f.lower().endswith(IMAGE_EXTS))[:limit]
            raw, labels = [pathlib.Path(n).read_bytes() for n in names], None
        else:
            with zipfile.ZipFile(path) as z:
                files = z.namelist()
                names = sorted(n for n in files if n.lower().endswith(IMAGE_EXTS))[:limit]
                meta = dict(json.loads(z.read("dataset.json"))["labels"] or {}) if "dataset.json" in files else {}
                raw, labels = [z.read(n) for n in names], torch.tensor([meta[n] for n in names]) if meta else None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, pickle.UnpicklingError, zlib.error, OSError, KeyError,
            ValueError) as e:
        raise DataError(f"could not read {path} ({e}): not a dataset zip or CIFAR-10 archive, or a truncated "
                        "one") from e
    imgs = decode_images(list(zip(names, raw)))
    if len(shapes := {i.shape for i in imgs}) != 1:
        raise DataError(f"images in {path} have different sizes {sorted(shapes)[:4]}; resize them" if imgs else
                        f"{path} holds no images ({', '.join(IMAGE_EXTS)})")
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), labels

def decode_images(items):
    """[(name, image file bytes)] -> [uint8 arrays [H, W, 3]], on Linux in forked processes: for small images most
    of the time is Python holding the GIL (Pillow opening the file), and threads queue for it (elsewhere: a loop)."""
    chunks = [items[i:i + DECODE_CHUNK] for i in range(0, len(items), DECODE_CHUNK)]
    if len(chunks) < 2 or not sys.platform.startswith("linux"):  # macOS: fork is unsafe once frameworks are loaded
        return _decode(items)
    with ProcessPoolExecutor(min(len(chunks), os.cpu_count() or 1), multiprocessing.get_context("fork")) as pool:
        return [i for chunk in pool.map(_decode, chunks) for i in chunk]

def _decode(items):  # decode_images' work, in one process
    import numpy as np
    from PIL import Image
    out = []
    for name, data in items:
        try:
            out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        except OSError as e:
            raise DataError(f"could not decode image {name}: {e}") from None
    return out

def load_data(data=None, cache_dir="data", limit=None):
    """read_images of `data` or (None) of CIFAR-10, downloaded once; decoded once, then read from cache_dir."""
    source = data or os.path.join(cache_dir, "cifar-10-python.tar.gz")
    try:
        data is None and download(CIFAR10_URL, source, "md5", CIFAR10_MD5)
    except (OSError, ValueError) as e:
        hint = f" (here: --data {os.path.relpath(SHARED_ZIP)})" if os.path.exists(SHARED_ZIP) else ""
        raise DataError(f"could not download CIFAR-10 from {CIFAR10_URL} ({e}); without internet pass --data "
                        f"PATH, a dataset zip or a folder of images{hint}") from e
    st = os.stat(source) if os.path.exists(source) else None  # the cache is named by the source file and the limit
    cache = st and os.path.join(cache_dir, f"decoded-{os.path.basename(os.path.abspath(source))}-{st.st_size}-"
                                           f"{int(st.st_mtime)}-{limit}.pt")
    if cache and os.path.exists(cache):
        return tuple(torch.load(cache, weights_only=True).values())
    images, labels = read_images(source, limit)
    os.makedirs(cache_dir, exist_ok=True)
    speed._save_atomic({"images": images, "labels": labels}, cache)
    return images, labels

def balanced_subset(labels, n):
    """Indices of a fixed class-balanced subset of n images (each class's first images in dataset order)."""
    classes = labels.unique().tolist() if labels is not None else []
    idx = [torch.nonzero(labels == c).flatten()[:n // len(classes) + (i < n % len(classes))]
           for i, c in enumerate(classes)]
    if sum(map(len, idx)) < n:
        raise DataError(f"--subset {n}: the data has no labels or too few images of a class for a balanced subset")
    return torch.cat(idx).sort().values

def data_digest(images):
    """sha256 (16 hex digits) of every len/64-th image: identifies a data set in checkpoints and caches."""
    return hashlib.sha256(images[::max(1, len(images) // 64)].cpu().numpy().tobytes()).hexdigest()[:16]

# ---- Metric: feature nets (Inception for FID), their download, reference statistics, FD of samples

def download(url, path, algo="sha256", want=None):
    """url -> path once; checked (a wrong `algo` checksum raises ValueError) before anything is written."""
    if not os.path.exists(path):
        with urllib.request.urlopen(url, timeout=60) as r:
            raw = r.read()
        if want and (got := hashlib.new(algo, raw).hexdigest()) != want:
            raise ValueError(f"checksum mismatch for {url}: expected {algo} {want}, got {got}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.part{os.getpid()}", "wb") as f:
            f.write(raw)
        os.replace(f"{path}.part{os.getpid()}", path)
    return path

class FeatureNet:
    """images [N, C, H, W] (uint8 or floats in [0, 255]) -> float32 features [N, D] on the net's device. 'inception':
    the StyleGAN2-ADA/EDM TorchScript Inception, net(uint8, return_features=True), 2048-d (it resizes to 299 and
    runs in fp16 inside: 7,400 img/s on an H200; channels-last was slower); 'generic': net(floats)."""

    def __init__(self, net, name, device="cpu"):  # name: "<file>:<sha256[:12]>", the kind from the file name
        self.kind = "inception" if name.startswith("inception") else "generic"
        self.name, self.device, self.net = name, torch.device(device), net.to(device)

    @torch.no_grad()
    def __call__(self, images, batch_size=500):
        out = []
        for x in images.split(batch_size):
            x = x.to(self.device).expand(-1, 3, -1, -1)
            out.append(self.net(x.float()) if self.kind == "generic" else
                       self.net(x.round().clamp(0, 255).to(torch.uint8), return_features=True))
        return torch.cat(out).float()

def load_feature_net(name_or_path="inception", cache_dir=None, sha256=None, device="cpu", url=INCEPTION_URL):
    """'inception' -> the standard FID Inception-v3, downloaded into cache_dir once (not pinned: its sha256 recorded
    then, checked on later loads); a path -> that TorchScript file, kind 'inception' if its name starts so."""
    path = name_or_path
    if path == "inception":
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/speed"), "inception-2015-12-05.pt")
        try:
            download(url, path, want=sha256)
        except OSError as e:
            raise DataError(f"could not download the Inception network from {url} ({e}); without internet "
                            f"put inception-2015-12-05.pt in {os.path.dirname(path)} or pass a file path") from e
    elif not os.path.isfile(path):
        raise ValueError(f"feature net {path!r} is neither 'inception' nor an existing file")
    with open(path, "rb") as f:
        digest, stamp = hashlib.file_digest(f, "sha256").hexdigest(), path + ".sha256"
    want = sha256 or (pathlib.Path(stamp).read_text().strip() if os.path.exists(stamp) else None)
    if want not in (None, digest):
        raise ValueError(f"{path} has sha256 {digest}, expected {want}")
    want or name_or_path != "inception" or pathlib.Path(stamp).write_text(digest)
    net = torch.jit.load(path, map_location="cpu").eval()
    return FeatureNet(net, f"{os.path.basename(path)}:{digest[:12]}", device)

def reference_stats(net, images, cache_path):
    """(mean, covariance) of a data set's features on the net's device, cached in cache_path per (net, data)."""
    key = f"{net.name}|{len(images)}|{data_digest(images)}"
    cached = torch.load(cache_path, weights_only=True) if os.path.exists(cache_path) else {}
    if cached.get("key") == key:
        return cached["mu"].to(net.device), cached["sigma"].to(net.device)
    mu, sigma = speed.feature_stats(net(images))
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    speed._save_atomic({"key": key, "mu": mu.cpu(), "sigma": sigma.cpu()}, cache_path)
    return mu, sigma

def fd_of_samples(net, samples, ref):
    """Frechet distance of samples to a reference (mu, sigma[, sqrt_psd(sigma)]), on the reference's device."""
    return speed.frechet_distance(net(samples), ref)

# ---- One run: strategy and samplers from their option strings, training with evaluations, metrics

def make_strategy(spec, schedule):
    """'speed:k=2:lam=none' -> speed.make_strategy('speed', schedule, k=2, lam=None), its errors as OptionError."""
    name, *items = spec.split(":")
    if not all("=" in i for i in items):
        raise OptionError(f"--strategy {spec}: options are written name:key=value:key=value")
    try:
        return speed.make_strategy(name, schedule, **{k: _value(v) for k, v in (i.split("=", 1) for i in items)})
    except (ValueError, TypeError) as e:
        raise OptionError(f"--strategy {spec}: {' '.join(str(e).split())}") from None

def _value(text):  # a Python literal (none, true and false in any case), else the word itself
    with contextlib.suppress(ValueError, SyntaxError):
        return ast.literal_eval({"none": "None", "true": "True", "false": "False"}.get(text.lower(), text))
    return text

def parse_samplers(text, T):
    """'ddpm250,ddim25' -> {'ddpm250': (speed.ddpm_sample, 250), 'ddim25': (speed.ddim_sample, 25)}."""
    found = {s: re.fullmatch(r"(ddpm|ddim)(\d+)", s) for s in text.split(",")}
    for s, m in found.items():
        if not m or not 1 <= int(m[2]) <= T:
            raise OptionError(f"--eval-samplers {text}: {s!r} is not valid; valid: ddpmN or ddimN with 1 <= N <= {T}")
    return {s: (speed.ddpm_sample if m[1] == "ddpm" else speed.ddim_sample, int(m[2])) for s, m in found.items()}

def fast_math():
    """TF32 matmuls and convolutions, cuDNN picks the fastest kernels; Inductor gives pointwise kernels its heuristic
    launch configuration instead of timing several (bench/README: the small UNet's step compiled in 80 s instead of
    94 s, at 0.7% fewer images/s). The compile cache keys on these: every process that compiles sets them."""
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch._inductor.config.triton.autotune_pointwise = False

def sampler_net(ema):
    """The EMA network compiled for sampling. Static shapes: the training step compiled UNet.forward at the training
    batch first, and a second batch size would otherwise get a dynamic-batch graph, slower to compile and to run."""
    return torch.compile(ema, dynamic=False)

def prepare_evaluation(opts, arch, shape, batch, device):
    """A child's work while its parent trains (precompile). With opts (setup's options: data, cache, limit, subset,
    fid_model, device): the reference statistics into their cache first, on a GPU that the parent's compile leaves
    idle; then compile_sampler_net."""
    opts and prepare_reference(argparse.Namespace(**opts))
    compile_sampler_net(arch, shape, batch, device)

def prepare_reference(args):  # setup, then the reference statistics into their cache file
    images, _, net, path = setup(args)
    net and reference_stats(net, images, path)

def compile_sampler_net(arch, shape, batch, device):
    """Compiles a fresh UNet(**arch) as the evaluation compiles its EMA network (sampler_net, the sampler's batch,
    dtype and memory format). Run in a child process while the parent trains (precompile), it fills torch.compile's
    on-disk cache, so that the parent's own compile later reads it: 5.6 s instead of 36.5 s on a slow H100 host
    (bench/README). The noise schedule does not enter the network's graph: the default one serves."""
    fast_math()
    fmt = torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format  # as train() has it
    ema = speed.UNet(**arch).to(device, memory_format=fmt).eval().requires_grad_(False)
    speed.ddim_sample(sampler_net(ema), speed.make_schedule(), batch, shape=shape, steps=1, device=device,
                      batch_size=batch)

def precompile(arch, shape, batch, device, log_path, opts=None):
    """prepare_evaluation in a child process (in this working directory: relative paths in opts hold), its output in
    log_path; killed if this process exits first."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import train_tiny; "
            f"train_tiny.prepare_evaluation({opts!r}, {arch!r}, {shape!r}, {batch}, {str(device)!r})")
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    atexit.register(child.kill)
    return child

def setup(args, metric=True, secs=None):
    """Data (after --limit, --subset), its identity and (with metric) the feature net and the cache file of its
    reference statistics (reference_stats fills it); secs["data"]: the seconds the data took."""
    t = time.time()
    images, labels = load_data(args.data, os.path.join(args.cache, "data"), args.limit)
    images = images[balanced_subset(labels, args.subset)] if args.subset else images
    data = dict(source=os.path.basename(args.data or CIFAR10_URL), images=len(images), sha256=data_digest(images))
    secs is None or secs.update(data=time.time() - t)
    if args.fid_model == "none" or not metric:
        return images, data, None, None
    net = load_feature_net(args.fid_model, os.path.join(args.cache, "nets"), device=args.device)
    return images, data, net, os.path.join(args.cache, f"ref-{net.name.replace(':', '-')}-{len(images)}-"
                                                       f"{data['sha256']}.pt")

def write_metrics(args, result, data, t0, final=None, seconds=None):
    """metrics.json once finished (final given), else metrics.partial.json: FD curves per sampler, the rest."""
    m = dict(strategy=args.strategy, strategy_config=result.strategy.config, seed=args.seed, preset=args.preset,
             metric=args.metric, evals=result.extra.get("evals", {}), final=final, final_samples=args.final_samples,
             steps=result.step, planned_steps=args.steps, finished=final is not None, wall_s=time.time() - t0,
             seconds=seconds,  # next, torch.compile's disk cache: a cold run misses the step, should hit the sampler
             compile_cache={k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "fxgraph" in k},
             device=torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu", data=data,
             config={k: str(v) if k == "device" else v for k, v in vars(args).items()}, history=result.history)
    path, partial = os.path.join(args.out, "metrics.json"), os.path.join(args.out, "metrics.partial.json")
    with open(path + ".tmp", "w") as f:
        json.dump(m, f, indent=1)
    os.replace(path + ".tmp", path if final is not None else partial)
    final is not None and os.path.exists(partial) and os.remove(partial)
    return m

def run(args):
    """Train one strategy and seed, evaluating every steps/evals steps; returns the exit status. Under torchrun
    each rank trains on its share of every batch; rank 0 alone evaluates, writes and prints."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    partial = pathlib.Path(args.out, "metrics.partial.json")  # wall_s counts every call of a resumed run
    t0 = time.time() - (json.loads(partial.read_text())["wall_s"] if args.resume and partial.exists() else 0.0)
    fast_math()
    # the data and feature net: rank 0 first (it fetches and caches), the others read the data
    world > 1 and rank > 0 and dist.barrier()
    secs = dict(evals=0.0)  # where this call's time goes (training and compiling: the rest)
    images, data, net, ref_path = setup(args, metric=rank == 0, secs=secs)
    world > 1 and rank == 0 and dist.barrier()
    secs["setup"] = time.time() - t0
    # strategy, samplers, the model (its initial weights a pure function of --seed), the experiment's identity
    schedule = speed.make_schedule(args.schedule)
    strategy, samplers = make_strategy(args.strategy, schedule), parse_samplers(args.eval_samplers, schedule.T)
    arch = {**(MICRO if args.model == "micro" else speed.UNET_SIZES[args.model]), "img_res": images.shape[-1],
            **({} if args.dropout is None else {"dropout": args.dropout})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = speed.UNet(**arch)
    metric = [net and net.name]  # rank 0's, so that every rank checks the same identity on --resume
    world > 1 and dist.broadcast_object_list(metric)
    experiment = dict(data=data, unet=dict(name=args.model, **arch), metric=metric[0],  # precision: train() has it
                      samplers=list(samplers), eval_samples=args.eval_samples)
    every, shape, args.metric = max(1, args.steps // args.evals), tuple(images.shape[1:]), net and (
        "FID" if net.kind == "inception" else "FD-" + re.sub(r"^cifar10-|\.pt$", "", net.name.split(":")[0]))
    compile = args.compile and args.device.type == "cuda" and world == 1  # compile under DDP: not measured yet
    sample_batch = SAMPLE_BATCH if args.device.type == "cuda" else 500
    os.makedirs(args.out, exist_ok=True)
    # a child process computes the reference statistics and compiles the sampler's network while this one trains
    opts = {k: getattr(args, k) for k in ("data", "cache", "limit", "subset", "fid_model")}
    child = compile and net and precompile(arch, shape, min(sample_batch, args.eval_samples), args.device,
                                           os.path.join(args.out, "compile.log"), {**opts, "device": str(args.device)})

    @functools.cache
    def reference():  # (mu, sigma, sqrt_psd(sigma)): from the child's cache, else (no child, or it failed) now
        child and child.wait()
        mu, sigma = reference_stats(net, images, ref_path)
        return mu, sigma, speed.sqrt_psd(sigma)

    @functools.cache
    def fast(ema):  # the EMA network to sample with, compiled once (after the child's compile: from its cache)
        if not compile:
            return ema
        t = time.time()
        if child and child.wait():  # it failed (out of memory?): this process does its work itself
            print(f"train_tiny: preparing the evaluation ahead failed (see "
                  f"{os.path.join(args.out, 'compile.log')}); doing it now", file=sys.stderr)
        secs["compile_wait"] = time.time() - t  # 0 when the child finished during training
        return sampler_net(ema)  # compiled lazily: its first call (in seconds.sample_*) reads the child's cache

    def draw(model, sampler, n, seed=12345):  # fixed noise: the same for every run and evaluation
        g = torch.Generator(args.device).manual_seed(seed)
        return sampler[0](model, schedule, n, shape=shape, steps=sampler[1], generator=g, device=args.device,
                          batch_size=sample_batch)

    def fds(ema, n):  # {sampler: FD of n samples}; secs: each sampler's seconds, all and the sampling alone
        out = {}
        for s, sampler in samplers.items() if net and n else ():
            t, model = time.time(), fast(ema)
            t1, x = time.time(), draw(model, sampler, n)
            args.device.type == "cuda" and torch.cuda.synchronize(args.device)
            secs[f"sample_{s}"] = secs.get(f"sample_{s}", 0.0) + time.time() - t1
            out[s] = fd_of_samples(net, x, reference())  # Inception features (and the reference, first) and FD
            secs[f"eval_{s}"] = secs.get(f"eval_{s}", 0.0) + time.time() - t
        return out

    def evaluate(result):  # train() calls it every `every` steps and at the end: FDs into result.extra, metrics
        t = time.time()
        for s, fd in fds(result.ema, args.eval_samples).items():
            result.extra.setdefault("evals", {}).setdefault(s, []).append([result.step, fd])
            print(f"\n[{args.strategy} seed {args.seed}] step {result.step}: {args.metric} {s} {fd:.3f}", flush=True)
        secs["evals"] += time.time() - t
        write_metrics(args, result, data, t0, seconds=secs)

    try:
        result = speed.train(model, images, schedule, strategy, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, warmup=args.warmup, cooldown=args.cooldown, ema_decay=args.ema_decay,
                             precision=args.precision, compile=compile, seed=args.seed, device=args.device,
                             callback=evaluate, callback_every=every, ckpt_path=os.path.join(args.out, "ckpt.pt"),
                             log_every=min(every, 1000),  # the bar's loss: each 1k steps at least
                             resume=args.resume, experiment=experiment, progress=not args.quiet)
    except ValueError as e:  # a checkpoint of another experiment (or world_size), or options that do not fit the data
        why = " ".join(str(e).split()).replace("batch_size must", "--batch-size must")  # train()'s name -> the option
        raise OptionError(("--resume: " if "another experiment" in why else "") + why) from None
    if rank > 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        write_metrics(args, result, data, t0, seconds=secs)
        print(f"interrupted at step {result.step}; continue with --resume", file=sys.stderr)
        return 130
    t = time.time()
    final = fds(result.ema, args.final_samples)
    save_grid(draw(result.ema, next(iter(samplers.values())), 64, seed=0), os.path.join(args.out, "samples.png"))
    secs["final"] = time.time() - t
    m = write_metrics(args, result, data, t0, final, secs)
    if not m["evals"]:
        print(f"train_tiny: training loss {result.history[-1]['loss']:.4f} after {result.step} steps (no FD: "
              f"--fid-model none)")
    for s, curve in m["evals"].items():
        n, fd = (args.final_samples, final[s]) if s in final else (args.eval_samples, curve[-1][1])
        print(f"train_tiny: {args.metric} ({s}, {n} samples) {fd:.3f} after {result.step} steps, {m['wall_s']:.0f} s")
    print(f"train_tiny: outputs in {args.out} (metrics.json, samples.png, ckpt.pt)")
    return 0

def save_grid(images, path, nrow=8):
    """uint8 images [N, 3, H, W] -> an RGB PNG grid, nrow images a row (an incomplete last row dropped)."""
    from PIL import Image
    n, (c, h, w) = len(images) // nrow * nrow, images.shape[1:]
    grid = images[:n].cpu().view(n // nrow, nrow, c, h, w).permute(0, 3, 1, 4, 2).reshape(n // nrow * h, nrow * w, c)
    Image.fromarray(grid.numpy()).save(path)

# ---- Command line: every option is checked before any data is read or any folder created

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the option
        raise OptionError(message.replace("argument ", "", 1) + ("; comparisons are run by bench/compare.py"
                                                                  if "--compare" in message else ""))

def _arg(kind, ok, valid):
    """An argparse type: kind(text) satisfying ok, else 'valid: ...'."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if ok(value := kind(text)):
                return value
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; valid: {valid}")
    return parse

def check(args):
    """Fill in the preset and check what argparse cannot; raises OptionError, reads no data, creates nothing."""
    gpus, world = torch.cuda.device_count(), int(os.environ.get("WORLD_SIZE", 1))
    args.device = args.device or ("cuda" if gpus else "cpu")
    if args.device.split(":")[0] == "cuda" and "WORLD_SIZE" in os.environ:  # torchrun: the GPU of this process
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    if args.device not in ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if gpus else []):
        raise OptionError(f"--device {args.device}: not available; valid: cpu" + (
            f", cuda, cuda:0 .. cuda:{gpus - 1}" if gpus else " (this machine or torch build has no CUDA GPU)"))
    args.device = torch.device(args.device)
    args.preset = args.preset or ("h100" if args.device.type == "cuda" else "cpu")
    for k, v in {**DEFAULTS, **PRESETS[args.preset]}.items():
        setattr(args, k, v if getattr(args, k, None) is None else getattr(args, k))
    args.out = args.out or os.path.join("runs", re.sub(r"[^\w.=-]", "_", args.strategy))
    if args.batch_size % world:
        raise OptionError(f"--batch-size {args.batch_size}: the global batch is split over the {world} torchrun "
                          f"processes; valid: a multiple of {world}")
    schedule = speed.make_schedule(args.schedule)
    make_strategy(args.strategy, schedule), parse_samplers(args.eval_samplers, schedule.T)
    if args.data and not os.path.exists(args.data):
        raise OptionError(f"--data {args.data}: no such file or folder; valid: a dataset zip or a folder of images")
    if args.fid_model == "inception" and os.path.isfile(SHARED_INCEPTION):
        args.fid_model = os.path.normpath(SHARED_INCEPTION)  # the project's copy of the FID network
    try:
        args.fid_model in ("inception", "none") or torch.jit.load(args.fid_model, map_location="cpu")
    except (RuntimeError, ValueError, OSError) as e:
        why = str(e).strip().split(". ")[0] if os.path.isfile(args.fid_model) else "no such file"
        raise OptionError(f"--fid-model {args.fid_model}: {why}; valid: inception, none or a TorchScript file") \
            from None
    for opt, path in (("--out", args.out), ("--cache", args.cache)):  # a folder: made later, never over a file
        near = os.path.abspath(path)
        while not os.path.exists(near):  # the nearest part of the path that exists must be a folder
            near = os.path.dirname(near)
        if not os.path.isdir(near):
            raise OptionError(f"{opt} {path}: a file is in the way; valid: a folder, new or existing")
    ckpt = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        if not os.path.isfile(ckpt):
            raise OptionError(f"--resume: no checkpoint {ckpt}; pass the run's --out, or start it without --resume")
        try:  # the step it holds (mmap: nothing else is read now)
            done = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"]
        except (RuntimeError, OSError, KeyError, pickle.UnpicklingError, EOFError) as e:
            raise OptionError(f"--resume: {ckpt} is not a checkpoint torch can read ({type(e).__name__}); start "
                              f"the run over without --resume") from None
        if done > args.steps:
            raise OptionError(f"--steps {args.steps}: the checkpoint in {args.out} is at step {done} already; "
                              f"valid: --steps >= {done}")
    return args

def parse_args(argv=None):
    """Command line -> args with the preset filled in; raises OptionError naming the first bad option."""
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    pos, count = _arg(int, lambda v: v >= 1, "an integer >= 1"), _arg(int, lambda v: v >= 0, "an integer >= 0")
    add = p.add_argument  # options without a default take their preset's value
    add("--preset", choices=sorted(PRESETS), help="budget: h100 (default on a GPU), t4 (Colab), cpu (smoke run)")
    add("--strategy", default="speed", help=f"{', '.join(speed.STRATEGIES)}; options as name:key=value:...")
    add("--seed", type=_arg(int, lambda v: 0 <= v < 2 ** 62, "an integer in [0, 2**62)"), default=0,
        help="seeds the initial weights, the data order and the noise")
    add("--data", help="dataset zip or image folder (default: download CIFAR-10)")
    add("--limit", type=pos, help="use only the first N images")
    add("--subset", type=pos, help="train on a fixed class-balanced N-image subset (FD against it)")
    add("--model", choices=["micro", *speed.UNET_SIZES], help="UNet size")
    add("--dropout", type=_arg(float, lambda v: 0 <= v < 1, "a number in [0, 1)"), help="UNet dropout (default: the "
        "preset's, h100: 0; else the size's, 0.1, micro: 0)")
    add("--steps", type=pos, help="training steps")
    add("--evals", type=pos, help="evaluations during training")
    add("--batch-size", type=pos, help="images per step (under torchrun: over all processes)")
    add("--eval-samples", type=_arg(int, lambda v: v >= 2, "an integer >= 2"), help="samples per evaluation")
    add("--final-samples", type=_arg(int, lambda v: v == 0 or v >= 2, "0 or an integer >= 2"),
        help="samples of a final evaluation (0: none)")
    add("--eval-samplers", help="comma-separated ddpmN (ancestral, N respaced steps) or ddimN, e.g. ddpm250,ddim25")
    add("--lr", type=_arg(float, lambda v: 0 < v < float("inf"), "a number > 0"), help="peak learning rate")
    add("--warmup", type=count, help="steps of learning-rate warm-up")
    add("--cooldown", type=count, help="last steps over which the learning rate falls linearly towards 0")
    add("--ema-decay", type=_arg(float, lambda v: 0 <= v < 1, "a number in [0, 1)"))
    add("--fid-model", help="inception (standard FID), none, or a TorchScript feature net file")
    add("--schedule", choices=speed.SCHEDULES, default="linear")
    add("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    add("--no-compile", dest="compile", action="store_false", default=None,
        help="no torch.compile of the network (the h100 preset compiles on a GPU: about a minute, then 2x faster)")
    add("--device", help="cpu, cuda or cuda:N (default: cuda when there is one; under torchrun: cuda:LOCAL_RANK)")
    add("--out", help="output folder (default runs/<strategy>)")
    add("--cache", default=os.path.join("runs", "cache"), help="decoded data, feature nets, reference statistics")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add("--quiet", action="store_true", help="no progress bar")
    return check(p.parse_args(argv))

def main(argv=None):
    args, rank = None, int(os.environ.get("RANK", 0))  # under torchrun rank 0 alone prints
    try:
        args = parse_args(argv)
        if "WORLD_SIZE" in os.environ:  # launched by torchrun: NCCL between GPUs, gloo on the CPU
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # lets CUDA graphs capture NCCL calls
            args.device.type == "cuda" and torch.cuda.set_device(args.device)
            dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
        rank == 0 and print(f"train_tiny: preset {args.preset}: {PRESETS[args.preset]['about']}", flush=True)
        return run(args)
    except (OptionError, DataError) as e:
        rank == 0 and print(f"train_tiny: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:  # the h100 preset's batch on a smaller GPU: say which option to change
        print(f"train_tiny: out of memory on {args.device} ({args.model} UNet, --batch-size {args.batch_size}); "
              f"valid: a smaller --batch-size, --model tiny or --preset t4", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (which stops cleanly on Ctrl-C): setup or the final evaluation
        resumable = args is not None and os.path.exists(os.path.join(args.out, "ckpt.pt"))
        rank == 0 and print("interrupted; " + ("continue with --resume" if resumable else "nothing to resume"),
                            file=sys.stderr)
        return 130
    finally:
        dist.is_initialized() and dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
