"""The one exception type users see: a clear, one-line message naming what is wrong; and the one
check of the numbers users give."""

from __future__ import annotations

import math


class UnmaskError(Exception):
    """Bad input or state. The message names the flag, file or value and what would be right.

    The CLI prints it as a single ``error: ...`` line and exits with status 2, without a traceback.
    """


def check_number(name: str, value: float | None, rule: str, note: str = "") -> None:
    """Refuse ``value`` unless it is a finite number obeying ``rule``: ``"> 0"``, ``">= 2"`` (any bound)
    or an interval such as ``"(0, 1]"``. ``None`` ("not given") passes. The message names ``name``
    (the flag), e.g. ``--top-p=nan must be a finite number in (0, 1]``, followed by ``note``.

    NaN and the infinities never pass: a plain ``value <= 0`` test lets NaN through, and a NaN
    learning rate or temperature computes garbage without any error.
    """
    if value is None:
        return
    if rule[0] in "([":
        low, high = (float(bound) for bound in rule[1:-1].split(","))
        inside = (low < value if rule[0] == "(" else low <= value) and (value < high if rule[-1] == ")" else value <= high)
        rule = f"in {rule}"
    else:
        op, bound = rule.split()
        inside = value > float(bound) if op == ">" else value >= float(bound)
    if not (math.isfinite(value) and inside):
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise UnmaskError(f"{name}={value} must be {kind} {rule}{note}")
