"""Structured output through the decoding path (``Decoding.run``), not only the constraint core.

Random tiny models decode random regexes with every MDM sampler, cache, semi-autoregressive blocks,
temperature and guidance, a block model on its grid with its block cache, AR decoding with and
without its KV cache, infilling templates and JSON Schemas: every constrained row's text before its
first EOS matches in full and only EOS follows it. A one-step greedy decode equals the brute-force
argmax of the model's log-probabilities over all matching fillings. Lengths too short for a
pattern, templates that contradict it and bad command lines are refused before decoding.

Rows share one generator. At temperature 0 the constraint draws nothing (the greedy commit is a
dynamic program) and never changes which positions a step commits, so an unconstrained row beside
constrained ones is the row decoded without any constraint, token for token. At temperature > 0
the constrained rows' commits draw from the shared generator, so the unconstrained row's draws
shift: it is then a valid sample of its own and nothing is required of it. AR decoding draws one
number per row and step whatever the constraint, so there the unconstrained row equals the free
decoding at every temperature.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import lru_cache
from itertools import product
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from runs import finetune_source
from unmask.checkpoint import checkpoint_tokenizer
from unmask.cli import main
from unmask.config import ModelConfig
from unmask.constraints import Constraint, compile_constraint
from unmask.constraints.compile import tokenizer_bytes
from unmask.constraints.decode import constrain
from unmask.data.tokenizer import Tokenizer, default_tokenizer
from unmask.errors import OptionError
from unmask.generation import generate
from unmask.model import Transformer
from unmask.sampling import ARConfig, Decoding, SamplerSpec, infill_canvas, make_canvas
from unmask.sampling.canvas import infill_ids

UNMASK = Path(sys.executable).with_name("unmask")  # the installed console script

# a toy byte-level vocabulary: single characters and multi-character tokens across JSON's punctuation
JSON_PIECES = [*"0123456789", *"abcxyz", *'{}[]":,-.', " ", "ab", "abc", "12", '":', '{"', '",', ', "', "true", "null"]
# a smaller one, enumerable over a few positions
SMALL_PIECES = ["a", "b", "ab", "ba", "c", "abc", "1", "12", "2", "-"]

SAMPLERS = [
    {"sampler": "ancestral"},
    *({"sampler": "confidence", "score": score} for score in ("low_confidence", "margin", "entropy", "random")),
    {"sampler": "threshold", "tau": 0.5},
    {"sampler": "first-hitting", "k": 1},
    {"sampler": "first-hitting", "k": 2},
]
CACHES = [{}, {"cache": "prefix"}, {"cache": "dual"}, {"cache": "delayed", "cache_refresh": 2}]
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def toy_tokenizer(pieces: tuple[str, ...]) -> Tokenizer:
    """A byte-level BPE whose vocabulary is <|eos|>, <|pad|>, ``pieces``, then <|mask|> (no merges:
    text encodes character by character; the model may still produce the multi-character tokens)."""
    vocab = {"<|eos|>": 0, "<|pad|>": 1}
    for piece in pieces:
        vocab[piece.replace(" ", "Ġ")] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|eos|>", "<|pad|>", "<|mask|>"])
    return Tokenizer(hf, "toy")


TOK = toy_tokenizer(tuple(JSON_PIECES))
SMALL = toy_tokenizer(tuple(SMALL_PIECES))


def tiny(tok: Tokenizer, seed: int, **config) -> Transformer:
    """A random one-layer model over ``tok``'s vocabulary (init_std 0.5: far from uniform logits)."""
    torch.manual_seed(seed)
    options = {"context_len": 64, "n_layer": 1, "n_head": 2, "n_embd": 32, "init_std": 0.5, **config}
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, **options)).eval()


def generated_text(tok: Tokenizer, ids: list[int]) -> str | None:
    """The text of the tokens' bytes before the first EOS; None when anything but EOS follows it,
    or a token without bytes (PAD, MASK) comes before it."""
    if tok.eos_id in ids:
        cut = ids.index(tok.eos_id)
        if any(t != tok.eos_id for t in ids[cut:]):
            return None
        ids = ids[:cut]
    pieces = tokenizer_bytes(tok)
    if any(pieces[t] is None for t in ids):
        return None
    return b"".join(pieces[t] for t in ids).decode("utf-8", errors="replace")


