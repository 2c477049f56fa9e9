"""Classifier guidance (D-CBG) against exact answers, and the classifier objective through the loop.

The oracle: an explicit joint p(x, y) over V^L sequences x (an :class:`OracleModel` p(x) and a
random table p(y | x)). Its exact classifier of noisy canvases enumerates the sequences a canvas
is consistent with: p(y | z) = sum_{x ~ z} p(x) p(y | x) / sum_{x ~ z} p(x) (the masking process
draws the pattern independently of x, so this is p(y | x_t) at every t).
"""


import pytest
import torch
from scipy.stats import chisquare

from unmask.classifier import Classifier
from unmask.classifier_guidance import ClassifierGuide, exact_terms, first_order_terms
from unmask.config import ModelConfig
from unmask.model import Transformer
from unmask.sampling import AncestralConfig, Conditioning, FirstHittingConfig, SamplerSpec, ancestral, first_hitting
from unmask.testing import BlockOracle, OracleModel

V, L = 3, 2


class ExactClassifier:
    """p(y | z) of canvases z (B, L) under the oracle's joint, by enumeration; its gradient with respect
    to the one-hot input is that of the multilinear extension c_i(v) = P[i, v] + P[i, MASK] (a MASK
    matches every token): p(y | P) = sum_x p(x, y) prod_i c_i(x_i) / sum_x p(x) prod_i c_i(x_i)."""

    def __init__(self, oracle: OracleModel, p_y_given_x: torch.Tensor, label: int) -> None:
        self.oracle, self.label = oracle, label
        self.joint = oracle.probs[:, None] * p_y_given_x  # (N, K)

    def soft(self, onehot: torch.Tensor) -> torch.Tensor:
        """log p(y | P) of soft canvases P (B, L, V + 1)."""
        seqs, mask = self.oracle.seqs, self.oracle.config.mask_id
        match = onehot[:, :, :V].gather(2, seqs.T[None].expand(onehot.shape[0], -1, -1))  # (B, L, N): P[i, x_i]
        weight = (match + onehot[:, :, mask : mask + 1]).prod(dim=1)  # (B, N)
        return (weight @ self.joint[:, self.label]).log() - (weight @ self.joint.sum(dim=1)).log()

    def __call__(self, tokens, key_mask=None, positions=None):
        assert tokens.shape[1] == L, "the classifier must see the whole canvas"
        return self.soft(torch.nn.functional.one_hot(tokens, V + 1).double()).float()

    def gradient(self, tokens, key_mask=None, positions=None):
        onehot = torch.nn.functional.one_hot(tokens, V + 1).double().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.soft(onehot).sum(), onehot)
        return grad.float()

    def posterior(self) -> torch.Tensor:
        """p(x | y) over the V^L sequences."""
        p = self.joint[:, self.label]
        return p / p.sum()


