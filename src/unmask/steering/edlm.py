"""EDLM (Xu et al. 2024, energy-based diffusion language models): the denoiser's factorised proposal
q(x0 | x_t) = prod_i p_theta(x0^i | x_t) corrected by a sequence energy, in the early steps where
the factorisation error is largest. docs/algorithms.md, 'Reward- and energy-guided decoding'.

At a step inside the window (more than 1 - ``window`` of the block still masked): K full candidates
x0^(k) ~ q (every MASK of the rows filled), weights w_k proportional to exp(-E(x0^(k))) / q(x0^(k) | x_t),
one candidate picked by self-normalised importance sampling, then the sampler's step toward it:
the positions the step commits take the picked candidate's tokens (``Conditioning.target``, applied
by :func:`unmask.sampling.base.settle`). For ancestral and first-hitting decoding that is the
posterior step q(x_s | x_t, x0); confidence and threshold decoding still choose their positions by
the network's confidence and take their tokens from x0. With E = -log p the data's own
log-likelihood, one step with K -> infinity samples p exactly. Outside the window: the plain
sampler step.

q is the sampling distribution of the sampler's config (temperature, top-k, top-p; at temperature
0, which would give K identical candidates, the network's own distribution). Cost per corrected
step: one network call over the rows (a full forward at every MASK), the sampler's own call, and an
energy call on K sequences per row. The candidates and the pick draw from the guide's generator, so
the sampler's own draws, and with ``window`` = 0 its tokens, are those of the unguided decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.sampling.base import SamplerState, categorical, open_positions, token_log_probs
from unmask.steering.guide import Guide, GuidedState, first_rows
from unmask.steering.options import check_guide_fields
from unmask.steering.value import denoised


@dataclass(frozen=True)
class EDLMConfig:
    particles: int = 8  # K candidates per corrected step
    window: float = 0.25  # correct while more than 1 - window of the block is masked

    def __post_init__(self) -> None:
        check_guide_fields(self)


def draws(log_weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k independent categorical draws per row of log_weights (N, V), proportional to their exp:
    (N, k), by inverse CDF in float64 (one cumulative sum per row for all k draws)."""
    w = (log_weights.double() - log_weights.double().amax(dim=-1, keepdim=True)).exp()
    cdf = w.cumsum(dim=-1)
    u = torch.rand((w.shape[0], k), generator=generator, dtype=torch.float64, device=w.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=w.shape[-1] - 1)


def pick_target(steering, model, state: SamplerState, inside: torch.Tensor, config, cond) -> tuple[torch.Tensor, SamplerState]:
    """The picked candidate x0 (R, w) of every row ``inside`` (MASK in the other rows), and the
    state with the proposal's network call counted."""
    k, mask_id = steering.config.particles, state.mask_id
    want = (state.tokens == mask_id) & inside[:, None]
    _, logits, counted = denoised(model, state, cond, config.cfg_scale, want)
    proposal = config if config.temperature != 0 else replace(config, temperature=1.0)
    log_q = token_log_probs(logits, proposal)
    drawn = draws(log_q, k, steering.side)  # (N, K)
    rows = inside.nonzero().squeeze(1)  # (Rw,)
    slot = torch.full(inside.shape, -1, dtype=torch.long, device=inside.device)
    slot[rows] = torch.arange(rows.numel(), device=inside.device)
    log_q_x0 = torch.zeros((rows.numel(), k), dtype=torch.float64, device=logits.device)
    log_q_x0.index_add_(0, slot[want.nonzero()[:, 0]], log_q.gather(1, drawn).double())
    x0 = state.tokens[rows].unsqueeze(0).repeat(k, 1, 1)  # (K, Rw, w)
    x0[:, want[rows]] = drawn.T
    flat_rows = rows.repeat(k)
    log_p = steering.meter.log_density(steering.score, steering.candidates(x0.flatten(0, 1), flat_rows)).to(logits.device)
    log_w = torch.nan_to_num(log_p.view(k, -1).T - log_q_x0, nan=-1e300, neginf=-1e300)  # (Rw, K); none finite: uniform
    pick = categorical(log_w, steering.side)[0]
    target = torch.full_like(state.tokens, mask_id)
    target[rows] = x0[pick, torch.arange(rows.numel(), device=pick.device)]
    return target, counted


def step(steering, sampler, model, state: GuidedState, generator: torch.Generator, config, cond) -> GuidedState:
    """The sampler's step, toward an importance-sampled x0 in the rows inside the window."""
    inner = state.inner
    can = open_positions(inner.tokens, inner.mask_id, inner.eligible)
    total = can.sum(dim=1) if state.total is None else state.total
    inside = can.any(dim=1) & (can.sum(dim=1) > (1 - steering.config.window) * total)
    if not bool(inside.any()):
        return replace(state, inner=sampler.step(model, inner, generator, config, cond), total=total)
    target, inner = pick_target(steering, model, inner, inside, config, cond)
    return replace(state, inner=sampler.step(model, inner, generator, config, replace(cond, target=target)), total=total)


def choose(steering, tokens: torch.Tensor) -> torch.Tensor:
    return first_rows(steering, tokens)


edlm = Guide("edlm", EDLMConfig, "energy", False, step, choose)
