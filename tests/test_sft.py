"""Supervised fine-tuning on prompt/response pairs: the conditional bound against exact answers,
CFG dropout, the pairs format, and `unmask finetune` (MDM and AR, exact resume)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from unmask.config import ModelConfig, TrainConfig
from unmask.data.pairs import Pair, PairDataset, encode_pair, prepare_pairs, read_pairs, write_pairs
from unmask.errors import OptionError, UnmaskError
from unmask.likelihood import response_nll
from unmask.losses import Corruption, ar_loss, dce_loss
from unmask.objectives import corrupt_response
from unmask.testing import OracleModel
from unmask.schedule import Schedule

PROMPT = 2  # oracle rows: positions 0-1 are the prompt, 2-4 the response


@pytest.fixture(scope="module")
def oracle():
    return OracleModel.random(vocab_size=3, length=5, concentration=0.5, seed=7)


def exact_response_nll(oracle: OracleModel, rows: torch.Tensor) -> torch.Tensor:
    """-log p(x_2.. | x_0, x_1) per row, from the enumerated distribution."""
    return -(oracle.log_prob(rows) - oracle.log_prob(rows[:, :PROMPT])).double()


def response_of(rows: torch.Tensor) -> torch.Tensor:
    response = torch.zeros_like(rows, dtype=torch.bool)
    response[:, PROMPT:] = True
    return response


def test_k_dce_sft_loss_expectation_is_the_exact_conditional_nll(oracle):
    """Every mask pattern S of the response enumerated, weighted by the k-DCE probability
    1/R x 1/C(R, |S|) and scored with dce_loss on corrupt_response's weight L / |S|: the exact
    expectation is -log p(response | prompt) / R for exact conditionals (the any-order identity,
    restricted to the response)."""
    rows = oracle.seqs[[0, 17, 101, 200, 242]]
    r = rows.shape[1] - PROMPT
    expected = torch.zeros(len(rows), dtype=torch.float64)
    for k in range(1, r + 1):
        for subset in itertools.combinations(range(PROMPT, rows.shape[1]), k):
            masked = torch.zeros_like(rows, dtype=torch.bool)
            masked[:, list(subset)] = True
            xt = torch.where(masked, oracle.config.mask_id, rows)
            u = torch.full((len(rows),), (k - 0.5) / r)  # ceil(u R) = k: corrupt_response's weight for this k
            weight = corrupt_response(rows, response_of(rows), Schedule(), oracle.config.mask_id, torch.Generator(), loss="k-dce", u=u).weight
            noise = Corruption(xt, masked, torch.full((len(rows),), k / r), weight)
            expected += dce_loss(oracle, rows, noise).double() / r / math.comb(r, k)
    torch.testing.assert_close(expected, exact_response_nll(oracle, rows) / r, rtol=1e-6, atol=1e-6)


def test_k_dce_response_masks_are_uniform_subsets_of_the_response():
    """k = ceil(u R) masked positions, all in the response, every k-subset equally likely (chi-square)."""
    rows = torch.zeros((20000, 6), dtype=torch.long)
    response = torch.zeros_like(rows, dtype=torch.bool)
    response[:, 3:] = True
    gen = torch.Generator().manual_seed(0)
    noise = corrupt_response(rows, response, Schedule(), 9, gen, loss="k-dce", low_discrepancy=False)
    assert not noise.masked[:, :3].any() and (noise.xt[:, :3] == 0).all()
    k = noise.masked.sum(dim=1)
    torch.testing.assert_close(noise.weight, 6 / k.float())  # L / k: dce_loss's 1/L then leaves 1/k = (R/k) / R
    counts = torch.bincount(k, minlength=4)[1:].double()
    assert ((counts - len(rows) / 3).abs() < 4 * math.sqrt(len(rows) / 3)).all()
    singles = noise.masked[k == 1][:, 3:].double().mean(dim=0)
    assert ((singles - 1 / 3).abs() < 0.03).all()


def test_t_dce_sft_loss_is_unbiased_for_the_exact_conditional_nll(oracle):
    """Draws with t spread over (0, 1] for every row (eps = 0: the bound itself) average to the exact value."""
    rows = oracle.seqs[[5, 77, 150]].repeat(4000, 1)
    noise = corrupt_response(rows, response_of(rows), Schedule(eps=0.0), oracle.config.mask_id, torch.Generator().manual_seed(1), loss="t-dce")
    assert not noise.masked[:, :PROMPT].any()
    losses = dce_loss(oracle, rows, noise).double().view(-1, 3).T
    exact = exact_response_nll(oracle, rows[:3]) / 3
    se = losses.std(dim=1) / math.sqrt(losses.shape[1])
    assert ((losses.mean(dim=1) - exact).abs() < 4 * se).all(), (losses.mean(dim=1), exact, se)


def test_cfg_dropout_masks_the_whole_prompt_of_a_row_and_never_scores_it():
    """A dropped prompt is MASK from position 1 to the response; the EOS separator at 0 stays, as in
    the unconditional pass of the samplers (make_canvas) and of answer scoring."""
    rows = torch.arange(1, 8).repeat(4000, 1)
    response = torch.zeros_like(rows, dtype=torch.bool)
    response[:, 4:] = True
    gen = torch.Generator().manual_seed(2)
    noise = corrupt_response(rows, response, Schedule(), 0, gen, loss="k-dce", prompt_dropout=0.3)
    assert (noise.xt[:, 0] == rows[:, 0]).all()
    dropped = (noise.xt[:, 1:4] == 0).all(dim=1)
    kept = (noise.xt[:, 1:4] == rows[:, 1:4]).all(dim=1)
    assert (dropped | kept).all()  # a prompt is dropped whole or kept whole
    assert abs(dropped.double().mean().item() - 0.3) < 0.03
    assert not noise.masked[:, :4].any()
    none = corrupt_response(rows, response, Schedule(), 0, torch.Generator().manual_seed(2), loss="k-dce")
    assert (none.xt[:, :4] == rows[:, :4]).all()


def test_response_nll_exact_for_ar_and_within_its_error_for_an_mdm(oracle):
    rows = oracle.seqs[[3, 40, 99, 180, 230, 241]]
    exact = exact_response_nll(oracle, rows).sum().item() / (len(rows) * 3)
    ar = OracleModel(oracle.probs, 3, 5, causal=True)
    # AR layout: the oracle's causal form reads position 0 as the token before the sequence, so
    # shift the rows by one: [prev ; x_0 .. x_4]; the response targets are x_2 .. x_4
    ar_rows = torch.cat([torch.zeros(len(rows), 1, dtype=torch.long), rows], dim=1)
    ar_response = torch.cat([torch.zeros(len(rows), 1, dtype=torch.bool), response_of(rows)], dim=1)
    got = response_nll(ar, ar_rows, ar_response)
    assert got.kind == "exact" and abs(got.nats_per_token - exact) < 1e-9
    # ar_loss with target masks: the slow reference, one target at a time
    slow = [-torch.log_softmax(ar(ar_rows[:, :-1]).double(), -1)[range(len(rows)), i, ar_rows[:, i + 1]] for i in range(PROMPT, 5)]
    torch.testing.assert_close(ar_loss(ar, ar_rows, ar_response[:, 1:]).double(), torch.stack(slow).mean(dim=0), rtol=1e-6, atol=1e-6)
    mdm = response_nll(oracle, rows, response_of(rows), draws=400)
    assert mdm.kind == "elbo" and abs(mdm.nats_per_token - exact) < 4 * mdm.stderr + 1e-6, (mdm, exact)


def test_pairs_rows_are_eos_prompt_response_and_eos_pads(tmp_path):
    from unmask.data import train_bpe

    pairs = [Pair("Who is Ann?", "a baker"), Pair("Who is Bob?", "the king of Bohemia"), Pair("Q:", " x")]
    tok = train_bpe(["Who is Ann? a baker. Who is Bob? the king of Bohemia. Q: x"] * 3, vocab_size=300)
    folder = prepare_pairs(tmp_path / "p", tok, pairs, pairs[:1], length=None)
    data = PairDataset(folder, "train")
    longest = max(2 + sum(map(len, encode_pair(tok, p))) for p in pairs)
    assert data.length == longest
    for row, start, pair in zip(data.tokens, data.start, pairs):
        prompt, response = encode_pair(tok, pair)
        assert row[0] == tok.eos_id and list(row[1:start]) == prompt
        assert list(row[start : start + len(response)]) == response and (row[start + len(response) :] == tok.eos_id).all()
        assert tok.decode(row[start : start + len(response)]).strip() == pair.response.strip()
    tokens, mask = data.sample(np.random.default_rng(0), 8)
    assert tokens.shape == mask.shape == (8, data.length) and (mask.sum(1) >= 2).all() and not mask[:, 0].any()
    with pytest.raises(UnmaskError, match="more than the model's context of 5"):
        prepare_pairs(tmp_path / "q", tok, pairs, length=None, max_length=5)
    with pytest.raises(OptionError, match=rf"length 6: the longest pair needs {longest} tokens .*; use length {longest} or more") as short:
        prepare_pairs(tmp_path / "q", tok, pairs, length=6)
    assert short.value.param == "length"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(UnmaskError, match=r"bad.jsonl line 2: .*'response'"):
        read_pairs(bad)
    with pytest.raises(UnmaskError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")


def _pairs_file(path, n=24):
    return write_pairs(path, [Pair(f"Q: what follows {i}?", f"{i + 1} then {i + 2}") for i in range(n)])


@pytest.fixture(scope="module")
def pretrained(small_data, tmp_path_factory):
    """Tiny MDM and AR runs on the small corpus (a few steps; fine-tuning starts from them)."""
    from unmask.train import train

    out = tmp_path_factory.mktemp("pre")
    from unmask.data import TokenDataset

    tok = TokenDataset(small_data, "train").tokenizer
    runs = {}
    for kind in ("mdm", "ar"):
        cfg = ModelConfig(name="t", vocab_size=tok.vocab_size, context_len=32, n_layer=1, n_head=2, n_embd=32, causal=kind == "ar")
        train(out / kind, cfg, TrainConfig(objective=kind, steps=3, batch_size=4, eval_every=3, eval_windows=2, checkpoint_every=3),
              small_data, device="cpu", progress=False)
        runs[kind] = out / kind
    return runs


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_finetune_resumes_exactly_and_learns_only_responses(kind, pretrained, tmp_path):
    from unmask.cli.finetune import finetune_configs, pairs_folder
    from unmask.train import train

    extra = {"cfg_dropout": 0.2} if kind == "mdm" else {}
    model_cfg, train_cfg = finetune_configs(pretrained[kind], steps=6, batch_size=4, eval_every=3, checkpoint_every=3, **extra)
    assert train_cfg.objective == kind and train_cfg.sft and model_cfg.causal == (kind == "ar")
    data = pairs_folder(tmp_path / "a", pretrained[kind], _pairs_file(tmp_path / "p.jsonl"), None, None, model_cfg.context_len)
    straight = train(tmp_path / "a", model_cfg, train_cfg, data, device="cpu", progress=False)
    train(tmp_path / "b", model_cfg, train_cfg, data, device="cpu", progress=False, stop_after=2)
    resumed = train(tmp_path / "b", model_cfg, train_cfg, data, resume=True, device="cpu", progress=False)
    assert resumed.losses == straight.losses[2:]
    val = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val) == 2 and all(math.isfinite(v["val_nats_per_token"]) for v in val)


def test_ar_sft_batch_loss_is_the_mean_response_nll(pretrained):
    """Only response targets count, each row normalised by its response length (the slow reference)."""
    from unmask.checkpoint import load_model
    from unmask.objectives import Batch, objective_for

    model, config = load_model(pretrained["ar"])
    objective = objective_for(TrainConfig(objective="ar", sft=True), config.model)
    rows = torch.randint(0, 100, (3, 12))
    response = torch.zeros_like(rows, dtype=torch.bool)
    response[0, 7:], response[1, 4:], response[2, 10:] = True, True, True
    logp = torch.log_softmax(model(rows[:, :-1]).float(), -1).gather(-1, rows[:, 1:, None]).squeeze(-1)
    by_hand = torch.stack([-logp[b, start - 1 :].mean() for b, start in enumerate((7, 4, 10))]).mean()
    noise = objective.draw_noise(Batch(rows, response), torch.Generator())
    assert noise is None
    torch.testing.assert_close(objective.loss(model, Batch(rows, response), noise).mean(), by_hand, rtol=1e-5, atol=1e-5)


def test_finetune_cli_errors_name_the_flag(pretrained, tmp_path):
    from unmask.cli import main

    pairs = _pairs_file(tmp_path / "p.jsonl")
    assert main(["finetune", "--run-dir", str(tmp_path / "x"), "--init-from", str(pretrained["ar"]), "--pairs", str(pairs),
                 "--cfg-dropout", "0.1", "--steps", "2"]) == 2
    assert main(["finetune", "--run-dir", str(tmp_path / "y"), "--pairs", str(pairs)]) == 2
    assert main(["finetune", "--run-dir", str(tmp_path / "z"), "--init-from", str(pretrained["mdm"]), "--pairs",
                 str(tmp_path / "nope.jsonl")]) == 2
    assert not (tmp_path / "x").exists() or not (tmp_path / "x" / "checkpoints").exists()


def test_finetune_cli_runs_and_resumes(pretrained, tmp_path, capsys):
    from unmask.cli import main

    pairs = _pairs_file(tmp_path / "p.jsonl")
    run = tmp_path / "ft"
    args = ["finetune", "--run-dir", str(run), "--init-from", str(pretrained["mdm"]), "--pairs", str(pairs), "--cfg-dropout", "0.1",
            "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    assert main(args) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["sft"] == {"cfg_dropout": 0.1} and saved["train"]["objective"] == "mdm"
    assert main(["finetune", "--run-dir", str(run), "--resume", "--steps", "4", "--device", "cpu"]) == 0
    assert main(["finetune", "--run-dir", str(run), "--resume", "--cfg-dropout", "0.5"]) == 2
    assert "--cfg-dropout" in capsys.readouterr().err
