"""Masked diffusion (MDM): k-DCE or t-DCE on windows of text. docs/algorithms.md, 'MDM loss: t-DCE and k-DCE'.

The network denoises the last L tokens of each window of L+1 (the AR baseline predicts the same L
tokens, so both learn the same B x L targets per step). The noise of the global batch is drawn
low-discrepancy over all of it, on the host as per-row numbers and a seed (unmask.losses:
``draw_k_dce``, ``draw_t_dce``); its masks are made on the device by the loss (``MaskDraw.corrupt``,
then ``dce_loss``), so an MDM step costs the host no more than an AR step. The held-out bound is the
Monte Carlo ELBO with the training estimator (``unmask.likelihood.mc_elbo``).

Defaults, each objective at its own best on validation at the demo budget (tiny preset, 600 steps
of 16 x 128 tokens; benchmarks/mdm_training_sweep.py; docs/benchmarks.md, 'MDM training settings'):
the MDM at a lower learning rate than the AR model, with k-DCE (the same bound, smaller loss spikes).
"""

from __future__ import annotations

import torch

from unmask.likelihood import LikelihoodResult, mc_elbo
from unmask.losses import MaskDraw, dce_loss, draw_k_dce, draw_t_dce
from unmask.objectives.base import VALIDATION_SEED, Batch, Objective
from unmask.objectives.registry import register


@register
class MaskedDiffusion(Objective):
    name = "mdm"
    defaults = {"lr": 2e-3, "loss": "k-dce"}

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> MaskDraw:
        rows, length = batch.tokens.shape[0], batch.tokens.shape[1] - 1
        if self.train.loss == "k-dce":
            return draw_k_dce(rows, length, generator, low_discrepancy=self.train.low_discrepancy)
        return draw_t_dce(rows, self.schedule, generator, low_discrepancy=self.train.low_discrepancy)

    def loss(self, model, batch: Batch, noise: MaskDraw) -> torch.Tensor:
        x0 = batch.tokens[:, 1:]
        return dce_loss(model, x0, noise.corrupt(x0, self.model.mask_id))

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        return mc_elbo(model, held_out.tokens[:, 1:], draws=self.train.eval_draws, estimator=self.train.loss, schedule=self.schedule,
                       batch_size=batch_size, seed=VALIDATION_SEED)
