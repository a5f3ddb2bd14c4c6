"""bench/protocol_report.py: the comparison's results (issue 10) as one table and one figure.

    python bench/protocol_report.py            # reads bench/results/protocol/<arm>/compare.json

Each arm folder was written by bench/compare.py (bench/run_protocol.sh says how the arms were run). Writes
bench/results/protocol/report.md (per arm: final FID-10k under both samplers, the best FID-5k along the
curve and where it is, the speed-up per sampler on the mean curve and per seed) and protocol.png (FID vs
steps, one row per arm, one column per sampler; mean over seeds, band from the best to the worst seed).
The README's results section is copied from these two files.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "protocol")
ARMS = {"full": "CIFAR-10 (JPEG-75 copy), all 50,000 images",
        "small": "a class-balanced 1,336-image subset of it (FID against the subset)",
        "attrib": "all 50,000 images: which half of SpeeD does the work"}

TITLES = {"full": "full data", "small": "small data (1,336 images)", "attrib": "attribution (full data)"}


def fmt(x, d=2):
    return "—" if x is None else f"{x:.{d}f}"


def arm_table(s):
    """Markdown rows for one compare.json summary."""
    samplers = s["samplers"]
    head = ["strategy", "seeds"] + [f"FID-10k {m}" for m in samplers] + \
           [f"best FID-5k {m} at step" for m in samplers] + [f"speed-up {m}: mean curve (per seed)" for m in samplers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s["rows"]:
        cells = [r["strategy"], str(len(r["seeds"]))]
        cells += [fmt(r[m]["final_mean"]) + (f" ± {fmt(r[m]['final_std'])}" if len(r["seeds"]) > 1 else "")
                  for m in samplers]
        for m in samplers:  # best point of each seed's curve and its step, then means over seeds
            best = compare.best_point(s["curves"][m][r["strategy"]])
            cells.append(f"{fmt(best[0])} at {best[1]:.0f}" if best else "—")
        for m in samplers:
            per = ", ".join("not reached" if v is None else f"{v:.2f}" for v in r[m]["speedup_per_seed"].values())
            mean = r[m]["speedup_mean_curve"]
            cells.append(("not reached" if mean is None else f"{mean:.2f}×") + f" ({per})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def figure(summaries, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    samplers = list(dict.fromkeys(m for s in summaries.values() for m in s["samplers"]))
    fig, axes = plt.subplots(len(summaries), len(samplers), figsize=(5.5 * len(samplers), 3.6 * len(summaries)),
                             squeeze=False)
    for row, (arm, s) in zip(axes, summaries.items()):
        for ax, m in zip(row, samplers):
            compare.draw_curves(ax, s["curves"].get(m, {}))
            ax.set(title=f"{TITLES[arm]}, {m}", xlabel="training step (batch 128)", ylabel="FID-5k (Inception)",
                   yscale="log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 30, 40 rather than 3x10^1
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.tight_layout()
    compare.save_plot(fig, path, dpi=100)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default=HERE)
    args = p.parse_args()
    summaries = {}
    for arm in ARMS:
        path = os.path.join(args.folder, arm, "compare.json")
        if os.path.exists(path):
            with open(path) as f:
                summaries[arm] = json.load(f)
    if not summaries:
        raise SystemExit(f"protocol_report: no <arm>/compare.json under {args.folder}")
    out = ["# The comparison (issue 10): Inception FID under DDPM-250 and DDIM-25", "",
           "Tiny UNet, 20,000 steps at batch 128, FID-5k at 10 evaluations (same sampler noise for every run), "
           "FID-10k at the end, against the training images' statistics. Speed-up: steps uniform needs to reach "
           "its own last FID-5k ÷ steps the strategy needs (first crossing, interpolated). Best FID-5k: the lowest "
           "point of each seed's curve and its step, averaged over seeds (where a curve turns up again, as on small "
           "data, the speed-up to the last point says less than the best point).", ""]
    for arm, s in summaries.items():
        out += [f"## {arm}: {ARMS[arm]} ({s['device']})", ""] + arm_table(s) + [""]
    with open(os.path.join(args.folder, "report.md"), "w") as f:
        f.write("\n".join(out))
    figure(summaries, os.path.join(args.folder, "protocol.png"))
    print("\n".join(out))


if __name__ == "__main__":
    main()
