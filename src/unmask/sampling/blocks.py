"""Semi-autoregressive block decoding (LLaDA, SMDM). Reference section 4.

The generation region [start, L) of the canvas [prompt ; MASK x gen_len] is split into blocks of
``block_len`` columns, decoded left to right; inside a block any sampler runs with the positions
right of the block not eligible (they stay MASK and are seen as MASK).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from unmask.errors import UnmaskError
from unmask.sampling.base import Conditioning, SampleOutput, SamplerState, StepCallback


@torch.no_grad()
def semi_autoregressive(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    inner: Callable[..., SampleOutput],
    inner_config,
    block_len: int,
    start: int,
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    stop_token: int | None = None,
) -> SampleOutput:
    """Decode columns [start, L) of x (B, L) block by block with ``inner(model, x, generator,
    inner_config, cond, callback, eligible)``. With ``stop_token`` (EOS), decoding stops after the
    first block in which every row has produced it; the remaining MASKs become ``stop_token``."""
    gen_len = x.shape[1] - start
    if block_len < 1 or gen_len % block_len:
        raise UnmaskError(f"--block-len={block_len} must divide the generation length {gen_len}")
    state = SamplerState(x.clone())
    cols = torch.arange(x.shape[1], device=x.device)
    for b0 in range(start, x.shape[1], block_len):
        eligible = ((cols >= b0) & (cols < b0 + block_len))[None].expand_as(x)
        done = state  # the callback counts steps and calls across blocks
        inner_callback = None if callback is None else (lambda s, d=done: callback(replace(s, step=d.step + s.step, nfe=d.nfe + s.nfe)))
        out = inner(model, state.tokens, generator, inner_config, cond, inner_callback, eligible)
        state = SamplerState(out.tokens, state.step + out.steps, state.nfe + out.nfe)
        if stop_token is not None and (state.tokens[:, start : b0 + block_len] == stop_token).any(dim=1).all():
            rest = state.tokens == model.config.mask_id
            state = SamplerState(torch.where(rest, stop_token, state.tokens), state.step, state.nfe)
            break
    return SampleOutput(state.tokens, state.nfe, state.step)