def matches(tok: Tokenizer, pattern: str, ids: list[int]) -> bool:
    text = generated_text(tok, ids)
    return text is not None and re.fullmatch(pattern, text) is not None


def automata(tok: Tokenizer, patterns) -> list:
    return [None if p is None else compile_constraint(Constraint.regex(p), tok) for p in patterns]


def assert_rows(tok: Tokenizer, rows: torch.Tensor, patterns, what) -> None:
    for b, pattern in enumerate(patterns):
        if pattern is not None:
            ids = rows[b].tolist()
            assert matches(tok, pattern, ids), (what, b, pattern, tok.decode(ids, skip_special=False))


# --- random regexes --------------------------------------------------------------------------------

LITERALS = "abcxyz0129-:"
CLASSES = ["[0-9]", "[a-c]", "[xyz]", "[0-9a-c]"]


@st.composite
def regexes(draw, depth: int = 2) -> str:
    """Literals, classes, groups of alternatives, ?, {m} and {m,n}: read alike by Python's re and Rust's regex."""

    def piece(d: int) -> str:
        kind = draw(st.sampled_from(["literal", "class", "group"][: 3 if d else 2]))
        if kind == "literal":
            atom = draw(st.sampled_from(LITERALS))
        elif kind == "class":
            atom = draw(st.sampled_from(CLASSES))
        else:
            atom = "(" + "|".join(sequence(d - 1) for _ in range(draw(st.integers(1, 2)))) + ")"
        lo = draw(st.integers(0, 2))
        hi = draw(st.integers(lo, 3))
        return atom + draw(st.sampled_from(["", "", "?", "{%d}" % max(lo, 1), "{%d,%d}" % (lo, hi)]))

    def sequence(d: int) -> str:
        return "".join(piece(d) for _ in range(draw(st.integers(1, 3))))

    return "|".join(sequence(depth) for _ in range(draw(st.integers(1, 2))))


@st.composite
def row_patterns(draw, longest: int) -> tuple[list, int]:
    """Three rows' patterns, one of them None (unconstrained), each matchable within ``longest``
    tokens; and the fewest tokens the longest of them needs."""
    patterns = [draw(regexes()), draw(regexes())]
    mins = [compile_constraint(Constraint.regex(p), TOK).min_length for p in patterns]
    assume(max(mins) <= longest)
    patterns.insert(draw(st.integers(0, 2)), None)
    return patterns, max(mins)


def prompts_of(draw, rows: int, guided: bool) -> list[list[int]]:
    """Prompts of 0-3 tokens (1-3 with guidance, which needs one), lengths differing: left padding."""
    lengths = [draw(st.integers(int(guided), 3)) for _ in range(rows)]
    return [draw(st.lists(st.integers(2, TOK.vocab_size - 1), min_size=n, max_size=n)) for n in lengths]


def options_for(sampler: dict, length: int, temperature: float, cfg: float, **more) -> dict:
    steps = {"steps": length} if sampler["sampler"] in ("ancestral", "confidence") else {}
    return {**sampler, **steps, "temperature": temperature, "cfg_scale": cfg, **more}


def run_both(model, decoding: Decoding, x, cond, start: int, patterns, seed: int, stop_token=None, tok: Tokenizer = TOK):
    """(constrained tokens, the same decoding without any constraint) of canvas x."""
    constrained = constrain(cond, x, start, automata(tok, patterns))
    out = decoding.run(model, x, torch.Generator().manual_seed(seed), constrained, start=start, stop_token=stop_token).tokens
    free = decoding.run(model, x, torch.Generator().manual_seed(seed), cond, start=start, stop_token=stop_token).tokens
    return out, free


def assert_free_row(out, free, patterns, temperature: float, stop_token) -> None:
    """The unconstrained row equals its free decoding where the generator's stream is the same (module docstring).
    With a stop token, rows leave the batch when they end, and the draws' shapes follow the rows left."""
    if temperature == 0 and stop_token is None:
        b = patterns.index(None)
        assert torch.equal(out[b], free[b]), (out[b], free[b])


