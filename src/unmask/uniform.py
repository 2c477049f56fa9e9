"""Uniform-state diffusion: the forward process, the exact continuous-time NELBO (UDLM) and the
Gaussian duality (Duo). docs/algorithms.md, 'Uniform-state diffusion (UDLM, Duo)'.

UDLM (Schiff et al. 2024, arXiv:2412.10193): each token of x0 (B, L) over the K = ``vocab_size``
real tokens is kept with probability alpha(t) and otherwise replaced by a uniformly drawn one,
q(z_t | x) = Cat(alpha_t x + (1 - alpha_t) / K); the MASK row of the embedding is never used. The
network's softmax x_theta(z_t, t) over the K tokens parameterises the reverse posterior (mean
parameterisation) and :func:`udlm_nelbo` is the exact continuous-time bound, computed with gathers
and sums over K only. The schedules are :class:`unmask.schedule.Schedule`'s alpha(t).

Duo (Sahoo et al. 2025, arXiv:2506.10892): Gaussian latents w_t = alpha~ e_x + sigma~ eps
(alpha~^2 = sigmoid(-gamma), sigma~^2 = sigmoid(gamma)) have argmax(w_t) distributed exactly as the
uniform process with alpha_t = T(alpha~_t), the diffusion transformation operator
(:class:`DiffusionOperator`, a table computed once per K). The curriculum feeds the network the
relaxed one-hot softmax(w_t / tau) (:func:`relaxed_input`) and scores the discrete argmax(w_t).

Like :mod:`unmask.losses`, every loss returns per-sequence nats per token (B,), the noise is drawn
on the CPU from the caller's generator (one draw per global batch, rows sliced per process) and the
network is called only through its forward arguments.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from unmask.device import device_of
from unmask.errors import check_number
from unmask.likelihood import FOR_A_STANDARD_ERROR, LikelihoodResult, batch_slices, window_groups
from unmask.schedule import Schedule, sample_times

ALPHA_MAX = 1 - 1e-6  # Duo's T(gamma) is kept below 1 (in float32 it rounds to 1 where the latents almost never flip a token)


# --------------------------------------------------------------------------- UDLM: the forward process


def corrupt_uniform(x0: torch.Tensor, alpha: torch.Tensor, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """z_t ~ q(z_t | x0) = Cat(alpha x0 + (1 - alpha) / K): x0 (B, L), alpha (B,) -> z_t (B, L) on x0's device.

    Each token is kept with probability alpha, else replaced by one of the K tokens drawn uniformly
    (possibly itself). The random numbers come from ``generator`` on the CPU (reproducible across devices).
    """
    keep = torch.rand(x0.shape, generator=generator) < alpha.cpu()[:, None]
    other = torch.randint(0, vocab_size, x0.shape, generator=generator)
    return torch.where(keep.to(x0.device), x0, other.to(x0.device))


@dataclass(frozen=True)
class UniformCorruption:
    """One draw of the uniform forward process for a batch x0 (B, L): z_t and the time it was drawn at."""

    zt: torch.Tensor  # (B, L) the corrupted tokens
    t: torch.Tensor  # (B,) the time the time-conditioned network sees
    alpha: torch.Tensor  # (B,) alpha(t)
    alpha_prime: torch.Tensor  # (B,) d alpha / dt, the rate of the time variable the loss integrates over

    def rows(self, index: slice) -> "UniformCorruption":
        return UniformCorruption(self.zt[index], self.t[index], self.alpha[index], self.alpha_prime[index])

    def to(self, device: torch.device) -> "UniformCorruption":
        return UniformCorruption(self.zt.to(device), self.t.to(device), self.alpha.to(device), self.alpha_prime.to(device))


def draw_uniform(x0: torch.Tensor, schedule: Schedule, vocab_size: int, generator: torch.Generator, t: torch.Tensor | None = None,
                 low_discrepancy: bool = True) -> UniformCorruption:
    """UDLM noise: t ~ U(0, 1] (low-discrepancy over the batch; or the given t (B,)) and z_t ~ q(z_t | x0) at alpha(t)."""
    if t is None:
        t = sample_times(x0.shape[0], generator, low_discrepancy)
    alpha = schedule.alpha(t)
    zt = corrupt_uniform(x0, alpha, vocab_size, generator)
    dev = x0.device
    return UniformCorruption(zt, t.to(dev), alpha.to(dev), schedule.alpha_prime(t).to(dev))


# --------------------------------------------------------------------------- UDLM: the bound


def udlm_nelbo(logits: torch.Tensor, zt: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, alpha_prime: torch.Tensor) -> torch.Tensor:
    """The integrand of the continuous-time UDLM NELBO at one time, per position: (B, L) nats.

    logits (B, L, K) of x_theta(z_t) (softmax over the K real tokens), z_t and x0 (B, L), alpha and
    alpha' = d alpha / dt (B,). With xbar = K alpha x + (1 - alpha) for x one-hot or x_theta, i = z_t:

        -alpha' / (K alpha) * sum_{m != i} [ r_m log(r_m / rho_m) - r_m + rho_m ],
        r_m = xbar_m / xbar_i (x = x0),  rho_m = xbar_theta_m / xbar_theta_i,

    the limit of the per-step KL between the true and the model posteriors (docs/algorithms.md,
    'Uniform-state diffusion (UDLM, Duo)'). r takes at most two values, so the sum over m is a gather
    at z_t and x0 plus one sum over K of log xbar_theta; no one-hot tensor is formed. Its integral
    over t in [0, 1] (alpha(1) = 0) is the NELBO; each term is >= 0 and 0 iff rho = r.
    Computed in float32 at least (float64 logits give float64).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    k = logits.shape[-1]
    alpha = alpha.to(dtype).clamp(max=1 - torch.finfo(dtype).eps)[:, None]  # 1 - alpha > 0: the bound divides by it where z_t != x
    b, c = k * alpha, 1 - alpha  # xbar = b x + c
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)
    log_xbar = torch.logaddexp(log_p + b.log()[..., None], c.log()[..., None])  # log xbar_theta
    at_z = log_xbar.gather(-1, zt[..., None]).squeeze(-1)
    at_x = log_xbar.gather(-1, x0[..., None]).squeeze(-1)
    d = (log_xbar - at_z[..., None]).sum(-1)  # sum_m log rho_m
    # sum_m rho_m - r_m = K / xbar_theta_i - K / xbar_i = K b (1[z = x] - x_theta_i) / (xbar_theta_i xbar_i), without cancellation
    same = zt == x0
    xbar_z = torch.where(same, b + c, c)
    theta_z = log_p.gather(-1, zt[..., None]).squeeze(-1).exp()
    rates = k * b * (same.to(dtype) - theta_z) / (at_z.exp() * xbar_z)
    # z_t = x0: r_m = c / (b + c) for every m != i;  z_t != x0: r_x0 = (b + c) / c, the others 1
    rho0 = c / (b + c)
    kept = (k - 1) * torch.xlogy(rho0, rho0) - rho0 * d
    ratio = (b + c) / c
    changed = torch.xlogy(ratio, ratio) - d - (b / c) * (at_x - at_z)
    return (-alpha_prime.to(dtype)[:, None] / (k * alpha)) * (torch.where(same, kept, changed) + rates)


