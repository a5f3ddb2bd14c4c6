"""Tests for speed.py (SpeeD reference implementation).

Expected values come from the formulas in METHOD.md, re-derived here independently (numpy / plain
float64 torch), from known facts about the standard schedules, or from statistical bounds whose
size is justified by the sample size. Every random draw uses a fixed torch.Generator seed.

Run: python -m pytest -q test_speed.py --durations=10
"""

import hashlib
import math
import os
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn as nn

import speed


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is as fast on an idle machine and avoids
    OpenMP oversubscription (10x slow-downs) when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ------------------------------------------------------------------------------------------------
# helpers (independent re-derivations of METHOD.md formulas, in numpy)
# ------------------------------------------------------------------------------------------------


def gen(seed):
    return torch.Generator().manual_seed(seed)


def np_betas(kind, T):
    """METHOD.md / DDPM / improved-DDPM schedules, computed with numpy only."""
    if kind == "cosine":
        s = 0.008
        t = np.arange(T + 1) / T
        f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    if kind == "linear":
        return np.linspace(lo, hi, T)
    return np.linspace(np.sqrt(lo), np.sqrt(hi), T) ** 2


def np_alpha_bar(kind, T):
    return np.cumprod(1 - np_betas(kind, T))


def np_areas(kind, T, eps=0.1):
    """t_peak = argmax g, tau = first t > t_peak with g_t < eps/T (METHOD.md Sec. 2)."""
    g = np.gradient(1 - np_alpha_bar(kind, T))
    t_peak = int(np.argmax(g))
    after = np.nonzero((np.arange(T) > t_peak) & (g < eps / T))[0]
    return t_peak, int(after[0]), g


def np_snr(kind, T):
    ab = np_alpha_bar(kind, T)
    return ab / (1 - ab)


def tv_bound(p, n, dual=False):
    """Upper bound on the total-variation distance between the empirical frequencies of n draws and
    p that holds with probability > 1 - 1e-6.

    iid draws: E|c_i - n p_i| <= sqrt(n p_i (1 - p_i)) (Jensen), so E[TV] <= 1/2 sum sqrt(p(1-p)/n);
    TV changes by at most 1/n when one draw changes, so McDiarmid gives
    P(TV > E[TV] + e) <= exp(-2 n e^2) (e = 0.004, n = 1e6: exp(-32)).
    dual: n/2 + 1 independent draws, each moving up to 2 samples (itself and its mirror), so the
    deviation term is exp(-n e^2); per bin Var <= 2 (n p_i + 1) and the mean is off by at most 2/n.
    """
    p = np.asarray(p, dtype=np.float64)
    e = 0.004 if n >= 10**6 else math.sqrt(math.log(1e6) / (n if dual else 2 * n))
    if dual:
        return 0.5 * np.sum(np.sqrt(2 * (n * p + 1)) / n) + 2.0 / n + e
    return 0.5 * np.sum(np.sqrt(p * (1 - p) / n)) + e


def empirical(t, T):
    return torch.bincount(t, minlength=T).double().numpy() / len(t)


def tv(a, b):
    return 0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum()


def structured_images(n=16, c=3, res=16, seed=0):
    """Synthetic images in [-1, 1] with spatial structure: gradients, stripes and a checkerboard,
    randomly inverted per image, plus a little noise."""
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.arange(res, dtype=torch.float64), torch.arange(res, dtype=torch.float64),
                            indexing="ij")
    base = torch.stack([(xx + yy) / (2 * res - 2), torch.sin(xx / 2) * 0.5 + 0.5,
                        ((xx // 2 + yy // 2) % 2)])[:c]
    x = base[None].repeat(n, 1, 1, 1)
    flip = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), 1 - x, x)
    x = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return (x.clamp(0, 1) * 2 - 1)


def uint8_images(n=64, res=8, seed=0):
    return ((structured_images(n, 3, res, seed) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _count_calls(monkeypatch, module, name):
    """Wrap module.name so each call appends to the returned list, then runs the real function."""
    calls, real = [], getattr(module, name)

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counting)
    return calls


def tiny_unet(**kw):
    cfg = dict(img_res=8, ch=16, ch_mult=(1, 2), num_blocks=1, attn_res=(4,), dropout=0.0)
    cfg.update(kw)
    return speed.UNet(**cfg)


@torch.no_grad()
def perturb_zero_init(model, seed=0, std=0.05):
    """The UNet zero-initialises its output conv and every residual/attention output projection, so at
    init the output is 0 and independent of t and y. Give those all-zero weights random values."""
    g = gen(seed)
    for p in model.parameters():
        if p.ndim > 1 and bool((p == 0).all()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------------------
# 1. schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", speed.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_schedule_shapes_dtype_and_values(kind, T):
    """All three schedules: float64 CPU tensors of length T, equal to the independent formulas."""
    s = speed.make_schedule(kind, T)
    assert s.T == T
    for name in ("betas", "alphas", "alpha_bar"):
        x = getattr(s, name)
        assert x.shape == (T,) and x.dtype == torch.float64 and x.device.type == "cpu", name
    np.testing.assert_allclose(s.betas.numpy(), np_betas(kind, T), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s.alphas.numpy(), 1 - np_betas(kind, T), rtol=1e-12)
    np.testing.assert_allclose(s.alpha_bar.numpy(), np_alpha_bar(kind, T), rtol=1e-10, atol=1e-300)
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())  # strictly decreasing


def test_linear_schedule_ends_at_T1000():
    """DDPM: beta from 1e-4 to 0.02 at T = 1000."""
    s = speed.make_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "quadratic"])
@pytest.mark.parametrize("T", [4000, 250])
def test_schedule_ends_scale_with_1000_over_T(kind, T):
    """For other T both ends are scaled by 1000/T (improved DDPM)."""
    s = speed.make_schedule(kind, T)
    assert s.betas[0].item() == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02 * 1000 / T, rel=1e-12)


def test_cosine_schedule_matches_f_ratio_and_clips():
    """Cosine: abar_t = f(t+1)/f(0) wherever betas are not clipped; the last beta is clipped at 0.999."""
    T, s_ = 1000, 0.008
    s = speed.make_schedule("cosine", T)
    f = np.cos((np.arange(T + 1) / T + s_) / (1 + s_) * np.pi / 2) ** 2
    np.testing.assert_allclose(s.alpha_bar[:-1].numpy(), (f[1:] / f[0])[:-1], rtol=1e-9)
    assert s.betas[-1].item() == pytest.approx(0.999)
    assert s.betas.max().item() <= 0.999


def test_schedule_from_custom_betas():
    """from_betas: float32/list input becomes float64; alphas = 1 - betas; alpha_bar = cumprod."""
    raw = torch.tensor([0.1, 0.25, 0.05, 0.5], dtype=torch.float32)
    s = speed.Schedule.from_betas(raw)
    assert s.T == 4 and s.betas.dtype == torch.float64 and s.alpha_bar.dtype == torch.float64
    b = raw.double().numpy()
    np.testing.assert_allclose(s.alphas.numpy(), 1 - b, rtol=1e-15)
    expected = [(1 - b[0]), (1 - b[0]) * (1 - b[1]), (1 - b[0]) * (1 - b[1]) * (1 - b[2]),
                (1 - b[0]) * (1 - b[1]) * (1 - b[2]) * (1 - b[3])]
    np.testing.assert_allclose(s.alpha_bar.numpy(), expected, rtol=1e-14)
    s2 = speed.Schedule.from_betas(np.array([0.3, 0.6]))
    np.testing.assert_allclose(s2.alpha_bar.numpy(), [0.7, 0.7 * 0.4], rtol=1e-14)


def test_schedule_from_python_list_keeps_float64_precision():
    """A Python list of floats is float64 data: it must not pass through float32 on its way to the
    float64 schedule (0.3 as float32 is 0.30000001)."""
    s = speed.Schedule.from_betas([0.3, 0.6])
    assert s.betas.dtype == torch.float64
    np.testing.assert_allclose(s.betas.numpy(), [0.3, 0.6], rtol=1e-14)
    np.testing.assert_allclose(s.alpha_bar.numpy(), [0.7, 0.7 * 0.4], rtol=1e-14)


def test_schedule_snr_sigma_and_coefs():
    """SNR = abar/(1-abar), sigma = 1/sqrt(SNR); coefs are float32 sqrt(abar), sqrt(1-abar)."""
    s = speed.make_schedule("linear", 100)
    ab = np_alpha_bar("linear", 100)
    np.testing.assert_allclose(s.snr.numpy(), ab / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(s.sigma.numpy(), np.sqrt((1 - ab) / ab), rtol=1e-10)
    a, b = s.coefs("cpu")
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), np.sqrt(ab), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), np.sqrt(1 - ab), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# 2. process increments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", speed.SCHEDULES)
def test_increment_stats_closed_form_matches_method_and_general_process(kind):
    """increment_stats == METHOD.md Sec. 1, and == the general-process formula with s_t = sqrt(abar_t),
    sigma_t^2 = (1-abar_t)/abar_t: mean (s_{t+1}-s_t), var (s_{t+1}-s_t)^2 sigma_t^2 + s_{t+1}^2 (sigma_{t+1}^2 - sigma_t^2)."""
    T = 200
    mean_coef, var = speed.increment_stats(speed.make_schedule(kind, T))
    assert mean_coef.shape == (T - 1,) and var.shape == (T - 1,)
    assert mean_coef.dtype == torch.float64 and var.dtype == torch.float64
    b = np_betas(kind, T)
    ab = np.cumprod(1 - b)
    sa_next = np.sqrt(1 - b[1:])
    np.testing.assert_allclose(mean_coef.numpy(), (sa_next - 1) * np.sqrt(ab[:-1]), rtol=1e-10)
    np.testing.assert_allclose(var.numpy(), (1 - sa_next) ** 2 * (1 - ab[:-1]) + b[1:], rtol=1e-10)
    s_ = np.sqrt(ab)
    sig2 = (1 - ab) / ab
    gen_mean = s_[1:] - s_[:-1]
    gen_var = (s_[1:] - s_[:-1]) ** 2 * sig2[:-1] + s_[1:] ** 2 * (sig2[1:] - sig2[:-1])
    np.testing.assert_allclose(mean_coef.numpy(), gen_mean, rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(var.numpy(), gen_var, rtol=1e-8)


def test_increment_stats_closed_form_agrees_with_monte_carlo_on_images():
    """increment_stats_mc on 16x3x16x16 structured images (N = 12288 pixels), T = 100 linear.

    Per t, the residual delta_t - c x0 is iid Gaussian over pixels, so the variance estimate has
    relative s.e. sqrt(2/N) = 1.3%; the slope estimate has s.e. sqrt(var)/sqrt(sum x0^2). We allow
    5 s.e. for each of the 99 steps (a false failure has probability ~1e-4 overall)."""
    sch = speed.make_schedule("linear", 100)
    x0 = structured_images(16, 3, 16, seed=1)
    mean_cf, var_cf = speed.increment_stats(sch)
    mean_mc, var_mc = speed.increment_stats_mc(sch, x0, generator=gen(2))
    assert mean_mc.shape == mean_cf.shape and var_mc.shape == var_cf.shape
    N = x0.numel()
    se_mean = var_cf.sqrt() / x0.pow(2).sum().sqrt()
    assert bool(((mean_mc - mean_cf).abs() < 5 * se_mean).all())
    rel = (var_mc / var_cf - 1).abs()
    assert rel.max().item() < 5 * math.sqrt(2 / N)
    # pooled over all steps the agreement is much tighter (errors are independent across steps)
    assert rel.mean().item() < 2 * math.sqrt(2 / N)


@pytest.mark.parametrize("t", [0, 219, 500, 998])
def test_increment_stats_vs_direct_simulation_of_xt_and_xt1(t):
    """Simulate only x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) e and x_{t+1} = sqrt(alpha_{t+1}) x_t +
    sqrt(beta_{t+1}) z for M = 200k draws and a fixed x0; per-dimension sample mean and variance of
    delta_t agree with the closed form within 5 standard errors."""
    sch = speed.make_schedule("linear", 1000)
    mean_coef, var = speed.increment_stats(sch)
    b = np_betas("linear", 1000)
    ab = np.cumprod(1 - b)
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64)
    M, g = 200_000, gen(10 + t)
    e = torch.randn(M, 4, generator=g, dtype=torch.float64)
    z = torch.randn(M, 4, generator=g, dtype=torch.float64)
    xt = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * e
    xt1 = math.sqrt(1 - b[t + 1]) * xt + math.sqrt(b[t + 1]) * z
    d = xt1 - xt
    v = var[t].item()
    assert torch.all((d.mean(0) - mean_coef[t] * x0).abs() < 5 * math.sqrt(v / M))
    assert torch.all((d.var(0) / v - 1).abs() < 5 * math.sqrt(2 / M))


# ------------------------------------------------------------------------------------------------
# 3. areas
# ------------------------------------------------------------------------------------------------


def test_areas_linear_T1000_known_values():
    """Linear T = 1000: t_peak = 219, tau ~ 700 (paper)."""
    a = speed.find_areas(speed.make_schedule("linear", 1000))
    assert a.t_peak == 219
    assert 695 <= a.tau <= 705
    assert a.T == 1000


