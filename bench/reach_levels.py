"""Steps each strategy needs to reach several quality levels, from a --compare folder's compare.json.

    python bench/reach_levels.py bench/results/compare3 --levels 25,20,17,15,14.5

The README's speed-up (the issue's definition) asks when each curve reaches the baseline's *final*
value, which hangs on one noisy last evaluation. Reaching several levels on the mean curves (linearly
interpolated between evaluations: compare.steps_to_levels) shows where a strategy is ahead
or behind along the way. Writes reach_levels.md next to compare.json.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import steps_to_levels  # noqa: E402  (bench/compare.py)


def table(summary, levels):
    base = summary["baseline"]
    head = "| strategy | seeds | " + " | ".join(f"steps to {summary['metric']} ≤ {lv:g}" for lv in levels) + " |"
    rows = [head, "|---|---|" + "---|" * len(levels)]
    for spec, cells in steps_to_levels(summary["curves"], base, levels).items():
        text = ["not reached" if need is None else f"{need:,.0f}" + (f" ({x:.2f}×)" if x and spec != base else "")
                for need, x in cells]
        rows.append(f"| {spec} | {len(summary['curves'][spec]['per_seed'])} | " + " | ".join(text) + " |")
    return "\n".join(rows) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--levels", default="25,20,17,15,14.5")
    args = p.parse_args()
    with open(os.path.join(args.folder, "compare.json")) as f:
        summary = json.load(f)
    md = table(summary, [float(x) for x in args.levels.split(",")])
    md += (f"\nMean curves over seeds; (×) = {summary['baseline']} steps / strategy steps to the same level. "
           f"{summary['device']}, {summary['metric']}.\n")
    with open(os.path.join(args.folder, "reach_levels.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
