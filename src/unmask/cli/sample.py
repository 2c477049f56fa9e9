"""``unmask sample``: text from a trained MDM or AR checkpoint, with every sampler."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app, echo_json
from unmask.cli.guide_options import with_guide_options
from unmask.cli.sampler_options import COMPILE_HELP, with_sampler_options


def _show_steps(tok, mask_text: str = "_"):
    """A callback that redraws row 0 of the canvas in place after every step."""

    def show(state) -> None:
        text = tok.decode(state.tokens[0].tolist(), mask_text=mask_text).replace("\n", " ")
        sys.stderr.write(f"\x1b[2K\rstep {state.step:4d} | {text[-150:]}")
        sys.stderr.flush()

    return show


@app.command()
@with_sampler_options
@with_guide_options
def sample(
    checkpoint: Path = typer.Option(..., help="Run folder or checkpoints/step_* folder."),
    prompt: str = typer.Option("", help="Text the samples start with."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt per line (a batch of different lengths)."),
    infill: Optional[str] = typer.Option(None, help="MDM: a template with [MASK] / [MASK:n] spans to fill, e.g. 'ROMEO. [MASK:12] love.'"),
    num_samples: int = typer.Option(2, min=1),
    length: int = typer.Option(64, min=1, help="Tokens to generate after the prompt."),
    stop_at_eos: bool = typer.Option(False, help="Variable length: trim each sample at its first EOS (blocks stop early)."),
    kv_cache: Optional[bool] = typer.Option(None, "--kv-cache/--no-kv-cache", help="AR: exact KV cache (default) or recompute the prefix."),
    show_steps: bool = typer.Option(False, help="Animate the unmasking of the first sample in the terminal."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    weights: str = typer.Option("auto", help="auto (the EMA of the weights when the run kept one, else the weights), ema or raw."),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, text and NFE as JSON."),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    regex: Optional[str] = typer.Option(None, help="Structured output: the generated text matches this regex (up to its first EOS)."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Structured output: JSON that validates against the schema in this file."),
    choice: Optional[list[str]] = typer.Option(None, help="Structured output: exactly one of these strings (repeat the flag)."),
    json_object: bool = typer.Option(False, "--json-object", help="Structured output: any JSON object (nested two deep)."),
    classifier: Optional[Path] = typer.Option(None, help="Classifier guidance (D-CBG): a run trained with --objective classifier on the "
                                              "model's tokenizer; every MDM sampler's draws are tilted by p(--label | x)^--gamma."),
    label: Optional[str] = typer.Option(None, help="D-CBG: the class the samples are steered toward (one of the classifier's labels)."),
    gamma: Optional[float] = typer.Option(None, help="D-CBG: the classifier's weight gamma >= 0 (default 1: the posterior p(x | label))."),
    dcbg: str = typer.Option("auto", help="D-CBG form: exact (one classifier call on every position x token canvas), first-order (one "
                             "gradient per step) or auto (exact while positions x vocabulary <= 1024 canvases)."),
    sampling: dict = None,
    guiding: dict = None,
) -> None:
    """Generate text from a trained MDM or AR checkpoint (with --guide: reward- or energy-guided)."""
    from unmask.checkpoint import checkpoint_tokenizer
    from unmask.constraints import Constraint
    from unmask.errors import UnmaskError
    from unmask.generation import generate

    prompts = None
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UnmaskError(f"--prompts-file {str(prompts_file)!r} does not exist")
        prompts = [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UnmaskError(f"--prompts-file {prompts_file} has no non-empty line")
        num_samples = len(prompts)
    schema = None
    if json_schema is not None:
        if not json_schema.is_file():
            raise UnmaskError(f"--json-schema {str(json_schema)!r} does not exist; give a file holding a JSON Schema")
        schema = json_schema.read_text(encoding="utf-8")
    constraint = Constraint.one_of(regex, schema, choice, json_object)
    callback = _show_steps(checkpoint_tokenizer(checkpoint)) if show_steps else None
    # only the options given go on, so that generate() can refuse MDM-only ones on an AR checkpoint
    res = generate(
        checkpoint, prompt, num_samples, length, seed=seed, device=device, prompts=prompts, infill=infill, stop_at_eos=stop_at_eos,
        kv_cache=kv_cache, callback=callback, weights=weights, constraint=constraint, classifier=classifier, label=label, gamma=gamma,
        dcbg=dcbg, compile=compile, **guiding, **sampling,
    )
    if show_steps:
        sys.stderr.write("\n")
    if as_json:
        echo_json(res)
        return
    for i, s in enumerate(res["samples"]):
        typer.echo(f"--- sample {i} ---\n{s['text']}")
    typer.echo(f"({res['sampler']}: {res['nfe']} network calls, {res['seconds']:.2f} s)", err=True)
    if "guide" in res:
        typer.echo(f"({res['guide']}: {res['network_rows']} network rows, {res['score_calls']} score calls on "
                   f"{res['scored_sequences']} sequences, {res['score_seconds']:.2f} s in the score)", err=True)
    if "compiled" in res:
        stats = res["compiled"]
        typer.echo(f"(compiled: {stats['compiled']} compiled calls over {stats['shapes']} shapes, {stats['eager']} eager calls)", err=True)
    if "dcbg" in res:
        typer.echo(f"(D-CBG toward {res['dcbg']['label']!r}, gamma {res['dcbg']['gamma']:g}: {res['dcbg']['used']} guidance, "
                   f"{res['dcbg']['classifier_rows']} canvases scored)", err=True)
