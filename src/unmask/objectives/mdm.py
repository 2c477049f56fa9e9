"""Masked diffusion (MDM): k-DCE or t-DCE on windows of text. docs/algorithms.md, 'MDM loss: t-DCE and k-DCE'.

The network denoises the last L tokens of each window of L+1 (the AR baseline predicts the same L
tokens, so both learn the same B x L targets per step). The noise of the global batch is drawn
low-discrepancy over all of it (unmask.losses: ``corrupt_k_dce``, ``corrupt_t_dce``), the loss is
``dce_loss``, and the held-out bound is the Monte Carlo ELBO with the training estimator
(``unmask.likelihood.mc_elbo``).

Defaults, each objective at its own best on validation at the demo budget (tiny preset, 600 steps
of 16 x 128 tokens; benchmarks/mdm_training_sweep.py; docs/benchmarks.md, 'MDM training settings'):
the MDM at a lower learning rate than the AR model, with k-DCE (the same bound, smaller loss spikes).
"""

from __future__ import annotations

import torch

from unmask.likelihood import LikelihoodResult, mc_elbo
from unmask.losses import Corruption, corrupt_k_dce, corrupt_t_dce, dce_loss
from unmask.objectives.base import VALIDATION_SEED, Batch, Objective
from unmask.objectives.registry import register


@register
class MaskedDiffusion(Objective):
    name = "mdm"
    defaults = {"lr": 2e-3, "loss": "k-dce"}

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> Corruption:
        x0, cfg = batch.tokens[:, 1:], self.train
        if cfg.loss == "k-dce":
            return corrupt_k_dce(x0, self.model.mask_id, generator, low_discrepancy=cfg.low_discrepancy)
        return corrupt_t_dce(x0, self.schedule, self.model.mask_id, generator, low_discrepancy=cfg.low_discrepancy)

    def loss(self, model, batch: Batch, noise: Corruption) -> torch.Tensor:
        return dce_loss(model, batch.tokens[:, 1:], noise)

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        return mc_elbo(model, held_out.tokens[:, 1:], draws=self.train.eval_draws, estimator=self.train.loss, schedule=self.schedule,
                       batch_size=batch_size, seed=VALIDATION_SEED)
