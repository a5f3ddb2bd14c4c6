"""SpeeD: faster diffusion training by looking closely at time steps.

A readable reference implementation of

    Kai Wang, Mingjia Shi, Yukun Zhou, et al. "A Closer Look at Time Steps is Worthy of Triple
    Speed-Up for Diffusion Model Training". arXiv:2405.17403 (2024).

SpeeD leaves the model alone. It looks at how fast the forward (noising) process changes at each
time step, splits the steps into an acceleration, a deceleration and a convergence area, samples
convergence-area steps less often (asymmetric sampling) and weights fast-changing steps more
(change-aware weighting).

The file follows the paper, top to bottom:

    1. schedule      the discrete DDPM forward process                      make_schedule, Schedule
    2. increments    mean / variance of x_{t+1} - x_t                       increment_stats, increment_stats_mc
    3. areas         acceleration / deceleration / convergence thresholding find_areas, Areas
    4. sampling      asymmetric time-step sampling                          speed_probs
    5. weighting     change-aware loss weights                              speed_weights
    6. strategies    SpeeD and correct baselines behind one interface       make_strategy
    7. loss          the weighted denoising loss                            diffusion_loss
    8. network       a compact DDPM-style UNet (einops)                     UNet, make_unet
    9. training      a GPU training loop with EMA, AMP, checkpoints         train
   10. sampling      DDIM / DDPM samplers                                   ddim_sample, ddpm_sample
   11. metrics       Frechet distance, FID / FD feature nets                frechet_distance, ...

Everything is plain PyTorch tensors. Copy any section into your own project; each one says where its
formulas come from. Indices run t = 0 ... T-1 (t = 0 is the least noisy step).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
import urllib.request
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "Schedule", "make_schedule", "increment_stats", "increment_stats_mc", "Areas", "find_areas",
    "speed_probs", "speed_weights", "dual_step", "Strategy", "LossAwareStrategy", "make_strategy",
    "diffusion_loss", "UNet", "make_unet", "UNET_SIZES", "train", "TrainResult", "ddim_sample",
    "ddpm_sample", "feature_stats", "frechet_distance", "FeatureNet", "load_feature_net",
    "compute_features", "reference_stats", "fd_of_samples", "SCHEDULES", "STRATEGIES", "TARGETS",
    "AREA_NAMES",
]

SCHEDULES = ("linear", "cosine", "quadratic")
STRATEGIES = ("uniform", "speed", "p2", "min_snr", "lognormal", "logitnormal", "loss_aware")
TARGETS = ("eps", "x0", "v")
AREA_NAMES = ("acceleration", "deceleration", "convergence")


def _check(ok, message):
    """Raise ValueError(message) unless ok: every public function validates its inputs with this."""
    if not ok:
        raise ValueError(message)


def _check_choice(name, value, choices):
    _check(value in choices, f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_T(T):
    _check(isinstance(T, int) and not isinstance(T, bool) and T >= 2,
           f"T must be an integer >= 2; got {T!r}")


# ------------------------------------------------------------------------------------------------
# 1. Schedule: the discrete DDPM forward process (Ho et al. 2020; Nichol & Dhariwal 2021)
#    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   abar_t = prod_{s<=t} (1 - beta_s)
# ------------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """A discrete noise schedule. All tensors are float64 on the CPU, length T."""
    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    T: int
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas):
        """Build a schedule from any 1-D sequence of betas in (0, 1)."""
        betas = betas if torch.is_tensor(betas) else torch.as_tensor(betas, dtype=torch.float64)
        _check(betas.ndim == 1, f"betas must be a 1-D tensor; got shape {tuple(betas.shape)}")
        _check(betas.is_floating_point(), f"betas must be floating point; got {betas.dtype}")
        betas = betas.detach().to("cpu", torch.float64)
        _check(betas.numel() >= 2, f"betas must have length T >= 2; got {betas.numel()}")
        _check(bool(((betas > 0) & (betas < 1)).all()),
               f"betas must lie in the open interval (0, 1); got min {betas.min().item():.4g}, "
               f"max {betas.max().item():.4g}")
        alphas = 1.0 - betas
        return cls(betas, alphas, torch.cumprod(alphas, 0), betas.numel())

    @property
    def snr(self):
        """Signal-to-noise ratio SNR_t = abar_t / (1 - abar_t)."""
        return self.alpha_bar / (1.0 - self.alpha_bar)

    @property
    def sigma(self):
        """EDM-style noise level sigma_t = sqrt((1 - abar_t) / abar_t) = 1 / sqrt(SNR_t)."""
        return ((1.0 - self.alpha_bar) / self.alpha_bar).sqrt()

    def coefs(self, device):
        """(sqrt(abar), sqrt(1 - abar)) as float32 on `device`, cached so training never copies them."""
        key = str(torch.device(device))
        if key not in self._device_cache:
            self._device_cache[key] = (self.alpha_bar.sqrt().float().to(device),
                                       (1.0 - self.alpha_bar).sqrt().float().to(device))
        return self._device_cache[key]


def make_schedule(kind="linear", T=1000):
    """The standard schedules.

    linear:    beta from 1e-4 to 0.02 at T = 1000 (DDPM); for other T both ends are scaled by 1000/T
               (improved DDPM), so every T discretises the same continuous process.
    cosine:    abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, betas clipped at 0.999
               (Nichol & Dhariwal 2021, eq. 17).
    quadratic: sqrt(beta) linear between the scaled linear schedule's ends (DDPM code's "quad").
    """
    _check_choice("kind", kind, SCHEDULES)
    _check_T(T)
    if kind == "cosine":
        s = 0.008
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return Schedule.from_betas((1 - f[1:] / f[:-1]).clamp(max=0.999))
    scale = 1000.0 / T
    lo, hi = 1e-4 * scale, 0.02 * scale
    _check(hi < 1, f"T must be >= 21 for the {kind} schedule (its largest beta, 20/T, must stay "
                   f"below 1); got T={T}")
    if kind == "linear":
        return Schedule.from_betas(torch.linspace(lo, hi, T, dtype=torch.float64))
    return Schedule.from_betas(torch.linspace(lo ** 0.5, hi ** 0.5, T, dtype=torch.float64) ** 2)


# ------------------------------------------------------------------------------------------------
# 2. Process increments (paper Sec. 3): delta_t = x_{t+1} - x_t given x_0.
#    x_{t+1} = sqrt(alpha_{t+1}) x_t + sqrt(beta_{t+1}) z, so
#    E[delta_t | x0]   = (sqrt(alpha_{t+1}) - 1) sqrt(abar_t) x0
#    Var[delta_t | x0] = (1 - sqrt(alpha_{t+1}))^2 (1 - abar_t) + beta_{t+1}      (per dimension)
# ------------------------------------------------------------------------------------------------

def increment_stats(schedule):
    """Closed form (mean_coef, var), each float64 of length T-1:
    E[delta_t | x0] = mean_coef[t] * x0 and Var[delta_t | x0] = var[t]."""
    _check(isinstance(schedule, Schedule), "schedule must be a Schedule (see make_schedule)")
    sa_next = schedule.alphas[1:].sqrt()
    ab = schedule.alpha_bar[:-1]
    mean_coef = (sa_next - 1.0) * ab.sqrt()
    var = (1.0 - sa_next) ** 2 * (1.0 - ab) + schedule.betas[1:]
    return mean_coef, var


def increment_stats_mc(schedule, x0, generator=None):
    """Monte-Carlo estimate of (mean_coef, var) on real data: runs the Markov chain
    x_{t+1} = sqrt(alpha_{t+1}) x_t + sqrt(beta_{t+1}) z from x_0 ~ q(x_0|x_0) over all T steps and
    measures delta_t = x_{t+1} - x_t. mean_coef is the least-squares slope of delta_t on x0, var the
    variance of the residual (pooled over every pixel of the batch). Uses no closed form."""
    _check(isinstance(schedule, Schedule), "schedule must be a Schedule (see make_schedule)")
    _check(torch.is_tensor(x0) and x0.is_floating_point() and x0.ndim >= 2,
           "x0 must be a float tensor with a batch dimension, e.g. [N, C, H, W] in [-1, 1]")
    x0 = x0.double().flatten()
    a = schedule.alphas.to(x0.device)
    b = schedule.betas.to(x0.device)
    ab0 = schedule.alpha_bar[0].item()
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x = ab0 ** 0.5 * x0 + (1 - ab0) ** 0.5 * z  # x_0 of the chain is the t = 0 noisy sample
    x0_sq = (x0 * x0).sum()
    mean_coef, var = [], []
    for t in range(schedule.T - 1):
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_next = a[t + 1].sqrt() * x + b[t + 1].sqrt() * z
        delta = x_next - x
        c = (delta * x0).sum() / x0_sq
        mean_coef.append(c)
        var.append(((delta - c * x0) ** 2).mean())
        x = x_next
    return torch.stack(mean_coef).cpu(), torch.stack(var).cpu()


# ------------------------------------------------------------------------------------------------
# 3. Areas (paper Sec. 3, thresholding). The official code measures how fast the process changes by
#    the derivative of Psi_t = 1 - abar_t (the variance of x_t): g_t = dPsi/dt, central differences.
#    acceleration t < t_peak = argmax g;  deceleration t_peak <= t < tau;  convergence t >= tau,
#    tau = first t after t_peak with T * g_t < eps (eps per unit of normalised time t/T; eps = 0.1
#    is the paper's 1e-4 per step at T = 1000, so the rule does not depend on T).
# ------------------------------------------------------------------------------------------------

def change_rate(schedule):
    """g_t = dPsi_t/dt for Psi_t = 1 - abar_t, central differences (one-sided at the ends), per step."""
    _check(isinstance(schedule, Schedule), "schedule must be a Schedule (see make_schedule)")
    return torch.gradient(1.0 - schedule.alpha_bar)[0]


@dataclass
class Areas:
    """The three areas of a schedule. t_peak and tau are step indices; g the change rate per step."""
    t_peak: int
    tau: int
    T: int
    g: torch.Tensor

    def label(self, t):
        """0 = acceleration, 1 = deceleration, 2 = convergence for each t (int or tensor)."""
        t = torch.as_tensor(t)
        return (t >= self.t_peak).long() + (t >= self.tau).long()

    def name(self, t):
        return AREA_NAMES[int(self.label(int(t)))]

    def fractions(self):
        """Share of the T steps in each area, as a dict."""
        n = torch.bincount(self.label(torch.arange(self.T)), minlength=3).double() / self.T
        return dict(zip(AREA_NAMES, n.tolist()))


def find_areas(schedule, eps=0.1):
    """Split steps into acceleration / deceleration / convergence areas (paper Sec. 3).
    Linear schedule, T = 1000: t_peak = 219, tau = 698 (the paper rounds to 700); cosine: tau = 979.
    If the rate never drops below eps after the peak, tau = T - 1 (a one-step convergence area)."""
    _check(isinstance(eps, (int, float)) and eps > 0, f"eps must be a number > 0; got {eps!r}")
    g = change_rate(schedule)
    T = schedule.T
    t_peak = int(g.argmax())
    below = ((torch.arange(T) > t_peak) & (g * T < eps)).nonzero()
    tau = int(below[0]) if len(below) else T - 1
    return Areas(t_peak=t_peak, tau=max(tau, 1), T=T, g=g)


# ------------------------------------------------------------------------------------------------
# 4. Asymmetric sampling (paper eq. 6): steps below tau are k times as likely as convergence steps.
#    P(t) = k / (T + tau (k - 1))  for t < tau,   1 / (T + tau (k - 1))  for t >= tau.
# ------------------------------------------------------------------------------------------------

def _check_tau(tau, T):
    _check(isinstance(tau, int) and not isinstance(tau, bool) and 1 <= tau <= T - 1,
           f"tau must be an integer in [1, T-1] = [1, {T - 1}]; got {tau!r}")


def speed_probs(T, tau, k=5):
    """Asymmetric sampling distribution P(t), float64 of length T (sums to 1). k = 1 is uniform."""
    _check_T(T)
    _check_tau(tau, T)
    _check(isinstance(k, (int, float)) and k >= 1, f"k must be a number >= 1; got {k!r}")
    p = torch.ones(T, dtype=torch.float64)
    p[:tau] = k
    return p / (T + tau * (k - 1))


def dual_step(schedule):
    """m of the official code's "dual sampling": 1 + the first t where d sqrt(1 - abar_t)/dt drops
    below 1e-4 per step at T = 1000 (0.1 per unit normalised time). Linear T = 1000: m = 642."""
    d = torch.gradient((1.0 - schedule.alpha_bar).sqrt())[0] * schedule.T
    return int((d < 0.1).int().argmax()) + 1


# ------------------------------------------------------------------------------------------------
# 5. Change-aware weighting (paper eq. 7, code since 2024-05-20): below tau the change rate g_t is
#    rescaled into [1 - lam, lam]; from tau on w_t = 1. lam in [0.5, 1], default 0.6.
#    Note: lam = 0.5 gives w = 0.5 below tau and 1 above -- it is not "off" in this version of the
#    code; pass lam=None to a strategy for no weighting at all (w = 1 everywhere).
# ------------------------------------------------------------------------------------------------

def speed_weights(schedule, tau, lam=0.6):
    """Change-aware weights w_t, float64 of length T. min/max of g are taken over t < tau."""
    _check(isinstance(schedule, Schedule), "schedule must be a Schedule (see make_schedule)")
    _check_tau(tau, schedule.T)
    _check(isinstance(lam, (int, float)) and 0.5 <= lam <= 1,
           f"lam must be a number in [0.5, 1]; got {lam!r}")
    g = change_rate(schedule)[:tau]
    span = (g.max() - g.min()).clamp(min=1e-30)
    w = torch.ones(schedule.T, dtype=torch.float64)
    w[:tau] = (1 - lam) + (2 * lam - 1) * (g - g.min()) / span
    return w


# ------------------------------------------------------------------------------------------------
# 6. Strategies: a distribution P(t) over steps plus a per-step loss weight w(t). SpeeD and the
#    baselines (METHOD.md Sec. 5) share one sampler: inverse-CDF on the device (torch.searchsorted),
#    so drawing t costs one tiny kernel and never synchronises with the host.
#
#    Weights are multipliers on the per-sample MSE of the chosen target. P2 and Min-SNR are defined as
#    eps-prediction objectives; for x0 / v targets their weights are converted so the objective stays
#    the same: |e_eps|^2 = SNR |e_x0|^2 = SNR/(SNR+1) |e_v|^2.  (Min-SNR-gamma: eps min(SNR,g)/SNR,
#    x0 min(SNR,g), v min(SNR,g)/(SNR+1) -- Hang et al. 2023; the official SpeeD repo gets this wrong.)
# ------------------------------------------------------------------------------------------------

def _target_factor(schedule, target):
    """Factor that turns an eps-space weight into the equivalent weight for `target`."""
    snr = schedule.snr
    return {"eps": torch.ones_like(snr), "x0": snr, "v": snr / (snr + 1)}[target]


def _normal_bin_probs(z):
    """Standard-normal mass of the len(z) + 1 bins between sorted edges z (first and last unbounded)."""
    cdf = 0.5 * (1 + torch.special.erf(z / math.sqrt(2)))
    return torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)]).diff()


def lognormal_probs(schedule, p_mean=-1.2, p_std=1.2):
    """EDM log-normal: ln sigma ~ N(p_mean, p_std^2), sigma = sqrt((1-abar)/abar), mapped to the
    nearest discrete step in ln sigma: P(t) is the normal mass of t's bin (bin edges at midpoints)."""
    _check(p_std > 0, f"p_std must be > 0; got {p_std!r}")
    ls = schedule.sigma.log()
    return _normal_bin_probs(((ls[1:] + ls[:-1]) / 2 - p_mean) / p_std)


