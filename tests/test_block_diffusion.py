"""Block diffusion (BD3-LM) against exact references: the 2L mask written out by hand, the two-pass
computation, enumerable block oracles (exact entropy, exact conditionals, exact AR NLL), and the
uncached decoding for the exact KV cache of finished blocks."""

from __future__ import annotations

import itertools

import pytest
import torch

from unmask.block_diffusion import (
    bd3_attention_mask, bd3_logits, bd3_loss, block_chain_rule_nll, block_elbo, block_times, corrupt_blocks,
    two_pass_logits,
)
from unmask.config import ModelConfig
from unmask.errors import OptionError, UnmaskError
from unmask.model import Transformer
from unmask.testing import BlockOracle, chi_square_counts
from unmask.sampling import (
    BlockCache, ConfidenceConfig, FirstHittingConfig, GridBlocks, SamplerSpec, ThresholdConfig, confidence, decode_blocks, first_hitting,
    make_canvas, threshold,
)
from unmask.sampling.cache import CacheConfig
from unmask.sampling.plans import block_spans
from unmask.schedule import Schedule


def tiny(block_size: int, seed: int = 0, context_len: int = 32) -> Transformer:
    """A random float64 block model: float64 keeps cached and uncached forwards (different shapes)
    far too close to flip a sampled token."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=13, context_len=context_len, n_layer=2, n_head=2, n_embd=16, block_causal=block_size, init_std=0.5)
    return Transformer(config).double().eval()


# --- the 2L attention mask and the vectorised forward ---------------------------------------------


def test_attention_mask_is_the_bd3_block_mask_entry_by_entry():
    length, size = 8, 2
    mask = bd3_attention_mask(length, size)
    assert mask.shape == (16, 16) and mask.dtype == torch.bool
    for q, k in itertools.product(range(16), range(16)):
        qb, kb = (q % length) // size, (k % length) // size
        if q < length and k < length:
            want = qb == kb  # M_BD: the noisy block attends to itself
        elif q < length:
            want = kb < qb  # M_OBC: and to the clean blocks before it
        elif k < length:
            want = False  # clean never sees noisy
        else:
            want = kb <= qb  # M_BC: block-causal clean half
        assert bool(mask[q, k]) == want, (q, k)


@pytest.mark.parametrize("size", [1, 2, 4, 16])
def test_vectorised_2l_forward_equals_the_two_pass_computation(size):
    model = tiny(size, seed=size)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 13, (3, 16), generator=gen)
    noise = corrupt_blocks(x0, size, Schedule(), model.config.mask_id, gen)
    assert noise.masked.any()
    fast = bd3_logits(model, noise.xt, x0, size)
    slow = two_pass_logits(model, noise.xt, x0, size)
    assert torch.allclose(fast, slow, atol=1e-10)
    # the loss uses only the masked positions of the same logits
    nll = torch.nn.functional.cross_entropy(slow.flatten(0, 1), x0.flatten(), reduction="none").view(x0.shape)
    want = (nll * noise.masked * noise.weight).sum(dim=1) / 16
    assert torch.allclose(bd3_loss(model, x0, noise), want.to(torch.float32), atol=1e-5)


def test_model_attn_mask_replaces_the_config_mask_and_is_not_vacuous():
    model = tiny(4, seed=3)
    x = torch.randint(0, 14, (2, 8))
    full = torch.ones(8, 8, dtype=torch.bool)
    bidirectional = tiny(0, seed=3)
    assert torch.allclose(model(x, attn_mask=full), bidirectional(x), atol=1e-12)
    assert not torch.allclose(model(x), bidirectional(x), atol=1e-3)


# --- corruption and clipped schedules ------------------------------------------------------------


def test_block_times_are_stratified_over_batch_and_blocks_and_span_every_row():
    u = block_times(4, 8, torch.Generator().manual_seed(1))
    assert u.shape == (4, 8)
    strata = torch.sort((u.flatten() * 32).floor()).values
    assert torch.equal(strata, torch.arange(32.0))  # one draw per stratum of width 1/32
    assert ((u.max(dim=1).values - u.min(dim=1).values) > 0.5).all()


def test_clipped_schedule_keeps_every_blocks_time_in_range():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.zeros(64, 32, dtype=torch.long)
    noise = corrupt_blocks(x0, 4, Schedule(), 13, gen, mask_rate=(0.45, 0.95))
    t = 1 / noise.weight  # linear schedule: w = 1/t
    assert (t >= 0.45 - 1e-6).all() and (t <= 0.95 + 1e-6).all()
    assert (noise.weight.view(64, 8, 4) == noise.weight.view(64, 8, 4)[..., :1]).all()  # one t per block
    rate = noise.masked.float().mean().item()
    assert abs(rate - 0.7 * (1 - 1e-3)) < 0.03  # E[mask rate] = mean of U[0.45, 0.95]


def test_block_k_dce_masks_exactly_k_tokens_of_each_block_uniformly():
    gen = torch.Generator().manual_seed(3)
    x0 = torch.zeros(2000, 10, dtype=torch.long)  # blocks of 4, 4 and a last one of 2
    u = torch.tensor([0.1, 0.6, 1.0]).expand(2000, 3)
    noise = corrupt_blocks(x0, 4, Schedule(), 13, gen, u=u, estimator="k-dce")
    counts = noise.masked.view(2000, 10).float()
    assert torch.equal(counts[:, :4].sum(1), torch.full((2000,), 1.0))  # ceil(0.1 * 4)
    assert torch.equal(counts[:, 4:8].sum(1), torch.full((2000,), 3.0))  # ceil(0.6 * 4)
    assert torch.equal(counts[:, 8:].sum(1), torch.full((2000,), 2.0))  # the short block, all of it
    assert torch.allclose(noise.weight[0], torch.tensor([4.0] * 4 + [4 / 3] * 4 + [1.0] * 2))
    freq = counts[:, :4].mean(0)  # which token: uniform inside the block
    assert (freq - 0.25).abs().max() < 0.04


def test_block_size_must_divide_the_training_context():
    from unmask.block_diffusion import check_block_size

    with pytest.raises(OptionError, match="block_size=3 must be a positive divisor") as refused:
        check_block_size(16, 3)
    assert refused.value.param == "block_size"
    # scoring windows (documents) may end in a shorter block
    mask = bd3_attention_mask(5, 2)
    assert mask[4, 4] and not mask[4, 3] and mask[4, 5 + 3] and not mask[4, 5 + 4]


# --- likelihood on enumerable oracles ------------------------------------------------------------


def all_sequences(oracle: BlockOracle) -> torch.Tensor:
    return oracle.seqs.clone()


@pytest.mark.parametrize("size", [1, 2, 4])
def test_block_chain_rule_of_exact_block_conditionals_is_the_exact_nll(size):
    oracle = BlockOracle.random_blocks(vocab_size=3, length=4, block_size=size, seed=size)
    x = all_sequences(oracle)
    res = block_chain_rule_nll(oracle, x, size, batch_size=100)
    want = -oracle.log_prob(x).mean().item() / 4
    assert res.kind == "exact" and abs(res.nats_per_token - want) < 1e-5


@pytest.mark.parametrize("estimator", ["t-dce", "k-dce"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_block_bound_is_tight_for_exact_block_conditionals(size, estimator):
    oracle = BlockOracle.random_blocks(vocab_size=3, length=4, block_size=size, seed=10 + size)
    x = all_sequences(oracle)
    res = block_elbo(oracle, x, size, draws=64, batch_size=100, seed=3, estimator=estimator)
    if estimator == "k-dce" and size == 1:  # one token per block: always masked, weight 1: the exact NLL, no variance
        assert res.stderr < 1e-9
    want = -oracle.log_prob(x).mean().item() / 4
    assert res.kind == "elbo"
    assert abs(res.nats_per_token - want) < 4 * res.stderr + 1e-5, (res.nats_per_token, want, res.stderr)


def test_block_bound_of_a_wrong_model_is_above_the_exact_nll():
    data = BlockOracle.random_blocks(vocab_size=3, length=4, block_size=2, seed=5)
    wrong = BlockOracle(torch.ones(81, dtype=torch.float64), 3, 4, 2)  # uniform
    x = torch.cat([data.seqs[data.probs.multinomial(400, replacement=True, generator=torch.Generator().manual_seed(0))]])
    res = block_elbo(wrong, x, 2, draws=16, batch_size=400)
    assert res.nats_per_token > -data.log_prob(x).mean().item() / 4 + 0.1


def test_with_block_size_one_the_bound_is_the_exact_ar_nll_of_a_transformer():
    model = tiny(1, seed=4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 13, (4, 8), generator=gen)
    # the AR NLL of the block model by hand: position i given the clean x_<i and MASK at i
    nll = 0.0
    for i in range(8):
        inp = torch.cat([x[:, :i], torch.full((4, 1), model.config.mask_id)], dim=1)
        nll -= torch.log_softmax(model(inp)[:, i], dim=-1).gather(1, x[:, i : i + 1]).sum().item()
    exact = nll / x.numel()
    chain = block_chain_rule_nll(model, x, 1)
    assert abs(chain.nats_per_token - exact) < 1e-6  # float32 cross-entropy
    bound = block_elbo(model, x, 1, draws=256, seed=1)
    assert abs(bound.nats_per_token - exact) < 4 * bound.stderr, (bound.nats_per_token, exact, bound.stderr)
    k_bound = block_elbo(model, x, 1, draws=2, seed=1, estimator="k-dce")  # every token masked, weight 1: exact
    assert abs(k_bound.nats_per_token - exact) < 1e-6 and k_bound.stderr < 1e-9


# --- decoding with the exact cache of finished blocks --------------------------------------------

SAMPLERS = {
    "first-hitting": (first_hitting, FirstHittingConfig(k=2)),
    "confidence": (confidence, ConfidenceConfig(steps=12, temperature=1.0)),
    "threshold": (threshold, ThresholdConfig(tau=0.3, temperature=1.0)),
}


def decode(model, x, cond, width, name, cache, cfg_scale=0.0, stop_token=None, window=None, seed=7):
    fn, config = SAMPLERS[name]
    if cfg_scale:
        config = type(config)(**{**config.__dict__, "cfg_scale": cfg_scale})
    return decode_blocks(model, x, torch.Generator().manual_seed(seed), fn, config, GridBlocks(window), width, cond,
                         stop_token=stop_token, cache=CacheConfig("block" if cache else "none"))


def test_block_spans_follow_the_models_grid():
    assert block_spans(6, 16, 4) == [(6, 8), (8, 12), (12, 16)]
    assert block_spans(8, 14, 4) == [(8, 12), (12, 14)]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cached_and_uncached_decoding_give_identical_tokens(name):
    model = tiny(4, seed=1)
    x, cond, width = make_canvas([[1, 2], [4, 5, 6, 7, 8], [9]], 18, model.config.mask_id, pad_id=0, separator=0)
    assert cond.key_mask is not None and width % 4  # padding, and the prompt ends inside a block
    plain = decode(model, x, cond, width, name, cache=False)
    cached = decode(model, x, cond, width, name, cache=True)
    assert not (plain.tokens == model.config.mask_id).any()
    assert torch.equal(plain.tokens, cached.tokens)
    assert plain.nfe == cached.nfe


@pytest.mark.parametrize("name", ["first-hitting", "confidence"])
def test_cached_decoding_with_guidance_gives_the_uncached_tokens(name):
    model = tiny(4, seed=2)
    x, cond, width = make_canvas([[1, 2, 3], [4, 5]], 12, model.config.mask_id, pad_id=0, separator=0)
    plain = decode(model, x, cond, width, name, cache=False, cfg_scale=1.5)
    cached = decode(model, x, cond, width, name, cache=True, cfg_scale=1.5)
    assert torch.equal(plain.tokens, cached.tokens)
    assert not torch.equal(plain.tokens, decode(model, x, cond, width, name, cache=False).tokens)  # guidance acts


def test_finished_blocks_are_written_once_and_calls_feed_only_the_block():
    model = tiny(4, seed=3)
    calls = []
    original = model.forward

    def spy(tokens, **kw):
        calls.append(tokens.shape[1])
        return original(tokens, **kw)

    model.forward = spy
    x, cond, width = make_canvas([[1, 2, 3]], 16, model.config.mask_id, pad_id=0, separator=0)  # prompt = one block
    seen = {}
    out = decode_blocks(model, x, torch.Generator().manual_seed(0), *SAMPLERS["confidence"], GridBlocks(), width, cond,
                        callback=lambda s: seen.setdefault("nfe", s.nfe), cache=CacheConfig("block"))
    assert not (out.tokens == model.config.mask_id).any()
    # first call of a block: that block + the block (or prompt) finished before it; later calls: the block
    assert calls[0] == 8 and set(calls) == {8, 4}
    assert calls.count(8) == 4  # once per generated block: each finished block is fed once more, as clean tokens


def test_block_cache_feeds_a_finished_block_once_then_only_the_current_block():
    model = tiny(4, seed=4)
    x, _, width = make_canvas([[1, 2, 3, 4, 5]], 11, model.config.mask_id, pad_id=0, separator=0)
    assert width == 6 and x.shape[1] == 17
    cols, row = torch.arange(17)[None], torch.tensor([0])
    cache = BlockCache.create(model, x, guided=False)
    # the first block is the rest of the prompt's block: the block (with its prompt tokens, which
    # attend to the noisy ones) is fed whole, the finished prompt block before it is written now
    fed, cache = cache.feed(row, x, (cols >= 6) & (cols < 8), model.config.mask_id)
    assert fed[0].tolist() == [True] * 8 + [False] * 9
    fed, cache = cache.feed(row, x, (cols >= 8) & (cols < 12), model.config.mask_id)
    assert fed[0].tolist() == [False] * 4 + [True] * 8 + [False] * 5  # block 4..7 finished: written now
    fed, cache = cache.feed(row, x, (cols >= 8) & (cols < 12), model.config.mask_id)
    assert fed[0].tolist() == [False] * 8 + [True] * 4 + [False] * 5  # and never again
    assert cache.written[0].tolist() == [1] * 4 + [2] * 8 + [0] * 5


# deterministic options of every sampler: temperature 0, and first-hitting/ancestral unmasking a
# whole block per call (k = L', one step per block), so a row's tokens cannot depend on the draws
ALONE_OPTIONS = {
    "first-hitting": {"k": 4, "temperature": 0.0},
    "ancestral": {"steps": 3, "temperature": 0.0},
    "confidence": {"steps": 9, "temperature": 0.0},
    "threshold": {"tau": 0.3},
}


@pytest.mark.parametrize("cache", ["block", "none"])
@pytest.mark.parametrize("name,context", [(name, 32) for name in ALONE_OPTIONS] + [("confidence", 16), ("first-hitting", 16)])
def test_every_row_decodes_alone_as_in_a_batch_of_prompts_of_different_lengths(name, context, cache):
    """Blocks follow each row's positions, not the canvas columns that left padding shifts: a
    row's tokens and calls do not depend on the other rows' prompt lengths (context 16: beyond
    the context, through the sliding window)."""
    model = tiny(4, seed=8, context_len=context)
    prompts, length = [[1, 2], [4, 5, 6, 7, 8], [9], [3, 3, 3]], 10 if context == 32 else 20
    spec = SamplerSpec.from_options(name, cache=cache, **ALONE_OPTIONS[name])  # SamplerSpec.run: a block model's own decoding
    x, cond, width = make_canvas(prompts, length, model.config.mask_id, pad_id=0, separator=0)
    assert len({len(p) % 4 for p in prompts}) > 1  # the prompts end at different offsets in a block
    batch = spec.run(model, x, torch.Generator().manual_seed(0), cond, start=width)
    for row, prompt in enumerate(prompts):
        x1, cond1, width1 = make_canvas([prompt], length, model.config.mask_id, pad_id=0, separator=0)
        alone = spec.run(model, x1, torch.Generator().manual_seed(0), cond1, start=width1)
        assert torch.equal(batch.tokens[row, width:], alone.tokens[0, width1:]), row
        assert torch.equal(batch.tokens[row, :width], x[row, :width])  # prompt and padding untouched
        assert batch.row_nfe[row] == alone.row_nfe[0], row


def test_rows_that_stop_leave_the_batch_and_tokens_match_until_then():
    for seed in range(30):
        model = tiny(4, seed=seed)
        x, cond, width = make_canvas([[1, 2, 3], [5, 6, 7]], 16, model.config.mask_id, pad_id=0, separator=0)
        plain = decode(model, x, cond, width, "confidence", cache=True)
        gen = plain.tokens[:, width:]
        eos = next((int(v) for v in gen[0, :4] if v not in gen[1, :12]), None)
        if eos is not None:
            break
    for cache in (True, False):
        out = decode(model, x, cond, width, "confidence", cache=cache, stop_token=eos)
        assert torch.equal(out.tokens[0, width : width + 4], gen[0, :4])
        assert (out.tokens[0, width + 4 :] == eos).all()
        assert out.row_nfe[0] < out.row_nfe[1]


def test_generation_longer_than_the_context_slides_a_window_over_the_cache():
    model = tiny(4, seed=5, context_len=16)
    x, cond, width = make_canvas([[1, 2, 3]], 36, model.config.mask_id, pad_id=0, separator=0)
    short, _, _ = make_canvas([[1, 2, 3]], 12, model.config.mask_id, pad_id=0, separator=0)
    long_run = decode(model, x, cond, width, "first-hitting", cache=True)
    short_run = decode(model, short, None, width, "first-hitting", cache=True)
    assert long_run.tokens.shape == (1, 40) and not (long_run.tokens == model.config.mask_id).any()
    assert torch.equal(long_run.tokens[:, :16], short_run.tokens)  # identical while the canvas fits the context
    # uncached, the window is recomputed: the same up to the context, then its own approximation
    plain = decode(model, x, cond, width, "first-hitting", cache=False)
    assert torch.equal(plain.tokens[:, :16], short_run.tokens) and not (plain.tokens == model.config.mask_id).any()


def test_decoding_needs_a_block_model():
    model = tiny(0)
    x, cond, width = make_canvas([[1]], 8, model.config.mask_id, pad_id=0, separator=0)
    with pytest.raises(UnmaskError, match="block model"):
        decode(model, x, cond, width, "confidence", cache=True)


def test_first_hitting_within_blocks_samples_the_oracle_distribution():
    # exact block conditionals + first-hitting (k = 1) inside each block = exact samples of p (chi-square)
    oracle = BlockOracle.random_blocks(vocab_size=3, length=4, block_size=2, concentration=1.0, seed=0)
    n = 4000
    x = torch.full((n, 4), oracle.config.mask_id)
    out = decode_blocks(oracle, x, torch.Generator().manual_seed(1), first_hitting, FirstHittingConfig(), GridBlocks(), 0)
    observed, expected = chi_square_counts(oracle, out.tokens)
    keep = expected >= 5
    stat = (((observed - expected) ** 2) / expected)[keep].sum().item()
    dof = int(keep.sum()) - 1
    assert stat < dof + 4 * (2 * dof) ** 0.5, (stat, dof)  # ~4 sigma of the chi-square
    assert out.nfe == 4  # one call per position


# --- training through the one loop, resume, fine-tuning, the command line -------------------------


def bd3_configs(steps=12, block_size=4, **kw):
    from unmask.config import TrainConfig

    model = ModelConfig(vocab_size=512, context_len=32, n_layer=2, n_head=2, n_embd=64, block_causal=block_size)
    train_cfg = TrainConfig(objective="bd3", block_size=block_size, steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=6,
                            checkpoint_every=1000, log_every=3, eval_windows=4, eval_draws=2, **kw)
    return model, train_cfg


def test_bd3_training_learns_logs_the_unbiased_bound_and_resumes_exactly(tmp_path, small_data):
    import json

    from runs import assert_resume_is_exact

    from unmask.checkpoint import load_weights

    model, cfg = bd3_configs(steps=12, mask_rate_min=0.3, mask_rate_max=0.8)
    full = assert_resume_is_exact(tmp_path, model, cfg, small_data)
    assert sum(full.losses[-3:]) < sum(full.losses[:3])
    _, saved, _ = load_weights(tmp_path / "full")
    assert saved.model.block_causal == 4 and saved.train.objective == "bd3"
    val = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert [v["step"] for v in val] == [6, 12] and all(v["val_stderr"] > 0 for v in val)


def test_bd3_settings_are_checked(tmp_path, small_data):
    from unmask.config import TrainConfig
    from unmask.train import train

    with pytest.raises(OptionError, match="objective bd3 needs block_size >= 1"):
        TrainConfig(objective="bd3")
    with pytest.raises(UnmaskError, match="bd3 only"):
        TrainConfig(objective="mdm", block_size=4)
    with pytest.raises(OptionError, match="mask_rate_min=0.9 and mask_rate_max=0.5"):
        TrainConfig(objective="bd3", block_size=4, mask_rate_min=0.9, mask_rate_max=0.5)
    model, cfg = bd3_configs(block_size=4)
    import dataclasses

    with pytest.raises(UnmaskError, match="block_causal=4"):
        train(tmp_path / "run", dataclasses.replace(model, block_causal=0), cfg, small_data, progress=False)
    with pytest.raises(OptionError, match="flex_attention needs"):
        train(tmp_path / "run", model, dataclasses.replace(cfg, flex_attention=True), small_data, device="cpu", progress=False)
    with pytest.raises(OptionError, match="flex_attention apply to objective bd3 only"):
        TrainConfig(objective="mdm", flex_attention=True)
    with pytest.raises(UnmaskError, match="MASK id 3 but the tokenizer"):  # a block model masks with the tokenizer's MASK too
        train(tmp_path / "run", dataclasses.replace(model, mask_token_id=3), cfg, small_data, device="cpu", progress=False)


def test_cli_trains_a_block_model_fine_tuned_from_an_mdm_then_scores_and_samples_it(tmp_path, small_data):
    import json

    from typer.testing import CliRunner

    from unmask.checkpoint import load_weights
    from unmask.cli import app

    runner = CliRunner()
    common = ["--data", str(small_data), "--steps", "4", "--batch-size", "4", "--context-len", "32", "--eval-every", "4", "--log-every", "2"]
    mdm = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "mdm"), *common])
    assert mdm.exit_code == 0, mdm.output
    common = [c for c in common if c not in ("--context-len", "32")]
    bd3 = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "bd3"), "--objective", "bd3", "--block-size", "4",
                              "--init-from", str(tmp_path / "mdm"), *common])
    assert bd3.exit_code == 0, bd3.output
    _, saved, _ = load_weights(tmp_path / "bd3")
    assert saved.model.block_causal == 4 and saved.model.context_len == 32 and saved.train.init_from == str(tmp_path / "mdm")
    ppl = runner.invoke(app, ["eval", "ppl", "--checkpoint", str(tmp_path / "bd3"), "--windows", "2", "--draws", "4", "--json"])
    assert ppl.exit_code == 0, ppl.output
    res = json.loads(ppl.output)
    assert res["kind"] == "elbo" and res["stderr"] > 0 and "block" in res["estimator"]
    exact = json.loads(runner.invoke(app, ["eval", "ppl", "--checkpoint", str(tmp_path / "bd3"), "--windows", "2", "--estimator", "chain-rule", "--json"]).output)
    assert exact["kind"] == "exact" and exact["nats_per_token"] > 0
    out = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "bd3"), "--prompt", "ROMEO", "--length", "40", "--num-samples", "2",
                              "--sampler", "first-hitting", "--json"])
    assert out.exit_code == 0, out.output
    samples = json.loads(out.output)
    assert [len(s["tokens"]) for s in samples["samples"]] == [40, 40] and samples["cache"] == "block"


def test_bd3_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, small_data):
    import dataclasses
    import json

    from ranks import free_port, launch_ranks, wait_ranks
    from test_distributed import WORKER, train_losses

    from unmask.config import TrainConfig
    from unmask.train import train

    def configs(batch_size):
        model = ModelConfig(vocab_size=512, context_len=16, n_layer=2, n_head=2, n_embd=32, block_causal=4)
        cfg = TrainConfig(objective="bd3", block_size=4, mask_rate_min=0.2, mask_rate_max=0.9, steps=3, batch_size=batch_size,
                          grad_accum=2, lr=3e-3, warmup_steps=1, precision="fp32", seed=5, log_every=1, eval_every=1000,
                          eval_windows=2, eval_draws=2, checkpoint_every=1000)
        return model, cfg

    model, cfg = configs(2)
    jobs = [["bd3", dataclasses.asdict(model), dataclasses.asdict(cfg), free_port()]]
    wait_ranks(launch_ranks(["-c", WORKER, str(tmp_path / "ddp"), str(small_data), json.dumps(jobs)]), timeout=240)
    model, cfg = configs(4)
    train(tmp_path / "single" / "bd3", model, cfg, small_data, device="cpu", progress=False)
    assert train_losses(tmp_path / "ddp" / "bd3") == pytest.approx(train_losses(tmp_path / "single" / "bd3"), abs=1e-5)


def test_block_models_refuse_approximate_caches_and_foreign_block_lengths():
    model = tiny(4)
    x, cond, width = make_canvas([[1]], 8, model.config.mask_id, pad_id=0, separator=0)
    gen = torch.Generator().manual_seed(0)
    for options, param, named in [({"cache": "prefix"}, "cache", "cache prefix"), ({"cache": "dual"}, "cache", "cache dual"),
                                  ({"block_len": 8}, "block_len", "block_len=8")]:
        with pytest.raises(OptionError, match=named) as refused:  # named by the parameter; the CLI spells it --cache, --block-len
            SamplerSpec.from_options("confidence", **options).run(model, x, gen, cond, start=width)
        assert refused.value.param == param
    with pytest.raises(UnmaskError, match="block model"):  # the block cache needs one
        SamplerSpec.from_options("confidence", cache="block").run(tiny(0), x, gen, cond, start=width)


def test_flex_attention_mask_is_the_dense_mask_and_gives_the_sdpa_logits():
    from unmask.block_diffusion import bd3_mask_mod, flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    length, size = 16, 4
    q, k = torch.meshgrid(torch.arange(2 * length), torch.arange(2 * length), indexing="ij")
    # the sparse 128-token tiles of create_block_mask cover this whole mask: the mask_mod decides every pair
    assert torch.equal(bd3_mask_mod(length, size)(0, 0, q, k), bd3_attention_mask(length, size))
    model = tiny(size, seed=6).float()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 13, (2, length), generator=gen)
    noise = corrupt_blocks(x0, size, Schedule(), model.config.mask_id, gen)
    with torch.no_grad():  # FlexAttention has no backward on CPU (training with it needs CUDA)
        flex = bd3_logits(model, noise.xt, x0, size, flex=True)
        sdpa = bd3_logits(model, noise.xt, x0, size)
    assert torch.allclose(flex, sdpa, atol=1e-4)
