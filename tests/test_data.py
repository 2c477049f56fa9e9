"""Embedded corpus, tokenizer conventions, packed shards, and clear errors for bad corpora."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from unmask.data import (
    VALIDATION_WORKS, TokenDataset, Tokenizer, default_tokenizer, load_tokenizer, prepare_dataset, read_documents,
    shakespeare_notice, shakespeare_works, train_bpe,
)
from unmask.errors import OptionError, UnmaskError


def test_corpus_split_by_whole_work():
    train, val = shakespeare_works("train"), shakespeare_works("validation")
    assert len(train) == 38 and len(val) == 4 and len(shakespeare_works("all")) == 42
    names = [n for n, _ in train + val]
    assert len(set(names)) == 42 and not any(n.endswith("_f") for n in names)
    assert sorted(n for n, _ in val) == sorted(VALIDATION_WORKS)
    assert all(len(text) > 2_000 for _, text in train + val)  # the shortest, The Phoenix and the Turtle, is a poem
    assert "To be, or not to be" in dict(val)["hamlet"]
    assert "Creative Commons Attribution" in shakespeare_notice() and "Gutenberg" in shakespeare_notice()


def test_default_tokenizer_conventions_and_round_trip():
    tok = default_tokenizer()
    assert tok.vocab_size == 4096 and tok.mask_id == 4096 and tok.eos_id == 0 and tok.pad_id == 1
    for text in (dict(shakespeare_works("validation"))["sonnets"][:2000], "Ünïcødé ✓ — naïve café 日本"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.encode("a")[0], tok.mask_id], mask_text="_") == "a_"
    assert load_tokenizer("default").fingerprint == tok.fingerprint


def test_foreign_tokenizer_json_gets_mask_appended(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    (tmp_path / "gpt").mkdir()
    hf.save(str(tmp_path / "gpt" / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "gpt")
    assert tok.mask_id == hf.get_vocab_size() and tok.vocab_size == hf.get_vocab_size()
    assert tok.eos_id == hf.token_to_id("<|endoftext|>") and tok.pad_id == tok.eos_id


def test_tokenizer_without_eos_is_refused(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=50))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnmaskError, match="end-of-text"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(UnmaskError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("First document. " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 40}) for i in range(6)) + "\n")
    return tmp_path


def test_prepare_and_read_windows(corpus, tmp_path):
    tok = train_bpe([p.read_text() for p in corpus.iterdir()], vocab_size=300)
    out = prepare_dataset(tmp_path / "data", tok, read_documents([corpus]), val_fraction=0.3, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["mask_id"] == tok.mask_id
    splits = meta["splits"]
    assert splits["train"]["num_documents"] + splits["val"]["num_documents"] == 7
    assert splits["train"]["num_documents"] >= 1 and splits["val"]["num_documents"] >= 1
    train = TokenDataset(out, "train")
    stream = np.concatenate(train.shards)
    assert stream[-1] == tok.eos_id and (stream == tok.eos_id).sum() == splits["train"]["num_documents"]
    a = train.sample_windows(np.random.default_rng(3), 5, 16)
    b = train.sample_windows(np.random.default_rng(3), 5, 16)
    assert a.shape == (5, 16) and a.dtype == np.int64 and np.array_equal(a, b)
    assert a.max() < tok.vocab_size
    w = train.eval_windows(16)
    assert w.shape == (len(stream) // 16, 16) and np.array_equal(w.reshape(-1), stream[: w.size])
    assert train.tokenizer.fingerprint == tok.fingerprint


def test_default_dataset_is_cached(tmp_path):
    from unmask.data import default_dataset

    first = default_dataset(tmp_path)
    assert default_dataset(tmp_path) == first
    val = TokenDataset(first, "val")
    assert val.num_tokens > 100_000 and TokenDataset(first, "train").num_tokens > 1_000_000


def test_errors_name_the_input(tmp_path):
    with pytest.raises(UnmaskError, match="missing.txt"):
        list(read_documents([tmp_path / "missing.txt"]))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(UnmaskError, match=r"bad.txt is not UTF-8 text \(invalid byte at offset 3\)"):
        list(read_documents([bad]))
    rec = tmp_path / "r.jsonl"
    rec.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(UnmaskError, match=r"r.jsonl line 2 has no string field 'text'"):
        list(read_documents([rec]))
    with pytest.raises(UnmaskError, match="empty"):
        prepare_dataset(tmp_path / "d", default_tokenizer(), ["", "  "], progress=False)
    with pytest.raises(UnmaskError, match="meta.json"):
        TokenDataset(tmp_path, "train")
    with pytest.raises(UnmaskError, match="unsupported extension"):
        (tmp_path / "x.csv").write_text("a,b")
        list(read_documents([tmp_path / "x.csv"]))


def test_more_read_errors_and_unicode_lines(tmp_path):
    rec = tmp_path / "bad.jsonl"
    rec.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UnmaskError, match=r"bad.jsonl line 2 is not valid JSON"):
        list(read_documents([rec]))
    # U+2028 is legal unescaped inside a JSON string; it must not split the line
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"body": "a\u2028b"}, ensure_ascii=False) + "\n\n", encoding="utf-8")
    assert list(read_documents([ok], text_field="body")) == ["a\u2028b"]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UnmaskError, match="empty_dir"):
        list(read_documents([tmp_path / "empty_dir"]))


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    import sys

    from unmask.data import hf_documents

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UnmaskError, match=r"unmask\[hf\]"):
        next(hf_documents("wikitext", "wikitext-2-raw-v1", "train"))


def test_mask_before_the_last_id_is_a_mask_inside_the_vocabulary(tmp_path):
    """Published MDM tokenizers (Dream's <|mask|>, LLaDA's <|mdm_mask|>) keep MASK among the other ids."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|mask|>", "<|endoftext|>"])
    hf.train_from_iterator(["hello world"] * 10, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    total = hf.get_vocab_size(with_added_tokens=True)
    assert (tok.mask_id, tok.vocab_size, tok.mask_inside) == (0, total, True)
    assert tok.decode([tok.eos_id, 0]) == "_"


def _tiny_tokenizer() -> Tokenizer:
    return train_bpe(["the quick brown fox jumps over the lazy dog " * 20, "héllo wörld ✓ " * 20], vocab_size=300)


def test_packing_is_documents_joined_by_eos_across_shards(tmp_path):
    tok = _tiny_tokenizer()
    train_docs = [f"document number {i}: " + "the lazy dog " * (i + 1) for i in range(20)]
    val_docs = ["héllo wörld ✓ " * 30]
    out = prepare_dataset(tmp_path / "d", tok, train_docs, val_docs, shard_tokens=64, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 1 and (out / "tokenizer.json").is_file()
    train = TokenDataset(out, "train")
    expected = np.array([t for d in train_docs for t in tok.encode(d) + [tok.eos_id]])
    assert np.array_equal(np.concatenate(train.shards), expected) and train.num_tokens == len(expected)
    w = train.eval_windows(16, max_windows=1000)
    assert w.shape == (len(expected) // 16, 16) and np.array_equal(w.reshape(-1), expected[: w.size])
    assert train.eval_windows(16, max_windows=3).shape == (3, 16)
    # resuming = restoring the rng state replays the same batches; windows are real slices of the stream
    rng = np.random.default_rng(0)
    train.sample_windows(rng, 4, 8)
    state = rng.bit_generator.state
    a = train.sample_windows(rng, 32, 8)
    rng.bit_generator.state = state
    assert np.array_equal(a, train.sample_windows(rng, 32, 8))
    assert a.min() >= 0 and a.max() < tok.vocab_size
    stream = expected.tolist()
    assert all(any(stream[i : i + 8] == row for i in range(len(stream) - 7)) for row in a.tolist())
    val = TokenDataset(out, "val")
    with pytest.raises(UnmaskError, match=rf"the val split of .* has {val.num_tokens} tokens, fewer than one window of 100000"):
        val.eval_windows(100_000)


def test_hash_split_never_duplicates_and_needs_two_documents(tmp_path):
    tok = _tiny_tokenizer()
    docs = ["the quick brown fox", "over the lazy dog"]
    out = prepare_dataset(tmp_path / "d", tok, docs, val_fraction=0.01, progress=False)
    got = sorted(tok.decode(TokenDataset(out, s).shards[0].tolist()) for s in ("train", "val"))
    assert got == sorted(docs)  # one document on each side, none on both
    with pytest.raises(UnmaskError, match="single document of one line"):
        prepare_dataset(tmp_path / "e", tok, ["only one", " "], progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UnmaskError, match="mine exists and is not a prepared data folder"):
        prepare_dataset(tmp_path / "mine", tok, docs, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # an earlier prepared folder is replaced only on request
    with pytest.raises(OptionError, match=r"out .*d already holds prepared data; pass overwrite") as held:
        prepare_dataset(out, tok, docs * 3, ["a b c"], progress=False)
    assert held.value.param == "out"
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["num_documents"] == 1
    prepare_dataset(out, tok, docs * 3, ["a b c"], progress=False, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["num_documents"] == 6


def test_concurrent_builder_keeps_the_first_folder(tmp_path):
    from unmask.data.shards import _prepare

    tok = _tiny_tokenizer()
    first = _prepare(tmp_path / "cache", tok, ["a b c", "d e f"], ["g h"], 0.05, 2**26, False, replace=False)
    before = (first / "meta.json").read_text()
    # a second process that finishes later must keep the existing folder, not fail or clobber it
    again = _prepare(tmp_path / "cache", tok, ["x y z"] * 5, ["g h"], 0.05, 2**26, False, replace=False)
    assert again == first and (first / "meta.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary folders left behind


def test_eval_windows_spread_over_the_whole_split():
    """Validation windows sample the whole split (every held-out work), not the opening of the first one."""
    from unmask.data import default_dataset

    val = TokenDataset(default_dataset(), "val")
    stream = np.concatenate(val.shards).astype(np.int64)
    length, n = 64, 32
    total = len(stream) // length
    w = val.eval_windows(length, n)
    assert w.shape == (n, length) and np.array_equal(w, val.eval_windows(length, n))  # deterministic
    # every window is a grid-aligned slice of the stream (so no two overlap), at the documented starts
    starts = val.eval_starts(length, n)
    assert np.array_equal(starts, ((np.arange(n) + 0.5) * total / n).astype(np.int64) * length)
    assert all(np.array_equal(w[i], stream[s : s + length]) for i, s in enumerate(starts))
    assert np.all(np.diff(starts) >= length)
    assert starts[0] < len(stream) / n and starts[-1] >= len(stream) * (n - 1) / n - length  # first and last n-th
    # the four held-out works: each contains at least one window
    ends = np.flatnonzero(stream == val.tokenizer.eos_id)
    bounds = np.concatenate([[0], ends + 1])
    works = np.searchsorted(bounds, starts, side="right") - 1
    assert len(ends) == len(VALIDATION_WORKS) and set(works.tolist()) == set(range(len(VALIDATION_WORKS)))
    # the token before each window (the AR model's context): EOS before the split's first token
    prev = val.eval_previous(length, n)
    assert np.array_equal(prev, [val.tokenizer.eos_id if s == 0 else stream[s - 1] for s in starts])
    # all windows: the whole stream in order, as before
    assert np.array_equal(val.eval_windows(length).reshape(-1), stream[: total * length])


def test_single_document_holds_out_the_last_fraction_of_its_text(tmp_path):
    """One big text file: the validation split is the last val_fraction of its text, cut at a line start."""
    tok = _tiny_tokenizer()
    lines = [f"line {i:03d}: the quick brown fox jumps over the lazy dog\n" for i in range(200)]
    text = "".join(lines)
    out = prepare_dataset(tmp_path / "d", tok, [text], val_fraction=0.1, progress=False)
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    train_text, val_text = (tok.decode(np.concatenate(ds.shards)[:-1].tolist()) for ds in (train, val))
    assert train_text + val_text == text  # every character once, in order
    assert val_text == "".join(lines[180:])  # lines of equal length: exactly the last 10% of them
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["num_documents"] == meta["splits"]["val"]["num_documents"] == 1
    assert "last 10.0%" in meta["validation"] and "line 181" in meta["validation"]
    # the cut is the line start nearest the target fraction, so no line is split
    uneven = "short\n" * 30 + "a much longer line of text at the end of the file\n"
    out = prepare_dataset(tmp_path / "u", tok, [uneven], val_fraction=0.05, progress=False)
    val = TokenDataset(out, "val")
    assert tok.decode(np.concatenate(val.shards)[:-1].tolist()) == "a much longer line of text at the end of the file\n"


def test_cli_prepare_refuses_an_existing_folder_unless_overwrite(corpus, tmp_path):
    """`unmask data prepare` never replaces prepared data silently: a run trained on it could not
    resume on the same tokens."""
    import subprocess
    import sys
    from pathlib import Path

    unmask = str(Path(sys.executable).with_name("unmask"))
    out = tmp_path / "prepared"

    def prepare(*extra):
        return subprocess.run([unmask, "data", "prepare", str(corpus), "--out", str(out), "--workers", "0", *extra],
                              capture_output=True, text=True, timeout=300)

    assert prepare().returncode == 0
    before = (out / "meta.json").read_text()
    again = prepare()
    assert again.returncode == 2, again.stderr
    assert again.stderr.strip() == f"error: --out {out} already holds prepared data; pass --overwrite to replace it (runs trained on it " \
                                   "will then refuse to --resume on it) or give another --out"
    assert (out / "meta.json").read_text() == before
    replaced = prepare("--overwrite", "--val-fraction", "0.5")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "meta.json").read_text())["fingerprint"] != json.loads(before)["fingerprint"]


def test_content_fingerprint_follows_the_tokens(corpus, tmp_path):
    """meta.json's fingerprint hashes every shard (name, size, sha256): the same corpus gives the same
    one whatever the workers or the folder, other documents another."""
    import hashlib

    tok = train_bpe([p.read_text() for p in corpus.iterdir()], vocab_size=300)
    a = prepare_dataset(tmp_path / "a", tok, read_documents([corpus]), val_fraction=0.3, progress=False)
    b = prepare_dataset(tmp_path / "b", tok, read_documents([corpus], lazy=True), val_fraction=0.3, progress=False, workers=2)
    c = prepare_dataset(tmp_path / "c", tok, read_documents([corpus]), val_fraction=0.5, progress=False)
    meta = {name: json.loads((path / "meta.json").read_text()) for name, path in (("a", a), ("b", b), ("c", c))}
    assert meta["a"]["fingerprint"] == meta["b"]["fingerprint"] != meta["c"]["fingerprint"]
    for split in ("train", "val"):
        files = meta["a"]["splits"][split]["shards"]
        assert meta["a"]["splits"][split]["sha256"] == [hashlib.sha256((a / f).read_bytes()).hexdigest() for f in files]
    assert TokenDataset(a, "train").fingerprint == meta["a"]["fingerprint"]
