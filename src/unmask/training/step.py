"""One optimizer step of the training loop, and the random streams and batch layout it uses.

Every process draws the GLOBAL batch of a step and its noise from streams shared by all processes
(derived from the run's seed only) and keeps its own rows of each micro-batch, so n processes x
micro-batch b compute exactly what 1 process x micro-batch n b does (docs/training.md, 'Training on
many GPUs').
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from unmask.config import TrainConfig
from unmask.distributed import World, all_reduce_mean, full_value, grad_sync, local_rows
from unmask.ema import EMA
from unmask.errors import OptionError
from unmask.likelihood import LikelihoodResult
from unmask.objectives import Batch, Objective
from unmask.training.data import PairData, WindowData
from unmask.training.optim import autocast, learning_rate

DATA_STREAM, NOISE_STREAM = 0, 1


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for random stream ``stream`` of a run, mixed from (seed, stream) by SeedSequence.

    Distinct streams (data order, masking noise) never share or overlap their seeds, whatever the
    run seed, unlike arithmetic such as ``seed * 1000 + stream``.
    """
    return int(np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0] >> 1)


def batch_layout(cfg: TrainConfig, length: int, world_size: int) -> tuple[int, int]:
    """(sequences per micro-batch per process, micro-batches per step) for ``world_size`` processes.

    Without ``global_batch_tokens``: (batch_size, grad_accum), so a step holds world_size x
    batch_size x grad_accum sequences. With it, a step holds global_batch_tokens / length sequences
    whatever the number of processes, and grad_accum follows from it.
    """
    if not cfg.global_batch_tokens:
        return cfg.batch_size, cfg.grad_accum
    rows, rest = divmod(cfg.global_batch_tokens, length)
    if rest:
        raise OptionError("global_batch_tokens", "{global_batch_tokens}={_tokens} must be a multiple of the context length {_length}",
                          _tokens=cfg.global_batch_tokens, _length=length)
    accum, rest = divmod(rows, world_size * cfg.batch_size)
    if rest or not accum:
        raise OptionError(
            "global_batch_tokens", "{global_batch_tokens}={_tokens} is {_rows} sequences of {_length} tokens, not a multiple of "
            "{_size} processes x {batch_size} {_batch}; choose {batch_size} dividing {_divided} or another global batch",
            _tokens=cfg.global_batch_tokens, _rows=rows, _length=length, _size=world_size, _batch=cfg.batch_size,
            _divided=rows // world_size if rows % world_size == 0 else rows,
        )
    return cfg.batch_size, accum


@dataclass
class StepResult:
    loss: float  # mean over the global batch, nats/token
    grad_norm: float
    lr: float


@dataclass
class Trainer:
    """The live pieces of a run that a step reads and changes: the model (``model`` unwrapped, ``net``
    as wrapped for training), optimizer, EMA, the random streams and the batch layout."""

    cfg: TrainConfig
    objective: Objective
    data: WindowData | PairData
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    world: World
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype (None: fp32)
    micro_batch: int  # sequences per micro-batch per process
    accum: int  # micro-batches per step
    data_rng: np.random.Generator
    noise_gen: torch.Generator

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step, laid out (micro-batch, process, row)."""
        return self.micro_batch * self.accum * self.world.world_size

    def rng_state(self) -> dict:
        """The random streams' states (the same on every process), for a checkpoint."""
        return {"data": self.data_rng.bit_generator.state, "torch": self.noise_gen.get_state(), "world_size": self.world.world_size}

    def network_at(self, step: int):
        """The network to train at ``step``: with the annealed attention mask while it anneals (DiffuLLaMA: causal ->
        bidirectional; unmask.adaptation), else the wrapped network itself."""
        if not self.cfg.anneal_steps or step >= self.cfg.anneal_steps:
            return self.net
        from unmask.adaptation import annealed_mask

        mask = annealed_mask(step, self.cfg.anneal_steps, self.data.length, self.cfg.seed, self.device)
        return functools.partial(self.net, attn_mask=mask)

    def step(self, step: int) -> StepResult:
        """Optimizer step ``step`` (0-based): the global batch and its noise drawn at once (low-discrepancy
        over all of it), sliced per micro-batch and process, so the estimator does not depend on the
        number of processes; gradients accumulated, clipped, applied; the EMA updated."""
        lr = learning_rate(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.net.train()
        total = torch.zeros((), device=self.device)
        self.objective.before_step(step, self.model)
        batch = self.data.sample(self.data_rng, self.global_batch)
        noise = self.objective.draw_noise(batch, self.noise_gen)
        net = self.network_at(step)
        for micro in range(self.accum):
            rows = local_rows(self.world, self.micro_batch, micro)
            part = batch.rows(rows).to(self.device)
            part_noise = None if noise is None else noise.rows(rows).to(self.device)
            with grad_sync(self.net, micro == self.accum - 1), autocast(self.amp, self.device):
                loss = self.objective.loss(net, part, part_noise).mean() / self.accum
                loss.backward()
            total += loss.detach()
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        loss_value = all_reduce_mean(total, self.world).item()
        if not math.isfinite(loss_value):
            raise OptionError("lr", "training diverged at step {_step} (loss {_loss}); lower {lr} or use {precision} fp32", _step=step + 1,
                              _loss=loss_value)
        return StepResult(loss_value, float(grad_norm), lr)

    def validate(self, held_out: Batch) -> LikelihoodResult:
        """The objective's bound on the held-out rows, by the trained (not the EMA) weights."""
        self.net.eval()
        with autocast(self.amp, self.device):
            return self.objective.validate(self.model, held_out, self.cfg.batch_size)
