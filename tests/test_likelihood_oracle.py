"""Likelihood estimators against exact answers from enumerable toy distributions."""

import math

import pytest
import torch

from unmask.likelihood import ar_nll, mc_elbo, previous_tokens
from unmask.objectives import k_dce, t_dce
from unmask.oracle import OracleModel, cross_entropy_per_token, exact_nats_per_token
from unmask.schedule import Schedule


def draw_data(oracle: OracleModel, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return oracle.seqs[torch.multinomial(oracle.probs, n, replacement=True, generator=gen)]


@pytest.fixture(scope="module")
def oracle():
    return OracleModel.random(vocab_size=3, length=5, concentration=0.5, seed=3)


@pytest.mark.parametrize("estimator", ["t-dce", "k-dce"])
def test_mc_elbo_of_exact_conditionals_is_tight(oracle, estimator):
    """With exact conditionals the bound equals the NLL (RADD theorem): on data from p it estimates H(p)/L."""
    data = draw_data(oracle, 4000)
    empirical_nll = -oracle.log_prob(data).mean().item() / 5  # exact NLL of these very sequences
    res = mc_elbo(oracle, data, draws=64, estimator=estimator, batch_size=4000, seed=1)
    assert res.kind == "elbo" and res.draws == 64 and res.num_tokens == 4000 * 5
    # the bound of exact conditionals has no gap: it matches the exact NLL within Monte Carlo error
    assert abs(res.nats_per_token - empirical_nll) < 4 * res.stderr + 2e-3, (res, empirical_nll)
    assert abs(empirical_nll - exact_nats_per_token(oracle)) < 0.03
    assert res.stderr > 0
    assert math.isclose(res.perplexity, math.exp(res.nats_per_token))


def test_t_dce_and_k_dce_agree(oracle):
    data = draw_data(oracle, 3000, seed=5)
    t = mc_elbo(oracle, data, draws=64, estimator="t-dce", batch_size=3000, seed=2)
    k = mc_elbo(oracle, data, draws=64, estimator="k-dce", batch_size=3000, seed=2)
    assert abs(t.nats_per_token - k.nats_per_token) < 3 * math.hypot(t.stderr, k.stderr) + 2e-3
    assert k.stderr < t.stderr  # k-DCE has lower variance for the same bound (reference section 2)


def test_cosine_schedule_estimates_the_same_bound(oracle):
    data = draw_data(oracle, 3000, seed=6)
    lin = mc_elbo(oracle, data, draws=64, schedule=Schedule("linear"), batch_size=3000)
    cos = mc_elbo(oracle, data, draws=64, schedule=Schedule("cosine"), batch_size=3000)
    assert abs(lin.nats_per_token - cos.nats_per_token) < 3 * math.hypot(lin.stderr, cos.stderr) + 2e-3


def test_wrong_model_has_strictly_larger_bound(oracle):
    """Uniform conditionals: the ELBO is log V per token, strictly above the true entropy rate."""
    data = draw_data(oracle, 2000, seed=7)
    wrong = OracleModel.uniform(vocab_size=3, length=5)
    res = mc_elbo(wrong, data, draws=64, batch_size=2000, estimator="k-dce")
    truth = mc_elbo(oracle, data, draws=64, batch_size=2000, estimator="k-dce")
    assert res.nats_per_token > truth.nats_per_token + 5 * math.hypot(res.stderr, truth.stderr)
    assert abs(res.nats_per_token - math.log(3)) < 0.02  # uniform conditionals: every masked token costs log 3


def test_bound_of_a_consistent_mismatched_model_equals_its_exact_nll(oracle):
    """A different joint q: its conditionals are consistent, so every decoding order gives -log q(x)
    and the ELBO (= expected any-order NLL, RADD) equals the exact NLL of q on the data."""
    other = OracleModel.random(vocab_size=3, length=5, concentration=0.5, seed=11)
    data = draw_data(oracle, 3000, seed=8)
    exact_q = -other.log_prob(data).mean().item() / 5
    res = mc_elbo(other, data, draws=64, batch_size=3000, estimator="k-dce")
    assert abs(res.nats_per_token - exact_q) < 4 * res.stderr + 2e-3
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
    """Each training-loss draw is an unbiased estimate of the same bound (no stratification needed)."""
    data = draw_data(oracle, 20000, seed=10)
    gen = torch.Generator().manual_seed(0)
    t_loss = t_dce(oracle, data, Schedule(), gen, mask_id=oracle.config.mask_id, low_discrepancy=False)
    k_loss = k_dce(oracle, data, gen, mask_id=oracle.config.mask_id, low_discrepancy=False)
    target = -oracle.log_prob(data).mean().item() / 5
    for loss in (t_loss, k_loss):
        se = loss.std().item() / math.sqrt(len(loss))
        assert abs(loss.mean().item() - target) < 4 * se + 2e-3


def test_mc_elbo_rejects_bad_draws(oracle):
    from unmask.errors import UnmaskError

    with pytest.raises(UnmaskError, match="--draws"):
        mc_elbo(oracle, draw_data(oracle, 10), draws=1)


def test_any_order_estimator_and_chain_rule_nll(oracle):
    from unmask.likelihood import chain_rule_nll

    data = draw_data(oracle, 1000, seed=12)
    exact = -oracle.log_prob(data).mean().item() / 5
    assert chain_rule_nll(oracle, data, batch_size=500).nats_per_token == pytest.approx(exact, abs=1e-5)
    res = mc_elbo(oracle, data, draws=4, estimator="any-order", batch_size=1000)
    assert res.nats_per_token == pytest.approx(exact, abs=1e-4)  # every order is exact for consistent conditionals


def test_groups_of_different_lengths_weight_by_tokens(oracle):
    """Unpacked evaluation: windows of several lengths combine as one token-weighted average."""
    data = draw_data(oracle, 600, seed=13)
    whole = mc_elbo(oracle, data, draws=8, estimator="k-dce", batch_size=600, seed=4)
    split = mc_elbo(oracle, [data[:200], data[200:]], draws=8, estimator="k-dce", batch_size=600, seed=4)
    assert split.num_tokens == whole.num_tokens == 3000
    assert abs(split.nats_per_token - whole.nats_per_token) < 4 * math.hypot(split.stderr, whole.stderr)
