"""The small model an experiment trains from scratch, and the recipe every run of an experiment trains with.

:func:`train_recipe` is the training of every run (scaling's grid included): the optimiser settings
of :class:`~unmask.config.TrainConfig`, 1% warmup, one evaluation on 8 windows and one checkpoint
at the end (the only one kept), and a log line every 5% of the steps. :class:`SmallModel` holds
what the reverse-curse, conditional and shift experiments share: the shape of the model they train,
MDM and AR alike, and its training budget; their settings extend it, so that a results folder
records these fields with the experiment's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unmask.config import ModelConfig, TrainConfig
from unmask.errors import check_number


def train_recipe(kind: str, steps: int, batch_size: int, lr: float, seed: int, **settings: Any) -> TrainConfig:
    """The training settings of a run of ``steps`` steps with objective ``kind`` (mdm, ar); ``settings``
    (any :class:`~unmask.config.TrainConfig` setting, flat names included) add to or replace the recipe's."""
    recipe = dict(objective=kind, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 100), seed=seed,
                  eval_every=steps, eval_windows=8, checkpoint_every=steps, keep_checkpoints=1, log_every=max(1, steps // 20))
    return TrainConfig(**{**recipe, **settings})


@dataclass(frozen=True)
class SmallModel:
    """A model trained from scratch for an experiment, MDM and AR alike, and its training budget."""

    vocab_size: int = 1024  # the BPE trained on the experiment's corpus
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    context_len: int = 64
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3  # the same for both models

    def __post_init__(self) -> None:
        check_number("vocab_size", self.vocab_size, ">= 0")
        for name in ("n_layer", "n_embd", "n_head", "context_len", "steps", "batch_size"):
            check_number(name, getattr(self, name), ">= 1")
        check_number("lr", self.lr, "> 0")

    def model_config(self, name: str, vocab: int, kind: str) -> ModelConfig:
        """The model of a run with objective ``kind`` (AR: causal) on a tokenizer of ``vocab`` tokens."""
        return ModelConfig(name=name, vocab_size=vocab, context_len=self.context_len, n_layer=self.n_layer, n_head=self.n_head,
                           n_embd=self.n_embd, causal=kind == "ar")

    def train_config(self, kind: str, steps: int, seed: int, **settings: Any) -> TrainConfig:
        """:func:`train_recipe` at this batch size and learning rate (unless ``settings`` replace them)."""
        return train_recipe(kind, steps, **{"batch_size": self.batch_size, "lr": self.lr, "seed": seed, **settings})

    def described(self, steps: int | str | None = None) -> str:
        """The model and its budget in words, for a results.md: "4 layers, width 128, context 64, 1000 steps of
        16 sequences, lr 0.002" (``steps``: written in place of the number of steps)."""
        return (f"{self.n_layer} layers, width {self.n_embd}, context {self.context_len}, {self.steps if steps is None else steps} steps "
                f"of {self.batch_size} sequences, lr {self.lr:g}")

    @property
    def chunk(self) -> int:
        """Steps a run trains between checkpoints while the experiment runs (:func:`~unmask.experiments.runner.run_grid`)."""
        return max(50, self.steps // 10)
