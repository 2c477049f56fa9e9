"""Resuming a run: the checkpoint it continues from, the settings it continues with, and the state
(weights, optimizer moments, EMA, random streams) put back exactly (docs/training.md, 'Resuming')."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unmask.checkpoint import EMA_FILE, TrainerState, latest_checkpoint, load_ema, load_trainer_state, load_weights
from unmask.checkpoint_sharded import is_sharded, load_sharded, read_sharded_info
from unmask.config import ModelConfig, RunConfig, TrainConfig
from unmask.distributed import World
from unmask.ema import EMA
from unmask.errors import OptionError
from unmask.training.data import PairData, WindowData
from unmask.training.optim import lr_course


@dataclass
class Checkpoint:
    """What a resumed run continues from: the checkpoint folder, the run config and trainer state saved
    in it, and (single-file checkpoints) the weights and EMA; a sharded checkpoint's are read later,
    into the sharded model."""

    path: Path
    config: RunConfig
    state: TrainerState
    weights: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None


def read_checkpoint(run_dir: Path, resume_from: int | None) -> Checkpoint:
    """The run's latest checkpoint (or that of step ``resume_from``)."""
    path = latest_checkpoint(run_dir, resume_from)
    if is_sharded(path):
        saved, info, noise_state = read_sharded_info(path)
        rng = {"data": info["data_rng"], "torch": noise_state, "world_size": info["world_size"]}
        return Checkpoint(path, saved, TrainerState(info["step"], info["tokens"], None, rng))
    weights, saved, _ = load_weights(path)
    return Checkpoint(path, saved, load_trainer_state(path), weights, load_ema(path))


def resumed_config(ckpt: Checkpoint, model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir: Path, data: WindowData | PairData,
                   world: World) -> TrainConfig:
    """The training config the run continues with (:func:`resume_config`); rank 0 prints the notices."""
    train_cfg, notices = resume_config(ckpt.config, model_cfg, train_cfg, ckpt.state.step, data_dir, data.tokenizer.fingerprint,
                                       data.fingerprint)
    if world.is_main:
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)
    return train_cfg


