"""Experiments: IsoFLOP fits against exactly known frontiers, the resumable grid runner, and a
miniature run of every experiment command."""

import json
import math

import numpy as np
import pytest
import torch

from unmask.errors import OptionError, UnmaskError
from unmask.experiments import fits

# a synthetic world whose frontiers are known exactly: loss = L*(C) + k (log N - log N*(C))^2
A_MDM, ALPHA_MDM, B_MDM, BETA_MDM = 40.0, 0.08, 0.02, 0.45
A_AR, ALPHA_AR, B_AR, BETA_AR = 30.0, 0.075, 0.05, 0.5
BUDGETS = np.array([1e12, 1e13, 1e14, 1e15])


def _world(a_coef, alpha, b_coef, beta, spread=(0.25, 0.5, 1.0, 2.0, 4.0)):
    c, n, loss = [], [], []
    for budget in BUDGETS:
        n_opt = b_coef * budget**beta
        for f in spread:
            c.append(budget)
            n.append(n_opt * f)
            loss.append(a_coef * budget**-alpha + 0.3 * math.log(f) ** 2)
    return np.array(c), np.array(n), np.array(loss)


def test_isoflop_fits_recover_the_exact_frontier():
    c, n, loss = _world(A_MDM, ALPHA_MDM, B_MDM, BETA_MDM)
    vertices, loss_law, size_law = fits.frontier(c, n, loss)
    for v in vertices:
        assert v.interior
        assert v.n_opt == pytest.approx(B_MDM * v.budget**BETA_MDM, rel=1e-8)
        assert v.loss_opt == pytest.approx(A_MDM * v.budget**-ALPHA_MDM, rel=1e-8)
    assert loss_law.coef == pytest.approx(A_MDM, rel=1e-6) and loss_law.exponent == pytest.approx(-ALPHA_MDM, rel=1e-6)
    assert size_law.coef == pytest.approx(B_MDM, rel=1e-6) and size_law.exponent == pytest.approx(BETA_MDM, rel=1e-6)


def test_compute_multiplier_matches_the_closed_form():
    mdm = fits.PowerLaw(A_MDM, -ALPHA_MDM)
    ar = fits.PowerLaw(A_AR, -ALPHA_AR)
    for budget in (1e13, 1e18, 1e20):
        # A_m C_m^-a_m = A_r C^-a_r  =>  C_m = (A_m / (A_r C^-a_r))^(1/a_m)
        expected = (A_MDM / (A_AR * budget**-ALPHA_AR)) ** (1 / ALPHA_MDM) / budget
        assert fits.compute_multiplier(mdm, ar, budget) == pytest.approx(expected, rel=1e-9)
    assert fits.compute_multiplier(ar, ar, 1e15) == pytest.approx(1.0)


def test_bootstrap_of_noise_free_runs_collapses_to_the_fit_and_drops_degenerate_resamples():
    c, n, loss = _world(A_AR, ALPHA_AR, B_AR, BETA_AR)

    def stat(cb, nb, lb):
        _, ll, sl = fits.frontier(cb, nb, lb)
        return [ll.exponent, sl.exponent]

    values = fits.bootstrap(c, n, loss, stat, samples=200, seed=0)
    # a resample of 5 sizes has < 3 distinct sizes with probability ~0.05 per budget: some are dropped
    assert 100 < len(values) < 200
    np.testing.assert_allclose(values[:, 0], -ALPHA_AR, rtol=1e-6)
    np.testing.assert_allclose(values[:, 1], BETA_AR, rtol=1e-6)
    lo, hi = fits.interval(values[:, 1])
    assert lo == pytest.approx(BETA_AR) and hi == pytest.approx(BETA_AR)


def test_vertex_outside_the_grid_falls_back_to_the_best_run():
    sizes = np.array([1e5, 2e5, 4e5])
    losses = np.array([3.0, 2.5, 2.2])  # still falling: the minimum lies beyond the largest size
    v = fits.isoflop_vertex(1e12, sizes, losses)
    assert not v.interior and v.n_opt == 4e5 and v.loss_opt == 2.2
    with pytest.raises(UnmaskError, match="at least 3 distinct"):
        fits.isoflop_vertex(1e12, sizes[:2], losses[:2])


