"""A batch's constraint while it is decoded: what the samplers see of it (docs/sampling.md,
'Structured output').

A :class:`CanvasConstraint` rides in the sampler's :class:`~unmask.sampling.base.Conditioning`. Every
MDM sampler goes through two of its methods, so that policy, cache, guidance and blocks compose
with it unchanged:

* :meth:`CanvasConstraint.restrict`, on the logits of every network call: at a masked position of a
  constrained row, the tokens that would leave the canvas impossible to complete get -inf. Samplers
  choose *where* to commit (confidence, margin, entropy, thresholds, first-hitting times) from these
  constrained distributions.
* :meth:`CanvasConstraint.settle`, on the tokens a step commits: the positions a step commits
  together are committed again so that the canvas stays completable jointly (each is allowed alone,
  but two of them may not be together). At temperature 0 the exact constrained argmax of their
  product of probabilities (:func:`~unmask.constraints.commit.commit_greedy`); otherwise one after
  another in position order, each from its tempered, filtered distribution restricted to the tokens
  that keep the canvas completable (:func:`~unmask.constraints.commit.commit_sampled`).

Rows without an automaton are left exactly as the sampler made them. Block decoding hands a sampler
a window of the canvas's columns (and moves left-padded rows): :meth:`placed` and :meth:`window`
keep the full rows and their regions, so the dynamic programs always read the whole constrained
region, the columns right of the window included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.constraints.automaton import TokenAutomaton
from unmask.constraints.canvas import allowed, refusal
from unmask.constraints.commit import commit_greedy, commit_sampled
from unmask.constraints.compile import compile_constraint
from unmask.errors import OptionError
from unmask.sampling.base import Conditioning, token_log_probs


@dataclass(frozen=True)
class CanvasConstraint:
    """Per row b: ``automata[b]`` (None: unconstrained) over the columns [starts[b], ends[b]) of its
    full canvas. ``full`` (B, L): the full canvas rows when the sampler sees only their columns
    [offset, offset + width) (block decoding); None when it sees them whole."""

    automata: tuple[TokenAutomaton | None, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    full: torch.Tensor | None = None
    offset: int = 0

    @classmethod
    def for_canvas(cls, automata, length: int, start: int) -> "CanvasConstraint":
        """Rows of ``length`` columns whose generated region is the columns [start, length)."""
        automata = tuple(automata)
        return cls(automata, (start,) * len(automata), (length,) * len(automata))

    def rows(self, index: torch.Tensor) -> "CanvasConstraint":
        """The constraint of a subset of rows."""
        pick = index.tolist()
        return replace(self, automata=tuple(self.automata[i] for i in pick), starts=tuple(self.starts[i] for i in pick),
                       ends=tuple(self.ends[i] for i in pick), full=None if self.full is None else self.full[index])

    def placed(self, region: torch.Tensor) -> "CanvasConstraint":
        """The constraint of rows laid out anew, ``region`` (B, L) marking each row's generated columns."""
        cols = torch.arange(region.shape[1], device=region.device)
        starts = torch.where(region, cols, region.shape[1]).amin(dim=1).tolist()
        ends = (torch.where(region, cols, -1).amax(dim=1) + 1).tolist()
        return replace(self, starts=tuple(starts), ends=tuple(ends), full=None, offset=0)

    def window(self, full: torch.Tensor, offset: int) -> "CanvasConstraint":
        """The constraint of a sampler that sees the columns of ``full`` (B, L) from ``offset`` on."""
        return replace(self, full=full, offset=offset)

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """The full canvas rows of what a sampler holds (x (B, w): its window)."""
        if self.full is None:
            return x
        rows = self.full.clone()
        rows[:, self.offset : self.offset + x.shape[1]] = x
        return rows

    def restrict(self, x: torch.Tensor, want: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (N, V) at the N ``want`` (B, w) positions of x (row-major) with -inf at the tokens
        that would leave a constrained row's canvas impossible to complete."""
        rows, out, at = self._rows_of(x), logits.clone(), _order(want)
        for b, a in enumerate(self.automata):
            if a is None or not bool(want[b].any()):
                continue
            start, end = self.starts[b], self.ends[b]
            masked = start + (rows[b, start:end] == a.mask_id).nonzero().squeeze(1)
            wanted = want[b].nonzero().squeeze(1) + self.offset
            inside = (wanted >= start) & (wanted < end)
            slot = torch.searchsorted(masked, wanted[inside])
            keep = torch.zeros(slot.numel(), logits.shape[-1], dtype=torch.bool, device=logits.device)
            keep[:, : a.n_tokens] = allowed(a, rows[b], start, end)[slot]
            index = at[b][want[b]][inside]
            out[index] = out[index].masked_fill(~keep, -torch.inf)
        return out

    def settle(self, before: torch.Tensor, after: torch.Tensor, want: torch.Tensor, logits: torch.Tensor,
               generator: torch.Generator, config, mask_id: int) -> torch.Tensor:
        """``after`` (B, w), the tokens a step wrote over ``before``, with the positions it committed in
        constrained rows committed again jointly (module docstring), from ``logits`` (N, V) at the
        ``want`` positions (restricted by :meth:`restrict`) under the sampler's ``config``."""
        committed = (before == mask_id) & (after != before)
        if not bool(committed.any()):
            return after
        rows, out, at = self._rows_of(before), after.clone(), _order(want)
        greedy = config.temperature == 0
        for b, a in enumerate(self.automata):
            if a is None or not bool(committed[b].any()):
                continue
            cols = committed[b].nonzero().squeeze(1)
            rows_logits = logits[at[b, cols]]
            log_probs = rows_logits.double().log_softmax(dim=-1) if greedy else token_log_probs(rows_logits, config)
            positions = cols + self.offset
            if greedy:
                row = commit_greedy(a, rows[b], positions, log_probs, self.starts[b], self.ends[b])
            else:
                row = commit_sampled(a, rows[b], positions, log_probs, generator, self.starts[b], self.ends[b])
            out[b, cols] = row[positions]
        return out

    # AR decoding: each constrained row's automaton state after the tokens generated so far

    def initial_states(self, device) -> torch.Tensor:
        """(B,) long: every row's initial state (0 for a row without an automaton, never read)."""
        return torch.tensor([0 if a is None else a.initial for a in self.automata], dtype=torch.long, device=device)

    def restrict_next(self, logits: torch.Tensor, states: torch.Tensor, remaining: int) -> torch.Tensor:
        """``logits`` (B, V) of the next token with -inf at the tokens after which a constrained row
        could not match within ``remaining`` tokens in all."""
        out = logits.clone()
        for b, a in enumerate(self.automata):
            if a is not None:
                keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                keep[: a.n_tokens] = a.allowed_next(states[b : b + 1], remaining)[0]
                out[b] = out[b].masked_fill(~keep, -torch.inf)
        return out

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The states after each constrained row reads its token of ``tokens`` (B,)."""
        out = states.clone()
        for b, a in enumerate(self.automata):
            if a is not None:
                out[b] = a.next_state(states[b : b + 1], tokens[b : b + 1])[0]
        return out


def _order(want: torch.Tensor) -> torch.Tensor:
    """(B, w) long: the row of the logits (N, V) of each wanted position, row-major; -1 elsewhere."""
    at = torch.full(want.shape, -1, dtype=torch.long, device=want.device)
    at[want] = torch.arange(int(want.sum()), device=want.device)
    return at


def automata_for(constraint, tokenizer, rows: int) -> tuple[TokenAutomaton | None, ...] | None:
    """The automata of ``rows`` rows from ``constraint``: one :class:`~unmask.constraints.spec.Constraint`
    for every row, a sequence of them (None: that row unconstrained), or None (no constraint)."""
    if constraint is None:
        return None
    each = [constraint] * rows if not isinstance(constraint, (list, tuple)) else list(constraint)
    if len(each) != rows:
        raise OptionError("constraint", "{constraint}: {_n} constraints for {_rows} rows", _n=len(each), _rows=rows)
    return tuple(None if c is None else compile_constraint(c, tokenizer) for c in each)


def constrain(cond, x: torch.Tensor, start: int, automata, new_tokens: int | None = None, param: str = "length"):
    """``cond`` (a :class:`~unmask.sampling.base.Conditioning`, None: none) with the constraint of
    the rows of canvas x (B, L): row b's generated region, columns [start, L), under ``automata[b]``
    (None: unconstrained). An AR model (``new_tokens`` given) generates that many tokens after x.
    Refused before any decoding, naming ``param``, when a row's region cannot be completed: with the
    shortest length that would do, or saying that no length would (fixed text that contradicts it)."""
    automata = tuple(None if a is None else a.on(x.device) for a in automata)
    for b, a in enumerate(automata):
        if a is None:
            continue
        row = x[b] if new_tokens is None else torch.full((new_tokens,), a.mask_id, dtype=x.dtype, device=x.device)
        error = refusal(a, row, start if new_tokens is None else 0, None, param)
        if error is not None:
            raise error
    length = x.shape[1] if new_tokens is None else new_tokens
    return replace(cond or Conditioning(), constraint=CanvasConstraint.for_canvas(automata, length, start))
