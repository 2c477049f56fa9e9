"""Cached ancestral sampler (RADD). Reference section 4.

Same chain as :mod:`ancestral`, drawn in two stages that give the same distribution: first, per
masked position, whether it unmasks between t and s (a two-outcome race, float64); then, only for
the positions that do, a token from p_theta. The network output is needed only in rows where
something unmasks, and it is reused while the row is unchanged since its last forward pass: with a
time-agnostic network that output is still exact. Expected calls per row for n uniform steps and l
masked tokens: n (1 - (1 - 1/n)^l).
"""

from __future__ import annotations

import torch

from unmask.errors import UnmaskError
from unmask.sampling.ancestral import AncestralConfig, stay_probability, time_grid
from unmask.sampling.base import (
    open_positions,
    Conditioning, SampleOutput, SamplerState, StepCallback, check_steps, dtype_of, exponential_race, fill, network, rows_of,
)
from unmask.schedule import Schedule


@torch.no_grad()
def cached_ancestral(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    config: AncestralConfig = AncestralConfig(),
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    eligible: torch.Tensor | None = None,
) -> SampleOutput:
    """Fill the MASKs of x (B, L) like :func:`ancestral`, skipping forward passes that cannot change."""
    if getattr(model.config, "time_conditioning", False):
        raise UnmaskError("--sampler cached needs a time-agnostic model; this one is time-conditioned (its output changes with t)")
    check_steps(config.steps)
    b, _ = x.shape
    mask_id = model.config.mask_id
    dtype = dtype_of(config.precision)
    schedule = Schedule(config.schedule)
    state = SamplerState(x.clone())
    cache: torch.Tensor | None = None  # (B, L, V) logits of each row's last forward
    fresh = torch.zeros(b, dtype=torch.bool, device=x.device)  # row unchanged since its cached forward
    row_nfe = torch.zeros(b, dtype=torch.long, device=x.device)
    times = time_grid(config.steps)
    for t, s in zip(times[:-1], times[1:]):
        tokens = state.tokens
        can = open_positions(tokens, mask_id, eligible)
        stay = torch.tensor(stay_probability(schedule, t, s), dtype=dtype, device=tokens.device)
        two = torch.stack([torch.log1p(-stay), torch.log(stay)]).expand(*tokens.shape, 2)
        unmask = can & (exponential_race(two, generator, config.precision) == 0)
        need = unmask.any(dim=1) & ~fresh
        calls = 0
        if need.any():
            rows = need.nonzero().squeeze(1)
            logits = network(model, tokens[rows], rows_of(cond, rows), config.cfg_scale)
            if cache is None:
                cache = torch.zeros((b, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
            cache[rows] = logits
            fresh[rows] = True
            row_nfe[rows] += 1
            calls = 1
        new = tokens
        if unmask.any():
            new = fill(tokens, unmask, cache, generator, config)
            fresh &= ~unmask.any(dim=1)
        state = state.advance(new, calls)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step, row_nfe)
