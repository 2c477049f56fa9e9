"""``unmask train`` and ``unmask presets``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app
from unmask.config import OBJECTIVE_DEFAULTS, PRESETS, ModelConfig, RunConfig, TrainConfig
from unmask.errors import UnmaskError

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


def _saved_run(run_dir: Path) -> RunConfig:
    """The RunConfig a run folder was last started or resumed with (config.json, else its checkpoint)."""
    from unmask.checkpoint import load_weights

    path = run_dir / "config.json"
    if not path.is_file():
        return load_weights(run_dir)[1]
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise UnmaskError(f"{path} is not valid JSON ({exc}); the run folder is damaged") from None


def _saved_data_dir(saved: RunConfig, run_dir: Path) -> Path:
    """The run's data folder; the embedded corpus is rebuilt where it was if its cache was removed."""
    from unmask.data import default_dataset, default_tokenizer

    path = Path(saved.data_dir)
    if (path / "meta.json").is_file():
        return path
    if path.name == f"shakespeare-{saved.tokenizer_fingerprint}" == f"shakespeare-{default_tokenizer().fingerprint}":
        return default_dataset(path.parent)
    raise UnmaskError(
        f"the data folder {path} that {run_dir} was trained on is missing; prepare the same data again and pass it with --data"
    )


