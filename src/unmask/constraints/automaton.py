"""A token automaton: a deterministic automaton over token ids, stored as flat edge tensors.

States are 0..S-1; edge e reads token ``token[e]`` from state ``src[e]`` to state ``dst[e]``, at
most one edge per (state, token). Edges are sorted by (src, token), so the edges of a state are a
contiguous slice (``offsets``) and the edge of a (state, token) pair is found by binary search.

End of text: generated text ends at its first EOS; the pattern applies to the bytes before it and
every position after it must be EOS. The automaton says this with an absorbing END state (the last
state): every accepting state has an EOS edge to END, END has an EOS edge to itself, and END is
accepting. A region filled to its end without EOS is accepted when it ends in an accepting state.
Special tokens other than EOS have no edge: no constrained position may hold them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """Edges ``src``, ``token``, ``dst`` (E,) long sorted by (src, token); ``accepting`` (S,) bool;
    ``initial`` state; ``eos_id``, ``mask_id``; ``n_tokens``: ids [0, n_tokens) may label edges.

    Derived at construction: ``offsets`` (S+1,) the edge slice of each state; ``key`` (E,) the sorted
    ``src * n_tokens + token``; ``pair_src``/``pair_dst`` (P,) the distinct (src, dst) pairs (the
    automaton of a position that may hold any token); ``distance`` (S,) the fewest tokens from a
    state to an accepting state (-1: none; ``live`` = distance >= 0); ``by_token`` (E,) the edge ids
    sorted by token and ``token_offsets`` (a list of n_tokens + 1 ints) the slice of each token.
    """

    src: torch.Tensor
    token: torch.Tensor
    dst: torch.Tensor
    n_states: int
    initial: int
    accepting: torch.Tensor
    eos_id: int
    mask_id: int
    n_tokens: int
    offsets: torch.Tensor = field(init=False)
    key: torch.Tensor = field(init=False)
    pair_src: torch.Tensor = field(init=False)
    pair_dst: torch.Tensor = field(init=False)
    distance: torch.Tensor = field(init=False)
    by_token: torch.Tensor = field(init=False)
    token_offsets: list[int] = field(init=False)
    _copies: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n, S, V = self.src.numel(), self.n_states, self.n_tokens
        key = self.src * V + self.token
        if n > 1 and not bool((key[1:] > key[:-1]).all()):
            raise ValueError("TokenAutomaton edges must be sorted by (src, token) with no (src, token) twice")
        counts = torch.bincount(self.src, minlength=S)
        set_ = object.__setattr__
        set_(self, "key", key)
        set_(self, "offsets", torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        pairs = torch.unique(self.src * S + self.dst)
        set_(self, "pair_src", pairs // S)
        set_(self, "pair_dst", pairs % S)
        by_token = torch.argsort(self.token, stable=True)
        set_(self, "by_token", by_token)
        set_(self, "token_offsets", [0, *torch.bincount(self.token, minlength=V).cumsum(0).tolist()])
        set_(self, "distance", _distances(self.pair_src, self.pair_dst, self.accepting))

    @property
    def n_edges(self) -> int:
        return self.src.numel()

    @property
    def end_state(self) -> int:
        """The absorbing state after EOS (the last state)."""
        return self.n_states - 1

    @property
    def live(self) -> torch.Tensor:
        """(S,) bool: states from which some token sequence reaches an accepting state."""
        return self.distance >= 0

    @property
    def min_length(self) -> int | None:
        """The fewest tokens of an accepted text (None: the automaton accepts nothing)."""
        d = int(self.distance[self.initial])
        return d if d >= 0 else None

    @property
    def device(self) -> torch.device:
        return self.src.device

    def on(self, device: torch.device | str) -> "TokenAutomaton":
        """This automaton with its tensors on ``device`` (made once per device, then reused)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device not in self._copies:
            self._copies[device] = TokenAutomaton(
                self.src.to(device), self.token.to(device), self.dst.to(device), self.n_states, self.initial,
                self.accepting.to(device), self.eos_id, self.mask_id, self.n_tokens,
            )
        return self._copies[device]

    def edge_of(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The edge id of each (state, token) pair (N,) (-1 where there is none or state is -1)."""
        ok = (states >= 0) & (tokens >= 0) & (tokens < self.n_tokens)
        if self.n_edges == 0:
            return torch.full_like(states, -1)
        wanted = states.clamp(min=0) * self.n_tokens + tokens.clamp(0, self.n_tokens - 1)
        at = torch.searchsorted(self.key, wanted).clamp(max=self.n_edges - 1)
        return torch.where(ok & (self.key[at] == wanted), at, -1)

    def next_state(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The state after reading ``tokens`` (N,) from ``states`` (N,): (N,) long, -1 where there is
        no edge (dead); a dead state stays dead. O(N log E), for decoding left to right."""
        edge = self.edge_of(states, tokens)
        return torch.where(edge >= 0, self.dst[edge.clamp(min=0)], -1)

    def allowed_next(self, states: torch.Tensor, remaining: torch.Tensor | int | None = None) -> torch.Tensor:
        """(N, n_tokens) bool: the tokens that lead from ``states`` (N,) to a live state, and, when
        ``remaining`` (N,) or int is given, to a state that can accept within ``remaining - 1`` more
        tokens (so that a text of at most ``remaining`` tokens from here can still match). A dead
        state (-1) allows nothing."""
        states = states.to(self.device)
        N = states.numel()
        alive = states >= 0
        safe = states.clamp(min=0)
        degree = torch.where(alive, self.offsets[safe + 1] - self.offsets[safe], 0)
        row = torch.repeat_interleave(torch.arange(N, device=self.device), degree)
        before = degree.cumsum(0) - degree
        edge = self.offsets[safe][row] + torch.arange(row.numel(), device=self.device) - before[row]
        reach = self.distance[self.dst[edge]]
        ok = reach >= 0
        if remaining is not None:
            limit = torch.as_tensor(remaining, device=self.device).expand(N)
            ok &= reach <= limit[row] - 1
        out = torch.zeros(N, self.n_tokens, dtype=torch.bool, device=self.device)
        out[row[ok], self.token[edge[ok]]] = True
        return out


def _distances(pair_src: torch.Tensor, pair_dst: torch.Tensor, accepting: torch.Tensor) -> torch.Tensor:
    """(S,) long: the fewest edges from each state to an accepting state (-1: unreachable); breadth-
    first from the accepting states, backwards over the (src, dst) pairs, one layer per pass."""
    distance = torch.where(accepting, 0, -1)
    frontier, layer = accepting.clone(), 0
    while bool(frontier.any()):
        layer += 1
        hit = torch.zeros(accepting.numel(), device=accepting.device).index_add_(0, pair_src, frontier[pair_dst].float()) > 0
        frontier = hit & (distance < 0)
        distance = torch.where(frontier, layer, distance)
    return distance


def _useful(transitions: dict[int, dict[int, int]], initial: int, accepting: set[int]) -> set[int]:
    """The states on some path from ``initial`` to an accepting state (``initial`` always kept)."""
    seen, todo = {initial}, [initial]
    while todo:
        for d in transitions.get(todo.pop(), {}).values():
            if d not in seen:
                seen.add(d)
                todo.append(d)
    into: dict[int, set[int]] = {}
    for s, row in transitions.items():
        for d in row.values():
            into.setdefault(d, set()).add(s)
    live, todo = set(accepting) & seen, list(set(accepting) & seen)
    while todo:
        for s in into.get(todo.pop(), ()):
            if s in seen and s not in live:
                live.add(s)
                todo.append(s)
    return live | {initial}


def from_transitions(
    transitions: dict[int, dict[int, int]], initial: int, accepting: set[int], eos_id: int, mask_id: int, n_tokens: int
) -> TokenAutomaton:
    """The :class:`TokenAutomaton` of a transition table {state: {token: next state}} with any state
    ids (outlines-core's) and its ``accepting`` states: edges reading EOS or ids outside
    [0, n_tokens) dropped, the EOS rule added (accepting --EOS--> END, END --EOS--> END), and only
    the states on some path from ``initial`` to an accepting state kept, renumbered 0.."""
    table = {s: {t: d for t, d in row.items() if 0 <= t < n_tokens and t != eos_id} for s, row in transitions.items()}
    keep = _useful(table, initial, accepting)
    number = {name: i for i, name in enumerate(sorted(keep))}
    end = len(number)
    src, token, dst = [], [], []
    for s, row in table.items():
        if s in keep:
            for t, d in row.items():
                if d in keep:
                    src.append(number[s])
                    token.append(t)
                    dst.append(number[d])
    accepting_states = sorted(number[f] for f in accepting if f in keep)
    src += [*accepting_states, end]
    token += [eos_id] * (len(accepting_states) + 1)
    dst += [end] * (len(accepting_states) + 1)
    src_t, token_t, dst_t = (torch.tensor(x, dtype=torch.long) for x in (src, token, dst))
    order = torch.argsort(src_t * n_tokens + token_t)
    accepting_mask = torch.zeros(end + 1, dtype=torch.bool)
    accepting_mask[accepting_states + [end]] = True
    return TokenAutomaton(src_t[order], token_t[order], dst_t[order], end + 1, number[initial], accepting_mask, eos_id, mask_id, n_tokens)
