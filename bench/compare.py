"""bench/compare.py: train strategies side by side, one train_tiny.py run per strategy and seed, and compare
their quality curves under each sampler: a table, a plot and the speed-up factors.

    python bench/compare.py --strategies uniform,speed --seeds 0,1,2 --out bench/results/full \\
        --gpus 0,1 --per-gpu 4 -- --data ../shared/data/cifar10-train-jpeg75.zip --model tiny --dropout 0.1 \\
        --batch-size 128 --lr 5e-4 --cooldown 0 --steps 20000 --evals 10 --eval-samplers ddpm250,ddim25 \\
        --eval-samples 5000 --final-samples 10000
    python bench/compare.py ... --resume        # continue unfinished runs from their checkpoints, skip finished ones
    python bench/compare.py ... --summarize     # only rebuild compare.json, compare.md and compare.png
    python bench/compare.py --strategies uniform,speed:k=1 --out arm2 --summarize --runs-from arm1  # reuse arm1's runs

Everything after `--` goes to every run (see python train_tiny.py --help). Writes to --out one folder per run
(train_tiny's outputs and log.txt) and compare.json (per-run curves for every sampler and the speed-ups),
compare.md (the table) and compare.png (quality vs steps, one panel per sampler).

Speed-up of a strategy, per sampler: the steps the baseline (the first strategy) needs to reach its own final
quality, divided by the steps the strategy needs to reach it (first crossing, linearly interpolated between
evaluations), per seed and on the mean curve over seeds. It is not given from fewer than 3 evaluations.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_tiny  # noqa: E402

TRAIN_TINY = os.path.abspath(train_tiny.__file__)
PER_RUN = ("--strategy", "--seed", "--out", "--resume")  # set by compare for each run
MIN_EVALS = 3


# ---- Speed-up: steps to reach the baseline's own final quality

def steps_to_reach(steps, fd, target):
    """First step at which the curve (steps, fd) reaches fd <= target, linearly interpolated between
    evaluations; None if it never does. Lower is better; curves need not be monotone."""
    for i, (s, f) in enumerate(zip(steps, fd)):
        if f <= target:
            if i == 0:
                return float(s)
            s0, f0 = steps[i - 1], fd[i - 1]
            return float(s0 + (s - s0) * (f0 - target) / (f0 - f))
    return None


def speedup(base_steps, base_fd, steps, fd):
    """(factor, steps needed): the baseline's steps to its own final fd / the strategy's steps to that fd."""
    need_base, need = steps_to_reach(base_steps, base_fd, base_fd[-1]), steps_to_reach(steps, fd, base_fd[-1])
    return (need_base / need if need else None), need


def steps_to_levels(curves, base, levels):
    """For each curve {spec: {"steps", "mean"}} and each quality level: (steps to reach it, the base curve's
    steps to reach it / those steps); None where a curve never reaches the level."""
    def reach(spec, level):
        return steps_to_reach(curves[spec]["steps"], curves[spec]["mean"], level)
    return {spec: [(reach(spec, lv), reach(base, lv) / reach(spec, lv) if reach(spec, lv) and reach(base, lv)
                    is not None else None) for lv in levels] for spec in curves}


def best_point(curve):
    """(quality, step) of the lowest point of each seed's curve {"steps", "per_seed"}, both averaged over seeds; None
    without seeds. Where curves turn up again (small data) this says more than the last point."""
    best = [(min(v), curve["steps"][v.index(min(v))]) for v in curve["per_seed"].values()]
    return (sum(f for f, _ in best) / len(best), sum(st for _, st in best) / len(best)) if best else None


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


# ---- Summary: compare.json, compare.md, compare.png from the runs' metrics files

def run_dir(out, spec, seed):
    return os.path.join(out, f"{spec.replace(':', '_').replace('=', '')}_s{seed}")


def load_runs(out, specs, seeds, runs_from=None):
    """{(spec, seed): metrics} of every run that wrote metrics (metrics.partial.json: unfinished); a run missing
    from `out` is looked up in `runs_from` (another arm's folder: the attribution arm reuses the full arm's)."""
    runs = {}
    for spec in specs:
        for seed in seeds:
            paths = [os.path.join(run_dir(d, spec, seed), name) for d in (out, runs_from) if d
                     for name in ("metrics.json", "metrics.partial.json")]
            for path in filter(os.path.exists, paths):
                with open(path) as f:
                    runs[spec, seed] = dict(json.load(f), folder=os.path.dirname(path))
                break
    return runs


def summarize(out, specs, seeds, quiet=False, runs_from=None):
    """Curves, final quality and speed-ups per sampler; writes compare.json, compare.md and compare.png."""
    runs = load_runs(out, specs, seeds, runs_from)
    if not runs:
        raise SystemExit(f"compare: no runs with metrics under {out}")
    first = next(iter(runs.values()))
    samplers = list(dict.fromkeys(s for r in runs.values() for s in r["evals"]))
    base, curves, rows = specs[0], {}, {spec: dict(strategy=spec, seeds=sorted(sd for sp, sd in runs if sp == spec))
                                          for spec in specs}
    for sampler in samplers:
        # Runs may be at different steps (unfinished): compare on the evaluation steps all runs have.
        common = sorted(set.intersection(*[{s for s, _ in r["evals"].get(sampler, [])} for r in runs.values()]))
        per_seed = {k: [f for s, f in r["evals"].get(sampler, []) if s in common] for k, r in runs.items()}
        curves[sampler] = {spec: dict(steps=common, per_seed={str(sd): per_seed[spec, sd] for sd in seeds
                                                              if (spec, sd) in runs}) for spec in specs}
        for spec, c in curves[sampler].items():
            c["mean"] = [sum(v[i] for v in c["per_seed"].values()) / len(c["per_seed"]) for i in range(len(common))] \
                if c["per_seed"] else []
        for spec in specs:
            rows[spec][sampler] = sampler_row(runs, curves[sampler], base, spec, sampler, common)
    summary = dict(metric=first["metric"], baseline=base, samplers=samplers, data=first["data"],
                   device=first["device"], rows=list(rows.values()), curves=curves,
                   runs={f"{spec}_s{sd}": dict(strategy=spec, seed=sd, steps=r["steps"], finished=r["finished"],
                                               evals=r["evals"], final=r["final"], final_samples=r["final_samples"],
                                               wall_s=r["wall_s"], folder=os.path.relpath(r["folder"], out))
                         for (spec, sd), r in runs.items()})
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = markdown(summary)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(table + "\n")
    plot(summary, os.path.join(out, "compare.png"))
    quiet or print(table)
    return summary


def sampler_row(runs, curves, base, spec, sampler, common):
    """Final quality (mean ± std over seeds) and speed-ups of one strategy under one sampler."""
    finals, n = [], set()
    for (sp, _), r in runs.items():
        if sp == spec and r["evals"].get(sampler):
            fin = (r.get("final") or {}).get(sampler)
            finals.append(fin if fin is not None else r["evals"][sampler][-1][1])
            n.add(r["final_samples"] if fin is not None else r["config"]["eval_samples"])
    row = dict(zip(("final_mean", "final_std"), mean_std(finals)), final_samples=sorted(n),
               speedup_mean_curve=None, steps_to_base_final=None, speedup_per_seed={}, speedup_seed_mean=None,
               speedup_seed_std=None, not_reached_seeds=0, note=None)
    b, c = curves.get(base, {}), curves[spec]
    if len(common) < MIN_EVALS:
        row["note"] = f"no speed-up: {len(common)} common evaluations, at least {MIN_EVALS} needed"
        return row
    if not b.get("mean") or not c["mean"]:
        row["note"] = "no speed-up: the baseline or this strategy has no runs"
        return row
    row["speedup_mean_curve"], row["steps_to_base_final"] = speedup(common, b["mean"], common, c["mean"])
    for sd, fds in c["per_seed"].items():
        if sd in b["per_seed"]:
            row["speedup_per_seed"][sd] = speedup(common, b["per_seed"][sd], common, fds)[0]
    row["speedup_seed_mean"], row["speedup_seed_std"] = mean_std(row["speedup_per_seed"].values())
    row["not_reached_seeds"] = sum(v is None for v in row["speedup_per_seed"].values())
    return row


def markdown(summary):
    """One table: final quality and speed-up under every sampler, side by side."""
    fmt = lambda x, d=2: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    metric, samplers = summary["metric"] or "FD", summary["samplers"]
    head = ["strategy", "seeds"] + [f"{metric} {s} (mean ± std)" for s in samplers] + \
           [f"speed-up {s} vs {summary['baseline']}: mean curve; per seed mean ± std" for s in samplers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if samplers else [
        "no quality measured (runs without a feature net: --fid-model none)"]
    for r in summary["rows"]:
        q = [f"{fmt(r[s]['final_mean'])} ± {fmt(r[s]['final_std'])} (n={'/'.join(map(str, r[s]['final_samples']))})"
             for s in samplers]
        sp = [r[s]["note"] or (("not reached" if r[s]["speedup_mean_curve"] is None else
                                f"{r[s]['speedup_mean_curve']:.2f}×") + f"; {fmt(r[s]['speedup_seed_mean'])} ± "
                               f"{fmt(r[s]['speedup_seed_std'])}" + (f" ({r[s]['not_reached_seeds']} seeds not reached)"
                                                                     if r[s]["not_reached_seeds"] else ""))
              for s in samplers]
        samplers and lines.append("| " + " | ".join([r["strategy"], str(len(r["seeds"]))] + q + sp) + " |")
    return "\n".join(lines)


def draw_curves(ax, curves):
    """One sampler's curves {spec: {steps, mean, per_seed}} on ax: the mean over seeds, a band from min to max."""
    for spec, c in curves.items():
        if c["mean"]:
            line, = ax.plot(c["steps"], c["mean"], marker="o", ms=3, label=f"{spec} ({len(c['per_seed'])} seeds)")
            v = list(c["per_seed"].values())
            ax.fill_between(c["steps"], [min(x) for x in zip(*v)], [max(x) for x in zip(*v)],
                            color=line.get_color(), alpha=0.15)


