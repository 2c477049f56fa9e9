"""Threshold parallel decoding (Fast-dLLM). docs/algorithms.md, 'Threshold decoding'.

Each step draws a token x0 at every masked (eligible) position (temperature, top-k, top-p; argmax at
temperature 0, the default) and commits those whose probability p(x0) under the network's own
distribution softmax(logits) is >= tau: computed before any top-k/top-p renormalisation, which would
inflate it. At least the most probable proposal per row is always committed, so decoding never
stalls; the number of steps adapts to the model's confidence. A time-conditioned network is given
t = the fraction of masked positions of the row (padding excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.sampling.base import (
    Conditioning, Sampler, SamplerConfig, SamplerState, grid_uniforms, open_positions, predict, propose, scatter_rows, settle, start_state,
    top_per_row,
)
from unmask.sampling.shapes import POLL


@dataclass(frozen=True)
class ThresholdConfig(SamplerConfig):
    tau: float = 0.9
    temperature: float = 0.0


def start(model, x: torch.Tensor, config: ThresholdConfig, eligible=None, cache=None) -> SamplerState:
    return start_state(model, x, eligible, cache)


def step(model, state: SamplerState, generator: torch.Generator, config: ThresholdConfig, cond: Conditioning | None = None) -> SamplerState:
    x, mask_id = state.tokens, state.mask_id
    can = open_positions(x, mask_id, state.eligible)
    frame = state.frame(can)
    logits, called, cache = predict(model, state, can, cond, config.cfg_scale, frame=frame)
    x0, p = propose(logits, generator, config, None if config.temperature == 0 else grid_uniforms(can, generator, frame))
    p = scatter_rows(p, can, -torch.inf, frame)
    commit = (can & (p >= config.tau)) | top_per_row(p, can, can.any(dim=1).long())
    new = settle(state, torch.where(commit, scatter_rows(x0, can, mask_id, frame), x), can, logits, generator, config, cond)
    # static shapes: every step commits at least one position of each unfinished row, so at most open_max steps
    return state.advance(new, called, cache, done=state.finished(new, state.open_max if state.static else x.shape[1] + 1, POLL))


threshold = Sampler("threshold", ThresholdConfig, start, step, static=True)
