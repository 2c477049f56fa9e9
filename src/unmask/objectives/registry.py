"""The training objectives by name: ``OBJECTIVES["mdm"]``.

Importing this module imports :mod:`unmask.objectives`, whose modules register the built-in
objectives (mdm, ar, bd3, sft) with :func:`register`; another objective registers itself the same
way. Nothing here imports the rest of ``unmask``, so the configuration can look objectives up
(their names and default settings) without an import circle.
"""

from __future__ import annotations

from typing import Any

OBJECTIVES: dict[str, Any] = {}  # name -> a subclass of unmask.objectives.base.Objective


def register(objective: type) -> type:
    """Class decorator: make ``objective`` known by its ``name`` (``--objective NAME``)."""
    OBJECTIVES[objective.name] = objective
    return objective


def trained_from_text() -> list[str]:
    """The names ``TrainConfig.objective`` takes: every objective but those that fine-tune on pairs,
    which the ``sft`` section selects for the network of one of these."""
    return [name for name, objective in OBJECTIVES.items() if not objective.fine_tunes]
