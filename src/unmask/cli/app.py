"""The Typer application objects that subcommand modules register on, and small shared helpers."""

from __future__ import annotations

import json

import typer


def command_group(help: str) -> typer.Typer:
    """A Typer app with the settings every ``unmask`` command group shares.

    Help text is plain text: with rich markup on, ``pip install 'unmask[hf]'`` would print as
    ``'unmask'`` (``[hf]`` read as a style tag), so rich markup is switched off.
    """
    return typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None, help=help)


app = command_group("Masked diffusion language models: train, evaluate, sample.")
data_app = command_group("Corpus preparation.")
app.add_typer(data_app, name="data")


def echo_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2))
