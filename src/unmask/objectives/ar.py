"""The autoregressive baseline: next-token cross-entropy on the same windows as the MDM.

A window of L+1 tokens gives L inputs and the L next tokens as targets (``unmask.losses.ar_loss``);
there is no noise, and the held-out score is the exact NLL of the same held-out tokens the MDM's
bound covers, each window conditioned on the token before it (``unmask.likelihood.ar_nll``).
"""

from __future__ import annotations

from typing import Any

import torch

from unmask.config import TrainConfig
from unmask.likelihood import LikelihoodResult, ar_nll
from unmask.losses import ar_loss
from unmask.objectives.base import Batch, Objective
from unmask.objectives.registry import register


@register
class Autoregressive(Objective):
    name = "ar"
    defaults = {"lr": 5e-3, "loss": "t-dce"}  # the AR model has no masking loss; recorded for completeness

    @classmethod
    def network(cls, train: TrainConfig) -> dict[str, Any]:
        return {"causal": True}

    def loss(self, model, batch: Batch, noise: None) -> torch.Tensor:
        return ar_loss(model, batch.tokens)

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        return ar_nll(model, held_out.tokens[:, 1:], held_out.tokens[:, 0], batch_size=batch_size)
