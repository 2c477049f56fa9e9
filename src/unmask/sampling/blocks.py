"""The block driver: decode a canvas block by block, any sampler inside a block, under a block plan
and a cache. docs/algorithms.md, 'Semi-autoregressive blocks' and 'Block diffusion (BD3-LM)'.

The plan (:mod:`unmask.sampling.plans`) says which columns each block decodes, which columns a
call sees and each block's steps: semi-autoregressive blocks of canvas columns, or a block model's
grid of each row's positions. The cache (:class:`~unmask.sampling.cache.CacheConfig`) lives across
blocks: a canvas cache (prefix, dual, delayed; refreshed at each block start) or a block model's
exact cache of finished blocks (moved with the window over a long canvas). Inside a block the
sampler runs with only the block eligible. With a stop token (EOS), a row that has produced it in a
finished block leaves the working batch (its remaining MASKs become the stop token), so a batch
does not wait for its slowest row. A constraint (structured output) reads the full rows of the
window it is given, and so does a guide's score (``Conditioning.steering``). The callback sees the whole batch on the canvas's columns, with
steps and calls counted across blocks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from unmask.sampling.base import Conditioning, SampleOutput, Sampler, SamplerState, StepCallback
from unmask.sampling.cache import CacheConfig
from unmask.sampling.plans import ColumnBlocks, GridBlocks


@torch.no_grad()
def decode_blocks(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    sampler: Sampler,
    config,
    plan: ColumnBlocks | GridBlocks,
    start: int,
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    stop_token: int | None = None,
    cache: CacheConfig = CacheConfig(),
) -> SampleOutput:
    """Decode columns [start, L) of x (B, L) block by block with ``sampler`` and its ``config`` (a
    ``steps`` option is the total; the plan splits it). ``cond``: left padding and the prompt."""
    lay = plan.layout(model, x, cond, start, config)
    tokens, work_cond, length = lay.tokens, lay.cond, x.shape[1]
    if work_cond is not None and work_cond.constraint is not None:  # its regions on the laid-out rows
        work_cond = replace(work_cond, constraint=work_cond.constraint.placed(lay.region))
    if work_cond is not None and work_cond.steering is not None:  # a guide's scores read the laid-out rows' regions
        work_cond = replace(work_cond, steering=work_cond.steering.placed(lay.region))
    mask_id, guided = model.config.mask_id, bool(config.cfg_scale)
    active = torch.arange(x.shape[0], device=x.device)  # rows still decoding
    steps, nfe, kv, window = 0, 0, None, None
    row_nfe = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    cols = torch.arange(length, device=x.device)
    for b0, b1, w0, w1 in lay.blocks:
        if kv is None:
            kv = cache.create(model, tokens[active][:, w0:w1], guided)
        elif (w0, w1) != window:  # the window slid: the cache follows it
            kv = kv.shifted(w0 - window[0], w1 - w0)
        window = (w0, w1)
        eligible = lay.region[active][:, w0:w1] & (cols[w0:w1] >= b0) & (cols[w0:w1] < b1)

        def whole(s: SamplerState, done=(steps, nfe), rows=active, w=window) -> None:
            full = tokens.clone()
            full[rows, w[0] : w[1]] = s.tokens
            callback(SamplerState(lay.restore(full), step=done[0] + s.step, nfe=done[1] + s.nfe))

        window_cond = plan.window_cond(work_cond, w0, w1, active.numel(), x.device)
        if window_cond is not None and window_cond.constraint is not None:  # the full rows, of which the sampler sees a window
            window_cond = replace(window_cond, constraint=window_cond.constraint.window(tokens[active], w0))
        if window_cond is not None and window_cond.steering is not None:  # and its full rows
            window_cond = replace(window_cond, steering=window_cond.steering.window(tokens[active], w0))
        if window_cond is not None and window_cond.classifier_guide is not None and w1 - w0 < length:  # the classifier sees whole rows
            window_cond = replace(window_cond, classifier_guide=window_cond.classifier_guide.window(tokens[active], work_cond.key_mask, w0))
        state = sampler.run(model, tokens[active][:, w0:w1], generator, lay.config, window_cond, whole if callback else None, eligible,
                            None if kv is None else kv.new_block((b0 - w0, b1 - w0)))
        part = tokens[active]
        part[:, w0:w1] = state.tokens
        tokens[active] = part
        steps, nfe, kv = steps + state.step, nfe + state.nfe, state.cache
        row_nfe[active] += state.row_nfe
        if stop_token is None:
            continue
        stopped = ((tokens[active] == stop_token) & lay.region[active] & (cols < b1)).any(dim=1)
        if bool(stopped.any()):
            active, work_cond, kv = leave(tokens, active, stopped, stop_token, mask_id, work_cond, kv)
            if active.numel() == 0:
                break
    return SampleOutput(lay.restore(tokens), nfe, steps, row_nfe)


def leave(tokens: torch.Tensor, active: torch.Tensor, stopped: torch.Tensor, stop_token: int, mask_id: int, cond, cache):
    """Rows ``active[stopped]`` have produced the stop token in a finished block: their remaining
    MASKs in ``tokens`` become the stop token and they leave the working batch. Returns the rows
    still active with their conditioning and cache (``cache``: anything with ``rows(index)``)."""
    done = active[stopped]
    tokens[done] = torch.where(tokens[done] == mask_id, stop_token, tokens[done])
    keep = (~stopped).nonzero().squeeze(1)
    return active[keep], None if cond is None else cond.rows(keep), None if cache is None else cache.rows(keep)
