"""The specification of speed.py, section by section (1 schedule ... 11 Frechet distance).

Expected values are derived independently of the implementation: numpy re-derivations of the
published formulas (DDPM, Ho et al. 2020; improved DDPM, Nichol & Dhariwal 2021; SpeeD, Wang et al.
2024, arXiv 2405.17403; P2, Choi et al. 2022; Min-SNR, Hang et al. 2023; EDM, Karras et al. 2022;
SD3, Esser et al. 2024; DDIM, Song et al. 2021; FID, Heusel et al. 2017), hand computations, exact
denoisers of Gaussian data, and statistical tests whose false-alarm rate and power are computed.
Every random draw uses a fixed torch.Generator seed. bench/mutations.py breaks speed.py on purpose and
checks that this file notices.

Run: python -m pytest -q test_speed.py --durations=10
"""

import json
import math
import os
import signal

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


# ================================================================================================
# helpers: independent re-derivations in numpy, and statistics
# ================================================================================================

def gen(seed):
    return torch.Generator().manual_seed(seed)


def np_betas(kind, T):
    """DDPM linear (1e-4 .. 0.02 at T = 1000, both ends x 1000/T), improved-DDPM cosine (s = 0.008,
    clipped at 0.999), quadratic (sqrt(beta) linear between the linear schedule's ends)."""
    if kind == "cosine":
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    if kind == "linear":
        return np.linspace(lo, hi, T)
    return np.linspace(np.sqrt(lo), np.sqrt(hi), T) ** 2


def np_alpha_bar(kind, T):
    return np.cumprod(1 - np_betas(kind, T))


def np_snr(kind, T):
    ab = np_alpha_bar(kind, T)
    return ab / (1 - ab)


def np_areas(kind, T, threshold=0.1):
    """SpeeD Sec. 3.2 as in the official code: g = d(1 - abar)/dt by central differences; t_peak =
    argmax g; tau = first t > t_peak where the rate per unit of normalised time, T g_t, < threshold."""
    g = np.gradient(1 - np_alpha_bar(kind, T))
    t_peak = int(np.argmax(g))
    after = np.nonzero((np.arange(T) > t_peak) & (g * T < threshold))[0]
    return t_peak, int(after[0]), g


def np_speed_probs(T, tau, k):
    """SpeeD eq. 6: P(t) = k / (T + tau (k - 1)) below tau, 1 / (T + tau (k - 1)) from tau on."""
    Z = T + tau * (k - 1)
    return np.where(np.arange(T) < tau, k / Z, 1 / Z)


def np_speed_weights(kind, T, tau, lam):
    """SpeeD eq. 7: below tau g rescaled into [1 - lam, lam] (min and max over t < tau); 1 from tau."""
    g = np_areas(kind, T)[2][:tau]
    return np.concatenate([(1 - lam) + (2 * lam - 1) * (g - g.min()) / (g.max() - g.min()), np.ones(T - tau)])


def np_phi(z):
    return 0.5 * (1 + np.vectorize(math.erf)(np.asarray(z, dtype=np.float64) / math.sqrt(2)))


def np_mirror(p, m):
    """Distribution of |t - m| for t ~ p."""
    q = np.zeros_like(p)
    np.add.at(q, np.abs(np.arange(len(p)) - m), p)
    return q


def np_loss_aware_probs(losses_per_t, T, mix):
    """Improved DDPM Sec. 3.3: P(t) ~ sqrt(E[L_t^2]) over each t's recorded losses, mixed with mix uniform."""
    r = np.array([math.sqrt(np.mean(np.square(losses_per_t[t]))) for t in range(T)])
    return (1 - mix) * r / r.sum() + mix / T


def ref_probs(name, kind="linear", T=1000, **opts):
    """P(t) of each strategy from the papers' definitions (SpeeD's dual option: see np_mirror)."""
    if name in ("uniform", "p2", "min_snr", "loss_aware"):  # loss_aware: uniform until it has history
        return np.full(T, 1 / T)
    if name in ("speed", "speedit"):
        tau = opts.get("tau") or np_areas(kind, T, opts.get("threshold", 0.1))[1]
        p = np_speed_probs(T, tau, opts.get("k", 5))
        return (p + np_mirror(p, 642)) / 2 if opts.get("dual") else p
    if name == "lognormal":   # EDM: ln sigma ~ N(p_mean, p_std^2), moved to the nearest step in ln sigma
        ab = np_alpha_bar(kind, T)
        ls = 0.5 * np.log((1 - ab) / ab)
        z = ((ls[1:] + ls[:-1]) / 2 - opts.get("p_mean", -1.2)) / opts.get("p_std", 1.2)
        return np.diff(np.concatenate([[0.0], np_phi(z), [1.0]]))
    if name == "logitnormal":  # SD3: u ~ N(mean, std^2), t = round(sigmoid(u) (T - 1))
        s = (np.arange(T - 1) + 0.5) / (T - 1)
        z = (np.log(s / (1 - s)) - opts.get("mean", 0.0)) / opts.get("std", 1.0)
        return np.diff(np.concatenate([[0.0], np_phi(z), [1.0]]))
    raise KeyError(name)


def ref_weights(name, target="eps", kind="linear", T=1000, **opts):
    """w(t) of each strategy. P2 and Min-SNR are defined on the eps MSE; for x0 and v targets the same
    objective needs w_x0 = SNR w_eps and w_v = SNR / (SNR + 1) w_eps (|e_eps|^2 = SNR |e_x0|^2 =
    SNR / (SNR + 1) |e_v|^2). SpeeD's weights multiply any target's MSE."""
    snr = np_snr(kind, T)
    to_target = {"eps": np.ones(T), "x0": snr, "v": snr / (snr + 1)}[target]
    if name in ("uniform", "lognormal", "logitnormal"):
        return np.ones(T)
    if name == "speed":
        if "lam" in opts and opts["lam"] is None:
            return np.ones(T)
        tau = opts.get("tau") or np_areas(kind, T, opts.get("threshold", 0.1))[1]
        return np_speed_weights(kind, T, tau, opts.get("lam", 0.6))
    if name == "p2":
        return to_target / (opts.get("k", 1.0) + snr) ** opts.get("gamma", 1.0)
    if name == "speedit":
        return to_target / (opts.get("p2_k", 1.0) + snr) ** opts.get("p2_gamma", 1.0)
    if name == "min_snr":
        return to_target * np.minimum(snr, opts.get("gamma", 5.0)) / snr
    raise KeyError(name)


# ---- frequency tests with a computed false-alarm rate and power ---------------------------------

Z_ALARM = 5.0  # one-sided normal quantile of the chi-square threshold: false alarm ~3e-7 per test


def chi2_threshold(df, z=Z_ALARM):
    """Wilson-Hilferty approximation of the chi-square(df) quantile at standard-normal quantile z."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def pool_bins(p, n, min_expected=20):
    """Group consecutive bins so that each group expects >= min_expected of n draws (the chi-square
    approximation needs it): an int array mapping each bin to its group."""
    group, g, acc = np.zeros(len(p), dtype=np.int64), 0, 0.0
    for i, pi in enumerate(p):
        group[i] = g
        acc += pi * n
        if acc >= min_expected:
            g, acc = g + 1, 0.0
    if acc > 0 and g > 0:           # the last, under-full group joins the previous one
        group[group == g] = g - 1
    return group


def chi2_stat(t, p, T):
    """Pearson's statistic of draws t against P(t) = p over pooled bins, and its degrees of freedom."""
    group = pool_bins(p, len(t))
    k = group.max() + 1
    obs = np.bincount(group, weights=np.bincount(t, minlength=T)[:T].astype(np.float64), minlength=k)
    exp = np.bincount(group, weights=p * len(t), minlength=k)
    return float(((obs - exp) ** 2 / exp).sum()), k - 1


def chi2_power_margin(p, q, n):
    """How far (in standard deviations) the expected statistic under the alternative q lies above
    the threshold: non-central chi-square with lambda = n sum (q - p)^2 / p over the pooled bins has
    mean df + lambda and variance 2 (df + 2 lambda). > 0 means the test detects q (miss < 3e-7 at
    margin 5)."""
    group = pool_bins(p, n)
    k = group.max() + 1
    pg, qg = np.bincount(group, weights=p, minlength=k), np.bincount(group, weights=q, minlength=k)
    lam, df = n * float(((qg - pg) ** 2 / pg).sum()), k - 1
    return (df + lam - chi2_threshold(df)) / math.sqrt(2 * (df + 2 * lam))


def shifted_by_one(p):
    """The distribution of min(t + 1, T - 1): a sampler off by one step."""
    q = np.concatenate([[0.0], p[:-1]])
    q[-1] += p[-1]
    return q


# ---- data and models --------------------------------------------------------------------------

