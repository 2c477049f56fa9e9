"""The uniform-state sampler (UDLM, Duo) against exact references: its posterior step against Bayes'
rule (chi-square), the whole chain against an enumerable joint with the exact denoiser, the greedy
tail, fixed prompts, the unconditional half of guidance, and its routing through every entry point
(decoding_for, generate, the CLI in a subprocess, the server) with the options it refuses by name."""

import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from unmask.cli import main
from unmask.config import ModelConfig
from unmask.errors import OptionError
from unmask.model import Transformer, at_positions
from unmask.sampling import Conditioning, SamplerSpec, UniformConfig, make_canvas, uniform
from unmask.sampling.decoding import decoding_for
from unmask.sampling.uniform import clean_logits, draw_posterior
from unmask.schedule import Schedule

UNMASK = Path(sys.executable).parent / "unmask"
# an explicit joint over K = 3 tokens at L = 2 positions, strongly correlated (row: x^1, column: x^2)
JOINT = torch.tensor([[0.30, 0.02, 0.03], [0.05, 0.20, 0.02], [0.01, 0.07, 0.30]], dtype=torch.float64)


def bayes_posterior(x: torch.Tensor, z_t: int, alpha_t: float, alpha_s: float) -> torch.Tensor:
    """q(z_s | z_t, x) (K,) by Bayes' rule: prior q(z_s | x) = a_s x + (1 - a_s) / K times the
    likelihood q(z_t | z_s) = a_t|s [z_s = z_t] + (1 - a_t|s) / K, normalised."""
    k = x.shape[0]
    ratio = alpha_t / alpha_s
    likelihood = torch.full((k,), (1 - ratio) / k, dtype=torch.float64)
    likelihood[z_t] += ratio
    joint = (alpha_s * x + (1 - alpha_s) / k) * likelihood
    return joint / joint.sum()


def udlm_formula(x: torch.Tensor, z_t: int, alpha_t: float, alpha_s: float) -> torch.Tensor:
    """The posterior as UDLM writes it (docs/algorithms.md, 'Uniform-state ancestral sampler')."""
    k = x.shape[0]
    ratio = alpha_t / alpha_s
    onehot = torch.nn.functional.one_hot(torch.tensor(z_t), k).double()
    top = k * alpha_t * x * onehot + (ratio - alpha_t) * onehot + (alpha_s - alpha_t) * x + (1 - ratio) * (1 - alpha_s) / k
    return top / (k * alpha_t * x[z_t] + 1 - alpha_t)


