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
et al. 2025). Each set costs one pass over the edges of a position: the distinct (src, dst) pairs P
for a masked position, the edges of its token for a fixed one; so the two passes cost O(n P) and
the allowed tokens of all masked positions O(U E + n V), U the distinct (forward, backward) pairs
among them (a long run of masks repeats the same sets, so U is often far below n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.constraints.automaton import TokenAutomaton
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


def region_tokens(automaton: TokenAutomaton, row: torch.Tensor, start: int, end: int | None) -> tuple[int, list]:
    """(end, the tokens of row[start:end] as a list with None for MASK): one read of the row."""
    end = row.numel() if end is None else end
    if not 0 <= start <= end <= row.numel():
        raise ValueError(f"constrained region [{start}, {end}) is not inside a row of {row.numel()} positions")
    return end, [None if t == automaton.mask_id else t for t in row[start:end].tolist()]


def token_edges(automaton: TokenAutomaton, token: int) -> torch.Tensor:
    """The edge ids reading ``token`` (a slice of ``by_token``; empty for ids without edges)."""
    if not 0 <= token < automaton.n_tokens:
        return automaton.by_token[:0]
    lo, hi = automaton.token_offsets[token], automaton.token_offsets[token + 1]
    return automaton.by_token[lo:hi]


def _any(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) bool: out[i] = any(values[j] for j with index[j] == i)."""
    return torch.zeros(size, device=values.device).index_add_(0, index, values.float()) > 0


def step_forward(automaton: TokenAutomaton, states: torch.Tensor, token: int | None) -> torch.Tensor:
    """The states (S,) bool after reading one position from ``states``: any token when ``token`` is None."""
    a = automaton
    if token is None:
        return _any(a.pair_dst, states[a.pair_src], a.n_states)
    edges = token_edges(a, token)
    return _any(a.dst[edges], states[a.src[edges]], a.n_states)


def step_backward(automaton: TokenAutomaton, states: torch.Tensor, token: int | None) -> torch.Tensor:
    """The states (S,) bool from which one position (any token when ``token`` is None) leads into ``states``."""
    a = automaton
    if token is None:
        return _any(a.pair_src, states[a.pair_dst], a.n_states)
    edges = token_edges(a, token)
    out = torch.zeros_like(states)
    out[a.src[edges]] = states[a.dst[edges]]  # one edge per (state, token): no state written twice
    return out


def forward_sets(automaton: TokenAutomaton, tokens: list) -> torch.Tensor:
    """(n+1, S) bool: ``forward[k]`` for the region ``tokens`` (None: MASK)."""
    a = automaton
    states = torch.zeros(a.n_states, dtype=torch.bool, device=a.device)
    states[a.initial] = True
    out = [states]
    for token in tokens:
        out.append(step_forward(a, out[-1], token))
    return torch.stack(out)


def backward_sets(automaton: TokenAutomaton, tokens: list) -> torch.Tensor:
    """(n+1, S) bool: ``backward[k]`` for the region ``tokens`` (None: MASK)."""
    out = [automaton.accepting]
    for token in reversed(tokens):
        out.append(step_backward(automaton, out[-1], token))
    return torch.stack(out[::-1])


def reachable(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> Reach:
    """Forward and backward sets of the region [start, end) of ``row`` (L,); ``automaton`` is
    moved to the row's device."""
    a = automaton.on(row.device)
    _, tokens = region_tokens(a, row, start, end)
    return Reach(forward_sets(a, tokens), backward_sets(a, tokens), tokens, start)


def completable(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> bool:
    """Whether some filling of the masked positions of row[start:end] matches the automaton."""
    a = automaton.on(row.device)
    _, tokens = region_tokens(a, row, start, end)
    return bool(backward_sets(a, tokens)[0, a.initial])


def allowed_between(automaton: TokenAutomaton, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(M, n_tokens) bool: for each row m, the tokens of the edges s --v--> s' with ``before[m, s]``
    and ``after[m, s']`` ((M, S) bool each). Equal rows are evaluated once; the edges are tested
    for at most :data:`ALLOWED_CHUNK` (row, edge) pairs at a time."""
    a = automaton
    M = before.shape[0]
    if M == 0 or a.n_edges == 0:
        return torch.zeros(M, a.n_tokens, dtype=torch.bool, device=before.device)
    signature = torch.cat([before, after], dim=1).to(torch.uint8)
    distinct, inverse = torch.unique(signature, dim=0, return_inverse=True)
    before_u, after_u = distinct[:, : a.n_states].bool(), distinct[:, a.n_states :].bool()
    out = torch.zeros(distinct.shape[0], a.n_tokens, device=before.device)
    rows = max(1, ALLOWED_CHUNK // a.n_edges)
    for lo in range(0, distinct.shape[0], rows):
        ok = before_u[lo : lo + rows][:, a.src] & after_u[lo : lo + rows][:, a.dst]
        out[lo : lo + rows].index_add_(1, a.token, ok.float())
    return (out > 0)[inverse]


def allowed(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """(n_masked, n_tokens) bool: for each masked position of row[start:end] (in position order),
    the tokens it may take so that the row stays completable. All False when it is not completable."""
    reach = reachable(automaton, row, start, end)
    masked = torch.tensor(reach.masked, dtype=torch.long, device=row.device)
    return allowed_between(automaton.on(row.device), reach.forward[masked], reach.backward[masked + 1])


def shortest_completion(automaton: TokenAutomaton, row: torch.Tensor, start: int = 0, end: int | None = None) -> int | None:
    """The fewest positions m >= n = end - start such that the region, followed by m - n more masked
    positions, is completable: n itself when it already is; None when no m is (its fixed tokens
    contradict the pattern, whatever follows them)."""
    a = automaton.on(row.device)
    end, tokens = region_tokens(a, row, start, end)
    last = forward_sets(a, tokens)[-1]
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
        return OptionError(param, "the constraint cannot be met: the fixed text of the canvas contradicts it, "
                                  "whatever the {%s}" % param)
    return OptionError(param, "{%s}={_n} is too short for the constraint: it needs at least {_need} tokens" % param,
                       _n=end - start, _need=need)
