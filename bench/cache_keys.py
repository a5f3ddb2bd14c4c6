"""bench/cache_keys.py: why did a process miss torch.compile's on-disk cache? Reads the structured logs of a run
made with TORCH_TRACE=DIR (one file per process: train_tiny and its child), lists each process's FX-graph cache
events, and for every miss names the key's components that differ from the closest entry of another process.

    TORCH_TRACE=/tmp/trace python train_tiny.py ...        # on the GPU machine; then, anywhere:
    python bench/cache_keys.py /tmp/trace

A component is one line of Inductor's cache key ("[hash] name: value"): the graph, each input's metadata (shape,
strides, dtype, requires_grad), the backend flags and Inductor's config. Two processes share an entry only when all
of them agree (issue 11: the quick check's evaluation took ~29 s longer than with the child's entry).
"""
import glob
import json
import os
import sys

KINDS = ("fx_graph_cache_hit", "fx_graph_cache_miss", "fx_graph_cache_bypass")


def events(path):
    """[(artifact name, payload)] of a TORCH_TRACE log's FX-graph cache events, in order."""
    out, lines = [], open(path, errors="replace").read().split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("V") or '"artifact"' not in line:
            continue
        head = json.loads(line[line.index("] ") + 2:])
        if head["artifact"]["name"] not in KINDS:
            continue
        body = []
        for nxt in lines[i + 1:]:
            if not nxt.startswith("\t"):
                break
            body.append(nxt[1:])
        out.append((head["artifact"]["name"], json.loads("\n".join(body))))
    return out


def parts(payload):
    """{component name: its hash}: a component reads '[hash] name: value'."""
    out = {}
    for c in payload.get("components", []):
        h, rest = c[1:].split("] ", 1)
        out[rest.split(": ", 1)[0]] = (h, rest)
    return out


def differences(a, b):
    """The components of a and b (parts()) whose hashes differ, or that only one has: [(name, a's line, b's)]."""
    return [(k, a.get(k, (None, "-"))[1], b.get(k, (None, "-"))[1])
            for k in sorted(a.keys() | b.keys()) if a.get(k, (None,))[0] != b.get(k, (None,))[0]]


def explain(folder, width=300):
    logs = {os.path.basename(p): events(p) for p in sorted(glob.glob(os.path.join(folder, "*.log")))}
    for name, evs in logs.items():
        print(f"{name}: " + (", ".join(f"{k.split('_')[-1]} {p['key'][:10]}" for k, p in evs) or "no cache events"))
    for name, evs in logs.items():
        for kind, p in evs:
            if kind != "fx_graph_cache_miss":
                continue
            mine = parts(p)  # the closest entry another process wrote or read: most components in common
            others = [(o, parts(q)) for o, oevs in logs.items() if o != name for _, q in oevs]
            if not others:
                continue
            other, theirs = min(others, key=lambda x: len(differences(mine, x[1])))
            diff = differences(mine, theirs)
            print(f"\n{name} missed {p['key'][:10]}; closest: {other} ({len(diff)} components differ)")
            for k, x, y in diff[:20]:
                print(f"  {k}\n    this:  {x[:width]!r}\n    other: {y[:width]!r}")
    return logs


if __name__ == "__main__":
    explain(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trace")