def structured_images(n=16, c=3, res=16, seed=0):
    """Synthetic images in [-1, 1] with spatial structure (gradient, stripes, checkerboard), randomly
    inverted per image, plus a little noise."""
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.arange(res, dtype=torch.float64), torch.arange(res, dtype=torch.float64),
                            indexing="ij")
    base = torch.stack([(xx + yy) / (2 * res - 2), torch.sin(xx / 2) * 0.5 + 0.5, ((xx // 2 + yy // 2) % 2)])[:c]
    x = base[None].repeat(n, 1, 1, 1)
    flip = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), 1 - x, x)
    x = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.clamp(0, 1) * 2 - 1


def uint8_images(n=64, res=8, seed=0):
    return ((structured_images(n, 3, res, seed) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def tiny_unet(**kw):
    return speed.UNet(**{**dict(img_res=8, ch=16, ch_mult=(1, 2), num_blocks=1, attn_res=(4,), dropout=0.0), **kw})


@torch.no_grad()
def perturb_zero_init(model, seed=0, std=0.05):
    """The UNet zero-initialises its output layers, so at init its output is 0 whatever t and y.
    Give those all-zero weights random values."""
    g = gen(seed)
    for p in model.parameters():
        if p.ndim > 1 and bool((p == 0).all()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def raises(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


# ================================================================================================
# 1. Schedule
# ================================================================================================

@pytest.mark.parametrize("kind", speed.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_schedule_values_equal_the_published_formulas(kind, T):
    """float64 CPU tensors of length T equal to the independent formulas; abar strictly decreasing."""
    s = speed.make_schedule(kind, T)
    assert s.T == T
    for name in ("betas", "alphas", "alpha_bar"):
        x = getattr(s, name)
        assert x.shape == (T,) and x.dtype == torch.float64 and x.device.type == "cpu", name
    np.testing.assert_allclose(s.betas.numpy(), np_betas(kind, T), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s.alphas.numpy(), 1 - np_betas(kind, T), rtol=1e-12)
    np.testing.assert_allclose(s.alpha_bar.numpy(), np_alpha_bar(kind, T), rtol=1e-10, atol=1e-300)
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())


@pytest.mark.parametrize("kind", ["linear", "quadratic"])
@pytest.mark.parametrize("T", [1000, 4000, 250])
def test_schedule_ends_are_ddpm_scaled_by_1000_over_T(kind, T):
    """DDPM: beta from 1e-4 to 0.02 at T = 1000; improved DDPM scales both ends by 1000/T."""
    s = speed.make_schedule(kind, T)
    assert s.betas[0].item() == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02 * 1000 / T, rel=1e-12)


def test_cosine_schedule_is_the_f_ratio_and_clips_at_0999():
    """Improved DDPM eq. 17: abar_t = f(t+1)/f(0) wherever betas are not clipped; last beta = 0.999."""
    T = 1000
    s = speed.make_schedule("cosine", T)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(s.alpha_bar[:-1].numpy(), (f[1:] / f[0])[:-1], rtol=1e-9)
    assert s.betas[-1].item() == pytest.approx(0.999) and s.betas.max().item() <= 0.999


def test_schedule_from_betas_hand_computed():
    """from_betas keeps float64 precision from Python floats; alphas = 1 - betas; alpha_bar = cumprod."""
    s = speed.Schedule.from_betas([0.3, 0.6])
    assert s.betas.dtype == torch.float64 and s.T == 2
    np.testing.assert_allclose(s.betas.numpy(), [0.3, 0.6], rtol=1e-15)
    np.testing.assert_allclose(s.alpha_bar.numpy(), [0.7, 0.7 * 0.4], rtol=1e-14)
    b = np.array([0.1, 0.25, 0.05, 0.5], dtype=np.float32).astype(np.float64)
    s = speed.Schedule.from_betas(torch.tensor([0.1, 0.25, 0.05, 0.5]))
    np.testing.assert_allclose(s.alphas.numpy(), 1 - b, rtol=1e-15)
    np.testing.assert_allclose(s.alpha_bar.numpy(), [(1 - b[0]), (1 - b[0]) * (1 - b[1]),
                                                     (1 - b[0]) * (1 - b[1]) * (1 - b[2]),
                                                     (1 - b[0]) * (1 - b[1]) * (1 - b[2]) * (1 - b[3])], rtol=1e-14)


def test_schedule_snr_sigma_and_scales():
    """SNR = abar/(1-abar), sigma = SNR^(-1/2); scales(device) = float32 (sqrt(abar), sqrt(1-abar))."""
    s = speed.make_schedule("linear", 100)
    ab = np_alpha_bar("linear", 100)
    np.testing.assert_allclose(s.snr.numpy(), ab / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(s.sigma.numpy(), np.sqrt((1 - ab) / ab), rtol=1e-10)
    a, b = s.scales("cpu")
    assert a.dtype == b.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), np.sqrt(ab), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), np.sqrt(1 - ab), rtol=1e-6)


@pytest.mark.parametrize("fn,match", [
    (lambda: speed.make_schedule("sigmoid", 1000), "kind.*'linear', 'cosine', 'quadratic'"),
    (lambda: speed.make_schedule("cosine", 1), r"\bT\b"),
    (lambda: speed.make_schedule("linear", 0), r"\bT\b"),
    (lambda: speed.make_schedule("linear", 1000.0), r"\bT\b"),
    (lambda: speed.make_schedule("linear", 10), r"\bT\b"),          # largest beta 20/T >= 1
    (lambda: speed.Schedule.from_betas([0.0, 0.1]), "betas"),
    (lambda: speed.Schedule.from_betas([0.5, 1.0]), "betas"),
    (lambda: speed.Schedule.from_betas([float("nan"), 0.1]), "betas"),
    (lambda: speed.Schedule.from_betas([[0.1, 0.2], [0.1, 0.2]]), "betas"),
    (lambda: speed.Schedule.from_betas([0.1]), "betas"),
])
def test_schedule_rejects_bad_arguments(fn, match):
    raises(fn, match)


# ================================================================================================
# 2. Process increments
# ================================================================================================

@pytest.mark.parametrize("kind", speed.SCHEDULES)
def test_increment_stats_closed_form_and_general_process(kind):
    """SpeeD Sec. 3.1: mean (sqrt(alpha_{t+1}) - 1) sqrt(abar_t), var (1 - sqrt(alpha_{t+1}))^2 (1 - abar_t)
    + beta_{t+1}; equal to the general process x_t = s_t (x0 + sigma_t eps) with s_t = sqrt(abar_t),
    sigma_t^2 = (1 - abar_t)/abar_t: mean s_{t+1} - s_t, var (s_{t+1} - s_t)^2 sigma_t^2 +
    s_{t+1}^2 (sigma_{t+1}^2 - sigma_t^2)."""
    T = 200
    mean_coef, var = speed.increment_stats(speed.make_schedule(kind, T))
    assert mean_coef.shape == var.shape == (T - 1,) and mean_coef.dtype == var.dtype == torch.float64
    ab = np_alpha_bar(kind, T)
    s_, sig2 = np.sqrt(ab), (1 - ab) / ab
    np.testing.assert_allclose(mean_coef.numpy(), s_[1:] - s_[:-1], rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(var.numpy(), (s_[1:] - s_[:-1]) ** 2 * sig2[:-1] + s_[1:] ** 2 * (sig2[1:] - sig2[:-1]),
                               rtol=1e-8)


def test_increment_stats_monte_carlo_on_images_agrees():
    """increment_stats_mc on 16 structured 3x16x16 images (N = 12288 pixels), linear T = 100. Per t the
    residual is iid Gaussian over pixels: variance s.e. sqrt(2/N) = 1.3%, slope s.e.
    sqrt(var / sum x0^2); 5 s.e. per step for 99 steps."""
    sch = speed.make_schedule("linear", 100)
    x0 = structured_images(16, 3, 16, seed=1)
    mean_cf, var_cf = speed.increment_stats(sch)
    mean_mc, var_mc = speed.increment_stats_mc(sch, x0, generator=gen(2))
    assert mean_mc.shape == mean_cf.shape and var_mc.shape == var_cf.shape
    assert bool(((mean_mc - mean_cf).abs() < 5 * var_cf.sqrt() / x0.pow(2).sum().sqrt()).all())
    rel = (var_mc / var_cf - 1).abs()
    assert rel.max().item() < 5 * math.sqrt(2 / x0.numel())
    assert rel.mean().item() < 2 * math.sqrt(2 / x0.numel())


@pytest.mark.parametrize("t", [0, 219, 998])
def test_increment_stats_vs_direct_simulation(t):
    """x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) e, x_{t+1} = sqrt(alpha_{t+1}) x_t + sqrt(beta_{t+1}) z, 200k
    draws for a fixed x0: mean and variance of x_{t+1} - x_t within 5 standard errors."""
    mean_coef, var = speed.increment_stats(speed.make_schedule("linear", 1000))
    b = np_betas("linear", 1000)
    ab = np.cumprod(1 - b)
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64)
    M, g = 200_000, gen(10 + t)
    xt = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * torch.randn(M, 4, generator=g, dtype=torch.float64)
    d = math.sqrt(1 - b[t + 1]) * xt + math.sqrt(b[t + 1]) * torch.randn(M, 4, generator=g, dtype=torch.float64) - xt
    v = var[t].item()
    assert torch.all((d.mean(0) - mean_coef[t] * x0).abs() < 5 * math.sqrt(v / M))
    assert torch.all((d.var(0) / v - 1).abs() < 5 * math.sqrt(2 / M))


@pytest.mark.parametrize("x0", [torch.zeros(2, 3).long(), torch.zeros(5)])
def test_increment_stats_mc_rejects_bad_x0(x0):
    raises(lambda: speed.increment_stats_mc(speed.make_schedule("linear", 50), x0), "x0")


# ================================================================================================
# 3. Areas
# ================================================================================================

def test_areas_linear_and_cosine_known_values():
    """Linear T = 1000: t_peak = 219, tau = 698 (the paper: ~700); cosine: tau ~ 979."""
    a = speed.find_areas(speed.make_schedule("linear", 1000))
    assert (a.t_peak, a.tau, a.T) == (219, 698, 1000)
    c = speed.find_areas(speed.make_schedule("cosine", 1000))
    assert 970 <= c.tau <= 985 and c.t_peak < c.tau


@pytest.mark.parametrize("kind", speed.SCHEDULES)
@pytest.mark.parametrize("T,threshold", [(1000, 0.1), (4000, 0.1), (1000, 0.3)])
def test_areas_match_independent_numpy(kind, T, threshold):
    a = speed.find_areas(speed.make_schedule(kind, T), threshold=threshold)
    t_peak, tau, g = np_areas(kind, T, threshold)
    assert (a.t_peak, a.tau) == (t_peak, tau)
    np.testing.assert_allclose(a.rate.numpy(), g, rtol=1e-9, atol=1e-18)
    np.testing.assert_allclose(speed.change_rate(speed.make_schedule(kind, T)).numpy(), g, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("kind", speed.SCHEDULES)
def test_area_boundaries_do_not_depend_on_T(kind):
    """The threshold is per unit of normalised time t/T: t_peak/T and tau/T agree at T = 1000, 4000."""
    a1 = speed.find_areas(speed.make_schedule(kind, 1000))
    a4 = speed.find_areas(speed.make_schedule(kind, 4000))
    assert abs(a1.t_peak / 1000 - a4.t_peak / 4000) < 1 / 250
    assert abs(a1.tau / 1000 - a4.tau / 4000) < 1 / 250


def test_area_labels_names_and_fractions():
    a = speed.find_areas(speed.make_schedule("linear", 1000))
    assert a.label(torch.arange(1000)).tolist() == [0] * 219 + [1] * (698 - 219) + [2] * (1000 - 698)
    assert int(a.label(218)) == 0 and int(a.label(219)) == 1 and int(a.label(697)) == 1 and int(a.label(698)) == 2
    assert (a.name(0), a.name(219), a.name(999)) == speed.AREA_NAMES
    assert a.fractions() == pytest.approx(dict(acceleration=0.219, deceleration=0.479, convergence=0.302), abs=1e-12)


def test_find_areas_rejects_bad_threshold():
    for bad in (0, -0.1, float("nan"), "0.1"):
        raises(lambda: speed.find_areas(speed.make_schedule("linear", 100), threshold=bad), "threshold")


# ================================================================================================
# 4. Asymmetric sampling
# ================================================================================================

@pytest.mark.parametrize("T,tau,k", [(1000, 698, 5), (1000, 700, 2), (1000, 1, 3.5), (1000, 999, 10), (50, 20, 5),
                                     (1000, 700, 1)])
def test_speed_probs_formula(T, tau, k):
    """SpeeD eq. 6; k = 1 is uniform."""
    p = speed.speed_probs(T, tau, k)
    assert p.shape == (T,) and p.dtype == torch.float64
    np.testing.assert_allclose(p.numpy(), np_speed_probs(T, tau, k), rtol=1e-13)


def test_dual_step_known_value_and_T_invariance():
    """The official code's dual-sampling m = 1 + first t with d sqrt(1-abar)/d(t/T) < 0.1: 642 for linear
    T = 1000, and m/T the same at T = 4000."""
    ab = np_alpha_bar("linear", 1000)
    m = 1 + int(np.argmax(np.gradient(np.sqrt(1 - ab)) * 1000 < 0.1))
    assert speed.dual_step(speed.make_schedule("linear", 1000)) == m == 642
    assert abs(speed.dual_step(speed.make_schedule("linear", 4000)) / 4000 - 0.642) < 1 / 250


@pytest.mark.parametrize("fn,match", [
    (lambda: speed.speed_probs(1000, 700, k=0.5), r"\bk\b"),
    (lambda: speed.speed_probs(1000, 700, k=float("inf")), r"\bk\b"),
    (lambda: speed.speed_probs(1000, 0), "tau"),
    (lambda: speed.speed_probs(1000, 1000), "tau"),
    (lambda: speed.speed_probs(1000, 700.5), "tau"),
    (lambda: speed.speed_probs(1, 1), r"\bT\b"),
])
def test_speed_probs_rejects_bad_arguments(fn, match):
    raises(fn, match)


# ================================================================================================
# 5. Change-aware weighting
# ================================================================================================

@pytest.mark.parametrize("kind", speed.SCHEDULES)
@pytest.mark.parametrize("lam", [0.5, 0.6, 1.0])
def test_speed_weights_formula(kind, lam):
    """Below tau g rescaled into [1 - lam, lam] with min and max over t < tau (both attained, the max at
    t_peak); 1 from tau on."""
    T = 1000
    sch = speed.make_schedule(kind, T)
    t_peak, tau, _ = np_areas(kind, T)
    w = speed.speed_weights(sch, tau, lam)
    assert w.shape == (T,) and w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), np_speed_weights(kind, T, tau, lam), rtol=1e-9, atol=1e-12)
    assert w[:tau].min().item() == pytest.approx(1 - lam, abs=1e-12)
    assert w[:tau].max().item() == pytest.approx(lam, abs=1e-12)
    assert int(w[:tau].argmax()) == t_peak or lam == 0.5
    assert bool((w[tau:] == 1).all())


@pytest.mark.parametrize("fn,match", [
    (lambda: speed.speed_weights(speed.make_schedule("linear", 1000), 700, lam=0.49), "lam"),
    (lambda: speed.speed_weights(speed.make_schedule("linear", 1000), 700, lam=2), "lam"),
    (lambda: speed.speed_weights(speed.make_schedule("linear", 1000), 0), "tau"),
])
def test_speed_weights_reject_bad_arguments(fn, match):
    raises(fn, match)


# ================================================================================================
# 6. Strategies
# ================================================================================================

N_DRAWS = 1_000_000
LIN = speed.make_schedule("linear", 1000)

STRATEGY_CASES = {  # id: (name, options)
    "uniform": ("uniform", {}), "speed": ("speed", {}), "speed_k2_tau500": ("speed", {"k": 2, "tau": 500}),
    "p2": ("p2", {}), "min_snr": ("min_snr", {}), "lognormal": ("lognormal", {}),
    "logitnormal": ("logitnormal", {}), "logitnormal_shifted": ("logitnormal", {"mean": 0.5, "std": 0.8}),
    "speedit": ("speedit", {}), "loss_aware": ("loss_aware", {}),
}


def warm_loss_aware(T=1000, history=10, seed=0):
    """A loss-aware strategy whose every t has `history` losses (non-uniform), and those losses per t."""
    s = speed.make_strategy("loss_aware", speed.make_schedule("linear", T), history=history)
    t = torch.arange(T).repeat(history)
    losses = (1.0 + 9.0 * (t < T // 3)) * (0.5 + torch.rand(len(t), generator=gen(seed), dtype=torch.float64))
    s.update(t, losses)
    per_t = [losses[t == i].numpy() for i in range(T)]
    return s, per_t


@pytest.mark.parametrize("case", list(STRATEGY_CASES) + ["loss_aware_warm"])
def test_sampler_frequencies_chi_square(case):
    """1e6 draws against P(t) from the papers' definitions (not the implementation's probs): Pearson's
    chi-square over bins pooled to >= 20 expected draws, threshold at the normal quantile 5 (false alarm
    ~3e-7). The returned weights are w(t) of the drawn steps; .probs is P(t)."""
    if case == "loss_aware_warm":
        s, per_t = warm_loss_aware()
        p = np_loss_aware_probs(per_t, 1000, 1e-3)
    else:
        name, opts = STRATEGY_CASES[case]
        s, p = speed.make_strategy(name, LIN, **opts), ref_probs(name, **opts)
    np.testing.assert_allclose(s.probs.numpy(), p, rtol=1e-9, atol=1e-15)
    t, w = s.sample(N_DRAWS, generator=gen(123))
    assert t.dtype == torch.int64 and t.shape == w.shape == (N_DRAWS,) and w.dtype == torch.float32
    assert 0 <= int(t.min()) and int(t.max()) <= 999
    stat, df = chi2_stat(t.numpy(), p, 1000)
    assert stat < chi2_threshold(df), (stat, df)
    w_ref = 1 / (1000 * p) if case.startswith("loss_aware") else ref_weights(name, **opts)
    np.testing.assert_allclose(w.numpy(), w_ref[t.numpy()], rtol=1e-6)
    assert torch.equal(t, s.sample(N_DRAWS, generator=gen(123))[0])


@pytest.mark.parametrize("case", [c for c in STRATEGY_CASES if not c.startswith("logitnormal")])
def test_frequency_test_has_power_against_off_by_one_samplers(case):
    """The chi-square test above detects a sampler shifted by one step (t -> min(t + 1, T - 1)) and, for
    SpeeD's sampling, step tau given the probability of the steps below it: the expected statistic
    under each alternative lies > 5 standard deviations above the threshold (miss < 3e-7). The smooth
    logit-normal density barely changes under a shift (margin < 0); the shared sampler code is caught
    through the other strategies."""
    name, opts = STRATEGY_CASES[case]
    p = ref_probs(name, **opts)
    alternatives = {"shift": shifted_by_one(p)}
    if name in ("speed", "speedit"):
        tau, k = opts.get("tau", 698), opts.get("k", 5)
        q = np.where(np.arange(1000) <= tau, k, 1.0)
        alternatives["tau gets k"] = q / q.sum()
    for what, q in alternatives.items():
        assert chi2_power_margin(p, q, N_DRAWS) > 5, what


def test_speed_dual_sampling():
    """Dual sampling (official code): n//2 + 1 draws from P, then |t - m| of each, truncated to n. The
    first part follows P (chi-square), the rest is exactly the mirror; .probs is the marginal
    (P + mirror(P)) / 2 of a large even batch."""
    s = speed.make_strategy("speed", LIN, dual=True)
    assert s.dual_m == 642
    p = ref_probs("speed")
    np.testing.assert_allclose(s.probs.numpy(), (p + np_mirror(p, 642)) / 2, rtol=1e-12, atol=1e-16)
    t, w = s.sample(N_DRAWS, generator=gen(5))
    half = N_DRAWS // 2 + 1
    stat, df = chi2_stat(t[:half].numpy(), p, 1000)
    assert stat < chi2_threshold(df)
    assert torch.equal(t[half:], (t[:N_DRAWS - half] - 642).abs())
    np.testing.assert_allclose(w.numpy(), ref_weights("speed")[t.numpy()], rtol=1e-6)
    for n in (1, 2, 7):
        assert s.sample(n, generator=gen(0))[0].shape == (n,)


def test_lognormal_and_logitnormal_probs_match_direct_simulation():
    """The continuous definitions simulated directly: EDM ln sigma ~ N(-1.2, 1.2^2) moved to the nearest
    step in ln sigma; SD3 t = round(sigmoid(u) (T - 1)), u ~ N(0, 1). Chi-square against .probs."""
    T = 1000
    ab = np_alpha_bar("linear", T)
    ls = 0.5 * np.log((1 - ab) / ab)
    x = (-1.2 + 1.2 * torch.randn(N_DRAWS, generator=gen(7), dtype=torch.float64)).numpy()
    j = np.clip(np.searchsorted(ls, x), 1, T - 1)
    nearest = np.where(np.abs(x - ls[j - 1]) <= np.abs(ls[j] - x), j - 1, j)
    stat, df = chi2_stat(nearest, speed.make_strategy("lognormal", LIN).probs.numpy(), T)
    assert stat < chi2_threshold(df)
    u = torch.randn(N_DRAWS, generator=gen(8), dtype=torch.float64).numpy()
    t = np.round(1 / (1 + np.exp(-u)) * (T - 1)).astype(np.int64)
    p = speed.make_strategy("logitnormal", LIN).probs.numpy()
    stat, df = chi2_stat(t, p, T)
    assert stat < chi2_threshold(df)
    np.testing.assert_allclose(p, p[::-1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("target", speed.TARGETS)
@pytest.mark.parametrize("name,opts", [("uniform", {}), ("speed", {}), ("speed", {"tau": 60, "lam": 0.8}),
                                       ("speed", {"lam": None}), ("min_snr", {}), ("min_snr", {"gamma": 1.0}),
                                       ("p2", {}), ("p2", {"gamma": 0.5}), ("p2", {"k": 2.0, "gamma": 0.5}),
                                       ("speedit", {}), ("speedit", {"p2_k": 2.0, "p2_gamma": 0.5}),
                                       ("lognormal", {}), ("logitnormal", {})])
def test_strategy_weights_per_target(name, opts, target):
    """weights(target) and weight_of(t, target) against the papers' formulas (see ref_weights)."""
    s = speed.make_strategy(name, LIN, **opts)
    expected = ref_weights(name, target, **opts)
    w = s.weights(target)
    assert w.shape == (1000,) and w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-9)
    t = torch.tensor([0, 1, 218, 219, 697, 698, 699, 999])
    np.testing.assert_allclose(s.weight_of(t, target).numpy(), expected[t.numpy()], rtol=1e-6)


def test_min_snr_weight_is_one_where_snr_below_gamma():
    """Min-SNR-5 eps weight: exactly 1 where SNR <= 5, gamma/SNR < 1 where SNR > 5 (low noise)."""
    snr = LIN.snr
    w = speed.make_strategy("min_snr", LIN).weights("eps")
    assert bool((w[snr <= 5] == 1).all()) and bool((w[snr > 5] < 1).all()) and int((snr > 5).sum()) > 0


def test_speedit_is_speed_sampling_with_p2_weights():
    """speedit: SpeeD's k:1 asymmetric sampling (tau from the areas) with P2 weighting 1/(1 + SNR)."""
    s = speed.make_strategy("speedit", LIN)
    assert s.config == dict(name="speedit", k=5, tau=698, threshold=0.1, p2_k=1.0, p2_gamma=1.0)
    np.testing.assert_allclose(s.probs.numpy(), np_speed_probs(1000, 698, 5), rtol=1e-12)
    np.testing.assert_allclose(s.weights("eps").numpy(), 1 / (1 + np_snr("linear", 1000)), rtol=1e-9)
    s3 = speed.make_strategy("speedit", LIN, k=3, threshold=0.3)
    tau = np_areas("linear", 1000, 0.3)[1]
    assert s3.config["tau"] == tau
    np.testing.assert_allclose(s3.probs.numpy(), np_speed_probs(1000, tau, 3), rtol=1e-12)


# ---- loss-aware importance sampling -------------------------------------------------------------

def test_loss_aware_uniform_until_every_t_has_history():
    T = 30
    s = speed.make_strategy("loss_aware", speed.make_schedule("linear", T), history=3)
    np.testing.assert_allclose(s.probs.numpy(), np.full(T, 1 / T), rtol=1e-12)
    t = torch.arange(T - 1).repeat(3)
    s.update(t, (t.double() + 1) ** 2)                     # every t but the last: still uniform
    np.testing.assert_allclose(s.probs.numpy(), np.full(T, 1 / T), rtol=1e-12)
    assert torch.equal(s.sample(100, generator=gen(0))[1], torch.ones(100))
    s.update(torch.tensor([T - 1, T - 1]), torch.tensor([1.0, 1.0]))
    np.testing.assert_allclose(s.probs.numpy(), np.full(T, 1 / T), rtol=1e-12)
    s.update(torch.tensor([T - 1]), torch.tensor([1.0]))  # the last one's third loss: non-uniform
    per_t = [np.array([(i + 1.0) ** 2] * 3) for i in range(T - 1)] + [np.ones(3)]
    np.testing.assert_allclose(s.probs.numpy(), np_loss_aware_probs(per_t, T, 1e-3), rtol=1e-9)


def test_loss_aware_ring_buffer_keeps_the_last_history_losses():
    """Older losses are forgotten; a batch holding one t several times fills several slots."""
    T, H, mix = 30, 3, 1e-3
    s = speed.make_strategy("loss_aware", speed.make_schedule("linear", T), history=H, uniform_mix=mix)
    for _ in range(H):
        s.update(torch.arange(T), torch.full((T,), 100.0))   # overwritten by the next H rounds
    L = (torch.where(torch.arange(T) < 10, 5.0, 0.5) * (1 + torch.arange(T) / T)).float()
    for r in range(H):
        order = torch.randperm(T, generator=gen(3 + r))
        s.update(order, L[order])
    per_t = [np.full(H, L[i].item()) for i in range(T)]
    np.testing.assert_allclose(s.probs.numpy(), np_loss_aware_probs(per_t, T, mix), rtol=1e-9)
    s.update(torch.tensor([0, 0]), torch.tensor([50.0, 60.0]))  # replaces t = 0's two oldest slots
    per_t[0] = np.array([L[0].item(), 50.0, 60.0])
    np.testing.assert_allclose(s.probs.numpy(), np_loss_aware_probs(per_t, T, mix), rtol=1e-9)


def test_loss_aware_reweighting_is_unbiased():
    """w = 1/(T P(t)): E_{t~P}[w(t) L(t)] = mean_t L(t). Monte-Carlo with 200k draws, 5 s.e."""
    s, per_t = warm_loss_aware(seed=4)
    p = np_loss_aware_probs(per_t, 1000, 1e-3)
    assert p.max() > 3 * p.min()   # really non-uniform
    L = 1 + torch.rand(1000, generator=gen(9), dtype=torch.float64) * 10
    t, w = s.sample(200_000, generator=gen(10))
    np.testing.assert_allclose(w.numpy(), 1 / (1000 * p[t.numpy()]), rtol=1e-6)
    vals = w.double() * L[t]
    assert abs(vals.mean().item() - L.mean().item()) < 5 * vals.std().item() / math.sqrt(len(vals))
    for target in speed.TARGETS:
        np.testing.assert_allclose(s.weights(target).numpy(), 1 / (1000 * p), rtol=1e-9)


def test_loss_aware_state_dict_roundtrip():
    s, _ = warm_loss_aware(T=1000)
    s2 = speed.make_strategy("loss_aware", LIN)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s.probs, s2.probs) and s2.probs.max() > 2 * s2.probs.min()


# ---- objective shares per area --------------------------------------------------------------------

@pytest.mark.parametrize("name,opts", [("uniform", {}), ("speed", {}), ("speed", {"dual": True}),
                                       ("speed", {"k": 3, "lam": None}), ("p2", {}), ("min_snr", {}),
                                       ("lognormal", {}), ("logitnormal", {}), ("speedit", {})])
def test_area_shares_closed_form(name, opts):
    """Each area's share of sum_t P(t) w(t), from the independent P and w."""
    areas = speed.find_areas(LIN)
    shares = speed.make_strategy(name, LIN, **opts).area_shares(areas)
    pw = ref_probs(name, **opts) * ref_weights(name, **opts)
    expected = [pw[:219].sum(), pw[219:698].sum(), pw[698:].sum()] / pw.sum()
    assert list(shares) == list(speed.AREA_NAMES)
    np.testing.assert_allclose(list(shares.values()), expected, rtol=1e-9, atol=1e-15)


def test_area_shares_order_and_mismatch():
    """P2 and Min-SNR, which down-weight low-noise steps, give convergence more than uniform; SpeeD less."""
    areas = speed.find_areas(LIN)
    conv = {n: speed.make_strategy(n, LIN).area_shares(areas)["convergence"]
            for n in ("p2", "min_snr", "uniform", "speed")}
    assert conv["p2"] > conv["min_snr"] > conv["uniform"] > conv["speed"]
    other = speed.find_areas(speed.make_schedule("linear", 100))
    raises(lambda: speed.make_strategy("uniform", LIN).area_shares(other), "areas")


# ---- builders, make_strategy and .config ----------------------------------------------------------

PUBLISHED_DEFAULTS = {
    "uniform": {},
    "speed": dict(k=5, tau=698, lam=0.6, dual=False, threshold=0.1),   # SpeeD: k = 5, lam = 0.6, tau ~ 700
    "p2": dict(k=1.0, gamma=1.0),                                      # Choi et al. 2022
    "min_snr": dict(gamma=5.0),                                        # Hang et al. 2023
    "lognormal": dict(p_mean=-1.2, p_std=1.2),                         # EDM
    "logitnormal": dict(mean=0.0, std=1.0),                            # SD3
    "loss_aware": dict(history=10, uniform_mix=1e-3),                  # improved DDPM
    "speedit": dict(k=5, tau=698, threshold=0.1, p2_k=1.0, p2_gamma=1.0),
}


@pytest.mark.parametrize("name", speed.STRATEGIES)
def test_make_strategy_defaults_and_config(name):
    """make_strategy(name) = the builder with its (published) defaults; .config names the strategy and
    every option, resolved (tau), and survives JSON."""
    assert set(speed.STRATEGIES) == set(PUBLISHED_DEFAULTS)
    s = speed.make_strategy(name, LIN)
    assert s.config == dict(name=name, **PUBLISHED_DEFAULTS[name]) and s.name == name
    assert json.loads(json.dumps(s.config)) == s.config
    b = getattr(speed, f"{name}_strategy")(LIN)
    assert b.config == s.config and torch.equal(b.probs, s.probs) and torch.equal(b.weights(), s.weights())


def test_make_strategy_passes_options_to_the_builder():
    s = speed.make_strategy("speed", LIN, k=2, tau=500, lam=None, dual=True)
    assert s.config == dict(name="speed", k=2, tau=500, lam=None, dual=True, threshold=0.1)
    np.testing.assert_allclose(s.probs.numpy(), ref_probs("speed", k=2, tau=500, dual=True), rtol=1e-12, atol=1e-16)
    assert speed.make_strategy("speed", LIN, threshold=0.3).config["tau"] == np_areas("linear", 1000, 0.3)[1]
    assert speed.make_strategy("min_snr", LIN, gamma=1.0).config == dict(name="min_snr", gamma=1.0)


@pytest.mark.parametrize("fn,match", [
    (lambda: speed.make_strategy("edm", LIN), "name.*" + ", ".join(repr(n) for n in speed.STRATEGIES)),
    (lambda: speed.make_strategy("uniform", LIN, k=2), r"unknown option.*'k'.*uniform"),
    (lambda: speed.make_strategy("speed", LIN, eps=0.1), r"unknown option.*'eps'.*valid.*'threshold'"),
    (lambda: speed.make_strategy("speed", "linear"), "schedule"),
    (lambda: speed.make_strategy("speed", LIN, k=0), r"\bk\b"),
    (lambda: speed.make_strategy("speed", LIN, k=float("inf")), r"\bk\b"),
    (lambda: speed.make_strategy("speedit", LIN, k=float("inf")), r"\bk\b"),
    (lambda: speed.make_strategy("speed", LIN, lam=2), "lam"),
    (lambda: speed.make_strategy("speed", LIN, lam=5), "lam"),         # the official code's class default
    (lambda: speed.make_strategy("speed", LIN, dual="no"), "dual"),
    (lambda: speed.make_strategy("speed", LIN, dual=1), "dual"),
    (lambda: speed.make_strategy("speed", LIN, tau=1000), "tau"),
    (lambda: speed.make_strategy("p2", LIN, k=0.0), r"\bk\b"),
    (lambda: speed.make_strategy("p2", LIN, gamma=-1.0), "gamma"),
    (lambda: speed.make_strategy("speedit", LIN, p2_k=0.0), r"\bk\b"),
    (lambda: speed.make_strategy("min_snr", LIN, gamma=0), "gamma"),
    (lambda: speed.make_strategy("lognormal", LIN, p_std=0), "p_std"),
    (lambda: speed.make_strategy("logitnormal", LIN, std=-1), "std"),
    (lambda: speed.make_strategy("loss_aware", LIN, history=0), "history"),
    (lambda: speed.make_strategy("loss_aware", LIN, uniform_mix=0), "uniform_mix"),
])
def test_make_strategy_rejects_bad_options(fn, match):
    raises(fn, match)


@pytest.mark.parametrize("name", ["speed", "speedit"])
def test_threshold_is_validated_when_tau_is_given(name):
    raises(lambda: speed.make_strategy(name, LIN, tau=500, threshold=-1), "threshold")


@pytest.mark.parametrize("name", speed.STRATEGIES)
def test_every_strategy_validates_target_and_n(name):
    s = speed.make_strategy(name, speed.make_schedule("linear", 50))
    for fn in (lambda: s.sample(4, target="score"), lambda: s.weights("score"),
               lambda: s.weight_of(torch.tensor([1, 2]), target="score")):
        raises(fn, "target.*'eps', 'x0', 'v'")
    for n in (0, -3, 2.0):
        raises(lambda: s.sample(n), r"\bn\b")


# ================================================================================================
# 7. Loss
# ================================================================================================

class ScaleModel(nn.Module):
    """out = a * x with a learnable scalar a."""

    def __init__(self, a=0.7):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, t):
        return self.a * x


def hand_loss(t, w, x0, noise, target, T=100, a=0.7):
    """(loss, dloss/da, per-sample mse) of out = a x_t in float64 (SpeeD eq. 8; v = sqrt(abar) eps -
    sqrt(1 - abar) x0, Salimans & Ho 2022)."""
    ab = torch.from_numpy(np_alpha_bar("linear", T))[t].view(-1, 1, 1, 1)
    X0, E, w = x0.double(), noise.double(), torch.as_tensor(w, dtype=torch.float64)
    xt = ab.sqrt() * X0 + (1 - ab).sqrt() * E
    goal = {"eps": E, "x0": X0, "v": ab.sqrt() * E - (1 - ab).sqrt() * X0}[target]
    err = a * xt - goal
    mse = (err ** 2).flatten(1).mean(1)
    return (w * mse).mean().item(), (w * (2 * err * xt).flatten(1).mean(1)).mean().item(), mse


@pytest.mark.parametrize("target", speed.TARGETS)
@pytest.mark.parametrize("name,opts", [("speed", {"tau": 60, "k": 3, "lam": 0.8}), ("min_snr", {}), ("p2", {}),
                                       ("speedit", {"tau": 60})])
def test_diffusion_loss_equals_hand_computation(target, name, opts):
    """Given t (and no w), w = the strategy's weights at t; loss and gradient computed by hand."""
    T = 100
    sch = speed.make_schedule("linear", T)
    g = gen(0)
    x0, noise = torch.rand(5, 2, 3, 3, generator=g) * 2 - 1, torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 13, 59, 60, 99])
    w = ref_weights(name, target, T=T, **opts)[t.numpy()]
    assert w.max() > 1.2 * w.min()   # really non-uniform
    model = ScaleModel(0.7)
    loss, info = speed.diffusion_loss(model, x0, sch, speed.make_strategy(name, sch, **opts), t=t, noise=noise,
                                      target=target)
    loss.backward()
    want, grad, mse = hand_loss(t, w, x0, noise, target)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert model.a.grad.item() == pytest.approx(grad, rel=1e-4, abs=1e-7)
    assert torch.equal(info["t"], t) and not info["mse"].requires_grad
    np.testing.assert_allclose(info["mse"].numpy(), mse.numpy(), rtol=1e-5)
    np.testing.assert_allclose(info["w"].numpy(), w, rtol=1e-6)


def test_diffusion_loss_uses_t_and_w_as_given():
    """Given t and w, they are used as given (the strategy's weights are ignored); t without w and
    without a strategy: w = 1."""
    sch = speed.make_schedule("linear", 100)
    g = gen(1)
    x0, noise = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1, torch.randn(4, 1, 2, 2, generator=g)
    t, w = torch.tensor([3, 50, 70, 99]), torch.tensor([0.5, 2.0, 0.0, 3.0])
    loss, info = speed.diffusion_loss(ScaleModel(), x0, sch, speed.make_strategy("p2", sch), t=t, w=w, noise=noise)
    assert loss.item() == pytest.approx(hand_loss(t, w, x0, noise, "eps")[0], rel=1e-5)
    assert torch.equal(info["w"], w)
    loss1, info1 = speed.diffusion_loss(ScaleModel(), x0, sch, t=t, noise=noise)
    assert loss1.item() == pytest.approx(hand_loss(t, np.ones(4), x0, noise, "eps")[0], rel=1e-5)


def test_diffusion_loss_draws_t_and_noise_from_the_generator():
    """Without t the steps come from the strategy: seeded, and w = the strategy's weights at them;
    gradients reach every parameter; model kwargs are passed through."""
    sch = speed.make_schedule("linear", 100)
    strat = speed.make_strategy("speed", sch, tau=60, lam=0.7)
    conv = nn.Conv2d(3, 3, 1)
    seen = {}

    def model(x, t, y=None):
        seen["y"] = y
        return conv(x)

    x0 = structured_images(8, 3, 8, seed=3).float()
    loss, info = speed.diffusion_loss(model, x0, sch, strat, generator=gen(11), y=torch.arange(8))
    loss.backward()
    assert loss.ndim == 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())
    assert torch.equal(seen["y"], torch.arange(8))
    loss2, info2 = speed.diffusion_loss(model, x0, sch, strat, generator=gen(11), y=torch.arange(8))
    assert torch.equal(info["t"], info2["t"]) and loss.item() == loss2.item()
    np.testing.assert_allclose(info["w"].numpy(), ref_weights("speed", T=100, tau=60, lam=0.7)[info["t"].numpy()],
                               rtol=1e-6)


