"""Compiled decoding: the network of a decoding run through ``torch.compile`` at a few bucketed shapes.

:class:`CompiledModel` stands in for a :class:`~unmask.model.Transformer` wherever a sampler calls
the network (it has the same call signature, ``config``, ``parameters()`` and ``buffers()``), so
every entry point's one decoding path runs unchanged on it (docs/sampling.md, 'Compiled decoding').

``torch.compile`` with ``dynamic=False`` specialises a graph to its input shapes, and a decoding
feeds many (a batch that shrinks as rows finish, AR inputs that grow by a token per step, cached MDM
calls that feed a different number of slots per step). So every call is padded up to a bucket:

* the batch to the next power of two up to 64, then to the next multiple of 64; the added rows are
  copies of the first row, and their outputs are discarded;
* the canvas length (or, with a cache, the number of fed slots) to the next power of two up to 8,
  then in quarter steps of the octave (10, 12, 14, 16, 20, ..., 64, 80, 96, 112, 128, 160, ...),
  at most the model's context (the cache's slots). An added column repeats the last real
  column's token and rotary position (the next slots' positions where the caller gave none, as
  the network's default); without a cache, the key mask hides it from every real query (False at
  its key; a causal model's mask hides it already, since it lies after every real query). With a cache the repeated column writes the same keys/values into
  the same slot as the column it copies, so the cache ends up as without padding.

What the padding changes is exact in real arithmetic: a masked key gets probability exp(-inf) = 0,
and every other position's computation is row- and position-wise. A ``logits_at`` column index
(B, W), what decoding with static shapes passes (:mod:`unmask.sampling.shapes`), goes into the
graph, so the head runs at those W columns of each row only; with a boolean ``logits_at`` (the
dynamic layout) the logits of every position are computed inside the graph and the wanted ones are
selected outside it (a boolean selection has a data-dependent shape, which would break the graph).

Three kinds of call:

* without a cache: compiled, on CUDA with ``mode="reduce-overhead"`` (CUDA graphs: one replay per
  step instead of one launch per kernel);
* with a KV cache (the canvas caches' ``cache_index`` calls, and the AR cache, whose append at
  slots [length, length + l) is made the same call with ``cache_index`` = those slots, the key
  mask False beyond them and the causal mask over slots: the same attention): compiled without
  CUDA graphs, since they write the caller's cache in place and a CUDA graph can only replay
  writes into memory it owns;
* ``soft_tokens`` (Duo's relaxed tokens), an explicit ``attn_mask`` or a FlexAttention block mask,
  an empty batch, and inputs longer than the model's context: the eager model (which also raises
  the eager model's errors).

``stats`` counts them: ``compiled`` calls (of which ``graphed`` ran as CUDA graphs), ``eager``
calls, and ``shapes``, the distinct padded shapes met so far (each costs one compilation, of a few
to tens of seconds, the first time it is met).
"""

from __future__ import annotations

import torch
from torch import nn

from unmask.errors import OptionError
from unmask.model import KVCache

# Distinct shapes one compiled function may specialise to: torch.compile's default limit (8) falls
# back to eager silently past it, while the buckets of one serving process can number a few dozen.
SHAPE_LIMIT = 64
_LIMIT_NAME = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # before torch 2.6


