"""Classifier guidance (D-CBG) against exact answers, and the classifier objective through the loop.

The oracle: an explicit joint p(x, y) over V^L sequences x (an :class:`OracleModel` p(x) and a
random table p(y | x)). Its exact classifier of noisy canvases enumerates the sequences a canvas
is consistent with: p(y | z) = sum_{x ~ z} p(x) p(y | x) / sum_{x ~ z} p(x) (the masking process
draws the pattern independently of x, so this is p(y | x_t) at every t).
"""


import json
import random
import subprocess
import sys

import pytest
import torch
from scipy.stats import chisquare

from runs import finetune_source
from unmask.cli import main
from unmask.classifier import Classifier, label_log_probs
from unmask.classifier_guidance import ClassifierGuide, exact_terms, first_order_terms
from unmask.config import ModelConfig, TrainConfig
from unmask.data import TokenDataset, default_tokenizer
from unmask.data.labels import prepare_labels, read_labelled
from unmask.errors import UnmaskError
from unmask.model import Transformer
from unmask.sampling import AncestralConfig, Conditioning, FirstHittingConfig, SamplerSpec, ancestral, first_hitting
from unmask.testing import BlockOracle, OracleModel
from unmask.train import train

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
    x = torch.full((3000, L), oracle.config.mask_id)
    guide = ClassifierGuide(exact, gamma=1.0, form="exact")
    out = ancestral(oracle, x, torch.Generator().manual_seed(0), AncestralConfig(steps=64), Conditioning(classifier_guide=guide))
    assert pvalue(out.tokens, exact.posterior(), oracle) > 1e-3 and guide.used() == "exact"
    # the same chain unguided samples p(x), which the test tells apart from p(x | y)
    plain = ancestral(oracle, x, torch.Generator().manual_seed(0), AncestralConfig(steps=64))
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


WORDS = {"pos": ["good", "great", "happy", "bright", "lovely", "sweet"], "neg": ["bad", "awful", "sad", "dark", "cruel", "bitter"]}
FILLER = ["the", "day", "was", "and", "a", "king", "queen", "night", "of", "my", "heart"]


def toy_jsonl(path, rows: int, seed: int):
    """Texts of four neutral words and two words of their label's list: separable by vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, 4) + rng.sample(WORDS[label], 2)
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_classifier_objective_learns_a_separable_set(tmp_path, small_data):
    tok = TokenDataset(small_data, "train").tokenizer
    folder = prepare_labels(tmp_path / "labels", tok, read_labelled(toy_jsonl(tmp_path / "train.jsonl", 160, 0)),
                            read_labelled(toy_jsonl(tmp_path / "val.jsonl", 32, 1)), max_length=32)
    model = ModelConfig(vocab_size=tok.vocab_size, context_len=32, n_layer=1, n_head=2, n_embd=32, labels=("neg", "pos"))
    cfg = TrainConfig(objective="classifier", steps=60, batch_size=16, warmup_steps=5, eval_every=60, precision="fp32")
    train(tmp_path / "run", model, cfg, folder, device="cpu", progress=False)
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    assert val["val_clean_accuracy"] >= 0.9 and val["val_accuracy"] > 0.6  # chance: about 0.5
    score = label_log_probs(tmp_path / "run", "pos", "cpu")
    texts = ["the king was good and happy", "the king was bad and cruel"]
    ids = [[tok.eos_id] + tok.encode(text) for text in texts]
    width = max(map(len, ids))
    tokens = torch.tensor([row + [tok.pad_id] * (width - len(row)) for row in ids])
    key_mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in ids])
    logp = score(tokens, key_mask)
    assert logp.dtype == torch.float32 and logp.shape == (2,) and logp[0] > logp[1]


def test_bad_labelled_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\n{"text": "no label"}\n')
    with pytest.raises(UnmaskError, match=r"bad.jsonl line 2: needs a field 'label'"):
        read_labelled(bad)
    bad.write_text('{"text": "fine", "label": "pos"}\n\n{"text": "fine", "label": "neg"}\nnot json\n')
    with pytest.raises(UnmaskError, match=r"bad.jsonl line 4 is not valid JSON"):
        read_labelled(bad)
    bad.write_text('{"text": "", "label": "pos"}\n')
    with pytest.raises(UnmaskError, match=r"bad.jsonl line 1: needs a non-empty string field 'text'"):
        read_labelled(bad)
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "fine", "label": "pos"}\n{"text": "fine", "label": "maybe"}\n')
    train_rows = read_labelled(toy_jsonl(tmp_path / "train.jsonl", 8, 0))
    with pytest.raises(UnmaskError, match=r"val.jsonl line 2: label 'maybe' is not among the training labels: neg, pos"):
        prepare_labels(tmp_path / "labels", default_tokenizer(), train_rows, read_labelled(val))
    with pytest.raises(UnmaskError, match=r"val.jsonl line 2: label 'maybe' is not one of the classifier's labels: neg, pos"):
        read_labelled(val, labels=("neg", "pos"))


def test_cli_trains_a_classifier_on_an_mdm_and_samples_with_it(tmp_path, small_data, capsys):
    """`unmask train --objective classifier --init-from MDM` (in this process), then `unmask sample --classifier
    --label --gamma` in a subprocess, and a wrong label refused in one line naming its flag."""
    mdm, _ = finetune_source(tmp_path, small_data)
    data = toy_jsonl(tmp_path / "toy.jsonl", 40, 0)
    assert main(["train", "--objective", "classifier", "--run-dir", str(tmp_path / "cls"), "--data", str(data), "--init-from", str(mdm),
                 "--steps", "2", "--batch-size", "4", "--precision", "fp32", "--device", "cpu"]) == 0
    trained = capsys.readouterr()
    val_line = next(line for line in (trained.out + trained.err).splitlines() if line.startswith("step 2: val"))
    assert "nats/row" in val_line and "ppl" not in val_line and "accuracy" in val_line  # a classifier's score, not a perplexity
    sample = ["sample", "--checkpoint", str(mdm), "--classifier", str(tmp_path / "cls"), "--label", "pos", "--length", "6", "--device", "cpu"]
    sampled = subprocess.run([sys.executable, "-m", "unmask", *sample, "--gamma", "2", "--steps", "6", "--num-samples", "2", "--json"],
                             capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr
    result = json.loads(sampled.stdout)
    assert len(result["samples"]) == 2 and result["dcbg"]["label"] == "pos" and result["dcbg"]["gamma"] == 2
    assert result["dcbg"]["used"] in ("exact", "first-order", "exact+first-order")
    capsys.readouterr()
    assert main([arg if arg != "pos" else "maybe" for arg in sample]) != 0
    assert "--label 'maybe' is not one of: neg, pos" in capsys.readouterr().err
