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
        cfg = TrainConfig(objective=objective, steps=300, batch_size=32, lr=3e-3, loss="t-dce", eval_every=300, checkpoint_every=300, eval_windows=8, eval_draws=2)
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


@torch.no_grad()
def _guided_chain_rule_reference(model, tok, context: str, continuation: str, w: float) -> float:
    """log p(continuation | EOS + context) by the left-to-right chain rule with unsupervised CFG, one
    position per forward: guided logits (1 + w) l_c - w l_u, the unconditional input having the
    context replaced by MASK. Long contexts are cut on the left to fit the window."""
    stripped = context.rstrip()  # trailing whitespace of the context belongs to the continuation
    cont = tok.encode(context[len(stripped):] + continuation)
    ctx = ([tok.eos_id] + tok.encode(stripped))[-(model.config.context_len - len(cont)):]
    mask = model.config.mask_id
    x = torch.tensor([ctx + [mask] * len(cont)])
    total = 0.0
    for j, token in enumerate(cont):
        uncond = x.clone()
        uncond[0, : len(ctx)] = mask
        l_c, l_u = model(torch.cat([x, uncond])).double()[:, len(ctx) + j]
        total += torch.log_softmax((1 + w) * l_c - w * l_u, dim=-1)[token].item()
        x[0, len(ctx) + j] = token
    return total


def test_harness_guided_accuracy_equals_a_reference_loop(runs):
    """Guided (CFG) multiple-choice accuracy through lm-eval equals the accuracy of a slow reference
    scorer on the same questions, and the guided scores are the reference's."""
    from importlib import resources

    from unmask.evaluation.harness import UnmaskLM, run_harness

    lm = UnmaskLM(runs / "mdm", batch_size=32, cfg_scale=1.0)
    guided = run_harness(lm, ["shakespeare_word_order"], limit=10)["tasks"]["shakespeare_word_order"]["acc"]
    lines = resources.files("unmask.evaluation").joinpath("tasks", "shakespeare_word_order.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines[:10]]
    correct = 0
    for i, doc in enumerate(docs):
        ref = [_guided_chain_rule_reference(lm.model, lm.tok, doc["context"], "\n" + c, 1.0) for c in doc["choices"]]
        correct += max(range(len(ref)), key=ref.__getitem__) == doc["label"]
        if i < 2:  # the adapter's scores themselves (lm-eval's requests: context, delimiter + choice)
            class Req:
                def __init__(self, *args):
                    self.args = args

            ours = [v for v, _ in lm.loglikelihood([Req(doc["context"], "\n" + c) for c in doc["choices"]])]
            assert ours == pytest.approx(ref, abs=1e-4)
            unguided = [v for v, _ in UnmaskLM(runs / "mdm").loglikelihood([Req(doc["context"], "\n" + c) for c in doc["choices"]])]
            assert max(abs(a - b) for a, b in zip(unguided, ref)) > 1e-2  # guidance changes the scores
    assert guided == correct / len(docs)


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
    # both are the exact log-likelihood of the same text after EOS: the AR model's, and the MDM's
    # left-to-right chain-rule score (deterministic), computed on the same tokens
    assert rolling == pytest.approx(whole, abs=1e-9)


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


@pytest.mark.parametrize("causal", [False, True])
def test_harness_generator_lives_on_the_model_device(monkeypatch, causal, generator_devices):
    """generate_until samples on the model's device, so its generator must be made there (a CPU
    generator fails on CUDA). No GPU here: the model is made to report another device, and the
    generator handed to the sampler must have been created for that device."""
    import unmask.evaluation.harness as harness
    import unmask.sampling.decoding as decoding_mod
    from unmask.sampling import SamplerSpec

    made = generator_devices
    monkeypatch.setattr(decoding_mod, "device_of", lambda model: torch.device("cuda"))
    used = []
    run, ar_sample = SamplerSpec.run, decoding_mod.ar_sample
    monkeypatch.setattr(SamplerSpec, "run", lambda self, model, x, generator, *a, **k: used.append(made.get(id(generator))) or run(self, model, x, generator, *a, **k))
    monkeypatch.setattr(decoding_mod, "ar_sample", lambda model, x, generator, *a, **k: used.append(made.get(id(generator))) or ar_sample(model, x, generator, *a, **k))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", context_len=32, causal=causal)).eval()
    lm = harness.UnmaskLM(None, model=model, tokenizer=default_tokenizer(), steps=4)

    class Req:
        args = ("KING", {"until": [], "max_gen_toks": 4})

    lm.generate_until([Req()])
    assert used == ["cuda"]
