"""The sampler options of every command that samples (``unmask sample``, ``unmask eval genppl``,
``unmask eval harness``), derived from the option table :data:`unmask.sampling.options.OPTIONS`.

:func:`with_sampler_options` adds them to a Typer command, which receives them as one dict
``sampling`` of the options the user gave (an option left out is absent, so each sampler keeps its
own default: the threshold sampler decodes at temperature 0, the others at 1). Errors name an
option by its library name; :func:`unmask.cli.spelling.flag_of` is how the command line spells it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import typer

from unmask.errors import rule_bounds
from unmask.sampling.options import OPTIONS as TABLE
from unmask.sampling.options import Option

# --compile of every command that decodes (sample, eval genppl, eval harness, serve)
COMPILE_HELP = ("Run the network through torch.compile at a few bucketed batch sizes and canvas lengths (CUDA graphs on a GPU): "
                "the same tokens at temperature 0, faster steps; the first call of each shape is slow (compilation).")


def typer_option(option: Option) -> tuple[type, object]:
    """(annotation, typer.Option) of a table option; default None ("not given"). An integer's lower
    bound is declared to typer (a usage error); floats are checked by the sampler configs."""
    low = [bound for op, bound in rule_bounds(option.rule) if op == ">="] if option.type is int and option.rule else []
    bounds = {"min": int(low[0])} if low else {}
    return Optional[option.type], typer.Option(None, option.flag, help=option.help, **bounds)


# name: (annotation, typer.Option) of every table option that has a flag
OPTIONS: dict[str, tuple[type, object]] = {name: typer_option(option) for name, option in TABLE.items() if option.flag}


def with_sampler_options(command: Callable) -> Callable:
    """Add the sampler options to a Typer command that takes a ``sampling: dict`` parameter."""
    return with_options(command, OPTIONS, "sampling")


def with_options(command: Callable, options: dict[str, tuple[type, object]], into: str) -> Callable:
    """Add ``options`` (name: (annotation, typer.Option)) to a Typer command, which receives the ones
    given (not None) as one dict, its parameter ``into``."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != into]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind) for name, (kind, option) in options.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {name: kwargs.pop(name) for name in options}
        return command(**kwargs, **{into: {name: value for name, value in given.items() if value is not None}})

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])
    wrapper.__annotations__ = {
        **{name: kind for name, kind in command.__annotations__.items() if name != into},
        **{name: kind for name, (kind, _) in options.items()},
    }
    return wrapper
