"""bench/merge_speed.py: bench/results/speed.json from the device calls' outputs (speed_call*/).

Each call of bench/run_speed.sh wrote its own speed.json and multi_gpu_runs.jsonl (a call carries a
limited time, so the parts were spread over calls 2-5 on nvidia-h200-x2; call 2 got another pair of cards
than calls 3-5). Later calls win.
The sampler's time is bench_sampler.py's (sampler.jsonl), the quick check's bench/quick_search.py's.
A call on another card (speed_h100/) becomes its own section of the file, never mixed into the top level.
"""
import glob
import json
import os

from bench_speed import FWD_GFLOP, PEAK_BF16  # the same constants as the measurements
from compare import mean_std

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUICK = "small_b256_lr1e3"  # the candidate the h100 preset is (test_h100_preset_is_the_quick_search_winner_as_measured)
SAME = (QUICK, "h100_preset")  # its runs, and the preset's as a user runs it (the same options since lease 6)

out = dict(device=None, train_img_s_tiny_before=None, train_img_s_tiny=None, ddpm_tflops=None,
           ddpm_peak_fraction=None, sample_ddpm250_10k_s=None, frechet_2048_gpu_s=None, inception_img_s=None,
           quick_check_wall_s=None, quick_check_fid10k=None, quick_check_fid10k_std=None, quick_check_sampler=None)
raw, sources = {}, {}
for d in sorted(glob.glob(os.path.join(HERE, "speed_call*"))):
    call = os.path.basename(d)
    p = os.path.join(d, "speed.json")
    if os.path.exists(p):
        s = json.load(open(p))
        raw.update(s.pop("raw", {}))
        for k, v in s.items():
            if k in out or k == "torch":
                out[k] = v
                sources[k] = call
    p = os.path.join(d, "multi_gpu_runs.jsonl")
    if os.path.exists(p):
        for line in open(p):
            r = json.loads(line)
            if r["model"] == "ddpm" and r["world"] == 1:
                tf = 3 * FWD_GFLOP["ddpm"] * 1e9 * r["img_s"] / 1e12
                key = f"tflops_ddpm_b{r['batch']}" + ("_compiled" if r.get("compile") else "")
                raw[key] = tf
                if out["ddpm_tflops"] is None or tf > out["ddpm_tflops"]:
                    out["ddpm_tflops"], out["ddpm_peak_fraction"] = tf, tf * 1e12 / PEAK_BF16
                    out["ddpm_tflops_config"] = (f"batch {r['batch']}, compile={r.get('compile', False)}, "
                                                 "whole-step graph")
                    sources["ddpm_tflops"] = sources["ddpm_peak_fraction"] = call
# the numbers that fix the comparison: the sampler's number is with the compiled network
if "sample_ddpm250_10k_s_compiled_network" in raw:
    out["sample_ddpm250_10k_s_eager_network"] = out["sample_ddpm250_10k_s"]
    out["sample_ddpm250_10k_s"] = raw["sample_ddpm250_10k_s_compiled_network"]
# the sampler as train_tiny's evaluation runs it: the EMA network channels-last (train() leaves it so), batch 2,500
for line in open(os.path.join(HERE, "sampler.jsonl")) if not raw.get("sample_channels_last") else []:
    r = json.loads(line)
    if r["config"] == "cl:2500":
        out["sample_ddpm250_10k_s"], sources["sample_ddpm250_10k_s"] = r["seconds"], "sampler.jsonl cl:2500"
# the quick check: the h100 preset's configuration (quick_search.py's candidate QUICK), every seed timed
runs = [r for k, r in json.load(open(os.path.join(HERE, "quick_search.json"))).items()
        if any(k.startswith(name + "_s") for name in SAME)]
if runs:
    fid, std = mean_std([r["fid10k"] for r in runs])
    out.update(quick_check_wall_s=mean_std([r["wall_s"] for r in runs])[0], quick_check_fid10k=fid,
               quick_check_fid10k_std=std, quick_check_sampler=runs[0]["sampler"], quick_check_seeds=len(runs),
               quick_check_wall_s_max=max(r["wall_s"] for r in runs))
    sources.update(dict.fromkeys(("quick_check_wall_s", "quick_check_fid10k", "quick_check_fid10k_std",
                                  "quick_check_sampler"), f"quick_search.json {' and '.join(SAME)}"))
    out["quick_check_device"] = runs[0]["device"]
# another card's calls (bench/results/speed_h100: the profiles and the sampler on an H100) as their own section
for d in sorted(glob.glob(os.path.join(HERE, "speed_h1*"))):
    s = json.load(open(os.path.join(d, "speed.json")))
    r = s.pop("raw", {})
    sec = out[os.path.basename(d).split("_", 1)[1]] = dict(device=s["device"], torch=s["torch"], **r)
    if "sample_ddpm250_10k_s_compiled_network" in r:  # as train_tiny samples: compiled, channels-last weights
        sec["sample_ddpm250_10k_s"], sec["sample_ddpm250_10k_s_graph_only"] = (
            r["sample_ddpm250_10k_s_compiled_network"], s["sample_ddpm250_10k_s"])
        del sec["sample_ddpm250_10k_s_compiled_network"]
    if "profile_ddpm_b512_compiled" in r:  # the profiled steps' rate (the profiler's overhead included)
        tf = 3 * FWD_GFLOP["ddpm"] * 1e9 * 512 / (r["profile_ddpm_b512_compiled"]["wall_ms"] / 1e3) / 1e12
        sec.update(ddpm_tflops_b512_profiled=tf, ddpm_peak_fraction_profiled=tf * 1e12 / PEAK_BF16)
out["sources"], out["raw"] = sources, raw
out["note"] = ("device: the card of the throughput numbers; quick_check_device: the card of the quick check; the h100 "
               "section: calls on six leases of one H100 each (speed_h100/; train_img_s_small_drop0_b512 on the quick "
               "search's lease 5, compile_small_b256 on its lease 6, compile_small_b256_static* on its lease 7, "
               "compile_blocks_small_b256 on its lease 8). "
               "train_img_s_tiny (speed_call3) and train_img_s_tiny_before (speed_call4) come from two calls on the "
               "same machine a few minutes apart, not from one process. quick_check_*: mean over seeds of whole runs "
               "from empty caches, one run on the card; the wall depends on the host's CPU (it decodes, compiles and "
               "feeds Inception): these five ran on slower hosts (lease 5: 410 and 445 s; lease 6: 445 s, where the "
               "same work at lr 7e-4 took 415 s; lease 7: 407 s, the first with the sampler's network compiled in a "
               "child process during training; lease 10: 377 s, the child also computing the reference statistics) "
               "than lease 4's, which ran it at lr 7e-4 in 347-361 s (bench/README, quick_search).")
with open(os.path.join(HERE, "speed.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "raw"}, indent=1))
