"""Decoding without host synchronisation: with static shapes (the GPU default) no step of any
sampler, of the block driver or of AR decoding reads the device; the tokens equal the dynamic
path's at temperature 0 and the samples keep the exact distribution. Host reads are counted by
:class:`unmask.host_reads.HostReads` (every operation that would make the host wait on a GPU); on
a CUDA machine ``torch.cuda.set_sync_debug_mode("error")`` checks the same."""

from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from unmask.config import ModelConfig
from unmask.host_reads import HostReads
from unmask.model import Transformer
from unmask.sampling import (
    AncestralConfig, ARConfig, Conditioning, ConfidenceConfig, FirstHittingConfig, SamplerSpec, ThresholdConfig, ar_sample,
)
from unmask.sampling.canvas import make_canvas
from unmask.sampling.shapes import POLL, decode_shapes
from unmask.testing import OracleModel, chi_square_counts

MASK = 30
CONFIGS = {
    "ancestral": AncestralConfig(steps=8, temperature=0.0),
    "first-hitting": FirstHittingConfig(k=2, temperature=0.0),
    "confidence": ConfidenceConfig(steps=8, temperature=0.0, cfg_scale=1.0),
    "confidence-schedule": ConfidenceConfig(steps=16, temperature=0.0, score="margin", allocation="schedule"),
    "threshold": ThresholdConfig(tau=0.5),
}


@pytest.fixture(scope="module")
def mdm():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def canvas():
    """Three prompts of different lengths (left padding, positions, a prompt mask for guidance), 8 MASKs each."""
    x, cond, _ = make_canvas([[1, 2, 3, 4, 5], [7, 8], [9]], 8, mask_id=MASK, pad_id=0)
    return x, replace(cond, prompt_mask=(x != MASK) & cond.key_mask)


def decode(kind: str, run):
    """(output, host reads before the first step, host reads of each step) of ``run(callback)`` under ``kind`` shapes."""
    per_step, seen = [], [0]

    with decode_shapes(kind), HostReads() as reads:
        def callback(_state):
            per_step.append(reads.count - seen[0])
            seen[0] = reads.count

        out = run(callback)
    return out, per_step, reads


def spec_run(model, x, cond, name, seed=0, block_len=0, temperature=0.0, cache=None):
    sampler = "confidence" if name.startswith("confidence") else name
    spec = SamplerSpec(sampler, replace(CONFIGS[name], temperature=temperature), block_len=block_len, cache=cache)
    return lambda callback: spec.run(model, x, torch.Generator(x.device).manual_seed(seed), cond, callback, start=5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_steps_read_nothing_and_give_the_dynamic_tokens(mdm, canvas, name, temperature):
    """The same tokens at any temperature: both layouts read the same uniform at a position (grid_uniforms)."""
    x, cond = canvas
    static, steps, _ = decode("static", spec_run(mdm, x, cond, name, temperature=temperature))
    dynamic, dynamic_steps, _ = decode("dynamic", spec_run(mdm, x, cond, name, temperature=temperature))
    assert torch.equal(static.tokens, dynamic.tokens)
    assert (static.tokens[:, 5:] != MASK).all()
    # before its first step a decode reads up to three times (the guidance check, whether anything is masked, the most
    # positions a row fills); no step reads after that,
    # except threshold decoding, which asks every POLL steps whether it is done
    assert steps[0] <= 3
    for number, reads in enumerate(steps[1:], start=2):
        assert reads <= (1 if name == "threshold" and number % POLL == 0 else 0)
    assert min(dynamic_steps) > 0  # the counter sees the reads of the dynamic path: it is not blind


def test_learned_absolute_positions_read_nothing(canvas):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32, positions="absolute")).eval()
    x, cond = canvas
    static, steps, _ = decode("static", spec_run(model, x, cond, "confidence", temperature=1.0))
    dynamic, _, _ = decode("dynamic", spec_run(model, x, cond, "confidence", temperature=1.0))
    assert torch.equal(static.tokens, dynamic.tokens) and steps[1:] == [0] * (len(steps) - 1)


