"""Structured output: constrain generated text to a regex, a JSON Schema, a choice among strings or
any JSON object, for MDM decoding (positions filled in any order) and AR decoding alike.

A :class:`Constraint` names the language; :func:`compile_constraint` turns it, for a tokenizer,
into a :class:`TokenAutomaton` over token ids (through outlines-core, cached); the functions of
:mod:`~unmask.constraints.canvas` and :mod:`~unmask.constraints.commit` tell which tokens a canvas
row may still take and commit masked positions so that it stays completable;
:mod:`~unmask.constraints.decode` applies them to a batch being decoded, each row with its own
automaton or none.
"""

from unmask.constraints.automaton import TokenAutomaton
from unmask.constraints.canvas import Reach, allowed, completable, reachable, refusal, shortest_completion
from unmask.constraints.commit import commit_greedy, commit_sampled
from unmask.constraints.compile import compile_constraint, compile_regex
from unmask.constraints.spec import JSON_OBJECT_DEPTH, KINDS, Constraint
from unmask.constraints.vocabulary import token_bytes

__all__ = [
    "JSON_OBJECT_DEPTH", "KINDS", "Constraint", "Reach", "TokenAutomaton", "allowed", "commit_greedy",
    "commit_sampled", "compile_constraint", "compile_regex", "completable", "reachable", "refusal",
    "shortest_completion", "token_bytes",
]