MINI = {"budgets": [2e8, 6e8], "depths": [1, 2, 3], "aspect": 32, "context_len": 32, "batch_size": 4, "min_steps": 4,
        "eval_windows": 4, "eval_draws": 4}


def test_grid_runner_resumes_an_interrupted_run_and_skips_finished_ones(small_data, tmp_path, monkeypatch):
    import importlib

    from unmask.checkpoint import load_weights
    from unmask.data import TokenDataset
    from unmask.experiments import runner, scaling

    train_module = importlib.import_module("unmask.train")
    grid = scaling.Grid.from_dict(dict(MINI, budgets=[2e8, 4e8]), "test")
    specs = scaling.specs_for(grid, small_data, TokenDataset(small_data, "train").tokenizer.vocab_size)[:2]
    evaluated = []

    def evaluate(spec, run_dir):
        evaluated.append(spec.name)
        return {"steps": load_weights(run_dir)[2].name}

    straight = runner.run_grid(tmp_path / "a", specs, evaluate, device="cpu", progress=False, chunk=3)
    # interrupted: the first run stopped after 2 steps (its checkpoint written), then the grid is run
    train_module.train(tmp_path / "b" / "runs" / specs[0].name, specs[0].model, specs[0].train, small_data, device="cpu", progress=False, stop_after=2)
    calls = []
    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda *a, **k: calls.append(k["resume"]) or real(*a, **k))
    resumed = runner.run_grid(tmp_path / "b", specs, evaluate, device="cpu", progress=False, chunk=3)
    assert calls[0] is True  # continued from step 2, not restarted
    assert [r["result"] for r in resumed] == [r["result"] for r in straight]
    for spec in specs:
        wa, wb = (load_weights(tmp_path / x / "runs" / spec.name)[0] for x in "ab")
        for key in wa:
            assert torch.equal(wa[key], wb[key]), key
    # a finished grid is read back, nothing trained or scored again
    evaluated.clear()
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = runner.run_grid(tmp_path / "b", specs, evaluate, device="cpu", progress=False)
    assert again == resumed and evaluated == []
    assert (tmp_path / "b" / "log.jsonl").read_text().count("\n") == 2
    # other settings under the same names are refused, naming the folder
    changed = [runner.RunSpec(s.name, s.model, s.train, s.data_dir, {**s.meta, "budget": 1.0}) for s in specs]
    with pytest.raises(UnmaskError, match="different settings") as caught:
        runner.run_grid(tmp_path / "b", changed, evaluate, device="cpu", progress=False)
    assert caught.value.param == "out_dir" and "pass a new out_dir folder" in str(caught.value)


def test_scaling_experiment_miniature(small_data, tmp_path):
    from unmask.experiments import scaling

    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(MINI))
    result = scaling.run(tmp_path / "out", str(grid_file), data_dir=small_data, device="cpu", progress=False, bootstrap_samples=50)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"results.json", "results.md", "scaling.png", "runs", "log.jsonl"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["runs"]) == 2 * 2 * 3
    for r in saved["runs"]:
        m = r["spec"]["meta"]
        # the run trains on D = C / (6N) tokens (rounded to whole steps, at least min_steps)
        steps = r["spec"]["train"]["steps"]
        assert steps == max(MINI["min_steps"], round(m["budget"] / (6 * m["n"]) / (MINI["batch_size"] * MINI["context_len"])))
        assert m["flops_6ND"] == 6 * m["n"] * m["tokens"] and m["flops_full"] > m["flops_6ND"]
        assert r["result"]["stderr"] > 0 if m["kind"] == "mdm" else r["result"]["stderr"] == 0
    # the reported frontier is the fit of the reported vertices
    for kind in ("mdm", "ar"):
        f = result["fits"][kind]
        law = fits.power_law([v["budget"] for v in f["vertices"]], [v["loss_opt"] for v in f["vertices"]])
        assert f["loss"]["a"] == pytest.approx(-law.exponent)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "compute multiplier" in md
    edge = [v for kind in ("mdm", "ar") for v in result["fits"][kind]["vertices"] if not v["interior"]]
    assert len(result["edge_vertices"]) == len(edge) and ("Not a frontier" in md) == bool(edge)