def udlm_loss(model, x0: torch.Tensor, noise: UniformCorruption, **forward) -> torch.Tensor:
    """The UDLM loss of given noise: x0 (B, L) -> (B,) nats/token, an unbiased estimate of the NELBO's
    diffusion term (``forward``: extra network arguments, e.g. ``soft_tokens``)."""
    logits = model(noise.zt, t=noise.t, **forward)
    return udlm_nelbo(logits, noise.zt, x0, noise.alpha, noise.alpha_prime).sum(dim=1) / x0.shape[1]


@torch.no_grad()
def udlm_elbo(model, windows: torch.Tensor | Sequence[torch.Tensor], draws: int = 16, schedule: Schedule = Schedule(),
              batch_size: int = 16, seed: int = 0, progress: bool = False) -> LikelihoodResult:
    """Monte Carlo UDLM NELBO in nats/token of a uniform-state network on windows (N, L) (or a list of groups).

    As :func:`unmask.likelihood.mc_elbo`: window s gets the stratified times t_sj = (u_s + j/K) mod 1,
    the standard error is sd_j / sqrt(K) over the K per-draw estimates, and the schedule integrates
    with eps = 0, so that alpha(1) = 0: q(z_1 | x) is the uniform prior, the prior term vanishes and
    the estimate bounds the NLL (docs/algorithms.md, 'Uniform-state diffusion (UDLM, Duo)').
    """
    check_number("draws", draws, ">= 2", FOR_A_STANDARD_ERROR)
    groups = window_groups(windows)
    schedule = replace(schedule, eps=0.0)
    gen = torch.Generator().manual_seed(seed)
    device, k = device_of(model), model.config.vocab_size
    per_draw = torch.zeros(draws, dtype=torch.float64)
    num_tokens = sum(g.numel() for g in groups)
    bar = tqdm(total=sum(g.shape[0] for g in groups) * draws, desc="udlm-elbo", unit="seq", disable=not progress)
    for group in groups:
        for sl in batch_slices(group.shape[0], batch_size):
            x0 = group[sl].to(device)
            u0 = torch.rand(x0.shape[0], generator=gen)
            for j in range(draws):
                noise = draw_uniform(x0, schedule, k, gen, t=((u0 + j / draws) % 1.0).clamp_min(1e-5))
                per_draw[j] += (udlm_loss(model, x0, noise) * group.shape[1]).double().sum().cpu()
                bar.update(x0.shape[0])
    bar.close()
    per_draw /= num_tokens
    mean = per_draw.mean().item()
    return LikelihoodResult("elbo", mean, per_draw.std(unbiased=True).item() / math.sqrt(draws), math.exp(mean), num_tokens, draws,
                            "udlm")


