"""Break speed.py on purpose and check that test_speed.py notices (mutation testing, by hand).

Each mutant is a text substitution on exact source lines of speed.py. For each, a copy of speed.py
with the substitution and a copy of test_speed.py go into a temporary folder, where
`python -m pytest -q -x test_speed.py` runs; the mutant is "killed" when the suite fails and
"SURVIVED" when it passes. A pattern that is not found exactly once stops the script (speed.py
changed: update the mutant). The unmutated copy runs first and must pass.

Run from the repository root:  python bench/mutations.py [--only NAME_SUBSTRING] [--k PYTEST_K] [--out FILE]
(--k checks that a given subset alone kills a mutant, e.g. --only EMA --k train_ema.)
Not listed: searchsorted(right=False) in Strategy.sample is an equivalent mutant (it differs only when a
uniform draw equals a CDF value exactly), so no test can kill it.
Output of the last full run: bench/results/mutations.txt
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, [(exact old text, new text), ...]); old text must occur exactly once in speed.py
MUTANTS = [
    ("ema_update is a no-op",
     [("    torch._foreach_add_(e, torch._foreach_mul(delta, 1 - decay))", "    pass")]),
    ("ema_update with a fixed decay 0.5",
     [("torch._foreach_mul(delta, 1 - decay)", "torch._foreach_mul(delta, 0.5)")]),
    ("train() uses EMA decay 0.5 at every step",
     [("decay.fill_(ema_decay_at(step, ema_decay))", "decay.fill_(0.5)")]),
    ("EMA without warm-up",
     [("    return min(ema_decay, (1 + step) / (10 + step))", "    return ema_decay")]),
    ("sampler shifted by one step (t + 1, clamped)",
     [("t = torch.searchsorted(cdf, u, right=True).clamp_(max=self.T - 1)",
       "t = (torch.searchsorted(cdf, u, right=True) + 1).clamp_(max=self.T - 1)")]),
    ("sampler shifted by one step (t - 1, clamped)",
     [("t = torch.searchsorted(cdf, u, right=True).clamp_(max=self.T - 1)",
       "t = (torch.searchsorted(cdf, u, right=True) - 1).clamp_(min=0, max=self.T - 1)")]),
    ("speed_probs gives step tau the weight of the steps below it",
     [("    p[:tau] = k\n    return p / (T + tau * (k - 1))", "    p[:tau + 1] = k\n    return p / p.sum()")]),
    ("ddim: starting noise drawn per batch",
     [("x.zero_()[:m].copy_(start[i:i + m])",
       "x.zero_()[:m].copy_(torch.randn((m, *shape), generator=generator, device=gdev))")]),
    ("ddim: labels of the first batch reused",
     [("y.zero_()[:m].copy_(labels[i:i + m].to(device))", "y.zero_()[:m].copy_(labels[:m].to(device))")]),
    ("ddim: eta noise drawn once per batch, not per step",
     [("                z.copy_(torch.randn(z.shape, generator=generator, device=gdev))",
       "                z.copy_(torch.randn(z.shape, generator=generator, device=gdev)) if k == 0 else None")]),
    ("ddim: sigma without the (1 - abar_prev)/(1 - abar) factor",
     [("sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()",
       "sigma = eta * (1 - ab / ab_prev).sqrt()")]),
    ("v-prediction converted with a wrong sign",
     [("eps, x0 = s * x + a * out, a * x - s * out", "eps, x0 = s * x - a * out, a * x + s * out")]),
    ("change-aware weights: min/max over all t instead of t < tau",
     [("    w[:tau] = (1 - lam) + (2 * lam - 1) * (g - g.min()) / (g.max() - g.min()).clamp(min=1e-30)",
       "    G = change_rate(schedule)\n"
       "    w[:tau] = (1 - lam) + (2 * lam - 1) * (g - G.min()) / (G.max() - G.min()).clamp(min=1e-30)")]),
    ("Min-SNR eps weight min(SNR, gamma) instead of min(SNR, gamma)/SNR",
     [("schedule.snr.clamp(max=gamma) / schedule.snr, eps_space=True)",
       "schedule.snr.clamp(max=gamma), eps_space=True)")]),
    ("P2 ignores gamma",
     [("    return 1.0 / (k + schedule.snr) ** gamma", "    return 1.0 / (k + schedule.snr)")]),
    ("dual sampling mirrors to (t - m) clamped at 0 instead of |t - m|",
     [("torch.cat([t, (t - self.dual_m).abs()])[:n]", "torch.cat([t, (t - self.dual_m).clamp(min=0)])[:n]")]),
    ("dual probs mirror to (t - m) clamped at 0",
     [("(torch.arange(self.T) - self.dual_m).abs()", "(torch.arange(self.T) - self.dual_m).clamp(min=0)")]),
    ("loss-aware sampled weights 1 instead of 1/(T P)",
     [("return cdf / cdf[-1], (1.0 / (self.T * p)).float()", "return cdf / cdf[-1], torch.ones_like(p).float()")]),
    ("loss-aware ring buffer: repeated t in a batch share one slot",
     [("(self.counts[ts] + rank) % self.history", "self.counts[ts] % self.history")]),
    ("diffusion_loss ignores w",
     [("    return (w * mse).mean(), {", "    return mse.mean(), {")]),
    ("find_areas: threshold per step instead of per normalised time",
     [("(g * T < threshold)", "(g < threshold)")]),
    ("find_areas: threshold per step x 1000 (right at T = 1000 only)",
     [("(g * T < threshold)", "(g * 1000 < threshold)")]),
    ("lognormal bins at step edges instead of midpoints in ln sigma",
     [("_normal_bin_probs(((ls[1:] + ls[:-1]) / 2 - p_mean) / p_std)",
       "_normal_bin_probs((ls[1:] - p_mean) / p_std)")]),
    ("learning-rate warm-up off by one step",
     [("value = lr * min(1.0, (step + 1) / max(warmup, 1),", "value = lr * min(1.0, step / max(warmup, 1),")]),
    ("learning-rate cool-down off by one step",
     [("(steps - step) / max(cooldown, 1))", "(steps - step + 1) / max(cooldown, 1))")]),
    ("resume does not restore the global RNG (dropout)",
     [('    torch.set_rng_state(ck["rng"]["cpu"])', "    pass")]),
    ("resume does not restore the loss sums of the current log interval",
     [('    sums.copy_(ck["sums"]), counts.copy_(ck["counts"])', "    pass")]),
    ("resume accepts another experiment",
     [('    _check(not differ, f"checkpoint {path}', '    _check(True, f"checkpoint {path}')]),
    ("SIGINT does not mark the result interrupted",
     [("result.interrupted, stop = signals.requested, stop", "result.interrupted, stop = False, stop")]),
]


def apply(source, edits, name):
    for old, new in edits:
        n = source.count(old)
        if n != 1:
            sys.exit(f"mutant {name!r}: pattern found {n} times (want exactly 1) in speed.py:\n{old}")
        source = source.replace(old, new)
    return source


def run_suite(speed_source, extra_args=()):
    """(passed, first failing test or '', seconds) of test_speed.py against this speed.py."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "speed.py"), "w") as f:
            f.write(speed_source)
        shutil.copy(os.path.join(ROOT, "test_speed.py"), d)
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_speed.py",
                            *extra_args], cwd=d, capture_output=True, text=True)
        failed = re.findall(r"^(?:FAILED|ERROR) test_speed\.py::(\S+)", p.stdout, re.M)
        first = failed[0] if failed else ("" if p.returncode == 0 else p.stdout[-300:])
        return p.returncode == 0, first, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only mutants whose name contains this")
    ap.add_argument("--k", default="", help="pytest -k expression: run only these tests (a fast subset)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    with open(os.path.join(ROOT, "speed.py")) as f:
        source = f.read()
    mutants = [(n, e) for n, e in MUTANTS if args.only in n]
    for name, edits in mutants:          # check every pattern before spending time on runs
        apply(source, edits, name)
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    extra = ("-k", args.k) if args.k else ()
    ok, first, secs = run_suite(source, extra)
    if not ok:
        sys.exit(f"the unmutated suite fails ({first}): fix that first")
    emit(f"unmutated speed.py: test_speed.py passes ({secs:.0f} s)")
    emit(f"{'result':9s} {'s':>4s}  mutant  ->  first failing test")
    survivors = 0
    for name, edits in mutants:
        passed, first, secs = run_suite(apply(source, edits, name), extra)
        survivors += passed
        emit(f"{'SURVIVED' if passed else 'killed':9s} {secs:4.0f}  {name}" + ("" if passed else f"  ->  {first}"))
    emit(f"{len(mutants) - survivors} of {len(mutants)} mutants killed")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