# Settings that change no number a run computes: they may differ on resume (with a notice).
OPERATIONAL = ("eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "compile", "activation_checkpointing")


def changed_settings_error(refused: list[str], **values) -> OptionError:
    """The error for settings that differ from a resumed run's. Each of ``refused`` is a template of
    :class:`~unmask.errors.OptionError` that names one setting, ``"{lr} (saved {_saved_lr!r}, given
    {_given_lr!r})"``, whose values are ``values``."""
    return OptionError(
        "resume", f"{{resume}}: {', '.join(refused)} differ from the run's saved settings; leave them out to continue the run as "
        "it was configured, or start a new {run_dir}", **values
    )


def resume_config(saved: RunConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, step: int, data_dir: Path, fingerprint: str,
                  data_fingerprint: str = "") -> tuple[TrainConfig, list[str]]:
    """The training config a resumed run continues with, and the notices to print.

    ``saved`` is the config of the checkpoint at ``step``. The model, the data (its tokenizer's
    ``fingerprint`` and, when the run recorded one, the content fingerprint of its shards) and
    every training setting must equal the saved ones, except OPERATIONAL settings and ``steps``:
    a new length keeps the LR continuous (see :func:`unmask.training.optim.learning_rate`). Anything else raises
    an OptionError naming it.
    """
    if model_cfg != saved.model:
        diffs = [f"{f.name} (saved {getattr(saved.model, f.name)!r}, given {getattr(model_cfg, f.name)!r})"
                 for f in dataclasses.fields(ModelConfig) if getattr(saved.model, f.name) != getattr(model_cfg, f.name)]
        raise OptionError("resume", "{resume}: the model differs from the saved one in {_diffs}; resume with the saved model or start a new "
                          "{run_dir}", _diffs=", ".join(diffs))
    if fingerprint != saved.tokenizer_fingerprint:
        raise OptionError("data", "{resume}: the data folder {_dir} was made with another tokenizer than the run's data {_saved} (fingerprint "
                          "{_print}, saved {_saved_print}); pass {data} with the run's prepared data", _dir=data_dir, _saved=saved.data_dir,
                          _print=fingerprint, _saved_print=saved.tokenizer_fingerprint)
    if saved.data_fingerprint and data_fingerprint != saved.data_fingerprint:
        raise OptionError("data", "{resume}: the data in {_dir} changed since the run trained on it (content fingerprint {_print}, the run's "
                          "{_saved_print}): it was prepared again; pass {data} with the data the run was trained on, or start a new {run_dir}",
                          _dir=data_dir, _print=data_fingerprint or "none", _saved_print=saved.data_fingerprint)
    notices = []
    if str(data_dir) != saved.data_dir:
        if Path(saved.data_dir).exists():
            raise OptionError("data", "{resume}: {data} {_dir} is not the run's data folder {_saved}; leave {data} out to use it",
                              _dir=data_dir, _saved=saved.data_dir)
        notices.append(f"the run's data folder {saved.data_dir} is gone; continuing with {data_dir} (same tokenizer)")
    new = saved.train
    refused, values = [], {}
    given_settings = train_cfg.flat_settings()
    for name, before in saved.train.flat_settings().items():  # flat: every setting by its flag's name
        given = given_settings[name]
        if name in ("steps", "steps_changes") or before == given:
            continue
        if name in OPERATIONAL or (name == "batch_size" and saved.train.global_batch_tokens):
            notices.append(f"--{name.replace('_', '-')} changed from {before} to {given}")
            new = dataclasses.replace(new, **{name: given})
        else:
            refused.append(f"{{{name}}} (saved {{_saved_{name}!r}}, given {{_given_{name}!r}})")
            values |= {f"_saved_{name}": before, f"_given_{name}": given}
    if refused:
        raise changed_settings_error(refused, **values)
    if train_cfg.steps != saved.train.steps:
        if train_cfg.steps <= step:
            raise OptionError("steps", "{steps} {_steps}: the run is already at step {_step}; give more steps to continue it",
                              _steps=train_cfg.steps, _step=step)
        new = dataclasses.replace(new, steps=train_cfg.steps, steps_changes=(*saved.train.steps_changes, (step, saved.train.steps)))
        notices.append(f"--steps changed from {saved.train.steps} to {train_cfg.steps} at step {step}: the learning rate {lr_course(step, new)}")
    return new, notices


def restore_model_and_streams(ckpt: Checkpoint, model: torch.nn.Module, data_rng: np.random.Generator, noise_gen: torch.Generator,
                              world: World, cfg: TrainConfig) -> tuple[int, int]:
    """Put back the weights (of a single-file checkpoint) and the data and noise streams; returns (step, tokens).
    The number of processes must be the saved one, unless the run has --global-batch-tokens."""
    state = ckpt.state
    if ckpt.weights is not None:
        model.load_state_dict(ckpt.weights)
    if state.rng is None or (state.rng["world_size"] != world.world_size and not cfg.global_batch_tokens):
        saved_size = "an unknown number of" if state.rng is None else state.rng["world_size"]
        raise OptionError("resume", "{resume}: {_path} was written by {_saved} processes, this run has {_size}; resume with the same "
                          "number (only a run with {global_batch_tokens} may change it)", _path=ckpt.path, _saved=saved_size,
                          _size=world.world_size)
    data_rng.bit_generator.state = state.rng["data"]
    noise_gen.set_state(state.rng["torch"])
    return state.step, state.tokens


def restore_optimizer(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> None:
    """Put back the optimizer moments and the EMA (a sharded checkpoint: the weights too, into the sharded model)."""
    if is_sharded(ckpt.path):
        load_sharded(ckpt.path, model, optimizer, ema)
        return
    optimizer.load_state_dict(ckpt.state.optimizer)  # moments follow the parameters to their device
    if ema is not None:
        if ckpt.ema is None:
            raise OptionError("ema", "{resume}: {_path} has no {_file}; the run was trained without {ema}", _path=ckpt.path, _file=EMA_FILE)
        ema.load_state_dict(ckpt.ema)
