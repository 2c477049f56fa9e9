"""``unmask finetune``: supervised fine-tuning of an MDM or the AR baseline on prompt/response pairs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import List, Optional

import typer

from unmask.cli.app import app
from unmask.cli.train import log_to_option
from unmask.errors import UnmaskError

DEFAULT_LR, DEFAULT_STEPS = 1e-4, 500


def finetune_configs(init_from: Path, **given):
    """(model config, train config) of fine-tuning the run ``init_from`` on pairs: the source's
    network and objective (AR stays AR, an MDM stays an MDM) with the ``given`` training settings."""
    from unmask.adaptation import source_config
    from unmask.config import TrainConfig

    source = source_config(init_from)
    if source.block_causal:
        raise UnmaskError(f"--init-from {init_from}: a block-diffusion model; fine-tune an MDM or AR run")
    steps = given.get("steps") or DEFAULT_STEPS
    settings = {"lr": DEFAULT_LR, "steps": steps, "warmup_steps": max(1, steps // 100), **given}
    train_cfg = TrainConfig(objective="ar" if source.causal else "mdm", sft=True, init_from=str(Path(init_from).resolve()), **settings)
    return source, train_cfg


def pairs_folder(run_dir: Path, init_from: Path, pairs: Path, val_pairs: Optional[Path], length: Optional[int], context_len: int) -> Path:
    """RUN/pairs: the pairs tokenised with the source run's tokenizer."""
    from unmask.checkpoint import checkpoint_tokenizer
    from unmask.data.pairs import prepare_pairs, read_pairs

    try:
        tokenizer = checkpoint_tokenizer(init_from)
    except (UnmaskError, FileNotFoundError):
        raise UnmaskError(f"--init-from {init_from}: not a run folder with a tokenizer; `unmask import` a published checkpoint first") from None
    val = read_pairs(val_pairs) if val_pairs is not None else None
    return prepare_pairs(run_dir / "pairs", tokenizer, read_pairs(pairs), val, length=length, max_length=context_len)


@app.command()
def finetune(
    run_dir: Path = typer.Option(..., help="Folder of the fine-tuned run (config, metrics.jsonl, checkpoints, pairs/)."),
    init_from: Optional[Path] = typer.Option(None, help="The pretrained run to start from (an MDM or AR run folder; `unmask import` a "
                                             "published checkpoint first). Its network, tokenizer and objective are kept."),
    pairs: Optional[Path] = typer.Option(None, help="JSONL training pairs, one {\"prompt\": ..., \"response\": ...} per line."),
    val_pairs: Optional[Path] = typer.Option(None, help="JSONL held-out pairs (default: 5% of --pairs)."),
    length: Optional[int] = typer.Option(None, min=1, help="Tokens per row [EOS ; prompt ; response ; EOS pads] (default: the longest pair + 2); "
                                         "responses are padded with EOS to the end of the row and the pads are learned."),
    cfg_dropout: Optional[float] = typer.Option(None, help="MDM: probability of replacing a row's prompt by MASK (0: guidance is SMDM's "
                                                "unsupervised CFG; 0.1: standard CFG) (default 0)."),
    steps: Optional[int] = typer.Option(None, min=1, help=f"Optimizer steps (default {DEFAULT_STEPS})."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Rows per micro-batch (default 16)."),
    lr: Optional[float] = typer.Option(None, help=f"Peak learning rate (default {DEFAULT_LR:g}); warmup 1% of the steps, cosine to 10%."),
    warmup_steps: Optional[int] = typer.Option(None, min=0, help="Linear warmup steps (default 1% of --steps)."),
    loss: Optional[str] = typer.Option(None, help="MDM objective over the response: t-dce or k-dce (default k-dce)."),
    precision: Optional[str] = typer.Option(None, help="auto, bf16 or fp32 (default auto)."),
    seed: Optional[int] = typer.Option(None, min=0, help="Seed of the data order, masking and dropout (default 0)."),
    eval_every: Optional[int] = typer.Option(None, min=1, help="Score the held-out pairs every N steps (default 100)."),
    checkpoint_every: Optional[int] = typer.Option(None, min=1, help="Checkpoint every N steps (default 200)."),
    log_every: Optional[int] = typer.Option(None, min=1, help="Append a metrics line every N steps (default 10)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
    resume: bool = typer.Option(False, help="Continue RUN from its latest checkpoint (only --steps and the logging settings may change)."),
    resume_from: Optional[int] = typer.Option(None, help="Resume from the run's checkpoint of this step instead of its latest (e.g. when "
                                              "the latest is damaged); implies --resume."),
) -> None:
    """Fine-tune an MDM (or the AR baseline, same data and command) on prompt/response pairs.

    The prompt is never masked and never a target; the response and its EOS pads are learned,
    normalised by their number (docs/algorithms.md, 'Conditional bound and fine-tuning'). Held-out pairs are scored during training
    (MDM: conditional bound; AR: exact). Sample with `unmask sample --prompt ... --cfg W`.
    """
    from unmask.checkpoint import run_lock
    from unmask.cli.train import _saved_run
    from unmask.tracking import tracker_names
    from unmask.train import train as run_training

    log_to = tracker_names(log_to)  # refused before any work

    given = {key: value for key, value in {
        "steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "loss": loss, "precision": precision,
        "seed": seed, "eval_every": eval_every, "checkpoint_every": checkpoint_every, "log_every": log_every, "cfg_dropout": cfg_dropout,
    }.items() if value is not None}
    resume = resume or resume_from is not None
    # held from writing RUN/pairs to the end of training (train() takes it again); under torchrun by rank 0
    lock = run_lock(run_dir, create=not resume) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        if resume:
            if init_from is not None or pairs is not None or val_pairs is not None or length is not None:
                raise UnmaskError("--resume continues the run with its own source and pairs; leave out --init-from, --pairs, --val-pairs and --length")
            saved = _saved_run(run_dir)
            if not saved.train.sft:
                raise UnmaskError(f"--run-dir {run_dir} is not a fine-tuning run; resume it with `unmask train --resume`")
            model_cfg, train_cfg, data_dir = saved.model, dataclasses.replace(saved.train, **given), Path(saved.data_dir)
        else:
            if init_from is None or pairs is None:
                raise UnmaskError("--init-from (a pretrained run) and --pairs (a JSONL file) are needed to start fine-tuning")
            if (run_dir / "checkpoints").exists():
                raise UnmaskError(f"--run-dir {run_dir} already holds a run; pass --resume to continue it or choose a new folder")
            model_cfg, train_cfg = finetune_configs(init_from, **given)
            data_dir = pairs_folder(run_dir, init_from, pairs, val_pairs, length, model_cfg.context_len)
        typer.echo(f"fine-tuning {train_cfg.objective.upper()} {model_cfg.name} on {data_dir}", err=True)
        result = run_training(run_dir, model_cfg, train_cfg, data_dir, resume=resume, device=device, resume_from=resume_from,
                              log_to=log_to)
    typer.echo(result.summary(), err=True)