_S50, _X = speed.make_schedule("linear", 50), torch.zeros(2, 1, 4, 4)
_UNI50 = speed.make_strategy("uniform", _S50)


@pytest.mark.parametrize("fn,match", [
    (lambda: speed.diffusion_loss(ScaleModel(), _X, _S50, _UNI50, t=torch.tensor([0, 50])), r"\bt\b.*\[0, 49\]"),
    (lambda: speed.diffusion_loss(ScaleModel(), _X, _S50, _UNI50, t=torch.tensor([-1, 0])), r"\bt\b"),
    (lambda: speed.diffusion_loss(ScaleModel(), _X, _S50, _UNI50, t=torch.tensor([1.0, 2.0])), r"\bt\b.*integer"),
    (lambda: speed.diffusion_loss(ScaleModel(), _X, _S50, _UNI50, t=torch.tensor([1, 2, 3])), r"\bt\b"),
    (lambda: speed.diffusion_loss(ScaleModel(), _X, _S50), "strategy"),
    (lambda: speed.diffusion_loss(ScaleModel(), _X, _S50, _UNI50, target="score"), "target"),
    (lambda: speed.diffusion_loss(ScaleModel(), _X.long(), _S50, _UNI50), "x0"),
    (lambda: speed.diffusion_loss(ScaleModel(), torch.zeros(16), _S50, _UNI50), "x0"),
    (lambda: speed.diffusion_loss(ScaleModel(), _X, LIN, _UNI50), "strategy.*T"),
])
def test_diffusion_loss_rejects_bad_arguments(fn, match):
    raises(fn, match)


