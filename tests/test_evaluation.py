"""Evaluation suite: perplexity sources, the lm-eval adapter through lm-eval's real simple_evaluate
on the shipped offline tasks, generative perplexity and reports."""

import json
import math

import pytest
import torch

from unmask.checkpoint import load_model
from unmask.cli import main
from unmask.config import ModelConfig, TrainConfig
from unmask.data import default_dataset, default_tokenizer
from unmask.evaluation import evaluate_checkpoint
from unmask.evaluation.corpora import lm1b_detokenize, packed_windows, ptb_detokenize, unpacked_windows, wikitext_detokenize
from unmask.model import Transformer
from unmask.train import train

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small MDM and AR trained on the embedded corpus (about a minute each)."""
    root = tmp_path_factory.mktemp("evalruns")
    data = default_dataset()
    for objective in ("mdm", "ar"):
        model = ModelConfig.from_name("tiny", context_len=64, causal=objective == "ar")
        cfg = TrainConfig(objective=objective, steps=300, batch_size=32, eval_every=300, checkpoint_every=300, eval_windows=8, eval_draws=2)
        train(root / objective, model, cfg, data, progress=False)
    return root


def test_detokenizers():
    assert wikitext_detokenize("a role @-@ playing game , 1 @,@ 000 ( big )") == "a role-playing game, 1,000 (big)"
    assert ptb_detokenize("the company 's shares do n't rise") == "the company's shares don't rise"
    assert lm1b_detokenize('He said " hi " , then left .') == 'He said "hi", then left.'


def test_packed_and_unpacked_windows():
    tok = default_tokenizer()
    docs = ["To be, or not to be, that is the question. " * 5, "Short one."]
    arr, prev = packed_windows(docs, tok, 16)
    stream = [t for ids in tok.encode_batch(docs) for t in ids + [tok.eos_id]]
    assert arr.reshape(-1).tolist() == stream[: arr.size] and prev[0] == tok.eos_id and prev[1] == arr[0, -1]
    groups = unpacked_windows(docs, tok, 16)
    assert sum(g.size for g in groups) == len(stream)  # every token once, no window crosses a document
    assert all(g.shape[1] <= 16 for g in groups)


def test_ppl_on_local_text_packed_unpacked_and_chain_rule(runs, tmp_path):
    f = tmp_path / "held_out.txt"
    f.write_text("O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n" * 8)
    mdm = evaluate_checkpoint(runs / "mdm", text=[f], draws=4, progress=False)
    ar = evaluate_checkpoint(runs / "ar", text=[f], progress=False)
    assert mdm["kind"] == "elbo" and ar["kind"] == "exact" and mdm["num_tokens"] == ar["num_tokens"] and mdm["packed"]
    unpacked = evaluate_checkpoint(runs / "mdm", text=[f], draws=4, packed=False, progress=False)
    assert not unpacked["packed"] and unpacked["num_tokens"] >= mdm["num_tokens"]
    chain = evaluate_checkpoint(runs / "mdm", text=[f], estimator="chain-rule", windows=2, progress=False)
    assert chain["kind"] == "exact" and chain["estimator"] == "chain-rule" and chain["num_tokens"] == 2 * 64


def test_harness_trained_models_beat_chance_and_random_init_does_not(runs):
    """lm-eval's simple_evaluate on the shipped word-order task (chance 0.25, 100 questions)."""
    from unmask.evaluation.harness import UnmaskLM, run_harness

    def acc(lm) -> float:
        return run_harness(lm, ["shakespeare_word_order"], limit=100)["tasks"]["shakespeare_word_order"]["acc"]

    _, cfg = load_model(runs / "mdm")
    torch.manual_seed(0)
    random_init = acc(UnmaskLM(None, model=Transformer(cfg.model).eval(), tokenizer=default_tokenizer(), batch_size=32))
    mdm = acc(UnmaskLM(runs / "mdm", batch_size=32))
    ar = acc(UnmaskLM(runs / "ar", batch_size=32))
    assert random_init < 0.33, random_init
    assert mdm >= 0.35, mdm  # the small MDM has learnt some word order (chain-rule scoring)
    assert ar > 0.8, ar  # the AR model of the same size and data much more (MDMs need more compute)
    guided = run_harness(UnmaskLM(runs / "mdm", batch_size=32, cfg_scale=1.0), ["shakespeare_word_order"], limit=20)
    assert 0 <= guided["tasks"]["shakespeare_word_order"]["acc"] <= 1


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_harness_generate_until_and_rolling(runs, objective):
    from unmask.evaluation.harness import UnmaskLM, run_harness

    lm = UnmaskLM(runs / objective, steps=8)
    res = run_harness(lm, ["shakespeare_complete"], limit=3)
    assert res["tasks"]["shakespeare_complete"]["sample_len"] == 3

    class Req:
        def __init__(self, *args):
            self.args = args

    line = "Now is the winter of our discontent made glorious summer by this sun of York. "
    long_text = lm.loglikelihood_rolling([Req(line * 8)])[0]  # several windows
    assert math.isfinite(long_text) and long_text < 0
    text = line * 2  # fits one window
    rolling = lm.loglikelihood_rolling([Req(text)])[0]
    [(whole, _)] = lm.loglikelihood([Req("", text)])
    if objective == "ar":  # for an AR model both are the exact log-likelihood of the same text
        assert rolling == pytest.approx(whole, rel=1e-4)


def test_genppl_and_report(runs, tmp_path, capsys):
    assert main(["eval", "genppl", "--checkpoint", str(runs / "mdm"), "--judge", str(runs / "ar"), "--num-samples", "2",
                 "--length", "16", "--steps", "8", "--save", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["gen_ppl"] > 1 and rec["unigram_entropy"] > 0 and rec["tokens_per_s"] > 0
    assert main(["eval", "ppl", "--checkpoint", str(runs / "mdm"), "--windows", "4", "--draws", "2", "--save", "--json"]) == 0
    assert main(["eval", "harness", "--checkpoint", str(runs / "ar"), "--tasks", "shakespeare_word_order", "--limit", "10", "--save"]) == 0
    capsys.readouterr()
    assert main(["report", str(runs / "mdm"), str(runs / "ar"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| mdm | mdm |" in md and "| ar | ar |" in md and "shakespeare_word_order" in md and "gen-PPL" in md
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 10_000 and (tmp_path / "rep" / "pareto.png").is_file()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]["objective"] == "mdm"


def test_harness_unknown_task_is_named(runs, capsys):
    assert main(["eval", "harness", "--checkpoint", str(runs / "ar"), "--tasks", "no_such_task"]) == 2
    assert "no_such_task" in capsys.readouterr().err
