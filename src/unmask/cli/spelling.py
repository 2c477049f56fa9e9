"""How the command line spells a parameter that the library names in an
:class:`~unmask.errors.OptionError`: by the flag of the option that sets it.

The flags are read from the commands themselves (each Typer parameter is named after the setting it
holds), the sampler options from their table, and the few settings whose flag says what they do
better than the field name from :data:`ALIASES`. A name that no command takes (a model config field
read from a file, say) is written as it is.
"""

from __future__ import annotations

import functools

import typer

from unmask.sampling.options import OPTIONS as TABLE

# library name -> the command-line parameter that sets it, where the two differ
ALIASES = {"anneal_steps": "anneal_attention", "facts_per_direction": "facts", "grid_name": "grid", "data_dir": "data", "out_dir": "out"}


@functools.cache
def _flags() -> dict[str, str]:
    """parameter name -> its long flag, over every ``unmask`` command (the first command that takes
    a name spells it; the commands agree)."""
    from unmask.cli.app import app

    flags: dict[str, str] = {}

    def walk(command) -> None:
        for param in command.params:
            longs = [opt for opt in param.opts if opt.startswith("--")]
            if longs:
                flags.setdefault(param.name, longs[0])
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return flags


def flag_of(name: str) -> str:
    """The command-line spelling of a parameter: its option's flag, else the name itself (a table
    option without a flag keeps its name)."""
    if name in TABLE:
        return TABLE[name].flag or name
    return _flags().get(ALIASES.get(name, name), name)