# ================================================================================================
# 8. UNet
# ================================================================================================

@pytest.mark.parametrize("size,params", [("tiny", 2.4e6), ("small", 9.6e6), ("ddpm", 35.7e6)])
def test_named_unet_sizes(size, params):
    """Parameter counts as documented (ddpm: DDPM's 35.7M CIFAR-10 network); output shaped like the
    input and exactly 0 at init (zero-initialised output layers)."""
    torch.manual_seed(0)
    m = speed.make_unet(size).eval()
    assert abs(sum(p.numel() for p in m.parameters()) - params) <= 0.05e6
    if size != "tiny":
        return
    x = torch.randn(1, 3, 32, 32, generator=gen(0))
    with torch.no_grad():
        y = m(x, torch.tensor([10]))
    assert y.shape == x.shape and y.dtype == torch.float32 and bool((y == 0).all())


def test_unet_config_and_overrides():
    m = speed.make_unet("tiny", img_res=16, img_channels=1, num_classes=4, dropout=0.0)
    assert (m.config["img_res"], m.config["img_channels"], m.config["num_classes"], m.config["ch"]) == (16, 1, 4, 32)
    assert json.loads(json.dumps(m.config)) == m.config
    assert sum(p.numel() for p in speed.UNet(**m.config).parameters()) == sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        assert m(torch.zeros(2, 1, 16, 16), torch.tensor([0, 5]), y=torch.tensor([0, 3])).shape == (2, 1, 16, 16)
    raises(lambda: speed.make_unet("huge"), "size.*'tiny', 'small', 'ddpm'")


