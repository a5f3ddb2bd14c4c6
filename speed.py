"""SpeeD: faster diffusion training by looking closely at time steps.

A reference implementation of Kai Wang, Mingjia Shi, Yukun Zhou, et al. "A Closer Look at Time Steps is Worthy of
Triple Speed-Up for Diffusion Model Training", arXiv:2405.17403 (2024). The model is left alone: the steps t = 0 ... T-1
are split into acceleration, deceleration and convergence areas by how fast the forward process changes; convergence
steps are sampled less often, fast-changing steps weighted more (docs/method.md derives the formulas). Part I, the
method: 1 schedule, 2 increments, 3 areas, 4 asymmetric sampling, 5 change-aware weighting, 6 strategies, 7 loss.
Part II, a small testbed: 8 UNet, 9 training, 10 samplers, 11 Frechet distance."""

import contextlib, copy, inspect, json, math, os, signal, threading, time  # noqa: E401
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

SCHEDULES = ("linear", "cosine", "quadratic")
TARGETS = ("eps", "x0", "v")
AREA_NAMES = ("acceleration", "deceleration", "convergence")

def _check(ok, message):  # public functions validate their arguments: ValueError naming the argument
    if not ok:
        raise ValueError(message)
def _is_int(x, lo=-math.inf, hi=math.inf):
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi
def _is_num(x, lo=-math.inf, hi=math.inf):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi
def _check_choice(name, value, choices):
    _check(value in choices, f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
def _check_schedule(schedule):
    _check(isinstance(schedule, Schedule), "schedule must be a Schedule (see make_schedule)")
def _check_tau(tau, T):
    _check(_is_int(tau, 1, T - 1), f"tau must be an integer in [1, T-1] = [1, {T - 1}]; got {tau!r}")
def _check_threshold(threshold):
    _check(_is_num(threshold) and threshold > 0, f"threshold must be a number > 0; got {threshold!r}")
# ================================================= PART I: THE METHOD =================================================
# ---- 1. Schedule: the discrete DDPM forward process (Ho et al. 2020, eq. 4) ------------------------------------------
#      x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   abar_t = prod_{s<=t} (1 - beta_s)
@dataclass
class Schedule:
    """A discrete noise schedule: float64 CPU tensors of length T."""
    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    T: int
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas):  # any 1-D sequence of betas in (0, 1)
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        _check(betas.ndim == 1 and betas.numel() >= 2, f"betas must be 1-D of length T >= 2; got {tuple(betas.shape)}")
        _check(bool(((betas > 0) & (betas < 1)).all()), "betas must lie in the open interval (0, 1)")
        return cls(betas, 1.0 - betas, torch.cumprod(1.0 - betas, 0), betas.numel())

    snr = property(lambda self: self.alpha_bar / (1.0 - self.alpha_bar))  # signal-to-noise ratio abar_t / (1 - abar_t)
    sigma = property(lambda self: self.snr.rsqrt())  # EDM's noise level sqrt((1 - abar_t) / abar_t) = SNR_t^(-1/2)

    def scales(self, device):  # (sqrt(abar_t), sqrt(1 - abar_t)): signal and noise scales, float32, cached per device
        key, ab = str(torch.device(device)), self.alpha_bar
        if key not in self._on_device:
            self._on_device[key] = (ab.sqrt().float().to(device), (1 - ab).sqrt().float().to(device))
        return self._on_device[key]

def make_schedule(kind="linear", T=1000):
    """linear: beta from 1e-4 to 0.02 at T = 1000 (DDPM), scaled by 1000/T for other T (improved DDPM): one process.
    cosine: Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999. quadratic: sqrt(beta) linear between those ends."""
    _check_choice("kind", kind, SCHEDULES)
    _check(_is_int(T, 2), f"T must be an integer >= 2; got {T!r}")
    if kind == "cosine":
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        return Schedule.from_betas((1 - f[1:] / f[:-1]).clamp(max=0.999))
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    _check(hi < 1, f"T must be >= 21 for the {kind} schedule (its largest beta is 20/T); got {T}")
    if kind == "linear":
        return Schedule.from_betas(torch.linspace(lo, hi, T, dtype=torch.float64))
    return Schedule.from_betas(torch.linspace(lo ** 0.5, hi ** 0.5, T, dtype=torch.float64) ** 2)
# ---- 2. Process increments (the paper's analysis of delta_t = x_{t+1} - x_t given x_0) -------------------------------
#      From x_{t+1} = sqrt(alpha_{t+1}) x_t + sqrt(beta_{t+1}) z: E[delta_t | x0] = (sqrt(alpha_{t+1}) - 1) sqrt(abar_t)
#      x0 and, per dimension, Var[delta_t | x0] = (1 - sqrt(alpha_{t+1}))^2 (1 - abar_t) + beta_{t+1}.
def increment_stats(schedule):
    """Closed form (mean_coef, var), float64 of length T-1: E[delta_t|x0] = mean_coef[t] x0."""
    _check_schedule(schedule)
    sa_next, ab = schedule.alphas[1:].sqrt(), schedule.alpha_bar[:-1]
    return (sa_next - 1.0) * ab.sqrt(), (1.0 - sa_next) ** 2 * (1.0 - ab) + schedule.betas[1:]

def increment_stats_mc(schedule, x0, generator=None):
    """Monte-Carlo (mean_coef, var) along the chain from x0: least-squares slope of delta_t on x0, residual variance."""
    _check_schedule(schedule)
    _check(torch.is_tensor(x0) and x0.is_floating_point() and x0.ndim >= 2, "x0 must be a float tensor [N, ...]")
    x0 = x0.double().flatten()
    a, b = schedule.alphas.to(x0.device).sqrt(), schedule.betas.to(x0.device).sqrt()
    x, stats = x0, []
    for t in range(schedule.T):  # x: the chain's state at step t
        x_prev, x = x, a[t] * x + b[t] * torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        if t > 0:
            c = ((x - x_prev) * x0).sum() / (x0 * x0).sum()
            stats.append(torch.stack([c, ((x - x_prev - c * x0) ** 2).mean()]))
    return tuple(torch.stack(stats).cpu().T)
