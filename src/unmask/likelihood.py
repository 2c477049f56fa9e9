"""Likelihood evaluation. docs/algorithms.md, 'Monte Carlo estimation' and 'Exact chain rule'.

MDM: Monte Carlo ELBO (an upper bound on the NLL) over K stratified draws, with its standard
error. AR: exact NLL. Both score the same tokens: ``windows`` (N, L) of held-out text; the AR
model additionally conditions each window on the token just before it (``prev``), so that every
one of the N*L tokens is predicted by both models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from unmask.errors import UnmaskError, check_number, not_one_of
from unmask.device import device_of
from unmask.losses import ar_loss, k_dce, t_dce
from unmask.schedule import Schedule, mask_exactly

FOR_A_STANDARD_ERROR = " (a Monte Carlo estimate needs 2 draws or more for a standard error)"


@dataclass
class LikelihoodResult:
    """``nats_per_token`` and ``perplexity`` = exp(nats_per_token); for an MDM both are bounds."""

    kind: str  # "elbo" (MDM upper bound) or "exact" (AR, or an MDM's left-to-right chain rule)
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

    def headline(self) -> str:
        """The score as the training loop's validation line states it."""
        return f"{self.nats_per_token:.4f} nats/token (ppl {'<= ' if self.kind == 'elbo' else ''}{self.perplexity:.2f})"

    def extra(self) -> dict[str, float]:
        """Held-out figures beside the score, for the training loop's validation line (a classifier's
        accuracy: unmask.objectives.classifier); none for a likelihood."""
        return {}


def batch_slices(n: int, batch_size: int):
    """Slices of ``batch_size`` rows covering ``n`` (checked here, before any work, for every estimator;
    the scores of unmask.block_diffusion batch the same way)."""
    check_number("batch_size", batch_size, "> 0")
    return (slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size))