@pytest.mark.parametrize("scale_shift,heads", [(True, 1), (True, 2), (False, 1)])
def test_unet_time_conditioning_and_independent_samples(scale_shift, heads):
    """Different t give different outputs, the same t the same; each sample of a batch is processed
    independently. Both conditioning styles: scale-shift (improved DDPM) and DDPM's additive one."""
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet(scale_shift=scale_shift, heads=heads)).eval()
    x = torch.randn(3, 3, 8, 8, generator=gen(1))
    with torch.no_grad():
        y0, y1 = m(x, torch.tensor([0, 0, 0])), m(x, torch.tensor([50, 50, 50]))
        parts = torch.cat([m(x[i:i + 1], torch.tensor([7 * i])) for i in range(3)])
        whole = m(x, torch.tensor([0, 7, 14]))
    assert y0.abs().max() > 0 and (y0 - y1).abs().max() > 1e-3 * y0.abs().max()
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-5)


def test_unet_class_conditioning():
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet(num_classes=5)).eval()
    x, t = torch.randn(2, 3, 8, 8, generator=gen(2)), torch.tensor([20, 20])
    with torch.no_grad():
        a, b = m(x, t, y=torch.tensor([0, 0])), m(x, t, y=torch.tensor([3, 3]))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    raises(lambda: m(x, t), r"\by\b")


