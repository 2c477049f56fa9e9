"""``unmask distill``: a run distilled for few-step sampling (SDTT for an MDM run, DCD for a Duo run)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List, Optional

import typer

from unmask.cli.app import app
from unmask.cli.train import log_to_option
from unmask.errors import UnmaskError

DEFAULT_ROUNDS, DEFAULT_ROUND_STEPS = 3, 500

HELP = {
    "teacher": "The run to distil: an MDM run (--method sdtt) or a Duo run (--method dcd); a distilled run may be distilled further. "
               "Left out with --resume.",
    "method": "sdtt (self-distillation through time, for an MDM run) or dcd (discrete consistency distillation, for a Duo run).",
    "teacher_steps": "The teacher's sampling steps in the first round (default: the teacher's context length, rounded up to a multiple "
                     "of 2^rounds); every round halves them, so the distilled run samples with teacher steps / 2^rounds.",
    "divergence": "SDTT: how the student's distribution is compared with the teacher's two-step target: kl or tvd (default kl).",
    "resume": "Continue OUT exactly, across rounds, from its latest checkpoint (only --steps and the logging settings may change).",
}


def distill_configs(teacher: Path, method: str, **given):
    """(model config, train config, data folder) of distilling the run ``teacher`` by ``method``: the
    teacher's network, schedule and validation estimator, its data, the ``given`` settings."""
    from unmask.cli.train import _saved_data_dir
    from unmask.config import DISTILLATION, TrainConfig
    from unmask.errors import not_one_of
    from unmask.objectives import OBJECTIVES

    if method not in DISTILLATION:
        raise not_one_of("method", method, DISTILLATION)
    if method not in OBJECTIVES:
        raise UnmaskError(f"--method {method} is not available in this installation")
    source = OBJECTIVES[method].teacher_config(teacher)  # refuses a run of another kind, by name
    rounds = given.pop("rounds", None) or DEFAULT_ROUNDS
    per_round = given.pop("steps_per_round", None) or DEFAULT_ROUND_STEPS
    power = 2**rounds
    teacher_steps = given.pop("teacher_steps", None) or -(-source.model.context_len // power) * power
    data = given.pop("data", None)
    data_dir = Path(data) if data is not None else _saved_data_dir(source, teacher)
    steps = given.pop("steps", None) or rounds * per_round
    settings = {"warmup_steps": max(1, steps // 100), "loss": source.train.loss, "schedule": source.train.schedule, **given}
    path = str(Path(teacher).resolve())
    train_cfg = TrainConfig(objective=method, teacher=path, init_from=path, rounds=rounds, steps_per_round=per_round,
                            teacher_steps=teacher_steps, steps=steps, **settings)
    return source.model, train_cfg, data_dir


@app.command()
def distill(
    teacher: Optional[Path] = typer.Argument(None, help=HELP["teacher"]),
    out: Path = typer.Option(..., help="Folder of the distilled run (config, metrics.jsonl, checkpoints, teachers/): sample it like any run."),
    method: Optional[str] = typer.Option(None, help=HELP["method"]),
    rounds: Optional[int] = typer.Option(None, min=1, help=f"Rounds of distillation, each halving the sampling steps (default {DEFAULT_ROUNDS})."),
    steps_per_round: Optional[int] = typer.Option(None, min=1, help=f"Optimizer steps per round (default {DEFAULT_ROUND_STEPS})."),
    teacher_steps: Optional[int] = typer.Option(None, min=2, help=HELP["teacher_steps"]),
    divergence: Optional[str] = typer.Option(None, help=HELP["divergence"]),
    data: Optional[Path] = typer.Option(None, help="Folder from `unmask data prepare` (default: the teacher's data)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps in all (default rounds x steps per round; more extend the last round)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Sequences per micro-batch, per process (default 16)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-4); warmup 1% of the steps, cosine to 10% over the run."),
    warmup_steps: Optional[int] = typer.Option(None, min=0, help="Linear warmup steps (default 1% of the steps)."),
    precision: Optional[str] = typer.Option(None, help="auto, bf16 or fp32 (default auto)."),
    seed: Optional[int] = typer.Option(None, min=0, help="Seed of the data order and the noise (default 0)."),
    eval_every: Optional[int] = typer.Option(None, min=1, help="Report the student's held-out bound every N steps (default 100)."),
    checkpoint_every: Optional[int] = typer.Option(None, min=1, help="Checkpoint every N steps (default 200)."),
    log_every: Optional[int] = typer.Option(None, min=1, help="Append a metrics line (with the round) every N steps (default 10)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
    resume: bool = typer.Option(False, help=HELP["resume"]),
    resume_from: Optional[int] = typer.Option(None, help="Resume from OUT's checkpoint of this step instead of its latest; implies --resume."),
) -> None:
    """Distil a run for few-step sampling: SDTT for an MDM run, DCD for a Duo run.

    The student starts as the teacher; in each round it learns to take one sampling step where the teacher
    takes two, then becomes the teacher of the next round
    (docs/algorithms.md, 'Distillation for few-step sampling'). The same command runs under torchrun.
    """
    from unmask.cli.train import _saved_data_dir, _saved_run
    from unmask.tracking import tracker_names
    from unmask.train import train as run_training

    log_to = tracker_names(log_to)  # refused before any work
    given = {key: value for key, value in {
        "steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "precision": precision, "seed": seed,
        "eval_every": eval_every, "checkpoint_every": checkpoint_every, "log_every": log_every, "divergence": divergence,
    }.items() if value is not None}
    resume = resume or resume_from is not None
    if resume:
        if teacher is not None or method is not None or rounds is not None or steps_per_round is not None or teacher_steps is not None:
            raise UnmaskError("--resume continues OUT with its own teacher and rounds; leave out TEACHER, --method, --rounds, "
                              "--steps-per-round and --teacher-steps")
        saved = _saved_run(out)
        if saved.train.distill is None:
            raise UnmaskError(f"--out {out} is not a distillation run; resume it with `unmask train --resume`")
        model_cfg, train_cfg = saved.model, dataclasses.replace(saved.train, **given)
        data_dir = Path(data) if data is not None else _saved_data_dir(saved, out)
    else:
        if teacher is None or method is None:
            raise UnmaskError("give the TEACHER run and --method (sdtt for an MDM run, dcd for a Duo run) to start distilling")
        model_cfg, train_cfg, data_dir = distill_configs(teacher, method, rounds=rounds, steps_per_round=steps_per_round,
                                                         teacher_steps=teacher_steps, data=data, **given)
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:
        cfg = train_cfg.distill
        course = " -> ".join(str(cfg.teacher_steps // 2**r) for r in range(cfg.rounds + 1))
        typer.echo(f"{train_cfg.objective.upper()} of {cfg.teacher}: {cfg.rounds} rounds of {cfg.steps_per_round} steps, sampling steps "
                   f"{course}", err=True)
    result = run_training(out, model_cfg, train_cfg, data_dir, resume=resume, device=device, resume_from=resume_from, log_to=log_to)
    if main_process:
        typer.echo(result.summary(), err=True)
        typer.echo(f"sample it with: unmask sample --checkpoint {out} --steps {train_cfg.distill.student_steps}", err=True)
