"""``unmask eval``: held-out perplexity of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app, echo_json


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Option(..., help="Run folder or checkpoints/step_* folder."),
    data: Optional[Path] = typer.Option(None, help="Prepared data folder; default: the one the run was trained on."),
    split: str = typer.Option("val", help="val or train."),
    windows: Optional[int] = typer.Option(None, help="Use only the first N context-length windows (default: all)."),
    draws: int = typer.Option(32, help="MDM: Monte Carlo draws of t per window (stratified)."),
    estimator: Optional[str] = typer.Option(None, help="MDM: t-dce or k-dce (default: the training loss)."),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of text."),
) -> None:
    """Validation perplexity: MDM ELBO bound with its Monte Carlo standard error, AR exact."""
    from unmask.evaluation import evaluate_checkpoint, format_likelihood

    res = evaluate_checkpoint(checkpoint, data, split, windows, draws, estimator, batch_size, seed, device, progress=not as_json)
    if as_json:
        echo_json(res)
    else:
        typer.echo(format_likelihood(res))
