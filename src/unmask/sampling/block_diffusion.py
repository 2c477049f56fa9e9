"""Block-diffusion decoding (BD3-LM) with an exact KV cache of the finished blocks. docs/algorithms.md, 'Block diffusion (BD3-LM)'.

A block model (``ModelConfig.block_causal = L'``) lets a position see its own block and earlier
ones only, so a noisy block never influences an earlier block: once a block is decoded, its
keys/values are final. The driver decodes the blocks of the canvas left to right, on the model's
block grid of each row's positions: a left-padded row is moved left by its padding for the
decoding (its real tokens at slots = positions, the padding at the right end, hidden by the key
mask), so a row decodes as it would alone whatever the other rows' prompt lengths. Inside a block
any sampler runs (first-hitting, confidence, threshold, ...) with only the block eligible. With the cache (:class:`BlockCache`), every network
call feeds the current block only, plus, at a block's first call, the blocks finished since the
last call, whose keys/values are written then, with their final tokens, and never recomputed.
This is exact: the tokens equal the uncached decoding (every call a full forward) for a fixed seed.

Canvases longer than the model's context (long generation) are decoded through a sliding window:
block b sees the last ``context_len`` tokens of the canvas up to its end (whole blocks). With the
cache, the keys/values of a block are those written when it was finished (with the window of that
time), as in sliding-window attention; the uncached decoding recomputes the window instead, so
beyond the context the two are different approximations. Within the context they are identical.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.errors import UnmaskError
from unmask.model import KVCache
from unmask.sampling.base import Conditioning, SampleOutput, Sampler, SamplerState, StepCallback
from unmask.sampling.blocks import leave


@dataclass(frozen=True)
class BlockCache:
    """The canvas cache of a block-causal model: ``kv`` has a slot per canvas (window) column plus a
    scratch slot; ``valid`` (B, W) marks the slots holding the final keys/values of finished blocks.

    It follows the protocol of :class:`unmask.sampling.cache.CanvasCache` (``feed``, ``rows``,
    ``new_block``), so :func:`unmask.sampling.base.predict` drives it like the other caches.
    """

    block_size: int
    kv: KVCache  # (B or 2B rows, H, W + 1 slots, Dh)
    valid: torch.Tensor  # (B, W) bool
    written: torch.Tensor  # (B, W) long: how many forwards wrote each slot's keys/values

    @classmethod
    def create(cls, model, x: torch.Tensor, guided: bool) -> "BlockCache":
        b, width = x.shape
        param = next(iter(model.parameters()))
        kv = KVCache.empty(model.config, 2 * b if guided else b, width + 1, x.device, param.dtype)
        return cls(model.config.block_causal, kv, torch.zeros_like(x, dtype=torch.bool), torch.zeros_like(x))

    def new_block(self) -> "BlockCache":
        return self

    def rows(self, index: torch.Tensor) -> "BlockCache":
        b = self.valid.shape[0]
        kv_rows = index if self.kv.k[0].shape[0] == b else torch.cat([index, index + b])
        return BlockCache(self.block_size, self.kv.rows(kv_rows), self.valid[index], self.written[index])

    def feed(self, rows: torch.Tensor, tokens: torch.Tensor, region: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, "BlockCache"]:
        """Slots (R, W) to feed for a forward over ``rows`` decoding ``region`` (R, W): the model
        blocks that hold the region, and every earlier slot whose keys/values are not final yet
        (finished blocks and the prompt, written once now)."""
        width = tokens.shape[1]
        cols = torch.arange(width, device=tokens.device)
        first = torch.where(region.any(dim=1), region.float().argmax(dim=1), width)
        last = width - 1 - region.flip(1).float().argmax(dim=1)
        begin = first // self.block_size * self.block_size
        end = (last // self.block_size + 1) * self.block_size
        before = cols[None] < begin[:, None]
        valid = self.valid[rows]
        fed = (before & ~valid) | ((cols[None] >= begin[:, None]) & (cols[None] < end[:, None]))
        out = replace(self, valid=self.valid.index_put((rows,), valid | before),
                      written=self.written.index_put((rows,), self.written[rows] + fed.long()))
        return fed, out

    def shifted(self, delta: int, width: int) -> "BlockCache":
        """The cache of a window moved ``delta`` columns right and now ``width`` columns wide: slot s
        holds what slot s + delta held (the slots dropped on the left leave the window)."""
        kv = KVCache([_shift(k, delta, width + 1, 2) for k in self.kv.k], [_shift(v, delta, width + 1, 2) for v in self.kv.v])
        return BlockCache(self.block_size, kv, _shift(self.valid, delta, width, 1), _shift(self.written, delta, width, 1))


def _shift(t: torch.Tensor, delta: int, width: int, dim: int) -> torch.Tensor:
    """``t`` with the first ``delta`` entries of ``dim`` dropped, zero-padded or cut to ``width``."""
    t = t.narrow(dim, delta, t.shape[dim] - delta)
    if t.shape[dim] >= width:
        return t.narrow(dim, 0, width).clone()
    pad = list(t.shape)
    pad[dim] = width - t.shape[dim]
    return torch.cat([t, torch.zeros(pad, dtype=t.dtype, device=t.device)], dim=dim)


def block_spans(start: int, length: int, block_size: int) -> list[tuple[int, int]]:
    """The decoding blocks [b0, b1) of columns [start, length), on the grid of ``block_size`` slots:
    the first may be the rest of the block the prompt ends in."""
    spans, b0 = [], start
    while b0 < length:
        b1 = min((b0 // block_size + 1) * block_size, length)
        spans.append((b0, b1))
        b0 = b1
    return spans


def on_positions(cond: Conditioning | None, rows: int, device) -> tuple[torch.Tensor, Conditioning]:
    """Each row's left padding (B,) (the count of slots before its first real one) and the
    conditioning of the rows moved left by it, so that a real token's slot is its position and
    the padding sits at the right end (still hidden by the key mask). A chain sampler's clock covers
    one block, so the network gets the canvas's masked fraction (``canvas_time``)."""
    if cond is None or cond.key_mask is None:
        pad = torch.zeros(rows, dtype=torch.long, device=device)
        return pad, replace(cond or Conditioning(), positions=None, canvas_time=True)
    pad = cond.key_mask.long().argmax(dim=1)
    move = lambda v: None if v is None else roll_rows(v, pad)  # noqa: E731
    return pad, replace(cond, key_mask=move(cond.key_mask), positions=None, prompt_mask=move(cond.prompt_mask), canvas_time=True)


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of x (B, L) rotated left by shift[b] (right by -shift[b])."""
    cols = torch.arange(x.shape[1], device=x.device)
    return x.gather(1, (cols[None] + shift[:, None]) % x.shape[1])


def _window_cond(cond: Conditioning, w0: int, w1: int, rows: int, device) -> Conditioning:
    """The conditioning of columns [w0, w1) of ``rows`` rows laid out on their positions (slot = position)."""
    pick = lambda v: None if v is None else v[:, w0:w1]  # noqa: E731
    positions = torch.arange(w0, w1, device=device)[None].expand(rows, -1)
    return replace(cond, key_mask=pick(cond.key_mask), positions=positions, prompt_mask=pick(cond.prompt_mask))


def block_steps(config, size: int, gen_len: int):
    """The config of every block: a ``steps`` option (the total over ``gen_len`` tokens) becomes
    steps x L' / gen_len per block, at least 1, the same for a partial block (the rest of the block
    a prompt ends in, a shorter last block), so a row's steps do not depend on the other rows."""
    steps = getattr(config, "steps", None)
    return config if steps is None else replace(config, steps=max(1, round(steps * size / max(gen_len, 1))))


