"""The one exception type users see: a clear, one-line message naming what is wrong (and its kind
for decoding parameters, whose names each caller spells its own way); and the one check of the
numbers users give."""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable


class UnmaskError(Exception):
    """Bad input or state. The message names the flag, file or value and what would be right.

    The CLI prints it as a single ``error: ...`` line and exits with status 2, without a traceback.
    """


class OptionError(UnmaskError):
    """A decoding parameter that is wrong (a sampler option, the length, the prompt, ...).

    ``param`` is the parameter at fault as the library names it (``temperature``). The message is a
    template whose ``{name}`` fields are parameter names, spelled by whoever reports the error:
    ``str(exc)`` writes the names themselves, the command line its flags (``--temperature``), the
    server its request fields; the other fields take ``values`` (which are never read as templates).
    """

    def __init__(self, param: str, template: str, **values) -> None:
        self.param, self.template, self.values = param, template, values
        super().__init__(self.spelled(str))

    def __reduce__(self):  # pickled whole (ranks send errors to each other): the values are keywords
        return functools.partial(type(self), **self.values), (self.param, self.template)

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with every parameter name ``name`` written as ``spell(name)``."""
        return self.template.format_map(_Spelling(spell, self.values))


class _Spelling(dict):
    """The fields of an :class:`OptionError` template: its values, and a spelling for the rest."""

    def __init__(self, spell: Callable[[str], str], values: dict) -> None:
        super().__init__(values)
        self.spell = spell

    def __missing__(self, name: str) -> str:
        return self.spell(name)


def not_one_of(name: str, value, known, note: str = "") -> OptionError:
    """The error for a parameter ``name`` whose ``value`` is none of the ``known`` ones (an iterable
    of str, or one str listing them), followed by ``note``."""
    listed = known if isinstance(known, str) else ", ".join(known)
    return OptionError(name, f"{{{name}}} {{_value!r}} is not one of: {{_known}}{{_note}}", _value=value, _known=listed, _note=note)


def check_number(name: str, value: float | None, rule: str, note: str = "") -> None:
    """Refuse ``value`` unless it is a finite number obeying ``rule``: ``"> 0"``, ``">= 2"`` (any bound)
    or an interval such as ``"(0, 1]"``. ``None`` ("not given") passes. The error is an
    :class:`OptionError` naming the parameter ``name`` (``top_p=nan must be a finite number in (0, 1]``,
    the command line writing ``--top-p``), followed by ``note``.

    NaN and the infinities never pass: a plain ``value <= 0`` test lets NaN through, and a NaN
    learning rate or temperature computes garbage without any error.
    """
    if value is None:
        return
    words = broken_rule(value, rule)
    if words is not None:
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise OptionError(name, f"{{{name}}}={{_value}} must be {kind} {{_words}}{{_note}}", _value=value, _words=words, _note=note)


def rule_bounds(rule: str) -> list[tuple[str, float]]:
    """A rule of :func:`check_number` as its bounds: ``"(0, 1]"`` -> [(">", 0.0), ("<=", 1.0)],
    ``">= 2"`` -> [(">=", 2.0)]."""
    if rule[0] in "([":
        low, high = (float(bound) for bound in rule[1:-1].split(","))
        return [(">" if rule[0] == "(" else ">=", low), ("<" if rule[-1] == ")" else "<=", high)]
    op, bound = rule.split()
    return [(op, float(bound))]


def broken_rule(value: float, rule: str) -> str | None:
    """None when ``value`` is a finite number obeying ``rule`` (see :func:`check_number`); else the
    rule in words (``"in (0, 1]"``, ``"> 0"``)."""
    inside = all(_COMPARE[op](value, bound) for op, bound in rule_bounds(rule))
    return None if math.isfinite(value) and inside else f"in {rule}" if rule[0] in "([" else rule


_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
