"""Compiled decoding (``--compile``, :mod:`unmask.compiled`): torch.compile for real, on the CPU.

The reference is the eager network: the compiled wrapper's logits at every wanted position of a
padded shape equal the eager model's within float rounding, and decodes give the eager tokens at
temperature 0 (and, under one seed, at temperature 1, where both draw the same numbers from the
generator). Few shapes are compiled (each takes seconds): one wrapper per model, reused.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from unmask.checkpoint import load_model
from unmask.compiled import CompiledModel, _pad, bucket_batch, bucket_length, compile_for_decoding
from unmask.config import ModelConfig, TrainConfig
from unmask.errors import OptionError
from unmask.generation import generate
from unmask.model import Transformer
from unmask.sampling.decoding import decoding_for
from unmask.train import train

ROWS, LENGTH = 3, 6  # canvas (3, 1 + 6): neither is a bucket size, so both are padded (to 4 x 8)


@pytest.fixture(scope="module")
def mdm_run(tmp_path_factory, small_data):
    """A tiny MDM run (one training step): the same network in this process and in the CLI's."""
    run = tmp_path_factory.mktemp("compile") / "mdm"
    train(run, ModelConfig(vocab_size=512, context_len=16, n_layer=1, n_head=2, n_embd=32), TrainConfig(steps=1, batch_size=2, precision="fp32"),
          small_data, device="cpu", progress=False)
    return run


@pytest.fixture(scope="module")
def mdm(mdm_run):
    """(eager model, its compiled wrapper, run config)."""
    model, cfg = load_model(mdm_run)
    return model, CompiledModel(model), cfg


def _canvas(cfg) -> torch.Tensor:
    x = torch.full((ROWS, 1 + LENGTH), cfg.model.mask_id)
    x[:, 0] = 0
    return x


def _decode(model, cfg, seed: int = 0, **options) -> torch.Tensor:
    decoding = decoding_for(cfg.model, LENGTH, options, cfg.train.schedule)
    return decoding.run(model, _canvas(cfg), torch.Generator().manual_seed(seed), start=1).tokens


def graphs() -> int:
    """Graphs torch.compile has made in this process (a shape it meets again must not make another)."""
    return counters["stats"]["unique_graphs"]


def test_buckets():
    assert [bucket_batch(b) for b in (1, 2, 3, 5, 8, 9, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 64, 128, 192]
    assert [bucket_length(n, 100) for n in (1, 3, 7, 9, 15, 17, 33, 64, 65, 81, 97)] == [1, 4, 8, 10, 16, 20, 40, 64, 80, 96, 100]
    assert bucket_length(70, 64) == 70  # never shorter than the input


def test_padded_inputs_have_the_strides_of_new_tensors():
    """A graph is specialised to strides: the AR sampler's one-token slices of a growing (1, S) tensor
    must not make a graph per step."""
    for width in (3, 5):
        assert _pad(torch.zeros(1, width)[:, -1:], 1, 1).stride() == (1, 1)
    assert _pad(torch.zeros(1, 3)[:, -1:], 2, 4).stride() == (4, 1)


def test_padded_logits_equal_the_eager_ones(mdm):
    """The exact reference: at a padded shape (3 x 7 -> 4 x 8), with a left-padded row and a random
    selection of positions, every wanted logit equals the eager network's."""
    model, compiled, cfg = mdm
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.model.vocab_size + 1, (ROWS, 1 + LENGTH), generator=gen)
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[0, :2] = False
    want = torch.rand(x.shape, generator=gen) < 0.5
    with torch.no_grad():
        expected = model(x, key_mask=key_mask, logits_at=want)
        got = compiled(x, key_mask=key_mask, logits_at=want)
        whole = compiled(x, key_mask=key_mask)
    assert got.shape == expected.shape == (int(want.sum()), cfg.model.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole[want], expected, rtol=1e-5, atol=1e-5)


def test_greedy_and_sampled_decodes_equal_the_eager_ones(mdm):
    model, compiled, cfg = mdm
    before, made = dict(compiled.stats), graphs()
    for options in ({"sampler": "confidence", "temperature": 0.0}, {"sampler": "confidence", "temperature": 1.0}):
        assert torch.equal(_decode(compiled, cfg, seed=3, **options), _decode(model, cfg, seed=3, **options)), options
    assert compiled.stats["compiled"] - before["compiled"] == 2 * LENGTH and compiled.stats["eager"] == before["eager"]
    assert graphs() - made == compiled.stats["shapes"] - before["shapes"]  # one graph per new bucket, none per step