def test_areas_cosine_T1000_known_tau():
    """Cosine T = 1000: tau ~ 979 (almost no convergence area)."""
    a = speed.find_areas(speed.make_schedule("cosine", 1000))
    assert 970 <= a.tau <= 985
    assert a.t_peak < a.tau


@pytest.mark.parametrize("kind", speed.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 4000])
def test_areas_match_independent_numpy(kind, T):
    """t_peak = argmax of np.gradient(1 - abar), tau = first t after it with g_t < 0.1 / T; g matches."""
    a = speed.find_areas(speed.make_schedule(kind, T))
    t_peak, tau, g = np_areas(kind, T)
    assert (a.t_peak, a.tau) == (t_peak, tau)
    np.testing.assert_allclose(a.g.numpy(), g, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("kind", speed.SCHEDULES)
def test_areas_normalised_boundaries_independent_of_T(kind):
    """eps is per unit of normalised time, so t_peak/T and tau/T agree at T = 1000 and 4000."""
    a1 = speed.find_areas(speed.make_schedule(kind, 1000))
    a4 = speed.find_areas(speed.make_schedule(kind, 4000))
    assert abs(a1.t_peak / 1000 - a4.t_peak / 4000) < 1 / 250
    assert abs(a1.tau / 1000 - a4.tau / 4000) < 1 / 250


@pytest.mark.parametrize("kind", speed.SCHEDULES)
def test_area_labels_names_and_fractions(kind):
    """label: 0 below t_peak, 1 on [t_peak, tau), 2 from tau on; fractions are the area sizes / T."""
    T = 1000
    a = speed.find_areas(speed.make_schedule(kind, T))
    assert int(a.label(0)) == 0
    assert int(a.label(a.t_peak - 1)) == 0 and int(a.label(a.t_peak)) == 1
    assert int(a.label(a.tau - 1)) == 1 and int(a.label(a.tau)) == 2
    assert int(a.label(T - 1)) == 2
    lab = a.label(torch.arange(T))
    assert lab.tolist() == [0] * a.t_peak + [1] * (a.tau - a.t_peak) + [2] * (T - a.tau)
    assert a.name(a.t_peak) == "deceleration" and a.name(0) == "acceleration" and a.name(T - 1) == "convergence"
    fr = a.fractions()
    assert set(fr) == set(speed.AREA_NAMES)
    assert sum(fr.values()) == pytest.approx(1.0, abs=1e-12)
    assert fr["acceleration"] == pytest.approx(a.t_peak / T)
    assert fr["deceleration"] == pytest.approx((a.tau - a.t_peak) / T)
    assert fr["convergence"] == pytest.approx((T - a.tau) / T)


def test_dual_step_known_value_and_T_invariance():
    """Dual-sampling m = 642 for linear T = 1000; m/T is the same at T = 4000 (within 1/250)."""
    assert speed.dual_step(speed.make_schedule("linear", 1000)) == 642
    m4 = speed.dual_step(speed.make_schedule("linear", 4000))
    assert abs(m4 / 4000 - 0.642) < 1 / 250


# ------------------------------------------------------------------------------------------------
# 4. asymmetric sampling probabilities
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,tau,k", [(1000, 700, 5), (1000, 700, 2), (1000, 1, 3.5), (1000, 999, 10), (50, 20, 5)])
def test_speed_probs_formula(T, tau, k):
    """P(t) = k/(T + tau(k-1)) for t < tau, 1/(T + tau(k-1)) for t >= tau; sums to 1; float64."""
    p = speed.speed_probs(T, tau, k)
    assert p.shape == (T,) and p.dtype == torch.float64
    Z = T + tau * (k - 1)
    expected = np.where(np.arange(T) < tau, k / Z, 1 / Z)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-13)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # ratio below/above tau is k
    assert (p[tau - 1] / p[tau]).item() == pytest.approx(k)


def test_speed_probs_k1_is_uniform():
    p = speed.speed_probs(1000, 700, k=1)
    np.testing.assert_allclose(p.numpy(), np.full(1000, 1e-3), rtol=1e-13)


