"""Duo (Sahoo et al. 2025, "The Diffusion Duality"): UDLM trained first through its Gaussian dual.
docs/algorithms.md, 'Uniform-state diffusion (UDLM, Duo)'; the maths is in :mod:`unmask.uniform`.

The uniform-state process is the argmax of a Gaussian one: z_t = argmax(w_t), w_t = alpha~ e_x +
sigma~ eps, has alpha_t = T(alpha~) (the diffusion transformation operator). For the first
``curriculum_steps`` optimizer steps the network sees the relaxed one-hot softmax(w_t / tau) of the
latents instead of z_t (a lower-variance signal, annealed towards the discrete input as tau -> 0),
with gamma ~ U[gamma_min, gamma_max] (alpha~^2 = sigmoid(-gamma)) and the UDLM integrand scoring the
discrete z_t at alpha_t = T(gamma) and its rate along the curriculum's time; after them the
objective is plain UDLM (:mod:`unmask.objectives.udlm`). The held-out bound is always the UDLM NELBO
of the discrete process.
"""

from __future__ import annotations

import torch

from unmask.config import DuoConfig
from unmask.objectives.base import Batch
from unmask.objectives.registry import register
from unmask.objectives.udlm import UniformDiffusion
from unmask.uniform import GaussianCorruption, UniformCorruption, draw_gaussian, relaxed_loss


@register
class Duo(UniformDiffusion):
    name = "duo"

    step = 0  # the optimizer step about to be taken (set by the loop through before_step)

    @property
    def curriculum(self) -> DuoConfig:
        """The run's curriculum settings (their defaults where a config was made without the section)."""
        return self.train.duo or DuoConfig()

    def before_step(self, step: int, model: torch.nn.Module) -> None:
        self.step = step

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> GaussianCorruption | UniformCorruption:
        """Gaussian latents (as per-row seeds) while step < curriculum_steps, then the uniform process."""
        cur = self.curriculum
        if self.step >= cur.curriculum_steps:
            return super().draw_noise(batch, generator)
        return draw_gaussian(batch.tokens[:, 1:], self.schedule, self.model.vocab_size, generator, (cur.gamma_min, cur.gamma_max),
                             cur.tau, low_discrepancy=self.train.low_discrepancy)

    def loss(self, model, batch: Batch, noise: GaussianCorruption | UniformCorruption) -> torch.Tensor:
        if isinstance(noise, GaussianCorruption):
            return relaxed_loss(model, batch.tokens[:, 1:], noise)
        return super().loss(model, batch, noise)
