"""bench/quick_search.py: which configuration of the quick check gives the best FID-10k in 6 minutes? (issue 11)

    python bench/quick_search.py --data D.zip --fid-model inception-fid-fp16.pt --only tiny_b128,small_b128 \\
        --seeds 0 --gpus 0,1,2,3

Each candidate is a set of train_tiny.py options on top of the h100 preset. A run is timed end to end as a new
user meets it: its own empty data cache (JPEG decoding, reference statistics) and its own empty torch.compile
cache, one evaluation at the end (FID of 10,000 samples, --evals 1 --eval-samples 10000 --final-samples 0;
the candidate h100_preset instead runs the default exactly as a user gets it).
Runs go one per GPU at a time (bench/compare.py's launcher); results merge into bench/results/quick_search.json
(keyed by candidate and seed), so a cut-off search continues where it stopped (--resume skips what is there).
The steps of each candidate aim at 350 s (the time model above CANDIDATES); the wall times measured say whether
they did. Prints a table, best FID first, of the candidates within --budget-s.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402
# Steps aim at 350 s on an H100 from the measured runs (small_b256: 344 s): wall ≈ 7 s start-up + 20 s data and
# reference statistics + 68 s compiling the step + steps × batch / the steady rate (H100: small b256 10,580 img/s,
# b128 8,930, tiny b128 14,150, small b512 11,810 = 1.12× b256) + the evaluation: 32 s (sampler compilation,
# Inception, FD) + the sampling (small UNet DDPM-250 ≈ 44 s, tiny 23 s; other step counts scaled by steps) + 3 s
# samples and checkpoint. Options the preset has changed since (batch 128 → 256, lr 5e-4 → 7e-4 → 1e-3, cool-down
# 0 → 1,500) are pinned, so that every candidate trains what it trained when it was measured. Setup, compiling and
# the sampler's compilation run on the host's CPU: a slower host adds a minute or more (lease 5 in bench/README).
# Since lease 7 the sampler's network compiles in a child process during training: the evaluation took 53 s on a
# slow host, against 87-97 s before; small_b256_lr1e3_9k spends the difference on steps.
SMALL = "--model small --dropout 0 --eval-samplers ddpm250 "
CANDIDATES = {  # name: train_tiny options on top of the h100 preset (warm-up 200, EMA 0.999, SpeeD)
    "h100_preset": "",  # the default as a user runs it: since 2026-12-07 the winner, small_b256_lr1e3
    # measured (bench/results/quick_search.json)
    "tiny_b128_20k": "--model tiny --dropout 0.1 --batch-size 128 --lr 5e-4 --cooldown 0 --steps 20000 "
                     "--eval-samplers ddpm250",
    "tiny_b128": "--model tiny --dropout 0.1 --batch-size 128 --lr 5e-4 --cooldown 0 --steps 22000 "
                 "--eval-samplers ddpm250",  # 369 s
    "preset_18k_3evals": "--model tiny --dropout 0.1 --batch-size 128 --lr 5e-4 --cooldown 0 --steps 18000 --evals 3 "
                         "--eval-samples 5000 --final-samples 10000",  # the preset until 2026-11-28
    "tiny_b128_20k_drop0": "--model tiny --dropout 0 --batch-size 128 --lr 5e-4 --cooldown 0 --steps 20000 "
                           "--eval-samplers ddpm250",
    "small_b128_drop0": SMALL + "--batch-size 128 --lr 5e-4 --cooldown 0 --steps 11000",
    "small_b128_lr1e3": SMALL + "--batch-size 128 --lr 1e-3 --cooldown 0 --steps 11000",
    "small_b128_ddim50": "--model small --dropout 0 --batch-size 128 --lr 5e-4 --cooldown 0 --steps 13500 "
                         "--eval-samplers ddim50",
    "small_b128_ema9995": SMALL + "--batch-size 128 --lr 5e-4 --cooldown 0 --steps 11000 --ema-decay 0.9995",
    "small_b256": SMALL + "--batch-size 256 --lr 7e-4 --cooldown 0 --steps 7500",
    "small_b256_cool": SMALL + "--batch-size 256 --lr 7e-4 --cooldown 1500 --steps 7500",  # lr to 0 over the last 20 %
    "small_b256_lr1e3": SMALL + "--batch-size 256 --lr 1e-3 --cooldown 1500 --steps 7500",
    # not run yet, all with the cool-down: dropout's share, SpeeD's and Min-SNR's, batch 512
    "small_b256_drop01": "--model small --dropout 0.1 --eval-samplers ddpm250 --batch-size 256 --lr 7e-4 "
                         "--cooldown 1500 --steps 7500",
    "small_b256_uniform": SMALL + "--batch-size 256 --lr 7e-4 --cooldown 1500 --steps 7500 --strategy uniform",
    "small_b256_min_snr": SMALL + "--batch-size 256 --lr 7e-4 --cooldown 1500 --steps 7500 --strategy min_snr",
    "small_b512": SMALL + "--batch-size 512 --lr 1e-3 --cooldown 840 --steps 4200",  # b256's images/s × 1.12
    # the preset (small_b256_lr1e3) with the 35-40 s the sampler's child frees spent on steps, or a higher peak lr
    "small_b256_lr1e3_9k": SMALL + "--batch-size 256 --lr 1e-3 --cooldown 1800 --steps 9000",
    "small_b256_lr15e4": SMALL + "--batch-size 256 --lr 1.5e-3 --cooldown 1500 --steps 7500",
}
# a probe, not a candidate (its wall time counts three samplers): what fewer sampling steps cost in FID on one
# network (metrics.json seconds.eval_<sampler>: what they save in time); small_b256_lr1e3_9k's training, derived
# from it so that the two cannot drift apart and the probe's DDPM-250 FID is one more seed of that candidate
CANDIDATES["probe_samplers"] = CANDIDATES["small_b256_lr1e3_9k"].replace("ddpm250", "ddpm250,ddpm100,ddpm50")


def job(name, seed, args):
    """compare.launch's job for one candidate and seed: its own empty data and torch.compile caches."""
    out, cache = os.path.join(args.work, f"{name}_s{seed}"), os.path.join(args.work, f"cache_{name}_s{seed}")
    shutil.rmtree(out, ignore_errors=True), shutil.rmtree(cache, ignore_errors=True)
    one_eval = ["--evals", "1", "--eval-samples", "10000", "--final-samples", "0"] if CANDIDATES[name] else []
    argv = ["--preset", "h100", "--data", args.data, "--fid-model", args.fid_model, "--seed", str(seed), "--quiet",
            "--out", out, "--cache", cache] + one_eval + CANDIDATES[name].split()
    return name, seed, out, argv, {"TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}


def host():
    """This machine's CPU model and count: setup, compiling and the sampler's compilation run there."""
    with contextlib.suppress(OSError):
        models = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        return f"{models[0]} × {os.cpu_count()}" if models else None


def result(name, out, wall):
    """A finished run's wall seconds (process start to exit), FID-10k and what produced it."""
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    # the preset's final FID-10k, else the one eval; a probe of several samplers: the first one's, all in `fids`
    fids = {s: m["final"][s] if m["final"] else curve[-1][1] for s, curve in m["evals"].items()}
    sampler = next(iter(fids))
    return dict(wall_s=wall, fid10k=fids[sampler], metric=m["metric"], sampler=sampler, steps=m["steps"],
                **({"fids": fids} if len(fids) > 1 else {}),
                options=CANDIDATES[name], device=m["device"], img_per_s=m["history"][-1]["img_per_s"],
                seconds=m.get("seconds"), host=host())  # seconds: setup (data, reference stats), evals, final


def summary(results):
    """{candidate: (runs, FID mean, FID std, max wall)}, best FID first. Keys are name_sSEED, or name_sSEED@lease for
    a rerun of that seed on another lease (it never overwrites the first run and counts as a run of its candidate)."""
    table = {}
    for key, r in results.items():
        t = table.setdefault(re.sub(r"_s\d+(@\w+)?$", "", key), dict(fid=[], wall=[]))
        t["fid"].append(r["fid10k"]), t["wall"].append(r["wall_s"])
    rows = {name: (len(t["fid"]), *compare.mean_std(t["fid"]), max(t["wall"])) for name, t in table.items()}
    return dict(sorted(rows.items(), key=lambda kv: kv[1][1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--fid-model", required=True, help="the Inception TorchScript file")
    p.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidates: " + ", ".join(CANDIDATES))
    p.add_argument("--seeds", default="0")
    p.add_argument("--gpus", default="0")
    p.add_argument("--work", default="/tmp/quick_search", help="run folders and caches (emptied per run)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "quick_search.json"))
    p.add_argument("--budget-s", type=float, default=360.0)
    p.add_argument("--resume", action="store_true", help="skip candidate/seed pairs already in --out")
    args = p.parse_args()
    names = args.only.split(",")
    bad = [n for n in names if n not in CANDIDATES]
    if bad:
        raise SystemExit(f"quick_search: --only {','.join(bad)}: unknown; valid: {', '.join(CANDIDATES)}")
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` stops the runs like Ctrl-C
    jobs = [job(n, s, args) for n in names for s in map(int, args.seeds.split(","))
            if not (args.resume and f"{n}_s{s}" in results)]
    walls = {}
    try:  # one run per GPU at a time; a cut-off search (Ctrl-C, SIGTERM) keeps the runs that finished
        failed = compare.launch(jobs, [int(g) for g in args.gpus.split(",")], 1, prepare=False, walls=walls)
    except KeyboardInterrupt:
        failed = []
    for name, seed, out, _, _ in jobs:
        if (name, seed) in walls:
            results[f"{name}_s{seed}"] = r = result(name, out, walls[name, seed])
            print(f"{name} seed {seed}: {r['metric']}-10k {r['fid10k']:.2f} ({r['sampler']}) in {r['wall_s']:.0f} s")
    for name, seed, status in failed:
        print(f"{name} seed {seed} failed (exit {status}): see its log.txt in {args.work}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"{'candidate':<22}{'runs':>6}{'FID-10k mean ± std':>22}{'wall s (max)':>14}  within budget")
    for name, (n, mean, std, wall) in summary(results).items():
        ok = "yes" if wall <= args.budget_s else "no"
        print(f"{name:<22}{n:>6}{f'{mean:.2f} ± {std:.2f}':>22}{wall:>14.0f}  {ok}")


if __name__ == "__main__":
    main()
