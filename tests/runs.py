"""Small runs that several tests start from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unmask.checkpoint import load_weights
from unmask.config import ModelConfig, TrainConfig
from unmask.train import train


def finetune_source(tmp_path: Path, data: Path) -> tuple[Path, Path]:
    """A one-step MDM run to fine-tune, and four prompt/response pairs: (run folder, pairs file)."""
    source = tmp_path / "source"
    train(source, ModelConfig(vocab_size=512, context_len=32, n_layer=1, n_head=2, n_embd=32),
          TrainConfig(steps=1, batch_size=2, precision="fp32"), data, device="cpu", progress=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(4)))
    return source, pairs


def assert_resume_is_exact(root: Path, model: ModelConfig, cfg: TrainConfig, data: Path, stop_after: int = 5):
    """Train ``cfg`` whole (root/full) and stopped after ``stop_after`` steps then resumed (root/split):
    the losses and the final weights must be the same. Returns the whole run's result."""
    full = train(root / "full", model, cfg, data, progress=False)
    first = train(root / "split", model, cfg, data, progress=False, stop_after=stop_after)
    second = train(root / "split", model, cfg, data, resume=True, progress=False)
    assert first.losses + second.losses == full.losses
    a, _, _ = load_weights(root / "full")
    b, _, _ = load_weights(root / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    return full