def window_groups(windows: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One (N, L) tensor, or several of different lengths (unpacked documents), as a list of the non-empty ones."""
    groups = [windows] if torch.is_tensor(windows) else [w for w in windows if w.numel()]
    if not groups or sum(g.shape[0] for g in groups) == 0:
        raise UnmaskError("no evaluation windows: the text is shorter than one window")
    return groups


@torch.no_grad()
def mc_elbo(
    model,
    windows: torch.Tensor | Sequence[torch.Tensor],
    draws: int = 16,
    estimator: str = "t-dce",
    schedule: Schedule = Schedule(),
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> LikelihoodResult:
    """Monte Carlo negative ELBO in nats/token of an MDM on windows (N, L) (or a list of such groups).

    Sequence s gets the stratified times t_sj = (u_s + j/K) mod 1, j < K (docs/algorithms.md, 'Monte Carlo estimation'),
    so draw j alone is an unbiased estimate over the whole set. The reported standard error is
    std_j / sqrt(K) over those K per-draw estimates; stratification makes the draws negatively
    correlated, so this SE is conservative. ``estimator``: "t-dce"; "k-dce" masks k = ceil(t L)
    tokens; "any-order" averages -log p over one uniformly random decoding order per draw (the
    RADD identity: its expectation is the same bound; L network calls per draw).

    t-DCE integrates over ``schedule`` with eps = 0, whatever eps training used: only then does the
    mask probability reach 1 at t = 1 and the estimate is an upper bound (with eps = 1e-3 it
    misses ~eps x the all-masked loss, 0.007 nats/token at V = 4096). The bound stays valid for any
    network, because it is the ELBO of the reverse process that calls the network at (x_t, t)
    under this schedule; a time-conditioned network trained with eps = 1e-3 then sees mask rate t
    instead of (1 - eps) t at time t (t = 1: everything masked), a 0.1% shift of its input time.
    """
    check_number("draws", draws, ">= 2", FOR_A_STANDARD_ERROR)
    if estimator not in ("t-dce", "k-dce", "any-order"):
        raise not_one_of("estimator", estimator, "t-dce, k-dce, any-order, chain-rule")
    groups = window_groups(windows)
    schedule = replace(schedule, eps=0.0)
    gen = torch.Generator().manual_seed(seed)
    device = device_of(model)
    per_draw = torch.zeros(draws, dtype=torch.float64)  # total nats of the whole set, per draw
    total_seqs = sum(g.shape[0] for g in groups)
    num_tokens = sum(g.numel() for g in groups)
    bar = tqdm(total=total_seqs * draws, desc=f"mc-elbo ({estimator})", unit="seq", disable=not progress)
    for group in groups:
        l = group.shape[1]
        for sl in batch_slices(group.shape[0], batch_size):
            x0 = group[sl].to(device)
            u0 = torch.rand(x0.shape[0], generator=gen)
            for j in range(draws):
                t = ((u0 + j / draws) % 1.0).clamp_min(1e-5)
                if estimator == "t-dce":
                    nats = t_dce(model, x0, schedule, gen, mask_id=model.config.mask_id, t=t) * l
                elif estimator == "k-dce":
                    nats = k_dce(model, x0, gen, mask_id=model.config.mask_id, u=t) * l
                else:
                    nats = -chain_rule(model, x0, order="random", generator=gen).logprob
                per_draw[j] += nats.double().sum().cpu()
                bar.update(x0.shape[0])
    bar.close()
    per_draw /= num_tokens
    mean = per_draw.mean().item()
    stderr = per_draw.std(unbiased=True).item() / math.sqrt(draws)
    return LikelihoodResult("elbo", mean, stderr, math.exp(mean), num_tokens, draws, estimator)


@torch.no_grad()
def ar_nll(
    model, windows: torch.Tensor | Sequence[torch.Tensor], prev: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 16, progress: bool = False
) -> LikelihoodResult:
    """Exact NLL in nats/token of an AR model on windows (N, L), each preceded by prev (N,)."""
    groups = window_groups(windows)
    prevs = [prev] if torch.is_tensor(prev) else list(prev)
    device = device_of(model)
    total = 0.0
    num_tokens = sum(g.numel() for g in groups)
    bar = tqdm(total=sum(g.shape[0] for g in groups), desc="ar-nll", unit="seq", disable=not progress)
    for group, before in zip(groups, prevs):
        for sl in batch_slices(group.shape[0], batch_size):
            full = torch.cat([before[sl, None], group[sl]], dim=1).to(device)
            total += (ar_loss(model, full).double() * group.shape[1]).sum().item()
            bar.update(full.shape[0])
    bar.close()
    mean = total / num_tokens
    return LikelihoodResult("exact", mean, 0.0, math.exp(mean), num_tokens, 1, "ar")


@torch.no_grad()
def response_nll(model, rows: torch.Tensor, response: torch.Tensor, draws: int = 16, batch_size: int = 16, seed: int = 0) -> LikelihoodResult:
    """Nats per response token of fine-tuning rows (N, T) given their prompts; ``response`` (N, T)
    bool marks the response regions (unmask.data.pairs). AR: exact. MDM: the conditional bound
    of :func:`conditional_elbo` (k-DCE over the response, prompt clean), with its standard error."""
    device = device_of(model)
    num_tokens = int(response.sum())
    total, variance = 0.0, 0.0
    gen = torch.Generator().manual_seed(seed)
    for sl in batch_slices(rows.shape[0], batch_size):
        x, scored = rows[sl].to(device), response[sl].to(device)
        if model.config.causal:
            total += (ar_loss(model, x, scored[:, 1:]).double() * scored[:, 1:].sum(dim=1)).sum().item()
        else:
            mean, se = conditional_elbo(model, x, scored, draws, gen)
            total -= mean.sum().item()
            variance += (se**2).sum().item()
    mean = total / num_tokens
    if model.config.causal:
        return LikelihoodResult("exact", mean, 0.0, math.exp(mean), num_tokens, 1, "ar")
    return LikelihoodResult("elbo", mean, math.sqrt(variance) / num_tokens, math.exp(mean), num_tokens, draws, "k-dce")


@torch.no_grad()
def chain_rule_nll(model, windows: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 16, progress: bool = False) -> LikelihoodResult:
    """Exact NLL of an MDM decoded left to right, one position per network call (L calls a window).

    A proper likelihood of one factorisation of the MDM, so no bound: usually worse than the ELBO,
    which averages over all orders the model was trained on.
    """
    groups = window_groups(windows)
    device = device_of(model)
    total = 0.0
    num_tokens = sum(g.numel() for g in groups)
    bar = tqdm(total=sum(g.shape[0] for g in groups), desc="chain-rule", unit="seq", disable=not progress)
    for group in groups:
        for sl in batch_slices(group.shape[0], batch_size):
            total -= chain_rule(model, group[sl].to(device)).logprob.sum().item()
            bar.update(group[sl].shape[0])
    bar.close()
    mean = total / num_tokens
    return LikelihoodResult("exact", mean, 0.0, math.exp(mean), num_tokens, 1, "chain-rule")


def previous_tokens(windows: torch.Tensor, first: int) -> torch.Tensor:
    """For consecutive windows (N, L) of one token stream: the token before each window (N,).

    The first window is preceded by ``first`` (the EOS/document separator).
    """
    return torch.cat([torch.tensor([first], dtype=windows.dtype), windows[:-1, -1]])


def decoding_ranks(score_mask: torch.Tensor, order: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank of each scored position in the decoding order (B, L) int64; -1 at unscored positions.

    "left-to-right": ranks 0, 1, ... from the left; "random": a uniformly random order per row.
    """
    if order == "left-to-right":
        ranks = score_mask.long().cumsum(dim=1) - 1
    elif order == "random":
        keys = torch.rand(score_mask.shape, generator=generator).to(score_mask.device)
        keys = keys.masked_fill(~score_mask, 2.0)  # unscored positions sort last
        ranks = keys.argsort(dim=1).argsort(dim=1)
    else:
        raise not_one_of("order", order, "left-to-right, random")
    return torch.where(score_mask, ranks, torch.full_like(ranks, -1))


@dataclass
class ChainRuleScore:
    logprob: torch.Tensor  # (B,) float64: sum of log p over the scored positions
    greedy: torch.Tensor  # (B,) bool: every scored token was the argmax when it was decoded
    nfe: int


@torch.no_grad()
def chain_rule(
    model,
    tokens: torch.Tensor,
    score_mask: torch.Tensor | None = None,
    order: str = "left-to-right",
    generator: torch.Generator | None = None,
    cfg_scale: float = 0.0,
    prompt_mask: torch.Tensor | None = None,
) -> ChainRuleScore:
    """Exact log-likelihood of an MDM under a fixed decoding order (SMDM "chain_rule", RADD "ar_forward").

    tokens (B, L); ``score_mask`` (B, L) bool marks the positions to score (default: all). They start
    masked; unscored positions are context (clean tokens, or MASK to hide them). Pass j unmasks the position of rank j in each row
    after scoring log p(x_i | context, earlier positions). max_b(#scored) network calls.
    With ``cfg_scale`` w, logits are guided by the context-free pass: the positions of ``prompt_mask``
    (B, L) bool (default: all the context) replaced by MASK.
    A time-conditioned network is given t = the fraction of masked positions of its input row.
    """
    from unmask.guidance import guided_logits

    if score_mask is None:
        score_mask = torch.ones_like(tokens, dtype=torch.bool)
    score_mask = score_mask.bool()
    ranks = decoding_ranks(score_mask, order, generator)
    x = torch.where(score_mask, torch.full_like(tokens, model.config.mask_id), tokens)
    logprob = torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    greedy = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    steps = int(score_mask.sum(dim=1).max().item()) if tokens.numel() else 0
    context = ~score_mask if prompt_mask is None else prompt_mask.bool()
    scored = torch.where(score_mask, tokens, 0)  # context may hold MASK (hidden context), which has no logit
    for j in range(steps):
        logits = guided_logits(model, x, context, cfg_scale).double()
        now = ranks == j  # (B, L): at most one position per row
        logp = torch.log_softmax(logits, dim=-1).gather(-1, scored[..., None]).squeeze(-1)
        logprob += (logp * now).sum(dim=1)
        hit = logits.argmax(dim=-1) == scored
        greedy &= (hit | ~now).all(dim=1)
        x = torch.where(now, tokens, x)
    return ChainRuleScore(logprob, greedy, steps)


@torch.no_grad()
def conditional_elbo(
    model,
    tokens: torch.Tensor,
    score_mask: torch.Tensor,
    draws: int = 32,
    generator: torch.Generator | None = None,
    cfg_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo lower bound on log p(scored tokens | context), per row, with its standard error.

    k-DCE restricted to the scored positions (the context stays clean): k_b = ceil(u n_b) of the
    n_b scored tokens are masked, uniformly; the draw's value is (n_b / k_b) * sum of their
    log-probs. u is stratified over the K draws. Returns (mean (B,), stderr (B,)), float64.
    A time-conditioned network is given t = the fraction of masked positions of the whole row
    (context included), as k-DCE training gives it k / L.
    """
    from unmask.guidance import guided_logits

    check_number("draws", draws, ">= 2", FOR_A_STANDARD_ERROR)
    score_mask = score_mask.bool()
    n = score_mask.sum(dim=1)
    scored = torch.where(score_mask, tokens, 0)  # context may hold MASK, which has no logit
    u0 = torch.rand(tokens.shape[0], generator=generator)
    values = []
    for j in range(draws):
        u = ((u0 + j / draws) % 1.0).to(tokens.device)
        k = torch.ceil(u * n).clamp(min=1)
        x, masked = mask_exactly(tokens, k, model.config.mask_id, generator, eligible=score_mask)
        logits = guided_logits(model, x, ~score_mask, cfg_scale).double()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, scored[..., None]).squeeze(-1)
        values.append((logp * masked).sum(dim=1) * n / k)
    stacked = torch.stack(values)  # (K, B)
    return stacked.mean(dim=0), stacked.std(dim=0) / math.sqrt(draws)
