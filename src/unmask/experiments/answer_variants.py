"""Ways of asking a trained model a question, beside the standard ones of :mod:`unmask.experiments.answers`.

An evaluation can hide or create a difference between an MDM and an AR model. The variants:

* the chain-rule ORDER that scores log p(answer | prompt) for an MDM: ``left-to-right`` (the
  standard, exact), ``right-to-left`` (exact, the answer's last token decoded first), or
  ``any-order``: the MDM's own bound, the mean over uniformly random decoding orders, which is
  k-DCE restricted to the answer (:func:`unmask.likelihood.conditional_elbo`; docs/algorithms.md,
  'MDM loss: t-DCE and k-DCE'); a Monte Carlo estimate with ``draws`` draws. For a uniformly
  random order sigma of n positions, the expected chain-rule log-likelihood
  E_sigma sum_j log p(x_sigma(j) | x_sigma(<j)) equals sum_k (1/k) E_{|M|=k} sum_{i in M} log p(x_i | x without M),
  the bound an MDM is trained on (Hoogeboom et al., "Autoregressive Diffusion Models");
* the CANVAS the answer is scored on: ``eos`` ([EOS ; prompt ; answer], the standard),
  ``no-eos`` (no leading separator), or ``closed`` (the answer followed by the given tokens of
  the fact's end, "." and EOS, as every training sentence ends; an MDM then sees where the answer stops);
* exact match with the answer's length TOLD (the standard: the canvas holds exactly its tokens)
  or not (:func:`complete_untold`: ``slack`` further positions; the answer is the decoded text
  before the first EOS or full stop). An AR model is never told the length by its decoding, only by where
  the comparison stops, so "not told" asks both models the same question.
"""

from __future__ import annotations

import torch

from unmask.device import device_of
from unmask.errors import not_one_of
from unmask.experiments.answers import _groups, complete
from unmask.guidance import guided_logits
from unmask.likelihood import chain_rule, conditional_elbo

ORDERS = ("left-to-right", "right-to-left", "any-order")
CANVASES = ("eos", "no-eos", "closed")


@torch.no_grad()
def right_to_left(model, tokens: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """Exact log-likelihood (B,) float64 of the scored positions of tokens (B, L), decoded from the
    rightmost scored position to the leftmost, one per network call; the other positions are context.
    The mirror of :func:`unmask.likelihood.chain_rule`'s left-to-right order."""
    score_mask = score_mask.bool()
    ranks = score_mask.flip(1).long().cumsum(dim=1).flip(1) - 1  # 0 at the rightmost scored position
    x = torch.where(score_mask, torch.full_like(tokens, model.config.mask_id), tokens)
    scored = torch.where(score_mask, tokens, 0)
    logprob = torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    for j in range(int(score_mask.sum(dim=1).max().item()) if tokens.numel() else 0):
        logits = guided_logits(model, x, ~score_mask, 0.0).double()
        now = score_mask & (ranks == j)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, scored[..., None]).squeeze(-1)
        logprob += (logp * now).sum(dim=1)
        x = torch.where(now, tokens, x)
    return logprob


def _rows(pairs: list[tuple[list[int], list[int]]], eos: int, canvas: str, closing: list[int]) -> list[tuple[list[int], int]]:
    """Each pair's row on the ``canvas`` and the column of its answer's first token."""
    lead = [] if canvas == "no-eos" else [eos]
    tail = closing if canvas == "closed" else []
    return [([*lead, *p, *a, *tail], len(lead) + len(p)) for p, a in pairs]


@torch.no_grad()
def score_answers(model, pairs: list[tuple[list[int], list[int]]], eos: int, order: str = "left-to-right", canvas: str = "eos",
                  closing: list[int] = (), draws: int = 16, seed: int = 0, batch_size: int = 64) -> list[float]:
    """log p(answer | prompt) in nats per (prompt ids, answer ids) pair, on ``canvas`` (``closing``: the
    tokens after the answer of the "closed" canvas) in ``order`` (an AR model: always its own, exact,
    left to right). "any-order" is a Monte Carlo lower bound (``draws`` draws, a generator seeded ``seed``)."""
    if order not in ORDERS:
        raise not_one_of("order", order, ORDERS)
    if canvas not in CANVASES:
        raise not_one_of("canvas", canvas, CANVASES)
    dev, causal = device_of(model), model.config.causal
    rows = _rows(pairs, eos, canvas, list(closing))
    out = [0.0] * len(pairs)
    generator = torch.Generator().manual_seed(seed)
    for _, idx in _groups([len(r) for r, _ in rows]).items():
        for start in range(0, len(idx), batch_size):
            batch = idx[start : start + batch_size]
            x = torch.tensor([rows[i][0] for i in batch], device=dev)
            scored = torch.zeros_like(x, dtype=torch.bool)
            for r, i in enumerate(batch):
                scored[r, rows[i][1] : rows[i][1] + len(pairs[i][1])] = True
            if causal:
                logp = torch.log_softmax(model(x[:, :-1]).double(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
                values = (logp * scored[:, 1:]).sum(dim=1)
            elif order == "left-to-right":
                values = chain_rule(model, x, score_mask=scored).logprob
            elif order == "right-to-left":
                values = right_to_left(model, x, scored)
            else:
                values = conditional_elbo(model, x, scored, draws=draws, generator=generator)[0]
            for r, i in enumerate(batch):
                out[i] = float(values[r])
    return out


def answer_text(ids: list[int], eos: int, decode) -> str:
    """The answer a decoded region holds: its text before the first EOS, cut at the first full stop."""
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return decode(ids).split(".")[0].strip()


def complete_untold(model, prompts: list[list[int]], lengths: list[int], eos: int, decode, slack: int = 4) -> list[str]:
    """The greedy answers (text, :func:`answer_text`) decoded on ``lengths[i] + slack`` positions after
    each prompt, so that the length of the answer is not given (:func:`unmask.experiments.answers.complete`)."""
    fills = complete(model, prompts, [n + slack for n in lengths], eos)
    return [answer_text(ids, eos, decode) for ids in fills]
