"""Ancestral (MDLM / RADD "Tweedie") sampler. Reference section 4.

Steps t_0 = 1 > t_1 > ... > t_n = 0 uniform in t. From t to s each still-masked position stays
masked with probability (1 - alpha(s)) / (1 - alpha(t)) and otherwise takes a token from
p_theta(. | x_t). Both events are drawn as ONE categorical over V + 1 outcomes (the MDLM form),
in float64 by default, so the small unmask probabilities of many-step sampling are not lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives import denoiser_logits
from unmask.sampling.base import Precision, SampleOutput, SamplerState, StepCallback, check_steps, dtype_of, exponential_race
from unmask.schedule import Schedule


@dataclass(frozen=True)
class AncestralConfig:
    steps: int = 128
    temperature: float = 1.0
    precision: Precision = "float64"
    schedule: str = "linear"


def ancestral_step(
    model, state: SamplerState, t: float, s: float, generator: torch.Generator, config: AncestralConfig
) -> SamplerState:
    """One step from time t to s < t. Unmasked tokens (prompt included) never change."""
    x = state.tokens
    mask_id = model.config.mask_id
    schedule = Schedule(config.schedule)
    dtype = dtype_of(config.precision)
    t_batch = torch.full((x.shape[0],), t)
    logits = denoiser_logits(model, x, t_batch).to(dtype)
    if config.temperature > 0:
        logp = torch.log_softmax(logits / config.temperature, dim=-1)
    else:  # temperature 0: all token mass on the argmax
        logp = torch.where(logits == logits.max(dim=-1, keepdim=True).values, 0.0, -torch.inf).to(dtype)
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    m_t = schedule.mask_prob(torch.tensor(t, dtype=torch.float64))
    m_s = schedule.mask_prob(torch.tensor(s, dtype=torch.float64))
    stay = (m_s / m_t).clamp(0, 1).item()  # (1 - alpha(s)) / (1 - alpha(t))
    log_unmask = torch.log1p(torch.tensor(-stay, dtype=dtype)) if stay < 1 else torch.tensor(-torch.inf, dtype=dtype)
    log_stay = torch.log(torch.tensor(stay, dtype=dtype)) if stay > 0 else torch.tensor(-torch.inf, dtype=dtype)
    weights = torch.cat([logp + log_unmask, log_stay.expand(*logp.shape[:-1], 1)], dim=-1)  # (B, L, V+1)
    draw = exponential_race(weights, generator, config.precision)  # index V == stay masked
    masked = x == mask_id
    new = torch.where(masked & (draw < model.config.vocab_size), draw, x)
    return state.advance(new, calls=1)


@torch.no_grad()
def ancestral(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    config: AncestralConfig = AncestralConfig(),
    callback: StepCallback | None = None,
) -> SampleOutput:
    """Fill every MASK of x (B, L) in ``config.steps`` steps; returns the tokens and NFE (= steps)."""
    check_steps(config.steps)
    state = SamplerState(x.clone())
    times = torch.linspace(1.0, 0.0, config.steps + 1, dtype=torch.float64).tolist()
    for t, s in zip(times[:-1], times[1:]):
        state = ancestral_step(model, state, t, s, generator, config)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step)