def test_scaling_grid_errors_name_the_problem(tmp_path):
    from unmask.experiments import scaling

    with pytest.raises(UnmaskError, match="neither a named grid"):
        scaling.load_grid(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"budgets": [1e9, 2e9], "depths": [1, 2, 3], "widths": 3}))
    with pytest.raises(UnmaskError, match="unknown keys \\['widths'\\]"):
        scaling.load_grid(str(bad))
    bad.write_text(json.dumps({"budgets": [1e9, 2e9], "depths": [1, 2]}))
    with pytest.raises(UnmaskError, match="at least 3 distinct sizes"):
        scaling.load_grid(str(bad))


def test_synthetic_facts_are_deterministic_distinct_and_asked_both_ways():
    from unmask.experiments import facts

    a, b = facts.synthetic_facts(6, seed=3), facts.synthetic_facts(6, seed=3)
    assert a == b and a != facts.synthetic_facts(6, seed=4)
    assert len({f.name for f in a}) == len({f.description for f in a}) == 12
    assert [f.direction for f in a].count("n2d") == 6
    docs = facts.fact_documents(a)
    qs = facts.questions(a)
    assert len(qs) == 24
    for q in qs:
        fact = a[q.fact]
        seen = f"{q.prompt} {q.answer}."
        # the "same" question is the plain training sentence; the reverse order never occurs in training
        assert (seen in docs) == (q.direction == "same")
        subject = q.prompt[: -len(" is")].lower()
        mentions = [d.lower() for d in docs if fact.name in d]
        assert len(mentions) == len(facts.TEMPLATES["n2d"])
        # in every training sentence of the fact, the reverse question's answer comes first
        assert all((d.index(q.answer.lower()) < d.index(subject)) == (q.direction == "reverse") for d in mentions)


def test_user_facts_file_errors_name_the_line(tmp_path):
    from unmask.experiments import facts

    path = tmp_path / "facts.jsonl"
    path.write_text('{"name": "A B", "description": "the c of d"}\n{"name": "E"}\n')
    with pytest.raises(UnmaskError, match="line 2: needs non-empty string fields"):
        facts.read_facts(path)
    path.write_text("".join(json.dumps({"name": f"N{i}", "description": f"the d{i}"}) + "\n" for i in range(4)))
    assert [f.direction for f in facts.read_facts(path)] == ["n2d", "d2n", "n2d", "d2n"]


def _tiny(causal: bool, vocab: int = 50):
    from unmask.config import ModelConfig
    from unmask.model import Transformer

    torch.manual_seed(1)
    return Transformer(ModelConfig(vocab_size=vocab, context_len=16, n_layer=1, n_head=2, n_embd=16, causal=causal)).eval()


def _slow_guided_logprob(mdm, eos: int, p: list[int], a: list[int], w: float, pad_to: int = 0) -> float:
    """log p(a | p) decoded left to right, one position per call: position j masked with everything
    after it (a fine-tuned row's MASK tail up to ``pad_to`` included); the unconditional pass has the
    prompt replaced by MASK, the separator kept."""
    x = torch.tensor([[eos, *p, *a] + [mdm.config.mask_id] * max(0, pad_to - 1 - len(p) - len(a))])
    ref = 0.0
    for j in range(len(a)):
        pos = 1 + len(p) + j
        cond = x.clone()
        cond[0, pos:] = mdm.config.mask_id
        uncond = cond.clone()
        uncond[0, 1 : 1 + len(p)] = mdm.config.mask_id
        lc, lu = mdm(cond)[0, pos].double(), mdm(uncond)[0, pos].double()
        ref += torch.log_softmax((1 + w) * lc - w * lu, -1)[a[j]].item()
    return ref


