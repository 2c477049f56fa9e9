"""KV caches for MDM decoding, and the choice of cache. docs/algorithms.md, 'KV caches'.

An MDM attends bidirectionally, so a position's keys/values change whenever any token changes: every
cache below is an approximation (report quality next to speed), except where the model's attention
makes it exact (a block-causal model with the prefix cache). All three keep the canvas's keys/values
per layer in one :class:`~unmask.model.KVCache` with a slot per canvas position plus one scratch slot,
and feed the network only some positions (a forward with ``cache_index``); the other positions'
keys/values come from the cache.

* prefix (Fast-dLLM): at each block start (and every ``refresh`` calls) one full forward refreshes
  every slot; the other steps feed the block and everything right of it and reuse the slots left of
  the block.
* dual (Fast-dLLM): the same, but the other steps feed the block only and also reuse the suffix.
* delayed (dKV-Cache): masked positions are fed at every step; a decoded token's keys/values are
  computed once more, at the step after it was decoded (now as the token, not MASK), and then reused.

Every cache does a full forward at each block start (as dKV-Cache's semi-autoregressive decoding,
which starts every block without a cache) and, with ``refresh`` = N > 0, at every N-th call of a row
since its last full forward.

With ``refresh=1`` every call is a full forward and every cache gives exactly the uncached tokens.
Rows decode independently: each row has its own refresh count, and a forward over rows that feed
different numbers of positions pads with the scratch slot (never attended to). With classifier-free
guidance the unconditional rows have their own keys/values (rows B..2B-1 of the cache).

A block model's cache of finished blocks (exact) is :class:`~unmask.sampling.block_cache.BlockCache`;
:class:`CacheConfig` names either kind, and :meth:`CacheConfig.create` makes it for a decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.errors import OptionError
from unmask.model import KVCache
from unmask.sampling.block_cache import BlockCache
from unmask.sampling.options import OPTIONS, check_value


@dataclass(frozen=True)
class CacheConfig:
    """``kind``: none, prefix, dual or delayed (canvas caches), or block (a block model's exact cache
    of finished blocks); ``refresh``: a full forward every N calls of a row (0: at block starts only;
    the approximate caches only)."""

    kind: str = "none"
    refresh: int = 0

    def __post_init__(self) -> None:
        check_value(OPTIONS["cache"], self.kind)
        check_value(OPTIONS["cache_refresh"], self.refresh)
        if self.refresh and self.kind in ("none", "block"):
            need = "needs a cache" if self.kind == "none" else "applies to the approximate caches; the block cache is exact"
            raise OptionError("cache_refresh", f"{{cache_refresh}}={{_refresh}} {need}: add {{cache}} prefix, dual or delayed",
                              _refresh=self.refresh)

    def create(self, model, x: torch.Tensor, guided: bool) -> "CanvasCache | BlockCache | None":
        """The empty cache of decoding canvas x (B, L) (None: no cache); ``guided``: with CFG rows."""
        if self.kind == "none":
            return None
        if self.kind == "block":
            return BlockCache.create(model, x, guided)
        return CanvasCache.create(model, x, self, guided)


@dataclass(frozen=True)
class CanvasCache:
    """The state of a canvas cache; the keys/values in ``kv`` are updated in place by the network.

    valid (B, L): slots whose keys/values may be reused; span (B, L): prefix/dual, the slots fed
    between refreshes; since (B,): calls since each row's last full refresh (-1: refresh due).
    With static shapes (:mod:`unmask.sampling.shapes`; prefix and dual) every row is called at
    every step, so the rows share one count, kept on the host (``calls``), and the block's columns
    in the window (``columns``, from the block driver) give the span: :meth:`feed_static`.
    """

    config: CacheConfig
    kv: KVCache  # (B or 2B rows, H, L + 1 slots, Dh); slot L is scratch
    valid: torch.Tensor
    span: torch.Tensor
    since: torch.Tensor
    columns: tuple[int, int] | None = None
    calls: int = -1

    @classmethod
    def create(cls, model, x: torch.Tensor, config: CacheConfig, guided: bool) -> "CanvasCache":
        b, length = x.shape
        param = next(iter(model.parameters()))
        kv = KVCache.empty(model.config, 2 * b if guided else b, length + 1, x.device, param.dtype)
        none = torch.zeros_like(x, dtype=torch.bool)
        return cls(config, kv, none, none, torch.full((b,), -1, dtype=torch.long, device=x.device))

    def new_block(self, columns: tuple[int, int] | None = None) -> "CanvasCache":
        """A full refresh is due in every row (called at each block start); ``columns``: the block's
        columns [c0, c1) in the window, which static shapes feed between refreshes."""
        return replace(self, since=torch.full_like(self.since, -1), columns=columns, calls=-1)

    @property
    def static(self) -> bool:
        """Whether :meth:`feed_static` can drive it: a prefix or dual cache that knows its block's columns."""
        return self.columns is not None and self.config.kind in ("prefix", "dual")

    def feed_static(self, width: int) -> tuple[torch.Tensor, "CanvasCache"]:
        """(the slots (B, Q) that this call feeds, for all B rows; the cache after it), nothing read
        from the device: every slot at a refresh (block start, then every ``refresh`` calls), else
        the span (prefix: the block and everything right of it; dual: the block). ``width``: the
        window's columns."""
        due = self.calls < 0 or bool(self.config.refresh and self.calls >= self.config.refresh)
        first, last = (0, width) if due else (self.columns[0], width if self.config.kind == "prefix" else self.columns[1])
        slots = torch.arange(first, last, device=self.since.device).expand(self.since.shape[0], -1)
        return slots, replace(self, calls=1 if due else self.calls + 1)

    def rows(self, index: torch.Tensor) -> "CanvasCache":
        """The cache of a subset of rows (rows that leave the working batch are dropped)."""
        b = self.since.shape[0]
        kv_rows = index if self.kv.k[0].shape[0] == b else torch.cat([index, index + b])
        return CanvasCache(self.config, self.kv.rows(kv_rows), self.valid[index], self.span[index], self.since[index])

    def feed(self, rows: torch.Tensor, tokens: torch.Tensor, region: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, "CanvasCache"]:
        """The slots (R, L) bool that a forward over ``rows`` (R,) of the canvas must feed, and the
        cache after that forward. ``tokens`` (R, L) is what is fed; ``region`` (R, L) the positions
        being decoded (the block), which the prefix/dual span is made from at a refresh."""
        cfg = self.config
        since = self.since[rows]
        refresh = (since < 0) | ((since >= cfg.refresh) if cfg.refresh else torch.zeros_like(since, dtype=torch.bool))
        cols = torch.arange(tokens.shape[1], device=tokens.device)
        first = torch.where(region.any(dim=1), region.float().argmax(dim=1), tokens.shape[1])
        last = tokens.shape[1] - 1 - region.flip(1).float().argmax(dim=1)
        span = cols[None] >= first[:, None]
        if cfg.kind == "dual":
            span &= cols[None] <= last[:, None]
        decoded = tokens != mask_id
        if cfg.kind == "delayed":
            fed = ~self.valid[rows] | refresh[:, None]
            valid = self.valid[rows] | (fed & decoded)
        else:
            span = torch.where(refresh[:, None], span, self.span[rows])
            fed = span | refresh[:, None]
            valid = self.valid[rows]
        since = torch.where(refresh, 1, since + 1)
        out = replace(self, valid=self.valid.index_put((rows,), valid), span=self.span.index_put((rows,), span),
                      since=self.since.index_put((rows,), since))
        return fed, out


def fed_index(fed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L) bool -> (index (R, Q) of the fed slots in ascending order, padded with the scratch
    slot L; real (R, Q) bool, False at padding), Q = the most slots any row feeds."""
    length = fed.shape[1]
    q = int(fed.sum(dim=1).max())
    order = fed.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :q]
    real = fed.gather(1, order)
    return torch.where(real, order, length), real
