"""An AR model as the starting point of an MDM (``unmask train --objective mdm --init-from ...``).

Two published recipes, usable together:

* Keep the shift (Dream, Ye et al. 2025): the MDM's logits for position i come from the hidden
  state at i - 1 (``ModelConfig.shift_logits``), so every output keeps the role it had in the AR
  model, predicting the token after its position.
* Anneal the attention mask (DiffuLLaMA, Gong et al. 2024): training starts with the causal mask
  and, over ``anneal_steps``, lets each query see a growing random fraction (step / anneal_steps)
  of the positions after it, until attention is fully bidirectional. Validation always uses the
  bidirectional network, the model being trained.

With the causal mask and the shift, the initialised MDM computes exactly the AR model's logits
(one position later), so training starts from the AR model's predictions rather than from noise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from unmask.config import ModelConfig, RunConfig
from unmask.errors import OptionError

# fields that may differ between the AR source and the MDM initialised from it
_ADAPTED = ("name", "causal", "shift_logits", "context_len", "block_causal", "labels")


def source_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a run/checkpoint folder or a published checkpoint folder, without reading its weights."""
    from safetensors import safe_open

    from unmask.checkpoint import resolve_checkpoint

    path = Path(path)
    if not path.exists():
        raise OptionError("init_from", "{init_from} {_path!r} does not exist; pass a run folder or a LLaMA/Qwen2/Mistral/LLaDA/Dream folder",
                          _path=str(path))
    if (path / "checkpoints").is_dir() or (path / "trainer.json").is_file():
        ckpt = resolve_checkpoint(path)
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            return RunConfig.from_dict(json.loads((f.metadata() or {})["config"])).model
    from unmask.interop.hf_import import Conversion

    return Conversion(path).config


def adapted_config(source: ModelConfig, keep_shift: bool, context_len: int | None = None) -> ModelConfig:
    """The MDM network of an AR ``source``: bidirectional, with or without the logit shift."""
    if source.time_conditioning:
        raise OptionError("init_from", "{init_from}: the source network is time-conditioned; adapt a time-agnostic model")
    return dataclasses.replace(
        source, causal=False, shift_logits=keep_shift, context_len=context_len or source.context_len
    )


def initial_weights(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of ``path`` for the network ``config`` (which may differ from the source only in
    its attention pattern (causal, block-causal), the logit shift, name and context length, or be a
    classifier with other labels: its heads are then left out, the new label head is the caller's)."""
    from unmask.interop.hf_import import load_pretrained

    model = load_pretrained(path)
    src = model.config
    differ = [f for f in dataclasses.fields(ModelConfig) if f.name not in _ADAPTED and getattr(src, f.name) != getattr(config, f.name)]
    if differ:
        shown = ", ".join(f"{f.name} (source {getattr(src, f.name)!r}, this run {getattr(config, f.name)!r})" for f in differ)
        raise OptionError("init_from", "{init_from} {_path}: the network differs from the one to train: {_shown}", _path=path, _shown=shown)
    if src.labels != config.labels:  # a classifier on a language model's body (unmask.objectives.classifier)
        return {name: value for name, value in model.state_dict().items() if not name.startswith(("head.", "label_head."))}
    return model.state_dict()


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Fraction of the future positions a query may see at ``step``: 0 (causal) rising linearly to 1."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def annealed_mask(step: int, anneal_steps: int, length: int, seed: int, device=None) -> torch.Tensor | None:
    """(L, L) bool attention mask at ``step`` (True: may attend), or None once fully bidirectional.

    Causal positions are always visible; each future one is visible with probability
    :func:`anneal_ratio`, drawn from a stream that depends only on (seed, step), so a resumed
    run sees the same masks.
    """
    ratio = anneal_ratio(step, anneal_steps)
    if ratio >= 1.0:
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    future = torch.rand(length, length, generator=gen) < ratio
    return (causal | future).to(device)
