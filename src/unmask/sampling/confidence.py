"""Confidence-ordered decoding (MaskGIT, LLaDA, Dream). docs/algorithms.md, 'Confidence decoding'.

Each step predicts every masked position (x0 drawn at the sampling temperature, top-k/top-p applied;
argmax at 0), scores it under the network's own distribution p = softmax(logits) (no temperature,
no top-k/top-p renormalisation, as LLaDA), and commits the k best per row:
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

from unmask.sampling.base import (
    Conditioning, Sampler, SamplerConfig, SamplerState, grid_uniforms, model_probability, open_positions, predict, propose, sample_from,
    scatter_rows, settle, start_state, top_per_row,
)


@dataclass(frozen=True)
class ConfidenceConfig(SamplerConfig):
    steps: int = 64
    score: str = "low_confidence"  # or margin, entropy, random
    allocation: str = "even"  # or "schedule"


def confidence_scores(logits: torch.Tensor, x0: torch.Tensor, score: str, generator: torch.Generator,
                      u: torch.Tensor | None = None) -> torch.Tensor:
    """Score (N,) of the proposals x0 (N,) under the network's distribution softmax(logits (N, V));
    "random": ``u`` (N,), or uniforms drawn here."""
    if score == "random":
        return torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64) if u is None else u
    if score == "low_confidence":
        return model_probability(logits, x0)
    logp = logits.double().log_softmax(dim=-1)
    if score == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    return (logp.exp() * logp).sum(dim=-1)  # -entropy


def tokens_per_step(n: torch.Tensor, step: int, steps: int, allocation: str) -> torch.Tensor:
    """How many of the n (B,) masked tokens to commit at ``step`` (0-based) of ``steps``."""
    remaining = steps - step
    if allocation == "even":
        return -(-n // remaining)  # ceil: the last step takes everything left
    t, s = remaining / steps, (remaining - 1) / steps
    return n - torch.floor(n.double() * s / t).long()


def start(model, x: torch.Tensor, config: ConfidenceConfig, eligible=None, cache=None) -> SamplerState:
    return start_state(model, x, eligible, cache)


def step(model, state: SamplerState, generator: torch.Generator, config: ConfidenceConfig, cond: Conditioning | None = None) -> SamplerState:
    """Commit the k best-scoring masked (eligible) positions of each row, k from the allocation."""
    x, mask_id = state.tokens, state.mask_id
    can = open_positions(x, mask_id, state.eligible)
    k = tokens_per_step(can.sum(dim=1), state.step, config.steps, config.allocation)
    frame = state.frame(can)
    logits, called, cache = predict(model, state, can, cond, config.cfg_scale, frame=frame)
    u = None if config.temperature == 0 else grid_uniforms(can, generator, frame)  # the same draws in both layouts
    if config.score == "low_confidence":  # the draw and its probability in one pass
        x0, scores = propose(logits, generator, config, u)
    else:
        x0 = sample_from(logits, generator, config, u)
        order = grid_uniforms(can, generator, frame) if config.score == "random" else None
        scores = confidence_scores(logits, x0, config.score, generator, order)
    commit = top_per_row(scatter_rows(scores, can, -torch.inf, frame), can, k)
    new = settle(state, torch.where(commit, scatter_rows(x0, can, mask_id, frame), x), can, logits, generator, config, cond)
    # static shapes: with the even allocation and more steps than positions a row fills one per step
    last = min(config.steps, state.open_max) if state.static and config.allocation == "even" else config.steps
    return state.advance(new, called, cache, done=state.finished(new, last))


confidence = Sampler("confidence", ConfidenceConfig, start, step, static=True)
