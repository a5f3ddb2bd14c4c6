"""bench/cache_keys.py: why did a process miss torch.compile's on-disk cache? Reads the structured logs of a run
made with TORCH_TRACE=DIR (one file per process: train_tiny and its child), lists each process's compiled frames
(compile seconds, cache hits and misses) and FX-graph cache events, and for every miss names the key's
components that differ from the closest entry of another process.

    TORCH_TRACE=/tmp/trace python train_tiny.py ...        # on the GPU machine (bench/run_quick_trace.sh); then:
    python bench/cache_keys.py /tmp/trace

A component is one line of Inductor's cache key ("[hash] name: value"): the graph, each input's metadata (shape,
strides, dtype, requires_grad), the backend flags and Inductor's config. Two processes share an entry only when all
of them agree (issue 11: the quick check's evaluation took ~29 s longer than with the child's entry). A miss with
no differing component is the first writer of that entry (the child, expected) or an entry that failed to load.
"""
import glob
import json
import os
import re
import sys

CACHE_EVENT = re.compile(r"fx_graph\w*cache_(hit|miss|bypass)$")  # also the bundled cache's names


def records(text):
    """[(header, payload or None)] of a TORCH_TRACE log's text: a 'V... file:line] {json}' line, then its payload's
    lines, each after a tab. A record cut short (a killed process) is skipped."""
    out, lines = [], text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("V") or "] {" not in line:
            continue
        body = []
        for nxt in lines[i + 1:]:
            if not nxt.startswith("\t"):
                break
            body.append(nxt[1:])
        try:
            head = json.loads(line[line.index("] {") + 2:])
            payload = json.loads("\n".join(body)) if body and body[0].lstrip().startswith("{") else None
        except ValueError:
            continue
        out.append((head, payload))
    return out


def events(recs):
    """[(kind, payload)] of the FX-graph cache events: kind hit, miss or bypass."""
    return [(CACHE_EVENT.search(h["artifact"]["name"])[1], p or {}) for h, p in recs
            if CACHE_EVENT.search(h.get("artifact", {}).get("name", ""))]


def frames(recs):
    """Each compiled frame's metrics: function, seconds, FX-graph and AOT-autograd cache counts."""
    keep = ("co_name", "entire_frame_compile_time_s", "inductor_fx_local_cache_hit_count",
            "inductor_fx_local_cache_miss_count", "aotautograd_local_cache_hit_count", "aotautograd_local_cache_miss_count")
    return [{k: h["compilation_metrics"].get(k) for k in keep} for h, _ in recs if "compilation_metrics" in h]


def parts(payload):
    """{component name: (its hash, the whole line)}: a component reads '[hash] name: value'."""
    out = {}
    for c in payload.get("components", []):
        h, rest = c[1:].split("] ", 1)
        out[rest.split(": ", 1)[0]] = (h, rest)
    return out


def differences(a, b):
    """The components of a and b (parts()) whose hashes differ, or that only one has: [(name, a's line, b's)]."""
    return [(k, a.get(k, (None, "-"))[1], b.get(k, (None, "-"))[1])
            for k in sorted(a.keys() | b.keys()) if a.get(k, (None,))[0] != b.get(k, (None,))[0]]


def around(x, y, width):
    """The two texts from a little before their first differing character, `width` characters each."""
    i = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    s = max(0, i - width // 4)
    return x[s:s + width], y[s:s + width]


def explain(folder, width=240, inputs_shown=3):
    logs, evs = {}, {}  # each file read once; its cache events (with their key components) taken once
    for p in sorted(glob.glob(os.path.join(folder, "*.log"))):
        text = open(p, errors="replace", newline="").read()
        name = f"{os.path.basename(p)} ({'child' if 'prepare_evaluation' in text else 'trainer'})"
        logs[name] = records(text)
        evs[name] = [(kind, q, parts(q)) for kind, q in events(logs[name])]
    for name, recs in logs.items():
        print(f"{name}:")
        for f in frames(recs):
            print(f"  frame {f['co_name']}: {f['entire_frame_compile_time_s']} s compiling; FX graphs hit "
                  f"{f['inductor_fx_local_cache_hit_count']} missed {f['inductor_fx_local_cache_miss_count']}; "
                  f"AOT autograd hit {f['aotautograd_local_cache_hit_count']} "
                  f"missed {f['aotautograd_local_cache_miss_count']}")
        for kind, p, _ in evs[name]:
            print("  " + " ".join(x for x in (kind, (p.get("key") or "-")[:12], p.get("cache_status_detailed"),
                                              p.get("cache_bypass_reason")) if x))
    for name in logs:
        for kind, p, mine in evs[name]:
            if kind != "miss" or not mine:
                continue
            # the closest entry another process wrote or read: most components in common
            others = [(o, theirs) for o in logs if o != name for _, _, theirs in evs[o] if theirs]
            if not others:
                continue
            other, theirs = min(others, key=lambda x: len(differences(mine, x[1])))
            diff = differences(mine, theirs)
            inputs = [d for d in diff if d[0].startswith("example_inputs")]
            print(f"\n{name} missed {p['key'][:12]}; closest: {other}: {len(diff)} components differ, "
                  f"{len(inputs)} of them inputs' metadata")
            for k, x, y in [d for d in diff if d not in inputs] + inputs[:inputs_shown]:
                x, y = around(x, y, width)
                print(f"  {k}\n    this:  {x!r}\n    other: {y!r}")
    return logs


if __name__ == "__main__":
    explain(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trace")
