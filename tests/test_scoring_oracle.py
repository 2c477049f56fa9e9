"""Chain-rule and conditional scores against exact log-probabilities of an oracle."""


import pytest
import torch

from unmask.guidance import combine, guided_logits
from unmask.likelihood import chain_rule, conditional_elbo, decoding_ranks
from unmask.oracle import OracleModel


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
