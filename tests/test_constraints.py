"""Structured output (unmask.constraints) against exact references.

On a toy vocabulary of multi-character tokens and short canvases, every masked filling is
enumerated: ``completable``, ``allowed`` and ``commit_greedy`` must equal the brute force over all
fillings (``re.fullmatch`` on the text before the first EOS, every position after it EOS), and
``commit_sampled`` must draw from the restricted, renormalised distribution (chi-square). Then
the real tokenizers: the token bytes of the embedded byte-level BPE and of a LLaMA-style
SentencePiece BPE built here, JSON Schemas decoded to valid JSON, a date regex end to end.
"""

from __future__ import annotations

import json
import re
from itertools import product

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, trainers

from unmask.constraints import (
    Constraint, allowed, commit_greedy, commit_sampled, compile_constraint, compile_regex, completable,
    reachable, refusal, shortest_completion, token_bytes,
)
from unmask.constraints.spec import escape, json_object_regex
from unmask.constraints.vocabulary import token_kind
from unmask.data.corpus import shakespeare_works
from unmask.data.tokenizer import Tokenizer, default_tokenizer
from unmask.errors import OptionError, UnmaskError

# the toy vocabulary: multi-character tokens, EOS and a special PAD without bytes
PIECES = [b"a", b"b", b"ab", None, b"ba", b"c", b"abc", None, b"1", b"12", b"-", b"2"]
EOS, PAD = 3, 7
V = len(PIECES)
MASK = V
REGEXES = ["(ab)+c?", "a|ab", "[ab]*c", "(a|b)c?(12)?", "-?[0-9]+", "(abc|ba)+", "", "b(a|c)*1?", "ab"]


def toy(pattern: str):
    return compile_regex(pattern, PIECES, EOS)


def matches(pattern: str, tokens: list[int]) -> bool:
    """The reference: the text before the first EOS matches in full, and only EOS follows it."""
    if EOS in tokens:
        cut = tokens.index(EOS)
        if any(t != EOS for t in tokens[cut:]):
            return False
        tokens = tokens[:cut]
    if any(PIECES[t] is None for t in tokens):
        return False
    return re.fullmatch(pattern, b"".join(PIECES[t] for t in tokens).decode()) is not None


def fillings(pattern: str, region: list[int]) -> list[list[int]]:
    """Every filling of the MASKs of ``region`` that matches ``pattern``."""
    masked = [k for k, t in enumerate(region) if t == MASK]
    found = []
    for fill in product(range(V), repeat=len(masked)):
        tokens = list(region)
        for k, v in zip(masked, fill):
            tokens[k] = v
        if matches(pattern, tokens):
            found.append(tokens)
    return found


def canvases(seed: int, count: int = 7):
    """(row, start, end) toy canvases: a 2-token prompt, a region of 1-4 positions (mostly MASK),
    sometimes one unconstrained position after it."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        n = int(torch.randint(1, 5, (1,), generator=g))
        region = [MASK if torch.rand(1, generator=g) < 0.7 else int(torch.randint(0, V, (1,), generator=g)) for _ in range(n)]
        tail = [0] if torch.rand(1, generator=g) < 0.3 else []
        yield torch.tensor([5, 1, *region, *tail]), 2, 2 + n


@pytest.mark.parametrize("pattern", REGEXES)
def test_completable_and_allowed_equal_brute_force(pattern):
    a = toy(pattern)
    for row, start, end in canvases(seed=len(pattern)):
        region = row[start:end].tolist()
        found = fillings(pattern, region)
        assert completable(a, row, start, end) == bool(found), (pattern, region)
        masked = [k for k, t in enumerate(region) if t == MASK]
        expected = torch.zeros(len(masked), V, dtype=torch.bool)
        for tokens in found:
            for j, k in enumerate(masked):
                expected[j, tokens[k]] = True
        assert torch.equal(allowed(a, row, start, end), expected), (pattern, region)


@pytest.mark.parametrize("pattern", REGEXES)
def test_commit_greedy_is_the_constrained_argmax(pattern):
    a = toy(pattern)
    g = torch.Generator().manual_seed(1)
    for row, start, end in canvases(seed=100 + len(pattern)):
        region = row[start:end].tolist()
        masked = [k for k, t in enumerate(region) if t == MASK]
        found = fillings(pattern, region)
        if not found or not masked:
            continue
        chosen = [k for k in masked if torch.rand(1, generator=g) < 0.7] or masked[:1]
        log_probs = torch.randn(len(chosen), V, generator=g, dtype=torch.float64).log_softmax(-1)
        score = lambda tokens: sum(float(log_probs[j, tokens[k]]) for j, k in enumerate(chosen))  # noqa: E731
        best = max(found, key=score)
        out = commit_greedy(a, row, [start + k for k in chosen], log_probs, start, end)
        assert [int(out[start + k]) for k in chosen] == [best[k] for k in chosen], (pattern, region)
        assert completable(a, out, start, end)


def chi_square_ok(counts: dict, expected: dict, draws: int) -> bool:
    """Pearson's test at level 1e-3 (scipy), or every frequency within 0.03 of its probability."""
    keys = sorted(expected)
    assert set(counts) <= set(keys), "drew an outcome of probability 0"
    try:
        from scipy.stats import chisquare
    except ImportError:
        return all(abs(counts.get(k, 0) / draws - expected[k]) < 0.03 for k in keys)
    observed = [counts.get(k, 0) for k in keys]
    return chisquare(observed, [expected[k] * draws for k in keys]).pvalue > 1e-3


