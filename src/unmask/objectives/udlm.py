"""Uniform-state diffusion (UDLM; Schiff et al. 2024): the exact continuous-time NELBO on windows of text.
docs/algorithms.md, 'Uniform-state diffusion (UDLM, Duo)'; the maths is in :mod:`unmask.uniform`.

The network denoises the last L tokens of each window of L+1 (as the MDM and the AR baseline). A
token is corrupted by a uniformly drawn one rather than by MASK, so the noise level is not visible
in z_t: the network is bidirectional and time-conditioned (``ModelConfig.noise = "uniform"``). The
global batch gets low-discrepancy times t and z_t ~ q(z_t | x) at alpha(t) of ``--schedule``
(linear: MDLM's log-linear 1 - alpha = (1 - eps) t; cosine), the loss is the NELBO integrand at t
(:func:`unmask.uniform.udlm_nelbo`) and the held-out bound its Monte Carlo estimate with eps = 0
(:func:`unmask.uniform.udlm_elbo`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unmask.config import TrainConfig
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError
from unmask.likelihood import LikelihoodResult
from unmask.objectives.base import VALIDATION_SEED, Batch, Objective
from unmask.objectives.registry import register
from unmask.uniform import UniformCorruption, draw_uniform, udlm_elbo, udlm_loss


@register
class UniformDiffusion(Objective):
    name = "udlm"
    # loss: the bound is integrated over continuous t (the estimator eval ppl names t-dce); lr as the MDM's
    defaults = {"lr": 2e-3, "loss": "t-dce"}

    @classmethod
    def network(cls, train: TrainConfig) -> dict[str, Any]:
        return {"causal": False, "time_conditioning": True, "noise": "uniform"}

    def check(self, tokenizer: Tokenizer, data_dir: Path, device: torch.device) -> None:
        super().check(tokenizer, data_dir, device)
        if self.model.noise != "uniform" or self.model.block_causal:
            raise OptionError("objective", "{objective} {_name} trains a network with noise='uniform' and full bidirectional attention "
                              "(got noise={_noise!r}, block_causal={_block})", _name=self.train.objective, _noise=self.model.noise,
                              _block=self.model.block_causal)
        if self.train.loss != "t-dce":
            raise OptionError("loss", "{objective} {_name} integrates its bound over continuous t: {loss} t-dce (got {_loss})",
                              _name=self.train.objective, _loss=self.train.loss)

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> UniformCorruption:
        return draw_uniform(batch.tokens[:, 1:], self.schedule, self.model.vocab_size, generator, low_discrepancy=self.train.low_discrepancy)

    def loss(self, model, batch: Batch, noise: UniformCorruption) -> torch.Tensor:
        return udlm_loss(model, batch.tokens[:, 1:], noise)

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        return udlm_elbo(model, held_out.tokens[:, 1:], draws=self.train.eval_draws, schedule=self.schedule, batch_size=batch_size,
                         seed=VALIDATION_SEED)