# --- 1. every MDM decoding ------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_every_mdm_sampler_cache_and_block_decodes_to_a_match(data):
    draw = data.draw
    patterns, need = draw(row_patterns(longest=8))
    sampler, cache = draw(st.sampled_from(SAMPLERS)), draw(st.sampled_from(CACHES))
    temperature, cfg = draw(st.sampled_from([0.0, 1.0])), draw(st.sampled_from([0.0, 1.5]))
    block_len = draw(st.sampled_from([0, 2, 3]))
    length = max(need + draw(st.integers(0, 3)), 3)
    length += -length % block_len if block_len else 0
    stop_token = draw(st.sampled_from([None, TOK.eos_id]))
    filtered = draw(st.sampled_from([{}, {"top_k": 3}, {"top_p": 0.5}])) if temperature else {}
    options = options_for(sampler, length, temperature, cfg, **cache, **filtered, **({"block_len": block_len} if block_len else {}))
    x, cond, start = make_canvas(prompts_of(draw, 3, bool(cfg)), length, TOK.mask_id, TOK.pad_id, TOK.eos_id)
    model, seed = tiny(TOK, draw(st.integers(0, 2**16))), draw(st.integers(0, 2**16))
    out, free = run_both(model, Decoding(spec=SamplerSpec.from_options(**options)), x, cond, start, patterns, seed, stop_token)
    assert_rows(TOK, out[:, start:], patterns, options)
    assert_free_row(out, free, patterns, temperature, stop_token)


REST = list(product((0, 3), (0.0, 1.0), (0.0, 1.5)))  # (block_len, temperature, cfg_scale)
# each sampler with every (blocks, temperature, guidance) setting and a cache that cycles with them:
# every pair of a sampler, a cache and a setting occurs
GRID = [(s, (r + s) % len(CACHES), *REST[r]) for s in range(len(SAMPLERS)) for r in range(len(REST))]
GRID_PATTERNS = [["[0-9]{2,3}", "(ab|c)x?[a-c]{1,2}", None], [None, "-?(12|[0-9])+:[xyz]", "a|ab|abc"],
                 ["(x|yz)+", None, "[a-c]?[0-9]{2}"]]


def test_every_sampler_with_every_cache_blocks_temperature_and_guidance():
    length, prompts = 6, [TOK.encode("ab"), TOK.encode("x12"), TOK.encode("c")]
    x, cond, start = make_canvas(prompts, length, TOK.mask_id, TOK.pad_id, TOK.eos_id)
    for n, (s, c, blocks, temperature, cfg) in enumerate(GRID):
        patterns = GRID_PATTERNS[n % len(GRID_PATTERNS)]
        options = options_for(SAMPLERS[s], length, temperature, cfg, **CACHES[c], **({"block_len": blocks} if blocks else {}))
        out, free = run_both(tiny(TOK, n), Decoding(spec=SamplerSpec.from_options(**options)), x, cond, start, patterns, n)
        assert_rows(TOK, out[:, start:], patterns, options)
        assert_free_row(out, free, patterns, temperature, None)


# --- a block model on its grid, with its block cache ----------------------------------------------


@SETTINGS
@given(data=st.data())
def test_a_block_model_decodes_to_a_match_on_its_grid(data):
    """Left-padded prompts end anywhere in a block; a context shorter than the canvas slides the
    window of each call over it (the constraint still reads the whole row). Guidance only where the
    canvas fits the context (test_guidance_when_the_window_slides_past_the_prompt)."""
    draw = data.draw
    patterns, need = draw(row_patterns(longest=8))
    size, context = draw(st.sampled_from([2, 3])), draw(st.sampled_from([6, 64]))
    sampler, temperature = draw(st.sampled_from(SAMPLERS)), draw(st.sampled_from([0.0, 1.0]))
    cfg = draw(st.sampled_from([0.0, 1.5])) if context == 64 else 0.0
    cache = draw(st.sampled_from([{}, {"cache": "none"}]))  # the block cache (the default) or none
    length = max(need + draw(st.integers(0, 3)), 3)
    stop_token = draw(st.sampled_from([None, TOK.eos_id]))
    x, cond, start = make_canvas(prompts_of(draw, 3, bool(cfg)), length, TOK.mask_id, TOK.pad_id, TOK.eos_id)
    model = tiny(TOK, draw(st.integers(0, 2**16)), block_causal=size, context_len=context)
    options = options_for(sampler, length, temperature, cfg, **cache)
    out, free = run_both(model, Decoding(spec=SamplerSpec.from_options(**options)), x, cond, start, patterns, draw(st.integers(0, 99)),
                         stop_token)
    assert_rows(TOK, out[:, start:], patterns, (size, context, options))
    assert_free_row(out, free, patterns, temperature, stop_token)