# ---- 3. Areas (the paper's acceleration / deceleration / convergence split) ------------------------------------------
#      acceleration: t < t_peak = argmax g; deceleration: t_peak <= t < tau; convergence: t >= tau, the first t after
#      t_peak with T g_t < threshold: a rate per unit of t/T (0.1 = the paper's 1e-4 per step at T = 1000), for any T.
def change_rate(schedule):
    """How fast the process changes, as in the official code: g_t = d(1 - abar_t)/dt per step, central differences."""
    _check_schedule(schedule)
    return torch.gradient(1.0 - schedule.alpha_bar)[0]

@dataclass
class Areas:
    """The three areas of a schedule: step indices t_peak and tau, and the change rate per step."""
    t_peak: int
    tau: int
    T: int
    rate: torch.Tensor

    def label(self, t):  # 0 = acceleration, 1 = deceleration, 2 = convergence, for each t
        t = torch.as_tensor(t)
        return (t >= self.t_peak).long() + (t >= self.tau).long()
    def name(self, t):  # the area's name of one step t
        return AREA_NAMES[int(self.label(int(t)))]
    def fractions(self):  # share of the T steps in each area
        n = torch.bincount(self.label(torch.arange(self.T)), minlength=3).double() / self.T
        return dict(zip(AREA_NAMES, n.tolist()))

def find_areas(schedule, threshold=0.1):
    """Linear, T = 1000: t_peak = 219, tau = 698 (the paper: 700); cosine: tau = 979. tau = T - 1 if g stays high."""
    _check_threshold(threshold)
    g, T = change_rate(schedule), schedule.T
    t_peak = int(g.argmax())
    below = ((torch.arange(T) > t_peak) & (g * T < threshold)).nonzero()
    return Areas(t_peak=t_peak, tau=max(int(below[0]) if len(below) else T - 1, 1), T=T, rate=g)
# ---- 4. Asymmetric sampling (paper): steps below tau are k times as likely as convergence steps ----------------------
#      P(t) = k / (T + tau (k - 1)) for t < tau and 1 / (T + tau (k - 1)) for t >= tau.
def speed_probs(T, tau, k=5):
    """P(t), float64 of length T, summing to 1. k = 1 is uniform."""
    _check(_is_int(T, 2), f"T must be an integer >= 2; got {T!r}")
    _check_tau(tau, T)
    _check(_is_num(k, 1), f"k must be a finite number >= 1; got {k!r}")
    p = torch.ones(T, dtype=torch.float64)
    p[:tau] = k
    return p / (T + tau * (k - 1))

def dual_step(schedule):
    """The official code's "dual sampling" m: 1 + the first t with T d sqrt(1 - abar_t)/dt < 0.1 (linear: m = 642)."""
    d = torch.gradient((1.0 - schedule.alpha_bar).sqrt())[0] * schedule.T
    return int((d < 0.1).int().argmax()) + 1
# ---- 5. Change-aware weighting (paper): below tau, g_t rescaled into [1 - lam, lam]; from tau on, w_t = 1 ------------
def speed_weights(schedule, tau, lam=0.6):
    """w_t, float64 of length T (min and max of g over t < tau). lam in [0.5, 1]; 0.5 gives w = 0.5 below tau."""
    _check_schedule(schedule)
    _check_tau(tau, schedule.T)
    _check(_is_num(lam, 0.5, 1), f"lam must be a number in [0.5, 1] (or None for no weighting); got {lam!r}")
    g = change_rate(schedule)[:tau]
    w = torch.ones(schedule.T, dtype=torch.float64)
    w[:tau] = (1 - lam) + (2 * lam - 1) * (g - g.min()) / (g.max() - g.min()).clamp(min=1e-30)
    return w
# ---- 6. Strategies: a distribution P(t) over steps and a loss weight w(t) --------------------------------------------
#      One sampler for all (inverse-CDF search on the device); one builder per strategy, its defaults (the published
#      values) in its signature. P2 and Min-SNR weight eps-prediction; for x0 or v targets they are converted to the
#      same objective: |e_eps|^2 = SNR |e_x0|^2 = SNR / (SNR + 1) |e_v|^2.
def _normal_bin_probs(z):  # standard-normal mass of the len(z) + 1 bins between sorted edges z
    cdf = 0.5 * (1 + torch.special.erf(z / math.sqrt(2)))
    return torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)]).diff()

