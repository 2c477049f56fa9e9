"""Likelihood estimators against exact answers from enumerable toy distributions."""

import itertools
import math

import numpy as np
import pytest
import torch

import unmask.likelihood
from unmask.likelihood import ar_nll, mc_elbo, previous_tokens
from unmask.losses import k_dce, t_dce
from unmask.testing import OracleModel, cross_entropy_per_token, exact_nats_per_token
from unmask.schedule import Schedule


def draw_data(oracle: OracleModel, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return oracle.seqs[torch.multinomial(oracle.probs, n, replacement=True, generator=gen)]


@pytest.fixture(scope="module")
def oracle():
    return OracleModel.random(vocab_size=3, length=5, concentration=0.5, seed=3)


def masked_nll_by_pattern(oracle: OracleModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mask pattern S of the L positions (2^L, L) bool, and c_S = E_{x0~p}[sum_{i in S}
    -log p(x0_i | x0 outside S)] (2^L,), by enumeration of all V^L sequences."""
    l, mask_id = oracle.config.context_len, oracle.config.mask_id
    patterns = torch.tensor(list(itertools.product([False, True], repeat=l)))
    x0 = oracle.seqs.repeat(len(patterns), 1)
    xt = torch.where(patterns.repeat_interleave(len(oracle.seqs), dim=0), mask_id, x0)
    logp = torch.log_softmax(oracle(xt).double(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    nll = -(logp.view(len(patterns), -1, l) * patterns[:, None, :]).sum(dim=2)  # (2^L, V^L)
    return patterns, nll @ oracle.probs


def evaluation_schedule_of_mc_elbo(oracle: OracleModel, schedule: Schedule, monkeypatch) -> Schedule:
    """The schedule that mc_elbo's t-DCE draws actually mask and weight with (spied on the call)."""
    seen = []
    real = unmask.likelihood.t_dce

    def spy(*args, **kwargs):
        seen.extend(a for a in (*args, *kwargs.values()) if isinstance(a, Schedule))
        return real(*args, **kwargs)

    monkeypatch.setattr(unmask.likelihood, "t_dce", spy)
    mc_elbo(oracle, oracle.seqs[:4], draws=2, estimator="t-dce", schedule=schedule)
    monkeypatch.undo()
    assert seen
    return seen[0]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_t_dce_evaluation_expectation_is_the_entropy_by_quadrature(oracle, kind, monkeypatch):
    """The expectation of mc_elbo's t-DCE estimator, computed exactly (every mask pattern enumerated,
    t integrated by Gauss-Legendre: for the linear schedule the integrand is a polynomial of degree
    L - 1, so 64 nodes are exact), equals H/L for exact conditionals. A mask probability that stops
    short of 1 at t = 1 leaves out the end of the integral and falls below H/L."""
    schedule = evaluation_schedule_of_mc_elbo(oracle, Schedule(kind), monkeypatch)
    patterns, c = masked_nll_by_pattern(oracle)
    k, l = patterns.sum(dim=1), oracle.config.context_len
    nodes, weights = np.polynomial.legendre.leggauss(64)
    t = torch.tensor((nodes + 1) / 2)
    m = schedule.mask_prob(t)[:, None]
    integrand = (schedule.weight(t)[:, None] * m**k * (1 - m) ** (l - k) * c).sum(dim=1) / l
    expectation = (integrand * torch.tensor(weights / 2)).sum().item()
    assert expectation == pytest.approx(exact_nats_per_token(oracle), abs=1e-6)


def test_k_dce_evaluation_expectation_is_the_entropy_exactly(oracle):
    """k-DCE: k uniform on 1..L, the k masked positions uniform: E = (1/L) sum_k (1/k) mean_{|S|=k} c_S."""
    patterns, c = masked_nll_by_pattern(oracle)
    k, l = patterns.sum(dim=1), oracle.config.context_len
    expectation = sum(c[k == j].mean().item() / j for j in range(1, l + 1)) / l
    assert expectation == pytest.approx(exact_nats_per_token(oracle), abs=1e-6)


@pytest.mark.parametrize("estimator", ["t-dce", "k-dce"])
def test_mc_elbo_of_exact_conditionals_is_tight(oracle, estimator):
    """With exact conditionals the bound equals the NLL (RADD theorem): on data from p it estimates H(p)/L."""
    data = draw_data(oracle, 4000)
    empirical_nll = -oracle.log_prob(data).mean().item() / 5  # exact NLL of these very sequences
    res = mc_elbo(oracle, data, draws=64, estimator=estimator, batch_size=4000, seed=1)
    assert res.kind == "elbo" and res.draws == 64 and res.num_tokens == 4000 * 5
    # the bound of exact conditionals has no gap: it matches the exact NLL within Monte Carlo error
    # given the data, the estimator's expectation is exactly their NLL: only its Monte Carlo error remains
    assert abs(res.nats_per_token - empirical_nll) < 4 * res.stderr, (res, empirical_nll)
    data_se = (oracle.log_prob(data) / 5).std().item() / math.sqrt(len(data))
    assert abs(empirical_nll - exact_nats_per_token(oracle)) < 4 * data_se
    assert res.stderr > 0
    assert math.isclose(res.perplexity, math.exp(res.nats_per_token))


def test_t_dce_and_k_dce_agree(oracle):
    data = draw_data(oracle, 3000, seed=5)
    t = mc_elbo(oracle, data, draws=64, estimator="t-dce", batch_size=3000, seed=2)
    k = mc_elbo(oracle, data, draws=64, estimator="k-dce", batch_size=3000, seed=2)
    assert abs(t.nats_per_token - k.nats_per_token) < 3 * math.hypot(t.stderr, k.stderr)
    assert k.stderr < t.stderr  # k-DCE has lower variance for the same bound (reference section 2)


def test_cosine_schedule_estimates_the_same_bound(oracle):
    data = draw_data(oracle, 3000, seed=6)
    lin = mc_elbo(oracle, data, draws=64, schedule=Schedule("linear"), batch_size=3000)
    cos = mc_elbo(oracle, data, draws=64, schedule=Schedule("cosine"), batch_size=3000)
    assert abs(lin.nats_per_token - cos.nats_per_token) < 3 * math.hypot(lin.stderr, cos.stderr)


def test_wrong_model_has_strictly_larger_bound(oracle):
    """Uniform conditionals: the ELBO is log V per token, strictly above the true entropy rate."""
    data = draw_data(oracle, 2000, seed=7)
    wrong = OracleModel.uniform(vocab_size=3, length=5)
    res = mc_elbo(wrong, data, draws=64, batch_size=2000, estimator="k-dce")
    truth = mc_elbo(oracle, data, draws=64, batch_size=2000, estimator="k-dce")
    assert res.nats_per_token > truth.nats_per_token + 5 * math.hypot(res.stderr, truth.stderr)
    # uniform conditionals: every masked token costs log 3, so every k-DCE draw is exactly log 3
    assert res.nats_per_token == pytest.approx(math.log(3), abs=1e-6) and res.stderr < 1e-6


def test_bound_of_a_consistent_mismatched_model_equals_its_exact_nll(oracle):
    """A different joint q: its conditionals are consistent, so every decoding order gives -log q(x)
    and the ELBO (= expected any-order NLL, RADD) equals the exact NLL of q on the data."""
    other = OracleModel.random(vocab_size=3, length=5, concentration=0.5, seed=11)
    data = draw_data(oracle, 3000, seed=8)
    exact_q = -other.log_prob(data).mean().item() / 5
    res = mc_elbo(other, data, draws=64, batch_size=3000, estimator="k-dce")
    assert abs(res.nats_per_token - exact_q) < 4 * res.stderr
    assert res.nats_per_token > exact_nats_per_token(oracle) + 0.05  # and it is worse than the truth
    assert cross_entropy_per_token(oracle, other) > exact_nats_per_token(oracle)


def test_ar_exact_nll_of_causal_oracle(oracle):
    causal = OracleModel(oracle.probs, 3, 5, causal=True)
    data = draw_data(oracle, 500, seed=9)
    prev = previous_tokens(data, first=0)
    res = ar_nll(causal, data, prev, batch_size=128)
    assert res.kind == "exact" and res.stderr == 0 and res.estimator == "ar"
    assert res.nats_per_token == pytest.approx(-oracle.log_prob(data).mean().item() / 5, rel=1e-5)


def test_single_draw_losses_are_unbiased(oracle):
    """Each loss draw is an unbiased estimate of the same bound (no stratification needed). eps = 0:
    training's eps = 1e-3 moves t-DCE's target ~1e-3 nats below it (see the quadrature test)."""
    data = draw_data(oracle, 20000, seed=10)
    gen = torch.Generator().manual_seed(0)
    t_loss = t_dce(oracle, data, Schedule(eps=0.0), gen, mask_id=oracle.config.mask_id, low_discrepancy=False)
    k_loss = k_dce(oracle, data, gen, mask_id=oracle.config.mask_id, low_discrepancy=False)
    target = -oracle.log_prob(data).mean().item() / 5
    for loss in (t_loss, k_loss):
        se = loss.std().item() / math.sqrt(len(loss))
        assert abs(loss.mean().item() - target) < 4 * se


def test_mc_elbo_rejects_bad_draws(oracle):
    from unmask.errors import OptionError

    with pytest.raises(OptionError, match=r"draws=1 must be an integer >= 2 \(a Monte Carlo estimate") as refused:
        mc_elbo(oracle, draw_data(oracle, 10), draws=1)
    assert refused.value.param == "draws"


def test_any_order_estimator_and_chain_rule_nll(oracle):
    from unmask.likelihood import chain_rule_nll

    data = draw_data(oracle, 1000, seed=12)
    exact = -oracle.log_prob(data).mean().item() / 5
    assert chain_rule_nll(oracle, data, batch_size=500).nats_per_token == pytest.approx(exact, abs=1e-5)
    res = mc_elbo(oracle, data, draws=4, estimator="any-order", batch_size=1000)
    assert res.nats_per_token == pytest.approx(exact, abs=1e-4)  # every order is exact for consistent conditionals


def test_groups_of_different_lengths_weight_by_tokens(oracle):
    """Unpacked evaluation: windows of lengths 5 and 2 combine as one token-weighted average (a
    short window is the prefix of p, whose exact conditionals the oracle serves)."""
    data = draw_data(oracle, 600, seed=13)
    groups = [data[:200], data[200:, :2]]
    nll = [-oracle.log_prob(g).sum().item() for g in groups]
    exact = sum(nll) / (200 * 5 + 400 * 2)
    per_window = (nll[0] / (200 * 5) + nll[1] / (400 * 2)) / 2  # what weighting the groups equally would give
    assert abs(exact - per_window) > 1e-3  # far outside the exact check below
    # any-order: every order gives -log p of each window exactly
    res = mc_elbo(oracle, groups, draws=2, estimator="any-order", batch_size=600, seed=4)
    assert res.num_tokens == 1800 and res.nats_per_token == pytest.approx(exact, abs=1e-5)
    res = mc_elbo(oracle, groups, draws=16, estimator="k-dce", batch_size=600, seed=4)
    assert abs(res.nats_per_token - exact) < 4 * res.stderr
