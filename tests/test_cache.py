"""KV caches of MDM decoding against exact references: the uncached sampler (same seed, same tokens)
wherever a cache cannot change the result, and the full forward pass for the model's cache API."""

from __future__ import annotations

import pytest
import torch

from unmask.config import ModelConfig
from unmask.model import KVCache, Transformer
from unmask.sampling import (
    AncestralConfig, CacheConfig, ConfidenceConfig, FirstHittingConfig, ThresholdConfig, ancestral, confidence,
    first_hitting, threshold,
)
from unmask.sampling import ColumnBlocks, SamplerSpec, decode_blocks, make_canvas

SAMPLERS = {
    "confidence": (confidence, ConfidenceConfig(steps=12, temperature=1.0)),
    "threshold": (threshold, ThresholdConfig(tau=0.3, temperature=1.0)),
    "first-hitting": (first_hitting, FirstHittingConfig(k=2)),
    "ancestral": (ancestral, AncestralConfig(steps=12)),
}


def tiny(block_causal: int = 0, seed: int = 0) -> Transformer:
    """A random float64 Transformer: float64 makes rounding differences between a cached and an
    uncached forward (different matrix shapes) far too small to flip a sampled token."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=13, context_len=32, n_layer=2, n_head=2, n_embd=16, block_causal=block_causal, init_std=0.5)
    return Transformer(config).double().eval()


def decode(model, x, cond, name, cache, block_len=4, start=4, cfg_scale=0.0, stop_token=None):
    fn, config = SAMPLERS[name]
    if cfg_scale:
        config = type(config)(**{**config.__dict__, "cfg_scale": cfg_scale})
    steps = getattr(config, "steps", None)
    if steps is not None:  # the spec splits the total over the blocks
        config = type(config)(**{**config.__dict__, "steps": steps * (x.shape[1] - start) // block_len})
    generator = torch.Generator().manual_seed(7)
    if model.config.block_causal:  # SamplerSpec.run decodes a block model on its own grid with its exact cache: the canvas caches
        return decode_blocks(model, x, generator, fn, config, ColumnBlocks(block_len), start, cond, stop_token=stop_token, cache=cache)
    return SamplerSpec(fn.name, config, block_len, cache).run(model, x, generator, cond, start=start, stop_token=stop_token)


def canvas(model, prompts, length):
    x, cond, width = make_canvas(prompts, length, model.config.mask_id, pad_id=0, separator=0)
    return x, cond, width


def test_forward_over_a_slice_with_cached_keys_equals_the_full_forward():
    model = tiny()
    x = torch.randint(0, 14, (3, 12))
    full = model(x)
    cache = KVCache.empty(model.config, 3, 13, x.device, torch.float64)
    slots = torch.arange(12).expand(3, 12)
    keys = torch.ones(3, 13, dtype=torch.bool)
    keys[:, 12] = False  # a scratch slot nobody attends to
    model(x, key_mask=keys, kv_cache=cache, cache_index=slots)
    part = torch.tensor([[2, 5, 6], [0, 1, 11], [7, 8, 9]])
    out = model(x.gather(1, part), key_mask=keys, kv_cache=cache, cache_index=part)
    assert torch.allclose(out, full.gather(1, part[..., None].expand(-1, -1, full.shape[-1])), atol=1e-12)
    at = torch.zeros(3, 3, dtype=torch.bool)
    at[0, 1] = at[2, 0] = True
    assert torch.allclose(model(x.gather(1, part), key_mask=keys, kv_cache=cache, cache_index=part, logits_at=at), out[at], atol=1e-12)


@pytest.mark.parametrize("kind", ["prefix", "dual", "delayed"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_cache_refreshed_every_call_gives_the_uncached_tokens(kind, name):
    model = tiny()
    x, cond, width = canvas(model, [[1, 2, 3], [4, 5, 6]], 16)
    plain = decode(model, x, cond, name, CacheConfig(), start=width)
    cached = decode(model, x, cond, name, CacheConfig(kind, refresh=1), start=width)
    assert torch.equal(plain.tokens, cached.tokens)
    assert plain.nfe == cached.nfe and torch.equal(plain.row_nfe, cached.row_nfe)


@pytest.mark.parametrize("kind", ["prefix", "dual", "delayed"])
def test_cache_with_guidance_and_left_padding_refreshed_every_call_gives_the_uncached_tokens(kind):
    model = tiny(seed=1)
    x, cond, width = canvas(model, [[1, 2], [4, 5, 6, 7, 8], [9]], 12)
    assert cond.key_mask is not None  # rows of different lengths: left padding
    for name in ("confidence", "first-hitting"):
        plain = decode(model, x, cond, name, CacheConfig(), start=width, cfg_scale=1.5)
        cached = decode(model, x, cond, name, CacheConfig(kind, refresh=1), start=width, cfg_scale=1.5)
        assert torch.equal(plain.tokens, cached.tokens), name


@pytest.mark.parametrize("kind,refresh", [("prefix", 0), ("prefix", 3), ("dual", 0), ("dual", 2)])
@pytest.mark.parametrize("name", ["confidence", "threshold", "first-hitting"])
def test_block_causal_model_prefix_and_dual_caches_are_exact_for_any_refresh(kind, refresh, name):
    # no position attends to a later block, so cached keys/values of earlier (finished) blocks
    # cannot go stale, and the suffix is never attended to
    model = tiny(block_causal=4, seed=2)
    x, cond, width = canvas(model, [[1, 2, 3], [7, 8, 9]], 16)
    assert width == 4  # the prompt (with its separator) is one model block
    plain = decode(model, x, cond, name, CacheConfig(), start=width)
    cached = decode(model, x, cond, name, CacheConfig(kind, refresh=refresh), start=width)
    assert torch.equal(plain.tokens, cached.tokens)
    assert cached.nfe == plain.nfe


def test_a_cache_changes_a_bidirectional_models_tokens_without_refresh():
    # the caches are approximations: the test above is not vacuous
    model = tiny(seed=0)
    x, cond, width = canvas(model, [[1, 2, 3]] * 8, 16)
    plain = decode(model, x, cond, "confidence", CacheConfig(), start=width)
    for kind in ("prefix", "dual", "delayed"):
        assert not torch.equal(plain.tokens, decode(model, x, cond, "confidence", CacheConfig(kind), start=width).tokens), kind


def test_cache_feeds_fewer_positions():
    calls = []
    model = tiny()
    original = model.forward

    def spy(tokens, **kw):
        calls.append(tokens.shape[1])
        return original(tokens, **kw)

    model.forward = spy
    x, cond, width = canvas(model, [[1, 2, 3]], 16)
    decode(model, x, cond, "confidence", CacheConfig("dual"), start=width)
    # one full forward (20 positions) per block of 4, then the block only
    assert calls[0] == 20 and set(calls) == {20, 4}
    calls.clear()
    decode(model, x, cond, "confidence", CacheConfig("prefix"), start=width)
    assert calls[:3] == [20, 16, 16]  # refresh, then block + suffix


@pytest.mark.parametrize("refresh,full", [(0, [0, 4, 8, 12]), (3, [0, 3, 4, 7, 8, 11, 12, 15])])
def test_delayed_cache_refreshes_at_each_block_start_and_every_refresh_calls(refresh, full):
    """As dKV-Cache's semi-autoregressive decoding, which starts every block from a full forward:
    4 blocks of 4 calls, a full forward (20 positions) at each block start, and with
    --cache-refresh N also at the N-th call after the last; the other calls feed the masked
    positions and those decoded at the call before."""
    calls = []
    model = tiny()
    original = model.forward
    model.forward = lambda tokens, **kw: calls.append(tokens.shape[1]) or original(tokens, **kw)
    x, cond, width = canvas(model, [[1, 2, 3]], 16)
    out = decode(model, x, cond, "confidence", CacheConfig("delayed", refresh=refresh), start=width)
    assert len(calls) == out.nfe == 16
    assert [i for i, n in enumerate(calls) if n == 20] == full


def test_rows_that_stop_leave_the_batch():
    for seed in range(20):  # a model and a stop token that row 0 produces in its first block and row 1 nowhere in its first three
        model = tiny(seed=seed)
        x, cond, width = canvas(model, [[1, 2], [5, 6]], 16)
        plain = decode(model, x, cond, "confidence", CacheConfig("dual"), start=width)
        gen = plain.tokens[:, width:]
        eos = next((int(v) for v in gen[0, :4] if v not in gen[1, :12]), None)
        if eos is not None:
            break
    out = decode(model, x, cond, "confidence", CacheConfig("dual"), start=width, stop_token=eos)
    assert torch.equal(out.tokens[0, width : width + 4], gen[0, :4])  # identical up to the stop
    assert (out.tokens[0, width + 4 :] == eos).all()  # then the row left: the rest is the stop token
    assert out.row_nfe[0] < out.row_nfe[1]  # and it took no more calls
    assert not (out.tokens == model.config.mask_id).any()