class UniformOracle(nn.Module):
    """The exact denoiser of an explicit joint p (V^L,) under the uniform forward process: at time t
    (alpha(t) of ``schedule``) and tokens z_t it returns log p(x^i | z_t^{-i}), the data posterior of
    each position given the OTHER positions' tokens: the x_theta that makes the UDLM/Duo posterior
    step exact. ``own=True`` returns log p(x^i | z_t) instead (the position's own token counted too)."""

    def __init__(self, probs: torch.Tensor, vocab_size: int, length: int, schedule: str = "linear", own: bool = False) -> None:
        super().__init__()
        self.config = ModelConfig(name="oracle", vocab_size=vocab_size, context_len=length, n_layer=1, n_head=1, n_embd=2,
                                  time_conditioning=True, noise="uniform")
        self.seqs = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))  # (N, L)
        self.probs = (probs.flatten() / probs.sum()).double()
        self.onehot = nn.functional.one_hot(self.seqs, vocab_size).double()  # (N, L, V)
        self.schedule, self.own = Schedule(schedule), own

    def posterior(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, L, V) probabilities of x^i given z_t = tokens (B, L) at times t (B,)."""
        alpha = self.schedule.alpha(t.double())[:, None, None]
        k = self.config.vocab_size
        log_lik = (alpha * (tokens[:, None, :] == self.seqs[None]) + (1 - alpha) / k).log()  # (B, N, L): log q(z^j | x^j)
        total = log_lik.sum(dim=2, keepdim=True)
        weight = self.probs[None, :, None] * (total if self.own else total - log_lik).exp()  # (B, N, L)
        return torch.einsum("bnl,nlv->blv", weight, self.onehot) / weight.sum(dim=1)[..., None]

    def forward(self, tokens, t=None, logits_at=None, **_):
        if tokens.shape[1] == self.seqs.shape[1] and bool((t == t[0]).all()):  # one time: a table over the V^L rows, looked up
            powers = self.config.vocab_size ** torch.arange(tokens.shape[1] - 1, -1, -1)
            table = self.posterior(self.seqs, t[:1].expand(len(self.seqs)))
            logits = table[(tokens * powers).sum(dim=1)].log().float()
        else:
            logits = self.posterior(tokens, t).log().float()
        return logits if logits_at is None else at_positions(logits, logits_at)


def joint_pvalue(samples: torch.Tensor, joint: torch.Tensor) -> float:
    k = joint.shape[0]
    counts = torch.bincount(samples[:, 0] * k + samples[:, 1], minlength=k * k).double()
    return chisquare(counts.numpy(), (joint.flatten() * samples.shape[0]).numpy()).pvalue


@pytest.mark.parametrize("x,z_t,alpha_t,alpha_s,precision", [
    ([0, 0, 1, 0], 2, 0.3, 0.7, "float64"),  # one-hot x, z_t = x
    ([0, 1, 0, 0], 3, 0.3, 0.7, "float64"),  # one-hot x, z_t != x
    ([0.1, 0.2, 0.3, 0.4], 0, 0.3, 0.7, "float64"),  # a soft x_theta
    ([0.1, 0.2, 0.3, 0.4], 3, 0.0, 0.05, "float64"),  # from t = 1 of the cosine schedule (alpha = 0)
    ([0.1, 0.2, 0.3, 0.4], 1, 0.6, 1.0, "float64"),  # the last step, s = 0
    ([0.5, 0.0, 0.25, 0.25], 1, 0.3, 0.7, "float32"),  # the float32 ablation, a token x_theta excludes
])
def test_posterior_step_draws_the_exact_posterior(x, z_t, alpha_t, alpha_s, precision):
    x = torch.tensor(x, dtype=torch.float64)
    exact = bayes_posterior(x, z_t, alpha_t, alpha_s)
    assert torch.allclose(udlm_formula(x, z_t, alpha_t, alpha_s), exact, atol=1e-12)  # the formula the docs give is Bayes' rule
    n = 200_000
    draws = draw_posterior(x.log().expand(n, 4), torch.full((n,), z_t), alpha_t, alpha_s, torch.Generator().manual_seed(0), precision)
    counts = torch.bincount(draws, minlength=4).double()
    support = exact > 0
    assert (counts[~support] == 0).all()
    assert chisquare(counts[support].numpy(), (exact[support] * n).numpy()).pvalue > 1e-3


def test_the_other_positions_posterior_makes_the_step_the_exact_mixture():
    """Plugging x_theta^i = p(x^i | z_t^{-i}) into the posterior gives the exact reverse step, the
    mixture sum_v p(x^i = v | z_t) q(z_s | z_t, e_v) over the data posterior; plugging p(x^i | z_t)
    itself does not (it counts the position's own token twice)."""
    others, own = UniformOracle(JOINT, 3, 2), UniformOracle(JOINT, 3, 2, own=True)
    z = others.seqs
    t = torch.full((len(z),), 0.6, dtype=torch.float64)
    alpha_t, alpha_s = (Schedule().alpha(torch.tensor(v, dtype=torch.float64)).item() for v in (0.6, 0.3))
    x_theta, data = others.posterior(z, t), own.posterior(z, t)
    worst_plugged, worst_own = 0.0, 0.0
    for b, i in itertools.product(range(len(z)), range(2)):
        zi = int(z[b, i])
        mixture = sum(data[b, i, v] * bayes_posterior(torch.eye(3, dtype=torch.float64)[v], zi, alpha_t, alpha_s) for v in range(3))
        worst_plugged = max(worst_plugged, (bayes_posterior(x_theta[b, i], zi, alpha_t, alpha_s) - mixture).abs().max().item())
        worst_own = max(worst_own, (bayes_posterior(data[b, i], zi, alpha_t, alpha_s) - mixture).abs().max().item())
    assert worst_plugged < 1e-12 and worst_own > 1e-2


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_many_steps_reproduce_the_joint(kind):
    """With the exact denoiser and steps >> L (two positions rarely move in the same step) the chain
    samples p: chi-square over the 9 sequences; one network call per step."""
    oracle = UniformOracle(JOINT, 3, 2, kind)
    out = uniform(oracle, torch.full((6000, 2), oracle.config.mask_id), torch.Generator().manual_seed(0),
                  UniformConfig(steps=400, schedule=kind))
    assert out.nfe == out.steps == 400 and (out.row_nfe == 400).all()
    assert joint_pvalue(out.tokens, JOINT) > 1e-3


def chain_law(oracle: UniformOracle, steps: int) -> torch.Tensor:
    """The exact law (V^L,) of the chain's output: the uniform start propagated through every step's
    transition matrix, z_t -> z_s with probability prod_i q(z_s^i | z_t^i, x_theta^i) (Bayes' rule)."""
    seqs, schedule = oracle.seqs, oracle.schedule
    law = torch.full((len(seqs),), 1 / len(seqs), dtype=torch.float64)
    for k in range(steps):
        t, s = (steps - k) / steps, (steps - k - 1) / steps
        alpha_t, alpha_s = (schedule.alpha(torch.tensor(v, dtype=torch.float64)).item() for v in (t, s))
        x_theta = oracle.posterior(seqs, torch.full((len(seqs),), t, dtype=torch.float64))
        move = torch.ones(len(seqs), len(seqs), dtype=torch.float64)
        for i in range(seqs.shape[1]):
            q = torch.stack([bayes_posterior(x_theta[a, i], int(seqs[a, i]), alpha_t, alpha_s) for a in range(len(seqs))])
            move *= q[:, seqs[:, i]]
        law = law @ move
    return law


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_exact_law_of_the_chain_converges_to_the_joint(kind):
    """The error of the chain is its factorisation over positions: its exact law approaches p as 1/n
    (total variation at 50, 200 and 800 steps; 0.3% at 200)."""
    oracle = UniformOracle(JOINT, 3, 2, kind)
    tv = [0.5 * (chain_law(oracle, n) - JOINT.flatten()).abs().sum().item() for n in (50, 200, 800)]
    assert tv[1] < tv[0] / 3.5 and tv[2] < tv[1] / 3.5 and tv[2] < 1e-3


@pytest.mark.parametrize("own,steps", [(True, 200), (False, 1)])
def test_a_wrong_denoiser_or_one_step_is_detectably_biased(own, steps):
    """The test above can fail: p(x^i | z_t) plugged in, or a single step (independent positions)."""
    oracle = UniformOracle(JOINT, 3, 2, own=own)
    out = uniform(oracle, torch.full((6000, 2), oracle.config.mask_id), torch.Generator().manual_seed(0), UniformConfig(steps=steps))
    assert joint_pvalue(out.tokens, JOINT) < 1e-6


def test_greedy_tail_takes_the_argmax_at_the_last_step():
    oracle = UniformOracle(JOINT, 3, 2)
    x = torch.full((2000, 2), oracle.config.mask_id)
    for greedy in (True, False):
        states = []
        uniform(oracle, x, torch.Generator().manual_seed(0), UniformConfig(steps=4, greedy_tail=greedy), callback=states.append)
        before, last = states[-2].tokens, states[-1].tokens
        argmax = oracle(before, t=torch.full((len(x),), 0.25)).argmax(dim=-1)
        assert torch.equal(last, argmax) is greedy  # a draw (no greedy tail) leaves some position off the argmax


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=16, context_len=16, n_layer=1, n_head=2, n_embd=16, time_conditioning=True, noise="uniform")
    return Transformer(config).eval()


