"""Semi-autoregressive block decoding (LLaDA, SMDM) and the decoding driver. docs/algorithms.md, 'Semi-autoregressive blocks'.

The generation region [start, L) of the canvas [prompt ; MASK x gen_len] is split into blocks of
``block_len`` columns, decoded left to right; inside a block any sampler runs with the positions
right of the block not eligible (they stay MASK and are seen as MASK); with several blocks a
time-conditioned network gets the canvas's masked fraction (``Conditioning.canvas_time``), never a
chain time restarted in each block. A KV cache of the canvas
(:mod:`unmask.sampling.cache`) lives across blocks and is refreshed at each block start. With a
stop token (EOS), a row that has produced it in a completed block leaves the working batch (its
remaining MASKs become the stop token), so a batch does not wait for its slowest row.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from unmask.errors import UnmaskError
from unmask.sampling.base import Conditioning, SampleOutput, Sampler, SamplerState, StepCallback
from unmask.sampling.cache import CacheConfig, CanvasCache


@torch.no_grad()
def semi_autoregressive(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    sampler: Sampler,
    config,
    block_len: int,
    start: int,
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    stop_token: int | None = None,
    cache: CacheConfig = CacheConfig(),
) -> SampleOutput:
    """Decode columns [start, L) of x (B, L) block by block with ``sampler`` and its per-block
    ``config``. ``block_len`` = L - start decodes the region as one block. The callback sees the
    whole batch, with steps and calls counted across blocks."""
    b, length = x.shape
    gen_len = length - start
    if block_len < 1 or gen_len % block_len:
        raise UnmaskError(f"--block-len={block_len} must divide the generation length {gen_len}")
    tokens = x.clone()
    active = torch.arange(b, device=x.device)  # rows still decoding
    kv = None if cache.kind == "none" else CanvasCache.create(model, x, cache, guided=bool(config.cfg_scale))
    work_cond, steps, nfe = block_conditioning(cond, gen_len // block_len), 0, 0
    row_nfe = torch.zeros(b, dtype=torch.long, device=x.device)
    cols = torch.arange(length, device=x.device)
    for b0 in range(start, length, block_len):
        eligible = ((cols >= b0) & (cols < b0 + block_len))[None].expand(active.numel(), length)

        def whole(s: SamplerState, done=(steps, nfe), rows=active) -> None:
            full = tokens.clone()
            full[rows] = s.tokens
            callback(SamplerState(full, step=done[0] + s.step, nfe=done[1] + s.nfe))

        state = sampler.run(model, tokens[active], generator, config, work_cond, whole if callback else None, eligible,
                            None if kv is None else kv.new_block())
        tokens[active] = state.tokens
        steps, nfe, kv = steps + state.step, nfe + state.nfe, state.cache
        row_nfe[active] += state.row_nfe
        if stop_token is None:
            continue
        stopped = (state.tokens[:, start : b0 + block_len] == stop_token).any(dim=1)
        if bool(stopped.any()):
            active, work_cond, kv = leave(tokens, active, stopped, stop_token, model.config.mask_id, work_cond, kv)
            if active.numel() == 0:
                break
    return SampleOutput(tokens, nfe, steps, row_nfe)


def block_conditioning(cond: Conditioning | None, num_blocks: int) -> Conditioning | None:
    """``cond`` for decoding ``num_blocks`` blocks: with more than one, a chain sampler's clock
    covers a block only and the network gets the canvas's masked fraction (``canvas_time``)."""
    if num_blocks == 1:
        return cond
    return replace(cond or Conditioning(), canvas_time=True)


def leave(tokens: torch.Tensor, active: torch.Tensor, stopped: torch.Tensor, stop_token: int, mask_id: int, cond, cache):
    """Rows ``active[stopped]`` have produced the stop token in a finished block: their remaining
    MASKs in ``tokens`` become the stop token and they leave the working batch. Returns the rows
    still active with their conditioning and cache (``cache``: anything with ``rows(index)``)."""
    done = active[stopped]
    tokens[done] = torch.where(tokens[done] == mask_id, stop_token, tokens[done])
    keep = (~stopped).nonzero().squeeze(1)
    return active[keep], None if cond is None else cond.rows(keep), None if cache is None else cache.rows(keep)