def bucket_batch(rows: int) -> int:
    """The padded batch size of ``rows`` >= 1: the next power of two up to 64, then the next multiple of 64."""
    return 1 << (rows - 1).bit_length() if rows <= 64 else -(-rows // 64) * 64


def bucket_length(length: int, limit: int) -> int:
    """The padded length of ``length`` >= 1 columns: the next power of two up to 8, then the next
    multiple of a quarter of the power of two below (9..16 -> 10, 12, 14, 16; 65 -> 80), so that
    at most a fifth of a call is padding (a canvas is often a power of two plus the separator);
    at most ``limit`` (the model's context, or the cache's slots), and never less than ``length``."""
    if length <= 8:
        padded = 1 << (length - 1).bit_length()
    else:
        step = 1 << ((length - 1).bit_length() - 3)
        padded = -(-length // step) * step
    return max(length, min(padded, limit))


def _pad(x: torch.Tensor | None, rows: int, cols: int | None = None, fill=None) -> torch.Tensor | None:
    """``x`` (B, ...) with rows added up to ``rows`` (copies of row 0) and, for a (B, L) ``x``,
    columns up to ``cols``: ``fill`` where given, else copies of the last column; with the strides
    of a new tensor (a graph is specialised to its inputs' strides too, and a slice of a growing
    tensor changes them even where it counts as contiguous: a (1, 1) slice of a (1, S) tensor)."""
    if x is None:
        return None
    if cols is not None and cols > x.shape[1]:
        extra = cols - x.shape[1]
        added = x[:, -1:].expand(-1, extra) if fill is None else torch.full((x.shape[0], extra), fill, dtype=x.dtype, device=x.device)
        x = torch.cat([x, added], dim=1)
    if rows > x.shape[0]:
        x = torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])
    return x if x.stride() == torch.empty(x.shape, device="meta").stride() else x.clone(memory_format=torch.contiguous_format)


