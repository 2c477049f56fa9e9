"""Block diffusion (BD3-LM): each block of L' tokens denoised given the clean earlier blocks.
docs/algorithms.md, 'Block diffusion (BD3-LM)'; the maths is in :mod:`unmask.block_diffusion`.

The network is block-causal (``ModelConfig.block_causal = L'``) and time-agnostic. Each block of
the last L tokens of a window gets its own time t (or k), clipped to ``[mask_rate_min,
mask_rate_max]`` for a lower-variance gradient; the held-out bound always integrates over the full
range (``block_elbo``), whatever the training clip.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from unmask.block_diffusion import BlockCorruption, bd3_loss, block_elbo, check_block_size, corrupt_blocks, flex_available
from unmask.config import TrainConfig
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError
from unmask.likelihood import LikelihoodResult
from unmask.objectives.base import VALIDATION_SEED, Batch, Objective
from unmask.objectives.registry import register


@register
class BlockDiffusion(Objective):
    name = "bd3"
    defaults = {"lr": 2e-3, "loss": "t-dce"}  # one t per block

    @classmethod
    def network(cls, train: TrainConfig) -> dict[str, Any]:
        return {"causal": False, "block_causal": train.block.size}

    def check(self, tokenizer: Tokenizer, data_dir: Path, device: torch.device) -> None:
        super().check(tokenizer, data_dir, device)
        block, model = self.train.block, self.model
        check_block_size(model.context_len, block.size)
        if block.flex_attention and (not flex_available() or device.type != "cuda"):
            raise OptionError(
                "flex_attention", "{flex_attention} needs torch.nn.attention.flex_attention on a CUDA device (here: {_device}; "
                "FlexAttention has no backward on CPU); leave the flag out to use SDPA with a boolean mask", _device=device,
            )
        if model.block_causal != block.size or model.time_conditioning:
            raise OptionError(
                "block_size", "{objective} bd3 {block_size} {_size} needs a time-agnostic model with block_causal={_size} "
                "(got block_causal={_causal}, time_conditioning={_time})", _size=block.size, _causal=model.block_causal,
                _time=model.time_conditioning,
            )

    def draw_noise(self, batch: Batch, generator: torch.Generator) -> BlockCorruption:
        x0, block, cfg, clip = batch.tokens[:, 1:], self.train.block, self.train, (self.train.block.mask_rate_min, self.train.block.mask_rate_max)
        noise = corrupt_blocks(x0, block.size, self.schedule, self.model.mask_id, generator, clip, low_discrepancy=cfg.low_discrepancy,
                               estimator=cfg.loss)
        return dataclasses.replace(noise, flex=block.flex_attention)

    def loss(self, model, batch: Batch, noise: BlockCorruption) -> torch.Tensor:
        return bd3_loss(model, batch.tokens[:, 1:], noise)

    def validate(self, model, held_out: Batch, batch_size: int) -> LikelihoodResult:
        # the unbiased bound: the full t range, whatever the training clip
        return block_elbo(model, held_out.tokens[:, 1:], self.train.block.size, draws=self.train.eval_draws, schedule=self.schedule,
                          batch_size=batch_size, seed=VALIDATION_SEED, estimator=self.train.loss)
