"""The MDM and AR losses: t-DCE and k-DCE noise and loss, AR next-token cross-entropy. docs/algorithms.md, 'MDM loss: t-DCE and k-DCE'.

Every loss returns per-sequence losses in nats per token, shape (B,); their mean is the training
loss. The MDM values are unbiased estimates of the negative ELBO (an upper bound on the NLL); the
AR values are exact NLLs. Both normalise by the same L tokens per sequence so the two are directly
comparable.

The MDM losses come in two halves: drawing the forward-process noise (:func:`corrupt_t_dce`,
:func:`corrupt_k_dce`) and scoring the network on given noise (:func:`dce_loss`). The training
loop draws the noise of the global batch once and gives each process its rows, so any number of
processes computes the same loss. Nothing here reads attributes of the network it is given: it is
called only as ``model(tokens, t=t)``, so DDP, FSDP or ``torch.compile`` wrappers work unchanged.

These are the maths that training (the objectives of :mod:`unmask.objectives`) and evaluation
(:mod:`unmask.likelihood`) share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from unmask.counter_rng import hashed_uniform, hashed_words
from unmask.schedule import Schedule, add_noise, mask_exactly, sample_times


def denoiser_logits(model, tokens: torch.Tensor, t: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Call an MDM network with its time t (B,); a time-agnostic network ignores t (RADD)."""
    return model(tokens, t=None if t is None else t.to(tokens.device), **kwargs)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(targets) per position, in float32: logits (B, L, V), targets (B, L) -> (B, L)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


@dataclass(frozen=True)
class Corruption:
    """One draw of the MDM forward process for a batch of clean sequences x0 (B, L).

    The loss of row b is ``weight[b] / L * sum of -log p(x0 | xt) over its masked positions``.
    """

    xt: torch.Tensor  # (B, L) x0 with the masked positions set to MASK
    masked: torch.Tensor  # (B, L) bool
    t: torch.Tensor  # (B,) the time a time-conditioned network sees
    weight: torch.Tensor  # (B,) ELBO weight: w(t) for t-DCE, L / k for k-DCE

    def rows(self, index: slice) -> "Corruption":
        """The rows ``index`` of every field (this process's share of a global batch)."""
        return Corruption(self.xt[index], self.masked[index], self.t[index], self.weight[index])

    def to(self, device: torch.device) -> "Corruption":
        return Corruption(self.xt.to(device), self.masked.to(device), self.t.to(device), self.weight.to(device))


def corrupt_t_dce(
    x0: torch.Tensor,
    schedule: Schedule,
    mask_id: int,
    generator: torch.Generator,
    t: torch.Tensor | None = None,
    low_discrepancy: bool = True,
) -> Corruption:
    """lambda/t-DCE noise: t ~ U(0,1) (or the given t (B,)), each token masked with p = 1 - alpha(t)."""
    if t is None:
        t = sample_times(x0.shape[0], generator, low_discrepancy)
    xt, masked = add_noise(x0, schedule.mask_prob(t), mask_id, generator)
    return Corruption(xt, masked, t.to(x0.device), schedule.weight(t).to(x0.device))


def corrupt_k_dce(
    x0: torch.Tensor, mask_id: int, generator: torch.Generator, u: torch.Tensor | None = None, low_discrepancy: bool = True
) -> Corruption:
    """k-DCE / any-order AR noise: k = ceil(u L) ~ U{1..L} positions masked uniformly, weight L/k.

    u in (0, 1] (B,) may be given; stratified u gives stratified k. A time-conditioned network sees
    the mask fraction k/L as its time.
    """
    b, l = x0.shape
    if u is None:
        u = sample_times(b, generator, low_discrepancy)
    k = torch.ceil(u * l).clamp(1, l).long()
    xt, masked = mask_exactly(x0, k, mask_id, generator)
    k = k.to(x0.device)
    return Corruption(xt, masked, k.float() / l, l / k.float())