def test_guidance_when_the_window_slides_past_the_prompt():
    """A block model decodes a canvas longer than its context through a sliding window; the
    guidance checked on the whole canvas must not be refused when a window no longer holds the prompt."""
    x, cond, start = make_canvas([TOK.encode("ab")], 8, TOK.mask_id, TOK.pad_id, TOK.eos_id)
    spec = SamplerSpec.from_options(sampler="confidence", steps=8, temperature=0.0, cfg_scale=1.5)
    out = Decoding(spec=spec).run(tiny(TOK, 0, block_causal=2, context_len=6), x, torch.Generator().manual_seed(0), cond, start=start)
    assert not (out.tokens == TOK.mask_id).any()


# --- AR decoding ------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_ar_decoding_with_and_without_its_kv_cache_matches(data):
    draw = data.draw
    patterns, need = draw(row_patterns(longest=8))
    length = need + draw(st.integers(0, 3))
    temperature, kv_cache = draw(st.sampled_from([0.0, 1.0])), draw(st.booleans())
    x, cond, start = make_canvas(prompts_of(draw, 3, False), 0, TOK.mask_id, TOK.pad_id, TOK.eos_id, explicit=True)
    model, seed = tiny(TOK, draw(st.integers(0, 2**16)), causal=True), draw(st.integers(0, 99))
    decoding = Decoding(ar=ARConfig(max_new_tokens=length, kv_cache=kv_cache, temperature=temperature))
    constrained = constrain(cond, x, start, automata(TOK, patterns), new_tokens=length)
    out = decoding.run(model, x, torch.Generator().manual_seed(seed), constrained).tokens
    free = decoding.run(model, x, torch.Generator().manual_seed(seed), cond).tokens
    assert out.shape == (3, x.shape[1] + length)
    assert_rows(TOK, out[:, x.shape[1]:], patterns, (kv_cache, temperature))
    b = patterns.index(None)  # one draw per row and step, whatever the constraint: the free row is unchanged
    assert torch.equal(out[b], free[b])


# --- infilling a JSON template ----------------------------------------------------------------------

TEMPLATE = '{"ab":[MASK:3],"xy":[MASK:3]}'  # fixed keys, masked values
TEMPLATE_SCHEMAS = [
    {"type": "object", "properties": {"ab": {"type": "integer"}, "xy": {"enum": ["ab", "c", "xyz"]}}, "required": ["ab", "xy"]},
    {"type": "object", "properties": {"ab": {"type": "string", "maxLength": 2}, "xy": {"type": "boolean"}}, "required": ["ab", "xy"]},
]


@settings(SETTINGS, max_examples=15)
@given(data=st.data())
def test_infilled_json_templates_parse_and_validate(data):
    draw = data.draw
    schemas = [*TEMPLATE_SCHEMAS]
    schemas.insert(draw(st.integers(0, 2)), None)
    patterns = [None if s is None else Constraint.json_schema(s).to_regex() for s in schemas]
    sampler, cache = draw(st.sampled_from(SAMPLERS)), draw(st.sampled_from(CACHES))
    temperature, cfg = draw(st.sampled_from([0.0, 1.0])), draw(st.sampled_from([0.0, 1.5]))  # the fixed text is the prompt
    ids = infill_ids(TEMPLATE, TOK)
    x, cond, start = infill_canvas(ids, TOK, rows=3)
    block_len = draw(st.sampled_from([0, *(n for n in (2, 3, 4) if len(ids) % n == 0)]))
    options = options_for(sampler, len(ids), temperature, cfg, **cache, **({"block_len": block_len} if block_len else {}))
    out, free = run_both(tiny(TOK, draw(st.integers(0, 2**16))), Decoding(spec=SamplerSpec.from_options(**options)), x, cond, start,
                         patterns, draw(st.integers(0, 99)))
    assert_rows(TOK, out[:, start:], patterns, options)
    for b, schema in enumerate(schemas):
        if schema is not None:
            jsonschema.validate(json.loads(generated_text(TOK, out[b, start:].tolist())), schema)
    assert_free_row(out, free, patterns, temperature, None)