# --------------------------------------------------------------------------- Duo: the Gaussian duality


def gaussian_coefficients(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha~, sigma~) of the variance-preserving Gaussian process at log-SNR parameter gamma:
    alpha~^2 = sigmoid(-gamma), sigma~^2 = sigmoid(gamma), so alpha~ / sigma~ = exp(-gamma / 2)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _argmax_probability(nu: torch.Tensor, vocab_size: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, d alpha / d nu) of T at signal-to-noise ratios nu (G,), by the trapezoid rule over u (U,) (float64).

    P(argmax w = x) = int phi(u) Phi(u + nu)^(K-1) du and 1/K = int phi(u) Phi(u)^(K-1) du, so
    alpha = (K P - 1) / (K - 1) = K / (K - 1) int phi(u) [Phi(u + nu)^(K-1) - Phi(u)^(K-1)] du, the
    difference formed as exp(a)(1 - exp(b - a)) in logs (no cancellation at small nu), and
    d alpha / d nu = K int phi(u) phi(u + nu) Phi(u + nu)^(K-2) du.
    """
    k = vocab_size
    shifted = u[None, :] + nu[:, None]
    log_phi = -0.5 * u**2 - 0.5 * math.log(2 * math.pi)
    a = (k - 1) * torch.special.log_ndtr(shifted)
    b = (k - 1) * torch.special.log_ndtr(u)[None, :]
    h = (u[1] - u[0]).item()
    alpha = k / (k - 1) * (log_phi.exp() * a.exp() * -torch.expm1(b - a)).sum(dim=1) * h
    log_density = log_phi + (-0.5 * shifted**2 - 0.5 * math.log(2 * math.pi)) + (k - 2) * torch.special.log_ndtr(shifted)
    return alpha, k * log_density.exp().sum(dim=1) * h


@dataclass(frozen=True)
class DiffusionOperator:
    """Duo's diffusion transformation operator T for K = ``vocab_size`` tokens, as a function of gamma.

    The uniform-state alpha of argmax(alpha~ e_x + sigma~ eps): alpha = T(gamma), tabulated with its
    derivative on a uniform grid of gamma (``gammas`` (G,)) and interpolated by cubic Hermite
    polynomials (error O(h^4) in alpha, O(h^3) in its derivative). Beyond the grid: alpha = 1 below
    it; above it alpha is proportional to nu = exp(-gamma / 2), its small-nu behaviour.
    Build it with :func:`diffusion_operator` (cached per K).
    """

    vocab_size: int
    gammas: torch.Tensor  # (G,) float64, uniform
    alphas: torch.Tensor  # (G,) T at the grid, decreasing
    slopes: torch.Tensor  # (G,) d T / d gamma at the grid

    def alpha(self, gamma: torch.Tensor) -> torch.Tensor:
        """T(gamma): the uniform-state alpha of the Gaussian latents at gamma (any shape), float64."""
        return self._hermite(gamma)[0]

    def alpha_prime(self, gamma: torch.Tensor) -> torch.Tensor:
        """d T / d gamma (< 0: more Gaussian noise, less signal), float64."""
        return self._hermite(gamma)[1]

    def gamma_for_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """The inverse of T: the gamma at which T(gamma) = alpha, for alpha in (0, 1) (linear interpolation, then Newton steps)."""
        a = alpha.double().clamp(float(self.alphas[-1]), float(self.alphas[0]))
        flipped_a, flipped_g = self.alphas.flip(0), self.gammas.flip(0)  # increasing in alpha
        i = torch.searchsorted(flipped_a, a).clamp(1, len(flipped_a) - 1)
        lo, hi = flipped_a[i - 1], flipped_a[i]
        gamma = flipped_g[i - 1] + (a - lo) / (hi - lo).clamp_min(1e-300) * (flipped_g[i] - flipped_g[i - 1])
        for _ in range(3):
            value, slope = self._hermite(gamma)
            gamma = gamma - torch.where(slope < 0, (value - a) / slope.clamp(max=-1e-300), torch.zeros_like(a))
        return gamma

    def _hermite(self, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = gamma.double().cpu()
        lo, step, n = float(self.gammas[0]), float(self.gammas[1] - self.gammas[0]), len(self.gammas)
        s = ((g - lo) / step).clamp(0, n - 1)
        i = s.floor().long().clamp(max=n - 2)
        x = s - i
        y0, y1, m0, m1 = self.alphas[i], self.alphas[i + 1], self.slopes[i] * step, self.slopes[i + 1] * step
        value = (2 * x**3 - 3 * x**2 + 1) * y0 + (x**3 - 2 * x**2 + x) * m0 + (-2 * x**3 + 3 * x**2) * y1 + (x**3 - x**2) * m1
        slope = ((6 * x**2 - 6 * x) * y0 + (3 * x**2 - 4 * x + 1) * m0 + (-6 * x**2 + 6 * x) * y1 + (3 * x**2 - 2 * x) * m1) / step
        above = g > self.gammas[-1]
        tail = self.alphas[-1] * torch.exp(-(g - self.gammas[-1]) / 2)
        value = torch.where(g < lo, torch.ones_like(g), torch.where(above, tail, value))
        slope = torch.where(g < lo, torch.zeros_like(g), torch.where(above, -tail / 2, slope))
        return value.to(gamma.device), slope.to(gamma.device)


@functools.lru_cache(maxsize=8)
def diffusion_operator(vocab_size: int, gamma_range: tuple[float, float] = (-16.0, 16.0), points: int = 1201) -> DiffusionOperator:
    """The table of T for ``vocab_size`` tokens over ``points`` values of gamma in ``gamma_range``
    (computed once per K, about 10^6 evaluations of log Phi; docs/algorithms.md, 'Uniform-state diffusion (UDLM, Duo)')."""
    check_number("vocab_size", vocab_size, ">= 2")
    gammas = torch.linspace(*gamma_range, points, dtype=torch.float64)
    nu = torch.exp(-gammas / 2)
    u = torch.linspace(-12.0, 12.0, 1601, dtype=torch.float64)  # phi(12) ~ 1e-32: the tails do not count
    alpha, dalpha_dnu = _argmax_probability(nu, vocab_size, u)
    return DiffusionOperator(vocab_size, gammas, alpha.clamp(0, 1), dalpha_dnu * (-nu / 2))


def gaussian_latents(x0: torch.Tensor, gamma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """w_t = alpha~ e_x0 + sigma~ eps: x0 (B, L), gamma (B,), standard normal eps (B, L, K) -> (B, L, K).

    argmax(w_t) is distributed as z_t of the uniform process at alpha = T(gamma) (:class:`DiffusionOperator`)."""
    alpha, sigma = gaussian_coefficients(gamma.to(eps.dtype))
    w = sigma[:, None, None] * eps
    return w.scatter_add(-1, x0[..., None], alpha[:, None, None].expand(*x0.shape, 1).to(w.dtype))


def relaxed_input(w: torch.Tensor, tau: float) -> torch.Tensor:
    """Duo's curriculum input softmax(w_t / tau) (B, L, K): the one-hot of argmax(w_t) as tau -> 0."""
    return torch.softmax(w / tau, dim=-1)


