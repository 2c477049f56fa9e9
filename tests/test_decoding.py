"""Every entry point decodes through the one path (unmask.sampling.decoding): the same request (prompt,
seed, options) gives the same tokens from ``unmask sample`` (``unmask.generate``), the lm-eval adapter
and the server, for an MDM with and without semi-autoregressive blocks and for a block model, which
each of them decodes on its own grid with its exact cache of finished blocks."""

from __future__ import annotations

import dataclasses

import pytest

from unmask import ModelConfig, TrainConfig, train
from unmask.generation import generate
from unmask.sampling import BlockCache

PROMPT, LENGTH, SEED = "KING", 12, 5
# the ancestral sampler at temperature 1: which positions unmask is drawn apart from the network, so
# forwards of other shapes (the server pads and batches) cannot reorder the commits
REQUESTS = [("mdm", {}), ("mdm", {"block_len": 4, "steps": 6}), ("bd3", {})]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """A tiny MDM and a block model (L' = 4) after a few training steps."""
    root = tmp_path_factory.mktemp("decoding_runs")
    mdm = ModelConfig.from_name("tiny", context_len=64, vocab_size=512)
    common = {"steps": 2, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "eval_windows": 2, "eval_draws": 2}
    train(root / "mdm", mdm, TrainConfig(objective="mdm", **common), small_data, progress=False)
    train(root / "bd3", dataclasses.replace(mdm, block_causal=4), TrainConfig(objective="bd3", block_size=4, **common), small_data,
          progress=False)
    return root


@pytest.fixture
def block_caches(monkeypatch):
    """Counts the block caches made (a block model decoded with its exact cache makes one per decoding)."""
    made = []
    create = BlockCache.create
    monkeypatch.setattr(BlockCache, "create", classmethod(lambda cls, *args, **kwargs: made.append(1) or create(*args, **kwargs)))
    return made


def cli_texts(run, rows: int, options: dict) -> list[str]:
    """The generated text of ``unmask sample`` (cut at the first EOS, as the server and the adapter cut it)."""
    res = generate(run, PROMPT, rows, LENGTH, seed=SEED, stop_at_eos=True, temperature=1.0, **options)
    return [s["text"][len(PROMPT):] for s in res["samples"]]


@pytest.mark.parametrize("name,options", REQUESTS)
def test_the_server_decodes_a_request_as_the_cli_does(runs, block_caches, name, options):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from serving import complete, served

    from unmask.serve.engine import Engine, Limits
    from unmask.serve.schemas import field_of

    want = cli_texts(runs / name, 2, options)
    assert len(block_caches) == (name == "bd3")
    with served(Engine(runs / name, "cpu", Limits(max_tokens=32))) as url:
        body = {field_of(option): value for option, value in options.items()}
        got = complete(url, prompt=PROMPT, max_tokens=LENGTH, n=2, seed=SEED, temperature=1.0, **body)
    assert [c["text"] for c in got["choices"]] == want
    # the server padded the canvas on the left and batched it, yet a block model decoded on its own grid, with its cache
    assert len(block_caches) == 2 * (name == "bd3")


@pytest.mark.parametrize("name,options", REQUESTS)
def test_the_lm_eval_adapter_decodes_a_request_as_the_cli_does(runs, block_caches, name, options):
    pytest.importorskip("lm_eval")
    from unmask.evaluation.harness import UnmaskLM

    class Req:
        args = (PROMPT, {"until": [], "max_gen_toks": LENGTH})

    want = cli_texts(runs / name, 1, options)
    lm = UnmaskLM(runs / name, seed=SEED, temperature=1.0, **options)
    assert lm.generate_until([Req()]) == want
    assert len(block_caches) == 2 * (name == "bd3")
