"""``unmask sample``: text from a trained MDM or AR checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from unmask.cli.app import app, echo_json


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., help="Run folder or checkpoints/step_* folder."),
    prompt: str = typer.Option("", help="Text the samples start with."),
    num_samples: int = typer.Option(2),
    length: int = typer.Option(64, help="Tokens to generate after the prompt."),
    steps: int = typer.Option(64, help="MDM: sampling steps (network calls)."),
    temperature: float = typer.Option(1.0),
    precision: str = typer.Option("float64", help="Categorical sampling precision: float64 (exact) or float32 (ablation only; biased)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, text and NFE as JSON."),
) -> None:
    """Generate text from a trained MDM or AR checkpoint."""
    from unmask.sampling.generate import generate

    res = generate(checkpoint, prompt, num_samples, length, steps, temperature, precision, seed, device)
    if as_json:
        echo_json(res)
        return
    for i, s in enumerate(res["samples"]):
        typer.echo(f"--- sample {i} ---\n{s['text']}")
    typer.echo(f"({res['nfe']} network calls, {res['seconds']:.2f} s)", err=True)