def test_commit_sampled_draws_from_the_restricted_renormalised_distribution():
    """Two positions committed together: the first from its restricted distribution, the second
    from its own restricted given the first (the sequential rule, not the joint's conditional)."""
    pattern, a = "(ab)+c?", toy("(ab)+c?")
    row = torch.tensor([MASK, MASK, MASK])
    log_probs = torch.randn(2, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64).log_softmax(-1)
    found = fillings(pattern, row.tolist())
    expected = {}
    first = sorted({t[0] for t in found})
    for x0 in first:
        p0 = log_probs[0, x0].exp() / log_probs[0, first].exp().sum()
        second = sorted({t[1] for t in found if t[0] == x0})
        for x1 in second:
            expected[(x0, x1)] = float(p0 * log_probs[1, x1].exp() / log_probs[1, second].exp().sum())
    g, counts, draws = torch.Generator().manual_seed(0), {}, 3000
    for _ in range(draws):
        out = commit_sampled(a, row, [0, 1], log_probs, g)
        counts[(int(out[0]), int(out[1]))] = counts.get((int(out[0]), int(out[1])), 0) + 1
    assert chi_square_ok(counts, expected, draws)


def test_eos_ends_the_text_and_only_eos_follows():
    a = toy("ab")
    assert allowed(a, torch.tensor([MASK, MASK, MASK])).nonzero().tolist() == [[0, 0], [0, 2], [1, 1], [1, EOS], [2, EOS]]
    assert not completable(a, torch.tensor([2, EOS, 5]))
    assert completable(a, torch.tensor([2, EOS, EOS])) and completable(a, torch.tensor([0, 1]))
    assert allowed(a, torch.tensor([2, MASK])).nonzero().tolist() == [[0, EOS]]  # PAD (no bytes) is never allowed


def test_ar_steps_agree_with_the_canvas():
    """next_state / allowed_next (AR decoding) equal `allowed` at the first MASK of a canvas whose
    decoded prefix is followed by the remaining positions, all MASK."""
    a, g = toy("(a|b)c?(12)?"), torch.Generator().manual_seed(5)
    for _ in range(20):
        state, prefix, n = torch.tensor([a.initial]), [], 4
        for step in range(n):
            mask = a.allowed_next(state, remaining=n - step)[0]
            assert torch.equal(mask, allowed(a, torch.tensor(prefix + [MASK] * (n - step)))[0])
            choice = torch.multinomial(mask.double(), 1, generator=g)
            prefix.append(int(choice))
            state = a.next_state(state, choice)
        assert matches("(a|b)c?(12)?", prefix)