# --- 2. JSON Schemas through MDM and AR decoding ---------------------------------------------------

SCHEMAS = {
    "nested object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 5},
        "point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "number"}}, "required": ["x", "y"]}},
        "required": ["name", "point"]},
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2.5, None]}},
             "required": ["color", "size"]},
    "string with pattern": {"type": "string", "pattern": "^[a-c]{2}-[0-9]{2}$"},
    "string with maxLength": {"type": "string", "minLength": 2, "maxLength": 4},
    "number": {"type": "number"},
}
DECODINGS = [  # options of sampled and greedy MDM decoding; None: AR with its KV cache
    {"sampler": "confidence", "temperature": 1.0},
    {"sampler": "threshold", "tau": 0.9, "temperature": 0.0, "cache": "dual"},
    None,
]


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schemas_decode_to_valid_json(name):
    """Two rows, after an empty prompt and after a prompt, each decoding with a fresh random model."""
    tok, schema = default_tokenizer(), SCHEMAS[name]
    a = compile_constraint(Constraint.json_schema(schema), tok)
    length = a.min_length + 8
    for n, options in enumerate(DECODINGS):
        ar = options is None
        x, cond, start = make_canvas([[], tok.encode("JSON:")], 0 if ar else length, tok.mask_id, tok.pad_id, tok.eos_id, explicit=ar)
        if ar:
            start, decoding = x.shape[1], Decoding(ar=ARConfig(max_new_tokens=length))
        else:
            decoding = Decoding(spec=SamplerSpec.from_options(**options_for(options, length, options["temperature"], 0.0)))
        cond = constrain(cond, x, start, [a, a], length if ar else None)
        out = decoding.run(tiny(tok, n, causal=ar), x, torch.Generator().manual_seed(n), cond, start=start).tokens
        for row in out[:, start:].tolist():
            text = generated_text(tok, row)
            assert text is not None, (options, row)
            jsonschema.validate(json.loads(text), schema)


DROPPED = [  # a schema, and an instance it rejects that its regex must not match
    ({"type": "integer", "minimum": 0, "maximum": 99}, "100"),
    ({"type": "integer", "minimum": 0, "maximum": 99}, "-1"),
    ({"type": "number", "minimum": 1.5, "maximum": 3}, "4"),
    ({"type": "string", "pattern": "^[a-c]+$", "maxLength": 3}, '"zz"'),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
]


@pytest.mark.parametrize("schema,invalid", DROPPED)
def test_a_schema_is_refused_or_its_regex_rejects_what_it_rejects(schema, invalid):
    """Decoded output must validate: a schema keyword the regex cannot express is refused by name
    (``json_schema``), never dropped."""
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(json.loads(invalid))
    try:
        regex = Constraint.json_schema(schema).to_regex()
    except OptionError as refused:
        assert refused.param == "json_schema"
        return
    assert re.fullmatch(regex, invalid) is None, regex


# --- 3. the one-step greedy decode is the constrained argmax ----------------------------------------

SMALL_PATTERNS = ["(ab)+c?", "a|ab|ba", "[ab]*c", "-?(12|1|2)+", "b(a|c)*1?", "(abc|ba)+"]
ONE_STEP = [  # each commits every masked position in its first and only step
    {"sampler": "confidence", "steps": 1, "score": "margin"},
    {"sampler": "ancestral", "steps": 1},
    {"sampler": "threshold", "tau": 1e-9},
    {"sampler": "first-hitting", "k": 4},
]