def canvas(net, length=6):
    return make_canvas([[3, 4, 5], [6]], length, net.config.mask_id, 0, separator=1)


def test_prompt_and_padding_never_change_and_the_rest_moves(net):
    x, cond, start = canvas(net)
    states = []
    config = UniformConfig(steps=6, cfg_scale=1.5, temperature=0.8, top_p=0.9)
    out = uniform(net, x, torch.Generator().manual_seed(0), config, cond, callback=states.append)
    free = x == net.config.mask_id
    assert len(states) == 6 and out.nfe == 6
    for state in states:
        assert torch.equal(state.tokens[~free], x[~free])
        assert ((state.tokens[free] >= 0) & (state.tokens[free] < net.config.vocab_size)).all()  # real tokens, never MASK
    assert any(not torch.equal(a.tokens, b.tokens) for a, b in zip(states, states[1:]))


def test_the_unconditional_half_is_the_row_without_its_prompt(net):
    """Guidance hides the prompt from attention and closes up the positions: the unconditional
    logits are those of the row [EOS ; generated] with the prompt left out (rotary positions are
    relative, so the two agree up to float rounding)."""
    row = torch.tensor([[1, 3, 4, 5, 7, 8, 9, 10]])
    prompt = torch.zeros_like(row, dtype=torch.bool)
    prompt[:, 1:4] = True
    free = torch.zeros_like(prompt)
    free[:, 4:] = True
    w, t = 2.0, 0.4
    guided, _ = clean_logits(net, row, free, t, Conditioning(prompt_mask=prompt), w)
    time = torch.full((1,), t, dtype=torch.float64)
    cond_logits = net(row, t=time)[0, 4:]
    without = net(torch.cat([row[:, :1], row[:, 4:]], dim=1), t=time)[0, 1:]
    assert torch.allclose(guided, (1 + w) * cond_logits - w * without, atol=1e-4)


