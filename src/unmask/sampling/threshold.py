"""Threshold parallel decoding (Fast-dLLM). Reference section 4.

Each step commits every masked (eligible) position whose top-1 probability is >= tau, and always
at least the most confident one per row, so decoding never stalls; the number of steps adapts to
the model's confidence. A time-conditioned network is given t = the fraction of masked positions of
the row (padding excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.errors import UnmaskError
from unmask.sampling.base import (
    open_positions,
    Conditioning, SampleOutput, SamplerConfig, SamplerState, StepCallback, filter_logits, network, sample_from, top_per_row,
)


@dataclass(frozen=True)
class ThresholdConfig(SamplerConfig):
    tau: float = 0.9
    temperature: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.tau <= 1:
            raise UnmaskError(f"--tau={self.tau} must be in (0, 1]")


@torch.no_grad()
def threshold(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    config: ThresholdConfig = ThresholdConfig(),
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    eligible: torch.Tensor | None = None,
) -> SampleOutput:
    """Fill the MASKs of x (B, L) (those in ``eligible``); at most one step per masked token."""
    state = SamplerState(x.clone())
    while True:
        can = open_positions(state.tokens, model.config.mask_id, eligible)
        if not can.any():
            break
        logits = filter_logits(network(model, state.tokens, cond, config.cfg_scale), config.top_k, config.top_p)
        x0 = sample_from(logits, generator, config)
        top1 = logits.double().softmax(dim=-1).max(dim=-1).values
        commit = (can & (top1 >= config.tau)) | top_per_row(top1, can, can.any(dim=1).long())
        state = state.advance(torch.where(commit, x0, state.tokens), calls=1)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step)