# ================================================================================================
# 9. Training
# ================================================================================================

class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        self.b = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("count", torch.tensor([0.0]))


def test_ema_update_hand_computation():
    """ema <- decay ema + (1 - decay) model for parameters (decay a float or a 0-d tensor); buffers copied."""
    ema, model = Lin(), Lin()
    e_w, e_b = np.array([1.0, -2.0, 3.0]), 0.5
    for k, decay in enumerate([0.1, torch.tensor(2 / 11), 0.9, 0.0]):
        with torch.no_grad():
            model.w.copy_(torch.tensor([k + 1.0, 2.0 * k, -k]))
            model.b.fill_(3.0 * k)
            model.count.fill_(k)
        speed.ema_update(ema, model, decay)
        d = float(decay)
        e_w, e_b = d * e_w + (1 - d) * np.array([k + 1.0, 2.0 * k, -k]), d * e_b + (1 - d) * 3.0 * k
        np.testing.assert_allclose(ema.w.detach().numpy(), e_w, rtol=1e-6)
        assert ema.b.item() == pytest.approx(e_b, rel=1e-6) and ema.count.item() == k


def test_ema_decay_warm_up():
    """min(ema_decay, (1 + step)/(10 + step)) at 0-based step (the warm-up of TensorFlow's
    ExponentialMovingAverage with num_updates): 0.1 at the first step."""
    assert speed.ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert speed.ema_decay_at(1, 0.9999) == pytest.approx(2 / 11)
    assert speed.ema_decay_at(8, 0.5) == pytest.approx(0.5) and speed.ema_decay_at(7, 0.5) == pytest.approx(8 / 17)
    assert speed.ema_decay_at(10 ** 6, 0.999) == 0.999


TRAIN_KW = dict(batch_size=16, lr=1e-3, warmup=4, device="cpu", progress=False)


def record_params(store):
    def callback(result):
        store.append([p.detach().clone().double() for p in result.model.parameters()])
    return callback


def test_train_ema_equals_hand_ema_of_the_recorded_parameters():
    """The EMA after N steps equals an EMA computed by hand from the model's parameters after each
    step (recorded by a callback), with the warm-up decay min(0.6, (1 + s)/(10 + s)) at step s: warm-up
    for s <= 12, then 0.6."""
    sch = speed.make_schedule("linear", 24)
    torch.manual_seed(0)
    model = tiny_unet()
    ema = [p.detach().clone().double() for p in model.parameters()]
    seen = []
    r = speed.train(model, uint8_images(32), sch, speed.make_strategy("uniform", sch), steps=16, ema_decay=0.6,
                    callback=record_params(seen), callback_every=1, **{**TRAIN_KW, "lr": 1e-2})
    assert len(seen) == 16
    for s, params in enumerate(seen):
        d = min(0.6, (1 + s) / (10 + s))
        ema = [d * e + (1 - d) * p for e, p in zip(ema, params)]
    moved = max((a - b).abs().max().item() for a, b in zip(seen[-1], seen[0]))
    assert moved > 1e-2
    for e, p in zip(ema, r.ema.parameters()):
        torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6)
    assert r.ema is not model and not any(p.requires_grad for p in r.ema.parameters())