def plot(summary, path):
    """Quality vs training steps, one panel per sampler: mean over seeds, band from min to max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samplers = summary["samplers"] or ["none"]
    fig, axes = plt.subplots(1, len(samplers), figsize=(6 * len(samplers), 4), squeeze=False)
    for ax, sampler in zip(axes[0], samplers):
        draw_curves(ax, summary["curves"].get(sampler, {}))
        ax.set(xlabel="training step", ylabel=f"{summary['metric']} (lower is better)", yscale="log", title=sampler)
        ax.grid(alpha=0.3, which="both")
        ax.get_legend_handles_labels()[0] and ax.legend(fontsize=7)
    fig.tight_layout()
    save_plot(fig, path, dpi=110)


def save_plot(fig, path, dpi):
    """fig -> a 256-colour PNG (line plots lose nothing visible, a third of the size: the repository travels to
    the GPU machine with every call), then closed."""
    import io
    import matplotlib.pyplot as plt
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


# ---- Launching: one train_tiny.py process per run, several per GPU, across the GPUs of a host

def plan(args, train_args):
    """[(spec, seed, folder, argv)] of the runs still to do; OptionError for a bad option of any run."""
    jobs = []
    for spec in args.strategies:
        for seed in args.seeds:
            d = run_dir(args.out, spec, seed)
            if os.path.exists(os.path.join(d, "metrics.json")):
                if not args.resume:
                    raise train_tiny.OptionError(f"--out {args.out} holds finished runs; pass --resume to continue "
                                                 f"the unfinished ones, or choose another --out")
                continue
            resume = args.resume and os.path.exists(os.path.join(d, "ckpt.pt"))
            argv = train_args + ["--strategy", spec, "--seed", str(seed), "--out", d, "--quiet"] + \
                (["--resume"] if resume else [])
            try:
                train_tiny.parse_args(argv)
            except train_tiny.OptionError as e:  # this run's --strategy is one of our --strategies
                raise train_tiny.OptionError(str(e).replace(f"--strategy {spec}", f"--strategies: {spec}", 1)) from None
            if os.path.exists(os.path.join(d, "ckpt.pt")) and not resume:
                raise train_tiny.OptionError(f"--out {args.out} holds a checkpoint in {d}; pass --resume to "
                                             f"continue it, or choose another --out")
            jobs.append((spec, seed, d, argv))
    return jobs


def launch(jobs, gpus, per_gpu, prepare=True, walls=None):
    """Run the jobs (spec, seed, folder, argv[, extra environment]), per_gpu at a time on each GPU
    (CUDA_VISIBLE_DEVICES per run; on the CPU per_gpu at a time), CPU threads split evenly between them.
    Returns [(spec, seed, exit status)] of failed runs; `walls` (a dict) gets each finished run's seconds."""
    slots = [g for g in (gpus or [None]) for _ in range(per_gpu)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // len(slots)))}
    if prepare and jobs:  # decode the data and compute the reference statistics once, before the runs share them
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(TRAIN_TINY)!r}); import train_tiny\n"
                f"try: train_tiny.prepare_reference(train_tiny.parse_args(sys.argv[1:]))\n"
                f"except (train_tiny.DataError, train_tiny.OptionError) as e: sys.exit(f'train_tiny: {{e}}')")
        subprocess.run([sys.executable, "-c", code] + jobs[0][3], check=True,
                       env={**env, **({"CUDA_VISIBLE_DEVICES": str(slots[0])} if slots[0] is not None else {})})
    jobs, running, failed, free = list(jobs), [], [], list(slots)
    try:
        while jobs or running:
            while jobs and free:
                spec, seed, d, argv, *extra = jobs.pop(0)
                gpu = free.pop(0)
                os.makedirs(d, exist_ok=True)
                log = open(os.path.join(d, "log.txt"), "a")
                proc = subprocess.Popen([sys.executable, TRAIN_TINY] + argv, stdout=log, stderr=subprocess.STDOUT,
                                        env={**env, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}),
                                             **(extra[0] if extra else {})},
                                        start_new_session=True)  # a Ctrl-C reaches the runs once, through compare
                running.append((spec, seed, gpu, proc, log, time.time()))
                print(f"compare: started {spec} seed {seed}" + (f" on GPU {gpu}" if gpu is not None else ""), flush=True)
            for r in [r for r in running if r[3].poll() is not None]:
                running.remove(r)
                r[4].close()
                free.append(r[2])
                print(f"compare: {r[0]} seed {r[1]} exited with {r[3].returncode}", flush=True)
                if r[3].returncode:
                    failed.append((r[0], r[1], r[3].returncode))
                elif walls is not None:
                    walls[r[0], r[1]] = time.time() - r[5]
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every run checkpoints and stops
        for r in running:
            r[3].poll() is None and r[3].send_signal(signal.SIGINT)
        for r in running:
            r[3].wait()
        raise
    return failed


