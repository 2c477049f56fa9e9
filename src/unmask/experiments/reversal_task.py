"""The controlled reversal task: random token pairs seen in one order, asked in the other.

Tokens are plain symbols: ``e0 .. e{M-1}`` (entities), the relation ``r`` and a second relation
``r'``, plus EOS and PAD (and MASK after them). A seed draws ``pairs`` pairs (A_i, B_i) and
``inverse_pairs`` further pairs (C_j, D_j), all entities distinct, so M = 2 (pairs + inverse_pairs).
The training documents, and nothing else, are

* ``A_i r B_i`` for every pair (the forward facts), and
* ``D_j r' C_j`` for every inverse pair: the inverse relation, shown on OTHER entities only, so
  that ``r'`` can mean "reversed" to the model without any A_i ever following a B_i.

A fact stands between two EOS in training (the separator before it and the EOS that ends it, in
a packed stream and in a one-fact row alike), so a question is laid out as a fact is:
``[EOS, x, y, z, EOS]`` with one MASK. The questions of pair i (:func:`questions`):

* ``forward``:   ``A_i r [M]``   -> B_i, ranked among all B (the order trained, both models);
* ``infill``:    ``[M] r B_i``   -> A_i, ranked among all A (the MDM's masked training
  conditional; an AR model cannot condition on the right and is not asked);
* ``reverse``:   ``B_i r [M]``   -> A_i, ranked among all A: the reversed query with the SAME
  relation token, as Shin et al. (2026) pose it ("A is B" learned, "B is [M]" asked). A_i never
  follows B_i in training; an MDM can still answer if the evidence "B_i goes with A_i", stored by
  the infill conditional, is read at the other relative position (their forward-reverse coupling);
* ``reverse_r2``: ``B_i r' [M]`` -> A_i: the reversed query with the second relation token, which
  the model has never seen when ``inverse_pairs`` is 0, and otherwise knows only from the inverse
  pairs (the Berglund et al. / SMDM layout: a relation whose surface form says "reversed").

Chance for every question is 1 / pairs (top-1 among the ``pairs`` candidates of the asked kind).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.data.tokenizer import EOS, MASK, PAD, Tokenizer
from unmask.device import device_of

RELATION, INVERSE = "r", "r'"
DIRECTIONS = ("forward", "infill", "reverse", "reverse_r2")


@dataclass(frozen=True)
class Task:
    """A draw of the task: entity indices of the forward pairs (A_i, B_i) and of the inverse pairs (C_j, D_j)."""

    pairs: tuple[tuple[int, int], ...]
    inverse: tuple[tuple[int, int], ...]

    @property
    def entities(self) -> int:
        return 2 * (len(self.pairs) + len(self.inverse))


def make_task(pairs: int, inverse_pairs: int, seed: int) -> Task:
    """``pairs`` forward and ``inverse_pairs`` inverse pairs of distinct entities, from ``seed`` only."""
    n = 2 * (pairs + inverse_pairs)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    forward = tuple((order[2 * i], order[2 * i + 1]) for i in range(pairs))
    inverse = tuple((order[2 * i], order[2 * i + 1]) for i in range(pairs, pairs + inverse_pairs))
    return Task(forward, inverse)


def tokenizer(task: Task) -> Tokenizer:
    """A word-level tokenizer over the task's symbols: EOS 0, PAD 1, ``r`` 2, ``r'`` 3, ``e<k>`` 4 + k, MASK last."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {EOS: 0, PAD: 1, RELATION: 2, INVERSE: 3, **{f"e{k}": 4 + k for k in range(task.entities)}}
    vocab[MASK] = len(vocab)
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=PAD))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([EOS, PAD, MASK])
    return Tokenizer(hf, f"reversal-{task.entities}")


def documents(task: Task) -> list[str]:
    """One document per fact: ``e<A> r e<B>`` per forward pair, ``e<D> r' e<C>`` per inverse pair."""
    return [f"e{a} {RELATION} e{b}" for a, b in task.pairs] + [f"e{d} {INVERSE} e{c}" for c, d in task.inverse]


def prepare(folder: Path, task: Task, repeats: int, context_len: int, seed: int) -> Path:
    """A prepared data folder (made once): train = every document ``repeats`` times, shuffled by ``seed``;
    val = the documents in order, repeated until it holds at least 4 windows of ``context_len + 1`` tokens."""
    from unmask.data import prepare_dataset

    if (folder / "meta.json").is_file():
        return folder
    docs = documents(task)
    train = docs * repeats
    random.Random(seed).shuffle(train)
    val = docs * math.ceil(4 * (context_len + 1) / (4 * len(docs)))
    return prepare_dataset(folder, tokenizer(task), train, val, progress=False)


@dataclass(frozen=True)
class Questions:
    """The questions of one direction: ``rows`` (N, 5) ids ``[EOS, x, y, z, EOS]`` with MASK at ``slot``,
    the ``answers`` (N,) ids and the ``candidates`` (C,) ids they are ranked among."""

    rows: torch.Tensor
    slot: int
    answers: torch.Tensor
    candidates: torch.Tensor


def questions(task: Task, tok: Tokenizer) -> dict[str, Questions]:
    """The four directions of the module docstring, one question per forward pair each."""
    def ids(entities) -> torch.Tensor:
        return torch.tensor([tok.hf.token_to_id(f"e{k}") for k in entities])

    a, b = ids(p[0] for p in task.pairs), ids(p[1] for p in task.pairs)
    eos, mask, r, r2 = (torch.full_like(a, tok.hf.token_to_id(s)) for s in (EOS, MASK, RELATION, INVERSE))
    return {
        "forward": Questions(torch.stack([eos, a, r, mask, eos], 1), 3, b, b),
        "infill": Questions(torch.stack([eos, mask, r, b, eos], 1), 1, a, a),
        "reverse": Questions(torch.stack([eos, b, r, mask, eos], 1), 3, a, a),
        "reverse_r2": Questions(torch.stack([eos, b, r2, mask, eos], 1), 3, a, a),
    }


@torch.no_grad()
def slot_logprobs(model, q: Questions) -> torch.Tensor:
    """log p(token at the MASK slot | the row) (N, vocab) in float64. An MDM: the denoiser at the slot
    (the exact conditional, one position masked); an AR model: the next-token distribution after the
    tokens before the slot (its only conditional: what follows the slot is not seen)."""
    rows = q.rows.to(device_of(model))
    if model.config.causal:
        logits = model(rows[:, : q.slot])[:, -1]
    else:
        logits = model(rows)[:, q.slot]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def score(logp: torch.Tensor, q: Questions) -> dict[str, float]:
    """Metrics of one direction from its log-probabilities (N, vocab): ``top1`` (the answer scores
    strictly above every other candidate), ``mean_rank`` (candidates scoring at least as high as the
    answer, itself included: a tie counts against it, so chance is never flattered), ``logp``
    (mean log p(answer), normalised over the whole vocabulary) and ``logp_candidates`` (normalised
    over the candidates only: chance is -log C), plus ``correct`` (the count of top-1 answers)."""
    cand = logp[:, q.candidates]  # (N, C)
    own = logp.gather(1, q.answers[:, None])  # (N, 1)
    rank = (cand >= own).sum(dim=1)
    top1 = (rank == 1).double()
    within = own.squeeze(1) - torch.logsumexp(cand, dim=1)
    return {"top1": float(top1.mean()), "correct": int(top1.sum()), "mean_rank": float(rank.double().mean()),
            "logp": float(own.mean()), "logp_candidates": float(within.mean())}