def test_cached_decode_equals_the_eager_one(mdm):
    """The dual cache (writes the caller's keys/values in place): a full forward at the block start,
    then the block's slots fed (6 of 8 -> padded to 8 by repeating a slot)."""
    model, compiled, cfg = mdm
    options = {"sampler": "confidence", "temperature": 0.0, "block_len": LENGTH, "cache": "dual"}
    before, made = dict(compiled.stats), graphs()
    assert torch.equal(_decode(compiled, cfg, **options), _decode(model, cfg, **options))
    assert compiled.stats["eager"] == before["eager"] and graphs() - made == compiled.stats["shapes"] - before["shapes"] == 1


def test_static_shapes_put_their_column_index_into_the_graph(mdm):
    """Decoding with static shapes (the GPU layout, :mod:`unmask.sampling.shapes`) passes a column
    index per row, which the graph takes in (the head at those columns only): the eager tokens,
    uncached at temperature 1 and with the dual cache, and no call runs eager."""
    from unmask.sampling.shapes import decode_shapes

    model, compiled, cfg = mdm
    before = dict(compiled.stats)
    for options in ({"sampler": "confidence", "temperature": 1.0}, {"sampler": "confidence", "temperature": 1.0, "block_len": LENGTH, "cache": "dual"}):
        with decode_shapes("static"):
            assert torch.equal(_decode(compiled, cfg, seed=3, **options), _decode(model, cfg, seed=3, **options)), options
    assert compiled.stats["compiled"] - before["compiled"] == 2 * LENGTH and compiled.stats["eager"] == before["eager"]


def test_ar_decode_equals_the_eager_one():
    """The AR sampler with its KV cache, its appends made writes at slots: one graph for every call
    (the one-token prompt's and each new token's), whatever the cache's length."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=11, context_len=16, n_layer=1, n_head=2, n_embd=16, causal=True)
    model = Transformer(config).eval()
    compiled = compile_for_decoding(model, True)
    prompt = torch.randint(0, 11, (ROWS, 1))
    decoding = decoding_for(config, 8, {"temperature": 0.0})
    eager = decoding.run(model, prompt, torch.Generator()).tokens
    made = graphs()
    assert torch.equal(decoding.run(compiled, prompt, torch.Generator()).tokens, eager)
    assert compiled.stats == {"compiled": 8, "graphed": 0, "eager": 0, "shapes": 1} and graphs() - made == 1
    assert compile_for_decoding(model, False) is model


def test_the_server_warms_up_the_default_requests_shapes(mdm_run):
    """`unmask serve --compile` compiles the default request's shapes before serving: a request of the
    default shape then meets no new one, and decodes as the eager server does."""
    from unmask.serve.batcher import Ticket
    from unmask.serve.engine import Engine, Limits, Params

    limits = Limits(max_tokens=LENGTH)
    engine, eager = Engine(mdm_run, "cpu", limits, compile=True), Engine(mdm_run, "cpu", limits)
    assert engine.warm_up() > 0 and engine.model.stats["shapes"] >= 1
    shapes = engine.model.stats["shapes"]
    request = Params([""], max_tokens=LENGTH, seed=5)
    texts = [[c.text for c in e.run(e.prepare(request), Ticket())[0]] for e in (engine, eager)]
    assert texts[0] == texts[1] and engine.model.stats["shapes"] == shapes


def test_classifier_is_refused():
    model = Transformer(ModelConfig(vocab_size=11, context_len=8, n_layer=1, n_head=2, n_embd=16, labels=("a", "b")))
    with pytest.raises(OptionError, match="classifier") as exc:
        CompiledModel(model)
    assert exc.value.param == "compile"


def test_cli_sample_compile_gives_the_eager_text(mdm_run, mdm):
    """`unmask sample --compile` (the installed console script, in its own process) prints the text
    that decoding without it gives, at temperature 0."""
    args = ["--checkpoint", str(mdm_run), "--num-samples", str(ROWS), "--length", str(LENGTH), "--sampler", "confidence",
            "--temperature", "0", "--device", "cpu", "--json"]
    done = subprocess.run([str(Path(sys.executable).with_name("unmask")), "sample", "--compile", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    compiled = json.loads(done.stdout)
    eager = generate(mdm_run, "", ROWS, LENGTH, device="cpu", sampler="confidence", temperature=0.0)
    assert [s["text"] for s in compiled["samples"]] == [s["text"] for s in eager["samples"]]
    assert compiled["compiled"]["compiled"] == LENGTH and compiled["compiled"]["eager"] == 0
