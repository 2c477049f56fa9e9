"""The Transformer: shapes, causal vs bidirectional attention, KV cache, presets."""

import pytest
import torch

from unmask.config import PRESETS, ModelConfig
from unmask.errors import UnmaskError
from unmask.model import KVCache, Transformer


def tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=50, context_len=16, n_layer=2, n_head=2, n_embd=32, **kw)


def test_shapes_and_mask_row():
    model = Transformer(tiny())
    x = torch.randint(0, 51, (3, 16))  # id 50 is MASK, an input-only row
    assert model(x).shape == (3, 16, 50)
    assert model.embed.num_embeddings == 51 and model.head.out_features == 50


def test_bidirectional_sees_the_future_and_causal_does_not():
    torch.manual_seed(0)
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 50
    bi, ar = Transformer(tiny()), Transformer(tiny(causal=True))
    assert not torch.allclose(bi(x)[0, 0], bi(y)[0, 0])
    assert torch.allclose(ar(x)[0, :-1], ar(y)[0, :-1], atol=1e-6)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(tiny(causal=True)).eval()
    x = torch.randint(0, 50, (2, 12))
    full = model(x)
    cache = KVCache.empty(model.config, 2, 16, x.device, torch.float32)
    first = model(x[:, :7], kv_cache=cache)
    rest = [model(x[:, i : i + 1], kv_cache=cache) for i in range(7, 12)]
    assert torch.allclose(torch.cat([first, *rest], dim=1), full, atol=1e-5)


def test_non_embedding_param_count_matches_module():
    for cfg in (tiny(), tiny(time_conditioning=True), PRESETS["tiny"]):
        model = Transformer(cfg)
        embedding = model.embed.weight.numel() + model.head.weight.numel()
        assert cfg.non_embedding_params() == model.num_params() - embedding
        assert cfg.total_params() == model.num_params()


def test_time_conditioned_model_needs_t():
    model = Transformer(tiny(time_conditioning=True))
    x = torch.randint(0, 51, (2, 16))
    assert model(x, t=torch.rand(2)).shape == (2, 16, 50)
    with pytest.raises(UnmaskError, match="time-conditioned.*pass t .*masked_fraction"):
        model(x)


def test_bad_configs_name_the_value():
    with pytest.raises(UnmaskError, match="unknown preset 'huge'"):
        ModelConfig.from_name("huge")
    with pytest.raises(UnmaskError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)


def moved_positions(model, x: torch.Tensor, at: int) -> list[int]:
    """Positions whose logits change when token ``at`` of the (1, L) ``x`` changes."""
    y = x.clone()
    y[0, at] = (x[0, at] + 1) % 50
    with torch.no_grad():
        diff = (model(x) - model(y)).abs().amax(dim=-1)[0]
    return diff.gt(1e-6).nonzero().squeeze(1).tolist()


def test_causal_sliding_window_reaches_window_minus_one_back_per_layer():
    # a query sees itself and the window - 1 keys before it; two layers reach 2 * (4 - 1) = 6 back
    torch.manual_seed(0)
    x = torch.randint(0, 50, (1, 16))
    assert moved_positions(Transformer(tiny(causal=True, sliding_window=4)).eval(), x, 0) == list(range(7))
    assert moved_positions(Transformer(tiny(causal=True)).eval(), x, 0) == list(range(16))


def test_bidirectional_sliding_window_is_symmetric():
    # an MDM's window: keys less than `window` positions away on either side
    torch.manual_seed(0)
    x = torch.randint(0, 50, (1, 16))
    assert moved_positions(Transformer(tiny(sliding_window=4)).eval(), x, 15) == list(range(9, 16))
    assert moved_positions(Transformer(tiny(sliding_window=4)).eval(), x, 7) == list(range(1, 14))


def test_kv_cache_with_sliding_window_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(tiny(causal=True, sliding_window=3)).eval()
    x = torch.randint(0, 50, (2, 12))
    full = model(x)
    cache = KVCache.empty(model.config, 2, 16, x.device, torch.float32)
    first = model(x[:, :5], kv_cache=cache)
    rest = [model(x[:, i : i + 1], kv_cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_forward_refuses_more_positions_than_the_context():
    model = Transformer(tiny(causal=True))
    with pytest.raises(UnmaskError, match="17 positions.*context_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UnmaskError, match="17 positions.*context_len=16"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.tensor([[0, 5, 10, 16]]))
    model(torch.zeros(1, 16, dtype=torch.long), positions=torch.arange(20, 36)[None])  # a window further on
    cache = KVCache.empty(model.config, 1, 20, "cpu", torch.float32)
    model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(UnmaskError, match="context_len=16"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_sliding_window_config_checks():
    with pytest.raises(UnmaskError, match="sliding_window=-1"):
        tiny(sliding_window=-1)
    with pytest.raises(UnmaskError, match="sliding_window.*block_causal"):
        tiny(sliding_window=4, block_causal=4)


def test_rotary_positions_are_relative_and_absolute_ones_are_not():
    torch.manual_seed(0)
    x = torch.randint(0, 51, (2, 8))
    shifted = torch.arange(5, 13)[None].expand(2, 8)
    rope, absolute = Transformer(tiny()).eval(), Transformer(tiny(positions="absolute")).eval()
    assert "pos_embed.weight" not in rope.state_dict() and rope.pos_embed is None
    assert absolute.pos_embed.weight.shape == (16, 32)
    assert torch.allclose(rope(x), rope(x, positions=shifted), atol=1e-5)  # scores depend on offsets only
    assert not torch.allclose(absolute(x), absolute(x, positions=shifted), atol=1e-3)
    assert ModelConfig.from_dict(tiny(positions="absolute").to_dict()).positions == "absolute"
    assert tiny(positions="absolute").total_params() == absolute.num_params()


def test_absolute_positions_checks():
    with pytest.raises(UnmaskError, match="positions='alibi'"):
        tiny(positions="alibi")
    with pytest.raises(UnmaskError, match="rope_scaling"):
        tiny(positions="absolute", rope_scaling="llama3", rope_factor=8.0)
    model = Transformer(tiny(positions="absolute"))
    with pytest.raises(UnmaskError, match="positions 10..25 lie outside.*0..15"):
        model(torch.zeros(1, 16, dtype=torch.long), positions=torch.arange(10, 26)[None])
