"""Committing masked positions of a canvas row so that it stays completable under a
:class:`TokenAutomaton` (see :mod:`unmask.constraints.canvas` for the sets used here).

Both functions take the positions to commit and their log-probabilities (n, W), W >= the
automaton's ``n_tokens`` (ids from ``n_tokens`` on are never chosen), and return a new row. The
other masked positions of the region stay MASK; they count as free: any token that keeps the row
completable may go there later.

* :func:`commit_sampled` draws the positions one after another, in position order, each from its
  distribution restricted to the tokens that keep the row completable given the commits before it,
  renormalised. This is the rule of constrained autoregressive decoding, and it shares its bias:
  the result is not drawn from the model's distribution conditioned on the constraint (that would
  weigh each token by the probability of all its valid completions, Park et al. 2024, "Grammar-
  aligned decoding"); a token whose valid completions are unlikely keeps all of its own mass.
* :func:`commit_greedy` is exact: the assignment of the positions that maximises the sum of their
  log-probabilities among all assignments that keep the row completable, by a max-sum dynamic
  program over (position, state) with back-pointers (DINGO, Suresh et al. 2025).

Both cost one backward pass over the region (its sets do not change as positions to their left are
committed), then a forward pass: O(n P + c (E_c + V)), c the positions committed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from unmask.constraints.automaton import TokenAutomaton
from unmask.constraints.steps import Step, backward_sets, forward_sets, region_tokens, step_forward, steps_of
from unmask.errors import UnmaskError
from unmask.sampling.base import categorical

LOG_FLOOR = -1e300  # log-probability of a token the caller ruled out (-inf): chosen only when nothing else fits


def _prepare(automaton, row, positions, log_probs, start, end):
    """(automaton on the row's device, the region's steps, their backward sets, {step index: row of
    log_probs}), refusing positions that are not masked positions of the region, and rows that
    cannot be completed."""
    a = automaton.on(row.device)
    end, tokens = region_tokens(a, row, start, end)
    offsets = [int(p) - start for p in (positions.tolist() if torch.is_tensor(positions) else positions)]
    if log_probs.shape[0] != len(offsets) or log_probs.shape[-1] < a.n_tokens:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} must be ({len(offsets)}, >= {a.n_tokens})")
    if len(set(offsets)) != len(offsets):
        raise ValueError(f"positions {[k + start for k in offsets]} name a position twice")
    for k in offsets:
        if not 0 <= k < len(tokens) or tokens[k] is not None:
            raise ValueError(f"position {k + start} is not a masked position of the constrained region [{start}, {end})")
    steps = steps_of(a, tokens)
    backward = backward_sets(a, steps)
    if not bool(backward[0, a.initial]):
        raise UnmaskError("the constrained region of this canvas cannot be completed; check it with "
                          "unmask.constraints.refusal before decoding")
    at = {step.first: j for j, step in enumerate(steps)}
    return a, steps, backward, {at[k]: i for i, k in enumerate(offsets)}


def _restricted(log_probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log_probs (W,) with the tokens outside ``allowed`` (n_tokens,) at -inf; uniform over the
    allowed tokens when none of them has any probability."""
    keep = torch.zeros(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
    keep[: allowed.numel()] = allowed
    kept = log_probs.double().masked_fill(~keep, -torch.inf)
    uniform = torch.zeros_like(kept).masked_fill(~keep, -torch.inf)
    return torch.where((kept > -torch.inf).any(), kept, uniform)


def commit_sampled(automaton: TokenAutomaton, row: torch.Tensor, positions: Sequence[int] | torch.Tensor,
                   log_probs: torch.Tensor, generator: torch.Generator, start: int = 0, end: int | None = None) -> torch.Tensor:
    """``row`` (L,) with ``positions`` (n,) committed by draws from ``log_probs`` (n, W) (row j for
    positions[j]) restricted to the tokens that keep the row completable, renormalised; drawn in
    position order, float64 inverse CDF (:func:`unmask.sampling.base.categorical`). The drawn
    tokens stay on the device: it is read only for the row, the check that the row can be
    completed, and the fixed points of MASK runs."""
    a, steps, backward, commit_row = _prepare(automaton, row, positions, log_probs, start, end)
    out = row.clone()
    states = torch.zeros(a.n_states, dtype=torch.bool, device=row.device)
    states[a.initial] = True
    steady = False  # a fixed point of the MASK step, as in forward_sets
    for j in range(max(commit_row, default=-1) + 1):
        step = steps[j]
        if j not in commit_row:
            if not (steady and step.masked):
                before, states = states, step_forward(a, states, step)
                steady = step.masked and torch.equal(states, before)
            continue
        steady = False
        ok = states[a.class_src] & backward[j + 1][a.class_dst]
        classes = torch.zeros(a.n_classes, device=row.device).index_add_(0, a.class_label, ok.float()) > 0
        token, _ = categorical(_restricted(log_probs[commit_row[j]], classes[a.token_class]), generator)
        out[start + step.first] = token
        taken = ok & (a.class_label == a.token_class[token])
        states = torch.zeros(a.n_states, device=row.device).index_add_(0, a.class_dst, taken.float()) > 0
    return out


def _relax(score, src, dst, gain, key, target, n_states):
    """One max-sum step over edges (src, dst) with ``gain``: (new score (S,), chosen key (S,)); a
    state not in ``target`` (S,) bool, or reached by no scored edge, gets -inf. Among the edges of
    best score into a state, the lowest ``key`` wins."""
    cand = score[src] + gain
    cand = torch.where(target[dst] & (score[src] > -torch.inf), cand, -torch.inf)
    best = torch.full((n_states,), -torch.inf, dtype=score.dtype, device=score.device).scatter_reduce(0, dst, cand, "amax")
    top = torch.iinfo(torch.long).max
    tied = torch.where((cand == best[dst]) & (cand > -torch.inf), key, top)
    chosen = torch.full((n_states,), top, dtype=torch.long, device=score.device).scatter_reduce(0, dst, tied, "amin")
    return best, chosen


def _class_best(a: TokenAutomaton, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain (E_c,), token (E_c,)): for each class edge, the greatest log-probability among the
    tokens of its class (-inf as :data:`LOG_FLOOR`) and the lowest id that has it."""
    lp = log_probs[: a.n_tokens].double().nan_to_num(neginf=LOG_FLOOR)
    best = torch.full((a.n_classes,), -torch.inf, dtype=lp.dtype, device=lp.device).scatter_reduce(0, a.token_class, lp, "amax")
    ids = torch.arange(a.n_tokens, device=lp.device)
    top = torch.iinfo(torch.long).max
    lowest = torch.full((a.n_classes,), top, device=lp.device).scatter_reduce(
        0, a.token_class, torch.where(lp == best[a.token_class], ids, top), "amin")
    return best[a.class_label], lowest[a.class_label]


def commit_greedy(automaton: TokenAutomaton, row: torch.Tensor, positions: Sequence[int] | torch.Tensor,
                  log_probs: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """``row`` (L,) with ``positions`` (n,) set to the assignment of greatest total log-probability
    (``log_probs`` (n, W), row j for positions[j]) among those that keep the row completable; the
    other masked positions are free. Ties go to the lowest token id at each (position, state), then
    to the lowest previous state. -inf log-probabilities count as :data:`LOG_FLOOR`."""
    a, steps, backward, commit_row = _prepare(automaton, row, positions, log_probs, start, end)
    out = row.clone()
    if not commit_row:
        return out
    S, first, last = a.n_states, min(commit_row), max(commit_row)
    # before the first commit every path scores 0: the states reached there, all tied
    score = torch.zeros(S, dtype=torch.float64, device=row.device).masked_fill(~forward_sets(a, steps[:first])[-1], -torch.inf)
    pointers = {}  # per step from the first commit: (previous state (S,), token (S,) or None)
    # a MASK step that left the scores as they were, into the same target set, repeats itself
    same_target = [False, *(backward[2:] == backward[1:-1]).all(dim=1).tolist()]
    steady = False
    for j in range(first, last + 1):
        step = steps[j]
        if j in commit_row:
            gain, best_token = _class_best(a, log_probs[commit_row[j]])
            score, chosen = _relax(score, a.class_src, a.class_dst, gain, best_token * S + a.class_src, backward[j + 1], S)
            pointers[j] = (chosen % S, chosen // S)
            steady = False
        elif steady and step.masked and same_target[j]:
            pointers[j] = pointers[j - 1]
        else:
            src, dst = _step_edges(a, step)
            zero = torch.zeros((), dtype=score.dtype, device=row.device)
            before, (score, chosen) = score, _relax(score, src, dst, zero, src, backward[j + 1], S)
            pointers[j] = (chosen, None)
            steady = step.masked and torch.equal(score, before)
    # the last commit's states all complete the row (backward sets); take the best, lowest on ties
    state = torch.argmax(score)  # the first maximum
    for j in range(last, first - 1, -1):
        previous, chosen_token = pointers[j]
        if chosen_token is not None:
            out[start + steps[j].first] = chosen_token[state]
        state = previous[state]
    return out


def _step_edges(a: TokenAutomaton, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) of the moves of a step that commits nothing: the (src, dst) pairs for a MASK, the
    state map for a run of fixed tokens (without the states it leaves dead)."""
    if step.masked:
        return a.pair_src, a.pair_dst
    src = torch.arange(a.n_states, device=step.map.device)
    dst = step.map[: a.n_states]
    alive = dst < a.n_states
    return src[alive], dst[alive]
