"""Testing against exact answers: oracle models, enumerable toy distributions with exactly known conditionals.

An :class:`OracleModel` holds a distribution p over all V^L sequences and answers like a network:
``forward(tokens) -> logits`` with, at each position, the exact log p(x_i | unmasked part)
(bidirectional, for MDM samplers and likelihoods) or log p(x_{i+1} | x_<=i) (causal, for AR);
:class:`BlockOracle` does the same for a block model. Samplers, likelihood estimators and
objectives are tested against these exact answers, not against themselves: the project's tests
use them, and a new sampler or objective is tested the same way (docs/extending.md, docs/correctness.md).
:func:`chi_square_counts` compares samples with the oracle's distribution; :func:`exact_nats_per_token`
and :func:`cross_entropy_per_token` give the exact scores an estimator must match.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import nn

from unmask.config import ModelConfig
from unmask.errors import UnmaskError
from unmask.model import at_positions

_NEG = -1e30  # log of zero probability, finite so that softmax never sees all -inf


class OracleModel(nn.Module):
    """Exact conditionals of ``probs`` (V^L,) over the sequences ``itertools.product(range(V), repeat=L)``.

    ``time_conditioning=True`` makes it a time-conditioned network: it must be called with t (B,)
    and appends every t to ``times``. Its answers do not depend on t, as the exact conditionals of
    a masked model do not (RADD), so a test can check both the samples and the times a sampler uses.
    """

    def __init__(self, probs: torch.Tensor, vocab_size: int, length: int, causal: bool = False, time_conditioning: bool = False) -> None:
        super().__init__()
        if probs.numel() != vocab_size**length:
            raise ValueError(f"probs has {probs.numel()} entries, expected V^L = {vocab_size ** length}")
        self.config = ModelConfig(
            name="oracle", vocab_size=vocab_size, context_len=length, n_layer=1, n_head=1, n_embd=2, causal=causal,
            time_conditioning=time_conditioning,
        )
        seqs = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)
        self.register_buffer("seqs", seqs)  # (N, L)
        self.register_buffer("probs", (probs / probs.sum()).double())  # (N,)
        self.register_buffer("onehot", nn.functional.one_hot(seqs, vocab_size).double())  # (N, L, V)
        self.calls = 0
        self.times: list[torch.Tensor] = []  # the t (B,) of every call, when time-conditioned

    @classmethod
    def random(
        cls, vocab_size: int = 3, length: int = 4, concentration: float = 0.5, seed: int = 0, causal: bool = False,
        time_conditioning: bool = False,
    ):
        """A Dirichlet(concentration) draw over all V^L sequences (full support)."""
        gen = torch.Generator().manual_seed(seed)
        gamma = torch._standard_gamma(torch.full((vocab_size**length,), concentration, dtype=torch.float64), generator=gen)
        return cls(gamma.clamp_min(1e-12), vocab_size, length, causal, time_conditioning)

    @classmethod
    def factorised(cls, marginals: torch.Tensor):
        """Independent positions with the given per-position distributions (L, V): every
        conditional is its marginal, so unmasking several positions at once is exact."""
        length, vocab_size = marginals.shape
        seqs = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)
        probs = marginals.double().gather(1, seqs.T).prod(dim=0)
        return cls(probs, vocab_size, length)

    @classmethod
    def uniform(cls, vocab_size: int = 3, length: int = 4, causal: bool = False):
        """Uniform conditionals: a deliberately wrong model for any non-uniform data."""
        return cls(torch.ones(vocab_size**length, dtype=torch.float64), vocab_size, length, causal)

    def entropy(self) -> float:
        """H(p) in nats per sequence."""
        p = self.probs
        return -(p * p.log()).sum().item()

    def index_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Enumeration index of each complete sequence in tokens (B, L) -> (B,)."""
        v, l = self.config.vocab_size, self.config.context_len
        powers = v ** torch.arange(l - 1, -1, -1, device=tokens.device)
        return (tokens * powers).sum(dim=1)

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) of complete sequences (B, L) -> (B,); of prefixes (B, l < L): log p(x_1..x_l)."""
        l = tokens.shape[1]
        if l == self.config.context_len:
            return self.probs[self.index_of(tokens)].log()
        agree = (tokens[:, None, :] == self.seqs[None, :, :l]).all(dim=2)
        return (agree.double() * self.probs).sum(dim=1).log()

    def _marginals(self, consistent: torch.Tensor) -> torch.Tensor:
        """consistent (B, N) bool -> per-position marginals (B, L, V) of p restricted to those sequences."""
        w = consistent.double() * self.probs
        w = w / w.sum(dim=1, keepdim=True)
        return torch.einsum("bn,nlv->blv", w, self.onehot)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None, logits_at: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        """Log-probabilities (B, L, V), or (N, V) at the ``logits_at`` positions (as the Transformer)."""
        self.calls += 1
        if self.config.time_conditioning:
            if t is None:
                raise UnmaskError("this oracle is time-conditioned: pass t (B,)")
            self.times.append(t.detach().double().cpu())
        b, l = tokens.shape
        mask_id = self.config.mask_id
        if not self.config.causal:
            # a sequence is consistent if it agrees with every unmasked position; a shorter input
            # (l < L) is the first l positions of p, the rest marginalised (windows of several lengths)
            agree = (tokens[:, None, :] == self.seqs[None, :, :l]) | (tokens[:, None, :] == mask_id)
            marg = self._marginals(agree.all(dim=2))[:, :l]
        else:
            # AR layout: tokens = [prev, x_1, ..., x_{L-1}]; position i predicts x_{i+1} from x_1..x_i
            # (position 0 holds the token before the sequence, which the toy distribution ignores)
            marg = torch.empty((b, l, self.config.vocab_size), dtype=torch.float64)
            for i in range(l):
                agree = (tokens[:, None, 1 : i + 1] == self.seqs[None, :, :i]).all(dim=2)
                marg[:, i] = self._marginals(agree)[:, i]
        logits = torch.where(marg > 0, marg.log(), torch.full_like(marg, _NEG)).float()
        return logits if logits_at is None else at_positions(logits, logits_at)



class BlockOracle(OracleModel):
    """Exact block conditionals of p for a block-diffusion model with blocks of ``block_size`` tokens.

    Called as a block model is called: over [x_t ; x_0] (B, 2L) (the training / likelihood forward),
    a noisy position of block b gets log p(x_i | clean blocks < b of x_0, unmasked part of block b of
    x_t), the clean half zeros; over a canvas (B, l <= L) (decoding), a position of block b gets
    log p(x_i | unmasked tokens of blocks <= b): what block-causal attention lets it see.
    """

    def __init__(self, probs: torch.Tensor, vocab_size: int, length: int, block_size: int) -> None:
        super().__init__(probs, vocab_size, length)
        if length % block_size:
            raise ValueError(f"block_size {block_size} must divide the length {length}")
        self.config = dataclasses.replace(self.config, block_causal=block_size)

    @classmethod
    def random_blocks(cls, vocab_size: int = 3, length: int = 4, block_size: int = 2, concentration: float = 0.5, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        gamma = torch._standard_gamma(torch.full((vocab_size**length,), concentration, dtype=torch.float64), generator=gen)
        return cls(gamma.clamp_min(1e-12), vocab_size, length, block_size)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None, logits_at: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        self.calls += 1
        b, l = tokens.shape
        length, size, mask_id = self.config.context_len, self.config.block_causal, self.config.mask_id
        paired = l == 2 * length
        width = length if paired else l
        marg = torch.zeros((b, l, self.config.vocab_size), dtype=torch.float64)
        for start in range(0, width, size):
            end = min(start + size, width)
            seen = torch.full((b, width), mask_id, dtype=tokens.dtype)
            if paired:  # clean blocks < b from x_0, block b from x_t
                seen[:, :start] = tokens[:, length : length + start]
                seen[:, start:end] = tokens[:, start:end]
            else:
                seen[:, :end] = tokens[:, :end]
            agree = (seen[:, None, :] == self.seqs[None, :, :width]) | (seen[:, None, :] == mask_id)
            marg[:, start:end] = self._marginals(agree.all(dim=2))[:, start:end]
        if paired:
            logits = torch.where(marg > 0, marg.log(), torch.full_like(marg, _NEG))
            logits[:, length:] = 0.0
        else:
            logits = torch.where(marg > 0, marg.log(), torch.full_like(marg, _NEG))
        logits = logits.float()
        return logits if logits_at is None else at_positions(logits, logits_at)


def exact_nats_per_token(oracle: OracleModel) -> float:
    """The true entropy rate H(p)/L that a tight bound reaches."""
    return oracle.entropy() / oracle.config.context_len


def cross_entropy_per_token(data: OracleModel, model: OracleModel) -> float:
    """E_{x~data}[-log q(x)] / L: what an exact likelihood of ``model`` on ``data`` equals."""
    return -(data.probs * model.probs.log()).sum().item() / data.config.context_len


def chi_square_counts(oracle: OracleModel, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed counts and expected counts over all V^L sequences for samples (S, L)."""
    idx = oracle.index_of(samples.cpu())
    observed = torch.bincount(idx, minlength=oracle.probs.numel()).double()
    expected = oracle.probs.cpu() * samples.shape[0]
    return observed, expected

