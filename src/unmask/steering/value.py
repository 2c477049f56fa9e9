"""The value of a partly decoded state: the score of its denoised estimate x̂0 (SVDD, Li et al. 2024;
the potentials of twisted SMC). docs/algorithms.md, 'Reward- and energy-guided decoding'.

x̂0 keeps the decoded tokens and puts, at every MASK of the rows, the argmax of the network's
prediction p_theta(x0^i | x_t): one network call over the rows, a full forward without the KV cache
(an approximate cache feeds only the current block and would leave later blocks without a
prediction, and the decoding's own cache is left exactly as it was). A state with no MASK left is
its own estimate and costs no call: at the end the value is the score itself, v = r.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from unmask.sampling.base import Conditioning, SamplerState, predict


def denoised(model, state: SamplerState, cond: Conditioning | None, cfg_scale: float,
             want: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, SamplerState]:
    """(x̂0 (R, w), logits (N, V) at the N ``want`` positions (default: every MASK), the state with
    the call counted). Rows with nothing wanted are left out of the forward."""
    want = state.tokens == state.mask_id if want is None else want
    logits, called, _ = predict(model, replace(state, cache=None), want, cond, cfg_scale)
    estimate = state.tokens.clone()
    estimate[want] = logits.argmax(dim=-1)
    counted = replace(state, nfe=state.nfe + int(bool(called.any())), row_nfe=state.row_nfe + called)
    return estimate, logits, counted


def value(steering, model, state: SamplerState, cond: Conditioning | None, cfg_scale: float,
          rows: torch.Tensor | None = None) -> tuple[torch.Tensor, SamplerState]:
    """v(x) (R,) float64 (on the tokens' device) = r(x̂0(x)) of every row of ``state``, and the state with the estimate's
    network call counted. ``rows`` (R,): the row of the steering each state row belongs to (default:
    the same row)."""
    estimate, _, counted = denoised(model, state, cond, cfg_scale) if bool((state.tokens == state.mask_id).any()) \
        else (state.tokens, None, state)
    values = steering.meter.reward(steering.score, steering.candidates(estimate, rows))
    return values.to(state.tokens.device), counted