@torch.no_grad()
def block_diffusion_decode(
    model,
    x: torch.Tensor,
    generator: torch.Generator,
    sampler: Sampler,
    config,
    start: int,
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
    stop_token: int | None = None,
    cache: bool = True,
    window: int | None = None,
) -> SampleOutput:
    """Decode columns [start, L) of x (B, L) block by block with ``sampler`` (its config; a
    ``steps`` option is the total, see :func:`block_steps`). ``cond``: left padding (its key mask)
    and the prompt; blocks follow each row's positions, so a row decodes as it would alone.
    ``cache``: the exact cache of finished blocks. ``window``: the most columns a call sees
    (default: the model's context, whole blocks). With ``stop_token``, a row that produced it
    leaves the batch after that block and its remaining MASKs become the stop token."""
    size = model.config.block_causal
    if size < 1:
        raise UnmaskError("block-diffusion decoding needs a block model (ModelConfig.block_causal > 0, `unmask train --objective bd3`)")
    b, length = x.shape
    if not 0 <= start <= length:
        raise UnmaskError(f"generation start {start} is outside the canvas of {length} columns")
    window = model.config.context_len if window is None else window
    window = window // size * size
    if window < size:
        raise UnmaskError(f"the window of {window} columns holds no whole block of {size}")
    guided = bool(getattr(config, "cfg_scale", 0.0))
    pad, work_cond = on_positions(cond, b, x.device)
    tokens = roll_rows(x, pad)
    cols = torch.arange(length, device=x.device)
    region = (cols[None] >= start - pad[:, None]) & (cols[None] < length - pad[:, None])  # each row's generated columns
    block_cfg = block_steps(config, size, length - start)
    active = torch.arange(b, device=x.device)
    steps, nfe, kv, w_prev = 0, 0, None, 0
    row_nfe = torch.zeros(b, dtype=torch.long, device=x.device)
    for b0, b1 in block_spans(int((start - pad).min()), length, size):
        w0 = max(0, -(-(b1 - window) // size) * size)  # the window's first column, on the block grid
        if kv is None and cache:
            kv = BlockCache.create(model, tokens[active][:, w0:b1], guided)
        elif kv is not None and (w0 != w_prev or kv.valid.shape[1] != b1 - w0):
            kv = kv.shifted(w0 - w_prev, b1 - w0)
        w_prev = w0
        eligible = region[active][:, w0:b1] & (cols[w0:b1] >= b0)

        def whole(s: SamplerState, done=(steps, nfe), rows=active, w=(w0, b1)) -> None:
            full = tokens.clone()
            full[rows, w[0] : w[1]] = s.tokens
            callback(SamplerState(roll_rows(full, -pad), step=done[0] + s.step, nfe=done[1] + s.nfe))

        state = sampler.run(model, tokens[active][:, w0:b1], generator, block_cfg, _window_cond(work_cond, w0, b1, active.numel(), x.device),
                            whole if callback else None, eligible, kv)
        part = tokens[active]
        part[:, w0:b1] = state.tokens
        tokens[active] = part
        steps, nfe, kv = steps + state.step, nfe + state.nfe, state.cache
        row_nfe[active] += state.row_nfe
        if stop_token is None:
            continue
        stopped = ((tokens[active] == stop_token) & region[active] & (cols < b1)).any(dim=1)
        if bool(stopped.any()):
            active, work_cond, kv = leave(tokens, active, stopped, stop_token, model.config.mask_id, work_cond, kv)
            if active.numel() == 0:
                break
    return SampleOutput(roll_rows(tokens, -pad), nfe, steps, row_nfe)


def run_spec(spec, model, x: torch.Tensor, generator: torch.Generator, cond: Conditioning | None = None,
             callback: StepCallback | None = None, start: int = 0, stop_token: int | None = None, cache: str = "block") -> SampleOutput:
    """Decode a block model with a :class:`~unmask.sampling.generate.SamplerSpec` (its sampler and
    options inside the blocks). ``cache`` "block": the exact cache of finished blocks; "none": full
    forwards (the spec's own canvas cache, an approximation for other models, must be none)."""
    from unmask.sampling.generate import SAMPLERS

    size = model.config.block_causal
    if size < 1:
        raise UnmaskError("block-diffusion decoding needs a block model (trained with --objective bd3)")
    if cache not in ("block", "none") or spec.cache.kind != "none":
        kind = spec.cache.kind if spec.cache.kind != "none" else cache
        raise UnmaskError(f"--cache {kind}: a block model decodes with its exact cache of finished blocks (--cache block, the default) or none")
    if spec.block_len not in (0, size):
        raise UnmaskError(f"--block-len={spec.block_len}: a block model decodes in its own blocks of {size} tokens; leave --block-len out")
    return block_diffusion_decode(model, x, generator, SAMPLERS[spec.sampler], spec.sampler_config(), start, cond, callback, stop_token,
                                  cache=cache == "block")