def logitnormal_probs(T, mean=0.0, std=1.0):
    """SD3 logit-normal: u ~ N(mean, std^2), t = round(sigmoid(u) (T-1)); P(t) exactly."""
    _check(std > 0, f"std must be > 0; got {std!r}")
    s = (torch.arange(T - 1, dtype=torch.float64) + 0.5) / (T - 1)  # bin edges in (0, 1)
    return _normal_bin_probs((torch.logit(s) - mean) / std)


class Strategy:
    """A time-step distribution `probs` (length T) and loss weights per target.

    sample(n, device, generator, target) -> (t, w): LongTensor of steps and float32 weights, on device.
    With dual=True (SpeeD option), half the batch is drawn from probs and the rest mirrored to
    |t - m| (official code; not in the paper): `probs` is then the marginal of a large even batch.
    """

    def __init__(self, name, schedule, probs, eps_weights=None, plain_weights=None, dual_m=None):
        self.name, self.schedule, self.T = name, schedule, schedule.T
        self._probs = probs / probs.sum()
        self._eps_weights = eps_weights        # weights defined in eps space (P2, Min-SNR)
        self._plain_weights = plain_weights    # multipliers of any target's MSE (SpeeD)
        self.dual_m = dual_m
        self._cache = {}

    @property
    def probs(self):
        """The distribution of one sampled step, float64 on the CPU (sums to 1)."""
        if self.dual_m is None:
            return self._probs.clone()
        mirror = torch.zeros_like(self._probs)
        mirror.index_add_(0, (torch.arange(self.T) - self.dual_m).abs(), self._probs)
        return (self._probs + mirror) / 2

    def weights(self, target="eps"):
        """Per-step loss weight w(t) for `target`, float64 of length T."""
        _check_choice("target", target, TARGETS)
        if self._eps_weights is not None:
            return self._eps_weights * _target_factor(self.schedule, target)
        if self._plain_weights is not None:
            return self._plain_weights.clone()
        return torch.ones(self.T, dtype=torch.float64)

    def _tables(self, device, target):
        key = (str(device), target)
        if key not in self._cache:
            cdf = self._probs.cumsum(0)
            self._cache[key] = ((cdf / cdf[-1]).to(device), self.weights(target).float().to(device))
        return self._cache[key]

    def _draw(self, n, device, generator, cdf):
        gdev = generator.device if generator is not None else device
        u = torch.rand(n, generator=generator, device=gdev, dtype=torch.float64).to(device)
        return torch.searchsorted(cdf, u, right=True).clamp_(max=self.T - 1)

    def sample(self, n, device=None, generator=None, target="eps"):
        _check(isinstance(n, int) and n >= 1, f"n must be an integer >= 1; got {n!r}")
        device = torch.device(device if device is not None else "cpu")
        cdf, w = self._tables(device, target)
        if self.dual_m is None:
            t = self._draw(n, device, generator, cdf)
        else:
            t = self._draw(n // 2 + 1, device, generator, cdf)
            t = torch.cat([t, (t - self.dual_m).abs()])[:n]
        return t, w[t]

    def weight_of(self, t, target="eps"):
        """Loss weights of given steps t (a LongTensor), on t's device."""
        return self._tables(t.device, target)[1][t]

    def area_shares(self, areas, target="eps"):
        """Share of sum_t P(t) w(t) in each area, a dict summing to 1: how much of the objective a
        strategy gives each area (how often times how strongly), before the losses' own sizes."""
        _check(isinstance(areas, Areas) and areas.T == self.T,
               f"areas must be find_areas(...) of a T={self.T} schedule")
        pw = self.probs * self.weights(target)
        s = torch.bincount(areas.label(torch.arange(self.T)), weights=pw, minlength=3)
        return dict(zip(AREA_NAMES, (s / s.sum()).tolist()))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def __repr__(self):
        return f"Strategy({self.name!r}, T={self.T})"


class LossAwareStrategy(Strategy):
    """Loss-aware importance sampling (improved DDPM, Nichol & Dhariwal 2021, Sec. 3.3):
    P(t) ~ sqrt(E[L_t^2]) over the last `history` losses of each t, mixed with `uniform_mix` of the
    uniform distribution; uniform until every t has `history` losses. Losses are reweighted by
    1 / (T P(t)) so the objective stays unbiased. Its state lives on one device; no host syncs."""

    def __init__(self, schedule, history=10, uniform_mix=1e-3):
        _check(isinstance(history, int) and history >= 1, f"history must be an integer >= 1; got {history!r}")
        _check(0 < uniform_mix <= 1, f"uniform_mix must be in (0, 1]; got {uniform_mix!r}")
        super().__init__("loss_aware", schedule, torch.ones(schedule.T, dtype=torch.float64))
        self.history, self.uniform_mix = history, uniform_mix
        self.losses = torch.zeros(schedule.T, history, dtype=torch.float64)
        self.counts = torch.zeros(schedule.T, dtype=torch.long)

    def _to(self, device):
        if self.losses.device != device:
            self.losses, self.counts = self.losses.to(device), self.counts.to(device)

    def _current(self):
        p = (self.losses ** 2).mean(1).sqrt()
        p = p / p.sum().clamp(min=1e-300)
        p = p * (1 - self.uniform_mix) + self.uniform_mix / self.T
        warm = (self.counts >= self.history).all()
        return torch.where(warm, p, torch.full_like(p, 1.0 / self.T))

    @property
    def probs(self):
        return self._current().cpu()

    def update(self, t, losses):
        """Record per-sample (unweighted) losses of the steps t. Vectorised ring buffer per step."""
        _check(torch.is_tensor(t) and torch.is_tensor(losses) and t.shape == losses.shape and t.ndim == 1,
               "t and losses must be 1-D tensors of the same length")
        self._to(t.device)
        t = t.long()
        ts, order = t.sort()
        first = torch.searchsorted(ts, ts)                       # first index of each run of equal t
        rank = torch.arange(len(ts), device=t.device) - first    # position within the run
        slot = (self.counts[ts] + rank) % self.history
        self.losses[ts, slot] = losses.detach()[order].to(self.losses.dtype)
        self.counts += torch.bincount(t, minlength=self.T)

    def weights(self, target="eps"):
        """w(t) = 1 / (T P(t)) for every target, float64 of length T."""
        _check_choice("target", target, TARGETS)
        return 1.0 / (self.T * self._current().cpu())

    def sample(self, n, device=None, generator=None, target="eps"):
        _check(isinstance(n, int) and n >= 1, f"n must be an integer >= 1; got {n!r}")
        _check_choice("target", target, TARGETS)
        device = torch.device(device if device is not None else "cpu")
        self._to(device)
        p = self._current()
        cdf = p.cumsum(0)
        t = self._draw(n, device, generator, cdf / cdf[-1])
        return t, (1.0 / (self.T * p[t])).float()

    def weight_of(self, t, target="eps"):
        _check_choice("target", target, TARGETS)
        self._to(t.device)
        return (1.0 / (self.T * self._current()[t])).float()

    def state_dict(self):
        return {"losses": self.losses.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state):
        device = self.losses.device
        self.losses, self.counts = state["losses"].to(device), state["counts"].to(device)


def make_strategy(name, schedule, **options):
    """Build a time-step strategy. Names and options (defaults from METHOD.md / the papers):

    uniform                                      t ~ U{0..T-1}, w = 1
    speed        k=5, tau=None, lam=0.6, dual=False, eps=0.1
                 tau=None finds it with find_areas(schedule, eps); lam=None disables weighting
    p2           k=1.0, gamma=1.0                w = 1 / (k + SNR)^gamma (eps space)
    min_snr      gamma=5.0                       w = min(SNR, gamma) / SNR (eps space)
    lognormal    p_mean=-1.2, p_std=1.2          EDM log-normal sigma, nearest discrete step
    logitnormal  mean=0.0, std=1.0               SD3 logit-normal, t = round(sigmoid(u) (T-1))
    loss_aware   history=10, uniform_mix=1e-3    improved-DDPM importance sampling; call .update()
    """
    _check_choice("name", name, STRATEGIES)
    _check(isinstance(schedule, Schedule), "schedule must be a Schedule (see make_schedule)")
    allowed = {"uniform": set(), "speed": {"k", "tau", "lam", "dual", "eps"}, "p2": {"k", "gamma"},
               "min_snr": {"gamma"}, "lognormal": {"p_mean", "p_std"}, "logitnormal": {"mean", "std"},
               "loss_aware": {"history", "uniform_mix"}}[name]
    unknown = set(options) - allowed
    _check(not unknown, f"unknown option(s) {sorted(unknown)} for strategy {name!r}; "
                        f"valid: {sorted(allowed) or 'none'}")
    T = schedule.T
    uniform = torch.ones(T, dtype=torch.float64)
    if name == "uniform":
        return Strategy(name, schedule, uniform)
    if name == "speed":
        tau = options.get("tau")
        if tau is None:
            tau = find_areas(schedule, options.get("eps", 0.1)).tau
        lam = options.get("lam", 0.6)
        probs = speed_probs(T, tau, options.get("k", 5))
        w = speed_weights(schedule, tau, lam) if lam is not None else None
        m = dual_step(schedule) if options.get("dual", False) else None
        s = Strategy(name, schedule, probs, plain_weights=w, dual_m=m)
        s.tau, s.k, s.lam = tau, options.get("k", 5), lam
        return s
    if name == "p2":
        k, gamma = options.get("k", 1.0), options.get("gamma", 1.0)
        _check(k > 0 and gamma >= 0, f"p2 needs k > 0 and gamma >= 0; got k={k!r}, gamma={gamma!r}")
        return Strategy(name, schedule, uniform, eps_weights=1.0 / (k + schedule.snr) ** gamma)
    if name == "min_snr":
        gamma = options.get("gamma", 5.0)
        _check(gamma > 0, f"gamma must be > 0; got {gamma!r}")
        snr = schedule.snr
        return Strategy(name, schedule, uniform, eps_weights=snr.clamp(max=gamma) / snr)
    if name == "lognormal":
        return Strategy(name, schedule, lognormal_probs(schedule, options.get("p_mean", -1.2),
                                                        options.get("p_std", 1.2)))
    if name == "logitnormal":
        return Strategy(name, schedule, logitnormal_probs(T, options.get("mean", 0.0), options.get("std", 1.0)))
    return LossAwareStrategy(schedule, options.get("history", 10), options.get("uniform_mix", 1e-3))


# ------------------------------------------------------------------------------------------------
# 7. Loss: weighted denoising MSE (DDPM "simple" loss times w(t)).
#    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; targets eps, x0 or v = sqrt(abar) eps - sqrt(1-abar) x0.
# ------------------------------------------------------------------------------------------------

def diffusion_loss(model, x0, schedule, strategy, target="eps", generator=None, t=None, noise=None,
                   **model_kwargs):
    """Returns (loss, info): loss = mean_i w(t_i) * mse_i, and info = {"t", "mse", "w"} with the
    per-sample unweighted MSE (detached) for loss-aware sampling and per-area curves.
    `model(x_t, t, **model_kwargs)` is any callable. Pass t and/or noise to fix them."""
    _check(torch.is_tensor(x0) and x0.is_floating_point() and x0.ndim >= 2,
           "x0 must be a float tensor with a batch dimension, e.g. [N, C, H, W]")
    _check_choice("target", target, TARGETS)
    _check(isinstance(schedule, Schedule), "schedule must be a Schedule (see make_schedule)")
    _check(isinstance(strategy, Strategy), "strategy must come from make_strategy")
    _check(strategy.T == schedule.T, f"strategy has T={strategy.T} but schedule has T={schedule.T}")
    n = x0.shape[0]
    if t is None:
        t, w = strategy.sample(n, x0.device, generator, target=target)
    else:
        t = torch.as_tensor(t, device=x0.device).long()
        w = strategy.weight_of(t, target)
    if noise is None:
        gdev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32).to(x0.device)
    sa, s1a = schedule.coefs(x0.device)
    shape = (n,) + (1,) * (x0.ndim - 1)
    a, s = sa[t].view(shape), s1a[t].view(shape)
    x0 = x0.float()
    x_t = a * x0 + s * noise
    goal = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[target]
    out = model(x_t, t, **model_kwargs)
    mse = ((out.float() - goal) ** 2).flatten(1).mean(1)
    loss = (w * mse).mean()
    return loss, {"t": t, "mse": mse.detach(), "w": w}


