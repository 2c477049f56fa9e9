"""Self-distillation through time (SDTT; Deschenaux & Gulcehre 2024) of an MDM. docs/algorithms.md,
'Distillation for few-step sampling'.

In a round whose teacher samples with N steps of the ancestral sampler
(docs/algorithms.md, 'Ancestral sampler'), the student learns to take one step of 2 dt where the
teacher takes two of dt = 1/N. A window x0 is masked at a time t = j / (N/2) of the student's grid (the
forward process: each token masked with probability 1 - alpha(t)), and the teacher takes its two steps
t -> u = t - dt -> s = t - 2 dt:

1. one call p_T(. | z_t, t); each masked position unmasks with probability 1 - m(u)/m(t) (m = 1 - alpha)
   and takes a token drawn from that distribution, giving the intermediate state z_u;
2. one call p_T(. | z_u, u) for the positions still masked.

The target of a position masked in z_t is the distribution the teacher draws it from on this path:
p_T(. | z_t) where it unmasked in the first step, p_T(. | z_u) where it did not (where it unmasks in the
second step, or would at the next). The student's one call p_S(. | z_t, t) learns it at every masked
position, by KL(target || p_S) (or the total variation), averaged over the row's masked positions.

Under the KL the student converges to the target's expectation over the intermediate draw (the q that
minimises E KL(T || q) is E[T]): E[target_i] = (1 - m(u)/m(t)) p_T(. | z_t)_i + E[1{i masked in z_u}
p_T(. | z_u)_i], the teacher's prediction at i once it has committed the tokens of one more step, in its
place in one step. A student that equals the teacher has the loss: the mean over the masked positions of
1{i masked in z_u} KL(p_T(. | z_u)_i || p_T(. | z_t)_i), the KL from the teacher's one-step to its
two-step distribution.

All randomness (the time, the mask, the intermediate step's coins and token draws) is drawn on the CPU
with the run's noise, so every process computes the same and a resumed run the same again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.likelihood import LikelihoodResult, mc_elbo
from unmask.losses import denoiser_logits
from unmask.objectives.base import VALIDATION_SEED, Batch
from unmask.objectives.distillation import Distillation, divergence
from unmask.objectives.registry import register
from unmask.schedule import Schedule, add_noise, sample_times


@dataclass(frozen=True)
class TwoStepNoise:
    """One draw of SDTT's noise for windows x0 (B, L): the student's step from ``t`` (B,) float64 and the
    teacher's intermediate time ``u`` (B,) = t - dt; ``xt`` (B, L) x0 masked at t (``masked`` (B, L) bool);
    ``coins`` (B, L) float64: a masked position unmasks in the teacher's first step iff coins >= m(u)/m(t)
    (the ancestral sampler's rule); ``draws`` (B, L) float64: the uniform of its token's inverse-CDF draw."""

    xt: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    u: torch.Tensor
    coins: torch.Tensor
    draws: torch.Tensor

    def rows(self, index: slice) -> "TwoStepNoise":
        return TwoStepNoise(*(value[index] for value in self._values()))

    def to(self, device: torch.device) -> "TwoStepNoise":
        return TwoStepNoise(*(value.to(device) for value in self._values()))

    def _values(self) -> tuple[torch.Tensor, ...]:
        return self.xt, self.masked, self.t, self.u, self.coins, self.draws


def draw_two_steps(x0: torch.Tensor, teacher_steps: int, schedule: Schedule, mask_id: int, generator: torch.Generator,
                   low_discrepancy: bool = True) -> TwoStepNoise:
    """SDTT noise of x0 (B, L) for a teacher of ``teacher_steps`` N (even): the student's step j ~ U{1..N/2}
    (stratified over the batch with ``low_discrepancy``) from t = j / (N/2), u = t - 1/N; x0 masked at t."""
    b, length = x0.shape
    half = teacher_steps // 2
    j = torch.ceil(sample_times(b, generator, low_discrepancy).double() * half).clamp(1, half)
    t = j / half
    xt, masked = add_noise(x0, schedule.mask_prob(t), mask_id, generator)
    coins = torch.rand((b, length), generator=generator, dtype=torch.float64)
    draws = torch.rand((b, length), generator=generator, dtype=torch.float64)
    device = x0.device
    return TwoStepNoise(xt, masked, t.to(device), (t - 1 / teacher_steps).to(device), coins.to(device), draws.to(device))


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row of logits (N, V) whose float64 cumulative probability first exceeds u (N,) in [0, 1):
    the samplers' exact draw (:func:`unmask.sampling.base.categorical`) with the uniform given."""
    weights = (logits.double() - logits.amax(dim=-1, keepdim=True).double()).exp()
    cdf = weights.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return index.clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def teacher_target(teacher, noise: TwoStepNoise, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's two steps from ``noise.xt``: (target log-probabilities (N, V) float32 at the N masked
    positions in row-major order, ``first`` (B, L) bool: the positions unmasked in its first step).

    Two calls of ``teacher``: at (z_t, t), and at (z_u, u) for the positions still masked in z_u.
    """
    xt, masked = noise.xt, noise.masked
    first_logits = denoiser_logits(teacher, xt, noise.t.float(), logits_at=masked).float()
    stay = (schedule.mask_prob(noise.u) / schedule.mask_prob(noise.t)).clamp(0, 1)
    first = masked & (noise.coins >= stay[:, None])
    zu = xt.clone()
    unmasks = first[masked]  # which of the N masked positions unmask in the first step
    zu[first] = inverse_cdf(first_logits[unmasks], noise.draws[first])
    second = masked & ~first
    target = first_logits.log_softmax(dim=-1)
    if bool(second.any()):
        target[~unmasks] = denoiser_logits(teacher, zu, noise.u.float(), logits_at=second).float().log_softmax(dim=-1)
    return target, first


def per_row_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (N,), given at the N True positions of ``where`` (B, L) in row-major order, over
    each row's positions -> (B,) (0 for a row without any)."""
    spread = torch.zeros(where.shape, dtype=values.dtype, device=values.device)
    spread[where] = values
    return spread.sum(dim=1) / where.sum(dim=1).clamp(min=1)


@register
class SelfDistillation(Distillation):
    """SDTT: the student matches in one ancestral step the teacher's distribution after two."""

    name = "sdtt"
    sources = ("mdm", "sdtt")
    kind = "MDM"
    defaults = {"lr": 1e-4, "loss": "k-dce"}  # loss: the estimator of the held-out bound

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> TwoStepNoise:
        steps = self.teacher.teacher_steps(self.teacher.round)
        return draw_two_steps(batch.tokens[:, 1:], steps, self.schedule, self.model.mask_id, generator, self.train.low_discrepancy)

    def loss(self, model, batch: Batch, noise: TwoStepNoise) -> torch.Tensor:
        target, _ = teacher_target(self.teacher.net, noise, self.schedule)
        student = denoiser_logits(model, noise.xt, noise.t.float(), logits_at=noise.masked).float().log_softmax(dim=-1)
        return per_row_mean(divergence(target, student, self.train.distill.divergence), noise.masked)

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        """The student's MDM bound (it stays an MDM; the bound shows what distillation costs in likelihood)."""
        return mc_elbo(model, held_out.tokens[:, 1:], draws=self.train.eval_draws, estimator=self.train.loss, schedule=self.schedule,
                       batch_size=batch_size, seed=VALIDATION_SEED)
