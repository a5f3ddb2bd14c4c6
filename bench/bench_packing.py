"""bench/bench_packing.py: does running several training runs on one GPU finish the comparison sooner?

    python bench/bench_packing.py --layout 1,2,3,4 --out bench/results/packing.json    (one GPU per entry)

The comparison (bench/compare.py) trains dozens of tiny UNets at batch 128. One such run leaves the
GPU mostly idle between small kernels (bench/README.md, profile), so packing runs could pay. Each
layout entry takes one GPU: "n" runs n processes on it side by side (the driver time-slices them),
"nmps" the same under an MPS daemon (kernels of the processes may overlap; on the lent H200 machines
the daemon started but its clients saw no GPU, 2026-11-28). Every process trains
the tiny UNet at batch 128 with the whole-step graph and the compiled network on random images,
waits until all processes of the machine are warm, and times training steps and DDPM sampling
(2,500 images, 50 steps) in the same window. The total img/s of a GPU over one process's is the gain.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import speed  # noqa: E402


def barrier(folder, name, n, timeout=200):
    """Wait until n processes have written their name into `folder`."""
    open(os.path.join(folder, name), "w").close()
    t = time.time()
    while len(os.listdir(folder)) < n:
        if time.time() - t > timeout:
            raise TimeoutError(f"barrier {folder}: {len(os.listdir(folder))} of {n}")
        time.sleep(0.05)


def worker(args):
    """One training process; one that fails still passes both barriers, so the others are not held up."""
    try:
        measure(args)
    except BaseException:
        for d in ("train", "sample"):
            open(os.path.join(args.sync, d, args.name), "w").close()
        raise


def measure(args):
    """Warm up, meet the others, time `--seconds` of training, then of sampling."""
    torch.manual_seed(0)
    model = speed.make_unet("tiny")
    sch = speed.make_schedule()
    imgs = torch.randint(0, 256, (16384, 3, 32, 32), dtype=torch.uint8)
    state = {}

    def cb(r):
        if "t0" not in state:  # warm (compiled and captured): wait for every process, then start the clock
            barrier(os.path.join(args.sync, "train"), args.name, args.total)
            torch.cuda.synchronize()
            state.update(t0=time.perf_counter(), s0=r.step)
        elif time.perf_counter() - state["t0"] > args.seconds:
            torch.cuda.synchronize()
            state["train_img_s"] = (r.step - state["s0"]) * 128 / (time.perf_counter() - state["t0"])
            return True
    speed.train(model, imgs, sch, speed.make_strategy("speed", sch), steps=10 ** 6, batch_size=128, compile=True,
                device="cuda", progress=False, log_every=10 ** 6, callback=cb, callback_every=200)
    net = model.eval()
    g = torch.Generator(device="cuda")
    speed.ddpm_sample(net, sch, 2500, steps=5, batch_size=2500, generator=g.manual_seed(0))  # capture and warm up
    barrier(os.path.join(args.sync, "sample"), args.name, args.total)
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < args.seconds / 2:
        speed.ddpm_sample(net, sch, 2500, steps=50, batch_size=2500, generator=g.manual_seed(0))
        torch.cuda.synchronize()
        n += 2500 * 50
    print(json.dumps(dict(name=args.name, train_img_s=state["train_img_s"],
                          sample_img_steps_s=n / (time.perf_counter() - t))), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layout", default="1,2,3,4", help="one entry per GPU: n processes, or nmps under MPS")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "packing.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", default="")
    p.add_argument("--sync", default="")
    p.add_argument("--total", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    layout = args.layout.split(",")
    total = sum(int(e.replace("mps", "")) for e in layout)
    sync = "/tmp/packing_sync"
    shutil.rmtree(sync, ignore_errors=True)
    for d in ("train", "sample"):
        os.makedirs(os.path.join(sync, d))
    procs, daemons = [], []
    for gpu, entry in enumerate(layout):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        if entry.endswith("mps"):  # one MPS daemon serving only this GPU, reached through its own pipe folder
            env.update(CUDA_MPS_PIPE_DIRECTORY=f"/tmp/mps{gpu}", CUDA_MPS_LOG_DIRECTORY=f"/tmp/mpslog{gpu}")
            os.makedirs(f"/tmp/mps{gpu}", exist_ok=True)
            os.makedirs(f"/tmp/mpslog{gpu}", exist_ok=True)
            ok = shutil.which("nvidia-cuda-mps-control") and subprocess.run(
                ["nvidia-cuda-mps-control", "-d"], env=env).returncode == 0
            print(f"GPU {gpu}: MPS daemon {'started' if ok else 'NOT available'}", flush=True)
            daemons.append(env) if ok else None
        for i in range(int(entry.replace("mps", ""))):
            cmd = [sys.executable, __file__, "--worker", "--name", f"{entry}@{gpu}.{i}", "--sync", sync,
                   "--total", str(total), "--seconds", str(args.seconds)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    rows = []
    for pr in procs:
        out, _ = pr.communicate()
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for env in daemons:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env)
    gpus = {}
    for r in rows:
        entry = r["name"].split("@")[0]
        g = gpus.setdefault(entry, dict(processes=0, train_img_s=0.0, sample_img_steps_s=0.0))
        g["processes"] += 1
        g["train_img_s"] += r["train_img_s"]
        g["sample_img_steps_s"] += r["sample_img_steps_s"]
    res = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, seconds=args.seconds, per_gpu=gpus,
               runs=rows, complete=len(rows) == total)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    base = gpus.get("1")
    for entry, g in gpus.items():
        gain = f"  train x{g['train_img_s'] / base['train_img_s']:.2f}, sample x" \
               f"{g['sample_img_steps_s'] / base['sample_img_steps_s']:.2f}" if base else ""
        print(f"{entry:>5}: {g['processes']} proc, train {g['train_img_s']:,.0f} img/s, "
              f"sample {g['sample_img_steps_s']:,.0f} img-steps/s{gain}")
    sys.exit(0 if res["complete"] else 1)


if __name__ == "__main__":
    main()
