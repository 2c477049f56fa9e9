"""The one training loop: every objective (unmask.objectives), one process or torchrun, CPU or GPU.

AdamW with warmup + cosine decay, gradient clipping and accumulation, bf16 autocast where the
device supports it (fp32 master weights; losses in fp32), periodic validation on fixed held-out
rows, metrics appended to ``metrics.jsonl``, atomic checkpoints and exact resume. The loop is here;
its pieces are in :mod:`unmask.training`: the optimizer and precision (``optim``), the data
(``data``), resuming (``restore``), the checks before training (``checks``), one step (``step``)
and what a run writes (``save``). The objective supplies its noise, loss and bound
(``objective.draw_noise``, ``loss``, ``validate``), so nothing here depends on which it is.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from unmask.checkpoint import DamagedCheckpoint, resume_hint, run_lock, write_text_atomic
from unmask.config import ModelConfig, RunConfig, TrainConfig
from unmask.distributed import World, broadcast_object, init_world, parallelize, shutdown
from unmask.ema import EMA
from unmask.errors import OptionError
from unmask.model import Transformer
from unmask.objectives import objective_class, objective_for
from unmask.tracking import open_trackers, tracker_names
from unmask.training.checks import check_run
from unmask.training.data import open_data
from unmask.training.optim import autocast_dtype, make_optimizer
from unmask.training.restore import Checkpoint, read_checkpoint, restore_model_and_streams, restore_optimizer, resumed_config
from unmask.training.save import append_metrics, save, truncate_metrics
from unmask.training.step import DATA_STREAM, NOISE_STREAM, Trainer, batch_layout, stream_seed


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float
    tokens_per_s: float
    losses: list[float]  # per-step training loss of the steps run in this call

    def summary(self) -> str:
        """One line for the end of a command: what this call trained, or that the run had already finished."""
        if not self.losses:
            return (f"already finished at step {self.steps} -> {self.run_dir}; give --steps N (more than {self.steps}) with --resume "
                    "to train it further")
        return (f"done: {self.steps} steps, {self.tokens:,} tokens, last loss {self.final_loss:.4f}, {self.tokens_per_s:,.0f} tokens/s "
                f"-> {self.run_dir}")


def train(
    run_dir: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after: int | None = None,
    resume_from: int | None = None,
    log_to: tuple[str, ...] = (),
) -> TrainResult:
    """Train until ``train_cfg.steps`` (or ``stop_after`` steps in this call, for tests).

    With ``resume`` the run continues exactly from RUN's LATEST checkpoint (``resume_from``: from
    its checkpoint of that step; implies ``resume``): same weights, optimizer moments, data order
    and masking noise, so the losses equal an uninterrupted run's. The model, data and settings
    must be the saved ones; only ``steps`` and the OPERATIONAL settings may differ, with a printed
    notice (see :func:`unmask.training.restore.resume_config`). RUN is locked for the whole call: one writer at a time.
    ``log_to`` names trackers (``"tensorboard"``, ``"wandb"``: :mod:`unmask.tracking`) that rank 0
    sends every metrics line to as well.
    """
    log_to = tracker_names(log_to)
    resume = resume or resume_from is not None
    world, dev = init_world(device, train_cfg.parallel)
    try:
        with _run_writer(Path(run_dir), world, resume):
            return _train(world, dev, Path(run_dir), model_cfg, train_cfg, data_dir, resume, resume_from, progress, stop_after, log_to)
    except DamagedCheckpoint as exc:
        if resume and exc.ckpt.parent == Path(run_dir) / "checkpoints":
            raise resume_hint(exc) from None
        raise
    finally:
        shutdown(world)  # also after an error, so that a later run in this process starts afresh


@contextlib.contextmanager
def _run_writer(run_dir: Path, world, resume: bool) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the whole run (:func:`unmask.checkpoint.run_lock`);
    every rank learns whether it got it, so no rank waits in a collective for one that stopped, and
    every rank raises the same OptionError."""
    with contextlib.ExitStack() as stack:
        refused = None
        if world.is_main:
            try:
                stack.enter_context(run_lock(run_dir, create=not resume))
            except OptionError as exc:
                refused = exc
        refused = broadcast_object(refused, world)
        if refused is not None:
            raise refused
        yield


def _train(world: World, dev: torch.device, run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir, resume: bool,
           resume_from: int | None, progress: bool, stop_after: int | None, log_to: tuple[str, ...]) -> TrainResult:
    """Restore (or refuse to overwrite) the run, check it, build its trainer, write its config, then loop."""
    data = open_data(objective_class(train_cfg).data, data_dir, model_cfg.context_len)
    data_dir = Path(data_dir).resolve()
    ckpt = None
    if resume:
        ckpt = read_checkpoint(run_dir, resume_from)
        train_cfg = resumed_config(ckpt, model_cfg, train_cfg, data_dir, data, world)
    elif (run_dir / "checkpoints").exists():
        raise OptionError("run_dir", "{run_dir} {_dir} already holds a run; pass {resume} to continue it or choose a new folder",
                          _dir=run_dir)
    objective = objective_for(train_cfg, model_cfg)
    check_run(objective, model_cfg, data, data_dir, dev)
    config = RunConfig(model=model_cfg, train=train_cfg, data_dir=str(data_dir), tokenizer_fingerprint=data.tokenizer.fingerprint,
                       data_fingerprint=data.fingerprint)
    trainer, step, tokens = _trainer(world, dev, run_dir, config, objective, data, ckpt)
    objective.begin(run_dir, world.is_main)
    return _loop(trainer, run_dir, config, step, tokens, progress, stop_after, log_to)


