"""The exact KV cache of a block model's finished blocks (BD3-LM). docs/algorithms.md, 'Block diffusion (BD3-LM)'.

A block model (``ModelConfig.block_causal = L'``) lets a position see its own block and earlier
ones only, so a noisy block never influences an earlier block: once a block is decoded, its
keys/values are final. With this cache every network call feeds the current block only, plus, at a
block's first call, the blocks finished since the last call, whose keys/values are written then,
with their final tokens, and never recomputed. It is exact: the tokens equal those of the uncached
decoding (every call a full forward) for a fixed seed. Decoding through a window that slides over a
long canvas moves the cache with it (:meth:`BlockCache.shifted`): a block keeps the keys/values
written when it was finished, with the window of that time, as in sliding-window attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.model import KVCache


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

    def new_block(self, columns: tuple[int, int] | None = None) -> "BlockCache":
        return self

    static = False  # it feeds the blocks finished since the last call: how many is read from the device

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
