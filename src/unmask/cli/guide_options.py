"""The guide options of ``unmask sample`` (``--guide``, ``--reward``, ``--energy``, ``--particles``,
``--alpha``, ``--ess``, ``--window``), derived from the table :data:`unmask.steering.options.GUIDE_OPTIONS`
like the sampler options (:mod:`unmask.cli.sampler_options`). A command decorated with
:func:`with_guide_options` receives the ones given as one dict ``guiding``."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from unmask.cli.sampler_options import typer_option
from unmask.steering.options import GUIDE_OPTIONS

OPTIONS = {name: typer_option(option) for name, option in GUIDE_OPTIONS.items()}


def with_guide_options(command: Callable) -> Callable:
    """Add the guide options to a Typer command that takes a ``guiding: dict`` parameter."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "guiding"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind) for name, (kind, option) in OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        guiding = {name: kwargs.pop(name) for name in OPTIONS}
        return command(**kwargs, guiding={name: value for name, value in guiding.items() if value is not None})

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])
    wrapper.__annotations__ = {**{name: kind for name, kind in command.__annotations__.items() if name != "guiding"},
                               **{name: kind for name, (kind, _) in OPTIONS.items()}}
    return wrapper