@pytest.mark.parametrize("name", ["confidence", "first-hitting"])
def test_blocks_read_only_at_block_starts(mdm, canvas, name):
    x, cond = canvas
    static, steps, _ = decode("static", spec_run(mdm, x, cond, name, block_len=4, temperature=1.0))
    dynamic, _, _ = decode("dynamic", spec_run(mdm, x, cond, name, block_len=4, temperature=1.0))
    assert torch.equal(static.tokens, dynamic.tokens)
    block_starts = [0, len(steps) // 2]  # two blocks, the same steps each
    assert all(n == 0 for i, n in enumerate(steps) if i not in block_starts)
    assert steps[0] <= 3 and steps[block_starts[1]] <= 2, steps  # the guidance check once, then two reads per block start


@pytest.mark.parametrize("cache, refresh", [("prefix", 0), ("dual", 0), ("dual", 3)])
@pytest.mark.parametrize("name", ["confidence", "first-hitting"])
def test_prefix_and_dual_caches_read_nothing_and_give_the_dynamic_tokens(mdm, canvas, name, cache, refresh):
    """Static shapes drive the prefix and dual caches with the block's columns and one call count on
    the host: the same slots fed, the same tokens as the dynamic cache, no step reads the device."""
    from unmask.sampling import CacheConfig

    x, cond = canvas
    run = spec_run(mdm, x, cond, name, block_len=4, temperature=1.0, cache=CacheConfig(cache, refresh))
    static, steps, _ = decode("static", run)
    dynamic, _, _ = decode("dynamic", run)
    assert torch.equal(static.tokens, dynamic.tokens)
    block_starts = [0, len(steps) // 2]
    assert all(n == 0 for i, n in enumerate(steps) if i not in block_starts), steps


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_uniform_state_decoding_reads_nothing_and_gives_the_dynamic_tokens(canvas, temperature, cfg_scale):
    from unmask.sampling.uniform import UniformConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32, noise="uniform",
                                    time_conditioning=True)).eval()
    x, cond = canvas
    spec = SamplerSpec("uniform", UniformConfig(steps=6, temperature=temperature, cfg_scale=cfg_scale))

    def run(callback):
        return spec.run(model, x, torch.Generator().manual_seed(0), cond, callback, start=5)

    static, steps, _ = decode("static", run)
    dynamic, dynamic_steps, _ = decode("dynamic", run)
    assert torch.equal(static.tokens, dynamic.tokens) and (static.tokens[:, 5:] != MASK).all()
    assert steps[0] <= 4 and steps[1:] == [0] * 5, steps
    assert min(dynamic_steps[1:]) > 0


def test_ar_decoding_reads_nothing_and_equals_the_growing_cache_at_any_temperature():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32, causal=True)).eval()
    prompt = torch.randint(0, 30, (3, 5))
    key_mask = torch.ones_like(prompt, dtype=torch.bool)
    key_mask[1, :3] = False  # a left-padded row
    for temperature in (0.0, 1.0):
        config = ARConfig(max_new_tokens=12, temperature=temperature)

        def run(callback, config=config):
            return ar_sample(model, prompt, torch.Generator().manual_seed(3), config, Conditioning(key_mask=key_mask), callback)

        static, steps, reads = decode("static", run)
        dynamic, dynamic_steps, _ = decode("dynamic", run)
        assert reads.count == 0 and steps == [0] * 12
        assert min(dynamic_steps) > 0
        assert torch.equal(static.tokens, dynamic.tokens) and static.nfe == dynamic.nfe == 12


@pytest.mark.parametrize("name, config", [
    ("first-hitting", FirstHittingConfig(k=1)),
    ("ancestral", AncestralConfig(steps=64)),
    ("confidence", ConfidenceConfig(steps=4, score="random", temperature=1.0)),
])
def test_static_samples_keep_the_exact_distribution(name, config):
    """Static shapes draw in another order, from the same distribution: the oracle's joint (chi-square)."""
    oracle = OracleModel.random(vocab_size=3, length=4, concentration=1.0, seed=1)
    x = torch.full((6000, 4), oracle.config.mask_id)
    with decode_shapes("static"):
        out = SamplerSpec(name, config).run(oracle, x, torch.Generator().manual_seed(0))
    observed, expected = chi_square_counts(oracle, out.tokens)
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_the_counter_sees_each_kind_of_read():
    x = torch.arange(6.0).view(2, 3)
    with HostReads() as reads:
        x.sum().item(), bool(x.any()), x[x > 2], x.tolist(), x.nonzero()
        x * 2 + 1, x.argmax(dim=1), torch.where(x > 2, x, 0.0)  # no read
    assert reads.names == {"_local_scalar_dense.default": 2, "index.Tensor": 1, "tolist": 1, "nonzero.default": 1}
    assert torch.Tensor.tolist is not None and x.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_unknown_shapes_are_refused_by_name():
    from unmask.errors import OptionError

    with pytest.raises(OptionError, match="shapes"):
        with decode_shapes("fixed"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the device's own synchronisation check")
def test_cuda_decoding_never_synchronises(canvas):
    torch.manual_seed(0)
    mdm = Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32)).cuda().eval()
    ar = Transformer(ModelConfig(vocab_size=30, context_len=24, n_layer=2, n_head=2, n_embd=32, causal=True)).cuda().eval()
    x, cond = canvas
    x, cond = x.cuda(), cond.to("cuda")
    prompt = x[:, :5]
    for name in [n for n in CONFIGS if n != "threshold"]:  # threshold decoding reads whether it is done every POLL steps
        steps = []

        def step_checked(_state, steps=steps):  # from the first step on, any synchronisation raises
            torch.cuda.set_sync_debug_mode("error")
            steps.append(1)

        try:
            spec_run(mdm, x, cond, name)(step_checked)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert steps
    try:
        ar_sample(ar, prompt, torch.Generator("cuda").manual_seed(0), ARConfig(max_new_tokens=8), Conditioning(key_mask=cond.key_mask[:, :5]),
                  lambda _s: torch.cuda.set_sync_debug_mode("error"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