def test_speed_strategy_uses_found_tau_and_k():
    """make_strategy('speed') defaults: tau from find_areas, k = 5, lam = 0.6."""
    sch = speed.make_schedule("linear", 1000)
    s = speed.make_strategy("speed", sch)
    assert s.tau == speed.find_areas(sch).tau and s.k == 5 and s.lam == 0.6
    Z = 1000 + s.tau * 4
    np.testing.assert_allclose(s.probs.numpy(), np.where(np.arange(1000) < s.tau, 5 / Z, 1 / Z), rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# 5. every strategy's sampler draws from its .probs
# ------------------------------------------------------------------------------------------------

N_DRAWS = 1_000_000


def _loss_aware_warm(sch, seed=0):
    s = speed.make_strategy("loss_aware", sch)
    T = sch.T
    t = torch.arange(T).repeat(s.history)
    g = gen(seed)
    losses = (1.0 + 9.0 * (t < T // 3)) * (0.5 + torch.rand(len(t), generator=g, dtype=torch.float64))
    s.update(t, losses)
    return s


def _all_strategies(sch):
    out = [(name, speed.make_strategy(name, sch)) for name in speed.STRATEGIES]
    out.append(("loss_aware_updated", _loss_aware_warm(sch)))
    return out


@pytest.mark.parametrize("name", list(speed.STRATEGIES) + ["loss_aware_updated"])
def test_sample_frequencies_match_probs(name):
    """Empirical frequencies of 1e6 draws are within the TV bound of tv_bound() (about 0.02 for T = 1000)
    of .probs; returned weights are the strategy's weights at the drawn t; same seed -> same draws."""
    sch = speed.make_schedule("linear", 1000)
    s = dict(_all_strategies(sch))[name]
    p = s.probs
    assert p.shape == (1000,) and p.dtype == torch.float64
    assert p.sum().item() == pytest.approx(1.0, abs=1e-10) and bool((p >= 0).all())
    t, w = s.sample(N_DRAWS, generator=gen(123))
    assert t.dtype == torch.int64 and t.shape == (N_DRAWS,) and w.shape == (N_DRAWS,)
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    assert tv(empirical(t, 1000), p.numpy()) < tv_bound(p.numpy(), N_DRAWS)
    t2, _ = s.sample(N_DRAWS, generator=gen(123))
    assert torch.equal(t, t2)
    assert w.dtype == torch.float32


def test_sample_frequencies_speed_dual():
    """dual=True: t = draws from P followed by |t - m|; the marginal of a large even batch is .probs
    = (P + mirror(P)) / 2. Also the second half is exactly the mirror of the first."""
    sch = speed.make_schedule("linear", 1000)
    s = speed.make_strategy("speed", sch, dual=True)
    m = speed.dual_step(sch)
    assert s.dual_m == m == 642
    base = speed.speed_probs(1000, s.tau, 5).numpy()
    mirror = np.zeros(1000)
    np.add.at(mirror, np.abs(np.arange(1000) - m), base)
    np.testing.assert_allclose(s.probs.numpy(), (base + mirror) / 2, rtol=1e-12, atol=1e-16)
    n = N_DRAWS
    t, w = s.sample(n, generator=gen(5))
    assert t.shape == (n,)
    half = n // 2 + 1
    assert torch.equal(t[half:], (t[: n - half] - m).abs())
    assert tv(empirical(t, 1000), s.probs.numpy()) < tv_bound(s.probs.numpy(), n, dual=True)
    # odd and tiny n still give n steps
    for k in (1, 2, 7):
        assert s.sample(k, generator=gen(0))[0].shape == (k,)


def test_lognormal_probs_match_method_definition():
    """EDM log-normal: ln sigma ~ N(-1.2, 1.2^2), mapped to the nearest discrete step (in ln sigma):
    simulate that directly and compare with .probs."""
    sch = speed.make_schedule("linear", 1000)
    p = speed.make_strategy("lognormal", sch).probs.numpy()
    ls = np.log(np.sqrt((1 - np_alpha_bar("linear", 1000)) / np_alpha_bar("linear", 1000)))
    x = (-1.2 + 1.2 * torch.randn(N_DRAWS, generator=gen(7), dtype=torch.float64)).numpy()
    j = np.clip(np.searchsorted(ls, x), 1, 999)
    nearest = np.where(np.abs(x - ls[j - 1]) <= np.abs(ls[j] - x), j - 1, j)
    freq = np.bincount(nearest, minlength=1000) / N_DRAWS
    assert tv(freq, p) < tv_bound(p, N_DRAWS)
    # the median of ln sigma is -1.2: half the mass lies on steps whose ln sigma is below -1.2
    t_med = int(np.searchsorted(ls, -1.2))
    assert abs(p[:t_med].sum() - 0.5) <= p[t_med - 1] + p[t_med]


def test_logitnormal_probs_match_method_definition():
    """SD3 logit-normal: u ~ N(0,1), t = round(sigmoid(u) (T-1)), simulated directly vs .probs."""
    T = 1000
    p = speed.make_strategy("logitnormal", speed.make_schedule("linear", T)).probs.numpy()
    u = torch.randn(N_DRAWS, generator=gen(8), dtype=torch.float64).numpy()
    t = np.round(1 / (1 + np.exp(-u)) * (T - 1)).astype(np.int64)
    freq = np.bincount(t, minlength=T) / N_DRAWS
    assert tv(freq, p) < tv_bound(p, N_DRAWS)
    # symmetric around the middle
    np.testing.assert_allclose(p, p[::-1], rtol=1e-9, atol=1e-15)


def test_uniform_p2_min_snr_sample_uniformly():
    """uniform, p2, min_snr: P(t) = 1/T."""
    sch = speed.make_schedule("linear", 1000)
    for name in ("uniform", "p2", "min_snr"):
        np.testing.assert_allclose(speed.make_strategy(name, sch).probs.numpy(), np.full(1000, 1e-3), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# 6. change-aware weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", speed.SCHEDULES)
@pytest.mark.parametrize("lam", [0.6, 0.8, 1.0])
def test_speed_weights_formula_and_range(kind, lam):
    """Below tau: g rescaled into [1-lam, lam] (min and max attained); from tau on: 1."""
    T = 1000
    sch = speed.make_schedule(kind, T)
    _, tau, g = np_areas(kind, T)
    w = speed.speed_weights(sch, tau, lam)
    assert w.shape == (T,) and w.dtype == torch.float64
    gb = g[:tau]
    expected = np.concatenate([(1 - lam) + (2 * lam - 1) * (gb - gb.min()) / (gb.max() - gb.min()),
                               np.ones(T - tau)])
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-9, atol=1e-12)
    below = w[:tau]
    assert below.min().item() == pytest.approx(1 - lam, abs=1e-12)
    assert below.max().item() == pytest.approx(lam, abs=1e-12)
    assert bool((below >= 1 - lam - 1e-12).all() and (below <= lam + 1e-12).all())
    assert bool((w[tau:] == 1).all())
    # the largest weight sits at the peak of the change rate
    assert int(below.argmax()) == int(np.argmax(g))


def test_speed_strategy_weights_and_lam_none():
    """Strategy weights equal speed_weights for every target; lam=None gives weight 1 everywhere."""
    sch = speed.make_schedule("linear", 1000)
    s = speed.make_strategy("speed", sch, tau=700, lam=0.8)
    for target in speed.TARGETS:
        assert torch.equal(s.weights(target), speed.speed_weights(sch, 700, 0.8))
    off = speed.make_strategy("speed", sch, lam=None)
    for target in speed.TARGETS:
        assert torch.equal(off.weights(target), torch.ones(1000, dtype=torch.float64))
    _, w = off.sample(1000, generator=gen(0))
    assert bool((w == 1).all())


# ------------------------------------------------------------------------------------------------
# 7. Min-SNR and P2 weights per target
# ------------------------------------------------------------------------------------------------


def _expected_weights(name, snr, target, **kw):
    if name == "min_snr":
        g = kw.get("gamma", 5.0)
        m = np.minimum(snr, g)
        return {"eps": m / snr, "x0": m, "v": m / (snr + 1)}[target]
    k, gamma = kw.get("k", 1.0), kw.get("gamma", 1.0)
    w_eps = 1 / (k + snr) ** gamma
    return w_eps * {"eps": np.ones_like(snr), "x0": snr, "v": snr / (snr + 1)}[target]


@pytest.mark.parametrize("target", speed.TARGETS)
@pytest.mark.parametrize("name,kw", [("min_snr", {}), ("min_snr", {"gamma": 1.0}), ("p2", {}),
                                     ("p2", {"gamma": 0.5}), ("p2", {"k": 2.0, "gamma": 0.5})])
def test_min_snr_and_p2_weights(name, kw, target):
    """Via strategy.weights(target) and via the w returned by sample(..., target=...)."""
    T = 1000
    sch = speed.make_schedule("linear", T)
    snr = np_snr("linear", T)
    s = speed.make_strategy(name, sch, **kw)
    expected = _expected_weights(name, snr, target, **kw)
    np.testing.assert_allclose(s.weights(target).numpy(), expected, rtol=1e-9)
    t, w = s.sample(4096, generator=gen(1), target=target)
    np.testing.assert_allclose(w.numpy(), expected[t.numpy()].astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(s.weight_of(t, target).numpy(), w.numpy(), rtol=0)


def test_min_snr_is_capped_where_snr_is_large():
    """Min-SNR eps weight is gamma/SNR (< 1) at low noise and exactly 1 where SNR <= gamma."""
    sch = speed.make_schedule("linear", 1000)
    snr = sch.snr
    w = speed.make_strategy("min_snr", sch).weights("eps")
    assert bool((w[snr <= 5] == 1).all()) and bool((w[snr > 5] < 1).all())
    assert int((snr > 5).sum()) > 0 and int((snr <= 5).sum()) > 0


# ------------------------------------------------------------------------------------------------
# 8. loss-aware importance sampling
# ------------------------------------------------------------------------------------------------


def test_loss_aware_uniform_until_every_t_has_history():
    """P is uniform (and w = 1) until every t has `history` losses, however unequal the losses are."""
    sch = speed.make_schedule("linear", 30)
    s = speed.make_strategy("loss_aware", sch, history=3)
    T = 30
    np.testing.assert_allclose(s.probs.numpy(), np.full(T, 1 / T), rtol=1e-12)
    # every t but the last gets 3 (very unequal) losses: still uniform
    t = torch.arange(T - 1).repeat(3)
    s.update(t, (t.double() + 1) ** 2)
    np.testing.assert_allclose(s.probs.numpy(), np.full(T, 1 / T), rtol=1e-12)
    _, w = s.sample(100, generator=gen(0))
    assert torch.allclose(w, torch.ones(100))
    # two of three for the last t: still uniform; the third makes it non-uniform
    s.update(torch.tensor([T - 1, T - 1]), torch.tensor([1.0, 1.0]))
    np.testing.assert_allclose(s.probs.numpy(), np.full(T, 1 / T), rtol=1e-12)
    s.update(torch.tensor([T - 1]), torch.tensor([1.0]))
    assert s.probs.max().item() > 2 / T


def test_loss_aware_probs_proportional_to_rms_of_last_losses():
    """P(t) = (1 - mix) sqrt(mean L^2)/sum + mix/T over the last `history` losses (ring buffer):
    older losses are forgotten; bigger losses -> higher probability."""
    T, H, mix = 30, 3, 1e-3
    sch = speed.make_schedule("linear", T)
    s = speed.make_strategy("loss_aware", sch, history=H, uniform_mix=mix)
    # fill with a constant first: will be overwritten completely by the next H rounds
    for _ in range(H):
        s.update(torch.arange(T), torch.full((T,), 100.0))
    L = torch.where(torch.arange(T) < 10, 5.0, 0.5).double() * (1 + torch.arange(T) / T)
    g = gen(3)
    for _ in range(H):
        order = torch.randperm(T, generator=g)   # shuffled batches
        s.update(order, L[order].float())
    L32 = L.float().double().numpy()
    r = L32  # constant per t over the window: rms == value
    expected = (1 - mix) * r / r.sum() + mix / T
    np.testing.assert_allclose(s.probs.numpy(), expected, rtol=1e-9)
    assert s.probs[:10].min() > s.probs[10:].max()
    # one more loss for t = 0 replaces only its oldest slot
    s.update(torch.tensor([0]), torch.tensor([50.0]))
    r2 = r.copy()
    r2[0] = math.sqrt(((H - 1) * L32[0] ** 2 + 50.0 ** 2) / H)
    np.testing.assert_allclose(s.probs.numpy(), (1 - mix) * r2 / r2.sum() + mix / T, rtol=1e-9)


def test_loss_aware_repeated_steps_within_one_batch():
    """A batch holding the same t several times (<= history) fills several slots of that t."""
    T, H = 25, 4
    s = speed.make_strategy("loss_aware", speed.make_schedule("linear", T), history=H, uniform_mix=1e-3)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t = torch.arange(T).repeat_interleave(H)
    losses = vals.repeat(T) * (1 + (torch.arange(T) == 7).float().repeat_interleave(H))
    s.update(t, losses)
    assert int(s.counts.min()) == H
    rms = math.sqrt((vals.double() ** 2).mean().item())
    r = np.full(T, rms)
    r[7] *= 2
    np.testing.assert_allclose(s.probs.numpy(), (1 - 1e-3) * r / r.sum() + 1e-3 / T, rtol=1e-6)


def test_loss_aware_reweighting_is_unbiased():
    """E_t~P[w(t) L(t)] = mean_t L(t) with w = 1/(T P(t)): exact sum, and a Monte-Carlo check
    (200k draws, 5 standard errors)."""
    T = 1000
    sch = speed.make_schedule("linear", T)
    s = _loss_aware_warm(sch, seed=4)
    p = s.probs
    w_all = s.weight_of(torch.arange(T)).double()
    np.testing.assert_allclose(w_all.numpy(), 1 / (T * p.numpy()), rtol=1e-6)
    L = 1 + torch.rand(T, generator=gen(9), dtype=torch.float64) * 10
    exact = (p * w_all * L).sum().item()
    assert exact == pytest.approx(L.mean().item(), rel=1e-6)
    n = 200_000
    t, w = s.sample(n, generator=gen(10))
    vals = w.double() * L[t]
    se = vals.std().item() / math.sqrt(n)
    assert abs(vals.mean().item() - L.mean().item()) < 5 * se
    # and the sampling is really non-uniform (otherwise the check above would be trivial)
    assert p.max().item() > 3 * p.min().item()


def test_loss_aware_state_dict_roundtrip():
    sch = speed.make_schedule("linear", 40)
    s = _loss_aware_warm(sch)
    s2 = speed.make_strategy("loss_aware", sch)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s.probs, s2.probs)
    assert not torch.allclose(s2.probs, torch.full((40,), 1 / 40, dtype=torch.float64))


@pytest.mark.parametrize("name", list(speed.STRATEGIES) + ["loss_aware_updated"])
def test_strategy_weights_agree_with_sampled_weights(name):
    """For every strategy, weights(target)[t] is the w that sample(..., target) returns with t
    (the Strategy interface: 'probs and loss weights per target')."""
    sch = speed.make_schedule("linear", 100)
    s = dict(_all_strategies(sch))[name]
    for target in speed.TARGETS:
        t, w = s.sample(2000, generator=gen(2), target=target)
        np.testing.assert_allclose(s.weights(target)[t].float().numpy(), w.numpy(), rtol=1e-6)


@pytest.mark.parametrize("spec", [("uniform", {}), ("speed", {}), ("speed", {"dual": True}), ("p2", {}),
                                  ("min_snr", {}), ("lognormal", {}), ("logitnormal", {})])
def test_area_shares_match_the_sampled_objective(spec):
    """area_shares = each area's part of sum(w) over many sample() draws (dual: the mirrored draws too)."""
    sch = speed.make_schedule("linear", 1000)
    areas, s = speed.find_areas(sch), speed.make_strategy(spec[0], sch, **spec[1])
    shares = s.area_shares(areas)
    assert list(shares) == list(speed.AREA_NAMES) and sum(shares.values()) == pytest.approx(1, abs=1e-12)
    t, w = s.sample(400_000, generator=gen(5))
    per_area = torch.bincount(areas.label(t), weights=w.double(), minlength=3) / w.double().sum()
    np.testing.assert_allclose(list(shares.values()), per_area.numpy(), atol=0.005)


def test_area_shares_closed_forms_and_order():
    """uniform: the areas' step fractions; SpeeD without weighting: convergence gets (T - tau) of
    k tau + T - tau; P2 and Min-SNR, which down-weight low-noise steps, give convergence more than
    uniform does, and SpeeD less; a T mismatch is refused."""
    sch = speed.make_schedule("linear", 1000)
    areas = speed.find_areas(sch)
    uni = speed.make_strategy("uniform", sch).area_shares(areas)
    assert uni == pytest.approx(areas.fractions(), abs=1e-12)
    k, tau = 3, areas.tau
    plain = speed.make_strategy("speed", sch, k=k, lam=None).area_shares(areas)
    assert plain["convergence"] == pytest.approx((1000 - tau) / (k * tau + 1000 - tau), abs=1e-12)
    conv = {n: speed.make_strategy(n, sch).area_shares(areas)["convergence"] for n in ("p2", "min_snr", "speed")}
    assert conv["p2"] > conv["min_snr"] > uni["convergence"] > conv["speed"]
    with pytest.raises(ValueError, match="areas"):
        speed.make_strategy("uniform", sch).area_shares(speed.find_areas(speed.make_schedule("linear", 100)))


# ------------------------------------------------------------------------------------------------
# 9. diffusion loss
# ------------------------------------------------------------------------------------------------


class ScaleModel(nn.Module):
    """out = a * x with a learnable scalar a."""

    def __init__(self, a=0.7):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, t):
        return self.a * x


@pytest.mark.parametrize("target", speed.TARGETS)
@pytest.mark.parametrize("strategy_name,kw", [("speed", {"tau": 60, "k": 3, "lam": 0.8}), ("min_snr", {}), ("p2", {})])
def test_diffusion_loss_equals_hand_computation(target, strategy_name, kw):
    """loss = mean_i w(t_i) mean_j (a x_t - goal)^2 and dloss/da computed by hand in float64."""
    T = 100
    sch = speed.make_schedule("linear", T)
    strat = speed.make_strategy(strategy_name, sch, **kw)
    g = gen(0)
    x0 = torch.rand(5, 2, 3, 3, generator=g) * 2 - 1
    noise = torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 13, 59, 60, 99])
    model = ScaleModel(0.7)
    loss, info = speed.diffusion_loss(model, x0, sch, strat, target, t=t, noise=noise)
    loss.backward()

    ab = torch.from_numpy(np_alpha_bar("linear", T))[t].view(-1, 1, 1, 1)
    X0, E = x0.double(), noise.double()
    xt = ab.sqrt() * X0 + (1 - ab).sqrt() * E
    goal = {"eps": E, "x0": X0, "v": ab.sqrt() * E - (1 - ab).sqrt() * X0}[target]
    w = torch.from_numpy(np.asarray(_expected_weights(strategy_name, np_snr("linear", T), target, **kw)
                                    if strategy_name != "speed" else strat.weights(target).numpy()))[t]
    err = 0.7 * xt - goal
    mse = (err ** 2).flatten(1).mean(1)
    expected_loss = (w * mse).mean()
    expected_grad = (w * (2 * err * xt).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert model.a.grad.item() == pytest.approx(expected_grad.item(), rel=1e-4, abs=1e-7)
    assert set(info) >= {"t", "mse", "w"}
    assert torch.equal(info["t"], t)
    np.testing.assert_allclose(info["mse"].numpy(), mse.numpy(), rtol=1e-5)
    np.testing.assert_allclose(info["w"].numpy(), w.numpy(), rtol=1e-6)
    assert not info["mse"].requires_grad
    # the weights are really non-uniform here
    assert w.max() > 1.2 * w.min()


def test_diffusion_loss_grads_flow_to_conv_model_and_sampling_is_seeded():
    """A 1x1-conv model gets gradients on all parameters; with t=None the steps and noise come from
    the generator (same seed -> same loss), and info['w'] = strategy weights at info['t']."""
    sch = speed.make_schedule("linear", 100)
    strat = speed.make_strategy("speed", sch, tau=60, lam=0.7)
    conv = nn.Conv2d(3, 3, 1)
    model = lambda x, t: conv(x)  # noqa: E731
    x0 = structured_images(8, 3, 8, seed=3).float()
    loss, info = speed.diffusion_loss(model, x0, sch, strat, "eps", generator=gen(11))
    loss.backward()
    assert loss.requires_grad and loss.ndim == 0
    for p in conv.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    loss2, info2 = speed.diffusion_loss(model, x0, sch, strat, "eps", generator=gen(11))
    assert torch.equal(info["t"], info2["t"]) and loss.item() == loss2.item()
    assert torch.equal(info["w"], strat.weights("eps")[info["t"]].float())
    t_ref, _ = strat.sample(8, generator=gen(11))
    assert torch.equal(info["t"], t_ref)


def test_diffusion_loss_passes_model_kwargs():
    sch = speed.make_schedule("linear", 50)
    strat = speed.make_strategy("uniform", sch)
    seen = {}

    def model(x, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x)

    y = torch.tensor([1, 2])
    speed.diffusion_loss(model, torch.zeros(2, 1, 2, 2), sch, strat, generator=gen(0), y=y)
    assert torch.equal(seen["y"], y)


# ------------------------------------------------------------------------------------------------
# 10. input validation
# ------------------------------------------------------------------------------------------------

_S = speed.make_schedule("linear", 1000)
_S50 = speed.make_schedule("linear", 50)
_X = torch.zeros(2, 1, 4, 4)
_UNI = speed.make_strategy("uniform", _S50)
_LIN = lambda x, t: x  # noqa: E731

BAD_INPUTS = {
    # k < 1
    "k<1 speed_probs": (lambda: speed.speed_probs(1000, 700, k=0.5), r"\bk\b"),
    "k<1 strategy": (lambda: speed.make_strategy("speed", _S, k=0), r"\bk\b"),
    "k<=0 p2": (lambda: speed.make_strategy("p2", _S, k=0.0), r"\bk\b"),
    # lam outside [0.5, 1]
    "lam<0.5": (lambda: speed.speed_weights(_S, 700, lam=0.49), "lam"),
    "lam>1": (lambda: speed.speed_weights(_S, 700, lam=1.01), "lam"),
    "lam=5 (official-code default)": (lambda: speed.make_strategy("speed", _S, lam=5), "lam"),
    # tau outside [1, T-1]
    "tau=0 probs": (lambda: speed.speed_probs(1000, 0), "tau"),
    "tau=T probs": (lambda: speed.speed_probs(1000, 1000), "tau"),
    "tau=0 weights": (lambda: speed.speed_weights(_S, 0), "tau"),
    "tau=T strategy": (lambda: speed.make_strategy("speed", _S, tau=1000), "tau"),
    "tau float": (lambda: speed.speed_probs(1000, 700.5), "tau"),
    # T < 2
    "T=1 schedule": (lambda: speed.make_schedule("cosine", 1), r"\bT\b"),
    "T=0 schedule": (lambda: speed.make_schedule("linear", 0), r"\bT\b"),
    "T=1 probs": (lambda: speed.speed_probs(1, 1), r"\bT\b"),
    "T too small for linear": (lambda: speed.make_schedule("linear", 10), r"\bT\b"),
    # betas
    "betas with 0": (lambda: speed.Schedule.from_betas([0.0, 0.1]), "betas"),
    "betas with 1": (lambda: speed.Schedule.from_betas([0.5, 1.0]), "betas"),
    "betas negative": (lambda: speed.Schedule.from_betas([-0.1, 0.1]), "betas"),
    "betas nan": (lambda: speed.Schedule.from_betas([float("nan"), 0.1]), "betas"),
    "betas 2-D": (lambda: speed.Schedule.from_betas([[0.1, 0.2], [0.1, 0.2]]), "betas"),
    "betas length 1": (lambda: speed.Schedule.from_betas([0.1]), "betas"),
    "betas integer": (lambda: speed.Schedule.from_betas(torch.tensor([0, 0])), "betas"),
    # unknown names (the message lists the valid ones)
    "schedule name": (lambda: speed.make_schedule("sigmoid", 1000), "'linear', 'cosine', 'quadratic'"),
    "strategy name": (lambda: speed.make_strategy("edm", _S),
                      ", ".join(repr(n) for n in speed.STRATEGIES)),
    "target in weights": (lambda: _UNI.weights("score"), "'eps', 'x0', 'v'"),
    "target in sample": (lambda: _UNI.sample(4, target="score"), "'eps', 'x0', 'v'"),
    "target in diffusion_loss": (lambda: speed.diffusion_loss(_LIN, _X, _S50, _UNI, "score"), "'eps', 'x0', 'v'"),
    "unet size": (lambda: speed.make_unet("huge"), "'tiny', 'small', 'ddpm'"),
    "strategy option": (lambda: speed.make_strategy("uniform", _S, k=2), "option"),
    # x0
    "x0 integer": (lambda: speed.diffusion_loss(_LIN, _X.long(), _S50, _UNI), "x0"),
    "x0 uint8": (lambda: speed.diffusion_loss(_LIN, _X.to(torch.uint8), _S50, _UNI), "x0"),
    "x0 no batch": (lambda: speed.diffusion_loss(_LIN, torch.zeros(16), _S50, _UNI), "x0"),
    "x0 mc integer": (lambda: speed.increment_stats_mc(_S50, torch.zeros(2, 3, dtype=torch.long)), "x0"),
    "x0 mc no batch": (lambda: speed.increment_stats_mc(_S50, torch.zeros(5)), "x0"),
    # n < 1
    "n=0 sample": (lambda: _UNI.sample(0), r"\bn\b"),
    "n<0 sample": (lambda: _UNI.sample(-3), r"\bn\b"),
    "n float sample": (lambda: _UNI.sample(2.0), r"\bn\b"),
    "n=0 ddim": (lambda: speed.ddim_sample(tiny_unet(), _S50, 0, shape=(3, 8, 8)), r"\bn\b"),
    # mismatches
    "strategy/schedule T": (lambda: speed.diffusion_loss(_LIN, _X, _S, _UNI), r"\bT\b"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    fn, pattern = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        fn()


@pytest.mark.parametrize("name", speed.STRATEGIES)
def test_every_strategy_rejects_unknown_target_and_bad_n(name):
    """sample(target=...) and weight_of(t, target) validate the target for every strategy, and n >= 1."""
    s = speed.make_strategy(name, _S50)
    with pytest.raises(ValueError, match="'eps', 'x0', 'v'"):
        s.sample(4, target="score")
    with pytest.raises(ValueError, match="'eps', 'x0', 'v'"):
        s.weight_of(torch.tensor([1, 2]), target="score")
    with pytest.raises(ValueError, match=r"\bn\b"):
        s.sample(0)


# ------------------------------------------------------------------------------------------------
# 11. UNet
# ------------------------------------------------------------------------------------------------


def test_ddpm_unet_parameter_count():
    """The DDPM CIFAR-10 network has 35.7M parameters."""
    m = speed.make_unet("ddpm")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 35.7e6) <= 0.1e6


@pytest.mark.parametrize("size", list(speed.UNET_SIZES))
def test_named_unet_forward_shape_and_zero_init(size):
    """Each named size maps a [1, 3, 32, 32] batch to the same shape (float32); the output conv is
    zero-initialised so the output at init is exactly 0."""
    torch.manual_seed(0)
    m = speed.make_unet(size).eval()
    x = torch.randn(1, 3, 32, 32, generator=gen(0))
    with torch.no_grad():
        y = m(x, torch.tensor([10]))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert bool((y == 0).all())


def test_unet_sizes_are_ordered_and_overrides_win():
    counts = {k: sum(p.numel() for p in speed.make_unet(k).parameters()) for k in ("tiny", "small")}
    assert counts["tiny"] < counts["small"] < 35.6e6
    m = speed.make_unet("tiny", img_res=16, img_channels=1, num_classes=4, dropout=0.0)
    assert m.img_res == 16 and m.img_channels == 1 and m.num_classes == 4
    with torch.no_grad():
        y = m(torch.zeros(2, 1, 16, 16), torch.tensor([0, 5]), y=torch.tensor([0, 3]))
    assert y.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("ch,scale_shift,heads", [(16, True, 1), (16, True, 2), (64, False, 1), (16, False, 1)])
def test_unet_time_conditioning_changes_output(ch, scale_shift, heads):
    """After perturbing the zero-initialised layers, different t give different outputs, same t the
    same output, and each sample of a batch is processed independently. Covers both conditioning
    styles: scale-shift (improved DDPM) and adding the embedding before norm2 (DDPM, scale_shift=False)."""
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet(ch=ch, scale_shift=scale_shift, heads=heads)).eval()
    x = torch.randn(3, 3, 8, 8, generator=gen(1))
    with torch.no_grad():
        y0 = m(x, torch.tensor([0, 0, 0]))
        y1 = m(x, torch.tensor([50, 50, 50]))
        y0b = m(x, torch.tensor([0, 0, 0]))
        parts = torch.cat([m(x[i:i + 1], torch.tensor([7 * i])) for i in range(3)])
        whole = m(x, torch.tensor([0, 7, 14]))
    assert y0.abs().max() > 0
    assert (y0 - y1).abs().max() > 1e-3 * y0.abs().max()
    assert torch.equal(y0, y0b)
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-5)


