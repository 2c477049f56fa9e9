"""Masking schedules alpha(t) and the forward (noising) process. docs/algorithms.md, 'Masking schedule'.

alpha(t) is the probability that a token is still clean at time t in [0, 1]:
linear (log-linear) 1 - alpha(t) = (1 - eps) t, or cosine 1 - alpha(t) = 1 - cos(pi t / 2).
Training uses eps = 1e-3; likelihood evaluation uses eps = 0 (see ``Schedule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unmask.errors import UnmaskError

LINEAR_EPS = 1e-3
SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """``kind`` "linear" or "cosine"; ``eps``: the linear schedule's 1 - alpha(1) gap (cosine has none).

    eps = 1e-3 is a training convenience (MDLM's log-linear schedule). It is wrong for evaluation:
    with the mask probability capped at 1 - eps the ELBO integral stops short of the fully masked
    end and misses about eps x (the loss with every token masked), so the estimate falls below the
    bound. The Monte Carlo ELBO therefore integrates with eps = 0 (docs/algorithms.md, 'Monte Carlo estimation').
    """

    kind: str = "linear"
    eps: float = LINEAR_EPS

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UnmaskError(f"schedule {self.kind!r} is not one of: {', '.join(SCHEDULES)}")
        if not 0 <= self.eps < 1:
            raise UnmaskError(f"schedule eps={self.eps} must be in [0, 1)")

    def mask_prob(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """1 - alpha(t): probability that a token is masked at time t (a tensor, or a float on the host)."""
        if self.kind == "linear":
            return (1 - self.eps) * t
        sin = torch.sin if torch.is_tensor(t) else math.sin
        return 2 * sin(math.pi / 4 * t) ** 2  # = 1 - cos(pi t / 2), without cancellation at small t

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.mask_prob(t)

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt: -(1 - eps) (linear) or -(pi/2) sin(pi t / 2) (cosine); the uniform-state bound's rate."""
        if self.kind == "linear":
            return torch.full_like(t, -(1 - self.eps))
        return -(math.pi / 2) * torch.sin(math.pi / 2 * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) (= 1/t for the linear schedule)."""
        if self.kind == "linear":
            return 1 / t
        # (pi/2) sin(x) / (1 - cos x) with x = pi t / 2 equals (pi/2) / tan(x / 2): finite for small t
        return (math.pi / 2) / torch.tan(math.pi / 4 * t.double()).to(t.dtype)

    def time_for_mask_prob(self, m: torch.Tensor) -> torch.Tensor:
        """Inverse of mask_prob: the t at which 1 - alpha(t) = m."""
        if self.kind == "linear":
            return m / (1 - self.eps)
        return torch.arccos(1 - m) * 2 / math.pi


def masked_fraction(tokens: torch.Tensor, mask_id: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of MASK among the real positions of each row: tokens (B, L) -> (B,) float32.

    ``key_mask`` (B, L) False marks padding, which is not counted. This is the time a
    time-conditioned network is given where no chain time exists (confidence and threshold steps,
    chain-rule and conditional scoring): the t at which the linear schedule (eps = 0) masks that
    fraction in expectation; k-DCE trains with exactly this t = k / L.
    """
    masked = tokens == mask_id
    if key_mask is None:
        return masked.float().mean(dim=1)
    real = key_mask.bool()
    return (masked & real).sum(dim=1).float() / real.sum(dim=1).clamp_min(1).float()


def sample_times(batch: int, generator: torch.Generator, low_discrepancy: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """t in (eps, 1], shape (batch,). Low-discrepancy: t_i = (u + i / B) mod 1 (one u per batch).

    The lower clamp keeps w(t) = 1/t finite; its bias is O(eps) nats and far below the MC error.
    """
    if low_discrepancy:
        u = torch.rand((), generator=generator)
        t = (u + torch.arange(batch) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=generator)
    return t.clamp_min(eps)


def add_noise(x0: torch.Tensor, mask_prob: torch.Tensor, mask_id: int, generator: torch.Generator,
              eligible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token of x0 (B, L) independently with probability mask_prob (B,); with
    ``eligible`` (B, L) bool, only those positions (the response of an SFT row) may be masked.

    Returns (x_t, masked) with masked a (B, L) bool tensor. Random numbers come from ``generator``
    on the CPU so that runs are reproducible across devices.
    """
    u = torch.rand(x0.shape, generator=generator).to(x0.device)
    masked = u < mask_prob.to(x0.device)[:, None]
    if eligible is not None:
        masked &= eligible.to(x0.device)
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def mask_exactly(x0: torch.Tensor, k: torch.Tensor, mask_id: int, generator: torch.Generator,
                 eligible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask exactly k[b] uniformly chosen positions of row b of x0 (B, L) (k-DCE; docs/algorithms.md, 'MDM loss: t-DCE and k-DCE');
    with ``eligible`` (B, L) bool, k[b] of row b's eligible positions (all of them if it has fewer)."""
    b, l = x0.shape
    keys = torch.rand((b, l), generator=generator)
    if eligible is not None:  # ineligible positions sort after every eligible one
        keys = keys + (~eligible).cpu()
    ranks = keys.argsort(dim=1).argsort(dim=1).to(x0.device)
    masked = ranks < k.to(x0.device)[:, None]
    if eligible is not None:
        masked &= eligible.to(x0.device)
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked
