"""The guide protocol: a guide is a function of explicit state that wraps any sampler's step (the
sampler is the proposal), so that policies, caches, classifier-free guidance, blocks and batches
compose with it unchanged. docs/algorithms.md, 'Reward- and energy-guided decoding'.

:func:`guided` turns a :class:`~unmask.sampling.base.Sampler` into one whose state is a
:class:`GuidedState` (the sampler's own state and the guide's weights and values) and whose step is
the guide's; the block driver and the callbacks read it like any sampler state. The guide and its
score ride in the conditioning (``Conditioning.steering``, a :class:`~unmask.steering.steering.Steering`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from unmask.sampling.base import Sampler, SamplerState


@dataclass(frozen=True)
class GuidedState:
    """A guided decoding's state: the sampler's state ``inner`` over all particle rows (R,), and the
    guide's own: SMC's log-weights and values (R,), EDLM's open positions at the block start (R,)."""

    inner: SamplerState
    log_w: torch.Tensor | None = None
    value: torch.Tensor | None = None
    total: torch.Tensor | None = None

    tokens = property(lambda self: self.inner.tokens)
    step = property(lambda self: self.inner.step)
    nfe = property(lambda self: self.inner.nfe)
    row_nfe = property(lambda self: self.inner.row_nfe)
    cache = property(lambda self: self.inner.cache)
    done = property(lambda self: self.inner.done)
    eligible = property(lambda self: self.inner.eligible)
    mask_id = property(lambda self: self.inner.mask_id)


@dataclass(frozen=True)
class Guide:
    """A guide: its typed ``config``; ``score``: the parameter that gives its score ("reward" or
    "energy"); ``persistent``: its ``particles`` are rows kept from start to end (best-of, SMC),
    otherwise candidates made and dropped within a step (SVDD, EDLM); ``step(steering, sampler,
    model, state, generator, config, cond) -> state`` (None: the sampler's own step); ``choose(steering,
    tokens (R, L)) -> (G,)``: the row kept for each prompt row at the end."""

    name: str
    config: type
    score: str
    persistent: bool
    step: Callable | None
    choose: Callable

    def group(self, config) -> int:
        """Rows per prompt row while decoding."""
        return config.particles if self.persistent else 1


def guided(sampler: Sampler) -> Sampler:
    """``sampler`` with the guide of ``cond.steering`` around its step (the same name and config)."""

    def start(model, x: torch.Tensor, config, eligible=None, cache=None) -> GuidedState:
        return GuidedState(sampler.start(model, x, config, eligible, cache))

    def step(model, state: GuidedState, generator: torch.Generator, config, cond) -> GuidedState:
        steering = cond.steering
        plain = replace(cond, steering=None)
        if steering.guide.step is None:
            return replace(state, inner=sampler.step(model, state.inner, generator, config, plain))
        return steering.guide.step(steering, sampler, model, state, generator, config, plain)

    return Sampler(sampler.name, sampler.config, start, step)


def first_rows(steering, tokens: torch.Tensor) -> torch.Tensor:
    """The first row of every group (G,): what a guide keeps when all of a group's rows are equally good."""
    return torch.arange(0, tokens.shape[0], steering.group, device=tokens.device)