def test_unet_class_conditioning_changes_output():
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet(num_classes=5)).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen(2))
    t = torch.tensor([20, 20])
    with torch.no_grad():
        a = m(x, t, y=torch.tensor([0, 0]))
        b = m(x, t, y=torch.tensor([3, 3]))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    with pytest.raises(ValueError, match=r"\by\b"):
        m(x, t)


# ------------------------------------------------------------------------------------------------
# 12. training
# ------------------------------------------------------------------------------------------------


def test_train_lowers_the_loss():
    """150 steps on 64 structured 3x8x8 images: the last logged loss is well below the first."""
    torch.manual_seed(0)
    sch = speed.make_schedule("linear", 100)
    model = tiny_unet()
    r = speed.train(model, uint8_images(64, 8), sch, speed.make_strategy("uniform", sch), steps=150,
                    batch_size=16, lr=1e-3, warmup=10, log_every=25, device="cpu", progress=False)
    losses = [h["loss"] for h in r.history]
    assert len(losses) == 6 and r.step == 150
    assert [h["step"] for h in r.history] == [25, 50, 75, 100, 125, 150]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert r.model is model and not model.training
    # the EMA is a separate, frozen copy
    assert r.ema is not model and not any(p.requires_grad for p in r.ema.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(r.ema.parameters(), model.parameters()))


@pytest.mark.parametrize("compile,mode", [(True, None), ("reduce-overhead", "reduce-overhead")])
def test_train_passes_the_compile_mode_to_torch_compile(monkeypatch, compile, mode):
    """compile=True is torch.compile's default mode; a mode name (CUDA graphs: "reduce-overhead")
    reaches torch.compile; the compiled module is what the step calls, the original what is saved."""
    seen = []

    def fake_compile(model, mode=None):
        seen.append(mode)
        return lambda *a, **k: (seen.append("called"), model(*a, **k))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    sch = speed.make_schedule("linear", 50)
    model = tiny_unet()
    r = speed.train(model, uint8_images(16, 8), sch, speed.make_strategy("uniform", sch), steps=2,
                    batch_size=8, device="cpu", progress=False, compile=compile)
    assert seen == [mode, "called", "called"] and r.model is model
    with pytest.raises(ValueError, match="compile"):
        speed.train(model, uint8_images(16, 8), sch, speed.make_strategy("uniform", sch), steps=1,
                    batch_size=8, device="cpu", progress=False, compile="fastest")


def _state(r):
    return ([p.detach().clone() for p in r.model.parameters()], [p.detach().clone() for p in r.ema.parameters()])


def _hist(r):
    keys = ["step", "loss", "lr"] + [f"mse_{a}" for a in speed.AREA_NAMES]
    return [tuple(("nan" if isinstance(h[k], float) and math.isnan(h[k]) else h[k]) for k in keys) for h in r.history]


@pytest.mark.parametrize("strategy_name,opts", [("speed", {}), ("loss_aware", {"history": 2})])
def test_train_resume_matches_uninterrupted_run(tmp_path, strategy_name, opts):
    """train(N) vs train(N/2) + train(N, resume=True) from the checkpoint: identical logged losses
    and identical final parameters (model and EMA), with dropout on (global RNG restored)."""
    T, N = 24, 24
    sch = speed.make_schedule("linear", T)
    images = uint8_images(64, 8, seed=5)
    kw = dict(batch_size=16, lr=1e-3, warmup=5, log_every=1, device="cpu", progress=False, seed=3)

    torch.manual_seed(0)
    full = speed.train(tiny_unet(dropout=0.2), images, sch, speed.make_strategy(strategy_name, sch, **opts),
                       steps=N, ckpt_path=str(tmp_path / "full.pt"), **kw)

    ck = str(tmp_path / "part.pt")
    torch.manual_seed(0)
    s1 = speed.make_strategy(strategy_name, sch, **opts)
    half = speed.train(tiny_unet(dropout=0.2), images, sch, s1, steps=N // 2, ckpt_path=ck, **kw)
    assert half.step == N // 2 and os.path.exists(ck)
    if strategy_name == "loss_aware":  # the saved state is non-uniform, so resuming it matters
        assert int(s1.counts.min()) >= opts["history"]
        assert s1.probs.max() > 1.2 * s1.probs.min()
    torch.manual_seed(123)  # a different init: the weights must come from the checkpoint
    resumed = speed.train(tiny_unet(dropout=0.2), images, sch, speed.make_strategy(strategy_name, sch, **opts),
                          steps=N, ckpt_path=ck, resume=True, **kw)
    assert resumed.step == N
    assert _hist(resumed) == _hist(full)
    (pf, ef), (pr, er) = _state(full), _state(resumed)
    assert all(torch.equal(a, b) for a, b in zip(pf, pr))
    assert all(torch.equal(a, b) for a, b in zip(ef, er))
    if strategy_name == "loss_aware":
        assert torch.equal(full.strategy.losses, resumed.strategy.losses)


def test_train_dropout_actually_randomises():
    """Sanity for the resume test: with dropout, a different seed gives a different run."""
    sch = speed.make_schedule("linear", 24)
    images = uint8_images(32, 8, seed=5)
    kw = dict(batch_size=16, lr=1e-3, warmup=5, log_every=1, device="cpu", progress=False, steps=3)
    torch.manual_seed(0)
    a = speed.train(tiny_unet(dropout=0.2), images, sch, speed.make_strategy("uniform", sch), seed=1, **kw)
    torch.manual_seed(0)
    b = speed.train(tiny_unet(dropout=0.2), images, sch, speed.make_strategy("uniform", sch), seed=1, **kw)
    torch.manual_seed(0)
    c = speed.train(tiny_unet(dropout=0.2), images, sch, speed.make_strategy("uniform", sch), seed=2, **kw)
    assert _hist(a) == _hist(b)
    assert _hist(a) != _hist(c)


def test_train_checkpoint_mismatch_raises(tmp_path):
    sch = speed.make_schedule("linear", 24)
    images = uint8_images(32, 8)
    ck = str(tmp_path / "ck.pt")
    kw = dict(batch_size=16, log_every=1, device="cpu", progress=False, ckpt_path=ck)
    speed.train(tiny_unet(), images, sch, speed.make_strategy("speed", sch), steps=2, **kw)
    with pytest.raises(ValueError, match="checkpoint"):
        speed.train(tiny_unet(), images, sch, speed.make_strategy("uniform", sch), steps=4, **kw)
    # resume=False starts over without complaint
    r = speed.train(tiny_unet(), images, sch, speed.make_strategy("uniform", sch), steps=1, resume=False,
                    **{k: v for k, v in kw.items()})
    assert r.step == 1


# ------------------------------------------------------------------------------------------------
# 13. samplers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sample_reproducible_and_seed_dependent(eta):
    sch = speed.make_schedule("linear", 50)
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet()).eval()
    kw = dict(shape=(3, 8, 8), steps=10, eta=eta, device="cpu")
    a = speed.ddim_sample(m, sch, 5, generator=gen(1), **kw)
    b = speed.ddim_sample(m, sch, 5, generator=gen(1), **kw)
    c = speed.ddim_sample(m, sch, 5, generator=gen(2), **kw)
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # batching does not change the result (noise drawn per batch in order)
    d = speed.ddim_sample(m, sch, 5, generator=gen(1), batch_size=5, **kw)
    assert torch.equal(a, d)


