"""Ancestral (MDLM / RADD "Tweedie") sampler. Reference section 4.

Steps t_0 = 1 > t_1 > ... > t_n = 0 uniform in t. From t to s each still-masked position stays
masked with probability (1 - alpha(s)) / (1 - alpha(t)) and otherwise takes a token from
p_theta(. | x_t). Both events are drawn as ONE categorical over V + 1 outcomes (the MDLM form),
in float64 by default, so the small unmask probabilities of many-step sampling are not lost.
Exact only as steps >> L: tokens unmasked in the same step are drawn from factorised marginals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.sampling.base import (
    open_positions,
    Conditioning, SampleOutput, SamplerConfig, SamplerState, StepCallback, check_steps, dtype_of, exponential_race, network,
    token_log_probs,
)
from unmask.schedule import Schedule


@dataclass(frozen=True)
class AncestralConfig(SamplerConfig):
    steps: int = 128
    schedule: str = "linear"


def stay_probability(schedule: Schedule, t: float, s: float) -> float:
    """(1 - alpha(s)) / (1 - alpha(t)): a masked token at time t is still masked at s < t."""
    m_t = schedule.mask_prob(torch.tensor(t, dtype=torch.float64))
    m_s = schedule.mask_prob(torch.tensor(s, dtype=torch.float64))
    return (m_s / m_t).clamp(0, 1).item()


def time_grid(steps: int) -> list[float]:
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def ancestral_step(
    model, state: SamplerState, t: float, s: float, generator: torch.Generator, config: AncestralConfig,
    cond: Conditioning | None = None, eligible: torch.Tensor | None = None,
) -> SamplerState:
    """One step from time t to s < t. Only masked ``eligible`` positions (default: all) may unmask."""
    x = state.tokens
    mask_id = model.config.mask_id
    dtype = dtype_of(config.precision)
    logp = token_log_probs(network(model, x, cond, config.cfg_scale, torch.full((x.shape[0],), t)), config)
    stay = torch.tensor(stay_probability(Schedule(config.schedule), t, s), dtype=dtype, device=logp.device)
    weights = torch.cat([logp + torch.log1p(-stay), torch.log(stay).expand(*logp.shape[:-1], 1)], dim=-1)  # (B, L, V+1)
    draw = exponential_race(weights, generator, config.precision)  # index V == stay masked
    can = open_positions(x, mask_id, eligible)
    new = torch.where(can & (draw < model.config.vocab_size), draw, x)
    return state.advance(new, calls=1)


@torch.no_grad()
def ancestral(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    config: AncestralConfig = AncestralConfig(),
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    eligible: torch.Tensor | None = None,
) -> SampleOutput:
    """Fill the MASKs of x (B, L) (those in ``eligible``) in ``config.steps`` steps; NFE = steps."""
    check_steps(config.steps)
    state = SamplerState(x.clone())
    times = time_grid(config.steps)
    for t, s in zip(times[:-1], times[1:]):
        state = ancestral_step(model, state, t, s, generator, config, cond, eligible)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step)
