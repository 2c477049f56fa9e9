"""Span infilling: what a masked span scores with and without the text to its right.

An MDM conditions on both sides of a masked span; an AR model can only read the left side. For
windows (N, W) of held-out text and a span [start, stop):

* MDM, both sides: exact chain-rule log p(span | left, right), the span decoded left to right
  (:func:`unmask.likelihood.chain_rule` with the span as the scored positions).
* MDM, left only: the same with the right side replaced by MASK, i.e. the MDM without right context.
* AR, left only: the exact log p(span | token before the window, left).

Each row reports nats/token of the span and the fraction of spans in which every token was the
model's top choice given what came before it in that order ("greedy exact").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.data import TokenDataset, Tokenizer
from unmask.errors import UnmaskError
from unmask.likelihood import chain_rule
from unmask.device import device_of
from unmask.sampling.ar import ARConfig, ar_sample
from unmask.sampling.base import Conditioning
from unmask.sampling.confidence import ConfidenceConfig, confidence


@dataclass
class SpanScore:
    """Span log-likelihood of one model/context setting over N spans."""

    setting: str  # e.g. "MDM, both sides"
    nats_per_token: float
    greedy_exact: float  # fraction of spans whose every token was the top choice
    num_spans: int
    span_len: int


def spread_windows(data_dir: str | Path, split: str, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` windows (count, length) spread evenly over the whole split, and the token before
    each (count,): held-out text from every work, not only the first (see TokenDataset.eval_windows)."""
    ds = TokenDataset(data_dir, split)
    return torch.from_numpy(ds.eval_windows(length, count)), torch.from_numpy(ds.eval_previous(length, count))


def _check_span(windows: torch.Tensor, start: int, stop: int) -> None:
    if not 0 < start < stop < windows.shape[1]:
        raise UnmaskError(f"span [{start}, {stop}) must lie strictly inside windows of {windows.shape[1]} tokens (text on both sides)")


def _span_mask(windows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    cols = torch.arange(windows.shape[1], device=windows.device)
    return ((cols >= start) & (cols < stop)).expand_as(windows)


@torch.no_grad()
def mdm_span_logprob(model, windows: torch.Tensor, start: int, stop: int, right_context: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain-rule log p(windows[:, start:stop] | the rest) of an MDM: (logprob (N,) float64, greedy (N,) bool).

    Without ``right_context`` the tokens after the span are MASK (and not scored), so the span is
    conditioned on the left side only.
    """
    _check_span(windows, start, stop)
    x = windows.to(device_of(model))
    if not right_context:
        x = x.clone()
        x[:, stop:] = model.config.mask_id  # hidden context: chain_rule scores only the span
    score = chain_rule(model, x, score_mask=_span_mask(x, start, stop))
    return score.logprob, score.greedy


@torch.no_grad()
def ar_span_logprob(model, windows: torch.Tensor, prev: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(windows[:, start:stop] | prev, windows[:, :start]) of an AR model: (logprob (N,) float64, greedy (N,) bool)."""
    _check_span(windows, start, stop)
    dev = device_of(model)
    # AR layout: input position i predicts the token after it, so [prev ; x_<stop-1] predicts x_<stop
    inputs = torch.cat([prev[:, None], windows[:, : stop - 1]], dim=1).to(dev)
    logits = model(inputs)[:, start:stop].double()
    target = windows[:, start:stop].to(dev)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)
    return logp.sum(dim=1), (logits.argmax(dim=-1) == target).all(dim=1)


def span_scores(mdm, ar, windows: torch.Tensor, prev: torch.Tensor, start: int, stop: int, batch_size: int = 32) -> list[SpanScore]:
    """The three settings of the module docstring on the same spans, in batches of ``batch_size`` windows."""
    settings = {
        "MDM, both sides": lambda w, p: mdm_span_logprob(mdm, w, start, stop, right_context=True),
        "MDM, left only": lambda w, p: mdm_span_logprob(mdm, w, start, stop, right_context=False),
        "AR,  left only": lambda w, p: ar_span_logprob(ar, w, p, start, stop),
    }
    n, span = windows.shape[0], stop - start
    results = []
    for name, fn in settings.items():
        logprob, greedy = 0.0, 0
        for i in range(0, n, batch_size):
            lp, g = fn(windows[i : i + batch_size], prev[i : i + batch_size])
            logprob += lp.sum().item()
            greedy += int(g.sum().item())
        results.append(SpanScore(name, -logprob / (n * span), greedy / n, n, span))
    return results


@torch.no_grad()
def infill_examples(mdm, ar, windows: torch.Tensor, prev: torch.Tensor, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Greedy fills of the span (N, stop - start): the MDM from both sides (confidence decoding at
    temperature 0, one token per call), the AR model from the left only (it cannot see the right)."""
    _check_span(windows, start, stop)
    span = stop - start
    x = windows.clone()
    x[:, start:stop] = mdm.config.mask_id
    x = x.to(device_of(mdm))
    keep = ~_span_mask(x, start, stop)
    mdm_out = confidence(mdm, x, torch.Generator(device=x.device).manual_seed(0), ConfidenceConfig(steps=span, temperature=0.0),
                         Conditioning(prompt_mask=keep))
    left = torch.cat([prev[:, None], windows[:, :start]], dim=1).to(device_of(ar))
    ar_out = ar_sample(ar, left, torch.Generator(device=left.device).manual_seed(0), ARConfig(max_new_tokens=span, temperature=0.0, kv_cache=False))
    return {"true": windows[:, start:stop], "mdm": mdm_out.tokens[:, start:stop].cpu(), "ar": ar_out.tokens[:, -span:].cpu()}


def span_line(tok: Tokenizer, window: list[int], start: int, stop: int, fill: list[int]) -> str:
    """The text line holding the span, with ``fill`` in its place in [brackets]."""
    left = tok.decode(window[:start]).rsplit("\n", 1)[-1]
    right = tok.decode(window[stop:]).split("\n", 1)[0]
    middle = tok.decode(fill).replace("\n", "\\n")
    return f"{left}[{middle}]{right}"