def test_ddpm_sample_runs_on_small_T():
    sch = speed.make_schedule("linear", 50)
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet(num_classes=3)).eval()
    out = speed.ddpm_sample(m, sch, 4, shape=(3, 8, 8), labels=torch.tensor([0, 1, 2, 0]), generator=gen(3))
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 8, 8)
    out2 = speed.ddpm_sample(m, sch, 4, shape=(3, 8, 8), labels=torch.tensor([0, 1, 2, 0]), generator=gen(3))
    assert torch.equal(out, out2)


class GaussOracle(nn.Module):
    """The exact denoiser for data x0 ~ N(mu, v) iid per pixel, in the eps, x0 or v parameterisation:
    E[x0 | x_t] = mu + a v (x_t - a mu) / (a^2 v + s^2), a = sqrt(abar_t), s = sqrt(1 - abar_t)."""

    def __init__(self, mu, v, schedule, target):
        super().__init__()
        self.mu, self.v, self.target = mu, v, target
        self.ab = torch.from_numpy(np.cumprod(1 - schedule.betas.numpy()))
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the sampler a device

    def forward(self, x, t):
        ab = self.ab[t].view(-1, 1, 1, 1)
        a, s, xd = ab.sqrt(), (1 - ab).sqrt(), x.double()
        x0 = self.mu + a * self.v * (xd - a * self.mu) / (a * a * self.v + s * s)
        eps = (xd - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.target].float()


