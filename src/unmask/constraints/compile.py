"""Regex -> :class:`TokenAutomaton`, through outlines-core (its ``Index`` walks the regex's byte
DFA along every token's bytes), and the cache that compiles each (constraint, tokenizer) once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

from unmask.constraints.automaton import TokenAutomaton, from_transitions
from unmask.constraints.spec import Constraint
from unmask.constraints.vocabulary import token_bytes
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError

SENTINEL = "\uffff"
"""A character appended to every pattern, read by an extra token. outlines-core 0.2.14 drops the
edges of tokens that end one byte after a complete match (regex-automata reports matches one byte
late) and, under leftmost-first priority, the longer alternatives after a match (``a|ab`` loses
``ab``). Matching ``(?:pattern)`` followed by the sentinel moves the only complete match past the
sentinel, so no edge of an ordinary token is lost; a state accepts iff the sentinel leads from it
to a final state (w + sentinel matches iff w matches the pattern). Only texts holding U+FFFF, a
noncharacter, could still lose edges."""
CACHE_SIZE = 32  # automata kept, least recently used first out
_cache: OrderedDict[tuple, TokenAutomaton] = OrderedDict()
_bytes_cache: dict[str, list[bytes | None]] = {}
_lock = threading.Lock()


def compile_regex(
    pattern: str, pieces: Sequence[bytes | None], eos_id: int, mask_id: int | None = None, param: str = "regex"
) -> TokenAutomaton:
    """The automaton of the texts matching ``pattern`` in full, over tokens whose bytes are
    ``pieces`` (id -> bytes; None: a token no constrained position may hold, EOS excepted).

    ``mask_id``: the id of MASK in canvases (default: ``len(pieces)``). A pattern that does not
    compile, or that no token sequence can match, raises an :class:`OptionError` naming ``param``.
    """
    import outlines_core

    sentinel = len(pieces)
    table: dict[bytes, list[int]] = {SENTINEL.encode("utf-8"): [sentinel]}
    for i, piece in enumerate(pieces):
        if piece and i != eos_id:
            table.setdefault(bytes(piece), []).append(i)
    wrapped = "(?:%s)\\x{%X}" % (pattern, ord(SENTINEL))
    try:
        index = outlines_core.Index(wrapped, outlines_core.Vocabulary(eos_id, table))
    except (ValueError, TypeError) as exc:
        why = str(exc).replace(wrapped, pattern)
        raise OptionError(param, "{" + param + "} {_p!r} does not compile: {_why}", _p=pattern, _why=why) from None
    transitions, finals = index.get_transitions(), set(index.get_final_states())
    # a state accepts the pattern iff reading the sentinel from it reaches a final state of pattern + sentinel
    accepting = {s for s, row in transitions.items() if row.get(sentinel) in finals}
    automaton = from_transitions(
        transitions, index.get_initial_state(), accepting, eos_id, len(pieces) if mask_id is None else mask_id, len(pieces)
    )
    if automaton.min_length is None:
        raise OptionError(param, "{" + param + "} {_p!r} cannot be matched by any sequence of this tokenizer's tokens", _p=pattern)
    return automaton


def tokenizer_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """:func:`token_bytes` of ``tokenizer``, read once per tokenizer fingerprint."""
    with _lock:
        if tokenizer.fingerprint not in _bytes_cache:
            _bytes_cache[tokenizer.fingerprint] = token_bytes(tokenizer)
        return _bytes_cache[tokenizer.fingerprint]


def compile_constraint(constraint: Constraint, tokenizer: Tokenizer) -> TokenAutomaton:
    """The automaton of ``constraint`` over ``tokenizer``'s ids, compiled once per (kind, value,
    tokenizer fingerprint) and then taken from a cache of the :data:`CACHE_SIZE` latest. Errors are
    :class:`OptionError` naming the constraint's kind (``regex``, ``json_schema``, ``choice``, ...)."""
    key = (constraint.kind, constraint.value, tokenizer.fingerprint)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    automaton = compile_regex(
        constraint.to_regex(), tokenizer_bytes(tokenizer), tokenizer.eos_id, tokenizer.mask_id, param=constraint.kind
    )
    with _lock:
        _cache[key] = automaton
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return automaton
