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


def _command_flags(command) -> dict[str, str]:
    """parameter name -> its long flag, for one command; a switch's off flag under ``no_`` + its name
    (``no_kv_cache`` -> ``--no-kv-cache``)."""
    flags: dict[str, str] = {}
    for param in command.params:
        for key, opts in ((param.name, param.opts), (f"no_{param.name}", getattr(param, "secondary_opts", ()))):
            longs = [opt for opt in opts if opt.startswith("--")]
            if longs:
                flags[key] = longs[0]
    return flags


def _root():
    from unmask.cli.app import app

    return typer.main.get_command(app)


@functools.cache
def _flags() -> dict[str, str]:
    """parameter name -> its long flag, over every ``unmask`` command (the first command that takes
    a name spells it; the commands agree)."""
    flags: dict[str, str] = {}

    def walk(command) -> None:
        for name, flag in _command_flags(command).items():
            flags.setdefault(name, flag)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(_root())
    return flags


def invoked_flags(argv: list[str]) -> dict[str, str]:
    """The flags of the command ``argv`` runs (``["train", "--lr", "1"]``: train's); {} when none is found."""
    command = _root()
    for word in argv:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        command = sub
    return {} if getattr(command, "commands", None) else _command_flags(command)


def flag_of(name: str, own: dict[str, str] | None = None) -> str:
    """The command-line spelling of a parameter: the flag of the option that sets it in the command
    being run (``own``, from :func:`invoked_flags`), else the sampler option's flag, else the flag
    any command gives it, else the name itself (a table option without a flag keeps its name)."""
    key = ALIASES.get(name, name)
    if own and key in own:
        return own[key]
    if name in TABLE:
        return TABLE[name].flag or name
    return _flags().get(key, name)
