"""The reverse-curse ablation: its evaluation variants against slow explicit references, its settings, and a
miniature run of the grid (resumed without training)."""

import itertools
import json
import math

import pytest
import torch

from unmask.config import ModelConfig
from unmask.errors import OptionError
from unmask.model import Transformer

EOS, MASK = 0, 8  # MASK: the input-only id vocab_size


def _model(causal: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(name="t", vocab_size=8, context_len=12, n_layer=1, n_head=2, n_embd=16, causal=causal))
    with torch.no_grad():  # larger weights than the initialisation, so that the orders differ clearly
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def _slow_order(model, row: list[int], positions: list[int]) -> float:
    """log p of row[positions] decoded one by one in the given order, the other positions given."""
    x = torch.tensor([row])
    for i in positions:
        x[0, i] = MASK
    total = 0.0
    for i in positions:
        with torch.no_grad():
            logp = torch.log_softmax(model(x).double()[0, i], dim=-1)
        total += float(logp[row[i]])
        x[0, i] = row[i]
    return total


PAIRS = [([1, 2], [3, 4, 5]), ([2, 2], [6, 1, 3]), ([5], [4, 2]), ([3, 1, 4], [2])]
CLOSING = [6, EOS]


@pytest.mark.parametrize("canvas", ["eos", "no-eos", "closed"])
def test_ordered_scores_equal_slow_loops(canvas):
    from unmask.experiments.answer_variants import score_answers

    model = _model(causal=False)
    lead = [] if canvas == "no-eos" else [EOS]
    tail = CLOSING if canvas == "closed" else []
    for order, reverse in (("left-to-right", False), ("right-to-left", True)):
        got = score_answers(model, PAIRS, EOS, order, canvas, CLOSING)
        for (p, a), value in zip(PAIRS, got):
            start = len(lead) + len(p)
            positions = list(range(start, start + len(a)))
            assert value == pytest.approx(_slow_order(model, [*lead, *p, *a, *tail], positions[::-1] if reverse else positions), abs=1e-5)
    # the orders are different factorisations of an inconsistent network: they differ
    l2r, r2l = (score_answers(model, PAIRS[:1], EOS, o, canvas, CLOSING)[0] for o in ("left-to-right", "right-to-left"))
    assert abs(l2r - r2l) > 1e-3


def test_any_order_bound_is_the_mean_over_all_orders():
    from unmask.experiments.answer_variants import score_answers

    model = _model(causal=False, seed=1)
    pairs = [([1, 2], [3, 4, 5]), ([6], [2, 5, 1])]
    got = score_answers(model, pairs * 64, EOS, "any-order", draws=64, seed=3)
    for k, (p, a) in enumerate(pairs):
        row, start = [EOS, *p, *a], 1 + len(p)
        exact = [_slow_order(model, row, [start + i for i in perm]) for perm in itertools.permutations(range(len(a)))]
        mean = sum(exact) / len(exact)
        estimates = torch.tensor(got[k::2], dtype=torch.float64)  # 64 independent estimates of 64 draws each
        se = float(estimates.std() / len(estimates) ** 0.5)
        assert abs(float(estimates.mean()) - mean) < 4 * se + 1e-9, (float(estimates.mean()), mean, se)
        assert min(exact) < max(exact)  # the mean is not trivially any single order's value


def test_ar_scores_are_its_own_chain_rule_on_every_canvas():
    from unmask.experiments.answer_variants import score_answers

    model = _model(causal=True)
    for canvas in ("eos", "no-eos", "closed"):
        lead = [] if canvas == "no-eos" else [EOS]
        for (p, a), value in zip(PAIRS, score_answers(model, PAIRS, EOS, "right-to-left", canvas, CLOSING)):
            row, total = [*lead, *p, *a], 0.0
            for i in range(len(lead) + len(p), len(row)):
                with torch.no_grad():
                    total += float(torch.log_softmax(model(torch.tensor([row[:i]])).double()[0, -1], dim=-1)[row[i]])
            assert value == pytest.approx(total, abs=1e-5)


def test_untold_answers_cut_at_eos_or_full_stop_and_extend_the_told_ar_answer():
    from unmask.experiments.answer_variants import answer_text, complete_untold
    from unmask.experiments.answers import complete

    decode = lambda ids: "".join({1: "a", 2: "b", 3: " ", 4: ".", 5: "c", 6: "d"}.get(i, "?") for i in ids)  # noqa: E731
    assert answer_text([1, 3, 2, 4, 5, EOS, 6], EOS, decode) == "a b"
    assert answer_text([5, 1, EOS, 2, 4], EOS, decode) == "ca"
    model = _model(causal=True)
    prompts, lengths = [p for p, _ in PAIRS], [len(a) for _, a in PAIRS]
    told = complete(model, prompts, lengths, EOS)
    longer = complete(model, prompts, [n + 3 for n in lengths], EOS)
    assert [f[: len(t)] for f, t in zip(longer, told)] == told  # greedy AR decoding does not depend on the length asked
    assert complete_untold(model, prompts, lengths, EOS, decode, slack=3) == [answer_text(f, EOS, decode) for f in longer]


