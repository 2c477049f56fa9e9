"""What a run writes as it trains: checkpoints (single-file, or sharded under FSDP) and the lines of
``metrics.jsonl`` (also sent to the run's trackers, :mod:`unmask.tracking`)."""

from __future__ import annotations

import json
from pathlib import Path

from unmask.checkpoint import TrainerState, save_checkpoint, write_text_atomic
from unmask.checkpoint_sharded import consolidate, save_sharded
from unmask.config import RunConfig
from unmask.distributed import barrier
from unmask.tracking import Sink
from unmask.training.step import Trainer


def save(trainer: Trainer, run_dir: Path, config: RunConfig, tokenizer_json: str, step: int, tokens: int) -> None:
    """Checkpoint the run at ``step``: every process its shards under FSDP (the finished run also gets the
    single file that sample and eval read), else rank 0 the whole model; all processes wait for it."""
    cfg, world, rng = trainer.cfg, trainer.world, trainer.rng_state()
    if cfg.parallel == "fsdp":
        info = {"step": step, "tokens": tokens, "data_rng": rng["data"], "world_size": world.world_size}
        saved = save_sharded(run_dir, trainer.model, trainer.optimizer, trainer.ema, config, info, rng["torch"], tokenizer_json, world,
                             keep=cfg.keep_checkpoints)
        if step == cfg.steps and world.is_main:
            consolidate(saved)
    elif world.is_main:  # the random streams are the same on every rank
        state = TrainerState(step, tokens, trainer.optimizer.state_dict(), rng)
        save_checkpoint(run_dir, trainer.model, config, state, tokenizer_json, keep=cfg.keep_checkpoints,
                        ema=trainer.ema.state_dict() if trainer.ema is not None else None)
    barrier(world)


def append_metrics(path: Path, sink: Sink, record: dict) -> None:
    """One line of metrics.jsonl, also sent to the run's trackers (``--log-to``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    sink.log(record)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we continue from (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))
