"""Reward- and energy-guided decoding (unmask.steering) against exact answers: enumerable oracles
(chi-square at fixed seeds), a slow reference loop of SVDD, best-of-N's choice among the samples the
unguided sampler draws, and the documented token-for-token equalities with unguided decoding for
every guide x sampler x cache; then one command-line run and one HTTP request."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest
import torch
from scipy.stats import chisquare

from unmask.config import ModelConfig
from unmask.errors import OptionError
from unmask.model import Transformer
from unmask.sampling import AncestralConfig, Conditioning, SamplerSpec, ancestral
from unmask.steering import BestOfConfig, EDLMConfig, SMCConfig, SVDDConfig, TokenScore, steer
from unmask.steering.steering import side_generator
from unmask.testing import OracleModel

V, L = 3, 3


@pytest.fixture(scope="module")
def oracle():
    # concentration 0.5: a joint far from the product of its marginals (one-step decoding is biased)
    return OracleModel.random(vocab_size=V, length=L, concentration=0.5, seed=3)


def masks(rows: int, length: int = L, mask_id: int = V) -> torch.Tensor:
    return torch.full((rows, length), mask_id)


def counts(oracle: OracleModel, tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(oracle.index_of(tokens), minlength=V**L).double()


def pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    return chisquare(observed[keep].numpy(), (probs[keep] / probs[keep].sum() * observed.sum()).numpy()).pvalue


def twos(tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """A reward: how many 2s a sequence holds."""
    return ((tokens == 2) & key_mask).sum(dim=1).double()


def guided_run(model, x, guide, score, spec=SamplerSpec("first-hitting"), seed=0, cond=None):
    key = "energy" if isinstance(guide, EDLMConfig) else "reward"
    return spec.run(model, x, torch.Generator().manual_seed(seed), steer(cond or Conditioning(), guide, **{key: score}))


# ---------------------------------------------------------------- EDLM


def test_edlm_one_step_with_the_exact_energy_samples_the_joint(oracle):
    """One ancestral step unmasks every position from the factorised marginals: detectably biased.
    EDLM with E = -log p (the oracle's own joint) and many candidates picks x0 by self-normalised
    importance sampling, which samples p (up to an O(1/K) bias)."""
    spec = SamplerSpec("ancestral", AncestralConfig(steps=1))
    plain = spec.run(oracle, masks(4000), torch.Generator().manual_seed(0))
    assert pvalue(counts(oracle, plain.tokens), oracle.probs) < 1e-6
    exact = TokenScore(lambda tokens, key_mask: oracle.log_prob(tokens))
    out = guided_run(oracle, masks(4000), EDLMConfig(particles=128, window=1.0), exact, spec)
    assert pvalue(counts(oracle, out.tokens), oracle.probs) > 1e-3
    assert out.nfe == 2 and out.score_calls == 1 and out.scored_sequences == 4000 * 128


def test_edlm_outside_its_window_is_the_plain_sampler(oracle):
    exact = TokenScore(lambda tokens, key_mask: oracle.log_prob(tokens))
    spec = SamplerSpec("ancestral", AncestralConfig(steps=3))
    plain = spec.run(oracle, masks(64), torch.Generator().manual_seed(4))
    out = guided_run(oracle, masks(64), EDLMConfig(particles=4, window=0.0), exact, spec, seed=4)
    assert torch.equal(out.tokens, plain.tokens) and out.score_calls == 0


# ---------------------------------------------------------------- SMC


def test_smc_targets_the_reward_tilted_distribution(oracle):
    """Many independent SMC runs (one per prompt row, 16 particles each, the exact first-hitting
    sampler as proposal): the kept particles follow p(x) exp(r(x) / alpha) / Z. (A kept particle
    is off by O(1/N); at alpha = 2 that is below what 2000 samples see, at alpha = 1 it is not.)"""
    alpha = 2.0
    target = oracle.probs * (twos(oracle.seqs, torch.ones_like(oracle.seqs, dtype=torch.bool)) / alpha).exp()
    out = guided_run(oracle, masks(2000), SMCConfig(particles=16, alpha=alpha, ess=0.5), TokenScore(twos, density=False), seed=1)
    observed = counts(oracle, out.tokens)
    assert pvalue(observed, target) > 1e-3
    assert pvalue(observed, oracle.probs) < 1e-6  # and the tilt is there to see


def test_smc_with_a_huge_alpha_recovers_the_unguided_distribution(oracle):
    """alpha -> infinity: the weights barely differ, the kept particles follow p itself (with
    alpha = 1 the same reward is detectably there, test above)."""
    many = guided_run(oracle, masks(3000), SMCConfig(particles=4, alpha=1e9), TokenScore(twos, density=False), seed=5)
    assert pvalue(counts(oracle, many.tokens), oracle.probs) > 1e-3


# ---------------------------------------------------------------- best-of-N and SVDD


def test_best_of_keeps_the_highest_reward_of_its_samples(oracle):
    """Its N samples per row are the unguided sampler's over the N copies of the row (same seed);
    the kept one has the highest reward among them, the first of equal ones."""
    n, rows = 5, 40
    spec = SamplerSpec("ancestral", AncestralConfig(steps=2))
    samples = spec.run(oracle, masks(rows * n), torch.Generator().manual_seed(9)).tokens.view(rows, n, L)
    out = guided_run(oracle, masks(rows), BestOfConfig(particles=n), TokenScore(twos, density=False), spec, seed=9)
    for b in range(rows):
        rewards = [(samples[b, j] == 2).sum().item() for j in range(n)]
        assert torch.equal(out.tokens[b], samples[b, rewards.index(max(rewards))])
    assert out.score_calls == 1 and out.scored_sequences == rows * n


def exact_argmax_fill(oracle: OracleModel, row: torch.Tensor) -> torch.Tensor:
    """x̂0 of one row by enumeration: each MASK takes its most probable token under p(x^i | the rest)."""
    out, mask_id = row.clone(), oracle.config.mask_id
    agree = ((oracle.seqs == row) | (row == mask_id)).all(dim=1)
    for i in (row == mask_id).nonzero().flatten().tolist():
        marginal = torch.zeros(V, dtype=torch.float64).index_add_(0, oracle.seqs[agree, i], oracle.probs[agree])
        out[i] = int(marginal.argmax())
    return out


def test_svdd_alpha_zero_keeps_the_best_candidate_at_every_step(oracle):
    """Against a slow reference: at every step candidate 0 is the ancestral step with the decoding's
    generator, candidates 1..M-1 the same step of copies with the guide's generator (seeded from the
    decoding's seed); each is valued, row by row, by the reward of its exact argmax completion; the
    first best is kept."""
    m, rows, cfg = 3, 24, AncestralConfig(steps=3)
    g = torch.Generator().manual_seed(7)
    side = side_generator(g)
    state = ancestral.start(oracle, masks(rows), cfg)
    while not state.done:
        own = ancestral.step(oracle, state, g, cfg)
        copies = torch.arange(rows).repeat_interleave(m - 1)
        others = ancestral.step(oracle, replace(state, tokens=state.tokens[copies], row_nfe=state.row_nfe[copies]), side, cfg)
        kept = own.tokens.clone()
        for b in range(rows):
            candidates = [own.tokens[b]] + [others.tokens[b * (m - 1) + j] for j in range(m - 1)]
            values = [int((exact_argmax_fill(oracle, c) == 2).sum()) for c in candidates]
            kept[b] = candidates[values.index(max(values))]
        state = replace(own, tokens=kept)
    out = guided_run(oracle, masks(rows), SVDDConfig(particles=m, alpha=0.0), TokenScore(twos, density=False),
                     SamplerSpec("ancestral", cfg), seed=7)
    assert torch.equal(out.tokens, state.tokens)
    assert out.nfe == 3 * 3 - 1  # per step: candidate 0, the others, their estimates (none once nothing is masked)


# ---------------------------------------------------------------- compositions


@pytest.fixture(scope="module")
def network():
    """A tiny random Transformer (a real network for the caches; its answers need not be good)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=5, context_len=8, n_layer=1, n_head=2, n_embd=16)
    return Transformer(cfg).eval()


