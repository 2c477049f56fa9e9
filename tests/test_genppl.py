"""Generation-quality metrics against hand-computed values and an exact oracle judge."""

import math

import pytest
import torch

from unmask.evaluation.genppl import distinct_n, judge_nll, quality_report, unigram_entropy
from unmask.testing import OracleModel


def test_entropy_and_distinct_by_hand():
    assert unigram_entropy([[1, 1, 1, 1]]) == 0.0
    assert unigram_entropy([[1, 2, 3, 4]]) == pytest.approx(math.log(4))
    assert unigram_entropy([[1, 1], [1, 2]]) == pytest.approx(0.5 * math.log(2))
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)


def test_judge_nll_is_the_exact_ar_score():
    oracle = OracleModel.random(vocab_size=3, length=4, seed=2, causal=True)
    samples = oracle.seqs[torch.tensor([0, 17, 40, 80])]
    expected = -oracle.log_prob(samples).mean().item() / 4
    assert judge_nll(oracle, samples, bos=0, batch_size=3) == pytest.approx(expected, rel=1e-5)
    report = quality_report(samples.tolist(), expected)
    assert report["gen_ppl"] == pytest.approx(math.exp(expected)) and report["num_samples"] == 4
