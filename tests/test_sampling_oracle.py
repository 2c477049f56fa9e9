"""Samplers against the exact distribution of an enumerable toy model (chi-square at fixed seeds)."""

import pytest
import torch
from scipy.stats import chisquare

from unmask.oracle import OracleModel, chi_square_counts
from unmask.sampling import ARConfig, AncestralConfig, ancestral, ar_sample, exponential_race


def pvalue(oracle: OracleModel, samples: torch.Tensor) -> float:
    observed, expected = chi_square_counts(oracle, samples)
    return chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.fixture(scope="module")
def oracle():
    # concentration 1: every one of the 81 sequences has an expected count of a few or more
    return OracleModel.random(vocab_size=3, length=4, concentration=1.0, seed=1)


def test_ancestral_reproduces_the_distribution(oracle):
    """Many steps (n >> L): at most one token unmasks per step almost surely, the chain is exact."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((8000, 4), oracle.config.mask_id)
    out = ancestral(oracle, x, gen, AncestralConfig(steps=256))
    assert out.nfe == 256 and out.steps == 256
    assert (out.tokens != oracle.config.mask_id).all()
    assert pvalue(oracle, out.tokens) > 1e-3


def test_few_step_ancestral_is_detectably_biased(oracle):
    """With 2 steps several tokens unmask together from factorised marginals: the test must see it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((8000, 4), oracle.config.mask_id)
    out = ancestral(oracle, x, gen, AncestralConfig(steps=2))
    assert pvalue(oracle, out.tokens) < 1e-6


def test_ancestral_keeps_prompt_and_samples_the_conditional(oracle):
    gen = torch.Generator().manual_seed(1)
    m = oracle.config.mask_id
    x = torch.tensor([[2, m, m, 0]] * 6000)
    out = ancestral(oracle, x, gen, AncestralConfig(steps=128))
    assert (out.tokens[:, 0] == 2).all() and (out.tokens[:, 3] == 0).all()
    # exact conditional over the two free positions given x1 = 2, x4 = 0
    consistent = (oracle.seqs[:, 0] == 2) & (oracle.seqs[:, 3] == 0)
    p = oracle.probs[consistent] / oracle.probs[consistent].sum()
    idx = {tuple(s.tolist()): i for i, s in enumerate(oracle.seqs[consistent])}
    counts = torch.zeros(len(idx), dtype=torch.float64)
    for row in out.tokens.tolist():
        counts[idx[tuple(row)]] += 1
    assert chisquare(counts.numpy(), (p * len(out.tokens)).numpy()).pvalue > 1e-3


def test_ancestral_temperature_zero_is_deterministic(oracle):
    m = oracle.config.mask_id
    x = torch.full((4, 4), m)
    a = ancestral(oracle, x, torch.Generator().manual_seed(0), AncestralConfig(steps=4, temperature=0.0)).tokens
    b = ancestral(oracle, x, torch.Generator().manual_seed(0), AncestralConfig(steps=4, temperature=0.0)).tokens
    assert torch.equal(a, b)


def test_ar_sampler_reproduces_the_distribution(oracle):
    causal = OracleModel(oracle.probs, 3, 4, causal=True)
    gen = torch.Generator().manual_seed(0)
    out = ar_sample(causal, torch.zeros((8000, 1), dtype=torch.long), gen, ARConfig(max_new_tokens=4, kv_cache=False))
    assert out.nfe == 4 and out.tokens.shape == (8000, 5)
    assert pvalue(oracle, out.tokens[:, 1:]) > 1e-3


def test_exponential_race_matches_categorical_probabilities():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    n = 1_000_000
    counts = torch.bincount(exponential_race(p.log().expand(n, 4), gen), minlength=4).double()
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
