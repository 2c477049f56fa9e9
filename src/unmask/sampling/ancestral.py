"""Ancestral (MDLM / RADD "Tweedie") sampler. docs/algorithms.md, 'Ancestral sampler'.

Steps t_0 = 1 > t_1 > ... > t_n = 0 uniform in t. From t to s each still-masked position stays
masked with probability (1 - alpha(s)) / (1 - alpha(t)) and otherwise takes a token from
p_theta(. | x_t). Drawn in two stages with the same distribution as one categorical over V + 1
outcomes (the MDLM form): first which masked positions unmask (float64 by default, so the small
unmask probabilities of many-step sampling are not lost), then a token at those positions only.
The network is called only on rows where something unmasks (its output elsewhere would be unused),
so NFE <= steps: this is RADD's caching (a row that does not move needs no new output), with
expected calls per row n (1 - (1 - 1/n)^l) for n steps and l masked tokens, and it holds for
time-conditioned networks too. Exact only as steps >> L: tokens unmasked in the same step are
drawn from factorised marginals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.sampling.base import (
    Conditioning, Sampler, SamplerConfig, SamplerState, dtype_of, fill, open_positions, predict, settle, start_state,
)
from unmask.schedule import Schedule


@dataclass(frozen=True)
class AncestralConfig(SamplerConfig):
    steps: int = 128
    schedule: str = "linear"


def stay_probability(schedule: Schedule, t: float, s: float) -> float:
    """(1 - alpha(s)) / (1 - alpha(t)): a masked token at time t is still masked at s < t (host arithmetic)."""
    return min(max(schedule.mask_prob(s) / schedule.mask_prob(t), 0.0), 1.0)


def start(model, x: torch.Tensor, config: AncestralConfig, eligible=None, cache=None) -> SamplerState:
    return start_state(model, x, eligible, cache)


def step(model, state: SamplerState, generator: torch.Generator, config: AncestralConfig, cond: Conditioning | None = None) -> SamplerState:
    """From t = 1 - step/steps to s = t - 1/steps."""
    x = state.tokens
    t, s = (config.steps - state.step) / config.steps, (config.steps - state.step - 1) / config.steps
    can = open_positions(x, state.mask_id, state.eligible)
    stay = stay_probability(Schedule(config.schedule), t, s)
    unmask = can & (torch.rand(can.shape, generator=generator, dtype=dtype_of(config.precision), device=x.device) >= stay)
    time = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)  # made on the device: no copy from the host
    frame = state.frame(unmask)
    logits, called, cache = predict(model, state, unmask, cond, config.cfg_scale, time, frame)
    new = settle(state, fill(x, unmask, logits, generator, config, frame), unmask, logits, generator, config, cond)
    return state.advance(new, called, cache, done=state.finished(new, config.steps))


ancestral = Sampler("ancestral", AncestralConfig, start, step, static=True)
