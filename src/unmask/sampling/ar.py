"""Autoregressive sampling for the AR baseline (plain: one full forward per new token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.sampling.base import Precision, SampleOutput, SamplerState, StepCallback, sample_tokens


@dataclass(frozen=True)
class ARConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    precision: Precision = "float64"


@torch.no_grad()
def ar_sample(
    model,
    prompt: torch.Tensor,
    generator: torch.Generator,
    config: ARConfig = ARConfig(),
    callback: StepCallback | None = None,
) -> SampleOutput:
    """Extend prompt (B, P), P >= 1 (start with EOS for unconditional text), by max_new_tokens tokens.

    Without a KV cache each step recomputes the whole prefix, cropped to the context length.
    """
    state = SamplerState(prompt.clone())
    ctx = model.config.context_len
    for _ in range(config.max_new_tokens):
        logits = model(state.tokens[:, -ctx:])[:, -1]
        nxt = sample_tokens(logits, generator, config.temperature, config.precision)
        state = state.advance(torch.cat([state.tokens, nxt[:, None]], dim=1), calls=1)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step)
