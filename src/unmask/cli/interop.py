"""``unmask import`` and ``unmask export``: published checkpoint folders in, LLaMA-layout folders out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="Local folder with config.json, *.safetensors (sharded or not) and tokenizer.json."),
    out: Path = typer.Option(..., help="New run folder to write."),
    as_: Optional[str] = typer.Option(
        None, "--as", help="ar (causal) or mdm (bidirectional, MASK mapped); default what the checkpoint is: "
        "LLaMA/Qwen2/Mistral ar, LLaDA/Dream mdm.",
    ),
    dtype: Optional[str] = typer.Option(None, help="Cast the weights: float32, bfloat16 or float16 (default: keep the checkpoint's)."),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json to use instead of the folder's own."),
) -> None:
    """Convert a LLaMA/Qwen2/Mistral (HF), LLaDA or Dream checkpoint folder into a run folder (offline, tensor by tensor)."""
    from unmask.interop import import_checkpoint

    ckpt, run = import_checkpoint(path, out, as_=as_, dtype=dtype, tokenizer=tokenizer)
    cfg = run.model
    what = "AR (causal)" if cfg.causal else f"MDM (bidirectional, MASK id {cfg.mask_id}{', logits shifted' if cfg.shift_logits else ''})"
    window = f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""
    typer.echo(f"{path} -> {ckpt}: {what}, {cfg.total_params() / 1e6:,.1f}M params, vocab {cfg.vocab_size}, context {cfg.context_len}{window}", err=True)


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run folder (its latest checkpoint) or a checkpoints/step_* folder."),
    out: Path = typer.Option(..., help="New folder for config.json, model.safetensors, the tokenizer and generation files (an MDM also modeling_unmask.py)."),
    dtype: Optional[str] = typer.Option(None, help="Cast the weights: float32, bfloat16 or float16 (default: keep the run's)."),
) -> None:
    """Write a run as a LLaMA-layout folder for transformers: an AR run loads as LlamaForCausalLM (Mistral/Qwen2
    with a sliding window), an MDM as its own bidirectional model with trust_remote_code=True."""
    from unmask.interop import export_run

    export_run(run, out, dtype=dtype)
    typer.echo(f"{run} -> {out}", err=True)
