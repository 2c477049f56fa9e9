"""The canvas functions over a batch: each row with its own automaton, or None (unconstrained).

Rows are independent (their automata, regions and lengths differ), so these loop over the rows
that have an automaton; the work of a row is that of :mod:`unmask.constraints.canvas` and
:mod:`unmask.constraints.commit`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from unmask.constraints.automaton import TokenAutomaton
from unmask.constraints.canvas import allowed
from unmask.constraints.commit import commit_greedy, commit_sampled
from unmask.sampling.base import categorical

Automata = Sequence[TokenAutomaton | None]


def _ends(tokens: torch.Tensor, ends: Sequence[int | None] | None) -> list[int]:
    return [tokens.shape[1] if ends is None or ends[b] is None else ends[b] for b in range(tokens.shape[0])]


def allowed_rows(tokens: torch.Tensor, automata: Automata, starts: Sequence[int],
                 ends: Sequence[int | None] | None = None) -> list[torch.Tensor | None]:
    """For each row b of ``tokens`` (B, L): :func:`~unmask.constraints.canvas.allowed` of its region
    [starts[b], ends[b]) ((n_masked_b, n_tokens) bool), or None for a row without an automaton."""
    ends_ = _ends(tokens, ends)
    return [None if a is None else allowed(a, tokens[b], starts[b], ends_[b]) for b, a in enumerate(automata)]


def restrict_logits(logits: torch.Tensor, tokens: torch.Tensor, automata: Automata, starts: Sequence[int],
                    ends: Sequence[int | None] | None = None) -> torch.Tensor:
    """``logits`` (B, L, W) with -inf at the tokens that masked positions of constrained regions may
    not take (W >= each automaton's n_tokens; ids from n_tokens on are ruled out there); other
    positions and rows without an automaton are left as they are. A new tensor."""
    out = logits.clone()
    ends_ = _ends(tokens, ends)
    for b, a in enumerate(automata):
        if a is None:
            continue
        masked = starts[b] + (tokens[b, starts[b]:ends_[b]] == a.mask_id).nonzero().squeeze(1)
        keep = torch.zeros(masked.numel(), logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[:, : a.n_tokens] = allowed(a, tokens[b], starts[b], ends_[b])
        out[b, masked] = out[b, masked].masked_fill(~keep, -torch.inf)
    return out


def commit_rows(tokens: torch.Tensor, positions: Sequence[torch.Tensor], log_probs: Sequence[torch.Tensor],
                automata: Automata, generator: torch.Generator, starts: Sequence[int],
                ends: Sequence[int | None] | None = None, greedy: bool = False) -> torch.Tensor:
    """``tokens`` (B, L) with, in each row b, ``positions[b]`` (n_b,) committed from ``log_probs[b]``
    (n_b, W): by :func:`~unmask.constraints.commit.commit_sampled` (or ``commit_greedy`` when
    ``greedy``) for a row with an automaton; by a float64 draw (or the argmax, lowest id on ties)
    for a row without. Rows are drawn in order from the one ``generator``. A new tensor."""
    out = tokens.clone()
    ends_ = _ends(tokens, ends)
    for b, a in enumerate(automata):
        if positions[b].numel() == 0:
            continue
        if a is None:
            drawn = log_probs[b].argmax(-1) if greedy else categorical(log_probs[b], generator)[0]
            out[b, positions[b]] = drawn
        elif greedy:
            out[b] = commit_greedy(a, out[b], positions[b], log_probs[b], starts[b], ends_[b])
        else:
            out[b] = commit_sampled(a, out[b], positions[b], log_probs[b], generator, starts[b], ends_[b])
    return out