def test_token_edges_and_reach_agree_with_next_state():
    a = toy("(a|b)c?(12)?")
    pairs = {(s, v): d for s, v, d in zip(a.src.tolist(), a.token.tolist(), a.dst.tolist())}
    assert len(pairs) == a.n_edges == a.src.numel()
    states, tokens = torch.arange(a.n_states).repeat_interleave(V), torch.arange(V).repeat(a.n_states)
    expected = [pairs.get((s, v), -1) for s, v in zip(states.tolist(), tokens.tolist())]
    assert a.next_state(states, tokens).tolist() == expected
    row = torch.tensor([MASK, 5, MASK, MASK])
    reach = reachable(a, row)
    assert reach.masked == [0, 2, 3] and reach.forward.shape == reach.backward.shape == (5, a.n_states)
    assert bool(reach.backward[0, a.initial]) == completable(a, row)
    region, accepting = row.tolist(), set(a.accepting.nonzero().squeeze(1).tolist())
    for k in range(5):  # every set at every boundary, against all fillings walked token by token
        before = {_walk(a, a.initial, fill) for fill in _fills(region[:k])} - {-1}
        after = {s for s in range(a.n_states) if any(_walk(a, s, fill) in accepting for fill in _fills(region[k:]))}
        assert set(reach.forward[k].nonzero().squeeze(1).tolist()) == before
        assert set(reach.backward[k].nonzero().squeeze(1).tolist()) == after


def _fills(region):
    return product(*[range(V) if t == MASK else [t] for t in region])


def _walk(a, state, tokens):
    state = torch.tensor([state])
    for t in tokens:
        state = a.next_state(state, torch.tensor([t]))
    return int(state[0])


def test_batched_rows_each_with_its_automaton_or_none():
    """What the samplers call (unmask.constraints.decode): a row without an automaton is left as the
    sampler made it; a constrained row's logits keep only its allowed tokens, and its commits match."""
    from unmask.constraints.decode import CanvasConstraint
    from unmask.sampling.base import SamplerConfig

    a = toy("(ab)+c?")
    tokens = torch.tensor([[9, MASK, MASK, MASK], [9, MASK, 2, MASK]])
    logits = torch.randn(2, 4, V + 2, generator=torch.Generator().manual_seed(4))
    want = tokens == MASK
    constraint = CanvasConstraint.for_canvas([a, None], 4, 1)
    out = constraint.restrict(tokens, want, logits[want])
    assert torch.equal(out[3:], logits[1, [1, 3]])
    assert torch.equal(out[:3] > -torch.inf, torch.cat([allowed(a, tokens[0], 1), torch.zeros(3, 2, dtype=torch.bool)], 1))
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.0):
        proposed = torch.where(want, logits.argmax(-1), tokens)
        filled = constraint.settle(tokens, proposed, want, out, g, SamplerConfig(temperature=temperature), MASK)
        assert matches("(ab)+c?", filled[0, 1:].tolist()) and (filled != MASK).all() and filled[1, 2] == 2
        assert torch.equal(filled[1], proposed[1])


def test_shortest_completion_and_refusal():
    a = toy("(abc){3}")
    assert a.min_length == 3
    assert shortest_completion(a, torch.tensor([MASK])) == 3 and shortest_completion(a, torch.tensor([MASK] * 5)) == 5
    assert shortest_completion(a, torch.tensor([6, MASK])) == 3  # "abc" fixed, two more to come
    assert shortest_completion(a, torch.tensor([MASK, 5])) == 4  # "ab" + "c", then two more "abc"
    assert shortest_completion(a, torch.tensor([5, MASK])) is None  # "c…" can never match
    error = refusal(a, torch.tensor([9, MASK, MASK]), start=1)
    assert error.param == "length" and str(error) == "length=2 is too short for the constraint: it needs at least 3 tokens"
    assert "contradicts" in str(refusal(a, torch.tensor([0, 0])))
    assert refusal(a, torch.tensor([MASK] * 3)) is None


ATOMS = st.sampled_from(["a", "b", "c", "1", "2", "-", "[ab]", "[0-9]", "ab", "12"])
REGEX = st.recursive(ATOMS, lambda inner: st.one_of(
    st.tuples(inner, inner).map("".join),
    st.tuples(inner, inner).map(lambda t: f"({t[0]}|{t[1]})"),
    inner.map(lambda r: f"({r})*"), inner.map(lambda r: f"({r})?"), inner.map(lambda r: f"({r})+"),
), max_leaves=5)