@dataclass(frozen=True)
class MaskDraw:
    """One draw of the MDM forward process for a batch, held as per-row numbers: the (B, L) masks
    are made where the loss runs (:meth:`corrupt`), on its device.

    The training loop draws the noise of a whole global batch on the host, so that every process
    draws the same; drawing (B, L) positions there, sorting them for k-DCE and sending them to the
    device each step costs host time a GPU step does not hide (docs/training.md, 'Masking noise').
    Here the host draws only t (or k) per row and one seed per step; the positions are a
    counter-based hash of (seed, the row's index in the global batch, position)
    (:mod:`unmask.counter_rng`), so any process or micro-batch makes its own rows' masks alone, the
    same bits on any device. The distribution is that of :func:`corrupt_k_dce` / :func:`corrupt_t_dce`.
    """

    seed: int  # the step's seed of the positions
    row: torch.Tensor  # (B,) int64, each row's index in the global batch
    t: torch.Tensor  # (B,) the time a time-conditioned network sees
    weight: torch.Tensor  # (B,) ELBO weight: w(t) for t-DCE, L / k for k-DCE
    count: torch.Tensor | None = None  # (B,) int64, k-DCE: exactly count[b] positions of row b masked
    mask_prob: torch.Tensor | None = None  # (B,) t-DCE: each position masked with probability 1 - alpha(t)

    def rows(self, index: slice) -> "MaskDraw":
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        return replace(self, row=self.row[index], t=self.t[index], weight=self.weight[index], count=pick(self.count),
                       mask_prob=pick(self.mask_prob))

    def to(self, device: torch.device) -> "MaskDraw":
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return replace(self, row=move(self.row), t=move(self.t), weight=move(self.weight), count=move(self.count),
                       mask_prob=move(self.mask_prob))

    def corrupt(self, x0: torch.Tensor, mask_id: int) -> Corruption:
        """The :class:`Corruption` of clean rows x0 (B, L) (on the draw's device): k-DCE masks the count[b]
        positions of row b with the smallest hashed words (distinct within a row, so a uniformly random
        k-subset); t-DCE masks where a hashed uniform falls below the mask probability."""
        length = x0.shape[1]
        if self.count is not None:
            order = hashed_words(self.seed, self.row, length).argsort(dim=1)
            first = torch.arange(length, device=x0.device)[None, :] < self.count[:, None]
            masked = torch.empty(x0.shape, dtype=torch.bool, device=x0.device).scatter_(1, order, first)
        else:
            masked = hashed_uniform(self.seed, self.row, length) < self.mask_prob[:, None]
        return Corruption(x0.masked_fill(masked, mask_id), masked, self.t, self.weight)


def draw_k_dce(rows: int, length: int, generator: torch.Generator, low_discrepancy: bool = True) -> MaskDraw:
    """k-DCE noise of ``rows`` rows of ``length`` tokens as a :class:`MaskDraw`: k = ceil(u L) ~ U{1..L} per row
    (u low-discrepancy over the rows), t = k / L, weight L / k, and the step's seed, all from ``generator``."""
    u = sample_times(rows, generator, low_discrepancy)
    k = torch.ceil(u * length).clamp(1, length).long()
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return MaskDraw(seed, torch.arange(rows), k.float() / length, length / k.float(), count=k)


def draw_t_dce(rows: int, schedule: Schedule, generator: torch.Generator, low_discrepancy: bool = True) -> MaskDraw:
    """t-DCE noise of ``rows`` rows as a :class:`MaskDraw`: t ~ U(0, 1] per row (low-discrepancy), mask probability
    1 - alpha(t), weight w(t), and the step's seed, all from ``generator``."""
    t = sample_times(rows, generator, low_discrepancy)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return MaskDraw(seed, torch.arange(rows), t, schedule.weight(t), mask_prob=schedule.mask_prob(t))


def dce_loss(model, x0: torch.Tensor, noise: Corruption) -> torch.Tensor:
    """The MDM loss of given noise: x0 (B, L) -> (B,) nats/token (an unbiased negative-ELBO estimate)."""
    nll = token_nll(denoiser_logits(model, noise.xt, noise.t), x0)
    return (nll * noise.masked).sum(dim=1) * noise.weight / x0.shape[1]


def t_dce(
    model,
    x0: torch.Tensor,
    schedule: Schedule,
    generator: torch.Generator,
    *,
    mask_id: int,
    t: torch.Tensor | None = None,
    low_discrepancy: bool = True,
) -> torch.Tensor:
    """t-DCE loss x0 (B, L) -> (B,); ``t`` (B,) may be given (stratified MC evaluation)."""
    return dce_loss(model, x0, corrupt_t_dce(x0, schedule, mask_id, generator, t, low_discrepancy))


def k_dce(
    model, x0: torch.Tensor, generator: torch.Generator, *, mask_id: int, u: torch.Tensor | None = None, low_discrepancy: bool = True
) -> torch.Tensor:
    """k-DCE loss (L/k) * masked NLL / L, x0 (B, L) -> (B,); ``u`` (B,) in (0, 1] may be given."""
    return dce_loss(model, x0, corrupt_k_dce(x0, mask_id, generator, u, low_discrepancy))


def ar_loss(model, window: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy. window (B, L+1): inputs window[:, :-1], targets window[:, 1:]. -> (B,).

    ``targets`` (B, L) bool: score only those targets and normalise by their number per row (SFT:
    the response region, in nats per response token)."""
    nll = token_nll(model(window[:, :-1]), window[:, 1:])
    if targets is None:
        return nll.mean(dim=1)
    return (nll * targets).sum(dim=1) / targets.sum(dim=1)
