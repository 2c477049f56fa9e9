"""The reversal experiment: its task and statistics against exact answers, and a miniature run of
``unmask experiment reversal`` through the installed command, resumed."""

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask.config import ModelConfig
from unmask.errors import UnmaskError
from unmask.experiments import reversal
from unmask.experiments import reversal_task as rt
from unmask.model import Transformer


def test_task_draws_distinct_entities_and_documents_hold_only_the_facts():
    task = rt.make_task(5, 2, seed=3)
    assert task == rt.make_task(5, 2, seed=3) and task != rt.make_task(5, 2, seed=4)
    entities = [e for pair in task.pairs + task.inverse for e in pair]
    assert sorted(entities) == list(range(14)) and task.entities == 14
    (a, b), (c, d) = task.pairs[0], task.inverse[0]
    docs = rt.documents(task)
    assert docs[0] == f"e{a} r e{b}" and docs[5] == f"e{d} r' e{c}" and len(docs) == 7
    tok = rt.tokenizer(task)
    assert (tok.eos_id, tok.pad_id, tok.vocab_size, tok.mask_id) == (0, 1, 18, 18)
    assert tok.encode(docs[0]) == [4 + a, 2, 4 + b] and tok.encode(docs[5]) == [4 + d, 3, 4 + c]


def test_questions_are_laid_out_as_a_fact_with_one_mask():
    task = rt.Task(pairs=((0, 1), (2, 3)), inverse=())
    qs = rt.questions(task, rt.tokenizer(task))
    m = 8  # 4 specials + 4 entities: MASK is id 8
    assert qs["forward"].rows.tolist() == [[0, 4, 2, m, 0], [0, 6, 2, m, 0]] and qs["forward"].answers.tolist() == [5, 7]
    assert qs["infill"].rows.tolist() == [[0, m, 2, 5, 0], [0, m, 2, 7, 0]] and qs["infill"].slot == 1
    assert qs["reverse"].rows.tolist() == [[0, 5, 2, m, 0], [0, 7, 2, m, 0]] and qs["reverse"].answers.tolist() == [4, 6]
    assert qs["reverse_r2"].rows[:, 2].tolist() == [3, 3] and qs["reverse"].candidates.tolist() == [4, 6]


def test_isolated_layout_is_one_fact_per_row(tmp_path):
    from unmask.data.pairs import PairDataset

    settings = reversal.Settings(pairs=3, seeds=(1,))
    folder = reversal.prepare(tmp_path, settings, "isolated", 1)
    rows = PairDataset(folder, "train")
    a, b = rt.make_task(3, 0, 1).pairs[0]
    assert rows.tokens.shape == (3, 5) and rows.tokens[0].tolist() == [0, 4 + a, 2, 4 + b, 0]
    assert rows.response_mask(slice(None))[0].tolist() == [False, True, True, True, True]


def test_score_ranks_the_answer_among_the_candidates():
    q = rt.Questions(rows=torch.zeros(3, 5, dtype=torch.long), slot=3, answers=torch.tensor([0, 1, 2]),
                     candidates=torch.tensor([0, 1, 2]))
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.1, 0.2], [0.3, 0.3, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    s = rt.score(logp, q)
    # row 0: top (rank 1); row 1: tied with another candidate, which counts against it (rank 2); row 2: top of the
    # candidates though not of the vocabulary (rank 1)
    assert s["correct"] == 2 and s["top1"] == pytest.approx(2 / 3) and s["mean_rank"] == pytest.approx(4 / 3)
    logp[2] = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))  # now two candidates above the answer: rank 3
    s = rt.score(logp, q)
    assert s["correct"] == 1 and s["mean_rank"] == pytest.approx(2.0)
    expected = (math.log(0.5 / 0.8) + math.log(0.3 / 0.8) + math.log(0.2 / 0.9)) / 3
    assert s["logp_candidates"] == pytest.approx(expected) and s["logp"] == pytest.approx((math.log(0.5 * 0.3 * 0.2)) / 3)


def test_binomial_tail_is_exact():
    assert reversal.binomial_tail(2, 3, Fraction(1, 2)) == 0.5  # (3 + 1) / 8
    assert reversal.binomial_tail(0, 7, Fraction(1, 3)) == 1.0
    assert reversal.binomial_tail(3, 3, Fraction(1, 32)) == pytest.approx(32.0**-3, rel=1e-15)
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n, p in ((6, 96, Fraction(1, 32)), (29, 32, Fraction(1, 32)), (1, 64, Fraction(1, 16))):
        assert reversal.binomial_tail(k, n, p) == pytest.approx(scipy_stats.binomtest(k, n, float(p), alternative="greater").pvalue, rel=1e-9)
    with pytest.raises(UnmaskError, match="k=5"):
        reversal.binomial_tail(5, 4, Fraction(1, 2))


@pytest.mark.parametrize("causal", [False, True])
def test_slot_scores_equal_the_answer_scorer_of_the_other_experiments(causal):
    from unmask.experiments.answers import answer_logprobs

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=12, context_len=8, n_layer=1, n_head=2, n_embd=16, causal=causal)).eval()
    prompts = [[4, 2], [7, 2], [9, 3]]
    q = rt.Questions(rows=torch.tensor([[0, *p, 12] for p in prompts]), slot=3, answers=torch.tensor([5, 6, 8]),
                     candidates=torch.tensor([5, 6, 8]))
    logp = rt.slot_logprobs(model, q)
    expected = answer_logprobs(model, [(p, [a]) for p in prompts for a in (5, 6, 8)], eos=0)
    assert np.allclose(logp[:, [5, 6, 8]].flatten().numpy(), expected, atol=1e-5)


def _command(out: Path) -> subprocess.CompletedProcess:
    unmask = Path(sys.executable).with_name("unmask")
    args = [str(unmask), "experiment", "reversal", "--out", str(out), "--pairs", "4", "--steps", "4", "--eval-points", "2",
            "--seeds", "0,1", "--layers", "1", "--positions", "rope", "--layouts", "isolated,packed", "--n-embd", "16",
            "--context-len", "6", "--repeats", "3", "--device", "cpu"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_reversal_command_writes_its_files_and_resumes(tmp_path):
    out = tmp_path / "rev"
    first = _command(out)
    assert first.returncode == 0, first.stderr
    for name in ("results.json", "results.md", "reversal.png", "log.jsonl"):
        assert (out / name).is_file(), name
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == 8 and len(result["summary"]) == 4
    run = result["runs"][0]["result"]
    assert [p["step"] for p in run["curve"]] == [0, 2, 4] and set(run["final"]) == {"step", *rt.DIRECTIONS}
    ar = next(r for r in result["runs"] if r["spec"]["meta"]["kind"] == "ar")["result"]["final"]
    assert "infill" not in ar
    row = result["summary"][0]
    assert row["reverse_correct"][1] == 8 and 0 < row["reverse_p"] <= 1 and len(row["reverse_top1"]) == 2
    assert "| isolated | 1 | rope | MDM |" in (out / "results.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    second = _command(out)
    assert second.returncode == 0, second.stderr
    assert "8 of 8 runs already finished" in second.stdout + second.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")} == before
    assert json.loads((out / "results.json").read_text())["summary"] == result["summary"]
    changed = reversal.Settings(pairs=4, steps=4, eval_points=2, seeds=(0, 1), layers=(1,), positions=("rope",), layouts=("isolated", "packed"),
                                n_embd=16, context_len=6, repeats=3, lr=0.001)
    with pytest.raises(UnmaskError, match="different settings"):
        reversal.run(out, changed, device="cpu", progress=False)
