"""Held-out perplexity of a checkpoint: MDM ELBO bound with its Monte Carlo SE, AR exact.

Both models are scored on the same tokens: the consecutive context-length windows of a split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unmask.checkpoint import load_model
from unmask.data import TokenDataset, default_dataset
from unmask.device import pick_device
from unmask.errors import UnmaskError
from unmask.likelihood import ar_nll, mc_elbo, previous_tokens
from unmask.schedule import Schedule


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    split: str = "val",
    windows: int | None = None,
    draws: int = 32,
    estimator: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Likelihood of a run/checkpoint on ``split`` of a prepared data folder.

    ``data`` defaults to the folder the run was trained on (else the embedded corpus). Returns
    the JSON-ready dict documented in the README (``unmask eval --json``).
    """
    if split not in ("val", "train"):
        raise UnmaskError(f"--split {split!r} is not one of: val, train")
    model, cfg = load_model(checkpoint, pick_device(device))
    if data is None:
        data = cfg.data_dir if cfg.data_dir and Path(cfg.data_dir).exists() else default_dataset()
    dataset = TokenDataset(data, split)
    if cfg.tokenizer_fingerprint and dataset.tokenizer.fingerprint != cfg.tokenizer_fingerprint:
        raise UnmaskError(f"--data {data} was tokenised with a different tokenizer than {checkpoint}; prepare it with the checkpoint's tokenizer.json")
    w = torch.from_numpy(dataset.eval_windows(cfg.model.context_len, windows))
    if cfg.model.causal:
        result = ar_nll(model, w, previous_tokens(w, dataset.tokenizer.eos_id), batch_size=batch_size, progress=progress)
    else:
        result = mc_elbo(
            model, w, draws=draws, estimator=estimator or cfg.train.loss, schedule=Schedule(cfg.train.schedule),
            batch_size=batch_size, seed=seed, progress=progress,
        )
    return {"checkpoint": str(checkpoint), "objective": cfg.train.objective, "split": split, "data": str(data), **result.to_dict()}


def format_likelihood(res: dict) -> str:
    """One line for a result of :func:`evaluate_checkpoint`."""
    if res["kind"] == "elbo":
        return (
            f"MDM  {res['nats_per_token']:.4f} +- {res['stderr']:.4f} nats/token   perplexity <= {res['perplexity']:.2f} +- {res['perplexity_stderr']:.2f}"
            f"   ({res['num_tokens']:,} tokens, {res['draws']} draws, {res['estimator']})"
        )
    return f"AR   {res['nats_per_token']:.4f} nats/token             perplexity  = {res['perplexity']:.2f}           ({res['num_tokens']:,} tokens, exact)"