def test_train_lowers_the_loss_and_logs_history():
    """80 steps on 64 structured images: the last logged loss is below half the first; history holds
    one entry per log interval, with the warm-up learning rate lr min(1, step / warmup)."""
    sch = speed.make_schedule("linear", 100)
    torch.manual_seed(0)
    model = tiny_unet()
    r = speed.train(model, uint8_images(64), sch, speed.make_strategy("uniform", sch), steps=80, log_every=10,
                    **{**TRAIN_KW, "lr": 2e-3, "warmup": 20})
    assert r.step == 80 and [h["step"] for h in r.history] == list(range(10, 81, 10))
    assert [h["lr"] for h in r.history] == pytest.approx([2e-3 * min(1, s / 20) for s in range(10, 81, 10)])
    losses = [h["loss"] for h in r.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
    assert r.model is model and not model.training and r.interrupted is False
    assert set(r.history[0]) >= {"step", "loss", "img_per_s", "lr", "mse_acceleration", "mse_deceleration",
                                 "mse_convergence"}


def test_train_lr_warms_up_then_cools_down():
    """lr of step i (0-based) is lr min(1, (i + 1) / warmup, (steps - i) / cooldown): here written out by hand."""
    r = _train_small(steps=10, log_every=1, lr=1e-3, warmup=2, cooldown=4)
    assert [h["lr"] for h in r.history] == pytest.approx([1e-3 * f for f in
                                                          (0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25)])


def _hist(r, keys=("step", "loss", "lr", "mse_acceleration", "mse_deceleration", "mse_convergence")):
    return [tuple("nan" if isinstance(h[k], float) and math.isnan(h[k]) else h[k] for k in keys) for h in r.history]


def _train_small(seed=1, steps=6, log_every=1, strategy="speed", opts=None, **kw):
    sch = speed.make_schedule("linear", 24)
    torch.manual_seed(0)
    return speed.train(tiny_unet(dropout=0.2), uint8_images(64, seed=5), sch,
                       speed.make_strategy(strategy, sch, **(opts or {})), steps=steps, seed=seed,
                       log_every=log_every, **{**TRAIN_KW, **kw})


def test_train_logged_loss_is_the_mean_over_the_interval():
    """With log_every=3 each logged loss is the mean of the three per-step losses of log_every=1."""
    every1, every3 = _train_small(steps=6, log_every=1), _train_small(steps=6, log_every=3)
    l1 = [h["loss"] for h in every1.history]
    assert [h["loss"] for h in every3.history] == pytest.approx([np.mean(l1[:3]), np.mean(l1[3:])], rel=1e-6)


def test_train_same_seed_same_run_other_seed_differs():
    """Two runs with the same seed give identical histories and weights (dropout on); another seed differs."""
    a, b, c = _train_small(seed=1), _train_small(seed=1), _train_small(seed=2)
    assert _hist(a) == _hist(b) and all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert [h["loss"] for h in a.history] != [h["loss"] for h in c.history]


def test_train_graph_flag_on_the_cpu_runs_the_same_step():
    """graph=True captures the step in a CUDA graph only on a GPU; elsewhere it is the eager step."""
    a, b = _train_small(steps=3, graph=True), _train_small(steps=3, graph=False)
    assert _hist(a) == _hist(b) and all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_replayer_without_graph_calls_fn_every_time():
    calls = []
    run = speed.Replayer(lambda: calls.append(1), graph=False)
    for _ in range(5):
        run()
    assert len(calls) == 5


def _same_state(a, b):
    return (all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
            and all(torch.equal(p, q) for p, q in zip(a.ema.parameters(), b.ema.parameters())))


@pytest.mark.parametrize("strategy,opts", [("speed", {}), ("loss_aware", {"history": 2}), ("speed", {"dual": True})])
def test_train_resume_equals_uninterrupted_run(tmp_path, strategy, opts):
    """train(N) vs train(N/2) + train(N, resume) from the checkpoint: identical logged losses and final
    weights (model and EMA), with dropout on; the loss-aware state is restored too."""
    full = _train_small(steps=24, strategy=strategy, opts=opts, seed=3)
    ck = str(tmp_path / "ck.pt")
    half = _train_small(steps=12, strategy=strategy, opts=opts, seed=3, ckpt_path=ck)
    assert half.step == 12 and torch.load(ck, weights_only=True)["step"] == 12
    if strategy == "loss_aware":  # the saved state is non-uniform, so resuming it matters
        assert half.strategy.probs.max() > 1.2 * half.strategy.probs.min()
    torch.manual_seed(123)  # a different init: the weights must come from the checkpoint
    resumed = _train_small(steps=24, strategy=strategy, opts=opts, seed=3, ckpt_path=ck)
    assert resumed.step == 24 and _hist(resumed) == _hist(full) and _same_state(resumed, full)
    if strategy == "loss_aware":
        assert torch.equal(full.strategy.losses, resumed.strategy.losses)


@pytest.mark.parametrize("change,field", [
    (dict(lr=2e-3), "lr"),
    (dict(opts={"k": 1}), "strategy"),
    (dict(strategy="uniform"), "strategy"),
    (dict(schedule="cosine"), "schedule"),
    (dict(experiment={"data": "other.zip"}), "data"),
    (dict(model_kw={"ch": 8}), "model"),
    (dict(seed=2), "seed"),
    (dict(precision="bf16"), "precision"),  # resolved: "auto" means bf16 on one GPU and fp16 on another
])
def test_train_resume_refuses_another_experiment(tmp_path, change, field):
    """A checkpoint of another experiment raises ValueError naming the differing field; resume=False
    starts over."""
    ck = str(tmp_path / "ck.pt")

    def run(steps, strategy="speed", opts=None, schedule="linear", experiment=None, model_kw=None, seed=0, lr=1e-3,
            **kw):
        sch = speed.make_schedule(schedule, 24)
        return speed.train(tiny_unet(**(model_kw or {})), uint8_images(16), sch,
                           speed.make_strategy(strategy, sch, **(opts or {})), steps=steps, seed=seed,
                           experiment=experiment or {"data": "cifar.zip"}, ckpt_path=ck,
                           **{**TRAIN_KW, "lr": lr, **kw})

    run(1)
    stored = torch.load(ck, weights_only=True)["experiment"]
    assert stored["strategy"] == speed.make_strategy("speed", speed.make_schedule("linear", 24)).config
    assert (stored["lr"], stored["seed"], stored["batch_size"], stored["data"]) == (1e-3, 0, 16, "cifar.zip")
    with pytest.raises(ValueError, match=rf"another experiment.*\b{field}\b"):
        run(2, **change)
    assert run(1, resume=False, **change).step == 1


def test_train_extra_holds_json_values_only(tmp_path):
    """result.extra with numpy scalars is saved as plain numbers (loadable with weights_only=True);
    any other object raises ValueError at save time."""
    ck = str(tmp_path / "ck.pt")

    def put(value):
        def callback(result):
            result.extra["x"] = value
        return callback

    sch = speed.make_schedule("linear", 24)
    speed.train(tiny_unet(), uint8_images(16), sch, speed.make_strategy("uniform", sch), steps=1, ckpt_path=ck,
                callback=put([np.float32(1.5), np.int64(3), {"a": np.float64(0.25)}]), **TRAIN_KW)
    assert torch.load(ck, weights_only=True)["extra"] == {"x": [1.5, 3, {"a": 0.25}]}
    with pytest.raises(ValueError, match="result.extra"):
        speed.train(tiny_unet(), uint8_images(16), sch, speed.make_strategy("uniform", sch), steps=1,
                    ckpt_path=str(tmp_path / "other.pt"), callback=put(object()), **TRAIN_KW)


def test_train_callback_true_stops_and_checkpoints(tmp_path):
    ck = str(tmp_path / "ck.pt")
    r = _train_small(steps=10, callback=lambda res: res.step == 4, callback_every=2, ckpt_path=ck)
    assert r.step == 4 and torch.load(ck, weights_only=True)["step"] == 4 and not r.interrupted


def test_train_checkpoints_every_ckpt_minutes(tmp_path):
    """ckpt_minutes=0: a checkpoint after every step (a callback at step k finds step k - 1 on disk);
    the default 5 minutes: none before the end of a short run."""
    def seen_by(store, path):
        def callback(result):
            store.append(torch.load(path, weights_only=True)["step"] if os.path.exists(path) else None)
        return callback

    often, rarely = [], []
    _train_small(steps=4, ckpt_path=str(tmp_path / "a.pt"), ckpt_minutes=0, callback_every=1,
                 callback=seen_by(often, str(tmp_path / "a.pt")))
    _train_small(steps=4, ckpt_path=str(tmp_path / "b.pt"), callback_every=1,
                 callback=seen_by(rarely, str(tmp_path / "b.pt")))
    assert often == [None, 1, 2, 3] and rarely == [None] * 4
    assert torch.load(str(tmp_path / "b.pt"), weights_only=True)["step"] == 4


def test_train_sigint_stops_after_the_step_and_resumes_to_the_same_weights(tmp_path):
    """SIGINT during train(): the current step finishes, a checkpoint is written, train() returns with
    result.interrupted; the previous handler is back; resuming reaches the uninterrupted run's weights."""
    before = signal.getsignal(signal.SIGINT)

    def interrupt(result):
        if result.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    ck = str(tmp_path / "ck.pt")
    r = _train_small(steps=12, callback=interrupt, callback_every=1, ckpt_path=ck, seed=4)
    assert r.interrupted and r.step == 5 and torch.load(ck, weights_only=True)["step"] == 5
    assert signal.getsignal(signal.SIGINT) is before
    resumed = _train_small(steps=12, ckpt_path=ck, seed=4)
    full = _train_small(steps=12, seed=4)
    assert not resumed.interrupted and _same_state(resumed, full) and _hist(resumed) == _hist(full)


def test_train_second_sigint_raises_keyboard_interrupt(tmp_path):
    def interrupt_twice(result):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _train_small(steps=3, callback=interrupt_twice, callback_every=1)


def test_train_history_after_interrupt_between_log_points_equals_uninterrupted(tmp_path):
    def interrupt(result):
        if result.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    ck = str(tmp_path / "ck.pt")
    _train_small(steps=8, log_every=4, callback=interrupt, callback_every=1, ckpt_path=ck, seed=4)
    resumed = _train_small(steps=8, log_every=4, ckpt_path=ck, seed=4)
    assert _hist(resumed) == _hist(_train_small(steps=8, log_every=4, seed=4))


@pytest.mark.parametrize("kw,match", [
    (dict(grad_clip=-1.0), "grad_clip"), (dict(lr=0), r"\blr\b"), (dict(ema_decay=1.0), "ema_decay"),
    (dict(batch_size=65), "batch_size"), (dict(steps=0), "steps"), (dict(warmup=-1), "warmup"),
    (dict(cooldown=1.5), "cooldown"),
    (dict(target="score"), "target"), (dict(precision="fp8"), "precision"),
])
def test_train_rejects_bad_arguments(kw, match):
    sch = speed.make_schedule("linear", 24)
    args = {**TRAIN_KW, "steps": 1, **kw}
    raises(lambda: speed.train(tiny_unet(), uint8_images(64), sch, speed.make_strategy("uniform", sch), **args), match)


def test_train_rejects_log_every_0():
    sch = speed.make_schedule("linear", 24)
    raises(lambda: speed.train(tiny_unet(), uint8_images(16), sch, speed.make_strategy("uniform", sch), steps=1,
                               log_every=0, **TRAIN_KW), "log_every")


def test_train_resume_refuses_another_flip(tmp_path):
    sch, ck = speed.make_schedule("linear", 24), str(tmp_path / "ck.pt")
    speed.train(tiny_unet(), uint8_images(16), sch, speed.make_strategy("uniform", sch), steps=1, ckpt_path=ck,
                **TRAIN_KW)
    raises(lambda: speed.train(tiny_unet(), uint8_images(16), sch, speed.make_strategy("uniform", sch), steps=2,
                               flip=False, ckpt_path=ck, **TRAIN_KW), "flip")


# ================================================================================================
# 10. Samplers
# ================================================================================================

class GaussOracle(nn.Module):
    """The exact denoiser of data x0 ~ N(mu_y, v) iid per pixel (mu_y = mu + 0.2 y with labels), in the
    eps, x0 or v parameterisation: E[x0 | x_t] = mu + a v (x_t - a mu) / (a^2 v + s^2), a = sqrt(abar_t),
    s = sqrt(1 - abar_t). Records the steps it is called at."""

    def __init__(self, mu, v, schedule, target="eps", params=True):
        super().__init__()
        self.mu, self.v, self.target, self.calls = mu, v, target, []
        self.ab = torch.from_numpy(np.cumprod(1 - schedule.betas.numpy()))
        if params:
            self.dummy = nn.Parameter(torch.zeros(()))  # gives the sampler a device

    def forward(self, x, t, y=None):
        self.calls.append(t[0].item())
        ab, xd = self.ab[t].view(-1, 1, 1, 1), x.double()
        mu = self.mu + (0.2 * y.double().view(-1, 1, 1, 1) if y is not None else 0.0)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = mu + a * self.v * (xd - a * mu) / (a * a * self.v + s * s)
        eps = (xd - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.target].float()


def ddim_reference(n, shape, mu, v, T, steps, eta, seed, batch_size, labels=None, clip=False):
    """DDIM (Song et al. 2021, eq. 12) with the exact Gaussian denoiser, written out in float64 over the
    evenly respaced steps round(linspace(T-1, 0, steps)); sigma_t = eta sqrt((1 - abar_prev)/(1 - abar_t)
    (1 - abar_t/abar_prev)). The documented noise order: all starting noise first, then per batch
    (of min(batch_size, n)) one fresh [batch, *shape] draw per step when eta > 0."""
    g = gen(seed)
    ab = np_alpha_bar("linear", T)
    ts = list(dict.fromkeys(np.round(np.linspace(T - 1, 0, steps)).astype(int).tolist()))
    start = torch.randn((n, *shape), generator=g).double()
    b, out = min(batch_size, n), []
    for i in range(0, n, b):
        x = start[i:i + b]
        m = len(x)
        mu_y = mu + (0.2 * labels[i:i + m].double().view(-1, 1, 1, 1) if labels is not None else 0.0)
        for j, t in enumerate(ts):
            a_t, a_p = ab[t], (ab[ts[j + 1]] if j + 1 < len(ts) else 1.0)
            x0 = mu_y + math.sqrt(a_t) * v * (x - math.sqrt(a_t) * mu_y) / (a_t * v + 1 - a_t)
            if clip:
                x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            sig = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
            z = torch.randn((b, *shape), generator=g).double()[:m] if eta > 0 else 0.0
            x = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sig ** 2, 0.0)) * eps + sig * z
        out.append(x)
    return ((torch.cat(out) + 1) * 127.5).round().clamp(0, 255)


@pytest.mark.parametrize("target", speed.TARGETS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_exact_denoiser_equals_reference(target, eta, steps):
    """The sampler's table-driven step (graphed on a GPU, the same code eagerly here) equals the
    straightforward DDIM reference for eta 0 and 1 and every target, over two batches, up to uint8
    rounding; a model read with the wrong parameterisation does not."""
    T, mu, v = 50, 0.1, 0.09
    sch = speed.make_schedule("linear", T)
    kw = dict(shape=(3, 4, 4), steps=steps, eta=eta, generator=gen(5), clip=False, batch_size=4)
    out = speed.ddim_sample(GaussOracle(mu, v, sch, target), sch, 6, target=target, **kw)
    assert out.dtype == torch.uint8 and out.shape == (6, 3, 4, 4)
    ref = ddim_reference(6, (3, 4, 4), mu, v, T, steps, eta, 5, 4)
    assert (out.double() - ref).abs().max().item() <= 1
    if steps == 1:  # one step from T-1 (abar ~ 0) returns E[x0 | x_T] ~ mu: a flat image
        return
    assert out.double().std() > 5
    wrong = {"eps": "x0", "x0": "v", "v": "eps"}[target]
    bad = speed.ddim_sample(GaussOracle(mu, v, sch, target), sch, 6, target=wrong, **{**kw, "generator": gen(5)})
    assert (bad.double() - ref).abs().max().item() > 1


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_clip_and_labels_equal_reference(eta):
    """clip=True clamps the predicted x0 to [-1, 1] (and recomputes eps from it); labels reach the model
    batch by batch. Data centred near 1 so that clipping matters."""
    T, mu, v = 50, 0.7, 0.09
    sch = speed.make_schedule("linear", T)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    kw = dict(shape=(2, 3, 3), steps=10, eta=eta, generator=gen(6), batch_size=3, labels=labels)
    out = speed.ddim_sample(GaussOracle(mu, v, sch), sch, 7, clip=True, **kw)
    ref = ddim_reference(7, (2, 3, 3), mu, v, T, 10, eta, 6, 3, labels=labels, clip=True)
    assert (out.double() - ref).abs().max().item() <= 1
    unclipped = ddim_reference(7, (2, 3, 3), mu, v, T, 10, eta, 6, 3, labels=labels, clip=False)
    assert (unclipped - ref).abs().max().item() > 1


def test_ddim_batching_does_not_change_the_result_for_eta_0():
    """All starting noise is drawn first: with eta = 0, n = 7 in batches of 2, 3 or 7 gives the same
    images. With eta > 0 the fresh noise of each step is drawn batch by batch, so the result depends on
    batch_size by design (see ddim_sample): the same batch_size and seed reproduce it."""
    sch = speed.make_schedule("linear", 50)
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet(num_classes=3)).eval()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    kw = dict(shape=(3, 8, 8), steps=5, labels=labels, device="cpu")
    runs = {b: speed.ddim_sample(m, sch, 7, generator=gen(1), batch_size=b, **kw) for b in (2, 3, 7)}
    assert all((runs[b].int() - runs[7].int()).abs().max() <= 1 for b in (2, 3))  # float rounding only
    assert (runs[2] != runs[7]).float().mean() < 0.01
    oracle = GaussOracle(0.1, 0.09, sch)  # exact arithmetic per sample; 27 values per image
    kw["shape"] = (3, 3, 3)
    exact = {b: speed.ddim_sample(oracle, sch, 7, generator=gen(1), batch_size=b, **kw) for b in (2, 3, 7)}
    assert torch.equal(exact[2], exact[7]) and torch.equal(exact[3], exact[7])
    eta1 = {b: speed.ddim_sample(oracle, sch, 7, generator=gen(1), batch_size=b, eta=1.0, **kw) for b in (3, 7)}
    assert torch.equal(eta1[3], speed.ddim_sample(oracle, sch, 7, generator=gen(1), batch_size=3, eta=1.0, **kw))
    assert not torch.equal(eta1[3], eta1[7])


