"""SVDD (Li et al. 2024, soft value-based decoding): at every step M candidate next states, each the
sampler's step from the same state, each valued by the reward of its denoised estimate
v(x_s) = r(x̂0(x_s)) (:mod:`unmask.steering.value`), and one kept per row by softmax(v / alpha)
(alpha = 0: the argmax). docs/algorithms.md, 'Reward- and energy-guided decoding'.

Cost per step: the sampler's call for candidate 0, one call over the other M - 1 candidates, and one
network call over all M candidates for their estimates (a row forward per candidate), plus a reward
call on M sequences per row. Candidate 0 is the step the unguided sampler takes, with the decoding's
own generator; the others and the choice draw from the guide's generator. So when the values do not
tell the candidates apart (a constant reward, or any alpha with all values equal) SVDD keeps
candidate 0 and decodes token for token as the unguided sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.sampling.base import open_positions
from unmask.steering.guide import Guide, GuidedState, first_rows
from unmask.steering.options import check_guide_fields
from unmask.steering.particles import cat_rows, softmax_choice, take_rows
from unmask.steering.value import value


@dataclass(frozen=True)
class SVDDConfig:
    particles: int = 4  # M candidates per step
    alpha: float = 0.0  # softmax temperature of the choice; 0: the best candidate

    def __post_init__(self) -> None:
        check_guide_fields(self)


def step(steering, sampler, model, state: GuidedState, generator: torch.Generator, config, cond) -> GuidedState:
    """One sampler step, M times from the same state; the candidate kept per row by its value."""
    before, m = state.inner, steering.config.particles
    r = before.tokens.shape[0]
    own = sampler.step(model, before, generator, config, cond)  # the unguided step
    rows, every = torch.arange(r, device=before.tokens.device), own
    if m > 1:
        copies = rows.repeat_interleave(m - 1)
        others = sampler.step(model, take_rows(before, copies), steering.side, config, cond.rows(copies))
        every = replace(cat_rows(own, others), nfe=own.nfe + others.nfe - before.nfe)
        rows = torch.cat([rows, copies])
    values, valued = value(steering, model, every, cond.rows(rows), config.cfg_scale, rows)
    # candidate c of row i sits at i (c = 0) or at r + i (m - 1) + c - 1
    order = torch.cat([rows[:r, None], r + torch.arange(r * (m - 1), device=rows.device).view(r, m - 1)], dim=1)
    chosen = softmax_choice(values[order], steering.config.alpha, steering.side)
    pick = order.gather(1, chosen[:, None]).squeeze(1)
    spent = torch.zeros(r, dtype=torch.long, device=rows.device).index_add_(0, rows, valued.row_nfe - before.row_nfe[rows])
    new = take_rows(valued, pick, keep=("row_nfe",))
    done = (own.done and (m == 1 or others.done)) or not bool(open_positions(new.tokens, new.mask_id, new.eligible).any())
    new = replace(new, row_nfe=before.row_nfe + spent, nfe=valued.nfe, done=done)
    return replace(state, inner=new)


def choose(steering, tokens: torch.Tensor) -> torch.Tensor:
    return first_rows(steering, tokens)


svdd = Guide("svdd", SVDDConfig, "reward", False, step, choose)