@app.command()
def train(
    run_dir: Path = typer.Option(..., help="Folder for config, metrics.jsonl and checkpoints."),
    preset: Optional[str] = typer.Option(None, help=f"Model size: {', '.join(PRESETS)} (default tiny)."),
    objective: Optional[str] = typer.Option(None, help=f"mdm (masked diffusion), ar (autoregressive baseline) or bd3 (block diffusion) (default {_T.objective})."),
    block_size: Optional[int] = typer.Option(None, help="bd3: tokens per block L' (1: the AR NLL; the context length: the MDM); must divide the context."),
    mask_rate_min: Optional[float] = typer.Option(None, help="bd3: clipped schedule, lowest block time / mask rate beta (default 0)."),
    mask_rate_max: Optional[float] = typer.Option(None, help="bd3: clipped schedule, highest block time / mask rate omega (default 1)."),
    flex_attention: Optional[bool] = typer.Option(None, "--flex-attention", help="bd3: run the 2L training forward through FlexAttention (GPU; default: SDPA with a boolean mask)."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this run's/checkpoint's weights and model size (e.g. fine-tune an MDM into a block model)."),
    data: Optional[Path] = typer.Option(None, help="Folder from `unmask data prepare`; default: the embedded Shakespeare corpus (on --resume: the run's)."),
    steps: Optional[int] = typer.Option(
        None, help=f"Optimizer steps (default {_T.steps}). On --resume a new length: the LR continues from its current value "
        "along a cosine to its floor at the new end.",
    ),
    batch_size: Optional[int] = typer.Option(None, help=f"Sequences per micro-batch, per process (default {_T.batch_size})."),
    grad_accum: Optional[int] = typer.Option(None, help=f"Micro-batches per optimizer step (default {_T.grad_accum})."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default per objective: " + ", ".join(f"{o} {d['lr']:g}" for o, d in OBJECTIVE_DEFAULTS.items()) + ")."),
    warmup_steps: Optional[int] = typer.Option(None, help=f"Linear warmup steps (default {_T.warmup_steps})."),
    weight_decay: Optional[float] = typer.Option(None, help=f"AdamW weight decay (default {_T.weight_decay})."),
    loss: Optional[str] = typer.Option(None, help=f"MDM objective: t-dce or k-dce (default {OBJECTIVE_DEFAULTS['mdm']['loss']}; bd3: per block, default t-dce)."),
    schedule: Optional[str] = typer.Option(None, help=f"MDM masking schedule: linear or cosine (default {_T.schedule})."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 autocast where supported), bf16 or fp32 (default auto)."),
    context_len: Optional[int] = typer.Option(None, help="Override the preset's context length."),
    time_conditioning: Optional[bool] = typer.Option(None, help="Give the MDM network the time t (default: time-agnostic)."),
    seed: Optional[int] = typer.Option(None, help=f"Seed of the weights, data order and masking noise (default {_T.seed})."),
    eval_every: Optional[int] = typer.Option(None, help=f"Validate every N steps (default {_T.eval_every})."),
    checkpoint_every: Optional[int] = typer.Option(None, help=f"Checkpoint every N steps (default {_T.checkpoint_every})."),
    log_every: Optional[int] = typer.Option(None, help=f"Append a metrics line every N steps (default {_T.log_every})."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    resume: bool = typer.Option(
        False, help="Continue RUN exactly as it was configured, from its latest checkpoint. Only --steps, --eval-every, "
        "--checkpoint-every, --log-every and --device may change; other flags must be left out or equal the run's.",
    ),
) -> None:
    """Train an MDM or the AR baseline; the same command runs under torchrun."""
    from unmask.data import TokenDataset
    from unmask.train import changed_settings_error, train as run_training

    flags = {
        "objective": objective, "loss": loss, "schedule": schedule, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
        "lr": lr, "warmup_steps": warmup_steps, "weight_decay": weight_decay, "precision": precision, "seed": seed,
        "eval_every": eval_every, "checkpoint_every": checkpoint_every, "log_every": log_every,
        "block_size": block_size, "mask_rate_min": mask_rate_min, "mask_rate_max": mask_rate_max,
        "init_from": None if init_from is None else str(init_from), "flex_attention": flex_attention,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    if resume:
        # the saved run is the reference; train() refuses training flags that differ from it
        saved = _saved_run(run_dir)
        model_flags = (("--preset", saved.model.name, preset), ("--context-len", saved.model.context_len, context_len),
                       ("--time-conditioning", saved.model.time_conditioning, time_conditioning))
        refused = [f"{flag} (saved {before!r}, given {now!r})" for flag, before, now in model_flags if now is not None and now != before]
        if refused:
            raise changed_settings_error(refused)
        data_dir = Path(data) if data is not None else _saved_data_dir(saved, run_dir)
        model_cfg, train_cfg = saved.model, dataclasses.replace(saved.train, **given)
    else:
        data_dir = _data_dir(data)
        vocab = TokenDataset(data_dir, "train").tokenizer.vocab_size
        kind = given.get("objective", _T.objective)
        overrides = {"vocab_size": vocab, "causal": kind == "ar", "time_conditioning": bool(time_conditioning),
                     "block_causal": (block_size or 0) if kind == "bd3" else 0}
        if context_len is not None:
            overrides["context_len"] = context_len
        if init_from is not None:
            # the model's size comes from the checkpoint; only its attention pattern follows the objective
            if preset is not None or context_len is not None:
                raise UnmaskError("--preset and --context-len come from --init-from; leave them out")
            base = _saved_run(init_from)
            if base.model.vocab_size != vocab:
                raise UnmaskError(f"--init-from {init_from} has a {base.model.vocab_size}-token vocabulary, the data {data_dir} {vocab}")
            model_cfg = dataclasses.replace(base.model, causal=overrides["causal"], block_causal=overrides["block_causal"],
                                            time_conditioning=base.model.time_conditioning or bool(time_conditioning))
        else:
            model_cfg = ModelConfig.from_name(preset or "tiny", **overrides)
        train_cfg = TrainConfig(**given)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, one process reports
    if main_process:
        typer.echo(
            f"{train_cfg.objective.upper()} {model_cfg.name}: {model_cfg.non_embedding_params() / 1e6:.2f}M non-embedding params, "
            f"{model_cfg.total_params() / 1e6:.2f}M total", err=True,
        )
    result = run_training(run_dir, model_cfg, train_cfg, data_dir, resume=resume, device=device)
    if main_process:
        typer.echo(f"done: {result.steps} steps, {result.tokens:,} tokens, last loss {result.final_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s -> {run_dir}", err=True)
