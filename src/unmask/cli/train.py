"""``unmask train`` and ``unmask presets``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app
from unmask.config import PRESETS, ModelConfig, TrainConfig

_T = TrainConfig()


@app.command()
def presets() -> None:
    """List the model presets with their parameter counts (at the default 4096-token vocabulary)."""
    typer.echo(f"{'preset':8} {'layers':>6} {'heads':>5} {'width':>6} {'context':>7} {'non-emb params':>15} {'total params':>13}")
    for name, cfg in PRESETS.items():
        typer.echo(
            f"{name:8} {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.n_embd:>6} {cfg.context_len:>7} "
            f"{cfg.non_embedding_params() / 1e6:>14.2f}M {cfg.total_params() / 1e6:>12.2f}M"
        )


def _data_dir(data: Optional[Path]) -> Path:
    from unmask.data import default_dataset

    return Path(data) if data is not None else default_dataset()


@app.command()
def train(
    run_dir: Path = typer.Option(..., help="Folder for config, metrics.jsonl and checkpoints."),
    preset: str = typer.Option("tiny", help=f"Model size: {', '.join(PRESETS)}."),
    objective: str = typer.Option(_T.objective, help="mdm (masked diffusion) or ar (autoregressive baseline)."),
    data: Optional[Path] = typer.Option(None, help="Folder from `unmask data prepare`; default: the embedded Shakespeare corpus."),
    steps: int = typer.Option(_T.steps),
    batch_size: int = typer.Option(_T.batch_size, help="Sequences per micro-batch (per process)."),
    grad_accum: int = typer.Option(_T.grad_accum, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(_T.lr),
    warmup_steps: int = typer.Option(_T.warmup_steps),
    weight_decay: float = typer.Option(_T.weight_decay),
    loss: str = typer.Option(_T.loss, help="MDM objective: t-dce or k-dce."),
    schedule: str = typer.Option(_T.schedule, help="MDM masking schedule: linear or cosine."),
    precision: str = typer.Option(_T.precision, help="auto (bf16 autocast where supported), bf16 or fp32."),
    context_len: Optional[int] = typer.Option(None, help="Override the preset's context length."),
    time_conditioning: bool = typer.Option(False, help="Give the MDM network the time t (default: time-agnostic)."),
    seed: int = typer.Option(_T.seed),
    eval_every: int = typer.Option(_T.eval_every),
    checkpoint_every: int = typer.Option(_T.checkpoint_every),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    resume: bool = typer.Option(False, help="Continue RUN exactly from its latest checkpoint."),
) -> None:
    """Train an MDM or the AR baseline; the same command runs under torchrun."""
    from unmask.data import TokenDataset
    from unmask.train import train as run_training

    data_dir = _data_dir(data)
    vocab = TokenDataset(data_dir, "train").tokenizer.vocab_size
    overrides = {"vocab_size": vocab, "causal": objective == "ar", "time_conditioning": time_conditioning}
    if context_len is not None:
        overrides["context_len"] = context_len
    model_cfg = ModelConfig.from_name(preset, **overrides)
    train_cfg = TrainConfig(
        objective=objective, loss=loss, schedule=schedule, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, precision=precision, seed=seed, eval_every=eval_every,
        checkpoint_every=checkpoint_every,
    )
    typer.echo(
        f"{objective.upper()} {preset}: {model_cfg.non_embedding_params() / 1e6:.2f}M non-embedding params, "
        f"{model_cfg.total_params() / 1e6:.2f}M total", err=True,
    )
    result = run_training(run_dir, model_cfg, train_cfg, data_dir, resume=resume, device=device)
    typer.echo(f"done: {result.steps} steps, {result.tokens:,} tokens, last loss {result.final_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s -> {run_dir}", err=True)