def test_deterministic_under_a_seed(net):
    x, cond, _ = canvas(net)
    config = UniformConfig(steps=5)
    a, b, c = (uniform(net, x, torch.Generator().manual_seed(seed), config, cond).tokens for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("options,param", [
    *[({"sampler": name}, "sampler") for name in ("ancestral", "cached", "first-hitting", "confidence", "threshold")],
    ({"block_len": 2}, "block_len"),
    *[({"cache": kind}, "cache") for kind in ("prefix", "dual", "delayed")],
])
def test_samplers_blocks_and_caches_of_masked_models_are_refused_by_name(net, options, param):
    with pytest.raises(OptionError) as refused:
        decoding_for(net.config, 6, options)
    assert refused.value.param == param


def test_refusals_of_the_other_kind_and_of_what_needs_masked_positions(net):
    x, cond, _ = canvas(net)
    masked = ModelConfig(vocab_size=16, context_len=16, n_layer=1, n_head=2, n_embd=16)
    gen = torch.Generator().manual_seed(0)
    for make in (
        lambda: decoding_for(masked, 6, {"sampler": "uniform"}),
        lambda: uniform(Transformer(masked), x, gen),
        lambda: SamplerSpec("ancestral").run(net, x, gen, cond),
        lambda: SamplerSpec("uniform").run(Transformer(masked), x, gen, cond),
    ):
        with pytest.raises(OptionError) as refused:
            make()
        assert refused.value.param == "sampler"
    svdd = SimpleNamespace(guide=SimpleNamespace(name="svdd"))
    for cond_of, param in ((Conditioning(constraint=object()), "constraint"), (Conditioning(steering=svdd), "guide"), (None, "cfg_scale")):
        with pytest.raises(OptionError) as refused:
            uniform(net, x, gen, UniformConfig(cfg_scale=1.0), cond_of)
        assert refused.value.param == param
    assert decoding_for(net.config, 6, {}).sampler == "uniform"  # the default of a uniform-state model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder of a random-weight uniform-state model with a small BPE tokenizer."""
    from unmask.checkpoint import TrainerState, save_checkpoint
    from unmask.config import RunConfig, TrainConfig
    from unmask.data import train_bpe
    from unmask.objectives.registry import OBJECTIVES

    tok = train_bpe(["ROMEO and JULIET, a tale of love. " * 40, "KING: what say you? " * 20], vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, context_len=32, n_layer=1, n_head=2, n_embd=32, time_conditioning=True,
                         noise="uniform")
    objective = "udlm" if "udlm" in OBJECTIVES else "mdm"
    folder = tmp_path_factory.mktemp("uniform") / "run"
    save_checkpoint(folder, Transformer(config), RunConfig(config, TrainConfig(objective=objective)), TrainerState(0, 0), tok.to_json())
    return folder


def test_generate_prompts_infill_and_stop_at_eos(run):
    from unmask.generation import generate

    out = generate(run, prompts=["ROMEO", "KING:"], length=6, steps=3, greedy_tail=True, stop_at_eos=True, seed=1)
    assert out["sampler"] == "uniform" and out["nfe"] == 3
    assert [s["text"][:5] for s in out["samples"]] == ["ROMEO", "KING:"]
    filled = generate(run, infill="ROMEO [MASK:3] love", num_samples=2, steps=4)
    assert all(s["text"].startswith("ROMEO") and s["text"].endswith(" love") for s in filled["samples"])


def test_cli_samples_a_uniform_run_in_a_subprocess(run):
    proc = subprocess.run([str(UNMASK), "sample", "--checkpoint", str(run), "--prompt", "ROMEO", "--length", "8", "--steps", "4",
                           "--greedy-tail", "--num-samples", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["sampler"] == "uniform" and res["nfe"] == 4 and [len(s["tokens"]) for s in res["samples"]] == [8, 8]


@pytest.mark.parametrize("flags,named", [(["--sampler", "confidence"], "--sampler"), (["--cache", "dual"], "--cache"),
                                         (["--block-len", "4"], "--block-len")])
def test_cli_refusals_name_the_flag(capsys, run, flags, named):
    assert main(["sample", "--checkpoint", str(run), "--length", "8", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_server_answers_and_streams_only_the_final_text(run):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from serving import LIMITS, complete, events, model_id, post, served
    from unmask.serve.engine import Engine

    body = {"prompt": "ROMEO", "max_tokens": 6, "steps": 4, "seed": 2, "greedy_tail": True}
    with served(Engine(run, "cpu", LIMITS)) as url:
        whole = complete(url, **body)["choices"][0]["text"]
        streamed = [data for _, data in events(url, {**body, "stream": True}) if data != "[DONE]"]
        refused = post(url, {"model": model_id(url), **body, "greedy_tail": None, "sampler": "ancestral"})
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == whole
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "sampler"
