"""Experiment tracking: the training metrics also sent to TensorBoard or Weights & Biases.

``RUN/metrics.jsonl`` stays the record; a tracker (``--log-to tensorboard``, ``--log-to wandb``)
receives each of its lines as it is appended. A tracker is a small protocol:
``open(run_dir, config, step) -> Sink``, where ``config`` is the run's resolved config (logged as
hyperparameters) and ``step`` the step the run starts or resumes at, and a :class:`Sink` has
``log(record)`` and ``close()``. A record is a metrics line
(``{"kind": "train" | "val", "step": ..., <field>: <number>, ...}``); each numeric field becomes
the scalar ``<kind>/<field>`` (the field's ``val_`` prefix dropped: ``val/nats_per_token``) with
the step as its x axis.

* tensorboard: ``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard/``, the scalars
  in double precision (token and FLOP counts stay exact). A resumed run appends to the same folder
  and hides what the earlier writers logged after the resume step (``purge_step``), as
  ``metrics.jsonl`` drops those lines.
* wandb: a run in ``RUN/wandb/``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync``
  uploads it), project ``$WANDB_PROJECT`` or ``unmask``, named after the run folder. Its id is kept
  in ``RUN/wandb/run-id``, so a resumed run continues the same wandb run (``resume="allow"``). The
  scalars are plotted against ``step`` (wandb's ``define_metric``, as Lightning's WandbLogger
  does), so the steps a resumed run trains again (those logged after the checkpoint it resumes
  from) appear twice there, where TensorBoard and ``metrics.jsonl`` keep only the later ones.

Only the process that writes ``metrics.jsonl`` (rank 0 under torchrun) opens trackers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from unmask.checkpoint import write_text_atomic
from unmask.errors import OptionError

EXTRA = "pip install 'unmask[track]'"


class Sink(Protocol):
    """Where metrics lines go besides ``metrics.jsonl``."""

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics line (``{"kind", "step", <field>: <number>, ...}``)."""

    def close(self) -> None:
        """Flush and release; called once, also when training fails."""


@dataclass(frozen=True)
class Tracker:
    """A tracker (its name on the command line is its key in :data:`TRACKERS`): the package it needs and
    how it opens for a run."""

    package: str
    open: Callable[[Path, dict[str, Any], int], Sink]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics line as ``{"<kind>/<field>": value}`` (``val_`` prefixes dropped)."""
    kind = record["kind"]
    return {f"{kind}/{key.removeprefix(kind + '_')}": value for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to ``{"train.lr": 0.002, ...}``: numbers, strings and booleans kept,
    other values (lists, None) as their JSON text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


class TensorBoardSink:
    """Scalars and hyperparameters into ``RUN/tensorboard/``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # every writer marks its start (a SessionLog.START event at step + 1): TensorBoard takes the first
        # mark as the run's start and each later one as a restart, hiding the steps from there on that
        # earlier writers logged, as metrics.jsonl drops them on resume
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1)
        summaries = hparams(hyperparameters(config), {"train/loss": 0.0, "val/nats_per_token": 0.0})
        for summary in summaries[:2]:  # the experiment and the session's hyperparameters (no end status)
            self.writer.file_writer.add_summary(summary)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"], new_style=True, double_precision=True)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run in ``RUN/wandb/`` (offline unless ``WANDB_MODE`` is set), its id kept in ``RUN/wandb/run-id``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], step: int) -> None:
        import wandb

        id_file = run_dir / "wandb" / "run-id"
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)  # wandb's ids: 8 lowercase letters and digits
            id_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(id_file, run_id + "\n")
        self.run = wandb.init(
            dir=str(run_dir), id=run_id, name=run_dir.name, project=os.environ.get("WANDB_PROJECT") or "unmask", config=config,
            resume="allow", allow_val_change=True, mode=os.environ.get("WANDB_MODE") or "offline",
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({"step": record["step"], **scalars(record)})

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", TensorBoardSink),
    "wandb": Tracker("wandb", WandbSink),
}


def tracker_names(values: str | Iterable[str] | None) -> tuple[str, ...]:
    """The trackers ``--log-to`` asks for, each value a name or a comma-separated list, in order and
    without repeats; an unknown name, or one whose package is not installed, raises an OptionError."""
    names: list[str] = []
    for value in [values] if isinstance(values, str) else values or ():
        for name in (part.strip() for part in value.split(",")):
            if name and name not in names:
                names.append(name)
    for name in names:
        if name not in TRACKERS:
            raise OptionError("log_to", "{log_to} {_name}: unknown tracker; choose {_known} (repeat the flag or separate names with commas)",
                              _name=name, _known=" or ".join(TRACKERS))
        if importlib.util.find_spec(TRACKERS[name].package) is None:
            raise OptionError("log_to", "{log_to} {_name} needs the {_package} package: {_extra}", _name=name,
                              _package=TRACKERS[name].package, _extra=EXTRA)
    return tuple(names)


class _Fanout:
    """One sink that sends every record to several."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # every sink closed (the last opened first), even if one fails
            for sink in self.sinks:
                stack.callback(sink.close)


@contextlib.contextmanager
def open_trackers(names: Iterable[str], run_dir: str | Path, config: dict[str, Any], step: int = 0) -> Iterator[Sink]:
    """The trackers ``names`` (see :func:`tracker_names`) opened for the run folder ``run_dir``, which
    starts (``step`` 0) or resumes at ``step``; yields one sink whose ``log`` reaches them all, and
    closes every one of them at the end, also after an error. No names: a sink that does nothing."""
    fanout = _Fanout([])
    try:
        for name in tracker_names(names):
            fanout.sinks.append(TRACKERS[name].open(Path(run_dir), config, step))
        yield fanout
    finally:
        fanout.close()