def test_answer_logprobs_match_slow_per_token_references():
    from unmask.experiments.answers import answer_logprobs, complete

    pairs = [([5, 6], [7, 8, 9]), ([4], [3, 2, 11, 12]), ([9, 9], [1]), ([7, 3], [2, 4, 6])]  # mixed lengths
    eos = 0
    ar, mdm = _tiny(True), _tiny(False)
    with torch.no_grad():
        for w in (0.0, 2.0):
            for pad_to in (0, 10):  # 10: a fine-tuned row, MASK running on to the row's end (neither given nor scored)
                got = answer_logprobs(mdm, pairs, eos, cfg_scale=w, batch_size=2, pad_to=pad_to or None)
                for (p, a), value in zip(pairs, got):
                    assert value == pytest.approx(_slow_guided_logprob(mdm, eos, p, a, w, pad_to), abs=1e-6)
        got = answer_logprobs(ar, pairs, eos)
        fills = complete(ar, [p for p, _ in pairs], [len(a) for _, a in pairs], eos)
        for (p, a), value, fill in zip(pairs, got, fills):
            ref, seq = 0.0, [eos, *p]
            for tok in a:
                ref += torch.log_softmax(ar(torch.tensor([seq]))[0, -1].double(), -1)[tok].item()
                seq.append(tok)
            assert value == pytest.approx(ref, abs=1e-6)
            seq = [eos, *p]
            for _ in a:
                seq.append(int(ar(torch.tensor([seq]))[0, -1].argmax()))
            assert fill == seq[1 + len(p):]


def test_mdm_completions_match_slow_greedy_references():
    """Any order: each call unmasks the most confident masked position; left to right: the leftmost.
    Both with guided logits (the prompt masked in the unconditional pass, the separator kept)."""
    from unmask.experiments.answers import complete

    mdm, eos, w = _tiny(False), 0, 1.5
    prompts, lengths = [[5, 6], [4, 7], [9]], [3, 3, 4]
    for left_to_right in (False, True):
        fills = complete(mdm, prompts, lengths, eos, cfg_scale=w, left_to_right=left_to_right)
        for p, n, fill in zip(prompts, lengths, fills):
            x = torch.tensor([[eos, *p] + [mdm.config.mask_id] * n])
            with torch.no_grad():
                for _ in range(n):
                    uncond = x.clone()
                    uncond[0, 1 : 1 + len(p)] = mdm.config.mask_id
                    logits = ((1 + w) * mdm(x)[0].double() - w * mdm(uncond)[0].double()).log_softmax(-1)
                    masked = (x[0] == mdm.config.mask_id).nonzero().flatten()
                    best, token = logits[masked].max(dim=-1)
                    i = 0 if left_to_right else int(best.argmax())
                    x[0, masked[i]] = token[i]
            assert fill == x[0, 1 + len(p) :].tolist()


def test_reverse_curse_miniature(tmp_path, monkeypatch):
    from unmask.experiments import reverse_curse

    settings = reverse_curse.Settings(facts_per_direction=2, repeats=2, text_chars=2000, vocab_size=600, n_layer=1, n_embd=32, n_head=2,
                                      context_len=96, steps=4, batch_size=4, seeds=(0, 1), distractors=2, cfg_scales=(0.0, 1.0))
    result = reverse_curse.run(tmp_path / "rc", settings, device="cpu", progress=False)
    out = tmp_path / "rc"
    assert {"results.json", "results.md", "reverse_curse.png", "facts.jsonl", "data"} <= {p.name for p in out.iterdir()}
    assert [(r["model"], r["cfg"]) for r in result["summary"]] == [("AR", "w=0"), ("MDM", "w=0"), ("MDM", "w=1")]
    for row in result["summary"]:
        assert row["seeds"] == [0, 1]
        for direction in ("same", "reverse"):
            mean, sd = row[f"{direction}_rank_top1"]
            assert 0 <= mean <= 1 and sd >= 0
            assert 1 <= row[f"{direction}_mean_rank"][0] <= 3
            assert row[f"{direction}_exact_match"][0] in (0, 0.25, 0.5, 0.75, 1)  # 2 facts x 2 seeds per direction
    # everything is finished: a second call reads the results back without training
    importlib = __import__("importlib")
    monkeypatch.setattr(importlib.import_module("unmask.train"), "train", lambda *a, **k: pytest.fail("trained again"))
    again = reverse_curse.run(tmp_path / "rc", settings, device="cpu", progress=False)["summary"]
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(result["summary"]))


