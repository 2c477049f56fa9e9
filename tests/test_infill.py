"""Span infilling scores and fills against exact conditionals of oracles; the demo's infilling section on tiny runs."""

import pytest
import torch

from unmask.evaluation.infill import ar_span_logprob, infill_examples, mdm_span_logprob, span_line
from unmask.testing import OracleModel

V, L, START, STOP = 3, 5, 1, 3  # span = positions 1, 2: one token left of it, two right of it


@pytest.fixture(scope="module")
def oracles():
    mdm = OracleModel.random(vocab_size=V, length=L, seed=3)
    ar = OracleModel(mdm.probs.clone(), V, L, causal=True)  # the same distribution, read left to right
    return mdm, ar


def exact_log_conditional(oracle: OracleModel, x: torch.Tensor, given: list[int], scored: list[int]) -> torch.Tensor:
    """log p(x[scored] | x[given]) by enumeration (other positions summed out), per row of x (B, L)."""
    def mass(cols):
        agree = (oracle.seqs[None, :, cols] == x[:, None, cols]).all(dim=2)
        return (oracle.probs[None] * agree).sum(dim=1)

    return mass(given + scored).log() - mass(given).log()


def exact_argmax(oracle: OracleModel, row: torch.Tensor, i: int, given: list[int]) -> int:
    """argmax_v p(x_i = v | row[given])."""
    candidates = row.expand(oracle.config.vocab_size, -1).clone()
    candidates[:, i] = torch.arange(oracle.config.vocab_size)
    return exact_log_conditional(oracle, candidates, given, [i]).argmax().item()


def test_mdm_span_score_is_exact_conditional_on_both_sides(oracles):
    mdm, _ = oracles
    x = mdm.seqs[[7, 50, 101, 200, 242]]
    logprob, _ = mdm_span_logprob(mdm, x, START, STOP, right_context=True)
    exact = exact_log_conditional(mdm, x, given=[0, 3, 4], scored=[1, 2])
    assert torch.allclose(logprob, exact, atol=1e-5)


def test_mdm_span_score_without_right_context_is_left_conditional(oracles):
    mdm, _ = oracles
    x = mdm.seqs[[7, 50, 101, 200, 242]]
    logprob, _ = mdm_span_logprob(mdm, x, START, STOP, right_context=False)
    exact = exact_log_conditional(mdm, x, given=[0], scored=[1, 2])
    assert torch.allclose(logprob, exact, atol=1e-5)
    both, _ = mdm_span_logprob(mdm, x, START, STOP, right_context=True)
    assert not torch.allclose(logprob, both, atol=1e-3)  # the right side carries information here


def test_ar_span_score_is_exact_left_conditional(oracles):
    _, ar = oracles
    x = ar.seqs[[7, 50, 101, 200, 242]]
    prev = torch.zeros(x.shape[0], dtype=torch.long)  # the oracle ignores the token before the window
    logprob, greedy = ar_span_logprob(ar, x, prev, START, STOP)
    assert torch.allclose(logprob, exact_log_conditional(ar, x, given=[0], scored=[1, 2]), atol=1e-5)
    # greedy: both span tokens were the argmax of the exact next-token conditional
    for row, flag in zip(x, greedy):
        tops = [exact_argmax(ar, row, i, given=list(range(i))) for i in (1, 2)]
        assert bool(flag) == (tops == row[1:3].tolist())
    assert 0 < int(greedy.sum()) < len(greedy)  # both outcomes occur among these rows


def test_span_must_have_text_on_both_sides(oracles):
    from unmask.errors import UnmaskError

    mdm, _ = oracles
    with pytest.raises(UnmaskError, match="strictly inside"):
        mdm_span_logprob(mdm, mdm.seqs[:2], 0, 2)


def test_infill_fills_only_the_span_with_the_exact_argmax(oracles):
    mdm, ar = oracles
    x = mdm.seqs[[11, 130]]
    single = (2, 3)  # a one-token span: the greedy MDM fill is the argmax of p(x_2 | all the rest)
    fills = infill_examples(mdm, ar, x, torch.zeros(2, dtype=torch.long), *single)
    for row, mdm_fill, ar_fill in zip(x, fills["mdm"], fills["ar"]):
        assert mdm_fill.item() == exact_argmax(mdm, row, 2, given=[0, 1, 3, 4])
        assert ar_fill.item() == exact_argmax(ar, row, 2, given=[0, 1])  # the AR model never sees positions 3, 4
    assert torch.equal(fills["true"], x[:, 2:3])


def test_span_line_shows_the_line_around_the_span():
    from unmask.data import default_tokenizer

    tok = default_tokenizer()
    ids = tok.encode("First line.\nTo be, or not to be: that is the question.\nNext.")
    start = len(tok.encode("First line.\nTo be, or not"))
    stop = start + len(tok.encode(" to be"))
    line = span_line(tok, ids, start, stop, ids[start:stop])
    assert line == "To be, or not[ to be]: that is the question."


def test_demo_infilling_section_on_tiny_runs(tmp_path, small_data, capsys):
    from unmask.cli.demo import print_infilling
    from unmask.config import ModelConfig, TrainConfig
    from unmask.data import TokenDataset
    from unmask.train import train

    vocab = TokenDataset(small_data, "train").tokenizer.vocab_size
    for objective in ("mdm", "ar"):
        model = ModelConfig(vocab_size=vocab, context_len=32, n_layer=1, n_head=2, n_embd=32, causal=objective == "ar")
        train(tmp_path / objective, model, TrainConfig(objective=objective, steps=1, batch_size=2, eval_windows=1, eval_draws=2,
                                                        precision="fp32"), small_data, progress=False)
    print_infilling(tmp_path / "mdm", tmp_path / "ar", small_data, spans=8, examples=2)
    out = capsys.readouterr().out
    assert "MDM, both sides" in out and "MDM, left only" in out and "AR,  left only" in out
    lines = [line for line in out.splitlines() if line[:5] in ("TRUE:", " MDM:", "  AR:")]
    assert len(lines) == 6
    for true, mdm_line, ar_line in zip(lines[0::3], lines[1::3], lines[2::3]):
        # the fixed text around the [span] is the held-out text for both models; only the span differs
        for other in (mdm_line, ar_line):
            assert other[6:].split("[", 1)[0] == true[6:].split("[", 1)[0]
            assert other[6:].rsplit("]", 1)[1] == true[6:].rsplit("]", 1)[1]
