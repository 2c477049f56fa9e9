"""Cached ancestral sampler (RADD). Reference section 4.

The ancestral chain of :mod:`ancestral`, with the network output of a row reused while the row is
unchanged since its last forward pass: with a time-agnostic network that output is still exact, so
the samples have the ancestral sampler's distribution. Expected calls per row for n uniform steps
and l masked tokens: n (1 - (1 - 1/n)^l).
"""

from __future__ import annotations

from functools import partial

from unmask.errors import UnmaskError
from unmask.sampling.ancestral import AncestralConfig, start as ancestral_start, step as ancestral_step
from unmask.sampling.base import Sampler


def start(model, x, config, eligible=None, cache=None):
    if getattr(model.config, "time_conditioning", False):
        raise UnmaskError("--sampler cached needs a time-agnostic model; this one is time-conditioned (its output changes with t)")
    return ancestral_start(model, x, config, eligible, cache)


cached_ancestral = Sampler("cached", AncestralConfig, start, partial(ancestral_step, reuse=True))
