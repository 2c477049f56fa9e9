"""Unsupervised classifier-free guidance (SMDM; docs/algorithms.md, 'Unsupervised classifier-free guidance').

The unconditional model is the SAME network with every prompt token replaced by MASK (the
prompt's length is known, its content is not). Guided logits
    l_u + (w + 1)(l_c - l_u) = (1 + w) l_c - w l_u,
used for sampling and for likelihood scoring. Conditional and unconditional inputs go through
one batched forward.
"""

from __future__ import annotations

import torch

from unmask.losses import denoiser_logits
from unmask.schedule import masked_fraction


def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """(1 + w) l_c - w l_u; w = 0 returns ``cond`` itself."""
    if scale == 0:
        return cond
    return (1 + scale) * cond - scale * uncond


def network_time(model, x: torch.Tensor, t: torch.Tensor | None, key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The time (B,) a network gets for input x (B, L): ``t`` when given (a sampler's chain time);
    for a time-conditioned network without one, the masked fraction of each row of x
    (:func:`unmask.schedule.masked_fraction`); None for a time-agnostic network without one."""
    if t is not None or not getattr(model.config, "time_conditioning", False):
        return t
    return masked_fraction(x, model.config.mask_id, key_mask)


def guided_logits(model, x: torch.Tensor, prompt_mask: torch.Tensor, scale: float, t: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Logits (B, L, V) of x (B, L) guided away from the prompt-free prediction.

    ``prompt_mask`` (B, L) bool marks the prompt (context) positions that the unconditional pass
    replaces by MASK. With ``scale == 0`` this is a single plain forward. ``kwargs`` (key_mask,
    positions: (B, L) tensors) go to the network, duplicated for the batched unconditional half.
    ``t`` (B,): the time of a time-conditioned network, shared by both halves; None: each input's
    own masked fraction (so the unconditional half, with the prompt masked, has a larger t).
    """
    key_mask = kwargs.get("key_mask")
    if scale == 0:
        return denoiser_logits(model, x, network_time(model, x, t, key_mask), **kwargs)
    uncond = torch.where(prompt_mask, torch.full_like(x, model.config.mask_id), x)
    doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
    both = torch.cat([x, uncond])
    time = network_time(model, both, None if t is None else torch.cat([t, t]), doubled.get("key_mask"))
    cond_logits, uncond_logits = denoiser_logits(model, both, time, **doubled).float().chunk(2)
    return combine(cond_logits, uncond_logits, scale)
