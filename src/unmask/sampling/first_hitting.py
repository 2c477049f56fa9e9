"""First-hitting sampler (Zheng et al., Prop. 4.1). Reference section 4.

With n masked tokens at time t the next unmasking time solves 1 - alpha(tau) = (1 - alpha(t)) u^(1/n);
then ONE uniformly chosen masked position takes a token from p_theta. Exactly L network calls for
L masked tokens, distributionally identical to the continuous-time chain (no factorisation error),
and one categorical over V per event instead of L x (V + 1). With a time-agnostic network it is
random-order AO-ARM decoding; the time law matters only to a time-conditioned network, which is
called at the hitting time tau (the state is still x on (tau, t]). The parallel variant unmasks k
positions per call (k = 1 is exact), all at the time of the first of the k events, and the next
time is drawn from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.errors import UnmaskError
from unmask.sampling.base import open_positions, Conditioning, SampleOutput, SamplerConfig, SamplerState, StepCallback, fill, network, random_subset
from unmask.schedule import Schedule


@dataclass(frozen=True)
class FirstHittingConfig(SamplerConfig):
    k: int = 1  # positions unmasked per network call (1: the exact first-hitting sampler)
    schedule: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise UnmaskError(f"--k={self.k} must be a positive integer")


@torch.no_grad()
def first_hitting(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    config: FirstHittingConfig = FirstHittingConfig(),
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    eligible: torch.Tensor | None = None,
) -> SampleOutput:
    """Fill the MASKs of x (B, L) (those in ``eligible``); ceil(max masked / k) network calls."""
    schedule = Schedule(config.schedule)
    mask_id = model.config.mask_id
    state = SamplerState(x.clone())
    t = torch.ones(x.shape[0], dtype=torch.float64)  # per-row current time
    while True:
        can = open_positions(state.tokens, mask_id, eligible)
        n = can.sum(dim=1)
        if not n.any():
            break
        # next unmask time: the first of n exponential-race events, 1 - alpha(tau) = (1 - alpha(t)) u^(1/n)
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64, device=x.device).cpu()
        m = schedule.mask_prob(t) * u ** (1.0 / n.clamp(min=1).double().cpu())
        t = torch.where(n.cpu() > 0, schedule.time_for_mask_prob(m), t)
        logits = network(model, state.tokens, cond, config.cfg_scale, t.float())
        pick = random_subset(can, torch.full_like(n, config.k), generator)
        state = state.advance(fill(state.tokens, pick, logits, generator, config), calls=1)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step)
