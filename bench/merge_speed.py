"""bench/merge_speed.py: bench/results/speed.json from the device calls' outputs (speed_call*/).

Each call of bench/run_speed.sh wrote its own speed.json and multi_gpu_runs.jsonl (a call carries a
limited time, so the parts were spread over calls 2-5 on one nvidia-h200-x2 lease). Later calls win.
The quick-check fields stay null until a quick-check run has been measured.
"""
import glob
import json
import os

from bench_speed import FWD_GFLOP, PEAK_BF16  # the same constants as the measurements

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

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
                    out["ddpm_tflops_config"] = f"batch {r['batch']}, compile={r.get('compile', False)}, whole-step graph"
                    sources["ddpm_tflops"] = sources["ddpm_peak_fraction"] = call
# the numbers that fix the comparison: the sampler's number is with the compiled network
if "sample_ddpm250_10k_s_compiled_network" in raw:
    out["sample_ddpm250_10k_s_eager_network"] = out["sample_ddpm250_10k_s"]
    out["sample_ddpm250_10k_s"] = raw["sample_ddpm250_10k_s_compiled_network"]
out["sources"], out["raw"] = sources, raw
out["note"] = ("train_img_s_tiny (speed_call3) and train_img_s_tiny_before (speed_call4) come from two calls on the "
               "same machine a few minutes apart, not from one process; quick_check_* were not measured.")
with open(os.path.join(HERE, "speed.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "raw"}, indent=1))
