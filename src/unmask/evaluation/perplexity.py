"""Held-out perplexity of a checkpoint: MDM ELBO bound with its Monte Carlo SE (or the exact
left-to-right chain rule), AR exact. Both models are scored on the same tokens.

Sources: a prepared data folder's split (default: the run's own validation split), local text
files, or a named zero-shot set. Packed: documents joined with EOS and cut into consecutive
context-length windows (each AR window conditioned on the token before it), of which ``windows``
are taken spread evenly over the source. Unpacked: every document alone, in chunks of at most the
context length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.data import TokenDataset, default_dataset, read_documents
from unmask.data.shards import spread
from unmask.device import pick_device
from unmask.errors import OptionError, check_number, not_one_of
from unmask.evaluation.corpora import ZERO_SHOT, detokenizer, packed_windows, unpacked_windows, zero_shot_documents
from unmask.likelihood import LikelihoodResult, ar_nll, chain_rule_nll, mc_elbo
from unmask.schedule import Schedule

ESTIMATORS = ("t-dce", "k-dce", "any-order", "chain-rule")


def score(
    model, config, windows, prev, estimator: str, draws: int, batch_size: int, seed: int, progress: bool
) -> LikelihoodResult:
    """Dispatch to the AR, uniform-state (UDLM) or MDM estimator; windows (N, L) or a list of groups, prev likewise."""
    if config.model.causal:
        return ar_nll(model, windows, prev, batch_size=batch_size, progress=progress)
    if config.model.noise == "uniform":  # udlm, duo: the continuous-time UDLM bound (no MASK, no chain rule)
        from unmask.uniform import udlm_elbo

        if estimator != "t-dce":
            raise OptionError("estimator", "{estimator} {_name}: a uniform-state network (udlm, duo) is scored with t-dce, its "
                              "continuous-time bound", _name=estimator)
        return udlm_elbo(model, windows, draws=draws, schedule=Schedule(config.train.schedule), batch_size=batch_size, seed=seed,
                         progress=progress)
    if config.model.block_causal:  # a block model (bd3): its bound, or its exact block chain rule
        from unmask.block_diffusion import block_chain_rule_nll, block_elbo

        if estimator == "chain-rule":
            return block_chain_rule_nll(model, windows, config.model.block_causal, batch_size=batch_size, progress=progress)
        if estimator not in ("t-dce", "k-dce"):
            raise OptionError("estimator", "{estimator} {_name}: a block model is scored with t-dce or k-dce (its bound) or chain-rule "
                              "(exact, L' calls)", _name=estimator)
        return block_elbo(model, windows, config.model.block_causal, draws=draws, schedule=Schedule(config.train.schedule),
                          batch_size=batch_size, seed=seed, progress=progress, estimator=estimator)
    if estimator == "chain-rule":
        return chain_rule_nll(model, windows, batch_size=batch_size, progress=progress)
    return mc_elbo(model, windows, draws=draws, estimator=estimator, schedule=Schedule(config.train.schedule),
                   batch_size=batch_size, seed=seed, progress=progress)


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
    text: Sequence[str | Path] | None = None,
    dataset: str | None = None,
    detokenize: str = "none",
    packed: bool | None = None,
    limit_documents: int | None = None,
    weights: str = "auto",
) -> dict:
    """Likelihood of a run/checkpoint; returns the JSON-ready dict documented in docs/likelihood.md.

    ``data``/``split``: a prepared folder (default: the run's own data, else the embedded corpus).
    ``text``: local .txt/.jsonl files instead; ``dataset``: a named zero-shot set instead (online).
    ``estimator`` (MDM): t-dce, k-dce, any-order (ELBO bounds) or chain-rule (exact, L calls).
    """
    if estimator is not None and estimator not in ESTIMATORS:
        raise not_one_of("estimator", estimator, ESTIMATORS)
    for name, value, rule in (("windows", windows, "> 0"), ("limit_documents", limit_documents, "> 0"),
                              ("draws", draws, ">= 2"), ("batch_size", batch_size, "> 0")):
        check_number(name, value, rule)
    model, cfg = load_model(checkpoint, pick_device(device), weights=weights)  # weights: auto (EMA when kept), ema or raw
    estimator = estimator or cfg.train.loss
    length = cfg.model.context_len
    if text or dataset:
        tok = checkpoint_tokenizer(checkpoint)
        if dataset:
            docs = list(zero_shot_documents(dataset, limit_documents))
            packed = ZERO_SHOT[dataset].packed if packed is None else packed
            source = f"zero-shot:{dataset}"
        else:
            detok = detokenizer(detokenize)
            docs = [detok(d) for d in read_documents(text)][:limit_documents]
            source = ",".join(str(t) for t in text)
        packed = True if packed is None else packed
        if packed:
            arr, before = packed_windows(docs, tok, length)
            keep = spread(len(arr), windows)  # --windows N: spread over the text like a split's
            w, prev = torch.from_numpy(arr[keep]), torch.from_numpy(before[keep])
        else:
            groups = [torch.from_numpy(g) for g in unpacked_windows(docs, tok, length)]
            w, prev = groups, [torch.full((g.shape[0],), tok.eos_id) for g in groups]
    else:
        if split not in ("val", "train"):
            raise not_one_of("split", split, "val, train")
        if data is None:
            data = cfg.data_dir if cfg.data_dir and Path(cfg.data_dir).exists() else default_dataset()
        ds = TokenDataset(data, split)
        if cfg.tokenizer_fingerprint and ds.tokenizer.fingerprint != cfg.tokenizer_fingerprint:
            raise OptionError("data", "{data} {_data} was tokenised with a different tokenizer than {_checkpoint}; prepare it with the "
                              "checkpoint's tokenizer.json", _data=data, _checkpoint=checkpoint)
        w = torch.from_numpy(ds.eval_windows(length, windows))
        prev = torch.from_numpy(ds.eval_previous(length, windows))
        source, packed = f"{data}:{split}", True
    result = score(model, cfg, w, prev, estimator, draws, batch_size, seed, progress)
    return {"checkpoint": str(checkpoint), "objective": cfg.train.objective, "source": source, "packed": packed, **result.to_dict()}


def format_likelihood(res: dict) -> str:
    """One line for a result of :func:`evaluate_checkpoint`."""
    who = {"ar": "AR ", "udlm": "UDLM", "duo": "Duo"}.get(res["objective"], "MDM")
    if res["kind"] == "elbo":
        return (
            f"{who}  {res['nats_per_token']:.4f} +- {res['stderr']:.4f} nats/token   perplexity <= {res['perplexity']:.2f} +- {res['perplexity_stderr']:.2f}"
            f"   ({res['num_tokens']:,} tokens, {res['draws']} draws, {res['estimator']})"
        )
    return f"{who}  {res['nats_per_token']:.4f} nats/token             perplexity  = {res['perplexity']:.2f}           ({res['num_tokens']:,} tokens, exact, {res['estimator']})"
