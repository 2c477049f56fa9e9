"""Ancestral (MDLM / RADD "Tweedie") sampler. Reference section 4.

Steps t_0 = 1 > t_1 > ... > t_n = 0 uniform in t. From t to s each still-masked position stays
masked with probability (1 - alpha(s)) / (1 - alpha(t)) and otherwise takes a token from
p_theta(. | x_t). Drawn in two stages with the same distribution as one categorical over V + 1
outcomes (the MDLM form): first which masked positions unmask (float64 by default, so the small
unmask probabilities of many-step sampling are not lost), then a token at those positions only.
The network is called only on rows where something unmasks (its output elsewhere would be unused),
so NFE <= steps. Exact only as steps >> L: tokens unmasked in the same step are drawn from
factorised marginals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.sampling.base import (
    Conditioning, Sampler, SamplerConfig, SamplerState, check_steps, dtype_of, fill, open_positions, predict, start_state,
)
from unmask.schedule import Schedule


@dataclass(frozen=True)
class AncestralConfig(SamplerConfig):
    steps: int = 128
    schedule: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_steps(self.steps)
        Schedule(self.schedule)  # validates the name


@dataclass(frozen=True)
class AncestralState(SamplerState):
    """``logits`` (B, L, V): the cached sampler's last network output per row at its masked
    positions; ``fresh`` (B,): the row has not changed since that output."""

    logits: torch.Tensor | None = None
    fresh: torch.Tensor | None = None


def stay_probability(schedule: Schedule, t: float, s: float) -> float:
    """(1 - alpha(s)) / (1 - alpha(t)): a masked token at time t is still masked at s < t."""
    m_t = schedule.mask_prob(torch.tensor(t, dtype=torch.float64))
    m_s = schedule.mask_prob(torch.tensor(s, dtype=torch.float64))
    return (m_s / m_t).clamp(0, 1).item()


def start(model, x: torch.Tensor, config: AncestralConfig, eligible=None, cache=None) -> AncestralState:
    return start_state(model, x, eligible, cache, cls=AncestralState, fresh=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))


def step(
    model, state: AncestralState, generator: torch.Generator, config: AncestralConfig, cond: Conditioning | None = None,
    reuse: bool = False,
) -> AncestralState:
    """From t = 1 - step/steps to s = t - 1/steps. ``reuse``: the cached sampler (see :mod:`cached`)."""
    x = state.tokens
    t, s = (config.steps - state.step) / config.steps, (config.steps - state.step - 1) / config.steps
    can = open_positions(x, model.config.mask_id, state.eligible)
    stay = stay_probability(Schedule(config.schedule), t, s)
    unmask = torch.zeros_like(can)
    unmask[can] = torch.rand(int(can.sum()), generator=generator, dtype=dtype_of(config.precision), device=x.device) >= stay
    moving = unmask.any(dim=1)
    time = torch.full((x.shape[0],), t, dtype=torch.float64)
    buffer, fresh = state.logits, state.fresh
    if reuse:  # predict every masked position of the rows whose cached output is stale, keep it
        logits, called, cache = predict(model, state, (moving & ~fresh)[:, None] & can, cond, config.cfg_scale, time)
        if buffer is None:
            buffer = torch.zeros((*x.shape, logits.shape[-1]), dtype=logits.dtype, device=x.device)
        buffer[(moving & ~fresh)[:, None] & can] = logits
        logits, fresh = buffer[unmask], (fresh | called) & ~moving
    else:
        logits, called, cache = predict(model, state, unmask, cond, config.cfg_scale, time)
    new = fill(x, unmask, logits, generator, config)
    done = state.step + 1 == config.steps or not bool(open_positions(new, model.config.mask_id, state.eligible).any())
    return state.advance(new, called, cache, done=done, logits=buffer, fresh=fresh)


ancestral = Sampler("ancestral", AncestralConfig, start, step)
