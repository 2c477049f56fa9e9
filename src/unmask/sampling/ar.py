"""Autoregressive sampling for the AR baseline: with an exact KV cache (default) or plain.

Prompts of different lengths are left-padded; the key mask hides the padding and rotary positions
start at 0 at each row's first real token, so a padded row decodes exactly like the row alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.errors import OptionError, UnmaskError
from unmask.model import KVCache
from unmask.sampling.base import Conditioning, SampleOutput, SamplerConfig, SamplerState, StepCallback, sample_from
from unmask.sampling.shapes import static_shapes


@dataclass(frozen=True)
class ARConfig(SamplerConfig):
    max_new_tokens: int = 128
    kv_cache: bool = True


def positions_from(key_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions (B, S) counting real tokens only: 0 at each row's first real token."""
    return (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def ar_sample(
    model,
    prompt: torch.Tensor,
    generator: torch.Generator,
    config: ARConfig = ARConfig(),
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
) -> SampleOutput:
    """Extend prompt (B, P), P >= 1 (start with EOS for unconditional text), by max_new_tokens tokens.

    ``cond.key_mask`` (B, P) marks real prompt tokens (False at left padding); ``cond.constraint``
    (structured output) masks, at each step, the tokens after which a constrained row could no
    longer match within the tokens left. With the KV cache: one forward over the prompt, then one
    single-token forward per new token.
    """
    if config.cfg_scale:
        raise OptionError("cfg_scale", "{cfg_scale} is for MDMs; the AR baseline has no unconditional pass")
    b, p = prompt.shape
    total = p + config.max_new_tokens
    if total - 1 > model.config.context_len:  # the last new token is never fed back
        raise UnmaskError(f"prompt of {p} tokens + {config.max_new_tokens} new tokens exceeds the context of {model.config.context_len}")
    key_mask = cond.key_mask if cond is not None and cond.key_mask is not None else torch.ones_like(prompt, dtype=torch.bool)
    constraint = None if cond is None else cond.constraint
    if config.kv_cache and constraint is None and static_shapes(prompt):
        return _static_decode(model, prompt, key_mask, generator, config, callback)
    ones = torch.ones((b, 1), dtype=torch.bool, device=prompt.device)
    every = torch.ones(b, dtype=torch.bool, device=prompt.device)
    state = SamplerState(prompt.clone(), row_nfe=torch.zeros(b, dtype=torch.long, device=prompt.device))
    cache = None
    if config.kv_cache:
        dtype = next(iter(model.parameters()), torch.empty(0)).dtype
        cache = KVCache.empty(model.config, b, total - 1, prompt.device, dtype)
    step_input, step_mask = prompt, key_mask
    states = None if constraint is None else constraint.initial_states(prompt.device)
    for _ in range(config.max_new_tokens):
        pos = positions_from(step_mask)
        if cache is not None:
            logits = model(step_input, key_mask=step_mask, positions=pos[:, -step_input.shape[1] :], kv_cache=cache)[:, -1]
        else:
            logits = model(state.tokens, key_mask=step_mask, positions=pos)[:, -1]
        logits = logits.float()
        if constraint is not None:  # the tokens that keep each constrained row able to match within the tokens left
            logits = constraint.restrict_next(logits, states, config.max_new_tokens - state.step)
        nxt = sample_from(logits, generator, config)
        if constraint is not None:
            states = constraint.advance(states, nxt)
        state = state.advance(torch.cat([state.tokens, nxt[:, None]], dim=1), every, None)
        step_mask = torch.cat([step_mask, ones], dim=1)
        step_input = nxt[:, None] if cache is not None else state.tokens
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step, state.row_nfe)


def _static_decode(model, prompt: torch.Tensor, key_mask: torch.Tensor, generator: torch.Generator, config: ARConfig,
                   callback: StepCallback | None) -> SampleOutput:
    """KV-cached decoding with static shapes (:mod:`unmask.sampling.shapes`): the tokens, key mask,
    positions and cache are made at their final size once; each step writes one column of the
    tokens and one slot of the cache (``cache_index``) and attends to every slot through the key
    mask (the slots not written yet are hidden by causality over slots). Nothing is read from the
    device and every step has the same shapes. The same tokens as the growing cache at temperature 0."""
    b, p = prompt.shape
    total, device = p + config.max_new_tokens, prompt.device
    tokens = torch.cat([prompt, torch.zeros((b, config.max_new_tokens), dtype=prompt.dtype, device=device)], dim=1)
    visible = torch.cat([key_mask.bool(), torch.ones((b, config.max_new_tokens), dtype=torch.bool, device=device)], dim=1)
    positions = positions_from(visible)
    dtype = next(iter(model.parameters()), torch.empty(0)).dtype
    cache = KVCache.empty(model.config, b, total - 1, device, dtype)
    slots = torch.arange(total - 1, device=device).expand(b, -1)
    state = SamplerState(tokens[:, :p], row_nfe=torch.zeros(b, dtype=torch.long, device=device), static=True)
    fed = (0, p)  # the slots of this step's input: the prompt, then one token at a time
    for _ in range(config.max_new_tokens):
        index = slots[:, fed[0] : fed[1]]
        logits = model(tokens[:, fed[0] : fed[1]], key_mask=visible[:, : total - 1], positions=positions[:, fed[0] : fed[1]],
                       kv_cache=cache, cache_index=index, check_span=False)[:, -1]
        column = fed[1]
        tokens[:, column] = sample_from(logits.float(), generator, config)
        state = state.advance(tokens[:, : column + 1], None, None)
        fed = (column, column + 1)
        if callback is not None:
            callback(state)
    return SampleOutput(state.tokens, state.nfe, state.step, state.row_nfe)