class CompiledModel(nn.Module):
    """A Transformer whose calls run through ``torch.compile`` at bucketed shapes (see the module doc).

    ``model``: the network, in eval mode (its weights are shared, not copied).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model.config, "labels", None):
            raise OptionError("compile", "{compile} is for decoding a language model; this checkpoint is a classifier (it has no per-position logits)")
        self.model = model.eval()
        self.config = model.config
        self.cuda_graphs = next(iter(model.parameters())).is_cuda
        # two functions (two code objects), so that the graphed and the ungraphed compilations never share a cache entry
        self._plain = torch.compile(self._uncached, dynamic=False, mode="reduce-overhead" if self.cuda_graphs else None)
        self._cached = torch.compile(self._with_cache, dynamic=False)
        self._shapes: set[tuple] = set()
        self.stats = {"compiled": 0, "graphed": 0, "eager": 0, "shapes": 0}

    def _uncached(self, tokens, t, key_mask, positions, index):
        return self.model(tokens, t=t, key_mask=key_mask, positions=positions, logits_at=index, check_span=False)

    def _with_cache(self, tokens, t, key_mask, positions, keys, values, cache_index, index):
        return self.model(tokens, t=t, key_mask=key_mask, positions=positions, kv_cache=KVCache(keys, values), cache_index=cache_index,
                          logits_at=index, check_span=False)

    def forward(self, tokens: torch.Tensor, *, t=None, key_mask=None, positions=None, kv_cache: KVCache | None = None,
                cache_index=None, logits_at=None, attn_mask=None, soft_tokens=None, check_span: bool = True) -> torch.Tensor:
        """The Transformer's forward (:meth:`unmask.model.Transformer.forward`: the same arguments, the same logits)."""
        if self._eager(tokens, positions, kv_cache, cache_index, attn_mask, soft_tokens, check_span):
            self.stats["eager"] += 1
            return self.model(tokens, t=t, key_mask=key_mask, positions=positions, kv_cache=kv_cache, cache_index=cache_index,
                              logits_at=logits_at, attn_mask=attn_mask, soft_tokens=soft_tokens, check_span=check_span)
        index = logits_at if logits_at is not None and logits_at.dtype != torch.bool else None  # columns: inside the graph
        with torch.no_grad():
            if kv_cache is None:
                logits = self._call_uncached(tokens, t, key_mask, positions, index)
            else:
                logits = self._call_cached(tokens, t, key_mask, positions, kv_cache, cache_index, index)
        self.stats["compiled"] += 1
        if index is not None:
            return logits.flatten(0, 1)
        return logits if logits_at is None else logits[logits_at]

    def _eager(self, tokens, positions, kv_cache, cache_index, attn_mask, soft_tokens, check_span: bool) -> bool:
        """Whether a call runs on the eager model: the inputs the graphs do not cover, and (where
        ``check_span`` asks for the check) those spanning more than the context, which the eager
        model refuses. The span of given positions is checked here, outside the graphs (reading it
        from the device would split a graph in two)."""
        if attn_mask is not None or soft_tokens is not None or tokens.numel() == 0:
            return True
        context = self.config.context_len
        if kv_cache is not None and cache_index is None:
            if kv_cache.length + tokens.shape[1] > min(kv_cache.k[0].shape[2], context):
                return True
        elif cache_index is None and tokens.shape[1] > context:
            return True
        placed = positions if positions is not None else cache_index
        return check_span and placed is not None and int(placed.max() - placed.min()) + 1 > context

    def _call_uncached(self, tokens, t, key_mask, positions, index=None) -> torch.Tensor:
        """(B, L, V) logits of a call without a cache (B, W, V at the columns ``index`` (B, W)), through the bucket's graph."""
        b, length = tokens.shape
        rows, cols = bucket_batch(b), bucket_length(length, self.config.context_len)
        if key_mask is None and cols > length and not self.config.causal:
            key_mask = torch.ones_like(tokens, dtype=torch.bool)
        args = (_pad(tokens, rows, cols), _pad(t, rows), _pad(key_mask, rows, cols, False), _pad(positions, rows, cols), _pad(index, rows))
        new = self._met(("plain", rows, cols, _width(index), t is not None, key_mask is not None, positions is not None, tokens.dtype))
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
            self.stats["graphed"] += 1
        logits = self._run(self._plain, args, new)
        logits = logits.view(rows, -1, logits.shape[-1])[:b] if index is not None else logits[:b, :length]
        return logits.clone() if self.cuda_graphs else logits  # a CUDA graph's output is overwritten by its next replay

    def _call_cached(self, tokens, t, key_mask, positions, kv_cache: KVCache, cache_index, index=None) -> torch.Tensor:
        """(R, Q, V) logits of a call with a KV cache (R, W, V at the fed columns ``index`` (R, W)), the fed
        columns padded to a bucket (the batch is the cache's)."""
        b, q = tokens.shape
        slots = kv_cache.k[0].shape[2]
        appending = cache_index is None
        if appending:  # the AR cache's append as a write at those slots, the later slots hidden (see the module doc)
            start = kv_cache.length
            cache_index = torch.arange(start, start + q, device=tokens.device).expand(b, q)
            seen = torch.ones((b, start + q), dtype=torch.bool, device=tokens.device) if key_mask is None else key_mask.bool()
            key_mask = _pad(seen, b, slots, False)
        if positions is None:
            positions = cache_index
        cols = bucket_length(q, slots)
        new = self._met(("cached", b, cols, slots, _width(index), t is not None, key_mask is not None, kv_cache.k[0].dtype))
        args = (_pad(tokens, b, cols), _pad(t, b), _pad(key_mask, b), _pad(positions, b, cols), kv_cache.k, kv_cache.v,
                _pad(cache_index, b, cols), _pad(index, b))
        logits = self._run(self._cached, args, new)
        logits = logits.view(b, -1, logits.shape[-1]) if index is not None else logits[:, :q]
        if appending:
            kv_cache.length += q
        return logits

    def _met(self, shape: tuple) -> bool:
        """Record a padded shape; whether it is new (its first call compiles)."""
        if shape in self._shapes:
            return False
        self._shapes.add(shape)
        self.stats["shapes"] = len(self._shapes)
        return True

    def _run(self, fn, args, new: bool) -> torch.Tensor:
        """``fn(*args)``; a new shape may be compiled past torch.compile's default limit of specialisations."""
        if not new:
            return fn(*args)
        with torch._dynamo.config.patch(_LIMIT_NAME, max(SHAPE_LIMIT, getattr(torch._dynamo.config, _LIMIT_NAME))):
            return fn(*args)


def _width(index: torch.Tensor | None) -> int | None:
    """The columns per row of a ``logits_at`` index (a graph is specialised to it), None without one."""
    return None if index is None else index.shape[1]


def compile_for_decoding(model: nn.Module, compile: bool) -> nn.Module:
    """``model`` itself, or with ``compile`` its :class:`CompiledModel` (every entry point's one switch)."""
    return CompiledModel(model) if compile else model