SAMPLERS = {"ancestral": {"steps": 4}, "first-hitting": {}, "confidence": {"steps": 4}, "threshold": {"temperature": 1.0}}
CACHES = {"none": {}, "dual": {"block_len": 2, "cache": "dual"}}  # dual: a call feeds the block only, the estimates are full forwards
CONSTANT = TokenScore(lambda tokens, key_mask: torch.zeros(tokens.shape[0]), spec="constant")
# guide -> (config, rows per prompt the equal unguided decoding runs over)
EQUAL = {"best-of": (BestOfConfig(particles=3), 3), "smc": (SMCConfig(particles=3, alpha=0.5), 3),
         "svdd": (SVDDConfig(particles=3, alpha=1.0), 1), "edlm": (EDLMConfig(particles=3, window=0.0), 1)}
EQUAL_KEY = {"best-of": "reward", "smc": "reward", "svdd": "reward", "edlm": "energy",
             SVDDConfig: "reward", SMCConfig: "reward", EDLMConfig: "energy"}
RANDOMISH = TokenScore(lambda tokens, key_mask: (tokens * key_mask).sum(dim=1).double().sin())  # a score that tells rows apart


@pytest.mark.parametrize("sampler,cache", list(itertools.product(SAMPLERS, CACHES)))
def test_every_guide_composes_and_a_constant_score_changes_nothing(network, sampler, cache):
    """Each guide around each sampler and cache, with a prompt, classifier-free guidance and a
    batch of two prompt rows: a constant score leaves the unguided decoding token for token (best-of
    and SMC: its first particle of each row is the unguided decoding of N copies of the row; SVDD:
    candidate 0 is kept; EDLM with an empty window: the sampler's steps)."""
    mask_id = network.config.mask_id
    x = torch.tensor([[4, 1, mask_id, mask_id, mask_id, mask_id], [2, 3, mask_id, mask_id, mask_id, mask_id]])
    prompt = torch.zeros_like(x, dtype=torch.bool)
    prompt[:, :2] = True
    cond = Conditioning(prompt_mask=prompt)
    spec = SamplerSpec.from_options(sampler=sampler, cfg_scale=0.5, **SAMPLERS[sampler], **CACHES[cache])
    for name, (config, n) in EQUAL.items():
        copies = torch.arange(2).repeat_interleave(n)
        plain = spec.run(network, x[copies], torch.Generator().manual_seed(1), cond.rows(copies), start=2)
        out = spec.run(network, x, torch.Generator().manual_seed(1), steer(cond, config, **{EQUAL_KEY[name]: CONSTANT}), start=2)
        assert torch.equal(out.tokens, plain.tokens[::n]), (name, sampler, cache)
    for config in (SVDDConfig(particles=2, alpha=0.0), SMCConfig(particles=2), EDLMConfig(particles=2, window=1.0)):
        out = spec.run(network, x, torch.Generator().manual_seed(1), steer(cond, config, **{EQUAL_KEY[type(config)]: RANDOMISH}), start=2)
        assert (out.tokens != mask_id).all() and torch.equal(out.tokens[:, :2], x[:, :2])