def test_reverse_curse_rows_layout_trains_one_fact_per_row(tmp_path):
    from unmask.data.pairs import PairDataset
    from unmask.experiments import reverse_curse

    settings = reverse_curse.Settings(facts_per_direction=2, repeats=2, text_chars=0, vocab_size=600, n_layer=1, n_embd=32, n_head=2,
                                      context_len=96, steps=4, batch_size=4, seeds=(0,), distractors=2, cfg_scales=(0.0,), layout="rows")
    result = reverse_curse.run(tmp_path / "rc", settings, device="cpu", progress=False)
    out = tmp_path / "rc"
    assert {"results.json", "results.md", "reverse_curse.png", "data-rows"} <= {p.name for p in out.iterdir()}
    rows = PairDataset(out / "data-rows", "train")
    assert len(rows.tokens) == 4 * 4 * 2 and (rows.start == 1).all()  # 4 facts x 4 paraphrases x 2 repeats, empty prompts
    assert [r["spec"]["name"] for r in result["runs"]] == ["rows-mdm-seed0", "rows-ar-seed0"]
    assert all(r["spec"]["train"]["sft"] for r in result["runs"])
    assert [r["model"] for r in result["summary"]] == ["AR", "MDM"]
    assert "one document per training row" in (out / "results.md").read_text()
    with pytest.raises(OptionError, match="layout"):
        reverse_curse.Settings(layout="stacked")


def test_conditional_miniature(tmp_path, monkeypatch):
    from unmask.data.pairs import PairDataset
    from unmask.experiments import conditional

    settings = conditional.Settings(facts_per_direction=4, repeats=2, text_chars=2000, vocab_size=600, n_layer=1, n_embd=32, n_head=2,
                                    context_len=96, steps=4, mdm_steps=6, sft_steps=3, batch_size=4, distractors=2, cfg_scales=(0.0, 2.0),
                                    seeds=(0,))
    result = conditional.run(tmp_path / "cg", settings, device="cpu", progress=False)
    out = tmp_path / "cg"
    assert {"results.json", "results.md", "conditional.png", "facts.jsonl", "pairs", "data"} <= {p.name for p in out.iterdir()}
    assert [r["spec"]["name"] for r in result["runs"]] == ["mdm-seed0", "mdm-seed0-sft-drop0", "mdm-seed0-sft-drop0.1", "ar-seed0", "ar-seed0-sft"]
    sft = {r["spec"]["name"]: r["spec"]["train"] for r in result["runs"]}
    assert sft["mdm-seed0-sft-drop0.1"]["sft"] == {"cfg_dropout": 0.1}
    assert sft["ar-seed0-sft"]["adapt"]["init_from"].endswith("runs/ar-seed0")
    # fine-tuning saw the questions of half the facts; the other half are the held-out pairs
    task = conditional.split_task(conditional.facts_mod.synthetic_facts(4, 0))
    assert len(task.sft) == len(task.held_out) == 4 and {q.fact for q in task.sft}.isdisjoint({q.fact for q in task.held_out})
    assert len(PairDataset(out / "pairs", "train").tokens) == 4 and len(PairDataset(out / "pairs", "val").tokens) == 4
    labels = [(r["model"], r["cfg"]) for r in result["summary"]]
    assert labels == [("MDM pretrained", "w=0"), ("MDM pretrained", "w=2"), ("MDM fine-tuned, CFG dropout 0", "w=0"),
                      ("MDM fine-tuned, CFG dropout 0", "w=2"), ("MDM fine-tuned, CFG dropout 0.1", "w=0"),
                      ("MDM fine-tuned, CFG dropout 0.1", "w=2"), ("AR pretrained", "w=0"), ("AR fine-tuned", "w=0")]
    for row in result["summary"]:
        assert row["accuracy_any_order"][0] in (0, 0.25, 0.5, 0.75, 1) and row["accuracy_left_to_right"][0] in (0, 0.25, 0.5, 0.75, 1)
        assert 0 <= row["rank_top1"][0] <= 1 and row["answer_logprob_per_token"][0] < 0
    importlib = __import__("importlib")
    monkeypatch.setattr(importlib.import_module("unmask.train"), "train", lambda *a, **k: pytest.fail("trained again"))
    again = conditional.run(tmp_path / "cg", settings, device="cpu", progress=False)["summary"]
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(result["summary"]))


