"""The MDM's training noise as per-row numbers (unmask.losses.MaskDraw) and the counter-based hash
that makes its masks (unmask.counter_rng), against exact references: lowbias32 in unsigned 32-bit
numpy arithmetic and in Python integers, the k-subsets and Bernoulli patterns counted by chi-square,
and any split of a batch giving the rows of the whole."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from unmask.config import ModelConfig, TrainConfig
from unmask.counter_rng import hashed_uniform, hashed_words, mix32
from unmask.losses import MaskDraw, dce_loss, draw_k_dce, draw_t_dce
from unmask.objectives import Batch, objective_for
from unmask.schedule import Schedule

MASK = 9


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 on one Python integer, reduced mod 2^32 after each product."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def slow_words(seed: int, row: int, length: int) -> list[int]:
    a = lowbias32(lowbias32(row ^ (seed >> 32)) ^ (seed & 0xFFFFFFFF))
    return [lowbias32(a ^ lowbias32(i)) for i in range(length)]


def chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's statistic (Wilson-Hilferty approximation of the chi-square tail)."""
    stat, dof = float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_mix32_is_lowbias32_in_unsigned_32_bit_arithmetic():
    x = np.random.default_rng(0).integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([x, np.array([0, 1, 2**31, 2**32 - 1], dtype=np.uint32)])
    ref = x.copy()
    with np.errstate(over="ignore"):
        ref ^= ref >> 16
        ref *= np.uint32(0x7FEB352D)
        ref ^= ref >> 15
        ref *= np.uint32(0x846CA68B)
        ref ^= ref >> 16
    assert np.array_equal(mix32(torch.from_numpy(x.astype(np.int64))).numpy(), ref.astype(np.int64))


def test_hashed_words_are_the_python_reference_and_distinct_within_a_row():
    seed, rows = 2**61 + 987654321, torch.tensor([0, 5, 2**31 + 7])
    words = hashed_words(seed, rows, 40)
    assert words.tolist() == [slow_words(seed, r, 40) for r in rows.tolist()]
    many = hashed_words(3, torch.arange(8), 4096)
    assert all(len(set(row)) == 4096 for row in many.tolist())
    u = hashed_uniform(3, torch.arange(8), 4096)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1


def test_k_dce_masks_k_positions_as_a_uniform_subset():
    """L = 5, k = 2: the 10 subsets equally often over rows and seeds (chi-square), exactly k per row."""
    length, k, rows = 5, 2, 2000
    counts = dict.fromkeys(itertools.combinations(range(length), k), 0)
    x0 = torch.zeros((rows, length), dtype=torch.long)
    for seed in (11, 2**40 + 3, 2**62 - 1):
        draw = MaskDraw(seed, torch.arange(rows), torch.full((rows,), k / length), torch.full((rows,), length / k),
                        count=torch.full((rows,), k))
        noise = draw.corrupt(x0, MASK)
        assert torch.equal(noise.masked.sum(dim=1), torch.full((rows,), k))
        assert torch.equal(noise.xt, torch.where(noise.masked, MASK, x0))
        for row in noise.masked.tolist():
            counts[tuple(i for i, m in enumerate(row) if m)] += 1
    observed = np.array(list(counts.values()), dtype=float)
    assert chi_square_p(observed, np.full(len(counts), observed.sum() / len(counts))) > 1e-3


def test_t_dce_masks_each_position_independently_with_its_probability():
    """p = 0.3 per row: the 2^4 patterns of 4 positions at their Bernoulli probabilities (chi-square)."""
    length, rows, p = 4, 8000, 0.3
    draw = MaskDraw(12345, torch.arange(rows), torch.full((rows,), p), torch.ones(rows), mask_prob=torch.full((rows,), p))
    masked = draw.corrupt(torch.zeros((rows, length), dtype=torch.long), MASK).masked
    patterns = (masked.long() * (2 ** torch.arange(length))).sum(dim=1)
    observed = np.bincount(patterns.numpy(), minlength=2**length).astype(float)
    ones = np.array([bin(i).count("1") for i in range(2**length)])
    expected = rows * p**ones * (1 - p) ** (length - ones)
    assert chi_square_p(observed, expected) > 1e-3


@pytest.mark.parametrize("loss", ["k-dce", "t-dce"])
def test_any_split_of_the_batch_makes_the_rows_of_the_whole(loss):
    """Two processes (or micro-batches) keep their rows of one draw: their masks are the whole batch's rows."""
    generator = torch.Generator().manual_seed(0)
    draw = draw_k_dce(8, 16, generator) if loss == "k-dce" else draw_t_dce(8, Schedule(), generator)
    x0 = torch.randint(0, MASK, (8, 16), generator=generator)
    whole = draw.corrupt(x0, MASK)
    halves = [draw.rows(part).corrupt(x0[part], MASK) for part in (slice(0, 3), slice(3, 8))]
    assert torch.equal(torch.cat([h.masked for h in halves]), whole.masked)
    assert torch.equal(torch.cat([h.xt for h in halves]), whole.xt)


def test_the_draws_take_t_k_and_the_seed_from_the_generator():
    a, b = draw_k_dce(4, 10, torch.Generator().manual_seed(5)), draw_k_dce(4, 10, torch.Generator().manual_seed(5))
    assert a.seed == b.seed and torch.equal(a.count, b.count)
    generator = torch.Generator().manual_seed(5)
    first, second = draw_k_dce(4, 10, generator), draw_k_dce(4, 10, generator)
    assert first.seed != second.seed
    # stratified u over the 4 rows: k = ceil(u L) lands in 4 different quarters of 1..10; weight L / k, t = k / L
    assert sorted(((a.count - 1) * 4 // 10).tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(a.weight * a.count, torch.full((4,), 10.0))
    torch.testing.assert_close(a.t, a.count / 10)
    t = draw_t_dce(6, Schedule("cosine"), torch.Generator().manual_seed(1))
    torch.testing.assert_close(t.mask_prob, Schedule("cosine").mask_prob(t.t))
    torch.testing.assert_close(t.weight, Schedule("cosine").weight(t.t))


def test_the_mdm_objective_scores_the_masks_of_its_draw():
    """objective.loss = dce_loss on the Corruption that the hash's Python reference gives (k-DCE: the
    count[b] positions with the smallest words)."""
    model_cfg = ModelConfig(vocab_size=MASK, context_len=12, n_layer=1, n_head=2, n_embd=16)
    objective = objective_for(TrainConfig(objective="mdm"), model_cfg)
    torch.manual_seed(0)
    from unmask.model import Transformer

    net = Transformer(model_cfg)
    tokens = torch.randint(0, MASK, (5, 13), generator=torch.Generator().manual_seed(2))
    draw = objective.draw_noise(Batch(tokens), torch.Generator().manual_seed(3))
    masked = torch.zeros((5, 12), dtype=torch.bool)
    for b in range(5):
        words = slow_words(draw.seed, b, 12)
        for i in sorted(range(12), key=words.__getitem__)[: int(draw.count[b])]:
            masked[b, i] = True
    x0 = tokens[:, 1:]
    from unmask.losses import Corruption

    reference = dce_loss(net, x0, Corruption(torch.where(masked, MASK, x0), masked, draw.t, draw.weight))
    torch.testing.assert_close(objective.loss(net, Batch(tokens), draw), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_hash_is_the_same_bits_on_a_gpu():
    rows = torch.arange(64)
    assert torch.equal(hashed_words(77, rows.cuda(), 1024).cpu(), hashed_words(77, rows, 1024))
