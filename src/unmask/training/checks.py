"""The checks a run passes before it trains: the model fits the data and the objective (and the device)."""

from __future__ import annotations

from pathlib import Path

import torch

from unmask.config import ModelConfig
from unmask.errors import UnmaskError
from unmask.objectives import Objective
from unmask.training.data import PairData, WindowData


def check_run(objective: Objective, model_cfg: ModelConfig, data: WindowData | PairData, data_dir: Path, device: torch.device) -> None:
    """Refuse a model whose vocabulary is not the data's, that the objective cannot train (its network, its
    MASK id; :meth:`Objective.check`), or whose context is shorter than the data's rows (pairs)."""
    tokenizer = data.tokenizer
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise UnmaskError(
            f"model vocab_size={model_cfg.vocab_size} but the data in {data_dir} was made with a {tokenizer.vocab_size}-token tokenizer"
        )
    objective.check(tokenizer, data_dir, device)
    if data.length > model_cfg.context_len:  # windows are the context's length; pair rows are their own
        raise UnmaskError(f"the pairs of {data_dir} are rows of {data.length} tokens, longer than the model's context of {model_cfg.context_len}")
