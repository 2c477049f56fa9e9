"""Confidence-ordered decoding (MaskGIT, LLaDA, Dream). Reference section 4.

Each step predicts every masked position (x0 drawn at the sampling temperature; argmax at 0),
scores it, and commits the k best per row:
  low_confidence  p(x0)            (LLaDA's "low_confidence" remasking keeps the confident ones)
  margin          p1 - p2          (top-1 minus top-2 probability)
  entropy         -H(p)
  random          uniform          (random-order decoding)
k per step: "even" splits the remaining masked tokens evenly over the remaining steps; "schedule"
commits n - floor(n s / t) of the n masked tokens from t to s (the linear schedule's expectation).
Selection is per row (top_per_row), never over the whole batch. A time-conditioned network is
given t = the fraction of masked positions of the row (padding excluded): a step has no chain time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.errors import UnmaskError
from unmask.sampling.base import (
    open_positions,
    Conditioning, SampleOutput, SamplerConfig, SamplerState, StepCallback, check_steps, filter_logits, network, sample_from, top_per_row,
)

SCORES = ("low_confidence", "margin", "entropy", "random")


@dataclass(frozen=True)
class ConfidenceConfig(SamplerConfig):
    steps: int = 64
    score: str = "low_confidence"
    allocation: str = "even"  # or "schedule"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in SCORES:
            raise UnmaskError(f"--score {self.score!r} is not one of: {', '.join(SCORES)}")
        if self.allocation not in ("even", "schedule"):
            raise UnmaskError(f"--allocation {self.allocation!r} is not one of: even, schedule")


def confidence_scores(logits: torch.Tensor, x0: torch.Tensor, score: str, generator: torch.Generator) -> torch.Tensor:
    """Score (B, L) of the proposal x0 (B, L) under the model's distribution (top-k/top-p applied)."""
    if score == "random":
        return torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    p = logits.double().softmax(dim=-1)
    if score == "low_confidence":
        return p.gather(-1, x0[..., None]).squeeze(-1)
    if score == "margin":
        top2 = p.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (p * p.clamp_min(1e-300).log()).sum(dim=-1)  # -entropy


def tokens_per_step(n: torch.Tensor, step: int, steps: int, allocation: str) -> torch.Tensor:
    """How many of the n (B,) masked tokens to commit at ``step`` (0-based) of ``steps``."""
    remaining = steps - step
    if allocation == "even":
        return -(-n // remaining)  # ceil: the last step takes everything left
    t, s = remaining / steps, (remaining - 1) / steps
    return n - torch.floor(n.double() * s / t).long()


def confidence_step(
    model, state: SamplerState, k: torch.Tensor, generator: torch.Generator, config: SamplerConfig, score: str,
    cond: Conditioning | None = None, eligible: torch.Tensor | None = None,
) -> SamplerState:
    """Commit the k[b] best-scoring masked (eligible) positions of each row b."""
    x = state.tokens
    can = open_positions(x, model.config.mask_id, eligible)
    logits = filter_logits(network(model, x, cond, config.cfg_scale), config.top_k, config.top_p)
    x0 = sample_from(logits, generator, config)
    commit = top_per_row(confidence_scores(logits, x0, score, generator), can, k)
    return state.advance(torch.where(commit, x0, x), calls=1)


@torch.no_grad()
def confidence(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    config: ConfidenceConfig = ConfidenceConfig(),
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    eligible: torch.Tensor | None = None,
) -> SampleOutput:
    """Fill the MASKs of x (B, L) (those in ``eligible``) in ``config.steps`` steps."""
    check_steps(config.steps)
    state = SamplerState(x.clone())
    for step in range(config.steps):
        can = open_positions(state.tokens, model.config.mask_id, eligible)
        n = can.sum(dim=1)
        if not n.any():
            break
        k = tokens_per_step(n, step, config.steps, config.allocation)
        state = confidence_step(model, state, k, generator, config, config.score, cond, eligible)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step)
