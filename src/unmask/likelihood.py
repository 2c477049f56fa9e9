"""Likelihood evaluation. Reference section 3.

MDM: Monte Carlo ELBO (an upper bound on the NLL) over K stratified draws, with its standard
error. AR: exact NLL. Both score the same tokens: ``windows`` (N, L) of held-out text; the AR
model additionally conditions each window on the token just before it (``prev``), so that every
one of the N*L tokens is predicted by both models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from unmask.errors import UnmaskError
from unmask.objectives import ar_loss, device_of, k_dce, t_dce
from unmask.schedule import Schedule


@dataclass
class LikelihoodResult:
    """``nats_per_token`` and ``perplexity`` = exp(nats_per_token); for an MDM both are bounds."""

    kind: str  # "elbo" (MDM upper bound) or "exact" (AR)
    nats_per_token: float
    stderr: float  # Monte Carlo standard error of nats_per_token (0 for exact)
    perplexity: float
    num_tokens: int
    draws: int
    estimator: str

    @property
    def perplexity_stderr(self) -> float:
        """Delta method: SE of exp(x) is exp(x) SE(x)."""
        return self.perplexity * self.stderr

    def to_dict(self) -> dict:
        return asdict(self) | {"perplexity_stderr": self.perplexity_stderr}


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def mc_elbo(
    model,
    windows: torch.Tensor,
    draws: int = 16,
    estimator: str = "t-dce",
    schedule: Schedule = Schedule(),
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> LikelihoodResult:
    """Monte Carlo negative ELBO in nats/token of an MDM on windows (N, L).

    Sequence s gets the stratified times t_sj = (u_s + j/K) mod 1, j < K (reference section 3),
    so draw j alone is an unbiased estimate over the whole set. The reported standard error is
    std_j / sqrt(K) over those K per-draw estimates; stratification makes the draws negatively
    correlated, so this SE is conservative. ``estimator`` "k-dce" uses k = ceil(t L) masked tokens.
    """
    if draws < 2:
        raise UnmaskError(f"--draws={draws}: the Monte Carlo ELBO needs at least 2 draws for a standard error")
    if estimator not in ("t-dce", "k-dce"):
        raise UnmaskError(f"--estimator {estimator!r} is not one of: t-dce, k-dce")
    n = windows.shape[0]
    if n == 0:
        raise UnmaskError("no evaluation windows: the split is shorter than one context length")
    gen = torch.Generator().manual_seed(seed)
    device = device_of(model)
    per_draw = torch.zeros(draws, dtype=torch.float64)
    bar = tqdm(total=n * draws, desc="mc-elbo", unit="seq", disable=not progress)
    for sl in _batches(n, batch_size):
        x0 = windows[sl].to(device)
        u0 = torch.rand(x0.shape[0], generator=gen)
        for j in range(draws):
            t = ((u0 + j / draws) % 1.0).clamp_min(1e-5)
            if estimator == "t-dce":
                loss = t_dce(model, x0, schedule, gen, t=t)
            else:
                loss = k_dce(model, x0, gen, u=t)
            per_draw[j] += loss.double().sum().cpu()
            bar.update(x0.shape[0])
    bar.close()
    per_draw /= n
    mean = per_draw.mean().item()
    stderr = per_draw.std(unbiased=True).item() / math.sqrt(draws)
    return LikelihoodResult("elbo", mean, stderr, math.exp(mean), n * windows.shape[1], draws, estimator)


@torch.no_grad()
def ar_nll(model, windows: torch.Tensor, prev: torch.Tensor, batch_size: int = 16, progress: bool = False) -> LikelihoodResult:
    """Exact NLL in nats/token of an AR model on windows (N, L), each preceded by prev (N,)."""
    n = windows.shape[0]
    if n == 0:
        raise UnmaskError("no evaluation windows: the split is shorter than one context length")
    device = device_of(model)
    total = 0.0
    bar = tqdm(total=n, desc="ar-nll", unit="seq", disable=not progress)
    for sl in _batches(n, batch_size):
        full = torch.cat([prev[sl, None], windows[sl]], dim=1).to(device)
        total += ar_loss(model, full).double().sum().item()
        bar.update(full.shape[0])
    bar.close()
    mean = total / n
    return LikelihoodResult("exact", mean, 0.0, math.exp(mean), n * windows.shape[1], 1, "chain-rule")


def previous_tokens(windows: torch.Tensor, first: int) -> torch.Tensor:
    """For consecutive windows (N, L) of one token stream: the token before each window (N,).

    The first window is preceded by ``first`` (the EOS/document separator).
    """
    return torch.cat([torch.tensor([first], dtype=windows.dtype), windows[:-1, -1]])
