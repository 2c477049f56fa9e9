"""Which tokens a canvas row may still take under a :class:`TokenAutomaton`.

The constrained region of a row is positions [start, end) (the generated part, after any prompt);
its n = end - start positions are read left to right by the automaton. A position holding MASK is
undecided: it may take any token that has bytes, or EOS (the automaton's edges say which). The row
is *completable* when some filling of its masked positions drives the automaton from its initial
state to an accepting state at the end of the region.

Two sets of states per boundary k = 0..n (between position k-1 and position k of the region):

* ``forward[k]``: the states reachable after reading the first k positions;
* ``backward[k]``: the states from which positions k..n-1 can be read to an accepting state.

The row is completable iff ``backward[0][initial]``. A masked position k may take token v iff some
edge s --v--> s' has s in ``forward[k]`` and s' in ``backward[k + 1]`` (the DINGO condition, Suresh
et al. 2025). A set costs one pass over the distinct (src, dst) pairs P for a masked position and
O(S) for a fixed one (:mod:`unmask.constraints.steps`), so the two passes cost O(n P) and the
allowed tokens of all masked positions O(U E_c + n V), U the distinct (forward, backward)
pairs among them (a long run of masks repeats the same sets, so U is often far below n), E_c the
class edges (see :mod:`unmask.constraints.automaton`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.constraints.automaton import TokenAutomaton
from unmask.constraints.steps import backward_sets, forward_sets, region_tokens, steps_of
from unmask.errors import OptionError

ALLOWED_CHUNK = 1 << 24  # (positions x edges) booleans evaluated at once by `allowed`


@dataclass(frozen=True)
class Reach:
    """``forward``, ``backward`` (n+1, S) bool as in the module docstring; ``tokens``: the region's
    token ids (a list: MASK where undecided); ``start``: where the region begins in the row."""

    forward: torch.Tensor
    backward: torch.Tensor
    tokens: list[int]
    start: int

    @property
    def masked(self) -> list[int]:
        """Offsets k (in the region) of its masked positions, in order."""
        return [k for k, t in enumerate(self.tokens) if t is None]


def reachable(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> Reach:
    """Forward and backward sets of the region [start, end) of ``row`` (L,) at every boundary;
    ``automaton`` is moved to the row's device."""
    a = automaton.on(row.device)
    _, tokens = region_tokens(a, row, start, end)
    steps = steps_of(a, tokens, runs=False)
    return Reach(forward_sets(a, steps), backward_sets(a, steps), tokens, start)


def completable(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> bool:
    """Whether some filling of the masked positions of row[start:end] matches the automaton."""
    a = automaton.on(row.device)
    _, tokens = region_tokens(a, row, start, end)
    return bool(backward_sets(a, steps_of(a, tokens))[0, a.initial])


def allowed_between(automaton: TokenAutomaton, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(M, n_tokens) bool: for each row m, the tokens of the edges s --v--> s' with ``before[m, s]``
    and ``after[m, s']`` ((M, S) bool each). Equal rows are evaluated once, over the class edges,
    at most :data:`ALLOWED_CHUNK` (row, class edge) pairs at a time."""
    a = automaton
    M = before.shape[0]
    if M == 0 or a.n_class_edges == 0:
        return torch.zeros(M, a.n_tokens, dtype=torch.bool, device=before.device)
    signature = torch.cat([before, after], dim=1).to(torch.uint8)
    distinct, inverse = torch.unique(signature, dim=0, return_inverse=True)
    before_u, after_u = distinct[:, : a.n_states].bool(), distinct[:, a.n_states :].bool()
    classes = torch.zeros(distinct.shape[0], a.n_classes, device=before.device)
    rows = max(1, ALLOWED_CHUNK // a.n_class_edges)
    for lo in range(0, distinct.shape[0], rows):
        ok = before_u[lo : lo + rows][:, a.class_src] & after_u[lo : lo + rows][:, a.class_dst]
        classes[lo : lo + rows].index_add_(1, a.class_label, ok.float())
    return (classes > 0)[inverse][:, a.token_class]


def allowed(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """(n_masked, n_tokens) bool: for each masked position of row[start:end] (in position order),
    the tokens it may take so that the row stays completable. All False when it is not completable."""
    a = automaton.on(row.device)
    _, tokens = region_tokens(a, row, start, end)
    steps = steps_of(a, tokens)
    masked = torch.tensor([j for j, step in enumerate(steps) if step.masked], dtype=torch.long, device=row.device)
    return allowed_between(a, forward_sets(a, steps)[masked], backward_sets(a, steps)[masked + 1])


def shortest_completion(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> int | None:
    """The fewest positions m >= n = end - start such that the region, followed by m - n more masked
    positions, is completable: n itself when it already is; None when no m is (its fixed tokens
    contradict the pattern, whatever follows them)."""
    a = automaton.on(row.device)
    end, tokens = region_tokens(a, row, start, end)
    last = forward_sets(a, steps_of(a, tokens))[-1]
    distance = torch.where(last & a.live, a.distance, -1)
    if not bool((distance >= 0).any()):
        return None
    return len(tokens) + int(distance[distance >= 0].min())


def refusal(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None,
            param: str = "length") -> OptionError | None:
    """None when row[start:end] is completable; otherwise the error to raise, naming ``param`` (the
    length of the generated region): it needs at least N tokens, or no length works."""
    end = row.numel() if end is None else end
    need = shortest_completion(automaton, row, start, end)
    if need == end - start:
        return None
    if need is None:
        return OptionError(param, "the constraint cannot be met: the fixed text of the {%s} contradicts it, so no filling "
                                  "of the masked positions matches" % param)
    return OptionError(param, "{%s}={_n} is too short for the constraint: it needs at least {_need} tokens" % param,
                       _n=end - start, _need=need)
