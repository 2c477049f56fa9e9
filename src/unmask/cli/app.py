"""The Typer application objects that subcommand modules register on, and small shared helpers."""

from __future__ import annotations

import json

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Masked diffusion language models: train, evaluate, sample.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Corpus preparation.")
app.add_typer(data_app, name="data")


def echo_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2))