def test_settings_refuse_bad_factors_by_name():
    from unmask.experiments import facts, reverse_curse
    from unmask.experiments import reverse_curse_ablation as ablation

    for make, name in ((lambda: reverse_curse.Settings(paraphrases=5), "paraphrases"), (lambda: reverse_curse.Settings(loss="x-dce"), "loss"),
                       (lambda: reverse_curse.Settings(min_lr_ratio=2.0), "min_lr_ratio"), (lambda: ablation.Settings(points=("wide",)), "points"),
                       (lambda: ablation.Settings(seeds=()), "seeds"), (lambda: ablation.Settings(slack=0), "slack")):
        with pytest.raises(OptionError) as err:
            make()
        assert err.value.param == name
    fs = facts.synthetic_facts(2)
    assert facts.fact_documents(fs, 1) == [facts.TEMPLATES[f.direction][0].format(name=f.name, description=f.description,
                                                                                   Description=f.description[:1].upper() + f.description[1:]) for f in fs]
    grid = ablation.Settings()
    specs = {s.name: s for s in ablation.specs_for(grid, {ablation.data_key(grid.settings(p)): ("d", 100) for p in grid.points})}
    assert specs["t-dce-mdm-seed0"].train.loss == "t-dce" and specs["base-mdm-seed0"].train.loss == "k-dce"
    assert specs["constant-lr-mdm-seed0"].train.min_lr_ratio == 1.0 and specs["base-mdm-seed0"].train.min_lr_ratio == 0.1
    assert specs["depth1-mdm-seed0"].model.n_layer == 1 and specs["width256-mdm-seed0"].model.n_embd == 256
    assert {n for n in specs if "-ar-" in n} == {"base-ar-seed0", "mixed-ar-seed0"}
    more = ablation.Settings(points=("base", "t-dce"), more_seeds=(("base", 1), ("base", 0)))
    names = [s.name for s in ablation.specs_for(more, {ablation.data_key(more.settings(p)): ("d", 100) for p in more.points})]
    assert names == ["base-mdm-seed0", "base-ar-seed0", "base-mdm-seed1", "t-dce-mdm-seed0"]


def test_ablation_miniature(tmp_path, monkeypatch):
    from dataclasses import replace

    from unmask.experiments import reverse_curse_ablation as ablation

    base = replace(ablation.BASE, facts_per_direction=2, repeats=2, vocab_size=600, n_layer=1, n_embd=32, n_head=2, steps=4, batch_size=4, context_len=48,
                   distractors=2)
    grid = ablation.Settings(base=base, points=("base", "paraphrases1", "t-dce"), ar_points=("base",), elbo_draws=4)
    result = ablation.run(tmp_path / "ab", grid, device="cpu", progress=False)
    out = tmp_path / "ab"
    assert {"results.json", "results.md", "ablation.png", "corpora", "runs"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "corpora").iterdir())) == 2  # paraphrases1 has its own corpus, t-dce shares the base's
    rows = result["summary"]
    assert [(r["point"], r["model"]) for r in rows] == [("base", "MDM"), ("base", "AR"), ("paraphrases1", "MDM"), ("t-dce", "MDM")]
    for r in rows:
        assert r["questions"] == 4 and r["steps"] == 4  # 2 facts per direction, each asked both ways
        for key, value in r.items():
            if key.startswith(("same_em", "reverse_em", "same_top1", "reverse_top1")) and key != "reverse_top1_p":
                assert value in (0.0, 0.25, 0.5, 0.75, 1.0), key
        assert ("reverse_top1_r2l" in r) == (r["model"] == "MDM")
    hits, n, p = result["pooled"]["top1"]
    assert n == 12 and p == pytest.approx(sum(math.comb(12, i) * (1 / 3) ** i * (2 / 3) ** (12 - i) for i in range(hits, 13)))
    importlib = __import__("importlib")
    monkeypatch.setattr(importlib.import_module("unmask.train"), "train", lambda *a, **k: pytest.fail("trained again"))
    again = ablation.run(tmp_path / "ab", grid, device="cpu", progress=False)["summary"]
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(rows))


def test_ablation_command_refuses_an_unknown_point(tmp_path, capsys):
    from unmask.cli import main

    assert main(["experiment", "reverse-curse-ablation", "--out", str(tmp_path / "ab"), "--points", "base,wide"]) == 2
    assert "--points" in capsys.readouterr().err
