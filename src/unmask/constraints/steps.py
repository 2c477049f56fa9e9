"""A constrained region as the automaton reads it: a list of steps, each one MASK position (any
token) or a run of fixed tokens (one map from states to states, composed once), and the sets of
states before and after each step.

Sets are (S,) bool. Reading one MASK position goes over the distinct (src, dst) pairs of the
automaton; a run of fixed tokens is the composition of their rows of ``next_table``, one gather
per token, and then one scatter (forward) or gather (backward) for the whole run. Within a run of
MASK positions the sets stop changing once a step leaves them as they were (a fixed point of the
step), and the rest of the run costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.constraints.automaton import TokenAutomaton


@dataclass(frozen=True, eq=False)
class Step:
    """Positions [first, first + length) of the region; ``map`` (S+1,) long: for a run of fixed
    tokens, the state after the run from each state (S: none; the dead state S maps to S); None
    for one MASK position (length 1)."""

    first: int
    length: int
    map: torch.Tensor | None

    @property
    def masked(self) -> bool:
        return self.map is None


def region_tokens(automaton: TokenAutomaton, row: torch.Tensor, start: int, end: int | None) -> tuple[int, list]:
    """(end, the tokens of row[start:end] as a list with None for MASK): one read of the row."""
    end = row.numel() if end is None else end
    if not 0 <= start <= end <= row.numel():
        raise ValueError(f"constrained region [{start}, {end}) is not inside a row of {row.numel()} positions")
    return end, [None if t == automaton.mask_id else t for t in row[start:end].tolist()]


def token_map(automaton: TokenAutomaton, tokens: list[int]) -> torch.Tensor:
    """(S+1,) long: the state after reading ``tokens`` from each state (S: none)."""
    a, dead = automaton, automaton.n_states
    table = a.next_table
    state = None
    for token in tokens:
        row = table[a.class_of[token]] if 0 <= token < a.n_tokens else torch.full_like(table[0], dead)
        state = row if state is None else row[state]
    return state


def steps_of(automaton: TokenAutomaton, tokens: list, runs: bool = True) -> list[Step]:
    """The steps of a region (None: MASK): each MASK its own step; consecutive fixed tokens one step
    when ``runs``, else one step each."""
    steps, k = [], 0
    while k < len(tokens):
        if tokens[k] is None:
            steps.append(Step(k, 1, None))
            k += 1
            continue
        stop = k + 1
        while runs and stop < len(tokens) and tokens[stop] is not None:
            stop += 1
        steps.append(Step(k, stop - k, token_map(automaton, tokens[k:stop])))
        k = stop
    return steps


def _any(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) bool: out[i] = any(values[j] for j with index[j] == i)."""
    return torch.zeros(size, device=values.device).index_add_(0, index, values.float()) > 0


def step_forward(automaton: TokenAutomaton, states: torch.Tensor, step: Step) -> torch.Tensor:
    """The states after ``step`` from ``states``."""
    a = automaton
    if step.masked:
        return _any(a.pair_dst, states[a.pair_src], a.n_states)
    return _any(step.map[: a.n_states], states, a.n_states + 1)[: a.n_states]


def step_backward(automaton: TokenAutomaton, states: torch.Tensor, step: Step) -> torch.Tensor:
    """The states from which ``step`` leads into ``states``."""
    a = automaton
    if step.masked:
        return _any(a.pair_src, states[a.pair_dst], a.n_states)
    return torch.cat([states, states.new_zeros(1)])[step.map[: a.n_states]]


def forward_sets(automaton: TokenAutomaton, steps: list[Step]) -> torch.Tensor:
    """(len(steps) + 1, S) bool: the states reachable before each step, and after the last."""
    a = automaton
    states = torch.zeros(a.n_states, dtype=torch.bool, device=a.device)
    states[a.initial] = True
    out, steady = [states], False
    for step in steps:
        if step.masked and steady:
            out.append(out[-1])
            continue
        out.append(step_forward(a, out[-1], step))
        steady = step.masked and torch.equal(out[-1], out[-2])
    return torch.stack(out)


def backward_sets(automaton: TokenAutomaton, steps: list[Step]) -> torch.Tensor:
    """(len(steps) + 1, S) bool: the states from which the steps from each one on (none, for the
    last set: the accepting states) can be read to an accepting state."""
    out, steady = [automaton.accepting], False
    for step in reversed(steps):
        if step.masked and steady:
            out.append(out[-1])
            continue
        out.append(step_backward(automaton, out[-1], step))
        steady = step.masked and torch.equal(out[-1], out[-2])
    return torch.stack(out[::-1])