def _ddim_reference(x, mu, v, ab, ts, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12) with the exact Gaussian denoiser, written out in float64;
    eta = 0 only (deterministic)."""
    x = x.double()
    for j, t in enumerate(ts):
        a_t = ab[t]
        a_p = ab[ts[j + 1]] if j + 1 < len(ts) else 1.0
        x0 = mu + math.sqrt(a_t) * v * (x - math.sqrt(a_t) * mu) / (a_t * v + 1 - a_t)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    return x


@pytest.mark.parametrize("target", speed.TARGETS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_exact_denoiser_matches_reference(target, steps):
    """DDIM (eta = 0) with the exact denoiser of Gaussian data, any target parameterisation, equals the
    update written out independently (steps evenly spaced from T-1 to 0), up to uint8 rounding; a
    model read with the wrong parameterisation does not."""
    T, mu, v = 50, 0.1, 0.09
    sch = speed.make_schedule("linear", T)
    m = GaussOracle(mu, v, sch, target)
    out = speed.ddim_sample(m, sch, 6, shape=(3, 4, 4), steps=steps, target=target, generator=gen(5), clip=False)
    x_T = torch.randn((6, 3, 4, 4), generator=gen(5))
    ts = sorted(set(np.round(np.linspace(T - 1, 0, steps)).astype(int).tolist()), reverse=True)
    ref = _ddim_reference(x_T, mu, v, np_alpha_bar("linear", T), ts)
    ref_u8 = ((ref + 1) * 127.5).round().clamp(0, 255)
    assert (out.double() - ref_u8).abs().max().item() <= 1
    if steps == 1:  # one step from T-1 (abar ~ 0) returns E[x0 | x_T] ~ mu: a flat image
        return
    assert out.double().std() > 5  # not a constant image
    wrong = {"eps": "x0", "x0": "v", "v": "eps"}[target]
    bad = speed.ddim_sample(m, sch, 6, shape=(3, 4, 4), steps=steps, target=wrong, generator=gen(5), clip=False)
    assert (bad.double() - ref_u8).abs().max().item() > 1


@pytest.mark.parametrize("target", speed.TARGETS)
def test_ddpm_sample_with_exact_denoiser_has_predicted_mean_and_variance(target):
    """DDPM ancestral sampling (posterior variance beta~) with the exact denoiser of N(mu, v) data: the
    sampler is affine-Gaussian, so its output is N(M, V) with M, V from the recursion
    x_{t-1} = A x_t + B + sigma z. 2000 samples x 48 pixels: mean within 5 s.e., variance within 5%."""
    T, mu, v, n = 50, 0.1, 0.04, 2000
    sch = speed.make_schedule("linear", T)
    ab = np_alpha_bar("linear", T)
    M, V = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        a_t, a_p = ab[t], (ab[t - 1] if t > 0 else 1.0)
        sig2 = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        # x0_hat = c0 + c1 x_t ; eps_hat = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t)
        c1 = math.sqrt(a_t) * v / (a_t * v + 1 - a_t)
        c0 = mu - c1 * math.sqrt(a_t) * mu
        k = math.sqrt(max(1 - a_p - sig2, 0.0)) / math.sqrt(1 - a_t)
        A = math.sqrt(a_p) * c1 + k * (1 - math.sqrt(a_t) * c1)
        B = math.sqrt(a_p) * c0 - k * math.sqrt(a_t) * c0
        M, V = A * M + B, A * A * V + sig2
    out = speed.ddpm_sample(GaussOracle(mu, v, sch, target), sch, n, shape=(3, 4, 4), target=target,
                            generator=gen(6), batch_size=1000)
    x = out.double() / 127.5 - 1
    N = x.numel()
    assert abs(x.mean().item() - M) < 5 * math.sqrt(V / N)
    assert abs(x.var().item() / V - 1) < 0.05
    # sanity: the recursion itself ends near the data (mean exactly, variance below v: beta~ is the
    # lower-bound reverse variance, which under-disperses with only T = 50 steps)
    assert abs(M - mu) < 1e-3 and 0.5 * v < V < v


# ------------------------------------------------------------------------------------------------
# 14. Frechet distance
# ------------------------------------------------------------------------------------------------


def test_frechet_identical_features_is_zero():
    f = torch.randn(500, 16, generator=gen(0), dtype=torch.float64) @ torch.randn(16, 16, generator=gen(1),
                                                                                   dtype=torch.float64)
    tr = torch.cov(f.T).trace().item()
    assert abs(speed.frechet_distance(f, f)) < 1e-8 * tr
    # fewer samples than dimensions (singular covariance)
    g = torch.randn(10, 64, generator=gen(2), dtype=torch.float64)
    assert abs(speed.frechet_distance(g, g)) < 1e-6 * torch.cov(g.T).trace().item()


def test_frechet_diagonal_gaussians_closed_form():
    """Commuting diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    g = gen(3)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    b = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = speed.frechet_distance((mu1, torch.diag(a)), (mu2, torch.diag(b)))
    assert got == pytest.approx(expected, rel=1e-10)
    assert speed.frechet_distance((mu2, torch.diag(b)), (mu1, torch.diag(a))) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_scaled_closed_form():
    """S2 = c^2 S1 (non-diagonal): tr((S1 S2)^(1/2)) = c tr(S1), so FD = |dmu|^2 + (1 - c)^2 tr(S1)."""
    g = gen(4)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    S1 = A @ A.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    c = 1.7
    expected = float(((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * S1.trace())
    assert speed.frechet_distance((mu1, S1), (mu2, c * c * S1)) == pytest.approx(expected, rel=1e-9)


def test_frechet_full_covariance_vs_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    S1, S2 = A @ A.T + 0.05 * np.eye(6), B @ B.T + 0.05 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * np.trace(scipy_linalg.sqrtm(S1 @ S2)).real
    got = speed.frechet_distance((torch.from_numpy(mu1), torch.from_numpy(S1)),
                                 (torch.from_numpy(mu2), torch.from_numpy(S2)))
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_from_samples_approaches_closed_form():
    """From N = 200k samples of two known diagonal 3-D Gaussians the FD is within 0.03 of the closed form.
    The dominant error term 2 (mu1 - mu2).(mu_hat - mu) has s.d. sqrt(4 sum dmu_i^2 (a_i + b_i) / N)
    = 0.0044 here, so 0.03 is ~7 s.d."""
    N, g = 200_000, gen(6)
    mu1 = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    mu2 = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64)
    a = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    b = torch.tensor([0.3, 1.5, 2.0], dtype=torch.float64)
    X = mu1 + torch.randn(N, 3, generator=g, dtype=torch.float64) * a.sqrt()
    Y = mu2 + torch.randn(N, 3, generator=g, dtype=torch.float64) * b.sqrt()
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = speed.frechet_distance(X, Y)
    assert abs(got - expected) < 0.03
    # the fitted Gaussian itself (s.e. of each entry <= 2 * sqrt(2/N) ~ 0.006)
    mu_hat, cov_hat = speed.feature_stats(X)
    torch.testing.assert_close(mu_hat, mu1, atol=0.02, rtol=0)
    torch.testing.assert_close(cov_hat, torch.diag(a), atol=0.03, rtol=0)


def test_feature_stats_unbiased_covariance():
    f = torch.randn(7, 3, generator=gen(7), dtype=torch.float64)
    mu, cov = speed.feature_stats(f)
    fn = f.numpy()
    np.testing.assert_allclose(mu.numpy(), fn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(fn.T, ddof=1), rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# 15. feature nets and the Inception FID path (tiny TorchScript stand-ins)
# ------------------------------------------------------------------------------------------------


class FakeInception(nn.Module):
    """Same call signature as the StyleGAN2-ADA TorchScript Inception; refuses non-uint8 input;
    features = channel means of the raw uint8 pixels times a fixed [3, 2048] matrix."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(3, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        feats = img.to(torch.float32).mean(dim=[2, 3]) @ self.proj
        if return_features:
            return feats
        return feats[:, :1008]


class FakeGeneric(nn.Module):
    """A generic feature net: refuses non-float input; features = (min, max, mean, channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise RuntimeError("expected float32 images")
        n = x.shape[0]
        f = x.reshape(n, -1)
        c = torch.full([n], float(x.shape[1]))
        return torch.stack([f.amin(1), f.amax(1), f.mean(1), c], dim=1)


def _save_script(module, path):
    torch.jit.script(module).save(str(path))
    return str(path)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _inception_features(images_u8):
    proj = torch.randn(3, 2048, generator=torch.Generator().manual_seed(0))
    return images_u8.float().mean(dim=(2, 3)) @ proj


def test_load_cached_inception_without_download(tmp_path, monkeypatch):
    """(a) A cached inception-2015-12-05.pt is used as is: no network, uint8 input, 2048-d features."""
    cache = tmp_path / "cache"
    cache.mkdir()
    path = _save_script(FakeInception(), cache / "inception-2015-12-05.pt")

    def no_network(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    net = speed.load_feature_net("inception", cache_dir=str(cache))
    assert net.kind == "inception"
    images = uint8_images(5, 8, seed=1)
    f = net(images)
    assert f.shape == (5, 2048) and f.dtype == torch.float32
    torch.testing.assert_close(f, _inception_features(images), rtol=1e-5, atol=1e-3)
    # float images in [0, 255] are rounded to the same uint8 pixels
    torch.testing.assert_close(net(images.float()), f)
    # grayscale is expanded to 3 channels
    assert net(images[:, :1]).shape == (5, 2048)
    # compute_features batches and returns float64 on the CPU
    cf = speed.compute_features(net, images, batch_size=2)
    assert cf.dtype == torch.float64 and cf.shape == (5, 2048)
    torch.testing.assert_close(cf, f.double(), rtol=1e-5, atol=1e-3)  # batch size may change float32 rounding
    # the digest was recorded, and a later tampered file is refused
    assert (cache / "inception-2015-12-05.pt.sha256").read_text().strip() == _sha(path)
    with open(path, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        speed.load_feature_net("inception", cache_dir=str(cache))


def test_inception_download_records_sha256_and_rejects_wrong_checksum(tmp_path):
    """(b) Download through a file:// URL: saves the net and a .sha256 stamp; a wrong sha256=
    raises ValueError and leaves no file (not even a .part) behind."""
    src = _save_script(FakeInception(), tmp_path / "source.pt")
    url = "file://" + os.path.abspath(src)
    bad_dir = tmp_path / "bad"
    with pytest.raises(ValueError, match="sha256|checksum"):
        speed.load_feature_net("inception", cache_dir=str(bad_dir), url=url, sha256="0" * 64)
    assert not bad_dir.exists() or os.listdir(bad_dir) == []

    good_dir = tmp_path / "good"
    net = speed.load_feature_net("inception", cache_dir=str(good_dir), url=url)
    dest = good_dir / "inception-2015-12-05.pt"
    assert dest.exists() and _sha(dest) == _sha(src)
    assert (good_dir / "inception-2015-12-05.pt.sha256").read_text().strip() == _sha(src)
    assert sorted(os.listdir(good_dir)) == ["inception-2015-12-05.pt", "inception-2015-12-05.pt.sha256"]
    assert net(uint8_images(2, 8)).shape == (2, 2048)
    # the right pinned checksum is accepted
    pinned = tmp_path / "pinned"
    speed.load_feature_net("inception", cache_dir=str(pinned), url=url, sha256=_sha(src))
    assert (pinned / "inception-2015-12-05.pt").exists()


def test_generic_feature_net_gets_float_0_255(tmp_path):
    """(c) A TorchScript file not named inception* is 'generic' and gets float images in [0, 255]."""
    path = _save_script(FakeGeneric(), tmp_path / "fdnet.pt")
    net = speed.load_feature_net(path)
    assert net.kind == "generic"
    images = uint8_images(6, 8, seed=2)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0, 255
    f = net(images)
    x = images.float().reshape(6, -1)
    torch.testing.assert_close(f[:, 0], x.amin(1))
    torch.testing.assert_close(f[:, 1], x.amax(1))
    torch.testing.assert_close(f[:, 2], x.mean(1))
    assert f[:, 1].max().item() == 255.0 and f[:, 0].min().item() == 0.0
    # a path whose name starts with 'inception' is treated as the Inception net
    ipath = _save_script(FakeInception(), tmp_path / "inception-local.pt")
    assert speed.load_feature_net(ipath).kind == "inception"
    with pytest.raises(ValueError, match="feature net"):
        speed.load_feature_net(str(tmp_path / "missing.pt"))


def test_reference_stats_cached_and_reused(tmp_path, monkeypatch):
    """(d) reference_stats writes a cache; a second call loads it without computing features; other
    images (another key) are recomputed. fd_of_samples of the same images is ~0."""
    net = speed.load_feature_net(_save_script(FakeGeneric(), tmp_path / "fdnet.pt"))
    images = uint8_images(40, 8, seed=3)
    cache = tmp_path / "stats" / "ref.pt"
    mu, sigma = speed.reference_stats(net, images, cache_path=str(cache), batch_size=16)
    assert cache.exists()
    x = images.double().reshape(40, -1)
    feats = torch.stack([x.amin(1), x.amax(1), x.mean(1), torch.full((40,), 3.0, dtype=torch.float64)], 1)
    torch.testing.assert_close(mu, feats.mean(0))
    torch.testing.assert_close(sigma, torch.cov(feats.T))
    mtime = os.stat(cache).st_mtime_ns

    calls = _count_calls(monkeypatch, speed, "compute_features")
    mu2, sigma2 = speed.reference_stats(net, images, cache_path=str(cache), batch_size=16)
    assert calls == [] and os.stat(cache).st_mtime_ns == mtime
    assert torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    other = uint8_images(40, 8, seed=4)
    speed.reference_stats(net, other, cache_path=str(cache), batch_size=16)
    assert calls == [1]
    fd = speed.fd_of_samples(net, images, (mu, sigma), batch_size=16)
    assert abs(fd) < 1e-8 * float(sigma.trace())
    assert speed.fd_of_samples(net, other, (mu, sigma)) > 1e-3


# ================================================================================================
# train_tiny.py: the quick CIFAR-10 check and the side-by-side strategy comparison
# ================================================================================================
# The end-to-end tests use the project's shared data (../shared, next to the repository) and are
# skipped where it is absent; everything else builds its own small data in tmp_path. No test
# touches the network: every code path that could download has urllib.request.urlopen blocked.

import gzip  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import tarfile  # noqa: E402
import urllib.error  # noqa: E402
import zipfile  # noqa: E402

import train_tiny  # noqa: E402

SHARED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared")
SHARED_ZIP = os.path.join(SHARED_DIR, "data", "cifar10-train-jpeg75.zip")
SHARED_FDNET = os.path.join(SHARED_DIR, "metrics", "cifar10-fdnet.pt")
needs_shared = pytest.mark.skipif(
    not (os.path.exists(SHARED_ZIP) and os.path.exists(SHARED_FDNET)),
    reason=f"shared data not found: needs {SHARED_ZIP} and {SHARED_FDNET} (the project's ../shared folder)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _block_network(monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def _read_png(path):
    """Checks the PNG signature, then decodes with matplotlib: float array [H, W, 3 or 4] in [0, 1]."""
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One --cache for the end-to-end runs (decoded shared data and reference statistics are reused)."""
    return str(tmp_path_factory.mktemp("tiny_cache"))


# ---- 1. the cpu preset end to end, then --resume --------------------------------------------------

@needs_shared
def test_train_tiny_cpu_preset_end_to_end_then_resume(tmp_path, monkeypatch, tiny_cache):
    _block_network(monkeypatch)
    out = tmp_path / "run"
    argv = ["--preset", "cpu", "--data", SHARED_ZIP, "--fid-model", SHARED_FDNET, "--out", str(out),
            "--cache", tiny_cache, "--quiet"]
    assert train_tiny.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    # cpu preset: 20 steps, 2 evaluations -> FD at steps 10 and 20, on the first 64 images
    assert m["metric"] == "FD-fdnet" and m["strategy"] == "speed" and m["seed"] == 0
    assert m["finished"] is True and m["n_images"] == 64
    assert m["steps"] == m["planned_steps"] == 20
    assert [s for s, _ in m["evals"]] == [10, 20]
    assert all(math.isfinite(f) and f > 0 for _, f in m["evals"])
    assert math.isfinite(m["final"]) and m["final"] == m["evals"][-1][1]
    assert [h["step"] for h in m["history"]] == [10, 20]
    assert all(math.isfinite(h["loss"]) for h in m["history"])
    assert m["config"]["model"] == "micro" and m["config"]["batch_size"] == 8

    # samples.png: 64 samples of 32x32 as an 8x8 grid; loss_areas.png: the 6 x 3.5 in figure at 110 dpi
    grid = _read_png(out / "samples.png")
    assert grid.shape[:2] == (256, 256) and grid[..., :3].std() > 0.01
    assert _read_png(out / "loss_areas.png").shape[:2] == (385, 660)
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 20 and ck["config"]["strategy"] == "speed"
    assert ck["extra"]["evals"] == m["evals"]

    # --resume with more steps continues from step 20: only 10 more training steps run, and wall_s
    # adds this call's time to the earlier calls' (made large here so the sum is unmistakable)
    (out / "metrics.json").write_text(json.dumps({**m, "wall_s": 1000.0}))
    calls = _count_calls(monkeypatch, speed, "diffusion_loss")
    assert train_tiny.main(argv + ["--resume", "--steps", "30"]) == 0
    assert len(calls) == 10
    m2 = json.loads((out / "metrics.json").read_text())
    assert 1000 < m2["wall_s"] < 1000 + 300
    assert m2["steps"] == m2["planned_steps"] == 30 and m2["finished"] is True
    assert m2["evals"][:2] == m["evals"]  # the history continues: earlier results kept as they were
    assert [s for s, _ in m2["evals"]] == [10, 20, 30] and math.isfinite(m2["final"])
    assert m2["history"][:2] == m["history"] and [h["step"] for h in m2["history"]] == [10, 20, 30]
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["step"] == 30


def test_save_grid_layout(tmp_path):
    """Image r * nrow + c lands in grid row r, column c; a last incomplete row is dropped."""
    imgs = torch.arange(18, dtype=torch.uint8).mul(14).view(18, 1, 1, 1).expand(18, 3, 2, 3).contiguous()
    imgs[:, 1] = 255 - imgs[:, 1]
    path = tmp_path / "grid.png"
    train_tiny.save_grid(imgs, str(path), nrow=4)
    g = np.round(_read_png(path)[..., :3] * 255).astype(int)
    assert g.shape == (4 * 2, 4 * 3, 3)
    for r in range(4):
        for c in range(4):
            k = r * 4 + c
            cell = g[r * 2:(r + 1) * 2, c * 3:(c + 1) * 3]
            assert (cell[..., 0] == 14 * k).all() and (cell[..., 1] == 255 - 14 * k).all()


# ---- 2. --compare end to end, and summarize() on synthetic runs ------------------------------------

@needs_shared
def test_train_tiny_compare_two_strategies_two_seeds(tmp_path, monkeypatch, tiny_cache):
    _block_network(monkeypatch)
    out = tmp_path / "cmp"
    argv = ["--preset", "cpu", "--data", SHARED_ZIP, "--fid-model", SHARED_FDNET, "--cache", tiny_cache,
            "--quiet", "--compare", "uniform,speed", "--seeds", "0,1", "--parallel", "2", "--steps", "4",
            "--evals", "2", "--eval-samples", "32", "--sample-steps", "2", "--out", str(out)]
    assert train_tiny.main(argv) == 0
    runs = {}
    for spec in ("uniform", "speed"):
        for seed in (0, 1):
            d = train_tiny.run_dir(str(out), spec, seed)
            with open(os.path.join(d, "metrics.json")) as f:
                r = json.load(f)
            assert (r["strategy"], r["seed"], r["steps"], r["finished"]) == (spec, seed, 4, True)
            assert [s for s, _ in r["evals"]] == [2, 4] and r["metric"] == "FD-fdnet" and r["n_images"] == 64
            assert r["config"]["eval_samples"] == 32 and r["config"]["compare"] is None
            assert os.path.exists(os.path.join(d, "samples.png")) and os.path.exists(os.path.join(d, "ckpt.pt"))
            runs[spec, seed] = r
    # the seed and the strategy reach the children: four different trainings
    assert len({r["evals"][-1][1] for r in runs.values()}) == 4

    s = json.loads((out / "compare.json").read_text())
    assert s["baseline"] == "uniform" and s["metric"] == "FD-fdnet" and s["common_steps"] == [2, 4]
    assert s["steps_reached"] == {f"{k}_s{sd}": 4 for k in ("uniform", "speed") for sd in (0, 1)}
    assert [r["strategy"] for r in s["rows"]] == ["uniform", "speed"]
    for row in s["rows"]:
        finals = [runs[row["strategy"], sd]["final"] for sd in (0, 1)]
        assert row["seeds"] == 2 and len(row["speedup_per_seed"]) == 2
        assert row["final_mean"] == pytest.approx(sum(finals) / 2)
        assert s["curves"][row["strategy"]]["per_seed"] == [[f for _, f in runs[row["strategy"], sd]["evals"]]
                                                           for sd in (0, 1)]
    uni = s["rows"][0]
    assert uni["speedup_mean_curve"] == 1.0 and uni["speedup_per_seed"] == [1.0, 1.0]
    md = (out / "compare.md").read_text().splitlines()
    assert len(md) == 4 and md[2].startswith("| uniform | 2 |") and md[3].startswith("| speed | 2 |")
    assert _read_png(out / "compare.png").shape[:2] == (504, 840)


def _write_run(out, spec, seed, evals, partial=False, metric="FD-x"):
    d = train_tiny.run_dir(str(out), spec, seed)
    os.makedirs(d, exist_ok=True)
    m = dict(strategy=spec, seed=seed, metric=metric, final=evals[-1][1] if evals else None, evals=evals,
             steps=evals[-1][0] if evals else 0, planned_steps=30, finished=not partial, wall_s=1.5 + seed,
             device="cpu", data="synthetic", n_images=8, config={}, history=[])
    with open(os.path.join(d, "metrics.partial.json" if partial else "metrics.json"), "w") as f:
        json.dump(m, f)


def _synthetic_runs(out):
    """uniform (baseline) and speed with seeds 0, 1; p2 only with seed 0. speed seed 0 was killed after
    step 20 (only metrics.partial.json), so every curve is compared on the common steps 10 and 20."""
    _write_run(out, "uniform", 0, [[10, 50.0], [20, 40.0], [30, 30.0]])
    _write_run(out, "uniform", 1, [[10, 54.0], [20, 42.0], [30, 34.0]])
    _write_run(out, "speed", 0, [[10, 45.0], [20, 25.0]], partial=True)
    _write_run(out, "speed", 1, [[10, 44.0], [20, 30.0], [30, 20.0]])
    _write_run(out, "speed", 1, [[10, 99.0]], partial=True)  # stale: metrics.json wins
    _write_run(out, "p2", 0, [[10, 60.0], [20, 45.0], [30, 41.0]])


def test_summarize_partial_runs_compared_on_common_steps(tmp_path, capsys):
    out = tmp_path / "cmp"
    _synthetic_runs(out)
    s = train_tiny.summarize(str(out), ["uniform", "speed", "p2"], [0, 1])
    assert s["common_steps"] == [10, 20] and s["baseline"] == "uniform" and s["metric"] == "FD-x"
    assert s["steps_reached"] == {"uniform_s0": 30, "uniform_s1": 30, "speed_s0": 20, "speed_s1": 30, "p2_s0": 30}
    assert s["wall_s"]["speed_s1"] == 2.5
    assert s["curves"]["speed"] == dict(steps=[10, 20], mean=[44.5, 27.5], per_seed=[[45.0, 25.0], [44.0, 30.0]])
    assert s["curves"]["uniform"]["mean"] == [52.0, 41.0]
    rows = {r["strategy"]: r for r in s["rows"]}
    assert list(rows) == ["uniform", "speed", "p2"]
    # baseline: its mean curve reaches its final (41, on the common steps) at step 20
    u = rows["uniform"]
    assert u["speedup_mean_curve"] == 1.0 and u["steps_to_base_final"] == 20.0
    assert u["speedup_per_seed"] == [1.0, 1.0] and u["final_mean"] == 41.0
    assert u["final_std"] == pytest.approx(math.sqrt(2.0))
    # speed mean curve (44.5, 27.5) crosses 41 at 10 + 10 * 3.5 / 17 = 205/17; speed-up 20 / (205/17)
    sp = rows["speed"]
    assert sp["steps_to_base_final"] == pytest.approx(205 / 17)
    assert sp["speedup_mean_curve"] == pytest.approx(68 / 41)
    # per seed on the common steps: seed 0 target 40: 10 + 10 * 5/20 = 12.5 -> 1.6;
    # seed 1 target 42: 10 + 10 * 2/14 = 80/7 -> 1.75
    assert sp["speedup_per_seed"] == pytest.approx([1.6, 1.75])
    assert sp["speedup_seed_mean"] == pytest.approx(1.675)
    assert sp["speedup_seed_std"] == pytest.approx(0.075 * math.sqrt(2))
    assert sp["final_mean"] == 27.5 and sp["final_std"] == pytest.approx(2.5 * math.sqrt(2))
    assert sp["seeds"] == 2 and sp["not_reached_seeds"] == 0
    # p2 (one seed) never gets down to 41 (or seed 0's 40) within the common steps
    p2 = rows["p2"]
    assert p2["seeds"] == 1 and p2["speedup_mean_curve"] is None and p2["steps_to_base_final"] is None
    assert p2["speedup_per_seed"] == [None] and p2["not_reached_seeds"] == 1
    assert p2["final_mean"] == 45.0 and p2["final_std"] == 0.0
    # objective shares per area on the default schedule (linear, T = 1000: the runs' config is empty)
    sch = speed.make_schedule("linear", 1000)
    for name in rows:
        assert rows[name]["area_shares"] == speed.make_strategy(name, sch).area_shares(speed.find_areas(sch))
    # the files
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(s))
    md = (out / "compare.md").read_text().splitlines()
    assert md[0].startswith("| strategy | seeds | final FD-x") and "speed-up vs uniform" in md[0]
    assert md[2] == "| uniform | 2 | 41.00 ± 1.41 | 1.00× | 1.00 ± 0.00 | 0.22 / 0.48 / 0.30 |"
    assert md[3] == "| speed | 2 | 27.50 ± 3.54 | 1.66× | 1.68 ± 0.11 | 0.28 / 0.57 / 0.15 |"
    assert md[4] == "| p2 | 1 | 45.00 ± 0.00 | not reached | —; 1 not reached | 0.04 / 0.54 / 0.42 |"
    assert "| speed | 2 |" in capsys.readouterr().out
    _read_png(out / "compare.png")


def test_compare_summarize_only_rebuilds_the_table(tmp_path, monkeypatch):
    """--compare ... --summarize reads the run folders only: no data, no training, no subprocess."""
    out = tmp_path / "cmp"
    _synthetic_runs(out)

    def forbidden(*a, **k):
        raise AssertionError("--summarize must not load data or start runs")

    monkeypatch.setattr(train_tiny, "load_data", forbidden)
    monkeypatch.setattr(train_tiny, "run_one", forbidden)
    monkeypatch.setattr(train_tiny.subprocess, "Popen", forbidden)
    _block_network(monkeypatch)
    assert train_tiny.main(["--compare", "uniform,speed", "--seeds", "0,1", "--summarize", "--out", str(out)]) == 0
    s = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in s["rows"]] == ["uniform", "speed"]
    assert s["rows"][1]["speedup_per_seed"] == pytest.approx([1.6, 1.75])
    assert (out / "compare.md").exists() and (out / "compare.png").exists()
    with pytest.raises(SystemExit, match="no finished runs"):
        train_tiny.summarize(str(tmp_path / "empty"), ["uniform"], [0])


# ---- 3. speed-up from quality-vs-steps curves -----------------------------------------------------

def test_steps_to_reach_interpolates_first_crossing():
    steps = [100, 200, 300]
    # halfway between evaluations: 8 at 200, 4 at 300 -> 6 at 250
    assert train_tiny.steps_to_reach(steps, [10.0, 8.0, 4.0], 6.0) == 250.0
    assert train_tiny.steps_to_reach(steps, [10.0, 8.0, 4.0], 8.0) == 200.0  # exactly at an evaluation
    assert train_tiny.steps_to_reach(steps, [10.0, 8.0, 4.0], 9.5) == 125.0  # a quarter of the way
    # already reached at the first evaluation: that step, no extrapolation towards 0
    r = train_tiny.steps_to_reach(steps, [5.0, 4.0, 3.0], 6.0)
    assert r == 100.0 and isinstance(r, float)
    assert train_tiny.steps_to_reach(steps, [10.0, 8.0, 4.0], 3.0) is None  # never reached
    assert train_tiny.steps_to_reach([], [], 1.0) is None
    # non-monotone: the first crossing counts (9 -> 5 crosses 6 at 17.5); bouncing to 7 later does not undo it
    assert train_tiny.steps_to_reach([10, 20, 30, 40], [9.0, 5.0, 7.0, 3.0], 6.0) == 17.5
    assert train_tiny.steps_to_reach([10, 20, 30, 40], [9.0, 7.0, 5.0, 8.0], 6.0) == 25.0


def test_speedup_factors():
    # the baseline's own curve dips below its final value (6) before the end: it "needed" only
    # 10 + 10 * (9 - 6) / (9 - 5) = 17.5 steps; the strategy reaches 6 at 10 + 10 * 2 / 4 = 15
    base_steps, base_fd = [10, 20, 30, 40], [9.0, 5.0, 7.0, 6.0]
    factor, need = train_tiny.speedup(base_steps, base_fd, [10, 20, 30, 40], [8.0, 4.0, 3.0, 2.0])
    assert need == 15.0 and factor == pytest.approx(17.5 / 15.0)
    # baseline against itself: 1
    assert train_tiny.speedup(base_steps, base_fd, base_steps, base_fd) == (1.0, 17.5)
    # reached at the strategy's first evaluation
    factor, need = train_tiny.speedup(base_steps, base_fd, [10, 20], [5.5, 5.0])
    assert need == 10.0 and factor == pytest.approx(1.75)
    # not reached: no factor
    assert train_tiny.speedup(base_steps, base_fd, [10, 20, 30, 40], [9.0, 8.0, 7.0, 6.5]) == (None, None)
    # a later bounce above the target does not undo a crossing
    factor, need = train_tiny.speedup(base_steps, base_fd, [10, 20, 30], [7.0, 5.0, 9.0])
    assert need == 15.0 and factor == pytest.approx(17.5 / 15.0)
    # different evaluation grids: base reaches its final 6 at 200; strategy 7 -> 5 over 50..100 crosses at 75
    factor, need = train_tiny.speedup([100, 200], [10.0, 6.0], [50, 100], [7.0, 5.0])
    assert need == 75.0 and factor == pytest.approx(200 / 75)



def test_steps_to_levels_against_the_baseline():
    curves = {"uniform": {"steps": [10, 20, 30], "mean": [9.0, 6.0, 4.0]},
              "speed": {"steps": [10, 20, 30], "mean": [7.0, 5.0, 4.5]}}
    table = train_tiny.steps_to_levels(curves, "uniform", [8.0, 5.0, 4.0])
    # uniform: 8 at 10 + 10/3, 5 at 25, 4 at 30; speed: 8 at its first evaluation, 5 at 20, never 4
    assert table["uniform"] == [(pytest.approx(40 / 3), 1.0), (25.0, 1.0), (30.0, 1.0)]
    assert table["speed"][0] == (10.0, pytest.approx(4 / 3))
    assert table["speed"][1] == (20.0, 1.25)
    assert table["speed"][2] == (None, None)
    # a level the baseline never reaches: steps for the strategy, but no ratio
    assert train_tiny.steps_to_levels(curves, "speed", [4.0])["uniform"] == [(30.0, None)]

# ---- 4. data: dataset zips, image folders, the CIFAR-10 archive, errors -----------------------------

def _rgb(h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(arr, fmt):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_load_zip_images_and_labels_in_sorted_order(tmp_path):
    arrs = {"img0.jpg": np.full((8, 6, 3), (200, 40, 90), np.uint8),  # flat colour: JPEG keeps it ±2
            "img1.png": _rgb(8, 6, 1), "img2.png": _rgb(8, 6, 2), "sub/img3.PNG": _rgb(8, 6, 3)}
    labels = {"img0.jpg": 7, "img1.png": 3, "img2.png": 5, "sub/img3.PNG": 1}
    path = tmp_path / "ds.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in ["img2.png", "sub/img3.PNG", "img0.jpg", "img1.png"]:  # stored out of order
            z.writestr(name, _encode(arrs[name], "JPEG" if name.endswith("jpg") else "PNG"))
        z.writestr("notes.txt", "not an image")
        z.writestr("dataset.json", json.dumps({"labels": [[n, lab] for n, lab in labels.items()]}))
    images, labs = train_tiny.load_zip(str(path))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 6)
    assert labs.tolist() == [7, 3, 5, 1]
    assert (images[0].permute(1, 2, 0).int() - torch.tensor([200, 40, 90])).abs().max() <= 2
    for i, name in enumerate(["img1.png", "img2.png", "sub/img3.PNG"], start=1):
        assert torch.equal(images[i], torch.from_numpy(arrs[name]).permute(2, 0, 1))
    images2, labs2 = train_tiny.load_zip(str(path), limit=2)
    assert torch.equal(images2, images[:2]) and labs2.tolist() == [7, 3]
    # without dataset.json (or with "labels": null) there are no labels
    for meta in (None, {"labels": None}):
        p = tmp_path / f"nolabels{meta is None}.zip"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("a.png", _encode(arrs["img1.png"], "PNG"))
            if meta is not None:
                z.writestr("dataset.json", json.dumps(meta))
        imgs, labs = train_tiny.load_zip(str(p))
        assert labs is None and imgs.shape == (1, 3, 8, 6)


def test_load_folder_and_load_data_cache(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    arrs = {"b.png": _rgb(5, 7, 1), "a.png": _rgb(5, 7, 2), "sub/c.png": _rgb(5, 7, 3)}
    for name, a in arrs.items():
        (folder / name).write_bytes(_encode(a, "PNG"))
    (folder / "readme.txt").write_text("not an image")
    images, labels = train_tiny.load_folder(str(folder))
    assert labels is None and images.dtype == torch.uint8 and images.shape == (3, 3, 5, 7)
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        assert torch.equal(images[i], torch.from_numpy(arrs[name]).permute(2, 0, 1))
    # load_data decodes once into the cache; a second call reads the cache (no decoding)
    cache = tmp_path / "cache"
    images2, _ = train_tiny.load_data(str(folder), str(cache), limit=2)
    assert torch.equal(images2, images[:2])
    assert [f for f in os.listdir(cache) if f.startswith("decoded-")] and len(os.listdir(cache)) == 1

    def no_decode(*a, **k):
        raise AssertionError("must read the cache")

    monkeypatch.setattr(train_tiny, "load_folder", no_decode)
    images3, labels3 = train_tiny.load_data(str(folder), str(cache), limit=2)
    assert torch.equal(images3, images[:2]) and labels3 is None


def test_data_errors_are_clear_and_leave_no_cache(tmp_path):
    # images of different sizes, in a folder and in a zip
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes(_encode(_rgb(8, 8, 0), "PNG"))
    (folder / "b.png").write_bytes(_encode(_rgb(6, 8, 1), "PNG"))
    with pytest.raises(train_tiny.DataError, match="different sizes.*resize"):
        train_tiny.load_folder(str(folder))
    mixed_zip = tmp_path / "mixed.zip"
    with zipfile.ZipFile(mixed_zip, "w") as z:
        z.writestr("a.png", _encode(_rgb(8, 8, 0), "PNG"))
        z.writestr("b.jpg", _encode(_rgb(4, 4, 1), "JPEG"))
    with pytest.raises(train_tiny.DataError, match="different sizes"):
        train_tiny.load_zip(str(mixed_zip))
    # an undecodable image
    (folder / "b.png").write_bytes(b"garbage")
    with pytest.raises(train_tiny.DataError, match="could not decode image.*b.png"):
        train_tiny.load_folder(str(folder))
    with pytest.raises(train_tiny.DataError, match="holds no images"):
        train_tiny.load_folder(str(tmp_path / "cache_never"))  # os.walk of a missing folder: no files
    # a corrupt zip: DataError, and load_data writes no cache
    bad = tmp_path / "bad.zip"
    bad.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(train_tiny.DataError, match="could not read dataset zip"):
        train_tiny.load_zip(str(bad))
    cache = tmp_path / "cache"
    with pytest.raises(train_tiny.DataError):
        train_tiny.load_data(str(bad), str(cache))
    assert os.listdir(cache) == []
    # a label table missing an image
    nolab = tmp_path / "nolab.zip"
    with zipfile.ZipFile(nolab, "w") as z:
        z.writestr("a.png", _encode(_rgb(4, 4, 0), "PNG"))
        z.writestr("dataset.json", json.dumps({"labels": [["other.png", 1]]}))
    with pytest.raises(train_tiny.DataError, match="could not read dataset zip"):
        train_tiny.load_zip(str(nolab))
    # --data pointing nowhere
    with pytest.raises(train_tiny.DataError, match="no_such.zip: no such file or folder"):
        train_tiny.load_data(str(tmp_path / "no_such.zip"), str(cache))


def _cifar_pickle(batch):
    rs = np.random.RandomState(batch)
    data = rs.randint(0, 256, (2, 3072), dtype=np.uint8)
    return data, [(batch + j) % 10 for j in range(2)]


def _cifar_tar_bytes():
    """The CIFAR-10 python layout: cifar-10-batches-py/data_batch_1..5, each a pickle with b'data'
    (rows of 1024 red, 1024 green, 1024 blue bytes, row-major 32x32) and b'labels'; 2 images each."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(1, 6):
            data, labels = _cifar_pickle(i)
            b = pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    return buf.getvalue()


def _fake_download(archive_bytes, calls):
    def download(url, path, md5=None, **k):
        calls.append((url, md5))
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(archive_bytes)
        return path
    return download


def test_load_cifar10_archive_and_load_data_without_data(tmp_path, monkeypatch):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(gzip.compress(_cifar_tar_bytes(), mtime=0))
    images, labels = train_tiny.load_cifar10_archive(str(path))
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 32, 32)
    assert labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    for i in range(1, 6):
        data, _ = _cifar_pickle(i)
        for j in range(2):
            img = images[2 * (i - 1) + j]
            assert torch.equal(img[0].flatten(), torch.from_numpy(data[j, :1024]))       # red plane
            assert torch.equal(img[2, 31], torch.from_numpy(data[j, 3072 - 32:]))       # last blue row
    # load_data(None): the (faked) download of the official archive, decoded and cached
    _block_network(monkeypatch)
    calls = []
    monkeypatch.setattr(speed, "download", _fake_download(gzip.compress(_cifar_tar_bytes()), calls))
    cache = tmp_path / "cache"
    imgs, labs = train_tiny.load_data(None, str(cache), limit=3)
    assert calls == [(train_tiny.CIFAR10_URL, train_tiny.CIFAR10_MD5)]
    assert torch.equal(imgs, images[:3]) and labs.tolist() == [1, 2, 2]
    assert len([f for f in os.listdir(cache) if f.startswith("decoded-")]) == 1


def _corrupt_cifar_archives():
    raw = _cifar_tar_bytes()
    good = gzip.compress(raw, mtime=0)
    # a second gzip member whose deflate data starts with the reserved block type 3: decompression
    # fails in the middle of data_batch_2's bytes (after the first member decoded cleanly)
    cut = 512 + 1024 + 512 + 700
    header = gzip.compress(b"", mtime=0)[:10]
    return {"truncated": good[: len(good) // 2],
            "corrupt-stream": gzip.compress(raw[:cut], mtime=0) + header + b"\x07" + bytes(64),
            "not-gzip": b"<html>proxy error</html>" * 10,
            "no-batches": gzip.compress(b"\0" * 2048, mtime=0)}


@pytest.mark.parametrize("kind", ["truncated", "corrupt-stream", "not-gzip", "no-batches"])
def test_corrupt_cifar10_archive_is_a_data_error_and_not_cached(tmp_path, monkeypatch, kind):
    data = _corrupt_cifar_archives()[kind]
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(data)
    with pytest.raises(train_tiny.DataError, match="corrupt or truncated.*delete it"):
        train_tiny.load_cifar10_archive(str(path))
    _block_network(monkeypatch)
    monkeypatch.setattr(speed, "download", _fake_download(data, []))
    cache = tmp_path / "cache"
    with pytest.raises(train_tiny.DataError, match="corrupt or truncated"):
        train_tiny.load_data(None, str(cache))
    assert not [f for f in os.listdir(cache) if f.startswith("decoded-") or ".tmp" in f]


def test_main_without_internet_or_data_says_how_to_pass_data(tmp_path, monkeypatch, capsys):
    _block_network(monkeypatch)
    cache = tmp_path / "cache"
    argv = ["--preset", "cpu", "--out", str(tmp_path / "run"), "--cache", str(cache), "--quiet"]
    assert train_tiny.main(argv) == 2
    err = capsys.readouterr().err
    assert "could not download CIFAR-10" in err and "network blocked" in err
    assert "pass --data PATH" in err
    assert os.listdir(cache / "data") == []  # no partial download, nothing decoded
    assert not (tmp_path / "run" / "metrics.json").exists()
    # --data pointing nowhere
    assert train_tiny.main(argv + ["--data", str(tmp_path / "nowhere.zip")]) == 2
    assert "nowhere.zip: no such file or folder" in capsys.readouterr().err


# ---- 5. command line: strategy specs, per-run arguments of --compare -------------------------------

def test_parse_strategy():
    name, opts = train_tiny.parse_strategy("speed:k=2:dual=1:lam=0.5")
    assert name == "speed" and opts == {"k": 2, "dual": True, "lam": 0.5}
    assert type(opts["k"]) is int and type(opts["dual"]) is bool and type(opts["lam"]) is float
    assert train_tiny.parse_strategy("speed:lam=none") == ("speed", {"lam": None})
    assert train_tiny.parse_strategy("speed:dual=0:tau=700") == ("speed", {"dual": False, "tau": 700})
    assert train_tiny.parse_strategy("lognormal:p_mean=-1.2") == ("lognormal", {"p_mean": -1.2})
    assert train_tiny.parse_strategy("uniform") == ("uniform", {})
    for bad in ["speed:k2", "speed:k=2:dual", "speed:k=two"]:
        with pytest.raises(SystemExit, match="--strategy"):
            train_tiny.parse_strategy(bad)
    # the options reach make_strategy with the right types
    name, opts = train_tiny.parse_strategy("speed:k=2:lam=0.5")
    st = speed.make_strategy(name, speed.make_schedule("linear", 1000), **opts)
    assert st.name == "speed"


DROPPED = ["--compare", "--seeds", "--parallel", "--strategy", "--seed", "--out", "--time-budget"]


@pytest.mark.parametrize("opt", DROPPED)
def test_child_args_drop_per_run_options(opt):
    assert train_tiny._child_args(["--steps", "4", opt, "v", "--quiet"]) == ["--steps", "4", "--quiet"]
    assert train_tiny._child_args([opt + "=v", "--steps", "4"]) == ["--steps", "4"]
    assert train_tiny._child_args(["--lr", "1e-3", opt + "=v"]) == ["--lr", "1e-3"]


def test_child_args_keep_the_rest():
    argv = ["--compare", "uniform,speed:k=2", "--seeds=0,1", "--parallel", "2", "--strategy=speed",
            "--seed", "3", "--out", "runs/x", "--time-budget=60", "--summarize", "--steps", "4",
            "--data=foo.zip", "--quiet", "--lr", "1e-3", "--summarize=", "--preset", "cpu"]
    keep = ["--steps", "4", "--data=foo.zip", "--quiet", "--lr", "1e-3", "--preset", "cpu"]
    assert train_tiny._child_args(argv) == keep
    # --summarize is a flag: what follows it is kept
    assert train_tiny._child_args(["--summarize", "--steps", "4"]) == ["--steps", "4"]
    assert train_tiny._child_args(["--steps", "4", "--summarize"]) == ["--steps", "4"]
    # parse_args records them, and fills in the preset
    args = train_tiny.parse_args(["--compare", "uniform,speed", "--seeds", "0,1", "--preset", "cpu", "--steps", "4"])
    assert args.child_args == ["--preset", "cpu", "--steps", "4"]
    assert (args.steps, args.batch_size, args.model, args.evals) == (4, 8, "micro", 2)
    assert args.out == os.path.join("runs", "compare")
    for bad in (["--steps", "0"], ["--parallel", "0"], ["--eval-samples", "0"]):
        with pytest.raises(SystemExit):
            train_tiny.parse_args(["--preset", "cpu"] + bad)


def test_compile_option_reaches_train(tmp_path, monkeypatch):
    """--compile none is False for speed.train; a mode name is passed on; the h100 preset uses CUDA graphs."""
    assert train_tiny.PRESETS["h100"]["compile"] == "reduce-overhead"
    assert train_tiny.parse_args(["--preset", "cpu"]).compile == "none"
    assert train_tiny.parse_args(["--preset", "cpu", "--compile", "default"]).compile == "default"
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--preset", "cpu", "--compile", "fastest"])
    seen = []
    monkeypatch.setattr(train_tiny.speed, "train", lambda *a, **k: seen.append(k["compile"]) or 1 / 0)
    monkeypatch.setattr(train_tiny, "load_data", lambda *a: (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), None))
    for flag, want in (("none", False), ("reduce-overhead", "reduce-overhead")):
        args = train_tiny.parse_args(["--preset", "cpu", "--fid-model", "none", "--compile", flag,
                                      "--cache", str(tmp_path)])
        with pytest.raises(ZeroDivisionError):
            train_tiny.run_one(args, "uniform", 0, str(tmp_path / flag))
        assert seen[-1] == want


def test_compile_without_triton_on_a_gpu_falls_back_to_eager(monkeypatch, capsys):
    real = train_tiny.importlib.util.find_spec
    assert train_tiny.compile_mode_for("none", "cuda") is False
    assert train_tiny.compile_mode_for("reduce-overhead", "cpu") == "reduce-overhead"
    monkeypatch.setattr(train_tiny.importlib.util, "find_spec", lambda n: None if n == "triton" else real(n))
    assert train_tiny.compile_mode_for("reduce-overhead", "cuda") is False
    assert "needs Triton" in capsys.readouterr().out
    monkeypatch.setattr(train_tiny.importlib.util, "find_spec", lambda n: object())
    assert train_tiny.compile_mode_for("reduce-overhead", "cuda") == "reduce-overhead"
    assert capsys.readouterr().out == ""


def test_compare_resume_continues_runs_stopped_by_the_time_budget(tmp_path):
    """--compare --resume skips a run only once it has reached --steps."""
    d = tmp_path / "run"
    assert not train_tiny._finished(str(d), 8)                      # never started
    d.mkdir()
    (d / "metrics.json").write_text("{not json")
    assert not train_tiny._finished(str(d), 8)                      # torn file
    (d / "metrics.json").write_text(json.dumps({"steps": 4, "planned_steps": 8}))
    assert not train_tiny._finished(str(d), 8)                      # stopped by a time budget
    assert train_tiny._finished(str(d), 4)


# ---- 6. time budget --------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [["--time-budget", "0"], ["--stop-at", "1"]])
def test_time_budget_stops_at_the_first_check(tmp_path, monkeypatch, capsys, budget):
    _block_network(monkeypatch)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(16):
        (folder / f"{i:02d}.png").write_bytes(_encode(_rgb(8, 8, i), "PNG"))
    out = tmp_path / "run"
    argv = ["--preset", "cpu", "--data", str(folder), "--fid-model", "none", "--out", str(out),
            "--cache", str(tmp_path / "cache"), "--quiet", "--steps", "8", "--evals", "2", "--sample-steps", "1"]
    assert train_tiny.main(argv + budget) == 0
    m = json.loads((out / "metrics.json").read_text())
    # checks every min(eval_every, 50) = 4 steps: stopped at step 4 of 8, and still wrote everything
    assert m["finished"] is True and m["planned_steps"] == 8 and m["steps"] == 4
    assert m["metric"] is None and m["final"] is None and m["evals"] == [] and m["n_images"] == 16
    assert [h["step"] for h in m["history"]] == [4]
    assert "time budget reached at step 4" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["step"] == 4
    assert _read_png(out / "samples.png").shape[:2] == (64, 64)  # 8 x 8 grid of 8x8 samples


# ================================================================================================
# tutorial.ipynb: CI executes it headlessly on the CPU in its small mode and fails on any cell error
# ================================================================================================

@needs_shared  # no internet in tests: the notebook's data comes from the shared zip
def test_tutorial_notebook_runs_top_to_bottom_in_small_mode(monkeypatch):
    """The whole notebook through a real Jupyter kernel (SPEED_TUTORIAL_SMALL=1 shrinks it)."""
    nbformat = pytest.importorskip("nbformat", reason="jupyter is in requirements.txt; CI installs it")
    nbclient = pytest.importorskip("nbclient", reason="jupyter is in requirements.txt; CI installs it")
    root = os.path.dirname(os.path.abspath(__file__))
    nb = nbformat.read(os.path.join(root, "tutorial.ipynb"), as_version=4)
    assert os.path.getsize(os.path.join(root, "tutorial.ipynb")) < 1.5e6  # committed with outputs, yet small
    monkeypatch.setenv("SPEED_TUTORIAL_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": root}}).execute()  # raises on a cell error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 8  # the plots were drawn
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SMALL mode: True" in text
