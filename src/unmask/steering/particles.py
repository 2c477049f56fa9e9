"""Rows of a sampler state as particles: copy, concatenate and select whole rows of any sampler's
state (its tokens, per-row times, counters and KV cache alike), and the selections the guides make
among them: systematic resampling by weight, the effective sample size, a softmax choice.
docs/algorithms.md, 'Reward- and energy-guided decoding'.

A state's per-row fields are the tensors whose first dimension is the batch; a canvas or block cache
is taken with its own ``rows`` (its keys/values are copied, the unconditional rows of classifier-free
guidance with their conditional ones).
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

import torch

from unmask.model import KVCache
from unmask.sampling.base import categorical


def take_rows(state, index: torch.Tensor, keep: tuple[str, ...] = ()):
    """The state (a sampler state dataclass) of rows ``index`` (R',) (repeats allowed: copies); the
    fields named in ``keep`` stay as they are."""
    b = state.tokens.shape[0]
    changes = {f.name: _take(getattr(state, f.name), index, b) for f in fields(state) if f.name not in keep}
    return replace(state, **changes)


def _take(value, index: torch.Tensor, b: int):
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() and value.shape[0] == b else value
    if hasattr(value, "rows") and hasattr(value, "kv"):  # a canvas or block cache
        return value.rows(index)
    return value


def cat_rows(a, b):
    """The state whose rows are those of ``a`` then those of ``b`` (two states of one sampler; the
    scalar fields are ``a``'s)."""
    ra, rb = a.tokens.shape[0], b.tokens.shape[0]
    return replace(a, **{f.name: _cat(getattr(a, f.name), getattr(b, f.name), ra, rb) for f in fields(a)})


def _cat(x, y, ra: int, rb: int):
    if isinstance(x, torch.Tensor):
        return torch.cat([x, y]) if x.dim() and x.shape[0] == ra else x
    if isinstance(x, KVCache):
        if x.k[0].shape[0] == 2 * ra:  # classifier-free guidance: conditional rows, then unconditional ones
            pair = lambda p, q: torch.cat([p[:ra], q[:rb], p[ra:], q[rb:]])  # noqa: E731
        else:
            pair = lambda p, q: torch.cat([p, q])  # noqa: E731
        return KVCache([pair(p, q) for p, q in zip(x.k, y.k)], [pair(p, q) for p, q in zip(x.v, y.v)], x.length)
    if is_dataclass(x) and hasattr(x, "kv"):  # a cache: its fields row by row
        return replace(x, **{f.name: _cat(getattr(x, f.name), getattr(y, f.name), ra, rb) for f in fields(x)})
    return x


def effective_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS = (sum w)^2 / sum w^2 of each group's log-weights (G, N) -> (G,) float64."""
    w = (log_w.double() - log_w.double().amax(dim=1, keepdim=True)).exp()
    return w.sum(dim=1) ** 2 / (w**2).sum(dim=1)


def systematic(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling of each group's N particles (G, N) log-weights: one uniform u per group,
    the j-th of N points (u + j) / N takes the ancestor whose cumulative normalised weight first
    exceeds it, so ancestor i gets N w_i copies in expectation (rounded up or down). The copies come in
    ancestor order, which a slot must not inherit (slot 0 would favour the first ancestors): they are
    rotated by a uniform random offset per group, so that every slot holds a draw by weight. Returns
    the ancestors (G, N) (indices within the group)."""
    g, n = log_w.shape
    w = (log_w.double() - log_w.double().amax(dim=1, keepdim=True)).exp()
    cdf = w.cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand((g, 1), generator=generator, dtype=torch.float64, device=log_w.device)
    slots = torch.arange(n, device=log_w.device)
    ancestors = torch.searchsorted(cdf, (u + slots.double()) / n, right=True).clamp(max=n - 1)
    shift = torch.randint(n, (g, 1), generator=generator, device=log_w.device)
    return ancestors.gather(1, (slots + shift) % n)


def softmax_choice(values: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """One candidate per group from values (G, M): argmax (first on ties) at alpha = 0, else a draw
    from softmax(values / alpha). A group whose values are all equal keeps candidate 0: its candidates
    are exchangeable draws of one step, so keeping the first has the law of a uniform choice. (G,) long."""
    first = values.argmax(dim=1)  # the first maximum
    if alpha == 0:
        return first
    drawn = categorical(values.double() / alpha, generator)[0]
    tied = (values == values[:, :1]).all(dim=1)
    return torch.where(tied, 0, drawn)
