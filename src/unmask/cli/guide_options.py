"""The guide options of ``unmask sample`` (``--guide``, ``--reward``, ``--energy``, ``--particles``,
``--alpha``, ``--ess``, ``--window``), derived from the table :data:`unmask.steering.options.GUIDE_OPTIONS`
like the sampler options (:mod:`unmask.cli.sampler_options`). A command decorated with
:func:`with_guide_options` receives the ones given as one dict ``guiding``."""

from __future__ import annotations

from typing import Callable

from unmask.cli.sampler_options import typer_option, with_options
from unmask.steering.options import GUIDE_OPTIONS

OPTIONS = {name: typer_option(option) for name, option in GUIDE_OPTIONS.items()}


def with_guide_options(command: Callable) -> Callable:
    """Add the guide options to a Typer command that takes a ``guiding: dict`` parameter."""
    return with_options(command, OPTIONS, "guiding")
