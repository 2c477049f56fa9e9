"""Chain-rule and conditional scores against exact log-probabilities of an oracle; every scoring
path with a time-conditioned network."""

import math

import pytest
import torch

from unmask.config import ModelConfig
from unmask.errors import UnmaskError
from unmask.guidance import combine, guided_logits
from unmask.likelihood import chain_rule, conditional_elbo, decoding_ranks, mc_elbo
from unmask.model import Transformer
from unmask.testing import OracleModel


@pytest.fixture(scope="module")
def oracle():
    return OracleModel.random(vocab_size=3, length=5, concentration=0.5, seed=3)


def test_chain_rule_equals_exact_log_prob(oracle):
    x = oracle.seqs[torch.randperm(len(oracle.seqs), generator=torch.Generator().manual_seed(0))[:50]]
    exact = oracle.log_prob(x)
    ltr = chain_rule(oracle, x)
    assert ltr.nfe == 5
    assert torch.allclose(ltr.logprob, exact, atol=1e-4)
    rnd = chain_rule(oracle, x, order="random", generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rnd.logprob, exact, atol=1e-4)  # any order: same joint for consistent conditionals


def test_conditional_chain_rule_equals_exact_conditional(oracle):
    x = oracle.seqs[[5, 77, 140, 200]]
    score = torch.zeros_like(x, dtype=torch.bool)
    score[:, 2:] = True  # context x_1 x_2, continuation x_3..x_5
    consistent = (oracle.seqs[None, :, :2] == x[:, None, :2]).all(dim=2)
    marginal = (oracle.probs[None] * consistent).sum(dim=1)
    exact = oracle.log_prob(x) - marginal.log()
    res = chain_rule(oracle, x, score)
    assert res.nfe == 3 and torch.allclose(res.logprob, exact, atol=1e-4)
    mc, se = conditional_elbo(oracle, x, score, draws=256, generator=torch.Generator().manual_seed(0))
    assert ((mc - exact).abs() < 4 * se).all()  # the bound is tight for exact conditionals: Monte Carlo error only


def test_greedy_flag(oracle):
    x = torch.zeros((1, 5), dtype=torch.long)
    all_argmax = x.clone()
    for i in range(5):  # build the left-to-right greedy sequence
        logits = oracle(torch.cat([all_argmax[:, :i], torch.full((1, 5 - i), oracle.config.mask_id)], dim=1))
        all_argmax[0, i] = logits[0, i].argmax()
    assert chain_rule(oracle, all_argmax).greedy.item()
    other = all_argmax.clone()
    other[0, 0] = (other[0, 0] + 1) % 3
    assert not chain_rule(oracle, other).greedy.item()


def test_ranks_are_per_row_permutations():
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    ltr = decoding_ranks(mask, "left-to-right")
    assert ltr.tolist() == [[0, -1, 1, 2], [-1, -1, 0, -1]]
    rnd = decoding_ranks(mask, "random", torch.Generator().manual_seed(0))
    assert sorted(rnd[0][mask[0]].tolist()) == [0, 1, 2] and rnd[1].tolist() == [-1, -1, 0, -1]


def test_cfg_combination_is_exact(oracle):
    lc, lu = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(combine(lc, lu, 0.0), lc)
    assert torch.allclose(combine(lc, lu, 1.5), 2.5 * lc - 1.5 * lu)
    x = torch.tensor([[0, 1, oracle.config.mask_id, oracle.config.mask_id, 2]])
    prompt = torch.tensor([[True, True, False, False, False]])
    cond = oracle(x)
    uncond = oracle(torch.tensor([[oracle.config.mask_id] * 4 + [2]]))
    assert torch.allclose(guided_logits(oracle, x, prompt, 2.0), 3 * cond - 2 * uncond, atol=1e-5)
    assert torch.equal(guided_logits(oracle, x, prompt, 0.0), cond)


# -- time-conditioned networks: every scoring path gives t = the masked fraction of the input row --


def time_conditioned_transformer():
    """A tiny time-conditioned Transformer that records (tokens, t) of every call."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=7, context_len=6, n_layer=1, n_head=2, n_embd=16, time_conditioning=True)).eval()
    model.seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: mod.seen.append((args[0].clone(), kwargs.get("t"))), with_kwargs=True)
    return model


def assert_times_are_masked_fractions(model):
    assert model.seen
    for tokens, t in model.seen:
        assert t is not None and torch.equal(t.float(), (tokens == model.config.mask_id).float().mean(dim=1))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_time_conditioned_chain_rule_equals_a_slow_loop_with_masked_fraction_times(cfg_scale):
    model = time_conditioned_transformer()
    m = model.config.mask_id
    x = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 6, 5, 4, 3, 2]])
    score = torch.zeros_like(x, dtype=torch.bool)
    score[:, 2:] = True
    res = chain_rule(model, x, score, cfg_scale=cfg_scale)
    assert_times_are_masked_fractions(model)
    ref = torch.zeros(2, dtype=torch.float64)  # reference: one position per pass, t passed by hand
    for i in range(2, 6):
        xt = torch.cat([x[:, :i], torch.full((2, 6 - i), m)], dim=1)
        lc = model(xt, t=torch.full((2,), (6 - i) / 6))
        lu = model(torch.cat([torch.full((2, 2), m), xt[:, 2:]], dim=1), t=torch.full((2,), (8 - i) / 6))
        logits = combine(lc, lu, cfg_scale).double()
        ref += torch.log_softmax(logits, dim=-1)[torch.arange(2), i, x[:, i]]
    assert torch.allclose(res.logprob, ref, atol=1e-5)


@pytest.mark.parametrize("estimator", ["t-dce", "k-dce", "any-order"])
def test_time_conditioned_mc_elbo_runs_every_estimator(estimator):
    model = time_conditioned_transformer()
    windows = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(0))
    res = mc_elbo(model, windows, draws=4, estimator=estimator)
    assert math.isfinite(res.nats_per_token) and res.nats_per_token > 0
    if estimator != "t-dce":  # k-DCE trains with t = k / L; t-DCE with its own time
        assert_times_are_masked_fractions(model)


def test_time_conditioned_conditional_elbo_and_cfg():
    model = time_conditioned_transformer()
    x = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 6, 5, 4, 3, 2]])
    score = torch.zeros_like(x, dtype=torch.bool)
    score[:, 3:] = True
    for scale in (0.0, 2.0):
        mean, se = conditional_elbo(model, x, score, draws=4, generator=torch.Generator().manual_seed(0), cfg_scale=scale)
        assert torch.isfinite(mean).all() and (mean < 0).all()
    assert_times_are_masked_fractions(model)


def test_time_conditioned_harness_scores():
    pytest.importorskip("lm_eval")
    from unmask.evaluation.harness import UnmaskLM

    model = time_conditioned_transformer()
    for method, cfg in (("chain-rule", 0.0), ("mc", 0.0), ("chain-rule", 1.0)):
        lm = UnmaskLM(None, method=method, draws=4, cfg_scale=cfg, model=model, tokenizer=None)
        scores = lm._score_batch([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]], [2, 3])
        assert all(math.isfinite(lp) and lp < 0 for lp, _ in scores)
    assert_times_are_masked_fractions(model)


def test_time_conditioned_network_without_t_names_the_fix():
    model = time_conditioned_transformer()
    with pytest.raises(UnmaskError, match="time-conditioned.*pass t"):
        model(torch.zeros((1, 6), dtype=torch.long))