def parse_args(argv):
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = train_tiny._Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    p.add_argument("--strategies", required=True, help="comma-separated; first = baseline", type=train_tiny._arg(
        lambda s: s.split(","), lambda v: len(set(v)) == len(v), "comma-separated strategies, each once"))
    p.add_argument("--seeds", default=[0], help="comma-separated seeds", type=train_tiny._arg(
        lambda s: [int(x) for x in s.split(",")], lambda v: min(v) >= 0 and len(set(v)) == len(v),
        "comma-separated integers >= 0, each once"))
    p.add_argument("--out", default=os.path.join("runs", "compare"), help="folder for the runs and the summary")
    p.add_argument("--gpus", help="comma-separated GPU ids (default: all visible; none on a CPU)", type=train_tiny._arg(
        lambda s: [int(x) for x in s.split(",")], lambda v: min(v) >= 0, "comma-separated GPU ids"))
    p.add_argument("--per-gpu", type=train_tiny._arg(int, lambda v: v >= 1, "an integer >= 1"), default=1,
                   help="runs sharing one GPU (or the CPU) at once")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs, skip finished ones")
    p.add_argument("--summarize", action="store_true", help="only rebuild the summary from the runs' metrics")
    p.add_argument("--runs-from", help="with --summarize: read runs missing from --out from this folder")
    args = p.parse_args(own)
    clash = [a for a in train_args if a.split("=")[0] in PER_RUN]
    if clash:
        raise train_tiny.OptionError(f"{clash[0]}: set per run by compare (--strategies, --seeds, --out, --resume)")
    import torch
    n = torch.cuda.device_count()
    if args.gpus is not None and max(args.gpus) >= n:
        raise train_tiny.OptionError(f"--gpus {','.join(map(str, args.gpus))}: no such GPU; valid: " +
                                     (f"ids 0 .. {n - 1}" if n else "none (this machine has no CUDA GPU)"))
    args.gpus = args.gpus if args.gpus is not None else list(range(n))
    return args, train_args


def main(argv=None):
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the runs like Ctrl-C
    try:
        args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.runs_from and not args.summarize:
            raise train_tiny.OptionError("--runs-from: only with --summarize")
        if args.summarize:
            summarize(args.out, args.strategies, args.seeds, runs_from=args.runs_from)
            return 0
        jobs = plan(args, train_args)
    except (train_tiny.OptionError, ValueError) as e:
        print(f"compare: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        failed = launch(jobs, args.gpus, args.per_gpu)
    except subprocess.CalledProcessError as e:
        print(f"compare: preparing the data and reference statistics failed (exit status {e.returncode})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare: interrupted; continue with --resume", file=sys.stderr)
        return 130
    if load_runs(args.out, args.strategies, args.seeds):
        summarize(args.out, args.strategies, args.seeds)
    for spec, seed, status in failed:
        print(f"compare: {spec} seed {seed} failed (exit status {status}); see "
              f"{os.path.join(run_dir(args.out, spec, seed), 'log.txt')}", file=sys.stderr)
    print(f"compare: outputs in {args.out} (compare.json, compare.md, compare.png, one folder per run)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
