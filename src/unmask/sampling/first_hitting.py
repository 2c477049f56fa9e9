"""First-hitting sampler (Zheng et al., Prop. 4.1). docs/algorithms.md, 'First-hitting sampler'.

With n masked tokens at time t the next unmasking time solves 1 - alpha(tau) = (1 - alpha(t)) u^(1/n);
then ONE uniformly chosen masked position takes a token from p_theta. Exactly L network calls for
L masked tokens, distributionally identical to the continuous-time chain (no factorisation error),
and one categorical over V per event instead of L x (V + 1). With a time-agnostic network it is
random-order AO-ARM decoding; the time law matters only to a time-conditioned network, which is
called at the hitting time tau (the state is still x on (tau, t]). The parallel variant unmasks k
positions per call (k = 1 is exact): the k event times are chained, the network is called at the
first of them and the row's time moves to the last, so call j happens at event jk + 1 of the exact
chain. The per-row times are part of the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.sampling.base import (
    Conditioning, Sampler, SamplerConfig, SamplerState, fill, open_positions, predict, random_subset, settle, start_state,
)
from unmask.schedule import Schedule


@dataclass(frozen=True)
class FirstHittingConfig(SamplerConfig):
    k: int = 1  # positions unmasked per network call (1: the exact first-hitting sampler)
    schedule: str = "linear"


@dataclass(frozen=True)
class FirstHittingState(SamplerState):
    t: torch.Tensor | None = None  # (B,) float64: each row's current time


def start(model, x: torch.Tensor, config: FirstHittingConfig, eligible=None, cache=None) -> FirstHittingState:
    return start_state(model, x, eligible, cache, cls=FirstHittingState, t=torch.ones(x.shape[0], dtype=torch.float64, device=x.device))


def event_mask_probs(m: torch.Tensor, n: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - alpha at the first and at the last of the next min(k, n) unmask events of each row, from
    1 - alpha(t) = m (B,) with n (B,) masked positions: each event is the first of the remaining
    exponential-race events, m_i = m_(i-1) u_i^(1 / (n - i + 1)) (Zheng et al., Prop. 4.1)."""
    u = torch.rand((m.shape[0], k), generator=generator, dtype=torch.float64, device=m.device)
    left = n[:, None] - torch.arange(k, device=m.device)  # masked positions before each event
    log_u = torch.where(left > 0, u.log() / left.clamp(min=1).double(), 0.0)
    return m * log_u[:, 0].exp(), m * log_u.sum(dim=1).exp()


def step(model, state: FirstHittingState, generator: torch.Generator, config: FirstHittingConfig, cond: Conditioning | None = None) -> FirstHittingState:
    """Unmask min(k, n) uniformly chosen positions per row; the network is called at the time of the
    first of those events (the state is unchanged until then) and the row's time moves to the last."""
    schedule, x = Schedule(config.schedule), state.tokens
    can = open_positions(x, state.mask_id, state.eligible)
    n = can.sum(dim=1)
    first, last = event_mask_probs(schedule.mask_prob(state.t), n, config.k, generator)
    call, t = (torch.where(n > 0, schedule.time_for_mask_prob(m), state.t) for m in (first, last))
    pick = random_subset(can, torch.full_like(n, config.k), generator)
    frame = state.frame(pick)
    logits, called, cache = predict(model, state, pick, cond, config.cfg_scale, call.float(), frame)
    new = settle(state, fill(x, pick, logits, generator, config, frame), pick, logits, generator, config, cond)
    last = -(-state.open_max // config.k) if state.static else x.shape[1] + 1  # static: k events per call in every unfinished row
    return state.advance(new, called, cache, done=state.finished(new, last), t=t)


first_hitting = Sampler("first-hitting", FirstHittingConfig, start, step, static=True, width=lambda config, most: min(config.k, most))