def test_interpolation_at_equal_in_domain_loss():
    from unmask.experiments.shift import interpolate_at

    assert interpolate_at(3.5, [4.0, 3.0, 5.0], [0.2, 0.1, 0.4]) == (pytest.approx(0.15), False)
    assert interpolate_at(2.5, [4.0, 3.0], [0.2, 0.1]) == (pytest.approx(0.05), True)  # beyond the runs: flagged


def test_milton_texts_ship_with_their_notice():
    from unmask.experiments.shift import milton_works

    works = milton_works()
    assert [name for name, _ in works] == ["areopagitica", "lallegro_il_penseroso_comus_and_lycidas", "paradise_regained"]
    assert "PARADISE REGAINED" in works[2][1]


def test_shift_miniature(tmp_path):
    from unmask.experiments import shift

    other = tmp_path / "other.txt"
    other.write_text("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40)
    settings = shift.Settings(vocab_size=300, n_layer=1, n_embd=32, n_head=2, context_len=16, steps=8, batch_size=4, ar_fractions=(0.5,),
                              eval_windows=4, eval_draws=2, works=1)
    result = shift.run(tmp_path / "sh", settings, shifted=[other], device="cpu", progress=False)
    assert {"results.json", "results.md", "shift.png"} <= {p.name for p in (tmp_path / "sh").iterdir()}
    assert [r["spec"]["name"] for r in result["runs"]] == ["mdm-8steps", "ar-8steps", "ar-4steps"]
    rows = {c["corpus"]: c for c in result["comparison"]}
    assert set(rows) == {"milton", "other.txt"}
    for name, c in rows.items():
        ar = result["runs"][1]["result"]
        assert c["ar_rel_equal_compute"] == pytest.approx(ar[name]["nll"] / ar["in-domain"]["nll"] - 1)
        assert c["mdm_rel_bound"] > -1 and "mdm_rel_chain_rule" in c
    # scoring on other corpora than the finished runs were scored on is refused, naming the folder
    with pytest.raises(UnmaskError, match="different settings"):
        shift.run(tmp_path / "sh", settings, shifted=[], device="cpu", progress=False)


def test_experiment_commands_refuse_bad_flags_by_name(tmp_path, capsys):
    from unmask.cli import main

    assert main(["experiment", "reverse-curse", "--out", str(tmp_path / "rc"), "--cfg-scales", "0,x"]) == 2
    assert "--cfg-scales '0,x'" in capsys.readouterr().err
    assert main(["experiment", "shift", "--out", str(tmp_path / "sh"), "--ar-fractions", "0.5,1.5"]) == 2
    assert "--ar-fractions [0.5, 1.5] must lie in (0, 1)" in capsys.readouterr().err
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({**MINI, "vocab_size": 400}))
    assert main(["experiment", "scaling", "--out", str(tmp_path / "sc"), "--grid", str(grid), "--data", str(tmp_path)]) == 2
    assert "set vocab_size to 0" in capsys.readouterr().err
    assert main(["experiment", "reverse-curse", "--out", str(tmp_path / "rc"), "--facts-file", str(tmp_path / "none.jsonl")]) == 2
    assert "--facts-file" in capsys.readouterr().err
    assert main(["experiment", "scaling", "--out", str(tmp_path / "sc"), "--grid", str(grid), "--data", str(tmp_path)]) == 2
    assert f"error: --data {tmp_path}: the grid asks" in capsys.readouterr().err
    assert main(["experiment", "scaling", "--out", str(tmp_path / "sc"), "--grid", str(tmp_path / "none.json")]) == 2
    assert f"--grid '{tmp_path / 'none.json'}' is neither a named grid" in capsys.readouterr().err
    assert main(["experiment", "reverse-curse", "--out", str(tmp_path / "rc"), "--facts", "1"]) == 2
    assert "--facts=1 must be an integer >= 2" in capsys.readouterr().err
    assert main(["experiment", "shift", "--out", str(tmp_path / "sh"), "--no-milton"]) == 2
    assert "pass --shifted FILE" in capsys.readouterr().err


