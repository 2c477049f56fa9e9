"""Training objectives: MDM t-DCE and k-DCE, AR next-token cross-entropy. Reference section 2.

Every function returns per-sequence losses in nats per token, shape (B,); their mean is the
training loss. The MDM values are unbiased estimates of the negative ELBO (an upper bound on the
NLL); the AR values are exact NLLs. Both normalise by the same L tokens per sequence so the two
are directly comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmask.schedule import Schedule, add_noise, mask_exactly, sample_times


def device_of(model) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def denoiser_logits(model, tokens: torch.Tensor, t: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Call an MDM network; t is passed only to time-conditioned models (RADD: the default needs none)."""
    if getattr(model.config, "time_conditioning", False):
        if t is None:
            raise ValueError("time-conditioned model needs t")
        return model(tokens, t=t.to(tokens.device), **kwargs)
    return model(tokens, **kwargs)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(targets) per position, in float32: logits (B, L, V), targets (B, L) -> (B, L)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def t_dce(
    model,
    x0: torch.Tensor,
    schedule: Schedule,
    generator: torch.Generator,
    t: torch.Tensor | None = None,
    low_discrepancy: bool = True,
) -> torch.Tensor:
    """lambda/t-DCE: t ~ U(0,1), mask with p = 1 - alpha(t), weight w(t) on masked NLL. x0 (B, L) -> (B,).

    ``t`` (B,) may be given (stratified MC evaluation); otherwise drawn from ``generator``.
    """
    b, l = x0.shape
    if t is None:
        t = sample_times(b, generator, low_discrepancy)
    xt, masked = add_noise(x0, schedule.mask_prob(t), model.config.mask_id, generator)
    nll = token_nll(denoiser_logits(model, xt, t), x0)
    weight = schedule.weight(t).to(x0.device)
    return (nll * masked).sum(dim=1) * weight / l


def k_dce(
    model,
    x0: torch.Tensor,
    generator: torch.Generator,
    u: torch.Tensor | None = None,
    low_discrepancy: bool = True,
) -> torch.Tensor:
    """k-DCE / any-order AR: k ~ U{1..L}, mask exactly k positions, loss (L/k) * masked NLL. -> (B,).

    k = ceil(u L) for u in (0, 1], so stratified u gives stratified k. The model sees the mask
    fraction k/L as its time when it is time-conditioned.
    """
    b, l = x0.shape
    if u is None:
        u = sample_times(b, generator, low_discrepancy)
    k = torch.ceil(u * l).clamp(1, l).long()
    xt, masked = mask_exactly(x0, k, model.config.mask_id, generator)
    nll = token_nll(denoiser_logits(model, xt, k.float() / l), x0)
    return (nll * masked).sum(dim=1) / k.to(x0.device)


def ar_loss(model, window: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy. window (B, L+1): inputs window[:, :-1], targets window[:, 1:]. -> (B,)."""
    return token_nll(model(window[:, :-1]), window[:, 1:]).mean(dim=1)