def _trainer(world: World, dev: torch.device, run_dir: Path, config: RunConfig, objective, data, ckpt: Checkpoint | None
             ) -> tuple[Trainer, int, int]:
    """The run's model (initialised, from ``init_from``, or restored), random streams, wrapper, optimizer and
    EMA, with the step and token count it starts at; rank 0 writes RUN/config.json."""
    model_cfg, cfg = config.model, config.train
    micro_bs, accum = batch_layout(cfg, data.length, world.world_size)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    if ckpt is None and cfg.init_from:  # AR -> MDM adaptation, MDM -> block model, fine-tuning (unmask.adaptation)
        from unmask.adaptation import initial_weights

        state = initial_weights(cfg.init_from, model_cfg)  # a classifier's new label head keeps its initialisation
        model.load_state_dict({**model.state_dict(), **state} if model_cfg.labels else state)
    # Every rank draws the GLOBAL batch and its noise from the same streams and keeps its own rows
    data_rng = np.random.default_rng(stream_seed(cfg.seed, DATA_STREAM))
    noise_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, NOISE_STREAM))
    step, tokens = 0, 0
    if ckpt is not None:
        step, tokens = restore_model_and_streams(ckpt, model, data_rng, noise_gen, world, cfg)
        if world.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    model.to(dev)
    amp = autocast_dtype(cfg.precision, dev)
    net = parallelize(model, world, dev, cfg.parallel, param_dtype=amp if dev.type == "cuda" else None,
                      compile=cfg.compile, activation_checkpointing=cfg.activation_checkpointing)
    optimizer = make_optimizer(model, cfg, fused=dev.type == "cuda" and cfg.parallel == "ddp")
    ema = EMA(model, cfg.ema) if cfg.ema else None
    if ckpt is not None:
        restore_optimizer(ckpt, model, optimizer, ema)
    trainer = Trainer(cfg, objective, data, model, net, optimizer, ema, world, dev, amp, micro_bs, accum, data_rng, noise_gen)
    return trainer, step, tokens


def _loop(trainer: Trainer, run_dir: Path, config: RunConfig, step: int, tokens: int, progress: bool, stop_after: int | None,
          log_to: tuple[str, ...]) -> TrainResult:
    """Steps until the run's end (or ``stop_after`` steps), with metrics, validation and checkpoints on their schedules."""
    cfg, world = trainer.cfg, trainer.world
    held_out = trainer.data.held_out(cfg.eval_windows)
    tokens_per_step = trainer.global_batch * trainer.data.length
    flops_per_token = 6 * config.model.non_embedding_params()
    metrics_path, tokenizer_json = run_dir / "metrics.jsonl", trainer.data.tokenizer.to_json()
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.objective}", unit="step", disable=not (progress and world.is_main),
               dynamic_ncols=True)
    # closed on an error too, before its message is printed; only rank 0 writes metrics and trackers
    with bar, open_trackers(log_to if world.is_main else (), run_dir, config.to_dict(), step) as sink:
        t_start = time.perf_counter()
        t_log, tok_log = t_start, 0
        while step < end:
            done = trainer.step(step)
            step += 1
            tokens += tokens_per_step
            tok_log += tokens_per_step
            losses.append(done.loss)
            bar.update(1)
            if world.is_main and (step % cfg.log_every == 0 or step == end):
                now = time.perf_counter()
                rate = tok_log / max(now - t_log, 1e-9)
                t_log, tok_log = now, 0
                bar.set_postfix(loss=f"{done.loss:.3f}", tok_s=f"{rate:,.0f}")
                append_metrics(metrics_path, sink, {
                    "kind": "train", "step": step, "tokens": tokens, "flops": flops_per_token * tokens, "loss": done.loss,
                    "lr": done.lr, "grad_norm": done.grad_norm, "tokens_per_s": rate, "elapsed_s": now - t_start,
                    **trainer.objective.metrics(step - 1),
                })
            if step % cfg.eval_every == 0 or step == cfg.steps:
                result = trainer.validate(held_out)
                if world.is_main:
                    bar.write(f"step {step}: val {result.headline()}"
                              + "".join(f", {name} {value:.4f}" for name, value in result.extra().items()))
                    append_metrics(metrics_path, sink, {
                        "kind": "val", "step": step, "tokens": tokens, "flops": flops_per_token * tokens,
                        "val_nats_per_token": result.nats_per_token, "val_stderr": result.stderr, "val_ppl": result.perplexity,
                        **{f"val_{name}": value for name, value in result.extra().items()},
                    })
            if step % cfg.checkpoint_every == 0 or step == end:
                save(trainer, run_dir, config, tokenizer_json, step, tokens)
    elapsed = time.perf_counter() - t_start
    return TrainResult(run_dir, step, tokens, losses[-1] if losses else float("nan"), len(losses) * tokens_per_step / max(elapsed, 1e-9), losses)
