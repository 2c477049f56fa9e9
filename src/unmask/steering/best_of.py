"""Best-of-N: N independent samples from the sampler, the one with the highest reward kept (the
baseline at equal compute). docs/algorithms.md, 'Reward- and energy-guided decoding'.

Its N rows per prompt decode as a batch with the sampler's own step; the reward is called once, on
the N finished samples of every prompt; ties keep the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.steering.guide import Guide
from unmask.steering.options import check_guide_fields


@dataclass(frozen=True)
class BestOfConfig:
    particles: int = 4  # N samples per prompt

    def __post_init__(self) -> None:
        check_guide_fields(self)


def choose(steering, tokens: torch.Tensor) -> torch.Tensor:
    """The row of the highest reward in every group of N finished rows (G,)."""
    rewards = steering.meter.reward(steering.score, steering.candidates(tokens, final=True))
    n = steering.group
    return torch.arange(0, tokens.shape[0], n) + rewards.view(-1, n).argmax(dim=1)  # argmax: the first of equal rewards


best_of = Guide("best-of", BestOfConfig, "reward", True, None, choose)
