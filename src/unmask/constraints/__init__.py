"""Structured output: constrain generated text to a regex, a JSON Schema, a choice among strings or
any JSON object, for MDM decoding (positions filled in any order) and AR decoding alike.

A :class:`Constraint` names the language; :func:`compile_constraint` turns it, for a tokenizer,
into a :class:`TokenAutomaton` over token ids (through outlines-core, cached); the functions of
:mod:`~unmask.constraints.canvas` and :mod:`~unmask.constraints.commit` tell which tokens a canvas
row may still take and commit masked positions so that it stays completable;
:mod:`~unmask.constraints.rows` does the same over a batch whose rows have their own automata.
"""

from unmask.constraints.automaton import TokenAutomaton
from unmask.constraints.canvas import Reach, allowed, completable, reachable, refusal, shortest_completion
from unmask.constraints.commit import commit_greedy, commit_sampled
from unmask.constraints.compile import compile_constraint, compile_regex
from unmask.constraints.rows import allowed_rows, commit_rows, restrict_logits
from unmask.constraints.spec import JSON_OBJECT_DEPTH, KINDS, Constraint
from unmask.constraints.vocabulary import token_bytes

__all__ = [
    "JSON_OBJECT_DEPTH", "KINDS", "Constraint", "Reach", "TokenAutomaton", "allowed", "allowed_rows", "commit_greedy",
    "commit_rows", "commit_sampled", "compile_constraint", "compile_regex", "completable", "reachable", "refusal",
    "restrict_logits", "shortest_completion", "token_bytes",
]
