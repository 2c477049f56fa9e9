"""``unmask sample``: text from a trained MDM or AR checkpoint, with every sampler."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app, echo_json


def _show_steps(tok, mask_text: str = "_"):
    """A callback that redraws row 0 of the canvas in place after every step."""

    def show(state) -> None:
        text = tok.decode(state.tokens[0].tolist(), mask_text=mask_text).replace("\n", " ")
        sys.stderr.write(f"\x1b[2K\rstep {state.step:4d} | {text[-150:]}")
        sys.stderr.flush()

    return show


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., help="Run folder or checkpoints/step_* folder."),
    prompt: str = typer.Option("", help="Text the samples start with."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt per line (a batch of different lengths)."),
    infill: Optional[str] = typer.Option(None, help="MDM: a template with [MASK] / [MASK:n] spans to fill, e.g. 'ROMEO. [MASK:12] love.'"),
    num_samples: int = typer.Option(2),
    length: int = typer.Option(64, help="Tokens to generate after the prompt."),
    sampler: Optional[str] = typer.Option(None, help="MDM: ancestral (default), cached, first-hitting, confidence or threshold."),
    steps: Optional[int] = typer.Option(None, help="MDM: sampling steps (ancestral/cached/confidence; split over blocks). Default: --length."),
    block_len: Optional[int] = typer.Option(None, help="MDM: decode semi-autoregressively in blocks of this many tokens (default: off)."),
    k: Optional[int] = typer.Option(None, help="MDM first-hitting: positions per network call (default 1: exact)."),
    score: Optional[str] = typer.Option(None, help="MDM confidence: low_confidence (default), margin, entropy or random."),
    allocation: Optional[str] = typer.Option(None, help="MDM confidence: tokens per step, even (default) or schedule."),
    tau: Optional[float] = typer.Option(None, help="MDM threshold: commit positions with top-1 probability >= tau, in (0, 1] (default 0.9)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="MDM: unsupervised classifier-free guidance scale w (needs a prompt; default 0: off)."),
    temperature: float = typer.Option(1.0),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1: off)."),
    precision: str = typer.Option("float64", help="Categorical sampling precision: float64 (exact) or float32 (ablation only; biased)."),
    stop_at_eos: bool = typer.Option(False, help="Variable length: trim each sample at its first EOS (blocks stop early)."),
    kv_cache: Optional[bool] = typer.Option(None, "--kv-cache/--no-kv-cache", help="AR: exact KV cache (default) or recompute the prefix."),
    show_steps: bool = typer.Option(False, help="Animate the unmasking of the first sample in the terminal."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    weights: str = typer.Option("auto", help="auto (the EMA of the weights when the run kept one, else the weights), ema or raw."),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, text and NFE as JSON."),
) -> None:
    """Generate text from a trained MDM or AR checkpoint."""
    from unmask.checkpoint import checkpoint_tokenizer
    from unmask.errors import UnmaskError
    from unmask.sampling.generate import generate

    prompts = None
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UnmaskError(f"--prompts-file {str(prompts_file)!r} does not exist")
        prompts = [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UnmaskError(f"--prompts-file {prompts_file} has no non-empty line")
        num_samples = len(prompts)
    callback = _show_steps(checkpoint_tokenizer(checkpoint)) if show_steps else None
    # MDM-only options go on only when given, so that generate() can refuse them on an AR checkpoint
    given = {"cfg_scale": cfg, "k": k, "score": score, "allocation": allocation, "tau": tau, "block_len": block_len}
    res = generate(
        checkpoint, prompt, num_samples, length, steps, temperature, precision, seed, device, sampler=sampler, prompts=prompts,
        infill=infill, stop_at_eos=stop_at_eos, kv_cache=kv_cache, callback=callback, top_k=top_k, top_p=top_p, weights=weights,
        **{name: value for name, value in given.items() if value is not None},
    )
    if show_steps:
        sys.stderr.write("\n")
    if as_json:
        echo_json(res)
        return
    for i, s in enumerate(res["samples"]):
        typer.echo(f"--- sample {i} ---\n{s['text']}")
    typer.echo(f"({res['sampler']}: {res['nfe']} network calls, {res['seconds']:.2f} s)", err=True)