def row_normals(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normals (B, *shape) on ``device``, row b from its own generator seeded ``seeds[b]``.

    Drawn where they are used: the (B, L, K) latents are too large to draw on the CPU and send. A
    row's numbers depend only on its seed and the device type, never on the rows beside it, so any
    split of a batch over processes or micro-batches draws the same.
    """
    out = torch.empty((len(seeds), *shape), device=device)
    for row, seed in enumerate(seeds.tolist()):
        out[row] = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    return out


@dataclass(frozen=True)
class GaussianCorruption:
    """One draw of Duo's curriculum noise for a batch x0 (B, L): the Gaussian latents are made from
    ``seeds`` where they are used (:func:`row_normals`), so the noise holds only per-row scalars."""

    gamma: torch.Tensor  # (B,) the Gaussian log-SNR parameter
    t: torch.Tensor  # (B,) the time the network sees: where the schedule's alpha(t) equals alpha
    alpha: torch.Tensor  # (B,) T(gamma), the uniform-state alpha of argmax(w_t)
    alpha_prime: torch.Tensor  # (B,) d alpha / du along the curriculum's time u (gamma linear in u)
    seeds: torch.Tensor  # (B,) int64 on the CPU
    tau: float  # the softmax temperature of the relaxed input
    vocab_size: int  # K, the last dimension of the latents

    def rows(self, index: slice) -> "GaussianCorruption":
        return replace(self, gamma=self.gamma[index], t=self.t[index], alpha=self.alpha[index], alpha_prime=self.alpha_prime[index],
                       seeds=self.seeds[index])

    def to(self, device: torch.device) -> "GaussianCorruption":
        return replace(self, gamma=self.gamma.to(device), t=self.t.to(device), alpha=self.alpha.to(device),
                       alpha_prime=self.alpha_prime.to(device))


def draw_gaussian(x0: torch.Tensor, schedule: Schedule, vocab_size: int, generator: torch.Generator, gamma_range: tuple[float, float],
                  tau: float, low_discrepancy: bool = True) -> GaussianCorruption:
    """Duo curriculum noise: u ~ U(0, 1] (low-discrepancy), gamma = gamma_min + u (gamma_max - gamma_min),
    alpha = T(gamma), d alpha / du = T'(gamma) (gamma_max - gamma_min), and one seed per row for its latents."""
    u = sample_times(x0.shape[0], generator, low_discrepancy)
    low, high = gamma_range
    gamma = (low + u.double() * (high - low))
    operator = diffusion_operator(vocab_size)
    alpha = operator.alpha(gamma).clamp(max=ALPHA_MAX)
    t = schedule.time_for_mask_prob(1 - alpha).clamp(1e-5, 1).float()
    seeds = torch.randint(0, 2**62, (x0.shape[0],), generator=generator)
    dev = x0.device
    slope = operator.alpha_prime(gamma) * (high - low)
    return GaussianCorruption(gamma.float().to(dev), t.to(dev), alpha.float().to(dev), slope.float().to(dev), seeds, tau, vocab_size)


def relaxed_loss(model, x0: torch.Tensor, noise: GaussianCorruption) -> torch.Tensor:
    """Duo's curriculum loss: x0 (B, L) -> (B,) nats/token. The network sees softmax(w_t / tau) (``soft_tokens``)
    and the UDLM integrand scores the discrete z_t = argmax(w_t) at alpha = T(gamma)."""
    eps = row_normals(noise.seeds, (x0.shape[1], noise.vocab_size), x0.device)
    w = gaussian_latents(x0, noise.gamma, eps)
    zt = w.argmax(dim=-1)
    return udlm_loss(model, x0, UniformCorruption(zt, noise.t, noise.alpha, noise.alpha_prime), soft_tokens=relaxed_input(w, noise.tau))