def test_ddim_sample_seeded_uint8():
    sch = speed.make_schedule("linear", 50)
    torch.manual_seed(0)
    m = perturb_zero_init(tiny_unet()).eval()
    kw = dict(shape=(3, 8, 8), steps=5, eta=0.5)
    a, b, c = (speed.ddim_sample(m, sch, 3, generator=gen(s), **kw) for s in (1, 1, 2))
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_ddpm_sample_is_ancestral_over_250_respaced_steps():
    """ddpm_sample: the paper's DDPM-250, i.e. min(250, T) evenly respaced steps round(linspace(T-1, 0))."""
    sch = speed.make_schedule("linear", 1000)
    oracle = GaussOracle(0.1, 0.09, sch)
    speed.ddpm_sample(oracle, sch, 2, shape=(1, 2, 2), generator=gen(0))
    assert oracle.calls == np.round(np.linspace(999, 0, 250)).astype(int).tolist()
    small = speed.make_schedule("linear", 30)
    oracle = GaussOracle(0.1, 0.09, small)
    speed.ddpm_sample(oracle, small, 2, shape=(1, 2, 2), generator=gen(0))
    assert oracle.calls == list(range(29, -1, -1))


@pytest.mark.parametrize("target", speed.TARGETS)
def test_ddpm_sample_with_exact_denoiser_has_predicted_mean_and_variance(target):
    """Ancestral sampling over all T = 50 steps (posterior variance beta~) with the exact denoiser of
    N(mu, v) data is affine-Gaussian: the output is N(M, V) with M, V from the recursion
    x_{t-1} = A x_t + B + sigma z. 2000 samples x 48 pixels: mean within 5 s.e., variance within 5%."""
    T, mu, v, n = 50, 0.1, 0.04, 2000
    sch = speed.make_schedule("linear", T)
    ab = np_alpha_bar("linear", T)
    M, V = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        a_t, a_p = ab[t], (ab[t - 1] if t > 0 else 1.0)
        sig2 = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        c1 = math.sqrt(a_t) * v / (a_t * v + 1 - a_t)          # x0_hat = c0 + c1 x_t
        c0 = mu - c1 * math.sqrt(a_t) * mu
        k = math.sqrt(max(1 - a_p - sig2, 0.0)) / math.sqrt(1 - a_t)
        A = math.sqrt(a_p) * c1 + k * (1 - math.sqrt(a_t) * c1)
        B = math.sqrt(a_p) * c0 - k * math.sqrt(a_t) * c0
        M, V = A * M + B, A * A * V + sig2
    out = speed.ddpm_sample(GaussOracle(mu, v, sch, target), sch, n, shape=(3, 4, 4), target=target,
                            generator=gen(6), batch_size=1000)
    x = out.double() / 127.5 - 1
    assert abs(x.mean().item() - M) < 5 * math.sqrt(V / x.numel())
    assert abs(x.var().item() / V - 1) < 0.05
    assert abs(M - mu) < 1e-3 and 0.5 * v < V < v


_S60 = speed.make_schedule("linear", 60)


@pytest.mark.parametrize("fn,match", [
    (lambda: speed.ddim_sample(GaussOracle(0, 1, _S60, params=False), _S60, 2, shape=(1, 2, 2)), "device"),
    (lambda: speed.ddim_sample(GaussOracle(0, 1, _S60), _S60, 0, shape=(1, 2, 2)), r"\bn\b"),
    (lambda: speed.ddim_sample(GaussOracle(0, 1, _S60), _S60, 2, steps=61), "steps"),
    (lambda: speed.ddim_sample(GaussOracle(0, 1, _S60), _S60, 2, eta=1.5), "eta"),
    (lambda: speed.ddim_sample(GaussOracle(0, 1, _S60), _S60, 2, batch_size=0), "batch_size"),
    (lambda: speed.ddim_sample(GaussOracle(0, 1, _S60), _S60, 2, target="score"), "target"),
])
def test_samplers_reject_bad_arguments(fn, match):
    raises(fn, match)


def test_sampler_rejects_labels_of_the_wrong_length():
    raises(lambda: speed.ddim_sample(GaussOracle(0, 1, _S60), _S60, 4, shape=(1, 2, 2), steps=5,
                                     labels=torch.tensor([0, 1])), "labels")


def test_sampler_with_parameterless_model_and_explicit_device():
    out = speed.ddim_sample(GaussOracle(0.1, 0.09, _S60, params=False), _S60, 2, shape=(1, 2, 2), device="cpu",
                            generator=gen(0))
    assert out.shape == (2, 1, 2, 2)


# ================================================================================================
# 11. Frechet distance
# ================================================================================================

def test_frechet_identical_features_is_zero():
    f = torch.randn(500, 16, generator=gen(0), dtype=torch.float64) @ torch.randn(16, 16, generator=gen(1),
                                                                                   dtype=torch.float64)
    assert abs(speed.frechet_distance(f, f)) < 1e-8 * torch.cov(f.T).trace().item()
    g = torch.randn(10, 64, generator=gen(2), dtype=torch.float64)  # fewer samples than dimensions
    assert abs(speed.frechet_distance(g, g)) < 1e-6 * torch.cov(g.T).trace().item()


def _gaussians(seed=3, d=6):
    g = gen(seed)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    b = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    return mu1, mu2, a, b


def test_frechet_diagonal_closed_form_and_all_input_forms():
    """Commuting covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2; the same from (mu, S) and
    (mu, S, sqrt_psd(S)) tuples, in either order."""
    mu1, mu2, a, b = _gaussians()
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    A, B = torch.diag(a), torch.diag(b)
    assert speed.frechet_distance((mu1, A), (mu2, B)) == pytest.approx(expected, rel=1e-10)
    assert speed.frechet_distance((mu1, A), (mu2, B, speed.sqrt_psd(B))) == pytest.approx(expected, rel=1e-10)
    got = speed.frechet_distance((mu2, B, speed.sqrt_psd(B)), (mu1, A, speed.sqrt_psd(A)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_closed_forms():
    """S2 = c^2 S1 (non-diagonal): tr (S1 S2)^(1/2) = c tr S1, so FD = |dmu|^2 + (1 - c)^2 tr S1; with
    the reference's square root given as a third element the result is the same."""
    g = gen(4)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    S1 = A @ A.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    c = 1.7
    expected = float(((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * S1.trace())
    S2 = c * c * S1
    assert speed.frechet_distance((mu1, S1), (mu2, S2)) == pytest.approx(expected, rel=1e-9)
    assert speed.frechet_distance((mu1, S1), (mu2, S2, speed.sqrt_psd(S2))) == pytest.approx(expected, rel=1e-9)


def test_frechet_vs_numpy_eigendecomposition():
    """General covariances: tr (S1 S2)^(1/2) = sum of sqrt of the eigenvalues of S1 S2 (real, >= 0)."""
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    S1, S2 = A @ A.T + 0.05 * np.eye(6), B @ B.T + 0.05 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    tr_sqrt = np.sqrt(np.linalg.eigvals(S1 @ S2).real.clip(min=0)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    assert speed.frechet_distance((t(mu1), t(S1)), (t(mu2), t(S2))) == pytest.approx(expected, rel=1e-8)
    got = speed.frechet_distance((t(mu1), t(S1)), (t(mu2), t(S2), speed.sqrt_psd(t(S2))))
    assert got == pytest.approx(expected, rel=1e-8)


def test_sqrt_psd():
    """The symmetric PSD square root: R R = S, R = R^T; negative eigenvalues (round-off) clipped to 0."""
    A = torch.randn(5, 3, generator=gen(6), dtype=torch.float64)
    S = A @ A.T                                   # rank 3: two zero eigenvalues
    R = speed.sqrt_psd(S)
    torch.testing.assert_close(R @ R, S, atol=1e-10, rtol=0)
    torch.testing.assert_close(R, R.T)
    assert torch.linalg.eigvalsh(R).min().item() > -1e-7
    R2 = speed.sqrt_psd(torch.diag(torch.tensor([4.0, -1e-12], dtype=torch.float64)))
    torch.testing.assert_close(R2, torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64)))


def test_frechet_from_samples_approaches_closed_form():
    """N = 200k samples of two diagonal 3-D Gaussians: within 0.03 of the closed form (the dominant error
    2 (mu1 - mu2).(mu_hat - mu) has s.d. 0.0044, so 0.03 is ~7 s.d.); feature_stats estimates them."""
    N, g = 200_000, gen(6)
    mu1, mu2 = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64), torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64)
    a, b = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), torch.tensor([0.3, 1.5, 2.0], dtype=torch.float64)
    X = mu1 + torch.randn(N, 3, generator=g, dtype=torch.float64) * a.sqrt()
    Y = mu2 + torch.randn(N, 3, generator=g, dtype=torch.float64) * b.sqrt()
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert abs(speed.frechet_distance(X, Y) - expected) < 0.03
    mu_hat, cov_hat = speed.feature_stats(X)
    torch.testing.assert_close(mu_hat, mu1, atol=0.02, rtol=0)
    torch.testing.assert_close(cov_hat, torch.diag(a), atol=0.03, rtol=0)


def test_feature_stats_unbiased_covariance_and_validation():
    f = torch.randn(7, 3, generator=gen(7), dtype=torch.float64)
    mu, cov = speed.feature_stats(f.float())
    assert mu.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.float().double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(f.float().double().numpy().T, ddof=1), rtol=1e-10)
    raises(lambda: speed.feature_stats(torch.zeros(1, 3)), "feats")
    raises(lambda: speed.frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2)), "feature sizes")
