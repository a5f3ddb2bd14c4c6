"""bench/bench_decode.py: seconds to decode a dataset zip's images (the quick check's first setup step) three ways:
in one thread, in 16 threads (train_tiny's read_images until 2026-12-07) and in forked processes (its
decode_images since). Prints one JSON line: the host, the image count, seconds per way (all three give the same images).

    python bench/bench_decode.py --data ../shared/data/cifar10-train-jpeg75.zip >> bench/results/decode.jsonl
"""
import argparse
import json
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_tiny  # noqa: E402
from quick_search import host  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
args = p.parse_args()
with zipfile.ZipFile(args.data) as z:  # the files' bytes, read once: the ways differ only in decoding them
    names = sorted(n for n in z.namelist() if n.lower().endswith(train_tiny.IMAGE_EXTS))
    items = [(n, z.read(n)) for n in names]


def threads():  # one image per task, as read_images had it
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda it: train_tiny._decode([it])[0], items))


ways = {"one_thread": lambda: train_tiny._decode(items), "threads_16": threads,
        "processes": lambda: train_tiny.decode_images(items)}
seconds, first = {}, None
for name, way in ways.items():
    t = time.perf_counter()
    imgs = way()
    seconds[name] = round(time.perf_counter() - t, 2)
    assert len(imgs) == len(items) and all((a == b).all() for a, b in zip(first or imgs, imgs)), name  # the same
    first = first or imgs
print(json.dumps(dict(host=host(), cpus=os.cpu_count(), images=len(items), seconds=seconds)))