# ------------------------------------------------------------------------------------------------
# 8. Network: a compact DDPM-style UNet (Ho et al. 2020, Appendix B; scale-shift conditioning from
#    improved DDPM). Sinusoidal time embedding -> MLP; residual blocks with GroupNorm/SiLU;
#    self-attention (F.scaled_dot_product_attention) at the resolutions in attn_res; skip connections.
# ------------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000.0):
    """Transformer-style sinusoidal embedding of (integer or real) steps t -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def _norm(c):
    """GroupNorm with at most 32 groups and at least 2 channels a group (32 groups for c >= 64, as in
    DDPM); one channel a group would subtract away an added time embedding."""
    return nn.GroupNorm(math.gcd(32, max(c // 2, 1)), c)


def _zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout, scale_shift):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class Attention(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.heads, self.norm = heads, _norm(c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), _zero(nn.Conv2d(c, c, 1))

    def forward(self, x, emb=None):
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) x y -> three b h (x y) d",
                            three=3, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(o, "b h (x y) d -> b (h d) x y", x=x.shape[2]))


class Downsample(nn.Conv2d):
    def __init__(self, c):
        super().__init__(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return super().forward(x)


class Upsample(nn.Conv2d):
    def __init__(self, c):
        super().__init__(c, c, 3, padding=1)

    def forward(self, x, emb=None):
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Step(nn.ModuleList):
    """A few layers applied in order, each called as layer(x, emb)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    """DDPM UNet. forward(x, t, y=None) -> prediction with x's shape.

    x: [N, C, H, W] in about [-1, 1]; t: [N] integer steps; y: [N] class labels (if num_classes).
    """

    def __init__(self, img_channels=3, img_res=32, ch=128, ch_mult=(1, 2, 2, 2), num_blocks=2,
                 attn_res=(16,), dropout=0.1, num_classes=None, heads=1, scale_shift=True):
        super().__init__()
        _check(ch % 2 == 0 and ch >= 2, f"ch must be an even integer >= 2; got {ch!r}")
        _check(len(ch_mult) >= 1 and num_blocks >= 1, "ch_mult must be non-empty and num_blocks >= 1")
        _check(img_res % 2 ** (len(ch_mult) - 1) == 0,
               f"img_res must be divisible by 2^(len(ch_mult)-1) = {2 ** (len(ch_mult) - 1)}; got {img_res}")
        self.ch, self.img_channels, self.img_res, self.num_classes = ch, img_channels, img_res, num_classes
        emb_dim = 4 * ch
        block = lambda cin, cout: ResBlock(cin, cout, emb_dim, dropout, scale_shift)  # noqa: E731
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(img_channels, ch, 3, padding=1)
        self.down, self.up, skips, c, res = nn.ModuleList(), nn.ModuleList(), [ch], ch, img_res
        for i, m in enumerate(ch_mult):
            for _ in range(num_blocks):
                layers = [block(c, ch * m)]
                c = ch * m
                if res in attn_res:
                    layers.append(Attention(c, heads))
                self.down.append(Step(layers))
                skips.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(Step([Downsample(c)]))
                skips.append(c)
                res //= 2
        self.mid = Step([block(c, c), Attention(c, heads), block(c, c)])
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_blocks + 1):
                layers = [block(c + skips.pop(), ch * m)]
                c = ch * m
                if res in attn_res:
                    layers.append(Attention(c, heads))
                self.up.append(Step(layers))
            if i > 0:
                self.up.append(Step([Upsample(c)]))
                res *= 2
        self.out = nn.Sequential(_norm(c), nn.SiLU(), _zero(nn.Conv2d(c, img_channels, 3, padding=1)))

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if self.class_emb is not None:
            _check(y is not None, "this UNet is class-conditional: pass labels y")
            emb = emb + self.class_emb(y)
        h = self.stem(x)
        hs = [h]
        for step in self.down:
            h = step(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for step in self.up:
            if not isinstance(step[0], Upsample):
                h = torch.cat([h, hs.pop()], dim=1)
            h = step(h, emb)
        return self.out(h)


# Named sizes. Parameters and forward GFLOP per 32x32 RGB image (2 FLOP per multiply-add, counted
# with torch.utils.flop_counter on the CPU): see README "Model sizes" and bench/bench_train.py.
UNET_SIZES = {
    "tiny": dict(ch=32, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1),
    "small": dict(ch=64, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1),
    "ddpm": dict(ch=128, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1, scale_shift=False),
}


def make_unet(size="tiny", **overrides):
    """A UNet of a named size: tiny (2.4M parameters, 0.84 GFLOP per 32x32 image forward), small
    (9.6M, 3.2 GFLOP) or ddpm (35.7M, 12.4 GFLOP: the DDPM CIFAR-10 network). Keyword overrides
    (img_res, img_channels, num_classes, dropout...) win."""
    _check_choice("size", size, tuple(UNET_SIZES))
    return UNet(**{**UNET_SIZES[size], **overrides})


# ------------------------------------------------------------------------------------------------
# 9. Training: data as uint8 on the device, random flips on the device, AdamW with linear warm-up,
#    gradient clipping, EMA with warm-up, bf16 autocast (fp16 + GradScaler where bf16 is missing,
#    e.g. a Colab T4; fp32 on the CPU), optional torch.compile, channels-last, per-area loss logs,
#    atomic checkpoints that resume bit-for-bit.
# ------------------------------------------------------------------------------------------------

def pick_precision(device, precision="auto"):
    """'bf16' on GPUs with compute capability >= 8, 'fp16' on older GPUs, 'fp32' on the CPU."""
    _check_choice("precision", precision, ("auto", "bf16", "fp16", "fp32"))
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def _autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    e, m = [p for p in ema.parameters()], [p for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


@dataclass
class TrainResult:
    """What train() returns and passes to callbacks. history: one dict per log interval."""
    model: nn.Module
    ema: nn.Module
    step: int
    history: list
    extra: dict          # free space for callbacks (e.g. FID curves); saved in checkpoints
    strategy: Strategy
    schedule: Schedule


def _epoch_order(n, batch_size, seed, epoch, device):
    """Permutation and flip flags of one epoch, a pure function of (seed, epoch): the data order is
    the same for every strategy and survives resuming without saved state."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g, device=device), torch.rand(n, generator=g, device=device) < 0.5


def _save_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile


def train(model, images, schedule, strategy, *, steps, batch_size=128, lr=2e-4, warmup=500,
          grad_clip=1.0, weight_decay=0.0, ema_decay=0.9999, target="eps", labels=None,
          precision="auto", compile=False, channels_last=None, flip=True, seed=0, device=None,
          log_every=100, callback=None, callback_every=0, ckpt_path=None, ckpt_every=0, resume=True,
          progress=True):
    """Train `model` (called as model(x_t, t) or model(x_t, t, y=labels)) on uint8 `images` [N,C,H,W].

    The schedule and strategy decide the noise levels and loss weights; everything else is a plain,
    fast DDPM training loop. Returns a TrainResult. With ckpt_path, a checkpoint (model, EMA,
    optimizer, scaler, step, strategy state, RNG states, history, extra) is written atomically every
    ckpt_every steps and at the end; with resume=True an existing checkpoint is continued, and the
    continued run matches an uninterrupted one exactly. callback(result) runs every callback_every
    steps and after the last step; if it returns True, training stops there (checkpointed).
    compile: False, True (torch.compile's default mode) or a torch.compile mode name such as
    "reduce-overhead" (CUDA graphs: removes the per-kernel launch cost that bounds small models).
    Seeds torch's global RNG (used by dropout) with `seed`.
    """
    _check(isinstance(model, nn.Module), "model must be a torch.nn.Module")
    _check(torch.is_tensor(images) and images.dtype == torch.uint8 and images.ndim == 4,
           "images must be a uint8 tensor [N, C, H, W] with values 0..255")
    _check(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1; got {steps!r}")
    _check(isinstance(batch_size, int) and 1 <= batch_size <= len(images),
           f"batch_size must be an integer in [1, number of images = {len(images)}]; got {batch_size!r}")
    _check(lr > 0, f"lr must be > 0; got {lr!r}")
    _check(0 <= ema_decay < 1, f"ema_decay must be in [0, 1); got {ema_decay!r}")
    _check(isinstance(warmup, int) and warmup >= 0, f"warmup must be an integer >= 0; got {warmup!r}")
    _check(labels is None or (torch.is_tensor(labels) and labels.shape == (len(images),)),
           "labels must be None or a LongTensor [N] matching images")
    _check(isinstance(strategy, Strategy) and strategy.T == schedule.T,
           "strategy must come from make_strategy with the same T as schedule")
    _check_choice("target", target, TARGETS)
    _check(compile in (False, True) or compile in COMPILE_MODES,
           f"compile must be False, True or one of {COMPILE_MODES}; got {compile!r}")
    device = torch.device(device) if device is not None else _default_device()
    precision = pick_precision(device, precision)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    model = model.to(device, memory_format=fmt)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    g_time = torch.Generator(device=device).manual_seed(seed + 1)
    g_noise = torch.Generator(device=device).manual_seed(seed + 2)
    torch.manual_seed(seed)
    history, extra, start = [], {}, 0
    config = dict(batch_size=batch_size, seed=seed, strategy=strategy.name, T=schedule.T, target=target)

    if ckpt_path and resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check(ck["config"] == config, f"checkpoint {ckpt_path} was made with {ck['config']}, not "
                                       f"{config}; use another ckpt_path or resume=False")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        strategy.load_state_dict(ck["strategy"])
        g_time.set_state(ck["rng"]["time"])
        g_noise.set_state(ck["rng"]["noise"])
        torch.set_rng_state(ck["rng"]["cpu"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        history, extra, start = ck["history"], ck["extra"], ck["step"]

    def checkpoint(step):
        rng = dict(time=g_time.get_state(), noise=g_noise.get_state(), cpu=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        _save_atomic(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                          scaler=scaler.state_dict(), step=step, strategy=strategy.state_dict(),
                          rng=rng, history=history, extra=extra, config=config), ckpt_path)

    net = torch.compile(model, mode=compile if isinstance(compile, str) else None) if compile else model
    images = images.to(device)
    labels = labels.to(device) if labels is not None else None
    areas = find_areas(schedule)
    n, per_epoch = len(images), len(images) // batch_size
    sums = torch.zeros(4, device=device)     # weighted loss, then unweighted mse per area
    counts = torch.zeros(4, device=device)
    ones = torch.ones(batch_size, device=device)
    epoch, order, flips = -1, None, None
    result = TrainResult(model, ema, start, history, extra, strategy, schedule)
    bar = _progress(total=steps, initial=start, disable=not progress, unit="step")
    tick, tick_step = time.perf_counter(), start
    model.train()
    for step in range(start, steps):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order, flips = _epoch_order(n, batch_size, seed, epoch, device)
        idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
        x = images[idx].float().div_(127.5).sub_(1.0)
        if flip:
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(3), x)
        x = x.contiguous(memory_format=fmt)
        kwargs = {"y": labels[idx]} if labels is not None else {}
        t, _ = strategy.sample(batch_size, device, g_time, target=target)
        noise = torch.randn(x.shape, generator=g_noise, device=device).contiguous(memory_format=fmt)
        with _autocast(device, precision):
            loss, info = diffusion_loss(net, x, schedule, strategy, target, t=t, noise=noise, **kwargs)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        if hasattr(strategy, "update"):
            strategy.update(info["t"], info["mse"])
        lab = areas.label(info["t"]) + 1
        sums[0] += loss.detach()
        counts[0] += 1
        sums.index_add_(0, lab, info["mse"])
        counts.index_add_(0, lab, ones)

        done = step + 1
        at_ckpt = ckpt_path and ckpt_every and done % ckpt_every == 0
        if done % log_every == 0 or done == steps or at_ckpt:
            s, c = (sums / counts.clamp(min=1)).tolist(), counts.tolist()
            if not math.isfinite(s[0]):
                raise RuntimeError(f"loss became {s[0]} at step {done}: lower lr (now {lr}), keep grad_clip, "
                                   f"or try precision='fp32'")
            now = time.perf_counter()
            rec = dict(step=done, loss=s[0], img_per_s=(done - tick_step) * batch_size / max(now - tick, 1e-9),
                       lr=opt.param_groups[0]["lr"])
            rec.update({f"mse_{a}": (s[i + 1] if c[i + 1] else float("nan")) for i, a in enumerate(AREA_NAMES)})
            history.append(rec)
            bar.set_postfix(loss=f"{s[0]:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            sums.zero_()
            counts.zero_()
            tick, tick_step = now, done
        bar.update(1)
        result.step = done
        stop = False
        if callback is not None and ((callback_every and done % callback_every == 0) or done == steps):
            model.eval()
            stop = bool(callback(result))
            model.train()
        if at_ckpt or (ckpt_path and (done == steps or stop)):
            checkpoint(done)
        if stop:
            break
    bar.close()
    model.eval()
    return result


def _progress(**kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for people who copy this file
        class tqdm:  # noqa: N801
            def __init__(self, **kw): pass
            def update(self, n=1): pass
            def set_postfix(self, **kw): pass
            def close(self): pass
    return tqdm(**kwargs)


# ------------------------------------------------------------------------------------------------
# 10. Samplers: DDIM (Song et al. 2021, eq. 12) with eta; eta = 1 over all T steps is DDPM ancestral
#     sampling with the posterior variance beta~_t (Ho et al. 2020, Algorithm 2).
# ------------------------------------------------------------------------------------------------

def _to_eps_x0(out, x, ab, target):
    a, s = ab ** 0.5, (1 - ab) ** 0.5
    if target == "eps":
        return out, (x - s * out) / a
    if target == "x0":
        return (x - a * out) / s, out
    return s * x + a * out, a * x - s * out  # v-prediction


@torch.no_grad()
def ddim_sample(model, schedule, n, shape=(3, 32, 32), steps=50, eta=0.0, target="eps", labels=None,
                generator=None, device=None, batch_size=500, precision="auto", clip=True, progress=False):
    """Generate n images with `steps` DDIM steps (evenly spaced over 0..T-1). Returns uint8
    [n, *shape] on `device`. Deterministic for a given generator (its device is used for noise)."""
    _check(isinstance(n, int) and n >= 1, f"n must be an integer >= 1; got {n!r}")
    _check(isinstance(steps, int) and 1 <= steps <= schedule.T,
           f"steps must be an integer in [1, T = {schedule.T}]; got {steps!r}")
    _check(0 <= eta <= 1, f"eta must be in [0, 1]; got {eta!r}")
    _check(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be >= 1; got {batch_size!r}")
    _check_choice("target", target, TARGETS)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = pick_precision(device, precision)
    ts = torch.linspace(schedule.T - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive().tolist()
    ab_all = schedule.alpha_bar.tolist()
    gdev = generator.device if generator is not None else device
    out = []
    bar = _progress(total=n, disable=not progress, unit="img", desc="sampling")
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        x = torch.randn((b, *shape), generator=generator, device=gdev).to(device)
        kwargs = {"y": labels[i:i + b].to(device)} if labels is not None else {}
        for j, t in enumerate(ts):
            ab = ab_all[t]
            ab_prev = ab_all[ts[j + 1]] if j + 1 < len(ts) else 1.0
            with _autocast(device, precision):
                pred = model(x, torch.full((b,), t, device=device, dtype=torch.long), **kwargs).float()
            eps, x0 = _to_eps_x0(pred, x, ab, target)
            if clip:
                x0 = x0.clamp(-1, 1)
                eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
            x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=gdev).to(device)
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        bar.update(b)
    bar.close()
    return torch.cat(out)


def ddpm_sample(model, schedule, n, **kwargs):
    """DDPM ancestral sampling over all T steps (= DDIM with eta = 1 and steps = T)."""
    return ddim_sample(model, schedule, n, steps=schedule.T, eta=1.0, **kwargs)


# ------------------------------------------------------------------------------------------------
# 11. Quality: Frechet distance between Gaussians fitted to features (Heusel et al. 2017):
#     FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64, with
#     tr((S1 S2)^(1/2)) = sum of singular values of S1^(1/2) S2^(1/2) (square roots by eigh): no
#     non-symmetric sqrtm, and no squared condition number.
#     FID = FD in the pool features of the standard TF-Inception network (StyleGAN2-ADA / EDM
#     TorchScript port); any TorchScript net mapping [0, 255] images to features works the same way.
# ------------------------------------------------------------------------------------------------

def feature_stats(feats):
    """(mean, covariance) of features [N, D] in float64 (unbiased covariance)."""
    _check(torch.is_tensor(feats) and feats.ndim == 2 and feats.shape[0] >= 2,
           "feats must be a tensor [N >= 2, D]")
    f = feats.double().cpu()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(s):
    ev, vec = torch.linalg.eigh(s)
    return (vec * ev.clamp(min=0).sqrt()) @ vec.T


def frechet_distance(a, b):
    """Frechet distance between two feature sets [N, D] or two (mean, covariance) pairs."""
    def stats(x):
        return feature_stats(x) if torch.is_tensor(x) else (x[0].double().cpu(), x[1].double().cpu())
    (mu1, s1), (mu2, s2) = stats(a), stats(b)
    _check(mu1.shape == mu2.shape, f"feature sizes differ: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    tr_sqrt = torch.linalg.svdvals(_sqrtm_psd(s1) @ _sqrtm_psd(s2)).sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# Not pinned: the file could not be fetched where this was written to hash it. On first download its
# sha256 is recorded next to it and checked on every later load; pass sha256=... to pin it yourself.
INCEPTION_SHA256 = None


class FeatureNet:
    """A feature extractor for Frechet distances: __call__(images) with images [N, C, H, W] as uint8
    (or floats in [0, 255]) -> float features [N, D]. kind 'inception' calls the StyleGAN2-ADA
    TorchScript Inception as net(uint8_images, return_features=True) (2048-d pool features; it resizes
    to 299 itself); kind 'generic' calls net(float_images_0_255)."""

    def __init__(self, net, kind="generic", name="net"):
        _check_choice("kind", kind, ("inception", "generic"))
        self.net, self.kind, self.name = net, kind, name

    def to(self, device):
        self.net = self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images):
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.kind == "inception":
            return self.net(images.round().clamp(0, 255).to(torch.uint8), return_features=True).float()
        return self.net(images.float()).float()


def _digest(path, algo):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256=None, md5=None, progress=True):
    """Download url to path once: atomically (a .part file renamed at the end), sha256 / md5 verified
    when given; on mismatch the partial file is deleted and a ValueError raised."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = f"{path}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            bar = _progress(total=total or None, unit="B", unit_scale=True, disable=not progress,
                            desc=os.path.basename(path))
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
            bar.close()
        for algo, want in (("sha256", sha256), ("md5", md5)):
            got = _digest(part, algo) if want else None
            if want and got != want:
                raise ValueError(f"checksum mismatch for {url}: expected {algo} {want}, got {got}")
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return path


def load_feature_net(name_or_path="inception", cache_dir=None, sha256=None, kind=None, device="cpu",
                     url=INCEPTION_URL):
    """'inception' -> the standard FID Inception-v3 (TorchScript), read from cache_dir or downloaded
    there once; a path -> that TorchScript file ('inception' kind if its name starts with
    'inception', else 'generic', e.g. ../shared/metrics/cifar10-fdnet.pt)."""
    if name_or_path == "inception":
        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "speed")
        path = os.path.join(cache_dir, "inception-2015-12-05.pt")
        if not os.path.exists(path):
            try:
                download(url, path, sha256 or INCEPTION_SHA256)
            except OSError as e:
                raise RuntimeError(f"could not download the Inception network from {url} ({e}). Without "
                                   f"internet, put inception-2015-12-05.pt in {cache_dir} or pass a "
                                   f"TorchScript feature net path instead.") from e
        kind = kind or "inception"
    else:
        path = name_or_path
        _check(os.path.isfile(path), f"feature net {path!r} is neither 'inception' nor an existing file")
        kind = kind or ("inception" if os.path.basename(path).startswith("inception") else "generic")
    digest, stamp = _digest(path, "sha256"), path + ".sha256"
    want = sha256 or (open(stamp).read().strip() if os.path.exists(stamp) else None)
    _check(want is None or digest == want, f"{path} has sha256 {digest}, expected {want}")
    if want is None and name_or_path == "inception":
        with open(stamp, "w") as f:
            f.write(digest)
    net = torch.jit.load(path, map_location=device).eval()
    return FeatureNet(net, kind, name=f"{os.path.basename(path)}:{digest[:12]}")


@torch.no_grad()
def compute_features(net, images, batch_size=500, device=None, progress=False):
    """Features [N, D] (float64, CPU) of uint8 images [N, C, H, W] in batches on `device`."""
    _check(torch.is_tensor(images) and images.ndim == 4, "images must be a tensor [N, C, H, W]")
    device = torch.device(device) if device is not None else images.device
    out = []
    for i in _progress(iterable=range(0, len(images), batch_size), disable=not progress, desc="features"):
        out.append(net(images[i:i + batch_size].to(device)).double().cpu())
    return torch.cat(out)


def reference_stats(net, images, cache_path=None, batch_size=500, device=None):
    """(mean, covariance) of a dataset's features, cached in cache_path (keyed by the net and the
    number and a checksum of the images) so it is computed once."""
    sample = images[:: max(1, len(images) // 64)].cpu().numpy().tobytes()
    key = f"{net.name}|{len(images)}|{hashlib.sha256(sample).hexdigest()[:16]}"
    if cache_path and os.path.exists(cache_path):
        cached = torch.load(cache_path, weights_only=True)
        if cached.get("key") == key:
            return cached["mu"], cached["sigma"]
    stats = feature_stats(compute_features(net, images, batch_size, device))
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        _save_atomic({"key": key, "mu": stats[0], "sigma": stats[1]}, cache_path)
    return stats


def fd_of_samples(net, samples, ref, batch_size=500):
    """Frechet distance of uint8 samples to reference stats (mean, covariance)."""
    return frechet_distance(feature_stats(compute_features(net, samples, batch_size)), ref)
