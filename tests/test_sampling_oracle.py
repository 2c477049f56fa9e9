"""Samplers against the exact distribution of an enumerable toy model (chi-square at fixed seeds)."""

import pytest
import torch
from scipy.stats import beta, chisquare, kstest

from unmask.testing import OracleModel, chi_square_counts
from unmask.sampling import ARConfig, AncestralConfig, FirstHittingConfig, ancestral, ar_sample, exponential_race, first_hitting
from unmask.sampling.base import categorical
from unmask.sampling.shapes import decode_shapes
from unmask.schedule import Schedule


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


@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_few_step_ancestral_is_detectably_biased(oracle, shapes):
    """With 2 steps several tokens unmask together from factorised marginals: the test must see it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((8000, 4), oracle.config.mask_id)
    with decode_shapes(shapes):
        out = ancestral(oracle, x, gen, AncestralConfig(steps=2))
    assert pvalue(oracle, out.tokens) < 1e-6


@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_ancestral_keeps_prompt_and_samples_the_conditional(oracle, shapes):
    """Also with static shapes (:mod:`unmask.sampling.shapes`): every row and position each call, the prompt kept by masks."""
    gen = torch.Generator().manual_seed(1)
    m = oracle.config.mask_id
    x = torch.tensor([[2, m, m, 0]] * 6000)
    with decode_shapes(shapes):
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


def test_ancestral_temperature_zero_commits_the_argmax(oracle):
    """Temperature 0: every token that unmasks is the argmax of the exact conditional given the state
    before its step (which positions unmask when stays random)."""
    m = oracle.config.mask_id
    before = torch.full((64, 4), m)
    states = []
    out = ancestral(oracle, before, torch.Generator().manual_seed(0), AncestralConfig(steps=4, temperature=0.0), callback=states.append)
    assert (out.tokens != m).all()
    committed = 0
    for state in states:
        new = (before == m) & (state.tokens != m)
        argmax = oracle(before).argmax(dim=-1)
        assert torch.equal(state.tokens[new], argmax[new])
        committed += new.sum().item()
        before = state.tokens
    assert committed == 64 * 4


@pytest.mark.parametrize("kind,k", [("linear", 1), ("cosine", 1), ("linear", 2), ("cosine", 3)])
def test_first_hitting_calls_the_network_at_the_exact_hitting_times(kind, k):
    """From n = L masked at t = 1, the i-th of L independent unmask events fires when
    1 - alpha(t) = (1 - alpha(1)) U_(L-i+1), with U_(L-i+1) the (L-i+1)-th smallest of L uniforms,
    a Beta(L - i + 1, i) variable (Zheng et al., Prop. 4.1). With k positions per call, call j
    unmasks events jk + 1, ..., jk + k and happens at the first of them (k = 1: every event).
    A time-conditioned oracle records the times; a Kolmogorov-Smirnov test per call compares them
    with that law."""
    oracle = OracleModel.random(vocab_size=3, length=4, concentration=1.0, seed=1, time_conditioning=True)
    schedule, l = Schedule(kind), 4
    out = first_hitting(oracle, masks_of(oracle, 4000), torch.Generator().manual_seed(0), FirstHittingConfig(k=k, schedule=kind))
    assert out.nfe == -(-l // k) == len(oracle.times)
    top = schedule.mask_prob(torch.tensor(1.0, dtype=torch.float64))
    for j, t in enumerate(oracle.times):
        event = j * k + 1
        fraction = (schedule.mask_prob(t) / top).numpy()
        assert kstest(fraction, beta(l - event + 1, event).cdf).pvalue > 1e-3, j
    if k == 1:
        assert pvalue(oracle, out.tokens) > 1e-3  # and the samples are still exact


def masks_of(oracle: OracleModel, n: int) -> torch.Tensor:
    return torch.full((n, oracle.config.context_len), oracle.config.mask_id)


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


def test_categorical_draws_exact_probabilities():
    """The samplers' float64 draw (inverse CDF) against exact probabilities (chi-square); a
    zero-weight outcome is never drawn; the probability it returns is the drawn outcome's."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    n = 200_000
    draws, prob = categorical(p.log().expand(n, 5), gen)
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[4] == 0
    assert chisquare(counts[:4].numpy(), (p[:4] * n).numpy()).pvalue > 1e-3
    assert torch.allclose(prob, p[draws], rtol=1e-12)
