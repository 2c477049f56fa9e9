"""Sequential Monte Carlo (twisted SMC with the sampler as proposal): N particles per prompt, each
stepped by the sampler; after a step x_t -> x_s a particle's log-weight grows by
(v(x_s) - v(x_t)) / alpha, v(x) = r(x̂0(x)) (:mod:`unmask.steering.value`); a prompt's particles are
resampled (systematic) when their effective sample size falls below ess x N. At the end no MASK is
left and v = r, so the weights telescope to exp((r(x) - v(x_start)) / alpha) and the particles
target p(x) exp(r(x) / alpha) / Z as N grows. docs/algorithms.md, 'Reward- and energy-guided decoding'.

The end of every block (and of the decoding) resamples regardless of the ESS (unless a group's
weights are all equal already), so that a prompt's particles leave it with equal weights: a block
then starts from particles whose weights need not be carried, and the particle kept at the end is
the first of its group, a draw by weight (:func:`~unmask.steering.particles.systematic` leaves no
slot favouring an ancestor; a group never resampled holds independent particles). The first block's
particles start equal and need no value; a later block's start values cost one estimate.
Cost per step: the sampler's call over the N particles, one estimate call over them, one reward call
on N sequences per prompt. When the weights never differ (a constant reward) nothing is ever moved
and SMC decodes token for token as the unguided sampler over the N copies of each prompt; a huge
alpha gives the unguided sampler's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.errors import check_number
from unmask.steering.guide import Guide, GuidedState, first_rows
from unmask.steering.options import check_guide_fields
from unmask.steering.particles import effective_size, systematic, take_rows
from unmask.steering.value import value


@dataclass(frozen=True)
class SMCConfig:
    particles: int = 4  # N particles per prompt
    alpha: float = 0.1  # the target is p(x) exp(r(x) / alpha)
    ess: float = 0.5  # resample when ESS < ess x N

    def __post_init__(self) -> None:
        check_guide_fields(self)
        check_number("alpha", self.alpha, "> 0", " for smc (its weights are exp(value / alpha))")


def start_values(steering, model, state: GuidedState, config, cond) -> GuidedState:
    """The particles' log-weights (zero) and values at a block's start (zero while every group's
    particles are alike: a value common to a group does not change its normalised weights)."""
    tokens, n = state.tokens, steering.group
    alike = bool((tokens.view(-1, n, tokens.shape[1]) == tokens.view(-1, n, tokens.shape[1])[:, :1]).all())
    inner = state.inner
    if alike:
        v = torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    else:
        v, inner = value(steering, model, inner, cond, config.cfg_scale)
    return replace(state, inner=inner, log_w=torch.zeros_like(v), value=v)


def step(steering, sampler, model, state: GuidedState, generator: torch.Generator, config, cond) -> GuidedState:
    """One sampler step of every particle, its weight update and, where needed, resampling."""
    if state.log_w is None:
        state = start_values(steering, model, state, config, cond)
    cfg, n = steering.config, steering.group
    moved = sampler.step(model, state.inner, generator, config, cond)
    v, moved = value(steering, model, moved, cond, config.cfg_scale)
    log_w = state.log_w + (v - state.value) / cfg.alpha
    groups = log_w.view(-1, n)
    due = effective_size(groups) < cfg.ess * n
    if moved.done:  # a block's end: every group leaves with equal weights
        due = ~(groups == groups[:, :1]).all(dim=1)
    if not bool(due.any()):
        return GuidedState(moved, log_w, v)
    cols = torch.arange(n, device=groups.device)
    ancestors = torch.where(due[:, None], systematic(groups, steering.side), cols)
    index = (ancestors + torch.arange(0, log_w.numel(), n, device=groups.device)[:, None]).flatten()
    log_w = torch.where(due[:, None], 0.0, groups).flatten()
    return GuidedState(take_rows(moved, index, keep=("row_nfe",)), log_w, v[index])


def choose(steering, tokens: torch.Tensor) -> torch.Tensor:
    return first_rows(steering, tokens)


smc = Guide("smc", SMCConfig, "reward", True, step, choose)