def test_experiment_settings_errors_name_the_parameter(tmp_path):
    from unmask.cli.spelling import flag_of
    from unmask.errors import OptionError
    from unmask.experiments import conditional, facts, reverse_curse, scaling, shift

    refused = [
        (lambda: reverse_curse.Settings(seeds=()), "seeds", "seeds must name at least one seed"),
        (lambda: reverse_curse.Settings(extra_mdm_steps=(0,)), "extra_mdm_steps", "extra_mdm_steps [0] must be positive step counts"),
        (lambda: reverse_curse.Settings(cfg_scales=()), "cfg_scales", "cfg_scales must name at least one guidance scale"),
        (lambda: reverse_curse.Settings(n_head=0), "n_head", "n_head=0 must be an integer >= 1"),
        (lambda: conditional.Settings(distractors=0), "distractors", "distractors=0 must be an integer >= 1"),
        (lambda: conditional.Settings(cfg_dropout=1.0), "cfg_dropout", "cfg_dropout=1.0 must be a finite number in (0, 1)"),
        (lambda: conditional.Settings(sft_steps=0), "sft_steps", "sft_steps=0 must be an integer >= 1"),
        (lambda: conditional.Settings(mdm_steps=0), "mdm_steps", "mdm_steps=0 must be an integer >= 1"),
        (lambda: shift.Settings(ar_fractions=(0.5, 1.5)), "ar_fractions", "ar_fractions [0.5, 1.5] must lie in (0, 1)"),
        (lambda: shift.Settings(eval_draws=1), "eval_draws", "eval_draws=1 must be an integer >= 2"),
        (lambda: shift.Settings(steps=0), "steps", "steps=0 must be an integer >= 1"),
        (lambda: shift.Settings(lr=0.0), "lr", "lr=0.0 must be a finite number > 0"),
        (lambda: shift.shifted_corpora([], milton=False), "shifted", "no shifted corpus: keep the default Milton texts or pass shifted FILE"),
        (lambda: facts.synthetic_facts(1), "facts_per_direction", "facts_per_direction=1 must be an integer >= 2"),
        (lambda: facts.read_facts(tmp_path / "none.jsonl"), "facts_file", f"facts_file {str(tmp_path / 'none.jsonl')!r} does not exist"),
        (lambda: scaling.load_grid(str(tmp_path / "none.json")), "grid_name", "grid_name "),
    ]
    for make, param, text in refused:
        with pytest.raises(OptionError) as caught:
            make()
        assert caught.value.param == param and str(caught.value).startswith(text), str(caught.value)
    # the command line writes the flags that set them
    assert [flag_of(name) for name in ("facts_per_direction", "grid_name", "data_dir", "out_dir")] == ["--facts", "--grid", "--data", "--out"]


def test_reverse_curse_extra_mdm_runs_train_longer_under_their_own_names(tmp_path):
    from unmask.experiments import reverse_curse

    settings = reverse_curse.Settings(steps=10, seeds=(0, 1), extra_mdm_steps=(40,))
    specs = reverse_curse.specs_for(settings, tmp_path, 100)
    assert [(s.name, s.train.steps, s.train.objective) for s in specs] == [
        ("mdm-seed0", 10, "mdm"), ("ar-seed0", 10, "ar"), ("mdm-seed0-40steps", 40, "mdm"),
        ("mdm-seed1", 10, "mdm"), ("ar-seed1", 10, "ar"), ("mdm-seed1-40steps", 40, "mdm"),
    ]
    with pytest.raises(UnmaskError, match="^extra_mdm_steps") as caught:
        reverse_curse.Settings(extra_mdm_steps=(0,))
    assert caught.value.param == "extra_mdm_steps"