@lru_cache(maxsize=None)
def small_fillings(n: int) -> torch.Tensor:
    """(V^n, n) every filling of n masked positions with real tokens (EOS, PAD included)."""
    return torch.tensor(list(product(range(SMALL.vocab_size), repeat=n)), dtype=torch.long).reshape(-1, n)


@lru_cache(maxsize=None)
def matching(pattern: str | None, region: tuple[int, ...]) -> torch.Tensor:
    """(V^n,) bool: which fillings of the n MASKs of ``region`` match ``pattern`` (None: all)."""
    masked = [k for k, t in enumerate(region) if t == SMALL.mask_id]
    fills = small_fillings(len(masked))
    if pattern is None:
        return torch.ones(fills.shape[0], dtype=torch.bool)
    out = []
    for fill in fills.tolist():
        tokens = list(region)
        for k, v in zip(masked, fill):
            tokens[k] = v
        out.append(matches(SMALL, pattern, tokens))
    return torch.tensor(out)


def brute_force_argmax(log_probs: torch.Tensor, region: list[int], pattern: str | None) -> list[int]:
    """The filling of the masked positions of ``region`` (log_probs (n, V) at them, in order) with
    the greatest sum of log-probabilities among those whose region matches ``pattern`` (None: any)."""
    fills = small_fillings(len(log_probs))
    scores = log_probs.gather(1, fills.T).sum(dim=0).masked_fill(~matching(pattern, tuple(region)), -torch.inf)
    assert bool((scores > -torch.inf).any()), (pattern, region)
    return fills[int(scores.argmax())].tolist()


def small_regions(pattern: str | None, g: torch.Generator) -> list[int]:
    """Four masked positions, or three around a fixed token taken from a matching filling."""
    region = [SMALL.mask_id] * 4
    if pattern is None or torch.rand(1, generator=g) < 0.5:
        return region
    found = small_fillings(4)[matching(pattern, tuple(region))]
    pick = found[int(torch.randint(len(found), (1,), generator=g))]
    k = int(torch.randint(4, (1,), generator=g))
    region[k] = int(pick[k])
    return region


@pytest.mark.parametrize("options", ONE_STEP, ids=[o["sampler"] for o in ONE_STEP])
def test_a_one_step_greedy_decode_is_the_brute_force_constrained_argmax(options):
    """Batches of three rows (one unconstrained) after prompts of different lengths: the model's
    logits at the canvas as given (every region position MASK or fixed), summed over the positions."""
    g, moved = torch.Generator().manual_seed(len(options)), 0
    for trial in range(6):
        patterns = [SMALL_PATTERNS[(trial + j) % len(SMALL_PATTERNS)] for j in range(2)]
        patterns.insert(trial % 3, None)
        regions = [small_regions(p, g) for p in patterns]
        prompts = [SMALL.encode("ab"[: (trial + b) % 3]) + regions[b] for b in range(3)]
        x, cond, start = make_canvas(prompts, 0, SMALL.mask_id, SMALL.pad_id, SMALL.eos_id)
        start = x.shape[1] - 4
        model = tiny(SMALL, 100 + trial)
        out = Decoding(spec=SamplerSpec.from_options(**options, temperature=0.0)).run(
            model, x, torch.Generator().manual_seed(trial), constrain(cond, x, start, automata(SMALL, patterns)), start=start)
        assert out.steps == 1 and out.nfe == 1
        with torch.no_grad():
            log_probs = model(x, key_mask=cond.key_mask, positions=cond.positions).double().log_softmax(dim=-1)
        for b, (pattern, region) in enumerate(zip(patterns, regions)):
            masked = [start + k for k, t in enumerate(region) if t == SMALL.mask_id]
            want = brute_force_argmax(log_probs[b, masked], region, pattern)
            assert out.tokens[b, masked].tolist() == want, (options, pattern, region)
            moved += want != log_probs[b, masked].argmax(dim=-1).tolist()
    assert moved >= 3  # the constraint overrode the free argmax in several rows


# --- 4. refusals before decoding ----------------------------------------------------------------------

SHORT_PATTERNS = ["(ab){3}c", "[0-9]{5}", "(12-){2}", "a{4}", "(ba|ab){2}", "c?b"]


