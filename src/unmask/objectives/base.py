"""The protocol of a training objective: what one objective supplies to the one training loop.

An objective is one module of :mod:`unmask.objectives` with a subclass of :class:`Objective`,
registered by name (:func:`unmask.objectives.registry.register`). The loop (:mod:`unmask.train`)
asks it for

* ``data``: what it learns from: ``"windows"``, windows of L+1 tokens of a prepared folder (the
  first token is context only), ``"pairs"``, prompt/response rows with their response masks, or
  ``"labels"``, labelled texts (a classifier's; :mod:`unmask.data.labels`);
* :meth:`Objective.draw_noise`: the noise of a whole global batch, drawn on the CPU from the run's
  noise generator, so every process draws the same and keeps its own rows (``noise.rows(i)``);
* :meth:`Objective.loss`: the per-sequence loss (B,) in nats/token of given rows and noise, calling
  the network only through its forward arguments, so DDP/FSDP/compile wrappers work;
* :meth:`Objective.validate`: the bound (or exact NLL) reported on the held-out rows;
* :meth:`Objective.begin`, :meth:`Objective.before_step`, :meth:`Objective.metrics`: for objectives with
  state outside the model (distillation's teacher): the run folder, the step about to be taken, and
  what the metrics line of a step adds (nothing, by default);
* :meth:`Objective.network` and :meth:`Objective.check`: the network it trains (the ``ModelConfig``
  fields a new run gets) and the refusal of any other; ``defaults``: the settings it gives a
  ``TrainConfig`` that leaves them unset (``lr``, ``loss``).

docs/extending.md, 'Adding an objective', walks through a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from unmask.config import ModelConfig, TrainConfig
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError, UnmaskError
from unmask.likelihood import LikelihoodResult
from unmask.objectives.registry import OBJECTIVES
from unmask.schedule import Schedule

VALIDATION_SEED = 1234  # the held-out bound draws the same noise at every validation


class Noise(Protocol):
    """A draw of an objective's noise for a batch: any dataclass with these two methods."""

    def rows(self, index: slice) -> "Noise":
        """The rows ``index`` (this process's share of a micro-batch)."""

    def to(self, device: torch.device) -> "Noise":
        """The same noise on ``device``."""


@dataclass(frozen=True)
class Batch:
    """Rows of training data: ``tokens`` (B, L+1) windows, or (B, T) pair rows with ``response``
    (B, T) bool marking each row's response region; a classifier's labelled rows (B, T) have their
    text after the EOS as ``response`` and their class indices ``labels`` (B,)."""

    tokens: torch.Tensor
    response: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def rows(self, index: slice) -> "Batch":
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        return Batch(self.tokens[index], pick(self.response), pick(self.labels))

    def to(self, device: torch.device) -> "Batch":
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return Batch(self.tokens.to(device), move(self.response), move(self.labels))


class Objective:
    """One training objective; an instance serves one run (its training and model configs)."""

    name: ClassVar[str]
    data: ClassVar[str] = "windows"  # or "pairs"
    defaults: ClassVar[dict[str, Any]] = {}  # TrainConfig settings left unset (None) take these
    fine_tunes: ClassVar[bool] = False  # selected by the sft section rather than by --objective

    def __init__(self, train: TrainConfig, model: ModelConfig) -> None:
        self.train, self.model = train, model
        self.schedule = Schedule(train.schedule)

    @classmethod
    def network(cls, train: TrainConfig) -> dict[str, Any]:
        """The ``ModelConfig`` fields of the network this objective trains: bidirectional by default."""
        return {"causal": False}

    def check(self, tokenizer: Tokenizer, data_dir: Path, device: torch.device) -> None:
        """Refuse a model this objective cannot train on data made with ``tokenizer`` (or on ``device``)."""
        causal = self.network(self.train)["causal"]
        if not causal and self.model.mask_id != tokenizer.mask_id:
            raise UnmaskError(f"model MASK id {self.model.mask_id} but the tokenizer of {data_dir} has MASK at {tokenizer.mask_id}")
        if self.model.causal != causal:
            raise OptionError("objective", "{objective} {_name} needs causal={_causal} in the model config", _name=self.train.objective,
                              _causal=causal)

    def begin(self, run_dir: Path, is_main: bool) -> None:
        """Called on every process once before this call's first step, with the run folder (written by the main
        process only): where an objective with state outside the model (a distillation teacher) keeps it."""

    def before_step(self, step: int, model: torch.nn.Module) -> None:
        """Called on every process before optimizer step ``step`` (0-based) draws its noise, with the unwrapped
        model being trained (distillation: the teacher of the step's round is set here)."""

    def metrics(self, step: int) -> dict[str, Any]:
        """What the objective adds to the training metrics line of ``step`` (distillation: its round)."""
        return {}

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> Noise | None:
        """The noise of the global ``batch`` (None: the objective has none)."""
        return None

    def loss(self, model, batch: Batch, noise: Noise | None) -> torch.Tensor:
        """Per-sequence loss (B,) in nats/token of ``batch`` (on the model's device) under ``noise``."""
        raise NotImplementedError

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        """The bound (or exact NLL) of the held-out rows, with the same noise every time."""
        raise NotImplementedError


def objective_for(train: TrainConfig, model: ModelConfig) -> Objective:
    """The objective a run trains: fine-tuning on pairs when it has an ``sft`` section, else its ``objective``."""
    return objective_class(train)(train, model)


def objective_class(train: TrainConfig) -> type[Objective]:
    return OBJECTIVES["sft" if train.sft is not None else train.objective]