def test_guided_decoding_is_reproducible_and_a_guide_moves_it(network):
    mask_id = network.config.mask_id
    x = torch.full((3, 6), mask_id)
    spec = SamplerSpec("ancestral", AncestralConfig(steps=6))
    threes = TokenScore(lambda tokens, key_mask: (tokens == 3).sum(dim=1).double(), density=False)
    runs = [spec.run(network, x, torch.Generator().manual_seed(0), steer(None, "svdd", threes, particles=4)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    plain = spec.run(network, x, torch.Generator().manual_seed(0))
    assert (runs[0].tokens == 3).sum() > (plain.tokens == 3).sum()


def test_errors_name_the_parameter():
    score = TokenScore(twos, density=False)
    cases = [
        (lambda: steer(None, "beam", score), "guide"),
        (lambda: steer(None, "svdd", None), "reward"),
        (lambda: steer(None, "edlm", score), "reward"),
        (lambda: steer(None, "edlm", energy=score), "energy"),  # a reward-only score is no energy
        (lambda: steer(None, "svdd", score, window=0.5), "window"),
        (lambda: steer(None, "svdd", score, particles=0), "particles"),
        (lambda: steer(None, "smc", score, alpha=0.0), "alpha"),
        (lambda: steer(None, None, score), "reward"),
        (lambda: steer(None, "svdd", "regex:("), "reward"),
        (lambda: steer(None, "svdd", "bleu:x"), "reward"),
        (lambda: steer(None, "svdd", "python:no_such_module_here:f"), "reward"),
    ]
    for make, param in cases:
        with pytest.raises(OptionError) as err:
            make()
        assert err.value.param == param, (param, str(err.value))


def test_the_meter_counts_score_calls_apart_from_network_calls(oracle):
    out = guided_run(oracle, masks(8), SVDDConfig(particles=4, alpha=0.0), TokenScore(twos, density=False))
    assert out.score_calls == L and out.scored_sequences == L * 8 * 4 and out.score_seconds >= 0
    assert out.nfe == 3 * L - 1 and int(out.row_nfe.sum()) == 8 * (L * (1 + 3 + 4) - 4)


# ---------------------------------------------------------------- the command line and the server


from serving import LIMITS, model_id, post, served, statuses_documented  # noqa: E402,F401  (autouse: answers checked against /openapi.json)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny random MDM, AR and classifier checkpoint with a small BPE (the tests need networks, not good ones)."""
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import RunConfig, TrainConfig
    from unmask.data import shakespeare_works, train_bpe

    root = tmp_path_factory.mktemp("guided_runs")
    tok = train_bpe([shakespeare_works("train")[0][1][:20000]], vocab_size=300)
    torch.manual_seed(0)
    for objective in ("mdm", "ar", "classifier"):
        cfg = ModelConfig(vocab_size=tok.vocab_size, context_len=32, n_layer=1, n_head=2, n_embd=16, causal=objective == "ar",
                          labels=("comedy", "tragedy") if objective == "classifier" else ())
        save_checkpoint(root / objective, Transformer(cfg), RunConfig(cfg, TrainConfig(objective=objective)), TrainerState(0, 0),
                        tok.to_json())
    return root


def test_unmask_sample_with_a_guide(runs, capsys):
    """``unmask sample --guide svdd --reward regex:...``: its counts of network and score calls (first-hitting:
    per step the sampler's call, the other candidates' and the estimates', none once nothing is masked)."""
    cmd = [sys.executable, "-m", "unmask", "sample", "--checkpoint", str(runs / "mdm"), "--length", "4", "--sampler", "first-hitting",
           "--num-samples", "2", "--guide", "svdd", "--reward", "regex:.*[a-z].*", "--particles", "4", "--alpha", "0",
           "--device", "cpu", "--json"]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert res["guide"] == "svdd" and res["score_calls"] == 4 and res["scored_sequences"] == 4 * 2 * 4
    assert res["nfe"] == 3 * 4 - 1 and res["network_rows"] == 2 * (4 * (1 + 3 + 4) - 4) and len(res["samples"]) == 2
    from unmask.cli import main

    assert main(cmd[3:-1] + ["--window", "0.5"]) == 2  # an option the guide does not take: a one-line error naming the flags
    err = capsys.readouterr().err
    assert err.startswith("error: --window") and "--guide svdd" in err and err.count("\n") == 1, err


def test_a_request_names_a_configured_reward(runs):
    """A guided request names one of the server's rewards; its answer depends on its seed alone; an
    unknown name (a spec, say) is a 400 listing the configured ones; particles are bounded."""
    from unmask.serve.engine import Engine
    from unmask.steering import parse_score

    rewards = {"letters": parse_score("regex:.*[a-z].*"), "judge": parse_score(f"ar:{runs / 'ar'}")}
    with served(Engine(runs / "mdm", "cpu", LIMITS, rewards=rewards)) as url:
        body = {"model": model_id(url), "prompt": "ROMEO.", "max_tokens": 4, "steps": 4, "n": 2, "seed": 3}
        res = post(url, {**body, "guide": "smc", "reward": "judge", "particles": 3})
        assert res.status_code == 200, res.text
        again = post(url, {**body, "guide": "smc", "reward": "judge", "particles": 3})
        assert len(res.json()["choices"]) == 2 and again.json()["choices"] == res.json()["choices"]
        unknown = post(url, {**body, "guide": "svdd", "reward": "python:os:getcwd"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "reward"
        assert "'letters'" in unknown.json()["error"]["message"] and "'judge'" in unknown.json()["error"]["message"]
        many = post(url, {**body, "guide": "svdd", "reward": "letters", "particles": LIMITS.max_particles + 1})
        assert many.status_code == 400 and many.json()["error"]["param"] == "particles"
        wrong = post(url, {**body, "guide": "edlm", "energy": "letters"})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "energy"
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert card["rewards"] == {"letters": "regex (reward)", "judge": "ar (reward or energy)"}


def test_the_classifier_score_reads_whole_canvases(runs):
    """``classifier:RUN:LABEL`` scores [EOS ; prompt ; text] as the classifier was trained, padding hidden."""
    from unmask.checkpoint import checkpoint_tokenizer
    from unmask.classifier import label_log_probs
    from unmask.steering import Candidates, parse_score

    tok = checkpoint_tokenizer(runs / "mdm")
    score = parse_score(f"classifier:{runs / 'classifier'}:tragedy")
    tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])
    cands = Candidates(tokens, torch.tensor([[True, True, True], [True, True, False]]), [[3, 4], []], tok)
    direct = label_log_probs(runs / "classifier", "tragedy")
    expected = [direct(torch.tensor([[tok.eos_id, 3, 4, 5, 6, 7]]))[0], direct(torch.tensor([[tok.eos_id, 8, 9]]))[0]]
    assert torch.allclose(score(cands), torch.stack(expected).double(), atol=1e-5)
    with pytest.raises(OptionError) as err:
        parse_score(f"classifier:{runs / 'classifier'}:farce")
    assert err.value.param == "reward" and "farce" in str(err.value)
