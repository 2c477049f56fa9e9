"""The sampler suite against exact answers: oracle distributions, expected NFE, float precision,
per-row selection, guidance, KV cache, padding, blocks, infilling."""

import math

import pytest
import torch
from scipy.stats import chisquare

from unmask.config import ModelConfig
from unmask.errors import OptionError
from unmask.model import Transformer, at_positions
from unmask.testing import OracleModel, chi_square_counts
from unmask.sampling import (
    AncestralConfig, ARConfig, ColumnBlocks, Conditioning, ConfidenceConfig, FirstHittingConfig, ThresholdConfig, ancestral,
    ar_sample, confidence, decode_blocks, exponential_race, first_hitting, threshold,
)
from unmask.sampling.base import categorical
from unmask.sampling.confidence import confidence_scores


@pytest.fixture(scope="module")
def oracle():
    return OracleModel.random(vocab_size=3, length=4, concentration=1.0, seed=1)


def pvalue(oracle, samples):
    observed, expected = chi_square_counts(oracle, samples)
    return chisquare(observed.numpy(), expected.numpy()).pvalue


class FixedLogits(torch.nn.Module):
    """A fake network returning given logits (B, L, V) whatever the input: exact, known outputs."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        b, l, v = logits.shape
        self.config = ModelConfig(vocab_size=v, context_len=l, n_layer=1, n_head=1, n_embd=2)
        self.register_buffer("logits", logits)
        self.calls = 0

    def forward(self, tokens, logits_at=None, **_):
        self.calls += 1
        out = self.logits[: tokens.shape[0]].expand(tokens.shape[0], -1, -1) if self.logits.shape[0] == 1 else self.logits[: tokens.shape[0]]
        return out if logits_at is None else at_positions(out, logits_at)


def masks(oracle, n):
    return torch.full((n, oracle.config.context_len), oracle.config.mask_id)


def test_first_hitting_reproduces_the_distribution(oracle):
    gen = torch.Generator().manual_seed(0)
    out = first_hitting(oracle, masks(oracle, 8000), gen, FirstHittingConfig(k=1))
    assert out.nfe == 4  # exactly L network calls
    assert (out.tokens != oracle.config.mask_id).all()
    assert pvalue(oracle, out.tokens) > 1e-3


def test_parallel_first_hitting_commits_k_per_call_and_is_exact_when_positions_are_independent():
    """k = 2 of L = 4: two calls, each committing exactly 2 positions per row. When the distribution
    factorises, the conditionals are the marginals and parallel unmasking loses nothing: the samples
    follow it exactly (the k = L test below shows the same sampler is biased when it does not)."""
    marginals = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.45, 0.1, 0.45], [0.05, 0.7, 0.25]])
    indep = OracleModel.factorised(marginals)
    states = []
    out = first_hitting(indep, masks(indep, 8000), torch.Generator().manual_seed(0), FirstHittingConfig(k=2), callback=states.append)
    assert out.nfe == 2 and [(s.tokens != indep.config.mask_id).sum(dim=1).unique().tolist() for s in states] == [[2], [4]]
    assert pvalue(indep, out.tokens) > 1e-3


def test_parallel_first_hitting_is_biased_with_k_equal_length(oracle):
    """k = L unmasks everything at once from the marginals: the test must detect it."""
    out = first_hitting(oracle, masks(oracle, 8000), torch.Generator().manual_seed(0), FirstHittingConfig(k=4))
    assert out.nfe == 1 and pvalue(oracle, out.tokens) < 1e-6


@pytest.mark.parametrize("n,l", [(64, 16), (128, 32), (32, 64)])
def test_ancestral_skips_steps_where_nothing_unmasks(n, l):
    """RADD's caching: a row's network call is needed only at a step where one of its tokens
    unmasks. Mean calls per row within 2% of n (1 - (1 - 1/n)^l)."""
    fake = FixedLogits(torch.zeros(1, l, 5))
    x = torch.full((3000, l), fake.config.mask_id)
    out = ancestral(fake, x, torch.Generator().manual_seed(n + l), AncestralConfig(steps=n))
    expected = n * (1 - (1 - 1 / n) ** l)
    assert abs(out.row_nfe.double().mean().item() - expected) < 0.02 * expected
    assert out.nfe <= n


V_ZIPF, CHUNKS, CHUNK = 2000, 12, 16000


def unmask_and_tail_draws(draw) -> tuple[int, int, float, int]:
    """Draw CHUNKS x CHUNK times from the categorical of one many-step ancestral update: a
    2000-token Zipf with total mass 1e-3 next to "stay masked" (1 - 1e-3), by ``draw(log_weights
    (N, V + 1)) -> indices (N,)``. Returns (unmask count, count of tail tokens (each below 3e-7),
    the tail's exact mass, draws)."""
    zipf = 1 / torch.arange(1, V_ZIPF + 1, dtype=torch.float64)
    zipf /= zipf.sum()
    weights = torch.cat([(1e-3 * zipf).log(), torch.tensor([math.log(1 - 1e-3)], dtype=torch.float64)])
    tail = torch.zeros(V_ZIPF + 1, dtype=torch.bool)
    tail[:V_ZIPF] = 1e-3 * zipf < 3e-7
    unmask = in_tail = 0
    for _ in range(CHUNKS):
        indices = draw(weights.expand(CHUNK, -1))
        unmask += (indices < V_ZIPF).sum().item()
        in_tail += tail[indices].sum().item()
    return unmask, in_tail, (1e-3 * zipf[tail[:V_ZIPF]]).sum().item(), CHUNKS * CHUNK


def test_float32_undersamples_unmask_event_and_tail():
    """float64 matches the exact unmask and tail rates within their standard errors; float32
    cannot: its noise -log E saturates at 16.6 (U <= 1 - 2^-24), so outcomes whose log-weight is
    more than ~16.6 below the stay outcome are (nearly) never drawn, and the quantised noise
    under-samples the whole region of weights below ~3e-7."""
    rates = {}
    for precision in ("float64", "float32"):
        gen = torch.Generator().manual_seed(0)
        rates[precision] = unmask_and_tail_draws(lambda w: exponential_race(w, gen, precision))
    (u64, t64, p_tail, n), (u32, t32, _, _) = rates["float64"], rates["float32"]
    assert abs(u64 - 1e-3 * n) < 4 * math.sqrt(1e-3 * n)  # exact rates within their standard error
    assert abs(t64 - p_tail * n) < 4 * math.sqrt(p_tail * n)
    assert t32 < t64 and u32 <= u64  # fixed seeds: float32 draws fewer from the tail (the total deficit, ~1-3%, needs ~1e7 draws to see)
    # the mechanism: the largest float32 noise is -log(-log(1 - 2^-24)) = 16.6; float64 goes far beyond
    u32_max = torch.tensor(1 - 2**-24, dtype=torch.float32)
    assert -torch.log(-torch.log(u32_max)).item() < 16.7 < -math.log(-math.log1p(-(2.0**-53)))


def test_inverse_cdf_draws_the_exact_unmask_and_tail_rates():
    """The samplers' float64 draw (inverse CDF) on the same categorical, from float32 logits as the
    network gives them: the unmask and tail rates within their standard errors."""
    gen = torch.Generator().manual_seed(0)
    unmask, in_tail, p_tail, n = unmask_and_tail_draws(lambda w: categorical(w.float(), gen)[0])
    assert abs(unmask - 1e-3 * n) < 4 * math.sqrt(1e-3 * n)
    assert abs(in_tail - p_tail * n) < 4 * math.sqrt(p_tail * n)


def slow_confidence(model, x, steps, score):
    """Reference: Python loops over rows and positions, one commit decision at a time."""
    x = x.clone()
    for step in range(steps):
        logits = model(x).float()
        p = logits.double().softmax(-1)
        for b in range(x.shape[0]):
            masked = [i for i in range(x.shape[1]) if x[b, i] == model.config.mask_id]
            if not masked:
                continue
            k = -(-len(masked) // (steps - step))
            x0 = logits[b].argmax(-1)
            def s(i):
                if score == "low_confidence":
                    return p[b, i, x0[i]].item()
                if score == "margin":
                    top = p[b, i].topk(2).values
                    return (top[0] - top[1]).item()
                return (p[b, i] * p[b, i].log()).sum().item()
            chosen = sorted(masked, key=lambda i: (-s(i), i))[:k]
            for i in chosen:
                x[b, i] = x0[i]
    return x


@pytest.mark.parametrize("score", ["low_confidence", "margin", "entropy"])
def test_confidence_at_temperature_zero_matches_the_slow_argmax_reference(score):
    """Temperature 0 commits the argmax proposals (the slow reference), whatever the seed."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, context_len=12, n_layer=1, n_head=2, n_embd=32)).eval()
    x = torch.full((3, 12), 20)
    x[0, :3] = torch.tensor([1, 2, 3])
    x[2, 5] = 7
    cfg = ConfidenceConfig(steps=4, score=score, temperature=0.0)
    a = confidence(model, x, torch.Generator().manual_seed(0), cfg).tokens
    b = confidence(model, x, torch.Generator().manual_seed(1), cfg).tokens
    assert torch.equal(a, b)
    assert torch.equal(a, slow_confidence(model, x, 4, score))


def test_selection_is_per_row():
    """Row 0 is confident everywhere, row 1 nowhere: each row still commits exactly k tokens."""
    logits = torch.zeros(2, 8, 6)
    logits[0, :, 0] = 10.0
    fake = FixedLogits(logits)
    x = torch.full((2, 8), 6)
    states = []
    out = confidence(fake, x, torch.Generator().manual_seed(0), ConfidenceConfig(steps=4, temperature=0.0), callback=states.append)
    assert [(s.tokens != 6).sum(dim=1).tolist() for s in states] == [[2, 2], [4, 4], [6, 6], [8, 8]]
    assert (out.tokens != 6).all()


def test_threshold_never_stalls():
    """Adversarial: uniform logits, every top-1 probability below tau: one commit per step, no loop."""
    fake = FixedLogits(torch.zeros(2, 10, 50))
    out = threshold(fake, torch.full((2, 10), 50), torch.Generator().manual_seed(0), ThresholdConfig(tau=0.9))
    assert (out.tokens != 50).all() and out.nfe == 10
    confident = torch.full((1, 10, 50), -10.0)
    confident[..., 3] = 10.0
    out = threshold(FixedLogits(confident), torch.full((1, 10), 50), torch.Generator().manual_seed(0), ThresholdConfig(tau=0.9))
    assert out.nfe == 1 and (out.tokens == 3).all()  # all above tau: one step


def test_cfg_zero_is_bit_identical(oracle):
    x = masks(oracle, 500)
    x[:, 0] = 1
    prompt = torch.zeros_like(x, dtype=torch.bool)
    prompt[:, 0] = True
    plain = ancestral(oracle, x, torch.Generator().manual_seed(3), AncestralConfig(steps=8))
    zero = ancestral(oracle, x, torch.Generator().manual_seed(3), AncestralConfig(steps=8, cfg_scale=0.0), Conditioning(prompt_mask=prompt))
    assert torch.equal(plain.tokens, zero.tokens)
    with pytest.raises(OptionError, match="^cfg_scale needs a prompt") as refused:  # the parameter's name: callers spell it
        ancestral(oracle, x, torch.Generator(), AncestralConfig(steps=2, cfg_scale=1.0))
    assert refused.value.param == "cfg_scale" and refused.value.spelled(lambda name: "--cfg").startswith("--cfg needs a prompt")


@pytest.mark.parametrize("sampler", ["ancestral", "first-hitting"])
def test_cfg_samples_are_proportional_to_guided_conditionals(oracle, sampler):
    """One masked position, prompt = position 0: guided sampling draws x_2 with probability exactly
    proportional to p_c^(1+w) / p_u^w, p_c = p(x_2 | x_0, x_1, x_3) and p_u = p(x_2 | x_1, x_3)
    (the prompt masked), both by enumeration. Unguided samples fail the same test."""
    m, w = oracle.config.mask_id, 1.5
    x = torch.tensor([[1, 2, m, 0]] * 8000)
    prompt = torch.zeros_like(x, dtype=torch.bool)
    prompt[:, 0] = True
    seqs, probs = oracle.seqs, oracle.probs
    p_c = torch.stack([probs[(seqs[:, 0] == 1) & (seqs[:, 1] == 2) & (seqs[:, 2] == v) & (seqs[:, 3] == 0)].sum() for v in range(3)])
    p_u = torch.stack([probs[(seqs[:, 1] == 2) & (seqs[:, 2] == v) & (seqs[:, 3] == 0)].sum() for v in range(3)])
    guided = p_c ** (1 + w) / p_u**w
    guided = guided / guided.sum()

    def draw(scale):
        gen = torch.Generator().manual_seed(4)
        if sampler == "ancestral":
            return ancestral(oracle, x, gen, AncestralConfig(steps=1, cfg_scale=scale), Conditioning(prompt_mask=prompt)).tokens
        return first_hitting(oracle, x, gen, FirstHittingConfig(cfg_scale=scale), Conditioning(prompt_mask=prompt)).tokens

    def p_fit(tokens):
        counts = torch.bincount(tokens[:, 2], minlength=3).double()
        return chisquare(counts.numpy(), (guided * len(tokens)).numpy()).pvalue

    assert p_fit(draw(w)) > 1e-3
    assert p_fit(draw(0.0)) < 1e-6


def test_ar_kv_cache_equals_uncached_and_padding_is_exact():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32, causal=True)).eval()
    prompt = torch.randint(0, 30, (3, 5))
    cached = ar_sample(model, prompt, torch.Generator(), ARConfig(max_new_tokens=10, temperature=0.0))
    plain = ar_sample(model, prompt, torch.Generator(), ARConfig(max_new_tokens=10, temperature=0.0, kv_cache=False))
    assert torch.equal(cached.tokens, plain.tokens)
    # a short prompt left-padded in a batch decodes exactly as alone
    alone = ar_sample(model, prompt[:1, 2:], torch.Generator(), ARConfig(max_new_tokens=10, temperature=0.0))
    padded = prompt.clone()
    padded[0, :2] = 0
    key_mask = torch.ones_like(padded, dtype=torch.bool)
    key_mask[0, :2] = False
    batch = ar_sample(model, padded, torch.Generator(), ARConfig(max_new_tokens=10, temperature=0.0), Conditioning(key_mask=key_mask))
    assert torch.equal(batch.tokens[0, 2:], alone.tokens[0])


def test_mdm_padding_is_exact():
    from unmask.sampling.canvas import make_canvas

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32)).eval()
    x, cond, width = make_canvas([[1, 2, 3, 4, 5], [7, 8]], 6, mask_id=30, pad_id=0)
    assert width == 5 and cond.key_mask[1].tolist() == [False] * 3 + [True] * 8
    batch = model(x, key_mask=cond.key_mask, positions=cond.positions)
    alone = model(torch.tensor([[7, 8] + [30] * 6]))
    assert torch.allclose(batch[1, 3:], alone[0], atol=1e-5)
    out = confidence(model, x, torch.Generator(), ConfidenceConfig(steps=6, temperature=0.0), cond)
    assert torch.equal(out.tokens[:, :5], x[:, :5])  # prompts and padding untouched


def test_blocks_decode_left_to_right_and_validate(oracle):
    model = FixedLogits(torch.randn(1, 12, 7, generator=torch.Generator().manual_seed(0)))
    x = torch.full((2, 12), 7)
    x[:, :4] = 1
    seen = []
    # steps are the total over the blocks: 4 over 2 blocks, 2 per block
    out = decode_blocks(model, x, torch.Generator(), confidence, ConfidenceConfig(steps=4, temperature=0.0), ColumnBlocks(4), 4,
                        callback=seen.append)
    assert (out.tokens != 7).all() and out.nfe == 4
    for state in seen:  # never a token right of a block that is not finished
        filled = (state.tokens[0] != 7).tolist()
        first_masked = filled.index(False) if False in filled else 12
        assert not any(filled[first_masked:][4 - (first_masked % 4) if first_masked % 4 else 4:])
    with pytest.raises(OptionError, match="^block_len=5 must divide") as refused:
        decode_blocks(model, x, torch.Generator(), confidence, ConfidenceConfig(steps=2), ColumnBlocks(5), 4)
    assert refused.value.param == "block_len"


def test_config_errors_name_the_parameter():
    """Library errors name the parameter; the command line spells it as its flag (test_cli), the server as its field."""
    for make, param in [(lambda: ThresholdConfig(tau=1.5), "tau"), (lambda: ConfidenceConfig(score="vibes"), "score"),
                        (lambda: AncestralConfig(top_p=0), "top_p")]:
        with pytest.raises(OptionError, match=f"^{param}") as refused:
            make()
        assert refused.value.param == param


def test_scores_by_hand():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]]))
    x0 = torch.tensor([[0, 1]])
    g = torch.Generator()
    assert torch.allclose(confidence_scores(logits, x0, "low_confidence", g), torch.tensor([[0.7, 0.35]], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(confidence_scores(logits, x0, "margin", g), torch.tensor([[0.5, 0.05]], dtype=torch.float64), atol=1e-6)
    h = -(torch.tensor([0.7, 0.2, 0.1]) * torch.tensor([0.7, 0.2, 0.1]).log()).sum()
    assert confidence_scores(logits, x0, "entropy", g)[0, 0].item() == pytest.approx(-h.item(), abs=1e-6)


# -- time-conditioned networks: every sampler passes a t (stated in its docstring) or refuses --


def time_conditioned_transformer():
    """A tiny time-conditioned Transformer that records (tokens, t, key_mask) of every call."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=7, context_len=10, n_layer=1, n_head=2, n_embd=16, time_conditioning=True)).eval()
    model.seen = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: mod.seen.append((args[0].clone(), kwargs.get("t"), kwargs.get("key_mask"))), with_kwargs=True
    )
    return model


@pytest.mark.parametrize("sampler", ["confidence", "threshold", "confidence-blocks"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_time_conditioned_step_samplers_use_the_masked_fraction(sampler, cfg_scale):
    """Confidence and threshold steps have no chain time: t = masked / real (padding excluded)
    positions of each input row, the unconditional CFG half included."""
    from unmask.sampling.canvas import make_canvas

    model = time_conditioned_transformer()
    x, cond, width = make_canvas([[1, 2, 3, 4], [5, 6]], 6, mask_id=7, pad_id=0)
    gen = torch.Generator().manual_seed(0)
    if sampler == "confidence":
        out = confidence(model, x, gen, ConfidenceConfig(steps=3, cfg_scale=cfg_scale), cond)
    elif sampler == "threshold":
        out = threshold(model, x, gen, ThresholdConfig(tau=0.5, cfg_scale=cfg_scale), cond)
    else:
        out = decode_blocks(model, x, gen, confidence, ConfidenceConfig(steps=2, cfg_scale=cfg_scale), ColumnBlocks(3), width, cond)
    assert (out.tokens[:, width:] != 7).all()
    assert len(model.seen) == out.nfe
    for tokens, t, key_mask in model.seen:
        real = key_mask.sum(dim=1).float()
        assert torch.equal(t, ((tokens == 7) & key_mask).sum(dim=1).float() / real)


@pytest.mark.parametrize("name", ["ancestral", "first-hitting"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_time_conditioned_chain_samplers_in_blocks_get_the_canvas_time(name, cfg_scale):
    """With --block-len a chain covers one block and its clock restarts at 1 in each, which says
    nothing of the rest of the canvas: the network gets the masked fraction of its input row
    (padding excluded; the unconditional CFG half its own), as in confidence steps."""
    from unmask.sampling import SamplerSpec, make_canvas

    model = time_conditioned_transformer()
    x, cond, width = make_canvas([[1, 2, 3, 4], [5, 6]], 6, mask_id=7, pad_id=0)
    steps = {"steps": 12} if name == "ancestral" else {}
    spec = SamplerSpec.from_options(name, block_len=2, cfg_scale=cfg_scale, **steps)
    out = spec.run(model, x, torch.Generator().manual_seed(0), cond, start=width)
    assert (out.tokens[:, width:] != 7).all() and len(model.seen) == out.nfe > 3
    for tokens, t, key_mask in model.seen:
        real = key_mask.sum(dim=1).float()
        assert torch.equal(t.float(), ((tokens == 7) & key_mask).sum(dim=1).float() / real)


def test_time_conditioned_chain_samplers_use_their_chain_time():
    """Ancestral: the grid time t of the step from t to s; first-hitting: the hitting times, strictly
    decreasing in (0, 1) (their exact law is tested on a time-conditioned oracle)."""
    model = time_conditioned_transformer()
    x = torch.full((3, 10), 7)
    x[:, 0] = 1
    out = ancestral(model, x, torch.Generator().manual_seed(0), AncestralConfig(steps=4, cfg_scale=0.5), Conditioning(prompt_mask=x != 7))
    assert (out.tokens != 7).all()
    times = [t[0].item() for _, t, _ in model.seen]
    assert times == pytest.approx([1.0, 0.75, 0.5, 0.25]) and all(torch.all(t == t[0]) for _, t, _ in model.seen)
    model.seen.clear()
    out = first_hitting(model, x, torch.Generator().manual_seed(0), FirstHittingConfig())
    assert (out.tokens != 7).all() and out.nfe == 9 == len(model.seen)
    times = torch.stack([t for _, t, _ in model.seen])  # (calls, B)
    assert (times > 0).all() and (times < 1).all() and (times[1:] < times[:-1]).all()


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.bfloat16, 0.1)])
def test_time_conditioned_model_runs_in_bf16_and_float64(dtype, atol):
    """The time embedding follows the weights' dtype: the same logits as in float32 (to the dtype's
    precision), and a sampler runs through it."""
    model = time_conditioned_transformer()
    x = torch.tensor([[1, 2, 7, 7, 3, 7, 7, 7, 7, 7]] * 2)
    t = torch.tensor([0.3, 0.8])
    want = model(x, t=t)
    other = model.to(dtype)
    got = other(x, t=t.to(dtype))
    assert got.dtype == dtype and torch.allclose(got.float(), want, atol=atol)
    out = first_hitting(other, x, torch.Generator().manual_seed(0), FirstHittingConfig())
    assert (out.tokens != 7).all()


def test_cached_is_another_name_of_ancestral():
    """``--sampler cached`` (RADD's caching) runs the ancestral sampler, which already calls the
    network only on rows where a token unmasks: the same spec, tokens and calls, time-conditioned
    networks included."""
    from unmask.sampling import SamplerSpec

    model = time_conditioned_transformer()
    x = torch.full((4, 10), 7)
    x[:, 0] = 1
    cached, plain = (SamplerSpec.from_options(name, steps=16) for name in ("cached", "ancestral"))
    assert cached == plain and cached.sampler == "ancestral" and SamplerSpec("cached").sampler == "ancestral"
    a, b = (spec.run(model, x, torch.Generator().manual_seed(0)) for spec in (cached, plain))
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe and torch.equal(a.row_nfe, b.row_nfe)