@pytest.fixture(scope="module")
def joint():
    oracle = OracleModel.random(vocab_size=V, length=L, concentration=1.0, seed=3)
    table = torch.rand(V**L, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.9 + 0.05
    return oracle, ExactClassifier(oracle, torch.stack([table, 1 - table], dim=1), label=0)


def pvalue(samples: torch.Tensor, probs: torch.Tensor, oracle: OracleModel) -> float:
    counts = torch.bincount(oracle.index_of(samples), minlength=probs.numel()).double()
    return chisquare(counts.numpy(), (probs * samples.shape[0]).numpy()).pvalue


def test_exact_dcbg_makes_the_ancestral_sampler_sample_the_posterior(joint):
    oracle, exact = joint
    x = torch.full((4000, L), oracle.config.mask_id)
    guide = ClassifierGuide(exact, gamma=1.0, form="exact")
    out = ancestral(oracle, x, torch.Generator().manual_seed(0), AncestralConfig(steps=100), Conditioning(classifier_guide=guide))
    assert pvalue(out.tokens, exact.posterior(), oracle) > 1e-3 and guide.used() == "exact"
    # the same chain unguided samples p(x), which the test tells apart from p(x | y)
    plain = ancestral(oracle, x, torch.Generator().manual_seed(0), AncestralConfig(steps=100))
    assert pvalue(plain.tokens, exact.posterior(), oracle) < 1e-6 and pvalue(plain.tokens, oracle.probs, oracle) > 1e-3


def test_exact_dcbg_is_exact_for_one_token_per_step_and_through_blocks(joint):
    """First-hitting fills one position per call: exact in any number of steps. Semi-autoregressive
    blocks of one column and a block model's window of one block: the classifier still sees the
    whole canvas (a window alone would be refused by the exact classifier)."""
    oracle, exact = joint
    x = torch.full((4000, L), oracle.config.mask_id)
    cond = Conditioning(classifier_guide=ClassifierGuide(exact, form="exact"))
    out = first_hitting(oracle, x, torch.Generator().manual_seed(1), FirstHittingConfig(), cond)
    assert pvalue(out.tokens, exact.posterior(), oracle) > 1e-3
    blocks = SamplerSpec.from_options("first-hitting", block_len=1, cache="none")
    out = blocks.run(oracle, x, torch.Generator().manual_seed(2), cond)
    assert pvalue(out.tokens, exact.posterior(), oracle) > 1e-3
    block_model = BlockOracle(oracle.probs, V, L, block_size=1)
    out = SamplerSpec.from_options("first-hitting", cache="none").run(block_model, x, torch.Generator().manual_seed(3), cond)
    assert pvalue(out.tokens, exact.posterior(), oracle) > 1e-3


def test_first_order_terms_are_the_directional_derivatives(joint):
    """g[i, v] - g[i, MASK] is the derivative of log p(y | P) along moving position i's mass from MASK
    to v: a central finite difference of the multilinear extension (no autograd) must match."""
    oracle, exact = joint
    m = oracle.config.mask_id
    x = torch.tensor([[m, m], [1, m], [m, 2]])
    want = x == m
    terms = first_order_terms(exact, x, want, V)
    eps = 1e-6
    base = torch.nn.functional.one_hot(x, V + 1).double()
    expected = []
    for b, i in want.nonzero().tolist():
        row = []
        for v in range(V):
            step = torch.zeros_like(base[b])
            step[i, v], step[i, m] = eps, -eps
            row.append((exact.soft((base[b] + step)[None]) - exact.soft((base[b] - step)[None])).item() / (2 * eps))
        expected.append(row)
    assert torch.allclose(terms.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def network_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=5, context_len=6, n_layer=1, n_head=2, n_embd=16, labels=("a", "b"))).double().eval()
    return Classifier(model)


def test_network_gradient_matches_finite_differences_and_exact_terms_a_loop():
    """The first-order terms of a real network (its gradient through the input embedding) against central
    differences along E[v] - E[MASK]; the batched exact terms against one classifier call per (i, v)."""
    classifier = network_classifier()
    score, model, m = classifier.score("b"), classifier.model, classifier.config.mask_id
    x = torch.tensor([[0, m, 3, m, m, 1], [m, 2, m, 4, 0, m]])
    want = torch.tensor([[False, True, False, False, True, False], [True, False, False, False, False, True]])
    terms = first_order_terms(score, x, want, 5)
    embed = model.embed.weight.detach()
    eps = 1e-6
    for n, (b, i) in enumerate(want.nonzero().tolist()):
        for v in range(5):
            shifted = []
            for sign in (1, -1):
                def move(module, args, out, sign=sign, i=i, v=v):
                    out = out.clone()
                    out[:, i] += sign * eps * (embed[v] - embed[m])
                    return out

                handle = model.embed.register_forward_hook(move)
                shifted.append(model(x[b : b + 1]).log_softmax(-1)[0, 1].item())
                handle.remove()
            assert abs((shifted[0] - shifted[1]) / (2 * eps) - terms[n, v].item()) < 1e-5
    exact = exact_terms(score, x, want, 5)
    for n, (b, i) in enumerate(want.nonzero().tolist()):
        for v in range(5):
            one = x[b : b + 1].clone()
            one[0, i] = v
            assert abs(exact[n, v].item() - classifier.log_probs(one)[0, 1].item()) < 1e-5


def test_guide_forms_and_budget():
    classifier = network_classifier()
    m = classifier.config.mask_id
    x = torch.full((2, 6), m)
    want = x == m
    logits = torch.zeros(12, 5)
    auto = ClassifierGuide(classifier.score("a"), gamma=2.0, budget=60)  # 12 positions x 5 tokens = 60 canvases: exact
    assert torch.allclose(auto.guide(x, want, logits), 2 * exact_terms(classifier.score("a"), x, want, 5))
    small = ClassifierGuide(classifier.score("a"), gamma=2.0, budget=59)
    assert torch.allclose(small.guide(x, want, logits), 2 * first_order_terms(classifier.score("a"), x, want, 5))
    assert (auto.used(), small.used()) == ("exact", "first-order")
    assert torch.equal(ClassifierGuide(classifier.score("a"), gamma=0.0).guide(x, want, logits), logits)
    with pytest.raises(Exception, match="dcbg"):
        ClassifierGuide(classifier.score("a"), form="second-order")
    with pytest.raises(Exception, match="gamma"):
        ClassifierGuide(classifier.score("a"), gamma=-1.0)
    with pytest.raises(Exception, match="label"):
        classifier.score("c")