class Strategy:
    """P(t) and w(t); `config` names the strategy and all its options. With dual_m (SpeeD's dual sampling, official code
    only) half a batch is drawn from P and mirrored to |t - m|; `probs` is then the marginal of a large even batch."""
    def __init__(self, config, schedule, probs, weights=None, eps_space=False, dual_m=None):
        self.config, self.name, self.schedule, self.T, self._tables = config, config["name"], schedule, schedule.T, {}
        self._probs, self._weights, self._eps_space, self.dual_m = probs / probs.sum(), weights, eps_space, dual_m

    @property
    def probs(self):  # P(a sampled step = t), float64 on the CPU
        if self.dual_m is None:
            return self._probs.clone()
        mirror = torch.zeros_like(self._probs).index_add_(0, (torch.arange(self.T) - self.dual_m).abs(), self._probs)
        return (self._probs + mirror) / 2

    def weights(self, target="eps"):  # w(t) for `target`, float64 of length T (eps-space weights converted)
        _check_choice("target", target, TARGETS)
        w = self._weights if self._weights is not None else torch.ones(self.T, dtype=torch.float64)
        snr = self.schedule.snr
        return w * {"eps": 1.0, "x0": snr, "v": snr / (snr + 1)}[target] if self._eps_space else w.clone()

    def _table(self, device, target):  # (CDF of P, w) on `device`, built once
        if (str(device), target) not in self._tables:
            cdf = self._probs.cumsum(0)
            self._tables[str(device), target] = ((cdf / cdf[-1]).to(device), self.weights(target).float().to(device))
        return self._tables[str(device), target]

    def sample(self, n, device=None, generator=None, target="eps"):
        """n steps and their weights: (LongTensor t, float32 w) on `device`."""
        _check(_is_int(n, 1), f"n must be an integer >= 1; got {n!r}")
        _check_choice("target", target, TARGETS)
        device = torch.device(device if device is not None else "cpu")
        cdf, w = self._table(device, target)
        u = torch.rand(n if self.dual_m is None else n // 2 + 1, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else device).to(device)
        t = torch.searchsorted(cdf, u, right=True).clamp_(max=self.T - 1)
        t = t if self.dual_m is None else torch.cat([t, (t - self.dual_m).abs()])[:n]
        return t, w[t]

    def weight_of(self, t, target="eps"):  # weights of given steps t, on t's device
        return self._table(t.device, target)[1][t]

    def area_shares(self, areas, target="eps"):
        """Each area's share of sum_t P(t) w(t): how much of the objective the strategy gives it."""
        _check(isinstance(areas, Areas) and areas.T == self.T, f"areas must be find_areas() of a T={self.T} schedule")
        s = torch.bincount(areas.label(torch.arange(self.T)), weights=self.probs * self.weights(target), minlength=3)
        return dict(zip(AREA_NAMES, (s / s.sum()).tolist()))

    def state_dict(self):  # a strategy with state (loss-aware) saves it with the checkpoint
        return {}
    def load_state_dict(self, state):
        pass

class LossAwareStrategy(Strategy):
    """Improved DDPM's loss-aware sampling (Nichol & Dhariwal 2021, Sec. 3.3): P(t) ~ sqrt(E[L_t^2]) over t's last
    `history` losses, mixed with `uniform_mix` of uniform (uniform until all t have `history`); w = 1 / (T P(t))."""
    def __init__(self, config, schedule, history, uniform_mix):
        super().__init__(config, schedule, torch.ones(schedule.T, dtype=torch.float64))
        self.history, self.uniform_mix = history, uniform_mix
        self.losses, self.counts = torch.zeros(schedule.T, history, dtype=torch.float64), torch.zeros(schedule.T).long()

    def _current(self, device):  # P(t), computed on `device` (the buffers move there)
        self.losses, self.counts = self.losses.to(device), self.counts.to(device)
        p = (self.losses ** 2).mean(1).sqrt()
        p = p / p.sum().clamp(min=1e-300) * (1 - self.uniform_mix) + self.uniform_mix / self.T
        return torch.where((self.counts >= self.history).all(), p, torch.full_like(p, 1.0 / self.T))

    def _table(self, device, target):
        _check_choice("target", target, TARGETS)
        p = self._current(device)
        cdf = p.cumsum(0)
        return cdf / cdf[-1], (1.0 / (self.T * p)).float()

    probs = property(lambda self: self._current(self.losses.device).cpu())
    def weights(self, target="eps"):
        _check_choice("target", target, TARGETS)
        return 1.0 / (self.T * self.probs)

    def update(self, t, losses):  # per-sample unweighted losses of steps t into a ring buffer per step
        _check(torch.is_tensor(t) and torch.is_tensor(losses) and t.ndim == 1 and t.shape == losses.shape,
               "t and losses must be 1-D tensors of the same length")
        self._current(t.device)
        ts, order = t.long().sort()
        rank = torch.arange(len(ts), device=t.device) - torch.searchsorted(ts, ts)  # position among equal t
        self.losses[ts, (self.counts[ts] + rank) % self.history] = losses.detach()[order].to(self.losses.dtype)
        self.counts.index_add_(0, ts, torch.ones_like(ts))

    def state_dict(self):
        return {"losses": self.losses.cpu(), "counts": self.counts.cpu()}
    def load_state_dict(self, state):
        self.losses, self.counts = state["losses"].to(self.losses.device), state["counts"].to(self.losses.device)

def uniform_strategy(schedule):
    """t ~ U{0 ... T-1}, w = 1: the DDPM baseline."""
    return Strategy(dict(name="uniform"), schedule, torch.ones(schedule.T, dtype=torch.float64))

def speed_strategy(schedule, k=5, tau=None, lam=0.6, dual=False, threshold=0.1):
    """SpeeD: asymmetric sampling (k, tau: by default find_areas' tau), change-aware weighting (lam), dual sampling."""
    _check(isinstance(dual, bool), f"dual must be True or False; got {dual!r}")
    _check_threshold(threshold)
    tau = find_areas(schedule, threshold).tau if tau is None else tau
    return Strategy(dict(name="speed", k=k, tau=tau, lam=lam, dual=dual, threshold=threshold), schedule,
                    speed_probs(schedule.T, tau, k), speed_weights(schedule, tau, lam) if lam is not None else None,
                    dual_m=dual_step(schedule) if dual else None)

def _p2_weights(schedule, k, gamma):
    _check(_is_num(k) and k > 0 and _is_num(gamma, 0), f"p2 needs k > 0 and gamma >= 0; got k={k!r}, gamma={gamma!r}")
    return 1.0 / (k + schedule.snr) ** gamma
def p2_strategy(schedule, k=1.0, gamma=1.0):
    """P2 weighting (Choi et al. 2022): w = 1 / (k + SNR)^gamma in eps space; t uniform."""
    return Strategy(dict(name="p2", k=k, gamma=gamma), schedule, torch.ones(schedule.T, dtype=torch.float64),
                    _p2_weights(schedule, k, gamma), eps_space=True)

def min_snr_strategy(schedule, gamma=5.0):
    """Min-SNR-gamma (Hang et al. 2023): w = min(SNR, gamma) / SNR in eps space; t uniform."""
    _check(_is_num(gamma) and gamma > 0, f"gamma must be a number > 0; got {gamma!r}")
    return Strategy(dict(name="min_snr", gamma=gamma), schedule, torch.ones(schedule.T, dtype=torch.float64),
                    schedule.snr.clamp(max=gamma) / schedule.snr, eps_space=True)

def lognormal_strategy(schedule, p_mean=-1.2, p_std=1.2):
    """EDM (Karras et al. 2022): ln sigma ~ N(p_mean, p_std^2) moved to the nearest step: P(t) is its bin's mass."""
    _check(_is_num(p_mean) and _is_num(p_std) and p_std > 0, f"lognormal needs p_std > 0; got {p_std!r}")
    ls = schedule.sigma.log()
    return Strategy(dict(name="lognormal", p_mean=p_mean, p_std=p_std), schedule,
                    _normal_bin_probs(((ls[1:] + ls[:-1]) / 2 - p_mean) / p_std))

def logitnormal_strategy(schedule, mean=0.0, std=1.0):
    """SD3 (Esser et al. 2024): u ~ N(mean, std^2), t = round(sigmoid(u) (T - 1)); P(t) exactly."""
    _check(_is_num(mean) and _is_num(std) and std > 0, f"logitnormal needs std > 0; got {std!r}")
    edges = (torch.arange(schedule.T - 1, dtype=torch.float64) + 0.5) / (schedule.T - 1)
    return Strategy(dict(name="logitnormal", mean=mean, std=std), schedule,
                    _normal_bin_probs((torch.logit(edges) - mean) / std))

def loss_aware_strategy(schedule, history=10, uniform_mix=1e-3):
    """Improved-DDPM importance sampling; train() calls strategy.update(t, mse) after each step."""
    _check(_is_int(history, 1), f"history must be an integer >= 1; got {history!r}")
    _check(_is_num(uniform_mix) and 0 < uniform_mix <= 1, f"uniform_mix must be in (0, 1]; got {uniform_mix!r}")
    config = dict(name="loss_aware", history=history, uniform_mix=uniform_mix)
    return LossAwareStrategy(config, schedule, history, uniform_mix)

def speedit_strategy(schedule, k=5, tau=None, threshold=0.1, p2_k=1.0, p2_gamma=1.0):
    """SpeeD's k:1 sampling (tau from the areas) with P2 weights, after the early SpeeDiT code (docs/method.md §7)."""
    _check_threshold(threshold)
    tau = find_areas(schedule, threshold).tau if tau is None else tau
    return Strategy(dict(name="speedit", k=k, tau=tau, threshold=threshold, p2_k=p2_k, p2_gamma=p2_gamma), schedule,
                    speed_probs(schedule.T, tau, k), _p2_weights(schedule, p2_k, p2_gamma), eps_space=True)

BUILDERS = dict(uniform=uniform_strategy, speed=speed_strategy, p2=p2_strategy, min_snr=min_snr_strategy,
                lognormal=lognormal_strategy, logitnormal=logitnormal_strategy, loss_aware=loss_aware_strategy,
                speedit=speedit_strategy)
STRATEGIES = tuple(BUILDERS)

def make_strategy(name, schedule, **options):
    """make_strategy("speed", schedule, k=2) is speed_strategy(schedule, k=2); see each builder."""
    _check_choice("name", name, STRATEGIES)
    _check_schedule(schedule)
    allowed = list(inspect.signature(BUILDERS[name]).parameters)[1:]
    unknown = sorted(set(options) - set(allowed))
    _check(not unknown, f"unknown option(s) {unknown} for strategy {name!r}; valid: {allowed or 'none'}")
    return BUILDERS[name](schedule, **options)
# ---- 7. Loss: the weighted denoising MSE (DDPM's simple loss, Ho et al. 2020, times w) -------------------------------
#      mean_i w(t_i) |model(x_t_i, t_i) - target_i|^2 ; target eps, x0 or v = sqrt(abar) eps - sqrt(1-abar) x0
def diffusion_loss(model, x0, schedule, strategy=None, *, t=None, w=None, noise=None, target="eps",
                   generator=None, **model_kwargs):
    """(loss, info): t and w are drawn from `strategy` unless given; info: t, w and the per-sample MSE (detached)."""
    _check(torch.is_tensor(x0) and x0.is_floating_point() and x0.ndim >= 2, "x0 must be a float tensor [N, C, H, W]")
    _check_choice("target", target, TARGETS)
    _check_schedule(schedule)
    _check(strategy is None or (isinstance(strategy, Strategy) and strategy.T == schedule.T),
           "strategy must come from make_strategy with the schedule's T")
    n = x0.shape[0]
    if t is None:
        _check(strategy is not None and w is None, "pass a strategy, or t (and optionally w)")
        t, w = strategy.sample(n, x0.device, generator, target=target)
    else:
        _check(torch.is_tensor(t) and not t.is_floating_point() and t.shape == (n,),
               f"t must be an integer tensor [{n}]")
        _check(t.is_cuda or bool(((t >= 0) & (t < schedule.T)).all()),  # checked off the GPU only: no host sync
               f"t must lie in [0, T-1] = [0, {schedule.T - 1}]")
        if w is None:
            w = strategy.weight_of(t, target) if strategy is not None else torch.ones(n, device=x0.device)
    if noise is None:
        gdev = x0.device if generator is None else generator.device
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(x0.device)
    a, s = (c[t].view(-1, *[1] * (x0.ndim - 1)) for c in schedule.scales(x0.device))
    x0 = x0.float()
    goal = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[target]
    out = model(a * x0 + s * noise, t, **model_kwargs)
    mse = ((out.float() - goal) ** 2).flatten(1).mean(1)
    return (w * mse).mean(), {"t": t, "mse": mse.detach(), "w": w}
# ============================================== PART II: A SMALL TESTBED ==============================================
# ---- 8. Network: a compact DDPM UNet (Ho et al. 2020, App. B; scale-shift conditioning from improved DDPM) -----------
#      Time embedding -> MLP; residual blocks (GroupNorm, SiLU), attention at attn_res; skips from encoder to decoder.
def timestep_embedding(t, dim, max_period=10000.0):
    """Transformer-style sinusoidal embedding of steps t -> [N, dim]."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)

def _norm(c):  # GroupNorm, at most 32 groups of >= 2 channels (1 a group would cancel the time embedding)
    return nn.GroupNorm(math.gcd(32, max(c // 2, 1)), c)
def _zero(module):  # zero-initialised output layers: every block starts as the identity
    nn.init.zeros_(module.weight), nn.init.zeros_(module.bias)
    return module

class ResBlock(nn.Module):  # GroupNorm-SiLU-conv twice, the time embedding added (or scale-shift) in between
    def __init__(self, cin, cout, emb_dim, dropout, scale_shift):
        super().__init__()
        self.scale_shift, self.norm1, self.conv1 = scale_shift, _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2, self.drop, self.conv2 = _norm(cout), nn.Dropout(dropout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
    def forward(self, x, emb):
        h, e = self.conv1(F.silu(self.norm1(x))), rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        scale, shift = e.chunk(2, dim=1) if self.scale_shift else (None, None)
        h = self.norm2(h) * (1 + scale) + shift if self.scale_shift else self.norm2(h + e)
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))

class Attention(nn.Module):  # multi-head self-attention over the pixels, residual
    def __init__(self, c, heads):
        super().__init__()
        self.heads, self.norm = heads, _norm(c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), _zero(nn.Conv2d(c, c, 1))
    def forward(self, x):
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) x y -> three b h (x y) d", three=3, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(o, "b h (x y) d -> b (h d) x y", x=x.shape[2]))

class Upsample(nn.Conv2d):  # nearest-neighbour 2x, then the convolution
    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))
class EmbSequential(nn.ModuleList):  # layers in order; residual blocks also get the embedding
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x

class UNet(nn.Module):
    """forward(x [N, C, H, W] in [-1, 1], t [N], y [N] labels with num_classes) -> [N, C, H, W]; config: the args."""
    def __init__(self, img_channels=3, img_res=32, ch=128, ch_mult=(1, 2, 2, 2), num_blocks=2,
                 attn_res=(16,), dropout=0.1, num_classes=None, heads=1, scale_shift=True):
        super().__init__()
        _check(_is_int(ch, 2) and ch % 2 == 0, f"ch must be an even integer >= 2; got {ch!r}")
        _check(len(ch_mult) >= 1 and _is_int(num_blocks, 1), "ch_mult must be non-empty and num_blocks >= 1")
        _check(img_res % 2 ** (len(ch_mult) - 1) == 0,
               f"img_res must be divisible by 2^(len(ch_mult)-1) = {2 ** (len(ch_mult) - 1)}; got {img_res}")
        self.config = {k: list(v) if isinstance(v, tuple) else v
                       for k, v in locals().items() if k not in ("self", "__class__")}
        self.ch, emb_dim = ch, 4 * ch
        block = lambda cin, cout: ResBlock(cin, cout, emb_dim, dropout, scale_shift)  # noqa: E731
        attn = lambda c, res: [Attention(c, heads)] if res in attn_res else []  # noqa: E731
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(img_channels, ch, 3, padding=1)
        self.down, self.up, skips, c, res = nn.ModuleList(), nn.ModuleList(), [ch], ch, img_res
        for i, m in enumerate(ch_mult):                       # encoder: blocks, then downsample
            for _ in range(num_blocks):
                layer, c = block(c, ch * m), ch * m
                self.down.append(EmbSequential([layer, *attn(c, res)])), skips.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(EmbSequential([nn.Conv2d(c, c, 3, stride=2, padding=1)])), skips.append(c)
                res //= 2
        self.mid = EmbSequential([block(c, c), Attention(c, heads), block(c, c)])
        for i, m in reversed(list(enumerate(ch_mult))):       # decoder: blocks on the skips, then upsample
            for _ in range(num_blocks + 1):
                layer, c = block(c + skips.pop(), ch * m), ch * m
                self.up.append(EmbSequential([layer, *attn(c, res)]))
            if i > 0:
                self.up.append(EmbSequential([Upsample(c, c, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(_norm(c), nn.SiLU(), _zero(nn.Conv2d(c, img_channels, 3, padding=1)))

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if self.class_emb is not None:
            _check(y is not None, "this UNet is class-conditional: pass labels y")
            emb = emb + self.class_emb(y)
        hs = [self.stem(x)]
        for layer in self.down:
            hs.append(layer(hs[-1], emb))
        h = self.mid(hs[-1], emb)
        for layer in self.up:
            h = layer(h if isinstance(layer[0], Upsample) else torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

UNET_SIZES = {"tiny": dict(ch=32, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1),  # see make_unet
              "small": dict(ch=64, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1),
              "ddpm": dict(ch=128, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1, scale_shift=False)}

def make_unet(size="tiny", **overrides):
    """tiny (2.4M parameters, 0.84 GFLOP per 32x32 image), small (9.6M, 3.2), ddpm (35.7M, 12.4: DDPM's CIFAR-10)."""
    _check_choice("size", size, tuple(UNET_SIZES))
    return UNet(**{**UNET_SIZES[size], **overrides})
# ---- 9. Training: AdamW, lr warm-up (and cool-down), gradient clipping, EMA with warm-up (Ho et al. 2020, App. B) ----
#      On a GPU the whole step is one CUDA graph; under torchrun the global batch is split over the ranks (same math).
def pick_precision(device, precision="auto"):
    """'bf16' on GPUs with compute capability >= 8, 'fp16' on older GPUs, 'fp32' on the CPU."""
    _check_choice("precision", precision, ("auto", "bf16", "fp16", "fp32"))
    if precision != "auto" or torch.device(device).type != "cuda":
        return precision if precision != "auto" else "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
def _autocast(device, precision):  # no cast-weight cache: it would go stale inside a CUDA graph
    kind, dtype = torch.device(device).type, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(kind, dtype or torch.float32, enabled=dtype is not None, cache_enabled=False)

@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model on parameters (decay: float or 0-d tensor, no host sync); copies buffers."""
    e = list(ema.parameters())
    delta = torch._foreach_sub([p.detach() for p in model.parameters()], e)
    torch._foreach_add_(e, torch._foreach_mul(delta, 1 - decay))
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)

def ema_decay_at(step, ema_decay):  # the EMA decay at 0-based `step`, with warm-up
    return min(ema_decay, (1 + step) / (10 + step))

class Replayer:
    """Calls fn(); with graph=True the first `warmup` calls run eagerly on a side stream, the next is captured in a CUDA
    graph, later calls replay it. fn may touch only tensors that outlive it; `generators`: the RNGs it draws from."""
    def __init__(self, fn, graph=False, generators=(), warmup=3, stream=None):
        self.fn, self.graph, self.generators, self.warmup = fn, graph, generators, warmup
        self.calls, self.cuda_graph, self.stream = 0, None, stream or (torch.cuda.Stream() if graph else None)

    def __call__(self):
        self.calls += 1
        if not self.graph:
            self.fn()
        elif self.cuda_graph is not None:
            self.cuda_graph.replay()
        elif self.calls <= self.warmup:                   # warm-up (cuDNN autotuning, lazy state)
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.fn()
            torch.cuda.current_stream().wait_stream(self.stream)
        else:                                             # capture once, then replay this call
            self.cuda_graph = torch.cuda.CUDAGraph()
            for g in self.generators:
                self.cuda_graph.register_generator_state(g)
            with torch.cuda.graph(self.cuda_graph, stream=self.stream):
                self.fn()
            self.cuda_graph.replay()

@dataclass
class TrainResult:
    """What train() returns and passes to callbacks. history: one dict per log interval."""
    model: nn.Module
    ema: nn.Module
    step: int
    history: list
    extra: dict              # free space for callbacks (e.g. quality curves); saved in checkpoints
    strategy: Strategy
    schedule: Schedule
    interrupted: bool = False

def _save_atomic(obj, path):  # write, then rename: a reader never sees half a file
    torch.save(obj, f"{path}.tmp{os.getpid()}")
    os.replace(f"{path}.tmp{os.getpid()}", path)
def _plain(x, what):  # x as plain JSON values (numpy scalars become numbers): what torch.load(weights_only=True) reads
    def number(v):
        _check(getattr(v, "size", 0) == 1 and hasattr(v, "item"),
               f"{what} may hold only numbers, strings, lists and dicts; got {type(v).__name__}")
        return v.item()
    return json.loads(json.dumps(x, default=number))
def _check_train(model, images, labels, strategy, schedule, target, world, steps, lr, batch_size, warmup, cooldown,
                 log_every, grad_clip, ema_decay, ckpt_minutes):  # train()'s arguments: a ValueError names the bad one
    _check(isinstance(model, nn.Module) and len([*model.parameters()]), "model must be an nn.Module with parameters")
    _check(torch.is_tensor(images) and images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 NCHW")
    _check(labels is None or (torch.is_tensor(labels) and labels.shape == (len(images),)), "labels must be None or [N]")
    _check(isinstance(strategy, Strategy) and strategy.T == schedule.T, "strategy must be make_strategy(..., schedule)")
    _check_choice("target", target, TARGETS)
    for name, ok, what in (
            ("steps", _is_int(steps, 1), "an integer >= 1"), ("lr", _is_num(lr) and lr > 0, "a number > 0"),
            ("batch_size", _is_int(batch_size, 1, len(images)) and batch_size % world == 0,
             f"an integer in [1, {len(images)}] divisible by the {world} rank(s)"),
            ("warmup", _is_int(warmup, 0), "an integer >= 0"), ("cooldown", _is_int(cooldown, 0), "an integer >= 0"),
            ("log_every", _is_int(log_every, 1), "an integer >= 1"),
            ("grad_clip", _is_num(grad_clip, 0), "a number >= 0 (0: no clipping)"),
            ("ema_decay", _is_num(ema_decay, 0) and ema_decay < 1, "a number in [0, 1)"),
            ("ckpt_minutes", _is_num(ckpt_minutes, 0), "a number >= 0")):
        _check(ok, f"{name} must be {what}; got {locals()[name]!r}")
def _setup(model, device, fmt, precision, graph, compile, world, lr, weight_decay):
    """(model on the device, EMA, AdamW (a tensor lr under a graph), GradScaler, lr, the network, side stream)."""
    model = model.to(device, memory_format=fmt)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    lr = torch.tensor(lr, device=device) if graph else lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda",
                            capturable=graph)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    net, side = model, torch.cuda.Stream(device) if graph else None  # side: warm-up and capture (and DDP's) stream
    if world > 1:
        with torch.cuda.stream(side) if graph else contextlib.nullcontext():
            net = nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None)
    return model, ema, opt, scaler, lr, torch.compile(net) if compile else net, side  # compiled: fewer, fused kernels

def _save_checkpoint(path, parts, gens, **state):  # parts' state_dicts, the RNG states and `state`, atomically
    rng = dict(gens=[g.get_state() for g in gens], cpu=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state(gens[0].device) if gens[0].device.type == "cuda" else None)
    _save_atomic({**{k: v.state_dict() for k, v in parts.items()}, "rng": rng, **state}, path)
def _load_checkpoint(path, parts, gens, experiment, sums, counts):  # the same experiment's: (step, history, extra)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    before = ck.get("experiment", {})
    differ = [f"{k}: {before.get(k)!r} there, {experiment.get(k)!r} now"
              for k in sorted(experiment.keys() | before.keys()) if experiment.get(k) != before.get(k)]
    _check(not differ, f"checkpoint {path} is of another experiment; differing: {'; '.join(differ)}")
    for k, v in parts.items():
        v.load_state_dict(ck[k])
    for g, s in zip(gens, ck["rng"]["gens"]):
        g.set_state(s)
    torch.set_rng_state(ck["rng"]["cpu"])
    ck["rng"]["cuda"] is None or torch.cuda.set_rng_state(ck["rng"]["cuda"], gens[0].device)
    sums.copy_(ck["sums"]), counts.copy_(ck["counts"])
    return ck["step"], ck["history"], ck["extra"]
def _log_entry(sums, counts, world, step, lr, since, batch_size):  # history entry from the sums (then zeroed)
    total = torch.stack([sums, counts])
    world > 1 and dist.all_reduce(total)
    s, c = (total[0] / total[1].clamp(min=1)).tolist(), total[1].tolist()  # the loop's only host sync
    _check(math.isfinite(s[0]), f"loss became {s[0]} at step {step}: lower lr or use precision='fp32'")
    sums.zero_(), counts.zero_()
    img_s = (step - since[1]) * batch_size / max(time.perf_counter() - since[0], 1e-9)
    return dict(step=step, loss=s[0], img_per_s=img_s, lr=lr, **{
        f"mse_{a}": s[i + 1] if c[i + 1] else float("nan") for i, a in enumerate(AREA_NAMES)})

class _StopOnSignal:  # SIGINT / SIGTERM set `requested` (the loop stops after the current step); a second one raises
    def __enter__(self):
        sigs = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        self.requested, self.before = False, {s: signal.signal(s, self._handle) for s in sigs}
        return self
    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
    def __exit__(self, *exc):
        for s, handler in self.before.items():
            signal.signal(s, handler)

def train(model, images, schedule, strategy, *, steps, batch_size=128, lr=2e-4, warmup=500, cooldown=0, grad_clip=1.0,
          weight_decay=0.0, ema_decay=0.9999, target="eps", labels=None, precision="auto", graph=True, compile=False,
          flip=True, seed=0, device=None, log_every=100, callback=None, callback_every=0, ckpt_path=None,
          ckpt_minutes=5.0, resume=True, experiment=None, progress=True):
    """Train `model` (model(x_t, t[, y=labels])) on uint8 images [N, C, H, W]; lr rises linearly over the first `warmup`
    steps and falls linearly towards 0 over the last `cooldown`. callback(result) runs on rank 0 every callback_every
    steps and after the last; True stops. With ckpt_path a checkpoint is written every ckpt_minutes, at a stop, on
    SIGINT/SIGTERM (then result.interrupted) and at the end; resume continues one of the same experiment."""
    # the arguments; the device (by default this rank's GPU), precision, CUDA graph or not, memory format
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    _check_train(model, images, labels, strategy, schedule, target, world, steps, lr, batch_size, warmup, cooldown,
                 log_every, grad_clip, ema_decay, ckpt_minutes)
    device = torch.device(device) if device is not None else torch.device(
        "cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    precision = pick_precision(device, precision)
    graph = graph and device.type == "cuda" and precision != "fp16"  # fp16's GradScaler syncs with the host
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    # model, EMA, AdamW, what the step calls (DDP, compiled); RNGs for steps and noise (dropout: the global one)
    model, ema, opt, scaler, lr_now, net, side = _setup(model, device, fmt, precision, graph, compile, world, lr,
                                                        weight_decay)
    gens = [torch.Generator(device=device).manual_seed(seed + 1), torch.Generator(device=device).manual_seed(seed + 2)]
    torch.manual_seed(seed)  # the global RNG too (dropout: under DDP every rank draws the same masks for its share)

    # the experiment (settings, strategy.config, model shapes, the caller's dict); its checkpoint, resumed bit for bit
    experiment = _plain(dict(batch_size=batch_size, seed=seed, lr=lr, warmup=warmup, grad_clip=grad_clip, flip=flip,
                             weight_decay=weight_decay, ema_decay=ema_decay, precision=precision, world_size=world,
                             schedule=[schedule.T, round(float(schedule.alpha_bar.sum()), 9)], strategy=strategy.config,
                             model=[type(model).__name__, [list(p.shape) for p in model.parameters()]], target=target,
                             **({"cooldown": cooldown} if cooldown else {}), **(experiment or {})), "experiment")
    parts = dict(model=model, ema=ema, opt=opt, scaler=scaler, strategy=strategy)
    sums, counts = torch.zeros(4, device=device), torch.zeros(4, device=device)  # loss, then MSE per area
    start, history, extra = _load_checkpoint(ckpt_path, parts, gens, experiment, sums, counts) if (
        ckpt_path and resume and os.path.exists(ckpt_path)) else (0, [], {})

    # the step: reads static inputs (batch indices, flips, lr, EMA decay), writes on the device only
    images, labels = images.to(device), labels.to(device) if labels is not None else None
    areas, per_epoch, b = find_areas(schedule), len(images) // batch_size, batch_size // world
    idx, flipped = torch.zeros(b, dtype=torch.long, device=device), torch.zeros(b, dtype=torch.bool, device=device)
    decay = torch.zeros((), device=device)

    def step_fn():
        opt.zero_grad(set_to_none=True)
        x = images[idx].float().div_(127.5).sub_(1.0)
        x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x) if flip else x
        t_all, w = strategy.sample(batch_size, device, gens[0], target=target)  # drawn for the global batch,
        noise = torch.randn((batch_size, *x.shape[1:]), generator=gens[1], device=device)
        t, w, noise = t_all[rank * b:][:b], w[rank * b:][:b], noise[rank * b:][:b]  # this rank takes its share
        with _autocast(device, precision):
            loss, info = diffusion_loss(net, x.contiguous(memory_format=fmt), schedule, t=t, w=w, target=target,
                                        noise=noise.contiguous(memory_format=fmt),
                                        **({"y": labels[idx]} if labels is not None else {}))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_clip and nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, model, decay)
        if isinstance(strategy, LossAwareStrategy):  # every rank records the whole batch: one state everywhere
            mse = [torch.empty_like(info["mse"]) for _ in range(world)] if world > 1 else [info["mse"]]
            world > 1 and dist.all_gather(mse, info["mse"])
            strategy.update(t_all, torch.cat(mse))
        sums[0], counts[0], area = sums[0] + loss.detach(), counts[0] + 1, areas.label(t) + 1  # slots 1-3: the areas
        sums.index_add_(0, area, info["mse"])
        counts.index_add_(0, area, torch.ones_like(info["mse"]))

    run_step = Replayer(step_fn, graph, gens, warmup=3 if world == 1 else 11, stream=side)  # DDP: 11 eager steps first
    result = TrainResult(model, ema, start, history, extra, strategy, schedule)
    bar = tqdm(total=steps, initial=start, disable=not progress or rank > 0, unit="step")
    since, saved_at, stop = (time.perf_counter(), start), time.time(), False  # since: the last log's (time, step)
    model.train()
    with _StopOnSignal() as signals:
        for step in range(start, steps):
            # this step's batch and flips (an epoch's order is a function of (seed, epoch)), lr (warm-up), EMA decay
            if step == start or step % per_epoch == 0:
                g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step // per_epoch)
                order = torch.randperm(len(images), generator=g, device=device)
                flips = torch.rand(len(images), generator=g, device=device) < 0.5
            batch = order[(step % per_epoch) * batch_size:][:batch_size][rank * b:][:b]
            idx.copy_(batch), flipped.copy_(flips[batch])
            value = lr * min(1.0, (step + 1) / max(warmup, 1), (steps - step) / max(cooldown, 1))
            opt.param_groups[0]["lr"] = lr_now.fill_(value) if graph else value
            decay.fill_(ema_decay_at(step, ema_decay))
            run_step()
            done = result.step = step + 1
            bar.update(1)

            # logs, then the callback, stop requests (signals, the callback, any rank) and checkpoints
            if done % log_every == 0 or done == steps:
                history.append(_log_entry(sums, counts, world, done, value, since, batch_size))
                since = (time.perf_counter(), done)
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", img_s=f"{history[-1]['img_per_s']:.0f}")
            if callback is not None and rank == 0 and (callback_every and done % callback_every == 0 or done == steps):
                model.eval()
                stop = bool(callback(result))
                model.train()
            result.interrupted, stop = signals.requested, stop or signals.requested
            if world > 1:  # every rank stops if one asks to
                flag = torch.tensor(float(stop), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if ckpt_path and rank == 0 and (stop or done == steps or time.time() - saved_at > 60 * ckpt_minutes):
                _save_checkpoint(ckpt_path, parts, gens, step=done, history=history, experiment=experiment,
                                 extra=_plain(extra, "result.extra"), sums=sums.cpu(), counts=counts.cpu())
                saved_at = time.time()
            if stop:
                break
    world > 1 and dist.barrier()
    bar.close()
    model.eval()
    return result
# ---- 10. Samplers: DDIM (Song et al. 2021, eq. 12) over evenly respaced steps, with eta ------------------------------
#      eta = 1: ancestral DDPM sampling (Ho et al. 2020, Alg. 2) of the respaced process (improved DDPM). CUDA-graphed.
@torch.no_grad()
def ddim_sample(model, schedule, n, shape=(3, 32, 32), steps=50, eta=0.0, target="eps", labels=None,
                generator=None, device=None, batch_size=500, precision="auto", clip=True, progress=False, graph=True):
    """n images with `steps` DDIM steps, uint8 [n, *shape] on `device`. The starting noise is drawn first: with eta = 0
    batch_size does not change the result; with eta > 0 each step's noise is drawn per batch, so it does."""
    _check(_is_int(n, 1), f"n must be an integer >= 1; got {n!r}")
    _check(_is_int(steps, 1, schedule.T), f"steps must be an integer in [1, T = {schedule.T}]; got {steps!r}")
    _check(_is_num(eta, 0, 1), f"eta must be in [0, 1]; got {eta!r}")
    _check(_is_int(batch_size, 1), f"batch_size must be an integer >= 1; got {batch_size!r}")
    _check_choice("target", target, TARGETS)
    _check(labels is None or (torch.is_tensor(labels) and labels.shape == (n,)), f"labels must be None or [{n}]")
    p = next(model.parameters(), None) if device is None and isinstance(model, nn.Module) else None
    _check(device is not None or p is not None, "model has no parameters to take the device from: pass device=")
    device = torch.device(device if device is not None else p.device)
    precision = pick_precision(device, precision)
    # per-step coefficients as device tables, read with a 1-element device index j inside the step (never a host sync)
    ts = torch.linspace(schedule.T - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive()
    ab = schedule.alpha_bar[ts]
    ab_prev = torch.cat([ab[1:], ab.new_ones(1)])
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    table = torch.stack([ab.sqrt(), (1 - ab).sqrt(), ab_prev.sqrt(), (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt(),
                         sigma]).float().to(device)
    ts, j = ts.to(device), torch.zeros(1, dtype=torch.long, device=device)
    gdev, b = generator.device if generator is not None else device, min(batch_size, n)
    start = torch.randn((n, *shape), generator=generator, device=gdev).to(device)
    fmt = torch.channels_last if device.type == "cuda" and len(shape) == 3 else torch.contiguous_format  # NHWC convs
    x, z = (torch.zeros((b, *shape), device=device).contiguous(memory_format=fmt) for _ in "xz")
    y = torch.zeros(b, dtype=torch.long, device=device) if labels is not None else None

    def reverse_step():  # x_t -> x_{t-1} for the step index in j
        a, s, a_prev, c_dir, sig = table[:, j]
        with _autocast(device, precision):
            out = model(x, ts[j].expand(b), **({"y": y} if y is not None else {})).float()
        if target == "eps":  # the network's output -> (eps, x0)
            eps, x0 = out, (x - s * out) / a
        elif target == "x0":
            eps, x0 = (x - a * out) / s, out
        else:  # v-prediction
            eps, x0 = s * x + a * out, a * x - s * out
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - a * x0) / s
        x.copy_(a_prev * x0 + c_dir * eps + sig * z)

    run = Replayer(reverse_step, graph and device.type == "cuda")
    out, bar = [], tqdm(total=n, disable=not progress, unit="img", desc="sampling")
    for i in range(0, n, b):
        m = min(b, n - i)
        x.zero_()[:m].copy_(start[i:i + m])
        if y is not None:
            y.zero_()[:m].copy_(labels[i:i + m].to(device))
        for k in range(len(ts)):
            j.fill_(k)
            if eta > 0:
                z.copy_(torch.randn(z.shape, generator=generator, device=gdev))
            run()
        out.append(((x[:m] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).contiguous())
        bar.update(m)
    bar.close()
    return torch.cat(out)

def ddpm_sample(model, schedule, n, steps=250, **kwargs):
    """The paper's sampler: ancestral DDPM (DDIM, eta = 1) over min(steps, T) evenly respaced steps."""
    return ddim_sample(model, schedule, n, steps=min(steps, schedule.T), eta=1.0, **kwargs)
# ---- 11. Quality: the Frechet distance between Gaussians fitted to features (Heusel et al. 2017) ---------------------
#      FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2) in float64, with tr (S1 S2)^(1/2) = tr (R S1 R)^(1/2),
#      R = S2^(1/2): symmetric eigenproblems only. FID = FD in the pool features of the standard TF-Inception network.
def feature_stats(feats):
    """(mean, unbiased covariance) of features [N, D] in float64, on the features' device."""
    _check(torch.is_tensor(feats) and feats.ndim == 2 and feats.shape[0] >= 2, "feats must be a tensor [N >= 2, D]")
    f = feats.double()
    c = f - (mu := f.mean(0))  # centred once: [N, D] float64 is 0.8 GB for 50,000 Inception features
    return mu, c.T @ c / (len(f) - 1)
def sqrt_psd(s):
    """The symmetric square root of a positive semi-definite matrix (negative eigenvalues clipped)."""
    ev, vec = torch.linalg.eigh(s.double())
    return (vec * ev.clamp(min=0).sqrt()) @ vec.T
def frechet_distance(a, b):
    """FD between feature sets [N, D] or (mean, covariance[, sqrt_psd(covariance), to reuse R]) tuples."""
    (mu1, s1, *_), (mu2, s2, *r) = (feature_stats(x) if torch.is_tensor(x) else [v.double() for v in x] for x in (a, b))
    _check(mu1.shape == mu2.shape, f"feature sizes differ: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    r = r[0].to(s1.device) if r else sqrt_psd(s2.to(s1.device))
    m = r @ s1 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    mu2, s2 = mu2.to(mu1.device), s2.to(s1.device)
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)
