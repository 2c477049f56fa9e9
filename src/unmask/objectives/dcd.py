"""Discrete consistency distillation (DCD; Sahoo et al. 2025, "The Diffusion Duality") of a Duo run.
docs/algorithms.md, 'Distillation for few-step sampling'; the duality is in :mod:`unmask.uniform`.

The uniform-state process of a Duo model is the argmax of a Gaussian one: z_t = argmax(w_t), w_t =
alpha~_t e_x + sigma~_t eps, with alpha_t = T(alpha~_t) (the diffusion transformation operator; here
alpha_t = alpha(t) of the run's schedule, and gamma_t = T^-1(alpha_t) with alpha~^2 = sigmoid(-gamma)).
Unlike the uniform-state chain, the Gaussian process has deterministic trajectories: the
probability-flow ODE (DDIM) from w_t with the clean data as its x-prediction keeps eps,

    w_s = alpha~_s e_x + (sigma~_s / sigma~_t) (w_t - alpha~_t e_x) = alpha~_s e_x + sigma~_s eps,

so a window x0 and one eps give a pair of discrete latents on one trajectory, z_t = argmax(w_t) and
z_s = argmax(w_s), s < t. In a round whose teacher samples with N steps, t = j / N (j ~ U{1..N}) and
s = t - 1/N; the student's x_theta(z_t, t) learns the teacher's x_theta(z_s, s), by KL(teacher ||
student) (or the total variation) averaged over the row's positions. Each round the student becomes
the teacher and the step doubles, so consistency is learnt over ever longer stretches of the trajectory.

The argmax needs no (B, L, K) latents: with nu = alpha~ / sigma~ = exp(-gamma / 2) and eps_x the noise
of the clean token, argmax(w) = x0 where nu + eps_x > m = max over v != x0 of eps_v, else the index of
that maximum, uniform over the other K - 1 tokens. So a position draws eps_x, m (by inverting its CDF
Phi(m)^(K-1)) and the other token, on the CPU with the run's noise, and both ends of the trajectory
follow; P(z_t = x0) = T(gamma_t) + (1 - T(gamma_t)) / K, the uniform-state marginal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.objectives.base import Batch
from unmask.objectives.distillation import Distillation, divergence
from unmask.objectives.registry import register
from unmask.objectives.udlm import UniformDiffusion
from unmask.schedule import Schedule, sample_times
from unmask.uniform import ALPHA_MAX, diffusion_operator, gaussian_coefficients


@dataclass(frozen=True)
class TrajectoryNoise:
    """Both ends of Gaussian trajectories mapped to tokens, for windows x0 (B, L): ``zt`` (B, L) = argmax(w_t) at
    the student's time ``t`` (B,), ``zs`` (B, L) = argmax(w_s) at the teacher's ``s`` (B,) = t - 1/N, one eps per row."""

    zt: torch.Tensor
    zs: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor

    def rows(self, index: slice) -> "TrajectoryNoise":
        return TrajectoryNoise(self.zt[index], self.zs[index], self.t[index], self.s[index])

    def to(self, device: torch.device) -> "TrajectoryNoise":
        return TrajectoryNoise(self.zt.to(device), self.zs.to(device), self.t.to(device), self.s.to(device))


@dataclass(frozen=True)
class ArgmaxNoise:
    """What argmax(alpha~ e_x + sigma~ eps) depends on, per position (B, L): ``clean`` = eps_x, ``rival`` = the
    largest of the other K - 1 normals, ``other`` = its token."""

    clean: torch.Tensor
    rival: torch.Tensor
    other: torch.Tensor

    def tokens(self, x0: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """argmax(w) (B, L) at gamma (B,): x0 where alpha~/sigma~ + eps_x beats the rival, else the rival's token."""
        alpha, sigma = gaussian_coefficients(gamma.double())
        return torch.where((alpha / sigma)[:, None] + self.clean > self.rival, x0, self.other)


def draw_argmax_noise(x0: torch.Tensor, vocab_size: int, generator: torch.Generator) -> ArgmaxNoise:
    """eps_x ~ N(0, 1), the maximum m of K - 1 standard normals (P(m <= y) = Phi(y)^(K-1): m = Phi^-1(U^(1/(K-1))))
    and its token, uniform over the K - 1 tokens other than x0, for every position of x0 (B, L); float64, on the CPU."""
    clean = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    rival = torch.special.ndtri(torch.exp(torch.log(u) / (vocab_size - 1)))
    other = torch.randint(0, vocab_size - 1, x0.shape, generator=generator)
    other = other + (other >= x0.cpu()).long()  # skips x0: uniform over the other K - 1
    return ArgmaxNoise(clean, rival, other)


def gamma_at(t: torch.Tensor, schedule: Schedule, vocab_size: int) -> torch.Tensor:
    """gamma_t = T^-1(alpha(t)) (B,) float64: the Gaussian process whose argmax is the run's uniform-state process at t."""
    return diffusion_operator(vocab_size).gamma_for_alpha(schedule.alpha(t.double()).clamp(max=ALPHA_MAX))


def draw_trajectory(x0: torch.Tensor, teacher_steps: int, schedule: Schedule, vocab_size: int, generator: torch.Generator,
                    low_discrepancy: bool = True) -> TrajectoryNoise:
    """DCD noise of windows x0 (B, L) for a teacher of ``teacher_steps`` N: t = j / N with j ~ U{1..N} (stratified
    over the batch with ``low_discrepancy``), s = t - 1/N, and one Gaussian trajectory per row read at both times."""
    j = torch.ceil(sample_times(x0.shape[0], generator, low_discrepancy).double() * teacher_steps).clamp(1, teacher_steps)
    t, s = j / teacher_steps, (j - 1) / teacher_steps
    noise = draw_argmax_noise(x0, vocab_size, generator)
    cpu = x0.cpu()
    zt, zs = (noise.tokens(cpu, gamma_at(time, schedule, vocab_size)) for time in (t, s))
    dev = x0.device
    return TrajectoryNoise(zt.to(dev), zs.to(dev), t.to(dev), s.to(dev))


@register
class ConsistencyDistillation(Distillation, UniformDiffusion):
    """DCD: the student at (z_t, t) matches the teacher at (z_s, s), both ends of one Gaussian trajectory."""

    name = "dcd"
    sources = ("duo", "dcd")
    kind = "Duo"
    defaults = {"lr": 1e-4, "loss": "t-dce"}  # loss: the UDLM bound reported is integrated over continuous t

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> TrajectoryNoise:
        steps = self.teacher.teacher_steps(self.teacher.round)
        return draw_trajectory(batch.tokens[:, 1:], steps, self.schedule, self.model.vocab_size, generator, self.train.low_discrepancy)

    def loss(self, model, batch: Batch, noise: TrajectoryNoise) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher.net(noise.zs, t=noise.s.float()).float().log_softmax(dim=-1)
        student = model(noise.zt, t=noise.t.float()).float().log_softmax(dim=-1)
        return divergence(target, student, self.train.distill.divergence).mean(dim=1)
