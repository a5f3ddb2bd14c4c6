"""bench/bench_multi_gpu.py: data-parallel training throughput on 1 and N GPUs of one host.

    python bench/bench_multi_gpu.py --model ddpm --batch 256 --tag 1gpu          # one process, one GPU
    torchrun --nproc_per_node=2 bench/bench_multi_gpu.py --model ddpm --batch 256 --tag 2gpu
    python bench/bench_multi_gpu.py --merge                                         # -> results/multi_gpu.json

--batch is the global batch (split over the ranks). Each run appends one line to
results/multi_gpu_runs.jsonl; --merge writes multi_gpu.json with efficiency = img/s(N) / (N img/s(1)).
Random uint8 images stand in for data: throughput does not depend on the pixels.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # needed to capture NCCL calls in a CUDA graph
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import speed  # noqa: E402
from bench_speed import images  # noqa: E402  (random uint8 images, the same as bench_speed's)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(args):
    if "WORLD_SIZE" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = speed.make_unet(args.model)
    sch = speed.make_schedule()
    r = speed.train(model, images(), sch, speed.make_strategy("speed", sch), steps=args.steps, batch_size=args.batch,
                    log_every=args.steps // 2, progress=False, graph=not args.eager, compile=args.compile)
    if not dist.is_initialized() or dist.get_rank() == 0:
        rec = dict(tag=args.tag, model=args.model, batch=args.batch, world=world, graph=not args.eager, compile=args.compile,
                   img_s=r.history[-1]["img_per_s"], device=torch.cuda.get_device_name())
        print(json.dumps(rec), flush=True)
        with open(os.path.join(args.out_dir, "multi_gpu_runs.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


def merge(args):
    runs = [json.loads(line) for line in open(os.path.join(args.out_dir, "multi_gpu_runs.jsonl"))]
    rows = []
    for one in [r for r in runs if r["world"] == 1]:
        for many in [r for r in runs if r["world"] > 1 and (r["model"], r["batch"], r["graph"], r.get("compile")) ==
                     (one["model"], one["batch"], one["graph"], one.get("compile"))]:
            rows.append(dict(device=one["device"], model=one["model"], batch=one["batch"], graph=one["graph"],
                             compile=one.get("compile", False),
                             gpus=many["world"], img_s_1=one["img_s"], **{f"img_s_{many['world']}": many["img_s"]},
                             efficiency=many["img_s"] / (many["world"] * one["img_s"])))
    main_row = max((r for r in rows if r["model"] == "ddpm"), key=lambda r: r["efficiency"], default={})
    with open(os.path.join(args.out_dir, "multi_gpu.json"), "w") as f:
        json.dump({**main_row, "all": rows}, f, indent=1)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ddpm", choices=list(speed.UNET_SIZES))
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eager", action="store_true", help="no CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (inside the graph)")
    p.add_argument("--tag", default="")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--merge", action="store_true")
    a = p.parse_args()
    merge(a) if a.merge else run(a)