@settings(max_examples=100, deadline=None, database=None)
@given(pattern=REGEX, region=st.lists(st.sampled_from([MASK] * 3 * V + list(range(V))), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_random_regexes_and_canvases_fill_to_a_match(pattern, region, seed):
    a, row = toy(pattern), torch.tensor(region)
    if region.count(MASK) <= 3:
        assert completable(a, row) == bool(fillings(pattern, region))
    event(f"completable: {completable(a, row)}")
    if not completable(a, row):
        return
    g = torch.Generator().manual_seed(seed)
    while (row == MASK).any():  # MDM-style: a random subset of the masked positions per step
        masked = (row == MASK).nonzero().squeeze(1)
        chosen = masked[torch.rand(masked.numel(), generator=g) < 0.5]
        chosen = chosen if chosen.numel() else masked[:1]
        row = commit_sampled(a, row, chosen, torch.randn(chosen.numel(), V, generator=g).log_softmax(-1), g)
    assert matches(pattern, row.tolist())


def test_bad_patterns_name_their_parameter():
    with pytest.raises(OptionError, match=r"regex '\(a' does not compile") as info:
        compile_regex("(a", PIECES, EOS)
    assert info.value.param == "regex"
    with pytest.raises(OptionError, match="cannot be matched|does not compile") as info:
        compile_regex("x", PIECES, EOS)  # no token writes an x
    assert info.value.param == "regex"
    for make, param in [(lambda: Constraint.json_schema({"type": 5}), "json_schema"), (lambda: Constraint.choice([]), "choice"),
                        (lambda: Constraint.json_schema("{not json"), "json_schema"), (lambda: Constraint.parse("grammar", "x"), "constraint")]:
        with pytest.raises(OptionError) as info:
            make().to_regex()
        assert info.value.param == param


def test_choice_and_json_object_regexes():
    assert escape("a.b|c{2}") == r"a\.b\|c\{2\}"
    pattern = Constraint.choice(["yes", "no.", "(maybe)"]).to_regex()
    assert [bool(re.fullmatch(pattern, s)) for s in ["yes", "no.", "(maybe)", "noX", "maybe"]] == [True, True, True, False, False]
    shallow, deep = json_object_regex(2), json_object_regex(3)
    for text, depth in [('{}', 1), ('{"a": 1, "b":"x"}', 1), ('{"a":{"b":1}}', 2),
                        ('{"a":[1, null]}', 2), ('{"a":{"b":[1, null]}}', 3), ('{"a":[{"b":true}]}', 3), ('{"a":{"b":{"c":1}}}', 3)]:
        assert bool(re.fullmatch(shallow, text)) == (depth <= 2), text
        assert re.fullmatch(deep, text), text


# --- real tokenizers ---------------------------------------------------------------------------

def sample_texts() -> list[str]:
    text = shakespeare_works("validation")[0][1]
    lines = [line for line in text.splitlines() if line.strip()][:300]
    return lines[::7] + ["  two  spaces", "tab\there", "café déjà vu — “quotes” ✓ 日本語", "\nnew\n\nlines\n", "x"]


@pytest.fixture(scope="module")
def llama_tokenizer() -> Tokenizer:
    """A LLaMA-2-style tokenizer.json: SentencePiece BPE, ``▁`` normalizer, <0xAB> byte fallback tokens
    at ids 3..258 after <unk>, <s>, </s>, and the decoder Replace, ByteFallback, Fuse, Strip."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    lines = [line for _, text in shakespeare_works("train")[:1] for line in text.splitlines() if line.strip()][:3000]
    hf.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(hf.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in learned:
        vocab.setdefault(piece, len(vocab))
    spec["model"]["vocab"] = vocab
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), "llama-style")


def test_byte_level_token_bytes_concatenate_to_the_decoded_text():
    tok = default_tokenizer()
    pieces = token_bytes(tok)
    assert len(pieces) == tok.vocab_size and pieces[tok.eos_id] is None and pieces[tok.pad_id] is None
    for i, piece in enumerate(pieces):
        if piece is not None and _utf8(piece):
            assert piece.decode() == tok.decode([i]), i
    for ids in tok.encode_batch(sample_texts()):
        assert b"".join(pieces[i] for i in ids) == tok.decode(ids).encode()


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_sentencepiece_token_bytes_concatenate_to_the_decoded_text(llama_tokenizer):
    """What holds: the bytes equal the decoded text with the one leading space the decoder strips."""
    tok = llama_tokenizer
    pieces = token_bytes(tok)
    assert len(pieces) == tok.vocab_size == tok.mask_id  # MASK: the id after the vocabulary
    assert pieces[3 + 0xC3] == b"\xc3" and pieces[:3] == [None] * 3 and b" " in pieces
    for i, piece in enumerate(pieces):
        if piece is not None and _utf8(piece):
            assert piece == (b" " if piece.startswith(b" ") else b"") + tok.decode([i]).encode(), i
    for ids in tok.encode_batch(sample_texts()):
        joined = b"".join(pieces[i] for i in ids)
        assert joined.startswith(b" ") and joined == b" " + tok.decode(ids).encode()


def test_the_token_family_is_read_from_the_decoder_and_pre_tokenizer():
    qwen2 = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x"}},
                                                                      {"type": "ByteLevel", "use_regex": False}]},
             "decoder": {"type": "ByteLevel"}}
    metaspace = {"decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}, "model": {"byte_fallback": False}}
    assert token_kind(qwen2) == ("byte_level", False) and token_kind(metaspace) == ("sentencepiece", False)
    with pytest.raises(UnmaskError, match="byte-level"):
        token_kind({"decoder": {"type": "WordPiece"}, "pre_tokenizer": {"type": "BertPreTokenizer"}})


def fill(automaton, row, start, generator, greedy=False):
    """Commit the masked positions of row[start:] in random batches, as an MDM sampler would."""
    V = automaton.n_tokens
    while (row[start:] == automaton.mask_id).any():
        masked = start + (row[start:] == automaton.mask_id).nonzero().squeeze(1)
        chosen = masked[torch.randperm(masked.numel(), generator=generator)[:8]]
        log_probs = (3 * torch.randn(chosen.numel(), V, generator=generator)).log_softmax(-1)
        row = commit_greedy(automaton, row, chosen, log_probs, start) if greedy else commit_sampled(automaton, row, chosen, log_probs, generator, start)
    return row


def generated_text(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)


@pytest.mark.parametrize("name", ["default", "llama-style"])
def test_a_date_regex_end_to_end(name, request):
    tok = default_tokenizer() if name == "default" else request.getfixturevalue("llama_tokenizer")
    pattern = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
    a = compile_constraint(Constraint.regex(pattern), tok)
    assert compile_constraint(Constraint.regex(pattern), tok) is a  # compiled once per tokenizer
    prompt = tok.encode("The date: ")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        row = torch.tensor(prompt + [tok.mask_id] * 12)
        row = fill(a, row, len(prompt), g)
        assert re.fullmatch(pattern, generated_text(tok, row[len(prompt):].tolist()))


SCHEMAS = {
    "nested object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "[0-9]{5}"},
                                                     "city": {"enum": ["Rome", "Paris"]}}, "required": ["zip", "city"]}},
        "required": ["name", "address"]},
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "enum": {"enum": ["red", "green", 3, None]},
    "number": {"type": "number"},
    "string with pattern": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schemas_decode_to_valid_json(name):
    import jsonschema

    tok, schema = default_tokenizer(), SCHEMAS[name]
    a = compile_constraint(Constraint.json_schema(schema), tok)
    g = torch.Generator().manual_seed(7)
    for greedy in (False, True):
        row = fill(a, torch.tensor([tok.mask_id] * (a.min_length + 12)), 0, g, greedy=greedy)
        value = json.loads(generated_text(tok, row.tolist()))
        jsonschema.validate(value, schema)


def test_any_json_object_end_to_end():
    tok = default_tokenizer()
    a = compile_constraint(Constraint.json_object(), tok)
    row = fill(a, torch.tensor([tok.mask_id] * 24), 0, torch.Generator().manual_seed(2))
    assert isinstance(json.loads(generated_text(tok, row.tolist())), dict)
