"""A token automaton: a deterministic automaton over token ids, stored as flat edge tensors.

States are 0..S-1; an edge s --v--> s' reads token v, at most one edge per (state, token).

Tokens are grouped into classes: two tokens are in one class when they have the same edges (from
the same states to the same states). A class edge s --c--> s' stands for the edges of every token
of class c, so the dynamic programs run over E_c class edges instead of E token edges: for a JSON
Schema and the 4096-token default tokenizer, about 2,500 instead of 90,000 (the tokens that may
appear inside a string all behave alike). The token edges ``src``, ``token``, ``dst`` are
expanded from the classes when asked for; ``next_table`` (classes x states) answers "where does
this token lead from this state" with one lookup.

End of text: generated text ends at its first EOS; the pattern applies to the bytes before it and
every position after it must be EOS. The automaton says this with an absorbing END state (the last
state): every accepting state has an EOS edge to END, END has an EOS edge to itself, and END is
accepting. A region filled to its end without EOS is accepted when it ends in an accepting state.
Special tokens other than EOS have no edge: no constrained position may hold them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """``n_states`` S, ``initial`` state, ``accepting`` (S,) bool, ``eos_id``, ``mask_id`` (the
    id of MASK in canvases), ``n_tokens`` V (ids [0, V) may label edges); ``token_class`` (V,) long:
    the class of each token (the tokens without edges share a class that labels no edge);
    class edges ``class_src``, ``class_label``, ``class_dst`` (E_c,) long sorted by (src, class).

    Derived at construction: ``n_classes``; ``class_of``: ``token_class`` as a list;
    ``pair_src``/``pair_dst`` (P,) the distinct (src, dst) pairs (the automaton of a position that
    may hold any token); ``distance`` (S,) the fewest tokens from a state to an accepting state
    (-1: none).
    """

    n_states: int
    initial: int
    accepting: torch.Tensor
    eos_id: int
    mask_id: int
    n_tokens: int
    token_class: torch.Tensor
    class_src: torch.Tensor
    class_label: torch.Tensor
    class_dst: torch.Tensor
    n_classes: int = field(init=False)
    class_of: list[int] = field(init=False, repr=False)
    pair_src: torch.Tensor = field(init=False)
    pair_dst: torch.Tensor = field(init=False)
    distance: torch.Tensor = field(init=False)
    _copies: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        S = self.n_states
        C = 1 + max([0, *(int(x.max()) for x in (self.token_class, self.class_label) if x.numel())])
        key = self.class_src * C + self.class_label
        if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
            raise ValueError("TokenAutomaton class edges must be sorted by (src, class) with no (src, class) twice")
        set_ = object.__setattr__
        set_(self, "n_classes", C)
        set_(self, "class_of", self.token_class.tolist())
        pairs = torch.unique(self.class_src * S + self.class_dst)
        set_(self, "pair_src", pairs // S)
        set_(self, "pair_dst", pairs % S)
        set_(self, "distance", _distances(self.pair_src, self.pair_dst, self.accepting))

    @property
    def n_class_edges(self) -> int:
        return self.class_src.numel()

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
        return self.class_src.device

    @cached_property
    def _token_edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        members = torch.argsort(self.token_class, stable=True)  # tokens by class, ascending ids within one
        sizes = torch.bincount(self.token_class, minlength=self.n_classes)
        starts = sizes.cumsum(0) - sizes
        count = sizes[self.class_label]
        edge = torch.repeat_interleave(torch.arange(self.n_class_edges, device=self.device), count)
        within = torch.arange(edge.numel(), device=self.device) - (count.cumsum(0) - count)[edge]
        src, token, dst = self.class_src[edge], members[starts[self.class_label][edge] + within], self.class_dst[edge]
        order = torch.argsort(src * self.n_tokens + token)
        return src[order], token[order], dst[order]

    @property
    def src(self) -> torch.Tensor:
        """(E,) long: the source state of every token edge (sorted by (src, token); expanded once)."""
        return self._token_edges[0]

    @property
    def token(self) -> torch.Tensor:
        """(E,) long: the token of every token edge."""
        return self._token_edges[1]

    @property
    def dst(self) -> torch.Tensor:
        """(E,) long: the destination state of every token edge."""
        return self._token_edges[2]

    @cached_property
    def next_table(self) -> torch.Tensor:
        """(n_classes, S + 1) long: the state after a token of class c from state s, S where there
        is none; the extra column S (the dead state) leads to S. Built on first use."""
        S = self.n_states
        table = torch.full((self.n_classes, S + 1), S, dtype=torch.long, device=self.device)
        table[self.class_label, self.class_src] = self.class_dst
        return table

    @property
    def n_edges(self) -> int:
        return int(torch.bincount(self.token_class, minlength=self.n_classes)[self.class_label].sum())

    def on(self, device: torch.device | str) -> "TokenAutomaton":
        """This automaton with its tensors on ``device`` (made once per device, then reused)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device not in self._copies:
            self._copies[device] = TokenAutomaton(
                self.n_states, self.initial, self.accepting.to(device), self.eos_id, self.mask_id, self.n_tokens,
                self.token_class.to(device), self.class_src.to(device), self.class_label.to(device), self.class_dst.to(device),
            )
        return self._copies[device]

    def next_state(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The state after reading ``tokens`` (N,) from ``states`` (N,): (N,) long, -1 where there is
        no edge (dead); a dead state stays dead. One lookup in ``next_table`` per pair."""
        S = self.n_states
        ok = (tokens >= 0) & (tokens < self.n_tokens)
        classes = self.token_class[tokens.clamp(0, self.n_tokens - 1)]
        after = self.next_table[classes, torch.where(states >= 0, states, S)]
        return torch.where(ok & (after < S), after, -1)

    def allowed_next(self, states: torch.Tensor, remaining: torch.Tensor | int | None = None) -> torch.Tensor:
        """(N, n_tokens) bool: the tokens that lead from ``states`` (N,) to a live state, and, when
        ``remaining`` (N,) or int is given, to a state that can accept within ``remaining - 1`` more
        tokens (so that a text of at most ``remaining`` tokens from here can still match). A dead
        state (-1) allows nothing. O(N n_classes + N n_tokens)."""
        S = self.n_states
        states = states.to(self.device)
        after = self.next_table[:, torch.where(states >= 0, states, S)].T  # (N, n_classes)
        reach = torch.cat([self.distance, self.distance.new_full((1,), -1)])[after]
        ok = reach >= 0
        if remaining is not None:
            ok &= reach <= torch.as_tensor(remaining, device=self.device).reshape(-1, 1) - 1
        return ok[:, self.token_class]


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


def from_edges(src: np.ndarray, token: np.ndarray, dst: np.ndarray, n_states: int, initial: int, accepting: np.ndarray,
               eos_id: int, mask_id: int, n_tokens: int) -> TokenAutomaton:
    """The :class:`TokenAutomaton` of token edges (E,) (any order; at most one per (src, token)):
    tokens with the same edges are grouped into one class, numbered in order of their lowest id."""
    order = np.lexsort((src, token))  # by token, then src
    src, token, dst = src[order], token[order], dst[order]
    cuts = np.flatnonzero(np.diff(token)) + 1
    firsts = np.concatenate([[0], cuts]) if token.size else np.zeros(0, dtype=np.int64)
    lasts = np.concatenate([cuts, [token.size]]) if token.size else np.zeros(0, dtype=np.int64)
    pairs = np.stack([src, dst], axis=1).astype(np.int64)
    classes: dict[bytes, int] = {}
    token_class = np.full(n_tokens, -1, dtype=np.int64)
    keep = np.zeros(token.size, dtype=bool)  # the edges of each class's first token
    for lo, hi in zip(firsts.tolist(), lasts.tolist()):
        signature = pairs[lo:hi].tobytes()
        if signature not in classes:
            classes[signature] = len(classes)
            keep[lo:hi] = True
        token_class[token[lo]] = classes[signature]
    token_class[token_class < 0] = len(classes)  # tokens without edges: the last class
    label = token_class[token[keep]]
    ordered = np.lexsort((label, src[keep]))
    as_tensor = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.long)  # noqa: E731
    return TokenAutomaton(
        n_states, initial, torch.as_tensor(accepting, dtype=torch.bool), eos_id, mask_id, n_tokens, as_tensor(token_class),
        as_tensor(src[keep][ordered]), as_tensor(label[ordered]), as_tensor(dst[keep][ordered]),
    )


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
        for d in set(row.values()):
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
    accepting_mask = np.zeros(end + 1, dtype=bool)
    accepting_mask[accepting_states + [end]] = True
    edges = (np.asarray(x, dtype=np.int64) for x in (src, token, dst))
    return from_edges(*edges, end + 1, number[initial], accepting_mask, eos_id, mask_id, n_tokens)