def fewest_tokens(pattern: str, most: int = 4) -> int:
    """The fewest SMALL tokens whose text matches ``pattern``, by enumeration."""
    pieces = [t for t in range(SMALL.vocab_size) if tokenizer_bytes(SMALL)[t] is not None]
    for n in range(most + 1):
        if any(matches(SMALL, pattern, list(ids)) for ids in product(pieces, repeat=n)):
            return n
    raise AssertionError(f"{pattern} needs more than {most} tokens")


@pytest.mark.parametrize("pattern", SHORT_PATTERNS)
def test_a_canvas_too_short_is_refused_with_the_shortest_length(pattern):
    need = fewest_tokens(pattern)
    assert need >= 1 and compile_constraint(Constraint.regex(pattern), SMALL).min_length == need
    automaton = automata(SMALL, [pattern, None])
    for length in (need - 1, need):
        x, cond, start = make_canvas([SMALL.encode("ab"), []], length, SMALL.mask_id, SMALL.pad_id, SMALL.eos_id)
        ar, _, _ = make_canvas([SMALL.encode("ab"), []], 0, SMALL.mask_id, SMALL.pad_id, SMALL.eos_id)
        for attempt in (lambda: constrain(cond, x, start, automaton), lambda: constrain(cond, ar, ar.shape[1], automaton, length)):
            if length == need:
                assert attempt().constraint is not None
                continue
            with pytest.raises(OptionError) as refused:
                attempt()
            assert refused.value.param == "length" and refused.value.values["_need"] == need
            assert str(refused.value) == f"length={length} is too short for the constraint: it needs at least {need} tokens"


def test_an_infill_template_that_contradicts_the_pattern_is_refused():
    ids = infill_ids(TEMPLATE, TOK)
    x, cond, start = infill_canvas(ids, TOK, rows=2)
    fits = compile_constraint(Constraint.json_schema(TEMPLATE_SCHEMAS[0]), TOK)
    other_key = {"type": "object", "properties": {"ab": {"type": "integer"}, "yz": {"type": "integer"}}, "required": ["ab", "yz"]}
    other_key = compile_constraint(Constraint.json_schema(other_key), TOK)
    assert constrain(cond, x, start, [fits, None], param="infill").constraint is not None
    for contradicts in (other_key, compile_constraint(Constraint.regex("[0-9]+"), TOK)):
        with pytest.raises(OptionError) as refused:
            constrain(cond, x, start, [fits, contradicts], param="infill")
        assert refused.value.param == "infill" and "the fixed text of the infill contradicts it" in str(refused.value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_data):
    """A one-step MDM run (the 512-token BPE of the small dataset)."""
    return finetune_source(tmp_path_factory.mktemp("structured"), small_data)[0]


def test_generate_refuses_before_decoding(checkpoint, monkeypatch):
    monkeypatch.setattr(Decoding, "run", lambda *args, **kwargs: pytest.fail("decoded"))
    with pytest.raises(OptionError) as refused:
        generate(checkpoint, length=3, num_samples=1, constraint=Constraint.regex("[0-9]{20}"))
    assert refused.value.param == "length" and refused.value.values["_n"] == 3
    with pytest.raises(OptionError) as refused:
        generate(checkpoint, num_samples=1, infill="x=[MASK:3].", constraint=Constraint.regex("[0-9]+"))
    assert refused.value.param == "infill"


def test_the_command_line_refuses_in_one_line(checkpoint, tmp_path, capsys):
    """A length too short through the installed script: one line, exit status 2. A regex that does
    not compile and a schema file that does not exist through the same entry point, in-process."""
    proc = subprocess.run([str(UNMASK), "sample", "--checkpoint", str(checkpoint), "--regex", "[0-9]{20}", "--length", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    need = compile_constraint(Constraint.regex("[0-9]{20}"), checkpoint_tokenizer(checkpoint)).min_length
    assert proc.stderr == f"error: --length=5 is too short for the constraint: it needs at least {need} tokens\n"
    missing = tmp_path / "missing.json"
    for argv, named in ((["--regex", "("], "--regex"), (["--json-schema", str(missing)], str(missing))):
        assert main(["sample", "--checkpoint", str(checkpoint), "--length", "4", *argv]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1 and named in out.err, out.err
